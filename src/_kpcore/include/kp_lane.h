/* Lanes of batch slots: the lock-free claim / commit / take / done / release protocol.
 *
 * A lane is one shared segment: a header, `nslots` slot headers and `nslots` slot data areas. A slot's
 * data area holds `max_batch` contiguous rows of every tensor (inputs, then outputs), so a taken
 * slot is the batch tensor the backend reads. Where that memory lives (host shared memory, pinned,
 * device) is not this file's business: it only ever touches headers.
 *
 * Sequence numbers: the lane hands out slots in order of a 64-bit sequence q; slot q % nslots serves
 * q, and its `word` carries q's low 32 bits as the generation. A slot is reset for q + nslots only
 * when every row of q has been released and the worker has finished it, so a stale client (one
 * holding an old q) can never match a reused slot.
 *
 * Row words: (owner << 32) | (generation & 0xffffff) << 8 | state, on the first row of each request;
 * `row_len` holds the request's row count. Owner ids are never reused and every row CAS compares the
 * generation too, so a compare-and-swap cannot hit a row of a later use of the slot, even by the same
 * owner (a client stalled between its checks and its CAS).
 *
 * No pointers and no Python objects live in the segment; every count read from it is clamped.
 */
#ifndef KP_LANE_H
#define KP_LANE_H

#include <string.h>

#include "kp_atomic.h"

#define KP_LANE_MAGIC 0x314e414c504bULL /* "KPLAN1" */
#define KP_DOORBELL_MAGIC 0x3142444c504bULL
#define KP_LAYOUT_VERSION 1u
#define KP_MAX_TENSORS 32
#define KP_ERRMSG_BYTES 240
#define KP_CLOSED_BIT 0x80000000ull
#define KP_COUNT_MASK 0x1ffffull /* rows claimed: bits 0..16 */
#define KP_NREQ_SHIFT 17         /* requests claimed: bits 17..30 */
#define KP_NREQ_MAX 0x3fffu
#define KP_DONE_UNIT 0x80000000u /* `released` when the slot is complete (see kp_add_released) */
#define KP_MAX_PREFERRED 8
#define KP_MAX_QLEVELS 64 /* priority levels that may have a queue of their own */

/* return codes (negative: failures a caller maps to errors) */
#define KP_OK 0
#define KP_E_TIMEOUT (-1)
#define KP_E_DEAD (-2)      /* lane's worker is gone or the lane was closed */
#define KP_E_ABANDONED (-3) /* the worker gave up waiting for this request's commit */
#define KP_E_INVALID (-4)   /* bad argument (row range, size) */
#define KP_E_RETIRED (-5)   /* the lane takes no new claims: ask the server for a new one */
#define KP_E_FULL (-6)      /* the model's queue is full (max_queue_size) */
#define KP_E_EXPIRED (-7)   /* the request waited past its queue timeout and was not run */
#define KP_NONE 1           /* next_batch: nothing to run before max_wait */
#define KP_CONTROL 2        /* next_batch: the server rang for a control message */

enum {
    KP_ROW_EMPTY = 0,
    KP_ROW_CLAIMED = 1,
    KP_ROW_COMMITTED = 2,
    KP_ROW_ABANDONED = 3,
    KP_ROW_RELEASED = 4,
    KP_ROW_EXPIRED = 5, /* past its queue deadline when its batch was taken: its result is never delivered */
    KP_ROW_CANCELLED = 6 /* released (cancelled) before its batch was taken: not run, not counted as executed */
};
enum { KP_SLOT_OPEN = 0, KP_SLOT_TAKEN = 1, KP_SLOT_DONE = 2 };
enum { KP_LANE_LIVE = 0, KP_LANE_RETIRED = 1, KP_LANE_DEAD = 2 };

typedef struct {
    kp_a64 claims;
    kp_a64 batches;
    kp_a64 rows;
    kp_a64 client_sleeps;
    kp_a64 worker_sleeps;
    kp_a64 commit_timeouts;
    kp_a64 full_waits;
    kp_a64 abandoned_rows;
    kp_a64 failed_batches;
    kp_a64 expired_requests;
    kp_a64 cancelled_requests; /* released before their batch was taken (see KP_ROW_CANCELLED) */
} kp_counters;

typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t nslots;
    uint32_t max_batch;
    uint32_t ntensors;
    uint64_t total_size;
    uint64_t slot_hdr_off;
    uint64_t slot_hdr_stride;
    uint64_t data_off;
    uint64_t slot_data_stride;
    uint64_t row_bytes[KP_MAX_TENSORS];
    uint64_t tensor_off[KP_MAX_TENSORS]; /* within one slot's data area */
    _Alignas(64) kp_a64 open_seq;        /* the slot claimers fill */
    _Alignas(64) kp_a64 run_seq;         /* the next slot a worker takes */
    _Alignas(64) kp_a32 free_seq;        /* futex: bumped whenever a slot is reset */
    kp_a32 free_waiters;
    kp_a32 status;
    kp_a64 avg_run_ns; /* moving average of the backend's run time per batch (waiters size their spin by it) */
    uint32_t qlevel;   /* 0: requests count against the model's queue; L: against level L's own (set by the server) */
    _Alignas(64) kp_counters counters;
} kp_lane_hdr;

typedef struct {
    kp_a64 word; /* gen:32 | closed:1 | count:31 */
    kp_a64 first_claim_ns;
    kp_a32 committed; /* rows committed or abandoned */
    kp_a32 released;  /* rows released or abandoned, + (KP_DONE_UNIT - nrows) when the worker is done */
    kp_a32 state;     /* futex: OPEN, TAKEN, DONE */
    kp_a32 waiters;
    uint32_t nrows; /* rows in the batch, set when taken */
    int32_t batch_status;
    uint64_t taken_ns; /* when the worker took the batch */
    char errmsg[KP_ERRMSG_BYTES];
    /* followed by max_batch x kp_a64 row words, max_batch x uint64_t claim_ns, max_batch x uint64_t
     * expire_ns (queue deadline, 0 = none), max_batch x uint32_t row_len */
} kp_slot_hdr;

typedef struct {
    uint64_t magic;
    _Alignas(64) kp_a32 bell; /* futex: bumped by every commit and control message */
    kp_a32 sleepers;
    kp_a32 control;
    kp_a32 status;
    _Alignas(64) kp_a64 queued; /* requests claimed in any lane of the model and not yet taken */
    kp_a32 max_queue;           /* 0: unbounded; set by the server from the queue policy */
    kp_a64 rejected;            /* claims refused because the queue was full */
    /* priority levels with a queue policy of their own (priority_queue_policy): their lanes count here */
    _Alignas(64) kp_a64 level_queued[KP_MAX_QLEVELS];
    kp_a32 level_max[KP_MAX_QLEVELS]; /* 0: unbounded */
} kp_doorbell;
_Static_assert(sizeof(kp_doorbell) <= 4096, "a doorbell fits its 4 KiB segment");

typedef struct {
    uint32_t pause_iters; /* busy pauses before yielding (a few microseconds) */
    uint64_t yield_ns;    /* then sched_yield() until this long has passed, then sleep */
} kp_spin;

