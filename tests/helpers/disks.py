"""Full disks for real: a small tmpfs where mounting is allowed, and an audit writer in a
child process whose file size is capped with RLIMIT_FSIZE, which works everywhere."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent


def mount_tmpfs(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes on `folder`; the reason why not, if that is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        return f"cannot run mount: {exc}"
    return None if done.returncode == 0 else f"mount -t tmpfs refused: {done.stderr.strip()}"


def resize_tmpfs(folder: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=True, capture_output=True)


def append_only(path: Path, on: bool) -> str | None:
    """Set or clear the append-only attribute (chattr +a); the reason why not, if refused."""
    try:
        done = subprocess.run(
            ["chattr", "+a" if on else "-a", str(path)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        return f"cannot run chattr: {exc}"
    return None if done.returncode == 0 else f"chattr refused: {done.stderr.strip()}"


class CappedWriter:
    """An AuditWriter in a child process (helpers.audit_child), driven one command at a time.

    RLIMIT_FSIZE applies to a whole process, so it is set in a child, never in pytest.
    Every answer is the writer's state: depth, healthy, written, write_failures, dropped.
    """

    def __init__(self, path: Path, stderr: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        with stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "helpers.audit_child", str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )

    def ask(self, command: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"do": command, **args}).encode() + b"\n")
        self.process.stdin.flush()
        # The child answers at once; only a hung or dead child makes this wait.
        ready, _, _ = select.select([self.process.stdout], [], [], 30.0)
        assert ready, f"the audit child did not answer {command!r}"
        line = self.process.stdout.readline()
        assert line, f"the audit child exited ({self.process.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
