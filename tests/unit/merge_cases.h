/* Random merge cases for the kernel tests (test_cpu_merge.c and, through
 * tests/gpu/gpu_test_cases.h, the GPU tests): a task-vector method with
 * random flags, dtypes, weights, densities and lambda, and inputs that are a
 * base plus deltas (quantised for exact ties in |delta|, of wildly different
 * magnitudes, with -0 bases and NaN/Inf specials). Uses test_rng.h's
 * generator; no cmocka asserts (the GPU fallback test's child processes use
 * these outside a cmocka runner). */
#ifndef MS_MERGE_CASES_H
#define MS_MERGE_CASES_H

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "merge_reference.h"
#include "pipeline/merge_passes.h"
#include "test_rng.h"

/* ================================================================ cases */

typedef struct method_def {
    const char *name;
    ms_method method;
    ms_sparsify sparsify;
    bool consensus, normalize, rescale; /* DESIGN.md's per-method defaults */
} method_def;

static const method_def k_methods[] = {
    {"linear", MS_METHOD_LINEAR, MS_SPARSIFY_NONE, false, true, false},
    {"task_arithmetic", MS_METHOD_TASK_ARITHMETIC, MS_SPARSIFY_NONE, false, false, false},
    {"ties", MS_METHOD_TIES, MS_SPARSIFY_MAGNITUDE, true, true, false},
    {"dare_ties", MS_METHOD_DARE_TIES, MS_SPARSIFY_RANDOM, true, false, true},
    {"dare_linear", MS_METHOD_DARE_LINEAR, MS_SPARSIFY_RANDOM, false, false, true},
    {"breadcrumbs", MS_METHOD_BREADCRUMBS, MS_SPARSIFY_MAGNITUDE_OUTLIERS, false, false, false},
    {"breadcrumbs_ties", MS_METHOD_BREADCRUMBS_TIES, MS_SPARSIFY_MAGNITUDE_OUTLIERS, true, false, false},
    {"della", MS_METHOD_DELLA, MS_SPARSIFY_DELLA_MAGPRUNE, true, true, true},
    {"della_linear", MS_METHOD_DELLA_LINEAR, MS_SPARSIFY_DELLA_MAGPRUNE, false, false, true},
};
#define N_METHODS (sizeof k_methods / sizeof k_methods[0])

static inline const method_def *method_by_name(const char *name)
{
    for (size_t k = 0; k < N_METHODS; k++)
        if (strcmp(k_methods[k].name, name) == 0)
            return &k_methods[k];
    return NULL;
}

typedef struct tcase {
    const method_def *def;
    ms_tensor_params p;
    void *in[MS_MAX_MODELS + 1];
    float *u[MS_MAX_MODELS + 1]; /* ties_sparsegpt, dare_sparsegpt: [cols] saliency coefficients, NULL: magnitude */
    float *hess[MS_MAX_MODELS + 1]; /* regmean: [cols][cols] Hessians, NULL: none (the mean) */
    bool ties, wide, specials;
} tcase;

static const st_dtype k_dtypes[3] = {ST_F32, ST_F16, ST_BF16};

/* NaNs of both signs with payloads, infinities. */
static inline float special_value(void)
{
    static const uint32_t bits[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xffa5a5a5u, 0x7f800000u, 0xff800000u};
    return ref_float(bits[rng_next() % 6]);
}

static inline double pick_density(uint64_t numel)
{
    switch (rng_next() % 7) {
    case 0:
        return 1.0;
    case 1:
        return 0.5 / (double)numel; /* k = 0 */
    case 2:
        return 1.5 / (double)numel; /* k = 1 */
    case 3:
        return ((double)numel - 0.5) / (double)numel; /* k = numel - 1 */
    default:
        return 0.02 + 0.96 * rng_unit();
    }
}

/* A random case of def's method. ties_mode: 1 = quantised inputs (many exact
 * ties in |delta|), 0 = continuous, -1 = either. out_dtype: ST_DTYPE_COUNT =
 * random. Each input's dtype is random. */
