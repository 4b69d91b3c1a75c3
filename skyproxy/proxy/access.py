"""Who is asking, and may they: the client token, checked before any limit or budget.

A client presents its token the way Skytells SDKs present a key, `x-api-key: skp_...` or
`Authorization: Bearer skp_...`, so an app pointed at the proxy works unchanged. A value
that does not start with `skp_` is not a token (a placeholder key, say): it is ignored
where tokens are optional and counts as none where they are required. The token itself
is never echoed, logged or sent upstream: the forwarded head drops both headers.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import hdrs
from multidict import CIMultiDictProxy, istr

from skyproxy.proxy.guard import Refusal
from skyproxy.tokens.registry import Token, Tokens
from skyproxy.tokens.token import PREFIX

TOKEN_REQUIRED = Refusal(
    401,
    "token_required",
    "A client token is required: send it as x-api-key: skp_... or Authorization: Bearer skp_....",
)
INVALID_TOKEN = Refusal(401, "invalid_token", "The client token is not valid: unknown, revoked or expired.")
TOKEN_NOT_ALLOWED = Refusal(403, "token_not_allowed", "This client token may not use this environment.")
_X_API_KEY = istr("x-api-key")  # an istr is looked up without being case-folded again
# RFC 9110 11.6.1: a 401 names the scheme it wants.
CHALLENGE: Mapping[str, str] = {"WWW-Authenticate": 'Bearer realm="skyproxy"'}


def presented(headers: CIMultiDictProxy[str]) -> list[str]:
    """Every distinct token the request carries, in x-api-key or as a Bearer credential."""
    found: list[str] = []
    for value in headers.getall(_X_API_KEY, ()):
        value = value.strip()
        if value.startswith(PREFIX) and value not in found:
            found.append(value)
    for value in headers.getall(hdrs.AUTHORIZATION, ()):
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() == "bearer" and credential.startswith(PREFIX) and credential not in found:
            found.append(credential)
    return found


def authenticate(
    tokens: Tokens, required: bool, environment: str, headers: CIMultiDictProxy[str]
) -> Token | Refusal | None:
    """The request's token; a refusal; or None for a request without one where that is allowed."""
    keys = headers.getall(_X_API_KEY, ())
    if len(keys) == 1 and hdrs.AUTHORIZATION not in headers:  # the usual request, without the list
        value = keys[0].strip()
        if not value.startswith(PREFIX):
            return TOKEN_REQUIRED if required else None
    else:
        candidates = presented(headers)
        if not candidates:
            return TOKEN_REQUIRED if required else None
        if len(candidates) > 1:
            # Two different tokens: which identity was meant is unknowable, so neither is used.
            return INVALID_TOKEN
        value = candidates[0]
    token = tokens.verify(value)
    if token is None:
        return INVALID_TOKEN
    if environment not in token.environments:
        return TOKEN_NOT_ALLOWED
    return token


def dearest(pricing: Mapping[str, float]) -> float:
    """A create's reserved cost when its body streams on and its model cannot be known yet:
    the dearest price, so nothing slips under."""
    return max(pricing.values(), default=0.0)
