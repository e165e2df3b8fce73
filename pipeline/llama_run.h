/* Calibration forward passes over a streamed model: the driver behind
 * `mergestream hessian` (per-layer input statistics) and `mergestream
 * perplexity` (mean next-token NLL), on cpu/llama_forward.h.
 *
 * Streaming: layer by layer. Every sample goes through layer l before layer
 * l + 1 is read, so at any time the process holds one layer's weights (fp32,
 * cpu_llama_layer_bytes), that layer's statistics (cpu/hessian_accum.h), the
 * scratch of one batch (cpu_llama_scratch_bytes) and the residual stream of
 * the calibration set: n_tokens x hidden fp32 in RAM when that fits
 * act_budget, else in an unlinked temporary file (pread/pwrite) with one
 * batch of it in RAM. The head (perplexity) reads lm_head in slices of
 * vocab_chunk rows, each slice once, against every batch.
 *
 * Weights enter the pass in one place, ms_llama_layer_load (and the
 * embedding / norm / head reads of the driver), through an ms_llama_source
 * (pipeline/llama_source.h: a model directory, or BASE+ADAPTER with the
 * LoRA adapter applied on the fly).
 *
 * GPU: the GEMMs and Gram updates go through a cpu_llama_gemm seam, the
 * CPU's (OpenBLAS) or a GPU's (pipeline/backend_registry.h,
 * ms_gpu_gemm_seam). A GPU step that runs out of device memory is redone on
 * the CPU from the step's saved input rows, with one warning line ("GPU out
 * of memory on layer 3/16, batch 35/120 (needs X MiB, Y MiB free): using
 * CPU"); the next step tries the GPU again. A sticky GPU error sends the
 * rest of the run to the CPU, with one line. A step's statistics are added
 * only after its forward pass succeeded, and a Gram update that fails on the
 * GPU is finished on the CPU from the first row the GPU did not add, so no
 * row is ever counted twice or lost.
 *
 * Threading: one thread calls the driver; the pool and OpenBLAS work inside. */
#ifndef MS_LLAMA_RUN_H
#define MS_LLAMA_RUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "cpu/hessian_accum.h"
#include "cpu/llama_forward.h"
#include "io/calib_input.h"
#include "io/model_dir.h"
#include "io/ms_error.h"
#include "io/peft_adapter.h"
#include "pipeline/llama_source.h"
#include "pipeline/model_config.h"

/* ============================================================ statistics */

/* The statistics of one decoder layer, in the order the driver hands them
 * out. Each is shared by the modules ms_llama_stat_modules lists. */
typedef enum ms_llama_stat {
    MS_LLAMA_STAT_QKV,     /* "model.layers.L.self_attn.qkv_input": q_proj, k_proj, v_proj (width hidden) */
    MS_LLAMA_STAT_O,       /* "model.layers.L.self_attn.o_proj": o_proj (width q_dim) */
    MS_LLAMA_STAT_GATE_UP, /* "model.layers.L.mlp.gate_up_input": gate_proj, up_proj (width hidden) */
    MS_LLAMA_STAT_DOWN,    /* "model.layers.L.mlp.down_proj": down_proj (width intermediate) */
    MS_LLAMA_STAT_COUNT
} ms_llama_stat;

#define MS_LLAMA_HEAD_STAT "lm_head" /* the final norm's output: lm_head's input (width hidden) */

/* Writes the statistic's tensor name for layer into buf ("..." above). */
void ms_llama_stat_name(uint64_t layer, ms_llama_stat which, char *buf, size_t n);
/* Its width (the matrix is width x width). */
uint64_t ms_llama_stat_dim(const cpu_llama_config *cfg, ms_llama_stat which);
/* NULL-terminated module suffixes ("self_attn.q_proj", ...) it serves. */
const char *const *ms_llama_stat_modules(ms_llama_stat which);

/* ============================================================ the run */

/* The calibration tokens, packed: the real tokens of every sample in order. */
typedef struct ms_llama_tokens {
    uint64_t n_samples;
    uint64_t n;           /* real tokens */
    uint64_t *tok_start;  /* n_samples + 1: sample s owns tokens [tok_start[s], tok_start[s + 1]) */
    uint32_t *pos;        /* n: position in the padded sample */
    int64_t *id;          /* n: token id */
    int64_t *target;      /* n: the next token's id when it is real and adjacent, else -1 */
} ms_llama_tokens;

