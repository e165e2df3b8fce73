/* hessian's statistics out: converted on the pool, written by a thread of
 * their own (hessian_sink.h). */
#include "pipeline/hessian_sink.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "io/checksum.h"
#include "pipeline/llama_run.h"

/* Rows of output per conversion task: about 2 MB (64 rows at d = 8192), so
 * that a task's transposed reads (cpu_hessian_rows_out) take 512 bytes of
 * each row they visit, and a layer still makes over a hundred tasks. */
#define SINK_TASK_BYTES (2u << 20)

/* One stretch of a tensor in the buffer: rows [row0, row0 + n_rows) of a
 * statistic, bytes [offset, offset + len) of its tensor. */
typedef struct sink_segment {
    const cpu_hessian *stat; /* the layer thread's only: closed once the layer is converted */
    double scale;
    size_t tensor;
    uint64_t dim, row0, n_rows;
    float *data;
    bool first, last; /* the tensor's first and last stretch: its hash starts, ends */
} sink_segment;

struct ms_hessian_sink {
    st_writer *w;
    const st_plan *plan;
    uint64_t n_layers;
    cpu_pool *pool;
    float *buf;
    uint64_t buf_floats;
    void *(*buf_alloc)(void *ctx, uint64_t bytes); /* NULL: malloc */
    void (*buf_free)(void *ctx, void *p);
    void *buf_ctx;
    /* the piece being filled (the layer thread's) */
    sink_segment fill[MS_LLAMA_STAT_COUNT];
    unsigned n_fill;
    uint64_t fill_floats;
    /* handed to the writer; under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    sink_segment job[MS_LLAMA_STAT_COUNT];
    unsigned n_job;
    int (*job_wait)(void *ctx); /* the job's bytes are still on their way (a GPU's copy): wait first */
    void *job_wait_ctx;
    bool busy, quit, failed;
    ms_error err; /* the writer's first failure */
    pthread_t thread;
    bool started;
    ms_hasher hasher; /* the writer's: the tensor it is writing */
    /* the writer's, read after a drain: statistics with a NaN or Inf on the
     * diagonal (a non-finite input reaches every diagonal entry it touches) */
    uint64_t nonfinite_tensors;
    size_t first_nonfinite;
    size_t last_nonfinite_counted; /* + 1: 0 when none */
};

uint64_t ms_hessian_layer_bytes(const cpu_llama_config *cfg)
{
    uint64_t total = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        uint64_t d = ms_llama_stat_dim(cfg, (ms_llama_stat)k);
        total += d * d * 4;
    }
    return total;
}

/* ============================================================ the writer thread */

/* Counts g's tensor once when a diagonal entry of g's rows is not finite. */
static void check_diagonal(ms_hessian_sink *s, const sink_segment *g)
{
    if (s->last_nonfinite_counted == g->tensor + 1)
        return;
    for (uint64_t r = 0; r < g->n_rows; r++)
        if (!isfinite(g->data[r * g->dim + g->row0 + r])) {
            if (s->nonfinite_tensors++ == 0)
                s->first_nonfinite = g->tensor;
            s->last_nonfinite_counted = g->tensor + 1;
            return;
        }
}

static int write_segment(ms_hessian_sink *s, const sink_segment *g, ms_error *err)
{
    uint64_t d = g->dim, len = g->n_rows * d * 4;
    check_diagonal(s, g);
    if (g->first)
        ms_hasher_reset(&s->hasher);
    ms_hasher_update(&s->hasher, g->data, (size_t)len);
    if (st_writer_write(s->w, g->tensor, g->row0 * d * 4, g->data, len, err) < 0)
        return -1;
    if (g->last)
        st_writer_set_tensor_hash(s->w, g->tensor, ms_hasher_digest(&s->hasher));
    return 0;
}

