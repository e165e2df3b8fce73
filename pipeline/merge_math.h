/* The per-element arithmetic of the task-vector merge methods, written once
 * for both backends (DESIGN.md, Arithmetic / Method semantics / Deterministic
 * randomness). Every function is `static inline` and marked MS_HD, so the CPU
 * kernels (cpu/) and the CUDA kernels (gpu/) compile the same code.
 *
 * Rules every caller relies on:
 *   - fp32 arithmetic with no FMA contraction: the host build passes
 *     -ffp-contract=off, nvcc must get --fmad=false. Never call fmaf here.
 *   - "sum_i t_i" over models means ((t_1 + t_2) + t_3) + ...: recipe order,
 *     starting from the first term (not from +0.0; the sign of an all-zero sum
 *     is therefore IEEE's: -0 only when every term is -0).
 *   - fp64 only where DESIGN.md says so (thresholds, rescale factors).
 *
 * NaN / Inf policy:
 *   - Arithmetic propagates NaN and Inf per IEEE 754.
 *   - A NaN delta (X_i - B) is replaced by the canonical quiet NaN 0x7fc00000
 *     at once (ms_merge_delta), so its selection key is 0x7fc00000 on every
 *     backend (hardware NaN payloads differ: x86 propagates an operand, CUDA
 *     makes 0x7fffffff).
 *   - Selection ranks by the magnitude key = the float's bits with the sign bit
 *     cleared: +0 and -0 tie, +Inf is 0x7f800000 and a NaN delta ranks above
 *     +Inf. Equal keys are ordered by flat index.
 *   - Consensus: the sign of W is decided by comparison (W > 0, W < 0). Zeros
 *     and NaNs never match the majority (as torch's sign(W) == majority in
 *     mergekit). This cannot change a result: the mixed sum uses m_i * W_i, and
 *     0 * NaN is NaN, so a NaN W_i makes the element NaN whether it counts or
 *     not.
 *   - Every NaN a merge kernel writes is the canonical quiet NaN of the output
 *     dtype (ms_merge_store_*): f32 0x7fc00000, bf16 0x7fc0, f16 0x7e00. The
 *     plain dtype converters (ms_f32_to_bf16 ...) keep the sign and the top
 *     payload bits instead and only set the quiet bit.
 *   - Rescale: the factor is skipped when sum|delta| < 1e-7 or sum|tau| < 1e-7
 *     (DESIGN.md; mergekit's rescaled_masked_tensor). A NaN sum compares false,
 *     so the factor becomes NaN and every kept value NaN (IEEE propagation);
 *     dropped elements stay exactly 0.
 */
#ifndef MS_MERGE_MATH_H
#define MS_MERGE_MATH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MS_HD __host__ __device__
#else
#define MS_HD
#endif

/* ============================================================ bit casts */

MS_HD static inline uint32_t ms_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

MS_HD static inline float ms_f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define MS_F32_CANON_NAN 0x7fc00000u
#define MS_BF16_CANON_NAN 0x7fc0u
#define MS_F16_CANON_NAN 0x7e00u

/* ===================================================== dtype conversion */

/* bf16 -> f32 is exact; a signalling NaN is quieted (sign and payload kept). */
MS_HD static inline float ms_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    if ((u & 0x7fffffffu) > 0x7f800000u)
        u |= 0x00400000u;
    return ms_f32_from_bits(u);
}

/* f32 -> bf16, round to nearest even; overflow becomes Inf; NaN stays NaN
 * (sign and the top 7 payload bits kept, quiet bit set). */
MS_HD static inline uint16_t ms_f32_to_bf16(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint32_t is_nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u); /* masks, not branches: loops vectorise */
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)((nan & is_nan) | (rounded & ~is_nan));
}

/* f16 -> f32 is exact (subnormals included); a signalling NaN is quieted.
 * All cases are computed and selected (no branches: loops vectorise). */
