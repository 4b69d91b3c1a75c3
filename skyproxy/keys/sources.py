"""Where keys come from: the keyring, an environment variable, a file or a systemd credential.

`resolve` returns the key as a `Secret`, or raises `KeySourceError` naming the environment,
the source tried and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from skyproxy.config import KeySpec
from skyproxy.errors import KeySourceError
from skyproxy.keys import store
from skyproxy.keys.secret import Secret, generate_mock_key

_PRINTABLE = re.compile(r"[\x21-\x7e]+")


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
        return f"run: skyproxy key set {store.username(environment, spec)}"
    if spec.kind == "env":
        return f"run: export {spec.arg}=... before starting skyproxy"
    if spec.kind == "file":
        return f"write the key to {spec.arg} (mode 0600)"
    return f"add LoadCredential={spec.arg}:/path (or LoadCredentialEncrypted=) to the unit"


def _from_keyring(environment: str, spec: KeySpec) -> str:
    username = store.username(environment, spec)
    try:
        value = store.get(username)
    except store.KeyringUnavailable:
        raise KeySourceError(
            environment,
            str(spec),
            "no keyring backend is available (a headless server has no Secret Service)",
            f'use key = "credential:{environment}" under systemd, or key = "env:VAR"',
        ) from None
    except store.KeyringFailed as exc:
        raise KeySourceError(
            environment, str(spec), str(exc), "unlock the keyring, or use a credential: or env: source"
        ) from None
    if value is None:
        raise KeySourceError(
            environment,
            str(spec),
            f'no key stored in the keyring (service "{store.SERVICE}", username "{username}")',
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
