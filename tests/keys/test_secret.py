"""The Secret wrapper and fingerprints: a key shows only its fingerprint, wherever it goes."""

from __future__ import annotations

import copy
import hashlib
import logging
import pickle
import re

import pytest
from helpers import CANARY, assert_no_canary

from skyproxy.keys.secret import Secret, fingerprint

FINGERPRINT = re.compile(r"[0-9a-f]{8}\.\..{4}")


def test_fingerprint_format() -> None:
    fp = fingerprint(CANARY)
    assert FINGERPRINT.fullmatch(fp), fp
    assert fp == hashlib.sha256(CANARY.encode()).hexdigest()[:8] + ".." + CANARY[-4:]
    assert fp.endswith("..9d2e")


def test_fingerprints_differ_for_keys_with_the_same_ending() -> None:
    assert fingerprint("sk-aaaa-1234") != fingerprint("sk-bbbb-1234")
    assert fingerprint("sk-aaaa-1234")[-6:] == fingerprint("sk-bbbb-1234")[-6:] == "..1234"


def test_secret_shows_only_its_fingerprint() -> None:
    secret = Secret(CANARY)
    fp = fingerprint(CANARY)
    assert secret.fingerprint == fp
    assert repr(secret) == str(secret) == f"{secret}" == f"{secret!r}" == f"Secret({fp})"
    assert_no_canary(repr(secret), str(secret), f"{secret:}", repr([secret]), repr({"k": secret}))
    assert secret.reveal() == CANARY


def test_secret_in_a_log_record_and_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(CANARY)
    with caplog.at_level(logging.INFO):
        logging.getLogger("skyproxy.test").info("using %s / %r", secret, secret)
    try:
        raise ValueError(secret)
    except ValueError as exc:
        message = str(exc)
    assert_no_canary(caplog.text, message)
    assert fingerprint(CANARY) in caplog.text


def test_secret_cannot_be_pickled_or_copied() -> None:
    secret = Secret(CANARY)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        copy.copy(secret)
    with pytest.raises(AttributeError):
        secret.__dict__  # noqa: B018  slots: no dict to dump


def test_secret_equality_compares_values() -> None:
    assert Secret("sk-a-1") == Secret("sk-a-1")
    assert Secret("sk-a-1") != Secret("sk-a-2")
    assert Secret("sk-a-1") != "sk-a-1"
    assert len({Secret("sk-a-1"), Secret("sk-a-1")}) == 1
