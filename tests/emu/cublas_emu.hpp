/* Just enough of cuBLAS to run a gpu/ call sequence on the CPU:
 * cublasSsyrk (lower, no transpose) and cublasSgemm, column-major, each
 * output a float sum over the inner index in ascending order, so two
 * sequences that split the same sums differently give the same bits, and
 * any misplaced operand or output shows. Calls are counted; tests may make
 * call number fail_at fail. Include before the gpu/ header. */
#ifndef MS_CUBLAS_EMU_HPP
#define MS_CUBLAS_EMU_HPP

#include <cstdint>

typedef struct cublas_emu *cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_EXECUTION_FAILED = 13 } cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUBLAS_FILL_MODE_LOWER, CUBLAS_FILL_MODE_UPPER } cublasFillMode_t;

struct cublas_emu {
    unsigned calls;   /* so far */
    unsigned fail_at; /* this call (1-based) fails; 0: none */
};

static inline bool cublas_emu_fails(cublasHandle_t h) { return ++h->calls == h->fail_at; }

/* alpha sum + beta c, with c not read for beta 0 (as cuBLAS) */
static inline float cublas_emu_out(float alpha, float sum, float beta, float c)
{
    return beta == 0.0f ? alpha * sum : alpha * sum + beta * c;
}

static inline cublasStatus_t cublasSsyrk(cublasHandle_t h, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                                         const float *alpha, const float *A, int lda, const float *beta, float *C,
                                         int ldc)
{
    if (uplo != CUBLAS_FILL_MODE_LOWER || trans != CUBLAS_OP_N || n < 0 || k < 0 || lda < n || ldc < n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (cublas_emu_fails(h))
        return CUBLAS_STATUS_EXECUTION_FAILED;
    for (int j = 0; j < n; j++)
        for (int i = j; i < n; i++) {
            float s = 0.0f;
            for (int r = 0; r < k; r++)
                s += A[(int64_t)r * lda + i] * A[(int64_t)r * lda + j];
            C[(int64_t)j * ldc + i] = cublas_emu_out(*alpha, s, *beta, C[(int64_t)j * ldc + i]);
        }
    return CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                         const float *beta, float *C, int ldc)
{
    if (m < 0 || n < 0 || k < 0 || ldc < m || lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (cublas_emu_fails(h))
        return CUBLAS_STATUS_EXECUTION_FAILED;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
            for (int r = 0; r < k; r++) {
                float a = ta == CUBLAS_OP_N ? A[(int64_t)r * lda + i] : A[(int64_t)i * lda + r];
                float b = tb == CUBLAS_OP_N ? B[(int64_t)j * ldb + r] : B[(int64_t)r * ldb + j];
                s += a * b;
            }
            C[(int64_t)j * ldc + i] = cublas_emu_out(*alpha, s, *beta, C[(int64_t)j * ldc + i]);
        }
    return CUBLAS_STATUS_SUCCESS;
}

#endif
