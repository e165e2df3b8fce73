/* The CUDA kernels of the interpolation and model-soup methods (private to
 * gpu/; the semantics are pipeline/merge_passes_interp.h's, the element
 * arithmetic pipeline/merge_math_interp.h's, the bytes cpu/cpu_merge_interp.c's).
 *
 * Supported (gpu_interp_supports): every interpolation method of
 * merge_passes_interp.h (slerp, nuslerp in its three modes, multislerp,
 * karcher, model_stock whole and filter_wise, nearswap, sce, ram,
 * ramplus_tl, arcee_fusion); every pass of their plans (GRAM, LINE_GRAM,
 * KEY_HI, KEY_LO, SUMSQ, COUNT, APPLY) and every APPLY variant.
 * gpu_merge_interp.cu has the passes' layout, uploads and folds and the
 * kernels of all but sce and arcee_fusion, whose kernels (selection keys,
 * histograms, tie positions, sums of squares, per-row KL, their APPLY) are
 * in gpu_merge_interp_keys.cu behind gi_sel_enqueue below.
 *
 * From CUDA C++ (the .cu files of gpu/, which include gpu/gpu_internal.h
 * first) every declaration below is visible; from C only the extern "C"
 * part, for the tests. gpu_merge_run_pass (gpu_backend.h) dispatches here. */
#ifndef MS_GPU_MERGE_INTERP_H
#define MS_GPU_MERGE_INTERP_H

#ifdef __cplusplus
#include "gpu/gpu_internal.h"
#else
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gpu/gpu_backend.h"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* True when every pass of p's plan runs here (the method is one of those
 * listed above and its dtypes are F32, F16 or BF16). */
bool gpu_interp_supports(const ms_tensor_params *p);

/* Device bytes one gpu_interp_run_pass call on a chunk of at most n_rows rows
 * of p allocates (one pool request; its size class included): an upper bound
 * over every pass of p's plan and every alignment of the chunk. 0 for no
 * elements; UINT64_MAX when p is not supported or the size overflows. */
uint64_t gpu_interp_chunk_bytes(const ms_tensor_params *p, uint64_t n_rows);

#ifdef __cplusplus
}

/* Runs pass `pass` of st's plan over chunk c (not empty) on lane l
 * (acquired by the caller, after gpu_merge_run_pass's checks for every
 * method: a broken backend, an empty chunk; p supported:
 * gpu_interp_supports). Same contract as
 * cpu_merge_interp_run_pass: the same state updates (st->interp's sums, open
 * blocks, line sums, counts; st->next_elem) and the same output bytes. Blocks
 * until the call's work is done (gpu_lane_wait). On GPU_OOM / GPU_FATAL the
 * state is untouched and msg receives one line ("needs X MiB, Y MiB free" /
 * the CUDA error). */
gpu_status gpu_interp_run_pass(gpu_backend *b, gpu_lane *l, const ms_tensor_params *p, ms_merge_state *st,
                               unsigned pass, const ms_chunk *c, char *msg, size_t msg_len);

extern "C" {
#include "pipeline/merge_passes_interp.h"
}

/* sce's tie positions: the chunk is cut into segments of GI_SEG elements,
 * one thread block of GI_SEG_THREADS each, walked in GI_SEG_SUB sub-tiles. */
#define GI_SEG_THREADS 256u
#define GI_SEG_SUB 16u
#define GI_SEG (GI_SEG_THREADS * GI_SEG_SUB)

/* One call's work for the sce / arcee_fusion kernels: device pointers into
 * the call's one pool request (laid out by gpu_merge_interp.cu) and the
 * state's scalars. Passed to the kernels by value. */
typedef struct gi_sel_call {
    ms_merge_pass_kind kind;     /* KEY_HI, KEY_LO, SUMSQ or APPLY */
    int fusion;                  /* arcee_fusion, else sce */
    uint64_t elem0, n;           /* the chunk: flat indices [elem0, elem0 + n) */
    uint64_t n_rows, cols;
    unsigned n_models;
    const void *in[MS_MAX_MODELS + 1]; /* the chunk's inputs (slots 0..n_models) */
    int dtype[MS_MAX_MODELS + 1];
    void *out;                   /* APPLY: the output, out_dtype */
    int out_dtype;
    /* KEY_HI: [MS_INTERP_HI_BINS] and one counter, zeroed before */
    unsigned long long *hist_hi, *n_zero;
    /* KEY_LO: per rank r < n_ranks, [MS_MERGE_LO_BINS] zeroed before, or
     * NULL when an earlier rank owns the bin */
    unsigned n_ranks;
    uint32_t bin[MS_INTERP_MAX_RANKS];
    unsigned long long *hist_lo[MS_INTERP_MAX_RANKS];
    /* sce's mask (SUMSQ, APPLY): sel; TOP fills mask [n] first, with the
     * exact tie positions when split (seg_cnt, seg_start: [n_seg] scratch;
     * eq_total: the chunk's count of key == sel_key, copied back) */
    int sel;                     /* ms_interp_sel */
    uint32_t sel_key;
    uint64_t sel_take;
    int split;
    uint64_t eq_seen;
    uint64_t n_seg;
    uint8_t *mask;
    uint64_t *seg_cnt, *seg_start;
    unsigned long long *eq_total;
    /* SUMSQ: blk [n_blocks][n_models] (ms_interp_fold's layout); block 0
     * continues open[i - 1] */
    uint64_t n_blocks;
    double open[MS_MAX_MODELS];
    double *blk;
    float w[MS_MAX_MODELS];      /* APPLY (sce): w_i at [i - 1] */
    /* arcee_fusion: the chunk rows' KL (KEY_HI writes it, KEY_LO and APPLY
     * read it) and APPLY's threshold */
    double *row_kl;
    double threshold;
} gi_sel_call;

/* Enqueues the kernels of call a on stream s (nothing else: the caller
 * copies, zeroes, waits). Returns the first launch error, or cudaSuccess. */
cudaError_t gi_sel_enqueue(const gi_sel_call *a, cudaStream_t s);
#endif

#endif
