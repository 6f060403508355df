"""The ONNX Runtime backend on the example models: results against numpy, outputs written in place."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernelport.backends import TensorSig, load_backend
from kernelport.backends.onnxruntime import OnnxRuntimeBackend, session_options_from_parameters
from kernelport.errors import BackendUnavailableError, ConfigError
from kernelport.examples import EXAMPLE_MODELS, build_example_repository


@dataclass(frozen=True)
class _Tensor:
    name: str


@dataclass(frozen=True)
class _Spec:
    """Stands in for kernelport.repository's ModelSpec: only what a backend reads."""

    name: str
    max_batch_size: int
    inputs: tuple[_Tensor, ...]
    outputs: tuple[_Tensor, ...]
    parameters: dict[str, str] = field(default_factory=dict)


def _spec(
    name: str, max_batch_size: int, inputs: Sequence[str], outputs: Sequence[str], **params: str
) -> _Spec:
    return _Spec(
        name, max_batch_size, tuple(map(_Tensor, inputs)), tuple(map(_Tensor, outputs)), dict(params)
    )


SPECS = {
    "add_sub": _spec("add_sub", 16, ["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"]),
    "add_sub_nobatch": _spec("add_sub_nobatch", 0, ["INPUT0", "INPUT1"], ["OUTPUT0", "OUTPUT1"]),
    "mlp": _spec("mlp", 16, ["INPUT0"], ["OUTPUT0"]),
    "identity_16m": _spec("identity_16m", 1, ["INPUT0"], ["OUTPUT0"]),
}


def _load(repo: str, name: str, **params: str) -> OnnxRuntimeBackend:
    spec = SPECS[name]
    if params:
        spec = _Spec(spec.name, spec.max_batch_size, spec.inputs, spec.outputs, dict(params))
    backend = load_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    backend.load(os.path.join(repo, name, "1"), spec)
    return backend


def _save(tmp_path: object, graph: onnx.GraphProto) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = os.path.join(str(tmp_path), "model.onnx")
    onnx.save(model, path)
    return path


def _fp32(name: str, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


# -- the example repository ----------------------------------------------------------------------------


def test_example_repository_layout(example_repo: str) -> None:
    for name in EXAMPLE_MODELS:
        assert os.path.isfile(os.path.join(example_repo, name, "1", "model.onnx"))
        config = Path(os.path.join(example_repo, name, "config.pbtxt")).read_text()
        assert f'name: "{name}"' in config
        assert 'platform: "onnxruntime_onnx"' in config
        model = onnx.load(os.path.join(example_repo, name, "1", "model.onnx"))
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    add_sub = Path(os.path.join(example_repo, "add_sub", "config.pbtxt")).read_text()
    assert "max_batch_size: 16" in add_sub and "max_queue_delay_microseconds: 0" in add_sub
    mlp = Path(os.path.join(example_repo, "mlp", "config.pbtxt")).read_text()
    assert "preferred_batch_size: [ 16 ]" in mlp and "max_queue_delay_microseconds: 200" in mlp
    nobatch = Path(os.path.join(example_repo, "add_sub_nobatch", "config.pbtxt")).read_text()
    assert "max_batch_size: 0" in nobatch and "dynamic_batching" not in nobatch
    identity = Path(os.path.join(example_repo, "identity_16m", "config.pbtxt")).read_text()
    assert "max_batch_size: 1" in identity and "dims: [ 4194304 ]" in identity
    assert "dynamic_batching" not in identity


def test_example_repository_skips_existing_and_is_deterministic(tmp_path: object, example_repo: str) -> None:
    repo = str(tmp_path)
    names = build_example_repository(repo)
    assert names == ["add_sub", "add_sub_nobatch", "mlp", "identity_16m"]
    mlp_path = os.path.join(repo, "mlp", "1", "model.onnx")
    # Same weights in a second build (default_rng(0)), byte for byte.
    assert (
        Path(mlp_path).read_bytes() == Path(os.path.join(example_repo, "mlp", "1", "model.onnx")).read_bytes()
    )

    with open(mlp_path, "wb") as f:
        f.write(b"marker")
    assert build_example_repository(repo) == names
    assert Path(mlp_path).read_bytes() == b"marker"  # existing model left alone
    build_example_repository(repo, force=True)
    assert onnx.load(mlp_path).graph.name == "mlp"  # rewritten


def test_examples_main_writes_the_repository(tmp_path: object) -> None:
    repo = os.path.join(str(tmp_path), "repo")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "kernelport.examples", repo],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(repo)) == sorted(EXAMPLE_MODELS)


