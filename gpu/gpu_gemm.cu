/* cuBLAS behind the forward pass's GEMM seam (see gpu_gemm.h).
 *
 * One call = one synchronous GEMM or Gram update on the object's stream:
 * take the call's device buffers from the pool, copy the operands up
 * (row-major host matrices become dense column-major views: no transposes
 * are materialised), run cuBLAS, wait, copy the result down, give the
 * buffers back. The host output is written only after the device work has
 * succeeded, so an out-of-memory failure leaves it untouched.
 *
 * Row-major to cuBLAS (column-major): a row-major [r, c] matrix is the
 * column-major [c, r] matrix, its transpose. So C = A op(B) (row-major) is
 * C^T = op(B)^T A^T (column-major): cublasSgemm with the operands swapped,
 * m and n swapped, and B transposed exactly when trans_b. X^T X of a
 * row-major X [n_rows, dim] is A A^T for the column-major A [dim, n_rows]:
 * cublasSsyrk with CUBLAS_OP_N; its lower triangle (column-major) is the
 * row-major upper triangle the accumulator keeps. */
#include "gpu/gpu_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "gpu/gpu_device.h"
#include "gpu/gpu_gemm.h"
#include "gpu/gpu_mempool.h"

extern "C" {
#include "cpu/llama_forward.h"
}

#define GG_WEIGHTS 8u                          /* cached weights: a layer has 4, an lm_head slice 1 */
#define GG_STAGE_BYTES ((uint64_t)32 << 20)    /* host buffer the Gram result comes back through */
#define GG_STATS 8u                            /* device statistics at once (a layer has 4) */

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
    bool broken;    /* a sticky error happened: every call returns -EIO */
    bool fail_next; /* tests */
    char err[256];
    char name[256];
};

/* ================================================================ errors */

static const char *gg_blas_string(cublasStatus_t st)
{
    switch (st) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
    }
}

/* Frees the cached weights and the pool's cache (after an allocation
 * failure: give the device back everything not in use). */
static void gg_trim(gpu_gemm *g)
{
    gpu_gemm_forget_weights(g);
    gpu_mempool_trim(&g->pool);
}

/* "512 MiB", "1.4 MiB": whole MiB from 10 on or when exact, else one decimal. */
static void gg_mib(char *buf, size_t n, uint64_t bytes)
{
    double mib = (double)bytes / 1048576.0;
    snprintf(buf, n, mib >= 10 || bytes % 1048576 == 0 ? "%.0f MiB" : "%.1f MiB", mib);
}

/* Out of device memory for a call that needs `needs` bytes: clears the (not
 * sticky) error, trims, describes it. Returns -ENOMEM. */
static int gg_oom(gpu_gemm *g, uint64_t needs)
{
    cudaGetLastError();
    gg_trim(g);
    size_t free_b = 0, total_b = 0;
    bool known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
    cudaGetLastError();
    char need_s[32], free_s[32], limit_s[32];
    gg_mib(need_s, sizeof need_s, needs);
    gg_mib(free_s, sizeof free_s, known ? free_b : 0);
    gg_mib(limit_s, sizeof limit_s, g->pool.limit);
    if (g->pool.limit)
        snprintf(g->err, sizeof g->err, "needs %s, %s free, --gpu-memory-limit %s", need_s, free_s, limit_s);
    else
        snprintf(g->err, sizeof g->err, "needs %s, %s free", need_s, free_s);
    return -ENOMEM;
}

/* A CUDA error of a call: out of memory (-ENOMEM), or sticky (-EIO: the
 * object is broken from now on). */
static int gg_cuda_fail(gpu_gemm *g, cudaError_t rc, const char *what, uint64_t needs)
{
    if (rc == cudaErrorMemoryAllocation)
        return gg_oom(g, needs);
    g->broken = true;
    snprintf(g->err, sizeof g->err, "%s: %s", what, cudaGetErrorString(rc));
    return -EIO;
}

/* A cuBLAS error: ALLOC_FAILED is out of memory; anything else is treated
 * as sticky (a failed launch, or a bug that must not be retried on the
 * device). */
static int gg_blas_fail(gpu_gemm *g, cublasStatus_t st, const char *what, uint64_t needs)
{
    if (st == CUBLAS_STATUS_ALLOC_FAILED)
        return gg_oom(g, needs);
    cudaError_t rc = cudaGetLastError();
    g->broken = true;
    snprintf(g->err, sizeof g->err, "%s: %s%s%s", what, gg_blas_string(st), rc != cudaSuccess ? ", " : "",
             rc != cudaSuccess ? cudaGetErrorString(rc) : "");
    return -EIO;
}

