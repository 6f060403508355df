"""The gRPC front end, driven by `tritonclient` (an independent client) over 127.0.0.1.

The server under test is `serve_grpc` in this process, over `InProcessPlane` below (an interim data plane).
Every check of a computed tensor compares with numpy; every bad request checks its status code and then that
the server still answers a good request.
"""

from __future__ import annotations

import base64
import queue
import struct
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from kernelport.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from kernelport.protocol import message_class
from kernelport.protocol.grpc_frontend import serve_grpc
from kernelport.repository import ModelSpec, parse_config
from kernelport.server.shm_registry import SharedMemoryRegistry
from kernelport.server.stats import ModelStats

pytestmark = pytest.mark.timeout(60)

# ------------------------------------------------------------------------------------------------------
# interim data plane and fixtures


ADD_SUB = """
name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""
ADD_SUB_NOBATCH = """
name: "add_sub_nobatch"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""
IDENTITY_FP32 = """
name: "identity_fp32"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""
IDENTITY_BYTES = """
name: "identity_bytes"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


def _add_sub(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"OUTPUT0": x["INPUT0"] + x["INPUT1"], "OUTPUT1": x["INPUT0"] - x["INPUT1"]}


def _identity(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"OUTPUT0": x["INPUT0"].copy()}


# interim: replaced by the real server fixture
class InProcessPlane:
    """The DataPlane API (docs/internals.md) over numpy implementations of the example models."""

    def __init__(self) -> None:
        self._models: dict[
            str, tuple[ModelSpec, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]
        ] = {}
        models = (
            (ADD_SUB, _add_sub),
            (ADD_SUB_NOBATCH, _add_sub),
            (IDENTITY_FP32, _identity),
            (IDENTITY_BYTES, _identity),
        )
        for text, fn in models:
            spec = ModelSpec.from_proto(parse_config(text))
            self._models[spec.name] = (spec, fn)
        self._ready = set(self._models)
        self._stats = {name: ModelStats(name) for name in self._models}

    def model_names(self) -> list[str]:
        return sorted(self._ready)

    def model_spec(self, name: str) -> ModelSpec:
        if name not in self._models or name not in self._ready:
            raise ModelNotFoundError(f"model '{name}' is not loaded")
        return self._models[name][0]

    def model_ready(self, name: str) -> bool:
        return name in self._ready

    def infer(
        self,
        name: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        spec = self.model_spec(name)
        if set(inputs) != {t.name for t in spec.inputs}:
            raise InvalidInputError(f"model '{name}': inputs {sorted(inputs)}")
        result = self._models[name][1](inputs)
        batch = next(iter(inputs.values())).shape[0] if spec.max_batch_size > 0 else 1
        self._stats[name].record_execution(batch, compute_infer_ns=1000)
        self._stats[name].record_success(2000, compute_infer_ns=1000, batch_size=batch)
        return {k: v for k, v in result.items() if outputs is None or k in outputs}

    def statistics(self, name: str) -> ModelStats:
        self.model_spec(name)
        return self._stats[name]

    def load(self, name: str) -> None:
        if name not in self._models:
            raise ModelNotFoundError(f"model '{name}' is not in the repository")
        self._ready.add(name)

    def unload(self, name: str) -> None:
        if name not in self._ready:
            raise ModelNotReadyError(f"model '{name}' is not loaded")
        self._ready.discard(name)

    def repository_index(self) -> list[tuple[str, str, str, str]]:
        return [
            (
                name,
                "1",
                "READY" if name in self._ready else "UNAVAILABLE",
                "" if name in self._ready else "unloaded",
            )
            for name in sorted(self._models)
        ]


def _start(allow_client_shm: bool) -> Iterator[str]:
    server = serve_grpc(
        InProcessPlane(), host="127.0.0.1", port=0, workers=16, allow_client_shm=allow_client_shm
    )
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=None).wait(10)


@pytest.fixture(scope="module")
def grpc_url() -> Iterator[str]:
    """A server with client system shared memory allowed."""
    yield from _start(allow_client_shm=True)


@pytest.fixture(scope="module")
def grpc_url_no_shm() -> Iterator[str]:
    """A server started without client shared memory."""
    yield from _start(allow_client_shm=False)


@pytest.fixture
def client(grpc_url: str) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(grpc_url: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """tritonclient's generated stub, for requests its high-level API cannot make (typed contents, bad sizes)."""
    channel = grpc.insecure_channel(grpc_url)
    try:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


# ------------------------------------------------------------------------------------------------------
# helpers


def _rng_inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, 16)).astype(np.float32),
        rng.standard_normal((batch, 16)).astype(np.float32),
    )


