/* The CPU merge kernels (see cpu_merge.h; the semantics are in
 * pipeline/merge_passes.h and pipeline/merge_math.h).
 *
 * Structure: a chunk is cut into windows; each window is processed like a
 * chunk of its own (so the carried state - open L1 block, eq_seen - is updated
 * per window). Inside a window the elements are cut into tasks of whole
 * 65,536-element blocks (global alignment), so every L1 block is summed by
 * one task, in order; della's row work is cut into tasks of whole rows. Each
 * task walks its range in tiles of CPU_TILE elements (one row for della),
 * with separate, vectorisable loops per step. */
#include "cpu/cpu_merge.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_capture.h"
#include "cpu/cpu_arena.h"
#include "cpu/cpu_kernel.h"
#include "cpu/cpu_split.h"
#include "cpu/cpu_merge_hessian.h"
#include "cpu/cpu_merge_interp.h"
#include "pipeline/merge_math.h"
#include "pipeline/merge_passes_hessian.h"
#include "pipeline/merge_passes_interp.h"

#define CPU_TILE 1024u                       /* elements per tile */
#define CPU_TASKS_PER_WORKER 4u              /* load balance */
#define CPU_WINDOW_ELEMS (256ull * MS_MERGE_BLOCK) /* element windows: 2^24 */
#define CPU_DELLA_WINDOW_ELEMS (1ull << 22)  /* della L1 windows (whole rows): mask bytes */
#define HIST_SUBS 4u                         /* HIST_HI sub-histograms per worker */
#define HIST_WORDS (2u * MS_MERGE_LO_BINS)   /* uint32 counters per worker: max(HI, LO) use */

/* Window sizes; only cpu_merge_set_windows_for_tests changes them (before any
 * pass runs, from the one test thread). */
static uint64_t g_window_elems = CPU_WINDOW_ELEMS;
static uint64_t g_della_window_elems = CPU_DELLA_WINDOW_ELEMS;

void cpu_merge_set_windows_for_tests(uint64_t elems, uint64_t della_elems)
{
    g_window_elems = elems ? elems : CPU_WINDOW_ELEMS;
    g_della_window_elems = della_elems ? della_elems : CPU_DELLA_WINDOW_ELEMS;
}

/* ============================================================ scratch */

/* One worker's private buffers. span >= CPU_TILE, and >= cols for della. */
typedef struct cpu_scratch {
    size_t span;
    float *base;    /* [span] base values */
    float *x;       /* [span] an input, then its delta */
    float *out;     /* [span] merged values */
    float *t0, *t1, *t2, *t3; /* [span] combine temporaries */
    float *W;       /* [n_models][span]: model i's row is W + (i - 1) * span */
    uint32_t *key;  /* [span] */
    uint32_t *rnd;  /* [span] philox words */
    uint8_t *keep;  /* [span] */
    uint32_t *hist; /* [HIST_WORDS] (histogram passes) */
    bool hist_used;  /* hist holds counts of the histogram run in progress (run_hist) */
    bool hist_clean; /* hist is all zero (folded and cleared, or never written since a memset) */
    uint32_t *capture_key, *capture_index; /* [span + CPU_CAPTURE_SLACK] (histogram passes): one tile's capture */
    uint64_t *sort_a, *sort_b, *thr; /* [cols] (della) */
} cpu_scratch;

/* Sizes of everything one cpu_merge_run_pass allocates. */
typedef struct cpu_layout {
    size_t span;
    bool hist, della;
    uint64_t cols;
    unsigned n_models, n_workers;
    uint64_t worker_bytes; /* per worker, CPU_ARENA_ALIGN multiple */
    uint64_t max_tasks;    /* per window */
    uint64_t max_blocks;   /* blocks a window touches */
    uint64_t mask_bytes;   /* della L1 mask */
    uint64_t total;        /* everything, the cpu_scratch array included */
} cpu_layout;

/* Fills lay for p and chunks of at most max_elems elements. False when the
 * sizes overflow. */
static bool layout_compute(const ms_tensor_params *p, bool hist, bool della, unsigned n_workers, uint64_t max_elems,
                           cpu_layout *lay)
{
    memset(lay, 0, sizeof *lay);
    lay->hist = hist;
    lay->della = della;
    lay->cols = p->cols;
    lay->n_models = p->n_models;
    lay->n_workers = n_workers;
    uint64_t span = CPU_TILE;
    if (della && p->cols > span)
        span = p->cols;
    if (span > SIZE_MAX / 64)
        return false;
    lay->span = (size_t)span;
    /* the arrays ctx_alloc carves, one by one (each aligned) */
    uint64_t w = 0;
    bool ok = true;
    for (int k = 0; k < 7; k++) /* base, x, out, t0..t3 */
        ok = ok && cpu_arena_add(&w, span, sizeof(float));
    ok = ok && cpu_arena_add(&w, (uint64_t)p->n_models * span, sizeof(float)) && /* W */
         cpu_arena_add(&w, span, sizeof(uint32_t)) && cpu_arena_add(&w, span, sizeof(uint32_t)) && /* key, rnd */
         cpu_arena_add(&w, span, 1); /* keep */
    if (hist)
        ok = ok && cpu_arena_add(&w, HIST_WORDS, sizeof(uint32_t)) && /* hist, capture_key, capture_index */
             cpu_arena_add(&w, span + CPU_CAPTURE_SLACK, sizeof(uint32_t)) &&
             cpu_arena_add(&w, span + CPU_CAPTURE_SLACK, sizeof(uint32_t));
    for (int k = 0; k < 3 && della; k++) /* sort_a, sort_b, thr */
        ok = ok && cpu_arena_add(&w, p->cols ? p->cols : 1, sizeof(uint64_t));
    if (!ok)
        return false;
    lay->worker_bytes = w;
    /* element windows: at most CPU_WINDOW_ELEMS; della windows: whole rows */
    uint64_t win = g_window_elems;
    if (della) {
        win = g_della_window_elems > p->cols ? g_della_window_elems : p->cols;
        lay->mask_bytes = win < max_elems ? win : max_elems;
    }
    if (win > max_elems)
        win = max_elems ? max_elems : 1;
    lay->max_blocks = win / MS_MERGE_BLOCK + 2;
    lay->max_tasks = (uint64_t)n_workers * CPU_TASKS_PER_WORKER; /* bound of part_elems and part_rows */
    uint64_t total = 0;
    ok = cpu_arena_add(&total, n_workers, sizeof(cpu_scratch)) && cpu_arena_add(&total, n_workers, w) &&
         cpu_arena_add(&total, lay->max_tasks * (MS_MAX_MODELS + 1) * 2, sizeof(uint64_t)) &&
         cpu_arena_add(&total, (uint64_t)(MS_MAX_MODELS + 1) * lay->max_blocks, sizeof(double)) &&
         cpu_arena_add(&total, (uint64_t)(MS_MAX_MODELS + 1) * lay->max_blocks, sizeof(double)) &&
         cpu_arena_add(&total, lay->mask_bytes, 1);
    if (della) /* per-rank thresholds */
        ok = ok && cpu_arena_add(&total, (uint64_t)p->n_models * (p->cols ? p->cols : 1), sizeof(uint64_t));
    lay->total = total;
    return ok;
}

/* ============================================================ context */

typedef struct cpu_ctx {
    const ms_tensor_params *p;
    ms_merge_state *st;
    const ms_chunk *c;
    cpu_layout lay;
    void *mem;             /* owns everything below */
    cpu_scratch *scratch;  /* [n_workers] */
    uint64_t *eq;          /* [max_tasks][MS_MAX_MODELS + 1][2]: counts, then start positions */
    double *blk_delta;     /* [MS_MAX_MODELS + 1][max_blocks] */
    double *blk_tau;       /* [MS_MAX_MODELS + 1][max_blocks] */
    uint8_t *mask;         /* [mask_bytes] della L1: keep flags of one model for the window */
    uint64_t *della_thr;   /* [n_models][cols] della: threshold by 0-based rank (model i: row i - 1) */
    float plain_div;       /* without consensus: fixed sum_i w_i */
    float wsum;            /* linear: sum_i w_i */
    cpu_split sp;          /* the current window and its cut into tasks */
    unsigned model;        /* per-model runs: the model (1-based) */
    unsigned model_b;      /* HIST_HI: a second model counted in the same sweep, or 0 */
    bool hist_hi_run;      /* run_hist: HIST_HI (else HIST_LO) */
    bool l1_models[MS_MAX_MODELS + 1]; /* L1 sums run: models summed */
    bool l1_use_mask;      /* L1 sums: keep flags come from mask (della) */
} cpu_ctx;

