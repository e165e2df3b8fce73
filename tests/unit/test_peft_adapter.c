/* PEFT LoRA adapters (io/peft_adapter.h) and, end to end, their deltas
 * (cpu/lora_delta.h).
 *
 * Each test writes a small Llama- or GPT-2-shaped base model and an adapter
 * directory (adapter_config.json + adapter_model.safetensors, through the
 * project's writer) with fresh random, non-zero values in random dtypes, opens
 * the adapter against the base and checks the mapping (kinds, ranks, scales
 * from r / lora_alpha / use_rslora / rank_pattern / alpha_pattern), then
 * reads the factors back with ms_peft_read_tensor and compares the adapted
 * rows with a float64 reference computed from the config's numbers (not from
 * the target's). Every validation error is provoked and its exit code and
 * message content checked. The random seed is printed; MS_TEST_SEED=N
 * replays a run. */
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "cpu/lora_delta.h"
#include "io/model_dir.h"
#include "io/ms_error.h"
#include "io/peft_adapter.h"
#include "io/st_writer.h"
#include "pipeline/merge_math.h"

/* ------------------------------------------------------------ randomness */

static uint64_t g_rng;

static uint64_t rnd(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float rnd_float(float lo, float hi)
{
    float f = lo + (hi - lo) * (float)((rnd() >> 40) + 1) / 16777217.0f;
    return f == 0.0f ? 0.001f : f;
}

static st_dtype rnd_dtype(void)
{
    static const st_dtype k[] = {ST_F32, ST_BF16, ST_F16};
    return k[rnd() % 3];
}

/* ------------------------------------------------------------ tensor sets */

typedef struct ttensor {
    char name[256];
    st_dtype dt;
    unsigned ndim;
    uint64_t shape[2];
    uint64_t numel;
    void *raw;
    double *val; /* the stored values, widened exactly */
} ttensor;

typedef struct tset {
    ttensor t[256];
    size_t n;
} tset;

static size_t elem_size(st_dtype dt) { return dt == ST_F32 ? 4 : 2; }

static double widen_one(const void *raw, st_dtype dt, uint64_t i)
{
    if (dt == ST_F32) {
        float f;
        memcpy(&f, (const char *)raw + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const char *)raw + 2 * i, 2);
    return dt == ST_BF16 ? ms_bf16_to_f32(h) : ms_f16_to_f32(h);
}

/* Adds a tensor of random values in [lo, hi) (never zero). */
static ttensor *tset_add_range(tset *s, const char *name, st_dtype dt, unsigned ndim, uint64_t d0, uint64_t d1,
                               float lo, float hi)
{
    assert_true(s->n < sizeof s->t / sizeof s->t[0]);
    ttensor *t = &s->t[s->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dt = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->numel = ndim == 1 ? d0 : d0 * d1;
    t->raw = malloc(t->numel * elem_size(dt) + 1);
    t->val = malloc(t->numel * sizeof(double) + 1);
    assert_true(t->raw && t->val);
    for (uint64_t i = 0; i < t->numel; i++) {
        float f = rnd_float(lo, hi);
        if (dt == ST_F32) {
            memcpy((char *)t->raw + 4 * i, &f, 4);
        } else {
            uint16_t h = dt == ST_BF16 ? ms_f32_to_bf16(f) : ms_f32_to_f16(f);
            memcpy((char *)t->raw + 2 * i, &h, 2);
        }
        t->val[i] = widen_one(t->raw, dt, i);
    }
    return t;
}

static ttensor *tset_add(tset *s, const char *name, st_dtype dt, unsigned ndim, uint64_t d0, uint64_t d1)
{
    return tset_add_range(s, name, dt, ndim, d0, d1, -0.5f, 0.5f);
}

static const ttensor *tset_find(const tset *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    return NULL;
}

static void tset_free(tset *s)
{
    for (size_t i = 0; i < s->n; i++) {
        free(s->t[i].raw);
        free(s->t[i].val);
    }
    s->n = 0;
}

/* Writes the set as STEM.safetensors in dir with the project's writer. */
static void tset_write(const tset *s, const char *dir, const char *stem)
{
    ms_error err = {0};
    st_plan *p = NULL;
    st_writer *w = NULL;
    assert_int_equal(st_plan_create(UINT64_MAX, &p, &err), 0);
    assert_int_equal(st_plan_set_stem(p, stem, &err), 0);
    for (size_t i = 0; i < s->n; i++)
        assert_int_equal(st_plan_add_tensor(p, s->t[i].name, s->t[i].dt, s->t[i].ndim, s->t[i].shape, NULL, &err), 0);
    if (st_plan_layout(p, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(st_writer_open(p, dir, &w, &err), 0);
    for (size_t i = 0; i < s->n; i++)
        assert_int_equal(st_writer_write_tensor(w, i, s->t[i].raw, &err), 0);
    if (st_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
    st_writer_close(w);
    st_plan_free(p);
}

/* ------------------------------------------------------------ directories */

static char g_root[64];

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static char *subdir(const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", g_root, name) > 0);
    nftw(p, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    assert_int_equal(mkdir(p, 0755), 0);
    return p;
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* ------------------------------------------------------------ fixtures */

#define H 16     /* hidden */
#define KV 8     /* k/v projection width */
#define FF 24    /* intermediate */
#define VOCAB 40
#define LAYERS 3

static const char *const k_attn[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
static const char *const k_mlp[] = {"gate_proj", "up_proj", "down_proj"};

/* [out, in] of a Llama linear module. */
static void linear_shape(const char *proj, uint64_t *out, uint64_t *in)
{
    *in = H;
    *out = H;
    if (!strcmp(proj, "k_proj") || !strcmp(proj, "v_proj"))
        *out = KV;
    else if (!strcmp(proj, "gate_proj") || !strcmp(proj, "up_proj"))
        *out = FF;
    else if (!strcmp(proj, "down_proj"))
        *in = FF;
}

static void module_path(char *buf, size_t len, unsigned layer, const char *proj)
{
    bool attn = strstr(proj, "_proj") && (proj[0] == 'q' || proj[0] == 'k' || proj[0] == 'v' || proj[0] == 'o');
    snprintf(buf, len, "model.layers.%u.%s.%s", layer, attn ? "self_attn" : "mlp", proj);
}

static tset g_base;
static char *g_base_dir;
static ms_model *g_base_model;

static void base_build(void)
{
    char name[256];
    tset *b = &g_base;
    tset_add(b, "model.embed_tokens.weight", rnd_dtype(), 2, VOCAB, H);
    for (unsigned l = 0; l < LAYERS; l++) {
        snprintf(name, sizeof name, "model.layers.%u.input_layernorm.weight", l);
        tset_add(b, name, rnd_dtype(), 1, H, 0);
        for (size_t k = 0; k < 4; k++) {
            uint64_t o, i;
            linear_shape(k_attn[k], &o, &i);
            module_path(name, sizeof name, l, k_attn[k]);
            strcat(name, ".weight");
            tset_add(b, name, rnd_dtype(), 2, o, i);
        }
        for (size_t k = 0; k < 3; k++) {
            uint64_t o, i;
            linear_shape(k_mlp[k], &o, &i);
            module_path(name, sizeof name, l, k_mlp[k]);
            strcat(name, ".weight");
            tset_add(b, name, rnd_dtype(), 2, o, i);
        }
    }
    tset_add(b, "model.norm.weight", rnd_dtype(), 1, H, 0);
    tset_add(b, "lm_head.weight", rnd_dtype(), 2, VOCAB, H);
    g_base_dir = subdir("base");
    tset_write(b, g_base_dir, "model");
    write_text(g_base_dir, "config.json", "{\"model_type\": \"llama\"}");
    ms_error err = {0};
    if (ms_model_open(g_base_dir, &g_base_model, &err) != 0)
        fail_msg("%s", err.msg);
}

/* A LoRA pair for module (Llama linear or embedding) of rank r. infix is ""
 * or ".default" (an adapter name inside the key). */
static void add_lora(tset *ad, const char *module, uint64_t r, uint64_t out, uint64_t in, const char *infix)
{
    char name[300];
    st_dtype dt = rnd_dtype();
    snprintf(name, sizeof name, "base_model.model.%s.lora_A%s.weight", module, infix);
    tset_add(ad, name, dt, 2, r, in);
    snprintf(name, sizeof name, "base_model.model.%s.lora_B%s.weight", module, infix);
    tset_add(ad, name, rnd() % 4 ? dt : rnd_dtype(), 2, out, r);
}

/* LoRA on `proj` in every layer (rank r). */
static void add_lora_all_layers(tset *ad, const char *proj, uint64_t r)
{
    char module[200];
    uint64_t o, i;
    linear_shape(proj, &o, &i);
    for (unsigned l = 0; l < LAYERS; l++) {
        module_path(module, sizeof module, l, proj);
        add_lora(ad, module, r, o, i, "");
    }
}

/* Writes an adapter directory: the tensors and "{" config "}". */
static char *adapter_write(const char *name, const tset *ad, const char *config)
{
    char *dir = subdir(name);
    tset_write(ad, dir, "adapter_model");
    char *json = NULL;
    assert_true(asprintf(&json, "{%s}", config) > 0);
    write_text(dir, "adapter_config.json", json);
    free(json);
    return dir;
}

static ms_peft *open_ok(const char *dir, const ms_model *base)
{
    ms_peft *a = NULL;
    ms_error err = {0};
    if (ms_peft_open(dir, base, &a, &err) != 0)
        fail_msg("ms_peft_open(%s) failed: %s", dir, err.msg);
    assert_non_null(a);
    return a;
}

/* ms_peft_open must fail with exit code `code` and a message containing
 * every needle (and the adapter's path). */
static void expect_error(const char *dir, const ms_model *base, int code, const char *n1, const char *n2,
                         const char *n3)
{
    ms_peft *a = (ms_peft *)0x1;
    ms_error err = {0};
    int rc = ms_peft_open(dir, base, &a, &err);
    if (rc == 0)
        fail_msg("ms_peft_open(%s) succeeded, expected exit %d with '%s'", dir, code, n1 ? n1 : "");
    assert_int_equal(rc, -1);
    assert_null(a);
    if (err.exit_code != code)
        fail_msg("exit code %d, expected %d: %s", err.exit_code, code, err.msg);
    const char *needles[] = {n1, n2, n3};
    for (size_t k = 0; k < 3; k++)
        if (needles[k] && !strstr(err.msg, needles[k]))
            fail_msg("message lacks '%s': %s", needles[k], err.msg);
}

/* One failing adapter: written, opened, checked, removed. */
static void error_case(const char *name, const tset *ad, const char *config, int code, const char *n1, const char *n2,
                       const char *n3)
{
    char *dir = adapter_write(name, ad, config);
    expect_error(dir, g_base_model, code, n1, n2, n3);
    if (code == MS_EXIT_DATA || code == MS_EXIT_USAGE) {
        ms_error err = {0};
        ms_peft *a = NULL;
        ms_peft_open(dir, g_base_model, &a, &err);
        if (!strstr(err.msg, dir) && !strstr(err.msg, "adapter_model"))
            fail_msg("message does not name the adapter: %s", err.msg);
    }
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

/* ------------------------------------------------------------ numeric check */

/* Checks one target end to end: the tensors it names are the ones written;
 * the rows computed by cpu_lora_rows (in two chunks) match the float64
 * reference with the scale from the config's numbers. */
static void check_numeric(const ms_peft *a, const ms_lora_target *t, const tset *base, const tset *ad,
                          double scale_ref)
{
    ms_error err = {0};
    const ttensor *w = t->source ? tset_find(ad, t->source->name) : tset_find(base, t->base_name);
    assert_non_null(w);
    uint64_t rows = t->rows, cols = t->cols, n = rows * cols;
    assert_int_equal(w->numel, n);
    void *raw[3] = {NULL, NULL, NULL};
    const st_tensor *parts[3] = {t->A, t->B, t->magnitude};
    const ttensor *mem[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3; k++) {
        if (!parts[k])
            continue;
        raw[k] = malloc(st_tensor_nbytes(parts[k]));
        if (ms_peft_read_tensor(a, parts[k], raw[k], &err) != 0)
            fail_msg("%s", err.msg);
        mem[k] = tset_find(ad, parts[k]->name);
        assert_non_null(mem[k]);
        assert_memory_equal(raw[k], mem[k]->raw, st_tensor_nbytes(parts[k]));
    }
    if (t->source) {
        void *src = malloc(st_tensor_nbytes(t->source));
        assert_int_equal(ms_peft_read_tensor(a, t->source, src, &err), 0);
        assert_memory_equal(src, w->raw, st_tensor_nbytes(t->source));
        free(src);
    }
    if (t->kind != MS_LORA_REPLACE)
        assert_true(t->scale == (float)scale_ref);

    cpu_lora *l = NULL;
    assert_int_equal(cpu_lora_open(t, raw[0], raw[1], raw[2], &l), 0);
    uint64_t cut = rows / 2, elem = elem_size(w->dt);
    if (cpu_lora_needs_stats(l)) {
        cpu_lora_stats_rows(l, w->raw, w->dt, 0, cut, NULL);
        cpu_lora_stats_rows(l, (char *)w->raw + cut * cols * elem, w->dt, cut, rows - cut, NULL);
    }
    float *out = malloc(n * sizeof(float));
    cpu_lora_rows(l, (char *)w->raw + cut * cols * elem, w->dt, cut, rows - cut, out + cut * cols, NULL);
    cpu_lora_rows(l, w->raw, w->dt, 0, cut, out, NULL);
    cpu_lora_close(l);

    double *ref = malloc(n * sizeof(double)), *tol = malloc(n * sizeof(double));
    const double u = 1.0 / 16777216.0;
    for (uint64_t i = 0; i < rows; i++) {
        for (uint64_t j = 0; j < cols; j++) {
            double wv = w->val[i * cols + j], p = 0.0, pabs = 0.0;
            if (t->kind != MS_LORA_REPLACE) {
                uint64_t o = t->transposed ? j : i, m = t->transposed ? i : j, in = t->A->shape[1];
                for (uint64_t k = 0; k < t->rank; k++) {
                    double prod = mem[1]->val[o * t->rank + k] * mem[0]->val[k * in + m];
                    p += prod;
                    pabs += fabs(prod);
                }
            }
            double v = wv + scale_ref * p;
            ref[i * cols + j] = v;
            tol[i * cols + j] =
                2.0 * u * ((double)(t->rank + 3) * fabs(scale_ref) * pabs + fabs(wv) + fabs(v));
        }
    }
    if (t->magnitude) {
        uint64_t nf = t->transposed ? cols : rows, len = t->transposed ? rows : cols;
        assert_int_equal(nf, t->n_features);
        for (uint64_t f = 0; f < nf; f++) {
            double ss = 0.0, se = 0.0;
            for (uint64_t e = 0; e < len; e++) {
                uint64_t idx = t->transposed ? e * cols + f : f * cols + e;
                ss += ref[idx] * ref[idx];
                se += tol[idx] * tol[idx];
            }
            double fac = mem[2]->val[f] / sqrt(ss), rel = sqrt(se) / sqrt(ss) + 8.0 * u;
            for (uint64_t e = 0; e < len; e++) {
                uint64_t idx = t->transposed ? e * cols + f : f * cols + e;
                tol[idx] = fabs(fac) * (tol[idx] + fabs(ref[idx]) * rel);
                ref[idx] *= fac;
            }
        }
    }
    for (uint64_t i = 0; i < n; i++)
        if (!(fabs((double)out[i] - ref[i]) <= tol[i]))
            fail_msg("%s element %" PRIu64 ": %.9g, float64 reference %.9g (tolerance %.3g)", t->base_name, i,
                     (double)out[i], ref[i], tol[i]);
    free(ref);
    free(tol);
    free(out);
    for (int k = 0; k < 3; k++)
        free(raw[k]);
}

/* ------------------------------------------------------------ tests */

static void test_plain_lora(void **state)
{
    (void)state;
    tset ad = {0};
    add_lora_all_layers(&ad, "q_proj", 4);
    add_lora_all_layers(&ad, "v_proj", 4);
    char *dir = adapter_write("plain", &ad,
                              "\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"v_proj\", "
                              "\"q_proj\"], \"init_lora_weights\": true, \"bias\": \"none\", \"rank_pattern\": {}, "
                              "\"alpha_pattern\": {}, \"modules_to_save\": null, \"use_dora\": false");
    ms_peft *a = open_ok(dir, g_base_model);
    assert_string_equal(ms_peft_path(a), dir);
    assert_int_equal(ms_peft_model(a)->kind, MS_MODEL_KIND_ADAPTER);
    assert_int_equal(ms_peft_n_targets(a), 2 * LAYERS);
    for (size_t i = 0; i < ms_peft_n_targets(a); i++) {
        const ms_lora_target *t = ms_peft_target_at(a, i);
        if (i)
            assert_true(strcmp(ms_peft_target_at(a, i - 1)->base_name, t->base_name) < 0);
        assert_ptr_equal(ms_peft_target(a, t->base_name), t);
        assert_int_equal(t->kind, MS_LORA_LINEAR);
        assert_int_equal(t->rank, 4);
        assert_false(t->transposed);
        assert_null(t->magnitude);
        assert_null(t->source);
        assert_true(t->alpha == 8.0);
        char expect[300];
        snprintf(expect, sizeof expect, "%s.weight", t->module);
        assert_string_equal(t->base_name, expect);
        check_numeric(a, t, &g_base, &ad, 2.0);
    }
    assert_null(ms_peft_target(a, "model.layers.0.self_attn.k_proj.weight"));
    assert_null(ms_peft_target(a, "model.embed_tokens.weight"));
    assert_null(ms_peft_target(a, "lm_head.weight"));
    assert_null(ms_peft_target(a, "zzz"));
    const ms_lora_target *v = ms_peft_target(a, "model.layers.2.self_attn.v_proj.weight");
    assert_non_null(v);
    assert_int_equal(v->rows, KV);
    assert_int_equal(v->cols, H);
    assert_string_equal(v->module, "model.layers.2.self_attn.v_proj");
    ms_peft_close(a);
    ms_peft_close(NULL);
    free(dir);
    tset_free(&ad);
}

static void test_rslora(void **state)
{
    (void)state;
    tset ad = {0};
    add_lora_all_layers(&ad, "o_proj", 9);
    char *dir = adapter_write("rslora", &ad,
                              "\"r\": 9, \"lora_alpha\": 7, \"use_rslora\": true, \"target_modules\": [\"o_proj\"]");
    ms_peft *a = open_ok(dir, g_base_model);
    assert_int_equal(ms_peft_n_targets(a), LAYERS);
    for (size_t i = 0; i < ms_peft_n_targets(a); i++)
        check_numeric(a, ms_peft_target_at(a, i), &g_base, &ad, 7.0 / 3.0);
    ms_peft_close(a);
    free(dir);
    tset_free(&ad);
}

/* rank_pattern / alpha_pattern: keys match "(.*\.)?(KEY)$", first key in the
 * file's order wins; "proj" must not match "q_proj" (no dot before it). */
static void test_rank_alpha_patterns(void **state)
{
    (void)state;
    tset ad = {0};
    char module[200];
    for (unsigned l = 0; l < LAYERS; l++) {
        module_path(module, sizeof module, l, "q_proj");
        add_lora(&ad, module, l == 1 ? 8 : 4, H, H, "");
        module_path(module, sizeof module, l, "v_proj");
        add_lora(&ad, module, 2, KV, H, "");
        module_path(module, sizeof module, l, "down_proj");
        add_lora(&ad, module, 6, H, FF, "");
    }
    char *dir = adapter_write(
        "patterns", &ad,
        "\"r\": 6, \"lora_alpha\": 12, \"target_modules\": [\"q_proj\", \"v_proj\", \"down_proj\"], "
        "\"rank_pattern\": {\"model.layers.1.self_attn.q_proj\": 8, \"q_proj\": 4, \"v_proj\": 2, \"proj\": 16}, "
        "\"alpha_pattern\": {\"layers\\\\.[02]\\\\.self_attn\\\\.q_proj\": 3, \"q_proj\": 5, \"mlp\\\\.d\\\\w+\": 9}");
    ms_peft *a = open_ok(dir, g_base_model);
    assert_int_equal(ms_peft_n_targets(a), 3 * LAYERS);
    for (unsigned l = 0; l < LAYERS; l++) {
        char name[200];
        snprintf(name, sizeof name, "model.layers.%u.self_attn.q_proj.weight", l);
        const ms_lora_target *t = ms_peft_target(a, name);
        assert_non_null(t);
        double alpha = l == 1 ? 5.0 : 3.0, r = l == 1 ? 8.0 : 4.0;
        assert_int_equal(t->rank, (unsigned)r);
        assert_true(t->alpha == alpha);
        check_numeric(a, t, &g_base, &ad, alpha / r);
        snprintf(name, sizeof name, "model.layers.%u.self_attn.v_proj.weight", l);
        t = ms_peft_target(a, name);
        assert_int_equal(t->rank, 2);
        assert_true(t->alpha == 12.0);
        check_numeric(a, t, &g_base, &ad, 6.0);
        snprintf(name, sizeof name, "model.layers.%u.mlp.down_proj.weight", l);
        t = ms_peft_target(a, name);
        assert_int_equal(t->rank, 6);
        assert_true(t->alpha == 9.0);
        check_numeric(a, t, &g_base, &ad, 1.5);
    }
    ms_peft_close(a);
    free(dir);
    tset_free(&ad);
}

/* GPT-2's Conv1D weights are stored [in, out]. */
static void test_fan_in_fan_out(void **state)
{
    (void)state;
    tset base = {0}, ad = {0};
    tset_add(&base, "transformer.wte.weight", rnd_dtype(), 2, VOCAB, H);
    tset_add(&base, "transformer.h.0.attn.c_attn.weight", rnd_dtype(), 2, H, 3 * H);
    tset_add(&base, "transformer.h.0.attn.c_proj.weight", rnd_dtype(), 2, H, H);
    tset_add(&base, "transformer.h.0.mlp.c_fc.weight", rnd_dtype(), 2, H, 4 * H);
    tset_add(&base, "transformer.h.0.mlp.c_proj.weight", rnd_dtype(), 2, 4 * H, H);
    char *bdir = subdir("gpt2");
    tset_write(&base, bdir, "model");
    ms_model *m = NULL;
    ms_error err = {0};
    assert_int_equal(ms_model_open(bdir, &m, &err), 0);
    add_lora(&ad, "transformer.h.0.attn.c_attn", 4, 3 * H, H, "");
    add_lora(&ad, "transformer.h.0.mlp.c_fc", 4, 4 * H, H, "");
    add_lora(&ad, "transformer.h.0.mlp.c_proj", 4, H, 4 * H, "");
    char *dir = adapter_write("fifo", &ad,
                              "\"r\": 4, \"lora_alpha\": 16, \"fan_in_fan_out\": true, \"target_modules\": "
                              "[\"c_attn\", \"c_fc\", \"mlp.c_proj\"]");
    ms_peft *a = open_ok(dir, m);
    assert_int_equal(ms_peft_n_targets(a), 3);
    for (size_t i = 0; i < 3; i++) {
        const ms_lora_target *t = ms_peft_target_at(a, i);
        assert_true(t->transposed);
        assert_int_equal(t->kind, MS_LORA_LINEAR);
        check_numeric(a, t, &base, &ad, 4.0);
    }
    assert_null(ms_peft_target(a, "transformer.h.0.attn.c_proj.weight"));
    ms_peft_close(a);
    /* the same weights read as nn.Linear ([out, in]) do not fit */
    write_text(dir, "adapter_config.json",
               "{\"r\": 4, \"lora_alpha\": 16, \"target_modules\": [\"c_attn\", \"c_fc\", \"mlp.c_proj\"]}");
    expect_error(dir, m, MS_EXIT_DATA, "do not fit base tensor", "[48, 4]", "[16, 48]");
    ms_model_close(m);
    free(dir);
    free(bdir);
    tset_free(&ad);
    tset_free(&base);
}

/* DoRA: the magnitude key in its saved forms (with and without ".weight"),
 * and adapter names inside keys ("lora_A.default.weight"). */
static void test_dora(void **state)
{
    (void)state;
    for (int named = 0; named < 2; named++) {
        tset ad = {0};
        char module[200], name[300];
        for (unsigned l = 0; l < LAYERS; l++) {
            for (int k = 0; k < 2; k++) {
                const char *proj = k ? "up_proj" : "q_proj";
                uint64_t o, i;
                linear_shape(proj, &o, &i);
                module_path(module, sizeof module, l, proj);
                add_lora(&ad, module, 3, o, i, named ? ".default" : "");
                if (named)
                    snprintf(name, sizeof name, "base_model.model.%s.lora_magnitude_vector.default%s", module,
                             l == 1 ? ".weight" : "");
                else
                    snprintf(name, sizeof name, "base_model.model.%s.lora_magnitude_vector%s", module,
                             l == 1 ? ".weight" : "");
                tset_add_range(&ad, name, rnd_dtype(), 1, o, 0, 0.2f, 2.0f);
            }
        }
        char *dir = adapter_write("dora", &ad,
                                  "\"r\": 3, \"lora_alpha\": 5, \"use_dora\": true, \"target_modules\": "
                                  "[\"q_proj\", \"up_proj\"]");
        ms_peft *a = open_ok(dir, g_base_model);
        assert_int_equal(ms_peft_n_targets(a), 2 * LAYERS);
        for (size_t i = 0; i < ms_peft_n_targets(a); i++) {
            const ms_lora_target *t = ms_peft_target_at(a, i);
            assert_non_null(t->magnitude);
            assert_int_equal(t->n_features, t->rows);
            check_numeric(a, t, &g_base, &ad, 5.0 / 3.0);
        }
        ms_peft_close(a);
        free(dir);
        tset_free(&ad);
    }
}

/* lora_embedding_A [r, vocab], lora_embedding_B [dim, r], with and without
 * DoRA (whose features are the embedding's columns). */
static void test_embedding(void **state)
{
    (void)state;
    for (int dora = 0; dora < 2; dora++) {
        tset ad = {0};
        char module[200];
        st_dtype dt = rnd_dtype();
        tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_A", dt, 2, 5, VOCAB);
        tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_B", dt, 2, H, 5);
        if (dora)
            tset_add_range(&ad, "base_model.model.model.embed_tokens.lora_magnitude_vector", dt, 1, H, 0, 0.5f,
                           3.0f);
        for (unsigned l = 0; l < LAYERS; l++) {
            module_path(module, sizeof module, l, "q_proj");
            add_lora(&ad, module, 5, H, H, "");
            if (dora) {
                char name[300];
                snprintf(name, sizeof name, "base_model.model.%s.lora_magnitude_vector", module);
                tset_add_range(&ad, name, rnd_dtype(), 1, H, 0, 0.2f, 2.0f);
            }
        }
        char cfg[256];
        snprintf(cfg, sizeof cfg, "\"r\": 5, \"lora_alpha\": 10, \"use_dora\": %s, \"target_modules\": [\"embed_tokens\", \"q_proj\"]",
                 dora ? "true" : "false");
        char *dir = adapter_write("embedding", &ad, cfg);
        ms_peft *a = open_ok(dir, g_base_model);
        const ms_lora_target *t = ms_peft_target(a, "model.embed_tokens.weight");
        assert_non_null(t);
        assert_int_equal(t->kind, MS_LORA_EMBEDDING);
        assert_true(t->transposed);
        assert_int_equal(t->rows, VOCAB);
        assert_int_equal(t->cols, H);
        check_numeric(a, t, &g_base, &ad, 2.0);
        module_path(module, sizeof module, 1, "q_proj");
        strcat(module, ".weight");
        check_numeric(a, ms_peft_target(a, module), &g_base, &ad, 2.0);
        ms_peft_close(a);
        free(dir);
        tset_free(&ad);
    }
}

/* modules_to_save and saved biases replace the base tensor; a saved
 * base_layer (resized embedding) carries the LoRA; embed_tokens / lm_head may
 * have more rows than the base, other tensors may not. */
static void test_modules_to_save_and_base_layer(void **state)
{
    (void)state;
    tset ad = {0};
    char module[200];
    module_path(module, sizeof module, 0, "q_proj");
    add_lora(&ad, module, 2, H, H, "");
    tset_add(&ad, "base_model.model.lm_head.weight", rnd_dtype(), 2, VOCAB + 8, H);
    tset_add(&ad, "base_model.model.model.norm.modules_to_save.weight", rnd_dtype(), 1, H, 0);
    tset_add(&ad, "base_model.model.model.layers.1.input_layernorm.modules_to_save.weight", rnd_dtype(), 1, H, 0);
    tset_add(&ad, "base_model.model.model.embed_tokens.base_layer.weight", rnd_dtype(), 2, VOCAB + 8, H);
    tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_A", rnd_dtype(), 2, 2, VOCAB + 8);
    tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_B", rnd_dtype(), 2, H, 2);
    char *dir = adapter_write("mts", &ad,
                              "\"r\": 2, \"lora_alpha\": 3, \"target_modules\": [\"q_proj\", \"embed_tokens\"], "
                              "\"modules_to_save\": [\"lm_head\", \"norm\", \"input_layernorm\"]");
    ms_peft *a = open_ok(dir, g_base_model);
    assert_int_equal(ms_peft_n_targets(a), 5);
    const ms_lora_target *t = ms_peft_target(a, "lm_head.weight");
    assert_non_null(t);
    assert_int_equal(t->kind, MS_LORA_REPLACE);
    assert_int_equal(t->rows, VOCAB + 8);
    assert_int_equal(t->cols, H);
    assert_string_equal(t->source->name, "base_model.model.lm_head.weight");
    check_numeric(a, t, &g_base, &ad, 0.0);
    t = ms_peft_target(a, "model.norm.weight");
    assert_non_null(t);
    assert_int_equal(t->kind, MS_LORA_REPLACE);
    assert_int_equal(t->rows, 1);
    assert_int_equal(t->cols, H);
    check_numeric(a, t, &g_base, &ad, 0.0);
    t = ms_peft_target(a, "model.layers.1.input_layernorm.weight");
    assert_non_null(t);
    check_numeric(a, t, &g_base, &ad, 0.0);
    t = ms_peft_target(a, "model.embed_tokens.weight");
    assert_non_null(t);
    assert_int_equal(t->kind, MS_LORA_EMBEDDING);
    assert_non_null(t->source);
    assert_int_equal(t->rows, VOCAB + 8);
    check_numeric(a, t, &g_base, &ad, 1.5);
    ms_peft_close(a);
    free(dir);

    /* a saved base layer alone replaces the weight */
    tset only = {0};
    tset_add(&only, "base_model.model.model.embed_tokens.base_layer.weight", rnd_dtype(), 2, VOCAB, H);
    add_lora(&only, module, 2, H, H, "");
    dir = adapter_write("base_layer_only", &only, "\"r\": 2, \"lora_alpha\": 2, \"target_modules\": [\"q_proj\"]");
    a = open_ok(dir, g_base_model);
    t = ms_peft_target(a, "model.embed_tokens.weight");
    assert_non_null(t);
    assert_int_equal(t->kind, MS_LORA_REPLACE);
    check_numeric(a, t, &g_base, &only, 0.0);
    ms_peft_close(a);
    free(dir);
    tset_free(&only);

    tset bad = {0};
    tset_add(&bad, "base_model.model.model.layers.0.self_attn.o_proj.weight", ST_BF16, 2, H + 1, H);
    error_case("mts_rows", &bad, "\"modules_to_save\": [\"o_proj\"]", MS_EXIT_DATA, "does not fit", "[17, 16]",
               "[16, 16]");
    tset_free(&bad);
    tset_add(&bad, "base_model.model.lm_head.weight", ST_BF16, 2, VOCAB, H + 1);
    error_case("mts_cols", &bad, "\"modules_to_save\": [\"lm_head\"]", MS_EXIT_DATA, "does not fit", "[40, 17]",
               NULL);
    tset_free(&bad);
    tset_add(&bad, "base_model.model.score.weight", ST_BF16, 2, 2, H);
    error_case("mts_missing", &bad, "\"modules_to_save\": [\"score\"]", MS_EXIT_DATA, "score.weight",
               "missing from the base", NULL);
    tset_free(&bad);
    /* a tensor both replaced and LoRA-adapted */
    add_lora(&bad, "lm_head", 2, VOCAB, H, "");
    tset_add(&bad, "base_model.model.lm_head.weight", ST_BF16, 2, VOCAB, H);
    error_case("twice", &bad, "\"r\": 2, \"target_modules\": [\"lm_head\"]", MS_EXIT_DATA, "changed twice",
               "lm_head.weight", NULL);
    tset_free(&bad);
    tset_free(&ad);
}

/* target_modules as a list, a regex and "all-linear"; exclude_modules and
 * layers_to_transform; the Python -> POSIX regex translation. */
static void test_target_selection(void **state)
{
    (void)state;
    tset qv = {0}, all = {0};
    add_lora_all_layers(&qv, "q_proj", 2);
    add_lora_all_layers(&qv, "v_proj", 2);
    for (size_t k = 0; k < 4; k++)
        add_lora_all_layers(&all, k_attn[k], 2);
    for (size_t k = 0; k < 3; k++)
        add_lora_all_layers(&all, k_mlp[k], 2);

    static const char *const k_ok_qv[] = {
        "\"target_modules\": \"model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.(?:q|v)_proj\"",
        "\"target_modules\": \"model\\\\.layers\\\\.\\\\d{1,2}\\\\.self_attn\\\\.[qv]_proj\"",
        "\"target_modules\": \".*?\\\\.(?P<which>q|v)_proj\"",
        "\"target_modules\": \"[\\\\w.]*[\\\\.][qv]_pro[j]\"",
        "\"target_modules\": [\"q_proj\", \"v_proj\", \"nonexistent_proj\"]",
        "\"target_modules\": [\"self_attn.q_proj\", \"model.layers.0.self_attn.v_proj\", \"v_proj\"]",
        "\"target_modules\": [\"q_proj\", \"v_proj\", \"k_proj\"], \"exclude_modules\": [\"k_proj\"]",
        ("\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 1, 2], \"layers_pattern\": "
         "\"layers\""),
        "\"target_modules\": null",
    };
    for (size_t k = 0; k < sizeof k_ok_qv / sizeof k_ok_qv[0]; k++) {
        char cfg[512];
        snprintf(cfg, sizeof cfg, "\"r\": 2, %s", k_ok_qv[k]);
        char *dir = adapter_write("sel_ok", &qv, cfg);
        ms_peft *a = NULL;
        ms_error err = {0};
        if (ms_peft_open(dir, g_base_model, &a, &err) != 0)
            fail_msg("config %s: %s", cfg, err.msg);
        assert_int_equal(ms_peft_n_targets(a), 2 * LAYERS);
        ms_peft_close(a);
        free(dir);
    }
    char *dir = adapter_write("all_linear", &all, "\"r\": 2, \"target_modules\": \"all-linear\"");
    ms_peft *a = open_ok(dir, g_base_model);
    assert_int_equal(ms_peft_n_targets(a), 7 * LAYERS);
    ms_peft_close(a);
    free(dir);

    /* configs that do not select weights present in the file */
    static const struct {
        const char *cfg, *needle;
    } k_bad_qv[] = {
        {"\"target_modules\": \"model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.q_proj\"", "v_proj"},
        {"\"target_modules\": \"model\\\\.layers\\\\.[0-1]\\\\.self_attn\\\\.[qv]_proj\"", "layers.2"},
        {"\"target_modules\": \"q_proj|v_proj\"", "does not select"}, /* fullmatch: no bare names */
        {"\"target_modules\": [\"_proj\"]", "does not select"},         /* suffix after a dot only */
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"exclude_modules\": [\"model.layers.1.self_attn.q_proj\"]",
         "layers.1.self_attn.q_proj"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"exclude_modules\": \".*\\\\.2\\\\..*\"", "layers.2"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 2]", "layers.1"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": 1, \"layers_pattern\": [\"h\", "
         "\"layers\"]",
         "layers.0"},
    };
    for (size_t k = 0; k < sizeof k_bad_qv / sizeof k_bad_qv[0]; k++) {
        char cfg[512];
        snprintf(cfg, sizeof cfg, "\"r\": 2, %s", k_bad_qv[k].cfg);
        error_case("sel_bad", &qv, cfg, MS_EXIT_DATA, "target_modules", k_bad_qv[k].needle, NULL);
    }
    /* all-linear never selects the output layer */
    tset head = {0};
    add_lora(&head, "lm_head", 2, VOCAB, H, "");
    error_case("all_linear_head", &head, "\"r\": 2, \"target_modules\": \"all-linear\"", MS_EXIT_DATA, "lm_head",
               "does not select", NULL);
    tset_free(&head);
    /* nothing selected at all */
    tset none = {0};
    error_case("select_nothing", &none, "\"r\": 2, \"target_modules\": [\"nope\"]", MS_EXIT_DATA,
               "selects no module", NULL, NULL);
    /* constructs POSIX cannot express */
    error_case("lookahead", &none, "\"target_modules\": \"(?!k).*_proj\"", MS_EXIT_USAGE, "target_modules",
               "(?!k)", NULL);
    error_case("backref", &none, "\"target_modules\": \"(q)\\\\1_proj\"", MS_EXIT_USAGE, "escape", NULL, NULL);
    error_case("bad_regex", &none, "\"target_modules\": \"model(\"", MS_EXIT_DATA, "not a valid regular expression",
               NULL, NULL);
    tset_free(&qv);
    tset_free(&all);
}

/* Whether the space-separated list holds word. */
static bool word_in(const char *list, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = strstr(list, word); p; p = strstr(p + 1, word))
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
            return true;
    return false;
}

/* The Python regex -> POSIX translation, feature by feature, against what
 * Python's re.fullmatch (re.match for layers_pattern) selects: an adapter
 * with weights on exactly that set opens, and the same adapter plus one
 * module Python leaves out fails naming it (a user whose config PEFT reads
 * one way must not get another merge). Constructs without a POSIX
 * equivalent, and malformed patterns, are errors naming the key. */
static void test_regex_translation(void **state)
{
    (void)state;
    static const struct {
        const char *cfg;
        const char *projs;   /* the selected set: these projections */
        unsigned layers;     /* in these layers (bit l: layer l) */
        unsigned miss_layer; /* a module re.fullmatch does not select */
        const char *miss_proj;
    } k_cases[] = {
        /* a negated class */
        {"\"target_modules\": \"model\\\\.layers\\\\.\\\\d\\\\.self_attn\\\\.[^ko]_proj\"", "q_proj v_proj", 7, 1,
         "k_proj"},
        /* \s inside a negated class, \S, a non-capturing group */
        {"\"target_modules\": \"model\\\\.layers\\\\.[^\\\\s0]\\\\.\\\\S+\\\\.(?:up|down)_proj\"", "up_proj down_proj", 6,
         0, "down_proj"},
        /* {m,} */
        {"\"target_modules\": \"model\\\\.layers\\\\.\\\\d{1,}\\\\.mlp\\\\.\\\\w{3,}_proj\"", "gate_proj down_proj", 7, 2,
         "up_proj"},
        /* {,n} and a named group */
        {"\"target_modules\": \"model\\\\.layers\\\\.[0-9]{,1}\\\\.self_attn\\\\.(?P<proj>q|o)_pro[j]\"", "q_proj o_proj",
         7, 2, "v_proj"},
        /* \D, a named group around a class */
        {"\"target_modules\": \"model\\\\.layers\\\\.(?P<n>[12])\\\\.mlp\\\\.\\\\D+_proj\"", "gate_proj up_proj down_proj",
         6, 0, "up_proj"},
        /* \s matches no character of a module name (an alternative that selects nothing) */
        {"\"target_modules\": \"model\\\\.layers\\\\.\\\\d\\\\.self_attn\\\\.q_proj|model\\\\s\\\\S+\"", "q_proj", 7, 0,
         "v_proj"},
        /* layers_pattern with \w and a class, and a list of them with a group */
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 2], \"layers_pattern\": \"l\\\\w+s\"",
         "q_proj v_proj", 5, 1, "q_proj"},
        {"\"target_modules\": [\"q_proj\"], \"layers_to_transform\": [1], \"layers_pattern\": [\"h\", "
         "\"(?:blocks|lay[^x]rs)\"]",
         "q_proj", 2, 0, "q_proj"},
    };
    for (size_t k = 0; k < sizeof k_cases / sizeof k_cases[0]; k++) {
        tset ad = {0};
        size_t n = 0;
        char module[200], cfg[600];
        for (unsigned l = 0; l < LAYERS; l++)
            for (size_t p = 0; p < 7; p++) {
                const char *proj = p < 4 ? k_attn[p] : k_mlp[p - 4];
                if ((k_cases[k].layers >> l & 1) && word_in(k_cases[k].projs, proj)) {
                    uint64_t o, i;
                    linear_shape(proj, &o, &i);
                    module_path(module, sizeof module, l, proj);
                    add_lora(&ad, module, 2, o, i, "");
                    n++;
                }
            }
        snprintf(cfg, sizeof cfg, "\"r\": 2, %s", k_cases[k].cfg);
        char *dir = adapter_write("regex_ok", &ad, cfg);
        ms_peft *a = NULL;
        ms_error err = {0};
        if (ms_peft_open(dir, g_base_model, &a, &err) != 0)
            fail_msg("config %s: %s", cfg, err.msg);
        if (ms_peft_n_targets(a) != n)
            fail_msg("config %s: %zu targets, expected %zu", cfg, ms_peft_n_targets(a), n);
        ms_peft_close(a);
        free(dir);
        uint64_t o, i;
        linear_shape(k_cases[k].miss_proj, &o, &i);
        module_path(module, sizeof module, k_cases[k].miss_layer, k_cases[k].miss_proj);
        add_lora(&ad, module, 2, o, i, "");
        char needle[256];
        snprintf(needle, sizeof needle, "module '%s' has LoRA weights but target_modules", module);
        error_case("regex_miss", &ad, cfg, MS_EXIT_DATA, needle, "does not select it", NULL);
        tset_free(&ad);
    }

    /* unsupported or malformed: exit 2 (POSIX cannot say it) or 3 (invalid), naming the key */
    static const struct {
        const char *cfg;
        int code;
        const char *n1, *n2;
    } k_bad[] = {
        {"\"target_modules\": \"model\\\\.layers\\\\.[a\"", MS_EXIT_USAGE, "target_modules 'model\\.layers\\.[a'",
         "an unterminated [...]"},
        {"\"target_modules\": \".*_proj*+\"", MS_EXIT_USAGE, "target_modules '.*_proj*+'", "a possessive quantifier"},
        {"\"target_modules\": \".*_pro{1}+j\"", MS_EXIT_USAGE, "target_modules", "a possessive quantifier"},
        {"\"target_modules\": \"(?P<name.*_proj\"", MS_EXIT_USAGE, "target_modules", "an unterminated (?P<name>"},
        {"\"target_modules\": \".*_proj\\\\\"", MS_EXIT_USAGE, "target_modules", "a trailing backslash"},
        {"\"target_modules\": \".*[\\\\W]_proj\"", MS_EXIT_USAGE, "target_modules", "an escape inside [...]"},
        {"\"target_modules\": \".*[a-\\\\d]_proj\"", MS_EXIT_USAGE, "target_modules", "a range with escaped"},
        {"\"target_modules\": \"model{2,1}.*\"", MS_EXIT_DATA, "target_modules 'model{2,1}.*'",
         "not a valid regular expression"},
        {"\"target_modules\": [\"q_proj\"], \"layers_to_transform\": [0], \"layers_pattern\": \"lay[ers\"",
         MS_EXIT_USAGE, "layers_pattern 'lay[ers'", "an unterminated [...]"},
        {"\"target_modules\": [\"q_proj\"], \"rank_pattern\": {\"q_proj*+\": 4}", MS_EXIT_USAGE,
         "rank_pattern key 'q_proj*+'", "a possessive quantifier"},
    };
    tset qv = {0};
    add_lora_all_layers(&qv, "q_proj", 2);
    for (size_t k = 0; k < sizeof k_bad / sizeof k_bad[0]; k++) {
        char cfg[600];
        snprintf(cfg, sizeof cfg, "\"r\": 2, %s", k_bad[k].cfg);
        error_case("regex_bad", &qv, cfg, k_bad[k].code, k_bad[k].n1, k_bad[k].n2, NULL);
    }
    tset_free(&qv);
}

static void test_shape_and_rank_errors(void **state)
{
    (void)state;
    tset ad = {0};
    /* a module the base does not have */
    add_lora(&ad, "model.layers.0.self_attn.x_proj", 4, H, H, "");
    error_case("missing_module", &ad, "\"r\": 4, \"target_modules\": [\"x_proj\"]", MS_EXIT_DATA,
               "model.layers.0.self_attn.x_proj", "missing from the base", "lora_A [4, 16]");
    tset_free(&ad);
    /* lora_A's input width */
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ST_BF16, 2, 4, H - 1);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", ST_BF16, 2, H, 4);
    error_case("bad_A", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA, "[4, 15]", "[16, 16]",
               "model.layers.0.self_attn.q_proj");
    tset_free(&ad);
    /* lora_B's output height */
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", ST_F32, 2, 4, H);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", ST_F32, 2, H, 4);
    error_case("bad_B", &ad, "\"r\": 4, \"target_modules\": [\"k_proj\"]", MS_EXIT_DATA, "lora_B [16, 4]",
               "[8, 16]", "expected");
    tset_free(&ad);
    /* rank: tensors of rank 8, config r = 4 */
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 8, H, H, "");
    error_case("rank_r", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA, "rank mismatch", "r is 4",
               "[8, 16]");
    error_case("rank_pattern", &ad, "\"r\": 8, \"rank_pattern\": {\"q_proj\": 4}, \"target_modules\": [\"q_proj\"]",
               MS_EXIT_DATA, "rank mismatch", "rank_pattern['q_proj'] is 4", NULL);
    tset_free(&ad);
    /* A and B of different ranks */
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ST_F16, 2, 4, H);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", ST_F16, 2, H, 5);
    error_case("rank_ab", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA, "rank mismatch",
               "[16, 5]", NULL);
    tset_free(&ad);
    /* an unpaired factor */
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ST_F16, 2, 4, H);
    error_case("unpaired", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA, "no matching lora_B",
               NULL, NULL);
    tset_free(&ad);
    /* embedding factors whose vocabulary disagrees */
    tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_A", ST_F32, 2, 4, VOCAB + 1);
    tset_add(&ad, "base_model.model.model.embed_tokens.lora_embedding_B", ST_F32, 2, H, 4);
    error_case("emb_vocab", &ad, "\"r\": 4, \"target_modules\": [\"embed_tokens\"]", MS_EXIT_DATA, "[4, 41]",
               "(an embedding)", NULL);
    tset_free(&ad);
    /* LoRA on a 1-D tensor */
    add_lora(&ad, "model.layers.0.input_layernorm", 4, H, H, "");
    error_case("one_d", &ad, "\"r\": 4, \"target_modules\": [\"input_layernorm\"]", MS_EXIT_USAGE, "2-D", NULL,
               NULL);
    tset_free(&ad);
}

