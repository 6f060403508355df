"""Measuring requests: timed loops, percentiles, and the client runs of `kernelport bench`.

`time_calls` and `time_for` time a callable in this process (the benchmark scripts' concurrency-1 rows and
floors). `run_clients` runs a requester in one thread (concurrency 1) or in N spawned client processes, a
request count or a duration each, after a warm-up, and gathers every request's latency and every failed
request's kind; `Summary` is what it found.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from kernelport.benchmark.requesters import REQUESTERS, Target, error_kind

__all__ = ["ClientJob", "Summary", "percentiles_us", "reap_clients", "run_clients", "summarize", "time_calls",
           "time_for"]

MAX_CONSECUTIVE_ERRORS = 100  # then the server is not just slow: that client stops and says so
PERCENTILES = (50.0, 90.0, 99.0)


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


def percentiles_us(ns: np.ndarray) -> tuple[float, float]:
    """(p50, p99) in microseconds of latencies in nanoseconds."""
    p50, p99 = np.percentile(ns, [50, 99])
    return float(p50) / 1e3, float(p99) / 1e3


# ---- client runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientJob:
    """What each client does (picklable: it crosses into spawned client processes)."""

    path: str
    model: str
    inputs: dict[str, np.ndarray]
    requests: int | None  # timed requests of this client, or None: until `duration_s` has passed
    duration_s: float | None
    warmup: int  # untimed requests first
    sync_timeout_s: float = 120.0


@dataclass
class ClientResult:
    start_ns: int
    end_ns: int
    latencies_ns: np.ndarray
    errors: dict[str, int]
    gave_up: str = ""


def _client_run(job: ClientJob, target: Target, progress: Any, index: int,
                all_warm: Callable[[], None]) -> ClientResult:
    """One client: warm up, wait for `all_warm` (every client warm, the parent has read the server's
    statistics), then the timed requests. A failed request is counted by kind, not timed."""
    requester = REQUESTERS[job.path](target, job.model, job.inputs)
    errors: dict[str, int] = {}
    failures = requester.request_errors
    try:
        for _ in range(job.warmup):
            try:
                requester()
            except failures:
                pass
        all_warm()
        clock = time.perf_counter_ns
        latencies: list[int] = []
        record = latencies.append
        streak = 0
        gave_up = ""
        n = 0
        start = end = clock()
        deadline = start + int(job.duration_s * 1e9) if job.duration_s is not None else None
        while (n < job.requests) if job.requests is not None else (end < deadline):  # type: ignore[operator]
            t0 = clock()
            try:
                requester()
            except failures as exc:
                end = clock()
                kind = error_kind(exc)
                errors[kind] = errors.get(kind, 0) + 1
                streak += 1
                if streak >= MAX_CONSECUTIVE_ERRORS:
                    gave_up = f"client {index} stopped after {streak} failed requests in a row ({kind}: {exc})"[:400]
                    progress[index] += 1
                    break
            else:
                end = clock()
                record(end - t0)
                streak = 0
            n += 1
            progress[index] += 1
        return ClientResult(start, end, np.asarray(latencies, dtype=np.int64), errors, gave_up)
    finally:
        requester.close()


def _client_process_main(conn: Connection, job: ClientJob, target: Target, progress: Any, index: int,
                         barrier: Any) -> None:
    """A spawned client: one run, one reply ("ok", start, end, latencies bytes, errors, gave_up) or
    ("error", text). On an error the barrier is aborted, so nobody waits for this process."""

    def all_warm() -> None:
        barrier.wait(job.sync_timeout_s)  # every client warm
        barrier.wait(job.sync_timeout_s)  # the parent has read the statistics: go

    try:
        r = _client_run(job, target, progress, index, all_warm)
        conn.send(("ok", r.start_ns, r.end_ns, r.latencies_ns.tobytes(), r.errors, r.gave_up))
    except BaseException as exc:  # reported to the parent
        barrier.abort()
        conn.send(("error", f"client {index}: {type(exc).__name__}: {exc}"[:2000]))
    finally:
        conn.close()


def split_requests(total: int, clients: int) -> list[int]:
    """`total` requests shared by `clients` as evenly as can be."""
    return [total // clients + (1 if i < total % clients else 0) for i in range(clients)]


def run_clients(job: ClientJob, target: Target, concurrency: int, *,
                at_start: Callable[[], None] = lambda: None,
                on_progress: Callable[[int, float], None] | None = None,
                progress_interval_s: float = 0.1) -> list[ClientResult]:
    """Run `job` in `concurrency` clients: one thread of this process when 1, else spawned processes (so
    their Python does not share a GIL). With a request count, `job.requests` is the total, shared out.
    `at_start` runs when every client is warm and none is timing yet; `on_progress(requests done, seconds
    since the start)` is called every `progress_interval_s` while they run. Raises RuntimeError when a
    client fails (cannot connect, a bad input, ...)."""
    counts = split_requests(job.requests, concurrency) if job.requests is not None else [None] * concurrency
    if concurrency == 1:
        return [_run_in_thread(job, target, at_start, on_progress, progress_interval_s)]
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", concurrency, lock=False)  # each client writes only its own slot
    barrier = ctx.Barrier(concurrency + 1)
    conns: list[Connection] = []
    procs: list[Any] = []
    try:
        for i, n in enumerate(counts):
            parent, child = ctx.Pipe(duplex=False)
            one = ClientJob(job.path, job.model, job.inputs, n, job.duration_s, job.warmup, job.sync_timeout_s)
            p = ctx.Process(target=_client_process_main, args=(child, one, target, progress, i, barrier),
                            daemon=True, name=f"kp-bench-client-{i}")
            p.start()
            child.close()
            conns.append(parent)
            procs.append(p)
        started = True
        try:
            barrier.wait(job.sync_timeout_s)
            at_start()
            barrier.wait(job.sync_timeout_s)
        except threading.BrokenBarrierError:
            started = False
        t0 = time.monotonic()
        replies: list[Any] = [None] * concurrency
        pending = set(range(concurrency))
        while pending:
            ready = wait([conns[i] for i in pending], timeout=progress_interval_s)
            for i in [i for i in pending if conns[i] in ready]:
                try:
                    replies[i] = conns[i].recv()
                except (EOFError, OSError):
                    procs[i].join(5)
                    replies[i] = ("error", f"client {i} exited (code {procs[i].exitcode}) without a result")
                pending.discard(i)
            if on_progress is not None and started:
                on_progress(int(sum(progress)), time.monotonic() - t0)
        errors = [str(r[1]) for r in replies if r[0] != "ok"]
        if errors or not started:
            raise RuntimeError("; ".join(errors) or "the client processes did not start together")
        if on_progress is not None:
            on_progress(int(sum(progress)), time.monotonic() - t0)
        return [ClientResult(int(r[1]), int(r[2]), np.frombuffer(r[3], dtype=np.int64), dict(r[4]), str(r[5]))
                for r in replies]
    finally:
        reap_clients(conns, procs)


def reap_clients(conns: Sequence[Connection], procs: Sequence[Any]) -> None:
    """Wait for client processes to leave (10 s), kill those that do not, close their pipes."""
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
    for c in conns:
        c.close()


def _run_in_thread(job: ClientJob, target: Target, at_start: Callable[[], None],
                   on_progress: Callable[[int, float], None] | None, interval: float) -> ClientResult:
    """One client in a thread; `at_start` runs in the caller's thread (tritonclient.http's connections
    belong to the thread, gevent's hub, that made them), between the warm-up and the timed requests."""
    progress = [0]
    out: list[Any] = []
    warm, go = threading.Event(), threading.Event()

    def all_warm() -> None:
        warm.set()
        go.wait()

    def body() -> None:
        try:
            out.append(_client_run(job, target, progress, 0, all_warm))
        except BaseException as exc:  # re-raised in the caller's thread
            out.append(exc)
        finally:
            warm.set()

    t = threading.Thread(target=body, name="kp-bench-client", daemon=True)
    t.start()
    warm.wait()
    try:
        if t.is_alive() and not out:
            at_start()
    finally:
        go.set()
    t0 = time.monotonic()
    while t.is_alive():
        t.join(interval)
        if on_progress is not None:
            on_progress(progress[0], time.monotonic() - t0)
    if isinstance(out[0], BaseException):
        raise RuntimeError(f"client 0: {type(out[0]).__name__}: {out[0]}") from out[0]
    if on_progress is not None:
        on_progress(progress[0], time.monotonic() - t0)
    return out[0]


