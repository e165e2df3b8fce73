/* gen_model: deterministic Llama-shaped random models for tests, benchmarks
 * and the demo (DESIGN.md, Tests and checks: fixtures are generated, never
 * committed).
 *
 *   gen_model base OUTDIR ...      a base model directory
 *   gen_model finetune BASE OUT .. BASE plus structured deltas
 *   gen_model lora BASE OUT ...    a PEFT LoRA adapter for BASE
 *
 * (gen_model --help lists the options.)
 *
 * Determinism: every element is a pure function of (seed, tensor name, flat
 * element index): a counter-based splitmix64 stream keyed by
 * XXH3_64bits_withSeed(name, seed). So the bytes never depend on chunking,
 * sharding or the machine, and a tensor can be regenerated alone.
 *
 * Values:
 *   - base weights ~ N(0, 0.02), norm weights 1 + N(0, 0.02). The normal is
 *     the Irwin-Hall sum of four 16-bit uniforms, scaled to unit variance
 *     (bounded at +-3.46 sigma; plenty for test data, and one splitmix64 call
 *     per element keeps 1 GB at a few seconds);
 *   - fine-tune: base + delta per element: untouched (delta exactly 0, so the
 *     element's bytes equal the base's when the dtype is the same) with
 *     probability 1 - touched_fraction; else delta ~ N(0, delta_scale), or
 *     N(0, 20 * delta_scale) for an outlier_fraction of the touched ones.
 *     --extra-vocab rows are fresh N(0, 0.02) rows (the added-tokens case);
 *   - LoRA: A ~ N(0, 0.02) [r, in], B ~ N(0, 0.01) [out, r], so the task vector
 *     (alpha / r) B A is non-zero and small.
 *
 * Tensor order is LlamaForCausalLM's: model.embed_tokens.weight; per layer
 * input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
 * mlp.{gate,up,down}_proj; model.norm.weight; lm_head.weight unless tied.
 * --sorted-order writes them sorted by name instead, as the safetensors
 * serializer orders real Hugging Face checkpoints.
 *
 * Memory is bounded: each tensor streams through CHUNK_ELEMS-element buffers.
 * Nothing is printed on success unless -v. Exit codes: 0 ok, 1 runtime
 * failure, 2 usage error, 3 invalid input model. */
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cpu/cpu_kernel.h"
#include "io/atomic_file.h"
#include "io/checksum.h"
#include "io/model_dir.h"
#include "io/ms_error.h"
#include "io/st_format.h"
#include "io/st_writer.h"
#include "pipeline/merge_math.h"
#include "pipeline/size_parse.h"

#define CHUNK_ELEMS (1u << 20) /* elements per streaming step: 4 MiB of fp32 */
#define BASE_STD 0.02f
#define LORA_A_STD 0.02f
#define LORA_B_STD 0.01f
#define OUTLIER_FACTOR 20.0f
#define TOKENIZER_TOKENS 512 /* tokens listed in the dummy tokenizer.json */

static bool g_verbose;

/* ============================================================ randomness */

#define GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The e-th output of the splitmix64 stream keyed by key: counter-based. */
static inline uint64_t stream_at(uint64_t key, uint64_t e) { return mix64(key + (e + 1) * GOLDEN); }

/* A standard normal (approximately): four 16-bit uniforms summed, centred,
 * scaled to variance 1 (each (k + 0.5) / 65536 has variance 1/12). */
static inline float normal_from(uint64_t r)
{
    uint32_t s = (uint32_t)(r & 0xffff) + (uint32_t)((r >> 16) & 0xffff) + (uint32_t)((r >> 32) & 0xffff) +
                 (uint32_t)(r >> 48);
    return ((float)s + 2.0f - 131072.0f) * (1.7320508f / 65536.0f);
}

/* The hot loops. They run over blocks of GEN_BLOCK elements with a fixed trip
 * count, which gcc's -O2 vectorizer takes (4x faster here), and are cloned
 * for AVX-512 / AVX2. The arithmetic is integer plus exact or correctly
 * rounded fp32 operations with no contraction (-ffp-contract=off), so every
 * clone and every tail writes the same bits. */
#define GEN_BLOCK 16

/* f[i] = add + scale * normal(stream key, element e0 + i). */
CPU_CLONES static void normals_fill(float *restrict f, size_t n, uint64_t key, uint64_t e0, float add, float scale)
{
    size_t i = 0;
    for (; i + GEN_BLOCK <= n; i += GEN_BLOCK)
        for (size_t k = 0; k < GEN_BLOCK; k++)
            f[i + k] = add + scale * normal_from(stream_at(key, e0 + i + k));
    for (; i < n; i++)
        f[i] = add + scale * normal_from(stream_at(key, e0 + i));
}

/* Fine-tune deltas on f[0..n) (elements e0...): an element whose pick is at
 * or above touched_below keeps its exact value (also -0.0); below
 * outlier_below the delta is `big` sigma, else `small`. */
static inline float delta_one(float v, uint64_t pick_key, uint64_t value_key, uint64_t e, uint32_t touched_below,
                              uint32_t outlier_below, float small, float big)
{
    /* Selections by bit masks rather than branches: the vectorizer takes them. */
    uint32_t pick = (uint32_t)(stream_at(pick_key, e) >> 32);
    uint32_t outlier = 0u - (uint32_t)(pick < outlier_below), touched = 0u - (uint32_t)(pick < touched_below);
    float s = ms_f32_from_bits((ms_f32_bits(big) & outlier) | (ms_f32_bits(small) & ~outlier));
    float d = v + s * normal_from(stream_at(value_key, e));
    return ms_f32_from_bits((ms_f32_bits(d) & touched) | (ms_f32_bits(v) & ~touched));
}

CPU_CLONES static void deltas_add(float *restrict f, size_t n, uint64_t pick_key, uint64_t value_key, uint64_t e0,
                                  uint32_t touched_below, uint32_t outlier_below, float small, float big)
{
    size_t i = 0;
    for (; i + GEN_BLOCK <= n; i += GEN_BLOCK)
        for (size_t k = 0; k < GEN_BLOCK; k++)
            f[i + k] = delta_one(f[i + k], pick_key, value_key, e0 + i + k, touched_below, outlier_below, small, big);
    for (; i < n; i++)
        f[i] = delta_one(f[i], pick_key, value_key, e0 + i, touched_below, outlier_below, small, big);
}

/* Independent streams per (seed, tensor, purpose). */
enum stream_domain {
    DOMAIN_BASE = 0,
    DOMAIN_DELTA_PICK = 0x6b1d,
    DOMAIN_DELTA_VALUE = 0x2f77,
    DOMAIN_EXTRA_ROWS = 0x51c3,
};

static uint64_t tensor_key(const char *name, uint64_t seed, enum stream_domain domain)
{
    uint64_t h = ms_hash64_seed(name, strlen(name), seed);
    return domain == DOMAIN_BASE ? h : mix64(h ^ ((uint64_t)domain << 32));
}

/* ============================================================ dtypes */

typedef struct dtype_info {
    const char *flag;  /* --dtype value */
    const char *torch; /* config.json torch_dtype */
    st_dtype dtype;
} dtype_info;

static const dtype_info k_dtypes[] = {
    {"bf16", "bfloat16", ST_BF16},
    {"f16", "float16", ST_F16},
    {"f32", "float32", ST_F32},
};

static const dtype_info *dtype_by_flag(const char *flag)
{
    for (size_t i = 0; i < sizeof k_dtypes / sizeof k_dtypes[0]; i++)
        if (strcmp(k_dtypes[i].flag, flag) == 0)
            return &k_dtypes[i];
    return NULL;
}

static const dtype_info *dtype_by_st(st_dtype d)
{
    for (size_t i = 0; i < sizeof k_dtypes / sizeof k_dtypes[0]; i++)
        if (k_dtypes[i].dtype == d)
            return &k_dtypes[i];
    return NULL;
}

CPU_CLONES static void floats_to_bf16(const float *restrict in, size_t n, uint16_t *restrict o)
{
    size_t i = 0;
    for (; i + GEN_BLOCK <= n; i += GEN_BLOCK)
        for (size_t k = 0; k < GEN_BLOCK; k++)
            o[i + k] = ms_f32_to_bf16(in[i + k]);
    for (; i < n; i++)
        o[i] = ms_f32_to_bf16(in[i]);
}