typedef struct {
    uint64_t window_ns;
    uint32_t close_at; /* close as soon as this many rows are claimed (largest preferred size, or max) */
    uint64_t commit_timeout_ns;
    uint64_t max_wait_ns;
    kp_spin spin;
} kp_batch_policy;

/* ---- layout ---------------------------------------------------------------------------------- */

static inline uint64_t kp_round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* Fill the layout fields of `h` (not yet in shared memory). Returns 0, or KP_E_INVALID when the
 * numbers overflow or are out of range. */
static inline int kp_lane_layout(kp_lane_hdr *h, uint32_t nslots, uint32_t max_batch, uint32_t ntensors,
                                 const uint64_t *row_bytes) {
    if (nslots == 0 || nslots > 4096 || max_batch == 0 || max_batch > 65536 || ntensors == 0 ||
        ntensors > KP_MAX_TENSORS)
        return KP_E_INVALID;
    memset(h, 0, sizeof(*h));
    h->magic = KP_LANE_MAGIC;
    h->layout_version = KP_LAYOUT_VERSION;
    h->nslots = nslots;
    h->max_batch = max_batch;
    h->ntensors = ntensors;
    h->slot_hdr_off = kp_round_up(sizeof(kp_lane_hdr), 64);
    h->slot_hdr_stride = kp_round_up(sizeof(kp_slot_hdr) + (uint64_t)max_batch * 28u, 64);
    h->data_off = kp_round_up(h->slot_hdr_off + (uint64_t)nslots * h->slot_hdr_stride, 4096);
    uint64_t off = 0;
    for (uint32_t i = 0; i < ntensors; i++) {
        uint64_t rb = row_bytes[i];
        if (rb > (1ull << 40)) return KP_E_INVALID;
        uint64_t block = rb * max_batch; /* < 2^57: no overflow */
        h->row_bytes[i] = rb;
        h->tensor_off[i] = off;
        off = kp_round_up(off + block, 64);
        if (off > (1ull << 58)) return KP_E_INVALID;
    }
    h->slot_data_stride = kp_round_up(off == 0 ? 64 : off, 4096);
    if (h->slot_data_stride > (1ull << 58) / nslots) return KP_E_INVALID;
    h->total_size = h->data_off + (uint64_t)nslots * h->slot_data_stride;
    return KP_OK;
}

static inline kp_slot_hdr *kp_slot(kp_lane_hdr *h, uint64_t seq) {
    return (kp_slot_hdr *)((char *)h + h->slot_hdr_off + (seq % h->nslots) * h->slot_hdr_stride);
}
static inline kp_a64 *kp_row_words(kp_lane_hdr *h, kp_slot_hdr *s) {
    (void)h;
    return (kp_a64 *)((char *)s + sizeof(kp_slot_hdr));
}
static inline uint64_t *kp_claim_times(kp_lane_hdr *h, kp_slot_hdr *s) {
    return (uint64_t *)((char *)s + sizeof(kp_slot_hdr) + (uint64_t)h->max_batch * 8u);
}
static inline uint64_t *kp_expiries(kp_lane_hdr *h, kp_slot_hdr *s) {
    return (uint64_t *)((char *)s + sizeof(kp_slot_hdr) + (uint64_t)h->max_batch * 16u);
}
static inline uint32_t *kp_row_lens(kp_lane_hdr *h, kp_slot_hdr *s) {
    return (uint32_t *)((char *)s + sizeof(kp_slot_hdr) + (uint64_t)h->max_batch * 24u);
}
static inline uint32_t kp_gen(uint64_t w) { return (uint32_t)(w >> 32); }
static inline uint32_t kp_count(uint64_t w) { return (uint32_t)(w & KP_COUNT_MASK); }
static inline uint32_t kp_nreq(uint64_t w) { return (uint32_t)((w >> KP_NREQ_SHIFT) & KP_NREQ_MAX); }
static inline int kp_closed(uint64_t w) { return (w & KP_CLOSED_BIT) != 0; }
static inline uint64_t kp_row(uint32_t owner, uint64_t seq, uint32_t state) {
    return ((uint64_t)owner << 32) | ((seq & 0xffffffull) << 8) | state;
}
static inline uint64_t kp_row_with_state(uint64_t w, uint32_t state) { return (w & ~0xffull) | state; }

/* Initialise a lane in shared memory; `layout` was filled by kp_lane_layout. */
static inline void kp_lane_init(kp_lane_hdr *h, const kp_lane_hdr *layout) {
    memcpy(h, layout, sizeof(*h));
    for (uint32_t i = 0; i < h->nslots; i++) {
        kp_slot_hdr *s = kp_slot(h, i);
        memset(s, 0, h->slot_hdr_stride);
        kp_a64 *rows = kp_row_words(h, s);
        for (uint32_t r = 0; r < h->max_batch; r++) atomic_store_explicit(&rows[r], kp_row(0, i, KP_ROW_EMPTY), KP_RELAXED);
        atomic_store_explicit(&s->word, (uint64_t)i << 32, KP_RELAXED);
    }
    atomic_store_explicit(&h->open_seq, 0, KP_RELAXED);
    atomic_store_explicit(&h->run_seq, 0, KP_RELAXED);
    atomic_store_explicit(&h->status, KP_LANE_LIVE, KP_RELEASE);
}

/* A mapped lane is usable only if its header agrees with the layout its mapper was told. */
static inline int kp_lane_matches(const kp_lane_hdr *h, const kp_lane_hdr *expected, uint64_t mapped_size) {
    if (h->magic != KP_LANE_MAGIC || h->layout_version != KP_LAYOUT_VERSION) return 0;
    if (expected->total_size > mapped_size) return 0;
    return h->nslots == expected->nslots && h->max_batch == expected->max_batch &&
           h->ntensors == expected->ntensors && h->total_size == expected->total_size &&
           h->slot_hdr_off == expected->slot_hdr_off && h->slot_hdr_stride == expected->slot_hdr_stride &&
           h->data_off == expected->data_off && h->slot_data_stride == expected->slot_data_stride &&
           memcmp(h->row_bytes, expected->row_bytes, sizeof(h->row_bytes)) == 0 &&
           memcmp(h->tensor_off, expected->tensor_off, sizeof(h->tensor_off)) == 0;
}

/* ---- waiting ------------------------------------------------------------------------------------ */

/* Wait until *word != seen, or *status != 0, or the deadline. Spins first (pause, then yield), then
 * sleeps on the futex in slices so a status change is noticed even without a wake. `waiters` is
 * incremented while asleep so wakers can skip the syscall when nobody sleeps.
 * Returns KP_OK (changed), KP_E_TIMEOUT, or KP_E_DEAD. */
