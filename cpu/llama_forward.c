#include "cpu/llama_forward.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu_kernel.h"

#define LF_LANES 16u      /* partial sums per reduction: a vectorisable fixed width */
#define LF_ATTN_ROWS 512u /* query rows (all heads of a kv group) per attention GEMM */
#define LF_GRAIN_ROWS 8u  /* pool tasks: at least this many rows each */

struct cpu_llama {
    cpu_llama_config cfg;
    cpu_pool *pool;
    cpu_llama_gemm gemm;
    uint64_t max_tokens, max_seq, max_pos;
    uint64_t n_rep;   /* query heads per kv head */
    uint64_t q_block; /* query rows per head in one attention block */
    float attn_scale; /* 1 / sqrt(head_dim) */
    /* per batch (max_tokens rows each) */
    float *xn_attn; /* (rows, hidden) attention RMSNorm output (kept: q/k/v's input) */
    float *xn;   /* (rows, hidden) MLP RMSNorm output */
    float *qkv;  /* (rows, q_dim + 2 kv_dim) */
    float *attn; /* (rows, q_dim) attention output */
    float *proj; /* (rows, hidden) o_proj / down_proj output */
    float *gu;   /* (rows, 2 intermediate) gate | up, then silu(gate) * up in the gate half */
    /* per attention block */
    float *att_q; /* (n_rep * q_block, head_dim) gathered queries */
    float *att_s; /* (n_rep * q_block, max_seq) scores, then probabilities */
    float *att_o; /* (n_rep * q_block, head_dim) */
    /* RoPE */
    float *rope_cos, *rope_sin; /* (max_pos, head_dim / 2) */
    /* who allocated the batch buffers above (xn_attn .. gu): the seam given
     * to cpu_llama_open (host_free non-NULL), or malloc */
    void *alloc_ctx;
    void (*host_free)(void *ctx, void *p);
    /* the seam's layer function: what it adds where, what comes back */
    int layer_slot[CPU_LLAMA_IN_COUNT];
    bool layer_want[CPU_LLAMA_IN_COUNT];
    bool layer_added_stats; /* the last successful layer ran through it */
    /* seconds inside cpu_llama_layer_forward, for cpu_llama_times */
    double t_layers, t_linear, t_attention;
};

static double lf_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ============================================================ exp */

static inline uint32_t lf_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float lf_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* exp(x) for x in about [-87, 88] (clamped outside; NaN stays NaN): x = n ln2
 * + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for e^r (truncation
 * error < 6e-9 relative), times 2^n built from the bits. Branch-free, so
 * the loops below vectorise. */
static inline float lf_expf(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * log2e + magic;
    uint32_t n = lf_bits(t) - 0x4B400000u; /* the integer, two's complement */
    float nf = t - magic;
    float r = (x - nf * ln2_hi) - nf * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * lf_from_bits((n + 127u) << 23);
}

float cpu_llama_expf(float x) { return lf_expf(x); }

/* ============================================================ layers */

typedef struct layer_sizes {
    uint64_t attn_norm, w_qkv, b_qkv, w_o, b_o, mlp_norm, w_gate_up, b_gate_up, w_down, b_down;
} layer_sizes;

static bool mul3(uint64_t a, uint64_t b, uint64_t c, uint64_t *out)
{
    uint64_t ab;
    return !__builtin_mul_overflow(a, b, &ab) && !__builtin_mul_overflow(ab, c, out);
}

/* Element counts of each array; false on overflow. */
static bool layer_sizes_of(const cpu_llama_config *c, layer_sizes *s)
{
    uint64_t qkv = cpu_llama_qkv_rows(c), two_i = 2 * c->intermediate;
    *s = (layer_sizes){0};
    s->attn_norm = s->mlp_norm = c->hidden;
    s->b_qkv = c->qkv_bias ? qkv : 0;
    s->b_o = c->o_bias ? c->hidden : 0;
    s->b_gate_up = c->mlp_bias ? two_i : 0;
    s->b_down = c->mlp_bias ? c->hidden : 0;
    return mul3(qkv, c->hidden, 1, &s->w_qkv) && mul3(c->hidden, cpu_llama_q_dim(c), 1, &s->w_o) &&
           mul3(two_i, c->hidden, 1, &s->w_gate_up) && mul3(c->hidden, c->intermediate, 1, &s->w_down);
}

