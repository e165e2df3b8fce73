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
#include "gpu/gpu_gemm_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "gpu/gpu_device.h"
#include "gpu/gpu_gram_blocks.cuh"
#include "gpu/gpu_gemm.h"
#include "gpu/gpu_mempool.h"

/* ================================================================ errors */

const char *gg_blas_string(cublasStatus_t st)
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
void gg_mib(char *buf, size_t n, uint64_t bytes)
{
    double mib = (double)bytes / 1048576.0;
    snprintf(buf, n, mib >= 10 || bytes % 1048576 == 0 ? "%.0f MiB" : "%.1f MiB", mib);
}

/* Out of device memory for a call that needs `needs` bytes: clears the (not
 * sticky) error, trims, describes it. Returns -ENOMEM. */
int gg_oom(gpu_gemm *g, uint64_t needs)
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
int gg_cuda_fail(gpu_gemm *g, cudaError_t rc, const char *what, uint64_t needs)
{
    if (rc == cudaErrorMemoryAllocation)
        return gg_oom(g, needs);
    return gg_sticky(g, what, CUBLAS_STATUS_SUCCESS, rc);
}

int gg_sticky(gpu_gemm *g, const char *what, cublasStatus_t st, cudaError_t rc)
{
    cudaGetLastError(); /* a sticky error stays; anything else is not left for the next call */
    g->broken = true;
    snprintf(g->err, sizeof g->err, "%s: %s", what,
             st != CUBLAS_STATUS_SUCCESS ? gg_blas_string(st) : cudaGetErrorString(rc));
    return -EIO;
}

/* A cuBLAS error: ALLOC_FAILED is out of memory; anything else is treated
 * as sticky (a failed launch, or a bug that must not be retried on the
 * device). */
int gg_blas_fail(gpu_gemm *g, cublasStatus_t st, const char *what, uint64_t needs)
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
int gg_check_usable(gpu_gemm *g)
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
cudaError_t gg_take(gpu_gemm *g, uint64_t bytes, gg_buf *b)
{
    return gpu_mempool_alloc(&g->pool, bytes, &b->ptr, &b->size);
}

/* Gives the call's blocks back; the stream must be idle (every failure
 * path waits for it first). */
void gg_give(gpu_gemm *g, gg_buf *bufs, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        gpu_mempool_release(&g->pool, bufs[i].ptr, bufs[i].size);
        bufs[i] = gg_buf();
    }
}

/* Waits for everything the call enqueued (so its buffers may be released)
 * and returns the first error, if any. */