static void test_dora_errors(void **state)
{
    (void)state;
    tset ad = {0};
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 4, H, H, "");
    error_case("dora_missing_mag", &ad, "\"r\": 4, \"use_dora\": true, \"target_modules\": [\"q_proj\"]",
               MS_EXIT_DATA, "lora_magnitude_vector is missing", NULL, NULL);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ST_F32, 1, H, 0);
    error_case("mag_without_dora", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA,
               "use_dora is false", NULL, NULL);
    tset_free(&ad);
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 4, H, H, "");
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ST_F32, 1, H + 2, 0);
    error_case("mag_len", &ad, "\"r\": 4, \"use_dora\": true, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA,
               "[18]", "expected [16]", NULL);
    tset_free(&ad);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", ST_F32, 1, H, 0);
    error_case("mag_alone", &ad, "\"r\": 4, \"use_dora\": true, \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA,
               "without lora_A/lora_B", NULL, NULL);
    tset_free(&ad);
}

static void test_unsupported_configs(void **state)
{
    (void)state;
    tset ad = {0};
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 4, H, H, "");
    static const char *const k_inits[] = {"pissa", "pissa_niter_4", "olora", "corda", "loftq"};
    for (size_t k = 0; k < sizeof k_inits / sizeof k_inits[0]; k++) {
        char cfg[256];
        snprintf(cfg, sizeof cfg, "\"r\": 4, \"target_modules\": [\"q_proj\"], \"init_lora_weights\": \"%s\"",
                 k_inits[k]);
        error_case("init", &ad, cfg, MS_EXIT_USAGE, "init_lora_weights", k_inits[k], "changes the base weights");
    }
    /* the harmless initialisations are fine */
    static const char *const k_ok_inits[] = {"true", "false", "\"gaussian\"", "\"eva\"", "\"orthogonal\""};
    for (size_t k = 0; k < sizeof k_ok_inits / sizeof k_ok_inits[0]; k++) {
        char cfg[256];
        snprintf(cfg, sizeof cfg, "\"r\": 4, \"target_modules\": [\"q_proj\"], \"init_lora_weights\": %s",
                 k_ok_inits[k]);
        char *dir = adapter_write("init_ok", &ad, cfg);
        ms_peft *a = open_ok(dir, g_base_model);
        ms_peft_close(a);
        free(dir);
    }
    error_case("peft_type", &ad, "\"peft_type\": \"IA3\", \"target_modules\": [\"q_proj\"]", MS_EXIT_USAGE, "IA3",
               "only LORA", NULL);
    error_case("alora", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"], \"alora_invocation_tokens\": [1, 2]",
               MS_EXIT_USAGE, "alora_invocation_tokens", NULL, NULL);
    error_case("lora_bias_cfg", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"], \"lora_bias\": true",
               MS_EXIT_USAGE, "lora_bias", NULL, NULL);
    error_case("ttokens", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"], \"trainable_token_indices\": [3]",
               MS_EXIT_USAGE, "trainable_token_indices", NULL, NULL);
    tset_add(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", ST_F32, 1, H, 0);
    error_case("lora_bias_key", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]", MS_EXIT_USAGE, "lora_bias",
               "lora_B.bias", NULL);
    tset_free(&ad);
}

