/* The CPU kernels of the interpolation and model-soup methods (see
 * cpu_merge_interp.h; the semantics are in pipeline/merge_passes_interp.h,
 * the element arithmetic in pipeline/merge_math_interp.h).
 *
 * Structure: a chunk is cut into windows; each window is cut into tasks of
 * whole 65,536-element blocks (element passes), whole rows (per-row work:
 * nuslerp rows, model_stock filter_wise, arcee_fusion) or column ranges
 * (nuslerp columns). A task walks its range in tiles of IX_TILE elements
 * with separate loops per step. Every fp64 sum is sequential inside its
 * block (or row, or column) and owned by one task; up to eight
 * equal-length blocks or rows are summed side by side as "lanes", four to
 * a vector of doubles (element j of four lanes transposed into one
 * vector), so the additions' latency overlaps without changing any sum's
 * order. A group reads at most about IX_STREAMS input streams at once.
 *
 * The hot loops (load, Gram, APPLY, store) are cloned for AVX-512 and AVX2
 * and gcc vectorises them; without contraction every clone performs the
 * same IEEE operations in the same order, so all write the same bits. */
#include "cpu/cpu_merge_interp.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_arena.h"
#include "cpu/cpu_kernel.h"
#include "cpu/cpu_split.h"
#include "pipeline/merge_math.h"
#include "pipeline/merge_math_interp.h"
#include "pipeline/merge_passes_interp.h"

#define IX_TILE 1024u                         /* elements per tile */
#define IX_QUAD 4u                            /* lanes per vector of doubles */
#define IX_LANES 8u                           /* blocks or rows summed side by side, at most: two quads */
#define IX_STREAMS 16u                        /* input streams of one Gram group: past about 16 the
                                                 hardware prefetchers stop following (3x slower) */
#define IX_GRAM_TILE 128u                     /* elements per lane and Gram tile: the lanes' vectors fit L1 */
#define IX_TASKS_PER_WORKER 4u                /* load balance */
#define IX_WINDOW_ELEMS (256ull * MS_MERGE_BLOCK) /* 2^24 */

/* Helpers of the cloned loops: inlined, so they compile for each clone's ISA. */
#define IX_INLINE static inline __attribute__((always_inline))

/* A quad of lanes: fp64 elements, their transposes and sums (gcc's generic
 * vectors: one register with AVX2, two with SSE2). */
typedef double ix_v4d __attribute__((vector_size(32)));

/* Window size; only cpu_merge_interp_set_window_for_tests changes it. */
static uint64_t g_window = IX_WINDOW_ELEMS;

void cpu_merge_interp_set_window_for_tests(uint64_t elems)
{
    g_window = elems ? elems : IX_WINDOW_ELEMS;
}

