"""The TensorFlow backend on a tiny real SavedModel: signatures, config completion, results against numpy,
and input rows fed to TensorFlow without a copy (a TF tensor over the row memory, by DLPack)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

try:
    # grpc_tools' protoc extension must be loaded before TensorFlow: loaded after it, it binds to the protobuf
    # symbols TensorFlow's libraries carry and crashes the process (test_repository runs protoc in-process).
    import grpc_tools.protoc  # noqa: F401
except ImportError:
    pass

tf = pytest.importorskip(
    "tensorflow", reason="the tensorflow backend tests need tensorflow (pip install 'kernelport[tensorflow]')"
)

from kernelport.backends import TensorSig, load_backend  # noqa: E402
from kernelport.backends.tensorflow import TensorFlowBackend  # noqa: E402
from kernelport.errors import BackendUnavailableError, ConfigError  # noqa: E402
from kernelport.repository import ModelSpec, complete_config, parse_config  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class SavedModel:
    path: str
    weights: dict[str, np.ndarray]

    def reference(self, x: np.ndarray) -> np.ndarray:
        w = {k: v.astype(np.float64) for k, v in self.weights.items()}
        hidden = np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0.0)
        return hidden @ w["w2"] + w["b2"]


# One SavedModel with three signatures, built once for this module.
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    rng = np.random.default_rng(1)
    weights = {
        "w1": (rng.standard_normal((16, 32)) / 4).astype(np.float32),
        "b1": (rng.standard_normal(32) / 4).astype(np.float32),
        "w2": (rng.standard_normal((32, 8)) / 4).astype(np.float32),
        "b2": (rng.standard_normal(8) / 4).astype(np.float32),
    }

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = {k: tf.Variable(v) for k, v in weights.items()}

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            hidden = tf.nn.relu(tf.matmul(x, self.w["w1"]) + self.w["b1"])
            return {"y": tf.matmul(hidden, self.w["w2"]) + self.w["b2"]}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4], tf.float32, name="a"),
                tf.TensorSpec([None, 4], tf.float32, name="b"),
            ]
        )
        def add_sub(self, a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"sum": a + b, "diff": a - b}

        @tf.function(input_signature=[tf.TensorSpec([4, 16], tf.float32, name="x")])
        def fixed(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": x * 2.0}

    net = Net()
    path = str(tmp_path_factory.mktemp("tf_models") / "model.savedmodel")
    tf.saved_model.save(
        net, path, signatures={"serving_default": net.serve, "add_sub": net.add_sub, "fixed": net.fixed}
    )
    return SavedModel(path, weights)


def spec(text: str, name: str = "m") -> ModelSpec:
    return ModelSpec.from_proto(parse_config(f'name: "{name}"\n{text}', model_name=name))


def signature_parameter(name: str) -> str:
    return f'parameters {{ key: "TF_SIGNATURE_DEF" value {{ string_value: "{name}" }} }}\n'


def load(path: str, model_spec: ModelSpec) -> TensorFlowBackend:
    backend = load_backend("tensorflow")
    assert isinstance(backend, TensorFlowBackend)
    backend.load(path, model_spec)
    return backend


def aligned(shape: tuple[int, ...], dtype: type = np.float32, misalign: int = 0) -> np.ndarray:
    """An array at a 64-byte aligned address (as lane row blocks are), or `misalign` bytes past one."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign
    return raw[start : start + nbytes].view(dtype).reshape(shape)


# -- registry ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["tensorflow", "tensorflow_savedmodel"])
def test_load_backend_gives_the_tensorflow_backend(platform: str) -> None:
    backend = load_backend(platform)
    assert isinstance(backend, TensorFlowBackend)
    assert backend.framework_version() == f"tensorflow {tf.__version__}"
    assert backend.device() == "cpu"


def test_missing_tensorflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    monkeypatch.delitem(sys.modules, "kernelport.backends.tensorflow")
    with pytest.raises(
        BackendUnavailableError, match="'tensorflow' package.*pip install 'kernelport\\[tensorflow\\]'"
    ):
        load_backend("tensorflow")


# -- signature and completion --------------------------------------------------------------------------------


def test_signature_completes_the_config(saved_model: SavedModel) -> None:
    bare = spec("max_batch_size: 16")
    backend = load(saved_model.path, bare)
    inputs, outputs = backend.io_signature()
    assert inputs == [TensorSig("x", "FP32", (-1, 16))]
    assert outputs == [TensorSig("y", "FP32", (-1, 8))]
    full = ModelSpec.from_proto(complete_config(bare.proto, inputs, outputs, can_batch=True, model_name="m"))
    assert [(t.name, t.datatype, t.dims) for t in full.inputs] == [("x", "FP32", (16,))]
    assert [(t.name, t.datatype, t.dims) for t in full.outputs] == [("y", "FP32", (8,))]
    # The version directory (holding model.savedmodel/) loads too, as the repository hands it over.
    assert load(os.path.dirname(saved_model.path), bare).io_signature() == (inputs, outputs)


def test_named_signature_from_tf_signature_def(saved_model: SavedModel) -> None:
    backend = load(saved_model.path, spec("max_batch_size: 8\n" + signature_parameter("add_sub")))
    inputs, outputs = backend.io_signature()
    assert sorted(t.name for t in inputs) == ["a", "b"]
    assert sorted(t.name for t in outputs) == ["diff", "sum"]
    a, b = aligned((3, 4)), aligned((3, 4))
    a[:] = np.arange(12, dtype=np.float32).reshape(3, 4)
    b[:] = 0.5
    total, diff = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)
    runner = backend.bind({"a": a, "b": b}, {"sum": total, "diff": diff})
    runner()
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)
    assert sorted(backend.aliased_inputs(runner)) == ["a", "b"]


