/*
 * upipe_ring.h - the ring primitive: claim, fill, publish; claim, read, release.
 *
 * Producers claim positions by CAS on head, fill the slots, then publish each slot with a release
 * store of seq = pos + 1 (R0). Consumers see it with an acquire load (A0), claim by CAS on tail,
 * read, and release the slot with seq = pos + capacity (R1), which producers acquire (A1) before
 * reusing it. Before every claiming CAS the caller's journal entry (struct upipe_rec) names the
 * positions it is after, so recovery can tell whose half-done slot it is looking at.
 *
 * ACCEPTABLE: a consumer sees seq == pos + 1 and reads the payload the producer wrote.
 * FORBIDDEN:  a consumer sees seq == pos + 1 and reads a payload older than the producer's write
 *             (R0/A0 order the payload writes before the seq store, the seq load before the reads).
 */
#ifndef UPIPE_RING_H
#define UPIPE_RING_H

#include "upipe_atomic.h"
#include "upipe_layout.h"

/* Bulk: all n or nothing. Burst: as many as possible, up to n (DPDK's two behaviours). */
enum upipe_ring_mode { UPIPE_RING_BULK = 0, UPIPE_RING_BURST = 1 };

/* Bytes a ring of this capacity and slot size takes in the segment, or 0 on bad arguments. */
uint64_t upipe_ring_memsize(uint64_t capacity, uint32_t slot_size);

/* Creator only, before the segment is marked ready. capacity must be a power of two. */
void upipe_ring_init(struct upipe_ring *r, uint64_t capacity, uint32_t slot_size, uint32_t index,
                     uint32_t flags);

static inline struct upipe_slot *upipe_ring_slot(struct upipe_ring *r, uint64_t pos)
{
    return (struct upipe_slot *)((uint8_t *)(r + 1) + (pos & r->mask) * r->slot_size);
}

/*
 * Claim up to n free positions for writing; returns the count (0 when full), first position in
 * *pos. rec->op/ring must be set by the caller; this writes rec->pos/n before each CAS.
 */
uint32_t upipe_ring_claim_prod(struct upipe_ring *r, uint32_t n, enum upipe_ring_mode mode,
                               struct upipe_rec *rec, uint64_t *pos);

/*
 * Claim up to n published positions for reading. Returns the count; 0 with *busy = 1 when the
 * next position is claimed by a producer but not yet published (mid-write or dead).
 */
uint32_t upipe_ring_claim_cons(struct upipe_ring *r, uint32_t n, enum upipe_ring_mode mode,
                               struct upipe_rec *rec, uint64_t *pos, int *busy);

/* R0: make the slot at pos visible to consumers. Stamp first (crash evidence), then seq. */
static inline void upipe_ring_publish(struct upipe_ring *r, uint64_t pos)
{
    struct upipe_slot *s = upipe_ring_slot(r, pos);
    UPIPE_STORE_RELEASE(&s->stamp, pos);   /* R2: pairs with A2 in recovery */
    UPIPE_STORE_RELEASE(&s->seq, pos + 1); /* R0: pairs with A0 in upipe_ring_claim_cons */
}

/* R1: hand the slot at pos back to producers. */
static inline void upipe_ring_release(struct upipe_ring *r, uint64_t pos)
{
    struct upipe_slot *s = upipe_ring_slot(r, pos);
    UPIPE_STORE_RELEASE(&s->seq, pos + r->capacity); /* R1: pairs with A1 in claim_prod */
}

/* Items published or being written (head - tail), clamped to [0, capacity]. */
uint64_t upipe_ring_count(struct upipe_ring *r);

/* A consumer could take an item now (or the ring is closed). */
int upipe_ring_readable(struct upipe_ring *r);
/* The item at tail is published (seq_cst loads, as readable). */
int upipe_ring_published(struct upipe_ring *r);
/* A producer could claim a slot now (or the ring is closed). */
int upipe_ring_writable(struct upipe_ring *r);

#endif /* UPIPE_RING_H */