# -- results against numpy, in place -----------------------------------------------------------------


def test_io_signature_and_startup_facts(example_repo: str) -> None:
    backend = _load(example_repo, "add_sub")
    inputs, outputs = backend.io_signature()
    assert inputs == [TensorSig("INPUT0", "FP32", (-1, 16)), TensorSig("INPUT1", "FP32", (-1, 16))]
    assert outputs == [TensorSig("OUTPUT0", "FP32", (-1, 16)), TensorSig("OUTPUT1", "FP32", (-1, 16))]
    assert backend.framework_version() == f"onnxruntime {ort.__version__}"
    assert backend.device() == "cpu"
    assert backend.max_batch_size == 16
    nobatch = _load(example_repo, "add_sub_nobatch")
    assert nobatch.io_signature()[0][0] == TensorSig("INPUT0", "FP32", (16,))


def test_add_sub_batches_1_3_16_separate_bindings_write_in_place(example_repo: str) -> None:
    backend = _load(example_repo, "add_sub")
    rng = np.random.default_rng(7)
    # One "lane slot": 16 rows per tensor; each binding gets views of its first n rows, as the worker does.
    slot_in0 = rng.standard_normal((16, 16)).astype(np.float32)
    slot_in1 = rng.standard_normal((16, 16)).astype(np.float32)
    runs: dict[int, tuple[Callable[[], None], np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for n in (1, 3, 16):
        out0 = np.full((16, 16), np.nan, np.float32)
        out1 = np.full((16, 16), np.nan, np.float32)
        runner = backend.bind(
            {"INPUT0": slot_in0[:n], "INPUT1": slot_in1[:n]}, {"OUTPUT0": out0[:n], "OUTPUT1": out1[:n]}
        )
        assert backend.copied_outputs(runner) == ()  # ORT writes both outputs straight into the rows
        runs[n] = (runner, out0, out1, out0[:n], out1[:n])

    for n, (runner, out0, out1, view0, _view1) in runs.items():
        assert np.isnan(out0).all()  # bind itself wrote nothing into the caller's arrays
        runner()
        # The rows of the slot buffer now hold the results: ORT wrote into the very memory passed.
        np.testing.assert_array_equal(out0[:n], slot_in0[:n] + slot_in1[:n])
        np.testing.assert_array_equal(out1[:n], slot_in0[:n] - slot_in1[:n])
        assert np.shares_memory(view0, out0) and view0.ctypes.data == out0.ctypes.data
        assert np.isnan(out0[n:]).all() and np.isnan(out1[n:]).all()  # rows beyond the batch untouched

    # The runner reads the live input memory on every call, not a snapshot taken by bind.
    runner, out0, out1, _, _ = runs[3]
    slot_in0[:3] = 5.0
    slot_in1[:3] = 2.0
    runner()
    np.testing.assert_array_equal(out0[:3], np.full((3, 16), 7.0, np.float32))
    np.testing.assert_array_equal(out1[:3], np.full((3, 16), 3.0, np.float32))


def test_add_sub_nobatch(example_repo: str) -> None:
    backend = _load(example_repo, "add_sub_nobatch")
    assert backend.max_batch_size == 0
    x = np.arange(16, dtype=np.float32)
    y = np.linspace(-1, 1, 16, dtype=np.float32)
    out0 = np.zeros(16, np.float32)
    out1 = np.zeros(16, np.float32)
    runner = backend.bind({"INPUT0": x, "INPUT1": y}, {"OUTPUT0": out0, "OUTPUT1": out1})
    runner()
    np.testing.assert_array_equal(out0, x + y)
    np.testing.assert_array_equal(out1, x - y)
    with pytest.raises(ValueError, match="expected FP32 \\[16\\], got FP32 \\[1,16\\]"):
        backend.bind({"INPUT0": x[None], "INPUT1": y[None]}, {"OUTPUT0": out0[None], "OUTPUT1": out1[None]})


def test_mlp_matches_numpy_float64(example_repo: str) -> None:
    weights = {
        init.name: numpy_helper.to_array(init).astype(np.float64)
        for init in onnx.load(os.path.join(example_repo, "mlp", "1", "model.onnx")).graph.initializer
    }
    backend = _load(example_repo, "mlp")
    rng = np.random.default_rng(3)
    for n in (1, 3, 16):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        out = np.full((n, 512), np.nan, np.float32)
        runner = backend.bind({"INPUT0": x}, {"OUTPUT0": out})
        runner()
        hidden = np.maximum(x.astype(np.float64) @ weights["W1"] + weights["B1"], 0.0)
        reference = hidden @ weights["W2"] + weights["B2"]
        # atol covers outputs near zero, where float32 accumulation error is not relative
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)
        assert 0.3 < float(reference.std()) < 3.0  # the weights keep outputs O(1)


def test_identity_16m_copies_into_the_bound_output(example_repo: str) -> None:
    backend = _load(example_repo, "identity_16m")
    x = np.random.default_rng(5).standard_normal((1, 4 * 1024 * 1024)).astype(np.float32)
    out = np.zeros_like(x)
    runner = backend.bind({"INPUT0": x}, {"OUTPUT0": out})
    assert backend.copied_outputs(runner) == ()
    runner()
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    with pytest.raises(ValueError, match="batch size 2 is outside 1..1"):
        backend.bind(
            {"INPUT0": np.zeros((2, 4 * 1024 * 1024), np.float32)},
            {"OUTPUT0": np.zeros((2, 4 * 1024 * 1024), np.float32)},
        )


def test_identity_of_an_input_is_bound_to_the_input_itself(tmp_path: object, example_repo: str) -> None:
    # identity_16m's output is an Identity of its input: the backend says so, and bound to the input's own
    # memory the output holds the input's values after every run, ORT writing (nothing) in place
    backend = _load(example_repo, "identity_16m")
    assert backend.passthrough_outputs() == {"OUTPUT0": "INPUT0"}
    assert _load(example_repo, "add_sub").passthrough_outputs() == {}
    assert _load(example_repo, "mlp").passthrough_outputs() == {}
    x = np.random.default_rng(6).standard_normal((1, 4 * 1024 * 1024)).astype(np.float32)
    runner = backend.bind({"INPUT0": x}, {"OUTPUT0": x})
    assert backend.copied_outputs(runner) == ()
    want = x.copy()
    runner()
    np.testing.assert_array_equal(x, want)
    x *= -2
    runner()
    np.testing.assert_array_equal(x, want * -2)
    # a partial overlap is still refused, and so is an output that is not a pass-through on its input
    buf = np.zeros(2 * 4 * 1024 * 1024, np.float32)
    shifted = buf[1 : 1 + 4 * 1024 * 1024].reshape(1, -1)
    with pytest.raises(ValueError, match="overlaps"):
        backend.bind({"INPUT0": buf[: 4 * 1024 * 1024].reshape(1, -1)}, {"OUTPUT0": shifted})
    add_sub = _load(example_repo, "add_sub")
    a, b = np.ones((2, 16), np.float32), np.ones((2, 16), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        add_sub.bind({"INPUT0": a, "INPUT1": b}, {"OUTPUT0": a, "OUTPUT1": np.zeros((2, 16), np.float32)})

    # chains of Identity nodes count; an Identity of a computed value, of an initializer, or one that
    # changes nothing but a name of a graph input used as an output itself, does not
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["i1"]),
            helper.make_node("Identity", ["i1"], ["chained"]),
            helper.make_node("Neg", ["x"], ["neg"]),
            helper.make_node("Identity", ["neg"], ["computed"]),
            helper.make_node("Identity", ["w"], ["weight"]),
        ],
        "chains",
        [_fp32("x", ["n", 4])],
        [_fp32("chained", ["n", 4]), _fp32("computed", ["n", 4]), _fp32("weight", [4])],
        [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")],
    )
    chains = load_backend("onnxruntime")
    assert isinstance(chains, OnnxRuntimeBackend)
    chains.load(_save(tmp_path, graph), _spec("chains", 0, ["x"], ["chained", "computed", "weight"]))
    assert chains.passthrough_outputs() == {"chained": "x"}


