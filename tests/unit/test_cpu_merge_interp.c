/* Tests for the interpolation and model-soup methods: the CPU kernels
 * (cpu/cpu_merge_interp.c), their pass plans and host steps
 * (pipeline/merge_passes_interp.c) and the shared arithmetic
 * (pipeline/merge_math_interp.h).
 *
 * Every method runs on fresh random tensors against the float64 reference
 * in merge_reference_interp.h, byte for byte: every input/output dtype mix,
 * 1-D and 2-D shapes, numel above 65,536 (blocks straddle chunks and
 * windows), rows longer than a block, and per method the corners the issue
 * names: slerp with dot products near 1 and near -1, t = 0 and 1, zero
 * norms; model_stock with orthogonal and zero task vectors; quantised
 * deltas (ties in sce's variance, ram's epsilon), NaN/Inf inputs. Each case
 * runs whole on 1 thread, then cut into random row chunks (different per
 * pass) on 2 and 3 threads with small windows: the bytes must not change.
 * exp/log are checked against libm, and multislerp and karcher against
 * mergekit's vector algorithms in fp64 (approximately: the Gram-matrix
 * form is exact only in exact arithmetic). The seed is printed; set
 * MS_TEST_SEED to replay. */
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
#include <time.h>

#include "cpu/cpu_merge.h"
#include "cpu/cpu_merge_interp.h"
#include "merge_reference_interp.h"
#include "pipeline/merge_passes.h"
#include "pipeline/merge_passes_interp.h"
#include "test_chunks.h"
#include "test_pools.h"

#include "test_rng.h"

static unsigned rng_below(unsigned n)
{
    return (unsigned)(rng_next() % n);
}

/* ================================================================ cases */

typedef enum flavour {
    FL_PLAIN,    /* base ~ N(0, 0.05), deltas ~ N(0, s) */
    FL_NEAR,     /* models ~ c * base + tiny noise: cosines near +1 or -1 */
    FL_ZERO,     /* some task vectors exactly zero */
    FL_ORTHO,    /* task vectors on disjoint elements: orthogonal */
    FL_QUANT,    /* quantised values: many exact ties */
    FL_SPARSE,   /* most delta elements exactly 0, the rest small or large */
    FL_SPECIALS, /* plain, plus NaN and Inf inputs */
    FL_COUNT
} flavour;

static const char *const k_flavour[FL_COUNT] = {"plain", "near", "zero", "ortho", "quant", "sparse", "specials"};

typedef struct tcase {
    ms_tensor_params p;
    void *in[MS_MAX_MODELS + 1];
    flavour fl;
} tcase;

static const st_dtype k_dtypes[3] = {ST_F32, ST_F16, ST_BF16};

static float special_value(void)
{
    static const uint32_t bits[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xffa5a5a5u, 0x7f800000u, 0xff800000u};
    return ref_float(bits[rng_below(6)]);
}

/* Models (besides the base) the method accepts, drawn. */
static unsigned pick_models(ms_method m)
{
    switch (m) {
    case MS_METHOD_SLERP:
    case MS_METHOD_NEARSWAP:
    case MS_METHOD_ARCEE_FUSION:
        return 1;
    case MS_METHOD_NUSLERP:
        return 2;
    case MS_METHOD_MODEL_STOCK:
        return 2 + rng_below(4);
    default:
        return 1 + rng_below(rng_below(3) ? 4 : 8);
    }
}

/* Random parameters for method m (as the recipe would resolve them). */
static void pick_params(ms_tensor_params *p, ms_method m)
{
    p->method = m;
    p->lambda = 1.0f;
    for (unsigned i = 1; i <= p->n_models; i++)
        p->weight[i] = 1.0f;
    switch (m) {
    case MS_METHOD_SLERP: {
        unsigned r = rng_below(8);
        p->t = r == 0 ? 0.0 : r == 1 ? 1.0 : r == 2 ? 1e-9 : r == 3 ? 0.5 : rng_unit();
        p->has_base = true;
        break;
    }
    case MS_METHOD_NUSLERP: {
        p->has_base = rng_below(2);
        unsigned r = rng_below(5);
        p->weight[1] = (float)(rng_unit() * 2 - 0.5);
        p->weight[2] = r == 0 ? -p->weight[1] : (float)(rng_unit() * 2 - 0.5); /* r == 0: t = 0.5 */
        p->nuslerp_flatten = rng_below(3) == 0;
        p->nuslerp_row_wise = rng_below(2);
        break;
    }
    case MS_METHOD_MULTISLERP: {
        p->has_base = rng_below(2);
        p->normalize_weights = rng_below(4) != 0;
        p->eps = rng_below(4) ? 1e-8 : 1e-3;
        float sum = 0;
        for (unsigned i = 1; i <= p->n_models; i++) {
            p->weight[i] = (float)(0.1 + rng_unit());
            sum += p->weight[i];
        }
        (void)sum;
        break;
    }
    case MS_METHOD_KARCHER:
        p->has_base = rng_below(2);
        p->max_iter = rng_below(4) ? 10 : rng_below(30);
        p->tol = rng_below(4) ? 1e-5 : 1e-9;
        break;
    case MS_METHOD_MODEL_STOCK:
        p->has_base = true;
        p->filter_wise = rng_below(2);
        break;
    case MS_METHOD_NEARSWAP: {
        p->has_base = true;
        static const double ts[] = {1e-7, 1e-4, 0.001, 0.01, 0.5, 2.0};
        p->t = ts[rng_below(6)];
        break;
    }
    case MS_METHOD_SCE:
        p->has_base = true;
        p->select_topk = rng_below(4) == 0 ? 1.0 : rng_below(3) == 0 ? 1e-4 : 0.02 + 0.96 * rng_unit();
        break;
    case MS_METHOD_RAM:
    case MS_METHOD_RAMPLUS_TL:
        p->has_base = true;
        for (unsigned i = 1; i <= p->n_models; i++)
            p->epsilon[i] = rng_below(3) ? 1e-5 : rng_below(2) ? 0.0 : 0.003;
        p->ram_r = rng_below(2) ? 0.1 : 2.0 * rng_unit();
        p->ram_alpha = rng_below(2) ? 0.2 : rng_unit();
        break;
    case MS_METHOD_ARCEE_FUSION:
        p->has_base = true;
        break;
    default:
        fail_msg("not an interpolation method");
    }
}

