"""The audit file on disk: private modes, whole-line appends, and rotation.

Rotation reuses the standard library's handlers, through their public API only, for
renaming and pruning old files: `shouldRollover` (daily) and `doRollover`. The handlers
are built with `delay=True` and never emit, so they never open the file themselves;
`AuditFile` opens it, with mode 0600 from the start. It decides when to roll over by
size itself, splitting a batch at the limit so no file grows past `max_bytes`.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from pathlib import Path

from skyproxy.config import AuditSettings

# Lines per write(2) unless there is a backlog.
CHUNK_LINES = 8192

_ANY_RECORD = logging.makeLogRecord({})


class _DailyRotating(logging.handlers.TimedRotatingFileHandler):
    def rotation_filename(self, default_name: str) -> str:
        # doRollover deletes an existing file of the target name (possible after a
        # clock step or a restart); an audit trail keeps both instead.
        name, n = default_name, 0
        while os.path.exists(name):
            n += 1
            name = f"{default_name}.{n}"
        return name


class AuditFile:
    """The audit file and its rotation, used only by the writer thread."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self.path = os.path.abspath(settings.path)
        self.handler: _DailyRotating | logging.handlers.RotatingFileHandler
        self.max_bytes = 0  # 0: never by size
        self._fd: int | None = None
        self._size = 0  # of the open file, kept here to save an fstat per batch
        if settings.rotate_daily:
            self.handler = _DailyRotating(
                self.path,
                when="midnight",
                utc=True,
                backupCount=settings.backup_count,
                encoding="utf-8",
                delay=True,
            )
        else:
            self.handler = logging.handlers.RotatingFileHandler(
                self.path,
                maxBytes=settings.max_bytes,
                backupCount=settings.backup_count,
                encoding="utf-8",
                delay=True,
            )
            # As in the standard library, no backups means no rollover by size.
            self.max_bytes = settings.max_bytes if settings.backup_count else 0

    def write(self, lines: list[bytes]) -> None:
        """Append `lines`, removing each chunk from the list once it is on disk.

        With an empty list this only makes sure the file is open. On an OSError the
        lines not yet written are left in the list for the retry.
        """
        if not lines and not self.settings.enabled:
            return  # a disabled audit creates no file (stray lines are still written)
        if self.settings.rotate_daily and self.handler.shouldRollover(_ANY_RECORD):
            self._rollover()
        fd = self._open() if self._fd is None else self._fd
        while lines:
            # A backlog means the GIL was hard to get: drain it in a few big writes,
            # as every write(2) means taking the GIL back once more.
            count = min(len(lines), max(CHUNK_LINES, len(lines) // 4))
            data = b"".join(lines[:count])
            if self.max_bytes and self._size + len(data) > self.max_bytes:
                count = self._fitting(lines, count)
                if not count:  # the next line would overflow this file: start another
                    self._rollover()
                    fd = self._open()
                    continue
                data = b"".join(lines[:count])
            written, error = _append(fd, data)
            if error is not None:
                self._keep_whole_lines(fd, lines, written)
                raise error
            self._size += len(data)
            del lines[:count]

    def _keep_whole_lines(self, fd: int, lines: list[bytes], written: int) -> None:
        """After a short write, keep the lines it wrote whole and cut the rest of it off.

        Those lines leave the list: a disk with less room than the backlog still takes
        what fits, and the retry goes on from the first line not on disk.
        """
        whole = kept = 0
        while whole < len(lines) and kept + len(lines[whole]) <= written:
            kept += len(lines[whole])
            whole += 1
        part = written - kept
        if part and not _cut(fd, part):
            # The file can't be shortened (an append-only file, say): finish the line
            # on the retry instead, so it still ends up whole.
            lines[whole] = lines[whole][part:]
            kept = written
        self._size += kept
        del lines[:whole]

    def _fitting(self, lines: list[bytes], limit: int) -> int:
        """How many of the first `limit` lines fit in the current file."""
        room, used = self.max_bytes - self._size, 0
        for count, line in enumerate(lines[:limit]):
            used += len(line)
            if used > room:
                # A line longer than max_bytes still gets written, alone in a file.
                return count or (0 if self._size else 1)
        return limit

    def _open(self) -> int:
        self._fd = open_private(self.path)
        self._size = os.fstat(self._fd).st_size
        return self._fd

    def _rollover(self) -> None:
        self.close_file()
        self.handler.doRollover()

    def close_file(self) -> None:
        """Close the descriptor; the next write opens the file at its path again."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self.close_file()
        self.handler.close()


def open_private(filename: str) -> int:
    """Open for appending with mode 0600, creating missing folders with 0700."""
    missing: list[Path] = []
    folder = Path(filename).parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        # os.makedirs gives intermediate folders the umask's mode; mkdir each instead.
        with contextlib.suppress(FileExistsError):
            os.mkdir(each, 0o700)
    # The mode is passed to open(2) rather than fixed by chmod afterwards, so the file
    # is never readable by others, and the process umask is left alone.
    # An existing file keeps its mode: an operator may have widened it on purpose.
    return os.open(filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _append(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of `data`; how much was written, and the error that stopped it if any."""
    view, written = memoryview(data), 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError as exc:
        return written, exc
    return written, None


def _cut(fd: int, part: int) -> bool:
    """Remove the last `part` bytes of the file, a partly written line; False if refused."""
    try:
        size = os.fstat(fd).st_size
        # O_APPEND put our bytes at the end. A smaller file was truncated under us
        # (copytruncate), our bytes went with it, and there is nothing to cut.
        if size >= part:
            os.ftruncate(fd, size - part)
    except OSError:
        return False
    return True
