"""The serialised CUDA IPC handle record (kernelport.gpu.ipc): round trips, and every kind of damage refused with
an error that names the field. Pure data: no GPU needed."""

from __future__ import annotations

import base64
import os
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernelport.errors import InvalidInputError
from kernelport.gpu.ipc import (
    HANDLE_BYTES,
    RECORD_BYTES,
    IpcHandleError,
    IpcMemHandle,
    check_span,
    raw_mem_handle,
)

UUID = "GPU-12345678-abcd-ef01-2345-6789abcdef01"
HANDLE = bytes(range(1, 65))


def record(**kw: object) -> IpcMemHandle:
    args = {"handle": HANDLE, "offset": 4096, "byte_size": 1 << 20, "alloc_size": 2 << 20, "device_uuid": UUID,
            "device_ordinal": 0, "pid": 4242}
    args.update(kw)
    return IpcMemHandle(**args)  # type: ignore[arg-type]


def resealed(data: bytes) -> bytes:
    """The record with a correct checksum again, so a test reaches the field check behind it."""
    body = data[: RECORD_BYTES - 4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_record_layout_and_round_trip() -> None:
    r = record()
    data = r.to_bytes()
    assert len(data) == RECORD_BYTES == 189
    assert data[:4] == b"KPIH" and data[8:72] == HANDLE  # the raw handle sits at a fixed place
    assert struct.unpack_from("<QQQ", data, 72) == (4096, 1 << 20, 2 << 20)
    assert IpcMemHandle.from_bytes(data) == r
    assert IpcMemHandle.from_bytes(memoryview(bytearray(data))) == r


@given(offset=st.integers(0, 2**64 - 1), size=st.integers(1, 2**64 - 1), alloc=st.integers(0, 2**64 - 1),
       ordinal=st.integers(-1, 2**31 - 1), pid=st.integers(0, 2**32 - 1),
       handle=st.binary(min_size=64, max_size=64).filter(any), mig=st.booleans())
def test_round_trip_or_refusal_matches_python_arithmetic(offset: int, size: int, alloc: int, ordinal: int, pid: int,
                                                          handle: bytes, mig: bool) -> None:
    uuid = ("MIG-" if mig else "GPU-") + UUID[4:]
    fits = offset + size <= alloc  # Python integers: no overflow, the reference for the checked comparison
    if not fits:
        with pytest.raises(IpcHandleError, match="outside the allocation"):
            IpcMemHandle(handle, offset, size, alloc, uuid, ordinal, pid)
        return
    r = IpcMemHandle(handle, offset, size, alloc, uuid, ordinal, pid)
    assert IpcMemHandle.from_bytes(r.to_bytes()) == r


def test_overflowing_span_is_refused_not_wrapped() -> None:
    # offset + size wraps to 0 in 64 bits; the check must not be fooled
    with pytest.raises(IpcHandleError, match="outside the allocation's 4096 bytes"):
        record(offset=2**64 - 1, byte_size=1, alloc_size=4096)
    data = bytearray(record().to_bytes())
    struct.pack_into("<QQ", data, 72, 2**64 - 4096, 8192)  # tampered offset and size that wrap
    with pytest.raises(IpcHandleError, match="outside the allocation"):
        IpcMemHandle.from_bytes(resealed(bytes(data)))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d[:-1], "expected a 189-byte record, got 188"),
    (lambda d: d + b"\0", "expected a 189-byte record, got 190"),
    (lambda d: b"XPIH" + d[4:], "bad magic"),  # the magic first: another kind of record altogether
    (lambda d: resealed(b"XPIH" + d[4:]), "bad magic"),
    (lambda d: resealed(d[:4] + struct.pack("<H", 2) + d[6:]), "record version 2, this build reads version 1"),
    (lambda d: resealed(d[:6] + struct.pack("<H", 7) + d[8:]), "record kind 7 is not a memory handle"),
    (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "checksum mismatch"),
    (lambda d: resealed(d[:8] + bytes(64) + d[72:]), "all zero bytes"),
    (lambda d: resealed(d[:80] + struct.pack("<Q", 0) + d[88:]), "byte size must be positive"),
    (lambda d: resealed(d[:104] + bytes([81]) + d[105:]), "UUID length 81 is inconsistent"),
    (lambda d: resealed(d[:104] + bytes([4]) + d[105:]), "UUID length 4 is inconsistent"),
    (lambda d: resealed(d[:105] + b"XPU-" + d[109:]), "is not a GPU or MIG UUID"),
    (lambda d: resealed(d[:105] + b"\xff" + d[106:]), "not ASCII"),
], ids=["short", "long", "magic-crc", "magic", "version", "kind", "bitflip", "zero-handle", "zero-size",
        "uuid-len-big", "uuid-len-short", "uuid-text", "uuid-ascii"])
def test_tampered_records_are_refused_by_field(mutate: object, message: str) -> None:
    data = record().to_bytes()
    with pytest.raises(IpcHandleError, match=message):
        IpcMemHandle.from_bytes(mutate(data))  # type: ignore[operator]


def test_errors_are_invalid_argument_and_sub_buffers_stay_inside() -> None:
    assert issubclass(IpcHandleError, InvalidInputError) and IpcHandleError.grpc_code == "INVALID_ARGUMENT"
    r = record(offset=0, byte_size=1000, alloc_size=1000)
    s = r.sub(100, 900)
    assert (s.offset, s.byte_size, s.handle) == (100, 900, r.handle)
    with pytest.raises(IpcHandleError):
        r.sub(100, 901)
    with pytest.raises(IpcHandleError, match="device ordinal"):
        record(device_ordinal=-2)
    with pytest.raises(IpcHandleError, match="must be an integer"):
        record(offset=-1)
    assert record(device_uuid="MIG-GPU-12345678-abcd-ef01-2345-6789abcdef01/3/0").device_uuid.endswith("/3/0")
    assert record(device_uuid="").key == (HANDLE, "")
    check_span("x", 0, 0, 0)  # an empty span at the end is inside


def test_raw_handles_as_tritonclient_sends_them() -> None:
    raw = os.urandom(HANDLE_BYTES)
    assert raw_mem_handle(raw) == raw  # gRPC: tritonclient base64-decodes get_raw_handle()'s text before sending
    assert raw_mem_handle(base64.b64encode(raw), base64_text=True) == raw  # the HTTP form
    with pytest.raises(IpcHandleError, match="must be a 64-byte cudaIpcMemHandle_t, got 88 bytes"):
        raw_mem_handle(base64.b64encode(raw))
    with pytest.raises(IpcHandleError, match="not base64"):
        raw_mem_handle(b"!!!!", base64_text=True)
