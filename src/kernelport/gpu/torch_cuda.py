"""PyTorch on a GPU over host lane rows: pinned rows, a copy stream, a compute stream, CUDA graphs on request.

What a bound runner does for one batch (all buffers made when it is bound, none on the hot path):
1. copy stream: each input row block (host shared memory, registered with CUDA: page-locked, so the copy is
   a DMA) into a device input tensor made at bind; an event is recorded after the copies.
2. compute stream: waits for that event (not the host), runs the model (or replays the CUDA graph captured for
   this batch shape when the config asks for `optimization.cuda.graphs`), then copies each output into its
   output rows (device to pinned host).
3. the host waits for the compute stream, and the worker marks the batch done.
The two streams are separate so that the next batch's input copies can overlap this batch's compute once the
worker's loop hands the runner a batch before the previous one is done; today the worker runs batches one
after another, so each run waits for its own outputs.

Registering rows: `cudaHostRegister` on page-aligned ranges, reference counted per runner (`HostRegistry`), so
overlapping row blocks (the same slot bound at several batch sizes) are never registered twice, and each range is
unregistered when the last runner using it is dropped. A runner must be dropped before its lane's segment is
unmapped: the driver's DMA mapping would otherwise outlive the pages (the worker drops a lane's runners when
the lane is dropped). When registration fails (a limit on locked memory), the copy still runs correctly from
pageable memory, only slower, and a warning says so once.

Without graphs, the model's own intermediate tensors come from torch's caching allocator: after the first runs
it reuses its blocks and calls cudaMalloc no more (`torch.cuda.memory_stats()["segment.all.allocated"]` stays
put, which the GPU tests check). With graphs, the captured run's memory is the graph's own pool.
"""

from __future__ import annotations

import logging
import mmap
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from kernelport.gpu.cuda import CudaUnavailableError

__all__ = ["HostRegistry", "TorchCudaExecutor", "page_span"]

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE


def page_span(ptr: int, nbytes: int) -> tuple[int, int]:
    """[start, end) of the whole pages holding [ptr, ptr + nbytes)."""
    start = ptr - ptr % PAGE
    end = -(-(ptr + nbytes) // PAGE) * PAGE
    return start, end


class HostRegistry:
    """Page ranges registered with CUDA, reference counted; `register`/`unregister` are the driver calls
    (injected so the range arithmetic is checked without a GPU)."""

    def __init__(self, register: Callable[[int, int], bool], unregister: Callable[[int], None]) -> None:
        self._register = register
        self._unregister = unregister
        self.ranges: dict[int, list[int]] = {}  # start -> [end, refs]
        self.failed = False
        self._lock = threading.Lock()  # unpin runs from a finalizer, on whatever thread collects a runner

    def pin(self, ptr: int, nbytes: int) -> list[int]:
        """Make [ptr, ptr+nbytes) page-locked; returns the registrations it holds a reference on."""
        with self._lock:
            return self._pin(ptr, nbytes)

    def _pin(self, ptr: int, nbytes: int) -> list[int]:
        start, end = page_span(ptr, nbytes)
        held: list[int] = []
        cursor = start
        for s in sorted(self.ranges):
            e, _refs = self.ranges[s]
            if e <= start or s >= end:
                continue
            if s > cursor and self._add(cursor, s):
                held.append(cursor)
            self.ranges[s][1] += 1
            held.append(s)
            cursor = max(cursor, e)
        if cursor < end and self._add(cursor, end):
            held.append(cursor)
        return held

    def _add(self, start: int, end: int) -> bool:
        if not self._register(start, end - start):
            if not self.failed:
                log.warning("cannot page-lock lane rows (cudaHostRegister failed); copies run from pageable memory")
            self.failed = True
            return False
        self.ranges[start] = [end, 1]
        return True

    def unpin(self, held: Sequence[int]) -> None:
        with self._lock:
            self._unpin(held)

    def _unpin(self, held: Sequence[int]) -> None:
        for s in held:
            entry = self.ranges.get(s)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del self.ranges[s]
                self._unregister(s)


class TorchCudaExecutor:
    """One per worker: the device, its two streams and the registry of pinned rows."""

    def __init__(self, device: str = "cuda:0", *, graphs: bool = False) -> None:
        import torch

        if not torch.cuda.is_available():
            raise CudaUnavailableError(f"the pytorch backend cannot run on {device}: torch {torch.__version__} "
                                       "sees no GPU")
        self.torch = torch
        self.device = torch.device(device)
        self.graphs = graphs
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self.compute_stream = torch.cuda.Stream(device=self.device)
        cudart = torch.cuda.cudart()
        self.host = HostRegistry(lambda p, n: int(cudart.cudaHostRegister(p, n, 0)) == 0,
                                 lambda p: cudart.cudaHostUnregister(p))

    def bind(self, call: Callable[..., Any], flatten: Callable[[Any], Any], host_args: Sequence[Any],
             targets: Sequence[tuple[Any, Any, str]], mode: Callable[[], Any],
             check: Callable[[str, Any, Any], str | None]) -> Callable[[], None]:
        """A runner for these host tensors (CPU torch views of input rows, in the model's argument order)
        and output targets ((key, CPU torch view of the output rows, name)). `check(name, value, target)`
        returns an error text when a model output cannot go into its rows."""
        torch = self.torch
        held: list[int] = []
        for t in [*host_args, *(tgt for _k, tgt, _n in targets)]:
            if t.numel():
                held += self.host.pin(t.data_ptr(), t.numel() * t.element_size())
        dev_args = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in host_args]
        copy_stream, compute_stream = self.copy_stream, self.compute_stream
        ready = torch.cuda.Event()
        keys = [k for k, _t, _n in targets]

        def compute() -> list[Any]:
            values = flatten(call(*dev_args))
            return [values[k] for k in keys]

        graph = None
        static_out: list[Any] = []
        if self.graphs:
            with mode():
                side = torch.cuda.Stream(device=self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):  # warm-up runs outside capture (cuBLAS handles, lazy init)
                        compute()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=compute_stream):
                    static_out = compute()
            torch.cuda.synchronize(self.device)

        def run() -> None:
            with mode():
                with torch.cuda.stream(copy_stream):
                    for d, h in zip(dev_args, host_args, strict=True):
                        d.copy_(h, non_blocking=True)
                    ready.record(copy_stream)
                compute_stream.wait_event(ready)
                with torch.cuda.stream(compute_stream):
                    if graph is not None:
                        graph.replay()
                        outs = static_out
                    else:
                        outs = compute()
                    for (_k, target, name), value in zip(targets, outs, strict=True):
                        err = check(name, value, target)
                        if err:
                            raise ValueError(err)
                        target.copy_(value, non_blocking=True)
                compute_stream.synchronize()

        registry = self.host
        weakref.finalize(run, registry.unpin, held)
        run.device_args = dev_args  # type: ignore[attr-defined]  # for tests: the tensors made at bind
        return run
