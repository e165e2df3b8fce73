/* Private to gpu/: what the CUDA sources share (the backend object, error
 * classification, assertions). Include it first in every .cu file: it makes
 * the project's C headers usable from CUDA C++ (C linkage, _Noreturn). */
#ifndef MS_GPU_INTERNAL_H
#define MS_GPU_INTERNAL_H

/* io/ms_error.h declares ms_assert_fail with C11's _Noreturn, which C++ does
 * not have; [[noreturn]] is the same promise. */
#if defined(__cplusplus) && !defined(_Noreturn)
#define _Noreturn [[noreturn]]
#endif

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime.h>

extern "C" {
#include "io/ms_fault.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"
}

#include "gpu/gpu_backend.h"
#include "gpu/gpu_mempool.h"

/* A broken invariant (a caller bug): print file:line and abort, as cpu/ does. */
#define GPU_ASSERT(cond)                                                                                   \
    do {                                                                                                   \
        if (!(cond))                                                                                       \
            gpu_assert_fail(__FILE__, __LINE__, #cond);                                                    \
    } while (0)

[[noreturn]] static inline void gpu_assert_fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "mergestream: internal error at %s:%d: %s\n", file, line, what);
    abort();
}

/* Calls in flight at once (gpu_merge_run_pass is thread-safe): while one
 * call's kernels run, the next one's inputs go up and the previous one's
 * outputs come down. */
#define GPU_LANES 2

/* One call in flight: the events that order its three stages across the
 * backend's three streams, and the pinned host buffer its results (histograms,
 * sums, counts) come back into. A call takes a free lane for its whole
 * duration (gpu_lane_acquire .. gpu_lane_release). */
typedef struct gpu_lane {
    cudaEvent_t inputs_in;  /* recorded on copy_in after the call's host-to-device copies */
    cudaEvent_t computed;   /* recorded on compute after the call's kernels */
    cudaEvent_t results_out;/* recorded on copy_out after its device-to-host copies (blocking sync) */
    void *host_tmp;         /* pinned (cudaMallocHost), grown on demand */
    size_t host_tmp_len;
    bool busy;
} gpu_lane;

/* The backend object. Thread-safe: any number of threads may call
 * gpu_merge_run_pass at once; at most GPU_LANES calls are in flight, the rest
 * wait for a lane. Every call enqueues its host-to-device copies on copy_in,
 * its kernels on compute (after waiting for its inputs_in event) and its
 * device-to-host copies on copy_out (after its computed event), then waits
 * for its own results_out event only: no device-wide or stream-wide
 * synchronisation in the steady state, so the copies of one call overlap the
 * kernels of another. `lock` guards the pool, the lanes and `broken`. */
struct gpu_backend {
    int device;
    uint64_t memory_limit; /* 0: none */
    uint64_t free_at_open; /* cudaMemGetInfo's free bytes when opened */
    uint64_t total;        /* device memory */
    uint64_t reserve;      /* kept free for the driver, cuBLAS, other users */
    pthread_mutex_t lock;
    pthread_cond_t lane_freed;
    gpu_mempool pool;      /* under lock */
    cudaStream_t copy_in, compute, copy_out;
    gpu_lane lane[GPU_LANES];
    unsigned lanes;        /* lanes in use: 1..GPU_LANES (gpu_backend_set_lanes) */
    bool broken;           /* a sticky error happened: every call is GPU_FATAL */
    char broken_msg[256];
    bool fail_next;        /* tests: the next gpu_merge_run_pass hits an illegal address */
    char name[256];
};

/* Takes a free lane (waits for one). Never fails. */
gpu_lane *gpu_lane_acquire(gpu_backend *b);
void gpu_lane_release(gpu_backend *b, gpu_lane *l);

/* Grows l's pinned result buffer to at least `bytes`; false when the host is
 * out of (pinned) memory. */
bool gpu_lane_reserve(gpu_lane *l, size_t bytes);

