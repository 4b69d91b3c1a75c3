"""The frozen settings a config file resolves to, and every default, written once."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ClientAuth = Literal["off", "optional", "required"]
BudgetSubject = Literal["user", "client", "environment"]
BudgetPeriod = Literal["day", "week", "month"]
KeyKind = Literal["keyring", "env", "file", "credential", "generated"]
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
DEFAULT_UPSTREAM = "https://api.skytells.ai"
DEFAULT_AUDIT_PATH = "audit/audit.jsonl"  # relative to the config file's folder
DEFAULT_TOKENS_PATH = "tokens.json"  # relative to the config file's folder
DEFAULT_WEBHOOK_STORE = "state/webhooks.sqlite3"  # relative to the config file's folder
SEARCH_PATH = (
    Path("skyproxy.toml"),
    Path("~/.config/skyproxy/skyproxy.toml"),
    Path("/etc/skyproxy/skyproxy.toml"),
)

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
PERIOD_LABELS = {"second": "sec", "minute": "min", "hour": "hour", "day": "day"}


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    def overlaps(self, other: Listen) -> bool:
        """Whether binding both would fail: one port on one address, or a wildcard covering one."""
        if self.port == 0 or self.port != other.port:
            return False
        return any(_one_socket(mine, theirs) for mine in self._addresses() for theirs in other._addresses())

    def _addresses(self) -> tuple[IPAddress, ...]:
        if self.host == "localhost":  # bound on both loopbacks, as getaddrinfo lists them
            return (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
        return (ipaddress.ip_address(self.host),)


def _one_socket(a: IPAddress, b: IPAddress) -> bool:
    # asyncio binds IPv6 listeners with IPV6_V6ONLY, so a wildcard covers its own family only.
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Where an environment's key comes from. Holds a location, never key material."""

    kind: KeyKind
    arg: str = ""

    def __str__(self) -> str:
        if self.kind == "generated":
            return "generated (mock)"
        return self.kind if not self.arg else f"{self.kind}:{self.arg}"


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    period: float
    unit: str

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"

    @property
    def label(self) -> str:
        """The short form used in client messages, such as `10/min`."""
        return f"{self.count}/{PERIOD_LABELS[self.unit]}"


@dataclass(frozen=True, slots=True)
class RateRule:
    name: str
    methods: frozenset[str]
    paths: tuple[str, ...]
    per_user: Rate | None
    per_environment: Rate | None
    max_wait: float = 0.0
    max_in_flight: int | None = None  # requests in flight per user; None: no cap

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        for pattern in self.paths:
            if pattern.endswith("*"):
                if path.startswith(pattern[:-1]):
                    return True
            elif path == pattern:
                return True
        return False


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    enabled: bool = True
    user_header: str = "X-User-Id"
    missing_user: Literal["reject", "shared"] = "reject"


@dataclass(frozen=True, slots=True)
class EnvironmentSettings:
    name: str
    listen: tuple[Listen, ...]
    upstream: str  # a base URL without /v1, or "mock"
    key: KeySpec
    rules: tuple[RateRule, ...]
    client_auth: ClientAuth = "off"
    webhook_secret: KeySpec | None = None  # enterprise mode's secret; None: webhooks are keyed by `key`

    @property
    def is_mock(self) -> bool:
        return self.upstream == "mock"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    dashboard_networks: tuple[IPNetwork, ...] = ()  # besides loopback, who may open /-/ and /-/api/
    max_body_bytes: int = 52_428_800
    upstream_timeout: float = 120.0  # until the upstream's answer head arrives
    idle_timeout: float = 60.0  # the longest silence inside a body, either way, once it flows
    connect_timeout: float = 10.0
    header_timeout: float = 10.0  # a new client connection's first request head must arrive in this
    keepalive_timeout: float = 30.0  # an idle client connection is closed after this
    max_connections: int = 10_000  # client connections per listener, lowered to fit the fd limit
    watch_config: bool = True
    scan_success_bodies: bool = True  # benchmark only: false leaves 2xx/3xx bodies unsearched
    shutdown_timeout: float = 30.0
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class AuditSettings:
    path: Path
    enabled: bool = True
    max_bytes: int = 10_485_760
    backup_count: int = 10
    rotate_daily: bool = False
    on_failure: Literal["continue", "reject"] = "continue"
    queue_size: int = 100_000


