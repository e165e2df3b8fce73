/* The forward pass's GPU seam (gpu/gpu_gemm.cu) against OpenBLAS
 * (cpu_llama_gemm_blas) and a float64 reference, on random shapes: odd
 * sizes, both trans_b, leading dimensions above the minimum, beta 0 over
 * NaN and beta != 0; the Gram update on random upper triangles (the lower
 * one must stay untouched). Weights cached on the device are used while
 * unchanged and refreshed after gpu_gemm_forget_weights; the steady state
 * allocates nothing new. Failures: a --gpu-memory-limit too small, the fault
 * seam (this program re-runs itself with MERGESTREAM_FAULT=gpu_alloc:N and
 * gpu_alloc:1+) and an injected sticky error return -ENOMEM / -EIO and leave
 * C bit for bit unchanged.
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
#include <spawn.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "cpu/llama_forward.h"
#include "gpu/gpu_gemm.h"
#include "io/ms_fault.h"

#define CHILD_ENV "MS_GPU_GEMM_CHILD"

extern char **environ;

static uint64_t g_seed;
static uint64_t g_rng;

static uint64_t rng_next(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static uint64_t rng_range(uint64_t lo, uint64_t hi) { return lo + rng_next() % (hi - lo + 1); }
static float rng_float(void) { return (float)((double)(rng_next() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }

static float *rand_floats(uint64_t n)
{
    float *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (uint64_t i = 0; i < n; i++)
        p[i] = rng_float();
    return p;
}

static float *copy_floats(const float *src, uint64_t n)
{
    float *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    assert_non_null(p);
    memcpy(p, src, (size_t)n * sizeof *p);
    return p;
}

static gpu_gemm *open_gpu(uint64_t limit)
{
    char why[256];
    gpu_gemm *g = NULL;
    if (gpu_gemm_open(0, limit, &g, why, sizeof why) != 0)
        fail_msg("gpu_gemm_open: %s", why);
    return g;
}

/* ============================================================ sgemm */

typedef struct gemm_case {
    bool trans_b;
    uint64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
} gemm_case;

static gemm_case random_gemm_case(void)
{
    gemm_case c;
    c.trans_b = rng_next() & 1;
    c.m = rng_range(1, 300);
    c.n = rng_range(1, 300);
    c.k = rng_range(1, 700);
    c.lda = c.k + rng_range(0, 5);
    c.ldb = (c.trans_b ? c.k : c.n) + rng_range(0, 5);
    c.ldc = c.n + rng_range(0, 5);
    c.alpha = rng_next() & 1 ? 1.0f : 0.37f;
    c.beta = rng_next() % 3 == 0 ? 0.5f : 0.0f;
    return c;
}

static float b_at(const gemm_case *c, const float *b, uint64_t kk, uint64_t j)
{
    return c->trans_b ? b[j * c->ldb + kk] : b[kk * c->ldb + j];
}

/* Every element of got within a float32 rounding bound of the float64
 * reference: |got - ref| <= 1e-6 * (4 + sqrt(k)) * (|alpha| sum |a b| +
 * |beta c0|) + 1e-30. */
static void check_gemm(const gemm_case *c, const float *a, const float *b, const float *c0, const float *got,
                       const char *who)
{
    for (uint64_t i = 0; i < c->m; i++) {
        for (uint64_t j = 0; j < c->n; j++) {
            double ref = 0, mag = 0;
            for (uint64_t kk = 0; kk < c->k; kk++) {
                double p = (double)a[i * c->lda + kk] * (double)b_at(c, b, kk, j);
                ref += p;
                mag += fabs(p);
            }
            ref *= c->alpha;
            mag *= fabs(c->alpha);
            if (c->beta != 0.0f) {
                ref += (double)c->beta * c0[i * c->ldc + j];
                mag += fabs((double)c->beta * c0[i * c->ldc + j]);
            }
            double tol = 1e-6 * (4.0 + sqrt((double)c->k)) * mag + 1e-30;
            double v = got[i * c->ldc + j];
            if (!(fabs(v - ref) <= tol))
                fail_msg("%s: sgemm trans_b=%d m=%" PRIu64 " n=%" PRIu64 " k=%" PRIu64 " beta=%g: C[%" PRIu64
                         "][%" PRIu64 "] = %.9g, float64 says %.9g (tolerance %.3g); seed %" PRIu64,
                         who, c->trans_b, c->m, c->n, c->k, (double)c->beta, i, j, v, ref, tol, g_seed);
        }
        for (uint64_t j = c->n; j < c->ldc; j++) /* the padding of each row is never written */
            if (memcmp(&got[i * c->ldc + j], &c0[i * c->ldc + j], sizeof(float)) != 0)
                fail_msg("%s: sgemm wrote C[%" PRIu64 "][%" PRIu64 "] beyond n = %" PRIu64, who, i, j, c->n);
    }
}

