"""A worker's CUDA streams and pre-allocated buffers: made at load, only borrowed on the hot path.

- `StreamPool`: a few streams made at load (compute, copy, ...), handed out round-robin. Streams are not owned
  exclusively: a batch borrows one for its run and the ordering between batches is the stream's.
- `BufferPool`: buffers made at load, in size classes (typically one per batch size the model will run:
  `batch_buffer_sizes`), borrowed and given back. A request that no pre-made buffer fits is a *miss*: counted,
  and refused (`HotPathAllocationError`) unless the pool was made with `grow=True`, in which case it allocates
  once and keeps the buffer (still counted, so a benchmark or a test sees it happened).

Allocation goes through an allocator object with one method, `allocate(nbytes) -> buffer` (the buffer has
`nbytes`; for device memory also `ptr`): `HostAllocator` (numpy; pageable host memory, the CPU build and the
tests), `PinnedHostAllocator` (torch pinned memory, for host staging), `TorchDeviceAllocator` (torch's caching
allocator on a device, so `torch.cuda.memory_stats()` shows every allocation) and `CupyDeviceAllocator`
(plain cudaMalloc through `cupy.cuda.Memory`, never managed memory). The bookkeeping is the same for all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kernelport.errors import KernelPortError
from kernelport.gpu.cuda import CudaUnavailableError

__all__ = [
    "ALIGNMENT",
    "BufferPool",
    "CupyDeviceAllocator",
    "HostAllocator",
    "HotPathAllocationError",
    "PinnedHostAllocator",
    "PoolStats",
    "StreamPool",
    "TorchDeviceAllocator",
    "batch_buffer_sizes",
]

ALIGNMENT = 256  # bytes; what cudaMalloc guarantees, and enough for every vector load


class HotPathAllocationError(KernelPortError):
    """A buffer was needed that the pool did not make at load (a size class is missing)."""

    grpc_code = "INTERNAL"


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def batch_buffer_sizes(row_bytes: int, batch_sizes: Iterable[int]) -> list[int]:
    """The size classes for a tensor of `row_bytes` per row run at these batch sizes, aligned, deduplicated."""
    if row_bytes < 0:
        raise ValueError(f"row bytes must be non-negative, got {row_bytes}")
    sizes = set()
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
        sizes.add(_align(max(1, row_bytes * b)))
    return sorted(sizes)


# ------------------------------------------------------------------------------------------ allocators


class HostAllocator:
    """Pageable host memory (numpy): the bookkeeping on a machine without CUDA, and the tests."""

    device = "cpu"

    def allocate(self, nbytes: int) -> Any:
        import numpy as np

        return np.empty(nbytes, dtype=np.uint8)


class PinnedHostAllocator:
    """Page-locked host memory through torch (cudaHostAlloc): staging for host-to-device copies."""

    device = "cpu-pinned"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise CudaUnavailableError(f"pinned host memory is not available: torch {torch.__version__} sees no GPU")
        self._torch = torch

    def allocate(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)


class TorchDeviceAllocator:
    """Device memory from torch's caching allocator on `device` ("cuda:0")."""

    def __init__(self, device: str = "cuda:0") -> None:
        import torch

        if not torch.cuda.is_available():
            raise CudaUnavailableError(f"device buffers are not available: torch {torch.__version__} sees no GPU")
        self._torch = torch
        self.device = device

    def allocate(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, device=self.device)


class CupyDeviceAllocator:
    """Plain cudaMalloc allocations (`cupy.cuda.Memory`, outside cupy's pool) on device `ordinal`: the kind
    CUDA IPC can export."""

    def __init__(self, ordinal: int = 0) -> None:
        try:
            import cupy
        except ImportError:
            raise CudaUnavailableError("device buffers are not available: cupy is not installed") from None
        self._cupy = cupy
        self.ordinal = ordinal
        self.device = f"cuda:{ordinal}"

    def allocate(self, nbytes: int) -> Any:
        with self._cupy.cuda.Device(self.ordinal):
            return self._cupy.cuda.Memory(nbytes)


# ------------------------------------------------------------------------------------------ streams


