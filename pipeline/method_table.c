#include "pipeline/method_table.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define P(id) (1u << (id))

/* Parameters every task-vector method takes (mergekit's generalized task
 * arithmetic: weight per model; int8_mask, normalize, rescale, lambda global). */
#define TV_PARAMS                                                              \
    (P(MS_PARAM_WEIGHT) | P(MS_PARAM_LAMBDA) | P(MS_PARAM_NORMALIZE) |         \
     P(MS_PARAM_RESCALE) | P(MS_PARAM_INT8_MASK))

/* Indexed by ms_method; the defaults (normalize, rescale) are DESIGN.md's. */
static const ms_method_info k_methods[MS_METHOD_COUNT] = {
    [MS_METHOD_LINEAR] = {MS_METHOD_LINEAR, "linear", MS_SPARSIFY_NONE, false, false, true, false,
                          P(MS_PARAM_WEIGHT) | P(MS_PARAM_NORMALIZE), false, 0, 0, 0},
    [MS_METHOD_TASK_ARITHMETIC] = {MS_METHOD_TASK_ARITHMETIC, "task_arithmetic", MS_SPARSIFY_NONE,
                                   false, true, false, false, TV_PARAMS, false, 0, 0, 0},
    [MS_METHOD_TIES] = {MS_METHOD_TIES, "ties", MS_SPARSIFY_MAGNITUDE, true, true, true, false,
                        TV_PARAMS | P(MS_PARAM_DENSITY), false, 0, 0, 0},
    [MS_METHOD_DARE_TIES] = {MS_METHOD_DARE_TIES, "dare_ties", MS_SPARSIFY_RANDOM, true, true,
                             false, true, TV_PARAMS | P(MS_PARAM_DENSITY), false, 0, 0, 0},
    [MS_METHOD_DARE_LINEAR] = {MS_METHOD_DARE_LINEAR, "dare_linear", MS_SPARSIFY_RANDOM, false,
                               true, false, true, TV_PARAMS | P(MS_PARAM_DENSITY), false, 0, 0, 0},
    [MS_METHOD_BREADCRUMBS] = {MS_METHOD_BREADCRUMBS, "breadcrumbs",
                               MS_SPARSIFY_MAGNITUDE_OUTLIERS, false, true, false, false,
                               TV_PARAMS | P(MS_PARAM_DENSITY) | P(MS_PARAM_GAMMA), false, 0, 0, 0},
    [MS_METHOD_BREADCRUMBS_TIES] = {MS_METHOD_BREADCRUMBS_TIES, "breadcrumbs_ties",
                                    MS_SPARSIFY_MAGNITUDE_OUTLIERS, true, true, false, false,
                                    TV_PARAMS | P(MS_PARAM_DENSITY) | P(MS_PARAM_GAMMA), false, 0, 0, 0},
    [MS_METHOD_DELLA] = {MS_METHOD_DELLA, "della", MS_SPARSIFY_DELLA_MAGPRUNE, true, true, true,
                         true, TV_PARAMS | P(MS_PARAM_DENSITY) | P(MS_PARAM_EPSILON), false, 0, 0, 0},
    [MS_METHOD_DELLA_LINEAR] = {MS_METHOD_DELLA_LINEAR, "della_linear",
                                MS_SPARSIFY_DELLA_MAGPRUNE, false, true, false, true,
                                TV_PARAMS | P(MS_PARAM_DENSITY) | P(MS_PARAM_EPSILON), false, 0, 0, 0},
    /* interpolation and model-soup methods (pipeline/merge_passes_interp.h):
     * name, base policy, accepted and required parameters, model counts
     * (besides the base). mergekit's names and defaults. */
    [MS_METHOD_SLERP] = {MS_METHOD_SLERP, "slerp", MS_SPARSIFY_NONE, false, true, false, false,
                         P(MS_PARAM_T), false, 1, 1, P(MS_PARAM_T)},
    [MS_METHOD_NUSLERP] = {MS_METHOD_NUSLERP, "nuslerp", MS_SPARSIFY_NONE, false, false, false, false,
                           P(MS_PARAM_WEIGHT) | P(MS_PARAM_NUSLERP_FLATTEN) | P(MS_PARAM_NUSLERP_ROW_WISE),
                           true, 2, 2, 0},
    [MS_METHOD_MULTISLERP] = {MS_METHOD_MULTISLERP, "multislerp", MS_SPARSIFY_NONE, false, false, false,
                              false, P(MS_PARAM_WEIGHT) | P(MS_PARAM_NORMALIZE_WEIGHTS) | P(MS_PARAM_EPS),
                              true, 1, 0, 0},
    [MS_METHOD_KARCHER] = {MS_METHOD_KARCHER, "karcher", MS_SPARSIFY_NONE, false, false, false, false,
                           P(MS_PARAM_MAX_ITER) | P(MS_PARAM_TOL), true, 1, 0, 0},
    [MS_METHOD_MODEL_STOCK] = {MS_METHOD_MODEL_STOCK, "model_stock", MS_SPARSIFY_NONE, false, true, false,
                               false, P(MS_PARAM_FILTER_WISE), false, 2, 0, 0},
    [MS_METHOD_NEARSWAP] = {MS_METHOD_NEARSWAP, "nearswap", MS_SPARSIFY_NONE, false, true, false, false,
                            P(MS_PARAM_T), false, 1, 1, P(MS_PARAM_T)},
    [MS_METHOD_SCE] = {MS_METHOD_SCE, "sce", MS_SPARSIFY_NONE, false, true, false, false,
                       P(MS_PARAM_SELECT_TOPK) | P(MS_PARAM_INT8_MASK), false, 1, 0, 0},
    [MS_METHOD_RAM] = {MS_METHOD_RAM, "ram", MS_SPARSIFY_NONE, false, true, false, false, P(MS_PARAM_EPSILON),
                       false, 1, 0, 0},
    [MS_METHOD_RAMPLUS_TL] = {MS_METHOD_RAMPLUS_TL, "ramplus_tl", MS_SPARSIFY_NONE, false, true, false, false,
                              P(MS_PARAM_EPSILON) | P(MS_PARAM_R) | P(MS_PARAM_ALPHA), false, 1, 0, 0},
    [MS_METHOD_ARCEE_FUSION] = {MS_METHOD_ARCEE_FUSION, "arcee_fusion", MS_SPARSIFY_NONE, false, true, false,
                                false, 0, false, 1, 1, 0},
    /* Hessian-aware methods (pipeline/merge_passes_hessian.h); each model may
     * name its `hessian` directory (recipe.h) */
    [MS_METHOD_TIES_SPARSEGPT] = {MS_METHOD_TIES_SPARSEGPT, "ties_sparsegpt", MS_SPARSIFY_MAGNITUDE, true, true,
                                  true, false, TV_PARAMS | P(MS_PARAM_DENSITY), false, 0, 0, 0},
    [MS_METHOD_DARE_SPARSEGPT] = {MS_METHOD_DARE_SPARSEGPT, "dare_sparsegpt", MS_SPARSIFY_MAGNITUDE, true, true,
                                  false, false,
                                  P(MS_PARAM_WEIGHT) | P(MS_PARAM_LAMBDA) | P(MS_PARAM_NORMALIZE) |
                                      P(MS_PARAM_INT8_MASK) | P(MS_PARAM_DENSITY),
                                  false, 0, 0, 0},
    [MS_METHOD_REGMEAN] = {MS_METHOD_REGMEAN, "regmean", MS_SPARSIFY_NONE, false, true, false, false,
                           P(MS_PARAM_ALPHA), false, 0, 0, 0},
    /* passthrough: one model copied whole, or `slices` of layers from several
     * (pipeline/merge_plan.c builds copy or scale jobs; no kernel of its own) */
    [MS_METHOD_PASSTHROUGH] = {MS_METHOD_PASSTHROUGH, "passthrough", MS_SPARSIFY_NONE, false, false, false,
                               false, P(MS_PARAM_SCALE), true, 1, 0, 0},
};

