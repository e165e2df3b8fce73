/* The blocked, threaded Cholesky factorisation of the Hessian methods
 * (ms_hessian_cholesky_pool, pipeline/merge_passes_hessian.c) against the
 * plain row-oriented loop it replaced, kept here as the reference: the
 * factor must be the same BITS (every entry, the untouched strict upper
 * triangle included) for every n, every thread count and the single-thread
 * entry point, on random SPD matrices, ill-conditioned ones, and matrices
 * that are not positive definite (-EDOM at the same pivot, `a` left in the
 * same state). Also the GPU kernels' decomposition of the same order
 * (gpu/gpu_hessian_chol.cu), written here as plain loops in the kernels'
 * order of work: it must give the same bits, which is the kernels' claim;
 * the kernels themselves run in tests/gpu/test_gpu_cholesky.c. The seed is
 * printed; set MS_TEST_SEED to replay. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
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

#include "pipeline/merge_passes_hessian.h"
#include "test_pools.h"

#include "test_rng.h"

/* ============================================================ reference */

/* The factorisation as it was before blocking (do not "improve" it: the
 * point is that the fast code keeps these exact operations). */
static double ref_dot(const double *a, const double *b, uint64_t n)
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

/* On -EDOM, *failed_row = the row whose pivot is not > 0. */
static int ref_cholesky(double *a, uint64_t n, uint64_t *failed_row)
{
    *failed_row = n;
    for (uint64_t j = 0; j < n; j++) {
        *failed_row = j;
        double *lj = a + j * n;
        for (uint64_t k = 0; k < j; k++) {
            const double *lk = a + k * n;
            lj[k] = (lj[k] - ref_dot(lj, lk, k)) / lk[k];
        }
        double s = lj[j] - ref_dot(lj, lj, j);
        if (!(s > 0.0))
            return -EDOM;
        lj[j] = sqrt(s);
    }
    *failed_row = n;
    return 0;
}

/* ============================================================== inputs */

/* A random SPD matrix with row/column scales spread over six decades: for
 * small n a Gram matrix (1/N) X X^T of N = n + 3 random rows, for large n a
 * strictly diagonally dominant symmetric matrix (O(n^2) to build). The
 * strict upper triangle holds a marker the factorisation must not touch. */
static double *make_spd(uint64_t n)
{
    double *a = malloc(n * n * sizeof *a), *scale = malloc(n * sizeof *scale);
    assert_non_null(a);
    assert_non_null(scale);
    for (uint64_t j = 0; j < n; j++)
        scale[j] = pow(10.0, 6.0 * rng_unit() - 3.0);
    if (n <= 160) {
        uint64_t N = n + 3;
        double *x = malloc(n * N * sizeof *x);
        assert_non_null(x);
        for (uint64_t e = 0; e < n * N; e++)
            x[e] = rng_unit() * 2.0 - 1.0;
        for (uint64_t i = 0; i < n; i++)
            for (uint64_t j = 0; j <= i; j++) {
                double s = 0;
                for (uint64_t t = 0; t < N; t++)
                    s += x[i * N + t] * x[j * N + t];
                a[i * n + j] = s / (double)N * scale[i] * scale[j];
            }
        free(x);
    } else {
        for (uint64_t i = 0; i < n; i++) {
            for (uint64_t j = 0; j < i; j++)
                a[i * n + j] = (rng_unit() * 2.0 - 1.0) * scale[i] * scale[j];
            a[i * n + i] = ((double)n + rng_unit()) * scale[i] * scale[i];
        }
    }
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = i + 1; j < n; j++)
            a[i * n + j] = -1234.5 - (double)(i + j);
    free(scale);
    return a;
}

/* ============================================================== checks */

/* Factors copies of a with the reference and with the blocked code on 1, 2
 * and 3 threads and through ms_hessian_cholesky: same return code, same
 * bytes. After -EDOM at row p only what the contract fixes is compared:
 * rows < p, row p up to its (untouched) diagonal, and the strict upper
 * triangle; the rows below p may hold partial work. */
static void check_same(const double *a, uint64_t n, const char *what)
{
    size_t bytes = (size_t)(n * n) * sizeof(double);
    double *ref = malloc(bytes ? bytes : 1), *got = malloc(bytes ? bytes : 1);
    assert_non_null(ref);
    assert_non_null(got);
    memcpy(ref, a, bytes);
    uint64_t p;
    int ref_rc = ref_cholesky(ref, n, &p);
    for (unsigned t = 0; t <= 3; t++) { /* t = 0: ms_hessian_cholesky (no pool) */
        memcpy(got, a, bytes);
        int rc = t == 0 ? ms_hessian_cholesky(got, n) : ms_hessian_cholesky_pool(got, n, g_pool[t]);
        if (rc != ref_rc) {
            fprintf(stderr, "%s n %" PRIu64 " threads %u: rc %d, reference %d\n", what, n, t, rc, ref_rc);
            fail();
        }
        for (uint64_t e = 0; e < n * n; e++) {
            uint64_t i = e / n, j = e % n;
            bool fixed = i < p || (i == p && j <= p) || j > i;
            if (fixed && memcmp(&got[e], &ref[e], sizeof got[e]) != 0) {
                fprintf(stderr, "%s n %" PRIu64 " threads %u: L[%" PRIu64 "][%" PRIu64 "] = %a, reference %a\n",
                        what, n, t, i, j, got[e], ref[e]);
                fail();
            }
        }
    }
    free(ref);
    free(got);
}

