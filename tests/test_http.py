"""The HTTP/REST front end (KServe v2, Triton's HTTP protocol), against a real `kernelport serve` subprocess
with `--http-port` and `--grpc-port`: plain HTTP requests written here (JSON tensors and the binary tensor
extension), `urllib.request` as a curl user would, and `tritonclient.http` as an independent client.
Results are compared with numpy, and with the same request over gRPC and the local client. Every bad
request checks its status code and message, then that the server still answers.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from _models import write_identity_bytes, write_int_add, write_onnx_model
from conftest import ServerProcess, add_sub_variant
from kernelport import Client

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------------------------------------------
# models built here, and the server

LOGICAL_NOT_CONFIG = """name: "logical_not"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_BOOL dims: [ 2, 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_BOOL dims: [ 2, 3 ] } ]
"""


def _write_models(repo: str) -> None:
    from onnx import TensorProto
    from onnx import helper as h

    write_int_add(repo)
    write_identity_bytes(repo)
    write_onnx_model(repo, "logical_not", LOGICAL_NOT_CONFIG, [h.make_node("Not", ["INPUT0"], ["OUTPUT0"])],
                 [h.make_tensor_value_info("INPUT0", TensorProto.BOOL, [2, 3])],
                 [h.make_tensor_value_info("OUTPUT0", TensorProto.BOOL, [2, 3])])
    add_sub_variant(repo, "add_sub_reload", "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n")




@dataclass
class Servers:
    process: ServerProcess
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


MAX_BODY_MB = 4


@pytest.fixture(scope="module")
def http_repo(served_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("http_repository"))
    shutil.copytree(served_repo, path, dirs_exist_ok=True)
    _write_models(path)
    return path


@pytest.fixture(scope="module")
def srv(http_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    sock = str(tmp_path_factory.mktemp("http_sock") / "kp.sock")
    proc = ServerProcess.with_ports(http_repo, sock, "--http-max-body-mb", str(MAX_BODY_MB), grpc=True, http=True)
    assert proc.http_port is not None and proc.grpc_port is not None
    servers = Servers(proc, proc.http_port, proc.grpc_port)
    yield servers
    code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture
def httpclient() -> Any:
    """tritonclient's HTTP client module (`tritonclient[http]`, which needs geventhttpclient)."""
    return pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")


@pytest.fixture
def triton(srv: Servers, httpclient: Any) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}", concurrency=4)
    try:
        yield c
    finally:
        c.close()


# ------------------------------------------------------------------------------------------------------
# plain HTTP


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(srv: Servers, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None) -> Reply:
    c = conn or http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if conn is None:
            c.close()


