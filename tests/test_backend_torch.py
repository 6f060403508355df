"""The PyTorch backend on tiny real models: TorchScript (model.pt) and torch.export programs (model.pt2).

Results are checked against numpy in float64 with the same weights; inputs are shown to reach the model
without a copy (the tensor the runner feeds is the input array's own memory).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the pytorch backend tests need torch (pip install 'kernelport[torch]')")

from kernelport.backends import TensorSig, load_backend  # noqa: E402
from kernelport.backends.torch import TorchBackend  # noqa: E402
from kernelport.errors import ConfigError  # noqa: E402
from kernelport.repository import ModelSpec, complete_config, load_model, parse_config  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class MLP(torch.nn.Module):
    """Linear 16->32, ReLU, Linear 32->8."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.l1.weight.copy_(torch.from_numpy(weights["w1"]))
            self.l1.bias.copy_(torch.from_numpy(weights["b1"]))
            self.l2.weight.copy_(torch.from_numpy(weights["w2"]))
            self.l2.bias.copy_(torch.from_numpy(weights["b2"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


class AddSub(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


class AddSubDict(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": a + b, "diff": a - b}


@dataclass(frozen=True)
class Models:
    weights: dict[str, np.ndarray]
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def reference(self, x: np.ndarray) -> np.ndarray:
        w = {k: v.astype(np.float64) for k, v in self.weights.items()}
        hidden = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)
        return hidden @ w["w2"].T + w["b2"]


# Every model file the tests load, built once for this module (torch.export takes a second or two each).
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    rng = np.random.default_rng(0)
    weights = {
        "w1": (rng.standard_normal((32, 16)) / 4).astype(np.float32),
        "b1": (rng.standard_normal(32) / 4).astype(np.float32),
        "w2": (rng.standard_normal((8, 32)) / 4).astype(np.float32),
        "b2": (rng.standard_normal(8) / 4).astype(np.float32),
    }
    out = tmp_path_factory.mktemp("torch_models")
    net = MLP(weights).eval()
    example = torch.zeros(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        torch.jit.trace(net, (example,)).save(str(out / "mlp.pt"))
        pair = (torch.zeros(2, 4), torch.zeros(2, 4))
        torch.jit.trace(AddSub(), pair).save(str(out / "add_sub.pt"))
        torch.jit.trace(AddSubDict(), pair, strict=False).save(str(out / "add_sub_dict.pt"))
    batch = torch.export.Dim("batch", max=64)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}}), str(out / "mlp.pt2"))
    small = torch.export.Dim("batch", max=8)
    torch.export.save(
        torch.export.export(net, (example,), dynamic_shapes={"x": {0: small}}), str(out / "mlp_upto8.pt2")
    )
    torch.export.save(torch.export.export(net, (example,)), str(out / "mlp_static4.pt2"))
    both = {"a": {0: torch.export.Dim("n")}, "b": {0: torch.export.Dim("n")}}
    torch.export.save(torch.export.export(AddSubDict(), pair, dynamic_shapes=both), str(out / "add_sub_dict.pt2"))
    return Models(weights, out)


def spec(text: str, name: str = "m") -> ModelSpec:
    return ModelSpec.from_proto(parse_config(f'name: "{name}"\n{text}', model_name=name))


MLP_CONFIG = """
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
"""
TRITON_NAMES = MLP_CONFIG.replace('"x"', '"INPUT__0"')


def load(path: str, model_spec: ModelSpec) -> TorchBackend:
    backend = load_backend("pytorch")
    assert isinstance(backend, TorchBackend)
    backend.load(path, model_spec)
    return backend


def run_slot(backend: TorchBackend, models: Models, input_name: str, output_name: str) -> None:
    """Bind views of the first n rows of one 16-row "slot", as the worker does, for n = 1, 3, 16."""
    rng = np.random.default_rng(7)
    slot_in = rng.standard_normal((16, 16)).astype(np.float32)
    runs: dict[int, tuple[Callable[[], None], np.ndarray]] = {}
    for n in (1, 3, 16):
        slot_out = np.full((16, 8), np.nan, np.float32)
        runner = backend.bind({input_name: slot_in[:n]}, {output_name: slot_out[:n]})
        fed = backend.bound_inputs(runner)[input_name]
        # zero-copy: the tensor the model gets is the input rows' own memory
        assert fed.data_ptr() == slot_in.ctypes.data
        assert tuple(fed.shape) == (n, 16)
        runs[n] = (runner, slot_out)
    for n, (runner, slot_out) in runs.items():
        assert np.isnan(slot_out).all()  # bind wrote nothing into the caller's arrays
        runner()
        np.testing.assert_allclose(slot_out[:n], models.reference(slot_in[:n]), rtol=1e-5, atol=1e-5)
        assert np.isnan(slot_out[n:]).all()  # rows beyond the batch untouched
    # The runner reads the rows' current contents on every call, not a snapshot taken by bind.
    runner, slot_out = runs[3]
    slot_in[:3] = rng.standard_normal((3, 16)).astype(np.float32)
    runner()
    np.testing.assert_allclose(slot_out[:3], models.reference(slot_in[:3]), rtol=1e-5, atol=1e-5)


# -- registry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["pytorch", "pytorch_libtorch", "torch"])
def test_load_backend_gives_the_torch_backend(platform: str) -> None:
    backend = load_backend(platform)
    assert isinstance(backend, TorchBackend)
    assert backend.framework_version() == f"torch {torch.__version__}"
    assert backend.device() == "cpu"


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelport.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.delitem(sys.modules, "kernelport.backends.torch")
    with pytest.raises(BackendUnavailableError, match="'torch' package.*pip install 'kernelport\\[torch\\]'"):
        load_backend("pytorch")


# -- TorchScript --------------------------------------------------------------------------------------------


def test_torchscript_by_forward_argument_names(models: Models) -> None:
    backend = load(models.path("mlp.pt"), spec(MLP_CONFIG))
    assert backend.artifact_kind == "torchscript"
    assert backend.io_signature() == (
        [TensorSig("x", "FP32", (-1, 16))],
        [TensorSig("OUTPUT__0", "FP32", (-1, 8))],
    )
    assert backend.max_batch_size == 16
    run_slot(backend, models, "x", "OUTPUT__0")


def test_torchscript_by_triton_index_names(models: Models) -> None:
    backend = load(models.path("mlp.pt"), spec(TRITON_NAMES))
    run_slot(backend, models, "INPUT__0", "OUTPUT__0")


def test_torchscript_tuple_outputs_by_index_and_dict_outputs_by_key(models: Models) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    # OUTPUT__1 listed first: the index in the name, not the config order, says which output it is.
    indexed = spec("""
max_batch_size: 8
input [ { name: "b" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "a" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
""")
    backend = load(models.path("add_sub.pt"), indexed)
    assert [t.name for t in backend.io_signature()[0]] == ["a", "b"]  # forward()'s order
    out0, out1 = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)
    backend.bind({"a": a, "b": b}, {"OUTPUT__0": out0, "OUTPUT__1": out1})()
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)

    keyed = spec("""
max_batch_size: 8
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "diff" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "sum" data_type: TYPE_FP32 dims: [ 4 ] } ]
""")
    backend = load(models.path("add_sub_dict.pt"), keyed)
    diff, total = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)
    backend.bind({"a": a, "b": b}, {"diff": diff, "sum": total})()
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)


