/* mergestream.json, the merge manifest: what was merged, how, and the hash
 * of every tensor and shard (io/checksum.h defines them), so `verify` can
 * re-check an output and a rerun can be compared. Written last, atomically. */
#ifndef MS_MANIFEST_H
#define MS_MANIFEST_H

#include "io/st_writer.h"
#include "pipeline/merge_plan.h"
#include "pipeline/merge_run.h"

#define MS_MANIFEST_NAME "mergestream.json"
#define MS_MANIFEST_FORMAT 1

/* Writes DIR/mergestream.json for a finished writer. Returns 0 or -1 with err
 * set naming the file. */
int ms_manifest_write(const char *dir, const ms_plan *plan, const st_plan *layout, const st_writer *w,
                      const ms_run_stats *stats, ms_error *err);

#endif
