/* regmean's APPLY pass on the GPU (gpu_merge_regmean.cu), private to gpu/:
 * gpu_merge.cu dispatches to it. The same bytes as cpu/cpu_merge_hessian.c's
 * pass: the solve (st->hessian with regmean_solve: each model's G_i and the
 * Cholesky factor L come up with every call) or the mean of the models. */
#ifndef MS_GPU_MERGE_REGMEAN_H
#define MS_GPU_MERGE_REGMEAN_H

#include "gpu/gpu_internal.h"

/* True for regmean with F32, F16 or BF16 inputs and output and at most
 * 4,194,240 rows (65,535 tiles of 64). */
bool gpu_regmean_supports(const ms_tensor_params *p);

/* Device bytes one call on a chunk of at most n_rows rows allocates (one
 * pool request, its size class), for the solve: inputs, output, the deltas,
 * every G_i, L and three fp64 rows x cols arrays. 0 for no elements,
 * UINT64_MAX when unsupported or too large. */
uint64_t gpu_regmean_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows);

/* The pass over chunk c (whole rows, not empty) on lane l, acquired by the
 * caller after the checks gpu_merge_run_pass makes for every method (a
 * broken backend, an empty chunk). cpu_merge_hessian_run_pass's contract;
 * on GPU_OOM / GPU_FATAL the state is untouched and msg says why. Blocks
 * until the output is in c->out. */
gpu_status gpu_regmean_run_pass(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                                unsigned pass, const ms_chunk *c, char *msg, size_t msg_len);

#endif
