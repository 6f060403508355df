"""The served paths of `bench/latency.py`, as requesters, and the client process its concurrency rows spawn.

A *requester* is one way of sending a request to the server, made once per (path, model) and then called
in a loop: `requester()` does one request and returns when its outputs can be read; `requester.result()`
does one request and returns copies of its outputs (to check them); `requester.close()` lets go of the
connection. `REQUESTERS` maps a path name to a factory `(target, model, inputs) -> requester`.

Adding a path: write its requester here, add it to `REQUESTERS`, add a `PathSpec` line to `PATHS` in
`latency.py`, and carry what it needs to reach the server in `Target`. A requester's `request_errors` are the
exceptions a failed request raises (counted per row, not timed, in the concurrency rows).

The gRPC paths use `tritonclient.grpc`, an independent client (Triton's): `grpc` sends the tensors in the
request and gets them back in the response; `grpc-shm` puts inputs and outputs in system shared memory
regions registered once. `GrpcStatistics` reads a model's ModelStatistics (samples and executions: the mean
batch size of the gRPC rows).

This module is imported by spawned client processes, so it imports no framework (numpy and the
KernelPort client only; tritonclient inside the gRPC requesters).
"""

from __future__ import annotations

import itertools
import os
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
    grpc_url: str | None = None  # host:port of the server's gRPC front end (the gRPC paths)


class Requester(Protocol):
    request_errors: tuple[type[Exception], ...]

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

    request_errors: tuple[type[Exception], ...] = (KernelPortError,)

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

    request_errors: tuple[type[Exception], ...] = (KernelPortError,)

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

    request_errors: tuple[type[Exception], ...] = (KernelPortError,)

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


def _tritonclient_grpc() -> tuple[Any, tuple[type[Exception], ...]]:
    """(tritonclient.grpc, the exceptions a failed request raises)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    return grpcclient, (InferenceServerException,)


def _grpc_url(target: Target, model: str) -> str:
    if target.grpc_url is None:
        raise RuntimeError(f"model '{model}': the gRPC paths need the server's gRPC address (--grpc-url)")
    return target.grpc_url


def _output_layout(meta: Any, batch: int | None) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of each output, from the model's gRPC metadata; the batch dimension (-1) of
    a batching model is the request's."""
    out = []
    for t in meta.outputs:
        shape = [int(d) for d in t.shape]
        if batch is not None and shape and shape[0] == -1:
            shape[0] = batch
        if any(d < 0 for d in shape):
            raise ValueError(f"model '{meta.name}' output '{t.name}': the benchmark reads fixed dims only")
        out.append((t.name, t.datatype, shape))
    return out


