#include "pipeline/backend_registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MERGESTREAM_HAVE_CUDA
#include "gpu/gpu_backend.h"
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

#ifdef MERGESTREAM_HAVE_CUDA

int ms_gpu_open(uint64_t memory_limit, ms_gpu **out, char *why, size_t why_len)
{
    const char *reason = NULL;
    if (gpu_device_count(&reason) <= 0) {
        snprintf(why, why_len, "%s", reason ? reason : "no CUDA device");
        return -1;
    }
    return gpu_backend_open(0, memory_limit, (gpu_backend **)out, why, why_len);
}

/* GPU code that has not yet run on a GPU stays off unless
 * MERGESTREAM_GPU_UNVERIFIED=1 (tests/gpu/device_check.sh sets it), so that
 * a user's run never depends on it: now the Hessians' factorisations, the
 * saliency-keyed selection of ties_sparsegpt and dare_sparsegpt, regmean's
 * solve, and hessian's statistics converted on the device (stat_out). The
 * GPU tests call the gpu/ functions directly, without this gate. */
static bool gpu_unverified_allowed(void)
{
    const char *v = getenv("MERGESTREAM_GPU_UNVERIFIED");
    return v && strcmp(v, "1") == 0;
}

bool ms_gpu_supports(const ms_tensor_params *p)
{
    bool unverified = p->method == MS_METHOD_TIES_SPARSEGPT || p->method == MS_METHOD_DARE_SPARSEGPT ||
                      p->method == MS_METHOD_REGMEAN;
    return gpu_merge_supports(p) && (!unverified || gpu_unverified_allowed());
}

uint64_t ms_gpu_cholesky_bytes(uint64_t n)
{
    return gpu_unverified_allowed() ? gpu_hessian_cholesky_bytes(n) : UINT64_MAX;
}

ms_gpu_result ms_gpu_cholesky(ms_gpu *g, double *a, uint64_t n, bool diag_only, bool *not_pd, char *msg,
                              size_t msg_len)
{
    switch (gpu_hessian_cholesky((gpu_backend *)g, a, n, diag_only, not_pd, msg, msg_len)) {
    case GPU_OK: return MS_GPU_OK;
    case GPU_OOM: return MS_GPU_OOM;
    default: return MS_GPU_FATAL;
    }
}
void ms_gpu_close(ms_gpu *g) { gpu_backend_close((gpu_backend *)g); }
const char *ms_gpu_name(const ms_gpu *g) { return gpu_backend_device_name((const gpu_backend *)g); }
uint64_t ms_gpu_free_estimate(ms_gpu *g) { return gpu_backend_free_estimate((gpu_backend *)g); }
void ms_gpu_set_lanes(ms_gpu *g, unsigned lanes) { gpu_backend_set_lanes((gpu_backend *)g, lanes); }
uint64_t ms_gpu_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows) { return gpu_merge_chunk_bytes(p, n_rows); }

ms_gpu_result ms_gpu_run_pass(ms_gpu *g, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len)
{
    switch (gpu_merge_run_pass((gpu_backend *)g, p, st, pass, c, msg, msg_len)) {
    case GPU_OK: return MS_GPU_OK;
    case GPU_OOM: return MS_GPU_OOM;
    default: return MS_GPU_FATAL;
    }
}

bool ms_gpu_host_register(void *p, size_t len) { return gpu_host_register(p, len); }
void ms_gpu_host_unregister(void *p) { gpu_host_unregister(p); }

#else /* no CUDA: every GPU entry point says so */

int ms_gpu_open(uint64_t memory_limit, ms_gpu **out, char *why, size_t why_len)
{
    (void)memory_limit;
    *out = NULL;
    snprintf(why, why_len, "this build has no CUDA backend (rebuild with MERGESTREAM_CUDA=ON)");
    return -1;
}

bool ms_gpu_supports(const ms_tensor_params *p) { (void)p; return false; }
uint64_t ms_gpu_cholesky_bytes(uint64_t n) { (void)n; return UINT64_MAX; }

ms_gpu_result ms_gpu_cholesky(ms_gpu *g, double *a, uint64_t n, bool diag_only, bool *not_pd, char *msg,
                              size_t msg_len)
{
    (void)g; (void)a; (void)n; (void)diag_only;
    *not_pd = false;
    snprintf(msg, msg_len, "built without CUDA");
    return MS_GPU_FATAL;
}
void ms_gpu_close(ms_gpu *g) { (void)g; }
const char *ms_gpu_name(const ms_gpu *g) { (void)g; return ""; }
uint64_t ms_gpu_free_estimate(ms_gpu *g) { (void)g; return 0; }
void ms_gpu_set_lanes(ms_gpu *g, unsigned lanes) { (void)g; (void)lanes; }
uint64_t ms_gpu_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows) { (void)p; (void)n_rows; return UINT64_MAX; }

