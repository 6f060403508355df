"""The GPU path on a machine with a CUDA GPU, torch and cupy: IPC handles across processes, device lane rows,
DLPack with real CUDA tensors, device buffer pools against torch's allocator statistics, the pytorch backend on
the GPU (streams, pinned rows, CUDA graphs), placement and memory budgets in a real server, and gRPC CUDA shared
memory end to end with tritonclient. Skipped where CUDA is absent (bench/gpu_check.sh runs them on a GPU)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import numpy as np
import pytest

from kernelport.gpu import cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.cuda_available(probe=True), reason="needs a CUDA GPU with torch and cupy"),
]

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def run_child(code: str, *args: str, timeout: float = 120.0) -> str:
    """Run `code` in a fresh Python process (its own CUDA context); returns its stdout."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- IPC handles and device lanes ---------------------------------------------------------------------------------

OPEN_CHILD = r"""
import sys
import numpy as np
from kernelport.gpu.ipc import IpcHandleError, IpcMemHandle
from kernelport.gpu.device_lane import open_mapped, opened_count
rec = IpcMemHandle.from_bytes(bytes.fromhex(sys.argv[1]))
a = open_mapped(rec)
b = open_mapped(rec.sub(4096, 4096))
assert opened_count() == 1, opened_count()  # one mapping per allocation per process
x = a.array(0, (rec.byte_size // 4,), np.float32)
print("sum", float(x.sum(dtype=np.float64)))
y = b.array(0, (1024,), np.float32)
y[...] = 7.0
import cupy
cupy.cuda.runtime.deviceSynchronize()
bad = IpcMemHandle(rec.handle, 0, rec.alloc_size * 2, rec.alloc_size * 2, rec.device_uuid, rec.device_ordinal, rec.pid)
try:
    open_mapped(bad)
    print("accepted")
except IpcHandleError as e:
    print("refused", e)
a.close(); b.close()
print("open after close", opened_count())
"""


