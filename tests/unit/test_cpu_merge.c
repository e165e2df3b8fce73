/* Tests for the CPU merge kernels (cpu/cpu_merge.c), the pass plan
 * (pipeline/merge_passes.c) and the thread pool (cpu/cpu_pool.c).
 *
 * Every method runs on fresh random tensors against the float64 reference in
 * merge_reference.h, byte for byte: 1-D and 2-D shapes, numel above 65,536
 * (L1 blocks straddle chunks and windows), every input/output dtype, 1-8
 * models, negative and zero weights, lambda != 1, normalize and rescale on
 * and off, densities giving k = 0, k = 1, k = numel - 1 and d = 1, quantised
 * deltas (many exact ties in |delta|), deltas of wildly different magnitudes
 * (so the fp64 L1 sums round and their order shows), -0 bases, NaN/Inf
 * inputs. Each case then runs
 * again cut into random row chunks (different per pass) with 2 and 3
 * threads and small windows, and whole on 2 threads, each with HIST_HI's
 * capture (ms_merge_capture) given room for every element, for a few, or
 * none: the bytes must not change. The seed is printed; set MS_TEST_SEED to
 * replay. */
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
#include <xxhash.h>

#include "cpu/cpu_capture.h"
#include "cpu/cpu_merge.h"
#include "pipeline/merge_passes.h"
#include "merge_cases.h"
#include "test_chunks.h"
#include "test_pools.h"

/* ============================================================== running */

/* Searched bounds over every run so far: resolved by HIST_HI's capture (with
 * a tie index list), and left to HIST_LO although the capture was armed. A
 * test of the capture checks both happen. */
static unsigned g_captured, g_captured_split, g_capture_missed;

static void count_captures(const ms_merge_state *st)
{
    for (unsigned i = 1; i <= st->n_models; i++)
        for (unsigned b = 0; b < 2; b++) {
            const ms_merge_bound *bd = &st->model[i].bound[b];
            if (!bd->capture.armed)
                continue;
            g_captured += !bd->search;
            g_captured_split += bd->capture.eq_index;
            g_capture_missed += bd->search;
        }
}

/* Runs every pass; chunked: random row counts, different in each pass. When
 * l1 is not NULL it receives each rescaled model's L1 sums after the L1
 * pass (the others are left alone). */
static void run_cpu(const tcase *tc, void *out, cpu_pool *pool, bool chunked, double (*l1)[2])
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(p, &st), 0);
    unsigned passes = ms_merge_pass_count(p);
    assert_int_equal(passes, st->n_passes);
    for (unsigned pass = 0; pass < passes; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = test_chunk_rows(p->rows, r, chunked);
            ms_chunk c = test_chunk(p, tc->in, out, r, nr);
            if (ms_merge_pass_idle(st, pass)) /* as the pipeline does */
                ms_merge_pass_skip_chunk(st, &c);
            else
                assert_int_equal(cpu_merge_run_pass(p, st, pass, &c, pool), 0);
            r += nr;
        } while (r < p->rows);
        ms_merge_pass_finish(st, p, pass);
        if (st->pass[pass] == MS_MERGE_PASS_HIST_HI)
            count_captures(st);
        if (l1 && st->pass[pass] == MS_MERGE_PASS_L1)
            for (unsigned i = 1; i <= p->n_models; i++)
                if (st->model[i].rescale) {
                    l1[i][0] = st->model[i].l1_delta;
                    l1[i][1] = st->model[i].l1_tau;
                }
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
    char desc[2048];
    case_describe(tc, desc, sizeof desc);
    fail_msg("%s: element %" PRIu64 " is 0x%08" PRIx32 ", expected 0x%08" PRIx32 "; %s", what, e, g, w, desc);
}

#define L1_UNSET (-12345.0) /* not computed */

/* The fp64 L1 sums must be the reference's bits: an error in the blocked
 * order would rarely survive to the fp32 factor. Models the kernels do not
 * rescale (nothing or everything kept: the factor is 1 either way) are
 * skipped; the reference computes their sums too. */