MS_HD static inline float ms_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t special = 0x7f800000u | (man << 13) | ((0u - (uint32_t)(man != 0)) & 0x00400000u); /* Inf, qNaN */
    uint32_t normal = ((exp + 112u) << 23) | (man << 13);
    uint32_t small = ms_f32_bits((float)man * 5.9604644775390625e-8f); /* zero, subnormal: man * 2^-24, exact */
    uint32_t is_special = 0u - (uint32_t)(exp == 0x1fu), is_small = 0u - (uint32_t)(exp == 0);
    uint32_t u = (special & is_special) | (small & is_small) | (normal & ~(is_special | is_small));
    return ms_f32_from_bits(sign | u);
}

/* f32 -> f16, round to nearest even: values from 65520 up become Inf, values
 * below 2^-14 become subnormals (2^-25 exactly rounds to 0), NaN stays NaN
 * (sign and the top 9 payload bits kept, quiet bit set). All cases are
 * computed and selected (no branches: loops vectorise). */
MS_HD static inline uint16_t ms_f32_to_f16(float f)
{
    uint32_t u = ms_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    /* normal: rebias the exponent by 127 - 15, round 13 bits off to even */
    uint32_t r = a - 0x38000000u;
    uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    /* below 2^-14: adding 0.5 (ulp 2^-24, as f16's subnormals) rounds |f| to
     * a multiple of 2^-24, to nearest even, in the f32 add itself */
    uint32_t small = ms_f32_bits(ms_f32_from_bits(a) + 0.5f) - 0x3f000000u;
    uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    uint32_t is_nan = 0u - (uint32_t)(a > 0x7f800000u);
    uint32_t is_inf = ~is_nan & (0u - (uint32_t)(a >= 0x477ff000u)); /* 65520 (halfway above 65504, odd) and up */
    uint32_t is_normal = ~(is_nan | is_inf) & (0u - (uint32_t)(a >= 0x38800000u));
    uint32_t is_small = ~(is_nan | is_inf | is_normal);
    uint32_t h = (nan & is_nan) | (0x7c00u & is_inf) | (normal & is_normal) | (small & is_small);
    return (uint16_t)(sign | h);
}

/* =========================================================== philox */

#define MS_PHILOX_M0 0xD2511F53u
#define MS_PHILOX_M1 0xCD9E8D57u
#define MS_PHILOX_W0 0x9E3779B9u
#define MS_PHILOX_W1 0xBB67AE85u

/* One Philox4x32 round on the counter words with round key (k0, k1). Exposed
 * so a backend can run many counters side by side (the CPU's batches). */
MS_HD static inline void ms_philox4x32_round(uint32_t *c0, uint32_t *c1, uint32_t *c2, uint32_t *c3, uint32_t k0,
                                             uint32_t k1)
{
    uint64_t p0 = (uint64_t)MS_PHILOX_M0 * *c0;
    uint64_t p1 = (uint64_t)MS_PHILOX_M1 * *c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ *c1 ^ k0;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ *c3 ^ k1;
    *c1 = (uint32_t)p1;
    *c3 = (uint32_t)p0;
    *c0 = n0;
    *c2 = n2;
}

/* Round r's key (0-based): the key bumped r times by the Weyl constants. */
MS_HD static inline void ms_philox4x32_round_key(const uint32_t key[2], int r, uint32_t *k0, uint32_t *k1)
{
    *k0 = key[0] + (uint32_t)r * MS_PHILOX_W0;
    *k1 = key[1] + (uint32_t)r * MS_PHILOX_W1;
}

/* Philox4x32-10 (Salmon et al. 2011) with Random123's constants: 10 rounds,
 * the key bumped by the Weyl constants before every round but the first. */
