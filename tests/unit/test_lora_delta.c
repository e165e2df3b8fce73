/* LoRA deltas on the CPU (cpu/lora_delta.h).
 *
 * Targets are built in memory (no files) with fresh random factors and base
 * rows in random dtype mixes (F32 / BF16 / F16) and random shapes, then
 * cpu_lora_rows is checked two ways:
 *   - against a float64 reference of W + s * B @ A (and DoRA's renormalised
 *     rows or columns), within a tolerance derived from fp32's rounding
 *     (relative to |W| + |s| * sum_k |B||A|, times the rank);
 *   - bit for bit against a slow scalar implementation of the documented
 *     fixed fp32 order, which is what makes the output independent of the
 *     machine, the chunking and the thread count.
 * Chunked and pooled runs must equal the whole-tensor run bit for bit. The
 * random seed is printed; MS_TEST_SEED=N replays a run. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "cpu/cpu_pool.h"
#include "cpu/lora_delta.h"
#include "io/peft_adapter.h"
#include "pipeline/merge_math.h"

/* ------------------------------------------------------------ randomness */

static uint64_t g_rng;

static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rnd_range(uint64_t lo, uint64_t hi) { return lo + rnd() % (hi - lo + 1); }

/* Uniform in [lo, hi), never exactly zero. */
static float rnd_float(float lo, float hi)
{
    float f = lo + (hi - lo) * (float)((rnd() >> 40) + 1) / 16777217.0f;
    return f == 0.0f ? 0.001f : f;
}

static st_dtype rnd_dtype(void)
{
    static const st_dtype k[] = {ST_F32, ST_BF16, ST_F16};
    return k[rnd() % 3];
}

/* ------------------------------------------------------------ tensors */

/* A tensor's raw bytes and its exact values. */
typedef struct tensor {
    st_tensor info;
    void *raw;
    double *val; /* the stored values, widened exactly */
} tensor;

static size_t elem_size(st_dtype dt) { return dt == ST_F32 ? 4 : 2; }

static double widen_one(const void *raw, st_dtype dt, uint64_t i)
{
    if (dt == ST_F32) {
        float f;
        memcpy(&f, (const char *)raw + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)raw + 2 * i, 2);
    return dt == ST_BF16 ? ms_bf16_to_f32(h) : ms_f16_to_f32(h);
}

static void tensor_make(tensor *t, const char *name, st_dtype dt, unsigned ndim, uint64_t d0, uint64_t d1, float lo,
                        float hi)
{
    memset(t, 0, sizeof *t);
    t->info.name = (char *)name;
    t->info.dtype = dt;
    t->info.ndim = ndim;
    t->info.shape[0] = d0;
    t->info.shape[1] = d1;
    t->info.numel = ndim == 1 ? d0 : d0 * d1;
    t->info.begin = 0;
    t->info.end = t->info.numel * elem_size(dt);
    t->raw = malloc(t->info.end ? t->info.end : 1);
    t->val = malloc((t->info.numel ? t->info.numel : 1) * sizeof(double));
    assert_non_null(t->raw);
    assert_non_null(t->val);
    for (uint64_t i = 0; i < t->info.numel; i++) {
        float f = rnd_float(lo, hi);
        if (dt == ST_F32) {
            memcpy((char *)t->raw + 4 * i, &f, 4);
        } else {
            uint16_t h = dt == ST_BF16 ? ms_f32_to_bf16(f) : ms_f32_to_f16(f);
            memcpy((char *)t->raw + 2 * i, &h, 2);
        }
        t->val[i] = widen_one(t->raw, dt, i);
    }
}

static void tensor_zero(tensor *t)
{
    memset(t->raw, 0, t->info.end);
    for (uint64_t i = 0; i < t->info.numel; i++)
        t->val[i] = 0.0;
}

static void tensor_free(tensor *t)
{
    free(t->raw);
    free(t->val);
}

/* ------------------------------------------------------------ a case */

typedef struct lcase {
    ms_lora_target t;
    tensor A, B, mag, base;
    bool dora;
    uint64_t rows, cols, rank;
} lcase;

