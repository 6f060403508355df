"""TensorRT: the tensorrt backend (model.plan), and ONNX Runtime's TensorRT/CUDA execution providers.

The tensorrt backend's own tests need the `tensorrt` package and a CUDA GPU; they build a small engine with
TensorRT's builder and check it against numpy, and are skipped with the reason elsewhere (they have never
run on the CPU-only machines this project is developed on). The execution-provider mapping of the ONNX
Runtime backend, and the "not installed" errors, run everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kernelport.backends import TensorSig, load_backend
from kernelport.errors import BackendUnavailableError, ConfigError
from kernelport.repository import ModelSpec, parse_config

pytestmark = pytest.mark.timeout(300)


def _has_gpu() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 -- no cupy, no driver, no device: all mean "no GPU here"
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
_TENSORRT_MARKS = (
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_TENSORRT, reason="the tensorrt package is not installed (pip install 'kernelport[tensorrt]')"
    ),
    pytest.mark.skipif(HAS_TENSORRT and not _has_gpu(), reason="no CUDA GPU (with CuPy or torch.cuda) visible"),
)


def needs_tensorrt(test: Callable[..., None]) -> Callable[..., None]:
    """Run only where TensorRT and a GPU are (the skip is decided before any fixture is built)."""
    for mark in _TENSORRT_MARKS:
        test = mark(test)
    return test


def spec(text: str, name: str = "m") -> ModelSpec:
    return ModelSpec.from_proto(parse_config(f'name: "{name}"\n{text}', model_name=name))


# -- the tensorrt backend: errors that need no TensorRT ------------------------------------------------------


def test_missing_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, installed or not
    monkeypatch.delitem(sys.modules, "kernelport.backends.tensorrt", raising=False)
    with pytest.raises(
        BackendUnavailableError,
        match="the tensorrt backend needs the 'tensorrt' package, which is not installed: "
        "pip install 'kernelport\\[tensorrt\\]'",
    ):
        load_backend("tensorrt_plan")


# -- the tensorrt backend on a real engine ------------------------------------------------------------------


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        "w1": (rng.standard_normal((16, 32)) / 4).astype(np.float32),
        "b1": (rng.standard_normal((1, 32)) / 4).astype(np.float32),
        "w2": (rng.standard_normal((32, 8)) / 4).astype(np.float32),
        "b2": (rng.standard_normal((1, 8)) / 4).astype(np.float32),
    }


def _reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    return np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0.0) @ w["w2"] + w["b2"]


# A plan of Linear 16->32, ReLU, Linear 32->8 with one profile for batch 1..16, built once per module.
@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    trt = pytest.importorskip("tensorrt")
    weights = _weights()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    x = network.add_input("x", trt.float32, (-1, 16))

    def dense(tensor: object, w: np.ndarray, b: np.ndarray) -> object:
        weight = network.add_constant(w.shape, trt.Weights(w))
        bias = network.add_constant(b.shape, trt.Weights(b))
        product = network.add_matrix_multiply(
            tensor, trt.MatrixOperation.NONE, weight.get_output(0), trt.MatrixOperation.NONE
        )
        return network.add_elementwise(
            product.get_output(0), bias.get_output(0), trt.ElementWiseOperation.SUM
        ).get_output(0)

    hidden = network.add_activation(dense(x, weights["w1"], weights["b1"]), trt.ActivationType.RELU).get_output(0)
    y = dense(hidden, weights["w2"], weights["b2"])
    y.name = "y"
    network.mark_output(y)
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # keep FP32 matmuls FP32, for a tight numpy comparison
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 16), (8, 16), (16, 16))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT could not build the test engine"
    path = tmp_path_factory.mktemp("trt") / "model.plan"
    path.write_bytes(bytes(serialized))
    return str(path), weights


@needs_tensorrt
@pytest.mark.parametrize("platform", ["tensorrt", "tensorrt_plan"])
def test_engine_signature_and_batches(platform: str, plan: tuple[str, dict[str, np.ndarray]]) -> None:
    from kernelport.backends.tensorrt import TensorRTBackend

    path, weights = plan
    backend = load_backend(platform)
    assert isinstance(backend, TensorRTBackend)
    backend.load(path, spec("max_batch_size: 16"))
    assert backend.io_signature() == ([TensorSig("x", "FP32", (-1, 16))], [TensorSig("y", "FP32", (-1, 8))])
    assert backend.device() == "cuda:0"
    assert backend.framework_version().startswith("tensorrt ")
    assert backend.output_shapes({"x": (5, 16)}) == {"y": (5, 8)}
    rng = np.random.default_rng(7)
    slot_in = rng.standard_normal((16, 16)).astype(np.float32)
    for n in (1, 3, 16):
        slot_out = np.full((16, 8), np.nan, np.float32)
        runner = backend.bind({"x": slot_in[:n]}, {"y": slot_out[:n]})
        runner()
        np.testing.assert_allclose(slot_out[:n], _reference(weights, slot_in[:n]), rtol=1e-3, atol=1e-4)
        assert np.isnan(slot_out[n:]).all()
        slot_in[:n] += 1.0  # the runner copies the rows' current contents in on every run
        runner()
        np.testing.assert_allclose(slot_out[:n], _reference(weights, slot_in[:n]), rtol=1e-3, atol=1e-4)
    backend.close()


@needs_tensorrt
def test_engine_profile_must_cover_max_batch_size(plan: tuple[str, dict[str, np.ndarray]]) -> None:
    path, _ = plan
    backend = load_backend("tensorrt")
    with pytest.raises(ConfigError, match="model 'm': no optimization profile of the engine takes batch size 32"):
        backend.load(path, spec("max_batch_size: 32"))
    with pytest.raises(ConfigError, match="model 'm' input 'image': not an input of the engine \\(it has x\\)"):
        backend.load(path, spec('max_batch_size: 16\ninput [ { name: "image" data_type: TYPE_FP32 dims: [ 16 ] } ]'))
    backend.load(path, spec("max_batch_size: 16"))
    with pytest.raises(ValueError, match="input 'x': expected FP32 \\[-1,16\\], got FP32 \\[2,15\\]"):
        backend.bind({"x": np.zeros((2, 15), np.float32)}, {"y": np.zeros((2, 8), np.float32)})


# -- ONNX Runtime's execution providers (TensorRT / CUDA / CPU) ------------------------------------------------

ADD_SUB = """
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""
GPU_TENSORRT = """
instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]
optimization { execution_accelerators {
  gpu_execution_accelerator: [ {
    name: "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    parameters { key: "trt_engine_cache_enable" value: "1" }
  } ]
} }
"""
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_execution_providers_from_triton_config() -> None:
    pytest.importorskip("onnxruntime")
    from kernelport.backends.onnxruntime import execution_providers

    chosen, missing = execution_providers(spec(ADD_SUB + GPU_TENSORRT), ALL)
    assert chosen == [
        (
            "TensorrtExecutionProvider",
            {
                "device_id": "1",
                "trt_fp16_enable": "True",
                "trt_max_workspace_size": "1073741824",
                "trt_engine_cache_enable": "1",
            },
        ),
        ("CUDAExecutionProvider", {"device_id": "1"}),
        ("CPUExecutionProvider", {}),
    ]
    assert missing == []

    # The same config where onnxruntime has neither: CPU, and both named as missing.
    chosen, missing = execution_providers(spec(ADD_SUB + GPU_TENSORRT), ["CPUExecutionProvider"])
    assert chosen == [("CPUExecutionProvider", {})]
    assert missing == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]

    # KIND_CPU ignores GPU accelerators; CPU accelerators map to their providers.
    cpu_kind = ADD_SUB + """
instance_group [ { kind: KIND_CPU } ]
optimization { execution_accelerators {
  gpu_execution_accelerator: [ { name: "tensorrt" } ]
  cpu_execution_accelerator: [ { name: "openvino" parameters { key: "device_type" value: "CPU" } } ]
} }
"""
    chosen, missing = execution_providers(spec(cpu_kind), [*ALL, "OpenVINOExecutionProvider"])
    assert chosen == [("OpenVINOExecutionProvider", {"device_type": "CPU"}), ("CPUExecutionProvider", {})]
    assert missing == []
    chosen, missing = execution_providers(spec(cpu_kind), ALL)
    assert chosen == [("CPUExecutionProvider", {})] and missing == ["OpenVINOExecutionProvider"]

    # No instance kind, no accelerators: CUDA when this onnxruntime has it, CPU otherwise, nothing missing.
    assert execution_providers(spec(ADD_SUB), ALL) == (
        [("CUDAExecutionProvider", {"device_id": "0"}), ("CPUExecutionProvider", {})],
        [],
    )
    assert execution_providers(spec(ADD_SUB), ["CPUExecutionProvider"]) == ([("CPUExecutionProvider", {})], [])
    kind_cpu = ADD_SUB + "instance_group [ { kind: KIND_CPU } ]"
    assert execution_providers(spec(kind_cpu), ALL) == ([("CPUExecutionProvider", {})], [])


