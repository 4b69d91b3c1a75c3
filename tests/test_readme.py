"""The README's quick start and app example, as a newcomer copies them, against what runs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from helpers import CANARY, assert_no_canary, env_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def two_commands() -> tuple[str, str]:
    """The "Two commands" section's commands: set up and run, then the tests."""
    text = README.read_text()
    assert "\n## Two commands\n" in text
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]
    assert len(blocks) >= 2, "the section shows its two commands as sh blocks"
    return blocks[0], blocks[1]


def test_the_first_command_installs_the_runtime_only() -> None:
    first, _ = two_commands()
    assert "pip install -e ." in first and "skyproxy serve" in first
    assert "[dev]" not in first, "someone who only runs the proxy needs no test tools"
    assert not re.search(r"pytest|ruff|mypy", first)


def test_ci_runs_the_test_command_verbatim_and_it_sets_up_its_tools() -> None:
    _, tests = two_commands()
    assert "\n" not in tests, "one line, as CI runs it"
    assert "'.[dev]'" in tests and "-m pytest" in tests
    commands = [line for line in CI.read_text().splitlines() if not line.startswith("#")]
    # In a subshell: under set -e a failed install would otherwise not stop CI.
    assert f"( {tests} )" in commands, f".ci/run does not run the README's test command: {tests}"
    # Only that command installs the dev tools, so CI fails if the README's stops doing so.
    assert [line for line in commands if "[dev]" in line] == [f"( {tests} )"]


def section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text, f"the README has a section {title!r}"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


async def test_the_readmes_sdk_example_runs_through_the_proxy(mock_upstream, start_proxy, canary_env):
    """The example as written, but for the port: a placeholder key, the user header, a result."""
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    text = section("Pointing an app at it")
    for needed in ("`x-api-key`", "`Authorization`", "placeholder", "token"):
        assert needed in text
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1 and "http://127.0.0.1:8787/v1" in blocks[0]
    program = blocks[0].replace("http://127.0.0.1:8787", proxy.url)
    ran = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() not in ("", "None"), "the finished prediction's output is printed"
    creates = [seen for seen in state.seen if seen.method == "POST"]
    assert creates, "the SDK's request reached the upstream"
    keys = [{k.lower(): v for k, v in seen.headers.items()}.get("x-api-key") for seen in creates]
    assert keys == [CANARY] * len(creates), "the environment's key, never the app's placeholder"
    assert_no_canary(ran.stdout, ran.stderr)


def test_the_init_commands_use_only_flags_init_has() -> None:
    """Every `skyproxy init` line in the README runs as written: no flag init does not know."""
    text = section("Now with your real key")
    lines = [line for line in re.findall(r"```sh\n(.*?)```", text, re.S)[0].splitlines() if " init" in line]
    assert lines, "the section shows the init command"
    usage = subprocess.run(
        [str(Path(sys.executable).parent / "skyproxy"), "init", "-h"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for line in lines:
        command = line.split("#", 1)[0].split("<", 1)[0]
        for flag in re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", command):
            assert flag in usage, f"the README's {line.strip()!r} uses {flag}, which init does not take"
    for flag in ("--environments", "--upstream", "--key-source", "--keys-dir", "--port", "--systemd-user"):
        assert flag in text and flag in usage
