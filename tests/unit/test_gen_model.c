/* The fixture generator (bench/gen_model.c), run as ctest gives it (MS_GEN):
 * tensor names, order and shapes of a Llama model; values against a float64
 * re-derivation of the documented formula (seed, tensor name, flat index);
 * determinism across runs and shardings; the fine-tune delta structure; the
 * PEFT adapter layout; usage errors. Skipped (77) without MS_GEN. */
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
#include <unistd.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "io/checksum.h"
#include "io/model_dir.h"
#include "io/st_format.h"

static const char *g_gen;
static char *g_tmp;

/* ------------------------------------------------------------ helpers */

/* Runs gen_model with the given arguments (NULL-terminated), stderr into
 * g_tmp/err.txt; returns the exit status. */
static int gen(const char *first, ...)
{
    const char *argv[64];
    int n = 0;
    argv[n++] = g_gen;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 63; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    char errpath[512];
    snprintf(errpath, sizeof errpath, "%s/err.txt", g_tmp);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (!freopen(errpath, "w", stderr))
            _exit(120);
        execv(g_gen, (char *const *)argv);
        _exit(121);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = 0;
    fclose(f);
    return buf;
}

static char *dir_path(const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", g_tmp, name) > 0);
    return p;
}

static cJSON *load_json(const char *dir, const char *name)
{
    char *p = NULL;
    assert_true(asprintf(&p, "%s/%s", dir, name) > 0);
    char *text = slurp(p);
    assert_non_null(text);
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    free(text);
    free(p);
    return j;
}

static double json_num(const cJSON *j, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    assert_non_null(v);
    assert_true(cJSON_IsNumber(v));
    return v->valuedouble;
}

static ms_model *open_model(const char *dir)
{
    ms_model *m = NULL;
    ms_error err = {0};
    if (ms_model_open(dir, &m, &err) != 0)
        fail_msg("%s", err.msg);
    return m;
}

/* The tensor's bytes (malloc'd). */
static unsigned char *tensor_bytes(const ms_model *m, size_t i)
{
    const st_tensor *t = m->tensors[i].info;
    const st_file *f = ms_model_tensor_file(m, i);
    uint64_t n = st_tensor_nbytes(t);
    unsigned char *buf = malloc(n ? n : 1);
    assert_int_equal(pread(f->fd, buf, n, (off_t)st_file_tensor_offset(f, t)), (ssize_t)n);
    return buf;
}