static void *writer_main(void *arg)
{
    ms_hessian_sink *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->busy && !s->quit)
            pthread_cond_wait(&s->cond, &s->lock);
        if (s->quit)
            break;
        unsigned n = s->n_job;
        int (*job_wait)(void *) = s->job_wait;
        void *job_wait_ctx = s->job_wait_ctx;
        pthread_mutex_unlock(&s->lock);
        ms_error err = {0};
        int rc = 0;
        if (job_wait && (rc = job_wait(job_wait_ctx)) < 0)
            ms_error_errno(&err, MS_EXIT_RUNTIME, -rc, "hessian", "the statistics did not come back from the GPU");
        for (unsigned i = 0; i < n && rc == 0; i++) /* the job is read-only while busy */
            rc = write_segment(s, &s->job[i], &err);
        pthread_mutex_lock(&s->lock);
        if (rc < 0 && !s->failed) {
            s->failed = true;
            s->err = err;
        }
        s->busy = false;
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Waits until the writer holds no job. Returns 0, or -1 with its failure. */
static int wait_idle(ms_hessian_sink *s, ms_error *err)
{
    pthread_mutex_lock(&s->lock);
    while (s->busy)
        pthread_cond_wait(&s->cond, &s->lock);
    bool failed = s->failed;
    if (failed && err)
        *err = s->err;
    pthread_mutex_unlock(&s->lock);
    return failed ? -1 : 0;
}

/* ============================================================ the layer thread */

typedef struct convert_ctx {
    const sink_segment *seg;
    uint64_t band[MS_LLAMA_STAT_COUNT];   /* rows per task in each segment */
    unsigned first[MS_LLAMA_STAT_COUNT + 1]; /* each segment's first task; the total last */
} convert_ctx;

static void convert_task(void *arg, unsigned task, unsigned worker)
{
    (void)worker;
    const convert_ctx *c = arg;
    unsigned k = 0;
    while (task >= c->first[k + 1])
        k++;
    const sink_segment *g = &c->seg[k];
    uint64_t r = (uint64_t)(task - c->first[k]) * c->band[k];
    uint64_t n = g->n_rows - r < c->band[k] ? g->n_rows - r : c->band[k];
    cpu_hessian_rows_out(g->stat, g->scale, g->row0 + r, n, g->data + r * g->dim);
}

/* Converts the piece filled so far into the buffer (once the writer is done
 * with it) and hands it over. */
static int flush_piece(ms_hessian_sink *s, ms_error *err)
{
    if (s->n_fill == 0)
        return 0;
    if (wait_idle(s, err) < 0)
        return -1;
    convert_ctx c = {.seg = s->fill};
    for (unsigned k = 0; k < s->n_fill; k++) {
        uint64_t band = SINK_TASK_BYTES / (s->fill[k].dim * 4);
        c.band[k] = band < 1 ? 1 : band;
        c.first[k + 1] = c.first[k] + (unsigned)((s->fill[k].n_rows + c.band[k] - 1) / c.band[k]);
    }
    cpu_pool_run(s->pool, c.first[s->n_fill], convert_task, &c);
    pthread_mutex_lock(&s->lock);
    for (unsigned k = 0; k < s->n_fill; k++)
        s->job[k] = s->fill[k];
    s->n_job = s->n_fill;
    s->job_wait = NULL;
    s->busy = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    s->n_fill = 0;
    s->fill_floats = 0;
    return 0;
}

/* The output tensor of layer's statistic k (the head's after the last layer's). */
static size_t stat_tensor(const ms_hessian_sink *s, uint64_t layer, unsigned k, uint64_t d)
{
    size_t idx = layer < s->n_layers ? (size_t)(layer * MS_LLAMA_STAT_COUNT + k)
                                     : (size_t)(s->n_layers * MS_LLAMA_STAT_COUNT);
    const st_plan_tensor *pt = st_plan_tensor_at(s->plan, idx);
    MS_ASSERT(pt->shape[0] == d && pt->shape[1] == d && d <= s->buf_floats);
    return idx;
}

int ms_hessian_sink_stats(void *ctx, uint64_t layer, cpu_hessian *const *stats, unsigned n, ms_error *err)
{
    ms_hessian_sink *s = ctx;
    MS_ASSERT(n <= MS_LLAMA_STAT_COUNT);
    for (unsigned k = 0; k < n; k++) {
        uint64_t d = cpu_hessian_dim(stats[k]);
        size_t idx = stat_tensor(s, layer, k, d);
        double scale = 2.0 / (double)cpu_hessian_rows(stats[k]);
        for (uint64_t r = 0; r < d;) {
            if (s->fill_floats + d > s->buf_floats && flush_piece(s, err) < 0)
                return -1;
            uint64_t rows = (s->buf_floats - s->fill_floats) / d;
            rows = rows < d - r ? rows : d - r;
            s->fill[s->n_fill++] = (sink_segment){.stat = stats[k], .scale = scale, .tensor = idx, .dim = d, .row0 = r,
                                                  .n_rows = rows, .data = s->buf + s->fill_floats, .first = r == 0,
                                                  .last = r + rows == d};
            s->fill_floats += rows * d;
            r += rows;
        }
    }
    return flush_piece(s, err);
}

