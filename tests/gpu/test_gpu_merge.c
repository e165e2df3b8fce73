/* The CUDA backend against the CPU backend, byte for byte (gpu/gpu_merge.cu
 * vs cpu/cpu_merge.c): every method, 1-5 models, every output dtype and
 * random input dtypes per model, 1-D and 2-D shapes (rows not a multiple of
 * the chunk, numel above 65,536 so L1 blocks straddle chunks, della rows of
 * 1,500 and 5,000 columns), quantised inputs (many exact ties in |delta|, so
 * the tie rule's eq_pos matters), NaN/Inf inputs.
 *
 * ties_sparsegpt and dare_sparsegpt too, with random saliency coefficients
 * (zero, tiny and huge ones among them) and some models on magnitude keys,
 * and regmean with random Hessians (its solve, and the mean without one).
 *
 * Each case runs the CPU and the GPU side by side over the same chunks
 * (whole tensor, then random chunks that differ per pass) and compares the
 * merge states after every chunk (histograms, bounds, eq_seen, L1 sums and
 * the open block, factors) and the output of every APPLY chunk; then once
 * more with each chunk given to the GPU or the CPU at random (what the
 * fallback does). A mismatch names the method, pass, chunk, field or element
 * and, for outputs, what the float64 reference says.
 *
 * Also: gpu_merge_chunk_bytes is an upper bound (a backend whose memory
 * limit is exactly that runs every chunk), the pool reuses its blocks and the
 * free estimate follows what it holds, pinned inputs work, four threads
 * calling the backend at once get the CPU's bytes (two lanes and one).
 *
 * Exit 77 without CUDA or without a device. The seed is printed; set
 * MS_TEST_SEED to replay. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>

#ifndef MERGESTREAM_HAVE_CUDA

int main(void)
{
    printf("SKIP: built without CUDA\n");
    return 77;
}

#else

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gpu/gpu_merge_interp.h"
#include "gpu_test_cases.h"

static gpu_backend *g_gpu;
static cpu_pool *g_pool;

_Noreturn static void fail_case(const tcase *tc, const char *label, const char *what)
{
    char desc[2048];
    case_describe(tc, desc, sizeof desc);
    fail_msg("%s: %s\n    case: %s", label, what, desc);
    abort(); /* fail_msg does not return */
}

/* What the float64 reference says about output element e (slow: only when
 * something already failed). */
static void ref_verdict(const tcase *tc, uint64_t e, const void *cpu_out, const void *gpu_out, char *buf, size_t len)
{
    const ms_tensor_params *p = &tc->p;
    if (p->numel > (3u << 20)) {
        snprintf(buf, len, "reference not run (tensor too large)");
        return;
    }
    if (ms_merge_hessian_method(p->method)) { /* test_cpu_merge_hessian.c checks the CPU's against its own */
        snprintf(buf, len, "reference not run (saliency keys)");
        return;
    }
    size_t osz = ref_dtype_size(p->out_dtype);
    unsigned char *ref = malloc(p->numel * osz + 8);
    if (!ref) {
        snprintf(buf, len, "reference not run (no memory)");
        return;
    }
    ref_merge(p, (const void *const *)tc->in, ref, NULL);
    bool cpu_ok = memcmp(ref + e * osz, (const char *)cpu_out + e * osz, osz) == 0;
    bool gpu_ok = memcmp(ref + e * osz, (const char *)gpu_out + e * osz, osz) == 0;
    uint32_t r = 0;
    memcpy(&r, ref + e * osz, osz);
    snprintf(buf, len, "the float64 reference has 0x%0*" PRIx32 ": %s", (int)(2 * osz), r,
             cpu_ok && !gpu_ok   ? "the GPU is wrong"
             : gpu_ok && !cpu_ok ? "the CPU is wrong"
             : cpu_ok            ? "both agree with it?"
                                 : "neither agrees with it");
    free(ref);
}

/* First differing element index of two whole outputs. */
static uint64_t first_diff(const void *a, const void *b, uint64_t n, size_t osz)
{
    for (uint64_t e = 0; e < n; e++)
        if (memcmp((const char *)a + e * osz, (const char *)b + e * osz, osz) != 0)
            return e;
    return n;
}

