# cython: language_level=3
"""Shared-memory segments, doorbells and lanes of batch slots (see include/kp_lane.h).

Python owns policy; this module owns the atomics, the waits (with the GIL released) and the bounds
checks. Every number handed in from outside is checked before it reaches the C protocol.
"""
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memset, strerror

import os

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int memfd_create(const char *name, unsigned int flags)
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    void *MAP_FAILED
    unsigned int MFD_CLOEXEC
    unsigned int MFD_ALLOW_SEALING

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int posix_fallocate(int fd, long offset, long len)
    int F_ADD_SEALS
    int F_GET_SEALS
    int F_SEAL_SHRINK
    int F_SEAL_GROW
    int F_SEAL_SEAL

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int close(int fd)
    int dup(int fd)

cdef extern from "<sys/stat.h>" nogil:
    struct stat:
        long st_size
    int fstat(int fd, stat *buf)


class LaneError(Exception):
    """Base of the lane protocol's failures."""


class LaneTimeout(LaneError):
    pass


class LaneDead(LaneError):
    """The lane's worker is gone or the lane was closed."""


class LaneAbandoned(LaneError):
    """The worker gave up on this request (it was not committed within the commit timeout)."""


class LaneRetired(LaneError):
    """The lane takes no new claims; ask the server for a new lane."""


class LaneFull(LaneError):
    """The model's queue is full (its max_queue_size): the claim was refused at once."""


class LaneExpired(LaneError):
    """The request waited in the queue past its timeout; it was not run."""


LANE_LIVE = KP_LANE_LIVE
LANE_RETIRED = KP_LANE_RETIRED
LANE_DEAD = KP_LANE_DEAD
MAX_TENSORS = KP_MAX_TENSORS

cdef inline uint64_t _deadline(double timeout) nogil:
    if timeout < 0:
        timeout = 0
    if timeout > 1e8:
        timeout = 1e8
    return kp_now_ns() + <uint64_t>(timeout * 1e9)


cdef int _raise(int rc) except -1:
    if rc == KP_E_TIMEOUT:
        raise LaneTimeout("timed out")
    if rc == KP_E_DEAD:
        raise LaneDead("lane is closed")
    if rc == KP_E_ABANDONED:
        raise LaneAbandoned("request was abandoned")
    if rc == KP_E_RETIRED:
        raise LaneRetired("lane is retired")
    if rc == KP_E_FULL:
        raise LaneFull("queue is full")
    if rc == KP_E_EXPIRED:
        raise LaneExpired("request timed out in the queue")
    if rc == KP_E_INVALID:
        raise ValueError("invalid claim: owner must be nonzero, and rows and count must match a claim")
    raise LaneError(f"lane error {rc}")


def now_ns():
    """CLOCK_MONOTONIC in nanoseconds: the clock every lane timestamp uses."""
    return kp_now_ns()


