/* Pass plans, state and fp64 host algebra of the Hessian-aware methods (see
 * merge_passes_hessian.h for the semantics). */
#include "pipeline/merge_passes_hessian.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_pool.h"
#include "io/ms_error.h"
#include "io/ms_fault.h"

bool ms_merge_hessian_method(ms_method m)
{
    return m == MS_METHOD_TIES_SPARSEGPT || m == MS_METHOD_DARE_SPARSEGPT || m == MS_METHOD_REGMEAN;
}

/* ================================================================ plan */

void ms_merge_hessian_plan(const ms_tensor_params *p, ms_merge_state *st)
{
    MS_ASSERT(ms_merge_hessian_method(p->method));
    if (p->method == MS_METHOD_REGMEAN) {
        for (unsigned i = 1; i <= st->n_models; i++) {
            memset(&st->model[i], 0, sizeof st->model[i]);
            st->model[i].sel = MS_MERGE_SEL_ALL;
            st->model[i].factor = 1.0f;
        }
        st->n_passes = 1;
        st->pass[0] = MS_MERGE_PASS_APPLY;
        return;
    }
    if (p->method == MS_METHOD_DARE_SPARSEGPT) {
        for (unsigned i = 1; i <= st->n_models; i++) {
            ms_merge_model *m = &st->model[i];
            MS_ASSERT(!m->rescale);
            if (m->sel == MS_MERGE_SEL_TOP) /* 0 < k < numel */
                m->factor = (float)((double)p->numel / (double)m->k);
        }
    }
}

bool ms_hessian_model_uses_u(const ms_merge_state *st, const ms_tensor_params *p, unsigned i)
{
    return (p->method == MS_METHOD_TIES_SPARSEGPT || p->method == MS_METHOD_DARE_SPARSEGPT) &&
           st->model[i].sel == MS_MERGE_SEL_TOP;
}

/* ============================================================ algebra */

/* The factorisation's fixed order is that of the plain row-oriented loop
 * (Cholesky-Banachiewicz)
 *     for j: for k < j: L[j][k] = (a[j][k] - hessian_dot(L[j], L[k], k)) / L[k][k]
 *            L[j][j] = sqrt(a[j][j] - hessian_dot(L[j], L[j], j))
 * where hessian_dot(x, y, len) = sum_m x[m] * y[m], m < len: lane l sums
 * m = l mod 8 sequentially from 0.0 (whole groups of 8, m < 8 * floor(len /
 * 8)), the lanes are combined as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6
 * + l7)), then the tail is added sequentially. The blocked code below does
 * exactly these operations in this order for every entry, so the bits do
 * not depend on the block size or the threads (tests/unit/
 * test_hessian_cholesky.c keeps the plain loop as its reference).
 * It goes left to right by blocks of CHOL_BLOCK columns [j0, j1) (j0 a
 * multiple of 8, so the part of each dot below j0 is lane work only:
 * hessian_dot's tail starts at 8 * floor(k / 8) >= j0). For a row i it keeps
 * each block column's 8 lane sums; first the prefix m < j0 of all the
 * block's columns at once (row i is streamed once against the block's rows,
 * which stay in cache, tile by tile in increasing m), then column by column
 * the rest of the lanes (m in [j0, 8 * floor(k / 8))), the fold and the
 * sequential tail. The block's own rows (which read each other) go first,
 * one after the other on the calling thread, so a failing pivot leaves `a`
 * as the row-oriented loop leaves it; the rows below only read them and run
 * in parallel. */
#define CHOL_BLOCK 32        /* columns per block: a multiple of the 8 lanes */
#define CHOL_TILE 512        /* prefix elements per pass over the block's rows (32 x 4 KiB) */
#define CHOL_TASK_ROWS 8     /* rows below the block per pool task */

typedef double chol_lanes[8];

/* Two lanes per vector, written out: GCC's own vectorisation of the lane
 * loops shuffles and spills (3x slower). Elementwise IEEE mul and add, no
 * contraction (-ffp-contract=off): the same bits as the scalar loop. */
typedef double chol_v2 __attribute__((vector_size(16)));

