/* What the kernel tests share: cpu pools of 1, 2 and 3 threads (every case
 * runs on each, and the bytes may not depend on the count), and the random
 * seed, printed so that MS_TEST_SEED=N replays a run. Include it in one test
 * program's .c file, after cmocka.h. */
#ifndef MS_TEST_POOLS_H
#define MS_TEST_POOLS_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "cpu/cpu_pool.h"

static cpu_pool *g_pool[4]; /* [t]: t threads (1..3) */

/* cmocka group setup and teardown: the three pools. */
static int pools_open(void **state)
{
    (void)state;
    for (unsigned t = 1; t <= 3; t++)
        if (cpu_pool_open(t, &g_pool[t]) != 0)
            return -1;
    return 0;
}

static int pools_close(void **state)
{
    (void)state;
    for (unsigned t = 1; t <= 3; t++)
        cpu_pool_close(g_pool[t]);
    return 0;
}

/* MS_TEST_SEED, else the time; printed with the test's name. */
static uint64_t test_seed(const char *test_name)
{
    const char *env = getenv("MS_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    printf("%s: seed %" PRIu64 " (MS_TEST_SEED=%" PRIu64 " replays it)\n", test_name, seed, seed);
    fflush(stdout);
    return seed;
}

#endif
