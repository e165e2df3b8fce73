/* A slow, obviously correct re-implementation of the interpolation and
 * model-soup methods (slerp, nuslerp, multislerp, karcher, model_stock,
 * nearswap, sce, ram, ramplus_tl, arcee_fusion) for the tests: whole
 * tensors in memory, one element at a time, every fp64 reduction written
 * out as the blocked sum of an array of terms, selections and quantiles by
 * sorting. It follows the semantics written in
 * pipeline/merge_passes_interp.h and shares no code with the kernels or
 * the host steps, except the two functions that ARE the specification of
 * element-level exp and log (ms_interp_exp, ms_interp_log, checked against
 * libm in test_cpu_merge_interp). Dtype conversion is merge_reference.h's.
 *
 * Also here: refi_vector_* are mergekit's algorithms done on whole vectors
 * in fp64 (no Gram-matrix shortcuts), for approximate agreement checks. */
#ifndef MS_MERGE_REFERENCE_INTERP_H
#define MS_MERGE_REFERENCE_INTERP_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "merge_reference.h"
#include "pipeline/merge_math_interp.h"

/* ========================================================== helpers */

/* DESIGN.md's fixed order over t[0..n): 65,536-term blocks summed from 0.0,
 * then the block sums from 0.0. */
static inline double refi_blocked(const double *t, uint64_t n)
{
    double total = 0.0;
    for (uint64_t b0 = 0; b0 < n; b0 += 65536) {
        double s = 0.0;
        for (uint64_t e = b0; e < n && e < b0 + 65536; e++)
            s += t[e];
        total += s;
    }
    return total;
}

static inline float refi_canon(float v)
{
    return isnan(v) ? ref_float(0x7fc00000u) : v;
}

/* the inputs widened: X[slot][e] (NULL where the slot is absent) */
typedef struct refi_in {
    float *X[MS_MAX_MODELS + 1];
    uint64_t n;
} refi_in;

static inline void refi_load(const ms_tensor_params *p, const void *const *in, refi_in *v)
{
    memset(v, 0, sizeof *v);
    v->n = p->numel;
    for (unsigned s = 0; s <= p->n_models; s++) {
        if (!in[s])
            continue;
        v->X[s] = malloc(p->numel * sizeof(float) + 4);
        for (uint64_t e = 0; e < p->numel; e++)
            v->X[s][e] = ref_load(in[s], p->in_dtype[s], e);
    }
}

static inline void refi_free(refi_in *v)
{
    for (unsigned s = 0; s <= MS_MAX_MODELS; s++)
        free(v->X[s]);
}

/* delta of slot s at e, NaN canonical */
static inline float refi_delta(const refi_in *v, unsigned s, uint64_t e)
{
    return refi_canon(v->X[s][e] - v->X[0][e]);
}

/* sum over [e0, e0 + n) step `stride` of a[e] * b[e] in fp64, blocked over the
 * n terms (a row: stride 1; a column: stride cols) */
static inline double refi_dot(const float *a, const float *b, uint64_t e0, uint64_t n, uint64_t stride)
{
    double *t = malloc(n * sizeof(double) + 8);
    for (uint64_t k = 0; k < n; k++)
        t[k] = (double)a[e0 + k * stride] * (double)b[e0 + k * stride];
    double s = refi_blocked(t, n);
    free(t);
    return s;
}

/* the vectors of a Gram-based method as whole arrays (owned) */
static inline float *refi_vec(const refi_in *v, unsigned slot, bool delta)
{
    float *out = malloc(v->n * sizeof(float) + 4);
    for (uint64_t e = 0; e < v->n; e++)
        out[e] = delta ? refi_delta(v, slot, e) : v->X[slot][e];
    return out;
}

/* =========================================================== slerp */

