"""Copies from and to a client's shared memory survive the client truncating it (SIGBUS becomes an error).

The memory is a real POSIX shared memory object (as a gRPC client registers), truncated under a mapping:
touching its lost pages raises SIGBUS, which the guard turns into an exception in this thread while the
process goes on.
"""

from __future__ import annotations

import mmap
import os
import secrets

import numpy as np
import pytest

import _kpcore
from kernelport.client.lanes import LaneLayout, LaneView, TensorInfo
from kernelport.errors import InvalidInputError

PAGE = mmap.PAGESIZE


@pytest.fixture()
def shrinking() -> tuple[int, mmap.mmap]:
    """A 4-page shared memory object, mapped, that the test may truncate."""
    import _posixshmem

    key = f"/kp_test_guard_{secrets.token_hex(6)}"
    fd = _posixshmem.shm_open(key, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    _posixshmem.shm_unlink(key)
    os.ftruncate(fd, 4 * PAGE)
    m = mmap.mmap(fd, 4 * PAGE)
    m[:] = b"\x07" * (4 * PAGE)
    yield fd, m
    m.close()
    os.close(fd)


def test_guarded_copy_copies_and_survives_a_truncation(shrinking: tuple[int, mmap.mmap]) -> None:
    fd, m = shrinking
    dst = bytearray(4 * PAGE)
    _kpcore.guarded_copy(dst, m)
    assert dst == b"\x07" * (4 * PAGE)
    os.ftruncate(fd, PAGE)  # the client shrinks its object
    with pytest.raises(_kpcore.SourceFault):
        _kpcore.guarded_copy(dst, memoryview(m))  # reading the lost pages
    with pytest.raises(_kpcore.SourceFault):
        _kpcore.guarded_copy(memoryview(m), bytes(4 * PAGE))  # writing them
    _kpcore.guarded_copy(memoryview(m)[:PAGE], bytes(PAGE))  # the page that is left still works
    with pytest.raises(ValueError, match="room"):
        _kpcore.guarded_copy(bytearray(3), b"four")


def test_a_lane_input_from_truncated_memory_is_an_invalid_input(shrinking: tuple[int, mmap.mmap]) -> None:
    """The server's data plane copies inputs with guard=True: an input that is a view of a client's region
    cut short fails that request, and the lane takes the next one."""
    fd, m = shrinking
    tensors = (TensorInfo("x", "UINT8", (4 * PAGE,)), TensorInfo("y", "UINT8", (4 * PAGE,)))
    layout = LaneLayout(1, 2, 1, True, tensors, 1)
    layout = LaneLayout(1, 2, 1, True, tensors, 1, layout.required_size())
    bell = _kpcore.Doorbell(_kpcore.Segment.create(_kpcore.DOORBELL_BYTES), init=True)
    view = LaneView.attach(layout, _kpcore.Segment.create(layout.size), bell, init=True)
    os.ftruncate(fd, PAGE)
    region = memoryview(m)
    try:
        x = np.frombuffer(region, dtype=np.uint8).reshape(1, 4 * PAGE)
        with pytest.raises(InvalidInputError, match="input 'x': its shared memory shrank"):
            view.run(7, [x], 1, 1.0, "m", guard=True)
    finally:
        del x
        region.release()
    # the failed request gave its row back: the lane takes the next claim
    seq, row = view.claim(7, 1, 1.0, "m")
    assert (seq, row) == (1, 0)  # the next slot: the first one is full with the released row