/* Every pass of tc on the CPU and on backend gb side by side over the same
 * chunks; states compared after every chunk, APPLY outputs per chunk. The
 * CPU's output goes to cpu_out when not NULL. */
static void check_lockstep(gpu_backend *gb, const tcase *tc, bool chunked, const char *label, void *cpu_out)
{
    const ms_tensor_params *p = &tc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    size_t bytes = p->numel * osz + 8;
    unsigned char *oc = malloc(bytes), *og = malloc(bytes);
    assert_non_null(oc);
    assert_non_null(og);
    memset(oc, 0xa5, bytes);
    memset(og, 0x5a, bytes);
    ms_merge_state *sc = NULL, *sg = NULL;
    assert_int_equal(case_state_open(tc, &sc), 0);
    assert_int_equal(case_state_open(tc, &sg), 0);
    char why[512], what[2048], msg[256], verdict[256];
    for (unsigned pass = 0; pass < sc->n_passes; pass++) {
        ms_merge_pass_kind kind = sc->pass[pass];
        uint64_t r = 0;
        unsigned k = 0;
        do {
            uint64_t nr = pick_rows(tc, r, chunked);
            ms_chunk cc = case_chunk(tc, r, nr, oc), cg = case_chunk(tc, r, nr, og);
            assert_int_equal(cpu_merge_run_pass(p, sc, pass, &cc, g_pool), 0);
            gpu_status gs = gpu_merge_run_pass(gb, p, sg, pass, &cg, msg, sizeof msg);
            snprintf(what, sizeof what, "pass %u of %u (%s), chunk %u = rows [%" PRIu64 ", %" PRIu64 ")", pass,
                     sc->n_passes, pass_kind_name(kind), k, r, r + nr);
            if (gs != GPU_OK) {
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": gpu_merge_run_pass returned %s: %s",
                         gs == GPU_OOM ? "GPU_OOM" : "GPU_FATAL", msg);
                fail_case(tc, label, what);
            }
            if (state_diff(sc, sg, p, why, sizeof why)) {
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": after the chunk the GPU state's %s", why);
                fail_case(tc, label, what);
            }
            if (kind == MS_MERGE_PASS_APPLY &&
                output_diff(cc.out, cg.out, p->out_dtype, cc.elem0, cc.n_elems, why, sizeof why)) {
                uint64_t e = cc.elem0 + first_diff(cc.out, cg.out, cc.n_elems, osz);
                ref_verdict(tc, e, oc, og, verdict, sizeof verdict);
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": GPU %s; %s", why, verdict);
                fail_case(tc, label, what);
            }
            r += nr;
            k++;
        } while (r < p->rows);
        ms_merge_pass_finish(sc, p, pass);
        ms_merge_pass_finish(sg, p, pass);
        if (state_diff(sc, sg, p, why, sizeof why)) {
            snprintf(what, sizeof what, "after pass %u (%s) finished, the GPU state's %s", pass, pass_kind_name(kind),
                     why);
            fail_case(tc, label, what);
        }
    }
    assert_int_equal(og[bytes - 8], 0x5a); /* nothing written past the end */
    if (output_diff(oc, og, p->out_dtype, 0, p->numel, why, sizeof why))
        fail_case(tc, label, why);
    if (cpu_out)
        memcpy(cpu_out, oc, p->numel * osz);
    ms_merge_state_close(sc);
    ms_merge_state_close(sg);
    free(oc);
    free(og);
}

/* One state, each chunk of each pass given to the GPU or the CPU at random:
 * the output must be want's bytes. */
