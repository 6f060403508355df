"""ONNX Runtime backend: one InferenceSession, outputs written straight into the caller's arrays by I/O binding.

Session options come from the model's `parameters`, with the keys of Triton's onnxruntime backend
(default here in brackets):

- ``intra_op_thread_count``: threads inside one operator, 0 lets ORT use one per core [1].
- ``inter_op_thread_count``: threads across operators, parallel mode only [1].
- ``execution_mode``: 0 sequential, 1 parallel [0].
- ``graph_optimization_level``: the numbers of Triton's ``optimization { graph { level } }``, mapped as
  Triton's onnxruntime backend maps them: -1 ORT_ENABLE_BASIC, 1 ORT_ENABLE_EXTENDED, 2 ORT_DISABLE_ALL,
  0 (Triton's default when absent) ORT_ENABLE_ALL; the names basic, extended, all, disable work too [0].
  Triton reads this from the config's ``optimization`` block; KernelPort's ModelSpec carries only
  ``parameters``, so here it is a parameter.
- ``enable_mem_arena``: the CPU memory arena, true/false/1/0/yes/no/on/off [true].
- ``enable_mem_pattern``: memory pattern planning [true].
- ``session.*``: passed unchanged to ``SessionOptions.add_session_config_entry`` (a KernelPort extension),
  e.g. ``session.intra_op.allow_spinning: 0`` when more than one intra-op thread shares a small machine.

The defaults favour latency on a small CPU: one intra-op thread (no thread pool to wake, no spinning threads
competing with the batching loop), sequential execution, all graph optimizations. Other keys are ignored, as
Triton ignores them.

Execution providers come from the config as Triton's onnxruntime backend reads them: ``instance_group``'s
``kind`` and ``optimization { execution_accelerators { gpu_execution_accelerator [...]
cpu_execution_accelerator [...] } }``:

- ``KIND_GPU``: the GPU accelerators listed (``tensorrt`` -> TensorrtExecutionProvider, ``cuda`` ->
  CUDAExecutionProvider), then CUDAExecutionProvider, then the CPU accelerators, then CPUExecutionProvider.
  ``KIND_AUTO`` (or no instance_group) is the same when this onnxruntime has CUDAExecutionProvider or the
  config lists a GPU accelerator, and CPU otherwise. ``KIND_CPU``: CPU accelerators and CPU only.
- ``tensorrt`` accelerator parameters: Triton's ``precision_mode`` (FP32, FP16 -> ``trt_fp16_enable``, INT8 ->
  ``trt_int8_enable``), ``max_workspace_size_bytes`` (-> ``trt_max_workspace_size``),
  ``int8_calibration_table_name``, ``int8_use_native_calibration_table``, and any ``trt_*`` option of
  ONNX Runtime's TensorRT provider, passed unchanged. ``cuda`` accelerator parameters are CUDA provider
  options, passed unchanged. CPU accelerator: ``openvino`` -> OpenVINOExecutionProvider (parameters unchanged).
- The GPU is the first one ``instance_group`` lists (``gpus``), 0 when none: ``device_id`` of the providers.
- A requested provider this onnxruntime does not have (``onnxruntime.get_available_providers()``) is left
  out, with one warning line at load naming the model and the missing providers. ``providers()`` says which
  providers the session really runs on (ONNX Runtime itself drops a provider it cannot start, e.g. CUDA
  without a GPU), and ``device()`` follows the first of them: ``cuda:<gpu>`` or ``cpu``.

In-place outputs: an output bound to a preallocated CPU buffer is written by ORT into that buffer. The one
case found where it is not is an output that *is* a graph input (a pass-through): ORT then returns the
input's own value. `bind` finds such outputs with one probe run on scratch arrays (cached per shapes) and the
runner copies those outputs once after each run; every other output is written in place, no copy.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import onnxruntime as ort

from kernelport.backends.base import (
    Backend,
    ModelSpecLike,
    TensorSig,
    bool_parameter,
    check_batch_dims,
    check_bind_arrays,
    check_config_names,
    check_output_shape,
    instance_gpu,
    int_parameter,
    numpy_dtype,
)
from kernelport.errors import ConfigError
from kernelport.repository.dtypes import ort_type_to_datatype

__all__ = ["OnnxRuntimeBackend", "execution_providers", "session_options_from_parameters"]

log = logging.getLogger(__name__)

_GRAPH_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    # Triton's optimization.graph.level numbers (onnxruntime_backend: -1 basic, 1 extended, 2 disable,
    # anything else -- 0 or absent -- all).
    "-1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "0": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "1": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "2": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_MODEL_FILENAME = "model.onnx"


def session_options_from_parameters(parameters: Mapping[str, str], model: str = "") -> ort.SessionOptions:
    """SessionOptions for a model's `parameters` (keys and defaults in this module's docstring).

    Raises ConfigError naming the model and the parameter for a value it cannot use.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    for key, raw in parameters.items():
        value = str(raw)
        if key == "intra_op_thread_count":
            options.intra_op_num_threads = int_parameter(model, key, value, 0)
        elif key == "inter_op_thread_count":
            options.inter_op_num_threads = int_parameter(model, key, value, 0)
        elif key == "execution_mode":
            mode = value.strip()
            if mode == "0":
                options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            elif mode == "1":
                options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            else:
                raise ConfigError(
                    f"model '{model}' parameter '{key}': expected 0 (sequential) or 1 (parallel), got '{value}'"
                )
        elif key == "graph_optimization_level":
            level = _GRAPH_LEVELS.get(value.strip().lower())
            if level is None:
                raise ConfigError(
                    f"model '{model}' parameter '{key}': expected -1 (basic), 0 (all), 1 (extended) "
                    f"or 2 (disable), got '{value}'"
                )
            options.graph_optimization_level = level
        elif key == "enable_mem_arena":
            options.enable_cpu_mem_arena = bool_parameter(model, key, value)
        elif key == "enable_mem_pattern":
            options.enable_mem_pattern = bool_parameter(model, key, value)
        elif key.startswith("session."):
            options.add_session_config_entry(key, value)
    return options