/* n floats -> little-endian dtype bytes (round to nearest even). */
static void floats_store(const float *in, size_t n, st_dtype d, void *out)
{
    if (d == ST_F32) {
        memcpy(out, in, n * sizeof *in); /* little-endian host (x86-64, aarch64) */
    } else if (d == ST_BF16) {
        floats_to_bf16(in, n, out);
    } else {
        uint16_t *o = out;
        for (size_t i = 0; i < n; i++)
            o[i] = ms_f32_to_f16(in[i]);
    }
}

CPU_CLONES static void bf16_to_floats(const uint16_t *restrict h, size_t n, float *restrict out)
{
    size_t i = 0;
    for (; i + GEN_BLOCK <= n; i += GEN_BLOCK)
        for (size_t k = 0; k < GEN_BLOCK; k++)
            out[i + k] = ms_bf16_to_f32(h[i + k]);
    for (; i < n; i++)
        out[i] = ms_bf16_to_f32(h[i]);
}

static void floats_load(const void *in, size_t n, st_dtype d, float *out)
{
    if (d == ST_F32) {
        memcpy(out, in, n * sizeof *out);
    } else if (d == ST_BF16) {
        bf16_to_floats(in, n, out);
    } else {
        const uint16_t *h = in;
        for (size_t i = 0; i < n; i++)
            out[i] = ms_f16_to_f32(h[i]);
    }
}

/* ============================================================ the shape */

typedef struct llama_config {
    uint64_t layers, hidden, intermediate, heads, kv_heads, vocab;
    bool tied;
    double rope_theta, rms_eps;
    uint64_t max_pos;
} llama_config;

static void preset_fixed(llama_config *c, uint64_t layers, uint64_t hidden, uint64_t inter, uint64_t heads,
                         uint64_t kv, uint64_t vocab, bool tied, bool llama3)
{
    *c = (llama_config){layers, hidden, inter, heads, kv, vocab, tied,
                        llama3 ? 500000.0 : 10000.0, 1e-5, llama3 ? 131072 : 2048};
}

static uint64_t round_up(uint64_t v, uint64_t m) { return (v + m - 1) / m * m; }

/* Parameters of one decoder layer and of the rest of the model. */
static uint64_t layer_params(const llama_config *c)
{
    uint64_t head_dim = c->hidden / c->heads, kv_dim = c->kv_heads * head_dim;
    return 2 * c->hidden * c->hidden + 2 * c->hidden * kv_dim + 3 * c->hidden * c->intermediate + 2 * c->hidden;
}

static uint64_t outer_params(const llama_config *c)
{
    return (c->tied ? 1 : 2) * c->vocab * c->hidden + c->hidden;
}

/* "sized:BYTES": the smallest width from a Llama-like ladder whose layer
 * count stays within depth ~ width / 128 (at least 2), then the layer count
 * that brings the total nearest to BYTES. head_dim 64, a quarter as many KV
 * heads where that divides, intermediate ~ 2.6875 * hidden (Llama-2's ratio),
 * vocabulary 16 * hidden capped at 32000. */
static void preset_sized(llama_config *c, uint64_t bytes, unsigned elem_bytes)
{
    static const uint64_t k_widths[] = {64, 128, 256, 512, 768, 1024, 1536, 2048, 2560,
                                        3072, 4096, 5120, 6144, 8192};
    const size_t n_widths = sizeof k_widths / sizeof k_widths[0];
    uint64_t target = bytes / elem_bytes;
    for (size_t i = 0; i < n_widths; i++) {
        uint64_t h = k_widths[i], heads = h / 64;
        uint64_t vocab = round_up(h * 16 < 256 ? 256 : (h * 16 > 32000 ? 32000 : h * 16), 64);
        preset_fixed(c, 1, h, round_up(h * 43 / 16, 64), heads, heads % 4 == 0 ? heads / 4 : heads, vocab, false,
                     false);
        uint64_t outer = outer_params(c), per = layer_params(c);
        uint64_t layers = target > outer ? (target - outer + per / 2) / per : 0;
        c->layers = layers < 1 ? 1 : layers;
        uint64_t max_layers = h / 128 < 2 ? 2 : h / 128;
        if (c->layers <= max_layers)
            return;
    }
    /* The widest model: as deep as it takes. */
}

/* ============================================================ small helpers */

static int usage_error(ms_error *err, const char *where, const char *what)
{
    return ms_error_set(err, MS_EXIT_USAGE, where, "%s (see gen_model --help)", what);
}

static int parse_u64(const char *flag, const char *text, uint64_t lo, uint64_t hi, uint64_t *out, ms_error *err)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = text ? strtoull(text, &end, 0) : 0;
    if (!text || !*text || *end || errno || text[0] == '-' || v < lo || v > hi)
        return ms_error_set(err, MS_EXIT_USAGE, flag, "expected an integer in [%" PRIu64 ", %" PRIu64 "], got '%s'",
                            lo, hi, text ? text : "");
    *out = v;
    return 0;
}

static int parse_f64(const char *flag, const char *text, double lo, double hi, double *out, ms_error *err)
{
    char *end = NULL;
    errno = 0;
    double v = text ? strtod(text, &end) : 0;
    if (!text || !*text || *end || errno || !(v >= lo && v <= hi))
        return ms_error_set(err, MS_EXIT_USAGE, flag, "expected a number in [%g, %g], got '%s'", lo, hi,
                            text ? text : "");
    *out = v;
    return 0;
}

static char *path_in(const char *dir, const char *name)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0)
        return NULL;
    return p;
}

/* mkdir -p. Returns 0 or -errno. */
static int mkdir_parents(const char *dir)
{
    char *p = strdup(dir);
    if (!p)
        return -ENOMEM;
    int rc = 0;
    for (char *s = p + 1; rc == 0; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0755) < 0 && errno != EEXIST)
            rc = -errno;
        *s = c;
        if (c == '\0')
            break;
    }
    free(p);
    return rc;
}

/* The output directory: created with its parents if missing; must be empty
 * unless force, which removes the files gen_model writes (and only those). */
static int outdir_prepare(const char *dir, bool force, ms_error *err)
{
    int mk = mkdir_parents(dir);
    if (mk < 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, -mk, dir, "cannot create the output directory");
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot open the output directory");
    static const char *const k_ours[] = {
        "model*.safetensors*", "adapter_model*.safetensors*", "config.json", "generation_config.json",
        "tokenizer.json",      "tokenizer_config.json",       "adapter_config.json",
    };
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        bool ours = false;
        for (size_t i = 0; i < sizeof k_ours / sizeof k_ours[0]; i++)
            ours |= fnmatch(k_ours[i], e->d_name, 0) == 0;
        if (!force) {
            rc = ms_error_set(err, MS_EXIT_USAGE, dir, "output directory is not empty (--force replaces a model in it)");
            break;
        }
        if (!ours)
            continue;
        char *p = path_in(dir, e->d_name);
        if (!p || unlink(p) < 0) {
            rc = ms_error_errno(err, MS_EXIT_RUNTIME, p ? errno : ENOMEM, p ? p : dir, "cannot remove");
            free(p);
            break;
        }
        free(p);
    }
    closedir(d);
    return rc;
}

/* Side files written so far, removed again if the run fails. */
typedef struct side_files {
    char *paths[8];
    unsigned n;
} side_files;

static int side_json(side_files *sf, const char *dir, const char *name, cJSON *json, ms_error *err)
{
    char *text = cJSON_Print(json);
    char *path = path_in(dir, name);
    int rc = -1;
    if (!text || !path) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot format %s", name);
        goto done;
    }
    size_t len = strlen(text);
    text[len] = '\n'; /* replaces the NUL: files end with a newline */
    rc = ms_atomic_write_file(path, text, len + 1, err);
    if (rc == 0) {
        MS_ASSERT(sf->n < sizeof sf->paths / sizeof sf->paths[0]);
        sf->paths[sf->n++] = path;
        path = NULL;
    }
done:
    free(text);
    free(path);
    return rc;
}

