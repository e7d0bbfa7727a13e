/*
 * upipe.c - the segment: creation and attachment, the actor table and its journal, chunk pools,
 * the queue operations, waiting, and crash recovery.
 *
 * Facts this file depends on:
 * - A chunk has exactly one holder, named by chunk.owner: its class's free ring (FREE), a
 *   published data-ring slot (QUEUED), or one attached process (its actor tag). Operations move a
 *   chunk between holders, so a dead holder's chunks are exactly those whose owner is its tag.
 *   The one exception is a chunk a producer fans out to several rings (upipe_put_shared): it
 *   becomes SHARED, held by a set of actors and a set of ring slots, one bit each (struct
 *   upipe_chunk), and is freed by whoever clears the last bit (shared_maybe_free). A holder
 *   bit is per process, whatever number of its threads hold the chunk; the process's own
 *   changes of it are serialized (bits_lock), so no internal use of the bit (an ack's) can
 *   take away a reference another of its threads just acquired.
 * - Every claim of ring positions is preceded by a journal entry (struct upipe_rec) naming the
 *   ring and positions, and the entry is cleared only after the slots are published / released.
 *   So a claimed-but-unfinished slot always has a journal entry naming it, in a live or a dead
 *   actor; recovery repairs it only when no live actor's entry names it.
 * - A producer writes the slot, then stamp = pos (R2), then for a chunk owner = QUEUED/FREE, then
 *   seq = pos + 1 (R0). A slot whose stamp is its position is complete, so recovery publishes it
 *   (the put happened); otherwise it becomes a tombstone and the chunk stays with the dead actor.
 * - A take (at-least-once) is a get whose slot is not released until the ack: the item stays
 *   intact in its slot, named by the taker's journal (HOLD) for as long as it is unacked. If
 *   the taker dies (or detaches, or nacks), the item is moved to a fresh position of the same
 *   ring (REDELIVER, see redeliver()), so another consumer gets it. A held chunk is flagged
 *   HELD: the taker may read it, but not free or put it, until the ack.
 */
#define _GNU_SOURCE
#include "upipe.h"

#include "upipe_atomic.h"
#include "upipe_futex.h"
#include "upipe_layout.h"
#include "upipe_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RECOVERY_SLICE_NS (100 * 1000 * 1000LL) /* a sleeper looks for dead peers this often */
#define BUSY_RECOVER_NS (10 * 1000 * 1000LL)    /* a stuck non-blocking get checks this often */
#define DEFAULT_SPIN_NS (20 * 1000LL)
#define ATTACH_POLL_NS (1000 * 1000LL)

struct upipe_handle {
    uint8_t *base;
    uint64_t size;
    int fds[UPIPE_MAX_FDS]; /* memfd, then data ring i's eventfds: 1 + 2i data, 2 + 2i space;
                             * owned by the handle */
    uint32_t nfds;
    struct upipe_header *hdr;
    struct upipe_actor *actor;
    uint32_t actor_index;
    uint32_t tag;
    _Atomic uint64_t recs_busy; /* which journal entries this process's threads are using */
    _Atomic int refs;
    _Atomic int64_t last_busy_recover_ns;
    int64_t spin_ns;
    int detached; /* upipe_detach_now ran: the table entry is no longer ours */
    /* Takes this process holds: hold_tok[i] is the receipt of the take journal entry i holds
     * (0: none). A receipt is (serial << 6) | i with a serial never reused by this handle, so
     * a receipt acked twice, or after its entry was reused, is refused (-ENOENT). */
    _Atomic uint64_t hold_tok[UPIPE_RECS_PER_ACTOR];
    _Atomic uintptr_t hold_thread[UPIPE_RECS_PER_ACTOR]; /* the taker (this_thread()) */
    _Atomic uint64_t hold_serial;
    _Atomic uint32_t nholds; /* holds plus takes in progress, at most UPIPE_MAX_HOLDS */
    /* Serializes this process's changes of its own holder bit on shared chunks (bits_lock):
     * one bit stands for all of its threads' references. */
    _Atomic uint32_t bits_lock;
    /* This process's references to each shared chunk (under bits_lock; allocated at the first
     * shared chunk): a get, a take and the sharing each add one, upipe_free drops one, and the
     * holder bit goes with the last. So threads never drop each other's references. */
    uint32_t *shared_refs; /* total_chunks counts, allocated with the handle */
};

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                              */

/* Tests only (upipe_debug_abandon): an operation given a cut stops after that step and returns,
 * leaving everything as a SIGKILL there would; NO_CUT runs it to the end. */
#define NO_CUT (-1)
/* Cut points of the shared-chunk paths (upipe_debug_abandon 16 on). */
enum {
    CUT_PUT_CLAIMED = 0,   /* put_shared, in one ring: the slot claimed, nothing written */
    CUT_PUT_STAMPED = 1,   /* ... the slot written and stamped; the ring's bit not set */
    CUT_PUT_RING_BIT = 2,  /* ... the ring's bit set; not published */
    CUT_ACK_JOURNALED = 0, /* ack_shared: ACK journaled, the ack's own holder bit set */
    CUT_ACK_RING_BIT = 1,  /* ... the ring's bit cleared; the slot not released */
    CUT_ACK_RELEASED = 2,  /* ... the slot released; the ack's holder bit not dropped */
    CUT_FREE_DROPPED = 0,  /* dropping our holder bit: cleared, nobody has looked */
    CUT_FREE_WON = 1,      /* ... we won the right to free it (share FREEING + us) */
    CUT_FREE_OWNED = 2     /* ... the chunk is ours (owner = our tag), not yet in its pool */
};

/* An identity for the calling thread, without a syscall: the address of a thread-local. */
static uintptr_t this_thread(void)
{
    static _Thread_local char mark;
    return (uintptr_t)&mark;
}

static inline struct upipe_ring *ring_at(upipe_handle *h, uint32_t i)
{
    return (struct upipe_ring *)(h->base + h->hdr->ring_off[i]);
}

static inline struct upipe_chunk *chunk_hdr(upipe_handle *h, uint32_t c)
{
    return (struct upipe_chunk *)(h->base + h->hdr->chunks_off) + c;
}

static inline struct upipe_actor *actor_at(upipe_handle *h, uint32_t i)
{
    return (struct upipe_actor *)(h->base + h->hdr->actors_off) + i;
}

static inline uint32_t make_tag(uint32_t index, uint32_t gen)
{
    return (index + 1) | ((gen & 0xFFFFFFu) << 8);
}

static const struct upipe_class *class_of(upipe_handle *h, uint32_t c)
{
    for (uint32_t i = 0; i < h->hdr->nclasses; i++) {
        const struct upipe_class *k = &h->hdr->classes[i];
        if (c >= k->first_chunk && c < k->first_chunk + k->nchunks)
            return k;
    }
    return NULL;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static uint64_t pow2_at_least(uint64_t v)
{
    uint64_t p = 2;
    while (p < v)
        p <<= 1;
    return p;
}

/* Journal entries: one per concurrently running operation of this process. */
static struct upipe_rec *rec_get(upipe_handle *h, uint32_t op, uint32_t ring)
{
    for (;;) {
        uint64_t busy = UPIPE_LOAD_RELAXED(&h->recs_busy);
        if (~busy == 0) {
            sched_yield(); /* 64 threads inside upipe at once: let one finish */
            continue;
        }
        int i = __builtin_ctzll(~busy);
        if (atomic_compare_exchange_weak_explicit(&h->recs_busy, &busy, busy | (1ULL << i),
                                                  memory_order_acquire, memory_order_relaxed)) {
            struct upipe_rec *rec = &h->actor->recs[i];
            UPIPE_STORE_RELAXED(&rec->ring, ring);
            UPIPE_STORE_RELAXED(&rec->n, 0);
            UPIPE_STORE_RELAXED(&rec->op, op); /* visible to recovery through the claiming CAS */
            return rec;
        }
    }
}

static void rec_put(upipe_handle *h, struct upipe_rec *rec)
{
    uint64_t bit = 1ULL << (uint64_t)(rec - h->actor->recs);
    UPIPE_STORE_RELEASE(&rec->op, UPIPE_OP_NONE); /* after the publish / release it covers */
    atomic_fetch_and_explicit(&h->recs_busy, ~bit, memory_order_release);
}

/* The process-local lock on this process's holder bit (held for a few atomics, never across a
 * wait or a syscall; a spin, then a yield for a holder that was preempted). Process-local: a
 * death takes every thread with it, and recovery only ever changes dead actors' bits. */
static void bits_lock(upipe_handle *h)
{
    while (atomic_exchange_explicit(&h->bits_lock, 1, memory_order_acquire)) {
        for (int i = 0; i < 64 && atomic_load_explicit(&h->bits_lock, memory_order_relaxed); i++)
            UPIPE_CPU_RELAX();
        if (atomic_load_explicit(&h->bits_lock, memory_order_relaxed))
            sched_yield();
    }
}

static void bits_unlock(upipe_handle *h)
{
    atomic_store_explicit(&h->bits_lock, 0, memory_order_release);
}

/*
 * The waker's half of the doorbell. Callers have just published (release stores); F0 orders
 * those before the waiter-count loads, pairing with the waiter's seq_cst increment followed by
 * its seq_cst re-check (docs/futex.md, "lost wakeups"). No waiter, no syscall.
 */
static void ec_signal(upipe_handle *h, struct upipe_ec *ec)
{
    UPIPE_FENCE_SEQCST(); /* F0 */
    uint32_t sw = UPIPE_LOAD_RELAXED(&ec->sync_waiters);
    uint32_t aw = UPIPE_LOAD_RELAXED(&ec->async_waiters);
    if ((sw | aw) == 0)
        return;
    /* Ring only for sleepers that armed since the last ring: while a woken waiter is getting up,
     * every further item would otherwise cost the waker another syscall. */
    int ring_sync = sw && atomic_exchange(&ec->sync_armed, 0);
    int ring_async = aw && atomic_exchange(&ec->async_armed, 0);
    if (!(ring_sync | ring_async))
        return;
    UPIPE_FETCH_ADD(&ec->seq, 1);
    if (ring_sync)
        upipe_futex_wake(&ec->seq, INT_MAX); /* all who armed: one flag serves them all */
    if (ring_async) {
        uint64_t one = 1;
        ssize_t w = write(h->fds[1 + ec->efd_index], &one, sizeof one);
        (void)w; /* EAGAIN means the counter is already non-zero: the bell is ringing */
    }
}

/* A consumer let go of a slot. On a closed ring that may be what a consumer waiting for the
 * drain (cond_ready: no other claimed slot) waits for: ring not_empty too. */
static void released_signal(upipe_handle *h, struct upipe_ring *r)
{
    ec_signal(h, &r->not_full);
    if (UPIPE_LOAD_SEQCST(&r->closed))
        ec_signal(h, &r->not_empty);
}

/* ------------------------------------------------------------------------------------------ */
/* process liveness                                                                           */

static int read_proc_stat(uint32_t pid, char *state, uint64_t *starttime)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parens; the last ')' ends it */
    if (!p || p[1] != ' ')
        return -EIO;
    p += 2;
    *state = *p;
    /* field 3 is the state; starttime is field 22 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return -EIO;
        p++;
    }
    *starttime = strtoull(p, NULL, 10);
    return 0;
}

uint64_t upipe_pid_starttime(uint32_t pid)
{
    char st;
    uint64_t t = 0;
    return read_proc_stat(pid, &st, &t) == 0 ? t : 0;
}

int upipe_pid_alive(uint32_t pid, uint64_t starttime)
{
    if (pid == 0)
        return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 0;
    char st;
    uint64_t t;
    if (read_proc_stat(pid, &st, &t) != 0)
        return 0;
    if (st == 'Z' || st == 'X' || st == 'x')
        return 0; /* killed but not yet reaped: it will never finish what it started */
    if (starttime != 0 && t != starttime)
        return 0; /* the pid now names another process */
    return 1;
}

static int actor_alive(struct upipe_actor *a)
{
    uint32_t pid = UPIPE_LOAD_ACQUIRE(&a->pid);
    if (pid == UPIPE_PID_ABANDONED)
        return 0; /* its process left holding takes: recovery finishes them */
    return upipe_pid_alive(pid, UPIPE_LOAD_ACQUIRE(&a->starttime));
}

/* ------------------------------------------------------------------------------------------ */
/* layout                                                                                     */

struct plan {
    uint64_t actors_off, chunks_off, ring_off[UPIPE_MAX_RINGS], data_off[UPIPE_MAX_CLASSES];
    uint64_t free_cap[UPIPE_MAX_CLASSES];
    uint64_t total;
    uint32_t total_chunks;
};

