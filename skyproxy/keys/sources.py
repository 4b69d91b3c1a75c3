"""Key sources, the `Secret` wrapper and fingerprints.

A key lives in exactly one `Secret`, whose repr and str show only its fingerprint, so an
f-string, a log line or a traceback can never carry key material by accident.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from skyproxy.config import KeySpec
from skyproxy.errors import KeySourceError, KeyStoreError

SERVICE = "skyproxy"
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def fingerprint(key: str) -> str:
    """First 8 hex digits of the sha256, two dots, the last 4 characters: `3f2a9c1e..a1b2`."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return f"{digest}..{key[-4:]}"


class Secret:
    """An API key. Only `reveal()` gives the value; everything else shows the fingerprint."""

    __slots__ = ("_value", "fingerprint")

    def __init__(self, value: str) -> None:
        self._value = value
        self.fingerprint = fingerprint(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")


def generate_mock_key() -> Secret:
    return Secret("sk-mock-" + secrets.token_urlsafe(24))


def resolve(environment: str, spec: KeySpec, environ: Mapping[str, str] = os.environ) -> Secret:
    """The key for an environment, or `KeySourceError` naming the source and the fix."""
    if spec.kind == "generated":
        return generate_mock_key()
    if spec.kind == "keyring":
        raw = _from_keyring(environment, spec)
    elif spec.kind == "env":
        raw = _from_env(environment, spec, environ)
    elif spec.kind == "file":
        raw = _from_file(environment, spec, Path(spec.arg))
    else:
        raw = _from_credential(environment, spec, environ)
    return _checked(environment, spec, raw)


def keyring_username(environment: str, spec: KeySpec) -> str:
    return spec.arg or environment


def _checked(environment: str, spec: KeySpec, raw: str) -> Secret:
    value = raw.strip()
    if not value:
        raise KeySourceError(environment, str(spec), "the key is empty", _fix(environment, spec))
    if not _PRINTABLE.fullmatch(value):
        # A key with spaces or control characters would corrupt the x-api-key header.
        raise KeySourceError(environment, str(spec), "the key contains whitespace or control characters")
    return Secret(value)


def _fix(environment: str, spec: KeySpec) -> str:
    if spec.kind == "keyring":
        return f"run: skyproxy key set {keyring_username(environment, spec)}"
    if spec.kind == "env":
        return f"run: export {spec.arg}=... before starting skyproxy"
    if spec.kind == "file":
        return f"write the key to {spec.arg} (mode 0600)"
    return f"add LoadCredential={spec.arg}:/path (or LoadCredentialEncrypted=) to the unit"


def _from_keyring(environment: str, spec: KeySpec) -> str:
    import keyring
    import keyring.errors

    username = keyring_username(environment, spec)
    try:
        value = keyring.get_password(SERVICE, username)
    except keyring.errors.NoKeyringError:
        raise KeySourceError(
            environment,
            str(spec),
            "no keyring backend is available (a headless server has no Secret Service)",
            f'use key = "credential:{environment}" under systemd, or key = "env:VAR"',
        ) from None
    except Exception as exc:  # backends raise many types; none carry key material
        raise KeySourceError(
            environment,
            str(spec),
            f"the keyring failed: {type(exc).__name__}: {exc}",
            "unlock the keyring, or use a credential: or env: source",
        ) from None
    if value is None:
        raise KeySourceError(
            environment,
            str(spec),
            f'no key stored in the keyring (service "{SERVICE}", username "{username}")',
            _fix(environment, spec),
        )
    return value


def _from_env(environment: str, spec: KeySpec, environ: Mapping[str, str]) -> str:
    value = environ.get(spec.arg)
    if not value:
        raise KeySourceError(
            environment,
            str(spec),
            f"environment variable ${spec.arg} is not set",
            _fix(environment, spec),
        )
    return value


def _from_file(environment: str, spec: KeySpec, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeySourceError(environment, str(spec), "file not found", _fix(environment, spec)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeySourceError(environment, str(spec), f"cannot read: {reason}") from None


def _from_credential(environment: str, spec: KeySpec, environ: Mapping[str, str]) -> str:
    folder = environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise KeySourceError(
            environment,
            str(spec),
            "$CREDENTIALS_DIRECTORY is not set (credential: works under systemd)",
            _fix(environment, spec),
        )
    path = Path(folder) / spec.arg
    if not path.is_file():
        raise KeySourceError(
            environment,
            str(spec),
            f"no credential {spec.arg!r} in $CREDENTIALS_DIRECTORY",
            _fix(environment, spec),
        )
    return _from_file(environment, spec, path)


# -- the keyring as a store ------------------------------------------------------------------


def store(username: str, key: str) -> None:
    import keyring
    import keyring.errors

    try:
        keyring.set_password(SERVICE, username, key)
    except keyring.errors.NoKeyringError:
        raise KeyStoreError(
            "no keyring backend is available; on a server use systemd credentials "
            '(key = "credential:NAME") or key = "env:VAR"'
        ) from None
    except Exception as exc:
        raise KeyStoreError(f"the keyring refused the key: {type(exc).__name__}: {exc}") from None


def load_stored(username: str) -> Secret | None:
    import keyring
    import keyring.errors

    try:
        value = keyring.get_password(SERVICE, username)
    except keyring.errors.NoKeyringError:
        raise KeyStoreError("no keyring backend is available") from None
    except Exception as exc:
        raise KeyStoreError(f"the keyring failed: {type(exc).__name__}: {exc}") from None
    return Secret(value) if value else None


def delete_stored(username: str) -> bool:
    import keyring
    import keyring.errors

    try:
        keyring.delete_password(SERVICE, username)
    except keyring.errors.PasswordDeleteError:
        return False
    except keyring.errors.NoKeyringError:
        raise KeyStoreError("no keyring backend is available") from None
    except Exception as exc:
        raise KeyStoreError(f"the keyring failed: {type(exc).__name__}: {exc}") from None
    return True
