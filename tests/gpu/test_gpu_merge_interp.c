/* The CUDA kernels of the interpolation and model-soup methods
 * (gpu/gpu_merge_interp.cu) against the CPU's (cpu/cpu_merge_interp.c),
 * byte for byte: slerp, nuslerp (flatten, rows, columns), multislerp,
 * karcher, model_stock (whole tensor and filter_wise), nearswap, sce
 * (select_topk 1 and below 1: all, none, or the top k with ties split
 * across chunks), ram, ramplus_tl, arcee_fusion.
 *
 * Each case runs every pass on the CPU and on the GPU side by side over the
 * same chunks (the whole tensor; random chunk heights that differ per pass;
 * fixed heights) and compares the merge states after every chunk (Gram sums
 * and open blocks, per-line sums and open column blocks, coefficients,
 * counts, the KEY passes' histograms, zero count, ranks and thresholds,
 * sce's selection, tie count and weights, arcee_fusion's per-row KL,
 * next_elem) and the output of every APPLY chunk; then once more
 * with each chunk given to the GPU or the CPU at random (what the fallback
 * does). Shapes: 1-D, rows longer than a 65,536-element block (so blocks
 * and per-row segments cross), more than 65,536 rows (column blocks cross
 * chunks), odd sizes; input and output dtypes mixed at random; inputs with
 * near-parallel and zero task vectors, exact ties, NaN and Inf. The CPU's
 * windows are made small in every other case (its windowing must not
 * matter). A mismatch names the method, pass, chunk, field or element, both
 * values and what the float64 reference says.
 *
 * Also: gpu_interp_supports / gpu_interp_chunk_bytes (the bound is honest:
 * a backend capped at it runs every chunk), GPU_OOM under a tiny memory
 * limit leaves the state untouched, and a fault walk (the program re-runs
 * itself with MERGESTREAM_FAULT=gpu_alloc:N): every failed allocation gives
 * GPU_OOM with "needs X MiB, Y MiB free", the state unchanged, and the CPU
 * finishing the chunk gives the CPU-only bytes.
 *
 * Exit 77 without CUDA or without a device. The seed is printed; set
 * MS_TEST_SEED to replay. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>

#ifndef MERGESTREAM_HAVE_CUDA

int main(void)
{
    printf("SKIP: built without CUDA\n");
    return 77;
}

#else

#include <inttypes.h>
#include <math.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../unit/merge_reference.h"
#include "../unit/merge_reference_interp.h"
#include "cpu/cpu_merge.h"
#include "cpu/cpu_merge_interp.h"
#include "cpu/cpu_pool.h"
#include "gpu/gpu_backend.h"
#include "gpu/gpu_merge_interp.h"
#include "io/ms_fault.h"
#include "pipeline/merge_passes.h"
#include "pipeline/merge_passes_interp.h"

extern char **environ;

#define CHILD_ENV "MS_GPU_INTERP_CHILD"
enum { CHILD_OK = 0, CHILD_FAIL = 1, CHILD_NO_GPU = 3, CHILD_OK_FALLBACK = 10 };

#include "../unit/test_chunks.h"
#include "../unit/test_rng.h"

static uint64_t g_seed;
static gpu_backend *g_gpu;
static cpu_pool *g_pool;

static unsigned rng_below(unsigned n)
{
    return (unsigned)(rng_next() % n);
}

/* malloc that aborts: case building also runs in the fault walk's children,
 * outside a cmocka runner. */
static void *xmalloc(size_t n)
{
    void *q = malloc(n);
    if (!q) {
        fprintf(stderr, "test_gpu_merge_interp: out of memory (%zu bytes)\n", n);
        abort();
    }
    return q;
}

/* ================================================================ cases */

/* The supported methods and the option combinations that change the plan. */
typedef enum variant {
    V_SLERP,
    V_NUSLERP_FLAT,
    V_NUSLERP_ROWS,
    V_NUSLERP_COLS,
    V_MULTISLERP,
    V_KARCHER,
    V_STOCK,
    V_STOCK_ROWS,
    V_NEARSWAP,
    V_RAM,
    V_RAMPLUS,
    V_SCE,
    V_FUSION,
    V_COUNT
} variant;

static const char *const k_variant[V_COUNT] = {
    "slerp",       "nuslerp (flatten)", "nuslerp (rows)", "nuslerp (columns)",       "multislerp", "karcher",
    "model_stock", "model_stock (filter_wise)", "nearswap", "ram", "ramplus_tl", "sce", "arcee_fusion",
};

typedef enum flavour { FL_PLAIN, FL_NEAR, FL_ZERO, FL_QUANT, FL_SPECIALS, FL_COUNT } flavour;
static const char *const k_flavour[FL_COUNT] = {"plain", "near-parallel", "zero task vectors", "quantised",
                                                "NaN/Inf"};

typedef struct gcase {
    variant v;
    flavour fl;
    ms_tensor_params p;
    void *in[MS_MAX_MODELS + 1];
} gcase;

static const st_dtype k_dtypes[3] = {ST_F32, ST_F16, ST_BF16};

static ms_method variant_method(variant v)
{
    static const ms_method m[V_COUNT] = {
        MS_METHOD_SLERP,      MS_METHOD_NUSLERP, MS_METHOD_NUSLERP,     MS_METHOD_NUSLERP,
        MS_METHOD_MULTISLERP, MS_METHOD_KARCHER, MS_METHOD_MODEL_STOCK, MS_METHOD_MODEL_STOCK,
        MS_METHOD_NEARSWAP,   MS_METHOD_RAM,     MS_METHOD_RAMPLUS_TL,  MS_METHOD_SCE,
        MS_METHOD_ARCEE_FUSION,
    };
    return m[v];
}