# Triton's accelerator names -> ONNX Runtime execution providers.
_GPU_ACCELERATORS: dict[str, str] = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
_CPU_ACCELERATORS: dict[str, str] = {"openvino": "OpenVINOExecutionProvider"}
_CPU_PROVIDER = "CPUExecutionProvider"
_CUDA_PROVIDER = "CUDAExecutionProvider"
_GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
# Triton's tensorrt accelerator parameters -> TensorRT provider options (trt_* keys pass unchanged).
_TENSORRT_OPTIONS: dict[str, str] = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}

ProviderRequest = tuple[str, dict[str, str]]


def _accelerators(spec: Any) -> tuple[list[tuple[str, dict[str, str]]], list[tuple[str, dict[str, str]]]]:
    """The config's (gpu, cpu) execution accelerators as (name, parameters), from spec.proto."""
    proto = getattr(spec, "proto", None)
    if proto is None or not proto.HasField("optimization"):
        return [], []
    accelerators = proto.optimization.execution_accelerators
    gpu = [(a.name, dict(a.parameters)) for a in accelerators.gpu_execution_accelerator]
    cpu = [(a.name, dict(a.parameters)) for a in accelerators.cpu_execution_accelerator]
    return gpu, cpu


def _provider_of(model: str, device: str, name: str, accelerators: Mapping[str, str]) -> str:
    """The execution provider of a config's `device` ("gpu", "cpu") accelerator; ConfigError when unknown."""
    provider = accelerators.get(name.strip().lower())
    if provider is None:
        raise ConfigError(
            f"model '{model}': {device}_execution_accelerator '{name}' is not known "
            f"(expected one of {', '.join(accelerators)})"
        )
    return provider


def _tensorrt_options(model: str, parameters: Mapping[str, str], device_id: int) -> dict[str, str]:
    options = {"device_id": str(device_id)}
    for key, value in parameters.items():
        if key == "precision_mode":
            mode = value.strip().upper()
            if mode == "FP16":
                options["trt_fp16_enable"] = "True"
            elif mode == "INT8":
                options["trt_int8_enable"] = "True"
            elif mode != "FP32":
                raise ConfigError(
                    f"model '{model}' tensorrt accelerator parameter 'precision_mode': expected FP32, FP16 or "
                    f"INT8, got '{value}'"
                )
        elif key in _TENSORRT_OPTIONS:
            options[_TENSORRT_OPTIONS[key]] = value
        elif key.startswith("trt_") or key == "device_id":
            options[key] = value
        else:
            raise ConfigError(
                f"model '{model}' tensorrt accelerator parameter '{key}': unknown (expected precision_mode, "
                f"max_workspace_size_bytes, int8_calibration_table_name, int8_use_native_calibration_table "
                f"or a trt_* option of ONNX Runtime's TensorRT provider)"
            )
    return options


