/*
 * upipe.h - the C core's public API: one shared-memory segment with data rings and chunk pools.
 *
 * Conventions: every function returns 0, a count, or a negative errno; none prints or aborts.
 *   -EINVAL   bad arguments            -EMSGSIZE  payload larger than the slot / largest chunk
 *   -ENOBUFS  ring full / no free chunk -ENOENT   ring empty
 *   -EAGAIN   next item is being written by a producer (or its writer died; recovery will fix it)
 *   -EPIPE    ring closed (put), or closed and drained (get)
 *   -EPERM    chunk not held by this process   -EUSERS  actor table full
 *   -EPROTO   not a upipe segment / corrupt header
 *   -EPROTONOSUPPORT  layout or ABI version differs   -ETIMEDOUT  timed out / creator hung
 *   -ENOSPC / -ENOMEM  the memory for the segment could not be reserved
 *   -EDQUOT   this process already holds UPIPE_MAX_HOLDS unacked takes
 *   -EBUSY    the chunk is named by an unacked take (put_chunk) / another process recovers
 *   -ESTALE   an ack found its slot taken away (recovery redelivered it)
 * The C side is the same in every process; everything process-local lives in upipe_handle.
 */
#ifndef UPIPE_H
#define UPIPE_H

#include <stdint.h>

#define UPIPE_ABI_VERSION 4 /* 4: shared chunks, rings in the fast paths, fds per ring */
#define UPIPE_KIND_BYTES 1
/* Unacked takes one process may hold per segment: each keeps a journal entry busy, and the
 * other half of the 64 entries stays free for operations in flight. */
#define UPIPE_MAX_HOLDS 32
/* The memfd, then two eventfds per data ring (64 rings at most, as in upipe_layout.h). */
#define UPIPE_MAX_FDS (1 + 2 * 64)

typedef struct upipe_handle upipe_handle;

struct upipe_config {
    uint32_t ndata_rings; /* 1 .. 64 */
    uint32_t slot_size;   /* bytes per data-ring slot, 64 .. 65536, multiple of 8 (32 B header) */
    uint64_t capacity;    /* slots per data ring, power of two >= 2 */
    uint32_t nclasses;    /* chunk size classes, 0 .. 8 */
    uint32_t reserved;
    uint64_t limit;         /* most items per data ring (maxsize); 0 means capacity */
    uint64_t chunk_size[8]; /* ascending, multiples of 64 */
    uint32_t nchunks[8];    /* >= 1 each */
    uint64_t ring_limit[64]; /* most items in data ring i; 0 means limit */
};

struct upipe_stats {
    uint64_t capacity, count, head, tail;
    uint32_t closed, inline_max;
    uint64_t aborted_puts, lost_items, tombstones_skipped;
    uint64_t recoveries, reclaimed_chunks, lost_leases;
    uint32_t actors, nclasses;
    uint64_t class_size[8], class_total[8], class_free[8];
    uint64_t segment_size;
    uint64_t redelivered;
};

enum upipe_wait_what { UPIPE_WAIT_READABLE = 0, UPIPE_WAIT_WRITABLE = 1, UPIPE_WAIT_CHUNK = 2 };

int upipe_abi_version(void);

/* Bytes the segment for cfg takes, or -EINVAL. */
int64_t upipe_segment_size(const struct upipe_config *cfg);
/* Create a segment (memfd, reserved up front) and attach to it. */
int upipe_create(const struct upipe_config *cfg, upipe_handle **out);
/* Attach to a segment created elsewhere; the fds are duplicated, the caller keeps its own. */
int upipe_attach(int memfd, int efd_data, int efd_space, int64_t timeout_ns, upipe_handle **out);
/* Any segment: efds are the 2 * ndata_rings eventfds, in upipe_fd's order (fd 1 on). */
int upipe_attach_fds(int memfd, const int *efds, uint32_t nefds, int64_t timeout_ns,
                     upipe_handle **out);