static int side_copy(side_files *sf, const char *from_dir, const char *dir, const char *name, ms_error *err)
{
    char *src = path_in(from_dir, name), *dst = path_in(dir, name);
    int rc = -1;
    if (!src || !dst) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot copy %s", name);
    } else if (access(src, F_OK) != 0) {
        rc = 0; /* the base has none: nothing to copy */
    } else if ((rc = ms_copy_file_atomic(src, dst, err)) == 0) {
        MS_ASSERT(sf->n < sizeof sf->paths / sizeof sf->paths[0]);
        sf->paths[sf->n++] = dst;
        dst = NULL;
    }
    free(src);
    free(dst);
    return rc;
}

static void side_files_end(side_files *sf, bool remove_them)
{
    for (unsigned i = 0; i < sf->n; i++) {
        if (remove_them)
            unlink(sf->paths[i]);
        free(sf->paths[i]);
    }
    sf->n = 0;
}

/* ============================================================ tensor jobs */

/* How one output tensor's values are made. */
typedef enum job_kind {
    JOB_NORMAL,   /* scale * N(0, 1) */
    JOB_NORM,     /* 1 + scale * N(0, 1) */
    JOB_FINETUNE, /* base + delta (base read from a file), extra rows fresh */
    JOB_COPY,     /* the base's bytes, unchanged (non-float tensors) */
} job_kind;

typedef struct job {
    char *name;
    job_kind kind;
    unsigned ndim;
    uint64_t shape[ST_MAX_DIMS];
    st_dtype dtype;
    float scale;
    uint64_t key; /* base values, or the delta pick stream */
    /* JOB_FINETUNE / JOB_COPY: where the base tensor lies */
    const st_file *base_file;
    const st_tensor *base;
    uint64_t key_value, key_extra;
} job;

typedef struct job_list {
    job *jobs;
    size_t n, cap;
} job_list;

static job *job_add(job_list *l, const char *name, job_kind kind, st_dtype dtype, unsigned ndim,
                    const uint64_t *shape, ms_error *err)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        job *p = realloc(l->jobs, cap * sizeof *p);
        if (!p) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot plan the tensor");
            return NULL;
        }
        l->jobs = p;
        l->cap = cap;
    }
    job *j = &l->jobs[l->n];
    *j = (job){.name = strdup(name), .kind = kind, .ndim = ndim, .dtype = dtype, .scale = BASE_STD};
    if (!j->name) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot plan the tensor");
        return NULL;
    }
    memcpy(j->shape, shape, ndim * sizeof *shape);
    l->n++;
    return j;
}

static void job_list_free(job_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->jobs[i].name);
    free(l->jobs);
}

static int cmp_job_name(const void *a, const void *b)
{
    return strcmp(((const job *)a)->name, ((const job *)b)->name);
}

/* Fine-tune parameters, shared by every JOB_FINETUNE. */
typedef struct delta_params {
    uint32_t touched_below; /* pick < this: touched */
    uint32_t outlier_below; /* pick < this: an outlier (a subset of touched) */
    float scale;
} delta_params;

typedef struct gen_buffers {
    float *f;           /* CHUNK_ELEMS floats */
    unsigned char *out; /* CHUNK_ELEMS * 4 bytes */
    unsigned char *in;  /* CHUNK_ELEMS * 4 bytes: base bytes */
} gen_buffers;

