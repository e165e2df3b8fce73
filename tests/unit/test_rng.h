/* The tests' random numbers: splitmix64 over one global state, seeded by the
 * test (test_seed prints the seed so MS_TEST_SEED replays a run). Include it
 * in one test program's .c file (or one header it uses). */
#ifndef MS_TEST_RNG_H
#define MS_TEST_RNG_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t g_rng;

/* MS_TEST_SEED, else the time; printed with the test's name. */
static inline uint64_t test_seed(const char *test_name)
{
    const char *env = getenv("MS_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
    printf("%s: seed %" PRIu64 " (MS_TEST_SEED=%" PRIu64 " replays it)\n", test_name, seed, seed);
    fflush(stdout);
    return seed;
}

static inline uint64_t rng_next(void) /* splitmix64 */
{
    uint64_t z = (g_rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline double rng_unit(void) /* [0, 1) */
{
    return (double)(rng_next() >> 11) / 9007199254740992.0;
}

/* About N(0, 1): the sum of four uniforms, centred and scaled to unit variance. */
static inline double rng_gauss(void)
{
    double s = 0;
    for (int k = 0; k < 4; k++)
        s += rng_unit();
    return (s - 2.0) * 1.7320508075688772;
}

#endif
