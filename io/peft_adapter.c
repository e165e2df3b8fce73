/* PEFT LoRA adapters: adapter_config.json, the key -> base tensor mapping and
 * the validation against the base (io/peft_adapter.h states the semantics and
 * where they come from). */
#include "io/peft_adapter.h"

#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/atomic_file.h"
#include "io/py_regex.h"

#define KEY_PREFIX "base_model.model."

/* ================================================== adapter_config.json */

typedef struct pattern_entry {
    char *key;  /* as written in the config */
    regex_t re; /* ^(.*\.)?(KEY)$ */
    double value;
} pattern_entry;

typedef enum matcher_kind {
    MATCHER_ANY,        /* null / absent: no restriction */
    MATCHER_LIST,       /* exact module path or a ".NAME" suffix */
    MATCHER_REGEX,      /* re.fullmatch */
    MATCHER_ALL_LINEAR, /* "all-linear" */
} matcher_kind;

typedef struct module_matcher {
    matcher_kind kind;
    char **names; /* MATCHER_LIST */
    size_t n_names;
    regex_t re;   /* MATCHER_REGEX */
    char *text;   /* MATCHER_REGEX: the pattern as written */
} module_matcher;

typedef struct peft_config {
    unsigned r;
    double alpha;
    bool rslora, dora, fan_in_fan_out;
    pattern_entry *rank_pat, *alpha_pat;
    size_t n_rank_pat, n_alpha_pat;
    module_matcher target, exclude;
    bool use_layers;         /* layers_to_transform given (not null, not []) */
    long *layers;
    size_t n_layers;
    regex_t *layer_res;      /* layers_pattern (or PEFT's default) with the index as the last group */
    size_t n_layer_res;
} peft_config;

static void matcher_free(module_matcher *m)
{
    for (size_t i = 0; i < m->n_names; i++)
        free(m->names[i]);
    free(m->names);
    if (m->kind == MATCHER_REGEX)
        regfree(&m->re);
    free(m->text);
    memset(m, 0, sizeof *m);
}

static void patterns_free(pattern_entry *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(p[i].key);
        regfree(&p[i].re);
    }
    free(p);
}

static void config_free(peft_config *c)
{
    patterns_free(c->rank_pat, c->n_rank_pat);
    patterns_free(c->alpha_pat, c->n_alpha_pat);
    matcher_free(&c->target);
    matcher_free(&c->exclude);
    free(c->layers);
    for (size_t i = 0; i < c->n_layer_res; i++)
        regfree(&c->layer_res[i]);
    free(c->layer_res);
    memset(c, 0, sizeof *c);
}

static bool json_is_absent(const cJSON *v) { return !v || cJSON_IsNull(v); }

static int bad_type(const char *where, const char *key, const char *expected, ms_error *err)
{
    return ms_error_set(err, MS_EXIT_DATA, where, "adapter_config.json: \"%s\" must be %s", key, expected);
}

static int config_bool(const cJSON *cfg, const char *key, bool fallback, bool *out, const char *where,
                       ms_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (json_is_absent(v)) {
        *out = fallback;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return bad_type(where, key, "true or false", err);
    *out = cJSON_IsTrue(v);
    return 0;
}

static bool json_is_positive_int(const cJSON *v)
{
    return cJSON_IsNumber(v) && v->valuedouble >= 1 && v->valuedouble <= 1e9 &&
           v->valuedouble == floor(v->valuedouble);
}

/* Refuses the features listed as exit 2 in io/peft_adapter.h. */
static int config_check_supported(const cJSON *cfg, const char *where, ms_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "peft_type");
    if (!json_is_absent(v) && (!cJSON_IsString(v) || strcmp(v->valuestring, "LORA") != 0))
        return ms_error_set(err, MS_EXIT_USAGE, where,
                            "adapter_config.json: peft_type %s is not supported (only LORA adapters are)",
                            cJSON_IsString(v) ? v->valuestring : "(not a string)");
    v = cJSON_GetObjectItemCaseSensitive(cfg, "init_lora_weights");
    if (cJSON_IsString(v)) {
        static const char *const k_base_changing[] = {"pissa", "olora", "corda", "loftq"};
        for (size_t k = 0; k < sizeof k_base_changing / sizeof k_base_changing[0]; k++) {
            if (strncasecmp(v->valuestring, k_base_changing[k], strlen(k_base_changing[k])) == 0)
                return ms_error_set(
                    err, MS_EXIT_USAGE, where,
                    "adapter_config.json: init_lora_weights \"%s\" is not supported: this initialisation also "
                    "changes the base weights, so the adapter only fits the residual base saved at training "
                    "time, not the base model; convert it to a plain LoRA first (PEFT's save_pretrained with "
                    "path_initial_model_for_weight_conversion)",
                    v->valuestring);
        }
    } else if (!json_is_absent(v) && !cJSON_IsBool(v)) {
        return bad_type(where, "init_lora_weights", "true, false or a string", err);
    }
    static const struct {
        const char *key, *why;
    } k_unsupported[] = {
        {"alora_invocation_tokens", "aLoRA adapters act only after their invocation tokens, which a merged "
                                    "weight cannot express"},
        {"trainable_token_indices", "trainable tokens are not supported"},
        {"target_parameters", "LoRA on nn.Parameter targets is not supported"},
        {"layer_replication", "layer replication changes the model's architecture"},
    };
    for (size_t k = 0; k < sizeof k_unsupported / sizeof k_unsupported[0]; k++) {
        v = cJSON_GetObjectItemCaseSensitive(cfg, k_unsupported[k].key);
        bool empty = json_is_absent(v) || ((cJSON_IsArray(v) || cJSON_IsObject(v)) && cJSON_GetArraySize(v) == 0);
        if (!empty)
            return ms_error_set(err, MS_EXIT_USAGE, where, "adapter_config.json: \"%s\" is set: %s",
                                k_unsupported[k].key, k_unsupported[k].why);
    }
    static const struct {
        const char *key, *why;
    } k_flags[] = {
        {"use_alora", "aLoRA adapters act only after their invocation tokens, which a merged weight cannot express"},
        {"lora_bias", "lora_bias (a trained bias on lora_B) is not supported"},
        {"use_qalora", "QA-LoRA adapters are not supported"},
    };
    for (size_t k = 0; k < sizeof k_flags / sizeof k_flags[0]; k++) {
        bool on = false;
        if (config_bool(cfg, k_flags[k].key, false, &on, where, err) < 0)
            return -1;
        if (on)
            return ms_error_set(err, MS_EXIT_USAGE, where, "adapter_config.json: \"%s\" is true: %s",
                                k_flags[k].key, k_flags[k].why);
    }
    return 0;
}

