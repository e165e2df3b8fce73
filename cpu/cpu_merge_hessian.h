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
#include "pipeline/merge_passes_hessian.h"

/* Rows regmean solves side by side (one per fp64 lane, each with its own
 * row's scalar operation sequence): the scratch grows with it. Each model's
 * G (n x n) streams through memory once per group of rows, so more lanes
 * read it less often: 32 made a 1B-shaped regmean merge 8-12% faster than
 * 16 (bench/RESULTS.md); 64 spills the lane vectors out of registers and
 * took 1.7x as long. */
#define CPU_MERGE_HESSIAN_LANES 32u

/* key[j] = ms_hessian_saliency_key(d[j], u[(e + j) % cols]) for j < n:
 * elements [e, e + n) of a tensor of `cols` columns (cols > 0). */
void cpu_merge_hessian_keys(const float *u, uint64_t cols, uint64_t e, size_t n, const float *d, uint32_t *key);

/* regmean's pass (its plan is one APPLY) over chunk c, as cpu_merge_run_pass
 * (which dispatches here): rows in parallel, CPU_MERGE_HESSIAN_LANES at a
 * time, each row's bits those of solving it on its own.
 * Without st->hessian or with regmean_solve false: the mean of the models.
 * Returns 0 or -ENOMEM (scratch). Blocks. */
int cpu_merge_hessian_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                               cpu_pool *pool);

/* Upper bound of the host scratch cpu_merge_hessian_run_pass allocates with
 * n_threads threads: per thread (CPU_MERGE_HESSIAN_LANES + 1 + n_models)
 * fp32 rows and 2 * CPU_MERGE_HESSIAN_LANES fp64 rows of cols elements
 * (cols = 2048: 1.3 MiB with 2 models). UINT64_MAX on overflow. */
uint64_t cpu_merge_hessian_scratch_bytes(const ms_tensor_params *p, unsigned n_threads);

/* Test seam: regmean's fp64 solve (the kernels of cpu_merge_hessian_run_pass)
 * of nr rows side by side (1 <= nr <= CPU_MERGE_HESSIAN_LANES, the others
 * dead lanes): tau [n_models][nr][dim] fp32 deltas, y [nr][dim] := the rows'
 * y = (sum_i tau_i G_i) S^-1 before the fp32 rounding, so that a test sees
 * every fp64 bit. hs is a finished regmean state with regmean_solve.
 * Returns 0 or -ENOMEM. */
int cpu_merge_hessian_solve_for_tests(const ms_hessian_state *hs, unsigned n_models, const float *tau, unsigned nr,
                                      double *y);

#endif
