"""Import structure: every module imports on its own, and leaves stay leaves.

Each check runs in a fresh interpreter, so one module's import cannot hide another's
cycle, and sys.modules shows exactly what an import pulled in.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import skyproxy

MODULES = sorted(
    f"skyproxy.{info.name}" for info in pkgutil.iter_modules(skyproxy.__path__) if info.name != "__main__"
)
# Modules the hot path and the CLI build on; they must never reach back into the server.
LEAVES = ("keys", "limits", "audit", "metrics", "guard", "config", "errors", "client")
UPPER = ("skyproxy.handler", "skyproxy.app", "skyproxy.server")

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def _imported_by(module: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"
    assert result.stderr == "", f"import {module} printed:\n{result.stderr}"
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.fixture(scope="module")
def imported() -> dict[str, list[str]]:
    """What each module pulls in, imported alone in a fresh interpreter (in parallel)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(MODULES, pool.map(_imported_by, MODULES), strict=True))


def test_the_package_is_found() -> None:
    assert len(MODULES) >= 20
    for name in ("skyproxy.server", "skyproxy.cli", *(f"skyproxy.{leaf}" for leaf in LEAVES)):
        assert name in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str, imported: dict[str, list[str]]) -> None:
    assert module in imported[module]


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_never_import_the_server(leaf: str, imported: dict[str, list[str]]) -> None:
    loaded = set(imported[f"skyproxy.{leaf}"])
    assert loaded.isdisjoint(UPPER), sorted(loaded & set(UPPER))
    assert "skyproxy.runtime" not in loaded
    assert "skyproxy.reload" not in loaded


@pytest.mark.parametrize("leaf", ["errors", "config", "keys", "guard", "audit", "limits", "metrics"])
def test_leaf_modules_do_not_load_aiohttp(leaf: str, imported: dict[str, list[str]]) -> None:
    assert "aiohttp" not in imported[f"skyproxy.{leaf}"]


def test_cli_defers_heavy_imports(imported: dict[str, list[str]]) -> None:
    # `skyproxy --version` and `--help` must not pay for aiohttp or the server.
    loaded = set(imported["skyproxy.cli"])
    assert "aiohttp" not in loaded
    assert loaded.isdisjoint(UPPER)
    assert "skyproxy.config" not in loaded


def test_errors_imports_nothing_of_skyproxy(imported: dict[str, list[str]]) -> None:
    assert [m for m in imported["skyproxy.errors"] if m.startswith("skyproxy.")] == ["skyproxy.errors"]


def test_main_module_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "skyproxy", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("skyproxy ")
