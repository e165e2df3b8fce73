/* PEFT LoRA adapters as merge inputs (DESIGN.md, Recipe: `model: DIR+ADAPTER`).
 *
 * ms_peft_open reads adapter_config.json, maps every tensor of
 * adapter_model.safetensors to the base tensor it changes and validates all of
 * it against the base model's headers, before any tensor data is read. The
 * result is one ms_lora_target per changed base tensor; every other base
 * tensor is untouched (its task vector is zero: feed the base's own bytes).
 * The arithmetic lives in cpu/lora_delta.h.
 *
 * What an adapter does to a base tensor W (PEFT's LoraLayer semantics; facts
 * checked against huggingface/peft src/peft/tuners/lora/{layer,variants,dora}.py
 * and src/peft/utils/save_and_load.py; no code taken from there):
 *   LINEAR     W' = W + s * B @ A, A = lora_A [r, in], B = lora_B [out, r],
 *              W stored [out, in]. With fan_in_fan_out (GPT-2's Conv1D) W is
 *              stored [in, out] and the delta is (s * B @ A)^T.
 *   EMBEDDING  W [vocab, dim], A = lora_embedding_A [r, vocab],
 *              B = lora_embedding_B [dim, r]: W' = W + (s * B @ A)^T.
 *   REPLACE    modules_to_save (and biases saved with bias="all"/"lora_only"):
 *              the adapter holds the whole tensor; it replaces W.
 *   s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with r and
 *   lora_alpha taken from rank_pattern / alpha_pattern when a key matches.
 *   DoRA (use_dora, lora_magnitude_vector m): V = W + delta; each output
 *   feature of V is rescaled to norm m: W' = (m / ||V||_2) * V, the norm taken
 *   over the feature's input weights. An output feature is a row of a plain
 *   LINEAR weight, a column of a fan_in_fan_out weight and a column (an
 *   embedding dimension, over all tokens) of an embedding.
 *
 * Tensor names in the file: "base_model.model." + the module path in the base
 * model + a suffix. Suffixes (an adapter name such as "default" may follow the
 * role, as in PEFT's in-memory state dict; one name per file):
 *   .lora_A[.NAME].weight  .lora_B[.NAME].weight
 *   .lora_embedding_A[.NAME]  .lora_embedding_B[.NAME]
 *   .lora_magnitude_vector[.NAME][.weight]
 *   .modules_to_save[.NAME].PARAM -> replaces MODULE.PARAM
 *   .base_layer.weight -> the module's full base weight saved in the adapter
 *     (save_embedding_layers, e.g. after the vocabulary was resized): LoRA
 *     applies on top of it; alone, it replaces MODULE.weight
 *   any other key that is exactly a base tensor's name -> REPLACE (this is how
 *     PEFT saves modules_to_save and trained biases)
 * The LoRA target of a module is the base tensor MODULE.weight.
 *
 * Validation (all before any data is read; WHERE is the adapter directory):
 *   exit 3 (MS_EXIT_DATA): adapter_config.json not valid JSON or a field of the
 *     wrong type; a key that maps to no base tensor (a target module missing
 *     from the base, named with its shapes); lora_A / lora_B / magnitude /
 *     replacement shapes that disagree with the base tensor (all shapes named);
 *     a rank (A's rows, B's columns) that differs from r or its rank_pattern
 *     entry; lora_A without lora_B (or the reverse); a module whose weights
 *     target_modules (with exclude_modules, layers_to_transform) does not
 *     select: PEFT would silently ignore them, we refuse; target_modules that
 *     select no module of the base; a pickle (.bin) adapter (io/model_dir.h).
 *   exit 2 (MS_EXIT_USAGE): what we deliberately do not support: peft_type
 *     other than LORA; init_lora_weights pissa*, olora, corda*, loftq (they
 *     change the base weights too, so the adapter is only valid on the
 *     residual base saved at training time: convert such an adapter to a plain
 *     LoRA first, e.g. PEFT's path_initial_model_for_weight_conversion); aLoRA
 *     (alora_invocation_tokens); lora_bias; trainable_token_indices;
 *     target_parameters; layer_replication; LoRA on tensors that are not 2-D
 *     (convolutions); a regex construct POSIX cannot express.
 *   Warnings (one line each): a target_modules list entry that matches no
 *     module of the base; modules selected by target_modules that have no
 *     weights in the file (PEFT leaves them at their initial, zero delta).
 *
 * Regular expressions (target_modules / exclude_modules as a string:
 * re.fullmatch; rank_pattern / alpha_pattern keys: re.match of
 * "(.*\.)?(KEY)$", first key in file order wins; layers_pattern) are Python
 * `re` syntax, run with POSIX regcomp(REG_EXTENDED) after io/py_regex.h's
 * translation; what POSIX cannot express (lookarounds, backreferences, \b
 * \A \Z, inline flags) is refused (exit 2). "all-linear" selects every 2-D
 * .weight except embeddings (lora_embedding_* pairs never match it) and the
 * output layer (a top-level lm_head, embed_out, output, score or
 * classifier), following PEFT's _maybe_include_all_linear_layers.
 *
 * fan_in_fan_out is taken from the config for every LINEAR target (PEFT
 * overrides it per module class, which headers cannot show).
 *
 * Threading: an open adapter is read-only; every accessor is thread-safe. */
