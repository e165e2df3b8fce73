/* The CUDA kernels of the interpolation and model-soup methods and
 * gpu_interp_run_pass (see gpu_merge_interp.h); sce's and arcee_fusion's
 * kernels are in gpu_merge_interp_keys.cu, their memory, copies and folds
 * here. The semantics are
 * pipeline/merge_passes_interp.h's, every per-element operation is
 * pipeline/merge_math_interp.h's or merge_math.h's, and every fp64 sum adds
 * the CPU's terms in the CPU's order, so the bytes and the statistics equal
 * cpu/cpu_merge_interp.c's for every chunking.
 *
 * One call = one pass over one chunk on one lane (gpu_internal.h): the
 * inputs (and the state's arrays the kernels read) go up on copy_in, the
 * kernels run on compute, the output and the results come down on copy_out
 * (the results into the lane's pinned buffer); only after gpu_lane_wait
 * succeeded are the results folded into the host state, with the host-side
 * folds of merge_passes_interp.h. Nothing in the state changes when a call
 * fails.
 *
 * Device memory of a call: one pool request, laid out as: results (copied
 * back) | state arrays (uploaded) | inputs in their dtypes | output |
 * device-only scratch. sce and arcee_fusion's results: KEY_HI's histogram
 * of key >> 16, zero count and (arcee_fusion) the rows' KL; KEY_LO's
 * per-rank histograms; SUMSQ's per-block sums; the chunk's count of tied
 * keys (split selections). Uploaded: the chunk rows' KL (KEY_LO, APPLY of
 * arcee_fusion). Scratch: sce's keep flags and per-segment tie counts.
 * Integer results are added into the state (hist_hi, n_zero, hist_lo of
 * the ranks owning one, eq_seen) as the CPU's workers_reduce does; row_kl
 * is stored for the chunk's rows.
 *
 * Exactness, kernel by kernel:
 *   k_gram_blocks  GRAM: one warp per (65,536-element block, pair a <= b)
 *                  walks the chunk's part of the block in index order
 *                  (gpu_warp_ordered_sum: lanes load, every lane adds),
 *                  starting from the carried open sum (the chunk's first
 *                  block) or 0.0; the host folds the block sums in block
 *                  order with ms_interp_fold, as the CPU does per window.
 *   k_gram_rows    per-row sums (nuslerp rows, model_stock filter_wise): one
 *                  warp per (row, 65,536-column segment, pair) from 0.0;
 *                  the segment sums are added in segment order from 0.0 (on
 *                  the host for LINE_GRAM, in k_stock_coef for model_stock).
 *   k_line_cols    nuslerp columns: one thread per (column, pair) walks the
 *                  chunk's rows in order from the column's open sum, cutting
 *                  at every 65,536th global row; the host folds the pieces
 *                  with ms_interp_fold per column.
 *   k_stock_coef   model_stock filter_wise: t per row with
 *                  ms_interp_model_stock_t (fp64 sqrt and division are IEEE
 *                  on the device, --fmad=false keeps the products apart).
 *   k_count        ramplus_tl: integer counts, any order.
 *   k_apply        one thread per element: the same fp32 operations as
 *                  cpu_merge_interp.c's tiles, then ms_merge_store_*.
 *   sce, arcee_fusion  see gpu_merge_interp_keys.cu.
 * Products of two fp32 values are exact in fp64, so no contraction question
 * arises in the sums, and the products of the next elements may be computed
 * ahead of adding them (gpu_ordered_sum, gpu_warp_ordered_sum: the loads
 * overlap the chain of additions, which stays in index order); nvcc gets
 * --fmad=false and no fast-math flag. */
#include "gpu/gpu_internal.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>

extern "C" {
#include "pipeline/merge_math_interp.h"
#include "pipeline/merge_passes_interp.h"
}

#include "gpu/gpu_elem.cuh"
#include "gpu/gpu_merge_interp.h"

#define GI_THREADS 256u            /* threads per block of the element kernels */
#define GI_SUM_THREADS 64u         /* threads per block of the sequential-sum kernels */
#define GI_MAX_GRID 65536u         /* grid-stride kernels: at most this many blocks */
#define GI_NONE UINT64_MAX         /* layout: region absent / chunk position unknown */
#define GI_COUNT_WORDS (2u * (MS_MAX_MODELS + 1)) /* COUNT results: shared[0..16], unique[0..16] */

/* ================================================================ needs */

/* What one call of a pass reads and writes, from the state (a real call) or
 * from the parameters alone (the worst case, gpu_interp_chunk_bytes). */
typedef struct gi_need {
    ms_merge_pass_kind kind;
    bool slot[MS_MAX_MODELS + 1]; /* input slots copied to the device */
    unsigned q;                   /* sums per block / row segment / column piece */
    ms_interp_apply apply;        /* APPLY */
    bool line_cols;               /* LINE_GRAM / LINE_MIX: per column */
    bool fusion;                  /* arcee_fusion: KEY_HI writes the rows' KL, KEY_LO / APPLY read it */
    unsigned n_ranks;             /* KEY_LO: order statistics searched (sce: 0 or 1, arcee_fusion: 3) */
    bool mask;                    /* SUMSQ / APPLY of sce with a TOP selection: keep flags */
    bool split;                   /* ... with a split tie: exact tie positions */
} gi_need;

/* nuslerp's vectors, as merge_passes_interp.c's plan_nuslerp_mode decides:
 * 0 the whole tensor, 1 rows, 2 columns. */
static int gi_nuslerp_mode(const ms_tensor_params *p)
{
    if (p->nuslerp_flatten)
        return 0;
    if (p->nuslerp_row_wise)
        return p->rows > 1 ? 2 : 0;
    return 1;
}

/* The Gram vectors of p's method (before any pass). */
static unsigned gi_worst_vecs(const ms_tensor_params *p)
{
    switch (p->method) {
    case MS_METHOD_SLERP:
    case MS_METHOD_NUSLERP:
        return 2;
    case MS_METHOD_KARCHER:
        return p->n_models + (p->has_base ? 1u : 0u);
    default:
        return p->n_models;
    }
}

static bool gi_method_needs_base(const ms_tensor_params *p)
{
    switch (p->method) {
    case MS_METHOD_SLERP:
    case MS_METHOD_MODEL_STOCK:
    case MS_METHOD_NEARSWAP:
    case MS_METHOD_SCE:
    case MS_METHOD_RAM:
    case MS_METHOD_RAMPLUS_TL:
    case MS_METHOD_ARCEE_FUSION:
        return true;
    default:
        return p->has_base;
    }
}

/* The largest need any call of pass kind `kind` of p can have: every input
 * slot, the method's widest sums and APPLY variant. */