static int make_plan(const struct upipe_config *cfg, struct plan *pl)
{
    if (!cfg || cfg->ndata_rings < 1 || cfg->ndata_rings > UPIPE_MAX_DATA_RINGS)
        return -EINVAL;
    if (cfg->nclasses > UPIPE_MAX_CLASSES)
        return -EINVAL;
    if (cfg->slot_size < 64 || cfg->slot_size > 65536 || cfg->slot_size % 8)
        return -EINVAL;
    if (cfg->capacity < 2 || cfg->capacity > (1ULL << 30) || (cfg->capacity & (cfg->capacity - 1)))
        return -EINVAL;
    uint64_t off = UPIPE_HEADER_SIZE;
    pl->actors_off = off;
    off = align_up(off + (uint64_t)UPIPE_MAX_ACTORS * sizeof(struct upipe_actor), 4096);
    uint64_t total_chunks = 0;
    for (uint32_t i = 0; i < cfg->nclasses; i++) {
        if (cfg->chunk_size[i] < 64 || cfg->chunk_size[i] % 64 || cfg->nchunks[i] < 1)
            return -EINVAL;
        if (i > 0 && cfg->chunk_size[i] <= cfg->chunk_size[i - 1])
            return -EINVAL;
        if (cfg->chunk_size[i] > (1ULL << 32) - 1) /* a slot's len is 32-bit */
            return -EINVAL;
        total_chunks += cfg->nchunks[i];
    }
    if (total_chunks > (1ULL << 24))
        return -EINVAL;
    pl->total_chunks = (uint32_t)total_chunks;
    pl->chunks_off = off;
    off = align_up(off + total_chunks * sizeof(struct upipe_chunk), 4096);
    for (uint32_t i = 0; i < cfg->ndata_rings; i++) {
        pl->ring_off[i] = off;
        off = align_up(off + upipe_ring_memsize(cfg->capacity, cfg->slot_size), 128);
    }
    for (uint32_t i = 0; i < cfg->nclasses; i++) {
        /* Room for every chunk twice over: tombstones left by dead freers take slots too. */
        pl->free_cap[i] = pow2_at_least(2ULL * cfg->nchunks[i]);
        pl->ring_off[cfg->ndata_rings + i] = off;
        off = align_up(off + upipe_ring_memsize(pl->free_cap[i], UPIPE_SLOT_HEADER), 128);
    }
    off = align_up(off, 4096);
    for (uint32_t i = 0; i < cfg->nclasses; i++) {
        pl->data_off[i] = off;
        uint64_t bytes = cfg->chunk_size[i] * cfg->nchunks[i];
        if (bytes / cfg->nchunks[i] != cfg->chunk_size[i])
            return -EINVAL;
        off = align_up(off + bytes, 4096);
    }
    pl->total = off;
    return 0;
}

int upipe_abi_version(void)
{
    return UPIPE_ABI_VERSION;
}

int64_t upipe_segment_size(const struct upipe_config *cfg)
{
    struct plan pl;
    int rc = make_plan(cfg, &pl);
    return rc < 0 ? rc : (int64_t)pl.total;
}

/* ------------------------------------------------------------------------------------------ */
/* handles                                                                                    */

static int attach_actor(upipe_handle *h)
{
    /* Before the entry is ours: a failure here leaves nothing to undo in the segment. */
    h->shared_refs = calloc(h->hdr->total_chunks ? h->hdr->total_chunks : 1,
                            sizeof *h->shared_refs);
    if (!h->shared_refs)
        return -ENOMEM;
    uint32_t me = (uint32_t)getpid();
    uint64_t start = upipe_pid_starttime(me);
    for (int attempt = 0; attempt < 2; attempt++) {
        for (uint32_t i = 0; i < h->hdr->max_actors; i++) {
            struct upipe_actor *a = actor_at(h, i);
            uint32_t expected = 0;
            if (!UPIPE_CAS(&a->pid, &expected, me))
                continue;
            uint32_t gen = UPIPE_FETCH_ADD(&a->gen, 1) + 1;
            UPIPE_STORE_RELEASE(&a->starttime, start);
            for (uint32_t r = 0; r < UPIPE_RECS_PER_ACTOR; r++)
                UPIPE_STORE_RELAXED(&a->recs[r].op, UPIPE_OP_NONE);
            h->actor = a;
            h->actor_index = i;
            h->tag = make_tag(i, gen);
            return 0;
        }
        if (attempt == 0 && h->actor == NULL) {
            /* Full. Entries of dead processes are freed by any attached process's recovery
             * (sleepers run it every RECOVERY_SLICE_NS); give that a moment once. */
            struct timespec ts = {0, 200 * 1000 * 1000L};
            nanosleep(&ts, NULL);
        }
    }
    return -EUSERS;
}

static upipe_handle *handle_new(uint8_t *base, uint64_t size)
{
    upipe_handle *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->base = base;
    h->size = size;
    h->hdr = (struct upipe_header *)base;
    for (uint32_t i = 0; i < UPIPE_MAX_FDS; i++)
        h->fds[i] = -1;
    atomic_init(&h->refs, 1);
    h->spin_ns = DEFAULT_SPIN_NS;
    return h;
}

static void handle_destroy(upipe_handle *h)
{
    for (uint32_t i = 0; i < UPIPE_MAX_FDS; i++)
        if (h->fds[i] >= 0)
            close(h->fds[i]);
    if (h->base)
        munmap(h->base, h->size);
    free(h->shared_refs);
    free(h);
}

int upipe_create(const struct upipe_config *cfg, upipe_handle **out)
{
    struct plan pl;
    int rc = make_plan(cfg, &pl);
    if (rc < 0)
        return rc;
    int fd = memfd_create("upipe", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)pl.total) != 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    /* Reserve every page now, so an over-budget segment fails here and never SIGBUSes later. */
    rc = posix_fallocate(fd, 0, (off_t)pl.total);
    if (rc != 0 && rc != EOPNOTSUPP) {
        close(fd);
        return -rc;
    }
    /* Nobody may resize it under the other processes' mappings. */
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    void *base = mmap(NULL, pl.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = -errno;
        close(fd);
        return rc;
    }
    upipe_handle *h = handle_new(base, pl.total);
    if (!h) {
        munmap(base, pl.total);
        close(fd);
        return -ENOMEM;
    }
    h->fds[0] = fd;
    h->nfds = 1 + 2 * cfg->ndata_rings;
    for (uint32_t i = 1; i < h->nfds; i++) {
        h->fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (h->fds[i] < 0) {
            rc = -errno;
            handle_destroy(h);
            return rc;
        }
    }

    struct upipe_header *hdr = h->hdr;
    UPIPE_STORE_RELAXED(&hdr->state, UPIPE_STATE_INITIALIZING);
    hdr->magic = UPIPE_MAGIC;
    hdr->layout_version = UPIPE_LAYOUT_VERSION;
    hdr->abi_version = UPIPE_ABI_VERSION;
    hdr->header_size = UPIPE_HEADER_SIZE;
    hdr->creator_pid = (uint32_t)getpid();
    hdr->total_size = pl.total;
    hdr->ndata_rings = cfg->ndata_rings;
    hdr->nclasses = cfg->nclasses;
    hdr->max_actors = UPIPE_MAX_ACTORS;
    hdr->total_chunks = pl.total_chunks;
    hdr->actors_off = pl.actors_off;
    hdr->chunks_off = pl.chunks_off;
    for (uint32_t i = 0; i < cfg->ndata_rings; i++) {
        hdr->ring_off[i] = pl.ring_off[i];
        struct upipe_ring *r = ring_at(h, i);
        upipe_ring_init(r, cfg->capacity, cfg->slot_size, i, 0);
        uint64_t limit = cfg->ring_limit[i] ? cfg->ring_limit[i] : cfg->limit;
        if (limit && limit < cfg->capacity)
            r->limit = limit;
        /* Each ring its own pair of eventfds: a waiter on one ring of a shared segment is
         * never woken (or, worse, robbed of its wakeup) by another ring's traffic. */
        r->not_empty.efd_index = 2 * i;
        r->not_full.efd_index = 2 * i + 1;
    }
    uint32_t first = 0;
    for (uint32_t i = 0; i < cfg->nclasses; i++) {
        uint32_t ri = cfg->ndata_rings + i;
        hdr->ring_off[ri] = pl.ring_off[ri];
        struct upipe_class *k = &hdr->classes[i];
        k->chunk_size = cfg->chunk_size[i];
        k->nchunks = cfg->nchunks[i];
        k->first_chunk = first;
        k->data_off = pl.data_off[i];
        k->free_ring = ri;
        struct upipe_ring *fr = ring_at(h, ri);
        upipe_ring_init(fr, pl.free_cap[i], UPIPE_SLOT_HEADER, ri, UPIPE_RING_FREELIST);
        fr->not_empty.efd_index = 1; /* a free chunk is "space" for a waiting producer */
        fr->not_full.efd_index = 1;
        for (uint32_t c = 0; c < k->nchunks; c++) {
            struct upipe_slot *s = upipe_ring_slot(fr, c);
            UPIPE_SLOT_SET(s, desc, first + c + 1);
            UPIPE_STORE_RELAXED(&s->stamp, c);
            UPIPE_STORE_RELAXED(&s->seq, c + 1);
            UPIPE_STORE_RELAXED(&chunk_hdr(h, first + c)->owner, UPIPE_OWNER_FREE);
        }
        UPIPE_STORE_RELAXED(&fr->head, k->nchunks);
        first += k->nchunks;
    }
    UPIPE_STORE_RELEASE(&hdr->state, UPIPE_STATE_READY); /* R3: pairs with A3 in upipe_attach */

    rc = attach_actor(h);
    if (rc < 0) {
        handle_destroy(h);
        return rc;
    }
    *out = h;
    return 0;
}

int upipe_attach(int memfd, int efd_data, int efd_space, int64_t timeout_ns, upipe_handle **out)
{
    int efds[2] = {efd_data, efd_space};
    return upipe_attach_fds(memfd, efds, 2, timeout_ns, out);
}

int upipe_attach_fds(int memfd, const int *efds, uint32_t nefds, int64_t timeout_ns,
                     upipe_handle **out)
{
    struct stat st;
    if (fstat(memfd, &st) != 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < UPIPE_HEADER_SIZE)
        return -EPROTO;
    uint64_t size = (uint64_t)st.st_size;
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (base == MAP_FAILED)
        return -errno;
    upipe_handle *h = handle_new(base, size);
    if (!h) {
        munmap(base, size);
        return -ENOMEM;
    }
    struct upipe_header *hdr = h->hdr;
    int rc = 0;
    int64_t deadline = upipe_now_ns() + (timeout_ns < 0 ? 0 : timeout_ns);
    /* A3: pairs with R3; after it every creator field is visible. */
    while (UPIPE_LOAD_ACQUIRE(&hdr->state) != UPIPE_STATE_READY) {
        if (hdr->magic != UPIPE_MAGIC && UPIPE_LOAD_ACQUIRE(&hdr->state) == UPIPE_STATE_EMPTY) {
            rc = -EPROTO;
            goto fail;
        }
        if (upipe_now_ns() >= deadline) {
            rc = -ETIMEDOUT; /* the creator never finished (HangsInCreation) */
            goto fail;
        }
        struct timespec ts = {0, ATTACH_POLL_NS};
        nanosleep(&ts, NULL);
    }
    if (hdr->magic != UPIPE_MAGIC || hdr->header_size != UPIPE_HEADER_SIZE ||
        hdr->total_size != size) {
        rc = -EPROTO;
        goto fail;
    }
    if (hdr->layout_version != UPIPE_LAYOUT_VERSION || hdr->abi_version != UPIPE_ABI_VERSION) {
        rc = -EPROTONOSUPPORT;
        goto fail;
    }
    if (nefds != 2 * hdr->ndata_rings) {
        rc = -EINVAL; /* two eventfds per data ring, as upipe_fd numbers them */
        goto fail;
    }
    h->nfds = 1 + nefds;
    for (uint32_t i = 0; i < h->nfds; i++) {
        h->fds[i] = fcntl(i == 0 ? memfd : efds[i - 1], F_DUPFD_CLOEXEC, 3);
        if (h->fds[i] < 0) {
            rc = -errno;
            goto fail;
        }
    }
    rc = attach_actor(h);
    if (rc < 0)
        goto fail;
    *out = h;
    return 0;
fail:
    handle_destroy(h);
    return rc;
}

void upipe_handle_ref(upipe_handle *h)
{
    atomic_fetch_add_explicit(&h->refs, 1, memory_order_relaxed);
}

static int free_chunk_from(upipe_handle *h, uint32_t c, uint32_t expected_owner);
static int give_back_all(upipe_handle *h);
static int shared_drop_own(upipe_handle *h, uint32_t c, int cut);
static int shared_drop_all(upipe_handle *h, uint32_t c);

/* Hand back every chunk this process holds, except those an unacked take still names. */
static int free_own_chunks(upipe_handle *h)
{
    int freed = 0;
    for (uint32_t c = 0; c < h->hdr->total_chunks; c++) {
        struct upipe_chunk *ch = chunk_hdr(h, c);
        uint32_t owner = UPIPE_LOAD_ACQUIRE(&ch->owner);
        if (owner == UPIPE_OWNER_SHARED)
            freed += shared_drop_all(h, c) == 0;
        else if (owner == h->tag && !(UPIPE_LOAD_ACQUIRE(&ch->flags) & UPIPE_CHUNK_HELD))
            freed += free_chunk_from(h, c, h->tag) == 0;
    }
    return freed;
}

