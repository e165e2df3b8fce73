/* The CUDA merge kernels and gpu_merge_run_pass (see gpu_backend.h). The
 * semantics are pipeline/merge_passes.h's and every per-element operation is
 * pipeline/merge_math.h's, so the bytes equal cpu/cpu_merge.c's.
 *
 * One call = one pass over one chunk, on one lane (gpu_internal.h): copy the
 * inputs the pass needs to the device (copy_in stream), run the kernels
 * (compute stream), copy the output and the pass's results (histograms, L1
 * block sums, counts of tied keys) back (copy_out stream), wait for this
 * call's last event; only then fold the results into the host state.
 * Nothing in the state changes when a call fails. Two threads' calls
 * overlap: one's copies run while the other's kernels do.
 *
 * Device memory of a call: two pool requests, "data" (the inputs in their
 * dtypes, the output) and "work" (results first, so one copy brings them
 * back; then keep masks, per-segment counts, della's sort buffers).
 *
 * Exactness, kernel by kernel:
 *   histograms  64-bit atomicAdd counters, one add per distinct bin per warp
 *               (__match_any_sync): integer sums, any order.
 *   eq_pos      the chunk is cut into segments of GM_SEG elements; per
 *               segment the count of key == t (integers), an exclusive scan
 *               in segment order starting at the bound's eq_seen, then inside
 *               a segment sub-tiles of GM_THREADS elements in order, ranked
 *               with warp ballots: every element gets the exact number of
 *               equal keys before it in flat index order.
 *   L1 sums     one thread per 65,536-element block walks it sequentially in
 *               index order, starting from the carried open block (block 0 of
 *               the chunk) or 0.0: the CPU's additions in the CPU's order;
 *               the host folds them with ms_merge_l1_fold.
 *   della       one thread block per row: a stable LSD radix sort (4-bit
 *               digits, per-thread contiguous ranges) of key << 32 | col on
 *               the key bits; ties stay in column order, so position r in the
 *               sorted row is the element's 0-based rank.
 *   apply       one thread per element: ms_merge_delta, ms_merge_tau,
 *               ms_merge_combine / ms_merge_linear, ms_merge_store_*.
 *   keys        ms_merge_key of the delta, or for ties_sparsegpt and
 *               dare_sparsegpt (a model with a saliency vector u in
 *               st->hessian) ms_hessian_saliency_key with its column's u,
 *               which each call copies up beside the inputs.
 * nvcc gets --fmad=false and no fast-math flag; float division and double
 * arithmetic are IEEE round-to-nearest on the device. */
#include "gpu/gpu_internal.h"
#include "gpu/gpu_elem.cuh"
#include "gpu/gpu_merge_interp.h"
#include "gpu/gpu_merge_regmean.h"

extern "C" {
#include "pipeline/merge_math_hessian.h"
#include "pipeline/merge_passes_hessian.h"
}

#include <inttypes.h>
#include <string.h>

#define GM_THREADS 256u                         /* threads per block of the element kernels */
#define GM_WARPS (GM_THREADS / 32u)
#define GM_SEG_SUB 16u                          /* sub-tiles per segment */
#define GM_SEG (GM_THREADS * GM_SEG_SUB)        /* elements per eq_pos segment */
#define GM_MAX_GRID 65536u                      /* grid-stride kernels: at most this many blocks */
#define GM_L1_THREADS 64u
#define GM_DELLA_WIN_ELEMS ((uint64_t)1 << 22)  /* della sort window: whole rows, about this many elements */
#define GM_DELLA_BITS 4u
#define GM_DELLA_DIGITS (1u << GM_DELLA_BITS)
#define GM_NONE UINT64_MAX                      /* layout offset: region absent */

/* della's sort window; only gpu_merge_set_della_window_for_tests changes it
 * (before any pass runs, from the one test thread). */
static uint64_t g_della_win_elems = GM_DELLA_WIN_ELEMS;

void gpu_merge_set_della_window_for_tests(uint64_t elems)
{
    g_della_win_elems = elems ? elems : GM_DELLA_WIN_ELEMS;
}

/* ================================================================ plan */

/* What the kernels need to know about the state's plan. */
typedef struct gm_plan {
    int sel[MS_MAX_MODELS + 1];
    bool search[MS_MAX_MODELS + 1][2];
    bool split[MS_MAX_MODELS + 1][2];
    bool rescale[MS_MAX_MODELS + 1];
    bool saliency[MS_MAX_MODELS + 1]; /* keys from st->hessian->u[i] */
    bool any_split;
} gm_plan;

static void gm_plan_from_state(const ms_tensor_params *p, const ms_merge_state *st, gm_plan *pl)
{
    memset(pl, 0, sizeof *pl);
    pl->any_split = st->any_split;
    for (unsigned i = 1; i <= p->n_models; i++) {
        const ms_merge_model *m = &st->model[i];
        pl->sel[i] = m->sel;
        pl->rescale[i] = m->rescale;
        pl->saliency[i] = st->hessian && st->hessian->u[i];
        for (unsigned bd = 0; bd < 2; bd++) {
            pl->search[i][bd] = m->bound[bd].search;
            pl->split[i][bd] = st->any_split && m->bound[bd].split;
        }
    }
}

/* The largest plan p can have (gpu_merge_chunk_bytes): every model selects
 * with p's sparsify, searches and splits every bound, rescales if p does. */
