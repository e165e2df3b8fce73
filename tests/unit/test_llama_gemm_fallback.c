/* The GPU fallback of the calibration driver (pipeline/llama_run.c) without
 * a GPU: a fake fallible seam (OpenBLAS underneath) fails its N-th call,
 * GEMM or Gram, for N = 1, 2, 3 ... until a run passes without a failure,
 * SQLite style, with -ENOMEM (that step redone on the CPU, later steps on
 * the seam again), -EIO (sticky: the rest of the run on the CPU) and
 * -ENOMEM from the N-th call on. Since the fake computes what the CPU
 * computes, every run must give the CPU-only run's statistics and NLL bit
 * for bit: a failed step neither loses nor double counts a row. A Gram
 * failure after the statistic was partly updated (-EFAULT) fails the run.
 *
 * Needs the fixture generator (MS_GEN, set by ctest); exit 77 without it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/llama_run.h"

static char g_dir[256];
static ms_llama_session g_s;

/* ============================================================ the fake seam */

/* A statistic "on the device" (dev_stats): cpu/hessian_accum.h's
 * accumulator written out again, fp32 blocks of flush rows by the CPU's Gram
 * into fp64, so a layer whose rows all go there sums them exactly as the
 * host accumulator would. */
typedef struct fake_stat {
    float *blk;
    double *acc;
    uint64_t dim, flush, in_block, rows;
} fake_stat;

typedef struct fake_seam {
    uint64_t calls;    /* GEMM and Gram calls so far (and stat_* with dev_stats) */
    uint64_t fail_at;  /* 1-based call that fails; 0: none */
    bool from_on;      /* every call from fail_at on fails */
    int rc;            /* what a failing call returns */
    bool gram_only;    /* only Gram calls count and fail */
    uint64_t forgets;  /* weights_changed calls */
    bool dev_stats;    /* offer stat_begin/add/finish */
    bool dev_out;      /* and stat_rows/stat_out/stat_out_wait (the statistics straight into their output) */
    uint64_t out_fail_at; /* 1-based stat_out call that fails with -EIO; 0: none */
    uint64_t outs, waits;
    float *pending[8];    /* converted by stat_out, copied to pending_dst by stat_out_wait */
    float *pending_dst[8];
    uint64_t pending_bytes[8];
    bool broken;       /* a -EIO happened: every later call fails (a sticky device error) */
    uint64_t stat_opens;
    fake_stat stat[8];
    bool whole_layer;               /* offer layer: the CPU's layer on a private cpu_llama, "on the device" */
    cpu_llama *layer_fw;
    uint64_t layers_run;
    bool host_mem;                  /* offer host_alloc/host_free */
    uint64_t host_allocs, host_frees, host_fail_at; /* host_fail_at: that allocation returns NULL */
} fake_seam;

static bool fake_fails(fake_seam *f)
{
    f->calls++;
    bool fails = f->broken || (f->fail_at && (f->calls == f->fail_at || (f->from_on && f->calls > f->fail_at)));
    if (fails && f->rc == -EIO)
        f->broken = true;
    return fails;
}

static int fake_gemm(void *ctx, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha, const float *a,
                     uint64_t lda, const float *b, uint64_t ldb, float beta, float *c, uint64_t ldc, unsigned flags)
{
    fake_seam *f = ctx;
    if (!f->gram_only && fake_fails(f)) {
        if (m && n) /* a failed GEMM leaves C unspecified: make it visibly wrong */
            c[0] = 12345.0f;
        return f->rc;
    }
    cpu_llama_gemm cpu = cpu_llama_gemm_blas();
    return cpu.gemm(NULL, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, flags);
}

static int fake_gram(void *ctx, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c)
{
    fake_seam *f = ctx;
    if (fake_fails(f)) {
        if (f->rc == -EFAULT) /* the contract: C partly updated */
            c[0] += 1.0f;
        return f->rc;
    }
    return cpu_gram_blas(NULL, x, n_rows, dim, ldx, c);
}

static void fake_forget(void *ctx) { ((fake_seam *)ctx)->forgets++; }

