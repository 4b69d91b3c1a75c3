"""`skyproxy serve` and `skyproxy check`."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

from skyproxy.cli.common import EXIT_KEY, EXIT_OK, load_settings, table
from skyproxy.cli.key import fingerprint_text, status_text
from skyproxy.cli.token import print_access_notes

if TYPE_CHECKING:
    from skyproxy.config import ClusterSettings


def cmd_serve(args: argparse.Namespace) -> int:
    # Until the event loop's handlers are in place, logrotate's SIGUSR1 or a reload's SIGHUP
    # would end the process (their default). Neither has anything to act on yet: the audit
    # file is not open, and the config is about to be read.
    for early in (signal.SIGUSR1, signal.SIGHUP):
        signal.signal(early, signal.SIG_IGN)
    from skyproxy.daemon.logs import configure_logging
    from skyproxy.daemon.notify import Notifier
    from skyproxy.daemon.supervisor import StartupError, Supervisor

    settings = load_settings(args.config)
    configure_logging(settings.server.log_level)
    notifier = Notifier.from_environ()
    supervisor = Supervisor(settings, notifier, own_process=True)  # a daemon's own process
    try:
        _run(supervisor.run(), settings.server.event_loop)
    except StartupError as exc:
        print(f"skyproxy: cannot start:\n{exc}", file=sys.stderr)
        return EXIT_KEY
    finally:
        if notifier:
            notifier.close()
    return EXIT_OK


def _run(coro: object, event_loop: str) -> None:
    import asyncio

    if event_loop != "asyncio":
        try:
            import uvloop

            uvloop.run(coro)  # type: ignore[arg-type]
            return
        except ImportError:
            if event_loop == "uvloop":
                raise SystemExit('skyproxy: event_loop = "uvloop" but uvloop is not installed') from None
    asyncio.run(coro)  # type: ignore[arg-type]


def cmd_check(args: argparse.Namespace) -> int:
    """Validates the config (a ConfigError exits 2 in main) and resolves every key."""
    from skyproxy.keys import ages
    from skyproxy.keys.status import key_statuses

    settings = load_settings(args.config)
    specs = {name: env.key for name, env in settings.environments.items()}
    statuses = key_statuses(specs, ages.read(settings.key_state_file), settings.keys.max_age_days)
    rows = [("ENVIRONMENT", "LISTEN", "UPSTREAM", "KEY SOURCE", "FINGERPRINT", "STATUS")]
    for status in statuses:
        env = settings.environments[status.environment]
        rows.append(
            (
                env.name,
                ",".join(str(x) for x in env.listen),
                env.upstream,
                str(env.key),
                fingerprint_text(status),
                status_text(status, problem_inline=False),
            )
        )
    print(f"config {settings.path}: valid")
    print(table(rows))
    for status in statuses:
        if status.problem is not None:
            print(f"  {status.environment}: {status.problem}")
    for env in settings.environments.values():
        for listen in env.listen:
            taken = _in_use(listen.host, listen.port)
            if taken:
                print(f"  {env.name}: {listen} is {taken} (is skyproxy already running? else change listen)")
    access_ok = print_access_notes(settings)
    cluster_ok = settings.cluster is None or _check_cluster(settings.cluster)
    return EXIT_OK if cluster_ok and access_ok and all(status.ok for status in statuses) else EXIT_KEY


def _check_cluster(cluster: ClusterSettings) -> bool:
    """One PING within timeout_ms; prints host and database only, never the URL."""
    import asyncio

    from skyproxy.cluster.errors import ClusterUnavailable
    from skyproxy.cluster.ping import ping
    from skyproxy.cluster.url import resolve_url
    from skyproxy.errors import KeySourceError

    try:
        url = resolve_url(cluster)
    except KeySourceError as exc:
        print(f"  cluster: cannot read the Redis URL from {exc.source}: {exc.reason}")
        return False
    try:
        seconds = asyncio.run(ping(url, cluster.timeout_ms))
    except ClusterUnavailable as exc:
        print(
            f"  cluster: Redis {url.shown} did not answer PING ({exc.reason}); on_error = {cluster.on_error}"
        )
        return False
    print(f"cluster: Redis {url.shown} answered PING in {seconds * 1000:.1f} ms")
    return True


def _in_use(host: str, port: int) -> str | None:
    """Whether binding would fail now; a running skyproxy makes its own addresses busy, so a note."""
    import errno
    import socket

    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
            try:
                probe.bind(address)
            except OSError as exc:
                return "already in use" if exc.errno == errno.EADDRINUSE else f"not bindable ({exc.strerror})"
    return None
