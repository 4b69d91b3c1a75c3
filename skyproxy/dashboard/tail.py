"""Follows the audit file: each call returns the whole lines appended since the last one.

The open descriptor is kept across calls, so a rotation (the file renamed, a new one
created) loses nothing: the renamed file is read to its end before the new one is
opened, and if the file rotated more than once since the last call, the rotated files
in between are read whole too. Blocking: call it from a thread.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from skyproxy.audit.summary import audit_files

READ_LIMIT = 8 * 1024 * 1024  # bytes per call: a huge backlog is taken in several calls


class AuditTail:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._partial = b""  # the start of a line whose end is not written yet

    def read(self, start_at_end: bool = False) -> list[bytes]:
        """The whole lines appended since the last call; `start_at_end` skips what is there now."""
        lines: list[bytes] = []
        if self._fd is None and not self._open(start_at_end):
            return lines
        budget = READ_LIMIT
        while budget > 0:
            chunk = self._read_some(budget)
            if chunk:
                budget -= len(chunk)
                lines.extend(self._split(chunk))
                continue
            if not self._rotated():
                break
            finished = self._ino
            self.close()  # the old file is read to its end: go on with the new one
            for path in self._rotated_since(finished):
                lines.extend(line.rstrip(b"\n") for line in file_lines(path))
            if not self._open(False):
                break
        return lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._ino = None
        self._partial = b""

    def _open(self, at_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        if at_end:
            os.lseek(fd, st.st_size, os.SEEK_SET)
        return True

    def _read_some(self, budget: int) -> bytes:
        assert self._fd is not None
        try:
            return os.read(self._fd, min(budget, 1024 * 1024))
        except OSError:
            return b""

    def _rotated(self) -> bool:
        """True when the path now names another file (or none): ours was renamed away."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # not there yet: keep reading the old one until it is
        if (st.st_dev, st.st_ino) != self._ino:
            return True
        # Truncated in place (logrotate's copytruncate): start again from the top.
        assert self._fd is not None
        if st.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._partial = b""
        return False

    def _rotated_since(self, finished: tuple[int, int] | None) -> list[Path]:
        """The rotated files newer than the one just finished, oldest first."""
        current = os.path.abspath(self.path)
        rotated = [p for p in audit_files(self.path) if os.path.abspath(p) != current]
        for i, path in enumerate(rotated):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == finished:
                return rotated[i + 1 :]
        return []  # compressed or removed since: what came after it can't be placed

    def _split(self, chunk: bytes) -> list[bytes]:
        # BytesIO finds each b"\n" with memchr; bytes.split and splitlines test every byte.
        found = io.BytesIO(self._partial + chunk).readlines()
        self._partial = found.pop() if found and not found[-1].endswith(b"\n") else b""
        return [line[:-1] for line in found]


def file_lines(path: Path) -> Iterator[bytes]:
    """A rotated file's lines (gzipped or not); a damaged gzip gives what it could."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            yield from stream
    except (OSError, EOFError, zlib.error):  # gone, unreadable, or a damaged gzip (BadGzipFile)
        return
