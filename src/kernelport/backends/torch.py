"""PyTorch backend: TorchScript (``model.pt``), ``torch.export`` programs and AOTInductor packages (``model.pt2``).

Which kind a file is, is read from the file itself: a PT2 archive holding ``data/aotinductor/`` is an
AOTInductor package (loaded with ``torch._inductor.aoti_load_package``), one holding ``models/*.json`` is an
ExportedProgram (``torch.export.load``), anything else is TorchScript (``torch.jit.load``).

Names, as Triton's PyTorch backend names them:

- inputs: the names of ``forward()``'s arguments, or ``<name>__<index>`` (``INPUT__0``) for the index-th
  positional argument. AOTInductor packages keep no argument names: ``<name>__<index>``, or config order.
- outputs: ``<name>__<index>`` for the index-th output (of a tuple/list, or of the program's flattened
  outputs), otherwise the config's order; when ``forward()`` returns a dict, its keys. An ExportedProgram's
  outputs are named ``OUTPUT__<index>`` (or its dict keys) when the config does not name them.

Signatures: an ExportedProgram carries dtypes and shapes (symbolic dims become -1), so its config may leave
inputs and outputs out and is completed from the program. TorchScript and AOTInductor packages carry no
reliable signature: their config must list every input and output with data_type and dims.

Parameters (Triton's names in capitals work too; default in brackets):

- ``intra_op_thread_count``: ``torch.set_num_threads`` [1]; 0 leaves torch's default.
- ``inter_op_thread_count``: ``torch.set_num_interop_threads`` [1]; 0 leaves torch's default. Torch allows
  this once per process, before any parallel work: the first model loaded in a process sets it.
- ``inference_mode``: run under ``torch.inference_mode()`` (true) or ``torch.no_grad()`` (false) [true].

Data path: inputs reach the model without a copy: ``torch.from_numpy`` over the row views, made once per
bound runner (the runner reads the rows' current contents on every call). Outputs are copied once, from the
tensors the model returns into ``torch.from_numpy`` views of the output rows (``Tensor.copy_``), after a
check of their shape and dtype (``copy_`` would broadcast or cast silently). `bind` runs the model twice
on zeros of the bound shapes, once per distinct shapes: a model that returns something the output arrays
cannot hold fails at bind, and TorchScript's profiling executor is warmed up off the hot path.

Process settings: the thread counts are set when the model loads (once per worker process). Inference mode
is entered by the runner on every call (about 1-2 us) rather than switched on for the whole thread: it is
thread-local state, and left on it would leak into a process that only loads a backend (tests, benchmarks)
and turn the tensors it makes afterwards into inference tensors.

An ExportedProgram is run through its lifted graph (``ep.graph_module`` called with its parameters, buffers
and constants, then the user inputs: the calling convention of the torch.export IR) when the program has no
mutated buffers or other side outputs; this skips the pytree and guard wrapper of ``ep.module()``, which
costs several times the run of a small model. Programs that need the wrapper get ``ep.module()``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch

from kernelport.backends.base import (
    DATATYPE_OF_DTYPE_NAME,
    Backend,
    ModelSpecLike,
    TensorSig,
    bind_shapes_key,
    bool_parameter,
    check_batch_dims,
    check_bind_arrays,
    check_config_names,
    datatype_of,
    format_shape,
    instance_gpu,
    int_parameter,
    unservable_type,
    warn_cpu_only,
)
from kernelport.errors import ConfigError

__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

# torch.float32 -> "FP32": torch's dtypes are named as numpy's (less "torch."); it has no string dtype.
_DATATYPE_OF_TORCH: dict[torch.dtype, str] = {
    getattr(torch, name): datatype for name, datatype in DATATYPE_OF_DTYPE_NAME.items() if name != "string"
}
_TORCH_OF_DATATYPE: dict[str, torch.dtype] = {name: dt for dt, name in _DATATYPE_OF_TORCH.items()}

_INDEXED_NAME = re.compile(r".*__(\d+)")
_DEFAULT_FILENAMES = ("model.pt", "model.pt2")

TORCHSCRIPT = "torchscript"
EXPORTED_PROGRAM = "exported_program"
AOTI = "aoti"

# Process-wide settings torch allows only once (inter-op threads): the first model loaded sets them.
_interop_threads_set = False


def _parameter(parameters: Mapping[str, str], key: str) -> str | None:
    for k in (key, key.upper()):
        if k in parameters:
            return str(parameters[k])
    return None


def _configure_threads(parameters: Mapping[str, str], model: str) -> None:
    global _interop_threads_set
    intra = _parameter(parameters, "intra_op_thread_count")
    intra_n = 1 if intra is None else int_parameter(model, "intra_op_thread_count", intra)
    inter = _parameter(parameters, "inter_op_thread_count")
    inter_n = 1 if inter is None else int_parameter(model, "inter_op_thread_count", inter)
    if intra_n > 0:
        torch.set_num_threads(intra_n)
    if inter_n > 0 and not _interop_threads_set:
        try:
            torch.set_num_interop_threads(inter_n)
        except RuntimeError:
            # Torch refuses once inter-op work has started in this process (tests that ran torch first);
            # a worker process loads its model before any torch work, so there it always applies.
            log.debug("model '%s': torch inter-op threads already fixed at %d", model, torch.get_num_interop_threads())
        _interop_threads_set = True


def _inference_mode(parameters: Mapping[str, str], model: str) -> bool:
    value = _parameter(parameters, "inference_mode")
    return True if value is None else bool_parameter(model, "inference_mode", value)


def _artifact_kind(path: str) -> str:
    if not zipfile.is_zipfile(path):
        return TORCHSCRIPT
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.startswith("data/aotinductor/") or "/data/aotinductor/" in n for n in names):
        return AOTI
    if any(re.fullmatch(r"(.*/)?models/[^/]+\.json", n) for n in names):
        return EXPORTED_PROGRAM
    return TORCHSCRIPT


def _model_file(model_path: str, spec: ModelSpecLike) -> str:
    if not os.path.isdir(model_path):
        return model_path
    default = getattr(spec, "default_model_filename", "") or ""
    for filename in (default, *_DEFAULT_FILENAMES):
        if filename and os.path.isfile(os.path.join(model_path, filename)):
            return os.path.join(model_path, filename)
    raise ConfigError(f"model '{spec.name}': no {' or '.join(_DEFAULT_FILENAMES)} in the version directory")


def _index_of(name: str) -> int | None:
    match = _INDEXED_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _shape_of(shape: Sequence[Any]) -> tuple[int, ...]:
    """A traced shape with symbolic dims (SymInt) as -1."""
    return tuple(int(d) if isinstance(d, int) else -1 for d in shape)


def _flat_outputs(result: Any) -> Any:
    """What a model returns as something to index by output key: a tuple/list by position, a dict by key."""
    if isinstance(result, torch.Tensor):
        return (result,)
    return result


class _Loaded:
    """What load() learned: how to call the model and how the served names map onto it."""

    def __init__(self) -> None:
        self.call: Callable[..., Any] = lambda *args: None
        self.flatten: Callable[[Any], Any] = _flat_outputs
        self.inputs: list[TensorSig] = []  # served names, in the model's positional order
        self.outputs: list[TensorSig] = []
        self.input_position: dict[str, int] = {}
        self.output_key: dict[str, int | str] = {}
        self.kind = TORCHSCRIPT
        self.keep: Any = None  # the module / program / package the call needs


class TorchBackend(Backend):
    """PyTorch on the CPU: inputs by ``torch.from_numpy`` over the rows, outputs copied once into them."""

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self._model = ""
        self._max_batch_size = 0
        self._inference_mode = True
        self._bound_inputs: WeakKeyDictionary[Callable[[], None], dict[str, torch.Tensor]] = WeakKeyDictionary()
        self._probed: set[tuple[Any, ...]] = set()  # (input shapes, output shapes) already checked by a probe
        self._device = "cpu"  # "cuda:0" when the config places the model on a GPU (kernelport.gpu.torch_cuda)
        self._graphs = False
        self._executor: Any = None

    # -- Backend ----------------------------------------------------------------------------------------

    def load(self, model_path: str, spec: ModelSpecLike) -> None:
        self._model = spec.name
        path = _model_file(model_path, spec)
        _configure_threads(spec.parameters, spec.name)
        self._inference_mode = _inference_mode(spec.parameters, spec.name)
        self._device = _select_device(spec)
        self._graphs = self._device != "cpu" and _cuda_graphs(spec)
        if self._device == "cpu":
            warn_cpu_only(log, spec, "pytorch")

        kind = _artifact_kind(path)
        filename = os.path.basename(path)
        try:
            if kind == EXPORTED_PROGRAM:
                loaded = self._load_exported_program(path, spec)
            elif kind == AOTI:
                loaded = self._load_aoti(path, spec)
            else:
                loaded = self._load_torchscript(path, spec)
        except ConfigError:
            raise
        except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors... with the reason
            raise ConfigError(f"model '{spec.name}': torch cannot load {filename}: {exc}") from exc
        loaded.kind = kind
        self._loaded = loaded
        self._probed.clear()
        self._max_batch_size = int(spec.max_batch_size)
        log.debug("model '%s' loaded (%s) by torch %s on %s", spec.name, kind, torch.__version__, self._device)

    def io_signature(self) -> tuple[list[TensorSig], list[TensorSig]]:
        loaded = self._require_loaded()
        return list(loaded.inputs), list(loaded.outputs)

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Callable[[], None]:
        loaded = self._require_loaded()
        check_bind_arrays(self._model, self._max_batch_size, loaded.inputs, loaded.outputs, inputs, outputs)

        args: list[torch.Tensor] = [torch.empty(0)] * len(loaded.inputs)
        with warnings.catch_warnings():
            # A read-only input is fine: the model only reads it (torch warns that it could write).
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            bound = {name: torch.from_numpy(arr) for name, arr in inputs.items()}
        for name, tensor in bound.items():
            args[loaded.input_position[name]] = tensor
        targets = [(loaded.output_key[name], torch.from_numpy(arr), name) for name, arr in outputs.items()]

        key = bind_shapes_key(inputs, outputs)
        if key not in self._probed:
            self._probe(loaded, inputs, outputs)
            self._probed.add(key)

        call = loaded.call
        flatten = loaded.flatten
        mode = torch.inference_mode if self._inference_mode else torch.no_grad
        model = self._model
        if self._device != "cpu":
            if self._executor is None:
                from kernelport.gpu.torch_cuda import TorchCudaExecutor

                self._executor = TorchCudaExecutor(self._device, graphs=self._graphs)
            host_args = list(args)

            def check(name: str, value: torch.Tensor, target: torch.Tensor) -> str | None:
                if value.shape != target.shape or value.dtype != target.dtype:
                    return _mismatch(model, name, value, target)
                return None

            runner: Callable[[], None] = self._executor.bind(call, flatten, host_args, targets, mode, check)
            self._bound_inputs[runner] = bound
            return runner

        def run() -> None:
            with mode():
                values = flatten(call(*args))
                for index, target, name in targets:
                    value = values[index]
                    if value.shape != target.shape or value.dtype != target.dtype:
                        raise ValueError(_mismatch(model, name, value, target))
                    target.copy_(value)

        self._bound_inputs[run] = bound
        return run

    def close(self) -> None:
        self._loaded = None
        self._probed.clear()

    def framework_version(self) -> str:
        return f"torch {torch.__version__}"

    def device(self) -> str:
        return self._device

    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = self._require_loaded()
        args: list[torch.Tensor] = [torch.empty(0)] * len(loaded.inputs)
        for name, arr in inputs.items():
            args[loaded.input_position[name]] = torch.from_numpy(np.ascontiguousarray(arr)).to(self._device)
        mode = torch.inference_mode if self._inference_mode else torch.no_grad
        with mode():
            values = loaded.flatten(loaded.call(*args))
            return {
                sig.name: values[loaded.output_key[sig.name]].detach().cpu().contiguous().numpy().copy()
                for sig in loaded.outputs
            }

    # -- torch-specific ---------------------------------------------------------------------------------

    @property
    def artifact_kind(self) -> str:
        """"torchscript", "exported_program" or "aoti": what the model file turned out to be."""
        return self._require_loaded().kind

    def bound_inputs(self, runner: Callable[[], None]) -> dict[str, torch.Tensor]:
        """The tensors a runner from `bind` feeds the model: views of the input arrays, no copy."""
        return dict(self._bound_inputs[runner])

    # -- loading ----------------------------------------------------------------------------------------

    def _load_torchscript(self, path: str, spec: ModelSpecLike) -> _Loaded:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; Triton repositories hold model.pt files all the same.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=self._device)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        schema = module.forward.schema
        arguments = [a for a in schema.arguments[1:] if not a.kwarg_only]  # [0] is self
        arg_names = [a.name for a in arguments]
        required = sum(1 for a in arguments if not a.has_default_value())
        inputs, outputs = _config_signature(spec, "a TorchScript model (model.pt)")
        positions = _input_positions(spec.name, [t.name for t in inputs], arg_names, required)

        # What forward() returns says how outputs are named: a dict by key, a tuple/list by index.
        returns = schema.returns
        ret_type: Any = returns[0].type if len(returns) == 1 else None
        ret_kind = ret_type.kind() if ret_type is not None else ""
        if ret_kind == "DictType":
            keys: dict[str, int | str] = {t.name: t.name for t in outputs}
        else:
            count: int | None = None  # a list: known when it runs
            if ret_kind == "TupleType":
                count = len(ret_type.elements())
            elif ret_kind == "TensorType":
                count = 1
            keys = dict(_output_indices(spec.name, [t.name for t in outputs], count))

        loaded = _Loaded()
        loaded.call = module
        loaded.keep = module
        loaded.inputs = sorted(inputs, key=lambda t: positions[t.name])
        loaded.outputs = outputs
        loaded.input_position = positions
        loaded.output_key = keys
        return loaded

    def _load_aoti(self, path: str, spec: ModelSpecLike) -> _Loaded:
        import torch._inductor
        from torch.utils._pytree import treespec_loads

        package = torch._inductor.aoti_load_package(path)
        device = package.get_metadata().get("AOTI_DEVICE_KEY", "cpu")
        if device == "cpu" and self._device != "cpu":
            log.warning("model '%s': the AOTInductor package was compiled for the cpu; it runs there", spec.name)
            self._device = "cpu"
        if device != "cpu" and not self._device.startswith(device):
            raise ConfigError(
                f"model '{spec.name}': the AOTInductor package was compiled for {device}; "
                f"the pytorch backend runs AOTInductor packages on the cpu only"
            )
        in_spec, out_spec = package.loader.get_call_spec()
        n_inputs = treespec_loads(in_spec).num_leaves
        n_outputs = treespec_loads(out_spec).num_leaves
        inputs, outputs = _config_signature(spec, "an AOTInductor package (model.pt2)")
        positions = _input_positions(spec.name, [t.name for t in inputs], [], n_inputs)
        if len(inputs) != n_inputs:
            raise ConfigError(
                f"model '{spec.name}': the AOTInductor package takes {n_inputs} input(s), the config lists "
                f"{len(inputs)}"
            )
        loaded = _Loaded()
        run = getattr(package.loader, "run", None)
        if run is not None:
            # The loader takes and returns flat lists: the compiled model without the pytree wrapper.
            loaded.call = lambda *args: run(list(args))
        else:  # pragma: no cover -- older torch
            loaded.call = package
        loaded.keep = package
        loaded.inputs = sorted(inputs, key=lambda t: positions[t.name])
        loaded.outputs = outputs
        loaded.input_position = positions
        loaded.output_key = dict(_output_indices(spec.name, [t.name for t in outputs], n_outputs))
        return loaded

    def _load_exported_program(self, path: str, spec: ModelSpecLike) -> _Loaded:
        from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

        program = torch.export.load(path)
        signature = program.graph_signature
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        output_node = next(n for n in program.graph.nodes if n.op == "output")
        out_values = list(output_node.args[0])

        user_inputs = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
        in_spec = program.call_spec.in_spec
        arg_names = list(program.module_call_graph[0].signature.forward_arg_names or [])
        flat_args = (
            in_spec is not None
            and in_spec.num_children == 2
            and in_spec.child(1).num_leaves == 0
            and in_spec.child(0).num_children == len(user_inputs)
            and in_spec.child(0).num_leaves == len(user_inputs)
        )
        if not flat_args or len(arg_names) != len(user_inputs):
            arg_names = [f"INPUT__{i}" for i in range(len(user_inputs))]

        model_inputs: list[TensorSig] = []
        for i, s in enumerate(user_inputs):
            if not isinstance(s.arg, TensorArgument):
                raise ConfigError(f"model '{spec.name}': input {i} of the exported program is not a tensor")
            model_inputs.append(_sig_of_value(spec.name, arg_names[i], placeholders[s.arg.name].meta.get("val")))

        user_outputs = [(i, s) for i, s in enumerate(signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        out_spec = program.call_spec.out_spec
        dict_outputs = out_spec is not None and out_spec.type is dict and out_spec.num_leaves == out_spec.num_children
        if dict_outputs:
            default_out = [str(k) for k in out_spec.context]
        else:
            default_out = [f"OUTPUT__{i}" for i in range(len(user_outputs))]
        model_outputs = [
            _sig_of_value(spec.name, default_out[j], getattr(out_values[i], "meta", {}).get("val"))
            for j, (i, _s) in enumerate(user_outputs)
        ]

        # Served names: the config's where it names a tensor, the program's otherwise (a config that leaves
        # inputs out is completed by the server from io_signature()).
        positions = _input_positions(spec.name, [t.name for t in spec.inputs], arg_names, 0, complete=False)
        by_position = {pos: name for name, pos in positions.items()}
        for i, name in enumerate(arg_names):
            if i not in by_position:
                if name in positions:
                    raise ConfigError(
                        f"model '{spec.name}' input '{name}': the config gives this name to argument "
                        f"{positions[name]}, but it is the exported program's argument {i}"
                    )
                by_position[i] = name
        inputs = [TensorSig(by_position[i], sig.datatype, sig.shape) for i, sig in enumerate(model_inputs)]

        if not spec.outputs:
            indices = {name: j for j, name in enumerate(default_out)}
        elif dict_outputs:
            check_config_names(spec, "output", default_out, "the exported program")
            indices = {t.name: default_out.index(t.name) for t in spec.outputs}
        else:
            indices = dict(_output_indices(spec.name, [t.name for t in spec.outputs], len(model_outputs)))
        name_of_index = {j: name for name, j in indices.items()}
        outputs = [
            TensorSig(name_of_index.get(j, sig.name), sig.datatype, sig.shape) for j, sig in enumerate(model_outputs)
        ]

        if spec.max_batch_size > 0:
            self._check_batch_dims(spec, program, placeholders, user_inputs, inputs, outputs)

        loaded = _Loaded()
        loaded.kind = EXPORTED_PROGRAM
        loaded.keep = program
        loaded.inputs = inputs
        loaded.outputs = outputs
        loaded.input_position = {sig.name: i for i, sig in enumerate(inputs)}
        loaded.output_key = {sig.name: j for j, sig in enumerate(outputs)}

        lifted = _lifted_arguments(program) if flat_args else None
        if lifted is not None and all(s.kind == OutputKind.USER_OUTPUT for s in signature.output_specs):
            graph_module = program.graph_module.to(self._device)
            lifted = [t.to(self._device) for t in lifted]
            loaded.call = lambda *args: graph_module(*lifted, *args)
            loaded.flatten = lambda result: result
        else:
            from torch.utils._pytree import tree_leaves

            module = program.module().to(self._device)
            loaded.call = module
            loaded.flatten = tree_leaves
            log.debug("model '%s': exported program runs through ep.module()", spec.name)
        return loaded

    @staticmethod
    def _check_batch_dims(
        spec: ModelSpecLike,
        program: Any,
        placeholders: dict[str, Any],
        user_inputs: list[Any],
        inputs: list[TensorSig],
        outputs: list[TensorSig],
    ) -> None:
        check_batch_dims(
            spec,
            inputs,
            outputs,
            "the exported program",
            " (export with dynamic_shapes={...: {0: torch.export.Dim('batch')}})",
        )
        for s, sig in zip(user_inputs, inputs):
            value = placeholders[s.arg.name].meta.get("val")
            first = value.shape[0] if value is not None and len(value.shape) else None
            node = getattr(first, "node", None)
            bounds = program.range_constraints.get(getattr(node, "expr", None)) if node is not None else None
            upper = _finite(getattr(bounds, "upper", None))
            if upper is not None and upper < spec.max_batch_size:
                raise ConfigError(
                    f"model '{spec.name}' input '{sig.name}': the exported program takes batch sizes up to "
                    f"{upper}, below max_batch_size {spec.max_batch_size}"
                )

    # -- internals --------------------------------------------------------------------------------------

    def _require_loaded(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeError("the pytorch backend has no model loaded")
        return self._loaded

    def _probe(self, loaded: _Loaded, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run twice on zeros of the bound shapes: check what the model returns against the output arrays
        (a mismatch is a ValueError now, not a failed batch later) and warm up TorchScript's profiling
        executor off the hot path. A model that rejects zeros is checked by the runner on every call."""
        args: list[torch.Tensor] = [torch.empty(0)] * len(loaded.inputs)
        for name, arr in inputs.items():
            args[loaded.input_position[name]] = torch.zeros(arr.shape, dtype=_TORCH_OF_DATATYPE[datatype_of(arr.dtype)],
                                                            device=self._device)
        mode = torch.inference_mode if self._inference_mode else torch.no_grad
        try:
            with mode():
                for _ in range(2):
                    values = loaded.flatten(loaded.call(*args))
        # torch raises RuntimeError, IndexError, ... from inside the model: not a binding error
        except Exception as exc:  # noqa: BLE001
            log.debug("model '%s': probe run on zeros failed (%s); the runner checks every run", self._model, exc)
            return
        for name, arr in outputs.items():
            key = loaded.output_key[name]
            try:
                value = values[key]
            except (KeyError, IndexError):
                what = "key" if isinstance(key, str) else "output index"
                raise ValueError(
                    f"model '{self._model}' output '{name}': the model returned no {what} {key!r}"
                ) from None
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"model '{self._model}' output '{name}': the model returned {type(value).__name__}")
            target = torch.from_numpy(arr)
            if value.shape != target.shape or value.dtype != target.dtype:  # (value may be on the GPU)
                raise ValueError(_mismatch(self._model, name, value, target))


