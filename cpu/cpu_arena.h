/* The scratch arena of a CPU merge kernel: one aligned allocation per call,
 * sized piece by piece with cpu_arena_add and then carved with
 * CPU_ARENA_CARVE in the same order. Every piece starts on a cache line, so
 * no two workers' pieces share one. */
#ifndef MS_CPU_ARENA_H
#define MS_CPU_ARENA_H

#include <stdbool.h>
#include <stdint.h>

#define CPU_ARENA_ALIGN 64u

static inline uint64_t cpu_arena_align(uint64_t v)
{
    return (v + CPU_ARENA_ALIGN - 1) / CPU_ARENA_ALIGN * CPU_ARENA_ALIGN;
}

/* Adds a piece of n items of size bytes to *acc; false on overflow. */
static inline bool cpu_arena_add(uint64_t *acc, uint64_t n, uint64_t size)
{
    uint64_t bytes;
    if (__builtin_mul_overflow(n, size, &bytes) || bytes > UINT64_MAX - CPU_ARENA_ALIGN)
        return false;
    return !__builtin_add_overflow(*acc, cpu_arena_align(bytes), acc);
}

/* ptr = the piece of count items of type at byte off of base; off moves past it. */
#define CPU_ARENA_CARVE(ptr, type, count, base, off)                                                       \
    do {                                                                                                   \
        (ptr) = (type *)((base) + (off));                                                                  \
        (off) += cpu_arena_align((uint64_t)(count) * sizeof(type));                                        \
    } while (0)

#endif
