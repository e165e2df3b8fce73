/* The Hessian-aware methods' Cholesky factorisation on the device
 * (gpu_backend.h, gpu_hessian_cholesky) in the CPU's order
 * (pipeline/merge_passes_hessian.c, ms_hessian_cholesky_pool), so that the
 * bits are the CPU's and a merge's output does not depend on where its
 * Hessians were factored:
 *   L[i][k] = (a[i][k] - dot(i, k)) / L[k][k]     (k < i)
 *   L[i][i] = sqrt(a[i][i] - dot(i, i))           (a pivot not > 0, or NaN: fail)
 *   dot(i, k) = 8 lanes, lane l summing L[i][m] * L[k][m] over m = l mod 8,
 *   m < 8 floor(k / 8), in increasing m from 0.0; folded as
 *   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); then the tail
 *   m in [8 floor(k / 8), k) added in order.
 * Every product and sum is rounded on its own (__dmul_rn, __dadd_rn: no
 * FMA), division and square root are IEEE's.
 *
 * Left to right by blocks of CH_BLOCK columns [j0, j1), three kernels each,
 * in stream order:
 *   k_ch_prefix  rows i >= j0, the block's columns: the 8 lanes over m < j0
 *                (all final there), 4 rows x 1 column per thread, m in tiles
 *                of CH_TILE staged in shared memory; each lane still sums
 *                in increasing m. Into the scratch `lanes`.
 *   k_ch_diag    the block's own rows, one thread each, a wavefront over
 *                the columns: at column k first row k's diagonal, then every
 *                row below it in the block (entry (i, k) reads row i before k
 *                and row k up to k). The lanes go on over m in
 *                [j0, 8 floor(k / 8)), then the fold and the tail.
 *   k_ch_below   the rows below the block, one thread each, the same
 *                continuation against the block's finished rows.
 * A failing pivot sets the flag; every later kernel returns at once. The
 * kernels and their launch sequence are in gpu_hessian_chol_kernels.cuh
 * (tests/emu runs them on the CPU); this file has the host side. */
#include "gpu/gpu_internal.h"
#include "gpu/gpu_elem.cuh"
#include "gpu/gpu_hessian_chol_kernels.cuh"

#include <inttypes.h>
#include <string.h>

/* ================================================================ host */

/* Offsets in the call's one device request: the matrix, the lanes scratch
 * (n rows x CH_BLOCK columns x 8; its start holds the diagonal at the end),
 * the failure flag. */
typedef struct ch_layout {
    uint64_t mat_off, lanes_off, flag_off, bytes;
} ch_layout;

static bool ch_layout_compute(uint64_t n, ch_layout *L)
{
    gpu_buf_acc acc = {0, true};
    uint64_t nn;
    if (__builtin_mul_overflow(n, n, &nn) || n > INT32_MAX)
        return false;
    L->mat_off = gpu_buf_take(&acc, nn, sizeof(double));
    L->lanes_off = gpu_buf_take(&acc, n, CH_BLOCK * 8u * sizeof(double));
    L->flag_off = gpu_buf_take(&acc, 1, sizeof(int));
    L->bytes = acc.off;
    return acc.ok;
}

uint64_t gpu_hessian_cholesky_bytes(uint64_t n)
{
    ch_layout L;
    if (n == 0)
        return 0;
    if (!ch_layout_compute(n, &L))
        return UINT64_MAX;
    return gpu_mempool_class_size(L.bytes);
}

/* Uploads a, factors it, brings back the flag and (diag_only) the diagonal
 * into l->host_tmp: [0] the flag as an int, from byte 8 the diagonal. */
