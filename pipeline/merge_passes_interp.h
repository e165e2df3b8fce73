/* The interpolation and model-soup merge methods: their semantics, their
 * pass plans (the multi-pass contract of merge_passes.h) and the host steps
 * between passes. Host only; the element arithmetic is in
 * merge_math_interp.h, the CPU kernels in cpu/cpu_merge_interp.c.
 *
 * Notation: B the base tensor, X_1..X_n the models in recipe order (slots
 * 1..n of ms_chunk.in), d_i = X_i - B in fp32 (ms_merge_delta). "Blocked
 * fp64 sum" is DESIGN.md's fixed order: the flat index range is cut into
 * 65,536-element blocks, each summed sequentially from 0.0 in index order,
 * then the block sums sequentially from 0.0 in block order; "per row" does
 * the same inside each row with blocks counted from the row's start; "per
 * column" inside each column with blocks of 65,536 rows. Products of two
 * fp32 values are exact in fp64, so FMA contraction cannot change a sum.
 * Scalar coefficients are computed on the host in fp64 (libm's acos, sin)
 * and rounded to fp32 once; element passes are plain fp32. "Rows" are the
 * tensor's first dimension (a 1-D tensor is one row), as everywhere in
 * mergestream: for 1-D and 2-D tensors that is mergekit's last dimension.
 *
 * slerp (base + exactly one model; t in [0, 1], gradients and filters
 * allowed). v0 = B, v1 = X_1. GRAM: s00, s01, s11. |v| = sqrt(s); a norm
 * that is not > 1e-8 counts as 1 (mergekit's normalize leaves such a
 * vector alone). dot = s01 / (|v0| |v1|). If |dot| > 0.9995: s0 = 1 - t,
 * s1 = t; else theta = acos(dot), s0 = sin((1 - t) theta) / sin(theta), s1
 * = sin(t theta) / sin(theta). out = s0 v0 + s1 v1. t = 0 copies the base
 * and t = 1 the model exactly, with no statistics pass (mergekit computes
 * 1 * v0 + 0 * v1, which differs from v0 only in the sign of zeros and
 * where v1 is not finite).
 *
 * nuslerp (exactly two models; optional base; weight per model). t = w_2 /
 * (w_1 + w_2), 0.5 when |w_1 + w_2| < 1e-6 (fp64 from the fp32 weights).
 * v_k = d_k with a base, else X_k. Norms are clamped below at 1e-7 (NaN
 * stays NaN), cos = s01 / (|v0| |v1|) clamped to [-1, 1], theta =
 * acos(cos); where |sin(theta)| < 1e-8: s0 = 1 - t, s1 = t, else s0 =
 * sin((1 - t) theta) / sin(theta), s1 = sin(t theta) / sin(theta). out =
 * s0 v0 + s1 v1, plus B with a base: B + (s0 d1 + s1 d2). nuslerp_flatten
 * (default true): one pair of coefficients for the tensor (GRAM). Without
 * flatten (LINE_GRAM), mergekit's dim: nuslerp_row_wise true is its dim 0,
 * so each COLUMN is a vector (per-column sums); false is its last
 * dimension, so each ROW is a vector (per-row sums). A tensor of one row
 * (1-D) in column mode is one vector (mergekit's dim 0 of a 1-D tensor).
 *
 * multislerp (n >= 1 models; optional base; weight per model). v_i = d_i
 * with a base, else X_i. With normalize_weights (default true) w_i /= sum
 * w (the recipe rejects a zero sum). GRAM gives |v_i| and the Gram matrix.
 * mergekit's algorithm, in exact arithmetic on the Gram matrix: u_i = v_i /
 * (|v_i| + eps), m = sum w_i u_i; if |m| < eps the result is the weighted
 * sum sum w_i v_i (mergekit does that for two models and raises an error
 * for more; we fall back for any count). Else the tangent vectors' weighted
 * sum is exactly 0 at the weighted mean (sum w_i (u_i - (u_i . m^) m^) = m
 * - |m| m^), so the exponential map returns m^ = m / |m| (mergekit's own
 * result differs only by its rounding of that zero) and out = m^ sum w_i
 * |v_i| = sum_i c_i v_i with c_i = ((w_i / (|v_i| + eps)) / |m|) sum_j w_j
 * |v_j|, plus B with a base. One model: out = X_1 exactly (mergekit returns
 * the tensor unchanged).
 *
 * karcher (n >= 1 inputs; max_iter 10, tol 1e-5). The inputs are the raw
 * tensors: the base (when the recipe names one, listed under models or not:
 * mergekit gathers it too) first, then the models; equal weights 1/K.
 * mergekit's iteration runs on the Gram matrix in fp64 (every vector it
 * forms is a combination of the unit inputs): norms n_k; inputs with n_k <=
 * tol are left out (none left: the output is +0); alphas renormalised over
 * the rest; mean = normalised sum alpha_k u_k (the first valid unit vector
 * when its norm < tol); each iteration: for each input, dot = clamp(mean .
 * u_k, -1, 1), theta = acos(dot), skipped when theta < tol, tangent +=
 * alpha_k theta / sin(theta) (u_k - dot mean); stop when |tangent| < tol;
 * mean = cos|T| mean + sin|T| T / |T|, renormalised when its norm > tol.
 * out = (sum_k n_k / K) mean = sum over valid k of c_k X_k (fp32, in input
 * order; left-out inputs are not read, so their NaNs do not leak). One
 * input: a copy.
 *
 * model_stock (base + at least two models; filter_wise default false).
 * GRAM over the task vectors d_i (one row at a time with filter_wise,
 * inside the APPLY pass: rows are never split across chunks);
 * t = ms_interp_model_stock_t; out = (float)t * mean(X) + (float)(1 - t) *
 * B (ms_interp_model_stock). Orthogonal or zero task vectors give cos = 0,
 * t = 0: the base.
 *
 * nearswap (base + exactly one model; t > 0): ms_interp_nearswap, one
 * pass, as DESIGN-style fp32 with the max(|B - X|, 1e-6) (mergekit
 * maps t / 0 to 1 instead; the two differ only where B == X and t < 1e-6,
 * and then both give X up to rounding).
 *
 * sce (base + n >= 1 models; select_topk in (0, 1], default 1). With
 * select_topk < 1, the element variance over models (ms_interp_sce_var) is
 * a selection key: KEY_HI also counts its zeros; k = the truncation of
 * (numel - zeros) * select_topk rounded to fp32, as mergekit's
 * int(count_nonzero(var) * select_topk) computes it on a float32 tensor; the k
 * elements of largest variance are kept, NaN above +Inf, ties by smaller
 * flat index (exact, by histogram selection as for ties). tau_i = d_i * m
 * with m = 0 or 1 (mergekit multiplies, so a dropped NaN stays NaN). SUMSQ:
 * blocked fp64 sums of tau_i^2; w_i = (s_i / numel) / sum_j (s_j / numel),
 * 1/n when that sum is 0, fp64 rounded to fp32. out =
 * ms_interp_sce_combine.
 *
 * ram, ramplus_tl (base + n >= 1 models; epsilon per model, default 1e-5,
 * in [0, 1), compared in fp32; ramplus_tl: r 0.1, alpha 0.2).
 * ms_interp_ram with lambda_i = 1 (ram) or, from COUNT's exact integer
 * counts shared_i = #(nz_i and count > 1), unique_i = #(nz_i and count ==
 * 1): rho_i = shared_i / max(unique_i, eps_i), lambda_i = 1 + r * clamp(rho_i,
 * 0, alpha), fp64 rounded to fp32.
 *
 * arcee_fusion (base + exactly one model). Per row, in fp64: p =
 * softmax(X row) + 1e-8 and q = softmax(B row) + 1e-8 (the maximum
 * subtracted first; exp by ms_interp_exp; the normaliser a per-row blocked
 * sum), kl = per-row blocked sum of p log(p / q) (ms_interp_log).
 * importance = |X - B| * (float)kl in fp32. The threshold median + 1.5 (q3 -
 * q1) uses mergekit's quantile positions floor(q (numel - 1)) for q = 0.25,
 * 0.5, 0.75, computed exactly in integers over the whole tensor (mergekit
 * samples a million elements and rounds the positions in fp32), found
 * exactly by histogram selection on ms_interp_order_key (NaN above +Inf);
 * the threshold is fp64 from the three fp32 values and compared with each
 * importance in fp64. out = B + d * m with m = (importance >= threshold) as
 * 0/1 (mergekit's arithmetic: a dropped NaN delta stays NaN).
 *
 * Plans (each present only when needed; APPLY last):
 *   slerp            GRAM, APPLY (APPLY alone when t is 0 or 1)
 *   nuslerp          GRAM or LINE_GRAM, APPLY
 *   multislerp       GRAM, APPLY (APPLY alone for one model)
 *   karcher          GRAM, APPLY (APPLY alone for one input)
 *   model_stock      GRAM, APPLY (APPLY alone with filter_wise)
 *   nearswap, ram    APPLY
 *   ramplus_tl       COUNT, APPLY
 *   sce              [KEY_HI, KEY_LO,] SUMSQ, APPLY (the keys when select_topk < 1)
 *   arcee_fusion     KEY_HI, KEY_LO, APPLY
 *
 * What a backend does per chunk and pass kind (st->interp = is):
 *   GRAM       for every pair a <= b of is->n_vecs vectors (v_k = input
 *              slot is->vec_slot[k], or its task vector when is->vec_delta),
 *              the blocked fp64 sum of v_a * v_b, carried across chunks with
 *              ms_interp_fold into is->sum / is->open.
 *   LINE_GRAM  s00, s01, s11 of the two vectors per row (line_cols false:
 *              is->line_sum[row * 3 + q], rows whole in a chunk) or per
 *              column (line_cols: is->line_open[col * 3 + q] holds the open
 *              block of 65,536 rows, added to line_sum when it completes).
 *   KEY_HI     hist_hi[key >> 16]++ for every element's key (sce: the
 *              variance's ms_merge_key, plus n_zero += key == 0;
 *              arcee_fusion: ms_interp_order_key of the importance, after
 *              storing each row's kl in is->row_kl).
 *   KEY_LO     for each rank r < n_ranks whose bin is not an earlier rank's:
 *              rank[r].hist_lo[key & 0xffff]++ where key >> 16 == rank[r].bin.
 *   SUMSQ      per model, the blocked fp64 sum of tau_i^2 (is->sum[i - 1]).
 *   COUNT      per model, shared and unique counts (is->shared, is->unique).
 *   APPLY      the output, as is->apply says.
 *   sce's mask (is->sel == MS_INTERP_SEL_TOP, in SUMSQ and APPLY): keep iff
 *   ms_merge_sel_upper(key, eq_pos, is->sel_key, is->sel_take), eq_pos
 *   counted as in merge_passes.h (is->eq_seen + a prefix in the chunk) when
 *   is->sel_split.
 *   Always: c->elem0 == st->next_elem; then st->next_elem += c->n_elems. */