static uint64_t *ctx_eq(const cpu_ctx *x, unsigned task, unsigned model)
{
    return &x->eq[((uint64_t)task * (MS_MAX_MODELS + 1) + model) * 2];
}

static const uint64_t *ctx_della_thr(const cpu_ctx *x, unsigned model)
{
    return x->della_thr + (uint64_t)(model - 1) * x->lay.cols;
}

static double *ctx_blk(double *base, const cpu_ctx *x, unsigned model)
{
    return base + (uint64_t)model * x->lay.max_blocks;
}

static int ctx_alloc(cpu_ctx *x)
{
    const cpu_layout *lay = &x->lay;
    unsigned char *mem = aligned_alloc(CPU_ARENA_ALIGN, (size_t)lay->total);
    if (!mem)
        return -ENOMEM;
    x->mem = mem;
    uint64_t off = 0;
    x->scratch = (cpu_scratch *)(mem + off);
    off += cpu_arena_align((uint64_t)lay->n_workers * sizeof(cpu_scratch));
    for (unsigned w = 0; w < lay->n_workers; w++) {
        cpu_scratch *s = &x->scratch[w];
        unsigned char *q = mem + off;
        size_t span = lay->span;
        uint64_t o = 0;
#define CARVE(ptr, type, count) CPU_ARENA_CARVE(ptr, type, count, q, o)
        s->span = span;
        CARVE(s->base, float, span);
        CARVE(s->x, float, span);
        CARVE(s->out, float, span);
        CARVE(s->t0, float, span);
        CARVE(s->t1, float, span);
        CARVE(s->t2, float, span);
        CARVE(s->t3, float, span);
        CARVE(s->W, float, (uint64_t)lay->n_models * span);
        CARVE(s->key, uint32_t, span);
        CARVE(s->rnd, uint32_t, span);
        CARVE(s->keep, uint8_t, span);
        s->hist = NULL;
        s->hist_used = s->hist_clean = false;
        s->capture_key = s->capture_index = NULL;
        s->sort_a = s->sort_b = s->thr = NULL;
        if (lay->hist) {
            CARVE(s->hist, uint32_t, HIST_WORDS);
            CARVE(s->capture_key, uint32_t, span + CPU_CAPTURE_SLACK);
            CARVE(s->capture_index, uint32_t, span + CPU_CAPTURE_SLACK);
        }
        if (lay->della) {
            uint64_t cols = lay->cols ? lay->cols : 1;
            CARVE(s->sort_a, uint64_t, cols);
            CARVE(s->sort_b, uint64_t, cols);
            CARVE(s->thr, uint64_t, cols);
        }
#undef CARVE
        CPU_ASSERT(o <= lay->worker_bytes);
        off += lay->worker_bytes;
    }
    x->eq = (uint64_t *)(mem + off);
    off += cpu_arena_align(lay->max_tasks * (MS_MAX_MODELS + 1) * 2 * sizeof(uint64_t));
    x->blk_delta = (double *)(mem + off);
    off += cpu_arena_align((uint64_t)(MS_MAX_MODELS + 1) * lay->max_blocks * sizeof(double));
    x->blk_tau = (double *)(mem + off);
    off += cpu_arena_align((uint64_t)(MS_MAX_MODELS + 1) * lay->max_blocks * sizeof(double));
    x->mask = lay->mask_bytes ? mem + off : NULL;
    off += cpu_arena_align(lay->mask_bytes);
    x->della_thr = NULL;
    if (lay->della) {
        x->della_thr = (uint64_t *)(mem + off);
        off += cpu_arena_align((uint64_t)lay->n_models * (lay->cols ? lay->cols : 1) * sizeof(uint64_t));
    }
    CPU_ASSERT(off <= lay->total);
    return 0;
}

/* ========================================================= load / store */

/* The tile kernels are the hot loops: gcc vectorises them and CPU_CLONES
 * (cpu/cpu_kernel.h) compiles them for AVX-512 and AVX2. */
#define CPU_INLINE static inline __attribute__((always_inline))

/* Element j of raw little-endian src of dtype dt (a constant where inlined)
 * widened to fp32. BF16 is widened by a shift alone: a signalling NaN stays
 * signalling here, which cannot show in a result: every widened value only
 * enters arithmetic (x - b, base + mixed, w * x), which quiets it, and every
 * NaN a kernel writes or ranks is canonical (ms_merge_delta, ms_merge_store_*). */
