"""Stream and buffer pool bookkeeping (kernelport.gpu.pool) with real host buffers, DLPack input handling
(kernelport.gpu.tensors) with numpy and CPU torch tensors, the device lane's offsets against a real host lane,
and the errors each GPU-only piece gives on a machine without CUDA."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import pytest

import _kpcore
from kernelport.client.lanes import LaneLayout, TensorInfo
from kernelport.gpu import cuda
from kernelport.gpu.device_lane import device_data_size, device_offsets
from kernelport.gpu.pool import (
    ALIGNMENT,
    BufferPool,
    HostAllocator,
    HotPathAllocationError,
    StreamPool,
    batch_buffer_sizes,
)
from kernelport.gpu.tensors import DL_CPU, as_host_array, dlpack_device, is_device_tensor, split_by_device, to_host


class CountingHostAllocator(HostAllocator):
    """Host buffers, counting each allocation (the pool's own count is checked against this one)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def allocate(self, nbytes: int) -> np.ndarray:
        self.calls.append(nbytes)
        return super().allocate(nbytes)


def test_batch_buffer_sizes_are_aligned_and_unique() -> None:
    assert batch_buffer_sizes(4000, [1, 2, 4, 4, 8]) == [4096, 8192, 16128, 32000]
    assert all(s % ALIGNMENT == 0 for s in batch_buffer_sizes(3, range(1, 20)))
    with pytest.raises(ValueError):
        batch_buffer_sizes(10, [0])


def test_pool_allocates_only_at_load_and_serves_the_smallest_fit() -> None:
    alloc = CountingHostAllocator()
    pool = BufferPool(alloc, batch_buffer_sizes(1000, [1, 4, 16]), per_class=2)
    made = list(alloc.calls)
    assert sorted(made) == [1024, 1024, 4096, 4096, 16128, 16128]
    a = pool.acquire(1000)
    b = pool.acquire(1001)  # 1001 bytes still fit the second 1024-byte buffer
    c = pool.acquire(1000)  # the 1024 class is empty now: the next size up
    assert (a.nbytes, b.nbytes, c.nbytes) == (1024, 1024, 4096)
    assert a.ctypes.data != b.ctypes.data
    pool.release(b)
    again = pool.acquire(900)
    assert again is b  # the buffer given back is the one handed out next
    assert alloc.calls == made  # nothing allocated on the hot path
    st = pool.stats()
    assert (st.hits, st.misses, st.grown, st.in_use, st.buffers) == (4, 0, 0, 3, 6)
    assert st.bytes == sum(made)


def test_pool_refuses_and_counts_a_miss_or_grows_when_allowed() -> None:
    alloc = CountingHostAllocator()
    pool = BufferPool(alloc, [4096], per_class=1)
    held = pool.acquire(4096)
    with pytest.raises(HotPathAllocationError, match=r"no pre-allocated buffer of 10 bytes is free .*1 in use"):
        pool.acquire(10)
    with pytest.raises(HotPathAllocationError, match="size classes up to 4096 bytes"):
        pool.acquire(5000)
    assert pool.stats().misses == 2 and len(alloc.calls) == 1
    pool.release(held)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(held)

    growing = BufferPool(CountingHostAllocator(), [256], per_class=1, grow=True)
    big = growing.acquire(300)
    assert big.nbytes == 512
    st = growing.stats()
    assert (st.misses, st.grown, st.size_classes) == (1, 1, (256, 512))
    growing.release(big)
    assert growing.acquire(400) is big and growing.stats().grown == 1  # the grown buffer is reused


def test_pool_under_threads_hands_each_buffer_to_one_holder() -> None:
    pool = BufferPool(HostAllocator(), [256], per_class=8)
    seen: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(200):
            buf = pool.acquire(100)
            with lock:
                seen.append(id(buf))
                holders = len(set(seen))
            assert holders <= 8
            pool.release(buf)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    st = pool.stats()
    assert st.hits == 1600 and st.misses == 0 and st.in_use == 0 and st.buffers == 8


def test_stream_pool_round_robin() -> None:
    made = iter(range(100))
    pool = StreamPool(3, lambda: next(made))
    assert [pool.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert len(pool) == 3
    with pytest.raises(ValueError):
        StreamPool(0, object)


@pytest.mark.skipif(cuda.cuda_available(probe=True), reason="needs a machine without CUDA")
def test_gpu_pieces_say_cuda_is_absent() -> None:
    torch = pytest.importorskip("torch")
    expected = f"CUDA streams are not available: torch {torch.__version__} sees no GPU"
    with pytest.raises(cuda.CudaUnavailableError, match=re.escape(expected)):
        StreamPool.torch(2)
    from kernelport.gpu.pool import PinnedHostAllocator, TorchDeviceAllocator

    with pytest.raises(cuda.CudaUnavailableError, match="pinned host memory is not available"):
        PinnedHostAllocator()
    with pytest.raises(cuda.CudaUnavailableError, match="device buffers are not available"):
        TorchDeviceAllocator()
    assert cuda.CudaUnavailableError.grpc_code == "UNAVAILABLE"


# -- DLPack ---------------------------------------------------------------------------------------------------


def test_host_tensors_are_read_in_place() -> None:
    torch = pytest.importorskip("torch")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert as_host_array("x", x) is x
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    view = as_host_array("t", t)
    assert view.ctypes.data == t.data_ptr()  # no copy
    t[0, 0] = 42.0
    assert view[0, 0] == 42.0
    g = torch.ones(2, requires_grad=True)
    assert as_host_array("g", g).tolist() == [1.0, 1.0]
    assert dlpack_device(t) == (DL_CPU, 0) and dlpack_device(x) == (DL_CPU, 0) and dlpack_device([1]) is None
    assert not is_device_tensor(t) and not is_device_tensor(x)
    np.testing.assert_array_equal(to_host(t), x * 0 + t.numpy())
    host, device = split_by_device({"a": x, "b": t})
    assert set(host) == {"a", "b"} and device == {}
    assert as_host_array("l", [1, 2]).tolist() == [1, 2]


# -- device lanes: the same layout as the host lane -------------------------------------------------------------


def test_device_offsets_mirror_the_host_lane() -> None:
    tensors = (TensorInfo("x", "FP32", (3, 5)), TensorInfo("i", "INT64", (7,)), TensorInfo("y", "FP16", (9,)))
    layout = LaneLayout(1, 3, 4, True, tensors, 2)
    size = layout.required_size()
    seg = _kpcore.Segment.create(size, "kp-test-device-offsets")
    bell = _kpcore.Doorbell(_kpcore.Segment.create(_kpcore.DOORBELL_BYTES, "kp-test-bell"), init=True)
    lane = _kpcore.Lane(seg, bell, layout.nslots, layout.max_batch, layout.row_bytes, init=True)
    host = [lane.slot_offsets(s) for s in range(layout.nslots)]
    base, dev = device_offsets(host)
    assert base == host[0][0]
    data = device_data_size(size, base)
    for s in range(layout.nslots):
        assert [d + base for d in dev[s]] == host[s]
        for off, t in zip(dev[s], tensors, strict=True):
            assert off % 64 == 0  # every block 64-byte aligned, as on the host
            assert off + layout.max_batch * t.row_bytes <= data  # inside the device data area
    # slots do not overlap: each tensor block of a slot ends before the next slot's first block
    ends = [max(o + layout.max_batch * t.row_bytes for o, t in zip(dev[s], tensors, strict=True))
            for s in range(layout.nslots)]
    assert all(ends[s] <= dev[s + 1][0] for s in range(layout.nslots - 1))
    with pytest.raises(ValueError):
        device_data_size(size, size)


# -- pinned rows: page ranges registered once, reference counted ------------------------------------------------


def test_host_registry_registers_each_page_once_and_unregisters_at_last_use() -> None:
    from kernelport.gpu.torch_cuda import PAGE, HostRegistry, page_span

    calls: list[tuple[str, int, int]] = []

    def register(ptr: int, n: int) -> bool:
        calls.append(("reg", ptr, n))
        return True

    reg = HostRegistry(register, lambda p: calls.append(("unreg", p, 0)))
    base = 1000 * PAGE
    assert page_span(base + 10, 5) == (base, base + PAGE)
    assert page_span(base, PAGE) == (base, base + PAGE)
    a = reg.pin(base + 100, 2 * PAGE)  # pages 0..2
    b = reg.pin(base + PAGE, 4 * PAGE)  # pages 1..4: only 3..4 are new
    c = reg.pin(base + 2 * PAGE + 8, 8)  # inside page 2: nothing new
    assert calls == [("reg", base, 3 * PAGE), ("reg", base + 3 * PAGE, 2 * PAGE)]
    assert a == [base] and b == [base, base + 3 * PAGE] and c == [base]
    # registered ranges never overlap
    spans = sorted((s, e) for s, (e, _r) in reg.ranges.items())
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    reg.unpin(a)
    reg.unpin(c)
    assert ("unreg", base, 0) not in calls  # b still uses it
    reg.unpin(b)
    assert calls[2:] == [("unreg", base, 0), ("unreg", base + 3 * PAGE, 0)] and reg.ranges == {}
    d = reg.pin(base + 10 * PAGE, 1)  # a gap before an existing range, and after
    e = reg.pin(base + 9 * PAGE, 3 * PAGE)
    assert d == [base + 10 * PAGE] and e == [base + 9 * PAGE, base + 10 * PAGE, base + 11 * PAGE]


def test_host_registry_failure_leaves_pageable_copies() -> None:
    from kernelport.gpu.torch_cuda import PAGE, HostRegistry

    reg = HostRegistry(lambda p, n: False, lambda p: None)
    assert reg.pin(7 * PAGE, 10) == [] and reg.failed and reg.ranges == {}


def test_torch_mlp_example_matches_its_float64_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The model the GPU tests and benchmark serve, checked here on the cpu (KIND_CPU) against numpy."""
    pytest.importorskip("torch")
    from kernelport.backends.torch import TorchBackend
    from kernelport.gpu.examples import mlp_reference, write_torch_mlp
    from kernelport.repository import ModelSpec, parse_config

    path = write_torch_mlp(str(tmp_path), "mlp_t", instance_group="instance_group [ { kind: KIND_CPU } ]")
    spec = ModelSpec.from_proto(parse_config(os.path.join(path, "config.pbtxt")), model_name="mlp_t")
    backend = TorchBackend()
    backend.load(os.path.join(path, "1"), spec)
    assert backend.device() == "cpu"
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    out = np.zeros((3, 512), np.float32)
    backend.bind({"INPUT__0": x}, {"OUTPUT__0": out})()
    ref = mlp_reference(x)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
