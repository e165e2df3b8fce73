/* Size arguments: "512M", "4G" (powers of 1024), "5GB" (powers of 1000), "123"
 * (bytes). A bare "B" suffix is malformed: mergekit writes "1B" for a
 * billion, and taking it as one byte would cut a shard per tensor. */
#ifndef MS_SIZE_PARSE_H
#define MS_SIZE_PARSE_H

#include <stdbool.h>
#include <stdint.h>

/* Returns 0 and *out, -EINVAL for a malformed size, -ERANGE on overflow. */
int ms_size_parse(const char *text, uint64_t *out);

#endif