/* Models and parameters of variant v, drawn as a recipe would resolve them. */
static void pick_params(ms_tensor_params *p, variant v, bool big)
{
    unsigned many = big ? 3 : rng_below(3) ? 4 : 8;
    p->method = variant_method(v);
    p->lambda = 1.0f;
    p->has_base = true;
    p->n_models = 1 + rng_below(many);
    for (unsigned i = 1; i <= MS_MAX_MODELS; i++)
        p->weight[i] = 1.0f;
    switch (v) {
    case V_SLERP: {
        p->n_models = 1;
        unsigned r = rng_below(8);
        p->t = r == 0 ? 0.0 : r == 1 ? 1.0 : r == 2 ? 1e-9 : r == 3 ? 0.5 : rng_unit();
        break;
    }
    case V_NUSLERP_FLAT:
    case V_NUSLERP_ROWS:
    case V_NUSLERP_COLS:
        p->n_models = 2;
        p->has_base = rng_below(2);
        p->weight[1] = (float)(rng_unit() * 2 - 0.5);
        p->weight[2] = rng_below(5) == 0 ? -p->weight[1] : (float)(rng_unit() * 2 - 0.5); /* cancel: t = 0.5 */
        p->nuslerp_flatten = v == V_NUSLERP_FLAT;
        p->nuslerp_row_wise = v == V_NUSLERP_COLS || (v == V_NUSLERP_FLAT && rng_below(2));
        break;
    case V_MULTISLERP:
        p->has_base = rng_below(2);
        p->normalize_weights = rng_below(4) != 0;
        p->eps = rng_below(4) ? 1e-8 : 1e-3;
        for (unsigned i = 1; i <= p->n_models; i++)
            p->weight[i] = (float)(0.1 + rng_unit());
        break;
    case V_KARCHER:
        p->has_base = rng_below(2);
        p->max_iter = rng_below(4) ? 10 : rng_below(30);
        p->tol = rng_below(4) ? 1e-5 : 1e-9;
        break;
    case V_STOCK:
    case V_STOCK_ROWS:
        p->n_models = 2 + rng_below(big ? 2 : 4);
        p->filter_wise = v == V_STOCK_ROWS;
        break;
    case V_NEARSWAP: {
        p->n_models = 1;
        static const double ts[] = {1e-7, 1e-4, 0.001, 0.01, 0.5, 2.0};
        p->t = ts[rng_below(6)];
        break;
    }
    case V_RAM:
    case V_RAMPLUS:
        for (unsigned i = 1; i <= p->n_models; i++)
            p->epsilon[i] = rng_below(3) ? 1e-5 : rng_below(2) ? 0.0 : 0.003;
        p->ram_r = rng_below(2) ? 0.1 : 2.0 * rng_unit();
        p->ram_alpha = rng_below(2) ? 0.2 : rng_unit();
        break;
    case V_SCE: /* most tests then set select_topk themselves */
        p->select_topk = rng_below(4) == 0 ? 1.0 : rng_below(3) == 0 ? 1e-4 : 0.02 + 0.96 * rng_unit();
        break;
    case V_FUSION:
        p->n_models = 1;
        break;
    default:
        fprintf(stderr, "test_gpu_merge_interp: unknown variant %d\n", (int)v);
        abort();
    }
}

/* The model count case_make gives sce (test_sce_ties), 0: drawn. */
static unsigned g_sce_models;

/* A random case of variant v, rows x cols, with inputs of flavour fl. */
static void case_make(gcase *gc, variant v, uint64_t rows, uint64_t cols, flavour fl)
{
    memset(gc, 0, sizeof *gc);
    gc->v = v;
    gc->fl = fl;
    ms_tensor_params *p = &gc->p;
    p->rows = rows;
    p->cols = cols;
    p->numel = rows * cols;
    pick_params(p, v, p->numel > 100000);
    if (v == V_SCE && g_sce_models)
        p->n_models = g_sce_models;
    p->out_dtype = k_dtypes[rng_below(3)];
    for (unsigned i = 0; i <= p->n_models; i++) {
        p->in_dtype[i] = k_dtypes[rng_below(3)];
        p->model_rows[i] = rows;
    }
    uint64_t n = p->numel;
    unsigned nm = p->n_models;
    float *base = xmalloc(n * sizeof(float) + 4);
    double bscale = rng_below(8) == 0 ? 1e-9 : 0.05; /* sometimes norms below slerp's 1e-8 */
    for (uint64_t e = 0; e < n; e++)
        base[e] = fl == FL_QUANT ? (float)ldexp((double)((int64_t)(rng_next() % 201) - 100), -6)
                                 : (float)(bscale * rng_gauss());
    for (unsigned i = 0; i <= nm; i++) {
        gc->in[i] = xmalloc(n * ref_dtype_size(p->in_dtype[i]) + 4);
        double scale = 0.002 + 0.02 * rng_unit();
        double near_c = rng_below(2) ? 1.0 + 0.5 * rng_unit() : -(1.0 + 0.5 * rng_unit());
        bool zero = fl == FL_ZERO && (i == 1 || rng_below(2));
        for (uint64_t e = 0; e < n; e++) {
            float x = base[e];
            if (i == 0 || zero)
                x = base[e];
            else if (fl == FL_NEAR)
                x = (float)(near_c * base[e] + 1e-6 * bscale * rng_gauss());
            else if (fl == FL_QUANT)
                x = x + (float)ldexp((double)((int64_t)(rng_next() % 9) - 4), -8);
            else
                x = x + (float)(scale * rng_gauss());
            ref_store_input(gc->in[i], p->in_dtype[i], e, x);
        }
        if (fl == FL_SPECIALS) {
            static const uint32_t bits[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u,
                                            0xffa5a5a5u, 0x7f800000u, 0xff800000u};
            for (unsigned k = 0; k < 1 + n / 3000; k++)
                ref_store_input(gc->in[i], p->in_dtype[i], rng_next() % n, ref_float(bits[rng_below(6)]));
        }
    }
    free(base);
    if (!p->has_base) { /* nuslerp, multislerp, karcher without one: slot 0 is never read */
        free(gc->in[0]);
        gc->in[0] = NULL;
    }
}

static void case_free(gcase *gc)
{
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++) {
        free(gc->in[i]);
        gc->in[i] = NULL;
    }
}

static void case_describe(const gcase *gc, char *buf, size_t len)
{
    const ms_tensor_params *p = &gc->p;
    int o = snprintf(buf, len,
                     "%s rows=%" PRIu64 " cols=%" PRIu64 " n=%u base=%s(%s) out=%s inputs=%s t=%.9g "
                     "filter_wise=%d flatten=%d row_wise=%d normw=%d eps=%g max_iter=%u tol=%g r=%g alpha=%g "
                     "select_topk=%.17g seed=%" PRIu64 ":",
                     k_variant[gc->v], p->rows, p->cols, p->n_models, p->has_base ? "yes" : "no",
                     ref_dtype_name(p->in_dtype[0]), ref_dtype_name(p->out_dtype), k_flavour[gc->fl], p->t, p->filter_wise,
                     p->nuslerp_flatten, p->nuslerp_row_wise, p->normalize_weights, p->eps, p->max_iter, p->tol,
                     p->ram_r, p->ram_alpha, p->select_topk, g_seed);
    for (unsigned i = 1; i <= p->n_models && o > 0 && (size_t)o < len; i++)
        o += snprintf(buf + o, len - (size_t)o, " [w=%.9g eps=%g in=%s]", (double)p->weight[i], p->epsilon[i],
                      ref_dtype_name(p->in_dtype[i]));
}

_Noreturn static void fail_case(const gcase *gc, const char *label, const char *what)
{
    char desc[2048];
    case_describe(gc, desc, sizeof desc);
    fail_msg("%s: %s\n    case: %s", label, what, desc);
    abort(); /* fail_msg does not return */
}

static ms_chunk case_chunk(const gcase *gc, uint64_t row0, uint64_t n_rows, void *out)
{
    return test_chunk(&gc->p, gc->in, out, row0, n_rows);
}

/* Chunk heights: 0 = the whole tensor, UINT64_MAX = random (often small, so
 * chunks start and end inside blocks), else that many rows. */
#define CHUNK_RANDOM UINT64_MAX

static uint64_t pick_rows(const gcase *gc, uint64_t r, uint64_t height)
{
    uint64_t left = gc->p.rows - r;
    if (height != CHUNK_RANDOM && height != 0)
        return height < left ? height : left;
    return test_chunk_rows(gc->p.rows, r, height == CHUNK_RANDOM);
}

