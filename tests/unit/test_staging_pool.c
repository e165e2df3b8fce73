/* The staging pool's page prefault (used before pinning it for the GPU):
 * every page of the pool is resident afterwards, whatever the thread count
 * and whether the capacity divides evenly among the tasks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpu/cpu_pool.h"
#include "pipeline/staging_pool.h"

/* Pages of [base, base + len) that are resident (mincore). */
static uint64_t resident_pages(void *base, uint64_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t n = (len + (uint64_t)page - 1) / (uint64_t)page, count = 0;
    unsigned char *vec = malloc(n);
    assert_non_null(vec);
    assert_int_equal(mincore(base, len, vec), 0);
    for (uint64_t i = 0; i < n; i++)
        count += vec[i] & 1;
    free(vec);
    return count;
}

static void test_prefault_makes_every_page_resident(void **state)
{
    (void)state;
    long page = sysconf(_SC_PAGESIZE);
    for (unsigned threads = 1; threads <= 3; threads++) {
        cpu_pool *cpu = NULL;
        assert_int_equal(cpu_pool_open(threads, &cpu), 0);
        ms_pool *pool = NULL;
        ms_error err;
        assert_int_equal(ms_pool_open((uint64_t)(37 << 20) + 3 * (uint64_t)page, &pool, &err), 0);
        uint64_t cap = ms_pool_capacity(pool), pages = (cap + (uint64_t)page - 1) / (uint64_t)page;
        assert_true(resident_pages(ms_pool_base(pool), cap) < pages); /* mapped lazily */
        ms_pool_prefault(pool, cpu);
        assert_int_equal(resident_pages(ms_pool_base(pool), cap), pages);
        ms_pool_close(pool);
        cpu_pool_close(cpu);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefault_makes_every_page_resident),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
