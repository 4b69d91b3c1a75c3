"""The config file: real files on disk, errors that name file, line and field path.

Every error test checks the exact field path and the line a user would have to edit,
found by searching the file text, so an off-by-one in the line lookup fails here.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import VENV_BIN, skyproxy_command, write_config

from skyproxy import config
from skyproxy.config import KeySpec, Listen
from skyproxy.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "skyproxy.toml.example"

# A minimal valid environment, appended where a test needs one and does not care.
DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'


def load_error(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ if environ is not None else {})
    return caught.value


def line_of(path_or_text: Path | str, needle: str) -> int:
    """The 1-based line of the only line containing `needle`."""
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    found = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(found) == 1, f"{needle!r} found on lines {found}"
    return found[0]


def assert_error(
    tmp_path: Path,
    body: str,
    field: str,
    needle: str,
    *message_parts: str,
    environ: dict[str, str] | None = None,
) -> ConfigError:
    body = textwrap.dedent(body).lstrip()
    error = load_error(tmp_path, body, environ)
    path = (tmp_path / "skyproxy.toml").resolve()
    assert error.field == field, str(error)
    assert error.line == line_of(body, needle), str(error)
    text = str(error)
    assert text.startswith(f"{path}:{error.line}: {field}: "), text
    for part in message_parts:
        assert part in text, text
    return error


# -- the example -----------------------------------------------------------------------------


def test_example_file_loads() -> None:
    settings = config.load(EXAMPLE, {})
    assert list(settings.environments) == ["dev"]
    dev = settings.environments["dev"]
    assert dev.listen == (Listen("127.0.0.1", 8787),)
    assert dev.is_mock
    assert dev.key == KeySpec("generated")
    # No override: the per-user limit fires before the environment's, as the quick start shows.
    assert [(str(r.per_user), str(r.per_environment)) for r in dev.rules] == [("10/minute", "25/minute")]
    assert settings.audit.path == EXAMPLE.parent / "audit/audit.jsonl"
    assert settings.server.allowed_origins == frozenset()
    assert settings.pricing["truefusion-pro"] == 0.03


def test_example_passes_check(tmp_path: Path) -> None:
    result = _check(tmp_path, "-c", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"config {EXAMPLE}: valid" in result.stdout
    assert "127.0.0.1:8787" in result.stdout


def test_example_documents_every_server_setting() -> None:
    text = EXAMPLE.read_text()
    for name in config.ServerSettings.__dataclass_fields__:
        assert f"\n{name} = " in text, f"[server] {name} is not in the example"
    for name in config.AuditSettings.__dataclass_fields__:
        assert f"\n{name} = " in text, f"[audit] {name} is not in the example"


# -- unknown keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "needle", "suggestion"),
    [
        ("[server]\nwatch_confg = true\n" + DEV, "server.watch_confg", "watch_confg", "watch_config"),
        ("[sever]\nwatch_config = true\n" + DEV, "sever", "[sever]", "server"),
        (DEV + "upstrem = 'mock'\n", "environments.dev.upstrem", "upstrem", "upstream"),
        (DEV + "[audit]\nmax_byte = 1\n", "audit.max_byte", "max_byte", "max_bytes"),
        (
            DEV + "[[rate_limit.rules]]\nname = 'a'\npaths = ['/v1/x']\nper_usr = '1/second'\n",
            "rate_limit.rules[0].per_usr",
            "per_usr",
            "per_user",
        ),
        (
            DEV + "rate_limit = { per_enviroment = '5/minute' }\n",
            "environments.dev.rate_limit.per_enviroment",
            "per_enviroment",
            "per_environment",
        ),
        (DEV + "[keys]\nmax_age = 3\n", "keys.max_age", "max_age", "max_age_days"),
    ],
)
def test_unknown_key_names_field_and_suggests(
    tmp_path: Path, body: str, field: str, needle: str, suggestion: str
) -> None:
    assert_error(tmp_path, body, field, needle, "unknown key", f'did you mean "{suggestion}"?')


def test_unknown_key_without_a_close_match_lists_the_choices(tmp_path: Path) -> None:
    error = assert_error(tmp_path, "[server]\nzzzzzz = 1\n" + DEV, "server.zzzzzz", "zzzzzz", "unknown key")
    assert "expected one of:" in str(error) and "allowed_hosts" in str(error)


# -- file, line and field path ---------------------------------------------------------------


def test_bad_listen_names_file_line_and_field(tmp_path: Path) -> None:
    body = """\
        # leading comment lines shift the line number
        [server]
        watch_config = false

        [environments.dev]
        upstream = "mock"
        listen = ["8787"]
    """
    error = assert_error(tmp_path, body, "environments.dev.listen[0]", 'listen = ["8787"]')
    assert error.line == 7
    path = (tmp_path / "skyproxy.toml").resolve()
    assert str(error) == f'{path}:7: environments.dev.listen[0]: expected "host:port", got "8787"'


def test_error_points_at_the_right_environment(tmp_path: Path) -> None:
    body = """\
        [environments.dev]
        listen = ["127.0.0.1:8787"]
        upstream = "mock"

        [environments.prod]
        listen = ["127.0.0.1:8788", "localhost"]
        upstream = "mock"
    """
    assert_error(
        tmp_path, body, "environments.prod.listen[1]", '"127.0.0.1:8788", "localhost"', '"localhost"'
    )


def test_error_in_second_rule_points_at_its_table(tmp_path: Path) -> None:
    body = (
        DEV
        + "[[rate_limit.rules]]\nname = 'a'\npaths = ['/v1/a']\nper_user = '1/minute'\n"
        + "[[rate_limit.rules]]\nname = 'b'\npaths = ['/v1/b']\nper_user = '0/minute'\n"
    )
    assert_error(tmp_path, body, "rate_limit.rules[1].per_user", "0/minute", '"0/minute"')


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    body = "[server]\nwatch_config = false\nmax_body_bytes = = 3\n" + DEV
    error = load_error(tmp_path, body)
    assert error.line == 3
    text = str(error)
    assert text.startswith(f"{(tmp_path / 'skyproxy.toml')}:3: invalid TOML"), text
    assert "(at line" not in text  # said once, in the location


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml", {})


def test_no_environments_is_an_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nwatch_config = false\n")
    assert error.field == "environments"
    assert "at least one" in str(error)


# -- types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "field", "expected"),
    [
        ('max_body_bytes = "1000"', "server.max_body_bytes", 'expected an integer, got "1000"'),
        ("max_body_bytes = true", "server.max_body_bytes", "expected an integer, got true"),
        ("max_body_bytes = 1.5", "server.max_body_bytes", "expected an integer, got 1.5"),
        ("max_body_bytes = 0", "server.max_body_bytes", "expected an integer >= 1, got 0"),
        ('upstream_timeout = "30"', "server.upstream_timeout", 'expected a number, got "30"'),
        ("shutdown_timeout = false", "server.shutdown_timeout", "expected a number, got false"),
        ("shutdown_timeout = -1", "server.shutdown_timeout", "expected a number from 0 to 86400, got -1"),
        ('watch_config = "yes"', "server.watch_config", 'expected true or false, got "yes"'),
        ("watch_config = 1", "server.watch_config", "expected true or false, got 1"),
        (
            'allowed_hosts = "a.example"',
            "server.allowed_hosts",
            'expected a list of strings, got "a.example"',
        ),
        ("allowed_hosts = [1]", "server.allowed_hosts[0]", "expected a string, got 1"),
        ('event_loop = "trio"', "server.event_loop", 'got "trio"'),
        ('log_level = "loud"', "server.log_level", 'got "loud"'),
    ],
)
def test_type_errors(tmp_path: Path, setting: str, field: str, expected: str) -> None:
    body = f"[server]\n{setting}\n" + DEV
    assert_error(tmp_path, body, field, setting, expected)


def test_bool_is_not_an_integer_in_audit(tmp_path: Path) -> None:
    body = DEV + "[audit]\nbackup_count = true\n"
    assert_error(tmp_path, body, "audit.backup_count", "backup_count", "expected an integer, got true")


def test_environment_must_be_a_table(tmp_path: Path) -> None:
    assert_error(
        tmp_path, "[environments]\ndev = 3\n", "environments.dev", "dev = 3", "expected a table, got 3"
    )


# -- rates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["10/fortnight", "ten/minute", "0/minute", "10", "-1/second", "1.5/hour"])
def test_bad_rate_in_rule(tmp_path: Path, rate: str) -> None:
    body = DEV + f"[[rate_limit.rules]]\nname = 'r'\npaths = ['/v1/x']\nper_environment = '{rate}'\n"
    assert_error(
        tmp_path, body, "rate_limit.rules[0].per_environment", f"'{rate}'", '"N/second"', f'got "{rate}"'
    )


def test_rate_must_be_a_string(tmp_path: Path) -> None:
    body = DEV + "[[rate_limit.rules]]\nname = 'r'\npaths = ['/v1/x']\nper_user = 10\n"
    assert_error(tmp_path, body, "rate_limit.rules[0].per_user", "per_user = 10", "got 10")


def test_bad_rate_in_environment_override_names_the_environment(tmp_path: Path) -> None:
    body = DEV + 'rate_limit = { per_user = "10/fortnight" }\n'
    assert_error(tmp_path, body, "environments.dev.rate_limit.per_user", "fortnight", 'got "10/fortnight"')


def test_bad_max_wait_in_environment_override_names_the_environment(tmp_path: Path) -> None:
    body = DEV + 'rate_limit = { max_wait = "soon" }\n'
    assert_error(tmp_path, body, "environments.dev.rate_limit.max_wait", "soon", 'got "soon"')


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("5/second", 5, 1.0), ("10/minute", 10, 60.0), ("3/hours", 3, 3600.0), (" 7 / day ", 7, 86400.0)],
)
def test_good_rates(tmp_path: Path, text: str, count: int, period: float) -> None:
    body = DEV + f"[[rate_limit.rules]]\nname = 'r'\npaths = ['/v1/*']\nper_user = '{text}'\n"
    settings = config.load(write_config(tmp_path, body), {})
    rate = settings.environments["dev"].rules[0].per_user
    assert rate is not None and (rate.count, rate.period) == (count, period)


def test_override_applies_to_every_rule(tmp_path: Path) -> None:
    body = (
        DEV
        + 'rate_limit = { per_user = "99/hour" }\n'
        + "[[rate_limit.rules]]\nname = 'a'\npaths = ['/v1/a']\nper_user = '1/minute'\n"
        + "per_environment = '2/minute'\n"
        + "[[rate_limit.rules]]\nname = 'b'\npaths = ['/v1/b']\n"
    )
    rules = config.load(write_config(tmp_path, body), {}).environments["dev"].rules
    assert [str(r.per_user) for r in rules] == ["99/hour", "99/hour"]
    assert str(rules[0].per_environment) == "2/minute" and rules[1].per_environment is None


# -- origins, networks, listeners ------------------------------------------------------------


@pytest.mark.parametrize("origin", ["localhost:3000", "http://a.example/", "ftp://a.example", "http://"])
def test_bad_origin(tmp_path: Path, origin: str) -> None:
    body = f'[server]\nallowed_origins = ["http://ok.example", "{origin}"]\n' + DEV
    assert_error(
        tmp_path, body, "server.allowed_origins[1]", "allowed_origins", "an origin like", f'got "{origin}"'
    )


@pytest.mark.parametrize("origin", ["null", "*"])
def test_null_and_star_origins_are_never_allowed(tmp_path: Path, origin: str) -> None:
    body = f'[server]\nallowed_origins = ["{origin}"]\n' + DEV
    assert_error(tmp_path, body, "server.allowed_origins[0]", "allowed_origins", "never allowed")


def test_good_origins_are_lower_cased(tmp_path: Path) -> None:
    body = '[server]\nallowed_origins = ["http://LocalHost:3000", "https://app.example.com"]\n' + DEV
    settings = config.load(write_config(tmp_path, body), {})
    assert settings.server.allowed_origins == {"http://localhost:3000", "https://app.example.com"}


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "10.0.0.300/8", "corp-network", "::1/200"])
def test_bad_cidr(tmp_path: Path, cidr: str) -> None:
    body = f'[server]\nallowed_networks = ["{cidr}"]\n' + DEV
    assert_error(tmp_path, body, "server.allowed_networks[0]", "allowed_networks", "a CIDR", f'got "{cidr}"')


@pytest.mark.parametrize("address", ["0.0.0.0:8787", "192.168.1.5:8787", "[::]:8787"])
def test_non_loopback_listen_needs_allowed_networks(tmp_path: Path, address: str) -> None:
    body = f'[environments.dev]\nlisten = ["127.0.0.1:8786", "{address}"]\nupstream = "mock"\n'
    assert_error(tmp_path, body, "environments.dev.listen[1]", "listen =", "not loopback", "allowed_networks")
    allowed = '[server]\nallowed_networks = ["10.0.0.0/8", "fd00::/8"]\n' + body
    settings = config.load(write_config(tmp_path, allowed), {})
    assert len(settings.environments["dev"].listen) == 2
    assert settings.server.allowed_networks[0] == ipaddress.ip_network("10.0.0.0/8")


@pytest.mark.parametrize("address", ["localhost:8787", "[::1]:8787", "127.0.0.2:8787"])
def test_loopback_listen_needs_no_networks(tmp_path: Path, address: str) -> None:
    body = f'[environments.dev]\nlisten = ["{address}"]\nupstream = "mock"\n'
    listen = config.load(write_config(tmp_path, body), {}).environments["dev"].listen[0]
    assert listen.is_loopback and listen.port == 8787


@pytest.mark.parametrize(
    ("address", "got"),
    [("127.0.0.1:70000", "a port from 0 to 65535"), ("myhost:80", "an IP address or localhost")],
)
def test_bad_listen_values(tmp_path: Path, address: str, got: str) -> None:
    body = f'[environments.dev]\nlisten = ["{address}"]\nupstream = "mock"\n'
    assert_error(tmp_path, body, "environments.dev.listen[0]", "listen =", got)


def test_duplicate_listen_across_environments(tmp_path: Path) -> None:
    body = """\
        [environments.dev]
        listen = ["127.0.0.1:8787"]
        upstream = "mock"

        [environments.prod]
        upstream = "mock"
        listen = ["127.0.0.1:8790", "127.0.0.1:8787"]
    """
    assert_error(
        tmp_path,
        body,
        "environments.prod.listen[1]",
        '"127.0.0.1:8790", "127.0.0.1:8787"',
        "already used by dev",
    )


def test_same_port_on_different_hosts_is_fine(tmp_path: Path) -> None:
    body = (
        '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'
        '[environments.prod]\nlisten = ["127.0.0.2:8787"]\nupstream = "mock"\n'
    )
    assert set(config.load(write_config(tmp_path, body), {}).environments) == {"dev", "prod"}


# -- keys, paths and variables ---------------------------------------------------------------


def test_key_sources_parse(tmp_path: Path) -> None:
    body = """\
        [environments.a]
        listen = ["127.0.0.1:8001"]
        upstream = "https://api.skytells.ai/v1/"
        [environments.b]
        listen = ["127.0.0.1:8002"]
        key = "env:SKY_B"
        [environments.c]
        listen = ["127.0.0.1:8003"]
        key = "file:secrets/c.key"
        [environments.d]
        listen = ["127.0.0.1:8004"]
        key = "credential:d"
        [environments.e]
        listen = ["127.0.0.1:8005"]
        key = "keyring:other-user"
    """
    envs = config.load(write_config(tmp_path, body), {}).environments
    assert envs["a"].key == KeySpec("keyring") and envs["a"].upstream == "https://api.skytells.ai"
    assert envs["b"].key == KeySpec("env", "SKY_B")
    assert envs["c"].key == KeySpec("file", str(tmp_path.resolve() / "secrets/c.key"))
    assert envs["d"].key == KeySpec("credential", "d")
    assert envs["e"].key == KeySpec("keyring", "other-user")


def test_a_literal_key_in_the_config_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = "sk-live-0123456789abcdef0123"
    body = DEV + f'key = "{secret}"\n'
    error = assert_error(tmp_path, body, "environments.dev.key", "key =", "never the key itself")
    assert secret not in str(error) and secret[4:] not in str(error)


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "sky"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(
        folder,
        DEV.replace('upstream = "mock"', 'upstream = "mock"\nkey = "file:../dev.key"')
        + '[audit]\npath = "logs/audit.jsonl"\n[keys]\nstate_file = "state/keys.json"\n',
    )
    settings = config.load(Path(os.path.relpath(path, elsewhere)), {})
    base = folder.resolve()
    assert settings.path == path.resolve()
    assert settings.audit.path == base / "logs/audit.jsonl"
    assert settings.key_state_file == base / "state/keys.json"
    assert settings.environments["dev"].key.arg == str(base / "../dev.key")


def test_key_state_file_defaults_beside_the_audit_file(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, DEV + '[audit]\npath = "a/b.jsonl"\n'), {})
    assert settings.key_state_file == tmp_path.resolve() / "a" / "keys.json"


def test_variables_and_home_expand_in_paths(tmp_path: Path) -> None:
    body = DEV + '[audit]\npath = "${LOGS_DIRECTORY}/audit.jsonl"\n[keys]\nstate_file = "$STATE/k.json"\n'
    environ = {"LOGS_DIRECTORY": str(tmp_path / "logs"), "STATE": "/var/lib/sky"}
    settings = config.load(write_config(tmp_path, body), environ)
    assert settings.audit.path == tmp_path / "logs" / "audit.jsonl"
    assert settings.key_state_file == Path("/var/lib/sky/k.json")
    home = config.load(write_config(tmp_path, DEV + '[audit]\npath = "~/a.jsonl"\n'), {})
    assert home.audit.path == Path(os.path.expanduser("~/a.jsonl"))


def test_unset_variable_is_an_error(tmp_path: Path) -> None:
    body = DEV + '[audit]\npath = "${LOGS_DIRECTORY}/audit.jsonl"\n'
    assert_error(tmp_path, body, "audit.path", "LOGS_DIRECTORY", "$LOGS_DIRECTORY is not set")


def test_unset_variable_in_a_key_file_path_is_an_error(tmp_path: Path) -> None:
    body = DEV + 'key = "file:${KEYS}/dev"\n'
    assert_error(tmp_path, body, "environments.dev.key", "KEYS", "$KEYS is not set")


# -- search order and the CLI ----------------------------------------------------------------


def _check(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "SKYPROXY_CONFIG"}
    base["HOME"] = str(cwd / "home")  # keeps ~/.config/skyproxy out of the search
    return subprocess.run(
        [*skyproxy_command(), "check", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _named(folder: Path, name: str, port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, f'[environments.{name}]\nlisten = ["127.0.0.1:{port}"]\nupstream = "mock"\n')


def test_search_order_flag_then_variable_then_cwd(tmp_path: Path) -> None:
    flag = _named(tmp_path / "flag", "fromflag", 8001)
    variable = _named(tmp_path / "var", "fromvar", 8002)
    _named(tmp_path, "fromcwd", 8003)

    result = _check(tmp_path, "-c", str(flag), env={"SKYPROXY_CONFIG": str(variable)})
    assert result.returncode == 0, result.stderr
    assert "fromflag" in result.stdout and "fromvar" not in result.stdout

    result = _check(tmp_path, env={"SKYPROXY_CONFIG": str(variable)})
    assert result.returncode == 0, result.stderr
    assert "fromvar" in result.stdout and "fromcwd" not in result.stdout

    result = _check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fromcwd" in result.stdout
    assert str((tmp_path / "skyproxy.toml").resolve()) in result.stdout


def test_no_config_anywhere(tmp_path: Path) -> None:
    result = _check(tmp_path)
    assert result.returncode == 2
    assert "no config file found" in result.stderr
    assert "SKYPROXY_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[environments.dev]\nlisten = ["8787"]\nupstream = "mock"\n',
            ':2: environments.dev.listen[0]: expected "host:port", got "8787"',
        ),
        ("[server\n", ":1: invalid TOML"),
        ('[server]\nwatch_config = "no"\n' + DEV, ":2: server.watch_config: expected true or false"),
    ],
)
def test_cli_reports_config_errors_without_traceback(tmp_path: Path, body: str, expected: str) -> None:
    path = write_config(tmp_path, body, name="bad.toml")
    result = _check(tmp_path, "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("skyproxy: config error: "), result.stderr
    assert f"bad.toml{expected}" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, nothing else


def test_cli_missing_explicit_file(tmp_path: Path) -> None:
    result = _check(tmp_path, "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml: file not found" in result.stderr
    assert "cp skyproxy.toml.example skyproxy.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_variable_pointing_at_missing_file_is_not_skipped(tmp_path: Path) -> None:
    _named(tmp_path, "fromcwd", 8003)
    result = _check(tmp_path, env={"SKYPROXY_CONFIG": str(tmp_path / "gone.toml")})
    assert result.returncode == 2
    assert "gone.toml: file not found" in result.stderr


def test_console_script_is_installed() -> None:
    assert (VENV_BIN / "skyproxy").exists()


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    rule = '[[rate_limit.rules]]\nname = "predictions"\npaths = ["/v1/predictions"]\nper_user = "1/minute"\n'
    text = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n' + rule + rule
    path = tmp_path / "skyproxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.field == "rate_limit.rules[1].name"
    assert "duplicate rule name 'predictions'" in str(caught.value)
    assert caught.value.line == 9  # the second rule's name line


def test_an_omitted_field_takes_the_dataclass_default(tmp_path: Path) -> None:
    # Defaults are written once, on the settings dataclasses; the parser must not carry
    # its own copy that could drift.
    path = write_config(tmp_path, '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n')
    settings = config.load(path, {})
    assert settings.server == config.ServerSettings()
    assert settings.rate_limit == config.RateLimitSettings()
    assert settings.keys == config.KeysSettings()
    assert settings.mock == config.MockSettings()
    assert settings.audit == config.AuditSettings(path=tmp_path / "audit/audit.jsonl")
    assert settings.environments["dev"].rules[0].max_wait == 0.0


# -- numbers, names and addresses that used to slip through ----------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e300"])
@pytest.mark.parametrize(
    ("table", "key", "field"),
    [
        ("[server]\n{setting}\n" + DEV, "upstream_timeout", "server.upstream_timeout"),
        ("[server]\n{setting}\n" + DEV, "connect_timeout", "server.connect_timeout"),
        ("[server]\n{setting}\n" + DEV, "idle_timeout", "server.idle_timeout"),
        ("[server]\n{setting}\n" + DEV, "shutdown_timeout", "server.shutdown_timeout"),
        (DEV + "[mock]\n{setting}\n", "delay", "mock.delay"),
        (DEV + '[pricing]\n"truefusion-pro" = 1\n{setting}\n', "lumo", "pricing.lumo"),
        (
            DEV + "[[rate_limit.rules]]\nname = 'a'\npaths = ['/v1/x']\n{setting}\n",
            "max_wait",
            "rate_limit.rules[0].max_wait",
        ),
    ],
)
def test_non_finite_and_huge_numbers_are_refused(
    tmp_path: Path, table: str, key: str, field: str, value: str
) -> None:
    setting = f"{key} = {value}"
    error = assert_error(tmp_path, table.format(setting=setting), field, setting, "expected a number from")
    assert "Traceback" not in str(error)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_check_and_serve_exit_2_on_a_non_finite_timeout(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, f"[server]\nupstream_timeout = {value}\n" + DEV, name="bad.toml")
    for command in ("check", "serve"):
        result = subprocess.run(
            [*skyproxy_command(), command, "-c", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "bad.toml:2: server.upstream_timeout: expected a number from" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "upstream", ["https://api.example:99999", "http://api.example:0", "http://h:65536/v1"]
)
def test_upstream_port_out_of_range(tmp_path: Path, upstream: str) -> None:
    body = f'[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "{upstream}"\n'
    assert_error(tmp_path, body, "environments.dev.upstream", "upstream =", "a port from 1 to 65535")


@pytest.mark.parametrize(
    "upstream",
    [
        "http://user:hunter2secret@api.example",
        "https://hunter2secret@api.example/v1",
        "ftp://u:hunter2secret@x",
    ],
)
def test_upstream_userinfo_is_refused_without_echoing_it(tmp_path: Path, upstream: str) -> None:
    body = f'[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "{upstream}"\nkey = "env:K"\n'
    error = assert_error(tmp_path, body, "environments.dev.upstream", "upstream =", "user or password")
    assert "hunter2secret" not in str(error)


@pytest.mark.parametrize("name", ['["a"]', "1", "{ x = 1 }", "true"])
def test_a_rule_name_that_is_not_a_string(tmp_path: Path, name: str) -> None:
    body = DEV + f"[[rate_limit.rules]]\nname = {name}\npaths = ['/v1/x']\n"
    assert_error(tmp_path, body, "rate_limit.rules[0].name", f"name = {name}", "expected a rule name")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8787", "localhost:8787"),
        ("localhost:8787", "[::1]:8787"),
        ("0.0.0.0:8787", "127.0.0.1:8787"),
        ("[::]:8787", "[::1]:8787"),
    ],
)
def test_listen_addresses_that_cannot_both_bind(tmp_path: Path, first: str, second: str) -> None:
    body = (
        f'[server]\nallowed_networks = ["10.0.0.0/8"]\n'
        f'[environments.dev]\nlisten = ["{first}"]\nupstream = "mock"\n'
        f'[environments.prod]\nupstream = "mock"\nlisten = ["{second}"]\n'
    )
    assert_error(
        tmp_path, body, "environments.prod.listen[0]", f'listen = ["{second}"]', "already used by dev"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("127.0.0.1:0", "localhost:0"), ("0.0.0.0:8787", "[::1]:8787"), ("127.0.0.1:8787", "127.0.0.2:8787")],
)
def test_listen_addresses_that_can_both_bind(tmp_path: Path, first: str, second: str) -> None:
    body = (
        f'[server]\nallowed_networks = ["10.0.0.0/8"]\n'
        f'[environments.dev]\nlisten = ["{first}"]\nupstream = "mock"\n'
        f'[environments.prod]\nupstream = "mock"\nlisten = ["{second}"]\n'
    )
    assert set(config.load(write_config(tmp_path, body), {}).environments) == {"dev", "prod"}
