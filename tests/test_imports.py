"""Import structure: every module imports on its own, and the arrows point one way.

config -> daemon (wiring) -> proxy (the handler) -> http1 (the upstream), with keys,
audit, limits, guard and metrics as leaves that never reach back up. Each check runs in
a fresh interpreter, so one module's import cannot hide another's cycle, and
sys.modules shows exactly what an import pulled in.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import skyproxy

PACKAGE = Path(skyproxy.__file__).parent
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(skyproxy.__path__, prefix="skyproxy.")
    if not info.name.endswith("__main__")
)
# The wiring and the handler: nothing below them may import them.
UPPER_PREFIXES = ("skyproxy.daemon", "skyproxy.cli", "skyproxy.proxy.handler", "skyproxy.proxy.dispatch")
UPPER_MODULES = (
    "skyproxy.proxy.forward",
    "skyproxy.proxy.runtime",
    "skyproxy.ops.admin",
)
# Leaves: whole packages and single modules the hot path and the CLI build on.
LEAF_PREFIXES = (
    "skyproxy.keys",
    "skyproxy.audit",
    "skyproxy.http1",
    "skyproxy.config",
    "skyproxy.errors",
    "skyproxy.tokens",
    "skyproxy.budgets",
    "skyproxy.cluster",
    "skyproxy.webhooks",
    "skyproxy.dashboard",
)
LEAF_MODULES = (
    "skyproxy.ops.metrics",
    "skyproxy.proxy.guard",
    "skyproxy.proxy.limits",
    "skyproxy.proxy.inflight",
    "skyproxy.proxy.leaky",
    "skyproxy.proxy.shared_limits",
    "skyproxy.codings",
)
LEAVES = sorted(m for m in MODULES if m.startswith(LEAF_PREFIXES) or m in LEAF_MODULES)

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


def _ours(loaded: list[str]) -> set[str]:
    return {m for m in loaded if m.startswith("skyproxy.")}


@pytest.fixture(scope="module")
def imported() -> dict[str, list[str]]:
    """What each module pulls in, imported alone in a fresh interpreter (in parallel)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(MODULES, pool.map(_imported_by, MODULES), strict=True))


def test_the_package_is_found() -> None:
    for folder in ("cli", "daemon", "proxy", "http1", "keys", "audit", "ops", "mock", "webhooks"):
        assert f"skyproxy.{folder}" in MODULES
    assert len(LEAVES) >= 12
    assert "skyproxy.proxy.handler" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str, imported: dict[str, list[str]]) -> None:
    assert module in imported[module]


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_never_import_the_proxy_or_the_daemon(leaf: str, imported: dict[str, list[str]]) -> None:
    reached = _ours(imported[leaf])
    upper = {m for m in reached if m.startswith(UPPER_PREFIXES) or m in UPPER_MODULES}
    assert not upper, sorted(upper)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("skyproxy.http1")])
def test_http1_imports_nothing_of_skyproxy(module: str, imported: dict[str, list[str]]) -> None:
    outside = {m for m in _ours(imported[module]) if not m.startswith("skyproxy.http1")}
    assert not outside, sorted(outside)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("skyproxy.config")])
def test_config_imports_nothing_but_errors(module: str, imported: dict[str, list[str]]) -> None:
    outside = {m for m in _ours(imported[module]) if not m.startswith(("skyproxy.config", "skyproxy.errors"))}
    assert not outside, sorted(outside)


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("skyproxy.daemon")])
def test_nothing_but_the_daemon_and_cli_imports_the_daemon(
    module: str, imported: dict[str, list[str]]
) -> None:
    if module.startswith("skyproxy.cli"):
        return
    assert not {m for m in _ours(imported[module]) if m.startswith("skyproxy.daemon")}


@pytest.mark.parametrize(
    "leaf",
    [
        "skyproxy.errors",
        "skyproxy.config",
        "skyproxy.keys.sources",
        "skyproxy.proxy.guard",
        "skyproxy.audit.writer",
        "skyproxy.proxy.limits",
        "skyproxy.ops.metrics",
        "skyproxy.tokens.registry",
        "skyproxy.budgets.enforce",
        "skyproxy.proxy.inflight",
        "skyproxy.codings",
        "skyproxy.cluster.node",
    ],
)
def test_leaves_do_not_load_aiohttp(leaf: str, imported: dict[str, list[str]]) -> None:
    assert "aiohttp" not in imported[leaf]


def test_cli_defers_heavy_imports(imported: dict[str, list[str]]) -> None:
    # `skyproxy --version` and `--help` must not pay for aiohttp or the daemon.
    loaded = set(imported["skyproxy.cli.main"])
    assert "aiohttp" not in loaded
    assert not {m for m in loaded if m.startswith(("skyproxy.daemon", "skyproxy.proxy", "skyproxy.config"))}


def test_errors_imports_nothing_of_skyproxy(imported: dict[str, list[str]]) -> None:
    assert _ours(imported["skyproxy.errors"]) == {"skyproxy.errors"}


def _prints_or_exits(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name in ("print", "exit", "_exit"):
                found.append(f"line {node.lineno}: {name}()")
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                found.append(f"line {node.lineno}: raise SystemExit")
    return sorted(found)


def test_only_the_cli_prints_or_exits() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli" or relative.name == "__main__.py":
            continue
        found = _prints_or_exits(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[str(relative)] = found
    assert offenders == {}


def test_the_print_check_can_fail() -> None:
    assert _prints_or_exits(ast.parse("import sys\nprint('x')\nsys.exit(2)\nraise SystemExit(1)\n")) == [
        "line 2: print()",
        "line 3: exit()",
        "line 4: raise SystemExit",
    ]


def test_main_module_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "skyproxy", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("skyproxy ")


def test_test_module_names_are_unique_across_folders() -> None:
    # pytest imports test modules by basename from pythonpath roots: two test_x.py in
    # different folders collide at collection, which a merge can bring in unnoticed.
    tests = Path(__file__).resolve().parent
    names = [path.name for path in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