static const char *pass_name(ms_merge_pass_kind k)
{
    switch (k) {
    case MS_MERGE_PASS_GRAM:
        return "GRAM";
    case MS_MERGE_PASS_LINE_GRAM:
        return "LINE_GRAM";
    case MS_MERGE_PASS_COUNT:
        return "COUNT";
    case MS_MERGE_PASS_KEY_HI:
        return "KEY_HI";
    case MS_MERGE_PASS_KEY_LO:
        return "KEY_LO";
    case MS_MERGE_PASS_SUMSQ:
        return "SUMSQ";
    case MS_MERGE_PASS_APPLY:
        return "APPLY";
    default:
        return "?";
    }
}

/* ========================================================= comparisons */

/* Equal bits, or both NaN (NaN payloads of fp64 statistics differ between
 * x86 and CUDA; every NaN output is canonical, so outputs are compared
 * bit for bit). */
static bool same_double(double a, double b)
{
    return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

static bool same_float(float a, float b)
{
    return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

#define DIFF_D(want_v, got_v, ...)                                                                         \
    do {                                                                                                   \
        double w_ = (want_v), g_ = (got_v);                                                                \
        if (!same_double(w_, g_)) {                                                                        \
            int o_ = snprintf(why, len, __VA_ARGS__);                                                      \
            uint64_t wb_, gb_;                                                                             \
            memcpy(&wb_, &w_, 8);                                                                          \
            memcpy(&gb_, &g_, 8);                                                                          \
            if (o_ >= 0 && (size_t)o_ < len)                                                               \
                snprintf(why + o_, len - (size_t)o_,                                                       \
                         " is %.17g (0x%016" PRIx64 "), the CPU has %.17g (0x%016" PRIx64 ")", g_, gb_, w_, wb_); \
            return true;                                                                                   \
        }                                                                                                  \
    } while (0)

#define DIFF_U(want_v, got_v, ...)                                                                         \
    do {                                                                                                   \
        uint64_t w_ = (uint64_t)(want_v), g_ = (uint64_t)(got_v);                                          \
        if (w_ != g_) {                                                                                    \
            int o_ = snprintf(why, len, __VA_ARGS__);                                                      \
            if (o_ >= 0 && (size_t)o_ < len)                                                               \
                snprintf(why + o_, len - (size_t)o_, " is %" PRIu64 ", the CPU has %" PRIu64, g_, w_);     \
            return true;                                                                                   \
        }                                                                                                  \
    } while (0)

/* The KEY passes' and sce's / arcee_fusion's part of state_diff. */
static bool sel_state_diff(const ms_interp_state *a, const ms_interp_state *b, const ms_tensor_params *p, char *why,
                           size_t len)
{
    DIFF_U(a->n_ranks, b->n_ranks, "n_ranks");
    DIFF_U(a->n_zero, b->n_zero, "n_zero (keys equal to 0)");
    DIFF_U(a->sel, b->sel, "sel");
    DIFF_U(a->k, b->k, "k (elements kept)");
    DIFF_U(a->sel_key, b->sel_key, "sel_key");
    DIFF_U(a->sel_take, b->sel_take, "sel_take");
    DIFF_U(a->sel_split, b->sel_split, "sel_split");
    DIFF_U(a->eq_seen, b->eq_seen, "eq_seen (tied keys seen)");
    DIFF_D(a->threshold, b->threshold, "threshold");
    if ((a->hist_hi == NULL) != (b->hist_hi == NULL) || (a->row_kl == NULL) != (b->row_kl == NULL)) {
        snprintf(why, len, "arrays: hist_hi %s, row_kl %s", a->hist_hi ? "present" : "absent",
                 a->row_kl ? "present" : "absent");
        return true;
    }
    if (a->hist_hi) {
        if (memcmp(a->hist_hi, b->hist_hi, MS_INTERP_HI_BINS * sizeof(uint64_t)) != 0)
            for (uint32_t k = 0; k < MS_INTERP_HI_BINS; k++)
                DIFF_U(a->hist_hi[k], b->hist_hi[k], "hist_hi[0x%04" PRIx32 "]", k);
        for (unsigned r = 0; r < MS_INTERP_MAX_RANKS; r++) {
            const ms_interp_rank *x = &a->rank[r], *y = &b->rank[r];
            DIFF_U(x->rank, y->rank, "rank[%u].rank", r);
            DIFF_U(x->bin, y->bin, "rank[%u].bin", r);
            DIFF_U(x->n_below_bin, y->n_below_bin, "rank[%u].n_below_bin", r);
            DIFF_U(x->owns_lo, y->owns_lo, "rank[%u].owns_lo", r);
            DIFF_U(x->key, y->key, "rank[%u].key", r);
            DIFF_U(x->n_less, y->n_less, "rank[%u].n_less", r);
            DIFF_U(x->n_eq, y->n_eq, "rank[%u].n_eq", r);
            if (x->hist_lo && y->hist_lo && memcmp(x->hist_lo, y->hist_lo, MS_MERGE_LO_BINS * sizeof(uint64_t)) != 0)
                for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                    DIFF_U(x->hist_lo[k], y->hist_lo[k], "rank[%u].hist_lo[0x%04" PRIx32 "]", r, k);
        }
    }
    if (a->row_kl)
        for (uint64_t r = 0; r < p->rows; r++)
            DIFF_D(a->row_kl[r], b->row_kl[r], "row_kl[row %" PRIu64 "]", r);
    return false;
}

/* First difference between the interp parts of two states (want: the
 * CPU's) into why; false when they agree. */
static bool state_diff(const ms_merge_state *want, const ms_merge_state *got, const ms_tensor_params *p, char *why,
                       size_t len)
{
    DIFF_U(want->next_elem, got->next_elem, "next_elem");
    const ms_interp_state *a = want->interp, *b = got->interp;
    DIFF_U(a->n_vecs, b->n_vecs, "n_vecs");
    DIFF_U(a->n_sums, b->n_sums, "n_sums");
    DIFF_U(a->apply, b->apply, "apply");
    DIFF_U(a->n_lines, b->n_lines, "n_lines");
    for (unsigned s = 0; s < a->n_sums; s++) {
        DIFF_D(a->sum[s], b->sum[s], "sum[%u] (completed blocks)", s);
        DIFF_D(a->open[s], b->open[s], "open[%u] (open block)", s);
    }
    for (uint64_t l = 0; l < a->n_lines; l++) {
        for (unsigned s = 0; s < 3; s++) {
            DIFF_D(a->line_sum[l * 3 + s], b->line_sum[l * 3 + s], "line_sum[%s %" PRIu64 "][%u]",
                   a->line_cols ? "column" : "row", l, s);
            if (a->line_cols)
                DIFF_D(a->line_open[l * 3 + s], b->line_open[l * 3 + s], "line_open[column %" PRIu64 "][%u]", l, s);
        }
        for (unsigned k = 0; k < 2; k++)
            if (!same_float(a->line_coef[l * 2 + k], b->line_coef[l * 2 + k]))
                DIFF_D(a->line_coef[l * 2 + k], b->line_coef[l * 2 + k], "line_coef[%" PRIu64 "][%u]", l, k);
    }
    for (unsigned k = 0; k < a->n_vecs; k++) {
        if (!same_float(a->coef[k], b->coef[k]))
            DIFF_D(a->coef[k], b->coef[k], "coef[%u]", k);
        DIFF_U(a->use[k], b->use[k], "use[%u]", k);
    }
    if (!same_float(a->stock_a, b->stock_a) || !same_float(a->stock_b, b->stock_b)) {
        DIFF_D(a->stock_a, b->stock_a, "stock_a");
        DIFF_D(a->stock_b, b->stock_b, "stock_b");
    }
    for (unsigned i = 1; i <= p->n_models; i++) {
        DIFF_U(a->shared[i], b->shared[i], "shared[%u]", i);
        DIFF_U(a->unique[i], b->unique[i], "unique[%u]", i);
        if (!same_float(a->lambda[i], b->lambda[i]))
            DIFF_D(a->lambda[i], b->lambda[i], "lambda[%u]", i);
        if (!same_float(a->w[i], b->w[i]))
            DIFF_D(a->w[i], b->w[i], "w[%u] (sce)", i);
    }
    return sel_state_diff(a, b, p, why, len);
}

/* First differing element of two ranges of n elements (numbered from
 * first); false when equal. */
static bool output_diff(const void *want, const void *got, st_dtype dt, uint64_t first, uint64_t n, uint64_t *at,
                        char *why, size_t len)
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
    if (at)
        *at = first + e;
    snprintf(why, len,
             "output element %" PRIu64 " (%s) is 0x%0*" PRIx32 " (%.9g), the CPU wrote 0x%0*" PRIx32
             " (%.9g) (%" PRIu64 " of %" PRIu64 " elements differ)",
             first + e, ref_dtype_name(dt), (int)(2 * osz), g, (double)ref_load(got, dt, e), (int)(2 * osz), w,
             (double)ref_load(want, dt, e), count, n);
    return true;
}

/* What the float64 reference says about output element e (only after a
 * failure; small tensors only). */
static void ref_verdict(const gcase *gc, uint64_t e, const void *cpu_out, const void *gpu_out, char *buf, size_t len)
{
    const ms_tensor_params *p = &gc->p;
    if (p->numel > (1u << 20)) {
        snprintf(buf, len, "reference not run (tensor too large)");
        return;
    }
    size_t osz = ref_dtype_size(p->out_dtype);
    unsigned char *ref = malloc(p->numel * osz + 8);
    if (!ref) {
        snprintf(buf, len, "reference not run (no memory)");
        return;
    }
    refi_merge(p, (const void *const *)gc->in, ref);
    bool cpu_ok = memcmp(ref + e * osz, (const char *)cpu_out + e * osz, osz) == 0;
    bool gpu_ok = memcmp(ref + e * osz, (const char *)gpu_out + e * osz, osz) == 0;
    snprintf(buf, len, "the float64 reference has %.9g: %s", (double)ref_load(ref, p->out_dtype, e),
             cpu_ok && !gpu_ok   ? "the GPU is wrong"
             : gpu_ok && !cpu_ok ? "the CPU is wrong"
             : cpu_ok            ? "both agree with it?"
                                 : "neither agrees with it");
    free(ref);
}

/* ============================================================ lockstep */

/* Every pass of gc on the CPU and on backend gb side by side over the same
 * chunks (height: see pick_rows); states compared after every chunk and
 * every host step, APPLY outputs per chunk and whole. The CPU's output goes
 * to cpu_out when not NULL. */
static void check_lockstep(gpu_backend *gb, const gcase *gc, uint64_t height, const char *label, void *cpu_out)
{
    const ms_tensor_params *p = &gc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    size_t bytes = p->numel * osz + 8;
    unsigned char *oc = malloc(bytes), *og = malloc(bytes);
    assert_non_null(oc);
    assert_non_null(og);
    memset(oc, 0xa5, bytes);
    memset(og, 0x5a, bytes);
    ms_merge_state *sc = NULL, *sg = NULL;
    assert_int_equal(ms_merge_state_open(p, &sc), 0);
    assert_int_equal(ms_merge_state_open(p, &sg), 0);
    char why[512], what[2048], msg[256], verdict[256];
    for (unsigned pass = 0; pass < sc->n_passes; pass++) {
        ms_merge_pass_kind kind = sc->pass[pass];
        uint64_t r = 0;
        unsigned k = 0;
        do {
            uint64_t nr = pick_rows(gc, r, height);
            ms_chunk cc = case_chunk(gc, r, nr, oc), cg = case_chunk(gc, r, nr, og);
            assert_int_equal(cpu_merge_run_pass(p, sc, pass, &cc, g_pool), 0);
            gpu_status gs = gpu_merge_run_pass(gb, p, sg, pass, &cg, msg, sizeof msg);
            snprintf(what, sizeof what, "pass %u of %u (%s), chunk %u = rows [%" PRIu64 ", %" PRIu64 ")", pass,
                     sc->n_passes, pass_name(kind), k, r, r + nr);
            if (gs != GPU_OK) {
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": gpu_interp_run_pass returned %s: %s",
                         gs == GPU_OOM ? "GPU_OOM" : "GPU_FATAL", msg);
                fail_case(gc, label, what);
            }
            if (state_diff(sc, sg, p, why, sizeof why)) {
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": after the chunk the GPU state's %s", why);
                fail_case(gc, label, what);
            }
            uint64_t e = 0;
            if (kind == MS_MERGE_PASS_APPLY &&
                output_diff(cc.out, cg.out, p->out_dtype, cc.elem0, cc.n_elems, &e, why, sizeof why)) {
                ref_verdict(gc, e, oc, og, verdict, sizeof verdict);
                size_t o = strlen(what);
                snprintf(what + o, sizeof what - o, ": GPU %s; %s", why, verdict);
                fail_case(gc, label, what);
            }
            r += nr;
            k++;
        } while (r < p->rows);
        ms_merge_pass_finish(sc, p, pass);
        ms_merge_pass_finish(sg, p, pass);
        if (state_diff(sc, sg, p, why, sizeof why)) {
            snprintf(what, sizeof what, "after pass %u (%s) finished, the GPU state's %s", pass, pass_name(kind), why);
            fail_case(gc, label, what);
        }
    }
    if (og[bytes - 8] != 0x5a)
        fail_case(gc, label, "the GPU wrote past the end of the output");
    if (output_diff(oc, og, p->out_dtype, 0, p->numel, NULL, why, sizeof why))
        fail_case(gc, label, why);
    if (cpu_out)
        memcpy(cpu_out, oc, p->numel * osz);
    ms_merge_state_close(sc);
    ms_merge_state_close(sg);
    free(oc);
    free(og);
}

