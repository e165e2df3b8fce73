/* A whole decoder layer on the device (gpu_gemm.h, gpu_gemm_layer): the
 * residual rows go up once, the norms, the linear layers (cuBLAS, weights
 * cached on the device), the biases, RoPE, the attention, SwiGLU and the
 * residual adds run on the stream one after the other, the statistics slots
 * get the linear inputs' X^T X, and the residual rows (and the inputs the
 * host asked for) come back. Every element-wise kernel computes what
 * cpu/llama_forward.c's loops compute, in the same fp32 operations (nvcc
 * --fmad=false); the RMSNorm's fp64 sum of squares and the GEMMs add in
 * another order, and SiLU and the softmax use the device's expf: results
 * within rounding of the CPU's. */
#include "gpu/gpu_gemm_internal.h"
#include "gpu/gpu_elem.cuh"

#define GL_THREADS 256u
#define GL_MAX_GRID 65536u

static unsigned gl_grid(uint64_t n) { return gpu_grid(n, GL_THREADS, GL_MAX_GRID); }

/* out[r] = w * (x[r] * inv), inv = 1 / sqrt(mean(x[r]^2) + eps) with the
 * mean summed in fp64 (norm_rows). One block per row. */
__global__ static void k_rmsnorm(const float *x, const float *w, float *out, uint64_t d, float eps)
{
    __shared__ double part[GL_THREADS];
    const float *xr = x + (uint64_t)blockIdx.x * d;
    float *o = out + (uint64_t)blockIdx.x * d;
    double ss = 0;
    for (uint64_t k = threadIdx.x; k < d; k += blockDim.x)
        ss += (double)xr[k] * (double)xr[k];
    part[threadIdx.x] = ss;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    float var = (float)(part[0] / (double)d);
    float inv = (float)(1.0 / sqrt((double)(var + eps)));
    for (uint64_t k = threadIdx.x; k < d; k += blockDim.x)
        o[k] = w[k] * (xr[k] * inv);
}

/* y[r, c] += b[c] for the n_rows x d block of leading dimension ld (bias_rows). */
__global__ static void k_bias(float *y, const float *b, uint64_t n_rows, uint64_t d, uint64_t ld)
{
    GPU_FOR_ELEMS(i, n_rows * d)
    {
        uint64_t r = i / d, c = i % d;
        y[r * ld + c] += b[c];
    }
}

/* RoPE on every query and key head of the qkv rows (rope_rows): element
 * i < half of head h of row r with its partner i + half. */
__global__ static void k_rope(float *qkv, const float *cs, const float *sn, const uint32_t *pos, uint64_t n_rows,
                              uint64_t heads, uint64_t hd, uint64_t ld)
{
    uint64_t hh = hd / 2;
    GPU_FOR_ELEMS(e, n_rows * heads * hh)
    {
        uint64_t i = e % hh, h = (e / hh) % heads, r = e / (hh * heads);
        const float *c = cs + (uint64_t)pos[r] * hh, *s = sn + (uint64_t)pos[r] * hh;
        float *v = qkv + r * ld + h * hd;
        float a = v[i], b = v[i + hh];
        v[i] = a * c[i] + (-b) * s[i];
        v[i + hh] = b * c[i] + a * s[i];
    }
}

/* x = x + (p + bias), or x + p without a bias (residual_rows). */
__global__ static void k_residual(float *x, const float *p, const float *bias, uint64_t n_rows, uint64_t d)
{
    GPU_FOR_ELEMS(i, n_rows * d)
    {
        x[i] = bias ? x[i] + (p[i] + bias[i % d]) : x[i] + p[i];
    }
}

/* gate = silu(gate) * up in the gate half of each row (swiglu_row). */
__global__ static void k_swiglu(float *gu, uint64_t n_rows, uint64_t inter)
{
    GPU_FOR_ELEMS(i, n_rows * inter)
    {
        float *g = gu + (i / inter) * 2 * inter + i % inter;
        g[0] = (g[0] / (1.0f + expf(-g[0]))) * g[inter];
    }
}

/* C [m, n] (row-major, ldc) = A [m, k] (row-major, lda) W^T with the dense
 * weight W [n, k]: column-major C^T = W A^T (as gpu_gemm_sgemm). */
static cublasStatus_t gl_linear(gpu_gemm *g, uint64_t m, uint64_t n, uint64_t k, const float *A, uint64_t lda,
                                const void *W, float *C, uint64_t ldc)
{
    const float one = 1.0f, zero = 0.0f;
    return cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)m, (int)k, &one, (const float *)W, (int)k, A,
                       (int)lda, &zero, C, (int)ldc);
}

/* ================================================================ phase clock */

static const char *const k_phase_names[GPU_LAYER_PHASES] = {"upload", "linear", "attention", "elementwise",
                                                               "statistics", "idle", "download"};

