/* The CPU kernels of the Hessian-aware methods (see cpu_merge_hessian.h;
 * the semantics are in pipeline/merge_passes_hessian.h). */
#include "cpu/cpu_merge_hessian.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernel.h"
#include "pipeline/merge_math.h"
#include "pipeline/merge_math_hessian.h"
#include "pipeline/merge_passes_hessian.h"

#define HESS_TASKS_PER_WORKER 4u

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
    cpu_widen(dst, (const unsigned char *)src + off * (dt == ST_F32 ? 4 : 2), dt, n);
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
            CPU_ASSERT(dt == ST_BF16 || dt == ST_F16);
            uint16_t h = dt == ST_BF16 ? ms_merge_store_bf16(src[j]) : ms_merge_store_f16(src[j]);
            memcpy(d + (off + j) * 2, &h, 2);
        }
    }
}

/* regmean solves HESS_LANES rows side by side, one row per fp64 lane: every
 * lane performs exactly its own row's scalar operation sequence (the orders
 * of merge_passes_hessian.h), so the bits are those of one row at a time,
 * but the forward substitution's sequential sums of HESS_LANES rows (each a
 * chain of dependent adds) run in parallel, and each L_jk or G_i[k][j] is
 * read once for all of them. A lane vector of the rows' values at one
 * column is HESS_LANES contiguous doubles ("[cols][HESS_LANES]"); rows past
 * the end of a task fill dead lanes with zeros, which stay finite. */
#define HESS_LANES CPU_MERGE_HESSIAN_LANES
#define HESS_QUADS (HESS_LANES / 4)
_Static_assert(HESS_LANES % 4 == 0 && HESS_LANES > 0, "lanes come in quads");
#define HESS_JTILE 128u /* columns of b per pass over G: the tile (32 KiB) stays in L1 or L2 */
#define HESS_PREFETCH_ROWS 8u /* rows of G ahead: four passes */
#define HESS_ALIGN 64u

/* Helpers of the cloned loops: inlined, so they compile for each clone's ISA. */
#define HESS_INLINE static inline __attribute__((always_inline))

/* Four lanes (gcc's generic vectors: one register with AVX2, two with SSE2);
 * a lane vector is HESS_QUADS of them. */
typedef double hess_v4d __attribute__((vector_size(32)));

typedef struct hess_lanes {
    hess_v4d q[HESS_QUADS];
} hess_lanes;

/* A quad in memory: any alignment of a double, aliasing doubles. */
typedef double hess_v4d_mem __attribute__((vector_size(32), aligned(8), may_alias));

/* One quad at a time, unrolled: gcc then keeps a hess_lanes in registers. */
HESS_INLINE void lanes_load(hess_lanes *v, const double *p)
{
#pragma GCC unroll 8
    for (unsigned q = 0; q < HESS_QUADS; q++)
        v->q[q] = *(const hess_v4d_mem *)(p + 4 * q);
}

HESS_INLINE void lanes_store(double *p, const hess_lanes *v)
{
#pragma GCC unroll 8
    for (unsigned q = 0; q < HESS_QUADS; q++)
        *(hess_v4d_mem *)(p + 4 * q) = v->q[q];
}

/* a in all four lanes (a macro: a function returning a vector would change
 * the ABI of the default clone) */
#define QUAD_SPLAT(a) ((hess_v4d){(a), (a), (a), (a)})

typedef struct hess_scratch {
    double *b;   /* [cols][HESS_LANES]: b, then y */
    double *z;   /* [cols][HESS_LANES]: tau_i as fp64 while b is summed, then z */
    float *base; /* [HESS_LANES][cols] */
    float *out;  /* [cols] */
    float *x;    /* [n_models][cols]: X_i (the mean), or one row of X_i then tau_i */
} hess_scratch;

typedef struct hess_ctx {
    const ms_tensor_params *p;
    const ms_hessian_state *hs; /* NULL or !regmean_solve: the mean */
    const ms_chunk *c;
    hess_scratch *scratch;      /* [n_workers] */
    uint64_t rows_per_task;     /* a multiple of HESS_LANES */
    float ones[MS_MAX_MODELS];
    float wsum;                 /* (float)n_models */
} hess_ctx;

