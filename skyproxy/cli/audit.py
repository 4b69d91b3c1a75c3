"""`skyproxy audit summary`: the audit trail, grouped and totalled."""

from __future__ import annotations

import argparse
import sys

from skyproxy.cli.common import EXIT_CONFIG, EXIT_OK, load_settings


def cmd_audit_summary(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime, timezone

    from skyproxy.audit import summary

    settings = load_settings(args.config)
    since = None
    if args.since:
        try:
            since = summary.parse_since(args.since, datetime.now(timezone.utc))
        except ValueError as exc:
            print(f"skyproxy: --since: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    result = summary.summarize(summary.audit_files(settings.audit.path), since, args.by)
    if args.json:
        print(json.dumps(summary.to_json(result), indent=2))
    else:
        print(summary.format_table(result))
    return EXIT_OK
