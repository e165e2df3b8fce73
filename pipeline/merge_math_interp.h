/* The arithmetic of the interpolation and model-soup merge methods (slerp,
 * nuslerp, multislerp, karcher, model_stock, nearswap, sce, ram, ramplus_tl,
 * arcee_fusion), written once for both backends like pipeline/merge_math.h,
 * whose rules hold here too: `static inline` and MS_HD, fp32 element
 * arithmetic without FMA contraction, sums over models in recipe order
 * starting from the first term, fp64 only where stated. The methods'
 * semantics and every choice made against mergekit are described in
 * pipeline/merge_passes_interp.h.
 *
 * Transcendental functions: exp and log on elements (arcee_fusion's
 * softmax and KL divergence) are the polynomial ms_interp_exp / ms_interp_log
 * below, built from +, -, *, / and exact scalings only, so the CPU and CUDA
 * builds produce the same bits (libm's and CUDA's exp differ in the last
 * place). acos and sin only ever run on the host, in the step between two
 * passes (merge_passes_interp.c), so they may be libm's. */
#ifndef MS_MERGE_MATH_INTERP_H
#define MS_MERGE_MATH_INTERP_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pipeline/merge_math.h"

/* ================================================================ bits */

MS_HD static inline uint64_t ms_f64_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

