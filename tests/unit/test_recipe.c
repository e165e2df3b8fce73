/* Recipes (pipeline/recipe.h, method_table.h): every key, parameter
 * resolution (scalars, gradients, filters, precedence) against hand-computed
 * values and a float64 reference on fresh random gradients, per-method
 * defaults against an independent table, and every error with its exit code,
 * the key it names and its line.
 *
 * Recipes are written into a mkdtemp folder holding empty model directories,
 * one YAML line per C line below so line numbers can be read off the source. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/recipe.h"

#define Y(line) line "\n"

/* ---------------------------------------------------------------- fixtures */

static char g_dir[64];     /* the mkdtemp folder */
static unsigned g_counter; /* recipe file names */
static uint64_t g_rng;

static uint64_t rnd(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}

static double rnd_unit(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }

static void make_dir(const char *rel)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, rel);
    assert_int_equal(mkdir(path, 0755), 0);
}

static int group_setup(void **state)
{
    strcpy(g_dir, "/tmp/ms_recipe_XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    make_dir("models");
    make_dir("models/base");
    for (int i = 1; i <= 17; i++) {
        char rel[64];
        snprintf(rel, sizeof rel, "models/ft%d", i);
        make_dir(rel);
    }
    make_dir("adapters");
    make_dir("adapters/lora1");
    make_dir("sub");
    g_rng = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull | 1;
    print_message("recipe test folder %s, rng seed %llu\n", g_dir, (unsigned long long)g_rng);
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static int group_teardown(void **state)
{
    return nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes text to a fresh recipe file in g_dir (or g_dir/sub when in_sub);
 * returns its malloc'd path. */
static char *write_recipe_in(const char *text, bool in_sub)
{
    char *path = NULL;
    assert_true(asprintf(&path, "%s%s/r%u.yml", g_dir, in_sub ? "/sub" : "", g_counter++) > 0);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
    return path;
}

static char *write_recipe(const char *text) { return write_recipe_in(text, false); }

static ms_recipe *load_ok_at(const char *text, int src_line)
{
    char *path = write_recipe(text);
    ms_recipe *r = NULL;
    ms_error err = {0};
    int rc = ms_recipe_load(path, &r, &err);
    if (rc != 0)
        fail_msg("test line %d: unexpected error: %s", src_line, err.msg);
    assert_non_null(r);
    assert_string_equal(r->source_path, path);
    free(path);
    return r;
}
#define load_ok(text) load_ok_at(text, __LINE__)

/* The error message starts with "PATH:LINE: " and contains both needles. */
static void check_error(const ms_error *err, const char *path, int code, unsigned line,
                        const char *needle1, const char *needle2, int src_line)
{
    char prefix[256];
    snprintf(prefix, sizeof prefix, "%s:%u: ", path, line);
    if (err->exit_code != code)
        fail_msg("test line %d: exit code %d, expected %d (%s)", src_line, err->exit_code, code,
                 err->msg);
    if (strncmp(err->msg, prefix, strlen(prefix)) != 0)
        fail_msg("test line %d: message '%s' does not start with '%s'", src_line, err->msg, prefix);
    if (needle1 && !strstr(err->msg, needle1))
        fail_msg("test line %d: message '%s' lacks '%s'", src_line, err->msg, needle1);
    if (needle2 && !strstr(err->msg, needle2))
        fail_msg("test line %d: message '%s' lacks '%s'", src_line, err->msg, needle2);
}

static void expect_fail_at(const char *text, unsigned line, const char *needle1,
                           const char *needle2, int src_line)
{
    char *path = write_recipe(text);
    ms_recipe *r = (ms_recipe *)0x1;
    ms_error err = {0};
    int rc = ms_recipe_load(path, &r, &err);
    if (rc != -1)
        fail_msg("test line %d: recipe loaded but should fail", src_line);
    assert_null(r);
    check_error(&err, path, MS_EXIT_USAGE, line, needle1, needle2, src_line);
    free(path);
}
#define expect_fail(text, line, n1, n2) expect_fail_at(text, line, n1, n2, __LINE__)

static ms_tensor_params params_ok_at(const ms_recipe *r, const char *tensor, unsigned layers,
                                     int src_line)
{
    ms_tensor_params tp;
    memset(&tp, 0xA5, sizeof tp); /* everything not resolved must come back zeroed */
    ms_error err = {0};
    if (ms_recipe_tensor_params(r, tensor, layers, &tp, &err) != 0)
        fail_msg("test line %d: tensor '%s': %s", src_line, tensor, err.msg);
    return tp;
}
#define params_ok(r, tensor, layers) params_ok_at(r, tensor, layers, __LINE__)

static void expect_tensor_fail_at(const ms_recipe *r, const char *tensor, unsigned layers,
                                  unsigned line, const char *n1, const char *n2, int src_line)
{
    ms_tensor_params tp;
    ms_error err = {0};
    if (ms_recipe_tensor_params(r, tensor, layers, &tp, &err) != -1)
        fail_msg("test line %d: tensor '%s' resolved but should fail", src_line, tensor);
    check_error(&err, r->source_path, MS_EXIT_USAGE, line, n1, n2, src_line);
    if (!strstr(err.msg, tensor))
        fail_msg("test line %d: message '%s' does not name the tensor", src_line, err.msg);
}
#define expect_tensor_fail(r, t, layers, line, n1, n2)                                            \
    expect_tensor_fail_at(r, t, layers, line, n1, n2, __LINE__)

static char *joined(const char *rel)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", g_dir, rel) > 0);
    return p;
}

static void assert_path(const char *got, const char *rel)
{
    char *want = joined(rel);
    assert_non_null(got);
    assert_string_equal(got, want);
    free(want);
}

static void assert_zero_bytes(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        assert_int_equal(b[i], 0);
}

/* Fields ms_recipe_tensor_params must leave zeroed. */
static void assert_rest_zero(const ms_tensor_params *tp)
{
    assert_zero_bytes(tp->philox_key, sizeof tp->philox_key);
    assert_zero_bytes(tp->in_dtype, sizeof tp->in_dtype);
    assert_zero_bytes(&tp->out_dtype, sizeof tp->out_dtype);
    assert_true(tp->numel == 0 && tp->rows == 0 && tp->cols == 0);
    assert_zero_bytes(tp->model_rows, sizeof tp->model_rows);
    for (unsigned i = tp->n_models + 1; i <= MS_MAX_MODELS; i++) {
        assert_true(tp->weight[i] == 0.0f && tp->density[i] == 0.0);
        assert_true(tp->gamma[i] == 0.0 && tp->epsilon[i] == 0.0);
    }
    assert_true(tp->weight[0] == 0.0f && tp->density[0] == 0.0);
}

/* ------------------------------------------------------------ every key */

static void test_all_keys(void **state)
{
    ms_recipe *r = load_ok(
        Y("name: everything")                          /* 1 */
        Y("merge_method: ties")                        /* 2 */
        Y("base_model: ./models/base")                 /* 3 */
        Y("models:")                                   /* 4 */
        Y("  - model: ./models/base")                  /* 5 */
        Y("  - model: ./models/ft1")                   /* 6 */
        Y("    parameters:")                           /* 7 */
        Y("      weight: 0.6")                         /* 8 */
        Y("      density: 0.4")                        /* 9 */
        Y("  - model: models/ft2")                     /* 10 */
        Y("parameters:")                               /* 11 */
        Y("  weight: 0.25")                            /* 12 */
        Y("  density: 0.7")                            /* 13 */
        Y("  normalize: false")                        /* 14 */
        Y("  rescale: yes")                            /* 15 */
        Y("  lambda: 0.5")                             /* 16 */
        Y("  int8_mask: true")                         /* 17 */
        Y("dtype: bfloat16")                           /* 18 */
        Y("out_dtype: float16")                        /* 19 */
        Y("tokenizer_source: ./models/ft1")            /* 20 */
        Y("random_seed: 18446744073709551615")         /* 21 */
        Y("chat_template: chatml"));                   /* 22 */

    assert_int_equal(r->method, MS_METHOD_TIES);
    assert_int_equal(r->method_line, 2);
    assert_string_equal(r->base_name, "./models/base");
    assert_path(r->base_path, "models/base");
    assert_null(r->base_adapter_path);
    assert_int_equal(r->base_line, 3);
    assert_true(r->base_listed);
    assert_int_equal(r->n_models, 2);
    assert_string_equal(r->models[0].name, "./models/ft1");
    assert_path(r->models[0].path, "models/ft1");
    assert_null(r->models[0].adapter_path);
    assert_int_equal(r->models[0].index, 1);
    assert_int_equal(r->models[0].line, 6);
    assert_string_equal(r->models[1].name, "models/ft2");
    assert_path(r->models[1].path, "models/ft2");
    assert_int_equal(r->models[1].index, 2);
    assert_int_equal(r->models[1].line, 10);
    assert_true(r->models[0].params[MS_PARAM_WEIGHT].present);
    assert_int_equal(r->models[0].params[MS_PARAM_WEIGHT].line, 8);
    assert_false(r->models[1].params[MS_PARAM_WEIGHT].present);
    assert_true(r->has_dtype && r->dtype == ST_BF16);
    assert_true(r->has_out_dtype && r->out_dtype == ST_F16);
    assert_path(r->tokenizer_source, "models/ft1");
    assert_true(r->has_random_seed);
    assert_true(r->random_seed == UINT64_MAX);
    assert_non_null(strstr(r->text, "chat_template: chatml"));
    assert_int_equal(r->text_len, strlen(r->text));

    ms_tensor_params tp = params_ok(r, "model.layers.0.mlp.up_proj.weight", 4);
    assert_int_equal(tp.method, MS_METHOD_TIES);
    assert_int_equal(tp.sparsify, MS_SPARSIFY_MAGNITUDE);
    assert_true(tp.consensus);
    assert_false(tp.normalize);
    assert_true(tp.rescale);
    assert_true(tp.has_base);
    assert_int_equal(tp.n_models, 2);
    assert_true(tp.weight[1] == 0.6f && tp.weight[2] == 0.25f);
    assert_true(tp.density[1] == 0.4 && tp.density[2] == 0.7);
    assert_true(tp.gamma[1] == 0.0 && tp.epsilon[1] == 0.0);
    assert_true(tp.lambda == 0.5f);
    assert_rest_zero(&tp);
    ms_recipe_free(r);
}

static void test_optional_keys_absent(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: task_arithmetic")
        Y("base_model: models/base")
        Y("dtype:")
        Y("tokenizer_source: base")
        Y("models:")
        Y("  - model: models/ft1")
        Y("    parameters: {weight: 1.0}")
        Y("  - model: models/ft2")
        Y("    parameters:")
        Y("      weight: -0.5"));
    assert_false(r->has_dtype);
    assert_false(r->has_out_dtype);
    assert_null(r->tokenizer_source);
    assert_false(r->has_random_seed);
    assert_false(r->base_listed);
    ms_tensor_params tp = params_ok(r, "lm_head.weight", 32);
    assert_true(tp.weight[1] == 1.0f && tp.weight[2] == -0.5f);
    assert_true(tp.lambda == 1.0f);
    ms_recipe_free(r);

    /* out_dtype float32 and dtype float32 */
    r = load_ok(Y("merge_method: linear")
                Y("dtype: float32")
                Y("out_dtype: float32")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}"));
    assert_true(r->dtype == ST_F32 && r->out_dtype == ST_F32);
    assert_null(r->base_path);
    assert_null(r->base_name);
    ms_recipe_free(r);
}

/* Paths are relative to the recipe's folder, not the working directory. */
static void test_paths_relative_to_recipe(void **state)
{
    char *path = write_recipe_in(Y("merge_method: linear")
                                 Y("base_model: ../models/base")
                                 Y("models:")
                                 Y("  - model: ../models/ft1+../adapters/lora1")
                                 Y("    parameters: {weight: 1}"),
                                 true);
    ms_recipe *r = NULL;
    ms_error err = {0};
    assert_int_equal(ms_recipe_load(path, &r, &err), 0);
    assert_path(r->base_path, "sub/../models/base");
    assert_path(r->models[0].path, "sub/../models/ft1");
    assert_path(r->models[0].adapter_path, "sub/../adapters/lora1");
    assert_string_equal(r->models[0].name, "../models/ft1+../adapters/lora1");
    ms_recipe_free(r);
    free(path);

    /* absolute paths stay as written; DIR+ADAPTER on the base too */
    char *abs_ft = joined("models/ft3");
    char *text = NULL;
    assert_true(asprintf(&text,
                         Y("merge_method: dare_linear")
                         Y("base_model: models/base+adapters/lora1")
                         Y("models:")
                         Y("  - model: %s")
                         Y("    parameters: {weight: 1, density: 0.5}"),
                         abs_ft) > 0);
    r = load_ok(text);
    assert_string_equal(r->models[0].path, abs_ft);
    assert_path(r->base_path, "models/base");
    assert_path(r->base_adapter_path, "adapters/lora1");
    ms_recipe_free(r);
    free(text);
    free(abs_ft);
}

/* ------------------------------------------------------- method defaults */

/* An independent copy of DESIGN.md's table, so a wrong method table fails. */
static const struct {
    const char *name;
    ms_method method;
    ms_sparsify sparsify;
    bool consensus, normalize, rescale, has_base;
    bool density, gamma, epsilon, lambda;
} k_expect[] = {
    {"linear", MS_METHOD_LINEAR, MS_SPARSIFY_NONE, false, true, false, false, false, false, false, false},
    {"task_arithmetic", MS_METHOD_TASK_ARITHMETIC, MS_SPARSIFY_NONE, false, false, false, true, false, false, false, true},
    {"ties", MS_METHOD_TIES, MS_SPARSIFY_MAGNITUDE, true, true, false, true, true, false, false, true},
    {"dare_ties", MS_METHOD_DARE_TIES, MS_SPARSIFY_RANDOM, true, false, true, true, true, false, false, true},
    {"dare_linear", MS_METHOD_DARE_LINEAR, MS_SPARSIFY_RANDOM, false, false, true, true, true, false, false, true},
    {"breadcrumbs", MS_METHOD_BREADCRUMBS, MS_SPARSIFY_MAGNITUDE_OUTLIERS, false, false, false, true, true, true, false, true},
    {"breadcrumbs_ties", MS_METHOD_BREADCRUMBS_TIES, MS_SPARSIFY_MAGNITUDE_OUTLIERS, true, false, false, true, true, true, false, true},
    {"della", MS_METHOD_DELLA, MS_SPARSIFY_DELLA_MAGPRUNE, true, true, true, true, true, false, true, true},
    {"della_linear", MS_METHOD_DELLA_LINEAR, MS_SPARSIFY_DELLA_MAGPRUNE, false, false, true, true, true, false, true, true},
};

static void test_method_defaults(void **state)
{
    /* the task-vector methods (the interpolation methods: test_interp_methods) */
    assert_int_equal(sizeof k_expect / sizeof k_expect[0], MS_METHOD_DELLA_LINEAR + 1);
    for (size_t i = 0; i < sizeof k_expect / sizeof k_expect[0]; i++) {
        char *text = NULL;
        bool della = k_expect[i].epsilon;
        assert_true(asprintf(&text,
                             "merge_method: %s\n"
                             "base_model: models/base\n"
                             "models:\n"
                             "  - model: models/ft1\n"
                             "    parameters: {weight: 0.75%s}\n"
                             "  - model: models/ft2\n"
                             "    parameters: {weight: 0.5%s}\n",
                             k_expect[i].name, della ? ", density: 0.5" : "",
                             della ? ", density: 0.3" : "") > 0);
        ms_recipe *r = load_ok(text);
        free(text);
        assert_int_equal(r->method, k_expect[i].method);
        assert_string_equal(ms_method_name(r->method), k_expect[i].name);
        /* linear: the base is optional and never listed; task-vector: required */
        assert_int_equal(r->n_models, 2);
        ms_tensor_params tp = params_ok(r, "model.layers.1.self_attn.q_proj.weight", 3);
        assert_int_equal(tp.method, k_expect[i].method);
        assert_int_equal(tp.sparsify, k_expect[i].sparsify);
        assert_int_equal(tp.consensus, k_expect[i].consensus);
        assert_int_equal(tp.normalize, k_expect[i].normalize);
        assert_int_equal(tp.rescale, k_expect[i].rescale);
        assert_int_equal(tp.has_base, k_expect[i].has_base);
        assert_true(tp.weight[1] == 0.75f && tp.weight[2] == 0.5f);
        assert_true(tp.density[1] == (della ? 0.5 : 1.0));
        assert_true(tp.density[2] == (della ? 0.3 : 1.0));
        assert_true(tp.gamma[1] == (k_expect[i].gamma ? 0.01 : 0.0));
        assert_true(tp.epsilon[2] == (k_expect[i].epsilon ? 0.15 : 0.0));
        assert_true(tp.lambda == 1.0f);
        assert_rest_zero(&tp);
        for (ms_param_id p = 0; p < MS_PARAM_COUNT; p++) {
            bool want = p == MS_PARAM_WEIGHT || p == MS_PARAM_NORMALIZE ||
                        (p == MS_PARAM_DENSITY && k_expect[i].density) ||
                        (p == MS_PARAM_GAMMA && k_expect[i].gamma) ||
                        (p == MS_PARAM_EPSILON && k_expect[i].epsilon) ||
                        ((p == MS_PARAM_LAMBDA || p == MS_PARAM_RESCALE ||
                          p == MS_PARAM_INT8_MASK) && k_expect[i].lambda);
            assert_int_equal(ms_method_takes(k_expect[i].method, p), want);
        }
        ms_recipe_free(r);
    }

    /* table helpers */
    ms_method m;
    assert_int_equal(ms_method_lookup("della_linear", &m), MS_METHOD_FOUND);
    assert_int_equal(m, MS_METHOD_DELLA_LINEAR);
    assert_int_equal(ms_method_lookup("core_space", &m), MS_METHOD_UNSUPPORTED);
    assert_int_equal(ms_method_lookup("slerp", &m), MS_METHOD_FOUND);
    assert_int_equal(m, MS_METHOD_SLERP);
    assert_int_equal(ms_method_lookup("TIES", &m), MS_METHOD_UNKNOWN);
    assert_string_equal(ms_method_name(MS_METHOD_COUNT), "unknown");
    assert_null(ms_method_info_get(MS_METHOD_COUNT));
    double d;
    assert_false(ms_method_param_default(MS_METHOD_TIES, MS_PARAM_WEIGHT, &d));
    assert_false(ms_method_param_default(MS_METHOD_TIES, MS_PARAM_GAMMA, &d));
    assert_true(ms_method_param_default(MS_METHOD_LINEAR, MS_PARAM_NORMALIZE, &d) && d == 1.0);
    const ms_param_info *den = ms_param_info_get(MS_PARAM_DENSITY);
    assert_false(ms_param_in_range(den, 0.0));
    assert_true(ms_param_in_range(den, 1e-300));
    assert_true(ms_param_in_range(den, 1.0));
    assert_false(ms_param_in_range(den, nextafter(1.0, 2.0)));
    const ms_param_info *gam = ms_param_info_get(MS_PARAM_GAMMA);
    assert_true(ms_param_in_range(gam, 0.0));
    assert_false(ms_param_in_range(gam, -1e-300));
    assert_false(ms_param_in_range(gam, 1.0));
    assert_true(ms_param_in_range(gam, nextafter(1.0, 0.0)));
    assert_false(ms_param_in_range(ms_param_info_get(MS_PARAM_WEIGHT), NAN));
    assert_true(ms_param_in_range(ms_param_info_get(MS_PARAM_WEIGHT), FLT_MAX));
    assert_false(ms_param_in_range(ms_param_info_get(MS_PARAM_WEIGHT), 1e39));
}

/* -------------------------------------------------- gradients and filters */

static void test_layer_t(void **state)
{
    assert_true(ms_recipe_tensor_t("model.layers.3.mlp.up_proj.weight", 5) == 0.75);
    assert_true(ms_recipe_tensor_t("model.layers.0.mlp.up_proj.weight", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.4.mlp.up_proj.weight", 5) == 1.0);
    assert_true(ms_recipe_tensor_t("model.layers.1.input_layernorm.weight", 4) == 1.0 / 3.0);
    assert_true(ms_recipe_tensor_t("layers.2.attention.wq.weight", 5) == 0.5);
    assert_true(ms_recipe_tensor_t("model.layers.7.x", 5) == 1.0); /* past the last: clamped */
    assert_true(ms_recipe_tensor_t("model.layers.99999999999999999999999.x", 5) == 1.0);
    assert_true(ms_recipe_tensor_t("model.embed_tokens.weight", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("lm_head.weight", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.norm.weight", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.xlayers.3.w", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.3", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.x3.w", 5) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.3.w", 1) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.3.w", 0) == 0.0);
    assert_true(ms_recipe_tensor_t("model.layers.1.w", 2) == 1.0);
    /* the first "layers.N." wins */
    assert_true(ms_recipe_tensor_t("model.layers.1.sub.layers.3.w", 5) == 0.25);
}

static void test_gradients_hand_computed(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: dare_ties")
        Y("base_model: models/base")
        Y("models:")
        Y("  - model: models/ft1")
        Y("    parameters:")
        Y("      weight: [1.0, 0.0]")
        Y("      density: [0.2, 0.4, 1.0]")
        Y("  - model: models/ft2")
        Y("    parameters:")
        Y("      weight: [0.5]")
        Y("parameters:")
        Y("  density:")
        Y("    - 0.9")
        Y("    - 0.1")
        Y("  lambda: [2, 4]"));
    static const struct {
        const char *tensor;
        unsigned layers;
        double w1, d1, d2, lambda;
    } k_cases[] = {
        {"model.layers.0.mlp.down_proj.weight", 5, 1.0, 0.2, 0.9, 2.0},
        {"model.layers.1.mlp.down_proj.weight", 5, 0.75, 0.3, 0.7, 2.5},
        {"model.layers.2.mlp.down_proj.weight", 5, 0.5, 0.4, 0.5, 3.0},
        {"model.layers.3.mlp.down_proj.weight", 5, 0.25, 0.7, 0.3, 3.5},
        {"model.layers.4.mlp.down_proj.weight", 5, 0.0, 1.0, 0.1, 4.0},
        {"model.embed_tokens.weight", 5, 1.0, 0.2, 0.9, 2.0},
        {"lm_head.weight", 5, 1.0, 0.2, 0.9, 2.0},
        {"model.layers.0.mlp.down_proj.weight", 1, 1.0, 0.2, 0.9, 2.0},
        {"model.layers.1.mlp.down_proj.weight", 2, 0.0, 1.0, 0.1, 4.0},
    };
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        ms_tensor_params tp = params_ok(r, k_cases[i].tensor, k_cases[i].layers);
        if (fabs(tp.weight[1] - k_cases[i].w1) > 1e-7 || fabs(tp.density[1] - k_cases[i].d1) > 1e-15 ||
            fabs(tp.density[2] - k_cases[i].d2) > 1e-15 || fabs(tp.lambda - k_cases[i].lambda) > 1e-6)
            fail_msg("case %zu (%s, %u layers): w1 %g d1 %.17g d2 %.17g lambda %g", i,
                     k_cases[i].tensor, k_cases[i].layers, tp.weight[1], tp.density[1],
                     tp.density[2], tp.lambda);
        assert_true(tp.weight[2] == 0.5f);
        assert_true(tp.density[1] > 0.0 && tp.density[1] <= 1.0);
    }
    assert_true(r->models[0].params[MS_PARAM_DENSITY].value.is_gradient);
    assert_int_equal(r->models[0].params[MS_PARAM_DENSITY].value.n_points, 3);
    assert_true(r->models[1].params[MS_PARAM_WEIGHT].value.is_gradient);
    ms_recipe_free(r);
}

/* The obviously-correct reference: walk the segments. */
static double ref_gradient(const double *pts, unsigned n, unsigned layer, unsigned layers)
{
    if (n == 1)
        return pts[0];
    double t = layers <= 1 ? 0.0 : (double)layer / (double)(layers - 1);
    double x = t * (double)(n - 1);
    for (unsigned j = 0; j + 1 < n; j++)
        if (x <= (double)(j + 1))
            return pts[j] + (pts[j + 1] - pts[j]) * (x - (double)j);
    return pts[n - 1];
}

static void test_gradients_random(void **state)
{
    for (int iter = 0; iter < 60; iter++) {
        unsigned nw = 1 + (unsigned)(rnd() % 7), nd = 1 + (unsigned)(rnd() % 7);
        unsigned layers = 1 + (unsigned)(rnd() % 90);
        double w[8], dens[8];
        char wtxt[512] = "", dtxt[512] = "";
        for (unsigned i = 0; i < nw; i++) {
            w[i] = rnd_unit() * 4.0 - 2.0;
            snprintf(wtxt + strlen(wtxt), sizeof wtxt - strlen(wtxt), "%s%.17g", i ? ", " : "", w[i]);
        }
        for (unsigned i = 0; i < nd; i++) {
            dens[i] = 0.001 + 0.999 * rnd_unit();
            snprintf(dtxt + strlen(dtxt), sizeof dtxt - strlen(dtxt), "%s%.17g", i ? ", " : "", dens[i]);
        }
        char *text = NULL;
        assert_true(asprintf(&text,
                             "merge_method: ties\n"
                             "base_model: models/base\n"
                             "models:\n"
                             "  - model: models/ft1\n"
                             "    parameters:\n"
                             "      weight: [%s]\n"
                             "      density: [%s]\n",
                             wtxt, dtxt) > 0);
        ms_recipe *r = load_ok(text);
        free(text);
        for (unsigned layer = 0; layer < layers; layer++) {
            char name[96];
            snprintf(name, sizeof name, "model.layers.%u.self_attn.o_proj.weight", layer);
            ms_tensor_params tp = params_ok(r, name, layers);
            double rw = ref_gradient(w, nw, layer, layers);
            double rd = ref_gradient(dens, nd, layer, layers);
            if (fabs((double)tp.weight[1] - rw) > 1e-6 * fmax(1.0, fabs(rw)) ||
                fabs(tp.density[1] - rd) > 1e-12)
                fail_msg("iter %d layer %u/%u: weight %.9g vs %.9g, density %.17g vs %.17g", iter,
                         layer, layers, tp.weight[1], rw, tp.density[1], rd);
            assert_true(tp.density[1] > 0.0 && tp.density[1] <= 1.0);
        }
        /* outside the layers: the first point */
        ms_tensor_params tp = params_ok(r, "model.norm.weight", layers);
        assert_true(tp.density[1] == dens[0]);
        assert_true(tp.weight[1] == (float)w[0]);
        ms_recipe_free(r);
    }
}

static void test_filters(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: breadcrumbs_ties")             /* 1 */
        Y("base_model: models/base")                    /* 2 */
        Y("models:")                                    /* 3 */
        Y("  - model: models/ft1")                      /* 4 */
        Y("    parameters:")                            /* 5 */
        Y("      weight:")                              /* 6 */
        Y("        - filter: self_attn")                /* 7 */
        Y("          value: 0.7")                       /* 8 */
        Y("        - filter: mlp")                      /* 9 */
        Y("          value: [0.1, 0.3]")                /* 10 */
        Y("        - value: 0.2")                       /* 11 */
        Y("      density:")                             /* 12 */
        Y("        - {filter: up_proj, value: 0.3}")    /* 13 */
        Y("  - model: models/ft2")                      /* 14 */
        Y("    parameters:")                            /* 15 */
        Y("      weight:")                              /* 16 */
        Y("        - {value: 0.9}")                     /* 17 */
        Y("        - {filter: mlp, value: 0.1}")        /* 18 */
        Y("      gamma:")                               /* 19 */
        Y("        - {filter: \"*\", value: 0.05}")     /* 20 */
        Y("parameters:")                                /* 21 */
        Y("  density: 0.8")                             /* 22 */
        Y("  gamma:")                                   /* 23 */
        Y("    - {filter: embed, value: 0.0}")          /* 24 */
        Y("  normalize:")                               /* 25 */
        Y("    - {filter: lm_head, value: true}")       /* 26 */
        Y("    - {filter: null, value: false}"));       /* 27 */

    ms_tensor_params tp = params_ok(r, "model.layers.0.self_attn.q_proj.weight", 3);
    assert_true(tp.weight[1] == 0.7f);
    assert_true(tp.density[1] == 0.8); /* model filter misses: falls to the top level */
    assert_true(tp.gamma[1] == 0.01);  /* top-level filter misses: the default */
    assert_true(tp.weight[2] == 0.9f); /* a fallback listed first wins (mergekit's order) */
    assert_true(tp.gamma[2] == 0.05);
    assert_false(tp.normalize);

    tp = params_ok(r, "model.layers.1.mlp.up_proj.weight", 3);
    assert_true(fabs(tp.weight[1] - 0.2) < 1e-7); /* gradient inside a filter: t = 0.5 */
    assert_true(tp.density[1] == 0.3);
    tp = params_ok(r, "model.layers.2.mlp.down_proj.weight", 3);
    assert_true(tp.weight[1] == 0.3f);
    assert_true(tp.density[1] == 0.8);

    tp = params_ok(r, "model.embed_tokens.weight", 3);
    assert_true(tp.weight[1] == 0.2f);
    assert_true(tp.gamma[1] == 0.0);
    assert_true(tp.gamma[2] == 0.05); /* model level beats the top level */
    assert_false(tp.normalize);
    tp = params_ok(r, "lm_head.weight", 3);
    assert_true(tp.normalize);

    const ms_recipe_param *wp = &r->models[0].params[MS_PARAM_WEIGHT];
    assert_int_equal(wp->n_conds, 3);
    assert_string_equal(wp->conds[0].filter, "self_attn");
    assert_null(wp->conds[2].filter);
    assert_int_equal(wp->conds[1].line, 9);
    assert_int_equal(wp->conds[1].value.line, 10);
    assert_null(r->params[MS_PARAM_NORMALIZE].conds[1].filter);
    ms_recipe_free(r);
}

