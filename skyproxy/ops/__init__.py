"""Operations: the admin endpoints (/-/health, /-/status, /-/metrics, /-/reload) and the metrics."""
