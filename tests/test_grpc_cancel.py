"""gRPC cancellation and deadlines: a ModelInfer whose client cancels it, or whose deadline passes, while it
waits queued for its batch gives its place back at once and is never run; the requests around it are."""

from __future__ import annotations

import os
import queue
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, add_sub_variant
from kernelport import Client

pytestmark = pytest.mark.timeout(120)

MODEL = "add_sub_held"
# A batch closes only at 4 rows (the 30 s window never passes in a test): requests wait queued until then.
# max_queue_size makes the server count the requests waiting (the counter the test watches).
HELD = ("dynamic_batching {\n  preferred_batch_size: [ 4 ]\n  max_queue_delay_microseconds: 30000000\n"
        "  default_queue_policy { max_queue_size: 64 }\n}\n")


CHURN = "add_sub_churn"
# a 2 ms window: batches form and run all the time while requests are cancelled around them
CHURN_BATCHING = ("dynamic_batching {\n  max_queue_delay_microseconds: 2000\n"
                  "  default_queue_policy { max_queue_size: 1000 }\n}\n")


@pytest.fixture(scope="module")
def cancel_server(example_repo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = str(tmp_path_factory.mktemp("cancel_repo"))
    shutil.copytree(os.path.join(example_repo, "add_sub"), os.path.join(repo, "add_sub"))
    add_sub_variant(repo, MODEL, HELD)
    add_sub_variant(repo, CHURN, CHURN_BATCHING)
    srv = ServerProcess.with_ports(repo, str(tmp_path_factory.mktemp("cancel") / "kp.sock"), grpc=True, http=True)
    yield srv
    assert srv.stop() == 0, srv.log()


def _inputs(value: float) -> list[grpcclient.InferInput]:
    a = np.full((1, 16), value, np.float32)
    b = np.arange(16, dtype=np.float32).reshape(1, 16)
    out = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        t = grpcclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _expected(value: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.full((1, 16), value, np.float32)
    b = np.arange(16, dtype=np.float32).reshape(1, 16)
    return a + b, a - b


def _wait_until(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a server-side condition (a counter); fail with `what` if it does not hold in time."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # a poll interval, not a synchronisation: the condition is checked again


def _metric(srv: ServerProcess, family: str, **labels: str) -> float:
    """One sample of the server's Prometheus text (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(family + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _stats(g: grpcclient.InferenceServerClient) -> Any:
    return g.get_inference_statistics(MODEL).model_stats[0]


class _Results:
    """tritonclient async_infer callbacks, collected by request value."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[float, Any, Any]] = queue.Queue()

    def callback(self, value: float) -> Callable[[Any, Any], None]:
        return lambda result, error: self.q.put((value, result, error))

    def take(self, n: int) -> dict[float, tuple[Any, Any]]:
        got: dict[float, tuple[Any, Any]] = {}
        for _ in range(n):
            value, result, error = self.q.get(timeout=60)
            got[value] = (result, error)
        return got


def _check_ran(got: dict[float, tuple[Any, Any]], values: list[float]) -> None:
    for v in values:
        result, error = got[v]
        assert error is None, f"request {v}: {error}"
        out0, out1 = _expected(v)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), out0)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), out1)


def test_cancelled_queued_requests_are_never_run(cancel_server: ServerProcess) -> None:
    url = f"127.0.0.1:{cancel_server.grpc_port}"
    g = grpcclient.InferenceServerClient(url)
    results = _Results()
    with Client(cancel_server.socket_path) as c:
        ctr0, st0 = c.counters(MODEL), _stats(g)
        # two requests queued (claimed, written and committed; the batch waits for 4 rows) ...
        doomed = [g.async_infer(MODEL, _inputs(v), callback=results.callback(v)) for v in (1.0, 2.0)]
        _wait_until("two queued requests", lambda: c.counters(MODEL)["queued"] == 2)
        # ... are cancelled by their client: the server gives their places back at once
        for call in doomed:
            call.cancel()
        _wait_until("the cancelled requests to leave the queue", lambda: c.counters(MODEL)["queued"] == 0)
        cancelled = results.take(2)
        for v in (1.0, 2.0):
            assert cancelled[v][0] is None and "CANCELLED" in str(cancelled[v][1].status()), cancelled[v]
        # two more fill the slot to 4 rows: the batch runs, with the two live requests only
        for v in (3.0, 4.0):
            g.async_infer(MODEL, _inputs(v), callback=results.callback(v))
        _check_ran(results.take(2), [3.0, 4.0])
        ctr1, st1 = c.counters(MODEL), _stats(g)
    assert ctr1["cancelled_requests"] - ctr0["cancelled_requests"] == 2
    assert ctr1["expired_requests"] == ctr0["expired_requests"]
    # the statistics count what ran: 2 requests (2 samples) in 1 execution; the cancelled ones failed
    assert st1.inference_stats.success.count - st0.inference_stats.success.count == 2
    assert st1.inference_count - st0.inference_count == 2
    assert st1.execution_count - st0.execution_count == 1
    assert st1.inference_stats.fail.count - st0.inference_stats.fail.count == 2
    # and so do the metrics (Triton's failure reason CANCELED)
    assert _metric(cancel_server, "kp_cancelled_requests_total", model=MODEL) == 2
    assert _metric(cancel_server, "nv_inference_request_failure", model=MODEL, reason="CANCELED") == 2
    assert _metric(cancel_server, "nv_inference_request_failure", model=MODEL, reason="BACKEND") == 0
    # the server still answers, on this model and another
    r = g.infer("add_sub", _inputs(6.0))
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), _expected(6.0)[0])
    assert g.is_server_live() and g.is_model_ready(MODEL)


