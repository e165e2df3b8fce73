/* The I/O engine's public functions and everything about caller requests:
 * cutting them into pieces, the in-flight cap (the back-pressure), the fault
 * seam, re-queueing short transfers, and completing requests. The backends
 * (io_uring_engine.c, io_pread_engine.c) only move pieces; see
 * io_engine_impl.h. Everything here runs on the caller's thread. */
#include "io/io_engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/io_engine_impl.h"
#include "io/ms_fault.h"

#define IO_ENGINE_DEFAULT_QUEUE_DEPTH 32u
#define IO_ENGINE_MAX_QUEUE_DEPTH 256u
#define IO_ENGINE_DEFAULT_PIECE (4ull << 20)
/* io_uring takes a 32-bit length and the kernel caps one read at 2 GiB - 4 KiB. */
#define IO_ENGINE_MAX_PIECE (1ull << 30)
#define IO_ENGINE_DEFAULT_THREADS 4u
#define IO_ENGINE_MAX_THREADS 256u
#define IO_ENGINE_COLLECT_BATCH 64

/* ---------------------------------------------------------------- lists */

static void request_list_push(io_request **head, io_request **tail, io_request *r)
{
    r->next_free = NULL;
    if (*tail)
        (*tail)->next_free = r;
    else
        *head = r;
    *tail = r;
}

static io_request *request_list_pop(io_request **head, io_request **tail)
{
    io_request *r = *head;
    if (r) {
        *head = r->next_free;
        if (!*head)
            *tail = NULL;
        r->next_free = NULL;
    }
    return r;
}

/* ---------------------------------------------------------------- requests */

/* A request leaves the pending list once it is fully issued or has failed;
 * it is finished when, in addition, none of its pieces is in flight. */
static void request_settle(io_engine *e, io_request *r)
{
    bool issuing = r->result == 0 && r->issued_bytes < r->len;
    if (!issuing && r->pieces_in_flight == 0)
        request_list_push(&e->done_head, &e->done_tail, r);
}

static void piece_complete(io_engine *e, io_piece *p, int64_t res);

/* Hands p to the backend; a backend that cannot take it breaks the engine
 * and the piece completes with its error. */
static void piece_issue(io_engine *e, io_piece *p)
{
    int rc = e->vt->issue(e, p);
    if (rc < 0) {
        if (!e->broken)
            e->broken = rc;
        piece_complete(e, p, rc);
    }
}

static void piece_release(io_engine *e, io_piece *p)
{
    io_request *r = p->req;
    p->req = NULL;
    p->next = e->free_pieces;
    e->free_pieces = p;
    MS_ASSERT(r->pieces_in_flight > 0 && e->pieces_in_flight > 0);
    r->pieces_in_flight--;
    e->pieces_in_flight--;
    /* A failed request stops issuing: only the pending head can have pieces
     * in flight, so that is the only place it can be. */
    if (r->result != 0 && e->pending_head == r)
        request_list_pop(&e->pending_head, &e->pending_tail);
    request_settle(e, r);
}

/* Accounts one finished transfer of p: res bytes (0..p->len) or -errno. */
static void piece_complete(io_engine *e, io_piece *p, int64_t res)
{
    io_request *r = p->req;
    bool may_retry = r->result == 0 && !e->broken;
    if ((res == -EAGAIN || res == -EINTR) && may_retry) {
        e->stats.requeued_pieces++;
        piece_issue(e, p);
        return;
    }
    if (res >= 0 && (uint64_t)res < p->len && r->need && p->offset + (uint64_t)res >= r->offset + r->need) {
        /* the end of the file, after everything the request needs */
        r->done_bytes += (uint64_t)res;
        e->stats.bytes += (uint64_t)res;
        piece_release(e, p);
        return;
    }
    if (res > 0) {
        MS_ASSERT((uint64_t)res <= p->len);
        r->done_bytes += (uint64_t)res;
        e->stats.bytes += (uint64_t)res;
        if ((uint64_t)res < p->len) {
            if (may_retry) {
                p->offset += (uint64_t)res;
                p->buf += res;
                p->len -= (uint64_t)res;
                e->stats.requeued_pieces++;
                piece_issue(e, p);
                return;
            }
            if (r->result == 0) /* cannot finish it: the engine broke */
                r->result = e->broken;
        }
    } else if (res == 0) {
        /* A read of 0 bytes before the end: the file got shorter. A write
         * that makes no progress would loop forever: report it as EIO. */
        if (r->result == 0)
            r->result = p->op == IO_OP_READ ? -ENODATA : -EIO;
    } else if (r->result == 0) {
        r->result = (int)res;
    }
    piece_release(e, p);
}

