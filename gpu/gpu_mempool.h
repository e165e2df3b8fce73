/* The device memory pool of one gpu_backend: blocks are cudaMalloc'ed in size
 * classes and cached when released, so the steady state (chunks of similar
 * sizes) allocates nothing from the driver. CUDA C++ only (private to gpu/).
 *
 * Size classes: requests are rounded up to 1 KiB, and above that to a
 * quarter of their power of two (2^e, 1.25 * 2^e, 1.5 * 2^e, 1.75 * 2^e):
 * at most 25% of a block is unused.
 *
 * Failure model: every non-empty request first asks the fault seam
 * (ms_fault_hit(MS_FAULT_GPU_ALLOC)), so the N-th REQUEST fails in tests
 * whether or not a cached block would have served it (the count does not
 * depend on the cache). A request fails with cudaErrorMemoryAllocation when
 * the seam says so, when it would take the pool above its limit even after
 * the cache is freed, or when cudaMalloc fails twice (before and after the
 * cache is freed); the CUDA error state is cleared and the cache is freed
 * (trimmed) in every such case. Any other cudaMalloc error is returned as is
 * (the caller treats it as fatal). Not thread-safe. */
#ifndef MS_GPU_MEMPOOL_H
#define MS_GPU_MEMPOOL_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

typedef struct gpu_mempool_block {
    void *ptr;
    uint64_t size; /* its class size */
} gpu_mempool_block;

typedef struct gpu_mempool {
    uint64_t limit;  /* held may not exceed it; 0: no limit */
    uint64_t held;   /* bytes cudaMalloc'ed and not freed: in use + cached */
    uint64_t in_use; /* bytes handed out and not released */
    gpu_mempool_block *cache; /* released blocks, [n_cache] */
    size_t n_cache, cap_cache;
} gpu_mempool;

/* The class size a request of `bytes` is served with (>= bytes); UINT64_MAX
 * when bytes is too large to round. bytes = 0 gives 0. */
uint64_t gpu_mempool_class_size(uint64_t bytes);

void gpu_mempool_init(gpu_mempool *mp, uint64_t limit);

/* Frees every block (cached or not: call only when nothing runs). */
void gpu_mempool_destroy(gpu_mempool *mp);

/* A device block of at least `bytes` bytes into *out, *out_size its class
 * size (release it with that size). bytes = 0 gives NULL and size 0 without
 * a request. Returns cudaSuccess, cudaErrorMemoryAllocation (see above), or
 * another CUDA error. */
cudaError_t gpu_mempool_alloc(gpu_mempool *mp, uint64_t bytes, void **out, uint64_t *out_size);

/* Returns a block to the cache (NULL is a no-op). The device must be done
 * with it: the caller synchronises first. */
void gpu_mempool_release(gpu_mempool *mp, void *ptr, uint64_t size);

/* Frees the cached blocks. */
void gpu_mempool_trim(gpu_mempool *mp);

#endif
