"""URLs in logs and errors: user-info, passwords and query tokens never shown."""

from __future__ import annotations

import pytest

from airgpu_nb.urls import credentials, redact_url, scrub, split_secrets


@pytest.mark.parametrize(("url", "shown"), [
    ("http://alice:s3cret@pushgw:9091", "http://pushgw:9091"),
    ("https://alice:s3cret@pushgw:9091/base/", "https://pushgw:9091/base/"),
    ("https://tok3n@airflow.example/api/v2", "https://airflow.example/api/v2"),  # token as user
    ("http://alice:p@ss@pushgw", "http://pushgw"),  # an unescaped @ in the password
    ("http://alice:pa/ss@pushgw/x", "http://pushgw/x"),  # an unescaped / in the password
    ("http://alice:s3cret@[::1]:9091/", "http://[::1]:9091/"),
    ("https://u:s3cret@[2001:db8::1]:8443/api?access_token=s3cret&q=2",
     "https://[2001:db8::1]:8443/api?q=2"),
    ("alice:s3cret@pushgw:9091", "pushgw:9091"),  # no scheme
    ("//alice:s3cret@pushgw", "//pushgw"),
    ("http://h/api?token=s3cret", "http://h/api"),
    ("http://h/api?a=1&api_key=s3cret&b=2&X-Amz-Signature=s3cret", "http://h/api?a=1&b=2"),
    ("http://h/cb#access_token=s3cret", "http://h/cb"),
    ("http://[::1]:9091", "http://[::1]:9091"),  # nothing to hide: unchanged
    ("pushgw:9091", "pushgw:9091"),
    ("", ""),
])
def test_redact_url_hides_userinfo_and_tokens(url, shown):
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url) and "alice" not in redact_url(url)


def test_credentials_are_decoded_and_the_bare_url_keeps_host_path_and_query():
    parts = split_secrets("https://alice:p%40ss%2F1@pushgw:9091/base?x=1")
    assert parts.bare == "https://pushgw:9091/base?x=1"
    assert credentials("https://alice:p%40ss%2F1@pushgw:9091/base?x=1") == ("alice", "p@ss/1")
    assert credentials("http://pushgw:9091") is None
    # An @ in a path is not user-info for connecting, but is hidden when shown (never too little).
    assert split_secrets("http://host/a@b").bare == "http://host/a@b"
    assert credentials("http://host/a@b") is None


def test_scrub_masks_the_url_and_its_secrets_in_exception_text():
    url = "http://alice:s3cr%2Ft@pushgw?token=tk123"
    text = (f"InvalidURL: nonnumeric port: 's3cr%2Ft@pushgw' while opening {url}; "
            "auth s3cr/t; token tk123")
    cleaned = scrub(text, url)
    for secret in ("s3cr%2Ft", "s3cr/t", "tk123", "alice:"):
        assert secret not in cleaned
    assert "http://pushgw " in cleaned or "http://pushgw;" in cleaned
