"""The worker process: one per model instance, started with `spawn`.

It imports only its backend's framework, loads the model, reports what the model takes, then runs the
batching loop itself: wait for a batch on its lanes (in C, GIL released), run the backend on the
slot's rows in place, mark the slot done. Control messages from the server (new lanes, shape
queries, stop) arrive on a pipe, announced by a ring of the doorbell.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

import numpy as np

import _kpcore
from kernelport.client import bytes_codec
from kernelport.client.lanes import LaneLayout, LaneView
from kernelport.repository import ModelSpec
from kernelport.server.external import ExternalTable, Place

log = logging.getLogger("kernelport.worker")

EXTERNAL_RUNNERS = 16  # bindings to client regions kept (a client reusing its places reuses them)


@dataclass
class BatchPolicy:
    window: float = 0.0001  # seconds since the first claim before a partial batch closes
    close_at: int = 1  # close as soon as this many rows are claimed
    commit_timeout: float = 0.1
    pause_iters: int = 2000
    idle_spin: float = 0.0005  # stay awake this long after work before sleeping

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchPolicy:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Worker:
    def __init__(self, conn: Connection, params: dict[str, Any]) -> None:
        self.conn = conn
        self.params = params
        self.model = params["model"]
        self.backend: Any = None
        self.bell: Any = None
        self.stats: Any = None
        self.policy = BatchPolicy()
        self.lane_ids: list[int] = []
        self.lanes: list[LaneView] = []
        self.raw_lanes: list[Any] = []
        self.sched = _kpcore.Scheduler()  # priority levels and tenant shares among the lanes
        self.runners: dict[tuple[int, int, int], Callable[[], None]] = {}
        self.external: ExternalTable | None = None  # requests with tensors in client regions
        self.regions: dict[int, _kpcore.FencedMapping] = {}  # client regions mapped here, by id
        self.external_runners: OrderedDict[tuple[Any, ...], Callable[[], None]] = OrderedDict()
        self.batching = True
        self.parent = os.getppid()

    # ---- start-up ----

    def load(self) -> None:
        from kernelport.backends import load_backend

        spec = ModelSpec.from_proto(_config_from_bytes(self.params["config"]), source=self.params["config_source"])
        _place_process(spec.parameters, spec.name)
        backend = load_backend(self.params["platform"])
        backend.load(self.params["model_path"], spec)
        self.backend = backend
        inputs, outputs = backend.io_signature()
        self.conn.send(("loaded", {
            "inputs": [_sig(t) for t in inputs],
            "outputs": [_sig(t) for t in outputs],
            "framework": backend.framework_version(),
            "device": backend.device(),
            "passthrough": backend.passthrough_outputs(),
            "pid": os.getpid(),
        }))

    def start(self, payload: dict[str, Any]) -> None:
        if payload.get("config") is not None:
            # the server completed the config from what we reported: load with the completed one
            spec = ModelSpec.from_proto(_config_from_bytes(payload["config"]), source=self.params["config_source"])
            self.backend.close()
            self.backend.load(self.params["model_path"], spec)
        fd = recv_handle(self.conn)
        self.bell = _kpcore.Doorbell(_kpcore.Segment.from_fd(fd, _kpcore.DOORBELL_BYTES))
        fd = recv_handle(self.conn)
        self.stats = _kpcore.StatsBlock(_kpcore.Segment.from_fd(fd, int(payload["stats_size"])),
                                        int(payload["max_rows"]))
        if payload.get("external_size"):
            fd = recv_handle(self.conn)
            self.external = ExternalTable(_kpcore.Segment.from_fd(fd, int(payload["external_size"])))
        self.policy = BatchPolicy.from_dict(payload["policy"])
        self.batching = bool(payload["batching"])
        self.conn.send(("started", None))

    # ---- control ----

    def handle_control(self) -> bool:
        """Serve every pending control message; False when told to stop."""
        while self.conn.poll(0):
            msg = self.conn.recv()
            op = msg[0]
            if op == "lane":
                layout = LaneLayout.from_dict(msg[1])
                fd = recv_handle(self.conn)
                try:
                    seg = _kpcore.Segment.from_fd(fd, layout.size)
                    view = LaneView.attach(layout, seg, self.bell)
                    self.lane_ids.append(layout.lane_id)
                    self.lanes.append(view)
                    self.raw_lanes.append(view.lane)
                    self._schedule()
                    self.conn.send(("ok", layout.lane_id))
                except Exception as e:  # report, keep serving the other lanes
                    self.conn.send(("error", f"cannot map lane: {e}"))
            elif op == "drop":
                lane_id = int(msg[1])
                if lane_id in self.lane_ids:
                    i = self.lane_ids.index(lane_id)
                    del self.lane_ids[i], self.lanes[i], self.raw_lanes[i]
                    self.runners.clear()
                    self._schedule()
                self.conn.send(("ok", lane_id))
            elif op == "region":  # map a client's registered region (id, bytes) for external requests
                fd = recv_handle(self.conn)
                try:
                    self.regions[int(msg[1])] = _kpcore.FencedMapping(fd, int(msg[2]))
                    self.external_runners.clear()  # a region mapped again: bindings to the old one go
                    self.conn.send(("ok", msg[1]))
                except Exception as e:
                    self.conn.send(("error", f"cannot map the shared memory region: {e}"))
            elif op == "unregion":
                self.regions.pop(int(msg[1]), None)
                self.external_runners.clear()  # they hold views of it
                self.conn.send(("ok", msg[1]))
            elif op == "shapes":
                try:
                    shapes = self.backend.output_shapes({k: tuple(v) for k, v in msg[1].items()})
                    self.conn.send(("ok", {k: list(v) for k, v in shapes.items()}))
                except Exception as e:
                    self.conn.send(("error", str(e)))
            elif op == "stop":
                self.conn.send(("ok", None))
                return False
            else:
                self.conn.send(("error", f"unknown control message {op!r}"))
        return True

    def _schedule(self) -> None:
        """Tell the scheduler each lane's priority level and tenant class (by its place in the list)."""
        for i, view in enumerate(self.lanes):
            lay = view.layout
            self.sched.set_lane(i, lay.priority, lay.share_class, lay.weight)

    # ---- the batching loop ----

    def runner(self, lane_index: int, seq: int, n: int) -> Callable[[], None]:
        view = self.lanes[lane_index]
        key = (view.layout.lane_id, seq % view.layout.nslots, n)
        r = self.runners.get(key)
        if r is None:
            rows = view.rows(seq, 0, n)
            k = view.layout.n_inputs
            names = [t.name for t in view.layout.tensors]
            if any(t.is_bytes for t in view.layout.tensors):
                r = self._bytes_runner(view.layout.tensors, rows, k)
            else:
                r = self.backend.bind(dict(zip(names[:k], rows[:k])), dict(zip(names[k:], rows[k:])))
            self.runners[key] = r
        return r

    def external_runner(self, lane_index: int, seq: int, samples: int,
                        places: tuple[Place, ...]) -> tuple[Callable[[], None], list[_kpcore.FencedMapping]]:
        """The runner of a request whose tensors (some of them) are in client regions: bound to the
        regions' memory where the entry says so, to the slot's rows elsewhere. Also the mappings it
        uses, to check before and after the run."""
        view = self.lanes[lane_index]
        lay = view.layout
        if len(places) != len(lay.tensors) or samples < 1 or samples > lay.max_batch:
            raise ValueError("the external entry does not match the lane")
        key = (lay.lane_id, seq % lay.nslots, samples, places)
        rows = view.rows(seq, 0, samples)
        maps = []
        for region, _, _ in places:
            if region:
                m = self.regions.get(region)
                if m is None:
                    raise ValueError("the request's shared memory region is not mapped in this worker")
                maps.append(m)
        r = self.external_runners.get(key)
        if r is not None:
            self.external_runners.move_to_end(key)
            return r, maps
        arrays = []
        for t, rowset, (region, offset, nbytes) in zip(lay.tensors, rows, places):
            if not region:
                arrays.append(rowset)
                continue
            m = self.regions[region]
            if t.is_bytes or nbytes != rowset.nbytes or offset > m.nbytes or nbytes > m.nbytes - offset:
                raise ValueError(f"tensor '{t.name}': its place in the shared memory region does not fit it")
            arrays.append(np.frombuffer(memoryview(m), dtype=rowset.dtype, count=rowset.size, offset=offset)
                          .reshape(rowset.shape))
        k = lay.n_inputs
        names = [t.name for t in lay.tensors]
        r = self.backend.bind(dict(zip(names[:k], arrays[:k])), dict(zip(names[k:], arrays[k:])))
        self.external_runners[key] = r
        while len(self.external_runners) > EXTERNAL_RUNNERS:
            self.external_runners.popitem(last=False)
        return r, maps

    def run_external(self, lane_index: int, seq: int, samples: int, places: tuple[Place, ...]) -> None:
        run, maps = self.external_runner(lane_index, seq, samples, places)
        if not all(m.intact() for m in maps):
            raise ValueError("the shared memory region shrank below its registered size")
        run()
        if any(m.faulted for m in maps):
            # its pages are private zeros now: forget it (the server maps it again for a later request)
            for rid, m in list(self.regions.items()):
                if m.faulted:
                    del self.regions[rid]
            self.external_runners.clear()
            raise ValueError("the shared memory region shrank while the request ran")

    def _bytes_runner(self, tensors: Any, rows: list[Any], k: int) -> Callable[[], None]:
        """BYTES tensors cannot be bound in place: decode the inputs, run, encode the outputs (one copy
        each way)."""
        backend = self.backend

        def run() -> None:
            feeds = {t.name: bytes_codec.decode(r, r.shape[:-1]) if t.is_bytes else r
                     for t, r in zip(tensors[:k], rows[:k])}
            results = backend._run_unbound(feeds)
            for t, r in zip(tensors[k:], rows[k:]):
                value = np.asarray(results[t.name])
                if t.is_bytes:
                    bytes_codec.encode_into(r, bytes_codec.as_bytes_elements(value))
                else:
                    np.copyto(r, value.reshape(r.shape), casting="no")

        return run

    def serve(self) -> None:
        p = self.policy
        next_batch = _kpcore.next_batch
        clock = time.perf_counter_ns
        stats = self.stats
        sched = self.sched
        external = self.external
        while True:
            rc = next_batch(self.raw_lanes, self.bell, p.window, p.close_at, p.commit_timeout, 0.1,
                            p.pause_iters, p.idle_spin, sched)
            if type(rc) is tuple:
                li, seq, n, live = rc
                lane = self.raw_lanes[li]
                if live == 0:  # every request expired in the queue: nothing to run
                    lane.complete(seq, 0, "", stats, 0)
                    continue
                t0 = clock()
                ext = external.find(self.lane_ids[li], seq) if external is not None and external.busy() else None
                try:
                    if ext is None:
                        self.runner(li, seq, n)()
                    else:
                        self.run_external(li, seq, ext[0], ext[1])
                except Exception as e:
                    log.warning("model '%s': batch of %d failed: %s", self.model, n, e)
                    lane.complete(seq, 1, f"{type(e).__name__}: {e}"[:230], stats, clock() - t0,
                                  0 if ext is None else ext[0])
                else:
                    lane.complete(seq, 0, "", stats, clock() - t0, 0 if ext is None else ext[0])
                continue
            if os.getppid() != self.parent:
                return  # the server is gone
            if not self.handle_control():
                return