/* A random target of `kind`; transposed for fan_in_fan_out and embeddings. */
static void case_make(lcase *c, ms_lora_kind kind, bool transposed, bool dora, uint64_t rows, uint64_t cols,
                      uint64_t rank)
{
    memset(c, 0, sizeof *c);
    c->rows = rows;
    c->cols = cols;
    c->rank = rank;
    c->dora = dora;
    c->t.base_name = "w";
    c->t.module = "m";
    c->t.kind = kind;
    c->t.rows = rows;
    c->t.cols = cols;
    tensor_make(&c->base, "w", rnd_dtype(), 2, rows, cols, -1.0f, 1.0f);
    if (kind == MS_LORA_REPLACE)
        return;
    c->t.transposed = transposed;
    uint64_t in = transposed ? rows : cols, out = transposed ? cols : rows;
    tensor_make(&c->A, "A", rnd_dtype(), 2, rank, in, -0.5f, 0.5f);
    tensor_make(&c->B, "B", rnd_dtype(), 2, out, rank, -0.5f, 0.5f);
    c->t.A = &c->A.info;
    c->t.B = &c->B.info;
    c->t.rank = (unsigned)rank;
    c->t.alpha = (double)rnd_range(1, 64);
    c->t.scale = (float)(c->t.alpha / (double)rank);
    if (dora) {
        uint64_t nf = transposed ? cols : rows;
        tensor_make(&c->mag, "m", rnd_dtype(), 1, nf, 0, 0.25f, 2.0f);
        c->t.magnitude = &c->mag.info;
        c->t.n_features = nf;
    }
}

static void case_free(lcase *c)
{
    tensor_free(&c->base);
    if (c->t.kind != MS_LORA_REPLACE) {
        tensor_free(&c->A);
        tensor_free(&c->B);
    }
    if (c->dora)
        tensor_free(&c->mag);
}

/* B[o][k] * A[k][n] for the element stored at (i, j). */
static void factor_index(const lcase *c, uint64_t i, uint64_t j, uint64_t k, uint64_t *bi, uint64_t *ai)
{
    uint64_t o = c->t.transposed ? j : i, n = c->t.transposed ? i : j;
    *bi = o * c->rank + k;
    *ai = k * (c->t.transposed ? c->rows : c->cols) + n;
}

/* The float64 reference and its tolerance per element. */
static void reference_f64(const lcase *c, double *ref, double *tol)
{
    const double u = 1.0 / 16777216.0; /* fp32's unit roundoff */
    uint64_t rows = c->rows, cols = c->cols;
    double s = c->t.scale;
    for (uint64_t i = 0; i < rows; i++) {
        for (uint64_t j = 0; j < cols; j++) {
            double w = c->base.val[i * cols + j], p = 0.0, pabs = 0.0;
            for (uint64_t k = 0; c->t.kind != MS_LORA_REPLACE && k < c->rank; k++) {
                uint64_t bi, ai;
                factor_index(c, i, j, k, &bi, &ai);
                p += c->B.val[bi] * c->A.val[ai];
                pabs += fabs(c->B.val[bi] * c->A.val[ai]);
            }
            double v = w + s * p;
            ref[i * cols + j] = v;
            /* sum of r products: r roundings of at most u * sum|b a|; then
             * the scale product and the add: one rounding each */
            tol[i * cols + j] = 2.0 * u * ((double)(c->rank + 2) * fabs(s) * pabs + fabs(w) + fabs(v));
        }
    }
    if (!c->dora)
        return;
    uint64_t nf = c->t.transposed ? cols : rows, len = c->t.transposed ? rows : cols;
    for (uint64_t f = 0; f < nf; f++) {
        double ss = 0.0, ss_err = 0.0;
        for (uint64_t e = 0; e < len; e++) {
            uint64_t idx = c->t.transposed ? e * cols + f : f * cols + e;
            ss += ref[idx] * ref[idx];
            ss_err += tol[idx] * tol[idx];
        }
        double norm = sqrt(ss), fac = c->mag.val[f] / norm;
        double rel_norm_err = sqrt(ss_err) / norm + 4.0 * u;
        for (uint64_t e = 0; e < len; e++) {
            uint64_t idx = c->t.transposed ? e * cols + f : f * cols + e;
            double v = ref[idx];
            ref[idx] = fac * v;
            tol[idx] = fabs(fac) * (tol[idx] + fabs(v) * (rel_norm_err + 4.0 * u));
        }
    }
}

