"""Where a model's instances run: `instance_group` against the machine's GPUs and MIG slices.

A pure function of data (the config's groups and a device inventory, see `kernelport.gpu.cuda.device_inventory`),
so every rule is checked without a GPU. Triton's meanings:

- `KIND_GPU`: `count` instances on each GPU `gpus` lists, or on every visible GPU when it lists none. A
  listed index that is not visible, or KIND_GPU on a machine with no GPU, fails the load.
- `KIND_CPU`: `count` instances with no GPU; listing `gpus` with it is an error.
- `KIND_AUTO` (also what no instance_group means): KIND_GPU when a GPU is visible, else KIND_CPU.
- `KIND_MODEL`: `count` instances; the model places itself (no device is assigned).

Devices, as `gpus` indexes them: the GPUs in NVML's order, where a GPU in MIG mode is replaced by its MIG
slices (each slice is one device, as CUDA enumerates them), filtered and reordered by the server's own
CUDA_VISIBLE_DEVICES when set (indices, `GPU-…` / `MIG-…` UUIDs or unique UUID prefixes; as in CUDA, the
first entry that names nothing ends the list). A worker is given its device by UUID in CUDA_VISIBLE_DEVICES,
so inside the worker it is always CUDA ordinal 0, whatever the enumeration order.

Memory budget at load: each GPU instance declares what it needs (`memory_per_instance`, from the config's
`kernelport.gpu_memory_bytes` parameter or an estimate), and a device's instances must fit in its free memory
less what loads still in progress have reserved on it (`DeviceMemoryLedger`); otherwise `DeviceMemoryError`
(RESOURCE_EXHAUSTED) names the model, the device, what is needed and what is available.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kernelport.errors import ConfigError, KernelPortError

__all__ = [
    "DeviceMemoryError",
    "DeviceMemoryLedger",
    "DeviceSlot",
    "PlacementError",
    "WorkerPlacement",
    "estimate_instance_memory",
    "format_bytes",
    "parse_byte_size",
    "place_instances",
    "visible_slots",
]

GPU, CPU, MODEL = "gpu", "cpu", "model"
DEFAULT_CONTEXT_BYTES = 512 << 20  # a CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack
MEMORY_PARAMETER = "kernelport.gpu_memory_bytes"
CONTEXT_PARAMETER = "kernelport.gpu_context_bytes"


class PlacementError(ConfigError):
    """The config's instance_group cannot be placed on this machine's devices."""


class DeviceMemoryError(KernelPortError):
    """A model's instances do not fit in a device's free memory."""

    grpc_code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class DeviceSlot:
    """One device a worker can be given: a whole GPU, or one MIG slice of a GPU in MIG mode."""

    index: int  # position among the visible devices: what `gpus: [...]` refers to
    uuid: str  # "GPU-…" or "MIG-…": what the worker's CUDA_VISIBLE_DEVICES holds
    gpu_index: int  # the physical GPU (NVML index)
    gpu_uuid: str
    name: str
    total_memory: int
    free_memory: int
    mig: bool = False

    def label(self) -> str:
        kind = f"MIG slice {self.uuid} of GPU {self.gpu_index}" if self.mig else f"GPU {self.gpu_index} ({self.uuid})"
        return f"device {self.index}: {kind}" if self.index != self.gpu_index or self.mig else kind


@dataclass(frozen=True)
class WorkerPlacement:
    instance: int  # the worker's index in the model
    group: str  # the instance_group's name (or "instance_group[i]")
    kind: str  # "gpu", "cpu" or "model"
    device: DeviceSlot | None = None
    memory_bytes: int = 0  # budgeted on the device

    @property
    def ordinal(self) -> int | None:
        """The CUDA ordinal inside the worker (its only visible device), None without a device."""
        return 0 if self.device is not None else None

    @property
    def device_name(self) -> str:
        return "cuda:0" if self.device is not None else "cpu"

    def env(self) -> dict[str, str]:
        """What the worker's environment must hold before it imports a framework."""
        if self.device is None:
            return {}
        return {"CUDA_VISIBLE_DEVICES": self.device.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "KERNELPORT_DEVICE_UUID": self.device.uuid, "KERNELPORT_DEVICE_INDEX": str(self.device.index)}


def _slots_of(inventory: Sequence[Mapping[str, Any]]) -> list[DeviceSlot]:
    slots: list[DeviceSlot] = []
    for gpu in sorted(inventory, key=lambda d: int(d["index"])):
        index, uuid = int(gpu["index"]), str(gpu["uuid"])
        name = str(gpu.get("name", ""))
        migs = list(gpu.get("mig") or ())
        if gpu.get("mig_enabled", bool(migs)):
            for m in migs:  # a GPU in MIG mode runs CUDA work only inside its slices
                slots.append(DeviceSlot(len(slots), str(m["uuid"]), index, uuid, name, int(m["total_memory"]),
                                        int(m["free_memory"]), mig=True))
            continue
        slots.append(DeviceSlot(len(slots), uuid, index, uuid, name, int(gpu["total_memory"]),
                                int(gpu["free_memory"])))
    return slots