static void test_random_spd(void **state)
{
    (void)state;
    static const uint64_t big[] = {63, 64, 65, 127, 513, 1000, 1031};
    for (uint64_t n = 0; n <= 40; n++) {
        double *a = make_spd(n ? n : 1);
        check_same(a, n, "random SPD");
        free(a);
    }
    for (size_t b = 0; b < sizeof big / sizeof big[0]; b++) {
        double *a = make_spd(big[b]);
        check_same(a, big[b], "random SPD");
        free(a);
    }
}

/* The reference must accept these (else the comparison only checks -EDOM). */
static void check_spd_accepted(const double *a, uint64_t n)
{
    double *c = malloc(n * n * sizeof *c);
    assert_non_null(c);
    memcpy(c, a, n * n * sizeof *c);
    uint64_t p;
    assert_int_equal(ref_cholesky(c, n, &p), 0);
    free(c);
}

static void test_ill_conditioned(void **state)
{
    (void)state;
    /* Hilbert matrices (condition ~1e13 at 10, beyond fp64 past 13: some
     * factor, some fail, all must agree with the reference) */
    for (uint64_t n = 2; n <= 40; n += 3) {
        double *a = malloc(n * n * sizeof *a);
        assert_non_null(a);
        for (uint64_t i = 0; i < n; i++)
            for (uint64_t j = 0; j < n; j++)
                a[i * n + j] = 1.0 / (double)(i + j + 1);
        check_same(a, n, "Hilbert");
        free(a);
    }
    /* rank-deficient Gram matrix (N = 5 rows) plus a ridge of 1e-9 * mean
     * diagonal, as a damped Hessian of few tokens looks */
    uint64_t n = 100, N = 5;
    double *x = malloc(n * N * sizeof *x), *a = malloc(n * n * sizeof *a);
    assert_non_null(x);
    assert_non_null(a);
    for (uint64_t e = 0; e < n * N; e++)
        x[e] = rng_unit() * 2.0 - 1.0;
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = 0; j < n; j++) {
            double s = 0;
            for (uint64_t t = 0; t < N; t++)
                s += x[i * N + t] * x[j * N + t];
            a[i * n + j] = s;
        }
    for (uint64_t i = 0; i < n; i++)
        a[i * n + i] += 1e-9;
    check_spd_accepted(a, n);
    check_same(a, n, "rank-deficient + ridge");
    free(x);
    free(a);
}

/* A pivot made negative, zero or NaN at row p: -EDOM there, with rows
 * before p factored and row p's off-diagonal entries computed exactly as
 * the reference leaves them (check_same). p runs over block edges and
 * inside. */
static void test_not_positive_definite(void **state)
{
    (void)state;
    static const uint64_t ns[] = {1, 7, 33, 100, 257};
    for (size_t b = 0; b < sizeof ns / sizeof ns[0]; b++) {
        uint64_t n = ns[b];
        uint64_t ps[] = {0, 1, 7, 8, 31, 32, 33, 63, 64, n / 2, n - 1};
        for (size_t q = 0; q < sizeof ps / sizeof ps[0]; q++) {
            uint64_t p = ps[q];
            if (p >= n)
                continue;
            double *a = make_spd(n);
            check_spd_accepted(a, n);
            double keep = a[p * n + p];
            a[p * n + p] = -keep;
            check_same(a, n, "negative pivot");
            a[p * n + p] = 0.0;
            check_same(a, n, "zero pivot");
            a[p * n + p] = keep;
            a[p * n + (p ? p - 1 : 0)] = NAN;
            check_same(a, n, "NaN entry");
            free(a);
        }
    }
}

/* gpu_hessian_chol.cu's work, block by block of 32 columns [j0, j1): the
 * prefix lanes of every row >= j0 over m < j0 in tiles of 32 m (lane
 * mm & 7 inside a tile), the diagonal block as a wavefront (column s: row
 * s's diagonal, then every row below it in the block), the rows below the
 * block one after the other; each entry's lanes continued over
 * [j0, 8 floor(k / 8)), folded, the tail added. Returns 0 or -EDOM. */