static inline int kp_wait_word(kp_a32 *word, uint32_t seen, kp_a32 *waiters, kp_a32 *status,
                               uint64_t deadline_ns, const kp_spin *spin, kp_a64 *sleep_counter) {
    for (uint32_t i = 0; i < spin->pause_iters; i++) {
        if (atomic_load_explicit(word, KP_ACQUIRE) != seen) return KP_OK;
        kp_cpu_relax();
    }
    uint64_t start = kp_now_ns();
    uint64_t yield_until = start + spin->yield_ns;
    for (;;) {
        if (atomic_load_explicit(word, KP_ACQUIRE) != seen) return KP_OK;
        if (status && atomic_load_explicit(status, KP_ACQUIRE) == KP_LANE_DEAD) return KP_E_DEAD;
        uint64_t now = kp_now_ns();
        if (now >= deadline_ns) return KP_E_TIMEOUT;
        if (now < yield_until) {
            sched_yield();
            continue;
        }
        /* sleep: announce, re-check (seq_cst pairs with the waker's bump-then-load), then wait */
        atomic_fetch_add_explicit(waiters, 1, KP_SEQ_CST);
        if (atomic_load_explicit(word, KP_SEQ_CST) == seen) {
            uint64_t left = deadline_ns - now;
            if (left > 50000000ull) left = 50000000ull; /* re-check status at least every 50 ms */
            if (sleep_counter) atomic_fetch_add_explicit(sleep_counter, 1, KP_RELAXED);
            kp_futex_wait(word, seen, left);
        }
        atomic_fetch_sub_explicit(waiters, 1, KP_SEQ_CST);
    }
}

static inline void kp_doorbell_init(kp_doorbell *d) {
    memset(d, 0, sizeof(*d));
    d->magic = KP_DOORBELL_MAGIC;
}

static inline void kp_ring(kp_doorbell *d) {
    atomic_fetch_add_explicit(&d->bell, 1, KP_SEQ_CST);
    if (atomic_load_explicit(&d->sleepers, KP_SEQ_CST) != 0) kp_futex_wake(&d->bell, 1);
}

static inline void kp_ring_control(kp_doorbell *d) {
    atomic_store_explicit(&d->control, 1, KP_SEQ_CST);
    atomic_fetch_add_explicit(&d->bell, 1, KP_SEQ_CST);
    kp_futex_wake_all(&d->bell);
}

/* ---- reset and release ---------------------------------------------------------------------------- */

static inline void kp_slot_reset(kp_lane_hdr *h, kp_slot_hdr *s) {
    uint32_t gen = kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE));
    uint32_t next = gen + h->nslots;
    kp_a64 *rows = kp_row_words(h, s);
    uint32_t *lens = kp_row_lens(h, s);
    uint64_t *claimed = kp_claim_times(h, s);
    uint64_t *expiries = kp_expiries(h, s);
    for (uint32_t r = 0; r < h->max_batch; r++) {
        atomic_store_explicit(&rows[r], kp_row(0, next, KP_ROW_EMPTY), KP_RELAXED);
        lens[r] = 0;
        claimed[r] = 0;
        expiries[r] = 0;
    }
    atomic_store_explicit(&s->first_claim_ns, 0, KP_RELAXED);
    atomic_store_explicit(&s->committed, 0, KP_RELAXED);
    atomic_store_explicit(&s->released, 0, KP_RELAXED);
    s->nrows = 0;
    s->batch_status = 0;
    s->taken_ns = 0;
    s->errmsg[0] = 0;
    atomic_store_explicit(&s->state, KP_SLOT_OPEN, KP_RELAXED);
    /* release: publishes every store above to the claimer that sees the new generation */
    atomic_store_explicit(&s->word, (uint64_t)next << 32, KP_RELEASE);
    atomic_fetch_add_explicit(&h->free_seq, 1, KP_SEQ_CST);
    if (atomic_load_explicit(&h->free_waiters, KP_SEQ_CST) != 0) kp_futex_wake_all(&h->free_seq);
}

/* Count `n` units as released; whoever completes the slot resets it. Every row adds its count once and
 * the worker, when done, adds KP_DONE_UNIT - nrows, so the sum reaches KP_DONE_UNIT exactly when all
 * have: a constant target, never a re-read of `nrows` (which a reset by another thread may clear). */
static inline void kp_add_released(kp_lane_hdr *h, kp_slot_hdr *s, uint32_t n) {
    uint32_t now = atomic_fetch_add_explicit(&s->released, n, KP_ACQ_REL) + n;
    if (now == KP_DONE_UNIT) kp_slot_reset(h, s);
}

/* The queue a lane's requests count against: its priority level's own (a level with a
 * priority_queue_policy), else the model's (default_queue_policy). */
static inline kp_a64 *kp_qcount(kp_lane_hdr *h, kp_doorbell *d) {
    uint32_t l = h->qlevel;
    return l >= 1 && l <= KP_MAX_QLEVELS ? &d->level_queued[l - 1] : &d->queued;
}

static inline uint32_t kp_qlimit(kp_lane_hdr *h, kp_doorbell *d) {
    uint32_t l = h->qlevel;
    return atomic_load_explicit(l >= 1 && l <= KP_MAX_QLEVELS ? &d->level_max[l - 1] : &d->max_queue, KP_RELAXED);
}

/* A request of slot `seq` left before its batch was taken (cancelled, or its client is gone): give its
 * queue place back. The take zeroes the slot's request count when it consumes it, so each place is
 * given back exactly once, by whichever comes first. */
static inline void kp_unqueue(kp_lane_hdr *h, kp_slot_hdr *s, kp_doorbell *d, uint64_t seq) {
    uint64_t w = atomic_load_explicit(&s->word, KP_ACQUIRE);
    while (kp_gen(w) == (uint32_t)seq && kp_nreq(w) != 0) {
        if (atomic_compare_exchange_weak_explicit(&s->word, &w, w - (1ull << KP_NREQ_SHIFT), KP_ACQ_REL, KP_ACQUIRE)) {
            if (kp_qlimit(h, d)) atomic_fetch_sub_explicit(kp_qcount(h, d), 1, KP_ACQ_REL);
            return;
        }
    }
}

/* ---- client side ---------------------------------------------------------------------------------- */

/* Claim `n` consecutive rows in the open slot. On success *seq and *row say where. `queue_timeout_ns`
 * (0: none) bounds how long the request may wait before its batch is taken; past it, the request is
 * not run (KP_E_EXPIRED at wait). With the model's max_queue set, a claim beyond it fails at once. */
