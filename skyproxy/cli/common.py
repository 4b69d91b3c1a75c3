"""What the commands share: exit codes, finding the config, printing a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyproxy.config import Settings

EXIT_OK, EXIT_KEY, EXIT_CONFIG = 0, 1, 2


def load_settings(path: str | None) -> Settings:
    """The config at `path`, or the one found in the usual places."""
    from skyproxy import config

    return config.load(config.find_config(path))


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
