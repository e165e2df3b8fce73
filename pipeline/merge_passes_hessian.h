/* The Hessian-aware merge methods (issue 7): their semantics, their pass
 * plans (the multi-pass contract of merge_passes.h) and the fp64 host
 * algebra that turns each model's Hessian into the coefficients a tensor's
 * merge needs. Host only; the element arithmetic is merge_math_hessian.h,
 * the CPU kernels cpu/cpu_merge.c (selection keys) and
 * cpu/cpu_merge_hessian.c (regmean), reading the Hessians from disk
 * pipeline/hessian_inputs.h.
 *
 * H is model i's input statistic for the weight (the output of `mergestream
 * hessian`), [in, in] F32, for a weight stored [out, in] (rows = out, cols =
 * in: an element's column is its input feature). Damping, in fp64: dead
 * inputs (H_jj == 0) get H_jj = 1 first, then 0.01 * mean(diag H) (the
 * fixed-up diagonal, summed sequentially) is added to every H_jj (GPTQ's
 * order). Cholesky factorisations are our own, fp64, in one fixed order
 * (that of the row-by-row loop; each dot product in 8 interleaved lanes
 * combined in a fixed tree), computed blocked and threaded: the result
 * never depends on threads, chunking or the BLAS build.
 *
 * ties_sparsegpt (ties with the magnitude key replaced): u = diag(U) with U
 * the upper Cholesky factor of inv(H_damped) (H^-1 = U^T U), computed
 * without an inverse: with J the reversal, J H J = M M^T (M lower) gives H =
 * P P^T with P = J M J upper, so U = P^-1 and u_j = 1 / M[n-1-j][n-1-j]; fp64,
 * rounded to fp32 once. Element key = ms_hessian_saliency_key(delta, u[col])
 * (score = delta^2 / (u + 1e-10)^2 in fp32); the top k = floor(d * numel)
 * keys are kept, ties by smaller flat index, by the exact histogram
 * selection of ties (HIST_HI, HIST_LO, APPLY: the same plan, only the key
 * differs). A model without a Hessian for the weight (no hessian set, no
 * hessian_map entry, or a Hessian that is not positive definite after
 * damping) uses ties' magnitude key (logged). Consensus, normalize, lambda
 * as ties.
 * dare_sparsegpt: the same saliency mask; kept values multiplied by the
 * factor numel / k (fp64, rounded to fp32 once: "divided by kept/numel");
 * consensus as dare_ties; d >= 1 keeps everything unscaled.
 * regmean (alpha, default 0.1): G_i = H_i damped, off-diagonal entries times
 * alpha (fp64, rounded to fp32 once and stored so), S = sum_i G_i in fp64
 * (model order), S = L L^T. Per output row r (whole rows are always in one
 * chunk), tau_i = X_i - B in fp32: b_j = sum_i sum_k tau_i[k] G_i[k][j]
 * (the row vector sum_i tau_i G_i) in fp64 (i ascending, k ascending,
 * sequential from 0.0; S's factorisation reads its lower triangle), y = S^-1 b by
 * forward substitution (row-oriented: z_j = (b_j - sum_{k<j} L_jk z_k) /
 * L_jj, the sum sequential) and backward substitution (column-oriented:
 * y_j = z_j / L_jj, then z_k -= L_jk y_j for k < j, j descending), out =
 * B + (float)y_j in fp32 (W* = W0 + (sum_i tau_i G_i) S^-1). Tensors without
 * a Hessian for every model (norms, embeddings, a missing entry, a
 * non-positive-definite S): the mean of the models, ((X_1 + X_2) + ...) /
 * n in fp32 (ms_merge_linear with unit weights).
 * Plans: ties_sparsegpt, dare_sparsegpt: ties' (HIST_HI, HIST_LO, APPLY, the
 * histograms only for models with d < 1); regmean: APPLY. The plan never
 * depends on which Hessians exist, so ms_merge_pass_count is known before
 * they are read. */
#ifndef MS_MERGE_PASSES_HESSIAN_H
#define MS_MERGE_PASSES_HESSIAN_H

#include <stdbool.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

#define MS_HESSIAN_DAMP 0.01

/* What a tensor's merge reads from the Hessians; owned by ms_merge_state
 * (st->hessian), filled by the host before the first pass, read only by the
 * kernels. */
typedef struct ms_hessian_state {
    uint64_t dim;                         /* = p->cols */
    /* sparsegpt */
    float *u[MS_MAX_MODELS + 1];          /* [dim] per model, NULL: magnitude keys; into mem */
    /* regmean */
    bool regmean_solve;                   /* false: the mean of the models */
    float *g[MS_MAX_MODELS + 1];          /* [dim][dim] G_i, into gmem (after add) */
    bool g_set[MS_MAX_MODELS + 1];
    double *chol;                         /* [dim][dim] L (lower, row-major), after finish */
    void *mem;                            /* u arrays */
    void *gmem;                           /* G_i and L */
} ms_hessian_state;