static inline chol_v2 chol_load(const double *p)
{
    chol_v2 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void chol_store(double *p, chol_v2 v)
{
    memcpy(p, &v, sizeof v);
}

/* lane[l] += x[m] * y[m] for m = l mod 8 in [m0, m1) (multiples of 8), m increasing. */
static void chol_lanes_add(double *restrict lane, const double *restrict x, const double *restrict y, uint64_t m0,
                           uint64_t m1)
{
    chol_v2 s0 = chol_load(lane), s1 = chol_load(lane + 2), s2 = chol_load(lane + 4), s3 = chol_load(lane + 6);
    for (uint64_t m = m0; m < m1; m += 8) {
        s0 = s0 + chol_load(x + m) * chol_load(y + m);
        s1 = s1 + chol_load(x + m + 2) * chol_load(y + m + 2);
        s2 = s2 + chol_load(x + m + 4) * chol_load(y + m + 4);
        s3 = s3 + chol_load(x + m + 6) * chol_load(y + m + 6);
    }
    chol_store(lane, s0);
    chol_store(lane + 2, s1);
    chol_store(lane + 4, s2);
    chol_store(lane + 6, s3);
}

/* The same for two columns at once (x is loaded once for both). */
static void chol_lanes_add2(double *restrict lane0, double *restrict lane1, const double *restrict x,
                            const double *restrict y0, const double *restrict y1, uint64_t m0, uint64_t m1)
{
    chol_v2 a0 = chol_load(lane0), a1 = chol_load(lane0 + 2), a2 = chol_load(lane0 + 4), a3 = chol_load(lane0 + 6);
    chol_v2 b0 = chol_load(lane1), b1 = chol_load(lane1 + 2), b2 = chol_load(lane1 + 4), b3 = chol_load(lane1 + 6);
    for (uint64_t m = m0; m < m1; m += 8) {
        chol_v2 x0 = chol_load(x + m), x1 = chol_load(x + m + 2), x2 = chol_load(x + m + 4),
                x3 = chol_load(x + m + 6);
        a0 = a0 + x0 * chol_load(y0 + m);
        a1 = a1 + x1 * chol_load(y0 + m + 2);
        a2 = a2 + x2 * chol_load(y0 + m + 4);
        a3 = a3 + x3 * chol_load(y0 + m + 6);
        b0 = b0 + x0 * chol_load(y1 + m);
        b1 = b1 + x1 * chol_load(y1 + m + 2);
        b2 = b2 + x2 * chol_load(y1 + m + 4);
        b3 = b3 + x3 * chol_load(y1 + m + 6);
    }
    chol_store(lane0, a0);
    chol_store(lane0 + 2, a1);
    chol_store(lane0 + 4, a2);
    chol_store(lane0 + 6, a3);
    chol_store(lane1, b0);
    chol_store(lane1 + 2, b1);
    chol_store(lane1 + 4, b2);
    chol_store(lane1 + 6, b3);
}

/* Rows [r0, r0 + nr) of a: acc[r * nk + c] := the lanes of
 * hessian_dot(L[r0 + r], L[j0 + c], .) over m < j0, for the nk columns
 * j0 .. j0 + nk - 1 (rows already final below j0). */
static void chol_prefix_lanes(const double *a, uint64_t n, uint64_t r0, uint64_t nr, uint64_t j0, uint64_t nk,
                              chol_lanes *acc)
{
    memset(acc, 0, (size_t)(nr * nk) * sizeof *acc);
    for (uint64_t t0 = 0; t0 < j0; t0 += CHOL_TILE) {
        uint64_t t1 = j0 - t0 < CHOL_TILE ? j0 : t0 + CHOL_TILE;
        for (uint64_t r = 0; r < nr; r++) {
            const double *x = a + (r0 + r) * n;
            chol_lanes *row_acc = acc + r * nk;
            uint64_t c = 0;
            for (; c + 2 <= nk; c += 2)
                chol_lanes_add2(row_acc[c], row_acc[c + 1], x, a + (j0 + c) * n, a + (j0 + c + 1) * n, t0, t1);
            if (c < nk)
                chol_lanes_add(row_acc[c], x, a + (j0 + c) * n, t0, t1);
        }
    }
}

/* Finishes row i's columns [j0, j0 + nk) from their prefix lanes, in column
 * order; the last is the diagonal when j0 + nk == i + 1. Returns 0, or
 * -EDOM at a pivot that is not > 0 (or NaN). */
static int chol_finish_row(double *a, uint64_t n, uint64_t i, uint64_t j0, uint64_t nk, chol_lanes *acc)
{
    double *x = a + i * n;
    for (uint64_t c = 0; c < nk; c++) {
        uint64_t k = j0 + c;
        const double *y = a + k * n;
        uint64_t lanes_end = k & ~(uint64_t)7;
        double *lane = acc[c];
        chol_lanes_add(lane, x, y, j0, lanes_end);
        double s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        for (uint64_t m = lanes_end; m < k; m++)
            s = s + x[m] * y[m];
        if (k < i) {
            x[k] = (x[k] - s) / y[k];
        } else {
            double d = x[i] - s;
            if (!(d > 0.0))
                return -EDOM;
            x[i] = sqrt(d);
        }
    }
    return 0;
}

typedef struct chol_panel {
    double *a;
    uint64_t n, j0, j1; /* the block's columns */
} chol_panel;

/* Pool task: CHOL_TASK_ROWS rows below the block, each independent. */
static void chol_panel_task(void *ctx, unsigned task, unsigned worker)
{
    (void)worker;
    const chol_panel *pn = ctx;
    chol_lanes acc[CHOL_TASK_ROWS * CHOL_BLOCK];
    uint64_t nk = pn->j1 - pn->j0;
    uint64_t r0 = pn->j1 + (uint64_t)task * CHOL_TASK_ROWS;
    uint64_t nr = pn->n - r0 < CHOL_TASK_ROWS ? pn->n - r0 : CHOL_TASK_ROWS;
    chol_prefix_lanes(pn->a, pn->n, r0, nr, pn->j0, nk, acc);
    for (uint64_t r = 0; r < nr; r++)
        (void)chol_finish_row(pn->a, pn->n, r0 + r, pn->j0, nk, acc + r * nk); /* no pivot: cannot fail */
}

int ms_hessian_cholesky_pool(double *a, uint64_t n, cpu_pool *pool)
{
    chol_lanes acc[CHOL_BLOCK];
    for (uint64_t j0 = 0; j0 < n; j0 += CHOL_BLOCK) {
        uint64_t j1 = n - j0 < CHOL_BLOCK ? n : j0 + CHOL_BLOCK;
        /* the block's rows, in order: row i reads rows j0 .. i - 1 of the block */
        for (uint64_t i = j0; i < j1; i++) {
            chol_prefix_lanes(a, n, i, 1, j0, i + 1 - j0, acc);
            int rc = chol_finish_row(a, n, i, j0, i + 1 - j0, acc);
            if (rc != 0)
                return rc;
        }
        uint64_t below = n - j1;
        if (below == 0)
            continue;
        chol_panel pn = {.a = a, .n = n, .j0 = j0, .j1 = j1};
        uint64_t n_tasks = (below + CHOL_TASK_ROWS - 1) / CHOL_TASK_ROWS;
        MS_ASSERT(n_tasks <= UINT32_MAX);
        if (pool)
            cpu_pool_run(pool, (unsigned)n_tasks, chol_panel_task, &pn);
        else
            for (unsigned t = 0; t < n_tasks; t++)
                chol_panel_task(&pn, t, 0);
    }
    return 0;
}

int ms_hessian_cholesky(double *a, uint64_t n)
{
    return ms_hessian_cholesky_pool(a, n, NULL);
}

void ms_hessian_damp(const float *H, uint64_t n, double *h)
{
    for (uint64_t j = 0; j < n * n; j++)
        h[j] = (double)H[j];
    double sum = 0.0;
    for (uint64_t j = 0; j < n; j++) {
        if (h[j * n + j] == 0.0)
            h[j * n + j] = 1.0;
        sum = sum + h[j * n + j];
    }
    double damp = MS_HESSIAN_DAMP * (sum / (double)n);
    for (uint64_t j = 0; j < n; j++)
        h[j * n + j] = h[j * n + j] + damp;
}

/* Factors a (built by build(ctx, a)) where f says: the device first, the
 * CPU when it declines (from a built anew when the device may have
 * overwritten it). */
static int factor_with(double *a, uint64_t n, bool diag_only, const ms_hessian_factoriser *f,
                       void (*build)(const void *ctx, uint64_t n, double *a), const void *ctx)
{
    build(ctx, n, a);
    if (f && f->device) {
        int rc = f->device(f->device_ctx, a, n, diag_only);
        if (rc != -EAGAIN && rc != -ENODEV)
            return rc;
        if (rc == -EAGAIN)
            build(ctx, n, a);
    }
    return ms_hessian_cholesky_pool(a, n, f ? f->pool : NULL);
}

int ms_hessian_saliency_u(const float *H, uint64_t n, double *work, float *u)
{
    return ms_hessian_saliency_u_with(H, n, work, u, NULL);
}

/* work := J H_damped J (the matrix whose factor gives u). */
static void saliency_matrix(const void *H, uint64_t n, double *work)
{
    ms_hessian_damp(H, n, work);
    /* reverse rows and columns in place: work := J H J */
    for (uint64_t a = 0; a < n; a++) {
        for (uint64_t b = 0; b < n; b++) {
            uint64_t ra = n - 1 - a, rb = n - 1 - b;
            if (a * n + b < ra * n + rb) {
                double t = work[a * n + b];
                work[a * n + b] = work[ra * n + rb];
                work[ra * n + rb] = t;
            }
        }
    }
}

int ms_hessian_saliency_u_with(const float *H, uint64_t n, double *work, float *u, const ms_hessian_factoriser *f)
{
    if (n == 0)
        return 0;
    int rc = factor_with(work, n, true, f, saliency_matrix, H);
    if (rc != 0)
        return rc;
    for (uint64_t j = 0; j < n; j++) {
        uint64_t r = n - 1 - j;
        u[j] = (float)(1.0 / work[r * n + r]);
    }
    return 0;
}

/* =============================================================== state */

static bool mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

uint64_t ms_hessian_state_bytes(const ms_tensor_params *p)
{
    if (!ms_merge_hessian_method(p->method))
        return 0;
    uint64_t n = p->cols, nn;
    if (!mul_ok(n, n, &nn) || nn > UINT64_MAX / 64)
        return UINT64_MAX;
    uint64_t bytes = sizeof(ms_hessian_state) + nn * 4; /* + one raw H being read */
    if (p->method == MS_METHOD_REGMEAN)
        return bytes + (uint64_t)p->n_models * nn * 4 + nn * 8; /* G_i, S / L */
    return bytes + nn * 8 + (uint64_t)p->n_models * n * 4;  /* work, u */
}

int ms_hessian_state_open(ms_merge_state *st, const ms_tensor_params *p)
{
    MS_ASSERT(ms_merge_hessian_method(p->method) && st->hessian == NULL);
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
        return -ENOMEM;
    ms_hessian_state *hs = calloc(1, sizeof *hs);
    if (!hs)
        return -ENOMEM;
    hs->dim = p->cols;
    st->hessian = hs;
    return 0;
}

void ms_hessian_state_close(ms_hessian_state *hs)
{
    if (!hs)
        return;
    free(hs->mem);
    free(hs->gmem);
    free(hs);
}

/* Model i's slot for u in hs->mem (allocated with the first). */
static float *saliency_slot(ms_hessian_state *hs, const ms_tensor_params *p, unsigned i)
{
    uint64_t n = hs->dim;
    if (!hs->mem) {
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
            return NULL;
        hs->mem = calloc((size_t)p->n_models * (size_t)n, sizeof(float));
        if (!hs->mem)
            return NULL;
    }
    return (float *)hs->mem + (uint64_t)(i - 1) * n;
}

static int add_saliency(ms_hessian_state *hs, const ms_tensor_params *p, unsigned i, const float *H,
                        const ms_hessian_factoriser *f)
{
    uint64_t n = hs->dim;
    float *u = saliency_slot(hs, p, i);
    if (!u)
        return -ENOMEM;
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
        return -ENOMEM;
    double *work = malloc((size_t)(n * n) * sizeof(double));
    if (!work)
        return -ENOMEM;
    int rc = ms_hessian_saliency_u_with(H, n, work, u, f);
    free(work);
    if (rc == 0)
        hs->u[i] = u;
    return rc;
}

static int add_regmean(ms_hessian_state *hs, const ms_tensor_params *p, unsigned i, const float *H)
{
    uint64_t n = hs->dim, nn = n * n;
    if (!hs->gmem) {
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
            return -ENOMEM;
        /* L first (doubles), then the G_i */
        hs->gmem = malloc((size_t)nn * (sizeof(double) + (size_t)p->n_models * sizeof(float)));
        if (!hs->gmem)
            return -ENOMEM;
        hs->chol = hs->gmem;
        for (unsigned k = 1; k <= p->n_models; k++)
            hs->g[k] = (float *)(hs->chol + nn) + (uint64_t)(k - 1) * nn;
    }
    /* the damped diagonal needs the fixed-up mean; chol is the work area until finish */
    double *h = hs->chol;
    ms_hessian_damp(H, n, h);
    float *g = hs->g[i];
    double alpha = p->regmean_alpha;
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t k = 0; k < n; k++)
            g[j * n + k] = j == k ? (float)h[j * n + k] : (float)(alpha * h[j * n + k]);
    hs->g_set[i] = true;
    return 0;
}

