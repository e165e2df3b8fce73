/* The CUDA kernels of sce and arcee_fusion (gi_sel_enqueue, see
 * gpu_merge_interp.h): their selection keys, the KEY_HI / KEY_LO histograms,
 * sce's tie positions and SUMSQ, arcee_fusion's per-row KL divergence, and
 * the two APPLY variants. gpu_merge_interp.cu lays out the call's memory,
 * copies and folds; the semantics are pipeline/merge_passes_interp.h's,
 * the bytes and statistics cpu/cpu_merge_interp.c's.
 *
 * Exactness, kernel by kernel:
 *   keys          sce: ms_merge_key(ms_interp_sce_var(task vectors));
 *                 arcee_fusion: ms_interp_order_key(|d| * (float)kl), |d|
 *                 written as the CPU's (d < 0 ? -d : d), so -0 stays -0.
 *   k_hist_hi/lo  64-bit atomic counters, one add per distinct bin per warp
 *                 (gpu_warp_count): integer sums, any order.
 *   tie positions as gpu_merge.cu's eq_pos: per GI_SEG segment the count of
 *                 key == sel_key, an exclusive scan in segment order from
 *                 eq_seen, then inside a segment sub-tiles in order ranked
 *                 with warp ballots: each element's exact count of equal
 *                 keys before it in flat index order (0 when not split, as
 *                 the CPU's sce_keep).
 *   k_sce_sumsq   one thread per (65,536-element block, model) walks the
 *                 chunk's part of the block in index order from the carried
 *                 open sum (the chunk's first block) or 0.0, adding
 *                 (double)tau * (double)tau: cpu task_sumsq's additions in
 *                 its order; the host folds with ms_interp_fold.
 *   k_fusion_kl   one thread per row, sequentially: cpu fusion_kl's fp32
 *                 maximum (a NaN sticks once seen), then its per-row blocked
 *                 fp64 sums in column order (exp recomputed for the second
 *                 sum: ms_interp_exp is a pure function, the same bits).
 *   apply         one thread per element: ms_interp_sce_combine, or
 *                 B + d * m with m = ((double)importance >= threshold).
 * nvcc gets --fmad=false and no fast-math flag; fp32 / fp64 division and
 * fp64 addition are IEEE round-to-nearest on the device. */
#include "gpu/gpu_internal.h"

extern "C" {
#include "pipeline/merge_math_interp.h"
}

#include "gpu/gpu_elem.cuh"
#include "gpu/gpu_merge_interp.h"

#define GK_THREADS 256u     /* threads per block of the element kernels */
#define GK_SUM_THREADS 64u  /* threads per block of the sequential kernels */
#define GK_MAX_GRID 65536u  /* grid-stride kernels: at most this many blocks */
#define GK_SEG_WARPS (GI_SEG_THREADS / 32u)

static_assert(GI_SEG_THREADS % 32u == 0 && GK_THREADS % 32u == 0, "warp kernels need whole warps");
static_assert(sizeof(gi_sel_call) <= 4000, "kernel parameters are limited to 4 KiB");

/* ================================================================ elements */

__device__ __forceinline__ float gk_slot(const gi_sel_call &a, unsigned slot, uint64_t j)
{
    return gpu_load(a.in[slot], a.dtype[slot], j);
}

/* sce: the task vectors of chunk element j into d[0..n_models) (as cpu
 * ix_load_delta); returns the base. */
__device__ __forceinline__ float gk_sce_deltas(const gi_sel_call &a, uint64_t j, float *d)
{
    float b = gk_slot(a, 0, j);
    for (unsigned i = 1; i <= a.n_models; i++)
        d[i - 1] = ms_merge_delta(gk_slot(a, i, j), b);
    return b;
}

/* arcee_fusion: the importance of chunk element j with its row's kl (cpu
 * fusion_importance); the base and the task vector into *b, *d. */
__device__ __forceinline__ float gk_fusion_importance(const gi_sel_call &a, uint64_t j, float *b, float *d)
{
    *b = gk_slot(a, 0, j);
    *d = ms_merge_delta(gk_slot(a, 1, j), *b);
    float k32 = (float)a.row_kl[j / a.cols];
    return (*d < 0.0f ? -*d : *d) * k32;
}