static inline void refi_slerp(const ms_tensor_params *p, const refi_in *v, float *out)
{
    uint64_t n = p->numel;
    if (p->t == 0.0 || p->t == 1.0) {
        memcpy(out, v->X[p->t == 0.0 ? 0 : 1], n * sizeof(float));
        return;
    }
    const float *a = v->X[0], *b = v->X[1];
    double s00 = refi_dot(a, a, 0, n, 1), s01 = refi_dot(a, b, 0, n, 1), s11 = refi_dot(b, b, 0, n, 1);
    double n0 = sqrt(s00) > 1e-8 ? sqrt(s00) : 1.0;
    double n1 = sqrt(s11) > 1e-8 ? sqrt(s11) : 1.0;
    double dot = s01 / (n0 * n1), t = p->t, c0, c1;
    if (fabs(dot) > 0.9995) {
        c0 = 1.0 - t;
        c1 = t;
    } else {
        double th = acos(dot);
        c0 = sin((1.0 - t) * th) / sin(th);
        c1 = sin(t * th) / sin(th);
    }
    float f0 = (float)c0, f1 = (float)c1;
    for (uint64_t e = 0; e < n; e++)
        out[e] = f0 * a[e] + f1 * b[e];
}

/* ========================================================== nuslerp */

static inline void refi_nuslerp_coefs(double s00, double s01, double s11, double t, float *f0, float *f1)
{
    double n0 = sqrt(s00), n1 = sqrt(s11);
    n0 = n0 < 1e-7 ? 1e-7 : n0;
    n1 = n1 < 1e-7 ? 1e-7 : n1;
    double c = s01 / (n0 * n1);
    c = c < -1.0 ? -1.0 : c > 1.0 ? 1.0 : c;
    double th = acos(c);
    if (fabs(sin(th)) < 1e-8) {
        *f0 = (float)(1.0 - t);
        *f1 = (float)t;
    } else {
        *f0 = (float)(sin((1.0 - t) * th) / sin(th));
        *f1 = (float)(sin(t * th) / sin(th));
    }
}

static inline void refi_nuslerp(const ms_tensor_params *p, const refi_in *v, float *out)
{
    uint64_t n = p->numel, rows = p->rows, cols = p->cols;
    double w1 = p->weight[1], w2 = p->weight[2];
    double t = fabs(w1 + w2) < 1e-6 ? 0.5 : w2 / (w1 + w2);
    float *a = refi_vec(v, 1, p->has_base), *b = refi_vec(v, 2, p->has_base);
    int mode = p->nuslerp_flatten ? 0 : !p->nuslerp_row_wise ? 1 : rows > 1 ? 2 : 0;
    uint64_t lines = mode == 0 ? 1 : mode == 1 ? rows : cols;
    float *f0 = malloc(lines * sizeof(float)), *f1 = malloc(lines * sizeof(float));
    for (uint64_t l = 0; l < lines; l++) {
        uint64_t e0 = mode == 0 ? 0 : mode == 1 ? l * cols : l;
        uint64_t cnt = mode == 0 ? n : mode == 1 ? cols : rows;
        uint64_t stride = mode == 2 ? cols : 1;
        refi_nuslerp_coefs(refi_dot(a, a, e0, cnt, stride), refi_dot(a, b, e0, cnt, stride),
                           refi_dot(b, b, e0, cnt, stride), t, &f0[l], &f1[l]);
    }
    for (uint64_t e = 0; e < n; e++) {
        uint64_t l = mode == 0 ? 0 : mode == 1 ? e / cols : e % cols;
        float r = f0[l] * a[e] + f1[l] * b[e];
        out[e] = p->has_base ? v->X[0][e] + r : r;
    }
    free(f0);
    free(f1);
    free(a);
    free(b);
}

/* ======================================================= multislerp */

