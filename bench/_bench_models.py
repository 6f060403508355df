"""The per-backend models of `bench/latency.py`, and each framework's own in-process call on them (the floors).

The network is the conformance test's (tests/test_conformance.py): Linear 16->32, ReLU, Linear 32->8, built
in torch and exported to ONNX, TorchScript and a torch.export program (.pt2), and rebuilt with the same
weights as a TensorFlow SavedModel. Its builder is imported from that test module, not copied, so the bench
measures the models the conformance test checks. One change: the bench serves them with
`max_queue_delay_microseconds: 0` (the test uses 200), as the example `add_sub` is served, because a lone
request would otherwise wait out the batching window and the concurrency-1 rows would measure the window,
not the backend's path.

The models are built in a child process (`python bench/_bench_models.py ROOT`): the benchmark process must
not load torch or TensorFlow before its server has started, and loads them afterwards only for the floors.

A *floor* is a requester (`_bench_clients.Requester`) that calls the framework directly in this process, on
the same model file the server serves, with the worker's thread settings (one intra-op and one inter-op
thread): `FLOORS` maps a model's framework to it. This module imports no framework at module level: spawned
client processes import `latency.py`, which imports this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.join(os.path.dirname(BENCH_DIR), "tests")

# model -> the floor's framework call (a key of FLOORS), from the conformance test's four models
BACKEND_MODELS: dict[str, str] = {
    "mlp_onnx": "onnxruntime",
    "mlp_torchscript": "torchscript",
    "mlp_export": "torch.export",
    "mlp_tensorflow": "tensorflow",
}
BATCHING = "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
WEIGHTS_FILE = "conformance_weights.npz"  # beside the repository, not in it (the repository holds models only)


def conformance_weights() -> dict[str, np.ndarray]:
    """The conformance test's weights (its `repository` fixture, seed 11)."""
    rng = np.random.default_rng(11)
    return {
        "w1": (rng.standard_normal((32, 16)) / 4).astype(np.float32),
        "b1": (rng.standard_normal(32) / 4).astype(np.float32),
        "w2": (rng.standard_normal((8, 32)) / 4).astype(np.float32),
        "b2": (rng.standard_normal(8) / 4).astype(np.float32),
    }


def reference(weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The network in float64 numpy: what every floor's output is checked against."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hidden = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)
    return hidden @ w["w2"].T + w["b2"]


def _build_here(root: str) -> None:
    """Write the four models into `root` (in this process: it imports torch and TensorFlow)."""
    from pathlib import Path

    sys.path.insert(0, TESTS_DIR)
    import test_conformance as conformance  # the builder; imports grpc_tools before TensorFlow, as it must

    conformance.BATCHING = BATCHING  # read by its _version_dir when it writes each config.pbtxt
    weights = conformance_weights()
    os.makedirs(root, exist_ok=True)
    conformance._torch_models(Path(root), weights)
    conformance._tensorflow_model(Path(root), weights)
    np.savez(os.path.join(os.path.dirname(os.path.abspath(root)), WEIGHTS_FILE), **weights)  # type: ignore[arg-type]


def build_backend_models(root: str, timeout_s: float = 600.0) -> None:
    """Build the four models into the repository `root` in a child process (see the module docstring)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), root], capture_output=True, text=True,
                          env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"building the per-backend models failed (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")


def load_weights(root: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(os.path.dirname(os.path.abspath(root)), WEIGHTS_FILE)) as f:
        return {k: f[k] for k in f.files}


# ---- the floors --------------------------------------------------------------------------------------


def _model_file(repository: str, model: str, filename: str) -> str:
    return os.path.join(repository, model, "1", filename)


class TorchScriptFloor:
    """`torch.jit.load(...)(x)` under `torch.inference_mode()` (entered per call, as the worker does), one
    intra-op and one inter-op thread."""

    def __init__(self, repository: str, model: str, inputs: Mapping[str, np.ndarray],
                 info: Mapping[str, Any]) -> None:
        import warnings

        torch = _torch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation
            self.module = torch.jit.load(_model_file(repository, model, "model.pt"), map_location="cpu").eval()
        self.mode = torch.inference_mode
        self.args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()]
        self.output = info["outputs"][0]["name"]
        for _ in range(2):  # the profiling executor specialises on its first runs
            self()

    def __call__(self) -> Any:
        with self.mode():
            return self.module(*self.args)

    def result(self) -> dict[str, np.ndarray] | None:
        return {self.output: self().numpy().copy()}

    def close(self) -> None:
        pass


class ExportedProgramFloor(TorchScriptFloor):
    """The ExportedProgram's `module()(x)` (`torch.export.load`), under `torch.inference_mode()`, one thread."""

    def __init__(self, repository: str, model: str, inputs: Mapping[str, np.ndarray],
                 info: Mapping[str, Any]) -> None:
        torch = _torch()
        self.module = torch.export.load(_model_file(repository, model, "model.pt2")).module()
        self.mode = torch.inference_mode
        self.args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()]
        self.output = info["outputs"][0]["name"]
        for _ in range(2):
            self()


class SavedModelFloor:
    """The SavedModel's `serving_default` signature called with a tensor made once, one intra-op and one
    inter-op thread (TensorFlow fixes them when its runtime starts: the first TF floor of the run sets them)."""

    request_errors: tuple[type[Exception], ...] = ()

    def __init__(self, repository: str, model: str, inputs: Mapping[str, np.ndarray],
                 info: Mapping[str, Any]) -> None:
        tf = _tensorflow()
        loaded = tf.saved_model.load(_model_file(repository, model, "model.savedmodel"))
        self.loaded = loaded  # the signature does not keep its SavedModel's variables alive
        self.signature = loaded.signatures["serving_default"]
        self.feeds = {name: tf.constant(a) for name, a in inputs.items()}
        for _ in range(2):
            self()

    def __call__(self) -> Any:
        return self.signature(**self.feeds)

    def result(self) -> dict[str, np.ndarray] | None:
        return {name: t.numpy().copy() for name, t in self().items()}

    def close(self) -> None:
        pass


def _torch() -> Any:
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # allowed once per process, before parallel work: already set
    return torch


def _tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # the runtime has started (an earlier TF floor of this run): already set
    return tf


# framework -> floor factory (repository, model, inputs, model metadata); ONNX Runtime's is latency.py's own
FLOORS: dict[str, Callable[[str, str, Mapping[str, np.ndarray], Mapping[str, Any]], Any]] = {
    "torchscript": TorchScriptFloor,
    "torch.export": ExportedProgramFloor,
    "tensorflow": SavedModelFloor,
}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} REPOSITORY  (writes the per-backend models into it)")
    _build_here(sys.argv[1])
