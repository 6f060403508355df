"""Fuzz test of the gRPC surface: hypothesis makes ModelInferRequest and SystemSharedMemoryRegister messages,
valid ones mutated and random ones, and sends them with tritonclient's raw generated stub to a real
`kernelport serve --allow-client-shm`.

Every reply must be OK or a status that names the caller's mistake or a refusal (EXPECTED below), never
INTERNAL or UNKNOWN, never a hang (each call has a 10 s deadline); after every example the server must
answer ServerLive and every model must still be ready (a worker killed by a request is a bug). Requests
that are valid by construction must succeed with the numpy reference result.

Size: about 30 s in all (examples per test in `settings`). Set KP_FUZZ_SCALE=10 for a longer hunt.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from _models import write_identity_bytes, write_int_add
from conftest import ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)

SCALE = max(1, int(os.environ.get("KP_FUZZ_SCALE", "1")))
CALL_TIMEOUT = 10.0
REGION = "fz"  # the registered region infer requests may name
REGION_BYTES = 64 * 1024

EXPECTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
}  # fmt: skip

FUZZ_SETTINGS = settings(
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no "explain" (slow)
    database=None,  # no .hypothesis directory in the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------------------------------------------
# the models: add_sub, add_sub_nobatch (example repository), int_add (variable dims), identity_bytes (BYTES)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable


@dataclass(frozen=True)
class Model:
    name: str
    max_batch: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


FP = ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
MODELS = {
    m.name: m
    for m in (
        Model("add_sub", 16, tuple(Tensor(n, "FP32", (16,)) for n in FP[:2]),
              tuple(Tensor(n, "FP32", (16,)) for n in FP[2:])),
        Model("add_sub_nobatch", 0, tuple(Tensor(n, "FP32", (16,)) for n in FP[:2]),
              tuple(Tensor(n, "FP32", (16,)) for n in FP[2:])),
        Model("int_add", 8, (Tensor("INPUT0", "INT32", (-1,)), Tensor("INPUT1", "INT64", (-1,))),
              (Tensor("OUTPUT0", "INT64", (-1,)), Tensor("OUTPUT1", "INT32", (-1,)))),
        Model("identity_bytes", 8, (Tensor("INPUT0", "BYTES", (4,)),), (Tensor("OUTPUT0", "BYTES", (4,)),)),
    )
}  # fmt: skip

@pytest.fixture(scope="module")
def fuzz_repo(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    repo = str(tmp_path_factory.mktemp("fuzz_repo"))
    for name in ("add_sub", "add_sub_nobatch"):
        shutil.copytree(os.path.join(example_repo, name), os.path.join(repo, name))
    batching = "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
    write_int_add(repo, batching)
    write_identity_bytes(repo, batching)
    return repo




@dataclass
class Target:
    process: ServerProcess
    channel: grpc.Channel
    stub: service_pb2_grpc.GRPCInferenceServiceStub
    key: str  # the POSIX shm key of the object behind REGION
    region: Any = field(repr=False, default=None)


@pytest.fixture(scope="module")
def target(fuzz_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    sock = str(tmp_path_factory.mktemp("fuzz_sock") / "kp.sock")
    proc = None
    for attempt in range(3):
        port = free_port()
        try:
            proc = ServerProcess(fuzz_repo, sock, "--grpc-port", str(port), "--allow-client-shm",
                                 "--max-restarts", "1000")  # fmt: skip
            break
        except RuntimeError as e:
            if "cannot listen" not in str(e) or attempt == 2:
                raise
    assert proc is not None
    key = f"/fuzz_{uuid.uuid4().hex[:16]}"
    region = shm.create_shared_memory_region(REGION, key, REGION_BYTES)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    t = Target(proc, channel, service_pb2_grpc.GRPCInferenceServiceStub(channel), key, region)
    try:
        yield t
    finally:
        channel.close()
        shm.destroy_shared_memory_region(region)
        code = proc.stop()
        log = proc.log()
        assert code == 0, log
        assert "Traceback" not in log, log


# ------------------------------------------------------------------------------------------------------
# strategies

I64 = (-(2**63), 2**63 - 1)
BOUNDARY = [0, 1, 2, 3, 4, 8, 16, 17, -1, -2, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
U64_BOUNDARY = [0, 1, 4, 63, 64, 128, 256, REGION_BYTES - 1, REGION_BYTES, REGION_BYTES + 1, 2**32, 2**63 - 1,
                2**63, 2**64 - 1]  # fmt: skip
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES"]  # fmt: skip
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
            "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}  # fmt: skip
TYPED_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                "fp32_contents", "fp64_contents", "bytes_contents"]  # fmt: skip
SHM_KEYS = ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]

small_text = st.text(max_size=12)
model_names = st.one_of(
    st.sampled_from(sorted(MODELS)),
    st.sampled_from(["", "..", "../add_sub", "add_sub/", "/etc/passwd", "add_sub\x00", "ADD_SUB", "a" * 4096]),
    small_text,
)
datatypes = st.one_of(st.sampled_from(DATATYPES), st.sampled_from(["fp32", "FP8", "BYTES ", "", "STRING"]), small_text)
dims = st.one_of(st.sampled_from(BOUNDARY), st.integers(*I64), st.integers(0, 20))
shapes = st.lists(dims, max_size=4)
u64 = st.one_of(st.sampled_from(U64_BOUNDARY), st.integers(0, 2**64 - 1))
i64 = st.one_of(st.sampled_from(BOUNDARY), st.integers(*I64))


def _typed_values(fname: str) -> st.SearchStrategy[list[Any]]:
    element: st.SearchStrategy[Any] = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(*I64),
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": st.integers(0, 2**64 - 1),
        "fp32_contents": st.floats(width=32),
        "fp64_contents": st.floats(),
        "bytes_contents": st.binary(max_size=24),
    }[fname]
    return st.lists(element, max_size=40)


@st.composite
def param_values(draw: st.DrawFn, key: str = "") -> tuple[str, Any]:
    kind = draw(st.sampled_from(["string_param", "int64_param", "uint64_param", "bool_param", "double_param"]))
    if kind == "string_param":
        return kind, draw(st.sampled_from([REGION, "nope", ""]) if key == SHM_KEYS[0] else small_text)
    if kind == "int64_param":
        return kind, draw(i64)
    if kind == "uint64_param":
        return kind, draw(u64)
    if kind == "bool_param":
        return kind, draw(st.booleans())
    return kind, draw(st.floats())


@st.composite
def parameters(draw: st.DrawFn, shm_likely: bool = False) -> dict[str, tuple[str, Any]]:
    keys = draw(st.lists(st.one_of(st.sampled_from([*SHM_KEYS, "classification", "binary_data_size"]), small_text),
                         max_size=4, unique=True))  # fmt: skip
    if shm_likely and draw(st.booleans()):
        keys = list(dict.fromkeys([*SHM_KEYS[: draw(st.integers(1, 3))], *keys]))
    out = {}
    for key in keys:
        if key == SHM_KEYS[0] and draw(st.integers(0, 3)):
            out[key] = ("string_param", draw(st.sampled_from([REGION, REGION, "nope", ""])))
        elif key in SHM_KEYS[1:] and draw(st.integers(0, 3)):
            value = draw(u64)  # in range of both fields only below 2**63
            out[key] = ("int64_param" if value <= I64[1] and draw(st.booleans()) else "uint64_param", value)
        else:
            out[key] = draw(param_values(key))
    return out


def _set_params(target: Any, params: dict[str, tuple[str, Any]]) -> None:
    for key, (kind, value) in params.items():
        setattr(target[key], kind, value)


@st.composite
def bytes_raw(draw: st.DrawFn, count: int) -> bytes:
    """A BYTES tensor's wire form, often with lying length prefixes or a truncated tail."""
    parts = []
    for _ in range(draw(st.integers(0, count + 1))):
        payload = draw(st.binary(max_size=16))
        claimed = draw(st.one_of(st.just(len(payload)), st.sampled_from([0, len(payload) + 1, 2**31, 2**32 - 1])))
        parts.append(struct.pack("<I", claimed) + payload)
    data = b"".join(parts)
    if draw(st.integers(0, 4)) == 0:
        data += draw(st.binary(max_size=3))  # a truncated length prefix
    return data


