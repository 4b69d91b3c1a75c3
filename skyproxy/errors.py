"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

from pathlib import Path


class SkyproxyError(Exception):
    """Base class for every error skyproxy reports to a user."""


class ConfigError(SkyproxyError):
    """An invalid config file: names the file, the line when known, and the field path."""

    def __init__(self, message: str, *, file: Path | str, line: int | None = None, field: str = "") -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class KeySourceError(SkyproxyError):
    """A key that cannot be resolved. The message never contains key material."""

    def __init__(self, environment: str, source: str, reason: str, fix: str = "") -> None:
        self.environment = environment
        self.source = source
        self.reason = reason
        self.fix = fix
        text = f"environment {environment!r}: key source {source!r}: {reason}"
        super().__init__(f"{text}; {fix}" if fix else text)


class KeyStoreError(SkyproxyError):
    """The keyring refused a write or delete."""
