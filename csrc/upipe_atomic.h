/*
 * upipe_atomic.h - the only place that spells out memory orders.
 *
 * Every cross-process handshake in upipe is a pair of these operations and is labelled
 * (A0/R0, A1/R1, ...) at both ends, in the style of DPDK's rte_ring_c11_pvt.h. The pairs are
 * listed in docs/futex.md. We use the variable's own acquire/release wherever possible rather
 * than standalone fences: ThreadSanitizer models those, it does not model fences.
 */
#ifndef UPIPE_ATOMIC_H
#define UPIPE_ATOMIC_H

#include <stdatomic.h>
#include <stdint.h>

#define UPIPE_LOAD_RELAXED(p) atomic_load_explicit((p), memory_order_relaxed)
#define UPIPE_LOAD_ACQUIRE(p) atomic_load_explicit((p), memory_order_acquire)
#define UPIPE_LOAD_SEQCST(p) atomic_load_explicit((p), memory_order_seq_cst)
#define UPIPE_STORE_RELAXED(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define UPIPE_STORE_RELEASE(p, v) atomic_store_explicit((p), (v), memory_order_release)
#define UPIPE_STORE_SEQCST(p, v) atomic_store_explicit((p), (v), memory_order_seq_cst)
#define UPIPE_FETCH_ADD(p, v) atomic_fetch_add_explicit((p), (v), memory_order_seq_cst)
#define UPIPE_FETCH_SUB(p, v) atomic_fetch_sub_explicit((p), (v), memory_order_seq_cst)
#define UPIPE_FETCH_OR(p, v) atomic_fetch_or_explicit((p), (v), memory_order_seq_cst)
#define UPIPE_FETCH_AND(p, v) atomic_fetch_and_explicit((p), (v), memory_order_seq_cst)
#define UPIPE_FETCH_ADD_RELAXED(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
/* Strong CAS, seq_cst on success (it is a claim other processes must see in order), relaxed on failure. */
#define UPIPE_CAS(p, expected_ptr, desired)                                                        \
    atomic_compare_exchange_strong_explicit((p), (expected_ptr), (desired), memory_order_seq_cst,  \
                                            memory_order_relaxed)
#define UPIPE_FENCE_SEQCST() atomic_thread_fence(memory_order_seq_cst)

/*
 * Slot header fields (desc, kind, meta_len) are plain members, but get_many peeks at them before
 * it claims the slot, while another consumer may release it and a producer rewrite it for the
 * next lap. The peek's value is only trusted once the claim succeeds, but the accesses must
 * still be atomic: relaxed atomic builtins on both sides (found by TSan).
 */
#define UPIPE_SLOT_SET(s, field, v) __atomic_store_n(&(s)->field, (v), __ATOMIC_RELAXED)
#define UPIPE_SLOT_PEEK(s, field) __atomic_load_n(&(s)->field, __ATOMIC_RELAXED)

#if defined(__x86_64__) || defined(__i386__)
#define UPIPE_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define UPIPE_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define UPIPE_CPU_RELAX() ((void)0)
#endif

#define UPIPE_CACHE_LINE 64

#endif /* UPIPE_ATOMIC_H */
