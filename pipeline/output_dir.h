/* The output directory around the shards: refusing to overwrite, the files
 * copied from the base (config.json with torch_dtype updated,
 * generation_config.json, tokenizer files) and their removal on failure. */
#ifndef MS_OUTPUT_DIR_H
#define MS_OUTPUT_DIR_H

#include <stdbool.h>

#include "io/ms_error.h"
#include "pipeline/merge_plan.h"

/* Creates dir if missing (*created says whether it did). An existing
 * non-empty dir is refused (MS_EXIT_USAGE, suggesting --force) unless
 * allow_existing; with clear, the files a merge writes (model*.safetensors*,
 * the index, mergestream.json, config.json, generation_config.json and the
 * tokenizer files) are removed first (--force; --resume keeps them), so no
 * file of an earlier merge stays beside the new one. Missing parent
 * directories are created. Returns 0 or -1. */
int ms_output_dir_prepare(const char *dir, bool allow_existing, bool clear, bool *created, ms_error *err);

/* ms_output_dir_prepare's checks alone, touching nothing (--dry-run): 0 for
 * a dir that does not exist, or one that may be used (empty, or
 * allow_existing); else -1 with its error. */
int ms_output_dir_check(const char *dir, bool allow_existing, ms_error *err);

/* Refuses (MS_EXIT_USAGE) an output directory that is where one of the
 * plan's inputs lives (a model's directory or a lone file's, an adapter's,
 * a Hessian set's, the tokenizer_source), compared after realpath: --force
 * would delete that input's weights, and its reads would race the writes.
 * A dir that does not exist yet is no input's. Returns 0 or -1. */
int ms_output_dir_check_not_input(const char *dir, const ms_plan *plan, ms_error *err);

/* Side files written by ms_output_dir_copy_side_files, to remove on failure. */
typedef struct ms_side_files {
    char **paths;
    unsigned n;
} ms_side_files;

/* Writes config.json (torch_dtype set to the recipe's output dtype when it
 * names one), generation_config.json and the tokenizer files of
 * plan->recipe->tokenizer_source (else the layout model) into dir, each
 * atomically. Files the source lacks are skipped. Returns 0 or -1. */
int ms_output_dir_copy_side_files(const char *dir, const ms_plan *plan, ms_side_files *written, ms_error *err);

/* Unlinks every file in written (best effort) and frees the list. */
void ms_side_files_remove(ms_side_files *written);
void ms_side_files_free(ms_side_files *written);

#endif
