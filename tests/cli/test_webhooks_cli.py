"""`skyproxy webhooks list | replay | secret` as a user runs them: real processes, a real store."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from helpers import skyproxy_command, write_config
from helpers.webhooks import add_route
from standardwebhooks import Webhook

from skyproxy.webhooks.signing import SigningSecret, signature_header
from skyproxy.webhooks.store import Store

CONFIG = """
[environments.dev]
listen = ["127.0.0.1:1"]
upstream = "mock"
[webhooks]
signing_secret = "file:state/whsec"
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*skyproxy_command(), *args], capture_output=True, text=True, timeout=60)


def test_list_and_replay(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    store_path = tmp_path / "state/webhooks.sqlite3"
    route = add_route(store_path, "http://127.0.0.1:9/app")
    store = Store(store_path)
    body = b'{"id":"p-1","status":"succeeded"}'
    event = store.receive("dev", route, body, "application/json", "p-1", "succeeded", time.time()).event_id
    assert event is not None
    store.dead(event, 9, "HTTP 500")
    store.close()
    listed = run("webhooks", "list", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    item = json.loads(line)
    assert set(item) == {
        "id",
        "environment",
        "predictionId",
        "event",
        "target",
        "status",
        "attempts",
        "receivedAt",
        "lastError",
    }
    assert (item["id"], item["status"], item["attempts"], item["lastError"]) == (event, "dead", 9, "HTTP 500")
    assert item["receivedAt"].endswith("Z")
    assert run("webhooks", "list", "--status", "pending", "--json", "-c", str(config)).stdout == ""
    replayed = run("webhooks", "replay", event, "-c", str(config))
    assert replayed.returncode == 0, replayed.stderr
    pending = json.loads(run("webhooks", "list", "--status", "pending", "--json", "-c", str(config)).stdout)
    assert (pending["id"], pending["attempts"]) == (event, 0)
    again = run("webhooks", "replay", event, "-c", str(config))
    assert again.returncode == 1 and "still pending" in again.stderr
    assert "ID" in run("webhooks", "list", "-c", str(config)).stdout


def test_secret_then_rotate(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    first = run("webhooks", "secret", "-c", str(config))
    assert first.returncode == 0, first.stderr
    secret = first.stdout.strip()
    SigningSecret(secret)
    assert (tmp_path / "state/whsec").read_text().strip() == secret
    refused = run("webhooks", "secret", "-c", str(config))
    assert refused.returncode == 1 and "--rotate" in refused.stderr
    rotated = run("webhooks", "secret", "--rotate", "-c", str(config))
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != secret and "24 h" in rotated.stderr
    store = Store(tmp_path / "state/webhooks.sqlite3")
    assert store.meta("signing_secret_rotated_at") is not None
    store.close()
    # Both verify the relay's header during the rotation.
    from skyproxy.config import load
    from skyproxy.webhooks import secrets

    hooks = load(config).webhooks
    assert hooks is not None
    keys = secrets.signing_keys(hooks, time.time())
    now = int(time.time())
    header = signature_header("msg_x", now, b"{}", keys.active(now))
    for text in (secret, new):
        Webhook(text).verify(
            b"{}", {"webhook-id": "msg_x", "webhook-timestamp": str(now), "webhook-signature": header}
        )


def test_without_webhooks_the_commands_say_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:1"]\nupstream = "mock"\n')
    answer = run("webhooks", "list", "-c", str(config))
    assert answer.returncode == 1 and "no [webhooks] table" in answer.stderr