uint64_t cpu_llama_layer_bytes(const cpu_llama_config *cfg)
{
    layer_sizes s;
    if (!layer_sizes_of(cfg, &s))
        return UINT64_MAX;
    uint64_t n = s.attn_norm + s.w_qkv + s.b_qkv + s.w_o + s.b_o + s.mlp_norm + s.w_gate_up + s.b_gate_up +
                 s.w_down + s.b_down;
    return n > UINT64_MAX / 4 ? UINT64_MAX : n * 4;
}

int cpu_llama_layer_alloc(const cpu_llama_config *cfg, cpu_llama_layer *w)
{
    *w = (cpu_llama_layer){0};
    layer_sizes s;
    uint64_t bytes = cpu_llama_layer_bytes(cfg);
    if (bytes == UINT64_MAX || bytes > SIZE_MAX || !layer_sizes_of(cfg, &s))
        return -EOVERFLOW;
    float *p = malloc((size_t)bytes);
    if (!p)
        return -ENOMEM;
    w->block = p;
    /* Big matrices first: every one starts 64-byte aligned when malloc's is. */
    w->w_qkv = p, p += s.w_qkv;
    w->w_o = p, p += s.w_o;
    w->w_gate_up = p, p += s.w_gate_up;
    w->w_down = p, p += s.w_down;
    w->attn_norm = p, p += s.attn_norm;
    w->mlp_norm = p, p += s.mlp_norm;
    w->b_qkv = s.b_qkv ? p : NULL, p += s.b_qkv;
    w->b_o = s.b_o ? p : NULL, p += s.b_o;
    w->b_gate_up = s.b_gate_up ? p : NULL, p += s.b_gate_up;
    w->b_down = s.b_down ? p : NULL;
    return 0;
}

void cpu_llama_layer_free(cpu_llama_layer *w)
{
    free(w->block);
    *w = (cpu_llama_layer){0};
}

/* ============================================================ GEMM */

static int blas_gemm(void *ctx, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha, const float *a,
                     uint64_t lda, const float *b, uint64_t ldb, float beta, float *c, uint64_t ldc, unsigned flags)
{
    (void)ctx;
    (void)flags; /* B is read in place: nothing to keep */
    CPU_ASSERT(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX &&
              ldc <= INT32_MAX);
    if (m == 0 || n == 0)
        return 0;
    if (k == 0) { /* BLAS would leave C alone for beta = 0 only by convention: be explicit */
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return 0;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n,
                (blasint)k, alpha, a, (blasint)lda, b, (blasint)ldb, beta, c, (blasint)ldc);
    return 0;
}

cpu_llama_gemm cpu_llama_gemm_blas(void)
{
    return (cpu_llama_gemm){.ctx = NULL, .gemm = blas_gemm, .gram = cpu_gram_blas};
}

void cpu_llama_blas_set_threads(unsigned n) { openblas_set_num_threads(n ? (int)n : 1); }

/* ============================================================ the pool */

typedef void (*rows_fn)(void *ctx, uint64_t r0, uint64_t r1);

typedef struct par_job {
    rows_fn fn;
    void *ctx;
    uint64_t n;
    unsigned tasks;
} par_job;

static void par_task(void *c, unsigned task, unsigned worker)
{
    (void)worker;
    const par_job *j = c;
    uint64_t r0 = j->n * task / j->tasks, r1 = j->n * (task + 1) / j->tasks;
    if (r1 > r0)
        j->fn(j->ctx, r0, r1);
}

/* fn(ctx, r0, r1) over [0, n) in contiguous pieces on the pool. */
static void par_rows(const cpu_llama *m, uint64_t n, rows_fn fn, void *ctx)
{
    unsigned workers = m->pool ? cpu_pool_size(m->pool) : 1;
    uint64_t tasks = n / LF_GRAIN_ROWS;
    if (tasks > 4u * workers)
        tasks = 4u * workers;
    if (workers <= 1 || tasks <= 1) {
        if (n)
            fn(ctx, 0, n);
        return;
    }
    par_job j = {fn, ctx, n, (unsigned)tasks};
    cpu_pool_run(m->pool, (unsigned)tasks, par_task, &j);
}

/* ============================================================ open/close */

static bool add_to(uint64_t *acc, uint64_t a, uint64_t b)
{
    uint64_t p;
    return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(*acc, p, acc);
}

static uint64_t q_block_of(const cpu_llama_config *c, uint64_t max_seq)
{
    uint64_t n_rep = c->n_heads / c->n_kv_heads;
    uint64_t qb = LF_ATTN_ROWS / n_rep;
    if (qb < 16)
        qb = 16;
    return qb < max_seq ? qb : (max_seq ? max_seq : 1);
}