static int gpu_order_cholesky(double *a, uint64_t n)
{
    enum { BLOCK = 32, TILE = 32 };
    double *lanes = malloc(n * BLOCK * 8 * sizeof *lanes);
    assert_non_null(lanes);
    int rc = 0;
    for (uint64_t j0 = 0; j0 < n && rc == 0; j0 += BLOCK) {
        unsigned nk = (unsigned)(n - j0 < BLOCK ? n - j0 : BLOCK);
        for (uint64_t i = j0; i < n; i++) /* k_ch_prefix */
            for (unsigned c = 0; c < nk; c++) {
                double *l = lanes + ((i - j0) * BLOCK + c) * 8;
                for (unsigned q = 0; q < 8; q++)
                    l[q] = 0.0;
                for (uint64_t m0 = 0; m0 < j0; m0 += TILE)
                    for (unsigned mm = 0; mm < TILE; mm++)
                        l[mm & 7] = l[mm & 7] + a[i * n + m0 + mm] * a[(j0 + c) * n + m0 + mm];
            }
        /* the entry (row i, column j0 + c), reading row i's and row j0 + c's block entries from a */
#define ENTRY_DOT(i, c)                                                                                     \
    ({                                                                                                     \
        const double *l_ = lanes + (((i) - j0) * BLOCK + (c)) * 8, *x_ = a + (i) * n + j0,                 \
                     *y_ = a + (j0 + (c)) * n + j0;                                                         \
        double v_[8];                                                                                      \
        memcpy(v_, l_, sizeof v_);                                                                         \
        unsigned end_ = (c) & ~7u;                                                                         \
        for (unsigned m_ = 0; m_ < end_; m_ += 8)                                                          \
            for (unsigned q_ = 0; q_ < 8; q_++)                                                            \
                v_[q_] = v_[q_] + x_[m_ + q_] * y_[m_ + q_];                                               \
        double s_ = ((v_[0] + v_[1]) + (v_[2] + v_[3])) + ((v_[4] + v_[5]) + (v_[6] + v_[7]));             \
        for (unsigned m_ = end_; m_ < (c); m_++)                                                           \
            s_ = s_ + x_[m_] * y_[m_];                                                                     \
        s_;                                                                                                \
    })
        for (unsigned s = 0; s < nk && rc == 0; s++) { /* k_ch_diag */
            uint64_t k = j0 + s;
            double d = a[k * n + k] - ENTRY_DOT(k, s);
            if (!(d > 0.0)) {
                rc = -EDOM;
                break;
            }
            a[k * n + k] = sqrt(d);
            for (unsigned t = s + 1; t < nk; t++)
                a[(j0 + t) * n + k] = (a[(j0 + t) * n + k] - ENTRY_DOT(j0 + t, s)) / a[k * n + k];
        }
        for (uint64_t i = j0 + nk; i < n && rc == 0; i++) /* k_ch_below */
            for (unsigned c = 0; c < nk; c++)
                a[i * n + j0 + c] = (a[i * n + j0 + c] - ENTRY_DOT(i, c)) / a[(j0 + c) * n + j0 + c];
#undef ENTRY_DOT
    }
    free(lanes);
    return rc;
}

/* The GPU kernels' decomposition gives the CPU's bits (factor and strict
 * upper triangle), and fails where it fails. */
static void test_gpu_order(void **state)
{
    (void)state;
    static const uint64_t ns[] = {1, 2, 7, 8, 9, 31, 32, 33, 40, 64, 65, 100, 129, 257, 300};
    for (size_t b = 0; b < sizeof ns / sizeof ns[0]; b++) {
        uint64_t n = ns[b];
        for (int bad = 0; bad <= 1; bad++) {
            double *a = make_spd(n);
            if (bad)
                a[(n / 2) * n + n / 2] = -1.0;
            size_t bytes = n * n * sizeof *a;
            double *want = malloc(bytes), *got = malloc(bytes);
            memcpy(want, a, bytes);
            memcpy(got, a, bytes);
            int rc_want = ms_hessian_cholesky(want, n), rc_got = gpu_order_cholesky(got, n);
            assert_int_equal(rc_got, rc_want);
            assert_int_equal(rc_want, bad ? -EDOM : 0);
            if (!bad && memcmp(want, got, bytes) != 0)
                fail_msg("n %" PRIu64 ": the GPU's order differs from the CPU's", n);
            free(a);
            free(want);
            free(got);
        }
    }
}

int main(void)
{
    g_rng = test_seed("test_hessian_cholesky");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_spd),
        cmocka_unit_test(test_ill_conditioned),
        cmocka_unit_test(test_not_positive_definite),
        cmocka_unit_test(test_gpu_order),
    };
    return cmocka_run_group_tests(tests, pools_open, pools_close);
}
