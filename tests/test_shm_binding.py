"""Requests whose tensors stay in the client's registered shared memory: the worker binds them there.

A real server (`--allow-client-shm`), tritonclient over gRPC, and a model whose config sets
`kernelport.shm_bind_min_bytes: 0`, so every request with a tensor in a system region is bound in the
worker (kernelport.server.external): the worker process maps the client's object itself, the request takes
a slot of its own (it runs at once, without waiting for the 30 s batching window), and the results land
in the region without the server copying them. The truncation tests cover the client shrinking its object
between the server's checks and the worker's run, and the worker's SIGBUS fence (kp_guard.h) in-process.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

import _kpcore
from conftest import ServerProcess, add_sub_variant, child_pids
from kernelport import Client

pytestmark = pytest.mark.timeout(90)

BOUND = "add_sub_bound"  # binds every region request; a 30 s window, closing at 4 rows
COPIED = "add_sub_copied"  # the same, with the default threshold: small region tensors are copied
BATCHING = "dynamic_batching {{\n  preferred_batch_size: [ 4 ]\n  max_queue_delay_microseconds: 30000000\n}}\n{params}"
BIND_ALWAYS = 'parameters {\n  key: "kernelport.shm_bind_min_bytes"\n  value { string_value: "0" }\n}\n'
PLAIN = "add_sub_plain"  # binds every region request, no batching window (for the blocker test)
PLAIN_BATCHING = "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n" + BIND_ALWAYS


@pytest.fixture(scope="module")
def server(served_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = str(tmp_path_factory.mktemp("bind_repo"))
    shutil.copytree(served_repo, repo, dirs_exist_ok=True)
    add_sub_variant(repo, BOUND, BATCHING.format(params=BIND_ALWAYS))
    add_sub_variant(repo, COPIED, BATCHING.format(params=""))
    add_sub_variant(repo, PLAIN, PLAIN_BATCHING)
    sock = str(tmp_path_factory.mktemp("bind_sock") / "kp.sock")
    # a long commit timeout: the blocker test holds the worker with an uncommitted request
    srv = ServerProcess.with_ports(repo, sock, "--allow-client-shm", "--commit-timeout-ms", "20000", grpc=True)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


@pytest.fixture
def regions(client: grpcclient.InferenceServerClient) -> Iterator[Callable[[int], tuple[str, str, Any]]]:
    """Makes and registers client shm objects (name, key, handle); unregisters and destroys them after."""
    made: list[tuple[str, Any]] = []

    def make(byte_size: int) -> tuple[str, str, Any]:
        tag = uuid.uuid4().hex[:12]
        name, key = f"bind_{tag}", f"/kptest_bind_{tag}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append((name, handle))
        client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    yield make
    for name, handle in made:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)


def _workers_mapping(server: ServerProcess, key: str) -> list[int]:
    """The server's worker processes that have the POSIX shm object `key` mapped."""
    found = []
    for pid in child_pids(server.pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.rstrip().endswith("/dev/shm" + key) for line in f):
                    found.append(pid)
        except FileNotFoundError:
            pass
    return found


def _data(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 16)).astype(np.float32), rng.standard_normal((batch, 16)).astype(np.float32))


def _region_request(name: str, a: np.ndarray) -> tuple[list[Any], list[Any]]:
    """INPUT0, INPUT1, OUTPUT0, OUTPUT1 one after the other in region `name`."""
    nbytes = a.nbytes
    inputs = [grpcclient.InferInput(t, list(a.shape), "FP32") for t in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory(name, nbytes)
    inputs[1].set_shared_memory(name, nbytes, offset=nbytes)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(name, nbytes, offset=2 * nbytes)
    outputs[1].set_shared_memory(name, nbytes, offset=3 * nbytes)
    return inputs, outputs


def _stats(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int, dict[int, int]]:
    s = client.get_inference_statistics(model).model_stats[0]
    return s.inference_count, s.execution_count, {b.batch_size: b.compute_infer.count for b in s.batch_stats}


def test_bound_request_runs_in_the_workers_mapping_of_the_region(
    server: ServerProcess, client: grpcclient.InferenceServerClient, regions: Callable[[int], tuple[str, str, Any]]
) -> None:
    a, b = _data(3, seed=1)
    name, key, handle = regions(4 * a.nbytes)
    shm.set_shared_memory_region(handle, [a, b])
    inputs, outputs = _region_request(name, a)
    before = _stats(client, BOUND)
    for i in range(3):
        a, b = _data(3, seed=10 + i)
        shm.set_shared_memory_region(handle, [a, b])
        # a slot of its own: it runs at once, not after the model's 30 s window (4 rows would close it)
        result = client.infer(BOUND, inputs, outputs=outputs, client_timeout=15)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [3, 16], 2 * a.nbytes), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [3, 16], 3 * a.nbytes), a - b)
        assert result.get_output("OUTPUT0").shape == [3, 16]
        assert len(result.get_response().raw_output_contents) == 0
    assert _workers_mapping(server, key), "no worker maps the client's region: the request was copied"
    after = _stats(client, BOUND)
    # counted as three batches of 3 samples (not of the whole slot it claimed)
    assert (after[0] - before[0], after[1] - before[1]) == (9, 3)
    assert after[2].get(3, 0) - before[2].get(3, 0) == 3
    client.unregister_system_shared_memory(name)
    assert not _workers_mapping(server, key), "the workers still map an unregistered region"


