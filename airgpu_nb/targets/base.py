"""What targets share: the interface, option checks from the settings table, and the helpers
the container targets (docker, kubernetes) build on, such as the in-container command.

Container operators render their arguments with Jinja at run time, so nothing a user typed may
reach a templated field as template text. Run-time values come from Airflow's own context
(``{{ params | tojson }}``, ``{{ run_id }}``); static ones travel as JSON whose strings cannot
contain a Jinja delimiter (see :func:`template_safe_json`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

from .. import __version__, settings
from ..errors import SpecError
from ..spec import PromotionSpec

DEFAULT_IMAGE = f"airgpu-nb-runtime:{__version__}"
CONTAINER_DAGS = "/opt/airgpu/dags"
CONTAINER_OUTPUTS = "/opt/airgpu/outputs"
DEFAULT_SHM = "2g"
DEFAULT_USER = "1000:1000"  # the `airgpu` user of docker/Dockerfile.runtime
OUTPUT_URL_SCHEMES = ("s3://", "gs://", "abs://", "adl://", "hdfs://")

_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
_JINJA_OPENERS = ("{{", "{%", "{#")
_SIZE_RE = re.compile(r"(\d{1,15}(?:\.\d{1,6})?)\s*(b|k|m|g|t|Ki|Mi|Gi|Ti|K|M|G|T)?")
_SIZE_FACTORS = {
    None: 1, "b": 1,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,  # docker's lowercase units: binary
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
    "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
}
_CPU_RE = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)(m?)")


class Target(Protocol):
    """Turns a validated spec into the context its Jinja2 template renders.

    ``context`` is computed once per promotion and is where a target refuses settings it cannot
    honour (``SpecError``, one line naming the flag).
    """

    name: str
    template: str  # file name under airgpu_nb/templates/

    def context(self, spec: PromotionSpec) -> dict[str, Any]:
        """Template variables beyond the common ones (see ``render.common_context``)."""


def flag(option: str) -> str:
    return settings.flag(option)


def check_options(spec: PromotionSpec, target: str) -> None:
    """One clear line for a setting this target cannot honour, naming the flag and the target
    that takes it (the settings table says which targets take what)."""
    for name in sorted(spec.option_map):
        row = settings.BY_NAME.get(name)
        if row is None or not row.option:
            raise SpecError(f"unknown target option {name!r}")
        if not row.takes(target):
            raise SpecError(f"target {target!r} does not take {row.cli_flag} (it is for the "
                            f"{' or '.join(settings.takers(name))} target)")
    if spec.image is not None and not settings.row("image").takes(target):
        raise SpecError(f"target {target!r} does not take --image (it runs no container)")
    if "outputs_url" in spec.option_map and "outputs_volume" in spec.option_map:
        raise SpecError("give --outputs-volume or --outputs-url, not both")


def no_mig(spec: PromotionSpec, target: str) -> None:
    if spec.gpu.mig is not None:
        raise SpecError(
            f"--mig needs a target that can request a MIG slice (kubernetes), not {target!r}"
        )


def check_text(value: object, option: str) -> str:
    """A string option that will sit in a templated operator field: no Jinja delimiters."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{flag(option)} takes a non-empty string, not {value!r}")
    if any(opener in value for opener in _JINJA_OPENERS) or settings.has_control_characters(
            value):
        raise SpecError(f"{flag(option)} value {value!r} may not contain '{{{{', '{{%', '{{#' "
                        "or control characters")
    return value


def image(spec: PromotionSpec) -> str:
    chosen = spec.image or DEFAULT_IMAGE
    if not _IMAGE_RE.fullmatch(chosen):
        raise SpecError(f"invalid image reference {chosen!r}")
    return chosen


def parse_size(value: object, option: str) -> int:
    """Bytes from '2g' / '512m' (docker, binary), '2Gi' (binary) or '2G' (SI)."""
    match = _SIZE_RE.fullmatch(str(value).strip()) if isinstance(value, (str, int)) else None
    if match is None or isinstance(value, bool):
        raise SpecError(f"{flag(option)} takes a size such as 512m, 2g, 2Gi or 2G, not {value!r}")
    size = int(float(match.group(1)) * _SIZE_FACTORS[match.group(2)])
    if size <= 0:
        raise SpecError(f"{flag(option)} must be more than 0, not {value!r}")
    return size


def parse_cpu(value: object) -> int:
    """Millicores from '2', '0.5' or '500m'."""
    match = _CPU_RE.fullmatch(str(value).strip()) if isinstance(value, (str, int, float)) else None
    if match is None or isinstance(value, bool):
        raise SpecError(f"--cpu takes a number of cores such as 2, 0.5 or 500m, not {value!r}")
    milli = float(match.group(1)) * (1 if match.group(2) else 1000)
    if milli < 1 or milli != int(milli):
        raise SpecError(f"--cpu must be at least 1m in whole millicores, not {value!r}")
    return int(milli)


def output_url(value: object) -> str:
    url = check_text(value, "outputs_url")
    if not url.startswith(OUTPUT_URL_SCHEMES) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise SpecError(f"--outputs-url must be an object-store URL papermill writes to "
                        f"({', '.join(OUTPUT_URL_SCHEMES)}), not {url!r}")
    return url.rstrip("/")


def string_list(value: object, option: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise SpecError(f"{flag(option)} takes a list of strings, not {value!r}")
    return [check_text(item, option) for item in items]


def template_safe_json(value: Any) -> str:
    """JSON in which no string can open a Jinja tag: '{', '}', '%' and '#' inside strings are
    written as \\u escapes. It decodes to exactly ``value``; structural braces are only ever
    followed by '"' or '}', which Jinja leaves alone."""
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{template_safe_json(k)}:{template_safe_json(v)}"
                              for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(template_safe_json(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True).translate(_JSON_ESCAPES)
    return json.dumps(value, allow_nan=False)


_JSON_ESCAPES = {ord("{"): "\\u007b", ord("}"): "\\u007d", ord("%"): "\\u0025",
                 ord("#"): "\\u0023"}


def container_command(spec: PromotionSpec, output_dir: str) -> list[str]:
    """argv of the notebook run inside the container: one element per value, no shell.

    Parameters come from the task's run-time ``params`` (DAG defaults plus trigger overrides)
    as JSON, so types and values arrive exactly; the run id and try number name the executed
    notebook as ``run.executed_path`` does for the local target."""
    config = {
        "dag_id": spec.dag_id,
        "notebook": f"{CONTAINER_DAGS}/{spec.dag_id}.ipynb",
        "name": spec.notebook_name,
        "kernel": spec.kernel,
        "output_dir": output_dir,
        "telemetry": spec.telemetry,
    }
    return [
        "python", "-m", "airgpu_nb.container_run",
        "--config-json", template_safe_json(config),
        "--params-json", "{{ params | tojson }}",
        "--run-id", "{{ run_id }}",
        "--try-number", "{{ ti.try_number }}",
    ]


def parse_user(value: object) -> tuple[int, int]:
    """'UID[:GID]' as numbers, never root: containers run as a non-root user."""
    text = str(value)
    match = re.fullmatch(r"(\d{1,10})(?::(\d{1,10}))?", text) if isinstance(value, (str, int)) \
        else None
    if match is None or isinstance(value, bool):
        raise SpecError(f"--user takes a numeric UID[:GID] such as 1000:1000, not {value!r}")
    uid = int(match.group(1))
    gid = int(match.group(2) if match.group(2) is not None else uid)
    if uid == 0 or gid == 0:
        raise SpecError("--user 0 would run as root; containers run as a non-root user")
    return uid, gid
