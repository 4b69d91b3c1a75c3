"""The upstream HTTP/1.1 client: pool, connection, answer parsing, response, errors.

Imports nothing of skyproxy. How the parts fit:
- `client.Client` keeps one `pool.Pool` per `origin.Origin` and runs the retry rule and
  the read/write clocks;
- `connection.Connection` carries one exchange at a time and alone decides whether it
  may carry another;
- `answer.Answer` is llhttp's callback object for one answer; `flow.FlowControl` the
  backpressure; `response.Response` what the caller reads;
- `settings` holds every default; `dns` the small name cache; `errors` the outcomes.
"""

from skyproxy.http1.client import Client
from skyproxy.http1.dns import Resolver
from skyproxy.http1.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    IncompleteBody,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    UpstreamError,
    WriteTimeout,
)
from skyproxy.http1.origin import Origin
from skyproxy.http1.request import IDEMPOTENT, Body
from skyproxy.http1.response import Response
from skyproxy.http1.settings import Limits, Timeouts

__all__ = [
    "IDEMPOTENT",
    "Body",
    "Client",
    "ConnectFailed",
    "ConnectTimeout",
    "Disconnected",
    "IncompleteBody",
    "Limits",
    "Origin",
    "PoolTimeout",
    "ProtocolError",
    "ReadTimeout",
    "Resolver",
    "Response",
    "Timeouts",
    "UpstreamError",
    "WriteTimeout",
]