CPU_INLINE float widen_at(const unsigned char *src, st_dtype dt, size_t j)
{
    if (dt == ST_F32) {
        float f;
        memcpy(&f, src + 4 * j, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, src + 2 * j, 2);
    if (dt == ST_BF16)
        return ms_f32_from_bits((uint32_t)h << 16);
    return ms_f16_to_f32(h);
}

CPU_INLINE void widen_body(float *restrict dst, const unsigned char *restrict src, st_dtype dt, size_t n)
{
    for (size_t j = 0; j < n; j++)
        dst[j] = widen_at(src, dt, j);
}

/* dst[j] = element off + j of src (dtype dt) widened to fp32. */
CPU_CLONES static void load_f32(float *dst, const void *src, st_dtype dt, uint64_t off, size_t n)
{
    switch (dt) {
    case ST_F32:
        memcpy(dst, (const unsigned char *)src + off * 4, n * sizeof(float));
        break;
    case ST_BF16:
        widen_body(dst, (const unsigned char *)src + off * 2, ST_BF16, n);
        break;
    case ST_F16:
        widen_body(dst, (const unsigned char *)src + off * 2, ST_F16, n);
        break;
    default:
        CPU_ASSERT(!"input dtype is not F16, BF16 or F32");
    }
}

/* The magnitude key of the canonical delta of dv = x - b: ms_merge_key(ms_merge_canon(dv))
 * in integer operations (a NaN's key is the canonical NaN's). */
CPU_INLINE uint32_t delta_key(float dv)
{
    uint32_t k = ms_f32_bits(dv) & 0x7fffffffu;
    return k > 0x7f800000u ? MS_F32_CANON_NAN : k;
}

/* One loop over n elements: dv = widened src[j] - base[j]; d[j] =
 * ms_merge_delta (when want_d), key[j] = its magnitude key (when want_key). */
CPU_INLINE void delta_keys_body(const float *restrict base, const unsigned char *restrict src, st_dtype dt, size_t n,
                                float *restrict d, uint32_t *restrict key, bool want_d, bool want_key)
{
    for (size_t j = 0; j < n; j++) {
        float dv = widen_at(src, dt, j) - base[j];
        if (want_d)
            d[j] = ms_merge_canon(dv);
        if (want_key)
            key[j] = delta_key(dv);
    }
}

#define DELTA_KEYS_DT(dt)                                                                                  \
    do {                                                                                                   \
        if (d && key)                                                                                      \
            delta_keys_body(base, s, dt, n, d, key, true, true);                                           \
        else if (d)                                                                                        \
            delta_keys_body(base, s, dt, n, d, key, true, false);                                          \
        else                                                                                               \
            delta_keys_body(base, s, dt, n, d, key, false, true);                                          \
    } while (0)

/* The deltas (d, may be NULL) and magnitude keys (key, may be NULL) of
 * elements off.. of src (dtype dt) against the widened base tile. */
CPU_CLONES static void delta_keys(const float *base, const void *src, st_dtype dt, uint64_t off, size_t n, float *d,
                                  uint32_t *key)
{
    switch (dt) {
    case ST_F32: {
        const unsigned char *s = (const unsigned char *)src + off * 4;
        DELTA_KEYS_DT(ST_F32);
        break;
    }
    case ST_BF16: {
        const unsigned char *s = (const unsigned char *)src + off * 2;
        DELTA_KEYS_DT(ST_BF16);
        break;
    }
    case ST_F16: {
        const unsigned char *s = (const unsigned char *)src + off * 2;
        DELTA_KEYS_DT(ST_F16);
        break;
    }
    default:
        CPU_ASSERT(!"input dtype is not F16, BF16 or F32");
    }
}
#undef DELTA_KEYS_DT

/* Stores v rounded once to dt (NaN canonical) as element j of dst. */
CPU_INLINE void store_at(unsigned char *dst, st_dtype dt, size_t j, float v)
{
    if (dt == ST_F32) {
        uint32_t u = ms_merge_store_f32(v);
        memcpy(dst + 4 * j, &u, 4);
    } else {
        uint16_t h = dt == ST_BF16 ? ms_merge_store_bf16(v) : ms_merge_store_f16(v);
        memcpy(dst + 2 * j, &h, 2);
    }
}

CPU_INLINE void store_body(unsigned char *restrict dst, st_dtype dt, const float *restrict src, size_t n)
{
    for (size_t j = 0; j < n; j++)
        store_at(dst, dt, j, src[j]);
}

/* Rounds src[0..n) once to dt (NaN canonical) into element off.. of dst. */
CPU_CLONES static void store_out(void *dst, st_dtype dt, uint64_t off, const float *src, size_t n)
{
    switch (dt) {
    case ST_F32:
        store_body((unsigned char *)dst + off * 4, ST_F32, src, n);
        break;
    case ST_BF16:
        store_body((unsigned char *)dst + off * 2, ST_BF16, src, n);
        break;
    case ST_F16:
        store_body((unsigned char *)dst + off * 2, ST_F16, src, n);
        break;
    default:
        CPU_ASSERT(!"output dtype is not F16, BF16 or F32");
    }
}

/* Loads model i's delta for flat elements [e, e + n) into d, against the
 * widened base tile. */
static void load_delta(const cpu_ctx *x, unsigned i, uint64_t e, size_t n, const float *base, float *d)
{
    delta_keys(base, x->c->in[i], x->p->in_dtype[i], e - x->c->elem0, n, d, NULL);
}

static void load_base(const cpu_ctx *x, uint64_t e, size_t n, float *base)
{
    load_f32(base, x->c->in[0], x->p->in_dtype[0], e - x->c->elem0, n);
}

/* Model i's selection keys of elements [e, e + n) (tile_keys' keys) into
 * key, and its deltas into d when d is not NULL, against the widened base
 * tile; d_tmp: a tile for the deltas when d is NULL and the keys need them
 * (Hessian saliency keys). */
static void load_keys(const cpu_ctx *x, unsigned i, uint64_t e, size_t n, const float *base, float *d, float *d_tmp,
                      uint32_t *key);

/* ============================================================= keep */

#define PHILOX_LANES 16u /* counters computed side by side: the lane loops vectorise */

/* u[j] = model's philox word of element e0 + j (ms_merge_philox_word). */
static void philox_fill(const uint32_t key[2], uint32_t model, uint64_t e0, size_t n, uint32_t *u)
{
    if (n == 0)
        return;
    uint32_t rk0[10], rk1[10];
    for (int r = 0; r < 10; r++)
        ms_philox4x32_round_key(key, r, &rk0[r], &rk1[r]);
    uint64_t g = e0 >> 2, g_end = ((e0 + n - 1) >> 2) + 1; /* counter groups of 4 elements */
    for (; g < g_end; g += PHILOX_LANES) {
        uint32_t c0[PHILOX_LANES], c1[PHILOX_LANES], c2[PHILOX_LANES], c3[PHILOX_LANES];
        for (unsigned l = 0; l < PHILOX_LANES; l++) { /* lanes independent: vectorises */
            uint32_t a0 = (uint32_t)(g + l), a1 = (uint32_t)((g + l) >> 32), a2 = model, a3 = 0;
            for (int r = 0; r < 10; r++)
                ms_philox4x32_round(&a0, &a1, &a2, &a3, rk0[r], rk1[r]);
            c0[l] = a0;
            c1[l] = a1;
            c2[l] = a2;
            c3[l] = a3;
        }
        const uint32_t *words[4] = {c0, c1, c2, c3};
        for (unsigned l = 0; l < PHILOX_LANES && g + l < g_end; l++) {
            for (unsigned w = 0; w < 4; w++) {
                uint64_t e = (g + l) * 4 + w;
                if (e >= e0 && e < e0 + n)
                    u[e - e0] = words[w][l];
            }
        }
    }
}

/* Selection keys of model i's elements [e, e + n) with deltas d: the
 * magnitude key, or the saliency key where the model has Hessian
 * coefficients (ties_sparsegpt, dare_sparsegpt; cpu_merge_hessian.c). */
static void tile_keys(const cpu_ctx *x, unsigned i, uint64_t e, size_t n, const float *d, uint32_t *key)
{
    const float *u = x->st->hessian ? x->st->hessian->u[i] : NULL;
    if (u) {
        cpu_merge_hessian_keys(u, x->p->cols, e, n, d, key);
        return;
    }
    for (size_t j = 0; j < n; j++)
        key[j] = ms_merge_key(d[j]);
}

static void load_keys(const cpu_ctx *x, unsigned i, uint64_t e, size_t n, const float *base, float *d, float *d_tmp,
                      uint32_t *key)
{
    const void *src = x->c->in[i];
    st_dtype dt = x->p->in_dtype[i];
    uint64_t off = e - x->c->elem0;
    if (x->st->hessian && x->st->hessian->u[i]) {
        float *dd = d ? d : d_tmp;
        delta_keys(base, src, dt, off, n, dd, NULL);
        tile_keys(x, i, e, n, dd, key);
    } else {
        delta_keys(base, src, dt, off, n, d, key);
    }
}

/* keep[j] for model i's elements [e, e + n) with deltas d (not DELLA).
 * pos[b]: eq_pos of the first element for split bounds; advanced past the
 * tile. keys: the tile's keys from load_keys, or NULL (then computed here
 * from d). */
CPU_CLONES static void tile_keep(const cpu_ctx *x, cpu_scratch *s, unsigned i, uint64_t e, size_t n, const float *d,
                                 uint64_t pos[2], const uint32_t *keys)
{
    const ms_merge_model *m = &x->st->model[i];
    uint8_t *keep = s->keep;
    const uint32_t *key = s->key;
    bool magnitude_keys = keys && !(x->st->hessian && x->st->hessian->u[i]);
    switch (m->sel) {
    case MS_MERGE_SEL_ALL:
        memset(keep, 1, n);
        break;
    case MS_MERGE_SEL_NONE:
        memset(keep, 0, n);
        break;
    case MS_MERGE_SEL_RANDOM: {
        /* d < 1: the threshold fits 32 bits, so the compare can be 32-bit (it vectorises) */
        CPU_ASSERT(m->random_threshold <= UINT32_MAX);
        uint32_t thr = (uint32_t)m->random_threshold;
        const uint32_t *rnd = s->rnd;
        philox_fill(x->p->philox_key, i - 1, e, n, s->rnd);
        for (size_t j = 0; j < n; j++)
            keep[j] = rnd[j] < thr; /* ms_merge_random_keep */
        break;
    }
    case MS_MERGE_SEL_TOP: {
        CPU_ASSERT(n <= CPU_TILE);
        const ms_merge_bound *b = &m->bound[0];
        uint32_t t = b->key;
        uint64_t take = b->take;
        if (keys)
            key = keys;
        else
            tile_keys(x, i, e, n, d, s->key);
        uint64_t q = b->split ? pos[0] : 0;
        uint32_t eq = 0; /* n <= CPU_TILE */
        if (b->split)
            for (size_t j = 0; j < n; j++)
                eq += key[j] == t;
        if (!b->split || q >= take || q + eq <= take) {
            /* eq_pos is on one side of take for the whole tile */
            uint64_t q_any = q < take ? 0 : take;
            for (size_t j = 0; j < n; j++)
                keep[j] = ms_merge_sel_upper(key[j], q_any, t, take);
        } else {
            for (size_t j = 0; j < n; j++) {
                keep[j] = ms_merge_sel_upper(key[j], q, t, take);
                q += key[j] == t;
            }
        }
        if (b->split)
            pos[0] += eq;
        break;
    }
    case MS_MERGE_SEL_BAND: {
        CPU_ASSERT(n <= CPU_TILE);
        const ms_merge_bound *lo = &m->bound[0], *hi = &m->bound[1];
        if (magnitude_keys)
            key = keys;
        else
            for (size_t j = 0; j < n; j++)
                s->key[j] = ms_merge_key(d[j]);
        uint32_t t0 = lo->key, t1 = hi->key;
        uint64_t take0 = lo->take, take1 = hi->take;
        uint64_t q0 = lo->split ? pos[0] : 0, q1 = hi->split ? pos[1] : 0;
        uint32_t eq0 = 0, eq1 = 0; /* n <= CPU_TILE */
        if (lo->split)
            for (size_t j = 0; j < n; j++)
                eq0 += key[j] == t0;
        if (hi->split)
            for (size_t j = 0; j < n; j++)
                eq1 += key[j] == t1;
        bool uniform0 = !lo->split || q0 >= take0 || q0 + eq0 <= take0;
        bool uniform1 = !hi->split || q1 >= take1 || q1 + eq1 <= take1;
        if (uniform0 && uniform1) {
            /* eq_pos is on one side of take for the whole tile, for both edges */
            uint64_t a0 = q0 < take0 ? 0 : take0, a1 = q1 < take1 ? 0 : take1;
            for (size_t j = 0; j < n; j++)
                keep[j] = !ms_merge_sel_lower(key[j], a0, t0, take0) && ms_merge_sel_lower(key[j], a1, t1, take1);
        } else {
            for (size_t j = 0; j < n; j++) {
                keep[j] = !ms_merge_sel_lower(key[j], q0, t0, take0) && ms_merge_sel_lower(key[j], q1, t1, take1);
                q0 += lo->split && key[j] == t0;
                q1 += hi->split && key[j] == t1;
            }
        }
        if (lo->split)
            pos[0] += eq0;
        if (hi->split)
            pos[1] += eq1;
        break;
    }
    case MS_MERGE_SEL_DELLA:
        CPU_ASSERT(!"della keeps are computed per row");
    }
}

#define RADIX_BITS 11u
#define RADIX_PASSES 3u /* 31 key bits */

/* Stable LSD radix sort of a[0..n) (n >= 1) on the 31 bits from lo_bit, 11
 * bits a pass; all digit histograms in one sweep. Returns the buffer (a or
 * tmp) holding the sorted values. */
static uint64_t *radix_sort(uint64_t *a, uint64_t *tmp, size_t n, unsigned lo_bit)
{
    uint32_t count[RADIX_PASSES][1u << RADIX_BITS];
    memset(count, 0, sizeof count);
    for (size_t j = 0; j < n; j++) {
        uint64_t v = a[j] >> lo_bit;
        count[0][v & 2047u]++;
        count[1][(v >> 11) & 2047u]++;
        count[2][(v >> 22) & 2047u]++;
    }
    for (unsigned pass = 0; pass < RADIX_PASSES; pass++) {
        unsigned shift = lo_bit + pass * RADIX_BITS;
        uint32_t *c = count[pass];
        if (c[(a[0] >> shift) & 2047u] == n)
            continue; /* one digit value: this pass would not move anything */
        uint32_t sum = 0;
        for (unsigned k = 0; k < (1u << RADIX_BITS); k++) {
            uint32_t v = c[k];
            c[k] = sum;
            sum += v;
        }
        for (size_t j = 0; j < n; j++)
            tmp[c[(a[j] >> shift) & 2047u]++] = a[j];
        uint64_t *swap = a;
        a = tmp;
        tmp = swap;
    }
    return a;
}

/* della_magprune's keep flags for model i's row `row` (cols deltas d) into
 * s->keep, thresholds from the per-rank table. */
static void della_row_keep(const cpu_ctx *x, cpu_scratch *s, unsigned i, uint64_t row, const float *d)
{
    const ms_tensor_params *p = x->p;
    uint64_t cols = p->cols;
    unsigned cbits = 0;
    while (cbits < 64 && (cols - 1) >> cbits)
        cbits++;
    CPU_ASSERT(cbits <= 32 && cols <= UINT32_MAX);
    uint64_t cmask = cbits ? (((uint64_t)1 << cbits) - 1) : 0;
    /* ascending by key, ties by column: the values start in column order and
     * the sort is stable, so sorting on the key bits (above the column bits)
     * alone is enough */
    for (uint64_t col = 0; col < cols; col++)
        s->sort_a[col] = ((uint64_t)ms_merge_key(d[col]) << cbits) | col;
    const uint64_t *sorted = radix_sort(s->sort_a, s->sort_b, (size_t)cols, cbits);
    const uint64_t *by_rank = ctx_della_thr(x, i);
    for (uint64_t r = 0; r < cols; r++)
        s->thr[sorted[r] & cmask] = by_rank[r];
    philox_fill(p->philox_key, i - 1, row * cols, (size_t)cols, s->rnd);
    for (uint64_t col = 0; col < cols; col++)
        s->keep[col] = ms_merge_random_keep(s->rnd[col], s->thr[col]);
}

/* Model i's keep flags for a della row (any sel). */
static void row_keep(const cpu_ctx *x, cpu_scratch *s, unsigned i, uint64_t row, const float *d)
{
    const ms_merge_model *m = &x->st->model[i];
    if (m->sel == MS_MERGE_SEL_DELLA) {
        della_row_keep(x, s, i, row, d);
    } else {
        uint64_t pos[2] = {0, 0};
        tile_keep(x, s, i, row * x->p->cols, (size_t)x->p->cols, d, pos, NULL);
    }
}

/* ========================================================== combining */

/* W_i = w_i * tau over n elements, in place (W_i holds the deltas). */
CPU_CLONES static void tile_weigh(const cpu_ctx *x, const cpu_scratch *s, unsigned i, float *Wi, size_t n)
{
    float w = x->p->weight[i], f = x->st->model[i].factor;
    const uint8_t *keep = s->keep;
    for (size_t j = 0; j < n; j++)
        Wi[j] = w * ms_merge_tau(Wi[j], keep[j], f);
}

/* Step 5 and the store: element j of the output (dtype dt, dst at the
 * tile's first element) = ms_merge_finish(base, mixed, divisor) rounded once;
 * the divisor is the fixed div[j] with consensus, else plain_div. */
CPU_INLINE void finish_body(unsigned char *restrict dst, st_dtype dt, const float *restrict base,
                            const float *restrict mixed, const float *restrict div, float plain_div, bool consensus,
                            bool normalize, float lambda, size_t n)
{
    bool scale = lambda != 1.0f;
    for (size_t j = 0; j < n; j++) {
        /* ms_merge_finish with selects instead of branches (the same values) */
        float dv = consensus ? ms_merge_fix_consensus_divisor(div[j]) : plain_div;
        float mv = mixed[j];
        float q = mv / dv;
        mv = normalize ? q : mv;
        float l = mv * lambda;
        mv = scale ? l : mv;
        store_at(dst, dt, j, base[j] + mv);
    }
}

/* ms_merge_majority(s) and ms_merge_match(w_tau, majority) in integer masks
 * (gcc vectorises neither the branch nor the int-to-float conversion there):
 * the same values, +-1.0f and 1.0f or +0.0f. */
CPU_INLINE float majority_mask(float s)
{
    uint32_t up = 0u - (uint32_t)(s >= 0.0f);
    return ms_f32_from_bits(0x3f800000u | (~up & 0x80000000u));
}

CPU_INLINE float match_up(float w_tau, uint32_t up) /* up: all ones iff the majority is +1 */
{
    uint32_t pos = 0u - (uint32_t)(w_tau > 0.0f), neg = 0u - (uint32_t)(w_tau < 0.0f);
    return ms_f32_from_bits(((up & pos) | (~up & neg)) & 0x3f800000u);
}

CPU_INLINE float match_mask(float w_tau, float majority)
{
    return match_up(w_tau, 0u - (uint32_t)(majority > 0.0f));
}

/* Two models with consensus, every step in one loop (the operations and
 * their order are ms_merge_combine's); mixed[j] and div[j] (unfixed). */
CPU_INLINE void consensus2_body(const float *restrict W0, const float *restrict W1, float w0, float w1,
                                float *restrict mixed, float *restrict div, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        uint32_t up = 0u - (uint32_t)(W0[j] + W1[j] >= 0.0f); /* ms_merge_majority(S) > 0 */
        float m0 = match_up(W0[j], up), m1 = match_up(W1[j], up);
        mixed[j] = m0 * W0[j] + m1 * W1[j];
        div[j] = m0 * w0 + m1 * w1;
    }
}