static void test_sgemm_random(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    cpu_llama_gemm cpu = cpu_llama_gemm_blas();
    for (int t = 0; t < 40; t++) {
        gemm_case c = random_gemm_case();
        uint64_t b_rows = c.trans_b ? c.n : c.k;
        float *a = rand_floats(c.m * c.lda), *b = rand_floats(b_rows * c.ldb), *c0 = rand_floats(c.m * c.ldc);
        if (c.beta == 0.0f) /* beta = 0 ignores C, NaN included */
            for (uint64_t i = 0; i < c.m; i++)
                for (uint64_t j = 0; j < c.n; j++)
                    c0[i * c.ldc + j] = NAN;
        float *gc = copy_floats(c0, c.m * c.ldc), *cc = copy_floats(c0, c.m * c.ldc);
        bool weight = rng_next() & 1;
        int rc = gpu_gemm_sgemm(g, c.trans_b, c.m, c.n, c.k, c.alpha, a, c.lda, b, c.ldb, weight, c.beta, gc, c.ldc);
        if (rc != 0)
            fail_msg("gpu_gemm_sgemm returned %d: %s", rc, gpu_gemm_last_error(g));
        assert_int_equal(cpu.gemm(cpu.ctx, c.trans_b, c.m, c.n, c.k, c.alpha, a, c.lda, b, c.ldb, c.beta, cc, c.ldc,
                                  0),
                         0);
        check_gemm(&c, a, b, c0, cc, "OpenBLAS");
        check_gemm(&c, a, b, c0, gc, "GPU");
        gpu_gemm_forget_weights(g); /* b is freed: its address may come back with other contents */
        free(a);
        free(b);
        free(c0);
        free(gc);
        free(cc);
    }
    gpu_gemm_close(g);
}

/* A cached weight is used while unchanged, refreshed after
 * gpu_gemm_forget_weights; the steady state allocates no new block. */
static void test_sgemm_weight_cache(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    gemm_case c = {.trans_b = true, .m = 33, .n = 129, .k = 65, .lda = 65, .ldb = 65, .ldc = 129, .alpha = 1,
                   .beta = 0};
    float *a = rand_floats(c.m * c.lda), *w = rand_floats(c.n * c.ldb), *c0 = rand_floats(c.m * c.ldc);
    float *out = copy_floats(c0, c.m * c.ldc);
    assert_int_equal(gpu_gemm_sgemm(g, true, c.m, c.n, c.k, 1, a, c.lda, w, c.ldb, true, 0, out, c.ldc), 0);
    check_gemm(&c, a, w, c0, out, "GPU, weight uploaded");
    uint64_t held = gpu_gemm_held_bytes(g);
    assert_true(held > 0);
    for (int i = 0; i < 5; i++) {
        float *a2 = rand_floats(c.m * c.lda);
        assert_int_equal(gpu_gemm_sgemm(g, true, c.m, c.n, c.k, 1, a2, c.lda, w, c.ldb, true, 0, out, c.ldc), 0);
        check_gemm(&c, a2, w, c0, out, "GPU, weight cached");
        free(a2);
    }
    assert_int_equal(gpu_gemm_held_bytes(g), held); /* served from the pool's cache */
    for (uint64_t i = 0; i < c.n * c.ldb; i++) /* a new layer in the same memory */
        w[i] = rng_float();
    gpu_gemm_forget_weights(g);
    assert_int_equal(gpu_gemm_sgemm(g, true, c.m, c.n, c.k, 1, a, c.lda, w, c.ldb, true, 0, out, c.ldc), 0);
    check_gemm(&c, a, w, c0, out, "GPU, weight refreshed");
    assert_int_equal(gpu_gemm_held_bytes(g), held);
    free(a);
    free(w);
    free(c0);
    free(out);
    gpu_gemm_close(g);
}

/* ============================================================ Gram */

/* got (upper triangle) within a float32 bound of c0 + X^T X in float64;
 * the strict lower triangle bit for bit c0's. */
