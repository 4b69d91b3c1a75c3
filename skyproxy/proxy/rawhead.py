"""The one private hook into aiohttp: a response whose upstream lines go out as bytes.

aiohttp writes a head from str only: it encodes each header as UTF-8 and silently drops
lone surrogates, so no str carries an upstream's obs-text bytes (`X-Odd: caf\\xe9`) through
unchanged, and it has no public way to write header bytes. RawHeadResponse overrides
`StreamResponse._write_headers`: aiohttp still serializes and checks its own lines
(framing, Date, Server, Connection, the proxy's headers) as usual, then the upstream's
status line and header lines, as bytes, are spliced into the head aiohttp buffered,
`StreamWriter._headers_buf`. aiohttp then sends that head with the body's first write.
tests/proxy/test_rawhead.py fails loudly if either private changes.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import StreamWriter

# Every control character but HTAB: none may reach a head, or a value could end a line.
_CONTROL = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
# Each of them to NUL (NUL included), everything else to itself: counting NULs after one
# translate() counts the control characters, without the table that translate() builds
# on every call when it is given characters to delete.
_TO_NUL = bytes.maketrans(_CONTROL, bytes(len(_CONTROL)))
# The usual reasons, known to be safe: most answers skip the search of their reason.
_PHRASES = frozenset(status.phrase.encode() for status in HTTPStatus) | {b""}


class UnsafeHead(ValueError):
    """A reason or header line holds a control character: it could split or forge lines."""


class RawHeadResponse(web.StreamResponse):
    """A StreamResponse that also sends `lines`, `count` header lines each ending in CRLF,
    exactly as given, and the status line with `reason` exactly as given (aiohttp's
    phrase for the status when it is empty).

    aiohttp's default Content-Type is never added: an answer carries one only if the
    lines do. Nor are Date or Server when the lines hold them. With `at_once`, the head
    is sent as soon as the response is prepared (a stream's client sees the status at
    once); without, it goes out with the first body bytes, in one write.
    """

    def __init__(
        self, status: int, reason: bytes, lines: bytes | bytearray, count: int, *, at_once: bool = True
    ) -> None:
        # `count` line ends, and no other control character: the CR and LF of each line's
        # end are 2 * count of the control characters, so there may be no more than that.
        if lines.count(b"\r\n") != count or lines.translate(_TO_NUL).count(0) != 2 * count:
            raise UnsafeHead("a header line holds a control character")
        if reason in _PHRASES:
            # A usual phrase (any status's) is ASCII: aiohttp writes it as it is.
            super().__init__(status=status, reason=reason.decode("ascii") if reason else None)
            self._raw_reason = b""
        elif reason.translate(_TO_NUL).count(0):
            raise UnsafeHead("the reason phrase holds a control character")
        else:
            super().__init__(status=status)
            self._raw_reason = reason
        self._raw_lines = lines
        self._at_once = at_once
        self._prepared_for: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self._prepared_for = request
        return await super().prepare(request)

    async def _write_headers(self) -> None:
        # Overrides aiohttp's private method; see the module docstring.
        request, self._prepared_for = self._prepared_for, None
        assert request is not None  # prepare() runs first
        writer = request.writer
        if not isinstance(writer, StreamWriter):
            raise TypeError(f"aiohttp's writer is a {type(writer).__name__}, not a StreamWriter")
        own = self.headers
        own.popall(hdrs.CONTENT_TYPE, None)
        lines = self._raw_lines
        lowered = lines.lower()
        # find(), not `in`: `in` on bytes tries the operand as an int first, and formats
        # (then drops) a TypeError on every answer.
        if lowered.startswith(b"date:") or lowered.find(b"\r\ndate:") >= 0:
            own.popall(hdrs.DATE, None)
        if lowered.startswith(b"server:") or lowered.find(b"\r\nserver:") >= 0:
            own.popall(hdrs.SERVER, None)
        version = request.version
        status_line = f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}"
        await writer.write_headers(status_line, own)
        head = writer._headers_buf
        if head is None:
            raise TypeError("aiohttp's StreamWriter no longer buffers the head in _headers_buf")
        end = len(status_line) + 2  # ASCII: aiohttp's own phrase, or a usual one
        if self._raw_reason:
            raw = b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, self.status, self._raw_reason)
            writer._headers_buf = raw + lines + head[end:]
        else:
            writer._headers_buf = head[:end] + lines + head[end:]
        if self._at_once:
            writer.send_headers()