/* The merged values of the tile from s->base and the W rows
 * (ms_merge_combine, model-outer so the element loops vectorise; the
 * operations and their order are the same), rounded once to dt and stored
 * at dst (the tile's first output element). */
CPU_CLONES static void tile_combine(const cpu_ctx *x, cpu_scratch *s, size_t n, unsigned char *dst, st_dtype dt)
{
    const ms_tensor_params *p = x->p;
    const float *w = &p->weight[1];
    unsigned nm = p->n_models;
    size_t span = s->span;
    const float *W = s->W, *base = s->base;
    float *mixed = s->t2, *div = s->t3;
    bool normalize = p->normalize;
    float lambda = p->lambda;
    if (p->consensus && nm == 2) {
        consensus2_body(W, W + span, w[0], w[1], mixed, div, n);
    } else if (p->consensus) {
        float *S = s->t0, *maj = s->t1;
        for (size_t j = 0; j < n; j++)
            S[j] = W[j];
        for (unsigned i = 1; i < nm; i++) {
            const float *Wi = W + i * span;
            for (size_t j = 0; j < n; j++)
                S[j] = S[j] + Wi[j];
        }
        for (size_t j = 0; j < n; j++)
            maj[j] = majority_mask(S[j]);
        float w0 = w[0];
        for (size_t j = 0; j < n; j++) {
            float m = match_mask(W[j], maj[j]);
            mixed[j] = m * W[j];
            div[j] = m * w0;
        }
        for (unsigned i = 1; i < nm; i++) {
            const float *Wi = W + i * span;
            float wi = w[i];
            for (size_t j = 0; j < n; j++) {
                float m = match_mask(Wi[j], maj[j]);
                mixed[j] = mixed[j] + m * Wi[j];
                div[j] = div[j] + m * wi;
            }
        }
    } else {
        for (size_t j = 0; j < n; j++)
            mixed[j] = W[j];
        for (unsigned i = 1; i < nm; i++) {
            const float *Wi = W + i * span;
            for (size_t j = 0; j < n; j++)
                mixed[j] = mixed[j] + Wi[j];
        }
    }
    bool cons = p->consensus;
    float pd = x->plain_div;
    switch (dt) {
    case ST_F32:
        if (cons)
            finish_body(dst, ST_F32, base, mixed, div, pd, true, normalize, lambda, n);
        else
            finish_body(dst, ST_F32, base, mixed, div, pd, false, normalize, lambda, n);
        break;
    case ST_BF16:
        if (cons)
            finish_body(dst, ST_BF16, base, mixed, div, pd, true, normalize, lambda, n);
        else
            finish_body(dst, ST_BF16, base, mixed, div, pd, false, normalize, lambda, n);
        break;
    case ST_F16:
        if (cons)
            finish_body(dst, ST_F16, base, mixed, div, pd, true, normalize, lambda, n);
        else
            finish_body(dst, ST_F16, base, mixed, div, pd, false, normalize, lambda, n);
        break;
    default:
        CPU_ASSERT(!"output dtype is not F16, BF16 or F32");
    }
}

