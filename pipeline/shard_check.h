/* Re-reading each output shard as soon as the writer has committed it
 * (fsync, rename), on a thread of its own, while the page cache still holds
 * the bytes just written. The merge's final verify then takes those hashes
 * instead of reading the shard again (verify_output.h). Without this, a
 * merge whose output the page cache cannot keep whole (larger than RAM, or
 * in a small memory cgroup) reads every shard back from the disk at the end:
 * a third more time for a three-model merge (bench/RESULTS.md).
 *
 * Only from the cache: the newest committed shard first, and a shard the
 * cache has lost (less than 90% resident, io/page_cache.h) is left to the
 * final verify, so the check never adds disk reads beside the run's own.
 *
 * The check compares nothing itself: it opens the shard as strictly as any
 * input and hashes each tensor through the file's own header, and the final
 * verify compares those hashes with the manifest exactly as it compares the
 * ones it reads, for each shard whose file is still the one read (inode,
 * size, mtime, ctime). A read error or an invalid file is the run's error,
 * as in the final verify.
 *
 * Threading: ms_shard_check_post from one thread at a time (the pipeline's
 * writer); open, finish and close from one owning thread. */
#ifndef MS_SHARD_CHECK_H
#define MS_SHARD_CHECK_H

#include <stddef.h>

#include "io/ms_error.h"
#include "pipeline/verify_output.h"

typedef struct ms_shard_check ms_shard_check;

/* Starts the thread for up to n_shards shards of the output directory dir
 * (copied). Returns 0 and *out, or -1 with err set (MS_EXIT_RUNTIME). */
int ms_shard_check_open(const char *dir, size_t n_shards, ms_shard_check **out, ms_error *err);

/* Queues the committed shard file `file` (a name in dir, copied). Each shard
 * once, at most n_shards in all. Never blocks on the check. */
void ms_shard_check_post(ms_shard_check *c, const char *file);

/* Stops the thread: the shard in hand is given up at its next tensor and the
 * queued ones are dropped (the final verify reads those on every core, which
 * is faster than this one thread; the last shard usually commits just before
 * the run ends). Returns 0 with the shards read whole in *early and *n_early
 * (free with ms_shard_hashes_free; NULL and 0 when none), or -1 with err set
 * by the first check that failed. */
int ms_shard_check_finish(ms_shard_check *c, ms_shard_hashes **early, size_t *n_early, ms_error *err);

/* Stops the thread if running and frees everything. NULL is a no-op. */
void ms_shard_check_close(ms_shard_check *c);

#endif
