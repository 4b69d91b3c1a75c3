"""The [webhooks] table and webhook_secret: defaults, and errors naming file, line and field."""

from __future__ import annotations

import re
import textwrap
from dataclasses import fields, replace
from pathlib import Path

import pytest
from helpers import write_config

from skyproxy import config
from skyproxy.config import KeySpec, Listen, TargetPattern
from skyproxy.errors import ConfigError

DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'
EXAMPLE = Path(__file__).resolve().parents[2] / "skyproxy.toml.example"
# A commented-out table or setting line of the example; prose comments never match.
_COMMENTED = re.compile(r"# (\[[\w.]+\]|[a-z_]+ = .*)")


def load(tmp_path: Path, body: str) -> config.Settings:
    return config.load(write_config(tmp_path, DEV + textwrap.dedent(body)), {})


def error(tmp_path: Path, body: str, field: str, needle: str, *parts: str) -> ConfigError:
    text = DEV + textwrap.dedent(body)
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    found = caught.value
    assert found.field == field, str(found)
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert found.line == lines[-1], str(found)  # the table comes after DEV
    for part in parts:
        assert part in str(found), str(found)
    return found


def test_without_the_table_nothing_changes(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert settings.webhooks is None
    assert settings.environments["dev"].webhook_secret is None


def _uncommented(text: str, table: str) -> str:
    """The example's commented-out `table`, from its header to the next blank line, as TOML."""
    block = text.split(f"\n# [{table}]\n", 1)[1].split("\n\n", 1)[0]
    lines = [f"[{table}]"] + [m.group(1) for m in map(_COMMENTED.fullmatch, block.splitlines()) if m]
    return "\n".join(lines) + "\n"


def test_the_example_documents_webhooks_with_their_defaults(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    hooks_toml = _uncommented(text, "webhooks")
    for f in fields(config.WebhookSettings):
        assert f"\n{f.name} = " in hooks_toml, f"[webhooks] {f.name} is not in the example"
    production = _uncommented(text, "environments.production")
    assert "\nwebhook_secret = " in production
    settings = config.load(write_config(tmp_path, DEV + production + hooks_toml), {})
    hooks = settings.webhooks
    assert hooks is not None
    # Every value the example shows is the default, except the public address it illustrates.
    defaults = config.load(write_config(tmp_path, DEV + "[webhooks]\n"), {}).webhooks
    assert defaults is not None
    assert hooks == replace(defaults, public_url="https://hooks.example.com")
    assert settings.environments["production"].webhook_secret == KeySpec("env", "SKYTELLS_WEBHOOK_SECRET")
    # The quick start serves without them.
    example = config.load(EXAMPLE, {})
    assert example.webhooks is None
    assert example.environments["dev"].webhook_secret is None


def test_the_defaults(tmp_path: Path) -> None:
    hooks = load(tmp_path, "[webhooks]\n").webhooks
    assert hooks is not None
    assert hooks.listen == (Listen("127.0.0.1", 8789),)
    assert hooks.store == tmp_path.resolve() / "state/webhooks.sqlite3"
    assert hooks.public_url is None
    assert hooks.signing_secret == KeySpec("keyring", "webhooks")
    assert [str(t) for t in hooks.allowed_targets] == [
        "http://127.0.0.1:*",
        "http://localhost:*",
        "http://[::1]:*",
    ]
    assert hooks.retry_schedule == (5, 30, 120, 600, 1800, 3600, 7200, 14400)
    assert hooks.max_body_bytes == 1_048_576


def test_every_field(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        """
        webhook_secret = "env:SKYTELLS_WEBHOOK_SECRET"
        [webhooks]
        listen = ["0.0.0.0:8789", "[::1]:8790"]
        public_url = "https://hooks.example.com/"
        store = "/var/lib/skyproxy/hooks.sqlite3"
        signing_secret = "file:secrets/whsec"
        allowed_targets = ["https://App.example.com/hooks", "http://[::1]:*"]
        retry_schedule = [1, 2.5]
        max_body_bytes = 2048
        """,
    )
    hooks = settings.webhooks
    assert hooks is not None
    assert settings.environments["dev"].webhook_secret == KeySpec("env", "SKYTELLS_WEBHOOK_SECRET")
    assert hooks.listen == (Listen("0.0.0.0", 8789), Listen("::1", 8790))
    assert hooks.public_url == "https://hooks.example.com"
    assert hooks.store == Path("/var/lib/skyproxy/hooks.sqlite3")
    assert hooks.signing_secret == KeySpec("file", str(tmp_path.resolve() / "secrets/whsec"))
    assert hooks.allowed_targets == (
        TargetPattern("https", "app.example.com", 443, "/hooks"),
        TargetPattern("http", "::1", None, ""),
    )
    assert hooks.retry_schedule == (1.0, 2.5)
    assert hooks.max_body_bytes == 2048


def test_a_keyring_name_for_the_signing_secret(tmp_path: Path) -> None:
    hooks = load(tmp_path, '[webhooks]\nsigning_secret = "keyring:relay"\n').webhooks
    assert hooks is not None and hooks.signing_secret == KeySpec("keyring", "relay")


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("retry_schedule = [5, nan]", "webhooks.retry_schedule[1]", "from 0 to 86400"),
        ("retry_schedule = [inf]", "webhooks.retry_schedule[0]", "from 0 to 86400"),
        ("retry_schedule = [-1]", "webhooks.retry_schedule[0]", "from 0 to 86400"),
        ("retry_schedule = [1e9]", "webhooks.retry_schedule[0]", "from 0 to 86400"),
        ('retry_schedule = ["5"]', "webhooks.retry_schedule[0]", "from 0 to 86400"),
        ("retry_schedule = [true]", "webhooks.retry_schedule[0]", "from 0 to 86400"),
        ("retry_schedule = 5", "webhooks.retry_schedule", "a list of seconds"),
        ("max_body_bytes = 0", "webhooks.max_body_bytes", ">= 1"),
        ("max_body_bytes = 9999999999999", "webhooks.max_body_bytes", "from 1 to"),
        ("max_body_bytes = 1.5", "webhooks.max_body_bytes", "an integer"),
        ('listen = ["8789"]', "webhooks.listen[0]", '"host:port"'),
        ("listen = []", "webhooks.listen", "missing"),
        ('listen = ["127.0.0.1:8787"]', "webhooks.listen[0]", "already used by dev"),
        ('listen = ["0.0.0.0:8787"]', "webhooks.listen[0]", "already used by dev"),
        ('public_url = "hooks.example.com"', "webhooks.public_url", "a URL like"),
        ('public_url = "https://u:p@hooks.example.com"', "webhooks.public_url", "user or password"),
        ('public_url = "https://hooks.example.com/?x=1"', "webhooks.public_url", "a URL like"),
        ('public_url = "https://hooks.example.com:99999"', "webhooks.public_url", "a URL like"),
        ('allowed_targets = ["127.0.0.1:*"]', "webhooks.allowed_targets[0]", "a URL prefix"),
        ('allowed_targets = ["http://127.0.0.1:*@evil.example"]', "webhooks.allowed_targets[0]", "user or"),
        ('allowed_targets = ["http://*:80"]', "webhooks.allowed_targets[0]", "a URL prefix"),
        ('allowed_targets = ["ftp://127.0.0.1:*"]', "webhooks.allowed_targets[0]", "a URL prefix"),
        ('allowed_targets = ["http://[zz]:*"]', "webhooks.allowed_targets[0]", "a URL prefix"),
        ('signing_secret = "whsec_abcdefghijklmnop"', "webhooks.signing_secret", "never the secret"),
        ('signing_secret = ""', "webhooks.signing_secret", '"keyring", "keyring:NAME"'),
        ('singing_secret = "keyring"', "webhooks.singing_secret", 'did you mean "signing_secret"'),
    ],
)
def test_bad_values(tmp_path: Path, line: str, field: str, expected: str) -> None:
    found = error(tmp_path, f"[webhooks]\n{line}\n", field, line, expected)
    assert "abcdefghijklmnop" not in str(found)


def test_a_literal_webhook_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = '[environments.prod]\nlisten = ["127.0.0.1:8790"]\nwebhook_secret = "sk-live-0123456789abcdef"\n'
    found = error(tmp_path, text, "environments.prod.webhook_secret", "webhook_secret", "never the secret")
    assert "0123456789abcdef" not in str(found)


def test_webhooks_must_be_a_table(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'webhooks = "on"\n' + DEV)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    assert (caught.value.field, caught.value.line) == ("webhooks", 1)
    assert "a table" in str(caught.value)
