#include "io/page_cache.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

uint64_t ms_page_cache_resident(int fd, uint64_t size)
{
    long page = sysconf(_SC_PAGESIZE);
    if (size == 0 || page <= 0 || size > (uint64_t)SIZE_MAX)
        return 0;
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return 0;
    uint64_t pages = (size + (uint64_t)page - 1) / (uint64_t)page, resident = 0;
    unsigned char *vec = malloc((size_t)pages);
    if (vec && mincore(map, (size_t)size, vec) == 0)
        for (uint64_t i = 0; i < pages; i++)
            resident += vec[i] & 1;
    free(vec);
    munmap(map, (size_t)size);
    resident *= (uint64_t)page;
    return resident < size ? resident : size;
}