static void gi_need_worst(const ms_tensor_params *p, ms_merge_pass_kind kind, gi_need *nd)
{
    memset(nd, 0, sizeof *nd);
    nd->kind = kind;
    nd->slot[0] = gi_method_needs_base(p);
    for (unsigned i = 1; i <= p->n_models; i++)
        nd->slot[i] = true;
    unsigned K = gi_worst_vecs(p);
    nd->q = kind == MS_MERGE_PASS_LINE_GRAM ? 3u : K * (K + 1) / 2;
    nd->apply = MS_INTERP_APPLY_MIX;
    if (p->method == MS_METHOD_NUSLERP && gi_nuslerp_mode(p) != 0) {
        nd->apply = MS_INTERP_APPLY_LINE_MIX;
        nd->line_cols = gi_nuslerp_mode(p) == 2;
    }
    if (p->method == MS_METHOD_MODEL_STOCK && p->filter_wise)
        nd->apply = MS_INTERP_APPLY_STOCK_ROWS;
    if (p->method == MS_METHOD_SCE) { /* any selection KEY_HI can decide on */
        nd->apply = MS_INTERP_APPLY_SCE;
        if (kind == MS_MERGE_PASS_SUMSQ)
            nd->q = p->n_models;
        nd->n_ranks = p->select_topk < 1.0 ? 1 : 0;
        nd->mask = nd->split = p->select_topk < 1.0;
    }
    if (p->method == MS_METHOD_ARCEE_FUSION) {
        nd->apply = MS_INTERP_APPLY_FUSION;
        nd->fusion = true;
        nd->n_ranks = MS_INTERP_MAX_RANKS;
    }
}

/* The need of pass kind `kind` with the state as it is now. */
static void gi_need_from_state(const ms_tensor_params *p, const ms_interp_state *is, ms_merge_pass_kind kind,
                               gi_need *nd)
{
    memset(nd, 0, sizeof *nd);
    nd->kind = kind;
    nd->apply = is->apply;
    nd->line_cols = is->line_cols;
    nd->q = kind == MS_MERGE_PASS_LINE_GRAM ? 3u : is->n_sums;
    bool sce = p->method == MS_METHOD_SCE;
    nd->fusion = p->method == MS_METHOD_ARCEE_FUSION;
    bool vecs = false, used_only = false, base = false, sel_inputs = false;
    switch (kind) {
    case MS_MERGE_PASS_GRAM:
    case MS_MERGE_PASS_LINE_GRAM:
        vecs = true;
        base = is->vec_delta;
        break;
    case MS_MERGE_PASS_COUNT:
        for (unsigned i = 0; i <= p->n_models; i++)
            nd->slot[i] = true;
        break;
    case MS_MERGE_PASS_KEY_HI:
        sel_inputs = true;
        break;
    case MS_MERGE_PASS_KEY_LO:
        nd->n_ranks = is->n_ranks;
        sel_inputs = is->n_ranks > 0; /* sce keeping all or none searches nothing */
        break;
    case MS_MERGE_PASS_SUMSQ:
        GPU_ASSERT(sce);
        sel_inputs = true;
        break;
    case MS_MERGE_PASS_APPLY:
        switch (is->apply) {
        case MS_INTERP_APPLY_MIX:
        case MS_INTERP_APPLY_LINE_MIX:
            vecs = true;
            used_only = is->apply == MS_INTERP_APPLY_MIX;
            base = is->vec_delta || is->add_base;
            break;
        case MS_INTERP_APPLY_COPY:
            nd->slot[is->copy_slot] = true;
            break;
        case MS_INTERP_APPLY_ZERO:
            break;
        case MS_INTERP_APPLY_NEARSWAP:
            nd->slot[0] = nd->slot[1] = true;
            break;
        case MS_INTERP_APPLY_SCE:
        case MS_INTERP_APPLY_FUSION:
            sel_inputs = true;
            break;
        default: /* STOCK, STOCK_ROWS, RAM */
            for (unsigned i = 0; i <= p->n_models; i++)
                nd->slot[i] = true;
            break;
        }
        break;
    default:
        GPU_ASSERT(!"a pass kind the GPU interp kernels do not run");
    }
    if (vecs)
        for (unsigned k = 0; k < is->n_vecs; k++)
            if (!used_only || is->use[k])
                nd->slot[is->vec_slot[k]] = true;
    if (base)
        nd->slot[0] = true;
    if (sel_inputs) /* sce: the base and every model; arcee_fusion: the base and its model */
        for (unsigned i = 0; i <= (nd->fusion ? 1u : p->n_models); i++)
            nd->slot[i] = true;
    if (sce && (kind == MS_MERGE_PASS_SUMSQ || kind == MS_MERGE_PASS_APPLY)) {
        nd->mask = is->sel == MS_INTERP_SEL_TOP;
        nd->split = nd->mask && is->sel_split;
    }
}

/* ================================================================ layout */

/* Offsets (bytes) of every region of a call's one device request. */
typedef struct gi_layout {
    uint64_t n;        /* elements of the chunk */
    uint64_t n_rows;
    uint64_t n_blocks; /* GRAM: 65,536-element blocks the chunk touches */
    uint64_t segs_row; /* per-row sums: 65,536-column segments per row */
    uint64_t n_rseg;   /* LINE_GRAM columns: 65,536-row blocks the chunk touches */
    uint64_t res_bytes;/* [0, res_bytes): results, copied back */
    uint64_t open_off, open_bytes; /* LINE_GRAM columns: the state's line_open */
    uint64_t coef_off, coef_bytes; /* LINE_MIX: line_coef of the chunk's rows, or of every column */
    uint64_t in_off[MS_MAX_MODELS + 1], in_bytes[MS_MAX_MODELS + 1];
    uint64_t out_off, out_bytes;
    uint64_t rowsum_off; /* STOCK_ROWS: [n_rows][segs_row][q] segment sums */
    uint64_t ab_off;     /* STOCK_ROWS: [n_rows][2] a, b */
    /* sce and arcee_fusion (gi_sel_call) */
    uint64_t hist_off, zero_off;              /* KEY_HI results: [MS_INTERP_HI_BINS], [1] */
    uint64_t kl_off;                          /* KEY_HI results (arcee_fusion): [n_rows] row KL */
    uint64_t lo_off[MS_INTERP_MAX_RANKS];     /* KEY_LO results: [MS_MERGE_LO_BINS] per rank */
    uint64_t eqtot_off;                       /* SUMSQ / APPLY results (split): [1] ties in the chunk */
    uint64_t klin_off, klin_bytes;            /* KEY_LO / APPLY (arcee_fusion): the rows' KL, uploaded */
    uint64_t n_seg;                           /* sce's mask: GI_SEG segments */
    uint64_t mask_off, cnt_off, start_off;    /* scratch: [n] flags, [n_seg] counts and starts */
    uint64_t total;
} gi_layout;