static void test_model_over_global(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: della_linear")
        Y("base_model: models/base")
        Y("models:")
        Y("  - model: models/ft1")
        Y("    parameters: {weight: 2, density: 0.5, epsilon: 0.1}")
        Y("  - model: models/ft2")
        Y("parameters: {weight: 3, density: 0.6, epsilon: 0.2, rescale: off, lambda: 1.5}"));
    ms_tensor_params tp = params_ok(r, "model.layers.0.mlp.gate_proj.weight", 2);
    assert_true(tp.weight[1] == 2.0f && tp.weight[2] == 3.0f);
    assert_true(tp.density[1] == 0.5 && tp.density[2] == 0.6);
    assert_true(tp.epsilon[1] == 0.1 && tp.epsilon[2] == 0.2);
    assert_false(tp.rescale);
    assert_true(tp.lambda == 1.5f);
    ms_recipe_free(r);
}

/* ---------------------------------------------------------------- slices */

static ms_tensor_params slice_params_ok_at(const ms_recipe *r, unsigned slice, const char *out_name,
                                           const char *const *src, double t, int src_line)
{
    ms_tensor_params tp;
    memset(&tp, 0xA5, sizeof tp);
    ms_error err = {0};
    if (ms_recipe_slice_tensor_params(r, slice, out_name, src, t, &tp, &err) != 0)
        fail_msg("test line %d: tensor '%s': %s", src_line, out_name, err.msg);
    return tp;
}
#define slice_params_ok(r, s, name, src, t) slice_params_ok_at(r, s, name, src, t, __LINE__)