uint64_t cpu_llama_scratch_bytes(const cpu_llama_config *c, uint64_t max_tokens, uint64_t max_seq_tokens,
                                 uint64_t max_pos)
{
    uint64_t per_row = 3 * c->hidden + 2 * cpu_llama_q_dim(c) + 2 * cpu_llama_kv_dim(c) + 2 * c->intermediate;
    uint64_t att_rows = (c->n_heads / c->n_kv_heads) * q_block_of(c, max_seq_tokens);
    uint64_t floats = 0;
    if (!add_to(&floats, max_tokens, per_row) || !add_to(&floats, att_rows, 2 * c->head_dim + max_seq_tokens) ||
        !add_to(&floats, max_pos, c->head_dim) || floats > UINT64_MAX / 4)
        return UINT64_MAX;
    return floats * 4;
}

static void rope_inv_freq(const cpu_llama_config *c, float *inv)
{
    uint64_t half = c->head_dim / 2;
    for (uint64_t i = 0; i < half; i++) {
        /* transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in fp32 */
        float e = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / (float)pow(c->rope_theta, (double)e);
        if (c->rope_kind == CPU_ROPE_LINEAR) {
            f = f / (float)c->rope_factor;
        } else if (c->rope_kind == CPU_ROPE_LLAMA3) {
            float factor = (float)c->rope_factor, low = (float)c->rope_low_freq_factor,
                  high = (float)c->rope_high_freq_factor, old = (float)c->rope_original_max_pos;
            float wavelen = (float)(2.0 * M_PI) / f;
            float low_wavelen = (float)(c->rope_original_max_pos / c->rope_low_freq_factor);
            float high_wavelen = (float)(c->rope_original_max_pos / c->rope_high_freq_factor);
            float scaled = wavelen > low_wavelen ? f / factor : f;
            float smooth = (old / wavelen - low) / (high - low);
            float smoothed = (1.0f - smooth) * scaled / factor + smooth * scaled;
            bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
            f = medium ? smoothed : scaled;
        }
        inv[i] = f;
    }
}

/* The buffers a batch's GEMMs read and write, in one place. */
static float **batch_buffer(cpu_llama *m, unsigned i)
{
    float **all[] = {&m->xn_attn, &m->xn, &m->qkv, &m->attn, &m->proj, &m->gu};
    return all[i];
}

static void batch_buffers_free(cpu_llama *m)
{
    for (unsigned i = 0; i < 6; i++) {
        float **p = batch_buffer(m, i);
        if (m->host_free)
            m->host_free(m->alloc_ctx, *p);
        else
            free(*p);
        *p = NULL;
    }
    m->host_free = NULL;
}

/* From the seam's allocator when it has one (all six or none), else
 * malloc; a failure leaves NULLs for cpu_llama_open to report. */
static void batch_buffers_alloc(cpu_llama *m, const cpu_llama_gemm *gemm)
{
    const cpu_llama_config *c = &m->cfg;
    uint64_t T = m->max_tokens;
    uint64_t bytes[6] = {T * c->hidden * 4, T * c->hidden * 4, T * cpu_llama_qkv_rows(c) * 4,
                         T * cpu_llama_q_dim(c) * 4, T * c->hidden * 4, T * 2 * c->intermediate * 4};
    if (gemm->host_alloc && gemm->host_free) {
        m->alloc_ctx = gemm->ctx;
        m->host_free = gemm->host_free;
        bool all = true;
        for (unsigned i = 0; i < 6; i++)
            all = all && (*batch_buffer(m, i) = gemm->host_alloc(gemm->ctx, bytes[i])) != NULL;
        if (all)
            return;
        batch_buffers_free(m);
    }
    for (unsigned i = 0; i < 6; i++)
        *batch_buffer(m, i) = malloc((size_t)bytes[i]);
}