static inline void refi_multislerp(const ms_tensor_params *p, const refi_in *v, float *out)
{
    uint64_t N = p->numel;
    unsigned n = p->n_models;
    if (n == 1) {
        memcpy(out, v->X[1], N * sizeof(float));
        return;
    }
    float *V[MS_MAX_MODELS];
    for (unsigned i = 0; i < n; i++)
        V[i] = refi_vec(v, i + 1, p->has_base);
    double G[MS_MAX_MODELS][MS_MAX_MODELS], w[MS_MAX_MODELS], nr[MS_MAX_MODELS], dn[MS_MAX_MODELS];
    for (unsigned i = 0; i < n; i++)
        for (unsigned j = i; j < n; j++)
            G[i][j] = G[j][i] = refi_dot(V[i], V[j], 0, N, 1);
    double ws = 0.0;
    for (unsigned i = 0; i < n; i++)
        ws += (double)p->weight[i + 1];
    for (unsigned i = 0; i < n; i++) {
        w[i] = p->normalize_weights ? (double)p->weight[i + 1] / ws : (double)p->weight[i + 1];
        nr[i] = sqrt(G[i][i]);
        dn[i] = nr[i] + p->eps;
    }
    double m2 = 0.0;
    for (unsigned i = 0; i < n; i++)
        for (unsigned j = 0; j < n; j++)
            m2 += ((w[i] * w[j]) * G[i][j]) / (dn[i] * dn[j]);
    double mn = sqrt(m2 < 0.0 ? 0.0 : m2);
    float c[MS_MAX_MODELS];
    if (mn < p->eps) {
        for (unsigned i = 0; i < n; i++)
            c[i] = (float)w[i];
    } else {
        double avg = 0.0;
        for (unsigned i = 0; i < n; i++)
            avg += w[i] * nr[i];
        for (unsigned i = 0; i < n; i++)
            c[i] = (float)(((w[i] / dn[i]) / mn) * avg);
    }
    for (uint64_t e = 0; e < N; e++) {
        float r = c[0] * V[0][e];
        for (unsigned i = 1; i < n; i++)
            r = r + c[i] * V[i][e];
        out[e] = p->has_base ? v->X[0][e] + r : r;
    }
    for (unsigned i = 0; i < n; i++)
        free(V[i]);
}

/* ========================================================== karcher */

static inline void refi_karcher(const ms_tensor_params *p, const refi_in *v, float *out)
{
    uint64_t N = p->numel;
    unsigned K = 0, slot[MS_MAX_MODELS + 1];
    if (p->has_base)
        slot[K++] = 0;
    for (unsigned i = 1; i <= p->n_models; i++)
        slot[K++] = i;
    if (K == 1) {
        memcpy(out, v->X[slot[0]], N * sizeof(float));
        return;
    }
    double G[MS_MAX_MODELS + 1][MS_MAX_MODELS + 1], U[MS_MAX_MODELS + 1][MS_MAX_MODELS + 1];
    double nr[MS_MAX_MODELS + 1], al = 1.0 / K, be[MS_MAX_MODELS + 1] = {0}, a[MS_MAX_MODELS + 1] = {0};
    bool ok[MS_MAX_MODELS + 1];
    unsigned nv = 0, first = 0;
    for (unsigned j = 0; j < K; j++)
        for (unsigned k = j; k < K; k++)
            G[j][k] = G[k][j] = refi_dot(v->X[slot[j]], v->X[slot[k]], 0, N, 1);
    for (unsigned k = 0; k < K; k++) {
        nr[k] = sqrt(G[k][k]);
        ok[k] = nr[k] > p->tol;
        if (ok[k] && nv++ == 0)
            first = k;
    }
    if (nv == 0) {
        for (uint64_t e = 0; e < N; e++)
            out[e] = 0.0f;
        return;
    }
    double asum = 0.0;
    for (unsigned k = 0; k < K; k++)
        if (ok[k])
            asum += al;
    for (unsigned j = 0; j < K; j++)
        for (unsigned k = 0; k < K; k++)
            U[j][k] = ok[j] && ok[k] ? G[j][k] / (nr[j] * nr[k]) : 0.0;
#define REFI_QUAD(x, res)                                                                                  \
    do {                                                                                                   \
        double q_ = 0.0;                                                                                   \
        for (unsigned j_ = 0; j_ < K; j_++)                                                                \
            for (unsigned k_ = 0; k_ < K; k_++)                                                            \
                if (ok[j_] && ok[k_])                                                                      \
                    q_ += ((x)[j_] * (x)[k_]) * U[j_][k_];                                                 \
        (res) = sqrt(q_ < 0.0 ? 0.0 : q_);                                                                 \
    } while (0)
    for (unsigned k = 0; k < K; k++)
        if (ok[k])
            a[k] = be[k] = al / asum;
    double mn;
    REFI_QUAD(a, mn);
    for (unsigned k = 0; k < K; k++)
        a[k] = mn < p->tol ? (k == first ? 1.0 : 0.0) : ok[k] ? a[k] / mn : 0.0;
    for (unsigned it = 0; it < p->max_iter; it++) {
        double tau[MS_MAX_MODELS + 1] = {0};
        for (unsigned i = 0; i < K; i++) {
            if (!ok[i])
                continue;
            double dot = 0.0;
            for (unsigned j = 0; j < K; j++)
                if (ok[j])
                    dot += a[j] * U[j][i];
            dot = dot < -1.0 ? -1.0 : dot > 1.0 ? 1.0 : dot;
            double th = acos(dot);
            if (th < p->tol)
                continue;
            double f = be[i] * (th / sin(th));
            for (unsigned j = 0; j < K; j++)
                if (ok[j])
                    tau[j] += f * ((j == i ? 1.0 : 0.0) - dot * a[j]);
        }
        double tn;
        REFI_QUAD(tau, tn);
        if (tn < p->tol)
            break;
        for (unsigned k = 0; k < K; k++)
            if (ok[k])
                a[k] = cos(tn) * a[k] + sin(tn) * (tau[k] / tn);
        double un;
        REFI_QUAD(a, un);
        if (un > p->tol)
            for (unsigned k = 0; k < K; k++)
                if (ok[k])
                    a[k] = a[k] / un;
    }
#undef REFI_QUAD
    double scale = 0.0;
    for (unsigned k = 0; k < K; k++)
        scale += al * nr[k];
    float c[MS_MAX_MODELS + 1];
    for (unsigned k = 0; k < K; k++)
        c[k] = ok[k] ? (float)((scale * a[k]) / nr[k]) : 0.0f;
    for (uint64_t e = 0; e < N; e++) {
        float r = 0.0f;
        bool any = false;
        for (unsigned k = 0; k < K; k++) {
            if (!ok[k])
                continue;
            r = any ? r + c[k] * v->X[slot[k]][e] : c[k] * v->X[slot[k]][e];
            any = true;
        }
        out[e] = r;
    }
}

