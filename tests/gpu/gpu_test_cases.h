/* Shared by the GPU tests (test_gpu_merge.c, test_gpu_fallback.c): random
 * merge cases built like tests/unit/test_cpu_merge.c's, chunk helpers, the
 * CPU-only run, and comparisons of merge states and outputs that say exactly
 * what differs. No cmocka asserts here: the fallback test's child processes
 * use these outside a cmocka runner. Include only with MERGESTREAM_HAVE_CUDA. */
#ifndef MS_GPU_TEST_CASES_H
#define MS_GPU_TEST_CASES_H

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/merge_reference.h"
#include "cpu/cpu_merge.h"
#include "cpu/cpu_pool.h"
#include "gpu/gpu_backend.h"
#include "pipeline/merge_passes.h"

/* =============================================================== random */

#include "../unit/test_rng.h"

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
    bool ties, wide, specials;
} tcase;

static const st_dtype k_dtypes[3] = {ST_F32, ST_F16, ST_BF16};

static inline const char *dtype_name(st_dtype dt)
{
    return dt == ST_F32 ? "F32" : dt == ST_F16 ? "F16" : dt == ST_BF16 ? "BF16" : "?";
}

static inline void store_value(void *buf, st_dtype dt, uint64_t e, float v)
{
    unsigned char *b = buf;
    if (dt == ST_F32) {
        memcpy(b + 4 * e, &v, 4);
    } else {
        uint16_t h = dt == ST_F16 ? ref_float_to_half(v) : ref_float_to_bf16(v);
        memcpy(b + 2 * e, &h, 2);
    }
}

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
            store_value(tc->in[i], p->in_dtype[i], e, v);
        }
        if (tc->specials)
            for (unsigned k = 0; k < 1 + n / 500; k++)
                store_value(tc->in[i], p->in_dtype[i], rng_next() % n, special_value());
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
        tc->in[i] = NULL;
    }
}

static inline void case_describe(const tcase *tc, char *buf, size_t len)
{
    const ms_tensor_params *p = &tc->p;
    int o = snprintf(buf, len,
                     "%s rows=%" PRIu64 " cols=%" PRIu64 " n=%u base=%s out=%s cons=%d norm=%d resc=%d lambda=%g "
                     "ties=%d wide=%d specials=%d key=%08" PRIx32 ":%08" PRIx32 ":",
                     tc->def->name, p->rows, p->cols, p->n_models, dtype_name(p->in_dtype[0]),
                     dtype_name(p->out_dtype), p->consensus, p->normalize, p->rescale, (double)p->lambda, tc->ties,
                     tc->wide, tc->specials, p->philox_key[0], p->philox_key[1]);
    for (unsigned i = 1; i <= p->n_models && o > 0 && (size_t)o < len; i++)
        o += snprintf(buf + o, len - (size_t)o, " [w=%g d=%.9g g=%g eps=%g in=%s]", (double)p->weight[i],
                      p->density[i], p->gamma[i], p->epsilon[i], dtype_name(p->in_dtype[i]));
}

/* The chunk of rows [row0, row0 + n_rows) with output into out (the whole
 * tensor's output buffer). */
static inline ms_chunk case_chunk(const tcase *tc, uint64_t row0, uint64_t n_rows, void *out)
{
    const ms_tensor_params *p = &tc->p;
    ms_chunk c;
    memset(&c, 0, sizeof c);
    c.row0 = row0;
    c.n_rows = n_rows;
    c.elem0 = row0 * p->cols;
    c.n_elems = n_rows * p->cols;
    for (unsigned i = 0; i <= p->n_models; i++)
        c.in[i] = tc->in[i] ? (const unsigned char *)tc->in[i] + c.elem0 * ref_dtype_size(p->in_dtype[i]) : NULL;
    c.out = (unsigned char *)out + c.elem0 * ref_dtype_size(p->out_dtype);
    return c;
}

/* Rows of the next chunk starting at row r: everything left, or a random
 * count (often small, so chunks start and end inside 65,536-element blocks
 * and eq_pos segments). */
