#include "pipeline/merge_run.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_merge.h"
#include "cpu/dtype_convert.h"
#include "cpu/lora_delta.h"
#include "io/checksum.h"
#include "io/direct_read.h"
#include "io/page_cache.h"
#include "pipeline/bounded_queue.h"
#include "pipeline/lora_load.h"
#include "pipeline/merge_passes.h"
#include "pipeline/progress.h"

#define RUN_QUEUE_DEPTH 64 /* items between two stages; the pool bounds the bytes */
#define RUN_MAX_WORKERS 2  /* compute workers: one per GPU lane (gpu/gpu_internal.h) */

enum { RUN_PASS_UNKNOWN, RUN_PASS_NEEDED, RUN_PASS_IDLE }; /* run_ctx.pass_found */

/* One chunk of one job, for one or more passes. Owned by whichever stage
 * holds it: the reader creates it, the writer (or compute, for chunks that
 * write nothing) frees it. */
typedef struct run_item {
    size_t job_index;
    uint64_t chunk;
    unsigned pass_first, pass_last;
    uint64_t row0, n_rows;
    bool writes_output;
    bool no_read;                         /* a chunk of a pass found idle (ms_merge_pass_idle): nothing read */
    bool last_of_job;                     /* the job's final item */
    uint64_t tensor_hash;                 /* last_of_job: the output's XXH3-64 (compute sets it) */
    unsigned worker;                      /* the compute worker that owns the job */
    void *in_buf;                         /* pool: inputs (MERGE jobs) */
    void *out_buf;                        /* pool: output (COPY jobs read into it) */
    uint64_t in_off[MS_MAX_MODELS + 1];   /* each input's rows as read, inside in_buf */
    uint64_t mat_off[MS_MAX_MODELS + 1];  /* LoRA inputs: their fp32 base + delta rows, inside in_buf */
    io_request req[MS_MAX_MODELS + 1];
    unsigned reqs_pending;                /* reader thread only */
    struct run_item *next;                /* reader's in-flight FIFO */
} run_item;

typedef struct run_ctx {
    const ms_run_env *env;
    unsigned n_workers;                      /* compute workers, 1..RUN_MAX_WORKERS */
    ms_queue compute_q[RUN_MAX_WORKERS];     /* one per worker: a job's items go to one worker, in order */
    ms_queue write_q;
    atomic_uint workers_running;             /* the last one to stop closes write_q */
    pthread_mutex_t cpu_lock;                /* one caller of the cpu pool at a time */
    ms_progress progress;
    atomic_bool failed;
    pthread_mutex_t err_lock;
    ms_error err;            /* first failure; guarded by err_lock */
    atomic_bool gpu_disabled;      /* compute: a sticky GPU error happened */
    atomic_uint_fast64_t gpu_fallbacks; /* compute */
    atomic_uint_fast64_t gpu_factorisations; /* compute: Hessians factored on the GPU */
    /* Per job with a pass that may turn out idle (ms_merge_pass_may_idle):
     * what compute found once the pass before it finished, RUN_PASS_*. A
     * tensor in row chunks reads every chunk again for each pass, so the
     * reader waits for the answer and reads nothing for an idle pass. */
    atomic_uint *pass_found;
    pthread_mutex_t found_lock; /* with found_cv: the reader waits for pass_found */
    pthread_cond_t found_cv;
    /* Each field below is written by one stage (or one worker) only and read
     * by the caller after every thread was joined. */
    uint64_t readahead_cap;  /* reader: most pool bytes in use before it reads more */
    size_t dispatch_job;     /* reader: the job last handed to a worker */
    unsigned dispatch_worker;/* reader: and that worker */
    double busy_read_s;      /* reader */
    double busy_compute_s[RUN_MAX_WORKERS]; /* compute, per worker */
    double busy_write_s;     /* writer */
    uint64_t bytes_read;     /* reader */
    uint64_t bytes_read_direct; /* reader: of bytes_read, those read with O_DIRECT */
    uint64_t bytes_written;  /* writer */
    ms_tensor_result *results; /* compute (backend, nonfinite) */
    bool *shard_seen;        /* writer: shards already found final */
} run_ctx;

/* ================================================================ failure */

static void run_fail(run_ctx *ctx, const ms_error *err)
{
    pthread_mutex_lock(&ctx->err_lock);
    if (!atomic_load(&ctx->failed)) {
        ctx->err = *err;
        atomic_store(&ctx->failed, true);
    }
    pthread_mutex_unlock(&ctx->err_lock);
    ms_pool_shutdown(ctx->env->pool);
    for (unsigned w = 0; w < ctx->n_workers; w++)
        ms_queue_close(&ctx->compute_q[w]);
    ms_queue_close(&ctx->write_q);
    pthread_mutex_lock(&ctx->found_lock); /* a reader waiting in reader_pass_idle */
    pthread_cond_broadcast(&ctx->found_cv);
    pthread_mutex_unlock(&ctx->found_lock);
}

static void item_free(run_ctx *ctx, run_item *it)
{
    if (!it)
        return;
    ms_pool_free(ctx->env->pool, it->in_buf);
    ms_pool_free(ctx->env->pool, it->out_buf);
    free(it);
}

/* ================================================================= reader */

typedef struct reader_state {
    run_ctx *ctx;
    run_item *head, *tail; /* in flight, plan order */
} reader_state;

/* Whether input i of the job reads its rows with O_DIRECT: when its file has
 * a direct descriptor (ms_merge_open_direct) and the tensor is read once,
 * whole. A tensor in row chunks reads every chunk again for each pass, and
 * the page cache may still hold them then; a COPY job's buffer goes to the
 * writer as read, so its bytes must start where the buffer does. */
