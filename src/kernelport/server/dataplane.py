"""The transport-independent data plane: every front end (local socket, gRPC, HTTP) calls this.

Remote requests are clients of the same lanes as local ones (owner SERVER_OWNER), so they batch
together with local requests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import _kpcore
from kernelport.client.lanes import (
    SERVER_OWNER,
    Cancellation,
    LaneLayout,
    ModelInfo,
    check_outputs,
    validate_inputs,
)
from kernelport.errors import (
    InferFailedError,
    InvalidInputError,
    KernelPortError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from kernelport.repository import ModelSpec, load_model, load_repository, validate_model_name
from kernelport.server.external import MAX_TENSORS as EXTERNAL_MAX_TENSORS
from kernelport.server.external import ExternalPlace, Place
from kernelport.server.models import READY, UNAVAILABLE, ModelRuntime, ServerOptions, WorkerError, scrub_paths
from kernelport.server.shm_registry import SharedMemoryRegion
from kernelport.server.stats import StatsSnapshot, snapshot_from_counters

log = logging.getLogger("kernelport.server")

DEFAULT_TIMEOUT = 60.0


class DataPlane:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.models: dict[str, ModelRuntime] = {}
        self.load_errors: dict[str, str] = {}
        self.lock = threading.RLock()
        self.control_lock = threading.RLock()  # one load, unload or rescan at a time
        self.signatures: dict[str, tuple[tuple[str, int, int], ...]] = {}  # poll mode: files last seen
        self.frontend_stats: list[Callable[[], dict[str, int]]] = []  # front ends' own counters (metrics)

    # ---- repository ----

    def load_all(self) -> None:
        """The models to serve at start: every one, or in explicit mode those of `load_models` ("*": all)."""
        mode = self.options.model_control_mode
        errors: dict[str, Any] = {}
        signatures = {name: model_signature(self.options.repository, name) for name in self._model_dirs()}
        entries = load_repository(self.options.repository, errors)
        wanted = set(self.options.load_models)
        selected = mode != "explicit" or "*" in wanted
        for name, err in errors.items():
            if selected or name in wanted:
                log.error("model '%s' not loaded: %s", name, err)
                self.load_errors[name] = str(err)
        if not selected:
            for name in sorted(wanted - set(entries) - set(errors)):
                log.error("model '%s' (--load-model) is not in the model repository", name)
        names = [name for name in entries if selected or name in wanted]
        for i, name in enumerate(names, start=1):
            # progress: a line as each model starts loading, and one when it is loaded (with its time)
            log.info("loading model '%s' (%d of %d)", name, i, len(names))
            t0 = time.monotonic()
            try:
                self._load(name)
            except KernelPortError as e:
                log.error("model '%s' not loaded (after %.2f s): %s", name, time.monotonic() - t0, e)
        if mode == "poll":
            self.signatures = signatures

    def _check_control(self, name: str) -> None:
        mode = self.options.model_control_mode
        if mode in ("none", "poll"):
            # Triton answers UNAVAILABLE here too
            raise ServerUnavailableError(
                f"model '{name}': explicit model load / unload is not allowed in model control mode '{mode}' "
                "(start the server with --model-control-mode explicit)")

    def load(self, name: str) -> None:
        """A load request (gRPC, HTTP, local socket): refused in the none and poll modes."""
        self._check_control(name)
        self._load(name)

    def unload(self, name: str) -> None:
        """An unload request: refused in the none and poll modes."""
        self._check_control(name)
        with self.control_lock:
            self._runtime(name).unload()

    def _load(self, name: str) -> None:
        """(Re)load a model. A model that is READY keeps serving until its replacement is ready, and
        stays if the replacement fails to load (as Triton does); requests then move to the new one."""
        validate_model_name(name)
        with self.control_lock:
            if not os.path.isdir(os.path.join(self.options.repository, name)):
                raise ModelNotFoundError(f"model '{name}' is not in the model repository")
            entry = load_model(self.options.repository, name)
            with self.lock:
                old = self.models.get(name)
            keep_old = old is not None and old.state == READY
            if old is not None and not keep_old:
                old.unload()
            rt = ModelRuntime(entry, self.options)
            if not keep_old:
                with self.lock:
                    self.models[name] = rt
            try:
                rt.load()
            except KernelPortError as e:
                self.load_errors[name] = str(e)
                if keep_old:
                    log.error("model '%s': reload failed, the loaded one keeps serving: %s", name, e)
                raise
            except Exception as e:
                message = scrub_paths(str(e), self.options.repository)
                self.load_errors[name] = message
                raise KernelPortError(f"model '{name}' failed to load: {message}") from None
            if keep_old:
                assert old is not None
                with self.lock:
                    self.models[name] = rt
                self._retire(old)
                log.info("model '%s': reloaded", name)
            self.load_errors.pop(name, None)

    def _retire(self, rt: ModelRuntime) -> None:
        """A replaced model: its lanes are retired (clients ask again and get the new model's), the
        requests already claimed on them finish (for at most the exit timeout), then its workers stop."""
        rt.start_draining()
        deadline = time.monotonic() + self.options.exit_timeout
        while rt.busy_lanes() and time.monotonic() < deadline:
            time.sleep(0.01)  # the server's own wait for requests in flight, not a client's synchronisation
        rt.unload()

    # ---- poll mode ----

    def _model_dirs(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.options.repository)
                          if not e.name.startswith(".") and e.is_dir())
        except OSError:
            return []

    def poll_repository(self) -> None:
        """One rescan (poll mode): new model directories are loaded, removed ones unloaded and
        forgotten, and those whose files changed (names, sizes, modification times) reloaded."""
        with self.control_lock:
            seen = {name: model_signature(self.options.repository, name) for name in self._model_dirs()}
            for name in sorted(set(self.signatures) - set(seen)):
                log.info("model '%s': removed from the repository; unloading it", name)
                with self.lock:
                    rt = self.models.pop(name, None)
                self.load_errors.pop(name, None)
                if rt is not None:
                    self._retire(rt)
                del self.signatures[name]
            for name, sig in seen.items():
                if self.signatures.get(name) == sig:
                    continue
                log.info("model '%s': %s in the repository; loading it", name,
                         "changed" if name in self.signatures else "new")
                self.signatures[name] = sig
                try:
                    self._load(name)
                except KernelPortError as e:
                    self.load_errors[name] = str(e)
                    log.error("model '%s' not loaded: %s", name, e)

    def repository_index(self) -> list[tuple[str, str, str, str]]:
        out: list[tuple[str, str, str, str]] = []
        errors: dict[str, Any] = {}
        try:
            entries = load_repository(self.options.repository, errors)
        except KernelPortError:
            entries = {}
        names = sorted(set(entries) | set(errors) | set(self.models))
        for name in names:
            rt = self.models.get(name)
            if rt is not None:
                version = rt.info.versions[-1] if rt.info else ""
                out.append((name, version, rt.state, rt.reason))
            elif name in errors:
                out.append((name, "", UNAVAILABLE, str(errors[name])))
            else:
                out.append((name, "", "", ""))
        return out

    def drain(self, timeout: float) -> int:
        """Stop taking new requests and let those in flight finish, for at most `timeout` seconds.
        Returns how many lanes still held requests when the time ran out."""
        with self.lock:
            models = list(self.models.values())
        for rt in models:
            rt.start_draining()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            busy = sum(rt.busy_lanes() for rt in models)
            if busy == 0 or time.monotonic() >= deadline:
                return busy
            time.sleep(0.01)  # the server's own shutdown poll, not a client's synchronisation

    def shutdown(self) -> None:
        with self.lock:
            models = list(self.models.values())
        for rt in models:
            rt.unload()

    # ---- queries ----

    def _runtime(self, name: str) -> ModelRuntime:
        rt = self.models.get(name)
        if rt is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        return rt

    def model_names(self) -> list[str]:
        return sorted(self.models)

    def model_spec(self, name: str) -> ModelSpec:
        rt = self._runtime(name)
        if rt.spec is None:
            rt.require_ready()
        assert rt.spec is not None
        return rt.spec

    def model_info(self, name: str) -> ModelInfo:
        return self._runtime(name).require_ready()

    def model_ready(self, name: str) -> bool:
        rt = self.models.get(name)
        return rt is not None and rt.state == READY

    def server_ready(self) -> bool:
        """Every model that is meant to be served (not unloaded on request) is ready."""
        return all(rt.state == READY for rt in self.models.values() if not rt.unloaded)

    def statistics(self, name: str) -> StatsSnapshot:
        rt = self._runtime(name)
        version = rt.info.versions[-1] if rt.info else "1"
        if rt.stats is None:
            empty = {"by_size": {}, **{k: 0 for k in ("success_count", "success_ns", "fail_count", "fail_ns",
                                                       "queue_ns", "infer_ns", "inference_count",
                                                       "execution_count", "last_inference_ms")}}
            return snapshot_from_counters(name, version, empty)
        return snapshot_from_counters(name, version, rt.stats.snapshot())

    def counters(self, name: str) -> dict[str, int]:
        """The lane counters summed over the model's lanes, and `queued`: requests claimed and not yet
        taken (kept only when the model has a max_queue_size)."""
        rt = self._runtime(name)
        out = rt.counters()
        out["queued"] = int(rt.doorbell.queued) if rt.doorbell is not None else 0
        return out

    def admission_doorbells(self) -> dict[str, Any]:
        """Per ready model, the doorbell whose queue counters decide at once that a request without
        parameters would be refused (its default priority level has no queue of its own): what a front
        end may check before it spends anything on the request (the native gRPC engine's loop thread)."""
        with self.lock:
            models = list(self.models.items())
        out: dict[str, Any] = {}
        for name, rt in models:
            info = rt.info
            if rt.state == READY and rt.doorbell is not None and info is not None:
                if info.level(0) not in rt.level_queues:
                    out[name] = rt.doorbell
        return out

    def tenant_counters(self, name: str) -> dict[str, dict[str, int]]:
        return self._runtime(name).tenant_counters()

    # ---- inference ----

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
              timeout: float | None = None, queue_timeout: float | None = None,
              cancel: Cancellation | None = None,
              output_sink: Callable[[str, np.ndarray], Any] | None = None, priority: int = 0,
              tenant: str = "",
              external: Mapping[tuple[str, str], ExternalPlace] | None = None) -> dict[str, Any]:
        """`queue_timeout` (seconds): the request's own queue timeout, honoured when the model's queue
        policy allows overriding its default. `cancel`: the caller's cancel switch (a gRPC call's
        cancellation or deadline): a request cancelled while queued gives its place back and is never
        run; RequestCancelledError. `output_sink`: see LaneView.run. `priority` (0: the model's default
        level) and `tenant` choose the request's scheduling class (see kernelport.server.scheduling).
        `external`: tensors in clients' registered regions, by ("input" | "output", name): when the
        request can be bound there (kernelport.server.external) the worker reads and writes them in
        place; the outputs it wrote are marked `written` and returned as views of their region. When it
        cannot, the inputs (views of the regions) are copied as usual and the outputs returned."""
        return self._infer(name, inputs, None, outputs, timeout, queue_timeout, cancel, output_sink, priority,
                           tenant, external)

    def infer_checked(self, name: str, info: ModelInfo, arrays: Sequence[np.ndarray], n: int,
                      shapes: tuple[tuple[int, ...], ...], outputs: Sequence[str] | None = None,
                      timeout: float | None = None, queue_timeout: float | None = None,
                      cancel: Cancellation | None = None,
                      output_sink: Callable[[str, np.ndarray], Any] | None = None, priority: int = 0,
                      tenant: str = "") -> dict[str, Any]:
        """`infer` for a front end that has already checked the request against `info` (the model's
        `model_info`): every input in model order, of its dtype, per-sample `shapes`, batch `n`, no
        BYTES tensors; `outputs` known. Skips the second validation (the gRPC fast path); if the model
        was reloaded since `info`, the request is validated again against the new one."""
        checked = (info, n, shapes, list(arrays))
        return self._infer(name, None, checked, outputs, timeout, queue_timeout, cancel, output_sink, priority,
                           tenant)

    def _infer(self, name: str, inputs: Mapping[str, np.ndarray] | None,
               checked: tuple[ModelInfo, int, tuple[tuple[int, ...], ...], list[np.ndarray]] | None,
               outputs: Sequence[str] | None, timeout: float | None, queue_timeout: float | None,
               cancel: Cancellation | None,
               output_sink: Callable[[str, np.ndarray], Any] | None = None, priority: int = 0,
               tenant: str = "",
               external: Mapping[tuple[str, str], ExternalPlace] | None = None) -> dict[str, Any]:
        for attempt in (0, 1):
            rt = self._runtime(name)
            info = rt.require_ready()
            if checked is not None and checked[0] is info:
                _, n, shapes, arrays = checked
                caps: tuple[int, ...] = ()
            else:
                if inputs is None:  # checked against a model that has been replaced since
                    assert checked is not None
                    inputs = {t.name: a for t, a in zip(checked[0].inputs, checked[3])}
                n, shapes, arrays, caps = validate_inputs(info, inputs)
                if outputs is not None:
                    check_outputs(info, outputs)
            qt = info.queue_timeout(queue_timeout, info.level(priority))
            if timeout:  # a request whose caller stops waiting (gRPC deadline) is not run after that
                qt = min(qt, timeout) if qt else timeout
            try:
                lane = rt.lane_for(shapes, caps, priority, tenant)
                binding = _bind_external(rt, lane.layout, n, external, outputs) if external else None
                if binding is None:
                    # guard: the server's inputs may be views of a client's registered shared memory
                    return lane.view.run(SERVER_OWNER, arrays, n, timeout or DEFAULT_TIMEOUT, name, outputs, None,
                                         qt, cancel, output_sink, guard=True)
                assert external is not None
                return _run_external(rt, lane, binding, external, arrays, n, timeout or DEFAULT_TIMEOUT, name,
                                     outputs, qt, cancel, output_sink)
            except (_kpcore.LaneRetired, ModelNotReadyError) as e:
                # evicted, or the model was reloaded meanwhile: the next lookup finds the new lane or model
                replaced = self.models.get(name) is not rt
                if attempt or not (isinstance(e, _kpcore.LaneRetired) or replaced):
                    raise
        raise AssertionError("unreachable")


def _bind_external(rt: ModelRuntime, layout: LaneLayout, n: int,
                   external: Mapping[tuple[str, str], ExternalPlace],
                   wanted: Sequence[str] | None) -> tuple[Any, int, list[Place]] | None:
    """(table, entry, places) binding the request's region tensors in the worker, or None when it
    should not be (fewer region bytes than the model's `kernelport.shm_bind_min_bytes`: such a request
    takes a slot to itself, so it would no longer batch with others) or cannot be (BYTES, too many
    tensors, an output sharing rows with an input in a region, the table full): the caller copies."""
    if rt.external is None or len(layout.tensors) > EXTERNAL_MAX_TENSORS:
        return None
    k = layout.n_inputs
    places: list[Place] = []
    regions = {}
    for i, t in enumerate(layout.tensors):
        kind = "input" if i < k else "output"
        p = external.get((kind, t.name))
        if p is None or (kind == "output" and wanted is not None and t.name not in wanted):
            places.append((0, 0, 0))
            continue
        if t.is_bytes or not isinstance(p.region, SharedMemoryRegion):
            return None
        nbytes = n * t.row_bytes
        if kind == "output" and nbytes > p.byte_size:  # said before running, not after
            raise InvalidInputError(f"model '{rt.name}' output '{t.name}': shared memory byte size "
                                    f"{p.byte_size} is too small for the {nbytes}-byte result")
        if nbytes != p.byte_size and kind == "input":
            return None  # the copying path says what is wrong
        places.append((p.region.uid, p.region.offset + p.offset, nbytes))
        regions[p.region.uid] = p.region
    if not regions or sum(p[2] for p in places) < rt.shm_bind_min_bytes:
        return None  # small tensors: copying them costs less than giving up batching with others
    for i, j in enumerate(layout.aliases):
        if j >= 0 and places[i][0] == 0 and places[j][0] != 0:
            return None  # this output's rows are its input's, which stay in the client's region
    for region in regions.values():
        if not region.intact():
            return None  # the copying path reports the shrunk region
        try:
            rt.map_region(region)
        except WorkerError as e:  # a worker could not map it (or is gone): copy instead
            log.warning("model '%s': shared memory region '%s' not mapped in its workers: %s", rt.name,
                        region.name, e)
            return None
    index = rt.external.reserve()
    if index is None:
        return None
    return rt.external, index, places


def _run_external(rt: ModelRuntime, lane: Any, binding: tuple[Any, int, list[Place]],
                  external: Mapping[tuple[str, str], ExternalPlace], arrays: list[np.ndarray], n: int,
                  timeout: float, name: str, outputs: Sequence[str] | None, qt: float,
                  cancel: Cancellation | None, output_sink: Callable[[str, np.ndarray], Any] | None) -> dict[str, Any]:
    table, index, places = binding
    try:
        out = lane.view.run(SERVER_OWNER, arrays, n, timeout, name, outputs, None, qt, cancel, output_sink,
                            guard=True, external=binding)
    except InferFailedError:
        for p in external.values():  # a worker that found its region shrunk dropped it: map it afresh
            if isinstance(p.region, SharedMemoryRegion):
                rt.forget_region(p.region)
        raise
    finally:
        table.free(index)
    layout = lane.layout
    k = layout.n_inputs
    for i, t in enumerate(layout.tensors[k:], start=k):
        if places[i][0]:
            p = external[("output", t.name)]
            shape = ((n,) if layout.batching else ()) + tuple(t.dims)
            out[t.name] = p.region.view_array(f"model '{name}' output '{t.name}'", p.offset, t.dtype, shape)
            p.written = True
    return out


def model_signature(repository: str, name: str) -> tuple[tuple[str, int, int], ...]:
    """What poll mode compares: every file and directory under the model's, with size and mtime."""
    root = os.path.join(repository, name)
    out: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for entry in sorted(filenames) + dirnames:
            path = os.path.join(dirpath, entry)
            try:
                st = os.stat(path)
            except OSError:  # removed meanwhile: the next rescan sees the rest
                continue
            out.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return tuple(out)