/* A decoder layer's statistics still held on the GPU (on_stats_device). */
typedef struct ms_llama_dev_stats {
    uint64_t dim[MS_LLAMA_STAT_COUNT];  /* statistic k is dim x dim */
    uint64_t rows[MS_LLAMA_STAT_COUNT]; /* ... over rows rows: its output is scale = 2 / rows times the sum */
    /* Statistic k's output bytes (scale * sum, the full symmetric matrix in
     * fp32: what cpu_hessian_rows_out writes) into dst, enqueued. Each k
     * once. 0, or a negative errno: the statistic is lost (err names why
     * through the driver's log; the run must stop). */
    int (*out)(void *ctx, unsigned k, double scale, float *dst);
    /* Returns once every out so far has landed; any thread. 0 or a
     * negative errno. */
    int (*wait)(void *ctx);
    void *ctx;      /* out's: valid during on_stats_device only */
    void *wait_ctx; /* wait's: valid until ms_llama_run's caller closes its GPU seam */
} ms_llama_dev_stats;

typedef struct ms_llama_run_opts {
    uint64_t batch_size;  /* samples per batch, >= 1 */
    uint64_t act_budget;  /* bytes of residual stream kept in RAM; beyond it: a spill file */
    const char *spill_dir; /* directory of the spill file; NULL: $TMPDIR, else /tmp */
    uint64_t vocab_chunk; /* lm_head rows per slice; 0: about 256 MiB of fp32 per slice and logits */
    uint64_t flush_rows;  /* Hessian rows per fp32 block; 0: CPU_HESSIAN_FLUSH_ROWS */
    const char *label;    /* progress prefix ("hessian"); NULL: no progress lines */
    /* Load layer l + 1's weights on a thread of their own while layer l
     * runs (pipeline/layer_prefetch.h): one more layer's weights in memory
     * (cpu_llama_layer_bytes). Ignored for a source that uses_pool. */
    bool prefetch_weights;
    /* Statistics (NULL: none). Called after each decoder layer with its
     * MS_LLAMA_STAT_COUNT accumulators (layer < n_layers), and, when
     * head_stats, once more with layer = n_layers and the head's one. The
     * accumulators are the driver's; they are reset or freed after the call.
     * Returns 0 or -1 with err set (stops the run). */
    int (*on_stats)(void *ctx, uint64_t layer, cpu_hessian *const *stats, unsigned n, ms_error *err);
    /* Optional, with a GPU seam that has stat_out: a decoder layer whose
     * statistics were all held on the GPU (no row of theirs added on the
     * host) goes here instead, so that they need not come back through the
     * host's fp64 matrices. Returns 0 (taken: the callee called dev->out
     * for every statistic), 1 (declined, nothing taken: on_stats gets them
     * as usual) or -1 with err set (stops the run). Same ctx. */
    int (*on_stats_device)(void *ctx, uint64_t layer, const ms_llama_dev_stats *dev, ms_error *err);
    void *stats_ctx;
    bool head_stats;
    bool nll; /* run the head and sum the next-token NLL */
    /* Tests: every slice of logits (rows = tokens [t0, t0 + n) of tok, columns
     * = vocabulary ids [v0, v0 + nv)). Needs nll. */
    void (*on_logits)(void *ctx, const ms_llama_tokens *tok, uint64_t t0, uint64_t n, uint64_t v0, uint64_t nv,
                      const float *logits);
    void *logits_ctx;
} ms_llama_run_opts;

