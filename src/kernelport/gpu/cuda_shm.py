"""Client-registered CUDA shared memory (the gRPC CUDA shared-memory extension), kept CUDA-free in the server.

A remote-protocol client on the same host allocates device memory (cudaMalloc), exports it with
`cudaIpcGetMemHandle` and registers the 64 handle bytes with a device id and a byte size
(`CudaSharedMemoryRegister`; tritonclient: `cuda_shared_memory.create_shared_memory_region`, `get_raw_handle`,
`register_cuda_shared_memory`). Requests then name the region instead of carrying tensor bytes.

The server process never initialises CUDA, so the handles are opened by a helper process (`CudaIpcHelper`,
started with `spawn` on the first registration) that owns the CUDA context: it opens each handle once
(reference counted by handle bytes: CUDA maps an allocation once per context), reads the allocation's real
size from the driver (cuMemGetAddressRange), and copies between the device region and host memory when a
request reads its inputs from the region or writes its outputs there. The registered byte size is checked
against that real size: a registration that claims more than the allocation holds is refused
(INVALID_ARGUMENT), never trusted.

Without CUDA (no device nodes, no cupy) registration answers UNAVAILABLE ("CUDA shared memory is not
available: ..."), after the request's own fields are checked. Like system shared memory, registration needs the
server to allow client shared memory (`allow_client_shm`); unregistering an unknown name succeeds.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from kernelport.errors import InvalidInputError, KernelPortError
from kernelport.gpu.cuda import CudaUnavailableError, require_cuda
from kernelport.gpu.ipc import UINT64_MAX, check_handle_bytes, check_span, raw_mem_handle
from kernelport.server.shm_registry import RegionExistsError, RegionNotFoundError, RegionTable

__all__ = ["CudaIpcHelper", "CudaRegion", "CudaRegionInfo", "CudaSharedMemoryRegistry"]

log = logging.getLogger(__name__)
_NAME_MAX = 256
WHAT = "CUDA shared memory"


class CudaShmDisabledError(KernelPortError):
    grpc_code = "UNAVAILABLE"


# the system regions' errors: a CUDA region is not found or already exists with the same status codes
CudaRegionNotFoundError = RegionNotFoundError
CudaRegionExistsError = RegionExistsError


@dataclass(frozen=True)
class CudaRegionInfo:
    name: str
    device_id: int
    byte_size: int


# ------------------------------------------------------------------------------------------ the helper


def _helper_main(conn: Connection) -> None:
    """The helper process: owns the CUDA context; answers open / read / write / close."""
    import cupy

    from kernelport.gpu.device_lane import address_range

    rt = cupy.cuda.runtime
    opened: dict[tuple[bytes, int], list[int]] = {}  # (handle, device) -> [base, alloc size, refs]
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        try:
            if op == "stop":
                conn.send(("ok", None))
                return
            if op == "open":
                _, handle, device = msg
                key = (handle, device)
                entry = opened.get(key)
                if entry is None:
                    rt.setDevice(device)
                    base = int(rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess))
                    real_base, size = address_range(base)
                    if real_base != base:
                        rt.ipcCloseMemHandle(base)
                        raise ValueError("the handle does not map the start of an allocation")
                    entry = opened[key] = [base, size, 0]
                entry[2] += 1
                conn.send(("ok", entry[1]))
            elif op == "close":
                _, handle, device = msg
                entry = opened.get((handle, device))
                if entry is not None:
                    entry[2] -= 1
                    if entry[2] == 0:
                        rt.setDevice(device)
                        rt.ipcCloseMemHandle(entry[0])
                        del opened[(handle, device)]
                conn.send(("ok", None))
            elif op == "read":
                _, handle, device, offset, nbytes = msg
                base = opened[(handle, device)][0]
                rt.setDevice(device)
                host = bytearray(nbytes)
                if nbytes:
                    dst = (ctypes.c_char * nbytes).from_buffer(host)
                    rt.memcpy(ctypes.addressof(dst), base + offset, nbytes, getattr(rt, "memcpyDeviceToHost", 2))
                conn.send(("ok", bytes(host)))
            elif op == "write":
                _, handle, device, offset, data = msg
                base = opened[(handle, device)][0]
                rt.setDevice(device)
                buf = bytearray(data)
                if buf:
                    src = (ctypes.c_char * len(buf)).from_buffer(buf)
                    rt.memcpy(base + offset, ctypes.addressof(src), len(buf), getattr(rt, "memcpyHostToDevice", 1))
                conn.send(("ok", None))
            else:
                conn.send(("error", f"unknown operation {op!r}"))
        except Exception as e:  # CUDARuntimeError with the driver's words; reported, the helper goes on
            conn.send(("error", f"{type(e).__name__}: {e}"))


class CudaIpcHelper:
    """The server's end of the helper process (started on first use, stopped with the registry)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_helper_main, args=(child,), name="kp-cuda-ipc", daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()

    def call(self, *msg: Any, timeout: float = 60.0) -> Any:
        with self._lock:
            try:
                self._conn.send(msg)
                if not self._conn.poll(timeout):
                    raise CudaUnavailableError(f"{WHAT}: the CUDA helper did not answer within {timeout:.0f} s")
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                raise CudaUnavailableError(f"{WHAT}: the CUDA helper process is gone") from None
        if kind != "ok":
            raise InvalidInputError(f"{WHAT}: {payload}")
        return payload

    def stop(self) -> None:
        try:
            self.call("stop", timeout=5.0)
        except KernelPortError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()


