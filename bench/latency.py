"""Latency and throughput of the served paths, side by side with the in-process floor, in one run.

    python bench/latency.py                      # all rows (about 10 minutes); table to stdout, JSON to bench/results/
    python bench/latency.py --quick --json /tmp/x.json    # smoke run, about 90 s
    python bench/latency.py --models add_sub --paths grpc,grpc-shm       # a focused run
    python bench/latency.py --models backends                            # the per-backend rows only

Models: the examples (add_sub, mlp, identity_16m; `--models examples`) and the conformance test's network
served by each CPU backend (mlp_onnx, mlp_torchscript, mlp_export, mlp_tensorflow; `--models backends`;
built by `_bench_models.py`). Paths: the local client (copy form, zero-copy form), gRPC through
tritonclient (tensors in the messages; system shared memory for inputs and outputs) and, with
`--diagnostics`, the lane round trip alone. The per-backend models are measured on the local copy form
unless `--paths` names paths (then every selected model gets those). Two of the full run's ten minutes are
identity_16m over plain gRPC (16 MiB each way in the messages, about 0.2 s a request at concurrency 1).

For each model:
- concurrency 1: the floor (the model's own framework called in this process on the same file, with the
  worker's thread settings: ONNX Runtime `InferenceSession.run` with the worker's session options; the
  TorchScript module or the ExportedProgram's `module()` under `torch.inference_mode()`; the SavedModel's
  signature) and each served path, `--iterations` timed requests after warm-up, `--repeats` times,
  interleaved; p50 and p99 are the medians over the repeats of each repeat's p50 and p99;
- concurrency N (`--processes`, default 16): N spawned client processes doing batch-1 requests for
  `--duration` seconds after a barrier: throughput (inferences/s = samples/s), p50/p99 over all requests,
  mean batch size from the server's lane counters (rows / batches; for the gRPC paths from ModelStatistics,
  inference_count / execution_count); against the floor's in-process throughput at the model's max batch
  size on one thread.

Figures are ratios or differences against the floor measured in the same run (CONVENTIONS.md, Benchmarks).
Each row also records the share of the CPU that other processes used meanwhile ("others"): these machines
are shared. A model whose rows fail (a server error, a stuck lane) is recorded in the JSON and the run goes
on; the exit status is then 1, as it is when the server does not exit 0 on SIGTERM. docs/benchmarks.md has
the recorded results.
The script starts its own server on a temp socket over a temp repository (the example models and the
per-backend models), serving gRPC on a free port (`--grpc-port`) with client shared memory allowed, unless
`--socket` names a running one (then `--model-repository` can name its repository for the floor, and
`--grpc-url` its gRPC address; by default the floor uses a fresh copy of the example models, which are built
deterministically). This process loads torch and TensorFlow only for their floors, after the server has
started; the server's workers load their own.

Adding a path: a requester in `_bench_clients.py` (`REQUESTERS`) and a `PathSpec` line in `PATHS` below.
Spawned client processes import this file as `__mp_main__`, so frameworks are imported inside functions only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from threading import BrokenBarrierError
from typing import Any

import numpy as np

import kernelport
from _bench_clients import (
    REQUESTERS,
    GrpcStatistics,
    LoadRun,
    Requester,
    Target,
    client_process_main,
    make_inputs,
    stop_clients,
)
from _bench_models import BACKEND_MODELS, FLOORS, build_backend_models, load_weights, reference
from _machine import CpuUse, ForeignLoad, cpu_times
from kernelport import Client
from kernelport.benchmark.measure import percentiles_us, time_calls, time_for
from kernelport.server.process import ServerProcess, free_port

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_MODELS = ("add_sub", "mlp", "identity_16m")
MODELS = EXAMPLE_MODELS + tuple(BACKEND_MODELS)
MODEL_GROUPS = {"examples": EXAMPLE_MODELS, "backends": tuple(BACKEND_MODELS), "all": MODELS}
DEFAULT_ITERATIONS = {"add_sub": 3000, "mlp": 1000, "identity_16m": 200, **{m: 2000 for m in BACKEND_MODELS}}
QUICK_ITERATIONS = {"add_sub": 300, "mlp": 100, "identity_16m": 10, **{m: 300 for m in BACKEND_MODELS}}
BACKEND_DEFAULT_PATHS = ("local-copy",)  # what the per-backend models are measured on unless --paths says
FLOOR = "floor"
FLOOR_WHAT = {
    "onnxruntime": "onnxruntime InferenceSession.run(None, feeds), the worker's session options",
    "torchscript": "torch.jit.load(model.pt)(x) under torch.inference_mode(), 1 thread",
    "torch.export": "torch.export.load(model.pt2).module()(x) under torch.inference_mode(), 1 thread",
    "tensorflow": "the SavedModel's serving_default signature(x=tensor), 1 intra-op / 1 inter-op thread",
}


@dataclass(frozen=True)
class PathSpec:
    """One way of running a request: a row of the table per model and concurrency."""

    name: str
    what: str
    in_process: bool = False  # the floor: the framework called in this process, no server
    concurrent: bool = True  # also measured with N client processes
    diagnostic: bool = False  # for understanding; no issue figure rests on it; run with --diagnostics
    grpc: bool = False  # needs the server's gRPC front end; mean batch (concurrency N) from ModelStatistics


PATHS: tuple[PathSpec, ...] = (
    PathSpec(FLOOR, "onnxruntime InferenceSession.run(None, feeds) in the benchmark process (the floor)",
             in_process=True, concurrent=False),
    PathSpec("local-copy", "local client, copy form: Client.infer"),
    PathSpec("local-zero-copy", "local client, zero-copy form: Client.request, inputs written into the rows, "
             "run, outputs read in place"),
    PathSpec("lane-ping-pong", "diagnostic: the lane round trip alone (claim, commit, wait, release), "
             "nothing written", concurrent=False, diagnostic=True),
    PathSpec("grpc", "tritonclient.grpc, tensors in the messages: InferInput.set_data_from_numpy per request, "
             "InferRequestedOutput, outputs as_numpy", grpc=True),
    PathSpec("grpc-shm", "tritonclient.grpc, system shared memory for inputs and outputs: regions created and "
             "registered once; per request inputs written into the region, set_shared_memory on every input "
             "and output, outputs read in place (get_contents_as_numpy)", grpc=True),
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
    mean_batch_from: str | None = None  # "lanes" (rows / batches) or "statistics" (ModelStatistics)
    counters: dict[str, int] = field(default_factory=dict)  # lane counters delta (c=1: warm-up included)
    statistics: dict[str, int] = field(default_factory=dict)  # ModelStatistics delta (concurrency N, with gRPC)
    vs_floor: dict[str, float] = field(default_factory=dict)
    others_cpu: float | None = None  # share of the machine's CPU other processes used meanwhile
    cpu_cores: dict[str, float] = field(default_factory=dict)  # cores used by the server+workers, the clients
    errors: dict[str, int] = field(default_factory=dict)  # failed requests by error type (not timed, not counted)


# ---- the server --------------------------------------------------------------------------------------


# ---- the floor ---------------------------------------------------------------------------------------


class FloorRequester:
    """ONNX Runtime called directly, with the session options the worker would use for this model."""

    request_errors: tuple[type[Exception], ...] = ()

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


def make_floor(repository: str, model: str, inputs: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> Requester:
    """The model's own framework called in this process (torch and TensorFlow are imported here, on first
    use: after the server has started)."""
    framework = floor_framework(model)
    if framework == "onnxruntime":
        return FloorRequester(repository, model, inputs)
    return FLOORS[framework](repository, model, inputs, info)


def floor_framework(model: str) -> str:
    return BACKEND_MODELS.get(model, "onnxruntime")


# ---- measuring ---------------------------------------------------------------------------------------


def counters_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: int(after[k]) - int(before.get(k, 0)) for k in after}


def mean_batch(delta: Mapping[str, int]) -> float | None:
    return delta["rows"] / delta["batches"] if delta.get("batches") else None


def statistics_mean_batch(delta: Mapping[str, int]) -> float | None:
    """Samples per backend execution, from a ModelStatistics delta."""
    return delta["inference_count"] / delta["execution_count"] if delta.get("execution_count") else None


def check_outputs(model: str, path: str, got: Mapping[str, np.ndarray] | None,
                  want: Mapping[str, np.ndarray]) -> None:
    """A served path must give the floor's outputs (ORT may round differently between runs: allclose)."""
    if got is None:
        return
    for name, ref in want.items():
        if name not in got or got[name].shape != ref.shape or not np.allclose(got[name], ref, rtol=1e-4,
                                                                                atol=1e-5):
            raise RuntimeError(f"model '{model}' path '{path}': output '{name}' differs from the floor's")


