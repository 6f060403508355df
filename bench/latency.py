"""Latency and throughput of the served paths, side by side with the in-process floor, in one run.

    python bench/latency.py                      # all rows (a few minutes); table to stdout, JSON to bench/results/
    python bench/latency.py --quick --json /tmp/x.json    # smoke run, under a minute

For each model (add_sub, mlp, identity_16m):
- concurrency 1: the floor (ONNX Runtime `InferenceSession.run` on the same .onnx file in this process, with
  the worker's session options) and each served path (local client copy form, zero-copy form; with
  `--diagnostics` also the lane round trip alone), `--iterations` timed requests after warm-up, `--repeats`
  times, interleaved; p50 and p99 are the medians over the repeats of each repeat's p50 and p99;
- concurrency N (`--processes`, default 16): N spawned client processes doing batch-1 requests for
  `--duration` seconds after a barrier: throughput (inferences/s = samples/s), p50/p99 over all requests,
  mean batch size from the server's lane counters (rows / batches); against the floor's in-process
  throughput at the model's max batch size on one thread.

Figures are ratios or differences against the floor measured in the same run (CONVENTIONS.md, Benchmarks).
Each row also records the share of the CPU that other processes used meanwhile ("others"): these machines
are shared. A model whose rows fail (a server error, a stuck lane) is recorded in the JSON and the run goes
on; the exit status is then 1, as it is when the server does not exit 0 on SIGTERM. docs/benchmarks.md has
the recorded results.
The script starts its own server on a temp socket over a temp example repository, unless `--socket` names a
running one (then `--model-repository` can name its repository for the floor; by default the floor uses a
fresh copy of the example models, which are built deterministically).

Adding a path: a requester in `_bench_clients.py` (`REQUESTERS`) and a `PathSpec` line in `PATHS` below.
Spawned client processes import this file as `__mp_main__`, so frameworks are imported inside functions only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from threading import BrokenBarrierError
from typing import Any

import numpy as np

import kernelport
from _bench_clients import REQUESTERS, LoadRun, Requester, Target, client_process_main, make_inputs
from kernelport import Client

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
MODELS = ("add_sub", "mlp", "identity_16m")
DEFAULT_ITERATIONS = {"add_sub": 3000, "mlp": 1000, "identity_16m": 200}
QUICK_ITERATIONS = {"add_sub": 300, "mlp": 100, "identity_16m": 20}
FLOOR = "floor"


@dataclass(frozen=True)
class PathSpec:
    """One way of running a request: a row of the table per model and concurrency."""

    name: str
    what: str
    in_process: bool = False  # the floor: the framework called in this process, no server
    concurrent: bool = True  # also measured with N client processes
    diagnostic: bool = False  # for understanding; no issue figure rests on it; run with --diagnostics


PATHS: tuple[PathSpec, ...] = (
    PathSpec(FLOOR, "onnxruntime InferenceSession.run(None, feeds) in the benchmark process (the floor)",
             in_process=True, concurrent=False),
    PathSpec("local-copy", "local client, copy form: Client.infer"),
    PathSpec("local-zero-copy", "local client, zero-copy form: Client.request, inputs written into the rows, "
             "run, outputs read in place"),
    PathSpec("lane-ping-pong", "diagnostic: the lane round trip alone (claim, commit, wait, release), "
             "nothing written", concurrent=False, diagnostic=True),
)


@dataclass
class Row:
    model: str
    path: str
    concurrency: int
    batch: int  # samples per request
    p50_us: float
    p99_us: float
    runs: int  # timed requests per repeat (concurrency 1) or in all (median repeat, concurrency N)
    repeats: int
    warmup: str
    p50_us_per_repeat: list[float] = field(default_factory=list)
    p99_us_per_repeat: list[float] = field(default_factory=list)
    throughput_per_s: float | None = None  # samples/s
    throughput_per_s_per_repeat: list[float] = field(default_factory=list)
    mean_batch: float | None = None
    counters: dict[str, int] = field(default_factory=dict)  # lane counters delta (c=1: warm-up included)
    vs_floor: dict[str, float] = field(default_factory=dict)
    others_cpu: float | None = None  # share of the machine's CPU other processes used meanwhile
    cpu_cores: dict[str, float] = field(default_factory=dict)  # cores used by the server+workers, the clients
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by error type (not timed, not counted)


# ---- the server --------------------------------------------------------------------------------------


class ServerProcess:
    """`kernelport serve` in a subprocess; its output is kept and shown if it fails."""

    def __init__(self, repository: str, socket_path: str, start_timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.lines: list[str] = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernelport.cli.main", "serve", "--model-repository", repository,
             "--socket", socket_path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "ready on" in line:
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(start_timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + self.log())

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code (killed: negative)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._pump.join(5)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- the floor ---------------------------------------------------------------------------------------


class FloorRequester:
    """ONNX Runtime called directly, with the session options the worker would use for this model."""

    def __init__(self, repository: str, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        import onnxruntime as ort

        from kernelport.backends.onnxruntime import session_options_from_parameters
        from kernelport.repository import load_repository

        entry = load_repository(repository)[model]
        parameters = {k: v.string_value for k, v in entry.config.parameters.items()}
        options = session_options_from_parameters(parameters, model)
        self.session = ort.InferenceSession(entry.model_file(), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.feeds = dict(inputs)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self) -> None:
        self.session.run(None, self.feeds)

    def result(self) -> dict[str, np.ndarray] | None:
        return dict(zip(self.names, self.session.run(None, self.feeds)))

    def close(self) -> None:
        pass


# ---- measuring ---------------------------------------------------------------------------------------


def time_calls(call: Callable[[], None], warmup: int, n: int) -> np.ndarray:
    """Latencies in ns of `n` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    gc.collect()
    clock = time.perf_counter_ns
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        t0 = clock()
        call()
        out[i] = clock() - t0
    return out