const char *gpu_layer_phase_name(gpu_layer_phase p) { return p < GPU_LAYER_PHASES ? k_phase_names[p] : "?"; }

void gpu_gemm_layer_seconds(const gpu_gemm *g, double out[GPU_LAYER_PHASES])
{
    for (unsigned p = 0; p < GPU_LAYER_PHASES; p++)
        out[p] = g->layer_s[p];
}

/* One layer call's marks: event i ends the interval that began at event
 * i - 1, which belongs to phase[i]. Off (n stays 0) when the events could
 * not be made or recorded: timing never fails a layer. */
typedef struct gl_clock {
    gpu_gemm *g;
    unsigned n;
    bool on;
    gpu_layer_phase phase[GG_MARKS];
} gl_clock;

static gl_clock gl_clock_start(gpu_gemm *g)
{
    gl_clock c = {.g = g, .n = 0, .on = false, .phase = {}};
    if (!g->marks_made && !g->marks_failed) {
        unsigned made = 0;
        while (made < GG_MARKS && cudaEventCreate(&g->mark[made]) == cudaSuccess)
            made++;
        if (made < GG_MARKS) {
            cudaGetLastError();
            while (made > 0)
                cudaEventDestroy(g->mark[--made]);
            g->marks_failed = true;
        }
        g->marks_made = !g->marks_failed;
    }
    if (!g->marks_made)
        return c;
    if (cudaEventRecord(g->mark[0], g->stream) != cudaSuccess) {
        cudaGetLastError();
        return c;
    }
    c.on = true;
    c.n = 1;
    return c;
}

/* Ends the interval since the last mark as phase p. */
static void gl_mark(gl_clock *c, gpu_layer_phase p)
{
    if (!c->on)
        return;
    GPU_ASSERT(c->n < GG_MARKS);
    if (cudaEventRecord(c->g->mark[c->n], c->g->stream) != cudaSuccess) {
        cudaGetLastError();
        c->on = false;
        return;
    }
    c->phase[c->n++] = p;
}

/* After the stream has finished the call's work: its intervals into
 * g->layer_s (nothing when any of them cannot be read). */
static void gl_clock_add(gl_clock *c)
{
    if (!c->on)
        return;
    double s[GPU_LAYER_PHASES] = {};
    for (unsigned i = 1; i < c->n; i++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, c->g->mark[i - 1], c->g->mark[i]) != cudaSuccess) {
            cudaGetLastError();
            return;
        }
        s[c->phase[i]] += ms * 1e-3;
    }
    for (unsigned p = 0; p < GPU_LAYER_PHASES; p++)
        c->g->layer_s[p] += s[p];
}

/* ================================================================ the layer */

/* The layer's device operands. */
enum { GL_X, GL_XN, GL_QKV, GL_ATTN, GL_PROJ, GL_XN2, GL_GU, GL_SCORES, GL_POS, GL_BUFS };

/* The weights, as cached device copies (NULL where the layer has none). */
enum { GW_ATTN_NORM, GW_QKV, GW_B_QKV, GW_O, GW_B_O, GW_MLP_NORM, GW_GU, GW_B_GU, GW_DOWN, GW_B_DOWN, GW_COS, GW_SIN,
       GW_COUNT };

/* Enqueues the layer's work after its operands are up, marking each
 * phase's end on clk. Returns the first launch error as a cuBLAS status
 * (every one sticky from here). */
