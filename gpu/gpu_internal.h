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

/* The backend object. Used by one thread at a time (the compute stage); the
 * free estimate may be read by the scheduler on the same thread. */
struct gpu_backend {
    int device;
    uint64_t memory_limit; /* 0: none */
    uint64_t free_at_open; /* cudaMemGetInfo's free bytes when opened */
    uint64_t total;        /* device memory */
    uint64_t reserve;      /* kept free for the driver, cuBLAS, other users */
    gpu_mempool pool;
    cudaStream_t stream;   /* every copy and kernel of a call, in order */
    bool broken;           /* a sticky error happened: every call is GPU_FATAL */
    char broken_msg[256];
    bool fail_next;        /* tests: the next gpu_merge_run_pass hits an illegal address */
    char name[256];
    void *host_tmp;        /* results copied back (histograms, L1 sums, counts) */
    size_t host_tmp_len;
};

/* Classifies a CUDA error that is not cudaSuccess: cudaErrorMemoryAllocation
 * is cleared (cudaGetLastError) and gives GPU_OOM; anything else marks the
 * backend broken and gives GPU_FATAL. msg receives "WHAT: CUDA's error
 * string" for GPU_FATAL (the caller writes the OOM message). */
gpu_status gpu_backend_classify(gpu_backend *b, cudaError_t rc, const char *what, char *msg, size_t msg_len);

#endif
