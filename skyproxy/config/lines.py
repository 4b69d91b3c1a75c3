"""Where a field path stands in the config text, so that an error names the line to edit."""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
_ASSIGN = re.compile(r'^\s*("?)([A-Za-z0-9_.-]+)\1\s*=')


def line_of(text: str, field_path: str) -> int | None:
    """Best-effort line of a field path, so errors point at the line to edit."""
    parts = [p for p in re.split(r"\.(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", field_path) if p]
    if not parts:
        return None
    parts = [re.sub(r"\[\d+\]$", "", p).strip('"') for p in parts]
    table_index = _array_index(field_path)
    best: int | None = None
    current: list[str] = []
    seen_arrays: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = [p.strip().strip('"') for p in header.group(1).split(".")]
            if line.lstrip().startswith("[["):
                key = ".".join(current)
                seen_arrays[key] = seen_arrays.get(key, -1) + 1
                if table_index is not None and seen_arrays[key] != table_index:
                    current = ["<other>"]
            if current == parts:
                best = best or lineno
            continue
        assign = _ASSIGN.match(line)
        if assign:
            full = current + assign.group(2).split(".")
            if full == parts or (len(full) < len(parts) and parts[: len(full)] == full):
                return lineno
    return best


def _array_index(field_path: str) -> int | None:
    found = re.search(r"(?:rules|budgets)\[(\d+)\]", field_path)
    return int(found.group(1)) if found else None


def join_field(where: str, key: str) -> str:
    """`key` under `where` as a field path; a key that is not a bare TOML name is quoted."""
    if not where:
        return key
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{where}.{key}"
    return f'{where}."{key}"'