def _select_device(spec: ModelSpecLike) -> str:
    """"cuda:<n>" when the config asks for a GPU (instance_group KIND_GPU, or the parameter kernelport.device
    naming cuda) and torch sees one; "cpu" otherwise. A worker the server placed sees only its own device
    (CUDA_VISIBLE_DEVICES), which is then ordinal 0; a backend loaded outside the server takes the config's first
    listed GPU."""
    wanted = (_parameter(spec.parameters, "kernelport.device") or "").strip().lower()
    if getattr(spec, "instance_kind", "KIND_AUTO") != "KIND_GPU" and not wanted.startswith("cuda"):
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    if wanted.startswith("cuda:") and wanted[5:].isdigit() and not os.environ.get("KERNELPORT_DEVICE_UUID"):
        ordinal = int(wanted[5:])
    else:
        ordinal = instance_gpu(spec)
    return f"cuda:{ordinal if ordinal < torch.cuda.device_count() else 0}"


def _cuda_graphs(spec: ModelSpecLike) -> bool:
    """The config's optimization.cuda.graphs."""
    proto = getattr(spec, "proto", None)
    try:
        return bool(proto is not None and proto.HasField("optimization") and proto.optimization.cuda.graphs)
    except (AttributeError, ValueError):
        return False


def _finite(bound: Any) -> int | None:
    """A sympy range bound as an int, None when unbounded."""
    # sympy.Integer for a bound; torch's int_oo (is_Integer False) or None when there is none.
    if bound is None or not bool(getattr(bound, "is_Integer", False)):
        return None
    return int(bound)


