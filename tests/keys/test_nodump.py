"""The daemon's memory is its own: another process of its user cannot read the keys in it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import CANARY, free_port, write_config
from helpers.daemon import Spawn, status_of

from skyproxy.keys import nodump

SYSTEM_PYTHON = "/usr/bin/python3"
# Runs nodump.py alone, as it is the only import: a holder of the canary in its
# environment, as a daemon started with key = "env:..." holds its key.
HOLDER = """
import sys, time
import nodump
if sys.argv[1] == "protect":
    assert nodump.forbid_dumps() is None
    assert nodump.dumpable() is False
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def as_nobody() -> Iterator[Path]:
    """A folder that `nobody` can read, holding a copy of nodump.py."""
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with Debian's python3 (see .ci/run)")
        pytest.skip("needs root and /usr/bin/python3, to run a process as another user")
    folder = Path(tempfile.mkdtemp(prefix="skyproxy-nodump-"))
    os.chmod(folder, 0o755)
    shutil.copy(nodump.__file__, folder / "nodump.py")
    os.chmod(folder / "nodump.py", 0o644)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def environ_read_by_same_user(folder: Path, mode: str) -> subprocess.CompletedProcess[bytes]:
    """Starts a holder as `nobody`, and reads its /proc environ as another `nobody` process."""
    user = pwd.getpwnam("nobody")
    holder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", HOLDER, mode],
        cwd=folder,
        env={"PYTHONPATH": str(folder), "SKYPROXY_KEY": CANARY},
        stdout=subprocess.PIPE,
        user=user.pw_uid,
        group=user.pw_gid,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        return subprocess.run(
            ["cat", f"/proc/{holder.pid}/environ"], capture_output=True, user=user.pw_uid, group=user.pw_gid
        )
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_another_process_of_the_same_user_cannot_read_a_protected_process(as_nobody: Path) -> None:
    exposed = environ_read_by_same_user(as_nobody, "plain")
    assert CANARY.encode() in exposed.stdout  # the threat is real: a dumpable process is open
    protected = environ_read_by_same_user(as_nobody, "protect")
    assert protected.returncode != 0
    assert b"Permission denied" in protected.stderr
    assert CANARY.encode() not in protected.stdout


async def test_the_daemon_makes_itself_non_dumpable_before_reading_keys(tmp_path: Path, spawn: Spawn) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        f"""
[environments.dev]
listen = ["127.0.0.1:{port}"]
key = "env:SKYPROXY_TEST_KEY"
""",
    )
    daemon = spawn(config, port)
    async with aiohttp.ClientSession() as session:
        status = await status_of(session, daemon)
    assert status["dumpable"] is False
    assert nodump.dumpable() is True  # this test's own process: the daemon did it, not the suite
