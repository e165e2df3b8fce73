/* Private to io_engine.c, io_uring_engine.c and io_pread_engine.c: the piece
 * table, the backend vtable and the engine struct they share.
 *
 * io_engine.c owns everything about caller requests: cutting them into
 * pieces, the in-flight cap, the fault seam, short-transfer re-queueing and
 * request completion. A backend only moves pieces: issue() hands one to the
 * kernel or a worker, collect() returns finished ones with their raw result.
 * All request bookkeeping therefore happens on the caller's thread. */
#ifndef MS_IO_ENGINE_IMPL_H
#define MS_IO_ENGINE_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "io/io_engine.h"

/* One contiguous transfer of at most max_piece_bytes. Lives in the engine's
 * piece table (queue_depth entries); its address is the io_uring user_data.
 * The caller thread fills every field but `result` before issue(); the
 * backend writes `result` and hands the piece back through collect(). */
typedef struct io_piece {
    io_request *req;
    io_op op;
    int fd;
    uint64_t offset;         /* absolute file offset of buf[0] */
    uint64_t len;            /* bytes still to transfer, > 0 */
    char *buf;
    int64_t result;          /* bytes transferred (0..len) or -errno */
    struct io_piece *next;   /* free list (caller thread) or a backend queue */
} io_piece;

typedef struct io_engine_vtable {
    const char *name;
    /* Queues one piece. Returns 0, or -errno when the backend is broken (the
     * piece was not queued). Never blocks for I/O. */
    int (*issue)(io_engine *e, io_piece *p);
    /* Starts what issue() queued (io_uring_submit). Returns 0 or -errno. */
    int (*flush)(io_engine *e);
    /* Returns up to max finished pieces in out[], each with result set. With
     * wait=true blocks until at least one is finished; only called while at
     * least one piece is in flight. Returns the count or -errno (broken). */
    int (*collect)(io_engine *e, io_piece **out, int max, bool wait);
    /* Frees the backend. Called with nothing in flight (or a broken engine). */
    void (*destroy)(io_engine *e);
} io_engine_vtable;

/* Every field is written and read only by the thread that calls the public
 * functions, except inside `backend` (see each backend). */
struct io_engine {
    const io_engine_vtable *vt;
    void *backend;               /* the backend's private state */

    unsigned queue_depth;        /* pieces in flight, at most */
    uint64_t max_piece_bytes;

    io_piece *pieces;            /* [queue_depth] */
    io_piece *free_pieces;       /* unused entries of pieces[] */
    unsigned pieces_in_flight;   /* issued, not yet collected */

    io_request *pending_head;    /* submitted, not fully issued; FIFO. Only the */
    io_request *pending_tail;    /* head can have pieces issued */
    io_request *done_head;       /* finished, not yet reaped; FIFO */
    io_request *done_tail;
    unsigned outstanding;        /* submitted, not yet reaped */

    int broken;                  /* 0, or the -errno that broke the backend */
    uint64_t test_short;         /* MERGESTREAM_IO_SHORT: 0, or the most bytes a transfer counts */
    uint64_t test_completions;   /* completions seen while test_short is on */
    io_engine_stats stats;       /* fixed_pieces and registered come from the backend */
};

/* Backend constructors (called by io_engine_open on a zeroed engine whose
 * queue_depth and max_piece_bytes are set). Each sets e->vt and e->backend
 * and returns 0, or returns -errno with nothing to free. */

/* io_uring: -ENOSYS when MERGESTREAM_IO_URING_DISABLE=1; any ring setup or
 * probe failure is returned as is (the caller decides whether to fall back).
 * A failed buffer registration is logged (ms_log_warn) and not an error. */
int io_engine_uring_open(io_engine *e, const io_engine_config *cfg);

/* pread/pwrite pool of cfg->pread_threads threads (already defaulted). */
int io_engine_pread_open(io_engine *e, const io_engine_config *cfg);

/* The backend tells io_engine.c it used a registered buffer for a piece. */
static inline void io_engine_count_fixed(io_engine *e) { e->stats.fixed_pieces++; }

#endif