/* One state, each chunk of each pass given to the GPU or the CPU at random:
 * the output must be want's bytes. */
static void check_mixed(const gcase *gc, const void *want, const char *label)
{
    const ms_tensor_params *p = &gc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    unsigned char *out = malloc(p->numel * osz + 8);
    assert_non_null(out);
    memset(out, 0x3c, p->numel * osz + 8);
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(p, &st), 0);
    char log[1024] = "", msg[256], why[512], what[2048];
    size_t lo = 0;
    for (unsigned pass = 0; pass < st->n_passes; pass++) {
        uint64_t r = 0;
        do {
            uint64_t nr = pick_rows(gc, r, CHUNK_RANDOM);
            ms_chunk c = case_chunk(gc, r, nr, out);
            bool gpu = rng_next() % 2;
            if (lo + 40 < sizeof log)
                lo += (size_t)snprintf(log + lo, sizeof log - lo, " %s%u:%" PRIu64 "+%" PRIu64, gpu ? "G" : "C",
                                       pass, r, nr);
            if (gpu) {
                gpu_status gs = gpu_merge_run_pass(g_gpu, p, st, pass, &c, msg, sizeof msg);
                if (gs != GPU_OK) {
                    snprintf(what, sizeof what, "mixed run: pass %u rows [%" PRIu64 ", %" PRIu64 "): %s", pass, r,
                             r + nr, msg);
                    fail_case(gc, label, what);
                }
            } else {
                assert_int_equal(cpu_merge_run_pass(p, st, pass, &c, g_pool), 0);
            }
            r += nr;
        } while (r < p->rows);
        ms_merge_pass_finish(st, p, pass);
    }
    if (output_diff(want, out, p->out_dtype, 0, p->numel, NULL, why, sizeof why)) {
        snprintf(what, sizeof what, "GPU and CPU chunks mixed in one run (G/C pass:row+rows:%s): %s", log, why);
        fail_case(gc, label, what);
    }
    ms_merge_state_close(st);
    free(out);
}