/* Like cudaHostAlloc, memory that is not cleared: here all NaN bits, so a
 * read of anything not yet written shows in the results. */
static void *fake_host_alloc(void *ctx, uint64_t bytes)
{
    fake_seam *f = ctx;
    if (++f->host_allocs == f->host_fail_at)
        return NULL;
    void *p = malloc((size_t)bytes);
    if (p)
        memset(p, 0xff, (size_t)bytes);
    return p;
}

static void fake_host_free(void *ctx, void *p)
{
    fake_seam *f = ctx;
    if (p)
        f->host_frees++;
    free(p);
}

static void fake_stat_accumulate(fake_stat *st, const float *x, uint64_t n, uint64_t ldx);

/* The seam's whole-layer function: the CPU's layer on a cpu_llama of its
 * own (its buffers play the device's), the statistics slots fed from its
 * inputs, the wanted inputs copied out; a failing call changes nothing. */
static int fake_layer(void *ctx, const cpu_llama_layer_args *a)
{
    fake_seam *f = ctx;
    if (fake_fails(f))
        return f->rc;
    if (!f->layer_fw) {
        cpu_llama_gemm cpu = cpu_llama_gemm_blas();
        assert_int_equal(cpu_llama_open(a->cfg, 256, 256, a->max_pos, NULL, &cpu, &f->layer_fw), 0);
    }
    assert_int_equal(cpu_llama_layer_forward(f->layer_fw, a->w, a->b, a->x), 0);
    for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
        uint64_t ld;
        const float *in = cpu_llama_linear_input(f->layer_fw, (cpu_llama_input)k, &ld);
        uint64_t width = k == CPU_LLAMA_IN_DOWN ? a->cfg->intermediate : k == CPU_LLAMA_IN_O ? cpu_llama_q_dim(a->cfg)
                                                                                             : a->cfg->hidden;
        if (a->stat_slot[k] >= 0)
            fake_stat_accumulate(&f->stat[a->stat_slot[k]], in, a->b->n_tokens, ld);
        if (a->input[k])
            for (uint64_t r = 0; r < a->b->n_tokens; r++)
                memcpy(a->input[k] + r * a->input_ld[k], in + r * ld, (size_t)width * sizeof(float));
    }
    f->layers_run++;
    return 0;
}

static int fake_stat_begin(void *ctx, unsigned slot, uint64_t dim, uint64_t flush)
{
    fake_seam *f = ctx;
    if (!f->gram_only && fake_fails(f))
        return f->rc;
    fake_stat *st = &f->stat[slot];
    assert_null(st->blk);
    *st = (fake_stat){.blk = calloc(dim * dim, sizeof(float)), .acc = calloc(dim * dim, sizeof(double)),
                      .dim = dim, .flush = flush};
    assert_true(st->blk && st->acc);
    f->stat_opens++;
    return 0;
}

static void fake_stat_flush(fake_stat *st)
{
    for (uint64_t i = 0; i < st->dim * st->dim; i++) {
        st->acc[i] += (double)st->blk[i];
        st->blk[i] = 0.0f;
    }
    st->in_block = 0;
}

static int fake_stat_add(void *ctx, unsigned slot, const float *x, uint64_t n, uint64_t ldx)
{
    fake_seam *f = ctx;
    if (fake_fails(f))
        return f->rc;
    fake_stat_accumulate(&f->stat[slot], x, n, ldx);
    return 0;
}

static void fake_stat_accumulate(fake_stat *st, const float *x, uint64_t n, uint64_t ldx)
{
    assert_non_null(st->blk);
    while (n > 0) {
        if (st->in_block == st->flush)
            fake_stat_flush(st);
        uint64_t take = st->flush - st->in_block < n ? st->flush - st->in_block : n;
        cpu_gram_blas(NULL, x, take, st->dim, ldx, st->blk);
        st->in_block += take;
        st->rows += take;
        x += take * ldx;
        n -= take;
    }
}

static int fake_stat_rows(void *ctx, uint64_t r0, uint64_t n, double *buf)
{
    fake_stat *st = ctx;
    memcpy(buf, st->acc + r0 * st->dim, (size_t)(n * st->dim) * sizeof(double));
    return 0;
}

