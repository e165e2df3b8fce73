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
    /* the bins holding sample ranks rank_at[0..2] */
    uint32_t bin_at[3] = {CAPTURE_BINS, CAPTURE_BINS, CAPTURE_BINS};
    uint64_t below = 0;
    for (uint32_t k = 0; k < CAPTURE_BINS && bin_at[2] == CAPTURE_BINS; k++) {
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
    for (;;) {
        bool down = bin_lo > bin_at[0], up = bin_hi < bin_at[2];
        if (!down && !up)
            break;
        if (down && up)
            down = hist[bin_lo - 1] <= hist[bin_hi + 1];
        double more = (double)hist[down ? bin_lo - 1 : bin_hi + 1] * per_sample;
        if (expected + more > room)
            break;
        expected += more;
        if (down)
            bin_lo--;
        else
            bin_hi++;
    }
    *bin_lo_out = bin_lo;
    *bin_hi_out = bin_hi;
    return true;
}

/* About 2% of a tile's keys match, at unpredictable places: a branch per key
 * or per group of keys would cost more than the histogram itself, so the
 * selection never branches on the data. The AVX-512 version compresses 16
 * keys at a time; the portable one appends every key and advances by its
 * flag. Either gives the same entries in the same order. */
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
#define CAPTURE_HAS_AVX512 1
#endif

size_t cpu_capture_select(const uint32_t *restrict key, size_t n, uint32_t bin_lo, uint32_t bins, uint32_t e,
                          uint32_t *restrict out_key, uint32_t *restrict out_index)
{
#ifdef CAPTURE_HAS_AVX512
    if (__builtin_cpu_supports("avx512f"))
        return capture_select_avx512(key, n, bin_lo, bins, e, out_key, out_index);
#endif
    return capture_select_plain(key, n, bin_lo, bins, e, out_key, out_index);
}