def test_torchscript_requires_its_signature_in_the_config(models: Models) -> None:
    with pytest.raises(ConfigError, match="model 'm': a TorchScript model .* config.pbtxt must list every input"):
        load(models.path("mlp.pt"), spec("max_batch_size: 16"))
    bad = MLP_CONFIG.replace('"x"', '"image"')
    with pytest.raises(ConfigError, match="model 'm' input 'image': not an argument of forward\\(\\) \\(it has x\\)"):
        load(models.path("mlp.pt"), spec(bad))
    only_b = """
max_batch_size: 8
input [ { name: "b" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
    with pytest.raises(ConfigError, match="forward\\(\\) argument\\(s\\) a have no input in the config"):
        load(models.path("add_sub.pt"), spec(only_b))
    three = MLP_CONFIG.replace('"OUTPUT__0"', '"OUTPUT__3"')
    with pytest.raises(ConfigError, match="output 'OUTPUT__3': the model has 1 output"):
        load(models.path("mlp.pt"), spec(three))


def test_output_array_that_does_not_fit_is_refused_at_bind(models: Models) -> None:
    wrong = MLP_CONFIG.replace("dims: [ 8 ]", "dims: [ 9 ]")
    backend = load(models.path("mlp.pt"), spec(wrong))
    x = np.zeros((2, 16), np.float32)
    with pytest.raises(
        ValueError, match="output 'OUTPUT__0': the output array is FP32 \\[2,9\\], the model returned FP32 \\[2,8\\]"
    ):
        backend.bind({"x": x}, {"OUTPUT__0": np.zeros((2, 9), np.float32)})
    backend = load(models.path("mlp.pt"), spec(MLP_CONFIG))
    with pytest.raises(ValueError, match="input 'x': expected FP32 \\[-1,16\\], got FP64 \\[2,16\\]"):
        backend.bind({"x": x.astype(np.float64)}, {"OUTPUT__0": np.zeros((2, 8), np.float32)})
    with pytest.raises(ValueError, match="batch size 17 is outside 1..16"):
        backend.bind({"x": np.zeros((17, 16), np.float32)}, {"OUTPUT__0": np.zeros((17, 8), np.float32)})
    shared = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="overlaps input 'x'"):
        backend.bind({"x": shared.reshape(2, 16)}, {"OUTPUT__0": shared[:16].reshape(2, 8)})


# -- torch.export programs (.pt2) ------------------------------------------------------------------------------


def test_exported_program_signature_completes_the_config(models: Models) -> None:
    bare = spec("max_batch_size: 16")
    backend = load(models.path("mlp.pt2"), bare)
    assert backend.artifact_kind == "exported_program"
    inputs, outputs = backend.io_signature()
    assert inputs == [TensorSig("x", "FP32", (-1, 16))]  # forward()'s argument name
    assert outputs == [TensorSig("OUTPUT__0", "FP32", (-1, 8))]  # Triton's naming
    completed = complete_config(bare.proto, inputs, outputs, can_batch=True, model_name="m")
    full = ModelSpec.from_proto(completed)
    assert [(t.name, t.datatype, t.dims) for t in full.inputs] == [("x", "FP32", (16,))]
    assert [(t.name, t.datatype, t.dims) for t in full.outputs] == [("OUTPUT__0", "FP32", (8,))]
    run_slot(backend, models, "x", "OUTPUT__0")

    # With a config that names things its own way (Triton's index names), those names are served.
    named = load(models.path("mlp.pt2"), spec(TRITON_NAMES.replace("OUTPUT__0", "scores")))
    assert [t.name for t in named.io_signature()[0]] == ["INPUT__0"]
    assert [t.name for t in named.io_signature()[1]] == ["scores"]
    run_slot(named, models, "INPUT__0", "scores")


def test_exported_program_fast_path_matches_ep_module(models: Models) -> None:
    program = torch.export.load(models.path("mlp.pt2"))
    backend = load(models.path("mlp.pt2"), spec("max_batch_size: 16"))
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    out = np.zeros((5, 8), np.float32)
    backend.bind({"x": x}, {"OUTPUT__0": out})()
    with torch.inference_mode():
        expected = program.module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_exported_program_dict_outputs_keep_their_keys(models: Models) -> None:
    backend = load(models.path("add_sub_dict.pt2"), spec("max_batch_size: 8"))
    inputs, outputs = backend.io_signature()
    assert [t.name for t in inputs] == ["a", "b"]
    assert sorted(t.name for t in outputs) == ["diff", "sum"]
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    diff, total = np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32)
    backend.bind({"a": a, "b": b}, {"sum": total, "diff": diff})()
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)
    assert backend.output_shapes({"a": (3, 4), "b": (3, 4)}) == {"sum": (3, 4), "diff": (3, 4)}


def test_exported_program_batch_errors_name_the_model(models: Models) -> None:
    with pytest.raises(ConfigError, match="model 'm' input 'x': max_batch_size 16 needs a variable first dimension, "
                                          "the exported program has \\[4,16\\]"):
        load(models.path("mlp_static4.pt2"), spec("max_batch_size: 16"))
    with pytest.raises(ConfigError, match="model 'm' input 'x': the exported program takes batch sizes up to 8, "
                                          "below max_batch_size 16"):
        load(models.path("mlp_upto8.pt2"), spec("max_batch_size: 16"))
    static = load(models.path("mlp_static4.pt2"), spec("max_batch_size: 0"))
    assert static.io_signature()[0] == [TensorSig("x", "FP32", (4, 16))]


def test_pt2_found_by_the_repository_without_a_config_file_name(models: Models, tmp_path: Path) -> None:
    version = tmp_path / "repo" / "mlp" / "1"
    version.mkdir(parents=True)
    (version / "model.pt2").write_bytes(Path(models.path("mlp.pt2")).read_bytes())
    (tmp_path / "repo" / "mlp" / "config.pbtxt").write_text("max_batch_size: 16\n")
    entry = load_model(tmp_path / "repo", "mlp")
    assert entry.platform == "pytorch"
    assert os.path.basename(entry.model_file()) == "model.pt2"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="model 'm': torch cannot load model.pt"):
        load(str(path), spec(MLP_CONFIG))


# -- process settings -----------------------------------------------------------------------------------------


def test_threads_from_parameters(models: Models) -> None:
    before = torch.get_num_threads()
    try:
        load(models.path("mlp.pt"), spec(MLP_CONFIG))
        assert torch.get_num_threads() == 1  # the default: one intra-op thread
        with_two = MLP_CONFIG + 'parameters { key: "intra_op_thread_count" value { string_value: "2" } }\n'
        load(models.path("mlp.pt"), spec(with_two))
        assert torch.get_num_threads() == 2
        bad = MLP_CONFIG + 'parameters { key: "intra_op_thread_count" value { string_value: "two" } }\n'
        with pytest.raises(ConfigError, match="model 'm' parameter 'intra_op_thread_count'.*got 'two'"):
            load(models.path("mlp.pt"), spec(bad))
    finally:
        torch.set_num_threads(before)


def test_runner_runs_in_inference_mode(models: Models) -> None:
    backend = load(models.path("mlp.pt"), spec(MLP_CONFIG))
    seen: list[bool] = []
    original = backend._require_loaded().call

    def spy(*args: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_inference_mode_enabled())
        return original(*args)

    backend._require_loaded().call = spy
    runner = backend.bind({"x": np.zeros((1, 16), np.float32)}, {"OUTPUT__0": np.zeros((1, 8), np.float32)})
    seen.clear()
    runner()
    assert seen == [True]
    assert not torch.is_inference_mode_enabled()  # entered per call, not left on in the caller's thread


# -- AOTInductor (compiles C++: opt-in) ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("KERNELPORT_SLOW_TESTS"),
    reason="compiles an AOTInductor package with the C++ toolchain (15-30 s); set KERNELPORT_SLOW_TESTS=1",
)
def test_aotinductor_package(models: Models, tmp_path: Path) -> None:
    import torch._inductor

    program = torch.export.load(models.path("mlp.pt2"))
    package = torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(tmp_path / "model.pt2"),
        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0", "aot_inductor.debug_compile": True},
    )
    with pytest.raises(ConfigError, match="an AOTInductor package .* must list every input"):
        load(package, spec("max_batch_size: 16"))
    backend = load(package, spec(TRITON_NAMES))
    assert backend.artifact_kind == "aoti"
    run_slot(backend, models, "INPUT__0", "OUTPUT__0")


def test_exported_program_partial_config_is_completed(models: Models) -> None:
    # The config names one input its own way; the other keeps the program's name.
    partial = spec('max_batch_size: 8\ninput [ { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] } ]')
    backend = load(models.path("add_sub_dict.pt2"), partial)
    assert [t.name for t in backend.io_signature()[0]] == ["a", "INPUT__1"]
    a = np.full((1, 4), 3.0, np.float32)
    b = np.ones((1, 4), np.float32)
    total = np.zeros((1, 4), np.float32)
    backend.bind({"a": a, "INPUT__1": b}, {"sum": total})()
    np.testing.assert_array_equal(total, a + b)