# ---- the summary ---------------------------------------------------------------------------------------


@dataclass
class Summary:
    model: str
    path: str
    target: str
    concurrency: int
    batch: int  # samples per request
    count: int  # successful requests, timed
    errors: dict[str, int]
    elapsed_s: float  # first start to last end, over the clients
    throughput_rps: float  # successful requests per second
    throughput_ips: float  # inferences (samples) per second
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    min_us: float
    mean_us: float
    warmup: int  # untimed requests per client
    server: dict[str, int] = field(default_factory=dict)  # ModelStatistics delta over the timed requests
    notes: list[str] = field(default_factory=list)
    latencies_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "latencies_ns"}
        d["error_count"] = sum(self.errors.values())
        return d


def summarize(results: Sequence[ClientResult], *, model: str, path: str, target: str, batch: int,
              warmup: int) -> Summary:
    lat = np.concatenate([r.latencies_ns for r in results]) if results else np.empty(0, np.int64)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    elapsed = (max(r.end_ns for r in results) - min(r.start_ns for r in results)) / 1e9 if results else 0.0
    if len(lat):
        p50, p90, p99 = (float(x) / 1e3 for x in np.percentile(lat, PERCENTILES))
        mx, mn, mean = float(lat.max()) / 1e3, float(lat.min()) / 1e3, float(lat.mean()) / 1e3
    else:
        p50 = p90 = p99 = mx = mn = mean = float("nan")
    rps = len(lat) / elapsed if elapsed > 0 else 0.0
    return Summary(model, path, target, len(results), batch, int(len(lat)), errors, elapsed, rps, rps * batch,
                   p50, p90, p99, mx, mn, mean, warmup, notes=[r.gave_up for r in results if r.gave_up],
                   latencies_ns=lat)


def server_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: int(after[k]) - int(before.get(k, 0)) for k in after}