#ifndef MS_MERGE_PASSES_INTERP_H
#define MS_MERGE_PASSES_INTERP_H

#include <stdbool.h>
#include <stdint.h>

#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

#define MS_INTERP_MAX_VECS (MS_MAX_MODELS + 1)
#define MS_INTERP_MAX_SUMS (MS_INTERP_MAX_VECS * (MS_INTERP_MAX_VECS + 1) / 2)
#define MS_INTERP_HI_BINS 65536u /* order keys use all 32 bits */
#define MS_INTERP_MAX_RANKS 3

typedef enum ms_interp_apply {
    MS_INTERP_APPLY_MIX,       /* out = sum_k coef[k] v_k over used vectors (+ B when add_base) */
    MS_INTERP_APPLY_LINE_MIX,  /* nuslerp lines: coefficients line_coef[line * 2 + k] */
    MS_INTERP_APPLY_COPY,      /* out = input slot copy_slot, rounded to the output dtype */
    MS_INTERP_APPLY_ZERO,      /* out = +0 */
    MS_INTERP_APPLY_STOCK,     /* model_stock with the tensor's a, b */
    MS_INTERP_APPLY_STOCK_ROWS,/* model_stock filter_wise: a, b per row, in the kernel */
    MS_INTERP_APPLY_NEARSWAP,
    MS_INTERP_APPLY_RAM,       /* ram and ramplus_tl (lambda) */
    MS_INTERP_APPLY_SCE,
    MS_INTERP_APPLY_FUSION,    /* arcee_fusion */
} ms_interp_apply;

