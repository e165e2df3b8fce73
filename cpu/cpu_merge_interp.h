/* The CPU kernels of the interpolation and model-soup methods (slerp,
 * nuslerp, multislerp, karcher, model_stock, nearswap, sce, ram,
 * ramplus_tl, arcee_fusion): one pass of pipeline/merge_passes_interp.h's
 * plan over one chunk, parallel over element ranges of whole 65,536-element
 * blocks, whole rows or column ranges via the thread pool. Byte-identical
 * for every chunking and thread count. cpu_merge_run_pass dispatches here
 * for these methods; the contract is the same.
 *
 * Inside a chunk the work is cut into windows (at most 2^24 elements, or
 * that many elements of whole rows) processed like chunks of their own, so
 * the scratch memory does not grow with the chunk. */
#ifndef MS_CPU_MERGE_INTERP_H
#define MS_CPU_MERGE_INTERP_H

#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

/* Runs pass `pass` of st's plan (p->method an interpolation method, state
 * opened by ms_merge_state_open) over chunk c, the pass's next chunk in row
 * order. APPLY writes c->out; the other passes update st->interp. Blocks
 * until done. Returns 0, or -ENOMEM when the scratch could not be allocated
 * (the state is then undefined: close it and start the tensor over). A
 * chunk out of order aborts (a caller bug). */
int cpu_merge_interp_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                              cpu_pool *pool);

/* An upper bound of the host memory cpu_merge_interp_run_pass allocates for
 * p with n_threads threads: per-thread tiles (about 8 KiB per input),
 * histograms for sce and arcee_fusion (0.5 to 1.5 MiB per thread), row
 * buffers for arcee_fusion (16 bytes per column per thread) and per-block
 * sums of a window. Independent of the chunk size. Never fails (UINT64_MAX
 * when the sizes overflow). */
uint64_t cpu_merge_interp_scratch_bytes(const ms_tensor_params *p, unsigned n_threads);

/* Tests only: windows of `elems` elements (0 restores the default 2^24), so
 * that small tensors cross window boundaries. Not thread-safe: call before
 * any pass runs. */
void cpu_merge_interp_set_window_for_tests(uint64_t elems);

#endif