int cpu_llama_open(const cpu_llama_config *cfg, uint64_t max_tokens, uint64_t max_seq_tokens, uint64_t max_pos,
                   cpu_pool *pool, const cpu_llama_gemm *gemm, cpu_llama **out)
{
    *out = NULL;
    CPU_ASSERT(cfg->hidden && cfg->intermediate && cfg->n_heads && cfg->n_kv_heads && cfg->head_dim && cfg->vocab);
    CPU_ASSERT(cfg->n_heads % cfg->n_kv_heads == 0 && cfg->head_dim % 2 == 0);
    CPU_ASSERT(max_tokens >= 1 && max_seq_tokens >= 1 && max_seq_tokens <= max_tokens && max_pos >= 1);
    uint64_t total = cpu_llama_scratch_bytes(cfg, max_tokens, max_seq_tokens, max_pos);
    if (total == UINT64_MAX || total > SIZE_MAX)
        return -EOVERFLOW;
    cpu_llama *m = calloc(1, sizeof *m);
    if (!m)
        return -ENOMEM;
    m->cfg = *cfg;
    m->pool = pool;
    m->gemm = *gemm;
    m->max_tokens = max_tokens;
    m->max_seq = max_seq_tokens;
    m->max_pos = max_pos;
    for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
        m->layer_slot[k] = -1;   /* nothing added where the seam runs ... */
        m->layer_want[k] = true; /* ... and every input back on the host */
    }
    m->n_rep = cfg->n_heads / cfg->n_kv_heads;
    m->q_block = q_block_of(cfg, max_seq_tokens);
    m->attn_scale = (float)(1.0 / sqrt((double)cfg->head_dim));
    uint64_t att_rows = m->n_rep * m->q_block, half = cfg->head_dim / 2;
    batch_buffers_alloc(m, gemm);
    m->att_q = malloc((size_t)(att_rows * cfg->head_dim * 4));
    m->att_s = malloc((size_t)(att_rows * max_seq_tokens * 4));
    m->att_o = malloc((size_t)(att_rows * cfg->head_dim * 4));
    m->rope_cos = malloc((size_t)(max_pos * half * 4));
    m->rope_sin = malloc((size_t)(max_pos * half * 4));
    float *inv = malloc((size_t)(half * 4));
    if (!m->xn_attn || !m->xn || !m->qkv || !m->attn || !m->proj || !m->gu || !m->att_q || !m->att_s || !m->att_o ||
        !m->rope_cos || !m->rope_sin || !inv) {
        free(inv);
        cpu_llama_close(m);
        return -ENOMEM;
    }
    rope_inv_freq(cfg, inv);
    for (uint64_t p = 0; p < max_pos; p++) {
        for (uint64_t i = 0; i < half; i++) {
            float angle = (float)p * inv[i];
            m->rope_cos[p * half + i] = (float)cos((double)angle);
            m->rope_sin[p * half + i] = (float)sin((double)angle);
        }
    }
    free(inv);
    *out = m;
    return 0;
}

void cpu_llama_close(cpu_llama *m)
{
    if (!m)
        return;
    batch_buffers_free(m);
    free(m->att_q);
    free(m->att_s);
    free(m->att_o);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m);
}

/* ============================================================ elementwise */

typedef struct norm_job {
    const float *x, *w;
    float *out;
    uint64_t d;
    float eps;
} norm_job;

/* transformers' LlamaRMSNorm in fp32: variance = mean(x^2); x * rsqrt(variance
 * + eps); weight * that. The mean is summed in fp64 (more exact than torch's
 * fp32 reduction, never less). */
static void norm_rows(void *c, uint64_t r0, uint64_t r1)
{
    const norm_job *j = c;
    for (uint64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->d;
        float *o = j->out + r * j->d;
        double ss = 0;
        for (uint64_t k = 0; k < j->d; k++)
            ss += (double)x[k] * (double)x[k];
        float var = (float)(ss / (double)j->d);
        float inv = (float)(1.0 / sqrt((double)(var + j->eps)));
        for (uint64_t k = 0; k < j->d; k++)
            o[k] = j->w[k] * (x[k] * inv);
    }
}

void cpu_llama_rms_norm(cpu_llama *m, const float *x, const float *weight, uint64_t n, float *out)
{
    norm_job j = {x, weight, out, m->cfg.hidden, (float)m->cfg.rms_eps};
    par_rows(m, n, norm_rows, &j);
}

typedef struct bias_job {
    float *y;
    const float *b;
    uint64_t d, ld;
} bias_job;

static void bias_rows(void *c, uint64_t r0, uint64_t r1)
{
    const bias_job *j = c;
    for (uint64_t r = r0; r < r1; r++)
        for (uint64_t k = 0; k < j->d; k++)
            j->y[r * j->ld + k] += j->b[k];
}

typedef struct residual_job {
    float *x;
    const float *proj, *bias; /* bias may be NULL */
    uint64_t d;
} residual_job;

/* x = x + (proj + bias): the linear layer's output (bias included) is added
 * to the residual stream, as transformers does. */
