/* Pass plans, state and host steps of the interpolation and model-soup
 * methods (see merge_passes_interp.h for the semantics). */
#include "pipeline/merge_passes_interp.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "io/ms_error.h"
#include "io/ms_fault.h"
#include "pipeline/merge_math_interp.h"

bool ms_merge_interp_method(ms_method m)
{
    switch (m) {
    case MS_METHOD_SLERP:
    case MS_METHOD_NUSLERP:
    case MS_METHOD_MULTISLERP:
    case MS_METHOD_KARCHER:
    case MS_METHOD_MODEL_STOCK:
    case MS_METHOD_NEARSWAP:
    case MS_METHOD_SCE:
    case MS_METHOD_RAM:
    case MS_METHOD_RAMPLUS_TL:
    case MS_METHOD_ARCEE_FUSION:
        return true;
    default:
        return false;
    }
}

/* ================================================================ plan */

typedef enum nuslerp_mode { NUSLERP_WHOLE, NUSLERP_ROWS, NUSLERP_COLS } nuslerp_mode;

static nuslerp_mode plan_nuslerp_mode(const ms_tensor_params *p)
{
    if (p->nuslerp_flatten)
        return NUSLERP_WHOLE;
    if (p->nuslerp_row_wise) /* mergekit's dim 0: columns; a 1-D tensor is one vector */
        return p->rows > 1 ? NUSLERP_COLS : NUSLERP_WHOLE;
    return NUSLERP_ROWS;
}

/* Inputs of karcher: the base (when named) and the models. */
static unsigned plan_karcher_inputs(const ms_tensor_params *p)
{
    return p->n_models + (p->has_base ? 1u : 0u);
}

static unsigned plan_passes(const ms_tensor_params *p, ms_merge_pass_kind pass[MS_MERGE_MAX_PASSES])
{
    unsigned n = 0;
    switch (p->method) {
    case MS_METHOD_SLERP:
        if (p->t != 0.0 && p->t != 1.0)
            pass[n++] = MS_MERGE_PASS_GRAM;
        break;
    case MS_METHOD_NUSLERP:
        pass[n++] = plan_nuslerp_mode(p) == NUSLERP_WHOLE ? MS_MERGE_PASS_GRAM : MS_MERGE_PASS_LINE_GRAM;
        break;
    case MS_METHOD_MULTISLERP:
        if (p->n_models > 1)
            pass[n++] = MS_MERGE_PASS_GRAM;
        break;
    case MS_METHOD_KARCHER:
        if (plan_karcher_inputs(p) > 1)
            pass[n++] = MS_MERGE_PASS_GRAM;
        break;
    case MS_METHOD_MODEL_STOCK:
        if (!p->filter_wise)
            pass[n++] = MS_MERGE_PASS_GRAM;
        break;
    case MS_METHOD_RAMPLUS_TL:
        pass[n++] = MS_MERGE_PASS_COUNT;
        break;
    case MS_METHOD_SCE:
        if (p->select_topk < 1.0) {
            pass[n++] = MS_MERGE_PASS_KEY_HI;
            pass[n++] = MS_MERGE_PASS_KEY_LO;
        }
        pass[n++] = MS_MERGE_PASS_SUMSQ;
        break;
    case MS_METHOD_ARCEE_FUSION:
        pass[n++] = MS_MERGE_PASS_KEY_HI;
        pass[n++] = MS_MERGE_PASS_KEY_LO;
        break;
    default: /* nearswap, ram */
        break;
    }
    pass[n++] = MS_MERGE_PASS_APPLY;
    return n;
}

void ms_merge_interp_plan(const ms_tensor_params *p, ms_merge_state *st)
{
    MS_ASSERT(ms_merge_interp_method(p->method));
    st->n_passes = plan_passes(p, st->pass);
}