/* Reserves a * b * size bytes (aligned) and returns their offset (gpu_buf_take). */
static uint64_t gi_take(gpu_buf_acc *acc, uint64_t a, uint64_t b, uint64_t size)
{
    uint64_t count;
    if (__builtin_mul_overflow(a, b, &count)) {
        acc->ok = false;
        return 0;
    }
    return gpu_buf_take(acc, count, size);
}

/* Fills L for a chunk of n_rows rows starting at row row0 (GI_NONE: unknown,
 * sized for the worst alignment). False when the sizes overflow. */
static bool gi_layout_compute(const ms_tensor_params *p, const gi_need *nd, uint64_t row0, uint64_t n_rows,
                              gi_layout *L)
{
    memset(L, 0, sizeof *L);
    const uint64_t B = MS_MERGE_BLOCK, cols = p->cols;
    uint64_t n;
    if (__builtin_mul_overflow(n_rows, cols, &n) || n > UINT64_MAX / 8)
        return false;
    L->n = n;
    L->n_rows = n_rows;
    if (n > 0) {
        if (row0 == GI_NONE) {
            L->n_blocks = (n + B - 1) / B + 1;
            L->n_rseg = (n_rows + B - 1) / B + 1;
        } else {
            uint64_t elem0 = row0 * cols;
            L->n_blocks = (elem0 + n - 1) / B - elem0 / B + 1;
            L->n_rseg = (row0 + n_rows - 1) / B - row0 / B + 1;
        }
    }
    L->segs_row = (cols + B - 1) / B;
    L->hist_off = L->zero_off = L->kl_off = L->eqtot_off = L->klin_off = GI_NONE;
    L->mask_off = L->cnt_off = L->start_off = GI_NONE;
    for (unsigned r = 0; r < MS_INTERP_MAX_RANKS; r++)
        L->lo_off[r] = GI_NONE;
    bool sel_pass = nd->kind == MS_MERGE_PASS_SUMSQ || nd->kind == MS_MERGE_PASS_APPLY;
    gpu_buf_acc acc = {0, true};
    switch (nd->kind) {
    case MS_MERGE_PASS_GRAM:
    case MS_MERGE_PASS_SUMSQ:
        gi_take(&acc, L->n_blocks, nd->q, sizeof(double));
        break;
    case MS_MERGE_PASS_KEY_HI:
        L->hist_off = gi_take(&acc, MS_INTERP_HI_BINS, 1, sizeof(uint64_t));
        L->zero_off = gi_take(&acc, 1, 1, sizeof(uint64_t));
        if (nd->fusion)
            L->kl_off = gi_take(&acc, n_rows, 1, sizeof(double));
        break;
    case MS_MERGE_PASS_KEY_LO:
        GPU_ASSERT(nd->n_ranks <= MS_INTERP_MAX_RANKS);
        for (unsigned r = 0; r < nd->n_ranks; r++)
            L->lo_off[r] = gi_take(&acc, MS_MERGE_LO_BINS, 1, sizeof(uint64_t));
        break;
    case MS_MERGE_PASS_LINE_GRAM:
        if (nd->line_cols)
            gi_take(&acc, cols * 3, L->n_rseg, sizeof(double)); /* cols <= n: no overflow */
        else
            gi_take(&acc, n_rows * L->segs_row, 3, sizeof(double));
        break;
    case MS_MERGE_PASS_COUNT:
        gi_take(&acc, GI_COUNT_WORDS, 1, sizeof(uint64_t));
        break;
    default:
        break;
    }
    if (sel_pass && nd->mask && nd->split)
        L->eqtot_off = gi_take(&acc, 1, 1, sizeof(uint64_t));
    L->res_bytes = acc.off;
    L->open_off = L->coef_off = L->out_off = L->rowsum_off = L->ab_off = GI_NONE;
    if (nd->kind == MS_MERGE_PASS_LINE_GRAM && nd->line_cols) {
        L->open_bytes = cols * 3 * sizeof(double);
        L->open_off = gi_take(&acc, cols, 3, sizeof(double));
    }
    bool apply = nd->kind == MS_MERGE_PASS_APPLY;
    if (nd->fusion && (nd->kind == MS_MERGE_PASS_KEY_LO || apply)) {
        L->klin_bytes = n_rows * sizeof(double); /* n_rows <= n: no overflow */
        L->klin_off = gi_take(&acc, n_rows, 1, sizeof(double));
    }
    if (apply && nd->apply == MS_INTERP_APPLY_LINE_MIX) {
        uint64_t lines = nd->line_cols ? cols : n_rows;
        L->coef_bytes = lines * 2 * sizeof(float);
        L->coef_off = gi_take(&acc, lines, 2, sizeof(float));
    }
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++) {
        L->in_off[i] = GI_NONE;
        if (i > p->n_models || !nd->slot[i])
            continue;
        L->in_bytes[i] = n * gpu_dtype_size(p->in_dtype[i]);
        L->in_off[i] = gi_take(&acc, n, 1, gpu_dtype_size(p->in_dtype[i]));
    }
    if (apply) {
        L->out_bytes = n * gpu_dtype_size(p->out_dtype);
        L->out_off = gi_take(&acc, n, 1, gpu_dtype_size(p->out_dtype));
    }
    if (apply && nd->apply == MS_INTERP_APPLY_STOCK_ROWS) {
        uint64_t segs;
        if (__builtin_mul_overflow(n_rows, L->segs_row, &segs))
            return false;
        L->rowsum_off = gi_take(&acc, segs, nd->q, sizeof(double));
        L->ab_off = gi_take(&acc, n_rows, 2, sizeof(float));
    }
    if (sel_pass && nd->mask) {
        L->n_seg = (n + GI_SEG - 1) / GI_SEG;
        L->mask_off = gi_take(&acc, n, 1, 1);
        if (nd->split) {
            L->cnt_off = gi_take(&acc, L->n_seg, 1, sizeof(uint64_t));
            L->start_off = gi_take(&acc, L->n_seg, 1, sizeof(uint64_t));
        }
    }
    L->total = acc.off;
    return acc.ok;
}

/* ================================================================ kernels */

