/* Which compute backends this build has and which are usable now, and the
 * GPU backend behind an opaque handle. The only file with #ifdef for CUDA
 * (STYLE.md habit 7): in a build without CUDA every GPU call reports "built
 * without CUDA" and the CPU does all the work. */
#ifndef MS_BACKEND_REGISTRY_H
#define MS_BACKEND_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"

/* True when this binary was built with the CUDA backend. */
bool ms_backend_cuda_built(void);

/* Number of usable GPUs; when 0, *why (if not NULL) says why in a few words
 * ("built without CUDA", "no CUDA device", a driver error). name receives
 * device 0's name when there is one. */
int ms_backend_gpu_count(const char **why, char *name, size_t name_len);

typedef struct ms_gpu ms_gpu;

typedef enum ms_gpu_result {
    MS_GPU_OK = 0,
    MS_GPU_OOM = 1,   /* not sticky: run this pass of this chunk on the CPU, try the GPU again later */
    MS_GPU_FATAL = 2, /* sticky: stop using the GPU for the rest of the run */
} ms_gpu_result;

/* Opens GPU 0 with at most memory_limit bytes (0: no cap). Returns 0 and
 * *out, or -1 with a one-line reason in why. */
int ms_gpu_open(uint64_t memory_limit, ms_gpu **out, char *why, size_t why_len);
void ms_gpu_close(ms_gpu *g); /* NULL is a no-op */
const char *ms_gpu_name(const ms_gpu *g);

/* GPU passes in flight at once: 2 (default) overlaps one tensor's copies with
 * another's kernels, 1 serialises them. */
void ms_gpu_set_lanes(ms_gpu *g, unsigned lanes);

/* The live free-memory estimate and what a chunk of n_rows rows needs. */
uint64_t ms_gpu_free_estimate(ms_gpu *g);
uint64_t ms_gpu_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows);

/* True when the GPU backend implements p's method (the Hessian-aware
 * methods only with MERGESTREAM_GPU_UNVERIFIED=1 until they have run on a
 * GPU). */
bool ms_gpu_supports(const ms_tensor_params *p);

/* One pass over one chunk (cpu_merge_run_pass's contract). On MS_GPU_OOM or
 * MS_GPU_FATAL the state is untouched and msg holds one line. */
ms_gpu_result ms_gpu_run_pass(ms_gpu *g, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len);

/* The Hessian-aware methods' Cholesky factorisation on the GPU, the CPU's
 * bits (gpu/gpu_backend.h, gpu_hessian_cholesky; a [n][n], lower triangle).
 * MS_GPU_OK: *not_pd, or a factored (diag_only: only its diagonal written);
 * MS_GPU_OOM: a unchanged; MS_GPU_FATAL: a may be partly overwritten. */
ms_gpu_result ms_gpu_cholesky(ms_gpu *g, double *a, uint64_t n, bool diag_only, bool *not_pd, char *msg,
                              size_t msg_len);
/* Device bytes it needs for n; UINT64_MAX: the GPU does not factor (built
 * without CUDA, or not enabled yet: MERGESTREAM_GPU_UNVERIFIED). */
uint64_t ms_gpu_cholesky_bytes(uint64_t n);

/* Pins host memory for faster copies; false (memory stays pageable) on failure. */
bool ms_gpu_host_register(void *p, size_t len);
void ms_gpu_host_unregister(void *p);

/* ============================================================ forward-pass GEMMs */

/* cuBLAS behind the forward pass's GEMM seam (gpu/gpu_gemm.h), for
 * `mergestream hessian` and `perplexity`. */
#include "cpu/llama_forward.h"

typedef struct ms_gpu_gemm ms_gpu_gemm;

/* Opens GPU 0 for the forward pass with at most memory_limit bytes of device
 * buffers (0: no cap). Returns 0 and *out, or -1 with a one-line reason in
 * why ("built without CUDA", "no CUDA device", a driver error, a bad
 * tuning variable). Tuning, for measurements (tests/gpu/device_check.sh):
 * MERGESTREAM_GPU_ATTEND_ROWS=N query rows per block of attention scores,
 * MERGESTREAM_GPU_GRAM_BLOCK=N Gram updates by N-column blocks (not yet run
 * on a GPU: honoured only with MERGESTREAM_GPU_UNVERIFIED=1); see
 * gpu/gpu_gemm.h. */
int ms_gpu_gemm_open(uint64_t memory_limit, ms_gpu_gemm **out, char *why, size_t why_len);
void ms_gpu_gemm_close(ms_gpu_gemm *g); /* NULL is a no-op */
const char *ms_gpu_gemm_name(const ms_gpu_gemm *g);

/* The seam for ms_llama_run / cpu_llama_open: GEMMs and Gram updates on g
 * (which must outlive every use), weights kept on the device until
 * weights_changed, failures as cpu_gemm_fn / cpu_gram_fn describe. */
cpu_llama_gemm ms_gpu_gemm_seam(ms_gpu_gemm *g);

/* The device's best fp32 cublasSgemm rate in GFLOP/s (gpu_gemm_peak_gflops),
 * or -1 with why set. */
double ms_gpu_gemm_peak_gflops(ms_gpu_gemm *g, double seconds, char *why, size_t why_len);

/* Where the device's stream spent its time in whole decoder layers so far
 * (gpu_gemm_layer_seconds): up to max phases' seconds into sec and their
 * names ("upload", "linear", ...) into names. Returns how many (0 without
 * CUDA). */
unsigned ms_gpu_gemm_layer_seconds(const ms_gpu_gemm *g, double *sec, const char **names, unsigned max);

/* The Gram update's rate in useful GFLOP/s (gpu_gemm_gram_gflops: dim x dim
 * from rows rows, by column blocks of `block`, 0: one cublasSsyrk), or -1
 * with why set. */
double ms_gpu_gemm_gram_gflops(ms_gpu_gemm *g, uint64_t dim, uint64_t rows, uint64_t block, double seconds, char *why,
                               size_t why_len);

#endif
