"""Model control modes (none, explicit, poll) and model_warmup, against real `kernelport serve` subprocesses."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, free_port
from kernelport import Client, ServerUnavailableError
from kernelport.cli.main import main as cli_main
from kernelport.errors import KernelPortError

pytestmark = pytest.mark.timeout(240)

DEADLINE = 60.0  # seconds a poll-mode change may take to show (the server rescans every 0.2 s)


def add_model(repo: str, name: str, example_repo: str, extra: str = "", max_batch_size: int = 16) -> str:
    """A copy of the example add_sub under `name`, with `extra` appended to its config."""
    src = os.path.join(example_repo, "add_sub")
    dst = os.path.join(repo, name)
    os.makedirs(os.path.join(dst, "1"))
    shutil.copy(os.path.join(src, "1", "model.onnx"), os.path.join(dst, "1", "model.onnx"))
    with open(os.path.join(src, "config.pbtxt")) as f:
        text = f.read().replace('name: "add_sub"', f'name: "{name}"')
    text = text.replace("max_batch_size: 16", f"max_batch_size: {max_batch_size}")
    with open(os.path.join(dst, "config.pbtxt"), "w") as f:
        f.write(text + extra)
    return dst


def rand(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16), dtype=np.float32)


def grpc_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    ins = [grpcclient.InferInput(name, list(x.shape), "FP32") for name, x in (("INPUT0", a), ("INPUT1", b))]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll mode changes the server on its own schedule: watch for the result, with a deadline."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"not within {DEADLINE:.0f} s: {what}"
        time.sleep(0.05)


def start(repo: str, tmp_path: os.PathLike[str], *extra: str) -> tuple[ServerProcess, str]:
    port = free_port()
    srv = ServerProcess(repo, os.path.join(tmp_path, "kp.sock"), "--grpc-port", str(port), *extra)
    return srv, f"127.0.0.1:{port}"


@pytest.fixture()
def repo(tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(tmp_path, "repo")
    os.makedirs(path)
    return path


def _stop(srv: ServerProcess) -> None:
    assert srv.stop() == 0, srv.log()


# ---- none ----------------------------------------------------------------------------------------------


def test_none_mode_loads_all_and_refuses_load_unload(repo: str, example_repo: str, tmp_path: str) -> None:
    add_model(repo, "m_a", example_repo)
    add_model(repo, "m_b", example_repo)
    srv, url = start(repo, tmp_path, "--model-control-mode", "none")
    g = grpcclient.InferenceServerClient(url)
    try:
        assert g.is_model_ready("m_a") and g.is_model_ready("m_b")
        with Client(srv.socket_path) as c:
            for call in (c.unload_model, c.load_model):
                with pytest.raises(ServerUnavailableError, match="m_a.*not allowed.*'none'"):
                    call("m_a")
        for call in (g.unload_model, g.load_model):
            with pytest.raises(InferenceServerException) as info:
                call("m_b")
            assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
            assert "not allowed" in info.value.message()
        assert g.is_model_ready("m_a") and g.is_model_ready("m_b")  # refused: nothing changed
        a, b = rand(2, 1), rand(2, 2)
        np.testing.assert_array_equal(g.infer("m_b", grpc_inputs(a, b)).as_numpy("OUTPUT0"), a + b)
    finally:
        g.close()
        _stop(srv)


def test_cli_rejects_flags_of_another_mode(repo: str, tmp_path: str) -> None:
    sock = os.path.join(tmp_path, "never.sock")
    base = ["serve", "--model-repository", repo, "--socket", sock]
    assert cli_main([*base, "--load-model", "x"]) == 2
    assert cli_main([*base, "--model-control-mode", "poll", "--load-model", "x"]) == 2
    assert cli_main([*base, "--model-control-mode", "explicit", "--repository-poll-secs", "1"]) == 2
    assert cli_main([*base, "--model-control-mode", "poll", "--repository-poll-secs", "0"]) == 2
    assert not os.path.exists(sock)


# ---- explicit ------------------------------------------------------------------------------------------


def test_explicit_mode_loads_only_the_named_models(repo: str, example_repo: str, tmp_path: str) -> None:
    for name in ("m_a", "m_b", "m_c"):
        add_model(repo, name, example_repo)
    srv, url = start(repo, tmp_path, "--model-control-mode", "explicit", "--load-model", "m_a",
                     "--load-model", "m_c")
    g = grpcclient.InferenceServerClient(url)
    try:
        states = {m.name: m.state for m in g.get_model_repository_index().models}
        assert states == {"m_a": "READY", "m_b": "", "m_c": "READY"}, states
        assert not g.is_model_ready("m_b")
        with Client(srv.socket_path) as c:
            with pytest.raises(KernelPortError, match="m_b"):
                c.infer("m_b", {"INPUT0": rand(1, 0), "INPUT1": rand(1, 1)})
            c.load_model("m_b")
            assert c.model_ready("m_b")
            a, b = rand(3, 3), rand(3, 4)
            np.testing.assert_array_equal(c.infer("m_b", {"INPUT0": a, "INPUT1": b})["OUTPUT1"], a - b)
            c.unload_model("m_a")
            assert not c.model_ready("m_a")
        g.unload_model("m_c")
        assert not g.is_model_ready("m_c")
        g.load_model("m_c")
        assert g.is_model_ready("m_c")
        states = {m.name: m.state for m in g.get_model_repository_index().models}
        assert states == {"m_a": "UNAVAILABLE", "m_b": "READY", "m_c": "READY"}, states
    finally:
        g.close()
        _stop(srv)


def test_explicit_mode_star_loads_every_model(repo: str, example_repo: str, tmp_path: str) -> None:
    add_model(repo, "m_a", example_repo)
    add_model(repo, "m_b", example_repo)
    srv, url = start(repo, tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    g = grpcclient.InferenceServerClient(url)
    try:
        assert {m.name: m.state for m in g.get_model_repository_index().models} == {"m_a": "READY", "m_b": "READY"}
        g.unload_model("m_a")  # explicit: allowed
        assert not g.is_model_ready("m_a")
    finally:
        g.close()
        _stop(srv)


# ---- poll ----------------------------------------------------------------------------------------------


@pytest.fixture()
def poll_server(repo: str, example_repo: str, tmp_path: str) -> Iterator[tuple[ServerProcess, str]]:
    add_model(repo, "m_a", example_repo)
    srv, url = start(repo, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    try:
        yield srv, url
    finally:
        _stop(srv)


def test_poll_mode_adds_reloads_and_removes_models(poll_server: tuple[ServerProcess, str], repo: str,
                                                   example_repo: str, tmp_path: str) -> None:
    srv, url = poll_server
    g = grpcclient.InferenceServerClient(url)
    try:
        assert g.is_model_ready("m_a")
        with pytest.raises(InferenceServerException) as info:  # poll mode refuses load/unload too
            g.unload_model("m_a")
        assert info.value.status() == "StatusCode.UNAVAILABLE"

        # a new model directory, moved in whole (as one should, so that no rescan sees it half written)
        staging = os.path.join(tmp_path, "staging")
        os.makedirs(staging)
        add_model(staging, "m_new", example_repo, max_batch_size=16)
        os.rename(os.path.join(staging, "m_new"), os.path.join(repo, "m_new"))
        wait_for("m_new READY", lambda: g.is_model_ready("m_new"))
        assert g.get_model_config("m_new").config.max_batch_size == 16
        workers_before = set(Client(srv.socket_path).server_status()["m_new"]["workers"])

        # its config changes: reloaded, while requests keep being answered by one version or the other
        failures: list[str] = []
        served = [0]
        stop = threading.Event()

        def keep_inferring() -> None:
            c = grpcclient.InferenceServerClient(url)
            try:
                while not stop.is_set():
                    a, b = rand(2, served[0]), rand(2, served[0] + 1)
                    try:
                        out = c.infer("m_new", grpc_inputs(a, b)).as_numpy("OUTPUT0")
                        np.testing.assert_array_equal(out, a + b)
                        served[0] += 1
                    except (InferenceServerException, AssertionError) as e:
                        failures.append(str(e))
            finally:
                c.close()

        t = threading.Thread(target=keep_inferring)
        t.start()
        try:
            path = os.path.join(repo, "m_new", "config.pbtxt")
            with open(path) as f:
                text = f.read().replace("max_batch_size: 16", "max_batch_size: 8")
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            wait_for("m_new reloaded with max_batch_size 8",
                     lambda: g.get_model_config("m_new").config.max_batch_size == 8)
            wait_for("some requests served after the reload", lambda: served[0] > 0)
        finally:
            stop.set()
            t.join(30)
        assert not failures, failures[:3]
        assert g.is_model_ready("m_new")
        workers_after = set(Client(srv.socket_path).server_status()["m_new"]["workers"])
        assert workers_after and not workers_after & workers_before  # new worker processes

        # removed: unloaded and gone from the index
        shutil.rmtree(os.path.join(repo, "m_new"))
        wait_for("m_new gone", lambda: "m_new" not in {m.name for m in g.get_model_repository_index().models})
        assert not g.is_model_ready("m_new")
        assert g.is_model_ready("m_a")  # the others are not disturbed
        assert g.is_server_ready()
    finally:
        g.close()


# ---- model_warmup --------------------------------------------------------------------------------------

WARMUP = """
model_warmup [
  {
    name: "zeros"
    batch_size: 2
    count: 3
    inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
    inputs { key: "INPUT1" value { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } }
  },
  {
    name: "from_file"
    batch_size: 4
    inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "in0" } }
    inputs { key: "INPUT1" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
  }
]
"""

BAD_WARMUP = """
model_warmup [
  {
    name: "typo"
    batch_size: 1
    inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
    inputs { key: "INPUT_1" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } }
  }
]
"""

MISSING_FILE_WARMUP = BAD_WARMUP.replace('"INPUT_1"', '"INPUT1"').replace(
    'INPUT0" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true', 'INPUT0" value { data_type: TYPE_FP32 '
    'dims: [ 16 ] input_data_file: "absent"')


def test_model_warmup_runs_before_ready_and_counts_in_statistics(repo: str, example_repo: str,
                                                                  tmp_path: str) -> None:
    dst = add_model(repo, "warm", example_repo, WARMUP)
    os.makedirs(os.path.join(dst, "warmup"))
    np.arange(16, dtype=np.float32).tofile(os.path.join(dst, "warmup", "in0"))
    add_model(repo, "bad_warm", example_repo, BAD_WARMUP)
    add_model(repo, "no_file_warm", example_repo, MISSING_FILE_WARMUP)
    srv, url = start(repo, tmp_path)
    g = grpcclient.InferenceServerClient(url)
    try:
        assert g.is_model_ready("warm")
        stats = g.get_inference_statistics("warm").model_stats[0]
        # "zeros": 3 requests of 2 rows, "from_file": 1 request of 4 rows; nothing else has run
        assert stats.inference_stats.success.count == 4
        assert stats.inference_count == 3 * 2 + 4
        assert stats.execution_count == 4
        a, b = rand(1, 5), rand(1, 6)
        np.testing.assert_array_equal(g.infer("warm", grpc_inputs(a, b)).as_numpy("OUTPUT0"), a + b)

        reasons = {m.name: (m.state, m.reason) for m in g.get_model_repository_index().models}
        state, reason = reasons["bad_warm"]
        assert state == "UNAVAILABLE"
        assert "bad_warm" in reason and "warmup sample 'typo'" in reason and "INPUT_1" in reason, reason
        state, reason = reasons["no_file_warm"]
        assert state == "UNAVAILABLE"
        assert "warmup/absent" in reason and repo not in reason, reason
        with pytest.raises(InferenceServerException) as info:  # a load request fails the same way
            g.load_model("bad_warm")
        assert "warmup sample 'typo'" in info.value.message()
        assert info.value.status() != str(grpc.StatusCode.INTERNAL)
    finally:
        g.close()
        _stop(srv)
