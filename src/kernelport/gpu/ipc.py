"""CUDA IPC memory handles as they cross process boundaries: one versioned, validated record.

A `cudaIpcMemHandle_t` is 64 opaque bytes naming a whole device allocation (cudaMalloc'd; never managed
memory, and never a stream-ordered pool allocation, which IPC does not export). Opening it in another process
(`cudaIpcOpenMemHandle`) maps the allocation's *base*; a buffer inside the allocation is addressed by offset.
The raw handle says nothing about the device or the size, so KernelPort sends it wrapped:

    offset  size  field
    0       4     magic b"KPIH"
    4       2     version (1)
    6       2     kind (1: memory)
    8       64    cudaIpcMemHandle_t bytes
    72      8     offset of the buffer inside the allocation (u64)
    80      8     byte size of the buffer (u64)
    88      8     size of the whole allocation (u64, as cuMemGetAddressRange reports it)
    96      4     device ordinal in the exporting process (i32; -1 unknown)
    100     4     exporting process id (u32; a process cannot open its own handle)
    104     1     length of the device UUID (0..80)
    105     80    device UUID, ASCII ("GPU-…" or "MIG-…"), zero padded
    185     4     CRC-32 of bytes [0, 185)
    189           total

Little-endian, fixed size. `IpcMemHandle.from_bytes` refuses anything else with an `IpcHandleError`
(INVALID_ARGUMENT) that says which field is wrong: a short or long record, another magic or version, a bad
CRC (corruption, not security: the peer is a local process the server already trusts this far), a UUID that
is not one, or a buffer that does not lie inside the allocation, checked without overflow
(`offset > alloc or size > alloc - offset`). A receiver still checks the allocation's real size after it
opens the handle (`check_allocation`): the record's own claim is only the sender's word.

Triton's gRPC CudaSharedMemoryRegister carries the raw 64 bytes alone (`raw_handle`; tritonclient's gRPC
client base64-decodes what `cuda_shared_memory.get_raw_handle` returns before sending): `raw_mem_handle`
checks those.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from dataclasses import dataclass

from kernelport.errors import InvalidInputError

__all__ = [
    "HANDLE_BYTES",
    "RECORD_BYTES",
    "IpcHandleError",
    "IpcMemHandle",
    "check_allocation",
    "check_span",
    "raw_mem_handle",
]

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t) == CUDA_IPC_HANDLE_SIZE
MAGIC = b"KPIH"
VERSION = 1
KIND_MEMORY = 1
UUID_MAX = 80
UINT64_MAX = 2**64 - 1

_BODY = struct.Struct(f"<4sHH{HANDLE_BYTES}sQQQiIB{UUID_MAX}s")
_CRC = struct.Struct("<I")
RECORD_BYTES = _BODY.size + _CRC.size
# "GPU-" or "MIG-" then a UUID; older MIG names are "MIG-GPU-<uuid>/<gi>/<ci>"
_UUID_RE = re.compile(
    r"(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|MIG-GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/\d{1,3}/\d{1,3}"
)


class IpcHandleError(InvalidInputError):
    """A serialised IPC handle is malformed, or names memory outside its allocation."""


def check_span(what: str, offset: int, byte_size: int, limit: int) -> None:
    """IpcHandleError unless [offset, offset + byte_size) lies within [0, limit); no intermediate overflows."""
    if offset < 0 or byte_size < 0 or limit < 0:
        raise IpcHandleError(f"{what}: offset, byte size and limit must be non-negative")
    if offset > limit or byte_size > limit - offset:
        raise IpcHandleError(
            f"{what}: offset {offset} + byte size {byte_size} is outside the allocation's {limit} bytes")


def raw_mem_handle(raw: bytes, what: str = "CUDA IPC handle", *, base64_text: bool = False) -> bytes:
    """The 64 handle bytes, checked for length; `base64_text`: `raw` is the base64 text of them (the HTTP
    form, and what tritonclient's `get_raw_handle` returns)."""
    data = bytes(raw)
    if base64_text:
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise IpcHandleError(f"{what}: raw_handle is not base64") from None
    if len(data) != HANDLE_BYTES:
        raise IpcHandleError(f"{what}: raw_handle must be a {HANDLE_BYTES}-byte cudaIpcMemHandle_t, "
                             f"got {len(data)} bytes")
    return data


def check_handle_bytes(handle: bytes, what: str) -> None:
    """Cheap content checks a real handle always passes: 64 bytes, not all zero."""
    if len(handle) != HANDLE_BYTES:
        raise IpcHandleError(f"{what}: a cudaIpcMemHandle_t is {HANDLE_BYTES} bytes, got {len(handle)}")
    if not any(handle):
        raise IpcHandleError(f"{what}: the handle is all zero bytes, not one cudaIpcGetMemHandle returns")


def check_allocation(what: str, offset: int, byte_size: int, real_alloc_size: int) -> None:
    """After opening: the buffer must lie inside the allocation's real size (cuMemGetAddressRange)."""
    check_span(what, offset, byte_size, real_alloc_size)


@dataclass(frozen=True)
class IpcMemHandle:
    """A buffer inside a device allocation, exportable to another process."""

    handle: bytes  # the 64-byte cudaIpcMemHandle_t of the allocation
    offset: int  # where the buffer starts inside the allocation
    byte_size: int  # the buffer's size
    alloc_size: int  # the allocation's size
    device_uuid: str = ""  # "GPU-…" / "MIG-…"; "" unknown
    device_ordinal: int = -1  # CUDA ordinal in the exporting process
    pid: int = 0  # the exporting process

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, what: str = "IPC handle") -> None:
        check_handle_bytes(self.handle, what)
        for name in ("offset", "byte_size", "alloc_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= UINT64_MAX:
                raise IpcHandleError(f"{what}: {name} must be an integer in 0..2^64-1, got {v!r}")
        if self.byte_size == 0:
            raise IpcHandleError(f"{what}: byte size must be positive")
        check_span(what, self.offset, self.byte_size, self.alloc_size)
        if self.device_uuid and not _UUID_RE.fullmatch(self.device_uuid):
            raise IpcHandleError(f"{what}: device UUID {self.device_uuid[:UUID_MAX]!r} is not a GPU or MIG UUID")
        if not -1 <= self.device_ordinal < 2**31:
            raise IpcHandleError(f"{what}: device ordinal {self.device_ordinal} out of range")
        if not 0 <= self.pid < 2**32:
            raise IpcHandleError(f"{what}: process id {self.pid} out of range")

    @property
    def key(self) -> tuple[bytes, str]:
        """What identifies the allocation (a process opens each once): handle bytes and device."""
        return (self.handle, self.device_uuid)

    def sub(self, offset: int, byte_size: int) -> IpcMemHandle:
        """A buffer inside this one (offset relative to this buffer's start)."""
        check_span("IPC sub-buffer", offset, byte_size, self.byte_size)
        return IpcMemHandle(self.handle, self.offset + offset, byte_size, self.alloc_size, self.device_uuid,
                            self.device_ordinal, self.pid)

    def to_bytes(self) -> bytes:
        uuid = self.device_uuid.encode("ascii")
        body = _BODY.pack(MAGIC, VERSION, KIND_MEMORY, self.handle, self.offset, self.byte_size, self.alloc_size,
                          self.device_ordinal, self.pid, len(uuid), uuid)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, what: str = "IPC handle") -> IpcMemHandle:
        raw = bytes(data)
        if len(raw) != RECORD_BYTES:
            raise IpcHandleError(f"{what}: expected a {RECORD_BYTES}-byte record, got {len(raw)} bytes")
        body, (crc,) = raw[: _BODY.size], _CRC.unpack(raw[_BODY.size:])
        magic, version, kind, handle, offset, size, alloc, ordinal, pid, ulen, uuid = _BODY.unpack(body)
        if magic != MAGIC:
            raise IpcHandleError(f"{what}: not a KernelPort IPC handle record (bad magic)")
        if version != VERSION:
            raise IpcHandleError(f"{what}: record version {version}, this build reads version {VERSION}")
        if kind != KIND_MEMORY:
            raise IpcHandleError(f"{what}: record kind {kind} is not a memory handle")
        if zlib.crc32(body) != crc:
            raise IpcHandleError(f"{what}: checksum mismatch (the record was altered or truncated)")
        if ulen > UUID_MAX or any(uuid[ulen:]):
            raise IpcHandleError(f"{what}: device UUID length {ulen} is inconsistent with its field")
        try:
            text = uuid[:ulen].decode("ascii")
        except UnicodeDecodeError:
            raise IpcHandleError(f"{what}: device UUID is not ASCII") from None
        rec = cls.__new__(cls)
        for name, value in (("handle", handle), ("offset", offset), ("byte_size", size), ("alloc_size", alloc),
                            ("device_uuid", text), ("device_ordinal", ordinal), ("pid", pid)):
            object.__setattr__(rec, name, value)
        rec.validate(what)
        return rec
