/* How much of a file the page cache holds, without reading it: a hot merge
 * (inputs already cached) and a cold one want different read-ahead
 * (pipeline/merge_run.c). */
#ifndef MS_PAGE_CACHE_H
#define MS_PAGE_CACHE_H

#include <stdint.h>

/* Bytes of [0, size) of the open file fd that are in the page cache (mincore
 * over a read-only mapping, which reads nothing): exact for files up to 16 MiB
 * (4 KiB pages), estimated from 256 evenly spread samples above that, so a
 * 100 GB shard costs what a small one does. 0 when that cannot be told
 * (mapping refused, size 0). */
uint64_t ms_page_cache_resident(int fd, uint64_t size);

#endif
