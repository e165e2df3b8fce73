/* The statistics' Gram update C += A A^T by column blocks (gpu_gemm.cu's
 * gg_gram_enqueue; gpu_gemm_set_gram_block), apart from the host code so
 * that tests/emu runs this very sequence on the CPU against a cuBLAS shim
 * (tests/emu/cublas_emu.hpp). Under nvcc it needs cublas_v2.h first. */
#ifndef MS_GPU_GRAM_BLOCKS_CUH
#define MS_GPU_GRAM_BLOCKS_CUH

#include <stdint.h>

/* The lower triangle of the column-major C [dim, dim] (ldc) = beta C +
 * A A^T, A column-major [dim, rows] (lda), by column blocks of `block`
 * (0 or >= dim: one cublasSsyrk). Each block: a cublasSsyrk on its
 * diagonal block and one cublasSgemm for the rows below it, so every flop
 * but the diagonal blocks' runs at the GEMM's rate, and nothing above the
 * diagonal is written. Returns the first cuBLAS error. */
static inline cublasStatus_t gpu_gram_blocks(cublasHandle_t blas, uint64_t block, const float *A, uint64_t dim,
                                             uint64_t rows, uint64_t lda, float beta, float *C, uint64_t ldc)
{
    const float one = 1.0f;
    uint64_t bw = block && block < dim ? block : dim;
    for (uint64_t c0 = 0; c0 < dim; c0 += bw) {
        uint64_t c1 = c0 + bw < dim ? c0 + bw : dim;
        /* the diagonal block C[c0:c1, c0:c1] */
        cublasStatus_t st = cublasSsyrk(blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)(c1 - c0), (int)rows, &one,
                                        A + c0, (int)lda, &beta, C + c0 * ldc + c0, (int)ldc);
        /* the rows below it: C[c1:dim, c0:c1] = beta C + A[c1:dim, :] A[c0:c1, :]^T */
        if (st == CUBLAS_STATUS_SUCCESS && c1 < dim)
            st = cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)(dim - c1), (int)(c1 - c0), (int)rows, &one, A + c1,
                             (int)lda, A + c0, (int)lda, &beta, C + c0 * ldc + c1, (int)ldc);
        if (st != CUBLAS_STATUS_SUCCESS)
            return st;
    }
    return CUBLAS_STATUS_SUCCESS;
}

#endif
