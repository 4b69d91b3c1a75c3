"""The proxy path: `dispatch` hands a request to `handler`, which runs
guard -> admit -> forward -> relay -> record.

- guard.py: host, origin and network checks; cors.py: CORS headers and preflights.
- limits.py: rate limits; body.py: the request body's terms (every 417 and 413).
- forward.py: the exchange upstream, under deadlines.py, with the head from headers.py.
- relay.py: the answer back to the client, the key masked in its head and every body
  (scrub.py); decoded.py: coded answers, decoded under a bound.
- record.py: metrics and audit lines; exchange.py: the values passed between the steps.
- runtime.py: the swappable generation a request runs under; responses.py: JSON errors.
"""
