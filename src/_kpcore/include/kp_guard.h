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

/* volatile, and fenced below: the compiler must not drop or move the stores around memcpy */
static __thread sigjmp_buf *volatile kp_guard_point;
static struct sigaction kp_guard_previous;
static int kp_guard_installed;

static void kp_guard_handler(int sig, siginfo_t *info, void *ctx) {
    sigjmp_buf *point = kp_guard_point;
    if (point != NULL) {
        kp_guard_point = NULL;
        siglongjmp(*point, 1);
    }
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