static int read_exact(const st_file *f, uint64_t offset, void *buf, size_t len, ms_error *err)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = pread(f->fd, p, len, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return ms_error_errno(err, MS_EXIT_RUNTIME, errno, f->path, "read failed");
        if (n == 0)
            return ms_error_set(err, MS_EXIT_DATA, f->path, "file ended early (changed while reading?)");
        p += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

/* Fills g->f with elements [e0, e0 + n) of the job's values. */
static int job_values(const job *j, const delta_params *dp, uint64_t e0, size_t n, gen_buffers *g, ms_error *err)
{
    float *f = g->f;
    if (j->kind == JOB_NORMAL || j->kind == JOB_NORM) {
        normals_fill(f, n, j->key, e0, j->kind == JOB_NORM ? 1.0f : 0.0f, j->scale);
        return 0;
    }
    MS_ASSERT(j->kind == JOB_FINETUNE);
    uint64_t base_numel = j->base->numel;
    size_t from_base = e0 >= base_numel ? 0 : (size_t)(base_numel - e0 < n ? base_numel - e0 : n);
    if (from_base) {
        unsigned esz = st_dtype_bits(j->base->dtype) / 8;
        uint64_t off = st_file_tensor_offset(j->base_file, j->base) + e0 * esz;
        if (read_exact(j->base_file, off, g->in, from_base * esz, err) < 0)
            return -1;
        floats_load(g->in, from_base, j->base->dtype, f);
        deltas_add(f, from_base, j->key, j->key_value, e0, dp->touched_below, dp->outlier_below, dp->scale,
                   dp->scale * OUTLIER_FACTOR);
    }
    if (from_base < n) /* added-token rows */
        normals_fill(f + from_base, n - from_base, j->key_extra, e0 + from_base, 0.0f, BASE_STD);
    return 0;
}

/* Streams one job into the writer as tensor t, hashing as it goes. */
static int job_write(const job *j, size_t t, const st_plan *plan, st_writer *w, const delta_params *dp,
                     gen_buffers *g, ms_hasher *h, ms_error *err)
{
    const st_plan_tensor *pt = st_plan_tensor_at(plan, t);
    ms_hasher_reset(h);
    if (j->kind == JOB_COPY) { /* raw bytes: any dtype, sub-byte ones included */
        const uint64_t step = CHUNK_ELEMS * 4u;
        for (uint64_t b = 0; b < pt->nbytes; b += step) {
            size_t n = (size_t)(pt->nbytes - b < step ? pt->nbytes - b : step);
            if (read_exact(j->base_file, st_file_tensor_offset(j->base_file, j->base) + b, g->out, n, err) < 0)
                return -1;
            ms_hasher_update(h, g->out, n);
            if (st_writer_write(w, t, b, g->out, n, err) < 0)
                return -1;
        }
    } else {
        unsigned esz = st_dtype_bits(pt->dtype) / 8;
        for (uint64_t e0 = 0; e0 < pt->numel; e0 += CHUNK_ELEMS) {
            size_t n = (size_t)(pt->numel - e0 < CHUNK_ELEMS ? pt->numel - e0 : CHUNK_ELEMS);
            if (job_values(j, dp, e0, n, g, err) < 0)
                return -1;
            floats_store(g->f, n, pt->dtype, g->out);
            ms_hasher_update(h, g->out, n * esz);
            if (st_writer_write(w, t, e0 * esz, g->out, (uint64_t)n * esz, err) < 0)
                return -1;
        }
    }
    st_writer_set_tensor_hash(w, t, ms_hasher_digest(h));
    return 0;
}

/* Plans, writes and finishes the weights file(s) of jobs into dir. On success
 * *writer_out holds the finished writer (close it to keep the files, abort it
 * to remove them). */
static int write_weights(const job_list *jobs, const char *dir, const char *stem, uint64_t shard_limit,
                         const delta_params *dp, st_plan **plan_out, st_writer **writer_out, ms_error *err)
{
    st_plan *plan = NULL;
    st_writer *w = NULL;
    gen_buffers g = {0};
    ms_hasher h = {0};
    if (st_plan_create(shard_limit, &plan, err) < 0)
        goto fail;
    if (st_plan_set_stem(plan, stem, err) < 0)
        goto fail;
    for (size_t i = 0; i < jobs->n; i++) {
        const job *j = &jobs->jobs[i];
        if (st_plan_add_tensor(plan, j->name, j->dtype, j->ndim, j->shape, NULL, err) < 0)
            goto fail;
    }
    if (st_plan_layout(plan, err) < 0 || st_writer_open(plan, dir, &w, err) < 0)
        goto fail;
    g.f = malloc(CHUNK_ELEMS * sizeof *g.f);
    g.out = malloc(CHUNK_ELEMS * 8u);
    g.in = malloc(CHUNK_ELEMS * 8u);
    if (!g.f || !g.out || !g.in || ms_hasher_init(&h) < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot allocate generation buffers");
        goto fail;
    }
    for (size_t i = 0; i < jobs->n; i++)
        if (job_write(&jobs->jobs[i], i, plan, w, dp, &g, &h, err) < 0)
            goto fail;
    if (st_writer_finish(w, err) < 0)
        goto fail;
    free(g.f);
    free(g.out);
    free(g.in);
    ms_hasher_free(&h);
    *plan_out = plan;
    *writer_out = w;
    return 0;
fail:
    st_writer_abort(w);
    st_plan_free(plan);
    free(g.f);
    free(g.out);
    free(g.in);
    ms_hasher_free(&h);
    return -1;
}

/* ============================================================ the base model */

typedef struct gen_options {
    /* common */
    const dtype_info *dtype; /* NULL: the preset's (bf16) or the base's */
    uint64_t seed;
    bool have_seed;
    uint64_t shard_limit; /* UINT64_MAX: one file */
    bool force;
    bool sorted;
    /* base */
    const char *preset;
    uint64_t layers, hidden, intermediate, heads, kv_heads, vocab; /* 0: the preset's */
    bool tie;
    /* finetune */
    double delta_scale, touched, outliers;
    uint64_t extra_vocab;
    /* lora */
    uint64_t rank;
    double alpha;
    bool have_alpha;
    const char *targets;
    bool rslora, dora, lora_embeddings;
    const char *modules_to_save;            /* comma-separated module paths */
    const char *rank_pattern, *alpha_pattern; /* "v_proj=4,o_proj=2" */
} gen_options;

static int config_from_options(const gen_options *o, llama_config *c, ms_error *err)
{
    const char *p = o->preset ? o->preset : "tiny";
    unsigned elem = o->dtype ? st_dtype_bits(o->dtype->dtype) / 8 : 2;
    if (strcmp(p, "tiny") == 0) {
        preset_fixed(c, 2, 64, 128, 4, 2, 256, false, false);
    } else if (strcmp(p, "small") == 0) {
        preset_fixed(c, 4, 256, 688, 8, 4, 1024, false, false);
    } else if (strcmp(p, "llama-1b") == 0) {
        preset_fixed(c, 16, 2048, 8192, 32, 8, 128256, true, true);
    } else if (strcmp(p, "llama-8b") == 0) {
        preset_fixed(c, 32, 4096, 14336, 32, 8, 128256, false, true);
    } else if (strncmp(p, "sized:", 6) == 0) {
        uint64_t bytes = 0;
        if (ms_size_parse(p + 6, &bytes) < 0 || bytes == 0)
            return usage_error(err, "--preset", "sized: needs a size such as sized:1G or sized:500MB");
        preset_sized(c, bytes, elem);
    } else {
        return usage_error(err, "--preset", "unknown preset (tiny, small, llama-1b, llama-8b, sized:BYTES)");
    }
    if (o->layers)
        c->layers = o->layers;
    if (o->hidden)
        c->hidden = o->hidden;
    if (o->intermediate)
        c->intermediate = o->intermediate;
    if (o->heads)
        c->heads = o->heads;
    if (o->kv_heads)
        c->kv_heads = o->kv_heads;
    if (o->vocab)
        c->vocab = o->vocab;
    if (o->tie)
        c->tied = true;
    if (c->hidden % c->heads != 0)
        return usage_error(err, "--hidden", "must be a multiple of --heads");
    if (c->heads % c->kv_heads != 0)
        return usage_error(err, "--kv-heads", "must divide --heads");
    return 0;
}

static const char *layer_tensor_names[] = {
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
};

static int base_jobs(const llama_config *c, st_dtype dtype, uint64_t seed, job_list *jobs, ms_error *err)
{
    uint64_t head_dim = c->hidden / c->heads, kv_dim = c->kv_heads * head_dim, q_dim = c->heads * head_dim;
    char name[160];
    uint64_t emb[2] = {c->vocab, c->hidden};
    if (!job_add(jobs, "model.embed_tokens.weight", JOB_NORMAL, dtype, 2, emb, err))
        return -1;
    for (uint64_t l = 0; l < c->layers; l++) {
        for (size_t k = 0; k < sizeof layer_tensor_names / sizeof layer_tensor_names[0]; k++) {
            const char *t = layer_tensor_names[k];
            uint64_t shape[2] = {c->hidden, c->hidden};
            unsigned ndim = 2;
            job_kind kind = JOB_NORMAL;
            if (strstr(t, "layernorm")) {
                ndim = 1;
                kind = JOB_NORM;
            } else if (!strcmp(t, "self_attn.q_proj")) {
                shape[0] = q_dim;
            } else if (!strcmp(t, "self_attn.k_proj") || !strcmp(t, "self_attn.v_proj")) {
                shape[0] = kv_dim;
            } else if (!strcmp(t, "self_attn.o_proj")) {
                shape[1] = q_dim;
            } else if (!strcmp(t, "mlp.gate_proj") || !strcmp(t, "mlp.up_proj")) {
                shape[0] = c->intermediate;
            } else if (!strcmp(t, "mlp.down_proj")) {
                shape[1] = c->intermediate;
            }
            snprintf(name, sizeof name, "model.layers.%" PRIu64 ".%s.weight", l, t);
            if (!job_add(jobs, name, kind, dtype, ndim, shape, err))
                return -1;
        }
    }
    uint64_t norm[1] = {c->hidden};
    if (!job_add(jobs, "model.norm.weight", JOB_NORM, dtype, 1, norm, err))
        return -1;
    if (!c->tied && !job_add(jobs, "lm_head.weight", JOB_NORMAL, dtype, 2, emb, err))
        return -1;
    for (size_t i = 0; i < jobs->n; i++)
        jobs->jobs[i].key = tensor_key(jobs->jobs[i].name, seed, DOMAIN_BASE);
    return 0;
}

static cJSON *config_json(const llama_config *c, const dtype_info *dt)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddFalseToObject(j, "attention_bias");
    cJSON_AddNumberToObject(j, "attention_dropout", 0.0);
    cJSON_AddNumberToObject(j, "bos_token_id", 1);
    cJSON_AddNumberToObject(j, "eos_token_id", 2);
    cJSON_AddNumberToObject(j, "head_dim", (double)(c->hidden / c->heads));
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddNumberToObject(j, "hidden_size", (double)c->hidden);
    cJSON_AddNumberToObject(j, "initializer_range", 0.02);
    cJSON_AddNumberToObject(j, "intermediate_size", (double)c->intermediate);
    cJSON_AddNumberToObject(j, "max_position_embeddings", (double)c->max_pos);
    cJSON_AddFalseToObject(j, "mlp_bias");
    cJSON_AddStringToObject(j, "model_type", "llama");
    cJSON_AddNumberToObject(j, "num_attention_heads", (double)c->heads);
    cJSON_AddNumberToObject(j, "num_hidden_layers", (double)c->layers);
    cJSON_AddNumberToObject(j, "num_key_value_heads", (double)c->kv_heads);
    cJSON_AddNumberToObject(j, "pretraining_tp", 1);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->rms_eps);
    cJSON_AddNullToObject(j, "rope_scaling");
    cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tied);
    cJSON_AddStringToObject(j, "torch_dtype", dt->torch);
    cJSON_AddStringToObject(j, "transformers_version", "4.44.0");
    cJSON_AddTrueToObject(j, "use_cache");
    cJSON_AddNumberToObject(j, "vocab_size", (double)c->vocab);
    return j;
}

static cJSON *generation_config_json(void)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "bos_token_id", 1);
    cJSON_AddNumberToObject(j, "eos_token_id", 2);
    cJSON_AddTrueToObject(j, "do_sample");
    cJSON_AddNumberToObject(j, "temperature", 0.6);
    cJSON_AddNumberToObject(j, "top_p", 0.9);
    cJSON_AddStringToObject(j, "transformers_version", "4.44.0");
    return j;
}