static bool input_reads_direct(const ms_job *job, unsigned i)
{
    return job->kind == MS_JOB_MERGE && job->n_chunks == 1 && job->in[i].file && job->in[i].file->direct_fd >= 0;
}

/* Lays a chunk's inputs out in one staging buffer: for each input the rows
 * as read, then (LoRA inputs) their fp32 materialisation; every area starts
 * 64-byte aligned, and an O_DIRECT input's read area MS_DIRECT_ALIGN-aligned
 * (its rows start ms_direct_head bytes into it). Returns the buffer's size;
 * fills the offsets of the rows (in_off) and materialisations (mat_off) when
 * given. */
static uint64_t stage_layout(const ms_job *job, uint64_t row0, uint64_t n_rows, uint64_t *in_off, uint64_t *mat_off)
{
    uint64_t off = 0;
    for (unsigned i = 0; i < job->n_inputs; i++) {
        const ms_job_input *in = &job->in[i];
        if (!in->file)
            continue;
        uint64_t len = in->row_bytes * n_rows;
        if (input_reads_direct(job, i)) {
            uint64_t at = in->offset + in->row_bytes * row0;
            off = (off + MS_DIRECT_ALIGN - 1) / MS_DIRECT_ALIGN * MS_DIRECT_ALIGN;
            if (in_off)
                in_off[i] = off + ms_direct_head(at);
            off += ms_direct_span(at, len);
        } else {
            if (in_off)
                in_off[i] = off;
            off = (off + len + 63) / 64 * 64;
        }
        if (in->lora) {
            if (mat_off)
                mat_off[i] = off;
            off = (off + job->params.cols * 4 * n_rows + 63) / 64 * 64;
        }
    }
    return off;
}

/* The worker that computes it's job: every item of a job goes to the same
 * worker (a job's chunks and passes run in order on one state), and each new
 * job to the next worker in turn, so with a GPU one tensor's copies overlap
 * another's kernels. The plan hands out a job's items consecutively. */
static unsigned reader_dispatch(run_ctx *ctx, const run_item *it)
{
    if (it->job_index != ctx->dispatch_job) {
        ctx->dispatch_job = it->job_index;
        ctx->dispatch_worker = (ctx->dispatch_worker + 1) % ctx->n_workers;
    }
    return ctx->dispatch_worker;
}

/* Pushes the finished items at the head of the FIFO to compute, in order. */
static int reader_push_ready(reader_state *rs)
{
    while (rs->head && rs->head->reqs_pending == 0) {
        run_item *it = rs->head;
        rs->head = it->next;
        if (!rs->head)
            rs->tail = NULL;
        it->next = NULL;
        it->worker = reader_dispatch(rs->ctx, it);
        if (ms_queue_push(&rs->ctx->compute_q[it->worker], it) != 0) {
            item_free(rs->ctx, it);
            return -1;
        }
    }
    return 0;
}

/* Reaps completions (waiting for one when wait is set) and pushes what is ready. */
static int reader_reap(reader_state *rs, bool wait)
{
    io_request *done[64];
    int n = io_engine_reap(rs->ctx->env->engine, done, 64, wait);
    if (n < 0) {
        ms_error e;
        ms_error_errno(&e, MS_EXIT_RUNTIME, -n, "I/O engine", "reap failed");
        run_fail(rs->ctx, &e);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        run_item *it = done[i]->user;
        if (done[i]->result != 0) {
            const ms_job *job = &rs->ctx->env->plan->jobs[it->job_index];
            ms_error e;
            if (done[i]->result == -ENODATA)
                ms_error_set(&e, MS_EXIT_DATA, "input", "tensor '%s': the file ended early (was it changed "
                             "during the merge?)", job->name);
            else
                ms_error_errno(&e, MS_EXIT_RUNTIME, -done[i]->result, "input", "reading tensor '%s' failed",
                               job->name);
            /* name the file when we can find it */
            for (unsigned k = 0; k < job->n_inputs; k++)
                if (&it->req[k] == done[i] && job->in[k].file) {
                    char msg[sizeof e.msg];
                    snprintf(msg, sizeof msg, "%s", e.msg + strlen("input: "));
                    ms_error_set(&e, e.exit_code, job->in[k].file->path, "%s", msg);
                }
            run_fail(rs->ctx, &e);
        }
        it->reqs_pending--;
    }
    if (atomic_load(&rs->ctx->failed))
        return -1;
    return reader_push_ready(rs);
}

/* Takes `bytes` from the pool without deadlocking: while it cannot, finished
 * reads are handed on (compute frees memory only once it gets them).
 *
 * headroom > 0 also applies the read-ahead cap: the buffer is taken only
 * when headroom more bytes (the whole item) fit under ctx->readahead_cap
 * beside what the pool already hands out, or when it hands out nothing. The
 * first-fit pool then keeps reusing the same low pages instead of touching
 * all of its capacity: every page touched for the first time is a fault and
 * a zeroed page, which with a hot page cache cost more than the read-ahead
 * gained (bench/RESULTS.md). */
static void *reader_alloc(reader_state *rs, uint64_t bytes, uint64_t headroom)
{
    run_ctx *ctx = rs->ctx;
    ms_pool *pool = ctx->env->pool;
    for (;;) {
        uint64_t used = ms_pool_in_use(pool);
        bool room = headroom == 0 || used == 0 || used + headroom <= ctx->readahead_cap;
        void *buf = room ? ms_pool_try_alloc(pool, bytes) : NULL;
        if (buf)
            return buf;
        if (atomic_load(&ctx->failed))
            return NULL;
        if (io_engine_outstanding(ctx->env->engine) > 0) {
            if (reader_reap(rs, true) != 0)
                return NULL;
            continue;
        }
        if (reader_push_ready(rs) != 0)
            return NULL;
        if (room)
            return ms_pool_alloc(pool, bytes); /* nothing in flight: compute will free */
        ms_pool_wait_below(pool, used);        /* compute or the writer frees something */
    }
}

