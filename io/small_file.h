/* Whole-file reads of small files (JSON configs, indexes, recipes). */
#ifndef MS_SMALL_FILE_H
#define MS_SMALL_FILE_H

#include <stddef.h>

#include "io/ms_error.h"

/* Reads all of path (at most max_bytes, else an MS_EXIT_DATA error) into a
 * NUL-terminated malloc'd buffer the caller frees. Returns 0, or -1 with err
 * set (MS_EXIT_RUNTIME for I/O errors, MS_EXIT_DATA for a missing file). */
int ms_small_file_read(const char *path, size_t max_bytes, char **out, size_t *len, ms_error *err);

/* ms_small_file_read, then parsed as JSON: 0 and *out (cJSON_Delete it), or
 * -1 with err set (ms_small_file_read's errors; MS_EXIT_DATA "not valid
 * JSON" naming path). */
struct cJSON;
int ms_small_file_json(const char *path, size_t max_bytes, struct cJSON **out, ms_error *err);

#endif