def _valid_tensor_bytes(t: Tensor, shape: list[int], rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    count = int(np.prod(shape))
    if t.datatype == "BYTES":
        # UTF-8 (ONNX Runtime's strings are text): printable ASCII of random lengths, some empty
        items = [bytes(rng.integers(32, 127, int(rng.integers(0, 12)), dtype=np.uint8)) for _ in range(count)]
        return b"".join(struct.pack("<I", len(s)) + s for s in items), np.array(items, dtype=object).reshape(shape)
    dtype = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}[t.datatype]
    arr = (rng.standard_normal(count) * 100).astype(dtype).reshape(shape)
    return arr.tobytes(), arr


@dataclass
class Case:
    request: Any
    # The expected outputs when the request is valid by construction (no mutation); None otherwise.
    expected: dict[str, np.ndarray] | None
    note: list[str]  # what was built and mutated, for the failure message
    region_blob: bytes | None = None  # written at the start of the region before sending (inputs in shm)


def _reference(model: Model, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if model.name.startswith("add_sub"):
        a, b = arrays["INPUT0"], arrays["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
    if model.name == "int_add":
        a, b = arrays["INPUT0"], arrays["INPUT1"]
        return {"OUTPUT0": a.astype(np.int64) + b, "OUTPUT1": (a + a).astype(np.int32)}
    return {"OUTPUT0": arrays["INPUT0"]}


MUTATIONS = ["model_name", "model_version", "datatype", "shape", "drop_raw", "extra_raw", "truncate_raw",
             "duplicate_input", "unknown_input", "drop_input", "typed_contents", "input_params", "outputs",
             "request_params", "bytes_prefix"]  # fmt: skip


@st.composite
def infer_cases(draw: st.DrawFn) -> Case:
    """A valid request for a real model, then zero to three mutations of it; or a wholly random request."""
    req = service_pb2.ModelInferRequest(id=draw(small_text))
    note: list[str] = []
    if draw(st.integers(0, 4)) == 0:  # wholly random
        req.model_name = draw(model_names)
        for _ in range(draw(st.integers(0, 3))):
            t = req.inputs.add(name=draw(st.one_of(st.sampled_from(["INPUT0", "INPUT1"]), small_text)),
                               datatype=draw(datatypes), shape=draw(shapes))  # fmt: skip
            _set_params(t.parameters, draw(parameters(shm_likely=True)))
            if draw(st.integers(0, 3)) == 0:
                fname = draw(st.sampled_from(TYPED_FIELDS))
                getattr(t.contents, fname).extend(draw(_typed_values(fname)))
        req.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=4)))
        _set_params(req.parameters, draw(parameters()))
        return Case(req, None, ["random"])

    model = MODELS[draw(st.sampled_from(sorted(MODELS)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, 3))
    inner = [d if d > 0 else draw(st.integers(1, 6)) for d in model.inputs[0].dims]
    shape = ([batch] if model.max_batch else []) + inner
    req.model_name = model.name
    arrays: dict[str, np.ndarray] = {}
    use_shm = draw(st.integers(0, 3)) == 0 and model.name != "identity_bytes"
    offset = 0
    for t in model.inputs:
        data, arr = _valid_tensor_bytes(t, shape, rng)
        arrays[t.name] = arr
        x = req.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
        if use_shm:
            x.parameters[SHM_KEYS[0]].string_param = REGION
            x.parameters[SHM_KEYS[1]].int64_param = len(data)
            x.parameters[SHM_KEYS[2]].int64_param = offset
            offset += len(data)
        else:
            req.raw_input_contents.append(data)
    note.append(f"{model.name} {shape}{' shm' if use_shm else ''}")
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    for m in mutations:
        note.append(m)
        n_in = len(req.inputs)
        if m == "model_name":
            req.model_name = draw(model_names)
        elif m == "model_version":
            req.model_version = draw(st.one_of(st.sampled_from(["1", "2", "0", "-1", "99999999999"]), small_text))
        elif m == "datatype" and n_in:
            req.inputs[draw(st.integers(0, n_in - 1))].datatype = draw(datatypes)
        elif m == "shape" and n_in:
            req.inputs[draw(st.integers(0, n_in - 1))].shape[:] = draw(shapes)
        elif m == "drop_raw" and req.raw_input_contents:
            del req.raw_input_contents[draw(st.integers(0, len(req.raw_input_contents) - 1))]
        elif m == "extra_raw":
            req.raw_input_contents.append(draw(st.binary(max_size=300)))
        elif m == "truncate_raw" and req.raw_input_contents:
            i = draw(st.integers(0, len(req.raw_input_contents) - 1))
            raw = req.raw_input_contents[i]
            req.raw_input_contents[i] = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
        elif m == "duplicate_input" and n_in:
            req.inputs.add().CopyFrom(req.inputs[0])
            if req.raw_input_contents:
                req.raw_input_contents.append(req.raw_input_contents[0])
        elif m == "unknown_input":
            req.inputs.add(name=draw(small_text), datatype=draw(datatypes), shape=draw(shapes))
        elif m == "drop_input" and n_in:
            del req.inputs[draw(st.integers(0, n_in - 1))]
        elif m == "typed_contents" and n_in:
            fname = draw(st.sampled_from(TYPED_FIELDS))
            t = req.inputs[draw(st.integers(0, n_in - 1))]
            getattr(t.contents, fname).extend(draw(_typed_values(fname)))
            if draw(st.booleans()):
                del req.raw_input_contents[:]
        elif m == "input_params" and n_in:
            _set_params(req.inputs[draw(st.integers(0, n_in - 1))].parameters, draw(parameters(shm_likely=True)))
        elif m == "outputs":
            names = [t.name for t in model.outputs]
            for _ in range(draw(st.integers(1, 3))):
                o = req.outputs.add(name=draw(st.one_of(st.sampled_from(names), small_text)))
                _set_params(o.parameters, draw(parameters(shm_likely=True)))
        elif m == "request_params":
            _set_params(req.parameters, draw(parameters()))
            if draw(st.booleans()):
                req.parameters["timeout"].int64_param = draw(i64)
        elif m == "bytes_prefix" and req.raw_input_contents:
            count = int(np.prod(shape)) if model.name == "identity_bytes" else draw(st.integers(0, 8))
            req.raw_input_contents[0] = draw(bytes_raw(count))
    blob = b"".join(arrays[t.name].tobytes() for t in model.inputs) if use_shm else None
    return Case(req, None if mutations else _reference(model, arrays), note, blob)


# ------------------------------------------------------------------------------------------------------
# checks


def _ensure_region(t: Target) -> None:
    try:
        t.stub.SystemSharedMemoryRegister(
            service_pb2.SystemSharedMemoryRegisterRequest(name=REGION, key=t.key, byte_size=REGION_BYTES),
            timeout=CALL_TIMEOUT,
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e.details()


def _assert_alive(t: Target) -> None:
    live = t.stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=CALL_TIMEOUT)
    assert live.live
    for name in MODELS:
        ready = t.stub.ModelReady(service_pb2.ModelReadyRequest(name=name), timeout=CALL_TIMEOUT)
        assert ready.ready, f"model '{name}' is no longer ready: a request killed its worker?"


def _call(fn: Any, request: Any) -> tuple[grpc.StatusCode, Any, str, float]:
    start = time.monotonic()
    try:
        reply = fn(request, timeout=CALL_TIMEOUT)
        return grpc.StatusCode.OK, reply, "", time.monotonic() - start
    except grpc.RpcError as e:
        return e.code(), None, e.details() or "", time.monotonic() - start


def _check_outputs(case: Case, reply: Any) -> None:
    assert case.expected is not None
    model = MODELS[case.request.model_name]
    by_name = {o.name: (o, raw) for o, raw in zip(reply.outputs, reply.raw_output_contents)}
    assert set(by_name) == {t.name for t in model.outputs}
    for t in model.outputs:
        meta, raw = by_name[t.name]
        want = case.expected[t.name]
        assert list(meta.shape) == list(want.shape)
        if t.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            assert items == list(want.reshape(-1))
        else:
            got = np.frombuffer(raw, dtype=want.dtype).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5)


