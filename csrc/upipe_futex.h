/*
 * upipe_futex.h - futex doorbells on 32-bit words in shared memory.
 *
 * The futex never protects data: correctness comes from acquire/release on the ring positions.
 * These words live in a MAP_SHARED segment used by several processes, so FUTEX_PRIVATE_FLAG is
 * never set. Waits take an absolute CLOCK_MONOTONIC deadline (FUTEX_WAIT_BITSET), so a retry
 * loop never extends a timeout.
 */
#ifndef UPIPE_FUTEX_H
#define UPIPE_FUTEX_H

#include <stdatomic.h>
#include <stdint.h>

/* Monotonic clock in nanoseconds. */
int64_t upipe_now_ns(void);

/*
 * Sleep while *word == expected, until woken or until deadline_ns (CLOCK_MONOTONIC, absolute;
 * negative means no deadline).
 * Returns 0 when woken (or spuriously), -EAGAIN if *word != expected on entry, -ETIMEDOUT,
 * -EINTR. Every return means "re-check the condition", as in musl's __timedwait.
 */
int upipe_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns);

/* Wake up to n sleepers on word. Returns the number woken or -errno. */
int upipe_futex_wake(_Atomic uint32_t *word, int n);

#endif /* UPIPE_FUTEX_H */