static int reader_submit_item(reader_state *rs, run_item *it)
{
    run_ctx *ctx = rs->ctx;
    const ms_job *job = &ctx->env->plan->jobs[it->job_index];
    uint64_t in_bytes = job->kind == MS_JOB_MERGE ? stage_layout(job, it->row0, it->n_rows, it->in_off, it->mat_off) : 0;
    uint64_t out_bytes = job->kind == MS_JOB_COPY ? job->in[0].row_bytes * it->n_rows
                                                  : (it->writes_output ? job->out_row_bytes * it->n_rows : 0);
    if (it->no_read)
        in_bytes = out_bytes = 0; /* never the output pass: that is never idle */
    /* the cap on the item's first buffer, for the whole item */
    if (in_bytes && !(it->in_buf = reader_alloc(rs, in_bytes, in_bytes + out_bytes)))
        return -1;
    if (out_bytes && !(it->out_buf = reader_alloc(rs, out_bytes, in_bytes ? 0 : out_bytes)))
        return -1;
    double t0 = ms_now_seconds();
    for (unsigned i = 0; i < job->n_inputs && !it->no_read; i++) {
        const ms_job_input *in = &job->in[i];
        uint64_t len = in->row_bytes * it->n_rows;
        if (!in->file || len == 0)
            continue;
        io_request *r = &it->req[i];
        memset(r, 0, sizeof *r);
        r->op = IO_OP_READ;
        r->fd = in->file->fd;
        r->offset = in->offset + in->row_bytes * it->row0;
        r->len = len;
        r->buf = job->kind == MS_JOB_COPY ? it->out_buf : (uint8_t *)it->in_buf + it->in_off[i];
        r->user = it;
        if (input_reads_direct(job, i)) { /* the blocks that hold the rows (stage_layout) */
            uint64_t head = ms_direct_head(r->offset);
            r->fd = in->file->direct_fd;
            r->buf = (uint8_t *)r->buf - head;
            r->need = head + len;
            r->len = ms_direct_span(r->offset, len);
            r->offset -= head;
            ctx->bytes_read_direct += len;
        }
        it->reqs_pending++;
        int rc = io_engine_submit(ctx->env->engine, r);
        if (rc != 0) {
            it->reqs_pending--;
            ms_error e;
            ms_error_errno(&e, MS_EXIT_RUNTIME, -rc, in->file->path, "cannot queue a read");
            run_fail(ctx, &e);
            return -1;
        }
        ctx->bytes_read += len;
    }
    ctx->busy_read_s += ms_now_seconds() - t0;
    if (rs->tail)
        rs->tail->next = it;
    else
        rs->head = it;
    rs->tail = it;
    return reader_reap(rs, false);
}

/* For job j's pass that may turn out idle: waits until compute has finished
 * the pass before it and says whether it is (pass_found), handing on every
 * finished read meanwhile (compute needs them to get there). Costs one
 * chunk's read time of overlap per tensor in row chunks; saves reading the
 * whole tensor once more when the pass is idle. */
static bool reader_pass_idle(reader_state *rs, size_t j)
{
    run_ctx *ctx = rs->ctx;
    io_engine *engine = ctx->env->engine;
    for (;;) {
        unsigned found = atomic_load(&ctx->pass_found[j]);
        if (found != RUN_PASS_UNKNOWN)
            return found == RUN_PASS_IDLE;
        if (atomic_load(&ctx->failed))
            return false;
        if (io_engine_outstanding(engine) > 0) {
            if (reader_reap(rs, true) != 0)
                return false;
            continue;
        }
        if (reader_push_ready(rs) != 0)
            return false;
        pthread_mutex_lock(&ctx->found_lock);
        while (atomic_load(&ctx->pass_found[j]) == RUN_PASS_UNKNOWN && !atomic_load(&ctx->failed))
            pthread_cond_wait(&ctx->found_cv, &ctx->found_lock);
        pthread_mutex_unlock(&ctx->found_lock);
    }
}