ms_gpu_result ms_gpu_run_pass(ms_gpu *g, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len)
{
    (void)g; (void)p; (void)st; (void)pass; (void)c;
    snprintf(msg, msg_len, "built without CUDA");
    return MS_GPU_FATAL;
}

bool ms_gpu_host_register(void *p, size_t len) { (void)p; (void)len; return false; }
void ms_gpu_host_unregister(void *p) { (void)p; }

#endif

/* ============================================================ forward-pass GEMMs */

#ifdef MERGESTREAM_HAVE_CUDA
#include "gpu/gpu_gemm.h"

/* A tuning variable's value: 0 when unset, else a whole number (true), or
 * false with why set. */
static bool tuning_env(const char *name, uint64_t *v, char *why, size_t why_len)
{
    const char *s = getenv(name);
    *v = 0;
    if (!s || !*s)
        return true;
    char *end = NULL;
    unsigned long long n = strtoull(s, &end, 10);
    if (*s == '-' || *end || n > ((uint64_t)1 << 31)) {
        snprintf(why, why_len, "%s='%s' is not a whole number up to 2^31", name, s);
        return false;
    }
    *v = n;
    return true;
}

int ms_gpu_gemm_open(uint64_t memory_limit, ms_gpu_gemm **out, char *why, size_t why_len)
{
    uint64_t attend_rows, gram_block;
    *out = NULL;
    if (!tuning_env("MERGESTREAM_GPU_ATTEND_ROWS", &attend_rows, why, why_len) ||
        !tuning_env("MERGESTREAM_GPU_GRAM_BLOCK", &gram_block, why, why_len))
        return -1;
    int rc = gpu_gemm_open(0, memory_limit, (gpu_gemm **)out, why, why_len);
    if (rc != 0)
        return rc;
    gpu_gemm_set_attend_block_rows(attend_rows);
    gpu_gemm_set_gram_block((gpu_gemm *)*out, gpu_unverified_allowed() ? gram_block : 0);
    return 0;
}

void ms_gpu_gemm_close(ms_gpu_gemm *g) { gpu_gemm_close((gpu_gemm *)g); }
const char *ms_gpu_gemm_name(const ms_gpu_gemm *g) { return gpu_gemm_device_name((const gpu_gemm *)g); }

static int seam_gemm(void *ctx, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha, const float *a,
                     uint64_t lda, const float *b, uint64_t ldb, float beta, float *c, uint64_t ldc, unsigned flags)
{
    return gpu_gemm_sgemm((gpu_gemm *)ctx, trans_b, m, n, k, alpha, a, lda, b, ldb, (flags & CPU_GEMM_B_WEIGHT) != 0,
                          beta, c, ldc);
}

static int seam_gram(void *ctx, const float *x, uint64_t n_rows, uint64_t dim, uint64_t ldx, float *c)
{
    return gpu_gemm_gram((gpu_gemm *)ctx, x, n_rows, dim, ldx, c);
}

static int seam_attend(void *ctx, const cpu_llama_attend_args *a) { return gpu_gemm_attend((gpu_gemm *)ctx, a); }

static int seam_layer(void *ctx, const cpu_llama_layer_args *a) { return gpu_gemm_layer((gpu_gemm *)ctx, a); }
static void *seam_host_alloc(void *ctx, uint64_t bytes) { return gpu_gemm_host_alloc((gpu_gemm *)ctx, bytes); }
static void seam_host_free(void *ctx, void *p) { gpu_gemm_host_free((gpu_gemm *)ctx, p); }

static int seam_stat_begin(void *ctx, unsigned slot, uint64_t dim, uint64_t flush_rows)
{
    return gpu_gemm_stat_begin((gpu_gemm *)ctx, slot, dim, flush_rows);
}

static int seam_stat_add(void *ctx, unsigned slot, const float *x, uint64_t n_rows, uint64_t ldx)
{
    return gpu_gemm_stat_add((gpu_gemm *)ctx, slot, x, n_rows, ldx);
}

static int seam_stat_finish(void *ctx, unsigned slot, cpu_hessian *h)
{
    return gpu_gemm_stat_finish((gpu_gemm *)ctx, slot, h);
}
static uint64_t seam_stat_rows(void *ctx, unsigned slot) { return gpu_gemm_stat_rows((const gpu_gemm *)ctx, slot); }

