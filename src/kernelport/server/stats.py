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

import threading
import time
from dataclasses import dataclass, field


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


@dataclass
class ModelStats:
    """Live, thread-safe statistics of one model version.

    Writers call `record_success`, `record_failure` and `record_execution` (from any thread); readers call
    `snapshot()`. Each method takes the lock once, so a snapshot never shows half of a record.
    """

    name: str
    version: str = "1"
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_stats: dict[int, BatchStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_success(
        self,
        request_ns: int,
        *,
        queue_ns: int = 0,
        compute_input_ns: int = 0,
        compute_infer_ns: int = 0,
        compute_output_ns: int = 0,
        batch_size: int = 1,
        finished_ms: int | None = None,
    ) -> None:
        """One request finished successfully; `batch_size` is its own batch dimension (1 if unbatched)."""
        now_ms = int(time.time() * 1000) if finished_ms is None else finished_ms
        with self._lock:
            self.success = self.success.plus(request_ns)
            self.queue = self.queue.plus(queue_ns)
            self.compute_input = self.compute_input.plus(compute_input_ns)
            self.compute_infer = self.compute_infer.plus(compute_infer_ns)
            self.compute_output = self.compute_output.plus(compute_output_ns)
            self.inference_count += max(0, int(batch_size))
            self.last_inference_ms = max(self.last_inference_ms, now_ms)

    def record_failure(self, request_ns: int, *, finished_ms: int | None = None) -> None:
        """One request failed (after it reached the model: invalid requests rejected up front do not count)."""
        now_ms = int(time.time() * 1000) if finished_ms is None else finished_ms
        with self._lock:
            self.fail = self.fail.plus(request_ns)
            self.last_inference_ms = max(self.last_inference_ms, now_ms)

    def record_execution(
        self,
        batch_size: int,
        *,
        compute_input_ns: int = 0,
        compute_infer_ns: int = 0,
        compute_output_ns: int = 0,
    ) -> None:
        """The backend ran one batch of `batch_size` samples."""
        size = max(0, int(batch_size))
        with self._lock:
            self.execution_count += 1
            prev = self.batch_stats.get(size) or BatchStats(size)
            self.batch_stats[size] = BatchStats(
                size,
                prev.compute_input.plus(compute_input_ns),
                prev.compute_infer.plus(compute_infer_ns),
                prev.compute_output.plus(compute_output_ns),
            )

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                name=self.name,
                version=self.version,
                success=self.success,
                fail=self.fail,
                queue=self.queue,
                compute_input=self.compute_input,
                compute_infer=self.compute_infer,
                compute_output=self.compute_output,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                last_inference_ms=self.last_inference_ms,
                batch_stats=tuple(self.batch_stats[k] for k in sorted(self.batch_stats)),
            )
