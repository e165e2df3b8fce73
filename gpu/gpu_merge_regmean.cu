/* regmean's APPLY pass on the device (gpu_merge_regmean.h), in the CPU's
 * order (cpu/cpu_merge_hessian.c, semantics pipeline/merge_passes_hessian.h),
 * so that the bytes are the CPU's. Per output row r, with tau_i = X_i - B in
 * fp32 and L the lower Cholesky factor of S (st->hessian->chol):
 *   b_j = sum_i sum_k G_i[k][j] tau_i[k]   fp64 from 0.0, i then k ascending
 *                                          (the products are exact)
 *   z_j = (b_j - s_j) / L_jj, s_j = sum_{k<j} L_jk z_k from 0.0, k ascending
 *   y: j descending, y_j = z_j / L_jj, then z_k -= L_jk y_j for every k < j
 *   out = B + (float)y_j, rounded once into the output dtype
 * every product and sum rounded on its own (__dmul_rn, __dadd_rn).
 *
 * Kernels (one chunk: rows x n, row-major like the chunk):
 *   k_rg_tau      tau_i, one thread per element
 *   k_rg_accum    b += model i's terms, one launch per model: 64 x 64
 *                 outputs per thread block (4 x 4 per thread), k in tiles of
 *                 RG_K staged in shared memory, each output's adds in k order
 *   forward       by blocks of RG_K columns [j0, j1), ascending:
 *                 k_rg_fwd_diag finishes z over the block (one thread per
 *                 row, the block's L in shared memory, continuing the s_j
 *                 that earlier blocks accumulated), then k_rg_fwd_update adds
 *                 the block's terms, k ascending, into s_j for every j >= j1
 *   backward      by the same blocks, descending: k_rg_bwd_diag turns the
 *                 block's z into y (j descending inside), then
 *                 k_rg_bwd_update subtracts the block's terms, j descending,
 *                 from every z_k with k < j0 (so each z_k still gets its
 *                 updates in descending j)
 *   k_rg_out      out = B + (float)y
 *   k_rg_mean     without a solve (no Hessian for some model, S not
 *                 positive definite): the mean of the models.
 * The accumulation and the solves' kernels are in gpu_merge_regmean_kernels.cuh
 * (tests/emu runs them on the CPU); this file has the element kernels and the
 * host side. */
#include "gpu/gpu_internal.h"
#include "gpu/gpu_elem.cuh"
#include "gpu/gpu_merge_regmean.h"
#include "gpu/gpu_merge_regmean_kernels.cuh"

extern "C" {
#include "pipeline/merge_passes_hessian.h"
}

#include <inttypes.h>
#include <string.h>

#define RG_ELEM_THREADS 256u
#define RG_NONE UINT64_MAX

__global__ void k_rg_tau(const void *in, int dt, const void *base, int base_dt, float *tau, uint64_t count)
{
    GPU_FOR_ELEMS(j, count)
    {
        tau[j] = ms_merge_delta(gpu_load(in, dt, j), gpu_load(base, base_dt, j));
    }
}

__global__ void k_rg_out(const void *base, int base_dt, const double *Y, void *out, int out_dt, uint64_t count)
{
    GPU_FOR_ELEMS(j, count)
    {
        gpu_store(out, out_dt, j, gpu_load(base, base_dt, j) + (float)Y[j]);
    }
}

/* The models' inputs for k_rg_mean, by value. */
typedef struct rg_inputs {
    const void *in[MS_MAX_MODELS];
    int dtype[MS_MAX_MODELS];
    unsigned n_models;
    float ones[MS_MAX_MODELS];
    float wsum;
} rg_inputs;

__global__ void k_rg_mean(const __grid_constant__ rg_inputs a, void *out, int out_dt, uint64_t count)
{
    GPU_FOR_ELEMS(j, count)
    {
        float X[MS_MAX_MODELS];
        for (unsigned i = 0; i < a.n_models; i++)
            X[i] = gpu_load(a.in[i], a.dtype[i], j);
        gpu_store(out, out_dt, j, ms_merge_linear(X, 1, a.ones, a.n_models, true, a.wsum));
    }
}

/* ================================================================ host */

/* Offsets in the call's one device request; RG_NONE: absent (the mean
 * needs only the inputs and the output). */