static inline int kp_claim_rows(kp_lane_hdr *h, kp_doorbell *d, uint32_t n, uint32_t owner, uint64_t deadline_ns,
                                uint64_t queue_timeout_ns, const kp_spin *spin, uint64_t *seq_out,
                                uint32_t *row_out, int *counted) {
    for (;;) {
        uint32_t st = atomic_load_explicit(&h->status, KP_ACQUIRE);
        if (st == KP_LANE_DEAD) return KP_E_DEAD;
        if (st == KP_LANE_RETIRED) return KP_E_RETIRED;
        uint64_t q = atomic_load_explicit(&h->open_seq, KP_ACQUIRE);
        kp_slot_hdr *s = kp_slot(h, q);
        uint64_t w = atomic_load_explicit(&s->word, KP_ACQUIRE);
        if (kp_gen(w) != (uint32_t)q) {
            if (atomic_load_explicit(&h->open_seq, KP_ACQUIRE) != q) continue;
            /* every slot is busy: back-pressure until one is reset */
            uint32_t fs = atomic_load_explicit(&h->free_seq, KP_ACQUIRE);
            if (kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)) == (uint32_t)q) continue;
            atomic_fetch_add_explicit(&h->counters.full_waits, 1, KP_RELAXED);
            int rc = kp_wait_word(&h->free_seq, fs, &h->free_waiters, &h->status, deadline_ns, spin,
                                  &h->counters.client_sleeps);
            if (rc != KP_OK) return rc;
            continue;
        }
        uint32_t c = kp_count(w);
        if (kp_closed(w) || c + n > h->max_batch || kp_nreq(w) == KP_NREQ_MAX) {
            /* this request does not fit: seal the slot (the worker takes it now) and move on */
            if (!kp_closed(w) && !atomic_compare_exchange_weak_explicit(&s->word, &w, w | KP_CLOSED_BIT,
                                                                        KP_ACQ_REL, KP_ACQUIRE))
                continue;
            uint64_t expect = q;
            if (atomic_compare_exchange_strong_explicit(&h->open_seq, &expect, q + 1, KP_ACQ_REL, KP_ACQUIRE))
                kp_ring(d);
            continue;
        }
        uint64_t nw = w + n + (1ull << KP_NREQ_SHIFT);
        if (c + n == h->max_batch) nw |= KP_CLOSED_BIT;
        if (!atomic_compare_exchange_weak_explicit(&s->word, &w, nw, KP_ACQ_REL, KP_ACQUIRE)) continue;
        *counted = 1; /* the slot's request count now holds our queue place: the worker gives it back */
        uint64_t now = kp_now_ns();
        if (c == 0) {
            uint64_t zero = 0;
            atomic_compare_exchange_strong_explicit(&s->first_claim_ns, &zero, now, KP_RELAXED, KP_RELAXED);
        }
        kp_row_lens(h, s)[c] = n;
        kp_claim_times(h, s)[c] = now;
        kp_expiries(h, s)[c] = queue_timeout_ns ? now + queue_timeout_ns : 0;
        uint64_t empty = kp_row(0, q, KP_ROW_EMPTY);
        if (!atomic_compare_exchange_strong_explicit(&kp_row_words(h, s)[c], &empty,
                                                     kp_row(owner, q, KP_ROW_CLAIMED), KP_ACQ_REL, KP_ACQUIRE)) {
            *counted = 0; /* the worker already gave these rows up (only after a commit timeout): claim again */
            if (kp_qlimit(h, d)) atomic_fetch_add_explicit(kp_qcount(h, d), 1, KP_RELAXED); /* a new queue place */
            continue;
        }
        if (nw & KP_CLOSED_BIT) {
            uint64_t expect = q;
            atomic_compare_exchange_strong_explicit(&h->open_seq, &expect, q + 1, KP_ACQ_REL, KP_ACQUIRE);
        }
        if (atomic_load_explicit(&h->status, KP_SEQ_CST) != KP_LANE_LIVE) {
            /* the lane was retired (or died) while we claimed: the server may already consider it
             * idle, so give the rows back instead of using them */
            kp_a64 *rw = &kp_row_words(h, s)[c];
            uint64_t mine = kp_row(owner, q, KP_ROW_CLAIMED);
            if (atomic_compare_exchange_strong_explicit(rw, &mine, kp_row(owner, q, KP_ROW_ABANDONED), KP_ACQ_REL,
                                                        KP_ACQUIRE)) {
                kp_unqueue(h, s, d, q);
                atomic_fetch_add_explicit(&s->committed, n, KP_RELEASE);
                kp_add_released(h, s, n);
            }
            return atomic_load_explicit(&h->status, KP_ACQUIRE) == KP_LANE_DEAD ? KP_E_DEAD : KP_E_RETIRED;
        }
        atomic_fetch_add_explicit(&h->counters.claims, 1, KP_RELAXED);
        *seq_out = q;
        *row_out = c;
        return KP_OK;
    }
}

static inline int kp_claim(kp_lane_hdr *h, kp_doorbell *d, uint32_t n, uint32_t owner, uint64_t deadline_ns,
                           uint64_t queue_timeout_ns, const kp_spin *spin, uint64_t *seq_out, uint32_t *row_out) {
    if (n == 0 || n > h->max_batch || owner == 0) return KP_E_INVALID;
    uint32_t limit = kp_qlimit(h, d);
    kp_a64 *queued = kp_qcount(h, d);
    if (limit) {
        /* a queue place, given back by the worker when it takes the batch (or below on failure) */
        if (atomic_fetch_add_explicit(queued, 1, KP_ACQ_REL) >= limit) {
            atomic_fetch_sub_explicit(queued, 1, KP_ACQ_REL);
            atomic_fetch_add_explicit(&d->rejected, 1, KP_RELAXED);
            return KP_E_FULL;
        }
    }
    int counted = 0;
    int rc = kp_claim_rows(h, d, n, owner, deadline_ns, queue_timeout_ns, spin, seq_out, row_out, &counted);
    if (rc != KP_OK && limit && !counted) atomic_fetch_sub_explicit(queued, 1, KP_ACQ_REL);
    return rc;
}

static inline int kp_check_claim(kp_lane_hdr *h, uint64_t seq, uint32_t row, uint32_t n) {
    if (n == 0 || row >= h->max_batch || n > h->max_batch - row) return KP_E_INVALID;
    kp_slot_hdr *s = kp_slot(h, seq);
    if (kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)) != (uint32_t)seq) return KP_E_ABANDONED;
    if (kp_row_lens(h, s)[row] != n) return KP_E_INVALID; /* not the request that was claimed there */
    return KP_OK;
}

/* Publish the rows' inputs to the worker. */
static inline int kp_commit(kp_lane_hdr *h, kp_doorbell *d, uint64_t seq, uint32_t row, uint32_t n,
                            uint32_t owner) {
    int rc = kp_check_claim(h, seq, row, n);
    if (rc != KP_OK) return rc;
    kp_slot_hdr *s = kp_slot(h, seq);
    /* A batch that already ran did so without these rows (the worker waits for every row it does
     * not abandon, and abandoning makes the CAS below fail); checked first, since once we commit
     * the batch may finish at any moment. */
    if (atomic_load_explicit(&s->state, KP_ACQUIRE) == KP_SLOT_DONE) return KP_E_ABANDONED;
    uint64_t expect = kp_row(owner, seq, KP_ROW_CLAIMED);
    /* release: the input bytes written into the rows happen-before the worker's acquire of this word */
    if (!atomic_compare_exchange_strong_explicit(&kp_row_words(h, s)[row], &expect,
                                                 kp_row(owner, seq, KP_ROW_COMMITTED), KP_ACQ_REL, KP_ACQUIRE))
        return KP_E_ABANDONED;
    atomic_fetch_add_explicit(&s->committed, n, KP_RELEASE);
    kp_ring(d);
    return KP_OK;
}

/* Wait until the slot holding `seq` is done. Returns the batch status (0 ok, >0 backend failure) or
 * a negative KP_E_* code. */