def visible_slots(inventory: Sequence[Mapping[str, Any]], visible: str | None = None) -> list[DeviceSlot]:
    """The devices `gpus` indexes, after the server's CUDA_VISIBLE_DEVICES (`visible`; None: not set)."""
    slots = _slots_of(inventory)
    if visible is None:
        return slots
    chosen: list[DeviceSlot] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if not entry:
            break
        matches: list[DeviceSlot]
        if entry.lstrip("-").isdigit():
            n = int(entry)
            matches = [s for s in slots if s.gpu_index == n]  # a MIG-mode GPU by index: all its slices
        else:
            matches = [s for s in slots if s.uuid == entry]
            if not matches:
                prefix = [s for s in slots if s.uuid.startswith(entry) or s.gpu_uuid.startswith(entry)]
                uuids = {s.gpu_uuid if not s.uuid.startswith(entry) else s.uuid for s in prefix}
                matches = prefix if len(uuids) == 1 else []  # an ambiguous prefix names nothing
        matches = [s for s in matches if s not in chosen]
        if not matches:
            break  # CUDA ignores every entry after the first invalid one
        chosen.extend(matches)
    return [DeviceSlot(i, s.uuid, s.gpu_index, s.gpu_uuid, s.name, s.total_memory, s.free_memory, s.mig)
            for i, s in enumerate(chosen)]


def _group_name(g: Any, i: int) -> str:
    return str(getattr(g, "name", "") or f"instance_group[{i}]")


def place_instances(
    model: str,
    groups: Sequence[Any],
    inventory: Sequence[Mapping[str, Any]],
    *,
    visible: str | None = None,
    memory_per_instance: int = 0,
    reserved: Mapping[str, int] | None = None,
    no_gpu_reason: str = "",
) -> list[WorkerPlacement]:
    """One WorkerPlacement per worker. `groups`: the parsed instance groups (kind, count, gpus, name;
    `kernelport.repository.InstanceGroupSpec`); none means one KIND_AUTO instance. `reserved`: bytes already
    promised on each device (by UUID) to loads in progress. `no_gpu_reason`: why the inventory is empty,
    for the KIND_GPU error."""
    if not groups:
        groups = (_AutoGroup(),)
    slots = visible_slots(inventory, visible)
    placements: list[WorkerPlacement] = []
    for i, g in enumerate(groups):
        name = _group_name(g, i)
        where = f"model '{model}' instance_group '{name}'"
        kind = str(g.kind)
        count = int(g.count) or 1
        if count < 1:
            raise PlacementError(f"{where}: count must be >= 1, got {count}")
        gpus = tuple(int(d) for d in (g.gpus or ()))
        if kind == "KIND_AUTO":
            kind = "KIND_GPU" if slots else "KIND_CPU"
            if kind == "KIND_CPU":
                gpus = ()  # KIND_AUTO on a machine without a GPU: the listed GPUs do not apply
        if kind == "KIND_GPU":
            if not slots:
                why = "CUDA_VISIBLE_DEVICES hides them" if inventory else no_gpu_reason
                raise PlacementError(f"{where}: KIND_GPU asked, but no GPU is visible to the server"
                                     + (f" ({why})" if why else ""))
            for d in gpus:
                if not 0 <= d < len(slots):
                    have = ", ".join(s.uuid for s in slots)
                    raise PlacementError(f"{where}: gpus lists device {d}, but the visible devices are "
                                         f"0..{len(slots) - 1} ({have})")
            for d in gpus or range(len(slots)):
                for _ in range(count):
                    placements.append(WorkerPlacement(len(placements), name, GPU, slots[d], memory_per_instance))
        elif kind in ("KIND_CPU", "KIND_MODEL"):
            if gpus:
                raise PlacementError(f"{where}: {kind} does not take gpus (got {list(gpus)}); use KIND_GPU")
            for _ in range(count):
                placements.append(WorkerPlacement(len(placements), name, CPU if kind == "KIND_CPU" else MODEL))
        else:
            raise PlacementError(f"{where}: unknown kind {kind}")
    check_budget(model, placements, reserved or {})
    return placements


@dataclass(frozen=True)
class _AutoGroup:
    name: str = ""
    kind: str = "KIND_AUTO"
    count: int = 1
    gpus: tuple[int, ...] = ()