void upipe_handle_unref(upipe_handle *h)
{
    if (atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* Last reference in this process: no lease, no view, no operation is left. Give back the
     * takes never acked (redelivered, as after a crash), hand back any chunk still held (a
     * buffer from alloc() that was never put) and leave the table. A take that cannot be given
     * back yet (its ring is full of other items) leaves the entry ABANDONED: recovery, in any
     * process, finishes it once the ring has moved. */
    if (h->actor && !h->detached) {
        int pending = give_back_all(h);
        free_own_chunks(h);
        UPIPE_STORE_RELEASE(&h->actor->pid, pending ? UPIPE_PID_ABANDONED : 0);
    }
    handle_destroy(h);
}

int upipe_detach_now(upipe_handle *h)
{
    /* The process is exiting without running finalizers (os._exit in multiprocessing children):
     * give back its unacked takes and what it holds, and leave the table now, so this is not
     * mistaken for a crash. Lease destructors that still run later find their chunks freed
     * (-EPERM) and do nothing. */
    if (!h->actor || h->detached)
        return 0;
    int pending = give_back_all(h);
    int freed = free_own_chunks(h);
    if (pending || UPIPE_LOAD_ACQUIRE(&h->recs_busy) != 0)
        return freed; /* a take it could not give back, or another thread is mid-operation:
                       * leave the entry to recovery, which runs once this process is gone */
    h->detached = 1;
    UPIPE_STORE_RELEASE(&h->actor->pid, 0);
    return freed;
}

int upipe_fd(upipe_handle *h, int which)
{
    return (which < 0 || (uint32_t)which >= h->nfds) ? -EINVAL : h->fds[which];
}

int upipe_nfds(upipe_handle *h)
{
    return (int)h->nfds;
}

uint32_t upipe_ndata_rings(upipe_handle *h)
{
    return h->hdr->ndata_rings;
}

uint8_t *upipe_base(upipe_handle *h)
{
    return h->base;
}

uint32_t upipe_inline_max(upipe_handle *h, uint32_t ring)
{
    return ring < h->hdr->ndata_rings ? ring_at(h, ring)->inline_max : 0;
}

int upipe_set_spin(upipe_handle *h, int64_t spin_ns)
{
    if (spin_ns < 0)
        return -EINVAL;
    h->spin_ns = spin_ns;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* chunks                                                                                     */

uint8_t *upipe_chunk_ptr(upipe_handle *h, uint32_t c)
{
    const struct upipe_class *k = class_of(h, c);
    return k ? h->base + k->data_off + (uint64_t)(c - k->first_chunk) * k->chunk_size : NULL;
}

int64_t upipe_chunk_size(upipe_handle *h, uint32_t c)
{
    const struct upipe_class *k = class_of(h, c);
    return k ? (int64_t)k->chunk_size : -EINVAL;
}

int64_t upipe_chunk_of(upipe_handle *h, const uint8_t *addr, uint64_t len)
{
    if (addr < h->base || addr >= h->base + h->size)
        return -ENOENT;
    uint64_t off = (uint64_t)(addr - h->base);
    for (uint32_t i = 0; i < h->hdr->nclasses; i++) {
        const struct upipe_class *k = &h->hdr->classes[i];
        uint64_t end = k->data_off + k->chunk_size * k->nchunks;
        if (off < k->data_off || off >= end)
            continue;
        uint64_t idx = (off - k->data_off) / k->chunk_size;
        uint64_t chunk_end = k->data_off + (idx + 1) * k->chunk_size;
        if (off + len > chunk_end)
            return -ENOENT;
        return (int64_t)(k->first_chunk + idx);
    }
    return -ENOENT;
}

int upipe_class_for(upipe_handle *h, uint64_t nbytes)
{
    for (uint32_t i = 0; i < h->hdr->nclasses; i++)
        if (h->hdr->classes[i].chunk_size >= nbytes)
            return (int)i;
    return -EMSGSIZE;
}

static inline uint64_t actor_bit(uint32_t index)
{
    return 1ULL << index;
}

static inline uint32_t tag_index(uint32_t tag)
{
    return (tag & 0xFFu) - 1;
}

int upipe_chunk_held(upipe_handle *h, uint32_t c)
{
    if (c >= h->hdr->total_chunks || !h->actor)
        return 0;
    struct upipe_chunk *ch = chunk_hdr(h, c);
    uint32_t owner = UPIPE_LOAD_ACQUIRE(&ch->owner);
    if (owner == UPIPE_OWNER_SHARED)
        return (UPIPE_LOAD_ACQUIRE(&ch->holders) & actor_bit(h->actor_index)) != 0;
    return owner == h->tag;
}

int upipe_chunk_shared(upipe_handle *h, uint32_t c)
{
    if (c >= h->hdr->total_chunks)
        return 0;
    return UPIPE_LOAD_ACQUIRE(&chunk_hdr(h, c)->owner) == UPIPE_OWNER_SHARED;
}

/* Put chunk c, held by expected_owner, back into its class's free ring. */
static int free_chunk_from(upipe_handle *h, uint32_t c, uint32_t expected_owner)
{
    const struct upipe_class *k = class_of(h, c);
    if (!k)
        return -EINVAL;
    struct upipe_chunk *ch = chunk_hdr(h, c);
    if (UPIPE_LOAD_ACQUIRE(&ch->owner) != expected_owner)
        return -EPERM;
    struct upipe_ring *fr = ring_at(h, k->free_ring);
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, k->free_ring);
    uint64_t p;
    /* The free ring has room for every chunk twice over, so this waits only while tombstones
     * left by dead processes are being consumed. */
    while (upipe_ring_claim_prod(fr, 1, UPIPE_RING_BULK, rec, &p) == 0)
        sched_yield();
    struct upipe_slot *s = upipe_ring_slot(fr, p);
    UPIPE_SLOT_SET(s, desc, (uint64_t)c + 1);
    s->len = 0;
    UPIPE_SLOT_SET(s, kind, 0);
    UPIPE_SLOT_SET(s, meta_len, 0);
    UPIPE_STORE_RELEASE(&s->stamp, p);            /* R2 */
    UPIPE_STORE_RELAXED(&ch->flags, 0);
    UPIPE_STORE_RELEASE(&ch->owner, UPIPE_OWNER_FREE);
    UPIPE_STORE_RELEASE(&s->seq, p + 1);          /* R0 */
    rec_put(h, rec);
    ec_signal(h, &fr->not_empty);
    return 0;
}

/*
 * Shared chunks (docs/design.md, "Shared chunks").
 *
 * A holder bit is set only by an actor that already holds a reference through another bit
 * (the producer's own bit while it queues the chunk; a ring's bit while its consumer takes the
 * slot), before that other bit is cleared. So holders | rings never goes to zero while anyone
 * may still use the chunk, and once it is zero it stays zero for this incarnation. Whoever
 * clears a bit then looks (all seq_cst: of two clearers racing, at least one sees both words
 * zero), and the CAS on share (LIVE -> FREEING + its index) picks one freer per incarnation;
 * the version in share keeps a late clearer of an earlier incarnation from freeing a later one.
 *
 * The look loads the two words one after the other, and a reference can move from one word to
 * the other in between: a consumer sets its holder bit and clears its ring's bit (its load of
 * holders before the set, of rings after the clear, would see a chunk in use as unreferenced),
 * and a producer sets a ring's bit and later clears its own. So every move bumps the version
 * in share between its set and its clear (shared_moved): a look whose two loads straddle a
 * move loaded share before the bump, and its CAS fails. A bump needs a live reference (the
 * mover's), so it never fails the CAS of a look at a chunk that really has none left.
 */
#ifdef UPIPE_TEST_HOOKS
/* Tests only (csrc/tests/run.sh builds with -DUPIPE_TEST_HOOKS; stress.c defines it): called
 * by a look between its two loads, so a test can move a reference exactly there. */
void upipe_test_look_between(upipe_handle *h, uint32_t chunk);
#define LOOK_BETWEEN(h, c) upipe_test_look_between((h), (c))
#else
#define LOOK_BETWEEN(h, c) ((void)0)
#endif

enum { LOOK_KEPT = 0, LOOK_FREED = 1, LOOK_CUT = 2 };
static int shared_maybe_free(upipe_handle *h, uint32_t c, int cut)
{
    struct upipe_chunk *ch = chunk_hdr(h, c);
    uint64_t sh = UPIPE_LOAD_SEQCST(&ch->share); /* before the bits: see above */
    if (UPIPE_SHARE_STATE(sh) != UPIPE_SHARE_LIVE)
        return LOOK_KEPT;
    uint64_t holders = UPIPE_LOAD_SEQCST(&ch->holders);
    LOOK_BETWEEN(h, c);
    if (holders | UPIPE_LOAD_SEQCST(&ch->rings))
        return LOOK_KEPT;
    uint64_t freeing = (sh & ~0xFFULL) | (UPIPE_SHARE_FREEING + h->actor_index);
    if (!UPIPE_CAS(&ch->share, &sh, freeing))
        return LOOK_KEPT; /* another clearer frees it, or it is another incarnation already */
    /* Ours to free. A death from here on: recovery sees FREEING + our index (owner still
     * SHARED) or our tag as owner, and frees it either way. */
    if (cut == CUT_FREE_WON)
        return LOOK_CUT;
    UPIPE_STORE_RELAXED(&ch->flags, 0);
    UPIPE_STORE_RELEASE(&ch->owner, h->tag);
    if (cut == CUT_FREE_OWNED)
        return LOOK_CUT;
    free_chunk_from(h, c, h->tag);
    return LOOK_FREED;
}

/* A reference of shared chunk c is moving from one bit to another: its new bit is set, the old
 * one not yet cleared (see above). */
static void shared_moved(struct upipe_chunk *ch)
{
    UPIPE_FETCH_ADD(&ch->share, 1ULL << 8); /* the version; the state byte is untouched */
}

/* Drop actor index's reference to shared chunk c (recovery, for a dead actor); 0, or -EPERM if
 * it held none. */
static int shared_unhold(upipe_handle *h, uint32_t c, uint32_t index)
{
    uint64_t bit = actor_bit(index);
    if (!(UPIPE_FETCH_AND(&chunk_hdr(h, c)->holders, ~bit) & bit))
        return -EPERM;
    shared_maybe_free(h, c, NO_CUT);
    return 0;
}

/* One more reference of this process to shared chunk c; its holder bit is set with the first.
 * Under bits_lock. */
static void shared_ref_locked(upipe_handle *h, uint32_t c)
{
    if (h->shared_refs[c]++ == 0)
        UPIPE_FETCH_OR(&chunk_hdr(h, c)->holders, actor_bit(h->actor_index));
}

/* Drop one of this process's references to shared chunk c (upipe_free); the holder bit goes
 * with the last one. 0, or -EPERM if it held none; 1 at a cut (tests). */
static int shared_drop_own(upipe_handle *h, uint32_t c, int cut)
{
    uint64_t bit = actor_bit(h->actor_index);
    bits_lock(h); /* not inside an ack of another thread that relies on the bit (ack_shared) */
    uint32_t *refs = h->shared_refs;
    if (refs[c] == 0) {
        bits_unlock(h);
        return -EPERM;
    }
    if (--refs[c] > 0) {
        bits_unlock(h);
        return 0; /* another reference of this process (another view, thread) still holds it */
    }
    uint64_t old = UPIPE_FETCH_AND(&chunk_hdr(h, c)->holders, ~bit);
    bits_unlock(h);
    if (!(old & bit))
        return -EPERM;
    if (cut == CUT_FREE_DROPPED)
        return 0;
    return shared_maybe_free(h, c, cut) == LOOK_CUT ? 1 : 0;
}

/* Leaving (detach): every reference of this process to shared chunk c goes at once. */
static int shared_drop_all(upipe_handle *h, uint32_t c)
{
    uint64_t bit = actor_bit(h->actor_index);
    bits_lock(h);
    h->shared_refs[c] = 0;
    uint64_t old = UPIPE_FETCH_AND(&chunk_hdr(h, c)->holders, ~bit);
    bits_unlock(h);
    if (!(old & bit))
        return -EPERM;
    shared_maybe_free(h, c, NO_CUT);
    return 0;
}

/* A consumer takes over ring ri's reference: holder bit first, then the ring's bit (so the
 * chunk is never without a reference), then the caller releases the slot. */
static void shared_consume(upipe_handle *h, uint32_t c, uint32_t index, uint32_t ri)
{
    struct upipe_chunk *ch = chunk_hdr(h, c);
    UPIPE_FETCH_OR(&ch->holders, actor_bit(index));
    shared_moved(ch);
    UPIPE_FETCH_AND(&ch->rings, ~actor_bit(ri));
}

/* The producer's chunk becomes shared, held by the producer alone. The owner store comes
 * last: until then a death leaves an ordinary chunk of the dead actor, swept as such. */
static void share_chunk(upipe_handle *h, uint32_t c)
{
    struct upipe_chunk *ch = chunk_hdr(h, c);
    uint64_t version = (UPIPE_LOAD_RELAXED(&ch->share) >> 8) + 1;
    UPIPE_STORE_SEQCST(&ch->rings, 0);
    bits_lock(h);
    h->shared_refs[c] = 1; /* the sharer's own reference (upipe_free drops it) */
    UPIPE_STORE_SEQCST(&ch->holders, actor_bit(h->actor_index));
    bits_unlock(h);
    UPIPE_STORE_SEQCST(&ch->share, (version << 8) | UPIPE_SHARE_LIVE);
    UPIPE_STORE_RELAXED(&ch->flags, 0);
    UPIPE_STORE_RELEASE(&ch->owner, UPIPE_OWNER_SHARED);
}

int upipe_free(upipe_handle *h, uint32_t chunk)
{
    if (chunk >= h->hdr->total_chunks)
        return -EINVAL;
    struct upipe_chunk *ch = chunk_hdr(h, chunk);
    uint32_t owner = UPIPE_LOAD_ACQUIRE(&ch->owner);
    if (owner == UPIPE_OWNER_SHARED && h->actor)
        return shared_drop_own(h, chunk, NO_CUT);
    if (owner != h->tag)
        return -EPERM;
    /* One RMW decides between this free and an ack in another thread (which clears HELD with
     * one RMW too): whichever comes second returns the chunk, exactly once. */
    uint32_t old = atomic_fetch_or_explicit(&ch->flags, UPIPE_CHUNK_DROPPED, memory_order_acq_rel);
    if (old & UPIPE_CHUNK_DROPPED)
        return -EPERM; /* let go of already (its ack returns it) */
    if (old & UPIPE_CHUNK_HELD)
        return 0; /* an unacked take names it: the ack frees it */
    return free_chunk_from(h, chunk, h->tag);
}

int64_t upipe_alloc(upipe_handle *h, uint64_t nbytes, uint32_t *chunk_out)
{
    const struct upipe_class *k = NULL;
    for (uint32_t i = 0; i < h->hdr->nclasses; i++) {
        if (h->hdr->classes[i].chunk_size >= nbytes) {
            k = &h->hdr->classes[i];
            break;
        }
    }
    if (!k)
        return -EMSGSIZE;
    struct upipe_ring *fr = ring_at(h, k->free_ring);
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_TAKE, k->free_ring);
    for (;;) {
        uint64_t p;
        int busy;
        if (upipe_ring_claim_cons(fr, 1, UPIPE_RING_BULK, rec, &p, &busy) == 0) {
            rec_put(h, rec);
            return busy ? -EAGAIN : -ENOBUFS;
        }
        struct upipe_slot *s = upipe_ring_slot(fr, p);
        if (s->kind == UPIPE_KIND_TOMBSTONE) {
            upipe_ring_release(fr, p);
            continue;
        }
        uint32_t c = (uint32_t)(s->desc - 1);
        UPIPE_STORE_RELAXED(&chunk_hdr(h, c)->flags, 0);
        UPIPE_STORE_RELEASE(&chunk_hdr(h, c)->owner, h->tag);
        upipe_ring_release(fr, p);
        rec_put(h, rec);
        *chunk_out = c;
        return 0;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* put and get                                                                                */

static inline int bad_data_ring(upipe_handle *h, uint32_t ring)
{
    return ring >= h->hdr->ndata_rings;
}

/* A slot claimed after close() becomes a tombstone: consumers drain it, nobody gets it. */
static void write_tombstone(struct upipe_ring *r, uint64_t p)
{
    struct upipe_slot *s = upipe_ring_slot(r, p);
    UPIPE_SLOT_SET(s, desc, UPIPE_DESC_INLINE);
    s->len = 0;
    UPIPE_SLOT_SET(s, kind, UPIPE_KIND_TOMBSTONE);
    UPIPE_SLOT_SET(s, meta_len, 0);
    upipe_ring_publish(r, p);
}

int64_t upipe_put(upipe_handle *h, uint32_t ring, const char *data, uint32_t len, uint16_t kind,
                  const char *meta, uint16_t meta_len)
{
    if (bad_data_ring(h, ring) || kind == UPIPE_KIND_TOMBSTONE)
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    if ((uint64_t)len + meta_len > r->inline_max)
        return -EMSGSIZE;
    if (UPIPE_LOAD_ACQUIRE(&r->closed))
        return -EPIPE;
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, ring);
    uint64_t p;
    if (upipe_ring_claim_prod(r, 1, UPIPE_RING_BULK, rec, &p) == 0) {
        rec_put(h, rec);
        return UPIPE_LOAD_ACQUIRE(&r->closed) ? -EPIPE : -ENOBUFS;
    }
    if (UPIPE_LOAD_SEQCST(&r->closed)) { /* closed between the check and the claim */
        write_tombstone(r, p);
        rec_put(h, rec);
        ec_signal(h, &r->not_empty);
        return -EPIPE;
    }
    struct upipe_slot *s = upipe_ring_slot(r, p);
    UPIPE_SLOT_SET(s, desc, UPIPE_DESC_INLINE);
    s->len = len;
    UPIPE_SLOT_SET(s, kind, kind);
    UPIPE_SLOT_SET(s, meta_len, meta_len);
    if (meta_len)
        memcpy(s->data, meta, meta_len);
    if (len)
        memcpy(s->data + meta_len, data, len);
    upipe_ring_publish(r, p);
    rec_put(h, rec);
    ec_signal(h, &r->not_empty);
    return 0;
}

int64_t upipe_put_many(upipe_handle *h, uint32_t ring, const char *data, const uint32_t *lens,
                       uint32_t n, uint16_t kind)
{
    if (bad_data_ring(h, ring) || kind == UPIPE_KIND_TOMBSTONE)
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    for (uint32_t i = 0; i < n; i++)
        if (lens[i] > r->inline_max)
            return -EMSGSIZE;
    if (n == 0)
        return 0;
    if (UPIPE_LOAD_ACQUIRE(&r->closed))
        return -EPIPE;
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, ring);
    uint64_t p;
    uint32_t k = upipe_ring_claim_prod(r, n, UPIPE_RING_BURST, rec, &p);
    if (k == 0) {
        rec_put(h, rec);
        return UPIPE_LOAD_ACQUIRE(&r->closed) ? -EPIPE : -ENOBUFS;
    }
    int closed = UPIPE_LOAD_SEQCST(&r->closed) != 0;
    uint64_t off = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (closed) {
            write_tombstone(r, p + i);
            continue;
        }
        struct upipe_slot *s = upipe_ring_slot(r, p + i);
        UPIPE_SLOT_SET(s, desc, UPIPE_DESC_INLINE);
        s->len = lens[i];
        UPIPE_SLOT_SET(s, kind, kind);
        UPIPE_SLOT_SET(s, meta_len, 0);
        memcpy(s->data, data + off, lens[i]);
        off += lens[i];
        upipe_ring_publish(r, p + i);
    }
    rec_put(h, rec);
    ec_signal(h, &r->not_empty);
    return closed ? -EPIPE : (int64_t)k;
}

