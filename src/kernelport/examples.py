"""A small Triton-layout model repository, built locally with the onnx helper API (no downloads).

    python -m kernelport.examples [DIR] [--force]

Models (all ONNX opset 17, IR version 8, platform onnxruntime_onnx):

- ``add_sub``: INPUT0, INPUT1 FP32 [16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1;
  max_batch_size 16, dynamic batching with a zero window (batch what waits, never hold a lone request).
- ``add_sub_nobatch``: the same graph without a batch dim (max_batch_size 0), one request per run.
- ``mlp``: INPUT0 FP32 [512] -> MatMul 512x2048 + bias -> Relu -> MatMul 2048x512 + bias -> OUTPUT0 FP32 [512];
  max_batch_size 16, preferred batch 16, 200 us window. Weights from numpy default_rng(0), scaled so that
  outputs are O(1) for standard-normal inputs.
- ``identity_16m``: INPUT0 FP32 [4194304] (16 MiB a sample) -> Identity -> OUTPUT0; max_batch_size 1, no
  dynamic batching. ONNX Runtime copies the input into a bound output buffer (it does not alias it), so the
  model measures the cost of moving 16 MiB through the serving path.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["EXAMPLE_MODELS", "build_example_repository", "main"]

OPSET = 17
IR_VERSION = 8
MLP_IN, MLP_HIDDEN, MLP_OUT = 512, 2048, 512
IDENTITY_ELEMENTS = 4 * 1024 * 1024  # FP32: 16 MiB per sample


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeError(
            "building the example models needs the 'onnx' package: pip install 'kernelport[onnx]'"
        ) from exc
    return onnx


def _model(graph: Any) -> bytes:
    onnx = _onnx()
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="kernelport.examples",
    )
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _fp32(name: str, dims: Sequence[int | str]) -> Any:
    onnx = _onnx()
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(dims))


def _add_sub_graph(batch: bool) -> bytes:
    onnx = _onnx()
    dims: list[int | str] = ["batch", 16] if batch else [16]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            onnx.helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [_fp32("INPUT0", dims), _fp32("INPUT1", dims)],
        [_fp32("OUTPUT0", dims), _fp32("OUTPUT1", dims)],
    )
    return _model(graph)


def _mlp_graph() -> bytes:
    onnx = _onnx()
    rng = np.random.default_rng(0)
    # He-style scaling: pre-activations ~ N(0, 1) for N(0, 1) inputs, outputs ~ N(0, 1) after the Relu.
    w1 = (rng.standard_normal((MLP_IN, MLP_HIDDEN)) / np.sqrt(MLP_IN)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(MLP_HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((MLP_HIDDEN, MLP_OUT)) * np.sqrt(2.0 / MLP_HIDDEN)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(MLP_OUT)).astype(np.float32)
    initializers = [
        onnx.numpy_helper.from_array(w1, "W1"),
        onnx.numpy_helper.from_array(b1, "B1"),
        onnx.numpy_helper.from_array(w2, "W2"),
        onnx.numpy_helper.from_array(b2, "B2"),
    ]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["INPUT0", "W1"], ["h0"]),
            onnx.helper.make_node("Add", ["h0", "B1"], ["h1"]),
            onnx.helper.make_node("Relu", ["h1"], ["h2"]),
            onnx.helper.make_node("MatMul", ["h2", "W2"], ["o0"]),
            onnx.helper.make_node("Add", ["o0", "B2"], ["OUTPUT0"]),
        ],
        "mlp",
        [_fp32("INPUT0", ["batch", MLP_IN])],
        [_fp32("OUTPUT0", ["batch", MLP_OUT])],
        initializers,
    )
    return _model(graph)


def _identity_graph() -> bytes:
    onnx = _onnx()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity_16m",
        [_fp32("INPUT0", ["batch", IDENTITY_ELEMENTS])],
        [_fp32("OUTPUT0", ["batch", IDENTITY_ELEMENTS])],
    )
    return _model(graph)


def _tensor_block(kind: str, names: Sequence[str], dims: Sequence[int]) -> str:
    entries = ",\n".join(
        f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}'
        for name in names
    )
    return f"{kind} [\n{entries}\n]\n"


def _config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dims: Sequence[int],
    dynamic_batching: str | None,
) -> str:
    text = f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
    text += _tensor_block("input", inputs, dims)
    text += _tensor_block("output", outputs, dims)
    if dynamic_batching is not None:
        text += f"dynamic_batching {{\n{dynamic_batching}}}\n"
    return text


# name -> (ONNX bytes builder, config.pbtxt text)
EXAMPLE_MODELS: dict[str, tuple[Callable[[], bytes], str]] = {
    "add_sub": (
        lambda: _add_sub_graph(batch=True),
        _config(
            "add_sub",
            16,
            ["INPUT0", "INPUT1"],
            ["OUTPUT0", "OUTPUT1"],
            [16],
            "  # batch what is waiting whenever the worker is free; never hold a lone request\n"
            "  max_queue_delay_microseconds: 0\n",
        ),
    ),
    "add_sub_nobatch": (
        lambda: _add_sub_graph(batch=False),
        _config("add_sub_nobatch", 0, ["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"], [16], None),
    ),
    "mlp": (
        _mlp_graph,
        _config(
            "mlp",
            16,
            ["INPUT0"],
            ["OUTPUT0"],
            [MLP_IN],
            "  preferred_batch_size: [ 16 ]\n  max_queue_delay_microseconds: 200\n",
        ),
    ),
    "identity_16m": (
        _identity_graph,
        _config("identity_16m", 1, ["INPUT0"], ["OUTPUT0"], [IDENTITY_ELEMENTS], None),
    ),
}


def _write_atomically(path: str, data: bytes) -> None:
    # A reader (another test process, a server scanning the repository) never sees a half-written file.
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_example_repository(path: str, force: bool = False) -> list[str]:
    """Write the example models under `path` (`<path>/<name>/config.pbtxt`, `<path>/<name>/1/model.onnx`).

    A model whose config and model file both exist is left as it is unless `force`. Returns the names of
    all example models, in a fixed order (whether written now or already there).
    """
    names = list(EXAMPLE_MODELS)
    for name in names:
        build, config = EXAMPLE_MODELS[name]
        config_path = os.path.join(path, name, "config.pbtxt")
        model_path = os.path.join(path, name, "1", "model.onnx")
        if not force and os.path.isfile(config_path) and os.path.isfile(model_path):
            continue
        os.makedirs(os.path.dirname(model_path), exist_ok=True)
        _write_atomically(model_path, build())
        _write_atomically(config_path, config.encode())
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernelport.examples", description=__doc__.split("\n")[0])
    parser.add_argument(
        "directory",
        nargs="?",
        default=os.path.join("examples", "model_repository"),
        help="repository directory (default: examples/model_repository)",
    )
    parser.add_argument("--force", action="store_true", help="rewrite models that already exist")
    args = parser.parse_args(argv)
    names = build_example_repository(args.directory, force=args.force)
    print(f"{args.directory}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
