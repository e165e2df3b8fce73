/* What one output tensor's computation needs, fully resolved: the contract
 * between the recipe (which fills it per tensor), the scheduler (which cuts the
 * tensor into chunks) and the backends (which compute it).
 *
 * Plain C, no pointers into other modules, so the CUDA backend can copy it. */
#ifndef MS_MERGE_PARAMS_H
#define MS_MERGE_PARAMS_H

#include <stdbool.h>
#include <stdint.h>

#include "io/st_format.h"

#define MS_MAX_MODELS 16 /* models besides the base */

typedef enum ms_method {
    MS_METHOD_LINEAR,
    MS_METHOD_TASK_ARITHMETIC,
    MS_METHOD_TIES,
    MS_METHOD_DARE_TIES,
    MS_METHOD_DARE_LINEAR,
    MS_METHOD_BREADCRUMBS,
    MS_METHOD_BREADCRUMBS_TIES,
    MS_METHOD_DELLA,
    MS_METHOD_DELLA_LINEAR,
    /* interpolation and model-soup methods (pipeline/merge_passes_interp.h) */
    MS_METHOD_SLERP,
    MS_METHOD_NUSLERP,
    MS_METHOD_MULTISLERP,
    MS_METHOD_KARCHER,
    MS_METHOD_MODEL_STOCK,
    MS_METHOD_NEARSWAP,
    MS_METHOD_SCE,
    MS_METHOD_RAM,
    MS_METHOD_RAMPLUS_TL,
    MS_METHOD_ARCEE_FUSION,
    /* Hessian-aware methods (pipeline/merge_passes_hessian.h) */
    MS_METHOD_TIES_SPARSEGPT,
    MS_METHOD_DARE_SPARSEGPT,
    MS_METHOD_REGMEAN,
    MS_METHOD_PASSTHROUGH, /* planner only: copies layers (slices), with an optional scale */
    MS_METHOD_COUNT
} ms_method;

typedef enum ms_sparsify {
    MS_SPARSIFY_NONE,
    MS_SPARSIFY_MAGNITUDE,          /* ties: exact top-k of |delta| */
    MS_SPARSIFY_RANDOM,             /* dare: philox < floor(d * 2^32) */
    MS_SPARSIFY_MAGNITUDE_OUTLIERS, /* breadcrumbs: drop the bottom and the top ranks */
    MS_SPARSIFY_DELLA_MAGPRUNE,     /* della: per-row rank-dependent keep probability */
} ms_sparsify;

/* Everything about one output tensor's arithmetic. Index 0 of the per-input
 * arrays is the base; models are 1..n_models in recipe order. For linear the
 * base slot is unused (has_base false) unless the recipe lists it as a model. */
typedef struct ms_tensor_params {
    ms_method method;
    ms_sparsify sparsify;
    bool consensus;        /* TIES sign election ("sum") */
    bool normalize;
    bool rescale;
    bool has_base;
    unsigned n_models;     /* 1..MS_MAX_MODELS */
    float weight[MS_MAX_MODELS + 1];   /* w_i, [1..n] */
    double density[MS_MAX_MODELS + 1]; /* d_i in (0, 1], [1..n] */
    double gamma[MS_MAX_MODELS + 1];   /* breadcrumbs: fraction of top outliers dropped */
    double epsilon[MS_MAX_MODELS + 1]; /* della: eps */
    float lambda;                      /* 1 = no scaling */
    uint32_t philox_key[2];            /* from XXH3_64bits_withSeed(name, seed) */
    st_dtype in_dtype[MS_MAX_MODELS + 1]; /* F16, BF16 or F32 */
    st_dtype out_dtype;                   /* F16, BF16 or F32 */
    uint64_t numel;
    uint64_t rows, cols; /* rows * cols = numel; a 1-D tensor is one row */
    uint64_t model_rows[MS_MAX_MODELS + 1]; /* a model with extra embedding rows: its row count (>= rows) */
    /* The interpolation and model-soup methods' parameters (zero for the
     * task-vector methods; semantics in pipeline/merge_passes_interp.h).
     * For nuslerp, multislerp and karcher has_base says whether the recipe
     * named a base_model. epsilon[1..n] above is also ram's epsilon. */
    double t;               /* slerp: in [0, 1]; nearswap: the threshold, > 0 */
    bool filter_wise;       /* model_stock: one t per row */
    bool nuslerp_flatten;   /* nuslerp: the whole tensor is one vector (default) */
    bool nuslerp_row_wise;  /* nuslerp without flatten: vectors are columns (mergekit's dim 0), else rows */
    bool normalize_weights; /* multislerp: weights divided by their sum */
    double eps;             /* multislerp: norm epsilon */
    double select_topk;     /* sce: fraction of the highest-variance elements kept, (0, 1] */
    double ram_r, ram_alpha; /* ramplus_tl: r, alpha */
    unsigned max_iter;      /* karcher */
    double tol;             /* karcher */
    double regmean_alpha;   /* regmean: off-diagonal scale of each G_i, [0, 1] (default 0.1) */
    /* HIST_HI's capture (ms_merge_capture in pipeline/merge_passes.h): room
     * for this many entries per searched bound; 0: none. The planner sizes it
     * (merge_plan.c); it changes the speed, never the bytes. */
    uint64_t capture_entries;
} ms_tensor_params;

/* One contiguous range of whole rows of a tensor, with its input and output
 * bytes in host memory. The backends read in[] and write out[] only. */
typedef struct ms_chunk {
    uint64_t row0, n_rows;   /* rows [row0, row0 + n_rows) */
    uint64_t elem0, n_elems; /* = row0 * cols, n_rows * cols */
    const void *in[MS_MAX_MODELS + 1]; /* raw little-endian bytes, in_dtype[i] */
    void *out;                         /* out_dtype bytes (final pass only) */
} ms_chunk;

#endif