def _mismatch(model: str, name: str, value: torch.Tensor, target: torch.Tensor) -> str:
    got = f"{_DATATYPE_OF_TORCH.get(value.dtype, str(value.dtype))} {format_shape(tuple(value.shape))}"
    want = f"{_DATATYPE_OF_TORCH.get(target.dtype, str(target.dtype))} {format_shape(tuple(target.shape))}"
    return f"model '{model}' output '{name}': the output array is {want}, the model returned {got}"


def _sig_of_value(model: str, name: str, value: Any) -> TensorSig:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"model '{model}': '{name}' of the exported program is not a tensor")
    datatype = _DATATYPE_OF_TORCH.get(value.dtype)
    if datatype is None:
        raise unservable_type(model, name, str(value.dtype))
    return TensorSig(name=name, datatype=datatype, shape=_shape_of(value.shape))


def _config_signature(spec: ModelSpecLike, what: str) -> tuple[list[TensorSig], list[TensorSig]]:
    """The io_signature a model without its own (TorchScript, AOTInductor) gets from its config."""
    if not spec.inputs or not spec.outputs:
        raise ConfigError(
            f"model '{spec.name}': {what} has no signature KernelPort can read; its config.pbtxt must list "
            f"every input and output (name, data_type, dims)"
        )
    batch = (-1,) if spec.max_batch_size > 0 else ()
    sigs: dict[str, list[TensorSig]] = {"input": [], "output": []}
    for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for t in tensors:
            datatype = getattr(t, "datatype", None)
            dims = getattr(t, "dims", None)
            if not datatype or dims is None:
                raise ConfigError(f"model '{spec.name}' {kind} '{t.name}': the config must give data_type and dims")
            reshape = getattr(t, "reshape", None)
            shape = tuple(reshape) if reshape is not None else tuple(dims)
            sigs[kind].append(TensorSig(name=t.name, datatype=str(datatype), shape=batch + shape))
    return sigs["input"], sigs["output"]


