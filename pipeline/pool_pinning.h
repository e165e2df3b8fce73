/* Pinning the staging pool for the GPU (cudaHostRegister), which costs about
 * 0.35 s per GiB of pool on an H200 machine: more than a 1B-shaped merge
 * spends computing on the GPU (bench/RESULTS.md).
 *
 * In the foreground (--device cuda) the pool is prefaulted over the CPU
 * pool's threads and pinned before the run, so every pass that fits goes to
 * the GPU: placement that tests can rely on. In the background (--device
 * auto) a thread of its own pins it while the run starts on the CPU; the
 * run places passes on the GPU from the moment `ready` turns true. Output
 * bytes are the same wherever a pass runs (DESIGN.md), so only the time and
 * the per-backend counts depend on when that happens.
 *
 * MERGESTREAM_GPU_PIN=0 leaves the pool pageable (ready at once): for
 * weighing pinning's start-up against its faster copies on a GPU machine. */
#ifndef MS_POOL_PINNING_H
#define MS_POOL_PINNING_H

#include <stdatomic.h>
#include <stdbool.h>

#include "cpu/cpu_pool.h"
#include "pipeline/backend_registry.h"
#include "pipeline/staging_pool.h"

typedef struct ms_pool_pinning ms_pool_pinning;

/* Starts pinning pool for gpu, in the background or not (see above). Returns
 * NULL only when out of memory; the pool then stays pageable and the GPU is
 * usable at once. */
ms_pool_pinning *ms_pool_pinning_start(ms_pool *pool, cpu_pool *cpu, bool background);

/* True once the GPU may take passes: the pool is pinned, or pinning failed
 * (one log line) or was not asked for. For ms_run_env.gpu_ready. */
const atomic_bool *ms_pool_pinning_ready(const ms_pool_pinning *pin);

/* Waits for a background pinning to end, unpins the pool and frees pin
 * (NULL is a no-op). Call before the pool is closed. */
void ms_pool_pinning_end(ms_pool_pinning *pin);

#endif
