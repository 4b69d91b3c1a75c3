"""A request as bytes: the request line, Host, the caller's header lines and the framing."""

from __future__ import annotations

from collections.abc import AsyncIterator

# Methods that do nothing more when sent twice: only these are retried on a stale connection.
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
_BODY_EXPECTED = frozenset(("POST", "PUT", "PATCH"))

Body = bytes | AsyncIterator[bytes] | None


def request_head(
    method: str, target: str, authority: bytes, head: bytes | bytearray, body: Body, length: int | None
) -> bytearray:
    """The request's head, and a whole body after it when the body is bytes.

    `head` holds the caller's header lines, each ending in CRLF, without Host or framing;
    `length` is a streamed body's length when known, else it goes chunked.
    """
    out = bytearray(b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target.encode(), authority))
    out += head
    if body is None:
        if method in _BODY_EXPECTED:
            out += b"Content-Length: 0\r\n"
        out += b"\r\n"
    elif isinstance(body, bytes):
        out += b"Content-Length: %d\r\n\r\n" % len(body)
        out += body
    elif length is None:
        out += b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        out += b"Content-Length: %d\r\n\r\n" % length
    return out


def replayable(method: str, body: Body) -> bool:
    """Whether sending the request again can do nothing twice and can send the same bytes."""
    return method in IDEMPOTENT and (body is None or isinstance(body, bytes))