/* A valid but dummy WordLevel tokenizer with min(vocab, TOKENIZER_TOKENS) tokens. */
static cJSON *tokenizer_json(uint64_t vocab)
{
    static const char *const k_special[] = {"<unk>", "<s>", "</s>"};
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "version", "1.0");
    cJSON_AddNullToObject(j, "truncation");
    cJSON_AddNullToObject(j, "padding");
    cJSON *added = cJSON_AddArrayToObject(j, "added_tokens");
    for (int i = 0; i < 3; i++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", i);
        cJSON_AddStringToObject(t, "content", k_special[i]);
        cJSON_AddFalseToObject(t, "single_word");
        cJSON_AddFalseToObject(t, "lstrip");
        cJSON_AddFalseToObject(t, "rstrip");
        cJSON_AddFalseToObject(t, "normalized");
        cJSON_AddTrueToObject(t, "special");
        cJSON_AddItemToArray(added, t);
    }
    cJSON_AddNullToObject(j, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(j, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "Whitespace");
    cJSON_AddNullToObject(j, "post_processor");
    cJSON_AddNullToObject(j, "decoder");
    cJSON *model = cJSON_AddObjectToObject(j, "model");
    cJSON_AddStringToObject(model, "type", "WordLevel");
    cJSON *v = cJSON_AddObjectToObject(model, "vocab");
    uint64_t n = vocab < TOKENIZER_TOKENS ? vocab : TOKENIZER_TOKENS;
    for (uint64_t i = 0; i < n; i++) {
        char tok[32];
        if (i < 3)
            snprintf(tok, sizeof tok, "%s", k_special[i]);
        else
            snprintf(tok, sizeof tok, "tok%" PRIu64, i);
        cJSON_AddNumberToObject(v, tok, (double)i);
    }
    cJSON_AddStringToObject(model, "unk_token", "<unk>");
    return j;
}

static cJSON *tokenizer_config_json(uint64_t max_len)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddTrueToObject(j, "add_bos_token");
    cJSON_AddFalseToObject(j, "add_eos_token");
    cJSON_AddStringToObject(j, "bos_token", "<s>");
    cJSON_AddStringToObject(j, "eos_token", "</s>");
    cJSON_AddStringToObject(j, "unk_token", "<unk>");
    cJSON_AddFalseToObject(j, "clean_up_tokenization_spaces");
    cJSON_AddNumberToObject(j, "model_max_length", (double)max_len);
    cJSON_AddStringToObject(j, "tokenizer_class", "PreTrainedTokenizerFast");
    return j;
}

/* Writes each (name, json) pair; frees the json objects. */
static int side_jsons(side_files *sf, const char *dir, const char *const *names, cJSON **jsons, size_t n,
                      ms_error *err)
{
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && !jsons[i])
            rc = ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot build %s", names[i]);
        else if (rc == 0)
            rc = side_json(sf, dir, names[i], jsons[i], err);
        cJSON_Delete(jsons[i]);
    }
    return rc;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -v: one line per model written. */
static void report(const char *what, const char *dir, const st_plan *plan, double t0)
{
    if (!g_verbose)
        return;
    double secs = now_s() - t0;
    double gb = (double)st_plan_total_bytes(plan) / 1e9;
    fprintf(stderr, "gen_model: %s %s: %zu tensors, %.3f GB in %zu file(s), %.2f s (%.2f GB/s)\n", what, dir,
            st_plan_n_tensors(plan), gb, st_plan_n_shards(plan), secs, secs > 0 ? gb / secs : 0.0);
}

static int cmd_base(const char *dir, const gen_options *o, ms_error *err)
{
    double t0 = now_s();
    llama_config c = {0};
    job_list jobs = {0};
    st_plan *plan = NULL;
    st_writer *w = NULL;
    side_files sf = {0};
    const dtype_info *dt = o->dtype ? o->dtype : dtype_by_flag("bf16");
    if (config_from_options(o, &c, err) < 0 || outdir_prepare(dir, o->force, err) < 0)
        goto fail;
    if (base_jobs(&c, dt->dtype, o->seed, &jobs, err) < 0)
        goto fail;
    if (o->sorted)
        qsort(jobs.jobs, jobs.n, sizeof *jobs.jobs, cmp_job_name);
    delta_params none = {0};
    if (write_weights(&jobs, dir, ST_DEFAULT_STEM, o->shard_limit, &none, &plan, &w, err) < 0)
        goto fail;
    const char *names[] = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"};
    cJSON *jsons[] = {config_json(&c, dt), generation_config_json(), tokenizer_json(c.vocab),
                      tokenizer_config_json(c.max_pos)};
    if (side_jsons(&sf, dir, names, jsons, 4, err) < 0)
        goto fail;
    report("base", dir, plan, t0);
    side_files_end(&sf, false);
    st_writer_close(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    return 0;
fail:
    side_files_end(&sf, true);
    st_writer_abort(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    return -1;
}

/* ============================================================ fine-tunes */

static bool is_vocab_tensor(const char *name)
{
    return !strcmp(name, "model.embed_tokens.weight") || !strcmp(name, "lm_head.weight");
}

static int cmd_finetune(const char *base_dir, const char *dir, const gen_options *o, ms_error *err)
{
    double t0 = now_s();
    ms_model *m = NULL;
    job_list jobs = {0};
    st_plan *plan = NULL;
    st_writer *w = NULL;
    side_files sf = {0};
    cJSON *config = NULL;
    if (!o->have_seed) {
        usage_error(err, "--seed", "finetune needs --seed");
        goto fail;
    }
    if (ms_model_open(base_dir, &m, err) < 0)
        goto fail;
    if (m->kind != MS_MODEL_KIND_DIR) {
        ms_error_set(err, MS_EXIT_USAGE, base_dir, "finetune needs a model directory, not a %s",
                     ms_model_kind_name(m->kind));
        goto fail;
    }
    if (outdir_prepare(dir, o->force, err) < 0)
        goto fail;
    st_dtype out_float = ST_DTYPE_COUNT; /* the first float tensor's, unless --dtype */
    for (size_t i = 0; i < m->n_tensors; i++) {
        const st_tensor *bt = m->tensors[i].info;
        bool is_float = st_dtype_is_mergeable_float(bt->dtype);
        st_dtype dtype = !is_float ? bt->dtype : o->dtype ? o->dtype->dtype : bt->dtype;
        if (is_float && out_float == ST_DTYPE_COUNT)
            out_float = dtype;
        uint64_t shape[ST_MAX_DIMS];
        memcpy(shape, bt->shape, sizeof shape);
        if (is_float && o->extra_vocab && is_vocab_tensor(bt->name) && bt->ndim == 2) {
            if (shape[0] > UINT64_MAX - o->extra_vocab) {
                ms_error_set(err, MS_EXIT_USAGE, "--extra-vocab", "too large");
                goto fail;
            }
            shape[0] += o->extra_vocab;
        }
        job *j = job_add(&jobs, bt->name, is_float ? JOB_FINETUNE : JOB_COPY, dtype, bt->ndim, shape, err);
        if (!j)
            goto fail;
        j->base_file = ms_model_tensor_file(m, i);
        j->base = bt;
        j->key = tensor_key(bt->name, o->seed, DOMAIN_DELTA_PICK);
        j->key_value = tensor_key(bt->name, o->seed, DOMAIN_DELTA_VALUE);
        j->key_extra = tensor_key(bt->name, o->seed, DOMAIN_EXTRA_ROWS);
    }
    /* Thresholds on a 32-bit uniform: P(pick < t) = t / 2^32. */
    delta_params dp = {
        .touched_below = (uint32_t)fmin(o->touched * 4294967296.0, 4294967295.0),
        .outlier_below = (uint32_t)fmin(o->touched * o->outliers * 4294967296.0, 4294967295.0),
        .scale = (float)o->delta_scale,
    };
    if (write_weights(&jobs, dir, ST_DEFAULT_STEM, o->shard_limit, &dp, &plan, &w, err) < 0)
        goto fail;

    /* config.json: the base's, with the dtype and vocabulary updated. */
    if (m->config) {
        config = cJSON_Duplicate(m->config, true);
        if (!config) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, base_dir, "cannot copy config.json");
            goto fail;
        }
        const dtype_info *dt = out_float != ST_DTYPE_COUNT ? dtype_by_st(out_float) : NULL;
        if (dt)
            cJSON_ReplaceItemInObject(config, "torch_dtype", cJSON_CreateString(dt->torch));
        long vocab = ms_model_config_int(m, "vocab_size", -1);
        if (o->extra_vocab && vocab > 0)
            cJSON_ReplaceItemInObject(config, "vocab_size", cJSON_CreateNumber((double)vocab + (double)o->extra_vocab));
        if (side_json(&sf, dir, "config.json", config, err) < 0)
            goto fail;
    }
    static const char *const k_copied[] = {"generation_config.json", "tokenizer.json", "tokenizer_config.json"};
    for (size_t i = 0; i < sizeof k_copied / sizeof k_copied[0]; i++)
        if (side_copy(&sf, base_dir, dir, k_copied[i], err) < 0)
            goto fail;
    report("finetune", dir, plan, t0);
    side_files_end(&sf, false);
    st_writer_close(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    cJSON_Delete(config);
    ms_model_close(m);
    return 0;
fail:
    side_files_end(&sf, true);
    st_writer_abort(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    cJSON_Delete(config);
    ms_model_close(m);
    return -1;
}

/* ============================================================ LoRA adapters */

static const char *const k_linear_modules[] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
};
#define N_LINEAR (sizeof k_linear_modules / sizeof k_linear_modules[0])

/* --targets into a mask over k_linear_modules. */
static int parse_targets(const char *text, bool chosen[N_LINEAR], ms_error *err)
{
    memset(chosen, 0, N_LINEAR * sizeof chosen[0]);
    if (!strcmp(text, "all-linear")) {
        for (size_t k = 0; k < N_LINEAR; k++)
            chosen[k] = true;
        return 0;
    }
    char *copy = strdup(text), *save = NULL;
    if (!copy)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "--targets", "cannot parse");
    int rc = 0, n = 0;
    for (char *t = strtok_r(copy, ",", &save); t && rc == 0; t = strtok_r(NULL, ",", &save)) {
        size_t k = 0;
        while (k < N_LINEAR && strcmp(k_linear_modules[k], t))
            k++;
        if (k == N_LINEAR)
            rc = ms_error_set(err, MS_EXIT_USAGE, "--targets",
                              "unknown module '%s' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                              "down_proj or all-linear)",
                              t);
        else {
            chosen[k] = true;
            n++;
        }
    }
    free(copy);
    if (rc == 0 && n == 0)
        rc = usage_error(err, "--targets", "no module given");
    return rc;
}

