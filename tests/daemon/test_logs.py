"""Log line formats for a terminal and for journald, on real streams."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import pytest

from skyproxy.daemon.logs import configure_logging, is_journal_stream, syslog_priority

REPO = Path(__file__).resolve().parents[2]
PLAIN = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\S+) ([A-Z]+) (.*)")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[logging.Logger]:
    # configure_logging changes process-wide state; leaving it would hide the
    # skyproxy loggers from caplog in every test that runs after these.
    logger = logging.getLogger("skyproxy")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def journal_env(stream: TextIO) -> dict[str, str]:
    """$JOURNAL_STREAM as systemd sets it for a stderr that is this stream."""
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.fixture
def journal_file(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "journal-stream", "w+", encoding="utf-8") as f:
        yield f


def lines_of(f: TextIO) -> list[str]:
    f.flush()
    f.seek(0)
    return f.read().splitlines()


def test_plain_line_format() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf, environ={})
    logging.getLogger("skyproxy").warning("upstream slow: %d ms", 950)
    match = PLAIN.fullmatch(buf.getvalue().rstrip("\n"))
    assert match is not None, buf.getvalue()
    assert match.group(2, 3, 4) == ("skyproxy", "WARNING", "upstream slow: 950 ms")


def test_plain_timestamp_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zone far from UTC with a half-hour offset makes a local-time stamp
    # impossible to mistake for a UTC one.
    monkeypatch.setenv("TZ", "IST-5:30")  # POSIX form: needs no tzdata
    time.tzset()
    try:
        buf = io.StringIO()
        configure_logging(stream=buf, environ={})
        logging.getLogger("skyproxy").info("hello")
    finally:
        monkeypatch.undo()
        time.tzset()
    match = PLAIN.fullmatch(buf.getvalue().rstrip("\n"))
    assert match is not None, buf.getvalue()
    stamp = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60


def test_child_loggers_are_named() -> None:
    buf = io.StringIO()
    configure_logging(stream=buf, environ={})
    logging.getLogger("skyproxy.reload").info("kept old config")
    assert buf.getvalue().endswith(" skyproxy.reload INFO kept old config\n")


def test_level_filters() -> None:
    buf = io.StringIO()
    configure_logging("warning", stream=buf, environ={})
    log = logging.getLogger("skyproxy")
    log.info("hidden")
    log.warning("shown")
    assert "hidden" not in buf.getvalue()
    assert "shown" in buf.getvalue()


def test_level_is_case_insensitive() -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf, environ={})
    logging.getLogger("skyproxy").debug("detail")
    assert "skyproxy DEBUG detail" in buf.getvalue()


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        configure_logging("verbose", stream=io.StringIO(), environ={})


def test_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(environ={})
    logging.getLogger("skyproxy").error("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith(" skyproxy ERROR to stderr\n")


def test_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first, environ={})
    configure_logging(stream=second, environ={})
    configure_logging(stream=second, environ={})
    logging.getLogger("skyproxy").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert len(logging.getLogger("skyproxy").handlers) == 1


def test_keeps_handlers_it_does_not_own(restore_logger: logging.Logger) -> None:
    foreign = logging.StreamHandler(io.StringIO())
    restore_logger.addHandler(foreign)
    configure_logging(stream=io.StringIO(), environ={})
    configure_logging(stream=io.StringIO(), environ={})
    assert foreign in restore_logger.handlers
    assert len(restore_logger.handlers) == 2


def test_does_not_propagate_to_root() -> None:
    root_buf = io.StringIO()
    root_handler = logging.StreamHandler(root_buf)
    logging.getLogger().addHandler(root_handler)
    try:
        configure_logging(stream=io.StringIO(), environ={})
        logging.getLogger("skyproxy").warning("once only")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert root_buf.getvalue() == ""


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ],
)
def test_journal_priority_prefix(journal_file: TextIO, level: int, prefix: str) -> None:
    configure_logging("debug", stream=journal_file, environ=journal_env(journal_file))
    logging.getLogger("skyproxy").log(level, "message")
    name = logging.getLevelName(level)
    assert lines_of(journal_file) == [f"{prefix}skyproxy {name} message"]


def test_journal_traceback_lines_keep_priority(journal_file: TextIO) -> None:
    configure_logging(stream=journal_file, environ=journal_env(journal_file))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("skyproxy").exception("request failed")
    lines = lines_of(journal_file)
    assert lines[0] == "<3>skyproxy ERROR request failed"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_journal_stream_of_another_file_is_plain(journal_file: TextIO, tmp_path: Path) -> None:
    # The variable is inherited by children whose stderr went elsewhere.
    with open(tmp_path / "other", "w", encoding="utf-8") as other:
        configure_logging(stream=journal_file, environ=journal_env(other))
    logging.getLogger("skyproxy").info("hello")
    [line] = lines_of(journal_file)
    assert PLAIN.fullmatch(line), line


def test_is_journal_stream(journal_file: TextIO) -> None:
    assert is_journal_stream(journal_file, journal_env(journal_file))
    assert not is_journal_stream(journal_file, {})
    assert not is_journal_stream(journal_file, {"JOURNAL_STREAM": "0:0"})
    assert not is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "0:0"})


@pytest.mark.parametrize(
    ("levelno", "priority"),
    [(5, 7), (logging.INFO + 5, 6), (logging.WARNING + 1, 4), (logging.CRITICAL + 10, 2)],
)
def test_custom_levels_round_down(levelno: int, priority: int) -> None:
    assert syslog_priority(levelno) == priority


CHILD = """\
import logging
from skyproxy.daemon.logs import configure_logging
configure_logging()
logging.getLogger("skyproxy.upstream").error("upstream down")
"""


def run_child(extra_env: dict[str, str], stderr_fd: int) -> None:
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_fd,
        env=env,
        check=True,
        timeout=30,
    )


def read_pipe(read_fd: int) -> str:
    with os.fdopen(read_fd, encoding="utf-8") as r:
        return r.read()


def test_subprocess_under_journald() -> None:
    # As systemd starts a unit: stderr is a stream socket (here a pipe) and
    # JOURNAL_STREAM names that very stream.
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    try:
        run_child({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, write_fd)
    finally:
        os.close(write_fd)
    err = read_pipe(read_fd)
    assert err == "<3>skyproxy.upstream ERROR upstream down\n"
    assert not TIMESTAMP.search(err)


def test_subprocess_inheriting_journal_stream() -> None:
    # A shell in a terminal started as a user unit inherits JOURNAL_STREAM
    # while its stderr is something else: it must get readable lines.
    read_fd, write_fd = os.pipe()
    try:
        run_child({"JOURNAL_STREAM": "8:12345"}, write_fd)
    finally:
        os.close(write_fd)
    err = read_pipe(read_fd)
    match = PLAIN.fullmatch(err.rstrip("\n"))
    assert match is not None, err
    assert match.group(2, 3, 4) == ("skyproxy.upstream", "ERROR", "upstream down")


# -- forged lines ---------------------------------------------------------------------------

FORGED = "/v1/x\n2099-01-01T00:00:00.000Z skyproxy INFO forged line\r\x1b[2K\u2028"


def test_control_characters_in_a_message_cannot_start_a_line() -> None:
    buf = io.StringIO()
    configure_logging("info", stream=buf, environ={})
    logging.getLogger("skyproxy").warning("refused GET %s", FORGED)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(r"/v1/x\x0a2099-01-01T00:00:00.000Z skyproxy INFO forged line\x0d\x1b[2K\u2028")


def test_control_characters_are_escaped_for_journald_too(journal_file: TextIO) -> None:
    configure_logging(stream=journal_file, environ=journal_env(journal_file))
    logging.getLogger("skyproxy").warning("refused GET %s", FORGED)
    assert lines_of(journal_file) == [
        r"<4>skyproxy WARNING refused GET /v1/x\x0a2099-01-01T00:00:00.000Z skyproxy INFO forged line"
        r"\x0d\x1b[2K\u2028"
    ]


def test_a_percent_encoded_newline_in_a_refused_path_writes_one_line(tmp_path: Path, run_daemon) -> None:  # type: ignore[no-untyped-def]
    import socket as sockets

    from helpers import env_config, free_port, write_config

    port = free_port()
    daemon = run_daemon(write_config(tmp_path, env_config("mock", listen=f"127.0.0.1:{port}")), port)
    target = "/v1/x%0a2099-01-01T00:00:00.000Z%20skyproxy%20INFO%20forged%20line"
    with sockets.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
        assert conn.recv(65536).startswith(b"HTTP/1.1 403")
    deadline = time.monotonic() + 10
    while "host_not_allowed" not in daemon.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = [line for line in daemon.stderr().splitlines() if "host_not_allowed" in line]
    assert len(refused) == 1, daemon.stderr()
    assert r"/v1/x\x0a2099-01-01T00:00:00.000Z skyproxy INFO forged line" in refused[0]
    assert not any(line.startswith("2099-") for line in daemon.stderr().splitlines())
