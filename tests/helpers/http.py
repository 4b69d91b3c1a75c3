"""A raw HTTP/1.1 client for tests: exact header names, cases and bodies, and the error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def http_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    status = int((await reader.readline()).split()[1])
    headers: CIMultiDict[str] = CIMultiDict()
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    body = bytearray()
    if status in (204, 304):
        pass
    elif "chunked" in headers.get("Transfer-Encoding", "").lower():
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    elif "Content-Length" in headers:
        body += await reader.readexactly(int(headers["Content-Length"]))
    else:
        body += await reader.read()
    return RawResponse(status, headers, bytes(body))


async def raw_request(url: str, request: bytes) -> RawResponse:
    """Writes `request` as is to the server at `url` and reads one response."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def host_of(url: str) -> str:
    return URL(url).raw_authority


def assert_error(status: int, code: str, answer: RawResponse | tuple[int, CIMultiDict[str], bytes]) -> str:
    """Checks the JSON error shape and returns the request id it carries."""
    got_status, headers, body = (
        (answer.status, answer.headers, answer.body) if isinstance(answer, RawResponse) else answer
    )
    assert got_status == status, body
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) >= {"code", "message", "request_id"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == headers["X-Request-Id"]
    assert SANE_ID.fullmatch(error["request_id"])
    return str(error["request_id"])


async def fetch(
    session: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: object
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
        return r.status, CIMultiDict(r.headers), await r.read()
