"""The keyring store against a real Secret Service: round trips, and what each failure becomes.

The failures are real ones: a collection the Secret Service does not have, a session bus
that is not there, and keyring's own `fail` backend, which it picks when none is usable.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from helpers import CANARY, assert_no_canary

from skyproxy.config import KeySpec
from skyproxy.errors import KeySourceError, KeyStoreError
from skyproxy.keys import store
from skyproxy.keys.secret import Secret
from skyproxy.keys.sources import resolve

NAME = "store-test"
MISSING_COLLECTION = "/org/freedesktop/secrets/collection/skyproxy_test_missing"


@pytest.fixture
def keyring_clean(secret_service: dict[str, str]) -> Iterator[None]:
    store.delete(NAME)
    store.delete(f"{NAME}@previous")
    yield
    store.delete(NAME)
    store.delete(f"{NAME}@previous")


@pytest.fixture
def swap_backend(secret_service: dict[str, str]) -> Iterator[Callable[[object], None]]:
    """Installs another keyring backend for one test, then puts the Secret Service back."""
    import keyring

    previous = keyring.get_keyring()
    yield keyring.set_keyring
    keyring.set_keyring(previous)


def test_save_get_load_delete(keyring_clean: None) -> None:
    import keyring

    assert store.get(NAME) is None
    assert store.load(NAME) is None
    store.save(NAME, Secret(CANARY))
    assert keyring.get_password(store.SERVICE, NAME) == CANARY  # where other tools look for it
    assert store.get(NAME) == CANARY
    assert store.load(NAME) == Secret(CANARY)
    store.save(NAME, Secret("sk-other-1234"))  # replaces, never adds a second entry
    assert store.get(NAME) == "sk-other-1234"
    assert store.delete(NAME) is True
    assert store.get(NAME) is None


def test_deleting_a_missing_key_is_false_not_an_error(keyring_clean: None) -> None:
    assert store.delete(NAME) is False


def test_username_is_the_spec_argument_or_the_environment() -> None:
    assert store.username("dev", KeySpec("keyring")) == "dev"
    assert store.username("dev", KeySpec("keyring", "dev-user")) == "dev-user"


def _every_call() -> list[tuple[str, Callable[[], object]]]:
    return [
        ("get", lambda: store.get(NAME)),
        ("load", lambda: store.load(NAME)),
        ("save", lambda: store.save(NAME, Secret(CANARY))),
        ("delete", lambda: store.delete(NAME)),
    ]


@dataclass
class Failure:
    kind: type[BaseException]
    text: str
    quiet: bool  # the backend's own exception is not shown with ours
    reason: str = ""
    fix: str = ""


def failure_of(call: Callable[[], object]) -> Failure:
    """What `call` raised, copied out so that no reference to the backend's state survives.

    keyring's Secret Service backend leaves its D-Bus connection open when the collection
    is missing; it is collected here, where that ResourceWarning is expected, rather than
    in whichever test happens to run the garbage collector next.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            call()
        except Exception as exc:
            found = Failure(
                type(exc),
                str(exc),
                exc.__suppress_context__,
                getattr(exc, "reason", ""),
                getattr(exc, "fix", ""),
            )
        else:
            raise AssertionError("expected an error")
        gc.collect()
    return found


def missing_collection() -> object:
    from keyring.backends import SecretService

    backend = SecretService.Keyring()
    backend.preferred_collection = MISSING_COLLECTION
    return backend


def test_a_missing_collection_is_a_keyring_failure(swap_backend: Callable[[object], None]) -> None:
    swap_backend(missing_collection())
    for name, call in _every_call():
        failure = failure_of(call)
        assert failure.kind is store.KeyringFailed, name
        assert issubclass(failure.kind, KeyStoreError)
        assert failure.text.startswith("the keyring failed: InitError: "), name
        assert failure.quiet, name
        assert_no_canary(failure.text)


def test_a_missing_session_bus_is_a_keyring_failure(
    secret_service: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/skyproxy-test-bus")
    for name, call in _every_call():
        failure = failure_of(call)
        assert failure.kind is store.KeyringFailed, name
        assert failure.text.startswith("the keyring failed: "), name


def test_no_backend_is_keyring_unavailable(swap_backend: Callable[[object], None]) -> None:
    from keyring.backends import fail

    swap_backend(fail.Keyring())
    for name, call in _every_call():
        failure = failure_of(call)
        assert failure.kind is store.KeyringUnavailable, name
        assert failure.quiet, name
        assert "no keyring backend is available" in failure.text, name
        assert 'key = "credential:NAME"' in failure.text and 'key = "env:VAR"' in failure.text, name


def test_resolve_names_the_environment_and_the_fix_for_each_failure(
    swap_backend: Callable[[object], None],
) -> None:
    from keyring.backends import fail

    swap_backend(fail.Keyring())
    failure = failure_of(lambda: resolve("dev", KeySpec("keyring"), {}))
    assert failure.kind is KeySourceError
    assert failure.reason == "no keyring backend is available (a headless server has no Secret Service)"
    assert failure.fix == 'use key = "credential:dev" under systemd, or key = "env:VAR"'

    swap_backend(missing_collection())
    failure = failure_of(lambda: resolve("dev", KeySpec("keyring", "dev-user"), {}))
    assert failure.kind is KeySourceError
    assert "environment 'dev': key source 'keyring:dev-user'" in failure.text
    assert failure.reason.startswith("the keyring failed: InitError: ")
    assert failure.fix == "unlock the keyring, or use a credential: or env: source"
