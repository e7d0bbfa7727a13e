/*
 * upipe_layout.h - the bytes of a upipe shared-memory segment.
 *
 * One segment (an anonymous memfd) holds:
 *
 *   [ header 4 KiB | actor table | chunk headers | rings (data rings, then one free ring per
 *     chunk class) | chunk data, one region per size class ]
 *
 * Every field says who writes it. "creator" fields are written once, before the release store of
 * header.state = READY, and are read-only afterwards. docs/layout.md has the byte offsets and a
 * test compares them with the compiled ones (ffi.offsetof).
 */
#ifndef UPIPE_LAYOUT_H
#define UPIPE_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>

/* "UPIPE\0\0\1" read as a little-endian u64. */
#define UPIPE_MAGIC 0x0100004550495055ULL
#define UPIPE_LAYOUT_VERSION 3u /* 2: take/ack (HOLD, REDELIVER), rec.src, ring.redelivered;
                                  * 3: shared chunks (fan-out), 64 data rings, ACK op */

#define UPIPE_HEADER_SIZE 4096u
#define UPIPE_MAX_DATA_RINGS 64u /* a shared chunk has one bit per data ring */
#define UPIPE_MAX_CLASSES 8u
#define UPIPE_MAX_RINGS (UPIPE_MAX_DATA_RINGS + UPIPE_MAX_CLASSES)
#define UPIPE_MAX_ACTORS 64u /* a shared chunk has one bit per actor */
#define UPIPE_RECS_PER_ACTOR 64u
#define UPIPE_SLOT_HEADER 32u
#define UPIPE_RING_GUARD 128u

enum upipe_state { UPIPE_STATE_EMPTY = 0, UPIPE_STATE_INITIALIZING = 1, UPIPE_STATE_READY = 2 };

/* chunk.owner values other than an actor tag. */
#define UPIPE_OWNER_FREE 0u           /* in its class's free ring */
#define UPIPE_OWNER_QUEUED 0xFFFFFFFFu /* referenced by exactly one published data-ring slot */
#define UPIPE_OWNER_SHARED 0xFFFFFFFEu /* shared: its holders are chunk.holders and chunk.rings */

/* chunk.share: (version << 8) | state, for a shared chunk. state LIVE, or FREEING + actor
 * index: the actor that won the right to free it (one CAS, so exactly one per incarnation).
 * version: new for every incarnation (the sharer), and bumped by every move of a reference
 * between holders and rings, so that a freer's CAS fails if a move overlapped its look. */
#define UPIPE_SHARE_LIVE 0u
#define UPIPE_SHARE_FREEING 1u
#define UPIPE_SHARE_STATE(w) ((uint32_t)((w)&0xFFu))

/* slot.desc: 0 means the payload is inline in the slot; otherwise chunk id + 1. */
#define UPIPE_DESC_INLINE 0u
/* slot.kind reserved by the C core: a slot a dead producer claimed and never filled. */
#define UPIPE_KIND_TOMBSTONE 0xFFFFu

/* chunk.flags (written by the holder; set to 0 whenever the chunk changes holder) */
#define UPIPE_CHUNK_RECEIVED 1u /* the holder took it from a data ring (an item, not a fresh alloc) */
#define UPIPE_CHUNK_HELD 2u     /* an unacked take: its held slot still names the chunk, so the
                                 * chunk may not be freed or put until the ack */
#define UPIPE_CHUNK_DROPPED 4u  /* the holder let go of it while HELD: the ack frees it */

/* actor.pid of an entry whose process detached (handle gone) with takes it could not give back
 * yet: recovery treats it as dead and finishes them. Never a real pid (those are < 2^22). */
#define UPIPE_PID_ABANDONED 0xFFFFFFFFu

/*
 * rec.op: what an actor is in the middle of (the journal recovery reads after a crash).
 *   PUT        claiming / filling positions at head (pos, n)
 *   TAKE       claiming / reading positions at tail (get: released at once)
 *   HOLD       a take: position pos claimed at tail and NOT released until the ack; the entry
 *              stays busy until then. A dead holder's item is redelivered, not lost.
 *   REDELIVER  moving the item held at position src to a fresh position pos (recovery, nack,
 *              detach). src has UPIPE_SRC_CLAIMED set once pos is really this actor's.
 *   ACK        acking the take held at position pos whose chunk is shared: recovery finishes
 *              it (the ring's bit on the chunk is cleared, then the slot released), never
 *              redelivers it.
 */
