/* XXH3-64 of a byte range of an open file, read with pread through a bounded
 * buffer (used by inspect --hash and verify, never on the merge's hot path). */
#ifndef MS_RANGE_HASH_H
#define MS_RANGE_HASH_H

#include <stdint.h>

#include "io/ms_error.h"

/* Hashes [offset, offset + len) of fd; `where` names the file in errors.
 * Returns 0 and *out, or -1 with err set (MS_EXIT_RUNTIME for a read error,
 * MS_EXIT_DATA when the file ends early). */
int ms_range_hash(int fd, uint64_t offset, uint64_t len, const char *where, uint64_t *out, ms_error *err);

#endif
