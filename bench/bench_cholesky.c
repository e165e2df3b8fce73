/* bench_cholesky: the Hessian methods' fp64 Cholesky factorisation
 * (ms_hessian_cholesky_pool) on one random SPD matrix, blocked on 1..T
 * threads, against the plain row-oriented loop it replaced (a copy kept
 * here); the factors must be the same bits. --gpu: also on the GPU
 * (gpu_hessian_cholesky, the same order; the whole factor back, and only
 * its diagonal as the saliency coefficients need), which must give the
 * same bits too.
 *
 *   bench_cholesky [--n N] [--threads T] [--no-old] [--gpu]
 *
 * Defaults: n 2048, T = all cores. --no-old skips the slow reference (the
 * bit comparison is then only between thread counts and the GPU). Prints
 * one "key value" line per figure: seconds and GFLOP/s (n^3 / 3 flops; the
 * GPU's seconds include the copies both ways). */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu/cpu_pool.h"
#include "pipeline/backend_registry.h"
#include "pipeline/merge_passes_hessian.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The factorisation before blocking (tests/unit/test_hessian_cholesky.c
 * keeps the same reference). */
static double old_dot(const double *a, const double *b, uint64_t n)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t m = 0;
    for (; m + 8 <= n; m += 8)
        for (unsigned l = 0; l < 8; l++)
            acc[l] = acc[l] + a[m + l] * b[m + l];
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; m < n; m++)
        s = s + a[m] * b[m];
    return s;
}

static int old_cholesky(double *a, uint64_t n)
{
    for (uint64_t j = 0; j < n; j++) {
        double *lj = a + j * n;
        for (uint64_t k = 0; k < j; k++) {
            const double *lk = a + k * n;
            lj[k] = (lj[k] - old_dot(lj, lk, k)) / lk[k];
        }
        double s = lj[j] - old_dot(lj, lj, j);
        if (!(s > 0.0))
            return -EDOM;
        lj[j] = sqrt(s);
    }
    return 0;
}

/* A strictly diagonally dominant symmetric matrix, rows scaled over decades. */
static void make_spd(double *a, uint64_t n)
{
    uint64_t x = 12345;
    for (uint64_t i = 0; i < n; i++) {
        double si = pow(10.0, (double)(i % 7) - 3.0);
        for (uint64_t j = 0; j < i; j++) {
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
            double r = (double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0;
            a[i * n + j] = a[j * n + i] = r * si * pow(10.0, (double)(j % 7) - 3.0);
        }
        a[i * n + i] = (double)n * si * si;
    }
}

static double factor_seconds(const double *a, double *work, uint64_t n, cpu_pool *pool, int use_old)
{
    memcpy(work, a, (size_t)(n * n) * sizeof *a);
    double t0 = now_s();
    int rc = use_old ? old_cholesky(work, n) : ms_hessian_cholesky_pool(work, n, pool);
    double t = now_s() - t0;
    if (rc != 0) {
        fprintf(stderr, "bench_cholesky: the matrix is not positive definite\n");
        exit(1);
    }
    return t;
}

/* The factorisation on the GPU, best of three, against ref's bits: 1 same,
 * 0 not, -1 no GPU (said on stderr). */
static int gpu_figures(const double *a, const double *ref, double *work, uint64_t n, double gflop)
{
    char why[256];
    ms_gpu *gpu = NULL;
    if (ms_gpu_open(0, &gpu, why, sizeof why) != 0) {
        fprintf(stderr, "bench_cholesky: no GPU: %s\n", why);
        return -1;
    }
    printf("gpu %s\n", ms_gpu_name(gpu));
    size_t bytes = (size_t)(n * n) * sizeof *a;
    int same = 1;
    for (int diag_only = 0; diag_only <= 1; diag_only++) {
        double best = 1e300;
        for (int rep = 0; rep < 3; rep++) {
            memcpy(work, a, bytes);
            bool not_pd = false;
            double t0 = now_s();
            ms_gpu_result r = ms_gpu_cholesky(gpu, work, n, diag_only, &not_pd, why, sizeof why);
            double t = now_s() - t0;
            if (r != MS_GPU_OK || not_pd) {
                fprintf(stderr, "bench_cholesky: GPU factorisation failed: %s\n", not_pd ? "not positive definite" : why);
                ms_gpu_close(gpu);
                return 0;
            }
            best = t < best ? t : best;
        }
        for (uint64_t r = 0; r < n; r++)
            for (uint64_t c = 0; c <= r; c++)
                if ((!diag_only || r == c) && memcmp(&work[r * n + c], &ref[r * n + c], sizeof(double)) != 0)
                    same = 0;
        printf("gpu_%s_seconds %.3f (%.2f GFLOP/s)\n", diag_only ? "diagonal" : "factor", best, gflop / best);
    }
    ms_gpu_close(gpu);
    return same;
}

int main(int argc, char **argv)
{
    uint64_t n = 2048;
    unsigned threads = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
    int run_old = 1, run_gpu = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--n") == 0 && i + 1 < argc)
            n = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = (unsigned)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--no-old") == 0)
            run_old = 0;
        else if (strcmp(argv[i], "--gpu") == 0)
            run_gpu = 1;
        else {
            fprintf(stderr, "usage: bench_cholesky [--n N] [--threads T] [--no-old] [--gpu]\n");
            return 2;
        }
    }
    if (n == 0 || threads == 0)
        return 2;
    size_t bytes = (size_t)(n * n) * sizeof(double);
    double *a = malloc(bytes), *ref = malloc(bytes), *got = malloc(bytes);
    if (!a || !ref || !got) {
        fprintf(stderr, "bench_cholesky: out of memory for n %llu\n", (unsigned long long)n);
        return 1;
    }
    make_spd(a, n);
    double gflop = (double)n * (double)n * (double)n / 3.0 * 1e-9;
    printf("n %llu\n", (unsigned long long)n);
    if (run_old) {
        double t = factor_seconds(a, ref, n, NULL, 1);
        printf("old_1_thread_seconds %.3f (%.2f GFLOP/s)\n", t, gflop / t);
    }
    int same = 1, have_ref = run_old;
    for (unsigned t = 1; t <= threads; t++) {
        if (t != 1 && t != threads && t != 2)
            continue;
        cpu_pool *pool = NULL;
        if (cpu_pool_open(t, &pool) != 0) {
            fprintf(stderr, "bench_cholesky: cannot start %u threads\n", t);
            return 1;
        }
        double s = factor_seconds(a, got, n, pool, 0);
        cpu_pool_close(pool);
        printf("blocked_%u_threads_seconds %.3f (%.2f GFLOP/s)\n", t, s, gflop / s);
        if (!have_ref) {
            memcpy(ref, got, bytes);
            have_ref = 1;
        } else if (memcmp(ref, got, bytes) != 0) {
            same = 0;
        }
    }
    int gpu_same = run_gpu ? gpu_figures(a, ref, got, n, gflop) : -1;
    if (gpu_same == 0)
        same = 0;
    printf("bit_identical %s%s\n",
           same ? (run_old ? "yes (old and every thread count" : "yes (thread counts") : "NO",
           same ? (gpu_same == 1 ? ", the GPU)" : ")") : "");
    free(a);
    free(ref);
    free(got);
    return same ? 0 : 1;
}