def execution_providers(spec: Any, available: Sequence[str]) -> tuple[list[ProviderRequest], list[str]]:
    """The execution providers a model's config asks for, in order, with their options, and the names of
    those `available` lacks (left out of the first list). CPUExecutionProvider always comes last.

    Raises ConfigError naming the model for an accelerator name or parameter it does not know.
    """
    model = str(getattr(spec, "name", ""))
    kind = str(getattr(spec, "instance_kind", "KIND_AUTO") or "KIND_AUTO")
    device_id = instance_gpu(spec)
    gpu_accelerators, cpu_accelerators = _accelerators(spec)
    requested: list[ProviderRequest] = []

    use_gpu = kind == "KIND_GPU" or (
        kind in ("KIND_AUTO", "KIND_MODEL") and (bool(gpu_accelerators) or _CUDA_PROVIDER in available)
    )
    if use_gpu:
        for name, parameters in gpu_accelerators:
            provider = _provider_of(model, "gpu", name, _GPU_ACCELERATORS)
            if provider == "TensorrtExecutionProvider":
                options = _tensorrt_options(model, parameters, device_id)
            else:
                options = {"device_id": str(device_id), **parameters}
            requested.append((provider, options))
        if all(provider != _CUDA_PROVIDER for provider, _ in requested):
            requested.append((_CUDA_PROVIDER, {"device_id": str(device_id)}))
    elif gpu_accelerators:
        log.debug("model '%s': gpu_execution_accelerator ignored for instance kind %s", model, kind)
    for name, parameters in cpu_accelerators:
        provider = _provider_of(model, "cpu", name, _CPU_ACCELERATORS)
        requested.append((provider, dict(parameters)))

    missing = [provider for provider, _ in requested if provider not in available]
    chosen = [(provider, options) for provider, options in requested if provider in available]
    chosen.append((_CPU_PROVIDER, {}))
    return chosen, missing


def _signature_of(node: Any) -> TensorSig:
    try:
        datatype = ort_type_to_datatype(node.type)
    except ValueError:
        raise ConfigError(f"tensor '{node.name}' has type {node.type}, which KernelPort cannot serve") from None
    # ORT reports a symbolic dim as its name (str) and an unknown one as None: both are variable.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSig(name=node.name, datatype=datatype, shape=shape)