/* Array sizes of the state, in elements. */
typedef struct interp_sizes {
    uint64_t line_sum, line_open, line_coef; /* doubles, doubles, floats */
    uint64_t hist;                           /* uint64_t: hist_hi and every rank's hist_lo */
    uint64_t row_kl;                         /* doubles */
    unsigned n_ranks;
} interp_sizes;

static void plan_sizes(const ms_tensor_params *p, interp_sizes *z)
{
    memset(z, 0, sizeof *z);
    if (p->method == MS_METHOD_NUSLERP) {
        nuslerp_mode mode = plan_nuslerp_mode(p);
        uint64_t lines = mode == NUSLERP_COLS ? p->cols : mode == NUSLERP_ROWS ? p->rows : 0;
        z->line_sum = 3 * lines;
        z->line_open = mode == NUSLERP_COLS ? 3 * lines : 0;
        z->line_coef = 2 * lines;
    }
    if (p->method == MS_METHOD_SCE && p->select_topk < 1.0)
        z->n_ranks = 1;
    if (p->method == MS_METHOD_ARCEE_FUSION) {
        z->n_ranks = 3;
        z->row_kl = p->rows;
    }
    if (z->n_ranks)
        z->hist = MS_INTERP_HI_BINS + (uint64_t)z->n_ranks * MS_MERGE_LO_BINS;
}

static uint64_t sizes_bytes(const interp_sizes *z)
{
    return (z->line_sum + z->line_open + z->row_kl) * sizeof(double) + z->line_coef * sizeof(float) +
           z->hist * sizeof(uint64_t);
}

uint64_t ms_merge_interp_state_bytes(const ms_tensor_params *p)
{
    interp_sizes z;
    plan_sizes(p, &z);
    return sizeof(ms_interp_state) + sizes_bytes(&z);
}

/* ================================================================ open */

static void configure(const ms_tensor_params *p, ms_interp_state *is)
{
    unsigned n = p->n_models;
    is->apply = MS_INTERP_APPLY_MIX;
    for (unsigned k = 0; k < MS_INTERP_MAX_VECS; k++)
        is->use[k] = true;
    for (unsigned i = 1; i <= n; i++) {
        is->lambda[i] = 1.0f;
        is->eps32[i] = (float)p->epsilon[i];
    }
    switch (p->method) {
    case MS_METHOD_SLERP:
        is->n_vecs = 2;
        is->vec_slot[0] = 0;
        is->vec_slot[1] = 1;
        if (p->t == 0.0 || p->t == 1.0) {
            is->apply = MS_INTERP_APPLY_COPY;
            is->copy_slot = p->t == 0.0 ? 0 : 1;
        }
        break;
    case MS_METHOD_NUSLERP:
        is->n_vecs = 2;
        is->vec_slot[0] = 1;
        is->vec_slot[1] = 2;
        is->vec_delta = p->has_base;
        is->add_base = p->has_base;
        if (plan_nuslerp_mode(p) != NUSLERP_WHOLE) {
            is->apply = MS_INTERP_APPLY_LINE_MIX;
            is->line_cols = plan_nuslerp_mode(p) == NUSLERP_COLS;
            is->n_lines = is->line_cols ? p->cols : p->rows;
        }
        break;
    case MS_METHOD_MULTISLERP:
        is->n_vecs = n;
        for (unsigned k = 0; k < n; k++)
            is->vec_slot[k] = k + 1;
        is->vec_delta = p->has_base;
        is->add_base = p->has_base;
        if (n == 1) {
            is->apply = MS_INTERP_APPLY_COPY;
            is->copy_slot = 1;
        }
        break;
    case MS_METHOD_KARCHER: {
        unsigned k = 0;
        if (p->has_base)
            is->vec_slot[k++] = 0;
        for (unsigned i = 1; i <= n; i++)
            is->vec_slot[k++] = i;
        is->n_vecs = k;
        if (k == 1) {
            is->apply = MS_INTERP_APPLY_COPY;
            is->copy_slot = is->vec_slot[0];
        }
        break;
    }
    case MS_METHOD_MODEL_STOCK:
        is->n_vecs = n;
        for (unsigned k = 0; k < n; k++)
            is->vec_slot[k] = k + 1;
        is->vec_delta = true;
        is->apply = p->filter_wise ? MS_INTERP_APPLY_STOCK_ROWS : MS_INTERP_APPLY_STOCK;
        break;
    case MS_METHOD_NEARSWAP:
        is->apply = MS_INTERP_APPLY_NEARSWAP;
        break;
    case MS_METHOD_RAM:
    case MS_METHOD_RAMPLUS_TL:
        is->apply = MS_INTERP_APPLY_RAM;
        break;
    case MS_METHOD_SCE:
        is->apply = MS_INTERP_APPLY_SCE;
        is->n_sums = n;
        is->sel = MS_INTERP_SEL_ALL;
        for (unsigned i = 1; i <= n; i++)
            is->w[i] = 1.0f / (float)n; /* replaced after SUMSQ */
        if (p->select_topk < 1.0) {
            is->n_ranks = 1;
            is->sel = MS_INTERP_SEL_TOP; /* decided after KEY_HI */
        }
        break;
    case MS_METHOD_ARCEE_FUSION: {
        is->apply = MS_INTERP_APPLY_FUSION;
        is->n_ranks = 3;
        uint64_t last = p->numel - 1;
        /* floor(q (numel - 1)) for q = 1/4, 1/2, 3/4, exactly (numel - 1 < 2^62) */
        is->rank[0].rank = last / 4;
        is->rank[1].rank = last / 2;
        is->rank[2].rank = (last / 4) * 3 + ((last % 4) * 3) / 4;
        break;
    }
    default:
        MS_ASSERT(!"not an interpolation method");
    }
    if (p->method != MS_METHOD_SCE)
        is->n_sums = is->n_vecs * (is->n_vecs + 1) / 2;
}