MS_HD static inline double ms_f64_from_bits(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* ======================================================== exp and log */

/* exp(x) in fp64, within about 2 ulp. NaN gives NaN, x > 709.78 gives +Inf.
 * Arguments below -700 give exactly 0: the only caller (a softmax: x is
 * an element minus the row's maximum, whose own term is 1) adds the result
 * to a sum of at least 1 and to 1e-8, where anything below 1e-304 vanishes
 * without a trace. Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a
 * degree-13 Taylor polynomial for exp(r) by Horner, then an exact scaling
 * by 2^k built from the exponent bits. */
MS_HD static inline double ms_interp_exp(double x)
{
    if (x != x)
        return x;
    if (x > 709.78)
        return ms_f64_from_bits(0x7ff0000000000000ull);
    if (x < -700.0)
        return 0.0;
    const double log2e = 1.4426950408889634;
    const double ln2_hi = 6.93147180369123816490e-01; /* 21 trailing zero bits: k * ln2_hi is exact */
    const double ln2_lo = 1.90821492927058770002e-10;
    double k = x * log2e + 0.5;
    double kf = (double)(int64_t)k;
    if (kf > k) /* floor: int64_t truncates toward 0 */
        kf = kf - 1.0;
    double r = (x - kf * ln2_hi) - kf * ln2_lo;
    double p = 1.6059043836821613e-10;
    p = 2.08767569878681e-09 + r * p;
    p = 2.505210838544172e-08 + r * p;
    p = 2.755731922398589e-07 + r * p;
    p = 2.7557319223985893e-06 + r * p;
    p = 2.48015873015873e-05 + r * p;
    p = 0.0001984126984126984 + r * p;
    p = 0.001388888888888889 + r * p;
    p = 0.008333333333333333 + r * p;
    p = 0.041666666666666664 + r * p;
    p = 0.16666666666666666 + r * p;
    p = 0.5 + r * p;
    p = 1.0 + r * p;
    p = 1.0 + r * p;
    /* 2^k as two exact factors (k in [-1010, 1024]: each half is a normal power of two) */
    int64_t ki = (int64_t)kf;
    int64_t k1 = ki / 2, k2 = ki - k1;
    double s1 = ms_f64_from_bits((uint64_t)(k1 + 1023) << 52);
    double s2 = ms_f64_from_bits((uint64_t)(k2 + 1023) << 52);
    return (p * s1) * s2;
}

/* log(y) in fp64, within about 2 ulp. NaN and negative y give NaN, 0 gives
 * -Inf, +Inf gives +Inf. y = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) =
 * 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.1716, by its series up to
 * s^23 (Horner in s^2). */
MS_HD static inline double ms_interp_log(double y)
{
    if (y != y || y < 0.0)
        return ms_f64_from_bits(0x7ff8000000000000ull);
    if (y == 0.0)
        return ms_f64_from_bits(0xfff0000000000000ull);
    uint64_t u = ms_f64_bits(y);
    if ((u >> 52) == 0x7ffu)
        return y; /* +Inf */
    int64_t e = 0;
    if ((u >> 52) == 0) { /* subnormal: scale by 2^54 first */
        u = ms_f64_bits(y * 18014398509481984.0);
        e = -54;
    }
    e += (int64_t)(u >> 52) - 1023;
    double m = ms_f64_from_bits((u & 0x000fffffffffffffull) | 0x3ff0000000000000ull); /* [1, 2) */
    if (m > 1.4142135623730951) {
        m = m * 0.5;
        e += 1;
    }
    double f = m - 1.0; /* exact */
    double s = f / (2.0 + f);
    double z = s * s;
    double q = 0.08695652173913043;
    q = 0.09523809523809523 + z * q;
    q = 0.10526315789473684 + z * q;
    q = 0.11764705882352941 + z * q;
    q = 0.13333333333333333 + z * q;
    q = 0.15384615384615385 + z * q;
    q = 0.18181818181818182 + z * q;
    q = 0.2222222222222222 + z * q;
    q = 0.2857142857142857 + z * q;
    q = 0.4 + z * q;
    q = 0.6666666666666666 + z * q;
    q = 2.0 + z * q;
    double log_m = s * q;
    double ef = (double)e;
    const double ln2_hi = 6.93147180369123816490e-01;
    const double ln2_lo = 1.90821492927058770002e-10;
    return ef * ln2_hi + (ef * ln2_lo + log_m);
}

/* ============================================================== keys */

/* A key whose unsigned order is the order of the float values (-Inf < ...
 * < -0 < +0 < ... < +Inf < NaN): NaN is made canonical first, so every NaN
 * ranks above +Inf. Used where values may be negative (arcee_fusion's
 * importance). */
MS_HD static inline uint32_t ms_interp_order_key(float v)
{
    uint32_t u = ms_f32_bits(ms_merge_canon(v));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The value of an order key (NaN as the canonical NaN). */
MS_HD static inline float ms_interp_order_value(uint32_t key)
{
    return ms_f32_from_bits((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

/* ====================================================== Gram indexing */

/* The sums of products of K vectors v_0..v_{K-1} are stored for pairs
 * a <= b in the order (0,0), (0,1), ..., (0,K-1), (1,1), (1,2), ... */
MS_HD static inline unsigned ms_interp_pair(unsigned a, unsigned b, unsigned K)
{
    if (a > b) {
        unsigned tmp = a;
        a = b;
        b = tmp;
    }
    return a * K - a * (a - 1) / 2 + (b - a);
}

/* ======================================================== model_stock */

/* model_stock's t from the Gram sums G (ms_interp_pair order) of the N >= 2
 * task vectors, all fp64: cos_ij = clamp(G_ij / max(|d_i| |d_j|, 1e-6), -1,
 * 1) with |d| = sqrt(G_ii); cos = the sum of cos_ij over pairs i < j in
 * order (i outer), divided by the pair count; t = N cos / (1 + (N - 1) cos).
 * NaN propagates (the clamps are comparisons that keep NaN). */
MS_HD static inline double ms_interp_model_stock_t(const double *G, unsigned N)
{
    double csum = 0.0;
    unsigned pairs = 0;
    for (unsigned i = 0; i < N; i++) {
        for (unsigned j = i + 1; j < N; j++) {
            double np = sqrt(G[ms_interp_pair(i, i, N)]) * sqrt(G[ms_interp_pair(j, j, N)]);
            if (np < 1e-6)
                np = 1e-6;
            double c = G[ms_interp_pair(i, j, N)] / np;
            if (c < -1.0)
                c = -1.0;
            if (c > 1.0)
                c = 1.0;
            csum = csum + c;
            pairs++;
        }
    }
    double cos_theta = csum / (double)pairs;
    double n = (double)N;
    return (n * cos_theta) / (1.0 + (n - 1.0) * cos_theta);
}

/* model_stock's element: (t * mean + (1 - t) * B) with mean = (sum_i X_i) /
 * N in fp32; a = (float)t and b = (float)(1 - t), both rounded once from
 * fp64. X[i * stride], i in [0, N). */
MS_HD static inline float ms_interp_model_stock(float base, const float *X, size_t stride, unsigned N, float a,
                                                float b)
{
    float mean = X[0];
    for (unsigned i = 1; i < N; i++)
        mean = mean + X[i * stride];
    mean = mean / (float)N;
    return a * mean + b * base;
}

/* ============================================================ nearswap */

/* w = clamp(t / max(|B - X|, 1e-6), 0, 1); out = w X + (1 - w) B, all fp32
 * (t rounded to fp32 once). The max is a comparison, so a NaN difference
 * takes 1e-6 and the NaN reaches the output through X or B. */
MS_HD static inline float ms_interp_nearswap(float base, float x, float t)
{
    float ad = base - x;
    ad = ad < 0.0f ? -ad : ad;
    float den = ad > 1e-6f ? ad : 1e-6f;
    float w = t / den;
    w = w < 0.0f ? 0.0f : w;
    w = w > 1.0f ? 1.0f : w;
    return w * x + (1.0f - w) * base;
}

/* ============================================================= ram */

/* ram / ramplus_tl for one element: d[i * stride] are the task vectors X_i
 * - B of the n models, eps[i] their epsilons (fp32), lambda[i] the
 * per-model factors (1 for ram). nz_i = |d_i| > eps_i; count = sum nz_i;
 * u = (count == 1), o = (count > 1), c = max(count, 1), as 0/1 floats; dz_i
 * = d_i * nz_i (so a NaN delta stays NaN, as in mergekit); merged = sum_i
 * ((dz_i * u) * lambda_i + (dz_i * o) / c); out = B + merged. */
MS_HD static inline float ms_interp_ram(float base, const float *d, size_t stride, const float *eps,
                                        const float *lambda, unsigned n)
{
    unsigned count = 0;
    for (unsigned i = 0; i < n; i++) {
        float a = d[i * stride] < 0.0f ? -d[i * stride] : d[i * stride];
        count += a > eps[i];
    }
    float u = count == 1 ? 1.0f : 0.0f, o = count > 1 ? 1.0f : 0.0f;
    float c = count > 1 ? (float)count : 1.0f;
    float merged = 0.0f;
    for (unsigned i = 0; i < n; i++) {
        float a = d[i * stride] < 0.0f ? -d[i * stride] : d[i * stride];
        float dz = d[i * stride] * (a > eps[i] ? 1.0f : 0.0f);
        float term = (dz * u) * lambda[i] + (dz * o) / c;
        merged = i == 0 ? term : merged + term;
    }
    return base + merged;
}

/* ============================================================= sce */

/* The variance over models of one element's task vectors (torch.var with
 * unbiased=False), fp32: mean = (sum_i d_i) / n, var = (sum_i (d_i - mean)
 * (d_i - mean)) / n; NaN canonical (it is a selection key). */
MS_HD static inline float ms_interp_sce_var(const float *d, size_t stride, unsigned n)
{
    float mean = d[0];
    for (unsigned i = 1; i < n; i++)
        mean = mean + d[i * stride];
    mean = mean / (float)n;
    float v = (d[0] - mean) * (d[0] - mean);
    for (unsigned i = 1; i < n; i++)
        v = v + (d[i * stride] - mean) * (d[i * stride] - mean);
    return ms_merge_canon(v / (float)n);
}

/* sce's combination of the masked task vectors tau[i * stride] with
 * weights w[i] (fp32): S = sum_i tau_i; majority = +1 if S >= 0 else -1;
 * m_i = tau_i has the majority's sign (zeros and NaN never do); ew_i = w_i
 * m_i; out = B + (sum_i tau_i ew_i) / D with D = sum_i ew_i (0 becomes 1).
 * Unlike ms_merge_combine the majority is the unweighted sum's (mergekit's
 * get_erase_mask). */
MS_HD static inline float ms_interp_sce_combine(float base, const float *tau, size_t stride, const float *w,
                                                unsigned n)
{
    float s = tau[0];
    for (unsigned i = 1; i < n; i++)
        s = s + tau[i * stride];
    float maj = ms_merge_majority(s);
    float mixed = 0.0f, div = 0.0f;
    for (unsigned i = 0; i < n; i++) {
        float ew = w[i] * ms_merge_match(tau[i * stride], maj);
        float term = tau[i * stride] * ew;
        mixed = i == 0 ? term : mixed + term;
        div = i == 0 ? ew : div + ew;
    }
    if (div == 0.0f)
        div = 1.0f;
    return base + mixed / div;
}

#endif
