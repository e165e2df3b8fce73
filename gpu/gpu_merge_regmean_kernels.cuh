/* regmean's solve kernels and their launch sequences (gpu_merge_regmean.cu
 * has the order of work they follow and the element kernels around them),
 * apart from the host code so that tests/emu runs this very code on the CPU
 * (tests/emu/gpu_emu.hpp). Needs gpu/gpu_grid.cuh's GPU_LAUNCH and, under
 * nvcc, the CUDA runtime. */
#ifndef MS_GPU_MERGE_REGMEAN_KERNELS_CUH
#define MS_GPU_MERGE_REGMEAN_KERNELS_CUH

#include <stdint.h>

#include "gpu/gpu_grid.cuh"

#define RG_TILE 64u          /* rows and columns of a tiled kernel's thread block */
#define RG_THREADS 256u      /* 16 x 16 threads, 4 x 4 outputs each */
#define RG_K 32u             /* the inner index per shared tile; the solves' column blocks */
#define RG_ROW_THREADS 128u  /* the row kernels: one thread per row */

static_assert(RG_THREADS == 256u && RG_TILE == 64u, "4 x 4 outputs per thread of a 16 x 16 block");

__device__ __forceinline__ double rg_add_product(double s, double x, double y)
{
    return __dadd_rn(s, __dmul_rn(x, y));
}

__device__ __forceinline__ double rg_sub_product(double s, double x, double y)
{
    return __dsub_rn(s, __dmul_rn(x, y));
}

/* A thread's 4 x 4 outputs of a 64 x 64 tile at (r0, c0) of M [rows][n]:
 * rows r0 + ty + 16 p, columns c0 + tx + 16 q; those at rows >= rows or
 * columns >= cols are left out (loaded as 0.0, not stored). */
__device__ __forceinline__ void rg_tile_load(double (*acc)[4], const double *M, uint64_t n, uint64_t r0, uint64_t c0,
                                             uint64_t rows, uint64_t cols)
{
    unsigned tx = threadIdx.x % 16u, ty = threadIdx.x / 16u;
#pragma unroll
    for (unsigned p = 0; p < 4u; p++)
#pragma unroll
        for (unsigned q = 0; q < 4u; q++) {
            uint64_t r = r0 + ty + 16u * p, c = c0 + tx + 16u * q;
            acc[p][q] = r < rows && c < cols ? M[r * n + c] : 0.0;
        }
}

__device__ __forceinline__ void rg_tile_store(double (*acc)[4], double *M, uint64_t n, uint64_t r0, uint64_t c0,
                                              uint64_t rows, uint64_t cols)
{
    unsigned tx = threadIdx.x % 16u, ty = threadIdx.x / 16u;
#pragma unroll
    for (unsigned p = 0; p < 4u; p++)
#pragma unroll
        for (unsigned q = 0; q < 4u; q++) {
            uint64_t r = r0 + ty + 16u * p, c = c0 + tx + 16u * q;
            if (r < rows && c < cols)
                M[r * n + c] = acc[p][q];
        }
}

/* B[r][j] += sum_k g[k][j] * tau[r][k], k ascending, for one model. */
__global__ void k_rg_accum(const float *__restrict__ tau, const float *__restrict__ g, double *__restrict__ B,
                           uint64_t rows, uint64_t n)
{
    __shared__ float st[RG_TILE][RG_K + 1]; /* tau[r0 + r][k0 + kk] */
    __shared__ float sg[RG_K][RG_TILE];     /* g[k0 + kk][j0 + j] */
    unsigned t = threadIdx.x, tx = t % 16u, ty = t / 16u;
    uint64_t r0 = (uint64_t)blockIdx.y * RG_TILE, j0 = (uint64_t)blockIdx.x * RG_TILE;
    double acc[4][4];
    rg_tile_load(acc, B, n, r0, j0, rows, n);
    for (uint64_t k0 = 0; k0 < n; k0 += RG_K) {
        unsigned kn = (unsigned)(n - k0 < RG_K ? n - k0 : RG_K);
        for (unsigned e = t; e < RG_TILE * RG_K; e += RG_THREADS) {
            unsigned r = e / RG_K, kk = e % RG_K;
            st[r][kk] = r0 + r < rows && kk < kn ? tau[(r0 + r) * n + k0 + kk] : 0.0f;
            unsigned kg = e / RG_TILE, j = e % RG_TILE;
            sg[kg][j] = kg < kn && j0 + j < n ? g[(k0 + kg) * n + j0 + j] : 0.0f;
        }
        __syncthreads();
        for (unsigned kk = 0; kk < kn; kk++) {
            double gv[4];
#pragma unroll
            for (unsigned q = 0; q < 4u; q++)
                gv[q] = (double)sg[kk][tx + 16u * q];
#pragma unroll
            for (unsigned p = 0; p < 4u; p++) {
                double tv = (double)st[ty + 16u * p][kk];
#pragma unroll
                for (unsigned q = 0; q < 4u; q++)
                    acc[p][q] = rg_add_product(acc[p][q], gv[q], tv);
            }
        }
        __syncthreads(); /* the tiles are rewritten next */
    }
    rg_tile_store(acc, B, n, r0, j0, rows, n);
}

