"""TensorFlow backend: a SavedModel (``model.savedmodel/``) run through one of its signatures.

The signature is the one named by the parameter ``TF_SIGNATURE_DEF`` (Triton's key; default
``serving_default``). Served names are the signature's input and output keys; a config that leaves inputs or
outputs out is completed from the signature's TensorSpecs (unknown dims become -1).

Parameters (default in brackets):

- ``TF_SIGNATURE_DEF``: the signature to serve [serving_default].
- ``intra_op_thread_count`` / ``inter_op_thread_count``: TensorFlow's thread pools [1 / 1]; 0 leaves
  TensorFlow's default. TensorFlow fixes them when its runtime starts, so they are set once per process,
  before the model loads (a worker process loads exactly one model).

Data path: an input row whose address is 64-byte aligned (every lane row block is) and writable becomes a
TensorFlow tensor over the same memory, once per bound runner, through DLPack
(``tf.experimental.dlpack.from_dlpack``): no copy per run. TensorFlow's CPU kernels require 64-byte aligned
buffers (an unaligned one aborts the process inside Eigen), so any other input array is copied per run
with ``tf.convert_to_tensor``. Outputs are copied once, from the tensors the signature returns into the
output rows (``np.copyto`` from the tensor's own buffer, ``np.asarray``, which does not copy).

Call path: the signature is a ConcreteFunction; its public call binds keyword arguments to its structured
signature and packs the results, which costs more than the run of a small model. When the restored signature
exposes its flat function (``_inference_function.call_flat``, TensorFlow 2.15 and later) and the flat inputs
can be matched to the signature's names, the runner calls that with the inputs in graph order plus the
captured variables, and maps the flat results back by the signature's own flattening of its outputs. `bind`
checks the two paths agree on a probe run and falls back to the public call when they do not (or when the
attributes are missing).

TensorFlow's INFO lines are cut down by ``TF_CPP_MIN_LOG_LEVEL=1`` unless it is set; the oneDNN notice is
printed before that setting applies (``TF_ENABLE_ONEDNN_OPTS=0`` silences it, and also changes the kernels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from weakref import WeakKeyDictionary

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402 -- after the environment TensorFlow reads at import
import tensorflow as tf  # noqa: E402

from kernelport.backends.base import (  # noqa: E402
    DATATYPE_OF_DTYPE_NAME,
    Backend,
    ModelSpecLike,
    TensorSig,
    bind_shapes_key,
    check_batch_dims,
    check_bind_arrays,
    check_config_names,
    check_output_shape,
    format_shape,
    int_parameter,
    unservable_type,
    warn_cpu_only,
)
from kernelport.errors import ConfigError  # noqa: E402

__all__ = ["TensorFlowBackend"]

log = logging.getLogger(__name__)

_DEFAULT_SIGNATURE = "serving_default"
_MODEL_DIRNAME = "model.savedmodel"
# TensorFlow's CPU allocator alignment (EIGEN_MAX_ALIGN_BYTES); a DLPack tensor must honour it.
_TF_ALIGNMENT = 64

_threads_set = False


def _configure_threads(parameters: Mapping[str, str], model: str) -> None:
    global _threads_set
    intra = int_parameter(model, "intra_op_thread_count", str(parameters.get("intra_op_thread_count", "1")))
    inter = int_parameter(model, "inter_op_thread_count", str(parameters.get("inter_op_thread_count", "1")))
    if _threads_set:
        return
    _threads_set = True
    threading = tf.config.threading
    try:
        if intra > 0:
            threading.set_intra_op_parallelism_threads(intra)
        if inter > 0:
            threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        # TensorFlow refuses once its runtime has started (a test process that ran TF first); a worker
        # process sets them before anything else runs.
        log.debug(
            "model '%s': TensorFlow threads already fixed (intra %d, inter %d)",
            model,
            threading.get_intra_op_parallelism_threads(),
            threading.get_inter_op_parallelism_threads(),
        )


def _savedmodel_dir(model_path: str, spec: ModelSpecLike) -> str:
    if os.path.isfile(os.path.join(model_path, "saved_model.pb")):
        return model_path
    default = getattr(spec, "default_model_filename", "") or _MODEL_DIRNAME
    candidate = os.path.join(model_path, default)
    if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
        return candidate
    what = os.path.basename(model_path.rstrip(os.sep)) or model_path
    if os.path.isfile(model_path):
        raise ConfigError(
            f"model '{spec.name}': {what} is a file; the tensorflow backend serves SavedModel directories "
            f"({_MODEL_DIRNAME}/ holding saved_model.pb), not GraphDef files"
        )
    raise ConfigError(f"model '{spec.name}': {what} is not a SavedModel directory (no saved_model.pb)")


def _signature_of(model: str, name: str, spec: Any) -> TensorSig:
    if not isinstance(spec, tf.TensorSpec):
        raise ConfigError(f"model '{model}' tensor '{name}': not a dense tensor ({type(spec).__name__})")
    datatype = DATATYPE_OF_DTYPE_NAME.get(spec.dtype.name)  # TensorFlow's dtype names are numpy's
    if datatype is None:
        raise unservable_type(model, name, spec.dtype.name)
    if spec.shape.rank is None:
        raise ConfigError(f"model '{model}' tensor '{name}': the signature gives no rank")
    shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSig(name=name, datatype=datatype, shape=shape)


def _is_aliasable(arr: np.ndarray) -> bool:
    return bool(arr.flags.writeable) and arr.ctypes.data % _TF_ALIGNMENT == 0 and arr.dtype.kind in "biuf"


class TensorFlowBackend(Backend):
    """A SavedModel signature on TensorFlow's CPU runtime: aligned input rows by DLPack, outputs copied once."""

    def __init__(self) -> None:
        self._signature: Any = None
        self._flat_call: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
        self._loaded: Any = None  # the restored object: the signature's variables live as long as it does
        self._model = ""
        self._max_batch_size = 0
        self._inputs: list[TensorSig] = []
        self._outputs: list[TensorSig] = []
        self._aliased: WeakKeyDictionary[Callable[[], None], dict[str, Any]] = WeakKeyDictionary()
        self._paths: WeakKeyDictionary[Callable[[], None], str] = WeakKeyDictionary()
        # (input shapes, output shapes) -> use the flat call: a probe decides once per distinct shapes
        self._use_flat: dict[tuple[Any, ...], bool] = {}

    # -- Backend ----------------------------------------------------------------------------------------

    def load(self, model_path: str, spec: ModelSpecLike) -> None:
        path = _savedmodel_dir(model_path, spec)
        _configure_threads(spec.parameters, spec.name)
        warn_cpu_only(log, spec, "tensorflow")
        name = str(spec.parameters.get("TF_SIGNATURE_DEF", "") or _DEFAULT_SIGNATURE)
        try:
            loaded = tf.saved_model.load(path)
        except Exception as exc:  # TF raises OSError, ValueError, its own errors... with the reason
            raise ConfigError(f"model '{spec.name}': tensorflow cannot load the SavedModel: {exc}") from exc
        signatures = loaded.signatures
        if name not in signatures:
            have = ", ".join(sorted(signatures)) or "none"
            raise ConfigError(
                f"model '{spec.name}' parameter 'TF_SIGNATURE_DEF': the SavedModel has no signature '{name}' "
                f"(it has {have})"
            )
        signature = signatures[name]
        args, kwargs = signature.structured_input_signature
        if args:
            raise ConfigError(f"model '{spec.name}': signature '{name}' takes positional inputs; expected named ones")
        outputs_spec = signature.structured_outputs
        if not isinstance(outputs_spec, Mapping):
            raise ConfigError(f"model '{spec.name}': signature '{name}' does not return named outputs")
        inputs = [_signature_of(spec.name, key, value) for key, value in kwargs.items()]
        outputs = [_signature_of(spec.name, key, value) for key, value in outputs_spec.items()]
        self._check_spec(spec, name, inputs, outputs)

        self._loaded = loaded
        self._signature = signature
        self._use_flat.clear()
        self._flat_call = _flat_caller(signature, [sig.name for sig in inputs], [sig.name for sig in outputs])
        self._model = spec.name
        self._max_batch_size = int(spec.max_batch_size)
        self._inputs, self._outputs = inputs, outputs
        log.debug("model '%s' loaded by tensorflow %s on cpu (signature %s)", spec.name, tf.__version__, name)

    def io_signature(self) -> tuple[list[TensorSig], list[TensorSig]]:
        self._require_signature()
        return list(self._inputs), list(self._outputs)

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        signature = self._require_signature()
        check_bind_arrays(self._model, self._max_batch_size, self._inputs, self._outputs, inputs, outputs)

        fixed: dict[str, Any] = {}  # fed as is on every run: TF tensors over the input rows
        copied: list[tuple[str, np.ndarray]] = []  # converted (copied) on every run
        for name, arr in inputs.items():
            if _is_aliasable(arr):
                fixed[name] = tf.experimental.dlpack.from_dlpack(arr.__dlpack__())
            else:
                copied.append((name, arr))
        targets = list(outputs.items())
        key = bind_shapes_key(inputs, outputs)
        use_flat = self._use_flat.get(key)
        if use_flat is None:
            use_flat = self._call_path(signature, inputs, outputs) is self._flat_call
            self._use_flat[key] = use_flat
        call = self._flat_call if use_flat and self._flat_call is not None else _public_call(signature)
        model = self._model
        convert = tf.convert_to_tensor

        def run() -> None:
            feeds = fixed if not copied else {**fixed, **{name: convert(arr) for name, arr in copied}}
            results = call(feeds)
            for name, target in targets:
                value = np.asarray(results[name])  # the tensor's own buffer: no copy
                if value.shape != target.shape:
                    raise ValueError(
                        f"model '{model}' output '{name}': the output array is {format_shape(target.shape)}, the "
                        f"model returned {format_shape(value.shape)}"
                    )
                np.copyto(target, value, casting="no")

        self._aliased[run] = fixed
        self._paths[run] = "flat" if call is self._flat_call else "public"
        if copied:
            log.debug(
                "model '%s': input(s) %s are not 64-byte aligned and writable; copied per run",
                self._model,
                ", ".join(name for name, _ in copied),
            )
        return run

    def close(self) -> None:
        self._signature = None
        self._loaded = None

    def framework_version(self) -> str:
        return f"tensorflow {tf.__version__}"

    def device(self) -> str:
        return "cpu"

    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        signature = self._require_signature()
        results = signature(**{name: tf.convert_to_tensor(arr) for name, arr in inputs.items()})
        return {sig.name: results[sig.name].numpy() for sig in self._outputs}

    # -- TensorFlow-specific -------------------------------------------------------------------------------

    def aliased_inputs(self, runner: Callable[[], None]) -> dict[str, Any]:
        """The inputs a runner from `bind` feeds as TF tensors over the caller's arrays (no copy), by name;
        the others are copied on every run."""
        return dict(self._aliased[runner])

    def call_path(self, runner: Callable[[], None]) -> str:
        """"flat" when a runner from `bind` calls the signature's flat function, "public" for its public call."""
        return self._paths[runner]

    # -- internals --------------------------------------------------------------------------------------

    def _require_signature(self) -> Any:
        if self._signature is None:
            raise RuntimeError("the tensorflow backend has no model loaded")
        return self._signature

    @staticmethod
    def _check_spec(spec: ModelSpecLike, signature: str, inputs: list[TensorSig], outputs: list[TensorSig]) -> None:
        source = f"signature '{signature}'"
        check_config_names(spec, "input", [sig.name for sig in inputs], source)
        check_config_names(spec, "output", [sig.name for sig in outputs], source)
        check_batch_dims(spec, inputs, outputs, source)

    def _call_path(
        self, signature: Any, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
        """The call the runner makes: the flat one when it agrees with the public call on a probe run.

        The probe (zeros of the bound shapes) also checks the output arrays fit what the signature returns
        (a mismatch is a ValueError now, not a failed batch later) and traces/warms up off the hot path. A
        model that rejects zeros keeps the public call and is checked by the runner on every call.
        """

        public = _public_call(signature)
        zeros = {name: tf.zeros(arr.shape, dtype=tf.as_dtype(arr.dtype)) for name, arr in inputs.items()}
        try:
            results = public(zeros)
        # TF raises InvalidArgumentError and friends from inside the model: not a binding error
        except Exception as exc:  # noqa: BLE001
            log.debug("model '%s': probe run on zeros failed (%s); the runner checks every run", self._model, exc)
            return public
        for name, arr in outputs.items():
            check_output_shape(self._model, name, arr, tuple(results[name].shape))
        flat = self._flat_call
        if flat is None:
            return public
        try:
            flat_results = flat(zeros)
            agree = all(
                np.array_equal(np.asarray(flat_results[sig.name]), np.asarray(results[sig.name]), equal_nan=True)
                for sig in self._outputs
                if sig.datatype != "BYTES"
            )
        except Exception as exc:  # noqa: BLE001 -- a private path that fails is simply not used
            log.debug("model '%s': flat call failed (%s); using the signature's public call", self._model, exc)
            return public
        if not agree:
            log.debug("model '%s': flat call disagrees with the public call; using the public call", self._model)
            return public
        return flat


def _public_call(signature: Any) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    def call(feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        return signature(**feeds)  # type: ignore[no-any-return]

    return call


def _flat_caller(
    signature: Any, input_names: list[str], output_names: list[str]
) -> Callable[[Mapping[str, Any]], Mapping[str, Any]] | None:
    """The signature's flat function with the structured wrapping done once here, or None when this
    TensorFlow does not expose it or the names cannot be matched."""
    function = getattr(signature, "_inference_function", None)
    call_flat = getattr(function, "call_flat", None)
    if call_flat is None:
        return None
    try:
        captured = list(signature.captured_inputs)
        graph_inputs = list(signature.inputs)
        user_inputs = graph_inputs[: len(graph_inputs) - len(captured)]
        order = [t.name.split(":")[0] for t in user_inputs]
        # The order TensorFlow itself packs results in: nest's flattening of the structured outputs.
        keys = tf.nest.flatten({name: name for name in signature.structured_outputs})
    except (AttributeError, TypeError, ValueError):
        return None
    if sorted(order) != sorted(input_names) or sorted(keys) != sorted(output_names):
        return None
    if len(list(signature.outputs)) != len(keys):
        return None

    def call(feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        return dict(zip(keys, call_flat(*[feeds[name] for name in order], *captured)))

    return call