/* Several sources per slice: the base source leaves the merged list, the
 * others are the slice's slots in order, with their own parameters;
 * per-source filters match the source's tensor name, global ones the
 * output's; gradients are read at the caller's t. */
static void test_slices_merge(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: ties")
        Y("base_model: models/base")
        Y("slices:")
        Y("  - sources:")
        Y("      - model: models/ft1")
        Y("        layer_range: [2, 4]")
        Y("        parameters:")
        Y("          weight:")
        Y("            - filter: layers.2.")
        Y("              value: 0.25")
        Y("            - value: [0.0, 1.0]")
        Y("      - model: models/base")
        Y("        layer_range: [0, 2]")
        Y("      - model: models/ft2")
        Y("        layer_range: [1, 3]")
        Y("        parameters: {weight: 0.7, density: 0.4}")
        Y("  - sources:")
        Y("      - model: models/base")
        Y("        layer_range: [3, 4]")
        Y("      - model: models/ft1")
        Y("        layer_range: [0, 1]")
        Y("        parameters: {weight: 2}")
        Y("parameters:")
        Y("  density: 0.5")
        Y("  lambda:")
        Y("    - filter: layers.0.")
        Y("      value: 3")
        Y("    - value: 1"));
    assert_true(r->has_slices && r->base_listed);
    assert_int_equal(r->n_slices, 2);
    assert_int_equal(r->n_models, 3);
    const ms_recipe_slice *s0 = &r->slices[0], *s1 = &r->slices[1];
    assert_true(s0->has_base && s0->base_begin == 0 && s0->base_end == 2 && s0->base_line == 12);
    assert_true(s0->first_model == 0 && s0->n_models == 2 && s0->n_layers == 2 && s0->line == 4);
    assert_true(s1->has_base && s1->base_begin == 3 && s1->first_model == 2 && s1->n_models == 1 &&
                s1->n_layers == 1 && s1->line == 17);
    assert_string_equal(r->models[0].label, "slices[0].sources[0]");
    assert_string_equal(r->models[1].label, "slices[0].sources[2]");
    assert_string_equal(r->models[2].label, "slices[1].sources[1]");
    assert_string_equal(r->models[1].name, "models/ft2");
    assert_true(r->models[1].layer_begin == 1 && r->models[1].layer_end == 3 && r->models[2].slice == 1);

    /* output layer 0 of slice 0: ft1's layer 2 (its filter), ft2's layer 1 */
    const char *src0[] = {"model.layers.2.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"};
    ms_tensor_params tp = slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", src0, 0.0);
    assert_int_equal(tp.n_models, 2);
    assert_true(tp.has_base);
    assert_true(tp.weight[1] == 0.25f && tp.weight[2] == 0.7f);
    assert_true(tp.density[1] == 0.5 && tp.density[2] == 0.4);
    assert_true(tp.lambda == 3.0f); /* global: the output's name */
    assert_rest_zero(&tp);
    /* output layer 1: ft1's layer 3 misses the filter: the gradient at t, against fp64 */
    for (int trial = 0; trial < 20; trial++) {
        double t = rnd_unit();
        const char *src1[] = {"model.layers.3.mlp.up_proj.weight", NULL};
        tp = slice_params_ok(r, 0, "model.layers.1.mlp.up_proj.weight", src1, t);
        assert_true(tp.weight[1] == (float)((1.0 - t) * 0.0 + t * 1.0));
        assert_true(tp.weight[2] == 0.7f && tp.lambda == 1.0f);
    }
    /* the per-source filter is not matched against the output name */
    const char *src2[] = {"model.layers.3.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"};
    tp = slice_params_ok(r, 0, "model.layers.2.self_attn.q_proj.weight", src2, 1.0);
    assert_true(tp.weight[1] == 1.0f);
    tp = slice_params_ok(r, 1, "model.norm.weight", NULL, 1.0);
    assert_int_equal(tp.n_models, 1);
    assert_true(tp.weight[1] == 2.0f && tp.density[1] == 0.5);
    ms_recipe_free(r);

    /* linear: every source is merged, a base_model takes no part */
    r = load_ok(Y("merge_method: linear")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1], parameters: {weight: 0.3}}")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 0.7}}"));
    assert_int_equal(r->slices[0].n_models, 2);
    assert_false(r->slices[0].has_base);
    tp = slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 1.0);
    assert_true(tp.weight[1] == 0.3f && tp.weight[2] == 0.7f && !tp.has_base);
    ms_recipe_free(r);

    /* slerp: the base plus exactly one source per slice; the same model in several slices */
    r = load_ok(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [1, 2]}")
                Y("      - {model: models/ft1, layer_range: [1, 2]}")
                Y("parameters: {t: [0.2, 0.6]}"));
    assert_int_equal(r->n_models, 2);
    tp = slice_params_ok(r, 1, "model.layers.1.mlp.up_proj.weight", NULL, 0.5);
    assert_true(fabs(tp.t - 0.4) < 1e-15 && tp.n_models == 1 && tp.has_base);
    ms_recipe_free(r);
}

