/* Grid sizes, grid-stride loops and kernel launches: the part of the kernel
 * files' shared code that also builds where tests/emu runs kernels on the
 * CPU (tests/emu/gpu_emu.hpp defines GPU_LAUNCH there first). */
#ifndef MS_GPU_GRID_CUH
#define MS_GPU_GRID_CUH

#include <stdint.h>

/* Blocks of `threads` for a grid-stride kernel over n elements: at least 1,
 * at most max_blocks. */
static inline unsigned gpu_grid(uint64_t n, unsigned threads, unsigned max_blocks)
{
    uint64_t blocks = (n + threads - 1) / threads;
    return (unsigned)(blocks < max_blocks ? (blocks ? blocks : 1) : max_blocks);
}

/* Grid-stride loop: element j of n for this thread, then every
 * gridDim.x * blockDim.x further. */
#define GPU_FOR_ELEMS(j, n)                                                                                \
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < (n);                            \
         j += (uint64_t)gridDim.x * blockDim.x)

/* kernel<<<grid, block, 0, stream>>>(...). */
#ifndef GPU_LAUNCH
#define GPU_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#endif
