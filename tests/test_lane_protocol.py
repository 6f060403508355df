"""The C lane protocol (src/_kpcore/include/kp_lane.h) against a pure-Python reference model
(tests/lane_model.py): a hypothesis state machine that drives both with the same random
interleavings, unit tests of the edge cases, deterministic reproductions of interleavings a single
thread cannot reach (a thread stopped mid-call by a page trap), and a multi-process stress.

A small C probe, compiled here against the same header, reads the slot headers through the header's
own accessors, so the state machine compares the whole protocol state (slot words, committed,
released, row words) with the model after every step, not only what the Python API returns. The
probe also holds the page trap. Without a C compiler those parts are skipped.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import mmap
import os
import select
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import _kpcore as k
import lane_model as lm
from _lane_stress import ROW_BYTES, LaneSpec
from _lane_stress import _views as lane_views
from _lane_stress import run as run_stress

# ---- helpers ----------------------------------------------------------------------------------------


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("err", exception class name): the C lane and the model raise the same names."""
    try:
        return "ok", fn(*args)
    except (k.LaneError, lm.LaneError, ValueError) as e:
        return "err", type(e).__name__


def f_outputs(in0: np.ndarray, in1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 'model' every worker in these tests runs: outputs = inputs*2+1."""
    return in0 * 2 + 1, in1 * 2 + 1


def run_batch(views: list[np.ndarray], n: int) -> None:
    in0, in1, out0, out1 = views
    out0[:n], out1[:n] = f_outputs(in0[:n], in1[:n])


def make_lane(nslots: int, max_batch: int, bell: Any = None) -> tuple[Any, Any, Any]:
    bell = bell or k.Doorbell(k.Segment.create(k.DOORBELL_BYTES), init=True)
    seg = k.Segment.create(k.Lane.required_size(nslots, max_batch, ROW_BYTES))
    lane = k.Lane(seg, bell, nslots, max_batch, ROW_BYTES, init=True)
    lane.set_spin(0, 0.0)
    return seg, bell, lane


def take(lanes: list[Any], bell: Any, window: float = 0.0, close_at: int = 1 << 16) -> Any:
    """The worker's take, never blocking: uncommitted rows are abandoned at once."""
    return k.next_batch(lanes, bell, window, close_at, 0.0, 0.0, pause_iters=0, idle_spin=0.0)


def take3(lanes: list[Any], bell: Any, window: float = 0.0, close_at: int = 1 << 16) -> Any:
    """take(), without the count of live requests: (lane, seq, nrows), NONE or CONTROL."""
    r = take(lanes, bell, window, close_at)
    return r[:3] if isinstance(r, tuple) else r


# ---- the C probe: header reads through kp_lane.h's accessors, and a page trap ----------------------

PROBE_SOURCE = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "kp_lane.h"

uint64_t kpp_total_size(uint32_t nslots, uint32_t max_batch, uint32_t ntensors, const uint64_t *rb) {
    kp_lane_hdr h;
    if (kp_lane_layout(&h, nslots, max_batch, ntensors, rb) != KP_OK) return 0;
    return h.total_size;
}

void kpp_lane(void *base, uint64_t *out) {
    kp_lane_hdr *h = (kp_lane_hdr *)base;
    out[0] = atomic_load(&h->open_seq);
    out[1] = atomic_load(&h->run_seq);
    out[2] = atomic_load(&h->status);
}

void kpp_slot(void *base, uint32_t slot, int64_t *out) {
    kp_lane_hdr *h = (kp_lane_hdr *)base;
    kp_slot_hdr *s = kp_slot(h, slot);
    out[0] = (int64_t)atomic_load(&s->word);
    out[1] = atomic_load(&s->committed);
    out[2] = atomic_load(&s->released);
    out[3] = atomic_load(&s->state);
    out[4] = s->nrows;
    out[5] = s->batch_status;
}

void kpp_rows(void *base, uint32_t slot, uint64_t *words, uint32_t *lens) {
    kp_lane_hdr *h = (kp_lane_hdr *)base;
    kp_slot_hdr *s = kp_slot(h, slot);
    for (uint32_t r = 0; r < h->max_batch; r++) {
        words[r] = atomic_load(&kp_row_words(h, s)[r]);
        lens[r] = kp_row_lens(h, s)[r];
    }
}

/* byte offset in the segment of: 0 the slot word, 1 the slot state, 2 row word `row`, 3 row_len `row` */
uint64_t kpp_offset(void *base, uint32_t slot, int what, uint32_t row) {
    kp_lane_hdr *h = (kp_lane_hdr *)base;
    kp_slot_hdr *s = kp_slot(h, slot);
    char *p = (char *)&s->word;
    if (what == 1) p = (char *)&s->state;
    if (what == 2) p = (char *)&kp_row_words(h, s)[row];
    if (what == 3) p = (char *)&kp_row_lens(h, s)[row];
    return (uint64_t)(p - (char *)base);
}

/* Page trap: the first touch of [lo, hi) faults; the faulting thread says so on `out_fd`, blocks
 * until a byte arrives on `in_fd`, makes the range accessible again and resumes the instruction. */
static volatile uintptr_t t_lo, t_hi;
static volatile int t_out = -1, t_in = -1, t_armed;
static struct sigaction t_old;

static void t_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (t_armed && a >= t_lo && a < t_hi) {
        char c = 'F';
        ssize_t r = write(t_out, &c, 1);
        r = read(t_in, &c, 1);
        (void)r;
        mprotect((void *)t_lo, t_hi - t_lo, PROT_READ | PROT_WRITE);
        t_armed = 0;
        return;
    }
    sigaction(SIGSEGV, &t_old, NULL); /* not ours: the re-fault goes to the previous handler */
}

