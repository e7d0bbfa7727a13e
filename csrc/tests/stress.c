/*
 * stress.c - threaded stress test of the upipe C API (csrc/upipe.h), built and run by run.sh in
 * three configurations (plain -O2, ASan+UBSan, TSan).
 *
 *   stress [FILTER...]     run every variant whose name contains one of the FILTERs (all if none)
 *
 * Environment:
 *   UPIPE_STRESS_ITERS    items per variant, split over its producers (default 60000;
 *                         24000 under ASan, 10000 under TSan)
 *   UPIPE_STRESS_TIMEOUT  seconds one variant may take before it fails (default 30; 120 TSan)
 *   UPIPE_STRESS_SEED     seed of the per-thread PRNGs (default: from the clock; printed on failure)
 *   UPIPE_STRESS_VERBOSE  1: a line per variant
 *
 * Exit status: 0 pass, 1 fail, 77 skip (the platform lacks memfd/futex). Prints nothing but the
 * summary line unless something fails.
 *
 * One stress body (run_variant) is parametrized, DPDK test_ring_stress style, by a table of
 * "redefinable functions" (struct ops: send/recv) per mode, and by the thread topology:
 *   mode   inline  upipe_put / upipe_get            (every third item carries 8 B of meta)
 *          bulk    upipe_put_many / upipe_get_many  (puts of 1..16, partial bursts retried;
 *                                                    gets of 1..64)
 *          chunk   upipe_alloc + write upipe_chunk_ptr + upipe_put_chunk; upipe_get + verify +
 *                  upipe_free (three size classes, few chunks, so producers wait for chunks)
 *          mixed   all of the above interleaved; consumers use get_many and fall back to get on
 *                  -EBADMSG (exercises get_many's shape check under concurrency)
 *   topology SPSC 1x1, MPSC 3x1, MPMC 2x2 (producers x consumers), capacity 64 or 2 (wrap-around
 *          every other item), optionally a thread calling upipe_recover + upipe_stats in a loop,
 *          a second handle for the consumers (upipe_attach, as another process would; not under
 *          TSan, which cannot see two mappings of one page as the same memory), close() while
 *          everything runs, maxsize (limit) below the capacity, and spin 0 (every wait goes to the
 *          futex) to catch lost wakeups.
 *
 * Every item carries a stamp (producer, seq, length, kind, how it was sent, meta length, FNV-1a
 * checksum of the whole payload) and a body derived from (producer, seq). Consumers check the
 * checksum and body, that each producer's seqs arrive strictly increasing (per consumer), and
 * mark a per-producer "seen" byte; the end checks that every item sent was received exactly once,
 * that the ring is empty, every chunk is back in its pool and no recovery counter moved.
 * Blocking uses upipe_wait on -ENOBUFS / -ENOENT / -EAGAIN with the variant's deadline, and a
 * SIGALRM watchdog backs that up: the test can fail, never hang.
 *
 * Shared chunks (upipe_put_shared, one chunk in several data rings), section "shared chunks":
 * shared_basic (API, and the chunk's return at the last of every order of letting go),
 * shared_look (a look for the last reference losing its race, replayed through a hook),
 * shared_crash (a forked process dying at every step, then recovery), and the fanout_*
 * variants (threads fanning out to 3 rings, consumers getting, taking, acking, nacking).
 * Litmus L9-L11 are there.
 *
 * ---------------------------------------------------------------------------------------------
 * Litmus outcomes the stress checks (jcstress / Disruptor style). P = producer, C = consumer.
 *
 * L1 publication (message passing): P writes the payload, then stamp and seq = pos + 1 (release);
 *    C loads seq (acquire), then reads the payload.
 *      ACCEPTABLE  C sees seq != pos + 1: -ENOENT / -EAGAIN, nothing read.
 *      ACCEPTABLE  C sees seq == pos + 1 and the complete payload P wrote.
 *      FORBIDDEN   C sees seq == pos + 1 and a stale or partial payload (checksum / body check).
 * L2 slot reuse: C reads the payload, then seq = pos + capacity (release); P loads it (acquire)
 *    before overwriting the slot on the next lap.
 *      FORBIDDEN   P's next-lap write is visible to a C still reading that slot (checksum; with
 *                  capacity 2 every slot is reused every other item).
 * L3 claims: CAS on head / tail.
 *      FORBIDDEN   two consumers take the same position (item seen twice).
 *      FORBIDDEN   a position is skipped (item never seen).
 *      FORBIDDEN   C sees producer p's seq s after p's seq s' > s (per-producer FIFO).
 * L4 close: close() sets closed (seq_cst); put re-checks closed after its claim and turns a late
 *    claim into a tombstone; get reads closed before its claim.
 *      ACCEPTABLE  put racing close returns 0 and the item is received, or returns -EPIPE and
 *                  it is not.
 *      FORBIDDEN   put returned 0 (put_many: k) and the item is never received.
 *      FORBIDDEN   put returned -EPIPE and the item is received anyway.
 *      FORBIDDEN   get returned -EPIPE and a later get returns an item.
 * L5 doorbell (Dekker, F0 in docs/futex.md): the waiter increments sync_waiters then re-checks
 *    the ring; the waker publishes, fences, then reads sync_waiters.
 *      ACCEPTABLE  waiter sees the item on its re-check; or waker sees the waiter and wakes it.
 *      FORBIDDEN   both miss: the waiter sleeps until its 100 ms recovery slice (wakeup_*
 *                  variants count waits that end after >= 90 ms while the peer is busy).
 * L6 chunk ownership: exactly one holder. FORBIDDEN: a received chunk not held by the receiving
 *    handle, a chunk left held or missing from its pool at the end.
 * ---------------------------------------------------------------------------------------------
 */
#define _GNU_SOURCE
#include "upipe.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef __SANITIZE_THREAD__
#define UNDER_TSAN 1
#endif
#ifdef __SANITIZE_ADDRESS__
#define UNDER_ASAN 1
#endif
#if defined(__has_feature)
#if !defined(UNDER_TSAN) && __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#if !defined(UNDER_ASAN) && __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

#ifdef UNDER_TSAN
#define DEFAULT_ITERS 10000
#define DEFAULT_TIMEOUT_S 120
#elif defined(UNDER_ASAN)
#define DEFAULT_ITERS 24000
#define DEFAULT_TIMEOUT_S 30
#else
#define DEFAULT_ITERS 60000
#define DEFAULT_TIMEOUT_S 30
#endif

#define EXIT_PASS 0
#define EXIT_FAIL 1
#define EXIT_SKIP 77

#define MAX_PROD 4
#define MAX_CONS 4
#define MAX_VICTIMS 2
#define MAX_HOLD 4       /* take variants: unacked takes per consumer thread */
#define VICTIM_HOLD 3    /* unacked takes per victim process */
#define MAX_BURST 16     /* put_many: 1..16 items */
#define MAX_GET_BURST 64 /* get_many: 1..64 items */
#define KIND_TOMBSTONE 0xFFFFu /* reserved by the C core (upipe_layout.h) */
#define KIND_SINGLE 8
#define KIND_BULK 7
#define KIND_CHUNK 9
#define SLOT_SIZE 256
#define SLOW_WAIT_NS (90 * 1000 * 1000LL) /* the core's recovery slice is 100 ms */
#define CLOSE_ROUNDS 32
#define MAX_SLOW_WAITS 2                  /* wakeup_* variants: tolerated scheduler hiccups */

static const uint64_t CHUNK_SIZES[3] = {128, 1024, 4096};
static const uint32_t CHUNK_COUNTS[3] = {4, 4, 4};

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                    */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static uint64_t rnd(uint64_t *s)
{
    *s = splitmix(*s);
    return *s;
}

static uint64_t item_key(uint32_t prod, uint64_t seq)
{
    return splitmix(((uint64_t)prod << 48) ^ seq ^ 0x5EEDULL);
}

static uint32_t fnv_update(uint32_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    return (*end == 0 && v > 0) ? (uint64_t)v : dflt;
}

/* ------------------------------------------------------------------------------------------ */
/* items                                                                                      */

enum how { HOW_SINGLE = 1, HOW_BULK = 2, HOW_CHUNK = 3 };

struct stamp {
    uint32_t prod;
    uint32_t len; /* payload bytes, stamp included */
    uint64_t seq;
    uint16_t kind;
    uint8_t how;
    uint8_t meta_len;
    uint32_t csum; /* FNV-1a of the payload with this field zero */
};
#define STAMP_SIZE ((uint32_t)sizeof(struct stamp))
_Static_assert(sizeof(struct stamp) == 24, "stamp is 24 B");
#define CSUM_OFF offsetof(struct stamp, csum)

static uint8_t body_byte(uint64_t key, uint32_t i)
{
    return (uint8_t)((uint8_t)(key >> ((i & 7u) << 3)) ^ (uint8_t)(i >> 3));
}

static uint32_t payload_csum(const uint8_t *p, uint32_t len)
{
    static const uint8_t zero[4];
    uint32_t h = fnv_update(2166136261u, p, CSUM_OFF);
    h = fnv_update(h, zero, 4);
    return fnv_update(h, p + CSUM_OFF + 4, len - (CSUM_OFF + 4));
}

static void make_meta(uint8_t *meta, uint32_t prod, uint64_t seq, uint32_t meta_len)
{
    uint64_t k = ~item_key(prod, seq);
    for (uint32_t i = 0; i < meta_len; i++)
        meta[i] = (uint8_t)(k >> ((i & 7u) << 3)) ^ (uint8_t)i;
}

static void make_item(uint8_t *dst, uint32_t prod, uint64_t seq, uint32_t len, uint16_t kind,
                      uint8_t how, uint8_t meta_len)
{
    struct stamp st = {prod, len, seq, kind, how, meta_len, 0};
    memcpy(dst, &st, sizeof st);
    uint64_t key = item_key(prod, seq);
    for (uint32_t i = STAMP_SIZE; i < len; i++)
        dst[i] = body_byte(key, i);
    uint32_t cs = payload_csum(dst, len);
    memcpy(dst + CSUM_OFF, &cs, sizeof cs);
}

/* ------------------------------------------------------------------------------------------ */
/* variants                                                                                   */

enum mode { MODE_INLINE, MODE_BULK, MODE_CHUNK, MODE_MIXED, MODE_TAKE };
static const char *const MODE_NAMES[] = {"inline", "bulk", "chunk", "mixed", "take"};

struct variant {
    const char *name;
    enum mode mode;
    int nprod, ncons;
    uint64_t capacity;
    uint64_t limit;  /* maxsize below capacity; 0: none */
    int recoverer;   /* a thread calling upipe_recover / upipe_stats throughout */
    int cross;       /* consumers (and the recoverer) use a second, attached handle */
    int close_mid;   /* close() while producers and consumers are active */
    int nospin;      /* upipe_set_spin(0): waits go straight to the futex; count slow wakeups */
    int take;        /* consumers take + ack (1), or take + ack or nack (2) (MODE_TAKE) */
    int victims;     /* processes forked to take and nack, SIGKILLed mid-run (redelivery) */
};

static const struct variant VARIANTS[] = {
    /* name                  mode         P  C  cap limit rec cross close nospin take vict */
    {"spsc_inline", MODE_INLINE, 1, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpsc_inline", MODE_INLINE, 3, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpmc_inline", MODE_INLINE, 2, 2, 64, 0, 0, 0, 0, 0, 0, 0},
    {"spsc_bulk", MODE_BULK, 1, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpsc_bulk", MODE_BULK, 3, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpmc_bulk", MODE_BULK, 2, 2, 64, 0, 0, 0, 0, 0, 0, 0},
    {"spsc_chunk", MODE_CHUNK, 1, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpsc_chunk", MODE_CHUNK, 3, 1, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpmc_chunk", MODE_CHUNK, 2, 2, 64, 0, 0, 0, 0, 0, 0, 0},
    {"mpmc_mixed", MODE_MIXED, 2, 2, 64, 0, 0, 0, 0, 0, 0, 0},
    {"cap2_spsc_inline", MODE_INLINE, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0},
    {"cap2_mpmc_inline", MODE_INLINE, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0},
    {"cap2_mpmc_bulk", MODE_BULK, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0},
    {"cap4_mpmc_bulk", MODE_BULK, 2, 2, 4, 0, 0, 0, 0, 0, 0, 0},
    {"cap2_mpsc_chunk", MODE_CHUNK, 3, 1, 2, 0, 0, 0, 0, 0, 0, 0},
    {"cap2_mpmc_mixed", MODE_MIXED, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0},
    {"limit_mpmc_inline", MODE_INLINE, 2, 2, 16, 5, 0, 0, 0, 0, 0, 0},
    {"recover_mpmc_inline", MODE_INLINE, 2, 2, 16, 0, 1, 0, 0, 0, 0, 0},
    {"recover_mpmc_chunk", MODE_CHUNK, 2, 2, 16, 0, 1, 0, 0, 0, 0, 0},
    {"recover_cross_mpmc_mixed", MODE_MIXED, 2, 2, 16, 0, 1, 1, 0, 0, 0, 0},
    {"cross_mpmc_chunk", MODE_CHUNK, 2, 2, 16, 0, 0, 1, 0, 0, 0, 0},
    {"close_mpmc_inline", MODE_INLINE, 2, 2, 8, 0, 0, 0, 1, 0, 0, 0},
    {"close_mpsc_bulk", MODE_BULK, 3, 1, 8, 0, 0, 0, 1, 0, 0, 0},
    {"close_mpmc_chunk", MODE_CHUNK, 2, 2, 8, 0, 0, 0, 1, 0, 0, 0},
    {"close_cap2_mpmc_mixed", MODE_MIXED, 2, 2, 2, 0, 1, 0, 1, 0, 0, 0},
    {"wakeup_spsc_inline", MODE_INLINE, 1, 1, 2, 0, 0, 0, 0, 1, 0, 0},
    {"wakeup_mpmc_inline", MODE_INLINE, 2, 2, 4, 0, 0, 0, 0, 1, 0, 0},
    {"wakeup_mpmc_chunk", MODE_CHUNK, 2, 2, 4, 0, 0, 0, 0, 1, 0, 0},
    {"take_spsc_mixed", MODE_TAKE, 1, 1, 64, 0, 0, 0, 0, 0, 1, 0},
    {"take_mpmc_mixed", MODE_TAKE, 2, 2, 64, 0, 0, 0, 0, 0, 1, 0},
    {"take_cap2_mpmc_mixed", MODE_TAKE, 2, 2, 2, 0, 0, 0, 0, 0, 1, 0},
    {"nack_mpmc_mixed", MODE_TAKE, 2, 2, 8, 0, 0, 0, 0, 0, 2, 0},
    {"nack_cap2_mpmc_mixed", MODE_TAKE, 2, 2, 2, 0, 1, 0, 0, 0, 2, 0},
    {"nack_limit_mpmc_mixed", MODE_TAKE, 2, 2, 16, 5, 0, 0, 0, 0, 2, 0},
    {"nack_recover_cross_mpmc", MODE_TAKE, 2, 2, 16, 0, 1, 1, 0, 0, 2, 0},
    {"close_nack_mpmc_mixed", MODE_TAKE, 2, 2, 8, 0, 0, 0, 1, 0, 2, 0},
    {"wakeup_nack_mpmc_mixed", MODE_TAKE, 2, 2, 4, 0, 0, 0, 0, 1, 2, 0},
    {"crash_take_mpmc", MODE_TAKE, 2, 2, 16, 0, 1, 0, 0, 0, 2, 2},
    {"crash_take_cap4_mpmc", MODE_TAKE, 2, 2, 4, 0, 0, 0, 0, 0, 1, 2},
};
#define NVARIANTS (sizeof VARIANTS / sizeof VARIANTS[0])

/* ------------------------------------------------------------------------------------------ */
/* shared state of one run                                                                    */

struct ctx {
    const struct variant *v;
    upipe_handle *hp; /* producers' handle */
    upipe_handle *hc; /* consumers' handle (== hp unless cross) */
    uint32_t inline_max;
    uint64_t per_prod; /* items each producer sends (an upper bound when close_mid) */
    int64_t deadline;
    uint64_t seed;
    _Atomic int go, stop, failed, producers_done;
    _Atomic uint64_t received;
    uint64_t close_at; /* close_mid: the consumer taking this many-th item closes the ring */
    _Atomic int64_t t_close;
    _Atomic uint64_t waits, slow_waits, recover_calls;
    _Atomic uint8_t *seen[MAX_PROD];
    /* written by producer i before it exits, read by main after the join */
    uint64_t sent[MAX_PROD];
    int end_rc[MAX_PROD];
    int unordered;                 /* items may come back out of order (nack, redelivery) */
    _Atomic uint64_t nacks;        /* take variants: items given back with upipe_nack */
    pid_t victim_pid[MAX_VICTIMS]; /* victims: forked consumers that die holding takes */
    int nvictims;
};

static const char *volatile current_variant = "(startup)";
static uint64_t global_seed;
/* Child processes alive now (victims, cut-case children): the watchdog kills them before it
 * exits, so none outlives the test holding its output pipe open. */
static volatile pid_t live_children[MAX_VICTIMS + 1];

static void vfail(struct ctx *c, const char *fmt, va_list ap)
{
    int n = c ? atomic_fetch_add(&c->failed, 1) : 0;
    if (n < 8) {
        char buf[512];
        vsnprintf(buf, sizeof buf, fmt, ap);
        fprintf(stderr, "FAIL [%s seed=%" PRIu64 "]: %s\n", current_variant, global_seed, buf);
    }
    if (c) {
        atomic_store(&c->stop, 1);
        for (uint32_t r = 0; r < upipe_ndata_rings(c->hp); r++)
            upipe_close(c->hp, r); /* wakes every waiter, so the threads bail out promptly */
    }
}

__attribute__((format(printf, 2, 3))) static void fail(struct ctx *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(c, fmt, ap);
    va_end(ap);
}

static const char *what_name(int what)
{
    return what == UPIPE_WAIT_READABLE ? "READABLE"
           : what == UPIPE_WAIT_WRITABLE ? "WRITABLE"
                                         : "CHUNK";
}

static void dump_stats(upipe_handle *h)
{
    struct upipe_stats st;
    if (upipe_stats(h, 0, &st) != 0)
        return;
    fprintf(stderr,
            "  ring0: cap=%" PRIu64 " count=%" PRIu64 " head=%" PRIu64 " tail=%" PRIu64
            " closed=%u aborted=%" PRIu64 " lost=%" PRIu64 " tombs=%" PRIu64 " recov=%" PRIu64
            "\n",
            st.capacity, st.count, st.head, st.tail, st.closed, st.aborted_puts, st.lost_items,
            st.tombstones_skipped, st.recoveries);
    for (uint32_t i = 0; i < st.nclasses; i++)
        fprintf(stderr, "  class%u: size=%" PRIu64 " free=%" PRIu64 "/%" PRIu64 "\n", i,
                st.class_size[i], st.class_free[i], st.class_total[i]);
}

/*
 * Block until the condition may hold. 0: re-try the operation. Negative: give up (the failure is
 * recorded, or another thread already failed and asked everyone to stop).
 */