/* Fill claimed slot p with a chunk item's descriptor and meta (not stamped, not published). */
static struct upipe_slot *write_chunk_slot(struct upipe_ring *r, uint64_t p, uint32_t chunk,
                                           uint32_t len, uint16_t kind, const char *meta,
                                           uint16_t meta_len)
{
    struct upipe_slot *s = upipe_ring_slot(r, p);
    UPIPE_SLOT_SET(s, desc, (uint64_t)chunk + 1);
    s->len = len;
    UPIPE_SLOT_SET(s, kind, kind);
    UPIPE_SLOT_SET(s, meta_len, meta_len);
    if (meta_len)
        memcpy(s->data, meta, meta_len);
    return s;
}

int64_t upipe_put_chunk(upipe_handle *h, uint32_t ring, uint32_t chunk, uint32_t len,
                        uint16_t kind, const char *meta, uint16_t meta_len)
{
    if (bad_data_ring(h, ring) || kind == UPIPE_KIND_TOMBSTONE || chunk >= h->hdr->total_chunks)
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    if (meta_len > r->inline_max)
        return -EMSGSIZE;
    if ((uint64_t)len > (uint64_t)upipe_chunk_size(h, chunk))
        return -EMSGSIZE;
    struct upipe_chunk *ch = chunk_hdr(h, chunk);
    if (UPIPE_LOAD_ACQUIRE(&ch->owner) != h->tag)
        return -EPERM;
    if (UPIPE_LOAD_ACQUIRE(&ch->flags) & UPIPE_CHUNK_HELD)
        return -EBUSY; /* an unacked take's slot still names it (HELD is only ever cleared) */
    if (UPIPE_LOAD_ACQUIRE(&r->closed))
        return -EPIPE;
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, ring);
    uint64_t p;
    if (upipe_ring_claim_prod(r, 1, UPIPE_RING_BULK, rec, &p) == 0) {
        rec_put(h, rec);
        return UPIPE_LOAD_ACQUIRE(&r->closed) ? -EPIPE : -ENOBUFS;
    }
    if (UPIPE_LOAD_SEQCST(&r->closed)) {
        write_tombstone(r, p);
        rec_put(h, rec);
        ec_signal(h, &r->not_empty);
        return -EPIPE; /* the chunk stays with the caller */
    }
    struct upipe_slot *s = write_chunk_slot(r, p, chunk, len, kind, meta, meta_len);
    UPIPE_STORE_RELEASE(&s->stamp, p);                  /* R2: the put is complete */
    UPIPE_STORE_RELEASE(&ch->owner, UPIPE_OWNER_QUEUED); /* the slot holds it now */
    UPIPE_STORE_RELEASE(&s->seq, p + 1);                /* R0 */
    rec_put(h, rec);
    ec_signal(h, &r->not_empty);
    return 0;
}

/* upipe_put_shared; with a cut (tests), it stops after that step in the first ring it puts
 * into and returns 1. */
static int put_shared(upipe_handle *h, uint64_t rings, uint32_t chunk, uint32_t len, uint16_t kind,
                      const char *meta, uint16_t meta_len, uint64_t *done_out,
                      uint64_t *closed_out, int cut)
{
    *done_out = *closed_out = 0;
    uint32_t nr = h->hdr->ndata_rings;
    if (kind == UPIPE_KIND_TOMBSTONE || chunk >= h->hdr->total_chunks || rings == 0 ||
        (nr < 64 && (rings >> nr) != 0) || !h->actor)
        return -EINVAL;
    if ((uint64_t)len > (uint64_t)upipe_chunk_size(h, chunk))
        return -EMSGSIZE;
    for (uint32_t i = 0; i < nr; i++)
        if ((rings & actor_bit(i)) && meta_len > ring_at(h, i)->inline_max)
            return -EMSGSIZE;
    struct upipe_chunk *ch = chunk_hdr(h, chunk);
    uint32_t owner = UPIPE_LOAD_ACQUIRE(&ch->owner);
    if (owner == h->tag) {
        if (UPIPE_LOAD_ACQUIRE(&ch->flags) & UPIPE_CHUNK_HELD)
            return -EBUSY; /* an unacked take's slot still names it */
        share_chunk(h, chunk);
    } else if (owner != UPIPE_OWNER_SHARED ||
               !(UPIPE_LOAD_ACQUIRE(&ch->holders) & actor_bit(h->actor_index))) {
        return -EPERM;
    }
    if (UPIPE_LOAD_SEQCST(&ch->rings) & rings)
        return -EBUSY; /* already in one of these rings: one slot per ring (one bit) */
    for (uint32_t i = 0; i < nr; i++) {
        uint64_t bit = actor_bit(i);
        if (!(rings & bit))
            continue;
        struct upipe_ring *r = ring_at(h, i);
        if (UPIPE_LOAD_ACQUIRE(&r->closed)) {
            *closed_out |= bit;
            continue;
        }
        struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, i);
        uint64_t p;
        if (upipe_ring_claim_prod(r, 1, UPIPE_RING_BULK, rec, &p) == 0) {
            rec_put(h, rec);
            if (UPIPE_LOAD_ACQUIRE(&r->closed))
                *closed_out |= bit;
            continue; /* no room: the caller waits and tries this ring again */
        }
        if (cut == CUT_PUT_CLAIMED)
            return 1;
        if (UPIPE_LOAD_SEQCST(&r->closed)) {
            write_tombstone(r, p);
            rec_put(h, rec);
            ec_signal(h, &r->not_empty);
            *closed_out |= bit;
            continue;
        }
        struct upipe_slot *s = write_chunk_slot(r, p, chunk, len, kind, meta, meta_len);
        UPIPE_STORE_RELEASE(&s->stamp, p); /* R2: the put is complete */
        if (cut == CUT_PUT_STAMPED)
            return 1;
        UPIPE_FETCH_OR(&ch->rings, bit);   /* the slot's reference, before anyone can see it */
        shared_moved(ch); /* ours moves there when we let go (the caller's upipe_free) */
        if (cut == CUT_PUT_RING_BIT)
            return 1;
        UPIPE_STORE_RELEASE(&s->seq, p + 1); /* R0 */
        rec_put(h, rec);
        ec_signal(h, &r->not_empty);
        *done_out |= bit;
    }
    return 0;
}

int upipe_put_shared(upipe_handle *h, uint64_t rings, uint32_t chunk, uint32_t len,
                     uint16_t kind, const char *meta, uint16_t meta_len, uint64_t *done_out,
                     uint64_t *closed_out)
{
    return put_shared(h, rings, chunk, len, kind, meta, meta_len, done_out, closed_out, NO_CUT);
}

static void maybe_recover_busy(upipe_handle *h)
{
    int64_t now = upipe_now_ns();
    int64_t last = atomic_load_explicit(&h->last_busy_recover_ns, memory_order_relaxed);
    if (now - last < BUSY_RECOVER_NS)
        return;
    atomic_store_explicit(&h->last_busy_recover_ns, now, memory_order_relaxed);
    upipe_recover(h);
}

/*
 * Claimed-but-unreleased slots of data ring r (takes not acked yet, gets in progress) other than
 * the calling thread's own takes: items that may still come back into the ring, if their holder
 * dies or gives them back. (Another thread of this process may give its take back; the caller
 * cannot be waiting for its own.) O(capacity): only asked of a ring that is closed and empty.
 */
static int others_hold(upipe_handle *h, struct upipe_ring *r)
{
    uint64_t t = UPIPE_LOAD_SEQCST(&r->tail);
    uint64_t held = 0;
    for (uint64_t i = 0; i < r->capacity; i++) {
        uint64_t pos = UPIPE_LOAD_SEQCST(&upipe_ring_slot(r, i)->seq) - 1;
        if ((pos & r->mask) == i && (int64_t)(pos - t) < 0)
            held++; /* published at pos, and pos is behind tail: claimed, not released */
    }
    if (held == 0 || !h->actor)
        return held != 0;
    uintptr_t me = this_thread();
    for (uint32_t j = 0; j < UPIPE_RECS_PER_ACTOR && held; j++) {
        if (UPIPE_LOAD_ACQUIRE(&h->hold_tok[j]) == 0 ||
            UPIPE_LOAD_RELAXED(&h->hold_thread[j]) != me)
            continue;
        struct upipe_rec *rec = &h->actor->recs[j];
        uint64_t q = UPIPE_LOAD_RELAXED(&rec->pos);
        if (UPIPE_LOAD_RELAXED(&rec->ring) == r->index &&
            UPIPE_LOAD_SEQCST(&upipe_ring_slot(r, q)->seq) == q + 1)
            held--; /* this thread's own: it comes back only if we give it back */
    }
    return held != 0;
}

/*
 * Result for an empty claim: a producer mid-write, plain empty, or closed and empty, which is
 * "drained for good" (-EPIPE) only if no item can still come back: no other consumer holds an
 * unacked take, and none came back while we looked. mark is r->redelivered read (with closed)
 * before the claim; D0: every move bumps it before it releases the item's old slot (or, in
 * place, publishes it), so a scan that saw the slot change also sees the new count.
 */
static int64_t empty_result(upipe_handle *h, struct upipe_ring *r, int closed_before, int busy,
                            uint64_t mark)
{
    if (busy) {
        maybe_recover_busy(h); /* a writer that has been mid-write this long may be dead */
        return -EAGAIN;
    }
    if (!closed_before)
        return -ENOENT;
    if (others_hold(h, r)) {
        maybe_recover_busy(h); /* a holder may be dead: its items come back through recovery */
        return -EAGAIN;
    }
    if (UPIPE_LOAD_SEQCST(&r->redelivered) != mark)
        return -EAGAIN; /* an item came back meanwhile: look again */
    return -EPIPE;
}

/* Copy a claimed slot's item out to a consumer: an inline item (meta, then payload) into out;
 * for a chunk item its meta, and the chunk becomes this process's (flags, then owner: the
 * owner store, a release, comes before the caller lets the slot go). Returns the encoded
 * kind << 48 | meta_len << 32 | len that upipe_get and upipe_take return. */
