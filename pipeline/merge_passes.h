/* The multi-pass plan of one tensor's merge, backend independent (host only).
 *
 * A tensor is computed in P = ms_merge_pass_count(p) >= 1 passes. Each pass
 * visits every chunk of the tensor once, in row order (the chunking may differ
 * from pass to pass); the LAST pass writes the output. Between passes the host
 * calls ms_merge_pass_finish, which turns what the pass gathered into the
 * next pass's parameters. The result is byte-identical for every chunking,
 * thread count and backend.
 *
 * Pass kinds, in this order, each present only when needed:
 *   HIST_HI  selection (TOP/BAND models with a searched bound): per model, a
 *            histogram of key >> 16 over the whole tensor (32,768 bins).
 *            finish: each bound's bin = the bin holding its rank.
 *   HIST_LO  per searched bound, a histogram of key & 0xffff over the elements
 *            whose key >> 16 == bin (65,536 bins). finish: the exact threshold
 *            key t, n_less = #(key < t), n_eq = #(key == t), take, split.
 *   L1       rescale models: the fixed-order fp64 sums of |delta| and |tau|
 *            (65,536-element blocks in flat index order, each summed
 *            sequentially from 0.0, block sums added sequentially; the open
 *            block is carried across chunks). finish: factor.
 *   APPLY    the output.
 * Plans: linear, task_arithmetic (no sparsify), dare without rescale, della
 * without rescale: APPLY. dare / della with rescale: L1, APPLY. ties and
 * breadcrumbs: HIST_HI, HIST_LO, APPLY (L1 before APPLY if rescale is set).
 * A model with d >= 1 is not sparsified and not rescaled (mergekit returns the
 * delta unchanged), so it adds no pass.
 *
 * Keep rules per model (ms_merge_model.sel), for element e (flat index) with
 * delta = ms_merge_delta(X, B), key = ms_merge_key(delta):
 *   ALL     keep.                NONE  drop.
 *   RANDOM  ms_merge_random_keep(ms_merge_philox_word(p->philox_key, e, i - 1), random_threshold).
 *   TOP     ms_merge_sel_upper(key, eq_pos(bound[0]), bound[0].key, bound[0].take).
 *   BAND    !ms_merge_sel_lower(key, eq_pos(bound[0]), ...bound[0])
 *           && ms_merge_sel_lower(key, eq_pos(bound[1]), ...bound[1]).
 *   DELLA   per row: sort the row's keys ascending, ties by column; element
 *           of 0-based rank r kept iff its philox word <
 *           ms_merge_della_threshold(p->density[i], p->epsilon[i], r, cols).
 * eq_pos(b) = number of elements with key == b.key and a smaller flat index;
 * only needed where b.split (else pass 0). A backend computes it as b.eq_seen
 * (elements of earlier chunks of this pass) + a prefix count inside the chunk,
 * and adds the chunk's count to b.eq_seen after the chunk; where the bound
 * has a captured index list, ms_merge_eq_pos_before gives it directly.
 * Then tau = ms_merge_tau(delta, keep, factor), W_i = w_i * tau, and the
 * output is ms_merge_combine (or ms_merge_linear for linear), stored with
 * ms_merge_store_*.
 *
 * What a backend does per chunk and pass kind (st->pass[pass]):
 *   HIST_HI  for each model with hist_hi: hist_hi[key >> 16]++ over the chunk;
 *            optionally the bounds' captures (ms_merge_capture).
 *   HIST_LO  for each model, each bound with search: if key >> 16 == bin:
 *            bound.hist_lo[key & 0xffff]++.
 *   L1       for each model with rescale: compute block sums (see
 *            ms_merge_l1_fold), then update eq_seen of split bounds.
 *   APPLY    write the output, then update eq_seen of split bounds.
 *   Always: MS_ASSERT-style check c->elem0 == st->next_elem, then
 *   st->next_elem += c->n_elems.
 * A failed pass leaves the state undefined: close it and start over. */
#ifndef MS_MERGE_PASSES_H
#define MS_MERGE_PASSES_H

#include <stdbool.h>
#include <stdint.h>

#include "pipeline/merge_math.h"
#include "pipeline/merge_params.h"

#define MS_MERGE_BLOCK 65536u      /* elements per fp64 reduction block */
#define MS_MERGE_HI_BINS 32768u    /* key >> 16 (keys < 2^31) */
#define MS_MERGE_LO_BINS 65536u    /* key & 0xffff */
#define MS_MERGE_MAX_PASSES 4

