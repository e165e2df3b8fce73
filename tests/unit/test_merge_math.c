/* Tests for pipeline/merge_math.h: Philox4x32-10 against Random123's
 * published known-answer vectors, the f16/bf16 <-> f32 conversions over every
 * 16-bit pattern and against a float64 reference (tests/unit/
 * merge_reference.h) on random floats, every halfway case, subnormals,
 * overflow and NaN, the per-element combine/linear formulas against the
 * reference, and cpu_convert. The seed is printed; set MS_TEST_SEED to replay. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/dtype_convert.h"
#include "pipeline/merge_math.h"
#include "merge_reference.h"

#include "test_rng.h"

static uint32_t rng_u32(void)
{
    return (uint32_t)(rng_next() >> 32);
}

/* ================================================================ philox */

/* Random123 tests/kat_vectors, "philox4x32 10" lines: ctr[4] key[2] -> out[4]. */
static const uint32_t k_philox_kat[3][10] = {
    {0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c,
     0x9b00dbd8},
    {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0x408f276d, 0x41c83b0e, 0xa20bc7c6,
     0x6d5451fd},
    {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09, 0x94fdcceb, 0x5001e420,
     0x24126ea1},
};

static void test_philox_kat(void **state)
{
    (void)state;
    for (int v = 0; v < 3; v++) {
        const uint32_t *k = k_philox_kat[v];
        uint32_t out[4], ref[4];
        ms_philox4x32_10(k, k + 4, out);
        ref_philox(k, k + 4, ref);
        for (int j = 0; j < 4; j++) {
            assert_int_equal(out[j], k[6 + j]);
            assert_int_equal(ref[j], k[6 + j]);
        }
    }
}

/* The keep-test's counter layout: element e uses ctr {lo32(e>>2), hi32(e>>2),
 * model, 0}, word e & 3; checked against direct calls at 32-bit boundaries. */
static void test_philox_word_layout(void **state)
{
    (void)state;
    uint32_t key[2] = {rng_u32(), rng_u32()};
    const uint64_t bases[] = {0, 4, (UINT64_C(1) << 34) - 8, UINT64_C(1) << 34, UINT64_C(0x123456789abc),
                              UINT64_MAX - 7};
    for (size_t b = 0; b < sizeof bases / sizeof bases[0]; b++) {
        for (uint64_t k = 0; k < 8; k++) {
            uint64_t e = bases[b] + k;
            for (uint32_t model = 0; model < 3; model++) {
                uint32_t ctr[4] = {(uint32_t)(e >> 2), (uint32_t)(e >> 34), model, 0}, out[4];
                ms_philox4x32_10(ctr, key, out);
                assert_int_equal(ms_merge_philox_word(key, e, model), out[e & 3]);
                assert_int_equal(ms_merge_philox_word(key, e, model), ref_random_word(key, e, model));
            }
        }
    }
    /* neighbours and models differ (a layout bug would repeat words) */
    assert_true(ms_merge_philox_word(key, 0, 0) != ms_merge_philox_word(key, 1, 0));
    assert_true(ms_merge_philox_word(key, 0, 0) != ms_merge_philox_word(key, 0, 1));
    assert_true(ms_merge_philox_word(key, 0, 0) != ms_merge_philox_word(key, 4, 0));
}