static void residual_rows(void *c, uint64_t r0, uint64_t r1)
{
    const residual_job *j = c;
    for (uint64_t r = r0; r < r1; r++) {
        float *x = j->x + r * j->d;
        const float *p = j->proj + r * j->d;
        if (j->bias)
            for (uint64_t k = 0; k < j->d; k++)
                x[k] = x[k] + (p[k] + j->bias[k]);
        else
            for (uint64_t k = 0; k < j->d; k++)
                x[k] = x[k] + p[k];
    }
}

typedef struct swiglu_job {
    float *gu;
    uint64_t inter;
} swiglu_job;

CPU_CLONES static void swiglu_row(float *restrict g, const float *restrict u, uint64_t n)
{
    for (uint64_t k = 0; k < n; k++)
        g[k] = (g[k] / (1.0f + lf_expf(-g[k]))) * u[k];
}

static void swiglu_rows(void *c, uint64_t r0, uint64_t r1)
{
    const swiglu_job *j = c;
    for (uint64_t r = r0; r < r1; r++) {
        float *g = j->gu + r * 2 * j->inter;
        swiglu_row(g, g + j->inter, j->inter);
    }
}

typedef struct rope_job {
    const cpu_llama *m;
    const uint32_t *pos;
} rope_job;

/* RoPE on every query and key head of rows [r0, r1) of m->qkv, in place. */
static void rope_rows(void *c, uint64_t r0, uint64_t r1)
{
    const rope_job *j = c;
    const cpu_llama *m = j->m;
    uint64_t hd = m->cfg.head_dim, half = hd / 2, ld = cpu_llama_qkv_rows(&m->cfg);
    uint64_t heads = m->cfg.n_heads + m->cfg.n_kv_heads; /* q heads, then k heads: contiguous */
    for (uint64_t r = r0; r < r1; r++) {
        CPU_ASSERT(j->pos[r] < m->max_pos);
        const float *cs = m->rope_cos + (uint64_t)j->pos[r] * half, *sn = m->rope_sin + (uint64_t)j->pos[r] * half;
        float *row = m->qkv + r * ld;
        for (uint64_t h = 0; h < heads; h++) {
            float *v = row + h * hd;
            for (uint64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] + (-b) * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
}

/* ============================================================ attention */

/* Softmax of s[lo..hi] in place (inclusive), zeros elsewhere in [0, n). */
CPU_CLONES static void softmax_row(float *restrict s, uint64_t lo, uint64_t hi, uint64_t n)
{
    float lane[LF_LANES];
    for (unsigned l = 0; l < LF_LANES; l++)
        lane[l] = -INFINITY;
    uint64_t k = lo;
    for (; k + LF_LANES <= hi + 1; k += LF_LANES)
        for (unsigned l = 0; l < LF_LANES; l++)
            lane[l] = s[k + l] > lane[l] ? s[k + l] : lane[l];
    float mx = -INFINITY;
    for (; k <= hi; k++)
        mx = s[k] > mx ? s[k] : mx;
    for (unsigned l = 0; l < LF_LANES; l++)
        mx = lane[l] > mx ? lane[l] : mx;
    for (unsigned l = 0; l < LF_LANES; l++)
        lane[l] = 0.0f;
    k = lo;
    for (; k + LF_LANES <= hi + 1; k += LF_LANES)
        for (unsigned l = 0; l < LF_LANES; l++) {
            float e = lf_expf(s[k + l] - mx);
            s[k + l] = e;
            lane[l] += e;
        }
    float sum = 0.0f;
    for (; k <= hi; k++) {
        float e = lf_expf(s[k] - mx);
        s[k] = e;
        sum += e;
    }
    for (unsigned l = 0; l < LF_LANES; l++)
        sum += lane[l];
    float inv = 1.0f / sum;
    for (k = lo; k <= hi; k++)
        s[k] *= inv;
    for (k = 0; k < lo; k++)
        s[k] = 0.0f;
    for (k = hi + 1; k < n; k++)
        s[k] = 0.0f;
}

typedef struct softmax_job {
    float *s;
    uint64_t nq, nk;   /* query rows per head in the block, keys in the block */
    uint64_t q0, kl;   /* first query row and first key row of the block (in the sequence) */
    const uint32_t *pos;
    uint64_t window;
} softmax_job;

static void softmax_rows(void *c, uint64_t r0, uint64_t r1)
{
    const softmax_job *j = c;
    for (uint64_t r = r0; r < r1; r++) {
        uint64_t i = j->q0 + r % j->nq;
        uint64_t lo = cpu_llama_window_first(j->pos, i, j->window);
        softmax_row(j->s + r * j->nk, lo - j->kl, i - j->kl, j->nk);
    }
}

/* Causal attention of one sequence (rows [r0, r0 + T) of the batch) into
 * m->attn. Per kv head, query blocks of q_block rows: the block's queries of
 * every head sharing that kv head are gathered into one matrix, so one GEMM
 * scores them against the keys the block can see. */
static int attend_sequence(cpu_llama *m, uint64_t r0, uint64_t T, const uint32_t *pos)
{
    const cpu_llama_config *c = &m->cfg;
    uint64_t hd = c->head_dim, ld = cpu_llama_qkv_rows(c), qd = cpu_llama_q_dim(c), kvd = cpu_llama_kv_dim(c);
    for (uint64_t g = 0; g < c->n_kv_heads; g++) {
        const float *K = m->qkv + r0 * ld + qd + g * hd;
        const float *V = K + kvd;
        for (uint64_t q0 = 0; q0 < T; q0 += m->q_block) {
            uint64_t q1 = q0 + m->q_block < T ? q0 + m->q_block : T, nq = q1 - q0;
            uint64_t kl = cpu_llama_window_first(pos, q0, c->sliding_window), nk = q1 - kl;
            uint64_t rows = m->n_rep * nq;
            for (uint64_t rep = 0; rep < m->n_rep; rep++)
                for (uint64_t i = 0; i < nq; i++)
                    memcpy(m->att_q + (rep * nq + i) * hd, m->qkv + (r0 + q0 + i) * ld + (g * m->n_rep + rep) * hd,
                           hd * sizeof(float));
            int rc = m->gemm.gemm(m->gemm.ctx, true, rows, nk, hd, m->attn_scale, m->att_q, hd, K + kl * ld, ld,
                                  0.0f, m->att_s, nk, 0);
            if (rc < 0)
                return rc;
            softmax_job sj = {m->att_s, nq, nk, q0, kl, pos, c->sliding_window};
            par_rows(m, rows, softmax_rows, &sj);
            rc = m->gemm.gemm(m->gemm.ctx, false, rows, hd, nk, 1.0f, m->att_s, nk, V + kl * ld, ld, 0.0f, m->att_o,
                              hd, 0);
            if (rc < 0)
                return rc;
            for (uint64_t rep = 0; rep < m->n_rep; rep++)
                for (uint64_t i = 0; i < nq; i++)
                    memcpy(m->attn + (r0 + q0 + i) * qd + (g * m->n_rep + rep) * hd, m->att_o + (rep * nq + i) * hd,
                           hd * sizeof(float));
        }
    }
    return 0;
}

/* ============================================================ the layer */

void cpu_llama_set_gemm(cpu_llama *m, const cpu_llama_gemm *gemm) { m->gemm = *gemm; }

/* A GEMM whose error ends the layer. */
#define LF_TRY(call)                                                                                       \
    do {                                                                                                   \
        int rc_ = (call);                                                                                  \
        if (rc_ < 0)                                                                                       \
            return rc_;                                                                                    \
    } while (0)

/* A linear layer's GEMM through the seam, its time counted. */
static int linear_gemm(cpu_llama *m, uint64_t T, uint64_t n, uint64_t k, const float *a, uint64_t lda,
                       const float *w, float *c, uint64_t ldc)
{
    double t0 = lf_now();
    int rc = m->gemm.gemm(m->gemm.ctx, true, T, n, k, 1.0f, a, lda, w, k, 0.0f, c, ldc, CPU_GEMM_B_WEIGHT);
    m->t_linear += lf_now() - t0;
    return rc;
}

/* The causal attention of every sequence of the batch into m->attn: through
 * the seam's attend when it has one, else as GEMMs and a softmax here. */
static int attend_batch(cpu_llama *m, const cpu_llama_batch *b)
{
    const cpu_llama_config *c = &m->cfg;
    double t0 = lf_now();
    int rc = 0;
    if (m->gemm.attend) {
        cpu_llama_attend_args aa = {.n_tokens = b->n_tokens, .n_seqs = b->n_seqs, .seq_start = b->seq_start,
                                    .pos = b->pos, .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads,
                                    .head_dim = c->head_dim, .window = c->sliding_window, .scale = m->attn_scale,
                                    .qkv = m->qkv, .attn = m->attn};
        rc = m->gemm.attend(m->gemm.ctx, &aa);
    } else {
        for (uint64_t s = 0; s < b->n_seqs && rc == 0; s++) {
            uint64_t r0 = b->seq_start[s], n = b->seq_start[s + 1] - r0;
            if (n)
                rc = attend_sequence(m, r0, n, b->pos + r0);
        }
    }
    m->t_attention += lf_now() - t0;
    return rc;
}

static int layer_forward(cpu_llama *m, const cpu_llama_layer *w, const cpu_llama_batch *b, float *x);

void cpu_llama_set_layer_outputs(cpu_llama *m, const int slot[CPU_LLAMA_IN_COUNT],
                                 const bool want[CPU_LLAMA_IN_COUNT])
{
    memcpy(m->layer_slot, slot, sizeof m->layer_slot);
    memcpy(m->layer_want, want, sizeof m->layer_want);
}

bool cpu_llama_layer_added_stats(const cpu_llama *m) { return m->layer_added_stats; }

/* The layer through the seam's layer function: the same computation where
 * the seam runs it. */
static int layer_on_seam(cpu_llama *m, const cpu_llama_layer *w, const cpu_llama_batch *b, float *x)
{
    cpu_llama_layer_args a = {.cfg = &m->cfg, .w = w, .b = b, .rope_cos = m->rope_cos, .rope_sin = m->rope_sin,
                              .max_pos = m->max_pos, .attn_scale = m->attn_scale, .x = x};
    for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
        a.stat_slot[k] = m->layer_slot[k];
        a.input[k] = m->layer_want[k] ? (float *)cpu_llama_linear_input(m, (cpu_llama_input)k, &a.input_ld[k]) : NULL;
    }
    return m->gemm.layer(m->gemm.ctx, &a);
}

int cpu_llama_layer_forward(cpu_llama *m, const cpu_llama_layer *w, const cpu_llama_batch *b, float *x)
{
    double t0 = lf_now();
    m->layer_added_stats = false;
    CPU_ASSERT(b->n_tokens <= m->max_tokens);
    for (uint64_t s = 0; s < b->n_seqs; s++)
        CPU_ASSERT(b->seq_start[s + 1] >= b->seq_start[s] && b->seq_start[s + 1] - b->seq_start[s] <= m->max_seq);
    for (uint64_t r = 0; r < b->n_tokens; r++)
        CPU_ASSERT(b->pos[r] < m->max_pos);
    int rc;
    if (m->gemm.layer) {
        rc = layer_on_seam(m, w, b, x);
        m->layer_added_stats = rc == 0;
    } else {
        rc = layer_forward(m, w, b, x);
    }
    m->t_layers += lf_now() - t0;
    return rc;
}

void cpu_llama_times(const cpu_llama *m, double *layers_s, double *linear_s, double *attention_s)
{
    *layers_s = m->t_layers;
    *linear_s = m->t_linear;
    *attention_s = m->t_attention;
}

static int layer_forward(cpu_llama *m, const cpu_llama_layer *w, const cpu_llama_batch *b, float *x)
{
    const cpu_llama_config *c = &m->cfg;
    uint64_t T = b->n_tokens, H = c->hidden, QKV = cpu_llama_qkv_rows(c), Q = cpu_llama_q_dim(c),
             II = c->intermediate;
    CPU_ASSERT(T <= m->max_tokens && b->seq_start[0] == 0 && b->seq_start[b->n_seqs] == T);
    if (T == 0)
        return 0;

    /* attention */
    cpu_llama_rms_norm(m, x, w->attn_norm, T, m->xn_attn);
    LF_TRY(linear_gemm(m, T, QKV, H, m->xn_attn, H, w->w_qkv, m->qkv, QKV));
    if (w->b_qkv) {
        bias_job bj = {m->qkv, w->b_qkv, QKV, QKV};
        par_rows(m, T, bias_rows, &bj);
    }
    rope_job rj = {m, b->pos};
    par_rows(m, T, rope_rows, &rj);
    LF_TRY(attend_batch(m, b));
    LF_TRY(linear_gemm(m, T, H, Q, m->attn, Q, w->w_o, m->proj, H));
    residual_job oj = {x, m->proj, w->b_o, H};
    par_rows(m, T, residual_rows, &oj);

    /* MLP */
    cpu_llama_rms_norm(m, x, w->mlp_norm, T, m->xn);
    LF_TRY(linear_gemm(m, T, 2 * II, H, m->xn, H, w->w_gate_up, m->gu, 2 * II));
    if (w->b_gate_up) {
        bias_job bj = {m->gu, w->b_gate_up, 2 * II, 2 * II};
        par_rows(m, T, bias_rows, &bj);
    }
    swiglu_job sj = {m->gu, II};
    par_rows(m, T, swiglu_rows, &sj);
    LF_TRY(linear_gemm(m, T, H, II, m->gu, 2 * II, w->w_down, m->proj, H));
    residual_job dj = {x, m->proj, w->b_down, H};
    par_rows(m, T, residual_rows, &dj);
    return 0;
}

const float *cpu_llama_linear_input(const cpu_llama *m, cpu_llama_input which, uint64_t *ld)
{
    const cpu_llama_config *c = &m->cfg;
    switch (which) {
    case CPU_LLAMA_IN_QKV: *ld = c->hidden; return m->xn_attn;
    case CPU_LLAMA_IN_O: *ld = cpu_llama_q_dim(c); return m->attn;
    case CPU_LLAMA_IN_GATE_UP: *ld = c->hidden; return m->xn;
    case CPU_LLAMA_IN_DOWN: *ld = 2 * c->intermediate; return m->gu; /* the gate half holds silu(gate) * up */
    default: CPU_ASSERT(!"bad linear input"); return NULL;
    }
}

/* ============================================================ the head */

int cpu_llama_logits(cpu_llama *m, const float *xn, uint64_t n, const float *w_rows, uint64_t n_rows, float *out)
{
    return m->gemm.gemm(m->gemm.ctx, true, n, n_rows, m->cfg.hidden, 1.0f, xn, m->cfg.hidden, w_rows, m->cfg.hidden,
                        0.0f, out, n_rows, CPU_GEMM_B_WEIGHT);
}

typedef struct nll_job {
    const float *logits;
    uint64_t n_cols, v0;
    const int64_t *targets;
    const cpu_llama_nll *st;
} nll_job;

/* Max and sum of exp(l - mx) of one row of logits. */
CPU_CLONES static float row_max(const float *restrict l, uint64_t n)
{
    float lane[LF_LANES];
    for (unsigned k = 0; k < LF_LANES; k++)
        lane[k] = -INFINITY;
    uint64_t i = 0;
    for (; i + LF_LANES <= n; i += LF_LANES)
        for (unsigned k = 0; k < LF_LANES; k++)
            lane[k] = l[i + k] > lane[k] ? l[i + k] : lane[k];
    float mx = -INFINITY;
    for (; i < n; i++)
        mx = l[i] > mx ? l[i] : mx;
    for (unsigned k = 0; k < LF_LANES; k++)
        mx = lane[k] > mx ? lane[k] : mx;
    return mx;
}

CPU_CLONES static double row_sum_exp(const float *restrict l, uint64_t n, float mx)
{
    float lane[LF_LANES] = {0};
    double sum = 0;
    uint64_t i = 0;
    /* Lanes are folded into the fp64 sum every 1024 columns, so no fp32 partial
     * sum covers more than 64 terms. */
    while (i + LF_LANES <= n) {
        uint64_t stop = i + 1024 < n ? i + 1024 : n;
        for (; i + LF_LANES <= stop; i += LF_LANES)
            for (unsigned k = 0; k < LF_LANES; k++)
                lane[k] += lf_expf(l[i + k] - mx);
        for (unsigned k = 0; k < LF_LANES; k++) {
            sum += (double)lane[k];
            lane[k] = 0.0f;
        }
    }
    for (; i < n; i++)
        sum += (double)lf_expf(l[i] - mx);
    return sum;
}

static void nll_rows(void *c, uint64_t r0, uint64_t r1)
{
    const nll_job *j = c;
    for (uint64_t t = r0; t < r1; t++) {
        const float *l = j->logits + t * j->n_cols;
        float mx = row_max(l, j->n_cols);
        float old = j->st->max[t];
        if (mx > old) {
            if (old != -INFINITY)
                j->st->sum[t] *= exp((double)old - (double)mx);
            j->st->max[t] = mx;
        } else {
            mx = old;
        }
        j->st->sum[t] += row_sum_exp(l, j->n_cols, mx);
        int64_t tg = j->targets ? j->targets[t] : -1;
        if (tg >= 0 && (uint64_t)tg >= j->v0 && (uint64_t)tg - j->v0 < j->n_cols)
            j->st->target[t] = l[(uint64_t)tg - j->v0];
    }
}

void cpu_llama_nll_update(cpu_llama *m, const float *logits, uint64_t n, uint64_t n_cols, uint64_t v0,
                          const int64_t *targets, const cpu_llama_nll *st)
{
    nll_job j = {logits, n_cols, v0, targets, st};
    par_rows(m, n, nll_rows, &j);
}