def _input_positions(
    model: str, names: list[str], arg_names: list[str], required: int, complete: bool = True
) -> dict[str, int]:
    """Config input name -> positional index: forward()'s argument names, or `<name>__<index>`.

    `complete`: the names must cover arguments 0..n-1 (at least the `required` ones) without a gap."""
    if arg_names and all(name in arg_names for name in names):
        positions = {name: arg_names.index(name) for name in names}
    elif all(_index_of(name) is not None for name in names):
        positions = {name: int(_index_of(name) or 0) for name in names}
    elif not arg_names:
        positions = {name: i for i, name in enumerate(names)}  # no names to go by: config order
    else:
        bad = next(n for n in names if n not in arg_names and _index_of(n) is None)
        raise ConfigError(
            f"model '{model}' input '{bad}': not an argument of forward() (it has {', '.join(arg_names)}) "
            f"nor named <name>__<index>"
        )
    taken: dict[int, str] = {}
    for name, pos in positions.items():
        if pos in taken:
            raise ConfigError(f"model '{model}': inputs '{taken[pos]}' and '{name}' are both argument {pos}")
        taken[pos] = name
    count = max(len(arg_names), required)
    if arg_names and any(pos >= count for pos in positions.values()):
        bad = next(n for n, p in positions.items() if p >= count)
        raise ConfigError(f"model '{model}' input '{bad}': forward() takes {count} argument(s)")
    expected = set(range(max(required, len(positions))))
    if complete and set(positions.values()) != expected:
        missing = sorted(expected - set(positions.values()))
        labels = [arg_names[i] if i < len(arg_names) else f"__{i}" for i in missing]
        raise ConfigError(
            f"model '{model}': forward() argument(s) {', '.join(labels)} have no input in the config"
        )
    return positions