MS_HD static inline void ms_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    for (int r = 0; r < 10; r++) {
        uint32_t k0, k1;
        ms_philox4x32_round_key(key, r, &k0, &k1);
        ms_philox4x32_round(&c0, &c1, &c2, &c3, k0, k1);
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* The random word of element e for model index `model` (0-based, recipe
 * order, base excluded): ctr = {lo32(e >> 2), hi32(e >> 2), model, 0}, word
 * e & 3. Four consecutive elements share one Philox call. */
MS_HD static inline uint32_t ms_merge_philox_word(const uint32_t key[2], uint64_t e, uint32_t model)
{
    uint32_t ctr[4] = {(uint32_t)(e >> 2), (uint32_t)(e >> 34), model, 0u};
    uint32_t out[4];
    ms_philox4x32_10(ctr, key, out);
    return out[e & 3u];
}

/* floor(p * 2^32) in fp64 (exact scaling), clamped to [0, 2^32]: element kept
 * iff its word < this. p <= 0 or NaN keeps nothing, p >= 1 keeps everything. */
MS_HD static inline uint64_t ms_merge_prob_threshold(double p)
{
    if (!(p > 0.0))
        return 0;
    if (p >= 1.0)
        return (uint64_t)1 << 32;
    return (uint64_t)(p * 4294967296.0); /* positive: truncation is floor */
}

MS_HD static inline bool ms_merge_random_keep(uint32_t word, uint64_t threshold)
{
    return (uint64_t)word < threshold;
}

/* della_magprune's threshold for the element of 0-based ascending rank r in a
 * row of `cols` (DESIGN.md: rank_norm = (r - 1) / (cols - 1) with 1-based r,
 * 0 when cols = 1; p = (d - eps) + (2 * eps) * rank_norm; all fp64). */
MS_HD static inline uint64_t ms_merge_della_threshold(double d, double eps, uint64_t r, uint64_t cols)
{
    double rank_norm = cols > 1 ? (double)r / (double)(cols - 1) : 0.0;
    double p = (d - eps) + (2.0 * eps) * rank_norm;
    return ms_merge_prob_threshold(p);
}

/* ========================================================== selection */

/* A threshold key above every magnitude key (keys are < 2^31). */
#define MS_MERGE_KEY_ABOVE_ALL 0x80000000u

/* Canonical NaN for any NaN; other values unchanged. */
MS_HD static inline float ms_merge_canon(float x)
{
    return x != x ? ms_f32_from_bits(MS_F32_CANON_NAN) : x;
}

/* delta = X - B in fp32, NaN made canonical (see the NaN policy). */
MS_HD static inline float ms_merge_delta(float x, float b)
{
    return ms_merge_canon(x - b);
}

/* The magnitude key: |x| as bits (sign cleared). For non-NaN values the key
 * order is the order of |x|; NaN keys rank above +Inf. */
MS_HD static inline uint32_t ms_merge_key(float x)
{
    return ms_f32_bits(x) & 0x7fffffffu;
}

/* eq_pos is the number of elements with key == t that precede this one in
 * flat index order (inside the whole tensor). Where take == 0 or take equals
 * the count of elements with key == t, the result does not depend on eq_pos
 * and callers may pass 0.
 *
 * Upper: the element is among the top ones: key > t, or key == t and among the
 * first `take` equal elements (magnitude: the largest |delta|, ties by smaller
 * index). */
MS_HD static inline bool ms_merge_sel_upper(uint32_t key, uint64_t eq_pos, uint32_t t, uint64_t take)
{
    return key > t || (key == t && eq_pos < take);
}

/* Lower: the element's ascending rank (key, then index) is below R, where t is
 * the key at ascending position R and take = R - #(key < t). */
MS_HD static inline bool ms_merge_sel_lower(uint32_t key, uint64_t eq_pos, uint32_t t, uint64_t take)
{
    return key < t || (key == t && eq_pos < take);
}

/* =========================================================== rescale */

/* The L1 rescale factor from the fixed-order fp64 sums, rounded to fp32 once;
 * 1 when skipped (either sum < 1e-7). */
MS_HD static inline float ms_merge_rescale_factor(double sum_abs_delta, double sum_abs_tau)
{
    if (sum_abs_delta < 1e-7 || sum_abs_tau < 1e-7)
        return 1.0f;
    return (float)(sum_abs_delta / sum_abs_tau);
}

/* tau: the kept value times the rescale factor (1 without rescale); a dropped
 * element is exactly +0 (whatever delta * factor is: Inf, NaN, -0). Masked
 * bits instead of a branch, so element loops vectorise. */
MS_HD static inline float ms_merge_tau(float delta, bool keep, float factor)
{
    uint32_t mask = 0u - (uint32_t)keep;
    return ms_f32_from_bits(ms_f32_bits(delta * factor) & mask);
}

/* ========================================================= combining */

/* Majority sign of the sum S = sum_i W_i: +1 if S >= 0 (so -0 and +0 give +1),
 * else -1 (NaN gives -1). */
MS_HD static inline float ms_merge_majority(float s)
{
    return s >= 0.0f ? 1.0f : -1.0f;
}

/* m_i as 1.0f or 0.0f: W has the majority's sign. Zeros and NaN never match.
 * Written without branches so element loops vectorise. */
MS_HD static inline float ms_merge_match(float w_tau, float majority)
{
    int up = majority > 0.0f;
    int m = (up & (w_tau > 0.0f)) | ((up ^ 1) & (w_tau < 0.0f));
    return (float)m;
}

/* Consensus divisor: sum m_i w_i, with 0 (either sign) replaced by 1. */
MS_HD static inline float ms_merge_fix_consensus_divisor(float div)
{
    return div == 0.0f ? 1.0f : div;
}

/* Plain divisor: sum w_i, with |sum| < 1e-8 (compared in fp64) replaced by 1. */
MS_HD static inline float ms_merge_fix_plain_divisor(float div)
{
    double a = div < 0.0f ? -(double)div : (double)div;
    return a < 1e-8 ? 1.0f : div;
}

/* Steps 5 of DESIGN.md's method semantics: normalize, lambda, add the base. */
MS_HD static inline float ms_merge_finish(float base, float mixed, float divisor, bool normalize, float lambda)
{
    if (normalize)
        mixed = mixed / divisor;
    if (lambda != 1.0f)
        mixed = mixed * lambda;
    return base + mixed;
}

/* The merged value of one element (DESIGN.md steps 3-5): W[i * stride] for i
 * in [0, n) are the weighted sparse deltas w_i * tau_i of models 1..n in
 * recipe order, w[i] their weights. n >= 1. */
MS_HD static inline float ms_merge_combine(float base, const float *W, size_t stride, const float *w, unsigned n,
                                           bool consensus, bool normalize, float lambda)
{
    float mixed, divisor;
    if (consensus) {
        float s = W[0];
        for (unsigned i = 1; i < n; i++)
            s = s + W[i * stride];
        float maj = ms_merge_majority(s);
        float m = ms_merge_match(W[0], maj);
        mixed = m * W[0];
        divisor = m * w[0];
        for (unsigned i = 1; i < n; i++) {
            m = ms_merge_match(W[i * stride], maj);
            mixed = mixed + m * W[i * stride];
            divisor = divisor + m * w[i];
        }
        divisor = ms_merge_fix_consensus_divisor(divisor);
    } else {
        mixed = W[0];
        divisor = w[0];
        for (unsigned i = 1; i < n; i++) {
            mixed = mixed + W[i * stride];
            divisor = divisor + w[i];
        }
        divisor = ms_merge_fix_plain_divisor(divisor);
    }
    return ms_merge_finish(base, mixed, divisor, normalize, lambda);
}

/* sum_i w_i in recipe order (linear's normalizer). */
MS_HD static inline float ms_merge_weight_sum(const float *w, unsigned n)
{
    float s = w[0];
    for (unsigned i = 1; i < n; i++)
        s = s + w[i];
    return s;
}

/* Linear: sum_i w_i X_i, divided by wsum = ms_merge_weight_sum when normalize
 * (the recipe rejects a zero sum). X[i * stride], i in [0, n). */
MS_HD static inline float ms_merge_linear(const float *X, size_t stride, const float *w, unsigned n, bool normalize,
                                          float wsum)
{
    float acc = w[0] * X[0];
    for (unsigned i = 1; i < n; i++)
        acc = acc + w[i] * X[i * stride];
    return normalize ? acc / wsum : acc;
}

/* ============================================================ output */

/* A merged value rounded once to the output dtype, NaN canonical. */
MS_HD static inline uint32_t ms_merge_store_f32(float v)
{
    return ms_f32_bits(ms_merge_canon(v));
}

/* (the canonical f32 NaN converts to the canonical bf16 / f16 NaN) */
MS_HD static inline uint16_t ms_merge_store_bf16(float v)
{
    return ms_f32_to_bf16(ms_merge_canon(v));
}

MS_HD static inline uint16_t ms_merge_store_f16(float v)
{
    return ms_f32_to_f16(ms_merge_canon(v));
}

#endif
