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

import numpy as np

import _kpcore
from kernelport.batching.presets import CLIENT_SPIN_PARAMETER, apply_preset, model_preset
from kernelport.client.bytes_codec import capacity_for
from kernelport.client.lanes import (
    SERVER_OWNER,
    LaneLayout,
    LaneView,
    ModelInfo,
    TensorInfo,
    lane_key,
    validate_inputs,
)
from kernelport.errors import ConfigError, InvalidInputError, KernelPortError, ModelNotReadyError
from kernelport.repository import (
    ModelEntry,
    ModelSpec,
    TensorSig,
    complete_config,
    config_type_to_datatype,
    config_type_to_numpy,
)
from kernelport.server.external import TABLE_BYTES, ExternalTable
from kernelport.server.scheduling import SchedulingPolicy, TenantClasses, check_tenant, sched_key
from kernelport.server.shm_registry import SharedMemoryRegion

log = logging.getLogger("kernelport.server")

DEFAULT_SHM_BIND_MIN_BYTES = 256 * 1024  # see _shm_bind_min_bytes

# How the server's own request handlers (gRPC, HTTP) wait for their batch: a short spin, then sleep; no
# yielding. Dozens of handler threads yielding on a few cores take the CPU the worker and the other handlers
# need: at 16 gRPC calls in flight on two cores, 6,300-6,400 add_sub/s against 5,000-5,500/s with the
# lanes' default (2,000 pauses, then 50 us of sched_yield), for ~10 us more at one call in flight
# (docs/benchmarks.md, 22:32). Local clients and workers keep their own settings.
SERVER_WAIT_SPIN = (200, 0.0)  # (pause iterations, seconds of sched_yield)

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
UNLOADING = "UNLOADING"
CRASH_WINDOW_S = 60.0
LOAD_PROGRESS_S = 10.0  # a line every this many seconds while a model's workers load
LANE_BYTES_BUDGET = 256 << 20  # a lane of large tensors gets fewer slots (but always 2)
LANE_COUNTERS = ("claims", "batches", "rows", "client_sleeps", "worker_sleeps", "commit_timeouts", "full_waits",
                 "abandoned_rows", "failed_batches", "expired_requests", "cancelled_requests")


@dataclass
class ServerOptions:
    repository: str
    socket_path: str
    commit_timeout: float = 0.5  # seconds a claimed row may stay uncommitted before its batch goes on
    lane_slots: int = 8
    max_lanes_per_model: int = 32
    load_timeout: float = 300.0
    log_level: str = "INFO"
    allow_other_users: bool = False
    exit_timeout: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    max_restarts: int = 5  # worker crashes within a minute before the server stops restarting a model
    restart_backoff: float = 0.25  # seconds before the first restart, doubled after each crash, at most 8 s
    # None: load every model at start and allow load/unload (KernelPort's default); "none": load every
    # model, refuse load/unload (Triton's default); "explicit": load `load_models` ("*": all) at start,
    # allow load/unload; "poll": load every model, rescan the repository every `poll_secs`, refuse load/unload
    model_control_mode: str | None = None
    load_models: tuple[str, ...] = ()
    poll_secs: float = 15.0
    preset: str | None = None  # "latency" | "throughput" (kernelport.batching.presets); a model's own wins


class WorkerError(KernelPortError):
    grpc_code = "UNAVAILABLE"


WORKER_CALL_TIMEOUT_S = 30.0


