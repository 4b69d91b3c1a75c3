"""`skyproxy token` and `skyproxy budget show` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import VENV_BIN, write_config

from skyproxy.audit.record import AuditRecord

SKYPROXY = str(VENV_BIN / "skyproxy")
TOKEN = re.compile(r"skp_[A-Za-z0-9_-]{43,}")
CONFIG = """
[environments.dev]
listen = ["127.0.0.1:0"]
upstream = "mock"
client_auth = "required"

[environments.staging]
listen = ["127.0.0.1:0"]
upstream = "mock"

[tokens]
file = "state/tokens.json"

[[budgets]]
name = "daily"
per = "user"
usd = 2.0
period = "day"
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYPROXY, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ))


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path, CONFIG)


def test_create_prints_the_token_alone_and_a_note_on_stderr(config_path: Path) -> None:
    result = run("token", "create", "billing", "--env", "dev", "--env", "staging", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    assert TOKEN.fullmatch(result.stdout.removesuffix("\n")), "stdout is the token and one newline"
    token = result.stdout.strip()
    assert "will not be shown again" in result.stderr
    assert 'environment staging has client_auth = "off"' in result.stderr
    assert token not in result.stderr
    stored = (config_path.parent / "state/tokens.json").read_text()
    assert token not in stored and token[4:] not in stored


def test_list_shows_fingerprints_never_tokens(config_path: Path) -> None:
    tokens = [
        run("token", "create", name, "--env", "dev", *extra, "-c", str(config_path)).stdout.strip()
        for name, extra in (
            ("a", ["--user", "alice"]),
            ("b", ["--trust-user-header"]),
            ("c", ["--expires", "7"]),
        )
    ]
    table = run("token", "list", "-c", str(config_path))
    listed = run("token", "list", "--json", "-c", str(config_path))
    for output in (table.stdout, listed.stdout):
        for token in tokens:
            assert token not in output and token[4:16] not in output
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", r["fingerprint"]) for r in rows)
    assert "sha256" not in listed.stdout
    assert (rows[0]["user"], rows[1]["trustUserHeader"], rows[2]["expires"] is not None) == (
        "alice",
        True,
        True,
    )
    assert "user alice" in table.stdout and "user header" in table.stdout and "token name" in table.stdout
    for r in rows:
        assert r["fingerprint"] in table.stdout


def test_revoke_and_its_errors(config_path: Path) -> None:
    assert run("token", "create", "app", "--env", "dev", "-c", str(config_path)).returncode == 0
    revoked = run("token", "revoke", "app", "-c", str(config_path))
    assert revoked.returncode == 0 and "revoked token app" in revoked.stdout
    again = run("token", "revoke", "app", "-c", str(config_path))
    assert again.returncode == 1 and "no token named 'app'" in again.stderr
    unknown_env = run("token", "create", "x", "--env", "nowhere", "-c", str(config_path))
    assert unknown_env.returncode == 1 and "no environment named 'nowhere'" in unknown_env.stderr
    both = run(
        "token", "create", "x", "--env", "dev", "--user", "a", "--trust-user-header", "-c", str(config_path)
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
    no_env = run("token", "create", "x", "-c", str(config_path))
    assert no_env.returncode == 2
    assert run("token", "list", "--json", "-c", str(config_path)).stdout.strip() == "[]"


def test_budget_show_from_the_audit_files(config_path: Path) -> None:
    audit = config_path.parent / "audit/audit.jsonl"
    audit.parent.mkdir()
    now = datetime.now(timezone.utc).timestamp()
    lines = [
        ("alice", "created", "p1", 0.5),
        ("alice", "succeeded", "p1", 0.25),
        ("bob", "created", "p2", 1.5),
    ]
    audit.write_text(
        "".join(
            AuditRecord(
                timestamp=now, environment="dev", userId=user, predictionId=pid, model="m", status=status,
                httpStatus=200, latencyMs=1.0, costUsd=cost, ipAddress=None, requestId="r",
                keyFingerprint=None, method="POST", path="/v1/predictions",
            ).to_line()
            for user, status, pid, cost in lines
        )
    )  # fmt: skip
    shown = run("budget", "show", "--json", "-c", str(config_path))
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["source"].startswith("audit files")
    by_subject = {row["subject"]: row for row in report["budgets"]}
    assert by_subject["alice"]["spent_usd"] == 0.25 and by_subject["bob"]["spent_usd"] == 1.5
    assert {row["limit_usd"] for row in report["budgets"]} == {2.0}
    assert {row["reserved_usd"] for row in report["budgets"]} == {0.0}
    assert all(row["resets_at"].endswith("T00:00:00Z") for row in report["budgets"])
    table = run("budget", "show", "-c", str(config_path))
    assert re.search(r"daily\s+user\s+bob\s+1\.5000\s+0\.0000\s+2\.00\s+\d{4}-", table.stdout), table.stdout


def test_budget_show_without_budgets_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:0"]\nupstream = "mock"\n')
    shown = run("budget", "show", "-c", str(path))
    assert shown.returncode == 0 and "nothing is ever refused" in shown.stderr


def test_check_warns_about_an_exposed_environment_without_client_auth(tmp_path: Path) -> None:
    body = (
        '[server]\nallowed_networks = ["10.0.0.0/8"]\n'
        '[environments.open]\nlisten = ["0.0.0.0:0"]\nupstream = "mock"\n'
        '[environments.closed]\nlisten = ["0.0.0.0:0"]\nupstream = "mock"\nclient_auth = "required"\n'
        '[environments.local]\nlisten = ["127.0.0.1:0"]\nupstream = "mock"\n'
    )
    path = write_config(tmp_path, body)
    checked = run("check", "-c", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    warnings = [line for line in checked.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "open listens on 0.0.0.0:0" in warnings[0]
    assert 'client_auth = "off"' in warnings[0]
    assert "tokens: 0 in" in checked.stdout
    (tmp_path / "tokens.json").write_text("{broken")
    broken = run("check", "-c", str(path))
    assert broken.returncode == 1 and "tokens file" in broken.stdout and "not JSON" in broken.stdout
