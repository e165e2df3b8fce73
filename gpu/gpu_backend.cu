/* The CUDA backend's host side: opening the device, the live free-memory
 * estimate, error classification, pinned host memory (see gpu_backend.h).
 * The merge kernels and gpu_merge_run_pass are in gpu_merge.cu. */
#include "gpu/gpu_internal.h"

#include <string.h>

#define GPU_RESERVE_MIN ((uint64_t)256 << 20) /* at least 256 MiB stay free */
#define GPU_RESERVE_SHIFT 5                   /* or 1/32 of the device (2.5 GiB of 80), if more */

int gpu_backend_open(int device, uint64_t memory_limit, gpu_backend **out, char *why, size_t why_len)
{
    *out = NULL;
    gpu_backend *b = NULL;
    const char *what = "";
    cudaError_t rc;
    int n = 0;
    if (why && why_len)
        why[0] = '\0';
    rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
        what = "cudaGetDeviceCount";
        goto fail_cuda;
    }
    if (device < 0 || device >= n) {
        if (why)
            snprintf(why, why_len, "CUDA device %d: %s", device, n == 0 ? "no CUDA device" : "no such device");
        return -1;
    }
    rc = cudaSetDevice(device);
    if (rc != cudaSuccess) {
        what = "cudaSetDevice";
        goto fail_cuda;
    }
    size_t free_b, total_b;
    rc = cudaMemGetInfo(&free_b, &total_b); /* creates the context */
    if (rc != cudaSuccess) {
        what = "cudaMemGetInfo";
        goto fail_cuda;
    }
    b = (gpu_backend *)calloc(1, sizeof *b);
    if (!b) {
        if (why)
            snprintf(why, why_len, "CUDA device %d: out of host memory", device);
        return -1;
    }
    b->device = device;
    b->memory_limit = memory_limit;
    b->free_at_open = free_b;
    b->total = total_b;
    b->reserve = (uint64_t)total_b >> GPU_RESERVE_SHIFT;
    if (b->reserve < GPU_RESERVE_MIN)
        b->reserve = GPU_RESERVE_MIN;
    gpu_mempool_init(&b->pool, memory_limit);
    rc = cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking);
    if (rc != cudaSuccess) {
        what = "cudaStreamCreate";
        free(b);
        goto fail_cuda;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
        snprintf(b->name, sizeof b->name, "%s", prop.name);
    else
        snprintf(b->name, sizeof b->name, "CUDA device %d", device);
    cudaGetLastError();
    *out = b;
    return 0;
fail_cuda:
    if (why)
        snprintf(why, why_len, "CUDA device %d: %s: %s", device, what, cudaGetErrorString(rc));
    cudaGetLastError();
    return -1;
}

void gpu_backend_close(gpu_backend *b)
{
    if (!b)
        return;
    cudaSetDevice(b->device);
    cudaStreamSynchronize(b->stream);
    gpu_mempool_destroy(&b->pool);
    cudaStreamDestroy(b->stream);
    cudaGetLastError();
    free(b->host_tmp);
    free(b);
}

uint64_t gpu_backend_free_estimate(gpu_backend *b)
{
    if (b->broken)
        return 0;
    uint64_t used = b->pool.held + b->reserve;
    uint64_t est = b->free_at_open > used ? b->free_at_open - used : 0;
    if (b->memory_limit) {
        uint64_t cap = b->memory_limit > b->pool.held ? b->memory_limit - b->pool.held : 0;
        if (cap < est)
            est = cap;
    }
    return est;
}

void gpu_backend_trim(gpu_backend *b)
{
    if (!b)
        return;
    cudaSetDevice(b->device);
    gpu_mempool_trim(&b->pool);
}

uint64_t gpu_backend_pool_held(const gpu_backend *b)
{
    return b->pool.held;
}

void gpu_backend_fail_next_for_tests(gpu_backend *b)
{
    b->fail_next = true;
}

const char *gpu_backend_device_name(const gpu_backend *b)
{
    return b->name;
}

bool gpu_host_register(void *p, size_t len)
{
    if (!p || len == 0)
        return false;
    cudaError_t rc = cudaHostRegister(p, len, cudaHostRegisterPortable);
    if (rc != cudaSuccess) {
        cudaGetLastError(); /* not sticky: the memory stays pageable */
        return false;
    }
    return true;
}

void gpu_host_unregister(void *p)
{
    if (!p)
        return;
    if (cudaHostUnregister(p) != cudaSuccess)
        cudaGetLastError();
}

gpu_status gpu_backend_classify(gpu_backend *b, cudaError_t rc, const char *what, char *msg, size_t msg_len)
{
    if (rc == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        return GPU_OOM;
    }
    b->broken = true;
    snprintf(b->broken_msg, sizeof b->broken_msg, "%s: %s (%s)", what, cudaGetErrorString(rc),
             cudaGetErrorName(rc));
    if (msg && msg_len)
        snprintf(msg, msg_len, "%s", b->broken_msg);
    return GPU_FATAL;
}