class GrpcRaw:
    """tritonclient.grpc, tensors in the messages: on every request the inputs are set from numpy
    (`InferInput.set_data_from_numpy`, raw_input_contents) and the outputs read back as numpy
    (`InferResult.as_numpy`, from raw_output_contents)."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        from tritonclient.utils import np_to_triton_dtype

        grpcclient, self.request_errors = _tritonclient_grpc()
        self.client = grpcclient.InferenceServerClient(_grpc_url(target, model))
        self.model = model
        self.timeout = target.timeout_s
        self.arrays = list(inputs.values())
        self.inputs = [grpcclient.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
                       for name, a in inputs.items()]
        meta = self.client.get_model_metadata(model)
        self.output_names = [t.name for t in meta.outputs]
        self.outputs = [grpcclient.InferRequestedOutput(name) for name in self.output_names]

    def _infer(self) -> Any:
        for tensor, value in zip(self.inputs, self.arrays):
            tensor.set_data_from_numpy(value)
        return self.client.infer(self.model, self.inputs, outputs=self.outputs, client_timeout=self.timeout)

    def __call__(self) -> None:
        response = self._infer()
        for name in self.output_names:
            response.as_numpy(name)

    def result(self) -> dict[str, np.ndarray] | None:
        response = self._infer()
        return {name: response.as_numpy(name).copy() for name in self.output_names}

    def close(self) -> None:
        self.client.close()


class GrpcSharedMemory:
    """tritonclient.grpc with system shared memory for inputs and outputs: one input and one output region
    (`tritonclient.utils.shared_memory`), created and registered once. Every request writes the inputs into
    the input region, names each input's and output's place in the regions (`set_shared_memory`), and reads
    the outputs from the output region in place (`get_contents_as_numpy`: views, nothing copies them)."""

    _regions = itertools.count()

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

        grpcclient, self.request_errors = _tritonclient_grpc()
        self.shm = shm
        self.client = grpcclient.InferenceServerClient(_grpc_url(target, model))
        self.model = model
        self.timeout = target.timeout_s
        self.arrays = list(inputs.values())
        batch = int(self.arrays[0].shape[0]) if self.arrays and self.arrays[0].ndim else None
        meta = self.client.get_model_metadata(model)
        if not any(int(t.shape[0]) == -1 for t in meta.inputs if t.shape):
            batch = None  # not a batching model: the shapes are the model's own
        self.inputs, self.input_places = [], []
        offset = 0
        for name, a in inputs.items():
            self.inputs.append(grpcclient.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype)))
            self.input_places.append((a.nbytes, offset))
            offset += a.nbytes
        in_size = offset
        self.outputs, self.output_places, self.output_views = [], [], []
        offset = 0
        for name, datatype, shape in _output_layout(meta, batch):
            dtype = np.dtype(triton_to_np_dtype(datatype))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.outputs.append(grpcclient.InferRequestedOutput(name))
            self.output_places.append((nbytes, offset))
            self.output_views.append((name, dtype, shape, offset))
            offset += nbytes
        out_size = offset
        # Names and keys unique per process and requester; never the server's reserved prefixes (kp_, ...).
        tag = f"bench_{os.getpid()}_{next(self._regions)}"
        self.in_name, self.out_name = f"{tag}_in", f"{tag}_out"
        self.handles: list[Any] = []
        self.registered: list[str] = []
        try:
            self.in_handle = self._region(self.in_name, f"/{tag}_in", in_size)
            self.out_handle = self._region(self.out_name, f"/{tag}_out", out_size)
        except BaseException:
            self.close()
            raise

    def _region(self, name: str, key: str, size: int) -> Any:
        handle = self.shm.create_shared_memory_region(name, key, size, create_only=True)
        self.handles.append(handle)
        self.client.register_system_shared_memory(name, key, size)
        self.registered.append(name)
        return handle

    def _infer(self) -> None:
        self.shm.set_shared_memory_region(self.in_handle, self.arrays)
        for tensor, (size, offset) in zip(self.inputs, self.input_places):
            tensor.set_shared_memory(self.in_name, size, offset)
        for output, (size, offset) in zip(self.outputs, self.output_places):
            output.set_shared_memory(self.out_name, size, offset)
        self.client.infer(self.model, self.inputs, outputs=self.outputs, client_timeout=self.timeout)

    def __call__(self) -> None:
        self._infer()
        for _, dtype, shape, offset in self.output_views:
            self.shm.get_contents_as_numpy(self.out_handle, dtype, shape, offset)

    def result(self) -> dict[str, np.ndarray] | None:
        self._infer()
        return {name: self.shm.get_contents_as_numpy(self.out_handle, dtype, shape, offset).copy()
                for name, dtype, shape, offset in self.output_views}

    def close(self) -> None:
        # unregister before destroying: the server unmaps a region when its last request is done
        for name in self.registered:
            try:
                self.client.unregister_system_shared_memory(name)
            except self.request_errors:
                pass  # the server is gone; the regions go with this process's handles below
        self.registered.clear()
        for handle in self.handles:
            self.shm.destroy_shared_memory_region(handle)
        self.handles.clear()
        self.client.close()


class GrpcStatistics:
    """A model's ModelStatistics over gRPC (`get_inference_statistics`): samples inferred
    (`inference_count`), backend executions (`execution_count`), successful and failed requests."""

    def __init__(self, url: str) -> None:
        grpcclient, _ = _tritonclient_grpc()
        self.client = grpcclient.InferenceServerClient(url)

    def read(self, model: str) -> dict[str, int]:
        stats = self.client.get_inference_statistics(model).model_stats
        if len(stats) != 1:
            raise RuntimeError(f"model '{model}': expected statistics of one version, got {len(stats)}")
        s = stats[0]
        return {"inference_count": int(s.inference_count), "execution_count": int(s.execution_count),
                "success": int(s.inference_stats.success.count), "fail": int(s.inference_stats.fail.count)}

    def close(self) -> None:
        self.client.close()


REQUESTERS: dict[str, Callable[[Target, str, Mapping[str, np.ndarray]], Requester]] = {
    "local-copy": LocalCopy,
    "local-zero-copy": LocalZeroCopy,
    "lane-ping-pong": LanePingPong,
    "grpc": GrpcRaw,
    "grpc-shm": GrpcSharedMemory,
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
    failures = requester.request_errors
    streak = 0

    def attempt() -> bool:
        nonlocal streak
        try:
            requester()
        except failures as exc:
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