int ms_merge_interp_state_open(const ms_tensor_params *p, ms_merge_state *st)
{
    st->interp = NULL;
    MS_ASSERT(p->n_models >= 1 && p->n_models <= MS_MAX_MODELS);
    if (ms_fault_hit(MS_FAULT_HOST_ALLOC))
        return -ENOMEM;
    ms_interp_state *is = calloc(1, sizeof *is);
    if (!is)
        return -ENOMEM;
    interp_sizes z;
    plan_sizes(p, &z);
    uint64_t bytes = sizes_bytes(&z);
    if (bytes > 0) {
        if (bytes > SIZE_MAX || ms_fault_hit(MS_FAULT_HOST_ALLOC))
            goto fail;
        is->mem = calloc(1, (size_t)bytes);
        if (!is->mem)
            goto fail;
        unsigned char *m = is->mem; /* doubles first, then words, then floats: all aligned */
        is->line_sum = z.line_sum ? (double *)m : NULL;
        m += z.line_sum * sizeof(double);
        is->line_open = z.line_open ? (double *)m : NULL;
        m += z.line_open * sizeof(double);
        is->row_kl = z.row_kl ? (double *)m : NULL;
        m += z.row_kl * sizeof(double);
        if (z.hist) {
            is->hist_hi = (uint64_t *)m;
            for (unsigned r = 0; r < z.n_ranks; r++)
                is->rank[r].hist_lo = is->hist_hi + MS_INTERP_HI_BINS + (uint64_t)r * MS_MERGE_LO_BINS;
        }
        m += z.hist * sizeof(uint64_t);
        is->line_coef = z.line_coef ? (float *)m : NULL;
    }
    configure(p, is);
    st->interp = is;
    return 0;
fail:
    ms_merge_interp_state_close(is);
    return -ENOMEM;
}

void ms_merge_interp_state_close(ms_interp_state *is)
{
    if (!is)
        return;
    free(is->mem);
    free(is);
}

/* ========================================================= coefficients */

