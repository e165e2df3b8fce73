/* Shared by the GPU tests (test_gpu_merge.c, test_gpu_fallback.c): the
 * random merge cases of tests/unit/merge_cases.h, chunk helpers, the
 * CPU-only run, and comparisons of merge states and outputs that say exactly
 * what differs. No cmocka asserts here: the fallback test's child processes
 * use these outside a cmocka runner. Include only with MERGESTREAM_HAVE_CUDA. */
#ifndef MS_GPU_TEST_CASES_H
#define MS_GPU_TEST_CASES_H

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_merge.h"
#include "cpu/cpu_pool.h"
#include "gpu/gpu_backend.h"
#include "pipeline/merge_passes.h"
#include "pipeline/merge_passes_hessian.h"

#include "../unit/merge_cases.h"
#include "../unit/test_chunks.h"

/* The chunk of rows [row0, row0 + n_rows) with output into out (the whole
 * tensor's output buffer). */
static inline ms_chunk case_chunk(const tcase *tc, uint64_t row0, uint64_t n_rows, void *out)
{
    return test_chunk(&tc->p, tc->in, out, row0, n_rows);
}

/* Rows of the next chunk starting at row r (test_chunk_rows). */
static inline uint64_t pick_rows(const tcase *tc, uint64_t r, bool chunked)
{
    return test_chunk_rows(tc->p.rows, r, chunked);
}

static inline const char *pass_kind_name(ms_merge_pass_kind k)
{
    switch (k) {
    case MS_MERGE_PASS_HIST_HI:
        return "HIST_HI";
    case MS_MERGE_PASS_HIST_LO:
        return "HIST_LO";
    case MS_MERGE_PASS_L1:
        return "L1";
    case MS_MERGE_PASS_APPLY:
        return "APPLY";
    default:
        return "an interpolation pass";
    }
}

static inline const char *sel_name(ms_merge_sel s)
{
    static const char *const names[] = {"ALL", "NONE", "RANDOM", "TOP", "BAND", "DELLA"};
    return (unsigned)s < 6 ? names[s] : "?";
}

/* Random saliency coefficients (tc->u) for ties_sparsegpt / dare_sparsegpt
 * cases; one model in four keeps magnitude keys (no Hessian). Mostly
 * 2^-10..2^11, and some 0 (the 1e-10 guard), tiny (scores that overflow to
 * +Inf) and huge ones (scores that underflow to 0: many equal keys). */
static inline void case_add_saliency(tcase *tc)
{
    for (unsigned i = 1; i <= tc->p.n_models; i++) {
        if (rng_next() % 4 == 0)
            continue;
        float *u = malloc(tc->p.cols * sizeof *u);
        for (uint64_t c = 0; c < tc->p.cols; c++) {
            unsigned r = (unsigned)(rng_next() % 16);
            u[c] = r == 0 ? 0.0f : r == 1 ? 1e-30f : r == 2 ? 1e30f
                                                          : (float)ldexp(0.5 + rng_unit(), (int)(rng_next() % 22) - 10);
        }
        tc->u[i] = u;
    }
}

/* Random Hessians (tc->hess) for a regmean case: the Gram matrix of cols
 * + 3 random rows with column scales over three decades, one input dead in
 * every other model; in one case in five the last model has none (the mean
 * of the models). A random alpha. */
static inline void case_add_hessians(tcase *tc)
{
    uint64_t n = tc->p.cols, N = n + 3;
    tc->p.regmean_alpha = rng_next() % 2 ? 0.1 : rng_unit();
    unsigned with = tc->p.n_models - (rng_next() % 5 == 0);
    double *x = malloc(N * n * sizeof *x), *scale = malloc(n * sizeof *scale);
    for (unsigned i = 1; i <= with; i++) {
        float *H = malloc(n * n * sizeof *H);
        for (uint64_t j = 0; j < n; j++)
            scale[j] = pow(10.0, 3.0 * rng_unit() - 1.5);
        for (uint64_t t = 0; t < N * n; t++)
            x[t] = rng_gauss() * scale[t % n];
        uint64_t dead = i % 2 ? n : rng_next() % n;
        for (uint64_t a = 0; a < n; a++)
            for (uint64_t b = 0; b <= a; b++) {
                double sum = 0.0;
                for (uint64_t t = 0; t < N; t++)
                    sum += x[t * n + a] * x[t * n + b];
                float h = a == dead || b == dead ? 0.0f : (float)(2.0 * sum / (double)N);
                H[a * n + b] = H[b * n + a] = h;
            }
        tc->hess[i] = H;
    }
    free(x);
    free(scale);
}