int kpp_trap_arm(uintptr_t lo, uintptr_t hi, int out_fd, int in_fd) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = t_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    t_lo = lo; t_hi = hi; t_out = out_fd; t_in = in_fd;
    if (sigaction(SIGSEGV, &sa, &t_old) != 0) return -1;
    t_armed = 1;
    return mprotect((void *)lo, hi - lo, PROT_NONE);
}

int kpp_trap_disarm(void) {
    if (t_armed) mprotect((void *)t_lo, t_hi - t_lo, PROT_READ | PROT_WRITE);
    t_armed = 0;
    return sigaction(SIGSEGV, &t_old, NULL);
}

"""


@functools.cache
def probe() -> Any:
    """The compiled probe (ctypes), or None without a C compiler. Raises if the header does not build."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    include = Path(k.__file__).parent / "include"
    d = tempfile.mkdtemp(prefix="kp_lane_probe_")
    atexit.register(shutil.rmtree, d, True)
    src, so = os.path.join(d, "probe.c"), os.path.join(d, "probe.so")
    with open(src, "w") as f:
        f.write(PROBE_SOURCE)
    subprocess.run([cc, "-O1", "-std=gnu11", "-shared", "-fPIC", "-I", str(include), src, "-o", so],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(so)
    u64p, i64p, u32p = (ctypes.POINTER(t) for t in (ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32))
    lib.kpp_total_size.restype = ctypes.c_uint64
    lib.kpp_total_size.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, u64p]
    lib.kpp_lane.argtypes = [ctypes.c_void_p, u64p]
    lib.kpp_slot.argtypes = [ctypes.c_void_p, ctypes.c_uint32, i64p]
    lib.kpp_rows.argtypes = [ctypes.c_void_p, ctypes.c_uint32, u64p, u32p]
    lib.kpp_offset.restype = ctypes.c_uint64
    lib.kpp_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
    lib.kpp_trap_arm.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    return lib


def probe_matches_extension() -> bool:
    """The probe was built from the header the extension was built from (same layout)."""
    p = probe()
    if p is None:
        return False
    for nslots, max_batch in ((1, 1), (3, 4), (2, 1024)):
        rb = (ctypes.c_uint64 * 4)(*ROW_BYTES)
        if p.kpp_total_size(nslots, max_batch, 4, rb) != k.Lane.required_size(nslots, max_batch, ROW_BYTES):
            return False
    return True


def read_headers(seg: Any, model: lm.LaneModel) -> tuple[Any, list[Any]]:
    """The lane's (open_seq, run_seq, status) and, per slot, (word, committed, released, state, nrows,
    batch_status, row words, row lens) as the C lane holds them."""
    p = probe()
    base = seg.address
    lane = (ctypes.c_uint64 * 3)()
    p.kpp_lane(base, lane)
    slots = []
    for i in range(model.nslots):
        out = (ctypes.c_int64 * 6)()
        words = (ctypes.c_uint64 * model.max_batch)()
        lens = (ctypes.c_uint32 * model.max_batch)()
        p.kpp_slot(base, i, out)
        p.kpp_rows(base, i, words, lens)
        slots.append((out[0] & (2**64 - 1), *out[1:6], list(words), list(lens)))
    return tuple(lane), slots


def model_headers(model: lm.LaneModel) -> tuple[Any, list[Any]]:
    slots = [(s.word, s.committed, s.released, s.state, s.nrows, s.batch_status,
              [(o << 32) | ((s.gen & 0xFFFFFF) << 8) | st for o, st in s.words], list(s.lens)) for s in model.slots]
    return (model.open_seq, model.run_seq, model.status), slots


class PageTrap:
    """Stop the thread that next touches the page holding `addr` (in a mapping no other thread uses),
    run something while it is stopped, then let it go on."""

    def __init__(self, addr: int) -> None:
        self.lo = addr // mmap.PAGESIZE * mmap.PAGESIZE
        self.fault_r, self.fault_w = os.pipe()
        self.go_r, self.go_w = os.pipe()
        self.resumed = False

    def __enter__(self) -> PageTrap:
        if probe().kpp_trap_arm(self.lo, self.lo + mmap.PAGESIZE, self.fault_w, self.go_r) != 0:
            raise OSError("cannot arm the page trap")
        return self

    def stopped(self, thread: threading.Thread, timeout: float) -> bool:
        """True once the thread is stopped on the page; False if it finished without touching it."""
        while thread.is_alive():
            if select.select([self.fault_r], [], [], min(timeout, 0.1))[0]:
                return True
            timeout -= 0.1
            if timeout <= 0:
                raise RuntimeError("the trapped thread neither stopped nor finished")
        return False

    def resume(self) -> None:
        if not self.resumed:
            self.resumed = True
            os.write(self.go_w, b"G")

    def __exit__(self, *exc: Any) -> None:
        self.resume()  # a stopped thread goes on; a byte nobody reads is harmless
        probe().kpp_trap_disarm()
        for fd in (self.fault_r, self.fault_w, self.go_r, self.go_w):
            os.close(fd)


def setup_check(cond: bool, what: str) -> None:
    """A step that sets up an interleaving went differently: not the failure the test is about."""
    if not cond:
        raise RuntimeError(f"interleaving not reproduced: {what}")


