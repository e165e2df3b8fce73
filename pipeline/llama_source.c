/* Where the forward pass's weights come from: see llama_source.h. */
#include "pipeline/llama_source.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cpu/dtype_convert.h"
#include "cpu/lora_delta.h"
#include "io/atomic_file.h"
#include "pipeline/lora_load.h"

#define SRC_STAGE_BYTES (8u << 20) /* model source: raw bytes per pread */

/* ============================================================ model source */

typedef struct model_src {
    const ms_model *m;
    unsigned char *stage; /* stage_bytes: raw rows on their way to fp32 */
    uint64_t stage_bytes; /* >= SRC_STAGE_BYTES */
} model_src;

static const st_tensor *model_tensor(const model_src *s, const char *name, const st_file **file)
{
    long i = ms_model_find(s->m, name);
    if (i < 0)
        return NULL;
    *file = ms_model_tensor_file(s->m, (size_t)i);
    return s->m->tensors[i].info;
}

/* find's answer for tensor t of file f (looked up as name). */
static int tensor_shape(const st_tensor *t, const st_file *f, const char *name, unsigned *ndim, uint64_t shape[2],
                        ms_error *err)
{
    if (!st_dtype_is_mergeable_float(t->dtype))
        return ms_error_set(err, MS_EXIT_DATA, name, "dtype %s in %s: the forward pass reads F32, F16 or BF16",
                            st_dtype_name(t->dtype), f->path);
    if (t->ndim < 1 || t->ndim > 2)
        return ms_error_set(err, MS_EXIT_DATA, name, "%u dimensions in %s, expected 1 or 2", t->ndim, f->path);
    *ndim = t->ndim;
    shape[0] = t->shape[0];
    shape[1] = t->ndim == 2 ? t->shape[1] : 0;
    return 1;
}

/* Rows [row0, row0 + n_rows) of t (in f; a 1-D tensor is one row) widened
 * to fp32 into out, through stage for F16/BF16. Returns 0 or -1. */
static int tensor_rows_f32(const st_file *f, const st_tensor *t, unsigned char *stage, uint64_t stage_bytes,
                           uint64_t row0, uint64_t n_rows, float *out, ms_error *err)
{
    MS_ASSERT(st_dtype_is_mergeable_float(t->dtype) && (t->ndim == 1 || t->ndim == 2));
    uint64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->shape[t->ndim - 1];
    MS_ASSERT(row0 <= rows && n_rows <= rows - row0);
    unsigned esz = st_dtype_bits(t->dtype) / 8;
    uint64_t off = st_file_tensor_offset(f, t) + row0 * cols * esz, n = n_rows * cols;
    if (t->dtype == ST_F32)
        return ms_pread_exact(f->fd, f->path, out, (size_t)(n * 4), off, err);
    uint64_t per = stage_bytes / esz;
    for (uint64_t done = 0; done < n; done += per) {
        uint64_t k = n - done < per ? n - done : per;
        if (ms_pread_exact(f->fd, f->path, stage, (size_t)(k * esz), off + done * esz, err) < 0)
            return -1;
        cpu_convert(stage, t->dtype, out + done, ST_F32, k);
    }
    return 0;
}

static int model_find(void *ctx, const char *name, unsigned *ndim, uint64_t shape[2], ms_error *err)
{
    const st_file *f;
    const st_tensor *t = model_tensor(ctx, name, &f);
    return t ? tensor_shape(t, f, name, ndim, shape, err) : 0;
}

static int model_read_rows(void *ctx, const char *name, uint64_t row0, uint64_t n_rows, float *out, ms_error *err)
{
    model_src *s = ctx;
    const st_file *f;
    const st_tensor *t = model_tensor(s, name, &f);
    MS_ASSERT(t);
    return tensor_rows_f32(f, t, s->stage, s->stage_bytes, row0, n_rows, out, err);
}

static void model_close(void *ctx)
{
    model_src *s = ctx;
    if (s)
        free(s->stage);
    free(s);
}