static void expect_same_l1(const tcase *tc, double (*got)[2], double (*want)[2], const char *what)
{
    for (unsigned i = 1; i <= tc->p.n_models; i++) {
        for (int k = 0; k < 2; k++) {
            if (got[i][k] == L1_UNSET || memcmp(&got[i][k], &want[i][k], sizeof(double)) == 0)
                continue;
            char desc[2048];
            case_describe(tc, desc, sizeof desc);
            fail_msg("%s: model %u L1 sum %d is %.17g, expected %.17g; %s", what, i, k, got[i][k], want[i][k],
                     desc);
        }
    }
}

/* The reference, then whole-tensor on 1 thread (no capture), random chunks
 * on 2 threads (windows of 1.5 blocks, room to capture every element) and 3
 * threads (windows of 1 block, room for a few), and whole on 2 threads with
 * room for every element. */
static void check_case(tcase *tc)
{
    const ms_tensor_params *p = &tc->p;
    size_t bytes = p->numel * ref_dtype_size(p->out_dtype) + 8;
    unsigned char *want = malloc(bytes), *got = malloc(bytes);
    double want_l1[MS_MAX_MODELS + 1][2], got_l1[MS_MAX_MODELS + 1][2];
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        want_l1[i][0] = want_l1[i][1] = got_l1[i][0] = got_l1[i][1] = L1_UNSET;
    memset(want, 0, bytes);
    ref_merge(p, (const void *const *)tc->in, want, want_l1);
    memset(got, 0xa5, bytes);
    run_cpu(tc, got, g_pool[1], false, got_l1);
    expect_same(tc, got, want, "whole tensor, 1 thread");
    expect_same_l1(tc, got_l1, want_l1, "whole tensor, 1 thread");
    assert_int_equal(got[bytes - 8], 0xa5); /* nothing written past the end */
    static const struct {
        unsigned threads;
        bool chunked;
        const char *what;
    } k_runs[] = {{2, true, "chunked, 2 threads"}, {3, true, "chunked, 3 threads"}, {2, false, "whole, 2 threads"}};
    for (unsigned r = 0; r < 3; r++) {
        if (r == 0)
            cpu_merge_set_windows_for_tests(3 * MS_MERGE_BLOCK / 2, 3000);
        else if (r == 1)
            cpu_merge_set_windows_for_tests(MS_MERGE_BLOCK, 20000);
        else
            cpu_merge_set_windows_for_tests(0, 0);
        tc->p.capture_entries = r == 1 ? 1 + p->numel / 64 : p->numel;
        memset(got, 0x5a, bytes);
        for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
            got_l1[i][0] = got_l1[i][1] = L1_UNSET;
        run_cpu(tc, got, g_pool[k_runs[r].threads], k_runs[r].chunked, got_l1);
        expect_same(tc, got, want, k_runs[r].what);
        expect_same_l1(tc, got_l1, want_l1, k_runs[r].what);
    }
    tc->p.capture_entries = 0;
    cpu_merge_set_windows_for_tests(0, 0);
    free(got);
    free(want);
}

static void check_method(const method_def *def)
{
    static const uint64_t shapes[][2] = {{1, 1},   {1, 7},    {5, 2},   {1, 1000}, {37, 129},
                                         {64, 64}, {200, 33}, {3, 5000}, {1, 2},    {9, 1}};
    for (int k = 0; k < 13; k++) {
        uint64_t rows, cols;
        unsigned n_models;
        if (k == 10) { /* > 3 blocks, row boundaries inside blocks */
            rows = 23, cols = 9001, n_models = 1 + (unsigned)(rng_next() % 3);
        } else if (k == 12) { /* chunks often end exactly on a block boundary */
            rows = 40, cols = 4096, n_models = 1 + (unsigned)(rng_next() % 2);
        } else if (k == 11) { /* rows longer than a block */
            rows = 2, cols = 70001, n_models = 1 + (unsigned)(rng_next() % 2);
        } else {
            rows = shapes[k % 10][0], cols = shapes[k % 10][1];
            n_models = 1 + (unsigned)(rng_next() % 8);
        }
        tcase tc;
        case_make(&tc, def, rows, cols, n_models, -1, ST_DTYPE_COUNT);
        check_case(&tc);
        case_free(&tc);
    }
}