enum upipe_op {
    UPIPE_OP_NONE = 0,
    UPIPE_OP_PUT = 1,
    UPIPE_OP_TAKE = 2,
    UPIPE_OP_HOLD = 3,
    UPIPE_OP_REDELIVER = 4,
    UPIPE_OP_ACK = 5
};
#define UPIPE_SRC_CLAIMED (1ULL << 63)

/*
 * An eventcount: a doorbell for one condition of one ring (see docs/futex.md).
 * seq: bumped by wakers, only when waiters are registered; the futex word.
 * sync_waiters / async_waiters: incremented and decremented by waiters.
 * sync_armed / async_armed: set by a waiter about to sleep, cleared (exchange) by the waker that
 * rings for it: one syscall per sleep, not one per item while the sleeper is getting up.
 */
struct upipe_ec {
    _Atomic uint32_t seq;
    _Atomic uint32_t sync_waiters;
    _Atomic uint32_t async_waiters;
    uint32_t efd_index; /* creator: which of the process's eventfds rings this doorbell */
    _Atomic uint32_t sync_armed;
    _Atomic uint32_t async_armed;
};

struct upipe_slot {
    _Atomic uint64_t seq;   /* lap word. producer: pos+1 on publish; consumer: pos+capacity on release */
    _Atomic uint64_t stamp; /* producer: pos, once desc/len/kind/data are complete (crash evidence) */
    uint64_t desc;          /* producer: UPIPE_DESC_INLINE or chunk id + 1 */
    uint32_t len;           /* producer: payload bytes (not counting meta) */
    uint16_t kind;          /* producer: opaque to C, except UPIPE_KIND_TOMBSTONE */
    uint16_t meta_len;      /* producer: bytes of metadata at the start of data[] */
    uint8_t data[];         /* producer: meta, then the payload when desc == UPIPE_DESC_INLINE */
};

/*
 * A bounded MPMC ring of slots with per-slot lap words (Vyukov), 64-bit free-running positions
 * masked on access. Each block that one side writes sits on its own 2 x 64 B.
 */
struct upipe_ring {
    /* creator, read-only afterwards */
    uint64_t capacity; /* power of two */
    uint64_t mask;
    uint32_t slot_size;
    uint32_t inline_max; /* slot_size - UPIPE_SLOT_HEADER */
    uint32_t index;
    uint32_t flags; /* UPIPE_RING_FREELIST for a chunk class's free ring */
    uint64_t limit; /* most items the ring holds at once (<= capacity): the user's maxsize */
    uint8_t pad_ro[128 - 40];
    /* producers */
    _Atomic uint64_t head;
    uint8_t pad_head[128 - 8];
    /* consumers */
    _Atomic uint64_t tail;
    uint8_t pad_tail[128 - 8];
    /* not_empty: producers bump seq, consumers wait */
    struct upipe_ec not_empty;
    uint8_t pad_ne[128 - sizeof(struct upipe_ec)];
    /* not_full: consumers bump seq, producers wait */
    struct upipe_ec not_full;
    uint8_t pad_nf[128 - sizeof(struct upipe_ec)];
    /* rare writes: close() and recovery */
    _Atomic uint32_t closed;
    uint32_t pad_c;
    _Atomic uint64_t aborted_puts;       /* recovery: tombstones written for dead producers */
    _Atomic uint64_t lost_items;         /* recovery: items a dead consumer took mid-get */
    _Atomic uint64_t tombstones_skipped; /* consumers */
    _Atomic uint64_t redelivered;        /* recovery, nack, detach: held items put back */
    uint8_t pad_rare[128 - 40];
    /* slot_size * capacity bytes of slots follow, then UPIPE_RING_GUARD bytes */
};
#define UPIPE_RING_FREELIST 1u

/* One entry of an actor's journal; written by its owner, read by recovery. */
struct upipe_rec {
    _Atomic uint32_t op;   /* enum upipe_op; NONE when idle */
    _Atomic uint32_t ring; /* ring index */
    _Atomic uint64_t pos;  /* first position being claimed (written before the claiming CAS) */
    _Atomic uint64_t n;    /* number of positions being claimed */
    _Atomic uint64_t src;  /* REDELIVER: the held position being moved (| UPIPE_SRC_CLAIMED) */
};

/*
 * An attached process. pid: the actor itself claims the entry (CAS 0 -> pid) and clears it on
 * detach (or sets UPIPE_PID_ABANDONED when it detaches holding takes it cannot give back yet);
 * recovery clears it after a crash. gen: bumped by the claimer, so a tag never names two
 * incarnations. recs: the process's in-flight operations, one entry per concurrent thread, plus
 * one per unacked take (HOLD).
 */
