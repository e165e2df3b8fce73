/* The merge methods a recipe can name and the parameters each one takes:
 * names, sparsification, consensus, whether a base model is needed, which
 * parameters are accepted, their defaults and their allowed ranges.
 *
 * One table (method_table.c) is the single source of these facts; the recipe
 * parser validates against it and the per-tensor resolution fills
 * ms_tensor_params from it. Everything here is constant data: thread-safe,
 * nothing to free.
 *
 * Parameters (mergekit's names):
 *   per model (models[i].parameters, defaulted by the top-level parameters):
 *     weight   every method, required, a finite number within float range
 *     density  sparsifying methods, default 1, in (0, 1]
 *     gamma    breadcrumbs*, default 0.01, in [0, 1)
 *     epsilon  della*, default 0.15, in [0, 1) (and della's d +- eps rule)
 *   global only (top-level parameters):
 *     normalize, rescale   booleans, per-method defaults
 *     lambda               task-vector methods, default 1, finite within float range
 *     int8_mask            task-vector methods and sce, boolean, accepted and ignored
 *   the interpolation and model-soup methods (global only unless noted):
 *     t                    slerp (required, [0, 1]); nearswap (required, > 0)
 *     filter_wise          model_stock, boolean, default false
 *     nuslerp_flatten      nuslerp, boolean, default true
 *     nuslerp_row_wise     nuslerp, boolean, default false
 *     normalize_weights    multislerp, boolean, default true
 *     eps                  multislerp, default 1e-8, in (0, 1)
 *     select_topk          sce, default 1, in (0, 1]
 *     epsilon              ram and ramplus_tl (per model), default 1e-5, in [0, 1)
 *     r, alpha             ramplus_tl, defaults 0.1 and 0.2, in [0, FLT_MAX]
 *     max_iter             karcher, an integer, default 10, in [0, 100000]
 *     tol                  karcher, default 1e-5, in [0, 1)
 *     weight               also nuslerp and multislerp (per model, required);
 *                          the other interpolation methods take none
 * A known parameter a method does not use is ignored with a warning naming
 * its line, as mergekit ignores it (without the warning); an unknown key is
 * an error. */
#ifndef MS_METHOD_TABLE_H
#define MS_METHOD_TABLE_H

#include <stdbool.h>

#include "pipeline/merge_params.h"

typedef enum ms_param_id {
    MS_PARAM_WEIGHT,
    MS_PARAM_DENSITY,
    MS_PARAM_GAMMA,
    MS_PARAM_EPSILON,
    MS_PARAM_LAMBDA,
    MS_PARAM_NORMALIZE,
    MS_PARAM_RESCALE,
    MS_PARAM_INT8_MASK,
    MS_PARAM_T,
    MS_PARAM_FILTER_WISE,
    MS_PARAM_NUSLERP_FLATTEN,
    MS_PARAM_NUSLERP_ROW_WISE,
    MS_PARAM_NORMALIZE_WEIGHTS,
    MS_PARAM_EPS,
    MS_PARAM_SELECT_TOPK,
    MS_PARAM_R,
    MS_PARAM_ALPHA,
    MS_PARAM_MAX_ITER,
    MS_PARAM_TOL,
    MS_PARAM_SCALE, /* passthrough: per source, multiplies the copied tensor */
    MS_PARAM_COUNT
} ms_param_id;

typedef enum ms_param_type {
    MS_PARAM_TYPE_NUMBER, /* a finite number, possibly a gradient */
    MS_PARAM_TYPE_BOOL,   /* true/false (YAML 1.1 spellings); never a gradient */
    MS_PARAM_TYPE_INT,    /* an integer literal; never a gradient */
} ms_param_type;

typedef enum ms_param_scope {
    MS_PARAM_SCOPE_MODEL,  /* one value per model; the top-level value is the default */
    MS_PARAM_SCOPE_GLOBAL, /* top-level parameters only */
} ms_param_scope;

typedef struct ms_param_info {
    ms_param_id id;
    const char *name;   /* as written in recipes: "density" */
    ms_param_type type;
    ms_param_scope scope;
    /* NUMBER only: the allowed interval (weight and lambda: +-FLT_MAX, since
     * they become floats in ms_tensor_params). */
    double lo, hi;
    bool lo_open, hi_open;
    const char *range;  /* the interval for messages, "(0, 1]"; NULL for BOOL */
} ms_param_info;

typedef struct ms_method_info {
    ms_method method;
    const char *name;        /* "dare_ties" */
    ms_sparsify sparsify;
    bool consensus;          /* TIES "sum" sign election */
    bool needs_base;         /* a task-vector method: base_model required */
    bool default_normalize;
    bool default_rescale;
    unsigned params;         /* accepted parameters: bit (1u << ms_param_id) each */
    /* appended for the interpolation and model-soup methods (zero: the
     * task-vector methods' rules) */
    bool optional_base;      /* base_model optional; when named, it is the base (dropped from models) */
    unsigned min_models;     /* merged models besides the base: at least (0: 1) */
    unsigned max_models;     /* ... and at most (0: MS_MAX_MODELS) */
    unsigned required;       /* parameters without a default that the top level must set (bits) */
} ms_method_info;

/* The table row of m; NULL when m is not a valid ms_method. */
const ms_method_info *ms_method_info_get(ms_method m);

/* "ties" etc.; "unknown" when m is not a valid ms_method. */
const char *ms_method_name(ms_method m);

typedef enum ms_method_lookup_result {
    MS_METHOD_FOUND,       /* *out is set */
    MS_METHOD_UNSUPPORTED, /* a method mergekit (or our roadmap) knows, not implemented yet */
    MS_METHOD_UNKNOWN,
} ms_method_lookup_result;

/* Looks a recipe's merge_method up by exact (case-sensitive) name. */
ms_method_lookup_result ms_method_lookup(const char *name, ms_method *out);

/* "linear, task_arithmetic, ties, ..." (all supported names, table order),
 * for error messages. A static string. */
const char *ms_method_names(void);

/* True when method m accepts parameter p. */
bool ms_method_takes(ms_method m, ms_param_id p);

/* The default of parameter p for method m (bools as 0/1). Returns false (and
 * leaves *out alone) when p has no default for m (weight: required) or m does
 * not take p. */
bool ms_method_param_default(ms_method m, ms_param_id p, double *out);

/* The description of p; NULL when p is not a valid ms_param_id. */
const ms_param_info *ms_param_info_get(ms_param_id p);

/* The description of p as method m uses it: ms_param_info_get(p) except
 * where m gives p another range (nearswap's t: > 0). NULL when p is not a
 * valid ms_param_id. */
const ms_param_info *ms_method_param_info(ms_method m, ms_param_id p);

/* Merged models (besides the base) method m accepts: [*lo, *hi]. */
void ms_method_model_count(ms_method m, unsigned *lo, unsigned *hi);

/* Looks a parameter up by its recipe name. Returns false for an unknown name. */
bool ms_param_lookup(const char *name, ms_param_id *out);

/* True when v is finite and inside p's interval (any finite v for BOOL
 * parameters, which the parser stores as 0/1; INT values must also be
 * integers). */
bool ms_param_in_range(const ms_param_info *p, double v);

#endif
