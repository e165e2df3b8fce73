#include "pipeline/backend_registry.h"

#include <stdio.h>

#ifdef MERGESTREAM_HAVE_CUDA
#include "gpu/gpu_backend.h"
#include "gpu/gpu_device.h"
#endif

bool ms_backend_cuda_built(void)
{
#ifdef MERGESTREAM_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

int ms_backend_gpu_count(const char **why, char *name, size_t name_len)
{
    if (name && name_len)
        name[0] = '\0';
#ifdef MERGESTREAM_HAVE_CUDA
    int n = gpu_device_count(why);
    if (n > 0 && name)
        gpu_device_name(name, name_len);
    return n;
#else
    if (why)
        *why = "built without CUDA";
    return 0;
#endif
}

#ifdef MERGESTREAM_HAVE_CUDA

int ms_gpu_open(uint64_t memory_limit, ms_gpu **out, char *why, size_t why_len)
{
    const char *reason = NULL;
    if (gpu_device_count(&reason) <= 0) {
        snprintf(why, why_len, "%s", reason ? reason : "no CUDA device");
        return -1;
    }
    return gpu_backend_open(0, memory_limit, (gpu_backend **)out, why, why_len);
}

bool ms_gpu_supports(const ms_tensor_params *p) { return gpu_merge_supports(p); }
void ms_gpu_close(ms_gpu *g) { gpu_backend_close((gpu_backend *)g); }
const char *ms_gpu_name(const ms_gpu *g) { return gpu_backend_device_name((const gpu_backend *)g); }
uint64_t ms_gpu_free_estimate(ms_gpu *g) { return gpu_backend_free_estimate((gpu_backend *)g); }
void ms_gpu_set_lanes(ms_gpu *g, unsigned lanes) { gpu_backend_set_lanes((gpu_backend *)g, lanes); }
uint64_t ms_gpu_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows) { return gpu_merge_chunk_bytes(p, n_rows); }

ms_gpu_result ms_gpu_run_pass(ms_gpu *g, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len)
{
    switch (gpu_merge_run_pass((gpu_backend *)g, p, st, pass, c, msg, msg_len)) {
    case GPU_OK: return MS_GPU_OK;
    case GPU_OOM: return MS_GPU_OOM;
    default: return MS_GPU_FATAL;
    }
}

bool ms_gpu_host_register(void *p, size_t len) { return gpu_host_register(p, len); }
void ms_gpu_host_unregister(void *p) { gpu_host_unregister(p); }

#else /* no CUDA: every GPU entry point says so */

int ms_gpu_open(uint64_t memory_limit, ms_gpu **out, char *why, size_t why_len)
{
    (void)memory_limit;
    *out = NULL;
    snprintf(why, why_len, "this build has no CUDA backend (rebuild with MERGESTREAM_CUDA=ON)");
    return -1;
}

bool ms_gpu_supports(const ms_tensor_params *p) { (void)p; return false; }
void ms_gpu_close(ms_gpu *g) { (void)g; }
const char *ms_gpu_name(const ms_gpu *g) { (void)g; return ""; }
uint64_t ms_gpu_free_estimate(ms_gpu *g) { (void)g; return 0; }
void ms_gpu_set_lanes(ms_gpu *g, unsigned lanes) { (void)g; (void)lanes; }
uint64_t ms_gpu_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows) { (void)p; (void)n_rows; return UINT64_MAX; }

ms_gpu_result ms_gpu_run_pass(ms_gpu *g, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len)
{
    (void)g; (void)p; (void)st; (void)pass; (void)c;
    snprintf(msg, msg_len, "built without CUDA");
    return MS_GPU_FATAL;
}

bool ms_gpu_host_register(void *p, size_t len) { (void)p; (void)len; return false; }
void ms_gpu_host_unregister(void *p) { (void)p; }

#endif
