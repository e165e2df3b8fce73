#include "pipeline/staging_pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpu/cpu_pool.h"
#include "io/ms_fault.h"

typedef struct pool_span {
    uint64_t off, len;
} pool_span;

struct ms_pool {
    uint8_t *base;            /* written once at open */
    uint64_t capacity;        /* written once at open */
    pthread_mutex_t lock;
    pthread_cond_t freed;     /* broadcast by free and shutdown */
    /* All fields below are guarded by lock (any thread allocates/frees). */
    pool_span *free_spans;    /* address-ordered, coalesced */
    size_t n_free, cap_free;
    pool_span *used;          /* unordered: off -> len of live allocations */
    size_t n_used, cap_used;
    uint64_t in_use, high_water;
    bool shutdown;
};

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static bool spans_reserve(pool_span **arr, size_t *cap, size_t need)
{
    if (need <= *cap)
        return true;
    size_t n = *cap ? *cap * 2 : 16;
    while (n < need)
        n *= 2;
    pool_span *grown = realloc(*arr, n * sizeof *grown);
    if (!grown)
        return false;
    *arr = grown;
    *cap = n;
    return true;
}

uint64_t ms_pool_capacity_for(uint64_t max_memory)
{
    uint64_t cap = max_memory > MS_POOL_OVERHEAD_BYTES + MS_POOL_MIN_BYTES
                       ? max_memory - MS_POOL_OVERHEAD_BYTES
                       : MS_POOL_MIN_BYTES;
    return cap / MS_POOL_ALIGN * MS_POOL_ALIGN;
}

int ms_pool_open(uint64_t capacity, ms_pool **out, ms_error *err)
{
    *out = NULL;
    uint64_t cap = capacity < MS_POOL_MIN_BYTES ? MS_POOL_MIN_BYTES : capacity;
    cap = cap / MS_POOL_ALIGN * MS_POOL_ALIGN;
    ms_pool *p = calloc(1, sizeof *p);
    if (!p || ms_fault_hit(MS_FAULT_HOST_ALLOC)) {
        free(p);
        return ms_error_set(err, MS_EXIT_RUNTIME, "staging pool", "out of memory");
    }
    void *base = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        int e = errno;
        free(p);
        return ms_error_errno(err, MS_EXIT_RUNTIME, e, "staging pool", "cannot map %llu bytes",
                              (unsigned long long)cap);
    }
    /* No MADV_HUGEPAGE: huge pages would read about a quarter faster from a
     * hot page cache (bench/bench_read), but registering the pool faults it
     * all in at start, and with the page cache full the kernel compacts
     * memory for every huge page: up to 1.5 s per GiB measured here
     * (bench/RESULTS.md), more than a 1 GB merge takes. */
    p->base = base;
    p->capacity = cap;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->freed, NULL);
    if (!spans_reserve(&p->free_spans, &p->cap_free, 1)) {
        ms_pool_close(p);
        return ms_error_set(err, MS_EXIT_RUNTIME, "staging pool", "out of memory");
    }
    p->free_spans[0] = (pool_span){0, cap};
    p->n_free = 1;
    *out = p;
    return 0;
}

void ms_pool_close(ms_pool *p)
{
    if (!p)
        return;
    if (p->base)
        munmap(p->base, p->capacity);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->freed);
    free(p->free_spans);
    free(p->used);
    free(p);
}

uint64_t ms_pool_capacity(const ms_pool *p) { return p->capacity; }

typedef struct prefault_ctx {
    unsigned char *base;
    uint64_t capacity, page, per_task;
} prefault_ctx;

static void prefault_task(void *arg, unsigned task, unsigned worker)
{
    (void)worker;
    const prefault_ctx *c = arg;
    uint64_t lo = (uint64_t)task * c->per_task;
    uint64_t hi = lo + c->per_task < c->capacity ? lo + c->per_task : c->capacity;
    for (uint64_t off = lo; off < hi; off += c->page)
        ((volatile unsigned char *)c->base)[off] = 0; /* a write: a read would map the shared zero page */
}

void ms_pool_prefault(ms_pool *p, cpu_pool *cpu)
{
    long page = sysconf(_SC_PAGESIZE);
    prefault_ctx c = {.base = p->base, .capacity = p->capacity, .page = page > 0 ? (uint64_t)page : 4096};
    unsigned tasks = 4 * cpu_pool_size(cpu);
    c.per_task = (p->capacity / tasks + c.page - 1) / c.page * c.page;
    if (c.per_task == 0)
        c.per_task = c.page;
    cpu_pool_run(cpu, (unsigned)((p->capacity + c.per_task - 1) / c.per_task), prefault_task, &c);
}
void *ms_pool_base(const ms_pool *p) { return p->base; }