/* Issues pieces of pending requests, in submission order, while the
 * in-flight cap allows. */
static void engine_pump(io_engine *e)
{
    while (e->free_pieces && e->pending_head && !e->broken) {
        io_request *r = e->pending_head;
        uint64_t n = r->len - r->issued_bytes;
        if (n > e->max_piece_bytes)
            n = e->max_piece_bytes;
        e->stats.pieces++;
        if (ms_fault_hit(r->op == IO_OP_READ ? MS_FAULT_READ : MS_FAULT_WRITE)) {
            r->result = -EIO;
            request_list_pop(&e->pending_head, &e->pending_tail);
            request_settle(e, r);
            continue;
        }
        io_piece *p = e->free_pieces;
        e->free_pieces = p->next;
        p->next = NULL;
        p->req = r;
        p->op = r->op;
        p->fd = r->fd;
        p->offset = r->offset + r->issued_bytes;
        p->len = n;
        p->buf = (char *)r->buf + r->issued_bytes;
        p->result = 0;
        r->issued_bytes += n;
        r->pieces_in_flight++;
        e->pieces_in_flight++;
        if (e->pieces_in_flight > e->stats.peak_in_flight)
            e->stats.peak_in_flight = e->pieces_in_flight;
        if (r->issued_bytes == r->len)
            request_list_pop(&e->pending_head, &e->pending_tail);
        piece_issue(e, p);
    }
}

static int engine_flush(io_engine *e)
{
    if (e->broken)
        return e->broken;
    int rc = e->vt->flush(e);
    if (rc < 0)
        e->broken = rc;
    return rc;
}

/* Collects finished pieces (blocking for one when wait), accounts them and
 * issues what the freed slots allow. Needs a piece in flight. */
static int engine_progress(io_engine *e, bool wait)
{
    MS_ASSERT(e->pieces_in_flight > 0);
    io_piece *batch[IO_ENGINE_COLLECT_BATCH];
    int n = e->vt->collect(e, batch, IO_ENGINE_COLLECT_BATCH, wait);
    if (n < 0) {
        if (!e->broken)
            e->broken = n;
        return n;
    }
    for (int i = 0; i < n; i++) {
        int64_t res = batch[i]->result;
        if (e->test_short && res > 0) {
            if (++e->test_completions % 3 == 0)
                res = -EAGAIN;
            else if ((uint64_t)res > e->test_short)
                res = (int64_t)e->test_short;
        }
        piece_complete(e, batch[i], res);
    }
    engine_pump(e);
    return engine_flush(e);
}

/* ---------------------------------------------------------------- public */

int io_engine_open(const io_engine_config *cfg, io_engine **out, ms_error *err)
{
    MS_ASSERT(cfg && out);
    *out = NULL;
    io_engine_config c = *cfg;
    if (c.queue_depth == 0)
        c.queue_depth = IO_ENGINE_DEFAULT_QUEUE_DEPTH;
    if (c.max_piece_bytes == 0)
        c.max_piece_bytes = IO_ENGINE_DEFAULT_PIECE;
    if (c.pread_threads == 0)
        c.pread_threads = IO_ENGINE_DEFAULT_THREADS;
    if (c.kind != IO_ENGINE_AUTO && c.kind != IO_ENGINE_URING && c.kind != IO_ENGINE_PREAD)
        return ms_error_set(err, MS_EXIT_USAGE, "io engine", "unknown kind %d", (int)c.kind);
    if (c.queue_depth > IO_ENGINE_MAX_QUEUE_DEPTH)
        return ms_error_set(err, MS_EXIT_USAGE, "io engine", "queue depth %u is out of range (1..%u)",
                            c.queue_depth, IO_ENGINE_MAX_QUEUE_DEPTH);
    if (c.max_piece_bytes > IO_ENGINE_MAX_PIECE)
        return ms_error_set(err, MS_EXIT_USAGE, "io engine",
                            "piece size %llu is out of range (1..%llu bytes)",
                            (unsigned long long)c.max_piece_bytes, IO_ENGINE_MAX_PIECE);
    if (c.pread_threads > IO_ENGINE_MAX_THREADS)
        return ms_error_set(err, MS_EXIT_USAGE, "io engine", "%u pread threads is out of range (1..%u)",
                            c.pread_threads, IO_ENGINE_MAX_THREADS);
    if (c.n_regions > 0 && !c.regions)
        return ms_error_set(err, MS_EXIT_USAGE, "io engine", "%u buffer regions given as NULL",
                            c.n_regions);

    io_engine *e = calloc(1, sizeof *e);
    if (!e)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "io engine", "allocating the engine");
    e->queue_depth = c.queue_depth;
    e->max_piece_bytes = c.max_piece_bytes;
    const char *short_env = getenv("MERGESTREAM_IO_SHORT");
    if (short_env && *short_env)
        e->test_short = strtoull(short_env, NULL, 10);
    e->pieces = calloc(c.queue_depth, sizeof *e->pieces);
    if (!e->pieces) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "io engine", "allocating %u pieces", c.queue_depth);
        goto fail;
    }
    for (unsigned i = c.queue_depth; i-- > 0;) {
        e->pieces[i].next = e->free_pieces;
        e->free_pieces = &e->pieces[i];
    }

    if (c.kind != IO_ENGINE_PREAD) {
        int rc = io_engine_uring_open(e, &c);
        if (rc == 0)
            goto done;
        if (c.kind == IO_ENGINE_URING) {
            ms_error_errno(err, MS_EXIT_RUNTIME, -rc, "io_uring", "cannot set up a ring of %u entries",
                           c.queue_depth);
            goto fail;
        }
        ms_log_warn("io_uring unavailable (%s): using pread", strerror(-rc));
    }
    int rc = io_engine_pread_open(e, &c);
    if (rc < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, -rc, "pread engine", "cannot start %u threads",
                       c.pread_threads);
        goto fail;
    }