static void test_slices_errors(void **state)
{
    /* sources of different lengths: the source's line */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 2]}")
                Y("      - {model: models/ft1, layer_range: [0, 3], parameters: {weight: 1}}"),
                6, "slices[0].sources[1].layer_range [0, 3) spans 3 layers", "same number of layers");
    /* the base missing from a slice: the slice's line, naming base_model */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 1}}"),
                7, "slices[1] does not list the base_model 'models/base'", "ties");
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("parameters: {t: 0.5}")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("      - {model: models/ft2, layer_range: [0, 1]}"),
                5, "slices[0] does not list the base_model", "slerp");
    /* too many sources for slerp */
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("parameters: {t: 0.5}")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("      - {model: models/ft2, layer_range: [0, 1]}"),
                5, "merges exactly 1 model besides the base_model in each slice", "slices[0] lists 2");
    /* the base with parameters (ignored, as mergekit), twice, a model twice in one slice */
    ms_recipe_free(load_ok(Y("merge_method: ties")
                           Y("base_model: models/base")
                           Y("slices:")
                           Y("  - sources:")
                           Y("      - {model: models/base, layer_range: [0, 1], parameters: {weight: 1}}")
                           Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")));
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/base, layer_range: [1, 2]}"),
                6, "the base", "listed twice in slices[0]");
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 1}}"),
                5, "listed twice in slices[0]", "sources[0] and slices[0].sources[1]");
    /* a missing weight names the source */
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("      - {model: models/ft2, layer_range: [1, 2]}"),
                5, "slices[0].sources[1] ('models/ft2') has no weight", NULL);
    /* keys */
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - model: models/ft1")
                Y("        layer_range: [0, 1]")
                Y("        weight: 1"),
                6, "unknown key 'weight' in slices[0].sources[0]", NULL);
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    layers: 2"),
                5, "unknown key 'layers' in slices[0]", "expected sources, parameters, base_model");
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("      - {model: models/ft2, layer_range: [2, 1], parameters: {weight: 1}}"),
                5, "slices[0].sources[1].layer_range must be", NULL);
    expect_fail(Y("merge_method: passthrough")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("      - {model: models/ft2, layer_range: [0, 1]}"),
                4, "several sources", "passthrough");
    expect_fail(Y("merge_method: regmean")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}"),
                3, "slices are not supported with merge_method 'regmean'", NULL);
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("models:")
                Y("  - model: models/ft1"),
                2, "either slices or models", NULL);
}

/* mergekit's per-slice keys: a slice's parameters sit between its sources'
 * and the top level's (ConfigReader.parameter), for per-model parameters
 * (matched against the source's tensor name) and global ones (the output's);
 * gradients are read at the slice position t; residual_weight is accepted. */
static void test_slices_slice_params(void **state)
{
    ms_recipe *r = load_ok(
        Y("merge_method: ties")
        Y("base_model: models/base")
        Y("slices:")
        Y("  - sources:")
        Y("      - {model: models/base, layer_range: [0, 2]}")
        Y("      - {model: models/ft1, layer_range: [0, 2], parameters: {weight: 0.9}}")
        Y("      - {model: models/ft2, layer_range: [1, 3]}")
        Y("    parameters:")
        Y("      weight:")
        Y("        - filter: layers.1.")
        Y("          value: [0.2, 0.6]")
        Y("      density: 0.3")
        Y("      lambda:")
        Y("        - filter: layers.0.")
        Y("          value: [1.0, 3.0]")
        Y("    residual_weight: 0.5")
        Y("  - sources:")
        Y("      - {model: models/base, layer_range: [2, 3]}")
        Y("      - {model: models/ft2, layer_range: [2, 3]}")
        Y("parameters: {weight: 0.1, density: 0.8, lambda: 2}"));
    assert_int_equal(r->n_slices, 2);
    const ms_recipe_slice *s0 = &r->slices[0], *s1 = &r->slices[1];
    assert_true(s0->params[MS_PARAM_WEIGHT].present && s0->params[MS_PARAM_WEIGHT].line == 9);
    assert_int_equal(s0->params[MS_PARAM_WEIGHT].n_conds, 1);
    assert_true(s0->params[MS_PARAM_DENSITY].present && s0->params[MS_PARAM_DENSITY].line == 12);
    assert_true(s0->params[MS_PARAM_LAMBDA].present && !s0->params[MS_PARAM_GAMMA].present);
    assert_false(s1->params[MS_PARAM_WEIGHT].present || s1->params[MS_PARAM_DENSITY].present);
    assert_true(s0->has_base && !s0->base_override && !s0->base_name && s0->base_key_line == 0);
    for (int trial = 0; trial < 20; trial++) {
        double t = trial == 0 ? 0.0 : trial == 1 ? 1.0 : rnd_unit();
        /* output layer 0: ft1's and ft2's layers 0 and 1 */
        const char *src0[] = {"model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"};
        ms_tensor_params tp = slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", src0, t);
        assert_int_equal(tp.n_models, 2);
        assert_true(tp.has_base);
        assert_true(tp.weight[1] == 0.9f);                               /* the source's own */
        assert_true(tp.weight[2] == (float)((1.0 - t) * 0.2 + t * 0.6)); /* the slice's, its source's name */
        assert_true(tp.density[1] == 0.3 && tp.density[2] == 0.3);       /* the slice's over the top level's */
        assert_true(tp.lambda == (float)((1.0 - t) * 1.0 + t * 3.0));    /* global: the output's name */
        assert_rest_zero(&tp);
        /* output layer 1: ft2's layer 2 misses the slice's filter: the top level's */
        const char *src1[] = {"model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"};
        tp = slice_params_ok(r, 0, "model.layers.1.mlp.up_proj.weight", src1, t);
        assert_true(tp.weight[1] == 0.9f && tp.weight[2] == 0.1f);
        assert_true(tp.density[2] == 0.3 && tp.lambda == 2.0f);
        /* the slice's per-model filter is matched against the source's name, not the output's */
        const char *src2[] = {"model.layers.1.mlp.up_proj.weight", NULL};
        tp = slice_params_ok(r, 0, "model.layers.1.mlp.up_proj.weight", src2, t);
        assert_true(tp.weight[2] == (float)((1.0 - t) * 0.2 + t * 0.6));
    }
    /* slice 1 has no parameters: the top level's */
    ms_tensor_params tp = slice_params_ok(r, 1, "model.norm.weight", NULL, 1.0);
    assert_int_equal(tp.n_models, 1);
    assert_true(tp.weight[1] == 0.1f && tp.density[1] == 0.8 && tp.lambda == 2.0f);
    ms_recipe_free(r);

    /* slerp: t per slice, no top-level t; a top-level t fills slices without one */
    r = load_ok(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 2]}")
                Y("      - {model: models/ft1, layer_range: [0, 2]}")
                Y("    parameters: {t: [0.0, 0.5]}")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [2, 3]}")
                Y("      - {model: models/ft1, layer_range: [2, 3]}")
                Y("    parameters: {t: 0.7}"));
    assert_false(r->params[MS_PARAM_T].present);
    tp = slice_params_ok(r, 0, "model.layers.1.self_attn.q_proj.weight", NULL, 1.0);
    assert_true(tp.t == 0.5);
    tp = slice_params_ok(r, 0, "model.embed_tokens.weight", NULL, 0.0);
    assert_true(tp.t == 0.0);
    tp = slice_params_ok(r, 1, "model.layers.2.self_attn.q_proj.weight", NULL, 1.0);
    assert_true(tp.t == 0.7);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("    parameters: {t: 0.25}")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [1, 2]}")
                Y("      - {model: models/ft1, layer_range: [1, 2]}")
                Y("parameters: {t: 0.75}"));
    assert_true(slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 1.0).t == 0.25);
    assert_true(slice_params_ok(r, 1, "model.layers.1.mlp.up_proj.weight", NULL, 1.0).t == 0.75);
    ms_recipe_free(r);

    /* linear: a slice's weight stands in for its sources' */
    r = load_ok(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("      - {model: models/ft2, layer_range: [0, 1], parameters: {weight: 3}}")
                Y("    parameters: {weight: 2, normalize: false}"));
    tp = slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 1.0);
    assert_true(tp.weight[1] == 2.0f && tp.weight[2] == 3.0f && !tp.normalize && !tp.has_base);
    ms_recipe_free(r);

    /* della: a slice's constant density and epsilon are checked at load, at the density's line */
    expect_fail(Y("merge_method: della")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    parameters:")
                Y("      density: 0.1")
                Y("      epsilon: 0.2")
                Y("parameters: {density: 0.5}"),
                8, "density - epsilon > 0", "slices[0].sources[1]");
}

