"""One network, four runtimes, served side by side.

A small network built in torch (Linear 16->32, ReLU, Linear 32->8) is exported to ONNX, TorchScript and a
torch.export program (.pt2), and rebuilt with the same weights as a TensorFlow SavedModel. A real server
serves the four models from one repository, each in its own worker process; the same inputs through the
local client give the same outputs, within float tolerance, as a numpy reference in float64. Each worker is
checked to be its own process with only its own framework mapped.
"""

from __future__ import annotations

import re
import threading
import warnings
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

torch = pytest.importorskip("torch", reason="the conformance test needs torch (pip install 'kernelport[torch]')")
tf = pytest.importorskip(
    "tensorflow", reason="the conformance test needs tensorflow (pip install 'kernelport[tensorflow]')"
)
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install 'kernelport[torch]')")
pytest.importorskip("onnxruntime", reason="the conformance test needs onnxruntime (pip install 'kernelport[onnx]')")

from conftest import ServerProcess, child_pids  # noqa: E402
from kernelport import Client  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# model -> (framework, input name, output name). Only the ONNX and TorchScript configs name the tensors;
# the torch.export and TensorFlow configs are completed from the models (forward()'s argument name and
# Triton's OUTPUT__0 for the program; the signature's keys for the SavedModel).
MODELS: dict[str, tuple[str, str, str]] = {
    "mlp_onnx": ("onnxruntime", "x", "y"),
    "mlp_torchscript": ("torch", "INPUT__0", "OUTPUT__0"),
    "mlp_export": ("torch", "x", "OUTPUT__0"),
    "mlp_tensorflow": ("tensorflow", "x", "y"),
}
BATCHING = "dynamic_batching { max_queue_delay_microseconds: 200 }\n"
CONFIGS = {
    "mlp_onnx": """platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 8 ] } ]
""",
    "mlp_torchscript": """platform: "pytorch_libtorch"
max_batch_size: 16
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 8 ] } ]
""",
    "mlp_export": 'backend: "pytorch"\nmax_batch_size: 16\n',
    "mlp_tensorflow": 'platform: "tensorflow_savedmodel"\nmax_batch_size: 16\n',
}
# What /proc/<pid>/maps shows once a framework's native library is loaded.
FRAMEWORK_LIBRARIES = {
    "torch": re.compile(r"/libtorch_cpu\.so"),
    "tensorflow": re.compile(r"/libtensorflow_framework\.so"),
    "onnxruntime": re.compile(r"/onnxruntime_pybind11_state[^/]*\.so"),
}


@dataclass(frozen=True)
class Repository:
    path: str
    weights: dict[str, np.ndarray]

    def reference(self, x: np.ndarray) -> np.ndarray:
        w = {k: v.astype(np.float64) for k, v in self.weights.items()}
        hidden = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)
        return hidden @ w["w2"].T + w["b2"]


def _version_dir(root: Path, model: str) -> Path:
    (root / model).mkdir()
    (root / model / "config.pbtxt").write_text(f'name: "{model}"\n' + CONFIGS[model] + BATCHING)
    version = root / model / "1"
    version.mkdir()
    return version


def _torch_models(root: Path, weights: dict[str, np.ndarray]) -> None:
    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(16, 32)
            self.l2 = torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.relu(self.l1(x)))

    net = MLP().eval()
    with torch.no_grad():
        for layer, w, b in ((net.l1, "w1", "b1"), (net.l2, "w2", "b2")):
            layer.weight.copy_(torch.from_numpy(weights[w]))
            layer.bias.copy_(torch.from_numpy(weights[b]))
    example = torch.zeros(4, 16)
    batch = {"x": {0: torch.export.Dim("batch", max=64)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation; the exporter's notes
        torch.jit.trace(net, (example,)).save(str(_version_dir(root, "mlp_torchscript") / "model.pt"))
        program = torch.export.export(net, (example,), dynamic_shapes=batch)
        torch.export.save(program, str(_version_dir(root, "mlp_export") / "model.pt2"))
        torch.onnx.export(
            net,
            (example,),
            str(_version_dir(root, "mlp_onnx") / "model.onnx"),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=batch,
            external_data=False,
            verbose=False,
        )


def _tensorflow_model(root: Path, weights: dict[str, np.ndarray]) -> None:
    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            # torch's Linear computes x @ W.T + b: the same weights, transposed once here.
            self.w1 = tf.Variable(weights["w1"].T.copy())
            self.b1 = tf.Variable(weights["b1"])
            self.w2 = tf.Variable(weights["w2"].T.copy())
            self.b2 = tf.Variable(weights["b2"])

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            hidden = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
            return {"y": tf.matmul(hidden, self.w2) + self.b2}

    net = MLP()
    path = _version_dir(root, "mlp_tensorflow") / "model.savedmodel"
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.serve})


