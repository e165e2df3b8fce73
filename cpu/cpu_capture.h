/* The two pure pieces of HIST_HI's capture (ms_merge_capture in
 * pipeline/merge_passes.h; cpu_merge.c samples the keys and owns the
 * buffers): where to place a bound's range of bins from a sample's
 * histogram, and which keys of a tile fall in it. */
#ifndef MS_CPU_CAPTURE_H
#define MS_CPU_CAPTURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CPU_CAPTURE_SLACK 16u /* cpu_capture_select writes up to 16 entries past its last match */

/* The range [*bin_lo, *bin_hi] of hi-bins (key >> 16) to capture for a bound
 * at ascending fraction q of a tensor of numel elements, from hist[32,768]:
 * the histogram of `sampled` (> 0) keys sampled from it. The range grows from
 * the bin holding the sample's rank q * sampled, a bin at a time on the
 * side where it reaches less far from that rank, as far as the bins holding
 * the sample ranks 4 binomial standard deviations away, while the sample's
 * share of it, scaled to numel, fills at most four fifths of cap entries.
 * Returns false (nothing to capture) when the middle bin alone would not
 * fit. */
bool cpu_capture_range(const uint32_t *hist, uint64_t sampled, double q, uint64_t numel, uint64_t cap,
                       uint32_t *bin_lo, uint32_t *bin_hi);

/* The keys key[0..n) inside bins [bin_lo, bin_lo + bins] and their flat
 * indices (e + j) into out_key and out_index, each with room for
 * n + CPU_CAPTURE_SLACK; returns how many, in index order. Uses the widest
 * vectors the CPU has. */
size_t cpu_capture_select(const uint32_t *restrict key, size_t n, uint32_t bin_lo, uint32_t bins, uint32_t e,
                          uint32_t *restrict out_key, uint32_t *restrict out_index);

/* The same with one implementation, for the tests: whether it was built and
 * runs on this CPU, and the selection with it (it must be available). */
typedef enum cpu_capture_isa { CPU_CAPTURE_PLAIN, CPU_CAPTURE_AVX2, CPU_CAPTURE_AVX512 } cpu_capture_isa;
bool cpu_capture_isa_available(cpu_capture_isa isa);
size_t cpu_capture_select_isa(cpu_capture_isa isa, const uint32_t *restrict key, size_t n, uint32_t bin_lo,
                              uint32_t bins, uint32_t e, uint32_t *restrict out_key, uint32_t *restrict out_index);

#endif