static void case_make(tcase *tc, ms_method m, uint64_t rows, uint64_t cols, flavour fl)
{
    memset(tc, 0, sizeof *tc);
    tc->fl = fl;
    ms_tensor_params *p = &tc->p;
    p->n_models = pick_models(m);
    p->rows = rows;
    p->cols = cols;
    p->numel = rows * cols;
    pick_params(p, m);
    p->out_dtype = k_dtypes[rng_below(3)];
    for (unsigned i = 0; i <= p->n_models; i++) {
        p->in_dtype[i] = k_dtypes[rng_below(3)];
        p->model_rows[i] = rows;
    }
    uint64_t n = p->numel;
    unsigned nm = p->n_models;
    if (fl == FL_ORTHO || fl == FL_ZERO || fl == FL_NEAR) /* exact deltas: no input rounding */
        for (unsigned i = 0; i <= nm; i++)
            p->in_dtype[i] = ST_F32;
    float *base = malloc(n * sizeof(float) + 4);
    double bscale = rng_below(8) == 0 ? 1e-9 : 0.05; /* sometimes norms below slerp's 1e-8 */
    for (uint64_t e = 0; e < n; e++)
        base[e] = fl == FL_QUANT ? (float)ldexp((double)((int64_t)(rng_next() % 201) - 100), -6)
                                 : (float)(bscale * rng_gauss());
    for (unsigned i = 0; i <= nm; i++) {
        tc->in[i] = malloc(n * ref_dtype_size(p->in_dtype[i]) + 4);
        double scale = 0.002 + 0.02 * rng_unit();
        double near_c = rng_below(2) ? 1.0 + 0.5 * rng_unit() : -(1.0 + 0.5 * rng_unit());
        bool zero = fl == FL_ZERO && (i == 1 || rng_below(2));
        for (uint64_t e = 0; e < n; e++) {
            float v = base[e];
            if (i == 0 || zero) {
                /* the base, or a model equal to it */
            } else if (fl == FL_NEAR) {
                v = (float)(near_c * base[e] + 1e-6 * bscale * rng_gauss());
            } else if (fl == FL_ORTHO) {
                v = e % nm == i - 1 ? v + (float)(scale * rng_gauss()) : v;
            } else if (fl == FL_QUANT) {
                v = v + (float)ldexp((double)((int64_t)(rng_next() % 9) - 4), -8);
            } else if (fl == FL_SPARSE) {
                unsigned r = rng_below(10);
                v = r < 6 ? v : r < 9 ? v + (float)(1e-6 * rng_gauss()) : v + (float)(scale * rng_gauss());
            } else {
                v = v + (float)(scale * rng_gauss());
            }
            ref_store_input(tc->in[i], p->in_dtype[i], e, v);
        }
        if (fl == FL_SPECIALS)
            for (unsigned k = 0; k < 1 + n / 3000; k++)
                ref_store_input(tc->in[i], p->in_dtype[i], rng_next() % n, special_value());
    }
    free(base);
    if (!p->has_base) { /* nuslerp, multislerp, karcher without one: slot 0 is never read */
        free(tc->in[0]);
        tc->in[0] = NULL;
    }
}

static void case_free(tcase *tc)
{
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        free(tc->in[i]);
}

static void case_describe(const tcase *tc, char *buf, size_t len)
{
    const ms_tensor_params *p = &tc->p;
    int o = snprintf(buf, len,
                     "%s rows=%" PRIu64 " cols=%" PRIu64 " n=%u base=%d out=%d flavour=%s t=%.17g flat=%d "
                     "roww=%d fw=%d nw=%d eps=%g topk=%.17g r=%g alpha=%g iter=%u tol=%g:",
                     ms_merge_interp_method(p->method) ? "interp" : "?", p->rows, p->cols, p->n_models,
                     p->has_base, (int)p->out_dtype, k_flavour[tc->fl], p->t, p->nuslerp_flatten,
                     p->nuslerp_row_wise, p->filter_wise, p->normalize_weights, p->eps, p->select_topk, p->ram_r,
                     p->ram_alpha, p->max_iter, p->tol);
    o += snprintf(buf + o, len - (size_t)o, " method=%d", (int)p->method);
    for (unsigned i = 0; i <= p->n_models && o > 0 && (size_t)o < len; i++)
        o += snprintf(buf + o, len - (size_t)o, " [w=%g eps=%g in=%d]", (double)p->weight[i], p->epsilon[i],
                      (int)p->in_dtype[i]);
}

/* ============================================================== running */

static void fail_stat(const tcase *tc, const char *what, double got, double want)
{
    char desc[4096];
    case_describe(tc, desc, sizeof desc);
    fail_msg("%s is %.17g, expected %.17g; %s", what, got, want, desc);
}

/* Bit for bit, except that any NaN equals any NaN: a NaN's payload and
 * sign depend on which operand the hardware propagates, and a NaN statistic
 * only ever yields NaN coefficients, stored as the canonical NaN. */
static void same_double(const tcase *tc, const char *what, double got, double want)
{
    if (isnan(got) && isnan(want))
        return;
    if (memcmp(&got, &want, sizeof got) != 0)
        fail_stat(tc, what, got, want);
}

/* The statistics a pass gathered, right after its host step, against the
 * reference's (bit for bit: an error in a blocked order would rarely
 * survive the rounding to fp32 coefficients). */
