#include "pipeline/model_config.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

static const struct {
    const char *arch, *model_type;
    ms_arch id;
} k_archs[] = {
    {"LlamaForCausalLM", "llama", MS_ARCH_LLAMA},
    {"MistralForCausalLM", "mistral", MS_ARCH_MISTRAL},
    {"Qwen2ForCausalLM", "qwen2", MS_ARCH_QWEN2},
};
#define N_ARCHS (sizeof k_archs / sizeof k_archs[0])
#define SUPPORTED_ARCHS "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
#define MS_MISTRAL_DEFAULT_WINDOW 4096 /* MistralConfig.sliding_window's default */

const char *ms_arch_name(ms_arch arch)
{
    for (size_t i = 0; i < N_ARCHS; i++)
        if (k_archs[i].id == arch)
            return k_archs[i].arch;
    return "?";
}

/* ============================================================ field readers */

static const cJSON *field(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNull(v) ? NULL : v;
}

/* A positive integer (or 0 when allow_zero) at key; *out = fallback when
 * absent or null and fallback != 0, else an error. */
static int get_uint(const cJSON *obj, const char *key, uint64_t fallback, uint64_t max, uint64_t *out,
                    const char *where, ms_error *err)
{
    const cJSON *v = field(obj, key);
    if (!v) {
        if (fallback)
            return *out = fallback, 0;
        return ms_error_set(err, MS_EXIT_DATA, where, "missing \"%s\"", key);
    }
    double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
    if (!(d >= 1 && d <= (double)max && d == floor(d)))
        return ms_error_set(err, MS_EXIT_DATA, where, "\"%s\" must be an integer in [1, %llu]", key,
                            (unsigned long long)max);
    *out = (uint64_t)d;
    return 0;
}

/* A positive finite number at key, or fallback (> 0) when absent; fallback 0
 * makes it required. */
