"""The keyring as a key store: every keyring call, and what its failures mean, in one place.

Keys live under the service "skyproxy", one username per environment (or the name given
in `key = "keyring:NAME"`). The `keyring` package is imported on first use: it is slow to
import and only key commands and keyring-sourced environments need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

from skyproxy.config import KeySpec
from skyproxy.errors import KeyStoreError
from skyproxy.keys.secret import Secret

SERVICE = "skyproxy"


class KeyringUnavailable(KeyStoreError):
    """No keyring backend exists here: a headless server has no Secret Service."""


class KeyringFailed(KeyStoreError):
    """The keyring backend raised: locked, unreachable, or refusing."""


def username(environment: str, spec: KeySpec) -> str:
    """The keyring username an environment's key is stored under."""
    return spec.arg or environment


def get(name: str) -> str | None:
    """The stored value as it is, or None when nothing is stored under `name`."""
    with _keyring() as keyring:
        value: str | None = keyring.get_password(SERVICE, name)
    return value


def load(name: str) -> Secret | None:
    value = get(name)
    return Secret(value) if value else None


def save(name: str, key: Secret) -> None:
    with _keyring() as keyring:
        keyring.set_password(SERVICE, name, key.reveal())


def delete(name: str) -> bool:
    """Removes the key stored under `name`; False when there was none."""
    with _keyring() as keyring:
        try:
            keyring.delete_password(SERVICE, name)
        except keyring.errors.PasswordDeleteError:
            return False
    return True


@contextlib.contextmanager
def _keyring() -> Iterator[ModuleType]:
    import keyring
    import keyring.errors

    try:
        yield keyring
    except keyring.errors.NoKeyringError:
        raise KeyringUnavailable(
            "no keyring backend is available; on a server use systemd credentials "
            '(key = "credential:NAME") or key = "env:VAR"'
        ) from None
    except Exception as exc:  # backends raise many types; none carry key material
        raise KeyringFailed(f"the keyring failed: {type(exc).__name__}: {exc}") from None
