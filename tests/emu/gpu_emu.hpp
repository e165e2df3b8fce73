/* Just enough of CUDA to run a kernel file's own code on the CPU (C++20):
 * a launch runs the grid's thread blocks one after another, a block's
 * threads as OS threads, __syncthreads as a barrier of the block (a thread
 * that returns drops out of it, as on sm_70 and later), __shared__ as one
 * array per kernel (one block at a time uses it), and the _rn intrinsics as
 * the IEEE operations they are (this file builds with -ffp-contract=off).
 *
 * For kernels that use nothing else: no warp intrinsics, atomics or
 * dynamic shared memory. What it checks is the kernels' indexing, tails and
 * order of operations against the CPU's bits; blocks never run at once and
 * threads are scheduled by the OS, so it says nothing about races between
 * blocks. Include before a gpu/ *_kernels.cuh header. */
#ifndef MS_GPU_EMU_HPP
#define MS_GPU_EMU_HPP

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

struct gpu_emu_uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef void *cudaStream_t;

inline thread_local gpu_emu_uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
inline thread_local std::barrier<> *gpu_emu_block_barrier;

/* the project's C headers from C++ (as gpu/gpu_internal.h does for nvcc) */
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() gpu_emu_block_barrier->arrive_and_wait()

static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }

/* One OS thread per thread of a block, for the whole grid: each runs its
 * thread of every block in turn, and no thread starts block b + 1 before
 * all have left block b (they share the __shared__ arrays). */
template <class Kernel> void gpu_emu_launch(dim3 grid, dim3 block, Kernel kernel)
{
    unsigned threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
    std::vector<std::unique_ptr<std::barrier<>>> in_block(blocks);
    for (auto &b : in_block)
        b = std::make_unique<std::barrier<>>((std::ptrdiff_t)threads);
    std::barrier<> between_blocks((std::ptrdiff_t)threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; t++)
        pool.emplace_back([&, t] {
            threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            blockDim = block;
            gridDim = grid;
            for (unsigned b = 0; b < blocks; b++) {
                blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
                gpu_emu_block_barrier = in_block[b].get();
                kernel();
                in_block[b]->arrive_and_drop();
                between_blocks.arrive_and_wait();
            }
        });
    for (std::thread &th : pool)
        th.join();
}

#define GPU_LAUNCH(kernel, grid, block, stream, ...)                                                       \
    gpu_emu_launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })

#endif