def check_floor(model: str, repository: str, inputs: Mapping[str, np.ndarray],
                got: Mapping[str, np.ndarray]) -> None:
    """A per-backend model's floor must give the network's outputs, computed in numpy from the weights the
    models were built with (when this run built them), as the conformance test checks the served ones."""
    if model not in BACKEND_MODELS:
        return
    try:
        weights = load_weights(repository)
    except OSError:
        return  # a repository this run did not build
    want = reference(weights, next(iter(inputs.values())))
    (name, value), = got.items()
    if value.shape != want.shape or not np.allclose(value, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"model '{model}': the floor's output '{name}' differs from the numpy reference")


def bench_concurrency_1(model: str, info: Mapping[str, Any], paths: Sequence[PathSpec], target: Target,
                        repository: str, client: Client, iterations: int, repeats: int) -> list[Row]:
    """Batch-1 requests one at a time, the paths interleaved within each repeat so drift hits them alike."""
    inputs = make_inputs(info, 1, seed=1)
    warmup = max(10, iterations // 5)
    requesters: dict[str, Requester] = {}
    try:
        for spec in paths:
            if spec.in_process:
                requesters[spec.name] = make_floor(repository, model, inputs, info)
            else:
                requesters[spec.name] = REQUESTERS[spec.name](target, model, inputs)
        reference = requesters[FLOOR].result()
        assert reference is not None
        check_floor(model, repository, inputs, reference)
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
            row.mean_batch_from = "lanes"
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
    floor = make_floor(repository, model, make_inputs(info, batch, seed=2), info)
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
        stop_clients(self.conns, self.procs)


def bench_concurrency_n(model: str, info: Mapping[str, Any], paths: Sequence[PathSpec], pool: ClientPool,
                        client: Client, floor: Row, warmup_s: float, duration_s: float, repeats: int,
                        server_pid: int | None, statistics: GrpcStatistics | None = None) -> list[Row]:
    """Batch-1 requests from every pool process at once; the counters and CPU use cover the repeats (with
    each repeat's warm-up, when the clients are busy but not timed). With `statistics` (the server's gRPC
    front end), the model's ModelStatistics are read at the same two points, after the warm-up and after
    the timed requests: the gRPC rows' mean batch is inference_count / execution_count over the timed part."""
    rows: list[Row] = []
    for spec in paths:
        job = LoadRun(spec.name, model, dict(info), warmup_s, duration_s, barrier_timeout_s=120.0)
        p50s, p99s, rates, counts = [], [], [], []
        total: dict[str, int] = {}
        stats_total: dict[str, int] = {}
        errors: dict[str, int] = {}
        foreign = ForeignLoad()
        cpu = CpuUse({"server+workers": [server_pid] if server_pid else [], "clients": pool.pids})
        for r in range(repeats):
            before: dict[str, int] = {}
            stats_before: dict[str, int] = {}

            def at_start(before: dict[str, int] = before, stats_before: dict[str, int] = stats_before) -> None:
                before.update(client.counters(model))
                if statistics is not None:
                    stats_before.update(statistics.read(model))

            results = pool.run(job, at_start)
            stats_delta: dict[str, int] = {}
            if statistics is not None:
                stats_delta = counters_delta(stats_before, statistics.read(model))
                stats_total = {k: stats_total.get(k, 0) + v for k, v in stats_delta.items()}
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
            mb = statistics_mean_batch(stats_delta) if spec.grpc else mean_batch(delta)
            print(f"  {model:13s} {spec.name:16s} c={pool.n} repeat {r + 1}/{repeats}: {rates[-1]:10.0f} inf/s, "
                  f"p99 {p99:9.1f} us, mean batch {mb or 0:.2f}, failed {sum(errors.values())} so far",
                  file=sys.stderr, flush=True)
        row = Row(model, spec.name, pool.n, 1, float(np.median(p50s)), float(np.median(p99s)),
                  int(np.median(counts)), repeats, f"{warmup_s:g} s per process", p50s, p99s,
                  throughput_per_s=float(np.median(rates)), throughput_per_s_per_repeat=rates,
                  mean_batch=statistics_mean_batch(stats_total) if spec.grpc else mean_batch(total),
                  mean_batch_from="statistics" if spec.grpc else "lanes", counters=total,
                  statistics=stats_total, others_cpu=foreign.fraction(), cpu_cores=cpu.cores(), errors=errors)
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


def evaluate_figures(rows: Sequence[Row], models: Sequence[str], processes: int,
                     model_paths: Mapping[str, Sequence[str]] | None = None) -> list[Figure]:
    """The issue's figures, each against the floor of this run (or a fixed limit where the issue gives one).
    A figure on a path not selected for its model (`model_paths`; default: the local paths) is left out; one
    whose row failed is "not measured"."""

    def selected(model: str, path: str) -> bool:
        return path in model_paths.get(model, ()) if model_paths is not None else path in local

    def find(model: str, path: str, concurrency: int, throughput: bool = False) -> Row | None:
        for r in rows:
            if (r.model, r.path, r.concurrency) == (model, path, concurrency) and \
                    (r.throughput_per_s is not None) == throughput:
                return r
        return None

    def figure(text: str, model: str, path: str, unit: str, value: Callable[[Row], float | None],
               limit: Callable[[Row], float | None], at_least: bool, row: Row | None, floor: Row | None,
               strict: bool = False) -> None:
        v = value(row) if row else None
        lim = limit(floor) if floor else None
        if v is None or lim is None:
            met = None
        elif strict:
            met = v > lim if at_least else v < lim
        else:
            met = v >= lim if at_least else v <= lim
        figures.append(Figure(text, model, path, v, lim, unit, met))

    figures: list[Figure] = []
    local = ("local-copy", "local-zero-copy")
    if "add_sub" in models:
        floor = find("add_sub", FLOOR, 1)
        for path in (p for p in local if selected("add_sub", p)):
            row = find("add_sub", path, 1)
            figure(f"add_sub c=1 {path} p50 <= floor p50 + 25 us", "add_sub", path, "us", lambda r: r.p50_us,
                   lambda f: f.p50_us + 25, False, row, floor)
            figure(f"add_sub c=1 {path} p99 <= floor p99 + 100 us", "add_sub", path, "us", lambda r: r.p99_us,
                   lambda f: f.p99_us + 100, False, row, floor)
    if "identity_16m" in models and selected("identity_16m", "local-zero-copy"):
        figure("identity_16m c=1 local-zero-copy p50 <= 1.3 x floor p50", "identity_16m", "local-zero-copy", "us",
               lambda r: r.p50_us, lambda f: 1.3 * f.p50_us, False, find("identity_16m", "local-zero-copy", 1),
               find("identity_16m", FLOOR, 1))
    if "mlp" in models:
        floor = find("mlp", FLOOR, 1, throughput=True)
        for path in (p for p in local if selected("mlp", p)):
            figure(f"mlp c={processes} {path} throughput >= 70% of in-process max-batch throughput", "mlp", path,
                   "samples/s", lambda r: r.throughput_per_s,
                   lambda f: None if f.throughput_per_s is None else 0.7 * f.throughput_per_s, True,
                   find("mlp", path, processes, throughput=True), floor)
    # gRPC (issue 3)
    grpc_paths = [p for p in ("grpc", "grpc-shm") if selected("add_sub", p)]
    if "add_sub" in models:
        floor = find("add_sub", FLOOR, 1)
        for path in grpc_paths:
            figure(f"add_sub c=1 {path} p50 <= 600 us end to end", "add_sub", path, "us", lambda r: r.p50_us,
                   lambda f: 600.0, False, find("add_sub", path, 1), floor)
        for path in grpc_paths:
            row = find("add_sub", path, processes, throughput=True)
            figure(f"add_sub c={processes} {path} throughput >= 4000 inferences/s", "add_sub", path, "samples/s",
                   lambda r: r.throughput_per_s, lambda f: 4000.0, True, row, floor)
            figure(f"add_sub c={processes} {path} mean batch (ModelStatistics) > 1", "add_sub", path, "batch",
                   lambda r: r.mean_batch, lambda f: 1.0, True, row, floor, strict=True)
    if "identity_16m" in models and selected("identity_16m", "grpc-shm"):
        figure("identity_16m c=1 grpc-shm p50 <= 4 x floor p50", "identity_16m", "grpc-shm", "us",
               lambda r: r.p50_us, lambda f: 4 * f.p50_us, False, find("identity_16m", "grpc-shm", 1),
               find("identity_16m", FLOOR, 1))
    # per backend (issue 4): served p50 within 25 us of the framework's own in-process call
    for model in (m for m in BACKEND_MODELS if m in models):
        for path in (p for p in local if selected(model, p)):
            figure(f"{model} c=1 {path} p50 <= {floor_framework(model)} floor p50 + 25 us", model, path, "us",
                   lambda r: r.p50_us, lambda f: f.p50_us + 25, False, find(model, path, 1),
                   find(model, FLOOR, 1))
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
            "client cores", "stats inf/exec", "failed requests")
    body = []
    for r in rows:
        c = r.counters
        if not c or not c.get("claims"):
            continue
        cores = [f"{r.cpu_cores[k]:.2f}" if k in r.cpu_cores else "-" for k in ("server+workers", "clients")]
        st = r.statistics
        stats = f"{st['inference_count']}/{st['execution_count']}" if st.get("execution_count") else "-"
        failed = ", ".join(f"{n} {k}" for k, n in sorted(r.errors.items())) or "0"
        body.append((r.model, r.path, str(r.concurrency), str(c["claims"]), str(c["batches"]),
                     *(f"{c.get(k, 0) / c['claims']:.3f}" for k in keys), *cores, stats, failed))
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 or i == len(head) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def format_figures(figures: Sequence[Figure]) -> str:
    out = []
    for f in figures:
        fmt = _us if f.unit == "us" else (lambda x: f"{x:.2f}") if f.unit == "batch" else _rate
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
        b0, t0 = cpu_times()
        time.sleep(seconds)
        b1, t1 = cpu_times()
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