typedef struct rg_layout {
    uint64_t in_off[MS_MAX_MODELS + 1], in_bytes[MS_MAX_MODELS + 1];
    uint64_t out_off, out_bytes;
    uint64_t tau_off, g_off, l_off, b_off, s_off, z_off; /* the solve */
    uint64_t total;
} rg_layout;

static bool rg_layout_compute(const ms_tensor_params *p, uint64_t n_rows, bool solve, rg_layout *L)
{
    memset(L, 0, sizeof *L);
    uint64_t n = p->cols, count, nn;
    if (__builtin_mul_overflow(n_rows, n, &count) || __builtin_mul_overflow(n, n, &nn) || count > UINT64_MAX / 64)
        return false;
    gpu_buf_acc acc = {0, true};
    for (unsigned i = 0; i <= p->n_models; i++) {
        L->in_bytes[i] = count * gpu_dtype_size(p->in_dtype[i]);
        L->in_off[i] = gpu_buf_take(&acc, count, gpu_dtype_size(p->in_dtype[i]));
    }
    L->out_bytes = count * gpu_dtype_size(p->out_dtype);
    L->out_off = gpu_buf_take(&acc, count, gpu_dtype_size(p->out_dtype));
    L->tau_off = L->g_off = L->l_off = L->b_off = L->s_off = L->z_off = RG_NONE;
    if (solve) {
        L->tau_off = gpu_buf_take(&acc, count, (uint64_t)p->n_models * sizeof(float));
        L->g_off = gpu_buf_take(&acc, nn, (uint64_t)p->n_models * sizeof(float));
        L->l_off = gpu_buf_take(&acc, nn, sizeof(double));
        L->b_off = gpu_buf_take(&acc, count, sizeof(double));
        L->s_off = gpu_buf_take(&acc, count, sizeof(double));
        L->z_off = gpu_buf_take(&acc, count, sizeof(double));
    }
    L->total = acc.off;
    return acc.ok;
}

bool gpu_regmean_supports(const ms_tensor_params *p)
{
    if (p->method != MS_METHOD_REGMEAN || p->n_models < 1 || p->n_models > MS_MAX_MODELS ||
        p->rows > 65535u * (uint64_t)RG_TILE)
        return false;
    for (unsigned i = 0; i <= p->n_models; i++)
        if (p->in_dtype[i] != ST_F32 && p->in_dtype[i] != ST_F16 && p->in_dtype[i] != ST_BF16)
            return false;
    return p->out_dtype == ST_F32 || p->out_dtype == ST_F16 || p->out_dtype == ST_BF16;
}

uint64_t gpu_regmean_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows)
{
    if (!gpu_regmean_supports(p))
        return UINT64_MAX;
    if (n_rows == 0 || p->cols == 0)
        return 0;
    rg_layout L;
    if (!rg_layout_compute(p, n_rows, true, &L))
        return UINT64_MAX;
    return gpu_mempool_class_size(L.total);
}

