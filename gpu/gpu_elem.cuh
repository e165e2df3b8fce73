/* What the CUDA merge kernel files share (private to gpu/; include after
 * gpu/gpu_internal.h): loads and stores of tensor elements in their
 * safetensors dtypes (pipeline/merge_math.h's conversions, so the bits are
 * the CPU's), grid sizes, the test-only trap kernel. */
#ifndef MS_GPU_ELEM_CUH
#define MS_GPU_ELEM_CUH

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

/* Blocks of `threads` for a grid-stride kernel over n elements: at least 1,
 * at most max_blocks. */
static inline unsigned gpu_grid(uint64_t n, unsigned threads, unsigned max_blocks)
{
    uint64_t blocks = (n + threads - 1) / threads;
    return (unsigned)(blocks < max_blocks ? (blocks ? blocks : 1) : max_blocks);
}

/* Tests: a sticky error on demand (gpu_backend_fail_next_for_tests): __trap
 * gives cudaErrorLaunchFailure. One copy per kernel file (internal linkage). */
static __global__ void gpu_poison_kernel(void)
{
    __trap();
}

#endif