static int fake_stat_finish(void *ctx, unsigned slot, cpu_hessian *h)
{
    fake_seam *f = ctx;
    fake_stat *st = &f->stat[slot];
    int rc = 0;
    if (h && f->broken && st->rows > 0) {
        rc = -EIO; /* the device's memory went with the error (an empty slot adds nothing: no loss) */
    } else if (h) {
        fake_stat_flush(st);
        rc = cpu_hessian_add_sum(h, st->rows, fake_stat_rows, st);
    }
    free(st->blk);
    free(st->acc);
    *st = (fake_stat){0};
    return rc;
}
/* The GPU's stat_out: converted now (the device's kernel: the full matrix
 * of the upper triangle's sums, acc + 0.0 times scale, rounded once), copied
 * into dst only when waited for. Not counted among the calls that fail in
 * turn (it cannot run out of memory); it fails once the device is broken,
 * or at out_fail_at. */
static uint64_t fake_stat_rows_of(void *ctx, unsigned slot) { return ((fake_seam *)ctx)->stat[slot].rows; }

static int fake_stat_out(void *ctx, unsigned slot, double scale, float *dst)
{
    fake_seam *f = ctx;
    fake_stat *st = &f->stat[slot];
    f->outs++;
    int rc = 0;
    if (f->broken || f->outs == f->out_fail_at) {
        f->broken = true;
        rc = -EIO;
    } else {
        fake_stat_flush(st);
        uint64_t d = st->dim;
        float *m = malloc(d * d * sizeof *m);
        assert_non_null(m);
        for (uint64_t i = 0; i < d; i++)
            for (uint64_t j = 0; j < d; j++)
                m[i * d + j] = (float)(scale * (st->acc[i <= j ? i * d + j : j * d + i] + 0.0));
        assert_null(f->pending[slot]);
        f->pending[slot] = m;
        f->pending_dst[slot] = dst;
        f->pending_bytes[slot] = d * d * sizeof *m;
    }
    free(st->blk);
    free(st->acc);
    *st = (fake_stat){0};
    return rc;
}

static int fake_stat_out_wait(void *ctx)
{
    fake_seam *f = ctx;
    f->waits++;
    for (unsigned k = 0; k < 8; k++) {
        if (!f->pending[k])
            continue;
        memcpy(f->pending_dst[k], f->pending[k], (size_t)f->pending_bytes[k]);
        free(f->pending[k]);
        f->pending[k] = NULL;
    }
    return 0;
}

static const char *fake_why(void *ctx) { (void)ctx; return "needs 1 MiB, 0 MiB free"; }

/* ============================================================ a run */

typedef struct run_out {
    float *H;       /* every statistic, in order, concatenated */
    uint64_t n_H;   /* floats */
    ms_llama_result res;
    uint64_t dev_layers; /* layers that came straight from the device (on_stats_device) */
} run_out;

static int collect(void *ctx, uint64_t layer, cpu_hessian *const *stats, unsigned n, ms_error *err)
{
    (void)layer;
    (void)err;
    run_out *o = ctx;
    for (unsigned k = 0; k < n; k++) {
        uint64_t d = cpu_hessian_dim(stats[k]);
        float *grown = realloc(o->H, (size_t)(o->n_H + d * d) * sizeof(float));
        assert_non_null(grown);
        o->H = grown;
        cpu_hessian_rows_out(stats[k], 2.0 / (double)cpu_hessian_rows(stats[k]), 0, d, o->H + o->n_H);
        o->n_H += d * d;
    }
    return 0;
}

/* on_stats_device as hessian's sink uses it: every statistic's bytes from
 * the device into a buffer, the wait, then (here) appended. */
