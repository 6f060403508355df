"""Per-model inference statistics, in the shape of Triton's ModelStatistics.

The data plane owns one `ModelStats` per loaded model version and calls its `record_*` methods; transports
read a consistent `snapshot()`. Meanings follow Triton's statistics extension:

- per *request*: `success` / `fail` (end-to-end duration), `queue` (waiting for a batch), `compute_input`
  (copying the request's inputs into the batch), `compute_infer` (the backend run), `compute_output` (copying
  outputs back); each a count and a total in nanoseconds.
- per *execution* (one backend run of a batch): `execution_count`, and per batch size the count and the
  compute_input / compute_infer / compute_output durations of the executions of that size.
- `inference_count`: samples inferred (a request with batch dimension n counts n).
- `last_inference_ms`: wall-clock time of the last request that finished, in ms since the epoch (0: never).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Duration:
    """A count of events and their total duration."""

    count: int = 0
    ns: int = 0

    def plus(self, ns: int, count: int = 1) -> Duration:
        return Duration(self.count + count, self.ns + max(0, int(ns)))


@dataclass(frozen=True)
class BatchStats:
    """The executions of one batch size."""

    batch_size: int
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent, immutable copy of a model's statistics at one instant."""

    name: str
    version: str
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    inference_count: int
    execution_count: int
    last_inference_ms: int
    batch_stats: tuple[BatchStats, ...]  # sorted by batch_size


def snapshot_from_counters(name: str, version: str, c: dict[str, Any]) -> StatsSnapshot:
    """A snapshot from a model's shared statistics block (`_kpcore.StatsBlock.snapshot()`), which its
    workers keep for every request they run, local and remote alike.

    Inputs are read from the rows where the client wrote them and outputs are computed into rows, so
    compute_input and compute_output are zero on this path; compute_infer is the backend's run."""
    per_size = tuple(
        BatchStats(size, Duration(int(count), 0), Duration(int(count), int(ns)), Duration(int(count), 0))
        for size, (count, ns) in sorted(c["by_size"].items())
    )
    success = Duration(int(c["success_count"]), int(c["success_ns"]))
    return StatsSnapshot(
        name=name,
        version=version,
        success=success,
        fail=Duration(int(c["fail_count"]), int(c["fail_ns"])),
        queue=Duration(success.count, int(c["queue_ns"])),
        compute_input=Duration(success.count, 0),
        compute_infer=Duration(success.count, int(c["infer_ns"])),
        compute_output=Duration(success.count, 0),
        inference_count=int(c["inference_count"]),
        execution_count=int(c["execution_count"]),
        last_inference_ms=int(c["last_inference_ms"]),
        batch_stats=per_size,
    )