/* The documented fixed fp32 order, one element at a time. */
static void reference_fixed_order(const lcase *c, float *out)
{
    uint64_t rows = c->rows, cols = c->cols;
    for (uint64_t i = 0; i < rows; i++) {
        for (uint64_t j = 0; j < cols; j++) {
            float w = (float)c->base.val[i * cols + j];
            if (c->t.kind == MS_LORA_REPLACE) {
                out[i * cols + j] = w;
                continue;
            }
            float acc = 0.0f;
            for (uint64_t k = 0; k < c->rank; k++) {
                uint64_t bi, ai;
                factor_index(c, i, j, k, &bi, &ai);
                float prod = (float)c->B.val[bi] * (float)c->A.val[ai];
                acc = k == 0 ? prod : acc + prod;
            }
            float d = c->t.scale * acc;
            out[i * cols + j] = w + d;
        }
    }
    if (!c->dora)
        return;
    uint64_t nf = c->t.transposed ? cols : rows, len = c->t.transposed ? rows : cols;
    for (uint64_t f = 0; f < nf; f++) {
        double total = 0.0;
        for (uint64_t b0 = 0; b0 < len; b0 += 65536) {
            double blk = 0.0;
            for (uint64_t e = b0; e < len && e < b0 + 65536; e++) {
                uint64_t idx = c->t.transposed ? e * cols + f : f * cols + e;
                blk += (double)out[idx] * (double)out[idx];
            }
            total += blk;
        }
        float fac = (float)(c->mag.val[f] / sqrt(total));
        for (uint64_t e = 0; e < len; e++) {
            uint64_t idx = c->t.transposed ? e * cols + f : f * cols + e;
            out[idx] = fac * out[idx];
        }
    }
}

static cpu_lora *case_open(const lcase *c)
{
    cpu_lora *l = NULL;
    const void *a = c->t.kind == MS_LORA_REPLACE ? NULL : c->A.raw;
    const void *b = c->t.kind == MS_LORA_REPLACE ? NULL : c->B.raw;
    assert_int_equal(cpu_lora_open(&c->t, a, b, c->dora ? c->mag.raw : NULL, &l), 0);
    assert_non_null(l);
    return l;
}

static const unsigned char *base_row(const lcase *c, uint64_t row)
{
    return (const unsigned char *)c->base.raw + row * c->cols * elem_size(c->base.info.dtype);
}

/* Random cut of [0, rows) into chunks: chunk k is [cuts[k], cuts[k + 1]). */
static size_t random_cuts(uint64_t rows, uint64_t *cuts, size_t max)
{
    size_t n = 0;
    cuts[n++] = 0;
    while (cuts[n - 1] < rows && n < max - 1) {
        uint64_t step = rnd_range(1, rows < 8 ? rows : rows / 3 + 1);
        cuts[n] = cuts[n - 1] + step > rows ? rows : cuts[n - 1] + step;
        n++;
    }
    cuts[n - 1] = rows;
    return n - 1;
}

/* Runs the statistics pass (if needed) in random chunks, then the rows. */
static void run_case(const lcase *c, cpu_lora *l, float *out, bool chunked, cpu_pool *pool)
{
    uint64_t cuts[66];
    size_t n = chunked ? random_cuts(c->rows, cuts, 66) : 1;
    if (!chunked) {
        cuts[0] = 0;
        cuts[1] = c->rows;
    }
    if (cpu_lora_needs_stats(l))
        for (size_t k = 0; k < n; k++)
            cpu_lora_stats_rows(l, base_row(c, cuts[k]), c->base.info.dtype, cuts[k], cuts[k + 1] - cuts[k], pool);
    /* rows in a random order of the chunks */
    size_t order[65];
    for (size_t k = 0; k < n; k++)
        order[k] = k;
    for (size_t k = n; k > 1; k--) {
        size_t x = rnd() % k, tmp = order[k - 1];
        order[k - 1] = order[x];
        order[x] = tmp;
    }
    for (size_t q = 0; q < n; q++) {
        size_t k = order[q];
        cpu_lora_rows(l, base_row(c, cuts[k]), c->base.info.dtype, cuts[k], cuts[k + 1] - cuts[k],
                      out + cuts[k] * c->cols, pool);
    }
}