/* The block's own lower triangle of L into sl (every thread of the block). */
__device__ __forceinline__ void rg_load_block(double (*sl)[RG_K + 1], const double *L, uint64_t n, uint64_t j0,
                                              unsigned nk)
{
    for (unsigned e = threadIdx.x; e < RG_K * RG_K; e += blockDim.x) {
        unsigned a = e / RG_K, c = e % RG_K;
        sl[a][c] = a < nk && c <= a ? L[(j0 + a) * n + j0 + c] : 0.0;
    }
    __syncthreads();
}

/* z over columns [j0, j0 + nk) of every row: S holds each s_j over k < j0. */
__global__ void k_rg_fwd_diag(const double *L, uint64_t n, uint64_t rows, uint64_t j0, unsigned nk, const double *B,
                              const double *S, double *Z)
{
    __shared__ double sl[RG_K][RG_K + 1];
    rg_load_block(sl, L, n, j0, nk);
    uint64_t r = (uint64_t)blockIdx.x * RG_ROW_THREADS + threadIdx.x;
    if (r >= rows)
        return;
    const double *b = B + r * n + j0, *s_in = S + r * n + j0;
    double *zr = Z + r * n + j0;
    double z[RG_K];
    for (unsigned a = 0; a < nk; a++) {
        double s = s_in[a];
        for (unsigned c = 0; c < a; c++)
            s = rg_add_product(s, sl[a][c], z[c]);
        z[a] = __ddiv_rn(__dsub_rn(b[a], s), sl[a][a]);
        zr[a] = z[a];
    }
}

/* S[r][j] += sum_{k in [j0, j0 + nk)} L[j][k] * Z[r][k], k ascending, for
 * j >= j1 = j0 + nk (blockIdx.x counts 64-column tiles from j1). */
__global__ void k_rg_fwd_update(const double *__restrict__ L, uint64_t n, uint64_t rows, uint64_t j0, unsigned nk,
                                const double *__restrict__ Z, double *__restrict__ S)
{
    __shared__ double sz[RG_TILE][RG_K + 1]; /* Z[r0 + r][j0 + kk] */
    __shared__ double sl[RG_TILE][RG_K + 1]; /* L[jt + j][j0 + kk] */
    unsigned t = threadIdx.x, tx = t % 16u, ty = t / 16u;
    uint64_t r0 = (uint64_t)blockIdx.y * RG_TILE, jt = j0 + nk + (uint64_t)blockIdx.x * RG_TILE;
    for (unsigned e = t; e < RG_TILE * RG_K; e += RG_THREADS) {
        unsigned i = e / RG_K, kk = e % RG_K;
        sz[i][kk] = r0 + i < rows && kk < nk ? Z[(r0 + i) * n + j0 + kk] : 0.0;
        sl[i][kk] = jt + i < n && kk < nk ? L[(jt + i) * n + j0 + kk] : 0.0;
    }
    __syncthreads();
    double acc[4][4];
    rg_tile_load(acc, S, n, r0, jt, rows, n);
    for (unsigned kk = 0; kk < nk; kk++) {
#pragma unroll
        for (unsigned p = 0; p < 4u; p++) {
            double zv = sz[ty + 16u * p][kk];
#pragma unroll
            for (unsigned q = 0; q < 4u; q++)
                acc[p][q] = rg_add_product(acc[p][q], sl[tx + 16u * q][kk], zv);
        }
    }
    rg_tile_store(acc, S, n, r0, jt, rows, n);
}

/* y over columns [j0, j0 + nk) of every row, in place of z: j descending,
 * y_j = z_j / L_jj, then the block's z_k (k < j) less L_jk y_j. */
__global__ void k_rg_bwd_diag(const double *L, uint64_t n, uint64_t rows, uint64_t j0, unsigned nk, double *Z)
{
    __shared__ double sl[RG_K][RG_K + 1];
    rg_load_block(sl, L, n, j0, nk);
    uint64_t r = (uint64_t)blockIdx.x * RG_ROW_THREADS + threadIdx.x;
    if (r >= rows)
        return;
    double *zr = Z + r * n + j0;
    double z[RG_K];
    for (unsigned a = 0; a < nk; a++)
        z[a] = zr[a];
    for (unsigned a = nk; a-- > 0;) {
        double y = __ddiv_rn(z[a], sl[a][a]);
        z[a] = y;
        for (unsigned c = 0; c < a; c++)
            z[c] = rg_sub_product(z[c], sl[a][c], y);
    }
    for (unsigned a = 0; a < nk; a++)
        zr[a] = z[a];
}