static void gm_plan_worst(const ms_tensor_params *p, gm_plan *pl)
{
    memset(pl, 0, sizeof *pl);
    bool linear = p->method == MS_METHOD_LINEAR;
    for (unsigned i = 1; i <= p->n_models; i++) {
        int sel = MS_MERGE_SEL_ALL;
        if (!linear) {
            switch (p->sparsify) {
            case MS_SPARSIFY_MAGNITUDE:
            case MS_SPARSIFY_MAGNITUDE_OUTLIERS:
                sel = MS_MERGE_SEL_BAND; /* needs everything TOP needs, and bound 1 */
                break;
            case MS_SPARSIFY_RANDOM:
                sel = MS_MERGE_SEL_RANDOM;
                break;
            case MS_SPARSIFY_DELLA_MAGPRUNE:
                sel = MS_MERGE_SEL_DELLA;
                break;
            case MS_SPARSIFY_NONE:
                break;
            }
        }
        pl->sel[i] = sel;
        bool searches = sel == MS_MERGE_SEL_BAND;
        for (unsigned bd = 0; bd < 2; bd++)
            pl->search[i][bd] = pl->split[i][bd] = searches;
        pl->any_split |= searches;
        pl->rescale[i] = !linear && p->rescale && sel != MS_MERGE_SEL_ALL;
        pl->saliency[i] = ms_merge_hessian_method(p->method);
    }
}

/* ============================================================== layout */

/* Offsets (bytes) of every region of a call's two device requests. */
typedef struct gm_layout {
    uint64_t n;        /* elements of the chunk */
    uint64_t n_rows;
    uint64_t n_seg;    /* eq_pos segments */
    uint64_t n_blocks; /* 65,536-element blocks the chunk touches (layout: an upper bound) */
    uint64_t win_rows; /* della: rows per sort window */
    /* data request */
    uint64_t in_off[MS_MAX_MODELS + 1], in_bytes[MS_MAX_MODELS + 1]; /* in_off GM_NONE: not copied */
    uint64_t u_off[MS_MAX_MODELS + 1];                                 /* [cols] floats, GM_NONE: magnitude keys */
    uint64_t out_off, out_bytes;
    uint64_t data_bytes;
    /* work request; [0, res_bytes) is copied back */
    uint64_t hist_off[MS_MAX_MODELS + 1][2]; /* HIST_HI: [i][0]; HIST_LO: [i][bound] */
    uint64_t tot_off;                        /* [MS_MAX_MODELS + 1][2] counts of key == t in the chunk */
    uint64_t l1_off[MS_MAX_MODELS + 1];      /* [2][n_blocks] doubles: sums of |delta|, then of |tau| */
    uint64_t res_bytes;
    uint64_t cnt_off[MS_MAX_MODELS + 1][2], start_off[MS_MAX_MODELS + 1][2]; /* [n_seg] uint64 */
    uint64_t mask_off[MS_MAX_MODELS + 1];                                     /* [n] keep flags */
    uint64_t sort_off[2];                                                     /* della: [win_rows * cols] uint64 */
    uint64_t work_bytes;
} gm_layout;

static bool gm_needs_mask(const gm_plan *pl, ms_merge_pass_kind kind, unsigned i)
{
    if (kind == MS_MERGE_PASS_L1)
        return pl->rescale[i];
    if (kind == MS_MERGE_PASS_APPLY)
        return pl->sel[i] == MS_MERGE_SEL_TOP || pl->sel[i] == MS_MERGE_SEL_BAND || pl->sel[i] == MS_MERGE_SEL_DELLA;
    return false;
}

/* Fills L for a chunk of n_rows rows starting at flat index elem0
 * (GM_NONE: unknown, size for the worst alignment). False when the sizes
 * overflow. */
