/* `mergestream merge --dry-run`: what a merge would do, from its plan and
 * output layout, without reading tensor data or writing anything. */
#ifndef MS_MERGE_DRY_RUN_H
#define MS_MERGE_DRY_RUN_H

#include <stdbool.h>
#include <stdint.h>

#include "io/st_writer.h"
#include "pipeline/merge_plan.h"

/* Prints the plan: with json, one JSON object on stdout (the totals and one
 * entry per output tensor: name, dtype, shape, merged or copied, row chunks,
 * passes); else a summary on stderr. pool_bytes: the staging pool the merge
 * would map. */
void ms_merge_print_dry_run(const ms_plan *plan, const st_plan *layout, uint64_t pool_bytes, bool json);

#endif
