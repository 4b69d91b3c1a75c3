"""`[server] dashboard_networks`: a CIDR list, empty by default, errors with file and line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from helpers import write_config

from skyproxy import config
from skyproxy.errors import ConfigError

ALLOWED = '[server]\nallowed_networks = ["10.0.0.0/8"]\n'
DEV = '[environments.dev]\nlisten = ["127.0.0.1:8787"]\nupstream = "mock"\n'


def test_dashboard_networks_default_to_none(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, DEV), {})
    assert settings.server.dashboard_networks == ()


def test_dashboard_networks_are_parsed(tmp_path: Path) -> None:
    body = ALLOWED + 'dashboard_networks = ["10.1.2.3", "fd00::/8"]\n' + DEV
    settings = config.load(write_config(tmp_path, body), {})
    assert settings.server.dashboard_networks == (
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "corp-network", "::1/200"])
def test_a_bad_dashboard_network_names_file_line_and_field(tmp_path: Path, cidr: str) -> None:
    body = ALLOWED + f'dashboard_networks = ["10.0.0.0/8", "{cidr}"]\n' + DEV
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    error = caught.value
    assert error.field == "server.dashboard_networks[1]"
    assert error.line == 3
    assert "a CIDR" in str(error) and f'"{cidr}"' in str(error)
    assert str(path.resolve()) in str(error)


def test_dashboard_networks_must_be_strings(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\ndashboard_networks = [10]\n" + DEV)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    assert caught.value.field == "server.dashboard_networks[0]"