static void check_mixed(const tcase *tc, const void *want, const char *label)
{
    const ms_tensor_params *p = &tc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    unsigned char *out = malloc(p->numel * osz + 8);
    assert_non_null(out);
    memset(out, 0x3c, p->numel * osz + 8);
    ms_merge_state *st = NULL;
    assert_int_equal(case_state_open(tc, &st), 0);
    char log[1024] = "", msg[256], why[512], what[2048];
    size_t lo = 0;
    for (unsigned pass = 0; pass < st->n_passes; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = pick_rows(tc, r, true);
            ms_chunk c = case_chunk(tc, r, nr, out);
            bool gpu = rng_next() % 2;
            if (lo + 40 < sizeof log)
                lo += (size_t)snprintf(log + lo, sizeof log - lo, " %s%u:%" PRIu64 "+%" PRIu64,
                                       gpu ? "G" : "C", pass, r, nr);
            if (gpu) {
                gpu_status gs = gpu_merge_run_pass(g_gpu, p, st, pass, &c, msg, sizeof msg);
                if (gs != GPU_OK) {
                    snprintf(what, sizeof what, "mixed run: pass %u rows [%" PRIu64 ", %" PRIu64 "): %s", pass, r,
                             r + nr, msg);
                    fail_case(tc, label, what);
                }
            } else {
                assert_int_equal(cpu_merge_run_pass(p, st, pass, &c, g_pool), 0);
            }
            r += nr;
        } while (r < p->rows);
        ms_merge_pass_finish(st, p, pass);
    }
    if (output_diff(want, out, p->out_dtype, 0, p->numel, why, sizeof why)) {
        snprintf(what, sizeof what, "GPU and CPU chunks mixed in one run (G/C pass:row+rows:%s): %s", log, why);
        fail_case(tc, label, what);
    }
    ms_merge_state_close(st);
    free(out);
}

/* Whole tensor, random chunks (small della windows every other case), and
 * mixed backends, for one case. */
static void check_case(const tcase *tc, unsigned idx)
{
    size_t bytes = tc->p.numel * ref_dtype_size(tc->p.out_dtype) + 8;
    unsigned char *want = malloc(bytes);
    assert_non_null(want);
    check_lockstep(g_gpu, tc, false, "whole tensor", want);
    gpu_merge_set_della_window_for_tests(idx % 2 ? 2000 : 0);
    check_lockstep(g_gpu, tc, true, idx % 2 ? "random chunks, della windows of 2000" : "random chunks", NULL);
    check_mixed(tc, want, "mixed");
    gpu_merge_set_della_window_for_tests(0);
    free(want);
}

static void check_method(const method_def *def)
{
    bool saliency = def->method == MS_METHOD_TIES_SPARSEGPT || def->method == MS_METHOD_DARE_SPARSEGPT;
    static const uint64_t shapes[][2] = {
        {1, 1},    {1, 7},     {5, 2},    {9, 1},     {1, 1000}, {37, 129}, {200, 33},
        {3, 5000}, {1, 70001}, /* 1-D, more than one L1 block */
        {23, 9001},            /* > 3 blocks, row boundaries inside blocks, 51 tie segments */
        {40, 4096},            /* chunks often end on a block boundary */
        {2, 70001},            /* rows longer than a block */
        {48, 1500},            /* della: rows of more than 1000 columns */
    };
    for (unsigned k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        uint64_t rows = shapes[k][0], cols = shapes[k][1];
        unsigned n_models = 1 + (unsigned)(rng_next() % (rows * cols > 100000 ? 3 : 5));
        tcase tc;
        case_make(&tc, def, rows, cols, n_models, k % 2 ? 1 : -1, k_dtypes[k % 3]);
        if (saliency) {
            tc.p.rescale = false; /* not a parameter of theirs */
            case_add_saliency(&tc);
        }
        check_case(&tc, k);
        case_free(&tc);
    }
}

#define METHOD_TEST(fn, idx)                                                                               \
    static void fn(void **state)                                                                           \
    {                                                                                                      \
        (void)state;                                                                                       \
        check_method(&k_methods[idx]);                                                                     \
    }
METHOD_TEST(test_linear, 0)
METHOD_TEST(test_task_arithmetic, 1)
METHOD_TEST(test_ties, 2)
METHOD_TEST(test_dare_ties, 3)
METHOD_TEST(test_dare_linear, 4)
METHOD_TEST(test_breadcrumbs, 5)
METHOD_TEST(test_breadcrumbs_ties, 6)
METHOD_TEST(test_della, 7)
METHOD_TEST(test_della_linear, 8)

/* ties' plan with saliency keys: their coefficients are in st->hessian (as
 * the Hessians' preparation leaves them), copied up with every call. */