cdef class Segment:
    """A shared-memory segment: a sealed memfd mapped shared.

    `Segment.create(size)` allocates the whole size up front (posix_fallocate), so a full tmpfs fails
    here with the size in the message instead of a SIGBUS later; it then seals the size, so no
    process it is handed to can shrink it under the others. `Segment.from_fd` maps one received
    over a unix socket after checking its real size. The mapping lives as long as any view of it.
    """

    def __cinit__(self):
        self.fd = -1
        self.base = NULL
        self.size = 0
        self.exports = 0

    @staticmethod
    def create(Py_ssize_t size, str name="kernelport"):
        if size <= 0 or size > (1 << 46):
            raise ValueError(f"segment size out of range: {size}")
        cdef bytes bname = name.encode()[:200]
        cdef int fd = memfd_create(bname, MFD_CLOEXEC | MFD_ALLOW_SEALING)
        if fd < 0:
            raise OSError(errno, f"cannot create a shared segment: {strerror(errno).decode()}")
        cdef int rc
        if ftruncate(fd, size) != 0:
            err = errno
            close(fd)
            raise OSError(err, f"cannot size a shared segment of {size} bytes: {strerror(err).decode()}")
        with nogil:
            rc = posix_fallocate(fd, 0, size)
        if rc != 0:
            close(fd)
            raise MemoryError(
                f"cannot reserve {size} bytes of shared memory ({strerror(rc).decode()}); "
                f"free some or enlarge the shared-memory filesystem")
        if fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0:
            err = errno
            close(fd)
            raise OSError(err, f"cannot seal a shared segment: {strerror(err).decode()}")
        cdef Segment seg = Segment.__new__(Segment)
        seg._map(fd, size, True)
        return seg

    @staticmethod
    def from_fd(int fd, Py_ssize_t size, bint writable=True):
        """Map a received segment. Takes ownership of `fd`. Refuses one smaller than `size` or whose
        size is not sealed (it could shrink under us)."""
        cdef stat st
        if fstat(fd, &st) != 0:
            err = errno
            close(fd)
            raise OSError(err, "cannot inspect a received segment")
        if size <= 0 or st.st_size < size:
            close(fd)
            raise ValueError(f"received segment is smaller ({st.st_size}) than announced ({size})")
        cdef int seals = fcntl(fd, F_GET_SEALS)
        if seals < 0 or not (seals & F_SEAL_SHRINK):
            close(fd)
            raise ValueError("received segment is not sealed against shrinking")
        cdef Segment seg = Segment.__new__(Segment)
        seg._map(fd, size, writable)
        return seg

    def _map(self, int fd, Py_ssize_t size, bint writable):
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        cdef void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            err = errno
            close(fd)
            raise OSError(err, f"cannot map a shared segment of {size} bytes: {strerror(err).decode()}")
        self.fd = fd
        self.base = <char *>p
        self.size = size
        self.writable = writable

    def dup_fd(self):
        """A new descriptor of this segment, to hand to another process."""
        if self.fd < 0:
            raise ValueError("segment is closed")
        return os.dup(self.fd)

    def close_fd(self):
        """Drop the descriptor; the mapping stays until the last view is gone."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    @property
    def address(self):
        return <size_t>self.base

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.base == NULL:
            raise ValueError("segment is not mapped")
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("segment is read-only")
        PyBuffer_FillInfo(buf, self, self.base, self.size, 0 if self.writable else 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __dealloc__(self):
        # Reached only when no view holds us (each view keeps a reference to its exporter).
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


DOORBELL_BYTES = 4096


cdef class Doorbell:
    """The futex a model's workers sleep on; every commit rings it."""

    def __cinit__(self, Segment seg, bint init=False):
        if seg.size < 128:
            raise ValueError("doorbell segment too small")
        self.seg = seg
        self.db = <kp_doorbell *>seg.base
        if init:
            kp_doorbell_init(self.db)
        elif self.db.magic != 0x3142444c504b:
            raise ValueError("not a doorbell segment")

    @property
    def segment(self):
        return self.seg

    def ring(self):
        kp_ring(self.db)

    def ring_control(self):
        """Tell the workers a control message waits: next_batch returns CONTROL at once."""
        kp_ring_control(self.db)

    def set_max_queue(self, uint32_t limit):
        """Requests the model may hold queued (claimed, not yet taken) across its lanes; 0: unbounded."""
        self.db.max_queue = limit

    @property
    def queued(self):
        return self.db.queued

    def set_level_max_queue(self, uint32_t level, uint32_t limit):
        """Priority level `level` (1..64) has a queue of its own bounded by `limit` (0: unbounded); lanes
        of that level count against it once told so (Lane.set_queue_level)."""
        if not 1 <= level <= 64:
            raise ValueError("a queue level is 1..64")
        self.db.level_max[level - 1] = limit

    def level_queued(self, uint32_t level):
        if not 1 <= level <= 64:
            raise ValueError("a queue level is 1..64")
        return self.db.level_queued[level - 1]

    @property
    def rejected(self):
        return self.db.rejected