# The four models, built once per session (only this module uses them).
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    rng = np.random.default_rng(11)
    weights = {
        "w1": (rng.standard_normal((32, 16)) / 4).astype(np.float32),
        "b1": (rng.standard_normal(32) / 4).astype(np.float32),
        "w2": (rng.standard_normal((8, 32)) / 4).astype(np.float32),
        "b2": (rng.standard_normal(8) / 4).astype(np.float32),
    }
    root = tmp_path_factory.mktemp("conformance_repository")
    _torch_models(root, weights)
    _tensorflow_model(root, weights)
    return Repository(str(root), weights)


@pytest.fixture(scope="module")
def server(repository: Repository, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    sock = str(tmp_path_factory.mktemp("conformance_sock") / "kp.sock")
    srv = ServerProcess(repository.path, sock)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()


def test_same_inputs_give_the_same_outputs(server: ServerProcess, repository: Repository) -> None:
    rng = np.random.default_rng(5)
    with Client(server.socket_path) as client:
        for n in (1, 3, 16):
            x = rng.standard_normal((n, 16)).astype(np.float32)
            reference = repository.reference(x)
            results = {}
            for model, (_, input_name, output_name) in MODELS.items():
                out = client.infer(model, {input_name: x})
                assert list(out) == [output_name]
                results[model] = out[output_name]
                assert results[model].shape == (n, 8) and results[model].dtype == np.float32
                # atol covers outputs near zero, where float32 accumulation error is not relative
                np.testing.assert_allclose(results[model], reference, rtol=1e-4, atol=1e-5, err_msg=model)
            assert 0.2 < float(reference.std()) < 5.0  # the weights keep outputs O(1): the check has teeth
            first = results["mlp_onnx"]
            for model, result in results.items():
                np.testing.assert_allclose(result, first, rtol=1e-4, atol=1e-5, err_msg=f"{model} vs mlp_onnx")


def test_configs_completed_from_the_models(server: ServerProcess) -> None:
    with Client(server.socket_path) as client:
        for model, (_, input_name, output_name) in MODELS.items():
            meta = client.model_metadata(model)
            assert meta["max_batch_size"] == 16
            assert [(t["name"], t["datatype"], t["dims"]) for t in meta["inputs"]] == [(input_name, "FP32", [16])]
            assert [(t["name"], t["datatype"], t["dims"]) for t in meta["outputs"]] == [(output_name, "FP32", [8])]
    log = server.log()
    for model, (framework, _, _) in MODELS.items():
        # the startup line says which framework (and version) runs the model, and where
        assert re.search(rf"loaded model '{model}' \(\w+ {framework} [0-9][^ ]* on cpu", log), log


def test_concurrent_requests_from_threads(server: ServerProcess, repository: Repository) -> None:
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(server.socket_path) as client:
            for _ in range(8):
                for model, (_, input_name, output_name) in MODELS.items():
                    n = int(rng.integers(1, 5))
                    x = rng.standard_normal((n, 16)).astype(np.float32)
                    out = client.infer(model, {input_name: x}, timeout=60)[output_name]
                    if not np.allclose(out, repository.reference(x), rtol=1e-4, atol=1e-5):
                        errors.append(f"{model} seed {seed}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def _frameworks_mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return {name for name, pattern in FRAMEWORK_LIBRARIES.items() if pattern.search(maps)}


def test_each_model_runs_in_its_own_process_with_only_its_framework(server: ServerProcess) -> None:
    with Client(server.socket_path) as client:
        for model, (_, input_name, _) in MODELS.items():
            client.infer(model, {input_name: np.zeros((1, 16), np.float32)})  # every worker has run a batch
    assert _frameworks_mapped(server.pid) == set()  # the server process never loads a framework
    workers = {pid: _frameworks_mapped(pid) for pid in child_pids(server.pid)}
    workers = {pid: mapped for pid, mapped in workers.items() if mapped}  # e.g. multiprocessing's helpers
    assert len(workers) == len(MODELS), workers  # one process per model instance
    for pid, mapped in workers.items():
        assert len(mapped) == 1, f"worker {pid} has {sorted(mapped)} mapped"
    expected = sorted(framework for framework, _, _ in MODELS.values())
    assert sorted(next(iter(mapped)) for mapped in workers.values()) == expected
