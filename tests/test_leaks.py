"""Client churn and client deaths leave nothing behind: 10,000 connect / infer / disconnect cycles and 100
clients killed at random points cost no growth in server file descriptors, server memory or /dev/shm."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ServerProcess
from kernelport import Client

pytestmark = pytest.mark.timeout(600)

# A client that claims a row in the 50 ms-window model, then stops at a point chosen by argv[2], and is
# killed there: 0 before commit, 1 while waiting for its batch, 2 while holding its output views.
VICTIM = r"""
import sys
import numpy as np
from kernelport import Client
c = Client(sys.argv[1])
req = c.request("add_sub_window", batch=1)
req.inputs["INPUT0"][:] = 1
req.inputs["INPUT1"][:] = 2
where = int(sys.argv[2])
if where == 2:
    req.run(timeout=30)
print("ready", flush=True)
if where == 1:
    req.run(timeout=600)
sys.stdin.read()
"""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_churn_and_killed_clients_leak_nothing(served_repo: str, tmp_path) -> None:
    sock = str(tmp_path / "leaks.sock")
    srv = ServerProcess(served_repo, sock)
    try:
        a = np.arange(16, dtype=np.float32)[None]
        # warm up: the lanes exist and the server's allocations settle before the baseline
        for _ in range(200):
            with Client(sock) as c:
                c.infer("add_sub", {"INPUT0": a, "INPUT1": a})
        shm_before = set(os.listdir("/dev/shm"))
        fds_before, rss_before = _fds(srv.pid), _rss_kib(srv.pid)

        for i in range(10_000):
            with Client(sock) as c:
                b = np.full((1, 16), i, np.float32)
                out = c.infer("add_sub", {"INPUT0": a, "INPUT1": b})
                assert out["OUTPUT0"][0, 3] == 3 + i

        rng = random.Random(0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for _group in range(10):  # 100 victims, 10 at a time
            procs = []
            for _ in range(10):
                p = subprocess.Popen([sys.executable, "-c", VICTIM, sock, str(rng.randrange(3))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                procs.append(p)
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            for p in procs:
                p.kill()
                p.wait(30)

        # the server still serves every slot of the lanes the victims used
        with Client(sock) as c:
            for _ in range(40):
                out = c.infer("add_sub_window", {"INPUT0": a, "INPUT1": a}, timeout=30)
                np.testing.assert_array_equal(out["OUTPUT0"], a + a)
        with open(f"/proc/{srv.pid}/maps") as f:
            assert "/dev/shm/" not in f.read()
        new_shm = set(os.listdir("/dev/shm")) - shm_before
        assert not [n for n in new_shm if n.startswith(("kp", "kernelport"))], new_shm
        fds_after, rss_after = _fds(srv.pid), _rss_kib(srv.pid)
        assert fds_after <= fds_before + 4, (fds_before, fds_after)
        # 10,100 clients came and went: allow allocator noise, not per-client growth (1 KiB each would be 10 MiB)
        assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    finally:
        assert srv.stop() == 0, srv.log()