/* --rank-pattern / --alpha-pattern "NAME=V,...": per k_linear_modules entry,
 * the value or `none`. */
static int parse_module_values(const char *flag, const char *text, bool integer, double out[N_LINEAR], double none,
                               ms_error *err)
{
    for (size_t k = 0; k < N_LINEAR; k++)
        out[k] = none;
    if (!text)
        return 0;
    char *copy = strdup(text), *save = NULL;
    if (!copy)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, flag, "cannot parse");
    int rc = 0;
    for (char *t = strtok_r(copy, ",", &save); t && rc == 0; t = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(t, '=');
        size_t k = 0;
        if (eq) {
            *eq = '\0';
            while (k < N_LINEAR && strcmp(k_linear_modules[k], t))
                k++;
        }
        double v = 0;
        if (!eq || k == N_LINEAR) {
            rc = ms_error_set(err, MS_EXIT_USAGE, flag, "expected NAME=VALUE with NAME one of q_proj, k_proj, "
                                                         "v_proj, o_proj, gate_proj, up_proj, down_proj");
        } else if (integer) {
            uint64_t r = 0;
            rc = parse_u64(flag, eq + 1, 1, 1u << 16, &r, err);
            v = (double)r;
        } else {
            rc = parse_f64(flag, eq + 1, 1e-6, 1e6, &v, err);
        }
        if (rc == 0)
            out[k] = v;
    }
    free(copy);
    return rc < 0 ? -1 : 0;
}

/* Adds the LoRA factors A [rank, in] ~ N(0, LORA_A_STD), B [out, rank] ~
 * N(0, LORA_B_STD) and, with DoRA, the magnitude [n_features] ~ 1 + N(0,
 * LORA_B_STD) of one module under PEFT's names. */
static int lora_jobs_add(job_list *jobs, const char *module, bool embedding, st_dtype dtype, uint64_t rank,
                         uint64_t in, uint64_t out, bool dora, uint64_t seed, ms_error *err)
{
    char name[320];
    uint64_t a_shape[2] = {rank, in}, b_shape[2] = {out, rank}, m_shape[1] = {out};
    snprintf(name, sizeof name, "base_model.model.%s.%s", module, embedding ? "lora_embedding_A" : "lora_A.weight");
    job *ja = job_add(jobs, name, JOB_NORMAL, dtype, 2, a_shape, err);
    if (!ja)
        return -1;
    ja->scale = LORA_A_STD;
    ja->key = tensor_key(name, seed, DOMAIN_BASE);
    snprintf(name, sizeof name, "base_model.model.%s.%s", module, embedding ? "lora_embedding_B" : "lora_B.weight");
    job *jb = job_add(jobs, name, JOB_NORMAL, dtype, 2, b_shape, err);
    if (!jb)
        return -1;
    jb->scale = LORA_B_STD;
    jb->key = tensor_key(name, seed, DOMAIN_BASE);
    if (dora) {
        snprintf(name, sizeof name, "base_model.model.%s.lora_magnitude_vector", module);
        job *jm = job_add(jobs, name, JOB_NORM, dtype, 1, m_shape, err);
        if (!jm)
            return -1;
        jm->scale = LORA_B_STD;
        jm->key = tensor_key(name, seed, DOMAIN_BASE);
    }
    return 0;
}