/* ====================================================== model_stock */

/* t from the task vectors' sums over [e0, e0 + cnt) */
static inline double refi_stock_t(float *const *D, unsigned N, uint64_t e0, uint64_t cnt)
{
    double csum = 0.0;
    unsigned pairs = 0;
    for (unsigned i = 0; i < N; i++) {
        for (unsigned j = i + 1; j < N; j++) {
            double np = sqrt(refi_dot(D[i], D[i], e0, cnt, 1)) * sqrt(refi_dot(D[j], D[j], e0, cnt, 1));
            np = np < 1e-6 ? 1e-6 : np;
            double c = refi_dot(D[i], D[j], e0, cnt, 1) / np;
            c = c < -1.0 ? -1.0 : c > 1.0 ? 1.0 : c;
            csum += c;
            pairs++;
        }
    }
    double cth = csum / pairs;
    return (N * cth) / (1.0 + (N - 1.0) * cth);
}

static inline void refi_model_stock(const ms_tensor_params *p, const refi_in *v, float *out)
{
    unsigned N = p->n_models;
    float *D[MS_MAX_MODELS];
    for (unsigned i = 0; i < N; i++)
        D[i] = refi_vec(v, i + 1, true);
    uint64_t lines = p->filter_wise ? p->rows : 1, len = p->filter_wise ? p->cols : p->numel;
    for (uint64_t l = 0; l < lines; l++) {
        double t = refi_stock_t(D, N, l * len, len);
        float a = (float)t, b = (float)(1.0 - t);
        for (uint64_t e = l * len; e < (l + 1) * len; e++) {
            float mean = v->X[1][e];
            for (unsigned i = 2; i <= N; i++)
                mean = mean + v->X[i][e];
            mean = mean / (float)N;
            out[e] = a * mean + b * v->X[0][e];
        }
    }
    for (unsigned i = 0; i < N; i++)
        free(D[i]);
}