static int collect_device(void *ctx, uint64_t layer, const ms_llama_dev_stats *dev, ms_error *err)
{
    run_out *o = ctx;
    uint64_t total = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++)
        total += dev->dim[k] * dev->dim[k];
    float *buf = malloc((size_t)total * sizeof *buf);
    assert_non_null(buf);
    uint64_t off = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        int rc = dev->out(dev->ctx, k, 2.0 / (double)dev->rows[k], buf + off);
        if (rc < 0) {
            free(buf);
            return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, "layer", "the statistics held on the GPU are lost");
        }
        off += dev->dim[k] * dev->dim[k];
    }
    assert_int_equal(dev->wait(dev->wait_ctx), 0);
    float *grown = realloc(o->H, (size_t)(o->n_H + total) * sizeof(float));
    assert_non_null(grown);
    o->H = grown;
    memcpy(o->H + o->n_H, buf, (size_t)total * sizeof(float));
    o->n_H += total;
    o->dev_layers++;
    free(buf);
    (void)layer;
    return 0;
}

/* One run with every output; fake NULL: the CPU's seam. Returns
 * ms_llama_run's result; err receives its error. */
static int run(fake_seam *fake, run_out *o, ms_error *err)
{
    *o = (run_out){0};
    ms_llama_run_opts opt = {.batch_size = 2, .act_budget = 1u << 30, .vocab_chunk = 100, .flush_rows = 16,
                             .on_stats = collect, .stats_ctx = o, .head_stats = true, .nll = true};
    cpu_llama_gemm seam = {.ctx = fake, .gemm = fake_gemm, .gram = fake_gram, .weights_changed = fake_forget,
                           .last_error = fake_why};
    if (fake && fake->whole_layer)
        seam.layer = fake_layer;
    if (fake && fake->host_mem) {
        seam.host_alloc = fake_host_alloc;
        seam.host_free = fake_host_free;
    }
    if (fake && fake->dev_stats) {
        seam.stat_begin = fake_stat_begin;
        seam.stat_add = fake_stat_add;
        seam.stat_finish = fake_stat_finish;
    }
    if (fake && fake->dev_out) {
        seam.stat_rows = fake_stat_rows_of;
        seam.stat_out = fake_stat_out;
        seam.stat_out_wait = fake_stat_out_wait;
        opt.on_stats_device = collect_device;
    }
    return ms_llama_run(&g_s.src, &g_s.config.llama, g_s.calib, &opt, NULL, fake ? &seam : NULL, &o->res, err);
}

static void same_as(const run_out *want, const run_out *got, const char *what)
{
    if (got->n_H != want->n_H || memcmp(got->H, want->H, (size_t)want->n_H * sizeof(float)) != 0)
        fail_msg("%s: the statistics differ from the CPU-only run's", what);
    if (got->res.nll_sum != want->res.nll_sum || got->res.n_predicted != want->res.n_predicted ||
        got->res.n_tokens != want->res.n_tokens)
        fail_msg("%s: NLL %.17g over %" PRIu64 ", the CPU-only run %.17g over %" PRIu64, what, got->res.nll_sum,
                 got->res.n_predicted, want->res.nll_sum, want->res.n_predicted);
}

/* Walks the failing call N upward with rc until a run has no failure. */
static void walk(int rc, bool from_on, bool gram_only)
{
    ms_error err = {0};
    run_out want, got;
    assert_int_equal(run(NULL, &want, &err), 0);
    uint64_t steps = want.res.steps_cpu;
    assert_true(steps > 0 && want.res.steps_gpu == 0 && want.res.gpu_fallbacks == 0);
    fake_seam clean = {.gram_only = gram_only};
    assert_int_equal(run(&clean, &got, &err), 0);
    same_as(&want, &got, "no failure");
    assert_true(got.res.steps_gpu == steps && got.res.steps_cpu == 0 && got.res.gpu_fallbacks == 0);
    assert_true(clean.forgets >= g_s.config.llama.n_layers + 1);
    free(got.H);
    uint64_t total = clean.calls;
    for (uint64_t n = 1; n <= total; n++) {
        fake_seam f = {.fail_at = n, .from_on = from_on, .rc = rc, .gram_only = gram_only};
        char what[96];
        snprintf(what, sizeof what, "call %" PRIu64 "/%" PRIu64 " fails with %d%s%s", n, total, rc,
                 from_on ? " and every one after" : "", gram_only ? " (Gram calls)" : "");
        if (run(&f, &got, &err) != 0)
            fail_msg("%s: the run failed: %s", what, err.msg);
        same_as(&want, &got, what);
        if (got.res.gpu_fallbacks < 1 || got.res.steps_gpu + got.res.steps_cpu != steps)
            fail_msg("%s: %" PRIu64 " fallbacks, %" PRIu64 " + %" PRIu64 " steps of %" PRIu64, what,
                     got.res.gpu_fallbacks, got.res.steps_gpu, got.res.steps_cpu, steps);
        if (rc == -EIO && !got.res.gpu_disabled)
            fail_msg("%s: the GPU was not disabled", what);
        if (rc == -ENOMEM && !from_on && got.res.gpu_fallbacks != 1)
            fail_msg("%s: %" PRIu64 " fallbacks for one failure", what, got.res.gpu_fallbacks);
        free(got.H);
    }
    free(want.H);
}