static int cmd_lora(const char *base_dir, const char *dir, const gen_options *o, ms_error *err)
{
    double t0 = now_s();
    ms_model *m = NULL;
    job_list jobs = {0};
    st_plan *plan = NULL;
    st_writer *w = NULL;
    side_files sf = {0};
    bool chosen[N_LINEAR];
    double rank_for[N_LINEAR], alpha_for[N_LINEAR];
    char *save_list = NULL;
    if (!o->have_seed || o->rank == 0) {
        usage_error(err, !o->have_seed ? "--seed" : "--rank", "lora needs --seed and --rank");
        goto fail;
    }
    if (parse_targets(o->targets ? o->targets : "q_proj,v_proj", chosen, err) < 0 ||
        parse_module_values("--rank-pattern", o->rank_pattern, true, rank_for, 0, err) < 0 ||
        parse_module_values("--alpha-pattern", o->alpha_pattern, false, alpha_for, NAN, err) < 0)
        goto fail;
    if (ms_model_open(base_dir, &m, err) < 0)
        goto fail;
    if (outdir_prepare(dir, o->force, err) < 0)
        goto fail;
    st_dtype dtype = ST_DTYPE_COUNT;
    if (o->lora_embeddings) {
        long ei = ms_model_find(m, "model.embed_tokens.weight");
        if (ei < 0) {
            ms_error_set(err, MS_EXIT_DATA, base_dir, "--embeddings: no model.embed_tokens.weight");
            goto fail;
        }
        const st_tensor *et = m->tensors[ei].info;
        if (et->ndim != 2 || !st_dtype_is_mergeable_float(et->dtype)) {
            ms_error_set(err, MS_EXIT_DATA, et->name, "expected a 2-D F16/BF16/F32 weight");
            goto fail;
        }
        dtype = o->dtype ? o->dtype->dtype : et->dtype;
        /* lora_embedding_A [r, vocab], lora_embedding_B [dim, r]; DoRA features: dim */
        if (lora_jobs_add(&jobs, "model.embed_tokens", true, dtype, o->rank, et->shape[0], et->shape[1], o->dora,
                          o->seed, err) < 0)
            goto fail;
    }
    for (uint64_t l = 0;; l++) {
        size_t found = 0;
        for (size_t k = 0; k < N_LINEAR; k++) {
            const char *group = k < 4 ? "self_attn" : "mlp";
            char base_name[200], module[160];
            snprintf(module, sizeof module, "model.layers.%" PRIu64 ".%s.%s", l, group, k_linear_modules[k]);
            snprintf(base_name, sizeof base_name, "%s.weight", module);
            long bi = ms_model_find(m, base_name);
            if (bi < 0)
                continue;
            found++;
            if (!chosen[k])
                continue;
            const st_tensor *bt = m->tensors[bi].info;
            if (bt->ndim != 2 || !st_dtype_is_mergeable_float(bt->dtype)) {
                ms_error_set(err, MS_EXIT_DATA, base_name, "expected a 2-D F16/BF16/F32 weight");
                goto fail;
            }
            if (dtype == ST_DTYPE_COUNT)
                dtype = o->dtype ? o->dtype->dtype : bt->dtype;
            /* PEFT's names: the module path under base_model.model. */
            uint64_t rank = rank_for[k] > 0 ? (uint64_t)rank_for[k] : o->rank;
            if (lora_jobs_add(&jobs, module, false, dtype, rank, bt->shape[1], bt->shape[0], o->dora, o->seed,
                              err) < 0)
                goto fail;
        }
        if (found == 0)
            break;
    }
    if (jobs.n == 0) {
        ms_error_set(err, MS_EXIT_DATA, base_dir, "no model.layers.N.* weight matches --targets");
        goto fail;
    }
    if (o->modules_to_save) {
        /* full replacement tensors: base_model.model.MODULE.weight */
        if (!(save_list = strdup(o->modules_to_save))) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "--modules-to-save", "cannot parse");
            goto fail;
        }
        char *save = NULL;
        for (char *t = strtok_r(save_list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            char base_name[200], name[260];
            snprintf(base_name, sizeof base_name, "%s.weight", t);
            long bi = ms_model_find(m, base_name);
            if (bi < 0) {
                ms_error_set(err, MS_EXIT_USAGE, "--modules-to-save", "the base has no tensor '%s'", base_name);
                goto fail;
            }
            const st_tensor *bt = m->tensors[bi].info;
            if (!st_dtype_is_mergeable_float(bt->dtype)) {
                ms_error_set(err, MS_EXIT_DATA, base_name, "expected an F16/BF16/F32 tensor");
                goto fail;
            }
            snprintf(name, sizeof name, "base_model.model.%s", base_name);
            job *j = job_add(&jobs, name, bt->ndim == 1 ? JOB_NORM : JOB_NORMAL, o->dtype ? o->dtype->dtype : bt->dtype,
                             bt->ndim, bt->shape, err);
            if (!j)
                goto fail;
            j->scale = BASE_STD;
            j->key = tensor_key(name, o->seed, DOMAIN_BASE);
        }
    }
    if (o->sorted)
        qsort(jobs.jobs, jobs.n, sizeof *jobs.jobs, cmp_job_name);
    delta_params none = {0};
    if (write_weights(&jobs, dir, "adapter_model", UINT64_MAX, &none, &plan, &w, err) < 0)
        goto fail;

    cJSON *cfg = cJSON_CreateObject();
    if (cfg) {
        double alpha = o->have_alpha ? o->alpha : 2.0 * (double)o->rank;
        /* an empty map without a pattern, as PEFT writes it (PEFT itself
         * fails on null when it loads the adapter) */
        cJSON *alpha_pattern = cJSON_AddObjectToObject(cfg, "alpha_pattern");
        for (size_t k = 0; o->alpha_pattern && k < N_LINEAR; k++)
            if (!isnan(alpha_for[k]))
                cJSON_AddNumberToObject(alpha_pattern, k_linear_modules[k], alpha_for[k]);
        cJSON_AddNullToObject(cfg, "auto_mapping");
        cJSON_AddStringToObject(cfg, "base_model_name_or_path", base_dir);
        cJSON_AddStringToObject(cfg, "bias", "none");
        cJSON_AddFalseToObject(cfg, "fan_in_fan_out");
        cJSON_AddTrueToObject(cfg, "inference_mode");
        cJSON_AddTrueToObject(cfg, "init_lora_weights");
        cJSON_AddNullToObject(cfg, "layers_pattern");
        cJSON_AddNullToObject(cfg, "layers_to_transform");
        cJSON_AddNumberToObject(cfg, "lora_alpha", alpha);
        cJSON_AddNumberToObject(cfg, "lora_dropout", 0.0);
        if (o->modules_to_save) {
            /* the names as given: PEFT wraps every module whose name ends
             * with one of them, so "norm" alone would take in every layer's
             * input_layernorm too (and expect their weights here) */
            cJSON *mts = cJSON_AddArrayToObject(cfg, "modules_to_save");
            char *copy = strdup(o->modules_to_save), *save = NULL;
            for (char *t = copy ? strtok_r(copy, ",", &save) : NULL; t; t = strtok_r(NULL, ",", &save))
                cJSON_AddItemToArray(mts, cJSON_CreateString(t));
            free(copy);
        } else {
            cJSON_AddNullToObject(cfg, "modules_to_save");
        }
        cJSON_AddStringToObject(cfg, "peft_type", "LORA");
        cJSON_AddNumberToObject(cfg, "r", (double)o->rank);
        cJSON *rank_pattern = cJSON_AddObjectToObject(cfg, "rank_pattern");
        for (size_t k = 0; o->rank_pattern && k < N_LINEAR; k++)
            if (rank_for[k] > 0)
                cJSON_AddNumberToObject(rank_pattern, k_linear_modules[k], rank_for[k]);
        cJSON_AddNullToObject(cfg, "revision");
        cJSON *targets = cJSON_AddArrayToObject(cfg, "target_modules");
        if (o->lora_embeddings)
            cJSON_AddItemToArray(targets, cJSON_CreateString("embed_tokens"));
        for (size_t k = 0; k < N_LINEAR; k++)
            if (chosen[k])
                cJSON_AddItemToArray(targets, cJSON_CreateString(k_linear_modules[k]));
        cJSON_AddStringToObject(cfg, "task_type", "CAUSAL_LM");
        cJSON_AddBoolToObject(cfg, "use_dora", o->dora);
        cJSON_AddBoolToObject(cfg, "use_rslora", o->rslora);
    }
    const char *names[] = {"adapter_config.json"};
    if (side_jsons(&sf, dir, names, &cfg, 1, err) < 0)
        goto fail;
    report("lora", dir, plan, t0);
    side_files_end(&sf, false);
    st_writer_close(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    ms_model_close(m);
    free(save_list);
    return 0;
fail:
    side_files_end(&sf, true);
    st_writer_abort(w);
    st_plan_free(plan);
    job_list_free(&jobs);
    ms_model_close(m);
    free(save_list);
    return -1;
}

/* ============================================================ main */

static void print_help(void)
{
    fputs(
        "usage:\n"
        "  gen_model base OUTDIR [--preset NAME] [--dtype bf16|f16|f32] [--seed N]\n"
        "            [--shard-size SIZE] [--layers N] [--hidden N] [--intermediate N]\n"
        "            [--heads N] [--kv-heads N] [--vocab N] [--tie-embeddings]\n"
        "  gen_model finetune BASEDIR OUTDIR --seed N [--delta-scale X]\n"
        "            [--touched-fraction F] [--outlier-fraction F] [--dtype ...]\n"
        "            [--extra-vocab N] [--shard-size SIZE]\n"
        "  gen_model lora BASEDIR OUTDIR --seed N --rank R [--alpha A]\n"
        "            [--targets q_proj,k_proj,...|all-linear] [--dtype ...]\n"
        "            [--rslora] [--dora] [--embeddings] [--modules-to-save M,...]\n"
        "            [--rank-pattern NAME=R,...] [--alpha-pattern NAME=A,...]\n"
        "\n"
        "Deterministic Llama-shaped random models (LlamaForCausalLM tensor names):\n"
        "the same command writes the same bytes on any machine.\n"
        "\n"
        "base: weights ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02), plus config.json,\n"
        "  generation_config.json and a dummy tokenizer.json / tokenizer_config.json.\n"
        "  --preset (layers x hidden, intermediate, heads/kv heads, vocab):\n"
        "    tiny       2 x 64, 128, 4/2, 256 (the default)\n"
        "    small      4 x 256, 688, 8/4, 1024\n"
        "    llama-1b   Llama-3.2-1B: 16 x 2048, 8192, 32/8, 128256, tied embeddings\n"
        "    llama-8b   Llama-3.1-8B: 32 x 4096, 14336, 32/8, 128256\n"
        "    sized:BYTES  a shape scaled so the weights take about BYTES (sized:1G)\n"
        "  --layers, --hidden, --intermediate, --heads, --kv-heads, --vocab override\n"
        "  the preset; --tie-embeddings drops lm_head.weight. --seed defaults to 0,\n"
        "  --dtype to bf16.\n"
        "finetune: BASEDIR's weights plus deltas: a (1 - F) fraction of the elements is\n"
        "  untouched (--touched-fraction F, default 0.9), the others get N(0, X)\n"
        "  (--delta-scale X, default 0.002), a fraction of those (--outlier-fraction,\n"
        "  default 0.01) 20 times larger. --extra-vocab N appends N fresh rows to\n"
        "  embed_tokens / lm_head (added tokens). --dtype defaults to the base's.\n"
        "  config.json comes from the base (torch_dtype, vocab_size updated); the\n"
        "  generation config and tokenizer files are copied.\n"
        "lora: a PEFT adapter (adapter_config.json, adapter_model.safetensors) for\n"
        "  BASEDIR: lora_A [R, in] ~ N(0, 0.02), lora_B [out, R] ~ N(0, 0.01) per\n"
        "  target module (default q_proj,v_proj); --alpha defaults to 2 * R.\n"
        "  --rslora sets use_rslora (scale alpha / sqrt(r)). --dora adds each module's\n"
        "  lora_magnitude_vector ~ 1 + N(0, 0.01) and sets use_dora. --embeddings adds\n"
        "  lora_embedding_A [R, vocab], lora_embedding_B [hidden, R] for\n"
        "  model.embed_tokens. --modules-to-save lm_head,model.norm writes full\n"
        "  replacement tensors (N(0, 0.02), norms 1 + N(0, 0.02)) for those modules.\n"
        "  --rank-pattern v_proj=4 / --alpha-pattern v_proj=3 set those modules' rank /\n"
        "  alpha (written to rank_pattern / alpha_pattern).\n"
        "\n"
        "Common options:\n"
        "  --shard-size SIZE  cut the weights into shards of at most SIZE data bytes\n"
        "                     (512M, 4G: powers of 1024; 5GB: powers of 1000);\n"
        "                     default: one file\n"
        "  --sorted-order     base, lora: tensors sorted by name, as real checkpoints\n"
        "                     are (a fine-tune keeps its base's order)\n"
        "  --force            OUTDIR may be non-empty: the model files in it are replaced\n"
        "  -v                 print what was written and how fast\n"
        "OUTDIR is created (with its parents) if missing and must otherwise be\n"
        "empty. Nothing is printed on success without -v. Exit codes: 0 ok,\n"
        "1 runtime failure, 2 usage error, 3 invalid base model.\n",
        stdout);
}