static int block(struct ctx *c, upipe_handle *h, uint32_t ring, int what, const char *who)
{
    for (;;) {
        if (atomic_load(&c->stop))
            return -ECANCELED;
        int64_t t0 = now_ns();
        if (t0 >= c->deadline) {
            fail(c, "%s: variant deadline passed waiting for %s", who, what_name(what));
            dump_stats(h);
            return -ETIMEDOUT;
        }
        int rc = upipe_wait(h, ring, what, c->deadline);
        int64_t dt = now_ns() - t0;
        atomic_fetch_add_explicit(&c->waits, 1, memory_order_relaxed);
        if (rc == 0) {
            if (dt >= SLOW_WAIT_NS && !atomic_load(&c->producers_done))
                atomic_fetch_add_explicit(&c->slow_waits, 1, memory_order_relaxed);
            return 0;
        }
        if (rc == -EINTR)
            continue;
        if (rc == -ETIMEDOUT) {
            fail(c, "%s: upipe_wait(%s) timed out at the variant deadline", who, what_name(what));
            dump_stats(h);
            return rc;
        }
        fail(c, "%s: upipe_wait(%s) returned %d", who, what_name(what), rc);
        return rc;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* producers                                                                                  */

struct prod {
    struct ctx *c;
    uint32_t id;
    uint64_t rng;
    uint8_t buf[MAX_BURST * SLOT_SIZE];
    uint32_t lens[MAX_BURST];
    uint8_t meta[16];
    char who[32];
};

/* Inline length for an item with meta_len bytes of meta. */
static uint32_t inline_len(struct prod *p, uint32_t meta_len)
{
    uint32_t max = p->c->inline_max - meta_len;
    return STAMP_SIZE + (uint32_t)(rnd(&p->rng) % (max - STAMP_SIZE + 1));
}

/* Chunk length: a class at random, then a length inside it. */
static uint32_t chunk_len(struct prod *p)
{
    uint32_t k = (uint32_t)(rnd(&p->rng) % 3);
    uint64_t lo = k ? CHUNK_SIZES[k - 1] + 1 : STAMP_SIZE;
    return (uint32_t)(lo + rnd(&p->rng) % (CHUNK_SIZES[k] - lo + 1));
}

/* The redefinable functions: each send returns how many items (from seq on) it sent (> 0), or
 * -EPIPE (ring closed; nothing sent), or another negative value after recording a failure. */

static int64_t send_single(struct prod *p, uint64_t seq, uint64_t left)
{
    (void)left;
    struct ctx *c = p->c;
    uint32_t ml = (seq % 3 == 0) ? 8 : 0;
    uint32_t len = inline_len(p, ml);
    make_item(p->buf, p->id, seq, len, KIND_SINGLE, HOW_SINGLE, (uint8_t)ml);
    make_meta(p->meta, p->id, seq, ml);
    for (;;) {
        int64_t rc = upipe_put(c->hp, 0, (const char *)p->buf, len, KIND_SINGLE,
                               ml ? (const char *)p->meta : NULL, (uint16_t)ml);
        if (rc == 0)
            return 1;
        if (rc == -EPIPE)
            return rc;
        if (rc != -ENOBUFS) {
            fail(c, "%s: upipe_put returned %" PRId64, p->who, rc);
            return rc;
        }
        if ((rc = block(c, c->hp, 0, UPIPE_WAIT_WRITABLE, p->who)) < 0)
            return rc;
    }
}

static int64_t send_bulk(struct prod *p, uint64_t seq, uint64_t left)
{
    struct ctx *c = p->c;
    uint32_t n = 1 + (uint32_t)(rnd(&p->rng) % MAX_BURST);
    if (n > left)
        n = (uint32_t)left;
    uint64_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        p->lens[i] = inline_len(p, 0);
        make_item(p->buf + off, p->id, seq + i, p->lens[i], KIND_BULK, HOW_BULK, 0);
        off += p->lens[i];
    }
    for (;;) {
        int64_t rc = upipe_put_many(c->hp, 0, (const char *)p->buf, p->lens, n, KIND_BULK);
        if (rc > 0) {
            if (rc > n) {
                fail(c, "%s: upipe_put_many(%u) returned %" PRId64, p->who, n, rc);
                return -EPROTO;
            }
            return rc; /* a partial burst: the rest is rebuilt (maybe differently) next call */
        }
        if (rc == -EPIPE)
            return rc;
        if (rc != -ENOBUFS) {
            fail(c, "%s: upipe_put_many returned %" PRId64, p->who, rc);
            return rc < 0 ? rc : -EPROTO;
        }
        if ((rc = block(c, c->hp, 0, UPIPE_WAIT_WRITABLE, p->who)) < 0)
            return rc;
    }
}

static int64_t send_chunk(struct prod *p, uint64_t seq, uint64_t left)
{
    (void)left;
    struct ctx *c = p->c;
    upipe_handle *h = c->hp;
    uint32_t len = chunk_len(p);
    uint32_t ml = (seq % 3 == 1) ? 16 : 0;
    uint32_t chunk = UINT32_MAX;
    int64_t rc;
    for (;;) {
        rc = upipe_alloc(h, len, &chunk);
        if (rc == 0)
            break;
        if (rc != -ENOBUFS && rc != -EAGAIN) {
            fail(c, "%s: upipe_alloc(%u) returned %" PRId64, p->who, len, rc);
            return rc;
        }
        int cls = upipe_class_for(h, len);
        if (cls < 0) {
            fail(c, "%s: upipe_class_for(%u) returned %d", p->who, len, cls);
            return cls;
        }
        if ((rc = block(c, h, (uint32_t)cls, UPIPE_WAIT_CHUNK, p->who)) < 0)
            return rc;
    }
    if (!upipe_chunk_held(h, chunk) || upipe_chunk_size(h, chunk) < (int64_t)len) {
        fail(c, "%s: fresh chunk %u: held=%d size=%" PRId64 " for %u bytes", p->who, chunk,
             upipe_chunk_held(h, chunk), upipe_chunk_size(h, chunk), len);
        return -EPROTO;
    }
    uint8_t *ptr = upipe_chunk_ptr(h, chunk);
    if (!ptr || upipe_chunk_of(h, ptr, len) != (int64_t)chunk) {
        fail(c, "%s: chunk %u: ptr=%p chunk_of=%" PRId64, p->who, chunk, (void *)ptr,
             ptr ? upipe_chunk_of(h, ptr, len) : -1);
        return -EPROTO;
    }
    make_item(ptr, p->id, seq, len, KIND_CHUNK, HOW_CHUNK, (uint8_t)ml);
    make_meta(p->meta, p->id, seq, ml);
    for (;;) {
        rc = upipe_put_chunk(h, 0, chunk, len, KIND_CHUNK, ml ? (const char *)p->meta : NULL,
                             (uint16_t)ml);
        if (rc == 0)
            return 1;
        if (rc != -ENOBUFS) {
            if (rc != -EPIPE)
                fail(c, "%s: upipe_put_chunk returned %" PRId64, p->who, rc);
            break;
        }
        if ((rc = block(c, h, 0, UPIPE_WAIT_WRITABLE, p->who)) < 0)
            break;
    }
    /* not sent: the chunk is still ours (-EPIPE says so) and goes back to its pool */
    int frc = upipe_free(h, chunk);
    if (frc != 0)
        fail(c, "%s: upipe_free of an unsent chunk %u returned %d", p->who, chunk, frc);
    return rc;
}

static int64_t send_mixed(struct prod *p, uint64_t seq, uint64_t left)
{
    switch (rnd(&p->rng) % 3) {
    case 0:
        return send_single(p, seq, left);
    case 1:
        return send_bulk(p, seq, left);
    default:
        return send_chunk(p, seq, left);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* consumers                                                                                  */

struct cons {
    struct ctx *c;
    uint32_t id;
    uint64_t rng;
    uint64_t next[MAX_PROD]; /* smallest seq still acceptable from each producer */
    uint64_t got;
    uint32_t ends[MAX_GET_BURST];
    uint8_t buf[MAX_GET_BURST * SLOT_SIZE];
    char who[32];
    /* take variants: what this consumer holds, unacked */
    struct held {
        uint64_t receipt;
        uint32_t prod;
        uint64_t seq;
        uint32_t chunk; /* UINT32_MAX: inline */
        uint32_t len;
        int dropped; /* its chunk was freed before the ack (the free is deferred) */
    } held[MAX_HOLD];
    int nheld;
};

/* Check one received item (content and per-producer order); its stamp in *out. Returns 0, or
 * -EPROTO after recording a failure. */
static int check_item(struct cons *cs, const uint8_t *payload, uint32_t len, uint16_t kind,
                      const uint8_t *meta, uint32_t meta_len, int via_chunk, struct stamp *out)
{
    struct ctx *c = cs->c;
    struct stamp st;
    if (len < STAMP_SIZE) {
        fail(c, "%s: item of %u bytes, shorter than a stamp", cs->who, len);
        return -EPROTO;
    }
    memcpy(&st, payload, sizeof st);
    if (st.prod >= (uint32_t)c->v->nprod || st.seq >= c->per_prod) {
        fail(c, "%s: garbage stamp prod=%u seq=%" PRIu64, cs->who, st.prod, st.seq);
        return -EPROTO;
    }
    if (st.len != len || payload_csum(payload, len) != st.csum) {
        fail(c, "%s: p%u seq %" PRIu64 ": len %u (stamp %u), checksum %s", cs->who, st.prod,
             st.seq, len, st.len, payload_csum(payload, len) == st.csum ? "ok" : "BAD");
        return -EPROTO;
    }
    uint64_t key = item_key(st.prod, st.seq);
    for (uint32_t i = STAMP_SIZE; i < len; i++) {
        if (payload[i] != body_byte(key, i)) {
            fail(c, "%s: p%u seq %" PRIu64 ": body byte %u differs", cs->who, st.prod, st.seq, i);
            return -EPROTO;
        }
    }
    int want_chunk = st.how == HOW_CHUNK;
    if (st.kind != kind || st.meta_len != meta_len || want_chunk != via_chunk) {
        fail(c, "%s: p%u seq %" PRIu64 ": kind %u/%u meta %u/%u chunk %d/%d (got/sent)", cs->who,
             st.prod, st.seq, kind, st.kind, meta_len, st.meta_len, via_chunk, want_chunk);
        return -EPROTO;
    }
    if (meta_len) {
        uint8_t want[16];
        make_meta(want, st.prod, st.seq, meta_len);
        if (memcmp(want, meta, meta_len) != 0) {
            fail(c, "%s: p%u seq %" PRIu64 ": meta differs", cs->who, st.prod, st.seq);
            return -EPROTO;
        }
    }
    if (st.seq < cs->next[st.prod] && !c->unordered) {
        fail(c, "%s: p%u seq %" PRIu64 " after seq %" PRIu64 " (per-producer order)", cs->who,
             st.prod, st.seq, cs->next[st.prod] - 1);
        return -EPROTO;
    }
    cs->next[st.prod] = st.seq + 1;
    *out = st;
    return 0;
}

/* Count an item as received (exactly once, checked). 0, or -EPROTO after recording a failure. */
static int mark_item(struct cons *cs, uint32_t prod, uint64_t seq)
{
    struct ctx *c = cs->c;
    uint8_t before = atomic_fetch_add_explicit(&c->seen[prod][seq], 1, memory_order_relaxed);
    if (before != 0) {
        fail(c, "%s: p%u seq %" PRIu64 " received twice", cs->who, prod, seq);
        return -EPROTO;
    }
    cs->got++;
    uint64_t total = atomic_fetch_add_explicit(&c->received, 1, memory_order_relaxed) + 1;
    if (c->v->close_mid && total == c->close_at) {
        /* close from a consumer thread, mid-stream: every producer is still sending */
        atomic_store(&c->t_close, now_ns());
        upipe_close(c->hc, 0);
    }
    return 0;
}

static int got_item(struct cons *cs, const uint8_t *payload, uint32_t len, uint16_t kind,
                    const uint8_t *meta, uint32_t meta_len, int via_chunk)
{
    struct stamp st;
    if (check_item(cs, payload, len, kind, meta, meta_len, via_chunk, &st) != 0)
        return -EPROTO;
    return mark_item(cs, st.prod, st.seq);
}

/* Each recv returns the number of items taken (> 0), or the upipe error: -ENOENT / -EAGAIN
 * (block and retry), -EPIPE (closed and drained), anything else is a failure. */

static int64_t recv_one(struct cons *cs)
{
    struct ctx *c = cs->c;
    upipe_handle *h = c->hc;
    uint32_t chunk = 0xDEADBEEF;
    int64_t rc = upipe_get(h, 0, (char *)cs->buf, c->inline_max, &chunk);
    if (rc < 0)
        return rc;
    uint16_t kind = (uint16_t)((uint64_t)rc >> 48);
    uint32_t ml = (uint32_t)(((uint64_t)rc >> 32) & 0xFFFF);
    uint32_t len = (uint32_t)((uint64_t)rc & 0xFFFFFFFFu);
    if (chunk == UINT32_MAX) {
        if ((uint64_t)ml + len > c->inline_max) {
            fail(c, "%s: inline item meta %u + len %u > %u", cs->who, ml, len, c->inline_max);
            return -EPROTO;
        }
        return got_item(cs, cs->buf + ml, len, kind, cs->buf, ml, 0) == 0 ? 1 : -EPROTO;
    }
    if (!upipe_chunk_held(h, chunk) || (c->hp != h && upipe_chunk_held(c->hp, chunk))) {
        fail(c, "%s: received chunk %u not held by the receiver (held=%d)", cs->who, chunk,
             upipe_chunk_held(h, chunk));
        return -EPROTO;
    }
    if (upipe_chunk_size(h, chunk) < (int64_t)len) {
        fail(c, "%s: chunk %u of %" PRId64 " bytes carries %u", cs->who, chunk,
             upipe_chunk_size(h, chunk), len);
        return -EPROTO;
    }
    int ok = got_item(cs, upipe_chunk_ptr(h, chunk), len, kind, cs->buf, ml, 1) == 0;
    int frc = upipe_free(h, chunk);
    if (frc != 0) {
        fail(c, "%s: upipe_free(%u) returned %d", cs->who, chunk, frc);
        return -EPROTO;
    }
    /* No "second free says -EPERM" check here: the handle is per process, so by now another
     * thread of ours may legitimately hold this chunk again (run_basic checks the double free). */
    return ok ? 1 : -EPROTO;
}

static int64_t recv_many(struct cons *cs)
{
    struct ctx *c = cs->c;
    uint32_t maxn = 1 + (uint32_t)(rnd(&cs->rng) % MAX_GET_BURST);
    int64_t rc = upipe_get_many(c->hc, 0, KIND_BULK, (char *)cs->buf, sizeof cs->buf, cs->ends,
                                maxn);
    if (rc <= 0)
        return rc == 0 ? -EPROTO : rc;
    if (rc > maxn) {
        fail(c, "%s: upipe_get_many(maxn %u) returned %" PRId64, cs->who, maxn, rc);
        return -EPROTO;
    }
    uint32_t start = 0;
    for (int64_t i = 0; i < rc; i++) {
        uint32_t end = cs->ends[i];
        if (end < start || end > sizeof cs->buf) {
            fail(c, "%s: get_many ends[%" PRId64 "] = %u after %u", cs->who, i, end, start);
            return -EPROTO;
        }
        if (got_item(cs, cs->buf + start, end - start, KIND_BULK, NULL, 0, 0) != 0)
            return -EPROTO;
        start = end;
    }
    return rc;
}

static int64_t recv_mixed(struct cons *cs)
{
    if (rnd(&cs->rng) & 1) {
        int64_t rc = recv_many(cs);
        if (rc != -EBADMSG)
            return rc;
    }
    return recv_one(cs);
}

/*
 * Take variants. A consumer holds up to MAX_HOLD unacked takes, checks each item when it takes
 * it, and counts it received only when it acks it; with take == 2 it gives one in eight back
 * instead (upipe_nack: it comes out again, maybe to another consumer). Chunk items: half are
 * freed before the ack (deferred: the chunk must stay intact until then), the others after.
 *   L7 hold: FORBIDDEN a held item changes, or its chunk leaves this handle, before the ack.
 *            FORBIDDEN an item acked twice (-ENOENT), a held chunk put (-EBUSY) or freed twice.
 *   L8 redelivery: FORBIDDEN an item given back (nack, or its taker died) that never comes out
 *            again, or comes out twice (exactly-once counting still holds: only acks count).
 */
static int finish_hold(struct cons *cs, int i)
{
    struct ctx *c = cs->c;
    upipe_handle *h = c->hc;
    struct held hd = cs->held[i];
    cs->held[i] = cs->held[--cs->nheld];
    if (hd.chunk != UINT32_MAX && !hd.dropped) {
        const uint8_t *ptr = upipe_chunk_ptr(h, hd.chunk);
        struct stamp st;
        memcpy(&st, ptr, sizeof st);
        if (!upipe_chunk_held(h, hd.chunk) || st.prod != hd.prod || st.seq != hd.seq ||
            payload_csum(ptr, hd.len) != st.csum) {
            fail(c, "%s: held chunk %u (p%u seq %" PRIu64 ") changed before the ack", cs->who,
                 hd.chunk, hd.prod, hd.seq);
            return -EPROTO;
        }
    }
    if (c->v->take == 2 && rnd(&cs->rng) % 8 == 0) {
        int rc = upipe_nack(h, hd.receipt);
        if (rc == 0) {
            atomic_fetch_add_explicit(&c->nacks, 1, memory_order_relaxed);
            return 0; /* given back, chunk and all: not ours to free any more */
        }
        if (rc != -ENOBUFS) {
            fail(c, "%s: upipe_nack returned %d", cs->who, rc);
            return -EPROTO;
        }
        /* no room to give it back now: ack it after all */
    }
    int rc = upipe_ack(h, hd.receipt);
    if (rc != 0) {
        fail(c, "%s: upipe_ack returned %d", cs->who, rc);
        return -EPROTO;
    }
    if (rnd(&cs->rng) % 16 == 0 && (rc = upipe_ack(h, hd.receipt)) != -ENOENT) {
        fail(c, "%s: a second upipe_ack of one receipt returned %d, want -ENOENT", cs->who, rc);
        return -EPROTO;
    }
    if (hd.chunk != UINT32_MAX && !hd.dropped && (rc = upipe_free(h, hd.chunk)) != 0) {
        fail(c, "%s: upipe_free of an acked chunk returned %d", cs->who, rc);
        return -EPROTO;
    }
    return mark_item(cs, hd.prod, hd.seq);
}

static int64_t recv_take(struct cons *cs)
{
    struct ctx *c = cs->c;
    upipe_handle *h = c->hc;
    if (cs->nheld == MAX_HOLD || (cs->nheld > 0 && rnd(&cs->rng) % 3 == 0))
        return finish_hold(cs, (int)(rnd(&cs->rng) % (uint64_t)cs->nheld)) == 0 ? 1 : -EPROTO;
    uint32_t chunk = 0xDEADBEEF;
    uint64_t receipt = 0;
    int64_t rc = upipe_take(h, 0, (char *)cs->buf, c->inline_max, &chunk, &receipt);
    if (rc < 0) {
        if ((rc == -ENOENT || rc == -EAGAIN || rc == -EPIPE) && cs->nheld > 0) {
            /* Nothing to take: finish what we hold before waiting. (Holding while we wait
             * could stall the producers on our slots: the head-of-line rule of takes.) */
            while (cs->nheld)
                if (finish_hold(cs, 0) != 0)
                    return -EPROTO;
            return 1;
        }
        return rc;
    }
    uint16_t kind = (uint16_t)((uint64_t)rc >> 48);
    uint32_t ml = (uint32_t)(((uint64_t)rc >> 32) & 0xFFFF);
    uint32_t len = (uint32_t)((uint64_t)rc & 0xFFFFFFFFu);
    struct stamp st;
    struct held *hd = &cs->held[cs->nheld];
    *hd = (struct held){receipt, 0, 0, chunk, len, 0};
    if (receipt == 0 || (receipt & 63) >= 64) {
        fail(c, "%s: upipe_take gave receipt %" PRIu64, cs->who, receipt);
        return -EPROTO;
    }
    if (chunk == UINT32_MAX) {
        if (check_item(cs, cs->buf + ml, len, kind, cs->buf, ml, 0, &st) != 0)
            return -EPROTO;
    } else {
        if (!upipe_chunk_held(h, chunk) || (c->hp != h && upipe_chunk_held(c->hp, chunk))) {
            fail(c, "%s: taken chunk %u not held by the taker", cs->who, chunk);
            return -EPROTO;
        }
        if (check_item(cs, upipe_chunk_ptr(h, chunk), len, kind, cs->buf, ml, 1, &st) != 0)
            return -EPROTO;
        int64_t prc;
        if (rnd(&cs->rng) % 16 == 0 &&
            (prc = upipe_put_chunk(h, 0, chunk, len, KIND_CHUNK, NULL, 0)) != -EBUSY) {
            fail(c, "%s: upipe_put_chunk of a held chunk returned %" PRId64 ", want -EBUSY",
                 cs->who, prc);
            return -EPROTO;
        }
        if (rnd(&cs->rng) & 1) {
            int frc = upipe_free(h, chunk);
            int again = (frc == 0 && rnd(&cs->rng) % 4 == 0) ? upipe_free(h, chunk) : -EPERM;
            if (frc != 0 || again != -EPERM) {
                fail(c, "%s: upipe_free of a held chunk returned %d, then %d (want 0, -EPERM)",
                     cs->who, frc, again);
                return -EPROTO;
            }
            hd->dropped = 1;
        }
    }
    hd->prod = st.prod;
    hd->seq = st.seq;
    cs->nheld++;
    return 1;
}

struct ops {
    int64_t (*send)(struct prod *, uint64_t seq, uint64_t left);
    int64_t (*recv)(struct cons *);
};

static int64_t recv_bulk_only(struct cons *cs)
{
    int64_t rc = recv_many(cs);
    if (rc == -EBADMSG)
        fail(cs->c, "%s: get_many said -EBADMSG in a bulk-only ring", cs->who);
    return rc;
}

static const struct ops OPS[] = {
    [MODE_INLINE] = {send_single, recv_one},
    [MODE_BULK] = {send_bulk, recv_bulk_only},
    [MODE_CHUNK] = {send_chunk, recv_one},
    [MODE_MIXED] = {send_mixed, recv_mixed},
    [MODE_TAKE] = {send_mixed, recv_take},
};

/* ------------------------------------------------------------------------------------------ */
/* threads                                                                                    */

static void wait_for_go(struct ctx *c)
{
    while (!atomic_load_explicit(&c->go, memory_order_acquire))
        sched_yield();
}

static void *producer_main(void *arg)
{
    struct prod *p = arg;
    struct ctx *c = p->c;
    const struct ops *ops = &OPS[c->v->mode];
    uint64_t seq = 0;
    int64_t rc = 0;
    wait_for_go(c);
    while (seq < c->per_prod && !atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        rc = ops->send(p, seq, c->per_prod - seq);
        if (rc <= 0)
            break;
        seq += (uint64_t)rc;
    }
    if (rc == -EPIPE && !c->v->close_mid && !atomic_load(&c->stop))
        fail(c, "%s: -EPIPE on a ring nobody closed", p->who);
    if (rc == -EPIPE && c->v->close_mid) {
        /* L4: after -EPIPE every put says -EPIPE */
        int64_t again = upipe_put(c->hp, 0, "x", 1, KIND_SINGLE, NULL, 0);
        if (again != -EPIPE)
            fail(c, "%s: upipe_put after -EPIPE returned %" PRId64, p->who, again);
    }
    c->sent[p->id] = seq;
    c->end_rc[p->id] = (int)(rc > 0 ? 0 : rc);
    return NULL;
}

static void *consumer_main(void *arg)
{
    struct cons *cs = arg;
    struct ctx *c = cs->c;
    const struct ops *ops = &OPS[c->v->mode];
    wait_for_go(c);
    for (;;) {
        int64_t rc = ops->recv(cs);
        if (rc > 0)
            continue;
        if (rc == -EPIPE) {
            /* L4: drained for good; nothing may come after -EPIPE. (A get may still say
             * -EAGAIN for a moment: another consumer is skipping a tombstone a put left as the
             * ring closed, or a producer has not yet published that tombstone.) */
            int64_t again;
            while ((again = recv_one(cs)) == -EAGAIN &&
                   block(c, c->hc, 0, UPIPE_WAIT_READABLE, cs->who) == 0)
                ;
            if (again != -EPIPE && !atomic_load(&c->failed))
                fail(c, "%s: get after -EPIPE returned %" PRId64, cs->who, again);
            break;
        }
        if (rc != -ENOENT && rc != -EAGAIN) {
            if (!atomic_load(&c->failed))
                fail(c, "%s: recv returned %" PRId64, cs->who, rc);
            break;
        }
        if (block(c, c->hc, 0, UPIPE_WAIT_READABLE, cs->who) < 0)
            break;
    }
    return NULL;
}

static void *recoverer_main(void *arg)
{
    struct ctx *c = arg;
    wait_for_go(c);
    uint64_t n = 0;
    do { /* at least once, however short the run */
        upipe_handle *h = (n & 1) ? c->hc : c->hp;
        int rc = upipe_recover(h);
        if (rc != 0 && rc != -EBUSY && (rc < 0 || !c->v->victims)) {
            fail(c, "recoverer: upipe_recover returned %d with nobody dead", rc);
            break;
        }
        struct upipe_stats st = {0};
        rc = upipe_stats(h, 0, &st);
        int crash = c->v->victims != 0; /* then recoveries (and their tombstones) are expected */
        if (rc != 0 || (!crash && (st.recoveries || st.aborted_puts || st.reclaimed_chunks)) ||
            st.lost_items || st.lost_leases || st.count > st.capacity) {
            fail(c,
                 "recoverer: stats rc=%d recoveries=%" PRIu64 " aborted=%" PRIu64
                 " lost=%" PRIu64 " reclaimed=%" PRIu64 " count=%" PRIu64,
                 rc, st.recoveries, st.aborted_puts, st.lost_items, st.reclaimed_chunks,
                 st.count);
            break;
        }
        n++;
        if (n % 8 == 0)
            sleep_ns(50 * 1000);
        else
            sched_yield();
    } while (!atomic_load(&c->stop));
    atomic_store(&c->recover_calls, n);
    return NULL;
}

/*
 * A victim: another process (forked before the threads start, attached like any process) that
 * takes items, holds up to VICTIM_HOLD of them, and gives them back with upipe_nack at random,
 * until the parent SIGKILLs it: mid-take, mid-move (nack), holding, or mid-recovery (its waits
 * run recovery too). It never acks, so every item it touched must come out again, once, to the
 * parent's consumers (L8). Never returns.
 *
 * Under TSan the victim is passive: it takes and holds, nothing else (no nack, no upipe_wait,
 * which runs recovery). TSan sees one process: an item moved by another process reaches the
 * parent's consumer through an edge TSan cannot follow (the payload write and the read then
 * look like a race). So there every move is done by the parent's threads (its recovery), which
 * is exactly the path TSan should check.
 */
/* In a forked test child: die with the parent, whatever way the parent goes. */
static void die_with_parent(pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(9); /* the parent was already gone */
}

static void victim_main(struct ctx *c, int id, int ready_fd, int go_fd, pid_t parent)
{
    die_with_parent(parent);
    upipe_handle *h;
    if (upipe_attach(upipe_fd(c->hp, 0), upipe_fd(c->hp, 1), upipe_fd(c->hp, 2),
                     1000 * 1000000LL, &h) != 0)
        _exit(2);
    char b = 1;
    if (write(ready_fd, &b, 1) != 1 || read(go_fd, &b, 1) != 1)
        _exit(3);
    uint64_t rng = splitmix(global_seed ^ (0x300u + (uint64_t)id));
    uint64_t held[VICTIM_HOLD];
    int n = 0;
    char buf[SLOT_SIZE];
#ifdef UNDER_TSAN
    for (;;) {
        uint32_t chunk;
        if (n < VICTIM_HOLD && upipe_take(h, 0, buf, c->inline_max, &chunk, &held[n]) >= 0)
            n++;
        else
            sleep_ns(1000 * 1000);
    }
#endif
    for (;;) {
        if (n < VICTIM_HOLD && rnd(&rng) % 4 != 0) {
            uint32_t chunk;
            uint64_t receipt;
            int64_t rc = upipe_take(h, 0, buf, c->inline_max, &chunk, &receipt);
            if (rc >= 0) {
                held[n++] = receipt;
                continue;
            }
            if (rc != -ENOENT && rc != -EAGAIN && rc != -EPIPE)
                _exit(4);
            if (n == 0) {
                upipe_wait(h, 0, UPIPE_WAIT_READABLE, now_ns() + 150 * 1000000LL);
                continue;
            }
        }
        if (n == 0)
            continue;
        int i = (int)(rnd(&rng) % (uint64_t)n);
        int rc = upipe_nack(h, held[i]);
        if (rc == 0)
            held[i] = held[--n];
        else if (rc != -ENOBUFS)
            _exit(5);
        sleep_ns(20 * 1000);
    }
}

/* Fork the variant's victims (before any thread exists). 0, or -1 after recording a failure. */
static int start_victims(struct ctx *c, int go_pipe[2])
{
    int ready[2];
    if (pipe(ready) != 0 || pipe(go_pipe) != 0) {
        fail(c, "pipe failed");
        return -1;
    }
    pid_t parent = getpid();
    for (int i = 0; i < c->v->victims; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            fail(c, "fork failed");
            break;
        }
        if (pid == 0) {
            close(ready[0]);
            close(go_pipe[1]);
            victim_main(c, i, ready[1], go_pipe[0], parent);
        }
        live_children[c->nvictims] = pid;
        c->victim_pid[c->nvictims++] = pid;
    }
    close(ready[1]);
    close(go_pipe[0]);
    for (int i = 0; i < c->nvictims; i++) {
        char b;
        if (read(ready[0], &b, 1) != 1) {
            fail(c, "victim %d did not attach", i);
            break;
        }
    }
    close(ready[0]);
    return atomic_load(&c->failed) ? -1 : 0;
}

/* Kill victim i by SIGKILL and reap it (so recovery sees it dead either way). */
static void kill_victim(struct ctx *c, int i)
{
    if (c->victim_pid[i] <= 0)
        return;
    kill(c->victim_pid[i], SIGKILL);
    int status;
    while (waitpid(c->victim_pid[i], &status, 0) < 0 && errno == EINTR)
        ;
    live_children[i] = 0;
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
        fail(c, "victim %d ended with status %#x before it was killed", i, status);
    c->victim_pid[i] = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* one variant                                                                                */

static void make_config(struct upipe_config *cfg, uint64_t capacity, uint64_t limit)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->ndata_rings = 1;
    cfg->slot_size = SLOT_SIZE;
    cfg->capacity = capacity;
    cfg->limit = limit;
    cfg->nclasses = 3;
    for (int i = 0; i < 3; i++) {
        cfg->chunk_size[i] = CHUNK_SIZES[i];
        cfg->nchunks[i] = CHUNK_COUNTS[i];
    }
}

/* Poll (1 ms) until cond(c) or the deadline / a failure. */
static int poll_until(struct ctx *c, int (*cond)(struct ctx *))
{
    while (!cond(c)) {
        if (atomic_load(&c->failed))
            return -1;
        if (now_ns() >= c->deadline)
            return -1;
        sleep_ns(1000 * 1000);
    }
    return 0;
}

static uint64_t expected_total(struct ctx *c)
{
    return c->per_prod * (uint64_t)c->v->nprod;
}

static int all_received(struct ctx *c)
{
    return atomic_load(&c->received) >= expected_total(c);
}

/* After every thread is gone: the closed ring refuses everything and holds nothing. */
static void check_closed_state(struct ctx *c)
{
    upipe_handle *h = c->hc;
    uint8_t buf[MAX_BURST * SLOT_SIZE];
    uint32_t ends[MAX_BURST], lens[1] = {STAMP_SIZE}, chunk;
    int64_t rc;
    if ((rc = upipe_get(h, 0, (char *)buf, c->inline_max, &chunk)) != -EPIPE)
        fail(c, "closed+drained: upipe_get returned %" PRId64 " (an item nobody received?)", rc);
    if ((rc = upipe_get_many(h, 0, KIND_BULK, (char *)buf, sizeof buf, ends, MAX_BURST)) !=
        -EPIPE)
        fail(c, "closed+drained: upipe_get_many returned %" PRId64, rc);
    if ((rc = upipe_put(c->hp, 0, (const char *)buf, STAMP_SIZE, KIND_SINGLE, NULL, 0)) != -EPIPE)
        fail(c, "closed: upipe_put returned %" PRId64, rc);
    if ((rc = upipe_put_many(c->hp, 0, (const char *)buf, lens, 1, KIND_BULK)) != -EPIPE)
        fail(c, "closed: upipe_put_many returned %" PRId64, rc);
    if ((rc = upipe_alloc(c->hp, 64, &chunk)) != 0) {
        fail(c, "closed: upipe_alloc returned %" PRId64 " with every chunk free", rc);
    } else {
        if ((rc = upipe_put_chunk(c->hp, 0, chunk, 64, KIND_CHUNK, NULL, 0)) != -EPIPE)
            fail(c, "closed: upipe_put_chunk returned %" PRId64, rc);
        if ((rc = upipe_free(c->hp, chunk)) != 0)
            fail(c, "closed: upipe_free after a refused put_chunk returned %" PRId64, rc);
    }
    if (upipe_ready(h, 0, UPIPE_WAIT_READABLE) != 1 || upipe_ready(h, 0, UPIPE_WAIT_WRITABLE) != 1)
        fail(c, "closed: upipe_ready should say 1 for both (closed wakes everyone)");
    if ((rc = upipe_wait(h, 0, UPIPE_WAIT_READABLE, now_ns() + 1000 * 1000000LL)) != 0)
        fail(c, "closed: upipe_wait(READABLE) returned %" PRId64 ", want 0 at once", rc);
}

static int run_variant(const struct variant *v, uint64_t iters, int64_t timeout_ns, int verbose)
{
    current_variant = v->name;
    int64_t t_start = now_ns();
    alarm((unsigned)(timeout_ns / 1000000000LL) + 15);

    struct ctx *c = calloc(1, sizeof *c);
    if (!c) {
        fail(NULL, "out of memory");
        return EXIT_FAIL;
    }
    c->v = v;
    c->seed = global_seed;
    c->per_prod = iters / (uint64_t)v->nprod;
    if (c->per_prod < (v->close_mid ? 256 : 16))
        c->per_prod = v->close_mid ? 256 : 16; /* close: per_prod - close_at > capacity */
    c->deadline = t_start + timeout_ns;
    /* Each producer could send per_prod, but the close comes when a quarter of the total has
     * arrived; at most `capacity` more are in flight, so every producer sees -EPIPE. */
    c->close_at = c->per_prod * (uint64_t)v->nprod / 4;

    struct upipe_config cfg;
    make_config(&cfg, v->capacity, v->limit);
    int rc = upipe_create(&cfg, &c->hp);
    if (rc == -ENOSYS || rc == -EOPNOTSUPP) {
        fprintf(stderr, "SKIP: upipe_create: %s\n", strerror(-rc));
        free(c);
        return EXIT_SKIP;
    }
    if (rc != 0) {
        fail(NULL, "upipe_create returned %d (%s)", rc, strerror(-rc));
        free(c);
        return EXIT_FAIL;
    }
    c->hc = c->hp;
#ifndef UNDER_TSAN
    if (v->cross) {
        rc = upipe_attach(upipe_fd(c->hp, 0), upipe_fd(c->hp, 1), upipe_fd(c->hp, 2),
                          1000 * 1000000LL, &c->hc);
        if (rc != 0) {
            fail(NULL, "upipe_attach returned %d", rc);
            upipe_handle_unref(c->hp);
            free(c);
            return EXIT_FAIL;
        }
    }
#endif
    if (v->nospin) {
        upipe_set_spin(c->hp, 0);
        upipe_set_spin(c->hc, 0);
    }
    c->inline_max = upipe_inline_max(c->hp, 0);
    if (c->inline_max != SLOT_SIZE - 32 || upipe_inline_max(c->hc, 0) != c->inline_max) {
        fail(c, "inline_max %u, want %u", c->inline_max, SLOT_SIZE - 32);
        c->inline_max = SLOT_SIZE - 32;
    }
    for (int i = 0; i < v->nprod; i++) {
        c->seen[i] = calloc(c->per_prod, 1);
        if (!c->seen[i])
            fail(c, "out of memory");
    }

    c->unordered = v->take == 2 || v->victims;
    int go_pipe[2] = {-1, -1};
    if (v->victims && !atomic_load(&c->failed))
        start_victims(c, go_pipe); /* before any thread: fork copies only the caller */

    static struct prod prods[MAX_PROD];
    static struct cons conss[MAX_CONS];
    pthread_t tp[MAX_PROD], tc[MAX_CONS], tr;
    int np = 0, nc = 0, have_r = 0;
    memset(prods, 0, sizeof prods);
    memset(conss, 0, sizeof conss);
    for (int i = 0; i < v->nprod && !atomic_load(&c->failed); i++) {
        struct prod *p = &prods[i];
        p->c = c;
        p->id = (uint32_t)i;
        p->rng = splitmix(global_seed ^ (0x100u + (uint64_t)i));
        snprintf(p->who, sizeof p->who, "producer %d", i);
        if (pthread_create(&tp[i], NULL, producer_main, p) != 0) {
            fail(c, "pthread_create failed");
            break;
        }
        np++;
    }
    for (int i = 0; i < v->ncons && !atomic_load(&c->failed); i++) {
        struct cons *cs = &conss[i];
        cs->c = c;
        cs->id = (uint32_t)i;
        cs->rng = splitmix(global_seed ^ (0x200u + (uint64_t)i));
        snprintf(cs->who, sizeof cs->who, "consumer %d", i);
        if (pthread_create(&tc[i], NULL, consumer_main, cs) != 0) {
            fail(c, "pthread_create failed");
            break;
        }
        nc++;
    }
    if (v->recoverer && !atomic_load(&c->failed)) {
        if (pthread_create(&tr, NULL, recoverer_main, c) != 0)
            fail(c, "pthread_create failed");
        else
            have_r = 1;
    }
    atomic_store_explicit(&c->go, 1, memory_order_release); /* one flag starts everyone */
    if (go_pipe[1] >= 0) {
        char go[MAX_VICTIMS] = {0};
        if (write(go_pipe[1], go, (size_t)c->nvictims) != c->nvictims)
            fail(c, "could not start the victims");
        close(go_pipe[1]);
        /* Kill them one by one while the stream runs: victim k when (k+1)/(n+2) of the items
         * have been received (so they die in the thick of it, each at a different moment). */
        for (int k = 0; k < c->nvictims; k++) {
            uint64_t at = expected_total(c) * (uint64_t)(k + 1) / (uint64_t)(c->nvictims + 2);
            uint64_t seen = atomic_load(&c->received);
            int64_t progress = now_ns();
            while (seen < at && !atomic_load(&c->failed) && now_ns() < c->deadline) {
                sleep_ns(200 * 1000 + (int64_t)(rnd(&c->seed) % 800) * 1000);
                uint64_t r = atomic_load(&c->received);
                if (r != seen)
                    seen = r, progress = now_ns();
                else if (now_ns() - progress > 200 * 1000000LL)
                    break; /* stalled: the victims may hold every slot (head-of-line) */
            }
            kill_victim(c, k);
        }
    }

    for (int i = 0; i < np; i++)
        pthread_join(tp[i], NULL);
    atomic_store(&c->producers_done, 1);

    if (!v->close_mid && !atomic_load(&c->failed)) {
        if (poll_until(c, all_received) != 0 && !atomic_load(&c->failed)) {
            fail(c, "only %" PRIu64 " of %" PRIu64 " items arrived by the deadline",
                 atomic_load(&c->received), expected_total(c));
            dump_stats(c->hp);
        }
        /* Quiescent, not closed: empty and writable; a get says -ENOENT, not -EPIPE / -EAGAIN. */
        if (!atomic_load(&c->failed)) {
            struct upipe_stats st;
            uint8_t buf[SLOT_SIZE];
            uint32_t chunk;
            int64_t g = upipe_get(c->hc, 0, (char *)buf, c->inline_max, &chunk);
            if (upipe_stats(c->hp, 0, &st) != 0 || st.count != 0 || st.head != st.tail ||
                st.closed || g != -ENOENT || upipe_ready(c->hc, 0, UPIPE_WAIT_READABLE) != 0 ||
                upipe_ready(c->hp, 0, UPIPE_WAIT_WRITABLE) != 1) {
                fail(c, "drained ring: count=%" PRIu64 " head=%" PRIu64 " tail=%" PRIu64
                        " closed=%u get=%" PRId64,
                     st.count, st.head, st.tail, st.closed, g);
            }
        }
        atomic_store(&c->t_close, now_ns());
        upipe_close(c->hp, 0); /* the consumers, asleep in upipe_wait, wake and see -EPIPE */
    }
    for (int i = 0; i < nc; i++)
        pthread_join(tc[i], NULL);
    int64_t t_close = atomic_load(&c->t_close);
    int64_t close_ms = t_close ? (now_ns() - t_close) / 1000000 : -1;
    atomic_store(&c->stop, 1);
    if (have_r)
        pthread_join(tr, NULL);
    for (int k = 0; k < c->nvictims; k++)
        kill_victim(c, k); /* (a failure path that left one alive) */
    if (v->victims)
        upipe_recover(c->hp); /* whatever no waiter had to repair yet */

    /* Totals: every item sent was received exactly once, nothing else was. */
    if (!atomic_load(&c->failed)) {
        uint64_t sent_total = 0;
        for (int i = 0; i < v->nprod; i++) {
            sent_total += c->sent[i];
            if (!v->close_mid && c->sent[i] != c->per_prod)
                fail(c, "producer %d sent %" PRIu64 " of %" PRIu64 " (rc %d)", i, c->sent[i],
                     c->per_prod, c->end_rc[i]);
            if (v->close_mid && c->end_rc[i] != -EPIPE)
                fail(c, "producer %d ended with %d after close, want -EPIPE (sent %" PRIu64 ")",
                     i, c->end_rc[i], c->sent[i]);
            for (uint64_t s = 0; s < c->per_prod; s++) {
                uint8_t n = atomic_load_explicit(&c->seen[i][s], memory_order_relaxed);
                uint8_t want = s < c->sent[i] ? 1 : 0;
                if (n != want) {
                    fail(c, "p%d seq %" PRIu64 " received %u times, want %u (sent %" PRIu64 ")",
                         i, s, n, want, c->sent[i]);
                    break;
                }
            }
        }
        if (atomic_load(&c->received) != sent_total)
            fail(c, "received %" PRIu64 " items, sent %" PRIu64, atomic_load(&c->received),
                 sent_total);
        if (close_ms > 1000)
            fail(c, "consumers took %" PRId64 " ms to see -EPIPE after close()", close_ms);
    }
    if (!atomic_load(&c->failed))
        check_closed_state(c);
    if (!atomic_load(&c->failed)) {
        struct upipe_stats st;
        upipe_stats(c->hp, 0, &st);
        int want_actors = c->hc != c->hp ? 2 : 1;
        int crash = v->victims != 0; /* dead takers: recovered; a move they were in the middle
                                      * of may have left a tombstone (aborted_puts) */
        uint64_t nacks = atomic_load(&c->nacks);
        if ((crash ? st.redelivered < nacks : st.redelivered != nacks) ||
            (crash && st.recoveries != (uint64_t)v->victims))
            fail(c, "redelivered=%" PRIu64 " (consumers nacked %" PRIu64 "), recoveries=%" PRIu64,
                 st.redelivered, nacks, st.recoveries);
        if ((!crash && (st.aborted_puts || st.recoveries || st.reclaimed_chunks)) ||
            st.lost_items || st.lost_leases || st.actors != (uint32_t)want_actors ||
            (!v->close_mid && !crash && st.tombstones_skipped))
            fail(c,
                 "stats: aborted=%" PRIu64 " lost=%" PRIu64 " recoveries=%" PRIu64
                 " reclaimed=%" PRIu64 " lost_leases=%" PRIu64 " actors=%u tombstones=%" PRIu64,
                 st.aborted_puts, st.lost_items, st.recoveries, st.reclaimed_chunks,
                 st.lost_leases, st.actors, st.tombstones_skipped);
        for (uint32_t k = 0; k < st.nclasses; k++)
            if (st.class_free[k] != st.class_total[k])
                fail(c, "class %u: %" PRIu64 " of %" PRIu64 " chunks free at the end", k,
                     st.class_free[k], st.class_total[k]);
        uint64_t nchunks = 0;
        for (int k = 0; k < 3; k++)
            nchunks += CHUNK_COUNTS[k];
        for (uint32_t ch = 0; ch < nchunks; ch++)
            if (upipe_chunk_held(c->hp, ch) || upipe_chunk_held(c->hc, ch))
                fail(c, "chunk %u still held at the end", ch);
        if (v->nospin && atomic_load(&c->slow_waits) > MAX_SLOW_WAITS)
            fail(c,
                 "%" PRIu64 " of %" PRIu64 " waits slept >= 90 ms while the peer was busy: "
                 "lost wakeups (rescued by the 100 ms recovery slice)",
                 atomic_load(&c->slow_waits), atomic_load(&c->waits));
        if (v->recoverer && atomic_load(&c->recover_calls) == 0)
            fail(c, "the recoverer never ran");
    }

    int failed = atomic_load(&c->failed) != 0;
    if (verbose || failed) {
        uint64_t tombs = 0, redel = 0;
        struct upipe_stats st;
        if (upipe_stats(c->hp, 0, &st) == 0)
            tombs = st.tombstones_skipped, redel = st.redelivered;
        fprintf(stderr,
                "%-26s %-6s %dx%d cap=%-3" PRIu64 " items=%-7" PRIu64 " waits=%-7" PRIu64
                " slow=%" PRIu64 " recover=%" PRIu64 " tombs=%" PRIu64 " redeliv=%" PRIu64
                " close->EPIPE=%" PRId64 "ms %6.3fs %s\n",
                v->name, MODE_NAMES[v->mode], v->nprod, v->ncons, v->capacity,
                atomic_load(&c->received), atomic_load(&c->waits), atomic_load(&c->slow_waits),
                atomic_load(&c->recover_calls), tombs, redel, close_ms,
                (double)(now_ns() - t_start) / 1e9, failed ? "FAIL" : "ok");
    }
    if (c->hc != c->hp)
        upipe_handle_unref(c->hc);
    upipe_handle_unref(c->hp);
    for (int i = 0; i < v->nprod; i++)
        free((void *)c->seen[i]);
    free(c);
    alarm(0);
    return failed ? EXIT_FAIL : EXIT_PASS;
}

/* ------------------------------------------------------------------------------------------ */
/* single-threaded API checks                                                                 */

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fail(NULL, __VA_ARGS__);                                                               \
            ok = 0;                                                                                \
        }                                                                                          \
    } while (0)

