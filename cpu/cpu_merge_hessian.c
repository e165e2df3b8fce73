/* The CPU kernels of the Hessian-aware methods (see cpu_merge_hessian.h;
 * the semantics are in pipeline/merge_passes_hessian.h). */
#include "cpu/cpu_merge_hessian.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/merge_math.h"
#include "pipeline/merge_math_hessian.h"
#include "pipeline/merge_passes_hessian.h"

#define HESS_TASKS_PER_WORKER 4u

#define HESS_ASSERT(cond)                                                                                  \
    do {                                                                                                   \
        if (!(cond))                                                                                       \
            hess_assert_fail(__FILE__, __LINE__, #cond);                                                   \
    } while (0)

_Noreturn static void hess_assert_fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "mergestream: internal error at %s:%d: %s\n", file, line, what);
    abort();
}

/* ================================================================ keys */

void cpu_merge_hessian_keys(const float *u, uint64_t cols, uint64_t e, size_t n, const float *d, uint32_t *key)
{
    uint64_t col = e % cols;
    size_t j = 0;
    while (j < n) {
        /* the run up to the end of the row: contiguous coefficients */
        size_t run = cols - col < n - j ? (size_t)(cols - col) : n - j;
        const float *uc = u + col;
        for (size_t q = 0; q < run; q++)
            key[j + q] = ms_hessian_saliency_key(d[j + q], uc[q]);
        j += run;
        col = 0;
    }
}

/* ============================================================= regmean */

/* dst[j] = element off + j of src (dtype dt) widened to fp32. */
static void hess_load(float *dst, const void *src, st_dtype dt, uint64_t off, size_t n)
{
    const unsigned char *s = (const unsigned char *)src;
    switch (dt) {
    case ST_F32:
        memcpy(dst, s + off * 4, n * sizeof(float));
        break;
    case ST_BF16:
    case ST_F16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h;
            memcpy(&h, s + (off + j) * 2, 2);
            dst[j] = dt == ST_BF16 ? ms_bf16_to_f32(h) : ms_f16_to_f32(h);
        }
        break;
    default:
        HESS_ASSERT(!"input dtype is not F16, BF16 or F32");
    }
}

/* Rounds src[0..n) once to dt (NaN canonical) into element off.. of dst. */
static void hess_store(void *dst, st_dtype dt, uint64_t off, const float *src, size_t n)
{
    unsigned char *d = (unsigned char *)dst;
    for (size_t j = 0; j < n; j++) {
        if (dt == ST_F32) {
            uint32_t v = ms_merge_store_f32(src[j]);
            memcpy(d + (off + j) * 4, &v, 4);
        } else {
            HESS_ASSERT(dt == ST_BF16 || dt == ST_F16);
            uint16_t h = dt == ST_BF16 ? ms_merge_store_bf16(src[j]) : ms_merge_store_f16(src[j]);
            memcpy(d + (off + j) * 2, &h, 2);
        }
    }
}

typedef struct hess_scratch {
    float *base; /* [cols] */
    float *x;    /* [n_models][cols]: X_i, then tau_i */
    float *out;  /* [cols] */
    double *b;   /* [cols] */
    double *z;   /* [cols] */
} hess_scratch;

typedef struct hess_ctx {
    const ms_tensor_params *p;
    const ms_hessian_state *hs; /* NULL or !regmean_solve: the mean */
    const ms_chunk *c;
    hess_scratch *scratch;      /* [n_workers] */
    uint64_t rows_per_task;
    float ones[MS_MAX_MODELS];
    float wsum;                 /* (float)n_models */
} hess_ctx;

/* y = S^-1 b with S = L L^T (L lower, row-major n x n), in place in b;
 * z is work. The orders are merge_passes_hessian.h's. */
static void regmean_solve(const double *L, uint64_t n, double *b, double *z)
{
    for (uint64_t j = 0; j < n; j++) {
        const double *lj = L + j * n;
        double s = 0.0;
        for (uint64_t k = 0; k < j; k++)
            s = s + lj[k] * z[k];
        z[j] = (b[j] - s) / lj[j];
    }
    for (uint64_t j = n; j-- > 0;) {
        const double *lj = L + j * n;
        double y = z[j] / lj[j];
        b[j] = y;
        for (uint64_t k = 0; k < j; k++)
            z[k] = z[k] - lj[k] * y;
    }
}

