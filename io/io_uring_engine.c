/* The io_uring backend (liburing 2.3 API only). One ring of queue_depth
 * entries; io_engine.c never has more than queue_depth pieces in flight, so
 * the submission queue never fills and the completion queue (twice as large)
 * never overflows. A piece's address rides in user_data.
 *
 * Registered buffers: each cfg->regions entry is cut into slices of at most
 * 1 GiB (the kernel's limit for one registered buffer) and the slices are
 * registered together; a piece lying wholly inside one slice uses the *_FIXED
 * opcode with that slice's index, any other piece the plain one. Everything
 * here runs on the caller's thread. */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "io/io_engine_impl.h"

#define URING_MAX_SLICE (1ull << 30)
#define URING_MAX_SLICES (1u << 14) /* the kernel's IORING_MAX_REG_BUFFERS */

typedef struct uring_slice {
    uintptr_t base;
    uint64_t len;
    unsigned index; /* buf_index: position in the registered iovec array */
} uring_slice;

typedef struct uring_backend {
    struct io_uring ring;
    uring_slice *slices; /* sorted by base; NULL when nothing is registered */
    unsigned n_slices;
} uring_backend;

static bool uring_disabled_by_env(void)
{
    const char *v = getenv("MERGESTREAM_IO_URING_DISABLE");
    return v && *v && strcmp(v, "0") != 0;
}

static bool uring_is_transient(int rc) { return rc == -EINTR || rc == -EAGAIN || rc == -EBUSY; }

/* ---------------------------------------------------------------- setup */

/* A ring can exist while the operations we need do not (kernels before 5.6
 * have no IORING_OP_READ) or while io_uring_enter is refused (seccomp): check
 * both now, so AUTO can fall back before any real I/O. */
static int uring_probe(struct io_uring *ring)
{
    struct io_uring_probe *probe = io_uring_get_probe_ring(ring);
    if (!probe)
        return -EOPNOTSUPP;
    bool ok = io_uring_opcode_supported(probe, IORING_OP_READ) &&
              io_uring_opcode_supported(probe, IORING_OP_WRITE) &&
              io_uring_opcode_supported(probe, IORING_OP_READ_FIXED) &&
              io_uring_opcode_supported(probe, IORING_OP_WRITE_FIXED);
    io_uring_free_probe(probe);
    if (!ok)
        return -EOPNOTSUPP;

    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data(sqe, NULL);
    int rc;
    do
        rc = io_uring_submit_and_wait(ring, 1);
    while (rc == -EINTR);
    if (rc < 0)
        return rc;
    struct io_uring_cqe *cqe = NULL;
    do
        rc = io_uring_wait_cqe(ring, &cqe);
    while (rc == -EINTR);
    if (rc < 0)
        return rc;
    rc = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return rc < 0 ? rc : 0;
}

static int uring_slice_cmp(const void *a, const void *b)
{
    const uring_slice *x = a, *y = b;
    return x->base < y->base ? -1 : x->base > y->base;
}

static void uring_describe_memlock(char *out, size_t size)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_MEMLOCK, &rl) != 0)
        snprintf(out, size, "unknown");
    else if (rl.rlim_cur == RLIM_INFINITY)
        snprintf(out, size, "unlimited");
    else
        snprintf(out, size, "%llu KiB", (unsigned long long)rl.rlim_cur / 1024);
}

/* Registers cfg->regions. Failure is not an error: one warning line saying
 * why, and every piece then uses the plain opcodes. */
static void uring_register(io_engine *e, uring_backend *b, const io_engine_config *cfg)
{
    uint64_t n = 0, total = 0;
    for (unsigned i = 0; i < cfg->n_regions; i++) {
        uint64_t len = cfg->regions[i].iov_len;
        if (len > 0 && cfg->regions[i].iov_base)
            n += (len + URING_MAX_SLICE - 1) / URING_MAX_SLICE;
        total += len;
    }
    if (n == 0)
        return;
    char why[160];
    struct iovec *iov = NULL;
    if (n > URING_MAX_SLICES) {
        snprintf(why, sizeof why, "%llu slices is over the kernel's limit of %u",
                 (unsigned long long)n, URING_MAX_SLICES);
        goto warn;
    }
    iov = calloc(n, sizeof *iov);
    b->slices = calloc(n, sizeof *b->slices);
    if (!iov || !b->slices) {
        snprintf(why, sizeof why, "%s", strerror(ENOMEM));
        goto warn;
    }
    unsigned k = 0;
    for (unsigned i = 0; i < cfg->n_regions; i++) {
        char *base = cfg->regions[i].iov_base;
        uint64_t len = cfg->regions[i].iov_len;
        if (!base)
            continue;
        for (uint64_t off = 0; off < len; off += URING_MAX_SLICE) {
            uint64_t part = len - off < URING_MAX_SLICE ? len - off : URING_MAX_SLICE;
            iov[k].iov_base = base + off;
            iov[k].iov_len = (size_t)part;
            b->slices[k] = (uring_slice){(uintptr_t)(base + off), part, k};
            k++;
        }
    }
    MS_ASSERT(k == n);
    int rc = io_uring_register_buffers(&b->ring, iov, k);
    if (rc < 0) {
        char memlock[64];
        uring_describe_memlock(memlock, sizeof memlock);
        snprintf(why, sizeof why, "%s; RLIMIT_MEMLOCK %s", strerror(-rc), memlock);
        goto warn;
    }
    qsort(b->slices, k, sizeof *b->slices, uring_slice_cmp);
    b->n_slices = k;
    e->stats.registered = true;
    free(iov);
    return;
warn:
    ms_log_warn("io_uring: cannot register %llu MiB of staging buffers (%s): using unregistered buffers",
                (unsigned long long)(total >> 20), why);
    free(iov);
    free(b->slices);
    b->slices = NULL;
    b->n_slices = 0;
}