static int run_basic(void)
{
    current_variant = "basic";
    alarm(30);
    int ok = 1;
    struct upipe_config cfg;
    make_config(&cfg, 4, 0);
    CHECK(upipe_abi_version() == UPIPE_ABI_VERSION, "abi version");
    struct upipe_config bad = cfg;
    bad.capacity = 3;
    CHECK(upipe_segment_size(&bad) == -EINVAL, "capacity 3 accepted");
    CHECK(upipe_segment_size(&cfg) > 0, "segment size");
    upipe_handle *h;
    int rc = upipe_create(&cfg, &h);
    if (rc == -ENOSYS || rc == -EOPNOTSUPP) {
        fprintf(stderr, "SKIP: upipe_create: %s\n", strerror(-rc));
        return EXIT_SKIP;
    }
    if (rc != 0) {
        fail(NULL, "upipe_create returned %d", rc);
        return EXIT_FAIL;
    }
    uint32_t im = upipe_inline_max(h, 0);
    char buf[SLOT_SIZE] = {0}, out[SLOT_SIZE];
    uint32_t chunk;
    int64_t r;
    CHECK(im == SLOT_SIZE - 32, "inline_max %u", im);
    CHECK((r = upipe_get(h, 0, out, im, &chunk)) == -ENOENT, "get on empty: %" PRId64, r);
    CHECK((r = upipe_get(h, 0, out, im - 1, &chunk)) == -EINVAL, "get outcap < inline_max: %" PRId64, r);
    CHECK((r = upipe_get(h, 1, out, im, &chunk)) == -EINVAL, "get on ring 1: %" PRId64, r);
    CHECK((r = upipe_put(h, 0, buf, im + 1, 2, NULL, 0)) == -EMSGSIZE, "put too big: %" PRId64, r);
    CHECK((r = upipe_put(h, 0, buf, 4, KIND_TOMBSTONE, NULL, 0)) == -EINVAL,
          "put of the tombstone kind: %" PRId64, r);
    CHECK(upipe_ready(h, 0, UPIPE_WAIT_READABLE) == 0, "empty ring readable");
    CHECK((rc = upipe_wait(h, 0, UPIPE_WAIT_READABLE, now_ns() + 2000000)) == -ETIMEDOUT,
          "wait READABLE on empty: %d", rc);
    for (int i = 0; i < 4; i++) {
        buf[0] = (char)i;
        CHECK((r = upipe_put(h, 0, buf, 1 + (uint32_t)i, (uint16_t)(10 + i), "mm", 2)) == 0,
              "put %d: %" PRId64, i, r);
    }
    CHECK((r = upipe_put(h, 0, buf, 1, 2, NULL, 0)) == -ENOBUFS, "put on full: %" PRId64, r);
    CHECK(upipe_ready(h, 0, UPIPE_WAIT_WRITABLE) == 0, "full ring writable");
    CHECK((rc = upipe_wait(h, 0, UPIPE_WAIT_WRITABLE, now_ns() + 2000000)) == -ETIMEDOUT,
          "wait WRITABLE on full: %d", rc);
    CHECK((rc = upipe_spin(h, 0, UPIPE_WAIT_WRITABLE, 100000)) == 0, "spin WRITABLE on full: %d", rc);
    for (int i = 0; i < 2; i++) {
        r = upipe_get(h, 0, out, im, &chunk);
        CHECK(r >= 0 && (r >> 48) == 10 + i && ((r >> 32) & 0xFFFF) == 2 && (r & 0xFFFFFFFF) == 1 + i &&
                  memcmp(out, "mm", 2) == 0 && out[2] == (char)i && chunk == UINT32_MAX,
              "FIFO get %d: %" PRId64, i, r);
    }
    struct upipe_stats st;
    CHECK(upipe_stats(h, 0, &st) == 0 && st.count == 2 && st.capacity == 4, "stats count %" PRIu64,
          st.count);
    /* chunks: exhaust class 0, wait for one, free, double free */
    uint32_t got[8];
    int n = 0;
    while (n < 8 && upipe_alloc(h, 100, &got[n]) == 0)
        n++;
    CHECK(n == (int)CHUNK_COUNTS[0], "allocated %d chunks of class 0, want %u", n, CHUNK_COUNTS[0]);
    CHECK((r = upipe_alloc(h, 100, &chunk)) == -ENOBUFS, "alloc on empty class: %" PRId64, r);
    CHECK(upipe_class_for(h, 100) == 0 && upipe_class_for(h, 129) == 1 &&
              upipe_class_for(h, 4097) == -EMSGSIZE,
          "class_for");
    CHECK((r = upipe_alloc(h, 5000, &chunk)) == -EMSGSIZE, "alloc too big: %" PRId64, r);
    CHECK((rc = upipe_wait(h, 0, UPIPE_WAIT_CHUNK, now_ns() + 2000000)) == -ETIMEDOUT,
          "wait CHUNK on empty class: %d", rc);
    CHECK((rc = upipe_wait(h, 3, UPIPE_WAIT_CHUNK, now_ns() + 2000000)) == -EINVAL,
          "wait CHUNK on class 3 of 3: %d", rc);
    for (int i = 0; i < n; i++)
        CHECK(upipe_free(h, got[i]) == 0, "free %d", i);
    CHECK(upipe_free(h, got[0]) == -EPERM, "double free not refused");
    CHECK(upipe_wait(h, 0, UPIPE_WAIT_CHUNK, now_ns() + 2000000) == 0, "wait CHUNK with free chunks");
    /* close: the two queued items drain, then -EPIPE */
    CHECK(upipe_close(h, 0) == 0, "close");
    CHECK((r = upipe_put(h, 0, buf, 1, 2, NULL, 0)) == -EPIPE, "put after close: %" PRId64, r);
    for (int i = 2; i < 4; i++) {
        r = upipe_get(h, 0, out, im, &chunk);
        CHECK(r >= 0 && (r >> 48) == 10 + i, "drain after close %d: %" PRId64, i, r);
    }
    CHECK((r = upipe_get(h, 0, out, im, &chunk)) == -EPIPE, "get after drain: %" PRId64, r);
    CHECK(upipe_recover(h) == 0, "recover with nobody dead");
    upipe_handle_unref(h);
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/*
 * Regression (found by this test, fixed in upipe_ring_writable): with limit (maxsize) < capacity,
 * a ring holding `limit` items refuses puts (-ENOBUFS), so it must not look writable either;
 * otherwise upipe_ready/upipe_spin/upipe_wait(WRITABLE) return at once and a blocking put spins at
 * 100% CPU instead of sleeping, and upipe_wait never times out.
 */
static int run_limit_wait(void)
{
    current_variant = "limit_wait";
    alarm(30);
    int ok = 1;
    struct upipe_config cfg;
    make_config(&cfg, 8, 3);
    upipe_handle *h;
    int rc = upipe_create(&cfg, &h);
    if (rc != 0) {
        fail(NULL, "upipe_create returned %d", rc);
        return EXIT_FAIL;
    }
    char buf[8] = {0};
    for (int i = 0; i < 3; i++)
        CHECK(upipe_put(h, 0, buf, 1, 2, NULL, 0) == 0, "put %d", i);
    int64_t r = upipe_put(h, 0, buf, 1, 2, NULL, 0);
    CHECK(r == -ENOBUFS, "put beyond limit: %" PRId64, r);
    CHECK((rc = upipe_ready(h, 0, UPIPE_WAIT_WRITABLE)) == 0,
          "upipe_ready(WRITABLE) = %d on a ring at its limit (put says -ENOBUFS)", rc);
    int64_t t0 = now_ns();
    rc = upipe_wait(h, 0, UPIPE_WAIT_WRITABLE, t0 + 20 * 1000000LL);
    CHECK(rc == -ETIMEDOUT, "upipe_wait(WRITABLE) on a ring at its limit returned %d after %" PRId64
                            " us, want -ETIMEDOUT after 20 ms",
          rc, (now_ns() - t0) / 1000);
    upipe_handle_unref(h);
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/* ------------------------------------------------------------------------------------------ */
/* take / ack / nack, single-threaded; and deaths at every step of a redelivery (fork)         */

/* The payload length of a get/take result (or the error). */
static int64_t LEN(int64_t rc)
{
    return rc < 0 ? rc : (int64_t)(rc & 0xFFFFFFFF);
}

/* A small test item: "item-NN" inline, or the same in a chunk of 100 bytes (meta "cc"). */
static int put_test_item(upipe_handle *h, int id, int as_chunk)
{
    char body[16];
    snprintf(body, sizeof body, "item-%02d", id);
    if (!as_chunk)
        return (int)upipe_put(h, 0, body, (uint32_t)strlen(body), 2, NULL, 0);
    uint32_t chunk;
    int64_t rc = upipe_alloc(h, 100, &chunk);
    if (rc != 0)
        return (int)rc;
    uint8_t *p = upipe_chunk_ptr(h, chunk);
    memset(p, id, 100);
    memcpy(p, body, strlen(body));
    return (int)upipe_put_chunk(h, 0, chunk, 100, KIND_CHUNK, "cc", 2);
}

/* Get one test item: its id, -ENOENT when empty, or -EPROTO if damaged (chunk checked, freed). */
static int get_test_item(upipe_handle *h)
{
    char out[SLOT_SIZE];
    uint32_t chunk;
    int64_t rc = upipe_get(h, 0, out, upipe_inline_max(h, 0), &chunk);
    if (rc < 0)
        return (int)rc;
    uint32_t len = (uint32_t)(rc & 0xFFFFFFFF), ml = (uint32_t)((rc >> 32) & 0xFFFF);
    int id = -1;
    if (chunk == UINT32_MAX) {
        if (len != 7 || ml != 0 || sscanf(out, "item-%2d", &id) != 1)
            return -EPROTO;
        return id;
    }
    const uint8_t *p = upipe_chunk_ptr(h, chunk);
    int ok = len == 100 && ml == 2 && memcmp(out, "cc", 2) == 0 &&
             sscanf((const char *)p, "item-%2d", &id) == 1;
    for (uint32_t i = 7; ok && i < 100; i++)
        ok = p[i] == (uint8_t)id;
    if (upipe_free(h, chunk) != 0)
        ok = 0;
    return ok ? id : -EPROTO;
}

/* Drain the ring: every id in [0, n) exactly once, nothing else. */
static int drain_exactly(upipe_handle *h, int n, const char *what)
{
    int seen[16] = {0}, id, ok = 1;
    while ((id = get_test_item(h)) >= 0) {
        if (id >= n || id >= 16 || seen[id]++) {
            fail(NULL, "%s: item %d came out twice (or was never sent)", what, id);
            ok = 0;
        }
    }
    if (id != -ENOENT) {
        fail(NULL, "%s: get returned %d while draining", what, id);
        ok = 0;
    }
    for (int i = 0; i < n && i < 16; i++)
        if (!seen[i]) {
            fail(NULL, "%s: item %d never came out (lost)", what, i);
            ok = 0;
        }
    return ok;
}

/* The segment is as new: empty, every chunk free, one process attached; and nothing wedged. */
static int check_clean(upipe_handle *h, const char *what)
{
    int ok = 1;
    struct upipe_stats st;
    upipe_stats(h, 0, &st);
    CHECK(st.count == 0 && st.actors == 1 && st.lost_items == 0 && st.lost_leases == 0,
          "%s: count=%" PRIu64 " actors=%u lost=%" PRIu64 " lost_leases=%" PRIu64, what,
          st.count, st.actors, st.lost_items, st.lost_leases);
    for (uint32_t k = 0; k < st.nclasses; k++)
        CHECK(st.class_free[k] == st.class_total[k], "%s: class %u: %" PRIu64 " of %" PRIu64
              " chunks free", what, k, st.class_free[k], st.class_total[k]);
    for (int round = 0; round < 2 && ok; round++) { /* the whole ring, twice: no slot stuck */
        for (int i = 0; i < (int)st.capacity; i++)
            CHECK(put_test_item(h, i, i == 1) == 0, "%s: put %d after recovery", what, i);
        ok = ok && drain_exactly(h, (int)st.capacity, what);
    }
    return ok;
}

static int run_take_basic(void)
{
    current_variant = "take_basic";
    alarm(30);
    int ok = 1;
    struct upipe_config cfg;
    make_config(&cfg, 4, 0);
    upipe_handle *h;
    if (upipe_create(&cfg, &h) != 0) {
        fail(NULL, "upipe_create failed");
        return EXIT_FAIL;
    }
    uint32_t im = upipe_inline_max(h, 0), chunk;
    char out[SLOT_SIZE];
    uint64_t r0 = 0, r1 = 0;
    int64_t r;
    int rc;
    struct upipe_stats st;
    CHECK((r = upipe_take(h, 0, out, im, &chunk, &r0)) == -ENOENT, "take on empty: %" PRId64, r);
    CHECK((r = upipe_take(h, 0, out, im - 1, &chunk, &r0)) == -EINVAL, "take, small out: %" PRId64, r);
    CHECK((r = upipe_take(h, 1, out, im, &chunk, &r0)) == -EINVAL, "take on ring 1: %" PRId64, r);
    /* inline round trip; the held slot stays busy (head-of-line) until the ack */
    CHECK(upipe_put(h, 0, "abc", 3, 10, "mm", 2) == 0, "put");
    r = upipe_take(h, 0, out, im, &chunk, &r0);
    CHECK(r >= 0 && (r >> 48) == 10 && ((r >> 32) & 0xFFFF) == 2 && (r & 0xFFFFFFFF) == 3 &&
              memcmp(out, "mmabc", 5) == 0 && chunk == UINT32_MAX && r0 != 0,
          "take: %" PRId64 " receipt %" PRIu64, r, r0);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.count == 0, "a taken item is not counted");
    for (int i = 1; i < 4; i++)
        CHECK(put_test_item(h, i, 0) == 0, "put %d beside a held slot", i);
    CHECK((rc = put_test_item(h, 4, 0)) == -ENOBUFS, "put onto the held slot: %d", rc);
    CHECK(upipe_ready(h, 0, UPIPE_WAIT_WRITABLE) == 0, "writable with the next slot held");
    CHECK(upipe_ack(h, r0) == 0, "ack");
    CHECK((rc = upipe_ack(h, r0)) == -ENOENT, "second ack: %d", rc);
    CHECK((rc = upipe_nack(h, r0)) == -ENOENT, "nack after ack: %d", rc);
    CHECK((rc = upipe_ack(h, 0)) == -ENOENT && (rc = upipe_ack(h, r0 + 64)) == -ENOENT &&
              (rc = upipe_ack(h, 12345)) == -ENOENT,
          "ack of a bogus receipt: %d", rc);
    CHECK(put_test_item(h, 4, 0) == 0, "put after the ack");
    /* nack: the item comes back at the tail end, counted */
    r = LEN(upipe_take(h, 0, out, im, &chunk, &r1));
    CHECK(r == 7 && memcmp(out, "item-01", 7) == 0, "take item 1: %" PRId64, r);
    CHECK(upipe_nack(h, r1) == 0, "nack");
    CHECK((rc = upipe_ack(h, r1)) == -ENOENT, "ack after nack: %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.redelivered == 1 && st.count == 4,
          "after nack: redelivered %" PRIu64 " count %" PRIu64, st.redelivered, st.count);
    for (int want = 2; want <= 5; want++) {
        int id = get_test_item(h);
        CHECK(id == (want == 5 ? 1 : want), "after nack, get %d: %d", want, id);
    }
    /* chunk items: HELD until the ack; a free before it is deferred */
    CHECK(put_test_item(h, 7, 1) == 0, "put chunk");
    r = LEN(upipe_take(h, 0, out, im, &chunk, &r0));
    CHECK(r == 100 && chunk != UINT32_MAX && upipe_chunk_held(h, chunk), "take chunk: %" PRId64, r);
    uint64_t free_before = (upipe_stats(h, 0, &st), st.class_free[0]);
    CHECK((r = upipe_put_chunk(h, 0, chunk, 100, KIND_CHUNK, NULL, 0)) == -EBUSY,
          "put_chunk of a held chunk: %" PRId64, r);
    CHECK(upipe_free(h, chunk) == 0, "free of a held chunk (deferred)");
    CHECK((rc = upipe_free(h, chunk)) == -EPERM, "second free of a held chunk: %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.class_free[0] == free_before && upipe_chunk_held(h, chunk) &&
              memcmp(upipe_chunk_ptr(h, chunk), "item-07", 7) == 0,
          "a deferred chunk stays intact until the ack");
    CHECK(upipe_ack(h, r0) == 0, "ack chunk");
    CHECK(upipe_stats(h, 0, &st) == 0 && st.class_free[0] == free_before + 1 &&
              !upipe_chunk_held(h, chunk),
          "the ack frees a dropped chunk");
    CHECK(put_test_item(h, 8, 1) == 0, "put chunk");
    r = LEN(upipe_take(h, 0, out, im, &chunk, &r0));
    CHECK(r == 100 && upipe_ack(h, r0) == 0 && upipe_chunk_held(h, chunk), "acked, still held");
    CHECK(upipe_free(h, chunk) == 0 && !upipe_chunk_held(h, chunk), "free after the ack");
    /* a closed ring is drained for good although this handle holds a take (ours only) */
    CHECK(put_test_item(h, 9, 0) == 0, "put");
    CHECK(LEN(upipe_take(h, 0, out, im, &chunk, &r0)) == 7, "take before close");
    upipe_close(h, 0);
    CHECK((r = upipe_take(h, 0, out, im, &chunk, &r1)) == -EPIPE, "take, closed: %" PRId64, r);
    CHECK((r = upipe_get(h, 0, out, im, &chunk)) == -EPIPE, "get, closed: %" PRId64, r);
    CHECK(upipe_ack(h, r0) == 0, "ack after close");
    CHECK(upipe_stats(h, 0, &st) == 0 && st.lost_items == 0 && st.recoveries == 0,
          "no recovery ran");
    upipe_handle_unref(h);

    /* UPIPE_MAX_HOLDS per process */
    make_config(&cfg, 64, 0);
    if (upipe_create(&cfg, &h) != 0) {
        fail(NULL, "upipe_create failed");
        return EXIT_FAIL;
    }
    uint64_t rs[UPIPE_MAX_HOLDS];
    for (int i = 0; i < UPIPE_MAX_HOLDS + 2; i++)
        CHECK(put_test_item(h, i % 16, 0) == 0, "put %d", i);
    for (int i = 0; i < UPIPE_MAX_HOLDS; i++)
        CHECK(LEN(upipe_take(h, 0, out, im, &chunk, &rs[i])) == 7, "take %d", i);
    CHECK((r = upipe_take(h, 0, out, im, &chunk, &r0)) == -EDQUOT, "take beyond the limit: %" PRId64, r);
    CHECK(LEN(upipe_get(h, 0, out, im, &chunk)) == 7, "a get still works with every hold taken");
    CHECK(upipe_ack(h, rs[5]) == 0 && LEN(upipe_take(h, 0, out, im, &chunk, &rs[5])) == 7,
          "take after an ack");
    for (int i = 0; i < UPIPE_MAX_HOLDS; i++)
        CHECK(upipe_ack(h, rs[i]) == 0, "ack %d", i);
    upipe_handle_unref(h);

#ifndef UNDER_TSAN /* a second handle maps the segment twice, which TSan cannot follow */
    /* another process's hold: a closed ring is not drained while its item may come back */
    make_config(&cfg, 4, 0);
    upipe_handle *h2;
    if (upipe_create(&cfg, &h) != 0 ||
        upipe_attach(upipe_fd(h, 0), upipe_fd(h, 1), upipe_fd(h, 2), 1000000000LL, &h2) != 0) {
        fail(NULL, "create/attach failed");
        return EXIT_FAIL;
    }
    CHECK(put_test_item(h, 1, 1) == 0, "put");
    CHECK(LEN(upipe_take(h2, 0, out, im, &chunk, &r0)) == 100, "take by the other handle");
    upipe_close(h, 0);
    CHECK((r = upipe_get(h, 0, out, im, &chunk)) == -EAGAIN, "get, closed, held elsewhere: %" PRId64, r);
    CHECK(upipe_ready(h, 0, UPIPE_WAIT_READABLE) == 0, "ready, closed, held elsewhere");
    CHECK((rc = upipe_wait(h, 0, UPIPE_WAIT_READABLE, now_ns() + 2000000)) == -ETIMEDOUT,
          "wait, closed, held elsewhere: %d", rc);
    CHECK(upipe_nack(h2, r0) == 0, "nack after close");
    CHECK(upipe_ready(h, 0, UPIPE_WAIT_READABLE) == 1, "ready after the item came back");
    CHECK(get_test_item(h) == 1, "the item given back after close comes out");
    CHECK((r = upipe_get(h, 0, out, im, &chunk)) == -EPIPE, "then drained: %" PRId64, r);
    upipe_handle_unref(h2);
    upipe_handle_unref(h);

    /* detach with holds: given back; one that cannot be (no room) leaves the entry ABANDONED,
     * and recovery finishes it once there is room */
    if (upipe_create(&cfg, &h) != 0 ||
        upipe_attach(upipe_fd(h, 0), upipe_fd(h, 1), upipe_fd(h, 2), 1000000000LL, &h2) != 0) {
        fail(NULL, "create/attach failed");
        return EXIT_FAIL;
    }
    for (int i = 0; i < 4; i++)
        CHECK(put_test_item(h, i, i == 2) == 0, "put %d", i);
    CHECK(LEN(upipe_take(h, 0, out, im, &chunk, &r0)) == 7, "take 0 (kept)");
    CHECK(LEN(upipe_take(h2, 0, out, im, &chunk, &r1)) == 7, "take 1 by the leaver");
    upipe_handle_unref(h2); /* ring full of others' items: 1 cannot go back yet */
    CHECK(upipe_stats(h, 0, &st) == 0 && st.actors == 2 && st.redelivered == 0,
          "left with a pending take: actors %u redelivered %" PRIu64, st.actors, st.redelivered);
    CHECK((rc = upipe_recover(h)) == 1, "recover finds the abandoned entry: %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.actors == 2 && st.recoveries == 0,
          "still pending: actors %u recoveries %" PRIu64, st.actors, st.recoveries);
    CHECK(upipe_ack(h, r0) == 0, "ack 0: room");
    CHECK((rc = upipe_recover(h)) == 1, "recover again: %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.actors == 1 && st.recoveries == 1 && st.redelivered == 1,
          "finished: actors %u recoveries %" PRIu64 " redelivered %" PRIu64, st.actors,
          st.recoveries, st.redelivered);
    int id2 = get_test_item(h), id3 = get_test_item(h), id1 = get_test_item(h);
    CHECK(id2 == 2 && id3 == 3 && id1 == 1, "after the abandoned take: %d %d %d", id2, id3, id1);
    ok = ok && check_clean(h, "abandoned take");
    upipe_handle_unref(h);
#endif
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/*
 * A process (forked, attached like any other) takes item 0, starts giving it back, and dies at
 * step `cut` of the move (upipe_debug_abandon 4 + cut; cut -1: dies holding it, never acked).
 * inplace: the ring is full (4 of 4) so the move is in place; else it has room (2 of 4).
 * Recovery must leave every item in the ring exactly once, counted once as redelivered.
 */
static int cut_case(int inplace, int as_chunk, int cut)
{
    char what[64];
    snprintf(what, sizeof what, "%s %s cut %d", inplace ? "in-place" : "fast",
             as_chunk ? "chunk" : "inline", cut);
    int ok = 1;
    struct upipe_config cfg;
    make_config(&cfg, 4, 0);
    upipe_handle *h;
    if (upipe_create(&cfg, &h) != 0) {
        fail(NULL, "%s: upipe_create failed", what);
        return 0;
    }
    int n = inplace ? 4 : 2;
    for (int i = 0; i < n; i++)
        CHECK(put_test_item(h, i, as_chunk && i == 0) == 0, "%s: put %d", what, i);
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        die_with_parent(parent);
        upipe_handle *hc;
        if (upipe_attach(upipe_fd(h, 0), upipe_fd(h, 1), upipe_fd(h, 2), 1000000000LL, &hc) != 0)
            _exit(2);
        _exit(upipe_debug_abandon(hc, 0, cut < 0 ? 3 : 4 + cut) == 0 ? 0 : 3); /* "killed" */
    }
    live_children[MAX_VICTIMS] = pid;
    int status = -1;
    while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    live_children[MAX_VICTIMS] = 0;
    CHECK(pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s: child status %#x", what,
          status);
    int rc = upipe_recover(h);
    CHECK(rc == 1, "%s: recover returned %d", what, rc);
    struct upipe_stats st;
    upipe_stats(h, 0, &st);
    int tomb = !inplace && cut >= 0 && cut <= 2; /* the copy never committed: its slot skipped */
    CHECK(st.redelivered == 1 && st.recoveries == 1 && st.aborted_puts == (!inplace && cut == 0) &&
              st.reclaimed_chunks == 0,
          "%s: redelivered %" PRIu64 " recoveries %" PRIu64 " aborted %" PRIu64
          " reclaimed %" PRIu64,
          what, st.redelivered, st.recoveries, st.aborted_puts, st.reclaimed_chunks);
    ok = ok && drain_exactly(h, n, what);
    upipe_stats(h, 0, &st);
    CHECK(st.tombstones_skipped == (uint64_t)tomb, "%s: %" PRIu64 " tombstones", what,
          st.tombstones_skipped);
    ok = ok && check_clean(h, what);
    upipe_handle_unref(h);
    return ok;
}

static int run_redeliver_cuts(void)
{
    current_variant = "redeliver_cuts";
    alarm(60);
    int ok = 1;
    for (int as_chunk = 0; as_chunk < 2; as_chunk++) {
        for (int cut = -1; cut <= 4; cut++)
            ok &= cut_case(0, as_chunk, cut);
        for (int cut = -1; cut <= 3; cut++)
            ok &= cut_case(1, as_chunk, cut);
    }
    /* A dead taker's item with no room to go back (the next slot is held by a live take) waits,
     * its table entry kept, until recovery finds room. */
    struct upipe_config cfg;
    make_config(&cfg, 4, 0);
    upipe_handle *h;
    if (upipe_create(&cfg, &h) != 0) {
        fail(NULL, "upipe_create failed");
        return EXIT_FAIL;
    }
    for (int i = 0; i < 4; i++)
        CHECK(put_test_item(h, i, i == 1) == 0, "pending: put %d", i);
    char out[SLOT_SIZE];
    uint32_t chunk;
    uint64_t r0;
    CHECK(LEN(upipe_take(h, 0, out, upipe_inline_max(h, 0), &chunk, &r0)) == 7, "pending: take 0");
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        die_with_parent(parent);
        upipe_handle *hc;
        if (upipe_attach(upipe_fd(h, 0), upipe_fd(h, 1), upipe_fd(h, 2), 1000000000LL, &hc) != 0)
            _exit(2);
        _exit(upipe_debug_abandon(hc, 0, 3) == 0 ? 0 : 3); /* takes item 1 and dies */
    }
    live_children[MAX_VICTIMS] = pid;
    int status = -1, rc;
    while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    live_children[MAX_VICTIMS] = 0;
    CHECK(pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "pending: child %#x", status);
    struct upipe_stats st;
    CHECK((rc = upipe_recover(h)) == 1, "pending: recover %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.redelivered == 0 && st.recoveries == 0 &&
              st.actors == 2 && st.class_free[0] == st.class_total[0] - 1,
          "pending: redelivered %" PRIu64 " recoveries %" PRIu64 " actors %u (chunk kept)",
          st.redelivered, st.recoveries, st.actors);
    CHECK(upipe_ack(h, r0) == 0, "pending: ack 0");
    CHECK((rc = upipe_recover(h)) == 1, "pending: recover again %d", rc);
    CHECK(upipe_stats(h, 0, &st) == 0 && st.redelivered == 1 && st.recoveries == 1 &&
              st.actors == 1 && st.lost_items == 0,
          "pending: then redelivered %" PRIu64 " recoveries %" PRIu64 " actors %u",
          st.redelivered, st.recoveries, st.actors);
    int a = get_test_item(h), b = get_test_item(h), c1 = get_test_item(h);
    CHECK(a == 2 && b == 3 && c1 == 1, "pending: got %d %d %d", a, b, c1);
    ok = ok && check_clean(h, "pending");
    upipe_handle_unref(h);
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/* ------------------------------------------------------------------------------------------ */
/* shared chunks (fan-out): one chunk named by a slot in several data rings                    */

/*
 * upipe_put_shared puts one chunk into several data rings of a segment. The chunk is then held
 * by a set of processes (a holder bit each) and by the slot of every ring that names it (a ring
 * bit each), and goes back to its pool when both sets are empty.
 *   L9  sharing: FORBIDDEN a consumer of any ring sees other bytes than the producer wrote (the
 *       chunk freed and reused while a ring or a holder still had it: stamp and checksum, read
 *       again just before the consumer lets go). FORBIDDEN the chunk in its pool while any
 *       holder or ring has it; FORBIDDEN it missing from its pool, or in it twice, once every
 *       holder and ring let go (check_pool: a leak, a double free).
 *   L10 a holder bit is per process, but the core counts the process's references: every
 *       get or take of a shared chunk (several rings, again after a nack, its own fan-out) and
 *       the sharing itself is one, every upipe_free drops one, and the bit goes with the last.
 *       Threads of one process never drop each other's references, whatever they interleave
 *       (a get in flight re-acquiring the chunk that another thread's free lets go of); acks
 *       and nacks, whatever holder-bit work they do inside the core, must not disturb them
 *       (fan_* variants). struct lrefs mirrors the count to check it.
 *   L11 recovery (fan_crash): FORBIDDEN an item a dead producer stamped missing from its ring;
 *       FORBIDDEN an item a dead taker held missing, or in its ring twice; FORBIDDEN an item
 *       a dead acker acked coming back; FORBIDDEN the chunk freed while a ring still has it,
 *       or never freed once every live holder let go.
 */
#define FAN_MAX_RINGS 4
#define FAN_MAX_CHUNKS 16
#define FAN_CHUNK 1024 /* the fan-out segments' one chunk class */
#define FAN_KEEP 3     /* fan-out consumers: items got and kept a while before the free */

static void make_fan_config(struct upipe_config *cfg, uint32_t nrings, uint64_t capacity,
                            uint32_t nchunks)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->ndata_rings = nrings;
    cfg->slot_size = SLOT_SIZE;
    cfg->capacity = capacity;
    cfg->nclasses = 1;
    cfg->chunk_size[0] = FAN_CHUNK;
    cfg->nchunks[0] = nchunks;
}

