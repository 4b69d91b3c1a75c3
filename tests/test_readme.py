"""The README's quick start, as a newcomer copies it, against what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

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