static double bf16_value(const unsigned char *p)
{
    uint32_t u = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The documented value of a base element, in float64: splitmix64 keyed by
 * XXH3_64bits_withSeed(name, seed) at counter e + 1; four 16-bit uniforms
 * summed, centred, scaled to unit variance. */
static double ref_normal(const char *name, uint64_t seed, uint64_t e)
{
    uint64_t z = ms_hash64_seed(name, strlen(name), seed) + (e + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    double s = 0;
    for (int k = 0; k < 4; k++)
        s += (double)((z >> (16 * k)) & 0xffff) + 0.5;
    return (s / 65536.0 - 2.0) * sqrt(3.0);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

/* ------------------------------------------------------------ tests */

static void test_base_names_shapes_values(void **state)
{
    (void)state;
    char *dir = dir_path("base");
    assert_int_equal(gen("base", dir, "--seed", "7", NULL), 0);
    char *err_text = dir_path("err.txt");
    char *errs = slurp(err_text);
    assert_string_equal(errs, ""); /* silent without -v */
    free(errs);
    free(err_text);

    ms_model *m = open_model(dir);
    /* tiny: 2 layers, hidden 64, intermediate 128, 4 heads (head_dim 16), 2 kv heads, vocab 256 */
    static const struct {
        const char *suffix;
        uint64_t rows, cols; /* cols 0: 1-D */
    } k_layer[] = {
        {"input_layernorm.weight", 64, 0},         {"self_attn.q_proj.weight", 64, 64},
        {"self_attn.k_proj.weight", 32, 64},       {"self_attn.v_proj.weight", 32, 64},
        {"self_attn.o_proj.weight", 64, 64},       {"post_attention_layernorm.weight", 64, 0},
        {"mlp.gate_proj.weight", 128, 64},         {"mlp.up_proj.weight", 128, 64},
        {"mlp.down_proj.weight", 64, 128},
    };
    assert_int_equal(m->n_tensors, 1 + 2 * 9 + 2);
    size_t i = 0;
    char name[128];
    assert_string_equal(m->tensors[i++].info->name, "model.embed_tokens.weight");
    for (int l = 0; l < 2; l++) {
        for (size_t k = 0; k < 9; k++, i++) {
            const st_tensor *t = m->tensors[i].info;
            snprintf(name, sizeof name, "model.layers.%d.%s", l, k_layer[k].suffix);
            assert_string_equal(t->name, name);
            assert_int_equal(t->dtype, ST_BF16);
            assert_int_equal(t->ndim, k_layer[k].cols ? 2 : 1);
            assert_int_equal(t->shape[0], k_layer[k].rows);
            if (k_layer[k].cols)
                assert_int_equal(t->shape[1], k_layer[k].cols);
        }
    }
    assert_string_equal(m->tensors[i++].info->name, "model.norm.weight");
    assert_string_equal(m->tensors[i++].info->name, "lm_head.weight");
    assert_int_equal(m->tensors[0].info->shape[0], 256);

    /* Values: every element of two tensors within half a bf16 ulp of the
     * float64 formula (plus the float32 rounding the generator does). */
    const size_t checks[2] = {0, 1}; /* embed (N(0, 0.02)), a norm (1 + N(0, 0.02)) */
    for (int c = 0; c < 2; c++) {
        const st_tensor *t = m->tensors[checks[c]].info;
        unsigned char *b = tensor_bytes(m, checks[c]);
        double sum = 0, sum2 = 0;
        for (uint64_t e = 0; e < t->numel; e++) {
            double want = (c == 1 ? 1.0 : 0.0) + 0.02 * ref_normal(t->name, 7, e);
            double got = bf16_value(b + 2 * e);
            double ulp = ldexp(1.0, ilogb(want) - 7);
            if (fabs(got - want) > 0.5 * ulp + 1e-6 * fabs(want) + 1e-12)
                fail_msg("%s[%" PRIu64 "]: %.9g, want %.9g", t->name, e, got, want);
            sum += got - (c == 1 ? 1.0 : 0.0);
            sum2 += (got - (c == 1 ? 1.0 : 0.0)) * (got - (c == 1 ? 1.0 : 0.0));
        }
        double mean = sum / (double)t->numel, sd = sqrt(sum2 / (double)t->numel - mean * mean);
        assert_true(fabs(mean) < 0.004);
        assert_true(sd > 0.017 && sd < 0.023);
        free(b);
    }

    cJSON *cfg = load_json(dir, "config.json");
    assert_int_equal((int)json_num(cfg, "hidden_size"), 64);
    assert_int_equal((int)json_num(cfg, "intermediate_size"), 128);
    assert_int_equal((int)json_num(cfg, "num_hidden_layers"), 2);
    assert_int_equal((int)json_num(cfg, "num_attention_heads"), 4);
    assert_int_equal((int)json_num(cfg, "num_key_value_heads"), 2);
    assert_int_equal((int)json_num(cfg, "vocab_size"), 256);
    assert_string_equal(cJSON_GetObjectItem(cfg, "model_type")->valuestring, "llama");
    assert_string_equal(cJSON_GetObjectItem(cfg, "torch_dtype")->valuestring, "bfloat16");
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(cfg, "architectures"), 0)->valuestring,
                        "LlamaForCausalLM");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "tie_word_embeddings")));
    cJSON_Delete(cfg);
    cJSON_Delete(load_json(dir, "generation_config.json"));
    cJSON_Delete(load_json(dir, "tokenizer.json"));
    cJSON_Delete(load_json(dir, "tokenizer_config.json"));
    ms_model_close(m);
    free(dir);
}