/* A slice's own base_model: the source that is that model is the slice's
 * base; the top-level base_model may then be left out, or be a merged
 * source of that slice. */
static void test_slices_slice_base(void **state)
{
    ms_recipe *r = load_ok(Y("merge_method: ties")
                           Y("slices:")
                           Y("  - sources:")
                           Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                           Y("      - {model: models/ft3, layer_range: [1, 2]}")
                           Y("    base_model: models/ft3")
                           Y("  - sources:")
                           Y("      - {model: models/ft2, layer_range: [1, 2]}")
                           Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 2}}")
                           Y("    base_model: models/ft2"));
    assert_null(r->base_path);
    assert_int_equal(r->n_models, 2);
    const ms_recipe_slice *s0 = &r->slices[0], *s1 = &r->slices[1];
    assert_true(s0->has_base && s0->base_override && s0->base_begin == 1 && s0->base_line == 5);
    assert_int_equal(s0->base_key_line, 6);
    assert_string_equal(s0->base_name, "models/ft3");
    assert_path(s0->base_path, "models/ft3");
    assert_null(s0->base_adapter_path);
    assert_true(s1->has_base && s1->base_override && s1->n_models == 1 && s1->first_model == 1);
    assert_string_equal(r->models[1].label, "slices[1].sources[1]");
    ms_tensor_params tp = slice_params_ok(r, 1, "model.layers.1.mlp.up_proj.weight", NULL, 1.0);
    assert_true(tp.has_base && tp.n_models == 1 && tp.weight[1] == 2.0f);
    ms_recipe_free(r);

    /* with a top-level base: a slice naming another base merges the top-level one as a source;
     * a slice naming the top-level base changes nothing */
    r = load_ok(Y("merge_method: task_arithmetic")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1], parameters: {weight: 0.5}}")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("    base_model: models/ft1")
                Y("    parameters: {weight: 0.25}")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [1, 2]}")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 1}}")
                Y("    base_model: models/base"));
    assert_int_equal(r->n_models, 2);
    assert_true(r->slices[0].base_override && r->slices[0].has_base && r->slices[0].n_models == 1);
    assert_string_equal(r->models[0].label, "slices[0].sources[0]");
    assert_string_equal(r->models[0].name, "models/base");
    assert_false(r->slices[1].base_override);
    assert_true(r->slices[1].has_base && r->slices[1].base_begin == 1);
    tp = slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 0.0);
    assert_true(tp.weight[1] == 0.5f && tp.has_base);
    ms_recipe_free(r);

    /* an optional base (nuslerp) named in one slice only */
    r = load_ok(Y("merge_method: nuslerp")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("      - {model: models/ft2, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("    base_model: models/base")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 1}}")
                Y("      - {model: models/ft2, layer_range: [1, 2], parameters: {weight: 1}}"));
    assert_true(r->slices[0].has_base && !r->slices[1].has_base);
    assert_true(slice_params_ok(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 1.0).has_base);
    assert_false(slice_params_ok(r, 1, "model.layers.1.mlp.up_proj.weight", NULL, 1.0).has_base);
    ms_recipe_free(r);
}

static void test_slices_slice_key_errors(void **state)
{
    /* a slice's base_model that is none of its sources: the slice's line, naming it */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    base_model: models/ft3"),
                4, "slices[0] does not list the base_model 'models/ft3'", NULL);
    /* no base anywhere for a slice */
    expect_fail(Y("merge_method: ties")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft3, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    base_model: models/ft3")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [1, 2], parameters: {weight: 1}}"),
                7, "slices[1] has no base_model", "ties");
    /* methods without a base refuse one per slice, at the key's line */
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    base_model: models/ft1"),
                5, "base_model in slices[0]: merge_method 'linear' does not use a base model", NULL);
    expect_fail(Y("merge_method: passthrough")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("    base_model: models/ft1"),
                5, "base_model in slices[0]", "does not use a base model");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("    base_model: ./models/nope"),
                6, "base_model in slices[0] path './models/nope' does not exist", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("    base_model:"),
                6, "base_model in slices[0] has no value", NULL);
    /* parameters: the same strictness as the top level's */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    parameters:")
                Y("      densty: 0.5"),
                8, "unknown key 'densty' in slices[0].parameters", NULL);
    ms_recipe_free(load_ok(Y("merge_method: ties") /* an unused parameter: ignored */
                           Y("base_model: models/base")
                           Y("slices:")
                           Y("  - sources:")
                           Y("      - {model: models/base, layer_range: [0, 1]}")
                           Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                           Y("    parameters: {t: 0.5}")));
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    parameters:")
                Y("      density: 1.5"),
                8, "'density' 1.5 in slices[0].parameters is out of range", NULL);
    /* duplicate slice keys */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    parameters: {density: 0.5}")
                Y("    parameters: {density: 0.6}"),
                8, "duplicate key 'parameters' in slices[0]", NULL);
    /* a required global parameter missing from one slice with no top-level fallback */
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("    parameters: {t: 0.5}")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [1, 2]}")
                Y("      - {model: models/ft1, layer_range: [1, 2]}"),
                8, "needs parameter 't'", "slices[1].parameters");
    /* a weight missing from a source and its slice */
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [0, 1]}")
                Y("    parameters: {weight: 1}")
                Y("  - sources:")
                Y("      - {model: models/ft1, layer_range: [1, 2]}"),
                7, "slices[1].sources[0] ('models/ft1') has no weight", "slice's parameters");
    /* residual_weight must still be a number */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("slices:")
                Y("  - sources:")
                Y("      - {model: models/base, layer_range: [0, 1]}")
                Y("      - {model: models/ft1, layer_range: [0, 1], parameters: {weight: 1}}")
                Y("    residual_weight: [1]"),
                7, "residual_weight in slices[0] must be a number", NULL);
    /* a slice that is not a map */
    expect_fail(Y("merge_method: linear")
                Y("slices:")
                Y("  - [models/ft1]"),
                3, "slices[0] must be a map with sources", NULL);
    /* a slice's weight filters matching nothing for a tensor: an error naming the source and the tensor */
    ms_recipe *r = load_ok(Y("merge_method: linear")
                           Y("slices:")
                           Y("  - sources:")
                           Y("      - {model: models/ft1, layer_range: [0, 1]}")
                           Y("    parameters:")
                           Y("      weight:")
                           Y("        - filter: self_attn")
                           Y("          value: 1"));
    ms_tensor_params tp;
    ms_error err = {0};
    assert_int_equal(ms_recipe_slice_tensor_params(r, 0, "model.layers.0.mlp.up_proj.weight", NULL, 1.0, &tp, &err), -1);
    check_error(&err, r->source_path, MS_EXIT_USAGE, 4, "no weight for slices[0].sources[0]", "slice or top-level",
                __LINE__);
    assert_non_null(strstr(err.msg, "model.layers.0.mlp.up_proj.weight"));
    ms_recipe_free(r);
}

/* ------------------------------------------------------------- the base */

static void test_base_in_models(void **state)
{
    /* task-vector: the base entry is dropped, slots are the others in order */
    ms_recipe *r = load_ok(
        Y("merge_method: ties")
        Y("base_model: models/base")
        Y("models:")
        Y("  - model: models/ft2")
        Y("    parameters: {weight: 0.2}")
        Y("  - model: ./models/../models/base")
        Y("    parameters:")
        Y("  - model: models/ft1")
        Y("    parameters: {weight: 0.1}"));
    assert_true(r->base_listed);
    assert_int_equal(r->n_models, 2);
    assert_string_equal(r->models[0].name, "models/ft2");
    assert_string_equal(r->models[1].name, "models/ft1");
    assert_int_equal(r->models[1].index, 2);
    ms_tensor_params tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.weight[1] == 0.2f && tp.weight[2] == 0.1f);
    ms_recipe_free(r);

    /* linear: the base listed with a weight is a regular model of the sum */
    r = load_ok(Y("merge_method: linear")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base")
                Y("    parameters: {weight: 0.3}")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 0.7}")
                Y("parameters: {normalize: false}"));
    assert_false(r->base_listed);
    assert_int_equal(r->n_models, 2);
    tp = params_ok(r, "model.norm.weight", 2);
    assert_false(tp.has_base);
    assert_false(tp.normalize);
    assert_true(tp.weight[1] == 0.3f && tp.weight[2] == 0.7f);
    ms_recipe_free(r);

    /* the base with parameters in a task-vector method: ignored (mergekit) */
    r = load_ok(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 0.1}")
                Y("  - model: models/base")
                Y("    parameters: {weight: 1.0}"));
    assert_true(r->base_listed);
    assert_int_equal(r->n_models, 1);
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.weight[1] == 0.1f);
    ms_recipe_free(r);
    /* the base alone */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base"),
                3, "models", "besides the base");
    /* base needed */
    expect_fail(Y("parameters: {weight: 1}")
                Y("merge_method: task_arithmetic")
                Y("models:")
                Y("  - model: models/ft1"),
                2, "merge_method 'task_arithmetic'", "base_model");
}

static void test_model_count_limit(void **state)
{
    char text[4096];
    for (int n = MS_MAX_MODELS; n <= MS_MAX_MODELS + 1; n++) {
        int len = snprintf(text, sizeof text,
                           "merge_method: task_arithmetic\nbase_model: models/base\n"
                           "parameters: {weight: 0.1}\nmodels:\n  - model: models/base\n");
        for (int i = 1; i <= n; i++)
            len += snprintf(text + len, sizeof text - (size_t)len, "  - model: models/ft%d\n", i);
        if (n == MS_MAX_MODELS) {
            ms_recipe *r = load_ok(text);
            assert_int_equal(r->n_models, MS_MAX_MODELS);
            ms_tensor_params tp = params_ok(r, "lm_head.weight", 4);
            assert_int_equal(tp.n_models, MS_MAX_MODELS);
            assert_true(tp.weight[MS_MAX_MODELS] == 0.1f);
            ms_recipe_free(r);
        } else {
            expect_fail(text, 4, "models", "at most 16");
        }
    }
}

/* ------------------------------------------------------------------ errors */