/* Before any work of a call: -EIO when broken (or made so by a test). */
static int gg_check_usable(gpu_gemm *g)
{
    if (g->fail_next) {
        g->fail_next = false;
        g->broken = true;
        snprintf(g->err, sizeof g->err, "a sticky CUDA error injected by a test");
    }
    if (g->broken) {
        if (!g->err[0])
            snprintf(g->err, sizeof g->err, "the GPU is disabled by an earlier error");
        return -EIO;
    }
    g->err[0] = '\0';
    return 0;
}

/* ================================================================ buffers */

/* A pool block of `bytes` for this call. Returns cudaSuccess or the pool's
 * error (cudaErrorMemoryAllocation after trimming, or another CUDA error). */
static cudaError_t gg_take(gpu_gemm *g, uint64_t bytes, gg_buf *b)
{
    return gpu_mempool_alloc(&g->pool, bytes, &b->ptr, &b->size);
}

/* Gives the call's blocks back; the stream must be idle (every failure
 * path waits for it first). */
static void gg_give(gpu_gemm *g, gg_buf *bufs, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        gpu_mempool_release(&g->pool, bufs[i].ptr, bufs[i].size);
        bufs[i] = gg_buf();
    }
}

/* Waits for everything the call enqueued (so its buffers may be released)
 * and returns the first error, if any. */
static cudaError_t gg_drain(gpu_gemm *g)
{
    cudaError_t rc = cudaStreamSynchronize(g->stream);
    return rc;
}

/* ================================================================ weights */

static gg_weight *gg_weight_find(gpu_gemm *g, const float *host, uint64_t rows, uint64_t cols, uint64_t ld)
{
    for (unsigned i = 0; i < GG_WEIGHTS; i++) {
        gg_weight *w = &g->weight[i];
        if (w->host == host && w->rows == rows && w->cols == cols && w->ld == ld)
            return w;
    }
    return NULL;
}

static void gg_weight_drop(gpu_gemm *g, gg_weight *w)
{
    gpu_mempool_release(&g->pool, w->dev, w->size);
    *w = gg_weight();
}

/* A free slot, evicting the least recently used weight when all are taken
 * (the stream is idle between calls, so its block is not in use). */
static gg_weight *gg_weight_slot(gpu_gemm *g)
{
    gg_weight *lru = &g->weight[0];
    for (unsigned i = 0; i < GG_WEIGHTS; i++) {
        if (!g->weight[i].host)
            return &g->weight[i];
        if (g->weight[i].last_use < lru->last_use)
            lru = &g->weight[i];
    }
    gg_weight_drop(g, lru);
    return lru;
}

void gpu_gemm_forget_weights(gpu_gemm *g)
{
    if (!g)
        return;
    for (unsigned i = 0; i < GG_WEIGHTS; i++)
        if (g->weight[i].host)
            gg_weight_drop(g, &g->weight[i]);
}

/* ================================================================ open/close */

int gpu_gemm_open(int device, uint64_t memory_limit, gpu_gemm **out, char *why, size_t why_len)
{
    *out = NULL;
    const char *reason = NULL;
    if (gpu_device_count(&reason) <= device) {
        snprintf(why, why_len, "%s", reason ? reason : "no such CUDA device");
        return -1;
    }
    gpu_gemm *g = (gpu_gemm *)calloc(1, sizeof *g);
    if (!g) {
        snprintf(why, why_len, "out of host memory");
        return -1;
    }
    g->device = device;
    gpu_mempool_init(&g->pool, memory_limit);
    const char *what = "cudaSetDevice";
    cudaError_t rc = cudaSetDevice(device);
    if (rc == cudaSuccess) {
        what = "cudaStreamCreate";
        rc = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    }
    if (rc != cudaSuccess) {
        snprintf(why, why_len, "%s: %s", what, cudaGetErrorString(rc));
        cudaGetLastError();
        gpu_gemm_close(g);
        return -1;
    }
    cublasStatus_t st = cublasCreate(&g->blas);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasSetStream(g->blas, g->stream);
    /* No TF32: fp32 products and sums, as OpenBLAS computes them. */
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) {
        snprintf(why, why_len, "cuBLAS: %s", gg_blas_string(st));
        cudaGetLastError();
        gpu_gemm_close(g);
        return -1;
    }
    /* Pinned, so the Gram results come back at full PCIe speed; pageable
     * memory works too, only slower. */
    if (cudaMallocHost((void **)&g->stage, (size_t)GG_STAGE_BYTES) == cudaSuccess) {
        g->stage_pinned = true;
    } else {
        cudaGetLastError();
        g->stage = (float *)malloc((size_t)GG_STAGE_BYTES);
        if (!g->stage) {
            snprintf(why, why_len, "out of host memory");
            gpu_gemm_close(g);
            return -1;
        }
    }
    gpu_device_name(g->name, sizeof g->name);
    *out = g;
    return 0;
}