/* Everything a kernel needs, passed by value (__grid_constant__). */
typedef struct gi_args {
    uint64_t elem0, n;       /* the chunk: flat indices [elem0, elem0 + n) */
    uint64_t row0, n_rows, cols;
    unsigned n_models;
    const void *in[MS_MAX_MODELS + 1]; /* the chunk's inputs, NULL when not copied */
    int dtype[MS_MAX_MODELS + 1];
    void *out;                         /* APPLY */
    int out_dtype;
    /* the vectors v_k (GRAM, LINE_GRAM, MIX, LINE_MIX, STOCK_ROWS' sums) */
    unsigned n_vecs;
    uint8_t vec_slot[MS_INTERP_MAX_VECS];
    int vec_delta;
    unsigned q;                         /* sums per block / segment / column */
    uint8_t pair_a[MS_INTERP_MAX_SUMS], pair_b[MS_INTERP_MAX_SUMS]; /* sum s is of v_a * v_b */
    double open[MS_INTERP_MAX_SUMS];    /* GRAM: the carried open block */
    /* APPLY */
    int apply;                          /* ms_interp_apply */
    unsigned copy_slot;
    float coef[MS_INTERP_MAX_VECS];
    uint8_t use[MS_INTERP_MAX_VECS];
    int add_base, line_cols;
    const float *line_coef;             /* LINE_MIX: [n_rows][2] (the chunk's rows) or [cols][2] */
    const double *line_open;            /* LINE_GRAM columns: [cols][3] */
    float stock_a, stock_b;
    float *stock_ab;                    /* STOCK_ROWS: [n_rows][2] */
    float t32;                          /* NEARSWAP */
    float eps32[MS_MAX_MODELS];         /* RAM / COUNT: [i - 1] */
    float lambda[MS_MAX_MODELS];        /* RAM: [i - 1] */
} gi_args;

static_assert(sizeof(gi_args) <= 4000, "kernel parameters are limited to 4 KiB");

__device__ __forceinline__ float gi_slot(const gi_args &a, unsigned slot, uint64_t j)
{
    return gpu_load(a.in[slot], a.dtype[slot], j);
}

/* Vector k at chunk element j (base b: the base's element, read only for
 * task vectors), as cpu load_vecs / ix_load_delta. */
__device__ __forceinline__ float gi_vec(const gi_args &a, unsigned k, uint64_t j, float b)
{
    float x = gi_slot(a, a.vec_slot[k], j);
    return a.vec_delta ? ms_merge_delta(x, b) : x;
}

__device__ __forceinline__ float gi_vec_base(const gi_args &a, uint64_t j)
{
    return a.vec_delta ? gi_slot(a, 0, j) : 0.0f;
}

/* v_pa[j] * v_pb[j] in fp64: the product of two fp32 values is exact. */
__device__ __forceinline__ double gi_gram_prod(const gi_args &a, unsigned s, uint64_t j)
{
    float b = gi_vec_base(a, j);
    double x = (double)gi_vec(a, a.pair_a[s], j, b);
    double y = a.pair_a[s] == a.pair_b[s] ? x : (double)gi_vec(a, a.pair_b[s], j, b);
    return x * y;
}

/* acc + v_pa[j] * v_pb[j] in fp64 (the CPU's gram_tile_* operation). */
__device__ __forceinline__ double gi_gram_add(const gi_args &a, unsigned s, uint64_t j, double acc)
{
    return acc + gi_gram_prod(a, s, j);
}

/* acc plus pair s's terms of chunk elements [j0, j1) in index order, summed
 * by the calling warp (every lane gets the sum). */
__device__ __forceinline__ double gi_gram_run(const gi_args &a, unsigned s, uint64_t j0, uint64_t j1, double acc)
{
    return gpu_warp_ordered_sum(acc, j0, j1, [&](uint64_t j) { return gi_gram_prod(a, s, j); });
}

/* The sum kernels below run one warp per sum: launched with 32 threads per
 * item (gi_warp_grid), warp w = item w; a warp past the last item returns
 * whole. */
__device__ __forceinline__ uint64_t gi_warp_item(void)
{
    return ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32u;
}

/* GRAM: warp t = k * q + s sums pair s over the chunk's part of its k-th
 * block, in index order; block 0 continues the carried open sum.
 * blk: [n_blocks][q] (ms_interp_fold's layout). */
__global__ void k_gram_blocks(const __grid_constant__ gi_args a, uint64_t n_blocks, double *blk)
{
    uint64_t t = gi_warp_item();
    if (t >= n_blocks * a.q)
        return;
    uint64_t k = t / a.q;
    unsigned s = (unsigned)(t % a.q);
    uint64_t lo, hi;
    gpu_block_range(a.elem0, a.n, k, &lo, &hi);
    double sum = gi_gram_run(a, s, lo - a.elem0, hi - a.elem0, k == 0 ? a.open[s] : 0.0);
    if ((threadIdx.x & 31u) == 0)
        blk[t] = sum;
}

/* Per-row sums: warp t = (lr * segs_row + g) * q + s sums pair s over
 * columns [g * 65,536, (g + 1) * 65,536) of chunk row lr, from 0.0.
 * out: [n_rows][segs_row][q]. */
__global__ void k_gram_rows(const __grid_constant__ gi_args a, uint64_t segs_row, double *out)
{
    uint64_t t = gi_warp_item();
    if (t >= a.n_rows * segs_row * a.q)
        return;
    unsigned s = (unsigned)(t % a.q);
    uint64_t g = (t / a.q) % segs_row, lr = (t / a.q) / segs_row;
    uint64_t c0 = g * MS_MERGE_BLOCK, c1 = c0 + MS_MERGE_BLOCK < a.cols ? c0 + MS_MERGE_BLOCK : a.cols;
    double sum = gi_gram_run(a, s, lr * a.cols + c0, lr * a.cols + c1, 0.0);
    if ((threadIdx.x & 31u) == 0)
        out[t] = sum;
}

/* LINE_GRAM columns: thread t = col * 3 + s walks the chunk's rows in order
 * from the column's open sum line_open[t]; at the end of every 65,536-row
 * block (global row index) the piece is written and the sum restarts from
 * 0.0; the last, unfinished piece is written too. out: [cols][n_rseg][3]. */
__global__ void k_line_cols(const __grid_constant__ gi_args a, uint64_t n_rseg, double *out)
{
    uint64_t t = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= a.cols * 3)
        return;
    uint64_t col = t / 3;
    unsigned s = (unsigned)(t % 3);
    double *piece = out + col * n_rseg * 3 + s;
    uint64_t g = 0;
    double acc = a.line_open[t];
    for (uint64_t lr = 0; lr < a.n_rows; lr++) {
        acc = gi_gram_add(a, s, lr * a.cols + col, acc);
        if ((a.row0 + lr + 1) % MS_MERGE_BLOCK == 0) {
            piece[g * 3] = acc;
            g++;
            acc = 0.0;
        }
    }
    if (g < n_rseg)
        piece[g * 3] = acc;
}