def test_execution_provider_config_errors() -> None:
    pytest.importorskip("onnxruntime")
    from kernelport.backends.onnxruntime import execution_providers

    unknown = ADD_SUB + 'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tvm" } ] } }'
    with pytest.raises(ConfigError, match="model 'm': gpu_execution_accelerator 'tvm' is not known"):
        execution_providers(spec(unknown), ALL)
    bad = ADD_SUB + GPU_TENSORRT.replace('"FP16"', '"FP8"')
    with pytest.raises(ConfigError, match="model 'm' tensorrt accelerator parameter 'precision_mode'.*got 'FP8'"):
        execution_providers(spec(bad), ALL)
    typo = ADD_SUB + GPU_TENSORRT.replace('"max_workspace_size_bytes"', '"max_workspace"')
    with pytest.raises(ConfigError, match="parameter 'max_workspace': unknown"):
        execution_providers(spec(typo), ALL)


def test_unavailable_provider_is_one_warning_and_the_model_runs_on_cpu(
    example_repo: str, caplog: pytest.LogCaptureFixture
) -> None:
    ort = pytest.importorskip("onnxruntime")
    from kernelport.backends.onnxruntime import OnnxRuntimeBackend

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available or "TensorrtExecutionProvider" in available:
        pytest.skip("this onnxruntime has GPU providers; the GPU test below covers it")
    backend = load_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    with caplog.at_level(logging.WARNING, logger="kernelport.backends.onnxruntime"):
        backend.load(os.path.join(example_repo, "add_sub", "1"), spec(ADD_SUB + GPU_TENSORRT, name="add_sub"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "model 'add_sub': execution provider(s) TensorrtExecutionProvider, CUDAExecutionProvider requested by "
        "the config are not available in this onnxruntime; running on CPUExecutionProvider"
    ]
    assert backend.providers() == ["CPUExecutionProvider"]
    assert backend.device() == "cpu"
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    out0, out1 = np.zeros((2, 16), np.float32), np.zeros((2, 16), np.float32)
    backend.bind({"INPUT0": a, "INPUT1": b}, {"OUTPUT0": out0, "OUTPUT1": out1})()
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


@pytest.mark.gpu
def test_cuda_execution_provider_on_a_gpu(example_repo: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not _has_gpu():
        pytest.skip("needs onnxruntime-gpu with CUDAExecutionProvider and a CUDA GPU")
    backend = load_backend("onnxruntime")
    config = ADD_SUB + "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]"
    backend.load(os.path.join(example_repo, "add_sub", "1"), spec(config, name="add_sub"))
    assert backend.providers()[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
    assert backend.device() == "cuda:0"
    a = np.arange(48, dtype=np.float32).reshape(3, 16)
    b = np.full((3, 16), 2.0, np.float32)
    out0, out1 = np.zeros((3, 16), np.float32), np.zeros((3, 16), np.float32)
    backend.bind({"INPUT0": a, "INPUT1": b}, {"OUTPUT0": out0, "OUTPUT1": out1})()
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


def test_plan_file_kind_is_known_to_the_repository(tmp_path: Path) -> None:
    from kernelport.repository import load_model

    version = tmp_path / "engine" / "1"
    version.mkdir(parents=True)
    (version / "model.plan").write_bytes(b"\x00")
    entry = load_model(tmp_path, "engine")
    assert entry.platform == "tensorrt"
    assert os.path.basename(entry.model_file()) == "model.plan"
