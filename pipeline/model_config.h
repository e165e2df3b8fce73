/* config.json of the decoder models the forward pass runs (cpu/llama_forward.h):
 * LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM.
 *
 * Fields read (transformers' names; defaults are the config classes'):
 *   architectures[0]  (else model_type "llama" / "mistral" / "qwen2")
 *   hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
 *   vocab_size                     required positive integers
 *   num_key_value_heads            default num_attention_heads; must divide it
 *   head_dim                       default (and when null) hidden_size /
 *                                  num_attention_heads; must be even
 *   rms_norm_eps                   default 1e-6
 *   rope_theta                     default 10000
 *   rope_scaling / rope_parameters null or {"rope_type" (or "type"): "default" |
 *                                  "linear" | "llama3", "factor", "low_freq_factor",
 *                                  "high_freq_factor",
 *                                  "original_max_position_embeddings"}; either
 *                                  may carry rope_theta, which wins over the
 *                                  top level's. With both present, a
 *                                  non-empty rope_scaling is used whole and
 *                                  rope_parameters ignored, as transformers
 *                                  5 does (one warning when they differ)
 *   tie_word_embeddings            default false; when true over a
 *                                  checkpoint that also has lm_head.weight,
 *                                  ms_llama_check unties them
 *                                  (pipeline/llama_source.h)
 *   attention_bias, mlp_bias       Llama: biases on q/k/v/o and on the MLP
 *                                  (default false); Qwen2 always has q/k/v
 *                                  biases and none elsewhere
 *   hidden_act                     must be "silu" when present
 *   sliding_window                 Mistral: a window (applied to every
 *                                  layer, as transformers does), default
 *                                  4096 as MistralConfig's; null is none.
 *                                  Qwen2: ignored (no window) unless
 *                                  use_sliding_window (default false), and
 *                                  use_sliding_window true is refused
 *   max_position_embeddings        informational (0 when absent)
 *
 * Both rope objects present and differing is logged (ms_log_warn), once.
 * Errors: MS_EXIT_USAGE (2) for what is valid but not supported (another
 * architecture, another rope type or activation, Qwen2's sliding window),
 * naming the value and what is supported; MS_EXIT_DATA (3) for a missing or
 * malformed field, naming the key. WHERE is the config file. */
#ifndef MS_MODEL_CONFIG_H
#define MS_MODEL_CONFIG_H

#include <stdint.h>

#include <cjson/cJSON.h>

#include "cpu/llama_forward.h"
#include "io/ms_error.h"

typedef enum ms_arch {
    MS_ARCH_LLAMA,
    MS_ARCH_MISTRAL,
    MS_ARCH_QWEN2,
} ms_arch;

typedef struct ms_model_config {
    ms_arch arch;
    cpu_llama_config llama;
    uint64_t max_position_embeddings; /* 0 when absent */
} ms_model_config;

/* "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM". */
const char *ms_arch_name(ms_arch arch);

/* Parses config (a config.json object; NULL is a missing file) into *out.
 * where names the file in errors. Returns 0, or -1 with err set as above. */
int ms_model_config_parse(const cJSON *config, const char *where, ms_model_config *out, ms_error *err);

#endif
