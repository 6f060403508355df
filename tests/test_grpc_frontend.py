"""The gRPC front end, driven by `tritonclient` (an independent client) over 127.0.0.1.

The servers under test are real `kernelport serve --grpc-port ...` subprocesses (their worker processes run
the models with ONNX Runtime), serving a copy of the session's `served_repo` plus a few models built here.
Every check of a computed tensor compares with numpy; every bad request checks its status code and then that
the server still answers a good request.
"""

from __future__ import annotations

import base64
import os
import queue
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from _models import write_identity_bytes, write_int_add
from conftest import ServerProcess, add_sub_variant
from kernelport import Client
from kernelport.protocol import message_class
from kernelport.repository import parse_config

pytestmark = pytest.mark.timeout(60)

# BYTES tensors are not yet carried by the lanes: a model with a BYTES tensor does not load. When they are,
# set this to True: the repository then gets `identity_bytes` and the BYTES tests below run.
BYTES_ON_LANES = True
needs_bytes = pytest.mark.skipif(not BYTES_ON_LANES, reason="BYTES tensors on lanes: pending")

# ------------------------------------------------------------------------------------------------------
# models built for these tests, and the servers

# add_sub_reload: add_sub under another name, for the unload/load test only (no other test touches it).
ADD_SUB_RELOAD_BATCHING = "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n"