static void check_gram(const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, const float *c0,
                       const float *got, const char *who)
{
    for (uint64_t i = 0; i < dim; i++) {
        for (uint64_t j = 0; j < dim; j++) {
            if (j < i) {
                if (memcmp(&got[i * dim + j], &c0[i * dim + j], sizeof(float)) != 0)
                    fail_msg("%s: Gram wrote the lower triangle at [%" PRIu64 "][%" PRIu64 "]", who, i, j);
                continue;
            }
            double ref = c0[i * dim + j], mag = fabs(ref);
            for (uint64_t r = 0; r < n_rows; r++) {
                double p = (double)x[r * ldx + i] * (double)x[r * ldx + j];
                ref += p;
                mag += fabs(p);
            }
            double tol = 1e-6 * (4.0 + sqrt((double)n_rows)) * mag + 1e-30;
            double v = got[i * dim + j];
            if (!(fabs(v - ref) <= tol))
                fail_msg("%s: Gram n_rows=%" PRIu64 " dim=%" PRIu64 ": C[%" PRIu64 "][%" PRIu64
                         "] = %.9g, float64 says %.9g (tolerance %.3g); seed %" PRIu64,
                         who, n_rows, dim, i, j, v, ref, tol, g_seed);
        }
    }
}

static void test_gram_random(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    cpu_llama_gemm cpu = cpu_llama_gemm_blas();
    for (int t = 0; t < 25; t++) {
        uint64_t dim = rng_range(1, 260), n_rows = rng_range(1, 900), ldx = dim + rng_range(0, 7);
        float *x = rand_floats(n_rows * ldx), *c0 = rand_floats(dim * dim);
        float *gc = copy_floats(c0, dim * dim), *cc = copy_floats(c0, dim * dim);
        /* one cublasSsyrk, or by column blocks (MERGESTREAM_GPU_GRAM_BLOCK) of any width */
        uint64_t block = t % 3 == 0 ? 0 : rng_range(1, dim + 3);
        gpu_gemm_set_gram_block(g, block);
        int rc = gpu_gemm_gram(g, x, n_rows, dim, ldx, gc);
        if (rc != 0)
            fail_msg("gpu_gemm_gram returned %d: %s", rc, gpu_gemm_last_error(g));
        assert_int_equal(cpu.gram(cpu.ctx, x, n_rows, dim, ldx, cc), 0);
        check_gram(x, n_rows, dim, ldx, c0, cc, "OpenBLAS");
        char who[64];
        snprintf(who, sizeof who, "GPU, column blocks of %" PRIu64, block);
        check_gram(x, n_rows, dim, ldx, c0, gc, who);
        free(x);
        free(c0);
        free(gc);
        free(cc);
    }
    /* A result larger than the host stage (32 MiB): it comes back in several row blocks. */
    gpu_gemm_set_gram_block(g, 0);
    uint64_t dim = 3001, n_rows = 7, ldx = 3001;
    float *x = rand_floats(n_rows * ldx), *c0 = rand_floats(dim * dim), *gc = copy_floats(c0, dim * dim);
    assert_int_equal(gpu_gemm_gram(g, x, n_rows, dim, ldx, gc), 0);
    check_gram(x, n_rows, dim, ldx, c0, gc, "GPU, several row blocks");
    free(x);
    free(c0);
    free(gc);
    gpu_gemm_close(g);
}

/* ============================================================ failures */

/* One sgemm and one Gram call on g must fail with `want` and leave C as it
 * was, bit for bit. */
static void expect_failures(gpu_gemm *g, int want, const char *label)
{
    uint64_t m = 37, n = 71, k = 53, dim = 45, n_rows = 19;
    float *a = rand_floats(m * k), *b = rand_floats(n * k), *c0 = rand_floats(m * n), *c = copy_floats(c0, m * n);
    int rc = gpu_gemm_sgemm(g, true, m, n, k, 1.0f, a, k, b, k, false, 0.5f, c, n);
    if (rc != want)
        fail_msg("%s: sgemm returned %d, expected %d (%s)", label, rc, want, gpu_gemm_last_error(g));
    assert_memory_equal(c, c0, m * n * sizeof(float));
    assert_true(gpu_gemm_last_error(g)[0] != '\0');
    float *x = rand_floats(n_rows * dim), *h0 = rand_floats(dim * dim), *h = copy_floats(h0, dim * dim);
    rc = gpu_gemm_gram(g, x, n_rows, dim, dim, h);
    if (rc != want)
        fail_msg("%s: gram returned %d, expected %d (%s)", label, rc, want, gpu_gemm_last_error(g));
    assert_memory_equal(h, h0, dim * dim * sizeof(float));
    free(a);
    free(b);
    free(c0);
    free(c);
    free(x);
    free(h0);
    free(h);
}