class _PendingLane:
    """A lane being mapped in the workers; requests for the same key wait on `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: LaneEntry | None = None
        self.error: BaseException | None = None


class WorkerHandle:
    """The server's end of one worker: the process and its control pipe (request/response)."""

    def __init__(self, process: Any, conn: Connection, index: int) -> None:
        self.process = process
        self.conn = conn
        self.index = index
        self.lock = threading.Lock()
        self.bell: Any = None  # rung after each control message once the worker serves

    def call(self, msg: tuple[Any, ...], fds: tuple[int, ...] = (), timeout: float = WORKER_CALL_TIMEOUT_S) -> Any:
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
    tenant: str = ""  # the tenant whose class the lane serves ('' : the shared default class)


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
        self.external: ExternalTable | None = None  # requests bound to client regions (server/external.py)
        self.shm_bind_min_bytes = DEFAULT_SHM_BIND_MIN_BYTES
        self.mapped_regions: set[int] = set()  # client regions mapped in the current workers, by uid
        self.region_lock = threading.Lock()
        self.lanes: dict[str, LaneEntry] = {}
        self.pending_lanes: dict[str, _PendingLane] = {}  # lanes being mapped in the workers
        self.level_queues: dict[int, int] = {}  # priority level -> its own max_queue_size
        self.lane_epoch = 0  # bumped whenever every lane is dropped (workers died, stopped, draining)
        self.lock = threading.Lock()
        self.next_lane_id = 1
        self.framework = ""
        self.device = ""
        self.passthrough: dict[str, str] = {}
        self.load_seconds = 0.0
        self.crashes: list[float] = []  # monotonic times of recent worker crashes
        self.worker_crashes = 0  # workers that exited on their own since the model was loaded (metrics)
        self.restarts = 0  # restarts after a crash since the model was loaded (metrics)
        self.unloaded = False  # unloaded on request: not counted in the server's readiness
        self.tenants = TenantClasses(SchedulingPolicy())
        # counters of the lanes evicted since the workers started, by tenant, so that counters never go back
        self.evicted_tenant_counters: dict[str, dict[str, int]] = {}
        self.placements: list[Any] = []  # kernelport.gpu.placement.WorkerPlacement, one per worker
        self._ledger_token = 0

    # ---- load / unload ----

    def load(self) -> None:
        t0 = time.monotonic()
        try:
            self._load()
            self._warmup()
        except BaseException as e:
            self._release_budget()
            self.state = UNAVAILABLE
            self.reason = scrub_paths(str(e), self.options.repository)
            self._stop_workers()
            if isinstance(e, KernelPortError):  # the same error, naming no server path
                raise type(e)(self.reason) from None
            raise
        self._release_budget()  # loaded: the memory is in use now, and NVML's free figure shows it
        self.load_seconds = time.monotonic() - t0
        self.state = READY
        self.reason = ""
        assert self.spec is not None
        preset = self.spec.parameters.get("kernelport.preset")
        log.info("loaded model '%s' (%s %s on %s, %d instance%s, max_batch_size %d%s) in %.2f s",
                 self.name, self.entry.platform, self.framework, self.device, len(self.workers),
                 "" if len(self.workers) == 1 else "s", self.spec.max_batch_size,
                 f", preset {preset}" if preset else "", self.load_seconds)

    def _load(self) -> None:
        entry = self.entry
        platform = entry.platform
        model_path = entry.model_file()
        preset = model_preset(entry.config, self.options.preset)
        base = apply_preset(entry.config, preset)  # instances now; batching again once completed
        config_bytes = base.SerializeToString()
        placements = self._place(model_path, base)
        ctx = multiprocessing.get_context("spawn")
        from kernelport.gpu.worker_env import placed_worker_main

        for i, placement in enumerate(placements):
            parent, child = ctx.Pipe(duplex=True)
            params = {
                "model": self.name, "platform": platform, "model_path": model_path, "config": config_bytes,
                "config_source": os.path.join(entry.path, "config.pbtxt"), "instance": i,
                "log_level": self.options.log_level, "env": placement.env(),
            }
            p = ctx.Process(target=placed_worker_main, args=(child, params), name=f"kp-{self.name}-{i}",
                            daemon=True)
            p.start()
            child.close()
            self.workers.append(WorkerHandle(p, parent, i))
        reports = []
        t0 = time.monotonic()
        for w in self.workers:
            while not w.conn.poll(min(LOAD_PROGRESS_S, max(0.0, t0 + self.options.load_timeout - time.monotonic()))):
                waited = time.monotonic() - t0
                if waited >= self.options.load_timeout:
                    raise WorkerError(f"model '{self.name}': worker did not load within "
                                      f"{self.options.load_timeout:.0f} s")
                log.info("model '%s': still loading (%.0f s)", self.name, waited)
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
        placed = sorted({p.device.uuid for p in self.placements if p.device is not None})
        if placed:
            self.device += " on " + ", ".join(placed)
        self.passthrough = dict(rep.get("passthrough") or {})  # output -> input it returns unchanged
        ins = [TensorSig(t["name"], t["datatype"], tuple(t["shape"])) for t in rep["inputs"]]
        outs = [TensorSig(t["name"], t["datatype"], tuple(t["shape"])) for t in rep["outputs"]]
        can_batch = all(len(t.shape) > 0 and t.shape[0] == -1 for t in ins + outs)
        config = apply_preset(complete_config(base, ins, outs, can_batch, model_name=self.name), preset)
        spec = ModelSpec.from_proto(config, source=os.path.join(entry.path, "config.pbtxt"), model_name=self.name)
        self.spec = spec
        sched = SchedulingPolicy.from_config(config, spec.parameters, self.name)
        self.tenants = TenantClasses(sched)
        self.info = ModelInfo(
            name=self.name,
            max_batch_size=spec.max_batch_size,
            inputs=tuple(TensorInfo(t.name, t.datatype, t.dims, t.optional) for t in spec.inputs),
            outputs=tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.outputs),
            platform=spec.platform or entry.platform,
            versions=tuple(str(v) for v in entry.selected_versions),
            priority_levels=sched.priority_levels,
            default_priority=sched.default_priority,
            client_spin_us=_client_spin(spec.parameters, self.name),
            **_queue_policy(config),
        )
        for t in spec.inputs + spec.outputs:
            if t.dtype is None:
                raise ConfigError(f"model '{self.name}': tensor '{t.name}' of type {t.datatype} "
                                  f"is not supported on lanes yet")
            if t.reshape is not None:
                raise ConfigError(f"model '{self.name}': tensor '{t.name}': reshape is not supported yet")
        seg = _kpcore.Segment.create(_kpcore.DOORBELL_BYTES, f"kp-{self.name}-bell")
        self.doorbell = _kpcore.Doorbell(seg, init=True)
        self.doorbell.set_max_queue(_max_queue_size(config))
        self.level_queues = _level_queue_sizes(config)  # levels with a queue of their own
        for level, size in self.level_queues.items():
            self.doorbell.set_level_max_queue(level, size)
        max_rows = max(1, spec.max_batch_size)
        stats_seg = _kpcore.Segment.create(_kpcore.StatsBlock.required_size(max_rows), f"kp-{self.name}-stats")
        self.stats = _kpcore.StatsBlock(stats_seg, max_rows, init=True)
        self.evicted_tenant_counters = {}  # lane counters start again with the stats
        policy = batch_policy(spec, self.options.commit_timeout)
        policy.update(_policy_overrides(spec.parameters))
        self.external = ExternalTable.create(self.name)
        self.shm_bind_min_bytes = _shm_bind_min_bytes(spec.parameters, self.name)
        with self.region_lock:
            self.mapped_regions = set()
        for w in self.workers:
            fds = (seg.dup_fd(), stats_seg.dup_fd(), self.external.segment.dup_fd())
            try:
                completed = config.SerializeToString()
                w.call(("start", {"policy": policy, "batching": spec.max_batch_size > 0, "max_rows": max_rows,
                                  "stats_size": stats_seg.size, "external_size": TABLE_BYTES,
                                  "config": completed if completed != config_bytes else None}), fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            w.bell = self.doorbell

    def _place(self, model_path: str, config: Any) -> list[Any]:
        """One placement per worker from the config's instance_group (after any preset) and the machine's
        GPUs (NVML; the server never initialises CUDA), with the devices' memory budgeted
        (kernelport.gpu.placement)."""
        from kernelport.gpu import cuda, placement

        groups = placement.groups_from_config(config)
        inventory = cuda.device_inventory()
        per_instance = 0
        if inventory:
            params = {k: v.string_value for k, v in self.entry.config.parameters.items()}
            per_instance = placement.estimate_instance_memory(self.name, params, placement.path_bytes(model_path))
        reason = cuda.cuda_unavailable_reason() or ("the NVIDIA management library (nvidia-ml-py) cannot list "
                                                    "the GPUs" if not inventory else "")
        token, placements = placement.LEDGER.place(self.name, groups, inventory,
                                                   visible=placement.server_visible_devices(),
                                                   memory_per_instance=per_instance, no_gpu_reason=reason)
        self._ledger_token = token
        self.placements = placements
        return placements

    def _warmup(self) -> None:
        """Run the config's model_warmup samples through the model's lanes, as requests of the server
        (they count in the model's statistics), after the workers start and before the model is READY."""
        assert self.info is not None
        info = self.info
        for sample in self.entry.config.model_warmup:
            label = f"model '{self.name}' warmup sample '{sample.name}'"
            try:
                inputs = warmup_inputs(sample, info, self.entry.path, label)
                n, shapes, arrays, caps = validate_inputs(info, inputs)
                for _ in range(max(1, int(sample.count))):
                    lane = self._lane_for(info, shapes, caps)
                    lane.view.run(SERVER_OWNER, arrays, n, self.options.load_timeout, self.name)
            except KernelPortError as e:
                raise type(e)(f"{label} failed: {e}") from None
            except Exception as e:  # the backend's own error, as the worker reported it
                raise KernelPortError(f"{label} failed: {e}") from None
            log.info("%s: ran %d time(s)", label, max(1, int(sample.count)))

    def _release_budget(self) -> None:
        from kernelport.gpu.placement import LEDGER

        token, self._ledger_token = self._ledger_token, 0
        if token:
            LEDGER.release(token)

    def start_draining(self) -> None:
        """Shutdown: no new requests (clients get LaneRetired, then a not-ready error); those already
        claimed finish."""
        if self.state == READY:
            self.state = UNLOADING
            self.reason = "the server is shutting down"
        with self.lock:
            self.lane_epoch += 1
            for lane in self.lanes.values():
                lane.view.lane.set_status(_kpcore.LANE_RETIRED)

    def busy_lanes(self) -> int:
        with self.lock:
            return sum(not lane.view.lane.idle() for lane in self.lanes.values())

    def unload(self) -> None:
        self.unloaded = True
        self.state = UNLOADING
        self._stop_workers()
        self.state = UNAVAILABLE
        self.reason = "unloaded"

    def _stop_workers(self) -> None:
        with self.lock:
            self.lane_epoch += 1
            for lane in self.lanes.values():
                lane.view.lane.set_status(_kpcore.LANE_DEAD)
            self.lanes.clear()
        for w in self.workers:
            w.stop()
        self.workers = []

    def worker_died(self, w: WorkerHandle) -> float | None:
        """A worker exited on its own: fail everything it held, at once. Returns the delay before a
        restart, or None when it crashed too often to try again."""
        self.state = UNAVAILABLE
        with self.lock:
            self.lane_epoch += 1
            for lane in self.lanes.values():
                lane.view.lane.set_status(_kpcore.LANE_DEAD)
                lane.view.lane.seal()
            self.lanes.clear()
        w.process.join(1.0)  # its sentinel fired: the process is gone; reap it, so its exit code is known
        code = w.process.exitcode
        log.error("model '%s': worker %d exited (code %s); the model is unavailable", self.name, w.index, code)
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW_S] + [now]
        self.worker_crashes += 1
        if len(self.crashes) > self.options.max_restarts:
            self.reason = (f"its worker crashed {len(self.crashes)} times in {CRASH_WINDOW_S:.0f} s "
                           f"(last exit code {code}); not restarting it")
            log.error("model '%s': %s", self.name, self.reason)
            return None
        self.reason = f"its worker exited with code {code}; restarting"
        return min(self.options.restart_backoff * 2 ** (len(self.crashes) - 1), 8.0)

    def restart(self) -> None:
        """Replace every worker of the model (the lanes they shared are gone) and load again."""
        self._stop_workers()
        self.state = LOADING
        self.load()
        self.restarts += 1
        log.info("model '%s': restarted", self.name)

    # ---- lanes ----

    def require_ready(self) -> ModelInfo:
        if self.state != READY or self.info is None:
            raise ModelNotReadyError(f"model '{self.name}' is not ready" + (f": {self.reason}" if self.reason else ""))
        return self.info

    def lane_for(self, shapes: tuple[tuple[int, ...], ...], caps: tuple[int, ...] = (), priority: int = 0,
                 tenant: str = "") -> LaneEntry:
        """The lane for these per-sample input shapes (and BYTES element capacities) in the scheduling
        class of `priority` and `tenant`, created on first use."""
        return self._lane_for(self.require_ready(), shapes, caps, priority, tenant)

    def _lane_for(self, info: ModelInfo, shapes: tuple[tuple[int, ...], ...], caps: tuple[int, ...],
                  priority: int = 0, tenant: str = "") -> LaneEntry:
        caps = caps or (0,) * len(shapes)
        level = info.level(priority)
        share_class, tenant = self.tenants.resolve(check_tenant(tenant, self.name))
        key = lane_key(shapes, caps, sched_key(level, share_class))
        evicted: LaneEntry | None = None
        with self.lock:
            if self.state not in (READY, LOADING):  # draining: start_draining retires lanes under this lock
                raise ModelNotReadyError(f"model '{self.name}' is not ready: {self.reason or self.state}")
            entry = self.lanes.get(key)
            if entry is not None:
                entry.last_used = time.monotonic()
                return entry
            pending = self.pending_lanes.get(key)
            mine = pending is None
            if pending is None:
                if len(self.lanes) + len(self.pending_lanes) >= self.options.max_lanes_per_model:
                    evicted = self._evict_idle_lane()
                    if evicted is None:
                        raise InvalidInputError(
                            f"model '{self.name}': too many distinct input shapes, priorities and tenants in use "
                            f"at once (at most {self.options.max_lanes_per_model} lanes)")
                pending = self.pending_lanes[key] = _PendingLane()
            epoch = self.lane_epoch
        if not mine:  # another request is mapping this lane: wait for it
            if not pending.done.wait(WORKER_CALL_TIMEOUT_S + 5):
                raise ModelNotReadyError(f"model '{self.name}': a new lane was not ready in time")
            if pending.entry is None:
                raise pending.error or ModelNotReadyError(f"model '{self.name}' is not ready")
            return pending.entry
        # Mapping a lane needs every worker, which may be busy with a batch: do it outside the model's
        # lock, so requests in the lanes that exist go on meanwhile.
        try:
            if evicted is not None:
                self._drop_in_workers(evicted)
            entry = self._create_lane(info, shapes, caps, level, share_class, tenant)
        except BaseException as e:
            with self.lock:
                self.pending_lanes.pop(key, None)
            pending.error = e if isinstance(e, KernelPortError) else None
            pending.done.set()
            raise
        with self.lock:
            self.pending_lanes.pop(key, None)
            if self.lane_epoch != epoch or self.state not in (READY, LOADING):
                # the workers died, stopped or began draining meanwhile: this lane is not theirs to serve
                entry.view.lane.set_status(_kpcore.LANE_DEAD)
                entry.view.lane.seal()
                pending.done.set()
                raise ModelNotReadyError(f"model '{self.name}' is not ready: {self.reason or self.state}")
            self.lanes[key] = entry
        pending.entry = entry
        pending.done.set()
        return entry

    def _evict_idle_lane(self) -> LaneEntry | None:
        """Retire the least recently used lane that nothing is using; returns it (the caller then tells
        the workers with `_drop_in_workers`, outside the lock). Called with the lock held. Clients that
        still map it get LaneRetired and ask again."""
        for key, entry in sorted(self.lanes.items(), key=lambda kv: kv[1].last_used):
            lane = entry.view.lane
            lane.set_status(_kpcore.LANE_RETIRED)
            if not lane.idle():  # in use: leave it be
                lane.set_status(_kpcore.LANE_LIVE)
                continue
            lane.seal()
            by_tenant = self.evicted_tenant_counters.setdefault(entry.tenant, {})
            for k, v in lane.counters().items():
                by_tenant[k] = by_tenant.get(k, 0) + int(v)
            del self.lanes[key]
            log.debug("model '%s': evicted idle lane %d", self.name, entry.layout.lane_id)
            return entry
        return None

    def _drop_in_workers(self, entry: LaneEntry) -> None:
        """Unmap an evicted lane in every worker (sealed and retired: nothing can use it meanwhile)."""
        for w in list(self.workers):
            try:
                w.call(("drop", entry.layout.lane_id))
            except WorkerError as e:  # a dead worker unmaps everything anyway
                log.debug("model '%s': drop of lane %d: %s", self.name, entry.layout.lane_id, e)

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

    def _create_lane(self, info: ModelInfo, shapes: tuple[tuple[int, ...], ...], caps: tuple[int, ...],
                     level: int = 0, share_class: int = 0, tenant: str = "") -> LaneEntry:
        out_dims = self._output_dims(info, shapes)
        # BYTES outputs get the larger of the inputs' capacity and the configured one
        out_cap = max([*caps, int(self.spec.parameters.get("kernelport.bytes_output_capacity", 256))
                       if self.spec else 256])
        out_cap = capacity_for(out_cap)
        tensors = tuple(TensorInfo(t.name, t.datatype, s, capacity=c) for t, s, c in zip(info.inputs, shapes, caps))
        tensors += tuple(TensorInfo(t.name, t.datatype, d, capacity=out_cap if t.is_bytes else 0)
                         for t, d in zip(info.outputs, out_dims))
        lane_id = self.next_lane_id
        self.next_lane_id += 1
        max_batch = info.max_batch_size if info.batching else 1
        nslots = int(self.spec.parameters.get("kernelport.lane_slots", self.options.lane_slots)) if self.spec else 4
        aliases = pass_through_aliases(tensors, len(info.inputs), self.passthrough)
        slot_bytes = max_batch * sum(t.row_bytes for i, t in enumerate(tensors) if not aliases or aliases[i] < 0)
        nslots = max(2, min(nslots, LANE_BYTES_BUDGET // max(1, slot_bytes)))  # large tensors: fewer slots
        layout = LaneLayout(lane_id, nslots, max_batch, info.batching, tensors, len(info.inputs), aliases=aliases)
        size = layout.required_size()
        layout = LaneLayout(lane_id, layout.nslots, max_batch, info.batching, tensors, len(info.inputs), size,
                            priority=level, share_class=share_class, weight=self.tenants.policy.weight(tenant),
                            aliases=aliases)
        log.debug("model '%s': lane %d for %s (%d bytes)", self.name, lane_id, shapes, size)
        seg = _kpcore.Segment.create(size, f"kp-{self.name}-lane{lane_id}")
        view = LaneView.attach(layout, seg, self.doorbell, init=True)
        view.lane.set_spin(*SERVER_WAIT_SPIN)
        if level in self.level_queues:
            view.lane.set_queue_level(level)
        for w in self.workers:
            fd = seg.dup_fd()
            try:
                w.call(("lane", layout.to_dict()), fds=(fd,))
            finally:
                os.close(fd)
        return LaneEntry(layout, seg, view, time.monotonic(), tenant)

    def map_region(self, region: SharedMemoryRegion) -> None:
        """Map a client's registered region in every worker (once), for requests bound to it; it is
        unmapped there when the region closes."""
        with self.region_lock:
            if region.uid in self.mapped_regions:
                return
            workers = list(self.workers)
            for w in workers:
                fd = region.dup_fd()
                try:
                    w.call(("region", region.uid, region.map_size), fds=(fd,))
                finally:
                    os.close(fd)
            self.mapped_regions.add(region.uid)
            if self._unmap_region not in region.on_close:  # mapped again after a worker dropped it
                region.on_close.append(self._unmap_region)

    def _unmap_region(self, region: SharedMemoryRegion) -> None:
        with self.region_lock:
            if region.uid not in self.mapped_regions:
                return  # the workers were replaced since: theirs never had it
            self.mapped_regions.discard(region.uid)
            for w in list(self.workers):
                try:
                    w.call(("unregion", region.uid))
                except WorkerError as e:
                    log.debug("model '%s': unmapping a region: %s", self.name, e)

    def forget_region(self, region: SharedMemoryRegion) -> None:
        """A worker found the region shrunk and dropped it: map it again on its next use."""
        with self.region_lock:
            self.mapped_regions.discard(region.uid)

    def reclaim(self, owner: int) -> int:
        with self.lock:
            lanes = list(self.lanes.values())
        return sum(int(lane.view.lane.reclaim(owner)) for lane in lanes)

    def tenant_counters(self) -> dict[str, dict[str, int]]:
        """Lane counters summed by tenant ('' : requests without one, or beyond max_tenants)."""
        with self.lock:
            out = {t: dict(c) for t, c in self.evicted_tenant_counters.items()}
            lanes = list(self.lanes.values())
        for lane in lanes:
            total = out.setdefault(lane.tenant, {})
            for k, v in lane.view.lane.counters().items():
                total[k] = total.get(k, 0) + int(v)
        return out

    def counters(self) -> dict[str, int]:
        """Lane counters summed over every tenant (evicted lanes included)."""
        total = dict.fromkeys(LANE_COUNTERS, 0)
        for counts in self.tenant_counters().values():
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return total


def pass_through_aliases(tensors: tuple[TensorInfo, ...], n_inputs: int,
                         passthrough: dict[str, str]) -> tuple[int, ...]:
    """Per lane tensor, the input whose rows it shares (-1: its own): outputs the backend reports as its
    input unchanged, when their per-sample shape and type match in this lane. Empty when none."""
    index = {t.name: i for i, t in enumerate(tensors[:n_inputs])}
    aliases = []
    for i, t in enumerate(tensors):
        j = index.get(passthrough.get(t.name, ""), -1) if i >= n_inputs and not t.is_bytes else -1
        ok = j >= 0 and (tensors[j].datatype, tensors[j].dims) == (t.datatype, t.dims) and not tensors[j].is_bytes
        aliases.append(j if ok else -1)
    return tuple(aliases) if any(a >= 0 for a in aliases) else ()


def warmup_inputs(sample: Any, info: ModelInfo, model_dir: str, label: str) -> dict[str, np.ndarray]:
    """The tensors of one model_warmup sample, as Triton makes them: [batch_size, *dims] (dims alone
    without batching) of zeros, random values, or the raw bytes of `<model dir>/warmup/<file>` (one
    sample's worth, repeated for every row)."""
    batching = info.max_batch_size > 0
    batch_size = int(sample.batch_size) if sample.batch_size else 1
    if batching and not 1 <= batch_size <= info.max_batch_size:
        raise ConfigError(f"{label}: batch_size {batch_size} must be in 1..{info.max_batch_size}")
    if not batching and batch_size != 1:
        raise ConfigError(f"{label}: batch_size must be 1 for a model without batching, got {batch_size}")
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, spec in sample.inputs.items():
        dims = tuple(int(d) for d in spec.dims)
        if any(d < 0 for d in dims):
            raise ConfigError(f"{label} input '{name}': dims {list(dims)} must be fixed")
        shape = ((batch_size,) if batching else ()) + dims
        try:
            datatype = config_type_to_datatype(int(spec.data_type))
            dtype = config_type_to_numpy(int(spec.data_type))
        except ValueError:
            raise ConfigError(f"{label} input '{name}': data_type is not set") from None
        is_bytes = datatype == "BYTES"
        if dtype is None and not is_bytes:
            raise ConfigError(f"{label} input '{name}': data_type {datatype} is not supported for warmup")
        kind = spec.WhichOneof("input_data_type")
        if kind is None:
            raise ConfigError(f"{label} input '{name}': needs zero_data, random_data or input_data_file")
        if is_bytes:
            if kind == "input_data_file":
                raise ConfigError(f"{label} input '{name}': input_data_file is not supported for BYTES yet")
            out[name] = np.full(shape, b"", dtype=object)  # as Triton: empty strings for zero and random
            continue
        assert dtype is not None
        if kind == "zero_data":
            out[name] = np.zeros(shape, dtype)
        elif kind == "random_data":
            if dtype.kind == "f":
                out[name] = rng.random(shape).astype(dtype)
            elif dtype.kind == "b":
                out[name] = rng.integers(0, 2, shape).astype(dtype)
            else:
                out[name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            out[name] = _warmup_file(spec.input_data_file, model_dir, dtype, dims, shape, f"{label} input '{name}'")
    return out


def _warmup_file(filename: str, model_dir: str, dtype: np.dtype[Any], dims: tuple[int, ...],
                 shape: tuple[int, ...], label: str) -> np.ndarray:
    warmup_dir = os.path.realpath(os.path.join(model_dir, "warmup"))
    path = os.path.realpath(os.path.join(warmup_dir, filename))
    if not filename or os.path.dirname(path) != warmup_dir:
        raise ConfigError(f"{label}: input_data_file {filename!r} must name a file in the model's warmup/ directory")
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    try:
        with open(path, "rb") as f:
            data = f.read(need)
    except OSError:
        raise ConfigError(f"{label}: cannot read warmup/{filename}") from None
    if len(data) < need:
        raise ConfigError(f"{label}: warmup/{filename} holds {len(data)} bytes, one sample needs {need}")
    one = np.frombuffer(data, dtype).reshape(dims)
    return np.ascontiguousarray(np.broadcast_to(one, shape))


def _shm_bind_min_bytes(params: dict[str, str], model: str) -> int:
    """`kernelport.shm_bind_min_bytes`: a request with at least this many bytes of tensors in clients'
    registered regions is bound there in the worker (no copy, but a batch of its own); -1: never."""
    raw = params.get("kernelport.shm_bind_min_bytes")
    if raw is None:
        return DEFAULT_SHM_BIND_MIN_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -2
    if value < -1:
        raise ConfigError(f"model '{model}': parameter kernelport.shm_bind_min_bytes must be a byte count "
                          f"or -1 (never), got {raw[:40]!r}")
    return value if value >= 0 else 2**63


def _client_spin(params: dict[str, str], model: str) -> float | None:
    """The config's hint to local clients (microseconds awake before sleeping), or None."""
    value = params.get(CLIENT_SPIN_PARAMETER)
    if value is None:
        return None
    try:
        spin = float(value)
    except ValueError:
        spin = -1.0
    if not 0 <= spin <= 1e6:
        raise ConfigError(f"model '{model}': parameter {CLIENT_SPIN_PARAMETER} must be 0 to 1000000 "
                          f"microseconds, got {value[:40]!r}")
    return spin


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


__all__ = ["LaneEntry", "ModelRuntime", "ServerOptions", "WorkerHandle", "batch_policy", "warmup_inputs"]


def _queue_policy(config: Any) -> dict[str, Any]:
    """dynamic_batching.default_queue_policy and priority_queue_policy, as the clients apply them
    (timeouts with REJECT; DELAY keeps requests waiting, so it sets no deadline here)."""
    if not config.HasField("dynamic_batching"):
        return {}
    db = config.dynamic_batching

    def timeout(qp: Any) -> tuple[int, bool]:
        reject = qp.timeout_action == 0  # REJECT
        return (int(qp.default_timeout_microseconds) if reject else 0), bool(qp.allow_timeout_override) and reject

    out: dict[str, Any] = {"level_queue": tuple((int(level), *timeout(qp))
                                                for level, qp in sorted(db.priority_queue_policy.items()))}
    if db.HasField("default_queue_policy"):
        out["queue_timeout_us"], out["allow_timeout_override"] = timeout(db.default_queue_policy)
    return out


def _level_queue_sizes(config: Any) -> dict[int, int]:
    """Priority levels with a priority_queue_policy: each has a queue of its own, bounded by its
    max_queue_size (0: unbounded), as in Triton."""
    if not config.HasField("dynamic_batching"):
        return {}
    return {int(level): max(0, min(int(qp.max_queue_size), 2**31))
            for level, qp in config.dynamic_batching.priority_queue_policy.items() if 1 <= int(level) <= 64}


def _max_queue_size(config: Any) -> int:
    if not config.HasField("dynamic_batching") or not config.dynamic_batching.HasField("default_queue_policy"):
        return 0
    size = int(config.dynamic_batching.default_queue_policy.max_queue_size)
    return max(0, min(size, 2**31))


def scrub_paths(text: str, repository: str) -> str:
    """A message for clients: the repository's location on the server becomes `<repository>`
    (frameworks name the files they fail on)."""
    for root in sorted({os.path.abspath(repository), os.path.realpath(repository)}, key=len, reverse=True):
        text = text.replace(root, "<repository>")
    return text