int ms_llama_source_model(const ms_model *m, ms_llama_source *out, ms_error *err)
{
    *out = (ms_llama_source){0};
    model_src *s = calloc(1, sizeof *s);
    if (s)
        s->stage = malloc(SRC_STAGE_BYTES);
    if (!s || !s->stage) {
        model_close(s);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, m->path, "cannot allocate the read buffer");
    }
    s->m = m;
    s->stage_bytes = SRC_STAGE_BYTES;
    *out = (ms_llama_source){.ctx = s, .where = m->path, .find = model_find, .read_rows = model_read_rows,
                             .close = model_close, .host_bytes = SRC_STAGE_BYTES};
    return 0;
}

void ms_llama_source_close(ms_llama_source *s)
{
    if (s && s->close)
        s->close(s->ctx);
    if (s)
        *s = (ms_llama_source){0};
}

/* ============================================================ BASE+ADAPTER source */

typedef struct lora_src {
    model_src base;              /* the base's tensors; its stage holds at least one row of any target */
    const ms_peft *peft;
    cpu_pool *pool;
    char *where;
    const ms_lora_target *held;  /* the target whose factors `lora` holds, or NULL */
    cpu_lora *lora;
} lora_src;

/* What a target's rows are computed from: the base layer saved in the
 * adapter when there is one (and a REPLACE target's tensor), else the base
 * model's tensor (ms_peft_open checked it exists). */
static const st_tensor *lora_input(const lora_src *s, const ms_lora_target *t, const st_file **f)
{
    if (t->source) {
        *f = t->file;
        return t->source;
    }
    const st_tensor *bt = model_tensor(&s->base, t->base_name, f);
    MS_ASSERT(bt);
    return bt;
}

/* Makes s->lora hold t's prepared factors: read, widened and, for a DoRA
 * target over columns, the column statistics over the whole base tensor.
 * Returns 0 or -1 with err set (nothing held then). */
static int lora_hold(lora_src *s, const ms_lora_target *t, ms_error *err)
{
    if (s->held == t)
        return 0;
    cpu_lora_close(s->lora);
    s->lora = NULL;
    s->held = NULL;
    int rc = -1;
    if (ms_lora_load(s->peft, t, &s->lora, err) != 0)
        goto done;
    if (cpu_lora_needs_stats(s->lora)) {
        const st_file *f;
        const st_tensor *in = lora_input(s, t, &f);
        uint64_t row_bytes = t->cols * (st_dtype_bits(in->dtype) / 8), per = s->base.stage_bytes / row_bytes;
        for (uint64_t r0 = 0; r0 < t->rows; r0 += per) {
            uint64_t k = t->rows - r0 < per ? t->rows - r0 : per;
            if (ms_pread_exact(f->fd, f->path, s->base.stage, (size_t)(k * row_bytes),
                               st_file_tensor_offset(f, in) + r0 * row_bytes, err) < 0)
                goto done;
            cpu_lora_stats_rows(s->lora, s->base.stage, in->dtype, r0, k, s->pool);
        }
    }
    s->held = t;
    rc = 0;
done:
    if (rc < 0) {
        cpu_lora_close(s->lora);
        s->lora = NULL;
    }
    return rc;
}

static int lora_find(void *ctx, const char *name, unsigned *ndim, uint64_t shape[2], ms_error *err)
{
    lora_src *s = ctx;
    const ms_lora_target *t = ms_peft_target(s->peft, name);
    if (!t)
        return model_find(&s->base, name, ndim, shape, err);
    const st_file *f;
    const st_tensor *in = lora_input(s, t, &f);
    return tensor_shape(in, f, name, ndim, shape, err);
}

