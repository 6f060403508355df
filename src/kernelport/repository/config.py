"""config.pbtxt: parsing (text format of `inference.ModelConfig`), validation, and completion from a model.

`parse_config` gives the protobuf message; `ModelSpec.from_proto` validates it into the frozen view the
rest of KernelPort reads; `complete_config` fills what a config leaves out from the model's own IO
signature, as Triton's auto-complete does.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from kernelport.errors import ConfigError
from kernelport.protocol import message_class
from kernelport.repository.dtypes import (
    config_type_to_datatype,
    datatype_to_config_enum,
    datatype_to_numpy,
)

__all__ = [
    "CONFIG_FILENAME",
    "InstanceGroupSpec",
    "ModelSpec",
    "TensorSig",
    "TensorSpec",
    "complete_config",
    "model_config_class",
    "parse_config",
]

CONFIG_FILENAME = "config.pbtxt"


def model_config_class() -> type[Message]:
    """The `inference.ModelConfig` class from KernelPort's own descriptor pool."""
    return message_class("inference.ModelConfig")


def _label(source: str | None, model_name: str | None) -> str:
    """How errors name a config: its file name and model, never the directory it lives in."""
    base = os.path.basename(source) if source else CONFIG_FILENAME
    return f"{base} of model '{model_name}'" if model_name else base


