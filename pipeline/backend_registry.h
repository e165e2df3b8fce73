/* Which compute backends this build has and which are usable now. The only
 * file with #ifdef for CUDA (STYLE.md habit 7). */
#ifndef MS_BACKEND_REGISTRY_H
#define MS_BACKEND_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>

/* True when this binary was built with the CUDA backend. */
bool ms_backend_cuda_built(void);

/* Number of usable GPUs; when 0, *why (if not NULL) says why in a few words
 * ("built without CUDA", "no CUDA device", a driver error). name receives
 * device 0's name when there is one. */
int ms_backend_gpu_count(const char **why, char *name, size_t name_len);

#endif