/* ========================================================= nearswap */

static inline void refi_nearswap(const ms_tensor_params *p, const refi_in *v, float *out)
{
    float t = (float)p->t;
    for (uint64_t e = 0; e < p->numel; e++) {
        float b = v->X[0][e], x = v->X[1][e];
        float diff = fabsf(b - x);
        float w = t / (diff > 1e-6f ? diff : 1e-6f);
        w = w > 1.0f ? 1.0f : w < 0.0f ? 0.0f : w;
        out[e] = w * x + (1.0f - w) * b;
    }
}

/* ============================================================== ram */

/* ramplus_tl's per-model counts of nonzero elements shared with another
 * model / unique to the model. */
static inline void refi_ram_counts(const ms_tensor_params *p, const refi_in *v, uint64_t *shared, uint64_t *uniq)
{
    unsigned n = p->n_models;
    for (unsigned i = 0; i <= n; i++)
        shared[i] = uniq[i] = 0;
    for (uint64_t e = 0; e < p->numel; e++) {
        unsigned cnt = 0;
        for (unsigned i = 1; i <= n; i++)
            cnt += fabsf(refi_delta(v, i, e)) > (float)p->epsilon[i];
        for (unsigned i = 1; i <= n; i++) {
            bool nz = fabsf(refi_delta(v, i, e)) > (float)p->epsilon[i];
            shared[i] += nz && cnt > 1;
            uniq[i] += nz && cnt == 1;
        }
    }
}

static inline void refi_ram(const ms_tensor_params *p, const refi_in *v, float *out)
{
    unsigned n = p->n_models;
    uint64_t N = p->numel;
    float lam[MS_MAX_MODELS + 1];
    for (unsigned i = 1; i <= n; i++)
        lam[i] = 1.0f;
    if (p->method == MS_METHOD_RAMPLUS_TL) {
        uint64_t shared[MS_MAX_MODELS + 1], uniq[MS_MAX_MODELS + 1];
        refi_ram_counts(p, v, shared, uniq);
        for (unsigned i = 1; i <= n; i++) {
            double u = (double)uniq[i] < p->epsilon[i] ? p->epsilon[i] : (double)uniq[i];
            double rho = (double)shared[i] / u;
            rho = rho > p->ram_alpha ? p->ram_alpha : rho;
            lam[i] = (float)(1.0 + p->ram_r * rho);
        }
    }
    for (uint64_t e = 0; e < N; e++) {
        unsigned cnt = 0;
        for (unsigned i = 1; i <= n; i++)
            cnt += fabsf(refi_delta(v, i, e)) > (float)p->epsilon[i];
        float sum = 0.0f;
        for (unsigned i = 1; i <= n; i++) {
            float d = refi_delta(v, i, e);
            float dz = d * (fabsf(d) > (float)p->epsilon[i] ? 1.0f : 0.0f);
            float term = (dz * (cnt == 1 ? 1.0f : 0.0f)) * lam[i] + (dz * (cnt > 1 ? 1.0f : 0.0f)) /
                                                                         (cnt > 1 ? (float)cnt : 1.0f);
            sum = i == 1 ? term : sum + term;
        }
        out[e] = v->X[0][e] + sum;
    }
}

/* ============================================================== sce */

/* sce's mask: keep[e] = 1 for the top k variances, k = mergekit's
 * int(count_nonzero * select_topk), a product its tensors make in fp32. */
