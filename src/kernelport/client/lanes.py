"""What every client of the lanes shares: the local client, and the server's own data plane (gRPC).

`ModelInfo` says what a model takes, `validate_inputs` checks a request against it, and `LaneView`
runs one request on a mapped lane: claim rows, write inputs, commit, wait, read outputs, release.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import _kpcore
from kernelport.client import bytes_codec
from kernelport.errors import (
    InferFailedError,
    InferTimeoutError,
    InvalidInputError,
    ModelNotReadyError,
    QueueFullError,
    RequestCancelledError,
)
from kernelport.repository.dtypes import datatype_to_numpy

# Owner ids 0 (nobody) and 1 (the server's own data plane) are reserved; clients get 2 and up.
SERVER_OWNER = 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # KServe name: "FP32", "INT64", ...
    dims: tuple[int, ...]  # per sample (no batch dim); -1 = any
    optional: bool = False
    capacity: int = 0  # BYTES tensors in a lane: bytes per element (see bytes_codec)

    @property
    def is_bytes(self) -> bool:
        return self.datatype == "BYTES"

    @property
    def row_bytes(self) -> int:
        n = math.prod(self.dims)
        return n * (4 + self.capacity) if self.is_bytes else n * self.dtype.itemsize

    @property
    def dtype(self) -> np.dtype:
        dt = datatype_to_numpy(self.datatype)
        if dt is None:
            raise InvalidInputError(f"tensor '{self.name}': datatype {self.datatype} is not supported on lanes")
        return np.dtype(dt)

    def describe(self, batching: bool) -> str:
        dims = ([-1] if batching else []) + list(self.dims)
        return f"{self.datatype} [{','.join(str(d) for d in dims)}]"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    platform: str = ""
    versions: tuple[str, ...] = ("1",)
    queue_timeout_us: int = 0  # dynamic_batching.default_queue_policy (REJECT): 0 = none
    allow_timeout_override: bool = False
    priority_levels: int = 0  # dynamic_batching.priority_levels (0: none)
    default_priority: int = 0
    # dynamic_batching.priority_queue_policy, as (level, timeout_us, allow_timeout_override)
    level_queue: tuple[tuple[int, int, bool], ...] = ()
    client_spin_us: float | None = None  # the model's hint for how long a waiting client stays awake

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def to_dict(self) -> dict[str, Any]:
        def t(x: TensorInfo) -> dict[str, Any]:
            return {"name": x.name, "datatype": x.datatype, "dims": list(x.dims), "optional": x.optional}

        return {
            "name": self.name,
            "max_batch_size": self.max_batch_size,
            "inputs": [t(x) for x in self.inputs],
            "outputs": [t(x) for x in self.outputs],
            "platform": self.platform,
            "versions": list(self.versions),
            "queue_timeout_us": self.queue_timeout_us,
            "allow_timeout_override": self.allow_timeout_override,
            "priority_levels": self.priority_levels,
            "default_priority": self.default_priority,
            "level_queue": [list(x) for x in self.level_queue],
            "client_spin_us": self.client_spin_us,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        def t(x: Mapping[str, Any]) -> TensorInfo:
            return TensorInfo(str(x["name"]), str(x["datatype"]), tuple(int(v) for v in x["dims"]),
                              bool(x.get("optional", False)))

        return cls(
            name=str(d["name"]),
            max_batch_size=int(d["max_batch_size"]),
            inputs=tuple(t(x) for x in d["inputs"]),
            outputs=tuple(t(x) for x in d["outputs"]),
            platform=str(d.get("platform", "")),
            versions=tuple(str(v) for v in d.get("versions", ["1"])),
            queue_timeout_us=int(d.get("queue_timeout_us", 0)),
            allow_timeout_override=bool(d.get("allow_timeout_override", False)),
            priority_levels=int(d.get("priority_levels", 0)),
            default_priority=int(d.get("default_priority", 0)),
            level_queue=tuple((int(x[0]), int(x[1]), bool(x[2])) for x in d.get("level_queue", ())),
            client_spin_us=None if d.get("client_spin_us") is None else float(d["client_spin_us"]),
        )

    def level(self, priority: int) -> int:
        """The priority level a request's `priority` runs at: 0 (or above the levels) means the default
        level, as in Triton; 0 for a model without levels."""
        if not self.priority_levels:
            return 0
        if priority <= 0 or priority > self.priority_levels:
            return self.default_priority
        return priority

    def queue_timeout(self, requested: float | None, level: int = 0) -> float:
        """Seconds a request may wait to be taken (0: no limit): the policy's default (its level's, where
        priority_queue_policy names the level), or the request's own when the policy allows it."""
        timeout_us, allow = self.queue_timeout_us, self.allow_timeout_override
        for lv, t, a in self.level_queue:
            if lv == level:
                timeout_us, allow = t, a
        if requested is not None and allow:
            return max(0.0, requested)
        return timeout_us / 1e6


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def validate_inputs(
    info: ModelInfo, inputs: Mapping[str, np.ndarray]
) -> tuple[int, tuple[tuple[int, ...], ...], list[np.ndarray], tuple[int, ...]]:
    """Check a request against the model. Returns (batch size, per-sample shape of every input in
    model order, the arrays in model order, the lane capacity of every BYTES input (0 for others)).
    Raises InvalidInputError naming model, input, expected and received."""
    m = info.name
    known = {t.name for t in info.inputs}
    for name in inputs:
        if name not in known:
            raise InvalidInputError(
                f"model '{m}': unknown input '{name}' (inputs are: {', '.join(t.name for t in info.inputs)})")
    batch: int | None = None
    shapes: list[tuple[int, ...]] = []
    arrays: list[np.ndarray] = []
    caps: list[int] = []
    for t in info.inputs:
        if t.name not in inputs:
            if t.optional:
                raise InvalidInputError(
                    f"model '{m}': optional input '{t.name}' must be given on this path (not supported yet)")
            raise InvalidInputError(f"model '{m}': missing input '{t.name}'")
        a = inputs[t.name]
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        want = t.dtype
        got_type = _datatype_name(a.dtype)
        if t.is_bytes and a.dtype.kind in "OSU":
            a = bytes_codec.as_bytes_elements(a)
            if info.platform.startswith("onnxruntime") and not bytes_codec.all_utf8(a):
                # ONNX Runtime's Python API carries string tensors as str: only UTF-8 survives
                raise InvalidInputError(f"model '{m}' input '{t.name}': ONNX Runtime string tensors must be "
                                        f"valid UTF-8")
            cap = bytes_codec.max_element_length(a)
            if cap > bytes_codec.MAX_CAPACITY:
                raise InvalidInputError(f"model '{m}' input '{t.name}': BYTES element of {cap} bytes is too long "
                                        f"(at most {bytes_codec.MAX_CAPACITY})")
            caps.append(bytes_codec.capacity_for(cap))
        elif a.dtype != want:
            raise InvalidInputError(
                f"model '{m}' input '{t.name}': expected {t.describe(info.batching)}, "
                f"got {got_type} {_shape_str(a.shape)}")
        else:
            caps.append(0)
        if info.batching:
            if a.ndim != len(t.dims) + 1:
                raise InvalidInputError(
                    f"model '{m}' input '{t.name}': expected {t.describe(True)}, got {got_type} {_shape_str(a.shape)}")
            n = int(a.shape[0])
            sample = tuple(int(d) for d in a.shape[1:])
            if n < 1:
                raise InvalidInputError(f"model '{m}' input '{t.name}': batch size must be at least 1, got {n}")
            if n > info.max_batch_size:
                raise InvalidInputError(
                    f"model '{m}' input '{t.name}': batch size {n} exceeds max_batch_size {info.max_batch_size}")
            if batch is None:
                batch = n
            elif n != batch:
                raise InvalidInputError(
                    f"model '{m}' input '{t.name}': batch size {n} differs from the other inputs' {batch}")
        else:
            sample = tuple(int(d) for d in a.shape)
            if len(sample) != len(t.dims):
                raise InvalidInputError(
                    f"model '{m}' input '{t.name}': expected {t.describe(False)}, got {got_type} {_shape_str(a.shape)}")
        for want_d, got_d in zip(t.dims, sample):
            if (want_d >= 0 and want_d != got_d) or got_d < 1:
                raise InvalidInputError(
                    f"model '{m}' input '{t.name}': expected {t.describe(info.batching)}, "
                    f"got {got_type} {_shape_str(a.shape)}")
        shapes.append(sample)
        arrays.append(a)
    return (batch or 1), tuple(shapes), arrays, tuple(caps)