static void check_stats(const tcase *tc, const ms_merge_state *st, unsigned pass)
{
    const ms_tensor_params *p = &tc->p;
    const ms_interp_state *is = st->interp;
    refi_in v;
    refi_load(p, (const void *const *)tc->in, &v);
    uint64_t N = p->numel;
    switch (st->pass[pass]) {
    case MS_MERGE_PASS_GRAM:
    case MS_MERGE_PASS_LINE_GRAM: {
        float *V[MS_INTERP_MAX_VECS];
        for (unsigned k = 0; k < is->n_vecs; k++)
            V[k] = refi_vec(&v, is->vec_slot[k], is->vec_delta);
        if (st->pass[pass] == MS_MERGE_PASS_GRAM) {
            for (unsigned a = 0; a < is->n_vecs; a++)
                for (unsigned b = a; b < is->n_vecs; b++)
                    same_double(tc, "Gram sum", is->sum[ms_interp_pair(a, b, is->n_vecs)],
                                refi_dot(V[a], V[b], 0, N, 1));
        } else {
            for (uint64_t l = 0; l < is->n_lines; l++) {
                uint64_t e0 = is->line_cols ? l : l * p->cols, cnt = is->line_cols ? p->rows : p->cols;
                uint64_t stride = is->line_cols ? p->cols : 1;
                same_double(tc, "line s00", is->line_sum[l * 3], refi_dot(V[0], V[0], e0, cnt, stride));
                same_double(tc, "line s01", is->line_sum[l * 3 + 1], refi_dot(V[0], V[1], e0, cnt, stride));
                same_double(tc, "line s11", is->line_sum[l * 3 + 2], refi_dot(V[1], V[1], e0, cnt, stride));
            }
        }
        for (unsigned k = 0; k < is->n_vecs; k++)
            free(V[k]);
        break;
    }
    case MS_MERGE_PASS_KEY_HI:
        if (p->method == MS_METHOD_ARCEE_FUSION)
            for (uint64_t r = 0; r < p->rows; r++)
                same_double(tc, "row kl", is->row_kl[r], refi_fusion_kl(&v, r, p->cols));
        break;
    case MS_MERGE_PASS_KEY_LO:
        if (p->method == MS_METHOD_ARCEE_FUSION) {
            float *imp = malloc(N * sizeof(float) + 4);
            double thr = refi_fusion_importance(p, &v, imp);
            same_double(tc, "threshold", is->threshold, thr);
            free(imp);
        }
        break;
    case MS_MERGE_PASS_SUMSQ: {
        unsigned char *keep = malloc(N + 1);
        double *sq = malloc(N * sizeof(double) + 8);
        refi_sce_keep(p, &v, keep);
        for (unsigned i = 1; i <= p->n_models; i++) {
            for (uint64_t e = 0; e < N; e++) {
                float t = refi_delta(&v, i, e) * (keep[e] ? 1.0f : 0.0f);
                sq[e] = (double)t * (double)t;
            }
            same_double(tc, "sum of squares", is->sum[i - 1], refi_blocked(sq, N));
        }
        free(sq);
        free(keep);
        break;
    }
    case MS_MERGE_PASS_COUNT: {
        uint64_t shared[MS_MAX_MODELS + 1], uniq[MS_MAX_MODELS + 1];
        refi_ram_counts(p, &v, shared, uniq);
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (is->shared[i] != shared[i])
                fail_stat(tc, "shared count", (double)is->shared[i], (double)shared[i]);
            if (is->unique[i] != uniq[i])
                fail_stat(tc, "unique count", (double)is->unique[i], (double)uniq[i]);
        }
        break;
    }
    default:
        break;
    }
    refi_free(&v);
}

/* Runs every pass; chunked: random row counts, different in each pass.
 * Each pass's statistics are checked after its host step. */
static void run_cpu(const tcase *tc, void *out, cpu_pool *pool, bool chunked)
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(p, &st), 0);
    assert_non_null(st->interp);
    unsigned passes = ms_merge_pass_count(p);
    assert_int_equal(passes, st->n_passes);
    for (unsigned pass = 0; pass < passes; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = test_chunk_rows(p->rows, r, chunked);
            ms_chunk c = test_chunk(p, tc->in, out, r, nr);
            assert_int_equal(cpu_merge_run_pass(p, st, pass, &c, pool), 0);
            r += nr;
        } while (r < p->rows);
        ms_merge_pass_finish(st, p, pass);
        if (pass + 1 < passes)
            check_stats(tc, st, pass);
    }
    ms_merge_state_close(st);
}

static void expect_same(const tcase *tc, const void *got, const void *want, const char *what)
{
    const ms_tensor_params *p = &tc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    if (memcmp(got, want, p->numel * osz) == 0)
        return;
    uint64_t e = 0;
    while (memcmp((const char *)got + e * osz, (const char *)want + e * osz, osz) == 0)
        e++;
    uint32_t g = 0, w = 0;
    memcpy(&g, (const char *)got + e * osz, osz);
    memcpy(&w, (const char *)want + e * osz, osz);
    char desc[4096];
    case_describe(tc, desc, sizeof desc);
    fail_msg("%s: element %" PRIu64 " is 0x%08" PRIx32 ", expected 0x%08" PRIx32 "; %s", what, e, g, w, desc);
}

/* The reference, then whole-tensor on 1 thread, then random chunks on 2
 * threads (windows of 1.5 blocks) and 3 threads (windows of 5,000 elements:
 * several inside one block, and rows longer than a window). */
static void check_case(tcase *tc)
{
    const ms_tensor_params *p = &tc->p;
    size_t bytes = p->numel * ref_dtype_size(p->out_dtype) + 8;
    unsigned char *want = malloc(bytes), *got = malloc(bytes);
    memset(want, 0, bytes);
    refi_merge(p, (const void *const *)tc->in, want);
    memset(got, 0xa5, bytes);
    run_cpu(tc, got, g_pool[1], false);
    expect_same(tc, got, want, "whole tensor, 1 thread");
    assert_int_equal(got[bytes - 8], 0xa5); /* nothing written past the end */
    for (unsigned t = 2; t <= 3; t++) {
        cpu_merge_interp_set_window_for_tests(t == 2 ? 3 * MS_MERGE_BLOCK / 2 : 5000);
        memset(got, 0x5a, bytes);
        run_cpu(tc, got, g_pool[t], true);
        expect_same(tc, got, want, t == 2 ? "chunked, 2 threads" : "chunked, 3 threads");
    }
    cpu_merge_interp_set_window_for_tests(0);
    free(got);
    free(want);
}