/* model_stock filter_wise: per chunk row (one thread each), the row's sums
 * (segments added in order from 0.0, as cpu gram_rows), t and the two fp32
 * coefficients. seg: [n_rows][segs_row][q]; ab: [n_rows][2]. */
__global__ void k_stock_coef(const __grid_constant__ gi_args a, uint64_t segs_row, const double *seg, float *ab)
{
    uint64_t lr = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (lr >= a.n_rows)
        return;
    double G[MS_INTERP_MAX_SUMS];
    for (unsigned s = 0; s < a.q; s++) {
        double tot = 0.0;
        for (uint64_t g = 0; g < segs_row; g++)
            tot = tot + seg[(lr * segs_row + g) * a.q + s];
        G[s] = tot;
    }
    double t = ms_interp_model_stock_t(G, a.n_vecs);
    ab[lr * 2] = (float)t;
    ab[lr * 2 + 1] = (float)(1.0 - t);
}

/* ramplus_tl's COUNT: per model i, elements with nz_i and count > 1
 * (shared) or count == 1 (unique), as cpu task_count. res: [2][MS_MAX_MODELS
 * + 1] (shared, then unique), zeroed before. */
__global__ void k_count(const __grid_constant__ gi_args a, unsigned long long *res)
{
    __shared__ unsigned long long sh[MS_MAX_MODELS + 1], un[MS_MAX_MODELS + 1];
    for (unsigned i = threadIdx.x; i <= MS_MAX_MODELS; i += blockDim.x)
        sh[i] = un[i] = 0;
    __syncthreads();
    unsigned my_sh[MS_MAX_MODELS] = {0}, my_un[MS_MAX_MODELS] = {0};
    GPU_FOR_ELEMS(j, a.n)
    {
        float b = gi_slot(a, 0, j);
        unsigned nz = 0, count = 0;
        for (unsigned i = 1; i <= a.n_models; i++) {
            unsigned z = fabsf(ms_merge_delta(gi_slot(a, i, j), b)) > a.eps32[i - 1];
            nz |= z << (i - 1);
            count += z;
        }
        for (unsigned i = 1; i <= a.n_models; i++) {
            unsigned z = (nz >> (i - 1)) & 1u;
            my_sh[i - 1] += z & (count > 1);
            my_un[i - 1] += z & (count == 1);
        }
    }
    for (unsigned i = 1; i <= a.n_models; i++) {
        if (my_sh[i - 1])
            atomicAdd(&sh[i], (unsigned long long)my_sh[i - 1]);
        if (my_un[i - 1])
            atomicAdd(&un[i], (unsigned long long)my_un[i - 1]);
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i <= MS_MAX_MODELS; i += blockDim.x) {
        if (sh[i])
            atomicAdd(&res[i], sh[i]);
        if (un[i])
            atomicAdd(&res[MS_MAX_MODELS + 1 + i], un[i]);
    }
}

/* MIX / LINE_MIX of element j with per-vector coefficients cf (as cpu
 * tile_mix: the first used vector's product, then + each further product in
 * vector order, then B + that with add_base). */
__device__ __forceinline__ float gi_mix(const gi_args &a, uint64_t j, const float *cf, bool all)
{
    float b = a.vec_delta || a.add_base ? gi_slot(a, 0, j) : 0.0f;
    float out = 0.0f;
    bool first = true;
    for (unsigned k = 0; k < a.n_vecs; k++) {
        if (!all && !a.use[k])
            continue;
        float v = gi_vec(a, k, j, b);
        out = first ? cf[k] * v : out + cf[k] * v;
        first = false;
    }
    return a.add_base ? b + out : out;
}

/* model_stock's element with coefficients (sa, sb). */
__device__ __forceinline__ float gi_stock(const gi_args &a, uint64_t j, float sa, float sb)
{
    float X[MS_MAX_MODELS];
    for (unsigned i = 1; i <= a.n_models; i++)
        X[i - 1] = gi_slot(a, i, j);
    return ms_interp_model_stock(gi_slot(a, 0, j), X, 1, a.n_models, sa, sb);
}

/* APPLY: the merged output of every element of the chunk. */
__global__ void k_apply(const __grid_constant__ gi_args a)
{
    GPU_FOR_ELEMS(j, a.n)
    {
        float v;
        switch (a.apply) {
        case MS_INTERP_APPLY_MIX:
            v = gi_mix(a, j, a.coef, false);
            break;
        case MS_INTERP_APPLY_LINE_MIX: {
            uint64_t line = a.line_cols ? j % a.cols : j / a.cols;
            v = gi_mix(a, j, a.line_coef + line * 2, true);
            break;
        }
        case MS_INTERP_APPLY_COPY:
            v = gi_slot(a, a.copy_slot, j);
            break;
        case MS_INTERP_APPLY_STOCK:
            v = gi_stock(a, j, a.stock_a, a.stock_b);
            break;
        case MS_INTERP_APPLY_STOCK_ROWS: {
            uint64_t lr = j / a.cols;
            v = gi_stock(a, j, a.stock_ab[lr * 2], a.stock_ab[lr * 2 + 1]);
            break;
        }
        case MS_INTERP_APPLY_NEARSWAP:
            v = ms_interp_nearswap(gi_slot(a, 0, j), gi_slot(a, 1, j), a.t32);
            break;
        case MS_INTERP_APPLY_RAM: {
            float b = gi_slot(a, 0, j);
            float d[MS_MAX_MODELS];
            for (unsigned i = 1; i <= a.n_models; i++)
                d[i - 1] = ms_merge_delta(gi_slot(a, i, j), b);
            v = ms_interp_ram(b, d, 1, a.eps32, a.lambda, a.n_models);
            break;
        }
        default: /* ZERO */
            v = 0.0f;
            break;
        }
        gpu_store(a.out, a.out_dtype, j, v);
    }
}

/* ================================================================ host */

/* One thread per item, GI_SUM_THREADS per block. */
static unsigned gi_sum_grid(uint64_t items)
{
    uint64_t blocks = (items + GI_SUM_THREADS - 1) / GI_SUM_THREADS;
    GPU_ASSERT(blocks <= 0x7fffffffu);
    return (unsigned)(blocks ? blocks : 1);
}

/* Blocks for one warp per item (k_gram_blocks, k_gram_rows). */
static unsigned gi_warp_grid(uint64_t items)
{
    return gi_sum_grid(items * 32u);
}

/* The inputs' and output's device addresses and dtypes (NULL where the
 * layout holds none), for both kernel argument structs. */