static int lora_read_rows(void *ctx, const char *name, uint64_t row0, uint64_t n_rows, float *out, ms_error *err)
{
    lora_src *s = ctx;
    const ms_lora_target *t = ms_peft_target(s->peft, name);
    if (!t)
        return model_read_rows(&s->base, name, row0, n_rows, out, err);
    const st_file *f;
    const st_tensor *in = lora_input(s, t, &f);
    if (t->kind == MS_LORA_REPLACE)
        return tensor_rows_f32(f, in, s->base.stage, s->base.stage_bytes, row0, n_rows, out, err);
    MS_ASSERT(in->ndim == 2 && in->shape[0] == t->rows && in->shape[1] == t->cols);
    MS_ASSERT(row0 <= t->rows && n_rows <= t->rows - row0);
    if (lora_hold(s, t, err) < 0)
        return -1;
    uint64_t row_bytes = t->cols * (st_dtype_bits(in->dtype) / 8), per = s->base.stage_bytes / row_bytes;
    uint64_t off = st_file_tensor_offset(f, in);
    for (uint64_t done = 0; done < n_rows; done += per) {
        uint64_t k = n_rows - done < per ? n_rows - done : per;
        if (ms_pread_exact(f->fd, f->path, s->base.stage, (size_t)(k * row_bytes), off + (row0 + done) * row_bytes,
                           err) < 0)
            return -1;
        cpu_lora_rows(s->lora, s->base.stage, in->dtype, row0 + done, k, out + done * t->cols, s->pool);
    }
    return 0;
}

static void lora_close(void *ctx)
{
    lora_src *s = ctx;
    if (!s)
        return;
    cpu_lora_close(s->lora);
    free(s->base.stage);
    free(s->where);
    free(s);
}

int ms_llama_source_lora(const ms_model *m, const ms_peft *peft, cpu_pool *pool, const char *where,
                         ms_llama_source *out, ms_error *err)
{
    *out = (ms_llama_source){0};
    /* The stage holds at least one row of every target; the factors of the
     * largest target, with their raw bytes while they are prepared, are
     * the rest of what the source holds. */
    uint64_t stage = SRC_STAGE_BYTES, factors = 0;
    for (size_t i = 0; i < ms_peft_n_targets(peft); i++) {
        const ms_lora_target *t = ms_peft_target_at(peft, i);
        if (t->kind == MS_LORA_REPLACE)
            continue;
        uint64_t row = 4 * t->cols, f = cpu_lora_host_bytes(t) + st_tensor_nbytes(t->A) + st_tensor_nbytes(t->B);
        if (t->magnitude)
            f += st_tensor_nbytes(t->magnitude);
        stage = row > stage ? row : stage;
        factors = f > factors ? f : factors;
    }
    lora_src *s = calloc(1, sizeof *s);
    if (s) {
        s->base.stage = malloc((size_t)stage);
        s->where = strdup(where);
    }
    if (!s || !s->base.stage || !s->where) {
        lora_close(s);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, where, "cannot allocate the read buffer");
    }
    s->base.m = m;
    s->base.stage_bytes = stage;
    s->peft = peft;
    s->pool = pool;
    *out = (ms_llama_source){.ctx = s, .where = s->where, .find = lora_find, .read_rows = lora_read_rows,
                             .close = lora_close, .host_bytes = stage + factors, .uses_pool = pool != NULL};
    return 0;
}

/* ============================================================ MODEL = BASE+ADAPTER */

static bool is_adapter_dir(const char *path)
{
    struct stat st;
    char *cfg = NULL;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode) || asprintf(&cfg, "%s/adapter_config.json", path) < 0)
        return false;
    bool yes = stat(cfg, &st) == 0 && S_ISREG(st.st_mode);
    free(cfg);
    return yes;
}