/* Methods mergekit has (and the Hessian-aware ones on our own roadmap) that
 * are not implemented yet: naming one is "not supported yet", not "unknown". */
static const char *const k_unsupported[] = {
    "core_space",
};

/* Indexed by ms_param_id. */
static const ms_param_info k_params[MS_PARAM_COUNT] = {
    [MS_PARAM_WEIGHT] = {MS_PARAM_WEIGHT, "weight", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_MODEL,
                         -FLT_MAX, FLT_MAX, false, false, "[-FLT_MAX, FLT_MAX]"},
    [MS_PARAM_DENSITY] = {MS_PARAM_DENSITY, "density", MS_PARAM_TYPE_NUMBER,
                          MS_PARAM_SCOPE_MODEL, 0.0, 1.0, true, false, "(0, 1]"},
    [MS_PARAM_GAMMA] = {MS_PARAM_GAMMA, "gamma", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_MODEL, 0.0,
                        1.0, false, true, "[0, 1)"},
    [MS_PARAM_EPSILON] = {MS_PARAM_EPSILON, "epsilon", MS_PARAM_TYPE_NUMBER,
                          MS_PARAM_SCOPE_MODEL, 0.0, 1.0, false, true, "[0, 1)"},
    [MS_PARAM_LAMBDA] = {MS_PARAM_LAMBDA, "lambda", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL,
                         -FLT_MAX, FLT_MAX, false, false, "[-FLT_MAX, FLT_MAX]"},
    [MS_PARAM_NORMALIZE] = {MS_PARAM_NORMALIZE, "normalize", MS_PARAM_TYPE_BOOL,
                            MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false, NULL},
    [MS_PARAM_RESCALE] = {MS_PARAM_RESCALE, "rescale", MS_PARAM_TYPE_BOOL, MS_PARAM_SCOPE_GLOBAL,
                          0.0, 1.0, false, false, NULL},
    [MS_PARAM_INT8_MASK] = {MS_PARAM_INT8_MASK, "int8_mask", MS_PARAM_TYPE_BOOL,
                            MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false, NULL},
    [MS_PARAM_T] = {MS_PARAM_T, "t", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false,
                    "[0, 1]"},
    [MS_PARAM_FILTER_WISE] = {MS_PARAM_FILTER_WISE, "filter_wise", MS_PARAM_TYPE_BOOL, MS_PARAM_SCOPE_GLOBAL,
                              0.0, 1.0, false, false, NULL},
    [MS_PARAM_NUSLERP_FLATTEN] = {MS_PARAM_NUSLERP_FLATTEN, "nuslerp_flatten", MS_PARAM_TYPE_BOOL,
                                  MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false, NULL},
    [MS_PARAM_NUSLERP_ROW_WISE] = {MS_PARAM_NUSLERP_ROW_WISE, "nuslerp_row_wise", MS_PARAM_TYPE_BOOL,
                                   MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false, NULL},
    [MS_PARAM_NORMALIZE_WEIGHTS] = {MS_PARAM_NORMALIZE_WEIGHTS, "normalize_weights", MS_PARAM_TYPE_BOOL,
                                    MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, false, NULL},
    [MS_PARAM_EPS] = {MS_PARAM_EPS, "eps", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, true, true,
                      "(0, 1)"},
    [MS_PARAM_SELECT_TOPK] = {MS_PARAM_SELECT_TOPK, "select_topk", MS_PARAM_TYPE_NUMBER,
                              MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, true, false, "(0, 1]"},
    [MS_PARAM_R] = {MS_PARAM_R, "r", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0, FLT_MAX, false, false,
                    "[0, FLT_MAX]"},
    [MS_PARAM_ALPHA] = {MS_PARAM_ALPHA, "alpha", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0, FLT_MAX,
                        false, false, "[0, FLT_MAX]"},
    [MS_PARAM_MAX_ITER] = {MS_PARAM_MAX_ITER, "max_iter", MS_PARAM_TYPE_INT, MS_PARAM_SCOPE_GLOBAL, 0.0,
                           100000.0, false, false, "[0, 100000]"},
    [MS_PARAM_TOL] = {MS_PARAM_TOL, "tol", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0, 1.0, false, true,
                      "[0, 1)"},
    [MS_PARAM_SCALE] = {MS_PARAM_SCALE, "scale", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_MODEL, -FLT_MAX, FLT_MAX,
                        false, false, "[-FLT_MAX, FLT_MAX]"},
};

