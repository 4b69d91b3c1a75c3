"""skyproxy: keep Skytells API keys server-side, one per environment."""

__version__ = "0.1.0"