/* A merge state for tc; for a Hessian method, with tc->u for the models
 * that select by key and tc->hess (regmean; factored on the CPU). 0 or the
 * first failure's negative errno. */
static inline int case_state_open(const tcase *tc, ms_merge_state **st)
{
    int rc = ms_merge_state_open(&tc->p, st);
    if (rc != 0 || !ms_merge_hessian_method(tc->p.method))
        return rc;
    rc = ms_hessian_state_open(*st, &tc->p);
    for (unsigned i = 1; i <= tc->p.n_models && rc == 0; i++) {
        if (tc->u[i] && ms_hessian_model_uses_u(*st, &tc->p, i))
            rc = ms_hessian_state_set_u(*st, &tc->p, i, tc->u[i]);
        if (tc->hess[i])
            rc = ms_hessian_state_add(*st, &tc->p, i, tc->hess[i], NULL);
    }
    if (rc == 0 && tc->p.method == MS_METHOD_REGMEAN)
        rc = ms_hessian_state_finish(*st, &tc->p, NULL);
    return rc;
}

/* The whole tensor on the CPU, every pass (chunked: random row chunks). */
static inline bool run_cpu_only(const tcase *tc, void *out, cpu_pool *pool, bool chunked)
{
    const ms_tensor_params *p = &tc->p;
    ms_merge_state *st = NULL;
    if (case_state_open(tc, &st) != 0)
        return false;
    bool ok = true;
    for (unsigned pass = 0; pass < st->n_passes && ok; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = pick_rows(tc, r, chunked);
            ms_chunk c = case_chunk(tc, r, nr, out);
            ok = ok && cpu_merge_run_pass(p, st, pass, &c, pool) == 0;
            r += nr;
        } while (r < p->rows && ok);
        if (ok)
            ms_merge_pass_finish(st, p, pass);
    }
    ms_merge_state_close(st);
    return ok;
}

/* ========================================================= comparisons */

