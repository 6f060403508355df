"""The local zero-copy path end to end: a real server subprocess, real worker processes, real clients."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from _clients import add_sub_worker, claim_then_hang
from _models import write_identity_bytes, write_onnx_model
from conftest import ServerProcess, child_pids
from kernelport import (
    AsyncClient,
    Client,
    InvalidInputError,
    ModelNotFoundError,
    ServerUnavailableError,
)

SPAWN = multiprocessing.get_context("spawn")
pytestmark = pytest.mark.timeout(180)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.fixture()
def client(server: ServerProcess):
    with Client(server.socket_path) as c:
        yield c


def test_add_sub_matches_numpy(client: Client) -> None:
    for n in (1, 3, 16):
        a, b = rand(n, 16, seed=n), rand(n, 16, seed=100 + n)
        out = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(out["OUTPUT0"], a + b)
        np.testing.assert_array_equal(out["OUTPUT1"], a - b)
        assert out["OUTPUT0"].shape == (n, 16)


def test_only_requested_outputs(client: Client) -> None:
    a, b = rand(2, 16), rand(2, 16, seed=1)
    out = client.infer("add_sub", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    assert list(out) == ["OUTPUT1"]
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)


def test_mlp_matches_numpy(client: Client, example_repo: str) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.path.join(example_repo, "mlp", "1", "model.onnx"))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    mats = sorted((v for v in w.values() if v.ndim == 2), key=lambda m: m.shape[0])  # [512,2048], [2048,512]
    biases = {v.shape[0]: v for v in w.values() if v.ndim == 1}
    x = rand(5, 512, seed=7)
    h = np.maximum(x.astype(np.float64) @ mats[0] + biases[2048], 0)
    ref = h @ mats[1] + biases[512]
    out = client.infer("mlp", {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_model_without_batching(client: Client) -> None:
    a, b = rand(16), rand(16, seed=3)
    out = client.infer("add_sub_nobatch", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    with pytest.raises(InvalidInputError, match="add_sub_nobatch"):
        client.infer("add_sub_nobatch", {"INPUT0": a[None], "INPUT1": b[None]})


def test_16mib_identity_both_forms(client: Client) -> None:
    x = rand(1, 4194304, seed=9)
    np.testing.assert_array_equal(client.infer("identity_16m", {"INPUT0": x})["OUTPUT0"], x)
    with client.request("identity_16m", batch=1) as req:
        req.inputs["INPUT0"][:] = x
        out = req.run()
        np.testing.assert_array_equal(out["OUTPUT0"], x)
        assert not out["OUTPUT0"].flags.writeable
        # the output is the input passed through (an ONNX Identity): the lane gives it the input's rows,
        # so the worker computes it with no copy and the lane holds no rows for it
        assert np.shares_memory(out["OUTPUT0"], req.inputs["INPUT0"])
    layout = next(iter(client._models["identity_16m"].lanes.values())).layout
    assert layout.aliases == (-1, 0) and layout.row_bytes == [4 * 4194304, 0]
    # mixed with requests of another model in between, the next request still gets its own values
    y = rand(1, 4194304, seed=10)
    np.testing.assert_array_equal(client.infer("add_sub", {"INPUT0": y[:, :16], "INPUT1": y[:, :16]})["OUTPUT0"],
                                  2 * y[:, :16])
    np.testing.assert_array_equal(client.infer("identity_16m", {"INPUT0": y})["OUTPUT0"], y)


def test_lane_layout_refuses_bad_aliases() -> None:
    from kernelport.client.lanes import LaneLayout

    good = {"lane_id": 1, "nslots": 2, "max_batch": 1, "batching": True, "n_inputs": 1, "size": 0,
            "tensors": [{"name": "x", "datatype": "FP32", "dims": [4]}, {"name": "y", "datatype": "FP32", "dims": [4]}],
            "aliases": [-1, 0]}
    assert LaneLayout.from_dict(good).row_bytes == [16, 0]
    for aliases in ([0, -1], [-1, 1], [-1, 5], [-1]):  # an input aliased, an output on itself, out of range
        with pytest.raises(ValueError, match="lane layout"):
            LaneLayout.from_dict({**good, "aliases": aliases})
    other = {**good, "tensors": [good["tensors"][0], {"name": "y", "datatype": "FP32", "dims": [5]}]}
    with pytest.raises(ValueError, match="cannot share"):
        LaneLayout.from_dict(other)


def test_zero_copy_request(client: Client) -> None:
    a, b = rand(4, 16, seed=11), rand(4, 16, seed=12)
    with client.request("add_sub", batch=4) as req:
        assert req.inputs["INPUT0"].shape == (4, 16)
        req.inputs["INPUT0"][:] = a
        req.inputs["INPUT1"][:] = b
        out = req.run()
        np.testing.assert_array_equal(out["OUTPUT0"], a + b)
        np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    assert req.outputs is None  # released: the views are gone


def test_asyncio_client(server: ServerProcess) -> None:
    async def main() -> list[np.ndarray]:
        async with await AsyncClient.connect(server.socket_path) as c:
            assert await c.model_ready("add_sub")
            outs = await asyncio.gather(*[
                c.infer("add_sub", {"INPUT0": rand(1, 16, seed=i), "INPUT1": rand(1, 16, seed=50 + i)})
                for i in range(8)])
            async with await c.request("add_sub", batch=2) as req:
                req.inputs["INPUT0"][:] = 1
                req.inputs["INPUT1"][:] = 2
                out = await req.run()
                assert np.all(out["OUTPUT0"] == 3)
            return [o["OUTPUT0"] for o in outs]

    results = asyncio.run(main())
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, rand(1, 16, seed=i) + rand(1, 16, seed=50 + i))


@pytest.mark.parametrize("inputs, message", [
    ({"INPUT0": rand(1, 16)}, "missing input 'INPUT1'"),
    ({"INPUT0": rand(1, 16), "INPUT1": rand(1, 16), "EXTRA": rand(1, 16)}, "unknown input 'EXTRA'"),
    ({"INPUT0": rand(1, 16).astype(np.float16), "INPUT1": rand(1, 16)},
     r"input 'INPUT0': expected FP32 \[-1,16\], got FP16 \[1,16\]"),
    ({"INPUT0": rand(1, 15), "INPUT1": rand(1, 15)}, r"expected FP32 \[-1,16\], got FP32 \[1,15\]"),
    ({"INPUT0": rand(16), "INPUT1": rand(16)}, r"expected FP32 \[-1,16\], got FP32 \[16\]"),
    ({"INPUT0": rand(17, 16), "INPUT1": rand(17, 16)}, "batch size 17 exceeds max_batch_size 16"),
    ({"INPUT0": rand(2, 16), "INPUT1": rand(3, 16)}, "batch size 3 differs"),
])
def test_bad_requests_get_clear_errors(client: Client, inputs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        client.infer("add_sub", inputs)
    # nothing else disturbed: the same client goes on
    a, b = rand(1, 16), rand(1, 16, seed=2)
    np.testing.assert_array_equal(client.infer("add_sub", {"INPUT0": a, "INPUT1": b})["OUTPUT0"], a + b)


def test_unknown_model(client: Client) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        client.infer("nope", {"x": rand(1)})
    assert client.model_ready("add_sub")
    assert not client.model_ready("nope")
    with pytest.raises(InvalidInputError, match="batch size 17"):
        client.request("add_sub", batch=17)


def test_eight_processes_batch_together(server: ServerProcess) -> None:
    with Client(server.socket_path) as c:
        before = c.counters("add_sub_window")
        with SPAWN.Pool(8) as pool:
            results = pool.starmap(add_sub_worker, [(server.socket_path, "add_sub_window", i, 500) for i in range(8)])
        after = c.counters("add_sub_window")
    assert sum(g for g, _ in results) == 8 * 500
    assert sum(b for _, b in results) == 0
    batches = after["batches"] - before["batches"]
    claims = after["claims"] - before["claims"]
    assert claims == 8 * 500
    assert claims / batches > 1.0, (claims, batches)  # requests per batch: they were batched together


def _hold(client: Client, model: str, n: int) -> list:
    """Claim n one-row requests in the same open slot, filled with known values."""
    reqs = []
    for i in range(n):
        r = client.request(model, batch=1)
        r.inputs["INPUT0"][:] = i
        r.inputs["INPUT1"][:] = 1
        reqs.append(r)
    return reqs


def _run_all(reqs: list) -> None:
    threads = [threading.Thread(target=r.run, kwargs={"timeout": 10}) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(reqs):
        assert r.outputs is not None, f"request {i} did not complete"
        assert np.all(r.outputs["OUTPUT0"] == i + 1)
        r.release()


def test_batch_closes_on_window(client: Client) -> None:
    before = client.counters("add_sub_window")
    _run_all(_hold(client, "add_sub_window", 3))
    after = client.counters("add_sub_window")
    # three requests in one batch of three: closed by the window, not by size
    assert after["batches"] - before["batches"] == 1
    assert after["rows"] - before["rows"] == 3


def test_batch_closes_on_preferred_size(client: Client) -> None:
    before = client.counters("add_sub_preferred")
    _run_all(_hold(client, "add_sub_preferred", 4))  # the window is 30 s; run() times out after 10 s
    after = client.counters("add_sub_preferred")
    assert after["batches"] - before["batches"] == 1
    assert after["rows"] - before["rows"] == 4


def test_batch_closes_when_full(client: Client) -> None:
    before = client.counters("add_sub_full")
    _run_all(_hold(client, "add_sub_full", 16))
    after = client.counters("add_sub_full")
    assert after["batches"] - before["batches"] == 1
    assert after["rows"] - before["rows"] == 16


def _start_hanging_client(server: ServerProcess, model: str, commit: bool):
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=claim_then_hang, args=(server.socket_path, model, child, commit))
    p.start()
    assert parent.poll(60), "client did not claim"
    assert parent.recv() == "claimed"
    return p


def test_client_killed_between_claim_and_commit(server: ServerProcess, client: Client) -> None:
    model = "add_sub_window"
    before = client.counters(model)
    victim = _start_hanging_client(server, model, commit=False)
    # our request lands in the same slot as the victim's uncommitted row
    results: dict[str, np.ndarray] = {}
    t = threading.Thread(target=lambda: results.update(
        client.infer(model, {"INPUT0": rand(2, 16), "INPUT1": rand(2, 16, seed=1)}, timeout=20)))
    t.start()
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    t.join(30)
    np.testing.assert_array_equal(results["OUTPUT0"], rand(2, 16) + rand(2, 16, seed=1))
    after = client.counters(model)
    assert after["abandoned_rows"] - before["abandoned_rows"] == 1  # the victim's row, and only it
    assert after["failed_batches"] == before["failed_batches"]
    # every slot of the lane is usable again: cycle through all of them several times
    for i in range(20):
        out = client.infer(model, {"INPUT0": rand(1, 16, seed=i), "INPUT1": rand(1, 16)}, timeout=10)
        np.testing.assert_array_equal(out["OUTPUT0"], rand(1, 16, seed=i) + rand(1, 16))


def _assert_no_named_segments(pid: int, shm_before: set[str]) -> None:
    """Segments are memfds: the server maps nothing from /dev/shm, and no new entry there is ours
    (other processes on the machine may add their own)."""
    if os.path.exists(f"/proc/{pid}/maps"):
        with open(f"/proc/{pid}/maps") as f:
            assert "/dev/shm/" not in f.read()
    new = set(os.listdir("/dev/shm")) - shm_before
    assert not [n for n in new if n.startswith(("kp", "kernelport"))], new


def _server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_killed_while_waiting_leaks_nothing(server: ServerProcess, client: Client) -> None:
    model = "add_sub_preferred"  # 30 s window: the victim's batch cannot close before it dies
    client.infer(model, {"INPUT0": rand(4, 16), "INPUT1": rand(4, 16)})  # the lane exists
    fds_before = _server_fds(server.pid)
    shm_before = set(os.listdir("/dev/shm"))
    for _ in range(3):
        victim = _start_hanging_client(server, model, commit=True)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    # three victims' rows sit in a slot; fill it to its preferred size and check everything still flows
    with Client(server.socket_path) as c2:
        for i in range(12):
            a = rand(4, 16, seed=i)
            out = c2.infer(model, {"INPUT0": a, "INPUT1": a}, timeout=20)
            np.testing.assert_array_equal(out["OUTPUT0"], a + a)
    _assert_no_named_segments(server.pid, shm_before)
    # every victim's connection and descriptors are closed (the server closes the last one just after us)
    deadline = time.monotonic() + 10
    while _server_fds(server.pid) > fds_before and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert _server_fds(server.pid) <= fds_before


def test_server_gone_and_clean_shutdown(served_repo: str, tmp_path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    sock = str(tmp_path / "gone.sock")
    srv = ServerProcess(served_repo, sock)
    c = Client(sock)
    a = rand(1, 16)
    np.testing.assert_array_equal(c.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a + a)
    _assert_no_named_segments(srv.pid, shm_before)
    assert srv.stop() == 0  # SIGTERM: a clean exit
    assert not os.path.exists(sock)
    with pytest.raises(ServerUnavailableError):
        c.infer("add_sub", {"INPUT0": a, "INPUT1": a}, timeout=10)
    c.close()
    with pytest.raises(ServerUnavailableError, match="no KernelPort server"):
        Client(sock)
    _assert_no_named_segments(srv.pid, shm_before)


# ---- shape-aware lanes, eviction and BYTES, on a server of their own ------------------------------------


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    from onnx import TensorProto, helper

    repo = str(tmp_path_factory.mktemp("shapes_repo"))
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    # variable length per sample, output length follows the input's: the server asks the worker
    write_onnx_model(
        repo, "scale",
        'name: "scale"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\ndynamic_batching { }\n',
        [helper.make_node("Constant", [], ["c"], value=two), helper.make_node("Mul", ["INPUT0", "c"], ["OUTPUT0"])],
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, None])])
    write_identity_bytes(repo, "dynamic_batching { }\n")
    # no config.pbtxt at all: completed from the ONNX model (Triton's auto-complete)
    write_onnx_model(
        repo, "auto_add", "",
        [helper.make_node("Add", ["A", "B"], ["SUM"])],
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("SUM", TensorProto.FLOAT, [None, 3])])
    os.remove(os.path.join(repo, "auto_add", "config.pbtxt"))
    sock = str(tmp_path_factory.mktemp("shapes_sock") / "kp.sock")
    srv = ServerProcess(repo, sock, "--max-lanes-per-model", "2")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_variable_shapes_get_their_own_lanes_and_idle_ones_are_evicted(shapes_server: ServerProcess) -> None:
    with Client(shapes_server.socket_path) as c:
        # five lengths through a model allowed two lanes at once: the idle ones make room
        for length in (3, 5, 7, 3, 9, 5):
            x = rand(2, length, seed=length)
            out = c.infer("scale", {"INPUT0": x})["OUTPUT0"]
            np.testing.assert_array_equal(out, x * 2)
        # the zero-copy form needs the variable dims
        with c.request("scale", batch=1, shapes={"INPUT0": [6]}) as req:
            req.inputs["INPUT0"][:] = 1.5
            np.testing.assert_array_equal(req.run()["OUTPUT0"], np.full((1, 6), 3.0, np.float32))
        with pytest.raises(InvalidInputError, match="give `shapes`"):
            c.request("scale", batch=1)
        # two shapes whose outputs are held (not released) fill the lane budget: a third is refused, clearly
        with c.request("scale", batch=1, shapes={"INPUT0": [11]}) as r1:
            r1.inputs["INPUT0"][:] = 1
            r1.run()
            with c.request("scale", batch=1, shapes={"INPUT0": [12]}) as r2:
                r2.inputs["INPUT0"][:] = 1
                r2.run()
                with pytest.raises(InvalidInputError, match="too many distinct input shapes"):
                    c.infer("scale", {"INPUT0": rand(1, 13)})
                assert np.all(r1.outputs["OUTPUT0"] == 2) and np.all(r2.outputs["OUTPUT0"] == 2)
        np.testing.assert_array_equal(c.infer("scale", {"INPUT0": rand(1, 13)})["OUTPUT0"], rand(1, 13) * 2)


def test_bytes_tensors(shapes_server: ServerProcess) -> None:
    with Client(shapes_server.socket_path) as c:
        x = np.array([[b"hello", "w\u00f6rld", b"", b"x" * 100], [b"a", b"b", b"c", b"d"]], dtype=object)
        out = c.infer("identity_bytes", {"INPUT0": x})["OUTPUT0"]
        assert out.shape == (2, 4)
        assert out.tolist() == [[b"hello", "w\u00f6rld".encode(), b"", b"x" * 100], [b"a", b"b", b"c", b"d"]]
        with pytest.raises(InvalidInputError, match="expected BYTES"):
            c.infer("identity_bytes", {"INPUT0": rand(1, 4)})
        with pytest.raises(InvalidInputError, match="use infer"):
            c.request("identity_bytes")


def test_model_without_config_is_completed_from_the_model(shapes_server: ServerProcess) -> None:
    with Client(shapes_server.socket_path) as c:
        meta = c.model_metadata("auto_add")
        assert meta["max_batch_size"] == 4  # every dim 0 is dynamic: batching on, Triton's default size
        inputs = [(t["name"], t["datatype"], t["dims"]) for t in meta["inputs"]]
        assert inputs == [("A", "FP32", [3]), ("B", "FP32", [3])]
        assert [(t["name"], t["dims"]) for t in meta["outputs"]] == [("SUM", [3])]
        a, b = rand(4, 3, seed=1), rand(4, 3, seed=2)
        np.testing.assert_array_equal(c.infer("auto_add", {"A": a, "B": b})["SUM"], a + b)


def test_sigint_shuts_down_cleanly(served_repo: str, tmp_path) -> None:
    sock = str(tmp_path / "int.sock")
    srv = ServerProcess(served_repo, sock)
    with Client(sock) as c:
        a = rand(1, 16)
        np.testing.assert_array_equal(c.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a + a)
    workers = child_pids(srv.pid)
    assert len(workers) >= 4  # one worker process per model instance
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(30) == 0, srv.log()
    assert not os.path.exists(sock)
    # every worker is gone too (the helper processes exit on their own once the server is gone)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cli_status_and_models(server: ServerProcess) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "kernelport.cli.main", *args, "--socket", server.socket_path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    with Client(server.socket_path) as c:
        c.infer("add_sub", {"INPUT0": rand(2, 16), "INPUT1": rand(2, 16)})
        claims = c.counters("add_sub")["claims"]
    table = cli("status")
    row = next(line.split() for line in table.splitlines() if line.startswith("add_sub "))
    assert row[1] == "READY" and int(row[3]) >= claims
    listing = cli("models", "list")
    assert any(line.split()[:3] == ["mlp", "1", "READY"] for line in listing.splitlines())