typedef enum ms_interp_sel {
    MS_INTERP_SEL_ALL,  /* sce: every element kept */
    MS_INTERP_SEL_NONE,
    MS_INTERP_SEL_TOP,  /* the top k by key, ties by index */
} ms_interp_sel;

/* One order statistic searched by KEY_HI / KEY_LO. */
typedef struct ms_interp_rank {
    uint64_t rank;        /* 0-based ascending position */
    uint32_t bin;         /* after KEY_HI: key(rank) >> 16 */
    uint64_t n_below_bin; /* after KEY_HI */
    bool owns_lo;         /* KEY_LO fills hist_lo (else an earlier rank has the same bin) */
    uint64_t *hist_lo;    /* [65536], shared with the earlier rank of the same bin */
    uint32_t key;         /* after KEY_LO */
    uint64_t n_less, n_eq;
} ms_interp_rank;

typedef struct ms_interp_state {
    /* GRAM / LINE_GRAM: the vectors v_k */
    unsigned n_vecs;                        /* K <= MS_INTERP_MAX_VECS */
    unsigned vec_slot[MS_INTERP_MAX_VECS];  /* input slot of v_k */
    bool vec_delta;                         /* v_k = X_slot - B (else the raw input) */
    unsigned n_sums;                        /* K (K + 1) / 2 (GRAM) or n_models (SUMSQ) */
    double sum[MS_INTERP_MAX_SUMS];         /* completed blocks, ms_interp_pair order */
    double open[MS_INTERP_MAX_SUMS];        /* the open block (0 when none) */
    /* LINE_GRAM */
    bool line_cols;                         /* per column, else per row */
    uint64_t n_lines;                       /* rows or columns */
    double *line_sum;                       /* [n_lines][3]: s00, s01, s11 */
    double *line_open;                      /* columns: [cols][3] */
    float *line_coef;                       /* [n_lines][2]: s0, s1 (after the finish) */
    /* APPLY */
    ms_interp_apply apply;
    unsigned copy_slot;                     /* COPY */
    float coef[MS_INTERP_MAX_VECS];         /* MIX: per vector */
    bool use[MS_INTERP_MAX_VECS];           /* MIX: vectors taking part */
    bool add_base;                          /* MIX / LINE_MIX: + B */
    float stock_a, stock_b;                 /* STOCK: (float)t, (float)(1 - t) */
    float eps32[MS_MAX_MODELS + 1];         /* RAM: (float)epsilon[i] */
    float lambda[MS_MAX_MODELS + 1];        /* RAM: 1, or ramplus_tl's after COUNT */
    float w[MS_MAX_MODELS + 1];             /* SCE: weights after SUMSQ */
    /* KEY_HI / KEY_LO */
    unsigned n_ranks;
    ms_interp_rank rank[MS_INTERP_MAX_RANKS];
    uint64_t *hist_hi;                      /* [MS_INTERP_HI_BINS] */
    uint64_t n_zero;                        /* sce: keys equal to 0 */
    /* sce's mask */
    ms_interp_sel sel;
    uint64_t k;                             /* elements kept */
    uint32_t sel_key;
    uint64_t sel_take;                      /* equal keys kept, the first ones by index */
    bool sel_split;                         /* 0 < take < n_eq */
    uint64_t eq_seen;                       /* equal keys in the earlier chunks of this pass */
    /* arcee_fusion */
    double *row_kl;                         /* [rows], after KEY_HI */
    double threshold;                       /* after KEY_LO */
    /* COUNT */
    uint64_t shared[MS_MAX_MODELS + 1], unique[MS_MAX_MODELS + 1];
    void *mem;                              /* owns the arrays above */
} ms_interp_state;

