/* Re-checking a merge output: every shard is validated as strictly as an
 * input, the index and the shards agree both ways (io/model_dir.c), and when
 * mergestream.json is present every tensor's and every shard's XXH3-64 is
 * recomputed and compared with it. Used by `mergestream verify` and at the
 * end of every merge (unless --no-verify). */
#ifndef MS_VERIFY_OUTPUT_H
#define MS_VERIFY_OUTPUT_H

#include <stdbool.h>
#include <stddef.h>

#include "cpu/cpu_pool.h"
#include "io/ms_error.h"

typedef struct ms_verify_result {
    size_t n_tensors;
    unsigned n_shards;
    bool have_manifest; /* false: only the structure was checked */
} ms_verify_result;

/* Returns 0 when everything matches; -1 with err set (MS_EXIT_DATA naming the
 * file and tensor for a mismatch or an invalid file, MS_EXIT_RUNTIME for I/O;
 * the first failing tensor in file order). The tensors are hashed on cpu's
 * threads (NULL: on the calling thread), with a progress line per tensor
 * ("hash", pipeline/progress.h): re-reading a 140 GB output takes minutes. */
int ms_verify_output(const char *dir, cpu_pool *cpu, ms_verify_result *res, ms_error *err);

#endif