static int get_pos(const cJSON *obj, const char *key, double fallback, double *out, const char *where,
                   const char *ctx, ms_error *err)
{
    const cJSON *v = field(obj, key);
    if (!v) {
        if (fallback > 0)
            return *out = fallback, 0;
        return ms_error_set(err, MS_EXIT_DATA, where, "%s: missing \"%s\"", ctx, key);
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0) || !isfinite(v->valuedouble))
        return ms_error_set(err, MS_EXIT_DATA, where, "%s: \"%s\" must be a positive number", ctx, key);
    *out = v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *obj, const char *key, bool fallback, bool *out, const char *where, ms_error *err)
{
    const cJSON *v = field(obj, key);
    if (!v)
        return *out = fallback, 0;
    if (!cJSON_IsBool(v))
        return ms_error_set(err, MS_EXIT_DATA, where, "\"%s\" must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* ============================================================ parts */

static int parse_arch(const cJSON *cfg, const char *where, ms_arch *out, ms_error *err)
{
    const cJSON *archs = field(cfg, "architectures");
    const char *name = NULL;
    if (archs) {
        const cJSON *first = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
        if (!cJSON_IsString(first))
            return ms_error_set(err, MS_EXIT_DATA, where, "\"architectures\" must be a non-empty list of strings");
        name = first->valuestring;
        for (size_t i = 0; i < N_ARCHS; i++)
            if (strcmp(name, k_archs[i].arch) == 0)
                return *out = k_archs[i].id, 0;
        return ms_error_set(err, MS_EXIT_USAGE, where, "architecture '%s' is not supported (supported: %s)", name,
                            SUPPORTED_ARCHS);
    }
    const cJSON *mt = field(cfg, "model_type");
    if (cJSON_IsString(mt)) {
        for (size_t i = 0; i < N_ARCHS; i++)
            if (strcmp(mt->valuestring, k_archs[i].model_type) == 0)
                return *out = k_archs[i].id, 0;
        return ms_error_set(err, MS_EXIT_USAGE, where, "model_type '%s' is not supported (supported: %s)",
                            mt->valuestring, SUPPORTED_ARCHS);
    }
    return ms_error_set(err, MS_EXIT_DATA, where, "missing \"architectures\" (and \"model_type\")");
}

/* rope_scaling or rope_parameters (key names the object in messages). */
static int parse_rope(const cJSON *rope, const char *key, const char *where, cpu_llama_config *c, ms_error *err)
{
    if (!cJSON_IsObject(rope))
        return ms_error_set(err, MS_EXIT_DATA, where, "\"%s\" must be an object or null", key);
    const cJSON *type = field(rope, "rope_type");
    if (!type)
        type = field(rope, "type");
    const char *t = "default";
    if (type) {
        if (!cJSON_IsString(type))
            return ms_error_set(err, MS_EXIT_DATA, where, "%s: \"rope_type\" must be a string", key);
        t = type->valuestring;
    }
    if (field(rope, "rope_theta") && get_pos(rope, "rope_theta", 0, &c->rope_theta, where, key, err) < 0)
        return -1;
    if (strcmp(t, "default") == 0) {
        c->rope_kind = CPU_ROPE_DEFAULT;
        return 0;
    }
    if (strcmp(t, "linear") == 0) {
        c->rope_kind = CPU_ROPE_LINEAR;
        return get_pos(rope, "factor", 0, &c->rope_factor, where, key, err);
    }
    if (strcmp(t, "llama3") == 0) {
        c->rope_kind = CPU_ROPE_LLAMA3;
        if (get_pos(rope, "factor", 0, &c->rope_factor, where, key, err) < 0 ||
            get_pos(rope, "low_freq_factor", 0, &c->rope_low_freq_factor, where, key, err) < 0 ||
            get_pos(rope, "high_freq_factor", 0, &c->rope_high_freq_factor, where, key, err) < 0 ||
            get_pos(rope, "original_max_position_embeddings", 0, &c->rope_original_max_pos, where, key, err) < 0)
            return -1;
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
            return ms_error_set(err, MS_EXIT_DATA, where, "%s: high_freq_factor must exceed low_freq_factor", key);
        return 0;
    }
    return ms_error_set(err, MS_EXIT_USAGE, where, "%s: rope type '%s' is not supported (default, linear, llama3)",
                        key, t);
}

/* ============================================================ the whole */

int ms_model_config_parse(const cJSON *cfg, const char *where, ms_model_config *out, ms_error *err)
{
    *out = (ms_model_config){0};
    cpu_llama_config *c = &out->llama;
    if (!cfg)
        return ms_error_set(err, MS_EXIT_DATA, where, "no config.json: the forward pass needs the model's config");
    if (!cJSON_IsObject(cfg))
        return ms_error_set(err, MS_EXIT_DATA, where, "config.json is not a JSON object");
    if (parse_arch(cfg, where, &out->arch, err) < 0)
        return -1;
    const uint64_t big = 1ull << 24; /* far beyond any released model, small enough for every product */
    if (get_uint(cfg, "hidden_size", 0, big, &c->hidden, where, err) < 0 ||
        get_uint(cfg, "intermediate_size", 0, big, &c->intermediate, where, err) < 0 ||
        get_uint(cfg, "num_hidden_layers", 0, 1u << 16, &c->n_layers, where, err) < 0 ||
        get_uint(cfg, "num_attention_heads", 0, 1u << 16, &c->n_heads, where, err) < 0 ||
        get_uint(cfg, "vocab_size", 0, 1ull << 31, &c->vocab, where, err) < 0 ||
        get_uint(cfg, "num_key_value_heads", c->n_heads, 1u << 16, &c->n_kv_heads, where, err) < 0)
        return -1;
    if (c->n_heads % c->n_kv_heads != 0)
        return ms_error_set(err, MS_EXIT_DATA, where, "num_key_value_heads (%llu) must divide num_attention_heads (%llu)",
                            (unsigned long long)c->n_kv_heads, (unsigned long long)c->n_heads);
    uint64_t default_hd = c->hidden % c->n_heads == 0 ? c->hidden / c->n_heads : 0;
    if (!field(cfg, "head_dim") && !default_hd)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "hidden_size (%llu) is not a multiple of num_attention_heads (%llu) and head_dim is "
                            "not given",
                            (unsigned long long)c->hidden, (unsigned long long)c->n_heads);
    if (get_uint(cfg, "head_dim", default_hd, 1u << 16, &c->head_dim, where, err) < 0)
        return -1;
    if (c->head_dim % 2 != 0)
        return ms_error_set(err, MS_EXIT_DATA, where, "head_dim (%llu) must be even for RoPE",
                            (unsigned long long)c->head_dim);
    if (get_pos(cfg, "rms_norm_eps", 1e-6, &c->rms_eps, where, "config", err) < 0 ||
        get_pos(cfg, "rope_theta", 10000.0, &c->rope_theta, where, "config", err) < 0)
        return -1;
    c->rope_kind = CPU_ROPE_DEFAULT;
    /* transformers 5 takes `rope_scaling or rope_parameters`: a non-empty
     * rope_scaling replaces rope_parameters whole (its rope_theta too, which
     * then comes from rope_scaling, else the top level, else 10000); an
     * empty one counts as absent. */
    const cJSON *params = field(cfg, "rope_parameters"), *scaling = field(cfg, "rope_scaling");
    if (cJSON_IsObject(scaling) && !scaling->child)
        scaling = NULL;
    if (params && cJSON_IsObject(scaling) && !cJSON_Compare(params, scaling, true))
        ms_log_warn("%s: both rope_scaling and rope_parameters are present and differ: using rope_scaling, as "
                    "transformers does (rope_parameters is ignored)",
                    where);
    if (scaling ? parse_rope(scaling, "rope_scaling", where, c, err) < 0
                : params && parse_rope(params, "rope_parameters", where, c, err) < 0)
        return -1;
    if (get_bool(cfg, "tie_word_embeddings", false, &c->tie_embeddings, where, err) < 0)
        return -1;

    const cJSON *act = field(cfg, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return ms_error_set(err, MS_EXIT_USAGE, where, "hidden_act '%s' is not supported (silu)",
                            cJSON_IsString(act) ? act->valuestring : "?");

    switch (out->arch) {
    case MS_ARCH_LLAMA: {
        bool attn_bias = false, mlp_bias = false;
        if (get_bool(cfg, "attention_bias", false, &attn_bias, where, err) < 0 ||
            get_bool(cfg, "mlp_bias", false, &mlp_bias, where, err) < 0)
            return -1;
        c->qkv_bias = c->o_bias = attn_bias;
        c->mlp_bias = mlp_bias;
        break;
    }
    case MS_ARCH_MISTRAL:
        /* absent is MistralConfig's default window; only null turns it off */
        if (!cJSON_GetObjectItemCaseSensitive(cfg, "sliding_window"))
            c->sliding_window = MS_MISTRAL_DEFAULT_WINDOW;
        else if (field(cfg, "sliding_window") &&
                 get_uint(cfg, "sliding_window", 0, 1ull << 32, &c->sliding_window, where, err) < 0)
            return -1;
        break;
    case MS_ARCH_QWEN2: {
        /* Qwen2Config drops sliding_window unless use_sliding_window, whose
         * default is false */
        bool sliding = false;
        if (get_bool(cfg, "use_sliding_window", false, &sliding, where, err) < 0)
            return -1;
        if (sliding)
            return ms_error_set(err, MS_EXIT_USAGE, where,
                                "use_sliding_window true is not supported for Qwen2ForCausalLM");
        c->qkv_bias = true;
        break;
    }
    }
    const cJSON *maxpos = field(cfg, "max_position_embeddings");
    if (cJSON_IsNumber(maxpos) && maxpos->valuedouble >= 1 && maxpos->valuedouble <= 1e12)
        out->max_position_embeddings = (uint64_t)maxpos->valuedouble;
    return 0;
}