/* Attach to h's segment as another process does: the memfd and every data ring's eventfds. */
static int attach_fan(upipe_handle *h, upipe_handle **out)
{
    int efds[UPIPE_MAX_FDS];
    int n = upipe_nfds(h);
    for (int i = 1; i < n; i++)
        efds[i - 1] = upipe_fd(h, i);
    return upipe_attach_fds(upipe_fd(h, 0), efds, (uint32_t)(n - 1), 1000 * 1000000LL, out);
}

static uint64_t chunks_free(upipe_handle *h)
{
    struct upipe_stats st;
    return upipe_stats(h, 0, &st) == 0 ? st.class_free[0] : UINT64_MAX;
}

/* Every chunk in its pool exactly once, none held or shared: allocate them all (distinct ids,
 * then -ENOBUFS) and free them again. */
static int check_pool(upipe_handle *h, const char *what)
{
    int ok = 1;
    struct upipe_stats st;
    upipe_stats(h, 0, &st);
    uint32_t first = 0;
    for (uint32_t k = 0; k < st.nclasses && ok; k++) {
        uint32_t total = (uint32_t)st.class_total[k], n = 0, c;
        CHECK(st.class_free[k] == total, "%s: class %u: %" PRIu64 " of %u chunks free", what, k,
              st.class_free[k], total);
        uint8_t *seen = calloc(total, 1);
        uint32_t *ids = calloc(total + 1, sizeof *ids);
        int64_t rc = 0;
        while (seen && ids && n <= total && (rc = upipe_alloc(h, st.class_size[k], &c)) == 0) {
            ids[n++] = c;
            CHECK(c >= first && c < first + total && !seen[c - first]++,
                  "%s: chunk %u allocated twice (it was in its pool twice: a double free)", what,
                  c);
            CHECK(!upipe_chunk_shared(h, c), "%s: chunk %u fresh from its pool but shared", what,
                  c);
        }
        CHECK(n == total && rc == -ENOBUFS,
              "%s: class %u: %u of %u chunks allocated, then %" PRId64, what, k, n, total, rc);
        for (uint32_t i = 0; i < n; i++)
            CHECK(upipe_free(h, ids[i]) == 0, "%s: free of chunk %u", what, ids[i]);
        free(seen);
        free(ids);
        first += total;
    }
    return ok;
}