void gpu_gemm_close(gpu_gemm *g)
{
    if (!g)
        return;
    if (g->stream)
        cudaStreamSynchronize(g->stream);
    gpu_gemm_forget_weights(g);
    for (unsigned k = 0; k < GG_STATS; k++)
        gpu_gemm_stat_end(g, k);
    gpu_mempool_destroy(&g->pool);
    if (g->blas)
        cublasDestroy(g->blas);
    if (g->stream)
        cudaStreamDestroy(g->stream);
    if (g->stage_pinned)
        cudaFreeHost(g->stage);
    else
        free(g->stage);
    cudaGetLastError(); /* after a sticky error these fail: nothing to do about it */
    free(g);
}

const char *gpu_gemm_device_name(const gpu_gemm *g) { return g->name; }
const char *gpu_gemm_last_error(const gpu_gemm *g) { return g->err; }
uint64_t gpu_gemm_held_bytes(const gpu_gemm *g) { return g->pool.held; }
void gpu_gemm_fail_next_for_tests(gpu_gemm *g) { g->fail_next = true; }

/* ================================================================ sgemm */

/* Copies the row-major host matrix [rows, cols] (leading dimension ld) into
 * the dense device matrix dev [rows, cols]. */
static cudaError_t gg_upload(gpu_gemm *g, void *dev, const float *host, uint64_t rows, uint64_t cols, uint64_t ld)
{
    return cudaMemcpy2DAsync(dev, (size_t)(cols * 4), host, (size_t)(ld * 4), (size_t)(cols * 4), (size_t)rows,
                             cudaMemcpyHostToDevice, g->stream);
}

/* The device copy of weight B [rows, cols]: cached, or uploaded into a new
 * cache slot. */
static cudaError_t gg_weight_get(gpu_gemm *g, const float *b, uint64_t rows, uint64_t cols, uint64_t ld,
                                 const void **dev)
{
    gg_weight *w = gg_weight_find(g, b, rows, cols, ld);
    if (!w) {
        gg_buf buf = gg_buf();
        cudaError_t rc = gg_take(g, rows * cols * 4, &buf);
        if (rc != cudaSuccess)
            return rc;
        rc = gg_upload(g, buf.ptr, b, rows, cols, ld);
        if (rc != cudaSuccess) {
            cudaStreamSynchronize(g->stream);
            gg_give(g, &buf, 1);
            return rc;
        }
        w = gg_weight_slot(g);
        w->host = b;
        w->rows = rows;
        w->cols = cols;
        w->ld = ld;
        w->dev = buf.ptr;
        w->size = buf.size;
    }
    w->last_use = ++g->clock;
    *dev = w->dev;
    return cudaSuccess;
}

/* k = 0: C = beta * C (beta = 0 ignores C's contents), as the CPU seam does. */
static void gg_scale_host(uint64_t m, uint64_t n, float beta, float *c, uint64_t ldc)
{
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t j = 0; j < n; j++)
            c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
}

int gpu_gemm_sgemm(gpu_gemm *g, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha, const float *a,
                   uint64_t lda, const float *b, uint64_t ldb, bool b_is_weight, float beta, float *c, uint64_t ldc)
{
    GPU_ASSERT(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda >= k && ldc >= n &&
              ldb >= (trans_b ? k : n));
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (m == 0 || n == 0)
        return 0;
    if (k == 0) {
        gg_scale_host(m, n, beta, c, ldc);
        return 0;
    }
    uint64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
    bool b_cached = b_is_weight && gg_weight_find(g, b, b_rows, b_cols, ldb);
    uint64_t needs = (m * k + m * n + (b_cached ? 0 : b_rows * b_cols)) * 4; /* the call's device bytes */
    gg_buf buf[3] = {}; /* A, C, B (when not a weight) */
    const void *d_b = NULL;
    const char *what = "device allocation";
    cudaError_t rc = gg_take(g, m * k * 4, &buf[0]);
    if (rc == cudaSuccess)
        rc = gg_take(g, m * n * 4, &buf[1]);
    if (rc == cudaSuccess && b_is_weight) {
        rc = gg_weight_get(g, b, b_rows, b_cols, ldb, &d_b);
    } else if (rc == cudaSuccess) {
        rc = gg_take(g, b_rows * b_cols * 4, &buf[2]);
        if (rc == cudaSuccess) {
            what = "cudaMemcpy (B)";
            rc = gg_upload(g, buf[2].ptr, b, b_rows, b_cols, ldb);
            d_b = buf[2].ptr;
        }
    }
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (A)";
        rc = gg_upload(g, buf[0].ptr, a, m, k, lda);
    }
    if (rc == cudaSuccess && beta != 0.0f) {
        what = "cudaMemcpy (C)";
        rc = gg_upload(g, buf[1].ptr, c, m, n, ldc);
    }
    if (rc != cudaSuccess) {
        gg_drain(g);
        gg_give(g, buf, 3);
        return gg_cuda_fail(g, rc, what, needs);
    }
    /* Column-major: C^T [n, m] = op(B)^T [n, k] * A^T [k, m]. */
    cublasStatus_t st = cublasSgemm(g->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, (int)n, (int)m,
                                    (int)k, &alpha, (const float *)d_b, (int)b_cols, (const float *)buf[0].ptr,
                                    (int)k, &beta, (float *)buf[1].ptr, (int)n);
    if (st != CUBLAS_STATUS_SUCCESS) {
        gg_drain(g);
        gg_give(g, buf, 3);
        return gg_blas_fail(g, st, "cublasSgemm", needs);
    }
    /* Wait before C is written: a failed kernel then leaves C untouched. */
    rc = gg_drain(g);
    what = "cublasSgemm";
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (C back)";
        rc = cudaMemcpy2DAsync(c, (size_t)(ldc * 4), buf[1].ptr, (size_t)(n * 4), (size_t)(n * 4), (size_t)m,
                               cudaMemcpyDeviceToHost, g->stream);
        cudaError_t rc2 = gg_drain(g);
        rc = rc != cudaSuccess ? rc : rc2;
    }
    gg_give(g, buf, 3);
    return rc == cudaSuccess ? 0 : gg_cuda_fail(g, rc, what, needs);
}