def test_small_region_tensors_are_copied_and_batch_with_others(
    server: ServerProcess, client: grpcclient.InferenceServerClient, regions: Callable[[int], tuple[str, str, Any]]
) -> None:
    """Below the model's kernelport.shm_bind_min_bytes (256 KiB by default) a region request is copied
    into the lane, so it still shares a batch: 1 gRPC row + 3 local rows close the 4-row batch together."""
    a, b = _data(1, seed=2)
    name, key, handle = regions(4 * a.nbytes)
    shm.set_shared_memory_region(handle, [a, b])
    inputs, outputs = _region_request(name, a)
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.setdefault("r", client.infer(COPIED, inputs, outputs=outputs,
                                                                            client_timeout=30)))
    with Client(server.socket_path) as local:
        before = local.counters(COPIED)
        t.start()
        for _ in range(400):
            if local.counters(COPIED)["claims"] > before["claims"]:
                break
            threading.Event().wait(0.05)
        c0, c1 = _data(3, seed=3)
        out = local.infer(COPIED, {"INPUT0": c0, "INPUT1": c1}, timeout=30)
        t.join(30)
        after = local.counters(COPIED)
    np.testing.assert_array_equal(out["OUTPUT0"], c0 + c1)
    assert "r" in done
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], 2 * a.nbytes), a + b)
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (1, 4)
    assert not _workers_mapping(server, key)


def test_bound_request_mixing_message_and_region_tensors(
    client: grpcclient.InferenceServerClient, regions: Callable[[int], tuple[str, str, Any]]
) -> None:
    a, b = _data(2, seed=4)
    name, _, handle = regions(2 * a.nbytes)
    shm.set_shared_memory_region(handle, [b])
    x0 = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
    x0.set_data_from_numpy(a)
    x1 = grpcclient.InferInput("INPUT1", [2, 16], "FP32")
    x1.set_shared_memory(name, b.nbytes)
    o0 = grpcclient.InferRequestedOutput("OUTPUT0")  # in the response
    o1 = grpcclient.InferRequestedOutput("OUTPUT1")
    o1.set_shared_memory(name, b.nbytes, offset=b.nbytes)
    result = client.infer(BOUND, [x0, x1], outputs=[o0, o1], client_timeout=15)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [2, 16], b.nbytes), a - b)
    # an output region too small for the result: a clear error, and the model goes on
    o1.set_shared_memory(name, b.nbytes // 2, offset=b.nbytes)
    with pytest.raises(InferenceServerException) as err:
        client.infer(BOUND, [x0, x1], outputs=[o0, o1], client_timeout=15)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "too small" in err.value.message()
    np.testing.assert_array_equal(client.infer(BOUND, [x0, x1], outputs=[o0], client_timeout=15).as_numpy("OUTPUT0"),
                                  a + b)


def _shrink(key: str, size: int) -> None:
    import _posixshmem

    fd = _posixshmem.shm_open(key, os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def test_region_shrunk_before_the_worker_runs_fails_that_request_only(
    server: ServerProcess, client: grpcclient.InferenceServerClient, regions: Callable[[int], tuple[str, str, Any]]
) -> None:
    """The client truncates its object after the server checked it and before the worker runs the
    request (the worker is held by an uncommitted local request): the worker sees it, that request fails
    with a message saying so, and the model serves the next one, from the same region grown back too."""
    a, b = _data(1, seed=5)
    name, key, handle = regions(4 * a.nbytes)
    shm.set_shared_memory_region(handle, [a, b])
    inputs, outputs = _region_request(name, a)
    client.infer(PLAIN, inputs, outputs=outputs, client_timeout=15)  # maps the region in the worker
    done: dict[str, Any] = {}

    def call() -> None:
        try:
            done["result"] = client.infer(PLAIN, inputs, outputs=outputs, client_timeout=40)
        except InferenceServerException as e:
            done["error"] = e

    with Client(server.socket_path) as local:
        blocker = local.request(PLAIN, batch=1)
        for t in ("INPUT0", "INPUT1"):
            blocker.inputs[t][:] = 0
        for _ in range(400):  # the worker took the blocker's batch and waits for its commit
            if blocker.taken:
                break
            threading.Event().wait(0.05)
        assert blocker.taken
        before = local.counters(PLAIN)["claims"]
        t = threading.Thread(target=call)
        t.start()
        for _ in range(400):
            if local.counters(PLAIN)["claims"] > before:
                break
            threading.Event().wait(0.05)
        _shrink(key, 64)  # a quarter of the registered region
        blocker.run()
        blocker.release()
        t.join(40)
    assert "error" in done, "the request ran on a region that had shrunk"
    assert "shrank" in done["error"].message(), done["error"].message()
    assert key not in done["error"].message()
    _shrink(key, 4 * a.nbytes)  # grown back: the next request maps it afresh and runs
    shm.set_shared_memory_region(handle, [a, b])
    client.infer(PLAIN, inputs, outputs=outputs, client_timeout=15)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16], 2 * a.nbytes), a + b)
    assert client.is_model_ready(PLAIN)