static bool takes_a_value(const char *opt)
{
    static const char *const k_value_options[] = {
        "--preset", "--dtype", "--seed", "--shard-size", "--layers", "--hidden", "--intermediate", "--heads",
        "--kv-heads", "--vocab", "--delta-scale", "--touched-fraction", "--outlier-fraction", "--extra-vocab",
        "--rank", "--alpha", "--targets", "--modules-to-save", "--rank-pattern", "--alpha-pattern",
    };
    for (size_t k = 0; k < sizeof k_value_options / sizeof k_value_options[0]; k++)
        if (!strcmp(opt, k_value_options[k]))
            return true;
    return false;
}

/* Parses the options after the positional arguments into o. */
static int parse_options(int argc, char **argv, int first, gen_options *o, ms_error *err)
{
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        bool takes_value = true;
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            g_verbose = true;
            takes_value = false;
        } else if (!strcmp(a, "--force")) {
            o->force = true;
            takes_value = false;
        } else if (!strcmp(a, "--tie-embeddings")) {
            o->tie = true;
            takes_value = false;
        } else if (!strcmp(a, "--sorted-order")) {
            o->sorted = true;
            takes_value = false;
        } else if (!strcmp(a, "--rslora") || !strcmp(a, "--dora") || !strcmp(a, "--embeddings")) {
            bool *flag = a[2] == 'r' ? &o->rslora : a[2] == 'd' ? &o->dora : &o->lora_embeddings;
            *flag = true;
            takes_value = false;
        } else if (!takes_a_value(a)) {
            return usage_error(err, a, "unknown option");
        } else if (!v) {
            return usage_error(err, a, "needs a value");
        } else if (!strcmp(a, "--preset")) {
            o->preset = v;
        } else if (!strcmp(a, "--dtype")) {
            o->dtype = dtype_by_flag(v);
            if (!o->dtype)
                rc = usage_error(err, a, "expected bf16, f16 or f32");
        } else if (!strcmp(a, "--seed")) {
            rc = parse_u64(a, v, 0, UINT64_MAX, &o->seed, err);
            o->have_seed = true;
        } else if (!strcmp(a, "--shard-size")) {
            if (ms_size_parse(v, &o->shard_limit) < 0 || o->shard_limit == 0)
                rc = usage_error(err, a, "expected a size such as 512M or 5GB");
        } else if (!strcmp(a, "--layers")) {
            rc = parse_u64(a, v, 1, 1000, &o->layers, err);
        } else if (!strcmp(a, "--hidden")) {
            rc = parse_u64(a, v, 1, 1u << 20, &o->hidden, err);
        } else if (!strcmp(a, "--intermediate")) {
            rc = parse_u64(a, v, 1, 1u << 22, &o->intermediate, err);
        } else if (!strcmp(a, "--heads")) {
            rc = parse_u64(a, v, 1, 4096, &o->heads, err);
        } else if (!strcmp(a, "--kv-heads")) {
            rc = parse_u64(a, v, 1, 4096, &o->kv_heads, err);
        } else if (!strcmp(a, "--vocab")) {
            rc = parse_u64(a, v, 1, 1u << 24, &o->vocab, err);
        } else if (!strcmp(a, "--delta-scale")) {
            rc = parse_f64(a, v, 0.0, 1e3, &o->delta_scale, err);
        } else if (!strcmp(a, "--touched-fraction")) {
            rc = parse_f64(a, v, 0.0, 1.0, &o->touched, err);
        } else if (!strcmp(a, "--outlier-fraction")) {
            rc = parse_f64(a, v, 0.0, 1.0, &o->outliers, err);
        } else if (!strcmp(a, "--extra-vocab")) {
            rc = parse_u64(a, v, 0, 1u << 24, &o->extra_vocab, err);
        } else if (!strcmp(a, "--rank")) {
            rc = parse_u64(a, v, 1, 1u << 16, &o->rank, err);
        } else if (!strcmp(a, "--alpha")) {
            rc = parse_f64(a, v, 1e-6, 1e6, &o->alpha, err);
            o->have_alpha = true;
        } else if (!strcmp(a, "--modules-to-save")) {
            o->modules_to_save = v;
        } else if (!strcmp(a, "--rank-pattern")) {
            o->rank_pattern = v;
        } else if (!strcmp(a, "--alpha-pattern")) {
            o->alpha_pattern = v;
        } else {
            MS_ASSERT(!strcmp(a, "--targets"));
            o->targets = v;
        }
        if (rc < 0)
            return -1;
        if (takes_value)
            i++;
    }
    return 0;
}

int main(int argc, char **argv)
{
    ms_error err = {0};
    gen_options o = {
        .shard_limit = UINT64_MAX,
        .delta_scale = 0.002,
        .touched = 0.9,
        .outliers = 0.01,
    };
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            print_help();
            return MS_EXIT_OK;
        }
    }
    const char *cmd = argc > 1 ? argv[1] : "";
    int positional = !strcmp(cmd, "base") ? 1 : (!strcmp(cmd, "finetune") || !strcmp(cmd, "lora")) ? 2 : -1;
    int rc;
    if (positional < 0) {
        rc = usage_error(&err, "gen_model", "expected a command: base, finetune or lora");
    } else if (argc < 2 + positional || argv[2][0] == '-' || (positional == 2 && argv[3][0] == '-')) {
        rc = usage_error(&err, cmd, positional == 1 ? "expected OUTDIR" : "expected BASEDIR OUTDIR");
    } else if ((rc = parse_options(argc, argv, 2 + positional, &o, &err)) == 0) {
        if (positional == 1)
            rc = cmd_base(argv[2], &o, &err);
        else if (!strcmp(cmd, "finetune"))
            rc = cmd_finetune(argv[2], argv[3], &o, &err);
        else
            rc = cmd_lora(argv[2], argv[3], &o, &err);
    }
    if (rc < 0) {
        fprintf(stderr, "gen_model: error: %s\n", err.msg);
        return err.exit_code ? err.exit_code : MS_EXIT_RUNTIME;
    }
    return MS_EXIT_OK;
}