/* Whole tensor, random chunks, fixed chunk heights and mixed backends for
 * one case; every other case with small CPU windows. */
static void check_case(const gcase *gc, unsigned idx)
{
    size_t bytes = gc->p.numel * ref_dtype_size(gc->p.out_dtype) + 8;
    unsigned char *want = malloc(bytes);
    assert_non_null(want);
    cpu_merge_interp_set_window_for_tests(idx % 2 ? 2 * MS_MERGE_BLOCK : 0);
    check_lockstep(g_gpu, gc, 0, "whole tensor", want);
    check_lockstep(g_gpu, gc, CHUNK_RANDOM, "random chunks", NULL);
    uint64_t h = 1 + gc->p.rows / 3;
    check_lockstep(g_gpu, gc, h, "chunks of rows/3 + 1 rows", NULL);
    if (gc->p.rows > 1 && gc->p.rows <= 400)
        check_lockstep(g_gpu, gc, 1, "chunks of one row", NULL);
    check_mixed(gc, want, "mixed");
    cpu_merge_interp_set_window_for_tests(0);
    free(want);
}

static void check_variant(variant v)
{
    static const uint64_t shapes[][2] = {
        {1, 1},     {1, 7},    {5, 2},   {9, 1},    {1, 1000}, {37, 129}, {200, 33},
        {1, 70001},            /* 1-D, more than one block */
        {3, 70001},            /* rows longer than a block: per-row segments */
        {2, 140000},           /* three segments per row */
        {23, 9001},            /* blocks cross rows */
        {40, 4096},            /* chunks often end on a block boundary */
        {70001, 3},            /* more than 65,536 rows: column blocks */
        {140000, 1},           /* one column, three row blocks */
    };
    for (unsigned k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        gcase gc;
        case_make(&gc, v, shapes[k][0], shapes[k][1], (flavour)(k % FL_COUNT));
        if (v == V_SCE) { /* every selection on shapes of every flavour: all, top k (ties), none */
            static const double topk[4] = {1.0, -1.0, 0.5, 1e-4};
            gc.p.select_topk = topk[k % 4] > 0 ? topk[k % 4] : 0.02 + 0.96 * rng_unit();
        }
        check_case(&gc, k);
        case_free(&gc);
    }
}

#define VARIANT_TEST(fn, v)                                                                                \
    static void fn(void **state)                                                                           \
    {                                                                                                      \
        (void)state;                                                                                       \
        check_variant(v);                                                                                  \
    }
VARIANT_TEST(test_slerp, V_SLERP)
VARIANT_TEST(test_nuslerp_flatten, V_NUSLERP_FLAT)
VARIANT_TEST(test_nuslerp_rows, V_NUSLERP_ROWS)
VARIANT_TEST(test_nuslerp_cols, V_NUSLERP_COLS)
VARIANT_TEST(test_multislerp, V_MULTISLERP)
VARIANT_TEST(test_karcher, V_KARCHER)
VARIANT_TEST(test_model_stock, V_STOCK)
VARIANT_TEST(test_model_stock_filter_wise, V_STOCK_ROWS)
VARIANT_TEST(test_nearswap, V_NEARSWAP)
VARIANT_TEST(test_ram, V_RAM)
VARIANT_TEST(test_ramplus_tl, V_RAMPLUS)
VARIANT_TEST(test_sce, V_SCE)
VARIANT_TEST(test_arcee_fusion, V_FUSION)

/* The sce selection of gc as the CPU decides it (sel, sel_split). */
static void sce_selection(const gcase *gc, ms_interp_sel *sel, bool *split)
{
    const ms_tensor_params *p = &gc->p;
    size_t osz = ref_dtype_size(p->out_dtype);
    unsigned char *out = malloc(p->numel * osz + 8);
    assert_non_null(out);
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(p, &st), 0);
    *sel = st->interp->sel;
    *split = false;
    for (unsigned pass = 0; pass + 1 < st->n_passes; pass++) { /* up to the APPLY */
        ms_chunk c = case_chunk(gc, 0, p->rows, out);
        assert_int_equal(cpu_merge_run_pass(p, st, pass, &c, g_pool), 0);
        ms_merge_pass_finish(st, p, pass);
        *sel = st->interp->sel;
        *split |= st->interp->sel_split;
    }
    ms_merge_state_close(st);
    free(out);
}

/* sce's exact ties: quantised task vectors give few distinct variances, so
 * the k-th largest is shared by many elements and only the first `take` of
 * them by flat index are kept: the tie positions carried across chunks
 * (random heights, single rows) must be the CPU's. Also a model whose task
 * vector is zero, and one model alone (variance 0 everywhere: nothing
 * kept). Each case must really select what its comment says, or the test
 * would prove nothing. */
static void test_sce_ties(void **state)
{
    (void)state;
    static const struct {
        uint64_t rows, cols;
        unsigned n_models;
        flavour fl;
        bool zero_model;   /* model 1 is the base itself: its task vector is exactly zero */
        double topk;
        ms_interp_sel want_sel;
        bool want_split;
    } cases[] = {
        {37, 129, 3, FL_QUANT, false, 0.37, MS_INTERP_SEL_TOP, true},
        {200, 33, 5, FL_QUANT, false, 0.5, MS_INTERP_SEL_TOP, true},
        {3, 70001, 2, FL_QUANT, false, 0.11, MS_INTERP_SEL_TOP, true}, /* ties across blocks and chunks */
        {70001, 3, 4, FL_QUANT, false, 0.73, MS_INTERP_SEL_TOP, true},
        {64, 300, 3, FL_PLAIN, true, 0.25, MS_INTERP_SEL_TOP, false},
        {64, 300, 3, FL_PLAIN, true, 1.0, MS_INTERP_SEL_ALL, false},
        {40, 500, 1, FL_PLAIN, false, 0.5, MS_INTERP_SEL_NONE, false},  /* one model: every variance is 0 */
        {40, 500, 1, FL_PLAIN, true, 1.0, MS_INTERP_SEL_ALL, false},    /* one zero task vector: w = 1 */
        {50, 100, 4, FL_PLAIN, false, 1e-5, MS_INTERP_SEL_NONE, false}, /* k = floor(0.05) = 0 */
        {50, 100, 8, FL_PLAIN, false, 0.999, MS_INTERP_SEL_TOP, false},
    };
    for (unsigned k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        gcase gc;
        g_sce_models = cases[k].n_models;
        case_make(&gc, V_SCE, cases[k].rows, cases[k].cols, cases[k].fl);
        g_sce_models = 0;
        if (cases[k].zero_model) { /* the base's bytes in the base's dtype: X_1 - B is exactly 0 */
            size_t bytes = gc.p.numel * ref_dtype_size(gc.p.in_dtype[0]);
            free(gc.in[1]);
            gc.in[1] = xmalloc(bytes + 4);
            memcpy(gc.in[1], gc.in[0], bytes);
            gc.p.in_dtype[1] = gc.p.in_dtype[0];
        }
        gc.p.select_topk = cases[k].topk;
        ms_interp_sel sel;
        bool split;
        sce_selection(&gc, &sel, &split);
        for (unsigned t = 0; t < 20 && cases[k].want_split && !split; t++) { /* k fell on a boundary */
            gc.p.select_topk = cases[k].topk + 0.0113 * (t + 1);
            sce_selection(&gc, &sel, &split);
        }
        if (sel != cases[k].want_sel || (cases[k].want_split && !split)) {
            char what[256];
            snprintf(what, sizeof what, "the case selects %d (split %d), not %d (split %d): it tests the wrong thing",
                     (int)sel, (int)split, (int)cases[k].want_sel, (int)cases[k].want_split);
            fail_case(&gc, "sce ties", what);
        }
        check_case(&gc, k);
        case_free(&gc);
    }
}

