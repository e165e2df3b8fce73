/* The kernel tests' chunked runs over a tensor held whole in memory: the
 * chunk of rows [row0, row0 + n_rows), and the random row count of the next
 * chunk (test_rng.h's generator). */
#ifndef MS_TEST_CHUNKS_H
#define MS_TEST_CHUNKS_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "merge_reference.h"
#include "pipeline/merge_passes.h"
#include "test_rng.h"

/* The chunk of rows [row0, row0 + n_rows) of p's tensor, inputs in[0..n]
 * (NULL where absent) and output out, each the whole tensor's buffer. */
static inline ms_chunk test_chunk(const ms_tensor_params *p, void *const *in, void *out, uint64_t row0,
                                  uint64_t n_rows)
{
    ms_chunk c;
    memset(&c, 0, sizeof c);
    c.row0 = row0;
    c.n_rows = n_rows;
    c.elem0 = row0 * p->cols;
    c.n_elems = n_rows * p->cols;
    for (unsigned i = 0; i <= p->n_models; i++)
        c.in[i] = in[i] ? (const unsigned char *)in[i] + c.elem0 * ref_dtype_size(p->in_dtype[i]) : NULL;
    c.out = (unsigned char *)out + c.elem0 * ref_dtype_size(p->out_dtype);
    return c;
}

/* Rows of the next chunk of a rows-row tensor starting at row r: everything
 * left, or (chunked) a random count, often small, so that chunks start and
 * end inside 65,536-element blocks. */
static inline uint64_t test_chunk_rows(uint64_t rows, uint64_t r, bool chunked)
{
    uint64_t left = rows - r;
    if (!chunked || left <= 1)
        return left;
    uint64_t cap = rng_next() % 2 ? left : 1 + rows / 4;
    return 1 + rng_next() % (cap < left ? cap : left);
}

#endif