def _output_indices(model: str, names: list[str], count: int | None) -> list[tuple[str, int]]:
    """Config output name -> index of the model's outputs: `<name>__<index>`, else the config's order."""
    if all(_index_of(name) is not None for name in names):
        pairs = [(name, int(_index_of(name) or 0)) for name in names]
    else:
        pairs = [(name, i) for i, name in enumerate(names)]
    seen: dict[int, str] = {}
    for name, index in pairs:
        if index in seen:
            raise ConfigError(f"model '{model}': outputs '{seen[index]}' and '{name}' are both output {index}")
        seen[index] = name
        if count is not None and index >= count:
            raise ConfigError(f"model '{model}' output '{name}': the model has {count} output(s)")
    return pairs


def _lifted_arguments(program: Any) -> list[torch.Tensor] | None:
    """The parameters, buffers and constants the program's graph takes before its user inputs, or None when
    the graph takes something else (tokens, custom objects) or interleaves them."""
    from torch.export.graph_signature import InputKind

    lifted: list[torch.Tensor] = []
    seen_user = False
    for s in program.graph_signature.input_specs:
        if s.kind == InputKind.USER_INPUT:
            seen_user = True
            continue
        if seen_user:
            return None
        if s.kind == InputKind.PARAMETER:
            value = program.state_dict[s.target]
        elif s.kind == InputKind.BUFFER:
            value = program.state_dict[s.target] if s.persistent is not False else program.constants[s.target]
        elif s.kind == InputKind.CONSTANT_TENSOR:
            value = program.constants[s.target]
        else:
            return None
        if not isinstance(value, torch.Tensor):
            return None
        lifted.append(value.detach())
    return lifted