static uint64_t ix_min(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* ============================================================ layout */

/* One worker's private buffers. */
typedef struct ix_scratch {
    float *v;         /* nb * IX_LANES * IX_GRAM_TILE doubles: tiles [nb][IX_TILE] floats (ix_buf),
                         or Gram lanes [IX_LANES][nb][IX_GRAM_TILE] doubles (gram_buf) */
    float *out;       /* [IX_TILE] */
    uint32_t *key;    /* [IX_TILE] */
    uint8_t *keep;    /* [IX_TILE] */
    double *seg;      /* [max_segs][q] per-segment sums (per-row Gram) */
    uint64_t *seg_start; /* [max_segs] */
    double *row;      /* arcee_fusion: [2][cols] */
    uint64_t *hist;   /* KEY passes: [hist_words] */
    uint64_t n_zero;  /* KEY_HI (sce) */
    uint64_t shared[MS_MAX_MODELS + 1], unique[MS_MAX_MODELS + 1]; /* COUNT */
} ix_scratch;

typedef struct ix_layout {
    unsigned n_workers;
    unsigned nb;          /* tile buffers per lane: n_models + 2 */
    unsigned q;           /* sums per block */
    uint64_t max_segs;    /* segments of one per-row Gram call */
    uint64_t row_cols;    /* arcee_fusion row buffers (0: none) */
    uint64_t hist_words;  /* KEY passes: max(hi bins, ranks * lo bins) per worker */
    uint64_t worker_bytes;
    uint64_t max_blocks;  /* blocks a window touches */
    uint64_t max_tasks;
    uint64_t total;
} ix_layout;

/* Sums per block of the method's statistics passes. */
static unsigned layout_sums(const ms_tensor_params *p)
{
    unsigned n = p->n_models, K;
    switch (p->method) {
    case MS_METHOD_SLERP:
    case MS_METHOD_NUSLERP:
        return 3;
    case MS_METHOD_KARCHER:
        K = n + (p->has_base ? 1u : 0u);
        return K * (K + 1) / 2;
    case MS_METHOD_MULTISLERP:
    case MS_METHOD_MODEL_STOCK:
        return n * (n + 1) / 2;
    case MS_METHOD_SCE:
        return n;
    default:
        return 1;
    }
}

static bool layout_compute(const ms_tensor_params *p, unsigned n_workers, ix_layout *lay)
{
    memset(lay, 0, sizeof *lay);
    lay->n_workers = n_workers ? n_workers : 1;
    lay->nb = p->n_models + 2;
    lay->q = layout_sums(p);
    uint64_t cols = p->cols ? p->cols : 1;
    lay->max_segs = cols / MS_MERGE_BLOCK + 2;
    if (lay->max_segs < IX_LANES)
        lay->max_segs = IX_LANES;
    lay->row_cols = p->method == MS_METHOD_ARCEE_FUSION ? cols : 0;
    unsigned ranks = p->method == MS_METHOD_ARCEE_FUSION ? 3 : p->method == MS_METHOD_SCE && p->select_topk < 1.0;
    if (ranks)
        lay->hist_words = ranks * MS_MERGE_LO_BINS > MS_INTERP_HI_BINS ? ranks * MS_MERGE_LO_BINS : MS_INTERP_HI_BINS;
    uint64_t w = 0;
    bool ok = cpu_arena_add(&w, (uint64_t)lay->nb * IX_LANES * IX_GRAM_TILE, sizeof(double)) &&
              cpu_arena_add(&w, IX_TILE, sizeof(float)) && cpu_arena_add(&w, IX_TILE, sizeof(uint32_t)) &&
              cpu_arena_add(&w, IX_TILE, 1) && cpu_arena_add(&w, lay->max_segs * lay->q, sizeof(double)) &&
              cpu_arena_add(&w, lay->max_segs, sizeof(uint64_t)) &&
              cpu_arena_add(&w, 2 * lay->row_cols, sizeof(double)) &&
              cpu_arena_add(&w, lay->hist_words, sizeof(uint64_t));
    if (!ok)
        return false;
    lay->worker_bytes = w;
    lay->max_blocks = g_window / MS_MERGE_BLOCK + 2;
    lay->max_tasks = (uint64_t)lay->n_workers * IX_TASKS_PER_WORKER;
    uint64_t total = 0;
    ok = cpu_arena_add(&total, lay->n_workers, sizeof(ix_scratch)) && cpu_arena_add(&total, lay->n_workers, w) &&
         cpu_arena_add(&total, lay->max_blocks * lay->q, sizeof(double)) &&
         cpu_arena_add(&total, lay->max_tasks, sizeof(uint64_t));
    lay->total = total;
    return ok;
}

uint64_t cpu_merge_interp_scratch_bytes(const ms_tensor_params *p, unsigned n_threads)
{
    ix_layout lay;
    if (!layout_compute(p, n_threads, &lay))
        return UINT64_MAX;
    return lay.total + CPU_ARENA_ALIGN;
}

/* ============================================================ context */

typedef struct ix_ctx {
    const ms_tensor_params *p;
    ms_interp_state *is;
    const ms_chunk *c;
    ix_layout lay;
    void *mem;            /* owns everything below */
    ix_scratch *scratch;  /* [n_workers] */
    double *blk;          /* [max_blocks][q]: per-block sums of the window */
    uint64_t *task_pos;   /* [max_tasks]: sce's equal-key counts, then start positions */
    cpu_split sp;         /* the current window and its cut into element or row tasks */
    uint64_t cpt;         /* column tasks: columns per task (the rows are sp.r0 .. sp.r1) */
} ix_ctx;

static int ctx_alloc(ix_ctx *x)
{
    const ix_layout *lay = &x->lay;
    if (lay->total > SIZE_MAX)
        return -ENOMEM;
    unsigned char *mem = aligned_alloc(CPU_ARENA_ALIGN, (size_t)lay->total);
    if (!mem)
        return -ENOMEM;
    x->mem = mem;
    uint64_t off = 0;
    x->scratch = (ix_scratch *)mem;
    off += cpu_arena_align((uint64_t)lay->n_workers * sizeof(ix_scratch));
    for (unsigned w = 0; w < lay->n_workers; w++) {
        ix_scratch *s = &x->scratch[w];
        memset(s, 0, sizeof *s);
        unsigned char *q = mem + off;
        uint64_t o = 0;
#define CARVE(ptr, type, count) CPU_ARENA_CARVE(ptr, type, count, q, o)
        CARVE(s->v, float, (uint64_t)lay->nb * IX_LANES * IX_GRAM_TILE * 2); /* doubles */
        CARVE(s->out, float, IX_TILE);
        CARVE(s->key, uint32_t, IX_TILE);
        CARVE(s->keep, uint8_t, IX_TILE);
        CARVE(s->seg, double, lay->max_segs * lay->q);
        CARVE(s->seg_start, uint64_t, lay->max_segs);
        CARVE(s->row, double, 2 * lay->row_cols);
        CARVE(s->hist, uint64_t, lay->hist_words);
#undef CARVE
        CPU_ASSERT(o <= lay->worker_bytes);
        off += lay->worker_bytes;
    }
    x->blk = (double *)(mem + off);
    off += cpu_arena_align(lay->max_blocks * lay->q * sizeof(double));
    x->task_pos = (uint64_t *)(mem + off);
    off += cpu_arena_align(lay->max_tasks * sizeof(uint64_t));
    CPU_ASSERT(off <= lay->total);
    return 0;
}

/* Tile buffer k (IX_TILE floats) of an element or row tile. */
static float *ix_buf(const ix_ctx *x, const ix_scratch *s, unsigned k)
{
    (void)x;
    return s->v + (size_t)k * IX_TILE;
}

/* Gram buffer k (IX_GRAM_TILE doubles) of lane l. */
static double *gram_buf(const ix_ctx *x, const ix_scratch *s, unsigned lane, unsigned k)
{
    return (double *)s->v + ((size_t)lane * x->lay.nb + k) * IX_GRAM_TILE;
}

/* ========================================================= load / store */

/* dst[j] = input slot's element e + j, widened to fp32. */
IX_INLINE void ix_load(const ix_ctx *x, unsigned slot, uint64_t e, size_t n, float *dst)
{
    uint64_t off = e - x->c->elem0;
    st_dtype dt = x->p->in_dtype[slot];
    const unsigned char *src = x->c->in[slot];
    cpu_widen(dst, src + off * (dt == ST_F32 ? 4 : 2), dt, n);
}

/* The task vector of slot i: d[j] = ms_merge_delta(load(i), base[j]). */
IX_INLINE void ix_load_delta(const ix_ctx *x, unsigned slot, uint64_t e, size_t n, const float *restrict base,
                             float *restrict d)
{
    ix_load(x, slot, e, n, d);
    for (size_t j = 0; j < n; j++)
        d[j] = ms_merge_delta(d[j], base[j]);
}

IX_INLINE void ix_store(const ix_ctx *x, uint64_t e, const float *restrict src, size_t n)
{
    uint64_t off = e - x->c->elem0;
    unsigned char *restrict dst = x->c->out;
    switch (x->p->out_dtype) {
    case ST_F32:
        for (size_t j = 0; j < n; j++) {
            uint32_t u = ms_merge_store_f32(src[j]);
            memcpy(dst + (off + j) * 4, &u, 4);
        }
        break;
    case ST_BF16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h = ms_merge_store_bf16(src[j]);
            memcpy(dst + (off + j) * 2, &h, 2);
        }
        break;
    case ST_F16:
        for (size_t j = 0; j < n; j++) {
            uint16_t h = ms_merge_store_f16(src[j]);
            memcpy(dst + (off + j) * 2, &h, 2);
        }
        break;
    default:
        CPU_ASSERT(!"output dtype is not F16, BF16 or F32");
    }
}

/* ========================================================= partitions */

static void part_elems(ix_ctx *x, uint64_t e0, uint64_t e1)
{
    cpu_split_elems(&x->sp, e0, e1, x->lay.max_tasks);
    CPU_ASSERT(x->sp.n_tasks <= x->lay.max_tasks && cpu_split_blocks(&x->sp) <= x->lay.max_blocks);
}

static void part_rows(ix_ctx *x, uint64_t r0, uint64_t r1)
{
    cpu_split_rows(&x->sp, r0, r1, x->lay.max_tasks);
    CPU_ASSERT(x->sp.n_tasks <= x->lay.max_tasks);
}

/* Column tasks over every column, for the rows [r0, r1). */
static void part_cols(ix_ctx *x, uint64_t r0, uint64_t r1)
{
    x->sp.r0 = r0;
    x->sp.r1 = r1;
    uint64_t want = x->lay.max_tasks, nc = x->p->cols;
    x->cpt = (nc + want - 1) / want;
    x->sp.n_tasks = (unsigned)((nc + x->cpt - 1) / x->cpt);
    CPU_ASSERT(x->sp.n_tasks <= x->lay.max_tasks);
}