/* A memory limit below what a call needs: -ENOMEM, "needs X MiB", C
 * unchanged; the object stays usable for calls that fit. */
static void test_memory_limit(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(4096);
    expect_failures(g, -ENOMEM, "--gpu-memory-limit 4K");
    assert_non_null(strstr(gpu_gemm_last_error(g), "needs"));
    float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8}, c[4];
    assert_int_equal(gpu_gemm_sgemm(g, false, 2, 2, 2, 1.0f, a, 2, b, 2, false, 0.0f, c, 2), 0);
    assert_true(c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50);
    gpu_gemm_close(g);
}

/* A sticky error: -EIO, C unchanged, and every later call -EIO too. */
static void test_sticky(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    gpu_gemm_fail_next_for_tests(g);
    expect_failures(g, -EIO, "sticky");
    expect_failures(g, -EIO, "after a sticky error");
    gpu_gemm_close(g);
}

/* In the child: with MERGESTREAM_FAULT set, the first calls fail out of
 * memory (the seam's first requests fail) and leave C alone. */
static int child_main(void)
{
    const char *fault = getenv("MERGESTREAM_FAULT");
    gpu_gemm *g = NULL;
    char why[256];
    if (gpu_gemm_open(0, 0, &g, why, sizeof why) != 0) {
        printf("child: gpu_gemm_open: %s\n", why);
        return 1;
    }
    uint64_t m = 37, n = 71, k = 53;
    float *a = rand_floats(m * k), *b = rand_floats(n * k), *c0 = rand_floats(m * n), *c = copy_floats(c0, m * n);
    int rc = gpu_gemm_sgemm(g, true, m, n, k, 1.0f, a, k, b, k, true, 0.5f, c, n);
    int fails = 0;
    if (rc != -ENOMEM || memcmp(c, c0, m * n * sizeof(float)) != 0) {
        printf("child (MERGESTREAM_FAULT=%s): sgemm returned %d, C %s\n", fault, rc,
               memcmp(c, c0, m * n * sizeof(float)) ? "changed" : "unchanged");
        fails++;
    }
    uint64_t dim = 45, n_rows = 19;
    float *x = rand_floats(n_rows * dim), *h0 = rand_floats(dim * dim), *h = copy_floats(h0, dim * dim);
    bool every = fault && strchr(fault, '+');
    rc = gpu_gemm_gram(g, x, n_rows, dim, dim, h);
    if (every && (rc != -ENOMEM || memcmp(h, h0, dim * dim * sizeof(float)) != 0)) {
        printf("child (MERGESTREAM_FAULT=%s): gram returned %d\n", fault, rc);
        fails++;
    }
    if (!every && rc != 0) { /* the one injected fault is spent: this call succeeds */
        printf("child (MERGESTREAM_FAULT=%s): gram after the fault returned %d (%s)\n", fault, rc,
               gpu_gemm_last_error(g));
        fails++;
    }
    printf("child (MERGESTREAM_FAULT=%s): %" PRIu64 " gpu_alloc requests, %s\n", fault,
           ms_fault_calls(MS_FAULT_GPU_ALLOC), fails ? "FAILED" : "ok");
    free(a);
    free(b);
    free(c0);
    free(c);
    free(x);
    free(h0);
    free(h);
    gpu_gemm_close(g);
    return fails ? 1 : 0;
}

static int spawn_child(const char *fault)
{
    size_t n = 0;
    while (environ[n])
        n++;
    char **envp = calloc(n + 4, sizeof *envp);
    if (!envp)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "MERGESTREAM_FAULT=", 18) != 0 && strncmp(environ[i], CHILD_ENV "=", sizeof CHILD_ENV) != 0)
            envp[k++] = environ[i];
    char e_fault[128], e_seed[64];
    snprintf(e_fault, sizeof e_fault, "MERGESTREAM_FAULT=%s", fault);
    snprintf(e_seed, sizeof e_seed, "MS_TEST_SEED=%" PRIu64, g_seed);
    envp[k++] = (char *)CHILD_ENV "=1";
    envp[k++] = e_fault;
    envp[k++] = e_seed;
    envp[k] = NULL;
    char *argv[] = {(char *)"test_gpu_gemm", NULL};
    fflush(stdout);
    pid_t pid;
    int rc = posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, envp);
    free(envp);
    if (rc != 0)
        return -1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* The first request of the first call (A's block), its second (C's) and every
 * request: each makes that call fail out of memory with C unchanged. */