static const method_def k_saliency_methods[] = {
    {"ties_sparsegpt", MS_METHOD_TIES_SPARSEGPT, MS_SPARSIFY_MAGNITUDE, true, true, false},
    {"dare_sparsegpt", MS_METHOD_DARE_SPARSEGPT, MS_SPARSIFY_MAGNITUDE, true, true, false},
};

static void test_ties_sparsegpt(void **state)
{
    (void)state;
    check_method(&k_saliency_methods[0]);
}

static void test_dare_sparsegpt(void **state)
{
    (void)state;
    check_method(&k_saliency_methods[1]);
}

/* regmean: the solve against the CPU's (whole rows in every chunk, widths
 * around the solve's 32-column blocks and the 64-wide tiles), and the mean
 * where a model has no Hessian. */
static void test_regmean(void **state)
{
    (void)state;
    static const method_def def = {"regmean", MS_METHOD_REGMEAN, MS_SPARSIFY_NONE, false, true, false};
    static const uint64_t shapes[][2] = {{1, 1}, {3, 2}, {7, 31}, {64, 32}, {65, 33}, {130, 64},
                                         {5, 65}, {200, 97}, {33, 128}, {70, 257}, {9, 300}};
    for (unsigned k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        tcase tc;
        case_make(&tc, &def, shapes[k][0], shapes[k][1], 1 + (unsigned)(rng_next() % 4), k % 2 ? 1 : -1,
                  k_dtypes[k % 3]);
        tc.p.rescale = false;
        case_add_hessians(&tc);
        check_case(&tc, k);
        case_free(&tc);
    }
}

/* Millions of elements: more tie segments than the scan has threads, many
 * L1 blocks per chunk, several della windows per chunk. */
static void test_large(void **state)
{
    (void)state;
    static const struct {
        const char *method;
        uint64_t rows, cols;
        unsigned n_models;
        int ties;
        uint64_t della_win;
    } cases[] = {
        {"ties", 1100, 4096, 3, 1, 0},
        {"breadcrumbs_ties", 600, 8192, 2, 1, 0},
        {"dare_ties", 1000, 3000, 3, 0, 0},
        {"della", 1000, 3000, 2, 1, 500000},
        {"della_linear", 300, 16384, 2, 0, 0},
    };
    for (unsigned k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        tcase tc;
        case_make(&tc, method_by_name(cases[k].method), cases[k].rows, cases[k].cols, cases[k].n_models,
                  cases[k].ties, ST_DTYPE_COUNT);
        tc.p.rescale = true; /* the L1 pass too */
        for (unsigned i = 1; i <= tc.p.n_models; i++)
            if (tc.p.density[i] >= 1.0 || tc.p.density[i] * (double)tc.p.numel < 2.0)
                tc.p.density[i] = tc.p.sparsify == MS_SPARSIFY_DELLA_MAGPRUNE ? 0.5 : 0.3;
        gpu_merge_set_della_window_for_tests(cases[k].della_win);
        check_lockstep(g_gpu, &tc, false, "large, whole tensor", NULL);
        check_lockstep(g_gpu, &tc, true, "large, random chunks", NULL);
        gpu_merge_set_della_window_for_tests(0);
        case_free(&tc);
    }
}

/* Every pass of tc on the GPU alone, in chunks of `rows` rows, into out.
 * Thread-safe (no shared random state): the concurrency test's worker. */
static gpu_status run_on_gpu(gpu_backend *gb, const tcase *tc, uint64_t rows, void *out, char *msg, size_t msg_len)
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    if (ms_merge_state_open(p, &st) != 0)
        return GPU_FATAL;
    gpu_status gs = GPU_OK;
    for (unsigned pass = 0; pass < st->n_passes && gs == GPU_OK; pass++) {
        for (uint64_t r = 0; r < p->rows && gs == GPU_OK; r += rows) {
            ms_chunk c = case_chunk(tc, r, p->rows - r < rows ? p->rows - r : rows, out);
            gs = gpu_merge_run_pass(gb, p, st, pass, &c, msg, msg_len);
        }
        ms_merge_pass_finish(st, p, pass);
    }
    ms_merge_state_close(st);
    return gs;
}