static inline uint64_t pick_rows(const tcase *tc, uint64_t r, bool chunked)
{
    uint64_t left = tc->p.rows - r;
    if (!chunked || left <= 1)
        return left;
    uint64_t cap = rng_next() % 2 ? left : 1 + tc->p.rows / 4;
    return 1 + rng_next() % (cap < left ? cap : left);
}

static inline const char *pass_kind_name(ms_merge_pass_kind k)
{
    switch (k) {
    case MS_MERGE_PASS_HIST_HI:
        return "HIST_HI";
    case MS_MERGE_PASS_HIST_LO:
        return "HIST_LO";
    case MS_MERGE_PASS_L1:
        return "L1";
    case MS_MERGE_PASS_APPLY:
        return "APPLY";
    default:
        return "an interpolation pass";
    }
}

static inline const char *sel_name(ms_merge_sel s)
{
    static const char *const names[] = {"ALL", "NONE", "RANDOM", "TOP", "BAND", "DELLA"};
    return (unsigned)s < 6 ? names[s] : "?";
}

/* The whole tensor on the CPU, every pass (chunked: random row chunks). */
static inline bool run_cpu_only(const tcase *tc, void *out, cpu_pool *pool, bool chunked)
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    if (ms_merge_state_open(p, &st) != 0)
        return false;
    bool ok = true;
    for (unsigned pass = 0; pass < st->n_passes && ok; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = pick_rows(tc, r, chunked);
            ms_chunk c = case_chunk(tc, r, nr, out);
            ok = ok && cpu_merge_run_pass(p, st, pass, &c, pool) == 0;
            r += nr;
        } while (r < p->rows && ok);
        if (ok)
            ms_merge_pass_finish(st, p, pass);
    }
    ms_merge_state_close(st);
    return ok;
}

/* ========================================================= comparisons */