/* True for the methods planned here. */
bool ms_merge_interp_method(ms_method m);

/* Fills st->n_passes and st->pass[] for p (an interp method). */
void ms_merge_interp_plan(const ms_tensor_params *p, ms_merge_state *st);

/* Host bytes of the interp state for p (struct and arrays). */
uint64_t ms_merge_interp_state_bytes(const ms_tensor_params *p);

/* Allocates and configures st->interp for p (after ms_merge_interp_plan).
 * Returns 0, or -ENOMEM (the fault seam's host_alloc site included) with
 * st->interp NULL. */
int ms_merge_interp_state_open(const ms_tensor_params *p, ms_merge_state *st);

/* Frees is and its arrays. NULL is a no-op. */
void ms_merge_interp_state_close(ms_interp_state *is);

/* The host step after pass `pass` (not the last) of an interp plan:
 * turns the gathered statistics into the next pass's parameters. Called by
 * ms_merge_pass_finish once it has checked the pass covered the tensor. */
void ms_merge_interp_finish(ms_merge_state *st, const ms_tensor_params *p, unsigned pass);

/* Folds one chunk's (or window's) per-block sums into the totals, like
 * ms_merge_l1_fold for q sums at once: blk[(j - j0) * q + s] is the sum s
 * over the part of block j in [elem0, elem0 + n) (n > 0), where block j0's
 * started from open[s]. Completed blocks are added to tot in block order; a
 * block left open is carried in open. */
static inline void ms_interp_fold(double *tot, double *open, unsigned q, uint64_t elem0, uint64_t n,
                                  const double *blk)
{
    uint64_t j0 = elem0 / MS_MERGE_BLOCK, j1 = (elem0 + n - 1) / MS_MERGE_BLOCK;
    uint64_t end = elem0 + n;
    for (uint64_t j = j0; j <= j1; j++) {
        const double *b = blk + (j - j0) * q;
        if ((j + 1) * MS_MERGE_BLOCK <= end) {
            for (unsigned s = 0; s < q; s++) {
                tot[s] += b[s];
                open[s] = 0.0;
            }
        } else {
            for (unsigned s = 0; s < q; s++)
                open[s] = b[s];
        }
    }
}

#endif