/* Every flavour on small shapes, then shapes that cross blocks. */
static void check_method(ms_method m)
{
    static const uint64_t shapes[][2] = {{1, 1},  {1, 7},   {5, 2},    {1, 1000}, {37, 129},
                                         {64, 64}, {200, 33}, {3, 5000}, {1, 2},   {9, 1}};
    unsigned k = 0;
    for (int fl = 0; fl < FL_COUNT; fl++) {
        for (int rep = 0; rep < 2; rep++, k++) {
            tcase tc;
            const uint64_t *sh = shapes[(k * 7 + rng_below(10)) % 10];
            case_make(&tc, m, sh[0], sh[1], (flavour)fl);
            check_case(&tc);
            case_free(&tc);
        }
    }
    static const uint64_t big[][2] = {{23, 9001}, {2, 70001}, {40, 4096}, {1, 140000}, {136, 8192}};
    /* the last one, 17 blocks, gives one thread's tasks 4 whole blocks: the lanes */
    for (int b = 0; b < (m == MS_METHOD_SLERP || m == MS_METHOD_MODEL_STOCK || m == MS_METHOD_NUSLERP ? 5 : 4);
         b++) {
        tcase tc;
        flavour fl = (flavour)rng_below(FL_COUNT);
        case_make(&tc, m, big[b][0], big[b][1], fl);
        if (b == 4) { /* make sure the tensor-wide Gram of two vectors runs */
            tc.p.t = 0.3;
            tc.p.nuslerp_flatten = true;
            tc.p.filter_wise = false;
            tc.p.n_models = m == MS_METHOD_MODEL_STOCK ? 2 : tc.p.n_models;
        }
        check_case(&tc);
        case_free(&tc);
    }
}

#define METHOD_TEST(fn, m)                                                                                 \
    static void fn(void **state)                                                                           \
    {                                                                                                      \
        (void)state;                                                                                       \
        check_method(m);                                                                                   \
    }
METHOD_TEST(test_slerp, MS_METHOD_SLERP)
METHOD_TEST(test_nuslerp, MS_METHOD_NUSLERP)
METHOD_TEST(test_multislerp, MS_METHOD_MULTISLERP)
METHOD_TEST(test_karcher, MS_METHOD_KARCHER)
METHOD_TEST(test_model_stock, MS_METHOD_MODEL_STOCK)
METHOD_TEST(test_nearswap, MS_METHOD_NEARSWAP)
METHOD_TEST(test_sce, MS_METHOD_SCE)
METHOD_TEST(test_ram, MS_METHOD_RAM)
METHOD_TEST(test_ramplus_tl, MS_METHOD_RAMPLUS_TL)
METHOD_TEST(test_arcee_fusion, MS_METHOD_ARCEE_FUSION)

/* ====================================================== by-hand checks */

/* A tcase of f32 inputs given as arrays. */
static void case_from(tcase *tc, ms_method m, uint64_t rows, uint64_t cols, unsigned n_models,
                      const float *const *vals)
{
    memset(tc, 0, sizeof *tc);
    ms_tensor_params *p = &tc->p;
    p->method = m;
    p->n_models = n_models;
    p->rows = rows;
    p->cols = cols;
    p->numel = rows * cols;
    p->has_base = true;
    p->lambda = 1.0f;
    p->out_dtype = ST_F32;
    for (unsigned i = 0; i <= n_models; i++) {
        p->in_dtype[i] = ST_F32;
        p->model_rows[i] = rows;
        p->weight[i] = 1.0f;
        tc->in[i] = malloc(p->numel * 4);
        memcpy(tc->in[i], vals[i], p->numel * 4);
    }
}

/* slerp of orthogonal unit vectors at t = 1/3 is (cos 30, sin 30); a model
 * near -1 times the base takes the lerp branch; t = 0 gives the base even
 * where the model is NaN; the planner skips the statistics pass then. */
static void test_slerp_by_hand(void **state)
{
    (void)state;
    float b[4] = {1, 0, 0, 0}, x[4] = {0, 1, 0, 0};
    const float *vals[2] = {b, x};
    tcase tc;
    case_from(&tc, MS_METHOD_SLERP, 1, 4, 1, vals);
    tc.p.t = 1.0 / 3.0;
    float out[4];
    run_cpu(&tc, out, g_pool[2], false);
    assert_true(fabs(out[0] - cos(M_PI / 6)) < 1e-6 && fabs(out[1] - sin(M_PI / 6)) < 1e-6);
    assert_true(out[2] == 0.0f && out[3] == 0.0f);
    assert_int_equal(ms_merge_pass_count(&tc.p), 2);
    /* antiparallel: lerp, (1 - t) b + t x */
    float *xx = tc.in[1];
    xx[0] = -2.0f;
    xx[1] = 1e-4f;
    tc.p.t = 0.25;
    run_cpu(&tc, out, g_pool[1], false);
    assert_true(out[0] == 0.75f * 1.0f + 0.25f * -2.0f);
    /* t = 0 and t = 1: exact copies, one pass */
    xx[2] = NAN;
    ((float *)tc.in[0])[3] = -0.0f;
    tc.p.t = 0.0;
    assert_int_equal(ms_merge_pass_count(&tc.p), 1);
    run_cpu(&tc, out, g_pool[3], true);
    assert_memory_equal(out, tc.in[0], 16);
    tc.p.t = 1.0;
    run_cpu(&tc, out, g_pool[1], false);
    assert_true(out[0] == -2.0f && isnan(out[2]));
    case_free(&tc);

    /* a norm of at most 1e-8 counts as 1: a tiny base parallel to the model
     * then looks orthogonal (dot 5e-9) and slerp runs at theta ~ pi/2; just
     * above 1e-8 it is parallel and lerp runs */
    float tb[2] = {3e-9f, 4e-9f}, tx[2] = {3.0f, 4.0f};
    const float *tv[2] = {tb, tx};
    case_from(&tc, MS_METHOD_SLERP, 1, 2, 1, tv);
    tc.p.t = 0.5;
    float o2[2];
    run_cpu(&tc, o2, g_pool[1], false);
    assert_true(fabs(o2[1] - 4.0 * sin(0.5 * acos(25e-9 / 5.0)) / sin(acos(25e-9 / 5.0))) < 1e-5);
    ((float *)tc.in[0])[0] = 1.2e-8f;
    ((float *)tc.in[0])[1] = 1.6e-8f; /* norm 2e-8: parallel, lerp */
    run_cpu(&tc, o2, g_pool[1], false);
    assert_true(o2[1] == 0.5f * 1.6e-8f + 0.5f * 4.0f);
    case_free(&tc);
}

/* nuslerp: weights summing to less than 1e-6 give t = 0.5 (mergekit); a
 * column-wise tensor of more rows than a block (the per-column sums carry
 * an open block of rows). multislerp: antipodal task vectors with equal
 * weights have a zero mean: the weighted sum. ramplus_tl by hand. */