def start_server(repository: str, socket_path: str, grpc_port: int | None) -> tuple[ServerProcess, int]:
    """Our own server with its gRPC front end (client shared memory allowed); (server, gRPC port)."""
    for attempt in range(3):
        port = grpc_port if grpc_port is not None else free_port()
        try:
            return ServerProcess(repository, socket_path, "--grpc-port", str(port), "--allow-client-shm"), port
        except RuntimeError as exc:
            if grpc_port is not None or attempt == 2 or str(port) not in str(exc):
                raise
            print(f"gRPC port {port} was taken meanwhile; trying another", file=sys.stderr)
    raise AssertionError("unreachable")


@contextmanager
def serving(args: argparse.Namespace, workdir: str) -> Iterator[tuple[Target, str, dict[str, Any]]]:
    """(how to reach the server, repository for the floor, server record); starts and stops our own server
    if needed. The per-backend models are built (in a child process) only when this run starts its own
    server over a repository of its own."""
    from kernelport.examples import build_example_repository

    repository = args.model_repository
    record: dict[str, Any] = {"started_by_benchmark": args.socket is None}
    if repository is None:
        repository = os.path.join(workdir, "model_repository")
        build_example_repository(repository)
        if args.socket is None and any(m in BACKEND_MODELS for m in args.models):
            t0 = time.monotonic()
            build_backend_models(repository)
            record["backend_models_built_s"] = round(time.monotonic() - t0, 1)
            print(f"built the per-backend models in {record['backend_models_built_s']:.0f} s", file=sys.stderr)
    if args.socket is not None:
        yield Target(args.socket, grpc_url=args.grpc_url), repository, record
        return
    t0 = time.monotonic()
    server, port = start_server(repository, os.path.join(workdir, "kp.sock"), args.grpc_port)
    record.update(pid=server.proc.pid, grpc_port=port, started_s=round(time.monotonic() - t0, 1))
    print(f"server started in {record['started_s']:.0f} s (gRPC on 127.0.0.1:{port})", file=sys.stderr)
    try:
        yield Target(server.socket_path, grpc_url=f"127.0.0.1:{port}"), repository, record
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
    p.add_argument("--grpc-url", help="with --socket: the running server's gRPC address host:port (the gRPC "
                   "paths and ModelStatistics need it)")
    p.add_argument("--grpc-port", type=int, help="the gRPC port of the server this script starts (default: a "
                   "free one)")
    p.add_argument("--models", help="comma-separated models or groups: " + "; ".join(
                   f"{g} = {','.join(ms)}" for g, ms in MODEL_GROUPS.items() if g != "all")
                   + " (default: all; with --socket: examples)")
    p.add_argument("--paths", help="comma-separated served paths (the floor is always measured; default: all "
                   "but the diagnostic ones for the examples, " + ",".join(BACKEND_DEFAULT_PATHS) + " for the "
                   "per-backend models; given, every selected model gets these): "
                   + ", ".join(s.name for s in PATHS if not s.in_process))
    p.add_argument("--diagnostics", action="store_true",
                   help="also run the diagnostic paths: " + ", ".join(s.name for s in PATHS if s.diagnostic))
    p.add_argument("--iterations", type=int, help="timed requests per concurrency-1 repeat (default: "
                   + ", ".join(f"{m} {n}" for m, n in DEFAULT_ITERATIONS.items()) + ")")
    p.add_argument("--repeats", type=int, help="repeats of every row (default 3; --quick: 1)")
    p.add_argument("--processes", type=int, default=16, help="client processes for the concurrency rows")
    p.add_argument("--duration", type=float, help="seconds of requests per concurrency row (default 5; --quick: "
                   "0.5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per process, concurrency rows (default 0.5; "
                   "--quick: 0.1)")
    p.add_argument("--json", help="where to write the JSON (default: bench/results/latency-<date>.json)")
    p.add_argument("--quick", action="store_true", help="small counts: the whole run in about 90 s (smoke)")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "examples" if args.socket is not None else "all"
    models: list[str] = []
    for m in (m for m in args.models.split(",") if m):
        if m not in MODELS and m not in MODEL_GROUPS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)}; groups: {', '.join(MODEL_GROUPS)})")
        models += [x for x in MODEL_GROUPS.get(m, (m,)) if x not in models]
    args.models = [m for m in MODELS if m in models]
    known = {s.name: s for s in PATHS}
    given = args.paths is not None
    names = [n for n in args.paths.split(",") if n] if given else [s.name for s in PATHS if not s.diagnostic]
    if args.diagnostics:
        names += [s.name for s in PATHS if s.diagnostic and s.name not in names]
    for n in names:
        if n not in known:
            p.error(f"unknown path {n!r} (known: {', '.join(s.name for s in PATHS if not s.in_process)})")
    # model -> its paths, the floor first
    args.model_paths = {
        m: [s for s in PATHS if s.in_process or (s.name in names and (
            given or m not in BACKEND_MODELS or s.name in BACKEND_DEFAULT_PATHS))]
        for m in args.models}
    args.paths = [s for s in PATHS if any(s in ps for ps in args.model_paths.values())]
    if args.socket is not None and args.grpc_url is None and any(s.grpc for s in args.paths):
        p.error("the gRPC paths need --grpc-url with --socket (or leave them out: --paths)")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.5 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.1 if args.quick else 0.5
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
    t_start = time.monotonic()

    def elapsed() -> str:
        return f"{time.monotonic() - t_start:.0f} s"

    load_before = background_load()
    print(f"background load before the run: CPU {_pct(load_before['cpu_busy_fraction'])} busy, "
          f"loadavg {load_before['loadavg'][0]:.2f}", file=sys.stderr)
    foreign = ForeignLoad()
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as workdir:
        with serving(args, workdir) as (target, repository, server_record):
            # tritonclient (protobuf) is loaded here, before any TensorFlow floor: see tests/test_conformance.py
            statistics = GrpcStatistics(target.grpc_url) if target.grpc_url else None
            with Client(target.socket_path) as client:
                infos: dict[str, dict[str, Any]] = {}
                for m in args.models:
                    with recording_failure(failures, m, "metadata"):
                        infos[m] = client.model_metadata(m)
                models = [m for m in args.models if m in infos]
                print(f"[{elapsed()}] concurrency 1: {args.repeats} repeat(s)", file=sys.stderr)
                for m in models:
                    with recording_failure(failures, m, "concurrency 1"):
                        rows += bench_concurrency_1(m, infos[m], args.model_paths[m], target, repository, client,
                                                    iterations[m], args.repeats)
                print(f"[{elapsed()}] concurrency {args.processes}: {args.repeats} repeat(s) of {args.duration:g} s",
                      file=sys.stderr)
                pool = ClientPool(target, args.processes, timeout=120.0)
                try:
                    for m in models:
                        concurrent = [s for s in args.model_paths[m] if s.concurrent and not s.in_process]
                        with recording_failure(failures, m, f"concurrency {args.processes}"):
                            floor = bench_floor_throughput(m, infos[m], repository, args.warmup, args.duration,
                                                           args.repeats)
                            rows.append(floor)
                            rows += bench_concurrency_n(m, infos[m], concurrent, pool, client, floor,
                                                        args.warmup, args.duration, args.repeats,
                                                        server_record.get("pid"), statistics)
                finally:
                    pool.close()
                    if statistics is not None:
                        statistics.close()
    figures = evaluate_figures(rows, args.models, args.processes,
                               {m: [s.name for s in ps] for m, ps in args.model_paths.items()})
    finished = _dt.datetime.now(_dt.timezone.utc)
    others_during_run = foreign.fraction()
    load_after = background_load()

    print()
    print(format_table(rows))
    print()
    print("floor = the model's framework called in this process on the same file, with the worker's thread "
          "settings (" + "; ".join(f"{m}: {floor_framework(m)}" for m in args.models if m in BACKEND_MODELS)
          + ("; others: " if any(m in BACKEND_MODELS for m in args.models) else "") + "onnxruntime); c=1 rows: "
          "medians over repeats of p50/p99; c=N rows: batch-1 requests from N processes, against the floor's "
          "in-process throughput at the model's max batch size (one thread); mean batch: lane counters "
          "(rows / batches), for the gRPC rows at c=N ModelStatistics (inference_count / execution_count)")
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
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(),
        "background_load": {"before": load_before, "after": load_after,
                            "others_cpu_during_run": others_during_run},
        "settings": {"models": args.models, "iterations": iterations, "repeats": args.repeats,
                     "processes": args.processes, "duration_s": args.duration, "warmup_s": args.warmup,
                     "quick": args.quick,
                     "model_paths": {m: [s.name for s in ps] for m, ps in args.model_paths.items()}},
        "floors": {m: FLOOR_WHAT[floor_framework(m)] for m in args.models},
        "paths": [asdict(s) for s in args.paths],
        "server": server_record,
        "rows": [asdict(r) for r in rows],
        "figures": [asdict(f) for f in figures],
        "failures": failures,
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {json_path} (the run took {elapsed()})")
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
