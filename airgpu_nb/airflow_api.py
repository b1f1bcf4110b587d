"""A small client for an Airflow 3 deployment's REST API (``/api/v2``): what deploy, trigger and
watch need, and nothing about screens.

Configured by the environment (``AIRGPU_AIRFLOW_URL`` with ``AIRGPU_AIRFLOW_USERNAME`` +
``AIRGPU_AIRFLOW_PASSWORD``, or ``AIRGPU_AIRFLOW_TOKEN``) or by ``airflow_url`` /
``airflow_username`` in ``[tool.airgpu]``; a secret is never read from a file that is shared or
committed. A secret never reaches a message: URLs are shown through
:func:`airgpu_nb.urls.redact_url` and every error text is scrubbed of the password and token.

Every request has a bounded time (connect and read timeouts); an unreachable, refusing or
unauthorising API is an :class:`ApiError` (exit 2) naming the URL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import AirgpuError
from .keys import DEPLOYMENT_FILE_KEYS, DEPLOYMENT_SECRET_KEYS
from .urls import credentials, redact_url, scrub, split_secrets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

URL_ENV = "AIRGPU_AIRFLOW_URL"
USERNAME_ENV = "AIRGPU_AIRFLOW_USERNAME"
PASSWORD_ENV = "AIRGPU_AIRFLOW_PASSWORD"
TOKEN_ENV = "AIRGPU_AIRFLOW_TOKEN"
TIMEOUT_ENV = "AIRGPU_AIRFLOW_TIMEOUT"  # seconds one request may wait for an answer
#: ``[tool.airgpu]`` keys for the deployment; secrets are refused there.
FILE_KEYS = DEPLOYMENT_FILE_KEYS
SECRET_FILE_KEYS = DEPLOYMENT_SECRET_KEYS
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


class ApiError(AirgpuError):
    """The Airflow API is unreachable, refuses us or answers something unusable (exit 2)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return (type(self), (self.message, self.status))


@dataclass(frozen=True)
class AirflowConfig:
    """Where the deployment is and how to authenticate; secrets kept out of ``repr``."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S

    @property
    def shown_url(self) -> str:
        """The URL as messages may show it."""
        return redact_url(self.url)

    @property
    def base(self) -> str:
        """What to connect to: the URL without user-info, query or trailing slash."""
        bare = split_secrets(self.url).bare
        return bare.split("#", 1)[0].split("?", 1)[0].rstrip("/")

    @property
    def secrets(self) -> tuple[str, ...]:
        found = [s for s in (self.password, self.token) if s]
        return tuple(found) + split_secrets(self.url).secrets

    def scrub(self, text: str) -> str:
        """``text`` with the URL's secrets, the password and the token masked."""
        text = scrub(text, self.url)
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


def load_config(environ: Mapping[str, str] | None = None,
                start: str | os.PathLike[str] | None = None) -> AirflowConfig:
    """The deployment's settings: the environment wins over ``[tool.airgpu]`` of the nearest
    pyproject.toml at or above ``start`` (default: the working directory)."""
    env = os.environ if environ is None else environ
    file = _file_settings(Path(start) if start is not None else Path.cwd())
    url = (env.get(URL_ENV) or file.get("airflow_url") or "").strip()
    if not url:
        raise ApiError(f"no Airflow deployment configured: set {URL_ENV} (e.g. "
                       f"http://localhost:8080) and {USERNAME_ENV} + {PASSWORD_ENV} or "
                       f"{TOKEN_ENV}, or airflow_url in [tool.airgpu]")
    if "://" not in url or not url.lower().startswith(("http://", "https://")):
        raise ApiError(f"{URL_ENV} must be an http:// or https:// URL, got "
                       f"{redact_url(url)!r}")
    username = env.get(USERNAME_ENV) or file.get("airflow_username") or None
    password = env.get(PASSWORD_ENV) or None
    token = env.get(TOKEN_ENV) or None
    in_url = credentials(url)
    if in_url is not None and not (username or token):
        username, password = in_url[0] or None, in_url[1] or password
    if password and not username:
        raise ApiError(f"{PASSWORD_ENV} is set but {USERNAME_ENV} is not: set both, or "
                       f"{TOKEN_ENV}")
    if username and not password and not token:
        raise ApiError(f"{USERNAME_ENV} is set but {PASSWORD_ENV} is not: set it in the "
                       f"environment (never in a file), or use {TOKEN_ENV}")
    return AirflowConfig(url=url, username=username, password=password, token=token,
                         read_timeout_s=_timeout(env.get(TIMEOUT_ENV)))


