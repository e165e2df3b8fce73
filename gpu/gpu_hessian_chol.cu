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
 * A failing pivot sets the flag; every later kernel returns at once. */
#include "gpu/gpu_internal.h"
#include "gpu/gpu_elem.cuh"

#include <inttypes.h>
#include <string.h>

#define CH_BLOCK 32u          /* columns per block: a multiple of the 8 lanes */
#define CH_TILE 32u           /* m per shared tile of k_ch_prefix (j0 is a multiple of it) */
#define CH_PREFIX_ROWS 4u     /* rows per thread of k_ch_prefix */
#define CH_PREFIX_THREADS 256u /* 32 columns x 8 row groups: 32 rows per thread block */
#define CH_PREFIX_BLOCK_ROWS (CH_PREFIX_THREADS / 32u * CH_PREFIX_ROWS)
#define CH_BELOW_THREADS 128u

static_assert(CH_BLOCK % 8u == 0 && CH_BLOCK % CH_TILE == 0, "blocks start on lane groups and tiles");
static_assert(CH_PREFIX_BLOCK_ROWS == 32u, "k_ch_prefix stages 32 rows");

/* s + x * y with the product rounded first: the CPU's s = s + x[m] * y[m]. */
__device__ __forceinline__ double ch_add_product(double s, double x, double y)
{
    return __dadd_rn(s, __dmul_rn(x, y));
}

/* The 8 lanes of entry (row j0 + r, column j0 + c). */
__device__ __forceinline__ double *ch_lanes(double *lanes, uint64_t r, unsigned c)
{
    return lanes + (r * CH_BLOCK + c) * 8u;
}

/* dot(i, k) for column k = j0 + c of a row i whose block entries are x[0..c)
 * (x[m] = L[i][j0 + m]), against row k's block entries y: the lanes from
 * k_ch_prefix, continued over the block, folded, and the tail. */
__device__ __forceinline__ double ch_dot(const double *prefix, unsigned c, const double *x, const double *y)
{
    double l[8];
#pragma unroll
    for (unsigned q = 0; q < 8u; q++)
        l[q] = prefix[q];
    unsigned lanes_end = c & ~7u; /* 8 floor(k / 8) - j0: j0 is a multiple of 8 */
    for (unsigned m = 0; m < lanes_end; m += 8u) {
#pragma unroll
        for (unsigned q = 0; q < 8u; q++)
            l[q] = ch_add_product(l[q], x[m + q], y[m + q]);
    }
    double s = __dadd_rn(__dadd_rn(__dadd_rn(l[0], l[1]), __dadd_rn(l[2], l[3])),
                         __dadd_rn(__dadd_rn(l[4], l[5]), __dadd_rn(l[6], l[7])));
    for (unsigned m = lanes_end; m < c; m++)
        s = ch_add_product(s, x[m], y[m]);
    return s;
}

/* Lanes over m < j0 of rows [j0 + 32 blockIdx.x, + 32) x the block's nk
 * columns. Thread (c = t % 32, g = t / 32) owns rows g, g + 8, g + 16,
 * g + 24 of its 32 and column c. */
__global__ void k_ch_prefix(const double *__restrict__ a, uint64_t n, uint64_t j0, unsigned nk,
                            double *__restrict__ lanes, const int *fail)
{
    __shared__ double sx[CH_PREFIX_BLOCK_ROWS][CH_TILE + 1]; /* the rows' tile */
    __shared__ double sy[CH_BLOCK][CH_TILE + 1];             /* the block rows' tile */
    if (*fail)
        return;
    unsigned t = threadIdx.x, c = t & 31u, g = t >> 5;
    uint64_t i0 = j0 + (uint64_t)blockIdx.x * CH_PREFIX_BLOCK_ROWS;
    double acc[CH_PREFIX_ROWS][8];
#pragma unroll
    for (unsigned q = 0; q < CH_PREFIX_ROWS; q++)
#pragma unroll
        for (unsigned l = 0; l < 8u; l++)
            acc[q][l] = 0.0;
    for (uint64_t m0 = 0; m0 < j0; m0 += CH_TILE) {
        for (unsigned e = t; e < CH_PREFIX_BLOCK_ROWS * CH_TILE; e += CH_PREFIX_THREADS) {
            unsigned r = e / CH_TILE, mm = e % CH_TILE;
            uint64_t i = i0 + r;
            sx[r][mm] = i < n ? a[i * n + m0 + mm] : 0.0;
            sy[r][mm] = r < nk ? a[(j0 + r) * n + m0 + mm] : 0.0;
        }
        __syncthreads();
#pragma unroll
        for (unsigned mm = 0; mm < CH_TILE; mm++) {
            double y = sy[c][mm];
#pragma unroll
            for (unsigned q = 0; q < CH_PREFIX_ROWS; q++)
                acc[q][mm & 7u] = ch_add_product(acc[q][mm & 7u], sx[g + 8u * q][mm], y);
        }
        __syncthreads(); /* the tiles are rewritten next */
    }
    if (c >= nk)
        return;
#pragma unroll
    for (unsigned q = 0; q < CH_PREFIX_ROWS; q++) {
        uint64_t i = i0 + g + 8u * q;
        if (i >= n)
            continue;
        double *dst = ch_lanes(lanes, i - j0, c);
#pragma unroll
        for (unsigned l = 0; l < 8u; l++)
            dst[l] = acc[q][l];
    }
}

