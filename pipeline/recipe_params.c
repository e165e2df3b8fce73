/* Per-tensor resolution of recipe parameters: gradients over the layer index,
 * {filter, value} lists, model -> top level -> default precedence, and the
 * range checks that can only be done once the tensor is known (recipe.h). */
#include "pipeline/recipe.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "pipeline/merge_math.h"

/* Where a resolved value came from. */
typedef struct recipe_source {
    unsigned line;   /* line of the value used; 0 = the method default */
    bool from_model; /* models[i].parameters rather than the slice's or the top level */
} recipe_source;

static int recipe_fail(const ms_recipe *r, unsigned line, ms_error *err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int recipe_fail(const ms_recipe *r, unsigned line, ms_error *err, const char *fmt, ...)
{
    char where[512];
    char msg[1024];
    snprintf(where, sizeof where, "%s:%u", r->source_path, line ? line : 1);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ms_error_set(err, MS_EXIT_USAGE, where, "%s", msg);
}

double ms_recipe_tensor_t(const char *tensor_name, unsigned num_hidden_layers)
{
    if (!tensor_name || num_hidden_layers <= 1)
        return 0.0;
    static const char k_tag[] = "layers.";
    for (const char *s = strstr(tensor_name, k_tag); s; s = strstr(s + 1, k_tag)) {
        if (s != tensor_name && s[-1] != '.')
            continue;
        const char *d = s + sizeof k_tag - 1;
        if (!isdigit((unsigned char)*d))
            continue;
        uint64_t n = 0;
        bool huge = false;
        for (; isdigit((unsigned char)*d); d++) {
            if (n > (UINT64_MAX - 9) / 10)
                huge = true;
            else
                n = n * 10 + (uint64_t)(*d - '0');
        }
        if (*d != '.')
            continue;
        uint64_t last = num_hidden_layers - 1;
        if (huge || n >= last)
            return 1.0; /* beyond the last layer (e.g. an MTP layer): the gradient's end */
        return (double)n / (double)last;
    }
    return 0.0;
}

/* mergekit's interpolation, in fp64, clamped to the two points it mixes. */
static double recipe_value_at(const ms_recipe_value *v, double t)
{
    MS_ASSERT(v->n_points >= 1 && v->points);
    if (v->n_points == 1)
        return v->points[0];
    unsigned last = v->n_points - 1;
    double s = t * (double)last;
    unsigned i0 = s <= 0.0 ? 0 : (unsigned)s;
    if (i0 > last)
        i0 = last;
    unsigned i1 = i0 < last ? i0 + 1 : last;
    double f = s - (double)i0;
    double a = v->points[i0], b = v->points[i1];
    double x = (1.0 - f) * a + f * b;
    double lo = a < b ? a : b, hi = a < b ? b : a;
    if (x < lo)
        x = lo;
    if (x > hi)
        x = hi;
    return x;
}

/* One level (a model's or the top level). True with *out when it applies to
 * tensor_name; false when the key is absent or its filters match nothing. */
static bool recipe_param_at(const ms_recipe_param *p, const char *tensor_name, double t,
                            double *out, unsigned *line)
{
    if (!p->present)
        return false;
    if (p->n_conds == 0) {
        *out = recipe_value_at(&p->value, t);
        *line = p->value.line;
        return true;
    }
    for (unsigned i = 0; i < p->n_conds; i++) {
        const ms_recipe_cond *c = &p->conds[i];
        if (!c->filter || strcmp(c->filter, "*") == 0 ||
            (tensor_name && strstr(tensor_name, c->filter))) {
            *out = recipe_value_at(&c->value, t);
            *line = c->value.line;
            return true;
        }
    }
    return false;
}

/* The slice whose parameters sit between m's and the top level's: m's
 * slice with slices, else none. */
static const ms_recipe_slice *recipe_model_slice(const ms_recipe *r, const ms_recipe_model *m)
{
    return r->has_slices && m ? &r->slices[m->slice] : NULL;
}

/* mergekit's ConfigReader.parameter order: the model's (a slice source's)
 * own parameters, then its slice's, then the top level's, then the method's
 * default. m is NULL for global parameters, sl NULL without slices. A level
 * whose filters match nothing falls through to the next. False when no
 * level applies and the method has no default (weight). */
static bool recipe_resolve(const ms_recipe *r, const ms_recipe_slice *sl, const ms_recipe_model *m,
                           ms_param_id id, const char *tensor_name, double t, double *out, recipe_source *src)
{
    src->line = 0;
    src->from_model = false;
    if (m && recipe_param_at(&m->params[id], tensor_name, t, out, &src->line)) {
        src->from_model = true;
        return true;
    }
    if (sl && recipe_param_at(&sl->params[id], tensor_name, t, out, &src->line))
        return true;
    if (recipe_param_at(&r->params[id], tensor_name, t, out, &src->line))
        return true;
    return ms_method_param_default(r->method, id, out);
}

/* True when the value used for m does not depend on the tensor: the first
 * level present (m's, its slice's, the top level's) is a scalar (or a
 * one-point gradient), or there is none. */
static bool recipe_param_is_constant(const ms_recipe *r, const ms_recipe_model *m, ms_param_id id)
{
    const ms_recipe_slice *sl = recipe_model_slice(r, m);
    const ms_recipe_param *p = m->params[id].present             ? &m->params[id]
                               : sl && sl->params[id].present ? &sl->params[id]
                                                                : &r->params[id];
    if (!p->present)
        return true;
    return p->n_conds == 0 && p->value.n_points == 1;
}

static unsigned recipe_source_line(const ms_recipe *r, const ms_recipe_model *m,
                                   recipe_source src)
{
    if (src.line)
        return src.line;
    return m ? m->line : r->method_line;
}

static int recipe_check_range(const ms_recipe *r, const ms_recipe_model *m, ms_param_id id,
                              const char *tensor_name, double v, recipe_source src,
                              ms_error *err)
{
    const ms_param_info *pi = ms_method_param_info(r->method, id);
    if (ms_param_in_range(pi, v))
        return 0;
    char who[600] = "";
    if (m)
        snprintf(who, sizeof who, " for %s ('%s')", m->label, m->name);
    return recipe_fail(r, recipe_source_line(r, m, src), err,
                       "%s is %g%s on tensor '%s': it must be in %s", pi->name, v, who,
                       tensor_name, pi->range ? pi->range : "range");
}

/* della: keep probabilities run from d - eps to d + eps, which must stay
 * strictly inside (0, 1) (DESIGN.md, Method semantics). */
static int recipe_check_della(const ms_recipe *r, const ms_recipe_model *m, double d,
                              recipe_source dsrc, double eps, recipe_source esrc,
                              const char *tensor_name, ms_error *err)
{
    double lo = d - eps, hi = d + eps;
    if (lo > 0.0 && hi < 1.0)
        return 0;
    unsigned line = dsrc.line ? dsrc.line : esrc.line ? esrc.line : m->line;
    char on[600] = "";
    if (tensor_name)
        snprintf(on, sizeof on, " on tensor '%s'", tensor_name);
    return recipe_fail(r, line, err,
                       "%s needs density - epsilon > 0 and density + epsilon < 1, but "
                       "%s ('%s') has density %g%s and epsilon %g%s%s, giving [%g, %g]%s",
                       ms_method_name(r->method), m->label, m->name, d,
                       dsrc.line ? "" : " (default)", eps, esrc.line ? "" : " (default)", on,
                       lo, hi, dsrc.line ? "" : "; set a density below 1 - epsilon");
}

int ms_recipe_check_constants(const ms_recipe *r, ms_error *err)
{
    const ms_method_info *mi = ms_method_info_get(r->method);
    MS_ASSERT(mi);
    if (mi->sparsify != MS_SPARSIFY_DELLA_MAGPRUNE)
        return 0;
    for (unsigned i = 0; i < r->n_models; i++) {
        const ms_recipe_model *m = &r->models[i];
        if (!recipe_param_is_constant(r, m, MS_PARAM_DENSITY) ||
            !recipe_param_is_constant(r, m, MS_PARAM_EPSILON))
            continue;
        double d = 0, eps = 0;
        recipe_source dsrc, esrc;
        const ms_recipe_slice *sl = recipe_model_slice(r, m);
        bool got_d = recipe_resolve(r, sl, m, MS_PARAM_DENSITY, NULL, 0.0, &d, &dsrc);
        bool got_e = recipe_resolve(r, sl, m, MS_PARAM_EPSILON, NULL, 0.0, &eps, &esrc);
        MS_ASSERT(got_d && got_e);
        if (recipe_check_della(r, m, d, dsrc, eps, esrc, NULL, err) < 0)
            return -1;
    }
    return 0;
}

/* Resolves a parameter the method takes and that has a default. */
static int recipe_resolve_checked(const ms_recipe *r, const ms_recipe_slice *sl, const ms_recipe_model *m,
                                  ms_param_id id, const char *tensor_name, double t, double *out,
                                  recipe_source *src, ms_error *err)
{
    bool got = recipe_resolve(r, sl, m, id, tensor_name, t, out, src);
    MS_ASSERT(got);
    return recipe_check_range(r, m, id, tensor_name, *out, *src, err);
}

/* A global parameter the method takes, resolved and range-checked; false
 * in *taken when the method does not take it (out untouched). A required
 * parameter (no default) whose filters match nothing for this tensor is an
 * error naming its line and the tensor. */
static int recipe_global(const ms_recipe *r, const ms_recipe_slice *sl, ms_param_id id, const char *tensor_name,
                         double t, double *out, bool *taken, ms_error *err)
{
    *taken = ms_method_takes(r->method, id);
    if (!*taken)
        return 0;
    recipe_source src;
    if (!recipe_resolve(r, sl, NULL, id, tensor_name, t, out, &src)) {
        const ms_param_info *pi = ms_param_info_get(id);
        unsigned line = sl && sl->params[id].present ? sl->params[id].line
                        : r->params[id].present     ? r->params[id].line
                                                    : r->method_line;
        return recipe_fail(r, line, err,
                           "no %s on tensor '%s': its filters match nothing and there is no fallback entry",
                           pi->name, tensor_name);
    }
    return recipe_check_range(r, NULL, id, tensor_name, *out, src, err);
}

/* The interpolation and model-soup methods' global parameters. */
static int recipe_interp_params(const ms_recipe *r, const ms_recipe_slice *sl, const char *tensor_name, double t,
                                ms_tensor_params *out, ms_error *err)
{
    double v = 0;
    bool taken;
    if (recipe_global(r, sl, MS_PARAM_T, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->t = taken ? v : 0.0;
    if (recipe_global(r, sl, MS_PARAM_FILTER_WISE, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->filter_wise = taken && v != 0.0;
    if (recipe_global(r, sl, MS_PARAM_NUSLERP_FLATTEN, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->nuslerp_flatten = taken && v != 0.0;
    if (recipe_global(r, sl, MS_PARAM_NUSLERP_ROW_WISE, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->nuslerp_row_wise = taken && v != 0.0;
    if (recipe_global(r, sl, MS_PARAM_NORMALIZE_WEIGHTS, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->normalize_weights = taken && v != 0.0;
    if (recipe_global(r, sl, MS_PARAM_EPS, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->eps = taken ? v : 0.0;
    if (recipe_global(r, sl, MS_PARAM_SELECT_TOPK, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->select_topk = taken ? v : 0.0;
    if (recipe_global(r, sl, MS_PARAM_R, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->ram_r = taken ? v : 0.0;
    if (recipe_global(r, sl, MS_PARAM_ALPHA, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->ram_alpha = taken ? v : 0.0;
    if (r->method == MS_METHOD_REGMEAN) { /* the same recipe key, regmean's meaning */
        out->regmean_alpha = out->ram_alpha;
        out->ram_alpha = 0.0;
    }
    if (recipe_global(r, sl, MS_PARAM_MAX_ITER, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->max_iter = taken ? (unsigned)v : 0;
    if (recipe_global(r, sl, MS_PARAM_TOL, tensor_name, t, &v, &taken, err) < 0)
        return -1;
    out->tol = taken ? v : 0.0;
    return 0;
}

/* The body of ms_recipe_tensor_params and ms_recipe_slice_tensor_params:
 * the merged models are models[0..n_models), of slice sl (NULL without
 * slices); per-model parameters match against src_names[i] (NULL:
 * tensor_name) at every level, global ones against tensor_name. */
static int recipe_fill_params(const ms_recipe *r, const ms_recipe_slice *sl, const ms_recipe_model *models,
                              unsigned n_models, const char *tensor_name, const char *const *src_names, double t,
                              ms_tensor_params *out, ms_error *err)
{
    memset(out, 0, sizeof *out);
    const ms_method_info *mi = ms_method_info_get(r->method);
    MS_ASSERT(mi);
    MS_ASSERT(n_models >= 1 && n_models <= MS_MAX_MODELS);
    MS_ASSERT(tensor_name);

    out->method = r->method;
    out->sparsify = mi->sparsify;
    out->consensus = mi->consensus;
    /* a slice's base: its own base_model or the top-level one, when it lists it (recipe.c) */
    out->has_base = sl ? sl->has_base : mi->needs_base || (mi->optional_base && r->base_path);
    out->n_models = n_models;

    double v = 0;
    recipe_source src;
    out->normalize = false;
    if (ms_method_takes(r->method, MS_PARAM_NORMALIZE)) {
        if (recipe_resolve_checked(r, sl, NULL, MS_PARAM_NORMALIZE, tensor_name, t, &v, &src, err) < 0)
            return -1;
        out->normalize = v != 0.0;
    }
    if (recipe_interp_params(r, sl, tensor_name, t, out, err) < 0)
        return -1;
    out->rescale = false;
    if (ms_method_takes(r->method, MS_PARAM_RESCALE)) {
        if (recipe_resolve_checked(r, sl, NULL, MS_PARAM_RESCALE, tensor_name, t, &v, &src, err) < 0)
            return -1;
        out->rescale = v != 0.0;
    }
    out->lambda = 1.0f;
    if (ms_method_takes(r->method, MS_PARAM_LAMBDA)) {
        if (recipe_resolve_checked(r, sl, NULL, MS_PARAM_LAMBDA, tensor_name, t, &v, &src, err) < 0)
            return -1;
        out->lambda = (float)v;
    }

    for (unsigned i = 0; i < n_models; i++) {
        const ms_recipe_model *m = &models[i];
        unsigned slot = i + 1;
        const char *mname = src_names && src_names[i] ? src_names[i] : tensor_name; /* per-model filters */

        if (!ms_method_takes(r->method, MS_PARAM_WEIGHT)) {
            out->weight[slot] = 1.0f; /* unused by the method */
        } else if (!recipe_resolve(r, sl, m, MS_PARAM_WEIGHT, mname, t, &v, &src)) {
            return recipe_fail(r, m->line, err,
                               "no weight for %s ('%s') on tensor '%s': its filters "
                               "match nothing and there is no fallback entry or %s weight",
                               m->label, m->name, mname, sl ? "slice or top-level" : "top-level");
        } else {
            if (recipe_check_range(r, m, MS_PARAM_WEIGHT, mname, v, src, err) < 0)
                return -1;
            out->weight[slot] = (float)v;
        }

        out->density[slot] = 1.0;
        recipe_source dsrc = {0, false};
        if (ms_method_takes(r->method, MS_PARAM_DENSITY) &&
            recipe_resolve_checked(r, sl, m, MS_PARAM_DENSITY, mname, t, &out->density[slot],
                                   &dsrc, err) < 0)
            return -1;

        out->gamma[slot] = 0.0;
        if (ms_method_takes(r->method, MS_PARAM_GAMMA) &&
            recipe_resolve_checked(r, sl, m, MS_PARAM_GAMMA, mname, t, &out->gamma[slot], &src,
                                   err) < 0)
            return -1;

        out->epsilon[slot] = 0.0;
        if (ms_method_takes(r->method, MS_PARAM_EPSILON)) {
            recipe_source esrc;
            if (recipe_resolve_checked(r, sl, m, MS_PARAM_EPSILON, mname, t,
                                       &out->epsilon[slot], &esrc, err) < 0)
                return -1;
            if (mi->sparsify == MS_SPARSIFY_DELLA_MAGPRUNE &&
                recipe_check_della(r, m, out->density[slot], dsrc, out->epsilon[slot], esrc,
                                   mname, err) < 0)
                return -1;
        }
    }
    if (r->method == MS_METHOD_LINEAR && out->normalize) {
        /* DESIGN.md: a zero sum is an error (the kernels divide by this very float sum) */
        float wsum = ms_merge_weight_sum(&out->weight[1], out->n_models);
        if (wsum == 0.0f)
            return recipe_fail(r, models[0].line, err,
                               "the weights of merge_method 'linear' sum to 0 on tensor '%s'; with normalize "
                               "(the default) they are divided by their sum: change a weight or set "
                               "normalize: false",
                               tensor_name);
    }
    if (r->method == MS_METHOD_MULTISLERP && out->normalize_weights) {
        /* mergekit divides by the sum: a zero sum would make every weight infinite */
        double wsum = 0.0;
        for (unsigned i = 1; i <= out->n_models; i++)
            wsum += (double)out->weight[i];
        if (fabs(wsum) < 1e-8)
            return recipe_fail(r, models[0].line, err,
                               "the weights of merge_method 'multislerp' sum to %g on tensor '%s'; with "
                               "normalize_weights they must not sum to 0",
                               wsum, tensor_name);
    }
    return 0;
}

int ms_recipe_tensor_params(const ms_recipe *r, const char *tensor_name,
                            unsigned num_hidden_layers, ms_tensor_params *out, ms_error *err)
{
    MS_ASSERT(tensor_name);
    return recipe_fill_params(r, NULL, r->models, r->n_models, tensor_name, NULL,
                              ms_recipe_tensor_t(tensor_name, num_hidden_layers), out, err);
}

int ms_recipe_slice_tensor_params(const ms_recipe *r, unsigned slice, const char *out_name,
                                  const char *const *src_names, double t, ms_tensor_params *out,
                                  ms_error *err)
{
    MS_ASSERT(r->has_slices && slice < r->n_slices && out_name && t >= 0.0 && t <= 1.0);
    const ms_recipe_slice *sl = &r->slices[slice];
    MS_ASSERT(sl->first_model + sl->n_models <= r->n_models);
    return recipe_fill_params(r, sl, r->models + sl->first_model, sl->n_models, out_name, src_names, t, out,
                              err);
}

int ms_recipe_model_param_at(const ms_recipe *r, unsigned model, ms_param_id id, const char *tensor_name, double t,
                             double *out, ms_error *err)
{
    MS_ASSERT(model < r->n_models && ms_method_takes(r->method, id) && t >= 0.0 && t <= 1.0);
    recipe_source src;
    const ms_recipe_model *m = &r->models[model];
    return recipe_resolve_checked(r, recipe_model_slice(r, m), m, id, tensor_name, t, out, &src, err);
}

int ms_recipe_model_param(const ms_recipe *r, unsigned model, ms_param_id id, const char *tensor_name,
                          unsigned num_hidden_layers, double *out, ms_error *err)
{
    return ms_recipe_model_param_at(r, model, id, tensor_name, ms_recipe_tensor_t(tensor_name, num_hidden_layers),
                                    out, err);
}