static void test_error_unknown_keys(void **state)
{
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("modles:")
                Y("  - model: models/ft1"),
                3, "unknown key 'modles'", "top level");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2")
                Y("    paramters: {weight: 1}"),
                7, "unknown key 'paramters'", "models[1]");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2")
                Y("    parameters:")
                Y("      weight: 1")
                Y("      densty: 0.5"),
                9, "unknown key 'densty' in models[1].parameters", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weigth: 1")
                Y("models:")
                Y("  - model: models/ft1"),
                4, "unknown key 'weigth' in parameters", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      weight:")
                Y("        - filter: mlp")
                Y("          valeu: 1"),
                8, "unknown key 'valeu'", "weight");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      weight:")
                Y("        - filter: mlp"),
                7, "weight", "no 'value'");
    expect_fail(Y("merge_method: ties")
                Y("merge_method: ties"),
                2, "duplicate key 'merge_method'", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      weight: 1")
                Y("      weight: 2"),
                7, "duplicate key 'weight'", NULL);
    expect_fail(Y("merge_method: linear")
                Y("tokenizer:")
                Y("  source: union"),
                2, "'tokenizer'", "not supported");
    expect_fail(Y("merge_method: linear")
                Y("slices: []"),
                2, "slices", "empty");
    expect_fail(Y("merge_method: passthrough")
                Y("slices: []"),
                2, "slices", "empty");
    expect_fail(Y("merge_method: passthrough")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2"),
                2, "models", "exactly one");
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    model: models/ft2"),
                4, "duplicate key 'model'", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - parameters: {weight: 1}"),
                3, "models[0]", "no 'model'");
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - models/ft1"),
                3, "models[0]", "'model'");
}

static void test_error_methods(void **state)
{
    expect_fail(Y("# a comment")
                Y("merge_method: tie")
                Y("models: []"),
                2, "unknown merge_method 'tie'", "dare_ties, dare_linear");
    expect_fail(Y("merge_method: core_space"),
                1, "merge_method 'core_space'", "not supported yet");
    expect_fail(Y("models:")
                Y("  - model: models/ft1"),
                1, "missing merge_method", NULL);
    expect_fail(Y("merge_method: linear"),
                1, "missing models", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models: []"),
                2, "models is empty", NULL);
    expect_fail(Y("merge_method: [ties]"),
                1, "merge_method", "string");
}

static void test_error_missing_weight(void **state)
{
    expect_fail(Y("merge_method: dare_ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2")
                Y("    parameters: {density: 0.5}")
                Y("parameters: {density: 0.4}"),
                6, "models[1] ('models/ft2') has no weight", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: models/ft1"),
                3, "models[0]", "no weight");

    /* only filters that miss this tensor: an error at resolution, naming the tensor */
    ms_recipe *r = load_ok(Y("merge_method: linear")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: {weight: [{filter: mlp, value: 1}]}"));
    ms_tensor_params tp = params_ok(r, "model.layers.0.mlp.up_proj.weight", 2);
    assert_true(tp.weight[1] == 1.0f);
    assert_true(tp.normalize);
    expect_tensor_fail(r, "model.layers.0.self_attn.k_proj.weight", 2, 3, "no weight",
                       "models[0]");
    ms_recipe_free(r);
}

static void test_error_ranges(void **state)
{
    static const char *const k_bad[] = {"0", "1.5", "-1", "0.0", "1.0000001", ".nan", "nan",
                                        "1e999", "abc", "true", "0x1p-1"};
    for (size_t i = 0; i < sizeof k_bad / sizeof k_bad[0]; i++) {
        char *text = NULL;
        assert_true(asprintf(&text,
                             Y("merge_method: ties")
                             Y("base_model: models/base")
                             Y("models:")
                             Y("  - model: models/ft1")
                             Y("    parameters:")
                             Y("      weight: 1")
                             Y("      density: %s"),
                             k_bad[i]) > 0);
        expect_fail(text, 7, "'density'", "models[0].parameters");
        free(text);
        /* the same value inside a gradient and at the top level */
        assert_true(asprintf(&text,
                             Y("merge_method: ties")
                             Y("base_model: models/base")
                             Y("models:")
                             Y("  - model: models/ft1")
                             Y("parameters:")
                             Y("  weight: 1")
                             Y("  density:")
                             Y("    - 0.5")
                             Y("    - %s"),
                             k_bad[i]) > 0);
        expect_fail(text, 9, "'density'", "in parameters");
        free(text);
    }
    /* both sides of each boundary */
    ms_recipe *r = load_ok(Y("merge_method: breadcrumbs")
                           Y("base_model: models/base")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: {weight: 1, density: 1, gamma: 0}")
                           Y("  - model: models/ft2")
                           Y("    parameters: {weight: 1, density: 1e-9, gamma: 0.999999}"));
    ms_tensor_params tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.density[1] == 1.0 && tp.gamma[1] == 0.0);
    assert_true(tp.density[2] == 1e-9 && tp.gamma[2] == 0.999999);
    ms_recipe_free(r);
    expect_fail(Y("merge_method: breadcrumbs")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1, gamma: 1}"),
                5, "'gamma' 1", "[0, 1)");
    expect_fail(Y("merge_method: breadcrumbs")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1, gamma: -0.01}"),
                5, "'gamma'", "out of range");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters: {weight: 1, normalize: maybe}")
                Y("models:")
                Y("  - model: models/ft1"),
                3, "'normalize'", "true or false");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters: {weight: 1, normalize: [true, false]}")
                Y("models:")
                Y("  - model: models/ft1"),
                3, "'normalize'", "gradients");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight: {filter: mlp, value: 1}")
                Y("models:")
                Y("  - model: models/ft1"),
                4, "'weight'", "one-entry list");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight: []")
                Y("models:")
                Y("  - model: models/ft1"),
                4, "'weight'", "empty list");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight:")
                Y("models:")
                Y("  - model: models/ft1"),
                4, "'weight'", "no value");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight: 1e39")
                Y("models:")
                Y("  - model: models/ft1"),
                4, "'weight'", "out of range");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight:")
                Y("    - 1")
                Y("    - {filter: mlp, value: 1}")
                Y("models:")
                Y("  - model: models/ft1"),
                6, "'weight'", "list of numbers");
}

static void test_error_della(void **state)
{
    /* the default density 1 can never satisfy d + eps < 1 */
    expect_fail(Y("merge_method: della")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}"),
                4, "density + epsilon < 1", "(default)");
    /* d - eps <= 0, line of the density */
    expect_fail(Y("merge_method: della")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight: 1")
                Y("  density: 0.15")
                Y("models:")
                Y("  - model: models/ft1"),
                5, "density - epsilon > 0", "models[0]");
    /* d + eps >= 1 from an explicit epsilon; both sides of the boundary */
    expect_fail(Y("merge_method: della_linear")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1, density: 0.5}")
                Y("  - model: models/ft2")
                Y("    parameters:")
                Y("      weight: 1")
                Y("      density: 0.75")
                Y("      epsilon: 0.25"),
                9, "epsilon 0.25", "models[1]");
    ms_recipe *r = load_ok(Y("merge_method: della_linear")
                           Y("base_model: models/base")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: {weight: 1, density: 0.74, epsilon: 0.25}"));
    ms_tensor_params tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.density[1] == 0.74 && tp.epsilon[1] == 0.25);
    ms_recipe_free(r);

    /* a gradient density: fine at the last layer, rejected at layer 0 */
    r = load_ok(Y("merge_method: della")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      weight: 1")
                Y("      density: [0.1, 0.5]"));
    tp = params_ok(r, "model.layers.3.mlp.up_proj.weight", 4);
    assert_true(tp.density[1] == 0.5 && tp.epsilon[1] == 0.15);
    expect_tensor_fail(r, "model.layers.0.mlp.up_proj.weight", 4, 7, "density - epsilon > 0",
                       "epsilon 0.15 (default)");
    ms_recipe_free(r);
}

/* A known parameter the method does not use loads (as in mergekit, with a
 * warning) and changes nothing; misplacing a global parameter in a model's
 * parameters stays an error. */
static void test_unused_parameter_ignored(void **state)
{
    ms_recipe *r = load_ok(Y("merge_method: ties")
                           Y("base_model: models/base")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: {weight: 1, density: 0.5, gamma: 0.1}"));
    ms_tensor_params tp = params_ok(r, "model.layers.0.mlp.up_proj.weight", 4);
    assert_true(tp.gamma[1] == 0.0 && tp.density[1] == 0.5 && tp.sparsify == MS_SPARSIFY_MAGNITUDE);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: task_arithmetic")
                Y("base_model: models/base")
                Y("parameters:")
                Y("  weight: 1")
                Y("  density: 0.5")
                Y("models:")
                Y("  - model: models/ft1"));
    tp = params_ok(r, "model.layers.0.mlp.up_proj.weight", 4);
    assert_true(tp.density[1] == 1.0 && tp.weight[1] == 1.0f);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: linear")
                Y("parameters: {weight: 1, lambda: 2}")
                Y("models:")
                Y("  - model: models/ft1"));
    tp = params_ok(r, "model.layers.0.mlp.up_proj.weight", 4);
    assert_true(tp.lambda == 1.0f);
    ms_recipe_free(r);
    /* the base listed among the models with parameters: they are ignored */
    r = load_ok(Y("merge_method: dare_ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base")
                Y("    parameters: {weight: 0.3, density: 0.9}")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1, density: 0.5}"));
    assert_int_equal(r->n_models, 1);
    ms_recipe_free(r);
    expect_fail(Y("merge_method: dare_ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      weight: 1")
                Y("      lambda: 0.1"),
                7, "'lambda' in models[0].parameters", "global parameter");
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1, densty: 0.5}"),
                5, "unknown key 'densty'", NULL);
}

static void test_error_paths(void **state)
{
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/x/nope")
                Y("    parameters: {weight: 1}"),
                4, "model path 'models/x/nope' does not exist", NULL);
    /* one '/' and missing: looks like a hub id */
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/nope")
                Y("    parameters: {weight: 1}"),
                4, "model 'models/nope' is not a local path", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: meta-llama/Llama-3.1-8B")
                Y("models:")
                Y("  - model: models/ft1"),
                2, "base_model 'meta-llama/Llama-3.1-8B' is not a local path",
                "hub ids are not supported");
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: org/name")
                Y("    parameters: {weight: 1}"),
                5, "model 'org/name' is not a local path", NULL);
    /* ./org/name and /abs paths are never hub ids */
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: ./org/name"),
                3, "model path './org/name' does not exist", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: models/ft1+adapters/nope"),
                3, "adapter path 'adapters/nope'", "does not exist");
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: ./models/nope+adapters/lora1"),
                3, "model path './models/nope' does not exist", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: models/ft1+"),
                3, "DIR+ADAPTER", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: a+b+c"),
                3, "model path 'a+b+c' does not exist", NULL);
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model:")
                Y("      model:")
                Y("        path: models/ft1"),
                4, "model must be a path string", "nested");
    expect_fail(Y("merge_method: linear")
                Y("models:")
                Y("  - model: \"\""),
                3, "model is an empty path", NULL);
    expect_fail(Y("merge_method: linear")
                Y("parameters: {weight: 1}")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: ./models/ft1/"),
                5, "listed twice", "models[0]");
    expect_fail(Y("merge_method: linear")
                Y("parameters: {weight: 1}")
                Y("models:")
                Y("  - model: models/ft1")
                Y("tokenizer_source: ./models/nope"),
                5, "tokenizer_source path './models/nope'", NULL);
    expect_fail(Y("merge_method: linear")
                Y("parameters: {weight: 1}")
                Y("models:")
                Y("  - model: models/ft1")
                Y("tokenizer_source: union"),
                5, "tokenizer_source 'union'", "not supported");
}