/* The block's own rows j0 .. j0 + nk - 1 (one thread block of CH_BLOCK
 * threads, thread t = row j0 + t). */
__global__ void k_ch_diag(double *a, uint64_t n, uint64_t j0, unsigned nk, double *lanes, int *fail)
{
    __shared__ double sl[CH_BLOCK][CH_BLOCK + 1]; /* a's entries, then L's */
    __shared__ int bad;
    if (*fail)
        return;
    unsigned t = threadIdx.x;
    uint64_t i = j0 + t;
    if (t == 0)
        bad = 0;
    if (t < nk)
        for (unsigned c = 0; c <= t; c++)
            sl[t][c] = a[i * n + j0 + c];
    __syncthreads();
    for (unsigned s = 0; s < nk; s++) {
        if (t == s) {
            double d = __dsub_rn(sl[s][s], ch_dot(ch_lanes(lanes, s, s), s, sl[s], sl[s]));
            if (!(d > 0.0))
                bad = 1;
            else
                sl[s][s] = __dsqrt_rn(d);
        }
        __syncthreads();
        if (bad)
            break; /* every thread reads it after the barrier: all leave together */
        if (t > s && t < nk)
            sl[t][s] = __ddiv_rn(__dsub_rn(sl[t][s], ch_dot(ch_lanes(lanes, t, s), s, sl[t], sl[s])), sl[s][s]);
        __syncthreads();
    }
    if (bad) {
        if (t == 0)
            *fail = 1;
        return;
    }
    if (t < nk)
        for (unsigned c = 0; c <= t; c++)
            a[i * n + j0 + c] = sl[t][c];
}

/* Rows j0 + nk + blockIdx.x * CH_BELOW_THREADS + t, the block's columns. */
__global__ void k_ch_below(double *a, uint64_t n, uint64_t j0, unsigned nk, double *lanes, const int *fail)
{
    __shared__ double sl[CH_BLOCK][CH_BLOCK + 1];         /* the block's rows of L */
    __shared__ double sx[CH_BELOW_THREADS][CH_BLOCK + 1]; /* each thread's row, as it is computed */
    if (*fail)
        return;
    unsigned t = threadIdx.x;
    for (unsigned e = t; e < CH_BLOCK * CH_BLOCK; e += CH_BELOW_THREADS) {
        unsigned r = e / CH_BLOCK, c = e % CH_BLOCK;
        sl[r][c] = r < nk && c <= r ? a[(j0 + r) * n + j0 + c] : 0.0;
    }
    __syncthreads();
    uint64_t i = j0 + nk + (uint64_t)blockIdx.x * CH_BELOW_THREADS + t;
    if (i >= n)
        return;
    double *x = sx[t];
    double *row = a + i * n + j0;
    for (unsigned c = 0; c < nk; c++)
        x[c] = __ddiv_rn(__dsub_rn(row[c], ch_dot(ch_lanes(lanes, i - j0, c), c, x, sl[c])), sl[c][c]);
    for (unsigned c = 0; c < nk; c++)
        row[c] = x[c];
}

/* out[j] = a[j][j]. */
__global__ void k_ch_diagonal(const double *a, uint64_t n, double *out)
{
    GPU_FOR_ELEMS(j, n)
    {
        out[j] = a[j * n + j];
    }
}

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
    cudaStream_t s = b->compute;
    for (uint64_t j0 = 0; j0 < n; j0 += CH_BLOCK) {
        unsigned nk = (unsigned)(n - j0 < CH_BLOCK ? n - j0 : CH_BLOCK);
        uint64_t below = n - j0 - nk;
        unsigned prefix_blocks = (unsigned)((n - j0 + CH_PREFIX_BLOCK_ROWS - 1) / CH_PREFIX_BLOCK_ROWS);
        k_ch_prefix<<<prefix_blocks, CH_PREFIX_THREADS, 0, s>>>(mat, n, j0, nk, lanes, flag);
        GPU_CHECK(cudaSuccess, "Cholesky prefix kernel");
        k_ch_diag<<<1, CH_BLOCK, 0, s>>>(mat, n, j0, nk, lanes, flag);
        GPU_CHECK(cudaSuccess, "Cholesky diagonal block kernel");
        if (below) {
            unsigned blocks = (unsigned)((below + CH_BELOW_THREADS - 1) / CH_BELOW_THREADS);
            k_ch_below<<<blocks, CH_BELOW_THREADS, 0, s>>>(mat, n, j0, nk, lanes, flag);
            GPU_CHECK(cudaSuccess, "Cholesky panel kernel");
        }
    }
    if (diag_only) {
        k_ch_diagonal<<<gpu_grid(n, 256, 65536), 256, 0, s>>>(mat, n, lanes);
        GPU_CHECK(cudaSuccess, "Cholesky diagonal gather kernel");
    }
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