#define METHOD_TEST(fn, idx)                                                                               \
    static void fn(void **state)                                                                           \
    {                                                                                                      \
        (void)state;                                                                                       \
        check_method(&k_methods[idx]);                                                                     \
    }
/* The methods that search: the random cases must also have taken HIST_HI's
 * capture, ties by index included (quantised inputs). */
#define SEARCH_METHOD_TEST(fn, idx)                                                                        \
    static void fn(void **state)                                                                           \
    {                                                                                                      \
        (void)state;                                                                                       \
        g_captured = g_captured_split = 0;                                                                 \
        check_method(&k_methods[idx]);                                                                     \
        assert_true(g_captured > 0);                                                                       \
        assert_true(g_captured_split > 0);                                                                 \
    }
METHOD_TEST(test_linear, 0)
METHOD_TEST(test_task_arithmetic, 1)
SEARCH_METHOD_TEST(test_ties, 2)
METHOD_TEST(test_dare_ties, 3)
METHOD_TEST(test_dare_linear, 4)
SEARCH_METHOD_TEST(test_breadcrumbs, 5)
SEARCH_METHOD_TEST(test_breadcrumbs_ties, 6)
METHOD_TEST(test_della, 7)
METHOD_TEST(test_della_linear, 8)

/* Selections whose outcome is known without the reference: the top-1 of a
 * tensor of equal |delta| is the first element; breadcrumbs drops the ends. */
static void test_selection_by_hand(void **state)
{
    (void)state;
    tcase tc;
    case_make(&tc, &k_methods[2], 4, 5, 1, -1, ST_DTYPE_COUNT); /* ties, 20 elements */
    ms_tensor_params *p = &tc.p;
    p->in_dtype[0] = p->in_dtype[1] = p->out_dtype = ST_F32;
    p->normalize = false;
    p->rescale = false;
    p->lambda = 1.0f;
    p->weight[1] = 1.0f;
    free(tc.in[0]);
    free(tc.in[1]);
    tc.in[0] = calloc(20, 4);
    tc.in[1] = malloc(20 * 4);
    for (int e = 0; e < 20; e++)
        ((float *)tc.in[1])[e] = (e % 2) ? 0.5f : -0.5f; /* all |delta| equal */
    float out[20];
    p->density[1] = 3.5 / 20; /* k = 3: elements 0, 1, 2 */
    run_cpu(&tc, out, g_pool[2], true, NULL);
    for (int e = 0; e < 20; e++)
        assert_true(out[e] == (e < 3 ? ((float *)tc.in[1])[e] : 0.0f));
    ((float *)tc.in[1])[17] = 2.0f; /* now the largest: kept first */
    run_cpu(&tc, out, g_pool[3], true, NULL);
    for (int e = 0; e < 20; e++)
        assert_true(out[e] == (e < 2 || e == 17 ? ((float *)tc.in[1])[e] : 0.0f));
    /* breadcrumbs, d = 0.5, top = 2: ranks [8, 18) of 20 kept; all ties but e = 17 */
    p->method = MS_METHOD_BREADCRUMBS;
    p->sparsify = MS_SPARSIFY_MAGNITUDE_OUTLIERS;
    p->consensus = false;
    p->density[1] = 0.5;
    p->gamma[1] = 2.5 / 20; /* top = 2, bottom = 8 */
    run_cpu(&tc, out, g_pool[1], true, NULL);
    /* ascending: equal keys by index (e != 17: ranks 0..18), then 17 (rank 19) */
    for (int e = 0; e < 20; e++) {
        int rank = e == 17 ? 19 : e < 17 ? e : e - 1;
        bool kept = rank >= 8 && rank < 18;
        assert_true(out[e] == (kept ? ((float *)tc.in[1])[e] : 0.0f));
    }
    case_free(&tc);
}

/* A TIES case of one f32 model over a zero f32 base, density 0.2, room to
 * capture an eighth of the elements; returns the model's values to fill. */
