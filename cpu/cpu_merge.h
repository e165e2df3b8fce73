/* The CPU merge kernels: one pass of pipeline/merge_passes.h's plan over one
 * chunk, parallel over element ranges (or, for della, over whole rows) via the
 * thread pool. The arithmetic is pipeline/merge_math.h's; results are
 * byte-identical for every chunking and thread count (and to the CUDA
 * backend's).
 *
 * Inside a chunk the work is cut into windows (at most 2^24 elements, or
 * 2^22 elements of whole rows for della's L1 pass) that are processed like
 * chunks of their own; this bounds the scratch memory whatever the chunk
 * size. */
#ifndef MS_CPU_MERGE_H
#define MS_CPU_MERGE_H

#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

/* Runs pass `pass` of st's plan over chunk c (the pass's next chunk in row
 * order: c->elem0 must equal st->next_elem). The APPLY pass writes c->out;
 * other passes update st. Blocks until done. Returns 0, or -ENOMEM when the
 * scratch could not be allocated (then the state is undefined: close it and
 * start the tensor over). A chunk that breaks the pass order aborts (a caller
 * bug). */
int cpu_merge_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                       cpu_pool *pool);

/* An upper bound of the host memory cpu_merge_run_pass allocates for a chunk
 * of at most n_rows rows of p with a pool of n_threads threads: per-thread
 * tiles and histograms (about 1.1 MiB per thread when the method selects by
 * magnitude), della's per-row buffers (about 61 + 4 * n_models bytes per
 * column per thread, plus a per-rank threshold table of 8 * n_models bytes
 * per column) and window arrays (della's L1 keep mask: up to 4 MiB). Nearly
 * independent of n_rows. Never fails (UINT64_MAX when the sizes overflow). */
uint64_t cpu_merge_scratch_bytes(const ms_tensor_params *p, uint64_t n_rows, unsigned n_threads);

/* Tests only: element windows of `elems` elements and della windows of
 * `della_elems` elements (0 restores the defaults), so that small tensors
 * cross window boundaries. Not thread-safe: call before any pass runs. */
void cpu_merge_set_windows_for_tests(uint64_t elems, uint64_t della_elems);

#endif
