"""The [tokens] and [[budgets]] tables, client_auth and max_in_flight: values and errors.

Each error names the field path and the line a user would edit, found by searching the
file text, so an off-by-one in the line lookup fails here.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import write_config

from skyproxy import config
from skyproxy.errors import ConfigError

DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'
PROD = '[environments.production]\nlisten = ["127.0.0.1:8788"]\nupstream = "mock"\n'
BUDGET = '[[budgets]]\nname = "{name}"\nper = "user"\nusd = 5.0\nperiod = "day"\n'


def load_error(tmp_path: Path, body: str) -> ConfigError:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    return caught.value


def assert_error(tmp_path: Path, body: str, field: str, needle: str, *parts: str) -> None:
    body = textwrap.dedent(body).lstrip()
    error = load_error(tmp_path, body)
    lines = [n for n, line in enumerate(body.splitlines(), start=1) if needle in line]
    assert len(lines) == 1, (needle, lines)
    assert error.field == field, str(error)
    assert error.line == lines[0], str(error)
    assert str(error).startswith(f"{(tmp_path / 'skyproxy.toml').resolve()}:{lines[0]}: {field}: ")
    for part in parts:
        assert part in str(error), str(error)


def test_defaults_nothing_is_required_or_capped(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, DEV), {})
    assert settings.environments["dev"].client_auth == "off"
    assert settings.budgets == ()
    assert settings.tokens_file == tmp_path / "tokens.json"
    assert all(rule.max_in_flight is None for rule in settings.environments["dev"].rules)


def test_every_key_is_read(tmp_path: Path) -> None:
    body = (
        DEV
        + 'client_auth = "required"\n'
        + PROD
        + 'client_auth = "optional"\n'
        + '[tokens]\nfile = "secrets/tokens.json"\n'
        + "[[rate_limit.rules]]\nname = 'p'\npaths = ['/v1/predictions']\nmax_in_flight = 4\n"
        + '[[budgets]]\nname = "daily-per-user"\nper = "user"\nusd = 5.0\nperiod = "day"\n'
        + 'environments = ["production"]\nwarn_at = 0.8\n'
        + '[[budgets]]\nname = "team"\nper = "environment"\nusd = 100\nperiod = "month"\n'
    )
    settings = config.load(write_config(tmp_path, body), {})
    assert settings.environments["dev"].client_auth == "required"
    assert settings.environments["production"].client_auth == "optional"
    assert settings.tokens_file == tmp_path / "secrets/tokens.json"
    assert settings.environments["dev"].rules[0].max_in_flight == 4
    daily, team = settings.budgets
    assert daily == config.Budget("daily-per-user", "user", 5.0, "day", frozenset({"production"}), 0.8)
    assert team == config.Budget("team", "environment", 100.0, "month", None, None)
    assert daily.applies_to("production") and not daily.applies_to("dev")
    assert team.applies_to("dev")


def test_an_environment_may_override_max_in_flight(tmp_path: Path) -> None:
    body = (
        DEV
        + "rate_limit = { max_in_flight = 1 }\n"
        + "[[rate_limit.rules]]\nname = 'p'\npaths = ['/v1/predictions']\nmax_in_flight = 4\n"
    )
    assert config.load(write_config(tmp_path, body), {}).environments["dev"].rules[0].max_in_flight == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300", '"5"', "true"])
def test_bad_budget_amounts_are_refused(tmp_path: Path, value: str) -> None:
    body = DEV + BUDGET.format(name="a") + BUDGET.format(name="b").replace("usd = 5.0", f"usd = {value}")
    assert_error(tmp_path, body, "budgets[1].usd", f"usd = {value}", "expected a number")


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('per = "team"', "budgets[0].per", '"user" or "client" or "environment"'),
        ('period = "year"', "budgets[0].period", '"day" or "week" or "month"'),
        ("warn_at = 1.5", "budgets[0].warn_at", "from 0 to 1"),
        ("warn_at = nan", "budgets[0].warn_at", "from 0 to 1"),
        ('environments = ["nowhere"]', "budgets[0].environments[0]", "no environment named 'nowhere'"),
        ("environments = []", "budgets[0].environments", "empty"),
        ("usd_per_day = 3", "budgets[0].usd_per_day", "unknown key"),
    ],
)
def test_bad_budget_fields_name_their_line(tmp_path: Path, line: str, field: str, message: str) -> None:
    key = line.split(" = ")[0]
    budget = "\n".join(x for x in BUDGET.format(name="a").splitlines() if not x.startswith(f"{key} ="))
    assert_error(tmp_path, DEV + budget + "\n" + line + "\n", field, line, message)


def test_a_budget_needs_its_four_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, DEV + '[[budgets]]\nname = "a"\nper = "user"\nperiod = "day"\n')
    assert error.field == "budgets[0]" and "usd" in error.message


def test_budget_names_are_unique_and_plain(tmp_path: Path) -> None:
    body = DEV + BUDGET.format(name="same") + BUDGET.format(name="same")
    error = load_error(tmp_path, body)
    assert error.field == "budgets[1].name" and "duplicate budget name 'same'" in str(error)
    assert error.line == 10  # the second budget's name line
    assert_error(tmp_path, DEV + BUDGET.format(name="two words"), "budgets[0].name", "two words")


def test_budgets_need_the_audit(tmp_path: Path) -> None:
    error = load_error(tmp_path, DEV + "[audit]\nenabled = false\n" + BUDGET.format(name="a"))
    assert error.field == "budgets" and "audit" in error.message


@pytest.mark.parametrize("value", ['"on"', "true", '"Required"'])
def test_client_auth_takes_three_words(tmp_path: Path, value: str) -> None:
    line = f"client_auth = {value}"
    assert_error(tmp_path, DEV + line + "\n", "environments.dev.client_auth", line, '"off" or "optional"')


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", ">= 1"), ("-2", ">= 1"), ("true", "an integer"), ("2.5", "an integer"), ("10000000", "from 1 to")],
)
def test_max_in_flight_is_a_positive_integer(tmp_path: Path, value: str, message: str) -> None:
    line = f"max_in_flight = {value}"
    body = DEV + f"[[rate_limit.rules]]\nname = 'p'\npaths = ['/v1/predictions']\n{line}\n"
    assert_error(tmp_path, body, "rate_limit.rules[0].max_in_flight", line, message)


def test_tokens_table_checks_its_keys(tmp_path: Path) -> None:
    assert_error(
        tmp_path, DEV + '[tokens]\npath = "t.json"\n', "tokens.path", 'path = "t.json"', "unknown key"
    )
    assert_error(tmp_path, DEV + '[tokens]\nfile = ""\n', "tokens.file", 'file = ""', "a file path")
