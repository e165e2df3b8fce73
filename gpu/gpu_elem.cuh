/* What the CUDA kernel files share (private to gpu/; include after
 * gpu/gpu_internal.h): loads and stores of tensor elements in their
 * safetensors dtypes (pipeline/merge_math.h's conversions, so the bits are
 * the CPU's), grid sizes and grid-stride loops (gpu_grid.cuh), buffer layout, warp
 * histogram counts, the fp64 sums' block ranges, the tie positions' scan,
 * the test-only trap kernel. */
#ifndef MS_GPU_ELEM_CUH
#define MS_GPU_ELEM_CUH

#include "gpu/gpu_grid.cuh"

/* Element j of a chunk buffer of dtype dt (F32, F16 or BF16) widened to fp32. */
__device__ __forceinline__ float gpu_load(const void *p, int dt, uint64_t j)
{
    if (dt == ST_F32)
        return ms_f32_from_bits(((const uint32_t *)p)[j]);
    uint16_t h = ((const uint16_t *)p)[j];
    return dt == ST_BF16 ? ms_bf16_to_f32(h) : ms_f16_to_f32(h);
}

/* v rounded once (nearest even, NaN stays NaN) into element j of dtype dt. */
__device__ __forceinline__ void gpu_store(void *p, int dt, uint64_t j, float v)
{
    if (dt == ST_F32)
        ((uint32_t *)p)[j] = ms_merge_store_f32(v);
    else if (dt == ST_BF16)
        ((uint16_t *)p)[j] = ms_merge_store_bf16(v);
    else
        ((uint16_t *)p)[j] = ms_merge_store_f16(v);
}

/* hist[bin] += 1 for every lane with `valid`, one atomic per distinct bin
 * in the warp (hot bins would otherwise serialise on their counter). Every
 * lane of the warp must call it (bins are below 0xffffffff). Integer
 * counts: exact in any order. */
__device__ __forceinline__ void gpu_warp_count(unsigned long long *hist, uint32_t bin, bool valid)
{
    unsigned peers = __match_any_sync(0xffffffffu, valid ? bin : 0xffffffffu);
    unsigned lane = threadIdx.x & 31u;
    if (valid && lane == (unsigned)(__ffs((int)peers) - 1))
        atomicAdd(&hist[bin], (unsigned long long)__popc(peers));
}

/* Grid-stride loop over whole warps (blockDim.x a multiple of 32): every
 * lane of a warp runs the same iterations (j may be past n: then it is not
 * valid), so warp collectives are safe inside. */
#define GPU_FOR_WARP_ELEMS(j, n)                                                                           \
    for (uint64_t wbase_ = (uint64_t)blockIdx.x * blockDim.x + (threadIdx.x & ~31u),                      \
                  j = wbase_ + (threadIdx.x & 31u);                                                        \
         wbase_ < (n); wbase_ += (uint64_t)gridDim.x * blockDim.x, j = wbase_ + (threadIdx.x & 31u))

/* The chunk [elem0, elem0 + n)'s part of its k-th 65,536-element block
 * (counted from the block holding elem0): [*lo, *hi), the fixed order's
 * unit of the fp64 sums. */
__device__ __forceinline__ void gpu_block_range(uint64_t elem0, uint64_t n, uint64_t k, uint64_t *lo, uint64_t *hi)
{
    uint64_t a = (elem0 / MS_MERGE_BLOCK + k) * MS_MERGE_BLOCK, b = a + MS_MERGE_BLOCK;
    *lo = a < elem0 ? elem0 : a;
    *hi = b > elem0 + n ? elem0 + n : b;
}

/* A call's device memory is one pool request cut into buffers, each at an
 * offset aligned to GPU_BUF_ALIGN; ok turns false when a size overflows. */
#define GPU_BUF_ALIGN 256u
typedef struct gpu_buf_acc {
    uint64_t off;
    bool ok;
} gpu_buf_acc;

/* Reserves count * size bytes (aligned) and returns their offset. */
static inline uint64_t gpu_buf_take(gpu_buf_acc *acc, uint64_t count, uint64_t size)
{
    uint64_t bytes, at = acc->off;
    if (__builtin_mul_overflow(count, size, &bytes) || bytes > UINT64_MAX - GPU_BUF_ALIGN) {
        acc->ok = false;
        return 0;
    }
    bytes = (bytes + GPU_BUF_ALIGN - 1) / GPU_BUF_ALIGN * GPU_BUF_ALIGN;
    if (__builtin_add_overflow(acc->off, bytes, &acc->off))
        acc->ok = false;
    return at;
}

/* Bytes of one element of a chunk buffer (F32, F16 or BF16). */
static inline uint64_t gpu_dtype_size(st_dtype dt)
{
    return dt == ST_F32 ? 4 : 2;
}