/* The selection key of chunk element j. */
__device__ __forceinline__ uint32_t gk_key(const gi_sel_call &a, uint64_t j)
{
    if (a.fusion) {
        float b, d;
        return ms_interp_order_key(gk_fusion_importance(a, j, &b, &d));
    }
    float d[MS_MAX_MODELS];
    gk_sce_deltas(a, j, d);
    return ms_merge_key(ms_interp_sce_var(d, 1, a.n_models));
}

/* sce's keep flag of chunk element j (the mask is filled for TOP). */
__device__ __forceinline__ bool gk_sce_keep(const gi_sel_call &a, uint64_t j)
{
    if (a.sel == MS_INTERP_SEL_TOP)
        return a.mask[j] != 0;
    return a.sel == MS_INTERP_SEL_ALL;
}

/* ============================================================== histograms */

/* KEY_HI: hist_hi[key >> 16]++ and n_zero += (key == 0) for every element
 * (the CPU counts zeros for both methods; only sce reads them). */
static __global__ void k_hist_hi(const __grid_constant__ gi_sel_call a)
{
    GPU_FOR_WARP_ELEMS(j, a.n)
    {
        bool valid = j < a.n;
        uint32_t key = valid ? gk_key(a, j) : 0u;
        gpu_warp_count(a.hist_hi, key >> 16, valid);
        unsigned zeros = __ballot_sync(0xffffffffu, valid && key == 0u);
        if ((threadIdx.x & 31u) == 0 && zeros)
            atomicAdd(a.n_zero, (unsigned long long)__popc(zeros));
    }
}

/* KEY_LO: for each rank r with its own histogram, hist_lo[r][key & 0xffff]++
 * where key >> 16 == bin[r]. */
static __global__ void k_hist_lo(const __grid_constant__ gi_sel_call a)
{
    GPU_FOR_WARP_ELEMS(j, a.n)
    {
        bool valid = j < a.n;
        uint32_t key = valid ? gk_key(a, j) : 0u;
        for (unsigned r = 0; r < a.n_ranks; r++)
            gpu_warp_count(a.hist_lo[r], key & 0xffffu, valid && a.hist_lo[r] && (key >> 16) == a.bin[r]);
    }
}

/* ========================================================== tie positions */

/* Per segment (one block each): seg_cnt[seg] = the count of key == sel_key. */
static __global__ void k_eq_count(const __grid_constant__ gi_sel_call a)
{
    uint64_t seg = blockIdx.x, c = 0;
    for (unsigned s = 0; s < GI_SEG_SUB; s++) {
        uint64_t j = seg * GI_SEG + (uint64_t)s * GI_SEG_THREADS + threadIdx.x;
        bool valid = j < a.n;
        uint32_t key = valid ? gk_key(a, j) : 0u;
        c += (uint64_t)__syncthreads_count(valid && key == a.sel_key);
    }
    if (threadIdx.x == 0)
        a.seg_cnt[seg] = c;
}

/* sce's TOP mask (one block per segment): mask[j] = ms_merge_sel_upper(key,
 * eq_pos, sel_key, sel_take), eq_pos exact when split, else 0. */
static __global__ void k_sce_mask(const __grid_constant__ gi_sel_call a)
{
    __shared__ unsigned wtot[GK_SEG_WARPS];
    uint64_t seg = blockIdx.x;
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned below = (1u << lane) - 1u; /* lanes before this one */
    uint64_t pos = a.split ? a.seg_start[seg] : 0;
    for (unsigned s = 0; s < GI_SEG_SUB; s++) {
        uint64_t j = seg * GI_SEG + (uint64_t)s * GI_SEG_THREADS + threadIdx.x;
        bool valid = j < a.n;
        uint32_t key = valid ? gk_key(a, j) : 0u;
        unsigned eq = __ballot_sync(0xffffffffu, valid && a.split && key == a.sel_key);
        if (lane == 0)
            wtot[warp] = (unsigned)__popc(eq);
        __syncthreads();
        uint64_t off = 0, all = 0;
        for (unsigned w = 0; w < GK_SEG_WARPS; w++) {
            if (w < warp)
                off += wtot[w];
            all += wtot[w];
        }
        uint64_t eq_pos = pos + off + (unsigned)__popc(eq & below);
        if (valid)
            a.mask[j] = ms_merge_sel_upper(key, eq_pos, a.sel_key, a.sel_take) ? 1 : 0;
        pos += all;
        __syncthreads(); /* wtot is rewritten by the next sub-tile */
    }
}