/* rank_pattern / alpha_pattern: {KEY: value} in file order. */
static int config_patterns(const cJSON *cfg, const char *key, bool integer, pattern_entry **out, size_t *n_out,
                           const char *where, ms_error *err)
{
    const cJSON *obj = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (json_is_absent(obj))
        return 0;
    if (!cJSON_IsObject(obj))
        return bad_type(where, key, "an object", err);
    size_t n = (size_t)cJSON_GetArraySize(obj);
    pattern_entry *p = calloc(n ? n : 1, sizeof *p);
    if (!p)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    *out = p;
    const cJSON *e;
    cJSON_ArrayForEach(e, obj) {
        if (integer ? !json_is_positive_int(e) : !cJSON_IsNumber(e))
            return ms_error_set(err, MS_EXIT_DATA, where, "adapter_config.json: %s[\"%s\"] must be %s", key,
                                e->string, integer ? "a positive integer" : "a number");
        char what[64];
        snprintf(what, sizeof what, "%s key", key);
        if (ms_py_regex_compile(where, what, e->string, "^(.*\\.)?(", ")$", REG_NOSUB, &p[*n_out].re, err) < 0)
            return -1;
        p[*n_out].value = e->valuedouble;
        p[*n_out].key = strdup(e->string);
        (*n_out)++; /* regfree'd from here on, even when strdup failed */
        if (!p[*n_out - 1].key)
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    }
    return 0;
}

/* target_modules / exclude_modules. */
static int config_matcher(const cJSON *cfg, const char *key, bool allow_all_linear, module_matcher *m,
                          const char *where, ms_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (json_is_absent(v)) {
        m->kind = MATCHER_ANY;
        return 0;
    }
    if (cJSON_IsString(v)) {
        if (allow_all_linear && strcasecmp(v->valuestring, "all-linear") == 0) {
            m->kind = MATCHER_ALL_LINEAR;
            return 0;
        }
        if (!(m->text = strdup(v->valuestring)))
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        if (ms_py_regex_compile(where, key, v->valuestring, "^(", ")$", REG_NOSUB, &m->re, err) < 0)
            return -1;
        m->kind = MATCHER_REGEX;
        return 0;
    }
    if (!cJSON_IsArray(v))
        return bad_type(where, key, "a list of module names or a regular expression string", err);
    m->kind = MATCHER_LIST;
    size_t n = (size_t)cJSON_GetArraySize(v);
    m->names = calloc(n ? n : 1, sizeof *m->names);
    if (!m->names)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsString(e) || !e->valuestring[0])
            return bad_type(where, key, "a list of non-empty strings", err);
        if (!(m->names[m->n_names] = strdup(e->valuestring)))
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        m->n_names++;
    }
    return 0;
}

/* layers_to_transform (int or list of ints) and layers_pattern (string, list or null). */
static int config_layers(const cJSON *cfg, peft_config *c, const char *where, ms_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "layers_to_transform");
    if (json_is_absent(v))
        return 0;
    if (cJSON_IsNumber(v)) {
        if (!(c->layers = malloc(sizeof *c->layers)))
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        c->layers[c->n_layers++] = (long)v->valuedouble;
    } else if (cJSON_IsArray(v)) {
        size_t n = (size_t)cJSON_GetArraySize(v);
        if (n == 0)
            return 0;
        if (!(c->layers = calloc(n, sizeof *c->layers)))
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        const cJSON *e;
        cJSON_ArrayForEach(e, v) {
            if (!cJSON_IsNumber(e))
                return bad_type(where, "layers_to_transform", "an integer or a list of integers", err);
            c->layers[c->n_layers++] = (long)e->valuedouble;
        }
    } else {
        return bad_type(where, "layers_to_transform", "an integer or a list of integers", err);
    }
    c->use_layers = true;

    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(cfg, "layers_pattern");
    size_t n_pat = 0;
    if (cJSON_IsString(pat))
        n_pat = pat->valuestring[0] ? 1 : 0;
    else if (cJSON_IsArray(pat))
        n_pat = (size_t)cJSON_GetArraySize(pat);
    else if (!json_is_absent(pat))
        return bad_type(where, "layers_pattern", "a string or a list of strings", err);
    c->layer_res = calloc(n_pat ? n_pat : 1, sizeof *c->layer_res);
    if (!c->layer_res)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    if (n_pat == 0) {
        /* PEFT: any "<container>.<index>." */
        if (regcomp(&c->layer_res[0], "^.*\\.[^.]*\\.([0-9]+)\\.", REG_EXTENDED) != 0)
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "cannot compile the layer index pattern");
        c->n_layer_res = 1;
        return 0;
    }
    for (size_t i = 0; i < n_pat; i++) {
        const cJSON *e = cJSON_IsString(pat) ? pat : cJSON_GetArrayItem(pat, (int)i);
        if (!cJSON_IsString(e))
            return bad_type(where, "layers_pattern", "a string or a list of strings", err);
        if (ms_py_regex_compile(where, "layers_pattern", e->valuestring, "^.*\\.(", ")\\.([0-9]+)\\.", 0,
                        &c->layer_res[i], err) < 0)
            return -1;
        c->n_layer_res++;
    }
    return 0;
}