/* ================================================================ Gram */

/* C += G, upper triangle, for the row-major G on the device, in row blocks
 * through the host stage. Returns cudaSuccess, or the error of a copy (C is
 * then partly updated). */
static cudaError_t gg_gram_add_back(gpu_gemm *g, const float *d_g, uint64_t dim, float *c)
{
    uint64_t stage_floats = GG_STAGE_BYTES / 4;
    for (uint64_t r0 = 0; r0 < dim;) {
        uint64_t width = dim - r0; /* columns [r0, dim) of rows r0.. hold the upper triangle */
        uint64_t rows = stage_floats / width;
        rows = rows < 1 ? 1 : rows > dim - r0 ? dim - r0 : rows;
        cudaError_t rc = cudaMemcpy2DAsync(g->stage, (size_t)(width * 4), d_g + r0 * dim + r0, (size_t)(dim * 4),
                                           (size_t)(width * 4), (size_t)rows, cudaMemcpyDeviceToHost, g->stream);
        if (rc == cudaSuccess)
            rc = gg_drain(g);
        if (rc != cudaSuccess)
            return rc;
        for (uint64_t i = r0; i < r0 + rows; i++) {
            const float *src = g->stage + (i - r0) * width + (i - r0); /* element (i, i) */
            float *dst = c + i * dim + i;
            for (uint64_t j = 0; j < dim - i; j++)
                dst[j] += src[j];
        }
        r0 += rows;
    }
    return cudaSuccess;
}

int gpu_gemm_gram(gpu_gemm *g, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c)
{
    GPU_ASSERT(dim <= INT32_MAX && n_rows <= INT32_MAX && ldx >= dim);
    GPU_ASSERT(dim * 4 <= GG_STAGE_BYTES); /* one row of the result fits the stage */
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (n_rows == 0 || dim == 0)
        return 0;
    uint64_t needs = (n_rows * dim + dim * dim) * 4;
    gg_buf buf[2] = {}; /* X, G */
    const char *what = "device allocation";
    cudaError_t rc = gg_take(g, n_rows * dim * 4, &buf[0]);
    if (rc == cudaSuccess)
        rc = gg_take(g, dim * dim * 4, &buf[1]);
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (X)";
        rc = gg_upload(g, buf[0].ptr, x, n_rows, dim, ldx);
    }
    if (rc != cudaSuccess) {
        gg_drain(g);
        gg_give(g, buf, 2);
        return gg_cuda_fail(g, rc, what, needs);
    }
    /* Column-major A = X^T [dim, n_rows]; G = A A^T, its lower triangle. */
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = cublasSsyrk(g->blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)dim, (int)n_rows, &one,
                                    (const float *)buf[0].ptr, (int)dim, &zero, (float *)buf[1].ptr, (int)dim);
    if (st != CUBLAS_STATUS_SUCCESS) {
        gg_drain(g);
        gg_give(g, buf, 2);
        return gg_blas_fail(g, st, "cublasSsyrk", needs);
    }
    rc = gg_drain(g);
    if (rc != cudaSuccess) { /* C not touched yet */
        gg_give(g, buf, 2);
        return gg_cuda_fail(g, rc, "cublasSsyrk", needs);
    }
    rc = gg_gram_add_back(g, (const float *)buf[1].ptr, dim, c);
    gg_drain(g);
    gg_give(g, buf, 2);
    if (rc != cudaSuccess) {
        /* C holds some of the rows' sums: whatever the error, it cannot be
         * retried; the caller must drop the statistics. */
        cudaGetLastError();
        g->broken = true;
        snprintf(g->err, sizeof g->err, "cudaMemcpy (Gram back): %s", cudaGetErrorString(rc));
        return -EFAULT;
    }
    return 0;
}

