"""The server's metrics, gathered when scraped: nothing on the request path writes anything for them.

Sources, all read here in the server process:
- each model's statistics block (`ModelRuntime.stats.snapshot()`), kept by its workers with atomic adds for
  every request, local and remote alike: Triton's `nv_inference_*` counters and the batch-size histogram;
- each model's lane counters (`ModelRuntime.counters()`: every live lane's shared header counters plus those
  of lanes evicted since the workers started): `kp_lane_*` and the waits;
- `ModelRuntime` attributes: state, load time, worker crashes and restarts, the worker processes (their
  resident memory from `/proc/<pid>/status`).

Counters restart from zero when a model's workers are (re)started (a new statistics block, doorbell and
lanes), as Triton's do when a model is reloaded; Prometheus' `rate()` treats that as a counter reset.

`nv_inference_request_failure` has three reasons: BACKEND, the requests of batches whose backend run failed
(the statistics block's failures less the requests that expired or were cancelled in the queue), REJECTED,
requests refused because the model's queue was full (the doorbell's count) or that expired in the queue past
their timeout (the lanes' count), and CANCELED, requests whose caller cancelled them (gRPC cancel or
deadline) while they were queued (the lanes' count). Requests refused before they reach a lane (a malformed
request, an unknown model) are the front ends' answers, not the model's failures, and are not counted here.

`nv_inference_pending_request_count` (requests claimed and not finished) is derived, per model, as
claims - (successes + failures) - abandoned rows, read in that order (statistics first, so a request that
finishes while we read is never counted as finished before it is counted as claimed), clamped at 0.
It is exact for requests of one row; a multi-row request that is abandoned (claimed and never committed, or
held by a client that went away) subtracts its row count, so the gauge can read low by n-1 for each such
request. A request its client cancels between claim and commit is not counted as abandoned by the lane, so
it stays in the gauge until the model's workers restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from kernelport.metrics.exposition import MetricFamily, render

__all__ = ["MODEL_STATES", "Collector", "read_rss_bytes"]

log = logging.getLogger(__name__)

MODEL_STATES = ("READY", "LOADING", "UNLOADING", "UNAVAILABLE")
_NS_PER_US = 1000

# Triton's per-model metrics: (name, help, statistics-block key or None for a duration that is zero here)
_NV_COUNTERS: tuple[tuple[str, str, str | None], ...] = (
    ("nv_inference_count", "Number of inferences performed (samples: a request of batch n counts n)",
     "inference_count"),
    ("nv_inference_exec_count", "Number of model executions performed (one per batch run)", "execution_count"),
    ("nv_inference_request_duration_us",
     "Cumulative end-to-end duration of successful inference requests (claim to done) in microseconds",
     "success_ns"),
    ("nv_inference_queue_duration_us",
     "Cumulative time successful requests waited for their batch to be taken (claim to take) in microseconds",
     "queue_ns"),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds; always 0 here: the clients write inputs straight "
     "into the batch rows the backend reads", None),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration of successful requests in microseconds (each request counts "
     "the backend run of the batch it was in)", "infer_ns"),
    ("nv_inference_compute_output_duration_us",
     "Cumulative compute output duration in microseconds; always 0 here: the backend writes outputs straight "
     "into the batch rows the clients read", None),
)

# KernelPort's lane counters: (metric name, help, lane counter key)
# The native gRPC engine's own counters (`H2Server.stats()` keys), through `DataPlane.frontend_stats`.
_FRONTEND_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kp_grpc_native_calls_total", "Calls the native gRPC engine handed to its handler threads", "calls"),
    ("kp_grpc_native_admission_rejections_total",
     "ModelInfer calls the native gRPC engine refused on its loop thread (queue full)", "rejected"),
    ("kp_grpc_native_connections_total", "Connections the native gRPC engine accepted", "connections"),
)

_LANE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kp_lane_claims_total", "Requests that claimed rows in a lane", "claims"),
    ("kp_lane_batches_total", "Batches the workers took from the lanes", "batches"),
    ("kp_lane_batch_rows_total", "Rows in the batches the workers took (abandoned rows included)", "rows"),
    ("kp_client_sleeps_total", "Client waits (for a batch or a free slot) that slept on a futex", "client_sleeps"),
    ("kp_worker_sleeps_total", "Worker waits for work that slept on a futex", "worker_sleeps"),
    ("kp_commit_timeouts_total", "Batches that waited the commit timeout for a claimed row", "commit_timeouts"),
    ("kp_full_waits_total", "Claims that found every batch slot busy and waited (back-pressure)", "full_waits"),
    ("kp_abandoned_rows_total",
     "Rows claimed and never committed (commit timeout, or their client went away)", "abandoned_rows"),
    ("kp_failed_batches_total", "Batches whose backend run failed", "failed_batches"),
    ("kp_expired_requests_total", "Requests that waited in the queue past their timeout and were not run",
     "expired_requests"),
    ("kp_cancelled_requests_total",
     "Requests cancelled (gRPC cancel or deadline) while queued, and not run", "cancelled_requests"),
)


def read_rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc/<pid>/status (VmRSS), None when it is gone."""
    try:
        with open(f"/proc/{int(pid)}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) * 1024 if len(parts) >= 2 else None  # the kernel reports kB
    except (OSError, ValueError):
        return None
    return None


def _histogram_bounds(max_batch: int) -> list[int]:
    """Bucket upper bounds of the batch-size histogram: every size up to 32, else powers of two and the max."""
    if max_batch <= 32:
        return list(range(1, max_batch + 1))
    bounds = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return bounds + [max_batch]


class _Families:
    """Every family, in the order they are written; created up front so each gets HELP/TYPE even when no
    model has a sample for it yet."""

    def __init__(self) -> None:
        self.all: dict[str, MetricFamily] = {}
        f = self.new
        self.success = f("nv_inference_request_success", "counter", "Number of successful inference requests")
        self.failure = f("nv_inference_request_failure", "counter",
                         "Number of failed inference requests, by reason (BACKEND: the backend run of the "
                         "request's batch failed; REJECTED: refused because the queue was full, or expired in "
                         "the queue past its timeout)")
        self.nv = [(f(name, "counter", text), key) for name, text, key in _NV_COUNTERS]
        self.pending = f("nv_inference_pending_request_count", "gauge",
                         "Requests claimed in a lane and not finished yet (claims - finished - abandoned rows)")
        self.load = f("nv_model_load_duration_secs", "gauge", "Time the model's last (re)load took, in seconds")
        self.batch = f("kp_batch_size", "histogram",
                       "Batch sizes the model executed (rows per backend run)")
        self.state = f("kp_model_state", "gauge", "1 for the model's current state, 0 for the others")
        self.lanes = f("kp_lanes", "gauge", "Lanes (one per distinct set of per-sample input shapes) mapped now")
        self.slots = f("kp_lane_slots", "gauge", "Batch slots across the model's lanes now")
        self.occupancy = f("kp_lane_occupancy_ratio", "gauge",
                           "Mean fill of the batches taken since the workers started: rows / (batches x max batch)")
        self.lane = [(f(name, "counter", text), key) for name, text, key in _LANE_COUNTERS]
        self.rss = f("kp_worker_resident_memory_bytes", "gauge", "Resident memory (VmRSS) of each worker process")
        self.workers = f("kp_workers", "gauge", "Worker processes of the model running now")
        self.crashes = f("kp_worker_crashes_total", "counter",
                         "Worker processes of the model that exited on their own (since the model was loaded)")
        self.restarts = f("kp_model_restarts_total", "counter",
                          "Times the server restarted the model's workers after a crash (since it was loaded)")
        self.tenant_requests = f("kp_tenant_requests_total", "counter",
                                 "Requests that claimed rows, by tenant (\"\": no tenant, or beyond max_tenants)")
        self.tenant_rows = f("kp_tenant_batch_rows_total", "counter",
                             "Rows the workers took, by tenant: each tenant's share of executions")
        self.frontend = [(f(name, "counter", text), key) for name, text, key in _FRONTEND_COUNTERS]

    def new(self, name: str, kind: str, help_text: str) -> MetricFamily:
        fam = MetricFamily(name, kind, help_text)
        self.all[name] = fam
        return fam


class Collector:
    """Reads every metric of a data plane's models when asked; `gpu` (an `NvmlMetrics`, or None) adds the
    GPU metrics. Thread-safe: scrapes may run at once."""

    def __init__(self, dataplane: Any, gpu: Any = None) -> None:
        self.dp = dataplane
        self.gpu = gpu
        # Failures by reason BACKEND are the statistics block's failures less the lane's expired requests,
        # read at slightly different moments (a request's expiry is counted when its batch is taken, its
        # failure when the batch is done): the last value written, per statistics block, is a floor, so the
        # counter never goes back.
        self._floors: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def _monotonic(self, key: tuple[str, int], value: int) -> int:
        with self._lock:
            value = max(0, value, self._floors.get(key, 0))
            self._floors[key] = value
            return value

    def collect(self) -> list[MetricFamily]:
        """Every metric of the server now."""
        fam = _Families()
        live: set[tuple[str, int]] = set()
        models = sorted(list(self.dp.models.items()))
        for name, rt in models:
            try:
                self._model_metrics(fam, name, rt, live)
            except Exception:  # one model's bad state never hides the others' metrics
                log.exception("metrics of model '%s' failed", name)
        with self._lock:
            for key in set(self._floors) - live:
                del self._floors[key]
        for stats in [f() for f in getattr(self.dp, "frontend_stats", ())]:  # the native gRPC engine's
            for family, stat in fam.frontend:
                family.add(int(stats.get(stat, 0)), {})
        for name in sorted(set(getattr(self.dp, "load_errors", {})) - {n for n, _ in models}):
            for s in MODEL_STATES:  # in the repository, but its configuration did not even parse
                fam.state.add(1 if s == "UNAVAILABLE" else 0, {"model": name, "state": s})
        families = list(fam.all.values())
        if self.gpu is not None:
            try:
                families.extend(self.gpu.collect())
            except Exception:
                log.exception("GPU metrics failed")
        return families

    def render(self) -> str:
        """The Prometheus text of every metric now."""
        return render(self.collect())

    def _model_metrics(self, fam: _Families, name: str, rt: Any, live: set[tuple[str, int]]) -> None:
        state = str(rt.state)
        for s in MODEL_STATES:
            fam.state.add(1 if s == state else 0, {"model": name, "state": s})
        info = rt.info
        version = str(info.versions[-1]) if info is not None and info.versions else ""
        labels = {"model": name, "version": version}
        running = 0
        for w in list(rt.workers):
            # /proc, not Process.is_alive(): that reaps with waitpid, which is the monitor thread's business
            pid = w.process.pid
            rss = read_rss_bytes(pid) if pid is not None else None
            if rss is not None:  # a process that exited (a zombie included) has no VmRSS
                running += 1
                fam.rss.add(rss, {**labels, "instance": str(w.index)})
        fam.workers.add(running, labels)
        fam.crashes.add(int(getattr(rt, "worker_crashes", 0)), labels)
        fam.restarts.add(int(getattr(rt, "restarts", 0)), labels)
        if rt.load_seconds:
            fam.load.add(float(rt.load_seconds), labels)

        stats = rt.stats
        if stats is None:  # never loaded: no counters yet
            return
        live.add((name, id(stats)))
        snap: Mapping[str, Any] = stats.snapshot()  # first, then the lane counters (see the module's docstring)
        lane = rt.counters()
        # the statistics block counts expired requests as failures; the doorbell counts the claims it refused
        expired = int(lane.get("expired_requests", 0))
        cancelled = int(lane.get("cancelled_requests", 0))
        rejected = int(getattr(rt.doorbell, "rejected", 0) or 0)
        fam.success.add(int(snap["success_count"]), labels)
        backend = self._monotonic((name, id(stats)), int(snap["fail_count"]) - expired - cancelled)
        fam.failure.add(backend, {**labels, "reason": "BACKEND"})
        fam.failure.add(expired + rejected, {**labels, "reason": "REJECTED"})
        fam.failure.add(cancelled, {**labels, "reason": "CANCELED"})
        for family, key in fam.nv:
            value = 0 if key is None else int(snap[key])
            family.add(value // _NS_PER_US if key is not None and key.endswith("_ns") else value, labels)
        finished = int(snap["success_count"]) + int(snap["fail_count"])
        fam.pending.add(max(0, int(lane.get("claims", 0)) - finished - int(lane.get("abandoned_rows", 0))), labels)

        by_size: Mapping[int, tuple[int, int]] = snap["by_size"]
        spec_max = int(getattr(rt.spec, "max_batch_size", 0) or 0)
        max_batch = max([1, spec_max, *(int(s) for s in by_size)])
        buckets = []
        for bound in _histogram_bounds(max_batch):
            buckets.append((float(bound), sum(int(c) for s, (c, _) in by_size.items() if int(s) <= bound)))
        count = sum(int(c) for c, _ in by_size.values())
        total = sum(int(s) * int(c) for s, (c, _) in by_size.items())
        fam.batch.add_histogram(labels, buckets, total, count)

        with rt.lock:
            entries = list(rt.lanes.values())
        fam.lanes.add(len(entries), labels)
        fam.slots.add(sum(int(e.layout.nslots) for e in entries), labels)
        for family, key in fam.lane:
            family.add(int(lane.get(key, 0)), labels)
        batches = int(lane.get("batches", 0))
        capacity = batches * max(1, spec_max)
        fam.occupancy.add(int(lane.get("rows", 0)) / capacity if capacity else 0.0, labels)
        for tenant, counts in sorted(rt.tenant_counters().items()):
            fam.tenant_requests.add(int(counts.get("claims", 0)), {**labels, "tenant": tenant})
            fam.tenant_rows.add(int(counts.get("rows", 0)), {**labels, "tenant": tenant})

