/* The Hessian-aware methods' Cholesky factorisation on the GPU
 * (gpu/gpu_hessian_chol.cu) against the CPU's (ms_hessian_cholesky), bit
 * for bit: sizes around the 8 lanes and the 32-column blocks up to a few
 * thousand, damped random Hessians whose scales spread over decades (the
 * matrices the merges factor), the whole factor and the diagonal alone.
 * Also: a matrix that is not positive definite (a negative pivot in the
 * middle, a NaN) is reported and left unchanged, a memory limit below what
 * the factorisation needs is GPU_OOM with the matrix unchanged, and four
 * threads factoring at once get the CPU's bits.
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

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_backend.h"
#include "pipeline/merge_passes_hessian.h"

#include "../unit/test_rng.h"

static gpu_backend *g_gpu;

/* A damped Hessian of n inputs from n / 2 + 3 random rows (so that it is
 * often close to singular before damping), column scales over four decades,
 * one dead input. */
static double *make_matrix(uint64_t n)
{
    uint64_t N = n / 2 + 3;
    float *x = malloc(N * n * sizeof *x), *H = calloc(n * n, sizeof *H);
    double *a = malloc(n * n * sizeof *a), *scale = malloc(n * sizeof *scale);
    assert_true(x && H && a && scale);
    for (uint64_t j = 0; j < n; j++)
        scale[j] = pow(10.0, 4.0 * rng_unit() - 2.0);
    for (uint64_t t = 0; t < N * n; t++)
        x[t] = (float)(rng_gauss() * scale[t % n]);
    uint64_t dead = n > 2 ? 1 : n;
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = 0; j <= i; j++) {
            float s = 0.0f;
            for (uint64_t t = 0; t < N; t++)
                s += x[t * n + i] * x[t * n + j];
            s = i == dead || j == dead ? 0.0f : 2.0f * s / (float)N;
            H[i * n + j] = H[j * n + i] = s;
        }
    ms_hessian_damp(H, n, a);
    free(x);
    free(H);
    free(scale);
    return a;
}

/* The first entry of the lower triangle where got differs from want. */
static bool lower_diff(const double *want, const double *got, uint64_t n, uint64_t *r, uint64_t *c)
{
    for (*r = 0; *r < n; (*r)++)
        for (*c = 0; *c <= *r; (*c)++)
            if (memcmp(&want[*r * n + *c], &got[*r * n + *c], sizeof(double)) != 0)
                return true;
    return false;
}

static void check_size(uint64_t n)
{
    double *a = make_matrix(n);
    size_t bytes = n * n * sizeof *a;
    double *want = malloc(bytes), *got = malloc(bytes);
    assert_true(want && got);
    memcpy(want, a, bytes);
    assert_int_equal(ms_hessian_cholesky(want, n), 0);
    char msg[256];
    for (int diag_only = 0; diag_only <= 1; diag_only++) {
        memcpy(got, a, bytes);
        bool not_pd = true;
        gpu_status gs = gpu_hessian_cholesky(g_gpu, got, n, diag_only, &not_pd, msg, sizeof msg);
        if (gs != GPU_OK)
            fail_msg("n %" PRIu64 ": gpu_hessian_cholesky returned %d: %s", n, (int)gs, msg);
        assert_false(not_pd);
        uint64_t r, c;
        if (!diag_only && lower_diff(want, got, n, &r, &c))
            fail_msg("n %" PRIu64 ": L[%" PRIu64 "][%" PRIu64 "] is %.17g on the GPU, %.17g on the CPU", n, r, c,
                     got[r * n + c], want[r * n + c]);
        for (r = 0; r < n; r++)
            for (c = 0; c < n; c++) {
                /* diag_only: the diagonal is L's, every other entry a's; else the strict upper triangle is a's */
                bool from_l = diag_only ? r == c : c <= r;
                const double *src = from_l ? want : a;
                if (memcmp(&src[r * n + c], &got[r * n + c], sizeof(double)) != 0)
                    fail_msg("n %" PRIu64 "%s: entry [%" PRIu64 "][%" PRIu64 "] is %.17g, expected %.17g (%s)", n,
                             diag_only ? " (diagonal only)" : "", r, c, got[r * n + c], src[r * n + c],
                             from_l ? "L" : "left as it was");
            }
    }
    free(a);
    free(want);
    free(got);
}

static void test_sizes(void **state)
{
    (void)state;
    static const uint64_t sizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 39, 40, 63, 64, 65, 95, 96, 97,
                                     100, 127, 129, 255, 257, 300, 513, 1000, 1031, 2048, 2053};
    for (unsigned k = 0; k < sizeof sizes / sizeof *sizes; k++)
        check_size(sizes[k]);
}

/* A pivot that fails (in the diagonal block, or in a row below one), and a
 * NaN: reported as the CPU reports it, the matrix left as it was. */