static void test_determinism_and_sharding(void **state)
{
    (void)state;
    char *a = dir_path("det_a"), *b = dir_path("det_b"), *c = dir_path("det_c"), *d = dir_path("det_d");
    assert_int_equal(gen("base", a, "--seed", "3", "--dtype", "f16", "--layers", "3", NULL), 0);
    assert_int_equal(gen("base", b, "--seed", "3", "--dtype", "f16", "--layers", "3", "--shard-size", "20K", NULL), 0);
    assert_int_equal(gen("base", c, "--seed", "4", "--dtype", "f16", "--layers", "3", NULL), 0);
    assert_int_equal(gen("base", d, "--seed", "3", "--dtype", "f16", "--layers", "3", "--tie-embeddings", NULL), 0);
    ms_model *ma = open_model(a), *mb = open_model(b), *mc = open_model(c), *md = open_model(d);
    assert_true(mb->n_shards > 2);
    assert_int_equal(ma->n_tensors, mb->n_tensors);
    assert_int_equal(md->n_tensors, ma->n_tensors - 1); /* no lm_head */
    assert_true(ms_model_find(md, "lm_head.weight") < 0);
    cJSON *cfg = load_json(d, "config.json");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cfg, "tie_word_embeddings")));
    assert_string_equal(cJSON_GetObjectItem(cfg, "torch_dtype")->valuestring, "float16");
    cJSON_Delete(cfg);
    size_t differing = 0;
    for (size_t i = 0; i < ma->n_tensors; i++) {
        const st_tensor *t = ma->tensors[i].info;
        long j = ms_model_find(mb, t->name), k = ms_model_find(mc, t->name), l = ms_model_find(md, t->name);
        assert_true(j >= 0 && k >= 0);
        assert_int_equal(t->dtype, ST_F16);
        uint64_t n = st_tensor_nbytes(t);
        unsigned char *x = tensor_bytes(ma, i), *y = tensor_bytes(mb, (size_t)j), *z = tensor_bytes(mc, (size_t)k);
        assert_memory_equal(x, y, n); /* sharding does not change the bytes */
        differing += memcmp(x, z, n) != 0;
        if (l >= 0) { /* tying changes nothing else */
            unsigned char *w = tensor_bytes(md, (size_t)l);
            assert_memory_equal(x, w, n);
            free(w);
        }
        free(x);
        free(y);
        free(z);
    }
    assert_int_equal(differing, ma->n_tensors); /* another seed changes every tensor */
    ms_model_close(ma);
    ms_model_close(mb);
    ms_model_close(mc);
    ms_model_close(md);
    /* A second run writes identical files. */
    char *a2 = dir_path("det_a2");
    assert_int_equal(gen("base", a2, "--seed", "3", "--dtype", "f16", "--layers", "3", NULL), 0);
    char *p1 = NULL, *p2 = NULL;
    assert_true(asprintf(&p1, "%s/model.safetensors", a) > 0 && asprintf(&p2, "%s/model.safetensors", a2) > 0);
    struct stat s1, s2;
    assert_int_equal(stat(p1, &s1), 0);
    assert_int_equal(stat(p2, &s2), 0);
    assert_int_equal(s1.st_size, s2.st_size);
    char *t1 = slurp(p1), *t2 = slurp(p2);
    assert_memory_equal(t1, t2, (size_t)s1.st_size);
    free(t1);
    free(t2);
    free(p1);
    free(p2);
    free(a);
    free(a2);
    free(b);
    free(c);
    free(d);
}