/* First fit; returns the offset or UINT64_MAX. Caller holds the lock. */
static uint64_t pool_take(ms_pool *p, uint64_t len)
{
    for (size_t i = 0; i < p->n_free; i++) {
        if (p->free_spans[i].len < len)
            continue;
        uint64_t off = p->free_spans[i].off;
        p->free_spans[i].off += len;
        p->free_spans[i].len -= len;
        if (p->free_spans[i].len == 0) {
            memmove(&p->free_spans[i], &p->free_spans[i + 1], (p->n_free - i - 1) * sizeof *p->free_spans);
            p->n_free--;
        }
        return off;
    }
    return UINT64_MAX;
}

static void *pool_alloc(ms_pool *p, uint64_t bytes, bool wait)
{
    MS_ASSERT(bytes > 0);
    uint64_t len = round_up(bytes, MS_POOL_ALIGN);
    MS_ASSERT(len <= p->capacity);
    pthread_mutex_lock(&p->lock);
    uint64_t off = UINT64_MAX;
    while (!p->shutdown && (off = pool_take(p, len)) == UINT64_MAX && wait)
        pthread_cond_wait(&p->freed, &p->lock);
    if (off == UINT64_MAX) { /* shut down, or not free and not waiting */
        pthread_mutex_unlock(&p->lock);
        return NULL;
    }
    /* The used table cannot fail to grow in practice (a few hundred entries);
     * if it does, the invariant "every buffer is tracked" would break. */
    MS_ASSERT(spans_reserve(&p->used, &p->cap_used, p->n_used + 1));
    p->used[p->n_used++] = (pool_span){off, len};
    p->in_use += len;
    if (p->in_use > p->high_water)
        p->high_water = p->in_use;
    pthread_mutex_unlock(&p->lock);
    return p->base + off;
}

void *ms_pool_alloc(ms_pool *p, uint64_t bytes) { return pool_alloc(p, bytes, true); }
void *ms_pool_try_alloc(ms_pool *p, uint64_t bytes) { return pool_alloc(p, bytes, false); }

void ms_pool_free(ms_pool *p, void *buf)
{
    if (!buf)
        return;
    uint64_t off = (uint64_t)((uint8_t *)buf - p->base);
    pthread_mutex_lock(&p->lock);
    size_t u = 0;
    while (u < p->n_used && p->used[u].off != off)
        u++;
    MS_ASSERT(u < p->n_used); /* freeing a buffer the pool never gave out */
    uint64_t len = p->used[u].len;
    p->used[u] = p->used[--p->n_used];
    p->in_use -= len;

    size_t i = 0; /* insert position keeping address order */
    while (i < p->n_free && p->free_spans[i].off < off)
        i++;
    bool merge_prev = i > 0 && p->free_spans[i - 1].off + p->free_spans[i - 1].len == off;
    bool merge_next = i < p->n_free && off + len == p->free_spans[i].off;
    if (merge_prev && merge_next) {
        p->free_spans[i - 1].len += len + p->free_spans[i].len;
        memmove(&p->free_spans[i], &p->free_spans[i + 1], (p->n_free - i - 1) * sizeof *p->free_spans);
        p->n_free--;
    } else if (merge_prev) {
        p->free_spans[i - 1].len += len;
    } else if (merge_next) {
        p->free_spans[i].off = off;
        p->free_spans[i].len += len;
    } else {
        MS_ASSERT(spans_reserve(&p->free_spans, &p->cap_free, p->n_free + 1));
        memmove(&p->free_spans[i + 1], &p->free_spans[i], (p->n_free - i) * sizeof *p->free_spans);
        p->free_spans[i] = (pool_span){off, len};
        p->n_free++;
    }
    pthread_cond_broadcast(&p->freed);
    pthread_mutex_unlock(&p->lock);
}

void ms_pool_shutdown(ms_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->shutdown = true;
    pthread_cond_broadcast(&p->freed);
    pthread_mutex_unlock(&p->lock);
}

uint64_t ms_pool_in_use(ms_pool *p)
{
    pthread_mutex_lock(&p->lock);
    uint64_t v = p->in_use;
    pthread_mutex_unlock(&p->lock);
    return v;
}

void ms_pool_wait_below(ms_pool *p, uint64_t in_use)
{
    pthread_mutex_lock(&p->lock);
    while (!p->shutdown && p->in_use >= in_use && p->in_use > 0)
        pthread_cond_wait(&p->freed, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

uint64_t ms_pool_high_water(ms_pool *p)
{
    pthread_mutex_lock(&p->lock);
    uint64_t v = p->high_water;
    pthread_mutex_unlock(&p->lock);
    return v;
}