/* Millions of elements: many blocks per chunk, many row segments. */
static void test_large(void **state)
{
    (void)state;
    static const struct {
        variant v;
        uint64_t rows, cols;
    } cases[] = {
        {V_SLERP, 1100, 4096},        {V_MULTISLERP, 600, 8192}, {V_KARCHER, 1000, 3000},
        {V_STOCK_ROWS, 40, 200000},   {V_NUSLERP_COLS, 300000, 8}, {V_NUSLERP_ROWS, 20, 300000},
        {V_RAMPLUS, 1000, 3000},      {V_SCE, 1000, 3000},       {V_SCE, 3, 1500000},
        {V_FUSION, 600, 8192},        {V_FUSION, 8, 200000},
    };
    for (unsigned k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        gcase gc;
        case_make(&gc, cases[k].v, cases[k].rows, cases[k].cols, FL_PLAIN);
        if (gc.v == V_SCE)
            gc.p.select_topk = 0.3;
        check_lockstep(g_gpu, &gc, 0, "large, whole tensor", NULL);
        check_lockstep(g_gpu, &gc, CHUNK_RANDOM, "large, random chunks", NULL);
        case_free(&gc);
    }
}

/* ======================================================= memory bounds */

/* Which methods run here, and gpu_interp_chunk_bytes's edges. */
static void test_supports(void **state)
{
    (void)state;
    for (int m = 0; m < MS_METHOD_COUNT; m++) {
        ms_tensor_params q;
        memset(&q, 0, sizeof q);
        q.method = (ms_method)m;
        q.n_models = 2;
        q.has_base = true;
        q.rows = 1;
        q.cols = q.numel = 10;
        for (unsigned i = 0; i <= 2; i++)
            q.in_dtype[i] = ST_BF16;
        q.out_dtype = ST_F16;
        q.t = 0.5;
        q.select_topk = 0.5;
        bool want = m == MS_METHOD_SLERP || m == MS_METHOD_NUSLERP || m == MS_METHOD_MULTISLERP ||
                    m == MS_METHOD_KARCHER || m == MS_METHOD_MODEL_STOCK || m == MS_METHOD_NEARSWAP ||
                    m == MS_METHOD_SCE || m == MS_METHOD_RAM || m == MS_METHOD_RAMPLUS_TL ||
                    m == MS_METHOD_ARCEE_FUSION;
        if (gpu_interp_supports(&q) != want)
            fail_msg("gpu_interp_supports(method %d) is %d, expected %d", m, !want, want);
        if (!want && gpu_interp_chunk_bytes(&q, 1) != UINT64_MAX)
            fail_msg("gpu_interp_chunk_bytes(method %d) is not UINT64_MAX for an unsupported method", m);
        if (want) {
            assert_int_equal(gpu_interp_chunk_bytes(&q, 0), 0);
            assert_true(gpu_interp_chunk_bytes(&q, 1) > 0 && gpu_interp_chunk_bytes(&q, 1) != UINT64_MAX);
            q.cols = q.numel = UINT64_C(1) << 62; /* overflows */
            assert_true(gpu_interp_chunk_bytes(&q, 1000) == UINT64_MAX);
        }
    }
}

/* A backend whose memory limit is gpu_interp_chunk_bytes(p, R) runs every
 * chunk of up to R rows: the bound is honest. */
static void test_chunk_bytes_bound(void **state)
{
    (void)state;
    char msg[256], why[512], what[1024];
    for (int v = 0; v < V_COUNT; v++) {
        gcase gc;
        bool tall = v == V_NUSLERP_COLS;
        case_make(&gc, (variant)v, tall ? 70001 : 64, tall ? 3 : 3000, FL_PLAIN);
        if (gc.v == V_SCE) /* every pass: keys, sums, ties */
            gc.p.select_topk = 0.3;
        const ms_tensor_params *p = &gc.p;
        size_t osz = ref_dtype_size(p->out_dtype);
        unsigned char *want = malloc(p->numel * osz), *got = malloc(p->numel * osz);
        assert_non_null(want);
        assert_non_null(got);
        check_lockstep(g_gpu, &gc, 0, "chunk bytes reference", want);
        const uint64_t chunk_rows[] = {p->rows, tall ? 65537 : 17, tall ? 1000 : 1};
        for (unsigned ci = 0; ci < 3; ci++) {
            uint64_t R = chunk_rows[ci];
            uint64_t limit = gpu_interp_chunk_bytes(p, R);
            uint64_t io = R * p->cols * osz;
            for (unsigned i = 1; i <= p->n_models; i++)
                io += R * p->cols * ref_dtype_size(p->in_dtype[i]);
            if (limit == UINT64_MAX || limit < io)
                fail_case(&gc, "gpu_interp_chunk_bytes", "less than the chunk's input and output bytes");
            assert_true(gpu_interp_chunk_bytes(p, R + 1) >= limit);
            gpu_backend *b = NULL;
            assert_int_equal(gpu_backend_open(0, limit, &b, msg, sizeof msg), 0);
            ms_merge_state *st = NULL;
            assert_int_equal(ms_merge_state_open(p, &st), 0);
            memset(got, 0, p->numel * osz);
            for (unsigned pass = 0; pass < st->n_passes; pass++) {
                for (uint64_t r = 0; r < p->rows; r += R) {
                    uint64_t nr = p->rows - r < R ? p->rows - r : R;
                    ms_chunk c = case_chunk(&gc, r, nr, got);
                    gpu_status gs = gpu_merge_run_pass(b, p, st, pass, &c, msg, sizeof msg);
                    if (gs != GPU_OK) {
                        snprintf(what, sizeof what,
                                 "memory limit gpu_interp_chunk_bytes(p, %" PRIu64 ") = %" PRIu64
                                 " bytes: pass %u (%s) rows [%" PRIu64 ", %" PRIu64 ") failed: %s",
                                 R, limit, pass, pass_name(st->pass[pass]), r, r + nr, msg);
                        fail_case(&gc, "chunk bytes bound", what);
                    }
                    assert_true(gpu_backend_pool_held(b) <= limit);
                }
                ms_merge_pass_finish(st, p, pass);
            }
            if (output_diff(want, got, p->out_dtype, 0, p->numel, NULL, why, sizeof why))
                fail_case(&gc, "chunk bytes bound", why);
            ms_merge_state_close(st);
            gpu_backend_close(b);
        }
        free(want);
        free(got);
        case_free(&gc);
    }
}