/* Ranges that differ by method: nearswap's t is a positive threshold
 * (mergekit: "Threshold cannot be <= zero"), not an interpolation weight. */
static const ms_param_info k_nearswap_t = {MS_PARAM_T, "t", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL, 0.0,
                                           FLT_MAX, true, false, "(0, FLT_MAX]"};

const ms_method_info *ms_method_info_get(ms_method m)
{
    if ((unsigned)m >= MS_METHOD_COUNT)
        return NULL;
    return &k_methods[m];
}

const char *ms_method_name(ms_method m)
{
    const ms_method_info *mi = ms_method_info_get(m);
    return mi ? mi->name : "unknown";
}

ms_method_lookup_result ms_method_lookup(const char *name, ms_method *out)
{
    if (!name)
        return MS_METHOD_UNKNOWN;
    for (unsigned i = 0; i < MS_METHOD_COUNT; i++) {
        if (strcmp(name, k_methods[i].name) == 0) {
            *out = k_methods[i].method;
            return MS_METHOD_FOUND;
        }
    }
    for (size_t i = 0; i < sizeof k_unsupported / sizeof k_unsupported[0]; i++)
        if (strcmp(name, k_unsupported[i]) == 0)
            return MS_METHOD_UNSUPPORTED;
    return MS_METHOD_UNKNOWN;
}

static char g_method_names[1024];

static void join_method_names(void)
{
    size_t n = 0;
    for (unsigned i = 0; i < MS_METHOD_COUNT; i++)
        if (k_methods[i].name)
            n += (size_t)snprintf(g_method_names + n, sizeof g_method_names - n, "%s%s", n ? ", " : "",
                                  k_methods[i].name);
    MS_ASSERT(n < sizeof g_method_names);
}