/* buf_index of the registered slice holding [buf, buf + len), or -1. */
static int uring_find_slice(const uring_backend *b, const char *buf, uint64_t len)
{
    uintptr_t p = (uintptr_t)buf;
    unsigned lo = 0, hi = b->n_slices; /* first slice with base > p */
    while (lo < hi) {
        unsigned mid = lo + (hi - lo) / 2;
        if (b->slices[mid].base <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    const uring_slice *s = &b->slices[lo - 1];
    if (p - s->base > s->len || len > s->len - (p - s->base))
        return -1;
    return (int)s->index;
}

/* ---------------------------------------------------------------- vtable */

static int uring_issue(io_engine *e, io_piece *p)
{
    uring_backend *b = e->backend;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
    if (!sqe) {
        /* Cannot happen while pieces in flight <= ring entries; be safe. */
        int rc = io_uring_submit(&b->ring);
        if (rc < 0 && !uring_is_transient(rc))
            return rc;
        sqe = io_uring_get_sqe(&b->ring);
        if (!sqe)
            return -EBUSY;
    }
    MS_ASSERT(p->len <= UINT32_MAX);
    unsigned n = (unsigned)p->len;
    int idx = uring_find_slice(b, p->buf, p->len);
    if (p->op == IO_OP_READ) {
        if (idx >= 0)
            io_uring_prep_read_fixed(sqe, p->fd, p->buf, n, p->offset, idx);
        else
            io_uring_prep_read(sqe, p->fd, p->buf, n, p->offset);
    } else {
        if (idx >= 0)
            io_uring_prep_write_fixed(sqe, p->fd, p->buf, n, p->offset, idx);
        else
            io_uring_prep_write(sqe, p->fd, p->buf, n, p->offset);
    }
    /* Straight to an io-wq worker: a buffered read that hits the page cache
     * would otherwise be copied inline by io_uring_enter, on this thread, one
     * piece after another; and a cold one takes the non-blocking retry path,
     * which was 2-5x slower than blocking workers with readahead on the
     * test VM (bench_read, see the engine's report). IOSQE_ASYNC exists
     * wherever IORING_OP_READ does (5.6), which uring_probe checked. */
    io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
    io_uring_sqe_set_data(sqe, p);
    if (idx >= 0)
        io_engine_count_fixed(e);
    return 0;
}

static int uring_flush(io_engine *e)
{
    uring_backend *b = e->backend;
    int rc = io_uring_submit(&b->ring);
    /* Entries a transient failure left in the queue go with the next
     * submit or the next io_uring_submit_and_wait in collect. */
    return rc >= 0 || uring_is_transient(rc) ? 0 : rc;
}

static int uring_collect(io_engine *e, io_piece **out, int max, bool wait)
{
    uring_backend *b = e->backend;
    struct io_uring_cqe *cqe = NULL;
    if (wait) {
        while (io_uring_peek_cqe(&b->ring, &cqe) != 0) {
            int rc = io_uring_submit_and_wait(&b->ring, 1);
            if (rc < 0 && !uring_is_transient(rc))
                return rc;
        }
    }
    int n = 0;
    while (n < max && io_uring_peek_cqe(&b->ring, &cqe) == 0) {
        io_piece *p = io_uring_cqe_get_data(cqe);
        MS_ASSERT(p != NULL);
        p->result = cqe->res;
        io_uring_cqe_seen(&b->ring, cqe);
        out[n++] = p;
    }
    return n;
}

static void uring_destroy(io_engine *e)
{
    uring_backend *b = e->backend;
    if (!b)
        return;
    io_uring_queue_exit(&b->ring); /* also unregisters the buffers */
    free(b->slices);
    free(b);
    e->backend = NULL;
}

static const io_engine_vtable k_uring_vtable = {
    .name = "io_uring",
    .issue = uring_issue,
    .flush = uring_flush,
    .collect = uring_collect,
    .destroy = uring_destroy,
};

int io_engine_uring_open(io_engine *e, const io_engine_config *cfg)
{
    if (uring_disabled_by_env())
        return -ENOSYS;
    uring_backend *b = calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    int rc = io_uring_queue_init(cfg->queue_depth, &b->ring, 0);
    if (rc < 0) {
        free(b);
        return rc;
    }
    rc = uring_probe(&b->ring);
    if (rc < 0) {
        io_uring_queue_exit(&b->ring);
        free(b);
        return rc;
    }
    uring_register(e, b, cfg);
    e->vt = &k_uring_vtable;
    e->backend = b;
    return 0;
}
