/* Tests for the calibration forward pass: cpu/llama_forward.c (the layer),
 * cpu/hessian_accum.c (the statistics), pipeline/llama_run.c (the streaming
 * driver and the model reader) and pipeline/model_config.c (config.json).
 *
 * Tiny random Llama, Mistral and Qwen2 models are written as real model
 * directories (config.json + model.safetensors, F32 or BF16), run through
 * the whole driver, and compared with a float64 reference written here from
 * the definitions (per sample, padded layout, explicit mask): the logits at
 * every real position, every layer's four input statistics and the head's,
 * and the mean NLL. Cases: default, linear (rope_parameters) and llama3 rope
 * scaling with all three frequency bands in play, tied embeddings, Llama's
 * attention and MLP biases, Qwen2's q/k/v biases, Mistral's sliding window
 * and an explicit head_dim, left/right padding and holes in the mask. Then:
 * padding changes nothing (bit for bit) while a reference that lets padding
 * in differs; batch size 1 vs all at once vs the spill file; small Hessian
 * flush blocks and vocabulary slices; the accumulator against X^T X in
 * float64; exp; config.json errors; config.json keys absent or in conflict
 * read as transformers 5.24 reads them (Mistral's default window, Qwen2's
 * none, rope_scaling beside rope_parameters, a tied config over a checkpoint
 * with lm_head.weight, each warning once). BASE+ADAPTER (ms_llama_source_lora):
 * PEFT adapters written here (LoRA on every projection with modules_to_save;
 * BF16 rsLoRA with DoRA on projections and a tied embedding) give what the
 * model merged here in float64 and written as F32 gives, against the
 * reference and against the plain source over that directory; MODEL
 * splitting with '+' inside paths, and a session over BASE+ADAPTER. The
 * seed is printed; MS_TEST_SEED=N replays a run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "test_capture.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cpu/hessian_accum.h"
#include "cpu/llama_forward.h"
#include "io/calib_input.h"
#include "io/model_dir.h"
#include "io/peft_adapter.h"
#include "io/st_writer.h"
#include "pipeline/llama_run.h"
#include "pipeline/merge_math.h"
#include "pipeline/model_config.h"

/* ============================================================ randomness */

#include "test_rng.h"

static uint64_t rng_below(uint64_t n) { return rng_next() % n; }

/* ============================================================ test models */

#define MAX_TENSORS 128

typedef struct tensor {
    char name[128];
    unsigned ndim;
    uint64_t shape[2];
    float *data; /* values exactly as stored (bf16-rounded when the file is BF16) */
} tensor;

typedef struct tmodel {
    ms_arch arch;
    cpu_llama_config c;
    st_dtype dtype;
    const char *rope_json;   /* rope_scaling / rope_parameters object as JSON text, or NULL */
    bool rope_as_parameters; /* write it as rope_parameters (rope_theta inside) */
    tensor t[MAX_TENSORS];
    size_t n;
    char dir[64];
} tmodel;

static float *tw(const tmodel *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static float *tw(const tmodel *m, const char *fmt, ...)
{
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->t[i].name, name) == 0)
            return m->t[i].data;
    fail_msg("no tensor %s", name);
    return NULL;
}

static void add_tensor(tmodel *m, const char *name, unsigned ndim, uint64_t d0, uint64_t d1, double add, double sd)
{
    assert_true(m->n < MAX_TENSORS);
    tensor *t = &m->t[m->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    uint64_t n = ndim == 2 ? d0 * d1 : d0;
    t->data = malloc(n * sizeof(float));
    assert_non_null(t->data);
    for (uint64_t i = 0; i < n; i++) {
        float v = (float)(add + sd * rng_gauss());
        t->data[i] = m->dtype == ST_BF16 ? ms_bf16_to_f32(ms_f32_to_bf16(v)) : v;
    }
}

static void gen_weights(tmodel *m)
{
    const cpu_llama_config *c = &m->c;
    uint64_t H = c->hidden, Q = cpu_llama_q_dim(c), KV = cpu_llama_kv_dim(c), I = c->intermediate;
    double sd = 0.6 / sqrt((double)H);
    char n[128];
    add_tensor(m, "model.embed_tokens.weight", 2, c->vocab, H, 0, 1.0);
    for (uint64_t l = 0; l < c->n_layers; l++) {
#define T(suffix, nd, a, b, add, s)                                                                       \
    snprintf(n, sizeof n, "model.layers.%" PRIu64 "." suffix, l);                                         \
    add_tensor(m, n, nd, a, b, add, s)
        T("input_layernorm.weight", 1, H, 0, 1.0, 0.1);
        T("self_attn.q_proj.weight", 2, Q, H, 0, sd * 2);
        T("self_attn.k_proj.weight", 2, KV, H, 0, sd * 2);
        T("self_attn.v_proj.weight", 2, KV, H, 0, sd);
        if (c->qkv_bias) {
            T("self_attn.q_proj.bias", 1, Q, 0, 0, 0.3);
            T("self_attn.k_proj.bias", 1, KV, 0, 0, 0.3);
            T("self_attn.v_proj.bias", 1, KV, 0, 0, 0.3);
        }
        T("self_attn.o_proj.weight", 2, H, Q, 0, 0.6 / sqrt((double)Q));
        if (c->o_bias) {
            T("self_attn.o_proj.bias", 1, H, 0, 0, 0.3);
        }
        T("post_attention_layernorm.weight", 1, H, 0, 1.0, 0.1);
        T("mlp.gate_proj.weight", 2, I, H, 0, sd * 2);
        T("mlp.up_proj.weight", 2, I, H, 0, sd * 2);
        T("mlp.down_proj.weight", 2, H, I, 0, 0.6 / sqrt((double)I));
        if (c->mlp_bias) {
            T("mlp.gate_proj.bias", 1, I, 0, 0, 0.3);
            T("mlp.up_proj.bias", 1, I, 0, 0, 0.3);
            T("mlp.down_proj.bias", 1, H, 0, 0, 0.3);
        }
#undef T
    }
    add_tensor(m, "model.norm.weight", 1, H, 0, 1.0, 0.1);
    if (!c->tie_embeddings)
        add_tensor(m, "lm_head.weight", 2, c->vocab, H, 0, 0.4);
}

static void free_weights(tmodel *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->t[i].data);
    m->n = 0;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* dir/STEM.safetensors holding t[0..n) in dtype (F32 or BF16; the values
 * are already representable). */
static void write_tensors(const char *dir, const char *stem, const tensor *t, size_t n, st_dtype dtype)
{
    ms_error err = {0};
    st_plan *plan = NULL;
    st_writer *w = NULL;
    assert_int_equal(st_plan_create(UINT64_MAX, &plan, &err), 0);
    assert_int_equal(st_plan_set_stem(plan, stem, &err), 0);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(st_plan_add_tensor(plan, t[i].name, dtype, t[i].ndim, t[i].shape, NULL, &err), 0);
    assert_int_equal(st_plan_layout(plan, &err), 0);
    assert_int_equal(st_writer_open(plan, dir, &w, &err), 0);
    for (size_t i = 0; i < n; i++) {
        const st_plan_tensor *pt = st_plan_tensor_at(plan, i);
        void *buf = malloc(pt->nbytes);
        assert_non_null(buf);
        if (dtype == ST_F32) {
            memcpy(buf, t[i].data, pt->nbytes);
        } else {
            uint16_t *h = buf;
            for (uint64_t k = 0; k < pt->numel; k++)
                h[k] = ms_f32_to_bf16(t[i].data[k]);
        }
        assert_int_equal(st_writer_write_tensor(w, i, buf, &err), 0);
        free(buf);
    }
    if (st_writer_finish(w, &err) != 0)
        fail_msg("%s", err.msg);
    st_writer_close(w);
    st_plan_free(plan);
}

static void write_model(tmodel *m, bool skip_last_tensor)
{
    snprintf(m->dir, sizeof m->dir, "/tmp/ms-llama-test.XXXXXX");
    assert_non_null(mkdtemp(m->dir));
    write_tensors(m->dir, "model", m->t, skip_last_tensor ? m->n - 1 : m->n, m->dtype);

    const cpu_llama_config *c = &m->c;
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(ms_arch_name(m->arch)));
    cJSON_AddNumberToObject(j, "hidden_size", (double)c->hidden);
    cJSON_AddNumberToObject(j, "intermediate_size", (double)c->intermediate);
    cJSON_AddNumberToObject(j, "num_hidden_layers", (double)c->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", (double)c->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", (double)c->n_kv_heads);
    if (c->head_dim != c->hidden / c->n_heads)
        cJSON_AddNumberToObject(j, "head_dim", (double)c->head_dim);
    else
        cJSON_AddNullToObject(j, "head_dim");
    cJSON_AddNumberToObject(j, "vocab_size", (double)c->vocab);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->rms_eps);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_embeddings);
    if (m->arch == MS_ARCH_LLAMA) {
        cJSON_AddBoolToObject(j, "attention_bias", c->qkv_bias);
        cJSON_AddBoolToObject(j, "mlp_bias", c->mlp_bias);
    }
    if (m->arch == MS_ARCH_MISTRAL) {
        if (c->sliding_window)
            cJSON_AddNumberToObject(j, "sliding_window", (double)c->sliding_window);
        else
            cJSON_AddNullToObject(j, "sliding_window");
    }
    if (m->arch == MS_ARCH_QWEN2)
        cJSON_AddFalseToObject(j, "use_sliding_window");
    if (m->rope_as_parameters) {
        cJSON *rp = cJSON_Parse(m->rope_json);
        assert_non_null(rp);
        cJSON_AddNumberToObject(rp, "rope_theta", c->rope_theta);
        cJSON_AddItemToObject(j, "rope_parameters", rp);
        cJSON_AddNumberToObject(j, "rope_theta", 1234.0); /* must be overridden */
    } else {
        cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
        if (m->rope_json)
            cJSON_AddItemToObject(j, "rope_scaling", cJSON_Parse(m->rope_json));
        else
            cJSON_AddNullToObject(j, "rope_scaling");
    }
    char *text = cJSON_Print(j);
    char path[128];
    snprintf(path, sizeof path, "%s/config.json", m->dir);
    write_file(path, text);
    free(text);
    cJSON_Delete(j);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void remove_dir(const char *dir) { nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS); }

/* ============================================================ calibration */

/* n samples of seq positions; kind 0: right padding, 1: left padding,
 * 2: holes, 3: no padding. Padding ids are random (even out of range) to
 * show they are never read. */
