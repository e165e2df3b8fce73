/* HIST_HI's capture: the range of a bound and the selection of a tile's
 * keys (see cpu_capture.h). */
#include "cpu/cpu_capture.h"

#include <math.h>
#include <string.h>

#include "cpu/cpu_kernel.h"
#include "pipeline/merge_passes.h"

#define CAPTURE_BINS MS_MERGE_HI_BINS
#define CAPTURE_SIGMAS 4.0 /* the range: sample ranks within 4 binomial standard deviations */

bool cpu_capture_range(const uint32_t *hist, uint64_t sampled, double q, uint64_t numel, uint64_t cap,
                       uint32_t *bin_lo_out, uint32_t *bin_hi_out)
{
    double centre = q * (double)sampled, last = (double)(sampled - 1);
    double margin = CAPTURE_SIGMAS * sqrt((double)sampled * q * (1.0 - q)) + 1.0;
    double lo = centre - margin, hi = centre + margin;
    const uint64_t rank_at[3] = {
        lo > 0.0 ? (lo < last ? (uint64_t)lo : sampled - 1) : 0,
        centre < last ? (uint64_t)centre : sampled - 1,
        hi > 0.0 ? (hi < last ? (uint64_t)hi : sampled - 1) : 0,
    };
    /* the bins holding sample ranks rank_at[0..2], and the samples below the middle one */
    uint32_t bin_at[3] = {CAPTURE_BINS, CAPTURE_BINS, CAPTURE_BINS};
    uint64_t below = 0, below_mid = 0;
    for (uint32_t k = 0; k < CAPTURE_BINS && bin_at[2] == CAPTURE_BINS; k++) {
        if (bin_at[1] == CAPTURE_BINS)
            below_mid = below;
        below += hist[k];
        for (int r = 0; r < 3; r++)
            if (bin_at[r] == CAPTURE_BINS && rank_at[r] < below)
                bin_at[r] = k;
    }
    CPU_ASSERT(bin_at[0] <= bin_at[1] && bin_at[1] <= bin_at[2] && bin_at[2] < CAPTURE_BINS);
    double per_sample = (double)numel / (double)sampled, room = (double)cap * 0.8;
    uint32_t bin_lo = bin_at[1], bin_hi = bin_at[1];
    double expected = (double)hist[bin_at[1]] * per_sample;
    if (expected > room)
        return false;
    /* [first, end): the sample ranks the range holds */
    uint64_t first = below_mid, end = below_mid + hist[bin_at[1]];
    for (;;) {
        bool down = bin_lo > bin_at[0] && (double)(expected + hist[bin_lo - 1] * per_sample) <= room;
        bool up = bin_hi < bin_at[2] && (double)(expected + hist[bin_hi + 1] * per_sample) <= room;
        if (!down && !up)
            break;
        if (down && up) /* the side where the range reaches less far from the centre */
            down = centre - (double)first < (double)end - centre;
        if (down) {
            expected += hist[--bin_lo] * per_sample;
            first -= hist[bin_lo];
        } else {
            expected += hist[++bin_hi] * per_sample;
            end += hist[bin_hi];
        }
    }
    *bin_lo_out = bin_lo;
    *bin_hi_out = bin_hi;
    return true;
}

/* About 2% of a tile's keys match, at unpredictable places: a branch per key
 * or per group of keys would cost more than the histogram itself, so the
 * selection never branches on the data. The vector versions compress 16
 * (AVX-512) or 8 (AVX2, through a table of lane orders) keys at a time; the
 * portable one appends every key and advances by its flag. All give the
 * same entries in the same order. */
static size_t capture_select_plain(const uint32_t *restrict key, size_t n, uint32_t bin_lo, uint32_t bins,
                                   uint32_t e, uint32_t *restrict out_key, uint32_t *restrict out_index)
{
    size_t got = 0;
    for (size_t j = 0; j < n; j++) {
        out_key[got] = key[j];
        out_index[got] = e + (uint32_t)j;
        got += (key[j] >> 16) - bin_lo <= bins;
    }
    return got;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MERGESTREAM_NO_CPU_CLONES)
#include <immintrin.h>
#include <pthread.h>
#define CAPTURE_HAS_VECTORS 1