def check_outputs(info: ModelInfo, outputs: Sequence[str]) -> None:
    known = {t.name for t in info.outputs}
    for o in outputs:
        if o not in known:
            raise InvalidInputError(f"model '{info.name}': unknown output '{o}'")


def _datatype_name(dt: np.dtype) -> str:
    from kernelport.repository.dtypes import numpy_to_datatype

    try:
        return numpy_to_datatype(dt) or str(dt)
    except Exception:
        return str(dt)


@dataclass(frozen=True)
class LaneLayout:
    """One lane's shape: what the server announces and every mapper checks against the header."""

    lane_id: int
    nslots: int
    max_batch: int  # rows per slot; 1 for models without batching
    batching: bool
    tensors: tuple[TensorInfo, ...]  # inputs first (dims fully resolved), then outputs
    n_inputs: int
    size: int = 0
    memory: str = "host"  # where the rows live: "host" shared memory (pinned or device memory come later)
    priority: int = 0  # scheduling (see kernelport.server.scheduling): the level, 1 runs first
    share_class: int = 0  # the tenant class it counts against
    weight: int = 1
    # per tensor: the index of the input whose rows it shares, -1 for its own rows (empty: none shared).
    # An output the model passes through unchanged (ONNX Identity of an input) is read from its input's
    # rows: the backend is bound to write it there, which costs nothing, so it takes no lane memory.
    aliases: tuple[int, ...] = ()

    def alias_of(self, i: int) -> int:
        return self.aliases[i] if self.aliases else -1

    @property
    def row_bytes(self) -> list[int]:
        return [0 if self.alias_of(i) >= 0 else t.row_bytes for i, t in enumerate(self.tensors)]

    def required_size(self) -> int:
        return int(_kpcore.Lane.required_size(self.nslots, self.max_batch, self.row_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "lane_id": self.lane_id, "nslots": self.nslots, "max_batch": self.max_batch,
            "batching": self.batching, "n_inputs": self.n_inputs, "size": self.size, "memory": self.memory,
            "priority": self.priority, "share_class": self.share_class, "weight": self.weight,
            "tensors": [{"name": t.name, "datatype": t.datatype, "dims": list(t.dims), "capacity": t.capacity}
                        for t in self.tensors],
            "aliases": list(self.aliases),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LaneLayout:
        tensors = tuple(TensorInfo(str(t["name"]), str(t["datatype"]), tuple(int(x) for x in t["dims"]),
                                   capacity=int(t.get("capacity", 0)))
                        for t in d["tensors"])
        memory = str(d.get("memory", "host"))
        if memory != "host":
            raise ValueError(f"lane rows in {memory!r} memory are not supported by this client")
        n_inputs = int(d["n_inputs"])
        aliases = tuple(int(a) for a in d.get("aliases") or ())
        if aliases:
            check_aliases(tensors, n_inputs, aliases)
        return cls(int(d["lane_id"]), int(d["nslots"]), int(d["max_batch"]), bool(d["batching"]), tensors,
                   n_inputs, int(d["size"]), memory, int(d.get("priority", 0)),
                   int(d.get("share_class", 0)), int(d.get("weight", 1)), aliases)

def check_aliases(tensors: Sequence[TensorInfo], n_inputs: int, aliases: Sequence[int]) -> None:
    """A tensor may share only the rows of an input of its own type and per-sample shape; only outputs
    share, and BYTES tensors never (their rows hold encoded elements)."""
    if len(aliases) != len(tensors):
        raise ValueError("lane layout: one alias entry per tensor expected")
    for i, (t, a) in enumerate(zip(tensors, aliases)):
        if a < 0:
            continue
        src = tensors[a] if a < n_inputs else None
        if i < n_inputs or src is None or t.is_bytes or src.is_bytes or (t.datatype, tuple(t.dims)) != (
                src.datatype, tuple(src.dims)):
            raise ValueError(f"lane layout: tensor '{t.name}' cannot share the rows of tensor {a}")


class Cancellation:
    """A request's cancel switch, thrown from any thread (a gRPC callback when the call is cancelled or
    its deadline passes) while `LaneView.run` holds the request.

    Once the inputs are written, `cancel()` releases the request's rows at once: a request released
    before its batch is taken gives its queue place back and is never run (the take marks it
    CANCELLED); one released later has its result discarded. The running thread stops waiting
    within a wait slice (1 s) and raises RequestCancelledError. Never blocks: gRPC runs callbacks on
    its polling thread."""

    __slots__ = ("_lock", "_cancelled", "_held")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._held: tuple[Any, int, int, int, int] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            held, self._held = self._held, None
        if held is not None:
            lane, seq, row, n, owner = held
            try:
                lane.release(seq, row, n, owner)
            except _kpcore.LaneError:  # the worker gave the rows up already (abandoned, slot reused)
                pass

    def hold(self, lane: Any, seq: int, row: int, n: int, owner: int) -> bool:
        """The rows are written (nothing more will be written into them): from now on a cancel
        releases them. False when the request was cancelled already (the caller releases them)."""
        with self._lock:
            if self._cancelled:
                return False
            self._held = (lane, seq, row, n, owner)
            return True

    def drop(self) -> bool:
        """The wait is over. True when a cancel took the rows: the caller must not touch them."""
        with self._lock:
            self._held = None
            return self._cancelled

    def check(self) -> None:
        if self._cancelled:
            raise RequestCancelledError("the request was cancelled")


@dataclass
class LaneView:
    """A mapped lane plus numpy views of every slot's rows."""

    layout: LaneLayout
    lane: Any  # _kpcore.Lane
    views: list[list[np.ndarray]] = field(default_factory=list)  # [slot][tensor] -> [max_batch, *dims]

    @classmethod
    def attach(cls, layout: LaneLayout, segment: Any, doorbell: Any, init: bool = False) -> LaneView:
        lane = _kpcore.Lane(segment, doorbell, layout.nslots, layout.max_batch, layout.row_bytes, init=init)
        views: list[list[np.ndarray]] = []
        for slot in range(layout.nslots):
            per: list[np.ndarray] = []
            for i, (off, t) in enumerate(zip(lane.slot_offsets(slot), layout.tensors)):
                if layout.alias_of(i) >= 0:  # a pass-through output: its input's rows
                    per.append(per[layout.alias_of(i)])
                    continue
                if t.is_bytes:  # raw element areas: u32 length + capacity bytes each
                    arr = np.frombuffer(segment, dtype=np.uint8, count=layout.max_batch * t.row_bytes, offset=off)
                    per.append(arr.reshape((layout.max_batch, *t.dims, 4 + t.capacity)))
                    continue
                count = layout.max_batch * math.prod(t.dims)
                arr = np.frombuffer(segment, dtype=t.dtype, count=count, offset=off)
                per.append(arr.reshape((layout.max_batch, *t.dims)))
            views.append(per)
        return cls(layout, lane, views)

    def rows(self, seq: int, row: int, n: int) -> list[np.ndarray]:
        """Views of rows [row, row+n) of every tensor in the slot serving `seq`; without batching, the
        single row with the batch dim dropped."""
        per = self.views[seq % self.layout.nslots]
        if self.layout.batching:
            return [v[row:row + n] for v in per]
        return [v[0] for v in per]

    def claim(self, owner: int, n: int, timeout: float, model: str, queue_timeout: float = 0.0) -> tuple[int, int]:
        try:
            seq, row = self.lane.claim(n, owner, timeout, queue_timeout)
        except _kpcore.LaneFull:
            raise QueueFullError(f"model '{model}': the queue is full (max_queue_size)") from None
        except _kpcore.LaneTimeout:
            raise QueueFullError(f"model '{model}': no free batch slot within {timeout:.3f} s") from None
        except _kpcore.LaneDead:
            raise ModelNotReadyError(f"model '{model}' is not ready: its worker stopped") from None
        return int(seq), int(row)

    def wait(self, seq: int, row: int, n: int, owner: int, timeout: float, model: str,
             check_alive: Callable[[], None] | None, commit: bool) -> None:
        """Commit (if asked) and wait for the batch; raise on failure. On any failure the rows are
        released before the error propagates."""
        deadline = _kpcore.now_ns() + int(timeout * 1e9)
        lane = self.lane
        try:
            if commit:
                status = lane.commit_and_wait(seq, row, n, owner, min(timeout, 1.0))
            else:
                status = lane.wait(seq, min(timeout, 1.0), row)
        except _kpcore.LaneTimeout:
            status = None
        except _kpcore.LaneExpired:
            self._release_quietly(seq, row, n, owner)
            raise InferTimeoutError(f"model '{model}': request timed out in the queue and was not run") from None
        except _kpcore.LaneAbandoned:
            self._release_quietly(seq, row, n, owner)
            raise InferTimeoutError(f"model '{model}': request was not committed within the commit timeout") from None
        except _kpcore.LaneDead:
            self._release_quietly(seq, row, n, owner)
            raise ModelNotReadyError(f"model '{model}' is not ready: its worker stopped") from None
        while status is None:
            left = (deadline - _kpcore.now_ns()) / 1e9
            try:
                if check_alive is not None:
                    check_alive()
                if left <= 0:
                    raise InferTimeoutError(f"model '{model}': no response within {timeout:.3f} s")
                status = lane.wait(seq, min(left, 1.0), row)
            except _kpcore.LaneTimeout:
                continue
            except _kpcore.LaneExpired:
                self._release_quietly(seq, row, n, owner)
                raise InferTimeoutError(f"model '{model}': request timed out in the queue and was not run") from None
            except BaseException as e:
                self._release_quietly(seq, row, n, owner)
                if isinstance(e, _kpcore.LaneDead):
                    raise ModelNotReadyError(f"model '{model}' is not ready: its worker stopped") from None
                raise
        if status != 0:
            msg = lane.error_message(seq)
            self._release_quietly(seq, row, n, owner)
            raise InferFailedError(f"model '{model}': inference failed: {msg}")

    def _release_quietly(self, seq: int, row: int, n: int, owner: int) -> None:
        try:
            self.lane.release(seq, row, n, owner)
        except _kpcore.LaneError:
            pass

    def run(self, owner: int, arrays: Sequence[np.ndarray], n: int, timeout: float, model: str,
            wanted: Sequence[str] | None = None,
            check_alive: Callable[[], None] | None = None, queue_timeout: float = 0.0,
            cancel: Cancellation | None = None,
            output_sink: Callable[[str, np.ndarray], Any] | None = None, guard: bool = False,
            external: tuple[Any, int, Sequence[tuple[int, int, int]]] | None = None) -> dict[str, Any]:
        """One request, copying in and out. `cancel`: see Cancellation. `output_sink(name, rows)` gets each
        wanted non-BYTES output as a view of its rows, valid only during the call, and may take it
        itself (copy it where it is needed: one copy instead of two) by returning what the result should
        hold for it; None: the usual copy. `guard`: the inputs may be views of memory another process
        can truncate (a client's registered shared memory): copy them with a SIGBUS guard.
        `external` (server side): (table, entry, places) of a request whose tensors with a region in
        `places` stay in a client's region (kernelport.server.external): it takes a whole slot, those
        inputs are not copied and those outputs are neither copied nor returned."""
        claimed = n if external is None else self.layout.max_batch  # a whole slot: no one shares the batch
        in_region = () if external is None else tuple(place[0] != 0 for place in external[2])
        seq, row = self.claim(owner, claimed, timeout, model, queue_timeout)
        committed = False
        try:
            if external is not None and row != 0:
                raise _kpcore.LaneAbandoned("a whole-slot claim did not start the slot")
            dst = self.rows(seq, row, n)
            for i, (t, a) in enumerate(zip(self.layout.tensors, arrays)):
                if in_region and in_region[i]:
                    continue  # the worker reads it in the client's region
                if t.is_bytes:
                    bytes_codec.encode_into(dst[i], a)
                elif guard and a.flags.c_contiguous and a.dtype == dst[i].dtype and a.nbytes == dst[i].nbytes:
                    try:
                        _kpcore.guarded_copy(dst[i], a)
                    except _kpcore.SourceFault:
                        raise InvalidInputError(f"model '{model}' input '{t.name}': its shared memory shrank "
                                                "while it was read") from None
                else:
                    np.copyto(dst[i], a, casting="no")
            if external is not None:
                external[0].fill(external[1], self.layout.lane_id, seq, n, external[2])
            if cancel is not None:
                if not cancel.hold(self.lane, seq, row, claimed, owner):
                    raise RequestCancelledError(f"model '{model}': the request was cancelled")
                check_alive = _both(check_alive, cancel.check)
            committed = True
            self.wait(seq, row, claimed, owner, timeout, model, check_alive, commit=True)
        except BaseException:
            if cancel is not None and cancel.drop():
                if not committed:
                    self._release_quietly(seq, row, claimed, owner)
                raise RequestCancelledError(f"model '{model}': the request was cancelled") from None
            if not committed:
                self._release_quietly(seq, row, claimed, owner)
            raise
        if cancel is not None and cancel.drop():  # the rows were released under us: no result
            raise RequestCancelledError(f"model '{model}': the request was cancelled")
        k = self.layout.n_inputs
        out: dict[str, Any] = {}
        try:
            for j, (t, v) in enumerate(zip(self.layout.tensors[k:], dst[k:])):
                if in_region and in_region[k + j]:
                    continue  # the worker wrote it into the client's region
                if wanted is None or t.name in wanted:
                    if t.is_bytes:
                        out[t.name] = bytes_codec.decode(v, v.shape[:-1])
                        continue
                    taken = None if output_sink is None else output_sink(t.name, v)
                    out[t.name] = v.copy() if taken is None else taken
        finally:
            self.lane.release(seq, row, claimed, owner)
        return out


def _both(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    if first is None:
        return second

    def check() -> None:
        first()
        second()

    return check


def lane_key(shapes: tuple[tuple[int, ...], ...], capacities: tuple[int, ...] = (), prefix: str = "") -> str:
    """A lane's key: its scheduling class (`prefix`), per-sample shapes and BYTES capacities."""
    key = prefix + ";".join("x".join(str(d) for d in s) for s in shapes)
    return key + ("|" + ",".join(str(c) for c in capacities) if any(capacities) else "")
