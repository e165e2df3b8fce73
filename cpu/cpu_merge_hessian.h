/* The CPU side of the Hessian-aware merge methods (semantics:
 * pipeline/merge_passes_hessian.h): the saliency selection keys that
 * cpu_merge.c's selection passes use for ties_sparsegpt and dare_sparsegpt,
 * and regmean's row-wise solve. Results are byte-identical for every
 * chunking and thread count. */
#ifndef MS_CPU_MERGE_HESSIAN_H
#define MS_CPU_MERGE_HESSIAN_H

#include <stddef.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

/* key[j] = ms_hessian_saliency_key(d[j], u[(e + j) % cols]) for j < n:
 * elements [e, e + n) of a tensor of `cols` columns (cols > 0). */
void cpu_merge_hessian_keys(const float *u, uint64_t cols, uint64_t e, size_t n, const float *d, uint32_t *key);

/* regmean's pass (its plan is one APPLY) over chunk c, as cpu_merge_run_pass
 * (which dispatches here): rows in parallel, each row solved on its own.
 * Without st->hessian or with regmean_solve false: the mean of the models.
 * Returns 0 or -ENOMEM (scratch). Blocks. */
int cpu_merge_hessian_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                               cpu_pool *pool);

/* Upper bound of the host scratch cpu_merge_hessian_run_pass allocates with
 * n_threads threads: per thread (n_models + 2) fp32 rows and 2 fp64 rows of
 * cols elements. UINT64_MAX on overflow. */
uint64_t cpu_merge_hessian_scratch_bytes(const ms_tensor_params *p, unsigned n_threads);

#endif