@pytest.fixture(scope="module")
def grpc_repo(served_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of `served_repo` plus int_add, add_sub_reload (and identity_bytes once BYTES_ON_LANES)."""
    path = str(tmp_path_factory.mktemp("grpc_repository"))
    shutil.copytree(served_repo, path, dirs_exist_ok=True)
    write_int_add(path)
    add_sub_variant(path, "add_sub_reload", ADD_SUB_RELOAD_BATCHING)
    if BYTES_ON_LANES:
        write_identity_bytes(path)
    return path


def _repo_models(repo: str) -> set[str]:
    return {d for d in os.listdir(repo) if os.path.isfile(os.path.join(repo, d, "config.pbtxt"))}




@dataclass
class GrpcServer:
    process: ServerProcess
    url: str

    @property
    def socket_path(self) -> str:
        return self.process.socket_path


def _start_server(repo: str, sock: str, *extra: str) -> GrpcServer:
    proc = ServerProcess.with_ports(repo, sock, *extra, grpc=True)
    return GrpcServer(proc, f"127.0.0.1:{proc.grpc_port}")


def _stop_server(server: GrpcServer) -> None:
    code = server.process.stop()
    log = server.process.log()
    assert code == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def grpc_server(grpc_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    """A real server with gRPC and client system shared memory allowed."""
    sock = str(tmp_path_factory.mktemp("grpc_sock") / "kp.sock")
    server = _start_server(grpc_repo, sock, "--allow-client-shm")
    yield server
    _stop_server(server)


@pytest.fixture(scope="module")
def grpc_url(grpc_server: GrpcServer) -> str:
    return grpc_server.url


@pytest.fixture(scope="module")
def grpc_url_no_shm(grpc_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second real server, started without client shared memory."""
    sock = str(tmp_path_factory.mktemp("grpc_sock_no_shm") / "kp.sock")
    server = _start_server(grpc_repo, sock)
    yield server.url
    _stop_server(server)


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


@pytest.fixture
def local(grpc_server: GrpcServer) -> Iterator[Client]:
    """KernelPort's local client of the same server, over its unix socket."""
    with Client(grpc_server.socket_path) as c:
        yield c


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


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` (each poll a round trip to the server) until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


def _bytes_wire(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


# ------------------------------------------------------------------------------------------------------
# health and metadata


def test_live_and_ready(client: grpcclient.InferenceServerClient, grpc_repo: str) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in _repo_models(grpc_repo):
        assert client.is_model_ready(name), name
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
        extensions = set(c.get_server_metadata().extensions)
        assert "system_shared_memory" not in extensions
        assert "model_repository" in extensions
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
    big = client.get_model_metadata("identity_16m")
    assert [(t.name, t.datatype, list(t.shape)) for t in big.inputs] == [("INPUT0", "FP32", [-1, 4194304])]
    ints = client.get_model_metadata("int_add")
    assert [(t.name, t.datatype, list(t.shape)) for t in ints.inputs] == [
        ("INPUT0", "INT32", [-1, -1]),
        ("INPUT1", "INT64", [-1, -1]),
    ]
    assert [(t.name, t.datatype) for t in ints.outputs] == [("OUTPUT0", "INT64"), ("OUTPUT1", "INT32")]
    _expect_error("NOT_FOUND", lambda: client.get_model_metadata("no_such_model"), "no_such_model")
    _expect_error("NOT_FOUND", lambda: client.get_model_metadata("add_sub", model_version="9"), "add_sub")


@needs_bytes
def test_model_metadata_bytes(client: grpcclient.InferenceServerClient) -> None:
    md = client.get_model_metadata("identity_bytes")
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("INPUT0", "BYTES", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("OUTPUT0", "BYTES", [-1, 4])]


def test_model_config(client: grpcclient.InferenceServerClient, grpc_repo: str) -> None:
    # Expected values come from the config.pbtxt in the repository, read here.
    for name in ("add_sub", "add_sub_window", "int_add"):
        want = parse_config(os.path.join(grpc_repo, name, "config.pbtxt"))
        config = client.get_model_config(name).config
        assert config.name == name
        assert config.max_batch_size == want.max_batch_size
        assert [i.name for i in config.input] == [i.name for i in want.input]
        assert [list(i.dims) for i in config.input] == [list(i.dims) for i in want.input]
        assert [i.data_type for i in config.input] == [i.data_type for i in want.input]
        assert [o.name for o in config.output] == [o.name for o in want.output]
        assert config.HasField("dynamic_batching") == want.HasField("dynamic_batching")
        assert (
            config.dynamic_batching.max_queue_delay_microseconds
            == want.dynamic_batching.max_queue_delay_microseconds
        )
    config = client.get_model_config("add_sub").config
    assert config.input[0].data_type == 11  # TYPE_FP32, as tritonclient's own ModelConfig decodes it
    assert client.get_model_config("add_sub_window").config.dynamic_batching.max_queue_delay_microseconds == 50000
    assert [i.data_type for i in client.get_model_config("int_add").config.input] == [8, 9]  # INT32, INT64
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
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a[0] - b[0])


def test_infer_message_over_default_grpc_limit(client: grpcclient.InferenceServerClient) -> None:
    # 16 MiB each way: more than gRPC's default 4 MiB receive limit, so the server's size options must be set.
    x = np.random.default_rng(6).standard_normal((1, 4194304)).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("identity_16m", [inp]).as_numpy("OUTPUT0"), x)


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


def test_infer_typed_int_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    # INT32 goes in int_contents, INT64 in int64_contents; values near the types' limits must survive exactly
    # (2**62 + 1 is not representable in a float64, so a detour through floats would show).
    x0 = np.array([[2**31 - 1 - 7, -(2**31), 5], [0, -1, 123456789]], dtype=np.int32)
    x1 = np.array([[2**62 + 1, -(2**62) - 3, -5], [2**40, 7, -(2**33)]], dtype=np.int64)
    req = service_pb2.ModelInferRequest(model_name="int_add", id="ints")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[2, 3]).contents.int_contents.extend(
        x0.reshape(-1).tolist()
    )
    req.inputs.add(name="INPUT1", datatype="INT64", shape=[2, 3]).contents.int64_contents.extend(
        x1.reshape(-1).tolist()
    )
    resp = stub.ModelInfer(req, timeout=10)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("OUTPUT0", "INT64", [2, 3]),
        ("OUTPUT1", "INT32", [2, 3]),
    ]
    out0 = np.frombuffer(resp.raw_output_contents[0], dtype=np.int64).reshape(2, 3)
    np.testing.assert_array_equal(out0, x0.astype(np.int64) + x1)
    out1 = np.frombuffer(resp.raw_output_contents[1], dtype=np.int32).reshape(2, 3)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out1, x0 + x0)  # int32 arithmetic wraps, in ONNX Runtime as in numpy


def test_infer_int_raw_variable_dims(client: grpcclient.InferenceServerClient) -> None:
    # A variable per-sample dim: two lengths, each in its own lane, each answered with its own shape.
    for n in (3, 11):
        x0 = np.arange(2 * n, dtype=np.int32).reshape(2, n) - 4
        x1 = (np.arange(2 * n, dtype=np.int64).reshape(2, n) << 35) + 1
        inputs = [grpcclient.InferInput("INPUT0", [2, n], "INT32"), grpcclient.InferInput("INPUT1", [2, n], "INT64")]
        inputs[0].set_data_from_numpy(x0)
        inputs[1].set_data_from_numpy(x1)
        result = client.infer("int_add", inputs)
        out0 = result.as_numpy("OUTPUT0")
        assert out0.dtype == np.int64 and out0.shape == (2, n)
        np.testing.assert_array_equal(out0, x0.astype(np.int64) + x1)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 2 * x0)


def test_infer_typed_contents_in_wrong_field(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=[1, 16]).contents.int_contents.extend(range(16))
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents" in err.details() and "INPUT0" in err.details()
    # INT64 values sent in int_contents (the INT32 field) are refused the same way.
    req = service_pb2.ModelInferRequest(model_name="int_add")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 2]).contents.int_contents.extend([1, 2])
    req.inputs.add(name="INPUT1", datatype="INT64", shape=[1, 2]).contents.int_contents.extend([1, 2])
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "int64_contents" in err.details() and "INPUT1" in err.details()
    _assert_still_serving(client)


def test_bytes_input_to_fp32_model(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    # A BYTES tensor where the model wants FP32: refused by datatype, in raw and in typed form.
    for form in ("raw", "typed"):
        req = service_pb2.ModelInferRequest(model_name="add_sub")
        items = [b"x" * (i % 3) for i in range(16)]
        for name in ("INPUT0", "INPUT1"):
            t = req.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
            if form == "typed":
                t.contents.bytes_contents.extend(items)
        if form == "raw":
            req.raw_input_contents.extend([_bytes_wire(items), _bytes_wire(items)])
        err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))  # noqa: B023
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (form, err.details())
        details = err.details()
        assert "model 'add_sub' input 'INPUT0'" in details and "BYTES" in details and "FP32" in details, details
    # The same through tritonclient.
    data = np.array([[b"a"] * 16], dtype=np.object_)
    x0 = grpcclient.InferInput("INPUT0", [1, 16], "BYTES")
    x0.set_data_from_numpy(data)
    x1 = grpcclient.InferInput("INPUT1", [1, 16], "BYTES")
    x1.set_data_from_numpy(data)
    _expect_error("INVALID_ARGUMENT", lambda: client.infer("add_sub", [x0, x1]), "add_sub", "INPUT0", "BYTES")
    _assert_still_serving(client)


@needs_bytes
def test_infer_bytes(
    client: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    data = np.array(
        [[b"hello", b"", b"\x00wide\x00", b"x"], [b"a", b"bc", b"def", b"\xe2\x82\xac"]], dtype=np.object_
    )
    x = grpcclient.InferInput("INPUT0", [2, 4], "BYTES")
    x.set_data_from_numpy(data)
    out = client.infer("identity_bytes", [x]).as_numpy("OUTPUT0")
    assert out.shape == (2, 4)
    assert out.tolist() == data.tolist()

    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    items = [b"x", b"yz", b"", b"w"]
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4]).contents.bytes_contents.extend(items)
    resp = stub.ModelInfer(req, timeout=10)
    assert resp.raw_output_contents[0] == _bytes_wire(items)

    # ONNX Runtime's Python API carries strings as str: bytes that are not UTF-8 are refused up front
    bad = grpcclient.InferInput("INPUT0", [1, 4], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff", b"", b"", b""]], dtype=np.object_))
    _expect_error("INVALID_ARGUMENT", lambda: client.infer("identity_bytes", [bad]), "identity_bytes", "UTF-8")
    _assert_still_serving(client)


@needs_bytes
def test_infer_bytes_truncated(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    req.raw_input_contents.append(_bytes_wire([b"x", b"y", b"z"]) + struct.pack("<I", 100) + b"short")
    err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "identity_bytes" in err.details() and "INPUT0" in err.details()
    _assert_still_serving(client)


@needs_bytes
def test_bytes_tensor_with_huge_element_count(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    # A BYTES tensor claiming 2**62 elements: refused (by its shape) without allocating them.
    req = service_pb2.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2**62])
    req.raw_input_contents.append(struct.pack("<I", 1) + b"x")
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


def test_grpc_and_local_requests_batch_together(client: grpcclient.InferenceServerClient, local: Client) -> None:
    model = "add_sub_window"  # a partial batch closes 50 ms after its first claim
    # Make both lanes' handshakes now, so that the requests below only claim rows.
    w0, w1 = _rng_inputs(1, seed=40)
    np.testing.assert_array_equal(client.infer(model, _inputs(w0, w1)).as_numpy("OUTPUT0"), w0 + w1)
    np.testing.assert_array_equal(local.infer(model, {"INPUT0": w0, "INPUT1": w1})["OUTPUT0"], w0 + w1)

    g0, g1 = _rng_inputs(1, seed=41)
    grpc_inputs = _inputs(g0, g1)
    local_data = [_rng_inputs(1, seed=42 + i) for i in range(2)]
    before = local.counters(model)
    # Two local zero-copy requests hold rows of the open batch; then one gRPC request joins it.
    held = []
    for a, b in local_data:
        req = local.request(model, batch=1)
        req.inputs["INPUT0"][:] = a
        req.inputs["INPUT1"][:] = b
        held.append(req)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def call(key: str, fn: Callable[[], Any]) -> None:
        try:
            results[key] = fn()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=("grpc", lambda: client.infer(model, grpc_inputs)))]
    threads += [
        threading.Thread(target=call, args=(f"local{i}", lambda r=r: r.run(timeout=10))) for i, r in enumerate(held)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        np.testing.assert_array_equal(results["grpc"].as_numpy("OUTPUT0"), g0 + g1)
        np.testing.assert_array_equal(results["grpc"].as_numpy("OUTPUT1"), g0 - g1)
        for i, (a, b) in enumerate(local_data):
            np.testing.assert_array_equal(results[f"local{i}"]["OUTPUT0"], a + b)
            np.testing.assert_array_equal(results[f"local{i}"]["OUTPUT1"], a - b)
    finally:
        for req in held:
            req.release()
    after = local.counters(model)
    assert after["claims"] - before["claims"] == 3
    assert after["batches"] - before["batches"] == 1, (before, after)  # one batch...
    assert after["rows"] - before["rows"] == 3, (before, after)  # ...of all three rows


# ------------------------------------------------------------------------------------------------------
# statistics


def _model_stats(client: grpcclient.InferenceServerClient, name: str) -> Any:
    (ms,) = client.get_inference_statistics(name).model_stats
    assert ms.name == name
    return ms


def test_statistics(client: grpcclient.InferenceServerClient, local: Client, grpc_repo: str) -> None:
    model = "add_sub"
    grpc_batches = [1, 3, 2, 5, 1]
    local_batches = [4, 1]
    zero_copy_batch = 2
    before = _model_stats(client, model)
    t0_ms = time.time() * 1000
    for i, n in enumerate(grpc_batches):
        a, b = _rng_inputs(n, seed=200 + i)
        np.testing.assert_array_equal(client.infer(model, _inputs(a, b)).as_numpy("OUTPUT0"), a + b)
    for i, n in enumerate(local_batches):
        a, b = _rng_inputs(n, seed=300 + i)
        np.testing.assert_array_equal(local.infer(model, {"INPUT0": a, "INPUT1": b})["OUTPUT1"], a - b)
    a, b = _rng_inputs(zero_copy_batch, seed=400)
    with local.request(model, batch=zero_copy_batch) as req:
        req.inputs["INPUT0"][:] = a
        req.inputs["INPUT1"][:] = b
        np.testing.assert_array_equal(req.run()["OUTPUT0"], a + b)
    t1_ms = time.time() * 1000
    after = _model_stats(client, model)

    requests = len(grpc_batches) + len(local_batches) + 1
    samples = sum(grpc_batches) + sum(local_batches) + zero_copy_batch
    b_st, a_st = before.inference_stats, after.inference_stats
    assert a_st.success.count - b_st.success.count == requests
    assert a_st.fail.count == b_st.fail.count
    assert after.inference_count - before.inference_count == samples
    executions = after.execution_count - before.execution_count
    assert 1 <= executions <= requests
    # Per batch size: the executions of each size, which together cover exactly the samples sent.
    by_size_before = {s.batch_size: s.compute_infer.count for s in before.batch_stats}
    by_size = {s.batch_size: s.compute_infer.count - by_size_before.get(s.batch_size, 0) for s in after.batch_stats}
    assert all(count >= 0 for count in by_size.values())
    assert sum(size * count for size, count in by_size.items()) == samples
    assert sum(by_size.values()) == executions
    assert all(1 <= size <= 16 for size, count in by_size.items() if count)
    # Durations: each grew; queueing and compute are parts of the requests' end-to-end time.
    success_ns = a_st.success.ns - b_st.success.ns
    queue_ns = a_st.queue.ns - b_st.queue.ns
    infer_ns = a_st.compute_infer.ns - b_st.compute_infer.ns
    assert success_ns > 0 and queue_ns > 0 and infer_ns > 0
    assert queue_ns <= success_ns and infer_ns <= success_ns
    assert a_st.queue.count - b_st.queue.count == requests
    assert a_st.compute_infer.count - b_st.compute_infer.count == requests
    assert t0_ms - 1000 <= after.last_inference <= t1_ms + 1000

    # Every served model is listed; a version that does not exist and an unknown model are NOT_FOUND.
    names = {m.name for m in client.get_inference_statistics().model_stats}
    assert names == _repo_models(grpc_repo)
    assert _model_stats(client, model).inference_count == after.inference_count
    assert client.get_inference_statistics(model, model_version="1").model_stats[0].name == model
    _expect_error("NOT_FOUND", lambda: client.get_inference_statistics(model, model_version="9"), model)
    _expect_error("NOT_FOUND", lambda: client.get_inference_statistics("no_such_model"), "no_such_model")


# ------------------------------------------------------------------------------------------------------
# repository


def test_repository_index_load_unload(
    client: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub, grpc_repo: str
) -> None:
    model = "add_sub_reload"  # no other test uses it
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(index) == _repo_models(grpc_repo)
    assert all(m.state == "READY" and m.version == "1" for m in index.values()), index
    a, b = _rng_inputs(2, seed=50)
    np.testing.assert_array_equal(client.infer(model, _inputs(a, b)).as_numpy("OUTPUT0"), a + b)

    client.unload_model(model)
    try:
        assert not client.is_model_ready(model)
        entry = {m.name: m for m in client.get_model_repository_index().models}[model]
        assert entry.state != "READY"
        ready_index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
        ready_only = {m.name for m in ready_index.models}
        assert ready_only == _repo_models(grpc_repo) - {model}
        _expect_error("UNAVAILABLE", lambda: client.infer(model, _inputs(a, b)), model)
        _assert_still_serving(client)  # the other models are not disturbed
    finally:
        client.load_model(model)
    assert client.is_model_ready(model)
    assert client.is_server_ready()
    assert {m.name: m.state for m in client.get_model_repository_index().models}[model] == "READY"
    a, b = _rng_inputs(3, seed=51)
    result = client.infer(model, _inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    _expect_error(
        "UNIMPLEMENTED", lambda: client.load_model("add_sub", config='{"max_batch_size": 4}'), "config"
    )
    _assert_still_serving(client)


def test_unloaded_model_keeps_server_ready(client: grpcclient.InferenceServerClient) -> None:
    # As in Triton: a model unloaded on request does not make the server unready.
    model = "add_sub_reload"
    client.unload_model(model)
    try:
        assert not client.is_model_ready(model)
        assert client.is_server_ready()
    finally:
        client.load_model(model)
    assert client.is_model_ready(model)


def test_load_unknown_model_not_found(client: grpcclient.InferenceServerClient) -> None:
    _expect_error("NOT_FOUND", lambda: client.load_model("no_such_model"), "no_such_model")
    _assert_still_serving(client)


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
    # (2**62 + 2) * 4 bytes is 2**64 + 8, and (2**61 + 1) * 8 is 2**64 + 8: in 64-bit arithmetic each wraps to
    # 8, which these 8 bytes would match.
    for name, datatype, count in (("INPUT0", "INT32", 2**62 + 2), ("INPUT1", "INT64", 2**61 + 1)):
        req = service_pb2.ModelInferRequest(model_name="int_add")
        for other, other_type in (("INPUT0", "INT32"), ("INPUT1", "INT64")):
            if other == name:
                req.inputs.add(name=name, datatype=datatype, shape=[1, count])
                req.raw_input_contents.append(b"\0" * 8)
            else:
                req.inputs.add(name=other, datatype=other_type, shape=[1, 2])
                req.raw_input_contents.append(b"\0" * (2 * (4 if other_type == "INT32" else 8)))
        err = _stub_error(lambda: stub.ModelInfer(req, timeout=10))  # noqa: B023
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "int_add" in err.details() and name in err.details(), err.details()
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


def _maps_object(pid: int, key: str) -> bool:
    """Whether process `pid` has the POSIX shm object `key` mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip().endswith("/dev/shm" + key) for line in f)


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


@needs_bytes
def test_system_shared_memory_bytes_input(
    client: grpcclient.InferenceServerClient, shm_key: Callable[[int], tuple[str, str, Any]]
) -> None:
    data = np.array([[b"abc", b"", b"de", b"\x00"]], dtype=np.object_)
    encoded = _bytes_wire(list(data.reshape(-1)))
    name, key, handle = shm_key(64)
    shm.set_shared_memory_region(handle, [np.frombuffer(encoded, dtype=np.uint8)])
    client.register_system_shared_memory(name, key, 64)
    try:
        x = grpcclient.InferInput("INPUT0", [1, 4], "BYTES")
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
    assert "r1" not in {r.name for r in client.get_system_shared_memory_status().regions.values()}
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
        assert len(c.get_system_shared_memory_status().regions) == 0
        _assert_still_serving(c)
    finally:
        c.close()


def test_region_in_use_unmapped_by_last_user(
    client: grpcclient.InferenceServerClient,
    local: Client,
    grpc_server: GrpcServer,
    shm_key: Callable[[int], tuple[str, str, Any]],
) -> None:
    """Unregister while a request holds the region: the name goes at once, the mapping at the last release."""
    model = "add_sub_preferred"  # a batch closes at 4 rows (its window is 30 s): the request waits for them
    pid = grpc_server.process.pid
    a, b = _rng_inputs(1, seed=60)
    nbytes = a.nbytes
    name, key, handle = shm_key(4 * nbytes)  # INPUT0, INPUT1, then OUTPUT0, OUTPUT1, all in one region
    shm.set_shared_memory_region(handle, [a, b])
    client.register_system_shared_memory(name, key, 4 * nbytes)
    assert _maps_object(pid, key)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_shared_memory(name, nbytes)
    inputs[1].set_shared_memory(name, nbytes, offset=nbytes)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(name, nbytes, offset=2 * nbytes)
    outputs[1].set_shared_memory(name, nbytes, offset=3 * nbytes)

    before = local.counters(model)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["ok"] = client.infer(model, inputs, outputs=outputs, client_timeout=30)
        except BaseException as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    try:
        _wait_for(lambda: local.counters(model)["claims"] > before["claims"], 20, "the gRPC request to claim")
        client.unregister_system_shared_memory(name)
        # The name is gone at once...
        assert name not in {r.name for r in client.get_system_shared_memory_status().regions.values()}
        _expect_error("NOT_FOUND", lambda: client.infer(model, inputs), name)
        # ...but the waiting request still holds the mapping.
        assert _maps_object(pid, key)
    finally:
        # Three local rows complete the batch of 4.
        c0, c1 = _rng_inputs(3, seed=61)
        out = local.infer(model, {"INPUT0": c0, "INPUT1": c1}, timeout=20)
        t.join(30)
    np.testing.assert_array_equal(out["OUTPUT0"], c0 + c1)
    assert "error" not in result, result.get("error")
    assert len(result["ok"].get_response().raw_output_contents) == 0
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=2 * nbytes), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], offset=3 * nbytes), a - b)
    assert not _maps_object(pid, key)  # the last user released it: unmapped
    after = local.counters(model)
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (1, 4)
    _assert_still_serving(client)