/* Byte address of output element `off` (chunk relative) of dtype dt. */
static unsigned char *out_at(const cpu_ctx *x, uint64_t off)
{
    return (unsigned char *)x->c->out + off * (x->p->out_dtype == ST_F32 ? 4 : 2);
}

/* Linear: s->out[j] = ms_merge_linear over the W rows (holding X_i). */
static void tile_linear(const cpu_ctx *x, cpu_scratch *s, size_t n)
{
    const ms_tensor_params *p = x->p;
    const float *w = &p->weight[1];
    size_t span = s->span;
    float *acc = s->out;
    float w0 = w[0];
    for (size_t j = 0; j < n; j++)
        acc[j] = w0 * s->W[j];
    for (unsigned i = 1; i < p->n_models; i++) {
        const float *Xi = s->W + i * span;
        float wi = w[i];
        for (size_t j = 0; j < n; j++)
            acc[j] = acc[j] + wi * Xi[j];
    }
    if (p->normalize) {
        float wsum = x->wsum;
        for (size_t j = 0; j < n; j++)
            acc[j] = acc[j] / wsum;
    }
}

/* ========================================================= partitions */

/* Element tasks over [e0, e1) (e1 > e0). */
static void part_elems(cpu_ctx *x, uint64_t e0, uint64_t e1)
{
    cpu_split_elems(&x->sp, e0, e1, x->lay.max_tasks);
    CPU_ASSERT(x->sp.n_tasks <= x->lay.max_tasks && cpu_split_blocks(&x->sp) <= x->lay.max_blocks);
}

/* Row tasks over rows [r0, r1); the element range follows the rows. */
static void part_rows(cpu_ctx *x, uint64_t r0, uint64_t r1)
{
    cpu_split_rows(&x->sp, r0, r1, x->lay.max_tasks);
    x->sp.e0 = r0 * x->p->cols;
    x->sp.e1 = r1 * x->p->cols;
    CPU_ASSERT(x->sp.n_tasks <= x->lay.max_tasks);
}

/* ============================================================== tasks */

/* The worker histograms hold 32-bit counters: run_hist folds them into the
 * state's 64-bit ones after every window (at most 2^24 elements, so no
 * counter can wrap). HIST_HI spreads consecutive elements over HIST_SUBS
 * sub-histograms, so that runs of equal bins do not wait on each other's
 * increments. */
_Static_assert(HIST_SUBS * MS_MERGE_HI_BINS <= HIST_WORDS, "HIST_HI sub-histograms fit the worker histogram");

CPU_CLONES static void hist_hi_add(uint32_t *restrict h, const uint32_t *restrict key, size_t n)
{
    uint32_t *h0 = h, *h1 = h + MS_MERGE_HI_BINS, *h2 = h + 2 * MS_MERGE_HI_BINS, *h3 = h + 3 * MS_MERGE_HI_BINS;
    size_t j = 0;
    for (; j + 4 <= n; j += 4) {
        h0[key[j] >> 16]++;
        h1[key[j + 1] >> 16]++;
        h2[key[j + 2] >> 16]++;
        h3[key[j + 3] >> 16]++;
    }
    for (; j < n; j++)
        h0[key[j] >> 16]++;
}

/* Two models' keys in one sweep (run_hist pairs them, so the base is loaded
 * once): two sub-histograms each, the models' increments alternating, so a
 * counter is again touched at most every fourth increment. */
CPU_CLONES static void hist_hi_add2(uint32_t *restrict h, const uint32_t *restrict ka, const uint32_t *restrict kb,
                                    size_t n)
{
    uint32_t *a0 = h, *a1 = h + MS_MERGE_HI_BINS, *b0 = h + 2 * MS_MERGE_HI_BINS, *b1 = h + 3 * MS_MERGE_HI_BINS;
    size_t j = 0;
    for (; j + 2 <= n; j += 2) {
        a0[ka[j] >> 16]++;
        b0[kb[j] >> 16]++;
        a1[ka[j + 1] >> 16]++;
        b1[kb[j + 1] >> 16]++;
    }
    for (; j < n; j++) {
        a0[ka[j] >> 16]++;
        b0[kb[j] >> 16]++;
    }
}

/* Few keys fall in the bin: the match flags are computed in one vector loop
 * (into flag[0..n)), then only the 16-element groups holding a match are
 * walked one by one. */
CPU_CLONES static void hist_lo_add(uint32_t *restrict h, const uint32_t *restrict key, size_t n, uint32_t bin,
                                   uint8_t *restrict flag)
{
    for (size_t j = 0; j < n; j++)
        flag[j] = (key[j] >> 16) == bin;
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        uint64_t f0, f1;
        memcpy(&f0, flag + j, 8);
        memcpy(&f1, flag + j + 8, 8);
        if (!(f0 | f1))
            continue;
        for (size_t k = j; k < j + 16; k++)
            if (flag[k])
                h[key[k] & 0xffffu]++;
    }
    for (; j < n; j++)
        if (flag[j])
            h[key[j] & 0xffffu]++;
}

/* ============================================================ capture */

/* HIST_HI's capture (ms_merge_capture in pipeline/merge_passes.h): a sample
 * of the pass's first chunk places each searched bound's range of bins, and
 * every tile of the pass then appends its keys inside the range. Placing it
 * is cheap next to what it saves: HIST_LO's sweep over the tensor and, for a
 * split bound, the tie counts' sweep before every L1 and APPLY window. */
#define CAPTURE_RUN 16u        /* contiguous elements per sample run */
#define CAPTURE_MAX_RUNS 4096u /* at most 65,536 sampled keys, at most 1/16 of the chunk */

/* Arms model i's searched bounds from runs of CAPTURE_RUN keys, one in each
 * of `runs` equal strides of the chunk, binned like HIST_HI into worker 0's
 * histogram (before the pass uses it), each range placed by
 * cpu_capture_range. When the bound's bin turns out to be outside, or the
 * capture overflows, HIST_LO runs as planned. */