static void gi_fill_io(const ms_tensor_params *p, const gi_layout *L, unsigned char *dev, const void **in, int *dtype,
                       void **out, int *out_dtype)
{
    for (unsigned i = 0; i <= p->n_models; i++) {
        dtype[i] = p->in_dtype[i];
        in[i] = L->in_off[i] != GI_NONE ? dev + L->in_off[i] : NULL;
    }
    if (L->out_off != GI_NONE) {
        *out = dev + L->out_off;
        *out_dtype = p->out_dtype;
    }
}

static void gi_args_fill(gi_args *a, const ms_tensor_params *p, const ms_interp_state *is, const gi_need *nd,
                         const gi_layout *L, const ms_chunk *c, unsigned char *dev)
{
    memset(a, 0, sizeof *a);
    a->elem0 = c->elem0;
    a->n = L->n;
    a->row0 = c->row0;
    a->n_rows = c->n_rows;
    a->cols = p->cols;
    a->n_models = p->n_models;
    gi_fill_io(p, L, dev, a->in, a->dtype, &a->out, &a->out_dtype);
    a->n_vecs = is->n_vecs;
    for (unsigned k = 0; k < is->n_vecs; k++) {
        a->vec_slot[k] = (uint8_t)is->vec_slot[k];
        a->coef[k] = is->coef[k];
        a->use[k] = is->use[k];
    }
    a->vec_delta = is->vec_delta;
    a->q = nd->q;
    if (nd->kind == MS_MERGE_PASS_LINE_GRAM) { /* two vectors: (0,0), (0,1), (1,1) */
        static const uint8_t pa[3] = {0, 0, 1}, pb[3] = {0, 1, 1};
        for (unsigned s = 0; s < 3; s++) {
            a->pair_a[s] = pa[s];
            a->pair_b[s] = pb[s];
        }
    } else {
        for (unsigned va = 0; va < is->n_vecs; va++)
            for (unsigned vb = va; vb < is->n_vecs; vb++) {
                unsigned s = ms_interp_pair(va, vb, is->n_vecs);
                a->pair_a[s] = (uint8_t)va;
                a->pair_b[s] = (uint8_t)vb;
            }
    }
    if (nd->kind == MS_MERGE_PASS_GRAM)
        for (unsigned s = 0; s < is->n_sums; s++)
            a->open[s] = is->open[s];
    a->apply = is->apply;
    a->copy_slot = is->copy_slot;
    a->add_base = is->add_base;
    a->line_cols = is->line_cols;
    a->line_coef = L->coef_off != GI_NONE ? (const float *)(dev + L->coef_off) : NULL;
    a->line_open = L->open_off != GI_NONE ? (const double *)(dev + L->open_off) : NULL;
    a->stock_a = is->stock_a;
    a->stock_b = is->stock_b;
    a->stock_ab = L->ab_off != GI_NONE ? (float *)(dev + L->ab_off) : NULL;
    a->t32 = (float)p->t;
    for (unsigned i = 1; i <= p->n_models; i++) {
        a->eps32[i - 1] = is->eps32[i];
        a->lambda[i - 1] = is->lambda[i];
    }
}

/* The call of the sce / arcee_fusion kernels (gpu_merge_interp_keys.cu). */
static void gi_sel_fill(gi_sel_call *a, const ms_tensor_params *p, const ms_interp_state *is, const gi_need *nd,
                        const gi_layout *L, const ms_chunk *c, unsigned char *dev)
{
    memset(a, 0, sizeof *a);
    a->kind = nd->kind;
    a->fusion = nd->fusion;
    a->elem0 = c->elem0;
    a->n = L->n;
    a->n_rows = c->n_rows;
    a->cols = p->cols;
    a->n_models = p->n_models;
    gi_fill_io(p, L, dev, a->in, a->dtype, &a->out, &a->out_dtype);
    if (L->hist_off != GI_NONE) {
        a->hist_hi = (unsigned long long *)(dev + L->hist_off);
        a->n_zero = (unsigned long long *)(dev + L->zero_off);
    }
    if (nd->kind == MS_MERGE_PASS_KEY_LO) {
        a->n_ranks = nd->n_ranks;
        for (unsigned r = 0; r < nd->n_ranks; r++) {
            a->bin[r] = is->rank[r].bin;
            a->hist_lo[r] = is->rank[r].owns_lo ? (unsigned long long *)(dev + L->lo_off[r]) : NULL;
        }
    }
    a->sel = is->sel;
    a->sel_key = is->sel_key;
    a->sel_take = is->sel_take;
    a->split = nd->split;
    a->eq_seen = is->eq_seen;
    a->n_seg = L->n_seg;
    a->mask = L->mask_off != GI_NONE ? dev + L->mask_off : NULL;
    a->seg_cnt = L->cnt_off != GI_NONE ? (uint64_t *)(dev + L->cnt_off) : NULL;
    a->seg_start = L->start_off != GI_NONE ? (uint64_t *)(dev + L->start_off) : NULL;
    a->eq_total = L->eqtot_off != GI_NONE ? (unsigned long long *)(dev + L->eqtot_off) : NULL;
    a->n_blocks = L->n_blocks;
    if (nd->kind == MS_MERGE_PASS_SUMSQ) {
        GPU_ASSERT(is->n_sums == p->n_models);
        for (unsigned i = 0; i < p->n_models; i++)
            a->open[i] = is->open[i];
        a->blk = (double *)dev; /* the results' start */
    }
    for (unsigned i = 1; i <= p->n_models; i++)
        a->w[i - 1] = is->w[i];
    if (L->kl_off != GI_NONE)
        a->row_kl = (double *)(dev + L->kl_off);
    else if (L->klin_off != GI_NONE)
        a->row_kl = (double *)(dev + L->klin_off);
    a->threshold = is->threshold;
}

/* Takes the test knob (gpu_backend_fail_next_for_tests) under the lock. */
static bool gi_take_poison(gpu_backend *b)
{
    pthread_mutex_lock(&b->lock);
    bool poison = b->fail_next;
    b->fail_next = false;
    pthread_mutex_unlock(&b->lock);
    return poison;
}

/* Enqueues the whole call on the lane's three streams and waits for it:
 * copies in, kernels, copies out (results into l->host_tmp). */