static inline int kp_wait_done(kp_lane_hdr *h, uint64_t seq, uint32_t row, uint64_t deadline_ns,
                               const kp_spin *spin_in) {
    if (row >= h->max_batch) return KP_E_INVALID;
    kp_slot_hdr *s = kp_slot(h, seq);
    /* When batches take much longer than the spin budget, spinning only burns the CPU the worker
     * needs (2 cores shared by many clients): sleep at once, the wake-up is small beside the run. */
    kp_spin spin_local = *spin_in;
    if (atomic_load_explicit(&h->avg_run_ns, KP_RELAXED) > 4 * spin_local.yield_ns) {
        spin_local.pause_iters = 0;
        spin_local.yield_ns = 0;
    }
    const kp_spin *spin = &spin_local;
    for (;;) {
        if (kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)) != (uint32_t)seq) return KP_E_ABANDONED;
        uint32_t st = atomic_load_explicit(&s->state, KP_ACQUIRE);
        if (st == KP_SLOT_DONE) {
            int32_t status = s->batch_status;
            if ((atomic_load_explicit(&kp_row_words(h, s)[row], KP_ACQUIRE) & 0xff) == KP_ROW_EXPIRED)
                status = KP_E_EXPIRED;
            /* the slot may have been reset (our rows abandoned) between the two loads: check again */
            if (kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)) != (uint32_t)seq) return KP_E_ABANDONED;
            return status;
        }
        int rc = kp_wait_word(&s->state, st, &s->waiters, &h->status, deadline_ns, spin, &h->counters.client_sleeps);
        if (rc == KP_E_TIMEOUT || rc == KP_E_DEAD) return rc;
    }
}

/* Give the rows back: after reading outputs, or to cancel a claim that was never committed. */
static inline int kp_release(kp_lane_hdr *h, kp_doorbell *d, uint64_t seq, uint32_t row, uint32_t n, uint32_t owner) {
    int rc = kp_check_claim(h, seq, row, n);
    if (rc != KP_OK) return rc;
    kp_slot_hdr *s = kp_slot(h, seq);
    kp_a64 *rw = &kp_row_words(h, s)[row];
    uint64_t expect = kp_row(owner, seq, KP_ROW_COMMITTED);
    if (atomic_compare_exchange_strong_explicit(rw, &expect, kp_row(owner, seq, KP_ROW_RELEASED), KP_ACQ_REL,
                                                KP_ACQUIRE)) {
        kp_unqueue(h, s, d, seq); /* released before its batch was taken: it leaves the queue */
        kp_add_released(h, s, n);
        return KP_OK;
    }
    expect = kp_row(owner, seq, KP_ROW_EXPIRED);
    if (atomic_compare_exchange_strong_explicit(rw, &expect, kp_row(owner, seq, KP_ROW_RELEASED), KP_ACQ_REL,
                                                KP_ACQUIRE)) {
        kp_add_released(h, s, n);
        return KP_OK;
    }
    expect = kp_row(owner, seq, KP_ROW_CLAIMED);
    if (atomic_compare_exchange_strong_explicit(rw, &expect, kp_row(owner, seq, KP_ROW_ABANDONED), KP_ACQ_REL,
                                                KP_ACQUIRE)) {
        kp_unqueue(h, s, d, seq);
        atomic_fetch_add_explicit(&s->committed, n, KP_RELEASE);
        kp_ring(d);
        kp_add_released(h, s, n);
        return KP_OK;
    }
    return KP_E_ABANDONED;
}

/* Server side: no slot holds a claim, a batch or an unreleased row. Meaningful once the lane is
 * retired (no new claims can start). */
static inline int kp_lane_idle(kp_lane_hdr *h) {
    for (uint32_t i = 0; i < h->nslots; i++) {
        kp_slot_hdr *s = kp_slot(h, i);
        uint64_t w = atomic_load_explicit(&s->word, KP_SEQ_CST);
        if (kp_count(w) != 0 || kp_closed(w)) return 0;
        if (atomic_load_explicit(&s->state, KP_ACQUIRE) != KP_SLOT_OPEN) return 0;
    }
    return 1;
}

/* Server side, when a lane is dropped (after retiring it) or its worker died: seal every slot so no
 * claim can land any more, and give back the queue places of requests no worker will take. */
static inline void kp_lane_seal(kp_lane_hdr *h, kp_doorbell *d) {
    for (uint32_t i = 0; i < h->nslots; i++) {
        kp_slot_hdr *s = kp_slot(h, i);
        uint64_t w = atomic_load_explicit(&s->word, KP_ACQUIRE);
        while (!kp_closed(w) &&
               !atomic_compare_exchange_weak_explicit(&s->word, &w, w | KP_CLOSED_BIT, KP_ACQ_REL, KP_ACQUIRE)) {
        }
        if (kp_count(w) && atomic_load_explicit(&s->state, KP_ACQUIRE) == KP_SLOT_OPEN && kp_qlimit(h, d))
            atomic_fetch_sub_explicit(kp_qcount(h, d), kp_nreq(w), KP_ACQ_REL);
    }
}

/* Server side: give back every row a gone client held. Returns the number of requests reclaimed. */
static inline uint32_t kp_reclaim_owner(kp_lane_hdr *h, kp_doorbell *d, uint32_t owner) {
    uint32_t found = 0;
    for (uint32_t i = 0; i < h->nslots; i++) {
        kp_slot_hdr *s = kp_slot(h, i);
        kp_a64 *rows = kp_row_words(h, s);
        uint32_t *lens = kp_row_lens(h, s);
        for (uint32_t r = 0; r < h->max_batch; r++) {
            uint64_t w = atomic_load_explicit(&rows[r], KP_ACQUIRE);
            if ((uint32_t)(w >> 32) != owner) continue;
            uint32_t n = lens[r];
            if (n == 0 || n > h->max_batch - r) n = 1;
            uint32_t st = (uint32_t)(w & 0xff);
            if (st == KP_ROW_CLAIMED &&
                atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_ABANDONED), KP_ACQ_REL,
                                                        KP_ACQUIRE)) {
                kp_unqueue(h, s, d, kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)));
                atomic_fetch_add_explicit(&s->committed, n, KP_RELEASE);
                atomic_fetch_add_explicit(&h->counters.abandoned_rows, n, KP_RELAXED);
                kp_ring(d);
                kp_add_released(h, s, n);
                found++;
            } else if ((st == KP_ROW_COMMITTED || st == KP_ROW_EXPIRED) &&
                       atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_RELEASED),
                                                               KP_ACQ_REL, KP_ACQUIRE)) {
                kp_unqueue(h, s, d, kp_gen(atomic_load_explicit(&s->word, KP_ACQUIRE)));
                kp_add_released(h, s, n);
                found++;
            }
        }
    }
    return found;
}

/* ---- worker side ------------------------------------------------------------------------------------ */

