/* A decoder layer's weights loaded on a thread of their own, so that the
 * next layer's reads and conversions run while this layer computes (the
 * forward pass in llama_run.c holds two layers' weights then).
 *
 * The source must tolerate being read from another thread while the
 * caller computes: ms_llama_source_model does; a LoRA source computes on
 * the caller's pool and must not be used this way (ms_llama_source.uses_pool).
 * Nothing else may read the source until ms_layer_prefetch_wait returns. */
#ifndef MS_LAYER_PREFETCH_H
#define MS_LAYER_PREFETCH_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cpu/llama_forward.h"
#include "io/ms_error.h"
#include "pipeline/llama_run.h"

typedef struct ms_layer_prefetch {
    pthread_t thread;
    bool running; /* a thread to join */
    bool done;    /* a load finished (rc, err hold its result) */
    const ms_llama_source *src;
    const cpu_llama_config *cfg;
    uint64_t layer;
    cpu_llama_layer *w;
    int rc;
    ms_error err;
} ms_layer_prefetch;

/* Starts loading layer `layer` into w (ms_llama_layer_load). p must be idle
 * (zeroed, or waited for). Where no thread can be started the layer is
 * loaded here before returning, with the same result at the wait. */
void ms_layer_prefetch_start(ms_layer_prefetch *p, const ms_llama_source *src, const cpu_llama_config *cfg,
                             uint64_t layer, cpu_llama_layer *w);

/* Waits for the load started last and leaves p idle. Returns 0 (also when
 * nothing was started), or -1 with the load's error in err (when not
 * NULL). */
int ms_layer_prefetch_wait(ms_layer_prefetch *p, ms_error *err);

#endif