/* Where a tensor's Cholesky factorisations run: on `device` first when it
 * is set (a GPU: it reproduces the order below, so the bits are the same),
 * on the CPU when it declines or fails. */
typedef struct ms_hessian_factoriser {
    cpu_pool *pool; /* the CPU's factorisations: NULL, the calling thread only */
    /* Factors a as ms_hessian_cholesky does; diag_only: only L's diagonal
     * is needed (the rest of a may be left as it was). Returns 0, -EDOM
     * (not positive definite), -ENODEV: not done, a untouched (the CPU
     * factors it), or -EAGAIN: not done, a possibly overwritten (the
     * caller builds it again for the CPU). */
    int (*device)(void *ctx, double *a, uint64_t n, bool diag_only);
    void *device_ctx;
} ms_hessian_factoriser;

/* True for ties_sparsegpt, dare_sparsegpt and regmean. */
bool ms_merge_hessian_method(ms_method m);

/* Adjusts st's plan (made by merge_passes.c for p's sparsify) for p, a
 * Hessian method: dare_sparsegpt's factors, regmean's single APPLY. */
void ms_merge_hessian_plan(const ms_tensor_params *p, ms_merge_state *st);

/* Allocates st->hessian for p (a Hessian method; every model without a
 * Hessian until ms_hessian_state_add). Returns 0 or -ENOMEM (fault seam
 * host_alloc included). */
int ms_hessian_state_open(ms_merge_state *st, const ms_tensor_params *p);

/* Model i's (1..n_models) raw Hessian H ([p->cols][p->cols] fp32, row
 * major; read only) into st->hessian: sparsegpt's u (only for a model that
 * selects by key, else nothing is done; its Cholesky runs where f says,
 * NULL: this thread only, the bits are the same), regmean's G_i (f unused).
 * Returns 0, -ENOMEM, or -EDOM when H is not positive definite after
 * damping (model i then has no Hessian: the caller logs the fallback).
 * The caller must be pool's only user meanwhile. */
int ms_hessian_state_add(ms_merge_state *st, const ms_tensor_params *p, unsigned i, const float *H,
                         const ms_hessian_factoriser *f);

/* Model i's saliency u ([p->cols] floats, copied), computed earlier by
 * ms_hessian_state_add from the same Hessian (the cache of
 * hessian_inputs.c): the same state as that add. Only for a model that
 * selects by key (ms_hessian_model_uses_u). Returns 0 or -ENOMEM. */
int ms_hessian_state_set_u(ms_merge_state *st, const ms_tensor_params *p, unsigned i, const float *u);

/* After the adds: regmean factors S (where f says, as above) when every model
 * has G_i (else the mean, memory freed). Returns 0, -ENOMEM, or -EDOM (S not
 * positive definite: the mean is used; the caller logs it). A no-op for the
 * sparsegpt methods. */
int ms_hessian_state_finish(ms_merge_state *st, const ms_tensor_params *p, const ms_hessian_factoriser *f);

/* Frees hs. NULL is a no-op. */
void ms_hessian_state_close(ms_hessian_state *hs);

/* Peak host bytes of st->hessian and of its preparation for p when every
 * model has a Hessian (an upper bound; includes one raw [cols][cols] F32
 * read buffer and the fp64 work matrix), 0 for other methods. */
uint64_t ms_hessian_state_bytes(const ms_tensor_params *p);

/* True when model i of p selects by key (sparsegpt with 0 < k < numel). */
bool ms_hessian_model_uses_u(const ms_merge_state *st, const ms_tensor_params *p, unsigned i);

/* ---- the fp64 algebra, exposed for the tests ---- */

/* a [n][n] (row major, symmetric, only the lower triangle read) := L, its
 * lower Cholesky factor, in the fixed order above (the strict upper
 * triangle is left as it was). Returns 0, or -EDOM when a pivot is not > 0
 * (or NaN): rows before the failing one are then factored, the failing
 * row's off-diagonal entries computed and its diagonal left as it was, the
 * lower triangle of later rows unspecified. */
int ms_hessian_cholesky(double *a, uint64_t n);

/* The same factorisation (the same bits, for any pool size) with the rows
 * below each column block spread over pool's threads (NULL: the calling
 * thread only). Calls cpu_pool_run on pool: the caller must be its only
 * user meanwhile. Blocks until done. */
int ms_hessian_cholesky_pool(double *a, uint64_t n, cpu_pool *pool);

/* h [n][n] := the damped copy of H (dead inputs, then 0.01 * mean diag). */
void ms_hessian_damp(const float *H, uint64_t n, double *h);

/* u[j] = (float)diag(upper chol(inv(damped H)))_j using work [n][n]
 * doubles. Returns 0 or -EDOM. */
int ms_hessian_saliency_u(const float *H, uint64_t n, double *work, float *u);

/* The same, its Cholesky where f says (NULL: this thread). */
int ms_hessian_saliency_u_with(const float *H, uint64_t n, double *work, float *u, const ms_hessian_factoriser *f);

#endif