/* After the commit timeout: give up on every row of the batch that was never committed. */
static inline void kp_abandon_uncommitted(kp_lane_hdr *h, kp_slot_hdr *s, uint32_t c) {
    kp_a64 *rows = kp_row_words(h, s);
    uint32_t *lens = kp_row_lens(h, s);
    uint32_t r = 0;
    while (r < c) {
        uint64_t w = atomic_load_explicit(&rows[r], KP_ACQUIRE);
        uint32_t st = (uint32_t)(w & 0xff);
        uint32_t n = lens[r];
        if (n == 0 || n > c - r) n = 1;
        if (st == KP_ROW_EMPTY) {
            if (!atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_ABANDONED), KP_ACQ_REL,
                                                         KP_ACQUIRE))
                continue; /* the claimer just marked it: look again */
            n = 1;
        } else if (st == KP_ROW_CLAIMED) {
            if (!atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_ABANDONED),
                                                         KP_ACQ_REL, KP_ACQUIRE))
                continue;
        } else {
            r += n;
            continue;
        }
        atomic_fetch_add_explicit(&s->committed, n, KP_RELEASE);
        atomic_fetch_add_explicit(&h->counters.abandoned_rows, n, KP_RELAXED);
        kp_add_released(h, s, n); /* cannot complete the slot: the worker's unit is not in yet */
        r += n;
    }
}

/* Is the batch at run_seq of lane `h` ready by `policy` (full, at the close size, or its window
 * passed)? Notes the first claim's time when the worker first sees it; lowers *next_deadline while
 * the window is still open. */
static inline int kp_lane_ready(kp_lane_hdr *h, const kp_batch_policy *p, uint64_t now, uint64_t *next_deadline) {
    if (atomic_load_explicit(&h->status, KP_ACQUIRE) == KP_LANE_DEAD) return 0;
    uint64_t q = atomic_load_explicit(&h->run_seq, KP_ACQUIRE);
    kp_slot_hdr *s = kp_slot(h, q);
    uint64_t w = atomic_load_explicit(&s->word, KP_ACQUIRE);
    if (kp_gen(w) != (uint32_t)q || kp_count(w) == 0) return 0;
    if (kp_closed(w)) return 1;
    uint64_t fc = atomic_load_explicit(&s->first_claim_ns, KP_RELAXED);
    if (fc == 0) {
        uint64_t zero = 0;
        if (!atomic_compare_exchange_strong_explicit(&s->first_claim_ns, &zero, now, KP_RELAXED, KP_RELAXED))
            fc = zero;
        else
            fc = now;
    }
    uint32_t c = kp_count(w);
    /* a retired lane takes no more claims: waiting out the window would gain nothing */
    int ready = c >= p->close_at || c >= h->max_batch || now >= fc + p->window_ns ||
                atomic_load_explicit(&h->status, KP_ACQUIRE) == KP_LANE_RETIRED;
    if (!ready && fc + p->window_ns < *next_deadline) *next_deadline = fc + p->window_ns;
    return ready;
}

/* Has a worker taken the batch serving `seq` (it is running, or done)? */
static inline int kp_taken(kp_lane_hdr *h, uint64_t seq) {
    return atomic_load_explicit(&h->run_seq, KP_ACQUIRE) > seq;
}

/* Take the batch at run_seq of lane `h`, which kp_lane_ready found ready: close it, advance both
 * cursors. Returns 1 and fills *seq and *nrows when taken; 0 when another instance took it first. */
static inline int kp_take_ready(kp_lane_hdr *h, kp_doorbell *d, uint64_t now, uint64_t *seq_out,
                                uint32_t *nrows_out) {
    uint64_t q = atomic_load_explicit(&h->run_seq, KP_ACQUIRE);
    kp_slot_hdr *s = kp_slot(h, q);
    uint64_t w = atomic_load_explicit(&s->word, KP_ACQUIRE);
    if (kp_gen(w) != (uint32_t)q || kp_count(w) == 0) return 0;
    while (!kp_closed(w)) {
        if (atomic_compare_exchange_weak_explicit(&s->word, &w, w | KP_CLOSED_BIT, KP_ACQ_REL, KP_ACQUIRE)) break;
        if (kp_gen(w) != (uint32_t)q) return 0; /* taken and reused under us: never close a later batch */
    }
    uint64_t expect = q;
    atomic_compare_exchange_strong_explicit(&h->open_seq, &expect, q + 1, KP_ACQ_REL, KP_ACQUIRE);
    expect = q;
    if (!atomic_compare_exchange_strong_explicit(&h->run_seq, &expect, q + 1, KP_ACQ_REL, KP_ACQUIRE))
        return 0; /* another instance took it */
    /* closed: the row count is final; consume the request count (queue places) in the same CAS */
    w = atomic_load_explicit(&s->word, KP_ACQUIRE);
    while (!atomic_compare_exchange_weak_explicit(&s->word, &w, w & ~((uint64_t)KP_NREQ_MAX << KP_NREQ_SHIFT),
                                                  KP_ACQ_REL, KP_ACQUIRE)) {
    }
    uint32_t c = kp_count(w);
    if (c > h->max_batch) c = h->max_batch;
    if (kp_qlimit(h, d)) atomic_fetch_sub_explicit(kp_qcount(h, d), kp_nreq(w), KP_ACQ_REL);
    s->nrows = c;
    s->taken_ns = now;
    atomic_store_explicit(&s->state, KP_SLOT_TAKEN, KP_RELEASE);
    *seq_out = q;
    *nrows_out = c;
    return 1;
}

/* Take the batch at run_seq of lane `h` if it is ready by `policy`. */
static inline int kp_try_take(kp_lane_hdr *h, kp_doorbell *d, const kp_batch_policy *p, uint64_t now,
                              uint64_t *next_deadline, uint64_t *seq_out, uint32_t *nrows_out) {
    if (!kp_lane_ready(h, p, now, next_deadline)) return 0;
    return kp_take_ready(h, d, now, seq_out, nrows_out);
}

/* ---- scheduling across a worker's lanes ----------------------------------------------------------
 * A worker's lanes may belong to different priority levels and share classes (tenants). Among the
 * lanes with a ready batch the worker takes the one with the lowest priority number (1 = highest,
 * strict), and within a level the one whose class has used the least virtual time: each class's
 * `pass` grows by rows x `stride` (stride = KP_STRIDE_ONE / weight) when it runs, so backlogged
 * classes get executions in proportion to their weights (stride scheduling). A class with nothing
 * ready when another runs is brought up to that class's pass, so idle time is never saved up as
 * credit for a later burst. The state is the worker's own (it is not in shared memory: clients
 * cannot change their weight). */
#define KP_SCHED_MAX 64
#define KP_STRIDE_ONE (1ull << 20)

typedef struct {
    uint32_t prio[KP_SCHED_MAX];    /* per lane: priority level, lower runs first */
    uint32_t cls[KP_SCHED_MAX];     /* per lane: its share class (< KP_SCHED_MAX) */
    uint64_t stride[KP_SCHED_MAX];  /* per class: virtual time per row */
    uint64_t pass[KP_SCHED_MAX];    /* per class: virtual time used */
} kp_sched;