/* ================================================================== sums */

/* tau_i^2 of chunk element j in fp64 (exact: the square of an fp32 value). */
__device__ __forceinline__ double gk_tau_sq(const gi_sel_call &a, unsigned i, uint64_t j)
{
    float d = ms_merge_delta(gk_slot(a, i, j), gk_slot(a, 0, j));
    float tau = d * (gk_sce_keep(a, j) ? 1.0f : 0.0f);
    return (double)tau * (double)tau;
}

/* SUMSQ: thread t = k * n_models + (i - 1) sums tau_i^2 over the chunk's part
 * of its k-th block, in index order; block 0 continues open[i - 1]. */
static __global__ void k_sce_sumsq(const __grid_constant__ gi_sel_call a)
{
    uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= a.n_blocks * a.n_models)
        return;
    uint64_t k = t / a.n_models;
    unsigned i = (unsigned)(t % a.n_models) + 1;
    uint64_t lo, hi;
    gpu_block_range(a.elem0, a.n, k, &lo, &hi);
    double open = k == 0 ? a.open[i - 1] : 0.0;
    a.blk[t] = gpu_ordered_sum(open, lo - a.elem0, hi - a.elem0, [&](uint64_t j) { return gk_tau_sq(a, i, j); });
}

/* arcee_fusion's KL divergence of chunk row lr (one thread per row), as cpu
 * fusion_kl: p = softmax(X row) + 1e-8, q = softmax(B row) + 1e-8, kl = sum p
 * log(p / q), every sum blocked per 65,536 columns from the row's start. */
static __global__ void k_fusion_kl(const __grid_constant__ gi_sel_call a)
{
    uint64_t lr = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (lr >= a.n_rows)
        return;
    uint64_t cols = a.cols, j0 = lr * cols;
    float mx = gk_slot(a, 1, j0), mb = gk_slot(a, 0, j0);
    for (uint64_t c = 0; c < cols; c++) {
        float tx = gk_slot(a, 1, j0 + c), tb = gk_slot(a, 0, j0 + c);
        if (mx == mx && !(tx <= mx)) /* the maximum, a NaN sticking once seen */
            mx = tx;
        if (mb == mb && !(tb <= mb))
            mb = tb;
    }
    double dmx = (double)mx, dmb = (double)mb;
    double zx = 0.0, zb = 0.0, bx = 0.0, bb = 0.0;
    for (uint64_t c = 0; c < cols; c++) {
        if (c % MS_MERGE_BLOCK == 0 && c > 0) {
            zx = zx + bx;
            zb = zb + bb;
            bx = bb = 0.0;
        }
        bx = bx + ms_interp_exp((double)gk_slot(a, 1, j0 + c) - dmx);
        bb = bb + ms_interp_exp((double)gk_slot(a, 0, j0 + c) - dmb);
    }
    zx = zx + bx;
    zb = zb + bb;
    double kl = 0.0, blk = 0.0;
    for (uint64_t c = 0; c < cols; c++) {
        if (c % MS_MERGE_BLOCK == 0 && c > 0) {
            kl = kl + blk;
            blk = 0.0;
        }
        double ex = ms_interp_exp((double)gk_slot(a, 1, j0 + c) - dmx);
        double eb = ms_interp_exp((double)gk_slot(a, 0, j0 + c) - dmb);
        double pp = ex / zx + 1e-8, qq = eb / zb + 1e-8;
        blk = blk + pp * ms_interp_log(pp / qq);
    }
    a.row_kl[lr] = kl + blk;
}

/* ================================================================= apply */

/* sce: tau_i = d_i * m, out = ms_interp_sce_combine (cpu tile_apply). */
static __global__ void k_sce_apply(const __grid_constant__ gi_sel_call a)
{
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < a.n;
         j += (uint64_t)gridDim.x * blockDim.x) {
        float tau[MS_MAX_MODELS];
        float b = gk_sce_deltas(a, j, tau);
        float m = gk_sce_keep(a, j) ? 1.0f : 0.0f;
        for (unsigned i = 0; i < a.n_models; i++)
            tau[i] = tau[i] * m;
        gpu_store(a.out, a.out_dtype, j, ms_interp_sce_combine(b, tau, 1, a.w, a.n_models));
    }
}