static void test_not_positive_definite(void **state)
{
    (void)state;
    static const uint64_t cases[][2] = {{5, 3}, {40, 0}, {70, 33}, {70, 69}, {300, 200}};
    char msg[256];
    for (unsigned k = 0; k < sizeof cases / sizeof *cases; k++) {
        uint64_t n = cases[k][0], bad = cases[k][1];
        for (int nan = 0; nan <= 1; nan++) {
            double *a = make_matrix(n);
            a[bad * n + bad] = nan ? NAN : -a[bad * n + bad];
            size_t bytes = n * n * sizeof *a;
            double *cpu = malloc(bytes), *got = malloc(bytes);
            memcpy(cpu, a, bytes);
            memcpy(got, a, bytes);
            assert_int_equal(ms_hessian_cholesky(cpu, n), -EDOM);
            for (int diag_only = 0; diag_only <= 1; diag_only++) {
                bool not_pd = false;
                assert_int_equal(gpu_hessian_cholesky(g_gpu, got, n, diag_only, &not_pd, msg, sizeof msg), GPU_OK);
                assert_true(not_pd);
                assert_memory_equal(got, a, bytes);
            }
            free(a);
            free(cpu);
            free(got);
        }
    }
}

/* A backend capped below gpu_hessian_cholesky_bytes(n): GPU_OOM, a
 * unchanged, a message; capped at it: the CPU's bits. */
static void test_memory_limit(void **state)
{
    (void)state;
    const uint64_t n = 777;
    uint64_t need = gpu_hessian_cholesky_bytes(n);
    assert_true(need >= n * n * 8 && need != UINT64_MAX);
    assert_int_equal(gpu_hessian_cholesky_bytes(0), 0);
    assert_true(gpu_hessian_cholesky_bytes(UINT64_C(1) << 33) == UINT64_MAX);
    double *a = make_matrix(n);
    size_t bytes = n * n * sizeof *a;
    double *got = malloc(bytes), *want = malloc(bytes);
    memcpy(want, a, bytes);
    assert_int_equal(ms_hessian_cholesky(want, n), 0);
    char msg[256], why[256];
    gpu_backend *small = NULL;
    assert_int_equal(gpu_backend_open(0, need / 2, &small, why, sizeof why), 0);
    memcpy(got, a, bytes);
    bool not_pd = false;
    assert_int_equal(gpu_hessian_cholesky(small, got, n, false, &not_pd, msg, sizeof msg), GPU_OOM);
    assert_memory_equal(got, a, bytes);
    assert_true(strstr(msg, "MiB") != NULL);
    gpu_backend_close(small);
    gpu_backend *exact = NULL;
    assert_int_equal(gpu_backend_open(0, need, &exact, why, sizeof why), 0);
    assert_int_equal(gpu_hessian_cholesky(exact, got, n, false, &not_pd, msg, sizeof msg), GPU_OK);
    uint64_t r, c;
    assert_false(lower_diff(want, got, n, &r, &c));
    gpu_backend_close(exact);
    free(a);
    free(got);
    free(want);
}

typedef struct worker_arg {
    const double *a, *want;
    uint64_t n;
    int ok;
} worker_arg;

static void *worker(void *p)
{
    worker_arg *w = p;
    size_t bytes = w->n * w->n * sizeof(double);
    double *got = malloc(bytes);
    w->ok = got != NULL;
    char msg[256];
    for (unsigned rep = 0; rep < 3 && w->ok; rep++) {
        memcpy(got, w->a, bytes);
        bool not_pd = true;
        w->ok = gpu_hessian_cholesky(g_gpu, got, w->n, false, &not_pd, msg, sizeof msg) == GPU_OK && !not_pd;
        uint64_t r, c;
        w->ok = w->ok && !lower_diff(w->want, got, w->n, &r, &c);
    }
    free(got);
    return NULL;
}

static void test_concurrent(void **state)
{
    (void)state;
    static const uint64_t sizes[4] = {129, 600, 1024, 33};
    worker_arg w[4];
    pthread_t t[4];
    for (unsigned k = 0; k < 4; k++) {
        uint64_t n = sizes[k];
        double *a = make_matrix(n), *want = malloc(n * n * sizeof *want);
        memcpy(want, a, n * n * sizeof *a);
        assert_int_equal(ms_hessian_cholesky(want, n), 0);
        w[k] = (worker_arg){a, want, n, 0};
    }
    for (unsigned k = 0; k < 4; k++)
        assert_int_equal(pthread_create(&t[k], NULL, worker, &w[k]), 0);
    for (unsigned k = 0; k < 4; k++) {
        pthread_join(t[k], NULL);
        if (!w[k].ok)
            fail_msg("thread %u (n %" PRIu64 "): not the CPU's bits", k, w[k].n);
        free((void *)w[k].a);
        free((void *)w[k].want);
    }
}

int main(void)
{
    g_rng = test_seed("test_gpu_cholesky");
    char why[256];
    if (gpu_backend_open(0, 0, &g_gpu, why, sizeof why) != 0) {
        printf("SKIP: no usable GPU (%s)\n", why);
        return 77;
    }
    printf("device: %s\n", gpu_backend_device_name(g_gpu));
    fflush(stdout);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_not_positive_definite),
        cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_concurrent),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    gpu_backend_close(g_gpu);
    return rc;
}

#endif
