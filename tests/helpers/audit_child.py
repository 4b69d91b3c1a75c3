"""`python -m helpers.audit_child PATH`: a real AuditWriter (on_failure = "continue")
driven by JSON commands on stdin, one answer per line on stdout. See helpers.disks."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from helpers.audit import record
from skyproxy.audit import writer as audit
from skyproxy.audit.writer import AuditWriter
from skyproxy.config import AuditSettings


def main() -> None:
    audit.BACKOFF_MIN, audit.BACKOFF_MAX = 0.01, 0.05  # retry quickly, the test waits on it
    writer = AuditWriter(AuditSettings(path=Path(sys.argv[1]), max_bytes=0, on_failure="continue"))
    writer.start()
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for line in sys.stdin:
        command = json.loads(line)
        answer: dict[str, object] = {}
        if command["do"] == "limit":  # the most bytes a file may hold; None for no limit
            limit = command["bytes"]
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))
        elif command["do"] == "submit":
            answer["accepted"] = sum(writer.submit(record(i)) for i in range(*command["range"]))
        elif command["do"] == "close":
            answer["unwritten"] = writer.close(timeout=command["timeout"])
        answer.update(
            depth=writer.depth,
            healthy=writer.healthy,
            written=writer.written,
            write_failures=writer.write_failures,
            dropped=writer.dropped,
        )
        print(json.dumps(answer), flush=True)
        if command["do"] == "close":
            return


if __name__ == "__main__":
    main()
