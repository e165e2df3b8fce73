/* How a kernel file cuts one window of a tensor into cpu_pool tasks:
 * element tasks take whole 65,536-element blocks (MS_MERGE_BLOCK), so the
 * fp64 block sums of DESIGN.md's fixed order never straddle two tasks; row
 * tasks take whole rows. The bits of a result never depend on the cut, only
 * the speed does. */
#ifndef MS_CPU_SPLIT_H
#define MS_CPU_SPLIT_H

#include <stdint.h>

#include "pipeline/merge_passes.h"

typedef struct cpu_split {
    uint64_t e0, e1;  /* the window's elements [e0, e1), flat indices */
    uint64_t bpt;     /* element tasks: blocks per task */
    uint64_t r0, r1;  /* row tasks: rows [r0, r1) */
    uint64_t rpt;     /* row tasks: rows per task */
    unsigned n_tasks; /* tasks of the current cut */
} cpu_split;

/* Element tasks over [e0, e1) (e1 > e0), at most about max_tasks of them. */
static inline void cpu_split_elems(cpu_split *s, uint64_t e0, uint64_t e1, uint64_t max_tasks)
{
    s->e0 = e0;
    s->e1 = e1;
    uint64_t j0 = e0 / MS_MERGE_BLOCK, nb = (e1 - 1) / MS_MERGE_BLOCK - j0 + 1;
    s->bpt = (nb + max_tasks - 1) / max_tasks;
    s->n_tasks = (unsigned)((nb + s->bpt - 1) / s->bpt);
}

/* The window's blocks: how many the current element cut spans. */
static inline uint64_t cpu_split_blocks(const cpu_split *s)
{
    return (s->e1 - 1) / MS_MERGE_BLOCK - s->e0 / MS_MERGE_BLOCK + 1;
}

/* Element task `task`'s range [*a, *b). */
static inline void cpu_split_elem_range(const cpu_split *s, unsigned task, uint64_t *a, uint64_t *b)
{
    uint64_t j0 = s->e0 / MS_MERGE_BLOCK;
    uint64_t lo = (j0 + task * s->bpt) * MS_MERGE_BLOCK, hi = (j0 + (task + 1) * s->bpt) * MS_MERGE_BLOCK;
    *a = lo > s->e0 ? lo : s->e0;
    *b = hi < s->e1 ? hi : s->e1;
}

/* Row tasks over rows [r0, r1) (r1 > r0), at most max_tasks of them. */
static inline void cpu_split_rows(cpu_split *s, uint64_t r0, uint64_t r1, uint64_t max_tasks)
{
    s->r0 = r0;
    s->r1 = r1;
    uint64_t nr = r1 - r0;
    s->rpt = (nr + max_tasks - 1) / max_tasks;
    s->n_tasks = (unsigned)((nr + s->rpt - 1) / s->rpt);
}

/* Row task `task`'s rows [*ra, *rb). */
static inline void cpu_split_row_range(const cpu_split *s, unsigned task, uint64_t *ra, uint64_t *rb)
{
    *ra = s->r0 + (uint64_t)task * s->rpt;
    *rb = *ra + s->rpt < s->r1 ? *ra + s->rpt : s->r1;
}

#endif