def _view_of(address: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of `shape` elements at a raw address (memory owned by someone else)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider, outputs written in place by I/O binding."""

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._model = ""
        self._max_batch_size = 0
        self._inputs: list[TensorSig] = []
        self._outputs: list[TensorSig] = []
        # (input shapes, output names) -> (expected output shapes, outputs ORT does not write in place or
        # None when the probe failed). bind fills it; one probe run per distinct shapes.
        self._plans: dict[tuple[Any, ...], tuple[dict[str, tuple[int, ...]], frozenset[str] | None]] = {}
        self._copied_by_runner: WeakKeyDictionary[Callable[[], None], tuple[str, ...]] = WeakKeyDictionary()
        self._providers: list[str] = []
        self._gpu = 0
        self._passthrough: dict[str, str] = {}

    # -- Backend ----------------------------------------------------------------------------------------

    def load(self, model_path: str, spec: ModelSpecLike) -> None:
        path = os.path.join(model_path, _MODEL_FILENAME) if os.path.isdir(model_path) else model_path
        options = session_options_from_parameters(spec.parameters, spec.name)
        providers, missing = execution_providers(spec, ort.get_available_providers())
        if missing:
            log.warning(
                "model '%s': execution provider(s) %s requested by the config are not available in this "
                "onnxruntime; running on %s",
                spec.name,
                ", ".join(missing),
                ", ".join(name for name, _ in providers),
            )
        try:
            session = ort.InferenceSession(
                path,
                sess_options=options,
                providers=[name for name, _ in providers],
                provider_options=[opts for _, opts in providers],
            )
        except Exception as exc:  # ORT raises its own exception types; the message carries the reason
            raise ConfigError(f"model '{spec.name}': onnxruntime cannot load the model: {exc}") from exc

        try:
            inputs = [_signature_of(node) for node in session.get_inputs()]
            outputs = [_signature_of(node) for node in session.get_outputs()]
        except ConfigError as exc:
            raise ConfigError(f"model '{spec.name}': {exc}") from None
        self._check_spec(spec, inputs, outputs)

        self._session = session
        self._model = spec.name
        self._max_batch_size = int(spec.max_batch_size)
        self._inputs, self._outputs = inputs, outputs
        self._plans.clear()
        self._passthrough = _identity_outputs(path, inputs, outputs)
        self._providers = list(session.get_providers())
        self._gpu = instance_gpu(spec)
        log.debug(
            "model '%s' loaded by onnxruntime %s on %s (%s)",
            spec.name,
            ort.__version__,
            self.device(),
            ", ".join(self._providers),
        )

    def io_signature(self) -> tuple[list[TensorSig], list[TensorSig]]:
        self._require_session()
        return list(self._inputs), list(self._outputs)

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        session = self._require_session()
        check_bind_arrays(
            self._model, self._max_batch_size, self._inputs, self._outputs, inputs, outputs, reject_empty=True,
            passthrough=self._passthrough,
        )

        input_shapes = {name: tuple(arr.shape) for name, arr in inputs.items()}
        key = (tuple(sorted(input_shapes.items())), tuple(sorted(outputs)))
        plan = self._plans.get(key)
        if plan is None:
            expected = self.output_shapes(input_shapes)
            self._check_output_shapes(outputs, expected)
            plan = (expected, self._probe_in_place(input_shapes, outputs))
            self._plans[key] = plan
        else:
            self._check_output_shapes(outputs, plan[0])
        not_in_place = plan[1]

        binding = session.io_binding()
        for name, arr in inputs.items():
            binding.bind_input(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
        # The binding holds raw pointers only; the runner keeps the arrays alive.
        keep_alive = (tuple(inputs.values()), tuple(outputs.values()))
        run = session.run_with_iobinding

        if not_in_place is not None and not not_in_place:

            def run_bound(
                run: Callable[[Any], None] = run, binding: Any = binding, _keep: Any = keep_alive
            ) -> None:
                run(binding)

            self._copied_by_runner[run_bound] = ()
            return run_bound

        # Fallback: some output is not written in place (or the probe could not tell): after each run,
        # copy once from wherever ORT put each such output into the caller's array.
        names = list(outputs)
        targets = [(i, outputs[name], outputs[name].ctypes.data) for i, name in enumerate(names)]
        if not_in_place is not None:
            targets = [t for t in targets if names[t[0]] in not_in_place]
        get_outputs = binding.get_outputs

        def run_bound_copying(
            run: Callable[[Any], None] = run,
            binding: Any = binding,
            get_outputs: Callable[[], list[Any]] = get_outputs,
            targets: list[tuple[int, np.ndarray, int]] = targets,
            _keep: Any = keep_alive,
        ) -> None:
            run(binding)
            values = get_outputs()
            for index, target, address in targets:
                value = values[index]
                source = value.data_ptr()
                if source != address:
                    np.copyto(target, _view_of(source, target.dtype, target.shape))

        copied = tuple(names[i] for i, _, _ in targets)
        log.info(
            "model '%s': onnxruntime does not write output(s) %s in place; copying them once per run",
            self._model,
            ", ".join(copied),
        )
        self._copied_by_runner[run_bound_copying] = copied
        return run_bound_copying

    def passthrough_outputs(self) -> dict[str, str]:
        """Graph outputs that are an Identity (or a chain of them) of a graph input. Bound to the input's
        own memory, ORT's Identity kernel sees source == target and copies nothing (and when ORT's
        optimizer removed the node, the output *is* the input): the output costs no copy at all."""
        return dict(self._passthrough) if self.device() == "cpu" else {}

    def close(self) -> None:
        self._session = None
        self._plans.clear()

    def framework_version(self) -> str:
        return f"onnxruntime {ort.__version__}"

    def device(self) -> str:
        if self._providers and self._providers[0] in _GPU_PROVIDERS:
            return f"cuda:{self._gpu}"
        return "cpu"

    def providers(self) -> list[str]:
        """The execution providers the session runs on, in ONNX Runtime's order of preference."""
        self._require_session()
        return list(self._providers)

    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._require_session()
        names = [sig.name for sig in self._outputs]
        results = session.run(names, {k: _ort_strings(v) for k, v in inputs.items()})
        return {name: np.asarray(value) for name, value in zip(names, results)}

    # -- ORT-specific -----------------------------------------------------------------------------------

    @property
    def session(self) -> ort.InferenceSession:
        """The InferenceSession (benchmarks compare against calling it directly)."""
        return self._require_session()

    def copied_outputs(self, runner: Callable[[], None]) -> tuple[str, ...]:
        """The outputs a runner from `bind` copies after each run; empty when ORT writes every one in place."""
        return self._copied_by_runner[runner]

    # -- internals --------------------------------------------------------------------------------------

    def _require_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError("the onnxruntime backend has no model loaded")
        return self._session

    @staticmethod
    def _check_spec(spec: ModelSpecLike, inputs: list[TensorSig], outputs: list[TensorSig]) -> None:
        check_config_names(spec, "input", sorted(sig.name for sig in inputs), "the ONNX model")
        check_config_names(spec, "output", sorted(sig.name for sig in outputs), "the ONNX model")
        # Outputs with no shape at all are left to bind (output_shapes runs the model for them).
        check_batch_dims(spec, inputs, [sig for sig in outputs if sig.shape], "the ONNX model")

    def _check_output_shapes(
        self, outputs: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]
    ) -> None:
        for name, arr in outputs.items():
            check_output_shape(self._model, name, arr, expected[name])

    def _probe_in_place(
        self, input_shapes: dict[str, tuple[int, ...]], outputs: dict[str, np.ndarray]
    ) -> frozenset[str] | None:
        """Run once on scratch zero arrays and return the outputs ORT did not write into their bound buffer.

        None when the probe run fails (the model may reject zeros); the runner then checks after every run.
        The probe also warms ORT up for these shapes, off the hot path.
        """
        session = self._require_session()
        dtypes = {sig.name: numpy_dtype(sig.datatype) for sig in self._inputs}
        scratch_in = {name: np.zeros(shape, dtype=dtypes[name]) for name, shape in input_shapes.items()}
        scratch_out = {name: np.empty_like(arr) for name, arr in outputs.items()}
        binding = session.io_binding()
        for name, arr in scratch_in.items():
            binding.bind_input(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
        for name, arr in scratch_out.items():
            binding.bind_output(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
        try:
            session.run_with_iobinding(binding)
        # ORT's exceptions (Fail, InvalidArgument, RuntimeException, ...) share no base below Exception.
        except Exception as exc:  # noqa: BLE001 -- the model's own failure on zeros is not a binding error
            log.debug(
                "model '%s': in-place probe run failed (%s); runner will check every run", self._model, exc
            )
            return None
        values = binding.get_outputs()
        return frozenset(
            name
            for (name, arr), value in zip(scratch_out.items(), values)
            if value.data_ptr() != arr.ctypes.data
        )


def _identity_outputs(path: str, inputs: Sequence[TensorSig], outputs: Sequence[TensorSig]) -> dict[str, str]:
    """Output name -> input name for every graph output made by Identity nodes alone from a graph input of
    the same type and shape, read from the model file (the `onnx` package; without it, none)."""
    try:
        import onnx
    except ImportError:
        return {}
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001 -- ORT loaded it; a file onnx cannot parse just gets no pass-through
        return {}
    made_by = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    by_input = {sig.name: sig for sig in inputs if sig.name not in initializers}
    found: dict[str, str] = {}
    for sig in outputs:
        name = sig.name
        for _ in range(len(graph.node) + 1):
            node = made_by.get(name)
            if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                break
            name = node.input[0]
        source = by_input.get(name)
        if (source is not None and name != sig.name and source.datatype == sig.datatype
                and source.datatype not in ("BYTES", "BF16") and source.shape == sig.shape):
            found[sig.name] = name
    return found


def _ort_strings(a: np.ndarray) -> np.ndarray:
    """ONNX Runtime's Python binding takes string tensors as `str` objects (it turns `bytes` into their
    repr), so BYTES elements are decoded as UTF-8 on the way in."""
    if a.dtype != object:
        return a
    flat = a.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, v in enumerate(flat):
        if isinstance(v, bytes):
            try:
                out[i] = v.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("ONNX Runtime string tensors must be UTF-8") from None
        else:
            out[i] = v
    return out.reshape(a.shape)
