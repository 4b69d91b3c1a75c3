"""Where requests go: scheme, host and port, and the Host header that names them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Origin:
    tls: bool
    host: str
    port: int
    authority: bytes  # the Host header's value

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        host = parts.hostname
        # Built from host and port, not copied from the URL: credentials in a URL's
        # userinfo must never travel in a Host header.
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority += f":{parts.port}"
        return cls(tls, host, parts.port or (443 if tls else 80), authority.encode("idna"))