static ms_calib *make_calib(uint64_t n, uint64_t seq, uint64_t vocab, bool mixed)
{
    ms_calib *c = calloc(1, sizeof *c);
    assert_non_null(c);
    c->path = strdup("test-calib");
    c->n_samples = n;
    c->seq_len = seq;
    c->ids = calloc(n * seq, sizeof *c->ids);
    c->mask = calloc(n * seq, 1);
    for (uint64_t s = 0; s < n; s++) {
        int kind = mixed ? (int)(s % 4) : 3;
        uint64_t len = kind == 3 ? seq : 1 + rng_below(seq);
        for (uint64_t p = 0; p < seq; p++) {
            bool real;
            if (kind == 0)
                real = p < len;
            else if (kind == 1)
                real = p >= seq - len;
            else if (kind == 2)
                real = p == 0 || rng_below(3) != 0;
            else
                real = true;
            c->mask[s * seq + p] = real;
            c->ids[s * seq + p] = real ? (int64_t)rng_below(vocab) : (int64_t)(vocab + rng_below(1000));
            c->n_real += real;
        }
    }
    return c;
}

/* ============================================================ float64 reference */

typedef struct ref_out {
    double *logits;  /* [n_samples * seq][vocab] at every position (only real ones compared) */
    double **H;      /* [layer * 4 + k] then [n_layers * 4]: the head; dim x dim, scaled by 2/N */
    double nll_sum;
    uint64_t n_pred, n_rows;
} ref_out;

static void ref_rmsnorm(const double *x, const float *w, uint64_t d, double eps, double *out)
{
    double ss = 0;
    for (uint64_t k = 0; k < d; k++)
        ss += x[k] * x[k];
    double inv = 1.0 / sqrt(ss / (double)d + eps);
    for (uint64_t k = 0; k < d; k++)
        out[k] = (double)w[k] * (x[k] * inv);
}

/* out[o] = sum_i W[o][i] x[i] (+ b[o]) */
static void ref_linear(const float *W, const float *b, const double *x, uint64_t n_out, uint64_t n_in, double *out)
{
    for (uint64_t o = 0; o < n_out; o++) {
        double s = b ? (double)b[o] : 0.0;
        for (uint64_t i = 0; i < n_in; i++)
            s += (double)W[o * n_in + i] * x[i];
        out[o] = s;
    }
}

static void ref_gram(double *H, const double *x, uint64_t d)
{
    for (uint64_t i = 0; i < d; i++)
        for (uint64_t j = 0; j < d; j++)
            H[i * d + j] += x[i] * x[j];
}

static void ref_inv_freq(const cpu_llama_config *c, double *inv)
{
    uint64_t half = c->head_dim / 2;
    for (uint64_t i = 0; i < half; i++) {
        double f = 1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->head_dim);
        if (c->rope_kind == CPU_ROPE_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_kind == CPU_ROPE_LLAMA3) {
            double wl = 2 * M_PI / f;
            double low_wl = c->rope_original_max_pos / c->rope_low_freq_factor;
            double high_wl = c->rope_original_max_pos / c->rope_high_freq_factor;
            if (wl > low_wl) {
                f = f / c->rope_factor;
            } else if (wl >= high_wl) {
                double sm = (c->rope_original_max_pos / wl - c->rope_low_freq_factor) /
                            (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1 - sm) * f / c->rope_factor + sm * f;
            }
        }
        inv[i] = f;
    }
}

static void ref_rope(double *v, uint64_t hd, uint64_t pos, const double *inv)
{
    uint64_t half = hd / 2;
    for (uint64_t i = 0; i < half; i++) {
        double a = v[i], b = v[i + half], ang = (double)pos * inv[i];
        v[i] = a * cos(ang) - b * sin(ang);
        v[i + half] = b * cos(ang) + a * sin(ang);
    }
}

/* The reference forward pass. padding_in: the statistics also take the
 * padding rows (the original system's behaviour), to show the test can tell. */
static void ref_forward(const tmodel *m, const ms_calib *cal, bool padding_in, ref_out *r)
{
    const cpu_llama_config *c = &m->c;
    uint64_t H = c->hidden, Q = cpu_llama_q_dim(c), KV = cpu_llama_kv_dim(c), I = c->intermediate, hd = c->head_dim;
    uint64_t S = cal->seq_len, V = c->vocab, L = c->n_layers, n_rep = c->n_heads / c->n_kv_heads;
    uint64_t dims[4] = {H, Q, H, I};
    r->logits = calloc(cal->n_samples * S * V, sizeof(double));
    r->H = calloc(L * 4 + 1, sizeof(double *));
    for (uint64_t k = 0; k < L * 4 + 1; k++) {
        uint64_t d = k == L * 4 ? H : dims[k % 4];
        r->H[k] = calloc(d * d, sizeof(double));
    }
    r->nll_sum = 0;
    r->n_pred = 0;
    r->n_rows = 0;
    double *inv = calloc(hd / 2, sizeof(double));
    ref_inv_freq(c, inv);
    double *x = calloc(S * H, 8), *xn = calloc(S * H, 8), *q = calloc(S * Q, 8), *k = calloc(S * KV, 8),
           *v = calloc(S * KV, 8), *a = calloc(S * Q, 8), *tmp = calloc(H > I ? 2 * H + 2 * I : 2 * I + 2 * H, 8),
           *g = calloc(I, 8), *u = calloc(I, 8), *sc = calloc(S, 8);
    const float *embed = tw(m, "model.embed_tokens.weight");
    const float *head = c->tie_embeddings ? embed : tw(m, "lm_head.weight");
    for (uint64_t s = 0; s < cal->n_samples; s++) {
        const uint8_t *mask = cal->mask + s * S;
        const int64_t *ids = cal->ids + s * S;
        for (uint64_t p = 0; p < S; p++) {
            int64_t id = mask[p] ? ids[p] : 0;
            for (uint64_t j = 0; j < H; j++)
                x[p * H + j] = embed[(uint64_t)id * H + j];
            r->n_rows += mask[p] || padding_in;
        }
        for (uint64_t l = 0; l < L; l++) {
            double **Hl = r->H + l * 4;
            const float *bq = c->qkv_bias ? tw(m, "model.layers.%" PRIu64 ".self_attn.q_proj.bias", l) : NULL;
            const float *bk = c->qkv_bias ? tw(m, "model.layers.%" PRIu64 ".self_attn.k_proj.bias", l) : NULL;
            const float *bv = c->qkv_bias ? tw(m, "model.layers.%" PRIu64 ".self_attn.v_proj.bias", l) : NULL;
            for (uint64_t p = 0; p < S; p++) {
                ref_rmsnorm(x + p * H, tw(m, "model.layers.%" PRIu64 ".input_layernorm.weight", l), H, c->rms_eps,
                            xn + p * H);
                if (mask[p] || padding_in)
                    ref_gram(Hl[0], xn + p * H, H);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".self_attn.q_proj.weight", l), bq, xn + p * H, Q, H,
                           q + p * Q);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".self_attn.k_proj.weight", l), bk, xn + p * H, KV, H,
                           k + p * KV);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".self_attn.v_proj.weight", l), bv, xn + p * H, KV, H,
                           v + p * KV);
                for (uint64_t h = 0; h < c->n_heads; h++)
                    ref_rope(q + p * Q + h * hd, hd, p, inv);
                for (uint64_t h = 0; h < c->n_kv_heads; h++)
                    ref_rope(k + p * KV + h * hd, hd, p, inv);
            }
            for (uint64_t p = 0; p < S; p++) {
                for (uint64_t h = 0; h < c->n_heads; h++) {
                    uint64_t kvh = h / n_rep;
                    double mx = -INFINITY;
                    for (uint64_t j = 0; j <= p; j++) {
                        bool ok = mask[j] && (!c->sliding_window || p - j < c->sliding_window);
                        if (!ok) {
                            sc[j] = -INFINITY;
                            continue;
                        }
                        double d = 0;
                        for (uint64_t e = 0; e < hd; e++)
                            d += q[p * Q + h * hd + e] * k[j * KV + kvh * hd + e];
                        sc[j] = d / sqrt((double)hd);
                        mx = sc[j] > mx ? sc[j] : mx;
                    }
                    double tot = 0;
                    for (uint64_t j = 0; j <= p; j++)
                        tot += sc[j] == -INFINITY ? 0 : exp(sc[j] - mx);
                    for (uint64_t e = 0; e < hd; e++) {
                        double o = 0;
                        for (uint64_t j = 0; j <= p; j++)
                            if (sc[j] != -INFINITY)
                                o += exp(sc[j] - mx) / tot * v[j * KV + kvh * hd + e];
                        a[p * Q + h * hd + e] = mx == -INFINITY ? 0 : o;
                    }
                }
            }
            const float *bo = c->o_bias ? tw(m, "model.layers.%" PRIu64 ".self_attn.o_proj.bias", l) : NULL;
            const float *bg = c->mlp_bias ? tw(m, "model.layers.%" PRIu64 ".mlp.gate_proj.bias", l) : NULL;
            const float *bu = c->mlp_bias ? tw(m, "model.layers.%" PRIu64 ".mlp.up_proj.bias", l) : NULL;
            const float *bd = c->mlp_bias ? tw(m, "model.layers.%" PRIu64 ".mlp.down_proj.bias", l) : NULL;
            for (uint64_t p = 0; p < S; p++) {
                bool counted = mask[p] || padding_in;
                if (counted)
                    ref_gram(Hl[1], a + p * Q, Q);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".self_attn.o_proj.weight", l), bo, a + p * Q, H, Q, tmp);
                for (uint64_t j = 0; j < H; j++)
                    x[p * H + j] += tmp[j];
                ref_rmsnorm(x + p * H, tw(m, "model.layers.%" PRIu64 ".post_attention_layernorm.weight", l), H,
                            c->rms_eps, xn + p * H);
                if (counted)
                    ref_gram(Hl[2], xn + p * H, H);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".mlp.gate_proj.weight", l), bg, xn + p * H, I, H, g);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".mlp.up_proj.weight", l), bu, xn + p * H, I, H, u);
                for (uint64_t j = 0; j < I; j++)
                    g[j] = g[j] / (1 + exp(-g[j])) * u[j];
                if (counted)
                    ref_gram(Hl[3], g, I);
                ref_linear(tw(m, "model.layers.%" PRIu64 ".mlp.down_proj.weight", l), bd, g, H, I, tmp);
                for (uint64_t j = 0; j < H; j++)
                    x[p * H + j] += tmp[j];
            }
        }
        for (uint64_t p = 0; p < S; p++) {
            ref_rmsnorm(x + p * H, tw(m, "model.norm.weight"), H, c->rms_eps, xn + p * H);
            if (mask[p] || padding_in)
                ref_gram(r->H[L * 4], xn + p * H, H);
            double *lg = r->logits + (s * S + p) * V;
            ref_linear(head, NULL, xn + p * H, V, H, lg);
            if (mask[p] && p + 1 < S && mask[p + 1]) {
                double mx = -INFINITY, tot = 0;
                for (uint64_t t = 0; t < V; t++)
                    mx = lg[t] > mx ? lg[t] : mx;
                for (uint64_t t = 0; t < V; t++)
                    tot += exp(lg[t] - mx);
                r->nll_sum += mx + log(tot) - lg[ids[p + 1]];
                r->n_pred++;
            }
        }
    }
    for (uint64_t kk = 0; kk < L * 4 + 1; kk++) {
        uint64_t d = kk == L * 4 ? H : dims[kk % 4];
        for (uint64_t e = 0; e < d * d; e++)
            r->H[kk][e] *= 2.0 / (double)r->n_rows;
    }
    free(inv), free(x), free(xn), free(q), free(k), free(v), free(a), free(tmp), free(g), free(u), free(sc);
}