static float *capture_case(tcase *tc, uint64_t rows, uint64_t cols)
{
    case_make(tc, &k_methods[2], rows, cols, 1, -1, ST_DTYPE_COUNT); /* ties */
    ms_tensor_params *p = &tc->p;
    p->in_dtype[0] = p->in_dtype[1] = p->out_dtype = ST_F32;
    p->density[1] = 0.2;
    p->capture_entries = rows * cols / 8;
    free(tc->in[0]);
    free(tc->in[1]);
    tc->in[0] = calloc(rows * cols, sizeof(float));
    tc->in[1] = malloc(rows * cols * sizeof(float));
    assert_non_null(tc->in[0]);
    assert_non_null(tc->in[1]);
    return tc->in[1];
}

/* Checks got (a capture_case's f32 output) against the reference merge. */
static void expect_reference(const tcase *tc, const float *got)
{
    size_t bytes = (size_t)tc->p.numel * sizeof(float);
    float *want = malloc(bytes);
    assert_non_null(want);
    ref_merge(&tc->p, (const void *const *)tc->in, want, NULL);
    assert_memory_equal(got, want, bytes);
    free(want);
}

/* HIST_HI's capture when the first chunk misleads its sample: the range it
 * places misses the bound's bin (the first rows' deltas are far smaller than
 * the rest), or holds it but overflows (6% of the first rows' deltas, and
 * every later one, equal one key v at the first rows' 80th percentile).
 * Both must fall back to HIST_LO, and the tie counts, with the reference's
 * bytes. The overflow's data is fixed, not random, so that the sample
 * always finds v. */
static void test_capture_fallbacks(void **state)
{
    (void)state;
    enum { ROWS = 64, COLS = 1024, FIRST = 32 };
    for (int overflow = 0; overflow < 2; overflow++) {
        tcase tc;
        float *x = capture_case(&tc, ROWS, COLS);
        ms_tensor_params *p = &tc.p;
        for (int e = 0; e < ROWS * COLS; e++) {
            bool first = e < FIRST * COLS;
            if (!overflow) /* small deltas first, then large ones */
                x[e] = (float)(first ? 1e-3 * rng_unit() : 1.0 + rng_unit());
            else if (!first || (e % 100 >= 77 && e % 100 < 83)) /* v */
                x[e] = 0x1p-4f;
            else /* distinct keys: 77% in [v/4, v/2), 17% in [2v, 4v) */
                x[e] = (e % 100 < 77 ? 0x1p-6f : 0x1p-3f) * (1.0f + (float)(e % 4093) / 4096.0f);
        }
        float *got = malloc((size_t)ROWS * COLS * sizeof(float));
        assert_non_null(got);
        ms_merge_state *st = NULL;
        assert_int_equal(ms_merge_state_open(p, &st), 0);
        for (unsigned pass = 0; pass < st->n_passes; pass++) {
            ms_chunk c0 = test_chunk(p, tc.in, got, 0, FIRST), c1 = test_chunk(p, tc.in, got, FIRST, ROWS - FIRST);
            assert_int_equal(cpu_merge_run_pass(p, st, pass, &c0, g_pool[2]), 0);
            assert_int_equal(cpu_merge_run_pass(p, st, pass, &c1, g_pool[2]), 0);
            ms_merge_pass_finish(st, p, pass);
            if (st->pass[pass] != MS_MERGE_PASS_HIST_HI)
                continue;
            const ms_merge_capture *cap = &st->model[1].bound[0].capture;
            assert_true(cap->armed);
            assert_true(st->model[1].bound[0].search); /* left to HIST_LO */
            if (overflow)
                assert_true(cap->n > cap->cap);
            else
                assert_true(st->model[1].bound[0].bin > cap->bin_hi);
        }
        ms_merge_state_close(st);
        expect_reference(&tc, got);
        free(got);
        case_free(&tc);
    }
}

/* Deltas whose size grows with the column (as a weight's input channels
 * differ, and as saliency keys scale by column): the sample must still
 * place the range over the threshold, whatever the row length is against
 * the sample's stride (here the stride is a quarter of a row). */
