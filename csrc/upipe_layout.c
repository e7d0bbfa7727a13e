/*
 * upipe_layout.c - the compiled byte offsets of the shared structures, by name, so a test can
 * hold docs/layout.md to the truth without the cdef exposing the structs themselves.
 */
#include "upipe_layout.h"

#include <errno.h>
#include <string.h>

#define FIELD(s, f) {#s "." #f, offsetof(struct s, f)}
#define SIZE(s) {"sizeof(" #s ")", sizeof(struct s)}

static const struct {
    const char *name;
    size_t value;
} table[] = {
    FIELD(upipe_header, magic),
    FIELD(upipe_header, layout_version),
    FIELD(upipe_header, abi_version),
    FIELD(upipe_header, header_size),
    FIELD(upipe_header, flags),
    FIELD(upipe_header, state),
    FIELD(upipe_header, creator_pid),
    FIELD(upipe_header, total_size),
    FIELD(upipe_header, ndata_rings),
    FIELD(upipe_header, nclasses),
    FIELD(upipe_header, max_actors),
    FIELD(upipe_header, total_chunks),
    FIELD(upipe_header, actors_off),
    FIELD(upipe_header, chunks_off),
    FIELD(upipe_header, ring_off),
    FIELD(upipe_header, classes),
    FIELD(upipe_header, recovery_owner),
    FIELD(upipe_header, recoveries),
    FIELD(upipe_header, reclaimed_chunks),
    FIELD(upipe_header, lost_leases),
    SIZE(upipe_header),
    FIELD(upipe_ring, capacity),
    FIELD(upipe_ring, mask),
    FIELD(upipe_ring, slot_size),
    FIELD(upipe_ring, inline_max),
    FIELD(upipe_ring, index),
    FIELD(upipe_ring, flags),
    FIELD(upipe_ring, limit),
    FIELD(upipe_ring, head),
    FIELD(upipe_ring, tail),
    FIELD(upipe_ring, not_empty),
    FIELD(upipe_ring, not_full),
    FIELD(upipe_ring, closed),
    FIELD(upipe_ring, aborted_puts),
    FIELD(upipe_ring, lost_items),
    FIELD(upipe_ring, tombstones_skipped),
    FIELD(upipe_ring, redelivered),
    SIZE(upipe_ring),
    FIELD(upipe_ec, seq),
    FIELD(upipe_ec, sync_waiters),
    FIELD(upipe_ec, async_waiters),
    FIELD(upipe_ec, efd_index),
    FIELD(upipe_ec, sync_armed),
    FIELD(upipe_ec, async_armed),
    SIZE(upipe_ec),
    FIELD(upipe_slot, seq),
    FIELD(upipe_slot, stamp),
    FIELD(upipe_slot, desc),
    FIELD(upipe_slot, len),
    FIELD(upipe_slot, kind),
    FIELD(upipe_slot, meta_len),
    FIELD(upipe_slot, data),
    SIZE(upipe_slot),
    FIELD(upipe_class, chunk_size),
    FIELD(upipe_class, data_off),
    FIELD(upipe_class, nchunks),
    FIELD(upipe_class, first_chunk),
    FIELD(upipe_class, free_ring),
    SIZE(upipe_class),
    FIELD(upipe_actor, pid),
    FIELD(upipe_actor, gen),
    FIELD(upipe_actor, starttime),
    FIELD(upipe_actor, recs),
    SIZE(upipe_actor),
    FIELD(upipe_rec, op),
    FIELD(upipe_rec, ring),
    FIELD(upipe_rec, pos),
    FIELD(upipe_rec, n),
    FIELD(upipe_rec, src),
    SIZE(upipe_rec),
    FIELD(upipe_chunk, owner),
    FIELD(upipe_chunk, flags),
    FIELD(upipe_chunk, share),
    FIELD(upipe_chunk, holders),
    FIELD(upipe_chunk, rings),
    SIZE(upipe_chunk),
};

int64_t upipe_layout_offset(const char *name)
{
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i].name, name) == 0)
            return (int64_t)table[i].value;
    return -ENOENT;
}

int64_t upipe_layout_count(void)
{
    return (int64_t)(sizeof table / sizeof table[0]);
}

const char *upipe_layout_name(int64_t i)
{
    return (i >= 0 && i < upipe_layout_count()) ? table[i].name : NULL;
}