static int64_t copy_out(upipe_handle *h, const struct upipe_slot *s, char *out,
                        uint32_t *chunk_out, uint32_t chunk_flags, int *shared)
{
    uint32_t len = s->len, meta_len = s->meta_len;
    uint16_t kind = s->kind;
    uint64_t desc = s->desc;
    if (desc == UPIPE_DESC_INLINE) {
        memcpy(out, s->data, (size_t)meta_len + len);
        *chunk_out = UINT32_MAX;
    } else {
        uint32_t c = (uint32_t)(desc - 1);
        if (meta_len)
            memcpy(out, s->data, meta_len);
        struct upipe_chunk *ch = chunk_hdr(h, c);
        if (UPIPE_LOAD_ACQUIRE(&ch->owner) == UPIPE_OWNER_SHARED) {
            /* One more holder; the slot keeps its reference until released (get) or acked.
             * Locked: an ack in another thread must not be using the bit as its own
             * temporary reference, which it would then drop (ack_shared). */
            bits_lock(h);
            shared_ref_locked(h, c);
            bits_unlock(h);
            shared_moved(ch); /* the ring's reference moves to us (cleared by get or ack) */
            *shared = 1;
        } else {
            UPIPE_STORE_RELAXED(&ch->flags, chunk_flags);
            UPIPE_STORE_RELEASE(&ch->owner, h->tag);
        }
        *chunk_out = c;
    }
    return (int64_t)(((uint64_t)kind << 48) | ((uint64_t)meta_len << 32) | len);
}

int64_t upipe_get(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                  uint32_t *chunk_out)
{
    if (bad_data_ring(h, ring))
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    if (outcap < r->inline_max)
        return -EINVAL;
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_TAKE, ring);
    for (;;) {
        /* closed is read before the claim: closed and then empty means drained for good, as
         * every put re-checks closed after its claim (tombstoning a late one), unless a held
         * item comes back (empty_result). */
        int closed = UPIPE_LOAD_SEQCST(&r->closed) != 0;
        uint64_t mark = closed ? UPIPE_LOAD_SEQCST(&r->redelivered) : 0;
        uint64_t p;
        int busy;
        if (upipe_ring_claim_cons(r, 1, UPIPE_RING_BULK, rec, &p, &busy) == 0) {
            rec_put(h, rec);
            return empty_result(h, r, closed, busy, mark);
        }
        struct upipe_slot *s = upipe_ring_slot(r, p);
        if (s->kind == UPIPE_KIND_TOMBSTONE) {
            upipe_ring_release(r, p);
            UPIPE_FETCH_ADD_RELAXED(&r->tombstones_skipped, 1);
            released_signal(h, r);
            continue;
        }
        int shared = 0;
        int64_t item = copy_out(h, s, out, chunk_out, UPIPE_CHUNK_RECEIVED, &shared);
        if (shared) /* the ring's reference goes before its slot does */
            UPIPE_FETCH_AND(&chunk_hdr(h, *chunk_out)->rings, ~actor_bit(ring));
        upipe_ring_release(r, p);
        rec_put(h, rec);
        released_signal(h, r);
        return item;
    }
}

int64_t upipe_put_bytes(upipe_handle *h, uint32_t ring, const char *data, uint32_t len)
{
    return upipe_put(h, ring, data, len, UPIPE_KIND_BYTES, NULL, 0);
}

int64_t upipe_get_bytes(upipe_handle *h, uint32_t ring, uint32_t outcap, char *out)
{
    uint32_t end;
    int64_t rc = upipe_get_many(h, ring, UPIPE_KIND_BYTES, out, outcap, &end, 1);
    return rc == 1 ? (int64_t)end : rc;
}

uint32_t upipe_uniform_length(const uint32_t *ends, uint32_t n)
{
    if (n == 0)
        return 0;
    uint32_t len = ends[0];
    for (uint32_t i = 1; i < n; i++)
        if (ends[i] - ends[i - 1] != len)
            return UINT32_MAX;
    return len;
}

int64_t upipe_get_into(struct upipe_getbuf *b)
{
    return upipe_get_bytes(b->h, b->ring, b->cap, b->data);
}

int64_t upipe_take_into(struct upipe_takebuf *b)
{
    return upipe_take(b->h, b->ring, b->data, b->cap, &b->chunk, &b->receipt);
}

int64_t upipe_take_next(struct upipe_takebuf *b)
{
    if (b->held) {
        int rc = upipe_ack(b->h, b->held);
        b->held = 0;
        if (rc < 0 && rc != -ESTALE) /* -ESTALE: recovery moved it away; it comes again */
            return -ENOTRECOVERABLE;
    }
    int64_t rc = upipe_take(b->h, b->ring, b->data, b->cap, &b->chunk, &b->receipt);
    if (rc < 0)
        return rc;
    b->held = b->receipt;
    if (b->chunk == UINT32_MAX && (uint64_t)rc >> 32 == (uint64_t)UPIPE_KIND_BYTES << 16)
        return rc & 0xFFFFFFFF; /* plain bytes, no meta: the common case */
    b->item = rc;
    return -EBADMSG;
}

int64_t upipe_get_many(upipe_handle *h, uint32_t ring, uint16_t kind, char *out,
                       uint64_t outcap, uint32_t *ends, uint32_t maxn)
{
    if (bad_data_ring(h, ring) || maxn == 0)
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    uint64_t fit = outcap / r->inline_max;
    if (fit == 0)
        return -EINVAL;
    if (maxn > fit)
        maxn = (uint32_t)fit;
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_TAKE, ring);
    for (;;) {
        int closed = UPIPE_LOAD_SEQCST(&r->closed) != 0;
        uint64_t mark = closed ? UPIPE_LOAD_SEQCST(&r->redelivered) : 0;
        /* Count the run of published plain items of this kind (A0 on each seq), then claim it. */
        uint64_t t = UPIPE_LOAD_RELAXED(&r->tail);
        uint32_t k = 0;
        int stale = 0, other = 0;
        while (k < maxn) {
            struct upipe_slot *s = upipe_ring_slot(r, t + k);
            uint64_t seq = UPIPE_LOAD_ACQUIRE(&s->seq); /* A0 */
            int64_t dif = (int64_t)(seq - (t + k + 1));
            if (dif > 0) {
                stale = 1;
                break;
            }
            if (dif < 0)
                break;
            uint64_t desc = UPIPE_SLOT_PEEK(s, desc);
            uint16_t skind = UPIPE_SLOT_PEEK(s, kind);
            if (desc != UPIPE_DESC_INLINE || UPIPE_SLOT_PEEK(s, meta_len) != 0 ||
                (skind != kind && skind != UPIPE_KIND_TOMBSTONE)) {
                other = 1;
                break;
            }
            k++;
        }
        if (stale || (k == 0 && !other && UPIPE_LOAD_RELAXED(&r->tail) != t))
            continue;
        if (k == 0) {
            rec_put(h, rec);
            if (other)
                return -EBADMSG;
            int busy = UPIPE_LOAD_ACQUIRE(&r->head) > t;
            return empty_result(h, r, closed, busy, mark);
        }
        UPIPE_STORE_RELAXED(&rec->pos, t);
        UPIPE_STORE_RELAXED(&rec->n, k);
        if (!UPIPE_CAS(&r->tail, &t, t + k))
            continue;
        uint64_t off = 0;
        uint32_t got = 0;
        for (uint32_t i = 0; i < k; i++) {
            struct upipe_slot *s = upipe_ring_slot(r, t + i);
            if (s->kind == UPIPE_KIND_TOMBSTONE) {
                UPIPE_FETCH_ADD_RELAXED(&r->tombstones_skipped, 1);
            } else {
                memcpy(out + off, s->data, s->len);
                off += s->len;
                ends[got++] = (uint32_t)off;
            }
            upipe_ring_release(r, t + i);
        }
        rec_put(h, rec);
        released_signal(h, r);
        if (got)
            return got;
        rec = rec_get(h, UPIPE_OP_TAKE, ring); /* a run of tombstones only: look again */
    }
}

/* ------------------------------------------------------------------------------------------ */
/* take, ack, and moving a held item back into its ring                                       */

int64_t upipe_take(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                   uint32_t *chunk_out, uint64_t *receipt_out)
{
    if (bad_data_ring(h, ring))
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    if (outcap < r->inline_max)
        return -EINVAL;
    if (atomic_fetch_add_explicit(&h->nholds, 1, memory_order_relaxed) >= UPIPE_MAX_HOLDS) {
        atomic_fetch_sub_explicit(&h->nholds, 1, memory_order_relaxed);
        return -EDQUOT;
    }
    /* HOLD from the start: once the claim succeeds, a death at any later instruction leaves a
     * journal entry that makes recovery redeliver the item (never count it lost). */
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_HOLD, ring);
    for (;;) {
        int closed = UPIPE_LOAD_SEQCST(&r->closed) != 0;
        uint64_t mark = closed ? UPIPE_LOAD_SEQCST(&r->redelivered) : 0;
        uint64_t p;
        int busy;
        if (upipe_ring_claim_cons(r, 1, UPIPE_RING_BULK, rec, &p, &busy) == 0) {
            rec_put(h, rec);
            atomic_fetch_sub_explicit(&h->nholds, 1, memory_order_relaxed);
            return empty_result(h, r, closed, busy, mark);
        }
        struct upipe_slot *s = upipe_ring_slot(r, p);
        if (s->kind == UPIPE_KIND_TOMBSTONE) {
            upipe_ring_release(r, p);
            UPIPE_FETCH_ADD_RELAXED(&r->tombstones_skipped, 1);
            released_signal(h, r);
            continue;
        }
        /* The slot keeps naming a chunk until the ack: HELD keeps it out of free/put. */
        int shared = 0;
        int64_t item =
            copy_out(h, s, out, chunk_out, UPIPE_CHUNK_RECEIVED | UPIPE_CHUNK_HELD, &shared);
        /* No release, no rec_put: the slot and the journal entry stay ours until the ack. */
        uint32_t idx = (uint32_t)(rec - h->actor->recs);
        uint64_t serial = atomic_fetch_add_explicit(&h->hold_serial, 1, memory_order_relaxed) + 1;
        uint64_t receipt = (serial << 6) | idx;
        UPIPE_STORE_RELAXED(&h->hold_thread[idx], this_thread());
        UPIPE_STORE_RELEASE(&h->hold_tok[idx], receipt);
        *receipt_out = receipt;
        return item;
    }
}

/* Claim the hold a receipt names (one thread wins); its journal entry, or NULL. */
static struct upipe_rec *hold_claim(upipe_handle *h, uint64_t receipt)
{
    uint32_t idx = (uint32_t)(receipt & (UPIPE_RECS_PER_ACTOR - 1));
    uint64_t expected = receipt;
    if (receipt == 0 || !h->actor ||
        !atomic_compare_exchange_strong_explicit(&h->hold_tok[idx], &expected, 0,
                                                 memory_order_acq_rel, memory_order_relaxed))
        return NULL;
    return &h->actor->recs[idx];
}

static void hold_done(upipe_handle *h, struct upipe_rec *rec)
{
    rec_put(h, rec);
    atomic_fetch_sub_explicit(&h->nholds, 1, memory_order_relaxed);
}

/*
 * The ack of a take whose chunk is shared: the slot's reference to the chunk goes (its ring's
 * bit), then the slot. Journaled as ACK first, so a death in between is finished by recovery,
 * never undone (undoing would redeliver an item whose ring bit is gone). Our own holder bit
 * is set for the duration (we may have dropped our views already), so the chunk cannot be
 * freed and reused under a recovery that finishes this ack.
 *
 * The bit is the whole process's, so the window from "had" to dropping the temporary bit is
 * under bits_lock: unlocked, (1) another thread's get of this chunk from another ring could
 * find our temporary bit set, take it as its reference, and lose it when we drop it (the chunk
 * then freed under that thread); (2) another thread could drop the process's last reference
 * between our "had" and our ring-bit clear: its look would see our ring's bit, we would not
 * look (we had a bit), and nobody would ever free the chunk.
 */
#define ACK_CUT 1 /* ack(), ack_shared(): stopped at the cut (tests) */
static int ack_shared(upipe_handle *h, struct upipe_rec *rec, struct upipe_ring *r, uint64_t q,
                      uint32_t c, int cut)
{
    struct upipe_chunk *ch = chunk_hdr(h, c);
    struct upipe_slot *s = upipe_ring_slot(r, q);
    uint64_t me = actor_bit(h->actor_index);
    if (UPIPE_LOAD_SEQCST(&s->seq) != q + 1) {
        hold_done(h, rec); /* moved away by a recovery that judged us dead */
        return -ESTALE;
    }
    UPIPE_STORE_SEQCST(&rec->op, UPIPE_OP_ACK);
    int ok = 0;
    bits_lock(h);
    uint64_t had = UPIPE_FETCH_OR(&ch->holders, me) & me;
    shared_moved(ch); /* the ring's reference moves to our bit */
    if (cut == CUT_ACK_JOURNALED)
        goto cut;
    UPIPE_FETCH_AND(&ch->rings, ~actor_bit(r->index));
    if (cut == CUT_ACK_RING_BIT)
        goto cut;
    uint64_t held = q + 1;
    ok = UPIPE_CAS(&s->seq, &held, q + r->capacity); /* R1 */
    if (cut == CUT_ACK_RELEASED)
        goto cut;
    if (!had)
        UPIPE_FETCH_AND(&ch->holders, ~me);
    bits_unlock(h);
    if (!had)
        shared_maybe_free(h, c, NO_CUT); /* we cleared a bit: we look */
    hold_done(h, rec);
    released_signal(h, r);
    return ok ? 0 : -ESTALE;
cut:
    bits_unlock(h);
    return ACK_CUT;
}

