/* The cffi view of upipe.h (out-of-line API mode: cffi checks every line against upipe.h when it
 * compiles the module). Only the public API: the shared structs stay opaque to Python. */
#define UPIPE_ABI_VERSION ...
#define UPIPE_KIND_BYTES ...
#define UPIPE_MAX_HOLDS ...
#define UPIPE_MAX_CLASSES ...
#define UPIPE_MAX_DATA_RINGS ...
#define UPIPE_MAX_ACTORS ...
#define UPIPE_KIND_TOMBSTONE ...
#define UPIPE_SLOT_HEADER ...
#define UPIPE_MAX_FDS ...

typedef struct upipe_handle upipe_handle;

struct upipe_config {
    uint32_t ndata_rings;
    uint32_t slot_size;
    uint64_t capacity;
    uint32_t nclasses;
    uint32_t reserved;
    uint64_t limit;
    uint64_t chunk_size[8];
    uint32_t nchunks[8];
    uint64_t ring_limit[64];
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
int64_t upipe_segment_size(const struct upipe_config *cfg);
int upipe_create(const struct upipe_config *cfg, upipe_handle **out);
int upipe_attach(int memfd, int efd_data, int efd_space, int64_t timeout_ns, upipe_handle **out);
int upipe_attach_fds(int memfd, const int *efds, uint32_t nefds, int64_t timeout_ns,
                     upipe_handle **out);
void upipe_handle_ref(upipe_handle *h);
void upipe_handle_unref(upipe_handle *h);
/* Leave the process table now (exit without finalizers); returns chunks handed back. */
int upipe_detach_now(upipe_handle *h);
int upipe_fd(upipe_handle *h, int which);
int upipe_nfds(upipe_handle *h);
uint32_t upipe_ndata_rings(upipe_handle *h);
uint8_t *upipe_base(upipe_handle *h);
uint32_t upipe_inline_max(upipe_handle *h, uint32_t ring);
int upipe_set_spin(upipe_handle *h, int64_t spin_ns);

int64_t upipe_put(upipe_handle *h, uint32_t ring, const char *data, uint32_t len, uint16_t kind,
                  const char *meta, uint16_t meta_len);
int64_t upipe_put_many(upipe_handle *h, uint32_t ring, const char *data, const uint32_t *lens,
                       uint32_t n, uint16_t kind);
int64_t upipe_put_chunk(upipe_handle *h, uint32_t ring, uint32_t chunk, uint32_t len,
                        uint16_t kind, const char *meta, uint16_t meta_len);
int upipe_put_shared(upipe_handle *h, uint64_t rings, uint32_t chunk, uint32_t len,
                     uint16_t kind, const char *meta, uint16_t meta_len, uint64_t *done_out,
                     uint64_t *closed_out);
int64_t upipe_get(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                  uint32_t *chunk_out);
int64_t upipe_get_many(upipe_handle *h, uint32_t ring, uint16_t kind, char *out,
                       uint64_t outcap, uint32_t *ends, uint32_t maxn);
/* At-least-once: take (slot kept until the ack), ack, nack (put it back now). */
int64_t upipe_take(upipe_handle *h, uint32_t ring, char *out, uint32_t outcap,
                   uint32_t *chunk_out, uint64_t *receipt_out);
int upipe_ack(upipe_handle *h, uint64_t receipt);
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
int64_t upipe_take_next(struct upipe_takebuf *b);
/* The common length of n items given their end offsets, or UINT32_MAX if they differ. */
uint32_t upipe_uniform_length(const uint32_t *ends, uint32_t n);
int64_t upipe_alloc(upipe_handle *h, uint64_t nbytes, uint32_t *chunk_out);
int upipe_free(upipe_handle *h, uint32_t chunk);
uint8_t *upipe_chunk_ptr(upipe_handle *h, uint32_t chunk);
int64_t upipe_chunk_size(upipe_handle *h, uint32_t chunk);
int64_t upipe_chunk_of(upipe_handle *h, const uint8_t *addr, uint64_t len);
int upipe_chunk_held(upipe_handle *h, uint32_t chunk);
/* 1 if the chunk is shared (upipe_put_shared): its bytes are seen by several holders. */
int upipe_chunk_shared(upipe_handle *h, uint32_t chunk);
int upipe_class_for(upipe_handle *h, uint64_t nbytes);

int upipe_wait(upipe_handle *h, uint32_t ring, int what, int64_t deadline_ns);
/* Spin only (no sleep) up to spin_ns for the condition: 1 if it holds, else 0. */
int upipe_spin(upipe_handle *h, uint32_t ring, int what, int64_t spin_ns);
int upipe_async_waiter(upipe_handle *h, uint32_t ring, int what, int delta);
int upipe_ready(upipe_handle *h, uint32_t ring, int what);
uint32_t upipe_async_waiters(upipe_handle *h, uint32_t ring, int what);
void upipe_async_kick(upipe_handle *h, uint32_t ring, int what);
int upipe_close(upipe_handle *h, uint32_t ring);
int upipe_is_closed(upipe_handle *h, uint32_t ring);
int upipe_recover(upipe_handle *h);
/* Tests only: leave a slot half-done as a SIGKILL would; the caller then kills itself.
 * 0 put claimed, 1 put stamped, 2 get claimed, 3 take held, 4 + k: nack cut after step k;
 * shared chunks: 16 + k put_shared, 19 + k take/free/ack, 22 + k take/ack, 25 + k free,
 * 28/29 get, each cut after step k (upipe.h has the steps). */
int upipe_debug_abandon(upipe_handle *h, uint32_t ring, int what);
int upipe_stats(upipe_handle *h, uint32_t ring, struct upipe_stats *out);
int upipe_pid_alive(uint32_t pid, uint64_t starttime);
uint64_t upipe_pid_starttime(uint32_t pid);

int64_t upipe_layout_offset(const char *name);
int64_t upipe_layout_count(void);
const char *upipe_layout_name(int64_t i);