static void ref_free(const tmodel *m, ref_out *r)
{
    free(r->logits);
    for (uint64_t k = 0; k < m->c.n_layers * 4 + 1; k++)
        free(r->H[k]);
    free(r->H);
}

/* ============================================================ the run under test */

typedef struct got_out {
    uint64_t n_layers, vocab;
    float **H;       /* as ref_out */
    uint64_t *dim;
    float *logits;   /* [packed token][vocab] */
    ms_llama_result res;
} got_out;

static int on_stats(void *ctx, uint64_t layer, cpu_hessian *const *stats, unsigned n, ms_error *err)
{
    (void)err;
    got_out *g = ctx;
    for (unsigned k = 0; k < n; k++) {
        uint64_t idx = layer * 4 + k, d = cpu_hessian_dim(stats[k]);
        assert_true(idx <= g->n_layers * 4);
        g->dim[idx] = d;
        g->H[idx] = malloc(d * d * sizeof(float));
        assert_non_null(g->H[idx]);
        /* in two pieces, the second first: any ranges in any order */
        uint64_t half = d / 2;
        cpu_hessian_rows_out(stats[k], 2.0 / (double)cpu_hessian_rows(stats[k]), half, d - half, g->H[idx] + half * d);
        cpu_hessian_rows_out(stats[k], 2.0 / (double)cpu_hessian_rows(stats[k]), 0, half, g->H[idx]);
    }
    return 0;
}

static void on_logits(void *ctx, const ms_llama_tokens *tok, uint64_t t0, uint64_t n, uint64_t v0, uint64_t nv,
                      const float *logits)
{
    (void)tok;
    got_out *g = ctx;
    for (uint64_t t = 0; t < n; t++)
        memcpy(g->logits + (t0 + t) * g->vocab + v0, logits + t * nv, nv * sizeof(float));
}

typedef struct run_knobs {
    uint64_t batch_size, act_budget, vocab_chunk, flush_rows;
    unsigned threads;
    bool prefetch; /* the next layer's weights on a thread of their own */
} run_knobs;

static void got_free(got_out *g)
{
    for (uint64_t k = 0; k <= g->n_layers * 4; k++)
        free(g->H[k]);
    free(g->H);
    free(g->dim);
    free(g->logits);
}