/* upipe_ack; a cut (tests) stops an ack of a shared chunk after that step (ACK_CUT). */
static int ack(upipe_handle *h, uint64_t receipt, int cut)
{
    struct upipe_rec *rec = hold_claim(h, receipt);
    if (!rec)
        return -ENOENT;
    uint32_t ri = UPIPE_LOAD_RELAXED(&rec->ring);
    uint64_t q = UPIPE_LOAD_RELAXED(&rec->pos);
    struct upipe_ring *r = ring_at(h, ri);
    struct upipe_slot *s = upipe_ring_slot(r, q);
    uint64_t desc = UPIPE_SLOT_PEEK(s, desc); /* read before the slot is let go */
    uint64_t held = q + 1;
    if (desc != UPIPE_DESC_INLINE && desc - 1 < h->hdr->total_chunks &&
        UPIPE_LOAD_ACQUIRE(&chunk_hdr(h, (uint32_t)(desc - 1))->owner) == UPIPE_OWNER_SHARED)
        return ack_shared(h, rec, r, q, (uint32_t)(desc - 1), cut);
    /* R1, as a CAS: should recovery ever have moved the item away (it judged us dead), the
     * slot is not ours to release any more. */
    int ok = UPIPE_CAS(&s->seq, &held, q + r->capacity);
    if (ok && desc != UPIPE_DESC_INLINE && desc - 1 < h->hdr->total_chunks) {
        uint32_t c = (uint32_t)(desc - 1);
        struct upipe_chunk *ch = chunk_hdr(h, c);
        if (UPIPE_LOAD_ACQUIRE(&ch->owner) == h->tag) {
            /* Ours alone from now on. Acked, so no longer an item a death would lose. */
            uint32_t old = atomic_fetch_and_explicit(
                &ch->flags, ~(UPIPE_CHUNK_HELD | UPIPE_CHUNK_RECEIVED), memory_order_acq_rel);
            if (old & UPIPE_CHUNK_DROPPED)
                free_chunk_from(h, c, h->tag); /* its views were dropped before the ack */
        }
    }
    hold_done(h, rec);
    released_signal(h, r);
    return ok ? 0 : -ESTALE;
}

int upipe_ack(upipe_handle *h, uint64_t receipt)
{
    return ack(h, receipt, NO_CUT);
}

/*
 * Moving a held item (position q, claimed, never released) back into its ring, for another
 * consumer: recovery does it for a dead taker, give_back() for a live one (nack, detach). The
 * caller makes sure nobody else touches q meanwhile: its taker is dead (and recovery is
 * serialized by the recovery lock), or is the caller.
 *
 * Fast path: claim a fresh position p at head, like a put (journal REDELIVER, pos p, src q),
 * copy the slot (header, meta, inline payload or chunk descriptor), stamp p (R2: the commit
 * point), publish p (R0), then release q (R1). Steps, for the cut points of the crash tests:
 *   0 claimed    1 marked (src |= CLAIMED)    2 copied    3 stamped    4 published
 * After a death at any step, recovery (repair_redeliver, pass 1, before any HOLD is looked at)
 * either finishes the move (p stamped by us: publish p, release q) or undoes it (tombstone p;
 * q stays held and is moved again by pass 2): the item is in the ring exactly once.
 *
 * No free position because the producers' next position IS the held slot (the ring wrapped
 * round to it; head == q + capacity): waiting for room would wait forever, and releasing q
 * first would leave the item nowhere. So the held slot becomes position q + capacity in place:
 * CAS head q + capacity -> + 1 (nobody else can: claim_prod needs seq == head there, and it
 * is q + 1), stamp, publish. Steps: 0 journaled, 1 head claimed, 2 stamped, 3 published.
 *
 * Otherwise the ring is full of other items: MOVE_NO_ROOM, the item stays held and is moved
 * later (recovery retries every 100 ms slice, and a producer that waits on this ring runs it).
 */
enum { MOVE_DONE = 0, MOVE_NO_ROOM = 1, MOVE_CUT = 2 };
/* Tests only (upipe_debug_abandon): stop after step k, leaving everything as a SIGKILL would. */
#define CUT(k)                                                                                     \
    do {                                                                                           \
        if (cut == (k))                                                                            \
            return MOVE_CUT;                                                                       \
    } while (0)

/* A slot now holds the chunk its descriptor names (it is about to be published). */
static void chunk_requeue(upipe_handle *h, struct upipe_slot *s)
{
    uint64_t desc = UPIPE_SLOT_PEEK(s, desc);
    if (desc == UPIPE_DESC_INLINE || UPIPE_SLOT_PEEK(s, kind) == UPIPE_KIND_TOMBSTONE ||
        desc - 1 >= h->hdr->total_chunks)
        return;
    struct upipe_chunk *ch = chunk_hdr(h, (uint32_t)(desc - 1));
    if (UPIPE_LOAD_ACQUIRE(&ch->owner) == UPIPE_OWNER_SHARED)
        return; /* the ring's bit moves with the slot; its holders keep theirs */
    UPIPE_STORE_RELAXED(&ch->flags, 0);
    UPIPE_STORE_RELEASE(&ch->owner, UPIPE_OWNER_QUEUED);
}

static void copy_slot(struct upipe_ring *r, struct upipe_slot *dst, struct upipe_slot *src)
{
    uint64_t desc = UPIPE_SLOT_PEEK(src, desc);
    uint16_t meta_len = UPIPE_SLOT_PEEK(src, meta_len);
    uint32_t len = src->len;
    UPIPE_SLOT_SET(dst, desc, desc);
    dst->len = len;
    UPIPE_SLOT_SET(dst, kind, UPIPE_SLOT_PEEK(src, kind));
    UPIPE_SLOT_SET(dst, meta_len, meta_len);
    uint64_t n = (uint64_t)meta_len + (desc == UPIPE_DESC_INLINE ? len : 0);
    memcpy(dst->data, src->data, n < r->inline_max ? n : r->inline_max);
}

/* Let go of the moved item's old slot, if it still holds it. */
static void move_release_old(upipe_handle *h, struct upipe_ring *r, uint64_t q)
{
    struct upipe_slot *old = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&old->seq) != q + 1)
        return;
    UPIPE_FETCH_ADD(&r->redelivered, 1);             /* D0: before the old slot goes */
    UPIPE_STORE_RELEASE(&old->seq, q + r->capacity); /* R1 */
    released_signal(h, r);
}

/* Fast path, from "p stamped" on. */
static int move_finish(upipe_handle *h, struct upipe_ring *r, uint64_t p, uint64_t q, int cut)
{
    struct upipe_slot *s = upipe_ring_slot(r, p);
    chunk_requeue(h, s);
    UPIPE_STORE_RELEASE(&s->seq, p + 1); /* R0 */
    ec_signal(h, &r->not_empty);
    CUT(4);
    move_release_old(h, r, q);
    return MOVE_DONE;
}

/* In place, from "head claimed" on: the held slot of q is published as position q + capacity. */
static int move_in_place(upipe_handle *h, struct upipe_ring *r, uint64_t q, int cut)
{
    uint64_t p = q + r->capacity;
    struct upipe_slot *s = upipe_ring_slot(r, q);
    UPIPE_STORE_RELEASE(&s->stamp, p); /* R2 */
    CUT(2);
    chunk_requeue(h, s);
    UPIPE_FETCH_ADD(&r->redelivered, 1); /* D0: before the publish */
    UPIPE_STORE_RELEASE(&s->seq, p + 1); /* R0 */
    ec_signal(h, &r->not_empty);
    ec_signal(h, &r->not_full); /* head moved on: the next position may be free */
    CUT(3);
    return MOVE_DONE;
}

static int redeliver(upipe_handle *h, uint32_t ri, uint64_t q, int cut)
{
    struct upipe_ring *r = ring_at(h, ri);
    struct upipe_slot *held = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&held->seq) != q + 1)
        return MOVE_DONE; /* not held any more: nothing to move */
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_REDELIVER, ri);
    UPIPE_STORE_RELAXED(&rec->src, q); /* with pos, published by the claiming CAS (seq_cst) */
    uint64_t p;
    if (upipe_ring_claim_prod(r, 1, UPIPE_RING_BULK, rec, &p) == 1) {
        CUT(0);
        UPIPE_STORE_RELAXED(&rec->src, q | UPIPE_SRC_CLAIMED); /* pos is really ours now */
        CUT(1);
        struct upipe_slot *s = upipe_ring_slot(r, p);
        copy_slot(r, s, held);
        CUT(2);
        UPIPE_STORE_RELEASE(&s->stamp, p); /* R2: the copy is complete (commit point) */
        CUT(3);
        if (move_finish(h, r, p, q, cut) == MOVE_CUT)
            return MOVE_CUT;
        rec_put(h, rec);
        return MOVE_DONE;
    }
    uint64_t hd = UPIPE_LOAD_SEQCST(&r->head);
    if (hd != q + r->capacity ||
        (int64_t)(hd - UPIPE_LOAD_SEQCST(&r->tail)) >= (int64_t)r->limit) {
        rec_put(h, rec);
        return MOVE_NO_ROOM; /* full of other items (or at maxsize): later */
    }
    UPIPE_STORE_RELAXED(&rec->pos, hd);
    UPIPE_STORE_RELAXED(&rec->n, 1);
    CUT(0);
    if (!UPIPE_CAS(&r->head, &hd, hd + 1)) { /* claim: the journal is published with it */
        rec_put(h, rec);
        return MOVE_NO_ROOM; /* (cannot happen, see above; never spin here) */
    }
    CUT(1);
    if (move_in_place(h, r, q, cut) == MOVE_CUT)
        return MOVE_CUT;
    rec_put(h, rec);
    return MOVE_DONE;
}

/* Give one of our takes back: 0 moved; -ENOBUFS no room yet (still held); -ENOENT; 1 cut (tests). */
static int give_back(upipe_handle *h, uint64_t receipt, int cut)
{
    struct upipe_rec *rec = hold_claim(h, receipt);
    if (!rec)
        return -ENOENT;
    int rc = redeliver(h, UPIPE_LOAD_RELAXED(&rec->ring), UPIPE_LOAD_RELAXED(&rec->pos), cut);
    if (rc == MOVE_NO_ROOM) {
        UPIPE_STORE_RELEASE(&h->hold_tok[rec - h->actor->recs], receipt); /* held, as before */
        return -ENOBUFS;
    }
    if (rc == MOVE_CUT)
        return 1; /* the caller dies now, with its journal as it is */
    hold_done(h, rec);
    return 0;
}

int upipe_nack(upipe_handle *h, uint64_t receipt)
{
    return give_back(h, receipt, NO_CUT);
}

/* Detach and exit: give every take back. Returns how many are still held (no room yet). */
static int give_back_all(upipe_handle *h)
{
    int pending = 0;
    for (uint32_t i = 0; i < UPIPE_RECS_PER_ACTOR; i++) {
        uint64_t receipt = UPIPE_LOAD_ACQUIRE(&h->hold_tok[i]);
        if (receipt && give_back(h, receipt, NO_CUT) == -ENOBUFS)
            pending++;
    }
    return pending;
}

/* ------------------------------------------------------------------------------------------ */
/* waiting                                                                                    */

static int resolve_wait(upipe_handle *h, uint32_t ring, int what, struct upipe_ring **r,
                        struct upipe_ec **ec)
{
    if (what == UPIPE_WAIT_CHUNK) {
        if (ring >= h->hdr->nclasses)
            return -EINVAL;
        *r = ring_at(h, h->hdr->classes[ring].free_ring);
        *ec = &(*r)->not_empty;
        return 0;
    }
    if (bad_data_ring(h, ring) || (what != UPIPE_WAIT_READABLE && what != UPIPE_WAIT_WRITABLE))
        return -EINVAL;
    *r = ring_at(h, ring);
    *ec = what == UPIPE_WAIT_WRITABLE ? &(*r)->not_full : &(*r)->not_empty;
    return 0;
}

static int cond_ready(upipe_handle *h, struct upipe_ring *r, int what)
{
    if (what == UPIPE_WAIT_WRITABLE)
        return upipe_ring_writable(r);
    if (upipe_ring_published(r))
        return 1;
    /* Closed and empty wakes consumers to see the end, once no held item can come back. */
    return UPIPE_LOAD_SEQCST(&r->closed) && !others_hold(h, r);
}

int upipe_ready(upipe_handle *h, uint32_t ring, int what)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    int rc = resolve_wait(h, ring, what, &r, &ec);
    return rc < 0 ? rc : cond_ready(h, r, what);
}

int upipe_wait(upipe_handle *h, uint32_t ring, int what, int64_t deadline_ns)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    int rc = resolve_wait(h, ring, what, &r, &ec);
    if (rc < 0)
        return rc;
    /* Spin first: a busy peer usually answers within microseconds, and a futex round trip
     * costs more than that. Plain loads only; the clock is read every 64 turns. */
    if (h->spin_ns > 0) {
        int64_t spin_end = upipe_now_ns() + h->spin_ns;
        for (uint32_t i = 1;; i++) {
            if (cond_ready(h, r, what))
                return 0;
            UPIPE_CPU_RELAX();
            if ((i & 63) == 0 && upipe_now_ns() >= spin_end)
                break;
        }
    }
    for (;;) {
        uint32_t seq = UPIPE_LOAD_SEQCST(&ec->seq);
        UPIPE_FETCH_ADD(&ec->sync_waiters, 1); /* F0, waiter side: register, arm, re-check */
        UPIPE_STORE_SEQCST(&ec->sync_armed, 1);
        if (cond_ready(h, r, what)) {
            UPIPE_FETCH_SUB(&ec->sync_waiters, 1);
            return 0;
        }
        int64_t now = upipe_now_ns();
        if (deadline_ns >= 0 && now >= deadline_ns) {
            UPIPE_FETCH_SUB(&ec->sync_waiters, 1);
            return -ETIMEDOUT;
        }
        int64_t slice = now + RECOVERY_SLICE_NS;
        int64_t until = (deadline_ns >= 0 && deadline_ns < slice) ? deadline_ns : slice;
        rc = upipe_futex_wait(&ec->seq, seq, until);
        UPIPE_FETCH_SUB(&ec->sync_waiters, 1);
        if (rc == -EINTR)
            return -EINTR; /* let the caller run its signal handlers (Ctrl-C) */
        if (rc == -ETIMEDOUT) {
            if (deadline_ns >= 0 && upipe_now_ns() >= deadline_ns) {
                /* We may have been the one woken for an item we now walk away from: pass it on. */
                if (cond_ready(h, r, what) && UPIPE_LOAD_SEQCST(&ec->sync_waiters)) {
                    UPIPE_FETCH_ADD(&ec->seq, 1);
                    upipe_futex_wake(&ec->seq, 1);
                }
                return -ETIMEDOUT;
            }
            upipe_recover(h); /* a slice went by with nothing: is a peer dead mid-operation? */
        }
        return 0;
    }
}