/* ================================================================ Gram */

/* The Gram vectors of elements [e, e + n) into v + k * stride for k < K
 * (the base, when task vectors are formed, into base). */
IX_INLINE void load_vecs(const ix_ctx *x, float *base, float *v, size_t stride, uint64_t e, size_t n)
{
    const ms_interp_state *is = x->is;
    if (is->vec_delta)
        ix_load(x, 0, e, n, base);
    for (unsigned k = 0; k < is->n_vecs; k++) {
        float *dst = v + k * stride;
        if (is->vec_delta)
            ix_load_delta(x, is->vec_slot[k], e, n, base, dst);
        else
            ix_load(x, is->vec_slot[k], e, n, dst);
    }
}

/* Prefetches the inputs of the Gram vectors' elements [e, e + n). */
IX_INLINE void prefetch_vecs(const ix_ctx *x, uint64_t e, size_t n)
{
    const ms_interp_state *is = x->is;
    uint64_t off = e - x->c->elem0;
    for (unsigned k = 0; k <= is->n_vecs; k++) {
        if (k == is->n_vecs && !is->vec_delta)
            break;
        unsigned slot = k < is->n_vecs ? is->vec_slot[k] : 0;
        size_t size = x->p->in_dtype[slot] == ST_F32 ? 4 : 2;
        const unsigned char *src = (const unsigned char *)x->c->in[slot] + off * size;
        for (size_t b = 0; b < n * size; b += 64)
            __builtin_prefetch(src + b);
    }
}

/* Vector k of the Gram vectors of elements [e, e + n) widened to fp64 into
 * dst + k * IX_GRAM_TILE, by way of s->out (the base, then each vector). */
IX_INLINE void gram_load_lane(const ix_ctx *x, ix_scratch *s, double *restrict dst, uint64_t e, size_t n)
{
    const ms_interp_state *is = x->is;
    float *base = s->out, *v = s->out + IX_GRAM_TILE;
    if (is->vec_delta)
        ix_load(x, 0, e, n, base);
    for (unsigned k = 0; k < is->n_vecs; k++) {
        if (is->vec_delta)
            ix_load_delta(x, is->vec_slot[k], e, n, base, v);
        else
            ix_load(x, is->vec_slot[k], e, n, v);
        double *restrict d = dst + (size_t)k * IX_GRAM_TILE;
        for (size_t j = 0; j < n; j++)
            d[j] = (double)v[j];
    }
}

/* t[j][k] = (r[0][j], ..., r[3][j]): r[l] holds elements j0..j0+3 of lane
 * l of a quad; t[j][k] holds element j0 + j of its four lanes (vector k). */
IX_INLINE void ix_transpose4(const ix_v4d r[IX_QUAD], ix_v4d t[IX_QUAD][MS_INTERP_MAX_VECS], unsigned k)
{
    /* __builtin_shufflevector: GCC 12+ and clang (the fuzz build) both have it */
    ix_v4d a0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6), a1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
    ix_v4d a2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6), a3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
    t[0][k] = __builtin_shufflevector(a0, a2, 0, 1, 4, 5);
    t[1][k] = __builtin_shufflevector(a1, a3, 0, 1, 4, 5);
    t[2][k] = __builtin_shufflevector(a0, a2, 2, 3, 6, 7);
    t[3][k] = __builtin_shufflevector(a1, a3, 2, 3, 6, 7);
}

/* One element of a quad: acc[q] += v_a * v_b for every pair a <= b
 * (ms_interp_pair order), lane by lane (the products of two values widened
 * from fp32 are exact). */
IX_INLINE void gram_step(const ix_v4d *v, unsigned K, ix_v4d *acc)
{
    unsigned q = 0;
    for (unsigned a = 0; a < K; a++)
        for (unsigned b = a; b < K; b++, q++)
            acc[q] = acc[q] + v[a] * v[b];
}

/* Elements [0, n) of quads 0..H-1's Gram buffers (gram_buf) added to
 * acc[h * q ...], each lane's sums sequentially in element order. */
IX_INLINE void gram_quads(const ix_ctx *x, const ix_scratch *s, unsigned K, unsigned H, size_t n, ix_v4d *acc)
{
    unsigned q = K * (K + 1) / 2;
    size_t j0 = 0;
    for (; j0 + IX_QUAD <= n; j0 += IX_QUAD) {
        for (unsigned h = 0; h < H; h++) {
            ix_v4d t[IX_QUAD][MS_INTERP_MAX_VECS];
            for (unsigned k = 0; k < K; k++) {
                ix_v4d r[IX_QUAD];
                for (unsigned l = 0; l < IX_QUAD; l++)
                    memcpy(&r[l], gram_buf(x, s, h * IX_QUAD + l, k) + j0, sizeof r[l]);
                ix_transpose4(r, t, k);
            }
            for (unsigned j = 0; j < IX_QUAD; j++)
                gram_step(t[j], K, acc + (size_t)h * q);
        }
    }
    for (; j0 < n; j0++) {
        for (unsigned h = 0; h < H; h++) {
            ix_v4d v[MS_INTERP_MAX_VECS];
            for (unsigned k = 0; k < K; k++) {
                double e[IX_QUAD];
                for (unsigned l = 0; l < IX_QUAD; l++)
                    e[l] = gram_buf(x, s, h * IX_QUAD + l, k)[j0];
                memcpy(&v[k], e, sizeof v[k]);
            }
            gram_step(v, K, acc + (size_t)h * q);
        }
    }
}

/* Lanes per Gram group: as many as keep the inputs read at once within
 * IX_STREAMS, one quad or two. */
static unsigned gram_group_lanes(const ms_interp_state *is)
{
    unsigned inputs = is->n_vecs + (is->vec_delta ? 1u : 0u);
    unsigned g = IX_STREAMS / inputs;
    return g >= IX_LANES ? IX_LANES : g > IX_QUAD ? IX_QUAD : g ? g : 1;
}

/* Sequential sums over nseg segments [start[i], start[i] + len), each
 * continuing from acc[i * q ...]: a group of segments at a time as the
 * lanes of one or two quads (a quad's missing lanes are zeros, their sums
 * dropped). */
