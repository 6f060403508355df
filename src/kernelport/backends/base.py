"""The one small interface every framework backend implements (see docs/internals.md, "Backends").

A backend runs one model instance inside a worker process. The worker hands `bind` numpy views of lane rows
and caches the runner it returns, so `bind` may be slow (validation, warm-up) and the runner must be fast.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kernelport.errors import ConfigError
from kernelport.repository.dtypes import datatype_to_numpy, numpy_to_datatype

try:
    from kernelport.repository.config import TensorSig  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    # TODO(lead): remove when repository lands
    @dataclass(frozen=True)
    class TensorSig:  # type: ignore[no-redef]
        """A tensor as the framework sees it: KServe datatype ("FP32") and shape, -1 for a variable dim."""

        name: str
        datatype: str
        shape: tuple[int, ...]


__all__ = [
    "DATATYPE_OF_DTYPE_NAME",
    "Backend",
    "ModelSpecLike",
    "NamedTensor",
    "TensorSig",
    "bind_shapes_key",
    "bool_parameter",
    "check_batch_dims",
    "check_bind_arrays",
    "check_config_names",
    "check_output_shape",
    "datatype_of",
    "format_shape",
    "instance_gpu",
    "int_parameter",
    "numpy_dtype",
    "unservable_type",
    "warn_cpu_only",
]


class NamedTensor(Protocol):
    @property
    def name(self) -> str: ...


class ModelSpecLike(Protocol):
    """What a backend reads from a model's `ModelSpec` (kernelport.repository); nothing more."""

    @property
    def name(self) -> str: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def parameters(self) -> Mapping[str, str]: ...

    @property
    def inputs(self) -> Sequence[NamedTensor]: ...

    @property
    def outputs(self) -> Sequence[NamedTensor]: ...


# Framework dtype names -> KServe datatypes: TensorFlow's `DType.name` and torch's dtypes less "torch." are
# numpy's names ("float32"), plus bfloat16 and TensorFlow's string.
DATATYPE_OF_DTYPE_NAME: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a KServe datatype name; ValueError for one numpy cannot hold (BF16)."""
    # BF16 is refused even where ml_dtypes gives it a numpy dtype: backends bind no bfloat16 arrays.
    try:
        dtype = None if datatype == "BF16" else datatype_to_numpy(datatype)
    except ValueError:
        dtype = None
    if dtype is None:
        raise ValueError(f"datatype {datatype} has no numpy equivalent")
    return dtype


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype name of a numpy dtype ("FP32"), or the dtype's own name when there is none."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return "BYTES"
    try:
        datatype = numpy_to_datatype(dt)
    except ValueError:
        return str(dt)
    # the mirror of numpy_dtype: an ml_dtypes bfloat16 array is named by its numpy name
    return str(dt) if datatype == "BF16" else datatype


def format_shape(shape: Sequence[int]) -> str:
    """`[-1,16]`: the form user-facing messages use for shapes."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def unservable_type(model: str, tensor: str, type_name: str) -> ConfigError:
    """The error for a model tensor whose framework type has no KServe datatype."""
    return ConfigError(f"model '{model}' tensor '{tensor}' has type {type_name}, which KernelPort cannot serve")


# -- model parameters ---------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def int_parameter(model: str, key: str, value: str, minimum: int = 0) -> int:
    """A parameter's integer value; ConfigError naming the model and the key below `minimum` or not a number."""
    try:
        number = int(value.strip())
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ConfigError(f"model '{model}' parameter '{key}': expected an integer >= {minimum}, got '{value}'")
    return number