__attribute__((target("avx512f"))) static size_t capture_select_avx512(const uint32_t *restrict key, size_t n,
                                                                       uint32_t bin_lo, uint32_t bins, uint32_t e,
                                                                       uint32_t *restrict out_key,
                                                                       uint32_t *restrict out_index)
{
    const __m512i lo = _mm512_set1_epi32((int)bin_lo), span = _mm512_set1_epi32((int)bins);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int)e),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    size_t got = 0, j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512i k = _mm512_loadu_si512(key + j);
        __mmask16 m = _mm512_cmple_epu32_mask(_mm512_sub_epi32(_mm512_srli_epi32(k, 16), lo), span);
        /* compressed in registers, stored whole: a compressing store to memory is slow on some CPUs */
        _mm512_storeu_si512(out_key + got, _mm512_maskz_compress_epi32(m, k));
        _mm512_storeu_si512(out_index + got, _mm512_maskz_compress_epi32(m, index));
        got += (size_t)__builtin_popcount(m);
        index = _mm512_add_epi32(index, step);
    }
    return got + capture_select_plain(key + j, n - j, bin_lo, bins, e + (uint32_t)j, out_key + got, out_index + got);
}

/* g_lanes[m]: the lanes whose bit is set in m, in order, as 8 bytes (the
 * rest 0); built once. AVX2 has no compress: a permute by this order does
 * it. */
static uint64_t g_lanes[256];
static pthread_once_t g_lanes_once = PTHREAD_ONCE_INIT;

static void lanes_build(void)
{
    for (unsigned m = 0; m < 256; m++) {
        uint64_t order = 0;
        unsigned k = 0;
        for (unsigned lane = 0; lane < 8; lane++)
            if (m >> lane & 1)
                order |= (uint64_t)lane << (8 * k++);
        g_lanes[m] = order;
    }
}

__attribute__((target("avx2"))) static size_t capture_select_avx2(const uint32_t *restrict key, size_t n,
                                                                  uint32_t bin_lo, uint32_t bins, uint32_t e,
                                                                  uint32_t *restrict out_key,
                                                                  uint32_t *restrict out_index)
{
    pthread_once(&g_lanes_once, lanes_build);
    /* unsigned (key >> 16) - bin_lo <= bins, as a signed compare after flipping the top bit */
    const __m256i flip = _mm256_set1_epi32((int)0x80000000u), lo = _mm256_set1_epi32((int)bin_lo);
    const __m256i limit = _mm256_set1_epi32((int)(bins ^ 0x80000000u)), step = _mm256_set1_epi32(8);
    __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int)e), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    size_t got = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(key + j));
        __m256i off = _mm256_xor_si256(_mm256_sub_epi32(_mm256_srli_epi32(k, 16), lo), flip);
        unsigned m = 0xffu & ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(off, limit)));
        __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)g_lanes[m]));
        _mm256_storeu_si256((__m256i *)(out_key + got), _mm256_permutevar8x32_epi32(k, order));
        _mm256_storeu_si256((__m256i *)(out_index + got), _mm256_permutevar8x32_epi32(index, order));
        got += (size_t)__builtin_popcount(m);
        index = _mm256_add_epi32(index, step);
    }
    return got + capture_select_plain(key + j, n - j, bin_lo, bins, e + (uint32_t)j, out_key + got, out_index + got);
}
#endif

bool cpu_capture_isa_available(cpu_capture_isa isa)
{
    switch (isa) {
    case CPU_CAPTURE_PLAIN:
        return true;
#ifdef CAPTURE_HAS_VECTORS
    case CPU_CAPTURE_AVX2:
        return __builtin_cpu_supports("avx2");
    case CPU_CAPTURE_AVX512:
        return __builtin_cpu_supports("avx512f");
#endif
    default:
        return false;
    }
}

size_t cpu_capture_select_isa(cpu_capture_isa isa, const uint32_t *restrict key, size_t n, uint32_t bin_lo,
                              uint32_t bins, uint32_t e, uint32_t *restrict out_key, uint32_t *restrict out_index)
{
    CPU_ASSERT(cpu_capture_isa_available(isa));
    switch (isa) {
#ifdef CAPTURE_HAS_VECTORS
    case CPU_CAPTURE_AVX512:
        return capture_select_avx512(key, n, bin_lo, bins, e, out_key, out_index);
    case CPU_CAPTURE_AVX2:
        return capture_select_avx2(key, n, bin_lo, bins, e, out_key, out_index);
#endif
    default:
        return capture_select_plain(key, n, bin_lo, bins, e, out_key, out_index);
    }
}

size_t cpu_capture_select(const uint32_t *restrict key, size_t n, uint32_t bin_lo, uint32_t bins, uint32_t e,
                          uint32_t *restrict out_key, uint32_t *restrict out_index)
{
    cpu_capture_isa isa = cpu_capture_isa_available(CPU_CAPTURE_AVX512) ? CPU_CAPTURE_AVX512
                          : cpu_capture_isa_available(CPU_CAPTURE_AVX2) ? CPU_CAPTURE_AVX2
                                                                          : CPU_CAPTURE_PLAIN;
    return cpu_capture_select_isa(isa, key, n, bin_lo, bins, e, out_key, out_index);
}
