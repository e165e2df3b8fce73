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

#endif