static void *reader_main(void *arg)
{
    reader_state rs = {.ctx = arg};
    run_ctx *ctx = rs.ctx;
    const ms_plan *plan = ctx->env->plan;
    for (size_t j = 0; j < plan->n_jobs && !atomic_load(&ctx->failed); j++) {
        const ms_job *job = &plan->jobs[j];
        if (job->out_bytes == 0 || (ctx->env->skip_job && ctx->env->skip_job[j]))
            continue;
        /* one item with every pass when the tensor fits; else each pass
         * re-reads every chunk in row order */
        unsigned blocks = job->n_chunks == 1 ? 1 : job->n_passes;
        for (unsigned b = 0; b < blocks && !atomic_load(&ctx->failed); b++) {
            bool no_read = blocks > 1 && ms_merge_pass_may_idle(&job->params, b) && reader_pass_idle(&rs, j);
            for (uint64_t c = 0; c < job->n_chunks && !atomic_load(&ctx->failed); c++) {
                run_item *it = calloc(1, sizeof *it);
                if (!it) {
                    ms_error e;
                    ms_error_set(&e, MS_EXIT_RUNTIME, job->name, "out of memory");
                    run_fail(ctx, &e);
                    break;
                }
                it->job_index = j;
                it->chunk = c;
                it->pass_first = job->n_chunks == 1 ? 0 : b;
                it->pass_last = job->n_chunks == 1 ? job->n_passes - 1 : b;
                it->row0 = c * job->rows_per_chunk;
                uint64_t rows = job->params.rows;
                it->n_rows = rows - it->row0 < job->rows_per_chunk ? rows - it->row0 : job->rows_per_chunk;
                it->writes_output = it->pass_last == job->n_passes - 1;
                it->no_read = no_read;
                it->last_of_job = it->writes_output && c == job->n_chunks - 1;
                if (reader_submit_item(&rs, it) != 0) {
                    if (!rs.tail || rs.tail != it)
                        item_free(ctx, it); /* not yet in the FIFO */
                    break;
                }
            }
        }
    }
    /* drain: every request must finish before its buffer can go. After a
     * failure reader_reap still takes completions (and returns -1); only a
     * broken engine (reap < 0) ends the wait early. */
    io_engine *engine = ctx->env->engine;
    while (io_engine_outstanding(engine) > 0) {
        if (reader_reap(&rs, true) == 0 || io_engine_outstanding(engine) == 0)
            continue;
        io_request *done[64];
        if (io_engine_reap(engine, done, 64, true) < 0)
            break;
    }
    if (!atomic_load(&ctx->failed))
        reader_push_ready(&rs);
    while (rs.head) {
        run_item *it = rs.head;
        rs.head = it->next;
        item_free(ctx, it);
    }
    for (unsigned w = 0; w < ctx->n_workers; w++)
        ms_queue_close(&ctx->compute_q[w]);
    return NULL;
}

/* ================================================================ compute */

/* Placement (DESIGN.md, Data flow 3): the GPU takes a pass of a chunk when
 * it implements the method and the chunk's working set fits the live
 * free-memory estimate. Out of memory there is not sticky: one warning line,
 * this pass on the CPU, later ones try the GPU again. A sticky error turns the
 * GPU off for the rest of the run. Either way the state is untouched by the
 * failed attempt, so the CPU produces the same bytes. Returns true when the
 * GPU did the pass. */
static bool compute_pass_on_gpu(run_ctx *ctx, const ms_job *job, ms_merge_state *st, unsigned pass,
                                const ms_chunk *chunk, uint64_t n_rows)
{
    ms_gpu *gpu = ctx->env->gpu;
    if (!gpu || atomic_load(&ctx->gpu_disabled) || !ms_gpu_supports(&job->params))
        return false;
    uint64_t need = ms_gpu_chunk_bytes(&job->params, n_rows);
    if (need > ms_gpu_free_estimate(gpu))
        return false;
    char msg[256] = "";
    switch (ms_gpu_run_pass(gpu, &job->params, st, pass, chunk, msg, sizeof msg)) {
    case MS_GPU_OK:
        return true;
    case MS_GPU_OOM:
        atomic_fetch_add(&ctx->gpu_fallbacks, 1);
        ms_log_warn("GPU out of memory on %s (%s): using CPU", job->name, msg);
        return false;
    case MS_GPU_FATAL:
    default:
        atomic_store(&ctx->gpu_disabled, true);
        ms_log_warn("GPU error on %s (%s): the CPU finishes the merge", job->name, msg);
        return false;
    }
}

/* The Hessians' Cholesky factorisations (ms_hessian_factoriser's device)
 * under the same rules: on the GPU when it fits the live estimate, out of
 * memory one warning and the CPU, a sticky error the GPU off. The bits are
 * the same either way; only after a sticky error must the CPU's matrix be
 * built again. */
static int factor_on_gpu(void *vctx, double *a, uint64_t n, bool diag_only)
{
    run_ctx *ctx = vctx;
    ms_gpu *gpu = ctx->env->gpu;
    if (!gpu || atomic_load(&ctx->gpu_disabled) || ms_gpu_cholesky_bytes(n) > ms_gpu_free_estimate(gpu))
        return -ENODEV;
    char msg[256] = "";
    bool not_pd = false;
    switch (ms_gpu_cholesky(gpu, a, n, diag_only, &not_pd, msg, sizeof msg)) {
    case MS_GPU_OK:
        atomic_fetch_add(&ctx->gpu_factorisations, 1);
        return not_pd ? -EDOM : 0;
    case MS_GPU_OOM:
        atomic_fetch_add(&ctx->gpu_fallbacks, 1);
        ms_log_warn("GPU out of memory factoring a %" PRIu64 " x %" PRIu64 " Hessian (%s): using CPU", n, n, msg);
        return -ENODEV; /* a unchanged */
    case MS_GPU_FATAL:
    default:
        atomic_store(&ctx->gpu_disabled, true);
        ms_log_warn("GPU error factoring a Hessian (%s): the CPU finishes the merge", msg);
        return -EAGAIN;
    }
}

/* What the compute stage holds for the tensor in progress. */
typedef struct job_state {
    ms_merge_state *merge;
    cpu_lora *lora[MS_MAX_MODELS + 1]; /* LoRA inputs' prepared factors */
} job_state;

static void job_state_close(job_state *js)
{
    ms_merge_state_close(js->merge);
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        cpu_lora_close(js->lora[i]);
    memset(js, 0, sizeof *js);
}

/* Reads input i's adapter factors and prepares them (once per tensor). */
static int lora_prepare(const ms_job *job, unsigned i, cpu_lora **out, ms_error *err)
{
    if (ms_lora_load(job->in[i].peft, job->in[i].lora, out, err) != 0)
        return -1;
    MS_ASSERT(!cpu_lora_needs_stats(*out) || job->n_chunks == 1); /* planning refuses it (merge_plan.c) */
    return 0;
}

/* Turns each LoRA input's rows into base + delta (fp32) for this chunk. The
 * CPU does it for both backends, so they see the same inputs. */
