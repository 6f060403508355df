"""Small ONNX models that several test modules add to their repositories, built with the onnx helper API."""

from __future__ import annotations

import os
from typing import Any

ONNX_OPSET = 17
ONNX_IR_VERSION = 8

# int_add: INPUT0 INT32 [-1], INPUT1 INT64 [-1] -> OUTPUT0 INT64 = int64(INPUT0) + INPUT1, OUTPUT1 INT32 = 2 * INPUT0.
INT_ADD_CONFIG = """name: "int_add"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] },
        { name: "INPUT1" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT64 dims: [ -1 ] },
         { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ -1 ] } ]
"""
# identity_bytes: ONNX Identity over a string tensor [-1,4].
IDENTITY_BYTES_CONFIG = """name: "identity_bytes"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 4 ] } ]
"""


def write_onnx_model(repo: str, name: str, config: str, nodes: list[Any], inputs: list[Any],
                     outputs: list[Any]) -> None:
    """`<repo>/<name>/1/model.onnx` from these nodes, and `<repo>/<name>/config.pbtxt` with `config`."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION)
    onnx.checker.check_model(model)
    os.makedirs(os.path.join(repo, name, "1"), exist_ok=True)
    onnx.save(model, os.path.join(repo, name, "1", "model.onnx"))
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(config)


def write_int_add(repo: str, batching: str = "") -> None:
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    write_onnx_model(
        repo, "int_add", INT_ADD_CONFIG + batching,
        [helper.make_node("Cast", ["INPUT0"], ["wide0"], to=TensorProto.INT64),
         helper.make_node("Add", ["wide0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Add", ["INPUT0", "INPUT0"], ["OUTPUT1"])],
        [vi("INPUT0", TensorProto.INT32, ["batch", "n"]), vi("INPUT1", TensorProto.INT64, ["batch", "n"])],
        [vi("OUTPUT0", TensorProto.INT64, ["batch", "n"]), vi("OUTPUT1", TensorProto.INT32, ["batch", "n"])],
    )


def write_identity_bytes(repo: str, batching: str = "") -> None:
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    write_onnx_model(
        repo, "identity_bytes", IDENTITY_BYTES_CONFIG + batching,
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [vi("INPUT0", TensorProto.STRING, ["batch", 4])], [vi("OUTPUT0", TensorProto.STRING, ["batch", 4])],
    )