cdef class StatsBlock:
    """A model's inference statistics, kept by its workers with atomic adds; shared by the server and
    its workers only, never handed to clients."""

    def __cinit__(self, Segment seg, uint32_t max_batch, bint init=False):
        if <uint64_t>seg.size < kp_stats_size(max_batch):
            raise ValueError("statistics segment too small")
        self.seg = seg
        self.st = <kp_stats *>seg.base
        if init:
            kp_stats_init(self.st, max_batch)
        elif self.st.magic != 0x3154534b504b or self.st.max_batch != max_batch:
            raise ValueError("not a statistics segment of this model")

    @staticmethod
    def required_size(uint32_t max_batch):
        return kp_stats_size(max_batch)

    @property
    def segment(self):
        return self.seg

    def snapshot(self):
        """Totals, and {batch size: (executions, compute ns)} for the sizes that ran."""
        st = self.st
        by_size = {}
        for i in range(st.max_batch + 1):
            if st.by_size[i].count:
                by_size[i] = (st.by_size[i].count, st.by_size[i].infer_ns)
        return {
            "success_count": st.success_count, "success_ns": st.success_ns,
            "fail_count": st.fail_count, "fail_ns": st.fail_ns,
            "queue_ns": st.queue_ns, "infer_ns": st.infer_ns,
            "inference_count": st.inference_count, "execution_count": st.execution_count,
            "last_inference_ms": st.last_inference_ms, "by_size": by_size,
        }