static void lora_materialise(run_ctx *ctx, const ms_job *job, const run_item *it, job_state *js, ms_chunk *chunk)
{
    for (unsigned i = 0; i < job->n_inputs; i++) {
        if (!job->in[i].lora)
            continue;
        const void *rows = (const uint8_t *)it->in_buf + it->in_off[i];
        float *mat = (float *)((uint8_t *)it->in_buf + it->mat_off[i]);
        if (cpu_lora_needs_stats(js->lora[i]) && it->chunk == 0 && it->pass_first == 0)
            cpu_lora_stats_rows(js->lora[i], rows, job->in[i].read_dtype, it->row0, it->n_rows, ctx->env->cpu);
        cpu_lora_rows(js->lora[i], rows, job->in[i].read_dtype, it->row0, it->n_rows, mat, ctx->env->cpu);
        chunk->in[i] = mat;
    }
}

/* Tells the reader (reader_pass_idle) what the pass after the one just
 * finished turned out to be. */
static void pass_found_set(run_ctx *ctx, size_t job, unsigned found)
{
    pthread_mutex_lock(&ctx->found_lock);
    atomic_store(&ctx->pass_found[job], found);
    pthread_cond_broadcast(&ctx->found_cv);
    pthread_mutex_unlock(&ctx->found_lock);
}

static int compute_item(run_ctx *ctx, run_item *it, job_state *js)
{
    const ms_job *job = &ctx->env->plan->jobs[it->job_index];
    if (job->kind == MS_JOB_COPY) {
        ctx->results[it->job_index].backend = "copy";
        return 0;
    }
    ms_error e;
    if (it->chunk == 0 && it->pass_first == 0) {
        MS_ASSERT(js->merge == NULL);
        if (ms_merge_state_open(&job->params, &js->merge) != 0)
            return ms_error_set(&e, MS_EXIT_RUNTIME, job->name, "out of memory for merge statistics"),
                   run_fail(ctx, &e), -1;
        /* the factorisations use the GPU or the cpu pool, under cpu_lock (taken inside, around them only) */
        ms_hessian_factoriser fz = {.pool = ctx->env->cpu, .device = ctx->env->gpu ? factor_on_gpu : NULL,
                                    .device_ctx = ctx};
        if (ms_hessian_prepare(js->merge, &job->params, job->name, ctx->env->plan->hessians, &fz, &ctx->cpu_lock,
                               &e) != 0)
            return run_fail(ctx, &e), -1;
        for (unsigned i = 0; i < job->n_inputs; i++)
            if (job->in[i].lora && lora_prepare(job, i, &js->lora[i], &e) != 0)
                return run_fail(ctx, &e), -1;
    }
    ms_merge_state **state = &js->merge;
    ms_chunk chunk = {.row0 = it->row0, .n_rows = it->n_rows, .out = it->out_buf};
    chunk.elem0 = it->row0 * job->params.cols;
    chunk.n_elems = it->n_rows * job->params.cols;
    for (unsigned i = 0; i < job->n_inputs && it->in_buf; i++)
        chunk.in[i] = job->in[i].file ? (const uint8_t *)it->in_buf + it->in_off[i] : NULL;
    if (!it->no_read) {
        pthread_mutex_lock(&ctx->cpu_lock);
        lora_materialise(ctx, job, it, js, &chunk);
        pthread_mutex_unlock(&ctx->cpu_lock);
    }
    ms_tensor_result *res = &ctx->results[it->job_index];
    for (unsigned p = it->pass_first; p <= it->pass_last; p++) {
        if (ms_merge_pass_idle(*state, p)) { /* HIST_HI's capture did HIST_LO's work */
            ms_merge_pass_skip_chunk(*state, &chunk);
        } else if (it->no_read) {
            MS_ASSERT(!"a chunk without its data in a pass that is not idle");
        } else if (!compute_pass_on_gpu(ctx, job, *state, p, &chunk, it->n_rows)) {
            pthread_mutex_lock(&ctx->cpu_lock);
            int rc = cpu_merge_run_pass(&job->params, *state, p, &chunk, ctx->env->cpu);
            pthread_mutex_unlock(&ctx->cpu_lock);
            if (rc != 0)
                return ms_error_errno(&e, MS_EXIT_RUNTIME, -rc, job->name, "merge kernel failed"), run_fail(ctx, &e), -1;
            res->used_cpu = true;
        } else {
            res->used_gpu = true;
        }
        bool pass_complete = job->n_chunks == 1 || it->chunk == job->n_chunks - 1;
        bool may_idle = p + 1 < job->n_passes && ms_merge_pass_may_idle(&job->params, p + 1);
        if (may_idle && it->chunk == 0 && !pass_complete && !ms_merge_capturing(*state))
            pass_found_set(ctx, it->job_index, RUN_PASS_NEEDED); /* nothing captures (a GPU pass): no need to wait */
        if (p + 1 < job->n_passes && pass_complete) {
            ms_merge_pass_finish(*state, &job->params, p);
            if (may_idle)
                pass_found_set(ctx, it->job_index, ms_merge_pass_idle(*state, p + 1) ? RUN_PASS_IDLE : RUN_PASS_NEEDED);
        }
    }
    res->backend = res->used_gpu ? (res->used_cpu ? "cuda+cpu" : "cuda") : "cpu";
    /* a merge that changes nothing is worth a warning (see the summary) */
    uint64_t out_bytes = it->n_rows * job->out_row_bytes;
    if (it->writes_output && job->params.has_base && job->params.in_dtype[0] == job->out_dtype &&
        memcmp(chunk.out, chunk.in[0], out_bytes) != 0)
        ctx->results[it->job_index].differs_from_base = true;
    else if (it->writes_output && (!job->params.has_base || job->params.in_dtype[0] != job->out_dtype))
        ctx->results[it->job_index].differs_from_base = true;
    if (it->last_of_job)
        job_state_close(js);
    return 0;
}