/* A fan-out test item: every byte of the chunk derived from its id. */
static void fan_fill(uint8_t *p, int id)
{
    for (uint32_t i = 0; i < FAN_CHUNK; i++)
        p[i] = (uint8_t)(id * 37 + i * 11 + (i >> 8));
}

static int fan_intact(const uint8_t *p, int id)
{
    for (uint32_t i = 0; i < FAN_CHUNK; i++)
        if (p[i] != (uint8_t)(id * 37 + i * 11 + (i >> 8)))
            return 0;
    return 1;
}

/* Allocate a chunk, fill it for id, put it into rings (meta "fm"). 0 with the chunk in *c and
 * the rings it went into in *done; or the error (the chunk is freed again). */
static int fan_produce(upipe_handle *h, uint64_t rings, int id, uint32_t *c, uint64_t *done)
{
    uint64_t closed;
    int rc = (int)upipe_alloc(h, FAN_CHUNK, c);
    if (rc != 0)
        return rc;
    fan_fill(upipe_chunk_ptr(h, *c), id);
    rc = upipe_put_shared(h, rings, *c, FAN_CHUNK, KIND_CHUNK, "fm", 2, done, &closed);
    if (rc != 0)
        upipe_free(h, *c);
    return rc;
}

/* Get (receipt NULL) or take the next item of ring: the chunk item of id `id` (a whole chunk,
 * meta "fm" or none), shared and now held by h. 0 with the chunk in *c, or -1 after recording
 * a failure. */
static int fan_expect(upipe_handle *h, uint32_t ring, int id, uint32_t *c, uint64_t *receipt,
                      const char *what)
{
    char out[SLOT_SIZE];
    uint32_t chunk = 0xDEADBEEF;
    int64_t rc = receipt ? upipe_take(h, ring, out, upipe_inline_max(h, ring), &chunk, receipt)
                         : upipe_get(h, ring, out, upipe_inline_max(h, ring), &chunk);
    uint32_t ml = rc < 0 ? 0 : (uint32_t)((rc >> 32) & 0xFFFF);
    if (rc < 0 || chunk == UINT32_MAX || LEN(rc) != FAN_CHUNK || !upipe_chunk_held(h, chunk) ||
        !upipe_chunk_shared(h, chunk) || !fan_intact(upipe_chunk_ptr(h, chunk), id) ||
        (ml != 0 && (ml != 2 || memcmp(out, "fm", 2) != 0))) {
        fail(NULL, "%s: %s of ring %u: rc %" PRId64 " chunk %u (held %d shared %d), want item %d",
             what, receipt ? "take" : "get", ring, rc, chunk,
             chunk < FAN_MAX_CHUNKS ? upipe_chunk_held(h, chunk) : -1,
             chunk < FAN_MAX_CHUNKS ? upipe_chunk_shared(h, chunk) : -1, id);
        return -1;
    }
    *c = chunk;
    return 0;
}

/* The next get of ring says want (-ENOENT: empty; -EPIPE: closed and drained). */
static int fan_expect_none(upipe_handle *h, uint32_t ring, int64_t want, const char *what)
{
    char out[SLOT_SIZE];
    uint32_t chunk;
    int64_t rc = upipe_get(h, ring, out, upipe_inline_max(h, ring), &chunk);
    if (rc == want)
        return 1;
    fail(NULL, "%s: get of ring %u returned %" PRId64 " (chunk %u), want %" PRId64, what, ring, rc,
         rc >= 0 ? chunk : 0, want);
    if (rc >= 0 && chunk != UINT32_MAX)
        upipe_free(h, chunk);
    return 0;
}

/*
 * The order of letting go: ring 0's consumer gets the chunk, ring 1's and ring 2's take it,
 * and the six releases (three frees, two acks, the producer's free) come in every order. The
 * chunk goes back to its pool at the last one, never before; a second free says -EPERM and a
 * second ack -ENOENT; the bytes stay what the producer wrote until then.
 */
enum { EV_FREE0, EV_FREE1, EV_ACK1, EV_FREE2, EV_ACK2, EV_FREEP, NEVENTS };

static int fan_release_order(upipe_handle *hp, upipe_handle *hc[3], int perm_index)
{
    int ok = 1, order[NEVENTS], avail[NEVENTS] = {0, 1, 2, 3, 4, 5};
    char what[64];
    int left = NEVENTS;
    for (int i = 0, x = perm_index; i < NEVENTS; i++, left--) {
        int d = x % left;
        x /= left;
        order[i] = avail[d];
        avail[d] = avail[left - 1];
    }
    snprintf(what, sizeof what, "release order %d%d%d%d%d%d", order[0], order[1], order[2],
             order[3], order[4], order[5]);
    uint32_t c, c0, c1, c2;
    uint64_t done = 0, r1 = 0, r2 = 0;
    int rc = fan_produce(hp, 7, perm_index, &c, &done);
    CHECK(rc == 0 && done == 7, "%s: put_shared %d done %#" PRIx64, what, rc, done);
    if (!ok)
        return 0;
    uint64_t base = chunks_free(hp);
    if (fan_expect(hc[0], 0, perm_index, &c0, NULL, what) != 0 ||
        fan_expect(hc[1], 1, perm_index, &c1, &r1, what) != 0 ||
        fan_expect(hc[2], 2, perm_index, &c2, &r2, what) != 0)
        return 0;
    CHECK(c0 == c && c1 == c && c2 == c, "%s: rings gave chunks %u %u %u for %u", what, c0, c1, c2,
          c);
    /* the same bytes at the same place: one chunk, mapped by each process */
    CHECK(upipe_chunk_ptr(hc[1], c) - upipe_base(hc[1]) == upipe_chunk_ptr(hp, c) - upipe_base(hp),
          "%s: the chunk at another offset", what);
    for (int i = 0; i < NEVENTS && ok; i++) {
        int ev = order[i];
        switch (ev) {
        case EV_FREE0:
            CHECK(upipe_free(hc[0], c) == 0 && upipe_free(hc[0], c) == -EPERM &&
                      !upipe_chunk_held(hc[0], c),
                  "%s: consumer 0's free, then again", what);
            break;
        case EV_FREE1:
        case EV_FREE2: {
            upipe_handle *h = hc[ev == EV_FREE1 ? 1 : 2];
            CHECK(upipe_free(h, c) == 0 && upipe_free(h, c) == -EPERM && !upipe_chunk_held(h, c),
                  "%s: a taker's free (before or after its ack), then again", what);
            break;
        }
        case EV_ACK1:
        case EV_ACK2: {
            upipe_handle *h = hc[ev == EV_ACK1 ? 1 : 2];
            uint64_t r = ev == EV_ACK1 ? r1 : r2;
            int freed = 0; /* did this taker free already? then the ack leaves it unheld */
            for (int j = 0; j < i; j++)
                freed |= order[j] == (ev == EV_ACK1 ? EV_FREE1 : EV_FREE2);
            CHECK(upipe_ack(h, r) == 0 && upipe_ack(h, r) == -ENOENT &&
                      upipe_chunk_held(h, c) == !freed,
                  "%s: ack, then again (held after: %d)", what, upipe_chunk_held(h, c));
            break;
        }
        case EV_FREEP: {
            CHECK(upipe_free(hp, c) == 0 && upipe_free(hp, c) == -EPERM && !upipe_chunk_held(hp, c),
                  "%s: the producer's free, then again", what);
            uint64_t closed;
            CHECK(upipe_put_shared(hp, 1, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed) ==
                      -EPERM,
                  "%s: put_shared after the producer's free", what);
            break;
        }
        }
        int last = i == NEVENTS - 1;
        CHECK(chunks_free(hp) == base + (uint64_t)last && upipe_chunk_shared(hp, c) == !last,
              "%s: after event %d of 6: %" PRIu64 " chunks free (%" PRIu64 " before), shared %d",
              what, i + 1, chunks_free(hp), base, upipe_chunk_shared(hp, c));
        if (!last)
            CHECK(fan_intact(upipe_chunk_ptr(hp, c), perm_index),
                  "%s: the bytes changed while the chunk was still held", what);
    }
    return ok;
}