def bool_parameter(model: str, key: str, value: str) -> bool:
    """A parameter's true/false value (1/0, yes/no, on/off too); ConfigError naming the model and the key."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"model '{model}' parameter '{key}': expected true or false, got '{value}'")


def instance_gpu(spec: object) -> int:
    """The first GPU the config's `instance_group` lists, 0 when none does. In a worker the server placed on a
    device (kernelport.gpu.placement), that device is the only one visible to the process: always 0."""
    if os.environ.get("KERNELPORT_DEVICE_UUID"):
        return 0
    for group in getattr(spec, "instance_groups", ()) or ():
        gpus = tuple(getattr(group, "gpus", ()) or ())
        if gpus:
            return int(gpus[0])
    return 0


def warn_cpu_only(log: logging.Logger, spec: ModelSpecLike, backend: str) -> None:
    """One warning line at load when the config asks for a GPU from a backend that runs on the cpu only."""
    if getattr(spec, "instance_kind", "KIND_AUTO") == "KIND_GPU":
        log.warning(
            "model '%s': instance_group KIND_GPU asked, but the %s backend runs on cpu only", spec.name, backend
        )


# -- the config against the model ----------------------------------------------------------------------------


def check_config_names(spec: ModelSpecLike, kind: str, have: Sequence[str], source: str) -> None:
    """ConfigError for the first config input (`kind` "input") or output that `source` ("the engine") does
    not have, listing the names it does have in the order given. Tensors the config leaves out are fine:
    the server completes the config from io_signature()."""
    tensors = spec.inputs if kind == "input" else spec.outputs
    for t in tensors:
        if t.name not in have:
            raise ConfigError(
                f"model '{spec.name}' {kind} '{t.name}': not an {kind} of {source} (it has {', '.join(have)})"
            )


def check_batch_dims(
    spec: ModelSpecLike,
    inputs: Sequence[TensorSig],
    outputs: Sequence[TensorSig],
    source: str,
    hint: str = "",
) -> None:
    """With `max_batch_size > 0`, ConfigError for the first tensor whose first dim `source` does not leave
    variable (-1); `hint`, when given, ends the message (how to fix the model)."""
    if spec.max_batch_size <= 0:
        return
    for kind, sigs in (("input", inputs), ("output", outputs)):
        for sig in sigs:
            if not sig.shape or sig.shape[0] != -1:
                raise ConfigError(
                    f"model '{spec.name}' {kind} '{sig.name}': max_batch_size {spec.max_batch_size} needs a "
                    f"variable first dimension, {source} has {format_shape(sig.shape)}{hint}"
                )


# -- the arrays bind gets -----------------------------------------------------------------------------------


def check_bind_arrays(
    model: str,
    max_batch_size: int,
    sig_inputs: Sequence[TensorSig],
    sig_outputs: Sequence[TensorSig],
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    *,
    unbindable: Collection[str] = ("BYTES", "BF16"),
    unbindable_reason: str = "cannot be bound in place",
    reject_empty: bool = False,
    require_aligned: bool = True,
    check_overlap: bool = True,
    passthrough: Mapping[str, str] | None = None,
) -> int | None:
    """Names, dtypes, ranks, static dims, batch size and layout of the arrays `bind` gets; return the batch
    size (None: no batch dim). ValueError (TypeError for a non-array) naming the model and the tensor.

    The keywords are where backends differ: datatypes they cannot bind (and why), whether an empty array,
    an unaligned one or outputs whose memory overlaps another array are refused. `passthrough` (output ->
    input, from `Backend.passthrough_outputs`) names outputs that may be the very memory of their input
    (same address and shape): the model writes the input's own values there, so nothing is overwritten.
    """
    by_input = {sig.name: sig for sig in sig_inputs}
    by_output = {sig.name: sig for sig in sig_outputs}
    missing = sorted(set(by_input) - set(inputs))
    if missing:
        raise ValueError(f"model '{model}': missing input(s) {', '.join(missing)}")
    if not outputs:
        raise ValueError(f"model '{model}': no output arrays to bind")
    layout = "C-contiguous and aligned" if require_aligned else "C-contiguous"
    batch: int | None = None
    checked: list[tuple[str, np.ndarray]] = []
    for kind, arrays, sigs in (("input", inputs, by_input), ("output", outputs, by_output)):
        for name, arr in arrays.items():
            sig = sigs.get(name)
            if sig is None:
                raise ValueError(f"model '{model}': unknown {kind} '{name}' (it has {', '.join(sigs)})")
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"model '{model}' {kind} '{name}': expected a numpy array, got {type(arr)}")
            what = f"model '{model}' {kind} '{name}'"
            got = f"{datatype_of(arr.dtype)} {format_shape(arr.shape)}"
            expected = f"{sig.datatype} {format_shape(sig.shape)}"
            if sig.datatype in unbindable:
                raise ValueError(f"{what}: {sig.datatype} tensors {unbindable_reason}")
            if arr.dtype != numpy_dtype(sig.datatype):
                raise ValueError(f"{what}: expected {expected}, got {got}")
            if arr.ndim != len(sig.shape) or any(
                want >= 0 and have != want for have, want in zip(arr.shape, sig.shape)
            ):
                raise ValueError(f"{what}: expected {expected}, got {got}")
            if max_batch_size > 0:
                n = arr.shape[0]
                if not 1 <= n <= max_batch_size:
                    raise ValueError(f"{what}: batch size {n} is outside 1..{max_batch_size} (got {got})")
                if batch is None:
                    batch = n
                elif n != batch:
                    raise ValueError(f"{what}: batch size {n} differs from the other arrays' {batch}")
            if reject_empty and arr.size == 0:
                raise ValueError(f"{what}: empty array {got}")
            if not arr.flags.c_contiguous or (require_aligned and not arr.flags.aligned):
                raise ValueError(f"{what}: the array must be {layout}")
            if kind == "output" and not arr.flags.writeable:
                raise ValueError(f"{what}: the output array is read-only")
            checked.append((f"{kind} '{name}'", arr))

    if check_overlap:
        # An output that overlaps an input or another output would be read while being written.
        for i, (label, arr) in enumerate(checked):
            if not label.startswith("output"):
                continue
            source = (passthrough or {}).get(label[len("output '"):-1])
            for other_label, other in checked[:i] + checked[i + 1 :]:
                if (source is not None and other_label == f"input '{source}'" and other.shape == arr.shape
                        and other.ctypes.data == arr.ctypes.data):
                    continue  # a pass-through output bound to its own input: the same bytes, by design
                if np.may_share_memory(arr, other):
                    raise ValueError(f"model '{model}' {label}: its memory overlaps {other_label}")
    return batch


def check_output_shape(model: str, name: str, arr: np.ndarray, want: tuple[int, ...]) -> None:
    """ValueError when an output array is not the shape the model produces for the bound inputs."""
    if tuple(arr.shape) != want:
        raise ValueError(
            f"model '{model}' output '{name}': expected {datatype_of(arr.dtype)} {format_shape(want)} "
            f"for these inputs, got {format_shape(arr.shape)}"
        )


def bind_shapes_key(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    """(input shapes, output shapes) by name, sorted: the key of what a probe run at bind learnt."""
    return (
        tuple(sorted((name, arr.shape) for name, arr in inputs.items())),
        tuple(sorted((name, arr.shape) for name, arr in outputs.items())),
    )


class Backend(abc.ABC):
    """One model instance on one framework's runtime.

    Lifecycle: `load` once, then any number of `bind` calls (each returning a runner the worker caches),
    then `close`. Array shapes: `[n, *dims]` when the model batches (`max_batch_size > 0`, `1 <= n <=
    max_batch_size`), `dims` when `max_batch_size == 0`.
    """

    @abc.abstractmethod
    def load(self, model_path: str, spec: ModelSpecLike) -> None:
        """Load the model file (or version directory) at `model_path` for the model `spec` describes."""

    @abc.abstractmethod
    def io_signature(self) -> tuple[list[TensorSig], list[TensorSig]]:
        """The model's (inputs, outputs) as the framework sees them; shapes include the batch dim, if any."""

    @abc.abstractmethod
    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """Return a runner that reads `inputs` and writes the model's outputs into exactly `outputs`.

        The arrays must stay alive and in place while the runner is in use; the runner reads their
        current contents on every call. Raises ValueError when an array does not fit the model
        (name, dtype, shape, contiguity, writability).
        """

    def passthrough_outputs(self) -> dict[str, str]:
        """Outputs the model returns unchanged from an input (output name -> input name), so that the lane
        can give such an output its input's rows and `bind` gets the two as the same array. Only what the
        model file proves (an ONNX Identity of a graph input); by default none."""
        return {}

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the framework's session. Runners returned by `bind` must not be called after; the session's
        memory goes back when the last of them is dropped too (they hold the session they run)."""

    @abc.abstractmethod
    def framework_version(self) -> str:
        """The framework's version, for the startup log line ("onnxruntime 1.32.0")."""

    @abc.abstractmethod
    def device(self) -> str:
        """The device the model runs on, for the startup log line ("cpu", "cuda:0")."""

    @abc.abstractmethod
    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once with outputs the framework allocates: the probe `output_shapes` uses, never
        the hot path. Returns every model output by name."""

    _max_batch_size: int = 0  # load() sets it from the spec

    @property
    def max_batch_size(self) -> int:
        """The `max_batch_size` of the loaded model's spec (0: no batch dim)."""
        return self._max_batch_size

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The output shapes one run produces for inputs of these full shapes (batch dim included when the
        model batches).

        Read from the io_signature when every output dim is static apart from the batch dim; otherwise the
        model is run once on zero inputs of these shapes.
        """
        sig_inputs, sig_outputs = self.io_signature()
        batching = self.max_batch_size > 0
        batch: int | None = None
        if batching:
            firsts = {shape[0] for shape in input_shapes.values() if len(shape) > 0}
            if len(firsts) == 1:
                batch = firsts.pop()

        shapes: dict[str, tuple[int, ...]] = {}
        for sig in sig_outputs:
            dims = list(sig.shape)
            if batching and not dims:
                break  # a batching model's output has a batch dim: an empty shape means "not known"
            if batching and batch is not None and dims[0] == -1:
                dims[0] = batch
            if any(d < 0 for d in dims):
                break
            shapes[sig.name] = tuple(dims)
        else:
            return shapes

        missing = [sig.name for sig in sig_inputs if sig.name not in input_shapes]
        if missing:
            raise ValueError(f"output shapes need the shape of every input; missing {', '.join(missing)}")
        zeros: dict[str, np.ndarray] = {}
        for sig in sig_inputs:
            dtype = numpy_dtype(sig.datatype)
            shape = tuple(input_shapes[sig.name])
            if dtype == np.dtype(object):
                zeros[sig.name] = np.full(shape, b"", dtype=object)
            else:
                zeros[sig.name] = np.zeros(shape, dtype=dtype)
        results = self._run_unbound(zeros)
        return {sig.name: tuple(int(d) for d in results[sig.name].shape) for sig in sig_outputs}
