"""The served paths, as requesters: one way each of sending a request to a KernelPort server.

A *requester* is made once per (path, model) and then called in a loop: `requester()` does one request and
returns when its outputs can be read; `requester.result()` does one request and returns copies of its
outputs (to check them); `requester.close()` lets go of the connection. `REQUESTERS` maps a path name to a
factory `(target, model, inputs) -> requester`. A requester's `request_errors` are the exceptions a failed
request raises (counted by kind, not timed).

Paths: `local-copy` (`Client.infer`), `local-zero-copy` (`Client.request`, inputs written into the rows,
outputs read in place), `lane-ping-pong` (diagnostic: the lane round trip alone), `grpc` and `grpc-shm`
(`tritonclient.grpc`, tensors in the messages or in registered system shared memory) and `http`
(`tritonclient.http`, binary tensor data). The remote paths use tritonclient, an independent client.

This module is imported by spawned client processes, so it imports no framework (numpy and the KernelPort
client only; tritonclient inside the remote requesters).
"""

from __future__ import annotations

import itertools
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kernelport.client.client import Client
from kernelport.errors import KernelPortError

__all__ = [
    "REQUESTERS", "GrpcRaw", "GrpcSharedMemory", "GrpcStatistics", "HttpRaw", "HttpStatistics", "LanePingPong",
    "LocalCopy", "LocalZeroCopy", "Requester", "Target", "error_kind", "make_inputs", "model_info",
]  # fmt: skip


@dataclass(frozen=True)
class Target:
    """How a requester reaches the server (picklable: it crosses into spawned client processes)."""

    socket_path: str | None = None
    timeout_s: float = 30.0  # per request: a stuck server fails the request instead of stalling the run
    grpc_url: str | None = None  # host:port of the server's gRPC front end
    http_url: str | None = None  # host:port of the server's HTTP front end
    headers: tuple[tuple[str, str], ...] = ()  # sent with every remote request (authorization)
    tls_ca: str | None = None  # remote paths over TLS, trusting this PEM CA bundle
    tls_cert: str | None = None  # mutual TLS: the client's certificate chain and key
    tls_key: str | None = None


class Requester(Protocol):
    request_errors: tuple[type[Exception], ...]

    def __call__(self) -> None: ...

    def result(self) -> dict[str, np.ndarray] | None: ...

    def close(self) -> None: ...


def error_kind(exc: BaseException) -> str:
    """A short name for a failed request's error, for counting: the exception type, with the status a
    tritonclient error carries (`InferenceServerException[StatusCode.UNAVAILABLE]`)."""
    name = type(exc).__name__
    status = getattr(exc, "status", None)
    if callable(status):
        try:
            code = status()
        except Exception:  # noqa: BLE001 (only a label)
            code = None
        if code:
            return f"{name}[{code}]"
    return name


# ---- inputs --------------------------------------------------------------------------------------------

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