CPU_CLONES static void gram_run(const ix_ctx *x, ix_scratch *s, const uint64_t *start, unsigned nseg,
                               uint64_t len, double *acc)
{
    unsigned K = x->is->n_vecs, q = x->is->n_sums, G = gram_group_lanes(x->is);
    ix_v4d sum[2 * MS_INTERP_MAX_SUMS]; /* [quad][q] */
    for (unsigned i = 0; i < nseg; i += G) {
        unsigned g = (unsigned)ix_min(G, nseg - i), H = (g + IX_QUAD - 1) / IX_QUAD;
        for (unsigned l = 0; l < H * IX_QUAD; l++)
            for (unsigned p = 0; p < q; p++)
                sum[(l / IX_QUAD) * q + p][l % IX_QUAD] = l < g ? acc[(size_t)(i + l) * q + p] : 0.0;
        for (unsigned l = g; l < H * IX_QUAD; l++)
            memset(gram_buf(x, s, l, 0), 0, (size_t)K * IX_GRAM_TILE * sizeof(double));
        for (uint64_t off = 0; off < len; off += IX_GRAM_TILE) {
            size_t n = (size_t)ix_min(IX_GRAM_TILE, len - off);
            size_t next = off + IX_GRAM_TILE < len ? (size_t)ix_min(IX_GRAM_TILE, len - off - IX_GRAM_TILE) : 0;
            for (unsigned l = 0; l < g; l++) {
                if (next)
                    prefetch_vecs(x, start[i + l] + off + IX_GRAM_TILE, next);
                gram_load_lane(x, s, gram_buf(x, s, l, 0), start[i + l] + off, n);
            }
            if (K == 2 && H == 1) /* the common cases, their sums in registers */
                gram_quads(x, s, 2, 1, n, sum);
            else if (K == 2)
                gram_quads(x, s, 2, 2, n, sum);
            else
                gram_quads(x, s, K, H, n, sum);
        }
        for (unsigned l = 0; l < g; l++)
            for (unsigned p = 0; p < q; p++)
                acc[(size_t)(i + l) * q + p] = sum[(l / IX_QUAD) * q + p][l % IX_QUAD];
    }
}

/* Per-row sums of rows [r, r + g) into rowsum[g][q] (blocks counted from
 * each row's start). g <= IX_LANES, and g == 1 when a row spans blocks. */
static void gram_rows(const ix_ctx *x, ix_scratch *s, uint64_t r, unsigned g, double *rowsum)
{
    uint64_t cols = x->p->cols;
    unsigned q = x->is->n_sums;
    if (cols <= MS_MERGE_BLOCK) {
        for (unsigned i = 0; i < g; i++)
            s->seg_start[i] = (r + i) * cols;
        memset(s->seg, 0, (size_t)g * q * sizeof(double));
        gram_run(x, s, s->seg_start, g, cols, s->seg);
        for (unsigned i = 0; i < g; i++)
            for (unsigned k = 0; k < q; k++)
                rowsum[i * q + k] = 0.0 + s->seg[i * q + k];
        return;
    }
    CPU_ASSERT(g == 1);
    uint64_t full = cols / MS_MERGE_BLOCK, nseg = (cols + MS_MERGE_BLOCK - 1) / MS_MERGE_BLOCK;
    CPU_ASSERT(nseg <= x->lay.max_segs);
    memset(s->seg, 0, (size_t)nseg * q * sizeof(double));
    for (uint64_t j = 0; j < nseg; j++)
        s->seg_start[j] = r * cols + j * MS_MERGE_BLOCK;
    gram_run(x, s, s->seg_start, (unsigned)full, MS_MERGE_BLOCK, s->seg);
    if (nseg > full)
        gram_run(x, s, s->seg_start + full, 1, cols - full * MS_MERGE_BLOCK, s->seg + full * q);
    for (unsigned k = 0; k < q; k++) {
        double tot = 0.0;
        for (uint64_t j = 0; j < nseg; j++)
            tot = tot + s->seg[j * q + k];
        rowsum[k] = tot;
    }
}

/* Rows handled together by one gram_rows call. */
static unsigned rows_group(const ix_ctx *x, uint64_t r, uint64_t rb)
{
    if (x->p->cols > MS_MERGE_BLOCK)
        return 1;
    return (unsigned)ix_min(IX_LANES, rb - r);
}

/* GRAM over whole blocks: block j's sums into blk[j - jw0]. */
static void task_gram(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    const ms_interp_state *is = x->is;
    unsigned q = is->n_sums;
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    uint64_t jw0 = x->sp.e0 / MS_MERGE_BLOCK, ja = a / MS_MERGE_BLOCK, jb = (b - 1) / MS_MERGE_BLOCK;
    for (uint64_t j = ja; j <= jb; j++) {
        double *acc = x->blk + (j - jw0) * q;
        for (unsigned k = 0; k < q; k++) /* the window's first block continues the carried one */
            acc[k] = j == jw0 ? is->open[k] : 0.0;
    }
    for (uint64_t j = ja; j <= jb;) {
        uint64_t sa = j * MS_MERGE_BLOCK > a ? j * MS_MERGE_BLOCK : a;
        uint64_t sb = ix_min((j + 1) * MS_MERGE_BLOCK, b);
        unsigned g = 1;
        if (sb - sa == MS_MERGE_BLOCK) /* whole blocks run as lanes */
            while (g < IX_LANES && j + g <= jb && (j + g + 1) * MS_MERGE_BLOCK <= b)
                g++;
        uint64_t start[IX_LANES];
        for (unsigned i = 0; i < g; i++)
            start[i] = i == 0 ? sa : (j + i) * MS_MERGE_BLOCK;
        gram_run(x, s, start, g, sb - sa, x->blk + (j - jw0) * q);
        j += g;
    }
}

/* LINE_GRAM, rows: s00, s01, s11 of every row of the task. */
static void task_line_rows(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    uint64_t ra, rb;
    cpu_split_row_range(&x->sp, task, &ra, &rb);
    for (uint64_t r = ra; r < rb;) {
        unsigned g = rows_group(x, r, rb);
        gram_rows(x, s, r, g, x->is->line_sum + r * 3);
        r += g;
    }
}

/* LINE_GRAM, columns: the task's columns over the window's rows, each
 * column's open 65,536-row block in line_open, added to line_sum when the
 * block completes. */
CPU_CLONES static void task_line_cols(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    ms_interp_state *is = x->is;
    uint64_t cols = x->p->cols;
    uint64_t ca = (uint64_t)task * x->cpt, cb = ix_min(ca + x->cpt, cols);
    for (uint64_t r = x->sp.r0; r < x->sp.r1; r++) {
        for (uint64_t cc = ca; cc < cb; cc += IX_TILE) {
            size_t n = (size_t)ix_min(IX_TILE, cb - cc);
            load_vecs(x, ix_buf(x, s, x->lay.nb - 1), ix_buf(x, s, 0), IX_TILE, r * cols + cc, n);
            const float *v0 = ix_buf(x, s, 0), *v1 = ix_buf(x, s, 1);
            double *o = is->line_open + cc * 3;
            for (size_t j = 0; j < n; j++) {
                double x0 = (double)v0[j], x1 = (double)v1[j];
                o[j * 3] = o[j * 3] + x0 * x0;
                o[j * 3 + 1] = o[j * 3 + 1] + x0 * x1;
                o[j * 3 + 2] = o[j * 3 + 2] + x1 * x1;
            }
        }
        if ((r + 1) % MS_MERGE_BLOCK == 0) {
            for (uint64_t c = ca; c < cb; c++) {
                for (unsigned k = 0; k < 3; k++) {
                    is->line_sum[c * 3 + k] = is->line_sum[c * 3 + k] + is->line_open[c * 3 + k];
                    is->line_open[c * 3 + k] = 0.0;
                }
            }
        }
    }
}

