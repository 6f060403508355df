"""Lanes whose rows live in device memory, shared between processes with CUDA IPC.

A device lane keeps the host lane's protocol unchanged: the lane's header, slot headers and row words stay in
the host shared-memory segment (`_kpcore.Lane`; claim, commit, take, done and release are the same atomics),
and only the *data area* (every slot's rows of every tensor) is a device allocation. Row `r` of tensor `t` in
slot `s` is at the same offset from the start of the device data area as it is from the start of the host
data area (`device_offsets`), so one layout serves both and a slot's rows are one contiguous batch tensor
on the device.

Memory: the worker that owns the lane allocates the data area with plain cudaMalloc (`cupy.cuda.Memory`,
outside cupy's pool; never managed memory, which IPC cannot export and which can hang the GPU when
oversubscribed) on its device and exports it as an `IpcMemHandle` record (kernelport.gpu.ipc). A client opens
the handle once per process (`open_mapped`, a process-wide cache keyed by handle and device, reference
counted; CUDA maps an allocation once per context) and addresses rows by offset from the mapped base. After
opening, the allocation's real size is read back from the driver (cuMemGetAddressRange) and checked against
the record: a record that claims more than the allocation holds is refused.

Ordering across processes (the claim/commit protocol orders host memory only; device writes are asynchronous):
- client -> worker: the client's copies into its rows are enqueued on the client's stream; the client
  synchronises that stream (`DeviceRows.write_inputs`) before its commit. Commit is a release on the host row
  word and the worker's take an acquire, so when the worker launches its kernels the bytes are already in
  device memory: kernels launched afterwards, on any stream of any process, see them.
- worker -> client: the worker synchronises its compute stream before it marks the slot done (done is a
  release; the client's wait an acquire), so outputs are complete before any client reads them.
This costs one stream synchronisation on each side per request (a few microseconds) instead of an IPC event per
row; `InterprocessEvent` is here for the variant that makes the worker's copy stream wait on the client's
event instead (`cudaStreamWaitEvent` across processes), which needs an event handle per client in the
lane's row header and is not wired yet.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kernelport.gpu.cuda import CudaUnavailableError
from kernelport.gpu.ipc import IpcHandleError, IpcMemHandle, check_allocation

__all__ = [
    "DeviceAllocation",
    "DeviceRows",
    "InterprocessEvent",
    "MappedBuffer",
    "address_range",
    "device_data_size",
    "device_offsets",
    "open_mapped",
]


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise CudaUnavailableError("device lanes are not available: cupy is not installed") from None
    return cupy


# ------------------------------------------------------------------------------------------ layout


def device_offsets(host_slot_offsets: Sequence[Sequence[int]]) -> tuple[int, list[list[int]]]:
    """From the host lane's per-slot tensor offsets (`Lane.slot_offsets(s)` for every slot): the host offset
    where the data area starts, and the same offsets relative to it (the device data area's offsets)."""
    if not host_slot_offsets or not host_slot_offsets[0]:
        raise ValueError("a lane has at least one slot and one tensor")
    base = min(min(offs) for offs in host_slot_offsets)
    return base, [[o - base for o in offs] for offs in host_slot_offsets]


def device_data_size(host_segment_size: int, data_base: int) -> int:
    """Bytes of the device data area: everything from the host data area's start to the segment's end."""
    if not 0 <= data_base < host_segment_size:
        raise ValueError(f"data area start {data_base} is outside the {host_segment_size}-byte lane")
    return host_segment_size - data_base


# ------------------------------------------------------------------------------------------ driver


_libcuda: Any = None


def address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the device allocation holding `ptr`, from the driver (cuMemGetAddressRange_v2), in the
    context current on this thread (the runtime's primary context once cupy has touched the device)."""
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise CudaUnavailableError("the CUDA driver library (libcuda.so.1) is not available") from None
        fn = _libcuda.cuMemGetAddressRange_v2
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        fn.restype = ctypes.c_int
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = _libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise IpcHandleError(f"the driver does not know device address {ptr:#x} (CUresult {rc})")
    return int(base.value), int(size.value)


def _device_uuid(ordinal: int) -> str:
    env = os.environ.get("KERNELPORT_DEVICE_UUID", "")
    if env:
        return env
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception:
        return ""


# ------------------------------------------------------------------------------------------ owner side


class DeviceAllocation:
    """A cudaMalloc'd buffer this process owns and can export."""

    def __init__(self, nbytes: int, ordinal: int = 0) -> None:
        if nbytes <= 0:
            raise ValueError(f"a device allocation needs a positive size, got {nbytes}")
        cp = _cupy()
        self.ordinal = ordinal
        with cp.cuda.Device(ordinal):
            self.memory = cp.cuda.Memory(nbytes)  # cudaMalloc: exportable, unlike pool or managed memory
            base, size = address_range(int(self.memory.ptr))
        if base != int(self.memory.ptr) or size < nbytes:
            raise RuntimeError(f"cudaMalloc returned {int(self.memory.ptr):#x} inside [{base:#x}, +{size})")
        self.ptr = int(self.memory.ptr)
        self.nbytes = nbytes
        self.alloc_size = size

    def export(self) -> IpcMemHandle:
        cp = _cupy()
        with cp.cuda.Device(self.ordinal):
            handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self.ptr))
        return IpcMemHandle(handle, 0, self.nbytes, self.alloc_size, _device_uuid(self.ordinal), self.ordinal,
                            os.getpid())


# ------------------------------------------------------------------------------------------ user side