static inline void refi_sce_keep(const ms_tensor_params *p, const refi_in *v, unsigned char *keep)
{
    unsigned n = p->n_models;
    uint64_t N = p->numel;
    memset(keep, 1, N);
    if (p->select_topk >= 1.0)
        return;
    ref_item *it = malloc(N * sizeof *it);
    uint64_t zeros = 0;
    for (uint64_t e = 0; e < N; e++) {
        float mean = refi_delta(v, 1, e);
        for (unsigned i = 2; i <= n; i++)
            mean = mean + refi_delta(v, i, e);
        mean = mean / (float)n;
        float var = (refi_delta(v, 1, e) - mean) * (refi_delta(v, 1, e) - mean);
        for (unsigned i = 2; i <= n; i++)
            var = var + (refi_delta(v, i, e) - mean) * (refi_delta(v, i, e) - mean);
        var = refi_canon(var / (float)n);
        it[e] = (ref_item){ref_key(var), e};
        zeros += var == 0.0f;
    }
    float kf = (float)(N - zeros) * (float)p->select_topk;
    uint64_t k = kf >= (float)N ? N : (uint64_t)kf;
    qsort(it, N, sizeof *it, ref_cmp_desc);
    memset(keep, 0, N);
    for (uint64_t r = 0; r < k; r++)
        keep[it[r].index] = 1;
    free(it);
}

static inline void refi_sce(const ms_tensor_params *p, const refi_in *v, float *out)
{
    unsigned n = p->n_models;
    uint64_t N = p->numel;
    unsigned char *keep = malloc(N + 1);
    refi_sce_keep(p, v, keep);
    float *tau = malloc((size_t)n * N * sizeof(float) + 4);
    double mean[MS_MAX_MODELS], total = 0.0;
    double *sq = malloc(N * sizeof(double) + 8);
    for (unsigned i = 0; i < n; i++) {
        for (uint64_t e = 0; e < N; e++) {
            tau[i * N + e] = refi_delta(v, i + 1, e) * (keep[e] ? 1.0f : 0.0f);
            sq[e] = (double)tau[i * N + e] * (double)tau[i * N + e];
        }
        mean[i] = refi_blocked(sq, N) / (double)N;
        total += mean[i];
    }
    float w[MS_MAX_MODELS];
    for (unsigned i = 0; i < n; i++)
        w[i] = total == 0.0 ? (float)(1.0 / n) : (float)(mean[i] / total);
    for (uint64_t e = 0; e < N; e++) {
        float s = tau[e];
        for (unsigned i = 1; i < n; i++)
            s = s + tau[i * N + e];
        int maj = s >= 0.0f ? 1 : -1;
        float mixed = 0.0f, div = 0.0f;
        for (unsigned i = 0; i < n; i++) {
            float ti = tau[i * N + e];
            int sign = ti > 0.0f ? 1 : ti < 0.0f ? -1 : 0;
            float ew = w[i] * (sign == maj ? 1.0f : 0.0f);
            mixed = i == 0 ? ti * ew : mixed + ti * ew;
            div = i == 0 ? ew : div + ew;
        }
        out[e] = v->X[0][e] + mixed / (div == 0.0f ? 1.0f : div);
    }
    free(sq);
    free(tau);
    free(keep);
}

/* ===================================================== arcee_fusion */

/* Row r's KL divergence of softmax(X_1 row) + 1e-8 from softmax(B row) + 1e-8. */
static inline double refi_fusion_kl(const refi_in *v, uint64_t r, uint64_t cols)
{
    double *ex = malloc(cols * sizeof(double)), *eb = malloc(cols * sizeof(double));
    double *t = malloc(cols * sizeof(double));
    const float *x = v->X[1] + r * cols, *b = v->X[0] + r * cols;
    float mx = x[0], mb = b[0];
    for (uint64_t c = 0; c < cols; c++) {
        if (isnan(x[c]) || isnan(mx))
            mx = ref_float(0x7fc00000u);
        else if (x[c] > mx)
            mx = x[c];
        if (isnan(b[c]) || isnan(mb))
            mb = ref_float(0x7fc00000u);
        else if (b[c] > mb)
            mb = b[c];
    }
    for (uint64_t c = 0; c < cols; c++) {
        ex[c] = ms_interp_exp((double)x[c] - (double)mx);
        eb[c] = ms_interp_exp((double)b[c] - (double)mb);
    }
    double zx = refi_blocked(ex, cols), zb = refi_blocked(eb, cols);
    for (uint64_t c = 0; c < cols; c++) {
        double pp = ex[c] / zx + 1e-8, qq = eb[c] / zb + 1e-8;
        t[c] = pp * ms_interp_log(pp / qq);
    }
    double kl = refi_blocked(t, cols);
    free(t);
    free(eb);
    free(ex);
    return kl;
}

