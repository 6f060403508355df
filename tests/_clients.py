"""Client programs that tests run in separate (spawned) processes."""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection

import numpy as np

from kernelport import Client


def add_sub_worker(socket_path: str, model: str, seed: int, count: int) -> tuple[int, int]:
    """`count` add_sub requests of random batch sizes, each checked against numpy.
    Returns (requests that matched, requests that did not)."""
    rng = np.random.default_rng(seed)
    good = bad = 0
    with Client(socket_path) as c:
        for _ in range(count):
            n = int(rng.integers(1, 4))
            a = rng.standard_normal((n, 16), dtype=np.float32)
            b = rng.standard_normal((n, 16), dtype=np.float32)
            out = c.infer(model, {"INPUT0": a, "INPUT1": b}, timeout=30)
            if np.array_equal(out["OUTPUT0"], a + b) and np.array_equal(out["OUTPUT1"], a - b):
                good += 1
            else:
                bad += 1
    return good, bad


def claim_then_hang(socket_path: str, model: str, conn: Connection, commit: bool) -> None:
    """Claim a row (and, if asked, commit it and wait), tell the parent, then wait to be killed."""
    c = Client(socket_path)
    req = c.request(model, batch=1)
    req.inputs["INPUT0"][:] = 1.0
    req.inputs["INPUT1"][:] = 2.0
    conn.send("claimed")
    if commit:
        req.run(timeout=600)  # killed while waiting
    else:
        signal.pause()  # killed between claim and commit
    os._exit(0)