static bool gm_layout_compute(const ms_tensor_params *p, const gm_plan *pl, ms_merge_pass_kind kind, uint64_t elem0,
                              uint64_t n_rows, gm_layout *L)
{
    memset(L, 0, sizeof *L);
    uint64_t n;
    if (__builtin_mul_overflow(n_rows, p->cols, &n))
        return false;
    L->n = n;
    L->n_rows = n_rows;
    L->n_seg = (n + GM_SEG - 1) / GM_SEG;
    if (n == 0)
        L->n_blocks = 0;
    else if (elem0 == GM_NONE)
        L->n_blocks = (n + MS_MERGE_BLOCK - 1) / MS_MERGE_BLOCK + 1;
    else
        L->n_blocks = (elem0 + n - 1) / MS_MERGE_BLOCK - elem0 / MS_MERGE_BLOCK + 1;
    bool linear = p->method == MS_METHOD_LINEAR;
    bool hist = kind == MS_MERGE_PASS_HIST_HI || kind == MS_MERGE_PASS_HIST_LO;
    bool rows = kind == MS_MERGE_PASS_L1 || kind == MS_MERGE_PASS_APPLY;

    gpu_buf_acc acc = {0, true};
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        L->in_off[i] = GM_NONE;
    for (unsigned i = 0; i <= p->n_models; i++) {
        bool need;
        if (i == 0)
            need = !linear;
        else if (hist)
            need = pl->search[i][0] || pl->search[i][1];
        else if (kind == MS_MERGE_PASS_L1) /* rescaled models, and split bounds' tie counts */
            need = pl->rescale[i] || (pl->any_split && (pl->split[i][0] || pl->split[i][1]));
        else
            need = true;
        if (!need)
            continue;
        L->in_bytes[i] = n * gpu_dtype_size(p->in_dtype[i]); /* <= 4 n: no overflow past n's check below */
        L->in_off[i] = gpu_buf_take(&acc, n, gpu_dtype_size(p->in_dtype[i]));
    }
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        L->u_off[i] = GM_NONE;
    for (unsigned i = 1; i <= p->n_models && !linear; i++)
        if (pl->saliency[i] && L->in_off[i] != GM_NONE) /* every kernel that reads the input may compute keys */
            L->u_off[i] = gpu_buf_take(&acc, p->cols, sizeof(float));
    L->out_off = GM_NONE;
    if (kind == MS_MERGE_PASS_APPLY) {
        L->out_bytes = n * gpu_dtype_size(p->out_dtype);
        L->out_off = gpu_buf_take(&acc, n, gpu_dtype_size(p->out_dtype));
    }
    L->data_bytes = acc.off;
    if (!acc.ok || n > UINT64_MAX / 4)
        return false;

    gpu_buf_acc w = {0, true};
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++) {
        L->hist_off[i][0] = L->hist_off[i][1] = GM_NONE;
        L->l1_off[i] = L->mask_off[i] = GM_NONE;
        L->cnt_off[i][0] = L->cnt_off[i][1] = L->start_off[i][0] = L->start_off[i][1] = GM_NONE;
    }
    L->tot_off = GM_NONE;
    L->sort_off[0] = L->sort_off[1] = GM_NONE;
    /* results, copied back */
    for (unsigned i = 1; i <= p->n_models; i++) {
        if (kind == MS_MERGE_PASS_HIST_HI && (pl->search[i][0] || pl->search[i][1]))
            L->hist_off[i][0] = gpu_buf_take(&w, MS_MERGE_HI_BINS, sizeof(uint64_t));
        if (kind == MS_MERGE_PASS_HIST_LO)
            for (unsigned bd = 0; bd < 2; bd++)
                if (pl->search[i][bd])
                    L->hist_off[i][bd] = gpu_buf_take(&w, MS_MERGE_LO_BINS, sizeof(uint64_t));
    }
    if (rows && pl->any_split)
        L->tot_off = gpu_buf_take(&w, (MS_MAX_MODELS + 1) * 2, sizeof(uint64_t));
    if (kind == MS_MERGE_PASS_L1)
        for (unsigned i = 1; i <= p->n_models; i++)
            if (pl->rescale[i])
                L->l1_off[i] = gpu_buf_take(&w, 2 * L->n_blocks, sizeof(double));
    L->res_bytes = w.off;
    /* device-only scratch */
    bool della = false;
    for (unsigned i = 1; i <= p->n_models && rows; i++) {
        for (unsigned bd = 0; bd < 2 && pl->any_split; bd++) {
            if (!pl->split[i][bd])
                continue;
            L->cnt_off[i][bd] = gpu_buf_take(&w, L->n_seg, sizeof(uint64_t));
            L->start_off[i][bd] = gpu_buf_take(&w, L->n_seg, sizeof(uint64_t));
        }
        if (gm_needs_mask(pl, kind, i)) {
            L->mask_off[i] = gpu_buf_take(&w, n, 1);
            della |= pl->sel[i] == MS_MERGE_SEL_DELLA;
        }
    }
    if (della) {
        uint64_t win = g_della_win_elems / p->cols;
        if (win == 0)
            win = 1;
        if (win > n_rows)
            win = n_rows;
        L->win_rows = win;
        uint64_t elems;
        if (__builtin_mul_overflow(win, p->cols, &elems))
            return false;
        L->sort_off[0] = gpu_buf_take(&w, elems, sizeof(uint64_t));
        L->sort_off[1] = gpu_buf_take(&w, elems, sizeof(uint64_t));
    }
    L->work_bytes = w.off;
    return w.ok;
}

/* ============================================================ kernels */

/* One model as the kernels see it. */
typedef struct gm_model {
    int sel;                     /* ms_merge_sel */
    int dtype;                   /* st_dtype of in */
    const void *in;              /* the chunk's elements, NULL when not copied */
    uint8_t *mask;               /* keep flags [n], NULL when none */
    uint64_t random_threshold;   /* RANDOM */
    uint32_t t[2];               /* TOP/BAND: bound keys */
    uint64_t take[2];
    int split[2];                /* eq_pos needed (else 0 is passed) */
    const uint64_t *eq_start[2]; /* split: eq_pos of each segment's first element */
    const float *u;              /* [cols] saliency coefficients, NULL: magnitude keys */
    float factor;                /* rescale factor (1 until the L1 pass finished) */
    double density, epsilon;     /* DELLA */
} gm_model;

/* Everything a kernel needs, passed by value (__grid_constant__). */
typedef struct gm_args {
    uint64_t elem0, n; /* the chunk: flat indices [elem0, elem0 + n) */
    uint64_t cols;
    unsigned n_models;
    int linear, consensus, normalize;
    float lambda;
    float wsum;               /* linear: sum_i w_i */
    float w[MS_MAX_MODELS];   /* w_i at [i - 1] */
    uint32_t key[2];          /* philox key */
    const void *base;         /* NULL for linear */
    int base_dtype;
    void *out;                /* APPLY */
    int out_dtype;
    gm_model m[MS_MAX_MODELS + 1]; /* [1..n_models] */
} gm_args;

static_assert(sizeof(gm_args) <= 4000, "kernel parameters are limited to 4 KiB");