static int config_parse(const cJSON *cfg, peft_config *c, const char *where, ms_error *err)
{
    memset(c, 0, sizeof *c);
    if (!cJSON_IsObject(cfg))
        return ms_error_set(err, MS_EXIT_DATA, where, "adapter_config.json is not a JSON object");
    if (config_check_supported(cfg, where, err) < 0)
        return -1;
    /* PEFT's LoraConfig defaults: r = 8, lora_alpha = 8 */
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "r");
    c->r = 8;
    if (!json_is_absent(v)) {
        if (!json_is_positive_int(v))
            return bad_type(where, "r", "a positive integer", err);
        c->r = (unsigned)v->valuedouble;
    }
    v = cJSON_GetObjectItemCaseSensitive(cfg, "lora_alpha");
    c->alpha = 8;
    if (!json_is_absent(v)) {
        if (!cJSON_IsNumber(v))
            return bad_type(where, "lora_alpha", "a number", err);
        c->alpha = v->valuedouble;
    }
    if (config_bool(cfg, "use_rslora", false, &c->rslora, where, err) < 0 ||
        config_bool(cfg, "use_dora", false, &c->dora, where, err) < 0 ||
        config_bool(cfg, "fan_in_fan_out", false, &c->fan_in_fan_out, where, err) < 0)
        return -1;
    if (config_patterns(cfg, "rank_pattern", true, &c->rank_pat, &c->n_rank_pat, where, err) < 0 ||
        config_patterns(cfg, "alpha_pattern", false, &c->alpha_pat, &c->n_alpha_pat, where, err) < 0)
        return -1;
    if (config_matcher(cfg, "target_modules", true, &c->target, where, err) < 0 ||
        config_matcher(cfg, "exclude_modules", false, &c->exclude, where, err) < 0)
        return -1;
    return config_layers(cfg, c, where, err);
}