def make_inputs(info: Mapping[str, Any], batch: int, seed: int,
                shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Inputs of `batch` samples for a model, from its metadata (`Client.model_metadata`, or `model_info`):
    floats standard-normal, integers in 0..9, booleans random, BYTES short ASCII strings. A variable
    dimension (-1) takes its size from `shapes[name]` (the per-sample shape, without the batch dimension)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    batched = int(info["max_batch_size"]) > 0
    out: dict[str, np.ndarray] = {}
    for t in info["inputs"]:
        name, datatype = str(t["name"]), str(t["datatype"])
        dims = [int(d) for d in t["dims"]]
        if name in shapes:
            given = [int(d) for d in shapes[name]]
            if len(given) != len(dims) or any(w >= 0 and w != g for w, g in zip(dims, given)) or min(given,
                                                                                                   default=1) < 1:
                raise ValueError(f"model '{info['name']}' input '{name}': shape {given} does not fit dims {dims}")
            dims = given
        elif any(d < 0 for d in dims):
            raise ValueError(f"model '{info['name']}' input '{name}' has variable dims {dims}: give its shape "
                             f"(--shape {name}=" + ",".join("4" if d < 0 else str(d) for d in dims) + ")")
        shape = ([batch] if batched else []) + dims
        if datatype == "BYTES":
            arr = np.empty(shape, dtype=np.object_)
            flat = arr.reshape(-1)
            for i in range(flat.size):
                flat[i] = f"s{rng.integers(0, 1000)}".encode()
            out[name] = arr
            continue
        if datatype not in _NUMPY:
            raise ValueError(f"model '{info['name']}' input '{name}': the benchmark cannot make {datatype} data")
        dtype = np.dtype(_NUMPY[datatype])
        if dtype == np.float32:
            out[name] = rng.standard_normal(shape, dtype=np.float32)
        elif dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            out[name] = rng.integers(0, 10, shape).astype(dtype)
    return out


# ---- the local paths -----------------------------------------------------------------------------------


def _socket(target: Target, model: str) -> str:
    if target.socket_path is None:
        raise ValueError(f"model '{model}': the local paths need the server's unix socket (--socket)")
    return target.socket_path


class LocalCopy:
    """The local client's copy form: `Client.infer` (inputs copied in, outputs copied out)."""

    request_errors: tuple[type[Exception], ...] = (KernelPortError,)

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.client = Client(_socket(target, model), timeout=target.timeout_s)
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
        if any(a.dtype == np.object_ for a in inputs.values()):
            raise ValueError(f"model '{model}': BYTES inputs are served by the copy form only (local-copy)")
        self.client = Client(_socket(target, model), timeout=target.timeout_s)
        self.model = model
        self.inputs = list(inputs.items())
        batched = int(self.client.model_metadata(model)["max_batch_size"]) > 0
        self.batch = int(next(iter(inputs.values())).shape[0]) if batched else 1

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
        self.client = Client(_socket(target, model), timeout=target.timeout_s)
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


# ---- the remote paths (tritonclient) -------------------------------------------------------------------


def _tritonclient_grpc() -> tuple[Any, tuple[type[Exception], ...]]:
    """(tritonclient.grpc, the exceptions a failed request raises)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    return grpcclient, (InferenceServerException,)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_client(target: Target, what: str) -> Any:
    """A tritonclient.grpc client of the target's gRPC address (TLS when the target has a CA)."""
    grpcclient, _ = _tritonclient_grpc()
    if target.grpc_url is None:
        raise ValueError(f"{what}: the gRPC path needs the server's gRPC address (--grpc HOST:PORT)")
    if target.tls_ca is None:
        return grpcclient.InferenceServerClient(target.grpc_url)
    return grpcclient.InferenceServerClient(target.grpc_url, ssl=True, root_certificates=target.tls_ca,
                                            private_key=target.tls_key, certificate_chain=target.tls_cert)


def _tls_context(target: Target) -> ssl.SSLContext:
    """The client side of HTTPS for tritonclient.http, whose connections are gevent's: gevent's SSLContext."""
    import gevent.ssl

    context: ssl.SSLContext = gevent.ssl.create_default_context(cafile=target.tls_ca)
    if target.tls_cert is not None:
        context.load_cert_chain(target.tls_cert, target.tls_key)
    return context


def http_client(target: Target, what: str) -> Any:
    """A tritonclient.http client of the target's HTTP address (HTTPS when the target has a CA)."""
    import tritonclient.http as httpclient

    if target.http_url is None:
        raise ValueError(f"{what}: the HTTP path needs the server's HTTP address (--http HOST:PORT)")
    timeout = max(1.0, target.timeout_s)
    if target.tls_ca is None:
        return httpclient.InferenceServerClient(target.http_url, connection_timeout=timeout, network_timeout=timeout)
    return httpclient.InferenceServerClient(target.http_url, connection_timeout=timeout, network_timeout=timeout,
                                            ssl=True, ssl_context_factory=lambda *_, **__: _tls_context(target))


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


def _triton_datatype(a: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return "BYTES" if a.dtype == np.object_ else str(np_to_triton_dtype(a.dtype))


class _TritonRequester:
    """What the tritonclient requesters share: a subclass sets `client` and `output_names` and sends one
    request in `_infer()`; the outputs are read back as numpy (`InferResult.as_numpy`)."""

    client: Any
    output_names: list[str]

    def _infer(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> None:
        response = self._infer()
        for name in self.output_names:
            response.as_numpy(name)

    def result(self) -> dict[str, np.ndarray] | None:
        response = self._infer()
        return {name: response.as_numpy(name).copy() for name in self.output_names}

    def close(self) -> None:
        self.client.close()


class GrpcRaw(_TritonRequester):
    """tritonclient.grpc, tensors in the messages: on every request the inputs are set from numpy
    (`InferInput.set_data_from_numpy`, raw_input_contents) and the outputs read back as numpy
    (`InferResult.as_numpy`, from raw_output_contents)."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        grpcclient, self.request_errors = _tritonclient_grpc()
        self.client = grpc_client(target, f"model '{model}'")
        self.model = model
        self.timeout = target.timeout_s
        self.headers = dict(target.headers) or None
        self.arrays = list(inputs.values())
        self.inputs = [grpcclient.InferInput(name, list(a.shape), _triton_datatype(a)) for name, a in inputs.items()]
        meta = self.client.get_model_metadata(model, headers=self.headers)
        self.output_names = [t.name for t in meta.outputs]
        self.outputs = [grpcclient.InferRequestedOutput(name) for name in self.output_names]

    def _infer(self) -> Any:
        for tensor, value in zip(self.inputs, self.arrays):
            tensor.set_data_from_numpy(value)
        return self.client.infer(self.model, self.inputs, outputs=self.outputs, client_timeout=self.timeout,
                                 headers=self.headers)



class GrpcSharedMemory:
    """tritonclient.grpc with system shared memory for inputs and outputs: one input and one output region
    (`tritonclient.utils.shared_memory`), created and registered once. Every request writes the inputs into
    the input region, names each input's and output's place in the regions (`set_shared_memory`), and reads
    the outputs from the output region in place (`get_contents_as_numpy`: views, nothing copies them)."""

    _regions = itertools.count()

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import triton_to_np_dtype

        grpcclient, self.request_errors = _tritonclient_grpc()
        if any(a.dtype == np.object_ for a in inputs.values()):
            raise ValueError(f"model '{model}': the grpc-shm path takes fixed-size datatypes only")
        self.shm = shm
        self.client = grpc_client(target, f"model '{model}'")
        self.model = model
        self.timeout = target.timeout_s
        self.headers = dict(target.headers) or None
        self.arrays = list(inputs.values())
        batch = int(self.arrays[0].shape[0]) if self.arrays and self.arrays[0].ndim else None
        meta = self.client.get_model_metadata(model, headers=self.headers)
        if not any(int(t.shape[0]) == -1 for t in meta.inputs if t.shape):
            batch = None  # not a batching model: the shapes are the model's own
        self.inputs, self.input_places = [], []
        offset = 0
        for name, a in inputs.items():
            self.inputs.append(grpcclient.InferInput(name, list(a.shape), _triton_datatype(a)))
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
        self.client.register_system_shared_memory(name, key, size, headers=self.headers)
        self.registered.append(name)
        return handle

    def _infer(self) -> None:
        self.shm.set_shared_memory_region(self.in_handle, self.arrays)
        for tensor, (size, offset) in zip(self.inputs, self.input_places):
            tensor.set_shared_memory(self.in_name, size, offset)
        for output, (size, offset) in zip(self.outputs, self.output_places):
            output.set_shared_memory(self.out_name, size, offset)
        self.client.infer(self.model, self.inputs, outputs=self.outputs, client_timeout=self.timeout,
                          headers=self.headers)

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
                self.client.unregister_system_shared_memory(name, headers=self.headers)
            except self.request_errors:
                pass  # the server is gone; the regions go with this process's handles below
        self.registered.clear()
        for handle in self.handles:
            self.shm.destroy_shared_memory_region(handle)
        self.handles.clear()
        self.client.close()


class HttpRaw(_TritonRequester):
    """tritonclient.http with the binary tensor extension: inputs set from numpy on every request
    (`set_data_from_numpy(binary_data=True)`), outputs asked for as binary data and read as numpy."""

    def __init__(self, target: Target, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        self.request_errors: tuple[type[Exception], ...] = (InferenceServerException,)
        self.client = http_client(target, f"model '{model}'")
        self.model = model
        self.timeout_us = int(target.timeout_s * 1e6)
        self.headers = dict(target.headers) or None
        self.arrays = list(inputs.values())
        self.inputs = [httpclient.InferInput(name, list(a.shape), _triton_datatype(a)) for name, a in inputs.items()]
        meta = self.client.get_model_metadata(model, headers=self.headers)
        self.output_names = [t["name"] for t in meta["outputs"]]
        self.outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in self.output_names]

    def _infer(self) -> Any:
        for tensor, value in zip(self.inputs, self.arrays):
            tensor.set_data_from_numpy(value, binary_data=True)
        return self.client.infer(self.model, self.inputs, outputs=self.outputs, headers=self.headers)


# ---- model metadata and statistics ---------------------------------------------------------------------


def model_info(target: Target, path: str, model: str) -> dict[str, Any]:
    """The model's metadata in the local client's form ({name, max_batch_size, inputs: [{name, datatype,
    dims}], outputs}), through the transport the path uses."""
    what = f"model '{model}'"
    headers = dict(target.headers) or None
    if path.startswith("local") or path == "lane-ping-pong":
        with Client(_socket(target, model), timeout=target.timeout_s) as c:
            return dict(c.model_metadata(model))
    if path.startswith("grpc"):
        c = grpc_client(target, what)
        try:
            meta = c.get_model_metadata(model, headers=headers)
            config = c.get_model_config(model, headers=headers).config
            tensors = {"inputs": [(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                       "outputs": [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]}
            max_batch = int(config.max_batch_size)
        finally:
            c.close()
    else:
        c = http_client(target, what)
        try:
            meta = c.get_model_metadata(model, headers=headers)
            config = c.get_model_config(model, headers=headers)
            tensors = {k: [(t["name"], t["datatype"], list(t["shape"])) for t in meta[k]]
                       for k in ("inputs", "outputs")}
            max_batch = int(config.get("max_batch_size", 0))
        finally:
            c.close()
    skip = 1 if max_batch > 0 else 0  # metadata shapes carry the batch dimension (-1) of a batching model
    return {"name": model, "max_batch_size": max_batch,
            **{k: [{"name": n, "datatype": d, "dims": [int(x) for x in s[skip:]]} for n, d, s in v]
               for k, v in tensors.items()}}


class GrpcStatistics:
    """A model's ModelStatistics over gRPC (`get_inference_statistics`): samples inferred
    (`inference_count`), backend executions (`execution_count`), successful and failed requests."""

    def __init__(self, url: str | Target) -> None:
        target = url if isinstance(url, Target) else Target(grpc_url=url)
        self.headers = dict(target.headers) or None
        self.client = grpc_client(target, "statistics")

    def read(self, model: str) -> dict[str, int]:
        stats = self.client.get_inference_statistics(model, headers=self.headers).model_stats
        if len(stats) != 1:
            raise RuntimeError(f"model '{model}': expected statistics of one version, got {len(stats)}")
        s = stats[0]
        return {"inference_count": int(s.inference_count), "execution_count": int(s.execution_count),
                "success": int(s.inference_stats.success.count), "fail": int(s.inference_stats.fail.count)}

    def close(self) -> None:
        self.client.close()


class HttpStatistics:
    """The same figures as `GrpcStatistics`, over HTTP (`/v2/models/{m}/stats`)."""

    def __init__(self, target: Target) -> None:
        self.headers = dict(target.headers) or None
        self.client = http_client(target, "statistics")

    def read(self, model: str) -> dict[str, int]:
        stats = self.client.get_inference_statistics(model, headers=self.headers)["model_stats"]
        if len(stats) != 1:
            raise RuntimeError(f"model '{model}': expected statistics of one version, got {len(stats)}")
        s = stats[0]
        return {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"]),
                "success": int(s["inference_stats"]["success"]["count"]),
                "fail": int(s["inference_stats"]["fail"]["count"])}

    def close(self) -> None:
        self.client.close()


REQUESTERS: dict[str, Callable[[Target, str, Mapping[str, np.ndarray]], Requester]] = {
    "local-copy": LocalCopy,
    "local-zero-copy": LocalZeroCopy,
    "lane-ping-pong": LanePingPong,
    "grpc": GrpcRaw,
    "grpc-shm": GrpcSharedMemory,
    "http": HttpRaw,
}
