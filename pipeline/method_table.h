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
 *     int8_mask            task-vector methods, boolean, accepted and ignored
 * A parameter a method does not use is rejected by the recipe parser
 * (mergekit only warns; a typo'd or misplaced parameter silently changing
 * nothing is worse than an error). */
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
    MS_PARAM_COUNT
} ms_param_id;

typedef enum ms_param_type {
    MS_PARAM_TYPE_NUMBER, /* a finite number, possibly a gradient */
    MS_PARAM_TYPE_BOOL,   /* true/false (YAML 1.1 spellings); never a gradient */
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

/* Looks a parameter up by its recipe name. Returns false for an unknown name. */
bool ms_param_lookup(const char *name, ms_param_id *out);

/* True when v is finite and inside p's interval (any finite v for BOOL
 * parameters, which the parser stores as 0/1). */
bool ms_param_in_range(const ms_param_info *p, double v);

#endif