typedef struct concurrent_job {
    const tcase *tc;
    uint64_t rows;
    void *out;
    gpu_status status;
    char msg[256];
} concurrent_job;

static void *concurrent_worker(void *arg)
{
    concurrent_job *j = arg;
    for (unsigned rep = 0; rep < 3 && j->status == GPU_OK; rep++)
        j->status = run_on_gpu(g_gpu, j->tc, j->rows, j->out, j->msg, sizeof j->msg);
    return NULL;
}

/* Four threads merge four tensors on one backend at once (two lanes, so
 * calls wait for a lane, and one call's copies overlap another's kernels):
 * every output is the CPU's bytes. Then the same with one lane. */
static void test_concurrent_calls(void **state)
{
    (void)state;
    enum { N = 4 };
    static const char *methods[N] = {"ties", "della", "dare_ties", "breadcrumbs_ties"};
    tcase tc[N];
    void *want[N], *got[N];
    for (unsigned k = 0; k < N; k++) {
        case_make(&tc[k], method_by_name(methods[k]), 700 + 50 * k, 3000, 2 + k % 2, 1, ST_DTYPE_COUNT);
        for (unsigned i = 1; i <= tc[k].p.n_models; i++)
            if (tc[k].p.density[i] >= 1.0)
                tc[k].p.density[i] = 0.4;
        size_t bytes = tc[k].p.numel * ref_dtype_size(tc[k].p.out_dtype);
        want[k] = malloc(bytes);
        got[k] = malloc(bytes);
        assert_non_null(want[k]);
        assert_non_null(got[k]);
        check_lockstep(g_gpu, &tc[k], false, "concurrency reference", want[k]);
    }
    for (unsigned lanes = 2; lanes >= 1; lanes--) {
        gpu_backend_set_lanes(g_gpu, lanes);
        pthread_t th[N];
        concurrent_job jobs[N];
        for (unsigned k = 0; k < N; k++) {
            size_t bytes = tc[k].p.numel * ref_dtype_size(tc[k].p.out_dtype);
            memset(got[k], 0x77, bytes);
            jobs[k] = (concurrent_job){.tc = &tc[k], .rows = tc[k].p.rows / (k + 1) + 1, .out = got[k]};
            assert_int_equal(pthread_create(&th[k], NULL, concurrent_worker, &jobs[k]), 0);
        }
        for (unsigned k = 0; k < N; k++)
            pthread_join(th[k], NULL);
        char why[512], what[1024];
        for (unsigned k = 0; k < N; k++) {
            if (jobs[k].status != GPU_OK) {
                snprintf(what, sizeof what, "%u lane(s), thread %u: gpu_merge_run_pass failed: %s", lanes, k,
                         jobs[k].msg);
                fail_case(&tc[k], "concurrent calls", what);
            }
            if (output_diff(want[k], got[k], tc[k].p.out_dtype, 0, tc[k].p.numel, why, sizeof why)) {
                snprintf(what, sizeof what, "%u lane(s), thread %u: %s", lanes, k, why);
                fail_case(&tc[k], "concurrent calls", what);
            }
        }
    }
    gpu_backend_set_lanes(g_gpu, 2);
    for (unsigned k = 0; k < N; k++) {
        free(want[k]);
        free(got[k]);
        case_free(&tc[k]);
    }
}

/* A backend whose memory limit is gpu_merge_chunk_bytes(p, R) runs every
 * chunk of up to R rows: the bound is honest. */
