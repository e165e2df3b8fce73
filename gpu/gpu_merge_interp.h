/* The CUDA kernels of the interpolation and model-soup methods (private to
 * gpu/; the semantics are pipeline/merge_passes_interp.h's, the element
 * arithmetic pipeline/merge_math_interp.h's, the bytes cpu/cpu_merge_interp.c's).
 *
 * Supported (gpu_interp_supports): slerp, nuslerp (flatten, row and column
 * modes), multislerp, karcher, model_stock (whole tensor and filter_wise),
 * nearswap, ram, ramplus_tl; every pass of their plans (GRAM, LINE_GRAM,
 * COUNT, APPLY) and every APPLY variant (MIX, LINE_MIX, COPY, ZERO, STOCK,
 * STOCK_ROWS, NEARSWAP, RAM). Not supported: sce, arcee_fusion (their KEY
 * passes and SUMSQ run on the CPU).
 *
 * From CUDA C++ (the .cu files of gpu/, which include gpu/gpu_internal.h
 * first) every declaration below is visible; from C only the extern "C"
 * part, for the tests. gpu_merge_run_pass (gpu_backend.h) dispatches here. */
#ifndef MS_GPU_MERGE_INTERP_H
#define MS_GPU_MERGE_INTERP_H

#ifdef __cplusplus
#include "gpu/gpu_internal.h"
#else
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/gpu_backend.h"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* True when every pass of p's plan runs here (the method is one of those
 * listed above and its dtypes are F32, F16 or BF16). */
bool gpu_interp_supports(const ms_tensor_params *p);

/* Device bytes one gpu_interp_run_pass call on a chunk of at most n_rows rows
 * of p allocates (one pool request; its size class included): an upper bound
 * over every pass of p's plan and every alignment of the chunk. 0 for no
 * elements; UINT64_MAX when p is not supported or the size overflows. */
uint64_t gpu_interp_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows);

#ifdef __cplusplus
}

/* Runs pass `pass` of st's plan over chunk c on lane l (acquired by the
 * caller; p supported: gpu_interp_supports). Same contract as
 * cpu_merge_interp_run_pass: the same state updates (st->interp's sums, open
 * blocks, line sums, counts; st->next_elem) and the same output bytes. Blocks
 * until the call's work is done (gpu_lane_wait). On GPU_OOM / GPU_FATAL the
 * state is untouched and msg receives one line ("needs X MiB, Y MiB free" /
 * the CUDA error); GPU_FATAL also when the backend is already broken. */
gpu_status gpu_interp_run_pass(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                               unsigned pass, const ms_chunk *c, char *msg, size_t msg_len);
#endif

#endif