static void test_interp_corners(void **state)
{
    (void)state;
    float b[2] = {0, 0}, x1[2] = {1, 0}, x2[2] = {0, 1};
    const float *vals[3] = {b, x1, x2};
    tcase tc;
    case_from(&tc, MS_METHOD_NUSLERP, 1, 2, 2, vals);
    tc.p.has_base = false;
    tc.p.nuslerp_flatten = true;
    tc.p.weight[1] = 0.5f;
    tc.p.weight[2] = -0.4999995f;
    float out[2];
    run_cpu(&tc, out, g_pool[1], false);
    assert_true(fabs(out[0] - sqrt(0.5)) < 1e-6 && fabs(out[1] - sqrt(0.5)) < 1e-6);
    case_free(&tc);

    float ab[4] = {0, 0, 0, 0}, a1[4] = {1, 2, -1, 3}, a2[4] = {-1, -2, 1, -3};
    const float *av[3] = {ab, a1, a2};
    case_from(&tc, MS_METHOD_MULTISLERP, 1, 4, 2, av);
    tc.p.normalize_weights = true;
    tc.p.eps = 1e-8;
    float ao[4];
    run_cpu(&tc, ao, g_pool[2], false);
    for (int e = 0; e < 4; e++)
        assert_true(ao[e] == 0.0f); /* 0.5 a1 + 0.5 a2, not NaN */
    case_free(&tc);

    /* ramplus_tl: model 1 is nonzero at 0, 1, 2; model 2 at 0 and 3.
     * shared 1, unique 2: rho = 0.5 > alpha = 0.2, lambda 1 + 0.1 * 0.2; model 2:
     * rho = 1 / 1, lambda the same. Element 0: (1 + 4) / 2 */
    float rb[4] = {0, 0, 0, 0}, r1[4] = {1, 2, 3, 0}, r2[4] = {4, 0, 0, 5};
    const float *rv[3] = {rb, r1, r2};
    case_from(&tc, MS_METHOD_RAMPLUS_TL, 1, 4, 2, rv);
    tc.p.epsilon[1] = tc.p.epsilon[2] = 1e-5;
    tc.p.ram_r = 0.1;
    tc.p.ram_alpha = 0.2;
    float ro[4];
    run_cpu(&tc, ro, g_pool[3], false);
    float lam = (float)(1.0 + 0.1 * 0.2);
    assert_true(ro[0] == 5.0f / 2.0f && ro[1] == 2.0f * lam && ro[2] == 3.0f * lam && ro[3] == 5.0f * lam);
    tc.p.method = MS_METHOD_RAM;
    run_cpu(&tc, ro, g_pool[1], false);
    assert_true(ro[0] == 2.5f && ro[1] == 2.0f && ro[2] == 3.0f && ro[3] == 5.0f);
    case_free(&tc);

    /* nuslerp by columns over 140,001 rows (two blocks of rows complete), with and without a base */
    for (int base = 0; base < 2; base++) {
        case_make(&tc, MS_METHOD_NUSLERP, 140001, 2, FL_PLAIN);
        if (!base) {
            free(tc.in[0]);
            tc.in[0] = NULL;
        } else if (!tc.in[0]) {
            tc.in[0] = malloc(140001 * 2 * 4);
            tc.p.in_dtype[0] = ST_F32;
            for (int e = 0; e < 280002; e++)
                ((float *)tc.in[0])[e] = (float)(0.05 * rng_gauss());
        }
        tc.p.has_base = base;
        tc.p.nuslerp_flatten = false;
        tc.p.nuslerp_row_wise = true;
        check_case(&tc);
        case_free(&tc);
    }
}

/* model_stock: orthogonal task vectors give t = 0 (the base); equal task
 * vectors give cos = 1, t = 1 (the models' mean); filter_wise per row. */
static void test_model_stock_by_hand(void **state)
{
    (void)state;
    float b[6] = {1, 2, 3, 4, 5, 6}, x1[6] = {2, 2, 3, 5, 5, 6}, x2[6] = {1, 3, 3, 5, 5, 6};
    const float *vals[3] = {b, x1, x2};
    tcase tc;
    case_from(&tc, MS_METHOD_MODEL_STOCK, 2, 3, 2, vals);
    float out[6];
    /* row 0: d1 = (1,0,0), d2 = (0,1,0): orthogonal; row 1: d1 = d2 = (1,0,0) */
    tc.p.filter_wise = true;
    assert_int_equal(ms_merge_pass_count(&tc.p), 1);
    run_cpu(&tc, out, g_pool[2], true);
    assert_true(out[0] == 1 && out[1] == 2 && out[2] == 3);
    assert_true(out[3] == 5 && out[4] == 5 && out[5] == 6);
    /* whole tensor: cos = (0 + 1) / sqrt(2 * 2) = 0.5, t = 2 * 0.5 / 1.5 = 2/3 */
    tc.p.filter_wise = false;
    run_cpu(&tc, out, g_pool[1], false);
    float want[6];
    refi_merge(&tc.p, (const void *const *)tc.in, want);
    assert_memory_equal(out, want, sizeof out);
    assert_true(fabs(out[0] - (2.0 / 3.0 * 1.5 + 1.0 / 3.0)) < 1e-6);
    case_free(&tc);
}