def test_pass_through_output_falls_back_to_one_copy(tmp_path: object) -> None:
    # A graph output that is a graph input: ORT hands back the input's own buffer instead of writing the
    # bound output, so the runner must copy it.
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["neg"])],
        "pass",
        [_fp32("x", ["n", 4])],
        [_fp32("x", ["n", 4]), _fp32("neg", ["n", 4])],
    )
    backend = load_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    backend.load(_save(tmp_path, graph), _spec("pass", 4, ["x"], ["x", "neg"]))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out_x = np.zeros((2, 4), np.float32)
    out_neg = np.zeros((2, 4), np.float32)
    runner = backend.bind({"x": x}, {"x": out_x, "neg": out_neg})
    assert backend.copied_outputs(runner) == ("x",)
    runner()
    np.testing.assert_array_equal(out_x, x)
    np.testing.assert_array_equal(out_neg, -x)
    x += 1
    runner()
    np.testing.assert_array_equal(out_x, x)


def test_output_shapes_static_and_by_running(tmp_path: object, example_repo: str) -> None:
    add_sub = _load(example_repo, "add_sub")
    assert add_sub.output_shapes({"INPUT0": (3, 16), "INPUT1": (3, 16)}) == {
        "OUTPUT0": (3, 16),
        "OUTPUT1": (3, 16),
    }

    # Output length depends on the input's: the signature cannot tell, one run on zeros does.
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)],
        "cat",
        [_fp32("x", ["n", "len"])],
        [_fp32("y", ["n", "twice_len"])],
    )
    backend = load_backend("onnxruntime")
    backend.load(_save(tmp_path, graph), _spec("cat", 8, ["x"], ["y"]))
    assert backend.io_signature()[1] == [TensorSig("y", "FP32", (-1, -1))]
    assert backend.output_shapes({"x": (3, 5)}) == {"y": (3, 10)}
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    y = np.zeros((3, 10), np.float32)
    runner = backend.bind({"x": x}, {"y": y})
    runner()
    np.testing.assert_array_equal(y, np.concatenate([x, x], axis=1))
    with pytest.raises(
        ValueError, match="output 'y': expected FP32 \\[3,10\\] for these inputs, got \\[3,5\\]"
    ):
        backend.bind({"x": x}, {"y": np.zeros((3, 5), np.float32)})