static void test_thresholds(void **state)
{
    (void)state;
    assert_true(ms_merge_prob_threshold(0.0) == 0);
    assert_true(ms_merge_prob_threshold(-0.5) == 0);
    assert_true(ms_merge_prob_threshold(NAN) == 0);
    assert_true(ms_merge_prob_threshold(1.0) == UINT64_C(1) << 32);
    assert_true(ms_merge_prob_threshold(2.0) == UINT64_C(1) << 32);
    assert_true(ms_merge_prob_threshold(0.5) == UINT64_C(1) << 31);
    assert_true(ms_merge_prob_threshold(nextafter(1.0, 0.0)) == (UINT64_C(1) << 32) - 1);
    assert_true(ms_merge_prob_threshold(ldexp(1.0, -32)) == 1);
    assert_true(ms_merge_prob_threshold(nextafter(ldexp(1.0, -32), 0.0)) == 0);
    for (int t = 0; t < 10000; t++) {
        double p = (double)rng_next() / 18446744073709551616.0;
        assert_true(ms_merge_prob_threshold(p) == ref_threshold(p));
    }
    /* keep iff word < threshold: both sides of the boundary */
    assert_true(ms_merge_random_keep(5, 6));
    assert_false(ms_merge_random_keep(6, 6));
    assert_true(ms_merge_random_keep(0xffffffffu, UINT64_C(1) << 32));
    assert_false(ms_merge_random_keep(0, 0));
    /* della: rank 0 gets d - eps, the last rank d + eps, one column d - eps */
    assert_true(ms_merge_della_threshold(0.5, 0.1, 0, 11) == ref_threshold(0.5 - 0.1));
    assert_true(ms_merge_della_threshold(0.5, 0.1, 10, 11) == ref_threshold((0.5 - 0.1) + 0.2 * 1.0));
    assert_true(ms_merge_della_threshold(0.5, 0.1, 0, 1) == ref_threshold(0.4));
}

/* ============================================================ conversion */

static void test_f16_all_patterns(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ms_f16_to_f32((uint16_t)h);
        assert_int_equal(ms_f32_bits(f), ref_bits(ref_half_to_float((uint16_t)h)));
        uint16_t back = ms_f32_to_f16(f);
        bool nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu);
        /* exact round trip; a NaN comes back quiet with sign and payload */
        assert_int_equal(back, nan ? (h | 0x0200u) : h);
        assert_int_equal(back, ref_float_to_half(f));
    }
}

static void test_bf16_all_patterns(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ms_bf16_to_f32((uint16_t)h);
        assert_int_equal(ms_f32_bits(f), ref_bits(ref_bf16_to_float((uint16_t)h)));
        uint16_t back = ms_f32_to_bf16(f);
        bool nan = (h & 0x7f80u) == 0x7f80u && (h & 0x7fu);
        assert_int_equal(back, nan ? (h | 0x0040u) : h);
        assert_int_equal(back, ref_float_to_bf16(f));
    }
}

/* Every halfway point between neighbouring finite values (and a float either
 * side of it) rounds to the even one; the midpoint above the largest finite
 * value rounds to Inf. */
static void test_halfway_cases(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x7c00u; h++) { /* f16, positive finite */
        double lo = ref_half_to_float((uint16_t)h);
        double hi = h + 1 == 0x7c00u ? 65536.0 : ref_half_to_float((uint16_t)(h + 1));
        float mid = (float)((lo + hi) / 2); /* 12 significant bits: exact in f32 */
        assert_true((double)mid == (lo + hi) / 2);
        uint16_t even = (h & 1u) ? (uint16_t)(h + 1) : (uint16_t)h;
        assert_int_equal(ms_f32_to_f16(mid), even);
        assert_int_equal(ms_f32_to_f16(-mid), even | 0x8000u);
        assert_int_equal(ms_f32_to_f16(nextafterf(mid, 0.0f)), h);
        assert_int_equal(ms_f32_to_f16(nextafterf(mid, INFINITY)), h + 1);
        assert_int_equal(ref_float_to_half(mid), even);
    }
    for (uint32_t h = 0; h < 0x7f80u; h++) { /* bf16, positive finite */
        double lo = ref_bf16_to_float((uint16_t)h);
        double hi = h + 1 == 0x7f80u ? ldexp(1.0, 128) : ref_bf16_to_float((uint16_t)(h + 1));
        double m = (lo + hi) / 2; /* 9 significant bits: exact in f32, even above the largest bf16 */
        uint16_t even = (h & 1u) ? (uint16_t)(h + 1) : (uint16_t)h;
        float mid = (float)m;
        assert_true((double)mid == m);
        assert_int_equal(ms_f32_to_bf16(mid), even);
        assert_int_equal(ms_f32_to_bf16(-mid), even | 0x8000u);
        assert_int_equal(ms_f32_to_bf16(nextafterf(mid, 0.0f)), h);
        assert_int_equal(ms_f32_to_bf16(nextafterf(mid, INFINITY)), h + 1);
        assert_int_equal(ref_float_to_bf16(mid), even);
    }
}

