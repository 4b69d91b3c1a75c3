"""The config file: one frozen, typed `Settings`, resolved and validated before anything binds.

`load(path)` returns one `Settings` or raises `ConfigError` naming the file, the line and
the field path. All validation lives here; nothing downstream re-checks the file. Every
default is written once, on the settings dataclasses.
"""

from skyproxy.config.parser import find_config, load, parse
from skyproxy.config.settings import (
    DEFAULT_UPSTREAM,
    LOOPBACK_NAMES,
    AuditSettings,
    Budget,
    ClusterSettings,
    EnvironmentSettings,
    IPNetwork,
    KeySpec,
    KeysSettings,
    Listen,
    MockSettings,
    Rate,
    RateLimitSettings,
    RateRule,
    ServerSettings,
    Settings,
    TargetPattern,
    TokensSettings,
    WebhookSettings,
)

__all__ = [
    "DEFAULT_UPSTREAM",
    "LOOPBACK_NAMES",
    "AuditSettings",
    "Budget",
    "ClusterSettings",
    "EnvironmentSettings",
    "IPNetwork",
    "KeySpec",
    "KeysSettings",
    "Listen",
    "MockSettings",
    "Rate",
    "RateLimitSettings",
    "RateRule",
    "ServerSettings",
    "Settings",
    "TargetPattern",
    "TokensSettings",
    "WebhookSettings",
    "find_config",
    "load",
    "parse",
]
