/* The decoder forward pass of LlamaForCausalLM, MistralForCausalLM and
 * Qwen2ForCausalLM on the CPU, one layer at a time, as transformers computes
 * it in float32 (facts from transformers' modeling_llama / modeling_mistral /
 * modeling_qwen2 and modeling_rope_utils; no code taken from there):
 *
 *   embedding rows (the caller reads them: cpu/ reads no files)
 *   per layer:  xn = RMSNorm(x) * attn_norm     RMSNorm(x) = x / sqrt(mean(x^2) + eps)
 *               q, k, v = xn Wq^T (+bq), xn Wk^T (+bk), xn Wv^T (+bv)
 *               q, k = RoPE(q), RoPE(k)          rotate-half layout, per head
 *               a = softmax(q k^T / sqrt(head_dim) + mask) v   per head; GQA:
 *                   query head h reads kv head h / (n_heads / n_kv_heads)
 *               x = x + (a Wo^T (+bo))
 *               xn = RMSNorm(x) * mlp_norm
 *               x = x + (silu(xn Wg^T) * (xn Wu^T)) Wd^T    (+ MLP biases if any)
 *   final:      RMSNorm(x) * norm, logits = that times lm_head^T (or the
 *               embedding matrix when the embeddings are tied)
 *
 * RoPE: inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim / 2, rounded to
 * fp32; rope_scaling "linear" divides it by factor; "llama3" divides the low
 * frequencies (wavelength 2 pi / inv_freq > original_max_position_embeddings /
 * low_freq_factor) by factor, keeps the high ones (wavelength <
 * original_max / high_freq_factor) and blends in between with smooth =
 * (original_max / wavelength - low_freq_factor) / (high_freq_factor -
 * low_freq_factor): (1 - smooth) * inv_freq / factor + smooth * inv_freq.
 * The angle of position p is the fp32 product p * inv_freq[i] (transformers'
 * fp32 matmul of inv_freq and the position ids); cos and sin of that fp32
 * angle are rounded to fp32. out[i] = v[i] cos - v[i + half] sin,
 * out[i + half] = v[i + half] cos + v[i] sin.
 *
 * Padding and the mask. The rows a layer sees are the real (unpadded)
 * tokens of each sequence, packed: padding never enters a GEMM, a Hessian or
 * an attention sum. A token keeps the position it had in the padded sample
 * (transformers' default position_ids = 0..seq-1), which drives RoPE; packed
 * rows of a sequence are in increasing position order, so "key position <=
 * query position" (causal AND padding mask) is "key row <= query row". For
 * real tokens this is exactly what transformers computes with an attention
 * mask; what it computes at padding positions is never used by real tokens.
 * Mistral's sliding window (config sliding_window W > 0) further limits the
 * keys to positions > query position - W.
 *
 * Arithmetic: fp32 throughout, with fp64 only for the RMSNorm mean of squares
 * and the log-sum-exp of the NLL; exp is a vectorised polynomial accurate to
 * about 2 ulp (softmax, SiLU). The GEMMs (linear layers, attention scores and
 * values, Gram matrices) go through cpu_llama_gemm, the seam where a GPU
 * GEMM can replace OpenBLAS; everything else runs on the cpu_pool.
 *
 * Failure: OpenBLAS never fails, a GPU can (out of memory, a sticky error).
 * A failed GEMM stops the layer (or the logits) with its error; the
 * caller reruns the batch with another seam from its own copy of the
 * residual rows. The statistics are not the forward pass's business: after
 * a layer succeeded, cpu_llama_linear_input hands out the inputs of its
 * linear layers and the caller adds them to its accumulators
 * (cpu/hessian_accum.h), so a failed batch never leaves half its rows in a
 * statistic.
 *
 * Threading: one thread at a time calls a cpu_llama (the pool and OpenBLAS
 * provide the parallelism inside each call). */
#ifndef MS_LLAMA_FORWARD_H
#define MS_LLAMA_FORWARD_H

#include <stdbool.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "cpu/hessian_accum.h"

/* ============================================================ the model */

typedef enum cpu_rope_kind {
    CPU_ROPE_DEFAULT,
    CPU_ROPE_LINEAR, /* rope_factor */
    CPU_ROPE_LLAMA3, /* rope_factor, low/high_freq_factor, original_max_pos */
} cpu_rope_kind;

