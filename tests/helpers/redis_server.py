"""A real redis-server on a free port in a temporary folder, stopped, paused and restarted at will."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_port


def redis_binary() -> str:
    """The redis-server to run; skips without one, except under CI, where it fails."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs Debian's redis-server")
        pytest.skip("redis-server is not installed")
    return found


class RedisServer:
    """One redis-server process; `restart()` brings it back on the same port."""

    def __init__(self, binary: str, folder: Path, password: str | None = None) -> None:
        self.binary = binary
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.socket = folder / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        # The password goes in a file, never in argv.
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"logfile {folder / 'redis.log'}",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
        ]
        if password:
            lines.append(f"requirepass {password}")
        self.config = folder / "redis.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}?db=0"

    def start(self, deadline_s: float = 10.0) -> None:
        self.process = subprocess.Popen([self.binary, str(self.config)], cwd=self.folder)
        deadline = time.monotonic() + deadline_s
        while not self.answers():
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited {self.process.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server not ready in {deadline_s}s")
            time.sleep(0.02)

    def answers(self) -> bool:
        """Whether the server answers a PING (after AUTH when it has a password)."""
        request = b""
        if self.password:
            request += f"AUTH {self.password}\r\n".encode()
        request += b"PING\r\n"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(request)
                answer = b""
                while b"PONG" not in answer:
                    chunk = conn.recv(1024)
                    if not chunk:
                        return False
                    answer += chunk
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; waits for the port to be released."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
