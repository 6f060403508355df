/* A memory copy that survives its source or destination being truncated under it.
 *
 * The server copies from and to shared memory that a client created and registered (POSIX shm): the
 * client can shrink the object at any moment, and touching a mapped page past the new end raises SIGBUS,
 * which would kill the server. kp_guarded_copy runs memcpy with a recovery point for the calling thread:
 * a SIGBUS raised inside it jumps back and the copy reports failure instead. A SIGBUS anywhere else goes
 * to the handler that was installed before (or the default action, which ends the process).
 *
 * SIGBUS from a truncated mapping is synchronous: it is delivered to the thread that touched the page, so a
 * thread-local recovery point is enough; the handler only jumps, it calls nothing that is not
 * async-signal-safe.
 */
#ifndef KP_GUARD_H
#define KP_GUARD_H

#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>

/* volatile, and fenced below: the compiler must not drop or move the stores around memcpy */
static __thread sigjmp_buf *volatile kp_guard_point;
static struct sigaction kp_guard_previous;
static int kp_guard_installed;

/* Fenced mappings: a worker maps a client's registered region and lets the framework read and write it
 * in place, on any of its threads, where no recovery point can be set. A SIGBUS inside such a mapping
 * (the client truncated its object) replaces the whole mapping with private anonymous pages, marks it
 * faulted and returns: the faulting access is retried on the new pages and the framework finishes its
 * call on meaningless bytes, which the worker then discards (it checks `faulted` after every run that used
 * the mapping and fails that request). mmap is a plain system call, safe to make from the handler. */
#define KP_FENCED_MAX 1024 /* as many as the server lets clients register */
typedef struct {
    _Atomic(uintptr_t) start; /* 0: a free entry */
    size_t len;
    atomic_int faulted;
} kp_fenced;
static kp_fenced kp_fenced_maps[KP_FENCED_MAX];

static int kp_fenced_rescue(void *addr) {
    uintptr_t a = (uintptr_t)addr;
    for (int i = 0; i < KP_FENCED_MAX; i++) {
        uintptr_t s = atomic_load_explicit(&kp_fenced_maps[i].start, memory_order_acquire);
        if (s == 0 || a < s || a - s >= kp_fenced_maps[i].len) continue;
        void *r = mmap((void *)s, kp_fenced_maps[i].len, PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r == MAP_FAILED) return 0;
        atomic_store_explicit(&kp_fenced_maps[i].faulted, 1, memory_order_release);
        return 1;
    }
    return 0;
}

static void kp_guard_handler(int sig, siginfo_t *info, void *ctx) {
    sigjmp_buf *point = kp_guard_point;
    if (point != NULL) {
        kp_guard_point = NULL;
        siglongjmp(*point, 1);
    }
    if (info != NULL && kp_fenced_rescue(info->si_addr)) return; /* retried on the replacement pages */
    /* not ours: what was there before */
    if (kp_guard_previous.sa_flags & SA_SIGINFO) {
        if (kp_guard_previous.sa_sigaction != NULL) {
            kp_guard_previous.sa_sigaction(sig, info, ctx);
            return;
        }
    } else if (kp_guard_previous.sa_handler != SIG_DFL && kp_guard_previous.sa_handler != SIG_IGN) {
        kp_guard_previous.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Install the SIGBUS handler (once; the caller serialises calls, the binding holds the GIL). 0 or -1. */
static inline int kp_guard_install(void) {
    if (kp_guard_installed) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = kp_guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &kp_guard_previous) != 0) return -1;
    kp_guard_installed = 1;
    return 0;
}

/* Register [start, start+len) as fenced; the entry's index, or -1 when the table is full. The caller
 * serialises registrations (the binding holds the GIL); the handler may read the table at any time. */
static inline int kp_fenced_add(void *start, size_t len) {
    for (int i = 0; i < KP_FENCED_MAX; i++) {
        if (atomic_load_explicit(&kp_fenced_maps[i].start, memory_order_relaxed) != 0) continue;
        kp_fenced_maps[i].len = len;
        atomic_store_explicit(&kp_fenced_maps[i].faulted, 0, memory_order_relaxed);
        atomic_store_explicit(&kp_fenced_maps[i].start, (uintptr_t)start, memory_order_release);
        return i;
    }
    return -1;
}

static inline void kp_fenced_remove(int i) {
    if (i >= 0 && i < KP_FENCED_MAX) atomic_store_explicit(&kp_fenced_maps[i].start, 0, memory_order_release);
}

static inline int kp_fenced_faulted(int i) {
    return i >= 0 && i < KP_FENCED_MAX && atomic_load_explicit(&kp_fenced_maps[i].faulted, memory_order_acquire);
}

/* memcpy(dst, src, n), or -1 when a page of either was cut off (SIGBUS) part way. */
static inline int kp_guarded_copy(void *dst, const void *src, size_t n) {
    sigjmp_buf point;
    if (sigsetjmp(point, 1) != 0) return -1; /* the handler jumped back: the copy stopped at a lost page */
    kp_guard_point = &point;
    atomic_signal_fence(memory_order_seq_cst);
    memcpy(dst, src, n);
    atomic_signal_fence(memory_order_seq_cst);
    kp_guard_point = NULL;
    return 0;
}

#endif