/* sce keeps the top-k variances, ties by index; arcee_fusion's threshold. */
static void test_selection_by_hand(void **state)
{
    (void)state;
    /* variance over two models is ((d1 - d2) / 2)^2: equal for every element but e = 5 */
    float b[8] = {0}, x1[8] = {1, 1, 1, 1, 1, 3, 1, 1}, x2[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    const float *vals[3] = {b, x1, x2};
    tcase tc;
    case_from(&tc, MS_METHOD_SCE, 2, 4, 2, vals);
    tc.p.select_topk = 3.5 / 8; /* k = 3: element 5, then 0 and 1 */
    assert_int_equal(ms_merge_pass_count(&tc.p), 4);
    float out[8], want[8];
    run_cpu(&tc, out, g_pool[3], true);
    refi_merge(&tc.p, (const void *const *)tc.in, want);
    assert_memory_equal(out, want, sizeof out);
    for (int e = 0; e < 8; e++)
        if (e != 0 && e != 1 && e != 5)
            assert_true(out[e] == 0.0f);
    assert_true(out[5] != 0.0f && out[0] != 0.0f);
    /* a select_topk just below 1/2 (a gradient's 0.49999999999999994): k
     * is mergekit's int() of the fp32 product, 8 * 0.5 = 4, not 3 */
    tc.p.select_topk = nextafter(0.5, 0.0);
    run_cpu(&tc, out, g_pool[3], true);
    refi_merge(&tc.p, (const void *const *)tc.in, want);
    assert_memory_equal(out, want, sizeof out);
    assert_true(out[2] != 0.0f && out[3] == 0.0f);
    case_free(&tc);

    /* arcee_fusion on 1 row of 9 with kl > 0: importance = |d| * kl; ranks
     * 2, 4, 6 of the sorted |d| are 3, 5, 7 (times kl): the threshold is
     * (5 + 1.5 * (7 - 3)) kl = 11 kl, so only |d| = 20 is kept */
    float fb[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, fx[9] = {1, -2, 3, 4, 5, 6, 7, 8, 20};
    const float *fv[2] = {fb, fx};
    case_from(&tc, MS_METHOD_ARCEE_FUSION, 1, 9, 1, fv);
    float fo[9];
    run_cpu(&tc, fo, g_pool[2], false);
    for (int e = 0; e < 9; e++)
        assert_true(fo[e] == (e == 8 ? 20.0f : 0.0f));
    case_free(&tc);
    /* the quartiles all equal 1 kl: the threshold is 1 kl, and importance
     * equal to it is kept (>=) */
    float gx[9] = {0, 1, -1, 1, 1, -1, 1, 1, 5};
    fv[1] = gx;
    case_from(&tc, MS_METHOD_ARCEE_FUSION, 1, 9, 1, fv);
    run_cpu(&tc, fo, g_pool[1], false);
    for (int e = 0; e < 9; e++)
        assert_true(fo[e] == gx[e]);
    case_free(&tc);
}

/* ======================================================= sum order */

/* Element e of three f32 patterns: tiny values with hashed mantissas and,
 * per block, one large value at a place that differs per block and, in
 * some blocks, per pattern (in the others two patterns' products are large
 * there). A fp64 sum of their products rounds differently in almost every
 * order, so any order but DESIGN.md's (each block sequentially, then the
 * block sums) shows; the data does not depend on the seed. (A sum of
 * positive terms rounds each term to the grid of its binade, so swaps
 * inside a binade do not show: the signed cross sums catch those.) */
static float order_value(unsigned pattern, uint64_t e)
{
    /* late in each block: the cross sums wander across binades until then */
    uint64_t b = e / 65536, i = e % 65536, shared = 65535 - (b * 7919) % 4096;
    uint64_t big_at = pattern == 0 ? shared : pattern == 1 ? (b % 2 ? 63000 + b : shared) : (b % 3 ? 65535 - 3 * b : shared);
    if (i == big_at) {
        float big = 1024.0f + 64.0f * (float)(b % 4 + pattern);
        return pattern == 1 ? -big : big;
    }
    uint64_t h = (e * 3 + pattern + 1) * UINT64_C(0x9E3779B97F4A7C15);
    h ^= h >> 29;
    h *= UINT64_C(0xBF58476D1CE4E5B9);
    float tiny = ldexpf(1.0f + (float)(h >> 41) * 0x1p-23f, -16); /* squares of 1 to 4 ulps of the large ones: each addition rounds */
    return pattern > 0 && (h & 1) ? -tiny : tiny; /* signed cross sums wander across binades: every swap shows */
}

/* The Gram sums pass 0 (GRAM) of tc leaves in is->sum: whole on 1 thread,
 * or in random row chunks on `threads` threads with windows of `window`. */
static void order_gram(const tcase *tc, unsigned threads, uint64_t window, double *sums)
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(p, &st), 0);
    assert_int_equal(st->pass[0], MS_MERGE_PASS_GRAM);
    cpu_merge_interp_set_window_for_tests(window);
    for (uint64_t r = 0; r < p->rows;) {
        uint64_t nr = threads == 1 ? p->rows : 1 + rng_next() % (p->rows - r);
        ms_chunk c = {.row0 = r, .n_rows = nr, .elem0 = r * p->cols, .n_elems = nr * p->cols};
        for (unsigned i = 0; i <= p->n_models; i++)
            c.in[i] = (const unsigned char *)tc->in[i] + c.elem0 * 4;
        assert_int_equal(cpu_merge_run_pass(p, st, 0, &c, g_pool[threads]), 0);
        r += nr;
    }
    cpu_merge_interp_set_window_for_tests(0);
    ms_merge_pass_finish(st, p, 0);
    memcpy(sums, st->interp->sum, st->interp->n_sums * sizeof(double));
    ms_merge_state_close(st);
}

/* Sums of t[0..n) in three wrong orders: one flat sequential sum, four
 * interleaved partial sums per block, the blocks folded last to first. */
static void order_wrong_sums(const double *t, uint64_t n, double wrong[3])
{
    double flat = 0.0, inter = 0.0, blk[64];
    uint64_t nb = (n + 65535) / 65536;
    assert_true(nb <= 64);
    for (uint64_t e = 0; e < n; e++)
        flat += t[e];
    for (uint64_t b = 0; b < nb; b++) {
        double part[4] = {0, 0, 0, 0}, seq = 0.0;
        for (uint64_t e = b * 65536; e < n && e < (b + 1) * 65536; e++) {
            part[e % 4] += t[e];
            seq += t[e];
        }
        inter += (part[0] + part[1]) + (part[2] + part[3]);
        blk[b] = seq;
    }
    double rev = 0.0;
    for (uint64_t b = nb; b-- > 0;)
        rev += blk[b];
    wrong[0] = flat;
    wrong[1] = inter;
    wrong[2] = rev;
}

/* The Gram sums of slerp (raw vectors, two inputs: eight lanes) and
 * model_stock (task vectors against a zero base: three or four inputs,
 * four lanes; three models: the general kernel) over 17 blocks and a
 * partial one are DESIGN.md's blocked sums bit for bit, on 1 to 3 threads
 * and any chunking, where each wrong order gives other bits. */