static void test_finetune_structure(void **state)
{
    (void)state;
    char *base = dir_path("ft_base"), *ft = dir_path("ft_out");
    assert_int_equal(gen("base", base, "--preset", "small", "--layers", "1", NULL), 0);
    assert_int_equal(gen("finetune", base, ft, "--seed", "11", "--touched-fraction", "0.7", "--outlier-fraction",
                         "0.05", "--delta-scale", "0.004", "--extra-vocab", "5", "--dtype", "f32", NULL),
                     0);
    ms_model *mb = open_model(base), *mf = open_model(ft);
    assert_int_equal(mb->n_tensors, mf->n_tensors);
    uint64_t zero = 0, total = 0, outliers = 0;
    double sum2 = 0;
    for (size_t i = 0; i < mb->n_tensors; i++) {
        const st_tensor *tb = mb->tensors[i].info, *tf = mf->tensors[i].info;
        assert_string_equal(tb->name, tf->name); /* same order */
        assert_int_equal(tf->dtype, ST_F32);
        bool vocab = !strcmp(tb->name, "model.embed_tokens.weight") || !strcmp(tb->name, "lm_head.weight");
        assert_int_equal(tf->shape[0], tb->shape[0] + (vocab ? 5 : 0));
        unsigned char *xb = tensor_bytes(mb, i), *xf = tensor_bytes(mf, i);
        for (uint64_t e = 0; e < tb->numel; e++) {
            float f;
            memcpy(&f, xf + 4 * e, 4);
            double d = (double)f - bf16_value(xb + 2 * e);
            total++;
            if (d == 0)
                zero++;
            else if (fabs(d) > 0.004 * 3.47) /* beyond the +-sqrt(12) sigma reach of a small delta */
                outliers++;
            else
                sum2 += d * d;
        }
        if (vocab) { /* the added rows: fresh, non-zero, ~N(0, 0.02) */
            double s2 = 0;
            uint64_t extra = tf->numel - tb->numel;
            for (uint64_t e = tb->numel; e < tf->numel; e++) {
                float f;
                memcpy(&f, xf + 4 * e, 4);
                s2 += (double)f * f;
            }
            assert_true(sqrt(s2 / (double)extra) > 0.015 && sqrt(s2 / (double)extra) < 0.025);
        }
        free(xb);
        free(xf);
    }
    /* ~1.25M elements: untouched 30% (+-0.05% sd); outliers 5% of the touched, of
     * which the 13% within 0.17 sigma of 0 look small: 4.3% (+-0.02%); the small
     * deltas' sd 0.004 (a little more with those outliers). */
    double zf = (double)zero / (double)total, of = (double)outliers / (double)(total - zero);
    if (!(zf > 0.29 && zf < 0.31) || !(of > 0.038 && of < 0.048))
        fail_msg("untouched %.4f, outliers %.4f", zf, of);
    double sd = sqrt(sum2 / (double)(total - zero - outliers));
    if (!(sd > 0.0037 && sd < 0.0044))
        fail_msg("small delta sd %.5f", sd);

    cJSON *cfg = load_json(ft, "config.json");
    assert_int_equal((int)json_num(cfg, "vocab_size"), 1024 + 5);
    assert_string_equal(cJSON_GetObjectItem(cfg, "torch_dtype")->valuestring, "float32");
    cJSON_Delete(cfg);
    char *tok_a = NULL, *tok_b = NULL;
    assert_true(asprintf(&tok_a, "%s/tokenizer.json", base) > 0 && asprintf(&tok_b, "%s/tokenizer.json", ft) > 0);
    char *ta = slurp(tok_a), *tb = slurp(tok_b);
    assert_non_null(tb);
    assert_string_equal(ta, tb); /* copied from the base */
    free(ta);
    free(tb);
    free(tok_a);
    free(tok_b);

    /* Same dtype: untouched elements keep the base's exact bytes. */
    char *ft2 = dir_path("ft_out2");
    assert_int_equal(gen("finetune", base, ft2, "--seed", "11", NULL), 0);
    ms_model *m2 = open_model(ft2);
    uint64_t same = 0, n = 0;
    for (size_t i = 0; i < mb->n_tensors; i++) {
        unsigned char *xb = tensor_bytes(mb, i), *x2 = tensor_bytes(m2, i);
        assert_int_equal(m2->tensors[i].info->dtype, ST_BF16);
        for (uint64_t e = 0; e < mb->tensors[i].info->numel; e++, n++)
            same += memcmp(xb + 2 * e, x2 + 2 * e, 2) == 0;
        free(xb);
        free(x2);
    }
    assert_true((double)same / (double)n > 0.1 && (double)same / (double)n < 0.3); /* 10% untouched + rounding */
    ms_model_close(m2);
    ms_model_close(mb);
    ms_model_close(mf);
    free(base);
    free(ft);
    free(ft2);
}

static void test_lora_adapter(void **state)
{
    (void)state;
    char *base = dir_path("lora_base"), *ad = dir_path("lora_out");
    assert_int_equal(gen("base", base, NULL), 0);
    assert_int_equal(gen("lora", base, ad, "--seed", "5", "--rank", "4", "--alpha", "8", "--targets",
                         "q_proj,down_proj", NULL),
                     0);
    ms_model *m = open_model(ad);
    assert_int_equal(m->kind, MS_MODEL_KIND_ADAPTER);
    assert_int_equal(m->n_tensors, 2 * 2 * 2); /* layers x modules x (A, B) */
    static const struct {
        const char *name;
        uint64_t r, c;
    } k_want[] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 4, 64},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 64, 4},
        {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", 4, 128},
        {"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", 64, 4},
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 4, 64},
    };
    for (size_t k = 0; k < sizeof k_want / sizeof k_want[0]; k++) {
        const st_tensor *t = m->tensors[k].info;
        assert_string_equal(t->name, k_want[k].name);
        assert_int_equal(t->dtype, ST_BF16);
        assert_int_equal(t->shape[0], k_want[k].r);
        assert_int_equal(t->shape[1], k_want[k].c);
    }
    /* B is non-zero (the task vector is not trivial). */
    unsigned char *bb = tensor_bytes(m, 1);
    size_t nonzero = 0;
    for (uint64_t e = 0; e < m->tensors[1].info->numel; e++)
        nonzero += bf16_value(bb + 2 * e) != 0;
    assert_true(nonzero > m->tensors[1].info->numel * 9 / 10);
    free(bb);
    cJSON *cfg = m->config;
    assert_non_null(cfg);
    assert_string_equal(cJSON_GetObjectItem(cfg, "peft_type")->valuestring, "LORA");
    assert_int_equal((int)json_num(cfg, "r"), 4);
    assert_int_equal((int)json_num(cfg, "lora_alpha"), 8);
    assert_string_equal(cJSON_GetObjectItem(cfg, "task_type")->valuestring, "CAUSAL_LM");
    assert_string_equal(cJSON_GetObjectItem(cfg, "bias")->valuestring, "none");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "use_rslora")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "fan_in_fan_out")));
    cJSON *tm = cJSON_GetObjectItem(cfg, "target_modules");
    assert_int_equal(cJSON_GetArraySize(tm), 2);
    assert_string_equal(cJSON_GetArrayItem(tm, 0)->valuestring, "q_proj");
    assert_string_equal(cJSON_GetArrayItem(tm, 1)->valuestring, "down_proj");
    ms_model_close(m);

    char *all = dir_path("lora_all");
    assert_int_equal(gen("lora", base, all, "--seed", "5", "--rank", "2", "--targets", "all-linear", NULL), 0);
    m = open_model(all);
    assert_int_equal(m->n_tensors, 2 * 7 * 2);
    ms_model_close(m);
    free(all);
    free(base);
    free(ad);
}