static void test_fault_seam(void **state)
{
    (void)state;
    const char *faults[] = {"gpu_alloc:1", "gpu_alloc:2", "gpu_alloc:3", "gpu_alloc:1+"};
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        int rc = spawn_child(faults[i]);
        if (rc != 0)
            fail_msg("child with MERGESTREAM_FAULT=%s exited %d", faults[i], rc);
    }
}

static void test_peak(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    double peak = gpu_gemm_peak_gflops(g, 0.3);
    if (!(peak > 0))
        fail_msg("gpu_gemm_peak_gflops: %g (%s)", peak, gpu_gemm_last_error(g));
    printf("%s: fp32 cuBLAS peak %.0f GFLOP/s\n", gpu_gemm_device_name(g), peak);
    for (uint64_t block = 0; block <= 300; block += 300) {
        double gram = gpu_gemm_gram_gflops(g, 1000, 500, block, 0.1);
        if (!(gram > 0))
            fail_msg("gpu_gemm_gram_gflops (block %" PRIu64 "): %g (%s)", block, gram, gpu_gemm_last_error(g));
        printf("Gram 1000 x 1000 from 500 rows, block %" PRIu64 ": %.0f GFLOP/s\n", block, gram);
    }
    gpu_gemm_close(g);
}

/* ============================================================ statistics on the device */

/* Rows in random pieces (crossing the fp32 block boundaries of a small
 * flush_rows) into a device slot, some rows into the host accumulator
 * instead, the slot's sum then added to the host's: X^T X in float64 within
 * rounding. Two slots at once, a closed slot reads 0 rows, and a slot that
 * would take more than half of a small --gpu-memory-limit is declined. */
static void test_stats_on_device(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    for (unsigned round = 0; round < 4; round++) {
        uint64_t dim = rng_range(1, 300), ld = dim + rng_range(0, 3), rows = rng_range(1, 900);
        uint64_t flush = round == 0 ? 4096 : rng_range(1, 200);
        uint64_t block = round < 2 ? 0 : rng_range(1, dim + 3); /* the Gram updates by column blocks */
        gpu_gemm_set_gram_block(g, block);
        float *x = rand_floats(rows * ld);
        cpu_hessian *h = NULL;
        assert_int_equal(cpu_hessian_open(dim, flush, &h), 0);
        assert_int_equal(gpu_gemm_stat_rows(g, 3), 0);
        assert_int_equal(gpu_gemm_stat_begin(g, 3, dim, flush), 0);
        assert_int_equal(gpu_gemm_stat_begin(g, 5, dim + 1, flush), 0); /* a second slot beside it */
        uint64_t done = 0, on_host = 0;
        while (done < rows) {
            uint64_t take = rng_range(1, 150);
            take = take < rows - done ? take : rows - done;
            if (rng_range(0, 3) == 0) { /* now and then on the host, as after a GPU out-of-memory */
                assert_int_equal(cpu_hessian_add(h, x + done * ld, take, ld, cpu_gram_blas, NULL), 0);
                on_host += take;
            } else {
                int rc = gpu_gemm_stat_add(g, 3, x + done * ld, take, ld);
                if (rc != 0)
                    fail_msg("gpu_gemm_stat_add: %d (%s)", rc, gpu_gemm_last_error(g));
            }
            done += take;
        }
        assert_int_equal(gpu_gemm_stat_rows(g, 3), rows - on_host);
        assert_int_equal(gpu_gemm_stat_finish(g, 3, h), 0);
        gpu_gemm_stat_end(g, 5);
        assert_int_equal(gpu_gemm_stat_rows(g, 3), 0);
        assert_int_equal(cpu_hessian_rows(h), rows);
        float *got = calloc(dim * dim, sizeof(float)), *zero = calloc(dim * dim, sizeof(float));
        cpu_hessian_rows_out(h, 1.0, 0, dim, got);
        for (uint64_t i = 0; i < dim; i++) /* rows_out fills both triangles: compare the upper one */
            for (uint64_t j = 0; j < i; j++)
                got[i * dim + j] = 0.0f;
        char who[96];
        snprintf(who, sizeof who, "device statistics, flush %" PRIu64 ", block %" PRIu64 ", %" PRIu64 " rows on the host",
                 flush, block, on_host);
        check_gram(x, rows, dim, ld, zero, got, who);
        free(got);
        free(zero);
        free(x);
        cpu_hessian_close(h);
    }
    gpu_gemm_close(g);
    gpu_gemm *small = open_gpu(16 << 20);
    assert_int_equal(gpu_gemm_stat_begin(small, 0, 1024, 4096), -ENOSPC); /* 12 MiB of 16 */
    assert_non_null(strstr(gpu_gemm_last_error(small), "more than half"));
    assert_int_equal(gpu_gemm_stat_begin(small, 0, 256, 4096), 0); /* 0.75 MiB */
    gpu_gemm_close(small); /* closes the open slot too */
}

