"""The tokens file: the format of a token, only hashes on disk, mode 0600, atomic and locked."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from skyproxy.tokens import store
from skyproxy.tokens.token import ClientToken

TOKEN_FORMAT = re.compile(r"skp_[A-Za-z0-9_-]{43,}")


def test_a_token_is_skp_and_256_random_bits(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens = {store.create(path, f"app{i}", ["dev"]).reveal() for i in range(20)}
    assert len(tokens) == 20
    assert all(TOKEN_FORMAT.fullmatch(t) for t in tokens)


def test_only_the_hash_is_stored_with_what_the_token_may_do(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)
    token = store.create(path, "billing", ["dev", "production"], user="alice", expires_days=30, now=now)
    text = path.read_text()
    assert token.reveal() not in text and token.reveal()[4:] not in text
    entry = json.loads(text)["tokens"][0]
    assert entry == {
        "name": "billing",
        "sha256": hashlib.sha256(token.reveal().encode()).hexdigest(),
        "environments": ["dev", "production"],
        "user": "alice",
        "trustUserHeader": False,
        "created": "2026-11-26T10:00:00Z",
        "expires": "2026-12-26T10:00:00Z",
        "lastUsed": None,
    }
    (record,) = store.read(path)
    assert record.expires == now + timedelta(days=30)
    assert record.fingerprint == entry["sha256"][:12]


def test_the_file_and_its_folder_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "tokens.json"
    old_umask = os.umask(0o022)
    try:
        store.create(path, "app", ["dev"])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    store.revoke(path, "app")  # a rewrite is 0600 too
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json", "tokens.json.lock"]


def test_names_are_unique_and_revoke_removes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store.create(path, "app", ["dev"])
    with pytest.raises(store.TokenError, match="exists"):
        store.create(path, "app", ["dev"])
    assert store.revoke(path, "app").name == "app"
    assert store.read(path) == []
    with pytest.raises(store.TokenError, match="no token named 'app'"):
        store.revoke(path, "app")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "two words"}, "invalid token name"),
        ({"name": "x" * 65}, "invalid token name"),
        ({"user": "bob", "trust_user_header": True}, "exclude each other"),
        ({"expires_days": 0}, "--expires"),
        ({"expires_days": 100_000}, "--expires"),
    ],
)
def test_bad_requests_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "app", **kwargs}
    name = str(args.pop("name"))
    with pytest.raises(store.TokenError, match=message):
        store.create(tmp_path / "tokens.json", name, ["dev"], **args)  # type: ignore[arg-type]
    assert not (tmp_path / "tokens.json").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[]", '"version": 1'),
        (b'{"version": 2, "tokens": []}', '"version": 1'),
        (b'{"version": 1, "tokens": [{"name": "a"}]}', "tokens[0]"),
        (b'{"version": 1, "tokens": [{"name": "a", "sha256": "xyz"}]}', "sha256"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_a_damaged_file_is_an_error_naming_it(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(content)
    with pytest.raises(store.TokenFileError) as caught:
        store.read(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    with path.open("wb") as f:
        f.truncate(store.MAX_FILE_BYTES + 10)
    with pytest.raises(store.TokenFileError, match="larger than"):
        store.read(path)


def test_parallel_writers_in_separate_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    script = (
        "import sys\nfrom pathlib import Path\nfrom skyproxy.tokens import store\n"
        "for i in range(5):\n    store.create(Path(sys.argv[1]), f'{sys.argv[2]}-{i}', ['dev'])\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(path), f"w{n}"]) for n in range(8)]
    assert [w.wait(60) for w in workers] == [0] * 8
    names = {r.name for r in store.read(path)}
    assert names == {f"w{n}-{i}" for n in range(8) for i in range(5)}


def test_last_used_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = store.create(path, "app", ["dev"])
    later = datetime(2026, 1, 2, tzinfo=timezone.utc)
    earlier = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert store.record_last_used(path, {token.digest_hex: later})
    assert not store.record_last_used(path, {token.digest_hex: earlier})
    assert store.read(path)[0].last_used == later


def test_a_client_token_never_shows_itself(tmp_path: Path) -> None:
    token = ClientToken.new()
    for shown in (repr(token), str(token), f"{token}", repr([token]), repr({"t": token})):
        assert token.reveal() not in shown and token.reveal()[4:20] not in shown
        assert token.fingerprint in shown
    with pytest.raises(TypeError):
        pickle.dumps(token)
    assert token == ClientToken(token.reveal()) and token != ClientToken.new()