typedef struct worker_arg {
    run_ctx *ctx;
    unsigned worker;
} worker_arg;

/* What the writer would otherwise do on its one thread, done here on the
 * compute worker that owns the job (a job's output items come to it in
 * order): the tensor's running hash, with its digest on the last item, and
 * the count of non-finite output values. */
static void account_output(run_ctx *ctx, run_item *it, ms_hasher *h)
{
    const ms_job *job = &ctx->env->plan->jobs[it->job_index];
    uint64_t row_bytes = job->kind == MS_JOB_COPY ? 1 : job->out_row_bytes;
    if (it->chunk == 0)
        ms_hasher_reset(h);
    ms_hasher_update(h, it->out_buf, it->n_rows * row_bytes);
    if (job->kind == MS_JOB_MERGE)
        ctx->results[it->job_index].nonfinite += cpu_count_nonfinite(it->out_buf, job->out_dtype,
                                                                 it->n_rows * job->params.cols);
    if (it->last_of_job)
        it->tensor_hash = ms_hasher_digest(h);
}

/* One compute worker: computes the items of its queue in order. The last
 * worker to stop closes the write queue. */
static void *compute_main(void *arg)
{
    run_ctx *ctx = ((worker_arg *)arg)->ctx;
    unsigned w = ((worker_arg *)arg)->worker;
    job_state js = {0};
    ms_hasher hasher = {0};
    if (ms_hasher_init(&hasher) != 0) {
        ms_error e;
        ms_error_set(&e, MS_EXIT_RUNTIME, "compute", "out of memory");
        run_fail(ctx, &e);
    }
    void *p;
    while (ms_queue_pop(&ctx->compute_q[w], &p) == 0) {
        run_item *it = p;
        if (atomic_load(&ctx->failed)) {
            item_free(ctx, it);
            continue;
        }
        double t0 = ms_now_seconds();
        int rc = compute_item(ctx, it, &js);
        ms_pool_free(ctx->env->pool, it->in_buf);
        it->in_buf = NULL;
        if (rc == 0 && it->writes_output)
            account_output(ctx, it, &hasher);
        ctx->busy_compute_s[w] += ms_now_seconds() - t0;
        if (rc != 0 || !it->writes_output) {
            item_free(ctx, it);
            continue;
        }
        if (ms_queue_push(&ctx->write_q, it) != 0)
            item_free(ctx, it);
    }
    job_state_close(&js);
    ms_hasher_free(&hasher);
    if (atomic_fetch_sub(&ctx->workers_running, 1) == 1)
        ms_queue_close(&ctx->write_q);
    return NULL;
}

/* ================================================================= writer */

/* Once shard s is final (renamed): posts it to be read back while the page
 * cache holds it (shard_check.h) and records it in the journal so a resumed
 * run can keep it. Every tensor of a final shard has its hash by then: the
 * shard became final on its last byte, written just before this tensor's
 * hash was set, and the others finished earlier. */
static int writer_shard_committed(run_ctx *ctx, size_t s, ms_error *err)
{
    const ms_run_env *env = ctx->env;
    if (ctx->shard_seen[s] || !st_writer_shard_is_final(env->writer, s))
        return 0;
    ctx->shard_seen[s] = true; /* a journal that fails fails the run */
    const st_plan_shard *sh = st_plan_shard_at(env->layout, s);
    if (env->shard_check)
        ms_shard_check_post(env->shard_check, sh->file_name);
    if (!env->journal)
        return 0;
    uint64_t *hashes = calloc(sh->n_tensors ? sh->n_tensors : 1, sizeof *hashes);
    if (!hashes)
        return ms_error_set(err, MS_EXIT_RUNTIME, sh->file_name, "out of memory");
    for (size_t i = 0; i < sh->n_tensors; i++)
        hashes[i] = st_writer_tensor_hash(env->writer, sh->first_tensor + i);
    uint64_t shard_hash = ms_shard_hash(sh->header, sh->header_bytes, hashes, sh->n_tensors);
    int rc = ms_journal_record(env->journal, env->layout, s, shard_hash, hashes, err);
    free(hashes);
    return rc;
}

static void *writer_main(void *arg)
{
    run_ctx *ctx = arg;
    const ms_run_env *env = ctx->env;
    void *p;
    while (ms_queue_pop(&ctx->write_q, &p) == 0) {
        run_item *it = p;
        if (atomic_load(&ctx->failed)) {
            item_free(ctx, it);
            continue;
        }
        double t0 = ms_now_seconds();
        const ms_job *job = &env->plan->jobs[it->job_index];
        uint64_t row_bytes = job->kind == MS_JOB_COPY ? 1 : job->out_row_bytes;
        uint64_t off = it->row0 * row_bytes, len = it->n_rows * row_bytes;
        ms_error e;
        if (st_writer_write(env->writer, it->job_index, off, it->out_buf, len, &e) != 0) {
            run_fail(ctx, &e);
            item_free(ctx, it);
            continue;
        }
        ctx->bytes_written += len;
        if (it->last_of_job) {
            st_writer_set_tensor_hash(env->writer, it->job_index, it->tensor_hash);
            ms_progress_step(&ctx->progress, job->name, ctx->results[it->job_index].backend, job->read_bytes);
            if (writer_shard_committed(ctx, st_plan_tensor_at(env->layout, it->job_index)->shard, &e) != 0) {
                run_fail(ctx, &e);
                item_free(ctx, it);
                continue;
            }
        }
        ctx->busy_write_s += ms_now_seconds() - t0;
        item_free(ctx, it);
    }
    return NULL;
}