static void check_narrow(uint32_t bits)
{
    float f = ms_f32_from_bits(bits);
    uint16_t a = ms_f32_to_f16(f), b = ref_float_to_half(f);
    if (a != b)
        fail_msg("f16 of 0x%08" PRIx32 ": got 0x%04x, reference 0x%04x", bits, a, b);
    a = ms_f32_to_bf16(f);
    b = ref_float_to_bf16(f);
    if (a != b)
        fail_msg("bf16 of 0x%08" PRIx32 ": got 0x%04x, reference 0x%04x", bits, a, b);
}

static void test_narrow_random(void **state)
{
    (void)state;
    /* uniform bit patterns: every class incl. NaN payloads, Inf, f32 subnormals */
    for (int t = 0; t < 300000; t++)
        check_narrow(rng_u32());
    /* exponents around f16's range: subnormal outputs, 2^-25, overflow */
    for (int t = 0; t < 300000; t++) {
        uint32_t exp = 96 + (uint32_t)(rng_next() % 48); /* 2^-31 .. 2^16 */
        check_narrow((rng_u32() & 0x807fffffu) | (exp << 23));
    }
    /* low mantissa bits only around rounding points */
    for (int t = 0; t < 100000; t++) {
        uint32_t b = rng_u32();
        b = (b & 0xffffe000u) | (0x1000u + (uint32_t)(rng_next() % 3) - 1u);
        check_narrow(b);
        check_narrow((b & 0xffff0000u) | (0x8000u + (uint32_t)(rng_next() % 3) - 1u));
    }
    const uint32_t special[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u,
                                0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x00000001u, 0x807fffffu, 0x33000000u,
                                0x33000001u, 0x337fffffu, 0x33800000u, 0x38800000u, 0x387fffffu, 0x477fe000u,
                                0x477fefffu, 0x477ff000u, 0x477fffffu, 0x47800000u, 0x7f7fffffu, 0x7f7f7fffu,
                                0x7f7f8000u, 0x00800000u, 0x007fffffu, 0x00008000u, 0x00018000u};
    for (size_t j = 0; j < sizeof special / sizeof special[0]; j++) {
        check_narrow(special[j]);
        check_narrow(special[j] ^ 0x80000000u);
    }
    /* a few fixed answers, so the reference cannot share a mistake */
    assert_int_equal(ms_f32_to_f16(65504.0f), 0x7bffu);
    assert_int_equal(ms_f32_to_f16(65519.99f), 0x7bffu);
    assert_int_equal(ms_f32_to_f16(65520.0f), 0x7c00u);
    assert_int_equal(ms_f32_to_f16(ldexpf(1.0f, -24)), 0x0001u);
    assert_int_equal(ms_f32_to_f16(ldexpf(1.0f, -25)), 0x0000u);
    assert_int_equal(ms_f32_to_f16(ldexpf(1.5f, -25)), 0x0001u);
    assert_int_equal(ms_f32_to_f16(ldexpf(3.0f, -25)), 0x0002u); /* 1.5 ulp: tie to even */
    assert_int_equal(ms_f32_to_f16(1.0f), 0x3c00u);
    assert_int_equal(ms_f32_to_f16(-2.0f), 0xc000u);
    assert_int_equal(ms_f32_to_f16(ms_f32_from_bits(0x7f800001u)), 0x7e00u);
    assert_int_equal(ms_f32_to_f16(ms_f32_from_bits(0xffc02000u)), 0xfe01u);
    assert_int_equal(ms_f32_to_bf16(1.0f), 0x3f80u);
    assert_int_equal(ms_f32_to_bf16(ms_f32_from_bits(0x3f808000u)), 0x3f80u); /* tie, even below */
    assert_int_equal(ms_f32_to_bf16(ms_f32_from_bits(0x3f818000u)), 0x3f82u); /* tie, even above */
    assert_int_equal(ms_f32_to_bf16(ms_f32_from_bits(0x7f7fffffu)), 0x7f80u);
    assert_int_equal(ms_f32_to_bf16(ms_f32_from_bits(0xff800001u)), 0xffc0u);
    assert_int_equal(ms_f32_bits(ms_f16_to_f32(0x0001u)), ms_f32_bits(ldexpf(1.0f, -24)));
    assert_int_equal(ms_f32_bits(ms_f16_to_f32(0x7c01u)), 0x7fc02000u);
    assert_int_equal(ms_f32_bits(ms_bf16_to_f32(0xff81u)), 0xffc10000u);
}