/* ================================================================ sce */

/* sce's keys (the variance's magnitude key) of [e, e + n) into s->key; the
 * base stays in buffer 0 and the task vectors in buffers 1..n. */
static void sce_keys(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n)
{
    unsigned nm = x->p->n_models;
    float *base = ix_buf(x, s, 0);
    ix_load(x, 0, e, n, base);
    for (unsigned i = 1; i <= nm; i++)
        ix_load_delta(x, i, e, n, base, ix_buf(x, s, i));
    const float *d = ix_buf(x, s, 1);
    for (size_t j = 0; j < n; j++)
        s->key[j] = ms_merge_key(ms_interp_sce_var(d + j, IX_TILE, nm));
}

/* sce's keep flags of [e, e + n) (keys in s->key) into s->keep; *pos is the
 * eq_pos of the tile's first element (split selections), advanced past it. */
static void sce_keep(const ix_ctx *x, ix_scratch *s, size_t n, uint64_t *pos)
{
    const ms_interp_state *is = x->is;
    uint32_t t = is->sel_key;
    uint64_t take = is->sel_take;
    uint64_t q = is->sel_split ? *pos : 0;
    uint32_t eq = 0;
    if (is->sel_split)
        for (size_t j = 0; j < n; j++)
            eq += s->key[j] == t;
    if (!is->sel_split || q >= take || q + eq <= take) {
        uint64_t q_any = q < take ? 0 : take; /* eq_pos is on one side of take for the whole tile */
        for (size_t j = 0; j < n; j++)
            s->keep[j] = ms_merge_sel_upper(s->key[j], q_any, t, take);
    } else {
        for (size_t j = 0; j < n; j++) {
            s->keep[j] = ms_merge_sel_upper(s->key[j], q, t, take);
            q += s->key[j] == t;
        }
    }
    if (is->sel_split)
        *pos += eq;
}

/* tau_i = d_i * m of [e, e + n) into buffers 1..n (base in buffer 0). */
static void sce_tau(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, uint64_t *pos)
{
    const ms_interp_state *is = x->is;
    unsigned nm = x->p->n_models;
    if (is->sel == MS_INTERP_SEL_TOP) {
        sce_keys(x, s, e, n);
        sce_keep(x, s, n, pos);
    } else {
        float *base = ix_buf(x, s, 0);
        ix_load(x, 0, e, n, base);
        for (unsigned i = 1; i <= nm; i++)
            ix_load_delta(x, i, e, n, base, ix_buf(x, s, i));
        memset(s->keep, is->sel == MS_INTERP_SEL_ALL, n);
    }
    for (unsigned i = 1; i <= nm; i++) {
        float *d = ix_buf(x, s, i);
        for (size_t j = 0; j < n; j++)
            d[j] = d[j] * (s->keep[j] ? 1.0f : 0.0f);
    }
}

/* Counts of key == sel_key in the task's range. */
static void task_count_eq(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    uint64_t a, b, cnt = 0;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (uint64_t e = a; e < b; e += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, b - e);
        sce_keys(x, s, e, n);
        for (size_t j = 0; j < n; j++)
            cnt += s->key[j] == x->is->sel_key;
    }
    x->task_pos[task] = cnt;
}

/* Turns the tasks' equal-key counts into start positions and advances
 * eq_seen past the window (only for split selections). */
static void run_eq_positions(ix_ctx *x, cpu_pool *pool)
{
    ms_interp_state *is = x->is;
    if (is->sel != MS_INTERP_SEL_TOP || !is->sel_split)
        return;
    cpu_pool_run(pool, x->sp.n_tasks, task_count_eq, x);
    uint64_t run = is->eq_seen;
    for (unsigned t = 0; t < x->sp.n_tasks; t++) {
        uint64_t cnt = x->task_pos[t];
        x->task_pos[t] = run;
        run += cnt;
    }
    is->eq_seen = run;
}

/* SUMSQ: per block, per model, the sequential fp64 sum of tau_i^2. */
static void task_sumsq(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    const ms_interp_state *is = x->is;
    unsigned nm = x->p->n_models, q = is->n_sums;
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    uint64_t pos = x->task_pos[task];
    uint64_t jw0 = x->sp.e0 / MS_MERGE_BLOCK;
    for (uint64_t j = a / MS_MERGE_BLOCK; j * MS_MERGE_BLOCK < b; j++) {
        double *acc = x->blk + (j - jw0) * q;
        for (unsigned k = 0; k < q; k++)
            acc[k] = j == jw0 ? is->open[k] : 0.0;
        uint64_t sa = j * MS_MERGE_BLOCK > a ? j * MS_MERGE_BLOCK : a, sb = ix_min((j + 1) * MS_MERGE_BLOCK, b);
        for (uint64_t e = sa; e < sb; e += IX_TILE) {
            size_t n = (size_t)ix_min(IX_TILE, sb - e);
            sce_tau(x, s, e, n, &pos);
            for (unsigned i = 1; i <= nm; i++) {
                const float *t = ix_buf(x, s, i);
                double sum = acc[i - 1];
                for (size_t k = 0; k < n; k++)
                    sum = sum + (double)t[k] * (double)t[k];
                acc[i - 1] = sum;
            }
        }
    }
}

/* ====================================================== arcee_fusion */

/* Row r's KL divergence (merge_passes_interp.h), fp64, per-row blocked sums. */
static double fusion_kl(const ix_ctx *x, ix_scratch *s, uint64_t r)
{
    uint64_t cols = x->p->cols;
    double *vx_ = s->row, *vb = s->row + cols;
    float mx = 0.0f, mb = 0.0f;
    for (uint64_t c = 0; c < cols; c += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, cols - c);
        float *tx = ix_buf(x, s, 0), *tb = ix_buf(x, s, 1);
        ix_load(x, 1, r * cols + c, n, tx);
        ix_load(x, 0, r * cols + c, n, tb);
        if (c == 0) {
            mx = tx[0];
            mb = tb[0];
        }
        for (size_t j = 0; j < n; j++) {
            /* the maximum, a NaN sticking once seen */
            if (mx == mx && !(tx[j] <= mx))
                mx = tx[j];
            if (mb == mb && !(tb[j] <= mb))
                mb = tb[j];
            vx_[c + j] = (double)tx[j];
            vb[c + j] = (double)tb[j];
        }
    }
    double zx = 0.0, zb = 0.0, bx = 0.0, bb = 0.0;
    for (uint64_t c = 0; c < cols; c++) {
        if (c % MS_MERGE_BLOCK == 0 && c > 0) {
            zx = zx + bx;
            zb = zb + bb;
            bx = bb = 0.0;
        }
        vx_[c] = ms_interp_exp(vx_[c] - (double)mx);
        vb[c] = ms_interp_exp(vb[c] - (double)mb);
        bx = bx + vx_[c];
        bb = bb + vb[c];
    }
    zx = zx + bx;
    zb = zb + bb;
    double kl = 0.0, blk = 0.0;
    for (uint64_t c = 0; c < cols; c++) {
        if (c % MS_MERGE_BLOCK == 0 && c > 0) {
            kl = kl + blk;
            blk = 0.0;
        }
        double pp = vx_[c] / zx + 1e-8, qq = vb[c] / zb + 1e-8;
        blk = blk + pp * ms_interp_log(pp / qq);
    }
    return kl + blk;
}

