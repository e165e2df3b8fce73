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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/llama_run.h"

static char g_dir[256];
static ms_llama_session g_s;

/* ============================================================ the fake seam */

typedef struct fake_seam {
    uint64_t calls;    /* GEMM and Gram calls so far */
    uint64_t fail_at;  /* 1-based call that fails; 0: none */
    bool from_on;      /* every call from fail_at on fails */
    int rc;            /* what a failing call returns */
    bool gram_only;    /* only Gram calls count and fail */
    uint64_t forgets;  /* weights_changed calls */
} fake_seam;

static bool fake_fails(fake_seam *f)
{
    f->calls++;
    return f->fail_at && (f->calls == f->fail_at || (f->from_on && f->calls > f->fail_at));
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
static const char *fake_why(void *ctx) { (void)ctx; return "needs 1 MiB, 0 MiB free"; }

/* ============================================================ a run */

typedef struct run_out {
    float *H;       /* every statistic, in order, concatenated */
    uint64_t n_H;   /* floats */
    ms_llama_result res;
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

/* One run with every output; fake NULL: the CPU's seam. Returns
 * ms_llama_run's result; err receives its error. */
static int run(fake_seam *fake, run_out *o, ms_error *err)
{
    *o = (run_out){0};
    ms_llama_run_opts opt = {.batch_size = 2, .act_budget = 1u << 30, .vocab_chunk = 100, .flush_rows = 16,
                             .on_stats = collect, .stats_ctx = o, .head_stats = true, .nll = true};
    cpu_llama_gemm seam = {.ctx = fake, .gemm = fake_gemm, .gram = fake_gram, .weights_changed = fake_forget,
                           .last_error = fake_why};
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
        cmocka_unit_test(test_gram_corrupt),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
