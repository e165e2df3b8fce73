/* gpu/gpu_gram_blocks.cuh's Gram update by column blocks, run on the CPU
 * against a cuBLAS shim (cublas_emu.hpp) whose sums add in one fixed order:
 * for every block width the lower triangle has exactly the bits of one
 * cublasSsyrk over the whole matrix (beta 0, and beta 1 onto earlier
 * sums), nothing above the diagonal is written, the one-call result agrees
 * with an fp64 reference, and a failing call ends the sequence with its
 * error. tests/gpu (MERGESTREAM_GPU_GRAM_BLOCK in device_check.sh) runs it
 * with cuBLAS on a GPU. MS_TEST_SEED=N replays a run. */
#include "cublas_emu.hpp"
#include "../unit/test_rng.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gpu/gpu_gram_blocks.cuh"

static int failures;

#define CHECK(cond, ...)                                                                                   \
    do {                                                                                                   \
        if (!(cond)) {                                                                                     \
            std::fprintf(stderr, "FAIL: " __VA_ARGS__);                                                    \
            std::fputc('\n', stderr);                                                                      \
            failures++;                                                                                    \
            return;                                                                                        \
        }                                                                                                  \
    } while (0)

static const float k_above = -12345.0f; /* what the strict upper triangle holds before and must hold after */

/* C [dim, dim] (ldc) with the sentinel above the diagonal and, for beta 1,
 * earlier sums on and below it. */
static std::vector<float> start_c(uint64_t dim, uint64_t ldc, float beta)
{
    std::vector<float> c(ldc * dim, k_above);
    for (uint64_t j = 0; j < dim; j++)
        for (uint64_t i = j; i < dim; i++)
            c[j * ldc + i] = beta == 0.0f ? NAN : (float)(4.0 * rng_unit() - 2.0);
    return c;
}

static void check_case(uint64_t dim, uint64_t rows, uint64_t lda_pad, uint64_t ldc_pad, float beta)
{
    uint64_t lda = dim + lda_pad, ldc = dim + ldc_pad;
    std::vector<float> a(lda * rows);
    for (float &v : a)
        v = (float)(2.0 * rng_unit() - 1.0);
    std::vector<float> c0 = start_c(dim, ldc, beta);
    cublas_emu h0 = {0, 0};
    std::vector<float> one = c0;
    CHECK(gpu_gram_blocks(&h0, 0, a.data(), dim, rows, lda, beta, one.data(), ldc) == CUBLAS_STATUS_SUCCESS,
          "dim %llu: one cublasSsyrk failed", (unsigned long long)dim);
    CHECK(h0.calls == 1, "dim %llu, block 0: %u calls, not 1", (unsigned long long)dim, h0.calls);
    /* the one call against fp64 */
    for (uint64_t j = 0; j < dim; j++)
        for (uint64_t i = j; i < dim; i++) {
            double s = beta == 0.0f ? 0.0 : (double)c0[j * ldc + i];
            double mag = std::fabs(s);
            for (uint64_t r = 0; r < rows; r++) {
                s += (double)a[r * lda + i] * (double)a[r * lda + j];
                mag += std::fabs((double)a[r * lda + i] * (double)a[r * lda + j]);
            }
            CHECK(std::fabs(one[j * ldc + i] - s) <= 1e-5 * (mag + 1.0), "dim %llu rows %llu: C[%llu][%llu] %g, fp64 %g",
                  (unsigned long long)dim, (unsigned long long)rows, (unsigned long long)i, (unsigned long long)j,
                  (double)one[j * ldc + i], s);
        }
    const uint64_t blocks[] = {1, 2, 3, 7, 16, dim > 1 ? dim - 1 : 1, dim, dim + 5};
    for (uint64_t block : blocks) {
        std::vector<float> c = c0;
        cublas_emu h = {0, 0};
        CHECK(gpu_gram_blocks(&h, block, a.data(), dim, rows, lda, beta, c.data(), ldc) == CUBLAS_STATUS_SUCCESS,
              "dim %llu block %llu failed", (unsigned long long)dim, (unsigned long long)block);
        uint64_t nb = block >= dim ? 1 : (dim + block - 1) / block;
        CHECK(h.calls == 2 * nb - 1, "dim %llu block %llu: %u calls, want %llu", (unsigned long long)dim,
              (unsigned long long)block, h.calls, (unsigned long long)(2 * nb - 1));
        for (uint64_t j = 0; j < dim; j++)
            for (uint64_t i = 0; i < ldc; i++) {
                bool lower = i >= j && i < dim;
                const float want = lower ? one[j * ldc + i] : c0[j * ldc + i];
                CHECK(std::memcmp(&c[j * ldc + i], &want, sizeof want) == 0,
                      "dim %llu rows %llu block %llu beta %g: C[%llu][%llu] (column-major) is %a, want %a",
                      (unsigned long long)dim, (unsigned long long)rows, (unsigned long long)block, (double)beta,
                      (unsigned long long)i, (unsigned long long)j, (double)c[j * ldc + i], (double)want);
            }
    }
}

/* A call that fails: its error comes back and nothing after it runs. */
static void check_failure(void)
{
    const uint64_t dim = 10, rows = 3;
    std::vector<float> a(dim * rows, 0.5f), c(dim * dim, 0.0f);
    for (unsigned at = 1; at <= 5; at++) {
        cublas_emu h = {0, at};
        cublasStatus_t st = gpu_gram_blocks(&h, 3, a.data(), dim, rows, dim, 0.0f, c.data(), dim);
        CHECK(st == CUBLAS_STATUS_EXECUTION_FAILED && h.calls == at, "call %u failing: status %d after %u calls", at,
              (int)st, h.calls);
    }
}

int main(void)
{
    g_rng = test_seed("test_emu_gram");
    const uint64_t dims[] = {1, 2, 5, 16, 33, 64};
    const uint64_t rows[] = {1, 4, 37};
    for (uint64_t d : dims)
        for (uint64_t r : rows)
            for (float beta : {0.0f, 1.0f})
                check_case(d, r, rng_next() % 3, rng_next() % 3, beta);
    check_failure();
    std::printf("test_emu_gram: %d failures\n", failures);
    return failures ? 1 : 0;
}