/* Z[r][k] -= L[j][k] * Y[r][j] for j = j0 + nk - 1 down to j0, every k < j0
 * (Y: the block's columns of Z, already y). */
__global__ void k_rg_bwd_update(const double *__restrict__ L, uint64_t n, uint64_t rows, uint64_t j0, unsigned nk,
                                double *__restrict__ Z)
{
    __shared__ double sy[RG_TILE][RG_K + 1]; /* Y[r0 + r][j0 + jj] */
    __shared__ double sl[RG_K][RG_TILE + 1]; /* L[j0 + jj][kt + k] */
    unsigned t = threadIdx.x, tx = t % 16u, ty = t / 16u;
    uint64_t r0 = (uint64_t)blockIdx.y * RG_TILE, kt = (uint64_t)blockIdx.x * RG_TILE;
    for (unsigned e = t; e < RG_TILE * RG_K; e += RG_THREADS) {
        unsigned i = e / RG_K, jj = e % RG_K;
        sy[i][jj] = r0 + i < rows && jj < nk ? Z[(r0 + i) * n + j0 + jj] : 0.0;
        unsigned jl = e / RG_TILE, k = e % RG_TILE;
        sl[jl][k] = jl < nk && kt + k < j0 ? L[(j0 + jl) * n + kt + k] : 0.0;
    }
    __syncthreads();
    double acc[4][4];
    rg_tile_load(acc, Z, n, r0, kt, rows, j0);
    for (unsigned jj = nk; jj-- > 0;) {
#pragma unroll
        for (unsigned p = 0; p < 4u; p++) {
            double yv = sy[ty + 16u * p][jj];
#pragma unroll
            for (unsigned q = 0; q < 4u; q++)
                acc[p][q] = rg_sub_product(acc[p][q], sl[jj][tx + 16u * q], yv);
        }
    }
    rg_tile_store(acc, Z, n, r0, kt, rows, j0);
}

/* b += model i's terms for a chunk of `rows` rows (tau_i [rows][n], g_i
 * [n][n], B [rows][n], zeroed before the first model), on stream s. */
static inline void rg_launch_accum(const float *tau_i, const float *g_i, double *B, uint64_t rows, uint64_t n,
                                   cudaStream_t s)
{
    dim3 tiles((unsigned)((n + RG_TILE - 1) / RG_TILE), (unsigned)((rows + RG_TILE - 1) / RG_TILE));
    GPU_LAUNCH(k_rg_accum, tiles, RG_THREADS, s, tau_i, g_i, B, rows, n);
}

/* y into Z [rows][n] from B: the forward substitution by blocks of RG_K
 * columns, ascending, then the backward one, descending (S [rows][n] zeroed
 * before, the running sums), on stream s. Launch errors are left for the
 * caller's cudaGetLastError. */
static inline void rg_launch_solve(const double *Lc, uint64_t n, uint64_t rows, const double *B, double *S,
                                   double *Z, cudaStream_t s)
{
    unsigned row_blocks = (unsigned)((rows + RG_ROW_THREADS - 1) / RG_ROW_THREADS);
    unsigned row_tiles = (unsigned)((rows + RG_TILE - 1) / RG_TILE);
    for (uint64_t j0 = 0; j0 < n; j0 += RG_K) {
        unsigned nk = (unsigned)(n - j0 < RG_K ? n - j0 : RG_K);
        GPU_LAUNCH(k_rg_fwd_diag, row_blocks, RG_ROW_THREADS, s, Lc, n, rows, j0, nk, B, S, Z);
        uint64_t after = n - j0 - nk;
        if (after)
            GPU_LAUNCH(k_rg_fwd_update, dim3((unsigned)((after + RG_TILE - 1) / RG_TILE), row_tiles), RG_THREADS, s,
                       Lc, n, rows, j0, nk, Z, S);
    }
    for (uint64_t j0 = (n - 1) / RG_K * RG_K;; j0 -= RG_K) {
        unsigned nk = (unsigned)(n - j0 < RG_K ? n - j0 : RG_K);
        GPU_LAUNCH(k_rg_bwd_diag, row_blocks, RG_ROW_THREADS, s, Lc, n, rows, j0, nk, Z);
        if (j0 == 0)
            break;
        GPU_LAUNCH(k_rg_bwd_update, dim3((unsigned)((j0 + RG_TILE - 1) / RG_TILE), row_tiles), RG_THREADS, s, Lc, n,
                   rows, j0, nk, Z);
    }
}

#endif