static void test_capture_columns(void **state)
{
    (void)state;
    enum { ROWS = 256, COLS = 1024 };
    tcase tc;
    float *x = capture_case(&tc, ROWS, COLS);
    for (int e = 0; e < ROWS * COLS; e++)
        x[e] = (float)((1.0 + 15.0 * (e % COLS) / COLS) * (rng_unit() - 0.5));
    float *got = malloc((size_t)ROWS * COLS * sizeof(float));
    assert_non_null(got);
    g_captured = g_capture_missed = 0;
    run_cpu(&tc, got, g_pool[2], false, NULL);
    assert_int_equal(g_captured, 1);
    assert_int_equal(g_capture_missed, 0);
    expect_reference(&tc, got);
    free(got);
    case_free(&tc);
}

/* cpu_capture_select's every implementation this CPU runs against the obvious loop,
 * on every tile length up to 70 and random ranges; cpu_capture_range on
 * samples whose answer is known. */
static void test_capture_pieces(void **state)
{
    (void)state;
    uint32_t key[1024], got_key[1024 + CPU_CAPTURE_SLACK], got_index[1024 + CPU_CAPTURE_SLACK];
    for (int round = 0; round < 400; round++) {
        size_t n = round < 71 ? (size_t)round : 1 + rng_next() % 1024;
        uint32_t bin_lo = 100 + (uint32_t)(rng_next() % 8), bins = (uint32_t)(rng_next() % 4);
        for (size_t j = 0; j < n; j++) /* bins 96..115, so about a fifth match */
            key[j] = (uint32_t)(96 + rng_next() % 20) << 16 | (uint32_t)(rng_next() & 0xffff);
        uint32_t e = (uint32_t)rng_next();
        for (cpu_capture_isa isa = CPU_CAPTURE_PLAIN; isa <= CPU_CAPTURE_AVX512; isa++) {
            if (!cpu_capture_isa_available(isa))
                continue;
            size_t got = cpu_capture_select_isa(isa, key, n, bin_lo, bins, e, got_key, got_index), want = 0;
            for (size_t j = 0; j < n; j++) {
                if (key[j] >> 16 < bin_lo || key[j] >> 16 > bin_lo + bins)
                    continue;
                assert_true(want < got);
                assert_int_equal(got_key[want], key[j]);
                assert_int_equal(got_index[want], e + (uint32_t)j);
                want++;
            }
            assert_int_equal(got, want);
        }
    }
    static uint32_t hist[MS_MERGE_HI_BINS];
    uint32_t lo, hi;
    memset(hist, 0, sizeof hist);
    hist[500] = 1000; /* every sample in one bin */
    assert_true(cpu_capture_range(hist, 1000, 0.8, 1000000, 1250000, &lo, &hi)); /* 4/5 of it: just room */
    assert_int_equal(lo, 500);
    assert_int_equal(hi, 500);
    assert_false(cpu_capture_range(hist, 1000, 0.8, 1000000, 1249999, &lo, &hi)); /* no room */
    /* one sample a bin, 10,000 bins: the median's bin, then about 4 standard
     * deviations (200 samples) to either side, room permitting */
    memset(hist, 0, sizeof hist);
    for (uint32_t k = 0; k < 10000; k++)
        hist[1000 + k] = 1;
    assert_true(cpu_capture_range(hist, 10000, 0.5, 10000, 10000, &lo, &hi));
    assert_int_equal(lo, 1000 + 5000 - 201);
    assert_int_equal(hi, 1000 + 5000 + 201);
    assert_true(cpu_capture_range(hist, 10000, 0.5, 10000, 100, &lo, &hi)); /* 80 bins of room */
    assert_int_equal(hi - lo + 1, 80);
    assert_true(lo <= 6000 && 6000 <= hi);
    /* the rank sits at the bottom of its bin (1012 in [1010, 1060)): with room
     * for one more bin, the one below, though the one above is smaller */
    memset(hist, 0, sizeof hist);
    hist[99] = hist[103] = 1000;
    hist[100] = 10;
    hist[101] = 50;
    hist[102] = 5;
    assert_true(cpu_capture_range(hist, 2065, 1012.5 / 2065, 2065, 75, &lo, &hi)); /* room 60 */
    assert_int_equal(lo, 100);
    assert_int_equal(hi, 101);
}

