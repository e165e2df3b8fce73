/* The CUDA backend's host side: opening the device, the live free-memory
 * estimate, error classification, pinned host memory (see gpu_backend.h).
 * the streams and lanes that let calls overlap. The merge kernels and
 * gpu_merge_run_pass are in gpu_merge.cu. */
#include "gpu/gpu_internal.h"

#include <inttypes.h>

#include <string.h>

#define GPU_RESERVE_MIN ((uint64_t)256 << 20) /* at least 256 MiB stay free */
#define GPU_RESERVE_SHIFT 5                   /* or 1/32 of the device (2.5 GiB of 80), if more */

/* The three streams and every lane's events. On failure *what names the
 * call; what was created is destroyed by gpu_streams_destroy. */
static cudaError_t gpu_streams_create(gpu_backend *b, const char **what)
{
    cudaStream_t *streams[] = {&b->copy_in, &b->compute, &b->copy_out};
    for (unsigned i = 0; i < 3; i++) {
        cudaError_t rc = cudaStreamCreateWithFlags(streams[i], cudaStreamNonBlocking);
        if (rc != cudaSuccess) {
            *what = "cudaStreamCreate";
            return rc;
        }
    }
    for (unsigned i = 0; i < GPU_LANES; i++) {
        gpu_lane *l = &b->lane[i];
        cudaError_t rc = cudaEventCreateWithFlags(&l->inputs_in, cudaEventDisableTiming);
        if (rc == cudaSuccess)
            rc = cudaEventCreateWithFlags(&l->computed, cudaEventDisableTiming);
        /* the host waits on results_out: let the thread sleep, not spin */
        if (rc == cudaSuccess)
            rc = cudaEventCreateWithFlags(&l->results_out, cudaEventDisableTiming | cudaEventBlockingSync);
        if (rc != cudaSuccess) {
            *what = "cudaEventCreate";
            return rc;
        }
    }
    return cudaSuccess;
}

