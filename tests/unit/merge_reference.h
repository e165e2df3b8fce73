/* A slow, obviously correct re-implementation of the task-vector merges, for
 * the tests: whole tensors in memory, dtype rounding done in float64 with
 * nearbyint, selections by sorting indices, Philox written out again, fp64
 * L1 sums in the fixed blocked order, one element at a time. It follows
 * DESIGN.md and the choices documented in pipeline/merge_math.h and
 * pipeline/merge_passes.h, and shares no code with them: the fast paths must
 * match it byte for byte. */
#ifndef MS_MERGE_REFERENCE_H
#define MS_MERGE_REFERENCE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/merge_params.h"

/* ============================================================ bits */

static inline uint32_t ref_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float ref_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ======================================================= conversion */

static inline float ref_half_to_float(uint16_t h)
{
    unsigned sign = h >> 15, exp = (h >> 10) & 31u, man = h & 1023u;
    if (exp == 31) {
        if (man == 0)
            return sign ? -INFINITY : INFINITY;
        return ref_float((sign << 31) | 0x7f800000u | 0x400000u | (man << 13));
    }
    double v = exp == 0 ? ldexp((double)man, -24) : ldexp(1024.0 + man, (int)exp - 25);
    return (float)(sign ? -v : v);
}

static inline float ref_bf16_to_float(uint16_t h)
{
    unsigned sign = h >> 15, exp = (h >> 7) & 255u, man = h & 127u;
    if (exp == 255) {
        if (man == 0)
            return sign ? -INFINITY : INFINITY;
        return ref_float((sign << 31) | 0x7f800000u | 0x400000u | (man << 16));
    }
    double v = exp == 0 ? ldexp((double)man, -133) : ldexp(128.0 + man, (int)exp - 134);
    return (float)(sign ? -v : v);
}

/* |a| rounded to `prec` significant bits, with quantum at least 2^min_q,
 * ties to even (nearbyint in the default rounding mode). */
static inline double ref_round_bits(double a, int prec, int min_q)
{
    int ex;
    frexp(a, &ex); /* a in [2^(ex-1), 2^ex) */
    int q = ex - prec;
    if (q < min_q)
        q = min_q;
    return ldexp(nearbyint(ldexp(a, -q)), q);
}

