/* The staging pool: every byte of tensor data passes through it, so its size
 * (--max-memory less a fixed allowance for everything else) bounds the
 * process's resident memory whatever the model size.
 *
 * One anonymous mmap region, cut into allocations by first fit over an
 * address-ordered free list that coalesces on free. Allocation blocks while
 * not enough contiguous space is free: that wait is the pipeline's
 * back-pressure. Sizes are rounded up to 4 KiB so buffers suit O_DIRECT and
 * page-granular registration.
 *
 * Size formula: capacity = max_memory - MS_POOL_OVERHEAD_BYTES (the allowance
 * for code, thread stacks, headers and per-tensor statistics), rounded down to
 * 4 KiB, at least MS_POOL_MIN_BYTES. */
#ifndef MS_STAGING_POOL_H
#define MS_STAGING_POOL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/ms_error.h"

#define MS_POOL_OVERHEAD_BYTES (24ull << 20)
#define MS_POOL_MIN_BYTES (1ull << 20)
#define MS_POOL_ALIGN 4096ull

typedef struct ms_pool ms_pool;

/* The largest capacity the formula above allows for max_memory. */
uint64_t ms_pool_capacity_for(uint64_t max_memory);

/* Maps a pool of `capacity` bytes (rounded down to 4 KiB, at least
 * MS_POOL_MIN_BYTES). Returns 0 and *out, or -1 with err set (mmap failure
 * or a host_alloc fault). */
int ms_pool_open(uint64_t capacity, ms_pool **out, ms_error *err);
void ms_pool_close(ms_pool *p);

uint64_t ms_pool_capacity(const ms_pool *p);

/* Faults every page of the pool in, the pages split over cpu's threads. The
 * GPU path calls it before pinning the pool (cudaHostRegister), which would
 * otherwise fault and zero every page on one thread: with the CUDA context,
 * about 1 s before the first tensor for a 1.5 GiB pool and 3 s for 8 GiB on
 * an H200 machine (bench/RESULTS.md). The CPU path leaves the pages to be
 * faulted on first use. */
struct cpu_pool;
void ms_pool_prefault(ms_pool *p, struct cpu_pool *cpu);
/* The mapped region, for registration with io_uring / cudaHostRegister. */
void *ms_pool_base(const ms_pool *p);

/* Takes `bytes` (> 0, <= capacity) from the pool, blocking until they are
 * free or the pool is shut down. Returns the buffer, or NULL after
 * ms_pool_shutdown. A request larger than the capacity is a broken invariant. */
void *ms_pool_alloc(ms_pool *p, uint64_t bytes);

/* Like ms_pool_alloc, but returns NULL at once instead of waiting when the
 * space is not free now (for a thread that has other work to do first). */
void *ms_pool_try_alloc(ms_pool *p, uint64_t bytes);

/* Returns a buffer from ms_pool_alloc; NULL is a no-op. Wakes waiters. */
void ms_pool_free(ms_pool *p, void *buf);

/* Wakes every waiter; later allocations return NULL. */
void ms_pool_shutdown(ms_pool *p);

/* Bytes handed out and not yet freed. */
uint64_t ms_pool_in_use(ms_pool *p);

/* Blocks until fewer than in_use bytes are handed out (or none are, or the
 * pool is shut down). */
void ms_pool_wait_below(ms_pool *p, uint64_t in_use);

/* The most bytes ever allocated at once (for the summary). */
uint64_t ms_pool_high_water(ms_pool *p);

#endif
