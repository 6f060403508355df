"""The transport-independent data plane: every front end (local socket, gRPC, HTTP) calls this.

Remote requests are clients of the same lanes as local ones (owner SERVER_OWNER), so they batch
together with local requests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import _kpcore
from kernelport.client.lanes import SERVER_OWNER, ModelInfo, check_outputs, validate_inputs
from kernelport.errors import KernelPortError, ModelNotFoundError
from kernelport.repository import ModelSpec, load_model, load_repository, validate_model_name
from kernelport.server.models import READY, UNAVAILABLE, ModelRuntime, ServerOptions, scrub_paths
from kernelport.server.stats import StatsSnapshot, snapshot_from_counters

log = logging.getLogger("kernelport.server")

DEFAULT_TIMEOUT = 60.0


class DataPlane:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.models: dict[str, ModelRuntime] = {}
        self.load_errors: dict[str, str] = {}
        self.lock = threading.RLock()

    # ---- repository ----

    def load_all(self) -> None:
        errors: dict[str, Any] = {}
        entries = load_repository(self.options.repository, errors)
        for name, err in errors.items():
            log.error("model '%s' not loaded: %s", name, err)
            self.load_errors[name] = str(err)
        for name in entries:
            try:
                self.load(name)
            except KernelPortError as e:
                log.error("model '%s' not loaded: %s", name, e)

    def load(self, name: str) -> None:
        validate_model_name(name)
        if not os.path.isdir(os.path.join(self.options.repository, name)):
            raise ModelNotFoundError(f"model '{name}' is not in the model repository")
        entry = load_model(self.options.repository, name)
        with self.lock:
            old = self.models.get(name)
        if old is not None:
            old.unload()
        rt = ModelRuntime(entry, self.options)
        with self.lock:
            self.models[name] = rt
        try:
            rt.load()
        except KernelPortError as e:
            self.load_errors[name] = str(e)
            raise
        except Exception as e:
            message = scrub_paths(str(e), self.options.repository)
            self.load_errors[name] = message
            raise KernelPortError(f"model '{name}' failed to load: {message}") from None
        self.load_errors.pop(name, None)

    def unload(self, name: str) -> None:
        rt = self._runtime(name)
        rt.unload()

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
        return self._runtime(name).counters()

    # ---- inference ----

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
              timeout: float | None = None, queue_timeout: float | None = None) -> dict[str, np.ndarray]:
        """`queue_timeout` (seconds): the request's own queue timeout, honoured when the model's queue
        policy allows overriding its default."""
        rt = self._runtime(name)
        info = rt.require_ready()
        n, shapes, arrays, caps = validate_inputs(info, inputs)
        if outputs is not None:
            check_outputs(info, outputs)
        qt = info.queue_timeout(queue_timeout)
        if timeout:  # a request whose caller stops waiting (gRPC deadline) is not run after that
            qt = min(qt, timeout) if qt else timeout
        try:
            lane = rt.lane_for(shapes, caps)
            return lane.view.run(SERVER_OWNER, arrays, n, timeout or DEFAULT_TIMEOUT, name, outputs, None, qt)
        except _kpcore.LaneRetired:  # evicted between lookup and claim: the next lookup makes a new one
            lane = rt.lane_for(shapes, caps)
            return lane.view.run(SERVER_OWNER, arrays, n, timeout or DEFAULT_TIMEOUT, name, outputs, None, qt)
