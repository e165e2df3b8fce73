/* Pass plans, state and fp64 host algebra of the Hessian-aware methods (see
 * merge_passes_hessian.h for the semantics). */
#include "pipeline/merge_passes_hessian.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* sum_m a[m] * b[m], m < n, in the fixed order: lane l sums m = l mod 8
 * sequentially from 0.0 (whole groups of 8), the lanes are combined as
 * ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then the tail is added
 * sequentially. */
static double hessian_dot(const double *a, const double *b, uint64_t n)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t m = 0;
    for (; m + 8 <= n; m += 8)
        for (unsigned l = 0; l < 8; l++)
            acc[l] = acc[l] + a[m + l] * b[m + l];
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; m < n; m++)
        s = s + a[m] * b[m];
    return s;
}

int ms_hessian_cholesky(double *a, uint64_t n)
{
    for (uint64_t j = 0; j < n; j++) {
        double *lj = a + j * n;
        for (uint64_t k = 0; k < j; k++) {
            const double *lk = a + k * n;
            lj[k] = (lj[k] - hessian_dot(lj, lk, k)) / lk[k];
        }
        double s = lj[j] - hessian_dot(lj, lj, j);
        if (!(s > 0.0))
            return -EDOM;
        lj[j] = sqrt(s);
    }
    return 0;
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

int ms_hessian_saliency_u(const float *H, uint64_t n, double *work, float *u)
{
    if (n == 0)
        return 0;
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
    int rc = ms_hessian_cholesky(work, n);
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

static int add_saliency(ms_hessian_state *hs, const ms_tensor_params *p, unsigned i, const float *H)
{
    uint64_t n = hs->dim;
    if (!hs->mem) {
        if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
            return -ENOMEM;
        hs->mem = calloc((size_t)p->n_models * (size_t)n, sizeof(float));
        if (!hs->mem)
            return -ENOMEM;
    }
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
        return -ENOMEM;
    double *work = malloc((size_t)(n * n) * sizeof(double));
    if (!work)
        return -ENOMEM;
    float *u = (float *)hs->mem + (uint64_t)(i - 1) * n;
    int rc = ms_hessian_saliency_u(H, n, work, u);
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

int ms_hessian_state_add(ms_merge_state *st, const ms_tensor_params *p, unsigned i, const float *H)
{
    ms_hessian_state *hs = st->hessian;
    MS_ASSERT(hs && i >= 1 && i <= p->n_models && hs->dim == p->cols);
    if (p->method == MS_METHOD_REGMEAN)
        return add_regmean(hs, p, i, H);
    if (!ms_hessian_model_uses_u(st, p, i))
        return 0;
    return add_saliency(hs, p, i, H);
}

int ms_hessian_state_finish(ms_merge_state *st, const ms_tensor_params *p)
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
        uint64_t n = hs->dim;
        double *s = hs->chol;
        for (uint64_t e = 0; e < n * n; e++) {
            double v = (double)hs->g[1][e];
            for (unsigned i = 2; i <= p->n_models; i++)
                v = v + (double)hs->g[i][e];
            s[e] = v;
        }
        rc = ms_hessian_cholesky(s, n);
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
