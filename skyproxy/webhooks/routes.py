"""The create's side of webhooks: check the app's URL, record a route, point Skytells at us.

The route is committed before the create goes upstream, since a fast prediction may call
back before the create's own answer arrives. Only bodies that mention `"webhook"` are
parsed; every other create passes through as the bytes it arrived as.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from skyproxy.config import TargetPattern
from skyproxy.webhooks import targets
from skyproxy.webhooks.store import Route, Store, StoreThread, new_route_id

if TYPE_CHECKING:
    from skyproxy.webhooks.shared import SharedWebhooks

MARKER = b'"webhook"'


class TargetNotAllowed(Exception):
    """The create's webhook URL is outside `allowed_targets`; the upstream is not contacted."""


@dataclass(frozen=True, slots=True)
class RouteBook:
    db: StoreThread
    public_url: str  # no trailing slash
    allowed_targets: tuple[TargetPattern, ...]
    shared: SharedWebhooks | None = None  # with [cluster]: every replica's receiver knows the route

    async def rewrite_create(self, body: bytes, environment: str, user: str | None, request_id: str) -> bytes:
        """The body to send upstream: the same bytes, or the webhook URL replaced by a route's."""
        if body.find(MARKER) < 0:  # not `in`: on bytes it tries the operand as an int first
            return body
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body  # not JSON: the upstream answers it as it would
        found = _webhook(document)
        if found is None:
            return body
        url, events = found
        if url == self.public_url or url.startswith(self.public_url + "/"):
            return body  # already ours
        if not targets.allowed(url, self.allowed_targets):
            raise TargetNotAllowed(url)
        route = Route(new_route_id(), environment, url, events, user, request_id, time.time())
        await self.db.run(Store.add_route, route)
        if self.shared is not None:
            await self.shared.share_route(route)
        ours = f"{self.public_url}/hooks/{environment}/{route.id}"
        if isinstance(document["webhook"], str):
            document["webhook"] = ours
        else:
            document["webhook"]["url"] = ours
        return orjson.dumps(document)


def _webhook(document: Any) -> tuple[str, tuple[str, ...] | None] | None:
    """The webhook URL and events a create asks for, in the string or the object form."""
    if not isinstance(document, dict):
        return None
    webhook = document.get("webhook")
    if isinstance(webhook, str) and webhook:
        filter_ = document.get("webhook_events_filter")
        return webhook, _strings(filter_)
    if isinstance(webhook, dict) and isinstance(webhook.get("url"), str) and webhook["url"]:
        return webhook["url"], _strings(webhook.get("events"))
    return None


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None