int ms_llama_model_split(const char *model, char **base, char **adapter, ms_error *err)
{
    *base = *adapter = NULL;
    const char *split = NULL; /* the '+' chosen */
    if (access(model, F_OK) != 0) {
        const char *first_fit = NULL;
        for (const char *p = model + strlen(model); p > model && !split;) {
            p--;
            if (*p != '+' || p == model || !p[1] || !is_adapter_dir(p + 1))
                continue;
            char *left = strndup(model, (size_t)(p - model));
            if (!left)
                return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, model, "cannot split the model path");
            if (access(left, F_OK) == 0)
                split = p;
            else if (!first_fit)
                first_fit = p;
            free(left);
        }
        split = split ? split : first_fit;
        const char *last = strrchr(model, '+');
        if (!split && last) {
            const char *right = last + 1;
            return ms_error_set(err, MS_EXIT_DATA, model,
                                "no such file or directory, and not BASE_DIR+ADAPTER_DIR: '%s' after the last '+' %s",
                                right, !*right ? "is empty"
                                       : access(right, F_OK) != 0 ? "does not exist"
                                                                  : "is not a PEFT adapter directory (no "
                                                                    "adapter_config.json)");
        }
    }
    *base = split ? strndup(model, (size_t)(split - model)) : strdup(model);
    *adapter = split ? strdup(split + 1) : NULL;
    if (!*base || (split && !*adapter)) {
        free(*base);
        free(*adapter);
        *base = *adapter = NULL;
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, model, "cannot split the model path");
    }
    return 0;
}

/* ============================================================ checks and loads */

static int expect(const ms_llama_source *src, const char *name, unsigned ndim, uint64_t d0, uint64_t d1,
                  ms_error *err)
{
    unsigned got_ndim = 0;
    uint64_t shape[2] = {0, 0};
    int rc = src->find(src->ctx, name, &got_ndim, shape, err);
    if (rc < 0)
        return -1;
    if (rc == 0)
        return ms_error_set(err, MS_EXIT_DATA, src->where, "tensor '%s' is missing", name);
    if (got_ndim != ndim || shape[0] != d0 || (ndim == 2 && shape[1] != d1)) {
        char want[64], got[64];
        if (ndim == 2)
            snprintf(want, sizeof want, "[%" PRIu64 ", %" PRIu64 "]", d0, d1);
        else
            snprintf(want, sizeof want, "[%" PRIu64 "]", d0);
        if (got_ndim == 2)
            snprintf(got, sizeof got, "[%" PRIu64 ", %" PRIu64 "]", shape[0], shape[1]);
        else
            snprintf(got, sizeof got, "[%" PRIu64 "]", shape[0]);
        return ms_error_set(err, MS_EXIT_DATA, src->where, "tensor '%s' has shape %s, config.json implies %s", name,
                            got, want);
    }
    return 0;
}

typedef struct layer_tensor {
    const char *suffix; /* after "model.layers.L." */
    unsigned ndim;
    uint64_t d0, d1;
    float *dst;
} layer_tensor;

/* The tensors of layer l and where each goes in w (w may be zeroed: only the
 * names and shapes are used then). Returns how many. */