/* ========================================================= merge helpers */

static void test_keys_and_delta(void **state)
{
    (void)state;
    assert_int_equal(ms_merge_key(-0.0f), ms_merge_key(0.0f));
    assert_true(ms_merge_key(-2.0f) > ms_merge_key(1.5f));
    assert_true(ms_merge_key(ms_merge_delta(NAN, 1.0f)) > ms_merge_key(-INFINITY));
    assert_int_equal(ms_f32_bits(ms_merge_delta(ms_f32_from_bits(0xffc12345u), 1.0f)), MS_F32_CANON_NAN);
    assert_int_equal(ms_f32_bits(ms_merge_delta(INFINITY, INFINITY)), MS_F32_CANON_NAN);
    assert_true(ms_merge_delta(3.0f, 1.0f) == 2.0f);
    for (int t = 0; t < 100000; t++) {
        float a = ms_f32_from_bits(rng_u32()), b = ms_f32_from_bits(rng_u32());
        if (isnan(a) || isnan(b))
            continue;
        bool less = fabsf(a) < fabsf(b);
        assert_int_equal(ms_merge_key(a) < ms_merge_key(b), less);
    }
    /* selection predicates: both sides of t and of take */
    assert_true(ms_merge_sel_upper(6, 9, 5, 0));
    assert_false(ms_merge_sel_upper(4, 0, 5, 9));
    assert_true(ms_merge_sel_upper(5, 1, 5, 2));
    assert_false(ms_merge_sel_upper(5, 2, 5, 2));
    assert_true(ms_merge_sel_lower(4, 9, 5, 0));
    assert_false(ms_merge_sel_lower(6, 0, 5, 9));
    assert_true(ms_merge_sel_lower(5, 0, 5, 1));
    assert_false(ms_merge_sel_lower(5, 1, 5, 1));
    assert_true(ms_merge_sel_lower(0x7fc00000u, 0, MS_MERGE_KEY_ABOVE_ALL, 0));
    /* rescale factor: skipped below 1e-7 on either side, fp64 quotient rounded once */
    assert_true(ms_merge_rescale_factor(1e-8, 1.0) == 1.0f);
    assert_true(ms_merge_rescale_factor(1.0, 0.99e-7) == 1.0f);
    assert_true(ms_merge_rescale_factor(3.0, 1e-7) == (float)(3.0 / 1e-7));
    assert_true(ms_merge_rescale_factor(1.0, 3.0) == (float)(1.0 / 3.0));
    assert_true(isnan(ms_merge_rescale_factor(NAN, 1.0)));
    assert_true(ms_merge_tau(-2.0f, false, 3.0f) == 0.0f && !signbit(ms_merge_tau(-2.0f, false, 3.0f)));
    assert_true(ms_merge_tau(-2.0f, true, 3.0f) == -6.0f);
}

static float random_value(void)
{
    switch (rng_next() % 10) {
    case 0:
        return 0.0f;
    case 1:
        return -0.0f;
    case 2:
        return (rng_next() & 1) ? NAN : -INFINITY;
    case 3:
        return INFINITY;
    case 4:
        return (float)((int)(rng_next() % 9) - 4) * 0.25f; /* exact ties and cancellations */
    default:
        return (float)((double)(int64_t)rng_next() / 9.2e18);
    }
}

