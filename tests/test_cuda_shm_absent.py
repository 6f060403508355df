"""gRPC CUDA shared memory on a machine without CUDA: a real server (client shared memory allowed) driven by
tritonclient answers each bad registration with INVALID_ARGUMENT first, then UNAVAILABLE with the reason, never
lists the extension, and keeps serving. The registry is checked directly too."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from kernelport.errors import InvalidInputError
from kernelport.gpu import cuda
from kernelport.gpu.cuda_shm import CudaRegionNotFoundError, CudaSharedMemoryRegistry

pytestmark = pytest.mark.skipif(cuda.cuda_available(), reason="checks the answers of a server without CUDA")

HANDLE = os.urandom(64)


def expect(code: str, fn, text: str = "") -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == f"StatusCode.{code}", e.value.message()
    assert text in str(e.value.message())
    return str(e.value.message())


@pytest.mark.timeout(240)
def test_cuda_shared_memory_without_cuda(example_repo: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = ServerProcess.with_ports(example_repo, str(tmp_path / "kp.sock"), "--allow-client-shm", grpc=True)
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        md = c.get_server_metadata()
        assert "system_shared_memory" in md.extensions and "cuda_shared_memory" not in md.extensions
        # the request's own fields first, as on a GPU machine
        expect("INVALID_ARGUMENT", lambda: c.register_cuda_shared_memory("r", base64.b64encode(HANDLE[:63]), 0, 64),
               "raw_handle must be a 64-byte cudaIpcMemHandle_t, got 63 bytes")
        expect("INVALID_ARGUMENT", lambda: c.register_cuda_shared_memory("r", base64.b64encode(HANDLE), -1, 64),
               "device_id must be a non-negative device ordinal, got -1")
        expect("INVALID_ARGUMENT", lambda: c.register_cuda_shared_memory("r", base64.b64encode(HANDLE), 0, 0),
               "byte size must be positive")
        expect("INVALID_ARGUMENT", lambda: c.register_cuda_shared_memory("", base64.b64encode(HANDLE), 0, 64),
               "region name must be 1 to 256 characters")
        msg = expect("UNAVAILABLE", lambda: c.register_cuda_shared_memory("r", base64.b64encode(HANDLE), 0, 64),
                     "CUDA shared memory is not available: ")
        assert cuda.cuda_unavailable_reason(bindings=("cupy",)) in msg  # the reason, in the server's words
        assert len(c.get_cuda_shared_memory_status().regions) == 0
        expect("NOT_FOUND", lambda: c.get_cuda_shared_memory_status("r"), "'r' is not registered")
        c.unregister_cuda_shared_memory("r")  # an unknown name: fine, as for system shared memory
        c.unregister_cuda_shared_memory()
        # a request naming a region that was never registered
        x0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        x0.set_shared_memory("r", 64)
        x1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        x1.set_data_from_numpy(np.ones((1, 16), np.float32))
        expect("NOT_FOUND", lambda: c.infer("add_sub", [x0, x1]), "'r' is not registered")
        # and the server still serves
        y0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        y0.set_data_from_numpy(np.full((1, 16), 2, np.float32))
        out = c.infer("add_sub", [y0, x1]).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, np.full((1, 16), 3, np.float32))
    finally:
        assert srv.stop() == 0, srv.log()


def test_registry_without_cuda_refuses_after_checking_fields() -> None:
    reg = CudaSharedMemoryRegistry(allowed=True)
    assert not reg.available()
    with pytest.raises(InvalidInputError, match="got 65 bytes"):
        reg.register("r", HANDLE + b"x", 0, 64)
    with pytest.raises(cuda.CudaUnavailableError, match="^CUDA shared memory is not available: "):
        reg.register("r", HANDLE, 0, 64)
    with pytest.raises(CudaRegionNotFoundError):
        with reg.use("r"):
            pass
    assert reg.status() == [] and not reg.has("r")
    reg.unregister("r")
    reg.close()  # no helper process was ever started
    assert reg._helper is None