/* Importance of [e, e + n) with row divergence kl: the base in buffer 0,
 * the task vector in buffer 2, the importance in s->out. */
static void fusion_importance(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, double kl)
{
    float *base = ix_buf(x, s, 0), *d = ix_buf(x, s, 2);
    ix_load(x, 0, e, n, base);
    ix_load_delta(x, 1, e, n, base, d);
    float k32 = (float)kl;
    for (size_t j = 0; j < n; j++)
        s->out[j] = (d[j] < 0.0f ? -d[j] : d[j]) * k32;
}

/* ================================================================ keys */

/* The keys of [e, e + n) into s->key (sce: element tiles; arcee_fusion:
 * tiles inside row r). */
static void tile_keys(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, uint64_t r)
{
    if (x->p->method == MS_METHOD_SCE) {
        sce_keys(x, s, e, n);
        return;
    }
    fusion_importance(x, s, e, n, x->is->row_kl[r]);
    for (size_t j = 0; j < n; j++)
        s->key[j] = ms_interp_order_key(s->out[j]);
}

static void hist_tile(const ix_ctx *x, ix_scratch *s, bool hi, size_t n)
{
    const ms_interp_state *is = x->is;
    if (hi) {
        uint64_t z = 0;
        for (size_t j = 0; j < n; j++) {
            s->hist[s->key[j] >> 16]++;
            z += s->key[j] == 0;
        }
        s->n_zero += z;
        return;
    }
    for (unsigned r = 0; r < is->n_ranks; r++) {
        if (!is->rank[r].owns_lo)
            continue;
        uint32_t bin = is->rank[r].bin;
        uint64_t *h = s->hist + (uint64_t)r * MS_MERGE_LO_BINS;
        for (size_t j = 0; j < n; j++)
            if ((s->key[j] >> 16) == bin)
                h[s->key[j] & 0xffffu]++;
    }
}

/* KEY_HI / KEY_LO over element tiles (sce). */
static void task_keys_elems(ix_ctx *x, unsigned task, unsigned worker, bool hi)
{
    ix_scratch *s = &x->scratch[worker];
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (uint64_t e = a; e < b; e += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, b - e);
        tile_keys(x, s, e, n, 0);
        hist_tile(x, s, hi, n);
    }
}

/* KEY_HI / KEY_LO over rows (arcee_fusion: KEY_HI first stores each row's kl). */
static void task_keys_rows(ix_ctx *x, unsigned task, unsigned worker, bool hi)
{
    ix_scratch *s = &x->scratch[worker];
    uint64_t cols = x->p->cols, ra, rb;
    cpu_split_row_range(&x->sp, task, &ra, &rb);
    for (uint64_t r = ra; r < rb; r++) {
        if (hi)
            x->is->row_kl[r] = fusion_kl(x, s, r);
        for (uint64_t c = 0; c < cols; c += IX_TILE) {
            size_t n = (size_t)ix_min(IX_TILE, cols - c);
            tile_keys(x, s, r * cols + c, n, r);
            hist_tile(x, s, hi, n);
        }
    }
}

static void task_key_hi(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    if (x->p->method == MS_METHOD_SCE)
        task_keys_elems(x, task, worker, true);
    else
        task_keys_rows(x, task, worker, true);
}

static void task_key_lo(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    if (x->p->method == MS_METHOD_SCE)
        task_keys_elems(x, task, worker, false);
    else
        task_keys_rows(x, task, worker, false);
}

/* ================================================================ ram */

/* The task vectors of [e, e + n) into buffers 1..n, the base in buffer 0. */
static void load_deltas(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n)
{
    float *base = ix_buf(x, s, 0);
    ix_load(x, 0, e, n, base);
    for (unsigned i = 1; i <= x->p->n_models; i++)
        ix_load_delta(x, i, e, n, base, ix_buf(x, s, i));
}

/* COUNT: per model, elements that are nonzero and shared / unique. */
static void task_count(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    unsigned nm = x->p->n_models;
    const float *eps = x->is->eps32;
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    for (uint64_t e = a; e < b; e += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, b - e);
        load_deltas(x, s, e, n);
        uint8_t *count = s->keep;
        memset(count, 0, n);
        for (unsigned i = 1; i <= nm; i++) {
            const float *d = ix_buf(x, s, i);
            for (size_t j = 0; j < n; j++)
                count[j] += fabsf(d[j]) > eps[i];
        }
        for (unsigned i = 1; i <= nm; i++) {
            const float *d = ix_buf(x, s, i);
            uint64_t sh = 0, un = 0;
            for (size_t j = 0; j < n; j++) {
                unsigned nz = fabsf(d[j]) > eps[i];
                sh += nz & (count[j] > 1);
                un += nz & (count[j] == 1);
            }
            s->shared[i] += sh;
            s->unique[i] += un;
        }
    }
}

/* ============================================================== apply */

/* MIX over [e, e + n) with per-vector coefficients coef (the tensor's, or
 * a row's for LINE_MIX rows) into s->out. */
IX_INLINE void tile_mix(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, const float *coef)
{
    const ms_interp_state *is = x->is;
    float *base = ix_buf(x, s, x->lay.nb - 1), *out = s->out;
    if (is->vec_delta || is->add_base)
        ix_load(x, 0, e, n, base);
    bool first = true;
    for (unsigned k = 0; k < is->n_vecs; k++) {
        if (!is->use[k])
            continue;
        float *v = ix_buf(x, s, k);
        if (is->vec_delta)
            ix_load_delta(x, is->vec_slot[k], e, n, base, v);
        else
            ix_load(x, is->vec_slot[k], e, n, v);
        float ck = coef[k];
        if (first) {
            for (size_t j = 0; j < n; j++)
                out[j] = ck * v[j];
        } else {
            for (size_t j = 0; j < n; j++)
                out[j] = out[j] + ck * v[j];
        }
        first = false;
    }
    CPU_ASSERT(!first);
    if (is->add_base)
        for (size_t j = 0; j < n; j++)
            out[j] = base[j] + out[j];
}

/* model_stock over [e, e + n): ms_interp_model_stock model-outer (the same
 * operations in the same order, in loops that vectorise). */