def _send_infer(t: Target, case: Case) -> None:
    if case.region_blob is not None:
        shm.set_shared_memory_region(t.region, [np.frombuffer(case.region_blob, np.uint8)])
    code, reply, details, elapsed = _call(t.stub.ModelInfer, case.request)
    event(f"{code.name}{' (valid by construction)' if case.expected is not None else ''}")
    allowed = set(EXPECTED)
    if "timeout" in case.request.parameters:
        allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)  # the request's own timeout, not a hang
    assert code in allowed, (code, details, case.note)
    assert elapsed < CALL_TIMEOUT - 0.5 or code != grpc.StatusCode.DEADLINE_EXCEEDED, "hang"
    if case.expected is not None:
        assert code == grpc.StatusCode.OK, (code, details, case.note)
        _check_outputs(case, reply)


# ------------------------------------------------------------------------------------------------------
# the fuzz tests


@settings(FUZZ_SETTINGS, max_examples=1500 * SCALE)
@given(case=infer_cases())
def test_fuzz_model_infer(target: Target, case: Case) -> None:
    _ensure_region(target)
    _send_infer(target, case)
    _assert_alive(target)


@settings(FUZZ_SETTINGS, max_examples=150 * SCALE)
@given(cases=st.lists(infer_cases(), min_size=1, max_size=5))
def test_fuzz_model_stream_infer(target: Target, cases: list[Case]) -> None:
    """The same requests on one stream (no region writes): one response each, the stream itself ends OK."""
    _ensure_region(target)
    for i, case in enumerate(cases):
        case.request.id = f"s{i}"
    start = time.monotonic()
    replies = list(target.stub.ModelStreamInfer(iter([c.request for c in cases]), timeout=CALL_TIMEOUT))
    assert time.monotonic() - start < CALL_TIMEOUT
    assert sorted(r.infer_response.id for r in replies) == sorted(c.request.id for c in cases)
    for r in replies:
        assert "internal error" not in r.error_message, r.error_message
    _assert_alive(target)


