/* The CUDA backend as the rest of mergestream sees it: plain C, no CUDA
 * types, so pipeline/ can call it through the backend registry without
 * including CUDA headers.
 *
 * It runs the same passes as cpu/cpu_merge.h (pipeline/merge_passes.h's
 * plan) on the GPU and produces byte-identical outputs and state updates.
 *
 * Failure contract (DESIGN.md, Data flow 3): a device allocation that fails
 * (cudaErrorMemoryAllocation, or the fault seam's gpu_alloc site) returns
 * GPU_OOM after clearing the error and trimming the pool; the merge state is
 * then exactly as it was before the call (results are folded into the host
 * state only after the chunk's device work succeeded), so the caller can run
 * the same pass on the same chunk on the CPU. A sticky CUDA error (illegal
 * address, launch failure...) returns GPU_FATAL: the backend is unusable
 * afterwards (close it); the state is again untouched.
 *
 * Threads: every function below may be called from several threads at once
 * (open and close excepted). Up to GPU_LANES (2) passes are in flight at once
 * on three streams (host-to-device copies, kernels, device-to-host copies),
 * ordered by events, so one tensor's copies overlap another's kernels; each
 * call waits for its own work only. */
#ifndef MS_GPU_BACKEND_H
#define MS_GPU_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gpu_status { GPU_OK = 0, GPU_OOM = 1, GPU_FATAL = 2 } gpu_status;

typedef struct gpu_backend gpu_backend;

/* Opens device `device` with at most memory_limit bytes for this backend (0:
 * no cap besides the device's free memory less a reserve). The limit is
 * enforced: the pool never holds more (a request that would exceed it, after
 * the cache is freed, fails like cudaErrorMemoryAllocation). Returns 0 and
 * *out, or -1 with a one-line reason in why (no device, driver too old...).
 * Creates the CUDA context, three streams and the lanes' events; takes
 * nothing from the pool. */
int gpu_backend_open(int device, uint64_t memory_limit, gpu_backend **out, char *why, size_t why_len);
void gpu_backend_close(gpu_backend *b); /* NULL is a no-op */

/* The live free-memory estimate: cudaMemGetInfo's free bytes at open, less
 * what the backend's pool holds now (in use and cached), less a reserve of
 * max(256 MiB, device memory / 32), capped by memory_limit less what the
 * pool holds. 0 once the backend is broken (a sticky error). */
uint64_t gpu_backend_free_estimate(gpu_backend *b);

/* True when the GPU backend computes p's method: the task-vector methods
 * (linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*), the
 * Hessian-aware ones (ties_sparsegpt and dare_sparsegpt with the u vectors
 * and regmean with the G_i and L that st->hessian holds, prepared on the
 * host) and the interpolation methods of gpu_merge_interp.h. */
bool gpu_merge_supports(const ms_tensor_params *p);

/* Device bytes one gpu_merge_run_pass call on a chunk of at most n_rows rows
 * of p allocates (inputs, output, scratch; the pool's size classes
 * included): an upper bound over every pass of p's plan. 0 for no elements;
 * UINT64_MAX when p is not supported or the size overflows. */
uint64_t gpu_merge_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows);

/* Runs pass `pass` of st's plan over chunk c on the GPU (same contract as
 * cpu_merge_run_pass; p must be supported: gpu_merge_supports). Blocks
 * until the results are in host memory (the calling thread sleeps; other
 * threads' calls proceed meanwhile). Different threads must use different
 * states. On
 * GPU_OOM / GPU_FATAL, msg receives one line ("needs X MiB, Y MiB free" /
 * the CUDA error). */
gpu_status gpu_merge_run_pass(gpu_backend *b, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len);

/* The Hessian-aware methods' Cholesky factorisation
 * (pipeline/merge_passes_hessian.h, ms_hessian_cholesky) on the device, bit
 * for bit the CPU's: the same operations in the same order
 * (gpu_hessian_chol.cu). a: [n][n] doubles, row-major, its lower triangle
 * read. On GPU_OK either *not_pd (a pivot is not > 0, or NaN; a unchanged)
 * or a's lower triangle := L, its strict upper triangle left as it was
 * (diag_only: only L's diagonal is written back, the rest of a is left as
 * it was). GPU_OOM: a unchanged, msg says what it needed; GPU_FATAL (a
 * sticky error, the backend broken): a may be partly overwritten. Runs on a
 * lane like gpu_merge_run_pass and is thread-safe like it; blocks. */
gpu_status gpu_hessian_cholesky(gpu_backend *b, double *a, uint64_t n, bool diag_only, bool *not_pd, char *msg,
                                size_t msg_len);

/* Device bytes gpu_hessian_cholesky allocates for an n x n matrix (the
 * pool's size class): about 8 n^2 + 2 KiB n. UINT64_MAX when too large. */
uint64_t gpu_hessian_cholesky_bytes(uint64_t n);

/* Frees cached device memory the pool holds but does not use. (The pool
 * caches released blocks by size class, so same-sized chunks allocate nothing
 * new; it trims itself on every allocation failure.) */
void gpu_backend_trim(gpu_backend *b);

/* Registers [p, p + len) as pinned host memory (cudaHostRegister). Returns
 * false (and leaves the memory pageable) on failure. */
bool gpu_host_register(void *p, size_t len);
void gpu_host_unregister(void *p);

/* Name of the device ("NVIDIA H100 80GB HBM3"). */
const char *gpu_backend_device_name(const gpu_backend *b);

/* Device bytes the pool holds now (blocks in use and cached). */
uint64_t gpu_backend_pool_held(gpu_backend *b);

/* Calls in flight at once, 1..2 (default 2). 1 serialises every call: no
 * overlap between tensors (for benchmarks and tests). */
void gpu_backend_set_lanes(gpu_backend *b, unsigned lanes);

/* Tests only (the sticky-error path on demand): the next gpu_merge_run_pass
 * launches a kernel that traps (__trap: cudaErrorLaunchFailure, sticky)
 * before its own work, so it returns GPU_FATAL and the CUDA context is
 * unusable afterwards. Run it in a process of its own. */
void gpu_backend_fail_next_for_tests(gpu_backend *b);

/* Tests only: della's rows are ranked in windows of about `elems` elements
 * of whole rows (0 restores the default, 2^22), so that small tensors cross
 * window boundaries. Not thread-safe: call before any pass runs. */
void gpu_merge_set_della_window_for_tests(uint64_t elems);

#ifdef __cplusplus
}
#endif

#endif