static int seam_stat_out(void *ctx, unsigned slot, double scale, float *dst)
{
    return gpu_gemm_stat_out((gpu_gemm *)ctx, slot, scale, dst);
}

static int seam_stat_out_wait(void *ctx) { return gpu_gemm_stat_out_wait((gpu_gemm *)ctx); }
static void seam_weights_changed(void *ctx) { gpu_gemm_forget_weights((gpu_gemm *)ctx); }
static const char *seam_last_error(void *ctx) { return gpu_gemm_last_error((const gpu_gemm *)ctx); }

cpu_llama_gemm ms_gpu_gemm_seam(ms_gpu_gemm *g)
{
    cpu_llama_gemm seam = (cpu_llama_gemm){.ctx = g, .gemm = seam_gemm, .gram = seam_gram, .attend = seam_attend,
                            .layer = seam_layer, .stat_begin = seam_stat_begin, .stat_add = seam_stat_add,
                            .stat_finish = seam_stat_finish, .stat_rows = seam_stat_rows,
                            .stat_out = seam_stat_out, .stat_out_wait = seam_stat_out_wait,
                            .host_alloc = seam_host_alloc,
                            .host_free = seam_host_free, .weights_changed = seam_weights_changed,
                            .last_error = seam_last_error};
    if (!gpu_unverified_allowed()) { /* the statistics straight out of the device: not yet run on a GPU */
        seam.stat_rows = NULL;
        seam.stat_out = NULL;
        seam.stat_out_wait = NULL;
    }
    return seam;
}

double ms_gpu_gemm_peak_gflops(ms_gpu_gemm *g, double seconds, char *why, size_t why_len)
{
    double r = gpu_gemm_peak_gflops((gpu_gemm *)g, seconds);
    if (r < 0)
        snprintf(why, why_len, "%s", gpu_gemm_last_error((const gpu_gemm *)g));
    return r;
}

unsigned ms_gpu_gemm_layer_seconds(const ms_gpu_gemm *g, double *sec, const char **names, unsigned max)
{
    double all[GPU_LAYER_PHASES];
    gpu_gemm_layer_seconds((const gpu_gemm *)g, all);
    unsigned n = max < GPU_LAYER_PHASES ? max : GPU_LAYER_PHASES;
    for (unsigned p = 0; p < n; p++) {
        sec[p] = all[p];
        names[p] = gpu_layer_phase_name((gpu_layer_phase)p);
    }
    return n;
}

double ms_gpu_gemm_gram_gflops(ms_gpu_gemm *g, uint64_t dim, uint64_t rows, uint64_t block, double seconds, char *why,
                               size_t why_len)
{
    double r = gpu_gemm_gram_gflops((gpu_gemm *)g, dim, rows, block, seconds);
    if (r < 0)
        snprintf(why, why_len, "%s", gpu_gemm_last_error((const gpu_gemm *)g));
    return r;
}

#else /* no CUDA: the forward pass stays on the CPU */

int ms_gpu_gemm_open(uint64_t memory_limit, ms_gpu_gemm **out, char *why, size_t why_len)
{
    (void)memory_limit;
    *out = NULL;
    snprintf(why, why_len, "built without CUDA");
    return -1;
}

void ms_gpu_gemm_close(ms_gpu_gemm *g) { (void)g; }
const char *ms_gpu_gemm_name(const ms_gpu_gemm *g) { (void)g; return ""; }
cpu_llama_gemm ms_gpu_gemm_seam(ms_gpu_gemm *g) { (void)g; return cpu_llama_gemm_blas(); }

double ms_gpu_gemm_peak_gflops(ms_gpu_gemm *g, double seconds, char *why, size_t why_len)
{
    (void)g; (void)seconds;
    snprintf(why, why_len, "built without CUDA");
    return -1;
}

unsigned ms_gpu_gemm_layer_seconds(const ms_gpu_gemm *g, double *sec, const char **names, unsigned max)
{
    (void)g; (void)sec; (void)names; (void)max;
    return 0;
}

double ms_gpu_gemm_gram_gflops(ms_gpu_gemm *g, uint64_t dim, uint64_t rows, uint64_t block, double seconds, char *why,
                               size_t why_len)
{
    (void)g; (void)dim; (void)rows; (void)block; (void)seconds;
    snprintf(why, why_len, "built without CUDA");
    return -1;
}

#endif