#define GPU_SUM_RUN 8u /* terms computed ahead of their additions */

/* acc + term(j0) + ... + term(j1 - 1), added one at a time in index order
 * (the fixed order of the fp64 sums). The terms of GPU_SUM_RUN consecutive
 * j are computed first, their loads all in flight, then added: a thread's
 * loads no longer wait on its chain of dependent additions, and the sum has
 * the bits of the plain loop (term must not depend on acc). */
template <typename Term>
__device__ __forceinline__ double gpu_ordered_sum(double acc, uint64_t j0, uint64_t j1, Term term)
{
    uint64_t j = j0;
    for (; j + GPU_SUM_RUN <= j1; j += GPU_SUM_RUN) {
        double t[GPU_SUM_RUN];
#pragma unroll
        for (unsigned u = 0; u < GPU_SUM_RUN; u++)
            t[u] = term(j + u);
#pragma unroll
        for (unsigned u = 0; u < GPU_SUM_RUN; u++)
            acc = acc + t[u];
    }
    for (; j < j1; j++)
        acc = acc + term(j);
    return acc;
}

/* gpu_ordered_sum for a whole warp: the same additions in the same order,
 * so the same bits, but lane l computes the terms of j = base + l (the warp's
 * loads coalesced, GPU_SUM_RUN rounds of 32 in flight) and every lane adds
 * all 32 of a round in lane order, each term taken from its lane with a
 * shuffle. Every lane returns the sum. The whole warp must call it with the
 * same acc, j0 and j1 (no lane may have returned). A thread walking its own
 * 65,536-element block alone reads one sector per element from memory
 * 65,536 elements away from its neighbours'; the warp reads whole lines. */
template <typename Term>
__device__ __forceinline__ double gpu_warp_ordered_sum(double acc, uint64_t j0, uint64_t j1, Term term)
{
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t round = 32u * GPU_SUM_RUN;
    for (uint64_t base = j0; base < j1; base += round) {
        double t[GPU_SUM_RUN];
#pragma unroll
        for (unsigned u = 0; u < GPU_SUM_RUN; u++) {
            uint64_t j = base + 32u * u + lane;
            t[u] = j < j1 ? term(j) : 0.0;
        }
        if (j1 - base >= round) { /* a full round: no bound to check */
#pragma unroll
            for (unsigned u = 0; u < GPU_SUM_RUN; u++)
#pragma unroll
                for (unsigned src = 0; src < 32u; src++)
                    acc = acc + __shfl_sync(0xffffffffu, t[u], (int)src);
        } else { /* the last: only the terms of j < j1 (warp-uniform bound) */
            unsigned left = (unsigned)(j1 - base);
#pragma unroll
            for (unsigned u = 0; u < GPU_SUM_RUN; u++)
#pragma unroll
                for (unsigned src = 0; src < 32u; src++)
                    if (32u * u + src < left)
                        acc = acc + __shfl_sync(0xffffffffu, t[u], (int)src);
        }
    }
    return acc;
}

#define GPU_SCAN_THREADS 1024u

/* The tie positions' scan: exclusive scan of cnt[0..n_seg) in segment
 * order, starting at `seen`: start[s] = seen + sum_{s' < s} cnt[s'];
 * *total = the sum of all. One block of GPU_SCAN_THREADS. One copy per
 * kernel file (internal linkage). */
static __global__ void gpu_eq_scan(const uint64_t *cnt, uint64_t n_seg, uint64_t seen, uint64_t *start,
                          unsigned long long *total)
{
    __shared__ uint64_t part[GPU_SCAN_THREADS];
    unsigned t = threadIdx.x;
    uint64_t per = (n_seg + GPU_SCAN_THREADS - 1) / GPU_SCAN_THREADS;
    uint64_t lo = (uint64_t)t * per < n_seg ? (uint64_t)t * per : n_seg;
    uint64_t hi = lo + per < n_seg ? lo + per : n_seg;
    uint64_t s = 0;
    for (uint64_t k = lo; k < hi; k++)
        s += cnt[k];
    part[t] = s;
    __syncthreads();
    if (t == 0) {
        uint64_t run = seen;
        for (unsigned u = 0; u < GPU_SCAN_THREADS; u++) {
            uint64_t v = part[u];
            part[u] = run;
            run += v;
        }
        *total = run - seen;
    }
    __syncthreads();
    uint64_t run = part[t];
    for (uint64_t k = lo; k < hi; k++) {
        start[k] = run;
        run += cnt[k];
    }
}

/* Tests: a sticky error on demand (gpu_backend_fail_next_for_tests): __trap
 * gives cudaErrorLaunchFailure. One copy per kernel file (internal linkage). */
static __global__ void gpu_poison_kernel(void)
{
    __trap();
}

#endif
