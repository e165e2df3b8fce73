/* The Cholesky factorisation's kernels and their launch sequence
 * (gpu_hessian_chol.cu has the order of work they follow), apart from the
 * host code so that tests/emu runs this very code on the CPU: every CUDA
 * thread an OS thread, __syncthreads a barrier (tests/emu/gpu_emu.hpp).
 * Needs gpu/gpu_grid.cuh's GPU_LAUNCH and, under nvcc, the CUDA runtime. */
#ifndef MS_GPU_HESSIAN_CHOL_KERNELS_CUH
#define MS_GPU_HESSIAN_CHOL_KERNELS_CUH

#include <stdbool.h>
#include <stdint.h>

#include "gpu/gpu_grid.cuh"

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

/* The factorisation's kernels in stream order on s: mat (n x n, row major,
 * its lower triangle) into L in place, lanes the scratch (n x CH_BLOCK x 8
 * doubles), *flag set by a failing pivot (every later kernel then returns
 * at once); diag_only: then L's diagonal into lanes[0, n). Launch errors
 * are left for the caller's cudaGetLastError. */
static inline void ch_launch(double *mat, uint64_t n, double *lanes, int *flag, bool diag_only, cudaStream_t s)
{
    for (uint64_t j0 = 0; j0 < n; j0 += CH_BLOCK) {
        unsigned nk = (unsigned)(n - j0 < CH_BLOCK ? n - j0 : CH_BLOCK);
        uint64_t below = n - j0 - nk;
        unsigned prefix_blocks = (unsigned)((n - j0 + CH_PREFIX_BLOCK_ROWS - 1) / CH_PREFIX_BLOCK_ROWS);
        GPU_LAUNCH(k_ch_prefix, prefix_blocks, CH_PREFIX_THREADS, s, mat, n, j0, nk, lanes, flag);
        GPU_LAUNCH(k_ch_diag, 1, CH_BLOCK, s, mat, n, j0, nk, lanes, flag);
        if (below)
            GPU_LAUNCH(k_ch_below, (unsigned)((below + CH_BELOW_THREADS - 1) / CH_BELOW_THREADS), CH_BELOW_THREADS, s,
                       mat, n, j0, nk, lanes, flag);
    }
    if (diag_only)
        GPU_LAUNCH(k_ch_diagonal, gpu_grid(n, 256, 65536), 256, s, mat, n, lanes);
}

#endif
