"""Python bytecodes per request, per function: where a feature's cost sits.

callgrind counts instructions per C function, and in a Python program most of them are
the interpreter's, so it cannot say which Python function spent them. This counter can:
the target runs under `sys.settrace` with opcode events, and while a control file
exists each bytecode executed is counted against its function. The trace slows the
target many times over, so times mean nothing here; the counts are exact but for how
requests fall into loop turns (about 1% on a total, less per function).

    python -m bench --scenarios opcodes --no-save

counts skyproxy, skyproxy-priced and skyproxy-access (the instructions scenario's
configs) over `--instructions-requests` creates and as many gets, and prints what
tokens and a budget add, per function. With `--reference DIR`, that tree runs as
`reference` with skyproxy's config, and the comparison says where skyproxy's own
bytecodes went since (the reference is the base there). The runner starts a target as
`python -m bench.opcodes trace --control FILE -- PYTHON SCRIPT ARGS...`; FILE is created
to count and removed to stop, and the counts then land in FILE.json as
{"path:qualname": bytecodes}.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Env

TARGETS = ("skyproxy", "skyproxy-priced", "skyproxy-access")
TOP = 15  # functions printed per comparison


def trace(control: Path, argv: Sequence[str]) -> None:
    """Runs the script `argv` names in this process, counting bytecodes while `control` exists."""
    counts: Counter[CodeType] = Counter()
    counting = threading.Event()

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            counts[frame.f_code] += 1
        return local

    def new_frame(frame: FrameType, event: str, arg: object) -> Any:
        if not counting.is_set():
            return None
        frame.f_trace_opcodes = True
        return local

    def watch() -> None:
        while True:
            time.sleep(0.1)
            present = control.exists()
            if present and not counting.is_set():
                counts.clear()
                counting.set()
            elif not present and counting.is_set():
                counting.clear()
                _dump(dict(counts), control.with_name(control.name + ".json"))

    threading.Thread(target=watch, daemon=True).start()
    sys.settrace(new_frame)
    threading.settrace(new_frame)
    script = list(argv[1:] if Path(argv[0]).name.startswith("python") else argv)
    if script[:1] == ["-P"]:  # as python -P: this tree must not shadow the one on PYTHONPATH
        script = script[1:]
        sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    if script[:1] == ["-m"]:  # python -m MODULE ARGS
        sys.argv = [script[1], *script[2:]]
        runpy.run_module(script[1], run_name="__main__", alter_sys=True)
        return
    sys.argv = script
    runpy.run_path(script[0], run_name="__main__")


def _dump(counts: dict[CodeType, int], path: Path) -> None:
    named: dict[str, int] = {}
    for code, n in counts.items():
        where = code.co_filename.split("site-packages/")[-1]
        where = where.rsplit("/skyproxy/", 1)[-1]  # the package, even in a clone named skyproxy
        key = f"{where}:{getattr(code, 'co_qualname', code.co_name)}"
        named[key] = named.get(key, 0) + n
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(named))
    os.replace(part, path)


# -- the scenario (run from bench.run) -----------------------------------------------------


def scenario(env: Env) -> dict[str, Any]:
    """Bytecodes per create and per get for each target, and what each adds to skyproxy."""
    from bench import run

    requests = env.args.instructions_requests
    _, upstream_port, _ = run.start_upstream_fast(env, "upstream-fast")
    counts: dict[str, dict[str, dict[str, int]]] = {}
    targets = TARGETS + (("reference",) if env.args.reference else ())
    for name in targets:
        env.check_time(f"opcodes {name}", 300)
        try:
            counts[name] = _count(env, name, upstream_port, requests)
        finally:
            env.child_env.pop(run.TOKEN_ENV, None)
    out: dict[str, Any] = {"requests": requests, "per_request": {}, "added": {}}
    for name, kinds in counts.items():
        out["per_request"][name] = {k: round(sum(c.values()) / requests, 1) for k, c in kinds.items()}
    for name in TARGETS[1:]:
        out["added"][name] = {
            kind: _added(counts["skyproxy"][kind], counts[name][kind], requests) for kind in ("create", "get")
        }
    if "reference" in counts:  # what skyproxy runs beyond the reference, not the other way
        out["added"]["skyproxy over reference"] = {
            kind: _added(counts["reference"][kind], counts["skyproxy"][kind], requests)
            for kind in ("create", "get")
        }
    return out


def _count(env: Env, name: str, upstream_port: int, requests: int) -> dict[str, dict[str, int]]:
    from bench import run

    control = env.workdir / f"opcodes-{name}.on"
    dumped = control.with_name(control.name + ".json")
    wrap = [run.PYTHON, "-m", "bench.opcodes", "trace", "--control", str(control), "--"]
    proc, port, _ = run.start_skyproxy(
        env,
        f"{name}-opcodes",
        upstream_port,
        wrap=wrap,
        deadline_s=120.0,
        access=name == "skyproxy-access",
        extra=run.PRICING_CONFIG if name == "skyproxy-priced" else "",
        source=env.args.reference if name == "reference" else None,
    )
    url = f"http://127.0.0.1:{port}"
    found: dict[str, dict[str, int]] = {}
    try:
        for kind in ("create", "get"):  # warm up, not counted
            run._instruction_load(env, url, max(requests // 5, 100), 16, kind)
        for kind in ("create", "get"):
            dumped.unlink(missing_ok=True)
            control.touch()
            time.sleep(0.5)  # the watcher looks every 0.1 s
            run._instruction_load(env, url, requests, 16, kind)
            control.unlink()
            found[kind] = _wait_for(dumped)
    finally:
        control.unlink(missing_ok=True)
        env.procs.stop(proc)
    return found


def _wait_for(path: Path, deadline_s: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no opcode counts in {path} after {deadline_s:g} s")
        time.sleep(0.1)
    loaded: dict[str, int] = json.loads(path.read_text())
    return loaded


def _added(base: dict[str, int], other: dict[str, int], requests: int) -> dict[str, float]:
    """Bytecodes per request that `other` runs beyond `base`, per function, largest first."""
    moved = {key: (other.get(key, 0) - base.get(key, 0)) / requests for key in base.keys() | other.keys()}
    total = {"total": round(sum(moved.values()), 1)}
    ranked = sorted(moved.items(), key=lambda item: -abs(item[1]))
    return total | {key: round(value, 1) for key, value in ranked[: 2 * TOP] if abs(value) >= 0.5}


def report(result: dict[str, Any], p: Any) -> None:
    """The scenario's lines in the run's summary."""
    per = result.get("per_request", {})
    for name, kinds in per.items():
        p(f"{name}: {kinds.get('create', 0):,.0f} bytecodes per create, {kinds.get('get', 0):,.0f} per get")
    for name, kinds in result.get("added", {}).items():
        for kind, added in kinds.items():
            over = name if " over " in name else f"{name} over skyproxy"
            p(f"{over}, per {kind}: {added['total']:+,.0f} bytecodes")
            for key, value in list(added.items())[1 : TOP + 1]:
                p(f"    {value:+8.1f}  {key}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.opcodes")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("trace", help="run a script, counting bytecodes while --control exists")
    run.add_argument("--control", type=Path, required=True)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        parser.error("no command to run after --")
    trace(args.control, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