/* The whole call: copies in, kernels, the output back. */
static gpu_status rg_enqueue(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, const ms_hessian_state *hs,
                             bool solve, const ms_chunk *c, const rg_layout *L, unsigned char *dev, char *msg,
                             size_t msg_len)
{
    uint64_t n = p->cols, rows = c->n_rows, count = c->n_elems, nn = n * n;
    unsigned nm = p->n_models;
    for (unsigned i = 0; i <= nm; i++)
        GPU_CHECK(cudaMemcpyAsync(dev + L->in_off[i], c->in[i], L->in_bytes[i], cudaMemcpyHostToDevice, b->copy_in),
                  "copying inputs to the GPU");
    if (solve) {
        for (unsigned i = 1; i <= nm; i++)
            GPU_CHECK(cudaMemcpyAsync(dev + L->g_off + (uint64_t)(i - 1) * nn * sizeof(float), hs->g[i],
                      nn * sizeof(float), cudaMemcpyHostToDevice, b->copy_in),
                      "copying regmean's Gram matrices to the GPU");
        GPU_CHECK(cudaMemcpyAsync(dev + L->l_off, hs->chol, nn * sizeof(double), cudaMemcpyHostToDevice, b->copy_in),
                  "copying regmean's Cholesky factor to the GPU");
    }
    GPU_CHECK(gpu_lane_inputs_sent(b, l), "ordering the GPU streams");
    cudaStream_t s = b->compute;
    unsigned egrid = gpu_grid(count, RG_ELEM_THREADS, 65536);
    const void *base = dev + L->in_off[0];
    if (!solve) {
        rg_inputs a;
        memset(&a, 0, sizeof a);
        a.n_models = nm;
        for (unsigned i = 1; i <= nm; i++) {
            a.in[i - 1] = dev + L->in_off[i];
            a.dtype[i - 1] = p->in_dtype[i];
            a.ones[i - 1] = 1.0f;
        }
        a.wsum = ms_merge_weight_sum(a.ones, nm);
        k_rg_mean<<<egrid, RG_ELEM_THREADS, 0, s>>>(a, dev + L->out_off, p->out_dtype, count);
        GPU_CHECK(cudaSuccess, "regmean mean kernel");
    } else {
        GPU_ASSERT(rows <= 65535u * RG_TILE);
        float *tau = (float *)(dev + L->tau_off);
        const float *g = (const float *)(dev + L->g_off);
        const double *Lc = (const double *)(dev + L->l_off);
        double *B = (double *)(dev + L->b_off), *S = (double *)(dev + L->s_off), *Z = (double *)(dev + L->z_off);
        GPU_CHECK(cudaMemsetAsync(B, 0, count * sizeof(double), s), "clearing regmean's sums");
        GPU_CHECK(cudaMemsetAsync(S, 0, count * sizeof(double), s), "clearing regmean's sums");
        for (unsigned i = 1; i <= nm; i++) {
            float *tau_i = tau + (uint64_t)(i - 1) * count;
            k_rg_tau<<<egrid, RG_ELEM_THREADS, 0, s>>>(dev + L->in_off[i], p->in_dtype[i], base, p->in_dtype[0],
                                                       tau_i, count);
            rg_launch_accum(tau_i, g + (uint64_t)(i - 1) * nn, B, rows, n, s);
        }
        rg_launch_solve(Lc, n, rows, B, S, Z, s);
        k_rg_out<<<egrid, RG_ELEM_THREADS, 0, s>>>(base, p->in_dtype[0], Z, dev + L->out_off, p->out_dtype, count);
        GPU_CHECK(cudaSuccess, "regmean kernels");
    }
    GPU_CHECK(gpu_lane_computed(b, l), "ordering the GPU streams");
    GPU_CHECK(cudaMemcpyAsync(c->out, dev + L->out_off, L->out_bytes, cudaMemcpyDeviceToHost, b->copy_out),
              "copying the output from the GPU");
    GPU_CHECK(gpu_lane_wait(b, l), "running the regmean kernels");
    return GPU_OK;
}

typedef struct rg_call {
    gpu_backend *b;
    gpu_lane *l;
    const ms_tensor_params *p;
    const ms_hessian_state *hs;
    bool solve;
    const ms_chunk *c;
    const rg_layout *L;
} rg_call;

static gpu_status rg_call_run(void *ctx, unsigned char *dev, char *msg, size_t msg_len)
{
    const rg_call *k = (const rg_call *)ctx;
    return rg_enqueue(k->b, k->l, k->p, k->hs, k->solve, k->c, k->L, dev, msg, msg_len);
}

gpu_status gpu_regmean_run_pass(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                                unsigned pass, const ms_chunk *c, char *msg, size_t msg_len)
{
    GPU_ASSERT(gpu_regmean_supports(p));
    GPU_ASSERT(pass < st->n_passes && st->pass[pass] == MS_MERGE_PASS_APPLY);
    GPU_ASSERT(c->elem0 == st->next_elem);
    GPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    GPU_ASSERT(c->elem0 + c->n_elems <= p->numel && c->in[0] && c->out && c->n_elems > 0);
    const ms_hessian_state *hs = st->hessian;
    bool solve = hs && hs->regmean_solve;
    GPU_ASSERT(!solve || hs->dim == p->cols);
    rg_layout L;
    if (!rg_layout_compute(p, c->n_rows, solve, &L)) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "needs more device memory than can be addressed");
        return GPU_OOM;
    }
    rg_call k = {b, l, p, hs, solve, c, &L};
    gpu_status status = gpu_backend_run_call(b, l, L.total, rg_call_run, &k, msg, msg_len);
    if (status == GPU_OK)
        st->next_elem = c->elem0 + c->n_elems;
    return status;
}