/* One run over src (checked, as the commands do) with every output. */
static void run_source(const ms_llama_source *src, cpu_llama_config *c, const ms_calib *cal,
                       const run_knobs *kn, got_out *g)
{
    ms_error err = {0};
    if (ms_llama_check(src, c, true, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(ms_calib_check_vocab(cal, c->vocab, &err), 0);
    *g = (got_out){.n_layers = c->n_layers, .vocab = c->vocab};
    g->H = calloc(g->n_layers * 4 + 1, sizeof *g->H);
    g->dim = calloc(g->n_layers * 4 + 1, sizeof *g->dim);
    g->logits = calloc(cal->n_real * c->vocab, sizeof(float));
    cpu_pool *pool = NULL;
    assert_int_equal(cpu_pool_open(kn->threads, &pool), 0);
    ms_llama_run_opts o = {.batch_size = kn->batch_size, .act_budget = kn->act_budget,
                           .vocab_chunk = kn->vocab_chunk, .flush_rows = kn->flush_rows,
                           .on_stats = on_stats, .stats_ctx = g, .head_stats = true, .nll = true,
                           .on_logits = on_logits, .logits_ctx = g, .prefetch_weights = kn->prefetch};
    if (ms_llama_run(src, c, cal, &o, pool, NULL, &g->res, &err) != 0)
        fail_msg("%s", err.msg);
    cpu_pool_close(pool);
}

static void run_model(const tmodel *m, const ms_calib *cal, const run_knobs *kn, got_out *g)
{
    ms_error err = {0};
    ms_model *mm = NULL;
    if (ms_model_open(m->dir, &mm, &err) != 0)
        fail_msg("%s", err.msg);
    ms_model_config mc;
    if (ms_model_config_parse(mm->config, m->dir, &mc, &err) != 0)
        fail_msg("%s", err.msg);
    /* the parse must give back what the test wrote */
    assert_int_equal(mc.arch, m->arch);
    assert_int_equal(mc.llama.hidden, m->c.hidden);
    assert_int_equal(mc.llama.head_dim, m->c.head_dim);
    assert_int_equal(mc.llama.n_kv_heads, m->c.n_kv_heads);
    assert_int_equal(mc.llama.rope_kind, m->c.rope_kind);
    assert_true(mc.llama.rope_theta == m->c.rope_theta);
    assert_int_equal(mc.llama.qkv_bias, m->c.qkv_bias);
    assert_int_equal(mc.llama.o_bias, m->c.o_bias);
    assert_int_equal(mc.llama.mlp_bias, m->c.mlp_bias);
    assert_int_equal(mc.llama.tie_embeddings, m->c.tie_embeddings);
    assert_int_equal(mc.llama.sliding_window, m->c.sliding_window);
    ms_llama_source src;
    assert_int_equal(ms_llama_source_model(mm, &src, &err), 0);
    run_source(&src, &mc.llama, cal, kn, g);
    ms_llama_source_close(&src);
    ms_model_close(mm);
}

/* ============================================================ comparisons */

/* max |got - ref| <= tol * max(max |ref|, floor) */
static void expect_close(const char *what, const float *got, const double *ref, uint64_t n, double tol)
{
    double mref = 0, mdiff = 0;
    uint64_t worst = 0;
    for (uint64_t i = 0; i < n; i++) {
        mref = fabs(ref[i]) > mref ? fabs(ref[i]) : mref;
        double d = fabs((double)got[i] - ref[i]);
        if (!(d <= mdiff)) {
            mdiff = d;
            worst = i;
        }
    }
    double lim = tol * (mref > 1e-3 ? mref : 1e-3);
    if (!(mdiff <= lim))
        fail_msg("%s: max |diff| %.3g at %" PRIu64 " (got %.9g, ref %.9g) exceeds %.3g (max |ref| %.3g)", what, mdiff,
                 worst, (double)got[worst], ref[worst], lim, mref);
}

/* Largest |a - b| relative to max |b|: for "this must differ" checks. */
static double rel_diff(const double *a, const double *b, uint64_t n)
{
    double mb = 0, md = 0;
    for (uint64_t i = 0; i < n; i++) {
        mb = fabs(b[i]) > mb ? fabs(b[i]) : mb;
        md = fabs(a[i] - b[i]) > md ? fabs(a[i] - b[i]) : md;
    }
    return md / (mb > 0 ? mb : 1);
}

#define TOL 2e-5

static void compare(const tmodel *m, const ms_calib *cal, const got_out *g, const ref_out *r)
{
    const cpu_llama_config *c = &m->c;
    uint64_t V = c->vocab;
    assert_int_equal(g->res.n_tokens, cal->n_real);
    assert_int_equal(g->res.n_samples, cal->n_samples);
    assert_int_equal(r->n_rows, cal->n_real);
    /* logits of every real position, sample by sample */
    uint64_t t = 0;
    double *row = malloc(V * sizeof(double));
    for (uint64_t s = 0; s < cal->n_samples; s++)
        for (uint64_t p = 0; p < cal->seq_len; p++) {
            if (!cal->mask[s * cal->seq_len + p])
                continue;
            char what[96];
            snprintf(what, sizeof what, "logits of sample %" PRIu64 " position %" PRIu64, s, p);
            memcpy(row, r->logits + (s * cal->seq_len + p) * V, V * sizeof(double));
            expect_close(what, g->logits + t * V, row, V, TOL);
            t++;
        }
    free(row);
    assert_int_equal(t, cal->n_real);
    /* statistics */
    for (uint64_t k = 0; k <= c->n_layers * 4; k++) {
        char what[96];
        if (k == c->n_layers * 4)
            snprintf(what, sizeof what, "H of the head");
        else
            snprintf(what, sizeof what, "H of layer %" PRIu64 " input %" PRIu64, k / 4, k % 4);
        assert_non_null(g->H[k]);
        expect_close(what, g->H[k], r->H[k], g->dim[k] * g->dim[k], TOL);
        for (uint64_t i = 0; i < g->dim[k]; i++) /* exactly symmetric */
            for (uint64_t j = 0; j < i; j++)
                assert_true(g->H[k][i * g->dim[k] + j] == g->H[k][j * g->dim[k] + i]);
    }
    /* NLL */
    assert_int_equal(g->res.n_predicted, r->n_pred);
    double mean_got = g->res.nll_sum / (double)g->res.n_predicted, mean_ref = r->nll_sum / (double)r->n_pred;
    if (!(fabs(mean_got - mean_ref) <= 1e-5 * fabs(mean_ref)))
        fail_msg("mean NLL %.9g, reference %.9g", mean_got, mean_ref);
}

/* ============================================================ cases */

typedef struct tcase {
    const char *name;
    ms_arch arch;
    uint64_t hidden, inter, layers, heads, kv, head_dim, vocab;
    double theta;
    cpu_rope_kind rope;
    const char *rope_json;
    bool rope_as_parameters;
    double factor, low, high, orig;
    bool tie, attn_bias, mlp_bias;
    uint64_t window;
    st_dtype dtype;
} tcase;

static const tcase k_cases[] = {
    {"llama", MS_ARCH_LLAMA, 32, 48, 2, 4, 2, 8, 61, 10000, CPU_ROPE_DEFAULT, NULL, false, 0, 0, 0, 0, false, false,
     false, 0, ST_F32},
    {"llama-bf16-biases", MS_ARCH_LLAMA, 24, 40, 2, 3, 1, 8, 37, 500000, CPU_ROPE_DEFAULT, NULL, false, 0, 0, 0, 0,
     false, true, true, 0, ST_BF16},
    {"llama3-rope", MS_ARCH_LLAMA, 32, 40, 2, 2, 2, 16, 41, 10000, CPU_ROPE_LLAMA3,
     "{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":0.5,\"high_freq_factor\":2.0,"
     "\"original_max_position_embeddings\":16}",
     false, 8.0, 0.5, 2.0, 16, false, false, false, 0, ST_F32},
    {"linear-rope-parameters", MS_ARCH_LLAMA, 32, 40, 1, 4, 4, 8, 41, 5000, CPU_ROPE_LINEAR,
     "{\"rope_type\":\"linear\",\"factor\":3.0}", true, 3.0, 0, 0, 0, false, false, false, 0, ST_F32},
    {"llama-tied", MS_ARCH_LLAMA, 32, 48, 2, 4, 1, 8, 53, 10000, CPU_ROPE_DEFAULT, NULL, false, 0, 0, 0, 0, true,
     false, false, 0, ST_BF16},
    {"mistral-window-head-dim", MS_ARCH_MISTRAL, 32, 48, 2, 4, 2, 12, 47, 1000000, CPU_ROPE_DEFAULT, NULL, false, 0,
     0, 0, 0, false, false, false, 4, ST_F32},
    {"qwen2-tied", MS_ARCH_QWEN2, 32, 56, 2, 4, 2, 8, 59, 1000000, CPU_ROPE_DEFAULT, NULL, false, 0, 0, 0, 0, true,
     false, false, 0, ST_BF16},
};

static void case_model(const tcase *tc, tmodel *m)
{
    memset(m, 0, sizeof *m);
    m->arch = tc->arch;
    m->dtype = tc->dtype;
    m->rope_json = tc->rope_json;
    m->rope_as_parameters = tc->rope_as_parameters;
    m->c = (cpu_llama_config){
        .hidden = tc->hidden, .intermediate = tc->inter, .n_layers = tc->layers, .n_heads = tc->heads,
        .n_kv_heads = tc->kv, .head_dim = tc->head_dim, .vocab = tc->vocab, .rms_eps = 1e-5,
        .rope_theta = tc->theta, .rope_kind = tc->rope, .rope_factor = tc->factor, .rope_low_freq_factor = tc->low,
        .rope_high_freq_factor = tc->high, .rope_original_max_pos = tc->orig, .sliding_window = tc->window,
        .qkv_bias = tc->attn_bias || tc->arch == MS_ARCH_QWEN2, .o_bias = tc->attn_bias, .mlp_bias = tc->mlp_bias,
        .tie_embeddings = tc->tie};
    gen_weights(m);
    write_model(m, false);
}

static void test_models_vs_reference(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        const tcase *tc = &k_cases[i];
        tmodel m;
        case_model(tc, &m);
        ms_calib *cal = make_calib(6, 13, tc->vocab, true);
        ref_out r;
        ref_forward(&m, cal, false, &r);
        got_out g;
        run_knobs kn = {.batch_size = 2, .act_budget = UINT64_MAX, .threads = 2};
        run_model(&m, cal, &kn, &g);
        compare(&m, cal, &g, &r);
        if (tc->rope != CPU_ROPE_DEFAULT || tc->window) {
            /* the scaling or window must matter: a reference without it differs */
            tmodel plain = m;
            plain.c.rope_kind = CPU_ROPE_DEFAULT;
            plain.c.sliding_window = 0;
            ref_out r2;
            ref_forward(&plain, cal, false, &r2);
            double d = rel_diff(r2.logits, r.logits, cal->n_samples * cal->seq_len * tc->vocab);
            if (!(d > 100 * TOL))
                fail_msg("%s: the rope scaling / window changes the logits by only %.3g", tc->name, d);
            ref_free(&m, &r2);
        }
        printf("  %s: ok (%" PRIu64 " tokens, mean NLL %.4f)\n", tc->name, g.res.n_tokens,
               g.res.nll_sum / (double)g.res.n_predicted);
        got_free(&g);
        ref_free(&m, &r);
        ms_calib_free(cal);
        remove_dir(m.dir);
        free_weights(&m);
    }
}

/* Padding: the same real tokens with extra padding (random ids, even out of
 * the vocabulary) give the same bits; a reference that lets padding into
 * the statistics differs from ours. */
static void test_padding_excluded(void **state)
{
    (void)state;
    tmodel m;
    case_model(&k_cases[0], &m);
    uint64_t S = 9, n = 5;
    ms_calib *tight = make_calib(n, S, m.c.vocab, true);
    ms_calib *padded = make_calib(n, S + 6, m.c.vocab, false);
    /* padded: each sample's real tokens at the same positions, then padding */
    padded->n_real = 0;
    for (uint64_t s = 0; s < n; s++)
        for (uint64_t p = 0; p < S + 6; p++) {
            uint64_t k = s * (S + 6) + p;
            bool real = p < S && tight->mask[s * S + p];
            padded->mask[k] = real;
            padded->ids[k] = real ? tight->ids[s * S + p] : (int64_t)(m.c.vocab + 7 + p);
            padded->n_real += real;
        }
    assert_int_equal(padded->n_real, tight->n_real);
    got_out a, b;
    run_knobs kn = {.batch_size = 2, .act_budget = UINT64_MAX, .threads = 2};
    run_model(&m, tight, &kn, &a);
    run_model(&m, padded, &kn, &b);
    for (uint64_t k = 0; k <= m.c.n_layers * 4; k++)
        assert_memory_equal(a.H[k], b.H[k], a.dim[k] * a.dim[k] * sizeof(float));
    assert_memory_equal(a.logits, b.logits, tight->n_real * m.c.vocab * sizeof(float));
    assert_true(a.res.nll_sum == b.res.nll_sum);
    /* and letting padding in would have been visible */
    ref_out with, without;
    ref_forward(&m, tight, true, &with);
    ref_forward(&m, tight, false, &without);
    double d = rel_diff(with.H[0], without.H[0], m.c.hidden * m.c.hidden);
    if (!(d > 100 * TOL))
        fail_msg("padding rows change H by only %.3g: the test cannot tell", d);
    compare(&m, tight, &a, &without);
    ref_free(&m, &with);
    ref_free(&m, &without);
    got_free(&a);
    got_free(&b);
    ms_calib_free(tight);
    ms_calib_free(padded);
    remove_dir(m.dir);
    free_weights(&m);
}

/* Batch size 1, 3 and everything at once; the spill file; small flush blocks
 * and vocabulary slices; 1 and 3 threads; the next layer's weights loaded
 * beside the current one's: the same statistics within fp32 tolerance, and
 * the spill file with weights prefetched exactly the same bits as RAM
 * without. */
static void test_batching_and_knobs(void **state)
{
    (void)state;
    tmodel m;
    case_model(&k_cases[6], &m); /* qwen2: biases and tied head */
    ms_calib *cal = make_calib(7, 12, m.c.vocab, true);
    ref_out r;
    ref_forward(&m, cal, false, &r);
    static const run_knobs k_knobs[] = {
        {.batch_size = 7, .act_budget = UINT64_MAX, .threads = 1},
        {.batch_size = 1, .act_budget = UINT64_MAX, .threads = 3, .prefetch = true},
        {.batch_size = 3, .act_budget = UINT64_MAX, .threads = 2, .flush_rows = 5, .vocab_chunk = 7},
        {.batch_size = 3, .act_budget = 0, .threads = 2, .flush_rows = 5, .vocab_chunk = 7, .prefetch = true}, /* spilled */
        {.batch_size = 2, .act_budget = 0, .threads = 1, .flush_rows = 1, .vocab_chunk = 1},
    };
    got_out g[5];
    for (size_t i = 0; i < 5; i++) {
        run_model(&m, cal, &k_knobs[i], &g[i]);
        compare(&m, cal, &g[i], &r);
        assert_int_equal(g[i].res.spilled, k_knobs[i].act_budget == 0);
        assert_int_equal(g[i].res.batches, (cal->n_samples + k_knobs[i].batch_size - 1) / k_knobs[i].batch_size);
    }
    for (uint64_t k = 0; k <= m.c.n_layers * 4; k++)
        assert_memory_equal(g[2].H[k], g[3].H[k], g[2].dim[k] * g[2].dim[k] * sizeof(float));
    assert_memory_equal(g[2].logits, g[3].logits, cal->n_real * m.c.vocab * sizeof(float));
    for (size_t i = 0; i < 5; i++)
        got_free(&g[i]);
    ref_free(&m, &r);
    ms_calib_free(cal);
    remove_dir(m.dir);
    free_weights(&m);
}

/* A sum of x^T x held elsewhere, for cpu_hessian_add_sum: rows [r0, r0 + n)
 * of the float64 sum, upper triangle only (the rest is garbage that must not
 * be read). */
typedef struct sum_src {
    const float *x;
    uint64_t rows, d, ld;
} sum_src;

static int sum_rows(void *ctx, uint64_t r0, uint64_t n, double *buf)
{
    const sum_src *s = ctx;
    for (uint64_t i = r0; i < r0 + n; i++)
        for (uint64_t j = 0; j < s->d; j++) {
            double acc = 0;
            for (uint64_t r = 0; r < s->rows; r++)
                acc += (double)s->x[r * s->ld + i] * (double)s->x[r * s->ld + j];
            buf[(i - r0) * s->d + j] = j >= i ? acc : NAN;
        }
    return 0;
}

/* The accumulator alone: random rows in random pieces, with and without fp64
 * blocks, against X^T X in float64; leading dimensions wider than dim. */
static void test_hessian_accum(void **state)
{
    (void)state;
    static const uint64_t k_dims[] = {1, 7, 33, 130};
    for (size_t di = 0; di < 4; di++) {
        uint64_t d = k_dims[di], rows = 50 + rng_below(200), ld = d + rng_below(3);
        float *x = malloc(rows * ld * sizeof(float));
        double *ref = calloc(d * d, sizeof(double));
        for (uint64_t i = 0; i < rows * ld; i++)
            x[i] = (float)(rng_gauss() + 0.5);
        for (uint64_t r = 0; r < rows; r++)
            for (uint64_t i = 0; i < d; i++)
                for (uint64_t j = 0; j < d; j++)
                    ref[i * d + j] += (double)x[r * ld + i] * (double)x[r * ld + j];
        double scale = 2.0 / (double)rows;
        for (uint64_t i = 0; i < d * d; i++)
            ref[i] *= scale;
        static const uint64_t k_flush[] = {0, 1, 16, 1000};
        for (size_t fi = 0; fi < 4; fi++) {
            cpu_hessian *h = NULL;
            assert_int_equal(cpu_hessian_open(d, k_flush[fi], &h), 0);
            uint64_t done = 0;
            while (done < rows) {
                uint64_t take = 1 + rng_below(40);
                take = take > rows - done ? rows - done : take;
                cpu_llama_gemm g = cpu_llama_gemm_blas();
                assert_int_equal(cpu_hessian_add(h, x + done * ld, take, ld, g.gram, g.ctx), 0);
                done += take;
            }
            assert_int_equal(cpu_hessian_rows(h), rows);
            assert_int_equal(cpu_hessian_dim(h), d);
            float *out = malloc(d * d * sizeof(float));
            for (uint64_t r0 = 0; r0 < d;) { /* random row pieces */
                uint64_t n = 1 + rng_below(d - r0);
                cpu_hessian_rows_out(h, scale, r0, n, out + r0 * d);
                r0 += n;
            }
            char what[64];
            snprintf(what, sizeof what, "X^T X dim %" PRIu64 " flush %" PRIu64, d, k_flush[fi]);
            expect_close(what, out, ref, d * d, 1e-5);
            /* reset keeps nothing of the old rows: the same rows again, at once */
            cpu_hessian_reset(h);
            assert_int_equal(cpu_hessian_rows(h), 0);
            cpu_llama_gemm g = cpu_llama_gemm_blas();
            assert_int_equal(cpu_hessian_add(h, x, rows, ld, g.gram, g.ctx), 0);
            assert_int_equal(cpu_hessian_rows(h), rows);
            cpu_hessian_rows_out(h, scale, 0, d, out);
            expect_close(what, out, ref, d * d, 1e-5);
            /* the first rows added as rows, the rest as a finished fp64 sum
             * (a GPU's accumulator, cpu_hessian_add_sum): the same result */
            cpu_hessian_reset(h);
            uint64_t split = rng_below(rows + 1);
            assert_int_equal(cpu_hessian_add(h, x, split, ld, g.gram, g.ctx), 0);
            sum_src src = {.x = x + split * ld, .rows = rows - split, .d = d, .ld = ld};
            assert_int_equal(cpu_hessian_add_sum(h, rows - split, sum_rows, &src), 0);
            assert_int_equal(cpu_hessian_rows(h), rows);
            cpu_hessian_rows_out(h, scale, 0, d, out);
            snprintf(what, sizeof what, "rows + sum, dim %" PRIu64 " flush %" PRIu64 " split %" PRIu64, d,
                     k_flush[fi], split);
            expect_close(what, out, ref, d * d, 1e-5);
            /* after a reset the old fp64 sums count for nothing even where
             * the new rows never reach a flush, and a sum from elsewhere
             * lands on zero: the bytes of a fresh accumulator given the same
             * rows and sum */
            cpu_hessian_reset(h);
            uint64_t few = 1 + rng_below(k_flush[fi] > 1 && k_flush[fi] < rows ? k_flush[fi] - 1 : rows);
            cpu_hessian *fresh = NULL;
            assert_int_equal(cpu_hessian_open(d, k_flush[fi], &fresh), 0);
            sum_src rest = {.x = x + few * ld, .rows = rows - few, .d = d, .ld = ld};
            cpu_hessian *both[2] = {h, fresh};
            for (unsigned b = 0; b < 2; b++) {
                assert_int_equal(cpu_hessian_add(both[b], x, few, ld, g.gram, g.ctx), 0);
                assert_int_equal(cpu_hessian_add_sum(both[b], rows - few, sum_rows, &rest), 0);
            }
            float *want = malloc(d * d * sizeof(float));
            cpu_hessian_rows_out(h, scale, 0, d, out);
            cpu_hessian_rows_out(fresh, scale, 0, d, want);
            if (memcmp(out, want, d * d * sizeof(float)) != 0)
                fail_msg("dim %" PRIu64 " flush %" PRIu64 ": %" PRIu64 " rows and a sum after a reset differ "
                         "from a fresh accumulator's", d, k_flush[fi], few);
            free(want);
            cpu_hessian_close(fresh);
            free(out);
            cpu_hessian_close(h);
        }
        free(x);
        free(ref);
    }
}

static void test_expf(void **state)
{
    (void)state;
    double worst = 0;
    for (int i = 0; i < 200000; i++) {
        float x = (float)(-87.0 + 175.0 * rng_unit());
        double want = exp((double)x), got = cpu_llama_expf(x);
        double rel = fabs(got - want) / want;
        worst = rel > worst ? rel : worst;
    }
    if (!(worst < 4e-7))
        fail_msg("exp: relative error %.3g", worst);
    assert_true(cpu_llama_expf(0.0f) == 1.0f);
    assert_true(isnan(cpu_llama_expf(NAN)));
    assert_true(cpu_llama_expf(-1000.0f) >= 0.0f && cpu_llama_expf(-1000.0f) < 1e-37f);
}

/* ============================================================ config.json */

static int parse_text(const char *json, ms_model_config *mc, ms_error *err)
{
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    int rc = ms_model_config_parse(j, "config.json", mc, err);
    cJSON_Delete(j);
    return rc;
}

#define BASE_CFG                                                                                                   \
    "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,\"num_attention_heads\":4,"               \
    "\"vocab_size\":100"

static void test_config(void **state)
{
    (void)state;
    ms_model_config mc;
    ms_error err = {0};
    assert_int_equal(parse_text("{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG "}", &mc, &err), 0);
    assert_int_equal(mc.llama.n_kv_heads, 4);
    assert_int_equal(mc.llama.head_dim, 16);
    assert_true(mc.llama.rms_eps == 1e-6 && mc.llama.rope_theta == 10000.0);
    assert_false(mc.llama.tie_embeddings || mc.llama.qkv_bias);
    assert_int_equal(mc.llama.rope_kind, CPU_ROPE_DEFAULT);
    /* model_type alone; Qwen2 biases; rope_parameters' rope_theta wins over the top level's */
    assert_int_equal(parse_text("{\"model_type\":\"qwen2\"," BASE_CFG ",\"rope_theta\":5.0,\"rope_scaling\":null,"
                                "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":77.0}}",
                                &mc, &err),
                     0);
    assert_int_equal(mc.arch, MS_ARCH_QWEN2);
    assert_true(mc.llama.qkv_bias && !mc.llama.o_bias && mc.llama.rope_theta == 77.0);
    assert_int_equal(parse_text("{\"architectures\":[\"MistralForCausalLM\"]," BASE_CFG
                                ",\"sliding_window\":4096,\"head_dim\":32}",
                                &mc, &err),
                     0);
    assert_int_equal(mc.llama.sliding_window, 4096);
    assert_int_equal(mc.llama.head_dim, 32);

    static const struct {
        const char *json;
        int code;
        const char *needle;
    } k_bad[] = {
        {"{\"architectures\":[\"GPT2LMHeadModel\"]," BASE_CFG "}", MS_EXIT_USAGE, "GPT2LMHeadModel"},
        {"{\"model_type\":\"gemma\"," BASE_CFG "}", MS_EXIT_USAGE, "gemma"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"rope_scaling\":{\"rope_type\":\"yarn\"}}",
         MS_EXIT_USAGE, "yarn"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"rope_scaling\":{\"type\":\"yarn\"},"
         "\"rope_parameters\":{\"rope_type\":\"default\"}}",
         MS_EXIT_USAGE, "rope_scaling: rope type 'yarn'"}, /* transformers would run yarn */
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"hidden_act\":\"gelu\"}", MS_EXIT_USAGE, "gelu"},
        {"{\"architectures\":[\"Qwen2ForCausalLM\"]," BASE_CFG ",\"use_sliding_window\":true}", MS_EXIT_USAGE,
         "use_sliding_window"},
        {"{\"architectures\":[\"LlamaForCausalLM\"],\"intermediate_size\":128,\"num_hidden_layers\":2,"
         "\"num_attention_heads\":4,\"vocab_size\":100}",
         MS_EXIT_DATA, "hidden_size"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"num_key_value_heads\":3}", MS_EXIT_DATA,
         "num_key_value_heads"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"head_dim\":15}", MS_EXIT_DATA, "even"},
        {"{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
         "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":1.5}",
         MS_EXIT_DATA, "vocab_size"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"rope_scaling\":{\"rope_type\":\"llama3\","
         "\"factor\":8}}",
         MS_EXIT_DATA, "low_freq_factor"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"rope_scaling\":{\"rope_type\":\"linear\"}}",
         MS_EXIT_DATA, "factor"},
        {"{\"architectures\":[]," BASE_CFG "}", MS_EXIT_DATA, "architectures"},
        {"{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG ",\"tie_word_embeddings\":1}", MS_EXIT_DATA,
         "tie_word_embeddings"},
    };
    for (size_t i = 0; i < sizeof k_bad / sizeof k_bad[0]; i++) {
        ms_error_clear(&err);
        if (parse_text(k_bad[i].json, &mc, &err) == 0)
            fail_msg("accepted: %s", k_bad[i].json);
        assert_int_equal(err.exit_code, k_bad[i].code);
        if (!strstr(err.msg, k_bad[i].needle))
            fail_msg("'%s' does not name '%s'", err.msg, k_bad[i].needle);
    }
    assert_int_equal(ms_model_config_parse(NULL, "dir", &mc, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
}

typedef struct parse_call {
    const char *json;
    ms_model_config mc;
    ms_error err;
    int rc;
} parse_call;

static void do_parse(void *arg)
{
    parse_call *p = arg;
    p->rc = parse_text(p->json, &p->mc, &p->err);
}

/* Parses json with stderr captured into log; fails unless it parses. */
static ms_model_config parse_logged(const char *json, char *log, size_t size)
{
    parse_call p = {.json = json};
    capture_stderr(do_parse, &p, log, size);
    if (p.rc != 0)
        fail_msg("%s: %s", json, p.err.msg);
    return p.mc;
}

#define LLAMA_CFG "{\"architectures\":[\"LlamaForCausalLM\"]," BASE_CFG
#define MISTRAL_CFG "{\"architectures\":[\"MistralForCausalLM\"]," BASE_CFG
#define QWEN2_CFG "{\"architectures\":[\"Qwen2ForCausalLM\"]," BASE_CFG

/* What transformers 5.24's config classes make of keys that are absent or
 * conflicting (checked against MistralConfig, Qwen2Config and
 * convert_rope_params_to_dict). */
static void test_config_transformers(void **state)
{
    (void)state;
    char log[1024];
    ms_model_config mc;
    static const struct {
        const char *json;
        uint64_t window;
    } k_windows[] = {
        /* Mistral: no sliding_window key is MistralConfig's 4096; null is none */
        {MISTRAL_CFG "}", 4096},
        {MISTRAL_CFG ",\"sliding_window\":null}", 0},
        {MISTRAL_CFG ",\"sliding_window\":16}", 16},
        /* Qwen2: no window unless use_sliding_window, whatever sliding_window says */
        {QWEN2_CFG "}", 0},
        {QWEN2_CFG ",\"sliding_window\":16}", 0},
        {QWEN2_CFG ",\"sliding_window\":16,\"use_sliding_window\":false}", 0},
        /* Llama has no window */
        {LLAMA_CFG ",\"sliding_window\":16}", 0},
    };
    for (size_t i = 0; i < sizeof k_windows / sizeof k_windows[0]; i++) {
        mc = parse_logged(k_windows[i].json, log, sizeof log);
        if (mc.llama.sliding_window != k_windows[i].window)
            fail_msg("%s: sliding window %" PRIu64 ", want %" PRIu64, k_windows[i].json,
                     (uint64_t)mc.llama.sliding_window, k_windows[i].window);
    }

    /* rope: a non-empty rope_scaling replaces rope_parameters whole, its
     * rope_theta included (then from rope_scaling, else the top level, else
     * 10000), with one warning naming both and the one used */
#define PARAMS ",\"rope_parameters\":{\"rope_type\":\"linear\",\"factor\":2.0,\"rope_theta\":77.0}"
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":4.0},"
                                       "\"rope_theta\":500.0}",
                      log, sizeof log);
    assert_int_equal(mc.llama.rope_kind, CPU_ROPE_LINEAR);
    assert_true(mc.llama.rope_factor == 4.0 && mc.llama.rope_theta == 500.0);
    if (!strstr(log, "config.json") || !strstr(log, "rope_scaling and rope_parameters") ||
        !strstr(log, "using rope_scaling") || strchr(log, '\n') != strrchr(log, '\n'))
        fail_msg("not one warning naming both rope objects and the one used: '%s'", log);
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":{\"type\":\"linear\",\"factor\":4.0}}", log, sizeof log);
    assert_true(mc.llama.rope_factor == 4.0 && mc.llama.rope_theta == 10000.0);
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":{\"rope_type\":\"default\",\"rope_theta\":333.0},"
                                       "\"rope_theta\":500.0}",
                      log, sizeof log);
    assert_int_equal(mc.llama.rope_kind, CPU_ROPE_DEFAULT);
    assert_true(mc.llama.rope_theta == 333.0);
    assert_non_null(strstr(log, "using rope_scaling"));
    /* rope_scaling null or {}: rope_parameters, silently */
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":null,\"rope_theta\":500.0}", log, sizeof log);
    assert_true(mc.llama.rope_kind == CPU_ROPE_LINEAR && mc.llama.rope_factor == 2.0 && mc.llama.rope_theta == 77.0);
    assert_string_equal(log, "");
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":{},\"rope_theta\":500.0}", log, sizeof log);
    assert_true(mc.llama.rope_kind == CPU_ROPE_LINEAR && mc.llama.rope_factor == 2.0 && mc.llama.rope_theta == 77.0);
    assert_string_equal(log, "");
    /* the same object twice: nothing to warn about */
    mc = parse_logged(LLAMA_CFG PARAMS ",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":2.0,"
                                       "\"rope_theta\":77.0}}",
                      log, sizeof log);
    assert_true(mc.llama.rope_factor == 2.0 && mc.llama.rope_theta == 77.0);
    assert_string_equal(log, "");
    /* an empty rope_parameters beside rope_scaling */
    mc = parse_logged(LLAMA_CFG ",\"rope_parameters\":{},\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":4.0},"
                                "\"rope_theta\":500.0}",
                      log, sizeof log);
    assert_true(mc.llama.rope_factor == 4.0 && mc.llama.rope_theta == 500.0);
