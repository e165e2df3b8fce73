/* Statistics held on the device for a whole layer (gpu_gemm.h, gpu_gemm_stat_*). */
#include "gpu/gpu_gemm_internal.h"
#include "gpu/gpu_elem.cuh"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* acc += blk, blk = 0 (the CPU's hessian_flush over the whole matrix: the
 * lower row-major triangle of blk is 0 and stays so). */
__global__ static void k_stat_flush(float *blk, double *acc, uint64_t n)
{
    GPU_FOR_ELEMS(i, n)
    {
        acc[i] += (double)blk[i];
        blk[i] = 0.0f;
    }
}

static cudaError_t gg_stat_flush(gpu_gemm *g, gg_stat *st)
{
    uint64_t n = st->dim * st->dim;
    k_stat_flush<<<gpu_grid(n, 256, 65536), 256, 0, g->stream>>>((float *)st->blk.ptr, (double *)st->acc.ptr, n);
    st->in_block = 0;
    return cudaPeekAtLastError();
}

cublasStatus_t gg_stat_accumulate(gpu_gemm *g, gg_stat *st, const float *d_x, uint64_t n_rows, uint64_t ld)
{
    /* The rows split at block boundaries as on the CPU: no fp32 sum covers
     * more than flush_rows rows. The slot counts them as enqueued. */
    const float one = 1.0f;
    for (uint64_t done = 0; done < n_rows;) {
        if (st->in_block == st->flush_rows && gg_stat_flush(g, st) != cudaSuccess)
            return CUBLAS_STATUS_EXECUTION_FAILED;
        uint64_t take = st->flush_rows - st->in_block;
        take = take < n_rows - done ? take : n_rows - done;
        cublasStatus_t rc = cublasSsyrk(g->blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, (int)st->dim, (int)take, &one,
                                        d_x + done * ld, (int)ld, &one, (float *)st->blk.ptr, (int)st->dim);
        if (rc != CUBLAS_STATUS_SUCCESS)
            return rc;
        st->in_block += take;
        st->rows += take;
        done += take;
    }
    return CUBLAS_STATUS_SUCCESS;
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
    /* From here a failure loses rows already added: every error is sticky. */
    cublasStatus_t st_rc = gg_stat_accumulate(g, st, (const float *)xb.ptr, n_rows, dim);
    cudaError_t rc2 = gg_drain(g); /* x's buffer may be released only now */
    gg_give(g, &xb, 1);
    rc = rc != cudaSuccess ? rc : rc2;
    if (st_rc != CUBLAS_STATUS_SUCCESS || rc != cudaSuccess)
        return gg_sticky(g, "statistics on the device", st_rc, rc);
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
    return rc == cudaSuccess ? 0 : gg_sticky(g, "statistics back from the device", CUBLAS_STATUS_SUCCESS, rc);
}

/* out = the full symmetric matrix of acc's upper triangle times scale, in
 * fp32: cpu_hessian_rows_out's expression (an fp32 block that is not live
 * adds 0.0). */
__global__ static void k_stat_out(const double *acc, float *out, uint64_t dim, double scale)
{
    GPU_FOR_ELEMS(e, dim * dim)
    {
        uint64_t i = e / dim, j = e % dim;
        double v = acc[i <= j ? e : j * dim + i] + 0.0;
        out[e] = (float)(scale * v);
    }
}

int gpu_gemm_stat_out(gpu_gemm *g, unsigned slot, double scale, float *dst)
{
    gg_stat *st = &g->stat[slot];
    GPU_ASSERT(slot < GG_STATS && st->blk.ptr);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    uint64_t n = st->dim * st->dim;
    cudaError_t rc = st->in_block ? gg_stat_flush(g, st) : cudaSuccess;
    if (rc == cudaSuccess) { /* the fp32 block is free once flushed: the output goes there */
        k_stat_out<<<gpu_grid(n, 256, 65536), 256, 0, g->stream>>>((const double *)st->acc.ptr, (float *)st->blk.ptr,
                                                                   st->dim, scale);
        rc = cudaPeekAtLastError();
    }
    if (rc == cudaSuccess)
        rc = cudaMemcpyAsync(dst, st->blk.ptr, (size_t)(n * 4), cudaMemcpyDeviceToHost, g->stream);
    if (rc == cudaSuccess)
        rc = cudaEventRecord(g->out_done, g->stream);
    if (rc != cudaSuccess) {
        gpu_gemm_stat_end(g, slot);
        return gg_sticky(g, "statistics out of the device", CUBLAS_STATUS_SUCCESS, rc);
    }
    /* Back to the pool without waiting: everything that may take these
     * blocks next runs on the same stream, after the copy. */
    gg_give(g, &st->blk, 1);
    gg_give(g, &st->acc, 1);
    *st = gg_stat();
    return 0;
}

int gpu_gemm_stat_out_wait(gpu_gemm *g)
{
    cudaError_t rc = cudaEventSynchronize(g->out_done);
    return rc == cudaSuccess ? 0 : -EIO;
}

typedef struct gg_stat_source {
    gpu_gemm *g;
    unsigned slot;
} gg_stat_source;

static int gg_stat_rows_back(void *ctx, uint64_t r0, uint64_t n, double *buf)
{
    const gg_stat_source *src = (const gg_stat_source *)ctx;
    return gpu_gemm_stat_read(src->g, src->slot, r0, n, buf);
}

int gpu_gemm_stat_finish(gpu_gemm *g, unsigned slot, cpu_hessian *h)
{
    gg_stat_source src = {g, slot};
    int rc = h ? cpu_hessian_add_sum(h, gpu_gemm_stat_rows(g, slot), gg_stat_rows_back, &src) : 0;
    gpu_gemm_stat_end(g, slot);
    return rc;
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