/* ====================================================== failure contract */

/* A deep copy of a state's interp part, to prove a failed call left it
 * alone: the struct and every array it owns (line sums and coefficients,
 * histograms, row KL: one block, is->mem). */
typedef struct snap {
    uint64_t next_elem;
    ms_interp_state is;
    void *mem;
    size_t mem_bytes;
} snap;

static void snap_take(const ms_tensor_params *p, const ms_merge_state *st, snap *s)
{
    const ms_interp_state *is = st->interp;
    s->next_elem = st->next_elem;
    memcpy(&s->is, is, sizeof *is); /* bytes, padding included: snap_same compares bytes */
    s->mem_bytes = (size_t)(ms_merge_interp_state_bytes(p) - sizeof(ms_interp_state));
    s->mem = NULL;
    if (is->mem && s->mem_bytes) {
        s->mem = xmalloc(s->mem_bytes);
        memcpy(s->mem, is->mem, s->mem_bytes);
    }
}

/* True when st is byte for byte what s recorded. */
static bool snap_same(const snap *s, const ms_merge_state *st)
{
    const ms_interp_state *is = st->interp;
    if (s->next_elem != st->next_elem || memcmp(&s->is, is, sizeof *is) != 0)
        return false;
    return !s->mem || memcmp(s->mem, is->mem, s->mem_bytes) == 0;
}

static void snap_free(snap *s)
{
    free(s->mem);
}

/* "needs X MiB, Y MiB free" */
static bool oom_msg_ok(const char *msg)
{
    unsigned long long x, y;
    char tail;
    return sscanf(msg, "needs %llu MiB, %llu MiB free%c", &x, &y, &tail) == 2;
}

/* Runs every pass of gc over chunks of `height` rows on backend gb, each
 * call first on the GPU and, when that returns GPU_OOM, on the CPU. Every
 * GPU_OOM must leave the state unchanged and say how much it needed. The
 * output goes to out. Returns the number of fallbacks, or -1 with why. */
static long run_with_fallback(gpu_backend *gb, const gcase *gc, uint64_t height, void *out, char *why, size_t len)
{
    const ms_tensor_params *p = &gc->p;
    ms_merge_state *st = NULL;
    if (ms_merge_state_open(p, &st) != 0) {
        snprintf(why, len, "ms_merge_state_open failed");
        return -1;
    }
    long fallbacks = 0;
    char msg[256];
    for (unsigned pass = 0; pass < st->n_passes; pass++) {
        for (uint64_t r = 0; r < p->rows; r += height) {
            uint64_t nr = p->rows - r < height ? p->rows - r : height;
            ms_chunk c = case_chunk(gc, r, nr, out);
            snap s;
            snap_take(p, st, &s);
            gpu_status gs = gpu_merge_run_pass(gb, p, st, pass, &c, msg, sizeof msg);
            bool same = snap_same(&s, st);
            snap_free(&s);
            if (gs == GPU_FATAL || (gs == GPU_OOM && (!same || !oom_msg_ok(msg)))) {
                snprintf(why, len, "pass %u (%s) rows [%" PRIu64 ", %" PRIu64 "): %s%s: \"%s\"", pass,
                         pass_name(st->pass[pass]), r, r + nr, gs == GPU_FATAL ? "GPU_FATAL" : "GPU_OOM",
                         gs == GPU_OOM && !same ? " changed the state" : "", msg);
                ms_merge_state_close(st);
                return -1;
            }
            if (gs == GPU_OOM) {
                fallbacks++;
                if (cpu_merge_run_pass(p, st, pass, &c, g_pool) != 0) {
                    snprintf(why, len, "the CPU fallback failed");
                    ms_merge_state_close(st);
                    return -1;
                }
            }
        }
        ms_merge_pass_finish(st, p, pass);
    }
    ms_merge_state_close(st);
    return fallbacks;
}

/* A backend capped at 1 MiB: a tensor of 8 MiB of inputs gets GPU_OOM on
 * every call, with the state untouched, and the CPU finishes it. */
static void test_tiny_limit(void **state)
{
    (void)state;
    char msg[256], why[512];
    gpu_backend *b = NULL;
    assert_int_equal(gpu_backend_open(0, 1u << 20, &b, msg, sizeof msg), 0);
    static const variant vs[] = {V_SLERP, V_NUSLERP_COLS, V_STOCK_ROWS, V_RAMPLUS, V_SCE, V_FUSION};
    for (unsigned k = 0; k < sizeof vs / sizeof vs[0]; k++) {
        gcase gc;
        case_make(&gc, vs[k], 1024, 1024, FL_PLAIN);
        if (gc.v == V_SCE)
            gc.p.select_topk = 0.3;
        for (unsigned i = 0; i <= gc.p.n_models; i++) { /* 4 MiB per input: over the cap */
            if (!gc.in[i] || gc.p.in_dtype[i] == ST_F32)
                continue;
            float *wide = xmalloc(gc.p.numel * sizeof(float));
            for (uint64_t e = 0; e < gc.p.numel; e++)
                wide[e] = ref_load(gc.in[i], gc.p.in_dtype[i], e);
            free(gc.in[i]);
            gc.in[i] = wide;
            gc.p.in_dtype[i] = ST_F32;
        }
        size_t osz = ref_dtype_size(gc.p.out_dtype);
        unsigned char *want = malloc(gc.p.numel * osz), *got = malloc(gc.p.numel * osz);
        assert_non_null(want);
        assert_non_null(got);
        check_lockstep(g_gpu, &gc, 0, "tiny limit reference", want);
        long fb = run_with_fallback(b, &gc, 600, got, why, sizeof why);
        if (fb < 0)
            fail_case(&gc, "1 MiB limit", why);
        if (fb == 0)
            fail_case(&gc, "1 MiB limit", "no call returned GPU_OOM");
        if (output_diff(want, got, gc.p.out_dtype, 0, gc.p.numel, NULL, why, sizeof why))
            fail_case(&gc, "1 MiB limit, CPU fallback", why);
        free(want);
        free(got);
        case_free(&gc);
    }
    gpu_backend_close(b);
}

/* The fault walk's scenario: methods that together use every pass kind and
 * every kernel, each in chunks of about a third of its rows. Runs in a child
 * whose MERGESTREAM_FAULT fails some device allocations. */