#undef PARAMS
}

typedef struct check_call {
    const ms_llama_source *src;
    cpu_llama_config *c;
    bool need_head;
    ms_error err;
    int rc;
} check_call;

static void do_check(void *arg)
{
    check_call *k = arg;
    k->rc = ms_llama_check(k->src, k->c, k->need_head, &k->err);
}

/* tie_word_embeddings true over a checkpoint that also has lm_head.weight:
 * transformers 5.24 does not tie them and its head is lm_head.weight (it
 * warns); so does the pass, with one warning naming both tensors. Without
 * the head (hessian) nothing changes and nothing is said. */
static void test_tied_config_with_head(void **state)
{
    (void)state;
    tmodel m;
    memset(&m, 0, sizeof m);
    m.arch = MS_ARCH_LLAMA;
    m.dtype = ST_F32;
    m.c = (cpu_llama_config){.hidden = 32, .intermediate = 48, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                             .head_dim = 8, .vocab = 43, .rms_eps = 1e-5, .rope_theta = 10000};
    gen_weights(&m); /* untied: with lm_head.weight */
    m.c.tie_embeddings = true;
    write_model(&m, false); /* config.json says tied */

    ms_error err = {0};
    ms_model *mm = NULL;
    assert_int_equal(ms_model_open(m.dir, &mm, &err), 0);
    ms_model_config mc;
    assert_int_equal(ms_model_config_parse(mm->config, m.dir, &mc, &err), 0);
    assert_true(mc.llama.tie_embeddings);
    ms_llama_source src;
    assert_int_equal(ms_llama_source_model(mm, &src, &err), 0);
    char log[1024];
    check_call k = {.src = &src, .c = &mc.llama, .need_head = false};
    capture_stderr(do_check, &k, log, sizeof log);
    assert_int_equal(k.rc, 0);
    assert_true(mc.llama.tie_embeddings);
    assert_string_equal(log, "");
    k.need_head = true;
    capture_stderr(do_check, &k, log, sizeof log);
    if (k.rc != 0)
        fail_msg("%s", k.err.msg);
    assert_false(mc.llama.tie_embeddings);
    assert_string_equal(ms_llama_head_name(&mc.llama), "lm_head.weight");
    if (!strstr(log, m.dir) || !strstr(log, "tie_word_embeddings") || !strstr(log, "lm_head.weight") ||
        !strstr(log, "model.embed_tokens.weight") || !strstr(log, "the head is lm_head.weight") ||
        strchr(log, '\n') != strrchr(log, '\n'))
        fail_msg("not one warning naming both tensors and the one used: '%s'", log);
    ms_llama_source_close(&src);
    ms_model_close(mm);

    /* the whole pass: logits and NLL from lm_head.weight, not the embedding */
    ms_calib *cal = make_calib(5, 11, m.c.vocab, true);
    tmodel untied = m, tied = m;
    untied.c.tie_embeddings = false;
    ref_out r, r_tied;
    ref_forward(&untied, cal, false, &r);
    ref_forward(&tied, cal, false, &r_tied);
    double d = rel_diff(r_tied.logits, r.logits, cal->n_samples * cal->seq_len * m.c.vocab);
    if (!(d > 100 * TOL))
        fail_msg("the head's choice changes the logits by only %.3g", d);
    got_out g;
    run_knobs kn = {.batch_size = 2, .act_budget = UINT64_MAX, .threads = 2};
    run_model(&m, cal, &kn, &g);
    compare(&untied, cal, &g, &r);
    got_free(&g);
    ref_free(&untied, &r);
    ref_free(&tied, &r_tied);
    ms_calib_free(cal);
    remove_dir(m.dir);
    free_weights(&m);
}

