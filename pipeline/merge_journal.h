/* The resume journal, DIR/mergestream.journal: which shards of this merge
 * are final, with their hashes, so `merge --resume` after a crash or kill
 * keeps them and redoes the rest, ending with the bytes of an uninterrupted
 * run.
 *
 * Format (text, one record a line, each appended and fsynced before the next
 * shard can be counted on):
 *   mergestream-journal 1 FINGERPRINT
 *   shard INDEX FILE SHARD_HASH N TENSOR_HASH_1 ... TENSOR_HASH_N
 * hashes as 16 hex digits. FINGERPRINT is the XXH3-64 of everything that
 * determines the output bytes (recipe text, seed, shard size, the output
 * layout, every input file's path, size and modification time): a journal of
 * another merge is never used. A torn last line (a kill mid-write) is ignored.
 * The journal is removed when the merge completes. */
#ifndef MS_MERGE_JOURNAL_H
#define MS_MERGE_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#include "io/ms_error.h"
#include "io/st_writer.h"
#include "pipeline/merge_plan.h"

#define MS_JOURNAL_NAME "mergestream.journal"

typedef struct ms_journal ms_journal;

/* One finished shard, as the journal recorded it. */
typedef struct ms_journal_shard {
    size_t index;
    uint64_t shard_hash;
    uint64_t *tensor_hashes; /* the shard's tensors, in order (owned) */
    size_t n;
} ms_journal_shard;

uint64_t ms_journal_fingerprint(const ms_plan *plan, const st_plan *layout, uint64_t shard_size);

/* Reads DIR's journal. Returns the number of shard records (0.. ) in
 * *shards (free with ms_journal_shards_free), or -1 with err set when there is
 * no journal or it belongs to another merge (MS_EXIT_USAGE: the caller says
 * to start over with --force). */
int ms_journal_load(const char *dir, uint64_t fingerprint, const st_plan *layout, ms_journal_shard **shards,
                    size_t *n, ms_error *err);
void ms_journal_shards_free(ms_journal_shard *shards, size_t n);

/* Starts a fresh journal (truncating any old one) with the header line. */
int ms_journal_create(const char *dir, uint64_t fingerprint, ms_journal **out, ms_error *err);

/* Appends and fsyncs one shard record. */
int ms_journal_record(ms_journal *j, const st_plan *layout, size_t shard, uint64_t shard_hash,
                      const uint64_t *tensor_hashes, ms_error *err);

/* Closes the journal; with remove, deletes the file (a completed merge). NULL is a no-op. */
void ms_journal_close(ms_journal *j, int remove);

#endif