static void test_error_scalars(void **state)
{
    static const char *const k_bad_dtypes[] = {"fp16", "bf16", "float64", "Float16", "[bfloat16]"};
    for (size_t i = 0; i < sizeof k_bad_dtypes / sizeof k_bad_dtypes[0]; i++) {
        char *text = NULL;
        assert_true(asprintf(&text,
                             Y("merge_method: linear")
                             Y("parameters: {weight: 1}")
                             Y("models:")
                             Y("  - model: models/ft1")
                             Y("%s: %s"),
                             i % 2 ? "out_dtype" : "dtype", k_bad_dtypes[i]) > 0);
        expect_fail(text, 5, i % 2 ? "out_dtype" : "dtype",
                    i == 4 ? "must be a string" : "bfloat16, float16 or float32");
        free(text);
    }
    static const char *const k_bad_seeds[] = {"-1", "1.5", "18446744073709551616", "abc", "0x10"};
    for (size_t i = 0; i < sizeof k_bad_seeds / sizeof k_bad_seeds[0]; i++) {
        char *text = NULL;
        assert_true(asprintf(&text,
                             Y("merge_method: linear")
                             Y("random_seed: %s")
                             Y("parameters: {weight: 1}")
                             Y("models:")
                             Y("  - model: models/ft1"),
                             k_bad_seeds[i]) > 0);
        expect_fail(text, 2, "random_seed", k_bad_seeds[i]);
        free(text);
    }
    ms_recipe *r = load_ok(Y("merge_method: linear")
                           Y("random_seed: 0")
                           Y("parameters: {weight: 1}")
                           Y("models:")
                           Y("  - model: models/ft1"));
    assert_true(r->has_random_seed && r->random_seed == 0);
    ms_recipe_free(r);
}

static void test_error_yaml(void **state)
{
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models: [")
                Y("  {model: models/ft1"),
                5, "YAML error", NULL);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("     parameters: {weight: 1}"),
                5, "YAML error: mapping values are not allowed", NULL);
    expect_fail(Y("merge_method: ties")
                Y("  bad: indentation"),
                2, "YAML error", NULL);
    expect_fail(Y("merge_method: \"ties")
                Y("base_model: x"),
                3, "YAML error", NULL);
    expect_fail(Y("merge_method: *nope"),
                1, "YAML error", "undefined alias");
    expect_fail("merge_method: linear\n\xff\xfe bad utf8\n", 2, "YAML error", NULL);
    expect_fail(Y("merge_method: linear")
                Y("---")
                Y("merge_method: ties"),
                2, "one YAML document", NULL);
    expect_fail("", 1, "empty", NULL);
    expect_fail(Y("# only a comment"), 1, "empty", NULL);
    expect_fail(Y("- merge_method: linear"), 1, "must be a map", NULL);
    expect_fail(Y("? [a, b]")
                Y(": c"),
                1, "keys must be strings", NULL);
}

static void test_error_unreadable(void **state)
{
    char *path = joined("does-not-exist.yml");
    ms_recipe *r = (ms_recipe *)0x1;
    ms_error err = {0};
    assert_int_equal(ms_recipe_load(path, &r, &err), -1);
    assert_null(r);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE); /* a wrong path on the command line */
    assert_non_null(strstr(err.msg, path));
    free(path);
    /* a directory is not a recipe either */
    err = (ms_error){0};
    assert_int_equal(ms_recipe_load(g_dir, &r, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_RUNTIME);
}

/* Anchors and aliases are plain YAML: a shared parameter block works. */
static void test_yaml_aliases_and_styles(void **state)
{
    ms_recipe *r = load_ok(Y("merge_method: \"dare_linear\"")
                           Y("base_model: 'models/base'")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: &p {weight: '0.5', density: .25}")
                           Y("  - model: models/ft2")
                           Y("    parameters: *p")
                           Y("name: [anything, {goes: here}]"));
    ms_tensor_params tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.weight[1] == 0.5f && tp.weight[2] == 0.5f);
    assert_true(tp.density[1] == 0.25 && tp.density[2] == 0.25);
    assert_false(tp.normalize);
    assert_true(tp.rescale);
    ms_recipe_free(r);
    ms_recipe_free(NULL);
}

/* YAML merge keys, as PyYAML (and so mergekit) reads them: `<<: *anchor`
 * and `<<: [*a, *b]` give a mapping the pairs it does not have itself,
 * earlier sources first; a merged mapping may itself merge; anything but a
 * mapping as the value is a recipe error. */
static void test_yaml_merge_keys(void **state)
{
    (void)state;
    ms_recipe *r = load_ok(Y("merge_method: dare_ties")
                           Y("base_model: models/base")
                           Y("models:")
                           Y("  - model: models/ft1")
                           Y("    parameters: &p {weight: 0.5, density: 0.25}")
                           Y("  - model: models/ft2")
                           Y("    parameters:")
                           Y("      <<: *p")
                           Y("      weight: 0.3"));
    ms_tensor_params tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.weight[1] == 0.5f && tp.weight[2] == 0.3f); /* the explicit key wins */
    assert_true(tp.density[1] == 0.25 && tp.density[2] == 0.25);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: dare_ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: &a {weight: 0.5}")
                Y("  - model: models/ft2")
                Y("    parameters: &b {<<: *a, density: 0.75, weight: 0.9}")
                Y("  - model: models/ft3")
                Y("    parameters: {<<: [*a, *b]}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.weight[2] == 0.9f && tp.density[2] == 0.75);
    assert_true(tp.weight[3] == 0.5f && tp.density[3] == 0.75); /* *a comes first: its weight */
    ms_recipe_free(r);
    expect_fail(Y("merge_method: ties")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {<<: 3, weight: 1}"),
                5, "the value of '<<' must be a mapping", NULL);
}

/* The shipped examples (examples/NAME.yml) load against a models/{base,ft1,ft2} folder
 * (MS_SRC is set by ctest; skipped when run by hand without it). */
static void test_examples_load(void **state)
{
    const char *src = getenv("MS_SRC");
    if (!src)
        skip();
    static const struct {
        const char *file;
        ms_method method;
    } k_examples[] = {
        {"ties.yml", MS_METHOD_TIES},
        {"dare_ties.yml", MS_METHOD_DARE_TIES},
        {"linear.yml", MS_METHOD_LINEAR},
        {"task_arithmetic.yml", MS_METHOD_TASK_ARITHMETIC},
        {"breadcrumbs_ties.yml", MS_METHOD_BREADCRUMBS_TIES},
        {"della.yml", MS_METHOD_DELLA},
    };
    for (size_t i = 0; i < sizeof k_examples / sizeof k_examples[0]; i++) {
        char *path = NULL;
        assert_true(asprintf(&path, "%s/examples/%s", src, k_examples[i].file) > 0);
        FILE *f = fopen(path, "rb");
        if (!f)
            fail_msg("cannot open %s", path);
        char text[8192];
        size_t n = fread(text, 1, sizeof text - 1, f);
        fclose(f);
        text[n] = '\0';
        ms_recipe *r = load_ok(text); /* written next to this test's models/ */
        assert_int_equal(r->method, k_examples[i].method);
        assert_int_equal(r->n_models, 2);
        assert_true(r->has_dtype && r->dtype == ST_BF16);
        if (r->base_path)
            assert_path(r->base_path, "models/base");
        assert_path(r->models[0].path, "models/ft1");
        assert_path(r->models[1].path, "models/ft2");
        for (unsigned layer = 0; layer < 4; layer++) {
            char name[64];
            snprintf(name, sizeof name, "model.layers.%u.self_attn.q_proj.weight", layer);
            ms_tensor_params tp = params_ok(r, name, 4);
            assert_int_equal(tp.n_models, 2);
        }
        ms_recipe_free(r);
        free(path);
    }
}

/* ------------------------------------- interpolation and model-soup methods */

static void test_interp_methods(void **state)
{
    /* slerp as mergekit users write it: the base listed among the models,
     * t as filtered gradients with a fallback */
    ms_recipe *r = load_ok(Y("merge_method: slerp")
                           Y("base_model: models/base")
                           Y("models:")
                           Y("  - model: models/base")
                           Y("  - model: models/ft1")
                           Y("parameters:")
                           Y("  t:")
                           Y("    - filter: self_attn")
                           Y("      value: [0, 0.5, 0.3, 0.7, 1]")
                           Y("    - filter: mlp")
                           Y("      value: [1, 0.5, 0.7, 0.3, 0]")
                           Y("    - value: 0.5")
                           Y("dtype: bfloat16"));
    assert_true(r->base_listed);
    assert_int_equal(r->n_models, 1);
    ms_tensor_params tp = params_ok(r, "model.layers.1.self_attn.q_proj.weight", 5);
    assert_int_equal(tp.method, MS_METHOD_SLERP);
    assert_true(tp.has_base);
    assert_int_equal(tp.n_models, 1);
    assert_true(tp.t == 0.5 && tp.weight[1] == 1.0f && tp.lambda == 1.0f && !tp.normalize);
    assert_rest_zero(&tp);
    assert_true(params_ok(r, "model.layers.2.mlp.up_proj.weight", 5).t == 0.7);
    assert_true(params_ok(r, "model.layers.3.mlp.up_proj.weight", 5).t == 0.3);
    assert_true(params_ok(r, "model.layers.4.self_attn.o_proj.weight", 5).t == 1.0);
    assert_true(params_ok(r, "model.norm.weight", 5).t == 0.5);
    ms_recipe_free(r);

    /* nuslerp: no base (two models), defaults; with a base listed among three */
    r = load_ok(Y("merge_method: nuslerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 0.25}")
                Y("  - model: models/ft2")
                Y("    parameters: {weight: 0.75}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_false(tp.has_base);
    assert_true(tp.nuslerp_flatten && !tp.nuslerp_row_wise);
    assert_true(tp.weight[1] == 0.25f && tp.weight[2] == 0.75f);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: nuslerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/base")
                Y("  - model: models/ft2")
                Y("    parameters: {weight: 2}")
                Y("parameters: {nuslerp_flatten: false, nuslerp_row_wise: yes}"));
    assert_true(r->base_listed);
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.has_base && !tp.nuslerp_flatten && tp.nuslerp_row_wise);
    assert_int_equal(tp.n_models, 2);
    ms_recipe_free(r);

    /* multislerp, karcher: optional base, defaults and settings */
    r = load_ok(Y("merge_method: multislerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2")
                Y("    parameters: {weight: 2}")
                Y("  - model: models/ft3")
                Y("    parameters: {weight: 3}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.has_base && tp.normalize_weights && tp.eps == 1e-8);
    assert_int_equal(tp.n_models, 3);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: multislerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("parameters: {weight: 0.5, normalize_weights: false, eps: 1e-6}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(!tp.has_base && !tp.normalize_weights && tp.eps == 1e-6 && tp.weight[2] == 0.5f);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: karcher")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("parameters: {max_iter: 1000, tol: 1e-9}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(!tp.has_base && tp.max_iter == 1000 && tp.tol == 1e-9);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: karcher")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.has_base && tp.max_iter == 10 && tp.tol == 1e-5);
    ms_recipe_free(r);

    /* model_stock, nearswap, sce, ram, ramplus_tl, arcee_fusion */
    r = load_ok(Y("merge_method: model_stock")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.has_base && !tp.filter_wise && tp.weight[1] == 1.0f);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: model_stock")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("  - model: models/ft3")
                Y("parameters: {filter_wise: true}"));
    assert_true(params_ok(r, "model.norm.weight", 2).filter_wise);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: nearswap")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {t: 0.0001}"));
    assert_true(params_ok(r, "model.norm.weight", 2).t == 0.0001);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: sce")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("parameters: {int8_mask: true}"));
    assert_true(params_ok(r, "model.norm.weight", 2).select_topk == 1.0);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: sce")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {select_topk: [0.1, 0.9]}"));
    assert_true(fabs(params_ok(r, "model.layers.1.mlp.up_proj.weight", 3).select_topk - 0.5) < 1e-15);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: ram")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("    parameters: {epsilon: 0.001}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.epsilon[1] == 1e-5 && tp.epsilon[2] == 0.001);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: ramplus_tl")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("parameters: {r: 0.5}"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.ram_r == 0.5 && tp.ram_alpha == 0.2 && tp.epsilon[2] == 1e-5);
    ms_recipe_free(r);
    r = load_ok(Y("merge_method: arcee_fusion")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base")
                Y("  - model: models/ft1"));
    tp = params_ok(r, "model.norm.weight", 2);
    assert_true(tp.method == MS_METHOD_ARCEE_FUSION && tp.has_base && tp.n_models == 1);
    ms_recipe_free(r);

    /* parameter facts */
    double d;
    assert_false(ms_method_param_default(MS_METHOD_SLERP, MS_PARAM_T, &d));
    assert_true(ms_method_param_default(MS_METHOD_DELLA, MS_PARAM_EPSILON, &d) && d == 0.15);
    assert_true(ms_method_param_default(MS_METHOD_RAM, MS_PARAM_EPSILON, &d) && d == 1e-5);
    assert_true(ms_param_in_range(ms_method_param_info(MS_METHOD_SLERP, MS_PARAM_T), 0.0));
    assert_false(ms_param_in_range(ms_method_param_info(MS_METHOD_SLERP, MS_PARAM_T), nextafter(1.0, 2.0)));
    assert_false(ms_param_in_range(ms_method_param_info(MS_METHOD_NEARSWAP, MS_PARAM_T), 0.0));
    assert_true(ms_param_in_range(ms_method_param_info(MS_METHOD_NEARSWAP, MS_PARAM_T), 5.0));
    assert_true(ms_param_in_range(ms_param_info_get(MS_PARAM_MAX_ITER), 7.0));
    assert_false(ms_param_in_range(ms_param_info_get(MS_PARAM_MAX_ITER), 7.5));
    unsigned lo, hi;
    ms_method_model_count(MS_METHOD_MODEL_STOCK, &lo, &hi);
    assert_true(lo == 2 && hi == MS_MAX_MODELS);
    ms_method_model_count(MS_METHOD_TIES, &lo, &hi);
    assert_true(lo == 1 && hi == MS_MAX_MODELS);
}