/* The per-element formulas the CUDA backend will use, against the reference. */
static void test_combine_vs_reference(void **state)
{
    (void)state;
    for (int t = 0; t < 200000; t++) {
        unsigned n = 1 + (unsigned)(rng_next() % MS_MAX_MODELS);
        float W[MS_MAX_MODELS], w[MS_MAX_MODELS];
        for (unsigned i = 0; i < n; i++) {
            W[i] = random_value();
            w[i] = (rng_next() % 8 == 0) ? 0.0f : (float)((double)(int64_t)rng_next() / 6e18);
            if (rng_next() % 16 == 0)
                w[i] = -w[i];
        }
        float base = random_value();
        bool consensus = rng_next() & 1, normalize = rng_next() & 1;
        float lambda = (rng_next() & 1) ? 1.0f : 0.7f;
        float a = ms_merge_combine(base, W, 1, w, n, consensus, normalize, lambda);
        float b = ref_combine(base, W, w, n, consensus, normalize, lambda);
        uint32_t ab = ms_merge_store_f32(a), bb = isnan(b) ? 0x7fc00000u : ref_bits(b);
        if (ab != bb)
            fail_msg("combine n=%u consensus=%d normalize=%d: 0x%08x vs reference 0x%08x", n, consensus,
                     normalize, ab, bb);
        /* linear */
        float wsum = ms_merge_weight_sum(w, n);
        float la = ms_merge_linear(W, 1, w, n, normalize, wsum);
        float lb = w[0] * W[0];
        for (unsigned i = 1; i < n; i++)
            lb = lb + w[i] * W[i];
        if (normalize) {
            float s = w[0];
            for (unsigned i = 1; i < n; i++)
                s = s + w[i];
            lb = lb / s;
        }
        assert_int_equal(ms_merge_store_f32(la), isnan(lb) ? 0x7fc00000u : ref_bits(lb));
    }
    /* fixed cases: majority by the sum (not the count), zeros never count, 0 -> 1 divisor */
    float W1[3] = {1.0f, 1.0f, -3.0f}, w1[3] = {1.0f, 1.0f, 1.0f};
    assert_true(ms_merge_combine(0.0f, W1, 1, w1, 3, true, true, 1.0f) == -3.0f);
    float W2[2] = {0.0f, -0.0f}, w2[2] = {0.5f, 0.5f};
    assert_true(ms_merge_combine(2.0f, W2, 1, w2, 2, true, true, 1.0f) == 2.0f);
    float W3[2] = {2.0f, 4.0f}, w3[2] = {1.0f, -1.0f};
    assert_true(ms_merge_combine(1.0f, W3, 1, w3, 2, false, true, 2.0f) == 13.0f); /* |sum w| < 1e-8 -> 1 */
    /* divisor rules, both sides of each boundary */
    assert_true(ms_merge_fix_plain_divisor(0.0f) == 1.0f);
    assert_true(ms_merge_fix_plain_divisor(-0.0f) == 1.0f);
    assert_true(ms_merge_fix_plain_divisor(9.99e-9f) == 1.0f);
    assert_true(ms_merge_fix_plain_divisor(-9.99e-9f) == 1.0f);
    assert_true(ms_merge_fix_plain_divisor(1.001e-8f) == 1.001e-8f);
    assert_true(ms_merge_fix_plain_divisor(-1.001e-8f) == -1.001e-8f);
    assert_true(ms_merge_fix_plain_divisor(1e-8f) == 1.0f); /* (double)1e-8f < 1e-8 */
    assert_true(ms_merge_fix_consensus_divisor(-0.0f) == 1.0f);
    assert_true(ms_merge_fix_consensus_divisor(1e-30f) == 1e-30f);
    assert_true(ms_merge_fix_consensus_divisor(-1e-30f) == -1e-30f);
    float W4[2] = {-0.0f, -0.0f}, w4[2] = {-1.0f, -1.0f};
    assert_true(signbit(ms_merge_combine(-0.0f, W4, 1, w4, 2, false, false, 1.0f))); /* -0 + -0 stays -0 */
}