static cublasStatus_t gl_enqueue(gpu_gemm *g, const cpu_llama_layer_args *a, const cpu_llama_attend_args *aa,
                                 float *const *d, const void *const *w, gl_clock *clk)
{
    const cpu_llama_config *c = a->cfg;
    uint64_t T = a->b->n_tokens, H = c->hidden, Q = cpu_llama_q_dim(c), QKV = cpu_llama_qkv_rows(c),
             II = c->intermediate, hd = c->head_dim;
    float eps = (float)c->rms_eps;
    cublasStatus_t st;
#define GL_LAUNCHED() (cudaPeekAtLastError() == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED)
#define GL_TRY(call)                                                                                         \
    do {                                                                                                     \
        if ((st = (call)) != CUBLAS_STATUS_SUCCESS)                                                          \
            return st;                                                                                       \
    } while (0)
    /* attention */
    k_rmsnorm<<<(unsigned)T, GL_THREADS, 0, g->stream>>>(d[GL_X], (const float *)w[GW_ATTN_NORM], d[GL_XN], H, eps);
    GL_TRY(GL_LAUNCHED());
    gl_mark(clk, GPU_LAYER_ELEMENTWISE);
    GL_TRY(gl_linear(g, T, QKV, H, d[GL_XN], H, w[GW_QKV], d[GL_QKV], QKV));
    gl_mark(clk, GPU_LAYER_LINEAR);
    if (w[GW_B_QKV]) {
        k_bias<<<gl_grid(T * QKV), GL_THREADS, 0, g->stream>>>(d[GL_QKV], (const float *)w[GW_B_QKV], T, QKV, QKV);
        GL_TRY(GL_LAUNCHED());
    }
    k_rope<<<gl_grid(T * (c->n_heads + c->n_kv_heads) * (hd / 2)), GL_THREADS, 0, g->stream>>>(
        d[GL_QKV], (const float *)w[GW_COS], (const float *)w[GW_SIN], (const uint32_t *)d[GL_POS], T,
        c->n_heads + c->n_kv_heads, hd, QKV);
    GL_TRY(GL_LAUNCHED());
    gl_mark(clk, GPU_LAYER_ELEMENTWISE);
    GL_TRY(ga_enqueue(g, aa, d[GL_QKV], (const uint32_t *)d[GL_POS], d[GL_SCORES], d[GL_ATTN]));
    gl_mark(clk, GPU_LAYER_ATTENTION);
    GL_TRY(gl_linear(g, T, H, Q, d[GL_ATTN], Q, w[GW_O], d[GL_PROJ], H));
    gl_mark(clk, GPU_LAYER_LINEAR);
    k_residual<<<gl_grid(T * H), GL_THREADS, 0, g->stream>>>(d[GL_X], d[GL_PROJ], (const float *)w[GW_B_O], T, H);
    GL_TRY(GL_LAUNCHED());
    /* MLP */
    k_rmsnorm<<<(unsigned)T, GL_THREADS, 0, g->stream>>>(d[GL_X], (const float *)w[GW_MLP_NORM], d[GL_XN2], H, eps);
    GL_TRY(GL_LAUNCHED());
    gl_mark(clk, GPU_LAYER_ELEMENTWISE);
    GL_TRY(gl_linear(g, T, 2 * II, H, d[GL_XN2], H, w[GW_GU], d[GL_GU], 2 * II));
    gl_mark(clk, GPU_LAYER_LINEAR);
    if (w[GW_B_GU]) {
        k_bias<<<gl_grid(T * 2 * II), GL_THREADS, 0, g->stream>>>(d[GL_GU], (const float *)w[GW_B_GU], T, 2 * II,
                                                                  2 * II);
        GL_TRY(GL_LAUNCHED());
    }
    k_swiglu<<<gl_grid(T * II), GL_THREADS, 0, g->stream>>>(d[GL_GU], T, II);
    GL_TRY(GL_LAUNCHED());
    gl_mark(clk, GPU_LAYER_ELEMENTWISE);
    GL_TRY(gl_linear(g, T, H, II, d[GL_GU], 2 * II, w[GW_DOWN], d[GL_PROJ], H));
    gl_mark(clk, GPU_LAYER_LINEAR);
    k_residual<<<gl_grid(T * H), GL_THREADS, 0, g->stream>>>(d[GL_X], d[GL_PROJ], (const float *)w[GW_B_DOWN], T, H);
    GL_TRY(GL_LAUNCHED());
    gl_mark(clk, GPU_LAYER_ELEMENTWISE);
    /* the statistics, from the inputs still on the device */
    const float *in[CPU_LLAMA_IN_COUNT] = {d[GL_XN], d[GL_ATTN], d[GL_XN2], d[GL_GU]};
    const uint64_t width[CPU_LLAMA_IN_COUNT] = {H, Q, H, II}, ld[CPU_LLAMA_IN_COUNT] = {H, Q, H, 2 * II};
    for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
        if (a->stat_slot[k] < 0)
            continue;
        GPU_ASSERT((unsigned)a->stat_slot[k] < GG_STATS);
        gg_stat *sl = &g->stat[a->stat_slot[k]];
        GPU_ASSERT(sl->blk.ptr && sl->dim == width[k]);
        GL_TRY(gg_stat_accumulate(g, sl, in[k], T, ld[k]));
    }
    gl_mark(clk, GPU_LAYER_STATISTICS);
    return CUBLAS_STATUS_SUCCESS;
#undef GL_TRY
#undef GL_LAUNCHED
}

