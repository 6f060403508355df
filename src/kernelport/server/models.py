"""One served model in the server process: its worker processes, its doorbell and its lanes.

The server never imports a framework: the worker loads the model and reports what it takes; the
config is completed from that report here.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any

import _kpcore
from kernelport.client.lanes import LaneLayout, LaneView, ModelInfo, TensorInfo, lane_key
from kernelport.errors import ConfigError, InvalidInputError, KernelPortError, ModelNotReadyError
from kernelport.repository import ModelEntry, ModelSpec, TensorSig, complete_config

log = logging.getLogger("kernelport.server")

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
UNLOADING = "UNLOADING"
LANE_COUNTERS = ("claims", "batches", "rows", "client_sleeps", "worker_sleeps", "commit_timeouts", "full_waits",
                 "abandoned_rows", "failed_batches")


@dataclass
class ServerOptions:
    repository: str
    socket_path: str
    commit_timeout: float = 0.1  # seconds a claimed row may stay uncommitted before its batch goes on
    lane_slots: int = 4
    max_lanes_per_model: int = 16
    load_timeout: float = 300.0
    log_level: str = "INFO"
    allow_other_users: bool = False


class WorkerError(KernelPortError):
    grpc_code = "UNAVAILABLE"


class WorkerHandle:
    """The server's end of one worker: the process and its control pipe (request/response)."""

    def __init__(self, process: Any, conn: Connection, index: int) -> None:
        self.process = process
        self.conn = conn
        self.index = index
        self.lock = threading.Lock()
        self.bell: Any = None  # rung after each control message once the worker serves

    def call(self, msg: tuple[Any, ...], fds: tuple[int, ...] = (), timeout: float = 30.0) -> Any:
        with self.lock:
            try:
                self.conn.send(msg)
                for fd in fds:
                    send_handle(self.conn, fd, self.process.pid)
                if self.bell is not None:
                    self.bell.ring_control()
                if not self.conn.poll(timeout):
                    raise WorkerError(f"worker {self.index} did not answer within {timeout:.0f} s")
                kind, payload = self.conn.recv()
            except (EOFError, OSError) as e:
                raise WorkerError(f"worker {self.index} is gone") from e
        if kind == "error":
            raise WorkerError(str(payload))
        return payload

    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.is_alive():
            try:
                self.call(("stop",), timeout=timeout)
            except KernelPortError:
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


@dataclass
class LaneEntry:
    layout: LaneLayout
    segment: Any
    view: LaneView
    last_used: float = 0.0


def batch_policy(spec: ModelSpec, commit_timeout: float) -> dict[str, Any]:
    """The worker's batching policy from the config (Triton's meanings)."""
    if spec.dynamic_batching:
        window = spec.max_queue_delay_us / 1e6
        close_at = max(spec.preferred_batch_sizes) if spec.preferred_batch_sizes else spec.max_batch_size
    else:
        # no dynamic batching: each request runs as it comes
        window = 0.0
        close_at = 1
    return {"window": window, "close_at": max(1, close_at), "commit_timeout": commit_timeout}


