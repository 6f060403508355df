"""The served paths of `bench/latency.py`, as requesters, and the client process its concurrency rows spawn.

A *requester* is one way of sending a request to the server, made once per (path, model) and then called
in a loop: `requester()` does one request and returns when its outputs can be read; `requester.result()`
does one request and returns copies of its outputs (to check them); `requester.close()` lets go of the
connection. `REQUESTERS` maps a path name to a factory `(target, model, inputs) -> requester`.

Adding a path (gRPC, say): write its requester here, add it to `REQUESTERS`, add a `PathSpec` line to
`PATHS` in `latency.py`, and carry what it needs to reach the server in `Target`.

This module is imported by spawned client processes, so it imports no framework (numpy and the
KernelPort client only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any, Protocol

import numpy as np

from kernelport import Client, KernelPortError


@dataclass(frozen=True)
class Target:
    """How a requester reaches the server (picklable: it crosses into spawned client processes)."""

    socket_path: str
    timeout_s: float = 30.0  # per request: a stuck server fails the row instead of stalling the run


class Requester(Protocol):
    def __call__(self) -> None: ...

    def result(self) -> dict[str, np.ndarray] | None: ...

    def close(self) -> None: ...


def make_inputs(info: Mapping[str, Any], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal inputs of `batch` samples for a model, from its metadata (`Client.model_metadata`)."""
    rng = np.random.default_rng(seed)
    batched = int(info["max_batch_size"]) > 0
    out: dict[str, np.ndarray] = {}
    for t in info["inputs"]:
        if t["datatype"] != "FP32" or any(int(d) < 0 for d in t["dims"]):
            raise ValueError(f"model '{info['name']}' input '{t['name']}': the benchmark feeds FP32 fixed dims only")
        shape = ([batch] if batched else []) + [int(d) for d in t["dims"]]
        out[t["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return out


class LocalCopy:
    """The local client's copy form: `Client.infer` (inputs copied in, outputs copied out)."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.client = Client(target.socket_path, timeout=target.timeout_s)
        self.model = model
        self.inputs = dict(inputs)

    def __call__(self) -> None:
        self.client.infer(self.model, self.inputs)

    def result(self) -> dict[str, np.ndarray] | None:
        return self.client.infer(self.model, self.inputs)

    def close(self) -> None:
        self.client.close()


class LocalZeroCopy:
    """The local client's zero-copy form: claim rows, write the inputs in place, run, read the outputs in
    place (the outputs are views; nothing copies them), release."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.client = Client(target.socket_path, timeout=target.timeout_s)
        self.model = model
        self.inputs = list(inputs.items())
        self.batch = int(next(iter(inputs.values())).shape[0])

    def __call__(self) -> None:
        with self.client.request(self.model, batch=self.batch) as req:
            rows = req.inputs
            for name, value in self.inputs:
                rows[name][:] = value
            req.run()

    def result(self) -> dict[str, np.ndarray] | None:
        with self.client.request(self.model, batch=self.batch) as req:
            for name, value in self.inputs:
                req.inputs[name][:] = value
            return {name: view.copy() for name, view in req.run().items()}

    def close(self) -> None:
        self.client.close()


class LanePingPong:
    """Diagnostic floor of the transport: the lane round trip alone (claim, commit, wait, release) on the
    client's mapped lane, writing nothing: the rows hold whatever the last request left. It reaches into
    the client's internals (`_models`, `lanes`), so it may need updating when they change."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.client = Client(target.socket_path, timeout=target.timeout_s)
        self.model = model
        self.batch = int(next(iter(inputs.values())).shape[0])
        with self.client.request(model, batch=self.batch) as req:  # maps the lane of these shapes
            for name, value in inputs.items():
                req.inputs[name][:] = value
            req.run()
        lanes = self.client._models[model].lanes
        if len(lanes) != 1:
            raise RuntimeError(f"model '{model}': expected one mapped lane, found {len(lanes)}")
        self.lane = next(iter(lanes.values())).lane
        self.owner = self.client.owner
        self.timeout = target.timeout_s

    def __call__(self) -> None:
        lane, n, owner = self.lane, self.batch, self.owner
        seq, row = lane.claim(n, owner, self.timeout)
        status = lane.commit_and_wait(seq, row, n, owner, self.timeout)
        lane.release(seq, row, n, owner)
        if status != 0:
            raise RuntimeError(f"model '{self.model}': lane round trip failed with status {status}")

    def result(self) -> dict[str, np.ndarray] | None:
        self()
        return None  # nothing was written: nothing to check

    def close(self) -> None:
        self.client.close()


REQUESTERS: dict[str, Callable[[Target, str, Mapping[str, np.ndarray]], Requester]] = {
    "local-copy": LocalCopy,
    "local-zero-copy": LocalZeroCopy,
    "lane-ping-pong": LanePingPong,
}


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
    streak = 0

    def attempt() -> bool:
        nonlocal streak
        try:
            requester()
        except KernelPortError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
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
