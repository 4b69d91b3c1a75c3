"""Shared state for several replicas, on Redis.

A leaf: it never imports the proxy handler or the daemon. The proxy talks to the
protocols in `backend`; `node.ClusterNode` bundles their Redis implementations.

- `url`: the Redis URL as a secret, shown as host and database only.
- `connection`: the pool, the timeout on every call, outages (logged once, probed back).
- `scripts`: the Lua scripts, each atomic and clocked by Redis `TIME`.
- `backend`: the protocols and the values they exchange.
- `rates`, `inflight`, `budgets`, `webhooks`: their Redis implementations.
- `batch`: releases and settles queued by callers that cannot await, sent in order.
- `outbox_view`: the shared webhook outbox as `skyproxy webhooks list` shows it.
- `errors`: `ClusterUnavailable`, which the proxy answers with 503 `limits_unavailable`.
"""
