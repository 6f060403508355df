"""Framework backends: one module per framework, imported only by the worker whose model needs it.

`load_backend("onnxruntime")` imports onnxruntime and nothing else; importing this package imports no
framework at all (the server process never does).
"""

from __future__ import annotations

import importlib

from kernelport.backends.base import Backend, ModelSpecLike, TensorSig
from kernelport.errors import BackendUnavailableError, ConfigError

__all__ = ["PLATFORMS", "Backend", "ModelSpecLike", "TensorSig", "load_backend"]

# Triton's `platform` / `backend` names -> KernelPort's backend names.
_ALIASES: dict[str, str] = {
    "onnxruntime": "onnxruntime",
    "onnxruntime_onnx": "onnxruntime",
    "onnx": "onnxruntime",
    "pytorch": "pytorch",
    "pytorch_libtorch": "pytorch",
    "torch": "pytorch",
    "tensorflow": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    "tensorrt": "tensorrt",
    "tensorrt_plan": "tensorrt",
}

# backend name -> the framework package it imports and the pip extra that installs it.
_FRAMEWORKS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime", "onnx"),
    "pytorch": ("torch", "torch"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "tensorrt": ("tensorrt", "tensorrt"),
}
# backend name -> (module, class), or None while the backend is not written yet.
_IMPLEMENTATIONS: dict[str, tuple[str, str] | None] = {
    "onnxruntime": ("kernelport.backends.onnxruntime", "OnnxRuntimeBackend"),
    "pytorch": ("kernelport.backends.torch", "TorchBackend"),
    "tensorflow": ("kernelport.backends.tensorflow", "TensorFlowBackend"),
    "tensorrt": ("kernelport.backends.tensorrt", "TensorRTBackend"),
}

PLATFORMS: tuple[str, ...] = tuple(_FRAMEWORKS)


def load_backend(platform: str) -> Backend:
    """A new, unloaded backend for `platform` ("onnxruntime", "pytorch", "tensorflow", "tensorrt", or a Triton
    platform name such as "onnxruntime_onnx"), importing that framework only.

    Raises BackendUnavailableError when the framework is not installed (the message names the pip extra) or
    the backend is not implemented yet, ConfigError for a platform KernelPort does not know.
    """
    name = _ALIASES.get(platform.strip().lower())
    if name is None:
        raise ConfigError(f"platform '{platform}': unknown; expected one of {', '.join(PLATFORMS)}")
    framework, extra = _FRAMEWORKS[name]
    implementation = _IMPLEMENTATIONS[name]
    if implementation is None:
        raise BackendUnavailableError(
            f"the {name} backend is not implemented yet (when it is, it will need the '{framework}' package: "
            f"pip install 'kernelport[{extra}]')"
        )
    module_name, class_name = implementation
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Only the framework's own absence is "unavailable"; any other ImportError is a bug to surface.
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] != framework:
            raise
        raise BackendUnavailableError(
            f"the {name} backend needs the '{framework}' package, which is not installed: "
            f"pip install 'kernelport[{extra}]'"
        ) from exc
    backend_class = getattr(module, class_name)
    backend: Backend = backend_class()
    return backend