static void test_oom_walk(void **state) { (void)state; walk(-ENOMEM, false, false); }
static void test_oom_from_walk(void **state) { (void)state; walk(-ENOMEM, true, false); }
static void test_sticky_walk(void **state) { (void)state; walk(-EIO, false, false); }
static void test_gram_oom_walk(void **state) { (void)state; walk(-ENOMEM, false, true); }

/* A Gram failure that already changed the statistic cannot be mended. */
static void test_gram_corrupt(void **state)
{
    (void)state;
    ms_error err = {0};
    run_out got;
    fake_seam f = {.fail_at = 3, .rc = -EFAULT, .gram_only = true};
    assert_int_equal(run(&f, &got, &err), -1);
    assert_non_null(strstr(err.msg, "statistics"));
    assert_int_equal(err.exit_code, MS_EXIT_RUNTIME);
    free(got.H);
}

/* ============================================================ statistics on the device */

/* The statistics within rounding of the CPU-only run's (rows split between
 * the device's accumulator and the host's change which rows share an fp32
 * block) and the NLL bit for bit (it does not depend on them). */
static void close_to(const run_out *want, const run_out *got, const char *what)
{
    assert_int_equal(got->n_H, want->n_H);
    for (uint64_t i = 0; i < want->n_H; i++) {
        double w = want->H[i], g = got->H[i];
        if (!(fabs(g - w) <= 1e-6 + 1e-5 * fabs(w)))
            fail_msg("%s: statistic element %" PRIu64 ": %.9g, the CPU-only run %.9g", what, i, g, w);
    }
    if (got->res.nll_sum != want->res.nll_sum || got->res.n_tokens != want->res.n_tokens)
        fail_msg("%s: NLL %.17g, the CPU-only run %.17g", what, got->res.nll_sum, want->res.nll_sum);
}

/* Runs with each of the `total` seam calls failing in turn with rc (the
 * seam as proto describes it; fail_at and rc are set here): each run either
 * completes within rounding of want with a fallback counted, or (rc -EIO)
 * fails saying the statistics held on the GPU are lost; every slot is freed
 * either way. *completed and *lost count the two. */
static void fail_each_call(const run_out *want, fake_seam proto, uint64_t total, int rc, const char *label,
                           uint64_t *completed, uint64_t *lost)
{
    ms_error err = {0};
    run_out got;
    *completed = *lost = 0;
    for (uint64_t n = 1; n <= total; n++) {
        fake_seam f = proto;
        f.fail_at = n;
        f.rc = rc;
        char what[128];
        snprintf(what, sizeof what, "%s, call %" PRIu64 "/%" PRIu64 " fails with %d", label, n, total, rc);
        if (run(&f, &got, &err) != 0) {
            if (rc != -EIO || !strstr(err.msg, "statistics held on the GPU are lost"))
                fail_msg("%s: the run failed: %s", what, err.msg);
            (*lost)++;
        } else {
            close_to(want, &got, what);
            if (got.res.gpu_fallbacks < 1)
                fail_msg("%s: no fallback counted", what);
            (*completed)++;
        }
        for (unsigned k = 0; k < 8; k++) {
            assert_null(f.stat[k].blk);
            free(f.pending[k]); /* converted before the run stopped, never waited for */
        }
        cpu_llama_close(f.layer_fw);
        free(got.H);
    }
}

