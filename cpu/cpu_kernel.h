/* What every kernel file of cpu/ shares: CPU_CLONES, CPU_ASSERT and
 * cpu_widen. */
#ifndef MS_CPU_KERNEL_H
#define MS_CPU_KERNEL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/st_format.h"
#include "pipeline/merge_math.h"

/* CPU_CLONES: compile a hot loop three times (AVX-512, AVX2, baseline x86-64)
 * and pick the clone for the running CPU at load time. The build turns off
 * FMA contraction (-ffp-contract=off), so every clone performs the same IEEE
 * operations in the same order and writes the same bits: the vector width
 * changes the speed, never the output. Other compilers and architectures, and
 * builds with MERGESTREAM_CPU_CLONES=OFF, get the one plain version. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MERGESTREAM_NO_CPU_CLONES)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif

/* CPU_ASSERT: a broken invariant, i.e. a caller bug. cpu/ does not link io/,
 * whose MS_ASSERT does the same. */
#define CPU_ASSERT(cond)                                                                                   \
    do {                                                                                                   \
        if (!(cond))                                                                                       \
            cpu_assert_fail(__FILE__, __LINE__, #cond);                                                    \
    } while (0)

_Noreturn static inline void cpu_assert_fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "mergestream: internal error at %s:%d: %s\n", file, line, what);
    abort();
}

/* dst[j] = element j of raw little-endian src of dtype dt (F32, F16 or
 * BF16; anything else is a caller bug) widened to fp32, ms_bf16_to_f32 /
 * ms_f16_to_f32 bit for bit; the bf16 NaN quieting is a mask, so the loop
 * vectorises. Always inlined: each CPU_CLONES clone compiles it for its own
 * instruction set. (cpu_merge.c's hot loops widen bf16 by a shift alone and
 * say there why that is enough for them.) */
static inline __attribute__((always_inline)) void cpu_widen(float *restrict dst, const unsigned char *restrict src,
                                                            st_dtype dt, size_t n)
{
    switch (dt) {
    case ST_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case ST_BF16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * j, 2);
            uint32_t u = (uint32_t)h << 16;
            uint32_t quiet = (0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u)) & 0x00400000u;
            dst[j] = ms_f32_from_bits(u | quiet);
        }
        break;
    case ST_F16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * j, 2);
            dst[j] = ms_f16_to_f32(h);
        }
        break;
    default:
        CPU_ASSERT(!"input dtype is not F16, BF16 or F32");
    }
}

#endif
