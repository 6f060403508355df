"""What serving /metrics under load costs: add_sub throughput at concurrency 16, with and without a scraper.

    python bench/metrics_overhead.py                    # 4 pairs of 10 s runs; table to stdout, JSON to bench/results/
    python bench/metrics_overhead.py --pairs 2 --duration 5 --json /tmp/x.json    # a quicker look

The script starts its own server (`kernelport serve --http-port`) over a temp example repository, and
`--processes` (16) spawned client processes doing batch-1 add_sub requests through the local client's copy
form (`Client.infer`), as `bench/latency.py`'s concurrency rows do (its `ClientPool`). Runs alternate
A (no scraper) and B (a thread in this process GETs /metrics every `--interval`, 100 ms), A/B/A/B..., each
after its own warm-up, so that the machine's drift hits both kinds alike; the spread between runs of the
same kind is the noise to read the difference against.

The figure: (median B throughput - median A throughput) / median A throughput. The issue's bar is < 3 %.
Also recorded per run: p50/p99 latency, the scrapes done and their latency, the CPU the server process used
(where the scrapes are served), the CPU of the scraping thread (here on the same machine, unlike a real
Prometheus: its cost is part of the difference), and the share of the machine's CPU other processes used.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import kernelport
from _bench_clients import LoadRun, Target
from kernelport import Client
from kernelport.server.process import ServerProcess, free_port
from latency import ClientPool, ForeignLoad, percentiles_us

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL = "add_sub"


@dataclass
class Run:
    index: int
    mode: str  # "A" (no scraper) or "B" (scraping /metrics)
    throughput_per_s: float
    requests: int
    p50_us: float
    p99_us: float
    errors: dict[str, int]
    scrapes: int = 0
    scrape_p50_ms: float | None = None
    scrape_max_ms: float | None = None
    scrape_bytes: int | None = None
    server_cpu_cores: float | None = None
    scraper_cpu_cores: float | None = None
    others_cpu: float | None = None


@dataclass
class Result:
    started: str
    machine: dict[str, Any]
    args: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Server(ServerProcess):
    """`kernelport serve` with HTTP on a free port, in a subprocess."""

    def __init__(self, repository: str, socket_path: str) -> None:
        self.port = free_port()
        super().__init__(repository, socket_path, "--http-port", str(self.port), start_timeout=120)

    def cpu_seconds(self) -> float:
        """utime + stime of the server process itself (not its workers): where /metrics is served."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Scraper:
    """GET /metrics every `interval` seconds until stopped; records each scrape's latency."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.latencies: list[float] = []
        self.size = 0
        self.cpu_s = 0.0  # CPU time of the scraping thread itself (it shares the machine with the run)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        next_at = time.monotonic()
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as r:
                self.size = len(r.read())
            self.latencies.append(time.perf_counter() - t0)
            self.cpu_s = time.thread_time() - cpu0
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def run_once(index: int, mode: str, pool: ClientPool, job: LoadRun, server: Server, interval: float) -> Run:
    scraper = Scraper(f"http://127.0.0.1:{server.port}/metrics", interval) if mode == "B" else None
    marks: dict[str, Any] = {}

    def at_start() -> None:  # every client warm, none timing yet
        marks["cpu"] = server.cpu_seconds()
        marks["t"] = time.monotonic()
        marks["foreign"] = ForeignLoad()
        if scraper is not None:
            scraper.start()

    try:
        results = pool.run(job, at_start)
    finally:
        if scraper is not None:
            scraper.stop()
    wall = time.monotonic() - marks["t"]
    cpu = (server.cpu_seconds() - marks["cpu"]) / wall if wall > 0 else None
    lat = np.concatenate([lat for _, _, lat, _ in results])
    span = (max(end for _, end, _, _ in results) - min(start for start, _, _, _ in results)) / 1e9
    errors: dict[str, int] = {}
    for _, _, _, errs in results:
        for k, v in errs.items():
            errors[k] = errors.get(k, 0) + v
    p50, p99 = percentiles_us(lat) if len(lat) else (float("nan"), float("nan"))
    run = Run(index, mode, len(lat) / span if span > 0 else 0.0, len(lat), p50, p99, errors,
              server_cpu_cores=cpu, others_cpu=marks["foreign"].fraction())
    if scraper is not None and scraper.latencies:
        ms = np.array(scraper.latencies) * 1e3
        run.scrapes, run.scrape_p50_ms, run.scrape_max_ms = len(ms), float(np.median(ms)), float(ms.max())
        run.scrape_bytes = scraper.size
        run.scraper_cpu_cores = scraper.cpu_s / wall if wall > 0 else None
    return run


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    a = [r.throughput_per_s for r in runs if r.mode == "A"]
    b = [r.throughput_per_s for r in runs if r.mode == "B"]
    ma, mb = float(np.median(a)), float(np.median(b))
    pairs = [(runs[i].throughput_per_s, runs[i + 1].throughput_per_s) for i in range(0, len(runs) - 1, 2)]
    # Two rougher estimates for a shared machine, where other tenants' CPU use moves throughput most:
    # (1) throughput per share of the machine left to us, throughput / (1 - others' CPU share), a first-order
    # model of a CPU-bound run (not validated beyond that); (2) the CPU the scraping costs (the server's extra
    # CPU in B runs, plus the scraping thread's), as a share of the machine's CPUs: an upper bound of the
    # throughput lost if the run is CPU-bound and nothing else about it changes.
    def normalized(mode: str) -> list[float]:
        return [r.throughput_per_s / (1 - r.others_cpu) for r in runs
                if r.mode == mode and r.others_cpu is not None and r.others_cpu < 0.95]

    na, nb = normalized("A"), normalized("B")
    mna, mnb = (float(np.median(na)) if na else None), (float(np.median(nb)) if nb else None)
    server_a = [r.server_cpu_cores for r in runs if r.mode == "A" and r.server_cpu_cores is not None]
    server_b = [r.server_cpu_cores for r in runs if r.mode == "B" and r.server_cpu_cores is not None]
    scraper = [r.scraper_cpu_cores for r in runs if r.mode == "B" and r.scraper_cpu_cores is not None]
    cost = None
    if server_a and server_b and scraper:
        cost = (float(np.median(server_b)) - float(np.median(server_a)) + float(np.median(scraper))) / (
            os.cpu_count() or 1)
    return {
        "median_a_per_s": ma,
        "median_b_per_s": mb,
        "difference": (mb - ma) / ma if ma else None,  # negative: slower while scraped
        "pair_differences": [(y - x) / x for x, y in pairs if x],
        "spread_a": (max(a) - min(a)) / ma if ma else None,  # the noise between runs of the same kind
        "spread_b": (max(b) - min(b)) / mb if mb else None,
        "runs_per_mode": len(a),
        "median_a_normalized": mna,
        "median_b_normalized": mnb,
        "difference_normalized": (mnb - mna) / mna if mna and mnb else None,
        "scrape_cpu_share_of_machine": cost,
    }


def format_table(runs: Sequence[Run], summary: dict[str, Any]) -> str:
    lines = [f"{'run':>3} {'mode':4} {'inf/s':>9} {'p50 us':>8} {'p99 us':>9} {'scrapes':>7} {'scrape p50':>10} "
             f"{'server cores':>12} {'scraper cores':>13} {'others cpu':>10} errors"]
    for r in runs:
        lines.append(
            f"{r.index:>3} {r.mode:4} {r.throughput_per_s:9.0f} {r.p50_us:8.1f} {r.p99_us:9.1f} {r.scrapes:>7} "
            f"{'' if r.scrape_p50_ms is None else f'{r.scrape_p50_ms:.1f} ms':>10} "
            f"{'' if r.server_cpu_cores is None else f'{r.server_cpu_cores:.3f}':>12} "
            f"{'' if r.scraper_cpu_cores is None else f'{r.scraper_cpu_cores:.3f}':>13} "
            f"{'' if r.others_cpu is None else f'{r.others_cpu:.0%}':>10} {sum(r.errors.values()) or ''}")
    s = summary
    lines += [
        "",
        f"median A (no scraper): {s['median_a_per_s']:.0f} inf/s; median B (/metrics every 100 ms): "
        f"{s['median_b_per_s']:.0f} inf/s",
        f"difference B vs A: {s['difference']:+.1%} (per pair: "
        + ", ".join(f"{d:+.1%}" for d in s["pair_differences"]) + ")",
        f"noise: spread of A runs {s['spread_a']:.1%}, of B runs {s['spread_b']:.1%} ({s['runs_per_mode']} each)",
    ]
    if s["difference_normalized"] is not None:
        lines.append(f"per share of the machine left to us (throughput / (1 - others' CPU)): "
                     f"B vs A {s['difference_normalized']:+.1%}")
    if s["scrape_cpu_share_of_machine"] is not None:
        lines.append(f"CPU the scraping costs (server's extra + scraper thread): "
                     f"{s['scrape_cpu_share_of_machine']:.2%} of the machine's {os.cpu_count()} CPUs")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="A/B pairs (runs alternate A, B, A, B, ...)")
    p.add_argument("--duration", type=float, default=10.0, help="timed seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run (not timed)")
    p.add_argument("--processes", type=int, default=16, help="client processes")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between scrapes in B runs")
    p.add_argument("--json", help="where to write the JSON (default: bench/results/metrics_overhead-<time>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    json_path = args.json or os.path.join(BENCH_DIR, "results", f"metrics_overhead-{started:%Y%m%dT%H%M%SZ}.json")
    from kernelport.examples import build_example_repository

    result = Result(started.isoformat(), {
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "kernelport": getattr(kernelport, "__version__", ""), "loadavg_before": list(os.getloadavg()),
    }, vars(args))
    with tempfile.TemporaryDirectory(prefix="kp-metrics-bench-") as tmp:
        repo = os.path.join(tmp, "repo")
        build_example_repository(repo)
        server = Server(repo, os.path.join(tmp, "kp.sock"))
        pool: ClientPool | None = None
        try:
            with Client(server.socket_path) as c:
                info = c.model_metadata(MODEL)
            pool = ClientPool(Target(server.socket_path), args.processes, timeout=60.0)
            job = LoadRun("local-copy", MODEL, dict(info), args.warmup, args.duration, barrier_timeout_s=120.0)
            for i in range(2 * args.pairs):
                mode = "AB"[i % 2]
                run = run_once(i + 1, mode, pool, job, server, args.interval)
                result.runs.append(run)
                print(f"  run {run.index}/{2 * args.pairs} {mode}: {run.throughput_per_s:9.0f} inf/s, "
                      f"p99 {run.p99_us:.1f} us, scrapes {run.scrapes}", file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
            server.stop()
    result.summary = summarize(result.runs)
    result.machine["loadavg_after"] = list(os.getloadavg())
    print(format_table(result.runs, result.summary))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(asdict(result), f, indent=2)
    print(f"JSON: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