__device__ __forceinline__ uint64_t gm_min(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

__device__ __forceinline__ float gm_base(const gm_args &a, uint64_t j)
{
    return gpu_load(a.base, a.base_dtype, j);
}

/* Model i's delta of chunk element j (base value b). */
__device__ __forceinline__ float gm_delta(const gm_args &a, unsigned i, uint64_t j, float b)
{
    return ms_merge_delta(gpu_load(a.m[i].in, a.m[i].dtype, j), b);
}

/* Model i's selection key of chunk element j (base value b): its delta's
 * magnitude, or its saliency with the coefficient of the element's column. */
__device__ __forceinline__ uint32_t gm_key(const gm_args &a, unsigned i, uint64_t j, float b)
{
    float d = gm_delta(a, i, j, b);
    const float *u = a.m[i].u;
    return u ? ms_hessian_saliency_key(d, u[(a.elem0 + j) % a.cols]) : ms_merge_key(d);
}

/* Model i's keep flag of chunk element j: computed for ALL, NONE, RANDOM,
 * read from the mask for TOP, BAND, DELLA. */
__device__ __forceinline__ bool gm_keep(const gm_args &a, unsigned i, uint64_t j)
{
    const gm_model &m = a.m[i];
    switch (m.sel) {
    case MS_MERGE_SEL_ALL:
        return true;
    case MS_MERGE_SEL_NONE:
        return false;
    case MS_MERGE_SEL_RANDOM:
        return ms_merge_random_keep(ms_merge_philox_word(a.key, a.elem0 + j, i - 1), m.random_threshold);
    default:
        return m.mask[j] != 0;
    }
}

/* HIST_HI: hist[key >> 16]++ for model i. */
__global__ void k_hist_hi(const __grid_constant__ gm_args a, unsigned i, unsigned long long *hist)
{
    GPU_FOR_WARP_ELEMS(j, a.n)
    {
        bool valid = j < a.n;
        uint32_t key = valid ? gm_key(a, i, j, gm_base(a, j)) : 0u;
        gpu_warp_count(hist, key >> 16, valid);
    }
}

/* HIST_LO: per searched bound bd (h[bd] != NULL), h[bd][key & 0xffff]++ where
 * key >> 16 == bin[bd]. */
__global__ void k_hist_lo(const __grid_constant__ gm_args a, unsigned i, uint32_t bin0, uint32_t bin1,
                          unsigned long long *h0, unsigned long long *h1)
{
    GPU_FOR_WARP_ELEMS(j, a.n)
    {
        bool valid = j < a.n;
        uint32_t key = valid ? gm_key(a, i, j, gm_base(a, j)) : 0u;
        gpu_warp_count(h0, key & 0xffffu, valid && h0 && (key >> 16) == bin0);
        gpu_warp_count(h1, key & 0xffffu, valid && h1 && (key >> 16) == bin1);
    }
}

/* Per segment (one block each), the counts of key == t of model i's split
 * bounds (cnt[bd] NULL: not split). */
__global__ void k_eq_count(const __grid_constant__ gm_args a, unsigned i, uint64_t *cnt0, uint64_t *cnt1)
{
    const gm_model &m = a.m[i];
    uint64_t seg = blockIdx.x;
    uint64_t c0 = 0, c1 = 0;
    for (unsigned s = 0; s < GM_SEG_SUB; s++) {
        uint64_t j = seg * GM_SEG + (uint64_t)s * GM_THREADS + threadIdx.x;
        bool valid = j < a.n;
        uint32_t key = valid ? gm_key(a, i, j, gm_base(a, j)) : 0u;
        c0 += (uint64_t)__syncthreads_count(valid && cnt0 && key == m.t[0]);
        c1 += (uint64_t)__syncthreads_count(valid && cnt1 && key == m.t[1]);
    }
    if (threadIdx.x == 0) {
        if (cnt0)
            cnt0[seg] = c0;
        if (cnt1)
            cnt1[seg] = c1;
    }
}

/* TOP / BAND keep flags of model i (one block per segment), with the exact
 * eq_pos for split bounds and 0 for the others (as the CPU). */
__global__ void k_keep_sel(const __grid_constant__ gm_args a, unsigned i)
{
    __shared__ unsigned wtot[2][GM_WARPS];
    const gm_model &m = a.m[i];
    uint64_t seg = blockIdx.x;
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned below = (1u << lane) - 1u; /* lanes before this one */
    uint64_t pos0 = m.split[0] ? m.eq_start[0][seg] : 0, pos1 = m.split[1] ? m.eq_start[1][seg] : 0;
    for (unsigned s = 0; s < GM_SEG_SUB; s++) {
        uint64_t j = seg * GM_SEG + (uint64_t)s * GM_THREADS + threadIdx.x;
        bool valid = j < a.n;
        uint32_t key = valid ? gm_key(a, i, j, gm_base(a, j)) : 0u;
        unsigned b0 = __ballot_sync(0xffffffffu, valid && m.split[0] && key == m.t[0]);
        unsigned b1 = __ballot_sync(0xffffffffu, valid && m.split[1] && key == m.t[1]);
        if (lane == 0) {
            wtot[0][warp] = (unsigned)__popc(b0);
            wtot[1][warp] = (unsigned)__popc(b1);
        }
        __syncthreads();
        uint64_t off0 = 0, off1 = 0, all0 = 0, all1 = 0;
        for (unsigned w = 0; w < GM_WARPS; w++) {
            if (w < warp) {
                off0 += wtot[0][w];
                off1 += wtot[1][w];
            }
            all0 += wtot[0][w];
            all1 += wtot[1][w];
        }
        if (valid) {
            uint64_t q0 = pos0 + off0 + (unsigned)__popc(b0 & below);
            uint64_t q1 = pos1 + off1 + (unsigned)__popc(b1 & below);
            bool keep;
            if (m.sel == MS_MERGE_SEL_TOP)
                keep = ms_merge_sel_upper(key, q0, m.t[0], m.take[0]);
            else
                keep = !ms_merge_sel_lower(key, q0, m.t[0], m.take[0]) && ms_merge_sel_lower(key, q1, m.t[1], m.take[1]);
            m.mask[j] = keep ? 1 : 0;
        }
        pos0 += all0;
        pos1 += all1;
        __syncthreads(); /* wtot is rewritten by the next sub-tile */
    }
}

/* ALL / NONE / RANDOM keep flags of model i into its mask (L1 pass). */
__global__ void k_keep_elem(const __grid_constant__ gm_args a, unsigned i)
{
    GPU_FOR_ELEMS(j, a.n)
    {
        a.m[i].mask[j] = gm_keep(a, i, j) ? 1 : 0;
    }
}

/* della_magprune keep flags of model i for chunk rows [lr0, lr0 + gridDim.x)
 * (chunk-relative), one block per row; sa / sb: [gridDim.x][cols] scratch. */
__global__ void k_della(const __grid_constant__ gm_args a, unsigned i, uint64_t lr0, uint64_t *sa, uint64_t *sb)
{
    __shared__ uint32_t cnt[GM_DELLA_DIGITS][GM_THREADS];
    __shared__ uint32_t tot[GM_DELLA_DIGITS];
    const gm_model &m = a.m[i];
    uint64_t cols = a.cols;
    uint64_t lr = lr0 + blockIdx.x;
    uint64_t *src = sa + (uint64_t)blockIdx.x * cols, *dst = sb + (uint64_t)blockIdx.x * cols;
    unsigned t = threadIdx.x;
    for (uint64_t col = t; col < cols; col += GM_THREADS) {
        uint64_t j = lr * cols + col;
        uint32_t key = ms_merge_key(gm_delta(a, i, j, gm_base(a, j)));
        src[col] = ((uint64_t)key << 32) | col;
    }
    __syncthreads();
    /* stable LSD radix sort on bits 32..63 (the key): each thread owns the
     * contiguous range [lo, hi), so equal digits keep their order */
    uint64_t per = (cols + GM_THREADS - 1) / GM_THREADS;
    uint64_t lo = gm_min((uint64_t)t * per, cols), hi = gm_min(lo + per, cols);
    for (unsigned shift = 32; shift < 64; shift += GM_DELLA_BITS) {
        for (unsigned d = 0; d < GM_DELLA_DIGITS; d++)
            cnt[d][t] = 0;
        for (uint64_t k = lo; k < hi; k++)
            cnt[(src[k] >> shift) & (GM_DELLA_DIGITS - 1)][t]++;
        __syncthreads();
        if (t < GM_DELLA_DIGITS) {
            uint32_t s = 0;
            for (unsigned u = 0; u < GM_THREADS; u++)
                s += cnt[t][u];
            tot[t] = s;
        }
        __syncthreads();
        if (t < GM_DELLA_DIGITS) { /* digit-major, thread-minor exclusive scan: the output slots */
            uint32_t run = 0;
            for (unsigned d = 0; d < t; d++)
                run += tot[d];
            for (unsigned u = 0; u < GM_THREADS; u++) {
                uint32_t c = cnt[t][u];
                cnt[t][u] = run;
                run += c;
            }
        }
        __syncthreads();
        for (uint64_t k = lo; k < hi; k++) {
            uint64_t v = src[k];
            dst[cnt[(v >> shift) & (GM_DELLA_DIGITS - 1)][t]++] = v;
        }
        __syncthreads();
        uint64_t *swap = src;
        src = dst;
        dst = swap;
    }
    for (uint64_t r = t; r < cols; r += GM_THREADS) {
        uint64_t col = src[r] & 0xffffffffu;
        uint64_t j = lr * cols + col;
        uint32_t word = ms_merge_philox_word(a.key, a.elem0 + j, i - 1);
        m.mask[j] = ms_merge_random_keep(word, ms_merge_della_threshold(m.density, m.epsilon, r, cols)) ? 1 : 0;
    }
}

/* L1: per 65,536-element block k of the chunk (one thread each), the
 * sequential fp64 sums of |delta| and of |delta| over kept elements of model
 * i; block 0 continues the carried open block. sums: [2][n_blocks]. */
__global__ void k_l1(const __grid_constant__ gm_args a, unsigned i, uint64_t n_blocks, double carry_d,
                     double carry_t, double *sums)
{
    uint64_t k = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_blocks)
        return;
    const gm_model &m = a.m[i];
    uint64_t jb = a.elem0 / MS_MERGE_BLOCK + k;
    uint64_t end = a.elem0 + a.n;
    uint64_t lo = jb * MS_MERGE_BLOCK, hi = lo + MS_MERGE_BLOCK;
    if (lo < a.elem0)
        lo = a.elem0;
    if (hi > end)
        hi = end;
    double sd = k == 0 ? carry_d : 0.0, st = k == 0 ? carry_t : 0.0;
    for (uint64_t e = lo; e < hi; e++) {
        uint64_t j = e - a.elem0;
        double ad = fabs((double)gm_delta(a, i, j, gm_base(a, j)));
        sd = sd + ad;
        if (m.mask[j])
            st = st + ad;
    }
    sums[k] = sd;
    sums[n_blocks + k] = st;
}