static inline bool same_double(double a, double b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

static inline bool same_float(float a, float b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

/* First difference between two states (want: the CPU's) into why; false
 * when they are equal. */
static inline bool state_diff(const ms_merge_state *want, const ms_merge_state *got, const ms_tensor_params *p, char *why,
                       size_t len)
{
#define SD_U64(field, what, ...)                                                                           \
    do {                                                                                                   \
        if ((uint64_t)(want->field) != (uint64_t)(got->field)) {                                           \
            int o_ = snprintf(why, len, what, __VA_ARGS__);                                                \
            if (o_ >= 0 && (size_t)o_ < len)                                                               \
                snprintf(why + o_, len - (size_t)o_, " is %" PRIu64 ", the CPU has %" PRIu64,              \
                         (uint64_t)(got->field), (uint64_t)(want->field));                                 \
            return true;                                                                                   \
        }                                                                                                  \
    } while (0)
    SD_U64(next_elem, "%s", "next_elem");
    SD_U64(any_split, "%s", "any_split");
    SD_U64(n_passes, "%s", "n_passes");
    for (unsigned i = 1; i <= p->n_models; i++) {
        const ms_merge_model *a = &want->model[i], *b = &got->model[i];
        SD_U64(model[i].sel, "model %u sel", i);
        SD_U64(model[i].rescale, "model %u rescale", i);
        for (unsigned bd = 0; bd < 2; bd++) {
            SD_U64(model[i].bound[bd].bin, "model %u bound %u bin", i, bd);
            SD_U64(model[i].bound[bd].n_below_bin, "model %u bound %u n_below_bin", i, bd);
            SD_U64(model[i].bound[bd].key, "model %u bound %u key", i, bd);
            SD_U64(model[i].bound[bd].n_less, "model %u bound %u n_less", i, bd);
            SD_U64(model[i].bound[bd].n_eq, "model %u bound %u n_eq", i, bd);
            SD_U64(model[i].bound[bd].take, "model %u bound %u take", i, bd);
            SD_U64(model[i].bound[bd].split, "model %u bound %u split", i, bd);
            SD_U64(model[i].bound[bd].eq_seen, "model %u bound %u eq_seen (tie rule position)", i, bd);
            if (a->bound[bd].hist_lo && b->bound[bd].hist_lo)
                for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                    if (a->bound[bd].hist_lo[k] != b->bound[bd].hist_lo[k]) {
                        snprintf(why, len, "model %u bound %u hist_lo[0x%04" PRIx32 "] is %" PRIu64
                                 ", the CPU has %" PRIu64, i, bd, k, b->bound[bd].hist_lo[k], a->bound[bd].hist_lo[k]);
                        return true;
                    }
        }
        if (a->hist_hi && b->hist_hi)
            for (uint32_t k = 0; k < MS_MERGE_HI_BINS; k++)
                if (a->hist_hi[k] != b->hist_hi[k]) {
                    snprintf(why, len, "model %u hist_hi[0x%04" PRIx32 "] is %" PRIu64 ", the CPU has %" PRIu64, i, k,
                             b->hist_hi[k], a->hist_hi[k]);
                    return true;
                }
        const double *da[4] = {&a->l1_delta, &a->l1_tau, &a->blk_delta, &a->blk_tau};
        const double *db[4] = {&b->l1_delta, &b->l1_tau, &b->blk_delta, &b->blk_tau};
        static const char *const dn[4] = {"l1_delta", "l1_tau", "blk_delta (open L1 block)", "blk_tau (open L1 block)"};
        for (int k = 0; k < 4; k++)
            if (!same_double(*da[k], *db[k])) {
                snprintf(why, len, "model %u %s is %.17g, the CPU has %.17g", i, dn[k], *db[k], *da[k]);
                return true;
            }
        if (!same_float(a->factor, b->factor)) {
            snprintf(why, len, "model %u factor is %.9g, the CPU has %.9g", i, (double)b->factor, (double)a->factor);
            return true;
        }
    }
#undef SD_U64
    return false;
}

/* First differing element of two output ranges of n elements of dtype dt
 * (element numbers counted from first); false when equal. */
static inline bool output_diff(const void *want, const void *got, st_dtype dt, uint64_t first, uint64_t n, char *why,
                        size_t len)
{
    size_t osz = ref_dtype_size(dt);
    if (memcmp(want, got, n * osz) == 0)
        return false;
    uint64_t e = 0;
    while (memcmp((const char *)got + e * osz, (const char *)want + e * osz, osz) == 0)
        e++;
    uint32_t g = 0, w = 0;
    memcpy(&g, (const char *)got + e * osz, osz);
    memcpy(&w, (const char *)want + e * osz, osz);
    uint64_t count = 0;
    for (uint64_t k = e; k < n; k++)
        count += memcmp((const char *)got + k * osz, (const char *)want + k * osz, osz) != 0;
    snprintf(why, len, "output element %" PRIu64 " (%s) is 0x%0*" PRIx32 ", the CPU wrote 0x%0*" PRIx32
             " (%" PRIu64 " of %" PRIu64 " elements differ)", first + e, dtype_name(dt), (int)(2 * osz), g,
             (int)(2 * osz), w, count, n);
    return true;
}

/* A copy of a state and its histograms, to show a failed call left it alone. */
typedef struct state_snap {
    ms_merge_state st;
    uint64_t *hist;
    uint64_t words;
} state_snap;

static inline bool snap_take(state_snap *s, const ms_merge_state *st, const ms_tensor_params *p)
{
    memcpy(&s->st, st, sizeof *st); /* padding included: snap_equal compares bytes */
    s->words = 0; /* the histograms: hist_mem holds them all, in this order */
    for (unsigned i = 1; i <= p->n_models; i++) {
        s->words += st->model[i].hist_hi ? MS_MERGE_HI_BINS : 0;
        for (unsigned bd = 0; bd < 2; bd++)
            s->words += st->model[i].bound[bd].hist_lo ? MS_MERGE_LO_BINS : 0;
    }
    s->hist = NULL;
    if (s->words) {
        s->hist = malloc(s->words * sizeof(uint64_t));
        if (!s->hist)
            return false;
        memcpy(s->hist, st->hist_mem, s->words * sizeof(uint64_t));
    }
    return true;
}

static inline bool snap_equal(const state_snap *s, const ms_merge_state *st)
{
    if (memcmp(&s->st, st, sizeof *st) != 0)
        return false;
    return s->words == 0 || memcmp(s->hist, st->hist_mem, s->words * sizeof(uint64_t)) == 0;
}

static inline void snap_free(state_snap *s)
{
    free(s->hist);
    s->hist = NULL;
}

#endif
