/* CPU_CLONES: compile a hot loop three times (AVX-512, AVX2, baseline x86-64)
 * and pick the clone for the running CPU at load time. The build turns off
 * FMA contraction (-ffp-contract=off), so every clone performs the same IEEE
 * operations in the same order and writes the same bits: the vector width
 * changes the speed, never the output. Other compilers and architectures get
 * the one plain version. */
#ifndef MS_CPU_CLONES_H
#define MS_CPU_CLONES_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif

#endif
