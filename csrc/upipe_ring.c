/* upipe_ring.c - see upipe_ring.h for the protocol and its barrier pairs. */
#include "upipe_ring.h"

#include <string.h>

uint64_t upipe_ring_memsize(uint64_t capacity, uint32_t slot_size)
{
    if (capacity < 2 || (capacity & (capacity - 1)) != 0)
        return 0;
    if (slot_size < UPIPE_SLOT_HEADER || slot_size % 8 != 0)
        return 0;
    return sizeof(struct upipe_ring) + capacity * slot_size + UPIPE_RING_GUARD;
}

void upipe_ring_init(struct upipe_ring *r, uint64_t capacity, uint32_t slot_size, uint32_t index,
                     uint32_t flags)
{
    memset(r, 0, upipe_ring_memsize(capacity, slot_size));
    r->capacity = capacity;
    r->mask = capacity - 1;
    r->slot_size = slot_size;
    r->inline_max = slot_size - UPIPE_SLOT_HEADER;
    r->index = index;
    r->flags = flags;
    r->limit = capacity;
    for (uint64_t i = 0; i < capacity; i++) {
        struct upipe_slot *s = upipe_ring_slot(r, i);
        UPIPE_STORE_RELAXED(&s->seq, i);
        UPIPE_STORE_RELAXED(&s->stamp, UINT64_MAX); /* no position yet */
    }
    /* Published to attachers by the header's release store of state = READY. */
}

uint32_t upipe_ring_claim_prod(struct upipe_ring *r, uint32_t n, enum upipe_ring_mode mode,
                               struct upipe_rec *rec, uint64_t *pos)
{
    uint64_t p = UPIPE_LOAD_RELAXED(&r->head);
    for (;;) {
        uint32_t k = 0;
        int stale = 0;
        /* maxsize below the power-of-two capacity: never hold more than limit items. Only then
         * is tail read here: it is the consumers' hot line, and the lap words already bound a
         * ring at its full capacity. */
        uint32_t m = n;
        if (r->limit < r->capacity) {
            int64_t used = (int64_t)(p - UPIPE_LOAD_ACQUIRE(&r->tail));
            uint64_t room = used >= (int64_t)r->limit ? 0 : r->limit - (uint64_t)(used < 0 ? 0 : used);
            if (m > room)
                m = (uint32_t)room;
        }
        while (k < m) {
            uint64_t want = p + k;
            /* A1: pairs with R1 (the consumer's release); the slot's old payload is consumed. */
            uint64_t seq = UPIPE_LOAD_ACQUIRE(&upipe_ring_slot(r, want)->seq);
            int64_t dif = (int64_t)(seq - want);
            if (dif == 0) {
                k++;
            } else if (dif < 0) {
                break; /* last lap's item still there: full from here */
            } else {
                stale = 1; /* another producer claimed this position: our head is old */
                break;
            }
        }
        if (stale || (k == 0 && UPIPE_LOAD_RELAXED(&r->head) != p)) {
            p = UPIPE_LOAD_RELAXED(&r->head);
            continue;
        }
        if (k == 0 || (mode == UPIPE_RING_BULK && k < n))
            return 0;
        /* The journal names the claim before the CAS makes it; the seq_cst CAS publishes both. */
        UPIPE_STORE_RELAXED(&rec->pos, p);
        UPIPE_STORE_RELAXED(&rec->n, k);
        if (UPIPE_CAS(&r->head, &p, p + k)) {
            *pos = p;
            return k;
        }
        /* CAS failure loaded the current head into p: try again from there. */
    }
}

uint32_t upipe_ring_claim_cons(struct upipe_ring *r, uint32_t n, enum upipe_ring_mode mode,
                               struct upipe_rec *rec, uint64_t *pos, int *busy)
{
    uint64_t t = UPIPE_LOAD_RELAXED(&r->tail);
    *busy = 0;
    for (;;) {
        uint32_t k = 0;
        int stale = 0;
        while (k < n) {
            uint64_t want = t + k;
            /* A0: pairs with R0 (the producer's publish); the payload is visible. */
            uint64_t seq = UPIPE_LOAD_ACQUIRE(&upipe_ring_slot(r, want)->seq);
            int64_t dif = (int64_t)(seq - (want + 1));
            if (dif == 0) {
                k++;
            } else if (dif < 0) {
                break; /* not published yet: empty, or a producer is mid-write */
            } else {
                stale = 1; /* another consumer took this position */
                break;
            }
        }
        if (stale || (k == 0 && UPIPE_LOAD_RELAXED(&r->tail) != t)) {
            t = UPIPE_LOAD_RELAXED(&r->tail);
            continue;
        }
        if (k == 0 || (mode == UPIPE_RING_BULK && k < n)) {
            /* head beyond the first unpublished position: claimed by a producer, not published */
            /* seq_cst: pairs with the producers' claim CAS and close() (see upipe_get) */
            if (UPIPE_LOAD_SEQCST(&r->head) > t + k)
                *busy = 1;
            return 0;
        }
        UPIPE_STORE_RELAXED(&rec->pos, t);
        UPIPE_STORE_RELAXED(&rec->n, k);
        if (UPIPE_CAS(&r->tail, &t, t + k)) {
            *pos = t;
            return k;
        }
    }
}

uint64_t upipe_ring_count(struct upipe_ring *r)
{
    uint64_t t = UPIPE_LOAD_ACQUIRE(&r->tail);
    uint64_t h = UPIPE_LOAD_ACQUIRE(&r->head);
    if ((int64_t)(h - t) <= 0)
        return 0;
    return (h - t) > r->capacity ? r->capacity : (h - t);
}

/*
 * Both checks run after a waiter registered (seq_cst), so they use seq_cst loads: this is the
 * waiter's half of the Dekker pair F0 (docs/futex.md). A stale position (another consumer or
 * producer moved on) is re-read rather than reported as "not ready", which would sleep through
 * an item published before we registered.
 */
int upipe_ring_readable(struct upipe_ring *r)
{
    return UPIPE_LOAD_SEQCST(&r->closed) || upipe_ring_published(r);
}

int upipe_ring_published(struct upipe_ring *r)
{
    for (;;) {
        uint64_t t = UPIPE_LOAD_SEQCST(&r->tail);
        uint64_t seq = UPIPE_LOAD_SEQCST(&upipe_ring_slot(r, t)->seq);
        if ((int64_t)(seq - (t + 1)) <= 0)
            return seq == t + 1;
    }
}

int upipe_ring_writable(struct upipe_ring *r)
{
    if (UPIPE_LOAD_SEQCST(&r->closed))
        return 1;
    for (;;) {
        uint64_t h = UPIPE_LOAD_SEQCST(&r->head);
        if ((int64_t)(h - UPIPE_LOAD_SEQCST(&r->tail)) >= (int64_t)r->limit)
            return 0; /* at maxsize, whatever the slots say */
        uint64_t seq = UPIPE_LOAD_SEQCST(&upipe_ring_slot(r, h)->seq);
        if ((int64_t)(seq - h) <= 0)
            return seq == h;
    }
}
