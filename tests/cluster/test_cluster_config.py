"""[cluster] in the config file: the names, the required on_error, and sources for the URL."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from helpers import write_config

from skyproxy import config
from skyproxy.config import ClusterSettings, KeySpec
from skyproxy.errors import ConfigError

DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'


def load(tmp_path: Path, cluster: str) -> ClusterSettings | None:
    path = write_config(tmp_path, textwrap.dedent(cluster) + DEV)
    return config.load(path, {}).cluster


def error(tmp_path: Path, cluster: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, cluster)
    return caught.value


def test_without_a_cluster_table_there_is_no_cluster(tmp_path: Path) -> None:
    assert load(tmp_path, "") is None


def test_the_issue_example_parses(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        """
        [cluster]
        redis = "env:SKYPROXY_REDIS_URL"
        on_error = "closed"
        timeout_ms = 50
        prefix = "skyproxy:"
        """,
    )
    assert settings == ClusterSettings(
        on_error="closed", redis=KeySpec("env", "SKYPROXY_REDIS_URL"), timeout_ms=50.0, prefix="skyproxy:"
    )


@pytest.mark.parametrize(
    ("value", "spec", "url"),
    [
        ("keyring", KeySpec("keyring", "cluster"), ""),
        ("keyring:redis-prod", KeySpec("keyring", "redis-prod"), ""),
        ("credential:redis", KeySpec("credential", "redis"), ""),
        ("redis://10.0.0.5:6379/2", None, "redis://10.0.0.5:6379/2"),
        ("rediss://cache.internal", None, "rediss://cache.internal"),
        ("unix:///run/redis/redis.sock?db=1", None, "unix:///run/redis/redis.sock?db=1"),
    ],
)
def test_the_url_comes_from_a_key_source_or_a_literal(
    tmp_path: Path, value: str, spec: KeySpec | None, url: str
) -> None:
    settings = load(tmp_path, f'[cluster]\nredis = "{value}"\non_error = "open"\n')
    assert settings is not None
    assert (settings.redis, settings.redis_url, settings.on_error) == (spec, url, "open")
    assert (settings.timeout_ms, settings.prefix) == (50.0, "skyproxy:")


def test_a_file_source_is_relative_to_the_config(tmp_path: Path) -> None:
    settings = load(tmp_path, '[cluster]\nredis = "file:secrets/redis-url"\non_error = "open"\n')
    assert settings is not None
    assert settings.redis == KeySpec("file", str(tmp_path.resolve() / "secrets/redis-url"))


@pytest.mark.parametrize(
    ("body", "field", "part"),
    [
        ('[cluster]\nredis = "env:R"\n', "cluster.on_error", 'missing: choose "closed"'),
        ('[cluster]\nredis = "env:R"\non_error = "maybe"\n', "cluster.on_error", '"closed" or "open"'),
        ('[cluster]\non_error = "open"\n', "cluster.redis", "missing"),
        ('[cluster]\nredis = 6379\non_error = "open"\n', "cluster.redis", "got 6379"),
        ('[cluster]\nredis = "env:"\non_error = "open"\n', "cluster.redis", "expected a key source"),
        (
            '[cluster]\nredis = "http://cache/0"\non_error = "open"\n',
            "cluster.redis",
            "expected a key source",
        ),
        ('[cluster]\nredis = "redis://cache:0/0"\non_error = "open"\n', "cluster.redis", "from 1 to 65535"),
        ('[cluster]\nredis = "redis://cache/zero"\non_error = "open"\n', "cluster.redis", "must be a number"),
        ('[cluster]\nredis = "unix://"\non_error = "open"\n', "cluster.redis", "socket's path"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\ntimeout_ms = 0\n', "cluster.timeout_ms", "from 1"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\ntimeout_ms = nan\n', "cluster.timeout_ms", "from 1"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\ntimeout_ms = 1e9\n', "cluster.timeout_ms", "60000"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\nprefix = "a b"\n', "cluster.prefix", "printable"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\nprefix = ""\n', "cluster.prefix", "printable"),
        ('[cluster]\nredis = "env:R"\non_error = "open"\nonerror = "open"\n', "cluster.onerror", "on_error"),
        ('cluster = "redis://x"\n', "cluster", "a table"),
    ],
)
def test_mistakes_name_the_field_and_line(tmp_path: Path, body: str, field: str, part: str) -> None:
    caught = error(tmp_path, body)
    assert caught.field == field, str(caught)
    assert part in str(caught), str(caught)
    key = field.rpartition(".")[2]
    lines = body.splitlines()
    at = [n for n, line in enumerate(lines, start=1) if line.startswith(f"{key} =")]
    assert caught.line == (at[0] if at else 1), str(caught)  # a missing key: its table's line


EXAMPLE = Path(__file__).resolve().parents[2] / "skyproxy.toml.example"


def test_the_example_documents_cluster_with_its_defaults(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text.split("\n# [cluster]\n", 1)[1].split("\n\n", 1)[0]
    assignments = [line[2:] for line in block.splitlines() if re.fullmatch(r"# [a-z_]+ = .+", line)]
    for name in ("redis", "on_error", "timeout_ms", "prefix"):
        assert any(a.startswith(f"{name} = ") for a in assignments), f"[cluster] {name} is not in the example"
    settings = load(tmp_path, "[cluster]\n" + "\n".join(assignments) + "\n")
    assert settings == ClusterSettings(on_error="closed", redis=KeySpec("env", "SKYPROXY_REDIS_URL"))
    assert config.load(EXAMPLE, {}).cluster is None  # the quick start serves without it