static void capture_arm(cpu_ctx *x, unsigned i)
{
    ms_merge_model *m = &x->st->model[i];
    if (!(m->bound[0].search && m->bound[0].capture.cap) && !(m->bound[1].search && m->bound[1].capture.cap))
        return;
    cpu_scratch *s = &x->scratch[0];
    uint64_t e0 = x->c->elem0, n = x->c->n_elems;
    uint64_t runs = n / (16u * CAPTURE_RUN);
    runs = runs < 1 ? 1 : runs > CAPTURE_MAX_RUNS ? CAPTURE_MAX_RUNS : runs;
    memset(s->hist, 0, MS_MERGE_HI_BINS * sizeof *s->hist);
    s->hist_clean = false; /* the sample's counts stay in it */
    uint64_t sampled = 0, stride = n / runs;
    for (uint64_t r = 0; r < runs; r++) {
        /* one run at a pseudo-random place in each stride: at a fixed place
         * every run would fall in the same few columns whenever the stride
         * is a multiple of the row length, and columns differ (a weight's
         * input channels; saliency keys scale by column) */
        uint64_t jitter =
            stride > CAPTURE_RUN ? ((r + 1) * 0x9E3779B97F4A7C15ull >> 32) % (stride - CAPTURE_RUN + 1) : 0;
        uint64_t e = e0 + r * stride + jitter;
        size_t len = e0 + n - e < CAPTURE_RUN ? (size_t)(e0 + n - e) : CAPTURE_RUN;
        load_base(x, e, len, s->base);
        load_keys(x, i, e, len, s->base, NULL, s->x, s->key);
        for (size_t j = 0; j < len; j++)
            s->hist[s->key[j] >> 16]++;
        sampled += len;
    }
    for (unsigned bd = 0; bd < 2; bd++) {
        const ms_merge_bound *b = &m->bound[bd];
        ms_merge_capture *c = &m->bound[bd].capture;
        if (!b->search || c->cap == 0)
            continue;
        double q = (double)b->rank / (double)x->p->numel;
        c->armed = cpu_capture_range(s->hist, sampled, q, x->p->numel, c->cap, &c->bin_lo, &c->bin_hi);
    }
}

/* Appends the tile's keys (key) inside model i's armed ranges to their captures;
 * space is claimed atomically, and a claim past the end only counts (the
 * capture has overflowed and will not be used). */
static void capture_tile(const cpu_ctx *x, cpu_scratch *s, unsigned i, const uint32_t *key, uint64_t e, size_t n)
{
    for (unsigned bd = 0; bd < 2; bd++) {
        ms_merge_capture *c = &x->st->model[i].bound[bd].capture;
        if (!c->armed)
            continue;
        /* e < numel <= 2^32 (ms_merge_capture) */
        size_t got = cpu_capture_select(key, n, c->bin_lo, c->bin_hi - c->bin_lo, (uint32_t)e, s->capture_key,
                                        s->capture_index);
        if (got == 0)
            continue;
        uint64_t at = __atomic_fetch_add(&c->n, (uint64_t)got, __ATOMIC_RELAXED);
        if (at < c->cap && got <= c->cap - at) {
            memcpy(c->key + at, s->capture_key, got * sizeof *c->key);
            memcpy(c->index + at, s->capture_index, got * sizeof *c->index);
        }
    }
}

/* A worker's first histogram task of a run: its histogram starts from zero
 * (cleared by the last fold, else here). */
static void hist_begin(cpu_scratch *s)
{
    if (s->hist_used)
        return;
    if (!s->hist_clean)
        memset(s->hist, 0, HIST_WORDS * sizeof *s->hist);
    s->hist_used = true;
    s->hist_clean = false;
}

/* HIST_HI: histogram of key >> 16 of x->model (and x->model_b: s->rnd,
 * unused by this pass, holds its keys) into the worker's hist, and their
 * captures. */
static void task_hist_hi(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    hist_begin(s);
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (uint64_t e = a; e < b; e += CPU_TILE) {
        size_t n = b - e < CPU_TILE ? (size_t)(b - e) : CPU_TILE;
        load_base(x, e, n, s->base);
        load_keys(x, x->model, e, n, s->base, NULL, s->x, s->key);
        if (x->model_b) {
            load_keys(x, x->model_b, e, n, s->base, NULL, s->x, s->rnd);
            hist_hi_add2(s->hist, s->key, s->rnd, n);
            capture_tile(x, s, x->model_b, s->rnd, e, n);
        } else {
            hist_hi_add(s->hist, s->key, n);
        }
        capture_tile(x, s, x->model, s->key, e, n);
    }
}

/* HIST_LO: per searched bound, histogram of key & 0xffff inside its bin. */
static void task_hist_lo(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    hist_begin(s);
    const ms_merge_model *m = &x->st->model[x->model];
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (uint64_t e = a; e < b; e += CPU_TILE) {
        size_t n = b - e < CPU_TILE ? (size_t)(b - e) : CPU_TILE;
        load_base(x, e, n, s->base);
        load_keys(x, x->model, e, n, s->base, NULL, s->x, s->key);
        for (unsigned bd = 0; bd < 2; bd++)
            if (m->bound[bd].search)
                hist_lo_add(s->hist + (size_t)bd * MS_MERGE_LO_BINS, s->key, n, m->bound[bd].bin, s->keep);
    }
}

CPU_CLONES static uint64_t count_eq(const uint32_t *key, size_t n, uint32_t t)
{
    uint32_t k = 0; /* n <= CPU_TILE */
    for (size_t j = 0; j < n; j++)
        k += key[j] == t;
    return k;
}

/* Split bounds whose tie positions need counting (no captured index list). */
static bool bound_counts_eq(const ms_merge_bound *b)
{
    return b->split && !b->capture.eq_index;
}

/* Counts of key == t of every split bound without an index in the task's range. */
static void task_count_eq(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (unsigned i = 1; i <= x->p->n_models; i++) {
        uint64_t *cnt = ctx_eq(x, task, i);
        cnt[0] = cnt[1] = 0;
    }
    for (uint64_t e = a; e < b; e += CPU_TILE) {
        size_t n = b - e < CPU_TILE ? (size_t)(b - e) : CPU_TILE;
        load_base(x, e, n, s->base);
        for (unsigned i = 1; i <= x->p->n_models; i++) {
            const ms_merge_model *m = &x->st->model[i];
            if (!bound_counts_eq(&m->bound[0]) && !bound_counts_eq(&m->bound[1]))
                continue;
            load_keys(x, i, e, n, s->base, NULL, s->x, s->key);
            uint64_t *cnt = ctx_eq(x, task, i);
            for (unsigned bd = 0; bd < 2; bd++)
                if (bound_counts_eq(&m->bound[bd]))
                    cnt[bd] += count_eq(s->key, n, m->bound[bd].key);
        }
    }
}

/* Model i's keep flags of the tile into s->keep, its deltas into d
 * (pos: as tile_keep's). */
static void tile_delta_keep(const cpu_ctx *x, cpu_scratch *s, unsigned i, uint64_t e, size_t n, float *d,
                            uint64_t pos[2])
{
    ms_merge_sel sel = x->st->model[i].sel;
    if (sel == MS_MERGE_SEL_TOP || sel == MS_MERGE_SEL_BAND) {
        load_keys(x, i, e, n, s->base, d, NULL, s->key);
        tile_keep(x, s, i, e, n, d, pos, s->key);
    } else {
        load_delta(x, i, e, n, s->base, d);
        tile_keep(x, s, i, e, n, d, pos, NULL);
    }
}

/* L1: per model in x->l1_models, the sequential fp64 sums of |delta| and of
 * |delta| over kept elements, per block. */
static void task_l1(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    const ms_tensor_params *p = x->p;
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    uint64_t jw0 = x->sp.e0 / MS_MERGE_BLOCK;
    uint64_t pos[MS_MAX_MODELS + 1][2];
    for (unsigned i = 1; i <= p->n_models; i++) {
        const uint64_t *start = ctx_eq(x, task, i);
        pos[i][0] = x->st->any_split ? start[0] : 0;
        pos[i][1] = x->st->any_split ? start[1] : 0;
    }
    double sd[MS_MAX_MODELS + 1], stau[MS_MAX_MODELS + 1];
    for (uint64_t j = a / MS_MERGE_BLOCK; j * MS_MERGE_BLOCK < b; j++) {
        uint64_t sa = j * MS_MERGE_BLOCK > a ? j * MS_MERGE_BLOCK : a;
        uint64_t sb = (j + 1) * MS_MERGE_BLOCK < b ? (j + 1) * MS_MERGE_BLOCK : b;
        for (unsigned i = 1; i <= p->n_models; i++) {
            /* the window's first block continues the carried open block (0 when none) */
            sd[i] = j == jw0 ? x->st->model[i].blk_delta : 0.0;
            stau[i] = j == jw0 ? x->st->model[i].blk_tau : 0.0;
        }
        for (uint64_t e = sa; e < sb; e += CPU_TILE) {
            size_t n = sb - e < CPU_TILE ? (size_t)(sb - e) : CPU_TILE;
            load_base(x, e, n, s->base);
            for (unsigned i = 1; i <= p->n_models; i++) {
                if (!x->l1_models[i])
                    continue;
                const uint8_t *keep = s->keep;
                if (x->l1_use_mask) {
                    load_delta(x, i, e, n, s->base, s->x);
                    keep = x->mask + (e - x->sp.e0);
                } else {
                    tile_delta_keep(x, s, i, e, n, s->x, pos[i]);
                }
                double d_sum = sd[i], t_sum = stau[i];
                for (size_t k = 0; k < n; k++) {
                    double ad = fabs((double)s->x[k]);
                    /* a dropped element adds +0.0: exact, as the sum is +0, positive or NaN */
                    uint64_t bits, mask = 0u - (uint64_t)keep[k];
                    memcpy(&bits, &ad, sizeof bits);
                    bits &= mask;
                    double kept;
                    memcpy(&kept, &bits, sizeof kept);
                    d_sum = d_sum + ad;
                    t_sum = t_sum + kept;
                }
                sd[i] = d_sum;
                stau[i] = t_sum;
            }
        }
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (!x->l1_models[i])
                continue;
            ctx_blk(x->blk_delta, x, i)[j - jw0] = sd[i];
            ctx_blk(x->blk_tau, x, i)[j - jw0] = stau[i];
        }
    }
}