def infer_body(inputs: dict[str, np.ndarray], binary: frozenset[str] | set[str] = frozenset(),
               outputs: dict[str, bool] | None = None, **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 inference request: inputs named in `binary` go as binary data after the JSON header."""
    tensors, blobs = [], []
    for name, x in inputs.items():
        datatype = {"f": "FP32", "i": "INT32" if x.dtype == np.int32 else "INT64", "b": "BOOL", "O": "BYTES"}[
            x.dtype.kind]
        t: dict[str, Any] = {"name": name, "shape": list(x.shape), "datatype": datatype}
        if name in binary:
            data = (b"".join(struct.pack("<I", len(s)) + s for s in x.reshape(-1)) if x.dtype.kind == "O"
                    else x.tobytes())
            t["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            t["data"] = [s.decode() for s in x.reshape(-1)] if x.dtype.kind == "O" else x.tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"inputs": tensors, **extra}
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": b}} for n, b in outputs.items()]
    header = json.dumps(doc).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def decode_response(reply: Reply) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    assert reply.status == 200, reply.body
    n = int(reply.headers.get("inference-header-content-length", len(reply.body)))
    doc = json.loads(reply.body[:n])
    dtypes = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
    out: dict[str, np.ndarray] = {}
    pos = n
    for o in doc["outputs"]:
        if "data" in o:
            arr = (np.array([s.encode() for s in o["data"]], dtype=np.object_) if o["datatype"] == "BYTES"
                   else np.array(o["data"], dtype=dtypes[o["datatype"]]))
        else:
            size = o["parameters"]["binary_data_size"]
            raw = reply.body[pos:pos + size]
            pos += size
            if o["datatype"] == "BYTES":
                items, p = [], 0
                while p < len(raw):
                    (k,) = struct.unpack_from("<I", raw, p)
                    items.append(raw[p + 4:p + 4 + k])
                    p += 4 + k
                arr = np.array(items, dtype=np.object_)
            else:
                arr = np.frombuffer(raw, dtype=dtypes[o["datatype"]])
        out[o["name"]] = arr.reshape(o["shape"])
    assert pos == len(reply.body)
    return doc, out


def infer(srv: Servers, model: str, inputs: dict[str, np.ndarray], **kw: Any) -> dict[str, np.ndarray]:
    body, headers = infer_body(inputs, **kw)
    return decode_response(request(srv, "POST", f"/v2/models/{model}/infer", body, headers))[1]


def _rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def assert_still_serving(srv: Servers) -> None:
    a, b = _rand(2, 16, seed=99), _rand(2, 16, seed=98)
    out = infer(srv, "add_sub", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)


def expect_error(reply: Reply, status: int, *fragments: str) -> str:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    message = reply.json()["error"]
    for f in fragments:
        assert f in message, message
    return str(message)


# ------------------------------------------------------------------------------------------------------
# health, metadata, configuration


def test_health_and_server_metadata(srv: Servers) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/add_sub/ready",
                 "/v2/models/add_sub/versions/1/ready"):
        r = request(srv, "GET", path)
        assert (r.status, r.body) == (200, b""), path
    for path in ("/v2/models/no_such_model/ready", "/v2/models/add_sub/versions/9/ready"):
        assert request(srv, "GET", path).status == 400, path
    meta = request(srv, "GET", "/v2").json()
    assert meta["name"] == "kernelport" and meta["version"]
    assert {"model_configuration", "model_repository", "statistics", "binary_tensor_data"} <= set(meta["extensions"])


def test_model_metadata_and_config(srv: Servers, http_repo: str) -> None:
    meta = request(srv, "GET", "/v2/models/add_sub").json()
    assert meta == {
        "name": "add_sub", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": f"INPUT{i}", "datatype": "FP32", "shape": [-1, 16]} for i in range(2)],
        "outputs": [{"name": f"OUTPUT{i}", "datatype": "FP32", "shape": [-1, 16]} for i in range(2)],
    }
    assert request(srv, "GET", "/v2/models/add_sub/versions/1").json() == meta
    assert request(srv, "GET", "/v2/models/logical_not").json()["inputs"] == [
        {"name": "INPUT0", "datatype": "BOOL", "shape": [2, 3]}]
    expect_error(request(srv, "GET", "/v2/models/add_sub/versions/9"), 404, "add_sub", "9")
    # the configuration: as the gRPC ModelConfig (read another way), with 64-bit integers as JSON numbers
    config = request(srv, "GET", "/v2/models/int_add/config").json()
    assert config["name"] == "int_add" and config["max_batch_size"] == 8
    assert [t["dims"] for t in config["input"]] == [[-1], [-1]]
    assert [t["data_type"] for t in config["input"]] == ["TYPE_INT32", "TYPE_INT64"]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") as g:
        via_grpc = g.get_model_config("int_add", as_json=True)["config"]
    assert config["input"] == [{**t, "dims": [int(d) for d in t["dims"]]} for t in via_grpc["input"]]
    assert config["output"] == [{**t, "dims": [int(d) for d in t["dims"]]} for t in via_grpc["output"]]
    expect_error(request(srv, "GET", "/v2/models/no_such_model/config"), 404, "no_such_model")


# ------------------------------------------------------------------------------------------------------
# inference


def test_infer_json_binary_grpc_and_local_agree(srv: Servers) -> None:
    a, b = _rand(3, 16, seed=1), _rand(3, 16, seed=2)
    json_out = infer(srv, "add_sub", {"INPUT0": a, "INPUT1": b})
    binary_out = infer(srv, "add_sub", {"INPUT0": a, "INPUT1": b}, binary={"INPUT0", "INPUT1"},
                       outputs={"OUTPUT0": True, "OUTPUT1": True})
    mixed_out = infer(srv, "add_sub", {"INPUT0": a, "INPUT1": b}, binary={"INPUT1"},
                      outputs={"OUTPUT1": False, "OUTPUT0": True})
    assert list(mixed_out) == ["OUTPUT1", "OUTPUT0"]  # in the order asked for
    with grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") as g:
        xs = [grpcclient.InferInput(n, [3, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        xs[0].set_data_from_numpy(a)
        xs[1].set_data_from_numpy(b)
        res = g.infer("add_sub", xs)
        grpc_out = {n: res.as_numpy(n) for n in ("OUTPUT0", "OUTPUT1")}
    with Client(srv.process.socket_path) as c:
        local_out = c.infer("add_sub", {"INPUT0": a, "INPUT1": b})
    for out in (json_out, binary_out, mixed_out, grpc_out, local_out):
        assert out["OUTPUT0"].dtype == np.float32 and out["OUTPUT0"].shape == (3, 16)
        np.testing.assert_array_equal(out["OUTPUT0"], a + b)
        np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    # the JSON header of a binary response says where each output is, and carries the request's id
    body, headers = infer_body({"INPUT0": a, "INPUT1": b}, outputs={"OUTPUT0": True}, id="req-7")
    doc, _ = decode_response(request(srv, "POST", "/v2/models/add_sub/versions/1/infer", body, headers))
    assert doc["id"] == "req-7" and doc["model_name"] == "add_sub" and doc["model_version"] == "1"
    assert doc["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [3, 16],
                               "parameters": {"binary_data_size": 3 * 16 * 4}}]


def test_infer_nested_json_and_nobatch(srv: Servers) -> None:
    a, b = _rand(16, seed=3), _rand(16, seed=4)
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [16], "datatype": "FP32", "data": a.reshape(4, 4).tolist()},  # nested
        {"name": "INPUT1", "shape": [16], "datatype": "FP32", "data": b.tolist()},
    ]}).encode()
    _, out = decode_response(request(srv, "POST", "/v2/models/add_sub_nobatch/infer", body))
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    assert out["OUTPUT0"].shape == (16,)


def test_infer_int_bool_and_bytes(srv: Servers) -> None:
    x0 = np.array([[1, -2, 2**31 - 1]], np.int32)
    x1 = np.array([[10, 2**40, -5]], np.int64)
    for binary in (set(), {"INPUT0", "INPUT1"}):
        out = infer(srv, "int_add", {"INPUT0": x0, "INPUT1": x1}, binary=binary)
        np.testing.assert_array_equal(out["OUTPUT0"], x0.astype(np.int64) + x1)
        np.testing.assert_array_equal(out["OUTPUT1"], x0 + x0)  # int32 wraps, as numpy does
        assert out["OUTPUT0"].dtype == np.int64
    flags = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(infer(srv, "logical_not", {"INPUT0": flags})["OUTPUT0"], ~flags)
    np.testing.assert_array_equal(infer(srv, "logical_not", {"INPUT0": flags}, binary={"INPUT0"},
                                        outputs={"OUTPUT0": True})["OUTPUT0"], ~flags)
    words = np.array([[b"alpha", b"", "grüße".encode(), b"x" * 300]], dtype=np.object_)
    for binary, out_binary in ((set(), False), ({"INPUT0"}, True), ({"INPUT0"}, False)):
        out = infer(srv, "identity_bytes", {"INPUT0": words}, binary=binary, outputs={"OUTPUT0": out_binary})
        assert out["OUTPUT0"].tolist() == words.tolist()


def test_tritonclient_http(triton: Any, httpclient: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("add_sub") and not triton.is_model_ready("no_such_model")
    assert triton.get_server_metadata()["name"] == "kernelport"
    assert triton.get_model_metadata("add_sub")["inputs"][0]["shape"] == [-1, 16]
    assert triton.get_model_config("add_sub")["max_batch_size"] == 16
    a, b = _rand(4, 16, seed=5), _rand(4, 16, seed=6)
    for binary_in, binary_out in ((True, True), (False, False), (True, False)):
        xs = [httpclient.InferInput(n, [4, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        xs[0].set_data_from_numpy(a, binary_data=binary_in)
        xs[1].set_data_from_numpy(b, binary_data=binary_in)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
        res = triton.infer("add_sub", xs, outputs=outs, request_id="t1")
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
        assert res.get_response()["id"] == "t1"
    # no outputs named: tritonclient asks for every output in binary (binary_data_output)
    xs = [httpclient.InferInput(n, [4, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    xs[0].set_data_from_numpy(a)
    xs[1].set_data_from_numpy(b)
    np.testing.assert_array_equal(triton.infer("add_sub", xs).as_numpy("OUTPUT1"), a - b)
    # request compression (gzip and deflate bodies) and asynchronous requests
    for algorithm in ("gzip", "deflate"):
        res = triton.infer("add_sub", xs, request_compression_algorithm=algorithm,
                           response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
    pending = [triton.async_infer("add_sub", xs) for _ in range(8)]
    for p in pending:
        np.testing.assert_array_equal(p.get_result().as_numpy("OUTPUT0"), a + b)
    # BYTES and integers through tritonclient's own encoders
    words = np.array([[b"a", b"bb", b"", b"dddd"]], dtype=np.object_)
    x = httpclient.InferInput("INPUT0", [1, 4], "BYTES")
    x.set_data_from_numpy(words)
    assert triton.infer("identity_bytes", [x]).as_numpy("OUTPUT0").tolist() == words.tolist()
    # errors carry the HTTP status
    with pytest.raises(InferenceServerException) as info:
        triton.infer("no_such_model", xs)
    assert info.value.status() == "404" and "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("add_sub", model_version="9")
    assert info.value.status() == "404"
    # the repository extension as tritonclient calls it (unload sends unload_dependents, load an empty body)
    triton.unload_model("add_sub_reload")
    assert not triton.is_model_ready("add_sub_reload")
    assert {m["name"]: m["state"] for m in triton.get_model_repository_index()}["add_sub_reload"] == "UNAVAILABLE"
    triton.load_model("add_sub_reload")
    assert triton.is_model_ready("add_sub_reload")
    assert triton.get_inference_statistics("add_sub")["model_stats"][0]["name"] == "add_sub"


def test_statistics_match_grpc_and_count_http_requests(srv: Servers) -> None:
    model = "add_sub_window"
    before = request(srv, "GET", f"/v2/models/{model}/versions/1/stats").json()["model_stats"][0]
    a, b = _rand(2, 16, seed=11), _rand(2, 16, seed=12)
    for _ in range(3):
        np.testing.assert_array_equal(infer(srv, model, {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)
    after = request(srv, "GET", f"/v2/models/{model}/stats").json()["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert set(after["inference_stats"]) >= {"success", "fail", "queue", "compute_input", "compute_infer",
                                              "compute_output"}
    assert sum(s["batch_size"] * s["compute_infer"]["count"] for s in after["batch_stats"]) == after["inference_count"]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") as g:
        via_grpc = g.get_inference_statistics(model, as_json=True)["model_stats"][0]
    assert int(via_grpc["inference_count"]) == after["inference_count"]
    assert int(via_grpc["inference_stats"]["success"]["ns"]) == after["inference_stats"]["success"]["ns"]
    everything = request(srv, "GET", "/v2/models/stats").json()["model_stats"]
    assert model in {m["name"] for m in everything} and len(everything) >= 8
    expect_error(request(srv, "GET", "/v2/models/no_such_model/stats"), 404, "no_such_model")


def test_repository_index_load_unload(srv: Servers, http_repo: str) -> None:
    index = request(srv, "POST", "/v2/repository/index").json()
    models = {d for d in os.listdir(http_repo) if os.path.isfile(os.path.join(http_repo, d, "config.pbtxt"))}
    assert {m["name"] for m in index} == models
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index)
    model = "add_sub_reload"
    assert request(srv, "POST", f"/v2/repository/models/{model}/unload", b"{}").status == 200
    assert request(srv, "GET", f"/v2/models/{model}/ready").status == 400
    states = {m["name"]: m["state"] for m in request(srv, "POST", "/v2/repository/index", b"").json()}
    assert states[model] == "UNAVAILABLE"
    ready_only = request(srv, "POST", "/v2/repository/index", b'{"ready": true}').json()
    assert model not in {m["name"] for m in ready_only}
    assert request(srv, "GET", "/v2/health/ready").status == 200  # unloaded on request: still ready
    a = np.ones((1, 16), np.float32)
    expect_error(request(srv, "POST", f"/v2/models/{model}/infer", *infer_body({"INPUT0": a, "INPUT1": a})),
                 503, model)
    assert request(srv, "POST", f"/v2/repository/models/{model}/load").status == 200
    assert request(srv, "GET", f"/v2/models/{model}/ready").status == 200
    np.testing.assert_array_equal(infer(srv, model, {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)
    expect_error(request(srv, "POST", f"/v2/repository/models/{model}/load",
                         b'{"parameters": {"config": "{}"}}'), 501, "config")
    expect_error(request(srv, "POST", "/v2/repository/models/no_such_model/load"), 404, "no_such_model")


def test_curl_style_urllib(srv: Servers) -> None:
    """What a curl user does: POST a JSON body, read JSON back."""
    a, b = _rand(1, 16, seed=21), _rand(1, 16, seed=22)
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.reshape(-1).tolist()},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": b.reshape(-1).tolist()}]}).encode()
    req = urllib.request.Request(f"{srv.url}/v2/models/add_sub/infer", data=body)  # curl -d: POST
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"] == "application/json"
        doc = json.load(r)
    out = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in doc["outputs"]}
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    with urllib.request.urlopen(f"{srv.url}/metrics", timeout=30) as r:
        assert b'nv_inference_request_success{model="add_sub",version="1"}' in r.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{srv.url}/v2/models/no_such_model", timeout=30)
    assert info.value.code == 404 and "no_such_model" in json.load(info.value)["error"]


def test_keep_alive_and_concurrent_connections(srv: Servers) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        for i in range(5):  # one connection, several requests (HTTP/1.1 keep-alive), an error among them
            a, b = _rand(1, 16, seed=30 + i), _rand(1, 16, seed=40 + i)
            r = request(srv, "POST", "/v2/models/add_sub/infer", *infer_body({"INPUT0": a, "INPUT1": b}), conn=conn)
            np.testing.assert_array_equal(decode_response(r)[1]["OUTPUT0"], a + b)
            assert request(srv, "GET", "/v2/models/no_such_model", conn=conn).status == 404
    finally:
        conn.close()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for k in range(10):
                a, b = _rand(1 + k % 3, 16, seed=seed * 100 + k), _rand(1 + k % 3, 16, seed=seed * 100 + 50 + k)
                np.testing.assert_array_equal(infer(srv, "add_sub", {"INPUT0": a, "INPUT1": b},
                                                    binary={"INPUT0"})["OUTPUT1"], a - b)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


# ------------------------------------------------------------------------------------------------------
# bad requests: the right status and message, and the server goes on


def _add_sub_json(**override: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16}]}
    doc.update(override)
    return doc


def _post(srv: Servers, doc: Any, model: str = "add_sub", headers: dict[str, str] | None = None) -> Reply:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return request(srv, "POST", f"/v2/models/{model}/infer", body, headers)


@pytest.mark.parametrize("doc, status, fragments", [
    (b"{not json", 400, ["not valid JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    (b"[" * 100000 + b"]" * 100000, 400, ["JSON"]),
    ({"inputs": []}, 400, ["inputs"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16}]),
     400, ["input 'INPUT0'", "expected FP32 [-1,16], got INT32 [1,16]"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16}]),
     400, ["'data' holds 15 values, expected 16"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": ["1"] * 16},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16}]),
     400, ["JSON numbers"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 15], "datatype": "FP32", "data": [1.0] * 15},
                           {"name": "INPUT1", "shape": [1, 15], "datatype": "FP32", "data": [2.0] * 15}]),
     400, ["expected FP32 [-1,16], got FP32 [1,15]"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, -16], "datatype": "FP32", "data": []}]), 400,
     ["non-negative"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": "1x16", "datatype": "FP32", "data": []}]), 400, ["shape"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]), 400,
     ["missing input 'INPUT1'"]),
    (_add_sub_json(inputs=[{"name": "EXTRA", "shape": [1], "datatype": "FP32", "data": [1.0]}]), 400,
     ["unknown input 'EXTRA'"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}] * 2), 400,
     ["more than once"]),
    (_add_sub_json(outputs=[{"name": "NOPE"}]), 400, ["unknown output 'NOPE'"]),
    (_add_sub_json(outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]), 400, ["binary_data"]),
    (_add_sub_json(outputs=[{"name": "OUTPUT0", "parameters": {"classification": 2}}]), 501, ["classification"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                            "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64}},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16}]),
     400, ["shared memory"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32",
                            "parameters": {"binary_data_size": 64}}]),
     400, ["more than the 0 bytes left"]),
    (_add_sub_json(inputs=[{"name": "INPUT0", "shape": [17, 16], "datatype": "FP32", "data": [1.0] * 272},
                           {"name": "INPUT1", "shape": [17, 16], "datatype": "FP32", "data": [1.0] * 272}]),
     400, ["batch size 17 exceeds"]),
])
def test_bad_inference_requests(srv: Servers, doc: Any, status: int, fragments: list[str]) -> None:
    expect_error(_post(srv, doc), status, *fragments)
    assert_still_serving(srv)


def test_bad_typed_values(srv: Servers) -> None:
    def ints(v0: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "INT32", "data": [v0]},
                           {"name": "INPUT1", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}

    expect_error(_post(srv, ints(2**31), "int_add"), 400, "do not fit INT32")
    expect_error(_post(srv, ints(1.5), "int_add"), 400, "JSON integers")
    expect_error(_post(srv, ints(True), "int_add"), 400, "JSON integers")
    bools = {"inputs": [{"name": "INPUT0", "shape": [2, 3], "datatype": "BOOL", "data": [1, 0, 1, 0, 1, 0]}]}
    expect_error(_post(srv, bools, "logical_not"), 400, "JSON booleans")
    words = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "BYTES", "data": [1, 2, 3, 4]}]}
    expect_error(_post(srv, words, "identity_bytes"), 400, "JSON strings")
    assert_still_serving(srv)


def test_bad_binary_bodies(srv: Servers) -> None:
    a = np.ones((1, 16), np.float32)
    body, headers = infer_body({"INPUT0": a, "INPUT1": a}, binary={"INPUT0", "INPUT1"})
    # the header length beyond the body; not a number
    for value in (str(len(body) + 1), "ten"):
        expect_error(_post(srv, body, headers={"Inference-Header-Content-Length": value}), 400,
                     "Inference-Header-Content-Length")
    # bytes that no input claims
    expect_error(_post(srv, body + b"\0" * 8, headers=headers), 400, "8 bytes of binary data")
    # a binary size that does not match the shape
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 60}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}).encode()
    expect_error(_post(srv, header + b"\0" * 60, headers={"Inference-Header-Content-Length": str(len(header))}),
                 400, "holds 60 bytes, expected 64")
    # a BYTES element whose length prefix runs past the data
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}).encode()
    expect_error(_post(srv, header + struct.pack("<I", 1000) + b"abcd", "identity_bytes",
                       headers={"Inference-Header-Content-Length": str(len(header))}), 400, "claims 1000 bytes")
    # a gzip body that is not gzip, and one that is truncated
    expect_error(_post(srv, b"not gzip at all", headers={"Content-Encoding": "gzip"}), 400, "decompress")
    good = gzip.compress(json.dumps(_add_sub_json()).encode())
    expect_error(_post(srv, good[:-12], headers={"Content-Encoding": "gzip"}), 400, "gzip")
    expect_error(_post(srv, b"{}", headers={"Content-Encoding": "br"}), 415, "br")
    assert_still_serving(srv)


def test_unknown_model_path_and_method(srv: Servers) -> None:
    expect_error(_post(srv, _add_sub_json(), "no_such_model"), 404, "no_such_model")
    expect_error(request(srv, "GET", "/v2/models/no_such_model"), 404, "no_such_model")
    expect_error(request(srv, "GET", "/v3/anything"), 404, "/v3/anything")
    expect_error(request(srv, "GET", "/v2/models/add_sub/explain"), 404)
    r = request(srv, "GET", "/v2/models/add_sub/infer")
    expect_error(r, 405, "POST")
    assert r.headers["allow"] == "POST"
    expect_error(request(srv, "DELETE", "/v2/models/add_sub"), 405)
    expect_error(request(srv, "POST", "/metrics", b""), 405)
    assert_still_serving(srv)


def test_body_limits(srv: Servers) -> None:
    limit = MAX_BODY_MB << 20
    # a Content-Length over the limit is refused before the body is sent, and the connection closed
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (limit + 1))
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"Connection: close" in reply and b"over the limit" in reply
    # with Expect: 100-continue (curl, large bodies) the refusal comes instead of the 100
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Expect: 100-continue\r\n\r\n" % (limit + 1))
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    # a real body over the limit (sent whole by http.client): 413, even if the server stops reading early
    try:
        r = request(srv, "POST", "/v2/models/add_sub/infer", b" " * (limit + 1))
        expect_error(r, 413, "over the limit")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the client was still sending: also a refusal
    # a gzip bomb: small on the wire, over the limit decompressed
    bomb = gzip.compress(b" " * (limit + 1))
    assert len(bomb) < limit
    expect_error(_post(srv, bomb, headers={"Content-Encoding": "gzip"}), 413, "decompressed")
    # chunked transfer encoding is refused with 411; a bad Content-Length with 400
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\n{}\r\n0\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 400 ")
    # a body just under the limit is read and parsed (and refused for what it says, not its size)
    padded = json.dumps(_add_sub_json()).encode()
    padded += b" " * (limit - len(padded))
    expect_error(_post(srv, padded, "no_such_model"), 404)
    np.testing.assert_array_equal(decode_response(_post(srv, padded))[1]["OUTPUT0"], np.full((1, 16), 3.0, np.float32))
    assert_still_serving(srv)


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
