"""Client-registered system shared memory regions (the gRPC system shared memory extension).

A remote-protocol client on the same host creates a POSIX shared memory object, registers a byte range of it
under a region name, then names that region in its requests instead of sending tensor bytes. The server maps
the object and reads inputs from it / writes outputs into it.

Rules, after Triton's shared-memory manager:
- Registration is refused unless the server was started with `allow_client_shm` (UNAVAILABLE, as Triton
  answers a restricted or absent shared-memory endpoint).
- Every offset and size from outside is checked with overflow-safe arithmetic (`a > size or b > size - a`,
  never `a + b > size` in a fixed-width type) against the object's real size at registration and the
  region's size at use.
- A region in use is unmapped only when its last request finishes: `unregister` removes the name at once
  (new requests get NOT_FOUND, the name may be registered again), the last `release` unmaps.
- Unregistering a name that is not registered succeeds (as in Triton), so clients may clean up blindly.

Trust: the key must be a plain POSIX shm name (one leading '/', then no '/'); it is opened with O_NOFOLLOW,
must be a regular file with a single link (a hard link to another segment is refused), and may not start
with a prefix the server reserves for its own segments. Error messages name the region, never the server's
paths or its segment keys.

A client may shrink its object at any time; touching a mapped page past the new end raises SIGBUS. The size
is re-checked (fstat) each time a region is used, and every copy from or to a region runs under a SIGBUS
guard (`_kpcore.guarded_copy`, `kp_guard.h`): a region cut short while it is copied fails that request
with INVALID_ARGUMENT and the server goes on. Inputs reach the lane rows through `LaneView.run(...,
guard=True)`, which the data plane always asks for.
"""

from __future__ import annotations

import _posixshmem  # the stdlib's shm_open (what multiprocessing.shared_memory uses)
import itertools
import logging
import math
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

import _kpcore
from kernelport.errors import InvalidInputError, KernelPortError

__all__ = [
    "RegionAccessError",
    "RegionExistsError",
    "RegionInfo",
    "RegionLimitError",
    "RegionNotFoundError",
    "SharedMemoryDisabledError",
    "SharedMemoryRegion",
    "SharedMemoryRegistry",
]

_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,250}")
_NAME_MAX = 256
UINT64_MAX = 2**64 - 1
log = logging.getLogger("kernelport.server")
DEFAULT_RESERVED_PREFIXES: tuple[str, ...] = ("kernelport", "kp_", "kp-")


class SharedMemoryDisabledError(KernelPortError):
    """The server was not started with client shared memory allowed."""

    grpc_code = "UNAVAILABLE"


class RegionNotFoundError(KernelPortError):
    grpc_code = "NOT_FOUND"


class RegionExistsError(KernelPortError):
    grpc_code = "ALREADY_EXISTS"


class RegionAccessError(KernelPortError):
    """The shm object exists but may not be mapped (permissions, reserved key, not a plain object)."""

    grpc_code = "PERMISSION_DENIED"


class RegionLimitError(KernelPortError):
    grpc_code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class RegionInfo:
    name: str
    key: str
    offset: int
    byte_size: int


def check_range(what: str, offset: int, byte_size: int, limit: int) -> None:
    """Raise InvalidInputError unless [offset, offset+byte_size) lies within [0, limit).

    Written so that no intermediate value exceeds its operands, as the same check must be in C.
    """
    if offset < 0 or byte_size < 0:
        raise InvalidInputError(
            f"{what}: offset and byte size must be non-negative, got {offset}, {byte_size}"
        )
    if offset > limit or byte_size > limit - offset:
        raise InvalidInputError(
            f"{what}: offset {offset} + byte size {byte_size} is outside the region's {limit} bytes"
        )


_region_ids = itertools.count(1)