int ms_hessian_sink_stats_device(void *ctx, uint64_t layer, const ms_llama_dev_stats *dev, ms_error *err)
{
    ms_hessian_sink *s = ctx;
    MS_ASSERT(layer < s->n_layers && s->n_fill == 0);
    uint64_t total = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++)
        total += dev->dim[k] * dev->dim[k];
    if (total > s->buf_floats)
        return 1; /* in pieces: through the host */
    if (wait_idle(s, err) < 0)
        return -1;
    uint64_t off = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        uint64_t d = dev->dim[k];
        size_t idx = stat_tensor(s, layer, k, d);
        float *data = s->buf + off;
        int rc = dev->out(dev->ctx, k, 2.0 / (double)dev->rows[k], data);
        if (rc < 0) {
            const st_plan_tensor *pt = st_plan_tensor_at(s->plan, idx);
            return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, pt->name,
                                  "the statistics held on the GPU are lost; rerun with --device cpu");
        }
        s->job[k] = (sink_segment){.tensor = idx, .dim = d, .row0 = 0, .n_rows = d, .data = data, .first = true,
                                   .last = true};
        off += d * d;
    }
    pthread_mutex_lock(&s->lock);
    s->n_job = MS_LLAMA_STAT_COUNT;
    s->job_wait = dev->wait;
    s->job_wait_ctx = dev->wait_ctx;
    s->busy = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int ms_hessian_sink_drain(ms_hessian_sink *s, ms_error *err) { return wait_idle(s, err); }

uint64_t ms_hessian_sink_nonfinite(const ms_hessian_sink *s, size_t *first_tensor)
{
    *first_tensor = s->first_nonfinite;
    return s->nonfinite_tensors;
}

int ms_hessian_sink_open(st_writer *w, const st_plan *plan, uint64_t n_layers, uint64_t buf_bytes, cpu_pool *pool,
                         const ms_hessian_sink_mem *mem, ms_hessian_sink **out, ms_error *err)
{
    *out = NULL;
    ms_hessian_sink *s = calloc(1, sizeof *s);
    if (!s)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "hessian", "cannot allocate the statistics' writer");
    *s = (ms_hessian_sink){.w = w, .plan = plan, .n_layers = n_layers, .pool = pool, .buf_floats = buf_bytes / 4};
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    if (mem && mem->alloc) {
        s->buf_alloc = mem->alloc;
        s->buf_free = mem->free;
        s->buf_ctx = mem->ctx;
        s->buf = s->buf_alloc(s->buf_ctx, s->buf_floats * sizeof(float));
    }
    if (!s->buf) {
        s->buf_alloc = NULL;
        s->buf = malloc((size_t)s->buf_floats * sizeof(float));
    }
    if (!s->buf || ms_hasher_init(&s->hasher) < 0) {
        ms_hessian_sink_close(s);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "hessian", "cannot allocate the output buffer (%.2f GB)",
                              (double)buf_bytes / 1e9);
    }
    int rc = pthread_create(&s->thread, NULL, writer_main, s);
    if (rc != 0) {
        ms_hessian_sink_close(s);
        return ms_error_errno(err, MS_EXIT_RUNTIME, rc, "hessian", "cannot start the statistics' writer thread");
    }
    s->started = true;
    *out = s;
    return 0;
}

void ms_hessian_sink_close(ms_hessian_sink *s)
{
    if (!s)
        return;
    if (s->started) {
        pthread_mutex_lock(&s->lock);
        s->quit = true;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->thread, NULL);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    ms_hasher_free(&s->hasher);
    if (s->buf_alloc)
        s->buf_free(s->buf_ctx, s->buf);
    else
        free(s->buf);
    free(s);
}