IX_INLINE void tile_stock(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, float a, float b)
{
    unsigned nm = x->p->n_models;
    float *base = ix_buf(x, s, 0), *xi = ix_buf(x, s, 1), *mean = s->out;
    ix_load(x, 0, e, n, base);
    ix_load(x, 1, e, n, mean);
    for (unsigned i = 2; i <= nm; i++) {
        ix_load(x, i, e, n, xi);
        for (size_t j = 0; j < n; j++)
            mean[j] = mean[j] + xi[j];
    }
    float fn = (float)nm;
    for (size_t j = 0; j < n; j++)
        mean[j] = a * (mean[j] / fn) + b * base[j];
}

IX_INLINE void tile_apply(const ix_ctx *x, ix_scratch *s, uint64_t e, size_t n, uint64_t *pos)
{
    const ms_interp_state *is = x->is;
    const ms_tensor_params *p = x->p;
    unsigned nm = p->n_models;
    switch (is->apply) {
    case MS_INTERP_APPLY_MIX:
        tile_mix(x, s, e, n, is->coef);
        break;
    case MS_INTERP_APPLY_COPY:
        ix_load(x, is->copy_slot, e, n, s->out);
        break;
    case MS_INTERP_APPLY_ZERO:
        memset(s->out, 0, n * sizeof(float));
        break;
    case MS_INTERP_APPLY_STOCK:
        tile_stock(x, s, e, n, is->stock_a, is->stock_b);
        break;
    case MS_INTERP_APPLY_NEARSWAP: {
        float *base = ix_buf(x, s, 0), *xm = ix_buf(x, s, 1);
        ix_load(x, 0, e, n, base);
        ix_load(x, 1, e, n, xm);
        float t = (float)p->t;
        for (size_t j = 0; j < n; j++)
            s->out[j] = ms_interp_nearswap(base[j], xm[j], t);
        break;
    }
    case MS_INTERP_APPLY_RAM: {
        load_deltas(x, s, e, n);
        const float *base = ix_buf(x, s, 0), *d = ix_buf(x, s, 1);
        for (size_t j = 0; j < n; j++)
            s->out[j] = ms_interp_ram(base[j], d + j, IX_TILE, &is->eps32[1], &is->lambda[1], nm);
        break;
    }
    case MS_INTERP_APPLY_SCE: {
        sce_tau(x, s, e, n, pos);
        const float *base = ix_buf(x, s, 0), *tau = ix_buf(x, s, 1);
        for (size_t j = 0; j < n; j++)
            s->out[j] = ms_interp_sce_combine(base[j], tau + j, IX_TILE, &is->w[1], nm);
        break;
    }
    default:
        CPU_ASSERT(!"a row-wise APPLY in an element task");
    }
}

CPU_CLONES static void task_apply(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    uint64_t a, b;
    cpu_split_elem_range(&x->sp, task, &a, &b);
    uint64_t pos = x->task_pos[task];
    for (uint64_t e = a; e < b; e += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, b - e);
        tile_apply(x, s, e, n, &pos);
        ix_store(x, e, s->out, n);
    }
}

/* LINE_MIX, one row: the row's coefficients, or each column's. */
IX_INLINE void row_line_mix(const ix_ctx *x, ix_scratch *s, uint64_t r)
{
    const ms_interp_state *is = x->is;
    uint64_t cols = x->p->cols;
    for (uint64_t c = 0; c < cols; c += IX_TILE) {
        size_t n = (size_t)ix_min(IX_TILE, cols - c);
        uint64_t e = r * cols + c;
        if (!is->line_cols) {
            tile_mix(x, s, e, n, is->line_coef + r * 2);
        } else {
            float *base = ix_buf(x, s, x->lay.nb - 1), *out = s->out;
            load_vecs(x, base, ix_buf(x, s, 0), IX_TILE, e, n);
            if (is->add_base)
                ix_load(x, 0, e, n, base);
            const float *v0 = ix_buf(x, s, 0), *v1 = ix_buf(x, s, 1), *cf = is->line_coef + c * 2;
            for (size_t j = 0; j < n; j++)
                out[j] = cf[j * 2] * v0[j] + cf[j * 2 + 1] * v1[j];
            if (is->add_base)
                for (size_t j = 0; j < n; j++)
                    out[j] = base[j] + out[j];
        }
        ix_store(x, e, s->out, n);
    }
}

/* APPLY over whole rows: nuslerp lines, model_stock filter_wise, arcee_fusion. */
CPU_CLONES static void task_apply_rows(void *vx, unsigned task, unsigned worker)
{
    ix_ctx *x = vx;
    ix_scratch *s = &x->scratch[worker];
    const ms_interp_state *is = x->is;
    uint64_t cols = x->p->cols, ra, rb;
    cpu_split_row_range(&x->sp, task, &ra, &rb);
    for (uint64_t r = ra; r < rb;) {
        unsigned g = 1;
        if (is->apply == MS_INTERP_APPLY_LINE_MIX) {
            row_line_mix(x, s, r);
        } else if (is->apply == MS_INTERP_APPLY_STOCK_ROWS) {
            double rowsum[IX_LANES * MS_INTERP_MAX_SUMS];
            g = rows_group(x, r, rb);
            gram_rows(x, s, r, g, rowsum);
            for (unsigned i = 0; i < g; i++) {
                double t = ms_interp_model_stock_t(rowsum + (size_t)i * is->n_sums, is->n_vecs);
                float a = (float)t, b = (float)(1.0 - t);
                for (uint64_t c = 0; c < cols; c += IX_TILE) {
                    size_t n = (size_t)ix_min(IX_TILE, cols - c);
                    tile_stock(x, s, (r + i) * cols + c, n, a, b);
                    ix_store(x, (r + i) * cols + c, s->out, n);
                }
            }
        } else {
            CPU_ASSERT(is->apply == MS_INTERP_APPLY_FUSION);
            double kl = is->row_kl[r], thr = is->threshold;
            for (uint64_t c = 0; c < cols; c += IX_TILE) {
                size_t n = (size_t)ix_min(IX_TILE, cols - c);
                uint64_t e = r * cols + c;
                fusion_importance(x, s, e, n, kl);
                const float *base = ix_buf(x, s, 0), *d = ix_buf(x, s, 2);
                for (size_t j = 0; j < n; j++) {
                    float m = (double)s->out[j] >= thr ? 1.0f : 0.0f;
                    s->out[j] = base[j] + d[j] * m;
                }
                ix_store(x, e, s->out, n);
            }
        }
        r += g;
    }
}

/* ============================================================= passes */

static bool apply_by_rows(const ms_interp_state *is)
{
    return is->apply == MS_INTERP_APPLY_LINE_MIX || is->apply == MS_INTERP_APPLY_STOCK_ROWS ||
           is->apply == MS_INTERP_APPLY_FUSION;
}