class Call(threading.Thread):
    """Run fn(*args) in a thread; the result or the exception's class name lands in .result."""

    def __init__(self, fn: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.result = fn, args, None

    def run(self) -> None:
        self.result = outcome(self.fn, *self.args)


needs_probe = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                 reason="needs a C compiler for the lane probe")


# ---- the state machine -------------------------------------------------------------------------------

LANE_SHAPES = [(3, 4), (2, 3)]  # (nslots, max_batch) of lane 0 and lane 1; both share one doorbell
N_CLIENTS = 3
MAX_TRACKED = 24  # requests the machine remembers (older ones stay in the lane, unreferenced)


@dataclass
class Req:
    lane: int
    seq: int
    row: int
    n: int
    owner: int
    in0: np.ndarray
    in1: np.ndarray


class LaneHarness:
    def __init__(self, bell: Any, nslots: int, max_batch: int) -> None:
        self.seg, _, self.lane = make_lane(nslots, max_batch, bell)
        self.model = lm.LaneModel(nslots, max_batch)
        self.views = lane_views(self.lane, self.seg, LaneSpec(nslots, max_batch))

    def rows(self, seq: int) -> list[np.ndarray]:
        return self.views[seq % self.model.nslots]


class LaneProtocolMachine(RuleBasedStateMachine):
    """Several logical clients (distinct owner ids) and one worker, on two lanes, in one process."""

    def __init__(self) -> None:
        super().__init__()
        self.bell = k.Doorbell(k.Segment.create(k.DOORBELL_BYTES), init=True)
        self.bell_model = lm.DoorbellModel()
        self.lanes = [LaneHarness(self.bell, *shape) for shape in LANE_SHAPES]
        self.owners = list(range(1, N_CLIENTS + 1))
        self.next_owner = N_CLIENTS + 1
        self.next_value = 1
        self.reqs: list[Req] = []
        self.batches: list[tuple[int, int, int]] = []  # taken, not yet completed
        self.peek = probe_matches_extension()
        self.checked = 0  # outputs checked against f(inputs)

    def agree(self, got: tuple[str, Any], want: tuple[str, Any], what: str) -> None:
        assert got == want, f"{what}: C lane {got}, model {want}"

    # -- clients

    def write_inputs(self, li: int, seq: int, row: int, n: int, owner: int) -> None:
        vals = np.arange(self.next_value, self.next_value + n, dtype=np.int64)  # distinct in every request
        self.next_value += n
        in0, in1 = np.stack([vals, -vals], axis=1), (vals * 7)[:, None]
        v = self.lanes[li].rows(seq)
        v[0][row:row + n], v[1][row:row + n] = in0, in1
        self.reqs.append(Req(li, seq, row, n, owner, in0, in1))
        del self.reqs[:-MAX_TRACKED]

    def claim_and_write(self, client: int, li: int, n: int) -> tuple[Any, int]:
        """claim(n, owner, timeout=0) on the C lane and the model, compared; the inputs written if it held."""
        owner = self.owners[client]
        h = self.lanes[li]
        got = outcome(h.lane.claim, n, owner, 0.0)
        self.agree(got, outcome(h.model.claim, n, owner), f"claim({n}, owner={owner}) on lane {li}")
        if got[0] == "ok":
            self.write_inputs(li, *got[1], n, owner)
        return got, owner

    @rule(client=st.integers(0, N_CLIENTS - 1), li=st.integers(0, 1), n=st.integers(1, 4))
    def claim(self, client: int, li: int, n: int) -> None:
        """claim(n, owner, timeout=0) and write the inputs; n = 4 does not fit lane 1 (max_batch 3)."""
        self.claim_and_write(client, li, n)

    @rule(client=st.integers(0, N_CLIENTS - 1), li=st.integers(0, 1), n=st.integers(1, 3))
    def claim_and_commit(self, client: int, li: int, n: int) -> None:
        """The common path: claim, write, commit at once (no worker step in between)."""
        got, owner = self.claim_and_write(client, li, n)
        h = self.lanes[li]
        if got[0] == "ok":
            self.agree(outcome(h.lane.commit, *got[1], n, owner), outcome(h.model.commit, *got[1], n, owner),
                       f"commit({got[1]}, {n}, {owner})")

    def pick(self, i: int, stale: bool) -> Req:
        """A request a client still holds (claimed or committed), or with `stale` any request it ever had:
        released, abandoned, reclaimed, or in a slot since reused."""
        held = [r for r in self.reqs if not stale and self.lanes[r.lane].model.request_state(r.seq, r.row)
                in ((r.owner, lm.ROW_CLAIMED), (r.owner, lm.ROW_COMMITTED))]
        pool = held or self.reqs
        return pool[i % len(pool)]

    def owner_for(self, r: Req, foreign: bool) -> int:
        return r.owner + 1000 if foreign else r.owner  # a foreign owner's compare-and-swap must fail

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, MAX_TRACKED - 1), stale=st.sampled_from([False, False, False, True]))
    def commit(self, i: int, stale: bool) -> None:
        r = self.pick(i, stale)
        h = self.lanes[r.lane]
        self.agree(outcome(h.lane.commit, r.seq, r.row, r.n, r.owner),
                   outcome(h.model.commit, r.seq, r.row, r.n, r.owner), f"commit({r.seq}, {r.row}, {r.n}, {r.owner})")

    def wait_and_check(self, r: Req) -> tuple[str, Any]:
        """wait(seq, timeout=0); when the batch ran, the client reads its outputs and checks them."""
        h = self.lanes[r.lane]
        got = outcome(h.lane.wait, r.seq, 0.0)
        self.agree(got, outcome(h.model.wait, r.seq), f"wait({r.seq})")
        if got[0] != "ok":
            return got
        if got[1] != 0:
            assert h.lane.error_message(r.seq) == h.model.error_message(r.seq)
        elif h.model.request_state(r.seq, r.row) == (r.owner, lm.ROW_COMMITTED):
            # the request is ours, committed, in a batch that ran: its outputs are f(its inputs)
            out0, out1 = f_outputs(r.in0, r.in1)
            v = h.rows(r.seq)
            np.testing.assert_array_equal(v[2][r.row:r.row + r.n], out0)
            np.testing.assert_array_equal(v[3][r.row:r.row + r.n], out1)
            self.checked += 1
        return got

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, MAX_TRACKED - 1), stale=st.sampled_from([False, False, False, True]))
    def wait(self, i: int, stale: bool) -> None:
        self.wait_and_check(self.pick(i, stale))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, MAX_TRACKED - 1))
    def wait_read_release(self, i: int) -> None:
        """The common end of a request: wait, read the outputs if the batch ran, release."""
        r = self.pick(i, False)
        if self.wait_and_check(r)[0] == "ok":
            h = self.lanes[r.lane]
            self.agree(outcome(h.lane.release, r.seq, r.row, r.n, r.owner),
                       outcome(h.model.release, r.seq, r.row, r.n, r.owner),
                       f"release({r.seq}, {r.row}, {r.n}, {r.owner})")

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, MAX_TRACKED - 1), stale=st.sampled_from([False, False, False, True]),
          foreign=st.sampled_from([False, False, False, True]))
    def release(self, i: int, stale: bool, foreign: bool) -> None:
        """Release after reading, or cancel (release before commit); as another owner it must fail."""
        r = self.pick(i, stale)
        h, owner = self.lanes[r.lane], self.owner_for(r, foreign)
        self.agree(outcome(h.lane.release, r.seq, r.row, r.n, owner),
                   outcome(h.model.release, r.seq, r.row, r.n, owner), f"release({r.seq}, {r.row}, {r.n}, {owner})")

    # -- worker

    @rule(window_elapsed=st.sampled_from([False, False, True]), close_at=st.integers(0, 5),
          run_now=st.booleans())
    def worker_take(self, window_elapsed: bool, close_at: int, run_now: bool) -> None:
        """next_batch(window 0 or an hour, close_at, commit_timeout 0, max_wait 0) over both lanes; the
        batch runs at once or stays taken for a later step."""
        window = 0.0 if window_elapsed else 3600.0
        got = outcome(take, [h.lane for h in self.lanes], self.bell, window, close_at)
        want = outcome(lm.next_batch, [h.model for h in self.lanes], self.bell_model, window_elapsed, close_at)
        self.agree(got, want, f"next_batch(window={window}, close_at={close_at})")
        if isinstance(got[1], tuple):
            self.batches.append(got[1])
            if run_now:
                self.worker_run_and_complete(len(self.batches) - 1, False)

    @precondition(lambda self: self.batches)
    @rule(j=st.integers(0, 7), fail=st.sampled_from([False, False, False, True]))
    def worker_run_and_complete(self, j: int, fail: bool) -> None:
        """Outputs = f(inputs) on every row of the batch (or a failure), then complete; any order."""
        li, seq, n, _live = self.batches.pop(j % len(self.batches))
        h = self.lanes[li]
        if fail:
            msg = f"backend failed on batch {seq} \u2717"
            h.lane.complete(seq, 3, msg)
            h.model.complete(seq, 3, msg)
        else:
            run_batch(h.rows(seq), n)
            h.lane.complete(seq, 0)
            h.model.complete(seq, 0)

    # -- rarer events, in one rule so they stay rare

    @rule(event=st.sampled_from(["client_dies", "bad_claim", "ring_control", "status"]),
          client=st.integers(0, N_CLIENTS - 1), li=st.integers(0, 1),
          status=st.sampled_from([lm.LANE_LIVE] * 4 + [lm.LANE_RETIRED, lm.LANE_DEAD]),
          bad=st.sampled_from([(0, 1), (4, 1), (1, 0)]))
    def server_event(self, event: str, client: int, li: int, status: int, bad: tuple[int, int]) -> None:
        h = self.lanes[li]
        if event == "client_dies":
            # the server reclaims every row the client held on every lane; the client comes back with a new
            # owner id (ids are never reused); its old requests stay tracked, as a stale client's would
            owner = self.owners[client]
            for lj, hj in enumerate(self.lanes):
                self.agree(outcome(hj.lane.reclaim, owner), outcome(hj.model.reclaim, owner),
                           f"reclaim({owner}) lane {lj}")
            self.owners[client] = self.next_owner
            self.next_owner += 1
        elif event == "bad_claim":  # n = 0, n > max_batch (on lane 1), owner 0
            n, owner = bad
            n = n if n != 4 else h.model.max_batch + 1
            self.agree(outcome(h.lane.claim, n, owner, 0.0), outcome(h.model.claim, n, owner), f"claim({n}, {owner})")
        elif event == "ring_control":
            self.bell.ring_control()
            self.bell_model.ring_control()
        else:
            h.lane.set_status(status)
            h.model.set_status(status)

    # -- after every step

    @invariant()
    def c_lane_agrees_with_model(self) -> None:
        for li, h in enumerate(self.lanes):
            assert h.lane.counters() == h.model.counters, f"lane {li} counters"
            assert h.lane.status == h.model.status
            assert h.lane.idle() == h.model.idle(), f"lane {li} idle"
            for i, s in enumerate(h.model.slots):
                assert h.lane.error_message(i) == s.errmsg
            if self.peek:
                got, want = read_headers(h.seg, h.model), model_headers(h.model)
                assert got[0] == want[0], f"lane {li} (open_seq, run_seq, status): C {got[0]}, model {want[0]}"
                for i, (g, w) in enumerate(zip(got[1], want[1])):
                    assert g == w, f"lane {li} slot {i}: C {g}, model {w}"