static void test_chunk_bytes_bound(void **state)
{
    (void)state;
    char msg[256], why[512], what[1024];
    for (unsigned m = 0; m < N_METHODS + 2; m++) {
        const method_def *def = m < N_METHODS ? &k_methods[m] : &k_saliency_methods[m - N_METHODS];
        bool saliency = m >= N_METHODS;
        tcase tc;
        case_make(&tc, def, 64, 3000, 1 + (unsigned)(rng_next() % 4), 1, ST_DTYPE_COUNT);
        tc.p.rescale = def->method != MS_METHOD_LINEAR && !saliency;
        if (saliency)
            case_add_saliency(&tc);
        const ms_tensor_params *p = &tc.p;
        size_t osz = ref_dtype_size(p->out_dtype);
        unsigned char *want = malloc(p->numel * osz), *got = malloc(p->numel * osz);
        assert_true(run_cpu_only(&tc, want, g_pool, false));
        static const uint64_t chunk_rows[] = {64, 17, 1};
        for (unsigned ci = 0; ci < 3; ci++) {
            uint64_t R = chunk_rows[ci];
            uint64_t limit = gpu_merge_chunk_bytes(p, R);
            uint64_t in_bytes = R * p->cols * osz;
            for (unsigned i = 0; i <= p->n_models; i++)
                if (tc.in[i])
                    in_bytes += R * p->cols * ref_dtype_size(p->in_dtype[i]);
            if (limit < in_bytes)
                fail_case(&tc, "gpu_merge_chunk_bytes", "less than the chunk's input and output bytes");
            assert_true(gpu_merge_chunk_bytes(p, R + 1) >= limit);
            gpu_backend *b = NULL;
            assert_int_equal(gpu_backend_open(0, limit, &b, msg, sizeof msg), 0);
            assert_true(gpu_backend_free_estimate(b) <= limit);
            ms_merge_state *st = NULL;
            assert_int_equal(case_state_open(&tc, &st), 0);
            memset(got, 0, p->numel * osz);
            for (unsigned pass = 0; pass < st->n_passes; pass++) {
                for (uint64_t r = 0; r < p->rows; r += R) {
                    uint64_t nr = p->rows - r < R ? p->rows - r : R;
                    ms_chunk c = case_chunk(&tc, r, nr, got);
                    gpu_status gs = gpu_merge_run_pass(b, p, st, pass, &c, msg, sizeof msg);
                    if (gs != GPU_OK) {
                        snprintf(what, sizeof what,
                                 "memory limit gpu_merge_chunk_bytes(p, %" PRIu64 ") = %" PRIu64
                                 " bytes: pass %u (%s) rows [%" PRIu64 ", %" PRIu64 ") failed: %s",
                                 R, limit, pass, pass_kind_name(st->pass[pass]), r, r + nr, msg);
                        fail_case(&tc, "chunk bytes bound", what);
                    }
                    assert_true(gpu_backend_pool_held(b) <= limit);
                }
                ms_merge_pass_finish(st, p, pass);
            }
            if (output_diff(want, got, p->out_dtype, 0, p->numel, why, sizeof why))
                fail_case(&tc, "chunk bytes bound", why);
            ms_merge_state_close(st);
            gpu_backend_close(b);
        }
        free(want);
        free(got);
        case_free(&tc);
    }
    ms_tensor_params empty;
    memset(&empty, 0, sizeof empty);
    empty.n_models = 1;
    assert_int_equal(gpu_merge_chunk_bytes(&empty, 5), 0);
    /* every method runs on the GPU but passthrough (a planner's copy) */
    for (int m = 0; m < MS_METHOD_COUNT; m++) {
        ms_tensor_params q;
        memset(&q, 0, sizeof q);
        q.method = (ms_method)m;
        q.n_models = m == MS_METHOD_SLERP ? 1 : 2;
        q.has_base = true;
        q.rows = 1;
        q.cols = q.numel = 10;
        for (unsigned i = 0; i <= q.n_models; i++)
            q.in_dtype[i] = ST_BF16;
        q.out_dtype = ST_BF16;
        bool want = m <= MS_METHOD_DELLA_LINEAR || (m >= MS_METHOD_SLERP && m <= MS_METHOD_ARCEE_FUSION) ||
                    ms_merge_hessian_method((ms_method)m);
        assert_int_equal(gpu_merge_supports(&q), want);
        if (!want)
            assert_true(gpu_merge_chunk_bytes(&q, 1) == UINT64_MAX);
    }
}

/* The pool keeps its blocks (a second identical run allocates nothing new),
 * the free estimate is the estimate at open less what the pool holds, trim
 * gives it all back, and a memory limit caps the estimate. */