const char *ms_method_names(void)
{
    /* from the table, so that no method is left out of the messages that list them */
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, join_method_names);
    return g_method_names;
}

bool ms_method_takes(ms_method m, ms_param_id p)
{
    const ms_method_info *mi = ms_method_info_get(m);
    if (!mi || (unsigned)p >= MS_PARAM_COUNT)
        return false;
    return (mi->params & P(p)) != 0;
}

bool ms_method_param_default(ms_method m, ms_param_id p, double *out)
{
    if (!ms_method_takes(m, p))
        return false;
    const ms_method_info *mi = ms_method_info_get(m);
    switch (p) {
    case MS_PARAM_WEIGHT:
        return false; /* required */
    case MS_PARAM_DENSITY:
        *out = 1.0;
        return true;
    case MS_PARAM_GAMMA:
        *out = 0.01;
        return true;
    case MS_PARAM_EPSILON: /* della's eps; ram's nonzero threshold */
        *out = m == MS_METHOD_RAM || m == MS_METHOD_RAMPLUS_TL ? 1e-5 : 0.15;
        return true;
    case MS_PARAM_LAMBDA:
        *out = 1.0;
        return true;
    case MS_PARAM_NORMALIZE:
        *out = mi->default_normalize ? 1.0 : 0.0;
        return true;
    case MS_PARAM_RESCALE:
        *out = mi->default_rescale ? 1.0 : 0.0;
        return true;
    case MS_PARAM_INT8_MASK:
    case MS_PARAM_FILTER_WISE:
    case MS_PARAM_NUSLERP_ROW_WISE:
        *out = 0.0;
        return true;
    case MS_PARAM_T:
        return false; /* required */
    case MS_PARAM_NUSLERP_FLATTEN:
    case MS_PARAM_NORMALIZE_WEIGHTS:
    case MS_PARAM_SELECT_TOPK:
    case MS_PARAM_SCALE:
        *out = 1.0;
        return true;
    case MS_PARAM_EPS:
        *out = 1e-8;
        return true;
    case MS_PARAM_R:
        *out = 0.1;
        return true;
    case MS_PARAM_ALPHA: /* ramplus_tl's alpha; regmean's off-diagonal scale */
        *out = m == MS_METHOD_REGMEAN ? 0.1 : 0.2;
        return true;
    case MS_PARAM_MAX_ITER:
        *out = 10.0;
        return true;
    case MS_PARAM_TOL:
        *out = 1e-5;
        return true;
    case MS_PARAM_COUNT:
        break;
    }
    return false;
}

const ms_param_info *ms_param_info_get(ms_param_id p)
{
    if ((unsigned)p >= MS_PARAM_COUNT)
        return NULL;
    return &k_params[p];
}

/* regmean's alpha scales the off-diagonal Gram entries: in [0, 1]. */
static const ms_param_info k_regmean_alpha = {MS_PARAM_ALPHA, "alpha", MS_PARAM_TYPE_NUMBER, MS_PARAM_SCOPE_GLOBAL,
                                              0.0, 1.0, false, false, "[0, 1]"};

const ms_param_info *ms_method_param_info(ms_method m, ms_param_id p)
{
    if (m == MS_METHOD_REGMEAN && p == MS_PARAM_ALPHA)
        return &k_regmean_alpha;
    if (m == MS_METHOD_NEARSWAP && p == MS_PARAM_T)
        return &k_nearswap_t;
    return ms_param_info_get(p);
}

void ms_method_model_count(ms_method m, unsigned *lo, unsigned *hi)
{
    const ms_method_info *mi = ms_method_info_get(m);
    *lo = mi && mi->min_models ? mi->min_models : 1;
    *hi = mi && mi->max_models ? mi->max_models : MS_MAX_MODELS;
}

bool ms_param_lookup(const char *name, ms_param_id *out)
{
    if (!name)
        return false;
    for (unsigned i = 0; i < MS_PARAM_COUNT; i++) {
        if (strcmp(name, k_params[i].name) == 0) {
            *out = k_params[i].id;
            return true;
        }
    }
    return false;
}

bool ms_param_in_range(const ms_param_info *p, double v)
{
    if (!isfinite(v))
        return false;
    if (p->type == MS_PARAM_TYPE_BOOL)
        return true;
    if (p->lo_open ? !(v > p->lo) : !(v >= p->lo))
        return false;
    if (p->hi_open ? !(v < p->hi) : !(v <= p->hi))
        return false;
    return p->type != MS_PARAM_TYPE_INT || floor(v) == v;
}