static int child_walk(void)
{
    char why[512], desc[2048];
    gpu_backend *b = NULL;
    if (gpu_backend_open(0, 0, &b, why, sizeof why) != 0)
        return CHILD_NO_GPU;
    long total = 0;
    static const struct {
        variant v;
        uint64_t rows, cols, height;
    } sc[] = {
        {V_SLERP, 40, 3000, 15},      {V_NUSLERP_COLS, 70001, 2, 30000}, {V_NUSLERP_ROWS, 30, 500, 11},
        {V_STOCK_ROWS, 12, 900, 5},   {V_RAMPLUS, 30, 2000, 13},         {V_KARCHER, 25, 777, 9},
        {V_SCE, 30, 3000, 11},        {V_FUSION, 20, 1500, 7},
    };
    for (unsigned k = 0; k < sizeof sc / sizeof sc[0]; k++) {
        gcase gc;
        case_make(&gc, sc[k].v, sc[k].rows, sc[k].cols, FL_PLAIN);
        if (gc.v == V_SLERP && (gc.p.t == 0.0 || gc.p.t == 1.0))
            gc.p.t = 0.25; /* keep the GRAM pass */
        if (gc.v == V_SCE)
            gc.p.select_topk = 0.3; /* keep the KEY passes */
        size_t osz = ref_dtype_size(gc.p.out_dtype);
        unsigned char *want = malloc(gc.p.numel * osz), *got = malloc(gc.p.numel * osz);
        if (!want || !got)
            return CHILD_FAIL;
        ms_merge_state *st = NULL;
        if (ms_merge_state_open(&gc.p, &st) != 0)
            return CHILD_FAIL;
        for (unsigned pass = 0; pass < st->n_passes; pass++) { /* the CPU-only reference */
            ms_chunk c = case_chunk(&gc, 0, gc.p.rows, want);
            if (cpu_merge_run_pass(&gc.p, st, pass, &c, g_pool) != 0)
                return CHILD_FAIL;
            ms_merge_pass_finish(st, &gc.p, pass);
        }
        ms_merge_state_close(st);
        long fb = run_with_fallback(b, &gc, sc[k].height, got, why, sizeof why);
        case_describe(&gc, desc, sizeof desc);
        if (fb < 0) {
            printf("child (MERGESTREAM_FAULT=%s): %s\n    case: %s\n", getenv("MERGESTREAM_FAULT"), why, desc);
            return CHILD_FAIL;
        }
        if (output_diff(want, got, gc.p.out_dtype, 0, gc.p.numel, NULL, why, sizeof why)) {
            printf("child (MERGESTREAM_FAULT=%s): after %ld fallbacks %s\n    case: %s\n",
                   getenv("MERGESTREAM_FAULT"), fb, why, desc);
            return CHILD_FAIL;
        }
        total += fb;
        free(want);
        free(got);
        case_free(&gc);
    }
    gpu_backend_close(b);
    return total ? CHILD_OK_FALLBACK : CHILD_OK;
}

/* Runs this program as a child in mode `mode` with MERGESTREAM_FAULT=fault.
 * Returns its exit code (128 + signal when killed). */
static int spawn_child(const char *mode, const char *fault)
{
    char e_mode[64], e_seed[64], e_fault[128];
    snprintf(e_mode, sizeof e_mode, "%s=%s", CHILD_ENV, mode);
    snprintf(e_seed, sizeof e_seed, "MS_TEST_SEED=%" PRIu64, g_seed);
    snprintf(e_fault, sizeof e_fault, "MERGESTREAM_FAULT=%s", fault);
    size_t n_env = 0;
    while (environ[n_env])
        n_env++;
    char **envp = xmalloc((n_env + 4) * sizeof *envp);
    size_t k = 0;
    envp[k++] = e_mode;
    envp[k++] = e_seed;
    envp[k++] = e_fault;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, CHILD_ENV "=", strlen(CHILD_ENV) + 1) != 0 && strncmp(*e, "MS_TEST_SEED=", 13) != 0 &&
            strncmp(*e, "MERGESTREAM_FAULT=", 18) != 0)
            envp[k++] = *e;
    envp[k] = NULL;
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        free(envp);
        return -1;
    }
    self[n] = '\0';
    char *argv[] = {self, NULL};
    pid_t pid;
    int spawned = posix_spawn(&pid, self, NULL, NULL, argv, envp);
    free(envp);
    if (spawned != 0)
        return -1;
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* SQLite style: gpu_alloc:N for N = 1, 2, ... until a run needs no
 * fallback; every run gives the CPU-only bytes. Then every request failing. */
static void test_fault_walk(void **state)
{
    (void)state;
    unsigned n;
    for (n = 1; n <= 400; n++) {
        char fault[64];
        snprintf(fault, sizeof fault, "gpu_alloc:%u", n);
        int rc = spawn_child("walk", fault);
        if (rc == CHILD_OK)
            break;
        if (rc != CHILD_OK_FALLBACK)
            fail_msg("MERGESTREAM_FAULT=%s: child exited %d (0 or 10 expected; its output is above)", fault, rc);
    }
    if (n > 400)
        fail_msg("gpu_alloc walk: every run up to N = 400 still fell back");
    if (n == 1)
        fail_msg("MERGESTREAM_FAULT=gpu_alloc:1 made no call fall back: the GPU calls allocate nothing?");
    printf("fault walk: gpu_alloc:1..%u each fell back and gave the CPU's bytes\n", n - 1);
    int rc = spawn_child("walk", "gpu_alloc:1+");
    if (rc != CHILD_OK_FALLBACK)
        fail_msg("MERGESTREAM_FAULT=gpu_alloc:1+: child exited %d, expected %d (every call falls back)", rc,
                 CHILD_OK_FALLBACK);
}

int main(void)
{
    const char *seed_env = getenv("MS_TEST_SEED");
    g_seed = seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL);
    g_rng = g_seed;
    const char *child = getenv(CHILD_ENV);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (unsigned)ncpu;
    if (cpu_pool_open(threads, &g_pool) != 0) {
        printf("cannot start %u CPU threads\n", threads);
        return 1;
    }
    if (child) {
        int rc = strcmp(child, "walk") == 0 ? child_walk() : CHILD_FAIL;
        cpu_pool_close(g_pool);
        return rc;
    }
    printf("test_gpu_merge_interp: seed %" PRIu64 " (MS_TEST_SEED replays)\n", g_seed);
    char why[256];
    if (gpu_backend_open(0, 0, &g_gpu, why, sizeof why) != 0) {
        printf("SKIP: no usable GPU (%s)\n", why);
        cpu_pool_close(g_pool);
        return 77;
    }
    printf("device: %s\n", gpu_backend_device_name(g_gpu));
    fflush(stdout);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_supports),
        cmocka_unit_test(test_slerp),
        cmocka_unit_test(test_nuslerp_flatten),
        cmocka_unit_test(test_nuslerp_rows),
        cmocka_unit_test(test_nuslerp_cols),
        cmocka_unit_test(test_multislerp),
        cmocka_unit_test(test_karcher),
        cmocka_unit_test(test_model_stock),
        cmocka_unit_test(test_model_stock_filter_wise),
        cmocka_unit_test(test_nearswap),
        cmocka_unit_test(test_ram),
        cmocka_unit_test(test_ramplus_tl),
        cmocka_unit_test(test_sce),
        cmocka_unit_test(test_sce_ties),
        cmocka_unit_test(test_arcee_fusion),
        cmocka_unit_test(test_large),
        cmocka_unit_test(test_chunk_bytes_bound),
        cmocka_unit_test(test_tiny_limit),
        cmocka_unit_test(test_fault_walk),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpu_pool_close(g_pool);
    gpu_backend_close(g_gpu);
    return rc;
}

#endif
