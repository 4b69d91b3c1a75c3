"""The tokens file: hashed client tokens as JSON, mode 0600, replaced atomically.

Every change is a read-modify-write under an exclusive lock on a sidecar file, so a
revoke from the CLI and the daemon's last-used update can never undo each other. The
new content goes to a temporary file in the same folder (created 0600), is fsynced,
and is renamed over the old one: a reader sees the old file or the new one, whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from skyproxy.errors import SkyproxyError
from skyproxy.tokens.token import ClientToken, fingerprint_of

VERSION = 1
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_EXPIRES_DAYS = 36_500
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenFileError(SkyproxyError):
    """The tokens file cannot be read, parsed or written; names the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"tokens file {path}: {reason}")


class TokenError(SkyproxyError):
    """A token command that cannot be done as asked (a duplicate or unknown name)."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One client token as stored: its hash and what it may do, never the token."""

    name: str
    digest_hex: str
    environments: frozenset[str]
    user: str | None  # bound user: userId is this, whatever the header says
    trust_user_header: bool  # a backend for many users: userId comes from the header
    created: datetime
    expires: datetime | None
    last_used: datetime | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.digest_hex)

    def binding(self) -> str:
        if self.user is not None:
            return f"user {self.user}"
        return "user header" if self.trust_user_header else "token name"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.digest_hex,
            "environments": sorted(self.environments),
            "user": self.user,
            "trustUserHeader": self.trust_user_header,
            "created": iso(self.created),
            "expires": None if self.expires is None else iso(self.expires),
            "lastUsed": None if self.last_used is None else iso(self.last_used),
        }


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- reading ----------------------------------------------------------------------------


def read(path: Path) -> list[TokenRecord]:
    """Every record in the file; no file means no tokens. Raises TokenFileError."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise TokenFileError(path, f"larger than {MAX_FILE_BYTES} bytes")
    return parse(raw, path)


def parse(raw: bytes, path: Path) -> list[TokenRecord]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenFileError(path, f"not JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("tokens"), list)
    ):
        raise TokenFileError(path, f'expected {{"version": {VERSION}, "tokens": [...]}}')
    records: list[TokenRecord] = []
    names: set[str] = set()
    for i, entry in enumerate(data["tokens"]):
        try:
            record = _record(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenFileError(path, f"tokens[{i}]: {exc}") from None
        if record.name in names:
            raise TokenFileError(path, f"tokens[{i}]: duplicate name {record.name!r}")
        names.add(record.name)
        records.append(record)
    return records


def _record(entry: object) -> TokenRecord:
    if not isinstance(entry, dict):
        raise TypeError("expected an object")
    name, digest = entry["name"], entry["sha256"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("bad name")
    if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
        raise ValueError(f"{name}: sha256 must be 64 lower-case hex digits")
    environments = entry["environments"]
    if not isinstance(environments, list) or not all(isinstance(e, str) for e in environments):
        raise ValueError(f"{name}: environments must be a list of names")
    user = entry.get("user")
    trust = entry.get("trustUserHeader", False)
    if (user is not None and not isinstance(user, str)) or not isinstance(trust, bool):
        raise ValueError(f"{name}: bad user binding")
    return TokenRecord(
        name=name,
        digest_hex=digest,
        environments=frozenset(environments),
        user=user,
        trust_user_header=trust,
        created=_moment(entry["created"]),
        expires=None if entry.get("expires") is None else _moment(entry["expires"]),
        last_used=None if entry.get("lastUsed") is None else _moment(entry["lastUsed"]),
    )


def _moment(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 time, got {value!r}")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


# -- writing ----------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds the exclusive lock that every read-modify-write of `path` takes."""
    _make_folder(path.parent)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write(path: Path, records: Iterable[TokenRecord]) -> None:
    """Replaces the file atomically with `records`, mode 0600. Call it under `locked`."""
    body = json.dumps(
        {"version": VERSION, "tokens": [r.to_json() for r in records]}, indent=2, ensure_ascii=False
    )
    _make_folder(path.parent)
    # mkstemp creates the file 0600 whatever the umask, so it is never readable by others.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as stream:
            stream.write(body + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename is durable once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _make_folder(folder: Path) -> None:
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700, parents=True)


# -- the commands' operations -----------------------------------------------------------


def create(
    path: Path,
    name: str,
    environments: Iterable[str],
    *,
    user: str | None = None,
    trust_user_header: bool = False,
    expires_days: int | None = None,
    now: datetime | None = None,
) -> ClientToken:
    """Makes a token, stores its hash, and returns it: the only time it exists whole."""
    if not NAME.fullmatch(name):
        raise TokenError(f"invalid token name {name!r}: use 1-64 letters, digits, '.', '-', '_', '@'")
    if user is not None and trust_user_header:
        raise TokenError("--user and --trust-user-header exclude each other")
    if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRES_DAYS:
        raise TokenError(f"--expires must be from 1 to {MAX_EXPIRES_DAYS} days")
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    token = ClientToken.new()
    record = TokenRecord(
        name=name,
        digest_hex=token.digest_hex,
        environments=frozenset(environments),
        user=user,
        trust_user_header=trust_user_header,
        created=now,
        expires=None if expires_days is None else now + timedelta(days=expires_days),
    )
    with locked(path):
        records = read(path)
        if any(r.name == name for r in records):
            raise TokenError(f"a token named {name!r} exists; revoke it first or choose another name")
        write(path, [*records, record])
    return token


def revoke(path: Path, name: str) -> TokenRecord:
    """Removes the named token; a revoked token is simply unknown from then on."""
    with locked(path):
        records = read(path)
        found = next((r for r in records if r.name == name), None)
        if found is None:
            raise TokenError(f"no token named {name!r}")
        write(path, [r for r in records if r.name != name])
    return found


def record_last_used(path: Path, last_used: Mapping[str, datetime]) -> bool:
    """Stores last-used times by hash, for tokens still in the file. False if none changed."""
    with locked(path):
        records = read(path)
        changed = [_touched(r, last_used.get(r.digest_hex)) for r in records]
        if changed == records:
            return False
        write(path, changed)
    return True


def _touched(record: TokenRecord, used: datetime | None) -> TokenRecord:
    if used is None or (record.last_used is not None and record.last_used >= used):
        return record  # only ever forward: two writers never move it back
    return replace(record, last_used=used)