def test_config_errors_name_the_model_and_tensor(saved_model: SavedModel) -> None:
    with pytest.raises(
        ConfigError,
        match="model 'm' parameter 'TF_SIGNATURE_DEF': the SavedModel has no signature 'nope' "
        "\\(it has add_sub, fixed, serving_default\\)",
    ):
        load(saved_model.path, spec("max_batch_size: 16\n" + signature_parameter("nope")))
    bad_input = 'max_batch_size: 16\ninput [ { name: "image" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    with pytest.raises(ConfigError, match="model 'm' input 'image': not an input of signature 'serving_default'"):
        load(saved_model.path, spec(bad_input))
    with pytest.raises(
        ConfigError, match="model 'm' input 'x': max_batch_size 4 needs a variable first dimension.*\\[4,16\\]"
    ):
        load(saved_model.path, spec("max_batch_size: 4\n" + signature_parameter("fixed")))
    graphdef = Path(saved_model.path).parent / "model.graphdef"
    graphdef.write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="not GraphDef files"):
        load(str(graphdef), spec("max_batch_size: 16"))


# -- the data path -------------------------------------------------------------------------------------------


def test_batches_1_3_16_zero_copy_inputs(saved_model: SavedModel) -> None:
    backend = load(saved_model.path, spec("max_batch_size: 16"))
    rng = np.random.default_rng(7)
    slot_in = aligned((16, 16))
    slot_in[:] = rng.standard_normal((16, 16))
    runs: dict[int, tuple[Callable[[], None], np.ndarray]] = {}
    for n in (1, 3, 16):
        slot_out = np.full((16, 8), np.nan, np.float32)
        runner = backend.bind({"x": slot_in[:n]}, {"y": slot_out[:n]})
        fed = backend.aliased_inputs(runner)["x"]
        # zero-copy: the TF tensor the signature gets is the input rows' own memory
        assert np.asarray(fed).ctypes.data == slot_in.ctypes.data
        assert tuple(fed.shape) == (n, 16)
        assert backend.call_path(runner) == "flat"  # TF 2.21 exposes the flat function, and it agreed
        runs[n] = (runner, slot_out)
    for n, (runner, slot_out) in runs.items():
        assert np.isnan(slot_out).all()
        runner()
        np.testing.assert_allclose(slot_out[:n], saved_model.reference(slot_in[:n]), rtol=1e-4, atol=1e-5)
        assert np.isnan(slot_out[n:]).all()
    # The runner reads the rows' current contents on every call.
    runner, slot_out = runs[3]
    slot_in[:3] = rng.standard_normal((3, 16))
    runner()
    np.testing.assert_allclose(slot_out[:3], saved_model.reference(slot_in[:3]), rtol=1e-4, atol=1e-5)


def test_unaligned_or_read_only_inputs_are_copied_per_run(saved_model: SavedModel) -> None:
    backend = load(saved_model.path, spec("max_batch_size: 16"))
    x = aligned((3, 16), misalign=16)  # TF's CPU kernels need 64-byte alignment
    x[:] = np.random.default_rng(2).standard_normal((3, 16))
    out = np.zeros((3, 8), np.float32)
    runner = backend.bind({"x": x}, {"y": out})
    assert backend.aliased_inputs(runner) == {}
    runner()
    np.testing.assert_allclose(out, saved_model.reference(x), rtol=1e-4, atol=1e-5)
    x[:] = 1.0
    runner()  # still the live contents: the copy is made on every run
    np.testing.assert_allclose(out, saved_model.reference(x), rtol=1e-4, atol=1e-5)

    read_only = aligned((3, 16))
    read_only[:] = 2.0
    read_only.flags.writeable = False
    runner = backend.bind({"x": read_only}, {"y": out})
    assert backend.aliased_inputs(runner) == {}
    runner()
    np.testing.assert_allclose(out, saved_model.reference(read_only), rtol=1e-4, atol=1e-5)


def test_bad_arrays_are_refused_at_bind(saved_model: SavedModel) -> None:
    backend = load(saved_model.path, spec("max_batch_size: 16"))
    x = aligned((2, 16))
    with pytest.raises(ValueError, match="model 'm' output 'y': expected FP32 \\[-1,8\\], got FP32 \\[2,9\\]"):
        backend.bind({"x": x}, {"y": np.zeros((2, 9), np.float32)})
    with pytest.raises(ValueError, match="input 'x': expected FP32 \\[-1,16\\], got FP64 \\[2,16\\]"):
        backend.bind({"x": np.zeros((2, 16))}, {"y": np.zeros((2, 8), np.float32)})
    with pytest.raises(ValueError, match="batch size 17 is outside 1..16"):
        backend.bind({"x": aligned((17, 16))}, {"y": np.zeros((17, 8), np.float32)})
    assert backend.output_shapes({"x": (5, 16)}) == {"y": (5, 8)}


def test_threads_are_set_before_the_model_loads(saved_model: SavedModel) -> None:
    # TensorFlow fixes its thread pools when its runtime starts: check in a fresh process, as a worker is.
    code = (
        "import tensorflow as tf\n"
        "from kernelport.backends import load_backend\n"
        "from kernelport.repository import ModelSpec, parse_config\n"
        f"text = 'name: \"m\"\\nmax_batch_size: 16\\n'\n"
        "text += 'parameters { key: \"intra_op_thread_count\" value { string_value: \"2\" } }\\n'\n"
        "b = load_backend('tensorflow')\n"
        f"b.load({saved_model.path!r}, ModelSpec.from_proto(parse_config(text, model_name='m')))\n"
        "t = tf.config.threading\n"
        "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "1"]  # intra from the parameter, inter at its default of 1
