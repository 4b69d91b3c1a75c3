"""The page's files, shipped inside the package and read once: no CDN, nothing fetched."""

from __future__ import annotations

from importlib.resources import files
from types import MappingProxyType

# Served path (under /-/) -> file under static/, and its content type.
FILES = MappingProxyType(
    {
        "static/app.js": ("app.js", "text/javascript; charset=utf-8"),
        "static/app.css": ("app.css", "text/css; charset=utf-8"),
        "static/favicon.svg": ("favicon.svg", "image/svg+xml"),
        "static/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
        "static/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    }
)
PAGE = "index.html"
CSRF_PLACEHOLDER = b"{{csrf}}"


def read(name: str) -> bytes:
    """A file of the static folder, as installed."""
    return files("skyproxy.dashboard").joinpath("static", *name.split("/")).read_bytes()


def page(csrf: str) -> bytes:
    """The page, with this process's CSRF token in its meta tag."""
    return read(PAGE).replace(CSRF_PLACEHOLDER, csrf.encode("ascii"))
