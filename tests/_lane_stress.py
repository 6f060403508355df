"""Multi-process stress of the lane protocol: one worker process and several client processes on two
lanes, every output checked. Run by tests/test_lane_protocol.py::test_multiprocess_stress; the
functions here run in spawned processes, so they only take picklable arguments and receive the
shared segments' descriptors over their pipe (SCM_RIGHTS), as a real client does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

import _kpcore as k

# Two inputs and two outputs per row: in0 int64[2], in1 int64[1] -> out0 = in0*2+1, out1 = in1*2+1.
ROW_BYTES = [16, 8, 16, 8]
WIDTHS = [2, 1, 2, 1]
STARTUP_TIMEOUT = 60.0  # seconds for a spawned process to import numpy and map the lanes


@dataclass(frozen=True)
class LaneSpec:
    nslots: int
    max_batch: int

    @property
    def size(self) -> int:
        return int(k.Lane.required_size(self.nslots, self.max_batch, ROW_BYTES))


def _views(lane: Any, seg: Any, spec: LaneSpec) -> list[list[np.ndarray]]:
    """[slot][tensor] -> int64 array of shape (max_batch, width), a view of the segment."""
    out = []
    for slot in range(spec.nslots):
        per = []
        for off, w in zip(lane.slot_offsets(slot), WIDTHS):
            arr = np.frombuffer(seg, dtype=np.int64, count=spec.max_batch * w, offset=off)
            per.append(arr.reshape(spec.max_batch, w))
        out.append(per)
    return out


def _attach(conn: Connection, specs: list[LaneSpec]) -> tuple[Any, list[Any], list[list[list[np.ndarray]]]]:
    """Receive the doorbell's and every lane's descriptor and map them (not initialising)."""
    bell = k.Doorbell(k.Segment.from_fd(reduction.recv_handle(conn), k.DOORBELL_BYTES))
    lanes, views = [], []
    for spec in specs:
        seg = k.Segment.from_fd(reduction.recv_handle(conn), spec.size)
        lane = k.Lane(seg, bell, spec.nslots, spec.max_batch, ROW_BYTES)
        lanes.append(lane)
        views.append(_views(lane, seg, spec))
    return bell, lanes, views


def worker_main(conn: Connection, specs: list[LaneSpec], window: float, commit_timeout: float) -> None:
    """Loop on next_batch until the parent rings for control; outputs = inputs*2+1 on every row."""
    bell, lanes, views = _attach(conn, specs)
    conn.send("ready")
    batches = rows = 0
    sizes: dict[int, int] = {}
    bad_batches = 0
    while True:
        r = k.next_batch(lanes, bell, window, max(s.max_batch for s in specs), commit_timeout, 0.5)
        if r == k.CONTROL:
            break
        if r == k.NONE:
            continue
        li, seq, n, _live = r
        if not 1 <= n <= specs[li].max_batch:
            bad_batches += 1
        in0, in1, out0, out1 = views[li][seq % specs[li].nslots]
        np.multiply(in0[:n], 2, out=out0[:n])
        out0[:n] += 1
        np.multiply(in1[:n], 2, out=out1[:n])
        out1[:n] += 1
        lanes[li].complete(seq, 0)
        batches += 1
        rows += n
        sizes[n] = sizes.get(n, 0) + 1
    conn.send({"batches": batches, "rows": rows, "sizes": sizes, "bad_batches": bad_batches})


def client_main(conn: Connection, specs: list[LaneSpec], owner: int, cycles: int, seed: int,
                start: Any) -> None:
    """`cycles` claim / write / commit / wait / check / release cycles of 1..4 rows on a random lane."""
    _, lanes, views = _attach(conn, specs)
    conn.send("ready")
    start.wait(STARTUP_TIMEOUT)
    rng = random.Random(seed)
    per_lane = [[0, 0] for _ in specs]  # [requests, rows]
    wrong: list[str] = []
    errors: list[str] = []
    for cycle in range(cycles):
        li = rng.randrange(len(specs))
        n = rng.randint(1, 4)
        lane = lanes[li]
        try:
            seq, row = lane.claim(n, owner, 30.0)
            in0, in1, out0, out1 = views[li][seq % specs[li].nslots]
            # distinct values for every row of every request of every client
            base = (owner << 40) | (cycle << 4)
            vals = np.arange(base, base + n, dtype=np.int64)
            in0[row:row + n, 0] = vals
            in0[row:row + n, 1] = -vals
            in1[row:row + n, 0] = vals ^ 0x5A5A
            lane.commit(seq, row, n, owner)
            status = lane.wait(seq, 30.0)
            # expected values from what we meant to write, not from what the rows hold now
            ok = (status == 0
                  and np.array_equal(out0[row:row + n, 0], vals * 2 + 1)
                  and np.array_equal(out0[row:row + n, 1], -vals * 2 + 1)
                  and np.array_equal(out1[row:row + n, 0], (vals ^ 0x5A5A) * 2 + 1))
            if not ok and len(wrong) < 5:
                wrong.append(f"owner {owner} cycle {cycle} lane {li} seq {seq} row {row} n {n} status {status}: "
                             f"out0 {out0[row:row + n].tolist()} out1 {out1[row:row + n].tolist()}")
            lane.release(seq, row, n, owner)
        except k.LaneError as e:
            errors.append(f"owner {owner} cycle {cycle}: {type(e).__name__}: {e}")
            break
        per_lane[li][0] += 1
        per_lane[li][1] += n
    conn.send({"per_lane": per_lane, "wrong": wrong, "errors": errors})


def run(nclients: int = 6, cycles: int = 2000, specs: list[LaneSpec] | None = None, window: float = 50e-6,
        commit_timeout: float = 5.0, seed: int = 1) -> dict[str, Any]:
    """Run the stress; returns every process's report and each lane's counters (read by this process,
    which created the lanes)."""
    specs = specs or [LaneSpec(4, 16), LaneSpec(4, 16)]
    ctx = mp.get_context("spawn")
    bell = k.Doorbell(k.Segment.create(k.DOORBELL_BYTES), init=True)
    lanes = []
    for spec in specs:
        lanes.append(k.Lane(k.Segment.create(spec.size), bell, spec.nslots, spec.max_batch, ROW_BYTES, init=True))
    start = ctx.Event()
    procs: list[tuple[Any, Connection]] = []
    t0 = time.monotonic()
    try:
        mine, theirs = ctx.Pipe()
        w = ctx.Process(target=worker_main, args=(theirs, specs, window, commit_timeout), daemon=True)
        w.start()
        procs.append((w, mine))
        for i in range(nclients):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(theirs, specs, 100 + i, cycles, seed * 1000 + i, start),
                            daemon=True)
            p.start()
            procs.append((p, mine))
        for p, conn in procs:
            fds = [bell.segment.dup_fd()] + [lane.segment.dup_fd() for lane in lanes]
            for fd in fds:
                reduction.send_handle(conn, fd, p.pid)
                os.close(fd)
        for p, conn in procs:
            if not conn.poll(STARTUP_TIMEOUT):
                raise RuntimeError(f"process {p.pid} did not start")
            assert conn.recv() == "ready"
        t_start = time.monotonic()
        start.set()
        clients = []
        for _, conn in procs[1:]:
            clients.append(conn.recv())  # the test's pytest-timeout bounds this
        t_clients = time.monotonic() - t_start
        bell.ring_control()
        worker = procs[0][1].recv()
        for p, _ in procs:
            p.join(10)
        return {
            "clients": clients, "worker": worker, "counters": [lane.counters() for lane in lanes],
            "idle": [lane.idle() for lane in lanes] if hasattr(lanes[0], "idle") else None,
            "exitcodes": [p.exitcode for p, _ in procs], "seconds_clients": t_clients,
            "seconds_total": time.monotonic() - t0,
        }
    finally:
        for p, conn in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
            conn.close()