/* The first pattern (file order) whose key matches module, or NULL. */
static const pattern_entry *pattern_find(const pattern_entry *p, size_t n, const char *module)
{
    for (size_t i = 0; i < n; i++)
        if (ms_regex_matches(&p[i].re, module))
            return &p[i];
    return NULL;
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* module == name or module ends with "." + name. */
static bool module_is_or_ends_with(const char *module, const char *name)
{
    size_t n = strlen(module), m = strlen(name);
    if (n == m)
        return strcmp(module, name) == 0;
    return n > m && module[n - m - 1] == '.' && strcmp(module + n - m, name) == 0;
}

/* PEFT's output layer (excluded by "all-linear"): a top-level head. */
static bool is_output_layer(const char *module)
{
    static const char *const k_heads[] = {"lm_head", "embed_out", "output", "score", "classifier"};
    for (size_t k = 0; k < sizeof k_heads / sizeof k_heads[0]; k++)
        if (strcmp(module, k_heads[k]) == 0)
            return true;
    return false;
}

/* An embedding by its name (for "all-linear" and the warnings only). */
static bool looks_like_embedding(const char *module)
{
    const char *last = strrchr(module, '.');
    last = last ? last + 1 : module;
    return strstr(last, "embed") != NULL || strcmp(last, "wte") == 0 || strcmp(last, "wpe") == 0;
}

static bool matcher_list_hit(const module_matcher *m, const char *module, bool *exact)
{
    *exact = false;
    for (size_t i = 0; i < m->n_names; i++) {
        if (strcmp(module, m->names[i]) == 0) {
            *exact = true;
            return true;
        }
    }
    for (size_t i = 0; i < m->n_names; i++)
        if (module_is_or_ends_with(module, m->names[i]))
            return true;
    return false;
}

/* The layer index in module (PEFT's layers_pattern rule), or -1. */
static long layer_index(const peft_config *c, const char *module)
{
    for (size_t i = 0; i < c->n_layer_res; i++) {
        const regex_t *re = &c->layer_res[i];
        regmatch_t m[16];
        size_t g = re->re_nsub; /* the index is the last group */
        if (g == 0 || g >= sizeof m / sizeof m[0])
            continue;
        if (regexec(re, module, g + 1, m, 0) == 0 && m[g].rm_so >= 0)
            return strtol(module + m[g].rm_so, NULL, 10);
    }
    return -1;
}

/* Whether PEFT would put a LoRA layer on module (check_target_module_exists):
 * exclude_modules first, then target_modules; layers_to_transform narrows
 * suffix matches of a list. `embedding` says the module's weights are
 * lora_embedding_* (never selected by "all-linear"). */
static bool config_selects(const peft_config *c, const char *module, bool embedding)
{
    bool exact;
    switch (c->exclude.kind) {
    case MATCHER_REGEX:
        if (ms_regex_matches(&c->exclude.re, module))
            return false;
        break;
    case MATCHER_LIST:
        if (matcher_list_hit(&c->exclude, module, &exact))
            return false;
        break;
    default:
        break;
    }
    switch (c->target.kind) {
    case MATCHER_ANY:
        return true;
    case MATCHER_REGEX:
        return ms_regex_matches(&c->target.re, module);
    case MATCHER_ALL_LINEAR:
        return !embedding && !is_output_layer(module);
    case MATCHER_LIST:
        if (!matcher_list_hit(&c->target, module, &exact))
            return false;
        if (exact || !c->use_layers)
            return true;
        long idx = layer_index(c, module);
        for (size_t i = 0; idx >= 0 && i < c->n_layers; i++)
            if (c->layers[i] == idx)
                return true;
        return false;
    }
    return false;
}

/* ================================================== adapter tensor keys */

typedef enum key_role {
    ROLE_A,
    ROLE_B,
    ROLE_EMB_A,
    ROLE_EMB_B,
    ROLE_MAGNITUDE,
    ROLE_BASE_LAYER,
    ROLE_REPLACE,
    ROLE_COUNT
} key_role;

static const char *const k_role_names[ROLE_COUNT] = {
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer",
    "replacement",
};

/* One adapter tensor, classified. */
typedef struct key_rec {
    char *module;  /* module path (ROLE_REPLACE: the replaced base tensor's name) */
    key_role role;
    const st_tensor *t;
} key_rec;

static bool is_role_word(const char *w, size_t n, key_role *role)
{
    static const struct {
        const char *word;
        int role; /* -1: modules_to_save */
    } k_words[] = {
        {"lora_A", ROLE_A},
        {"lora_B", ROLE_B},
        {"lora_embedding_A", ROLE_EMB_A},
        {"lora_embedding_B", ROLE_EMB_B},
        {"lora_magnitude_vector", ROLE_MAGNITUDE},
        {"base_layer", ROLE_BASE_LAYER},
        {"modules_to_save", -1},
    };
    for (size_t k = 0; k < sizeof k_words / sizeof k_words[0]; k++) {
        if (strlen(k_words[k].word) == n && memcmp(w, k_words[k].word, n) == 0) {
            *role = k_words[k].role < 0 ? ROLE_REPLACE : (key_role)k_words[k].role;
            return true;
        }
    }
    return false;
}

/* Splits a dotted name into at most max components (pointers into a copy). */
static size_t split_dots(char *s, char **parts, size_t max)
{
    size_t n = 0;
    for (char *p = s;; p++) {
        if (n < max)
            parts[n] = p;
        n++;
        p = strchr(p, '.');
        if (!p)
            break;
        *p = '\0';
    }
    return n;
}

/* Records the adapter name a key carries ("" for none); a file holds one. */
static int note_adapter_name(char **seen, const char *name, const char *where, const char *key, ms_error *err)
{
    if (!*seen) {
        if (!(*seen = strdup(name)))
            return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        return 0;
    }
    if (strcmp(*seen, name) != 0)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s': the file holds more than one adapter (names '%s' and '%s')", key, *seen,
                            name);
    return 0;
}