cdef class Lane:
    """One lane: a ring of `nslots` batch slots of `max_batch` rows of every tensor."""

    def __cinit__(self, Segment seg, Doorbell bell, uint32_t nslots, uint32_t max_batch, row_bytes,
                  bint init=False):
        cdef uint64_t rb[32]
        n = len(row_bytes)
        if n == 0 or n > KP_MAX_TENSORS:
            raise ValueError(f"a lane holds 1 to {KP_MAX_TENSORS} tensors, got {n}")
        for i in range(n):
            v = int(row_bytes[i])
            if v < 0:
                raise ValueError("negative row size")
            rb[i] = v
        if kp_lane_layout(&self.layout, nslots, max_batch, n, rb) != KP_OK:
            raise ValueError("lane layout out of range")
        if <uint64_t>seg.size < self.layout.total_size:
            raise ValueError(f"segment of {seg.size} bytes is smaller than the lane ({self.layout.total_size})")
        self.seg = seg
        self.bell = bell
        self.h = <kp_lane_hdr *>seg.base
        if init:
            kp_lane_init(self.h, &self.layout)
        elif not kp_lane_matches(self.h, &self.layout, seg.size):
            raise ValueError("lane header does not match its announced layout")
        self.spin.pause_iters = 2000
        self.spin.yield_ns = 50000

    @staticmethod
    def required_size(uint32_t nslots, uint32_t max_batch, row_bytes):
        cdef kp_lane_hdr tmp
        cdef uint64_t rb[32]
        n = len(row_bytes)
        if n == 0 or n > KP_MAX_TENSORS:
            raise ValueError(f"a lane holds 1 to {KP_MAX_TENSORS} tensors, got {n}")
        for i in range(n):
            rb[i] = int(row_bytes[i])
        if kp_lane_layout(&tmp, nslots, max_batch, n, rb) != KP_OK:
            raise ValueError("lane layout out of range")
        return tmp.total_size

    @property
    def segment(self):
        return self.seg

    @property
    def nslots(self):
        return self.layout.nslots

    @property
    def max_batch(self):
        return self.layout.max_batch

    def set_spin(self, uint32_t pause_iters, double yield_seconds):
        """How long a waiting client stays awake before it sleeps (pauses, then yields)."""
        self.spin.pause_iters = pause_iters
        self.spin.yield_ns = <uint64_t>(max(0.0, yield_seconds) * 1e9)

    def tensor_offset(self, uint64_t seq, uint32_t tensor):
        """Byte offset in the segment of `tensor`'s row 0 in the slot serving `seq`."""
        if tensor >= self.layout.ntensors:
            raise IndexError("tensor index out of range")
        return (self.layout.data_off + (seq % self.layout.nslots) * self.layout.slot_data_stride
                + self.layout.tensor_off[tensor])

    def slot_offsets(self, uint32_t slot):
        """Byte offsets of every tensor's row 0 in slot `slot`."""
        if slot >= self.layout.nslots:
            raise IndexError("slot index out of range")
        base = self.layout.data_off + slot * self.layout.slot_data_stride
        return [base + self.layout.tensor_off[i] for i in range(self.layout.ntensors)]

    # ---- client side ----

    def claim(self, uint32_t nrows, uint32_t owner, double timeout, double queue_timeout=0.0):
        """Claim `nrows` consecutive rows of the open slot; returns (seq, row). `queue_timeout` (0:
        none) is how long the request may wait for its batch to be taken before it expires unrun."""
        cdef uint64_t seq = 0
        cdef uint32_t row = 0
        cdef int rc
        cdef uint64_t deadline = _deadline(timeout)
        cdef uint64_t qt = <uint64_t>(min(max(queue_timeout, 0.0), 1e8) * 1e9)
        with nogil:
            rc = kp_claim(self.h, self.bell.db, nrows, owner, deadline, qt, &self.spin, &seq, &row)
        if rc != KP_OK:
            _raise(rc)
        return seq, row

    def commit(self, uint64_t seq, uint32_t row, uint32_t nrows, uint32_t owner):
        cdef int rc = kp_commit(self.h, self.bell.db, seq, row, nrows, owner)
        if rc != KP_OK:
            _raise(rc)

    def wait(self, uint64_t seq, double timeout, uint32_t row=0):
        """Wait for the batch holding `seq`; returns its status (0 ok, else the backend failed).
        `row` is the request's first row: LaneExpired if it timed out in the queue."""
        cdef int rc
        cdef uint64_t deadline = _deadline(timeout)
        with nogil:
            rc = kp_wait_done(self.h, seq, row, deadline, &self.spin)
        if rc < 0:
            _raise(rc)
        return rc

    def set_queue_level(self, uint32_t level):
        """Count this lane's requests against priority level `level`'s own queue (0: the model's). Set by
        the server before anyone claims in the lane."""
        if level > 64:
            raise ValueError("a queue level is 0..64")
        self.h.qlevel = level

    def taken(self, uint64_t seq):
        """Whether a worker has taken the batch serving `seq` (it runs now, or has run)."""
        return bool(kp_taken(self.h, seq))

    def commit_and_wait(self, uint64_t seq, uint32_t row, uint32_t nrows, uint32_t owner, double timeout):
        """commit() then wait(), in one call: the common path of a request."""
        cdef int rc
        cdef uint64_t deadline = _deadline(timeout)
        with nogil:
            rc = kp_commit(self.h, self.bell.db, seq, row, nrows, owner)
            if rc == KP_OK:
                rc = kp_wait_done(self.h, seq, row, deadline, &self.spin)
        if rc < 0:
            _raise(rc)
        return rc

    def release(self, uint64_t seq, uint32_t row, uint32_t nrows, uint32_t owner):
        cdef int rc = kp_release(self.h, self.bell.db, seq, row, nrows, owner)
        if rc != KP_OK:
            _raise(rc)

    def error_message(self, uint64_t seq):
        cdef kp_slot_hdr *s = kp_slot(self.h, seq)
        cdef bytes raw = s.errmsg[:KP_ERRMSG_BYTES - 1]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    # ---- server side ----

    def reclaim(self, uint32_t owner):
        """Give back every row a gone client held; returns how many requests it had."""
        return kp_reclaim_owner(self.h, self.bell.db, owner)

    def idle(self):
        """No slot holds a claim, a batch or an unreleased row (retire the lane first)."""
        return bool(kp_lane_idle(self.h))

    def seal(self):
        """Server side, when the lane is dropped or its worker died: no claim can land any more, and
        the queue places of requests no worker will take are given back."""
        kp_lane_seal(self.h, self.bell.db)

    def set_status(self, uint32_t status):
        if status not in (KP_LANE_LIVE, KP_LANE_RETIRED, KP_LANE_DEAD):
            raise ValueError("unknown lane status")
        kp_lane_set_status(self.h, status)

    @property
    def status(self):
        return self.h.status

    def counters(self):
        c = self.h.counters
        return {
            "claims": c.claims, "batches": c.batches, "rows": c.rows,
            "client_sleeps": c.client_sleeps, "worker_sleeps": c.worker_sleeps,
            "commit_timeouts": c.commit_timeouts, "full_waits": c.full_waits,
            "abandoned_rows": c.abandoned_rows, "failed_batches": c.failed_batches,
            "expired_requests": c.expired_requests, "cancelled_requests": c.cancelled_requests,
        }

    # ---- worker side ----

    def complete(self, uint64_t seq, int32_t status=0, str message="", StatsBlock stats=None,
                 uint64_t infer_ns=0, uint32_t samples=0):
        """Publish the batch's outputs (status 0) or its failure, wake its clients, and add it to
        `stats` (its requests' queue and end-to-end times, and `infer_ns` of compute). `samples`: the
        rows that really ran, for a request that claimed a whole slot for itself (0: the rows claimed)."""
        if status < 0:
            raise ValueError("a batch status is 0 (ok) or positive (failed)")
        cdef bytes msg = message.encode("utf-8", "replace")[:KP_ERRMSG_BYTES - 1]
        kp_complete(self.h, seq, status, msg, stats.st if stats is not None else NULL, infer_ns, samples)


