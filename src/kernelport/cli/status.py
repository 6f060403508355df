"""`kernelport status` and `kernelport models`: a running server, seen through its local socket."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from kernelport.client.client import Client
from kernelport.errors import KernelPortError


def status_table(c: Client, previous: dict[str, dict[str, int]] | None = None,
                 interval: float = 0.0) -> tuple[str, dict[str, dict[str, int]]]:
    """One view of every model: state, workers, requests, batches, mean batch size, waits that slept,
    and (with a previous view) rates over the interval."""
    status = c.server_status()
    rows = [("model", "state", "workers", "requests", "batches", "mean batch", "req/s", "slept", "reason")]
    now: dict[str, dict[str, int]] = {}
    for name in sorted(status):
        st = status[name]
        ctr = c.counters(name) if st["state"] == "READY" else {}
        now[name] = ctr
        claims, batches, rows_done = ctr.get("claims", 0), ctr.get("batches", 0), ctr.get("rows", 0)
        rate = ""
        if previous and name in previous and interval > 0:
            rate = f"{(claims - previous[name].get('claims', 0)) / interval:.0f}"
        slept = ctr.get("client_sleeps", 0) + ctr.get("worker_sleeps", 0)
        rows.append((name, st["state"], ",".join(str(p) for p in st["workers"]) or "-", str(claims), str(batches),
                     f"{rows_done / batches:.2f}" if batches else "-", rate, str(slept), st["reason"][:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines), now


def run_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket) as c:
            previous: dict[str, dict[str, int]] | None = None
            while True:
                text, previous_now = status_table(c, previous, args.interval)
                if args.watch:
                    sys.stdout.write("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + args.socket + "\n")
                print(text, flush=True)
                if not args.watch:
                    return 0
                previous = previous_now
                threading.Event().wait(args.interval)
    except KernelPortError as e:
        print(f"kernelport: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def run_models(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket) as c:
            if args.action == "list":
                for m in c.repository_index():
                    reason = f"  ({m['reason']})" if m["reason"] else ""
                    print(f"{m['name']:<24} {m['version'] or '-':<4} {m['state'] or 'NOT LOADED'}{reason}")
                return 0
            if not args.name:
                print(f"kernelport: models {args.action} needs a model name", file=sys.stderr)
                return 2
            (c.load_model if args.action == "load" else c.unload_model)(args.name)
            print(f"{args.action}ed {args.name}")
            return 0
    except KernelPortError as e:
        print(f"kernelport: {e}", file=sys.stderr)
        return 2