static inline bool same_double(double a, double b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

static inline bool same_float(float a, float b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

/* First difference between two states (want: the CPU's) into why; false
 * when they are equal. */
static inline bool state_diff(const ms_merge_state *want, const ms_merge_state *got, const ms_tensor_params *p, char *why,
                       size_t len)
{
#define SD_U64(field, what, ...)                                                                           \
    do {                                                                                                   \
        if ((uint64_t)(want->field) != (uint64_t)(got->field)) {                                           \
            int o_ = snprintf(why, len, what, __VA_ARGS__);                                                \
            if (o_ >= 0 && (size_t)o_ < len)                                                               \
                snprintf(why + o_, len - (size_t)o_, " is %" PRIu64 ", the CPU has %" PRIu64,              \
                         (uint64_t)(got->field), (uint64_t)(want->field));                                 \
            return true;                                                                                   \
        }                                                                                                  \
    } while (0)
    SD_U64(next_elem, "%s", "next_elem");
    SD_U64(any_split, "%s", "any_split");
    SD_U64(n_passes, "%s", "n_passes");
    for (unsigned i = 1; i <= p->n_models; i++) {
        const ms_merge_model *a = &want->model[i], *b = &got->model[i];
        SD_U64(model[i].sel, "model %u sel", i);
        SD_U64(model[i].rescale, "model %u rescale", i);
        for (unsigned bd = 0; bd < 2; bd++) {
            SD_U64(model[i].bound[bd].bin, "model %u bound %u bin", i, bd);
            SD_U64(model[i].bound[bd].n_below_bin, "model %u bound %u n_below_bin", i, bd);
            SD_U64(model[i].bound[bd].key, "model %u bound %u key", i, bd);
            SD_U64(model[i].bound[bd].n_less, "model %u bound %u n_less", i, bd);
            SD_U64(model[i].bound[bd].n_eq, "model %u bound %u n_eq", i, bd);
            SD_U64(model[i].bound[bd].take, "model %u bound %u take", i, bd);
            SD_U64(model[i].bound[bd].split, "model %u bound %u split", i, bd);
            SD_U64(model[i].bound[bd].eq_seen, "model %u bound %u eq_seen (tie rule position)", i, bd);
            if (a->bound[bd].hist_lo && b->bound[bd].hist_lo)
                for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                    if (a->bound[bd].hist_lo[k] != b->bound[bd].hist_lo[k]) {
                        snprintf(why, len, "model %u bound %u hist_lo[0x%04" PRIx32 "] is %" PRIu64
                                 ", the CPU has %" PRIu64, i, bd, k, b->bound[bd].hist_lo[k], a->bound[bd].hist_lo[k]);
                        return true;
                    }
        }
        if (a->hist_hi && b->hist_hi)
            for (uint32_t k = 0; k < MS_MERGE_HI_BINS; k++)
                if (a->hist_hi[k] != b->hist_hi[k]) {
                    snprintf(why, len, "model %u hist_hi[0x%04" PRIx32 "] is %" PRIu64 ", the CPU has %" PRIu64, i, k,
                             b->hist_hi[k], a->hist_hi[k]);
                    return true;
                }
        const double *da[4] = {&a->l1_delta, &a->l1_tau, &a->blk_delta, &a->blk_tau};
        const double *db[4] = {&b->l1_delta, &b->l1_tau, &b->blk_delta, &b->blk_tau};
        static const char *const dn[4] = {"l1_delta", "l1_tau", "blk_delta (open L1 block)", "blk_tau (open L1 block)"};
        for (int k = 0; k < 4; k++)
            if (!same_double(*da[k], *db[k])) {
                snprintf(why, len, "model %u %s is %.17g, the CPU has %.17g", i, dn[k], *db[k], *da[k]);
                return true;
            }
        if (!same_float(a->factor, b->factor)) {
            snprintf(why, len, "model %u factor is %.9g, the CPU has %.9g", i, (double)b->factor, (double)a->factor);
            return true;
        }
    }
#undef SD_U64
    return false;
}

/* First differing element of two output ranges of n elements of dtype dt
 * (element numbers counted from first); false when equal. */
static inline bool output_diff(const void *want, const void *got, st_dtype dt, uint64_t first, uint64_t n, char *why,
                        size_t len)
{
    size_t osz = ref_dtype_size(dt);
    if (memcmp(want, got, n * osz) == 0)
        return false;
    uint64_t e = 0;
    while (memcmp((const char *)got + e * osz, (const char *)want + e * osz, osz) == 0)
        e++;
    uint32_t g = 0, w = 0;
    memcpy(&g, (const char *)got + e * osz, osz);
    memcpy(&w, (const char *)want + e * osz, osz);
    uint64_t count = 0;
    for (uint64_t k = e; k < n; k++)
        count += memcmp((const char *)got + k * osz, (const char *)want + k * osz, osz) != 0;
    snprintf(why, len, "output element %" PRIu64 " (%s) is 0x%0*" PRIx32 ", the CPU wrote 0x%0*" PRIx32
             " (%" PRIu64 " of %" PRIu64 " elements differ)", first + e, ref_dtype_name(dt), (int)(2 * osz), g,
             (int)(2 * osz), w, count, n);
    return true;
}

/* A copy of a state and its histograms, to show a failed call left it alone. */
typedef struct state_snap {
    ms_merge_state st;
    uint64_t *hist;
    uint64_t words;
} state_snap;

static inline bool snap_take(state_snap *s, const ms_merge_state *st, const ms_tensor_params *p)
{
    memcpy(&s->st, st, sizeof *st); /* padding included: snap_equal compares bytes */
    s->words = 0; /* the histograms: hist_mem holds them all, in this order */
    for (unsigned i = 1; i <= p->n_models; i++) {
        s->words += st->model[i].hist_hi ? MS_MERGE_HI_BINS : 0;
        for (unsigned bd = 0; bd < 2; bd++)
            s->words += st->model[i].bound[bd].hist_lo ? MS_MERGE_LO_BINS : 0;
    }
    s->hist = NULL;
    if (s->words) {
        s->hist = malloc(s->words * sizeof(uint64_t));
        if (!s->hist)
            return false;
        memcpy(s->hist, st->hist_mem, s->words * sizeof(uint64_t));
    }
    return true;
}

static inline bool snap_equal(const state_snap *s, const ms_merge_state *st)
{
    if (memcmp(&s->st, st, sizeof *st) != 0)
        return false;
    return s->words == 0 || memcmp(s->hist, st->hist_mem, s->words * sizeof(uint64_t)) == 0;
}

static inline void snap_free(state_snap *s)
{
    free(s->hist);
    s->hist = NULL;
}

#endif