static double g_at(const ms_interp_state *is, unsigned a, unsigned b)
{
    return is->sum[ms_interp_pair(a, b, is->n_vecs)];
}

/* slerp's s0, s1 from the three sums. */
static void slerp_coefs(double s00, double s01, double s11, double t, double *s0, double *s1)
{
    double n0 = sqrt(s00), n1 = sqrt(s11);
    if (!(n0 > 1e-8))
        n0 = 1.0;
    if (!(n1 > 1e-8))
        n1 = 1.0;
    double dot = s01 / (n0 * n1);
    if (fabs(dot) > 0.9995) {
        *s0 = 1.0 - t;
        *s1 = t;
        return;
    }
    double theta = acos(dot), st = sin(theta);
    *s0 = sin((1.0 - t) * theta) / st;
    *s1 = sin(t * theta) / st;
}

/* nuslerp's t from the two weights (mergekit: 0.5 when they cancel). */
static double nuslerp_t(const ms_tensor_params *p)
{
    double w1 = (double)p->weight[1], w2 = (double)p->weight[2];
    double sum = w1 + w2;
    return fabs(sum) < 1e-6 ? 0.5 : w2 / sum;
}

/* nuslerp's s0, s1 for one vector pair: norms clamped below at 1e-7 (NaN
 * kept), cos clamped to [-1, 1], lerp where |sin(theta)| < 1e-8. */
static void nuslerp_coefs(double s00, double s01, double s11, double t, float *c0, float *c1)
{
    double n0 = sqrt(s00), n1 = sqrt(s11);
    if (n0 < 1e-7)
        n0 = 1e-7;
    if (n1 < 1e-7)
        n1 = 1e-7;
    double c = s01 / (n0 * n1);
    if (c < -1.0)
        c = -1.0;
    if (c > 1.0)
        c = 1.0;
    double theta = acos(c), st = sin(theta);
    double s0, s1;
    if (fabs(st) < 1e-8) {
        s0 = 1.0 - t;
        s1 = t;
    } else {
        s0 = sin((1.0 - t) * theta) / st;
        s1 = sin(t * theta) / st;
    }
    *c0 = (float)s0;
    *c1 = (float)s1;
}

static void finish_multislerp(ms_interp_state *is, const ms_tensor_params *p)
{
    unsigned n = is->n_vecs;
    double w[MS_INTERP_MAX_VECS], nrm[MS_INTERP_MAX_VECS], den[MS_INTERP_MAX_VECS];
    double wsum = 0.0;
    for (unsigned i = 0; i < n; i++) {
        w[i] = (double)p->weight[i + 1];
        wsum = wsum + w[i];
    }
    for (unsigned i = 0; i < n; i++) {
        if (p->normalize_weights)
            w[i] = w[i] / wsum;
        nrm[i] = sqrt(g_at(is, i, i));
        den[i] = nrm[i] + p->eps;
    }
    double msq = 0.0; /* |sum_i w_i v_i / den_i|^2 */
    for (unsigned i = 0; i < n; i++)
        for (unsigned j = 0; j < n; j++)
            msq = msq + ((w[i] * w[j]) * g_at(is, i, j)) / (den[i] * den[j]);
    if (msq < 0.0)
        msq = 0.0;
    double mnorm = sqrt(msq);
    if (mnorm < p->eps) { /* the weighted sum */
        for (unsigned i = 0; i < n; i++)
            is->coef[i] = (float)w[i];
        return;
    }
    double avg = 0.0;
    for (unsigned i = 0; i < n; i++)
        avg = avg + w[i] * nrm[i];
    for (unsigned i = 0; i < n; i++)
        is->coef[i] = (float)(((w[i] / den[i]) / mnorm) * avg);
}

