"""The secrets webhooks need, resolved before anything binds (blocking: call off the loop).

- Verifying Skytells: per environment, its `webhook_secret` when set, else its current
  key and, during a key rotation, the `ENV@previous` key kept in the keyring.
- Signing relays: the `whsec_` secret from `[webhooks] signing_secret`, and during its
  own 24 h rotation the previous one (`NAME@previous` in the keyring, `PATH.previous`
  for a file), whose rotation time the store keeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from skyproxy.config import KeySpec, Settings, WebhookSettings
from skyproxy.errors import KeySourceError, KeyStoreError, SkyproxyError
from skyproxy.keys import store as keyring_store
from skyproxy.keys.secret import Secret
from skyproxy.keys.sources import resolve
from skyproxy.webhooks.signing import SigningKeys, SigningSecret, new_secret

log = logging.getLogger("skyproxy")
ROTATION_GRACE = 86_400.0  # seconds the previous signing secret stays valid after a rotation
ROTATED_AT = "signing_secret_rotated_at"  # the store's meta entry
FIX = "run: skyproxy webhooks secret"


class SigningSecretError(KeySourceError):
    """The relay's signing secret cannot be resolved; names the source and the fix."""

    def __init__(self, source: str, reason: str, fix: str = "") -> None:
        super().__init__("webhooks", source, reason, fix)
        text = f"[webhooks] signing_secret {source!r}: {reason}"
        self.args = (f"{text}; {fix}" if fix else text,)

    def __str__(self) -> str:
        return str(self.args[0])


def verifiers(settings: Settings, keys: Mapping[str, Secret]) -> dict[str, tuple[Secret, ...]]:
    """Each environment's accepted webhook keys; `keys` are the environments' current keys."""
    result: dict[str, tuple[Secret, ...]] = {}
    for name, env in settings.environments.items():
        if env.webhook_secret is not None:
            result[name] = (resolve(name, env.webhook_secret),)
            continue
        accepted = [keys[name]]
        if env.key.kind == "keyring":
            previous = _previous_key(keyring_store.username(name, env.key))
            if previous is not None and previous != keys[name]:
                accepted.append(previous)
        result[name] = tuple(accepted)
    return result


def _previous_key(username: str) -> Secret | None:
    try:
        return keyring_store.load(f"{username}@previous")
    except KeyStoreError as exc:
        log.warning(
            "cannot read %s@previous from the keyring (%s): only the current key verifies", username, exc
        )
        return None


def signing_keys(webhooks: WebhookSettings, rotated_at: float | None) -> SigningKeys:
    spec = webhooks.signing_secret
    current = _signing(spec, _read(spec))
    previous = None
    if rotated_at is not None and spec.kind in ("keyring", "file"):
        text = _read_previous(spec)
        previous = _signing(spec, text) if text else None
    until = rotated_at + ROTATION_GRACE if rotated_at is not None else None
    return SigningKeys(current, previous, until)


def _read(spec: KeySpec) -> str:
    try:
        return resolve("webhooks", spec).reveal()
    except KeySourceError as exc:
        fix = FIX if spec.kind in ("keyring", "file") else exc.fix
        raise SigningSecretError(str(spec), exc.reason, fix) from None


def _signing(spec: KeySpec, text: str) -> SigningSecret:
    try:
        return SigningSecret(text)
    except ValueError as exc:
        raise SigningSecretError(str(spec), f"not a Standard Webhooks secret: {exc}", FIX) from None


def _read_previous(spec: KeySpec) -> str | None:
    try:
        if spec.kind == "keyring":
            found = keyring_store.load(f"{spec.arg}@previous")
            return found.reveal() if found else None
        return Path(spec.arg + ".previous").read_text(encoding="utf-8").strip() or None
    except (KeyStoreError, OSError):
        return None


# -- creating and rotating (the CLI) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    text: str  # the new secret, printed once so it can be given to the app
    stored: bool  # False for env: and credential: sources, which the user stores
    kept_previous: bool


def create(webhooks: WebhookSettings, rotate: bool) -> Created:
    """A new secret, stored where `signing_secret` points; `rotate` keeps the old one valid."""
    spec = webhooks.signing_secret
    text = new_secret()
    if spec.kind not in ("keyring", "file"):
        if rotate:
            raise SkyproxyError(
                f"signing_secret {spec} is managed outside skyproxy: rotate it there; "
                "both secrets cannot be sent at once from that source"
            )
        return Created(text, stored=False, kept_previous=False)
    old = _current_or_none(spec)
    if old is not None and not rotate:
        raise SkyproxyError(
            f"a signing secret is already stored in {spec}; use --rotate to replace it "
            "(the old one stays valid for 24 h)"
        )
    if old is not None:
        _write(spec, old, previous=True)
    _write(spec, text, previous=False)
    return Created(text, stored=True, kept_previous=old is not None)


def _current_or_none(spec: KeySpec) -> str | None:
    if spec.kind == "keyring":
        found = keyring_store.load(spec.arg)
        return found.reveal() if found else None
    try:
        return Path(spec.arg).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SkyproxyError(f"cannot read {spec.arg}: {exc.strerror}") from None


def _write(spec: KeySpec, text: str, *, previous: bool) -> None:
    if spec.kind == "keyring":
        keyring_store.save(f"{spec.arg}@previous" if previous else spec.arg, Secret(text))
        return
    path = Path(spec.arg + ".previous" if previous else spec.arg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    except OSError as exc:
        raise SkyproxyError(f"cannot write {path}: {exc.strerror}") from None
