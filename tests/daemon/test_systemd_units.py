"""The shipped units, checked by systemd's own tools.

`systemd-analyze verify` refuses a unit whose ExecStart binary is missing,
and /usr/local/bin/skyproxy (or ~/.local/bin/skyproxy) is not installed where
the tests run. So verify reads a copy in which only the ExecStart program is
replaced by this interpreter running `-m skyproxy` (a real executable, and a
real way to start the daemon); the test checks that every other line of the
copy is the shipped one. --root was the other option, but it would need a
fake binary planted in a fake tree, which proves less.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SYSTEM_UNIT = UNITS / "skyproxy.service"
USER_UNIT = UNITS / "skyproxy-user.service"
SYSTEM_EXEC = "/usr/local/bin/skyproxy"
USER_EXEC = "%h/.local/bin/skyproxy"
MAX_EXPOSURE = 1.5
DAEMON_SHUTDOWN_TIMEOUT = 30.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (apt-get install systemd); CI installs it",
)


@dataclass(frozen=True)
class Unit:
    """Assignments per section, in order, repeated keys kept; comments apart."""

    settings: dict[str, list[tuple[str, str]]]
    comments: list[str]

    @classmethod
    def parse(cls, path: Path) -> Unit:
        settings: dict[str, list[tuple[str, str]]] = {}
        comments: list[str] = []
        section = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith(("#", ";")):
                comments.append(line.lstrip("#; "))
            elif line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                settings.setdefault(section, [])
            else:
                assert not line.endswith("\\"), f"continuation lines not expected: {raw}"
                key, sep, value = line.partition("=")
                assert sep, f"not an assignment: {raw}"
                settings.setdefault(section, []).append((key.strip(), value.strip()))
        return cls(settings, comments)

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.settings.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str:
        values = self.values(section, key)
        assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
        return values[0]


def seconds(timespan: str) -> float:
    """A systemd time span such as 45s, 1min 30s or a bare 45 (seconds)."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