/* ================================================================ host memory */

void *gpu_gemm_host_alloc(gpu_gemm *g, uint64_t bytes)
{
    (void)g;
    void *p = NULL;
    if (cudaMallocHost(&p, (size_t)(bytes ? bytes : 1)) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

void gpu_gemm_host_free(gpu_gemm *g, void *p)
{
    (void)g;
    if (p && cudaFreeHost(p) != cudaSuccess)
        cudaGetLastError();
}

/* ================================================================ statistics on the device */

/* acc += blk, blk = 0 (the CPU's hessian_flush over the whole matrix: the
 * lower row-major triangle of blk is 0 and stays so). */
__global__ static void k_stat_flush(float *blk, double *acc, uint64_t n)
{
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        acc[i] += (double)blk[i];
        blk[i] = 0.0f;
    }
}

static cudaError_t gg_stat_flush(gpu_gemm *g, gg_stat *st)
{
    uint64_t n = st->dim * st->dim, blocks = (n + 255) / 256;
    k_stat_flush<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, g->stream>>>((float *)st->blk.ptr,
                                                                                     (double *)st->acc.ptr, n);
    st->in_block = 0;
    return cudaPeekAtLastError();
}

int gpu_gemm_stat_begin(gpu_gemm *g, unsigned slot, uint64_t dim, uint64_t flush_rows)
{
    GPU_ASSERT(slot < GG_STATS && dim <= INT32_MAX && flush_rows > 0 && !g->stat[slot].blk.ptr);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    gg_stat *st = &g->stat[slot];
    uint64_t needs = dim * dim * 12;
    /* Statistics may take at most half of what is left, so the layer's
     * weights and a batch's operands still fit: on a small card the forward
     * pass matters more than where its statistics add up. */
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        cudaGetLastError();
        free_b = 0;
    }
    uint64_t avail = (uint64_t)free_b + (g->pool.held - g->pool.in_use);
    if (g->pool.limit) { /* --gpu-memory-limit: what the cap leaves */
        uint64_t room = g->pool.limit > g->pool.in_use ? g->pool.limit - g->pool.in_use : 0;
        avail = room < avail ? room : avail;
    }
    if (needs > avail / 2) {
        char need_s[32], avail_s[32];
        gg_mib(need_s, sizeof need_s, needs);
        gg_mib(avail_s, sizeof avail_s, avail);
        snprintf(g->err, sizeof g->err, "statistics of %s would take more than half of the %s left", need_s, avail_s);
        return -ENOSPC;
    }
    cudaError_t rc = gg_take(g, dim * dim * 4, &st->blk);
    if (rc == cudaSuccess)
        rc = gg_take(g, dim * dim * 8, &st->acc);
    if (rc == cudaSuccess)
        rc = cudaMemsetAsync(st->blk.ptr, 0, (size_t)(dim * dim * 4), g->stream);
    if (rc == cudaSuccess)
        rc = cudaMemsetAsync(st->acc.ptr, 0, (size_t)(dim * dim * 8), g->stream);
    if (rc != cudaSuccess) {
        gg_drain(g);
        gpu_gemm_stat_end(g, slot);
        return gg_cuda_fail(g, rc, "device statistics", needs);
    }
    st->dim = dim;
    st->flush_rows = flush_rows;
    st->in_block = st->rows = 0;
    return 0;
}

int gpu_gemm_stat_add(gpu_gemm *g, unsigned slot, const float *x, uint64_t n_rows, uint64_t ldx)
{
    gg_stat *st = &g->stat[slot];
    GPU_ASSERT(slot < GG_STATS && st->blk.ptr && n_rows <= INT32_MAX && ldx >= st->dim);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (n_rows == 0)
        return 0;
    uint64_t dim = st->dim, needs = n_rows * dim * 4;
    gg_buf xb = gg_buf();
    const char *what = "device allocation";
    cudaError_t rc = gg_take(g, n_rows * dim * 4, &xb);
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (X)";
        rc = gg_upload(g, xb.ptr, x, n_rows, dim, ldx);
    }
    if (rc != cudaSuccess) { /* nothing added: the rows may go elsewhere */
        gg_drain(g);
        gg_give(g, &xb, 1);
        return gg_cuda_fail(g, rc, what, needs);
    }
    /* The rows split at block boundaries as on the CPU: no fp32 sum covers
     * more than flush_rows rows. From here a failure loses rows already
     * added, so every error is sticky (-EIO). */
    const float one = 1.0f;
    uint64_t done = 0;
    cublasStatus_t st_rc = CUBLAS_STATUS_SUCCESS;
    while (done < n_rows && st_rc == CUBLAS_STATUS_SUCCESS && rc == cudaSuccess) {
        if (st->in_block == st->flush_rows)
            rc = gg_stat_flush(g, st);
        uint64_t take = st->flush_rows - st->in_block;
        take = take < n_rows - done ? take : n_rows - done;
        if (rc == cudaSuccess)
            st_rc = cublasSsyrk(g->blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)dim, (int)take, &one,
                                (const float *)xb.ptr + done * dim, (int)dim, &one, (float *)st->blk.ptr, (int)dim);
        st->in_block += take;
        done += take;
    }
    cudaError_t rc2 = gg_drain(g); /* x's buffer may be released only now */
    gg_give(g, &xb, 1);
    rc = rc != cudaSuccess ? rc : rc2;
    if (st_rc != CUBLAS_STATUS_SUCCESS || rc != cudaSuccess) {
        cudaGetLastError();
        g->broken = true;
        snprintf(g->err, sizeof g->err, "statistics on the device: %s",
                 st_rc != CUBLAS_STATUS_SUCCESS ? gg_blas_string(st_rc) : cudaGetErrorString(rc));
        return -EIO;
    }
    st->rows += n_rows;
    return 0;
}

