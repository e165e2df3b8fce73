/* The I/O engine: asynchronous reads and writes of large requests into the
 * staging pool's buffers.
 *
 * Two implementations behind one interface: io_uring (liburing 2.3 API only,
 * registered buffers) and a pread/pwrite thread pool used where io_uring is
 * unavailable (ENOSYS, EPERM, EOPNOTSUPP, a seccomp refusal) or when asked for
 * (--io pread). Both return identical bytes.
 *
 * Each caller request is cut into pieces of at most max_piece_bytes, and at
 * most queue_depth pieces are in flight (the back-pressure; the rest wait
 * inside the engine, in submission order). Short reads and -EAGAIN are
 * re-queued inside the engine; a read that hits end of file before `len`
 * bytes completes with -ENODATA (the input changed underneath us), unless
 * it asked for its first `need` bytes only and got them (an O_DIRECT read,
 * rounded up to whole blocks, may reach past the end of the file). Any other
 * error completes the request with that -errno and stops issuing its
 * remaining pieces.
 *
 * Fault seam: before issuing each piece (not before re-queueing the rest of a
 * short one) the engine asks ms_fault_hit(MS_FAULT_READ or MS_FAULT_WRITE); a
 * hit completes that request with -EIO. Pieces are issued in submission order,
 * so the N-th call is the same piece on every run and with either engine.
 *
 * Environment (read at each io_engine_open):
 *   MERGESTREAM_IO_URING_DISABLE=1 makes io_uring look unavailable (as if the
 *   ring setup returned -ENOSYS).
 *   MERGESTREAM_IO_SHORT=N (tests only) makes every transfer count as at most
 *   N bytes and every third one as -EAGAIN, so the re-queue paths run on
 *   demand with either engine. The bytes past N are transferred again, which
 *   is harmless: a read or write at a fixed offset is idempotent. On an
 *   O_DIRECT descriptor N must be a multiple of the block size (a re-queued
 *   rest must start on a block).
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

/* One caller request. The caller owns it and must keep it (and buf) alive
 * until it is returned by io_engine_reap. The engine-private fields are
 * (re)initialised by io_engine_submit and touched only by the thread that
 * calls submit/reap. */
typedef struct io_request {
    io_op op;
    int fd;
    uint64_t offset;
    uint64_t len;
    void *buf;
    uint64_t need;     /* reads: 0 (all len bytes), or the bytes that must
                          arrive; the file may end anywhere after them */
    void *user;        /* the caller's tag, untouched */
    int result;        /* set at completion: 0, or -errno */
    /* engine-private bookkeeping */
    uint64_t done_bytes;       /* bytes transferred by finished pieces */
    uint64_t issued_bytes;     /* bytes handed to pieces so far */
    unsigned pieces_in_flight; /* pieces issued and not yet completed */
    struct io_request *next_free; /* link in the engine's pending/done lists */
} io_request;

typedef struct io_engine_config {
    io_engine_kind kind;
    unsigned queue_depth;        /* max pieces in flight; 1..256, 0 = 32 */
    uint64_t max_piece_bytes;    /* 1 B..1 GiB, 0 = 4 MiB; 1..8 MiB suggested */
    const struct iovec *regions; /* buffers to register with io_uring (may be NULL);
                                    only read during io_engine_open */
    unsigned n_regions;
    unsigned pread_threads;      /* pread pool size; 1..256, 0 = 4 */
} io_engine_config;

typedef struct io_engine io_engine;

/* Counters since io_engine_open (caller thread's view; for tests and benches). */
typedef struct io_engine_stats {
    uint64_t pieces;          /* pieces issued (fault-seam calls included) */
    uint64_t fixed_pieces;    /* issues (re-issues included) with a registered buffer */
    uint64_t requeued_pieces; /* re-issues after a short transfer or -EAGAIN */
    uint64_t bytes;           /* bytes transferred */
    unsigned peak_in_flight;  /* most pieces in flight at once (<= queue_depth) */
    bool registered;          /* cfg->regions are registered with the ring */
} io_engine_stats;

/* Opens an engine. Returns 0 and *out, or -1 with err set (MS_EXIT_USAGE for
 * an out-of-range config, MS_EXIT_RUNTIME otherwise). With IO_ENGINE_AUTO a
 * ring that cannot be set up is logged once ("io_uring unavailable (...):
 * using pread") and replaced by the pread pool. Buffers that cannot be
 * registered are logged once and the ring is kept without registration (any
 * kind). */
int io_engine_open(const io_engine_config *cfg, io_engine **out, ms_error *err);

/* Queues req. Never blocks for I/O completion; requests beyond the in-flight
 * cap wait inside the engine. Returns 0; -EINVAL (req not queued) for a
 * malformed request (op, NULL buf with len > 0, offset + len beyond
 * INT64_MAX, need > len or on a write); or the engine's -errno if the engine is broken. A zero-length
 * request completes at once with result 0. */
int io_engine_submit(io_engine *e, io_request *req);

/* Returns up to max finished requests in done[], in completion order. With
 * wait=true blocks until at least one is finished (or nothing is outstanding:
 * then returns 0 at once). Returns the number returned, or -errno on an
 * engine failure (the engine is then broken: close it). */
int io_engine_reap(io_engine *e, io_request **done, int max, bool wait);

/* Requests submitted and not yet reaped. */
unsigned io_engine_outstanding(const io_engine *e);

/* "io_uring" or "pread". */
const char *io_engine_name(const io_engine *e);

/* Fills *out with the engine's counters. */
void io_engine_get_stats(const io_engine *e, io_engine_stats *out);

/* Waits for everything outstanding (issuing what is still pending), then
 * frees the engine; finished requests that were not reaped keep their
 * result. NULL is a no-op. */
void io_engine_close(io_engine *e);

#endif