/* Both walks of fail_each_call over a seam of kind proto whose clean run
 * made `calls` calls: with -ENOMEM every run completes; with -EIO some
 * complete, and some are lost exactly when the statistics stay on the
 * device. */
static void fail_each_call_walks(const run_out *want, fake_seam proto, uint64_t calls, const char *label)
{
    uint64_t completed, lost;
    fail_each_call(want, proto, calls, -ENOMEM, label, &completed, &lost);
    assert_int_equal(completed, calls);
    fail_each_call(want, proto, calls, -EIO, label, &completed, &lost);
    assert_true(completed > 0 && (proto.dev_stats ? lost > 0 : lost == 0));
}

/* A seam that holds each layer's statistics (stat_begin/add/finish): with
 * no failure, every statistic comes out bit for bit as on the CPU (the same
 * rows in the same fp32 blocks), one slot per statistic and layer. Then
 * every call fails in turn: with -ENOMEM the run completes (a declined
 * slot or batch goes to the host) within rounding of the CPU's; with -EIO
 * either the error came before the layer's statistics were on the device
 * (the run completes on the CPU) or the run fails saying they are lost. */
static void test_dev_stats(void **state)
{
    (void)state;
    ms_error err = {0};
    run_out want, got;
    assert_int_equal(run(NULL, &want, &err), 0);
    uint64_t steps = want.res.steps_cpu;
    fake_seam clean = {.dev_stats = true};
    assert_int_equal(run(&clean, &got, &err), 0);
    same_as(&want, &got, "statistics on the device, no failure");
    assert_int_equal(clean.stat_opens, g_s.config.llama.n_layers * MS_LLAMA_STAT_COUNT);
    assert_true(got.res.steps_gpu == steps && got.res.gpu_fallbacks == 0);
    free(got.H);
    fail_each_call_walks(&want, (fake_seam){.dev_stats = true}, clean.calls, "statistics on the device");
    free(want.H);
}

/* A seam that runs whole layers and holds their statistics: bit for bit
 * the CPU's with no failure (every batch through it, no Gram call); then
 * every call failing in turn, as in test_dev_stats. And with the
 * statistics on the host the same. */
static void test_whole_layer(void **state)
{
    (void)state;
    ms_error err = {0};
    run_out want, got;
    assert_int_equal(run(NULL, &want, &err), 0);
    uint64_t steps = want.res.steps_cpu;
    for (int with_stats = 1; with_stats >= 0; with_stats--) {
        fake_seam clean = {.dev_stats = with_stats, .whole_layer = true};
        const char *label = with_stats ? "whole layers, statistics on the device" : "whole layers";
        assert_int_equal(run(&clean, &got, &err), 0);
        same_as(&want, &got, label);
        assert_true(clean.layers_run > 0 && got.res.gpu_fallbacks == 0 && got.res.steps_gpu == steps);
        cpu_llama_close(clean.layer_fw);
        free(got.H);
        fail_each_call_walks(&want, (fake_seam){.dev_stats = with_stats, .whole_layer = true}, clean.calls, label);
    }
    free(want.H);
}

/* Statistics held on the device and sent straight into their output bytes
 * (on_stats_device, stat_out): bit for bit the CPU-only run's (the device's
 * conversion is rows_out's expression), every decoder layer that way, the
 * head through the host; with whole layers too. Then every call failing in
 * turn (a layer with rows added on the host goes through the host), and a
 * stat_out that fails: the run stops saying the statistics are lost. */