#ifndef MS_PEFT_ADAPTER_H
#define MS_PEFT_ADAPTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/model_dir.h"
#include "io/ms_error.h"
#include "io/st_format.h"

typedef enum ms_lora_kind {
    MS_LORA_LINEAR,    /* W + s * B @ A (transposed with fan_in_fan_out) */
    MS_LORA_EMBEDDING, /* W + (s * B @ A)^T */
    MS_LORA_REPLACE,   /* the adapter's full tensor instead of W */
} ms_lora_kind;

/* What the adapter does to one base tensor. Read-only; owned by the ms_peft. */
typedef struct ms_lora_target {
    const char *base_name;      /* the base tensor (points into the base model's header) */
    const char *module;         /* its module path, e.g. "model.layers.0.self_attn.q_proj" */
    ms_lora_kind kind;
    const st_file *file;        /* adapter_model.safetensors: A, B, magnitude and source live there */
    const st_tensor *A;         /* LINEAR: lora_A [rank, in]; EMBEDDING: lora_embedding_A [rank, vocab]; else NULL */
    const st_tensor *B;         /* LINEAR: lora_B [out, rank]; EMBEDDING: lora_embedding_B [dim, rank]; else NULL */
    const st_tensor *magnitude; /* DoRA: lora_magnitude_vector [n_features], else NULL */
    const st_tensor *source;    /* REPLACE: the replacing tensor (F16/BF16/F32 when the base tensor's
                                   dtype is one of those, else exactly the base's dtype: copy it).
                                   LINEAR / EMBEDDING: NULL, or the module's base weight saved in the
                                   adapter (.base_layer.weight): read the "base" rows from here
                                   instead of the base model */
    uint64_t rows, cols;        /* the 2-D shape of the result: the base tensor's, or source's when set
                                   (REPLACE: rows may exceed the base's for embed_tokens / lm_head,
                                   DESIGN.md's added-tokens rule; other dims always equal) */
    unsigned rank;              /* r after rank_pattern (0 for REPLACE) */
    double alpha;               /* lora_alpha after alpha_pattern (0 for REPLACE) */
    float scale;                /* alpha / rank or alpha / sqrt(rank) (use_rslora), in fp64, rounded to fp32 once */
    bool transposed;            /* delta = (s * B @ A)^T: fan_in_fan_out LINEAR, and EMBEDDING */
    uint64_t n_features;        /* DoRA's output features: cols when transposed, else rows (0 if not DoRA) */
} ms_lora_target;

typedef struct ms_peft ms_peft;

/* Opens the PEFT adapter directory adapter_dir (adapter_config.json plus
 * adapter_model.safetensors) and validates it against base (a model
 * directory or file, not an adapter; it must outlive the adapter: targets
 * point into its header). Reads headers and the config only; blocks on that I/O. Returns 0
 * and *out (close with ms_peft_close), or -1 with err set ("ADAPTER_DIR:
 * what", naming the module, tensors and shapes) and *out = NULL; exit codes
 * as listed at the top of this file, MS_EXIT_RUNTIME for I/O errors and out
 * of memory. */
int ms_peft_open(const char *adapter_dir, const ms_model *base, ms_peft **out, ms_error *err);

/* NULL is a no-op. */
void ms_peft_close(ms_peft *a);

/* The adapter directory as opened (trailing slashes removed), for messages. */
const char *ms_peft_path(const ms_peft *a);

/* The adapter's files (kind MS_MODEL_KIND_ADAPTER; config = adapter_config.json). */
const ms_model *ms_peft_model(const ms_peft *a);

/* The target for base tensor base_name, or NULL when the adapter leaves it
 * untouched (zero task vector: use the base's bytes). O(log n). */
const ms_lora_target *ms_peft_target(const ms_peft *a, const char *base_name);

/* All targets, sorted by base_name (strcmp). */
size_t ms_peft_n_targets(const ms_peft *a);
const ms_lora_target *ms_peft_target_at(const ms_peft *a, size_t i);

/* Reads all of adapter tensor t (one of a target's A, B, magnitude or
 * source) into buf (st_tensor_nbytes(t) bytes), with pread, looping on short
 * reads; each call asks the fault seam (MS_FAULT_READ) once. Blocks. Returns
 * 0, or -1 with err set (MS_EXIT_RUNTIME, naming the file and the tensor;
 * MS_EXIT_DATA if the file ends early). Thread-safe. For small tensors: the
 * factors of a target are r * (in + out) elements; large REPLACE sources
 * should go through the pipeline's reader like any base tensor. */
int ms_peft_read_tensor(const ms_peft *a, const st_tensor *t, void *buf, ms_error *err);

#endif
