"""The audit trail: one JSON line per prediction event, written off the event loop.

`AuditWriter.submit()` serialises and encodes a record on the caller's thread and
puts the line on a bounded queue; it never blocks. One writer thread takes everything
queued as a batch and appends it with one write(2) per CHUNK_LINES lines on an
O_APPEND descriptor, so lines are whole and never interleaved. A disk error never
loses an accepted line: the batch is kept and retried with backoff while `healthy`
is False.

Rotation reuses the standard library's handlers for their renaming and pruning, but
the writer decides when to roll over itself: it splits a batch at the size limit so
no file grows past `max_bytes`, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import logging.handlers
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from io import TextIOWrapper
from json.encoder import encode_basestring
from pathlib import Path

import orjson

from skyproxy.config import AuditSettings

__all__ = ["STATUSES", "AuditRecord", "AuditWriter", "iso_millis"]

log = logging.getLogger("skyproxy.audit")

STATUSES = ("created", "failed", "rejected", "succeeded", "canceled")

CHUNK_LINES = 8192  # lines per write(2) unless there is a backlog; joining them takes ~0.5 ms
LINGER = 0.005  # seconds a busy writer waits for a batch to fill; the most a line waits
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
HAND_OFF = 0.0002  # seconds submit() sleeps to let a GIL-starved writer in
HAND_OFF_EVERY = 0.01
REPORT_INTERVAL = 5.0  # seconds between error reports while the disk keeps failing

_LINE = (
    '{"timestamp":"%s","event":"prediction","environment":%s,"userId":%s,'
    '"predictionId":%s,"model":%s,"status":%s,"httpStatus":%d,"latencyMs":%s,'
    '"costUsd":%s,"ipAddress":%s,"requestId":%s,"keyFingerprint":%s,"method":%s,'
    '"path":%s}\n'
)


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One prediction event. It has no field for keys, prompts or outputs, by design."""

    timestamp: float = field(default_factory=time.time)  # seconds since the epoch
    event: str = field(default="prediction", init=False)
    environment: str
    userId: str | None
    predictionId: str | None
    model: str | None
    status: str  # one of STATUSES
    httpStatus: int
    latencyMs: float | None
    costUsd: float | None
    ipAddress: str | None
    requestId: str | None
    keyFingerprint: str | None
    method: str
    path: str

    def to_bytes(self) -> bytes:
        """The line as UTF-8 bytes, as it goes to disk.

        orjson builds it in one call; a lone surrogate (from undecodable header bytes),
        which orjson refuses, takes the template path and comes out as a \\udcXX escape.
        """
        try:
            return orjson.dumps(
                {
                    "timestamp": iso_millis(self.timestamp),
                    "event": "prediction",
                    "environment": self.environment,
                    "userId": self.userId,
                    "predictionId": self.predictionId,
                    "model": self.model,
                    "status": self.status,
                    "httpStatus": self.httpStatus,
                    "latencyMs": self.latencyMs,
                    "costUsd": self.costUsd,
                    "ipAddress": self.ipAddress,
                    "requestId": self.requestId,
                    "keyFingerprint": self.keyFingerprint,
                    "method": self.method,
                    "path": self.path,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        except orjson.JSONEncodeError:
            return self.to_line().encode("utf-8", "backslashreplace")

    def to_line(self) -> str:
        """Compact JSON, fields in declaration order, ending in a newline.

        Equal to json.dumps(..., ensure_ascii=False, separators=(",", ":")) but built
        from a template with the C string encoder, about three times faster; the
        hot path pays for it on every prediction.
        """
        s = encode_basestring
        return _LINE % (
            iso_millis(self.timestamp),
            s(self.environment),
            "null" if self.userId is None else s(self.userId),
            "null" if self.predictionId is None else s(self.predictionId),
            "null" if self.model is None else s(self.model),
            s(self.status),
            self.httpStatus,
            _number(self.latencyMs),
            _number(self.costUsd),
            "null" if self.ipAddress is None else s(self.ipAddress),
            "null" if self.requestId is None else s(self.requestId),
            "null" if self.keyFingerprint is None else s(self.keyFingerprint),
            s(self.method),
            s(self.path),
        )


def _number(value: float | None) -> str:
    # NaN and infinity have no JSON spelling; null keeps the line parseable.
    if value is None or not math.isfinite(value):
        return "null"
    return repr(value)


_second_cache: tuple[int, str] = (-1, "")


def iso_millis(timestamp: float) -> str:
    """ISO 8601 UTC with milliseconds, like "2026-11-26T10:00:00.123Z"."""
    global _second_cache
    # Round to microseconds first, as datetime.fromtimestamp does, so 0.123 isn't 0.122.
    micros = round(timestamp * 1_000_000)
    second, millis = divmod(micros // 1000, 1000)
    cached_second, prefix = _second_cache
    if second != cached_second:  # strftime once a second, not once a line
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)  # one tuple: threads see old or new, never half
    return f"{prefix}.{millis:03d}Z"


class AuditWriter:
    """Queues audit lines and appends them to the audit file from one thread."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self.written = 0
        self.write_failures = 0
        self.healthy = True
        self._queue = _LineQueue(settings.queue_size)
        self._sink = _Sink(settings)
        self._pending: list[bytes] = []  # the batch in hand, kept until it is on disk
        self._lock = threading.Lock()
        self._next_settings: AuditSettings | None = None
        self._reopen = False
        self._abandon = False
        self._poke = threading.Event()  # cuts a backoff short
        self._thread: threading.Thread | None = None
        self._last_report = -math.inf
        self._outage_failures = 0
        self._last_hand_off = -math.inf

    # -- counters, read by metrics and the admin page ---------------------------------
    @property
    def dropped(self) -> int:
        """Lines refused because the queue was full or the writer closed."""
        return self._queue.refused

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def reject_new(self) -> bool:
        """True when new predictions must be refused (503) until writes succeed."""
        return self.settings.on_failure == "reject" and not self.healthy

    # -- the caller's side --------------------------------------------------------------
    def submit(self, record: AuditRecord) -> bool:
        """Queue one record; False (counted in `dropped`) if full or closed.

        Never waits for the writer or the disk. Only when the queue is half full while
        the disk works does it yield the GIL for 0.2 ms, at most every 10 ms.
        """
        # Encoded here, a microsecond per call, rather than a batch at a time in the
        # writer, where it would hold the GIL (and stall the loop) for milliseconds.
        # Lone surrogates (undecodable header bytes) become \udcXX, a valid JSON
        # escape inside a string, so the line stays valid UTF-8 and valid JSON.
        accepted = self._queue.offer(record.to_bytes())
        if self._queue.qsize() > self._queue.maxsize // 2 and self.healthy:
            self._hand_off()
        return accepted

    def _hand_off(self) -> None:
        # Half full with a working disk means the writer can't get the GIL: a busy
        # loop drops and retakes it at every epoll_wait, faster than the writer's
        # thread wakes up (CPython's GIL "convoy"). Sleeping a moment is the one way
        # to let it in; it then takes the whole backlog at once. At most every 10 ms,
        # so a disk that is merely slow costs the loop 1% at worst.
        now = time.monotonic()
        if now - self._last_hand_off >= HAND_OFF_EVERY and self._thread is not None:
            self._last_hand_off = now
            time.sleep(HAND_OFF)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("audit writer already started")
        # A daemon thread plus an exit hook: a process that ends without close() still
        # drains the queue, and can't hang at exit on a writer waiting for lines.
        self._thread = threading.Thread(target=self._run, name="skyproxy-audit", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        # Open the file now, so a bad path is reported at startup, not at the first line.
        self._queue.wake()

    def reopen(self) -> None:
        """Close and reopen the file before the next batch (logrotate's SIGUSR1)."""
        with self._lock:
            self._reopen = True
        self._poke.set()
        self._queue.wake()

    def reconfigure(self, settings: AuditSettings) -> None:
        """Apply new settings: on_failure and queue_size now, the file before the next batch."""
        self.settings = settings
        self._queue.maxsize = settings.queue_size
        with self._lock:
            self._next_settings = settings
        self._poke.set()
        self._queue.wake()

    def close(self, timeout: float = 10.0) -> int:
        """Refuse new lines, write every queued one, stop the thread.

        Returns how many accepted lines could not be written within `timeout` (plus
        up to a second to stop a writer stuck on a failing disk). Safe to call twice.
        """
        atexit.unregister(self.close)
        self._queue.wake(close=True)
        self._poke.set()
        if self._thread is None:
            self.start()  # lines queued before start() are still owed to the disk
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            # The disk is still failing: give up on the remaining lines.
            self._abandon = True
            self._poke.set()
            self._thread.join(1.0)
        return len(self._pending) + self._queue.qsize()

    async def aclose(self, timeout: float = 10.0) -> int:
        return await asyncio.to_thread(self.close, timeout)

    # -- the writer thread --------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        while not self._abandon:
            if not self._pending:
                # While unhealthy, don't wait for lines: the retried open is what tells
                # us the disk is back, and `reject_new` depends on that.
                self._pending = self._queue.take(block=self.healthy)
                if not self._pending and self._queue.closed and not self._queue.qsize():
                    break
            # Requests are read after taking the batch, so a line submitted after
            # reopen() or reconfigure() returned always goes to the new file.
            self._apply_requests()
            before = len(self._pending)
            try:
                self._sink.write(self._pending)
            except Exception as exc:  # any failure: keep the batch, back off, retry
                self.written += before - len(self._pending)
                self._sink.close_file()
                self._failed(exc)
                backoff = min(max(backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
                self._poke.wait(backoff)
                self._poke.clear()
                continue
            self.written += before
            backoff = 0.0
            if not self.healthy:
                self._recovered()
            if before and not self._queue.closed and self._queue.qsize() < CHUNK_LINES:
                # Let lines gather instead of waking per line. Each wake-up and each
                # write(2) makes this thread take the GIL back, and a busy event loop,
                # which drops and retakes it at every epoll_wait, can keep winning
                # that race for long stretches (CPython's GIL "convoy"); so the fewer
                # hand-offs per line the better, and a backlog is taken whole.
                time.sleep(LINGER)
        self._sink.close()

    def _apply_requests(self) -> None:
        with self._lock:
            settings, self._next_settings = self._next_settings, None
            reopen, self._reopen = self._reopen, False
        if settings is not None and settings != self._sink.settings:
            self._sink.close()
            self._sink = _Sink(settings)
        elif reopen:
            self._sink.close_file()

    def _failed(self, exc: Exception) -> None:
        self.write_failures += 1
        self._outage_failures += 1
        self.healthy = False
        now = time.monotonic()
        if now - self._last_report >= REPORT_INTERVAL:
            self._last_report = now
            log.error(
                "cannot write audit file %s: %s (%d failed attempts; %d lines kept for retry)",
                self._sink.settings.path,
                exc,
                self._outage_failures,
                len(self._pending) + self._queue.qsize(),
                exc_info=not isinstance(exc, OSError),  # a traceback only for surprises
            )

    def _recovered(self) -> None:
        self.healthy = True
        log.warning(
            "audit file %s is writable again after %d failed attempts",
            self._sink.settings.path,
            self._outage_failures,
        )
        self._outage_failures = 0
        self._last_report = -math.inf


class _LineQueue:
    """A bounded FIFO of lines for one consumer, which never waits on a producer's lock.

    queue.Queue was measured starving the writer: its consumer re-takes the mutex
    that every put() takes too, and at ~60k puts/s it lost that race for seconds
    while the queue filled. Here the consumer sleeps on an Event that producers set
    only when the consumer said it is idle, so at most one put per batch touches a
    shared lock, and it drains the deque without ever blocking on the producers'
    lock. That lock makes the size check, the append and `closed` one step, so no
    line slips in after close.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.closed = False
        self.refused = 0
        self._lines: deque[bytes] = deque()
        self._put_lock = threading.Lock()
        self._idle = False
        self._woken = False
        self._wakeup = threading.Event()

    def qsize(self) -> int:
        return len(self._lines)

    def offer(self, line: bytes) -> bool:
        with self._put_lock:
            if self.closed or len(self._lines) >= self.maxsize:
                self.refused += 1
                return False
            self._lines.append(line)
        if self._idle and not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def take(self, *, block: bool) -> list[bytes]:
        """Every queued line; with block, first waits for a line, a wake() or close."""
        while block and not self._lines and not self._woken and not self.closed:
            self._wakeup.clear()
            self._idle = True
            # Checked again after announcing idle: a line appended before that was
            # seen here, one appended after it sets the event.
            if not self._lines and not self._woken and not self.closed:
                self._wakeup.wait()
            self._idle = False
        self._woken = False
        # Swapping the deque is O(1). Only if a producer was preempted holding its
        # lock, pop some lines one by one rather than wait for it.
        if self._put_lock.acquire(blocking=False):
            try:
                taken, self._lines = self._lines, deque()
            finally:
                self._put_lock.release()
            return list(taken)
        lines = self._lines
        return [lines.popleft() for _ in range(min(len(lines), CHUNK_LINES))]

    def wake(self, *, close: bool = False) -> None:
        if close:
            with self._put_lock:
                self.closed = True
        self._woken = True
        self._wakeup.set()


def _open_private(filename: str) -> TextIOWrapper:
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
    fd = os.open(filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        return open(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class _SizeRotating(logging.handlers.RotatingFileHandler):
    def _open(self) -> TextIOWrapper:
        return _open_private(self.baseFilename)


class _DailyRotating(logging.handlers.TimedRotatingFileHandler):
    def _open(self) -> TextIOWrapper:
        return _open_private(self.baseFilename)

    def rotation_filename(self, default_name: str) -> str:
        # doRollover deletes an existing file of the target name (possible after a
        # clock step or a restart); an audit trail keeps both instead.
        name, n = default_name, 0
        while os.path.exists(name):
            n += 1
            name = f"{default_name}.{n}"
        return name


_ANY_RECORD = logging.makeLogRecord({})


class _Sink:
    """The audit file and its rotation, used only by the writer thread.

    The handler stays in delay mode with no stream of its own: the sink opens the
    file through the handler's `_open` and writes to the descriptor directly, and
    uses the handler for doRollover's renaming and pruning of old files.
    """

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self.handler: _SizeRotating | _DailyRotating
        self.max_bytes = 0  # 0: never by size
        self._stream: TextIOWrapper | None = None
        self._size = 0  # of the open file, kept here to save an fstat per batch
        if settings.rotate_daily:
            self.handler = _DailyRotating(
                settings.path,
                when="midnight",
                utc=True,
                backupCount=settings.backup_count,
                encoding="utf-8",
                delay=True,
            )
        else:
            self.handler = _SizeRotating(
                settings.path,
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
        stream = self._stream or self._open()
        if not lines:
            return
        fd = stream.fileno()
        while lines:
            # A backlog means the GIL was hard to get: drain it in a few big writes,
            # as every write(2) means taking the GIL back once more.
            count = min(len(lines), max(CHUNK_LINES, len(lines) // 4))
            data = b"".join(lines[:count])
            if self.max_bytes and self._size + len(data) > self.max_bytes:
                count = self._fitting(lines, count)
                if not count:  # the next line would overflow this file: start another
                    self._rollover()
                    fd = self._open().fileno()
                    continue
                data = b"".join(lines[:count])
            _append(fd, data, self._size)
            self._size += len(data)
            del lines[:count]

    def _fitting(self, lines: list[bytes], limit: int) -> int:
        """How many of the first `limit` lines fit in the current file."""
        room, used = self.max_bytes - self._size, 0
        for count, line in enumerate(lines[:limit]):
            used += len(line)
            if used > room:
                # A line longer than max_bytes still gets written, alone in a file.
                return count or (0 if self._size else 1)
        return limit

    def _open(self) -> TextIOWrapper:
        self._stream = self.handler._open()
        self._size = os.fstat(self._stream.fileno()).st_size
        return self._stream

    def _rollover(self) -> None:
        self.close_file()
        self.handler.doRollover()

    def close_file(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

    def close(self) -> None:
        self.close_file()
        self.handler.close()


def _append(fd: int, data: bytes, start: int) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        # Cut off a partly written chunk, so the retry leaves no half line behind.
        # (Only ever shorten: after a copytruncate `start` may be past the end.)
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size > start:
                os.ftruncate(fd, start)
        raise