def analyze(
    *args: str, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    env.update(extra_env or {})
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def runnable_copy(unit: Path, exec_path: str, dest: Path) -> Path:
    """Copy ``unit`` to ``dest`` with only its ExecStart program made to exist."""
    replacement = f"{sys.executable} -m skyproxy"
    original = unit.read_text(encoding="utf-8").splitlines(keepends=True)
    copied = [line.replace(f"ExecStart={exec_path} ", f"ExecStart={replacement} ") for line in original]
    changed = [i for i, (a, b) in enumerate(zip(original, copied, strict=True)) if a != b]
    assert len(changed) == 1, f"expected exactly one ExecStart={exec_path} line, changed {changed}"
    assert original[changed[0]].startswith("ExecStart=")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / unit.name
    target.write_text("".join(copied), encoding="utf-8")
    return target


def verify(unit: Path, *, user: bool, cwd: Path) -> None:
    """Run verify and fail on a non-zero exit or any complaint about ``unit``.

    verify exits 0 for unknown keys and unparsable values (it ignores them, as
    PID 1 would), so its stderr has to be read too. Lines about other units on
    the host (a distribution's own oddities) are not ours to fail on.
    """
    extra_env = {}
    args = ["verify", "--man=no", str(unit)]
    if user:
        # A user manager, even verify's offline one, wants a runtime directory.
        runtime = cwd / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        extra_env["XDG_RUNTIME_DIR"] = str(runtime)
        args.insert(0, "--user")
    result = analyze(*args, cwd=cwd, extra_env=extra_env)
    stem = unit.name.removesuffix(".service")
    ours = [line for line in result.stderr.splitlines() if stem in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], "\n".join(ours)


def exposure(unit: Path, cwd: Path) -> float:
    result = analyze("security", "--offline=true", "--no-pager", str(unit), cwd=cwd)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout
    return float(match[1])


# --- what the units must say -------------------------------------------------


def test_system_unit_contents() -> None:
    unit = Unit.parse(SYSTEM_UNIT)
    assert unit.value("Service", "Type") == "notify"
    assert unit.value("Service", "ExecStart") == (f"{SYSTEM_EXEC} serve -c /etc/skyproxy/skyproxy.toml")
    assert unit.value("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit.value("Service", "DynamicUser") == "yes"
    assert unit.value("Service", "ConfigurationDirectory") == "skyproxy"
    assert unit.value("Service", "StateDirectory") == "skyproxy"
    assert unit.value("Service", "LogsDirectory") == "skyproxy"
    assert unit.value("Service", "Restart") == "on-failure"
    assert seconds(unit.value("Service", "WatchdogSec")) > 0
    assert seconds(unit.value("Service", "TimeoutStopSec")) > DAEMON_SHUTDOWN_TIMEOUT
    assert unit.value("Service", "UMask") == "0077"
    assert unit.value("Install", "WantedBy") == "multi-user.target"


def test_system_unit_credential_examples() -> None:
    # Kept as comments: a listed credential whose file is missing stops the
    # unit from starting, and each site has its own environments.
    comments = Unit.parse(SYSTEM_UNIT).comments
    assert "LoadCredentialEncrypted=production:/etc/credstore.encrypted/skyproxy-production" in (comments)
    assert any(c.startswith("LoadCredential=") for c in comments)


def test_system_unit_reaches_the_network_and_the_notify_socket() -> None:
    unit = Unit.parse(SYSTEM_UNIT)
    families = " ".join(unit.values("Service", "RestrictAddressFamilies")).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert unit.values("Service", "PrivateNetwork") in ([], ["no"])
    assert unit.values("Service", "IPAddressDeny") == []


def test_user_unit_contents() -> None:
    unit = Unit.parse(USER_UNIT)
    assert unit.value("Service", "Type") == "notify"
    assert unit.value("Service", "ExecStart") == (f"{USER_EXEC} serve -c %h/.config/skyproxy/skyproxy.toml")
    assert unit.value("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit.value("Service", "Restart") == "on-failure"
    assert seconds(unit.value("Service", "TimeoutStopSec")) > DAEMON_SHUTDOWN_TIMEOUT
    assert unit.value("Install", "WantedBy") == "default.target"


def test_user_unit_keeps_the_keyring_reachable() -> None:
    # The Secret Service is on the session bus, an AF_UNIX socket under
    # $XDG_RUNTIME_DIR, and the config and audit files are in $HOME; a user
    # manager's mount namespacing needs unprivileged user namespaces.
    unit = Unit.parse(USER_UNIT)
    families = " ".join(unit.values("Service", "RestrictAddressFamilies")).split()
    assert "AF_UNIX" in families
    for key in ("ProtectHome", "ProtectSystem", "PrivateUsers", "PrivateTmp", "DynamicUser"):
        assert unit.values("Service", key) == [], f"{key}= in the user unit"
    assert unit.value("Service", "NoNewPrivileges") == "yes"
    assert unit.value("Service", "MemoryDenyWriteExecute") == "yes"


# --- what systemd makes of them ----------------------------------------------


@needs_systemd_analyze
def test_verify_system_unit(tmp_path: Path) -> None:
    verify(runnable_copy(SYSTEM_UNIT, SYSTEM_EXEC, tmp_path), user=False, cwd=tmp_path)


@needs_systemd_analyze
def test_verify_user_unit(tmp_path: Path) -> None:
    verify(runnable_copy(USER_UNIT, USER_EXEC, tmp_path), user=True, cwd=tmp_path)


@needs_systemd_analyze
def test_verify_credential_examples(tmp_path: Path) -> None:
    # The commented examples are what operators paste into a drop-in, so they
    # are verified as one: verify reads NAME.service.d/ beside the unit.
    unit = runnable_copy(SYSTEM_UNIT, SYSTEM_EXEC, tmp_path)
    examples = [
        c
        for c in Unit.parse(SYSTEM_UNIT).comments
        if c.startswith(("LoadCredential=", "LoadCredentialEncrypted="))
    ]
    assert len(examples) >= 2
    dropin = tmp_path / "skyproxy.service.d" / "credentials.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\n" + "\n".join(examples) + "\n", encoding="utf-8")
    verify(unit, user=False, cwd=tmp_path)


@needs_systemd_analyze
@pytest.mark.parametrize(
    "bad",
    ["ProtectSystem=bogus", "FooBar=1", "LoadCredential=a/b:/etc/x"],
)
def test_verify_reports_what_it_ignores(tmp_path: Path, bad: str) -> None:
    # Guards the guard: these make verify print a warning yet exit 0.
    unit = runnable_copy(SYSTEM_UNIT, SYSTEM_EXEC, tmp_path)
    dropin = tmp_path / "skyproxy.service.d" / "bad.conf"
    dropin.parent.mkdir()
    dropin.write_text(f"[Service]\n{bad}\n", encoding="utf-8")
    with pytest.raises(AssertionError):
        verify(unit, user=False, cwd=tmp_path)


@needs_systemd_analyze
def test_system_unit_exposure(tmp_path: Path) -> None:
    score = exposure(SYSTEM_UNIT, tmp_path)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"


@needs_systemd_analyze
def test_exposure_parser_sees_an_unhardened_unit(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n", encoding="utf-8")
    assert exposure(bare, tmp_path) > 9.0


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT])
def test_units_raise_the_open_file_limit(path: Path) -> None:
    # 1024, a common default, holds about 480 proxied connections once halved.
    assert int(Unit.parse(path).value("Service", "LimitNOFILE")) >= 65536
