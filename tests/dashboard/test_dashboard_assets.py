"""The page's files ship inside the package, with no inline script or style and no CDN."""

from __future__ import annotations

import re
from importlib.resources import files

from skyproxy.dashboard import assets

STATIC = files("skyproxy.dashboard").joinpath("static")


def test_every_served_file_is_installed_with_the_package() -> None:
    for name, _ in assets.FILES.values():
        assert STATIC.joinpath(*name.split("/")).is_file(), name
    assert STATIC.joinpath("index.html").is_file()
    for name in ("uPlot.LICENSE", "README.md"):
        assert STATIC.joinpath("vendor", name).is_file(), name


def test_the_vendored_chart_library_is_the_version_its_readme_names() -> None:
    readme = STATIC.joinpath("vendor", "README.md").read_text()
    version = re.search(r"uPlot (\d+\.\d+\.\d+)", readme)
    assert version is not None
    head = STATIC.joinpath("vendor", "uPlot.iife.min.js").read_text()[:200]
    assert f"(v{version.group(1)})" in head
    assert "MIT License" in STATIC.joinpath("vendor", "uPlot.LICENSE").read_text()


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() -> None:
    page = assets.page("token-x").decode()
    assert '<meta name="skyproxy-csrf" content="token-x">' in page
    assert "{{csrf}}" not in page
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "an inline <script>"
    assert "<style" not in page and not re.search(r"\sstyle\s*=", page)
    assert not re.search(r"\son[a-z]+\s*=", page), "an inline event handler"
    for url in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert url.startswith("/-/static/"), url
        assert url[len("/-/") :] in assets.FILES, url
    script = assets.read("app.js").decode()
    assert "innerHTML" not in script and "eval(" not in script
    assert "http://" not in script and "https://" not in script