class SharedMemoryRegion:
    """One registered region: a mapping of [0, offset+byte_size) of the client's object.

    `uid` names it to the model workers that map it too (kernelport.server.external); `on_close`
    callbacks run once when it is closed (its last request done after unregistering), so they unmap it."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self.uid = next(_region_ids)
        self._fd = fd
        self._mmap: mmap.mmap | None = mapping
        self._users = 0
        self._retired = False
        self.on_close: list[Callable[[SharedMemoryRegion], None]] = []
        self._close_lock = threading.Lock()

    @property
    def map_size(self) -> int:
        """The bytes of the object that are mapped: up to the region's end."""
        return self.offset + self.byte_size

    def dup_fd(self) -> int:
        """A new descriptor of the client's object, to hand to a worker."""
        if self._fd < 0:
            raise RegionNotFoundError(f"shared memory region '{self.name}' is unregistered")
        return os.dup(self._fd)

    def intact(self) -> bool:
        """The object still covers the whole region (the client may have shrunk it)."""
        return self._fd >= 0 and os.fstat(self._fd).st_size >= self.offset + self.byte_size

    def view_array(self, what: str, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """A read-only array over the region at `offset` (something else wrote it: a worker)."""
        count = math.prod(shape)
        mapping, start = self._checked_span(what, offset, count * dtype.itemsize)
        arr = np.frombuffer(mapping, dtype=dtype, count=count, offset=start).reshape(shape)
        arr.flags.writeable = False
        return arr

    def info(self) -> RegionInfo:
        return RegionInfo(self.name, self.key, self.offset, self.byte_size)

    def _checked_span(self, what: str, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
        check_range(f"{what}: shared memory region '{self.name}'", offset, byte_size, self.byte_size)
        mapping = self._mmap
        if mapping is None:  # only after close(); a user holds a reference, so not in normal use
            raise RegionNotFoundError(f"{what}: shared memory region '{self.name}' is unregistered")
        # The client may have shrunk its object since registration; touching pages past its end is SIGBUS.
        if os.fstat(self._fd).st_size < self.offset + self.byte_size:
            raise InvalidInputError(
                f"{what}: shared memory region '{self.name}' shrank below its registered {self.byte_size} bytes"
            )
        return mapping, self.offset + offset

    def read(self, what: str, offset: int, byte_size: int) -> memoryview:
        """A read-only view of `byte_size` bytes at `offset` within the region (valid while acquired)."""
        mapping, start = self._checked_span(what, offset, byte_size)
        return memoryview(mapping)[start : start + byte_size].toreadonly()

    def write(self, what: str, offset: int, data: bytes | bytearray | memoryview, capacity: int) -> None:
        """Copy `data` to `offset`, where the request gave `capacity` bytes; refuse if it does not fit."""
        nbytes = memoryview(data).nbytes
        if nbytes > capacity:
            raise InvalidInputError(
                f"{what}: shared memory byte size {capacity} is too small for the {nbytes}-byte result"
            )
        mapping, start = self._checked_span(what, offset, capacity)
        view = memoryview(mapping)
        try:
            self._guarded(what, view[start : start + nbytes], memoryview(data).cast("B"), "written")
        finally:
            view.release()

    def copy_out(self, what: str, offset: int, byte_size: int) -> bytearray:
        """A private copy of `byte_size` bytes at `offset` (what a parser may trust not to change)."""
        mapping, start = self._checked_span(what, offset, byte_size)
        out = bytearray(byte_size)
        view = memoryview(mapping)
        try:
            self._guarded(what, out, view[start : start + byte_size], "read")
        finally:
            view.release()
        return out

    def _guarded(self, what: str, dst: Any, src: Any, verb: str) -> None:
        """A copy that a client shrinking its object under us turns into an error, not a SIGBUS."""
        try:
            _kpcore.guarded_copy(dst, src)
        except _kpcore.SourceFault:
            raise InvalidInputError(
                f"{what}: shared memory region '{self.name}' shrank while it was {verb}") from None

    def write_array(self, what: str, offset: int, arr: np.ndarray, capacity: int) -> np.ndarray:
        """Copy `arr` to `offset`, where the request gave `capacity` bytes, in one copy (no bytes object
        in between); returns the written array, a view of the region (valid while acquired)."""
        if arr.nbytes > capacity:
            raise InvalidInputError(
                f"{what}: shared memory byte size {capacity} is too small for the {arr.nbytes}-byte result"
            )
        mapping, start = self._checked_span(what, offset, capacity)
        dst = np.frombuffer(mapping, dtype=arr.dtype, count=arr.size, offset=start).reshape(arr.shape)
        self._guarded(what, dst, np.ascontiguousarray(arr), "written")
        return dst

    def close(self) -> None:
        """Unmap and close. Views still alive keep the mapping until they die (no use-after-unmap)."""
        with self._close_lock:
            callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # a worker gone meanwhile: nothing left to unmap there
                log.debug("unmapping region '%s' in a worker failed", self.name, exc_info=True)
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a view is still exported: the mapping goes when its last view is released
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


R = TypeVar("R", bound=Any)


class RegionTable(Generic[R]):
    """Registered regions by name, each counted while requests use it: unregistering a region in use
    retires it, and its last user closes it. Thread-safe. Subclasses register regions (`_check_free`,
    then `_regions[name] = region` under `_lock`) and say how one is closed (`_close_region`)."""

    kind = "shared memory"  # how messages name a region
    limit_error: type[KernelPortError] = RegionLimitError

    def __init__(self, max_regions: int) -> None:
        self._max_regions = max_regions
        self._regions: dict[str, R] = {}
        self._lock = threading.Lock()

    def _close_region(self, region: R) -> None:
        raise NotImplementedError

    def _check_free(self, name: str) -> None:
        if name in self._regions:
            raise RegionExistsError(f"{self.kind} region '{name}' is already registered")
        if len(self._regions) >= self._max_regions:
            raise self.limit_error(f"too many {self.kind} regions registered (limit {self._max_regions})")

    def unregister(self, name: str = "") -> None:
        """Unregister `name`, or every region when `name` is empty. Unknown names are not an error."""
        with self._lock:
            if name:
                region = self._regions.pop(name, None)
                victims = [region] if region is not None else []
            else:
                victims = list(self._regions.values())
                self._regions.clear()
            to_close = []
            for region in victims:
                region._retired = True
                if region._users == 0:
                    to_close.append(region)
        for region in to_close:
            self._close_region(region)

    def status(self, name: str = "") -> list[Any]:
        with self._lock:
            if not name:
                return [r.info() for r in self._regions.values()]
            return [self._get(name).info()]

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._regions

    def _get(self, name: str) -> R:
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFoundError(f"{self.kind} region '{name}' is not registered")
        return region

    def acquire(self, name: str) -> R:
        """Take a reference for one request; pair with `release`."""
        with self._lock:
            region = self._get(name)
            region._users += 1
            return region

    def release(self, region: R) -> None:
        with self._lock:
            region._users -= 1
            last = region._users == 0 and region._retired
        if last:
            self._close_region(region)

    @contextmanager
    def use(self, name: str) -> Iterator[R]:
        region = self.acquire(name)
        try:
            yield region
        finally:
            self.release(region)


class SharedMemoryRegistry(RegionTable[SharedMemoryRegion]):
    """Thread-safe table of client-registered system shared memory regions."""

    def __init__(
        self,
        allowed: bool = False,
        *,
        reserved_key_prefixes: tuple[str, ...] = DEFAULT_RESERVED_PREFIXES,
        max_regions: int = 1024,
    ) -> None:
        super().__init__(max_regions)
        self.allowed = allowed
        self._reserved = tuple(p for p in reserved_key_prefixes if p)

    # -- registration --------------------------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.allowed:
            raise SharedMemoryDisabledError(
                "system shared memory is disabled on this server; start it with client shared memory "
                "allowed (allow_client_shm) to register regions"
            )
        if not name or len(name) > _NAME_MAX:
            raise InvalidInputError(f"shared memory region name must be 1 to {_NAME_MAX} characters")
        what = f"shared memory region '{name}'"
        plain = key.removeprefix("/")
        if not _KEY_RE.fullmatch(plain) or plain in (".", ".."):
            raise InvalidInputError(
                f"{what}: invalid key; expected a POSIX shared memory name ('/' then letters, digits, "
                "'.', '_' or '-', no other '/')"
            )
        if any(plain.startswith(p) for p in self._reserved):
            raise RegionAccessError(f"{what}: the key is reserved for the server's own memory")
        if byte_size <= 0:
            raise InvalidInputError(f"{what}: byte size must be positive, got {byte_size}")
        if offset < 0 or offset > UINT64_MAX or byte_size > UINT64_MAX:
            raise InvalidInputError(f"{what}: offset {offset} or byte size {byte_size} out of range")
        with self._lock:
            self._check_free(name)

        fd = self._open(what, plain)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise RegionAccessError(f"{what}: the key does not name a plain shared memory object")
            check_range(f"{what}: registration", offset, byte_size, st.st_size)
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = SharedMemoryRegion(name, key, offset, byte_size, fd, mapping)
        with self._lock:
            try:
                self._check_free(name)  # a concurrent register of the same name may have won
            except KernelPortError:
                region.close()
                raise
            self._regions[name] = region

    @staticmethod
    def _open(what: str, plain_key: str) -> int:
        try:
            return int(_posixshmem.shm_open("/" + plain_key, os.O_RDWR | os.O_NOFOLLOW, mode=0o600))
        except FileNotFoundError:
            raise RegionNotFoundError(f"{what}: no shared memory object with that key") from None
        except PermissionError:
            raise RegionAccessError(
                f"{what}: the shared memory object is not readable and writable"
            ) from None
        except OSError as exc:
            raise RegionAccessError(
                f"{what}: cannot open the shared memory object ({exc.strerror})"
            ) from None

    def _close_region(self, region: SharedMemoryRegion) -> None:
        region.close()

    def close(self) -> None:
        self.unregister("")