/* Classifies one adapter key (see the header). Fills *rec (module malloc'd). */
static int key_classify(const st_tensor *t, const char *where, char **adapter_name, key_rec *rec, ms_error *err)
{
    const char *key = t->name;
    if (strncmp(key, KEY_PREFIX, strlen(KEY_PREFIX)) != 0 || !key[strlen(KEY_PREFIX)])
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s' does not start with \"" KEY_PREFIX "\" (not a PEFT LoRA key)", key);
    const char *rest = key + strlen(KEY_PREFIX);
    char *copy = strdup(rest);
    size_t n_parts = 1;
    for (const char *p = rest; *p; p++)
        n_parts += *p == '.';
    char **parts = calloc(n_parts, sizeof *parts);
    int rc = -1;
    if (!copy || !parts) {
        ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        goto done;
    }
    split_dots(copy, parts, n_parts);
    /* the last role word names the role; the module is everything before it */
    size_t at = n_parts;
    key_role role = ROLE_REPLACE;
    for (size_t i = n_parts; i-- > 1;) {
        if (is_role_word(parts[i], strlen(parts[i]), &role)) {
            at = i;
            break;
        }
    }
    const char *adapter = "";
    char *module = NULL;
    if (at == n_parts) { /* a plain base tensor name */
        rec->role = ROLE_REPLACE;
        module = strdup(rest);
    } else {
        size_t tail = n_parts - at - 1;
        char **tp = parts + at + 1;
        bool ok = true;
        const char *param = NULL;
        switch (role) {
        case ROLE_A:
        case ROLE_B:
            if (tail >= 1 && strcmp(tp[tail - 1], "bias") == 0) {
                ms_error_set(err, MS_EXIT_USAGE, where, "tensor '%s': lora_bias (a trained bias on lora_B) is not supported",
                             key);
                goto done;
            }
            ok = (tail == 1 || tail == 2) && strcmp(tp[tail - 1], "weight") == 0;
            if (ok && tail == 2)
                adapter = tp[0];
            break;
        case ROLE_EMB_A:
        case ROLE_EMB_B:
            ok = tail <= 1;
            if (ok && tail == 1)
                adapter = tp[0];
            break;
        case ROLE_MAGNITUDE: /* [.NAME][.weight] */
            ok = tail <= 1 || (tail == 2 && strcmp(tp[1], "weight") == 0);
            if (tail == 2 || (tail == 1 && strcmp(tp[0], "weight") != 0))
                adapter = tp[0];
            break;
        case ROLE_BASE_LAYER:
            ok = tail >= 1;
            if (ok && !(tail == 1 && strcmp(tp[0], "weight") == 0)) {
                role = ROLE_REPLACE; /* base_layer.bias etc.: the module's own parameter */
                param = rest + (size_t)(tp[0] - copy);
            }
            break;
        case ROLE_REPLACE: /* modules_to_save[.NAME].PARAM */
            ok = tail >= 1;
            if (ok && tail >= 2) {
                adapter = tp[0];
                param = rest + (size_t)(tp[1] - copy);
            } else if (ok) {
                param = rest + (size_t)(tp[0] - copy);
            }
            break;
        default:
            ok = false;
        }
        if (!ok) {
            ms_error_set(err, MS_EXIT_DATA, where, "tensor '%s': unrecognised %s key", key, k_role_names[role]);
            goto done;
        }
        size_t module_len = (size_t)(parts[at] - copy) - 1; /* up to the '.' before the role word */
        if (role == ROLE_REPLACE) {
            if (asprintf(&module, "%.*s.%s", (int)module_len, rest, param) < 0)
                module = NULL;
        } else {
            module = strndup(rest, module_len);
        }
        rec->role = role;
    }
    if (!module) {
        ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        goto done;
    }
    if (at != n_parts && note_adapter_name(adapter_name, adapter, where, key, err) < 0) {
        free(module);
        goto done;
    }
    rec->module = module;
    rec->t = t;
    rc = 0;
done:
    free(parts);
    free(copy);
    return rc;
}

static int cmp_rec(const void *a, const void *b)
{
    const key_rec *x = a, *y = b;
    int c = strcmp(x->module, y->module);
    return c ? c : (int)x->role - (int)y->role;
}

/* ================================================== the adapter */

struct ms_peft {
    char *path;
    ms_model *model;          /* the adapter's files */
    ms_lora_target *targets;  /* sorted by base_name */
    size_t n_targets;
};

const char *ms_peft_path(const ms_peft *a) { return a->path; }
const ms_model *ms_peft_model(const ms_peft *a) { return a->model; }
size_t ms_peft_n_targets(const ms_peft *a) { return a->n_targets; }

const ms_lora_target *ms_peft_target_at(const ms_peft *a, size_t i)
{
    MS_ASSERT(i < a->n_targets);
    return &a->targets[i];
}