/* APPLY: the merged output of every element. */
__global__ void k_apply(const __grid_constant__ gm_args a)
{
    GPU_FOR_ELEMS(j, a.n)
    {
        float v;
        if (a.linear) {
            float X[MS_MAX_MODELS];
            for (unsigned i = 1; i <= a.n_models; i++)
                X[i - 1] = gpu_load(a.m[i].in, a.m[i].dtype, j);
            v = ms_merge_linear(X, 1, a.w, a.n_models, a.normalize, a.wsum);
        } else {
            float b = gm_base(a, j);
            float W[MS_MAX_MODELS];
            for (unsigned i = 1; i <= a.n_models; i++) {
                float d = gm_delta(a, i, j, b);
                W[i - 1] = a.w[i - 1] * ms_merge_tau(d, gm_keep(a, i, j), a.m[i].factor);
            }
            v = ms_merge_combine(b, W, 1, a.w, a.n_models, a.consensus, a.normalize, a.lambda);
        }
        gpu_store(a.out, a.out_dtype, j, v);
    }
}

/* ================================================================ host */

static void gm_args_fill(gm_args *a, const ms_tensor_params *p, const ms_merge_state *st, const gm_plan *pl,
                         const gm_layout *L, const ms_chunk *c, unsigned char *data, unsigned char *work)
{
    memset(a, 0, sizeof *a);
    a->elem0 = c->elem0;
    a->n = L->n;
    a->cols = p->cols;
    a->n_models = p->n_models;
    a->linear = p->method == MS_METHOD_LINEAR;
    a->consensus = p->consensus;
    a->normalize = p->normalize;
    a->lambda = p->lambda;
    a->wsum = ms_merge_weight_sum(&p->weight[1], p->n_models);
    for (unsigned i = 1; i <= p->n_models; i++)
        a->w[i - 1] = p->weight[i];
    a->key[0] = p->philox_key[0];
    a->key[1] = p->philox_key[1];
    if (L->in_off[0] != GM_NONE) {
        a->base = data + L->in_off[0];
        a->base_dtype = p->in_dtype[0];
    }
    if (L->out_off != GM_NONE) {
        a->out = data + L->out_off;
        a->out_dtype = p->out_dtype;
    }
    for (unsigned i = 1; i <= p->n_models; i++) {
        gm_model *g = &a->m[i];
        const ms_merge_model *m = &st->model[i];
        g->sel = m->sel;
        g->dtype = p->in_dtype[i];
        g->in = L->in_off[i] != GM_NONE ? data + L->in_off[i] : NULL;
        g->mask = L->mask_off[i] != GM_NONE ? work + L->mask_off[i] : NULL;
        g->u = L->u_off[i] != GM_NONE ? (const float *)(data + L->u_off[i]) : NULL;
        g->random_threshold = m->random_threshold;
        for (unsigned bd = 0; bd < 2; bd++) {
            g->t[bd] = m->bound[bd].key;
            g->take[bd] = m->bound[bd].take;
            g->split[bd] = L->start_off[i][bd] != GM_NONE;
            g->eq_start[bd] = g->split[bd] ? (const uint64_t *)(work + L->start_off[i][bd]) : NULL;
        }
        g->factor = m->factor;
        g->density = p->density[i];
        g->epsilon = p->epsilon[i];
    }
}