/* gpu_lane_reserve for a call's results: GPU_OK, or GPU_OOM with msg "needs
 * X MiB of pinned host memory for GPU results: out of memory". */
gpu_status gpu_lane_reserve_results(gpu_lane *l, uint64_t bytes, char *msg, size_t msg_len);

/* msg := "needs X MiB, Y MiB free": need rounded up to whole MiB, Y the live
 * free-memory estimate (the GPU_OOM line's detail). */
void gpu_backend_oom_msg(gpu_backend *b, uint64_t need, char *msg, size_t msg_len);

/* The pool under the backend's lock (gpu_mempool_alloc / _release / _trim). */
cudaError_t gpu_backend_alloc(gpu_backend *b, uint64_t bytes, void **out, uint64_t *out_size);
void gpu_backend_release(gpu_backend *b, void *ptr, uint64_t size);

/* After a call enqueued everything up to its last kernel on b->compute:
 * records l->computed, makes copy_out wait for it. The call then enqueues its
 * device-to-host copies on copy_out and calls gpu_lane_wait. */
cudaError_t gpu_lane_computed(gpu_backend *b, gpu_lane *l);

/* Records l->results_out on copy_out and waits for it (the thread sleeps).
 * Everything the call enqueued on any stream is done when it returns
 * cudaSuccess, and its device buffers may be released. */
cudaError_t gpu_lane_wait(gpu_backend *b, gpu_lane *l);

/* After the call's host-to-device copies: records l->inputs_in on copy_in and
 * makes compute wait for it. */
cudaError_t gpu_lane_inputs_sent(gpu_backend *b, gpu_lane *l);

/* A call that failed part-way (enqueue error, OOM inside the runtime): waits
 * for all three streams, so nothing it enqueued still uses its buffers. Not
 * the steady state. */
void gpu_lane_abandon(gpu_backend *b, gpu_lane *l);

/* A call whose device memory is one pool request of `bytes` on lane l:
 * allocates it (out of memory: the pool trimmed, GPU_OOM, msg "needs X MiB,
 * Y MiB free"), runs enqueue(ctx, dev, msg, msg_len), which enqueues the
 * whole call and waits for it (gpu_lane_wait) or fails; after a failure
 * waits until nothing enqueued still uses the buffer; releases it. Returns
 * enqueue's status (GPU_OOM from inside the runtime: trimmed, msg as
 * above). */
typedef gpu_status (*gpu_call_fn)(void *ctx, unsigned char *dev, char *msg, size_t msg_len);
gpu_status gpu_backend_run_call(gpu_backend *b, gpu_lane *l, uint64_t bytes, gpu_call_fn enqueue, void *ctx,
                                char *msg, size_t msg_len);

/* Classifies a CUDA error that is not cudaSuccess: cudaErrorMemoryAllocation
 * is cleared (cudaGetLastError) and gives GPU_OOM; anything else marks the
 * backend broken and gives GPU_FATAL. msg receives "WHAT: CUDA's error
 * string" for GPU_FATAL (the caller writes the OOM message). */
gpu_status gpu_backend_classify(gpu_backend *b, cudaError_t rc, const char *what, char *msg, size_t msg_len);

/* In a function with `b`, `msg` and `msg_len` in scope that returns
 * gpu_status: when expr (a CUDA call, or cudaSuccess after a launch) or the
 * launch before it failed, returns gpu_backend_classify's verdict. */
#define GPU_CHECK(expr, what)                                                                              \
    do {                                                                                                   \
        cudaError_t rc_ = (expr);                                                                          \
        if (rc_ == cudaSuccess)                                                                            \
            rc_ = cudaGetLastError();                                                                      \
        if (rc_ != cudaSuccess)                                                                            \
            return gpu_backend_classify(b, rc_, what, msg, msg_len);                                       \
    } while (0)

/* True once a sticky error happened; msg then receives "GPU disabled by an
 * earlier error: ...". */
bool gpu_backend_is_broken(gpu_backend *b, char *msg, size_t msg_len);

#endif