/* b[j] += G[k][j] * t[k] over all k ascending (lane vectors b, t of n
 * columns, g [n][n] row major): each b_j's adds in k order, as the scalar
 * loop (k outer, j inner) does them, with the columns cut in tiles so that
 * a tile of b stays in L1 while G streams by, two rows of G per pass. A
 * pass reads only a short piece of each row, too short for the hardware
 * prefetcher: the rows HESS_PREFETCH_ROWS ahead are prefetched by hand. */
CPU_CLONES static void regmean_accumulate(double *restrict b, const double *restrict t, const float *restrict g,
                                           uint64_t n)
{
    for (uint64_t j0 = 0; j0 < n; j0 += HESS_JTILE) {
        uint64_t j1 = n - j0 < HESS_JTILE ? n : j0 + HESS_JTILE;
        uint64_t k = 0;
        for (; k + 2 <= n; k += 2) {
            hess_lanes t0, t1;
            lanes_load(&t0, t + k * HESS_LANES);
            lanes_load(&t1, t + (k + 1) * HESS_LANES);
            const float *g0 = g + k * n, *g1 = g0 + n;
            uint64_t kp = k + HESS_PREFETCH_ROWS + 1 < n ? k + HESS_PREFETCH_ROWS : k;
            const float *p0 = g + kp * n, *p1 = p0 + n;
            for (uint64_t j = j0; j < j1; j++) {
                __builtin_prefetch(p0 + j);
                __builtin_prefetch(p1 + j);
                hess_v4d ga = QUAD_SPLAT((double)g0[j]), gb = QUAD_SPLAT((double)g1[j]);
                hess_lanes v;
                lanes_load(&v, b + j * HESS_LANES);
#pragma GCC unroll 8
                for (unsigned q = 0; q < HESS_QUADS; q++) {
                    v.q[q] = v.q[q] + ga * t0.q[q];
                    v.q[q] = v.q[q] + gb * t1.q[q];
                }
                lanes_store(b + j * HESS_LANES, &v);
            }
        }
        for (; k < n; k++) {
            hess_lanes t0;
            lanes_load(&t0, t + k * HESS_LANES);
            const float *g0 = g + k * n;
            for (uint64_t j = j0; j < j1; j++) {
                hess_v4d ga = QUAD_SPLAT((double)g0[j]);
                hess_lanes v;
                lanes_load(&v, b + j * HESS_LANES);
#pragma GCC unroll 8
                for (unsigned q = 0; q < HESS_QUADS; q++)
                    v.q[q] = v.q[q] + ga * t0.q[q];
                lanes_store(b + j * HESS_LANES, &v);
            }
        }
    }
}

/* z = L^-1 b (forward substitution, L lower row-major n x n): z_j = (b_j -
 * s_j) / L_jj with s_j = sum_{k<j} L_jk z_k sequential from 0.0. Rows j and
 * j + 1 are summed together (each its own chain, in k order) so that each
 * z_k is loaded once for both. */