/* ============================================================ attention */

/* The seam of the test below: OpenBLAS for the GEMMs, the device for the
 * attention (blas_gemm and cpu_gram_blas ignore ctx, gpu_gemm_attend takes
 * the gpu_gemm). */
static int attend_on_gpu(void *ctx, const cpu_llama_attend_args *a) { return gpu_gemm_attend((gpu_gemm *)ctx, a); }
static int layer_on_gpu(void *ctx, const cpu_llama_layer_args *a) { return gpu_gemm_layer((gpu_gemm *)ctx, a); }

/* got within rounding of want (n values, what for the message). */
static void expect_near(const float *got, const float *want, uint64_t n, double tol, const char *what, unsigned round)
{
    for (uint64_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= tol + tol * fabs((double)want[i])))
            fail_msg("round %u: %s %" PRIu64 ": %g, CPU %g (seed %" PRIu64 ")", round, what, i, got[i], want[i],
                     g_seed);
}

/* One decoder layer over a batch of several sequences (padding gaps in the
 * positions, a GQA config, with and without a sliding window and q/k/v
 * biases, score blocks of every size from 1 row), against the CPU's, within
 * rounding: with the device's attention (the attention rows compared too),
 * and as a whole layer on the device (gpu_gemm_layer: the residual rows and
 * every linear input back, or in odd rounds the inputs' X^T X into
 * statistics slots instead). */