/* One element window [e0, e1). */
static void run_elem_window(ix_ctx *x, cpu_pool *pool, ms_merge_pass_kind kind, uint64_t e0, uint64_t e1)
{
    ms_interp_state *is = x->is;
    part_elems(x, e0, e1);
    memset(x->task_pos, 0, x->lay.max_tasks * sizeof(uint64_t));
    switch (kind) {
    case MS_MERGE_PASS_GRAM:
        cpu_pool_run(pool, x->sp.n_tasks, task_gram, x);
        ms_interp_fold(is->sum, is->open, is->n_sums, e0, e1 - e0, x->blk);
        break;
    case MS_MERGE_PASS_KEY_HI:
        cpu_pool_run(pool, x->sp.n_tasks, task_key_hi, x);
        break;
    case MS_MERGE_PASS_KEY_LO:
        cpu_pool_run(pool, x->sp.n_tasks, task_key_lo, x);
        break;
    case MS_MERGE_PASS_SUMSQ:
        run_eq_positions(x, pool);
        cpu_pool_run(pool, x->sp.n_tasks, task_sumsq, x);
        ms_interp_fold(is->sum, is->open, is->n_sums, e0, e1 - e0, x->blk);
        break;
    case MS_MERGE_PASS_COUNT:
        cpu_pool_run(pool, x->sp.n_tasks, task_count, x);
        break;
    case MS_MERGE_PASS_APPLY:
        if (is->apply == MS_INTERP_APPLY_SCE)
            run_eq_positions(x, pool);
        cpu_pool_run(pool, x->sp.n_tasks, task_apply, x);
        break;
    default:
        CPU_ASSERT(!"not an element pass");
    }
}

/* One window of whole rows [r0, r1). */
static void run_row_window(ix_ctx *x, cpu_pool *pool, ms_merge_pass_kind kind, uint64_t r0, uint64_t r1)
{
    if (kind == MS_MERGE_PASS_LINE_GRAM && x->is->line_cols) {
        part_cols(x, r0, r1);
        cpu_pool_run(pool, x->sp.n_tasks, task_line_cols, x);
        return;
    }
    part_rows(x, r0, r1);
    switch (kind) {
    case MS_MERGE_PASS_LINE_GRAM:
        cpu_pool_run(pool, x->sp.n_tasks, task_line_rows, x);
        break;
    case MS_MERGE_PASS_KEY_HI:
        cpu_pool_run(pool, x->sp.n_tasks, task_key_hi, x);
        break;
    case MS_MERGE_PASS_KEY_LO:
        cpu_pool_run(pool, x->sp.n_tasks, task_key_lo, x);
        break;
    case MS_MERGE_PASS_APPLY:
        cpu_pool_run(pool, x->sp.n_tasks, task_apply_rows, x);
        break;
    default:
        CPU_ASSERT(!"not a row pass");
    }
}

/* Zeroes the per-worker accumulators a pass adds up after the chunk. */
static void workers_reset(ix_ctx *x, ms_merge_pass_kind kind)
{
    for (unsigned w = 0; w < x->lay.n_workers; w++) {
        ix_scratch *s = &x->scratch[w];
        s->n_zero = 0;
        memset(s->shared, 0, sizeof s->shared);
        memset(s->unique, 0, sizeof s->unique);
        if (kind == MS_MERGE_PASS_KEY_HI)
            memset(s->hist, 0, MS_INTERP_HI_BINS * sizeof(uint64_t));
        else if (kind == MS_MERGE_PASS_KEY_LO)
            memset(s->hist, 0, (uint64_t)x->is->n_ranks * MS_MERGE_LO_BINS * sizeof(uint64_t));
    }
}

/* Adds the per-worker accumulators into the state (integer sums: any order). */
static void workers_reduce(ix_ctx *x, ms_merge_pass_kind kind)
{
    ms_interp_state *is = x->is;
    for (unsigned w = 0; w < x->lay.n_workers; w++) {
        const ix_scratch *s = &x->scratch[w];
        if (kind == MS_MERGE_PASS_KEY_HI) {
            for (uint32_t k = 0; k < MS_INTERP_HI_BINS; k++)
                is->hist_hi[k] += s->hist[k];
            is->n_zero += s->n_zero;
        } else if (kind == MS_MERGE_PASS_KEY_LO) {
            for (unsigned r = 0; r < is->n_ranks; r++)
                if (is->rank[r].owns_lo)
                    for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                        is->rank[r].hist_lo[k] += s->hist[(uint64_t)r * MS_MERGE_LO_BINS + k];
        } else if (kind == MS_MERGE_PASS_COUNT) {
            for (unsigned i = 1; i <= x->p->n_models; i++) {
                is->shared[i] += s->shared[i];
                is->unique[i] += s->unique[i];
            }
        }
    }
}

int cpu_merge_interp_run_pass(const ms_tensor_params *p, ms_merge_state *st, unsigned pass, const ms_chunk *c,
                              cpu_pool *pool)
{
    CPU_ASSERT(pass < st->n_passes && st->interp);
    CPU_ASSERT(c->elem0 == st->next_elem);
    CPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    CPU_ASSERT(c->elem0 + c->n_elems <= p->numel);
    CPU_ASSERT(!p->has_base || c->in[0]);
    ms_merge_pass_kind kind = st->pass[pass];
    if (c->n_elems == 0)
        return 0;
    ix_ctx x;
    memset(&x, 0, sizeof x);
    x.p = p;
    x.is = st->interp;
    x.c = c;
    if (!layout_compute(p, cpu_pool_size(pool), &x.lay) || ctx_alloc(&x) != 0)
        return -ENOMEM;
    if (kind == MS_MERGE_PASS_KEY_HI || kind == MS_MERGE_PASS_KEY_LO || kind == MS_MERGE_PASS_COUNT)
        workers_reset(&x, kind);
    bool rows = (kind == MS_MERGE_PASS_LINE_GRAM) || (kind == MS_MERGE_PASS_APPLY && apply_by_rows(x.is)) ||
                (p->method == MS_METHOD_ARCEE_FUSION && (kind == MS_MERGE_PASS_KEY_HI || kind == MS_MERGE_PASS_KEY_LO));
    uint64_t end = c->elem0 + c->n_elems;
    if (rows) {
        uint64_t per = g_window / p->cols ? g_window / p->cols : 1;
        for (uint64_t r = c->row0; r < c->row0 + c->n_rows; r += per)
            run_row_window(&x, pool, kind, r, ix_min(r + per, c->row0 + c->n_rows));
    } else {
        for (uint64_t e = c->elem0; e < end;) {
            uint64_t we = ix_min((e / g_window + 1) * g_window, end);
            run_elem_window(&x, pool, kind, e, we);
            e = we;
        }
    }
    workers_reduce(&x, kind);
    st->next_elem = end;
    free(x.mem);
    return 0;
}
