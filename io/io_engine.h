/* The I/O engine: asynchronous reads and writes of large requests into the
 * staging pool's buffers.
 *
 * Two implementations behind one interface: io_uring (liburing 2.3 API only,
 * registered buffers, at most queue_depth requests in flight, each caller
 * request cut into pieces of at most max_piece_bytes) and a pread/pwrite
 * thread pool used where io_uring is unavailable (ENOSYS, EPERM, EOPNOTSUPP,
 * a seccomp refusal) or when asked for (--io pread). Both return identical
 * bytes. Short reads and -EAGAIN are re-queued inside the engine; a read that
 * hits end of file before `len` bytes completes with -ENODATA (the input
 * changed underneath us).
 *
 * Threading: one thread (the stage that owns the engine) calls submit and
 * reap; the engine may run helper threads internally. */
#ifndef MS_IO_ENGINE_H
#define MS_IO_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/ms_error.h"

typedef enum io_engine_kind {
    IO_ENGINE_AUTO,  /* io_uring, else pread with one log line saying why */
    IO_ENGINE_URING, /* io_uring or fail */
    IO_ENGINE_PREAD,
} io_engine_kind;

typedef enum io_op { IO_OP_READ, IO_OP_WRITE } io_op;

/* One caller request. The caller owns it and must keep it alive until it is
 * returned by io_engine_reap. */
typedef struct io_request {
    io_op op;
    int fd;
    uint64_t offset;
    uint64_t len;
    void *buf;
    void *user;        /* the caller's tag, untouched */
    int result;        /* set at completion: 0, or -errno */
    /* engine-private bookkeeping */
    uint64_t done_bytes;
    unsigned pieces_in_flight;
    struct io_request *next_free;
} io_request;

typedef struct io_engine_config {
    io_engine_kind kind;
    unsigned queue_depth;        /* max pieces in flight; 1..256, default 32 */
    uint64_t max_piece_bytes;    /* default 4 MiB; 1..8 MiB suggested */
    const struct iovec *regions; /* buffers to register with io_uring (may be NULL) */
    unsigned n_regions;
    unsigned pread_threads;      /* pread pool size; 0 = 4 */
} io_engine_config;

typedef struct io_engine io_engine;

/* Opens an engine. Returns 0 and *out, or -1 with err set. With
 * IO_ENGINE_AUTO a ring that cannot be set up (or buffers that cannot be
 * registered: then the ring is kept without registration) is logged once and
 * replaced by the pread pool. */
int io_engine_open(const io_engine_config *cfg, io_engine **out, ms_error *err);

/* Queues req. Never blocks for I/O completion; requests beyond the in-flight
 * cap wait inside the engine. Returns 0, or -errno if the engine is broken. */
int io_engine_submit(io_engine *e, io_request *req);

/* Returns up to max finished requests in done[]. With wait=true blocks until
 * at least one is finished (or nothing is outstanding: then returns 0).
 * Returns the number returned, or -errno on an engine failure. */
int io_engine_reap(io_engine *e, io_request **done, int max, bool wait);

/* Requests submitted and not yet reaped. */
unsigned io_engine_outstanding(const io_engine *e);

/* "io_uring" or "pread". */
const char *io_engine_name(const io_engine *e);

/* Waits for everything outstanding, then frees the engine. NULL is a no-op. */
void io_engine_close(io_engine *e);

#endif