def _timeout(text: str | None) -> float:
    if not text:
        return READ_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ApiError(f"{TIMEOUT_ENV} must be a number of seconds from 0 to 3600, got {text!r}")
    return value


def _file_settings(start: Path) -> dict[str, str]:
    for folder in [start.resolve(), *start.resolve().parents]:
        candidate = folder / "pyproject.toml"
        if not candidate.is_file():
            continue
        try:
            tool = tomllib.loads(candidate.read_text(encoding="utf-8")).get("tool", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return {}  # promote reports a broken pyproject.toml; here it only configures
        table = tool.get("airgpu", {}) if isinstance(tool, Mapping) else {}
        if not isinstance(table, Mapping):
            return {}
        secret = sorted(SECRET_FILE_KEYS & set(table))
        if secret:
            raise ApiError(f"{candidate} [tool.airgpu] {secret[0]}: secrets do not belong in a "
                           f"file; set {PASSWORD_ENV} or {TOKEN_ENV} in the environment")
        found: dict[str, str] = {}
        for key in FILE_KEYS & set(table):
            value = table[key]
            if not isinstance(value, str) or not value.strip():
                raise ApiError(f"{candidate} [tool.airgpu] {key}: expected a non-empty string")
            found[key] = value.strip()
        return found
    return {}


class AirflowClient:
    """``/api/v2`` of one deployment. Not thread-safe: one client per thread."""

    def __init__(self, config: AirflowConfig, transport: Any = None) -> None:
        import httpx

        self.config = config
        self._token: str | None = config.token
        self._http = httpx.Client(
            base_url=config.base, transport=transport, follow_redirects=False,
            timeout=httpx.Timeout(config.read_timeout_s,
                                  connect=min(config.connect_timeout_s, config.read_timeout_s)),
            headers={"Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _fail(self, what: str, status: int | None = None) -> ApiError:
        return ApiError(self.config.scrub(f"Airflow API at {self.config.shown_url}: {what}"),
                        status)

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise self._fail(f"no answer to {method} {path} within "
                             f"{self.config.read_timeout_s:.0f} s") from None
        except httpx.HTTPError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise self._fail(f"unreachable ({type(exc).__name__}: {reason}); is the "
                             "api-server running and the URL right?") from None

    def login(self) -> None:
        """Get a JWT from the simple auth manager's ``POST /auth/token``."""
        if not self.config.username:
            return
        response = self._send("POST", "/auth/token", json={
            "username": self.config.username, "password": self.config.password or ""})
        if response.status_code in (401, 403):
            raise self._fail(f"user {self.config.username!r} was refused ({response.status_code}"
                             f"): check {USERNAME_ENV} and {PASSWORD_ENV}", response.status_code)
        if response.status_code == 404:
            raise self._fail("has no /auth/token (not the simple auth manager?): set "
                             f"{TOKEN_ENV} to a bearer token instead", 404)
        if response.status_code not in (200, 201):
            raise self._fail(f"/auth/token answered {response.status_code}",
                             response.status_code)
        token = _json(response).get("access_token") if _is_json(response) else None
        if not isinstance(token, str) or not token:
            raise self._fail("/auth/token answered without an access_token")
        self._token = token

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, Any] | None = None, missing_ok: bool = False) -> Any:
        """The JSON answer of ``/api/v2{path}``; None for a 404 when ``missing_ok``."""
        if self._token is None and self.config.username:
            self.login()
        full = "/api/v2" + path
        response = self._call(method, full, json, params)
        if response.status_code == 401 and self.config.username:
            self.login()  # the JWT expired during a long watch: log in again, once
            response = self._call(method, full, json, params)
        status = response.status_code
        if status == 404 and missing_ok:
            return None
        if status in (401, 403):
            how = (f"check {TOKEN_ENV}" if self.config.token and not self.config.username
                   else f"set {USERNAME_ENV} + {PASSWORD_ENV} or {TOKEN_ENV}")
            verb = "unauthorised" if status == 401 else "forbidden for this user"
            raise self._fail(f"{method} {path} is {verb} ({status}): {how}", status)
        if status >= 400:
            raise self._fail(f"{method} {path} answered {status}: {_detail(response)}", status)
        if status == 204 or not response.content:
            return None
        if not _is_json(response):
            raise self._fail(f"{method} {path} did not answer JSON (is {URL_ENV} the "
                             "api-server's base URL?)", status)
        return _json(response)

    def _call(self, method: str, path: str, body: Any, params: Mapping[str, Any] | None) -> Any:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        return self._send(method, path, json=body, params=params, headers=headers)

    # -- what deploy/trigger/watch use ----------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/version")

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG's details (``file_token``, ``last_parsed_time``, ``is_paused``...), or None."""
        return self.request("GET", f"/dags/{_seg(dag_id)}/details", missing_ok=True)

    def dags(self, limit: int = 20, tags: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if tags:
            params["tags"] = list(tags)
        found = self.request("GET", "/dags", params=params)
        return found.get("dags", []) if isinstance(found, dict) else []

    def dag_source(self, dag_id: str) -> str | None:
        """The source the deployment parsed most recently, or None."""
        found = self.request("GET", f"/dagSources/{_seg(dag_id)}", missing_ok=True)
        return found.get("content") if isinstance(found, dict) else None

    def reparse(self, file_token: str) -> bool:
        """Ask for a re-parse of a registered DAG file; False when the deployment does not know
        the file (404)."""
        try:
            self.request("PUT", f"/parseDagFile/{_seg(file_token)}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def import_errors(self, file_name: str) -> list[dict[str, Any]]:
        """Import errors of files whose name is ``file_name`` (in any folder of any bundle)."""
        found = self.request("GET", "/importErrors", params={
            "filename_pattern": file_name, "limit": 100, "order_by": "-timestamp"})
        errors = found.get("import_errors", []) if isinstance(found, dict) else []
        return [e for e in errors
                if str(e.get("filename", "")).replace("\\", "/").rsplit("/", 1)[-1]
                == file_name]

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        return self.request("PATCH", f"/dags/{_seg(dag_id)}",
                            params={"update_mask": "is_paused"}, json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: Mapping[str, Any],
                run_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf)}
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/dags/{_seg(dag_id)}/dagRuns", json=body)

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}")

    def dag_runs(self, dag_id: str, limit: int = 10) -> list[dict[str, Any]]:
        found = self.request("GET", f"/dags/{_seg(dag_id)}/dagRuns",
                             params={"limit": limit, "order_by": "-run_after"})
        return found.get("dag_runs", []) if isinstance(found, dict) else []

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        found = self.request("GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances")
        return found.get("task_instances", []) if isinstance(found, dict) else []

    def xcom(self, dag_id: str, run_id: str, task_id: str,
             key: str = "return_value") -> Any:
        """The value a task pushed under ``key`` (what it returned), or None."""
        found = self.request(
            "GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances/"
            f"{_seg(task_id)}/xcomEntries/{_seg(key)}", missing_ok=True)
        return found.get("value") if isinstance(found, dict) else None

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task try's log as text, one line per event."""
        found = self.request(
            "GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances/"
            f"{_seg(task_id)}/logs/{int(try_number)}", params={"full_content": "true"},
            missing_ok=True)
        return log_text(found)

    def ui_url(self, dag_id: str, run_id: str | None = None) -> str:
        """The run's (or the DAG's) page in the Airflow UI, without credentials."""
        base = redact_url(self.config.base).rstrip("/")
        url = f"{base}/dags/{_seg(dag_id)}"
        return f"{url}/runs/{_seg(run_id)}" if run_id else url


def log_text(found: Any) -> str:
    """Airflow 3 serves a log as structured events (``{"content": [{"event": ...}]}``) or, from
    older handlers, as text; either way, plain lines."""
    if found is None:
        return ""
    content = found.get("content", found) if isinstance(found, dict) else found
    if isinstance(content, str):
        return content
    lines = []
    for item in content if isinstance(content, list) else [content]:
        if isinstance(item, dict):
            lines.append(str(item.get("event", "")))
            for error in item.get("error_detail") or []:  # the exception, without its frames
                if isinstance(error, dict) and error.get("exc_type"):
                    lines.append(f"{error['exc_type']}: {error.get('exc_value', '')}")
        elif isinstance(item, list):  # [[host, text], ...] of older servers
            lines.append(str(item[-1]) if item else "")
        else:
            lines.append(str(item))
    return "\n".join(lines)


def _seg(text: str) -> str:
    """One path segment: run ids carry ':' and '+', which must not reach the router raw."""
    return quote(str(text), safe="")


def _is_json(response: Any) -> bool:
    return "json" in response.headers.get("content-type", "")


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: Any) -> str:
    """The API's own reason, one line, short."""
    data = _json(response) if _is_json(response) else None
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                           for d in detail if isinstance(d, dict))
    text = str(detail if detail is not None else response.text or response.reason_phrase)
    return " ".join(text.split())[:300]