cudaError_t gg_drain(gpu_gemm *g)
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
    rc = cudaEventCreateWithFlags(&g->out_done, cudaEventDisableTiming);
    if (rc != cudaSuccess) {
        snprintf(why, why_len, "cudaEventCreate: %s", cudaGetErrorString(rc));
        cudaGetLastError();
        g->out_done = 0;
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
    if (g->out_done)
        cudaEventDestroy(g->out_done);
    for (unsigned i = 0; i < GG_MARKS && g->marks_made; i++)
        cudaEventDestroy(g->mark[i]);
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
cudaError_t gg_upload(gpu_gemm *g, void *dev, const float *host, uint64_t rows, uint64_t cols, uint64_t ld)
{
    return cudaMemcpy2DAsync(dev, (size_t)(cols * 4), host, (size_t)(ld * 4), (size_t)(cols * 4), (size_t)rows,
                             cudaMemcpyHostToDevice, g->stream);
}

/* The device copy of weight B [rows, cols]: cached, or uploaded into a new
 * cache slot. */
cudaError_t gg_weight_get(gpu_gemm *g, const float *b, uint64_t rows, uint64_t cols, uint64_t ld,
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

cublasStatus_t gg_gram_enqueue(gpu_gemm *g, const float *A, uint64_t dim, uint64_t rows, uint64_t lda, float beta,
                               float *C, uint64_t ldc)
{
    return gpu_gram_blocks(g->blas, g->gram_block, A, dim, rows, lda, beta, C, ldc);
}

void gpu_gemm_set_gram_block(gpu_gemm *g, uint64_t block) { g->gram_block = block; }

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
    cublasStatus_t st = gg_gram_enqueue(g, (const float *)buf[0].ptr, dim, n_rows, dim, 0.0f, (float *)buf[1].ptr, dim);
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
        gg_sticky(g, "cudaMemcpy (Gram back)", CUBLAS_STATUS_SUCCESS, rc);
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

/* ================================================================ peak */

/* One measured operation: enqueues one call on g's stream. */
typedef cublasStatus_t (*gg_timed_fn)(gpu_gemm *g, const float *a, const float *b, float *c, const uint64_t *shape);

/* The best rate (GFLOP/s) of `call` with `flops` per call, timed in groups
 * of 10 calls with events for about `seconds` (at least two groups; the
 * first warms up and is not counted). *rc: the first error. */
static double gg_best_rate(gpu_gemm *g, cudaEvent_t t0, cudaEvent_t t1, gg_timed_fn call, const gg_buf *buf,
                           const uint64_t *shape, double flops, double seconds, cudaError_t *rc)
{
    double best = -1, spent = 0;
    for (unsigned rep = 0; *rc == cudaSuccess && (rep < 2 || spent < seconds); rep++) {
        const unsigned calls = 10;
        *rc = cudaEventRecord(t0, g->stream);
        for (unsigned i = 0; i < calls && *rc == cudaSuccess; i++)
            if (call(g, (const float *)buf[0].ptr, (const float *)buf[1].ptr, (float *)buf[2].ptr, shape) !=
                CUBLAS_STATUS_SUCCESS)
                *rc = cudaErrorLaunchFailure;
        if (*rc == cudaSuccess)
            *rc = cudaEventRecord(t1, g->stream);
        if (*rc == cudaSuccess)
            *rc = cudaEventSynchronize(t1);
        float ms = 0;
        if (*rc == cudaSuccess)
            *rc = cudaEventElapsedTime(&ms, t0, t1);
        if (*rc == cudaSuccess && ms > 0 && rep > 0) {
            double rate = flops * calls / (ms * 1e-3) / 1e9;
            best = rate > best ? rate : best;
        }
        spent += ms * 1e-3;
    }
    return best;
}

/* Three device buffers of max_elems floats each, the first two filled
 * with a fixed pattern, and two timing events, for a measurement; the
 * error of the first step that failed. */
static cudaError_t gg_bench_setup(gpu_gemm *g, uint64_t max_elems, gg_buf *buf, cudaEvent_t *t0, cudaEvent_t *t1)
{
    float *host = (float *)malloc((size_t)max_elems * 4);
    cudaError_t rc = host ? cudaSuccess : cudaErrorMemoryAllocation;
    for (unsigned i = 0; i < 3 && rc == cudaSuccess; i++)
        rc = gg_take(g, max_elems * 4, &buf[i]);
    if (rc == cudaSuccess)
        rc = cudaEventCreate(t0);
    if (rc == cudaSuccess)
        rc = cudaEventCreate(t1);
    if (rc == cudaSuccess) {
        for (uint64_t i = 0; i < max_elems; i++)
            host[i] = (float)((i * 7919u) % 1000) * 1e-3f - 0.5f;
        for (unsigned i = 0; i < 2 && rc == cudaSuccess; i++)
            rc = cudaMemcpyAsync(buf[i].ptr, host, (size_t)max_elems * 4, cudaMemcpyHostToDevice, g->stream);
        if (rc == cudaSuccess)
            rc = cudaStreamSynchronize(g->stream); /* host is freed next */
    }
    free(host);
    return rc;
}

/* gg_bench_setup's resources back; -1 with the error described when rc
 * failed, else rate. */
static double gg_bench_end(gpu_gemm *g, gg_buf *buf, cudaEvent_t t0, cudaEvent_t t1, cudaError_t rc, uint64_t bytes,
                           double rate)
{
    gg_drain(g);
    if (t0)
        cudaEventDestroy(t0);
    if (t1)
        cudaEventDestroy(t1);
    gg_give(g, buf, 3);
    if (rc != cudaSuccess) {
        gg_cuda_fail(g, rc, "rate measurement", bytes);
        return -1;
    }
    return rate;
}

/* C [m, n] = A [m, k] B [n, k]^T as the linear layers call it; shape {m, n, k}. */
static cublasStatus_t gg_timed_sgemm(gpu_gemm *g, const float *a, const float *b, float *c, const uint64_t *shape)
{
    const float one = 1.0f, zero = 0.0f;
    int m = (int)shape[0], n = (int)shape[1], k = (int)shape[2];
    return cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, k, a, k, &zero, c, n);
}

/* The Gram update of the statistics; shape {dim, rows}. */
static cublasStatus_t gg_timed_gram(gpu_gemm *g, const float *a, const float *b, float *c, const uint64_t *shape)
{
    (void)b;
    return gg_gram_enqueue(g, a, shape[0], shape[1], shape[0], 1.0f, c, shape[0]);
}

double gpu_gemm_peak_gflops(gpu_gemm *g, double seconds)
{
    static const uint64_t k_shapes[][2] = {{2048, 2048}, {8192, 2048}, {2048, 8192}}; /* N x K */
    const uint64_t m = 2048, max_elems = 2048 * 8192;
    if (gg_check_usable(g) < 0)
        return -1;
    gg_buf buf[3] = {};
    cudaEvent_t t0 = NULL, t1 = NULL;
    cudaError_t rc = gg_bench_setup(g, max_elems, buf, &t0, &t1);
    double best = -1;
    for (unsigned s = 0; s < 3 && rc == cudaSuccess; s++) {
        const uint64_t shape[3] = {m, k_shapes[s][0], k_shapes[s][1]};
        double r = gg_best_rate(g, t0, t1, gg_timed_sgemm, buf, shape, 2.0 * (double)m * shape[1] * shape[2],
                                seconds / 3, &rc);
        best = r > best ? r : best;
    }
    return gg_bench_end(g, buf, t0, t1, rc, 3 * max_elems * 4, best);
}

double gpu_gemm_gram_gflops(gpu_gemm *g, uint64_t dim, uint64_t rows, uint64_t block, double seconds)
{
    GPU_ASSERT(dim >= 1 && rows >= 1 && dim <= INT32_MAX && rows <= INT32_MAX);
    if (gg_check_usable(g) < 0)
        return -1;
    uint64_t max_elems = dim * (dim > rows ? dim : rows), saved = g->gram_block;
    gg_buf buf[3] = {};
    cudaEvent_t t0 = NULL, t1 = NULL;
    cudaError_t rc = gg_bench_setup(g, max_elems, buf, &t0, &t1);
    const uint64_t shape[2] = {dim, rows};
    g->gram_block = block;
    double r = rc == cudaSuccess ? gg_best_rate(g, t0, t1, gg_timed_gram, buf, shape,
                                                (double)dim * (double)(dim + 1) * (double)rows, seconds, &rc)
                                 : -1;
    g->gram_block = saved;
    return gg_bench_end(g, buf, t0, t1, rc, 3 * max_elems * 4, r);
}