/* della L1: model x->model's keep flags for the task's rows into x->mask. */
static void task_della_mask(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    uint64_t cols = x->p->cols;
    uint64_t ra, rb;
    cpu_split_row_range(&x->sp, task, &ra, &rb);
    for (uint64_t r = ra; r < rb; r++) {
        uint64_t e = r * cols;
        load_base(x, e, (size_t)cols, s->base);
        load_delta(x, x->model, e, (size_t)cols, s->base, s->x);
        row_keep(x, s, x->model, r, s->x);
        memcpy(x->mask + (e - x->sp.e0), s->keep, (size_t)cols);
    }
}

/* APPLY over element tiles. */
static void task_apply(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    const ms_tensor_params *p = x->p;
    bool linear = p->method == MS_METHOD_LINEAR;
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    uint64_t pos[MS_MAX_MODELS + 1][2];
    for (unsigned i = 1; i <= p->n_models; i++) {
        const uint64_t *start = ctx_eq(x, task, i);
        pos[i][0] = x->st->any_split ? start[0] : 0;
        pos[i][1] = x->st->any_split ? start[1] : 0;
    }
    for (uint64_t e = a; e < b; e += CPU_TILE) {
        size_t n = b - e < CPU_TILE ? (size_t)(b - e) : CPU_TILE;
        uint64_t off = e - x->c->elem0;
        if (linear) {
            for (unsigned i = 1; i <= p->n_models; i++)
                load_f32(s->W + (i - 1) * s->span, x->c->in[i], p->in_dtype[i], off, n);
            tile_linear(x, s, n);
            store_out(x->c->out, p->out_dtype, off, s->out, n);
        } else {
            load_base(x, e, n, s->base);
            for (unsigned i = 1; i <= p->n_models; i++) {
                float *Wi = s->W + (i - 1) * s->span;
                tile_delta_keep(x, s, i, e, n, Wi, pos[i]);
                tile_weigh(x, s, i, Wi, n);
            }
            tile_combine(x, s, n, out_at(x, off), p->out_dtype);
        }
    }
}

/* APPLY over whole rows (della). */
static void task_apply_rows(void *vx, unsigned task, unsigned worker)
{
    cpu_ctx *x = vx;
    cpu_scratch *s = &x->scratch[worker];
    const ms_tensor_params *p = x->p;
    uint64_t cols = p->cols;
    uint64_t ra, rb;
    cpu_split_row_range(&x->sp, task, &ra, &rb);
    for (uint64_t r = ra; r < rb; r++) {
        uint64_t e = r * cols;
        load_base(x, e, (size_t)cols, s->base);
        for (unsigned i = 1; i <= p->n_models; i++) {
            float *Wi = s->W + (i - 1) * s->span;
            load_delta(x, i, e, (size_t)cols, s->base, Wi);
            row_keep(x, s, i, r, Wi);
            tile_weigh(x, s, i, Wi, (size_t)cols);
        }
        tile_combine(x, s, (size_t)cols, out_at(x, e - x->c->elem0), p->out_dtype);
    }
}

/* ============================================================= passes */

static bool ctx_della_rows(const ms_tensor_params *p, const ms_merge_state *st)
{
    if (p->method == MS_METHOD_LINEAR || p->sparsify != MS_SPARSIFY_DELLA_MAGPRUNE)
        return false;
    for (unsigned i = 1; i <= p->n_models; i++)
        if (st->model[i].sel == MS_MERGE_SEL_DELLA)
            return true;
    return false;
}

/* Each task's start positions for split bounds (a binary search where the
 * capture left an index, else counts of key == t per task turned into
 * starts), and eq_seen advanced past the window. */
static void run_eq_positions(cpu_ctx *x, cpu_pool *pool)
{
    if (!x->st->any_split)
        return;
    bool sweep = false;
    for (unsigned i = 1; i <= x->p->n_models; i++)
        sweep |= bound_counts_eq(&x->st->model[i].bound[0]) || bound_counts_eq(&x->st->model[i].bound[1]);
    if (sweep)
        cpu_pool_run(pool, x->sp.n_tasks, task_count_eq, x);
    for (unsigned i = 1; i <= x->p->n_models; i++) {
        for (unsigned bd = 0; bd < 2; bd++) {
            ms_merge_bound *b = &x->st->model[i].bound[bd];
            if (b->split && b->capture.eq_index) {
                for (unsigned t = 0; t < x->sp.n_tasks; t++) {
                    uint64_t a, e;
                    cpu_split_elem_range(&x->sp, t, &a, &e);
                    ctx_eq(x, t, i)[bd] = ms_merge_eq_pos_before(b, a);
                }
                b->eq_seen = ms_merge_eq_pos_before(b, x->sp.e1);
                continue;
            }
            uint64_t run = b->eq_seen;
            for (unsigned t = 0; t < x->sp.n_tasks; t++) {
                uint64_t *slot = &ctx_eq(x, t, i)[bd];
                uint64_t count = b->split ? *slot : 0;
                *slot = run;
                run += count;
            }
            b->eq_seen = run;
        }
    }
}

/* Folds bins [k0, k1) of the workers' histograms (hist_used) into x->model's
 * 64-bit ones and clears them: bin ranges are tasks, so the fold runs on
 * every thread (a serial fold of every worker's histogram grows with the
 * thread count, per window and model). */
#define HIST_FOLD_TASKS_PER_WORKER 4u
static void task_hist_fold(void *vx, unsigned task, unsigned worker)
{
    (void)worker;
    cpu_ctx *x = vx;
    ms_merge_model *m = &x->st->model[x->model];
    size_t bins = x->hist_hi_run ? MS_MERGE_HI_BINS : MS_MERGE_LO_BINS;
    size_t n_tasks = (size_t)x->lay.n_workers * HIST_FOLD_TASKS_PER_WORKER;
    size_t k0 = bins * task / n_tasks, k1 = bins * (task + 1) / n_tasks;
    for (unsigned w = 0; w < x->lay.n_workers; w++) {
        uint32_t *h = x->scratch[w].hist;
        if (!x->scratch[w].hist_used)
            continue;
        if (x->hist_hi_run) {
            /* one model: every sub-histogram; a pair: two each (hist_hi_add2) */
            for (unsigned sub = 0; sub < HIST_SUBS; sub++) {
                uint32_t *hs = h + (size_t)sub * MS_MERGE_HI_BINS;
                ms_merge_model *into = x->model_b && sub >= HIST_SUBS / 2 ? &x->st->model[x->model_b] : m;
                for (size_t k = k0; k < k1; k++)
                    into->hist_hi[k] += hs[k];
                memset(hs + k0, 0, (k1 - k0) * sizeof *hs);
            }
        } else {
            for (unsigned bd = 0; bd < 2; bd++) {
                if (!m->bound[bd].search)
                    continue; /* never written */
                uint32_t *hb = h + (size_t)bd * MS_MERGE_LO_BINS;
                for (size_t k = k0; k < k1; k++)
                    m->bound[bd].hist_lo[k] += hb[k];
                memset(hb + k0, 0, (k1 - k0) * sizeof *hb);
            }
        }
    }
}

static bool model_searches(const cpu_ctx *x, unsigned i)
{
    return x->st->model[i].bound[0].search || x->st->model[i].bound[1].search;
}