/* x^T U x over the valid indices. */
static double karcher_quad(const double U[MS_INTERP_MAX_VECS][MS_INTERP_MAX_VECS], const double *x,
                           const unsigned *valid, unsigned nv)
{
    double s = 0.0;
    for (unsigned a = 0; a < nv; a++)
        for (unsigned b = 0; b < nv; b++)
            s = s + (x[valid[a]] * x[valid[b]]) * U[valid[a]][valid[b]];
    return s < 0.0 ? 0.0 : s;
}

static void finish_karcher(ms_interp_state *is, const ms_tensor_params *p)
{
    unsigned K = is->n_vecs, valid[MS_INTERP_MAX_VECS], nv = 0;
    double tol = p->tol, alpha = 1.0 / (double)K;
    double nrm[MS_INTERP_MAX_VECS], beta[MS_INTERP_MAX_VECS] = {0};
    double U[MS_INTERP_MAX_VECS][MS_INTERP_MAX_VECS];
    double a[MS_INTERP_MAX_VECS] = {0}, tau[MS_INTERP_MAX_VECS];
    for (unsigned k = 0; k < K; k++) {
        nrm[k] = sqrt(g_at(is, k, k));
        if (nrm[k] > tol)
            valid[nv++] = k;
    }
    if (nv == 0) {
        is->apply = MS_INTERP_APPLY_ZERO;
        return;
    }
    double asum = 0.0;
    for (unsigned v = 0; v < nv; v++)
        asum = asum + alpha;
    for (unsigned v = 0; v < nv; v++)
        beta[valid[v]] = alpha / asum;
    for (unsigned x = 0; x < nv; x++)
        for (unsigned y = 0; y < nv; y++)
            U[valid[x]][valid[y]] = g_at(is, valid[x], valid[y]) / (nrm[valid[x]] * nrm[valid[y]]);
    for (unsigned v = 0; v < nv; v++)
        a[valid[v]] = beta[valid[v]];
    double mn = sqrt(karcher_quad(U, a, valid, nv));
    if (mn < tol) {
        memset(a, 0, sizeof a);
        a[valid[0]] = 1.0;
    } else {
        for (unsigned v = 0; v < nv; v++)
            a[valid[v]] = a[valid[v]] / mn;
    }
    for (unsigned iter = 0; iter < p->max_iter; iter++) {
        memset(tau, 0, sizeof tau);
        for (unsigned v = 0; v < nv; v++) {
            unsigned i = valid[v];
            double dot = 0.0;
            for (unsigned x = 0; x < nv; x++)
                dot = dot + a[valid[x]] * U[valid[x]][i];
            if (dot < -1.0)
                dot = -1.0;
            if (dot > 1.0)
                dot = 1.0;
            double theta = acos(dot);
            if (theta < tol)
                continue;
            double f = beta[i] * (theta / sin(theta));
            for (unsigned x = 0; x < nv; x++) {
                unsigned j = valid[x];
                tau[j] = tau[j] + f * ((j == i ? 1.0 : 0.0) - dot * a[j]);
            }
        }
        double tn = sqrt(karcher_quad(U, tau, valid, nv));
        if (tn < tol)
            break;
        double c = cos(tn), s = sin(tn);
        for (unsigned v = 0; v < nv; v++)
            a[valid[v]] = c * a[valid[v]] + s * (tau[valid[v]] / tn);
        double un = sqrt(karcher_quad(U, a, valid, nv));
        if (un > tol)
            for (unsigned v = 0; v < nv; v++)
                a[valid[v]] = a[valid[v]] / un;
    }
    double scale = 0.0;
    for (unsigned k = 0; k < K; k++)
        scale = scale + alpha * nrm[k];
    for (unsigned k = 0; k < K; k++) {
        is->use[k] = false;
        is->coef[k] = 0.0f;
    }
    for (unsigned v = 0; v < nv; v++) {
        unsigned k = valid[v];
        is->use[k] = true;
        is->coef[k] = (float)((scale * a[k]) / nrm[k]);
    }
}