int upipe_spin(upipe_handle *h, uint32_t ring, int what, int64_t spin_ns)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    int rc = resolve_wait(h, ring, what, &r, &ec);
    if (rc < 0)
        return rc;
    int64_t spin_end = upipe_now_ns() + spin_ns;
    for (uint32_t i = 1;; i++) {
        if (cond_ready(h, r, what))
            return 1;
        UPIPE_CPU_RELAX();
        if ((i & 63) == 0 && upipe_now_ns() >= spin_end)
            return 0;
    }
}

int upipe_async_waiter(upipe_handle *h, uint32_t ring, int what, int delta)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    int rc = resolve_wait(h, ring, what, &r, &ec);
    if (rc < 0)
        return rc;
    if (delta > 0) {
        UPIPE_FETCH_ADD(&ec->async_waiters, 1); /* F0, waiter side */
        UPIPE_STORE_SEQCST(&ec->async_armed, 1);
        return cond_ready(h, r, what);
    }
    if (delta == 0) { /* re-arm: a dispatcher drained the eventfd and waiters remain */
        UPIPE_STORE_SEQCST(&ec->async_armed, 1);
        return cond_ready(h, r, what);
    }
    UPIPE_FETCH_SUB(&ec->async_waiters, 1);
    return 0;
}

uint32_t upipe_async_waiters(upipe_handle *h, uint32_t ring, int what)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    if (resolve_wait(h, ring, what, &r, &ec) < 0)
        return 0;
    return UPIPE_LOAD_SEQCST(&ec->async_waiters);
}

void upipe_async_kick(upipe_handle *h, uint32_t ring, int what)
{
    struct upipe_ring *r;
    struct upipe_ec *ec;
    if (resolve_wait(h, ring, what, &r, &ec) < 0)
        return;
    uint64_t one = 1;
    ssize_t w = write(h->fds[1 + ec->efd_index], &one, sizeof one);
    (void)w;
}

int upipe_is_closed(upipe_handle *h, uint32_t ring)
{
    if (bad_data_ring(h, ring))
        return -EINVAL;
    return UPIPE_LOAD_ACQUIRE(&ring_at(h, ring)->closed) != 0;
}

int upipe_close(upipe_handle *h, uint32_t ring)
{
    if (bad_data_ring(h, ring))
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    UPIPE_STORE_SEQCST(&r->closed, 1);
    /* Everyone wakes: consumers to drain and see the end, producers to see Closed. */
    for (int i = 0; i < 2; i++) {
        struct upipe_ec *ec = i ? &r->not_full : &r->not_empty;
        UPIPE_FETCH_ADD(&ec->seq, 1);
        upipe_futex_wake(&ec->seq, INT_MAX);
        uint64_t one = 1;
        ssize_t w = write(h->fds[1 + ec->efd_index], &one, sizeof one);
        (void)w;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* white-box test hook                                                                        */

/* The lowest-numbered chunk this process holds (shared ones only: shared_only), or -ENOENT. */
static int64_t first_held(upipe_handle *h, int shared_only)
{
    for (uint32_t c = 0; c < h->hdr->total_chunks; c++)
        if (upipe_chunk_held(h, c) && (!shared_only || upipe_chunk_shared(h, c)))
            return c;
    return -ENOENT;
}

/* upipe_debug_abandon, what >= 16: the shared-chunk paths (see upipe.h). */
static int abandon_shared(upipe_handle *h, uint32_t ring, int what)
{
    struct upipe_ring *r = ring_at(h, ring);
    if (what < 19) { /* put_shared into this ring, cut */
        int64_t c = first_held(h, 0);
        if (c < 0)
            return (int)c;
        uint64_t done, closed;
        uint32_t len = (uint32_t)upipe_chunk_size(h, (uint32_t)c);
        int rc = put_shared(h, 1ULL << ring, (uint32_t)c, len, UPIPE_KIND_BYTES, NULL, 0, &done,
                            &closed, what - 16);
        return rc == 1 ? 0 : rc < 0 ? rc : -ENOBUFS; /* no room (or closed): nothing claimed */
    }
    if (what >= 25 && what < 28) { /* upipe_free, cut */
        int64_t c = first_held(h, 1);
        if (c < 0)
            return (int)c;
        int rc = shared_drop_own(h, (uint32_t)c, what - 25);
        return rc == 0 && what > 25 ? -ERANGE : rc < 0 ? rc : 0; /* ERANGE: not the last */
    }
    char *buf = malloc(r->inline_max);
    if (!buf)
        return -ENOMEM;
    uint32_t c = UINT32_MAX;
    if (what >= 28) { /* a get, cut */
        struct upipe_rec *rec = rec_get(h, UPIPE_OP_TAKE, ring);
        uint64_t p;
        int busy, shared = 0;
        if (!upipe_ring_claim_cons(r, 1, UPIPE_RING_BULK, rec, &p, &busy)) {
            free(buf);
            rec_put(h, rec);
            return -ENOENT;
        }
        copy_out(h, upipe_ring_slot(r, p), buf, &c, UPIPE_CHUNK_RECEIVED, &shared);
        free(buf);
        if (!shared)
            return -EBADMSG; /* the slot stays claimed: the caller dies anyway */
        if (what == 29)
            UPIPE_FETCH_AND(&chunk_hdr(h, c)->rings, ~actor_bit(ring));
        return 0;
    }
    /* take, (upipe_free,) ack cut */
    uint64_t receipt;
    int64_t rc = upipe_take(h, ring, buf, r->inline_max, &c, &receipt);
    free(buf);
    if (rc < 0)
        return (int)rc;
    if (c == UINT32_MAX || !upipe_chunk_shared(h, c))
        return -EBADMSG;
    if (what < 22 && upipe_free(h, c) != 0)
        return -EPERM;
    return ack(h, receipt, (what - 19) % 3) == ACK_CUT ? 0 : -ERANGE;
}

int upipe_debug_abandon(upipe_handle *h, uint32_t ring, int what)
{
    /* Leave ring 'ring' the way a process killed at one instruction would, then return; the
     * caller SIGKILLs itself. what: 0 = put claimed, nothing written; 1 = put written and
     * stamped, not published; 2 = get claimed, not released; 3 = take held, never acked;
     * 4 + k = take, then give it back but stop after step k of the move (redeliver()); 16 on:
     * the shared-chunk paths (abandon_shared, upipe.h lists them). The journal entries stay
     * busy. */
    if (bad_data_ring(h, ring) || what < 0 || (what > 4 + 4 && what < 16) || what > 29)
        return -EINVAL;
    if (what >= 16)
        return abandon_shared(h, ring, what);
    struct upipe_ring *r = ring_at(h, ring);
    uint64_t p;
    int busy;
    if (what >= 3) {
        char *buf = malloc(r->inline_max);
        if (!buf)
            return -ENOMEM;
        uint32_t chunk;
        uint64_t receipt;
        int64_t rc = upipe_take(h, ring, buf, r->inline_max, &chunk, &receipt);
        free(buf);
        if (rc < 0)
            return (int)rc;
        if (what == 3)
            return 0;
        return give_back(h, receipt, what - 4) == 1 ? 0 : -ERANGE;
    }
    if (what == 2) {
        struct upipe_rec *rec = rec_get(h, UPIPE_OP_TAKE, ring);
        return upipe_ring_claim_cons(r, 1, UPIPE_RING_BULK, rec, &p, &busy) ? 0 : -ENOENT;
    }
    struct upipe_rec *rec = rec_get(h, UPIPE_OP_PUT, ring);
    if (!upipe_ring_claim_prod(r, 1, UPIPE_RING_BULK, rec, &p))
        return -ENOBUFS;
    if (what == 1) {
        struct upipe_slot *s = upipe_ring_slot(r, p);
        static const char msg[] = "rolled-forward";
        UPIPE_SLOT_SET(s, desc, UPIPE_DESC_INLINE);
        s->len = sizeof msg - 1;
        UPIPE_SLOT_SET(s, kind, UPIPE_KIND_BYTES);
        UPIPE_SLOT_SET(s, meta_len, 0);
        memcpy(s->data, msg, sizeof msg - 1);
        UPIPE_STORE_RELEASE(&s->stamp, p); /* R2, and then the process "dies" before R0 */
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* recovery                                                                                   */

/* Journal ops that claim at head, and at tail. */
#define OPS_PRODUCER ((1u << UPIPE_OP_PUT) | (1u << UPIPE_OP_REDELIVER))
#define OPS_CONSUMER ((1u << UPIPE_OP_TAKE) | (1u << UPIPE_OP_HOLD) | (1u << UPIPE_OP_ACK))

/* Is position q of ring ri named, by an op in ops, in the journal of an actor we believe alive
 * (alive != NULL), or of any actor whose entry is in use (alive == NULL)? */
static int live_claim(upipe_handle *h, const uint8_t *alive, uint32_t ri, uint32_t ops, uint64_t q)
{
    for (uint32_t i = 0; i < h->hdr->max_actors; i++) {
        struct upipe_actor *a = actor_at(h, i);
        if (alive ? !alive[i] : UPIPE_LOAD_ACQUIRE(&a->pid) == 0)
            continue;
        for (uint32_t j = 0; j < UPIPE_RECS_PER_ACTOR; j++) {
            struct upipe_rec *rec = &a->recs[j];
            uint32_t op = UPIPE_LOAD_SEQCST(&rec->op);
            if (op >= 32 || !(ops & (1u << op)) || UPIPE_LOAD_SEQCST(&rec->ring) != ri)
                continue;
            uint64_t pos = UPIPE_LOAD_SEQCST(&rec->pos), n = UPIPE_LOAD_SEQCST(&rec->n);
            if (q >= pos && q < pos + n)
                return 1;
        }
    }
    return 0;
}

/* A producer died between claiming q and publishing it. Order: head, live journals, slot. */
static void repair_put(upipe_handle *h, const uint8_t *alive, uint32_t ri, uint64_t q)
{
    struct upipe_ring *r = ring_at(h, ri);
    if (UPIPE_LOAD_SEQCST(&r->head) <= q)
        return; /* never claimed */
    if (live_claim(h, alive, ri, OPS_PRODUCER, q))
        return; /* a live producer owns it and will publish it */
    struct upipe_slot *s = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&s->seq) != q)
        return; /* already published */
    if (UPIPE_LOAD_ACQUIRE(&s->stamp) == q) { /* A2: complete, so the put happened */
        if (s->desc != UPIPE_DESC_INLINE) {
            uint32_t c = (uint32_t)(s->desc - 1);
            struct upipe_chunk *ch = chunk_hdr(h, c);
            if (UPIPE_LOAD_ACQUIRE(&ch->owner) == UPIPE_OWNER_SHARED) {
                UPIPE_FETCH_OR(&ch->rings, actor_bit(ri)); /* idempotent: it may have done it */
                shared_moved(ch); /* the dead producer's reference moves there (the sweep) */
            } else {
                uint32_t owner =
                    (r->flags & UPIPE_RING_FREELIST) ? UPIPE_OWNER_FREE : UPIPE_OWNER_QUEUED;
                UPIPE_STORE_RELEASE(&ch->owner, owner);
            }
        }
        UPIPE_STORE_RELEASE(&s->seq, q + 1);
    } else {
        write_tombstone(r, q);
        UPIPE_FETCH_ADD(&r->aborted_puts, 1);
    }
    ec_signal(h, &r->not_empty);
}

/* A consumer died between claiming q and releasing it. */
static void repair_take(upipe_handle *h, const uint8_t *alive, uint32_t ri, uint64_t q,
                        uint32_t dead_tag)
{
    struct upipe_ring *r = ring_at(h, ri);
    if (UPIPE_LOAD_SEQCST(&r->tail) <= q)
        return;
    if (live_claim(h, alive, ri, OPS_CONSUMER, q))
        return;
    if (live_claim(h, NULL, ri, 1u << UPIPE_OP_HOLD, q))
        return; /* a dead taker's item waiting for room to be redelivered (pass 2): not lost */
    struct upipe_slot *s = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&s->seq) != q + 1)
        return; /* already released */
    int is_item = !(r->flags & UPIPE_RING_FREELIST) && s->kind != UPIPE_KIND_TOMBSTONE;
    if (s->desc != UPIPE_DESC_INLINE && s->kind != UPIPE_KIND_TOMBSTONE) {
        /* Give the chunk to the dead actor; the sweep below hands it back to its pool. */
        uint32_t c = (uint32_t)(s->desc - 1);
        if (is_item && UPIPE_LOAD_ACQUIRE(&chunk_hdr(h, c)->owner) == UPIPE_OWNER_SHARED) {
            shared_consume(h, c, tag_index(dead_tag), ri); /* the sweep drops its bit */
            UPIPE_FETCH_ADD(&h->hdr->lost_leases, 1);
        } else {
            UPIPE_STORE_RELAXED(&chunk_hdr(h, c)->flags, is_item ? UPIPE_CHUNK_RECEIVED : 0);
            UPIPE_STORE_RELEASE(&chunk_hdr(h, c)->owner, dead_tag);
        }
    } else if (is_item) {
        UPIPE_FETCH_ADD(&r->lost_items, 1); /* an inline item it took and never returned */
    }
    upipe_ring_release(r, q);
    released_signal(h, r);
}