key_strategy = st.one_of(
    st.sampled_from(["", "/", "//x", "/..", "/.", "/../x", "/dev/shm/x", "../../etc/passwd", "/a/b", "/kernelport",
                     "/kernelport_lane", "/kp_x", "/kp-add_sub-lane0", "/nonexistent_" + uuid.uuid4().hex,
                     "/x\x00y", "/" + "k" * 300, "\\x"]),
    small_text,
    st.text(min_size=1, max_size=30).map(lambda s: "/" + s),
)  # fmt: skip


@settings(FUZZ_SETTINGS, max_examples=800 * SCALE)
@given(
    name=st.one_of(st.sampled_from(["", "r", "a" * 300, "fz2", " ", "../r"]), small_text),
    use_real_key=st.booleans(),
    key=key_strategy,
    offset=u64,
    byte_size=u64,
)
def test_fuzz_system_shm_register(
    target: Target, name: str, use_real_key: bool, key: str, offset: int, byte_size: int
) -> None:
    if use_real_key:
        key = target.key if key.startswith("/") else target.key.lstrip("/")
    request = service_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
    code, _, details, _ = _call(target.stub.SystemSharedMemoryRegister, request)
    event(code.name)
    assert code in EXPECTED, (code, details)
    if code == grpc.StatusCode.OK:
        # It was valid: within the object, through the real key, under a new name.
        assert use_real_key and name != REGION
        assert offset + byte_size <= REGION_BYTES and byte_size > 0
        status = target.stub.SystemSharedMemoryStatus(
            service_pb2.SystemSharedMemoryStatusRequest(name=name), timeout=CALL_TIMEOUT
        )
        region = status.regions[name]
        assert (region.offset, region.byte_size) == (offset, byte_size)
        target.stub.SystemSharedMemoryUnregister(
            service_pb2.SystemSharedMemoryUnregisterRequest(name=name), timeout=CALL_TIMEOUT
        )
    else:
        assert details and target.key not in details
    code, _, details, _ = _call(
        target.stub.SystemSharedMemoryStatus, service_pb2.SystemSharedMemoryStatusRequest(name=name)
    )
    assert code in EXPECTED, (code, details)
    _assert_alive(target)