static int run_shared_basic(void)
{
    current_variant = "shared_basic";
    alarm(60);
    int ok = 1;
    struct upipe_config cfg;
    make_fan_config(&cfg, 3, 4, 4);
    upipe_handle *hp, *hc[3], *h2;
    int rc = upipe_create(&cfg, &hp);
    if (rc != 0) {
        fail(NULL, "upipe_create returned %d", rc);
        return EXIT_FAIL;
    }
    /* One handle per consumer: each is another actor (another process, as far as the core can
     * tell). Single-threaded, so the two mappings of one page are nothing TSan could mistake. */
    for (int i = 0; i < 3; i++) {
        if ((rc = attach_fan(hp, &hc[i])) != 0) {
            fail(NULL, "upipe_attach_fds returned %d", rc);
            return EXIT_FAIL;
        }
    }
    CHECK(upipe_nfds(hp) == 7 && upipe_nfds(hc[0]) == 7 && upipe_ndata_rings(hc[2]) == 3,
          "nfds %d, %d rings", upipe_nfds(hp), upipe_ndata_rings(hc[2]));
    CHECK((rc = upipe_attach(upipe_fd(hp, 0), upipe_fd(hp, 1), upipe_fd(hp, 2), 1000000000LL,
                             &h2)) == -EINVAL,
          "upipe_attach (2 eventfds) of a 3-ring segment: %d", rc);
    uint32_t im = upipe_inline_max(hp, 0), c, c2, other;
    uint64_t done = 99, closed = 99, r;
    char big[SLOT_SIZE + 8] = {0};
    int64_t g;

    /* arguments */
    CHECK(upipe_alloc(hp, FAN_CHUNK, &c) == 0, "alloc");
    fan_fill(upipe_chunk_ptr(hp, c), 1);
    other = (c + 1) % 4; /* free */
    CHECK(upipe_chunk_held(hp, c) && !upipe_chunk_shared(hp, c) && !upipe_chunk_held(hp, other) &&
              !upipe_chunk_shared(hp, 4) && !upipe_chunk_held(hp, 4),
          "held/shared of a fresh chunk, a free one, one out of range");
    CHECK((rc = upipe_put_shared(hp, 0, c, 8, KIND_CHUNK, NULL, 0, &done, &closed)) == -EINVAL &&
              done == 0 && closed == 0,
          "put_shared into no ring: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 8, c, 8, KIND_CHUNK, NULL, 0, &done, &closed)) == -EINVAL,
          "put_shared into ring 3 of 3: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 7, 4, 8, KIND_CHUNK, NULL, 0, &done, &closed)) == -EINVAL,
          "put_shared of chunk 4 of 4: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 7, c, 8, KIND_TOMBSTONE, NULL, 0, &done, &closed)) == -EINVAL,
          "put_shared of the tombstone kind: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 7, c, FAN_CHUNK + 1, KIND_CHUNK, NULL, 0, &done, &closed)) ==
              -EMSGSIZE,
          "put_shared of more than the chunk: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 7, c, 8, KIND_CHUNK, big, (uint16_t)(im + 1), &done,
                                 &closed)) == -EMSGSIZE,
          "put_shared with more meta than a slot holds: %d", rc);
    CHECK((rc = upipe_put_shared(hc[0], 7, c, 8, KIND_CHUNK, NULL, 0, &done, &closed)) == -EPERM,
          "put_shared of a chunk another process holds: %d", rc);
    CHECK((rc = upipe_put_shared(hp, 7, other, 8, KIND_CHUNK, NULL, 0, &done, &closed)) == -EPERM,
          "put_shared of a free chunk: %d", rc);
    CHECK(!upipe_chunk_shared(hp, c) && upipe_chunk_held(hp, c) && chunks_free(hp) == 3,
          "the refused put_shared calls left the chunk as it was");
    CHECK(upipe_free(hp, c) == 0, "free");

    /* the last of the six releases returns the chunk, in every order */
    for (int perm = 0; perm < 720 && ok; perm++)
        ok &= fan_release_order(hp, hc, perm);

    /* one slot per ring: -EBUSY while a ring still has it; put_chunk refuses a shared chunk */
    CHECK(fan_produce(hp, 1, 2, &c, &done) == 0 && done == 1, "put_shared into ring 0");
    CHECK((rc = upipe_put_shared(hp, 7, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed)) ==
                  -EBUSY && done == 0 && closed == 0,
          "put_shared into rings 0-2 while ring 0 has it: %d done %#" PRIx64, rc, done);
    CHECK((g = upipe_put_chunk(hp, 1, c, FAN_CHUNK, KIND_CHUNK, NULL, 0)) == -EPERM,
          "put_chunk of a shared chunk: %" PRId64, g);
    CHECK(upipe_put_shared(hp, 6, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed) == 0 &&
              done == 6 && closed == 0,
          "then into rings 1 and 2: done %#" PRIx64, done);
    ok = ok && fan_expect(hc[0], 0, 2, &c2, NULL, "busy") == 0;
    CHECK((g = upipe_put_chunk(hc[0], 0, c, FAN_CHUNK, KIND_CHUNK, NULL, 0)) == -EPERM,
          "put_chunk of a received shared chunk: %" PRId64, g);
    CHECK(upipe_put_shared(hp, 1, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed) == 0 &&
              done == 1,
          "into ring 0 again once its slot has gone");
    /* consumer 0 gets it a second time: two references, two frees (L10) */
    ok = ok && fan_expect(hc[0], 0, 2, &c2, NULL, "twice") == 0;
    CHECK(upipe_free(hc[0], c) == 0 && upipe_chunk_held(hc[0], c) && upipe_free(hc[0], c) == 0 &&
              !upipe_chunk_held(hc[0], c) && upipe_free(hc[0], c) == -EPERM,
          "a process that got the chunk twice frees it twice");
    ok = ok && fan_expect(hc[1], 1, 2, &c2, NULL, "busy") == 0 &&
         fan_expect(hc[2], 2, 2, &c2, NULL, "busy") == 0;
    CHECK(upipe_free(hc[1], c) == 0 && upipe_free(hc[2], c) == 0 && chunks_free(hp) == 3 &&
              upipe_chunk_held(hp, c),
          "the producer still holds it");
    CHECK(upipe_free(hp, c) == 0 && chunks_free(hp) == 4, "the producer's free returns it");

    /* no room in ring 1: left out of done; after room, a second call puts it there */
    for (int i = 0; i < 4; i++)
        CHECK(upipe_put(hp, 1, "x", 1, 2, NULL, 0) == 0, "fill ring 1: put %d", i);
    CHECK(fan_produce(hp, 7, 3, &c, &done) == 0 && done == 5, "partial: done %#" PRIx64, done);
    CHECK(upipe_put_shared(hp, 2, c, FAN_CHUNK, KIND_CHUNK, "fm", 2, &done, &closed) == 0 &&
              done == 0 && closed == 0,
          "partial, again: done %#" PRIx64, done);
    CHECK(LEN(upipe_get(hc[1], 1, big, im, &c2)) == 1 && c2 == UINT32_MAX, "make room in ring 1");
    CHECK(upipe_put_shared(hp, 2, c, FAN_CHUNK, KIND_CHUNK, "fm", 2, &done, &closed) == 0 &&
              done == 2 && closed == 0,
          "the rest: done %#" PRIx64, done);
    for (int i = 0; i < 3; i++)
        CHECK(LEN(upipe_get(hc[1], 1, big, im, &c2)) == 1 && c2 == UINT32_MAX, "inline %d", i);
    ok = ok && fan_expect(hc[1], 1, 3, &c2, NULL, "partial") == 0 &&
         fan_expect(hc[0], 0, 3, &c2, NULL, "partial") == 0 &&
         fan_expect(hc[2], 2, 3, &c2, NULL, "partial") == 0;
    CHECK(upipe_free(hc[0], c) == 0 && upipe_free(hc[1], c) == 0 && upipe_free(hc[2], c) == 0 &&
              upipe_free(hp, c) == 0 && chunks_free(hp) == 4,
          "partial: all let go");

    /* nack of a shared take: the item goes back into its ring; the process keeps its
     * reference, as after a get (one free per get or take) */
    CHECK(fan_produce(hp, 7, 4, &c, &done) == 0 && done == 7 && upipe_free(hp, c) == 0,
          "put for nack");
    ok = ok && fan_expect(hc[1], 1, 4, &c2, &r, "nack") == 0;
    CHECK(upipe_nack(hc[1], r) == 0 && upipe_chunk_held(hc[1], c), "nack: still held");
    ok = ok && fan_expect(hc[1], 1, 4, &c2, &r, "after nack") == 0;
    CHECK(upipe_ack(hc[1], r) == 0 && upipe_free(hc[1], c) == 0 && upipe_free(hc[1], c) == 0 &&
              upipe_free(hc[1], c) == -EPERM,
          "take again, ack, free once per take");
    ok = ok && fan_expect(hc[0], 0, 4, &c2, NULL, "nack") == 0 &&
         fan_expect(hc[2], 2, 4, &c2, NULL, "nack") == 0;
    CHECK(upipe_free(hc[0], c) == 0 && chunks_free(hp) == 3 && upipe_free(hc[2], c) == 0 &&
              chunks_free(hp) == 4,
          "nack: returned at the last free");

    /* the producer receives its own fan-out: two references (its sharing, its get) */
    CHECK(fan_produce(hp, 7, 5, &c, &done) == 0 && done == 7, "put for self");
    ok = ok && fan_expect(hp, 0, 5, &c2, NULL, "self") == 0 &&
         fan_expect(hc[1], 1, 5, &c2, NULL, "self") == 0 &&
         fan_expect(hc[2], 2, 5, &c2, NULL, "self") == 0;
    CHECK(upipe_free(hc[1], c) == 0 && upipe_free(hc[2], c) == 0 && chunks_free(hp) == 3 &&
              upipe_free(hp, c) == 0 && chunks_free(hp) == 3 && upipe_free(hp, c) == 0 &&
              upipe_free(hp, c) == -EPERM && chunks_free(hp) == 4,
          "self: one free for the fan-out, one for the get");

    /* leaving (last handle unref) drops the holder bit and gives unacked takes back */
    CHECK(fan_produce(hp, 7, 6, &c, &done) == 0 && done == 7 && upipe_free(hp, c) == 0,
          "put for detach");
    ok = ok && fan_expect(hc[0], 0, 6, &c2, NULL, "detach") == 0 &&
         fan_expect(hc[1], 1, 6, &c2, &r, "detach") == 0;
    upipe_handle_unref(hc[0]);
    upipe_handle_unref(hc[1]);
    ok = ok && fan_expect(hc[2], 2, 6, &c2, NULL, "detach") == 0;
    CHECK(upipe_free(hc[2], c) == 0 && chunks_free(hp) == 3 && upipe_chunk_shared(hp, c),
          "detach: ring 1 still has it");
    CHECK(attach_fan(hp, &hc[0]) == 0 && attach_fan(hp, &hc[1]) == 0, "attach again");
    ok = ok && fan_expect(hc[1], 1, 6, &c2, NULL, "given back at detach") == 0;
    CHECK(upipe_free(hc[1], c) == 0 && chunks_free(hp) == 4, "detach: returned");

    /* a closed ring is reported, the others get it */
    upipe_close(hp, 2);
    CHECK(fan_produce(hp, 7, 7, &c, &done) == 0 && done == 3, "closed: done %#" PRIx64, done);
    CHECK(upipe_put_shared(hp, 4, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed) == 0 &&
              done == 0 && closed == 4,
          "closed: closed %#" PRIx64, closed);
    ok = ok && fan_expect(hc[0], 0, 7, &c2, NULL, "closed") == 0 &&
         fan_expect(hc[1], 1, 7, &c2, NULL, "closed") == 0 &&
         fan_expect_none(hc[2], 2, -EPIPE, "closed");
    CHECK(upipe_free(hc[0], c) == 0 && upipe_free(hp, c) == 0 && upipe_free(hc[1], c) == 0 &&
              chunks_free(hp) == 4,
          "closed: returned");
    /* every ring it was for closed: shared, held by the producer alone */
    CHECK(upipe_alloc(hp, FAN_CHUNK, &c) == 0 &&
              upipe_put_shared(hp, 4, c, FAN_CHUNK, KIND_CHUNK, NULL, 0, &done, &closed) == 0 &&
              done == 0 && closed == 4 && upipe_chunk_shared(hp, c) && upipe_free(hp, c) == 0 &&
              chunks_free(hp) == 4,
          "only closed rings");

    struct upipe_stats st;
    CHECK(upipe_stats(hp, 0, &st) == 0 && st.recoveries == 0 && st.lost_leases == 0 &&
              st.reclaimed_chunks == 0 && st.actors == 4,
          "stats: recoveries %" PRIu64 " lost_leases %" PRIu64 " reclaimed %" PRIu64 " actors %u",
          st.recoveries, st.lost_leases, st.reclaimed_chunks, st.actors);
    for (int i = 0; i < 2; i++)
        CHECK(fan_expect_none(hp, (uint32_t)i, -ENOENT, "the end"), "ring %d empty", i);
    ok = ok && check_pool(hp, "shared_basic");
    for (int i = 0; i < 3; i++)
        upipe_handle_unref(hc[i]);
    upipe_handle_unref(hp);

    /* 64 data rings, the most: bit 63 of the ring mask, 1 + 128 fds; 65 are refused */
    make_fan_config(&cfg, 65, 2, 2);
    CHECK(upipe_segment_size(&cfg) == -EINVAL, "65 data rings accepted");
    make_fan_config(&cfg, 64, 2, 2);
    if (upipe_create(&cfg, &hp) != 0 || attach_fan(hp, &h2) != 0) {
        fail(NULL, "64 rings: create/attach failed");
        return EXIT_FAIL;
    }
    CHECK(upipe_nfds(hp) == UPIPE_MAX_FDS && upipe_nfds(h2) == UPIPE_MAX_FDS, "64 rings: nfds %d",
          upipe_nfds(h2));
    CHECK(fan_produce(hp, UINT64_MAX, 70, &c, &done) == 0 && done == UINT64_MAX,
          "64 rings: done %#" PRIx64, done);
    for (uint32_t i = 64; i-- > 0 && ok;) /* one process, 64 receptions: 64 references */
        ok = fan_expect(h2, i, 70, &c2, NULL, "64 rings") == 0;
    CHECK(upipe_free(hp, c) == 0 && chunks_free(hp) == 1, "64 rings: the producer's free");
    for (int i = 0; i < 64; i++)
        CHECK(upipe_free(h2, c) == 0 && chunks_free(hp) == (i == 63 ? 2 : 1),
              "64 rings: free %d of 64", i);
    CHECK(upipe_free(h2, c) == -EPERM, "64 rings: one free too many");
    CHECK(fan_produce(hp, 1ULL << 63, 71, &c, &done) == 0 && done == 1ULL << 63 &&
              upipe_free(hp, c) == 0,
          "64 rings: into ring 63 alone");
    ok = ok && fan_expect(h2, 63, 71, &c2, NULL, "ring 63") == 0;
    CHECK(upipe_free(h2, c) == 0, "ring 63: free");
    ok = ok && check_pool(hp, "64 rings");
    upipe_handle_unref(h2);
    upipe_handle_unref(hp);
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/*
 * Threaded fan-out. P producer threads each allocate a chunk, write a stamped item into it
 * (per-producer seq, FNV checksum, as the other variants) and put it into all K rings
 * (upipe_put_shared, again for the rings that had no room), then let go of their reference. C
 * consumer threads per ring get or take it (take + ack / nack), check it, and let go of it in
 * random order: got items kept a while, taken ones freed before the ack or after it. Every ring
 * sees every item exactly once (nacked ones come back); each consumer sees each producer's seqs
 * in order (except with nacks). At the end every chunk is in its pool once (L9).
 *
 * Processes: ring 0's consumers share the producers' handle (one process fans out and consumes);
 * rings 1.. have one handle each (another process each). The 1proc variants, and every variant
 * under TSan (which cannot follow two mappings of one page), use one handle for everything: all
 * roles share one holder bit, the strongest test of L10.
 */
struct fan_variant {
    const char *name;
    int nprod;
    int ncons; /* per ring */
    uint32_t nrings;
    uint64_t capacity;
    uint32_t nchunks;
    int take;        /* 0: get only; 1: get and take + ack; 2: and nack */
    int one_process; /* every thread uses the producers' handle (always, under TSan) */
};

static const struct fan_variant FAN_VARIANTS[] = {
    /* name              P  C/ring rings cap chunks take one */
    {"fanout_get", 2, 2, 3, 8, 8, 0, 0},
    {"fanout_take", 2, 2, 3, 4, 8, 1, 0},
    {"fanout_nack_cap2", 2, 2, 3, 2, 6, 2, 0},
    {"fanout_1proc_get", 2, 2, 3, 4, 8, 0, 1},
    {"fanout_1proc_take", 2, 2, 3, 4, 8, 1, 1},
    {"fanout_1proc_nack", 2, 2, 3, 2, 6, 2, 1},
};
#define NFAN_VARIANTS (sizeof FAN_VARIANTS / sizeof FAN_VARIANTS[0])

/* One process's references to shared chunks, as the core counts them (L10): a mirror. */
struct lrefs {
    pthread_mutex_t mu;
    uint32_t count[FAN_MAX_CHUNKS];
};

struct fan {
    struct ctx c;     /* failures, stop, deadline; c.hp is the producers' handle */
    struct variant v; /* what check_item needs of a variant (nprod) */
    const struct fan_variant *fv;
    upipe_handle *hr[FAN_MAX_RINGS];     /* the handle ring r's consumers use */
    struct lrefs *lr[FAN_MAX_RINGS + 1]; /* its references; [nrings]: the producers' */
    _Atomic uint8_t *seen[FAN_MAX_RINGS][MAX_PROD];
};

struct fan_prod {
    struct fan *f;
    uint32_t id;
    uint64_t rng;
    uint8_t meta[16];
    char who[32];
};

struct fan_cons {
    struct cons cs; /* check_item's state, and the held takes */
    struct fan *f;
    uint32_t ring;
    upipe_handle *h;
    struct lrefs *lr;
    struct kept {
        uint32_t chunk, prod, len;
        uint64_t seq;
    } kept[FAN_KEEP];
    int nkept;
};

/* A fresh chunk: this process's first reference to it. */
static int lref_first(struct ctx *c, struct lrefs *lr, uint32_t chunk, const char *who)
{
    pthread_mutex_lock(&lr->mu);
    uint32_t was = lr->count[chunk];
    lr->count[chunk] = 1;
    pthread_mutex_unlock(&lr->mu);
    if (was != 0)
        fail(c, "%s: chunk %u fresh from its pool, but %u references to it still counted", who,
             chunk, was);
    return was == 0 ? 0 : -EPROTO;
}

/* One reference fewer: one upipe_free (the core drops the holder bit with the last). */
static int lref_release(struct ctx *c, upipe_handle *h, struct lrefs *lr, uint32_t chunk,
                        const char *who)
{
    int rc = -ERANGE;
    pthread_mutex_lock(&lr->mu);
    if (lr->count[chunk] > 0) {
        lr->count[chunk]--;
        rc = upipe_free(h, chunk);
    }
    pthread_mutex_unlock(&lr->mu);
    if (rc != 0)
        fail(c, "%s: letting go of chunk %u: %d (upipe_free of a reference)", who, chunk, rc);
    return rc;
}

static void *fan_producer_main(void *arg)
{
    struct fan_prod *p = arg;
    struct fan *f = p->f;
    struct ctx *c = &f->c;
    upipe_handle *h = c->hp;
    struct lrefs *lr = f->lr[f->fv->nrings];
    uint64_t all = (1ULL << f->fv->nrings) - 1, seq;
    wait_for_go(c);
    for (seq = 0; seq < c->per_prod && !atomic_load_explicit(&c->stop, memory_order_relaxed);
         seq++) {
        uint32_t len = STAMP_SIZE + (uint32_t)(rnd(&p->rng) % (FAN_CHUNK - STAMP_SIZE + 1));
        uint32_t ml = seq % 3 == 0 ? 8 : 0, chunk;
        int64_t rc;
        while ((rc = upipe_alloc(h, len, &chunk)) != 0) {
            if (rc != -ENOBUFS && rc != -EAGAIN) {
                fail(c, "%s: upipe_alloc returned %" PRId64, p->who, rc);
                goto out;
            }
            if (block(c, h, 0, UPIPE_WAIT_CHUNK, p->who) < 0)
                goto out;
        }
        if (chunk >= FAN_MAX_CHUNKS || upipe_chunk_shared(h, chunk)) {
            fail(c, "%s: fresh chunk %u (shared %d)", p->who, chunk, upipe_chunk_shared(h, chunk));
            goto out;
        }
        make_item(upipe_chunk_ptr(h, chunk), p->id, seq, len, KIND_CHUNK, HOW_CHUNK, (uint8_t)ml);
        make_meta(p->meta, p->id, seq, ml);
        if (lref_first(c, lr, chunk, p->who) != 0)
            goto out;
        uint64_t todo = all;
        while (todo) {
            uint64_t done = 0, closed = 0;
            rc = upipe_put_shared(h, todo, chunk, len, KIND_CHUNK,
                                  ml ? (const char *)p->meta : NULL, (uint16_t)ml, &done, &closed);
            if (rc != 0 || (done & ~todo) || (done & closed)) {
                fail(c, "%s: upipe_put_shared(%#" PRIx64 ") returned %" PRId64 " done %#" PRIx64
                        " closed %#" PRIx64,
                     p->who, todo, rc, done, closed);
                break;
            }
            if (closed) /* only after a failure (fail() closes every ring) */
                break;
            todo &= ~done;
            if (todo && block(c, h, (uint32_t)__builtin_ctzll(todo), UPIPE_WAIT_WRITABLE,
                              p->who) < 0)
                break;
        }
        if (lref_release(c, h, lr, chunk, p->who) != 0 || todo)
            break;
    }
out:
    c->sent[p->id] = seq;
    return NULL;
}

/* The chunk still holds what its producer wrote (L9: not freed and reused meanwhile). */
static int fan_check_intact(struct fan_cons *fc, uint32_t chunk, uint32_t prod, uint64_t seq,
                            uint32_t len, const char *when)
{
    const uint8_t *ptr = upipe_chunk_ptr(fc->h, chunk);
    struct stamp st;
    memcpy(&st, ptr, sizeof st);
    if (st.prod == prod && st.seq == seq && st.len == len && payload_csum(ptr, len) == st.csum)
        return 0;
    fail(&fc->f->c, "%s: chunk %u (p%u seq %" PRIu64 ") changed %s: now p%u seq %" PRIu64,
         fc->cs.who, chunk, prod, seq, when, st.prod, st.seq);
    return -EPROTO;
}

/* Ring r received item (prod, seq): once (L3, per ring). */
static int fan_mark(struct fan_cons *fc, uint32_t prod, uint64_t seq)
{
    struct ctx *c = &fc->f->c;
    if (atomic_fetch_add_explicit(&fc->f->seen[fc->ring][prod][seq], 1, memory_order_relaxed)) {
        fail(c, "%s: p%u seq %" PRIu64 " received twice from ring %u", fc->cs.who, prod, seq,
             fc->ring);
        return -EPROTO;
    }
    fc->cs.got++;
    atomic_fetch_add_explicit(&c->received, 1, memory_order_relaxed);
    return 0;
}