static inline int refi_cmp_float(const void *a, const void *b)
{
    uint32_t x = ms_interp_order_key(*(const float *)a), y = ms_interp_order_key(*(const float *)b);
    return x < y ? -1 : x > y;
}

/* arcee_fusion's importance (imp[numel]) and threshold. */
static inline double refi_fusion_importance(const ms_tensor_params *p, const refi_in *v, float *imp)
{
    uint64_t N = p->numel, rows = p->rows, cols = p->cols;
    float *sorted = malloc(N * sizeof(float) + 4);
    for (uint64_t r = 0; r < rows; r++) {
        float kl = (float)refi_fusion_kl(v, r, cols);
        for (uint64_t c = 0; c < cols; c++)
            imp[r * cols + c] = fabsf(refi_delta(v, 1, r * cols + c)) * kl;
    }
    memcpy(sorted, imp, N * sizeof(float));
    qsort(sorted, N, sizeof(float), refi_cmp_float);
    uint64_t last = N - 1;
    double q1 = sorted[last / 4], med = sorted[last / 2], q3 = sorted[(3 * last) / 4];
    free(sorted);
    return med + 1.5 * (q3 - q1);
}

static inline void refi_fusion(const ms_tensor_params *p, const refi_in *v, float *out)
{
    float *imp = malloc(p->numel * sizeof(float) + 4);
    double thr = refi_fusion_importance(p, v, imp);
    for (uint64_t e = 0; e < p->numel; e++) {
        float m = (double)imp[e] >= thr ? 1.0f : 0.0f;
        out[e] = v->X[0][e] + refi_delta(v, 1, e) * m;
    }
    free(imp);
}

/* ============================================================ merge */

/* out (p->out_dtype) = the merge of in[0..n_models] with parameters p. */
static inline void refi_merge(const ms_tensor_params *p, const void *const *in, void *out)
{
    refi_in v;
    refi_load(p, in, &v);
    float *o = malloc(p->numel * sizeof(float) + 4);
    switch (p->method) {
    case MS_METHOD_SLERP:
        refi_slerp(p, &v, o);
        break;
    case MS_METHOD_NUSLERP:
        refi_nuslerp(p, &v, o);
        break;
    case MS_METHOD_MULTISLERP:
        refi_multislerp(p, &v, o);
        break;
    case MS_METHOD_KARCHER:
        refi_karcher(p, &v, o);
        break;
    case MS_METHOD_MODEL_STOCK:
        refi_model_stock(p, &v, o);
        break;
    case MS_METHOD_NEARSWAP:
        refi_nearswap(p, &v, o);
        break;
    case MS_METHOD_RAM:
    case MS_METHOD_RAMPLUS_TL:
        refi_ram(p, &v, o);
        break;
    case MS_METHOD_SCE:
        refi_sce(p, &v, o);
        break;
    case MS_METHOD_ARCEE_FUSION:
        refi_fusion(p, &v, o);
        break;
    default:
        abort();
    }
    for (uint64_t e = 0; e < p->numel; e++)
        ref_store(out, p->out_dtype, e, o[e]);
    free(o);
    refi_free(&v);
}

/* ================================================ mergekit on vectors */