static void gpu_streams_destroy(gpu_backend *b)
{
    for (unsigned i = 0; i < GPU_LANES; i++) {
        gpu_lane *l = &b->lane[i];
        if (l->inputs_in)
            cudaEventDestroy(l->inputs_in);
        if (l->computed)
            cudaEventDestroy(l->computed);
        if (l->results_out)
            cudaEventDestroy(l->results_out);
        if (l->host_tmp)
            cudaFreeHost(l->host_tmp);
        memset(l, 0, sizeof *l);
    }
    cudaStream_t *streams[] = {&b->copy_in, &b->compute, &b->copy_out};
    for (unsigned i = 0; i < 3; i++) {
        if (*streams[i])
            cudaStreamDestroy(*streams[i]);
        *streams[i] = NULL;
    }
    cudaGetLastError();
}

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
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->lane_freed, NULL);
    b->lanes = GPU_LANES;
    rc = gpu_streams_create(b, &what);
    if (rc != cudaSuccess) {
        gpu_streams_destroy(b);
        pthread_cond_destroy(&b->lane_freed);
        pthread_mutex_destroy(&b->lock);
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
    cudaStreamSynchronize(b->copy_in);
    cudaStreamSynchronize(b->compute);
    cudaStreamSynchronize(b->copy_out);
    gpu_mempool_destroy(&b->pool);
    gpu_streams_destroy(b);
    pthread_cond_destroy(&b->lane_freed);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

uint64_t gpu_backend_free_estimate(gpu_backend *b)
{
    pthread_mutex_lock(&b->lock);
    uint64_t est = 0;
    if (!b->broken) {
        uint64_t used = b->pool.held + b->reserve;
        est = b->free_at_open > used ? b->free_at_open - used : 0;
        if (b->memory_limit) {
            uint64_t cap = b->memory_limit > b->pool.held ? b->memory_limit - b->pool.held : 0;
            if (cap < est)
                est = cap;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return est;
}

static uint64_t mib_up(uint64_t bytes)
{
    return bytes / (1u << 20) + (bytes % (1u << 20) != 0);
}

void gpu_backend_oom_msg(gpu_backend *b, uint64_t need, char *msg, size_t msg_len)
{
    if (msg && msg_len)
        snprintf(msg, msg_len, "needs %" PRIu64 " MiB, %" PRIu64 " MiB free", mib_up(need),
                 gpu_backend_free_estimate(b) >> 20);
}

gpu_status gpu_backend_run_call(gpu_backend *b, gpu_lane *l, uint64_t bytes, gpu_call_fn enqueue, void *ctx,
                                char *msg, size_t msg_len)
{
    void *dev = NULL;
    uint64_t dev_size = 0;
    cudaError_t rc = gpu_backend_alloc(b, bytes, &dev, &dev_size);
    if (rc != cudaSuccess) {
        if (rc != cudaErrorMemoryAllocation)
            return gpu_backend_classify(b, rc, "cudaMalloc", msg, msg_len);
        cudaGetLastError();
        gpu_backend_trim(b);
        gpu_backend_oom_msg(b, gpu_mempool_class_size(bytes), msg, msg_len);
        return GPU_OOM;
    }
    gpu_status status = enqueue(ctx, (unsigned char *)dev, msg, msg_len);
    if (status != GPU_OK)
        gpu_lane_abandon(b, l);
    gpu_backend_release(b, dev, dev_size);
    if (status == GPU_OOM) {
        gpu_backend_trim(b);
        gpu_backend_oom_msg(b, dev_size, msg, msg_len);
    }
    return status;
}

void gpu_backend_trim(gpu_backend *b)
{
    if (!b)
        return;
    cudaSetDevice(b->device);
    pthread_mutex_lock(&b->lock);
    gpu_mempool_trim(&b->pool);
    pthread_mutex_unlock(&b->lock);
}

cudaError_t gpu_backend_alloc(gpu_backend *b, uint64_t bytes, void **out, uint64_t *out_size)
{
    pthread_mutex_lock(&b->lock);
    cudaError_t rc = gpu_mempool_alloc(&b->pool, bytes, out, out_size);
    pthread_mutex_unlock(&b->lock);
    return rc;
}

void gpu_backend_release(gpu_backend *b, void *ptr, uint64_t size)
{
    if (!ptr)
        return;
    pthread_mutex_lock(&b->lock);
    gpu_mempool_release(&b->pool, ptr, size);
    pthread_mutex_unlock(&b->lock);
}

void gpu_backend_set_lanes(gpu_backend *b, unsigned lanes)
{
    pthread_mutex_lock(&b->lock);
    b->lanes = lanes < 1 ? 1 : lanes > GPU_LANES ? GPU_LANES : lanes;
    pthread_mutex_unlock(&b->lock);
}

/* ================================================================ lanes */

gpu_lane *gpu_lane_acquire(gpu_backend *b)
{
    pthread_mutex_lock(&b->lock);
    for (;;) {
        for (unsigned i = 0; i < b->lanes; i++) {
            if (!b->lane[i].busy) {
                b->lane[i].busy = true;
                pthread_mutex_unlock(&b->lock);
                return &b->lane[i];
            }
        }
        pthread_cond_wait(&b->lane_freed, &b->lock);
    }
}

void gpu_lane_release(gpu_backend *b, gpu_lane *l)
{
    pthread_mutex_lock(&b->lock);
    l->busy = false;
    pthread_cond_signal(&b->lane_freed);
    pthread_mutex_unlock(&b->lock);
}

bool gpu_lane_reserve(gpu_lane *l, size_t bytes)
{
    if (bytes <= l->host_tmp_len)
        return true;
    void *grown = NULL;
    if (cudaMallocHost(&grown, bytes) != cudaSuccess) {
        cudaGetLastError(); /* not sticky */
        return false;
    }
    if (l->host_tmp)
        cudaFreeHost(l->host_tmp);
    l->host_tmp = grown;
    l->host_tmp_len = bytes;
    return true;
}

gpu_status gpu_lane_reserve_results(gpu_lane *l, uint64_t bytes, char *msg, size_t msg_len)
{
    if (bytes <= SIZE_MAX && gpu_lane_reserve(l, (size_t)bytes))
        return GPU_OK;
    if (msg && msg_len)
        snprintf(msg, msg_len, "needs %" PRIu64 " MiB of pinned host memory for GPU results: out of memory",
                 mib_up(bytes));
    return GPU_OOM;
}

cudaError_t gpu_lane_inputs_sent(gpu_backend *b, gpu_lane *l)
{
    cudaError_t rc = cudaEventRecord(l->inputs_in, b->copy_in);
    return rc == cudaSuccess ? cudaStreamWaitEvent(b->compute, l->inputs_in, 0) : rc;
}

cudaError_t gpu_lane_computed(gpu_backend *b, gpu_lane *l)
{
    cudaError_t rc = cudaEventRecord(l->computed, b->compute);
    return rc == cudaSuccess ? cudaStreamWaitEvent(b->copy_out, l->computed, 0) : rc;
}

cudaError_t gpu_lane_wait(gpu_backend *b, gpu_lane *l)
{
    cudaError_t rc = cudaEventRecord(l->results_out, b->copy_out);
    return rc == cudaSuccess ? cudaEventSynchronize(l->results_out) : rc;
}

void gpu_lane_abandon(gpu_backend *b, gpu_lane *l)
{
    (void)l;
    cudaStreamSynchronize(b->copy_in);
    cudaStreamSynchronize(b->compute);
    cudaStreamSynchronize(b->copy_out);
}

uint64_t gpu_backend_pool_held(gpu_backend *b)
{
    pthread_mutex_lock(&b->lock);
    uint64_t held = b->pool.held;
    pthread_mutex_unlock(&b->lock);
    return held;
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
    pthread_mutex_lock(&b->lock);
    if (!b->broken) {
        b->broken = true;
        snprintf(b->broken_msg, sizeof b->broken_msg, "%s: %s (%s)", what, cudaGetErrorString(rc),
                 cudaGetErrorName(rc));
    }
    if (msg && msg_len)
        snprintf(msg, msg_len, "%s", b->broken_msg);
    pthread_mutex_unlock(&b->lock);
    return GPU_FATAL;
}

bool gpu_backend_is_broken(gpu_backend *b, char *msg, size_t msg_len)
{
    pthread_mutex_lock(&b->lock);
    bool broken = b->broken;
    if (broken && msg && msg_len)
        snprintf(msg, msg_len, "GPU disabled by an earlier error: %s", b->broken_msg);
    pthread_mutex_unlock(&b->lock);
    return broken;
}
