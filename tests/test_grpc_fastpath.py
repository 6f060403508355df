"""The gRPC ModelInfer fast path (a per-model plan checked once per request, no second validation in the data
plane) answers as the general path does, and follows a model whose inputs change on reload."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from _models import write_onnx_model
from kernelport.server.process import ServerProcess

pytestmark = pytest.mark.timeout(180)

FP32_CONFIG = """name: "swap"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
INT32_CONFIG = """name: "swap"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_INT32 dims: [ 3 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ 3 ] }, { name: "Z" data_type: TYPE_INT32 dims: [ 3 ] } ]
"""


def _write(repo: str, config: str, elem: int, n: int) -> None:
    from onnx import helper

    vi = helper.make_tensor_value_info
    write_onnx_model(repo, "swap", config,
                     [helper.make_node("Add", ["X", "X"], ["Y"]), helper.make_node("Mul", ["X", "X"], ["Z"])],
                     [vi("X", elem, ["b", n])], [vi("Y", elem, ["b", n]), vi("Z", elem, ["b", n])])


def _infer(g: grpcclient.InferenceServerClient, x: np.ndarray, datatype: str,
           outputs: list[str] | None = None) -> grpcclient.InferResult:
    t = grpcclient.InferInput("X", list(x.shape), datatype)
    t.set_data_from_numpy(x)
    outs = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return g.infer("swap", [t], outputs=outs)


def test_fast_path_answers_and_follows_a_reload(tmp_path) -> None:
    from onnx import TensorProto

    repo = str(tmp_path / "repo")
    _write(repo, FP32_CONFIG, TensorProto.FLOAT, 4)
    srv = ServerProcess.with_ports(repo, str(tmp_path / "kp.sock"), grpc=True)
    try:
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        r = _infer(g, x, "FP32")
        np.testing.assert_array_equal(r.as_numpy("Y"), x + x)
        np.testing.assert_array_equal(r.as_numpy("Z"), x * x)
        # a requested subset, in another order than the model's: each output where it was asked for
        r = _infer(g, x[:1], "FP32", ["Z", "Y"])
        assert [o.name for o in r.get_response().outputs] == ["Z", "Y"]
        np.testing.assert_array_equal(r.as_numpy("Z"), x[:1] * x[:1])
        r = _infer(g, x[:2], "FP32", ["Z"])
        assert [o.name for o in r.get_response().outputs] == ["Z"]
        # requests the fast path does not take get the general path's answer
        with pytest.raises(InferenceServerException, match="expected FP32"):
            _infer(g, np.ones((1, 4), np.int32), "INT32")
        with pytest.raises(InferenceServerException, match="requested more than once"):
            _infer(g, x[:1], "FP32", ["Y", "Y"])
        with pytest.raises(InferenceServerException, match="exceeds the model's max_batch_size"):
            _infer(g, np.ones((5, 4), np.float32), "FP32")
        # the model changes its input on reload: the old request shape is refused, the new one served
        _write(repo, INT32_CONFIG, TensorProto.INT32, 3)
        g.load_model("swap")
        xi = np.array([[1, -2, 3], [4, 5, -6]], np.int32)
        r = _infer(g, xi, "INT32")
        np.testing.assert_array_equal(r.as_numpy("Y"), xi + xi)
        np.testing.assert_array_equal(r.as_numpy("Z"), xi * xi)
        with pytest.raises(InferenceServerException, match="expected INT32"):
            _infer(g, x, "FP32")
    finally:
        assert srv.stop() == 0, srv.log()