done:
    *out = e;
    return 0;
fail:
    free(e->pieces);
    free(e);
    return -1;
}

int io_engine_submit(io_engine *e, io_request *req)
{
    MS_ASSERT(e && req);
    if (e->broken)
        return e->broken;
    if (req->op != IO_OP_READ && req->op != IO_OP_WRITE)
        return -EINVAL;
    if (req->len > 0 && !req->buf)
        return -EINVAL;
    if (req->offset > (uint64_t)INT64_MAX || req->len > (uint64_t)INT64_MAX - req->offset)
        return -EINVAL;
    if (req->need > req->len || (req->need && req->op != IO_OP_READ))
        return -EINVAL;
    req->result = 0;
    req->done_bytes = 0;
    req->issued_bytes = 0;
    req->pieces_in_flight = 0;
    req->next_free = NULL;
    e->outstanding++;
    if (req->len == 0) {
        request_list_push(&e->done_head, &e->done_tail, req);
        return 0;
    }
    request_list_push(&e->pending_head, &e->pending_tail, req);
    engine_pump(e);
    return engine_flush(e);
}

int io_engine_reap(io_engine *e, io_request **done, int max, bool wait)
{
    MS_ASSERT(e && (done || max == 0));
    if (max < 0)
        return -EINVAL;
    if (e->broken)
        return e->broken;
    if (e->pieces_in_flight > 0) {
        int rc = engine_progress(e, false);
        if (rc < 0)
            return rc;
    }
    while (wait && !e->done_head && e->outstanding > 0) {
        /* Outstanding and not done means pending or in flight, and pending
         * with nothing in flight cannot be: engine_pump fills free slots. */
        MS_ASSERT(e->pieces_in_flight > 0);
        int rc = engine_progress(e, true);
        if (rc < 0)
            return rc;
    }
    int n = 0;
    while (n < max && e->done_head) {
        done[n++] = request_list_pop(&e->done_head, &e->done_tail);
        e->outstanding--;
    }
    return n;
}

unsigned io_engine_outstanding(const io_engine *e)
{
    MS_ASSERT(e);
    return e->outstanding;
}

const char *io_engine_name(const io_engine *e)
{
    MS_ASSERT(e);
    return e->vt->name;
}

void io_engine_get_stats(const io_engine *e, io_engine_stats *out)
{
    MS_ASSERT(e && out);
    *out = e->stats;
}

void io_engine_close(io_engine *e)
{
    if (!e)
        return;
    /* The kernel or a worker may still write into the caller's buffers and
     * our piece table: wait for every piece, issuing what is pending. */
    while (!e->broken && (e->pieces_in_flight > 0 || e->pending_head)) {
        MS_ASSERT(e->pieces_in_flight > 0);
        if (engine_progress(e, true) < 0)
            break;
    }
    e->vt->destroy(e);
    free(e->pieces);
    free(e);
}