/* Pick and take the best ready batch; 1 when one was taken. */
static inline int kp_sched_take(kp_sched *sc, kp_lane_hdr **lanes, uint32_t nlanes, kp_doorbell *d,
                                const kp_batch_policy *p, uint64_t now, uint64_t *next_deadline, uint32_t *lane_out,
                                uint64_t *seq_out, uint32_t *nrows_out) {
    uint64_t ready = 0, ready_cls = 0;
    for (uint32_t i = 0; i < nlanes; i++) {
        if (kp_lane_ready(lanes[i], p, now, next_deadline)) {
            ready |= 1ull << i;
            ready_cls |= 1ull << (sc->cls[i] % KP_SCHED_MAX);
        }
    }
    while (ready) {
        uint32_t best = UINT32_MAX;
        for (uint32_t i = 0; i < nlanes; i++) {
            if (!(ready >> i & 1)) continue;
            if (best == UINT32_MAX || sc->prio[i] < sc->prio[best] ||
                (sc->prio[i] == sc->prio[best] &&
                 sc->pass[sc->cls[i] % KP_SCHED_MAX] < sc->pass[sc->cls[best] % KP_SCHED_MAX]))
                best = i;
        }
        ready &= ~(1ull << best);
        if (!kp_take_ready(lanes[best], d, now, seq_out, nrows_out)) continue;
        uint32_t c = sc->cls[best] % KP_SCHED_MAX;
        uint64_t base = sc->pass[c];
        for (uint32_t k = 0; k < KP_SCHED_MAX; k++) {
            if (!(ready_cls >> k & 1) && sc->pass[k] < base) sc->pass[k] = base;
        }
        sc->pass[c] = base + (uint64_t)(*nrows_out ? *nrows_out : 1) * sc->stride[c];
        *lane_out = best;
        return 1;
    }
    return 0;
}

/* Wait (spinning, then on the doorbell) until every row of the taken batch is committed or the commit
 * timeout passes; then abandon what is missing, and expire what waited past its queue deadline.
 * Returns how many requests are left to run. */
static inline uint32_t kp_await_commits(kp_lane_hdr *h, kp_doorbell *d, uint64_t seq, uint32_t c,
                                        const kp_batch_policy *p) {
    kp_slot_hdr *s = kp_slot(h, seq);
    uint64_t deadline = kp_now_ns() + p->commit_timeout_ns;
    while (atomic_load_explicit(&s->committed, KP_ACQUIRE) < c) {
        uint32_t bell = atomic_load_explicit(&d->bell, KP_ACQUIRE);
        if (atomic_load_explicit(&s->committed, KP_ACQUIRE) >= c) break;
        int rc = kp_wait_word(&d->bell, bell, &d->sleepers, NULL, deadline, &p->spin, &h->counters.worker_sleeps);
        if (rc == KP_E_TIMEOUT) {
            atomic_fetch_add_explicit(&h->counters.commit_timeouts, 1, KP_RELAXED);
            kp_abandon_uncommitted(h, s, c);
            break;
        }
    }
    atomic_thread_fence(KP_ACQUIRE); /* pairs with each committer's release: the input rows are visible */
    kp_a64 *rows = kp_row_words(h, s);
    uint32_t *lens = kp_row_lens(h, s);
    uint64_t *expiries = kp_expiries(h, s);
    uint64_t now = kp_now_ns();
    uint32_t live = 0;
    for (uint32_t r = 0; r < c;) {
        uint64_t w = atomic_load_explicit(&rows[r], KP_ACQUIRE);
        uint32_t n = lens[r];
        if (n == 0 || n > c - r) n = 1;
        uint32_t st = (uint32_t)(w & 0xff);
        if (st == KP_ROW_COMMITTED || st == KP_ROW_RELEASED) {
            uint64_t expiry = expiries[r];
            if (expiry && now > expiry && st == KP_ROW_COMMITTED &&
                atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_EXPIRED),
                                                        KP_ACQ_REL, KP_ACQUIRE)) {
                /* its client sees EXPIRED when done, then releases it as usual */
                atomic_fetch_add_explicit(&h->counters.expired_requests, 1, KP_RELAXED);
            } else if (st == KP_ROW_COMMITTED) {
                live++;
            } else if (atomic_compare_exchange_strong_explicit(&rows[r], &w, kp_row_with_state(w, KP_ROW_CANCELLED),
                                                               KP_ACQ_REL, KP_ACQUIRE)) {
                /* released before the take (its client cancelled): it has no result to wait for, so the
                 * batch runs without it (not live) and the statistics do not count it as executed */
                atomic_fetch_add_explicit(&h->counters.cancelled_requests, 1, KP_RELAXED);
            }
        }
        r += n;
    }
    return live;
}

/* The worker's wait: returns KP_OK with a taken, fully committed batch in (*lane_out, *seq_out,
 * *nrows_out); KP_NONE after max_wait with nothing to do; KP_CONTROL when the server rang for a
 * control message (the flag is cleared). */
static inline int kp_next_batch(kp_lane_hdr **lanes, uint32_t nlanes, kp_doorbell *d, const kp_batch_policy *p,
                                kp_sched *sched, uint32_t *lane_out, uint64_t *seq_out, uint32_t *nrows_out,
                                uint32_t *live_out) {
    uint64_t start = kp_now_ns();
    uint64_t give_up = start + p->max_wait_ns;
    uint64_t yield_until = start + p->spin.yield_ns;
    uint32_t pauses = 0;
    for (;;) {
        uint32_t bell = atomic_load_explicit(&d->bell, KP_SEQ_CST);
        if (atomic_exchange_explicit(&d->control, 0, KP_ACQ_REL) != 0) return KP_CONTROL;
        uint64_t now = kp_now_ns();
        uint64_t next_deadline = UINT64_MAX;
        uint32_t taken = UINT32_MAX;
        uint64_t q = 0;
        uint32_t c = 0;
        if (sched != NULL && nlanes <= KP_SCHED_MAX) {
            if (kp_sched_take(sched, lanes, nlanes, d, p, now, &next_deadline, &taken, &q, &c) == 0) taken = UINT32_MAX;
        } else {
            for (uint32_t i = 0; i < nlanes; i++) {
                if (kp_try_take(lanes[i], d, p, now, &next_deadline, &q, &c)) {
                    taken = i;
                    break;
                }
            }
        }
        if (taken != UINT32_MAX) {
            *live_out = kp_await_commits(lanes[taken], d, q, c, p);
            atomic_fetch_add_explicit(&lanes[taken]->counters.batches, 1, KP_RELAXED);
            atomic_fetch_add_explicit(&lanes[taken]->counters.rows, c, KP_RELAXED);
            *lane_out = taken;
            *seq_out = q;
            *nrows_out = c;
            return KP_OK;
        }
        if (now >= give_up) return KP_NONE;
        int soon = next_deadline != UINT64_MAX && next_deadline - now <= p->spin.yield_ns;
        if (now < yield_until || soon) {
            /* we were busy a moment ago, or a window closes within the spin budget: stay awake */
            if (pauses < p->spin.pause_iters) {
                pauses++;
                kp_cpu_relax();
            } else {
                sched_yield();
            }
            continue;
        }
        uint64_t until = next_deadline < give_up ? next_deadline : give_up;
        atomic_fetch_add_explicit(&d->sleepers, 1, KP_SEQ_CST);
        if (atomic_load_explicit(&d->bell, KP_SEQ_CST) == bell) {
            if (nlanes) atomic_fetch_add_explicit(&lanes[0]->counters.worker_sleeps, 1, KP_RELAXED);
            kp_futex_wait(&d->bell, bell, until - now);
        }
        atomic_fetch_sub_explicit(&d->sleepers, 1, KP_SEQ_CST);
    }
}

