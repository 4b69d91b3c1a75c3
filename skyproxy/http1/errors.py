"""What can go wrong with an upstream exchange, one type per outcome a caller acts on."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class ConnectFailed(UpstreamError):
    """No connection: the name did not resolve, or every address refused."""


class ConnectTimeout(ConnectFailed):
    """Resolving and connecting took longer than the connect timeout."""


class PoolTimeout(UpstreamError):
    """Every connection the origin may have stayed busy for the whole pool timeout."""


class ProtocolError(UpstreamError):
    """The upstream's bytes are not an HTTP/1.x answer this client accepts."""


class Disconnected(UpstreamError):
    """The upstream closed the connection before the answer was complete."""


class IncompleteBody(Disconnected):
    """The body was cut short: fewer bytes than its Content-Length, or no last chunk.

    Raised from the body's iterator after the head was handed out, so a relay that has
    already sent the status line knows the answer it passed on is truncated.
    """


class ReadTimeout(UpstreamError):
    """The upstream sent nothing for the read timeout while an answer was awaited."""


class WriteTimeout(UpstreamError):
    """The upstream took nothing of the request for the write timeout."""