/* mergekit's multislerp on whole vectors in fp64 (no base): out[e]. */
static inline void refi_vector_multislerp(const double *const *x, const double *w_in, unsigned n, uint64_t N,
                                          bool normalize, double eps, double *out)
{
    double w[MS_MAX_MODELS], ws = 0.0, nr[MS_MAX_MODELS];
    for (unsigned i = 0; i < n; i++)
        ws += w_in[i];
    for (unsigned i = 0; i < n; i++) {
        w[i] = normalize ? w_in[i] / ws : w_in[i];
        double s = 0.0;
        for (uint64_t e = 0; e < N; e++)
            s += x[i][e] * x[i][e];
        nr[i] = sqrt(s);
    }
    double *mean = calloc(N, sizeof(double));
    for (unsigned i = 0; i < n; i++)
        for (uint64_t e = 0; e < N; e++)
            mean[e] += w[i] * x[i][e] / (nr[i] + eps);
    double mn = 0.0;
    for (uint64_t e = 0; e < N; e++)
        mn += mean[e] * mean[e];
    mn = sqrt(mn);
    double *tang = calloc(N, sizeof(double));
    for (uint64_t e = 0; e < N; e++)
        mean[e] /= mn;
    for (unsigned i = 0; i < n; i++) {
        double dot = 0.0;
        for (uint64_t e = 0; e < N; e++)
            dot += x[i][e] / (nr[i] + eps) * mean[e];
        for (uint64_t e = 0; e < N; e++)
            tang[e] += w[i] * (x[i][e] / (nr[i] + eps) - dot * mean[e]);
    }
    double tn = 0.0;
    for (uint64_t e = 0; e < N; e++)
        tn += tang[e] * tang[e];
    tn = sqrt(tn) + eps;
    double avg = 0.0;
    for (unsigned i = 0; i < n; i++)
        avg += w[i] * nr[i];
    for (uint64_t e = 0; e < N; e++)
        out[e] = (mean[e] * cos(tn) + tang[e] * (sin(tn) / tn)) * avg;
    free(tang);
    free(mean);
}

/* mergekit's karcher on whole vectors in fp64 (equal weights). */
static inline void refi_vector_karcher(const double *const *x, unsigned K, uint64_t N, unsigned max_iter,
                                       double tol, double *out)
{
    double nr[MS_MAX_MODELS + 1], al = 1.0 / K, asum = 0.0;
    unsigned valid[MS_MAX_MODELS + 1], nv = 0;
    for (unsigned k = 0; k < K; k++) {
        double s = 0.0;
        for (uint64_t e = 0; e < N; e++)
            s += x[k][e] * x[k][e];
        nr[k] = sqrt(s);
        if (nr[k] > tol) {
            valid[nv++] = k;
            asum += al;
        }
    }
    double *mean = calloc(N, sizeof(double)), *tang = calloc(N, sizeof(double));
    for (unsigned v = 0; v < nv; v++)
        for (uint64_t e = 0; e < N; e++)
            mean[e] += (al / asum) * x[valid[v]][e] / nr[valid[v]];
    double mn = 0.0;
    for (uint64_t e = 0; e < N; e++)
        mn += mean[e] * mean[e];
    mn = sqrt(mn);
    for (uint64_t e = 0; e < N; e++)
        mean[e] = mn < tol ? x[valid[0]][e] / nr[valid[0]] : mean[e] / mn;
    for (unsigned it = 0; it < max_iter; it++) {
        memset(tang, 0, N * sizeof(double));
        for (unsigned v = 0; v < nv; v++) {
            unsigned k = valid[v];
            double dot = 0.0;
            for (uint64_t e = 0; e < N; e++)
                dot += mean[e] * x[k][e] / nr[k];
            dot = dot < -1 ? -1 : dot > 1 ? 1 : dot;
            double th = acos(dot);
            if (th < tol)
                continue;
            for (uint64_t e = 0; e < N; e++)
                tang[e] += (al / asum) * (th / sin(th)) * (x[k][e] / nr[k] - dot * mean[e]);
        }
        double tn = 0.0;
        for (uint64_t e = 0; e < N; e++)
            tn += tang[e] * tang[e];
        tn = sqrt(tn);
        if (tn < tol)
            break;
        double un = 0.0;
        for (uint64_t e = 0; e < N; e++) {
            mean[e] = cos(tn) * mean[e] + sin(tn) * (tang[e] / tn);
            un += mean[e] * mean[e];
        }
        un = sqrt(un);
        if (un > tol)
            for (uint64_t e = 0; e < N; e++)
                mean[e] /= un;
    }
    double scale = 0.0;
    for (unsigned k = 0; k < K; k++)
        scale += al * nr[k];
    for (uint64_t e = 0; e < N; e++)
        out[e] = scale * mean[e];
    free(tang);
    free(mean);
}

#endif