static void finish_gram(ms_interp_state *is, const ms_tensor_params *p)
{
    for (unsigned s = 0; s < is->n_sums; s++) { /* the tensor may end inside a block */
        is->sum[s] += is->open[s];
        is->open[s] = 0.0;
    }
    switch (p->method) {
    case MS_METHOD_SLERP: {
        double s0, s1;
        slerp_coefs(g_at(is, 0, 0), g_at(is, 0, 1), g_at(is, 1, 1), p->t, &s0, &s1);
        is->coef[0] = (float)s0;
        is->coef[1] = (float)s1;
        break;
    }
    case MS_METHOD_NUSLERP:
        nuslerp_coefs(g_at(is, 0, 0), g_at(is, 0, 1), g_at(is, 1, 1), nuslerp_t(p), &is->coef[0], &is->coef[1]);
        break;
    case MS_METHOD_MULTISLERP:
        finish_multislerp(is, p);
        break;
    case MS_METHOD_KARCHER:
        finish_karcher(is, p);
        break;
    case MS_METHOD_MODEL_STOCK: {
        double t = ms_interp_model_stock_t(is->sum, is->n_vecs);
        is->stock_a = (float)t;
        is->stock_b = (float)(1.0 - t);
        break;
    }
    default:
        MS_ASSERT(!"GRAM for a method without one");
    }
}

static void finish_line_gram(ms_interp_state *is, const ms_tensor_params *p)
{
    double t = nuslerp_t(p);
    for (uint64_t l = 0; l < is->n_lines; l++) {
        double *s = is->line_sum + l * 3;
        if (is->line_cols) /* the open block of rows */
            for (unsigned q = 0; q < 3; q++) {
                s[q] += is->line_open[l * 3 + q];
                is->line_open[l * 3 + q] = 0.0;
            }
        nuslerp_coefs(s[0], s[1], s[2], t, &is->line_coef[l * 2], &is->line_coef[l * 2 + 1]);
    }
}

/* ============================================================ selection */

static void finish_key_hi(ms_interp_state *is, const ms_tensor_params *p)
{
    uint64_t total = 0;
    for (uint32_t b = 0; b < MS_INTERP_HI_BINS; b++)
        total += is->hist_hi[b];
    MS_ASSERT(total == p->numel); /* the pass saw every element once */
    if (p->method == MS_METHOD_SCE) {
        MS_ASSERT(is->n_zero <= p->numel);
        /* mergekit's int(count_nonzero(var) * select_topk): an int64 tensor times a Python float
         * is a float32 tensor, so the product is rounded to fp32 before the truncation (with a
         * gradient, 0.49999999999999994 becomes 0.5 there) */
        float kf = (float)(p->numel - is->n_zero) * (float)p->select_topk;
        is->k = kf > 0.0f ? (kf >= (float)p->numel ? p->numel : (uint64_t)kf) : 0;
        if (is->k == 0 || is->k == p->numel) {
            is->sel = is->k == 0 ? MS_INTERP_SEL_NONE : MS_INTERP_SEL_ALL;
            is->n_ranks = 0;
            return;
        }
        is->sel = MS_INTERP_SEL_TOP;
        is->rank[0].rank = p->numel - is->k; /* the k-th largest key's ascending position */
    }
    for (unsigned r = 0; r < is->n_ranks; r++) {
        ms_interp_rank *rk = &is->rank[r];
        uint64_t below = 0;
        bool found = false;
        for (uint32_t b = 0; b < MS_INTERP_HI_BINS && !found; b++) {
            if (rk->rank < below + is->hist_hi[b]) {
                rk->bin = b;
                rk->n_below_bin = below;
                found = true;
            } else {
                below += is->hist_hi[b];
            }
        }
        MS_ASSERT(found);
        rk->owns_lo = true;
        for (unsigned q = 0; q < r; q++) {
            if (is->rank[q].owns_lo && is->rank[q].bin == rk->bin) {
                rk->owns_lo = false;
                rk->hist_lo = is->rank[q].hist_lo;
                break;
            }
        }
    }
}