/* ================================================================ driver */

/* The default read-ahead cap, from the plan's largest item (a chunk's inputs
 * and output). Cold (less than 90% of the inputs in the page cache): room for
 * two, so the next one is read while one computes. Hot: one and a sixteenth,
 * so reads hardly overlap compute (they are memory copies) but the pool's
 * footprint, every page of which is faulted in and zeroed on first use, stays
 * small. At least RUN_READAHEAD_MIN either way, so small tensors still flow.
 * Measured on this VM (400 MB model, 1 GiB pool, TIES): hot 0.98 s with the
 * cap against 1.14 s without; cold the same as without (bench/RESULTS.md). */
#define RUN_READAHEAD_MIN ((uint64_t)256 << 20)
#define RUN_HOT_FRACTION 0.9

static bool inputs_in_page_cache(const ms_plan *plan)
{
    uint64_t total = 0, resident = 0;
    for (unsigned i = 0; i < ms_plan_input_count(plan); i++) {
        const ms_model *m = ms_plan_input_model(plan, i);
        for (unsigned s = 0; m && s < m->n_shards; s++) {
            total += m->shards[s]->file_size;
            resident += ms_page_cache_resident(m->shards[s]->fd, m->shards[s]->file_size);
        }
    }
    return total > 0 && (double)resident >= RUN_HOT_FRACTION * (double)total;
}

unsigned ms_merge_open_direct(ms_plan *plan)
{
    unsigned opened = 0, cached = 0;
    for (unsigned i = 0; i < ms_plan_input_count(plan); i++) {
        const ms_model *m = ms_plan_input_model(plan, i);
        for (unsigned s = 0; m && s < m->n_shards; s++) {
            st_file *f = m->shards[s];
            MS_ASSERT(f->direct_fd < 0); /* every input opens its files (ms_plan_build): once each */
            /* reading from the disk what memory holds would only cost */
            if ((double)ms_page_cache_resident(f->fd, f->file_size) >= RUN_HOT_FRACTION * (double)f->file_size) {
                cached++;
                continue;
            }
            int fd = ms_direct_open(f->fd, f->path);
            if (fd < 0)
                ms_log_info("%s: cannot read it with O_DIRECT (%s): reading it through the page cache", f->path,
                            strerror(-fd));
            f->direct_fd = fd < 0 ? -1 : fd;
            opened += fd >= 0;
        }
    }
    if (cached)
        ms_log_info("--direct-io: %u input file%s already in the page cache, read through it", cached,
                    cached == 1 ? " is" : "s are");
    return opened;
}

static uint64_t readahead_cap_for(const ms_plan *plan)
{
    uint64_t largest = 0;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        const ms_job *job = &plan->jobs[j];
        uint64_t rows = job->rows_per_chunk < job->params.rows ? job->rows_per_chunk : job->params.rows;
        uint64_t bytes = job->kind == MS_JOB_COPY ? job->in[0].row_bytes * rows
                                                  : stage_layout(job, 0, rows, NULL, NULL) + job->out_row_bytes * rows;
        if (bytes > largest)
            largest = bytes;
    }
    if (largest > UINT64_MAX / 2)
        return UINT64_MAX;
    uint64_t cap = inputs_in_page_cache(plan) ? largest + largest / 16 : 2 * largest;
    return cap < RUN_READAHEAD_MIN ? RUN_READAHEAD_MIN : cap;
}

/* Zero-byte tensors never pass through the stages: they are complete as planned. */
static int run_empty_tensors(run_ctx *ctx, ms_error *err)
{
    const ms_plan *plan = ctx->env->plan;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        if (plan->jobs[j].out_bytes != 0 || (ctx->env->skip_job && ctx->env->skip_job[j]))
            continue;
        ctx->results[j].backend = "copy";
        st_writer_set_tensor_hash(ctx->env->writer, j, ms_hash64(NULL, 0));
    }
    (void)err;
    return 0;
}