cdef class FencedMapping:
    """A client's shared-memory object mapped shared, for a framework to read and write in place (a
    worker binding a request's tensors to the client's registered region).

    The client may truncate its object at any time. A SIGBUS inside this mapping, on any thread, swaps the
    whole mapping for private anonymous pages and sets `faulted` (kp_guard.h), so the process survives and
    the run it happened in finishes on meaningless bytes: check `intact()` before a run and `faulted` after
    it, and fail the request when either says so. Takes ownership of `fd`."""

    cdef int fd
    cdef char *base
    cdef Py_ssize_t size
    cdef int slot
    cdef int exports

    def __cinit__(self, int fd, Py_ssize_t size):
        self.fd = -1
        self.base = NULL
        self.slot = -1
        self.exports = 0
        if size <= 0:
            close(fd)
            raise ValueError(f"a mapping of {size} bytes")
        if kp_guard_install() != 0:
            close(fd)
            raise OSError(errno, "cannot install the SIGBUS handler")
        cdef stat st
        if fstat(fd, &st) != 0 or st.st_size < size:
            close(fd)
            raise ValueError(f"the shared memory object is smaller than the {size} bytes registered")
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            err = errno
            close(fd)
            raise OSError(err, f"cannot map {size} bytes of shared memory: {strerror(err).decode()}")
        self.slot = kp_fenced_add(p, size)
        if self.slot < 0:
            munmap(p, size)
            close(fd)
            raise MemoryError("too many fenced mappings in this process")
        self.fd = fd
        self.base = <char *>p
        self.size = size

    @property
    def address(self):
        return <size_t>self.base

    @property
    def nbytes(self):
        return self.size

    @property
    def faulted(self):
        """A SIGBUS hit this mapping: its pages are no longer the client's."""
        return bool(kp_fenced_faulted(self.slot))

    def intact(self):
        """Not faulted, and the object still covers the whole mapping (checked with fstat)."""
        cdef stat st
        if self.base == NULL or kp_fenced_faulted(self.slot):
            return False
        return fstat(self.fd, &st) == 0 and st.st_size >= self.size

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.base == NULL:
            raise ValueError("mapping is closed")
        PyBuffer_FillInfo(buf, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __dealloc__(self):
        # Reached only when no view holds us (each view keeps a reference to its exporter).
        if self.base != NULL:
            kp_fenced_remove(self.slot)
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1


class SourceFault(Exception):
    """A guarded copy lost a page part way: the shared memory was truncated under it."""


def guarded_copy(dst, src):
    """Copy the bytes of buffer `src` into writable buffer `dst` (the same size, both contiguous), with
    a SIGBUS guard: memory that another process truncates meanwhile raises SourceFault instead of
    killing this process. Installs the process's SIGBUS handler on first use (earlier handlers still get
    every SIGBUS that is not from a guarded copy)."""
    cdef const unsigned char[::1] s = memoryview(src).cast("B")
    cdef unsigned char[::1] d = memoryview(dst).cast("B")
    cdef size_t n = s.shape[0]
    cdef int rc
    if <size_t>d.shape[0] != n:
        raise ValueError(f"guarded_copy: {d.shape[0]} bytes of room for {n}")
    if n == 0:
        return
    if kp_guard_install() != 0:
        raise OSError(errno, "cannot install the SIGBUS handler")
    with nogil:
        rc = kp_guarded_copy(&d[0], &s[0], n)
    if rc != 0:
        raise SourceFault("the shared memory was truncated while it was copied")


NONE = KP_NONE
CONTROL = KP_CONTROL


cdef class Scheduler:
    """A worker's choice among its lanes: strict priority levels (1 runs first), and within a level
    executions shared between classes (tenants) in proportion to their weights. Worker-private."""

    cdef kp_sched sc

    def __cinit__(self):
        memset(&self.sc, 0, sizeof(kp_sched))
        for i in range(64):
            self.sc.stride[i] = KP_STRIDE_ONE

    def set_lane(self, uint32_t index, uint32_t priority, uint32_t share_class, uint32_t weight):
        """Lane `index` (its place in the list given to next_batch) runs at `priority` and counts
        against `share_class`, whose weight is `weight` (1..1,000,000)."""
        if index >= 64 or share_class >= 64:
            raise ValueError("a worker schedules at most 64 lanes and 64 classes")
        if not 1 <= weight <= 1000000:
            raise ValueError("a weight is 1..1000000")
        self.sc.prio[index] = priority
        self.sc.cls[index] = share_class
        self.sc.stride[share_class] = KP_STRIDE_ONE // weight

    def passes(self):
        """Virtual time used by each class (for tests and status)."""
        return [self.sc.pass_[i] for i in range(64)]


def next_batch(list lanes, Doorbell bell, double window, uint32_t close_at, double commit_timeout,
               double max_wait, uint32_t pause_iters=2000, double idle_spin=0.0002, Scheduler sched=None):
    """The worker's wait for work across its lanes.

    Returns (lane_index, seq, nrows, live) for a taken batch whose rows are all committed (or
    abandoned after `commit_timeout`), where `live` counts the requests left to run (the others
    expired in the queue); NONE after `max_wait` seconds with nothing to run, or CONTROL when the
    server rang for a control message. With `sched`, the lane is chosen by its priority and share
    class among those with a batch ready; without, the first ready lane in list order.
    """
    cdef kp_lane_hdr *hs[64]
    cdef uint32_t n = len(lanes)
    if n > 64:
        raise ValueError("a worker serves at most 64 lanes")
    cdef Lane lane
    for i in range(n):
        lane = lanes[i]
        hs[i] = lane.h
    cdef kp_batch_policy p
    p.window_ns = <uint64_t>(max(0.0, window) * 1e9)
    p.close_at = close_at
    p.commit_timeout_ns = <uint64_t>(max(0.0, commit_timeout) * 1e9)
    p.max_wait_ns = <uint64_t>(max(0.0, max_wait) * 1e9)
    p.spin.pause_iters = pause_iters
    p.spin.yield_ns = <uint64_t>(max(0.0, idle_spin) * 1e9)
    cdef uint32_t li = 0
    cdef uint64_t seq = 0
    cdef uint32_t nrows = 0
    cdef uint32_t live = 0
    cdef int rc
    cdef kp_sched *sp = &sched.sc if sched is not None else NULL
    with nogil:
        rc = kp_next_batch(hs, n, bell.db, &p, sp, &li, &seq, &nrows, &live)
    if rc == KP_OK:
        return (li, seq, nrows, live)
    return rc