static void test_store_canonical_nan(void **state)
{
    (void)state;
    float nans[] = {NAN, -NAN, ms_f32_from_bits(0x7f800001u), ms_f32_from_bits(0xffffffffu)};
    for (size_t j = 0; j < 4; j++) {
        assert_int_equal(ms_merge_store_f32(nans[j]), 0x7fc00000u);
        assert_int_equal(ms_merge_store_bf16(nans[j]), 0x7fc0u);
        assert_int_equal(ms_merge_store_f16(nans[j]), 0x7e00u);
    }
    assert_int_equal(ms_merge_store_f16(-INFINITY), 0xfc00u);
    assert_int_equal(ms_merge_store_bf16(1.0f), 0x3f80u);
}

/* =========================================================== cpu_convert */

static void test_cpu_convert(void **state)
{
    (void)state;
    const st_dtype dts[3] = {ST_F32, ST_F16, ST_BF16};
    enum { N = 5000 };
    unsigned char in[N * 4], out[N * 4], ref[N * 4];
    for (int a = 0; a < 3; a++) {
        for (int b = 0; b < 3; b++) {
            for (size_t j = 0; j < sizeof in; j++)
                in[j] = (unsigned char)rng_next();
            memset(out, 0xa5, sizeof out);
            cpu_convert(in + 1, dts[a], out + 3, dts[b], N - 1); /* unaligned on purpose */
            size_t osz = ref_dtype_size(dts[b]);
            for (uint64_t e = 0; e < N - 1; e++) {
                float v = ref_load(in + 1, dts[a], e);
                if (dts[a] == dts[b]) {
                    memcpy(ref + e * osz, in + 1 + e * osz, osz);
                } else if (dts[b] == ST_F32) {
                    uint32_t u = ref_bits(v);
                    memcpy(ref + e * 4, &u, 4);
                } else {
                    uint16_t h = dts[b] == ST_F16 ? ref_float_to_half(v) : ref_float_to_bf16(v);
                    memcpy(ref + e * 2, &h, 2);
                }
            }
            assert_memory_equal(out + 3, ref, (N - 1) * osz);
            assert_int_equal(out[2], 0xa5);
            assert_int_equal(out[3 + (N - 1) * osz], 0xa5);
        }
    }
}

/* cpu_count_nonfinite against isfinite of the widened value, on random bit
 * patterns (about 1 in 256 BF16/F32 and 1 in 32 F16 patterns are NaN or Inf)
 * over lengths that end inside and outside its 4096-element blocks. */
static void test_count_nonfinite(void **state)
{
    (void)state;
    const st_dtype dts[3] = {ST_F32, ST_F16, ST_BF16};
    enum { N = 3 * 4096 + 77 };
    static uint32_t words[N]; /* the widest dtype's alignment for every one */
    for (int a = 0; a < 3; a++) {
        unsigned char *in = (unsigned char *)words;
        for (size_t j = 0; j < sizeof words; j++)
            in[j] = (unsigned char)rng_next();
        const uint64_t lengths[4] = {0, 1, 4096, N};
        for (int l = 0; l < 4; l++) {
            uint64_t want = 0;
            for (uint64_t e = 0; e < lengths[l]; e++)
                want += !isfinite(ref_load(in, dts[a], e));
            assert_int_equal(cpu_count_nonfinite(in, dts[a], lengths[l]), want);
            if (lengths[l] == N)
                assert_true(want > 0);
        }
    }
    assert_int_equal(cpu_count_nonfinite(words, ST_I32, N), 0);
}

int main(void)
{
    g_rng = test_seed("test_merge_math");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_philox_kat),
        cmocka_unit_test(test_philox_word_layout),
        cmocka_unit_test(test_thresholds),
        cmocka_unit_test(test_f16_all_patterns),
        cmocka_unit_test(test_bf16_all_patterns),
        cmocka_unit_test(test_halfway_cases),
        cmocka_unit_test(test_narrow_random),
        cmocka_unit_test(test_keys_and_delta),
        cmocka_unit_test(test_combine_vs_reference),
        cmocka_unit_test(test_store_canonical_nan),
        cmocka_unit_test(test_cpu_convert),
        cmocka_unit_test(test_count_nonfinite),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