/* arcee_fusion: out = B + d * m, m = ((double)importance >= threshold) as
 * 0/1 (cpu task_apply_rows). */
static __global__ void k_fusion_apply(const __grid_constant__ gi_sel_call a)
{
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < a.n;
         j += (uint64_t)gridDim.x * blockDim.x) {
        float b, d;
        float imp = gk_fusion_importance(a, j, &b, &d);
        float m = (double)imp >= a.threshold ? 1.0f : 0.0f;
        gpu_store(a.out, a.out_dtype, j, b + d * m);
    }
}

/* ================================================================== host */

/* One thread per item, GK_SUM_THREADS per block. */
static unsigned gk_sum_grid(uint64_t items)
{
    uint64_t blocks = (items + GK_SUM_THREADS - 1) / GK_SUM_THREADS;
    GPU_ASSERT(blocks <= 0x7fffffffu);
    return (unsigned)(blocks ? blocks : 1);
}

#define GK_LAUNCHED()                                                                                      \
    do {                                                                                                   \
        cudaError_t rc_ = cudaGetLastError();                                                              \
        if (rc_ != cudaSuccess)                                                                            \
            return rc_;                                                                                    \
    } while (0)

/* sce's TOP mask: the tie positions when split, then the flags. */
static cudaError_t gk_sce_mask(const gi_sel_call *a, cudaStream_t s)
{
    if (a->sel != MS_INTERP_SEL_TOP)
        return cudaSuccess;
    GPU_ASSERT(a->mask && a->n_seg == (a->n + GI_SEG - 1) / GI_SEG && a->n_seg <= 0x7fffffffu);
    unsigned n_seg = (unsigned)a->n_seg;
    if (a->split) {
        GPU_ASSERT(a->seg_cnt && a->seg_start && a->eq_total);
        k_eq_count<<<n_seg, GI_SEG_THREADS, 0, s>>>(*a);
        GK_LAUNCHED();
        gpu_eq_scan<<<1, GPU_SCAN_THREADS, 0, s>>>(a->seg_cnt, a->n_seg, a->eq_seen, a->seg_start, a->eq_total);
        GK_LAUNCHED();
    }
    k_sce_mask<<<n_seg, GI_SEG_THREADS, 0, s>>>(*a);
    GK_LAUNCHED();
    return cudaSuccess;
}

cudaError_t gi_sel_enqueue(const gi_sel_call *a, cudaStream_t s)
{
    unsigned grid = gpu_grid(a->n, GK_THREADS, GK_MAX_GRID);
    cudaError_t rc;
    switch (a->kind) {
    case MS_MERGE_PASS_KEY_HI:
        if (a->fusion) { /* the rows' KL first: the keys need it */
            k_fusion_kl<<<gk_sum_grid(a->n_rows), GK_SUM_THREADS, 0, s>>>(*a);
            GK_LAUNCHED();
        }
        k_hist_hi<<<grid, GK_THREADS, 0, s>>>(*a);
        GK_LAUNCHED();
        break;
    case MS_MERGE_PASS_KEY_LO:
        if (a->n_ranks == 0) /* sce keeping all or none: nothing searched */
            break;
        k_hist_lo<<<grid, GK_THREADS, 0, s>>>(*a);
        GK_LAUNCHED();
        break;
    case MS_MERGE_PASS_SUMSQ:
        GPU_ASSERT(!a->fusion);
        rc = gk_sce_mask(a, s);
        if (rc != cudaSuccess)
            return rc;
        k_sce_sumsq<<<gk_sum_grid(a->n_blocks * a->n_models), GK_SUM_THREADS, 0, s>>>(*a);
        GK_LAUNCHED();
        break;
    case MS_MERGE_PASS_APPLY:
        if (a->fusion) {
            k_fusion_apply<<<grid, GK_THREADS, 0, s>>>(*a);
        } else {
            rc = gk_sce_mask(a, s);
            if (rc != cudaSuccess)
                return rc;
            k_sce_apply<<<grid, GK_THREADS, 0, s>>>(*a);
        }
        GK_LAUNCHED();
        break;
    default:
        GPU_ASSERT(!"not a pass of sce or arcee_fusion");
    }
    return cudaSuccess;
}
