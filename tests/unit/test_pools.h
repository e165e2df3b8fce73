/* What the kernel tests share: cpu pools of 1, 2 and 3 threads (every case
 * runs on each, and the bytes may not depend on the count), and the random
 * seed (test_rng.h's test_seed). Include it in one test program's .c file,
 * after cmocka.h. */
#ifndef MS_TEST_POOLS_H
#define MS_TEST_POOLS_H

#include "cpu/cpu_pool.h"
#include "test_rng.h"

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

#endif