/* A missing tensor and a wrong shape are found before any data is read. */
static void test_check_weights(void **state)
{
    (void)state;
    tmodel m;
    memset(&m, 0, sizeof m);
    m.arch = MS_ARCH_LLAMA;
    m.dtype = ST_F32;
    m.c = (cpu_llama_config){.hidden = 16, .intermediate = 24, .n_layers = 1, .n_heads = 2, .n_kv_heads = 1,
                             .head_dim = 8, .vocab = 11, .rms_eps = 1e-5, .rope_theta = 10000};
    gen_weights(&m);
    write_model(&m, true); /* without lm_head.weight */
    ms_error err = {0};
    ms_model *mm = NULL;
    assert_int_equal(ms_model_open(m.dir, &mm, &err), 0);
    ms_model_config mc;
    assert_int_equal(ms_model_config_parse(mm->config, m.dir, &mc, &err), 0);
    ms_llama_source src;
    assert_int_equal(ms_llama_source_model(mm, &src, &err), 0);
    assert_int_equal(ms_llama_check(&src, &mc.llama, false, &err), 0); /* hessian needs no head */
    assert_int_equal(ms_llama_check(&src, &mc.llama, true, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err.msg, "lm_head.weight"));
    mc.llama.intermediate = 25; /* as if config.json disagreed with the weights */
    assert_int_equal(ms_llama_check(&src, &mc.llama, false, &err), -1);
    assert_non_null(strstr(err.msg, "model.layers.0.mlp.gate_proj.weight"));
    assert_non_null(strstr(err.msg, "[24, 16]"));
    ms_llama_source_close(&src);
    ms_model_close(mm);
    remove_dir(m.dir);
    free_weights(&m);
}

/* ============================================================ BASE+ADAPTER */

/* A PEFT LoRA adapter for one of k_cases, written by the test. */
typedef struct lcase {
    const char *name;
    size_t base_case; /* index into k_cases */
    unsigned rank;
    double alpha;
    bool rslora, dora, embedding;
    st_dtype factor_dtype;            /* of every adapter tensor */
    const char *targets[8];           /* projections, NULL-terminated */
    bool replace_head, replace_norm;  /* modules_to_save: lm_head, model.norm */
    uint64_t act_budget;
} lcase;