const ms_lora_target *ms_peft_target(const ms_peft *a, const char *base_name)
{
    size_t lo = 0, hi = a->n_targets;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(a->targets[mid].base_name, base_name);
        if (c == 0)
            return &a->targets[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

void ms_peft_close(ms_peft *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->n_targets; i++)
        free((char *)a->targets[i].module);
    free(a->targets);
    ms_model_close(a->model);
    free(a->path);
    free(a);
}

/* "[8, 64]" */
static const char *shape_str(const st_tensor *t, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (unsigned d = 0; d < t->ndim && used < len; d++)
        used += (size_t)snprintf(buf + used, len - used, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
    return buf;
}

static bool shape_is(const st_tensor *t, uint64_t d0, uint64_t d1)
{
    return t->ndim == 2 && t->shape[0] == d0 && t->shape[1] == d1;
}

/* embed_tokens / lm_head may grow rows (DESIGN.md, added tokens). */
static bool rows_may_grow(const char *base_name)
{
    return has_suffix(base_name, "embed_tokens.weight") || has_suffix(base_name, "lm_head.weight");
}

/* The 2-D view the kernels use: a 0-D or 1-D tensor is one row. */
static void tensor_rows_cols(const st_tensor *t, uint64_t *rows, uint64_t *cols)
{
    *rows = t->ndim >= 2 ? t->shape[0] : 1;
    *cols = 1;
    for (unsigned d = t->ndim >= 2 ? 1 : 0; d < t->ndim; d++)
        *cols *= t->shape[d]; /* cannot overflow: numel was checked when the header was parsed */
}

/* A replacement fits base tensor bt: same dims, except more rows where the
 * added-tokens rule allows them; float dtypes (or the base's own dtype). */
static int check_replacement(const char *where, const ms_model *base, const st_tensor *src, const st_tensor *bt,
                             const char *what, ms_error *err)
{
    char s1[96], s2[96];
    bool fits = src->ndim == bt->ndim;
    for (unsigned d = 1; fits && d < src->ndim; d++)
        fits = src->shape[d] == bt->shape[d];
    if (fits && src->ndim >= 1)
        fits = src->shape[0] == bt->shape[0] || (src->shape[0] > bt->shape[0] && rows_may_grow(bt->name));
    if (!fits)
        return ms_error_set(err, MS_EXIT_DATA, where, "%s '%s' %s does not fit base tensor '%s' %s of %s", what,
                            src->name, shape_str(src, s1, sizeof s1), bt->name, shape_str(bt, s2, sizeof s2),
                            base->path);
    if (src->dtype != bt->dtype && !(st_dtype_is_mergeable_float(src->dtype) && st_dtype_is_mergeable_float(bt->dtype)))
        return ms_error_set(err, MS_EXIT_DATA, where, "%s '%s' has dtype %s, base tensor '%s' %s", what, src->name,
                            st_dtype_name(src->dtype), bt->name, st_dtype_name(bt->dtype));
    return 0;
}

static bool is_factor_dtype(const st_tensor *t) { return st_dtype_is_mergeable_float(t->dtype); }

/* Builds the target of one module's LoRA tensors (recs[0..n), one module,
 * sorted by role). */
static int target_from_lora(const char *where, const ms_model *base, const peft_config *cfg, const key_rec *recs,
                            size_t n, ms_lora_target *t, ms_error *err)
{
    const st_tensor *by_role[ROLE_COUNT] = {0};
    const char *module = recs[0].module;
    for (size_t i = 0; i < n; i++) {
        if (by_role[recs[i].role])
            return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': two %s tensors ('%s' and '%s')", module,
                                k_role_names[recs[i].role], by_role[recs[i].role]->name, recs[i].t->name);
        by_role[recs[i].role] = recs[i].t;
    }
    bool linear = by_role[ROLE_A] || by_role[ROLE_B];
    bool embedding = by_role[ROLE_EMB_A] || by_role[ROLE_EMB_B];
    if (linear && embedding)
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s' has both lora_A/lora_B and lora_embedding_A/B",
                            module);
    const st_tensor *A = linear ? by_role[ROLE_A] : by_role[ROLE_EMB_A];
    const st_tensor *B = linear ? by_role[ROLE_B] : by_role[ROLE_EMB_B];
    const char *an = linear ? "lora_A" : "lora_embedding_A", *bn = linear ? "lora_B" : "lora_embedding_B";
    if ((linear || embedding) && (!A || !B))
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': '%s' has no matching %s", module,
                            (A ? A : B)->name, A ? bn : an);
    const st_tensor *mag = by_role[ROLE_MAGNITUDE];
    if (!linear && !embedding) { /* a magnitude vector (and maybe a base layer) alone */
        const st_tensor *lone = mag ? mag : recs[0].t;
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': '%s' without lora_A/lora_B", module, lone->name);
    }

    char base_name[1024], sa[96], sb[96], sw[96];
    snprintf(base_name, sizeof base_name, "%s.weight", module);
    long bi = ms_model_find(base, base_name);
    if (bi < 0)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "module '%s' (%s %s, %s %s) is missing from the base: %s has no tensor '%s'", module, an,
                            shape_str(A, sa, sizeof sa), bn, shape_str(B, sb, sizeof sb), base->path, base_name);
    const st_tensor *bt = base->tensors[bi].info;
    if (!config_selects(cfg, module, embedding))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "module '%s' has LoRA weights but target_modules%s does not select it (PEFT would "
                            "ignore them): the config and the weights disagree",
                            module, cfg->exclude.kind != MATCHER_ANY || cfg->use_layers
                                         ? " (with exclude_modules / layers_to_transform)"
                                         : "");
    if (bt->ndim != 2)
        return ms_error_set(err, MS_EXIT_USAGE, where,
                            "module '%s': LoRA on the %u-D tensor '%s' %s is not supported (only 2-D weights)", module,
                            bt->ndim, base_name, shape_str(bt, sw, sizeof sw));
    if (!st_dtype_is_mergeable_float(bt->dtype))
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': base tensor '%s' has dtype %s (needs F16, BF16 or F32)",
                            module, base_name, st_dtype_name(bt->dtype));
    const st_tensor *src = by_role[ROLE_BASE_LAYER];
    if (src) {
        if (check_replacement(where, base, src, bt, "base layer", err) < 0)
            return -1;
        if (!st_dtype_is_mergeable_float(src->dtype))
            return ms_error_set(err, MS_EXIT_DATA, where, "'%s' has dtype %s (needs F16, BF16 or F32)", src->name,
                                st_dtype_name(src->dtype));
    }
    const st_tensor *w = src ? src : bt; /* what the delta is added to */
    uint64_t rows = w->shape[0], cols = w->shape[1];
    bool transposed = embedding || cfg->fan_in_fan_out;
    /* expected factor shapes: A [r, in], B [out, r] */
    uint64_t in = transposed ? rows : cols, out = transposed ? cols : rows;

    const pattern_entry *rp = pattern_find(cfg->rank_pat, cfg->n_rank_pat, module);
    const pattern_entry *ap = pattern_find(cfg->alpha_pat, cfg->n_alpha_pat, module);
    unsigned r = rp ? (unsigned)rp->value : cfg->r;
    double alpha = ap ? ap->value : cfg->alpha;
    char r_from[160];
    if (rp)
        snprintf(r_from, sizeof r_from, "rank_pattern['%s']", rp->key);
    else
        snprintf(r_from, sizeof r_from, "r");

    if (A->ndim != 2 || B->ndim != 2)
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': %s %s and %s %s must be 2-D", module, an,
                            shape_str(A, sa, sizeof sa), bn, shape_str(B, sb, sizeof sb));
    if (A->shape[0] != B->shape[1] || A->shape[0] != r)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "module '%s': rank mismatch: %s %s and %s %s, but %s is %u (base tensor '%s' %s)",
                            module, an, shape_str(A, sa, sizeof sa), bn, shape_str(B, sb, sizeof sb), r_from, r,
                            w->name, shape_str(w, sw, sizeof sw));
    if (!shape_is(A, r, in) || !shape_is(B, out, r))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "module '%s': %s %s and %s %s do not fit base tensor '%s' %s%s: expected %s [%u, %llu] "
                            "and %s [%llu, %u]",
                            module, an, shape_str(A, sa, sizeof sa), bn, shape_str(B, sb, sizeof sb), w->name,
                            shape_str(w, sw, sizeof sw),
                            embedding ? " (an embedding)" : cfg->fan_in_fan_out ? " (fan_in_fan_out)" : "", an, r,
                            (unsigned long long)in, bn, (unsigned long long)out, r);
    if (!is_factor_dtype(A) || !is_factor_dtype(B))
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': %s is %s and %s is %s (need F16, BF16 or F32)",
                            module, an, st_dtype_name(A->dtype), bn, st_dtype_name(B->dtype));
    uint64_t n_features = transposed ? cols : rows;
    if (mag && !cfg->dora)
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': '%s' is present but use_dora is false", module,
                            mag->name);
    if (cfg->dora && !mag)
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': use_dora is true but lora_magnitude_vector is missing",
                            module);
    if (mag && (mag->ndim != 1 || mag->shape[0] != n_features || !is_factor_dtype(mag)))
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "module '%s': lora_magnitude_vector %s %s does not fit base tensor '%s' %s: expected [%llu]",
                            module, shape_str(mag, sa, sizeof sa), st_dtype_name(mag->dtype), w->name,
                            shape_str(w, sw, sizeof sw), (unsigned long long)n_features);
    if (!isfinite(alpha))
        return ms_error_set(err, MS_EXIT_DATA, where, "module '%s': lora_alpha is not finite", module);

    t->base_name = bt->name;
    t->kind = embedding ? MS_LORA_EMBEDDING : MS_LORA_LINEAR;
    t->A = A;
    t->B = B;
    t->magnitude = mag;
    t->source = src;
    t->rows = rows;
    t->cols = cols;
    t->rank = r;
    t->alpha = alpha;
    t->scale = (float)(cfg->rslora ? alpha / sqrt((double)r) : alpha / (double)r);
    t->transposed = transposed;
    t->n_features = mag ? n_features : 0;
    return 0;
}