typedef enum ms_merge_pass_kind {
    MS_MERGE_PASS_HIST_HI,
    MS_MERGE_PASS_HIST_LO,
    MS_MERGE_PASS_L1,
    MS_MERGE_PASS_APPLY,
    /* the interpolation and model-soup methods' statistics passes
     * (pipeline/merge_passes_interp.h) */
    MS_MERGE_PASS_GRAM,      /* fp64 blocked sums of products of pairs of vectors */
    MS_MERGE_PASS_LINE_GRAM, /* the same per row or per column (nuslerp without flatten) */
    MS_MERGE_PASS_KEY_HI,    /* selection on a derived key: histogram of key >> 16 */
    MS_MERGE_PASS_KEY_LO,    /* histogram of key & 0xffff inside the selected bins */
    MS_MERGE_PASS_SUMSQ,     /* sce: sums of squares of the masked task vectors */
    MS_MERGE_PASS_COUNT,     /* ramplus_tl: shared and unique element counts */
} ms_merge_pass_kind;

typedef enum ms_merge_sel {
    MS_MERGE_SEL_ALL,
    MS_MERGE_SEL_NONE,
    MS_MERGE_SEL_RANDOM,
    MS_MERGE_SEL_TOP,
    MS_MERGE_SEL_BAND,
    MS_MERGE_SEL_DELLA,
} ms_merge_sel;

/* HIST_HI's shortcut past HIST_LO, for a backend that takes it (the CPU's,
 * cpu/cpu_merge.c; the others leave it alone and nothing changes). While it
 * counts HIST_HI, the backend also keeps every key of the hi-bins
 * [bin_lo, bin_hi] with its flat index: a range it chose from a sample of the
 * pass's first chunk, which the bound's bin will very likely fall in. When
 * the capture saw the whole pass, did not overflow and holds the bound's
 * bin, HIST_HI's finish resolves the bound exactly as HIST_LO's would and
 * clears its search, so HIST_LO has nothing left to do for it
 * (ms_merge_pass_idle); a split bound also keeps the ascending flat indices
 * of its keys equal to t, so that a backend finds eq_pos by binary search
 * (ms_merge_eq_pos_before) instead of counting over the tensor again. */
typedef struct ms_merge_capture {
    uint32_t *key;    /* [cap]: the captured keys, in no particular order */
    uint32_t *index;  /* [cap]: their flat indices */
    uint64_t cap;     /* entries there is room for; 0: this bound never captures */
    uint64_t n;       /* entries appended (backends add atomically); n > cap: overflowed */
    uint64_t covered; /* elements of the pass the capturing backend saw */
    uint32_t bin_lo, bin_hi;
    bool armed;       /* the range is chosen (by the pass's first chunk) */
    bool eq_index;    /* resolved with a split: index[0..n) are the sorted indices of key == t */
} ms_merge_capture;

/* One selection boundary: the key at ascending position `rank` (keys sorted
 * ascending, any order among equals) and how many equal elements fall on the
 * selected side. */
typedef struct ms_merge_bound {
    bool search;         /* found by the histogram passes (else preset by the plan) */
    uint64_t rank;       /* search: 0-based ascending position in [0, numel) */
    uint32_t bin;        /* after HIST_HI: key(rank) >> 16 */
    uint64_t n_below_bin;/* after HIST_HI: elements whose key >> 16 < bin */
    uint32_t key;        /* t: after HIST_LO (preset for a trivial bound) */
    uint64_t n_less;     /* after HIST_LO: elements with key < t */
    uint64_t n_eq;       /* after HIST_LO: elements with key == t */
    uint64_t take;       /* TOP: first `take` equal elements are kept; BAND: are below */
    bool split;          /* 0 < take < n_eq: eq_pos matters */
    uint64_t eq_seen;    /* elements with key == t in the chunks of this pass so far */
    uint64_t *hist_lo;   /* search: [MS_MERGE_LO_BINS], part of the state's memory */
    ms_merge_capture capture; /* searched bounds, when p->capture_entries > 0 */
} ms_merge_bound;

typedef struct ms_merge_model {
    ms_merge_sel sel;
    uint64_t random_threshold; /* RANDOM: floor(d * 2^32) */
    uint64_t k;                /* TOP: elements kept; BAND: target (= elements kept) */
    ms_merge_bound bound[2];   /* TOP: [0]; BAND: [0] = lower edge, [1] = upper edge */
    uint64_t *hist_hi;         /* TOP/BAND with a searched bound: [MS_MERGE_HI_BINS] */
    bool rescale;              /* L1 sums gathered and factor applied */
    double l1_delta, l1_tau;   /* L1: sums of the completed blocks */
    double blk_delta, blk_tau; /* L1: partial sums of the open block (0 when none is open) */
    float factor;              /* 1.0f unless rescaled: valid after the L1 pass */
} ms_merge_model;

