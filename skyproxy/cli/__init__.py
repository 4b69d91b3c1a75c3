"""The command line: serve, check, key, audit. The only place that prints and exits."""
