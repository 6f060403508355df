"""TensorRT backend: a serialized engine (``model.plan``) run through TensorRT's named-tensor API.

Built against TensorRT 10's Python API (``ICudaEngine.num_io_tensors`` / ``get_tensor_name`` /
``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_shape`` / ``get_tensor_profile_shape``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``get_tensor_shape`` /
``set_optimization_profile_async`` / ``execute_async_v3``). The engine's I/O tensor names are the served
names; a config that leaves inputs or outputs out is completed from the engine (dynamic dims are -1).

Dynamic batch: every optimization profile of the engine is usable. A bound batch runs on the first profile
whose [min, max] shapes hold every input's shape; each profile gets its own execution context, made when a
batch first needs it (switching one context between profiles would cost a synchronisation per switch). With
``max_batch_size > 0`` the profiles must together cover batch sizes 1..max_batch_size.

Memory: the lanes live in host memory, so each run copies the input rows to device buffers and the outputs
back into the output rows, all on the backend's one CUDA stream (the worker's stream), then waits for that
stream: one copy each way. Device buffers are allocated per tensor at the size the largest bound batch
needs and grow (never shrink) when a larger one is bound; runners read the current buffers on every run.
The buffers and the stream come from CuPy (``pip install 'kernelport[gpu]'``) or, when CuPy is absent,
from ``torch.cuda``.

The device is ``cuda:<gpu>`` with the first GPU the config's ``instance_group`` lists (0 when none).

Nothing in this module has run on this project's CI machines (no TensorRT, no GPU there): the tests in
tests/test_backend_tensorrt.py build a small engine and check it where TensorRT and a GPU are present.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorrt as trt

from kernelport.backends.base import (
    Backend,
    ModelSpecLike,
    TensorSig,
    check_batch_dims,
    check_bind_arrays,
    check_config_names,
    check_output_shape,
    format_shape,
    instance_gpu,
    numpy_dtype,
    unservable_type,
)
from kernelport.errors import BackendUnavailableError, ConfigError

__all__ = ["TensorRTBackend"]

log = logging.getLogger(__name__)

# trt.DataType member names -> KServe datatypes (by name: members differ between TensorRT versions).
_DATATYPE_OF_TRT: dict[str, str] = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "BF16": "BF16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
}
_MODEL_FILENAME = "model.plan"


class _CupyDevice:
    """Device buffers, one stream and async copies through CuPy."""

    def __init__(self, device_id: int) -> None:
        import cupy

        self._cupy = cupy
        self._device = cupy.cuda.Device(device_id)
        self._device.use()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_handle = int(self._stream.ptr)
        runtime = cupy.cuda.runtime
        self._memcpy = runtime.memcpyAsync
        self._h2d = runtime.memcpyHostToDevice
        self._d2h = runtime.memcpyDeviceToHost

    def alloc(self, nbytes: int) -> tuple[int, Any]:
        memory = self._cupy.cuda.alloc(max(nbytes, 1))
        return int(memory.ptr), memory

    def to_device(self, dst: int, host: np.ndarray) -> None:
        self._memcpy(dst, host.ctypes.data, host.nbytes, self._h2d, self.stream_handle)

    def to_host(self, host: np.ndarray, src: int) -> None:
        self._memcpy(host.ctypes.data, src, host.nbytes, self._d2h, self.stream_handle)

    def synchronize(self) -> None:
        self._stream.synchronize()


class _TorchDevice:
    """The same through torch.cuda, for hosts with torch but not CuPy."""

    def __init__(self, device_id: int) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda", device_id)
        torch.cuda.set_device(self._device)
        self._stream = torch.cuda.Stream(device=self._device)
        self.stream_handle = int(self._stream.cuda_stream)
        self._buffers: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> tuple[int, Any]:
        buffer = self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, device=self._device)
        ptr = int(buffer.data_ptr())
        self._buffers[ptr] = buffer
        return ptr, buffer

    def to_device(self, dst: int, host: np.ndarray) -> None:
        with self._torch.cuda.stream(self._stream):
            self._buffers[dst][: host.nbytes].copy_(self._bytes(host), non_blocking=True)

    def to_host(self, host: np.ndarray, src: int) -> None:
        with self._torch.cuda.stream(self._stream):
            self._bytes(host).copy_(self._buffers[src][: host.nbytes], non_blocking=True)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def _bytes(self, host: np.ndarray) -> Any:
        return self._torch.from_numpy(host.reshape(-1).view(np.uint8))


def _open_device(device_id: int, model: str) -> Any:
    try:
        return _CupyDevice(device_id)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(
            f"model '{model}': the tensorrt backend needs CuPy (or torch with CUDA) for device buffers: "
            f"pip install 'kernelport[gpu]'"
        ) from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"model '{model}': the tensorrt backend needs a CUDA GPU; none is visible")
    return _TorchDevice(device_id)


class _Profile:
    """One optimization profile: per input, the (min, max) shapes it accepts."""

    def __init__(self, index: int, bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        self.index = index
        self.bounds = bounds

    def holds(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            low, high = self.bounds[name]
            if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True


class TensorRTBackend(Backend):
    """A TensorRT engine on one GPU: host rows copied in and out on the backend's stream."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._runtime: Any = None
        self._device: Any = None
        self._device_index = 0
        self._model = ""
        self._max_batch_size = 0
        self._inputs: list[TensorSig] = []
        self._outputs: list[TensorSig] = []
        self._profiles: list[_Profile] = []
        self._contexts: dict[int, Any] = {}
        self._buffers: dict[str, tuple[int, int, Any]] = {}  # name -> (address, bytes, owner)

    # -- Backend ----------------------------------------------------------------------------------------

    def load(self, model_path: str, spec: ModelSpecLike) -> None:
        path = os.path.join(model_path, _MODEL_FILENAME) if os.path.isdir(model_path) else model_path
        self._model = spec.name
        self._device_index = instance_gpu(spec)
        device = _open_device(self._device_index, spec.name)
        logger = trt.Logger(trt.Logger.WARNING)
        try:
            trt.init_libnvinfer_plugins(logger, "")
        except (AttributeError, RuntimeError):
            pass  # no plugin library: engines without plugins still load
        runtime = trt.Runtime(logger)
        with open(path, "rb") as f:
            plan = f.read()
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise ConfigError(
                f"model '{spec.name}': TensorRT {trt.__version__} cannot deserialize {os.path.basename(path)} "
                f"(built by another TensorRT version or for another GPU?)"
            )

        inputs: list[TensorSig] = []
        outputs: list[TensorSig] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.is_shape_inference_io(name):
                raise ConfigError(f"model '{spec.name}' tensor '{name}': shape tensors are not supported")
            dtype = engine.get_tensor_dtype(name)
            datatype = _DATATYPE_OF_TRT.get(dtype.name)
            if datatype is None:
                raise unservable_type(spec.name, name, dtype.name)
            sig = TensorSig(name=name, datatype=datatype, shape=tuple(int(d) for d in engine.get_tensor_shape(name)))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(sig)

        profiles = []
        for p in range(max(1, engine.num_optimization_profiles)):
            bounds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
            for sig in inputs:
                if -1 in sig.shape:
                    low, _opt, high = engine.get_tensor_profile_shape(sig.name, p)
                    bounds[sig.name] = (tuple(int(d) for d in low), tuple(int(d) for d in high))
                else:
                    bounds[sig.name] = (sig.shape, sig.shape)
            profiles.append(_Profile(p, bounds))
        self._check_spec(spec, inputs, outputs, profiles)

        self._runtime, self._engine, self._device = runtime, engine, device
        self._max_batch_size = int(spec.max_batch_size)
        self._inputs, self._outputs, self._profiles = inputs, outputs, profiles
        self._contexts.clear()
        self._buffers.clear()
        log.debug("model '%s' loaded by tensorrt %s on %s", spec.name, trt.__version__, self.device())

    def io_signature(self) -> tuple[list[TensorSig], list[TensorSig]]:
        self._require_engine()
        return list(self._inputs), list(self._outputs)

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        self._require_engine()
        check_bind_arrays(
            self._model,
            self._max_batch_size,
            self._inputs,
            self._outputs,
            inputs,
            outputs,
            unbindable=("BF16",),
            unbindable_reason="cannot be bound from numpy arrays",
            reject_empty=True,
            require_aligned=False,
            check_overlap=False,
        )
        shapes = {name: tuple(arr.shape) for name, arr in inputs.items()}
        context = self._context_for(shapes)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise ValueError(f"model '{self._model}' input '{name}': TensorRT rejects shape {format_shape(shape)}")
        for name, arr in outputs.items():
            check_output_shape(self._model, name, arr, tuple(int(d) for d in context.get_tensor_shape(name)))
        # Every output the engine has needs an address, even one the caller did not ask for.
        scratch = {
            sig.name: np.empty(tuple(int(d) for d in context.get_tensor_shape(sig.name)), numpy_dtype(sig.datatype))
            for sig in self._outputs
            if sig.name not in outputs
        }
        for name, arr in (*inputs.items(), *outputs.items(), *scratch.items()):
            self._ensure_buffer(name, arr.nbytes)

        device = self._device
        buffers = self._buffers
        stream = device.stream_handle
        to_device, to_host, synchronize = device.to_device, device.to_host, device.synchronize
        ins = list(inputs.items())
        outs = list(outputs.items())
        all_outs = [*outs, *scratch.items()]
        model = self._model

        def run() -> None:
            # Shapes and addresses are set on every run: other runners share this context and its buffers.
            for name, arr in ins:
                context.set_input_shape(name, arr.shape)
                address = buffers[name][0]
                context.set_tensor_address(name, address)
                to_device(address, arr)
            for name, _arr in all_outs:
                context.set_tensor_address(name, buffers[name][0])
            if not context.execute_async_v3(stream):
                synchronize()
                raise RuntimeError(f"model '{model}': TensorRT execution failed")
            for name, arr in outs:
                to_host(arr, buffers[name][0])
            synchronize()

        return run

    def close(self) -> None:
        if self._device is not None:
            try:
                self._device.synchronize()
            except Exception:  # noqa: BLE001 -- closing after a device error must not raise again
                pass
        self._contexts.clear()
        self._buffers.clear()
        self._engine = None
        self._runtime = None

    def framework_version(self) -> str:
        return f"tensorrt {trt.__version__}"

    def device(self) -> str:
        return f"cuda:{self._device_index}"

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """From TensorRT's shape inference for these input shapes; nothing is run."""
        self._require_engine()
        shapes = {name: tuple(int(d) for d in shape) for name, shape in input_shapes.items()}
        missing = [sig.name for sig in self._inputs if sig.name not in shapes]
        if missing:
            raise ValueError(f"output shapes need the shape of every input; missing {', '.join(missing)}")
        context = self._context_for(shapes)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise ValueError(f"model '{self._model}' input '{name}': TensorRT rejects shape {format_shape(shape)}")
        return {sig.name: tuple(int(d) for d in context.get_tensor_shape(sig.name)) for sig in self._outputs}

    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self.output_shapes({name: tuple(arr.shape) for name, arr in inputs.items()})
        results = {sig.name: np.empty(shapes[sig.name], numpy_dtype(sig.datatype)) for sig in self._outputs}
        contiguous = {name: np.ascontiguousarray(arr) for name, arr in inputs.items()}
        self.bind(contiguous, results)()
        return results

    # -- internals --------------------------------------------------------------------------------------

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError("the tensorrt backend has no model loaded")
        return self._engine

    def _context_for(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        for profile in self._profiles:
            if profile.holds(shapes):
                context = self._contexts.get(profile.index)
                if context is None:
                    context = self._engine.create_execution_context()
                    if context is None:
                        raise RuntimeError(f"model '{self._model}': TensorRT cannot create an execution context")
                    if profile.index != 0 or self._engine.num_optimization_profiles > 1:
                        context.set_optimization_profile_async(profile.index, self._device.stream_handle)
                        self._device.synchronize()
                    self._contexts[profile.index] = context
                return context
        described = ", ".join(f"{name} {format_shape(shape)}" for name, shape in shapes.items())
        raise ValueError(f"model '{self._model}': no optimization profile of the engine takes {described}")

    def _ensure_buffer(self, name: str, nbytes: int) -> None:
        current = self._buffers.get(name)
        if current is not None and current[1] >= nbytes:
            return
        if current is not None:
            self._device.synchronize()  # the old buffer may still be in use by queued work
        address, owner = self._device.alloc(nbytes)
        self._buffers[name] = (address, nbytes, owner)

    @staticmethod
    def _check_spec(
        spec: ModelSpecLike, inputs: list[TensorSig], outputs: list[TensorSig], profiles: list[_Profile]
    ) -> None:
        check_config_names(spec, "input", [sig.name for sig in inputs], "the engine")
        check_config_names(spec, "output", [sig.name for sig in outputs], "the engine")
        check_batch_dims(spec, inputs, outputs, "the engine")
        if spec.max_batch_size <= 0:
            return
        for batch in (1, spec.max_batch_size):
            if not any(all(low[0] <= batch <= high[0] for low, high in p.bounds.values()) for p in profiles):
                ranges = "; ".join(
                    ", ".join(f"{name} {low[0]}..{high[0]}" for name, (low, high) in p.bounds.items()) for p in profiles
                )
                raise ConfigError(
                    f"model '{spec.name}': no optimization profile of the engine takes batch size {batch} "
                    f"(max_batch_size {spec.max_batch_size}; the profiles take {ranges})"
                )

