"""The proxy path: dispatch, the handler (guard -> admit -> forward -> relay -> record), the guard,
limits, scrubbing, deadlines and error responses."""
