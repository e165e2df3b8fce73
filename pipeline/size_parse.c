#include "pipeline/size_parse.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* K/M/G/T are powers of 1024, KB/MB/GB/TB powers of 1000 (DESIGN.md, CLI). */
int ms_size_parse(const char *text, uint64_t *out)
{
    if (!text || !isdigit((unsigned char)text[0]))
        return -EINVAL;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno)
        return -EINVAL;
    uint64_t mult = 1;
    if (*end) {
        static const struct { const char *suffix; uint64_t mult; } k_units[] = {
            {"K", 1ull << 10}, {"M", 1ull << 20}, {"G", 1ull << 30}, {"T", 1ull << 40},
            {"KB", 1000ull}, {"MB", 1000000ull}, {"GB", 1000000000ull}, {"TB", 1000000000000ull},
        }; /* no "B": mergekit's --out-shard-size reads "1B" as a billion, bytes would surprise */
        bool found = false;
        for (size_t i = 0; i < sizeof k_units / sizeof k_units[0]; i++) {
            if (strcmp(end, k_units[i].suffix) == 0) {
                mult = k_units[i].mult;
                found = true;
                break;
            }
        }
        if (!found)
            return -EINVAL;
    }
    if (v > UINT64_MAX / mult)
        return -ERANGE;
    *out = (uint64_t)v * mult;
    return 0;
}