/* Handles are reference counted: each live lease holds one, so the mapping outlives every view. */
void upipe_handle_ref(upipe_handle *h);
void upipe_handle_unref(upipe_handle *h);
/* Leave the process table now (exit without finalizers); returns chunks handed back. */
int upipe_detach_now(upipe_handle *h);
/* fd 0: the memfd; 1 + 2i: eventfd rung for data in ring i; 2 + 2i: for space in ring i (and
 * fd 2 for free chunks too). upipe_nfds: how many (1 + 2 * ndata_rings). */
int upipe_fd(upipe_handle *h, int which);
int upipe_nfds(upipe_handle *h);
uint32_t upipe_ndata_rings(upipe_handle *h);
uint8_t *upipe_base(upipe_handle *h);
uint32_t upipe_inline_max(upipe_handle *h, uint32_t ring);
int upipe_set_spin(upipe_handle *h, int64_t spin_ns);

/* Non-blocking operations. */
int64_t upipe_put(upipe_handle *h, uint32_t ring, const char *data, uint32_t len, uint16_t kind,
                  const char *meta, uint16_t meta_len);
int64_t upipe_put_many(upipe_handle *h, uint32_t ring, const char *data, const uint32_t *lens,
                       uint32_t n, uint16_t kind);
int64_t upipe_put_chunk(upipe_handle *h, uint32_t ring, uint32_t chunk, uint32_t len,
                        uint16_t kind, const char *meta, uint16_t meta_len);
/*
 * Fan-out without copies: put one chunk into every data ring whose bit is set in rings (bit i:
 * ring i). The first call makes the caller's chunk shared (it must hold it, not as an unacked
 * take: -EBUSY); the chunk then stays held by the caller as well, until upipe_free. Rings with
 * no room are left out of *done_out (wait and call again for them); closed rings go in
 * *closed_out. Each consumer gets the chunk read-only in effect: every holder sees the same
 * bytes. 0, or -EINVAL, -EMSGSIZE, -EPERM (not held), -EBUSY (already queued in one of them).
 * A shared chunk is held per process, not per get: a process that has it from several rings
 * (or from its own fan-out, or again after a nack) holds it once, and one upipe_free lets go
 * of it. A caller with several references in one process counts them and frees on the last,
 * and makes that count one step with its gets and takes (a get in flight may be acquiring the
 * chunk the last free lets go of); acks and nacks need no such care.
 * The -EBUSY check is not atomic: two holders that put_shared one chunk into the same ring at
 * the same moment both succeed, and the chunk may then be freed while one of the slots still
 * names it. Never put one chunk from two threads or processes at once.
 */
int upipe_put_shared(upipe_handle *h, uint64_t rings, uint32_t chunk, uint32_t len,
                     uint16_t kind, const char *meta, uint16_t meta_len, uint64_t *done_out,
                     uint64_t *closed_out);
/* >= 0: kind << 48 | meta_len << 32 | len. Meta (and an inline payload) is copied to out; a
 * chunk payload stays in the chunk, now held by this process, id in *chunk_out (else UINT32_MAX). */
int64_t upipe_get(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                  uint32_t *chunk_out);
/* Up to maxn consecutive inline items of this kind without meta; ends[i] = end offset in out.
 * Returns the count, -ENOENT/-EAGAIN/-EPIPE as upipe_get, or -EBADMSG when the next item is of
 * another shape (use upipe_get for it). */
int64_t upipe_get_many(upipe_handle *h, uint32_t ring, uint16_t kind, char *out,
                       uint64_t outcap, uint32_t *ends, uint32_t maxn);
/*
 * At-least-once delivery (docs/design.md, "Take and ack").
 * upipe_take: as upipe_get, but the slot is not released: the item stays intact in it until
 * upipe_ack, and if this process dies first (or detaches) the item is put back into the ring
 * for another consumer. A chunk item's chunk is held as by upipe_get, but upipe_free of it is
 * deferred to the ack (and upipe_put_chunk of it refused with -EBUSY) until then.
 * *receipt_out: a 64-bit receipt, unique for the life of the handle (never 0).
 * Returns as upipe_get, or -EDQUOT (UPIPE_MAX_HOLDS unacked takes already). On a closed ring,
 * get and take say -EPIPE only once no slot is held by a take of another thread or process
 * (its item may come back); until then -EAGAIN.
 * Every unacked take keeps one slot busy: producers stall when the ring wraps round to it.
 */