class ModelRuntime:
    def __init__(self, entry: ModelEntry, options: ServerOptions) -> None:
        self.entry = entry
        self.name = entry.name
        self.options = options
        self.state = LOADING
        self.reason = ""
        self.spec: ModelSpec | None = None
        self.info: ModelInfo | None = None
        self.workers: list[WorkerHandle] = []
        self.doorbell: Any = None
        self.stats: Any = None  # _kpcore.StatsBlock, kept by the workers
        self.lanes: dict[str, LaneEntry] = {}
        self.lock = threading.Lock()
        self.next_lane_id = 1
        self.framework = ""
        self.device = ""
        self.load_seconds = 0.0

    # ---- load / unload ----

    def load(self) -> None:
        t0 = time.monotonic()
        try:
            self._load()
        except BaseException as e:
            self.state = UNAVAILABLE
            self.reason = str(e)
            self._stop_workers()
            raise
        self.load_seconds = time.monotonic() - t0
        self.state = READY
        assert self.spec is not None
        log.info("loaded model '%s' (%s %s on %s, %d instance%s, max_batch_size %d) in %.2f s",
                 self.name, self.entry.platform, self.framework, self.device, len(self.workers),
                 "" if len(self.workers) == 1 else "s", self.spec.max_batch_size, self.load_seconds)

    def _load(self) -> None:
        entry = self.entry
        platform = entry.platform
        model_path = entry.model_file()
        config_bytes = entry.config.SerializeToString()
        count = 1
        if entry.has_config and len(entry.config.instance_group):
            count = sum(max(1, g.count) * max(1, len(g.gpus)) for g in entry.config.instance_group)
        ctx = multiprocessing.get_context("spawn")
        from kernelport.workers.main import worker_main

        for i in range(count):
            parent, child = ctx.Pipe(duplex=True)
            params = {
                "model": self.name, "platform": platform, "model_path": model_path, "config": config_bytes,
                "config_source": os.path.join(entry.path, "config.pbtxt"), "instance": i,
                "log_level": self.options.log_level,
            }
            p = ctx.Process(target=worker_main, args=(child, params), name=f"kp-{self.name}-{i}", daemon=True)
            p.start()
            child.close()
            self.workers.append(WorkerHandle(p, parent, i))
        reports = []
        for w in self.workers:
            if not w.conn.poll(self.options.load_timeout):
                raise WorkerError(f"model '{self.name}': worker did not load within {self.options.load_timeout:.0f} s")
            try:
                kind, payload = w.conn.recv()
            except EOFError:
                raise WorkerError(f"model '{self.name}': worker exited while loading") from None
            if kind != "loaded":
                raise WorkerError(f"model '{self.name}': {payload}")
            reports.append(payload)
        rep = reports[0]
        self.framework = rep["framework"]
        self.device = rep["device"]
        ins = [TensorSig(t["name"], t["datatype"], tuple(t["shape"])) for t in rep["inputs"]]
        outs = [TensorSig(t["name"], t["datatype"], tuple(t["shape"])) for t in rep["outputs"]]
        can_batch = all(len(t.shape) > 0 and t.shape[0] == -1 for t in ins + outs)
        config = complete_config(entry.config, ins, outs, can_batch, model_name=self.name)
        spec = ModelSpec.from_proto(config, source=os.path.join(entry.path, "config.pbtxt"), model_name=self.name)
        self.spec = spec
        self.info = ModelInfo(
            name=self.name,
            max_batch_size=spec.max_batch_size,
            inputs=tuple(TensorInfo(t.name, t.datatype, t.dims, t.optional) for t in spec.inputs),
            outputs=tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.outputs),
            platform=spec.platform or entry.platform,
            versions=tuple(str(v) for v in entry.selected_versions),
        )
        for t in spec.inputs + spec.outputs:
            if t.dtype is None or t.datatype == "BYTES":
                raise ConfigError(f"model '{self.name}': tensor '{t.name}' of type {t.datatype} "
                                  f"is not supported on lanes yet")
            if t.reshape is not None:
                raise ConfigError(f"model '{self.name}': tensor '{t.name}': reshape is not supported yet")
        seg = _kpcore.Segment.create(_kpcore.DOORBELL_BYTES, f"kp-{self.name}-bell")
        self.doorbell = _kpcore.Doorbell(seg, init=True)
        max_rows = max(1, spec.max_batch_size)
        stats_seg = _kpcore.Segment.create(_kpcore.StatsBlock.required_size(max_rows), f"kp-{self.name}-stats")
        self.stats = _kpcore.StatsBlock(stats_seg, max_rows, init=True)
        policy = batch_policy(spec, self.options.commit_timeout)
        policy.update(_policy_overrides(spec.parameters))
        for w in self.workers:
            fds = (seg.dup_fd(), stats_seg.dup_fd())
            try:
                w.call(("start", {"policy": policy, "batching": spec.max_batch_size > 0, "max_rows": max_rows,
                                  "stats_size": stats_seg.size}), fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            w.bell = self.doorbell

    def unload(self) -> None:
        self.state = UNLOADING
        self._stop_workers()
        self.state = UNAVAILABLE
        self.reason = "unloaded"

    def _stop_workers(self) -> None:
        with self.lock:
            for lane in self.lanes.values():
                lane.view.lane.set_status(_kpcore.LANE_DEAD)
            self.lanes.clear()
        for w in self.workers:
            w.stop()
        self.workers = []

    def worker_died(self, w: WorkerHandle) -> None:
        """A worker exited on its own: fail everything it held, at once."""
        code = w.process.exitcode
        log.error("model '%s': worker %d exited (code %s); the model is unavailable", self.name, w.index, code)
        self.state = UNAVAILABLE
        self.reason = f"worker exited with code {code}"
        with self.lock:
            for lane in self.lanes.values():
                lane.view.lane.set_status(_kpcore.LANE_DEAD)
            self.lanes.clear()

    # ---- lanes ----

    def require_ready(self) -> ModelInfo:
        if self.state != READY or self.info is None:
            raise ModelNotReadyError(f"model '{self.name}' is not ready" + (f": {self.reason}" if self.reason else ""))
        return self.info

    def lane_for(self, shapes: tuple[tuple[int, ...], ...]) -> LaneEntry:
        """The lane for these per-sample input shapes, created on first use."""
        info = self.require_ready()
        key = lane_key(shapes)
        with self.lock:
            entry = self.lanes.get(key)
            if entry is not None:
                entry.last_used = time.monotonic()
                return entry
            if len(self.lanes) >= self.options.max_lanes_per_model:
                raise InvalidInputError(
                    f"model '{self.name}': too many distinct input shapes in use "
                    f"(at most {self.options.max_lanes_per_model})")
            entry = self._create_lane(info, shapes)
            self.lanes[key] = entry
            return entry

    def _output_dims(self, info: ModelInfo, shapes: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
        if all(d >= 0 for t in info.outputs for d in t.dims):
            return [t.dims for t in info.outputs]
        full = {t.name: ((1,) if info.batching else ()) + s for t, s in zip(info.inputs, shapes)}
        got = self.workers[0].call(("shapes", {k: list(v) for k, v in full.items()}))
        dims = []
        for t in info.outputs:
            shape = tuple(int(d) for d in got[t.name])
            dims.append(shape[1:] if info.batching else shape)
        return dims

    def _create_lane(self, info: ModelInfo, shapes: tuple[tuple[int, ...], ...]) -> LaneEntry:
        out_dims = self._output_dims(info, shapes)
        tensors = tuple(TensorInfo(t.name, t.datatype, s) for t, s in zip(info.inputs, shapes))
        tensors += tuple(TensorInfo(t.name, t.datatype, d) for t, d in zip(info.outputs, out_dims))
        lane_id = self.next_lane_id
        self.next_lane_id += 1
        max_batch = info.max_batch_size if info.batching else 1
        nslots = int(self.spec.parameters.get("kernelport.lane_slots", self.options.lane_slots)) if self.spec else 4
        layout = LaneLayout(lane_id, max(2, nslots), max_batch, info.batching, tensors, len(info.inputs))
        size = layout.required_size()
        layout = LaneLayout(lane_id, layout.nslots, max_batch, info.batching, tensors, len(info.inputs), size)
        log.debug("model '%s': lane %d for %s (%d bytes)", self.name, lane_id, shapes, size)
        seg = _kpcore.Segment.create(size, f"kp-{self.name}-lane{lane_id}")
        view = LaneView.attach(layout, seg, self.doorbell, init=True)
        for w in self.workers:
            fd = seg.dup_fd()
            try:
                w.call(("lane", layout.to_dict()), fds=(fd,))
            finally:
                os.close(fd)
        return LaneEntry(layout, seg, view, time.monotonic())

    def reclaim(self, owner: int) -> int:
        with self.lock:
            lanes = list(self.lanes.values())
        return sum(int(lane.view.lane.reclaim(owner)) for lane in lanes)

    def counters(self) -> dict[str, int]:
        total = dict.fromkeys(LANE_COUNTERS, 0)
        with self.lock:
            lanes = list(self.lanes.values())
        for lane in lanes:
            for k, v in lane.view.lane.counters().items():
                total[k] = total.get(k, 0) + int(v)
        return total


def _policy_overrides(params: dict[str, str]) -> dict[str, Any]:
    """Worker spin tuning from the config's parameters (kernelport.* keys)."""
    out: dict[str, Any] = {}
    for key, field_name, conv in (
        ("kernelport.idle_spin_microseconds", "idle_spin", lambda v: float(v) / 1e6),
        ("kernelport.commit_timeout_microseconds", "commit_timeout", lambda v: float(v) / 1e6),
    ):
        if key in params:
            try:
                out[field_name] = conv(params[key])
            except ValueError:
                raise ConfigError(f"parameter {key}: not a number: {params[key]!r}") from None
    return out


__all__ = ["LaneEntry", "ModelRuntime", "ServerOptions", "WorkerHandle", "batch_policy"]