/* dare's keep test on both sides of its boundary: density u / 2^32 gives the
 * threshold u exactly, so the element whose word is u is dropped; one more
 * keeps it. */
static void test_random_boundary(void **state)
{
    (void)state;
    tcase tc;
    case_make(&tc, &k_methods[4], 1, 8, 2, -1, ST_DTYPE_COUNT); /* dare_linear */
    ms_tensor_params *p = &tc.p;
    for (unsigned i = 0; i <= 2; i++)
        p->in_dtype[i] = ST_F32;
    p->out_dtype = ST_F32;
    p->rescale = false;
    p->normalize = false;
    p->lambda = 1.0f;
    p->weight[1] = p->weight[2] = 1.0f;
    for (unsigned i = 0; i <= 2; i++) {
        free(tc.in[i]);
        tc.in[i] = malloc(8 * 4);
        for (int e = 0; e < 8; e++)
            ((float *)tc.in[i])[e] = i == 0 ? 0.0f : (float)(1 + e) * (i == 1 ? 1.0f : 16.0f);
    }
    const uint64_t e = 5;
    for (int side = 0; side < 2; side++) {
        uint32_t u = ref_random_word(p->philox_key, e, 1); /* model 2 */
        p->density[1] = 1.0;
        p->density[2] = ldexp((double)u + side, -32);
        float out[8];
        run_cpu(&tc, out, g_pool[2], false, NULL);
        float want = 6.0f + (side ? 96.0f : 0.0f);
        assert_true(out[e] == want);
    }
    case_free(&tc);
}

/* ======================================================== plan, pool */

static void test_pass_plans(void **state)
{
    (void)state;
    ms_tensor_params p;
    memset(&p, 0, sizeof p);
    p.n_models = 2;
    p.rows = 10;
    p.cols = 100;
    p.numel = 1000;
    p.density[1] = p.density[2] = 0.3;
    p.epsilon[1] = p.epsilon[2] = 0.1;
    p.method = MS_METHOD_LINEAR;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_TIES;
    p.sparsify = MS_SPARSIFY_MAGNITUDE;
    assert_int_equal(ms_merge_pass_count(&p), 3);
    p.rescale = true;
    assert_int_equal(ms_merge_pass_count(&p), 4);
    assert_true(ms_merge_state_bytes(&p) >= 2 * (MS_MERGE_HI_BINS + MS_MERGE_LO_BINS) * 8);
    p.density[1] = p.density[2] = 1.0; /* nothing to select or rescale */
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.density[2] = 0.0001; /* k = 0: nothing kept, nothing searched */
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_DARE_TIES;
    p.sparsify = MS_SPARSIFY_RANDOM;
    p.density[1] = 0.5;
    assert_int_equal(ms_merge_pass_count(&p), 2);
    p.rescale = false;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    p.method = MS_METHOD_DELLA;
    p.sparsify = MS_SPARSIFY_DELLA_MAGPRUNE;
    p.rescale = true;
    assert_int_equal(ms_merge_pass_count(&p), 2);
    assert_true(cpu_merge_scratch_bytes(&p, 1, 4) > cpu_merge_scratch_bytes(&p, 1, 1));
    p.cols = 1000000;
    p.numel = 10000000;
    assert_true(cpu_merge_scratch_bytes(&p, 10, 2) > 2 * 1000000 * 24);
    assert_true(cpu_merge_scratch_bytes(&p, 10, 2) < 2 * 1000000 * 100 + (64u << 20));
    /* a tensor of no elements: one pass, nothing touched */
    p.method = MS_METHOD_TIES;
    p.sparsify = MS_SPARSIFY_MAGNITUDE;
    p.density[1] = 0.5;
    p.rows = 1;
    p.cols = 0;
    p.numel = 0;
    assert_int_equal(ms_merge_pass_count(&p), 1);
    ms_merge_state *st;
    assert_int_equal(ms_merge_state_open(&p, &st), 0);
    unsigned char dummy = 0x77;
    ms_chunk c = {.row0 = 0, .n_rows = 1, .elem0 = 0, .n_elems = 0, .in = {&dummy, &dummy, &dummy}, .out = &dummy};
    assert_int_equal(cpu_merge_run_pass(&p, st, 0, &c, g_pool[2]), 0);
    assert_int_equal(dummy, 0x77);
    ms_merge_state_close(st);
    ms_merge_state_close(NULL);
}