int64_t upipe_take(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                   uint32_t *chunk_out, uint64_t *receipt_out);
/* Done with a take: release its slot (and a chunk dropped meanwhile). 0; -ENOENT not an
 * outstanding receipt of this handle (acked already, never issued); -ESTALE the slot had been
 * taken away (only if recovery wrongly judged this process dead; the item was redelivered). */
int upipe_ack(upipe_handle *h, uint64_t receipt);
/* Give a take back now: its item is put back into the ring, as if this process had died. 0;
 * -ENOENT as upipe_ack; -ENOBUFS no room yet (still held: try again). The chunk of a chunk item
 * goes with it: stop using its pointer. A shared chunk (upipe_chunk_shared) stays held by this
 * process as after a get (holders are per process): upipe_free it as usual. */
int upipe_nack(upipe_handle *h, uint64_t receipt);
/* The bytes fast paths: kind UPIPE_KIND_BYTES, inline, no meta; the fewest arguments
 * cffi has to convert. upipe_get_bytes returns the length, or -EBADMSG (nothing taken) when the
 * next item is of another shape. */
int64_t upipe_put_bytes(upipe_handle *h, uint32_t ring, const char *data, uint32_t len);
int64_t upipe_get_bytes(upipe_handle *h, uint32_t ring, uint32_t outcap, char *out);
/* upipe_get_bytes with everything in one argument: cffi converts one pointer, not three. */
struct upipe_getbuf {
    upipe_handle *h;
    uint32_t cap;
    uint32_t ring;
    char data[];
};
int64_t upipe_get_into(struct upipe_getbuf *b);
/* upipe_take with everything in one argument (cffi converts one pointer): the next item is
 * taken whatever its shape; an inline item is copied to data (meta first), and the chunk
 * (UINT32_MAX for an inline item) and the receipt come back in the struct. */
struct upipe_takebuf {
    upipe_handle *h;
    uint32_t cap;     /* bytes at data: at least inline_max */
    uint32_t chunk;   /* out */
    uint64_t receipt; /* out */
    uint32_t ring;
    uint32_t reserved;
    uint64_t held; /* upipe_take_next: the receipt it acks first (0: none); the new take's */
    int64_t item;  /* upipe_take_next: the take's full result when it is not plain bytes */
    char data[];
};
int64_t upipe_take_into(struct upipe_takebuf *b);
/* A consumer's loop in one call: ack b->held (if any), then take the next item; its receipt
 * goes to b->held (and b->receipt). Returns the length of an inline item of kind bytes without
 * meta (its bytes at data); -EBADMSG when the item taken is of another shape (b->item holds
 * what upipe_take returned, b->chunk its chunk); the errors of upipe_take; or
 * -ENOTRECOVERABLE if the ack was refused (held was not an outstanding receipt). */
int64_t upipe_take_next(struct upipe_takebuf *b);
/* The common length of n items given their end offsets, or UINT32_MAX if they differ. */
uint32_t upipe_uniform_length(const uint32_t *ends, uint32_t n);
int64_t upipe_alloc(upipe_handle *h, uint64_t nbytes, uint32_t *chunk_out);
int upipe_free(upipe_handle *h, uint32_t chunk);
uint8_t *upipe_chunk_ptr(upipe_handle *h, uint32_t chunk);
int64_t upipe_chunk_size(upipe_handle *h, uint32_t chunk);
/* Chunk id of the chunk containing [addr, addr + len), or -ENOENT. */
int64_t upipe_chunk_of(upipe_handle *h, const uint8_t *addr, uint64_t len);
int upipe_chunk_held(upipe_handle *h, uint32_t chunk);
/* 1 if the chunk is shared (upipe_put_shared): its bytes are seen by several holders. */
int upipe_chunk_shared(upipe_handle *h, uint32_t chunk);
/* Smallest size class holding nbytes (for UPIPE_WAIT_CHUNK), or -EMSGSIZE. */
int upipe_class_for(upipe_handle *h, uint64_t nbytes);

