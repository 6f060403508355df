# C declarations of the lane protocol (include/kp_lane.h) for Cython.
from libc.stdint cimport uint32_t, uint64_t, int32_t


cdef extern from "kp_lane.h" nogil:
    enum:
        KP_MAX_TENSORS
        KP_ERRMSG_BYTES
        KP_OK
        KP_E_TIMEOUT
        KP_E_DEAD
        KP_E_ABANDONED
        KP_E_INVALID
        KP_E_RETIRED
        KP_E_FULL
        KP_E_EXPIRED
        KP_NONE
        KP_STRIDE_ONE
        KP_CONTROL
        KP_LANE_LIVE
        KP_LANE_RETIRED
        KP_LANE_DEAD

    ctypedef struct kp_counters:
        uint64_t claims
        uint64_t batches
        uint64_t rows
        uint64_t client_sleeps
        uint64_t worker_sleeps
        uint64_t commit_timeouts
        uint64_t full_waits
        uint64_t abandoned_rows
        uint64_t failed_batches
        uint64_t expired_requests
        uint64_t cancelled_requests

    ctypedef struct kp_lane_hdr:
        uint64_t magic
        uint32_t nslots
        uint32_t max_batch
        uint32_t ntensors
        uint64_t total_size
        uint64_t data_off
        uint64_t slot_data_stride
        uint64_t row_bytes[32]
        uint64_t tensor_off[32]
        uint32_t status
        uint32_t qlevel
        kp_counters counters

    ctypedef struct kp_slot_hdr:
        int32_t batch_status
        char errmsg[240]

    ctypedef struct kp_doorbell:
        uint64_t magic
        uint64_t queued
        uint32_t max_queue
        uint64_t rejected
        uint64_t level_queued[64]
        uint32_t level_max[64]

    ctypedef struct kp_spin:
        uint32_t pause_iters
        uint64_t yield_ns

    ctypedef struct kp_batch_policy:
        uint64_t window_ns
        uint32_t close_at
        uint64_t commit_timeout_ns
        uint64_t max_wait_ns
        kp_spin spin

    ctypedef struct kp_sched:
        uint32_t prio[64]
        uint32_t cls[64]
        uint64_t stride[64]
        uint64_t pass_ "pass"[64]

    uint64_t kp_now_ns()
    int kp_lane_layout(kp_lane_hdr *h, uint32_t nslots, uint32_t max_batch, uint32_t ntensors,
                       const uint64_t *row_bytes)
    void kp_lane_init(kp_lane_hdr *h, const kp_lane_hdr *layout)
    int kp_lane_matches(const kp_lane_hdr *h, const kp_lane_hdr *expected, uint64_t mapped_size)
    kp_slot_hdr *kp_slot(kp_lane_hdr *h, uint64_t seq)
    void kp_doorbell_init(kp_doorbell *d)
    void kp_ring(kp_doorbell *d)
    void kp_ring_control(kp_doorbell *d)
    int kp_claim(kp_lane_hdr *h, kp_doorbell *d, uint32_t n, uint32_t owner, uint64_t deadline_ns,
                 uint64_t queue_timeout_ns, const kp_spin *spin, uint64_t *seq_out, uint32_t *row_out)
    int kp_commit(kp_lane_hdr *h, kp_doorbell *d, uint64_t seq, uint32_t row, uint32_t n, uint32_t owner)
    int kp_wait_done(kp_lane_hdr *h, uint64_t seq, uint32_t row, uint64_t deadline_ns, const kp_spin *spin)
    int kp_release(kp_lane_hdr *h, kp_doorbell *d, uint64_t seq, uint32_t row, uint32_t n, uint32_t owner)
    int kp_lane_idle(kp_lane_hdr *h)
    int kp_taken(kp_lane_hdr *h, uint64_t seq)
    uint32_t kp_reclaim_owner(kp_lane_hdr *h, kp_doorbell *d, uint32_t owner)
    int kp_next_batch(kp_lane_hdr **lanes, uint32_t nlanes, kp_doorbell *d, const kp_batch_policy *p,
                      kp_sched *sched, uint32_t *lane_out, uint64_t *seq_out, uint32_t *nrows_out, uint32_t *live_out)
    void kp_lane_seal(kp_lane_hdr *h, kp_doorbell *d)
    ctypedef struct kp_size_stat:
        uint64_t count
        uint64_t infer_ns

    ctypedef struct kp_stats:
        uint64_t magic
        uint32_t max_batch
        uint64_t success_count
        uint64_t success_ns
        uint64_t fail_count
        uint64_t fail_ns
        uint64_t queue_ns
        uint64_t infer_ns
        uint64_t inference_count
        uint64_t execution_count
        uint64_t last_inference_ms
        kp_size_stat *by_size

    uint64_t kp_stats_size(uint32_t max_batch)
    void kp_stats_init(kp_stats *st, uint32_t max_batch)
    void kp_complete(kp_lane_hdr *h, uint64_t seq, int32_t status, const char *errmsg, kp_stats *st,
                     uint64_t infer_ns, uint32_t samples)
    void kp_lane_set_status(kp_lane_hdr *h, uint32_t status)


cdef class Segment:
    cdef readonly int fd
    cdef readonly Py_ssize_t size
    cdef char *base
    cdef int exports
    cdef readonly bint writable


cdef class Doorbell:
    cdef Segment seg
    cdef kp_doorbell *db


cdef class StatsBlock:
    cdef Segment seg
    cdef kp_stats *st


cdef class Lane:
    cdef Segment seg
    cdef Doorbell bell
    cdef kp_lane_hdr *h
    cdef kp_lane_hdr layout
    cdef kp_spin spin

cdef extern from "kp_guard.h" nogil:
    int kp_guard_install()
    int kp_guarded_copy(void *dst, const void *src, size_t n)
    int kp_fenced_add(void *start, size_t len)
    void kp_fenced_remove(int i)
    int kp_fenced_faulted(int i)