/* Enqueues the whole call: copies in on copy_in, kernels on compute, copies
 * out on copy_out, ordered by lane l's events (gpu_internal.h). */
static gpu_status gm_enqueue(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, const ms_merge_state *st,
                             const gm_plan *pl, const gm_layout *L, ms_merge_pass_kind kind, const ms_chunk *c,
                             unsigned char *data, unsigned char *work, char *msg, size_t msg_len)
{
    for (unsigned i = 0; i <= p->n_models; i++)
        if (L->in_off[i] != GM_NONE)
            GPU_CHECK(cudaMemcpyAsync(data + L->in_off[i], c->in[i], L->in_bytes[i], cudaMemcpyHostToDevice,
                      b->copy_in),
                      "copying inputs to the GPU");
    for (unsigned i = 1; i <= p->n_models; i++)
        if (L->u_off[i] != GM_NONE)
            GPU_CHECK(cudaMemcpyAsync(data + L->u_off[i], st->hessian->u[i], p->cols * sizeof(float),
                      cudaMemcpyHostToDevice, b->copy_in),
                      "copying saliency coefficients to the GPU");
    GPU_CHECK(gpu_lane_inputs_sent(b, l), "ordering the GPU streams");
    cudaStream_t s = b->compute;
    if (b->fail_next) {
        b->fail_next = false;
        gpu_poison_kernel<<<1, 1, 0, s>>>();
        GPU_CHECK(cudaSuccess, "test poison kernel");
    }
    if (L->res_bytes)
        GPU_CHECK(cudaMemsetAsync(work, 0, L->res_bytes, s), "clearing GPU histograms");
    gm_args a;
    gm_args_fill(&a, p, st, pl, L, c, data, work);
    unsigned grid = gpu_grid(L->n, GM_THREADS, GM_MAX_GRID);
    switch (kind) {
    case MS_MERGE_PASS_HIST_HI:
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (L->hist_off[i][0] == GM_NONE)
                continue;
            k_hist_hi<<<grid, GM_THREADS, 0, s>>>(a, i, (unsigned long long *)(work + L->hist_off[i][0]));
            GPU_CHECK(cudaSuccess, "HIST_HI kernel");
        }
        break;
    case MS_MERGE_PASS_HIST_LO:
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (L->hist_off[i][0] == GM_NONE && L->hist_off[i][1] == GM_NONE)
                continue;
            unsigned long long *h[2];
            for (unsigned bd = 0; bd < 2; bd++)
                h[bd] = L->hist_off[i][bd] == GM_NONE ? NULL : (unsigned long long *)(work + L->hist_off[i][bd]);
            k_hist_lo<<<grid, GM_THREADS, 0, s>>>(a, i, st->model[i].bound[0].bin, st->model[i].bound[1].bin, h[0],
                                                  h[1]);
            GPU_CHECK(cudaSuccess, "HIST_LO kernel");
        }
        break;
    case MS_MERGE_PASS_L1:
    case MS_MERGE_PASS_APPLY:
        GPU_ASSERT(L->n_seg <= 0x7fffffffu);
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (L->cnt_off[i][0] == GM_NONE && L->cnt_off[i][1] == GM_NONE)
                continue;
            uint64_t *cnt[2];
            for (unsigned bd = 0; bd < 2; bd++)
                cnt[bd] = L->cnt_off[i][bd] == GM_NONE ? NULL : (uint64_t *)(work + L->cnt_off[i][bd]);
            k_eq_count<<<(unsigned)L->n_seg, GM_THREADS, 0, s>>>(a, i, cnt[0], cnt[1]);
            GPU_CHECK(cudaSuccess, "tie count kernel");
            for (unsigned bd = 0; bd < 2; bd++) {
                if (!cnt[bd])
                    continue;
                unsigned long long *tot = (unsigned long long *)(work + L->tot_off) + 2 * i + bd;
                gpu_eq_scan<<<1, GPU_SCAN_THREADS, 0, s>>>(cnt[bd], L->n_seg, st->model[i].bound[bd].eq_seen,
                                                        (uint64_t *)(work + L->start_off[i][bd]), tot);
                GPU_CHECK(cudaSuccess, "tie scan kernel");
            }
        }
        for (unsigned i = 1; i <= p->n_models; i++) {
            if (L->mask_off[i] == GM_NONE)
                continue;
            switch (pl->sel[i]) {
            case MS_MERGE_SEL_TOP:
            case MS_MERGE_SEL_BAND:
                k_keep_sel<<<(unsigned)L->n_seg, GM_THREADS, 0, s>>>(a, i);
                GPU_CHECK(cudaSuccess, "selection kernel");
                break;
            case MS_MERGE_SEL_DELLA:
                GPU_ASSERT(p->cols - 1 <= 0xffffffffu);
                for (uint64_t r = 0; r < L->n_rows; r += L->win_rows) {
                    uint64_t nr = L->n_rows - r < L->win_rows ? L->n_rows - r : L->win_rows;
                    k_della<<<(unsigned)nr, GM_THREADS, 0, s>>>(a, i, r, (uint64_t *)(work + L->sort_off[0]),
                                                                (uint64_t *)(work + L->sort_off[1]));
                    GPU_CHECK(cudaSuccess, "della rank kernel");
                }
                break;
            default:
                k_keep_elem<<<grid, GM_THREADS, 0, s>>>(a, i);
                GPU_CHECK(cudaSuccess, "keep kernel");
                break;
            }
        }
        if (kind == MS_MERGE_PASS_L1) {
            for (unsigned i = 1; i <= p->n_models; i++) {
                if (L->l1_off[i] == GM_NONE)
                    continue;
                unsigned blocks = (unsigned)((L->n_blocks + GM_L1_THREADS - 1) / GM_L1_THREADS);
                k_l1<<<blocks, GM_L1_THREADS, 0, s>>>(a, i, L->n_blocks, st->model[i].blk_delta, st->model[i].blk_tau,
                                                      (double *)(work + L->l1_off[i]));
                GPU_CHECK(cudaSuccess, "L1 kernel");
            }
        } else {
            k_apply<<<grid, GM_THREADS, 0, s>>>(a);
            GPU_CHECK(cudaSuccess, "merge kernel");
        }
        break;
    default:
        GPU_ASSERT(!"a pass kind of the interpolation methods");
    }
    GPU_CHECK(gpu_lane_computed(b, l), "ordering the GPU streams");
    if (kind == MS_MERGE_PASS_APPLY)
        GPU_CHECK(cudaMemcpyAsync(c->out, data + L->out_off, L->out_bytes, cudaMemcpyDeviceToHost, b->copy_out),
                  "copying the output from the GPU");
    if (L->res_bytes)
        GPU_CHECK(cudaMemcpyAsync(l->host_tmp, work, L->res_bytes, cudaMemcpyDeviceToHost, b->copy_out),
                  "copying results from the GPU");
    GPU_CHECK(gpu_lane_wait(b, l), "running the merge kernels");
    return GPU_OK;
}

