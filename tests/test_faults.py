"""Faults: a worker that dies is turned into errors for exactly its requests, restarted, and given up on
when it keeps crashing; other models never notice."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import ServerProcess
from kernelport import Client, ModelNotReadyError

pytestmark = pytest.mark.timeout(120)


def _until(predicate, timeout: float = 60.0) -> bool:
    """Poll an observable server state (not a synchronisation by sleeping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(0.05)
    return False


def test_worker_death_fails_its_requests_restarts_and_gives_up(served_repo: str, tmp_path) -> None:
    sock = str(tmp_path / "faults.sock")
    srv = ServerProcess(served_repo, sock, "--max-restarts", "2", "--restart-backoff-ms", "50")
    try:
        with Client(sock) as c:
            a = np.ones((1, 16), np.float32)
            np.testing.assert_array_equal(c.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)
            # a request waiting in a 30 s window when its worker dies fails at once, clearly
            model = "add_sub_preferred"
            pid = c.server_status()[model]["workers"][0]
            errors: list[BaseException] = []
            started = threading.Event()

            def waiting_request() -> None:
                with Client(sock) as c2:
                    req = c2.request(model, batch=1)
                    req.inputs["INPUT0"][:] = 1
                    req.inputs["INPUT1"][:] = 1
                    started.set()
                    try:
                        req.run(timeout=60)
                    except BaseException as e:  # the assertion is on what was raised
                        errors.append(e)

            t = threading.Thread(target=waiting_request)
            t.start()
            assert started.wait(30)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            t.join(30)
            failed_after = time.monotonic() - t0
            assert len(errors) == 1 and isinstance(errors[0], ModelNotReadyError), errors
            assert "not ready" in str(errors[0])
            assert failed_after < 10  # "at once": not after the 60 s request timeout
            # another model never noticed
            np.testing.assert_array_equal(c.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)
            # restarted with a new worker, ready again, and serving
            assert _until(lambda: c.server_status()[model]["state"] == "READY"), c.server_status()[model]
            assert c.server_status()[model]["workers"][0] != pid
            out = c.infer(model, {"INPUT0": np.ones((4, 16), np.float32), "INPUT1": a.repeat(4, 0)}, timeout=30)
            np.testing.assert_array_equal(out["OUTPUT0"], np.full((4, 16), 2, np.float32))
            # crashing again and again: after --max-restarts the server stops and says why
            for _ in range(2):  # crashes 2 and 3: the second restart is the last (--max-restarts 2)
                assert _until(lambda: c.server_status()[model]["state"] == "READY")
                os.kill(c.server_status()[model]["workers"][0], signal.SIGKILL)
                assert _until(lambda: c.server_status()[model]["state"] != "READY")
            assert _until(lambda: "not restarting" in c.server_status()[model]["reason"]), c.server_status()[model]
            assert not c.model_ready(model)
            with pytest.raises(ModelNotReadyError, match=r"crashed 3 times .*last exit code -9\)"):  # SIGKILL
                c.infer(model, {"INPUT0": a, "INPUT1": a})
            assert c.model_ready("add_sub")
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_lets_requests_in_flight_finish(served_repo: str, tmp_path) -> None:
    """SIGTERM: new work is refused, a request already waiting for its batch (a 50 ms window) is
    answered, the server exits 0 and leaves no socket behind."""
    sock = str(tmp_path / "drain.sock")
    srv = ServerProcess(served_repo, sock, "--exit-timeout-secs", "20")
    c = Client(sock)
    req = c.request("add_sub_window", batch=2)
    req.inputs["INPUT0"][:] = 3
    req.inputs["INPUT1"][:] = 1
    srv.proc.send_signal(signal.SIGTERM)
    out = req.run(timeout=20)  # committed after the signal: still served
    np.testing.assert_array_equal(out["OUTPUT0"], np.full((2, 16), 4, np.float32))
    req.release()
    assert srv.proc.wait(30) == 0, srv.log()
    assert not os.path.exists(sock)
    with pytest.raises(Exception, match="shutting down|server is gone|not ready"):
        c.infer("add_sub", {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)})
    c.close()