static inline void case_make(tcase *tc, const method_def *def, uint64_t rows, uint64_t cols, unsigned n_models, int ties_mode,
                      st_dtype out_dtype)
{
    memset(tc, 0, sizeof *tc);
    tc->def = def;
    ms_tensor_params *p = &tc->p;
    p->method = def->method;
    p->sparsify = def->sparsify;
    p->consensus = def->consensus;
    p->normalize = def->normalize;
    p->rescale = def->rescale;
    if (def->method != MS_METHOD_LINEAR) {
        if (rng_next() % 3 == 0)
            p->normalize = !p->normalize;
        if (rng_next() % 3 == 0)
            p->rescale = !p->rescale;
    }
    p->has_base = def->method != MS_METHOD_LINEAR;
    p->n_models = n_models;
    p->rows = rows;
    p->cols = cols;
    p->numel = rows * cols;
    p->lambda = rng_next() % 2 ? 1.0f : (float)(0.5 + rng_unit());
    p->philox_key[0] = (uint32_t)rng_next();
    p->philox_key[1] = (uint32_t)rng_next();
    p->out_dtype = out_dtype == ST_DTYPE_COUNT ? k_dtypes[rng_next() % 3] : out_dtype;
    for (unsigned i = 0; i <= n_models; i++) {
        p->in_dtype[i] = k_dtypes[rng_next() % 3];
        p->model_rows[i] = rows;
    }
    float wsum = 0;
    for (unsigned i = 1; i <= n_models; i++) {
        unsigned r = (unsigned)(rng_next() % 8);
        p->weight[i] = r == 0 ? 0.0f : r == 1 ? (float)-rng_unit() : (float)(0.1 + 1.4 * rng_unit());
        wsum += p->weight[i];
        p->density[i] = pick_density(p->numel);
        static const double gammas[] = {0.0, 0.01, 0.1, 0.7};
        p->gamma[i] = rng_next() % 5 == 0 ? rng_unit() * 0.3 : gammas[rng_next() % 4];
        if (def->sparsify == MS_SPARSIFY_DELLA_MAGPRUNE) {
            double eps = 0.02 + 0.2 * rng_unit();
            p->epsilon[i] = eps;
            p->density[i] = rng_next() % 6 == 0 ? 1.0 : eps + 1e-3 + (1.0 - 2 * eps - 2e-3) * rng_unit();
        }
    }
    if (def->method == MS_METHOD_LINEAR && fabsf(wsum) < 0.1f)
        p->weight[1] += 1.0f; /* the recipe rejects a zero sum */
    tc->ties = ties_mode < 0 ? (rng_next() % 2 != 0) : ties_mode != 0;
    tc->wide = !tc->ties && rng_next() % 3 == 0;
    tc->specials = rng_next() % 4 == 0;
    uint64_t n = p->numel;
    float *base = malloc(n * sizeof(float) + 4);
    for (uint64_t e = 0; e < n; e++)
        base[e] = tc->ties ? (float)ldexp((double)((int64_t)(rng_next() % 201) - 100), -6)
                           : (float)(0.05 * rng_gauss());
    for (uint64_t e = 0; e < n; e++)
        if (base[e] == 0.0f && (rng_next() & 1))
            base[e] = -0.0f;
    for (unsigned i = 0; i <= n_models; i++) {
        tc->in[i] = malloc(n * ref_dtype_size(p->in_dtype[i]) + 4);
        double scale = 0.002 + 0.02 * rng_unit();
        for (uint64_t e = 0; e < n; e++) {
            float v = base[e];
            if (i > 0 && tc->wide) /* magnitudes 2^-40..2^8: fp64 sums that round */
                v = v + (float)ldexp(rng_gauss(), (int)(rng_next() % 49) - 40);
            else if (i > 0)
                v = tc->ties ? v + (float)ldexp((double)((int64_t)(rng_next() % 9) - 4), -8)
                             : v + (float)(scale * rng_gauss());
            ref_store_input(tc->in[i], p->in_dtype[i], e, v);
        }
        if (tc->specials)
            for (unsigned k = 0; k < 1 + n / 500; k++)
                ref_store_input(tc->in[i], p->in_dtype[i], rng_next() % n, special_value());
    }
    free(base);
    if (def->method == MS_METHOD_LINEAR) {
        free(tc->in[0]);
        tc->in[0] = NULL;
    }
}

static inline void case_free(tcase *tc)
{
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++) {
        free(tc->in[i]);
        free(tc->u[i]);
        free(tc->hess[i]);
        tc->in[i] = NULL;
        tc->u[i] = NULL;
        tc->hess[i] = NULL;
    }
}

static inline void case_describe(const tcase *tc, char *buf, size_t len)
{
    const ms_tensor_params *p = &tc->p;
    int o = snprintf(buf, len,
                     "%s rows=%" PRIu64 " cols=%" PRIu64 " n=%u base=%s out=%s cons=%d norm=%d resc=%d lambda=%g "
                     "ties=%d wide=%d specials=%d key=%08" PRIx32 ":%08" PRIx32 ":",
                     tc->def->name, p->rows, p->cols, p->n_models, ref_dtype_name(p->in_dtype[0]),
                     ref_dtype_name(p->out_dtype), p->consensus, p->normalize, p->rescale, (double)p->lambda, tc->ties,
                     tc->wide, tc->specials, p->philox_key[0], p->philox_key[1]);
    for (unsigned i = 1; i <= p->n_models && o > 0 && (size_t)o < len; i++)
        o += snprintf(buf + o, len - (size_t)o, " [w=%g d=%.9g g=%g eps=%g in=%s]", (double)p->weight[i],
                      p->density[i], p->gamma[i], p->epsilon[i], ref_dtype_name(p->in_dtype[i]));
}

#endif