static const lcase k_lora_cases[] = {
    {"lora-all-linear-modules_to_save", 1, 3, 6.0, false, false, false, ST_F32,
     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", NULL}, true, true, UINT64_MAX},
    {"dora-rslora-bf16-embedding-tied", 6, 2, 3.0, true, true, true, ST_BF16, {"q_proj", "v_proj", "down_proj", NULL},
     false, false, 0},
};

static float round_dt(st_dtype dt, double v)
{
    float f = (float)v;
    return dt == ST_BF16 ? ms_bf16_to_f32(ms_f32_to_bf16(f)) : f;
}

static tensor *ad_add(tensor *ad, size_t *n, st_dtype dt, unsigned ndim, uint64_t d0, uint64_t d1, double add,
                      double sd, const char *fmt, ...) __attribute__((format(printf, 9, 10)));
static tensor *ad_add(tensor *ad, size_t *n, st_dtype dt, unsigned ndim, uint64_t d0, uint64_t d1, double add,
                      double sd, const char *fmt, ...)
{
    assert_true(*n < MAX_TENSORS);
    tensor *t = &ad[(*n)++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    uint64_t numel = ndim == 2 ? d0 * d1 : d0;
    t->data = malloc(numel * sizeof(float));
    assert_non_null(t->data);
    for (uint64_t i = 0; i < numel; i++)
        t->data[i] = round_dt(dt, add + sd * rng_gauss());
    return t;
}

/* v (rows x cols, fp64) = W + scale * B @ A placed at (o, i), or at (i, o)
 * when transposed (an embedding: A [r, rows], B [cols, r]). With DoRA,
 * mag gets random magnitudes near each feature's norm (a row, or a column
 * when transposed) and v is rescaled to them. Then W = v rounded to fp32. */
static void merge_f64(float *W, uint64_t rows, uint64_t cols, const tensor *A, const tensor *B, unsigned r,
                      double scale, bool transposed, tensor *mag, st_dtype dt)
{
    double *v = malloc(rows * cols * sizeof *v);
    assert_non_null(v);
    for (uint64_t i = 0; i < rows; i++)
        for (uint64_t j = 0; j < cols; j++) {
            uint64_t o = transposed ? j : i, n = transposed ? i : j, in = transposed ? rows : cols;
            double p = 0;
            for (unsigned k = 0; k < r; k++)
                p += (double)B->data[o * r + k] * (double)A->data[k * in + n];
            v[i * cols + j] = (double)W[i * cols + j] + scale * p;
        }
    if (mag) {
        uint64_t nf = transposed ? cols : rows, len = transposed ? rows : cols;
        assert_int_equal(mag->shape[0], nf);
        for (uint64_t f = 0; f < nf; f++) {
            double ss = 0;
            for (uint64_t e = 0; e < len; e++) {
                double x = transposed ? v[e * cols + f] : v[f * cols + e];
                ss += x * x;
            }
            mag->data[f] = round_dt(dt, sqrt(ss) * (1.0 + 0.3 * rng_gauss()));
            double k = (double)mag->data[f] / sqrt(ss);
            for (uint64_t e = 0; e < len; e++) {
                double *x = transposed ? &v[e * cols + f] : &v[f * cols + e];
                *x *= k;
            }
        }
    }
    for (uint64_t e = 0; e < rows * cols; e++)
        W[e] = (float)v[e];
    free(v);
}

/* Writes lc's adapter for b into a fresh directory adir (its tensors left in
 * ad[0..*n_ad)) and the model it amounts to into *mg: b's weights with every
 * adapted one computed in float64 from the stored values, rounded to fp32
 * once, written as an F32 model directory of its own. */
static void make_lora(const tmodel *b, const lcase *lc, tmodel *mg, tensor *ad, size_t *n_ad, char adir[64])
{
    *mg = *b;
    mg->dtype = ST_F32;
    for (size_t i = 0; i < b->n; i++) {
        uint64_t numel = b->t[i].ndim == 2 ? b->t[i].shape[0] * b->t[i].shape[1] : b->t[i].shape[0];
        mg->t[i].data = malloc(numel * sizeof(float));
        assert_non_null(mg->t[i].data);
        memcpy(mg->t[i].data, b->t[i].data, numel * sizeof(float));
    }
    *n_ad = 0;
    const st_dtype dt = lc->factor_dtype;
    const unsigned r = lc->rank;
    double scale = lc->rslora ? lc->alpha / sqrt((double)r) : lc->alpha / (double)r;
    const double sd = 0.15;
    for (uint64_t l = 0; l < b->c.n_layers; l++)
        for (const char *const *p = lc->targets; *p; p++) {
            const char *group = strstr("q_proj k_proj v_proj o_proj", *p) ? "self_attn" : "mlp";
            char mod[96];
            snprintf(mod, sizeof mod, "model.layers.%" PRIu64 ".%s.%s", l, group, *p);
            float *W = tw(mg, "%s.weight", mod);
            uint64_t rows = 0, cols = 0;
            for (size_t i = 0; i < mg->n; i++)
                if (mg->t[i].data == W)
                    rows = mg->t[i].shape[0], cols = mg->t[i].shape[1];
            tensor *A = ad_add(ad, n_ad, dt, 2, r, cols, 0, sd, "base_model.model.%s.lora_A.weight", mod);
            tensor *B = ad_add(ad, n_ad, dt, 2, rows, r, 0, sd, "base_model.model.%s.lora_B.weight", mod);
            tensor *M = lc->dora ? ad_add(ad, n_ad, dt, 1, rows, 0, 0, 0, "base_model.model.%s.lora_magnitude_vector",
                                          mod)
                                 : NULL;
            merge_f64(W, rows, cols, A, B, r, scale, false, M, dt);
        }
    if (lc->embedding) {
        uint64_t V = b->c.vocab, H = b->c.hidden;
        tensor *A = ad_add(ad, n_ad, dt, 2, r, V, 0, sd, "base_model.model.model.embed_tokens.lora_embedding_A");
        tensor *B = ad_add(ad, n_ad, dt, 2, H, r, 0, sd, "base_model.model.model.embed_tokens.lora_embedding_B");
        tensor *M = lc->dora ? ad_add(ad, n_ad, dt, 1, H, 0, 0, 0,
                                      "base_model.model.model.embed_tokens.lora_magnitude_vector")
                             : NULL;
        merge_f64(tw(mg, "model.embed_tokens.weight"), V, H, A, B, r, scale, true, M, dt);
    }
    if (lc->replace_head) {
        tensor *t = ad_add(ad, n_ad, dt, 2, b->c.vocab, b->c.hidden, 0, 0.4, "base_model.model.lm_head.weight");
        memcpy(tw(mg, "lm_head.weight"), t->data, b->c.vocab * b->c.hidden * sizeof(float));
    }
    if (lc->replace_norm) {
        tensor *t = ad_add(ad, n_ad, dt, 1, b->c.hidden, 0, 1.0, 0.1, "base_model.model.model.norm.weight");
        memcpy(tw(mg, "model.norm.weight"), t->data, b->c.hidden * sizeof(float));
    }
    write_model(mg, false);

    snprintf(adir, 64, "/tmp/ms-llama-lora.XXXXXX");
    assert_non_null(mkdtemp(adir));
    write_tensors(adir, "adapter_model", ad, *n_ad, dt);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "peft_type", "LORA");
    cJSON_AddStringToObject(j, "task_type", "CAUSAL_LM");
    cJSON_AddNumberToObject(j, "r", r);
    cJSON_AddNumberToObject(j, "lora_alpha", lc->alpha);
    cJSON_AddBoolToObject(j, "use_rslora", lc->rslora);
    cJSON_AddBoolToObject(j, "use_dora", lc->dora);
    cJSON_AddFalseToObject(j, "fan_in_fan_out");
    cJSON_AddTrueToObject(j, "init_lora_weights");
    cJSON_AddStringToObject(j, "bias", "none");
    cJSON *tm = cJSON_AddArrayToObject(j, "target_modules");
    for (const char *const *p = lc->targets; *p; p++)
        cJSON_AddItemToArray(tm, cJSON_CreateString(*p));
    if (lc->embedding)
        cJSON_AddItemToArray(tm, cJSON_CreateString("embed_tokens"));
    cJSON *ms = cJSON_AddArrayToObject(j, "modules_to_save");
    if (lc->replace_head)
        cJSON_AddItemToArray(ms, cJSON_CreateString("lm_head"));
    if (lc->replace_norm)
        cJSON_AddItemToArray(ms, cJSON_CreateString("norm"));
    char *text = cJSON_Print(j), path[128];
    snprintf(path, sizeof path, "%s/adapter_config.json", adir);
    write_file(path, text);
    free(text);
    cJSON_Delete(j);
}

/* got_out a against b, both fp32, within TOL. */
static void expect_same_run(const char *name, const got_out *a, const got_out *b, uint64_t n_logits)
{
    uint64_t most = n_logits;
    for (uint64_t k = 0; k <= a->n_layers * 4; k++)
        most = a->dim[k] * a->dim[k] > most ? a->dim[k] * a->dim[k] : most;
    double *ref = malloc(most * sizeof *ref);
    assert_non_null(ref);
    char what[128];
    for (uint64_t k = 0; k <= a->n_layers * 4; k++) {
        assert_int_equal(a->dim[k], b->dim[k]);
        for (uint64_t e = 0; e < b->dim[k] * b->dim[k]; e++)
            ref[e] = b->H[k][e];
        snprintf(what, sizeof what, "%s: H %" PRIu64 " of BASE+ADAPTER vs the merged directory", name, k);
        expect_close(what, a->H[k], ref, a->dim[k] * a->dim[k], TOL);
    }
    for (uint64_t e = 0; e < n_logits; e++)
        ref[e] = b->logits[e];
    snprintf(what, sizeof what, "%s: logits of BASE+ADAPTER vs the merged directory", name);
    expect_close(what, a->logits, ref, n_logits, TOL);
    free(ref);
    assert_int_equal(a->res.n_predicted, b->res.n_predicted);
    double ma = a->res.nll_sum / (double)a->res.n_predicted, mb = b->res.nll_sum / (double)b->res.n_predicted;
    if (!(fabs(ma - mb) <= 1e-5 * fabs(mb)))
        fail_msg("%s: mean NLL %.9g with the adapter, %.9g merged", name, ma, mb);
}

/* BASE+ADAPTER through ms_llama_source_lora gives what the merged model
 * gives: against the float64 reference run on the weights the test merged
 * in float64, and against the plain source over the merged F32 directory.
 * Case 1: every projection, F32 factors, lm_head and model.norm replaced
 * (modules_to_save; the head read in slices from the adapter file). Case 2:
 * BF16 factors, rsLoRA, DoRA on linear weights (row norms) and on the
 * embedding (column norms: the statistics pass), tied embeddings (the head
 * reads the adapted embedding in slices, after every layer's target was
 * held), the residual stream spilled. The adapter must change the results
 * by far more than the tolerance. */
static void test_lora_vs_merged(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < sizeof k_lora_cases / sizeof k_lora_cases[0]; ci++) {
        const lcase *lc = &k_lora_cases[ci];
        tmodel b, mg;
        case_model(&k_cases[lc->base_case], &b);
        static tensor ad[MAX_TENSORS];
        size_t n_ad = 0;
        char adir[64];
        make_lora(&b, lc, &mg, ad, &n_ad, adir);
        ms_calib *cal = make_calib(6, 11, b.c.vocab, true);
        uint64_t n_logits_ref = cal->n_samples * cal->seq_len * b.c.vocab, L = b.c.n_layers;
        ref_out r, r0;
        ref_forward(&mg, cal, false, &r);
        ref_forward(&b, cal, false, &r0);
        double dl = rel_diff(r0.logits, r.logits, n_logits_ref);
        double dh = rel_diff(r0.H[L * 4], r.H[L * 4], b.c.hidden * b.c.hidden);
        double dd = rel_diff(r0.H[(L - 1) * 4 + 3], r.H[(L - 1) * 4 + 3], b.c.intermediate * b.c.intermediate);
        if (!(dl > 100 * TOL && dh > 100 * TOL && dd > 100 * TOL))
            fail_msg("%s: the adapter changes logits / head H / last down_proj H by only %.3g / %.3g / %.3g",
                     lc->name, dl, dh, dd);

        ms_error err = {0};
        ms_model *bm = NULL;
        ms_peft *pa = NULL;
        cpu_pool *pool = NULL;
        assert_int_equal(ms_model_open(b.dir, &bm, &err), 0);
        if (ms_peft_open(adir, bm, &pa, &err) != 0)
            fail_msg("%s: %s", lc->name, err.msg);
        assert_int_equal(cpu_pool_open(2, &pool), 0);
        ms_llama_source src;
        assert_int_equal(ms_llama_source_lora(bm, pa, pool, "test+adapter", &src, &err), 0);
        assert_true(src.host_bytes > 0);
        run_knobs kn = {.batch_size = 2, .act_budget = lc->act_budget, .vocab_chunk = 7, .threads = 2};
        got_out g, gm;
        run_source(&src, &b.c, cal, &kn, &g);
        compare(&mg, cal, &g, &r);
        run_model(&mg, cal, &kn, &gm);
        compare(&mg, cal, &gm, &r);
        expect_same_run(lc->name, &g, &gm, cal->n_real * b.c.vocab);
        printf("  %s: ok (%zu adapter tensors, %zu targets, mean NLL %.4f, base %.4f)\n", lc->name, n_ad,
               ms_peft_n_targets(pa), g.res.nll_sum / (double)g.res.n_predicted, r0.nll_sum / (double)r0.n_pred);

        ms_llama_source_close(&src);
        cpu_pool_close(pool);
        ms_peft_close(pa);
        ms_model_close(bm);
        got_free(&g);
        got_free(&gm);
        ref_free(&b, &r);
        ref_free(&b, &r0);
        ms_calib_free(cal);
        for (size_t i = 0; i < n_ad; i++)
            free(ad[i].data);
        remove_dir(adir);
        remove_dir(mg.dir);
        remove_dir(b.dir);
        free_weights(&mg);
        free_weights(&b);
    }
}