static void test_bad_files_and_json(void **state)
{
    (void)state;
    tset ad = {0};
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 4, H, H, "");
    error_case("type_r", &ad, "\"r\": \"4\", \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA, "\"r\" must be", NULL,
               NULL);
    error_case("type_targets", &ad, "\"r\": 4, \"target_modules\": 7", MS_EXIT_DATA, "\"target_modules\" must be",
               NULL, NULL);
    error_case("type_dora", &ad, "\"r\": 4, \"use_dora\": \"yes\", \"target_modules\": [\"q_proj\"]", MS_EXIT_DATA,
               "use_dora", NULL, NULL);
    error_case("type_rank_pattern", &ad, "\"r\": 4, \"rank_pattern\": {\"q_proj\": 2.5}, \"target_modules\": [\"q_proj\"]",
               MS_EXIT_DATA, "rank_pattern", "positive integer", NULL);

    /* not JSON */
    char *dir = adapter_write("bad_json", &ad, "\"r\": 4,");
    write_text(dir, "adapter_config.json", "{\"r\": 4, ");
    expect_error(dir, g_base_model, MS_EXIT_DATA, "adapter_config.json", "not valid JSON", NULL);
    write_text(dir, "adapter_config.json", "[1, 2]");
    expect_error(dir, g_base_model, MS_EXIT_DATA, "not a JSON object", NULL, NULL);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);

    /* a pickle adapter */
    dir = subdir("bin_adapter");
    write_text(dir, "adapter_config.json", "{\"r\": 4, \"target_modules\": [\"q_proj\"]}");
    write_text(dir, "adapter_model.bin", "not really a pickle");
    expect_error(dir, g_base_model, MS_EXIT_DATA, "adapter_model.bin", "pickle", NULL);
    free(dir);

    /* a model directory is not an adapter; nor is a missing path */
    expect_error(g_base_dir, g_base_model, MS_EXIT_DATA, "not a PEFT adapter", NULL, NULL);
    char missing[256];
    snprintf(missing, sizeof missing, "%s/no_such_adapter", g_root);
    expect_error(missing, g_base_model, MS_EXIT_DATA, "no_such_adapter", NULL, NULL);
    tset_free(&ad);

    /* an adapter as the base */
    dir = adapter_write("as_base", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\"]");
    ms_model *adapter_model = NULL;
    ms_error err = {0};
    assert_int_equal(ms_model_open(dir, &adapter_model, &err), 0);
    expect_error(dir, adapter_model, MS_EXIT_USAGE, "itself a PEFT adapter", NULL, NULL);
    ms_model_close(adapter_model);
    free(dir);
    tset_free(&ad);

    /* keys: no PEFT prefix; two adapter names in one file */
    tset_add(&ad, "model.layers.0.self_attn.q_proj.lora_A.weight", ST_F32, 2, 4, H);
    error_case("no_prefix", &ad, "\"r\": 4", MS_EXIT_DATA, "base_model.model.", "model.layers.0.self_attn.q_proj.lora_A",
               NULL);
    tset_free(&ad);
    add_lora(&ad, "model.layers.0.self_attn.q_proj", 4, H, H, ".default");
    add_lora(&ad, "model.layers.0.self_attn.v_proj", 4, KV, H, ".other");
    error_case("two_names", &ad, "\"r\": 4, \"target_modules\": [\"q_proj\", \"v_proj\"]", MS_EXIT_DATA,
               "more than one adapter", "'default'", "'other'");
    tset_free(&ad);
}

