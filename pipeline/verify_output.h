/* Re-checking a merge output: every shard is validated as strictly as an
 * input, the index and the shards agree both ways (io/model_dir.c), the
 * index's metadata.total_size is the tensors' bytes, no model*.safetensors
 * file lies beside the shards that is none of them, and when
 * mergestream.json is present every tensor's and every shard's XXH3-64 is
 * recomputed and compared with it. Used by `mergestream verify` and at the
 * end of every merge (unless --no-verify); `mergestream verify` also refuses
 * the leftovers of a merge that did not finish (ms_verify_output_leftovers). */
#ifndef MS_VERIFY_OUTPUT_H
#define MS_VERIFY_OUTPUT_H

#include <stdbool.h>
#include <stddef.h>

#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "io/ms_error.h"

typedef struct ms_verify_result {
    size_t n_tensors;
    unsigned n_shards;
    unsigned n_shards_read_early; /* shards whose hashes came from ms_shard_hashes */
    bool have_manifest;           /* false: only the structure was checked */
} ms_verify_result;

/* A shard's tensor hashes, read from its file earlier (pipeline/shard_check.h),
 * with the file's identity when it was read: the verify takes the hashes
 * instead of reading the shard again only while the file is that one,
 * unchanged. */
typedef struct ms_shard_hashes {
    char *file;          /* the shard's file name, without the directory (owned) */
    uint64_t dev, ino, size;
    int64_t mtime_ns, ctime_ns;
    size_t n_tensors;
    uint64_t *hashes;    /* per tensor, in the file's header order (owned) */
} ms_shard_hashes;

void ms_shard_hashes_free(ms_shard_hashes *h, size_t n);

/* Returns 0 when everything matches; -1 with err set (MS_EXIT_DATA naming the
 * file and tensor for a mismatch or an invalid file, MS_EXIT_RUNTIME for I/O;
 * the first failing tensor in file order). Stray shards and the index's
 * total_size are checked before any tensor is read. The tensors are hashed
 * on cpu's threads (NULL: on the calling thread), with a progress line per
 * tensor ("hash", pipeline/progress.h): re-reading a 140 GB output takes
 * minutes.
 * early (n_early entries, may be NULL): hashes read before, compared with
 * the manifest as if read now, for every shard whose file is still the one
 * they were read from. */
int ms_verify_output(const char *dir, cpu_pool *cpu, const ms_shard_hashes *early, size_t n_early,
                     ms_verify_result *res, ms_error *err);

/* Returns 0 when dir holds no trace of a merge that did not finish, else -1
 * with err set: MS_EXIT_DATA naming DIR/mergestream.journal (the merge looks
 * interrupted; `merge ... --resume` finishes it) or else the first *.partial
 * file by name (no journal to resume from: `merge ... --force` redoes it);
 * MS_EXIT_RUNTIME when dir cannot be listed. A path that is not a directory
 * passes: ms_verify_output says what is wrong with it. For `mergestream
 * verify` only: during a merge's own final verify its journal is still live. */
int ms_verify_output_leftovers(const char *dir, ms_error *err);

#endif