/* Statistics of one model, in a segment the server shares with its workers only (never with clients).
 * Durations follow Triton's meanings: per request, queue = claim to take, request = claim to done. */
typedef struct {
    kp_a64 count;
    kp_a64 infer_ns;
} kp_size_stat;

typedef struct {
    uint64_t magic;
    uint32_t max_batch;
    uint32_t _pad;
    kp_a64 success_count, success_ns;
    kp_a64 fail_count, fail_ns;
    kp_a64 queue_ns;
    kp_a64 infer_ns;       /* per request: the compute of the batch it was in */
    kp_a64 inference_count; /* samples (rows) of successful requests */
    kp_a64 execution_count;
    kp_a64 last_inference_ms;
    kp_size_stat by_size[]; /* [max_batch + 1], by batch size */
} kp_stats;

#define KP_STATS_MAGIC 0x3154534b504bULL

static inline uint64_t kp_stats_size(uint32_t max_batch) {
    return sizeof(kp_stats) + ((uint64_t)max_batch + 1) * sizeof(kp_size_stat);
}

static inline void kp_stats_init(kp_stats *st, uint32_t max_batch) {
    memset(st, 0, kp_stats_size(max_batch));
    st->magic = KP_STATS_MAGIC;
    st->max_batch = max_batch;
}

static inline uint64_t kp_wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

/* Add one finished batch to the statistics: walk its requests (first rows) and their claim times. */
static inline void kp_stats_record(kp_stats *st, kp_lane_hdr *h, kp_slot_hdr *s, int32_t status, uint64_t infer_ns,
                                   uint64_t done_ns, uint32_t samples) {
    kp_a64 *rows = kp_row_words(h, s);
    uint64_t *claimed = kp_claim_times(h, s);
    uint32_t *lens = kp_row_lens(h, s);
    uint32_t c = s->nrows;
    uint64_t nreq = 0, nsamples = 0, queue = 0, total = 0, nexpired = 0;
    uint32_t r = 0;
    while (r < c) {
        uint64_t w = atomic_load_explicit(&rows[r], KP_ACQUIRE);
        uint32_t stt = (uint32_t)(w & 0xff);
        uint32_t n = lens[r];
        if (n == 0 || n > c - r) n = 1;
        if (stt == KP_ROW_COMMITTED || stt == KP_ROW_RELEASED) {
            uint64_t t = claimed[r];
            if (t == 0 || t > done_ns) t = done_ns;
            nreq++;
            nsamples += n;
            queue += s->taken_ns > t ? s->taken_ns - t : 0;
            total += done_ns - t;
        } else if (stt == KP_ROW_EXPIRED || stt == KP_ROW_CANCELLED) {
            nexpired++; /* never run: a failure to its client, like Triton's rejected and cancelled requests */
        }
        r += n;
    }
    /* a request that took a whole slot to itself (its tensors in a client's region) ran `samples` rows */
    if (samples && nreq == 1 && samples <= c) c = (uint32_t)(nsamples = samples);
    if (nreq == 0) { /* every request expired or was cancelled: the batch was not run */
        if (nexpired) atomic_fetch_add_explicit(&st->fail_count, nexpired, KP_RELAXED);
        return;
    }
    atomic_fetch_add_explicit(&st->execution_count, 1, KP_RELAXED);
    if (c <= st->max_batch) {
        atomic_fetch_add_explicit(&st->by_size[c].count, 1, KP_RELAXED);
        atomic_fetch_add_explicit(&st->by_size[c].infer_ns, infer_ns, KP_RELAXED);
    }
    if (status == 0) {
        atomic_fetch_add_explicit(&st->success_count, nreq, KP_RELAXED);
        atomic_fetch_add_explicit(&st->success_ns, total, KP_RELAXED);
        atomic_fetch_add_explicit(&st->queue_ns, queue, KP_RELAXED);
        atomic_fetch_add_explicit(&st->infer_ns, infer_ns * nreq, KP_RELAXED);
        atomic_fetch_add_explicit(&st->inference_count, nsamples, KP_RELAXED);
    } else {
        atomic_fetch_add_explicit(&st->fail_count, nreq, KP_RELAXED);
        atomic_fetch_add_explicit(&st->fail_ns, total, KP_RELAXED);
    }
    if (nexpired) atomic_fetch_add_explicit(&st->fail_count, nexpired, KP_RELAXED);
    atomic_store_explicit(&st->last_inference_ms, kp_wall_ms(), KP_RELAXED);
}

/* The worker finished the batch (status 0 ok): publish outputs and wake the waiting clients. */
static inline void kp_complete(kp_lane_hdr *h, uint64_t seq, int32_t status, const char *errmsg, kp_stats *st,
                               uint64_t infer_ns, uint32_t samples) {
    kp_slot_hdr *s = kp_slot(h, seq);
    s->batch_status = status;
    if (status != 0) {
        atomic_fetch_add_explicit(&h->counters.failed_batches, 1, KP_RELAXED);
        size_t n = errmsg ? strnlen(errmsg, KP_ERRMSG_BYTES - 1) : 0;
        if (n) memcpy(s->errmsg, errmsg, n);
        s->errmsg[n] = 0;
    }
    if (st) kp_stats_record(st, h, s, status, infer_ns, kp_now_ns(), samples);
    if (infer_ns) {
        uint64_t avg = atomic_load_explicit(&h->avg_run_ns, KP_RELAXED);
        atomic_store_explicit(&h->avg_run_ns, avg ? avg - avg / 8 + infer_ns / 8 : infer_ns, KP_RELAXED);
    }
    /* release: output rows and status happen-before a client's acquire of DONE */
    atomic_store_explicit(&s->state, KP_SLOT_DONE, KP_SEQ_CST);
    if (atomic_load_explicit(&s->waiters, KP_SEQ_CST) != 0) kp_futex_wake_all(&s->state);
    kp_add_released(h, s, KP_DONE_UNIT - s->nrows); /* nrows: written by this worker at take */
}

/* Server side: the lane's worker is gone (or the lane closes): fail every waiter at once. */
static inline void kp_lane_set_status(kp_lane_hdr *h, uint32_t status) {
    atomic_store_explicit(&h->status, status, KP_SEQ_CST);
    for (uint32_t i = 0; i < h->nslots; i++) kp_futex_wake_all(&kp_slot(h, i)->state);
    atomic_fetch_add_explicit(&h->free_seq, 1, KP_SEQ_CST);
    kp_futex_wake_all(&h->free_seq);
}

#endif