/* The shape and constants of one model (pipeline/model_config.h fills it
 * from config.json). Invariants (cpu_llama_open asserts them): every size >=
 * 1, n_heads a multiple of n_kv_heads, head_dim even. */
typedef struct cpu_llama_config {
    uint64_t hidden;       /* hidden_size */
    uint64_t intermediate; /* intermediate_size */
    uint64_t n_layers;     /* num_hidden_layers */
    uint64_t n_heads;      /* num_attention_heads */
    uint64_t n_kv_heads;   /* num_key_value_heads */
    uint64_t head_dim;     /* head_dim, else hidden / n_heads */
    uint64_t vocab;        /* vocab_size */
    double rms_eps;        /* rms_norm_eps */
    double rope_theta;
    cpu_rope_kind rope_kind;
    double rope_factor;
    double rope_low_freq_factor, rope_high_freq_factor;
    double rope_original_max_pos; /* original_max_position_embeddings */
    uint64_t sliding_window;      /* 0: none */
    bool qkv_bias;       /* q/k/v_proj have biases (Qwen2; Llama attention_bias) */
    bool o_bias;         /* o_proj has a bias (Llama attention_bias) */
    bool mlp_bias;       /* gate/up/down_proj have biases (Llama mlp_bias) */
    bool tie_embeddings; /* lm_head is embed_tokens */
} cpu_llama_config;

static inline uint64_t cpu_llama_q_dim(const cpu_llama_config *c) { return c->n_heads * c->head_dim; }
static inline uint64_t cpu_llama_kv_dim(const cpu_llama_config *c) { return c->n_kv_heads * c->head_dim; }
/* Rows of the fused q/k/v weight: q_dim + 2 * kv_dim. */
static inline uint64_t cpu_llama_qkv_rows(const cpu_llama_config *c)
{
    return cpu_llama_q_dim(c) + 2 * cpu_llama_kv_dim(c);
}

/* One decoder layer's weights in fp32, row-major as stored ([out, in]).
 * q/k/v and gate/up are fused so each pair or triple is one GEMM. */
typedef struct cpu_llama_layer {
    float *attn_norm; /* (hidden)                     input_layernorm */
    float *w_qkv;     /* (q_dim + 2 kv_dim, hidden)   q_proj rows, then k_proj, then v_proj */
    float *b_qkv;     /* (q_dim + 2 kv_dim) or NULL   their biases, same order */
    float *w_o;       /* (hidden, q_dim)              o_proj */
    float *b_o;       /* (hidden) or NULL */
    float *mlp_norm;  /* (hidden)                     post_attention_layernorm */
    float *w_gate_up; /* (2 intermediate, hidden)     gate_proj rows, then up_proj */
    float *b_gate_up; /* (2 intermediate) or NULL */
    float *w_down;    /* (hidden, intermediate)       down_proj */
    float *b_down;    /* (hidden) or NULL */
    void *block;      /* the one allocation every pointer above lies in */
} cpu_llama_layer;

/* Bytes cpu_llama_layer_alloc takes for cfg (UINT64_MAX on overflow). */
uint64_t cpu_llama_layer_bytes(const cpu_llama_config *cfg);
/* Allocates every array of one layer in one block (biases only where cfg
 * has them; uninitialised). Returns 0, -ENOMEM or -EOVERFLOW; *w is zeroed
 * on failure. Free with cpu_llama_layer_free. */
int cpu_llama_layer_alloc(const cpu_llama_config *cfg, cpu_llama_layer *w);
/* Frees and zeroes *w; a zeroed layer is a no-op. */
void cpu_llama_layer_free(cpu_llama_layer *w);

/* ============================================================ the GEMM seam */

/* B is a weight: its memory does not change until the seam's
 * weights_changed is called, so an implementation may keep a copy (a GPU
 * keeps it on the device, keyed by pointer and shape). */
#define CPU_GEMM_B_WEIGHT 1u

/* C[m, n] = alpha * A[m, k] * op(B) + beta * C, row-major with leading
 * dimensions lda, ldb, ldc; op(B) = B^T with B stored [n, k] when trans_b,
 * else B stored [k, n]. beta = 0 ignores C's old contents (NaN included).
 * flags: CPU_GEMM_B_WEIGHT or 0. Returns 0, or (a GPU's) -ENOMEM (device
 * memory ran out; not sticky) or -EIO (a sticky device error); C's contents
 * are then unspecified. */