uint64_t gpu_gemm_stat_rows(const gpu_gemm *g, unsigned slot)
{
    GPU_ASSERT(slot < GG_STATS);
    return g->stat[slot].blk.ptr ? g->stat[slot].rows : 0;
}

int gpu_gemm_stat_read(gpu_gemm *g, unsigned slot, uint64_t r0, uint64_t n, double *buf)
{
    gg_stat *st = &g->stat[slot];
    GPU_ASSERT(slot < GG_STATS && st->blk.ptr && r0 <= st->dim && n <= st->dim - r0);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    cudaError_t rc = st->in_block ? gg_stat_flush(g, st) : cudaSuccess;
    if (rc == cudaSuccess)
        rc = cudaMemcpyAsync(buf, (const double *)st->acc.ptr + r0 * st->dim, (size_t)(n * st->dim * 8),
                             cudaMemcpyDeviceToHost, g->stream);
    cudaError_t rc2 = gg_drain(g);
    rc = rc != cudaSuccess ? rc : rc2;
    if (rc != cudaSuccess) {
        cudaGetLastError();
        g->broken = true;
        snprintf(g->err, sizeof g->err, "statistics back from the device: %s", cudaGetErrorString(rc));
        return -EIO;
    }
    return 0;
}

void gpu_gemm_stat_end(gpu_gemm *g, unsigned slot)
{
    GPU_ASSERT(slot < GG_STATS);
    gg_stat *st = &g->stat[slot];
    if (!st->blk.ptr && !st->acc.ptr)
        return;
    gg_drain(g);
    gg_give(g, &st->blk, 1);
    gg_give(g, &st->acc, 1);
    *st = gg_stat();
}

/* ================================================================ attention */

#define GA_SCORE_BYTES ((uint64_t)256 << 20) /* most device bytes of scores at once */
#define GA_THREADS 256u

/* Query rows per block of the scores (tests shrink it; 0: from GA_SCORE_BYTES). */
static uint64_t g_attend_block_rows = 0;

void gpu_gemm_set_attend_block_for_tests(uint64_t rows) { g_attend_block_rows = rows; }

/* Softmax of the scores of one block in place, one warp per row: row r =
 * rep * nq + i holds query q0 + i's scores against keys kl .. kl + nk - 1 of
 * the sequence (pos: the sequence's positions). Keys outside [window_first,
 * query] become 0, as on the CPU. */
__global__ static void k_attend_softmax(float *S, uint64_t n_rows, uint64_t nq, uint64_t nk, uint64_t q0,
                                        uint64_t kl, const uint32_t *pos, uint64_t window)
{
    uint64_t r = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    unsigned lane = threadIdx.x & 31u;
    if (r >= n_rows)
        return; /* whole warps */
    uint64_t i = q0 + r % nq;
    uint64_t lo = cpu_llama_window_first(pos, i, window) - kl, hi = i - kl;
    float *row = S + r * nk;
    float mx = -INFINITY;
    for (uint64_t k = lo + lane; k <= hi; k += 32u)
        mx = row[k] > mx ? row[k] : mx;
    for (unsigned o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, mx, (int)o);
        mx = other > mx ? other : mx;
    }
    float sum = 0.0f;
    for (uint64_t k = lo + lane; k <= hi; k += 32u) {
        float e = expf(row[k] - mx);
        row[k] = e;
        sum += e;
    }
    for (unsigned o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, (int)o);
    float inv = 1.0f / sum;
    __syncwarp();
    for (uint64_t k = lane; k < nk; k += 32u)
        row[k] = k >= lo && k <= hi ? row[k] * inv : 0.0f;
}

/* Query rows per block for a sequence of T rows: all of them when the
 * scores of every head sharing a kv head fit GA_SCORE_BYTES. */