# ------------------------------------------------------------------------------------------ regions


class CudaRegion:
    """One registered region; `read`/`write` have `SharedMemoryRegion`'s signatures, so the gRPC front end's
    request path serves both kinds alike (each access is one copy through the helper)."""

    def __init__(self, registry: CudaSharedMemoryRegistry, name: str, handle: bytes, device_id: int,
                 byte_size: int, alloc_size: int) -> None:
        self.registry = registry
        self.name = name
        self.handle = handle
        self.device_id = device_id
        self.byte_size = byte_size
        self.alloc_size = alloc_size
        self._users = 0
        self._retired = False

    def info(self) -> CudaRegionInfo:
        return CudaRegionInfo(self.name, self.device_id, self.byte_size)

    def read(self, what: str, offset: int, byte_size: int) -> memoryview:
        check_span(f"{what}: CUDA shared memory region '{self.name}'", offset, byte_size, self.byte_size)
        data = self.registry._helper_call("read", self.handle, self.device_id, offset, byte_size)
        return memoryview(data).toreadonly()

    def write(self, what: str, offset: int, data: bytes | bytearray | memoryview, capacity: int) -> None:
        nbytes = memoryview(data).nbytes
        if nbytes > capacity:
            raise InvalidInputError(
                f"{what}: shared memory byte size {capacity} is too small for the {nbytes}-byte result")
        check_span(f"{what}: CUDA shared memory region '{self.name}'", offset, capacity, self.byte_size)
        self.registry._helper_call("write", self.handle, self.device_id, offset, bytes(memoryview(data).cast("B")))


class CudaSharedMemoryRegistry(RegionTable[CudaRegion]):
    """Thread-safe table of CUDA regions; the helper process is started on the first registration."""

    kind = WHAT
    limit_error = CudaShmDisabledError

    def __init__(self, allowed: bool = False, *, max_regions: int = 1024) -> None:
        super().__init__(max_regions)
        self.allowed = allowed
        self._helper: CudaIpcHelper | None = None

    def available(self) -> bool:
        """Registration could work here (allowed, and a CUDA stack present); asks nothing of CUDA."""
        try:
            require_cuda(WHAT, bindings=("cupy",))
        except CudaUnavailableError:
            return False
        return self.allowed

    def _helper_call(self, *msg: Any) -> Any:
        with self._lock:
            if self._helper is None:
                self._helper = CudaIpcHelper()
            helper = self._helper
        return helper.call(*msg)

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        if not name or len(name) > _NAME_MAX:
            raise InvalidInputError(f"{WHAT} region name must be 1 to {_NAME_MAX} characters")
        what = f"{WHAT} region '{name}'"
        handle = raw_mem_handle(raw_handle, what)
        if device_id < 0 or device_id >= 2**31:
            raise InvalidInputError(f"{what}: device_id must be a non-negative device ordinal, got {device_id}")
        if byte_size <= 0 or byte_size > UINT64_MAX:
            raise InvalidInputError(f"{what}: byte size must be positive, got {byte_size}")
        require_cuda(WHAT, bindings=("cupy",))  # CudaUnavailableError (UNAVAILABLE) with the reason
        if not self.allowed:
            raise CudaShmDisabledError(
                f"{WHAT} is disabled on this server; start it with client shared memory allowed "
                "(allow_client_shm) to register regions")
        check_handle_bytes(handle, what)
        with self._lock:
            self._check_free(name)
        alloc_size = int(self._helper_call("open", handle, device_id))
        try:
            if byte_size > alloc_size:
                raise InvalidInputError(
                    f"{what}: byte size {byte_size} is larger than the device allocation ({alloc_size} bytes)")
            region = CudaRegion(self, name, handle, device_id, byte_size, alloc_size)
            with self._lock:
                self._check_free(name)  # a concurrent register of the same name may have won
                self._regions[name] = region
        except BaseException:
            self._close_handle(handle, device_id)
            raise

    def _close_handle(self, handle: bytes, device_id: int) -> None:
        try:
            self._helper_call("close", handle, device_id)
        except KernelPortError as e:
            log.warning("%s: closing a handle failed: %s", WHAT, e)

    def _close_region(self, region: CudaRegion) -> None:
        self._close_handle(region.handle, region.device_id)

    def close(self) -> None:
        self.unregister("")
        with self._lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.stop()