typedef struct ms_merge_state {
    unsigned n_models;
    unsigned n_passes;
    ms_merge_pass_kind pass[MS_MERGE_MAX_PASSES];
    bool any_split;            /* some bound is split (set by HIST_LO's finish) */
    uint64_t next_elem;        /* the flat index the current pass's next chunk starts at */
    ms_merge_model model[MS_MAX_MODELS + 1]; /* [1..n_models]; [0] unused */
    uint64_t *hist_mem;        /* owns every histogram */
    uint64_t *capture_mem;     /* owns every capture's entries */
    /* The interpolation and model-soup methods' statistics and coefficients
     * (pipeline/merge_passes_interp.h); NULL for the task-vector methods.
     * Owned by the state. */
    struct ms_interp_state *interp;
    /* The Hessian-aware methods' coefficients (pipeline/merge_passes_hessian.h),
     * filled by the host (pipeline/hessian_inputs.h) before the first pass;
     * NULL otherwise (then every model selects by magnitude). Owned. */
    struct ms_hessian_state *hessian;
} ms_merge_state;

/* Allocates and plans the state for tensor p. Returns 0 and *out (close with
 * ms_merge_state_close), or -ENOMEM (the fault seam's host_alloc site
 * included). */
int ms_merge_state_open(const ms_tensor_params *p, ms_merge_state **out);
void ms_merge_state_close(ms_merge_state *st); /* NULL is a no-op */

/* Number of passes over the tensor (>= 1). */
unsigned ms_merge_pass_count(const ms_tensor_params *p);

/* Host step after pass `pass` (< n_passes - 1) visited every chunk: prepares
 * the next pass. Aborts (broken invariant) when the pass did not cover the
 * tensor exactly once. Calling it after the last pass is a no-op. */
void ms_merge_pass_finish(ms_merge_state *st, const ms_tensor_params *p, unsigned pass);

/* Host bytes the state holds for p (struct, histograms and captures): for
 * the memory budget. */
uint64_t ms_merge_state_bytes(const ms_tensor_params *p);

/* True when pass `pass` has nothing to do: a HIST_LO pass whose bounds were
 * all resolved by HIST_HI's capture. The caller then skips the kernels and
 * calls ms_merge_pass_skip_chunk for each chunk instead. */
bool ms_merge_pass_idle(const ms_merge_state *st, unsigned pass);
/* Whether some bound's capture is armed (a backend took HIST_HI's first
 * chunk and placed its ranges): false means HIST_LO will run. */
bool ms_merge_capturing(const ms_merge_state *st);

/* Whether pass `pass` of p's plan can turn out idle (a HIST_LO pass of a
 * tensor whose bounds capture): known before any state exists. */
bool ms_merge_pass_may_idle(const ms_tensor_params *p, unsigned pass);
void ms_merge_pass_skip_chunk(ms_merge_state *st, const ms_chunk *c);

/* A bound with a captured index list (capture.eq_index): how many elements
 * with key == t have a flat index below e. */
uint64_t ms_merge_eq_pos_before(const ms_merge_bound *b, uint64_t e);

/* Bounds the histogram passes search for (each may capture: p->capture_entries). */
unsigned ms_merge_searched_bounds(const ms_tensor_params *p);

/* key = {lo32(h), hi32(h)} with h = XXH3_64bits_withSeed(name, strlen(name), seed). */
void ms_merge_philox_key(const char *tensor_name, uint64_t seed, uint32_t key[2]);

/* Folds one chunk's L1 block sums into model m. The chunk covers flat indices
 * [elem0, elem0 + n) (n > 0) and touches blocks j0 = elem0 / BLOCK .. j1 =
 * (elem0 + n - 1) / BLOCK; sum_delta[j - j0], sum_tau[j - j0] are the
 * sequential fp64 sums over the chunk's part of block j, where the sum for j0
 * started from m->blk_delta / m->blk_tau (the carried open block) instead of
 * 0.0. Completed blocks are added to the totals in block order; a block the
 * chunk leaves open is carried. */
static inline void ms_merge_l1_fold(ms_merge_model *m, uint64_t elem0, uint64_t n, const double *sum_delta,
                                    const double *sum_tau)
{
    uint64_t j0 = elem0 / MS_MERGE_BLOCK, j1 = (elem0 + n - 1) / MS_MERGE_BLOCK;
    uint64_t end = elem0 + n;
    for (uint64_t j = j0; j <= j1; j++) {
        if ((j + 1) * MS_MERGE_BLOCK <= end) {
            m->l1_delta += sum_delta[j - j0];
            m->l1_tau += sum_tau[j - j0];
            m->blk_delta = 0.0;
            m->blk_tau = 0.0;
        } else {
            m->blk_delta = sum_delta[j - j0];
            m->blk_tau = sum_tau[j - j0];
        }
    }
}

#endif