static uint64_t ga_block_rows(uint64_t T, uint64_t n_rep)
{
    if (g_attend_block_rows)
        return g_attend_block_rows < T ? g_attend_block_rows : T;
    uint64_t rows = GA_SCORE_BYTES / (n_rep * T * 4);
    return rows < 1 ? 1 : rows < T ? rows : T;
}

/* Enqueues one sequence's attention (rows r0 .. r0 + T of the batch) on the
 * stream: per kv head and query block, the scores of each of its query
 * heads (cublasSgemm), their softmax, and the weighted values into d_attn.
 * Row-major to column-major as at the top of this file: the row-major
 * scores S [nq, nk] = scale Q [nq, hd] K^T are the column-major S^T =
 * K Q^T, with Q and K read in place from the qkv rows (leading dimension
 * QKV); the output O [nq, hd] = P V is O^T = V^T P^T, written into the
 * head's columns of the attention rows. */
static cublasStatus_t ga_sequence(gpu_gemm *g, const cpu_llama_attend_args *a, uint64_t r0, uint64_t T,
                                  const float *d_qkv, const uint32_t *d_pos, float *d_S, float *d_attn)
{
    uint64_t hd = a->head_dim, n_rep = a->n_heads / a->n_kv_heads, qd = a->n_heads * hd,
             kvd = a->n_kv_heads * hd, QKV = qd + 2 * kvd, QB = ga_block_rows(T, n_rep);
    const float one = 1.0f, zero = 0.0f;
    for (uint64_t kv = 0; kv < a->n_kv_heads; kv++) {
        for (uint64_t q0 = 0; q0 < T; q0 += QB) {
            uint64_t q1 = q0 + QB < T ? q0 + QB : T, nq = q1 - q0;
            /* the first key any query of the block sees (from the host's positions) */
            uint64_t kl = cpu_llama_window_first(a->pos + r0, q0, a->window), nk = q1 - kl;
            const float *K = d_qkv + (r0 + kl) * QKV + qd + kv * hd, *V = K + kvd;
            for (uint64_t rep = 0; rep < n_rep; rep++) {
                const float *Qh = d_qkv + (r0 + q0) * QKV + (kv * n_rep + rep) * hd;
                cublasStatus_t st = cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nk, (int)nq, (int)hd,
                                                &a->scale, K, (int)QKV, Qh, (int)QKV, &zero, d_S + rep * nq * nk,
                                                (int)nk);
                if (st != CUBLAS_STATUS_SUCCESS)
                    return st;
            }
            uint64_t rows = n_rep * nq;
            uint64_t blocks = (rows * 32u + GA_THREADS - 1) / GA_THREADS;
            k_attend_softmax<<<(unsigned)blocks, GA_THREADS, 0, g->stream>>>(d_S, rows, nq, nk, q0, kl, d_pos + r0,
                                                                              a->window);
            if (cudaPeekAtLastError() != cudaSuccess)
                return CUBLAS_STATUS_EXECUTION_FAILED;
            for (uint64_t rep = 0; rep < n_rep; rep++) {
                float *O = d_attn + (r0 + q0) * qd + (kv * n_rep + rep) * hd;
                cublasStatus_t st = cublasSgemm(g->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)nq, (int)nk, &one,
                                                V, (int)QKV, d_S + rep * nq * nk, (int)nk, &zero, O, (int)qd);
                if (st != CUBLAS_STATUS_SUCCESS)
                    return st;
            }
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

int gpu_gemm_attend(gpu_gemm *g, const cpu_llama_attend_args *a)
{
    uint64_t T = a->n_tokens, hd = a->head_dim, qd = a->n_heads * hd, QKV = qd + 2 * a->n_kv_heads * hd;
    GPU_ASSERT(a->n_kv_heads >= 1 && a->n_heads % a->n_kv_heads == 0 && QKV <= INT32_MAX);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (T == 0)
        return 0;
    uint64_t n_rep = a->n_heads / a->n_kv_heads, score_elems = 0;
    for (uint64_t s = 0; s < a->n_seqs; s++) {
        uint64_t n = a->seq_start[s + 1] - a->seq_start[s];
        GPU_ASSERT(n <= INT32_MAX);
        uint64_t e = n ? n_rep * ga_block_rows(n, n_rep) * n : 0;
        score_elems = e > score_elems ? e : score_elems;
    }
    uint64_t needs = (T * QKV + T * qd + score_elems) * 4 + T * 4;
    gg_buf buf[4] = {}; /* qkv, attn, scores, positions */
    const char *what = "device allocation";
    cudaError_t rc = gg_take(g, T * QKV * 4, &buf[0]);
    if (rc == cudaSuccess)
        rc = gg_take(g, T * qd * 4, &buf[1]);
    if (rc == cudaSuccess)
        rc = gg_take(g, (score_elems ? score_elems : 1) * 4, &buf[2]);
    if (rc == cudaSuccess)
        rc = gg_take(g, T * 4, &buf[3]);
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (qkv)";
        rc = cudaMemcpyAsync(buf[0].ptr, a->qkv, (size_t)(T * QKV * 4), cudaMemcpyHostToDevice, g->stream);
    }
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (positions)";
        rc = cudaMemcpyAsync(buf[3].ptr, a->pos, (size_t)(T * 4), cudaMemcpyHostToDevice, g->stream);
    }
    if (rc != cudaSuccess) {
        gg_drain(g);
        gg_give(g, buf, 4);
        return gg_cuda_fail(g, rc, what, needs);
    }
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    for (uint64_t s = 0; s < a->n_seqs && st == CUBLAS_STATUS_SUCCESS; s++) {
        uint64_t r0 = a->seq_start[s], n = a->seq_start[s + 1] - r0;
        if (n)
            st = ga_sequence(g, a, r0, n, (const float *)buf[0].ptr, (const uint32_t *)buf[3].ptr,
                             (float *)buf[2].ptr, (float *)buf[1].ptr);
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        gg_drain(g);
        gg_give(g, buf, 4);
        return gg_blas_fail(g, st, "attention (cublasSgemm, softmax kernel)", needs);
    }
    rc = gg_drain(g); /* before attn is written: a failed kernel leaves it untouched */
    what = "attention";
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (attention back)";
        rc = cudaMemcpyAsync(a->attn, buf[1].ptr, (size_t)(T * qd * 4), cudaMemcpyDeviceToHost, g->stream);
        cudaError_t rc2 = gg_drain(g);
        rc = rc != cudaSuccess ? rc : rc2;
    }
    gg_give(g, buf, 4);
    return rc == cudaSuccess ? 0 : gg_cuda_fail(g, rc, what, needs);
}

