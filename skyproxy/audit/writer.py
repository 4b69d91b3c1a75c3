"""The audit writer: one JSON line per prediction event, written off the event loop.

`AuditWriter.submit()` serialises and encodes a record on the caller's thread and
puts the line on a bounded queue; it never blocks. One writer thread takes everything
queued as a batch and hands it to the `AuditFile`, which appends it with one write(2)
per CHUNK_LINES lines on an O_APPEND descriptor, so lines are whole and never
interleaved. A disk error never loses an accepted line: what is not on disk is kept and
retried with backoff while `healthy` is False. A short write (a full disk) keeps the
whole lines it wrote and cuts off the rest, so a disk with a little room left takes
what fits and the file always ends at a line boundary.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import threading
import time
from collections import deque

from skyproxy.audit.files import CHUNK_LINES, AuditFile
from skyproxy.audit.record import AuditRecord
from skyproxy.config import AuditSettings

__all__ = ["AuditWriter"]

log = logging.getLogger("skyproxy.audit")

LINGER = 0.005  # seconds a busy writer waits for a batch to fill; the most a line waits
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
HAND_OFF = 0.0002  # seconds submit() sleeps to let a GIL-starved writer in
HAND_OFF_EVERY = 0.01
REPORT_INTERVAL = 5.0  # seconds between error reports while the disk keeps failing


class AuditWriter:
    """Queues audit lines and appends them to the audit file from one thread."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self.written = 0
        self.write_failures = 0
        self.healthy = True
        self._queue = _LineQueue(settings.queue_size)
        self._file = AuditFile(settings)
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
        """Accepted lines not yet on disk: the queue and the batch in hand, kept for retry."""
        written = self.written  # read first: it only grows, and never past `accepted`
        return self._queue.accepted - written

    @property
    def reject_new(self) -> bool:
        """True when new predictions must be refused (503) until writes succeed."""
        return self.settings.on_failure == "reject" and not self.healthy

    # -- the caller's side --------------------------------------------------------------
    def submit(self, record: AuditRecord) -> bool:
        """Queue one record; False (counted in `dropped`) if full or closed.

        Never waits for the writer or the disk. Only when the queue is half full while
        the disk works does it yield the GIL for HAND_OFF seconds, at most once every
        HAND_OFF_EVERY seconds.
        """
        # Encoded here, one record at a time, rather than a batch at a time in the
        # writer, where it would hold the GIL (and stall the loop) for the whole batch.
        accepted = self._queue.offer(record.to_bytes())
        if self._queue.qsize() > self._queue.maxsize // 2 and self.healthy:
            self._hand_off()
        return accepted

    def _hand_off(self) -> None:
        # Half full with a working disk means the writer can't get the GIL: a busy
        # loop drops and retakes it at every epoll_wait, faster than the writer's
        # thread wakes up (CPython's GIL "convoy"). Sleeping a moment is the one way
        # to let it in; it then takes the whole backlog at once. Rate-limited, so a disk
        # that is merely slow costs the loop at most HAND_OFF / HAND_OFF_EVERY of its time.
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
        return self.depth

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
                self._file.write(self._pending)
            except Exception as exc:  # any failure: keep the batch, back off, retry
                self.written += before - len(self._pending)
                self._file.close_file()
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
        self._file.close()

    def _apply_requests(self) -> None:
        with self._lock:
            settings, self._next_settings = self._next_settings, None
            reopen, self._reopen = self._reopen, False
        if settings is not None and settings != self._file.settings:
            self._file.close()
            self._file = AuditFile(settings)
        elif reopen:
            self._file.close_file()

    def _failed(self, exc: Exception) -> None:
        self.write_failures += 1
        self._outage_failures += 1
        self.healthy = False
        now = time.monotonic()
        if now - self._last_report >= REPORT_INTERVAL:
            self._last_report = now
            log.error(
                "cannot write audit file %s: %s (%d failed attempts; %d lines kept for retry)",
                self._file.settings.path,
                exc,
                self._outage_failures,
                self.depth,
                exc_info=not isinstance(exc, OSError),  # a traceback only for surprises
            )

    def _recovered(self) -> None:
        self.healthy = True
        log.warning(
            "audit file %s is writable again after %d failed attempts",
            self._file.settings.path,
            self._outage_failures,
        )
        self._outage_failures = 0
        self._last_report = -math.inf


class _LineQueue:
    """A bounded FIFO of lines for one consumer, which never waits on a producer's lock.

    Not queue.Queue: its consumer re-takes the mutex that every put() takes too, and
    under a steady stream of puts it can lose that race long enough for the queue to
    fill. Here the consumer sleeps on an Event that producers set
    only when the consumer said it is idle, so at most one put per batch touches a
    shared lock, and it drains the deque without ever blocking on the producers'
    lock. That lock makes the size check, the append and `closed` one step, so no
    line slips in after close.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.closed = False
        self.refused = 0
        self.accepted = 0
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
            self.accepted += 1
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