static void test_philox_key(void **state)
{
    (void)state;
    const char *name = "model.layers.3.mlp.down_proj.weight";
    uint32_t key[2];
    ms_merge_philox_key(name, 42, key);
    uint64_t h = XXH3_64bits_withSeed(name, strlen(name), 42);
    assert_int_equal(key[0], (uint32_t)h);
    assert_int_equal(key[1], (uint32_t)(h >> 32));
    uint32_t other[2];
    ms_merge_philox_key(name, 43, other);
    assert_true(other[0] != key[0] || other[1] != key[1]);
}

typedef struct pool_check {
    unsigned runs[1000];
    unsigned workers;
    unsigned bad_worker;
} pool_check;

static void pool_task(void *ctx, unsigned task, unsigned worker)
{
    pool_check *pc = ctx;
    __atomic_fetch_add(&pc->runs[task], 1, __ATOMIC_RELAXED);
    if (worker >= pc->workers)
        __atomic_fetch_add(&pc->bad_worker, 1, __ATOMIC_RELAXED);
}

static void test_pool(void **state)
{
    (void)state;
    for (unsigned t = 0; t <= 5; t++) {
        cpu_pool *pool;
        assert_int_equal(cpu_pool_open(t, &pool), 0);
        assert_int_equal(cpu_pool_size(pool), t ? t : 1);
        for (unsigned rep = 0; rep < 200; rep++) {
            pool_check pc;
            memset(&pc, 0, sizeof pc);
            pc.workers = cpu_pool_size(pool);
            unsigned n = (unsigned)(rng_next() % 40);
            if (rep == 0)
                n = 1000;
            cpu_pool_run(pool, n, pool_task, &pc);
            for (unsigned k = 0; k < 1000; k++)
                assert_int_equal(pc.runs[k], k < n ? 1 : 0);
            assert_int_equal(pc.bad_worker, 0);
        }
        cpu_pool_close(pool);
    }
    cpu_pool_close(NULL);
}

/* MERGESTREAM_FAULT=host_alloc:2 (set in main): the state's histogram
 * allocation fails once, cleanly. Must run first. */
static void test_state_open_fault(void **state)
{
    (void)state;
    ms_tensor_params p;
    memset(&p, 0, sizeof p);
    p.method = MS_METHOD_TIES;
    p.sparsify = MS_SPARSIFY_MAGNITUDE;
    p.n_models = 1;
    p.rows = 1;
    p.cols = p.numel = 100;
    p.density[1] = 0.5;
    ms_merge_state *st = (ms_merge_state *)&p;
    assert_int_equal(ms_merge_state_open(&p, &st), -ENOMEM);
    assert_null(st);
    assert_int_equal(ms_merge_state_open(&p, &st), 0);
    assert_non_null(st->model[1].hist_hi);
    ms_merge_state_close(st);
}

int main(void)
{
    setenv("MERGESTREAM_FAULT", "host_alloc:2", 1);
    g_rng = test_seed("test_cpu_merge");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_open_fault),
        cmocka_unit_test(test_pass_plans),
        cmocka_unit_test(test_philox_key),
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_selection_by_hand),
        cmocka_unit_test(test_random_boundary),
        cmocka_unit_test(test_capture_fallbacks),
        cmocka_unit_test(test_capture_pieces),
        cmocka_unit_test(test_capture_columns),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_task_arithmetic),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_dare_ties),
        cmocka_unit_test(test_dare_linear),
        cmocka_unit_test(test_breadcrumbs),
        cmocka_unit_test(test_breadcrumbs_ties),
        cmocka_unit_test(test_della),
        cmocka_unit_test(test_della_linear),
    };
    return cmocka_run_group_tests(tests, pools_open, pools_close);
}
