/* The one fault-injection seam (DESIGN.md, Tests): MERGESTREAM_FAULT lists
 * "site:N" items separated by commas; the N-th call (1-based) at that site
 * fails. "site:N+" makes every call from the N-th on fail.
 * Sites: read, write, fsync, rename, host_alloc, gpu_alloc.
 *
 * Every place that performs one of these operations asks ms_fault_hit(site)
 * first and, when it returns true, behaves as if the operation had failed
 * (EIO for I/O, ENOMEM / NULL for allocations). Thread-safe; costs one atomic
 * increment per call when MERGESTREAM_FAULT is set and one relaxed load when it
 * is not. */
#ifndef MS_FAULT_H
#define MS_FAULT_H

#include <stdbool.h>
#include <stdint.h>

typedef enum ms_fault_site {
    MS_FAULT_READ,
    MS_FAULT_WRITE,
    MS_FAULT_FSYNC,
    MS_FAULT_RENAME,
    MS_FAULT_HOST_ALLOC,
    MS_FAULT_GPU_ALLOC,
    MS_FAULT_SITE_COUNT
} ms_fault_site;

/* True when this call at `site` must fail. Parses MERGESTREAM_FAULT on first use. */
bool ms_fault_hit(ms_fault_site site);

/* How many calls were made at `site` so far (tests use it to know how far to walk N). */
uint64_t ms_fault_calls(ms_fault_site site);

#endif