/* Blocking: spin, then sleep on the condition's futex until ready, the deadline (absolute
 * CLOCK_MONOTONIC ns, < 0 for none), a signal (-EINTR) or a recovery slice. 0 means re-try. */
int upipe_wait(upipe_handle *h, uint32_t ring, int what, int64_t deadline_ns);
/* Spin only (no sleep) up to spin_ns for the condition: 1 if it holds, else 0. */
int upipe_spin(upipe_handle *h, uint32_t ring, int what, int64_t spin_ns);
/* Async waiters: +1 / -1 for this process, 0 to re-arm after draining the eventfd; returns 1 if
 * the condition holds now, else 0. */
int upipe_async_waiter(upipe_handle *h, uint32_t ring, int what, int delta);
/* Readiness, for the dispatcher that decides whether to pass a wakeup on. */
int upipe_ready(upipe_handle *h, uint32_t ring, int what);
uint32_t upipe_async_waiters(upipe_handle *h, uint32_t ring, int what);
/* Wake async waiters of other processes (the baton, see docs/futex.md). */
void upipe_async_kick(upipe_handle *h, uint32_t ring, int what);

int upipe_close(upipe_handle *h, uint32_t ring);
int upipe_is_closed(upipe_handle *h, uint32_t ring);
/* Repair what dead processes left half-done; returns how many dead processes were recovered. */
int upipe_recover(upipe_handle *h);
/* Tests only: leave a slot half-done as a SIGKILL would; the caller then kills itself.
 * 0 put claimed, 1 put stamped, 2 get claimed, 3 take held (no ack), 4 + k: take, then give
 * it back (nack) but stop after step k of the move (see redeliver() in upipe.c); -ERANGE if the
 * move finished before step k.
 * Shared chunks (fan-out), ring being the data ring it happens in:
 *   16 + k  upipe_put_shared of the lowest-numbered chunk this process holds into ring (its
 *           whole size as the payload, kind UPIPE_KIND_BYTES, no meta), stopped after step k:
 *           0 slot claimed, 1 slot written and stamped, 2 the ring's bit set (not published);
 *           -ENOBUFS if the ring had no room (nothing claimed).
 *   19 + k  upipe_take from ring (its item must be a shared chunk: else -EBADMSG), upipe_free
 *           of that chunk, then upipe_ack stopped after step k: 0 ACK journaled (the ack's own
 *           holder bit set), 1 the ring's bit cleared, 2 the slot released (the ack's holder
 *           bit not yet dropped).
 *   22 + k  the same without the upipe_free (this process keeps its reference).
 *   25 + k  upipe_free of the lowest-numbered shared chunk this process holds, stopped after
 *           step k: 0 its holder bit cleared (nobody has looked for the last reference yet),
 *           1 it won the right to free the chunk, 2 the chunk is its own again, not yet back in
 *           its pool; -ERANGE for k > 0 if that was not the last reference (nothing to free).
 *   28, 29  upipe_get from ring (a shared chunk item, else -EBADMSG), stopped after the holder
 *           bit (28) or after the ring's bit is cleared too (29); the slot stays claimed. */
int upipe_debug_abandon(upipe_handle *h, uint32_t ring, int what);
int upipe_stats(upipe_handle *h, uint32_t ring, struct upipe_stats *out);

/* Liveness of a pid as recovery sees it (tests use it): 1 alive, 0 dead or zombie. */
int upipe_pid_alive(uint32_t pid, uint64_t starttime);
uint64_t upipe_pid_starttime(uint32_t pid);

/* Compiled offsets of the shared structures by name ("upipe_ring.head", "sizeof(upipe_slot)"),
 * or -ENOENT; upipe_layout_name(i) lists them. Tests check docs/layout.md against these. */
int64_t upipe_layout_offset(const char *name);
int64_t upipe_layout_count(void);
const char *upipe_layout_name(int64_t i);

#endif /* UPIPE_H */
