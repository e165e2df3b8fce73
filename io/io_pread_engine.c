/* The pread/pwrite backend: a pool of worker threads fed by a bounded queue
 * of pieces (one mutex, two condition variables, a shutdown flag and a
 * broadcast; the I/O itself is done outside the lock). Finished pieces go on
 * a completion list that the caller's thread takes from in collect(),
 * waiting on a third condition variable when asked to block.
 *
 * A piece is handed over under the mutex both ways, so the caller's writes to
 * it happen before the worker reads them and the worker's write of `result`
 * happens before the caller reads it. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "io/io_engine_impl.h"

typedef struct pread_backend {
    pthread_mutex_t lock;
    pthread_cond_t work_ready; /* signalled by the caller on push, broadcast on shutdown; workers wait */
    pthread_cond_t space_free; /* signalled by workers on pop; the caller waits when the queue is full */
    pthread_cond_t done_ready; /* signalled by workers on completion; the caller waits in collect */

    /* Queued pieces, a ring of `cap` slots: the caller pushes, workers pop;
     * both under lock. */
    io_piece **queue;
    unsigned cap;
    unsigned head;  /* under lock: written by workers (pop), read by both */
    unsigned count; /* under lock: written by the caller (push) and workers (pop) */

    /* Finished pieces: workers push, the caller pops; under lock. */
    io_piece *done_head;
    io_piece *done_tail;

    bool shutdown; /* under lock: written by the caller in destroy, read by workers */

    pthread_t *threads; /* caller thread only */
    unsigned n_threads; /* threads started; caller thread only */
} pread_backend;

/* Transfers as much of p as the file allows, looping on short transfers and
 * retrying EINTR. Returns the bytes moved (a short count means end of file
 * for a read, or an error after some progress that the re-issue will report)
 * or -errno when nothing moved. */
static int64_t pread_transfer(const io_piece *p)
{
    uint64_t done = 0;
    while (done < p->len) {
        ssize_t n;
        if (p->op == IO_OP_READ)
            n = pread(p->fd, p->buf + done, (size_t)(p->len - done), (off_t)(p->offset + done));
        else
            n = pwrite(p->fd, p->buf + done, (size_t)(p->len - done), (off_t)(p->offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (done > 0)
                break;
            return -(int64_t)errno;
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

static void *pread_worker(void *arg)
{
    pread_backend *b = arg;
    pthread_mutex_lock(&b->lock);
    for (;;) {
        while (b->count == 0 && !b->shutdown)
            pthread_cond_wait(&b->work_ready, &b->lock);
        if (b->count == 0)
            break; /* shutdown with nothing left */
        io_piece *p = b->queue[b->head];
        b->head = (b->head + 1) % b->cap;
        b->count--;
        pthread_cond_signal(&b->space_free);
        pthread_mutex_unlock(&b->lock);

        int64_t res = pread_transfer(p);

        pthread_mutex_lock(&b->lock);
        p->result = res;
        p->next = NULL;
        if (b->done_tail)
            b->done_tail->next = p;
        else
            b->done_head = p;
        b->done_tail = p;
        pthread_cond_signal(&b->done_ready);
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* ---------------------------------------------------------------- vtable */

static int pread_issue(io_engine *e, io_piece *p)
{
    pread_backend *b = e->backend;
    pthread_mutex_lock(&b->lock);
    /* The cap keeps the queue from filling (cap = queue_depth); the wait is
     * what makes it a bounded queue should that ever change. */
    while (b->count == b->cap)
        pthread_cond_wait(&b->space_free, &b->lock);
    b->queue[(b->head + b->count) % b->cap] = p;
    b->count++;
    pthread_cond_signal(&b->work_ready);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

static int pread_flush(io_engine *e) { return 0; }

static int pread_collect(io_engine *e, io_piece **out, int max, bool wait)
{
    pread_backend *b = e->backend;
    int n = 0;
    pthread_mutex_lock(&b->lock);
    while (wait && !b->done_head)
        pthread_cond_wait(&b->done_ready, &b->lock);
    while (n < max && b->done_head) {
        io_piece *p = b->done_head;
        b->done_head = p->next;
        if (!b->done_head)
            b->done_tail = NULL;
        p->next = NULL;
        out[n++] = p;
    }
    pthread_mutex_unlock(&b->lock);
    return n;
}

static void pread_stop(pread_backend *b)
{
    pthread_mutex_lock(&b->lock);
    b->shutdown = true;
    pthread_cond_broadcast(&b->work_ready);
    pthread_mutex_unlock(&b->lock);
    for (unsigned i = 0; i < b->n_threads; i++)
        pthread_join(b->threads[i], NULL);
    pthread_cond_destroy(&b->done_ready);
    pthread_cond_destroy(&b->space_free);
    pthread_cond_destroy(&b->work_ready);
    pthread_mutex_destroy(&b->lock);
    free(b->threads);
    free(b->queue);
    free(b);
}

static void pread_destroy(io_engine *e)
{
    if (e->backend)
        pread_stop(e->backend);
    e->backend = NULL;
}

static const io_engine_vtable k_pread_vtable = {
    .name = "pread",
    .issue = pread_issue,
    .flush = pread_flush,
    .collect = pread_collect,
    .destroy = pread_destroy,
};

int io_engine_pread_open(io_engine *e, const io_engine_config *cfg)
{
    pread_backend *b = calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->work_ready, NULL);
    pthread_cond_init(&b->space_free, NULL);
    pthread_cond_init(&b->done_ready, NULL);
    b->cap = cfg->queue_depth;
    b->queue = calloc(b->cap, sizeof *b->queue);
    b->threads = calloc(cfg->pread_threads, sizeof *b->threads);
    if (!b->queue || !b->threads) {
        pread_stop(b);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < cfg->pread_threads; i++) {
        int rc = pthread_create(&b->threads[i], NULL, pread_worker, b);
        if (rc != 0) {
            pread_stop(b); /* joins the n_threads already started */
            return -rc;
        }
        b->n_threads++;
    }
    e->vt = &k_pread_vtable;
    e->backend = b;
    return 0;
}