def time_for(call: Callable[[], None], warmup_s: float, duration_s: float) -> tuple[np.ndarray, float]:
    """Calls for `duration_s` after `warmup_s` of warm-up: (latencies ns, elapsed s)."""
    clock = time.perf_counter_ns
    end = clock() + int(warmup_s * 1e9)
    call()
    while clock() < end:
        call()
    gc.collect()
    lat: list[int] = []
    start = now = clock()
    deadline = start + int(duration_s * 1e9)
    while now < deadline:
        t0 = clock()
        call()
        now = clock()
        lat.append(now - t0)
    return np.asarray(lat, dtype=np.int64), (now - start) / 1e9


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _proc_table() -> tuple[dict[int, int], dict[int, int]]:
    """(parent pid, utime + stime jiffies) of every live process."""
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry)
        parent[pid] = int(fields[1])
        used[pid] = int(fields[11]) + int(fields[12])
    return parent, used


def _subtree_cpu(roots: Sequence[int], parent: Mapping[int, int], used: Mapping[int, int]) -> int:
    tree = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(used.get(pid, 0) for pid in tree)


def _our_cpu() -> int:
    """Jiffies used by this process, the children it reaped, and every live descendant (the server, its
    workers, the client processes)."""
    parent, used = _proc_table()
    t = os.times()
    reaped = round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))
    return _subtree_cpu([os.getpid()], parent, used) + reaped


