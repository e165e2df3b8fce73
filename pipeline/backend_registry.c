#include "pipeline/backend_registry.h"

#include <stdio.h>

#ifdef MERGESTREAM_HAVE_CUDA
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