@dataclass(frozen=True, slots=True)
class KeysSettings:
    max_age_days: int = 90
    state_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MockSettings:
    delay: float = 2.0  # seconds from create until a polled prediction has succeeded


@dataclass(frozen=True, slots=True)
class TokensSettings:
    path: Path  # the hashed client tokens, managed by `skyproxy token`


@dataclass(frozen=True, slots=True)
class Budget:
    """A cap on spend in dollars per subject and calendar period (UTC)."""

    name: str
    per: BudgetSubject
    usd: float
    period: BudgetPeriod
    environments: frozenset[str] | None = None  # None: every environment
    warn_at: float | None = None  # a fraction of usd

    def applies_to(self, environment: str) -> bool:
        return self.environments is None or environment in self.environments


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """[cluster]: limits, budgets and webhook claims shared by replicas through one Redis."""

    on_error: Literal["closed", "open"]  # required: refuse (503) or serve when Redis fails
    redis: KeySpec | None = None  # where the URL comes from when it may hold a password
    redis_url: str = ""  # a literal URL, which never holds a password
    timeout_ms: float = 50.0  # the longest a request waits on Redis
    prefix: str = "skyproxy:"  # key namespace, so deployments can share one Redis


@dataclass(frozen=True, slots=True)
class TargetPattern:
    """An `allowed_targets` entry: a URL prefix whose port may be "*" (any port)."""

    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int | None  # None: any port
    path: str  # a prefix; "" matches every path

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{'*' if self.port is None else self.port}{self.path}"


DEFAULT_ALLOWED_TARGETS = (
    TargetPattern("http", "127.0.0.1", None, ""),
    TargetPattern("http", "localhost", None, ""),
    TargetPattern("http", "::1", None, ""),
)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    store: Path
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 8789),)
    public_url: str | None = None  # None: the first receiver address as bound, for local use
    signing_secret: KeySpec = KeySpec("keyring", "webhooks")
    allowed_targets: tuple[TargetPattern, ...] = DEFAULT_ALLOWED_TARGETS
    retry_schedule: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400)
    max_body_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True)
class Settings:
    path: Path
    server: ServerSettings
    environments: Mapping[str, EnvironmentSettings]
    rate_limit: RateLimitSettings
    audit: AuditSettings
    pricing: Mapping[str, float]
    keys: KeysSettings
    mock: MockSettings = field(default_factory=MockSettings)
    cluster: ClusterSettings | None = None
    webhooks: WebhookSettings | None = None  # None: creates pass through untouched
    tokens: TokensSettings | None = None  # None only for Settings built by hand
    budgets: tuple[Budget, ...] = ()

    @property
    def tokens_file(self) -> Path:
        if self.tokens is not None:
            return self.tokens.path
        return self.path.parent / DEFAULT_TOKENS_PATH

    @property
    def key_state_file(self) -> Path:
        return self.keys.state_file or self.audit.path.parent / "keys.json"


# The rule that applies when [rate_limit] lists none.
DEFAULT_RULE: dict[str, Any] = {
    "name": "predictions",
    "methods": ["POST"],
    "paths": ["/v1/predictions", "/v1/predict"],
    "per_user": "10/minute",
    "per_environment": "25/minute",
    "max_wait": 0,
}


def default_of(cls: type, name: str) -> Any:
    """A dataclass field's default: the one place each default is written."""
    return next(f.default for f in fields(cls) if f.name == name)