/* The call's results (in l->host_tmp) into the state. */
static void gm_fold(const gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st, const gm_layout *L,
                    ms_merge_pass_kind kind, const ms_chunk *c)
{
    const unsigned char *res = (const unsigned char *)l->host_tmp;
    for (unsigned i = 1; i <= p->n_models; i++) {
        ms_merge_model *m = &st->model[i];
        if (kind == MS_MERGE_PASS_HIST_HI && L->hist_off[i][0] != GM_NONE) {
            const uint64_t *h = (const uint64_t *)(res + L->hist_off[i][0]);
            for (uint32_t k = 0; k < MS_MERGE_HI_BINS; k++)
                m->hist_hi[k] += h[k];
        }
        if (kind == MS_MERGE_PASS_HIST_LO) {
            for (unsigned bd = 0; bd < 2; bd++) {
                if (L->hist_off[i][bd] == GM_NONE)
                    continue;
                const uint64_t *h = (const uint64_t *)(res + L->hist_off[i][bd]);
                for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                    m->bound[bd].hist_lo[k] += h[k];
            }
        }
        if (L->tot_off != GM_NONE) {
            const uint64_t *tot = (const uint64_t *)(res + L->tot_off);
            for (unsigned bd = 0; bd < 2; bd++)
                if (L->start_off[i][bd] != GM_NONE)
                    m->bound[bd].eq_seen += tot[2 * i + bd];
        }
        if (kind == MS_MERGE_PASS_L1 && L->l1_off[i] != GM_NONE) {
            const double *sums = (const double *)(res + L->l1_off[i]);
            ms_merge_l1_fold(m, c->elem0, L->n, sums, sums + L->n_blocks);
        }
    }
    st->next_elem = c->elem0 + c->n_elems;
}

static bool gm_dtype_ok(st_dtype dt)
{
    return dt == ST_F32 || dt == ST_F16 || dt == ST_BF16;
}

/* gpu_merge_run_pass's device part, on lane l: device memory, the enqueued
 * call, the fold. */