# ---- the fence itself, in this process ----

def _object(size: int) -> int:
    import _posixshmem

    key = f"/kp_test_fence_{secrets.token_hex(6)}"
    fd = _posixshmem.shm_open(key, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    _posixshmem.shm_unlink(key)
    os.ftruncate(fd, size)
    return fd


def test_fenced_mapping_absorbs_a_truncation_on_any_thread() -> None:
    size = 8 * mmap.PAGESIZE
    fd = _object(size)
    m = _kpcore.FencedMapping(os.dup(fd), size)
    view = np.frombuffer(memoryview(m), dtype=np.uint8)
    view[:] = 7
    assert m.intact() and not m.faulted
    os.ftruncate(fd, mmap.PAGESIZE)  # the client cuts its object to one page
    assert not m.intact() and not m.faulted  # seen by fstat before anything touches the lost pages
    seen: dict[str, int] = {}

    def touch() -> None:  # another thread (a framework's pool thread) reads and writes the lost pages
        view[4 * mmap.PAGESIZE: 5 * mmap.PAGESIZE] = 3
        seen["sum"] = int(view[6 * mmap.PAGESIZE: 6 * mmap.PAGESIZE + 16].sum())

    t = threading.Thread(target=touch)
    t.start()
    t.join(10)
    assert "sum" in seen  # the thread finished: no SIGBUS killed the process
    assert seen["sum"] == 0  # the lost pages read as the fence's fresh zero pages
    assert m.faulted and not m.intact()
    os.close(fd)
    with pytest.raises(ValueError, match="smaller"):
        _kpcore.FencedMapping(_object(mmap.PAGESIZE), 2 * mmap.PAGESIZE)


def test_a_sigbus_outside_fenced_mappings_still_kills() -> None:
    """The fence must not swallow every SIGBUS: one in a plain mapping ends the process as before."""
    code = (
        "import mmap, os, _posixshmem, numpy as np, _kpcore\n"
        "fd = _posixshmem.shm_open('/kp_test_fence_kill_%d' % os.getpid(), os.O_CREAT | os.O_RDWR, 0o600)\n"
        "_posixshmem.shm_unlink('/kp_test_fence_kill_%d' % os.getpid())\n"
        "os.ftruncate(fd, 4 * mmap.PAGESIZE)\n"
        "fenced = _kpcore.FencedMapping(os.dup(fd), 4 * mmap.PAGESIZE)\n"
        "plain = mmap.mmap(fd, 4 * mmap.PAGESIZE)\n"
        "os.ftruncate(fd, mmap.PAGESIZE)\n"
        "np.frombuffer(plain, dtype=np.uint8)[3 * mmap.PAGESIZE] = 1\n"
        "print('survived')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -7, (proc.returncode, proc.stdout, proc.stderr)  # SIGBUS
    assert "survived" not in proc.stdout
