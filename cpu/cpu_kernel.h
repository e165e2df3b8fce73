/* What every kernel file of cpu/ shares: CPU_CLONES and CPU_ASSERT. */
#ifndef MS_CPU_KERNEL_H
#define MS_CPU_KERNEL_H

#include <stdio.h>
#include <stdlib.h>

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

#endif