CPU_CLONES static void regmean_forward(const double *restrict L, uint64_t n, const double *restrict b,
                                        double *restrict z)
{
    uint64_t j = 0;
    for (; j + 2 <= n; j += 2) {
        const double *l0 = L + j * n, *l1 = l0 + n;
        hess_lanes s0, s1;
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++)
            s0.q[q] = s1.q[q] = QUAD_SPLAT(0.0);
        for (uint64_t k = 0; k < j; k++) {
            hess_v4d a0 = QUAD_SPLAT(l0[k]), a1 = QUAD_SPLAT(l1[k]);
            hess_lanes zk;
            lanes_load(&zk, z + k * HESS_LANES);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++) {
                s0.q[q] = s0.q[q] + a0 * zk.q[q];
                s1.q[q] = s1.q[q] + a1 * zk.q[q];
            }
        }
        hess_lanes bj, bj1, zj, zj1;
        lanes_load(&bj, b + j * HESS_LANES);
        lanes_load(&bj1, b + (j + 1) * HESS_LANES);
        hess_v4d d0 = QUAD_SPLAT(l0[j]), a1 = QUAD_SPLAT(l1[j]), d1 = QUAD_SPLAT(l1[j + 1]);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++) {
            zj.q[q] = (bj.q[q] - s0.q[q]) / d0;
            s1.q[q] = s1.q[q] + a1 * zj.q[q];
            zj1.q[q] = (bj1.q[q] - s1.q[q]) / d1;
        }
        lanes_store(z + j * HESS_LANES, &zj);
        lanes_store(z + (j + 1) * HESS_LANES, &zj1);
    }
    if (j < n) {
        const double *l0 = L + j * n;
        hess_lanes s0;
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++)
            s0.q[q] = QUAD_SPLAT(0.0);
        for (uint64_t k = 0; k < j; k++) {
            hess_v4d a0 = QUAD_SPLAT(l0[k]);
            hess_lanes zk;
            lanes_load(&zk, z + k * HESS_LANES);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++)
                s0.q[q] = s0.q[q] + a0 * zk.q[q];
        }
        hess_lanes bj, zj;
        lanes_load(&bj, b + j * HESS_LANES);
        hess_v4d d0 = QUAD_SPLAT(l0[j]);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++)
            zj.q[q] = (bj.q[q] - s0.q[q]) / d0;
        lanes_store(z + j * HESS_LANES, &zj);
    }
}

/* y = L^-T z (backward substitution, column-oriented) into y; z is
 * consumed. j descending: y_j = z_j / L_jj, then z_k -= L_jk y_j for k < j.
 * Columns j and j - 1 are taken together: z_{j-1} gets its update from y_j
 * first, and every other z_k its two updates in the same order (j, then
 * j - 1), so each z_k is loaded and stored once for both. */
CPU_CLONES static void regmean_backward(const double *restrict L, uint64_t n, double *restrict z,
                                         double *restrict y)
{
    uint64_t j = n;
    for (; j >= 2; j -= 2) {
        const double *l0 = L + (j - 1) * n, *l1 = l0 - n; /* rows j - 1 and j - 2 */
        hess_lanes z0, z1, y0, y1;
        lanes_load(&z0, z + (j - 1) * HESS_LANES);
        lanes_load(&z1, z + (j - 2) * HESS_LANES);
        hess_v4d d0 = QUAD_SPLAT(l0[j - 1]), a = QUAD_SPLAT(l0[j - 2]), d1 = QUAD_SPLAT(l1[j - 2]);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++) {
            y0.q[q] = z0.q[q] / d0;
            z1.q[q] = z1.q[q] - a * y0.q[q];
            y1.q[q] = z1.q[q] / d1;
        }
        lanes_store(y + (j - 1) * HESS_LANES, &y0);
        lanes_store(y + (j - 2) * HESS_LANES, &y1);
        for (uint64_t k = 0; k < j - 2; k++) {
            hess_v4d a0 = QUAD_SPLAT(l0[k]), a1 = QUAD_SPLAT(l1[k]);
            hess_lanes zk;
            lanes_load(&zk, z + k * HESS_LANES);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++) {
                zk.q[q] = zk.q[q] - a0 * y0.q[q];
                zk.q[q] = zk.q[q] - a1 * y1.q[q];
            }
            lanes_store(z + k * HESS_LANES, &zk);
        }
    }
    if (j == 1) { /* column 0: nothing left to update */
        hess_lanes z0, y0;
        lanes_load(&z0, z);
        hess_v4d d0 = QUAD_SPLAT(L[0]);
#pragma GCC unroll 8
        for (unsigned q = 0; q < HESS_QUADS; q++)
            y0.q[q] = z0.q[q] / d0;
        lanes_store(y, &y0);
    }
}

