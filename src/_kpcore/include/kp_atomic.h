/* Atomics, clocks and futex waits shared by every lane operation.
 *
 * All cross-process state is C11 atomics on memory that lives in a shared segment. Nothing here
 * knows about lanes; kp_lane.h builds the protocol on top.
 */
#ifndef KP_ATOMIC_H
#define KP_ATOMIC_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef _Atomic uint32_t kp_a32;
typedef _Atomic uint64_t kp_a64;

#define KP_RELAXED memory_order_relaxed
#define KP_ACQUIRE memory_order_acquire
#define KP_RELEASE memory_order_release
#define KP_ACQ_REL memory_order_acq_rel
#define KP_SEQ_CST memory_order_seq_cst

static inline uint64_t kp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void kp_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    atomic_signal_fence(KP_SEQ_CST);
#endif
}

/* Sleep while *addr == expected, at most timeout_ns. Shared (not PRIVATE) futexes: the word lives
 * in memory mapped by several processes. Returns 0 when woken or the value differed, ETIMEDOUT,
 * or EINTR. */
static inline int kp_futex_wait(kp_a32 *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == 0) return 0;
    if (errno == EAGAIN) return 0;
    return errno;
}

static inline void kp_futex_wake(kp_a32 *addr, int count) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, count, NULL, NULL, 0);
}

static inline int kp_futex_wake_all(kp_a32 *addr) {
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

#endif