typedef int (*cpu_gemm_fn)(void *ctx, bool trans_b, uint64_t m, uint64_t n, uint64_t k, float alpha,
                           const float *a, uint64_t lda, const float *b, uint64_t ldb, float beta, float *c,
                           uint64_t ldc, unsigned flags);

/* The causal attention of a whole batch, the layer's step between RoPE and
 * o_proj, for an implementation that keeps it where its GEMMs run (a GPU:
 * the scores never cross the bus). Same semantics as the CPU's (see the
 * top of this file), fp32, results within rounding of the CPU's. */
typedef struct cpu_llama_attend_args {
    uint64_t n_tokens, n_seqs;
    const uint64_t *seq_start; /* cpu_llama_batch's */
    const uint32_t *pos;       /* cpu_llama_batch's */
    uint64_t n_heads, n_kv_heads, head_dim;
    uint64_t window;           /* sliding window, 0: none */
    float scale;               /* applied to the scores: 1 / sqrt(head_dim) rounded to fp32 */
    const float *qkv;          /* n_tokens x (q_dim + 2 kv_dim): q and k after RoPE, v (dense rows) */
    float *attn;               /* n_tokens x q_dim: out (dense rows) */
} cpu_llama_attend_args;

#ifdef __CUDACC__
#define CPU_LLAMA_HD __host__ __device__
#else
#define CPU_LLAMA_HD
#endif

/* The first row j <= i of a sequence (pos: its positions, increasing) whose
 * position lies inside query i's window, pos[j] > pos[i] - window; 0 without
 * a window. Shared with the GPU's attention kernels. */
