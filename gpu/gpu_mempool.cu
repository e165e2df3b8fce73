/* The device memory pool (see gpu_mempool.h). */
#include "gpu/gpu_internal.h"

#include <string.h>

#define MEMPOOL_MIN_CLASS 1024u

uint64_t gpu_mempool_class_size(uint64_t bytes)
{
    if (bytes == 0)
        return 0;
    if (bytes <= MEMPOOL_MIN_CLASS)
        return MEMPOOL_MIN_CLASS;
    if (bytes > ((uint64_t)1 << 62))
        return UINT64_MAX;
    uint64_t v = bytes - 1; /* 2^e <= v < 2^(e+1), e >= 10 */
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    uint64_t q = (uint64_t)1 << (e - 2);
    return (v / q + 1) * q; /* the next multiple of q above v: >= bytes */
}

void gpu_mempool_init(gpu_mempool *mp, uint64_t limit)
{
    memset(mp, 0, sizeof *mp);
    mp->limit = limit;
}

void gpu_mempool_trim(gpu_mempool *mp)
{
    for (size_t k = 0; k < mp->n_cache; k++) {
        cudaFree(mp->cache[k].ptr); /* after a sticky error this fails: nothing to do about it */
        mp->held -= mp->cache[k].size;
    }
    mp->n_cache = 0;
    cudaGetLastError(); /* a failed free must not surface in the next call */
}

void gpu_mempool_destroy(gpu_mempool *mp)
{
    gpu_mempool_trim(mp);
    free(mp->cache);
    mp->cache = NULL;
    mp->cap_cache = 0;
}

/* True when a new block of `size` keeps held within the limit. */
static bool mempool_fits(const gpu_mempool *mp, uint64_t size)
{
    return mp->limit == 0 || (mp->held <= mp->limit && size <= mp->limit - mp->held);
}

cudaError_t gpu_mempool_alloc(gpu_mempool *mp, uint64_t bytes, void **out, uint64_t *out_size)
{
    *out = NULL;
    *out_size = 0;
    if (bytes == 0)
        return cudaSuccess;
    if (ms_fault_hit(MS_FAULT_GPU_ALLOC)) {
        gpu_mempool_trim(mp);
        return cudaErrorMemoryAllocation;
    }
    uint64_t size = gpu_mempool_class_size(bytes);
    for (size_t k = 0; k < mp->n_cache; k++) {
        if (mp->cache[k].size == size) {
            *out = mp->cache[k].ptr;
            mp->cache[k] = mp->cache[--mp->n_cache];
            mp->in_use += size;
            *out_size = size;
            return cudaSuccess;
        }
    }
    if (size == UINT64_MAX || size > SIZE_MAX)
        return cudaErrorMemoryAllocation;
    if (!mempool_fits(mp, size)) {
        gpu_mempool_trim(mp);
        if (!mempool_fits(mp, size))
            return cudaErrorMemoryAllocation;
    }
    void *p = NULL;
    cudaError_t rc = cudaMalloc(&p, (size_t)size);
    if (rc == cudaErrorMemoryAllocation) {
        cudaGetLastError(); /* not sticky: clear it */
        gpu_mempool_trim(mp);
        rc = cudaMalloc(&p, (size_t)size);
        if (rc == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            return rc;
        }
    }
    if (rc != cudaSuccess)
        return rc;
    mp->held += size;
    mp->in_use += size;
    *out = p;
    *out_size = size;
    return cudaSuccess;
}

void gpu_mempool_release(gpu_mempool *mp, void *ptr, uint64_t size)
{
    if (!ptr)
        return;
    mp->in_use -= size;
    if (mp->n_cache == mp->cap_cache) {
        size_t cap = mp->cap_cache ? 2 * mp->cap_cache : 16;
        gpu_mempool_block *grown = (gpu_mempool_block *)realloc(mp->cache, cap * sizeof *grown);
        if (!grown) { /* no room to remember it: give it back to the driver */
            cudaFree(ptr);
            cudaGetLastError();
            mp->held -= size;
            return;
        }
        mp->cache = grown;
        mp->cap_cache = cap;
    }
    mp->cache[mp->n_cache].ptr = ptr;
    mp->cache[mp->n_cache].size = size;
    mp->n_cache++;
}