TestLaneProtocolMachine = LaneProtocolMachine.TestCase
TestLaneProtocolMachine.settings = settings(
    max_examples=250, stateful_step_count=80, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_probe_matches_extension() -> None:
    """The state machine compares slot headers only when the probe reads the extension's layout."""
    if probe() is None:
        pytest.skip("no C compiler: slot headers are not compared")
    assert probe_matches_extension(), "the built extension is stale: python3 setup.py build_ext --inplace"


# ---- edge cases ----------------------------------------------------------------------------------------


def test_claim_more_than_max_batch_is_refused() -> None:
    _, _, lane = make_lane(2, 4)
    with pytest.raises(ValueError):
        lane.claim(5, 1, 0.0)
    with pytest.raises(ValueError):
        lane.claim(0, 1, 0.0)
    with pytest.raises(ValueError):
        lane.claim(1, 0, 0.0)  # owner 0 is reserved
    assert lane.counters()["claims"] == 0
    assert lane.claim(4, 1, 0.0) == (0, 0)


def test_request_that_does_not_fit_seals_the_slot_and_moves_on() -> None:
    _, bell, lane = make_lane(3, 4)
    assert lane.claim(3, 1, 0.0) == (0, 0)
    assert lane.claim(2, 2, 0.0) == (1, 0)  # 3 + 2 > 4: slot 0 is sealed with 3 rows
    assert lane.claim(1, 3, 0.0) == (1, 2)  # slot 0 takes no more, even though a row is free
    lane.commit(0, 0, 3, 1)
    # a sealed slot is taken at once, whatever the window
    assert take3([lane], bell, window=3600.0) == (0, 0, 3)
    assert take3([lane], bell, window=3600.0) == k.NONE  # slot 1 is open, 3 rows < close_at
    assert take3([lane], bell, window=3600.0, close_at=3) == (0, 1, 3)


def test_full_lane_backpressure_then_frees_after_release() -> None:
    _, bell, lane = make_lane(2, 2)
    held = [lane.claim(2, 1, 0.0), lane.claim(2, 2, 0.0)]
    assert held == [(0, 0), (1, 0)]
    with pytest.raises(k.LaneTimeout):
        lane.claim(1, 3, 0.0)
    assert lane.counters()["full_waits"] == 1
    for owner, (seq, row) in enumerate(held, 1):
        lane.commit(seq, row, 2, owner)
    for seq in (0, 1):
        assert take3([lane], bell) == (0, seq, 2)
        lane.complete(seq, 0)
    with pytest.raises(k.LaneTimeout):  # done, but clients still hold their rows
        lane.claim(1, 3, 0.0)
    lane.release(0, 0, 2, 1)  # slot 0 is reset for seq 2
    assert lane.claim(1, 3, 0.0) == (2, 0)
    # a claimer that waits is woken by the release
    blocked = Call(lane.claim, 2, 4, 30.0)
    waits = lane.counters()["full_waits"]
    blocked.start()
    deadline = k.now_ns() + 20_000_000_000
    while lane.counters()["full_waits"] == waits and k.now_ns() < deadline:
        pass  # the claimer found every slot busy and is waiting on free_seq (or about to)
    assert blocked.is_alive()
    lane.release(1, 0, 2, 2)
    blocked.join(30)
    assert blocked.result == ("ok", (3, 0))


def test_stale_claim_after_reuse_is_abandoned() -> None:
    _, bell, lane = make_lane(1, 2)
    seq, row = lane.claim(1, 1, 0.0)
    lane.commit(seq, row, 1, 1)
    assert take3([lane], bell) == (0, 0, 1)
    lane.complete(0, 0)
    assert lane.wait(0, 0.0) == 0
    lane.release(0, 0, 1, 1)  # slot 0 now serves seq 1
    assert lane.claim(1, 2, 0.0) == (1, 0)  # same slot and row, new generation
    for op in (lambda: lane.commit(0, 0, 1, 1), lambda: lane.wait(0, 0.0), lambda: lane.release(0, 0, 1, 1)):
        with pytest.raises(k.LaneAbandoned):
            op()
    # even with the new holder's owner, the old generation is refused
    with pytest.raises(k.LaneAbandoned):
        lane.commit(0, 0, 1, 2)
    lane.commit(1, 0, 1, 2)  # the new holder is unaffected


def test_commit_after_the_batch_was_abandoned() -> None:
    _, bell, lane = make_lane(2, 4)
    a = lane.claim(1, 1, 0.0)
    b = lane.claim(2, 2, 0.0)
    lane.commit(*b, 2, 2)
    assert take3([lane], bell) == (0, 0, 3)  # commit timeout 0: a's row is abandoned
    assert lane.counters()["commit_timeouts"] == 1 and lane.counters()["abandoned_rows"] == 1
    with pytest.raises(k.LaneAbandoned):
        lane.commit(*a, 1, 1)  # slot TAKEN, row abandoned
    lane.complete(0, 0)
    with pytest.raises(k.LaneAbandoned):
        lane.commit(*a, 1, 1)  # slot DONE
    with pytest.raises(k.LaneAbandoned):
        lane.release(*a, 1, 1)  # its rows were already given back by the worker
    lane.release(*b, 2, 2)  # the slot resets with b's release alone
    assert lane.idle()
    with pytest.raises(k.LaneAbandoned):
        lane.wait(0, 0.0)


def test_cancel_before_commit() -> None:
    _, bell, lane = make_lane(1, 4)
    a = lane.claim(2, 1, 0.0)
    lane.release(*a, 2, 1)  # cancel: not counted as abandoned by the worker
    with pytest.raises(k.LaneAbandoned):
        lane.commit(*a, 2, 1)
    assert take3([lane], bell) == (0, 0, 2)  # the slot still runs (the worker cannot tell)
    assert lane.counters()["commit_timeouts"] == 0 and lane.counters()["abandoned_rows"] == 0
    lane.complete(0, 0)  # every row was given back: completing resets the slot
    assert lane.idle() and lane.claim(1, 2, 0.0) == (1, 0)


def test_reclaim_of_dead_owner_lets_the_slot_be_reused() -> None:
    _, bell, lane = make_lane(1, 4)
    a = lane.claim(2, 1, 0.0)
    b = lane.claim(1, 2, 0.0)
    c = lane.claim(1, 2, 0.0)  # owner 2 holds two requests
    lane.commit(*a, 2, 1)
    lane.commit(*b, 1, 2)
    assert take3([lane], bell) == (0, 0, 4)  # c is abandoned by the worker
    lane.complete(0, 0)
    lane.release(*a, 2, 1)
    with pytest.raises(k.LaneTimeout):
        lane.claim(1, 3, 0.0)  # owner 2 still holds b's row
    assert lane.reclaim(2) == 1  # b (committed); c was already abandoned
    assert lane.reclaim(2) == 0
    assert lane.claim(1, 3, 0.0) == (1, 0)
    # a dead owner's uncommitted claim is abandoned by reclaim (and counted)
    before = lane.counters()["abandoned_rows"]
    d = lane.claim(2, 4, 0.0)
    assert lane.reclaim(4) == 1
    assert lane.counters()["abandoned_rows"] == before + 2
    with pytest.raises(k.LaneAbandoned):
        lane.commit(*d, 2, 4)
    assert c == (0, 3)


def test_lane_over_a_mismatched_header_is_refused() -> None:
    bell = k.Doorbell(k.Segment.create(k.DOORBELL_BYTES), init=True)
    seg = k.Segment.create(k.Lane.required_size(4, 16, ROW_BYTES))
    with pytest.raises(ValueError):
        k.Lane(seg, bell, 4, 16, ROW_BYTES)  # never initialised: no magic
    k.Lane(seg, bell, 4, 16, ROW_BYTES, init=True)
    k.Lane(seg, bell, 4, 16, ROW_BYTES)  # the same layout maps
    for nslots, max_batch, rb in ((4, 8, ROW_BYTES), (2, 16, ROW_BYTES), (4, 16, [8, 16, 16, 8]),
                                  (4, 16, ROW_BYTES[:3])):
        assert k.Lane.required_size(nslots, max_batch, rb) <= seg.size
        with pytest.raises(ValueError):
            k.Lane(seg, bell, nslots, max_batch, rb)
    with pytest.raises(ValueError):
        k.Lane(seg, bell, 8, 16, ROW_BYTES)  # larger than the segment
    with pytest.raises(ValueError):
        k.Doorbell(seg)  # a lane is not a doorbell


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_segment_from_fd_refuses_unsealed_or_short() -> None:
    fd = os.memfd_create("kp-test-unsealable")  # no MFD_ALLOW_SEALING: never sealed
    os.ftruncate(fd, 1 << 16)
    with pytest.raises(ValueError, match="sealed"):
        k.Segment.from_fd(fd, 4096)
    assert _closed(fd)  # from_fd owns the descriptor, even when it refuses it
    fd = os.memfd_create("kp-test-unsealed", os.MFD_ALLOW_SEALING)  # sealable, but not sealed
    os.ftruncate(fd, 1 << 16)
    with pytest.raises(ValueError, match="sealed"):
        k.Segment.from_fd(fd, 4096)
    assert _closed(fd)
    seg = k.Segment.create(8192)
    fd = seg.dup_fd()
    with pytest.raises(ValueError, match="smaller"):
        k.Segment.from_fd(fd, 8193)
    assert _closed(fd)
    with pytest.raises(ValueError):
        k.Segment.from_fd(seg.dup_fd(), 0)
    other = k.Segment.from_fd(seg.dup_fd(), 8192)  # sealed and large enough: maps the same memory
    memoryview(seg)[100] = 42
    assert memoryview(other)[100] == 42


def test_dead_lane_fails_claims_and_waits_at_once() -> None:
    _, bell, lane = make_lane(2, 4)
    a = lane.claim(1, 1, 0.0)
    lane.commit(*a, 1, 1)
    waiter = Call(lane.wait, a[0], 60.0)  # would wait a minute
    blocked = [lane.claim(4, 2, 0.0)]
    lane.commit(*blocked[0], 4, 2)
    claimer = Call(lane.claim, 1, 3, 60.0)  # both slots busy: would wait a minute
    waiter.start()
    claimer.start()
    lane.set_status(k.LANE_DEAD)
    waiter.join(30)
    claimer.join(30)
    assert waiter.result == ("err", "LaneDead")
    assert claimer.result == ("err", "LaneDead")
    with pytest.raises(k.LaneDead):
        lane.claim(1, 1, 60.0)
    with pytest.raises(k.LaneDead):
        lane.wait(a[0], 60.0)
    assert take3([lane], bell) == k.NONE  # the worker takes nothing from a dead lane
    lane.set_status(k.LANE_RETIRED)
    with pytest.raises(k.LaneRetired):
        lane.claim(1, 1, 60.0)


# ---- interleavings one thread cannot reach: a thread stopped mid-call by a page trap --------------------


def two_mappings(nslots: int, max_batch: int) -> tuple[Any, Any, Any, Any]:
    """A lane mapped twice: the stopped thread uses `stalled`, everyone else `lane`."""
    seg, bell, lane = make_lane(nslots, max_batch)
    seg_a = k.Segment.from_fd(seg.dup_fd(), seg.size)
    stalled = k.Lane(seg_a, bell, nslots, max_batch, ROW_BYTES)
    stalled.set_spin(0, 0.0)
    return seg, bell, lane, stalled


def page(off: int) -> int:
    return off // mmap.PAGESIZE


NOT_REACHED = "the trapped call finished without touching the page: the C code changed, adapt this test"


@needs_probe
@pytest.mark.timeout(60)
# Regression test (fixed: the row word carries the generation, and commit/release check the claim's row count):
# kp_claim: a claimer stopped between its count CAS on the slot word and its CAS of the row word can have its
# rows abandoned, the batch completed and the slot reset meanwhile; its row CAS then succeeds on the reset slot
# (EMPTY again) and the claim returns (old seq, row) inside a slot that serves a new generation, where another
# request may own that row: its inputs are overwritten
def test_claim_stopped_across_a_slot_reset_cannot_land_in_the_new_generation() -> None:
    seg, bell, lane, stalled = two_mappings(1, 512)
    views = lane_views(lane, seg, LaneSpec(1, 512))[0]
    x = lane.claim(1, 1, 0.0)  # X: (0, 0)
    views[0][0], views[1][0] = [10, -10], [70]
    lane.commit(*x, 1, 1)
    lens1 = probe().kpp_offset(seg.address, 0, 3, 1)
    setup_check(page(lens1) != page(probe().kpp_offset(seg.address, 0, 0, 0)), "row_len on the slot word's page")
    with PageTrap(stalled.segment.address + lens1) as trap:
        s_claim = Call(stalled.claim, 1, 2, 30.0)  # S counts row 1 of seq 0, then stops at row_len[1]
        s_claim.start()
        if not trap.stopped(s_claim, 20):
            raise RuntimeError(NOT_REACHED)
        # meanwhile: the worker takes seq 0 and abandons S's row (not marked yet), runs, completes;
        # X reads and releases; the slot is reset for seq 1, and Y claims rows 0-1 there
        setup_check(take3([lane], bell) == (0, 0, 2), "take of seq 0")
        run_batch(views, 2)
        lane.complete(0, 0)
        setup_check(lane.wait(0, 0.0) == 0, "X's wait")
        lane.release(*x, 1, 1)
        y = lane.claim(2, 3, 0.0)
        setup_check(y == (1, 0), f"Y's claim {y}")
        views[0][0:2], views[1][0:2] = [[20, -20], [21, -21]], [[140], [147]]
        trap.resume()
        s_claim.join(20)
    setup_check(s_claim.result is not None, "S's claim did not return")
    s_commit = None
    if s_claim.result[0] == "ok":
        s_seq, s_row = s_claim.result[1]
        # S does what any client does with its claim: write its inputs into its row, commit
        sv = lane_views(stalled, stalled.segment, LaneSpec(1, 512))[s_seq % 1]
        sv[0][s_row], sv[1][s_row] = [99, -99], [693]
        s_commit = outcome(stalled.commit, s_seq, s_row, 1, 2)
    lane.commit(*y, 2, 3)
    r = take3([lane], bell)
    setup_check(r[:2] == (0, 1), f"take of seq 1: {r}")
    run_batch(views, r[2])
    lane.complete(1, 0)
    setup_check(lane.wait(1, 0.0) == 0, "Y's wait")
    want0, want1 = f_outputs(np.array([[20, -20], [21, -21]]), np.array([[140], [147]]))
    got0, got1 = views[2][0:2].copy(), views[3][0:2].copy()
    y_ok = np.array_equal(got0, want0) and np.array_equal(got1, want1)
    assert s_commit in (None, ("ok", None)) and y_ok, (
        f"S's claim returned {s_claim.result[1]} while the slot serves seq 1 (its commit: {s_commit}); "
        f"S wrote its inputs there, and Y's outputs are {got0.tolist()} {got1.tolist()}, "
        f"want {want0.tolist()} {want1.tolist()}")


@needs_probe
@pytest.mark.timeout(60)
# Regression test (fixed: the row word carries the generation, and commit/release check the claim's row count):
# kp_commit checks the generation, then CASes (owner, CLAIMED) -> COMMITTED on the row word, which carries no
# generation: a commit stopped in between lands on a row the same owner claimed in the slot's next generation,
# adds its own n to `committed`, and the worker runs that batch before a third request's inputs are written;
# that request's commit still succeeds and its wait returns 0 with outputs not computed from its inputs
def test_commit_stopped_across_a_slot_reset_cannot_commit_a_newer_request() -> None:
    mb = 1024
    seg, bell, lane, stalled = two_mappings(1, mb)
    views = lane_views(lane, seg, LaneSpec(1, mb))[0]
    p = probe()
    word_page = page(p.kpp_offset(seg.address, 0, 0, 0))
    setup_check(page(p.kpp_offset(seg.address, 0, 1, 0)) == word_page, "slot state on the word's page")
    c = next(r for r in range(mb - 2) if page(p.kpp_offset(seg.address, 0, 2, r)) != word_page)
    X = 20  # one client (one owner id) with two requests in flight, as the local client and gRPC allow
    f1 = lane.claim(c, 10, 0.0)
    lane.commit(*f1, c, 10)
    a = lane.claim(2, X, 0.0)
    setup_check(a == (0, c), f"A's claim {a}")
    with PageTrap(stalled.segment.address + p.kpp_offset(seg.address, 0, 2, c)) as trap:
        a_commit = Call(stalled.commit_and_wait, 0, c, 2, X, 5.0)  # checks the generation, then stops
        a_commit.start()
        if not trap.stopped(a_commit, 20):
            raise RuntimeError(NOT_REACHED)
        # meanwhile: the commit timeout passes, A's rows are abandoned, the batch runs, F releases
        setup_check(take3([lane], bell) == (0, 0, c + 2), "take of seq 0")
        lane.complete(0, 0)
        lane.release(*f1, c, 10)
        # the slot serves seq 1: F2 fills rows 0..c-1, X's next request B gets row c, C gets row c+1
        f2 = lane.claim(c, 30, 0.0)
        b = lane.claim(1, X, 0.0)
        cc = lane.claim(1, 40, 0.0)
        setup_check((f2, b, cc) == ((1, 0), (1, c), (1, c + 1)), f"claims in seq 1: {f2} {b} {cc}")
        lane.commit(*f2, c, 30)
        trap.resume()
        a_commit.join(20)
    setup_check(a_commit.result == ("err", "LaneAbandoned"), f"A's commit_and_wait gave {a_commit.result}")
    # the worker looks for a batch while C has claimed but not yet written its inputs
    views[0][c + 1], views[1][c + 1] = [0, 0], [0]
    r = take3([lane], bell)
    setup_check(r[:2] == (0, 1), f"take of seq 1: {r}")
    run_batch(views, r[2])
    views[0][c + 1], views[1][c + 1] = [5, -5], [35]  # C writes its inputs, then commits
    c_commit = outcome(lane.commit, *cc, 1, 40)
    lane.complete(1, 0)
    if c_commit == ("ok", None):
        assert lane.wait(1, 0.0) == 0
        want0, want1 = f_outputs(np.array([[5, -5]]), np.array([[35]]))
        got = (views[2][c + 1].tolist(), views[3][c + 1].tolist())
        assert got == (want0[0].tolist(), want1[0].tolist()), (
            f"C committed and got status 0, but its outputs {got} are not f(its inputs) "
            f"{want0[0].tolist()} {want1[0].tolist()}: the batch ran before C's commit")


# Regression test (fixed: the row word carries the generation, and commit/release check the claim's row count):
# kp_commit / kp_release trust the caller's row count instead of the claim's row_len: releasing (0, 0) with n=4
# when the claim was 1 row brings `released` to DONE_UNIT + nrows and resets the slot while another client
# still holds rows 1-3 and has not read its outputs
def test_release_with_a_wrong_row_count_cannot_reset_the_slot_under_another_client() -> None:
    _, bell, lane = make_lane(1, 4)
    a = lane.claim(1, 1, 0.0)
    b = lane.claim(3, 2, 0.0)
    lane.commit(*a, 1, 1)
    lane.commit(*b, 3, 2)
    assert take3([lane], bell) == (0, 0, 4)
    lane.complete(0, 0)
    wrong = outcome(lane.release, *a, 4, 1)
    b_wait = outcome(lane.wait, b[0], 0.0)
    b_release = outcome(lane.release, *b, 3, 2)
    assert wrong[0] == "err" or (b_wait, b_release) == (("ok", 0), ("ok", None)), (
        f"release(a, n=4) gave {wrong}; then b's wait gave {b_wait} and its release {b_release}: "
        f"the slot was reset while b still held rows 1-3")


# ---- multi-process stress ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_multiprocess_stress(record_property: Any) -> None:
    nclients, cycles = 6, 2000
    res = run_stress(nclients=nclients, cycles=cycles)
    assert res["exitcodes"] == [0] * (nclients + 1)
    for c in res["clients"]:
        assert c["errors"] == [], c["errors"]
        assert c["wrong"] == [], c["wrong"]
    per_lane = [[sum(c["per_lane"][li][j] for c in res["clients"]) for j in (0, 1)] for li in range(2)]
    assert sum(r for r, _ in per_lane) == nclients * cycles
    for (requests, rows), ctr in zip(per_lane, res["counters"]):
        assert ctr["claims"] == requests
        assert ctr["rows"] == rows
        assert 1 <= ctr["batches"] <= ctr["claims"]
        assert ctr["abandoned_rows"] == 0 and ctr["commit_timeouts"] == 0 and ctr["failed_batches"] == 0
    w = res["worker"]
    assert w["bad_batches"] == 0
    assert w["batches"] == sum(c["batches"] for c in res["counters"])
    assert w["rows"] == sum(rows for _, rows in per_lane)
    assert res["idle"] == [True, True]
    mean = w["rows"] / w["batches"]
    record_property("mean_rows_per_batch", round(mean, 2))
    print(f"\nlane stress: {nclients * cycles} requests, {w['rows']} rows in {w['batches']} batches "
          f"(mean {mean:.2f} rows/batch), clients ran {res['seconds_clients']:.2f} s, "
          f"total {res['seconds_total']:.2f} s, sizes {dict(sorted(w['sizes'].items()))}")
