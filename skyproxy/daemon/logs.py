"""Log lines for a terminal or for journald.

Under systemd, stderr is a stream into journald, which stamps each line itself
and reads a leading ``<N>`` as the line's syslog priority (sd-daemon(3)); so
there we drop the timestamp and add the prefix. Anywhere else a line reads
``2026-11-26T10:00:00.123Z skyproxy WARNING message``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

__all__ = ["LEVELS", "configure_logging", "escape_controls", "is_journal_stream", "syslog_priority"]

LOGGER_NAME = "skyproxy"

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Send the ``skyproxy`` logger tree to ``stream`` (stderr by default).

    Calling it again replaces the previous handler, so a reload can change the
    level without lines being written twice.
    """
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        choices = ", ".join(LEVELS)
        raise ValueError(f"unknown log level {level!r} (choose from {choices})") from None
    if stream is None:
        # Looked up per call, not bound at import, so a replaced sys.stderr
        # (pytest's capture, a daemon's redirect) is honoured.
        stream = sys.stderr

    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(stream)
    journal = is_journal_stream(stream, environ)
    handler.setFormatter(_JournalFormatter() if journal else _PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(levelno)
    # A root handler installed by a library or by basicConfig would otherwise
    # print every line a second time in its own format.
    logger.propagate = False


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journald connection named by ``$JOURNAL_STREAM``.

    The variable alone is not enough: it is inherited by everything a
    systemd-started process spawns, such as every shell in a terminal that
    runs as a user unit, whose stderr is a tty. systemd.exec(5) says to
    compare its ``device:inode`` with the stream itself.
    """
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        # io.StringIO and closed streams have no descriptor to compare.
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]
else:  # not subscriptable at run time before Python 3.11
    _StreamHandler = logging.StreamHandler


class _Handler(_StreamHandler):
    """Marks the handler configure_logging owns, so a second call finds it."""


# Client-controlled values (paths, headers) reach log messages; a newline in one would
# let a client write a line of its own choosing, forged time and level included.
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(_escaped, text)


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


class _SafeFormatter(logging.Formatter):
    """Escapes control characters in the message; a traceback keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class _PlainFormatter(_SafeFormatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # UTC with a Z: lines from hosts in different zones sort and compare as is.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class _JournalFormatter(_SafeFormatter):
    def __init__(self) -> None:
        super().__init__("%(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # journald splits the stream at newlines and reads a prefix per line,
        # so each traceback line needs its own or it would be filed as info.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def syslog_priority(levelno: int) -> int:
    """The syslog(3) priority for a logging level; custom levels round down."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7
