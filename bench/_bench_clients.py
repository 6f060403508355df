"""The served paths of `bench/latency.py`, as requesters, and the client process its concurrency rows spawn.

The requesters live in `kernelport.benchmark.requesters` (shared with `kernelport bench`) and are
re-exported here. A *requester* is one way of sending a request to the server, made once per (path, model)
and then called in a loop: `requester()` does one request and returns when its outputs can be read;
`requester.result()` does one request and returns copies of its outputs (to check them); `requester.close()`
lets go of the connection. `REQUESTERS` maps a path name to a factory `(target, model, inputs) -> requester`.

Adding a path: write its requester in `kernelport.benchmark.requesters`, add it to `REQUESTERS`, add a
`PathSpec` line to `PATHS` in `latency.py`, and carry what it needs to reach the server in `Target`. A
requester's `request_errors` are the exceptions a failed request raises (counted per row, not timed, in
the concurrency rows).

The gRPC paths use `tritonclient.grpc`, an independent client (Triton's): `grpc` sends the tensors in the
request and gets them back in the response; `grpc-shm` puts inputs and outputs in system shared memory
regions registered once. `GrpcStatistics` reads a model's ModelStatistics (samples and executions: the mean
batch size of the gRPC rows).

This module is imported by spawned client processes, so it imports no framework (numpy and the
KernelPort client only; tritonclient inside the gRPC requesters).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

from kernelport.benchmark.measure import reap_clients
from kernelport.benchmark.requesters import (  # noqa: F401 (re-exported for the bench scripts)
    REQUESTERS,
    GrpcRaw,
    GrpcSharedMemory,
    GrpcStatistics,
    HttpRaw,
    LanePingPong,
    LocalCopy,
    LocalZeroCopy,
    Requester,
    Target,
    error_kind,
    make_inputs,
)

# ---- the spawned client process ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadRun:
    """One concurrency row, as each client process runs it."""

    path: str
    model: str
    info: dict[str, Any]  # Client.model_metadata(model)
    warmup_s: float
    duration_s: float
    barrier_timeout_s: float


def client_process_main(conn: Connection, target: Target, index: int, barrier: Barrier) -> None:
    """Serve `LoadRun`s from the parent until it sends None.

    Per run: make the requester, warm up, wait on the barrier twice (the parent reads the counters in
    between: all clients warm, none timing yet), then do requests for `duration_s` and send back
    ("ok", first start ns, last end ns, latencies ns as int64 bytes, {error type: count}), or
    ("error", text): exactly one
    reply per run. On an error the barrier is aborted, so nobody waits for this process.
    """
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(_run_load(job, target, index, barrier))
        except Exception as exc:  # reported to the parent, which records the failure
            barrier.abort()
            conn.send(("error", f"client {index}: {type(exc).__name__}: {exc}"))


MAX_CONSECUTIVE_ERRORS = 20  # then the server is not just slow: fail the row


def _run_load(job: LoadRun, target: Target, index: int,
              barrier: Barrier) -> tuple[str, int, int, bytes, dict[str, int]]:
    inputs = make_inputs(job.info, 1, seed=1000 + index)
    requester = REQUESTERS[job.path](target, job.model, inputs)
    # A request the server fails (say, a commit timeout when this process was descheduled between claim
    # and commit) is counted by error type, not timed, and the run goes on: the row reports the count.
    errors: dict[str, int] = {}
    failures = requester.request_errors
    streak = 0

    def attempt() -> bool:
        nonlocal streak
        try:
            requester()
        except failures as exc:
            kind = error_kind(exc)  # the type, with the status a tritonclient error carries
            errors[kind] = errors.get(kind, 0) + 1
            streak += 1
            if streak >= MAX_CONSECUTIVE_ERRORS:
                raise
            return False
        streak = 0
        return True

    try:
        clock = time.perf_counter_ns
        warm_until = clock() + int(job.warmup_s * 1e9)
        attempt()
        while clock() < warm_until:
            attempt()
        errors.clear()
        barrier.wait(job.barrier_timeout_s)  # all warm
        barrier.wait(job.barrier_timeout_s)  # the parent has read the counters: go
        latencies: list[int] = []
        record = latencies.append
        start = clock()
        deadline = start + int(job.duration_s * 1e9)
        end = start
        while end < deadline:
            t0 = clock()
            ok = attempt()
            end = clock()
            if ok:
                record(end - t0)
        return ("ok", start, end, np.asarray(latencies, dtype=np.int64).tobytes(), errors)
    finally:
        requester.close()


def stop_clients(conns: Sequence[Connection], procs: Sequence[Any]) -> None:
    """Tell every client process to leave (a None on its pipe), wait for it, kill what does not leave,
    close the pipes."""
    for c in conns:
        try:
            c.send(None)
        except OSError:
            pass
    reap_clients(conns, procs)