/* Checks one case every way: f64 tolerance, fixed order bits, chunked and
 * pooled runs equal the whole run. */
static void check_case(lcase *c, cpu_pool *pool)
{
    uint64_t n = c->rows * c->cols;
    float *whole = malloc(n * sizeof(float)), *fixed = malloc(n * sizeof(float)),
          *chunked = malloc(n * sizeof(float));
    double *ref = malloc(n * sizeof(double)), *tol = malloc(n * sizeof(double));
    assert_true(whole && fixed && chunked && ref && tol);

    cpu_lora *l = case_open(c);
    run_case(c, l, whole, false, NULL);
    cpu_lora_close(l);

    reference_f64(c, ref, tol);
    for (uint64_t i = 0; i < n; i++) {
        if (!(fabs((double)whole[i] - ref[i]) <= tol[i]))
            fail_msg("element %" PRIu64 " (row %" PRIu64 "): got %.9g, float64 reference %.9g, tolerance %.3g "
                     "(rows %" PRIu64 " cols %" PRIu64 " rank %" PRIu64 " kind %d transposed %d dora %d)",
                     i, i / c->cols, (double)whole[i], ref[i], tol[i], c->rows, c->cols, c->rank, (int)c->t.kind,
                     c->t.transposed, c->dora);
    }
    reference_fixed_order(c, fixed);
    if (memcmp(whole, fixed, n * sizeof(float)) != 0) {
        for (uint64_t i = 0; i < n; i++)
            if (memcmp(&whole[i], &fixed[i], sizeof(float)))
                fail_msg("element %" PRIu64 ": %a differs from the fixed-order definition %a", i, (double)whole[i],
                         (double)fixed[i]);
    }
    for (int rep = 0; rep < 2; rep++) {
        l = case_open(c);
        memset(chunked, 0xff, n * sizeof(float));
        run_case(c, l, chunked, true, rep ? pool : NULL);
        cpu_lora_close(l);
        assert_memory_equal(chunked, whole, n * sizeof(float));
    }
    free(whole);
    free(fixed);
    free(chunked);
    free(ref);
    free(tol);
}

/* ------------------------------------------------------------ tests */

static cpu_pool *g_pool;

static void run_random(ms_lora_kind kind, bool transposed, bool dora, int reps, uint64_t max_dim)
{
    for (int rep = 0; rep < reps; rep++) {
        lcase c;
        uint64_t rows = rnd_range(1, max_dim), cols = rnd_range(1, max_dim), rank = rnd_range(1, 40);
        if (rep == 0) { /* whole register tiles and edges together */
            rows = 4 * rnd_range(1, 8) + 3;
            cols = 64 * rnd_range(1, 2) + 5;
        }
        case_make(&c, kind, transposed, dora, rows, cols, rank);
        check_case(&c, g_pool);
        case_free(&c);
    }
}

static void test_plain(void **state)
{
    (void)state;
    run_random(MS_LORA_LINEAR, false, false, 12, 150);
}

static void test_rslora_scale_and_high_rank(void **state)
{
    (void)state;
    /* the kernel takes the scale from the target; rsLoRA's alpha / sqrt(r)
     * is one more value to carry through, at ranks where sgemm would differ */
    for (int rep = 0; rep < 4; rep++) {
        lcase c;
        uint64_t rank = rnd_range(32, 128);
        case_make(&c, MS_LORA_LINEAR, false, false, rnd_range(1, 70), rnd_range(1, 300), rank);
        c.t.scale = (float)(c.t.alpha / sqrt((double)rank));
        check_case(&c, g_pool);
        case_free(&c);
    }
}

static void test_fan_in_fan_out(void **state)
{
    (void)state;
    run_random(MS_LORA_LINEAR, true, false, 10, 150);
}

static void test_embedding(void **state)
{
    (void)state;
    run_random(MS_LORA_EMBEDDING, true, false, 8, 200);
}

static void test_dora_rows(void **state)
{
    (void)state;
    run_random(MS_LORA_LINEAR, false, true, 10, 150);
}