static gpu_status gi_enqueue(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, const ms_interp_state *is,
                             const gi_need *nd, const gi_layout *L, const ms_chunk *c, unsigned char *dev, char *msg,
                             size_t msg_len)
{
    cudaStream_t in = b->copy_in, comp = b->compute, out = b->copy_out;
    for (unsigned i = 0; i <= p->n_models; i++)
        if (L->in_off[i] != GI_NONE)
            GPU_CHECK(cudaMemcpyAsync(dev + L->in_off[i], c->in[i], L->in_bytes[i], cudaMemcpyHostToDevice, in),
                      "copying inputs to the GPU");
    if (L->open_off != GI_NONE)
        GPU_CHECK(cudaMemcpyAsync(dev + L->open_off, is->line_open, L->open_bytes, cudaMemcpyHostToDevice, in),
                  "copying column sums to the GPU");
    if (L->coef_off != GI_NONE) {
        const float *coef = is->line_cols ? is->line_coef : is->line_coef + c->row0 * 2;
        GPU_CHECK(cudaMemcpyAsync(dev + L->coef_off, coef, L->coef_bytes, cudaMemcpyHostToDevice, in),
                  "copying line coefficients to the GPU");
    }
    if (L->klin_off != GI_NONE)
        GPU_CHECK(cudaMemcpyAsync(dev + L->klin_off, is->row_kl + c->row0, L->klin_bytes, cudaMemcpyHostToDevice, in),
                  "copying row divergences to the GPU");
    GPU_CHECK(gpu_lane_inputs_sent(b, l), "ordering the GPU streams");

    if (gi_take_poison(b)) {
        gpu_poison_kernel<<<1, 1, 0, comp>>>();
        GPU_CHECK(cudaSuccess, "test poison kernel");
    }
    gi_args a;
    gi_args_fill(&a, p, is, nd, L, c, dev);
    gi_sel_call sc; /* filled for every method: cheap, and never read uninitialised */
    gi_sel_fill(&sc, p, is, nd, L, c, dev);
    bool sel = p->method == MS_METHOD_SCE || p->method == MS_METHOD_ARCEE_FUSION;
    switch (nd->kind) {
    case MS_MERGE_PASS_GRAM:
        k_gram_blocks<<<gi_warp_grid(L->n_blocks * nd->q), GI_SUM_THREADS, 0, comp>>>(a, L->n_blocks, (double *)dev);
        GPU_CHECK(cudaSuccess, "GRAM kernel");
        break;
    case MS_MERGE_PASS_LINE_GRAM:
        if (nd->line_cols) {
            k_line_cols<<<gi_sum_grid(p->cols * 3), GI_SUM_THREADS, 0, comp>>>(a, L->n_rseg, (double *)dev);
            GPU_CHECK(cudaSuccess, "column Gram kernel");
        } else {
            k_gram_rows<<<gi_warp_grid(c->n_rows * L->segs_row * 3), GI_SUM_THREADS, 0, comp>>>(a, L->segs_row,
                                                                                              (double *)dev);
            GPU_CHECK(cudaSuccess, "row Gram kernel");
        }
        break;
    case MS_MERGE_PASS_COUNT:
        GPU_CHECK(cudaMemsetAsync(dev, 0, L->res_bytes, comp), "clearing GPU counters");
        k_count<<<gpu_grid(L->n, GI_THREADS, GI_MAX_GRID), GI_THREADS, 0, comp>>>(a, (unsigned long long *)dev);
        GPU_CHECK(cudaSuccess, "COUNT kernel");
        break;
    case MS_MERGE_PASS_KEY_HI:
    case MS_MERGE_PASS_KEY_LO:
        GPU_ASSERT(sel);
        if (L->res_bytes)
            GPU_CHECK(cudaMemsetAsync(dev, 0, L->res_bytes, comp), "clearing GPU histograms");
        GPU_CHECK(gi_sel_enqueue(&sc, comp), "selection histogram kernels");
        break;
    case MS_MERGE_PASS_SUMSQ:
        GPU_ASSERT(sel);
        GPU_CHECK(gi_sel_enqueue(&sc, comp), "sce sum of squares kernels");
        break;
    case MS_MERGE_PASS_APPLY:
        if (nd->apply == MS_INTERP_APPLY_SCE || nd->apply == MS_INTERP_APPLY_FUSION) {
            GPU_ASSERT(sel);
            GPU_CHECK(gi_sel_enqueue(&sc, comp), "merge kernels");
            break;
        }
        if (nd->apply == MS_INTERP_APPLY_STOCK_ROWS) {
            double *seg = (double *)(dev + L->rowsum_off);
            k_gram_rows<<<gi_warp_grid(c->n_rows * L->segs_row * nd->q), GI_SUM_THREADS, 0, comp>>>(a, L->segs_row,
                                                                                                   seg);
            GPU_CHECK(cudaSuccess, "row Gram kernel");
            k_stock_coef<<<gi_sum_grid(c->n_rows), GI_SUM_THREADS, 0, comp>>>(a, L->segs_row, seg,
                                                                              (float *)(dev + L->ab_off));
            GPU_CHECK(cudaSuccess, "model_stock row coefficient kernel");
        }
        k_apply<<<gpu_grid(L->n, GI_THREADS, GI_MAX_GRID), GI_THREADS, 0, comp>>>(a);
        GPU_CHECK(cudaSuccess, "merge kernel");
        break;
    default:
        GPU_ASSERT(!"a pass kind the GPU interp kernels do not run");
    }
    GPU_CHECK(gpu_lane_computed(b, l), "ordering the GPU streams");

    if (L->out_off != GI_NONE)
        GPU_CHECK(cudaMemcpyAsync(c->out, dev + L->out_off, L->out_bytes, cudaMemcpyDeviceToHost, out),
                  "copying the output from the GPU");
    if (L->res_bytes)
        GPU_CHECK(cudaMemcpyAsync(l->host_tmp, dev, L->res_bytes, cudaMemcpyDeviceToHost, out),
                  "copying results from the GPU");
    GPU_CHECK(gpu_lane_wait(b, l), "running the merge kernels");
    return GPU_OK;
}