static void test_gram_sum_order(void **state)
{
    (void)state;
    const uint64_t rows = 1089, cols = 1024, n = rows * cols; /* 17 blocks and 1,088 elements */
    static const struct {
        ms_method m;
        unsigned n_models;
    } k_cases[] = {{MS_METHOD_SLERP, 1}, {MS_METHOD_MODEL_STOCK, 2}, {MS_METHOD_MODEL_STOCK, 3}};
    float *pat[3];
    for (unsigned k = 0; k < 3; k++) {
        pat[k] = malloc(n * sizeof(float));
        for (uint64_t e = 0; e < n; e++)
            pat[k][e] = order_value(k, e);
    }
    float *zero = calloc(n, sizeof(float));
    double *t = malloc(n * sizeof(double));
    for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++) {
        tcase tc;
        memset(&tc, 0, sizeof tc);
        ms_tensor_params *p = &tc.p;
        p->method = k_cases[c].m;
        p->n_models = k_cases[c].n_models;
        p->rows = rows;
        p->cols = cols;
        p->numel = n;
        p->has_base = true;
        p->lambda = 1.0f;
        p->t = 0.5;
        p->out_dtype = ST_F32;
        unsigned K = p->method == MS_METHOD_SLERP ? 2 : p->n_models;
        for (unsigned i = 0; i <= p->n_models; i++) {
            p->in_dtype[i] = ST_F32;
            p->model_rows[i] = rows;
            p->weight[i] = 1.0f;
            /* slerp's vectors are slots 0 and 1; model_stock's slots 1..n minus a zero base */
            const float *src = p->method == MS_METHOD_SLERP ? pat[i] : i == 0 ? zero : pat[i - 1];
            tc.in[i] = malloc(n * sizeof(float));
            memcpy(tc.in[i], src, n * sizeof(float));
        }
        double want[6], got[6];
        bool shows[3] = {false, false, false}; /* each wrong order changes some sum */
        unsigned q = 0;
        for (unsigned a = 0; a < K; a++) {
            for (unsigned b = a; b < K; b++, q++) {
                for (uint64_t e = 0; e < n; e++)
                    t[e] = (double)pat[a][e] * (double)pat[b][e];
                want[q] = refi_blocked(t, n);
                double wrong[3];
                order_wrong_sums(t, n, wrong);
                for (int w = 0; w < 3; w++)
                    shows[w] = shows[w] || wrong[w] != want[q];
            }
        }
        for (int w = 0; w < 3; w++)
            if (!shows[w])
                fail_msg("case %zu: wrong order %d gives the same bits: the test cannot fail", c, w);
        for (unsigned threads = 1; threads <= 3; threads++) {
            order_gram(&tc, threads, threads == 1 ? 0 : threads == 2 ? 3 * MS_MERGE_BLOCK / 2 : 5000, got);
            for (unsigned k = 0; k < q; k++)
                if (memcmp(&got[k], &want[k], sizeof got[k]) != 0)
                    fail_msg("case %zu, %u threads: Gram sum %u is %.17g, the blocked order gives %.17g", c, threads,
                             k, got[k], want[k]);
        }
        case_free(&tc);
    }
    free(t);
    free(zero);
    for (unsigned k = 0; k < 3; k++)
        free(pat[k]);
}

/* ms_interp_exp / ms_interp_log against libm on random arguments. */
static void test_exp_log(void **state)
{
    (void)state;
    for (int k = 0; k < 200000; k++) {
        double x = (rng_unit() * 2 - 1) * (k % 3 == 0 ? 700.0 : k % 3 == 1 ? 20.0 : 1e-3);
        double got = ms_interp_exp(x), want = exp(x);
        if (fabs(got - want) > 4e-16 * want)
            fail_msg("exp(%.17g) = %.17g, libm %.17g", x, got, want);
        double y = exp((rng_unit() * 2 - 1) * (k % 2 ? 700.0 : 2.0));
        double lg = ms_interp_log(y), lw = log(y);
        if (fabs(lg - lw) > 4e-16 * fabs(lw) + 1e-300 && fabs(lg - lw) > 2.3e-16)
            fail_msg("log(%.17g) = %.17g, libm %.17g", y, lg, lw);
    }
    assert_true(ms_interp_exp(0.0) == 1.0);
    assert_true(ms_interp_exp(-701.0) == 0.0);
    assert_true(isinf(ms_interp_exp(710.0)));
    assert_true(isnan(ms_interp_exp(NAN)));
    assert_true(ms_interp_log(1.0) == 0.0);
    assert_true(isinf(ms_interp_log(0.0)) && ms_interp_log(0.0) < 0);
    assert_true(isnan(ms_interp_log(-1.0)) && isnan(ms_interp_log(NAN)));
    assert_true(fabs(ms_interp_log(4.9406564584124654e-324) - log(4.9406564584124654e-324)) < 1e-12);
    assert_true(isinf(ms_interp_log(INFINITY)));
    /* order keys: monotone over the floats, NaN on top */
    float vals[] = {-INFINITY, -3.0f, -1e-40f, -0.0f, 0.0f, 1e-40f, 2.0f, INFINITY, NAN};
    for (int i = 0; i + 1 < 9; i++)
        assert_true(ms_interp_order_key(vals[i]) < ms_interp_order_key(vals[i + 1]));
    for (int i = 0; i < 8; i++)
        assert_true(ms_interp_order_value(ms_interp_order_key(vals[i])) == vals[i]);
}

/* multislerp and karcher agree with mergekit's algorithms on whole vectors
 * (fp64) to float precision: the Gram-matrix forms are exact rewrites. */