static void test_interp_errors(void **state)
{
    /* model counts: one line naming the key, exit 2 */
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("parameters: {t: 0.5}")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2"),
                4, "merge_method 'slerp' merges exactly two models, one of them the base_model",
                "models lists 2 besides the base_model");
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("parameters: {t: 0.5}")
                Y("models:")
                Y("  - model: models/base"),
                4, "models", "besides the base");
    expect_fail(Y("merge_method: nearswap")
                Y("base_model: models/base")
                Y("parameters: {t: 0.5}")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("  - model: models/ft3"),
                4, "'nearswap' merges exactly two models", "lists 3");
    expect_fail(Y("merge_method: arcee_fusion")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2"),
                3, "'arcee_fusion' merges exactly two models", NULL);
    expect_fail(Y("merge_method: model_stock")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base")
                Y("  - model: models/ft1"),
                3, "'model_stock' needs at least 2 models besides the base_model", "lists 1");
    expect_fail(Y("merge_method: nuslerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft3")
                Y("    parameters: {weight: 1}"),
                2, "'nuslerp' merges exactly 2 models", "lists 3");
    /* mergekit: the nuslerp base can not be one of the two models */
    expect_fail(Y("merge_method: nuslerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/base")
                Y("  - model: models/ft2")
                Y("    parameters: {weight: 1}"),
                3, "'nuslerp' merges exactly 2 models", "lists 1 besides the base_model");
    expect_fail(Y("merge_method: slerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {t: 0.5}"),
                1, "merge_method 'slerp'", "needs a base_model");

    /* required t, ranges, parameters a method does not take */
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1"),
                1, "merge_method 'slerp' needs parameter 't'", "top-level parameters");
    expect_fail(Y("merge_method: nearswap")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1"),
                1, "merge_method 'nearswap' needs parameter 't'", NULL);
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters:")
                Y("  t: [0, 1.5]"),
                6, "'t' 1.5 in parameters is out of range", "[0, 1]");
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters:")
                Y("  t: -0.1"),
                6, "'t'", "[0, 1]");
    expect_fail(Y("merge_method: nearswap")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters:")
                Y("  t: 0"),
                6, "'t' 0 in parameters is out of range", "(0, FLT_MAX]");
    expect_fail(Y("merge_method: ram")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters:")
                Y("      epsilon: 1.5"),
                6, "'epsilon' 1.5 in models[0].parameters is out of range", "[0, 1)");
    expect_fail(Y("merge_method: ramplus_tl")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {epsilon: -1e-5}"),
                5, "'epsilon'", "out of range");
    expect_fail(Y("merge_method: sce")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {select_topk: 0}"),
                5, "'select_topk'", "(0, 1]");
    expect_fail(Y("merge_method: multislerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {weight: 1, eps: 0}"),
                4, "'eps'", "(0, 1)");
    expect_fail(Y("merge_method: karcher")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters:")
                Y("  max_iter: 2.5"),
                5, "'max_iter' in parameters must be an integer", "'2.5'");
    expect_fail(Y("merge_method: karcher")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters:")
                Y("  max_iter: [1, 2]"),
                5, "'max_iter'", "takes an integer");
    expect_fail(Y("merge_method: karcher")
                Y("models:")
                Y("  - model: models/ft1")
                Y("parameters: {tol: 1}"),
                4, "'tol'", "[0, 1)");
    /* leftovers mergekit ignores (weight, normalize, int8_mask, the base's
     * parameters) are ignored with a warning by the interpolation methods;
     * unknown names stay errors */
    ms_recipe *lr = load_ok(Y("merge_method: slerp")
                            Y("base_model: models/base")
                            Y("models:")
                            Y("  - model: models/base")
                            Y("    parameters: {weight: 1.0}")
                            Y("  - model: models/ft1")
                            Y("    parameters: {weight: 0.5, density: 0.3}")
                            Y("parameters: {t: 0.25, normalize: true, int8_mask: true}"));
    assert_int_equal(lr->n_models, 1);
    assert_false(lr->models[0].params[MS_PARAM_WEIGHT].present);
    ms_tensor_params ltp = params_ok(lr, "model.norm.weight", 2);
    assert_true(ltp.t == 0.25 && ltp.weight[1] == 1.0f && !ltp.normalize);
    ms_recipe_free(lr);
    lr = load_ok(Y("merge_method: nuslerp") /* a published recipe's form */
                 Y("models:")
                 Y("  - model: models/ft1")
                 Y("    parameters: {weight: 0.6}")
                 Y("  - model: models/ft2")
                 Y("    parameters: {weight: 0.2}")
                 Y("  - model: models/base")
                 Y("    parameters: {weight: 1.0}")
                 Y("base_model: models/base")
                 Y("parameters: {normalize: true, int8_mask: true, nuslerp_flatten: false, nuslerp_row_wise: true}"));
    ltp = params_ok(lr, "model.norm.weight", 2);
    assert_true(ltp.has_base && ltp.weight[1] == 0.6f && ltp.weight[2] == 0.2f && ltp.nuslerp_row_wise);
    ms_recipe_free(lr);
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {wieght: 0.5}")
                Y("parameters: {t: 0.5}"),
                5, "unknown key 'wieght'", "models[0].parameters");
    expect_fail(Y("merge_method: slerp")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {t: 0.5}"),
                5, "'t' in models[0].parameters", "global parameter");
    expect_fail(Y("merge_method: model_stock")
                Y("base_model: models/base")
                Y("models:")
                Y("  - model: models/ft1")
                Y("  - model: models/ft2")
                Y("parameters: {t: 0.5, filter_wise: maybe}"),
                6, "'filter_wise'", "true or false");
    expect_fail(Y("merge_method: nuslerp")
                Y("models:")
                Y("  - model: models/ft1")
                Y("    parameters: {weight: 1}")
                Y("  - model: models/ft2"),
                5, "models[1]", "no weight");

    /* per tensor: t filters that match nothing; multislerp weights summing to 0 */
    ms_recipe *rr = load_ok(Y("merge_method: slerp")
                            Y("base_model: models/base")
                            Y("models:")
                            Y("  - model: models/ft1")
                            Y("parameters:")
                            Y("  t:")
                            Y("    - filter: mlp")
                            Y("      value: 0.3"));
    assert_true(params_ok(rr, "model.layers.0.mlp.up_proj.weight", 2).t == 0.3);
    expect_tensor_fail(rr, "model.layers.0.self_attn.q_proj.weight", 2, 6, "no t on tensor", "fallback");
    ms_recipe_free(rr);
    rr = load_ok(Y("merge_method: multislerp")
                 Y("models:")
                 Y("  - model: models/ft1")
                 Y("    parameters: {weight: [1, -1]}")
                 Y("  - model: models/ft2")
                 Y("    parameters: {weight: 1}"));
    assert_true(params_ok(rr, "model.layers.0.mlp.up_proj.weight", 3).weight[1] == 1.0f);
    expect_tensor_fail(rr, "model.layers.2.mlp.up_proj.weight", 3, 3, "multislerp", "sum to 0");
    ms_recipe_free(rr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_keys),
        cmocka_unit_test(test_optional_keys_absent),
        cmocka_unit_test(test_paths_relative_to_recipe),
        cmocka_unit_test(test_method_defaults),
        cmocka_unit_test(test_layer_t),
        cmocka_unit_test(test_gradients_hand_computed),
        cmocka_unit_test(test_gradients_random),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_model_over_global),
        cmocka_unit_test(test_base_in_models),
        cmocka_unit_test(test_model_count_limit),
        cmocka_unit_test(test_error_unknown_keys),
        cmocka_unit_test(test_error_methods),
        cmocka_unit_test(test_error_missing_weight),
        cmocka_unit_test(test_error_ranges),
        cmocka_unit_test(test_error_della),
        cmocka_unit_test(test_unused_parameter_ignored),
        cmocka_unit_test(test_error_paths),
        cmocka_unit_test(test_error_scalars),
        cmocka_unit_test(test_error_yaml),
        cmocka_unit_test(test_error_unreadable),
        cmocka_unit_test(test_yaml_aliases_and_styles),
        cmocka_unit_test(test_yaml_merge_keys),
        cmocka_unit_test(test_examples_load),
        cmocka_unit_test(test_interp_methods),
        cmocka_unit_test(test_interp_errors),
        cmocka_unit_test(test_slices_merge),
        cmocka_unit_test(test_slices_errors),
        cmocka_unit_test(test_slices_slice_params),
        cmocka_unit_test(test_slices_slice_base),
        cmocka_unit_test(test_slices_slice_key_errors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