static void test_attend_layer(void **state)
{
    (void)state;
    gpu_gemm *g = open_gpu(0);
    for (unsigned round = 0; round < 6; round++) {
        cpu_llama_config c = {.hidden = 48, .intermediate = 72, .n_layers = 1, .n_heads = 6,
                              .n_kv_heads = round % 2 ? 2 : 3, .head_dim = 8, .vocab = 10, .rms_eps = 1e-5,
                              .rope_theta = 10000, .rope_kind = CPU_ROPE_DEFAULT,
                              .sliding_window = round % 3 == 0 ? 0 : rng_range(2, 9), .qkv_bias = round % 2 == 0};
        uint64_t n_seqs = rng_range(1, 4), seq_start[5] = {0};
        uint32_t pos[400];
        for (uint64_t s = 0; s < n_seqs; s++) {
            uint64_t n = rng_range(1, 90), p = rng_range(0, 3);
            for (uint64_t i = 0; i < n; i++) {
                pos[seq_start[s] + i] = (uint32_t)p;
                p += rng_range(1, 2); /* a gap now and then: padding left out */
            }
            seq_start[s + 1] = seq_start[s] + n;
        }
        uint64_t T = seq_start[n_seqs];
        cpu_llama_batch b = {.n_tokens = T, .n_seqs = n_seqs, .seq_start = seq_start, .pos = pos};
        cpu_llama_layer w;
        assert_int_equal(cpu_llama_layer_alloc(&c, &w), 0);
        uint64_t H = c.hidden, QKV = cpu_llama_qkv_rows(&c), Q = cpu_llama_q_dim(&c), II = c.intermediate;
        float *arrays[] = {w.attn_norm, w.w_qkv, w.b_qkv, w.w_o, w.mlp_norm, w.w_gate_up, w.w_down};
        uint64_t sizes[] = {H, QKV * H, w.b_qkv ? QKV : 0, H * Q, H, 2 * II * H, H * II};
        for (unsigned k = 0; k < 7; k++)
            for (uint64_t i = 0; i < sizes[k]; i++)
                arrays[k][i] = k == 0 || k == 4 ? 1.0f + 0.1f * rng_float() : 0.3f * rng_float();
        float *x_cpu = rand_floats(T * H), *x_gpu = copy_floats(x_cpu, T * H), *x_save = copy_floats(x_cpu, T * H);
        cpu_llama_gemm cpu_seam = cpu_llama_gemm_blas(), mixed = cpu_llama_gemm_blas();
        mixed.ctx = g;
        mixed.attend = attend_on_gpu;
        gpu_gemm_set_attend_block_rows(round < 2 ? 0 : rng_range(1, 20));
        cpu_llama *m_cpu = NULL, *m_gpu = NULL;
        assert_int_equal(cpu_llama_open(&c, T, T, 400, NULL, &cpu_seam, &m_cpu), 0);
        assert_int_equal(cpu_llama_open(&c, T, T, 400, NULL, &mixed, &m_gpu), 0);
        assert_int_equal(cpu_llama_layer_forward(m_cpu, &w, &b, x_cpu), 0);
        int rc = cpu_llama_layer_forward(m_gpu, &w, &b, x_gpu);
        if (rc != 0)
            fail_msg("round %u: gpu_gemm_attend returned %d (%s)", round, rc, gpu_gemm_last_error(g));
        uint64_t ld_c, ld_g;
        const float *a_cpu = cpu_llama_linear_input(m_cpu, CPU_LLAMA_IN_O, &ld_c);
        const float *a_gpu = cpu_llama_linear_input(m_gpu, CPU_LLAMA_IN_O, &ld_g);
        for (uint64_t r = 0; r < T; r++)
            for (uint64_t j = 0; j < Q; j++) {
                double want = a_cpu[r * ld_c + j], got = a_gpu[r * ld_g + j];
                if (fabs(got - want) > 1e-5 + 1e-4 * fabs(want))
                    fail_msg("round %u (T %" PRIu64 ", window %" PRIu64 "): attention row %" PRIu64 " col %" PRIu64
                             ": %g, CPU %g", round, T, c.sliding_window, r, j, got, want);
            }
        for (uint64_t i = 0; i < T * H; i++)
            if (fabs((double)x_gpu[i] - x_cpu[i]) > 1e-4 + 1e-4 * fabs((double)x_cpu[i]))
                fail_msg("round %u: residual %" PRIu64 ": %g, CPU %g", round, i, x_gpu[i], x_cpu[i]);
        /* the whole layer on the device: the residual rows and every linear
         * input back, or (odd rounds) the inputs' X^T X into statistics slots */
        float *x_dev = copy_floats(x_save, T * H);
        cpu_llama_gemm whole = cpu_llama_gemm_blas();
        whole.ctx = g;
        whole.layer = layer_on_gpu;
        cpu_llama *m_dev = NULL;
        assert_int_equal(cpu_llama_open(&c, T, T, 400, NULL, &whole, &m_dev), 0);
        bool stats = round % 2 == 1;
        int slot[CPU_LLAMA_IN_COUNT];
        bool want_in[CPU_LLAMA_IN_COUNT];
        uint64_t width[CPU_LLAMA_IN_COUNT] = {H, Q, H, II};
        for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
            slot[k] = stats ? (int)k : -1;
            want_in[k] = !stats;
            if (stats)
                assert_int_equal(gpu_gemm_stat_begin(g, k, width[k], 4096), 0);
        }
        cpu_llama_set_layer_outputs(m_dev, slot, want_in);
        rc = cpu_llama_layer_forward(m_dev, &w, &b, x_dev);
        if (rc != 0)
            fail_msg("round %u: gpu_gemm_layer returned %d (%s)", round, rc, gpu_gemm_last_error(g));
        assert_true(cpu_llama_layer_added_stats(m_dev));
        expect_near(x_dev, x_cpu, T * H, 1e-4, "whole layer: residual", round);
        for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
            uint64_t ldc, ldd;
            const float *in_cpu = cpu_llama_linear_input(m_cpu, (cpu_llama_input)k, &ldc);
            const float *in_dev = cpu_llama_linear_input(m_dev, (cpu_llama_input)k, &ldd);
            if (!stats) {
                for (uint64_t r = 0; r < T; r++)
                    expect_near(in_dev + r * ldd, in_cpu + r * ldc, width[k], 1e-4, "whole layer: linear input", round);
                continue;
            }
            /* the slot's sum against X^T X of the CPU's input rows */
            cpu_hessian *h = NULL;
            assert_int_equal(cpu_hessian_open(width[k], 4096, &h), 0);
            assert_int_equal(gpu_gemm_stat_rows(g, k), T);
            assert_int_equal(gpu_gemm_stat_finish(g, k, h), 0);
            float *got = calloc(width[k] * width[k], sizeof(float)), *zero = calloc(width[k] * width[k], sizeof(float));
            cpu_hessian_rows_out(h, 1.0, 0, width[k], got);
            for (uint64_t i = 0; i < width[k]; i++)
                for (uint64_t j = 0; j < i; j++)
                    got[i * width[k] + j] = 0.0f;
            /* the device's inputs differ from the CPU's by rounding: a looser bound than check_gram's */
            float *x_in = malloc(T * width[k] * sizeof(float));
            for (uint64_t r = 0; r < T; r++)
                memcpy(x_in + r * width[k], in_cpu + r * ldc, width[k] * sizeof(float));
            cpu_hessian *ref = NULL;
            assert_int_equal(cpu_hessian_open(width[k], 4096, &ref), 0);
            assert_int_equal(cpu_hessian_add(ref, x_in, T, width[k], cpu_gram_blas, NULL), 0);
            float *want_h = calloc(width[k] * width[k], sizeof(float));
            cpu_hessian_rows_out(ref, 1.0, 0, width[k], want_h);
            for (uint64_t i = 0; i < width[k]; i++)
                for (uint64_t j = 0; j < i; j++)
                    want_h[i * width[k] + j] = 0.0f;
            expect_near(got, want_h, width[k] * width[k], 1e-3, "whole layer: statistic", round);
            cpu_hessian_close(ref);
            cpu_hessian_close(h);
            free(x_in);
            free(want_h);
            free(got);
            free(zero);
        }
        cpu_llama_close(m_dev);
        free(x_dev);
        free(x_save);
        cpu_llama_close(m_cpu);
        cpu_llama_close(m_gpu);
        cpu_llama_layer_free(&w);
        free(x_cpu);
        free(x_gpu);
    }
    gpu_gemm_set_attend_block_rows(0);
    /* out of device memory: -ENOMEM, the error says so, and the next call works */
    gpu_gemm *tiny = open_gpu(1 << 12);
    cpu_llama_config c = {.hidden = 16, .intermediate = 24, .n_layers = 1, .n_heads = 2, .n_kv_heads = 1,
                          .head_dim = 8, .vocab = 10, .rms_eps = 1e-5, .rope_theta = 10000};
    uint64_t seq_start[2] = {0, 40};
    uint32_t pos[40];
    for (uint32_t i = 0; i < 40; i++)
        pos[i] = i;
    float *qkv = rand_floats(40 * cpu_llama_qkv_rows(&c)), *attn = rand_floats(40 * cpu_llama_q_dim(&c));
    cpu_llama_attend_args aa = {.n_tokens = 40, .n_seqs = 1, .seq_start = seq_start, .pos = pos, .n_heads = 2,
                                .n_kv_heads = 1, .head_dim = 8, .scale = 0.35f, .qkv = qkv, .attn = attn};
    assert_int_equal(gpu_gemm_attend(tiny, &aa), -ENOMEM);
    assert_non_null(strstr(gpu_gemm_last_error(tiny), "needs"));
    assert_int_equal(gpu_gemm_attend(g, &aa), 0);
    free(qkv);
    free(attn);
    gpu_gemm_close(tiny);
    gpu_gemm_close(g);
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_seed = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL);
    g_rng = g_seed * 2654435761u + 0x9E3779B97F4A7C15ull;
    if (getenv(CHILD_ENV))
        return child_main();
    printf("seed %" PRIu64 " (MS_TEST_SEED replays it)\n", g_seed);
    char why[256];
    gpu_gemm *probe = NULL;
    if (gpu_gemm_open(0, 0, &probe, why, sizeof why) != 0) {
        printf("SKIP: no usable GPU (%s)\n", why);
        return 77;
    }
    gpu_gemm_close(probe);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sgemm_random),  cmocka_unit_test(test_sgemm_weight_cache),
        cmocka_unit_test(test_gram_random),   cmocka_unit_test(test_memory_limit),
        cmocka_unit_test(test_sticky),        cmocka_unit_test(test_fault_seam),
        cmocka_unit_test(test_peak),          cmocka_unit_test(test_attend_layer),
        cmocka_unit_test(test_stats_on_device),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#endif