class StreamPool:
    """`size` streams made at load by `make_stream()`; `next()` hands them out round-robin."""

    def __init__(self, size: int, make_stream: Callable[[], Any]) -> None:
        if size < 1:
            raise ValueError(f"a stream pool needs at least one stream, got {size}")
        self.streams = [make_stream() for _ in range(size)]
        self._i = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.streams)

    def next(self) -> Any:
        with self._lock:
            s = self.streams[self._i]
            self._i = (self._i + 1) % len(self.streams)
        return s

    @classmethod
    def torch(cls, size: int, device: str = "cuda:0", priority: int = 0) -> StreamPool:
        import torch

        if not torch.cuda.is_available():
            raise CudaUnavailableError(f"CUDA streams are not available: torch {torch.__version__} sees no GPU")
        return cls(size, lambda: torch.cuda.Stream(device=device, priority=priority))

    @classmethod
    def cupy(cls, size: int, ordinal: int = 0) -> StreamPool:
        try:
            import cupy
        except ImportError:
            raise CudaUnavailableError("CUDA streams are not available: cupy is not installed") from None

        def make() -> Any:
            with cupy.cuda.Device(ordinal):
                return cupy.cuda.Stream(non_blocking=True)

        return cls(size, make)


# ------------------------------------------------------------------------------------------ buffers


@dataclass(frozen=True)
class PoolStats:
    size_classes: tuple[int, ...]
    buffers: int  # made, at load and by growth
    bytes: int  # their total size
    in_use: int
    hits: int  # acquisitions served by a free pre-made buffer
    misses: int  # acquisitions no free buffer could serve (refused, or served by growth)
    grown: int  # buffers allocated after load


class BufferPool:
    """Buffers of fixed size classes, `per_class` of each made at load by `allocator`.

    `acquire(nbytes)` returns the smallest free buffer of at least `nbytes`; `release(buf)` gives it back.
    Nothing is allocated after load unless `grow` (and then each growth is counted)."""

    def __init__(self, allocator: Any, sizes: Sequence[int], per_class: int = 2, *, grow: bool = False) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"buffer sizes must be positive, got {list(sizes)}")
        self.allocator = allocator
        self.grow = grow
        self._classes = sorted({_align(s) for s in sizes})
        self._free: dict[int, list[Any]] = {c: [] for c in self._classes}
        self._size_of: dict[int, int] = {}  # id(buffer) -> its class
        self._in_use: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._hits = self._misses = self._grown = 0
        self._bytes = 0
        for c in self._classes:
            for _ in range(per_class):
                self._free[c].append(self._make(c))

    def _make(self, size_class: int) -> Any:
        buf = self.allocator.allocate(size_class)
        self._size_of[id(buf)] = size_class
        self._bytes += size_class
        return buf

    def acquire(self, nbytes: int) -> Any:
        if nbytes <= 0:
            raise ValueError(f"a buffer of {nbytes} bytes makes no sense")
        with self._lock:
            for c in self._classes:
                if c >= nbytes and self._free[c]:
                    buf = self._free[c].pop()
                    self._in_use[id(buf)] = buf
                    self._hits += 1
                    return buf
            self._misses += 1
            if not self.grow:
                biggest = self._classes[-1] if self._classes else 0
                raise HotPathAllocationError(
                    f"no pre-allocated buffer of {nbytes} bytes is free (size classes up to {biggest} bytes, "
                    f"{len(self._in_use)} in use); the pool allocates only at load")
            c = _align(nbytes)
            if c not in self._free:
                self._free[c] = []
                self._classes = sorted([*self._classes, c])
            buf = self._make(c)
            self._grown += 1
            self._in_use[id(buf)] = buf
            return buf

    def release(self, buf: Any) -> None:
        with self._lock:
            if self._in_use.pop(id(buf), None) is None:
                raise ValueError("this buffer is not in use from this pool (released twice, or not its own)")
            self._free[self._size_of[id(buf)]].append(buf)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(tuple(self._classes), len(self._size_of), self._bytes, len(self._in_use),
                             self._hits, self._misses, self._grown)
