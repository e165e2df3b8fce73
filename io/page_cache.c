#include "io/page_cache.h"

#include <sys/mman.h>
#include <unistd.h>

/* A 140 GB model has 34 million pages: asking mincore about every one takes
 * seconds and a 34 MB vector. Up to PC_SAMPLES * PC_WINDOW_PAGES pages every
 * page is counted; above that, PC_SAMPLES windows of PC_WINDOW_PAGES pages
 * spread evenly from the first page to the last stand for the file, so the
 * cost is the same whatever its size. The answer only decides how far the
 * reader runs ahead, so an estimate is enough. */
#define PC_SAMPLES 256
#define PC_WINDOW_PAGES 16

static uint64_t count_resident(const unsigned char *at, uint64_t pages, uint64_t page)
{
    unsigned char vec[PC_SAMPLES * PC_WINDOW_PAGES];
    uint64_t n = 0;
    if (mincore((void *)at, (size_t)(pages * page), vec) != 0)
        return 0;
    for (uint64_t i = 0; i < pages; i++)
        n += vec[i] & 1;
    return n;
}

uint64_t ms_page_cache_resident(int fd, uint64_t size)
{
    long page_size = sysconf(_SC_PAGESIZE);
    if (size == 0 || page_size <= 0 || size > (uint64_t)SIZE_MAX)
        return 0;
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return 0;
    const unsigned char *base = map;
    uint64_t page = (uint64_t)page_size, pages = (size + page - 1) / page, resident = 0, counted = 0;
    if (pages <= PC_SAMPLES * PC_WINDOW_PAGES) {
        resident = count_resident(base, pages, page);
        counted = pages;
    } else {
        for (uint64_t s = 0; s < PC_SAMPLES; s++) {
            uint64_t first = s * (pages - PC_WINDOW_PAGES) / (PC_SAMPLES - 1);
            resident += count_resident(base + first * page, PC_WINDOW_PAGES, page);
            counted += PC_WINDOW_PAGES;
        }
    }
    munmap(map, (size_t)size);
    if (resident == counted)
        return size;
    return (uint64_t)((double)size * (double)resident / (double)counted);
}