static void test_dev_out(void **state)
{
    (void)state;
    ms_error err = {0};
    run_out want, got;
    assert_int_equal(run(NULL, &want, &err), 0);
    for (int whole = 0; whole <= 1; whole++) {
        fake_seam clean = {.dev_stats = true, .dev_out = true, .whole_layer = whole};
        const char *label = whole ? "whole layers, statistics out from the device" : "statistics out from the device";
        assert_int_equal(run(&clean, &got, &err), 0);
        same_as(&want, &got, label);
        assert_int_equal(got.dev_layers, g_s.config.llama.n_layers);
        assert_int_equal(clean.outs, g_s.config.llama.n_layers * MS_LLAMA_STAT_COUNT);
        assert_int_equal(clean.waits, g_s.config.llama.n_layers);
        cpu_llama_close(clean.layer_fw);
        free(got.H);
        fail_each_call_walks(&want, (fake_seam){.dev_stats = true, .dev_out = true, .whole_layer = whole},
                             clean.calls, label);
        fake_seam f = {.dev_stats = true, .dev_out = true, .whole_layer = whole, .out_fail_at = 6};
        assert_int_equal(run(&f, &got, &err), -1);
        assert_non_null(strstr(err.msg, "statistics held on the GPU are lost"));
        for (unsigned k = 0; k < 8; k++) {
            assert_null(f.stat[k].blk); /* every slot freed */
            free(f.pending[k]);
        }
        cpu_llama_close(f.layer_fw);
        free(got.H);
    }
    free(want.H);
}

/* Host memory from the seam's allocator (pinned on a GPU): the six batch
 * buffers, the residual stream and the statistics' fp64 matrices. Every
 * allocation failing in turn (the batch buffers then all come from malloc,
 * the others each from malloc or calloc): the same results, and every block
 * handed out given back. */
static void test_host_alloc(void **state)
{
    (void)state;
    ms_error err = {0};
    run_out want, got;
    assert_int_equal(run(NULL, &want, &err), 0);
    fake_seam clean = {.host_mem = true};
    assert_int_equal(run(&clean, &got, &err), 0);
    same_as(&want, &got, "host memory from the seam");
    free(got.H);
    assert_true(clean.host_allocs >= 8); /* batch buffers, stream, at least one fp64 matrix */
    assert_int_equal(clean.host_frees, clean.host_allocs);
    for (uint64_t fail_at = 1; fail_at <= clean.host_allocs; fail_at++) {
        fake_seam f = {.host_mem = true, .host_fail_at = fail_at};
        assert_int_equal(run(&f, &got, &err), 0);
        char what[64];
        snprintf(what, sizeof what, "host allocation %" PRIu64 " failing", fail_at);
        same_as(&want, &got, what);
        assert_int_equal(f.host_frees, f.host_allocs - 1);
        free(got.H);
    }
    free(want.H);
}

/* ============================================================ setup */

static int setup(void **state)
{
    (void)state;
    const char *gen = getenv("MS_GEN");
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/ms-fallback.XXXXXX", tmp);
    if (!mkdtemp(g_dir))
        return -1;
    char cmd[1024], calib[300];
    snprintf(cmd, sizeof cmd, "'%s' base '%s/m' --preset tiny --dtype bf16 --seed 3 >/dev/null", gen, g_dir);
    if (system(cmd) != 0)
        return -1;
    snprintf(calib, sizeof calib, "%s/calib.txt", g_dir);
    FILE *f = fopen(calib, "w");
    if (!f)
        return -1;
    /* 7 samples of 3..40 tokens: 4 batches of 2, sequences crossing the 16-row flush */
    unsigned x = 12345;
    for (int s = 0; s < 7; s++) {
        int n = 3 + (s * 13) % 38;
        for (int t = 0; t < n; t++) {
            x = x * 1103515245u + 12345u;
            fprintf(f, "%s%u", t ? " " : "", (x >> 16) % 256);
        }
        fputc('\n', f);
    }
    fclose(f);
    char model[300];
    snprintf(model, sizeof model, "%s/m", g_dir);
    ms_error err = {0};
    if (ms_llama_session_open(model, calib, NULL, true, NULL, &g_s, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    ms_llama_session_close(&g_s);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    if (!getenv("MS_GEN")) {
        fprintf(stderr, "test_llama_gemm_fallback: MS_GEN is not set to the gen_model binary: skipped\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oom_walk),      cmocka_unit_test(test_oom_from_walk),
        cmocka_unit_test(test_sticky_walk),   cmocka_unit_test(test_gram_oom_walk),
        cmocka_unit_test(test_gram_corrupt),  cmocka_unit_test(test_dev_stats),
        cmocka_unit_test(test_host_alloc),
        cmocka_unit_test(test_dev_out),    cmocka_unit_test(test_whole_layer),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