def _fmt(dims: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# --------------------------------------------------------------------------------------------- parse


def parse_config(text_or_path: str | os.PathLike[str], *, model_name: str | None = None) -> Message:
    """Parse a config.pbtxt (a path, or its text) into an `inference.ModelConfig` message.

    A str is taken as a path when it is one line naming an existing file or ending in `.pbtxt`.
    `model_name` names the model in errors; for a path it defaults to the directory holding the file.
    Any error is a ConfigError naming the file, the line and the field.
    """
    source: str | None = None
    if isinstance(text_or_path, os.PathLike) or (
        "\n" not in text_or_path and (text_or_path.endswith(".pbtxt") or os.path.isfile(text_or_path))
    ):
        source = os.fspath(text_or_path)
        if model_name is None:
            model_name = os.path.basename(os.path.dirname(os.path.abspath(source))) or None
        label = _label(source, model_name)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{label}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{label}: cannot be read ({type(e).__name__})") from None
    else:
        text = str(text_or_path)
        label = _label(None, model_name)

    msg = model_config_class()()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        detail = re.sub(r"^\d+(:\d+)?\s*:\s*", "", str(e))
        line, column = e.GetLine(), e.GetColumn()
        where = (
            f"line {line}" + (f" column {column}" if column is not None else "") if line else "parse error"
        )
        raise ConfigError(f"{label}: {where}: {detail}") from None
    return msg


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TensorSig:
    """A tensor as a backend's framework sees the model: -1 for every dynamic dimension."""

    name: str
    datatype: str  # KServe datatype, "FP32"
    shape: tuple[int, ...]  # the model's full shape, batch dimension included if it has one


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype[Any] | None  # None only for BF16 where ml_dtypes is not installed
    datatype: str  # "FP32"
    dims: tuple[int, ...]  # per request item, without the batch dim; -1 = variable
    reshape: tuple[int, ...] | None  # the shape the model sees, when the config reshapes
    optional: bool = False  # inputs only: a request may leave it out


@dataclass(frozen=True)
class InstanceGroupSpec:
    name: str
    kind: str  # "KIND_AUTO", "KIND_CPU", "KIND_GPU", "KIND_MODEL"
    count: int  # instances per device listed in gpus (or in all, when gpus is empty)
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """The validated view of one model's config; `proto` is the message it was made from."""

    name: str
    platform: str
    backend: str
    max_batch_size: int  # 0: the model does not batch
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    dynamic_batching: bool
    instance_count: int
    instance_kind: str
    parameters: dict[str, str]
    default_model_filename: str
    instance_groups: tuple[InstanceGroupSpec, ...] = ()
    source: str | None = field(default=None, compare=False)
    proto: Message | None = field(default=None, compare=False, repr=False)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def from_proto(
        cls, msg: Message, source: str | os.PathLike[str] | None = None, model_name: str | None = None
    ) -> ModelSpec:
        """Validate an `inference.ModelConfig` into a ModelSpec.

        `model_name` is the model's directory name in the repository; a name stated in the config
        must equal it (Triton's rule). Errors are ConfigErrors naming the file and the field.
        """
        src = os.fspath(source) if source is not None else None
        cfg: Any = msg
        name = model_name or cfg.name or ""
        label = _label(src, name or None)
        if model_name is not None and cfg.name and cfg.name != model_name:
            raise ConfigError(
                f"{label}: name '{cfg.name}' must equal the model's directory name '{model_name}'"
            )
        if not name:
            raise ConfigError(f"{label}: name is not set")

        mbs = int(cfg.max_batch_size)
        if mbs < 0:
            raise ConfigError(f"{label}: max_batch_size must be >= 0, got {mbs}")

        inputs = tuple(_tensor_spec(t, "input", label) for t in cfg.input)
        outputs = tuple(_tensor_spec(t, "output", label) for t in cfg.output)
        for kind, specs in (("input", inputs), ("output", outputs)):
            seen: set[str] = set()
            for t in specs:
                if t.name in seen:
                    raise ConfigError(f"{label}: {kind} '{t.name}': name appears more than once")
                seen.add(t.name)

        dynamic = cfg.HasField("dynamic_batching")
        preferred: tuple[int, ...] = ()
        delay_us = 0
        if dynamic:
            if mbs == 0:
                raise ConfigError(
                    f"{label}: dynamic_batching needs max_batch_size >= 1, got max_batch_size 0"
                )
            db = cfg.dynamic_batching
            preferred = tuple(int(b) for b in db.preferred_batch_size)
            for b in preferred:
                if not 1 <= b <= mbs:
                    raise ConfigError(
                        f"{label}: dynamic_batching.preferred_batch_size {b} is not in 1..{mbs} (max_batch_size)"
                    )
            delay_us = int(db.max_queue_delay_microseconds)

        groups = tuple(_instance_group(g, i, label) for i, g in enumerate(cfg.instance_group))
        count = sum(g.count * max(1, len(g.gpus)) for g in groups) if groups else 1

        return cls(
            name=name,
            platform=cfg.platform,
            backend=cfg.backend,
            max_batch_size=mbs,
            inputs=inputs,
            outputs=outputs,
            preferred_batch_sizes=preferred,
            max_queue_delay_us=delay_us,
            dynamic_batching=dynamic,
            instance_count=count,
            instance_kind=groups[0].kind if groups else "KIND_AUTO",
            parameters={k: v.string_value for k, v in cfg.parameters.items()},
            default_model_filename=cfg.default_model_filename,
            instance_groups=groups,
            source=src,
            proto=msg,
        )


def _check_dims(dims: tuple[int, ...], what: str, where: str) -> None:
    if any(d == 0 or d < -1 for d in dims):
        raise ConfigError(f"{where}: {what} must be positive or -1, got {_fmt(dims)}")


def _tensor_spec(t: Any, kind: str, label: str) -> TensorSpec:
    if not t.name:
        raise ConfigError(f"{label}: an {kind} has no name")
    where = f"{label}: {kind} '{t.name}'"
    if t.data_type == 0:
        raise ConfigError(f"{where}: data_type is not set")
    try:
        datatype = config_type_to_datatype(int(t.data_type))
    except ValueError:
        raise ConfigError(f"{where}: data_type {t.data_type} is not a known type") from None
    dims = tuple(int(d) for d in t.dims)
    _check_dims(dims, "dims", where)
    reshape = tuple(int(d) for d in t.reshape.shape) if t.HasField("reshape") else None
    if not dims and reshape is None:
        raise ConfigError(
            f"{where}: dims must not be empty (for a scalar write dims: [ 1 ] with reshape: {{ shape: [ ] }})"
        )
    if reshape is not None:
        _check_dims(reshape, "reshape.shape", where)
        if -1 not in dims and -1 not in reshape and math.prod(dims) != math.prod(reshape):
            raise ConfigError(
                f"{where}: reshape.shape {_fmt(reshape)} holds {math.prod(reshape)} elements "
                f"but dims {_fmt(dims)} hold {math.prod(dims)}"
            )
    return TensorSpec(
        name=t.name,
        dtype=datatype_to_numpy(datatype),
        datatype=datatype,
        dims=dims,
        reshape=reshape,
        optional=bool(getattr(t, "optional", False)) if kind == "input" else False,
    )


def _instance_group(g: Any, index: int, label: str) -> InstanceGroupSpec:
    name = g.name or f"instance_group[{index}]"
    if g.count < 0:
        raise ConfigError(f"{label}: instance_group '{name}': count must be >= 1, got {g.count}")
    kinds = g.DESCRIPTOR.enum_types_by_name["Kind"].values_by_number
    kind = kinds[g.kind].name if g.kind in kinds else str(g.kind)
    if any(d < 0 for d in g.gpus):
        raise ConfigError(f"{label}: instance_group '{name}': gpus must be >= 0, got {_fmt(list(g.gpus))}")
    # count 0 means unset: one instance, as in Triton.
    return InstanceGroupSpec(
        name=g.name, kind=kind, count=int(g.count) or 1, gpus=tuple(int(d) for d in g.gpus)
    )


# ------------------------------------------------------------------------------------------ complete


def _first_unbatchable(sigs: list[TensorSig]) -> TensorSig | None:
    for s in sigs:
        if not s.shape or s.shape[0] != -1:
            return s
    return None


def complete_config(
    msg: Message,
    inputs: list[TensorSig],
    outputs: list[TensorSig],
    can_batch: bool,
    default_max_batch_size: int = 4,
    *,
    model_name: str | None = None,
) -> Message:
    """Fill what a config leaves out from the model's IO signature; return a new message.

    Adds missing inputs/outputs, fills unset data_type and empty dims (without the batch dim when
    batching). When max_batch_size is unset (0) and the model can batch (every tensor's first dim
    is dynamic), it becomes `default_max_batch_size` with dynamic batching on, unless the dims the
    config states have the model's full rank (the config means no batching). What the config
    states must match the model, or a ConfigError names the model, tensor, expected and got.
    """
    out: Any = type(msg)()
    out.CopyFrom(msg)
    name = out.name or model_name or "?"
    label = f"model '{name}'"
    sigs = {"input": {s.name: s for s in inputs}, "output": {s.name: s for s in outputs}}
    stated: dict[str, Any] = {"input": out.input, "output": out.output}

    for kind, tensors in stated.items():
        for t in tensors:
            if t.name not in sigs[kind]:
                have = ", ".join(sigs[kind]) or "none"
                raise ConfigError(
                    f"{label} {kind} '{t.name}': the config names it but the model has no such {kind} "
                    f"(the model's {kind}s: {have})"
                )

    if out.max_batch_size < 0:
        raise ConfigError(f"{label}: max_batch_size must be >= 0, got {out.max_batch_size}")
    if out.max_batch_size > 0:
        if not can_batch:
            culprit = _first_unbatchable(inputs + outputs)
            why = f" ({culprit.name} has shape {_fmt(culprit.shape)})" if culprit else ""
            raise ConfigError(
                f"{label}: max_batch_size is {out.max_batch_size} but the model cannot batch: "
                f"expected a dynamic first dimension on every input and output{why}"
            )
        batching = True
    else:
        # Does a tensor the config states say which? Its rank equal to the model's: no batch dim.
        hint: bool | None = None
        for kind, tensors in stated.items():
            for t in tensors:
                stated_shape = t.reshape.shape if t.HasField("reshape") else t.dims
                rank = len(sigs[kind][t.name].shape)
                if len(stated_shape) == 0:
                    continue
                if len(stated_shape) == rank:
                    hint = False
                elif len(stated_shape) == rank - 1:
                    hint = True
                if hint is not None:
                    break
            if hint is not None:
                break
        batching = can_batch and hint is not False and default_max_batch_size > 0
        if batching:
            out.max_batch_size = default_max_batch_size
            if out.WhichOneof("scheduling_choice") is None:
                out.dynamic_batching.SetInParent()

    for kind, model_sigs in (("input", inputs), ("output", outputs)):
        by_name = {t.name: t for t in stated[kind]}
        for sig in model_sigs:
            where = f"{label} {kind} '{sig.name}'"
            try:
                enum = datatype_to_config_enum(sig.datatype)
            except ValueError:
                raise ConfigError(
                    f"{where}: the model's datatype {sig.datatype!r} is not supported"
                ) from None
            model_shape = tuple(sig.shape[1:]) if batching else tuple(sig.shape)
            t = by_name.get(sig.name)
            if t is None:
                t = stated[kind].add()
                t.name = sig.name
            if t.data_type == 0:
                t.data_type = enum
            elif t.data_type != enum:
                try:
                    got = config_type_to_datatype(int(t.data_type))
                except ValueError:
                    got = str(t.data_type)
                raise ConfigError(f"{where}: expected datatype {sig.datatype}, got {got}")
            if not t.dims and not t.HasField("reshape"):
                if model_shape:
                    t.dims.extend(model_shape)
                else:  # a scalar per item: Triton writes it as [1] reshaped to []
                    t.dims.append(1)
                    t.reshape.SetInParent()
                continue
            stated_shape = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
            compatible = len(stated_shape) == len(model_shape) and all(
                m == -1 or c == m for c, m in zip(stated_shape, model_shape, strict=True)
            )
            if not compatible:
                field_name = "reshape.shape" if t.HasField("reshape") else "dims"
                batch_note = f" (without the batch dimension, as max_batch_size is {out.max_batch_size})"
                raise ConfigError(
                    f"{where}: expected {field_name} {_fmt(model_shape)}"
                    f"{batch_note if batching else ''}, got {_fmt(stated_shape)}"
                )
    return out
