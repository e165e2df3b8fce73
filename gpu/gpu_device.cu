#include "gpu/gpu_device.h"

#include <stdio.h>

#include <cuda_runtime.h>

extern "C" int gpu_device_count(const char **why)
{
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
        /* cudart says "CUDA driver version is insufficient" when there is no
         * driver at all, the usual case on a machine without a GPU */
        if (why)
            *why = rc == cudaErrorInsufficientDriver ? "no NVIDIA driver, or one older than this build's CUDA runtime"
                   : rc == cudaErrorNoDevice         ? "no CUDA device"
                                                     : cudaGetErrorString(rc);
        cudaGetLastError(); /* not sticky: clear it */
        return 0;
    }
    if (n == 0 && why)
        *why = "no CUDA device";
    return n;
}

extern "C" void gpu_device_name(char *buf, size_t n)
{
    cudaDeviceProp prop;
    if (n == 0)
        return;
    buf[0] = '\0';
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        snprintf(buf, n, "%s", prop.name);
}