static void test_pool_and_estimate(void **state)
{
    (void)state;
    char why[256];
    gpu_backend *b = NULL;
    assert_int_equal(gpu_backend_open(0, 0, &b, why, sizeof why), 0);
    assert_true(gpu_backend_device_name(b)[0] != '\0');
    uint64_t e0 = gpu_backend_free_estimate(b);
    assert_int_equal(gpu_backend_pool_held(b), 0);
    assert_true(e0 > 0);
    tcase tc;
    case_make(&tc, &k_methods[2], 300, 1000, 3, 1, ST_BF16); /* ties: four kinds of calls */
    tc.p.rescale = true;
    check_lockstep(b, &tc, false, "pool, first run", NULL);
    uint64_t held = gpu_backend_pool_held(b);
    assert_true(held > 0);
    assert_int_equal(gpu_backend_free_estimate(b), e0 > held ? e0 - held : 0);
    check_lockstep(b, &tc, false, "pool, second run", NULL);
    if (gpu_backend_pool_held(b) != held)
        fail_msg("the pool grew from %" PRIu64 " to %" PRIu64 " bytes on an identical second run: blocks not reused",
                 held, gpu_backend_pool_held(b));
    gpu_backend_trim(b);
    assert_int_equal(gpu_backend_pool_held(b), 0);
    assert_int_equal(gpu_backend_free_estimate(b), e0);
    gpu_backend_close(b);
    case_free(&tc);

    assert_int_equal(gpu_backend_open(0, 64u << 20, &b, why, sizeof why), 0);
    assert_true(gpu_backend_free_estimate(b) <= (64u << 20));
    gpu_backend_close(b);
    gpu_backend_close(NULL);
}

/* Inputs in cudaHostRegister'ed memory merge the same. */
static void test_pinned_inputs(void **state)
{
    (void)state;
    assert_false(gpu_host_register(NULL, 0));
    tcase tc;
    case_make(&tc, &k_methods[3], 100, 2000, 3, 0, ST_F16); /* dare_ties */
    size_t len = 64u << 20;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(mem != MAP_FAILED);
    if (!gpu_host_register(mem, len))
        fail_msg("cudaHostRegister of 64 MiB of anonymous memory failed");
    size_t off = 0;
    for (unsigned i = 0; i <= tc.p.n_models; i++) {
        size_t n = tc.p.numel * ref_dtype_size(tc.p.in_dtype[i]);
        assert_true(off + n <= len);
        memcpy(mem + off, tc.in[i], n);
        free(tc.in[i]);
        tc.in[i] = mem + off;
        off += (n + 4095) / 4096 * 4096;
    }
    check_lockstep(g_gpu, &tc, true, "pinned inputs", NULL);
    gpu_host_unregister(mem);
    for (unsigned i = 0; i <= tc.p.n_models; i++)
        tc.in[i] = NULL;
    munmap(mem, len);
    case_free(&tc);
}

int main(void)
{
    g_rng = test_seed("test_gpu_merge");
    char why[256];
    if (gpu_backend_open(0, 0, &g_gpu, why, sizeof why) != 0) {
        printf("SKIP: no usable GPU (%s)\n", why);
        return 77;
    }
    printf("device: %s\n", gpu_backend_device_name(g_gpu));
    fflush(stdout);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (unsigned)ncpu;
    if (cpu_pool_open(threads, &g_pool) != 0) {
        printf("cannot start %u CPU threads\n", threads);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_and_estimate),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_task_arithmetic),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_dare_ties),
        cmocka_unit_test(test_dare_linear),
        cmocka_unit_test(test_breadcrumbs),
        cmocka_unit_test(test_breadcrumbs_ties),
        cmocka_unit_test(test_della),
        cmocka_unit_test(test_della_linear),
        cmocka_unit_test(test_ties_sparsegpt),
        cmocka_unit_test(test_dare_sparsegpt),
        cmocka_unit_test(test_regmean),
        cmocka_unit_test(test_large),
        cmocka_unit_test(test_concurrent_calls),
        cmocka_unit_test(test_chunk_bytes_bound),
        cmocka_unit_test(test_pinned_inputs),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpu_pool_close(g_pool);
    gpu_backend_close(g_gpu);
    return rc;
}

#endif