/* Exit status 2 and exactly one line "gen_model: error: ...PATTERN...". */
static void expect_usage(const char *pattern, int rc)
{
    assert_int_equal(rc, 2);
    char *p = dir_path("err.txt");
    char *text = slurp(p);
    assert_non_null(text);
    assert_memory_equal(text, "gen_model: error: ", 18);
    assert_non_null(strstr(text, pattern));
    assert_ptr_equal(strchr(text, '\n'), text + strlen(text) - 1);
    free(text);
    free(p);
}

static void test_usage_errors(void **state)
{
    (void)state;
    char *d = dir_path("usage"), *base = dir_path("usage_base");
    expect_usage("unknown preset", gen("base", d, "--preset", "huge", NULL));
    expect_usage("expected a command", gen("frobnicate", d, NULL));
    expect_usage("expected OUTDIR", gen("base", NULL));
    expect_usage("--layers", gen("base", d, "--layers", "0", NULL));
    expect_usage("--hidden", gen("base", d, "--hidden", "60", "--heads", "7", NULL));
    expect_usage("--kv-heads", gen("base", d, "--kv-heads", "3", NULL));
    expect_usage("unknown option", gen("base", d, "--bogus", NULL));
    expect_usage("needs a value", gen("base", d, "--seed", NULL));
    expect_usage("--dtype", gen("base", d, "--dtype", "f8", NULL));
    expect_usage("--shard-size", gen("base", d, "--shard-size", "lots", NULL));
    assert_int_equal(gen("base", base, NULL), 0);
    expect_usage("not empty", gen("base", base, NULL));
    assert_int_equal(gen("base", base, "--force", "--seed", "2", NULL), 0); /* --force replaces */
    expect_usage("--seed", gen("finetune", base, d, NULL));
    expect_usage("--targets", gen("lora", base, d, "--seed", "1", "--rank", "2", "--targets", "x_proj", NULL));
    expect_usage("--rank", gen("lora", base, d, "--seed", "1", NULL));
    assert_int_equal(gen("--help", NULL), 0);
    /* A missing base is a data error (exit 3), naming it. */
    char *missing = dir_path("nope");
    assert_int_equal(gen("finetune", missing, d, "--seed", "1", NULL), 3);
    free(missing);
    free(d);
    free(base);
}

static void test_sized_preset(void **state)
{
    (void)state;
    char *d = dir_path("sized");
    assert_int_equal(gen("base", d, "--preset", "sized:20M", NULL), 0);
    ms_model *m = open_model(d);
    double want = 20.0 * 1024 * 1024;
    assert_true((double)m->total_bytes > 0.8 * want && (double)m->total_bytes < 1.2 * want);
    ms_model_close(m);
    free(d);
}

int main(void)
{
    g_gen = getenv("MS_GEN");
    if (!g_gen || access(g_gen, X_OK) != 0) {
        fprintf(stderr, "test_gen_model: MS_GEN is not set to the gen_model binary: skipped\n");
        return 77;
    }
    char tmpl[] = "/tmp/ms_gen_model_test_XXXXXX";
    g_tmp = mkdtemp(tmpl);
    if (!g_tmp)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base_names_shapes_values), cmocka_unit_test(test_determinism_and_sharding),
        cmocka_unit_test(test_finetune_structure),       cmocka_unit_test(test_lora_adapter),
        cmocka_unit_test(test_usage_errors),             cmocka_unit_test(test_sized_preset),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    nftw(g_tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}
