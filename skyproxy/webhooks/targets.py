"""Where relays may go: the SSRF guard, checked on the create and again at each delivery.

A target is parsed, never matched as text: `http://127.0.0.1:80@evil.example/` starts
with an allowed prefix but names another host, so userinfo is refused outright and the
scheme, host, port and path are compared one by one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from skyproxy.config import TargetPattern

_DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed(url: str, patterns: Iterable[TargetPattern]) -> bool:
    parts = _parts(url)
    if parts is None:
        return False
    scheme, host, port, path = parts
    return any(_matches(p, scheme, host, port, path) for p in patterns)


def origin_of(url: str) -> str:
    """`scheme://host:port`, the unit that per-target concurrency is counted by."""
    parts = _parts(url)
    if parts is None:
        return url
    scheme, host, port, _ = parts
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _parts(url: str) -> tuple[str, str, int, str] | None:
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        return None
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        return None
    scheme = split.scheme.lower()
    host = split.hostname
    if scheme not in _DEFAULT_PORTS or not host or "@" in split.netloc:
        return None
    if host.startswith("[") or "%" in host:
        return None
    if ":" in host:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    return scheme, host.lower(), port or _DEFAULT_PORTS[scheme], split.path or "/"


def _matches(pattern: TargetPattern, scheme: str, host: str, port: int, path: str) -> bool:
    if pattern.scheme != scheme or _normal(pattern.host) != host:
        return False
    if pattern.port is not None and pattern.port != port:
        return False
    prefix = pattern.path
    if not prefix or prefix.endswith("/"):
        return path.startswith(prefix)
    # "/hooks" allows "/hooks" and "/hooks/x", never "/hooksevil".
    return path == prefix or path.startswith(prefix + "/")


def _normal(host: str) -> str:
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    return host