static void make_dir(const char *root, const char *name, bool adapter)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", root, name);
    assert_int_equal(mkdir(path, 0755), 0);
    if (adapter) {
        snprintf(path, sizeof path, "%s/%s/adapter_config.json", root, name);
        write_file(path, "{}");
    }
}

static void expect_split(const char *model, const char *base, const char *adapter)
{
    ms_error err = {0};
    char *b = NULL, *a = NULL;
    if (ms_llama_model_split(model, &b, &a, &err) != 0)
        fail_msg("%s: %s", model, err.msg);
    if (strcmp(b, base) != 0 || (adapter ? !a || strcmp(a, adapter) != 0 : a != NULL))
        fail_msg("'%s' split into '%s' + '%s', expected '%s' + '%s'", model, b, a ? a : "(none)", base,
                 adapter ? adapter : "(none)");
    free(b);
    free(a);
}

static void expect_split_error(const char *model, const char *what)
{
    ms_error err = {0};
    char *b = (char *)"x", *a = (char *)"x";
    assert_int_equal(ms_llama_model_split(model, &b, &a, &err), -1);
    assert_null(b);
    assert_null(a);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    if (!strstr(err.msg, what) || !strstr(err.msg, model))
        fail_msg("'%s': error '%s' does not say '%s'", model, err.msg, what);
}

/* MODEL = BASE+ADAPTER with '+' in the paths, and the session over one. */
static void test_model_split(void **state)
{
    (void)state;
    char root[64] = "/tmp/ms-llama-split.XXXXXX", cwd[4096], m[512], b[512], a[512];
    assert_non_null(mkdtemp(root));
    assert_non_null(getcwd(cwd, sizeof cwd));
    make_dir(root, "m+1", false);
    make_dir(root, "lora+v2", true);
    make_dir(root, "v2", true);
    make_dir(root, "plain", false);
    make_dir(root, "exists+lora+v2", false);
    /* absolute paths: the last '+' followed by an adapter directory */
    snprintf(m, sizeof m, "%s/m+1+%s/lora+v2", root, root);
    snprintf(b, sizeof b, "%s/m+1", root);
    snprintf(a, sizeof a, "%s/lora+v2", root);
    expect_split(m, b, a);
    /* a path that exists is never split */
    snprintf(m, sizeof m, "%s/exists+lora+v2", root);
    expect_split(m, m, NULL);
    snprintf(m, sizeof m, "%s/m+1", root);
    expect_split(m, m, NULL);
    /* no '+' and missing: left for ms_model_open to report */
    snprintf(m, sizeof m, "%s/nothing", root);
    expect_split(m, m, NULL);
    /* a missing base still splits (the open names it) */
    snprintf(m, sizeof m, "%s/nobase+%s/lora+v2", root, root);
    snprintf(b, sizeof b, "%s/nobase", root);
    expect_split(m, b, a);
    /* the right part after the last '+' is not an adapter */
    snprintf(m, sizeof m, "%s/m+1+%s/plain", root, root);
    expect_split_error(m, "is not a PEFT adapter directory");
    snprintf(m, sizeof m, "%s/m+1+%s/missing", root, root);
    expect_split_error(m, "does not exist");
    snprintf(m, sizeof m, "%s/m+1+", root);
    expect_split_error(m, "is empty");
    /* relative: "m+1+lora+v2" could be "m+1+lora" + "v2" (both adapters),
     * but only "m+1" exists as a base */
    assert_int_equal(chdir(root), 0);
    expect_split("m+1+lora+v2", "m+1", "lora+v2");
    expect_split("plain+v2", "plain", "v2");
    expect_split("nobase+v2", "nobase", "v2");
    assert_int_equal(chdir(cwd), 0);
    remove_dir(root);

    /* a session over BASE+ADAPTER, both with '+' in their names */
    tmodel base, mg;
    case_model(&k_cases[0], &base);
    static tensor ad[MAX_TENSORS];
    size_t n_ad = 0;
    char adir[64];
    make_lora(&base, &k_lora_cases[0], &mg, ad, &n_ad, adir);
    char bplus[128], aplus[128], calib[128], model[300];
    snprintf(bplus, sizeof bplus, "%s/base+1", base.dir);
    snprintf(aplus, sizeof aplus, "%s/ad+2", adir);
    snprintf(calib, sizeof calib, "%s/calib.txt", base.dir);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir '%s' '%s' && cp '%s'/*.json '%s'/*.safetensors '%s' && cp '%s'/*.json '%s'/*.safetensors '%s'",
             bplus, aplus, base.dir, base.dir, bplus, adir, adir, aplus);
    assert_int_equal(system(cmd), 0);
    write_file(calib, "1 2 3 4 5\n6 7 8\n");
    snprintf(model, sizeof model, "%s+%s", bplus, aplus);
    ms_llama_session s;
    ms_error err = {0};
    if (ms_llama_session_open(model, calib, &(ms_calib_options){0}, true, NULL, &s, &err) != 0)
        fail_msg("%s", err.msg);
    assert_non_null(s.adapter);
    assert_string_equal(s.model->path, bplus);
    assert_string_equal(s.src.where, model);
    assert_int_equal(ms_peft_n_targets(s.adapter), 7 * base.c.n_layers + 2);
    assert_int_equal(ms_llama_session_check_unchanged(&s, &err), 0);
    ms_llama_session_close(&s);
    /* the adapter alone, and as a base */
    assert_int_equal(ms_llama_session_open(aplus, calib, &(ms_calib_options){0}, true, NULL, &s, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE);
    assert_non_null(strstr(err.msg, "BASE_DIR+ADAPTER_DIR"));
    snprintf(model, sizeof model, "%s+%s", aplus, aplus);
    assert_int_equal(ms_llama_session_open(model, calib, &(ms_calib_options){0}, true, NULL, &s, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE);
    for (size_t i = 0; i < n_ad; i++)
        free(ad[i].data);
    remove_dir(adir);
    remove_dir(mg.dir);
    remove_dir(base.dir);
    free_weights(&mg);
    free_weights(&base);
}

int main(void)
{
    g_rng = test_seed("test_llama_forward");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expf),
        cmocka_unit_test(test_hessian_accum),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_config_transformers),
        cmocka_unit_test(test_tied_config_with_head),
        cmocka_unit_test(test_check_weights),
        cmocka_unit_test(test_models_vs_reference),
        cmocka_unit_test(test_padding_excluded),
        cmocka_unit_test(test_batching_and_knobs),
        cmocka_unit_test(test_lora_vs_merged),
        cmocka_unit_test(test_model_split),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