/* ------------------------------------------------------------ gen_model */

/* Runs the fixture generator (MS_GEN) with the given arguments; its exit status. */
static int run_gen(const char *gen, const char *const *args)
{
    const char *argv[40];
    int n = 0;
    argv[n++] = gen;
    for (; *args && n < 39; args++)
        argv[n++] = *args;
    argv[n] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execv(gen, (char *const *)argv);
        _exit(121);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

/* Loads every tensor of a one-file model into a set. */
static void tset_load(const ms_model *m, tset *out)
{
    for (size_t i = 0; i < m->n_tensors; i++) {
        const st_tensor *t = m->tensors[i].info;
        const st_file *f = ms_model_tensor_file(m, i);
        assert_true(out->n < sizeof out->t / sizeof out->t[0]);
        assert_true(st_dtype_is_mergeable_float(t->dtype) && t->ndim <= 2);
        ttensor *x = &out->t[out->n++];
        memset(x, 0, sizeof *x);
        snprintf(x->name, sizeof x->name, "%s", t->name);
        x->dt = t->dtype;
        x->ndim = t->ndim;
        x->shape[0] = t->shape[0];
        x->shape[1] = t->ndim > 1 ? t->shape[1] : 0;
        x->numel = t->numel;
        x->raw = malloc(st_tensor_nbytes(t) + 1);
        x->val = malloc(t->numel * sizeof(double) + 1);
        assert_true(x->raw && x->val);
        assert_int_equal(pread(f->fd, x->raw, st_tensor_nbytes(t), (off_t)st_file_tensor_offset(f, t)),
                         (ssize_t)st_tensor_nbytes(t));
        for (uint64_t e = 0; e < t->numel; e++)
            x->val[e] = widen_one(x->raw, t->dtype, e);
    }
}

/* The generator's adapters (bench/gen_model.c lora) open and compute: plain
 * and with every option (rsLoRA, DoRA, embeddings, modules_to_save,
 * rank / alpha patterns). Skipped without MS_GEN. */
static void test_gen_model_adapters(void **state)
{
    (void)state;
    const char *gen = getenv("MS_GEN");
    if (!gen || !*gen) {
        fprintf(stderr, "MS_GEN is not set to the gen_model binary: skipped\n");
        skip();
    }
    char *bdir = subdir("gen_base"), *plain = subdir("gen_plain"), *full = subdir("gen_full");
    const char *base_args[] = {"base", bdir, "--force", "--seed", "11", "--dtype", "bf16", NULL};
    assert_int_equal(run_gen(gen, base_args), 0);
    const char *plain_args[] = {"lora", bdir, plain, "--force", "--seed", "12", "--rank", "4", NULL};
    assert_int_equal(run_gen(gen, plain_args), 0);
    const char *full_args[] = {"lora", bdir, full, "--force", "--seed", "13", "--rank", "4", "--alpha", "8",
                               "--targets", "q_proj,v_proj,down_proj", "--rslora", "--dora", "--embeddings",
                               "--modules-to-save", "lm_head,model.norm", "--rank-pattern", "v_proj=2",
                               "--alpha-pattern", "v_proj=3", "--dtype", "f32", NULL};
    assert_int_equal(run_gen(gen, full_args), 0);

    ms_error err = {0};
    ms_model *m = NULL;
    assert_int_equal(ms_model_open(bdir, &m, &err), 0);
    long layers = ms_model_config_int(m, "num_hidden_layers", -1);
    assert_true(layers >= 1);
    tset base = {0};
    tset_load(m, &base);

    ms_peft *a = open_ok(plain, m);
    assert_int_equal(ms_peft_n_targets(a), 2 * (size_t)layers); /* q_proj, v_proj */
    tset ad = {0};
    tset_load(ms_peft_model(a), &ad);
    for (size_t i = 0; i < ms_peft_n_targets(a); i++)
        check_numeric(a, ms_peft_target_at(a, i), &base, &ad, 2.0); /* alpha 2r */
    ms_peft_close(a);
    tset_free(&ad);

    a = open_ok(full, m);
    assert_int_equal(ms_peft_n_targets(a), 3 * (size_t)layers + 3);
    tset_load(ms_peft_model(a), &ad);
    for (size_t i = 0; i < ms_peft_n_targets(a); i++) {
        const ms_lora_target *t = ms_peft_target_at(a, i);
        double scale = 0.0;
        if (t->kind == MS_LORA_REPLACE) {
            assert_true(!strcmp(t->base_name, "lm_head.weight") || !strcmp(t->base_name, "model.norm.weight"));
        } else if (strstr(t->base_name, "v_proj")) {
            assert_int_equal(t->rank, 2);
            scale = 3.0 / sqrt(2.0);
        } else {
            assert_int_equal(t->kind, strstr(t->base_name, "embed") ? MS_LORA_EMBEDDING : MS_LORA_LINEAR);
            assert_int_equal(t->rank, 4);
            scale = 4.0; /* 8 / sqrt(4) */
        }
        if (t->kind != MS_LORA_REPLACE)
            assert_non_null(t->magnitude);
        check_numeric(a, t, &base, &ad, scale);
    }
    ms_peft_close(a);
    tset_free(&ad);
    tset_free(&base);
    ms_model_close(m);
    free(bdir);
    free(plain);
    free(full);
}

/* ------------------------------------------------------------ main */

static int setup(void **state)
{
    (void)state;
    snprintf(g_root, sizeof g_root, "/tmp/ms_peft_test_XXXXXX");
    if (!mkdtemp(g_root))
        return -1;
    base_build();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    ms_model_close(g_base_model);
    tset_free(&g_base);
    free(g_base_dir);
    nftw(g_root, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    fprintf(stderr, "test_peft_adapter: MS_TEST_SEED=%" PRIu64 "\n", g_rng);
    ms_log_set_quiet(true); /* warnings still print; they are expected here */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_lora),
        cmocka_unit_test(test_rslora),
        cmocka_unit_test(test_rank_alpha_patterns),
        cmocka_unit_test(test_fan_in_fan_out),
        cmocka_unit_test(test_dora),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_modules_to_save_and_base_layer),
        cmocka_unit_test(test_target_selection),
        cmocka_unit_test(test_regex_translation),
        cmocka_unit_test(test_shape_and_rank_errors),
        cmocka_unit_test(test_dora_errors),
        cmocka_unit_test(test_unsupported_configs),
        cmocka_unit_test(test_bad_files_and_json),
        cmocka_unit_test(test_gen_model_adapters),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