/* The call's results (in l->host_tmp) into the state, with the CPU's folds. */
static void gi_fold(const gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st, const gi_need *nd,
                    const gi_layout *L, const ms_chunk *c)
{
    ms_interp_state *is = st->interp;
    const double *res = (const double *)l->host_tmp;
    const unsigned char *raw = (const unsigned char *)l->host_tmp;
    switch (nd->kind) {
    case MS_MERGE_PASS_GRAM:
    case MS_MERGE_PASS_SUMSQ:
        ms_interp_fold(is->sum, is->open, is->n_sums, c->elem0, c->n_elems, res);
        break;
    case MS_MERGE_PASS_KEY_HI: { /* integer counts: the CPU's workers_reduce */
        const uint64_t *h = (const uint64_t *)(raw + L->hist_off);
        for (uint32_t k = 0; k < MS_INTERP_HI_BINS; k++)
            is->hist_hi[k] += h[k];
        is->n_zero += *(const uint64_t *)(raw + L->zero_off);
        if (L->kl_off != GI_NONE)
            memcpy(is->row_kl + c->row0, raw + L->kl_off, c->n_rows * sizeof(double));
        break;
    }
    case MS_MERGE_PASS_KEY_LO:
        for (unsigned r = 0; r < nd->n_ranks; r++) {
            if (!is->rank[r].owns_lo)
                continue;
            const uint64_t *h = (const uint64_t *)(raw + L->lo_off[r]);
            for (uint32_t k = 0; k < MS_MERGE_LO_BINS; k++)
                is->rank[r].hist_lo[k] += h[k];
        }
        break;
    case MS_MERGE_PASS_LINE_GRAM:
        if (nd->line_cols) {
            for (uint64_t col = 0; col < p->cols; col++)
                ms_interp_fold(is->line_sum + col * 3, is->line_open + col * 3, 3, c->row0, c->n_rows,
                               res + col * L->n_rseg * 3);
        } else {
            for (uint64_t lr = 0; lr < c->n_rows; lr++)
                for (unsigned s = 0; s < 3; s++) {
                    double tot = 0.0; /* segments in order, as cpu gram_rows */
                    for (uint64_t g = 0; g < L->segs_row; g++)
                        tot = tot + res[(lr * L->segs_row + g) * 3 + s];
                    is->line_sum[(c->row0 + lr) * 3 + s] = tot;
                }
        }
        break;
    case MS_MERGE_PASS_COUNT: {
        const uint64_t *cnt = (const uint64_t *)l->host_tmp;
        for (unsigned i = 1; i <= p->n_models; i++) {
            is->shared[i] += cnt[i];
            is->unique[i] += cnt[MS_MAX_MODELS + 1 + i];
        }
        break;
    }
    default:
        break;
    }
    if (L->eqtot_off != GI_NONE) /* sce's split tie: the equal keys of this chunk */
        is->eq_seen += *(const uint64_t *)(raw + L->eqtot_off);
    st->next_elem = c->elem0 + c->n_elems;
}

static bool gi_dtype_ok(st_dtype dt)
{
    return dt == ST_F32 || dt == ST_F16 || dt == ST_BF16;
}

typedef struct gi_call {
    gpu_backend *b;
    gpu_lane *l;
    const ms_tensor_params *p;
    ms_merge_state *st;
    const gi_need *nd;
    const gi_layout *L;
    const ms_chunk *c;
} gi_call;

/* gpu_call_fn: the whole call, then its results into the state. */
static gpu_status gi_call_run(void *ctx, unsigned char *dev, char *msg, size_t msg_len)
{
    const gi_call *k = (const gi_call *)ctx;
    gpu_status status = gi_enqueue(k->b, k->l, k->p, k->st->interp, k->nd, k->L, k->c, dev, msg, msg_len);
    if (status == GPU_OK)
        gi_fold(k->l, k->p, k->st, k->nd, k->L, k->c);
    return status;
}

gpu_status gpu_interp_run_pass(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                               unsigned pass, const ms_chunk *c, char *msg, size_t msg_len)
{
    GPU_ASSERT(pass < st->n_passes && st->interp);
    GPU_ASSERT(c->elem0 == st->next_elem);
    GPU_ASSERT(c->elem0 == c->row0 * p->cols && c->n_elems == c->n_rows * p->cols);
    GPU_ASSERT(c->elem0 + c->n_elems <= p->numel);
    GPU_ASSERT(p->n_models >= 1 && p->n_models <= MS_MAX_MODELS);
    GPU_ASSERT(gpu_interp_supports(p) && c->n_elems > 0);
    const ms_interp_state *is = st->interp;
    ms_merge_pass_kind kind = st->pass[pass];
    gi_need nd;
    gi_need_from_state(p, is, kind, &nd);
    gi_layout L;
    if (!gi_layout_compute(p, &nd, c->row0, c->n_rows, &L)) {
        if (msg && msg_len)
            snprintf(msg, msg_len, "needs more device memory than can be addressed");
        return GPU_OOM;
    }
    for (unsigned i = 0; i <= p->n_models; i++)
        if (L.in_off[i] != GI_NONE)
            GPU_ASSERT(gi_dtype_ok(p->in_dtype[i]) && c->in[i]);
    if (kind == MS_MERGE_PASS_APPLY)
        GPU_ASSERT(gi_dtype_ok(p->out_dtype) && c->out);
    if (kind == MS_MERGE_PASS_APPLY && is->apply == MS_INTERP_APPLY_MIX) {
        bool any = false; /* cpu tile_mix asserts the same */
        for (unsigned k = 0; k < is->n_vecs; k++)
            any |= is->use[k];
        GPU_ASSERT(any);
    }

    cudaError_t rc = cudaSetDevice(b->device);
    if (rc != cudaSuccess)
        return gpu_backend_classify(b, rc, "cudaSetDevice", msg, msg_len);
    gpu_status reserved = gpu_lane_reserve_results(l, L.res_bytes, msg, msg_len);
    if (reserved != GPU_OK)
        return reserved;
    gi_call k = {b, l, p, st, &nd, &L, c};
    return gpu_backend_run_call(b, l, L.total, gi_call_run, &k, msg, msg_len);
}

bool gpu_interp_supports(const ms_tensor_params *p)
{
    if (!ms_merge_interp_method(p->method)) /* every interpolation method */
        return false;
    if (p->n_models < 1 || p->n_models > MS_MAX_MODELS || !gi_dtype_ok(p->out_dtype))
        return false;
    for (unsigned i = 1; i <= p->n_models; i++)
        if (!gi_dtype_ok(p->in_dtype[i]))
            return false;
    return !gi_method_needs_base(p) || gi_dtype_ok(p->in_dtype[0]);
}

uint64_t gpu_interp_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows)
{
    if (!gpu_interp_supports(p))
        return UINT64_MAX;
    if (n_rows == 0 || p->cols == 0)
        return 0;
    ms_merge_state plan; /* only n_passes and pass[] are filled */
    memset(&plan, 0, sizeof plan);
    ms_merge_interp_plan(p, &plan);
    uint64_t worst = 0;
    for (unsigned k = 0; k < plan.n_passes; k++) {
        gi_need nd;
        gi_need_worst(p, plan.pass[k], &nd);
        gi_layout L;
        if (!gi_layout_compute(p, &nd, GI_NONE, n_rows, &L))
            return UINT64_MAX;
        uint64_t bytes = gpu_mempool_class_size(L.total);
        if (bytes == UINT64_MAX)
            return UINT64_MAX;
        if (bytes > worst)
            worst = bytes;
    }
    return worst;
}