static int fan_release_kept(struct fan_cons *fc, int i)
{
    struct kept k = fc->kept[i];
    fc->kept[i] = fc->kept[--fc->nkept];
    if (fan_check_intact(fc, k.chunk, k.prod, k.seq, k.len, "while kept") != 0)
        return -EPROTO;
    return lref_release(&fc->f->c, fc->h, fc->lr, k.chunk, fc->cs.who);
}

/* Ack (or, with take == 2, now and then nack) held take i; let go of its chunk if not yet. Acks
 * and nacks run outside the reference lock (L10). */
static int fan_finish_hold(struct fan_cons *fc, int i)
{
    struct cons *cs = &fc->cs;
    struct ctx *c = &fc->f->c;
    struct held hd = cs->held[i];
    cs->held[i] = cs->held[--cs->nheld];
    /* Intact until the ack even if we let go of it: the ring's bit holds it till then. */
    if (fan_check_intact(fc, hd.chunk, hd.prod, hd.seq, hd.len, "before the ack") != 0)
        return -EPROTO;
    int rc;
    if (fc->f->fv->take == 2 && rnd(&cs->rng) % 8 == 0) {
        rc = upipe_nack(fc->h, hd.receipt);
        if (rc == 0) {
            atomic_fetch_add_explicit(&c->nacks, 1, memory_order_relaxed);
            /* back in the ring; our reference stays ours to let go of (L10) */
            return hd.dropped ? 0 : lref_release(c, fc->h, fc->lr, hd.chunk, cs->who);
        }
        if (rc != -ENOBUFS) {
            fail(c, "%s: upipe_nack returned %d", cs->who, rc);
            return -EPROTO;
        }
    }
    if ((rc = upipe_ack(fc->h, hd.receipt)) != 0) {
        fail(c, "%s: upipe_ack returned %d", cs->who, rc);
        return -EPROTO;
    }
    if (fan_mark(fc, hd.prod, hd.seq) != 0)
        return -EPROTO;
    if (hd.dropped)
        return 0;
    if (fan_check_intact(fc, hd.chunk, hd.prod, hd.seq, hd.len, "after the ack") != 0)
        return -EPROTO;
    return lref_release(c, fc->h, fc->lr, hd.chunk, cs->who);
}

static int fan_finish_all(struct fan_cons *fc)
{
    while (fc->cs.nheld)
        if (fan_finish_hold(fc, 0) != 0)
            return -EPROTO;
    while (fc->nkept)
        if (fan_release_kept(fc, 0) != 0)
            return -EPROTO;
    return 0;
}

/* One get or take: 1 (an item), or the upipe error (-ENOENT, -EAGAIN, -EPIPE), or -EPROTO after
 * a failure. The get/take and the count of its reference are one step (L10). */
static int64_t fan_recv(struct fan_cons *fc)
{
    struct cons *cs = &fc->cs;
    struct ctx *c = &fc->f->c;
    int take = fc->f->fv->take && (rnd(&cs->rng) & 1);
    uint32_t chunk = 0xDEADBEEF;
    uint64_t receipt = 0;
    pthread_mutex_lock(&fc->lr->mu);
    int64_t rc = take ? upipe_take(fc->h, fc->ring, (char *)cs->buf, c->inline_max, &chunk,
                                   &receipt)
                      : upipe_get(fc->h, fc->ring, (char *)cs->buf, c->inline_max, &chunk);
    if (rc >= 0 && chunk < FAN_MAX_CHUNKS)
        fc->lr->count[chunk]++;
    pthread_mutex_unlock(&fc->lr->mu);
    if (rc < 0)
        return rc;
    uint16_t kind = (uint16_t)((uint64_t)rc >> 48);
    uint32_t ml = (uint32_t)(((uint64_t)rc >> 32) & 0xFFFF);
    uint32_t len = (uint32_t)((uint64_t)rc & 0xFFFFFFFFu);
    if (chunk >= FAN_MAX_CHUNKS || !upipe_chunk_held(fc->h, chunk) ||
        !upipe_chunk_shared(fc->h, chunk)) {
        fail(c, "%s: item of chunk %u (held %d, shared %d) from ring %u", cs->who, chunk,
             chunk < FAN_MAX_CHUNKS ? upipe_chunk_held(fc->h, chunk) : -1,
             chunk < FAN_MAX_CHUNKS ? upipe_chunk_shared(fc->h, chunk) : -1, fc->ring);
        return -EPROTO;
    }
    struct stamp st;
    if (check_item(cs, upipe_chunk_ptr(fc->h, chunk), len, kind, cs->buf, ml, 1, &st) != 0)
        return -EPROTO;
    if (!take) {
        if (fan_mark(fc, st.prod, st.seq) != 0)
            return -EPROTO;
        fc->kept[fc->nkept++] = (struct kept){chunk, st.prod, len, st.seq};
        return 1;
    }
    struct held *hd = &cs->held[cs->nheld++];
    *hd = (struct held){receipt, st.prod, st.seq, chunk, len, 0};
    if (rnd(&cs->rng) & 1) { /* done with the bytes before the ack */
        hd->dropped = 1;
        if (lref_release(c, fc->h, fc->lr, chunk, cs->who) != 0)
            return -EPROTO;
    }
    return 1;
}

static void *fan_consumer_main(void *arg)
{
    struct fan_cons *fc = arg;
    struct cons *cs = &fc->cs;
    struct ctx *c = &fc->f->c;
    wait_for_go(c);
    while (!atomic_load_explicit(&c->failed, memory_order_relaxed)) {
        if (fc->nkept == FAN_KEEP || (fc->nkept && rnd(&cs->rng) % 2 == 0)) {
            if (fan_release_kept(fc, (int)(rnd(&cs->rng) % (uint64_t)fc->nkept)) != 0)
                break;
            continue;
        }
        if (cs->nheld == MAX_HOLD || (cs->nheld && rnd(&cs->rng) % 3 == 0)) {
            if (fan_finish_hold(fc, (int)(rnd(&cs->rng) % (uint64_t)cs->nheld)) != 0)
                break;
            continue;
        }
        int64_t rc = fan_recv(fc);
        if (rc > 0)
            continue;
        if (rc != -ENOENT && rc != -EAGAIN && rc != -EPIPE) {
            if (!atomic_load(&c->failed))
                fail(c, "%s: get/take returned %" PRId64, cs->who, rc);
            break;
        }
        if (cs->nheld || fc->nkept) { /* let go of everything before waiting (head-of-line,
                                        * and the producers may wait for these chunks) */
            if (fan_finish_all(fc) != 0)
                break;
            continue;
        }
        if (rc == -EPIPE)
            break;
        if (block(c, fc->h, fc->ring, UPIPE_WAIT_READABLE, cs->who) < 0)
            break;
    }
    if (!atomic_load(&c->failed))
        fan_finish_all(fc);
    return NULL;
}

static int fan_all_received(struct ctx *c)
{
    struct fan *f = (struct fan *)c;
    return atomic_load(&c->received) >= c->per_prod * (uint64_t)f->fv->nprod * f->fv->nrings;
}

static int run_fan_variant(const struct fan_variant *fv, uint64_t iters, int64_t timeout_ns,
                           int verbose)
{
    current_variant = fv->name;
    int64_t t_start = now_ns();
    alarm((unsigned)(timeout_ns / 1000000000LL) + 15);
    struct fan *f = calloc(1, sizeof *f);
    static struct lrefs lrefs[FAN_MAX_RINGS + 1];
    static struct fan_prod prods[MAX_PROD];
    static struct fan_cons conss[FAN_MAX_RINGS * MAX_CONS];
    if (!f) {
        fail(NULL, "out of memory");
        return EXIT_FAIL;
    }
    struct ctx *c = &f->c;
    f->fv = fv;
    f->v = (struct variant){.name = fv->name, .nprod = fv->nprod, .ncons = fv->ncons};
    c->v = &f->v;
    c->seed = global_seed;
    c->unordered = fv->take == 2;
    c->per_prod = iters / (2 * (uint64_t)fv->nprod); /* each item is received nrings times */
    if (c->per_prod < 16)
        c->per_prod = 16;
    c->deadline = t_start + timeout_ns;
    struct upipe_config cfg;
    make_fan_config(&cfg, fv->nrings, fv->capacity, fv->nchunks);
    int rc = upipe_create(&cfg, &c->hp);
    if (rc != 0) {
        fail(NULL, "upipe_create returned %d", rc);
        free(f);
        return EXIT_FAIL;
    }
    c->hc = c->hp;
    c->inline_max = upipe_inline_max(c->hp, 0);
    memset(lrefs, 0, sizeof lrefs);
    for (uint32_t r = 0; r <= fv->nrings; r++) {
        pthread_mutex_init(&lrefs[r].mu, NULL);
        f->lr[r] = &lrefs[fv->nrings]; /* the producers' process */
        if (r < fv->nrings)
            f->hr[r] = c->hp;
    }
#ifndef UNDER_TSAN
    for (uint32_t r = 1; r < fv->nrings && !fv->one_process; r++) {
        if ((rc = attach_fan(c->hp, &f->hr[r])) != 0) {
            fail(c, "upipe_attach_fds returned %d", rc);
            f->hr[r] = c->hp;
            break;
        }
        f->lr[r] = &lrefs[r];
    }
#endif
    for (int i = 0; i < fv->nprod; i++)
        for (uint32_t r = 0; r < fv->nrings; r++)
            if (!(f->seen[r][i] = calloc(c->per_prod, 1)))
                fail(c, "out of memory");

    pthread_t tp[MAX_PROD], tc[FAN_MAX_RINGS * MAX_CONS];
    int np = 0, nc = 0;
    memset(prods, 0, sizeof prods);
    memset(conss, 0, sizeof conss);
    for (int i = 0; i < fv->nprod && !atomic_load(&c->failed); i++) {
        struct fan_prod *p = &prods[i];
        *p = (struct fan_prod){.f = f, .id = (uint32_t)i};
        p->rng = splitmix(global_seed ^ (0x400u + (uint64_t)i));
        snprintf(p->who, sizeof p->who, "producer %d", i);
        if (pthread_create(&tp[np], NULL, fan_producer_main, p) != 0) {
            fail(c, "pthread_create failed");
            break;
        }
        np++;
    }
    for (uint32_t r = 0; r < fv->nrings && !atomic_load(&c->failed); r++) {
        for (int i = 0; i < fv->ncons; i++) {
            struct fan_cons *fc = &conss[nc];
            fc->f = f;
            fc->ring = r;
            fc->h = f->hr[r];
            fc->lr = f->lr[r];
            fc->cs.c = c;
            fc->cs.id = (uint32_t)nc;
            fc->cs.rng = splitmix(global_seed ^ (0x500u + (uint64_t)nc));
            snprintf(fc->cs.who, sizeof fc->cs.who, "ring %u consumer %d", r & 63, i & 63);
            if (pthread_create(&tc[nc], NULL, fan_consumer_main, fc) != 0) {
                fail(c, "pthread_create failed");
                break;
            }
            nc++;
        }
    }
    atomic_store_explicit(&c->go, 1, memory_order_release);
    for (int i = 0; i < np; i++)
        pthread_join(tp[i], NULL);
    atomic_store(&c->producers_done, 1);
    uint64_t want = c->per_prod * (uint64_t)fv->nprod * fv->nrings;
    if (!atomic_load(&c->failed) && poll_until(c, fan_all_received) != 0 &&
        !atomic_load(&c->failed))
        fail(c, "only %" PRIu64 " of %" PRIu64 " receptions by the deadline",
             atomic_load(&c->received), want);
    for (uint32_t r = 0; r < fv->nrings; r++)
        upipe_close(c->hp, r); /* the consumers, waiting, see -EPIPE */
    for (int i = 0; i < nc; i++)
        pthread_join(tc[i], NULL);
    atomic_store(&c->stop, 1);

    if (!atomic_load(&c->failed)) {
        for (int i = 0; i < fv->nprod; i++) {
            if (c->sent[i] != c->per_prod)
                fail(c, "producer %d sent %" PRIu64 " of %" PRIu64, i, c->sent[i], c->per_prod);
            for (uint32_t r = 0; r < fv->nrings; r++)
                for (uint64_t s = 0; s < c->per_prod; s++)
                    if (atomic_load_explicit(&f->seen[r][i][s], memory_order_relaxed) != 1) {
                        fail(c, "ring %u received p%d seq %" PRIu64 " %u times", r, i, s,
                             atomic_load(&f->seen[r][i][s]));
                        r = fv->nrings;
                        break;
                    }
        }
        uint64_t redelivered = 0;
        struct upipe_stats st;
        for (uint32_t r = 0; r < fv->nrings; r++) {
            upipe_stats(c->hp, r, &st);
            redelivered += st.redelivered;
            if (st.count != 0 || st.aborted_puts || st.lost_items || st.tombstones_skipped)
                fail(c, "ring %u: count %" PRIu64 " aborted %" PRIu64 " lost %" PRIu64
                        " tombstones %" PRIu64,
                     r, st.count, st.aborted_puts, st.lost_items, st.tombstones_skipped);
        }
        if (redelivered != atomic_load(&c->nacks) || st.recoveries || st.reclaimed_chunks ||
            st.lost_leases)
            fail(c, "redelivered %" PRIu64 " (nacked %" PRIu64 ") recoveries %" PRIu64
                    " reclaimed %" PRIu64 " lost_leases %" PRIu64,
                 redelivered, atomic_load(&c->nacks), st.recoveries, st.reclaimed_chunks,
                 st.lost_leases);
        for (uint32_t ch = 0; ch < fv->nchunks; ch++) {
            int held = upipe_chunk_held(c->hp, ch);
            for (uint32_t r = 1; r < fv->nrings; r++)
                held |= upipe_chunk_held(f->hr[r], ch);
            if (held || upipe_chunk_shared(c->hp, ch))
                fail(c, "chunk %u still held (%d) or shared (%d) at the end", ch, held,
                     upipe_chunk_shared(c->hp, ch));
        }
        for (uint32_t r = 0; r <= fv->nrings; r++)
            for (uint32_t ch = 0; ch < FAN_MAX_CHUNKS; ch++)
                if (lrefs[r].count[ch])
                    fail(c, "chunk %u: %u references never let go of", ch, lrefs[r].count[ch]);
        if (!atomic_load(&c->failed) && !check_pool(c->hp, fv->name))
            atomic_fetch_add(&c->failed, 1);
    }
    int failed = atomic_load(&c->failed) != 0;
    if (verbose || failed)
        fprintf(stderr, "%-26s fanout %dx%dx%u cap=%-3" PRIu64 " items=%-7" PRIu64
                        " waits=%-7" PRIu64 " nacks=%" PRIu64 " %6.3fs %s\n",
                fv->name, fv->nprod, fv->ncons, fv->nrings, fv->capacity,
                atomic_load(&c->received), atomic_load(&c->waits), atomic_load(&c->nacks),
                (double)(now_ns() - t_start) / 1e9, failed ? "FAIL" : "ok");
    for (uint32_t r = 1; r < fv->nrings; r++)
        if (f->hr[r] != c->hp)
            upipe_handle_unref(f->hr[r]);
    upipe_handle_unref(c->hp);
    for (uint32_t r = 0; r <= fv->nrings; r++)
        pthread_mutex_destroy(&lrefs[r].mu);
    for (int i = 0; i < fv->nprod; i++)
        for (uint32_t r = 0; r < fv->nrings; r++)
            free((void *)f->seen[r][i]);
    free(f);
    alarm(0);
    return failed ? EXIT_FAIL : EXIT_PASS;
}

/*
 * The look (L9), made to lose its race on purpose. Whoever lets go of a shared chunk looks
 * whether that was the last reference: it loads holders, then rings. The core calls
 * upipe_test_look_between between the two loads (run.sh builds with -DUPIPE_TEST_HOOKS), and
 * there another process gets the chunk from the last ring that had it: its holder bit set, the
 * ring's bit cleared. The look read holders before the get and rings after it, both zero,
 * although the chunk is held: it must not free it (its CAS fails: the move bumped share's
 * version). Found by the fan-out stress, about once in 25 runs; this replays it every time.
 */
static struct {
    _Atomic(upipe_handle *) getter; /* armed: gets from ring at the next look at chunk */
    uint32_t chunk, ring, got_chunk;
    int64_t got;
} look_move;

void upipe_test_look_between(upipe_handle *h, uint32_t chunk);
void upipe_test_look_between(upipe_handle *h, uint32_t chunk)
{
    (void)h;
    upipe_handle *g = atomic_load_explicit(&look_move.getter, memory_order_relaxed);
    if (!g || chunk != look_move.chunk)
        return;
    atomic_store_explicit(&look_move.getter, NULL, memory_order_relaxed); /* once */
    char out[SLOT_SIZE];
    look_move.got = upipe_get(g, look_move.ring, out, upipe_inline_max(g, look_move.ring),
                              &look_move.got_chunk);
}

