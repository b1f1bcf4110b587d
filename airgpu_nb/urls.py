"""URLs as they may appear in logs and errors: without the secrets users put in them.

Operators configure endpoints through environment variables (``AIRGPU_PUSHGATEWAY_URL``, the
Airflow API URL) and often write credentials into them (``https://user:password@host``,
``?token=...``). Anything that names such a URL to a person goes through :func:`redact_url`;
an exception's text that may quote it goes through :func:`scrub`.

Standard library only, and no parsing that can raise: a malformed URL must still be loggable.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: A query parameter whose name contains one of these is a secret (token, api_key, X-Amz-Signature,
#: client_secret, password, auth, session id...).
_SECRET_PARAM = re.compile(r"token|key|secret|pass|pwd|auth|sig|credential|session|code",
                           re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?=//)")


class SplitUrl(NamedTuple):
    """A URL cut into the part a log may show and the secrets it carried."""

    #: What a log may show: no user-info, no secret query parameter, no fragment.
    url: str
    #: The URL with only its user-info removed (as RFC 3986 delimits it): what to connect to
    #: once the credentials travel in a header instead.
    bare: str
    #: ``user:password`` (or a bare user or token) before the host's ``@``; "" when none.
    userinfo: str
    #: Everything that must not be printed: user-info, password, secret query values.
    secrets: tuple[str, ...]


def split_secrets(url: str) -> SplitUrl:
    """Separate the credentials from ``url`` (with or without a scheme).

    For what is shown, user-info ends at the last ``@`` before the query, even past a ``/``: a
    password with an unescaped ``/`` must not leak, so an ``@`` in a path hides too much of a
    logged URL, never too little. The fragment is dropped (OAuth puts tokens there).
    """
    original = str(url or "").strip()
    text, hash_, fragment = original.partition("#")
    text, question, query = text.partition("?")
    scheme = _SCHEME.match(text)
    start = scheme.end() + 2 if scheme else (2 if text.startswith("//") else 0)
    prefix, rest = text[:start], text[start:]
    authority, slash, path = rest.partition("/")
    userinfo, at_host, host = authority.rpartition("@")
    if not at_host:
        userinfo, host = "", authority
    bare = prefix + host + slash + path + question + query + hash_ + fragment
    hidden, at, shown_rest = rest.rpartition("@")  # the cautious cut, for what is shown
    if not at:
        hidden, shown_rest = "", rest
    kept: list[str] = []
    secrets = [hidden, userinfo, *hidden.split(":", 1)[1:], *userinfo.split(":", 1)[1:]]
    for param in query.split("&") if question else ():
        name, _eq, value = param.partition("=")
        if _SECRET_PARAM.search(name):
            secrets.append(value)
        elif param:
            kept.append(param)
    shown = prefix + shown_rest + ("?" + "&".join(kept) if kept else "")
    unique = sorted({s for s in secrets if s}, key=len, reverse=True)
    return SplitUrl(shown, bare, userinfo, tuple(unique))


def redact_url(url: str) -> str:
    """``url`` without user-info, secret-looking query parameters or fragment, for logs."""
    return split_secrets(url).url


def credentials(url: str) -> tuple[str, str] | None:
    """The (user, password) written into ``url``, percent-decoded; None when there are none."""
    from urllib.parse import unquote

    userinfo = split_secrets(url).userinfo
    if not userinfo:
        return None
    user, _colon, password = userinfo.partition(":")
    return unquote(user), unquote(password)


def scrub(text: str, url: str) -> str:
    """``text`` (an exception's message, say) with ``url`` and every secret in it masked."""
    from urllib.parse import unquote

    parts = split_secrets(url)
    text = str(text)
    raw = str(url or "").strip()
    if raw:
        text = text.replace(raw, parts.url)
    pieces = {p for s in parts.secrets for p in (s, unquote(s))}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "***")
    return text
