#include "io/ms_fault.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "io/ms_error.h"

static const char *const k_site_names[MS_FAULT_SITE_COUNT] = {
    "read", "write", "fsync", "rename", "host_alloc", "gpu_alloc",
};

/* Written once under pthread_once, read by every thread afterwards. */
static struct {
    bool enabled;
    uint64_t fail_at[MS_FAULT_SITE_COUNT]; /* 0 = never */
    bool from_on[MS_FAULT_SITE_COUNT];     /* "N+": fail every call from N on */
} g_plan;
static atomic_uint_fast64_t g_calls[MS_FAULT_SITE_COUNT];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void fault_parse(void)
{
    const char *spec = getenv("MERGESTREAM_FAULT");
    if (!spec || !*spec)
        return;
    char buf[256];
    strncpy(buf, spec, sizeof buf - 1);
    buf[sizeof buf - 1] = '\0';
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(item, ':');
        if (!colon)
            continue;
        *colon = '\0';
        char *end = NULL;
        unsigned long long n = strtoull(colon + 1, &end, 10);
        for (int s = 0; s < MS_FAULT_SITE_COUNT; s++) {
            if (strcmp(item, k_site_names[s]) == 0 && n > 0) {
                g_plan.fail_at[s] = n;
                g_plan.from_on[s] = end && *end == '+';
                g_plan.enabled = true;
            }
        }
    }
}

bool ms_fault_hit(ms_fault_site site)
{
    MS_ASSERT(site >= 0 && site < MS_FAULT_SITE_COUNT);
    pthread_once(&g_once, fault_parse);
    if (!g_plan.enabled)
        return false;
    uint64_t n = atomic_fetch_add(&g_calls[site], 1) + 1;
    uint64_t at = g_plan.fail_at[site];
    if (at == 0)
        return false;
    return g_plan.from_on[site] ? n >= at : n == at;
}

uint64_t ms_fault_calls(ms_fault_site site)
{
    MS_ASSERT(site >= 0 && site < MS_FAULT_SITE_COUNT);
    return atomic_load(&g_calls[site]);
}