# -- validation ------------------------------------------------------------------------------------------


def test_bad_arrays_raise_value_error(example_repo: str) -> None:
    backend = _load(example_repo, "add_sub")
    good = np.zeros((3, 16), np.float32)

    def bind(**arrays: np.ndarray) -> None:
        names = {"INPUT0": good, "INPUT1": good.copy(), "OUTPUT0": good.copy(), "OUTPUT1": good.copy()}
        names.update(arrays)
        backend.bind(
            {k: v for k, v in names.items() if k.startswith("INPUT")},
            {k: v for k, v in names.items() if k.startswith("OUTPUT")},
        )

    with pytest.raises(
        ValueError, match="model 'add_sub' input 'INPUT0': expected FP32 \\[-1,16\\], got FP32 \\[3,15\\]"
    ):
        bind(INPUT0=np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError, match="expected FP32 \\[-1,16\\], got FP64 \\[3,16\\]"):
        bind(INPUT1=np.zeros((3, 16), np.float64))
    with pytest.raises(ValueError, match="got FP32 \\[48\\]"):
        bind(INPUT0=np.zeros(48, np.float32))
    with pytest.raises(ValueError, match="batch size 17 is outside 1..16"):
        bind(**{k: np.zeros((17, 16), np.float32) for k in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")})
    with pytest.raises(ValueError, match="batch size 2 differs"):
        bind(OUTPUT1=np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        bind(INPUT0=np.zeros((3, 32), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        bind(OUTPUT0=np.asfortranarray(np.zeros((3, 16), np.float32)))
    read_only = np.zeros((3, 16), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        bind(OUTPUT0=read_only)
    with pytest.raises(ValueError, match="overlaps input 'INPUT0'"):
        bind(OUTPUT0=good)
    with pytest.raises(ValueError, match="missing input\\(s\\) INPUT1"):
        backend.bind({"INPUT0": good}, {"OUTPUT0": good.copy()})
    with pytest.raises(ValueError, match="unknown output 'OUTPUT9'"):
        backend.bind({"INPUT0": good, "INPUT1": good.copy()}, {"OUTPUT9": good.copy()})
    # An input that is read-only is fine: ORT only reads it.
    backend.bind({"INPUT0": read_only, "INPUT1": good.copy()}, {"OUTPUT0": good.copy()})()


def test_load_checks_the_spec_against_the_model(example_repo: str) -> None:
    path = os.path.join(example_repo, "add_sub", "1")
    with pytest.raises(ConfigError, match="model 'add_sub' input 'INPUTX': not an input of the ONNX model"):
        load_backend("onnxruntime").load(path, _spec("add_sub", 16, ["INPUT0", "INPUTX"], ["OUTPUT0"]))
    # a partial config loads: the server completes it from io_signature() before serving
    partial = load_backend("onnxruntime")
    partial.load(path, _spec("add_sub", 16, ["INPUT0"], ["OUTPUT0"]))
    assert [t.name for t in partial.io_signature()[0]] == ["INPUT0", "INPUT1"]
    with pytest.raises(ConfigError, match="output 'OUT': not an output"):
        load_backend("onnxruntime").load(path, _spec("add_sub", 16, ["INPUT0", "INPUT1"], ["OUT"]))
    nobatch = os.path.join(example_repo, "add_sub_nobatch", "1")
    with pytest.raises(ConfigError, match="max_batch_size 4 needs a variable first dimension.*\\[16\\]"):
        load_backend("onnxruntime").load(nobatch, _spec("x", 4, ["INPUT0", "INPUT1"], ["OUTPUT0"]))


def test_closed_backend_refuses_bind(example_repo: str) -> None:
    backend = _load(example_repo, "add_sub")
    backend.close()
    with pytest.raises(RuntimeError, match="no model loaded"):
        backend.bind({}, {})


# -- session options -----------------------------------------------------------------------------------


def test_session_option_defaults_favour_latency(example_repo: str) -> None:
    options = _load(example_repo, "add_sub").session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern


def test_session_options_from_triton_parameters(example_repo: str) -> None:
    backend = _load(
        example_repo,
        "add_sub",
        intra_op_thread_count="2",
        inter_op_thread_count="3",
        execution_mode="1",
        graph_optimization_level="-1",
        enable_mem_arena="0",
        enable_mem_pattern="false",
        some_other_key="ignored",
    )
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 3
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern

    level = ort.GraphOptimizationLevel
    for value, expected in [
        ("0", level.ORT_ENABLE_ALL),
        ("1", level.ORT_ENABLE_EXTENDED),
        ("2", level.ORT_DISABLE_ALL),
        ("extended", level.ORT_ENABLE_EXTENDED),
    ]:
        parsed = session_options_from_parameters({"graph_optimization_level": value})
        assert parsed.graph_optimization_level == expected
    parsed = session_options_from_parameters({"session.intra_op.allow_spinning": "0"})
    assert parsed.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("intra_op_thread_count", "two"),
        ("inter_op_thread_count", "-3"),
        ("execution_mode", "2"),
        ("graph_optimization_level", "3"),
        ("enable_mem_arena", "maybe"),
    ],
)
def test_bad_session_parameter_names_model_and_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"model 'm' parameter '{key}'.*got '{value}'"):
        session_options_from_parameters({key: value}, "m")


# -- load_backend --------------------------------------------------------------------------------------


def test_load_backend_names_and_aliases() -> None:
    assert isinstance(load_backend("onnxruntime"), OnnxRuntimeBackend)
    assert isinstance(load_backend("onnxruntime_onnx"), OnnxRuntimeBackend)
    with pytest.raises(ConfigError, match="platform 'caffe2'"):
        load_backend("caffe2")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_framework_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="kernelport\\[tensorrt\\]"):
        load_backend("tensorrt")


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.delitem(sys.modules, "kernelport.backends.onnxruntime")
    with pytest.raises(
        BackendUnavailableError, match="'onnxruntime' package.*pip install 'kernelport\\[onnx\\]'"
    ):
        load_backend("onnxruntime")


def test_importing_backends_imports_no_framework() -> None:
    code = (
        "import sys, kernelport.backends; "
        "print(sorted(m for m in ('onnxruntime', 'torch', 'tensorflow', 'tensorrt') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