static gpu_status ch_enqueue(gpu_backend *b, gpu_lane *l, const double *a, uint64_t n, bool diag_only,
                             unsigned char *dev, const ch_layout *L, char *msg, size_t msg_len)
{
    double *mat = (double *)(dev + L->mat_off), *lanes = (double *)(dev + L->lanes_off);
    int *flag = (int *)(dev + L->flag_off);
    GPU_CHECK(cudaMemcpyAsync(mat, a, n * n * sizeof(double), cudaMemcpyHostToDevice, b->copy_in),
              "copying a Hessian to the GPU");
    GPU_CHECK(cudaMemsetAsync(flag, 0, sizeof(int), b->copy_in), "clearing the factorisation's flag");
    GPU_CHECK(gpu_lane_inputs_sent(b, l), "ordering the GPU streams");
    ch_launch(mat, n, lanes, flag, diag_only, b->compute);
    GPU_CHECK(cudaSuccess, "Cholesky kernels");
    GPU_CHECK(gpu_lane_computed(b, l), "ordering the GPU streams");
    unsigned char *host = (unsigned char *)l->host_tmp;
    GPU_CHECK(cudaMemcpyAsync(host, flag, sizeof(int), cudaMemcpyDeviceToHost, b->copy_out),
              "copying the factorisation's flag from the GPU");
    if (diag_only)
        GPU_CHECK(cudaMemcpyAsync(host + 8, lanes, n * sizeof(double), cudaMemcpyDeviceToHost, b->copy_out),
                  "copying a Cholesky factor's diagonal from the GPU");
    GPU_CHECK(gpu_lane_wait(b, l), "running the Cholesky kernels");
    return GPU_OK;
}

/* The whole factor back into a (after the flag said it succeeded). */
static gpu_status ch_copy_back(gpu_backend *b, gpu_lane *l, double *a, uint64_t n, const unsigned char *dev,
                               const ch_layout *L, char *msg, size_t msg_len)
{
    GPU_CHECK(cudaMemcpyAsync(a, dev + L->mat_off, n * n * sizeof(double), cudaMemcpyDeviceToHost, b->copy_out),
              "copying a Cholesky factor from the GPU");
    GPU_CHECK(gpu_lane_wait(b, l), "copying a Cholesky factor from the GPU");
    return GPU_OK;
}

typedef struct ch_call {
    gpu_backend *b;
    gpu_lane *l;
    double *a;
    uint64_t n;
    bool diag_only, *not_pd;
    const ch_layout *L;
} ch_call;

/* gpu_call_fn: the factorisation, then what comes back into a. */
static gpu_status ch_call_run(void *ctx, unsigned char *dev, char *msg, size_t msg_len)
{
    const ch_call *k = (const ch_call *)ctx;
    gpu_backend *b = k->b;
    gpu_status status = ch_enqueue(b, k->l, k->a, k->n, k->diag_only, dev, k->L, msg, msg_len);
    if (status != GPU_OK)
        return status;
    int flag;
    memcpy(&flag, k->l->host_tmp, sizeof flag);
    *k->not_pd = flag != 0;
    if (*k->not_pd)
        return GPU_OK;
    if (!k->diag_only)
        return ch_copy_back(b, k->l, k->a, k->n, dev, k->L, msg, msg_len);
    const unsigned char *diag = (const unsigned char *)k->l->host_tmp + 8;
    for (uint64_t j = 0; j < k->n; j++)
        memcpy(&k->a[j * k->n + j], diag + j * sizeof(double), sizeof(double));
    return GPU_OK;
}

gpu_status gpu_hessian_cholesky(gpu_backend *b, double *a, uint64_t n, bool diag_only, bool *not_pd, char *msg,
                                size_t msg_len)
{
    *not_pd = false;
    if (msg && msg_len)
        msg[0] = '\0';
    if (gpu_backend_is_broken(b, msg, msg_len))
        return GPU_FATAL;
    if (n == 0)
        return GPU_OK;
    ch_layout L;
    if (!ch_layout_compute(n, &L)) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "a %" PRIu64 " x %" PRIu64 " matrix needs more device memory than can be addressed",
                     n, n);
        return GPU_OOM;
    }
    cudaError_t rc = cudaSetDevice(b->device);
    if (rc != cudaSuccess)
        return gpu_backend_classify(b, rc, "cudaSetDevice", msg, msg_len);
    gpu_lane *l = gpu_lane_acquire(b);
    gpu_status status;
    if (!gpu_lane_reserve(l, (size_t)(8 + n * sizeof(double)))) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "needs %" PRIu64 " KiB of pinned host memory: out of memory",
                     (8 + n * 8) / 1024 + 1);
        status = GPU_OOM;
    } else {
        ch_call k = {b, l, a, n, diag_only, not_pd, &L};
        status = gpu_backend_run_call(b, l, L.bytes, ch_call_run, &k, msg, msg_len);
    }
    gpu_lane_release(b, l);
    return status;
}