def _inputs(a: np.ndarray, b: np.ndarray, datatype: str = "FP32") -> list[grpcclient.InferInput]:
    x0 = grpcclient.InferInput("INPUT0", list(a.shape), datatype)
    x0.set_data_from_numpy(a)
    x1 = grpcclient.InferInput("INPUT1", list(b.shape), datatype)
    x1.set_data_from_numpy(b)
    return [x0, x1]


def _assert_still_serving(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(2, seed=99)
    result = client.infer("add_sub", _inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def _expect_error(code: str, fn: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn()
    assert info.value.status() == f"StatusCode.{code}", info.value.message()
    message = info.value.message()
    for fragment in fragments:
        assert fragment in message, message
    return message


def _raw_request(shape: list[int], raw0: bytes, raw1: bytes) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="add_sub", id="raw")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=shape)
    req.raw_input_contents.extend([raw0, raw1])
    return req


def _stub_error(stub_call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub_call()
    return info.value


# ------------------------------------------------------------------------------------------------------
# health and metadata


def test_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", model_version="1")
    assert not client.is_model_ready("add_sub", model_version="7")
    assert not client.is_model_ready("no_such_model")


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    md = client.get_server_metadata()
    assert md.name == "kernelport"
    assert md.version
    assert {"model_configuration", "model_repository", "statistics", "system_shared_memory"} <= set(
        md.extensions
    )
    assert "cuda_shared_memory" not in md.extensions
    assert "classification" not in md.extensions


def test_server_metadata_without_shm_lists_no_shm(grpc_url_no_shm: str) -> None:
    c = grpcclient.InferenceServerClient(grpc_url_no_shm)
    try:
        assert "system_shared_memory" not in c.get_server_metadata().extensions
    finally:
        c.close()


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    md = client.get_model_metadata("add_sub")
    assert md.name == "add_sub"
    assert list(md.versions) == ["1"]
    assert md.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]),
        ("OUTPUT1", "FP32", [-1, 16]),
    ]
    nobatch = client.get_model_metadata("add_sub_nobatch")
    assert [list(t.shape) for t in nobatch.inputs] == [[16], [16]]
    assert client.get_model_metadata("identity_bytes").inputs[0].datatype == "BYTES"
    _expect_error("NOT_FOUND", lambda: client.get_model_metadata("no_such_model"), "no_such_model")
    _expect_error("NOT_FOUND", lambda: client.get_model_metadata("add_sub", model_version="9"), "add_sub")


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("add_sub").config
    assert config.name == "add_sub"
    assert config.max_batch_size == 16
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert [list(i.dims) for i in config.input] == [[16], [16]]
    assert config.input[0].data_type == 11  # TYPE_FP32, as tritonclient's own ModelConfig decodes it
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    _expect_error("NOT_FOUND", lambda: client.get_model_config("no_such_model"), "no_such_model")