def _place_process(parameters: Any, model: str) -> None:
    """CPU share and placement of this worker: nice from kernelport.model_weight, affinity from
    kernelport.cpus (before the framework starts its threads, which inherit both)."""
    from kernelport.server.scheduling import model_cpus, model_nice

    nice = model_nice(parameters, model)
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    cpus = model_cpus(parameters, model)
    if cpus is not None:
        usable = cpus & os.sched_getaffinity(0)
        if not usable:
            from kernelport.errors import ConfigError

            raise ConfigError(f"model '{model}': parameter kernelport.cpus names no CPU this machine lets it use")
        os.sched_setaffinity(0, usable)


def _sig(t: Any) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}


def _config_from_bytes(data: bytes) -> Any:
    from kernelport.protocol import message_class

    msg = message_class("inference.ModelConfig")()
    msg.ParseFromString(data)
    return msg


def worker_main(conn: Connection, params: dict[str, Any]) -> None:
    """Entry point of the spawned worker process."""
    logging.basicConfig(level=params.get("log_level", "INFO"), format="%(asctime)s worker %(message)s",
                        stream=sys.stderr)
    w = Worker(conn, params)
    try:
        w.load()
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        log.debug("%s", traceback.format_exc())
        return
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "start":
                w.start(msg[1])
                break
            if msg[0] == "shapes":
                try:
                    shapes = w.backend.output_shapes({k: tuple(v) for k, v in msg[1].items()})
                    conn.send(("ok", {k: list(v) for k, v in shapes.items()}))
                except Exception as e:
                    conn.send(("error", str(e)))
            elif msg[0] == "stop":
                conn.send(("ok", None))
                return
        w.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        if w.backend is not None:
            w.backend.close()


__all__ = ["BatchPolicy", "worker_main"]