def test_ipc_handle_opened_once_per_process_and_checked_against_the_real_size() -> None:
    import cupy

    from kernelport.gpu.device_lane import DeviceAllocation, open_mapped
    from kernelport.gpu.ipc import IpcHandleError, IpcMemHandle

    n = 1 << 18
    alloc = DeviceAllocation(n * 4)
    arr = cupy.ndarray((n,), np.float32, cupy.cuda.MemoryPointer(alloc.memory, 0))
    arr[...] = cupy.arange(n, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()
    rec = alloc.export()
    assert rec.alloc_size >= n * 4 and rec.pid == os.getpid() and len(rec.handle) == 64
    assert IpcMemHandle.from_bytes(rec.to_bytes()) == rec
    with pytest.raises(IpcHandleError, match="cannot open its own"):
        open_mapped(rec)
    out = run_child(OPEN_CHILD, rec.to_bytes().hex())
    assert f"sum {float(np.arange(n, dtype=np.float64).sum())}" in out
    assert "refused" in out and "outside the allocation" in out
    assert "open after close 0" in out
    host = cupy.asnumpy(arr)
    np.testing.assert_array_equal(host[1024:2048], np.full(1024, 7.0, np.float32))  # the child's write
    np.testing.assert_array_equal(host[:1024], np.arange(1024, dtype=np.float32))


LANE_CHILD = r"""
import sys, json
import numpy as np, cupy, torch
from kernelport.gpu.ipc import IpcMemHandle
from kernelport.gpu.device_lane import DeviceRows, open_mapped
rec = IpcMemHandle.from_bytes(bytes.fromhex(sys.argv[1]))
offsets = json.loads(sys.argv[2])
buf = open_mapped(rec)
rows = DeviceRows(buf, offsets, 4, [((3, 5), np.float32), ((7,), np.int64)])
x = torch.arange(2 * 15, dtype=torch.float32, device="cuda").reshape(2, 3, 5)
i = cupy.arange(2 * 7, dtype=cupy.int64).reshape(2, 7) * 3
rows.write_inputs(1, 2, [x, i])  # slot 1, rows 2..3; synchronised before returning
print("written")
"""


def test_device_lane_rows_written_by_another_process_are_the_batch_tensor() -> None:
    import json

    import cupy

    import _kpcore
    from kernelport.client.lanes import LaneLayout, TensorInfo
    from kernelport.gpu.device_lane import DeviceAllocation, DeviceRows, device_data_size, device_offsets

    tensors = (TensorInfo("x", "FP32", (3, 5)), TensorInfo("i", "INT64", (7,)))
    layout = LaneLayout(1, 3, 4, True, tensors, 2)
    size = layout.required_size()
    seg = _kpcore.Segment.create(size, "kp-gpu-lane")
    bell = _kpcore.Doorbell(_kpcore.Segment.create(_kpcore.DOORBELL_BYTES, "kp-gpu-bell"), init=True)
    lane = _kpcore.Lane(seg, bell, layout.nslots, layout.max_batch, layout.row_bytes, init=True)
    base, offsets = device_offsets([lane.slot_offsets(s) for s in range(layout.nslots)])
    alloc = DeviceAllocation(device_data_size(size, base))
    rows = DeviceRows(alloc, offsets, layout.max_batch, [((3, 5), np.float32), ((7,), np.int64)])
    for per in rows.views:
        for v in per:
            v.fill(-1)
    cupy.cuda.runtime.deviceSynchronize()
    assert "written" in run_child(LANE_CHILD, alloc.export().to_bytes().hex(), json.dumps(offsets))
    x = cupy.asnumpy(rows.views[1][0])
    i = cupy.asnumpy(rows.views[1][1])
    np.testing.assert_array_equal(x[2:4], np.arange(30, dtype=np.float32).reshape(2, 3, 5))
    np.testing.assert_array_equal(i[2:4], np.arange(14, dtype=np.int64).reshape(2, 7) * 3)
    assert (x[:2] == -1).all() and (cupy.asnumpy(rows.views[0][0]) == -1).all()  # nothing else was touched
    assert (cupy.asnumpy(rows.views[2][1]) == -1).all()


# -- DLPack, pools -------------------------------------------------------------------------------------------------


def test_cuda_tensors_are_recognised_and_never_read_as_host_memory() -> None:
    import cupy
    import torch

    from kernelport.errors import InvalidInputError
    from kernelport.gpu.tensors import (
        as_host_array,
        copy_to_device,
        is_device_tensor,
        split_by_device,
        to_host,
    )

    t = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    c = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
    assert is_device_tensor(t) and is_device_tensor(c) and not is_device_tensor(t.cpu())
    for v in (t, c):
        with pytest.raises(InvalidInputError, match="CUDA"):
            as_host_array("x", v)
        np.testing.assert_array_equal(to_host(v), np.arange(6, dtype=np.float32).reshape(2, 3))
    host, dev = split_by_device({"a": t, "b": np.zeros(2), "c": c})
    assert set(dev) == {"a", "c"} and set(host) == {"b"}
    dst = cupy.zeros((2, 3), cupy.float32)
    copy_to_device(dst, t * 2)
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(dst), np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    with pytest.raises(InvalidInputError, match="expected float32"):
        copy_to_device(dst, t[:1])


def test_device_buffer_pool_allocates_nothing_on_the_hot_path() -> None:
    import torch

    from kernelport.gpu.pool import (
        BufferPool,
        CupyDeviceAllocator,
        StreamPool,
        TorchDeviceAllocator,
        batch_buffer_sizes,
    )

    pool = BufferPool(TorchDeviceAllocator("cuda:0"), batch_buffer_sizes(512 * 4, [1, 2, 4, 8]), per_class=2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for n in [1, 3, 8, 2, 5] * 20:
        buf = pool.acquire(512 * 4 * n)
        buf[: 512 * 4 * n].fill_(n)
        pool.release(buf)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    st = pool.stats()
    assert st.misses == 0 and st.hits == 100 and st.in_use == 0
    streams = StreamPool.torch(3)
    assert len({s.cuda_stream for s in streams.streams}) == 3
    cp = BufferPool(CupyDeviceAllocator(0), [1 << 20], per_class=1)
    assert cp.acquire(1000).ptr != 0


# -- the pytorch backend on the GPU --------------------------------------------------------------------------------


def _torch_backend(tmp_path, extra: str = ""):  # type: ignore[no-untyped-def]
    from kernelport.backends.torch import TorchBackend
    from kernelport.gpu.examples import write_torch_mlp
    from kernelport.repository import ModelSpec, parse_config

    path = write_torch_mlp(str(tmp_path), "mlp_gpu", extra=extra)
    spec = ModelSpec.from_proto(parse_config(os.path.join(path, "config.pbtxt")), model_name="mlp_gpu")
    backend = TorchBackend()
    backend.load(os.path.join(path, "1"), spec)
    return backend


@pytest.mark.parametrize("graphs", [False, True], ids=["streams", "cuda-graph"])
def test_torch_backend_runs_on_the_gpu_from_host_rows(tmp_path, graphs: bool) -> None:  # type: ignore[no-untyped-def]
    import torch

    from kernelport.gpu.examples import mlp_reference

    backend = _torch_backend(tmp_path, "optimization { cuda { graphs: true } }" if graphs else "")
    assert backend.device() == "cuda:0"
    rng = np.random.default_rng(3)
    x = np.zeros((4, 512), np.float32)
    out = np.full((4, 512), np.nan, np.float32)
    run = backend.bind({"INPUT__0": x}, {"OUTPUT__0": out})
    for _ in range(3):  # warm-up: the caching allocator takes its blocks
        run()
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(20):
        x[...] = rng.standard_normal(x.shape).astype(np.float32)  # new rows each time: the runner reads them
        out[...] = np.nan
        run()
        ref = mlp_reference(x)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-3  # tf32 at worst
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments  # no cudaMalloc on the hot path


# -- a real server: placement, budgets, the torch model on the GPU ---------------------------------------------------


@pytest.mark.timeout(300)
def test_server_places_a_torch_model_on_the_gpu_and_budgets_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import ServerProcess
    from kernelport import Client
    from kernelport.gpu.examples import mlp_reference, write_torch_mlp

    repo = tmp_path / "repo"
    write_torch_mlp(str(repo), "mlp_gpu")
    write_torch_mlp(str(repo), "too_big", extra='parameters { key: "kernelport.gpu_memory_bytes" '
                                                 'value: { string_value: "100000GiB" } }')
    write_torch_mlp(str(repo), "no_such_gpu", instance_group="instance_group [ { kind: KIND_GPU gpus: [ 99 ] } ]")
    srv = ServerProcess(str(repo), str(tmp_path / "kp.sock"))
    try:
        log = srv.log()
        assert "loaded model 'mlp_gpu'" in log and ("cuda:0 on GPU-" in log or "cuda:0 on MIG-" in log), log
        with Client(srv.socket_path) as c:
            x = np.random.default_rng(5).standard_normal((2, 512)).astype(np.float32)
            out = c.infer("mlp_gpu", {"INPUT__0": x})["OUTPUT__0"]
            ref = mlp_reference(x)
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-3
            assert not c.model_ready("too_big") and not c.model_ready("no_such_gpu")
        assert "does not fit on" in srv.log() and "gpus lists device 99" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


# -- gRPC CUDA shared memory end to end ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_grpc_cuda_shared_memory_end_to_end(example_repo: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import cupy
    from tritonclient.utils import InferenceServerException

    from conftest import ServerProcess

    srv = ServerProcess.with_ports(example_repo, str(tmp_path / "kp.sock"), "--allow-client-shm", grpc=True)
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        assert "cuda_shared_memory" in c.get_server_metadata().extensions
        mem_in, mem_out = cupy.cuda.Memory(1 << 20), cupy.cuda.Memory(1 << 20)  # plain cudaMalloc
        h_in = base64.b64encode(bytes(cupy.cuda.runtime.ipcGetMemHandle(mem_in.ptr)))
        h_out = base64.b64encode(bytes(cupy.cuda.runtime.ipcGetMemHandle(mem_out.ptr)))
        with pytest.raises(InferenceServerException, match="larger than the device allocation"):
            c.register_cuda_shared_memory("too_big", h_in, 0, 1 << 30)
        c.register_cuda_shared_memory("in", h_in, 0, 128)
        c.register_cuda_shared_memory("out", h_out, 0, 128)
        st = c.get_cuda_shared_memory_status()
        assert {r.name: (r.device_id, r.byte_size) for r in st.regions.values()} == {"in": (0, 128), "out": (0, 128)}
        a = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
        b = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
        din = cupy.ndarray((2, 16), cupy.float32, cupy.cuda.MemoryPointer(mem_in, 0))
        din[0], din[1] = cupy.asarray(a[0]), cupy.asarray(b[0])
        cupy.cuda.runtime.deviceSynchronize()
        x0, x1 = grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        x0.set_shared_memory("in", 64, offset=0)
        x1.set_shared_memory("in", 64, offset=64)
        o0, o1 = grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")
        o0.set_shared_memory("out", 64, offset=0)
        o1.set_shared_memory("out", 64, offset=64)
        c.infer("add_sub", [x0, x1], outputs=[o0, o1])
        dout = cupy.asnumpy(cupy.ndarray((2, 16), cupy.float32, cupy.cuda.MemoryPointer(mem_out, 0)))
        np.testing.assert_allclose(dout[0], (a + b)[0], rtol=1e-6)
        np.testing.assert_allclose(dout[1], (a - b)[0], rtol=1e-6)
        x0.set_shared_memory("in", 64, offset=100)  # beyond the registered 128 bytes
        with pytest.raises(InferenceServerException, match="outside"):
            c.infer("add_sub", [x0, x1])
        c.unregister_cuda_shared_memory("in")
        c.unregister_cuda_shared_memory()
        assert len(c.get_cuda_shared_memory_status().regions) == 0
    finally:
        assert srv.stop() == 0, srv.log()