struct upipe_actor {
    _Atomic uint32_t pid;
    _Atomic uint32_t gen;
    _Atomic uint64_t starttime; /* owner: /proc/self/stat field 22, to tell a reused pid */
    uint8_t pad[64 - 16];
    struct upipe_rec recs[UPIPE_RECS_PER_ACTOR];
};

/*
 * Chunk bookkeeping, one per chunk, in the chunk-headers region.
 *
 * A chunk has one holder (owner: FREE, QUEUED or an actor tag), or, once a producer fans it
 * out to several rings, is SHARED: then it is held by every actor whose bit is set in holders
 * and by the one slot of every data ring whose bit is set in rings, and is free when both are
 * zero. Bits are idempotent to set and clear, so recovery can always tell what a dead actor
 * held. Both words only ever go to zero for good: bits are added only by someone who already
 * holds a reference (docs/design.md, "Shared chunks").
 */
struct upipe_chunk {
    _Atomic uint32_t owner;   /* the current holder: FREE, QUEUED, SHARED or an actor tag */
    _Atomic uint32_t flags;   /* holder (UPIPE_CHUNK_*); RMW only while HELD (free vs ack) */
    _Atomic uint64_t share;   /* sharer (store), movers (add), the freer (CAS): version | state */
    _Atomic uint64_t holders; /* SHARED: bit per actor index; set/cleared by that actor or by
                               * the recovery of it */
    _Atomic uint64_t rings;   /* SHARED: bit per data ring holding a slot that names it; set by
                               * the producer (after the slot's stamp), cleared by its consumer
                               * (before the slot's release) or by recovery */
};

/* creator, read-only afterwards */
struct upipe_class {
    uint64_t chunk_size;
    uint64_t data_off; /* segment offset of chunk 0 of this class */
    uint32_t nchunks;
    uint32_t first_chunk; /* global id of this class's chunk 0 */
    uint32_t free_ring;   /* ring index of this class's free list */
    uint32_t pad;
};

struct upipe_header {
    /* creator, read-only afterwards */
    uint64_t magic;
    uint32_t layout_version;
    uint32_t abi_version;
    uint32_t header_size;
    uint32_t flags;
    _Atomic uint32_t state; /* creator: written last, with a release store */
    uint32_t creator_pid;
    uint64_t total_size;
    uint32_t ndata_rings;
    uint32_t nclasses;
    uint32_t max_actors;
    uint32_t total_chunks;
    uint64_t actors_off;
    uint64_t chunks_off;
    uint64_t ring_off[UPIPE_MAX_RINGS];
    struct upipe_class classes[UPIPE_MAX_CLASSES];
    uint8_t pad_ro[1024 - 72 - 8 * UPIPE_MAX_RINGS - 32 * UPIPE_MAX_CLASSES];
    /* recovery */
    _Atomic uint32_t recovery_owner;    /* tag of the actor running recovery, 0 if none */
    _Atomic uint32_t pad_r;
    _Atomic uint64_t recoveries;        /* dead actors recovered */
    _Atomic uint64_t reclaimed_chunks;  /* chunks taken back from dead actors */
    _Atomic uint64_t lost_leases;       /* of those, received items that were not finished */
    uint8_t reserved[UPIPE_HEADER_SIZE - 1024 - 32];
};

_Static_assert(sizeof(struct upipe_header) == UPIPE_HEADER_SIZE, "header is 4 KiB");
_Static_assert(offsetof(struct upipe_header, recovery_owner) == 1024, "recovery block at 1 KiB");
_Static_assert(sizeof(struct upipe_slot) == UPIPE_SLOT_HEADER, "slot header is 32 B");
_Static_assert(offsetof(struct upipe_ring, head) % 128 == 0, "head on its own 2 x 64 B");
_Static_assert(offsetof(struct upipe_ring, tail) % 128 == 0, "tail on its own 2 x 64 B");
_Static_assert(offsetof(struct upipe_ring, not_empty) % 128 == 0, "not_empty on its own 2 x 64 B");
_Static_assert(offsetof(struct upipe_ring, not_full) % 128 == 0, "not_full on its own 2 x 64 B");
_Static_assert(offsetof(struct upipe_ring, closed) % 128 == 0, "rare block on its own 2 x 64 B");
_Static_assert(sizeof(struct upipe_ring) == 768, "ring header is 6 x 128 B");
_Static_assert(sizeof(struct upipe_rec) == 32, "rec is 32 B");
_Static_assert(sizeof(struct upipe_actor) == 64 + 32 * UPIPE_RECS_PER_ACTOR, "actor size");
_Static_assert(sizeof(struct upipe_chunk) == 32, "chunk header is 32 B");

#endif /* UPIPE_LAYOUT_H */