static gpu_status gm_run_on_lane(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                                 const gm_plan *pl, const gm_layout *L, ms_merge_pass_kind kind, const ms_chunk *c,
                                 char *msg, size_t msg_len)
{
    gpu_status reserved = gpu_lane_reserve_results(l, L->res_bytes, msg, msg_len);
    if (reserved != GPU_OK)
        return reserved;
    void *data = NULL, *work = NULL;
    uint64_t data_size = 0, work_size = 0;
    cudaError_t rc = gpu_backend_alloc(b, L->data_bytes, &data, &data_size);
    if (rc == cudaSuccess)
        rc = gpu_backend_alloc(b, L->work_bytes, &work, &work_size);
    if (rc != cudaSuccess) {
        gpu_backend_release(b, data, data_size);
        if (rc != cudaErrorMemoryAllocation)
            return gpu_backend_classify(b, rc, "cudaMalloc", msg, msg_len);
        gpu_backend_trim(b);
        cudaGetLastError();
        uint64_t need = gpu_mempool_class_size(L->data_bytes), w = gpu_mempool_class_size(L->work_bytes);
        gpu_backend_oom_msg(b, need > UINT64_MAX - w ? UINT64_MAX : need + w, msg, msg_len);
        return GPU_OOM;
    }

    gpu_status status =
        gm_enqueue(b, l, p, st, pl, L, kind, c, (unsigned char *)data, (unsigned char *)work, msg, msg_len);
    if (status != GPU_OK)
        gpu_lane_abandon(b, l); /* nothing may still use the buffers */
    else
        gm_fold(l, p, st, L, kind, c);
    gpu_backend_release(b, work, work_size);
    gpu_backend_release(b, data, data_size);
    if (status == GPU_OOM) { /* an allocation inside the runtime (rare): same contract */
        gpu_backend_trim(b);
        gpu_backend_oom_msg(b, data_size + work_size, msg, msg_len);
    }
    return status;
}

gpu_status gpu_merge_run_pass(gpu_backend *b, const ms_tensor_params *p, ms_merge_state *st, unsigned pass,
                              const ms_chunk *c, char *msg, size_t msg_len)
{
    if (msg && msg_len)
        msg[0] = '\0';
    if (gpu_backend_is_broken(b, msg, msg_len))
        return GPU_FATAL;
    if (c->n_elems == 0) /* as the CPU: nothing, not even next_elem */
        return GPU_OK;
    bool interp = gpu_interp_supports(p);
    if (interp || gpu_regmean_supports(p)) { /* gpu_merge_interp.cu, gpu_merge_regmean.cu */
        cudaError_t rc = cudaSetDevice(b->device);
        if (rc != cudaSuccess)
            return gpu_backend_classify(b, rc, "cudaSetDevice", msg, msg_len);
        gpu_lane *l = gpu_lane_acquire(b);
        gpu_status status = interp ? gpu_interp_run_pass(b, l, p, st, pass, c, msg, msg_len)
                                   : gpu_regmean_run_pass(b, l, p, st, pass, c, msg, msg_len);
        gpu_lane_release(b, l);
        return status;
    }
    GPU_ASSERT(pass < st->n_passes);
    GPU_ASSERT(c->elem0 == st->next_elem);
    GPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    GPU_ASSERT(c->elem0 + c->n_elems <= p->numel);
    GPU_ASSERT(p->method == MS_METHOD_LINEAR || c->in[0]);
    GPU_ASSERT(p->n_models >= 1 && p->n_models <= MS_MAX_MODELS);
    GPU_ASSERT(gpu_merge_supports(p));
    ms_merge_pass_kind kind = st->pass[pass];
    gm_plan pl;
    gm_plan_from_state(p, st, &pl);
    gm_layout L;
    if (!gm_layout_compute(p, &pl, kind, c->elem0, c->n_rows, &L)) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "needs more device memory than can be addressed");
        return GPU_OOM;
    }
    for (unsigned i = 0; i <= p->n_models; i++)
        if (L.in_off[i] != GM_NONE)
            GPU_ASSERT(gm_dtype_ok(p->in_dtype[i]) && c->in[i]);
    if (kind == MS_MERGE_PASS_APPLY)
        GPU_ASSERT(gm_dtype_ok(p->out_dtype) && c->out);

    cudaError_t rc = cudaSetDevice(b->device);
    if (rc != cudaSuccess)
        return gpu_backend_classify(b, rc, "cudaSetDevice", msg, msg_len);
    gpu_lane *l = gpu_lane_acquire(b);
    gpu_status status = gm_run_on_lane(b, l, p, st, &pl, &L, kind, c, msg, msg_len);
    gpu_lane_release(b, l);
    return status;
}

bool gpu_merge_supports(const ms_tensor_params *p)
{
    switch (p->method) {
    case MS_METHOD_LINEAR:
    case MS_METHOD_TASK_ARITHMETIC:
    case MS_METHOD_TIES:
    case MS_METHOD_DARE_TIES:
    case MS_METHOD_DARE_LINEAR:
    case MS_METHOD_BREADCRUMBS:
    case MS_METHOD_BREADCRUMBS_TIES:
    case MS_METHOD_DELLA:
    case MS_METHOD_DELLA_LINEAR:
    case MS_METHOD_TIES_SPARSEGPT:
    case MS_METHOD_DARE_SPARSEGPT:
        return true;
    case MS_METHOD_REGMEAN:
        return gpu_regmean_supports(p);
    default:
        return gpu_interp_supports(p);
    }
}

uint64_t gpu_merge_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows)
{
    if (!gpu_merge_supports(p))
        return UINT64_MAX;
    if (gpu_interp_supports(p))
        return gpu_interp_chunk_bytes(p, n_rows);
    if (p->method == MS_METHOD_REGMEAN)
        return gpu_regmean_chunk_bytes(p, n_rows);
    if (n_rows == 0 || p->cols == 0)
        return 0;
    gm_plan pl;
    gm_plan_worst(p, &pl);
    static const ms_merge_pass_kind kinds[] = {MS_MERGE_PASS_HIST_HI, MS_MERGE_PASS_HIST_LO, MS_MERGE_PASS_L1,
                                               MS_MERGE_PASS_APPLY};
    uint64_t worst = 0;
    for (unsigned k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        gm_layout L;
        if (!gm_layout_compute(p, &pl, kinds[k], GM_NONE, n_rows, &L))
            return UINT64_MAX;
        uint64_t d = gpu_mempool_class_size(L.data_bytes), w = gpu_mempool_class_size(L.work_bytes);
        if (d == UINT64_MAX || w == UINT64_MAX || d > UINT64_MAX - w)
            return UINT64_MAX;
        if (d + w > worst)
            worst = d + w;
    }
    return worst;
}
