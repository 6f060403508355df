"""A pure-Python reference model of the lane protocol in `src/_kpcore/include/kp_lane.h`.

It is sequential: every operation is one atomic step, so it models what a single process sees when
it drives the C lane one call at a time (the C functions are not interruptible from Python). Tests
run the model and the C lane side by side on the same operations and compare every result, every
error and every counter (tests/test_lane_protocol.py).

What it keeps, per the header:
- a lane: `open_seq` (the slot claimers fill), `run_seq` (the next slot a worker takes), a status
  (LIVE, RETIRED, DEAD) and the counters;
- `nslots` slots; slot `q % nslots` serves sequence number q, and its generation is q. A slot has a
  row count, a closed bit, a state (OPEN, TAKEN, DONE), `committed` (rows committed or abandoned),
  `released` (rows released or abandoned, plus DONE_UNIT - nrows once the worker completed it), `nrows`
  (set when taken), the batch status and error message;
- one row word per row: (owner, state) on the first row of each request (EMPTY, CLAIMED,
  COMMITTED, ABANDONED, RELEASED), and the request's row count (`lens`); other rows stay (0, EMPTY);
- a slot is reset for q + nslots (generation + nslots, everything else cleared) at the moment
  `released` reaches DONE_UNIT: every row released or abandoned and the worker done;
- claims: the request goes to the open slot if it fits; a request that does not fit seals the slot
  (the worker may take it now) and moves to the next; a claim that fills the slot closes it; when
  the open slot still serves an older generation every slot is busy (back-pressure);
- the worker takes the slot at `run_seq` if it holds rows and is closed, or reached `close_at`
  rows, or is full, or its batching window has elapsed; it closes it, advances `open_seq` if that
  still pointed there, then waits for commits and, at the commit timeout, abandons every request
  still CLAIMED (compare-and-swap on the row word, so a commit and an abandon never both win);
- `reclaim(owner)`: every CLAIMED row of that owner is abandoned (and counted in abandoned_rows),
  every COMMITTED one released.

Timeouts are modelled at their limit: the model answers a `claim`, a `wait` or a `next_batch` as
the C code does with a timeout of 0 in a single process (nothing can change while it waits). The C
code compares generations on their low 32 bits; the model keeps whole sequence numbers (tests never
run 2**32 batches).

Observed (not a verdict): `wait` reports the *batch*'s status, so a client whose rows were
abandoned but whose slot still ran (other rows committed) gets 0 from `wait` until the slot is
reset; its `commit` is what reports the abandonment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROW_EMPTY, ROW_CLAIMED, ROW_COMMITTED, ROW_ABANDONED, ROW_RELEASED = range(5)
ROW_CANCELLED = 6  # released before its batch was taken (ROW_EXPIRED = 5 is not modelled)
SLOT_OPEN, SLOT_TAKEN, SLOT_DONE = range(3)
LANE_LIVE, LANE_RETIRED, LANE_DEAD = range(3)
DONE_UNIT = 0x80000000
CLOSED_BIT = 0x80000000
ERRMSG_BYTES = 240
NONE = 1  # next_batch: nothing to run
CONTROL = 2  # next_batch: the server rang for a control message

COUNTERS = (
    "claims", "batches", "rows", "client_sleeps", "worker_sleeps", "commit_timeouts", "full_waits",
    "abandoned_rows", "failed_batches", "expired_requests", "cancelled_requests",
)


class LaneError(Exception):
    pass


class LaneTimeout(LaneError):
    pass


class LaneDead(LaneError):
    pass


class LaneAbandoned(LaneError):
    pass


class LaneRetired(LaneError):
    pass


@dataclass
class SlotModel:
    gen: int  # the sequence number this slot serves now
    max_batch: int
    count: int = 0
    closed: bool = False
    state: int = SLOT_OPEN
    committed: int = 0
    released: int = 0
    nrows: int = 0
    batch_status: int = 0
    errmsg: str = ""
    words: list[tuple[int, int]] = field(default_factory=list)  # per row: (owner, row state)
    lens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.count = 0
        self.nreq = 0
        self.closed = False
        self.state = SLOT_OPEN
        self.committed = 0
        self.released = 0
        self.nrows = 0
        self.batch_status = 0
        self.errmsg = ""
        self.words = [(0, ROW_EMPTY)] * self.max_batch
        self.lens = [0] * self.max_batch

    @property
    def word(self) -> int:
        """The C slot word: gen:32 | closed:1 | requests:14 | rows:17."""
        return ((self.gen & 0xFFFFFFFF) << 32) | (CLOSED_BIT if self.closed else 0) | (self.nreq << 17) | self.count


class LaneModel:
    def __init__(self, nslots: int, max_batch: int) -> None:
        if not (1 <= nslots <= 4096 and 1 <= max_batch <= 65536):
            raise ValueError("lane layout out of range")
        self.nslots = nslots
        self.max_batch = max_batch
        self.slots = [SlotModel(gen=i, max_batch=max_batch) for i in range(nslots)]
        self.open_seq = 0
        self.run_seq = 0
        self.status = LANE_LIVE
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ---- helpers ----

    def slot(self, seq: int) -> SlotModel:
        return self.slots[seq % self.nslots]

    def _check_claim(self, seq: int, row: int, n: int) -> SlotModel:
        if n == 0 or row >= self.max_batch or n > self.max_batch - row:
            raise ValueError("row range out of bounds")
        s = self.slot(seq)
        if s.gen != seq:
            raise LaneAbandoned("stale generation")
        if s.lens[row] != n:
            raise ValueError("not the request that was claimed there")
        return s

    def _add_released(self, s: SlotModel, n: int) -> None:
        s.released += n
        if s.released == DONE_UNIT:
            self._reset(s)

    def _reset(self, s: SlotModel) -> None:
        s.gen += self.nslots
        s.clear()

    def _abandon(self, s: SlotModel, row: int, n: int, owner: int, count_abandoned: bool) -> None:
        s.words[row] = (owner, ROW_ABANDONED)
        s.committed += n
        if count_abandoned:
            self.counters["abandoned_rows"] += n
        self._add_released(s, n)

    def request_state(self, seq: int, row: int) -> tuple[int, int] | None:
        """(owner, row state) of the request at (seq, row), or None when the slot was reused."""
        s = self.slot(seq)
        return s.words[row] if s.gen == seq else None

    def idle(self) -> bool:
        return all(s.count == 0 and not s.closed and s.state == SLOT_OPEN for s in self.slots)

    # ---- client side ----

    def claim(self, n: int, owner: int) -> tuple[int, int]:
        """claim(n, owner, timeout=0): (seq, row), or LaneTimeout when every slot is busy."""
        if n == 0 or n > self.max_batch or owner == 0:
            raise ValueError("row range out of bounds")
        if self.status == LANE_DEAD:
            raise LaneDead("lane is closed")
        if self.status == LANE_RETIRED:
            raise LaneRetired("lane is retired")
        while True:
            q = self.open_seq
            s = self.slot(q)
            if s.gen != q:
                # back-pressure: the claimer waits on free_seq; with a 0 timeout it gives up at once
                self.counters["full_waits"] += 1
                raise LaneTimeout("every slot is busy")
            if s.closed or s.count + n > self.max_batch or s.nreq == 0x3FFF:
                s.closed = True  # sealed: the worker may take it now
                if self.open_seq == q:
                    self.open_seq = q + 1
                continue
            c = s.count
            s.count += n
            s.nreq += 1
            if s.count == self.max_batch:
                s.closed = True
            s.lens[c] = n
            s.words[c] = (owner, ROW_CLAIMED)
            if s.closed and self.open_seq == q:
                self.open_seq = q + 1
            # (the C claim re-reads the status here and gives the rows back if the lane was retired
            # meanwhile; in one process the status cannot change during a claim)
            self.counters["claims"] += 1
            return q, c

    def commit(self, seq: int, row: int, n: int, owner: int) -> None:
        s = self._check_claim(seq, row, n)
        if s.state == SLOT_DONE:
            raise LaneAbandoned("the batch ran without this request")
        if s.words[row] != (owner, ROW_CLAIMED):
            raise LaneAbandoned("not a claimed row of this owner")
        s.words[row] = (owner, ROW_COMMITTED)
        s.committed += n  # the caller's n, as the C code does

    def wait(self, seq: int) -> int:
        """wait(seq, timeout=0): the batch status, LaneAbandoned (slot reused), LaneDead or LaneTimeout."""
        s = self.slot(seq)
        if s.gen != seq:
            raise LaneAbandoned("stale generation")
        if s.state == SLOT_DONE:
            return s.batch_status
        if self.status == LANE_DEAD:
            raise LaneDead("lane is closed")
        raise LaneTimeout("timed out")

    @staticmethod
    def _unqueue(s: SlotModel) -> None:
        """A request left before its batch was taken: its queue place (the slot's request count) goes."""
        if s.nreq:
            s.nreq -= 1

    def release(self, seq: int, row: int, n: int, owner: int) -> None:
        s = self._check_claim(seq, row, n)
        if s.words[row] == (owner, ROW_COMMITTED):
            s.words[row] = (owner, ROW_RELEASED)
            self._unqueue(s)
            self._add_released(s, n)
            return
        if s.words[row] == (owner, ROW_CLAIMED):  # cancel before commit: not an abandoned_rows count
            self._unqueue(s)
            self._abandon(s, row, n, owner, count_abandoned=False)
            return
        raise LaneAbandoned("not a held row of this owner")

    def error_message(self, seq: int) -> str:
        return self.slot(seq).errmsg  # not generation-checked, as in C

    # ---- server side ----

    def reclaim(self, owner: int) -> int:
        found = 0
        for s in self.slots:
            for r in range(self.max_batch):
                o, st = s.words[r]  # re-read every row: a reset part-way clears the rest
                if o != owner:
                    continue
                n = s.lens[r]
                if n == 0 or n > self.max_batch - r:
                    n = 1
                if st == ROW_CLAIMED:
                    self._unqueue(s)
                    self._abandon(s, r, n, owner, count_abandoned=True)
                    found += 1
                elif st == ROW_COMMITTED:
                    s.words[r] = (owner, ROW_RELEASED)
                    self._unqueue(s)
                    self._add_released(s, n)
                    found += 1
        return found

    def set_status(self, status: int) -> None:
        if status not in (LANE_LIVE, LANE_RETIRED, LANE_DEAD):
            raise ValueError("unknown lane status")
        self.status = status

    # ---- worker side ----

    def try_take(self, window_elapsed: bool, close_at: int) -> tuple[int, int] | None:
        if self.status == LANE_DEAD:
            return None
        q = self.run_seq
        s = self.slot(q)
        if s.gen != q or s.count == 0:
            return None
        if not s.closed:
            ready = (s.count >= close_at or s.count >= self.max_batch or window_elapsed
                     or self.status == LANE_RETIRED)  # a retired lane takes no more claims
            if not ready:
                return None
            s.closed = True
            if self.open_seq == q:
                self.open_seq = q + 1
        self.run_seq = q + 1
        s.nrows = min(s.count, self.max_batch)
        s.nreq = 0  # the take consumes the queue places
        s.state = SLOT_TAKEN
        return q, s.nrows

    def await_commits(self, seq: int, c: int) -> int:
        """The commit wait, run to its timeout: every request still CLAIMED (or a row never marked)
        is abandoned. Returns the requests left to run (no queue deadlines in this model)."""
        s = self.slot(seq)
        if s.committed < c:
            self._abandon_uncommitted(s, c)
        live, r = 0, 0
        while r < c:
            _owner, st = s.words[r]
            n = s.lens[r]
            if n == 0 or n > c - r:
                n = 1
            live += st == ROW_COMMITTED
            if st == ROW_RELEASED:  # released before the take: cancelled, the batch runs without it
                s.words[r] = (_owner, ROW_CANCELLED)
                self.counters["cancelled_requests"] += 1
            r += n
        return live

    def _abandon_uncommitted(self, s: SlotModel, c: int) -> None:
        self.counters["commit_timeouts"] += 1
        r = 0
        while r < c:
            owner, st = s.words[r]
            n = s.lens[r]
            if n == 0 or n > c - r:
                n = 1
            if st == ROW_EMPTY:
                self._abandon(s, r, 1, 0, count_abandoned=True)
                n = 1
            elif st == ROW_CLAIMED:
                self._abandon(s, r, n, owner, count_abandoned=True)
            r += n

    def complete(self, seq: int, status: int = 0, message: str = "") -> None:
        s = self.slot(seq)
        s.batch_status = status
        if status != 0:
            self.counters["failed_batches"] += 1
            raw = message.encode("utf-8", "replace")[: ERRMSG_BYTES - 1]
            s.errmsg = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        s.state = SLOT_DONE
        self._add_released(s, DONE_UNIT - s.nrows)


class DoorbellModel:
    def __init__(self) -> None:
        self.control = False

    def ring_control(self) -> None:
        self.control = True


def next_batch(lanes: list[LaneModel], bell: DoorbellModel, window_elapsed: bool,
               close_at: int) -> tuple[int, int, int, int] | int:
    """next_batch(..., max_wait=0, commit_timeout=0): (lane index, seq, nrows, live), NONE or CONTROL."""
    if bell.control:
        bell.control = False
        return CONTROL
    for i, lane in enumerate(lanes):
        taken = lane.try_take(window_elapsed, close_at)
        if taken is not None:
            seq, c = taken
            live = lane.await_commits(seq, c)
            lane.counters["batches"] += 1
            lane.counters["rows"] += c
            return i, seq, c, live
    return NONE
