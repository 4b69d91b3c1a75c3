"""Both signatures: Skytells' hex HMAC checked on the way in, Standard Webhooks' made on the way out."""

from __future__ import annotations

import base64
import time

import pytest
from helpers import CANARY, assert_no_canary
from standardwebhooks import Webhook, WebhookVerificationError

from skyproxy.webhooks.signing import (
    SigningKeys,
    SigningSecret,
    new_secret,
    signature_header,
    skytells_signature,
    verify_skytells,
)

BODY = b'{"id":"p1","status":"succeeded"}'


def test_the_skytells_signature_is_the_hex_hmac_of_the_raw_body() -> None:
    import hashlib
    import hmac

    expected = hmac.new(CANARY.encode(), BODY, hashlib.sha256).hexdigest()
    assert skytells_signature(CANARY.encode(), BODY) == expected
    assert verify_skytells(BODY, expected, [CANARY.encode()])
    assert verify_skytells(BODY, expected.upper(), [CANARY.encode()])  # hex case does not matter


@pytest.mark.parametrize(
    "given",
    [
        None,
        "",
        "zz",
        "0" * 64,
        skytells_signature(b"another-key", BODY),
        skytells_signature(CANARY.encode(), BODY + b" "),
    ],
)
def test_a_missing_or_wrong_signature_is_refused(given: str | None) -> None:
    assert not verify_skytells(BODY, given, [CANARY.encode()])


def test_any_accepted_key_verifies() -> None:
    previous = b"sk-the-previous-key"
    given = skytells_signature(previous, BODY)
    assert verify_skytells(BODY, given, [CANARY.encode(), previous])
    assert not verify_skytells(BODY, given, [CANARY.encode()])


def test_the_relay_signature_verifies_with_the_standardwebhooks_package() -> None:
    text = new_secret()
    now = int(time.time())
    header = signature_header("msg_1", now, BODY, [SigningSecret(text)])
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
    assert Webhook(text).verify(BODY, headers) == {"id": "p1", "status": "succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(text).verify(BODY + b" ", headers)


def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    now = time.time()
    keys = SigningKeys(SigningSecret(new), SigningSecret(old), previous_until=now + 60)
    header = signature_header("msg_2", int(now), BODY, keys.active(now))
    assert len(header.split(" ")) == 2
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(int(now)), "webhook-signature": header}
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    assert keys.active(now + 61) == (keys.current,)  # the old one expires


@pytest.mark.parametrize(
    "text",
    [
        "secret",
        "whsec_***",
        "whsec_" + base64.b64encode(b"x" * 10).decode(),
        "whsec_" + base64.b64encode(b"x" * 65).decode(),
    ],
)
def test_bad_signing_secrets_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        SigningSecret(text)
    assert text not in str(caught.value) or text == "secret"


def test_unpadded_secrets_are_accepted_as_the_package_does() -> None:
    text = new_secret().rstrip("=")
    now = int(time.time())
    header = signature_header("m", now, BODY, [SigningSecret(text)])
    Webhook(text).verify(
        BODY, {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": header}
    )


def test_a_signing_secret_never_shows_itself() -> None:
    text = new_secret()
    secret = SigningSecret(text)
    shown = f"{secret} {secret!r} {SigningKeys(secret)!r}"
    assert text[6:] not in shown
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)
    assert_no_canary(shown)