/* The mean of the models for one row (no solve). */
static void regmean_mean_row(const hess_ctx *x, hess_scratch *s, uint64_t row)
{
    const ms_tensor_params *p = x->p;
    uint64_t cols = p->cols, off = (row - x->c->row0) * cols;
    unsigned nm = p->n_models;
    for (unsigned i = 1; i <= nm; i++)
        hess_load(s->x + (uint64_t)(i - 1) * cols, x->c->in[i], p->in_dtype[i], off, (size_t)cols);
    for (uint64_t k = 0; k < cols; k++)
        s->out[k] = ms_merge_linear(s->x + k, (size_t)cols, x->ones, nm, true, x->wsum);
    hess_store(x->c->out, p->out_dtype, off, s->out, (size_t)cols);
}

/* Rows row0 .. row0 + nr (nr <= HESS_LANES) solved side by side: lane r
 * is row row0 + r; lanes from nr on are dead (zeros). */
static void regmean_rows(const hess_ctx *x, hess_scratch *s, uint64_t row0, unsigned nr)
{
    const ms_tensor_params *p = x->p;
    uint64_t cols = p->cols, off0 = (row0 - x->c->row0) * cols;
    unsigned nm = p->n_models;
    for (unsigned r = 0; r < nr; r++)
        hess_load(s->base + r * cols, x->c->in[0], p->in_dtype[0], off0 + r * cols, (size_t)cols);
    memset(s->b, 0, (size_t)cols * HESS_LANES * sizeof(double));
    memset(s->z, 0, (size_t)cols * HESS_LANES * sizeof(double)); /* the dead lanes of tau */
    for (unsigned i = 1; i <= nm; i++) {
        for (unsigned r = 0; r < nr; r++) {
            const float *base = s->base + r * cols;
            hess_load(s->x, x->c->in[i], p->in_dtype[i], off0 + r * cols, (size_t)cols);
            for (uint64_t k = 0; k < cols; k++)
                s->z[k * HESS_LANES + r] = (double)ms_merge_delta(s->x[k], base[k]);
        }
        regmean_accumulate(s->b, s->z, x->hs->g[i], cols);
    }
    regmean_forward(x->hs->chol, cols, s->b, s->z);
    regmean_backward(x->hs->chol, cols, s->z, s->b);
    for (unsigned r = 0; r < nr; r++) {
        const float *base = s->base + r * cols;
        for (uint64_t k = 0; k < cols; k++)
            s->out[k] = base[k] + (float)s->b[k * HESS_LANES + r];
        hess_store(x->c->out, p->out_dtype, off0 + r * cols, s->out, (size_t)cols);
    }
}

int cpu_merge_hessian_solve_for_tests(const ms_hessian_state *hs, unsigned n_models, const float *tau, unsigned nr,
                                      double *y)
{
    CPU_ASSERT(hs && hs->regmean_solve && nr >= 1 && nr <= HESS_LANES);
    uint64_t n = hs->dim;
    double *b = calloc(n * HESS_LANES, sizeof *b), *z = calloc(n * HESS_LANES, sizeof *z);
    int rc = -ENOMEM;
    if (!b || !z)
        goto done;
    for (unsigned i = 1; i <= n_models; i++) {
        for (unsigned r = 0; r < nr; r++)
            for (uint64_t k = 0; k < n; k++)
                z[k * HESS_LANES + r] = (double)tau[((uint64_t)(i - 1) * nr + r) * n + k];
        regmean_accumulate(b, z, hs->g[i], n);
    }
    regmean_forward(hs->chol, n, b, z);
    regmean_backward(hs->chol, n, z, b);
    for (unsigned r = 0; r < nr; r++)
        for (uint64_t k = 0; k < n; k++)
            y[(uint64_t)r * n + k] = b[k * HESS_LANES + r];
    rc = 0;
done:
    free(b);
    free(z);
    return rc;
}

