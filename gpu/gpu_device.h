/* The CUDA device as the rest of mergestream sees it: plain C, no CUDA types. */
#ifndef MS_GPU_DEVICE_H
#define MS_GPU_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable CUDA devices (0 when there is no driver or no device).
 * When it returns 0 and why is not NULL, *why is a static string saying why. */
int gpu_device_count(const char **why);

/* Name of device 0 into buf (empty string when none). */
void gpu_device_name(char *buf, size_t n);

#ifdef __cplusplus
}
#endif

#endif