int ms_hessian_state_add(ms_merge_state *st, const ms_tensor_params *p, unsigned i, const float *H,
                         const ms_hessian_factoriser *f)
{
    ms_hessian_state *hs = st->hessian;
    MS_ASSERT(hs && i >= 1 && i <= p->n_models && hs->dim == p->cols);
    if (p->method == MS_METHOD_REGMEAN)
        return add_regmean(hs, p, i, H);
    if (!ms_hessian_model_uses_u(st, p, i))
        return 0;
    return add_saliency(hs, p, i, H, f);
}

int ms_hessian_state_set_u(ms_merge_state *st, const ms_tensor_params *p, unsigned i, const float *u)
{
    ms_hessian_state *hs = st->hessian;
    MS_ASSERT(hs && i >= 1 && i <= p->n_models && hs->dim == p->cols && ms_hessian_model_uses_u(st, p, i));
    float *slot = saliency_slot(hs, p, i);
    if (!slot)
        return -ENOMEM;
    memcpy(slot, u, (size_t)hs->dim * sizeof *slot);
    hs->u[i] = slot;
    return 0;
}

typedef struct regmean_terms {
    const ms_hessian_state *hs;
    unsigned n_models;
} regmean_terms;

/* S = sum_i G_i in fp64, model order (regmean). */
static void regmean_sum(const void *ctx, uint64_t n, double *s)
{
    const regmean_terms *rt = ctx;
    for (uint64_t e = 0; e < n * n; e++) {
        double v = (double)rt->hs->g[1][e];
        for (unsigned i = 2; i <= rt->n_models; i++)
            v = v + (double)rt->hs->g[i][e];
        s[e] = v;
    }
}

int ms_hessian_state_finish(ms_merge_state *st, const ms_tensor_params *p, const ms_hessian_factoriser *f)
{
    ms_hessian_state *hs = st->hessian;
    MS_ASSERT(hs);
    if (p->method != MS_METHOD_REGMEAN)
        return 0;
    bool all = hs->gmem != NULL;
    for (unsigned i = 1; i <= p->n_models && all; i++)
        all = hs->g_set[i];
    int rc = 0;
    if (all) {
        regmean_terms rt = {hs, p->n_models};
        rc = factor_with(hs->chol, hs->dim, false, f, regmean_sum, &rt);
        if (rc == 0) {
            hs->regmean_solve = true;
            return 0;
        }
    }
    free(hs->gmem);
    hs->gmem = NULL;
    hs->chol = NULL;
    for (unsigned i = 1; i <= MS_MAX_MODELS; i++) {
        hs->g[i] = NULL;
        hs->g_set[i] = false;
    }
    hs->regmean_solve = false;
    return rc;
}
