#include "pipeline/pool_pinning.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "io/ms_error.h"
#include "pipeline/progress.h"

struct ms_pool_pinning {
    ms_pool *pool;
    bool pinned;         /* the pool is registered: unregister at the end */
    bool thread_started; /* a background thread is pinning; join it at the end */
    pthread_t thread;
    double t_start;
    atomic_bool ready;
};

static bool pin_wanted(void)
{
    const char *v = getenv("MERGESTREAM_GPU_PIN");
    return !(v && strcmp(v, "0") == 0);
}

static void pin_now(ms_pool_pinning *pin)
{
    pin->pinned = ms_gpu_host_register(ms_pool_base(pin->pool), ms_pool_capacity(pin->pool));
    if (!pin->pinned)
        ms_log_info("cannot pin the staging pool for the GPU: using pageable memory");
}

/* The background thread. The pool's pages are in use by the reader and the
 * CPU kernels meanwhile: registration pins them where they are (faulting in
 * those not yet touched, zero-filled) without changing a byte, so it needs
 * no prefault, which would write. */
static void *pin_thread(void *arg)
{
    ms_pool_pinning *pin = arg;
    pin_now(pin);
    ms_log_info("GPU ready after %.2f s (staging pool %s): it takes tensors from now on",
                ms_now_seconds() - pin->t_start, pin->pinned ? "pinned" : "pageable");
    atomic_store_explicit(&pin->ready, true, memory_order_release);
    return NULL;
}

ms_pool_pinning *ms_pool_pinning_start(ms_pool *pool, cpu_pool *cpu, bool background)
{
    ms_pool_pinning *pin = calloc(1, sizeof *pin);
    if (!pin)
        return NULL;
    pin->pool = pool;
    pin->t_start = ms_now_seconds();
    atomic_init(&pin->ready, false);
    if (!pin_wanted()) {
        ms_log_info("staging pool left pageable (MERGESTREAM_GPU_PIN=0)");
    } else if (background) {
        ms_log_info("pinning the %.0f MiB staging pool for the GPU; the CPU starts meanwhile",
                    (double)ms_pool_capacity(pool) / 1048576.0);
        pin->thread_started = pthread_create(&pin->thread, NULL, pin_thread, pin) == 0;
        if (pin->thread_started)
            return pin;
        pin_now(pin); /* no thread: pin here, as in the foreground */
    } else {
        ms_pool_prefault(pool, cpu);
        pin_now(pin);
    }
    atomic_store_explicit(&pin->ready, true, memory_order_release);
    return pin;
}

const atomic_bool *ms_pool_pinning_ready(const ms_pool_pinning *pin)
{
    return pin ? &pin->ready : NULL;
}

void ms_pool_pinning_end(ms_pool_pinning *pin)
{
    if (!pin)
        return;
    if (pin->thread_started)
        pthread_join(pin->thread, NULL);
    if (pin->pinned)
        ms_gpu_host_unregister(ms_pool_base(pin->pool));
    free(pin);
}