static void regmean_row(const hess_ctx *x, hess_scratch *s, uint64_t row)
{
    const ms_tensor_params *p = x->p;
    uint64_t cols = p->cols, off = (row - x->c->row0) * cols;
    unsigned nm = p->n_models;
    for (unsigned i = 1; i <= nm; i++)
        hess_load(s->x + (uint64_t)(i - 1) * cols, x->c->in[i], p->in_dtype[i], off, (size_t)cols);
    if (!x->hs || !x->hs->regmean_solve) {
        for (uint64_t k = 0; k < cols; k++)
            s->out[k] = ms_merge_linear(s->x + k, (size_t)cols, x->ones, nm, true, x->wsum);
        hess_store(x->c->out, p->out_dtype, off, s->out, (size_t)cols);
        return;
    }
    hess_load(s->base, x->c->in[0], p->in_dtype[0], off, (size_t)cols);
    for (uint64_t k = 0; k < cols; k++)
        s->b[k] = 0.0;
    for (unsigned i = 1; i <= nm; i++) {
        float *tau = s->x + (uint64_t)(i - 1) * cols;
        const float *g = x->hs->g[i];
        for (uint64_t k = 0; k < cols; k++)
            tau[k] = ms_merge_delta(tau[k], s->base[k]);
        /* b_j += tau_k G_i[k][j]: k outer, j inner (each b_j in k order) */
        for (uint64_t k = 0; k < cols; k++) {
            double t = (double)tau[k];
            const float *gk = g + k * cols;
            double *b = s->b;
            for (uint64_t j = 0; j < cols; j++)
                b[j] = b[j] + (double)gk[j] * t;
        }
    }
    regmean_solve(x->hs->chol, cols, s->b, s->z);
    for (uint64_t k = 0; k < cols; k++)
        s->out[k] = s->base[k] + (float)s->b[k];
    hess_store(x->c->out, p->out_dtype, off, s->out, (size_t)cols);
}

static void task_regmean(void *vx, unsigned task, unsigned worker)
{
    hess_ctx *x = vx;
    uint64_t r0 = x->c->row0 + (uint64_t)task * x->rows_per_task;
    uint64_t end = x->c->row0 + x->c->n_rows;
    uint64_t r1 = r0 + x->rows_per_task < end ? r0 + x->rows_per_task : end;
    for (uint64_t r = r0; r < r1; r++)
        regmean_row(x, &x->scratch[worker], r);
}

/* Bytes of one worker's scratch. False on overflow. */
static bool worker_bytes(const ms_tensor_params *p, uint64_t *out)
{
    uint64_t cols = p->cols ? p->cols : 1, f, d;
    if (__builtin_mul_overflow(cols, (uint64_t)(p->n_models + 2) * sizeof(float), &f) ||
        __builtin_mul_overflow(cols, 2 * sizeof(double), &d) || __builtin_add_overflow(f, d, out))
        return false;
    return *out <= UINT64_MAX - 64;
}

uint64_t cpu_merge_hessian_scratch_bytes(const ms_tensor_params *p, unsigned n_threads)
{
    uint64_t w, total;
    if (n_threads == 0)
        n_threads = 1;
    if (!worker_bytes(p, &w) || __builtin_mul_overflow(w + 64, (uint64_t)n_threads, &total) ||
        total > UINT64_MAX - 4096)
        return UINT64_MAX;
    return total + (uint64_t)n_threads * sizeof(hess_scratch) + 64;
}

int cpu_merge_hessian_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                               cpu_pool *pool)
{
    HESS_ASSERT(p->method == MS_METHOD_REGMEAN);
    HESS_ASSERT(pass < st->n_passes && st->pass[pass] == MS_MERGE_PASS_APPLY);
    HESS_ASSERT(c->elem0 == st->next_elem);
    HESS_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    HESS_ASSERT(c->elem0 + c->n_elems <= p->numel && c->in[0]);
    HESS_ASSERT(!st->hessian || !st->hessian->regmean_solve || st->hessian->dim == p->cols);
    if (c->n_elems == 0)
        return 0;
    unsigned nw = cpu_pool_size(pool);
    uint64_t wb;
    if (!worker_bytes(p, &wb) || wb > SIZE_MAX / 2)
        return -ENOMEM;
    hess_ctx x;
    memset(&x, 0, sizeof x);
    x.p = p;
    x.hs = st->hessian;
    x.c = c;
    for (unsigned i = 0; i < p->n_models; i++)
        x.ones[i] = 1.0f;
    x.wsum = ms_merge_weight_sum(x.ones, p->n_models);
    x.scratch = calloc(nw, sizeof *x.scratch);
    void **mem = calloc(nw, sizeof *mem);
    int rc = -ENOMEM;
    if (!x.scratch || !mem)
        goto done;
    uint64_t cols = p->cols;
    for (unsigned w = 0; w < nw; w++) {
        unsigned char *m = malloc((size_t)wb);
        if (!m)
            goto done;
        mem[w] = m;
        hess_scratch *s = &x.scratch[w];
        s->b = (double *)m; /* doubles first: aligned */
        s->z = s->b + cols;
        s->base = (float *)(s->z + cols);
        s->out = s->base + cols;
        s->x = s->out + cols;
    }
    uint64_t want = (uint64_t)nw * HESS_TASKS_PER_WORKER;
    x.rows_per_task = (c->n_rows + want - 1) / want;
    unsigned n_tasks = (unsigned)((c->n_rows + x.rows_per_task - 1) / x.rows_per_task);
    cpu_pool_run(pool, n_tasks, task_regmean, &x);
    st->next_elem = c->elem0 + c->n_elems;
    rc = 0;
done:
    for (unsigned w = 0; mem && w < nw; w++)
        free(mem[w]);
    free(mem);
    free(x.scratch);
    return rc;
}