def check_budget(model: str, placements: Sequence[WorkerPlacement], reserved: Mapping[str, int]) -> None:
    """DeviceMemoryError unless every device's instances fit in its free memory less `reserved`."""
    need: dict[str, int] = {}
    count: dict[str, int] = {}
    slot: dict[str, DeviceSlot] = {}
    for p in placements:
        if p.device is None or p.memory_bytes <= 0:
            continue
        u = p.device.uuid
        need[u] = need.get(u, 0) + p.memory_bytes
        count[u] = count.get(u, 0) + 1
        slot[u] = p.device
    for u, needed in need.items():
        s = slot[u]
        held = int(reserved.get(u, 0))
        available = max(0, s.free_memory - held)
        if needed > available:
            others = f", {format_bytes(held)} of it promised to models still loading" if held else ""
            raise DeviceMemoryError(
                f"model '{model}' does not fit on {s.label()}: its {count[u]} instance(s) need "
                f"{format_bytes(needed)}, {format_bytes(available)} is available "
                f"({format_bytes(s.free_memory)} free of {format_bytes(s.total_memory)}{others})")


class DeviceMemoryLedger:
    """Memory promised to loads in progress, per device UUID, so that two models loading at once cannot
    both count the same free memory. A promise ends when its load ends (the memory is then in use, and NVML's
    free figure shows it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, dict[str, int]] = {}
        self._next = 1

    def reserved(self) -> dict[str, int]:
        with self._lock:
            return self._sum()

    def _sum(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for per in self._held.values():
            for u, n in per.items():
                total[u] = total.get(u, 0) + n
        return total

    def place(self, model: str, groups: Sequence[Any], inventory: Sequence[Mapping[str, Any]], *,
              visible: str | None = None, memory_per_instance: int = 0,
              no_gpu_reason: str = "") -> tuple[int, list[WorkerPlacement]]:
        """`place_instances` against what others hold, then hold this load's share; returns (token, placements)."""
        with self._lock:
            placements = place_instances(model, groups, inventory, visible=visible,
                                         memory_per_instance=memory_per_instance, reserved=self._sum(),
                                         no_gpu_reason=no_gpu_reason)
            per: dict[str, int] = {}
            for p in placements:
                if p.device is not None and p.memory_bytes > 0:
                    per[p.device.uuid] = per.get(p.device.uuid, 0) + p.memory_bytes
            token = self._next
            self._next += 1
            if per:
                self._held[token] = per
            return token, placements

    def release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)


LEDGER = DeviceMemoryLedger()  # the server process's


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}


def parse_byte_size(text: str, what: str) -> int:
    """"512MiB", "2 GiB", "1000000" -> bytes; ConfigError naming `what` otherwise."""
    s = text.strip().lower().replace(" ", "")
    digits = len(s) - len(s.lstrip("0123456789."))
    number, unit = s[:digits], s[digits:]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value < 0 or unit not in _UNITS:
        raise ConfigError(f"{what}: expected a byte size such as 4GiB or 512MiB, got {text!r}")
    return int(value * _UNITS[unit])


def estimate_instance_memory(model: str, parameters: Mapping[str, str], model_file_bytes: int) -> int:
    """Device memory one GPU instance is budgeted: the config's `kernelport.gpu_memory_bytes` when set,
    else a CUDA context (`kernelport.gpu_context_bytes`, 512 MiB) plus twice the model file (the weights,
    and as much again for activations and workspaces). An estimate: the parameter is the way to be exact."""
    if MEMORY_PARAMETER in parameters:
        return parse_byte_size(parameters[MEMORY_PARAMETER], f"model '{model}' parameter '{MEMORY_PARAMETER}'")
    context = DEFAULT_CONTEXT_BYTES
    if CONTEXT_PARAMETER in parameters:
        context = parse_byte_size(parameters[CONTEXT_PARAMETER], f"model '{model}' parameter '{CONTEXT_PARAMETER}'")
    return context + 2 * max(0, model_file_bytes)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def server_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class GroupView:
    """An instance_group read straight from the config message (before the config is completed)."""

    name: str
    kind: str
    count: int
    gpus: tuple[int, ...]


def groups_from_config(config: Any) -> list[GroupView]:
    """The `instance_group` entries of an `inference.ModelConfig` message, kinds by name."""
    out = []
    for g in config.instance_group:
        kinds = g.DESCRIPTOR.enum_types_by_name["Kind"].values_by_number
        kind = kinds[g.kind].name if g.kind in kinds else str(g.kind)
        out.append(GroupView(g.name, kind, int(g.count) or 1, tuple(int(d) for d in g.gpus)))
    return out


def path_bytes(path: str) -> int:
    """Size of a model file, or of every file under a model directory (a SavedModel)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