static void test_dora_columns(void **state)
{
    (void)state;
    run_random(MS_LORA_LINEAR, true, true, 6, 150);
    run_random(MS_LORA_EMBEDDING, true, true, 6, 150);
}

/* DoRA norms across DESIGN.md's 65,536-element blocks: a row longer than a
 * block, and a column longer than a block (the statistics pass folds). */
static void test_dora_sum_blocks(void **state)
{
    (void)state;
    lcase c;
    case_make(&c, MS_LORA_LINEAR, false, true, 3, 65536 + 77, 3);
    check_case(&c, g_pool);
    case_free(&c);
    case_make(&c, MS_LORA_EMBEDDING, true, true, 2 * 65536 + 5, 3, 2);
    check_case(&c, g_pool);
    case_free(&c);
}

static void test_replace(void **state)
{
    (void)state;
    for (int rep = 0; rep < 4; rep++) {
        lcase c;
        case_make(&c, MS_LORA_REPLACE, false, false, rnd_range(1, 50), rnd_range(1, 90), 0);
        assert_int_equal(cpu_lora_host_bytes(&c.t), 0);
        check_case(&c, g_pool);
        case_free(&c);
    }
}

/* B = 0 (PEFT's initial state): the output is the base exactly. */
static void test_zero_delta_is_base(void **state)
{
    (void)state;
    for (int rep = 0; rep < 6; rep++) {
        lcase c;
        bool transposed = rep & 1;
        case_make(&c, rep < 4 ? MS_LORA_LINEAR : MS_LORA_EMBEDDING, transposed || rep >= 4, false, rnd_range(1, 60),
                  rnd_range(1, 130), rnd_range(1, 16));
        tensor_zero(&c.B);
        uint64_t n = c.rows * c.cols;
        float *out = malloc(n * sizeof(float));
        cpu_lora *l = case_open(&c);
        cpu_lora_rows(l, c.base.raw, c.base.info.dtype, 0, c.rows, out, g_pool);
        cpu_lora_close(l);
        for (uint64_t i = 0; i < n; i++) {
            float w = (float)c.base.val[i];
            assert_true(out[i] == w);
            if (w != 0.0f)
                assert_memory_equal(&out[i], &w, sizeof w);
        }
        free(out);
        case_free(&c);
    }
}

/* The statistics pass must come first, in row order; one test that the flag
 * is what the header says and that the byte estimate covers the factors. */
static void test_needs_stats_and_bytes(void **state)
{
    (void)state;
    lcase c;
    case_make(&c, MS_LORA_LINEAR, false, true, 9, 11, 3);
    cpu_lora *l = case_open(&c);
    assert_false(cpu_lora_needs_stats(l));
    assert_true(cpu_lora_host_bytes(&c.t) >= 4 * 3 * (9 + 11) + 4 * 9);
    cpu_lora_close(l);
    case_free(&c);
    case_make(&c, MS_LORA_LINEAR, true, true, 9, 11, 3);
    l = case_open(&c);
    assert_true(cpu_lora_needs_stats(l));
    assert_true(cpu_lora_host_bytes(&c.t) >= 4 * 3 * (9 + 11) + 4 * 11 + 16 * 11);
    cpu_lora_close(l);
    case_free(&c);
    case_make(&c, MS_LORA_EMBEDDING, true, false, 9, 11, 3);
    l = case_open(&c);
    assert_false(cpu_lora_needs_stats(l));
    cpu_lora_close(l);
    case_free(&c);
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    fprintf(stderr, "test_lora_delta: MS_TEST_SEED=%" PRIu64 "\n", g_rng);
    if (cpu_pool_open(3, &g_pool) != 0) {
        fprintf(stderr, "cannot start a thread pool\n");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain),
        cmocka_unit_test(test_rslora_scale_and_high_rank),
        cmocka_unit_test(test_fan_in_fan_out),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_dora_rows),
        cmocka_unit_test(test_dora_columns),
        cmocka_unit_test(test_dora_sum_blocks),
        cmocka_unit_test(test_replace),
        cmocka_unit_test(test_zero_delta_is_base),
        cmocka_unit_test(test_needs_stats_and_bytes),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpu_pool_close(g_pool);
    return rc;
}