static inline uint16_t ref_float_to_half(float f)
{
    uint32_t u = ref_bits(f);
    uint16_t sign = (uint16_t)((u >> 31) << 15);
    if (isnan(f))
        return (uint16_t)(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
    double a = fabs((double)f);
    if (isinf(f))
        return sign | 0x7c00u;
    if (a == 0.0)
        return sign;
    double r = ref_round_bits(a, 11, -24);
    if (r >= 65536.0)
        return sign | 0x7c00u;
    if (r < ldexp(1.0, -14))
        return (uint16_t)(sign | (uint16_t)ldexp(r, 24));
    int ex;
    frexp(r, &ex);
    unsigned e16 = (unsigned)(ex - 1 + 15);
    unsigned man = (unsigned)(ldexp(r, 10 - (ex - 1)) - 1024.0);
    return (uint16_t)(sign | (e16 << 10) | man);
}

static inline uint16_t ref_float_to_bf16(float f)
{
    uint32_t u = ref_bits(f);
    uint16_t sign = (uint16_t)((u >> 31) << 15);
    if (isnan(f))
        return (uint16_t)((u >> 16) | 0x0040u);
    double a = fabs((double)f);
    if (isinf(f))
        return sign | 0x7f80u;
    if (a == 0.0)
        return sign;
    double r = ref_round_bits(a, 8, -133);
    if (r >= ldexp(1.0, 128))
        return sign | 0x7f80u;
    int ex;
    frexp(r, &ex);
    if (r < ldexp(1.0, -126))
        return (uint16_t)(sign | (uint16_t)ldexp(r, 133));
    unsigned e8 = (unsigned)(ex - 1 + 127);
    unsigned man = (unsigned)(ldexp(r, 7 - (ex - 1)) - 128.0);
    return (uint16_t)(sign | (e8 << 7) | man);
}

static inline float ref_load(const void *buf, st_dtype dt, uint64_t i)
{
    const unsigned char *b = buf;
    if (dt == ST_F32) {
        uint32_t u;
        memcpy(&u, b + 4 * i, 4);
        return ref_float(u);
    }
    uint16_t h;
    memcpy(&h, b + 2 * i, 2);
    return dt == ST_BF16 ? ref_bf16_to_float(h) : ref_half_to_float(h);
}

/* A merged value: NaN becomes the dtype's canonical quiet NaN. */
static inline void ref_store(void *buf, st_dtype dt, uint64_t i, float v)
{
    unsigned char *b = buf;
    if (dt == ST_F32) {
        uint32_t u = isnan(v) ? 0x7fc00000u : ref_bits(v);
        memcpy(b + 4 * i, &u, 4);
        return;
    }
    uint16_t h;
    if (dt == ST_BF16)
        h = isnan(v) ? 0x7fc0u : ref_float_to_bf16(v);
    else
        h = isnan(v) ? 0x7e00u : ref_float_to_half(v);
    memcpy(b + 2 * i, &h, 2);
}

/* A test input's value: rounded to dt as it is, NaN payloads kept (the
 * cases' special values must reach the kernels unchanged). */
static inline void ref_store_input(void *buf, st_dtype dt, uint64_t i, float v)
{
    unsigned char *b = buf;
    if (dt == ST_F32) {
        memcpy(b + 4 * i, &v, 4);
    } else {
        uint16_t h = dt == ST_F16 ? ref_float_to_half(v) : ref_float_to_bf16(v);
        memcpy(b + 2 * i, &h, 2);
    }
}

static inline const char *ref_dtype_name(st_dtype dt)
{
    return dt == ST_F32 ? "F32" : dt == ST_F16 ? "F16" : dt == ST_BF16 ? "BF16" : "?";
}

static inline size_t ref_dtype_size(st_dtype dt)
{
    return dt == ST_F32 ? 4 : 2;
}

/* ========================================================== philox */

static inline void ref_philox(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t x[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
    uint32_t k[2] = {key[0], key[1]};
    for (int r = 0; r < 10; r++) {
        uint64_t a = (uint64_t)x[0] * 0xD2511F53u;
        uint64_t b = (uint64_t)x[2] * 0xCD9E8D57u;
        uint32_t y[4] = {(uint32_t)(b >> 32) ^ x[1] ^ k[0], (uint32_t)b, (uint32_t)(a >> 32) ^ x[3] ^ k[1],
                         (uint32_t)a};
        memcpy(x, y, sizeof x);
        k[0] += 0x9E3779B9u; /* the bump after the last round is never used */
        k[1] += 0xBB67AE85u;
    }
    memcpy(out, x, sizeof x);
}

static inline uint32_t ref_random_word(const uint32_t key[2], uint64_t e, unsigned model0)
{
    uint64_t g = e / 4;
    uint32_t ctr[4] = {(uint32_t)(g & 0xffffffffu), (uint32_t)(g >> 32), model0, 0};
    uint32_t out[4];
    ref_philox(ctr, key, out);
    return out[e % 4];
}

/* floor(p * 2^32) clamped to [0, 2^32]. */
static inline uint64_t ref_threshold(double p)
{
    if (isnan(p) || p <= 0.0)
        return 0;
    if (p >= 1.0)
        return 4294967296ull;
    return (uint64_t)floor(ldexp(p, 32));
}

/* ======================================================= selection */

typedef struct ref_item {
    uint32_t key;
    uint64_t index;
} ref_item;

static inline int ref_cmp_asc(const void *a, const void *b)
{
    const ref_item *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* descending by key, ties by smaller index first */
static inline int ref_cmp_desc(const void *a, const void *b)
{
    const ref_item *x = a, *y = b;
    if (x->key != y->key)
        return x->key > y->key ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static inline uint32_t ref_key(float d)
{
    return ref_bits(d) & 0x7fffffffu;
}

static inline uint64_t ref_count(double x, uint64_t n)
{
    double v = floor(x * (double)n);
    if (!(v > 0))
        return 0;
    return v >= (double)n ? n : (uint64_t)v;
}

/* keep[e] for one model's deltas d (numel n). */
static inline void ref_keep(const ms_tensor_params *p, unsigned i, const float *d, unsigned char *keep)
{
    uint64_t n = p->numel;
    double dens = p->density[i];
    if (p->sparsify == MS_SPARSIFY_NONE || dens >= 1.0) {
        memset(keep, 1, n);
        return;
    }
    memset(keep, 0, n);
    if (p->sparsify == MS_SPARSIFY_RANDOM) {
        uint64_t thr = ref_threshold(dens);
        for (uint64_t e = 0; e < n; e++)
            keep[e] = ref_random_word(p->philox_key, e, i - 1) < thr;
        return;
    }
    if (p->sparsify == MS_SPARSIFY_DELLA_MAGPRUNE) {
        if (dens <= 0.0)
            return;
        uint64_t cols = p->cols;
        ref_item *row = malloc(cols * sizeof *row);
        for (uint64_t r = 0; r < p->rows; r++) {
            for (uint64_t c = 0; c < cols; c++)
                row[c] = (ref_item){ref_key(d[r * cols + c]), c};
            qsort(row, cols, sizeof *row, ref_cmp_asc);
            for (uint64_t rank = 0; rank < cols; rank++) {
                double rank_norm = cols == 1 ? 0.0 : (double)rank / (double)(cols - 1);
                double prob = (dens - p->epsilon[i]) + (2.0 * p->epsilon[i]) * rank_norm;
                uint64_t e = r * cols + row[rank].index;
                keep[e] = ref_random_word(p->philox_key, e, i - 1) < ref_threshold(prob);
            }
        }
        free(row);
        return;
    }
    ref_item *all = malloc(n * sizeof *all);
    for (uint64_t e = 0; e < n; e++)
        all[e] = (ref_item){ref_key(d[e]), e};
    if (p->sparsify == MS_SPARSIFY_MAGNITUDE) {
        uint64_t k = ref_count(dens, n);
        qsort(all, n, sizeof *all, ref_cmp_desc);
        for (uint64_t r = 0; r < k; r++)
            keep[all[r].index] = 1;
    } else { /* magnitude_outliers */
        int64_t target = (int64_t)ref_count(dens, n);
        int64_t top = (int64_t)ref_count(p->gamma[i], n);
        int64_t bottom = (int64_t)n - target - top;
        if (bottom < 0) {
            top += bottom;
            bottom = 0;
        }
        qsort(all, n, sizeof *all, ref_cmp_asc);
        for (int64_t r = bottom; r < (int64_t)n - top; r++)
            keep[all[r].index] = 1;
    }
    free(all);
}

/* The fixed-order fp64 sum of |v[e]| (keep == NULL) or of |v[e]| over kept
 * elements: 65,536-element blocks summed in order, then the block sums. */
static inline double ref_l1(const float *v, const unsigned char *keep, uint64_t n)
{
    double total = 0.0;
    for (uint64_t b0 = 0; b0 < n; b0 += 65536) {
        double s = 0.0;
        for (uint64_t e = b0; e < n && e < b0 + 65536; e++)
            if (!keep || keep[e])
                s += fabs((double)v[e]);
        total += s;
    }
    return total;
}

/* ========================================================= combine */

static inline float ref_combine(float base, const float *W, const float *w, unsigned n, bool consensus,
                                bool normalize, float lambda)
{
    float mixed = 0.0f, div = 0.0f;
    if (consensus) {
        float s = W[0];
        for (unsigned i = 1; i < n; i++)
            s = s + W[i];
        int majority = s >= 0.0f ? 1 : -1;
        for (unsigned i = 0; i < n; i++) {
            int sign = W[i] > 0.0f ? 1 : W[i] < 0.0f ? -1 : 0;
            float m = sign == majority ? 1.0f : 0.0f;
            mixed = i == 0 ? m * W[i] : mixed + m * W[i];
            div = i == 0 ? m * w[i] : div + m * w[i];
        }
        if (div == 0.0f)
            div = 1.0f;
    } else {
        for (unsigned i = 0; i < n; i++) {
            mixed = i == 0 ? W[i] : mixed + W[i];
            div = i == 0 ? w[i] : div + w[i];
        }
        if (fabs((double)div) < 1e-8)
            div = 1.0f;
    }
    if (normalize)
        mixed = mixed / div;
    if (lambda != 1.0f)
        mixed = mixed * lambda;
    return base + mixed;
}

/* ========================================================== merge */

/* out (p->out_dtype, numel elements) = the merge of in[0] (base) and
 * in[1..n] (in_dtype[i]) with parameters p. When l1 is not NULL, l1[i][0]
 * and l1[i][1] receive model i's fp64 sums of |delta| and |tau| where the
 * model is rescaled (else they are left alone). */
static inline void ref_merge(const ms_tensor_params *p, const void *const *in, void *out, double (*l1)[2])
{
    uint64_t n = p->numel;
    unsigned nm = p->n_models;
    float *X = malloc((nm + 1) * n * sizeof(float) + 1);
    for (unsigned i = (p->method == MS_METHOD_LINEAR); i <= nm; i++)
        for (uint64_t e = 0; e < n; e++)
            X[i * n + e] = ref_load(in[i], p->in_dtype[i], e);
    const float *w = &p->weight[1];
    if (p->method == MS_METHOD_LINEAR) {
        float wsum = w[0];
        for (unsigned i = 1; i < nm; i++)
            wsum = wsum + w[i];
        for (uint64_t e = 0; e < n; e++) {
            float acc = w[0] * X[1 * n + e];
            for (unsigned i = 1; i < nm; i++)
                acc = acc + w[i] * X[(i + 1) * n + e];
            ref_store(out, p->out_dtype, e, p->normalize ? acc / wsum : acc);
        }
        free(X);
        return;
    }
    float *W = malloc(nm * n * sizeof(float) + 1);
    float *delta = malloc(n * sizeof(float) + 1);
    unsigned char *keep = malloc(n + 1);
    for (unsigned i = 1; i <= nm; i++) {
        for (uint64_t e = 0; e < n; e++) {
            float d = X[i * n + e] - X[e];
            delta[e] = isnan(d) ? ref_float(0x7fc00000u) : d;
        }
        ref_keep(p, i, delta, keep);
        float factor = 1.0f;
        if (p->rescale && p->sparsify != MS_SPARSIFY_NONE && p->density[i] < 1.0) {
            double sd = ref_l1(delta, NULL, n), st = ref_l1(delta, keep, n);
            if (l1) {
                l1[i][0] = sd;
                l1[i][1] = st;
            }
            if (!(sd < 1e-7 || st < 1e-7))
                factor = (float)(sd / st);
        }
        for (uint64_t e = 0; e < n; e++)
            W[(i - 1) * n + e] = w[i - 1] * (keep[e] ? delta[e] * factor : 0.0f);
    }
    float Wcol[MS_MAX_MODELS];
    for (uint64_t e = 0; e < n; e++) {
        for (unsigned i = 0; i < nm; i++)
            Wcol[i] = W[i * n + e];
        float v = ref_combine(X[e], Wcol, w, nm, p->consensus, p->normalize, p->lambda);
        ref_store(out, p->out_dtype, e, v);
    }
    free(keep);
    free(delta);
    free(W);
    free(X);
}

#endif