@dataclass
class _Opened:
    base: int
    alloc_size: int
    refs: int
    ordinal: int


_opened: dict[tuple[bytes, str], _Opened] = {}
_opened_lock = threading.Lock()


class MappedBuffer:
    """A buffer of another process's allocation, mapped in this one. `close()` drops this reference; the
    mapping goes when the last reference in the process does."""

    def __init__(self, record: IpcMemHandle, base: int, ordinal: int) -> None:
        self.record = record
        self.ptr = base + record.offset
        self.byte_size = record.byte_size
        self.ordinal = ordinal
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        with _opened_lock:
            entry = _opened.get(self.record.key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs:
                return
            del _opened[self.record.key]
        cp = _cupy()
        with cp.cuda.Device(entry.ordinal):
            cp.cuda.runtime.ipcCloseMemHandle(entry.base)

    def array(self, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
        """A cupy array of `shape` at `offset` in this buffer (bounds checked, no copy)."""
        import numpy as np

        from kernelport.gpu.tensors import device_array

        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        check_allocation("device row view", offset, nbytes, self.byte_size)
        return device_array(self.ptr + offset, shape, dtype, self, self.ordinal)


def open_mapped(record: IpcMemHandle, ordinal: int = 0) -> MappedBuffer:
    """Map `record`'s allocation in this process (once; later calls share the mapping) and check its size."""
    if record.pid == os.getpid():
        raise IpcHandleError("a process cannot open its own CUDA IPC handle; use the allocation directly")
    cp = _cupy()
    with _opened_lock:
        entry = _opened.get(record.key)
        if entry is None:
            with cp.cuda.Device(ordinal):
                base = int(cp.cuda.runtime.ipcOpenMemHandle(record.handle,
                                                            cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess))
                try:
                    real_base, real_size = address_range(base)
                    if real_base != base:
                        raise IpcHandleError("the opened handle does not map an allocation's start")
                except BaseException:
                    cp.cuda.runtime.ipcCloseMemHandle(base)
                    raise
            entry = _Opened(base, real_size, 0, ordinal)
            _opened[record.key] = entry
        try:
            check_allocation("CUDA IPC handle", record.offset, record.byte_size, entry.alloc_size)
        except IpcHandleError:
            if entry.refs == 0:
                del _opened[record.key]
                with cp.cuda.Device(ordinal):
                    cp.cuda.runtime.ipcCloseMemHandle(entry.base)
            raise
        entry.refs += 1
        return MappedBuffer(record, entry.base, entry.ordinal)


def opened_count() -> int:
    """Allocations this process has mapped (for tests: a handle is opened once per process)."""
    with _opened_lock:
        return len(_opened)


# ------------------------------------------------------------------------------------------ rows


class DeviceRows:
    """Views of a device lane's rows: `views[slot][tensor]` is a cupy array [max_batch, *dims] on the device.

    `buffer` is a DeviceAllocation (the worker) or a MappedBuffer (a client); `offsets` come from
    `device_offsets` of the host lane's layout; `tensors` give each tensor's dims and numpy dtype."""

    def __init__(self, buffer: Any, offsets: list[list[int]], max_batch: int,
                 tensors: Sequence[tuple[tuple[int, ...], Any]]) -> None:
        from kernelport.gpu.tensors import device_array

        self.buffer = buffer
        self._stream: Any = None
        size = getattr(buffer, "byte_size", None) or buffer.nbytes
        self.views: list[list[Any]] = []
        for slot_offs in offsets:
            per = []
            for off, (dims, dtype) in zip(slot_offs, tensors, strict=True):
                shape = (max_batch, *dims)
                import numpy as np

                check_allocation("device lane row", off, math.prod(shape) * np.dtype(dtype).itemsize, size)
                per.append(device_array(buffer.ptr + off, shape, dtype, buffer, buffer.ordinal))
            self.views.append(per)

    def write_inputs(self, slot: int, row: int, inputs: Sequence[Any], stream: Any = None) -> None:
        """Copy each input (torch/cupy device tensors, or numpy) into rows `row…` of `slot`, then synchronise
        the stream: the bytes are on the device before the caller commits (see the module's ordering rule)."""
        from kernelport.gpu.tensors import copy_to_device

        cp = _cupy()
        if stream is None:
            if self._stream is None:  # made once, on first use, not per request
                self._stream = cp.cuda.Stream(non_blocking=True)
            stream = self._stream
        s = stream
        for t, value in enumerate(inputs):
            n = int(value.shape[0])
            copy_to_device(self.views[slot][t][row: row + n], value, s)
        s.synchronize()


class InterprocessEvent:
    """A CUDA event other processes can wait on (cudaEventInterprocess | cudaEventDisableTiming)."""

    def __init__(self, event: Any, handle: bytes) -> None:
        self.event = event
        self.handle = handle

    @classmethod
    def create(cls) -> InterprocessEvent:
        cp = _cupy()
        ev = cp.cuda.Event(block=False, disable_timing=True, interprocess=True)
        return cls(ev, bytes(cp.cuda.runtime.ipcGetEventHandle(ev.ptr)))

    @staticmethod
    def open_ptr(handle: bytes) -> int:
        """The raw cudaEvent_t of another process's event (wait on it with cudaStreamWaitEvent)."""
        if len(handle) != 64:
            raise IpcHandleError(f"a cudaIpcEventHandle_t is 64 bytes, got {len(handle)}")
        return int(_cupy().cuda.runtime.ipcOpenEventHandle(handle))
