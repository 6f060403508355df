"""The one small interface every framework backend implements (see docs/internals.md, "Backends").

A backend runs one model instance inside a worker process. The worker hands `bind` numpy views of lane rows
and caches the runner it returns, so `bind` may be slow (validation, warm-up) and the runner must be fast.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

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
    "Backend",
    "ModelSpecLike",
    "NamedTensor",
    "TensorSig",
    "datatype_of",
    "format_shape",
    "numpy_dtype",
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


# KServe v2 datatype names <-> numpy. BF16 has no numpy dtype (ml_dtypes provides one where a backend needs it).
_NUMPY_OF_DATATYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF_NUMPY: dict[np.dtype, str] = {dt: name for name, dt in _NUMPY_OF_DATATYPE.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a KServe datatype name; ValueError for one numpy cannot hold (BF16)."""
    try:
        return _NUMPY_OF_DATATYPE[datatype]
    except KeyError:
        raise ValueError(f"datatype {datatype} has no numpy equivalent") from None


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype name of a numpy dtype ("FP32"), or the dtype's own name when there is none."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return "BYTES"
    return _DATATYPE_OF_NUMPY.get(dt, str(dt))


def format_shape(shape: Sequence[int]) -> str:
    """`[-1,16]`: the form user-facing messages use for shapes."""
    return "[" + ",".join(str(d) for d in shape) + "]"


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

    @property
    @abc.abstractmethod
    def max_batch_size(self) -> int:
        """The `max_batch_size` of the loaded model's spec (0: no batch dim)."""

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
