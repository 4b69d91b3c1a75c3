"""The local dashboard at /-/: its data, built from the audit trail and the daemon's counters,
and the page's static files. Served by skyproxy.ops.dashboard."""
