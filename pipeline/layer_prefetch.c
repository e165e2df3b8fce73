/* The next decoder layer's weights, loaded while this one computes
 * (layer_prefetch.h). */
#include "pipeline/layer_prefetch.h"

static void *prefetch_main(void *arg)
{
    ms_layer_prefetch *p = arg;
    p->rc = ms_llama_layer_load(p->src, p->cfg, p->layer, p->w, &p->err);
    return NULL;
}

void ms_layer_prefetch_start(ms_layer_prefetch *p, const ms_llama_source *src, const cpu_llama_config *cfg,
                             uint64_t layer, cpu_llama_layer *w)
{
    MS_ASSERT(!p->running && !p->done);
    *p = (ms_layer_prefetch){.src = src, .cfg = cfg, .layer = layer, .w = w, .done = true};
    if (pthread_create(&p->thread, NULL, prefetch_main, p) == 0)
        p->running = true;
    else
        prefetch_main(p); /* no thread: the load happens now */
}

int ms_layer_prefetch_wait(ms_layer_prefetch *p, ms_error *err)
{
    if (p->running)
        pthread_join(p->thread, NULL);
    int rc = p->done ? p->rc : 0;
    if (rc < 0 && err)
        *err = p->err;
    *p = (ms_layer_prefetch){0};
    return rc;
}
