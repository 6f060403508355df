"""Overload: a full queue answers at once, a request that waits past its queue timeout is never run,
and both reach gRPC clients with Triton's status codes."""

from __future__ import annotations

import os
import shutil
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, add_sub_variant
from kernelport import Client, InferTimeoutError, QueueFullError

pytestmark = pytest.mark.timeout(120)

POLICIES = {
    # a 30 s window holds requests queued; at most 3 may wait
    "add_sub_bounded": "dynamic_batching {\n  max_queue_delay_microseconds: 30000000\n"
                       "  default_queue_policy { max_queue_size: 3 }\n}\n",
    # a 300 ms window, but requests may wait only 20 ms unless they say otherwise
    "add_sub_deadline": "dynamic_batching {\n  max_queue_delay_microseconds: 300000\n"
                        "  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 20000 "
                        "allow_timeout_override: true }\n}\n",
}


@pytest.fixture(scope="module")
def overload_server(example_repo: str, tmp_path_factory: pytest.TempPathFactory):
    repo = str(tmp_path_factory.mktemp("overload_repo"))
    shutil.copytree(os.path.join(example_repo, "add_sub"), os.path.join(repo, "add_sub"))
    for name, policy in POLICIES.items():
        add_sub_variant(repo, name, policy)
    srv = ServerProcess.with_ports(repo, str(tmp_path_factory.mktemp("ov") / "kp.sock"), grpc=True, http=True)
    srv.grpc_url = f"127.0.0.1:{srv.grpc_port}"  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.log()


def _grpc_inputs(a: np.ndarray) -> tuple[grpcclient.InferInput, grpcclient.InferInput]:
    """add_sub's two inputs, both `a`, for tritonclient."""
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = grpcclient.InferInput(name, list(a.shape), "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    return inputs[0], inputs[1]


def _metric(srv: ServerProcess, name: str, **labels: str) -> float:
    """The sum of the /metrics samples of `name` that carry these labels (0 when none)."""
    total = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
    return total


def _fill(req, value: float) -> None:
    req.inputs["INPUT0"][:] = value
    req.inputs["INPUT1"][:] = 1


def test_full_queue_is_refused_at_once(overload_server: ServerProcess) -> None:
    model = "add_sub_bounded"
    a = np.ones((1, 16), np.float32)
    with Client(overload_server.socket_path) as c:
        held = [c.request(model, batch=1) for _ in range(3)]  # three requests queued: the queue is full
        with pytest.raises(QueueFullError, match="queue is full"):
            c.request(model, batch=1, timeout=30)
        with pytest.raises(QueueFullError):
            c.infer(model, {"INPUT0": a, "INPUT1": a}, timeout=30)
        # over gRPC: RESOURCE_EXHAUSTED
        g = grpcclient.InferenceServerClient(overload_server.grpc_url)
        i0, i1 = _grpc_inputs(a)
        with pytest.raises(InferenceServerException) as e:
            g.infer(model, [i0, i1])
        assert "RESOURCE_EXHAUSTED" in str(e.value.status())
        assert "queue is full" in e.value.message()
        if os.environ.get("KERNELPORT_GRPC_ENGINE", "native") == "native":
            # the native engine refuses it on its loop thread, once its admission table has the model
            # (refreshed every 0.2 s): the same status and message, counted in its own metric
            refused_in_loop = 0.0
            for _ in range(100):
                with pytest.raises(InferenceServerException) as e:
                    g.infer(model, [i0, i1])
                assert "RESOURCE_EXHAUSTED" in str(e.value.status()), e.value
                assert e.value.message() == f"model '{model}': the queue is full (max_queue_size)"
                refused_in_loop = _metric(overload_server, "kp_grpc_native_admission_rejections_total")
                if refused_in_loop:
                    break
                threading.Event().wait(0.05)
            assert refused_in_loop >= 1
            # with parameters (which may choose another queue) the data plane decides: refused there
            with pytest.raises(InferenceServerException) as e:
                g.infer(model, [i0, i1], timeout=1_000_000)
            assert "RESOURCE_EXHAUSTED" in str(e.value.status())
            assert _metric(overload_server, "kp_grpc_native_admission_rejections_total") == refused_in_loop
            # counted as the model's rejections, as the data plane's own refusals are
            assert _metric(overload_server, "nv_inference_request_failure", model=model, reason="REJECTED") >= 2
        # the queued ones give their places back; the queue takes requests again
        for r in held:
            r.release()
        held = [c.request(model, batch=1) for _ in range(3)]
        for i, r in enumerate(held):
            _fill(r, i)
        # run them: three of the 16 rows, so the batch closes only on its window; release the third
        # place early (cancel) and the fourth request makes it to the same batch
        held[2].release()
        extra = c.request(model, batch=1)
        _fill(extra, 7)
        for r in held[:2]:
            r.release()
        extra.release()
        assert c.server_status()[model]["state"] == "READY"


def test_request_past_its_queue_timeout_is_not_run(overload_server: ServerProcess) -> None:
    model = "add_sub_deadline"
    a = np.ones((1, 16), np.float32)
    with Client(overload_server.socket_path) as c:
        before = c.counters(model)
        # the 300 ms window outlasts the 20 ms queue timeout: the request expires unrun
        with pytest.raises(InferTimeoutError, match="timed out in the queue"):
            c.infer(model, {"INPUT0": a, "INPUT1": a}, timeout=30)
        after = c.counters(model)
        assert after["expired_requests"] - before["expired_requests"] == 1
        # the policy allows a request to set its own: 10 s is enough to be batched and run
        out = c.infer(model, {"INPUT0": a, "INPUT1": a}, timeout=30, queue_timeout=10.0)
        np.testing.assert_array_equal(out["OUTPUT0"], a + a)
        # over gRPC: the request's "timeout" parameter (microseconds) overrides the default the same way
        g = grpcclient.InferenceServerClient(overload_server.grpc_url)
        i0, i1 = _grpc_inputs(a)
        with pytest.raises(InferenceServerException) as e:
            g.infer(model, [i0, i1])
        assert "DEADLINE_EXCEEDED" in str(e.value.status())
        np.testing.assert_array_equal(g.infer(model, [i0, i1], timeout=10_000_000).as_numpy("OUTPUT0"), a + a)
        stats = g.get_inference_statistics(model).model_stats[0].inference_stats
        assert stats.fail.count == 2  # the two expired requests count as failures
        assert stats.success.count == 2
    # the model without a queue policy is untouched
    with Client(overload_server.socket_path) as c:
        np.testing.assert_array_equal(c.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a + a)