def test_request_past_its_grpc_deadline_leaves_the_queue(cancel_server: ServerProcess) -> None:
    url = f"127.0.0.1:{cancel_server.grpc_port}"
    g = grpcclient.InferenceServerClient(url)
    results = _Results()
    with Client(cancel_server.socket_path) as c:
        ctr0, st0 = c.counters(MODEL), _stats(g)
        # a deadline of 0.5 s: the request waits queued past it (the batch needs 4 rows)
        with pytest.raises(InferenceServerException) as e:
            g.infer(MODEL, _inputs(7.0), client_timeout=0.5)
        assert "DEADLINE" in str(e.value.status()) or "Deadline" in str(e.value)
        # the server gave its place back when the deadline passed, not when the batch was taken
        _wait_until("the timed-out request to leave the queue", lambda: c.counters(MODEL)["queued"] == 0)
        for v in (8.0, 9.0, 10.0):
            g.async_infer(MODEL, _inputs(v), callback=results.callback(v))
        _check_ran(results.take(3), [8.0, 9.0, 10.0])
        ctr1, st1 = c.counters(MODEL), _stats(g)
    assert ctr1["cancelled_requests"] - ctr0["cancelled_requests"] == 1
    assert ctr1["expired_requests"] == ctr0["expired_requests"]
    assert st1.inference_stats.success.count - st0.inference_stats.success.count == 3
    assert st1.execution_count - st0.execution_count == 1
    assert g.is_server_live()


def test_cancelled_stream_releases_its_queued_requests(cancel_server: ServerProcess) -> None:
    url = f"127.0.0.1:{cancel_server.grpc_port}"
    g = grpcclient.InferenceServerClient(url)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with Client(cancel_server.socket_path) as c:
        ctr0, st0 = c.counters(MODEL), _stats(g)
        g.start_stream(callback=lambda result, error: responses.put((result, error)))
        for v in (11.0, 12.0, 13.0):
            g.async_stream_infer(MODEL, _inputs(v), request_id=str(v))
        _wait_until("three queued stream requests", lambda: c.counters(MODEL)["queued"] == 3)
        g.stop_stream(cancel_requests=True)
        _wait_until("the stream's requests to leave the queue", lambda: c.counters(MODEL)["queued"] == 0)
        # one more request fills the slot (3 cancelled rows + 1): it runs alone
        r = _Results()
        g.async_infer(MODEL, _inputs(14.0), callback=r.callback(14.0))
        _check_ran(r.take(1), [14.0])
        ctr1, st1 = c.counters(MODEL), _stats(g)
    assert ctr1["cancelled_requests"] - ctr0["cancelled_requests"] == 3
    assert st1.inference_stats.success.count - st0.inference_stats.success.count == 1
    assert st1.inference_count - st0.inference_count == 1
    assert responses.empty() or all(res is None for res, _ in list(responses.queue))


def test_cancellations_racing_batches_leave_no_trace(cancel_server: ServerProcess) -> None:
    """Requests cancelled at every stage (queued, taken, running, done) while batches run: every answer
    that arrives is right, the queue drains to zero, and the lane keeps serving."""
    url = f"127.0.0.1:{cancel_server.grpc_port}"
    g = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(7)
    results = _Results()
    total = 300
    calls = []
    for i in range(total):
        v = float(i)
        calls.append(g.async_infer(CHURN, _inputs(v), callback=results.callback(v)))
        if rng.random() < 0.5:  # cancel an earlier request, at whatever stage it has reached
            calls[int(rng.integers(0, len(calls)))].cancel()
    got = results.take(total)
    answered = [v for v, (res, err) in got.items() if err is None]
    for v, (res, err) in got.items():
        if err is None:
            out0, out1 = _expected(v)
            np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), out0)
            np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), out1)
        else:
            assert "CANCELLED" in str(err.status()), err
    assert answered, "no request got through"
    with Client(cancel_server.socket_path) as c:
        _wait_until("the queue to drain", lambda: c.counters(CHURN)["queued"] == 0)
        # the lane still serves, batch after batch
        for v in (1000.0, 1001.0, 1002.0):
            r = g.infer(CHURN, _inputs(v))
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), _expected(v)[0])
        ctr = c.counters(CHURN)
    stats = _stats_of(g, CHURN)
    # every request the server ran for a caller who got its answer is a success; cancelled ones are
    # failures, successes nobody received (cancelled after their batch was taken), or nothing at all
    # (cancelled before the server queued them)
    success, fail = stats.inference_stats.success.count, stats.inference_stats.fail.count
    assert success >= len(answered) + 3
    assert success + fail <= total + 3
    assert ctr["cancelled_requests"] == fail  # no request expired or failed otherwise


def _stats_of(g: grpcclient.InferenceServerClient, model: str) -> Any:
    return g.get_inference_statistics(model).model_stats[0]