static int target_from_replacement(const char *where, const ms_model *base, const st_tensor *src,
                                   const char *base_name, ms_lora_target *t, ms_error *err)
{
    long bi = ms_model_find(base, base_name);
    char s1[96];
    if (bi < 0)
        return ms_error_set(err, MS_EXIT_DATA, where,
                            "tensor '%s' %s replaces '%s', which is missing from the base (%s)", src->name,
                            shape_str(src, s1, sizeof s1), base_name, base->path);
    const st_tensor *bt = base->tensors[bi].info;
    if (check_replacement(where, base, src, bt, "replacement", err) < 0)
        return -1;
    t->base_name = bt->name;
    t->kind = MS_LORA_REPLACE;
    t->source = src;
    tensor_rows_cols(src, &t->rows, &t->cols);
    return 0;
}

static int cmp_target(const void *a, const void *b)
{
    return strcmp(((const ms_lora_target *)a)->base_name, ((const ms_lora_target *)b)->base_name);
}

/* The warnings about target_modules and the error for selecting nothing. */
static int check_selection(const char *where, const ms_model *base, const peft_config *cfg, const ms_peft *a,
                           ms_error *err)
{
    if (cfg->target.kind == MATCHER_ANY)
        return 0;
    size_t selected = 0, without_weights = 0;
    const char *example = NULL;
    bool *entry_used = cfg->target.n_names ? calloc(cfg->target.n_names, sizeof *entry_used) : NULL;
    if (cfg->target.n_names && !entry_used)
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    char module[1024];
    for (size_t i = 0; i < base->n_tensors; i++) {
        const st_tensor *bt = base->tensors[i].info;
        size_t len = strlen(bt->name);
        if (!has_suffix(bt->name, ".weight") || len - 7 >= sizeof module)
            continue;
        memcpy(module, bt->name, len - 7);
        module[len - 7] = '\0';
        bool emb = looks_like_embedding(module);
        if (cfg->target.kind == MATCHER_ALL_LINEAR && bt->ndim != 2)
            continue;
        if (!config_selects(cfg, module, emb))
            continue;
        selected++;
        for (size_t k = 0; k < cfg->target.n_names; k++)
            entry_used[k] |= module_is_or_ends_with(module, cfg->target.names[k]);
        const ms_lora_target *t = ms_peft_target(a, bt->name);
        if (!t || t->kind == MS_LORA_REPLACE) {
            if (!without_weights++)
                example = bt->name;
        }
    }
    int rc = 0;
    if (selected == 0) {
        rc = ms_error_set(err, MS_EXIT_DATA, where, "target_modules %s selects no module of the base model %s",
                          cfg->target.kind == MATCHER_REGEX ? cfg->target.text : "(the list)", base->path);
    } else {
        for (size_t k = 0; k < cfg->target.n_names; k++)
            if (!entry_used[k])
                ms_log_warn("%s: target_modules entry '%s' selects no module of %s", where, cfg->target.names[k],
                            base->path);
        if (without_weights)
            ms_log_warn("%s: %zu module(s) selected by target_modules have no LoRA weights in the adapter "
                        "(e.g. '%s'); they stay unchanged",
                        where, without_weights, example);
    }
    free(entry_used);
    return rc;
}