/*
 * A process died moving a held item from position q (src) to pos p: finish the move or undo
 * it, so that the item is in exactly one place (see redeliver() for the steps). Pass 1 of
 * recovery, before any HOLD is looked at.
 */
static void repair_redeliver(upipe_handle *h, const uint8_t *alive, uint32_t ri, uint64_t p,
                             uint64_t src)
{
    struct upipe_ring *r = ring_at(h, ri);
    uint64_t q = src & ~UPIPE_SRC_CLAIMED;
    struct upipe_slot *old = upipe_ring_slot(r, q);
    if (p == q + r->capacity) {
        /* In place (a fast-path claim can never be q + capacity while q is held: claim_prod
         * needs seq == q + capacity there). head beyond p with the slot still held at q means
         * our CAS on head went through: only we could move head past a held slot. */
        if (UPIPE_LOAD_SEQCST(&r->head) > p && UPIPE_LOAD_SEQCST(&old->seq) == q + 1)
            move_in_place(h, r, q, NO_CUT);
        return;
    }
    if (!(src & UPIPE_SRC_CLAIMED)) {
        /* Died around its claim of p (won or lost): nothing of the item was written there,
         * so p is repaired as anyone's claimed put would be; the item stays held at q. */
        repair_put(h, alive, ri, p);
        return;
    }
    struct upipe_slot *s = upipe_ring_slot(r, p);
    if (UPIPE_LOAD_SEQCST(&s->seq) == p) { /* claimed by it, not published */
        if (UPIPE_LOAD_ACQUIRE(&s->stamp) != p) { /* A2: the copy was not complete: undo */
            write_tombstone(r, p);
            ec_signal(h, &r->not_empty);
            return;
        }
        move_finish(h, r, p, q, NO_CUT); /* complete: publish p, release q */
        return;
    }
    move_release_old(h, r, q); /* p was published: the move happened; let go of q */
}

/* A consumer died holding q (a take it never acked): put the item back. 1 done (or nothing to
 * do), 0 no room yet: the entry stays, and the next recovery tries again. Pass 2. */
static int repair_hold(upipe_handle *h, const uint8_t *alive, uint32_t ri, uint64_t q)
{
    struct upipe_ring *r = ring_at(h, ri);
    if (UPIPE_LOAD_SEQCST(&r->tail) <= q)
        return 1; /* never claimed: its CAS did not go through */
    if (live_claim(h, alive, ri, OPS_CONSUMER, q))
        return 1; /* a live consumer's */
    struct upipe_slot *s = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&s->seq) != q + 1)
        return 1; /* acked, or moved already */
    if (UPIPE_SLOT_PEEK(s, kind) == UPIPE_KIND_TOMBSTONE) { /* died before skipping it */
        upipe_ring_release(r, q);
        released_signal(h, r);
        return 1;
    }
    return redeliver(h, ri, q, NO_CUT) == MOVE_DONE;
}

/* A process died acking a take of a shared chunk (ack_shared): finish the ack. Its holder bit
 * (set again here, idempotent) keeps the chunk's incarnation from changing under us; the
 * sweep drops it. */
static void repair_ack(upipe_handle *h, uint32_t ri, uint64_t q, uint32_t index)
{
    struct upipe_ring *r = ring_at(h, ri);
    struct upipe_slot *s = upipe_ring_slot(r, q);
    if (UPIPE_LOAD_SEQCST(&s->seq) != q + 1)
        return; /* released: the ack got that far, its bits were done before */
    uint64_t desc = UPIPE_SLOT_PEEK(s, desc);
    if (desc != UPIPE_DESC_INLINE && desc - 1 < h->hdr->total_chunks)
        shared_consume(h, (uint32_t)(desc - 1), index, ri);
    upipe_ring_release(r, q);
    released_signal(h, r);
}

/* Pass 3: puts and gets, chunks, the table entry. With takes still waiting for room (pending),
 * the chunks those name (HELD) and the entry itself stay until a later recovery. */
static void recover_actor(upipe_handle *h, const uint8_t *alive, uint32_t index, int pending)
{
    struct upipe_actor *a = actor_at(h, index);
    uint32_t dead_tag = make_tag(index, UPIPE_LOAD_ACQUIRE(&a->gen));
    uint32_t nrings = h->hdr->ndata_rings + h->hdr->nclasses;
    for (uint32_t j = 0; j < UPIPE_RECS_PER_ACTOR; j++) {
        struct upipe_rec *rec = &a->recs[j];
        uint32_t op = UPIPE_LOAD_SEQCST(&rec->op);
        uint32_t ri = UPIPE_LOAD_SEQCST(&rec->ring);
        if (op == UPIPE_OP_ACK && ri < h->hdr->ndata_rings) {
            repair_ack(h, ri, UPIPE_LOAD_SEQCST(&rec->pos), index);
            UPIPE_STORE_RELAXED(&rec->op, UPIPE_OP_NONE);
            continue;
        }
        if ((op != UPIPE_OP_PUT && op != UPIPE_OP_TAKE) || ri >= nrings)
            continue;
        uint64_t pos = UPIPE_LOAD_SEQCST(&rec->pos), n = UPIPE_LOAD_SEQCST(&rec->n);
        for (uint64_t q = pos; q < pos + n; q++) {
            if (op == UPIPE_OP_PUT)
                repair_put(h, alive, ri, q);
            else
                repair_take(h, alive, ri, q, dead_tag);
        }
        UPIPE_STORE_RELAXED(&rec->op, UPIPE_OP_NONE);
    }
    /* Sweep: every chunk the dead process held goes back to its pool. A HELD one is an item
     * whose ack was under way (the hold itself was moved, giving the chunk to the queue). */
    for (uint32_t c = 0; c < h->hdr->total_chunks; c++) {
        struct upipe_chunk *ch = chunk_hdr(h, c);
        uint32_t owner = UPIPE_LOAD_ACQUIRE(&ch->owner);
        if (owner == UPIPE_OWNER_SHARED) {
            uint64_t sh = UPIPE_LOAD_SEQCST(&ch->share);
            if (UPIPE_SHARE_STATE(sh) == UPIPE_SHARE_FREEING + index) {
                /* It won the right to free it and died: free it as its own chunk. */
                UPIPE_STORE_RELEASE(&ch->owner, dead_tag);
                UPIPE_FETCH_ADD(&h->hdr->reclaimed_chunks, 1);
                free_chunk_from(h, c, dead_tag);
            } else if (UPIPE_LOAD_SEQCST(&ch->holders) & actor_bit(index)) {
                UPIPE_FETCH_ADD(&h->hdr->reclaimed_chunks, 1);
                shared_unhold(h, c, index); /* freed if it was the last reference */
            } else if (shared_maybe_free(h, c, NO_CUT) == LOOK_FREED) {
                /* No reference left and nobody freeing it: a holder died between clearing
                 * its bit and looking (the clearer of the last bit is the only one who looks,
                 * so nobody else ever would: a leak). No bit is ever added to a chunk without
                 * one, so it is garbage, and the CAS in shared_maybe_free still picks one
                 * freer should the clearer be alive and looking after all. */
                UPIPE_FETCH_ADD(&h->hdr->reclaimed_chunks, 1);
            }
            continue;
        }
        if (owner != dead_tag)
            continue;
        uint32_t flags = UPIPE_LOAD_RELAXED(&ch->flags);
        if (pending && (flags & UPIPE_CHUNK_HELD))
            continue;
        if ((flags & UPIPE_CHUNK_RECEIVED) && !(flags & UPIPE_CHUNK_HELD))
            UPIPE_FETCH_ADD(&h->hdr->lost_leases, 1);
        UPIPE_FETCH_ADD(&h->hdr->reclaimed_chunks, 1);
        free_chunk_from(h, c, dead_tag);
    }
    if (pending)
        return;
    for (uint32_t j = 0; j < UPIPE_RECS_PER_ACTOR; j++)
        UPIPE_STORE_RELAXED(&a->recs[j].op, UPIPE_OP_NONE);
    UPIPE_FETCH_ADD(&h->hdr->recoveries, 1);
    UPIPE_STORE_RELEASE(&a->pid, 0); /* the entry is free for a new process */
}

int upipe_recover(upipe_handle *h)
{
    struct upipe_header *hdr = h->hdr;
    if (!h->actor)
        return 0; /* recovery hands chunks back, which takes an actor (journal) of our own */
    /* One recoverer at a time; a dead recoverer's lock is taken over. */
    uint32_t expected = 0;
    if (!UPIPE_CAS(&hdr->recovery_owner, &expected, h->tag)) {
        uint32_t holder = expected;
        uint32_t idx = (holder & 0xFFu) - 1;
        if (idx < hdr->max_actors) {
            struct upipe_actor *a = actor_at(h, idx);
            if (make_tag(idx, UPIPE_LOAD_ACQUIRE(&a->gen)) == holder && actor_alive(a))
                return -EBUSY;
        }
        if (!UPIPE_CAS(&hdr->recovery_owner, &holder, h->tag))
            return -EBUSY;
    }
    uint8_t alive[UPIPE_MAX_ACTORS];
    uint8_t dead[UPIPE_MAX_ACTORS];
    int ndead = 0;
    for (uint32_t i = 0; i < hdr->max_actors; i++) {
        struct upipe_actor *a = actor_at(h, i);
        uint32_t pid = UPIPE_LOAD_ACQUIRE(&a->pid);
        alive[i] = dead[i] = 0;
        if (pid == 0)
            continue;
        if (a == h->actor || actor_alive(a))
            alive[i] = 1;
        else
            dead[i] = 1, ndead++;
    }
    /* Pass 1: moves of held items cut short by a death are finished or undone, so that pass 2
     * finds every held item in exactly one place. */
    for (uint32_t i = 0; i < hdr->max_actors; i++) {
        for (uint32_t j = 0; dead[i] && j < UPIPE_RECS_PER_ACTOR; j++) {
            struct upipe_rec *rec = &actor_at(h, i)->recs[j];
            uint32_t ri = UPIPE_LOAD_SEQCST(&rec->ring);
            if (UPIPE_LOAD_SEQCST(&rec->op) != UPIPE_OP_REDELIVER)
                continue;
            if (ri < hdr->ndata_rings && UPIPE_LOAD_SEQCST(&rec->n) != 0)
                repair_redeliver(h, alive, ri, UPIPE_LOAD_SEQCST(&rec->pos),
                                 UPIPE_LOAD_SEQCST(&rec->src));
            UPIPE_STORE_RELAXED(&rec->op, UPIPE_OP_NONE);
        }
    }
    /* Pass 2: items dead consumers held go back into their rings. Moving one in place may make
     * room for another, so go round again while that helps. */
    uint8_t pending[UPIPE_MAX_ACTORS];
    for (int progress = 1; progress;) {
        progress = 0;
        for (uint32_t i = 0; i < hdr->max_actors; i++) {
            pending[i] = 0;
            for (uint32_t j = 0; dead[i] && j < UPIPE_RECS_PER_ACTOR; j++) {
                struct upipe_rec *rec = &actor_at(h, i)->recs[j];
                uint32_t ri = UPIPE_LOAD_SEQCST(&rec->ring);
                if (UPIPE_LOAD_SEQCST(&rec->op) != UPIPE_OP_HOLD)
                    continue;
                int done = 1;
                uint64_t pos = UPIPE_LOAD_SEQCST(&rec->pos), n = UPIPE_LOAD_SEQCST(&rec->n);
                for (uint64_t q = pos; ri < hdr->ndata_rings && q < pos + n; q++)
                    done &= repair_hold(h, alive, ri, q);
                if (done) {
                    UPIPE_STORE_RELAXED(&rec->op, UPIPE_OP_NONE);
                    progress = 1;
                } else {
                    pending[i] = 1;
                }
            }
        }
    }
    /* Pass 3: puts and gets, chunks, table entries. */
    for (uint32_t i = 0; i < hdr->max_actors; i++)
        if (dead[i])
            recover_actor(h, alive, i, pending[i]);
    UPIPE_STORE_RELEASE(&hdr->recovery_owner, 0);
    return ndead;
}

int upipe_stats(upipe_handle *h, uint32_t ring, struct upipe_stats *out)
{
    if (bad_data_ring(h, ring))
        return -EINVAL;
    struct upipe_ring *r = ring_at(h, ring);
    memset(out, 0, sizeof *out);
    out->capacity = r->capacity;
    out->tail = UPIPE_LOAD_ACQUIRE(&r->tail);
    out->head = UPIPE_LOAD_ACQUIRE(&r->head);
    out->count = upipe_ring_count(r);
    out->closed = UPIPE_LOAD_ACQUIRE(&r->closed);
    out->inline_max = r->inline_max;
    out->aborted_puts = UPIPE_LOAD_RELAXED(&r->aborted_puts);
    out->lost_items = UPIPE_LOAD_RELAXED(&r->lost_items);
    out->tombstones_skipped = UPIPE_LOAD_RELAXED(&r->tombstones_skipped);
    out->redelivered = UPIPE_LOAD_RELAXED(&r->redelivered);
    out->recoveries = UPIPE_LOAD_RELAXED(&h->hdr->recoveries);
    out->reclaimed_chunks = UPIPE_LOAD_RELAXED(&h->hdr->reclaimed_chunks);
    out->lost_leases = UPIPE_LOAD_RELAXED(&h->hdr->lost_leases);
    for (uint32_t i = 0; i < h->hdr->max_actors; i++)
        out->actors += UPIPE_LOAD_RELAXED(&actor_at(h, i)->pid) != 0;
    out->nclasses = h->hdr->nclasses;
    for (uint32_t i = 0; i < h->hdr->nclasses; i++) {
        const struct upipe_class *k = &h->hdr->classes[i];
        out->class_size[i] = k->chunk_size;
        out->class_total[i] = k->nchunks;
        out->class_free[i] = upipe_ring_count(ring_at(h, k->free_ring));
    }
    out->segment_size = h->size;
    return 0;
}
