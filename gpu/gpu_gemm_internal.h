/* What the files of the forward pass's GPU seam share (gpu_gemm.cu: open,
 * GEMMs, Gram updates; gpu_gemm_stats.cu: statistics held on the device;
 * gpu_gemm_attend.cu: attention; gpu_gemm_layer.cu: a whole layer): the
 * object, its buffers and cached weights, and the helpers every call uses.
 * Row-major to column-major: see the top of gpu_gemm.cu. */
#ifndef MS_GPU_GEMM_INTERNAL_H
#define MS_GPU_GEMM_INTERNAL_H

#include "gpu/gpu_internal.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "gpu/gpu_gemm.h"
#include "gpu/gpu_mempool.h"

extern "C" {
#include "cpu/llama_forward.h"
}

#define GG_WEIGHTS 16u                         /* cached weights: a layer has up to 12 arrays with the RoPE table, an lm_head slice 1 */
#define GG_STAGE_BYTES ((uint64_t)32 << 20)    /* host buffer the Gram result comes back through */
#define GG_STATS 8u                            /* device statistics at once (a layer has 4) */
#define GG_MARKS 16u                           /* events of a layer's phase clock */

/* A weight kept on the device: the host matrix it was copied from. */
typedef struct gg_weight {
    const float *host; /* NULL: slot free */
    uint64_t rows, cols, ld;
    void *dev;
    uint64_t size; /* its pool class size */
    uint64_t last_use;
} gg_weight;

/* A device buffer of one call. */
typedef struct gg_buf {
    void *ptr;
    uint64_t size;
} gg_buf;

/* A statistic held on the device (gpu_gemm_stat_*): cpu/hessian_accum.h's
 * accumulator, mirrored. */
typedef struct gg_stat {
    gg_buf blk;  /* fp32 dim x dim: the current block's sum (column-major lower = row-major upper) */
    gg_buf acc;  /* fp64 dim x dim: the flushed blocks */
    uint64_t dim, flush_rows;
    uint64_t in_block; /* rows in blk */
    uint64_t rows;     /* rows in all */
} gg_stat;

struct gpu_gemm {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    gpu_mempool pool;
    gg_weight weight[GG_WEIGHTS];
    gg_stat stat[GG_STATS];
    uint64_t clock; /* for least-recently-used eviction */
    float *stage;   /* GG_STAGE_BYTES of host memory: pinned when stage_pinned, else malloc'ed */
    bool stage_pinned;
    cudaEvent_t out_done; /* recorded after each gpu_gemm_stat_out's copy (0: not created) */
    uint64_t gram_block;  /* gpu_gemm_set_gram_block */
    cudaEvent_t mark[GG_MARKS]; /* whole layers' phase clock (gpu_gemm_layer.cu), made on first use */
    bool marks_made, marks_failed;
    double layer_s[GPU_LAYER_PHASES];
    bool broken;    /* a sticky error happened: every call returns -EIO */
    bool fail_next; /* tests */
    char err[256];
    char name[256];
};

/* ================================================================ helpers (gpu_gemm.cu) */

const char *gg_blas_string(cublasStatus_t st);
/* "512 MiB", "1.4 MiB" */
void gg_mib(char *buf, size_t n, uint64_t bytes);
/* Out of device memory for a call that needs `needs` bytes: clears the (not
 * sticky) error, trims, describes it. Returns -ENOMEM. */
int gg_oom(gpu_gemm *g, uint64_t needs);
/* A failure after work that cannot be undone (sums held on the device or in
 * the caller's memory partly updated): whatever the error (st if it is not
 * success, else rc), the object is broken from now on. Returns -EIO. */
int gg_sticky(gpu_gemm *g, const char *what, cublasStatus_t st, cudaError_t rc);
/* A CUDA error: -ENOMEM for an allocation failure, else sticky -EIO. */
int gg_cuda_fail(gpu_gemm *g, cudaError_t rc, const char *what, uint64_t needs);
/* A cuBLAS error: -ENOMEM for ALLOC_FAILED, else sticky -EIO. */
int gg_blas_fail(gpu_gemm *g, cublasStatus_t st, const char *what, uint64_t needs);
/* Before any work of a call: -EIO when broken, else 0 (and the error text cleared). */
int gg_check_usable(gpu_gemm *g);
/* A pool block of `bytes` for this call, and giving blocks back (the stream idle). */
cudaError_t gg_take(gpu_gemm *g, uint64_t bytes, gg_buf *b);
void gg_give(gpu_gemm *g, gg_buf *bufs, unsigned n);
/* Waits for everything the call enqueued; the first error. */
cudaError_t gg_drain(gpu_gemm *g);
/* The row-major host matrix [rows, cols] (leading dimension ld) into the dense device matrix dev. */
cudaError_t gg_upload(gpu_gemm *g, void *dev, const float *host, uint64_t rows, uint64_t cols, uint64_t ld);
/* The device copy of the host weight [rows, cols] (ld): cached, or uploaded into a cache slot. */
cudaError_t gg_weight_get(gpu_gemm *g, const float *b, uint64_t rows, uint64_t cols, uint64_t ld, const void **dev);

/* ================================================================ shared by the layer */

/* gpu_gemm.cu: enqueues C += A A^T (or C = A A^T for beta 0): the lower
 * triangle of the column-major C [dim, dim] (ldc) from the column-major A
 * [dim, rows] (lda), by g->gram_block's column blocks
 * (gpu_gemm_set_gram_block). Returns the first cuBLAS error. */
cublasStatus_t gg_gram_enqueue(gpu_gemm *g, const float *A, uint64_t dim, uint64_t rows, uint64_t lda, float beta,
                               float *C, uint64_t ldc);

/* gpu_gemm_stats.cu: enqueues X^T X of n_rows device rows (leading
 * dimension ld) into slot st, split at its fp32 block boundaries. Returns
 * the first launch error (the slot is then lost). */
cublasStatus_t gg_stat_accumulate(gpu_gemm *g, gg_stat *st, const float *d_x, uint64_t n_rows, uint64_t ld);

/* gpu_gemm_attend.cu: device bytes of scores the attention of a batch needs
 * (the largest sequence's blocks), and enqueueing it from device q/k/v
 * rows (after RoPE; leading dimension q_dim + 2 kv_dim) and positions into
 * the device attention rows (leading dimension q_dim). */
uint64_t ga_score_bytes(const cpu_llama_attend_args *a);
cublasStatus_t ga_enqueue(gpu_gemm *g, const cpu_llama_attend_args *a, const float *d_qkv, const uint32_t *d_pos,
                          float *d_scores, float *d_attn);

#endif