class CpuUse:
    """CPU cores used over an interval by named process trees (the server with its workers; the clients)."""

    def __init__(self, trees: Mapping[str, Sequence[int]]) -> None:
        self.trees = {name: list(roots) for name, roots in trees.items() if roots}
        self._t0 = time.monotonic()
        self._start = self._sample()

    def _sample(self) -> dict[str, int]:
        parent, used = _proc_table()
        return {name: _subtree_cpu(roots, parent, used) for name, roots in self.trees.items()}

    def cores(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        end = self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        return {name: (end[name] - self._start[name]) / hz / wall for name in self.trees} if wall > 0 else {}


class ForeignLoad:
    """The share of the machine's CPU time that processes outside this benchmark used over an interval.
    These machines are shared: another tenant's busy core moves the spinning paths most, so each row
    records it."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            busy, total = _cpu_times()
            return busy, total, _our_cpu()
        except (OSError, ValueError, IndexError):
            return None

    def fraction(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        busy, total, ours = (e - s for e, s in zip(end, self._start))
        return min(1.0, max(0.0, (busy - ours) / total))


def percentiles_us(ns: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(ns, [50, 99])
    return float(p50) / 1e3, float(p99) / 1e3


def counters_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: int(after[k]) - int(before.get(k, 0)) for k in after}


def mean_batch(delta: Mapping[str, int]) -> float | None:
    return delta["rows"] / delta["batches"] if delta.get("batches") else None


def check_outputs(model: str, path: str, got: Mapping[str, np.ndarray] | None,
                  want: Mapping[str, np.ndarray]) -> None:
    """A served path must give the floor's outputs (ORT may round differently between runs: allclose)."""
    if got is None:
        return
    for name, ref in want.items():
        if name not in got or got[name].shape != ref.shape or not np.allclose(got[name], ref, rtol=1e-4,
                                                                                atol=1e-5):
            raise RuntimeError(f"model '{model}' path '{path}': output '{name}' differs from the floor's")


def bench_concurrency_1(model: str, info: Mapping[str, Any], paths: Sequence[PathSpec], target: Target,
                        repository: str, client: Client, iterations: int, repeats: int) -> list[Row]:
    """Batch-1 requests one at a time, the paths interleaved within each repeat so drift hits them alike."""
    inputs = make_inputs(info, 1, seed=1)
    warmup = max(10, iterations // 5)
    requesters: dict[str, Requester] = {}
    try:
        for spec in paths:
            if spec.in_process:
                requesters[spec.name] = FloorRequester(repository, model, inputs)
            else:
                requesters[spec.name] = REQUESTERS[spec.name](target, model, inputs)
        reference = requesters[FLOOR].result()
        assert reference is not None
        for name, req in requesters.items():
            check_outputs(model, name, req.result(), reference)

        foreign = ForeignLoad()
        samples: dict[str, list[np.ndarray]] = {name: [] for name in requesters}
        deltas: dict[str, dict[str, int]] = {name: {} for name in requesters}
        for r in range(repeats):
            for spec in paths:
                served = not spec.in_process
                before = client.counters(model) if served else {}
                lat = time_calls(requesters[spec.name], warmup, iterations)
                if served:
                    d = counters_delta(before, client.counters(model))
                    deltas[spec.name] = {k: deltas[spec.name].get(k, 0) + v for k, v in d.items()}
                samples[spec.name].append(lat)
                p50, p99 = percentiles_us(lat)
                print(f"  {model:13s} {spec.name:16s} c=1 repeat {r + 1}/{repeats}: p50 {p50:9.1f} us, "
                      f"p99 {p99:9.1f} us", file=sys.stderr, flush=True)
        others = foreign.fraction()
    finally:
        for req in requesters.values():
            req.close()

    rows: list[Row] = []
    for spec in paths:
        per = [percentiles_us(lat) for lat in samples[spec.name]]
        p50s, p99s = [p for p, _ in per], [p for _, p in per]
        row = Row(model, spec.name, 1, 1, float(np.median(p50s)), float(np.median(p99s)), iterations, repeats,
                  f"{warmup} requests", p50s, p99s, others_cpu=others)
        if not spec.in_process:
            # the lane counters also count the warm-up and check requests around the timed ones
            row.counters = deltas[spec.name]
            row.mean_batch = mean_batch(row.counters)
        rows.append(row)
    floor = rows[0]
    for row in rows[1:]:
        row.vs_floor = {
            "p50_diff_us": row.p50_us - floor.p50_us, "p50_ratio": row.p50_us / floor.p50_us,
            "p99_diff_us": row.p99_us - floor.p99_us, "p99_ratio": row.p99_us / floor.p99_us,
        }
    return rows


def bench_floor_throughput(model: str, info: Mapping[str, Any], repository: str, warmup_s: float,
                           duration_s: float, repeats: int) -> Row:
    """In-process throughput at the model's max batch size, one thread: what batching could reach at best."""
    batch = max(1, int(info["max_batch_size"]))
    floor = FloorRequester(repository, model, make_inputs(info, batch, seed=2))
    lats, rates = [], []
    foreign = ForeignLoad()
    for r in range(repeats):
        lat, elapsed = time_for(floor, warmup_s, duration_s)
        lats.append(lat)
        rates.append(len(lat) * batch / elapsed)
        print(f"  {model:13s} {FLOOR:16s} b={batch} repeat {r + 1}/{repeats}: {rates[-1]:10.0f} samples/s",
              file=sys.stderr, flush=True)
    per = [percentiles_us(lat) for lat in lats]
    p50s, p99s = [p for p, _ in per], [p for _, p in per]
    return Row(model, FLOOR, 1, batch, float(np.median(p50s)), float(np.median(p99s)),
               int(np.median([len(lat) for lat in lats])), repeats, f"{warmup_s:g} s", p50s, p99s,
               throughput_per_s=float(np.median(rates)), throughput_per_s_per_repeat=rates,
               others_cpu=foreign.fraction())


class ClientPool:
    """N client processes (spawn: no fork after numpy/ORT work), kept for every concurrency row."""

    def __init__(self, target: Target, n: int, timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.timeout = timeout
        self.barrier = ctx.Barrier(n + 1)
        self.broken = False
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_process_main, args=(child, target, i, self.barrier), daemon=True,
                            name=f"bench-client-{i}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def run(self, job: LoadRun,
            at_start: Callable[[], None]) -> list[tuple[int, int, np.ndarray, dict[str, int]]]:
        """Run one job in every process; `at_start` runs when all are warm and none is timing yet."""
        if self.broken:
            raise RuntimeError("the client processes are unusable after an earlier failure")
        for c in self.conns:
            c.send(job)
        started = True
        try:
            self.barrier.wait(job.barrier_timeout_s)
            at_start()
            self.barrier.wait(job.barrier_timeout_s)
        except BrokenBarrierError:
            started = False
        replies: list[Any] = []
        for i, c in enumerate(self.conns):  # every process replies once per job: read them all
            if not c.poll(job.warmup_s + job.duration_s + self.timeout):
                self.broken = True
                alive = "alive" if self.procs[i].is_alive() else f"exited with code {self.procs[i].exitcode}"
                raise RuntimeError(f"client {i} did not report back ({alive})")
            try:
                replies.append(c.recv())
            except (EOFError, OSError):
                self.broken = True
                self.procs[i].join(5)
                raise RuntimeError(f"client {i} exited (code {self.procs[i].exitcode})") from None
        errors = [str(r[1]) for r in replies if r[0] != "ok"]
        if errors or not started:
            self.barrier.reset()
            raise RuntimeError("client processes failed: " + ("; ".join(errors) or "the barrier broke"))
        return [(int(r[1]), int(r[2]), np.frombuffer(r[3], dtype=np.int64), dict(r[4])) for r in replies]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self.conns:
            c.close()


def bench_concurrency_n(model: str, info: Mapping[str, Any], paths: Sequence[PathSpec], pool: ClientPool,
                        client: Client, floor: Row, warmup_s: float, duration_s: float, repeats: int,
                        server_pid: int | None) -> list[Row]:
    """Batch-1 requests from every pool process at once; the counters and CPU use cover the repeats (with
    each repeat's warm-up, when the clients are busy but not timed)."""
    rows: list[Row] = []
    for spec in paths:
        job = LoadRun(spec.name, model, dict(info), warmup_s, duration_s, barrier_timeout_s=120.0)
        p50s, p99s, rates, counts = [], [], [], []
        total: dict[str, int] = {}
        errors: dict[str, int] = {}
        foreign = ForeignLoad()
        cpu = CpuUse({"server+workers": [server_pid] if server_pid else [], "clients": pool.pids})
        for r in range(repeats):
            before: dict[str, int] = {}
            results = pool.run(job, lambda before=before: before.update(client.counters(model)))
            delta = counters_delta(before, client.counters(model))
            total = {k: total.get(k, 0) + v for k, v in delta.items()}
            lat = np.concatenate([lat for _, _, lat, _ in results])
            span = (max(end for _, end, _, _ in results) - min(start for start, _, _, _ in results)) / 1e9
            for _, _, _, errs in results:
                for k, v in errs.items():
                    errors[k] = errors.get(k, 0) + v
            if len(lat) == 0:
                raise RuntimeError(f"path '{spec.name}': no request succeeded (failed: {errors})")
            p50, p99 = percentiles_us(lat)
            p50s.append(p50)
            p99s.append(p99)
            rates.append(len(lat) / span)
            counts.append(len(lat))
            mb = mean_batch(delta)
            print(f"  {model:13s} {spec.name:16s} c={pool.n} repeat {r + 1}/{repeats}: {rates[-1]:10.0f} inf/s, "
                  f"p99 {p99:9.1f} us, mean batch {mb or 0:.2f}, failed {sum(errors.values())} so far",
                  file=sys.stderr, flush=True)
        row = Row(model, spec.name, pool.n, 1, float(np.median(p50s)), float(np.median(p99s)),
                  int(np.median(counts)), repeats, f"{warmup_s:g} s per process", p50s, p99s,
                  throughput_per_s=float(np.median(rates)), throughput_per_s_per_repeat=rates,
                  mean_batch=mean_batch(total), counters=total, others_cpu=foreign.fraction(),
                  cpu_cores=cpu.cores(), errors=errors)
        assert floor.throughput_per_s is not None
        row.vs_floor = {"throughput_ratio": row.throughput_per_s / floor.throughput_per_s,
                        "floor_batch": floor.batch}
        rows.append(row)
    return rows


# ---- the figures -----------------------------------------------------------------------------


@dataclass
class Figure:
    figure: str
    model: str
    path: str
    value: float | None  # None: not measured (the row failed)
    limit: float | None
    unit: str
    met: bool | None


def evaluate_figures(rows: Sequence[Row], models: Sequence[str], processes: int) -> list[Figure]:
    """The issue's figures, each against the floor of this run."""

    def find(model: str, path: str, concurrency: int, throughput: bool = False) -> Row | None:
        for r in rows:
            if (r.model, r.path, r.concurrency) == (model, path, concurrency) and \
                    (r.throughput_per_s is not None) == throughput:
                return r
        return None

    def figure(text: str, model: str, path: str, unit: str, value: Callable[[Row], float | None],
               limit: Callable[[Row], float | None], at_least: bool, row: Row | None, floor: Row | None) -> None:
        v = value(row) if row else None
        lim = limit(floor) if floor else None
        met = None if v is None or lim is None else (v >= lim if at_least else v <= lim)
        figures.append(Figure(text, model, path, v, lim, unit, met))

    figures: list[Figure] = []
    local = ("local-copy", "local-zero-copy")
    if "add_sub" in models:
        floor = find("add_sub", FLOOR, 1)
        for path in local:
            row = find("add_sub", path, 1)
            figure(f"add_sub c=1 {path} p50 <= floor p50 + 25 us", "add_sub", path, "us", lambda r: r.p50_us,
                   lambda f: f.p50_us + 25, False, row, floor)
            figure(f"add_sub c=1 {path} p99 <= floor p99 + 100 us", "add_sub", path, "us", lambda r: r.p99_us,
                   lambda f: f.p99_us + 100, False, row, floor)
    if "identity_16m" in models:
        figure("identity_16m c=1 local-zero-copy p50 <= 1.3 x floor p50", "identity_16m", "local-zero-copy", "us",
               lambda r: r.p50_us, lambda f: 1.3 * f.p50_us, False, find("identity_16m", "local-zero-copy", 1),
               find("identity_16m", FLOOR, 1))
    if "mlp" in models:
        floor = find("mlp", FLOOR, 1, throughput=True)
        for path in local:
            figure(f"mlp c={processes} {path} throughput >= 70% of in-process max-batch throughput", "mlp", path,
                   "samples/s", lambda r: r.throughput_per_s,
                   lambda f: None if f.throughput_per_s is None else 0.7 * f.throughput_per_s, True,
                   find("mlp", path, processes, throughput=True), floor)
    return figures


# ---- output ------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def _us(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    head = ("model", "path", "conc", "batch", "p50 us", "p99 us", "vs floor", "throughput/s", "mean batch",
            "spread (repeats)", "runs", "others")
    body: list[tuple[str, ...]] = []
    for r in rows:
        if r.concurrency == 1 and r.throughput_per_s is None:
            vs = (f"{r.vs_floor['p50_diff_us']:+.1f} us, x{r.vs_floor['p50_ratio']:.2f}" if r.vs_floor else "-")
            spread = f"p50 {_us(min(r.p50_us_per_repeat))}-{_us(max(r.p50_us_per_repeat))}"
            rate = "-"
        else:
            ratio = 100 * r.vs_floor["throughput_ratio"] if r.vs_floor else 0.0
            vs = (f"{ratio:.{0 if ratio >= 10 else 1}f}% of b{r.vs_floor['floor_batch']:.0f}" if r.vs_floor else "-")
            per = r.throughput_per_s_per_repeat
            spread = f"{_rate(min(per))}-{_rate(max(per))}/s"
            rate = _rate(r.throughput_per_s or 0)
        mb = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        body.append((r.model, r.path, str(r.concurrency), str(r.batch), _us(r.p50_us), _us(r.p99_us), vs, rate,
                     mb, spread, f"{r.runs} x{r.repeats}", _pct(r.others_cpu)))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    numeric = {2, 3, 4, 5, 7, 8, 11}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def format_counters(rows: Sequence[Row]) -> str:
    """The lane counters behind the served rows, per request: where the time went (sleeps, waits)."""
    keys = ("client_sleeps", "worker_sleeps", "full_waits", "commit_timeouts")
    head = ("model", "path", "conc", "claims", "batches", *(f"{k}/req" for k in keys), "server cores",
            "client cores", "failed requests")
    body = []
    for r in rows:
        c = r.counters
        if not c or not c.get("claims"):
            continue
        cores = [f"{r.cpu_cores[k]:.2f}" if k in r.cpu_cores else "-" for k in ("server+workers", "clients")]
        failed = ", ".join(f"{n} {k}" for k, n in sorted(r.errors.items())) or "0"
        body.append((r.model, r.path, str(r.concurrency), str(c["claims"]), str(c["batches"]),
                     *(f"{c.get(k, 0) / c['claims']:.3f}" for k in keys), *cores, failed))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 or i == len(head) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def format_figures(figures: Sequence[Figure]) -> str:
    out = []
    for f in figures:
        fmt = _us if f.unit == "us" else _rate
        if f.met is None or f.value is None or f.limit is None:
            out.append(f"  not measured  {f.figure}")
            continue
        out.append(f"  {'met    ' if f.met else 'NOT MET'}  {f.figure}: {fmt(f.value)} {f.unit} "
                   f"(limit {fmt(f.limit)} {f.unit})")
    return "\n".join(out)


def background_load(seconds: float = 1.0) -> dict[str, Any]:
    """What else the machine is doing, while this benchmark does nothing: CPU busy fraction over
    `seconds` and the load averages. These machines are shared; a busy one moves the spinning paths most."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(seconds)
        b1, t1 = _cpu_times()
        busy = (b1 - b0) / (t1 - t0) if t1 > t0 else None
    except (OSError, ValueError, IndexError):
        busy = None
    return {"cpu_busy_fraction": busy, "loadavg": list(os.getloadavg()), "seconds": seconds}


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    commit = ""
    changed: list[str] = []
    try:
        commit = subprocess.run(["git", "-C", BENCH_DIR, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", BENCH_DIR, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.rstrip()
        commit += " (with uncommitted changes)" if dirty else ""
        changed = [ln[3:] for ln in dirty.splitlines() if ln[:2].strip() and not ln.startswith("??")]
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "kernelport": kernelport.__version__,
        "kernelport_path": os.path.dirname(os.path.abspath(kernelport.__file__)),
        "git_commit": commit,
        "git_changed_files": changed,
    }


# ---- main --------------------------------------------------------------------------------------------


@contextmanager
def serving(args: argparse.Namespace, workdir: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(socket path, repository for the floor, server record); starts and stops our own server if needed."""
    from kernelport.examples import build_example_repository

    repository = args.model_repository
    if repository is None:
        repository = os.path.join(workdir, "model_repository")
        build_example_repository(repository)
    record: dict[str, Any] = {"started_by_benchmark": args.socket is None}
    if args.socket is not None:
        yield args.socket, repository, record
        return
    server = ServerProcess(repository, os.path.join(workdir, "kp.sock"))
    record["pid"] = server.proc.pid
    try:
        yield server.socket_path, repository, record
    finally:
        code = server.stop()
        record["exit_code"] = code
        if code != 0:
            print(f"the server exited with code {code}:\n{server.log()}", file=sys.stderr)


@contextmanager
def recording_failure(failures: list[dict[str, str]], model: str, stage: str) -> Iterator[None]:
    """A failing model (a server error, a stuck lane) is recorded and the run goes on with the next one."""
    try:
        yield
    except Exception as exc:  # recorded in the JSON; the exit status becomes 1
        failures.append({"model": model, "stage": stage, "error": f"{type(exc).__name__}: {exc}"})
        print(f"  {model}: {stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", help="use the server running on this socket (default: start one)")
    p.add_argument("--model-repository", help="the repository the floor loads its .onnx files from "
                   "(default: a fresh copy of the example models)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--paths", default=",".join(s.name for s in PATHS if not s.diagnostic),
                   help="comma-separated served paths (the floor is always measured; default: all but the "
                   "diagnostic ones)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also run the diagnostic paths: " + ", ".join(s.name for s in PATHS if s.diagnostic))
    p.add_argument("--iterations", type=int, help="timed requests per concurrency-1 repeat (default: "
                   + ", ".join(f"{m} {n}" for m, n in DEFAULT_ITERATIONS.items()) + ")")
    p.add_argument("--repeats", type=int, help="repeats of every row (default 3; --quick: 1)")
    p.add_argument("--processes", type=int, default=16, help="client processes for the concurrency rows")
    p.add_argument("--duration", type=float, help="seconds of requests per concurrency row (default 5; --quick: 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per process, concurrency rows (default 0.5)")
    p.add_argument("--json", help="where to write the JSON (default: bench/results/latency-<date>.json)")
    p.add_argument("--quick", action="store_true", help="small counts: the whole run in under a minute (smoke)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    known = {s.name: s for s in PATHS}
    names = [n for n in args.paths.split(",") if n]
    if args.diagnostics:
        names += [s.name for s in PATHS if s.diagnostic and s.name not in names]
    for n in names:
        if n not in known:
            p.error(f"unknown path {n!r} (known: {', '.join(known)})")
    args.paths = [s for s in PATHS if s.in_process or s.name in names]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 1.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 0.5
    if args.repeats < 1 or args.processes < 1 or (args.iterations is not None and args.iterations < 1):
        p.error("--repeats, --processes and --iterations must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc)
    json_path = args.json or os.path.join(BENCH_DIR, "results", f"latency-{started:%Y%m%dT%H%M%SZ}.json")
    iterations = {m: args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS)[m]
                  for m in args.models}
    rows: list[Row] = []
    failures: list[dict[str, str]] = []
    load_before = background_load()
    print(f"background load before the run: CPU {_pct(load_before['cpu_busy_fraction'])} busy, "
          f"loadavg {load_before['loadavg'][0]:.2f}", file=sys.stderr)
    foreign = ForeignLoad()
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as workdir:
        with serving(args, workdir) as (socket_path, repository, server_record):
            target = Target(socket_path)
            with Client(socket_path) as client:
                infos = {m: client.model_metadata(m) for m in args.models}
                print(f"concurrency 1: {args.repeats} repeat(s)", file=sys.stderr)
                for m in args.models:
                    with recording_failure(failures, m, "concurrency 1"):
                        rows += bench_concurrency_1(m, infos[m], args.paths, target, repository, client,
                                                    iterations[m], args.repeats)
                concurrent = [s for s in args.paths if s.concurrent and not s.in_process]
                print(f"concurrency {args.processes}: {args.repeats} repeat(s) of {args.duration:g} s",
                      file=sys.stderr)
                pool = ClientPool(target, args.processes, timeout=120.0)
                try:
                    for m in args.models:
                        with recording_failure(failures, m, f"concurrency {args.processes}"):
                            floor = bench_floor_throughput(m, infos[m], repository, args.warmup, args.duration,
                                                           args.repeats)
                            rows.append(floor)
                            rows += bench_concurrency_n(m, infos[m], concurrent, pool, client, floor,
                                                        args.warmup, args.duration, args.repeats,
                                                        server_record.get("pid"))
                finally:
                    pool.close()
    figures = evaluate_figures(rows, args.models, args.processes)
    finished = _dt.datetime.now(_dt.timezone.utc)
    others_during_run = foreign.fraction()
    load_after = background_load()

    print()
    print(format_table(rows))
    print()
    print("floor = onnxruntime called in this process with the worker's session options; c=1 rows: medians over "
          "repeats of p50/p99; c=N rows: batch-1 requests from N processes, against the floor's in-process "
          "throughput at the model's max batch size (one thread)")
    print("\nlane counters per request (concurrency 1: warm-up included); CPU cores used (concurrency N):")
    print(format_counters(rows))
    print(f"\nother processes on this machine used {_pct(others_during_run)} of its {os.cpu_count()} CPUs during the "
          f"run (column 'others': during each row); with the benchmark idle, the machine was "
          f"{_pct(load_before['cpu_busy_fraction'])} busy before and {_pct(load_after['cpu_busy_fraction'])} after")
    if figures:
        print("\nissue figures:")
        print(format_figures(figures))

    result = {
        "benchmark": "latency",
        "date": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(),
        "background_load": {"before": load_before, "after": load_after,
                            "others_cpu_during_run": others_during_run},
        "settings": {"models": args.models, "iterations": iterations, "repeats": args.repeats,
                     "processes": args.processes, "duration_s": args.duration, "warmup_s": args.warmup,
                     "quick": args.quick},
        "paths": [asdict(s) for s in args.paths],
        "server": server_record,
        "rows": [asdict(r) for r in rows],
        "figures": [asdict(f) for f in figures],
        "failures": failures,
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {json_path}")
    status = 0
    for f in failures:
        print(f"error: model {f['model']}, {f['stage']}: {f['error']}", file=sys.stderr)
        status = 1
    code = server_record.get("exit_code", 0)
    if code != 0:
        print(f"error: the server exited with code {code} after SIGTERM", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