CPU_LLAMA_HD static inline uint64_t cpu_llama_window_first(const uint32_t *pos, uint64_t i, uint64_t window)
{
    if (window == 0 || pos[i] < window)
        return 0;
    uint64_t limit = pos[i] - window; /* keys need pos > limit */
    uint64_t lo = 0, hi = i;          /* pos[i] > limit, so the answer is in [0, i] */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (pos[mid] > limit)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Returns 0, -ENOMEM or -EIO (cpu_gemm_fn's contract; attn unspecified on
 * failure). */
typedef int (*cpu_attend_fn)(void *ctx, const cpu_llama_attend_args *a);

/* A whole decoder layer in one call (cpu_llama_layer_args, below). */
struct cpu_llama_layer_args;
typedef int (*cpu_layer_fn)(void *ctx, const struct cpu_llama_layer_args *a);

typedef struct cpu_llama_gemm {
    void *ctx;        /* passed to every function */
    cpu_gemm_fn gemm; /* linear layers, attention, logits */
    cpu_gram_fn gram; /* Hessian statistics (cpu/hessian_accum.h) */
    /* The attention of a batch in one call; NULL: the scores and weighted
     * values go through gemm, the softmax runs on the cpu_pool. */
    cpu_attend_fn attend;
    /* Statistics kept where the implementation computes (a GPU's memory)
     * for a whole layer, so no Gram update comes back per batch; NULL: every
     * update goes through gram into the host accumulator. Slots 0..7.
     * stat_begin(slot, dim, flush_rows): 0, -ENOSPC (better kept on the
     * host: no room to spare), -ENOMEM (use the host's) or -EIO. stat_add: as gram, into the slot (0; -ENOMEM before anything
     * was added; -EIO: the slot's sum is lost). stat_finish(slot, h): adds
     * the slot's sum and rows into h (cpu_hessian_add_sum) and frees the
     * slot; h NULL frees only. Returns 0, -ENOMEM (nothing added) or -EIO
     * (h partly updated: close it). */
    int (*stat_begin)(void *ctx, unsigned slot, uint64_t dim, uint64_t flush_rows);
    int (*stat_add)(void *ctx, unsigned slot, const float *x, uint64_t n_rows, uint64_t ldx);
    int (*stat_finish)(void *ctx, unsigned slot, cpu_hessian *h);
    /* Optional, instead of stat_finish: the slot's sum straight into its
     * output bytes. stat_rows(slot): rows added so far. stat_out(slot,
     * scale, dst): enqueues scale * sum as cpu_hessian_rows_out writes it
     * (the full symmetric dim x dim matrix, fp32, row-major; the same bits
     * as stat_finish into a fresh accumulator and rows_out) into dst and
     * frees the slot; 0 or -EIO (the sum is lost). stat_out_wait(): returns
     * once every stat_out so far has landed in dst, 0 or -EIO; it may be
     * called from another thread while the others run. */
    uint64_t (*stat_rows)(void *ctx, unsigned slot);
    int (*stat_out)(void *ctx, unsigned slot, double scale, float *dst);
    int (*stat_out_wait)(void *ctx);
    /* Host memory for the batch buffers the GEMMs read and write (a GPU's
     * pinned memory copies two to five times faster than malloc's); NULL:
     * malloc. host_alloc may return NULL: then malloc is used. */
    void *(*host_alloc)(void *ctx, uint64_t bytes);
    void (*host_free)(void *ctx, void *p);
    /* A whole decoder layer where the implementation computes (a GPU: the
     * residual rows go up and come back once, everything between stays
     * there, the statistics included); NULL: the layer step by step
     * through gemm and attend. */
    cpu_layer_fn layer;
    /* The weights passed with CPU_GEMM_B_WEIGHT changed (a new layer was
     * loaded into the same memory): forget any copy. NULL: nothing kept. */
    void (*weights_changed)(void *ctx);
    /* One line about the last failure ("needs 512 MiB, 300 MiB free");
     * NULL for an implementation that never fails. */
    const char *(*last_error)(void *ctx);
} cpu_llama_gemm;

/* The CPU implementation: cblas_sgemm and cblas_ssyrk; never fails. */
cpu_llama_gemm cpu_llama_gemm_blas(void);
/* Sets OpenBLAS's thread count (>= 1). */
void cpu_llama_blas_set_threads(unsigned n);

/* ============================================================ batches */

/* The rows of one batch: the real tokens of n_seqs sequences, packed.
 * Sequence s owns rows [seq_start[s], seq_start[s + 1]); pos[r] is row r's
 * position in its padded sample, strictly increasing within a sequence and
 * below the max_pos given to cpu_llama_open. */
typedef struct cpu_llama_batch {
    uint64_t n_tokens;
    uint64_t n_seqs;
    const uint64_t *seq_start; /* n_seqs + 1 entries, seq_start[0] = 0, seq_start[n_seqs] = n_tokens */
    const uint32_t *pos;       /* n_tokens entries */
} cpu_llama_batch;

/* The inputs of a layer's linear layers. The q/k/v projections share one
 * input and gate/up another. Widths: hidden, q_dim, hidden, intermediate. */
typedef enum cpu_llama_input {
    CPU_LLAMA_IN_QKV,     /* RMSNorm output feeding q/k/v_proj */
    CPU_LLAMA_IN_O,       /* attention output feeding o_proj */
    CPU_LLAMA_IN_GATE_UP, /* RMSNorm output feeding gate/up_proj */
    CPU_LLAMA_IN_DOWN,    /* silu(gate) * up feeding down_proj */
    CPU_LLAMA_IN_COUNT
} cpu_llama_input;

/* What a seam's layer function gets (cpu_llama_layer_forward fills it). */
typedef struct cpu_llama_layer_args {
    const cpu_llama_config *cfg;
    const cpu_llama_layer *w;
    const cpu_llama_batch *b;
    const float *rope_cos, *rope_sin; /* (max_pos, head_dim / 2): the RoPE table */
    uint64_t max_pos;
    float attn_scale;
    float *x;                          /* n_tokens x hidden: the residual rows, overwritten with the output */
    int stat_slot[CPU_LLAMA_IN_COUNT]; /* >= 0: X^T X of linear input k into that statistics slot (stat_*) */
    float *input[CPU_LLAMA_IN_COUNT];  /* non-NULL: linear input k copied back there ... */
    uint64_t input_ld[CPU_LLAMA_IN_COUNT]; /* ... with this leading dimension */
} cpu_llama_layer_args;
/* A layer function returns 0; -ENOMEM (x, the slots and the inputs
 * untouched: the caller reruns the layer elsewhere); or -EIO (sticky: x
 * and the inputs unspecified, the slots' sums lost). */

/* ============================================================ the pass */

typedef struct cpu_llama cpu_llama;

/* Scratch bytes cpu_llama_open allocates (UINT64_MAX on overflow): per batch
 * row 4 * (3 hidden + q_dim + 2 kv_dim + q_dim + 2 intermediate), attention
 * blocks of up to 512 query rows per kv head times max_seq_tokens keys, and
 * the RoPE table (max_pos x head_dim / 2 cos/sin pairs). */
uint64_t cpu_llama_scratch_bytes(const cpu_llama_config *cfg, uint64_t max_tokens, uint64_t max_seq_tokens,
                                 uint64_t max_pos);

/* Prepares the pass for batches of at most max_tokens rows, sequences of at
 * most max_seq_tokens rows and positions below max_pos. cfg and *gemm are
 * copied; pool (may be NULL: the calling thread alone) must outlive the
 * object. Returns 0 and *out (close with cpu_llama_close), -ENOMEM or
 * -EOVERFLOW. */
int cpu_llama_open(const cpu_llama_config *cfg, uint64_t max_tokens, uint64_t max_seq_tokens, uint64_t max_pos,
                   cpu_pool *pool, const cpu_llama_gemm *gemm, cpu_llama **out);
/* NULL is a no-op. */
void cpu_llama_close(cpu_llama *m);

/* The seam the following calls use from now on (copied): a caller falls
 * back to the CPU's for one batch and back again. */
void cpu_llama_set_gemm(cpu_llama *m, const cpu_llama_gemm *gemm);

/* Runs one decoder layer on the batch: x (n_tokens x hidden, the residual
 * stream) is read and overwritten. Returns 0, or a GEMM's error (-ENOMEM,
 * -EIO: cpu_gemm_fn): x is then partly updated, and the caller reruns the
 * batch from its copy of x. Blocks. */
int cpu_llama_layer_forward(cpu_llama *m, const cpu_llama_layer *w, const cpu_llama_batch *b, float *x);

/* Seconds spent so far in cpu_llama_layer_forward: in all, in the linear
 * layers' GEMMs (through the seam, copies to and from a device included)
 * and in the attention (scores, softmax, weighted values). The rest of
 * *layers_s is the norms, RoPE, biases, SwiGLU and residual adds. */
void cpu_llama_times(const cpu_llama *m, double *layers_s, double *linear_s, double *attention_s);

/* For the seam's layer function (when it has one): which linear inputs the
 * next layers add into statistics slots where they run (slot[k] >= 0) and
 * which come back to the host for cpu_llama_linear_input (want[k]). The
 * step-by-step path keeps every input on the host and adds nothing. */
void cpu_llama_set_layer_outputs(cpu_llama *m, const int slot[CPU_LLAMA_IN_COUNT],
                                 const bool want[CPU_LLAMA_IN_COUNT]);
/* True when the last successful cpu_llama_layer_forward ran through the
 * seam's layer function: its slots got their rows. */
bool cpu_llama_layer_added_stats(const cpu_llama *m);

/* The batch's input rows of one of the linear layers of the last successful
 * cpu_llama_layer_forward (n_tokens rows, leading dimension *ld), valid
 * until the next call on m. */
const float *cpu_llama_linear_input(const cpu_llama *m, cpu_llama_input which, uint64_t *ld);

/* out[r] = RMSNorm(x[r]) * weight for n rows of width hidden (the final
 * norm). out may be x. */
void cpu_llama_rms_norm(cpu_llama *m, const float *x, const float *weight, uint64_t n, float *out);

/* out (n x n_rows) = xn (n x hidden) times w_rows^T (n_rows x hidden): a
 * slice of the logits, for vocabulary rows given by the caller (a weight for
 * the seam: CPU_GEMM_B_WEIGHT). Returns 0 or the GEMM's error (out is then
 * unspecified). */
int cpu_llama_logits(cpu_llama *m, const float *xn, uint64_t n, const float *w_rows, uint64_t n_rows, float *out);

/* Running log-sum-exp over vocabulary slices, one entry per token. */
typedef struct cpu_llama_nll {
    float *max;    /* largest logit so far (-INFINITY before the first slice) */
    double *sum;   /* sum of exp(logit - max) so far */
    float *target; /* the target's logit, once its slice was seen */
} cpu_llama_nll;

/* Folds a slice of logits (n tokens x n_cols, vocabulary ids [v0, v0 +
 * n_cols)) into the running state of tokens [0, n) of st (pointers already
 * offset by the caller); targets[t] is token t's next-token id, or -1 for a
 * token with no target (its state is still updated). After the last slice,
 * NLL = max + log(sum) - target. */
void cpu_llama_nll_update(cpu_llama *m, const float *logits, uint64_t n, uint64_t n_cols, uint64_t v0,
                          const int64_t *targets, const cpu_llama_nll *st);

/* exp(x) as the kernels compute it (tests compare against it). */
float cpu_llama_expf(float x);

#endif