static void task_regmean(void *vx, unsigned task, unsigned worker)
{
    hess_ctx *x = vx;
    hess_scratch *s = &x->scratch[worker];
    uint64_t r0 = x->c->row0 + (uint64_t)task * x->rows_per_task;
    uint64_t end = x->c->row0 + x->c->n_rows;
    uint64_t r1 = r0 + x->rows_per_task < end ? r0 + x->rows_per_task : end;
    bool solve = x->hs && x->hs->regmean_solve;
    for (uint64_t r = r0; r < r1; r += HESS_LANES) {
        unsigned nr = r1 - r < HESS_LANES ? (unsigned)(r1 - r) : HESS_LANES;
        if (solve) {
            regmean_rows(x, s, r, nr);
        } else {
            for (unsigned q = 0; q < nr; q++)
                regmean_mean_row(x, s, r + q);
        }
    }
}

/* Bytes of one worker's scratch (its layout: hess_scratch's fields in that
 * order, each array aligned to HESS_ALIGN). False on overflow. */
static bool worker_bytes(const ms_tensor_params *p, uint64_t *out)
{
    uint64_t cols = p->cols ? p->cols : 1, d, f, t;
    if (__builtin_mul_overflow(cols, (uint64_t)HESS_LANES * sizeof(double), &d) || d > UINT64_MAX / 4 ||
        __builtin_mul_overflow(cols, (uint64_t)(HESS_LANES + 1 + p->n_models) * sizeof(float), &f) ||
        __builtin_add_overflow(2 * d, f, &t) || t > UINT64_MAX - 5 * HESS_ALIGN)
        return false;
    *out = t + 5 * HESS_ALIGN; /* each of the five arrays rounded up */
    return true;
}

uint64_t cpu_merge_hessian_scratch_bytes(const ms_tensor_params *p, unsigned n_threads)
{
    uint64_t w, total;
    if (n_threads == 0)
        n_threads = 1;
    if (!worker_bytes(p, &w) || __builtin_mul_overflow(w + HESS_ALIGN, (uint64_t)n_threads, &total) ||
        total > UINT64_MAX - 4096)
        return UINT64_MAX;
    return total + (uint64_t)n_threads * sizeof(hess_scratch) + 64;
}

/* The next HESS_ALIGN boundary at or after *at, then *at moves past bytes. */
static void *carve(unsigned char **at, uint64_t bytes)
{
    uintptr_t a = ((uintptr_t)*at + HESS_ALIGN - 1) & ~(uintptr_t)(HESS_ALIGN - 1);
    *at = (unsigned char *)a + bytes;
    return (void *)a;
}

int cpu_merge_hessian_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                               cpu_pool *pool)
{
    CPU_ASSERT(p->method == MS_METHOD_REGMEAN);
    CPU_ASSERT(pass < st->n_passes && st->pass[pass] == MS_MERGE_PASS_APPLY);
    CPU_ASSERT(c->elem0 == st->next_elem);
    CPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    CPU_ASSERT(c->elem0 + c->n_elems <= p->numel && c->in[0]);
    CPU_ASSERT(!st->hessian || !st->hessian->regmean_solve || st->hessian->dim == p->cols);
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
    uint64_t cols = p->cols, lanes = cols * HESS_LANES;
    for (unsigned w = 0; w < nw; w++) {
        unsigned char *m = malloc((size_t)wb), *at = m;
        if (!m)
            goto done;
        mem[w] = m;
        hess_scratch *s = &x.scratch[w];
        s->b = carve(&at, lanes * sizeof(double));
        s->z = carve(&at, lanes * sizeof(double));
        s->base = carve(&at, cols * HESS_LANES * sizeof(float));
        s->out = carve(&at, cols * sizeof(float));
        s->x = carve(&at, cols * p->n_models * sizeof(float));
        CPU_ASSERT(at <= m + wb);
    }
    /* tasks of whole lane groups, about HESS_TASKS_PER_WORKER per worker */
    uint64_t want = (uint64_t)nw * HESS_TASKS_PER_WORKER;
    x.rows_per_task = (c->n_rows + want - 1) / want;
    x.rows_per_task = (x.rows_per_task + HESS_LANES - 1) / HESS_LANES * HESS_LANES;
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