/* HIST_HI counts the searching models two at a time, each pair in one sweep
 * that loads the base once; HIST_LO one at a time. */
static void run_hist(cpu_ctx *x, cpu_pool *pool, bool hi)
{
    _Static_assert(HIST_SUBS == 4, "hist_hi_add2 and the fold give a pair's models two sub-histograms each");
    x->hist_hi_run = hi;
    for (unsigned i = 1; i <= x->p->n_models; i++) {
        if (!model_searches(x, i))
            continue;
        x->model = i;
        x->model_b = 0;
        for (unsigned j = i + 1; hi && j <= x->p->n_models && !x->model_b; j++)
            if (model_searches(x, j))
                x->model_b = j;
        if (x->model_b)
            i = x->model_b; /* counted in this sweep */
        CPU_ASSERT(x->sp.e1 - x->sp.e0 <= UINT32_MAX); /* the 32-bit worker counters cannot wrap */
        for (unsigned w = 0; w < x->lay.n_workers; w++)
            x->scratch[w].hist_used = false;
        cpu_pool_run(pool, x->sp.n_tasks, hi ? task_hist_hi : task_hist_lo, x);
        cpu_pool_run(pool, x->lay.n_workers * HIST_FOLD_TASKS_PER_WORKER, task_hist_fold, x);
        for (unsigned w = 0; w < x->lay.n_workers; w++)
            if (x->scratch[w].hist_used)
                x->scratch[w].hist_clean = true;
    }
}

static void run_l1_fold(cpu_ctx *x)
{
    for (unsigned i = 1; i <= x->p->n_models; i++)
        if (x->l1_models[i])
            ms_merge_l1_fold(&x->st->model[i], x->sp.e0, x->sp.e1 - x->sp.e0, ctx_blk(x->blk_delta, x, i),
                             ctx_blk(x->blk_tau, x, i));
}

/* One element window [e0, e1) of a non-row pass. */
static void run_elem_window(cpu_ctx *x, cpu_pool *pool, ms_merge_pass_kind kind, uint64_t e0, uint64_t e1)
{
    part_elems(x, e0, e1);
    switch (kind) {
    case MS_MERGE_PASS_HIST_HI:
        run_hist(x, pool, true);
        break;
    case MS_MERGE_PASS_HIST_LO:
        run_hist(x, pool, false);
        break;
    case MS_MERGE_PASS_L1:
        run_eq_positions(x, pool);
        x->l1_use_mask = false;
        for (unsigned i = 1; i <= x->p->n_models; i++)
            x->l1_models[i] = x->st->model[i].rescale;
        cpu_pool_run(pool, x->sp.n_tasks, task_l1, x);
        run_l1_fold(x);
        break;
    case MS_MERGE_PASS_APPLY:
        run_eq_positions(x, pool);
        cpu_pool_run(pool, x->sp.n_tasks, task_apply, x);
        break;
    default:
        CPU_ASSERT(!"an interpolation pass in the task-vector kernels");
    }
}

/* One row window [r0, r1) of a della tensor's L1 or APPLY pass. */
static void run_row_window(cpu_ctx *x, cpu_pool *pool, ms_merge_pass_kind kind, uint64_t r0, uint64_t r1)
{
    if (kind == MS_MERGE_PASS_APPLY) {
        part_rows(x, r0, r1);
        cpu_pool_run(pool, x->sp.n_tasks, task_apply_rows, x);
        return;
    }
    CPU_ASSERT(kind == MS_MERGE_PASS_L1);
    for (unsigned i = 1; i <= x->p->n_models; i++) {
        if (!x->st->model[i].rescale)
            continue;
        x->model = i;
        part_rows(x, r0, r1);
        cpu_pool_run(pool, x->sp.n_tasks, task_della_mask, x);
        part_elems(x, r0 * x->p->cols, r1 * x->p->cols);
        memset(x->l1_models, 0, sizeof x->l1_models);
        x->l1_models[i] = true;
        x->l1_use_mask = true;
        cpu_pool_run(pool, x->sp.n_tasks, task_l1, x);
        run_l1_fold(x);
    }
}

int cpu_merge_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                       cpu_pool *pool)
{
    if (ms_merge_interp_method(p->method)) /* cpu_merge_interp.c */
        return cpu_merge_interp_run_pass(p, st, pass, c, pool);
    if (p->method == MS_METHOD_REGMEAN) /* cpu_merge_hessian.c */
        return cpu_merge_hessian_run_pass(p, st, pass, c, pool);
    CPU_ASSERT(pass < st->n_passes);
    CPU_ASSERT(c->elem0 == st->next_elem);
    CPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    CPU_ASSERT(c->elem0 + c->n_elems <= p->numel);
    CPU_ASSERT(p->method == MS_METHOD_LINEAR || c->in[0]);
    ms_merge_pass_kind kind = st->pass[pass];
    if (c->n_elems == 0)
        return 0;
    cpu_ctx x;
    memset(&x, 0, sizeof x);
    x.p = p;
    x.st = st;
    x.c = c;
    bool della = ctx_della_rows(p, st) && (kind == MS_MERGE_PASS_L1 || kind == MS_MERGE_PASS_APPLY);
    bool hist = kind == MS_MERGE_PASS_HIST_HI || kind == MS_MERGE_PASS_HIST_LO;
    if (!layout_compute(p, hist, della, cpu_pool_size(pool), c->n_elems, &x.lay))
        return -ENOMEM;
    if (ctx_alloc(&x) != 0)
        return -ENOMEM;
    x.plain_div = ms_merge_fix_plain_divisor(ms_merge_weight_sum(&p->weight[1], p->n_models));
    x.wsum = ms_merge_weight_sum(&p->weight[1], p->n_models);
    uint64_t end = c->elem0 + c->n_elems;
    if (della) {
        uint64_t cols = p->cols;
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (st->model[i].sel != MS_MERGE_SEL_DELLA)
                continue;
            uint64_t *t = x.della_thr + (uint64_t)(i - 1) * cols;
            for (uint64_t r = 0; r < cols; r++)
                t[r] = ms_merge_della_threshold(p->density[i], p->epsilon[i], r, cols);
        }
        uint64_t rows_per_win = g_della_window_elems / cols ? g_della_window_elems / cols : 1;
        for (uint64_t r = c->row0; r < c->row0 + c->n_rows; r += rows_per_win) {
            uint64_t r1 = r + rows_per_win < c->row0 + c->n_rows ? r + rows_per_win : c->row0 + c->n_rows;
            run_row_window(&x, pool, kind, r, r1);
        }
    } else {
        if (kind == MS_MERGE_PASS_HIST_HI && c->elem0 == 0)
            for (unsigned i = 1; i <= p->n_models; i++)
                capture_arm(&x, i);
        for (uint64_t e = c->elem0; e < end;) {
            uint64_t we = (e / g_window_elems + 1) * g_window_elems;
            if (we > end)
                we = end;
            run_elem_window(&x, pool, kind, e, we);
            e = we;
        }
        for (unsigned i = 1; i <= p->n_models && kind == MS_MERGE_PASS_HIST_HI; i++)
            for (unsigned bd = 0; bd < 2; bd++)
                if (st->model[i].bound[bd].capture.armed)
                    st->model[i].bound[bd].capture.covered += c->n_elems;
    }
    st->next_elem = end;
    free(x.mem);
    return 0;
}

uint64_t cpu_merge_scratch_bytes(const ms_tensor_params *p, uint64_t n_rows, unsigned n_threads)
{
    if (n_threads == 0)
        n_threads = 1;
    if (ms_merge_interp_method(p->method))
        return cpu_merge_interp_scratch_bytes(p, n_threads);
    if (p->method == MS_METHOD_REGMEAN)
        return cpu_merge_hessian_scratch_bytes(p, n_threads);
    uint64_t max_elems;
    if (__builtin_mul_overflow(n_rows ? n_rows : 1, p->cols ? p->cols : 1, &max_elems))
        max_elems = UINT64_MAX;
    bool hist = p->method != MS_METHOD_LINEAR &&
                (p->sparsify == MS_SPARSIFY_MAGNITUDE || p->sparsify == MS_SPARSIFY_MAGNITUDE_OUTLIERS);
    bool della = p->method != MS_METHOD_LINEAR && p->sparsify == MS_SPARSIFY_DELLA_MAGPRUNE;
    cpu_layout lay;
    if (!layout_compute(p, hist, della, n_threads, max_elems, &lay))
        return UINT64_MAX;
    return lay.total + CPU_ARENA_ALIGN;
}