static unsigned layer_tensors(const cpu_llama_config *c, const cpu_llama_layer *w, layer_tensor out[16])
{
    uint64_t H = c->hidden, Q = cpu_llama_q_dim(c), KV = cpu_llama_kv_dim(c), I = c->intermediate;
    unsigned n = 0;
    out[n++] = (layer_tensor){"input_layernorm.weight", 1, H, 0, w->attn_norm};
    out[n++] = (layer_tensor){"self_attn.q_proj.weight", 2, Q, H, w->w_qkv};
    out[n++] = (layer_tensor){"self_attn.k_proj.weight", 2, KV, H, w->w_qkv ? w->w_qkv + Q * H : NULL};
    out[n++] = (layer_tensor){"self_attn.v_proj.weight", 2, KV, H, w->w_qkv ? w->w_qkv + (Q + KV) * H : NULL};
    if (c->qkv_bias) {
        out[n++] = (layer_tensor){"self_attn.q_proj.bias", 1, Q, 0, w->b_qkv};
        out[n++] = (layer_tensor){"self_attn.k_proj.bias", 1, KV, 0, w->b_qkv ? w->b_qkv + Q : NULL};
        out[n++] = (layer_tensor){"self_attn.v_proj.bias", 1, KV, 0, w->b_qkv ? w->b_qkv + Q + KV : NULL};
    }
    out[n++] = (layer_tensor){"self_attn.o_proj.weight", 2, H, Q, w->w_o};
    if (c->o_bias)
        out[n++] = (layer_tensor){"self_attn.o_proj.bias", 1, H, 0, w->b_o};
    out[n++] = (layer_tensor){"post_attention_layernorm.weight", 1, H, 0, w->mlp_norm};
    out[n++] = (layer_tensor){"mlp.gate_proj.weight", 2, I, H, w->w_gate_up};
    out[n++] = (layer_tensor){"mlp.up_proj.weight", 2, I, H, w->w_gate_up ? w->w_gate_up + I * H : NULL};
    out[n++] = (layer_tensor){"mlp.down_proj.weight", 2, H, I, w->w_down};
    if (c->mlp_bias) {
        out[n++] = (layer_tensor){"mlp.gate_proj.bias", 1, I, 0, w->b_gate_up};
        out[n++] = (layer_tensor){"mlp.up_proj.bias", 1, I, 0, w->b_gate_up ? w->b_gate_up + I : NULL};
        out[n++] = (layer_tensor){"mlp.down_proj.bias", 1, H, 0, w->b_down};
    }
    return n;
}

const char *ms_llama_head_name(const cpu_llama_config *c)
{
    return c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
}

int ms_llama_check(const ms_llama_source *src, cpu_llama_config *cfg, bool need_head, ms_error *err)
{
    if (expect(src, "model.embed_tokens.weight", 2, cfg->vocab, cfg->hidden, err) < 0 ||
        expect(src, "model.norm.weight", 1, cfg->hidden, 0, err) < 0)
        return -1;
    if (need_head && cfg->tie_embeddings) {
        /* transformers 5 does not tie a checkpoint that has both (it warns
         * when they differ); equal ones give the same logits either way */
        unsigned ndim = 0;
        uint64_t shape[2] = {0, 0};
        int rc = src->find(src->ctx, "lm_head.weight", &ndim, shape, err);
        if (rc < 0)
            return -1;
        if (rc == 1) {
            cfg->tie_embeddings = false;
            ms_log_warn("%s: config.json ties the embeddings (tie_word_embeddings) but lm_head.weight is present: "
                        "the head is lm_head.weight, not model.embed_tokens.weight, as transformers 5 does",
                        src->where);
        }
    }
    if (need_head && !cfg->tie_embeddings && expect(src, "lm_head.weight", 2, cfg->vocab, cfg->hidden, err) < 0)
        return -1;
    cpu_llama_layer none = {0};
    layer_tensor lt[16];
    unsigned n = layer_tensors(cfg, &none, lt);
    for (uint64_t l = 0; l < cfg->n_layers; l++) {
        for (unsigned k = 0; k < n; k++) {
            char name[256];
            snprintf(name, sizeof name, "model.layers.%" PRIu64 ".%s", l, lt[k].suffix);
            if (expect(src, name, lt[k].ndim, lt[k].d0, lt[k].d1, err) < 0)
                return -1;
        }
    }
    return 0;
}

int ms_llama_layer_load(const ms_llama_source *src, const cpu_llama_config *cfg, uint64_t layer,
                        cpu_llama_layer *w, ms_error *err)
{
    layer_tensor lt[16];
    unsigned n = layer_tensors(cfg, w, lt);
    for (unsigned k = 0; k < n; k++) {
        char name[256];
        snprintf(name, sizeof name, "model.layers.%" PRIu64 ".%s", layer, lt[k].suffix);
        MS_ASSERT(lt[k].dst);
        if (src->read_rows(src->ctx, name, 0, lt[k].ndim == 2 ? lt[k].d0 : 1, lt[k].dst, err) < 0)
            return -1;
    }
    return 0;
}
