"""`skyproxy budget show`: spend, reservations and limits per budget and subject."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from skyproxy.cli.common import EXIT_OK, load_settings, table


def register(sub: Any) -> None:
    budget = sub.add_parser("budget", help="spend budgets").add_subparsers(metavar="ACTION")
    p = budget.add_parser(
        "show", help="spent, reserved and limit per budget and subject, and when each resets"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_budget_show)


def cmd_budget_show(args: argparse.Namespace) -> int:
    from skyproxy.budgets import show

    settings = load_settings(args.config)
    source, rows = show.report(settings)
    if args.json:
        print(json.dumps({"source": source, "budgets": rows}, indent=2))
        return EXIT_OK
    if not settings.budgets:
        print(
            f"no [[budgets]] in {settings.path}: nothing is ever refused on budget grounds", file=sys.stderr
        )
        return EXIT_OK
    print(f"from the {source}", file=sys.stderr)
    lines = [("BUDGET", "PER", "SUBJECT", "SPENT_USD", "RESERVED_USD", "LIMIT_USD", "RESETS_AT")]
    for row in rows:
        lines.append(
            (
                str(row["budget"]),
                str(row["per"]),
                _shown(row["subject"]),
                f"{row['spent_usd']:.4f}",
                f"{row['reserved_usd']:.4f}",
                f"{row['limit_usd']:.2f}",
                str(row["resets_at"]),
            )
        )
    print(table(lines))
    if not rows:
        print("no spend yet in the current periods", file=sys.stderr)
    return EXIT_OK


def _shown(subject: object) -> str:
    if subject is None:
        return "-"
    text = str(subject)
    # Subjects can come from a request header: never let one move the cursor.
    return text if text.isprintable() else repr(text)[1:-1]