int ms_merge_run(const ms_run_env *env, ms_run_stats *stats, ms_error *err)
{
    memset(stats, 0, sizeof *stats);
    run_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return ms_error_set(err, MS_EXIT_RUNTIME, "merge", "out of memory");
    ctx->env = env;
    ctx->n_workers = env->compute_workers < 1 ? 1
                     : env->compute_workers > RUN_MAX_WORKERS ? RUN_MAX_WORKERS : env->compute_workers;
    ctx->readahead_cap = env->readahead_cap ? env->readahead_cap : readahead_cap_for(env->plan);
    ctx->dispatch_job = SIZE_MAX;
    ctx->dispatch_worker = ctx->n_workers - 1; /* the first job goes to worker 0 */
    ctx->results = calloc(env->plan->n_jobs ? env->plan->n_jobs : 1, sizeof *ctx->results);
    ctx->shard_seen = calloc(st_plan_n_shards(env->layout), sizeof *ctx->shard_seen);
    ctx->pass_found = calloc(env->plan->n_jobs ? env->plan->n_jobs : 1, sizeof *ctx->pass_found);
    bool queues_ok = ms_queue_init(&ctx->write_q, RUN_QUEUE_DEPTH) == 0;
    for (unsigned w = 0; w < ctx->n_workers; w++)
        queues_ok = ms_queue_init(&ctx->compute_q[w], RUN_QUEUE_DEPTH) == 0 && queues_ok;
    if (!ctx->results || !ctx->shard_seen || !ctx->pass_found || !queues_ok) {
        for (unsigned w = 0; w < ctx->n_workers; w++)
            ms_queue_destroy(&ctx->compute_q[w]);
        ms_queue_destroy(&ctx->write_q);
        free(ctx->results);
        free(ctx->shard_seen);
        free(ctx->pass_found);
        free(ctx);
        return ms_error_set(err, MS_EXIT_RUNTIME, "merge", "out of memory");
    }
    pthread_mutex_init(&ctx->err_lock, NULL);
    pthread_mutex_init(&ctx->cpu_lock, NULL);
    pthread_mutex_init(&ctx->found_lock, NULL);
    pthread_cond_init(&ctx->found_cv, NULL);
    size_t n_items = 0;
    uint64_t to_read = 0;
    for (size_t j = 0; j < env->plan->n_jobs; j++) {
        bool skip = env->skip_job && env->skip_job[j];
        n_items += env->plan->jobs[j].out_bytes != 0 && !skip;
        to_read += skip ? 0 : env->plan->jobs[j].read_bytes;
        if (skip)
            ctx->results[j].backend = "kept";
    }
    ms_progress_init(&ctx->progress, n_items, to_read);
    double t0 = ms_now_seconds();
    run_empty_tensors(ctx, err);

    pthread_t reader, writer;
    bool reader_up = pthread_create(&reader, NULL, reader_main, ctx) == 0;
    bool writer_up = reader_up && pthread_create(&writer, NULL, writer_main, ctx) == 0;
    if (!reader_up || !writer_up) {
        ms_error e;
        ms_error_set(&e, MS_EXIT_RUNTIME, "merge", "cannot start the pipeline threads");
        run_fail(ctx, &e);
    }
    /* worker 0 is this thread; a worker that cannot start leaves its queue to
     * the failure path (run_fail closes every queue) */
    pthread_t workers[RUN_MAX_WORKERS];
    worker_arg wargs[RUN_MAX_WORKERS];
    unsigned started = 1;
    atomic_store(&ctx->workers_running, ctx->n_workers);
    if (reader_up && writer_up) {
        for (unsigned w = 0; w < ctx->n_workers; w++)
            wargs[w] = (worker_arg){ctx, w};
        for (; started < ctx->n_workers; started++) {
            if (pthread_create(&workers[started], NULL, compute_main, &wargs[started]) != 0) {
                ms_error e;
                ms_error_set(&e, MS_EXIT_RUNTIME, "merge", "cannot start the compute threads");
                atomic_store(&ctx->workers_running, started);
                run_fail(ctx, &e);
                break;
            }
        }
        compute_main(&wargs[0]);
        for (unsigned w = 1; w < started; w++)
            pthread_join(workers[w], NULL);
    }
    if (reader_up)
        pthread_join(reader, NULL);
    if (writer_up)
        pthread_join(writer, NULL);
    ms_progress_finish(&ctx->progress);

    int rc = 0;
    if (atomic_load(&ctx->failed)) {
        *err = ctx->err;
        rc = -1;
        free(ctx->results);
    } else {
        stats->tensors = ctx->results;
        for (size_t j = 0; j < env->plan->n_jobs; j++) {
            const ms_job *job = &env->plan->jobs[j];
            const ms_tensor_result *r = &ctx->results[j];
            if (env->skip_job && env->skip_job[j])
                stats->tensors_kept++;
            else if (job->kind != MS_JOB_MERGE)
                stats->tensors_copied++;
            else if (r->used_gpu && r->used_cpu)
                stats->tensors_mixed++;
            else if (r->used_gpu)
                stats->tensors_gpu++;
            else
                stats->tensors_cpu++;
            stats->chunked_tensors += job->n_chunks > 1;
            stats->chunked_pass_skipped += job->n_chunks > 1 && atomic_load(&ctx->pass_found[j]) == RUN_PASS_IDLE;
            stats->tensors_equal_to_base += job->kind == MS_JOB_MERGE && !ctx->results[j].differs_from_base &&
                                            !(env->skip_job && env->skip_job[j]);
            stats->nonfinite_values += ctx->results[j].nonfinite;
            stats->nonfinite_tensors += ctx->results[j].nonfinite != 0;
        }
    }
    stats->gpu_fallbacks = atomic_load(&ctx->gpu_fallbacks);
    stats->gpu_factorisations = atomic_load(&ctx->gpu_factorisations);
    stats->gpu_disabled = atomic_load(&ctx->gpu_disabled);
    stats->bytes_read = ctx->bytes_read;
    stats->bytes_read_direct = ctx->bytes_read_direct;
    stats->bytes_written = ctx->bytes_written;
    stats->busy_read_s = ctx->busy_read_s;
    for (unsigned w = 0; w < ctx->n_workers; w++)
        stats->busy_compute_s += ctx->busy_compute_s[w];
    stats->compute_workers = ctx->n_workers;
    stats->busy_write_s = ctx->busy_write_s;
    stats->wall_s = ms_now_seconds() - t0;
    ms_progress_destroy(&ctx->progress);
    for (unsigned w = 0; w < ctx->n_workers; w++)
        ms_queue_destroy(&ctx->compute_q[w]);
    ms_queue_destroy(&ctx->write_q);
    pthread_mutex_destroy(&ctx->err_lock);
    pthread_mutex_destroy(&ctx->cpu_lock);
    free(ctx->shard_seen);
    free(ctx->pass_found);
    pthread_mutex_destroy(&ctx->found_lock);
    pthread_cond_destroy(&ctx->found_cv);
    free(ctx);
    return rc;
}

void ms_run_stats_free(ms_run_stats *stats)
{
    free(stats->tensors);
    stats->tensors = NULL;
}