typedef struct ms_llama_result {
    uint64_t n_samples;   /* the calibration set's samples (io/calib_input.c drops those without a real token) */
    uint64_t n_tokens;    /* real tokens: the N of H = 2/N sum x x^T */
    uint64_t n_predicted; /* tokens with a target (nll) */
    double nll_sum;       /* sum of -log p(target) over them, fp64 in token order */
    double seconds;       /* wall time of the run */
    double flops;         /* useful floating-point operations: linear layers (2 per
                             multiply-add), causal attention (scores and values of
                             the keys each query sees), Gram updates (k(k+1) per row
                             of width k) and the head */
    double output_seconds; /* of which inside on_stats (hessian: converting the statistics, waiting for the
                              last layer's writes) */
    /* Where the decoder layers' time went (seconds, for benchmarks): in all,
     * the linear layers' GEMMs, the attention (both through the seam: a
     * GPU's copies included), and adding the decoder layers' statistics
     * (Gram updates). The layers' rest is norms, RoPE, SwiGLU and residual
     * adds on the CPU; a GPU seam that runs whole layers (cpu_llama_gemm's
     * layer) counts all of a layer there, and its statistics in the layer. */
    double layer_seconds, linear_seconds, attention_seconds, stats_seconds;
    bool spilled;         /* the residual stream lived in a spill file */
    uint64_t act_bytes;   /* its size */
    uint64_t batches;
    /* Where the steps ran; a step is one batch through one decoder layer or
     * one lm_head slice. With a GPU seam, steps_gpu ran entirely on it and
     * steps_cpu are the rest (fallbacks, and everything after the GPU was
     * disabled); with the CPU's seam every step is a steps_cpu. */
    uint64_t steps_gpu, steps_cpu;
    uint64_t gpu_fallbacks; /* GPU failures redone on the CPU (a step, or a step's statistic) */
    bool gpu_disabled;      /* a sticky GPU error sent the rest of the run to the CPU */
} ms_llama_result;

/* Runs the calibration set through the model described by cfg (checked with
 * ms_llama_check beforehand; calib's ids checked against cfg->vocab). gemm
 * and pool (NULL: no pool) do the work: gemm NULL is the CPU's
 * (cpu_llama_gemm_blas); a given gemm is a GPU's, which may fail and whose
 * failed steps cpu_llama_gemm_blas redoes (see the top of this file; its
 * weights_changed is called whenever the layer or lm_head slice in memory
 * changes). Returns 0 and *res, or -1 with err set (I/O, memory:
 * MS_EXIT_RUNTIME; a GPU error after statistics were partly updated:
 * MS_EXIT_RUNTIME; whatever on_stats reports). */
int ms_llama_run(const ms_llama_source *src, const cpu_llama_config *cfg, const ms_calib *calib,
                 const ms_llama_run_opts *opt, cpu_pool *pool, const cpu_llama_gemm *gemm, ms_llama_result *res,
                 ms_error *err);

/* ============================================================ a session */

/* What both commands open before a run: the model directory (with its
 * adapter for BASE+ADAPTER), its config, a source over it, and the
 * calibration tokens (checked against the vocabulary). */
typedef struct ms_llama_session {
    ms_model *model;   /* the model directory (BASE of BASE+ADAPTER) */
    ms_peft *adapter;  /* BASE+ADAPTER: the adapter, validated against model; else NULL */
    ms_model_config config; /* model's config.json (an adapter changes no shape) */
    ms_llama_source src;
    ms_calib *calib;
} ms_llama_session;

/* Opens model_path (a model directory, or BASE_DIR+ADAPTER_DIR split by
 * ms_llama_model_split: the adapter is validated against the base by
 * ms_peft_open before anything else is read, its errors exit 3 for
 * mismatched data and 2 for unsupported adapters such as PiSSA), parses the
 * base's config.json, checks the tensors as the pass will see them
 * (ms_llama_check with need_head), then loads calib_path with co and checks
 * its ids. A lone adapter or a lone .safetensors file is refused (exit 2 and
 * 3). pool (may be NULL; must outlive the session) computes LoRA deltas.
 * Returns 0 and *s (close with ms_llama_session_close), or -1 with err set
 * and *s empty. Blocks on I/O. */
int ms_llama_session_open(const char *model_path, const char *calib_path, const ms_calib_options *co,
                          bool need_head, cpu_pool *pool, ms_llama_session *s, ms_error *err);
/* After a run: every file the weights came from (the base's shards, the
 * adapter's file) is unchanged since it was opened. Returns 0, or -1 with
 * err set (st_file_check_unchanged). */
int ms_llama_session_check_unchanged(const ms_llama_session *s, ms_error *err);
/* Frees everything; an empty session is a no-op. */
void ms_llama_session_close(ms_llama_session *s);

/* Host bytes one run holds besides the residual stream: one layer's fp32
 * weights, its statistics (with fp64 matrices when n_tokens > flush_rows;
 * none without stats), the batch scratch for batches of at most max_tokens
 * rows and, with head, one lm_head slice with its logits and the NLL state
 * (default vocab_chunk). UINT64_MAX on overflow. */
uint64_t ms_llama_fixed_bytes(const cpu_llama_config *cfg, bool stats, bool head, uint64_t n_tokens,
                              uint64_t flush_rows, uint64_t max_tokens, uint64_t max_seq, uint64_t max_pos);

#endif