static int run_shared_look(void)
{
    current_variant = "shared_look";
    alarm(30);
    int ok = 1;
    struct upipe_config cfg;
    upipe_handle *hp, *hc, *hg;
    make_fan_config(&cfg, 2, 4, 4);
    if (upipe_create(&cfg, &hp) != 0 || attach_fan(hp, &hc) != 0 || attach_fan(hp, &hg) != 0) {
        fail(NULL, "shared_look: setup failed");
        return EXIT_FAIL;
    }
    for (int round = 0; round < 4 && ok; round++) { /* chunks and versions change each round */
        uint32_t c, c2;
        uint64_t done = 0;
        /* rings 0 and 1; ring 0's consumer done with it: held by the producer and ring 1 */
        CHECK(fan_produce(hp, 3, 80 + round, &c, &done) == 0 && done == 3, "put: done %#" PRIx64,
              done);
        ok = ok && fan_expect(hc, 0, 80 + round, &c2, NULL, "look") == 0;
        CHECK(upipe_free(hc, c) == 0 && chunks_free(hp) == 3, "ring 0's consumer lets go");
        look_move.chunk = c;
        look_move.ring = 1;
        look_move.got = -1;
        atomic_store(&look_move.getter, hg);
        CHECK(upipe_free(hp, c) == 0, "the producer's free");
        CHECK(atomic_load(&look_move.getter) == NULL && look_move.got >= 0 &&
                  look_move.got_chunk == c,
              "the get inside the look: %" PRId64 " chunk %u", look_move.got, look_move.got_chunk);
        atomic_store(&look_move.getter, NULL);
        CHECK(upipe_chunk_held(hg, c) && upipe_chunk_shared(hp, c) && chunks_free(hp) == 3 &&
                  fan_intact(upipe_chunk_ptr(hg, c), 80 + round),
              "round %d: the getter's chunk was freed under it (held %d shared %d, %" PRIu64
              " free)",
              round, upipe_chunk_held(hg, c), upipe_chunk_shared(hp, c), chunks_free(hp));
        CHECK(upipe_free(hg, c) == 0 && chunks_free(hp) == 4 && !upipe_chunk_shared(hp, c),
              "round %d: the getter's free returns it", round);
    }
    ok = ok && check_pool(hp, "shared_look");
    upipe_handle_unref(hg);
    upipe_handle_unref(hc);
    upipe_handle_unref(hp);
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/*
 * Deaths around shared chunks (L11). A forked child attaches like any process, does its part of
 * a fan-out on a fresh 3-ring segment, and dies there (SIGKILL, or _exit without detaching),
 * sometimes in the middle of a step (upipe_debug_abandon 16 on). The parent (one process: it
 * frees a chunk once, however many rings it got it from) runs upipe_recover and checks where
 * every item is, that the chunk stays out of its pool while a ring or a live holder has it, and
 * that it is back, once, when the last one lets go.
 */
struct fan_child {
    int produce;          /* allocate a chunk for item id and put_shared it into put_rings */
    uint64_t put_rings;
    uint64_t expect_done; /* ... which must say done = this */
    int free_own;         /* ... then upipe_free it */
    uint64_t get_rings;   /* get from each of these rings (and keep) */
    uint64_t take_rings;  /* take from each of these (never acked) */
    int free_taken;       /* upipe_free what it took, before the ack that never comes */
    int what;             /* >= 0: then upipe_debug_abandon(ring, what) */
    uint32_t ring;
    int sigkill;          /* die by SIGKILL (else _exit(0), without detaching) */
    int id;
};

static void fan_child_main(upipe_handle *h0, const struct fan_child *ch, pid_t parent)
{
    die_with_parent(parent);
    upipe_handle *h;
    char out[SLOT_SIZE];
    uint32_t c;
    uint64_t done, closed, receipt;
    if (attach_fan(h0, &h) != 0)
        _exit(2);
    if (ch->produce) {
        if (fan_produce(h, ch->put_rings, ch->id, &c, &done) != 0 || done != ch->expect_done)
            _exit(3);
        if (ch->free_own && upipe_free(h, c) != 0)
            _exit(4);
    }
    for (uint32_t r = 0; r < 3; r++)
        if ((ch->get_rings >> r & 1) && upipe_get(h, r, out, upipe_inline_max(h, r), &c) < 0)
            _exit(5);
    for (uint32_t r = 0; r < 3; r++) {
        if (!(ch->take_rings >> r & 1))
            continue;
        if (upipe_take(h, r, out, upipe_inline_max(h, r), &c, &receipt) < 0)
            _exit(6);
        if (ch->free_taken && upipe_chunk_held(h, c) && upipe_free(h, c) != 0)
            _exit(7);
    }
    (void)closed;
    if (ch->what >= 0 && upipe_debug_abandon(h, ch->ring, ch->what) != 0)
        _exit(8);
    if (ch->sigkill)
        raise(SIGKILL);
    _exit(0); /* no detach, no unref: a crash as far as the segment can tell */
}

/* Fork a child that does ch and dies; reap it and check it died as planned. */
static int fan_crash(upipe_handle *h, const struct fan_child *ch, const char *what)
{
    int ok = 1;
    fflush(NULL);
    pid_t parent = getpid(), pid = fork();
    if (pid == 0)
        fan_child_main(h, ch, parent);
    live_children[MAX_VICTIMS] = pid;
    int status = -1;
    while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    live_children[MAX_VICTIMS] = 0;
    if (ch->sigkill)
        CHECK(pid > 0 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
              "%s: child status %#x, want killed", what, status);
    else
        CHECK(pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "%s: child status %#x (exit %d)", what, status,
              WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return ok;
}

static int fan_recover(upipe_handle *h, const char *what)
{
    int ok = 1, rc = upipe_recover(h);
    struct upipe_stats st;
    upipe_stats(h, 0, &st);
    CHECK(rc == 1 && st.recoveries == 1 && st.actors == 1,
          "%s: upipe_recover returned %d, recoveries %" PRIu64 ", %u actors", what, rc,
          st.recoveries, st.actors);
    return ok;
}

/* The segment is as new: every ring empty and none stuck (filled to capacity and drained),
 * nothing lost, every chunk in its pool once. */
static int fan_clean(upipe_handle *h, const char *what)
{
    int ok = 1;
    char out[SLOT_SIZE];
    uint32_t chunk;
    struct upipe_stats st;
    for (uint32_t r = 0; r < 3 && ok; r++) {
        ok = fan_expect_none(h, r, -ENOENT, what);
        upipe_stats(h, r, &st);
        for (uint64_t i = 0; i < st.capacity && ok; i++)
            CHECK(upipe_put(h, r, "z", 1, 2, NULL, 0) == 0, "%s: ring %u: put %" PRIu64, what, r,
                  i);
        for (uint64_t i = 0; i < st.capacity && ok; i++)
            CHECK(LEN(upipe_get(h, r, out, upipe_inline_max(h, r), &chunk)) == 1,
                  "%s: ring %u: get %" PRIu64, what, r, i);
        ok = ok && fan_expect_none(h, r, -ENOENT, what);
    }
    CHECK(st.lost_items == 0 && st.actors == 1, "%s: lost %" PRIu64 " actors %u", what,
          st.lost_items, st.actors);
    return ok && check_pool(h, what);
}

static upipe_handle *fan_segment(void)
{
    struct upipe_config cfg;
    upipe_handle *h = NULL;
    make_fan_config(&cfg, 3, 4, 4);
    int rc = upipe_create(&cfg, &h);
    if (rc != 0)
        fail(NULL, "upipe_create returned %d", rc);
    return rc == 0 ? h : NULL;
}

/* The parent fans item id out to every ring and lets go of its own reference. */
static int fan_parent_put(upipe_handle *h, int id, uint32_t *c, const char *what)
{
    int ok = 1;
    uint64_t done = 0;
    int rc = fan_produce(h, 7, id, c, &done);
    CHECK(rc == 0 && done == 7 && upipe_free(h, *c) == 0, "%s: fan-out: %d done %#" PRIx64, what,
          rc, done);
    return ok;
}

/* The parent gets item id (chunk c) from each ring in rings, and holds one reference to c in
 * all (the caller's upipe_free lets go of it): every get is a reference (L10), so the ones
 * beyond the first it holds are dropped here. */
static int fan_parent_get(upipe_handle *h, uint32_t c, uint64_t rings, int id, const char *what)
{
    int got = upipe_chunk_held(h, c);
    for (uint32_t r = 0; r < 3; r++) {
        if (!(rings >> r & 1))
            continue;
        uint32_t c2;
        if (fan_expect(h, r, id, &c2, NULL, what) != 0)
            return 0;
        if (c2 != c) {
            fail(NULL, "%s: item %d in chunk %u, not %u", what, id, c2, c);
            return 0;
        }
        if (got++ && upipe_free(h, c) != 0) {
            fail(NULL, "%s: the free of a second reference failed", what);
            return 0;
        }
    }
    return 1;
}

/* The chunk is free (in its pool) or not, as want says. */
static int fan_freed(upipe_handle *h, uint32_t c, int want, const char *what, const char *when)
{
    int ok = 1;
    CHECK((chunks_free(h) == 4) == want && upipe_chunk_shared(h, c) == !want,
          "%s: %s: %" PRIu64 " of 4 chunks free, chunk %u shared %d: want it %s", what, when,
          chunks_free(h), c, upipe_chunk_shared(h, c), want ? "free" : "still held");
    return ok;
}

static int run_shared_crash(void)
{
    current_variant = "shared_crash";
    alarm(120);
    int ok = 1;
    char what[96];
    upipe_handle *h;
    uint32_t c = 0;
    struct upipe_stats st;

    /* A dead producer: its own reference goes; what it put is delivered; what it did not put
     * (a ring left out, or full) never appears. */
    for (int v = 0; v < 3 && ok; v++) {
        snprintf(what, sizeof what, "dead producer (%s)",
                 v == 0 ? "rings 0 and 1 of 3" : v == 1 ? "ring 2 full" : "freed its own first");
        if (!(h = fan_segment()))
            return EXIT_FAIL;
        if (v == 1)
            for (int i = 0; i < 4; i++)
                CHECK(upipe_put(h, 2, "i", 1, 2, NULL, 0) == 0, "%s: fill ring 2", what);
        struct fan_child ch = {.produce = 1, .put_rings = v == 0 ? 3 : 7,
                               .expect_done = v == 2 ? 7 : 3, .free_own = v == 2, .what = -1,
                               .sigkill = v == 0, .id = 10 + v};
        ok = ok && fan_crash(h, &ch, what);
        c = 0; /* the child's first allocation (the pool is untouched before it) */
        ok = ok && fan_freed(h, c, 0, what, "before recovery") && fan_recover(h, what);
        upipe_stats(h, 0, &st);
        CHECK(st.reclaimed_chunks == (v != 2), "%s: reclaimed %" PRIu64, what, st.reclaimed_chunks);
        ok = ok && fan_freed(h, c, 0, what, "after recovery") &&
             fan_parent_get(h, c, v == 2 ? 7 : 3, 10 + v, what) && fan_freed(h, c, 0, what, "got");
        for (int i = 0; i < 4 && v == 1 && ok; i++) {
            char out[SLOT_SIZE];
            uint32_t c2;
            CHECK(LEN(upipe_get(h, 2, out, upipe_inline_max(h, 2), &c2)) == 1 && c2 == UINT32_MAX,
                  "%s: ring 2's own items", what);
        }
        ok = ok && fan_expect_none(h, 2, -ENOENT, what);
        CHECK(upipe_free(h, c) == 0, "%s: the parent's free", what);
        ok = ok && fan_freed(h, c, 1, what, "all let go") && fan_clean(h, what);
        upipe_handle_unref(h);
    }

    /* A dead getter holding the chunk: its reference goes with it; when it was the last one
     * (v odd: the parent let go first), recovery returns the chunk. */
    for (int v = 0; v < 4 && ok; v++) {
        snprintf(what, sizeof what, "dead getter (%s, %s)", v & 2 ? "rings 0 and 1" : "ring 0",
                 v & 1 ? "the last holder" : "the parent holds on");
        if (!(h = fan_segment()) || !fan_parent_put(h, 20 + v, &c, what))
            return EXIT_FAIL;
        uint64_t mine = v & 2 ? 4 : 6;
        if (v & 1)
            ok = ok && fan_parent_get(h, c, mine, 20 + v, what) && upipe_free(h, c) == 0;
        struct fan_child ch = {.get_rings = v & 2 ? 3 : 1, .what = -1, .sigkill = 1};
        ok = ok && fan_crash(h, &ch, what) && fan_recover(h, what);
        upipe_stats(h, 0, &st);
        CHECK(st.reclaimed_chunks == 1 && st.lost_leases == 0,
              "%s: reclaimed %" PRIu64 " lost_leases %" PRIu64, what, st.reclaimed_chunks,
              st.lost_leases);
        ok = ok && fan_freed(h, c, v & 1, what, "after recovery");
        if (!(v & 1))
            ok = ok && fan_parent_get(h, c, mine, 20 + v, what) && fan_freed(h, c, 0, what, "got") &&
                 upipe_free(h, c) == 0 && fan_freed(h, c, 1, what, "freed");
        ok = ok && fan_clean(h, what);
        upipe_handle_unref(h);
    }

    /* A dead taker: its unacked item goes back into its ring (at least once), the chunk stays
     * out of its pool while queued there, and the next consumer of that ring gets it. */
    for (int v = 0; v < 3 && ok; v++) {
        snprintf(what, sizeof what, "dead taker (%s)",
                 v == 0 ? "held" : v == 1 ? "freed before the ack" : "also got ring 0");
        if (!(h = fan_segment()) || !fan_parent_put(h, 30 + v, &c, what))
            return EXIT_FAIL;
        uint64_t mine = v == 2 ? 4 : 5;
        ok = ok && fan_parent_get(h, c, mine, 30 + v, what) && upipe_free(h, c) == 0;
        struct fan_child ch = {.take_rings = 2, .free_taken = v == 1, .get_rings = v == 2 ? 1 : 0,
                               .what = -1, .sigkill = 1};
        ok = ok && fan_crash(h, &ch, what) && fan_freed(h, c, 0, what, "before recovery") &&
             fan_recover(h, what);
        upipe_stats(h, 1, &st);
        CHECK(st.redelivered == 1 && st.lost_leases == 0, "%s: redelivered %" PRIu64
              " lost_leases %" PRIu64, what, st.redelivered, st.lost_leases);
        ok = ok && fan_freed(h, c, 0, what, "queued again") &&
             fan_parent_get(h, c, 2, 30 + v, what) && fan_freed(h, c, 0, what, "got again") &&
             upipe_free(h, c) == 0 && fan_freed(h, c, 1, what, "freed") && fan_clean(h, what);
        upipe_handle_unref(h);
    }

    /* A producer dead in the middle of put_shared into ring 1 (it had put into ring 0): claimed
     * only, the slot is skipped; stamped, the put happened and ring 1 delivers it. */
    for (int k = 0; k < 3 && ok; k++) {
        snprintf(what, sizeof what, "put_shared cut after step %d", k);
        if (!(h = fan_segment()))
            return EXIT_FAIL;
        struct fan_child ch = {.produce = 1, .put_rings = 1, .expect_done = 1, .what = 16 + k,
                               .ring = 1, .id = 40 + k};
        ok = ok && fan_crash(h, &ch, what) && fan_recover(h, what);
        c = 0;
        upipe_stats(h, 1, &st);
        CHECK(st.aborted_puts == (k == 0) && st.reclaimed_chunks == 1,
              "%s: aborted %" PRIu64 " reclaimed %" PRIu64, what, st.aborted_puts,
              st.reclaimed_chunks);
        /* ring 0 first, and let go: ring 1's slot alone must keep the chunk (its bit) */
        ok = ok && fan_freed(h, c, 0, what, "after recovery") &&
             fan_parent_get(h, c, 1, 40 + k, what) && fan_expect_none(h, 2, -ENOENT, what) &&
             upipe_free(h, c) == 0 && fan_freed(h, c, k == 0, what, "ring 0 let go of");
        if (k)
            ok = ok && fan_parent_get(h, c, 2, 40 + k, what) && upipe_free(h, c) == 0;
        ok = ok && fan_expect_none(h, 1, -ENOENT, what) && fan_freed(h, c, 1, what, "freed") &&
             fan_clean(h, what);
        upipe_handle_unref(h);
    }

    /* A consumer dead in the middle of an ack (it had or had not let go of the chunk): the ack
     * is finished, never undone: ring 1 does not see the item again; the chunk comes back at
     * the last reference (the child's ack, v even; the parent's, v odd). */
    for (int w = 19; w < 25 && ok; w++) {
        for (int v = 0; v < 2 && ok; v++) {
            snprintf(what, sizeof what, "ack cut after step %d (%s, %s)", (w - 19) % 3,
                     w < 22 ? "freed first" : "still held", v ? "parent last" : "child last");
            if (!(h = fan_segment()) || !fan_parent_put(h, w, &c, what))
                return EXIT_FAIL;
            ok = ok && fan_parent_get(h, c, v ? 1 : 5, w, what);
            if (!v)
                CHECK(upipe_free(h, c) == 0, "%s: parent's free", what);
            struct fan_child ch = {.what = w, .ring = 1};
            ok = ok && fan_crash(h, &ch, what) && fan_freed(h, c, 0, what, "before recovery") &&
                 fan_recover(h, what);
            upipe_stats(h, 1, &st);
            /* the ack's own holder bit is set at every cut: the sweep drops it */
            CHECK(st.redelivered == 0 && st.reclaimed_chunks == 1,
                  "%s: redelivered %" PRIu64 " reclaimed %" PRIu64, what, st.redelivered,
                  st.reclaimed_chunks);
            ok = ok && fan_freed(h, c, !v, what, "after recovery") &&
                 fan_expect_none(h, 1, -ENOENT, what);
            if (v)
                ok = ok && fan_parent_get(h, c, 4, w, what) && upipe_free(h, c) == 0 &&
                     fan_freed(h, c, 1, what, "freed");
            ok = ok && fan_clean(h, what);
            upipe_handle_unref(h);
        }
    }

    /* The last holder dead in the middle of its free: after dropping its bit (nobody looked
     * yet), after winning the right to free the chunk, after making it its own. Recovery puts
     * it back in its pool, once. With the parent still holding on (v = 1), only the first. */
    for (int w = 25; w < 28 && ok; w++) {
        for (int v = 0; v < 2 && ok; v++) {
            if (v && w > 25)
                continue;
            snprintf(what, sizeof what, "free cut after step %d (%s)", w - 25,
                     v ? "parent holds on" : "last holder");
            if (!(h = fan_segment()) || !fan_parent_put(h, w, &c, what))
                return EXIT_FAIL;
            ok = ok && fan_parent_get(h, c, 3, w, what);
            if (!v)
                CHECK(upipe_free(h, c) == 0, "%s: parent's free", what);
            struct fan_child ch = {.get_rings = 4, .what = w, .ring = 0};
            ok = ok && fan_crash(h, &ch, what) && fan_recover(h, what) &&
                 fan_freed(h, c, !v, what, "after recovery");
            if (v)
                ok = ok && upipe_free(h, c) == 0 && fan_freed(h, c, 1, what, "freed");
            ok = ok && fan_clean(h, what);
            upipe_handle_unref(h);
        }
    }

    /* A getter dead in the middle of its get (claimed only; holder bit set; ring bit cleared):
     * a get promises nothing after a death (the item is lost, counted), but the chunk must
     * come back once the others let go. */
    int gets[] = {2, 28, 29};
    for (int i = 0; i < 3 && ok; i++) {
        snprintf(what, sizeof what, "get cut (debug_abandon %d)", gets[i]);
        if (!(h = fan_segment()) || !fan_parent_put(h, 50 + i, &c, what))
            return EXIT_FAIL;
        struct fan_child ch = {.what = gets[i], .ring = 1};
        ok = ok && fan_crash(h, &ch, what) && fan_recover(h, what);
        upipe_stats(h, 1, &st);
        CHECK(st.lost_leases == 1 && st.redelivered == 0, "%s: lost_leases %" PRIu64, what,
              st.lost_leases);
        ok = ok && fan_freed(h, c, 0, what, "after recovery") &&
             fan_expect_none(h, 1, -ENOENT, what) && fan_parent_get(h, c, 5, 50 + i, what) &&
             upipe_free(h, c) == 0 && fan_freed(h, c, 1, what, "freed") && fan_clean(h, what);
        upipe_handle_unref(h);
    }

    /* A taker dead in the middle of giving the item back (nack, redeliver() step k), with room
     * in ring 1 (fast path) or none (in place): the item is in ring 1 once, the chunk queued. */
    for (int inplace = 0; inplace < 2 && ok; inplace++) {
        for (int k = 0; k <= (inplace ? 3 : 4) && ok; k++) {
            snprintf(what, sizeof what, "nack cut after step %d (%s)", k,
                     inplace ? "in place" : "fast path");
            if (!(h = fan_segment()) || !fan_parent_put(h, 60 + k, &c, what))
                return EXIT_FAIL;
            for (int i = 0; i < (inplace ? 3 : 1); i++)
                CHECK(upipe_put(h, 1, "i", 1, 2, NULL, 0) == 0, "%s: put", what);
            struct fan_child ch = {.what = 4 + k, .ring = 1};
            ok = ok && fan_crash(h, &ch, what) && fan_recover(h, what);
            upipe_stats(h, 1, &st);
            CHECK(st.redelivered == 1, "%s: redelivered %" PRIu64, what, st.redelivered);
            int inl = 0, got = 0;
            char out[SLOT_SIZE];
            uint32_t c2;
            int64_t rc;
            while ((rc = upipe_get(h, 1, out, upipe_inline_max(h, 1), &c2)) >= 0 && ok) {
                if (c2 == UINT32_MAX) {
                    inl++;
                    continue;
                }
                got++;
                CHECK(c2 == c && fan_intact(upipe_chunk_ptr(h, c2), 60 + k),
                      "%s: chunk %u from ring 1", what, c2);
            }
            CHECK(rc == -ENOENT && got == 1 && inl == (inplace ? 3 : 1),
                  "%s: ring 1 gave %d chunk items and %d others, then %" PRId64, what, got, inl,
                  rc);
            ok = ok && fan_freed(h, c, 0, what, "after ring 1") &&
                 fan_parent_get(h, c, 5, 60 + k, what) && upipe_free(h, c) == 0 &&
                 fan_freed(h, c, 1, what, "freed") && fan_clean(h, what);
            upipe_handle_unref(h);
        }
    }
    alarm(0);
    return ok ? EXIT_PASS : EXIT_FAIL;
}

/* ------------------------------------------------------------------------------------------ */

static void on_alarm(int sig)
{
    (void)sig;
    static const char a[] = "FAIL [watchdog]: variant ";
    static const char b[] = " hung past its deadline\n";
    const char *v = current_variant;
    ssize_t w = write(2, a, sizeof a - 1);
    w = write(2, v, strlen(v));
    w = write(2, b, sizeof b - 1);
    (void)w;
    for (int i = 0; i <= MAX_VICTIMS; i++)
        if (live_children[i] > 0)
            kill(live_children[i], SIGKILL);
    _exit(EXIT_FAIL);
}

static int selected(const char *name, int argc, char **argv)
{
    if (argc <= 1)
        return 1;
    for (int i = 1; i < argc; i++)
        if (strstr(name, argv[i]) != NULL)
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t iters = env_u64("UPIPE_STRESS_ITERS", DEFAULT_ITERS);
    int64_t timeout_ns = (int64_t)env_u64("UPIPE_STRESS_TIMEOUT", DEFAULT_TIMEOUT_S) * 1000000000LL;
    global_seed = env_u64("UPIPE_STRESS_SEED", (uint64_t)now_ns());
    int verbose = env_u64("UPIPE_STRESS_VERBOSE", 0) != 0;
    signal(SIGALRM, on_alarm);

    int64_t t0 = now_ns();
    int ran = 0, failed = 0, skipped = 0;
    if (selected("basic", argc, argv)) {
        int rc = run_basic();
        ran++;
        failed += rc == EXIT_FAIL;
        skipped += rc == EXIT_SKIP;
        if (rc == EXIT_SKIP)
            return EXIT_SKIP;
    }
    if (selected("limit_wait", argc, argv)) {
        ran++;
        failed += run_limit_wait() == EXIT_FAIL;
    }
    if (selected("take_basic", argc, argv)) {
        ran++;
        failed += run_take_basic() == EXIT_FAIL;
    }
    if (selected("redeliver_cuts", argc, argv)) {
        ran++;
        failed += run_redeliver_cuts() == EXIT_FAIL;
    }
    if (selected("shared_basic", argc, argv)) {
        ran++;
        failed += run_shared_basic() == EXIT_FAIL;
    }
    if (selected("shared_look", argc, argv)) {
        ran++;
        failed += run_shared_look() == EXIT_FAIL;
    }
    if (selected("shared_crash", argc, argv)) {
        ran++;
        failed += run_shared_crash() == EXIT_FAIL;
    }
    for (size_t i = 0; i < NFAN_VARIANTS; i++) {
        if (!selected(FAN_VARIANTS[i].name, argc, argv))
            continue;
        ran++;
        failed += run_fan_variant(&FAN_VARIANTS[i], iters, timeout_ns, verbose) == EXIT_FAIL;
    }
    for (size_t i = 0; i < NVARIANTS; i++) {
        if (!selected(VARIANTS[i].name, argc, argv))
            continue;
        /* close variants: several short rounds, each a fresh segment closed mid-stream, so
         * the close lands in different places (mid-claim, mid-wait, mid-drain) */
        int rounds = VARIANTS[i].close_mid ? CLOSE_ROUNDS : 1, rc = EXIT_PASS;
        for (int r = 0; r < rounds && rc == EXIT_PASS; r++)
            rc = run_variant(&VARIANTS[i], iters / (uint64_t)rounds, timeout_ns, verbose);
        ran++;
        failed += rc == EXIT_FAIL;
        if (rc == EXIT_SKIP)
            return EXIT_SKIP;
    }
    const char *cfgname =
#ifdef UNDER_TSAN
        "tsan";
#elif defined(UNDER_ASAN)
        "asan+ubsan";
#else
        "plain";
#endif
    if (ran == 0) {
        fprintf(stderr, "stress: no variant matches the filter\n");
        return EXIT_FAIL;
    }
    printf("stress[%s]: %d/%d passed, %" PRIu64 " items per variant, seed %" PRIu64 ", %.1f s\n",
           cfgname, ran - failed - skipped, ran, iters, global_seed, (double)(now_ns() - t0) / 1e9);
    return failed ? EXIT_FAIL : EXIT_PASS;
}