static void test_vector_agreement(void **state)
{
    (void)state;
    for (int rep = 0; rep < 20; rep++) {
        tcase tc;
        ms_method m = rep % 2 ? MS_METHOD_KARCHER : MS_METHOD_MULTISLERP;
        case_make(&tc, m, 7, 300, FL_PLAIN);
        ms_tensor_params *p = &tc.p;
        if (p->n_models < 2)
            p->n_models = 2;
        p->has_base = false;
        p->out_dtype = ST_F32;
        p->eps = 1e-8;
        p->tol = 1e-12;
        p->max_iter = 200;
        for (unsigned i = 0; i <= MS_MAX_MODELS; i++) {
            free(tc.in[i]);
            tc.in[i] = NULL;
        }
        uint64_t N = p->numel;
        double *x[MS_MAX_MODELS], w[MS_MAX_MODELS];
        for (unsigned i = 1; i <= p->n_models; i++) {
            p->in_dtype[i] = ST_F32;
            p->weight[i] = (float)(0.2 + rng_unit());
            w[i - 1] = p->weight[i];
            tc.in[i] = malloc(N * 4);
            x[i - 1] = malloc(N * sizeof(double));
            for (uint64_t e = 0; e < N; e++) {
                float v = (float)(0.02 * rng_gauss() + (e % 5 == 0 ? 0.03 : 0.0));
                ((float *)tc.in[i])[e] = v;
                x[i - 1][e] = v;
            }
        }
        float *got = malloc(N * 4);
        double *want = malloc(N * sizeof(double));
        run_cpu(&tc, got, g_pool[2], true);
        if (m == MS_METHOD_MULTISLERP)
            refi_vector_multislerp((const double *const *)x, w, p->n_models, N, p->normalize_weights, p->eps, want);
        else
            refi_vector_karcher((const double *const *)x, p->n_models, N, p->max_iter, p->tol, want);
        double maxabs = 0.0;
        for (uint64_t e = 0; e < N; e++)
            maxabs = fmax(maxabs, fabs(want[e]));
        for (uint64_t e = 0; e < N; e++)
            if (fabs((double)got[e] - want[e]) > 1e-5 * maxabs)
                fail_msg("%s: element %" PRIu64 " is %.9g, vector algorithm %.9g",
                         m == MS_METHOD_KARCHER ? "karcher" : "multislerp", e, (double)got[e], want[e]);
        for (unsigned i = 0; i < p->n_models; i++)
            free(x[i]);
        free(want);
        free(got);
        case_free(&tc);
    }
}

/* Plans and state sizes. */
static void test_plans(void **state)
{
    (void)state;
    ms_tensor_params p;
    memset(&p, 0, sizeof p);
    p.n_models = 2;
    p.rows = 10;
    p.cols = 100;
    p.numel = 1000;
    p.has_base = true;
    static const struct {
        ms_method m;
        unsigned passes;
    } k_plans[] = {
        {MS_METHOD_SLERP, 2},       {MS_METHOD_NUSLERP, 2}, {MS_METHOD_MULTISLERP, 2}, {MS_METHOD_KARCHER, 2},
        {MS_METHOD_MODEL_STOCK, 2}, {MS_METHOD_NEARSWAP, 1}, {MS_METHOD_SCE, 2},       {MS_METHOD_RAM, 1},
        {MS_METHOD_RAMPLUS_TL, 2},  {MS_METHOD_ARCEE_FUSION, 3},
    };
    for (size_t k = 0; k < sizeof k_plans / sizeof k_plans[0]; k++) {
        p.method = k_plans[k].m;
        p.t = 0.5;
        p.select_topk = 1.0;
        p.nuslerp_flatten = true;
        assert_true(ms_merge_interp_method(p.method));
        assert_int_equal(ms_merge_pass_count(&p), k_plans[k].passes);
        assert_true(ms_merge_state_bytes(&p) >= sizeof(ms_merge_state) + sizeof(ms_interp_state));
        assert_true(cpu_merge_scratch_bytes(&p, 1, 2) > cpu_merge_scratch_bytes(&p, 1, 1));
        assert_true(cpu_merge_scratch_bytes(&p, 1, 4) < (64u << 20));
    }
    assert_false(ms_merge_interp_method(MS_METHOD_TIES));
    p.method = MS_METHOD_SCE;
    p.select_topk = 0.5;
    assert_int_equal(ms_merge_pass_count(&p), 4);
    assert_true(ms_merge_state_bytes(&p) > (MS_INTERP_HI_BINS + MS_MERGE_LO_BINS) * 8);
    p.method = MS_METHOD_NUSLERP;
    p.nuslerp_flatten = false;
    p.nuslerp_row_wise = true;
    uint64_t cols_bytes = ms_merge_state_bytes(&p);
    assert_true(cols_bytes >= sizeof(ms_merge_state) + 100 * (3 + 3) * 8 + 100 * 8);
    p.method = MS_METHOD_SLERP;
    p.t = 0.0;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.t = 1.0;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_MODEL_STOCK;
    p.filter_wise = true;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_MULTISLERP;
    p.n_models = 1;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_KARCHER;
    p.has_base = false;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.has_base = true;
    assert_int_equal(ms_merge_pass_count(&p), 2);
}

/* MERGESTREAM_FAULT=host_alloc:3 (set in main): the interp state's array
 * allocation (the third host allocation: state, interp struct, arrays)
 * fails once, cleanly. Must run first. */
static void test_state_open_fault(void **state)
{
    (void)state;
    ms_tensor_params p;
    memset(&p, 0, sizeof p);
    p.method = MS_METHOD_ARCEE_FUSION;
    p.n_models = 1;
    p.has_base = true;
    p.rows = 2;
    p.cols = 50;
    p.numel = 100;
    ms_merge_state *st = (ms_merge_state *)&p;
    assert_int_equal(ms_merge_state_open(&p, &st), -ENOMEM);
    assert_null(st);
    assert_int_equal(ms_merge_state_open(&p, &st), 0);
    assert_non_null(st->interp);
    assert_non_null(st->interp->hist_hi);
    assert_non_null(st->interp->row_kl);
    ms_merge_state_close(st);
}

int main(void)
{
    setenv("MERGESTREAM_FAULT", "host_alloc:3", 1);
    g_rng = test_seed("test_cpu_merge_interp");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_open_fault),
        cmocka_unit_test(test_plans),
        cmocka_unit_test(test_exp_log),
        cmocka_unit_test(test_slerp_by_hand),
        cmocka_unit_test(test_model_stock_by_hand),
        cmocka_unit_test(test_gram_sum_order),
        cmocka_unit_test(test_selection_by_hand),
        cmocka_unit_test(test_interp_corners),
        cmocka_unit_test(test_vector_agreement),
        cmocka_unit_test(test_slerp),
        cmocka_unit_test(test_nuslerp),
        cmocka_unit_test(test_multislerp),
        cmocka_unit_test(test_karcher),
        cmocka_unit_test(test_model_stock),
        cmocka_unit_test(test_nearswap),
        cmocka_unit_test(test_sce),
        cmocka_unit_test(test_ram),
        cmocka_unit_test(test_ramplus_tl),
        cmocka_unit_test(test_arcee_fusion),
    };
    return cmocka_run_group_tests(tests, pools_open, pools_close);
}