def test_health_check_protocol(grpc_url: str) -> None:
    channel = grpc.insecure_channel(grpc_url)
    try:
        # Hand-encoded wire bytes: HealthCheckRequest{service} is field 1 (string); SERVING is status = 1.
        def encode(service: str) -> bytes:
            body = service.encode()
            return (b"\x0a" + bytes([len(body)]) + body) if body else b""

        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=encode, response_deserializer=lambda b: b
        )
        assert check("", timeout=10) == b"\x08\x01"
        assert check("inference.GRPCInferenceService", timeout=10) == b"\x08\x01"
        err = _stub_error(lambda: check("no.such.Service", timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND

        # The same through KernelPort's private-pool messages, in a process that also imported tritonclient.
        req_cls = message_class("grpc.health.v1.HealthCheckRequest")
        resp_cls = message_class("grpc.health.v1.HealthCheckResponse")
        typed = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        assert typed(req_cls(service=""), timeout=10).status == 1

        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch", request_serializer=encode, response_deserializer=lambda b: b
        )
        stream = watch("", timeout=10)
        assert next(stream) == b"\x08\x01"
        stream.cancel()
    finally:
        channel.close()


def test_private_pool_coexists_with_tritonclient() -> None:
    ours = message_class("inference.ModelInferRequest")
    assert ours is not service_pb2.ModelInferRequest
    theirs = service_pb2.ModelInferRequest(model_name="m", id="x", raw_input_contents=[b"\x01\x02"])
    decoded = ours.FromString(theirs.SerializeToString())
    assert (decoded.model_name, decoded.id, list(decoded.raw_input_contents)) == ("m", "x", [b"\x01\x02"])


# ------------------------------------------------------------------------------------------------------
# inference


def test_infer_raw(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(3)
    result = client.infer("add_sub", _inputs(a, b), request_id="req-42")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == "add_sub"
    assert list(response.outputs[0].shape) == [3, 16]


def test_infer_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(2, seed=1)
    result = client.infer("add_sub", _inputs(a, b), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_infer_nobatch(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1, seed=2)
    result = client.infer("add_sub_nobatch", _inputs(a[0], b[0]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a[0] + b[0])


def test_infer_message_over_default_grpc_limit(client: grpcclient.InferenceServerClient) -> None:
    # 8.4 MB each way: more than gRPC's default 4 MiB receive limit, so the server's size options must be set.
    x = np.random.default_rng(6).standard_normal((1, 2_100_000)).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), x)


def test_infer_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    a, b = _rng_inputs(2, seed=3)
    req = service_pb2.ModelInferRequest(model_name="add_sub", id="typed")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        t = req.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        t.contents.fp32_contents.extend(arr.reshape(-1).tolist())
    resp = stub.ModelInfer(req, timeout=10)
    assert resp.id == "typed"
    assert [o.name for o in resp.outputs] == ["OUTPUT0", "OUTPUT1"]
    out0 = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(out0, a + b)


def test_infer_typed_contents_in_wrong_field(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=[1, 16]).contents.int_contents.extend(range(16))
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents" in err.details() and "INPUT0" in err.details()
    _assert_still_serving(client)


def test_infer_bytes(
    client: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    data = np.array([[b"hello", b"", b"\x00\xffwide"], [b"a", b"bc", b"def"]], dtype=np.object_)
    x = grpcclient.InferInput("INPUT0", [2, 3], "BYTES")
    x.set_data_from_numpy(data)
    out = client.infer("identity_bytes", [x]).as_numpy("OUTPUT0")
    assert out.shape == (2, 3)
    assert out.tolist() == data.tolist()

    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend(
        [b"x", b"yz"]
    )
    resp = stub.ModelInfer(req, timeout=10)
    assert resp.raw_output_contents[0] == struct.pack("<I", 1) + b"x" + struct.pack("<I", 2) + b"yz"


def test_infer_bytes_truncated(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    req.raw_input_contents.append(struct.pack("<I", 1) + b"x" + struct.pack("<I", 100) + b"short")
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "identity_bytes" in err.details() and "INPUT0" in err.details()
    _assert_still_serving(client)


def test_stream_infer(client: grpcclient.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(6):
            a, b = _rng_inputs(1 + i % 3, seed=10 + i)
            sent[f"s{i}"] = (a, b)
            client.async_stream_infer("add_sub", _inputs(a, b), request_id=f"s{i}")
        bad = grpcclient.InferInput("NOPE", [1, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
        client.async_stream_infer("add_sub", [bad], request_id="bad")
        a, b = _rng_inputs(2, seed=20)
        sent["after"] = (a, b)
        client.async_stream_infer("add_sub", _inputs(a, b), request_id="after")

        got: dict[str, np.ndarray] = {}
        errors: list[Any] = []
        for _ in range(len(sent) + 1):
            result, error = answers.get(timeout=20)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("OUTPUT1")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "NOPE" in errors[0].message()
    assert set(got) == set(sent)
    for rid, (a, b) in sent.items():
        np.testing.assert_array_equal(got[rid], a - b)


def test_stream_longer_than_in_flight_window(client: grpcclient.InferenceServerClient) -> None:
    # More requests than the server keeps in flight per stream (64): the rest wait, none is lost.
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    a, b = _rng_inputs(1, seed=30)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(150):
            client.async_stream_infer("add_sub", _inputs(a + i, b), request_id=str(i))
        ids = set()
        for _ in range(150):
            result, error = answers.get(timeout=20)
            assert error is None
            rid = int(result.get_response().id)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), (a + rid) + b)
            ids.add(rid)
    finally:
        client.stop_stream()
    assert ids == set(range(150))


def test_concurrent_clients(grpc_url: str) -> None:
    def worker(seed: int) -> int:
        c = grpcclient.InferenceServerClient(grpc_url)
        try:
            for i in range(20):
                a, b = _rng_inputs(1 + (seed + i) % 4, seed=1000 * seed + i)
                result = c.infer("add_sub", _inputs(a, b))
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
            return seed
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(worker, range(8))) == list(range(8))


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    def stats() -> Any:
        (ms,) = client.get_inference_statistics("add_sub").model_stats
        return ms

    before = stats()
    a, b = _rng_inputs(3, seed=4)
    client.infer("add_sub", _inputs(a, b))
    after = stats()
    assert after.name == "add_sub"
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.success.ns - before.inference_stats.success.ns == 2000
    batch3 = {s.batch_size: s.compute_infer.count for s in after.batch_stats}
    batch3_before = {s.batch_size: s.compute_infer.count for s in before.batch_stats}
    assert batch3[3] - batch3_before.get(3, 0) == 1
    assert after.last_inference > 0
    names = {m.name for m in client.get_inference_statistics().model_stats}
    assert {"add_sub", "add_sub_nobatch", "identity_bytes"} <= names
    _expect_error("NOT_FOUND", lambda: client.get_inference_statistics("no_such_model"))


def test_repository_index_load_unload(client: grpcclient.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert {"add_sub", "add_sub_nobatch", "identity_bytes"} <= set(index)
    assert index["add_sub"].state == "READY"
    assert index["add_sub"].version == "1"

    client.unload_model("add_sub_nobatch")
    try:
        assert not client.is_model_ready("add_sub_nobatch")
        assert (
            client.is_server_ready()
        )  # as in Triton: an explicitly unloaded model does not unready the server
        ready_only = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
        assert "add_sub_nobatch" not in ready_only
    finally:
        client.load_model("add_sub_nobatch")
    assert client.is_model_ready("add_sub_nobatch")
    assert client.is_server_ready()
    _expect_error("NOT_FOUND", lambda: client.load_model("no_such_model"), "no_such_model")
    _expect_error(
        "UNIMPLEMENTED", lambda: client.load_model("add_sub", config='{"max_batch_size": 4}'), "config"
    )


# ------------------------------------------------------------------------------------------------------
# bad requests: each has its status code, and the server answers the next request


def test_wrong_dtype(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("add_sub", _inputs(a.astype(np.float64), b.astype(np.float64), "FP64")),
        "model 'add_sub' input 'INPUT0'",
        "expected FP32 [-1,16]",
        "got FP64 [1,16]",
    )
    _assert_still_serving(client)


def test_byte_size_not_matching_shape(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    a, b = _rng_inputs(1)
    req = _raw_request([1, 16], a.tobytes()[:-4], b.tobytes())
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.details() and "60" in err.details() and "64" in err.details()
    _assert_still_serving(client)


def test_shape_whose_byte_size_overflows(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    # (2**62 + 2) * 4 bytes is 2**64 + 8: in 64-bit arithmetic it wraps to 8, which these 8 bytes would match.
    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2**62 + 2])
    req.raw_input_contents.append(b"\0" * 8)
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "identity_fp32" in err.details() and "INPUT0" in err.details()
    # A BYTES tensor claiming 2**62 elements: refused without allocating them.
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2**62])
    req.raw_input_contents.append(struct.pack("<I", 1) + b"x")
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_serving(client)


def test_negative_shape(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = _raw_request([-1, 16], b"", b"")
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_serving(client)


def test_missing_input(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("add_sub", _inputs(a, b)[:1]),
        "add_sub",
        "missing input 'INPUT1'",
    )
    _assert_still_serving(client)


def test_unknown_input(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    extra = grpcclient.InferInput("INPUT2", [1, 16], "FP32")
    extra.set_data_from_numpy(a)
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("add_sub", [*_inputs(a, b), extra]),
        "add_sub",
        "unknown input 'INPUT2'",
    )
    _assert_still_serving(client)


def test_duplicate_input(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    inputs = _inputs(a, b)
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.infer("add_sub", [*inputs, inputs[0]]),
        "add_sub",
        "'INPUT0'",
        "more than once",
    )
    _assert_still_serving(client)


def test_batch_over_max(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(17)
    _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", _inputs(a, b)), "add_sub", "17", "16")
    _assert_still_serving(client)


def test_unknown_output(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    out = [grpcclient.InferRequestedOutput("OUTPUT9")]
    _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", _inputs(a, b), outputs=out), "OUTPUT9")
    _assert_still_serving(client)


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    a, b = _rng_inputs(1)
    _expect_error("NOT_FOUND", lambda: client.infer("no_such_model", _inputs(a, b)), "no_such_model")
    _assert_still_serving(client)


def test_trace_and_log_settings_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    _expect_error("UNIMPLEMENTED", client.get_trace_settings, "TraceSetting")
    _expect_error("UNIMPLEMENTED", client.get_log_settings, "LogSettings")
    _assert_still_serving(client)


def test_cuda_shared_memory_unavailable(client: grpcclient.InferenceServerClient) -> None:
    # tritonclient takes the cudaIpcMemHandle_t base64-encoded, as cuda_shared_memory.get_raw_handle returns it.
    assert len(client.get_cuda_shared_memory_status().regions) == 0
    _expect_error(
        "UNAVAILABLE",
        lambda: client.register_cuda_shared_memory("gpu0", base64.b64encode(b"\0" * 64), 0, 1024),
        "CUDA shared memory is not available",
    )
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.register_cuda_shared_memory("gpu0", base64.b64encode(b"\0" * 3), 0, 1024),
    )
    client.unregister_cuda_shared_memory("gpu0")
    _assert_still_serving(client)


# ------------------------------------------------------------------------------------------------------
# system shared memory


@pytest.fixture
def shm_key() -> Iterator[Callable[[int], tuple[str, str, Any]]]:
    """Creates client shm objects (name, key, handle) through tritonclient; destroys them afterwards."""
    handles: list[Any] = []

    def make(byte_size: int) -> tuple[str, str, Any]:
        tag = uuid.uuid4().hex[:12]
        name, key = f"region_{tag}", f"/kptest_{tag}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        handles.append(handle)
        return name, key, handle

    yield make
    for handle in handles:
        shm.destroy_shared_memory_region(handle)


def test_system_shared_memory_infer(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    a, b = _rng_inputs(4, seed=5)
    nbytes = a.nbytes
    in_name, in_key, in_handle = shm_key(2 * nbytes)
    out_name, out_key, out_handle = shm_key(2 * nbytes + 32)
    shm.set_shared_memory_region(in_handle, [a, b])
    client.register_system_shared_memory(in_name, in_key, 2 * nbytes)
    client.register_system_shared_memory(out_name, out_key, 2 * nbytes, offset=32)
    try:
        status = client.get_system_shared_memory_status()
        regions = {r.name: r for r in status.regions.values()}
        assert (regions[out_name].key, regions[out_name].offset, regions[out_name].byte_size) == (
            out_key,
            32,
            2 * nbytes,
        )

        x0 = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        x0.set_shared_memory(in_name, nbytes)
        x1 = grpcclient.InferInput("INPUT1", [4, 16], "FP32")
        x1.set_shared_memory(in_name, nbytes, offset=nbytes)
        o0 = grpcclient.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory(out_name, nbytes)
        o1 = grpcclient.InferRequestedOutput("OUTPUT1")
        o1.set_shared_memory(out_name, nbytes, offset=nbytes)
        result = client.infer("add_sub", [x0, x1], outputs=[o0, o1])
        assert len(result.get_response().raw_output_contents) == 0
        assert list(result.get_output("OUTPUT0").shape) == [4, 16]
        # The region starts at offset 32 of the object.
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(out_handle, np.float32, [4, 16], offset=32), a + b
        )
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(out_handle, np.float32, [4, 16], offset=32 + nbytes), a - b
        )

        # One output in a region, one in the response: raw entry i stays output i.
        o0 = grpcclient.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory(out_name, nbytes)
        result = client.infer("add_sub", [x0, x1], outputs=[o0, grpcclient.InferRequestedOutput("OUTPUT1")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

        # An output region too small for the result.
        o0 = grpcclient.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory(out_name, nbytes - 4)
        _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", [x0, x1], outputs=[o0]), "OUTPUT0")
        # An input byte size that does not match the shape.
        bad = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        bad.set_shared_memory(in_name, nbytes - 4)
        _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", [bad, x1]), "INPUT0")
        # An input range past the region's end.
        bad = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        bad.set_shared_memory(in_name, nbytes, offset=nbytes + 4)
        _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", [bad, x1]), "INPUT0", in_name)
    finally:
        client.unregister_system_shared_memory(in_name)
        client.unregister_system_shared_memory(out_name)
    assert in_name not in {r.name for r in client.get_system_shared_memory_status().regions.values()}
    _expect_error("NOT_FOUND", lambda: client.get_system_shared_memory_status(in_name), in_name)
    _expect_error("NOT_FOUND", lambda: client.infer("add_sub", [x0, x1]), in_name)
    client.unregister_system_shared_memory(in_name)  # unknown: succeeds, as in Triton
    _assert_still_serving(client)


def test_system_shared_memory_bytes_input(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    data = np.array([[b"abc", b"", b"de"]], dtype=np.object_)
    encoded = b"".join(struct.pack("<I", len(s)) + s for s in data.reshape(-1))
    name, key, handle = shm_key(64)
    shm.set_shared_memory_region(handle, [np.frombuffer(encoded, dtype=np.uint8)])
    client.register_system_shared_memory(name, key, 64)
    try:
        x = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
        x.set_shared_memory(name, len(encoded))
        out = client.infer("identity_bytes", [x]).as_numpy("OUTPUT0")
        assert out.tolist() == data.tolist()
    finally:
        client.unregister_system_shared_memory(name)


def test_unknown_region(client: grpcclient.InferenceServerClient) -> None:
    x0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    x0.set_shared_memory("no_such_region", 64)
    a, b = _rng_inputs(1)
    _expect_error("NOT_FOUND", lambda: client.infer("add_sub", [x0, _inputs(a, b)[1]]), "no_such_region")
    _assert_still_serving(client)


def test_region_registration_bounds(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    name, key, _ = shm_key(4096)
    _expect_error("INVALID_ARGUMENT", lambda: client.register_system_shared_memory(name, key, 4097), name)
    _expect_error(
        "INVALID_ARGUMENT", lambda: client.register_system_shared_memory(name, key, 1, offset=4096), name
    )
    # offset + byte_size wraps around 2**64 to a small number; it must still be refused.
    _expect_error(
        "INVALID_ARGUMENT",
        lambda: client.register_system_shared_memory(name, key, 16, offset=2**64 - 8),
        name,
    )
    _expect_error("INVALID_ARGUMENT", lambda: client.register_system_shared_memory(name, key, 0), name)
    assert name not in {r.name for r in client.get_system_shared_memory_status().regions.values()}
    _assert_still_serving(client)


def test_region_key_validation(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    msg = _expect_error(
        "INVALID_ARGUMENT", lambda: client.register_system_shared_memory("r1", "/../etc/passwd", 8)
    )
    assert "/etc" not in msg
    _expect_error("INVALID_ARGUMENT", lambda: client.register_system_shared_memory("r1", "/a/b", 8))
    _expect_error(
        "NOT_FOUND", lambda: client.register_system_shared_memory("r1", "/kptest_absent_object", 8), "r1"
    )
    _expect_error(
        "PERMISSION_DENIED", lambda: client.register_system_shared_memory("r1", "/kernelport_lane0", 8)
    )
    _assert_still_serving(client)


def test_duplicate_region(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    name, key, _ = shm_key(128)
    client.register_system_shared_memory(name, key, 128)
    try:
        _expect_error("ALREADY_EXISTS", lambda: client.register_system_shared_memory(name, key, 64), name)
    finally:
        client.unregister_system_shared_memory(name)
    client.register_system_shared_memory(name, key, 64)  # the name is free again
    client.unregister_system_shared_memory("")  # empty: every region
    assert len(client.get_system_shared_memory_status().regions) == 0
    _assert_still_serving(client)


def test_registration_refused_when_not_allowed(
    grpc_url_no_shm: str, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    name, key, _ = shm_key(64)
    c = grpcclient.InferenceServerClient(grpc_url_no_shm)
    try:
        _expect_error(
            "UNAVAILABLE", lambda: c.register_system_shared_memory(name, key, 64), "allow_client_shm"
        )
        _assert_still_serving(c)
    finally:
        c.close()


def test_region_in_use_unmapped_by_last_user(shm_key: Callable[[int], tuple[str, str, Any]]) -> None:
    """Unregister while a request holds the region: the name goes at once, the mapping at the last release."""
    name, key, handle = shm_key(64)
    payload = np.arange(16, dtype=np.float32)
    shm.set_shared_memory_region(handle, [payload])
    registry = SharedMemoryRegistry(allowed=True)
    registry.register(name, key, 0, 64)
    region = registry.acquire(name)
    registry.unregister(name)
    with pytest.raises(Exception) as info:
        registry.acquire(name)
    assert getattr(info.value, "grpc_code", None) == "NOT_FOUND"
    view = region.read("test", 0, 64)
    np.testing.assert_array_equal(np.frombuffer(view, dtype=np.float32), payload)
    view.release()
    registry.release(region)
    with pytest.raises(Exception) as info:
        region.read("test", 0, 64)
    assert getattr(info.value, "grpc_code", None) == "NOT_FOUND"