/* ================================================================ peak */

double gpu_gemm_peak_gflops(gpu_gemm *g, double seconds)
{
    static const uint64_t k_shapes[][2] = {{2048, 2048}, {8192, 2048}, {2048, 8192}}; /* N x K */
    const uint64_t m = 2048, max_elems = 2048 * 8192;
    if (gg_check_usable(g) < 0)
        return -1;
    gg_buf buf[3] = {};
    cudaEvent_t t0 = NULL, t1 = NULL;
    double best = -1;
    float *host = (float *)malloc((size_t)max_elems * 4);
    cudaError_t rc = host ? cudaSuccess : cudaErrorMemoryAllocation;
    for (unsigned i = 0; i < 3 && rc == cudaSuccess; i++)
        rc = gg_take(g, max_elems * 4, &buf[i]);
    if (rc == cudaSuccess)
        rc = cudaEventCreate(&t0);
    if (rc == cudaSuccess)
        rc = cudaEventCreate(&t1);
    if (rc == cudaSuccess) {
        for (uint64_t i = 0; i < max_elems; i++)
            host[i] = (float)((i * 7919u) % 1000) * 1e-3f - 0.5f;
        for (unsigned i = 0; i < 2 && rc == cudaSuccess; i++)
            rc = cudaMemcpyAsync(buf[i].ptr, host, (size_t)max_elems * 4, cudaMemcpyHostToDevice, g->stream);
    }
    const float one = 1.0f, zero = 0.0f;
    for (unsigned s = 0; s < 3 && rc == cudaSuccess; s++) {
        int n = (int)k_shapes[s][0], k = (int)k_shapes[s][1];
        double spent = 0;
        for (unsigned rep = 0; rc == cudaSuccess && (rep < 2 || spent < seconds / 3); rep++) {
            const unsigned calls = 10;
            rc = cudaEventRecord(t0, g->stream);
            for (unsigned i = 0; i < calls && rc == cudaSuccess; i++)
                if (cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, (int)m, k, &one, (const float *)buf[1].ptr, k,
                                (const float *)buf[0].ptr, k, &zero, (float *)buf[2].ptr, n) != CUBLAS_STATUS_SUCCESS)
                    rc = cudaErrorLaunchFailure;
            if (rc == cudaSuccess)
                rc = cudaEventRecord(t1, g->stream);
            if (rc == cudaSuccess)
                rc = cudaEventSynchronize(t1);
            float ms = 0;
            if (rc == cudaSuccess)
                rc = cudaEventElapsedTime(&ms, t0, t1);
            if (rc == cudaSuccess && ms > 0 && rep > 0) { /* rep 0 warms up */
                double rate = 2.0 * (double)m * n * k * calls / (ms * 1e-3) / 1e9;
                best = rate > best ? rate : best;
            }
            spent += ms * 1e-3;
        }
    }
    gg_drain(g);
    if (t0)
        cudaEventDestroy(t0);
    if (t1)
        cudaEventDestroy(t1);
    gg_give(g, buf, 3);
    free(host);
    if (rc != cudaSuccess) {
        gg_cuda_fail(g, rc, "peak measurement", 3 * max_elems * 4);
        return -1;
    }
    return best;
}