static void finish_key_lo(ms_interp_state *is, const ms_tensor_params *p)
{
    for (unsigned r = 0; r < is->n_ranks; r++) {
        ms_interp_rank *rk = &is->rank[r];
        uint64_t below = rk->n_below_bin, total = 0;
        for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
            total += rk->hist_lo[k];
        MS_ASSERT(total == is->hist_hi[rk->bin]);
        bool found = false;
        for (uint32_t k = 0; k < MS_MERGE_LO_BINS && !found; k++) {
            if (rk->rank < below + rk->hist_lo[k]) {
                rk->key = (rk->bin << 16) | k;
                rk->n_less = below;
                rk->n_eq = rk->hist_lo[k];
                found = true;
            } else {
                below += rk->hist_lo[k];
            }
        }
        MS_ASSERT(found);
    }
    if (p->method == MS_METHOD_SCE) {
        if (is->sel != MS_INTERP_SEL_TOP)
            return;
        const ms_interp_rank *rk = &is->rank[0];
        uint64_t n_greater = p->numel - rk->n_less - rk->n_eq;
        MS_ASSERT(is->k > n_greater && is->k - n_greater <= rk->n_eq);
        is->sel_key = rk->key;
        is->sel_take = is->k - n_greater;
        is->sel_split = is->sel_take < rk->n_eq;
    } else {
        double q1 = (double)ms_interp_order_value(is->rank[0].key);
        double med = (double)ms_interp_order_value(is->rank[1].key);
        double q3 = (double)ms_interp_order_value(is->rank[2].key);
        is->threshold = med + 1.5 * (q3 - q1);
    }
}

/* ============================================================== finish */

static void finish_sumsq(ms_interp_state *is, const ms_tensor_params *p)
{
    unsigned n = p->n_models;
    double mean[MS_MAX_MODELS], total = 0.0;
    for (unsigned i = 0; i < n; i++) {
        is->sum[i] += is->open[i]; /* the tensor may end inside a block */
        is->open[i] = 0.0;
        mean[i] = is->sum[i] / (double)p->numel;
        total = total + mean[i];
    }
    for (unsigned i = 0; i < n; i++)
        is->w[i + 1] = total == 0.0 ? (float)(1.0 / (double)n) : (float)(mean[i] / total);
}

static void finish_count(ms_interp_state *is, const ms_tensor_params *p)
{
    for (unsigned i = 1; i <= p->n_models; i++) {
        double unique = (double)is->unique[i];
        if (unique < p->epsilon[i])
            unique = p->epsilon[i];
        double rho = (double)is->shared[i] / unique;
        if (rho < 0.0)
            rho = 0.0;
        if (rho > p->ram_alpha)
            rho = p->ram_alpha;
        is->lambda[i] = (float)(1.0 + p->ram_r * rho);
    }
}

void ms_merge_interp_finish(ms_merge_state *st, const ms_tensor_params *p, unsigned pass)
{
    ms_interp_state *is = st->interp;
    MS_ASSERT(is && pass + 1 < st->n_passes);
    switch (st->pass[pass]) {
    case MS_MERGE_PASS_GRAM:
        finish_gram(is, p);
        break;
    case MS_MERGE_PASS_LINE_GRAM:
        finish_line_gram(is, p);
        break;
    case MS_MERGE_PASS_KEY_HI:
        finish_key_hi(is, p);
        break;
    case MS_MERGE_PASS_KEY_LO:
        finish_key_lo(is, p);
        break;
    case MS_MERGE_PASS_SUMSQ:
        finish_sumsq(is, p);
        break;
    case MS_MERGE_PASS_COUNT:
        finish_count(is, p);
        break;
    default:
        MS_ASSERT(!"not an interpolation statistics pass");
    }
    is->eq_seen = 0;
}