static int peft_build_targets(ms_peft *a, const ms_model *base, const peft_config *cfg, ms_error *err)
{
    const char *where = a->path;
    const st_file *file = a->model->shards[0];
    const st_header *h = &file->header;
    key_rec *recs = calloc(h->n_tensors ? h->n_tensors : 1, sizeof *recs);
    char *adapter_name = NULL;
    size_t n_recs = 0;
    int rc = -1;
    if (!recs) {
        ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < h->n_tensors; i++) {
        if (key_classify(&h->tensors[i], where, &adapter_name, &recs[n_recs], err) < 0)
            goto done;
        n_recs++;
    }
    qsort(recs, n_recs, sizeof *recs, cmp_rec);
    a->targets = calloc(n_recs ? n_recs : 1, sizeof *a->targets);
    if (!a->targets) {
        ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_recs;) {
        size_t j = i + 1;
        ms_lora_target *t = &a->targets[a->n_targets];
        memset(t, 0, sizeof *t);
        t->file = file;
        if (recs[i].role == ROLE_REPLACE) {
            if (target_from_replacement(where, base, recs[i].t, recs[i].module, t, err) < 0)
                goto done;
        } else {
            while (j < n_recs && recs[j].role != ROLE_REPLACE && strcmp(recs[j].module, recs[i].module) == 0)
                j++;
            bool only_base_layer = j == i + 1 && recs[i].role == ROLE_BASE_LAYER;
            if (only_base_layer) { /* a saved base weight without LoRA: it replaces MODULE.weight */
                char name[1024];
                snprintf(name, sizeof name, "%s.weight", recs[i].module);
                if (target_from_replacement(where, base, recs[i].t, name, t, err) < 0)
                    goto done;
            } else if (target_from_lora(where, base, cfg, recs + i, j - i, t, err) < 0) {
                goto done;
            }
        }
        if (!(t->module = strdup(recs[i].module))) {
            ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
            goto done;
        }
        a->n_targets++;
        i = j;
    }
    qsort(a->targets, a->n_targets, sizeof *a->targets, cmp_target);
    for (size_t i = 1; i < a->n_targets; i++) {
        if (strcmp(a->targets[i - 1].base_name, a->targets[i].base_name) == 0) {
            const ms_lora_target *x = &a->targets[i - 1], *y = &a->targets[i];
            const st_tensor *tx = x->kind == MS_LORA_REPLACE ? x->source : x->A;
            const st_tensor *ty = y->kind == MS_LORA_REPLACE ? y->source : y->A;
            ms_error_set(err, MS_EXIT_DATA, where, "base tensor '%s' is changed twice (by '%s' and '%s')",
                         x->base_name, tx->name, ty->name);
            goto done;
        }
    }
    if (check_selection(where, base, cfg, a, err) < 0)
        goto done;
    if (a->n_targets == 0)
        ms_log_warn("%s: the adapter changes no tensor", where);
    rc = 0;
done:
    for (size_t i = 0; i < n_recs; i++)
        free(recs[i].module);
    free(recs);
    free(adapter_name);
    return rc;
}

int ms_peft_open(const char *adapter_dir, const ms_model *base, ms_peft **out, ms_error *err)
{
    *out = NULL;
    peft_config cfg = {0};
    ms_peft *a = calloc(1, sizeof *a);
    if (!a)
        return ms_error_set(err, MS_EXIT_RUNTIME, adapter_dir, "out of memory");
    if (ms_model_open(adapter_dir, &a->model, err) < 0)
        goto fail;
    if (!(a->path = strdup(a->model->path))) {
        ms_error_set(err, MS_EXIT_RUNTIME, adapter_dir, "out of memory");
        goto fail;
    }
    if (a->model->kind != MS_MODEL_KIND_ADAPTER) {
        ms_error_set(err, MS_EXIT_DATA, a->path, "not a PEFT adapter (a %s without adapter_config.json)",
                     ms_model_kind_name(a->model->kind));
        goto fail;
    }
    if (base->kind == MS_MODEL_KIND_ADAPTER) {
        ms_error_set(err, MS_EXIT_USAGE, a->path, "the base %s is itself a PEFT adapter", base->path);
        goto fail;
    }
    if (config_parse(a->model->config, &cfg, a->path, err) < 0)
        goto fail;
    if (peft_build_targets(a, base, &cfg, err) < 0)
        goto fail;
    config_free(&cfg);
    *out = a;
    return 0;
fail:
    config_free(&cfg);
    ms_peft_close(a);
    return -1;
}

int ms_peft_read_tensor(const ms_peft *a, const st_tensor *t, void *buf, ms_error *err)
{
    const st_file *f = a->model->shards[0];
    int rc = ms_pread_all(f->fd, buf, (size_t)st_tensor_nbytes(t), st_file_tensor_offset(f, t));
    if (rc == -ENODATA)
        return ms_error_set(err, MS_EXIT_DATA, f->path, "file ends inside tensor '%s'", t->name);
    return rc < 0 ? ms_error_errno(err, MS_EXIT_RUNTIME, -rc, f->path, "cannot read tensor '%s'", t->name) : 0;
}