int gpu_gemm_layer(gpu_gemm *g, const cpu_llama_layer_args *a)
{
    const cpu_llama_config *c = a->cfg;
    const cpu_llama_layer *lw = a->w;
    uint64_t T = a->b->n_tokens, H = c->hidden, Q = cpu_llama_q_dim(c), QKV = cpu_llama_qkv_rows(c),
             II = c->intermediate, rope_cols = c->head_dim / 2;
    GPU_ASSERT(T <= INT32_MAX && QKV <= INT32_MAX && 2 * II <= INT32_MAX);
    int rc0 = gg_check_usable(g);
    if (rc0 < 0)
        return rc0;
    if (T == 0)
        return 0;
    cpu_llama_attend_args aa = {.n_tokens = T, .n_seqs = a->b->n_seqs, .seq_start = a->b->seq_start,
                                .pos = a->b->pos, .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads,
                                .head_dim = c->head_dim, .window = c->sliding_window, .scale = a->attn_scale,
                                .qkv = NULL, .attn = NULL}; /* the device's rows instead (ga_enqueue) */
    uint64_t bytes[GL_BUFS] = {T * H * 4, T * H * 4, T * QKV * 4, T * Q * 4, T * H * 4, T * H * 4, T * 2 * II * 4,
                               ga_score_bytes(&aa), T * 4};
    uint64_t needs = 0;
    for (unsigned i = 0; i < GL_BUFS; i++)
        needs += bytes[i];
    gg_buf buf[GL_BUFS] = {};
    cudaError_t rc = cudaSuccess;
    for (unsigned i = 0; i < GL_BUFS && rc == cudaSuccess; i++)
        rc = gg_take(g, bytes[i], &buf[i]);
    /* the weights: uploaded once per layer, kept while the layer runs its batches */
    const float *host_w[GW_COUNT] = {lw->attn_norm, lw->w_qkv, lw->b_qkv,    lw->w_o,     lw->b_o,    lw->mlp_norm,
                                     lw->w_gate_up, lw->b_gate_up, lw->w_down, lw->b_down, a->rope_cos, a->rope_sin};
    const uint64_t shape[GW_COUNT][2] = {{1, H},      {QKV, H}, {1, QKV},         {H, Q},
                                         {1, H},      {1, H},   {2 * II, H},      {1, 2 * II},
                                         {H, II},     {1, H},   {a->max_pos, rope_cols}, {a->max_pos, rope_cols}};
    const void *dw[GW_COUNT] = {};
    gl_clock clk = gl_clock_start(g); /* "upload" counts the weights' copies too (a layer's first batch) */
    for (unsigned i = 0; i < GW_COUNT && rc == cudaSuccess; i++)
        if (host_w[i])
            rc = gg_weight_get(g, host_w[i], shape[i][0], shape[i][1], shape[i][1], &dw[i]);
    const char *what = "device allocation";
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (residual rows)";
        rc = cudaMemcpyAsync(buf[GL_X].ptr, a->x, (size_t)bytes[GL_X], cudaMemcpyHostToDevice, g->stream);
    }
    if (rc == cudaSuccess) {
        what = "cudaMemcpy (positions)";
        rc = cudaMemcpyAsync(buf[GL_POS].ptr, a->b->pos, (size_t)bytes[GL_POS], cudaMemcpyHostToDevice, g->stream);
    }
    if (rc != cudaSuccess) { /* nothing computed yet: x, the slots and the inputs as they were */
        gg_drain(g);
        gg_give(g, buf, GL_BUFS);
        return gg_cuda_fail(g, rc, what, needs);
    }
    float *d[GL_BUFS];
    for (unsigned i = 0; i < GL_BUFS; i++)
        d[i] = (float *)buf[i].ptr;
    gl_mark(&clk, GPU_LAYER_UPLOAD);
    cublasStatus_t st = gl_enqueue(g, a, &aa, d, dw, &clk);
    rc = gg_drain(g);
    if (st == CUBLAS_STATUS_SUCCESS && rc == cudaSuccess) { /* the results back only now: a failure leaves x alone */
        const float *in[CPU_LLAMA_IN_COUNT] = {d[GL_XN], d[GL_ATTN], d[GL_XN2], d[GL_GU]};
        const uint64_t width[CPU_LLAMA_IN_COUNT] = {H, Q, H, II}, ld[CPU_LLAMA_IN_COUNT] = {H, Q, H, 2 * II};
        gl_mark(&clk, GPU_LAYER_IDLE);
        rc = cudaMemcpyAsync(a->x, d[GL_X], (size_t)bytes[GL_X], cudaMemcpyDeviceToHost, g->stream);
        for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT && rc == cudaSuccess; k++)
            if (a->input[k])
                rc = cudaMemcpy2DAsync(a->input[k], (size_t)(a->input_ld[k] * 4), in[k], (size_t)(ld[k] * 4),
                                       (size_t)(width[k] * 4), (size_t)T, cudaMemcpyDeviceToHost, g->stream);
        gl_mark(&clk, GPU_LAYER_DOWNLOAD);
        cudaError_t rc2 = gg_drain(g);
        rc = rc != cudaSuccess ? rc : rc2;
        if (rc == cudaSuccess)
            gl_clock_add(&clk);
    }
    gg_give(g, buf, GL_BUFS);
    /* the slots may hold part of this batch: sticky, whatever the error */
    return st == CUBLAS_STATUS_SUCCESS && rc == cudaSuccess ? 0 : gg_sticky(g, "decoder layer on the device", st, rc);
}
