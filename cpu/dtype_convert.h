/* Plain dtype conversion for tensors the method does not touch but whose
 * dtype changes (DESIGN.md, Arithmetic: widen to fp32, round once). */
#ifndef MS_DTYPE_CONVERT_H
#define MS_DTYPE_CONVERT_H

#include <stdint.h>

#include "io/st_format.h"

/* Converts n elements of in (in_dt) to out (out_dt); both dtypes F16, BF16 or
 * F32 (anything else aborts: a caller bug). Same dtype: a byte copy. Else each
 * value is widened to fp32 exactly and rounded once to nearest even; NaN stays
 * NaN with its sign and top payload bits (quiet bit set). Buffers need no
 * alignment and must not overlap. Never fails. */
void cpu_convert(const void *in, st_dtype in_dt, void *out, st_dtype out_dt, uint64_t n);

/* NaN and Inf values (every exponent bit set) among n elements of buf, of
 * dtype F16, BF16 or F32; 0 for any other dtype. buf needs the dtype's
 * alignment. The merge counts them in every output for its summary. */
uint64_t cpu_count_nonfinite(const void *buf, st_dtype dtype, uint64_t n);

#endif
