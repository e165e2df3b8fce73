#include "pipeline/merge_plan.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cpu/cpu_merge.h"
#include "cpu/lora_delta.h"
#include "io/direct_read.h"
#include "io/small_file.h"
#include "pipeline/merge_passes.h"
#include "pipeline/merge_passes_hessian.h"
#include "pipeline/staging_pool.h"


static bool same_shape(const st_tensor *a, const st_tensor *b)
{
    if (a->ndim != b->ndim)
        return false;
    for (unsigned d = 0; d < a->ndim; d++)
        if (a->shape[d] != b->shape[d])
            return false;
    return true;
}

/* DESIGN.md: a model whose embed_tokens or lm_head has more rows than the
 * base (added tokens) contributes its first rows only. */
static bool is_extra_rows_ok(const st_tensor *base, const st_tensor *model)
{
    if (base->ndim != 2 || model->ndim != 2 || base->shape[1] != model->shape[1])
        return false;
    if (model->shape[0] <= base->shape[0])
        return false;
    return strstr(base->name, "embed_tokens") || strstr(base->name, "lm_head");
}

/* Rows and columns as the kernels see them: a 1-D tensor is one row. */
static void tensor_rows_cols(const st_tensor *t, uint64_t *rows, uint64_t *cols)
{
    if (t->ndim < 2) {
        *rows = 1;
        *cols = t->numel;
    } else {
        *rows = t->shape[0];
        *cols = t->shape[0] ? t->numel / t->shape[0] : 0;
    }
}

/* The largest layer index in names "model.layers.N." plus one, for models
 * without config.json. */
static unsigned infer_num_layers(const ms_model *m)
{
    unsigned n = 0;
    for (size_t i = 0; i < m->n_tensors; i++) {
        const char *p = strstr(m->tensors[i].info->name, "layers.");
        unsigned long idx;
        char *end;
        if (p && (idx = strtoul(p + 7, &end, 10), end != p + 7 && *end == '.') && idx + 1 > n)
            n = (unsigned)idx + 1;
    }
    return n;
}

/* Opens a recipe's model: a directory or file, and with "DIR+ADAPTER" the
 * PEFT adapter validated against that directory's tensors. */
static int plan_open_model(const char *path, const char *adapter, ms_model **out, ms_peft **peft, ms_error *err)
{
    *peft = NULL;
    if (ms_model_open(path, out, err) != 0)
        return -1;
    if (adapter && ms_peft_open(adapter, *out, peft, err) != 0)
        return -1;
    return 0;
}

/* Fills job->in[slot] (0: the base) from tensor src_name of model m (with
 * its PEFT adapter peft, or NULL): the model's own tensor, an adapter's
 * replacement (modules_to_save), or the model's rows plus a LoRA delta.
 * Checks dtypes and shapes against lt (the layout's, or with slices the
 * reference source's tensor). */
static int plan_job_input_named(ms_plan *plan, ms_job *job, unsigned slot, const ms_model *m, const ms_peft *peft,
                                const st_tensor *lt, const char *src_name, ms_error *err)
{
    ms_tensor_params *p = &job->params;
    const ms_lora_target *lora = peft ? ms_peft_target(peft, src_name) : NULL;
    const char *who = peft ? ms_peft_path(peft) : m->path;
    const st_file *f;
    const st_tensor *mt;
    if (lora && (lora->kind == MS_LORA_REPLACE || lora->source)) {
        f = lora->file;
        mt = lora->source;
    } else {
        long ti = ms_model_find(m, src_name);
        if (ti < 0)
            return ms_error_set(err, MS_EXIT_DATA, m->path, "tensor '%s' is missing (%s is in %s)", src_name,
                                strcmp(src_name, lt->name) == 0 ? "it" : lt->name, plan->layout->path);
        f = ms_model_tensor_file(m, (size_t)ti);
        mt = m->tensors[ti].info;
    }
    if (!st_dtype_is_mergeable_float(mt->dtype))
        return ms_error_set(err, MS_EXIT_DATA, who, "tensor '%s' is %s, expected F16, BF16 or F32", src_name,
                            st_dtype_name(mt->dtype));
    if (!same_shape(lt, mt)) {
        char want[256], got[256];
        st_shape_format(lt, want, sizeof want);
        st_shape_format(mt, got, sizeof got);
        if (!is_extra_rows_ok(lt, mt))
            return ms_error_set(err, MS_EXIT_DATA, who, "tensor '%s' has shape %s but %s has %s", src_name, got,
                                strcmp(src_name, lt->name) == 0 ? plan->layout->path : lt->name, want);
        ms_log_warn("%s: tensor '%s' has shape %s, more rows than the base's %s (added tokens): "
                    "merging its first %" PRIu64 " rows only",
                    who, src_name, got, want, lt->shape[0]);
    }
    job->in[slot] = (ms_job_input){f, st_file_tensor_offset(f, mt), (uint64_t)st_dtype_bits(mt->dtype) / 8 * p->cols,
                                   mt->dtype, NULL, NULL};
    p->in_dtype[slot] = mt->dtype;
    p->model_rows[slot] = mt->ndim >= 2 ? mt->shape[0] : 1;
    if (lora && lora->kind != MS_LORA_REPLACE) {
        job->in[slot].lora = lora;
        job->in[slot].peft = peft;
        p->in_dtype[slot] = ST_F32; /* the kernels see base + delta, materialised in fp32 */
    }
    return 0;
}

/* job->in[i] from model i's tensor of the layout's name lt->name. */
static int plan_job_input(ms_plan *plan, ms_job *job, unsigned i, const st_tensor *lt, ms_error *err)
{
    return plan_job_input_named(plan, job, i, i == 0 ? plan->base : plan->models[i], plan->adapters[i], lt, lt->name,
                                err);
}

/* Cuts a job into row chunks that fit the pool: a chunk (its inputs and its
 * output) takes at most a third of the pool, so reading, computing and
 * writing can overlap. Kernel scratch and merge statistics live outside the
 * pool (ms_plan's extra_bytes). */
/* Room for HIST_HI's capture (ms_merge_capture) per searched bound: an
 * eighth of the tensor's elements (bf16 deltas pile up in a few bins near the
 * threshold, up to 1% of the elements each), within budget_bytes shared by
 * the bounds (8 bytes an entry); none for tensors under 2^18 elements, which
 * a sweep costs little and a sample places poorly. */
#define PLAN_CAPTURE_MIN_NUMEL (1ull << 18)
static uint64_t plan_capture_entries(const ms_tensor_params *p, uint64_t budget_bytes)
{
    unsigned bounds = ms_merge_searched_bounds(p);
    if (bounds == 0 || p->numel < PLAN_CAPTURE_MIN_NUMEL)
        return 0;
    uint64_t share = budget_bytes / 8 / bounds;
    return p->numel / 8 < share ? p->numel / 8 : share;
}

/* Raises plan->extra_bytes to what merge job `job` holds beside the staging
 * pool: kernel scratch (nearly independent of the row count: bounded with
 * all rows), the merge state, LoRA factors. */
static void plan_note_extra(ms_plan *plan, const ms_job *job, unsigned threads)
{
    uint64_t extra = cpu_merge_scratch_bytes(&job->params, job->params.rows, threads) +
                     ms_merge_state_bytes(&job->params);
    for (unsigned i = 0; i < job->n_inputs; i++)
        extra += job->in[i].lora ? cpu_lora_host_bytes(job->in[i].lora) : 0;
    if (extra > plan->extra_bytes)
        plan->extra_bytes = extra;
}

/* Staging bytes the inputs of a chunk may need beside their rows when read
 * with O_DIRECT: the blocks around them (pipeline/merge_run.c:
 * stage_layout). The plan counts them whether or not the merge reads with
 * O_DIRECT (--direct-io), so it does not depend on the option. */
static uint64_t job_direct_slack(const ms_job *job)
{
    uint64_t slack = 0;
    for (unsigned i = 0; i < job->n_inputs; i++)
        slack += job->in[i].file ? MS_DIRECT_SLACK : 0;
    return slack;
}

/* Staging bytes a chunk may need beside its rows: its two allocations, each
 * rounded up to a page, and the O_DIRECT blocks. */
static uint64_t job_chunk_slack(const ms_job *job)
{
    return 2 * 4096 + job_direct_slack(job);
}

/* Staging bytes of one row of a job: its inputs as staged and its output. */
static uint64_t job_stage_row_bytes(const ms_job *job)
{
    uint64_t per_row = job->out_row_bytes;
    for (unsigned i = 0; i < job->n_inputs; i++)
        per_row += ms_job_input_stage_row_bytes(&job->in[i], job->params.cols);
    return per_row;
}

/* The memory HIST_HI's captures may take from the staging pool, given the
 * budget and the other extras (plan->extra_bytes so far): what the pool can
 * give up without cutting one more tensor into row chunks (each pass would
 * read its chunks again, which costs more than any capture saves), at most a
 * quarter of the pool. So the captures never make a merge need more
 * --max-memory, nor read more. */
static uint64_t plan_capture_budget(const ms_plan *plan, uint64_t pool_bytes)
{
    if (plan->extra_bytes >= pool_bytes)
        return 0;
    uint64_t pool = pool_bytes - plan->extra_bytes, keep = MS_PLAN_MIN_POOL_BYTES;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        const ms_job *job = &plan->jobs[j];
        uint64_t rows = job->params.rows ? job->params.rows : 1, per_row = job_stage_row_bytes(job), whole;
        uint64_t slack = job_chunk_slack(job);
        if (per_row > (UINT64_MAX / MS_PLAN_CHUNKS_IN_POOL - slack) / rows)
            continue; /* whole at no pool size */
        whole = MS_PLAN_CHUNKS_IN_POOL * (per_row * rows + slack);
        if (whole <= pool && whole > keep)
            keep = whole;
    }
    if (keep >= pool)
        return 0;
    return pool - keep < pool / 4 ? pool - keep : pool / 4;
}

static int plan_chunking(ms_job *job, uint64_t pool_bytes, ms_error *err)
{
    uint64_t rows = job->params.rows ? job->params.rows : 1;
    uint64_t per_row = job_stage_row_bytes(job);
    uint64_t slack = job_chunk_slack(job);
    if (per_row + slack > pool_bytes)
        return ms_error_set(err, MS_EXIT_USAGE, job->name,
                            "one row needs %" PRIu64 " bytes of staging memory but the pool holds %" PRIu64
                            "; raise --max-memory",
                            per_row + slack, pool_bytes);
    uint64_t budget = pool_bytes / MS_PLAN_CHUNKS_IN_POOL;
    uint64_t fit = budget > slack ? (budget - slack) / (per_row ? per_row : 1) : 0;
    if (fit == 0)
        fit = 1;
    job->rows_per_chunk = fit >= rows ? rows : fit;
    job->n_chunks = (rows + job->rows_per_chunk - 1) / job->rows_per_chunk;
    for (unsigned i = 0; i < job->n_inputs && job->n_chunks > 1; i++) {
        const ms_lora_target *t = job->in[i].lora;
        if (t && t->magnitude && t->transposed) /* its column norms span every row (cpu_lora_needs_stats) */
            return ms_error_set(err, MS_EXIT_USAGE, job->name,
                                "a DoRA adapter over columns (fan_in_fan_out or embeddings) needs the whole tensor "
                                "in one chunk (%.1f MiB of staging), but a chunk may take only a third of the "
                                "%.1f MiB staging pool; raise --max-memory",
                                (double)(per_row * rows + slack) / 1048576.0, (double)pool_bytes / 1048576.0);
    }
    uint64_t in_bytes = 0;
    for (unsigned i = 0; i < job->n_inputs; i++)
        in_bytes += job->in[i].row_bytes * job->params.rows;
    job->read_bytes = job->n_chunks == 1 ? in_bytes : in_bytes * job->n_passes;
    return 0;
}

/* Staging bytes of a job's largest chunk: its inputs and its output, each
 * rounded up to the pool's page granularity, and the inputs' O_DIRECT blocks. */
static uint64_t job_max_item_bytes(const ms_job *job)
{
    uint64_t in = 0;
    for (unsigned i = 0; i < job->n_inputs; i++)
        in += ms_job_input_stage_row_bytes(&job->in[i], job->params.cols) * job->rows_per_chunk;
    uint64_t out = job->kind == MS_JOB_COPY ? 0 : job->out_row_bytes * job->rows_per_chunk;
    return (in + 4095) / 4096 * 4096 + (out + 4095) / 4096 * 4096 + job_direct_slack(job);
}

static int plan_merge_job(ms_plan *plan, ms_job *job, const st_tensor *lt, ms_error *err)
{
    const ms_recipe *r = plan->recipe;
    if (ms_recipe_tensor_params(r, lt->name, plan->num_layers, &job->params, err) != 0)
        return -1;
    ms_tensor_params *p = &job->params;
    job->kind = MS_JOB_MERGE;
    tensor_rows_cols(lt, &p->rows, &p->cols);
    p->numel = lt->numel;
    p->out_dtype = job->out_dtype;
    ms_merge_philox_key(lt->name, plan->seed, p->philox_key);
    job->n_inputs = 1 + p->n_models;
    for (unsigned i = p->has_base ? 0 : 1; i <= p->n_models; i++)
        if (plan_job_input(plan, job, i, lt, err) != 0)
            return -1;
    /* without a base (linear) slot 0 stays empty: the kernels read 1..n */
    job->n_passes = ms_merge_pass_count(p);
    return 0;
}

/* Output dtype (DESIGN.md): out_dtype, else dtype, else the input's; non-float tensors keep theirs. */
static st_dtype plan_out_dtype(const ms_recipe *r, st_dtype in)
{
    if (!st_dtype_is_mergeable_float(in))
        return in;
    return r->has_out_dtype ? r->out_dtype : r->has_dtype ? r->dtype : in;
}

/* A byte-for-byte copy of tensor t of file f: a byte stream, one "row" per
 * byte, so any tensor (sub-byte dtypes included) chunks cleanly. */
static void plan_copy_job(ms_job *job, const st_file *f, const st_tensor *t)
{
    job->kind = MS_JOB_COPY;
    job->n_inputs = 1;
    job->n_passes = 1;
    job->params.numel = t->numel;
    job->params.rows = t->end - t->begin;
    job->params.cols = 1;
    job->params.in_dtype[0] = job->params.out_dtype = t->dtype;
    job->in[0] = (ms_job_input){.file = f, .offset = st_file_tensor_offset(f, t), .row_bytes = 1, .read_dtype = t->dtype};
}

/* The layer index in "model.layers.N.rest", with rest; false for other names. */
static bool layer_name_split(const char *name, unsigned *layer, const char **rest)
{
    static const char prefix[] = "model.layers.";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0)
        return false;
    char *end;
    unsigned long n = strtoul(name + sizeof prefix - 1, &end, 10);
    if (end == name + sizeof prefix - 1 || *end != '.')
        return false;
    *layer = (unsigned)n;
    *rest = end + 1;
    return true;
}

/* "model.layers.N.rest" into buf; -1 with err when it does not fit. */
static int plan_layer_name(const ms_plan *plan, char *buf, size_t size, unsigned layer, const char *rest, ms_error *err)
{
    int n = snprintf(buf, size, "model.layers.%u.%s", layer, rest);
    if (n < 0 || (size_t)n >= size)
        return ms_error_set(err, MS_EXIT_DATA, plan->layout->path, "tensor name 'model.layers.%u.%s' is too long", layer,
                            rest);
    return 0;
}

static ms_job *plan_push_job(ms_plan *plan, size_t *cap, ms_error *err)
{
    if (plan->n_jobs == *cap) {
        size_t n = *cap ? *cap * 2 : 64;
        ms_job *grown = realloc(plan->jobs, n * sizeof *grown);
        if (!grown)
            return ms_error_set(err, MS_EXIT_RUNTIME, plan->recipe->source_path, "out of memory"), NULL;
        plan->jobs = grown;
        *cap = n;
    }
    ms_job *job = &plan->jobs[plan->n_jobs++];
    memset(job, 0, sizeof *job);
    return job;
}

/* One passthrough output tensor `out_name` from tensor t of source model i
 * (0: the base, with scale 1): a byte copy, or (scale != 1, a dtype change,
 * or a tensor the model's PEFT adapter changes) a linear "merge" of that one
 * model with weight = scale, so the rounding is the kernels' and the
 * adapter is applied as in every other method. A scale gradient is read at
 * grad_t, the position in the source's slice, or (grad_t < 0, a whole model)
 * at the tensor's layer in the model. */
static int plan_passthrough_job(ms_plan *plan, size_t *cap, const char *out_name, unsigned i, size_t t,
                                double grad_t, ms_error *err)
{
    const ms_model *m = i == 0 ? plan->base : plan->models[i];
    const st_tensor *st = m->tensors[t].info;
    const ms_lora_target *lora = plan->adapters[i] ? ms_peft_target(plan->adapters[i], st->name) : NULL;
    double scale = 1.0;
    int rc = 0;
    if (i > 0 && st_dtype_is_mergeable_float(st->dtype))
        rc = grad_t >= 0 ? ms_recipe_model_param_at(plan->recipe, i - 1, MS_PARAM_SCALE, st->name, grad_t, &scale, err)
                         : ms_recipe_model_param(plan->recipe, i - 1, MS_PARAM_SCALE, st->name, plan->num_layers,
                                                 &scale, err);
    if (rc != 0)
        return -1;
    ms_job *job = plan_push_job(plan, cap, err);
    if (!job)
        return -1;
    if (!(job->owned_name = strdup(out_name)))
        return ms_error_set(err, MS_EXIT_RUNTIME, plan->recipe->source_path, "out of memory");
    job->name = job->owned_name;
    job->out_ndim = st->ndim;
    memcpy(job->out_shape, st->shape, sizeof job->out_shape);
    job->out_dtype = plan_out_dtype(plan->recipe, st->dtype);
    const st_file *f = ms_model_tensor_file(m, t);
    if (!st_dtype_is_mergeable_float(st->dtype) || st->numel == 0 ||
        (scale == 1.0 && job->out_dtype == st->dtype && !lora)) {
        plan_copy_job(job, f, st);
        return 0;
    }
    ms_tensor_params *p = &job->params;
    p->method = MS_METHOD_LINEAR;
    p->sparsify = MS_SPARSIFY_NONE;
    p->n_models = 1;
    p->weight[1] = (float)scale;
    p->normalize = false;
    p->has_base = false;
    p->lambda = 1.0f;
    p->numel = st->numel;
    tensor_rows_cols(st, &p->rows, &p->cols);
    p->out_dtype = job->out_dtype;
    job->kind = MS_JOB_MERGE;
    job->n_inputs = 2;
    if (plan_job_input_named(plan, job, 1, m, plan->adapters[i], st, st->name, err) != 0)
        return -1;
    job->n_passes = ms_merge_pass_count(p);
    return 0;
}

/* tokenizer_source's tokenizer comes with the output, its embeddings do
 * not: when that model's config.json gives another vocab_size than the
 * layout model's, say so (mergekit resizes the embeddings; we do not). */
static void plan_check_tokenizer_vocab(const ms_plan *plan)
{
    const char *tok = plan->recipe->tokenizer_source;
    long have = ms_model_config_int(plan->layout, "vocab_size", -1);
    if (!tok || have < 0)
        return;
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", tok);
    cJSON *cfg = NULL;
    ms_error ignored = {0};
    if (ms_small_file_json(path, 1u << 24, &cfg, &ignored) != 0)
        return; /* no config (or not JSON): nothing to compare */
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "vocab_size");
    if (cJSON_IsNumber(v) && (long)v->valuedouble != have)
        ms_log_warn("tokenizer_source %s has vocab_size %ld but the merged embeddings have %ld rows (from %s): "
                    "the output's tokenizer and embeddings disagree (mergekit resizes the embeddings; mergestream "
                    "does not)",
                    tok, (long)v->valuedouble, have, plan->layout->path);
    cJSON_Delete(cfg);
}

/* The output has the layout model's tensors: one line per merged model
 * that has tensors the layout lacks (a value head, a vision tower), as they
 * are not merged and not written. */
static void plan_note_extra_tensors(const ms_plan *plan)
{
    for (unsigned i = 1; i <= plan->n_models; i++) {
        const ms_model *m = plan->models[i];
        if (m == plan->layout)
            continue;
        size_t extra = 0, first = 0;
        for (size_t t = 0; t < m->n_tensors; t++)
            if (ms_model_find(plan->layout, m->tensors[t].info->name) < 0 && extra++ == 0)
                first = t;
        if (extra)
            ms_log_warn("%s ('%s') has %zu tensor%s %s lacks (the first '%s'): %s not in the output",
                        plan->recipe->models[i - 1].label, plan->recipe->models[i - 1].name, extra,
                        extra == 1 ? "" : "s", plan->layout->path, m->tensors[first].info->name,
                        extra == 1 ? "it is" : "they are");
    }
}

/* A model's layer count: config.json's num_hidden_layers, else inferred from names. */
static unsigned plan_model_layers(const ms_model *m)
{
    long n = ms_model_config_int(m, "num_hidden_layers", -1);
    return n > 0 ? (unsigned)n : infer_num_layers(m);
}

/* A slice source's layer_range [a, b) against model m's layers: 0, or -1 with
 * err (MS_EXIT_USAGE) at the slice's line, naming the source. */
static int plan_check_range(const ms_plan *plan, const ms_recipe_slice *sl, const char *label, const char *name,
                            const ms_model *m, unsigned a, unsigned b, ms_error *err)
{
    unsigned have = plan_model_layers(m);
    if (b <= have)
        return 0;
    char where[4200];
    snprintf(where, sizeof where, "%s:%u", plan->recipe->source_path, sl->line);
    return ms_error_set(err, MS_EXIT_USAGE, where, "slices[%u] layer_range [%u, %u) is out of bounds: '%s' has %u layers (%s)",
                        sl->index, a, b, name, have, label);
}

/* passthrough (frankenmerges): the layout model's non-layer tensors in
 * place, and where its first layer tensor stands, the output layers: slice by
 * slice, each source layer's tensors in the source's on-disk order, renamed
 * model.layers.N. with N counting from 0. Without slices the one model is
 * copied whole (with its scale). config.json gets the new layer count. */
static int plan_passthrough_jobs(ms_plan *plan, ms_error *err)
{
    const ms_recipe *r = plan->recipe;
    const ms_model *lay = plan->layout;
    size_t cap = lay->n_tensors ? lay->n_tensors : 1; /* plan->jobs holds that many already */
    unsigned out_layers = 0;
    for (unsigned i = 1; i <= plan->n_models; i++) {
        const ms_recipe_model *rm = &r->models[i - 1];
        unsigned a = rm->has_layer_range ? rm->layer_begin : 0;
        unsigned b = rm->has_layer_range ? rm->layer_end : plan_model_layers(plan->models[i]);
        if (rm->has_layer_range &&
            plan_check_range(plan, &r->slices[rm->slice], rm->label, rm->name, plan->models[i], a, b, err) != 0)
            return -1;
        out_layers += b - a;
    }
    plan->out_num_layers = out_layers;
    bool layers_done = false;
    char name[512];
    for (size_t t = 0; t < lay->n_tensors; t++) {
        unsigned layer;
        const char *rest;
        if (!layer_name_split(lay->tensors[t].info->name, &layer, &rest)) {
            /* non-layer tensors: with slices, mergekit's pre-weights (names with
             * "embed") from the first slice's source and its post-weights (the
             * final norm, lm_head) from the last one's, with their scale;
             * without, from the base, else the one model */
            if (r->has_slices) {
                const char *tn = lay->tensors[t].info->name;
                unsigned src = strstr(tn, "embed") ? 1 : plan->n_models;
                long u = ms_model_find(plan->models[src], tn);
                if (u < 0)
                    return ms_error_set(err, MS_EXIT_DATA, plan->recipe->source_path,
                                        "tensor '%s' is missing from '%s' (%s)", tn, r->models[src - 1].name,
                                        r->models[src - 1].label);
                if (plan_passthrough_job(plan, &cap, tn, src, (size_t)u, 0.0, err) != 0) /* as mergekit: t = 0 */
                    return -1;
            } else if (plan->base) {
                if (plan_passthrough_job(plan, &cap, lay->tensors[t].info->name, 0, t, -1.0, err) != 0)
                    return -1;
            } else if (plan_passthrough_job(plan, &cap, lay->tensors[t].info->name, 1, t, -1.0, err) != 0) {
                return -1;
            }
            continue;
        }
        if (layers_done)
            continue;
        layers_done = true;
        unsigned out_layer = 0;
        for (unsigned i = 1; i <= plan->n_models; i++) {
            const ms_recipe_model *rm = &r->models[i - 1];
            const ms_model *m = plan->models[i];
            unsigned a = rm->has_layer_range ? rm->layer_begin : 0;
            unsigned b = a + (rm->has_layer_range ? rm->layer_end - rm->layer_begin : out_layers);
            for (unsigned src_layer = a; src_layer < b; src_layer++, out_layer++) {
                /* a slice's gradients run over its own layers (t = k / (n - 1), 1 for one layer) */
                double grad_t = !rm->has_layer_range ? -1.0 : b - a > 1 ? (double)(src_layer - a) / (double)(b - a - 1)
                                                                        : 1.0;
                for (size_t u = 0; u < m->n_tensors; u++) {
                    unsigned l;
                    if (!layer_name_split(m->tensors[u].info->name, &l, &rest) || l != src_layer)
                        continue;
                    if (plan_layer_name(plan, name, sizeof name, out_layer, rest, err) != 0 ||
                        plan_passthrough_job(plan, &cap, name, i, u, grad_t, err) != 0)
                        return -1;
                }
            }
        }
    }
    return 0;
}


/* The model slice s takes its base layers from, with its adapter in *peft:
 * the slice's own base_model, else the top-level one. */
static const ms_model *plan_slice_base(const ms_plan *plan, unsigned s, const ms_peft **peft)
{
    if (plan->slice_bases[s]) {
        *peft = plan->slice_base_adapters[s];
        return plan->slice_bases[s];
    }
    *peft = plan->adapters[0];
    return plan->base;
}

/* One output tensor out_name of slice s merged by the recipe's method. ref
 * (in ref_file) is the reference source's tensor: shape, dtype, and the copy
 * for a non-float or empty tensor. With rest (a layer tensor "model.layers.
 * N.rest", output layer k of the slice) each source contributes its layer
 * first + k; without, every source's tensor of the same name. t: the
 * gradient position. */
static int plan_slice_job(ms_plan *plan, size_t *cap, unsigned s, const char *out_name, const st_file *ref_file,
                          const st_tensor *ref, const char *rest, unsigned k, double t, ms_error *err)
{
    const ms_recipe *r = plan->recipe;
    const ms_recipe_slice *sl = &r->slices[s];
    ms_job *job = plan_push_job(plan, cap, err);
    if (!job)
        return -1;
    if (!(job->owned_name = strdup(out_name)))
        return ms_error_set(err, MS_EXIT_RUNTIME, r->source_path, "out of memory");
    job->name = job->owned_name;
    job->out_ndim = ref->ndim;
    memcpy(job->out_shape, ref->shape, sizeof job->out_shape);
    job->out_dtype = plan_out_dtype(r, ref->dtype);
    if (!st_dtype_is_mergeable_float(ref->dtype) || ref->numel == 0) {
        plan_copy_job(job, ref_file, ref); /* as the whole-model merge: from the reference */
        return 0;
    }
    char names[MS_MAX_MODELS + 1][512]; /* [0]: the base's; [j]: merged source j's */
    const char *src[MS_MAX_MODELS];
    for (unsigned j = 0; j <= sl->n_models; j++) {
        unsigned first = j == 0 ? sl->base_begin : r->models[sl->first_model + j - 1].layer_begin;
        if (rest && plan_layer_name(plan, names[j], sizeof names[j], first + k, rest, err) != 0)
            return -1;
        if (!rest)
            snprintf(names[j], sizeof names[j], "%s", out_name);
        if (j > 0)
            src[j - 1] = names[j];
    }
    if (ms_recipe_slice_tensor_params(r, s, out_name, src, t, &job->params, err) != 0)
        return -1;
    ms_tensor_params *p = &job->params;
    MS_ASSERT(p->has_base == sl->has_base || !p->has_base);
    job->kind = MS_JOB_MERGE;
    tensor_rows_cols(ref, &p->rows, &p->cols);
    p->numel = ref->numel;
    p->out_dtype = job->out_dtype;
    ms_merge_philox_key(out_name, plan->seed, p->philox_key); /* the output's name: a full slice = the whole merge */
    job->n_inputs = 1 + p->n_models;
    const ms_peft *base_peft;
    const ms_model *base = plan_slice_base(plan, s, &base_peft);
    if (p->has_base && plan_job_input_named(plan, job, 0, base, base_peft, ref, names[0], err) != 0)
        return -1;
    for (unsigned j = 1; j <= p->n_models; j++) {
        unsigned mi = sl->first_model + j;
        if (plan_job_input_named(plan, job, j, plan->models[mi], plan->adapters[mi], ref, names[j], err) != 0)
            return -1;
    }
    job->n_passes = ms_merge_pass_count(p);
    return 0;
}

/* slices with a merge method (recipe.h): the layout model's non-layer
 * tensors in place, merged at t = 0 over the first slice's sources (names
 * with "embed") or the last slice's; where its first layer tensor
 * stands, the output layers slice by slice: output layer k of a slice merges
 * layer first_i + k of every source, its tensors in the reference source's
 * on-disk order (the base's, else the first merged source's), renamed
 * model.layers.N. with N counting from 0. */
static int plan_slice_jobs(ms_plan *plan, ms_error *err)
{
    const ms_recipe *r = plan->recipe;
    const ms_model *lay = plan->layout;
    size_t cap = lay->n_tensors ? lay->n_tensors : 1; /* plan->jobs holds that many already */
    unsigned out_layers = 0;
    for (unsigned s = 0; s < r->n_slices; s++) {
        const ms_recipe_slice *sl = &r->slices[s];
        const ms_peft *unused;
        if (sl->has_base &&
            plan_check_range(plan, sl, "the base_model", sl->base_override ? sl->base_name : r->base_name,
                             plan_slice_base(plan, s, &unused), sl->base_begin, sl->base_end, err) != 0)
            return -1;
        for (unsigned j = 0; j < sl->n_models; j++) {
            const ms_recipe_model *rm = &r->models[sl->first_model + j];
            if (plan_check_range(plan, sl, rm->label, rm->name, plan->models[sl->first_model + j + 1], rm->layer_begin,
                                 rm->layer_end, err) != 0)
                return -1;
        }
        out_layers += sl->n_layers;
    }
    plan->out_num_layers = out_layers;
    bool layers_done = false;
    char name[512];
    for (size_t t = 0; t < lay->n_tensors; t++) {
        const st_tensor *lt = lay->tensors[t].info;
        unsigned layer;
        const char *rest;
        if (!layer_name_split(lt->name, &layer, &rest)) {
            bool pre = strstr(lt->name, "embed") != NULL;
            /* mergekit reads both at t = 0 (its module-level ConfigReader) */
            if (plan_slice_job(plan, &cap, pre ? 0 : r->n_slices - 1, lt->name, ms_model_tensor_file(lay, t), lt, NULL,
                               0, 0.0, err) != 0)
                return -1;
            continue;
        }
        if (layers_done)
            continue;
        layers_done = true;
        unsigned out_layer = 0;
        for (unsigned s = 0; s < r->n_slices; s++) {
            const ms_recipe_slice *sl = &r->slices[s];
            const ms_peft *unused;
            const ms_model *ref = sl->has_base ? plan_slice_base(plan, s, &unused) : plan->models[sl->first_model + 1];
            unsigned ref_first = sl->has_base ? sl->base_begin : r->models[sl->first_model].layer_begin;
            for (unsigned k = 0; k < sl->n_layers; k++, out_layer++) {
                /* mergekit's plan_slice: t runs over the slice, 1 for a one-layer slice */
                double tk = sl->n_layers > 1 ? (double)k / (double)(sl->n_layers - 1) : 1.0;
                for (size_t u = 0; u < ref->n_tensors; u++) {
                    const st_tensor *rt = ref->tensors[u].info;
                    unsigned l;
                    if (!layer_name_split(rt->name, &l, &rest) || l != ref_first + k)
                        continue;
                    if (plan_layer_name(plan, name, sizeof name, out_layer, rest, err) != 0 ||
                        plan_slice_job(plan, &cap, s, name, ms_model_tensor_file(ref, u), rt, rest, k, tk, err) != 0)
                        return -1;
                }
            }
        }
    }
    return 0;
}

int ms_plan_build(const char *recipe_path, const ms_plan_options *opt, ms_plan **out, ms_error *err)
{
    *out = NULL;
    ms_plan *plan = calloc(1, sizeof *plan);
    if (!plan)
        return ms_error_set(err, MS_EXIT_RUNTIME, recipe_path, "out of memory");
    if (ms_recipe_load(recipe_path, &plan->recipe, err) != 0)
        goto fail;
    const ms_recipe *r = plan->recipe;
    if (r->base_path && plan_open_model(r->base_path, r->base_adapter_path, &plan->base, &plan->adapters[0], err) != 0)
        goto fail;
    plan->n_models = r->n_models;
    for (unsigned i = 1; i <= r->n_models; i++) {
        const ms_recipe_model *rm = &r->models[i - 1];
        if (plan_open_model(rm->path, rm->adapter_path, &plan->models[i], &plan->adapters[i], err) != 0)
            goto fail;
        if (plan->models[i]->kind == MS_MODEL_KIND_ADAPTER) {
            char where[4200];
            snprintf(where, sizeof where, "%s:%u", r->source_path, rm->line);
            ms_error_set(err, MS_EXIT_USAGE, where, "'%s' is a PEFT adapter; name it as BASE_DIR+ADAPTER_DIR", rm->name);
            goto fail;
        }
    }
    for (unsigned s = 0; s < r->n_slices; s++) {
        const ms_recipe_slice *sl = &r->slices[s];
        if (sl->base_override && sl->has_base &&
            plan_open_model(sl->base_path, sl->base_adapter_path, &plan->slice_bases[s], &plan->slice_base_adapters[s],
                            err) != 0)
            goto fail;
    }
    bool any_hessian = false;
    for (unsigned i = 1; i <= plan->n_models; i++) {
        const char *hp = r->models[i - 1].hessian_path;
        if (hp && ms_hessian_set_open(hp, &plan->hessians[i], err) < 0)
            goto fail;
        any_hessian = any_hessian || hp;
    }
    if (ms_merge_hessian_method(r->method) && !any_hessian) {
        /* per weight a missing Hessian falls back (logged); for the whole recipe it is a mistake */
        char where[4200];
        snprintf(where, sizeof where, "%s:%u", recipe_path, r->method_line);
        ms_error_set(err, MS_EXIT_USAGE, where,
                     "merge_method '%s' needs `hessian: DIR` on at least one model (made by `mergestream "
                     "hessian`); without any it would merge as %s",
                     ms_method_name(r->method),
                     r->method == MS_METHOD_REGMEAN ? "the mean of the models" : "with magnitude trimming");
        goto fail;
    }
    plan->layout = plan->base ? plan->base : plan->models[1];
    plan_check_tokenizer_vocab(plan);
    long layers = ms_model_config_int(plan->layout, "num_hidden_layers", -1);
    plan->num_layers = layers > 0 ? (unsigned)layers : infer_num_layers(plan->layout);
    plan->seed = opt->has_seed ? opt->seed : r->has_random_seed ? r->random_seed : 0;

    const ms_model *lay = plan->layout;
    plan->jobs = calloc(lay->n_tensors ? lay->n_tensors : 1, sizeof *plan->jobs);
    if (!plan->jobs) {
        ms_error_set(err, MS_EXIT_RUNTIME, recipe_path, "out of memory");
        goto fail;
    }
    if (r->method == MS_METHOD_PASSTHROUGH) {
        if (plan_passthrough_jobs(plan, err) != 0)
            goto fail;
    } else if (r->has_slices) {
        if (plan_slice_jobs(plan, err) != 0)
            goto fail;
    }
    if (r->method != MS_METHOD_PASSTHROUGH && !r->has_slices)
        plan_note_extra_tensors(plan);
    for (size_t t = 0; t < lay->n_tensors && r->method != MS_METHOD_PASSTHROUGH && !r->has_slices; t++) {
        const st_tensor *lt = lay->tensors[t].info;
        ms_job *job = &plan->jobs[plan->n_jobs++];
        job->name = lt->name;
        job->out_ndim = lt->ndim;
        memcpy(job->out_shape, lt->shape, sizeof job->out_shape);
        job->out_dtype = plan_out_dtype(r, lt->dtype);
        if (st_dtype_is_mergeable_float(lt->dtype) && lt->numel > 0) {
            if (plan_merge_job(plan, job, lt, err) != 0)
                goto fail;
        } else {
            plan_copy_job(job, ms_model_tensor_file(lay, t), lt); /* non-float or empty: from the layout model */
        }
    }
    for (size_t j = 0; j < plan->n_jobs; j++) {
        ms_job *job = &plan->jobs[j];
        job->out_row_bytes = job->kind == MS_JOB_COPY ? 0 : (uint64_t)st_dtype_bits(job->out_dtype) / 8 * job->params.cols;
        job->out_bytes = job->kind == MS_JOB_COPY ? job->params.rows : job->out_row_bytes * job->params.rows;
        if (job->kind == MS_JOB_MERGE && ms_merge_hessian_method(job->params.method))
            for (unsigned i = 1; i <= job->params.n_models; i++)
                if (ms_hessian_set_check(plan->hessians[i], job->name, job->params.cols, err) != 0)
                    goto fail;
        if (job->kind == MS_JOB_MERGE)
            plan_note_extra(plan, job, opt->threads);
    }
    uint64_t spare = plan_capture_budget(plan, opt->pool_bytes);
    for (size_t j = 0; j < plan->n_jobs && spare > 0; j++) {
        ms_job *job = &plan->jobs[j];
        if (job->kind != MS_JOB_MERGE || !(job->params.capture_entries = plan_capture_entries(&job->params, spare)))
            continue;
        plan_note_extra(plan, job, opt->threads);
    }
    if (plan->extra_bytes + MS_PLAN_MIN_POOL_BYTES > opt->pool_bytes) {
        uint64_t need = MS_POOL_OVERHEAD_BYTES + plan->extra_bytes + MS_PLAN_MIN_POOL_BYTES; /* ms_pool_capacity_for */
        ms_error_set(err, MS_EXIT_USAGE, recipe_path,
                     "--max-memory is too small: this merge needs at least %" PRIu64 " MiB (%.1f MiB of merge "
                     "statistics and kernel scratch, %.0f MiB of staging, %.0f MiB for the program itself)",
                     (need + (1u << 20) - 1) >> 20, (double)plan->extra_bytes / 1048576.0,
                     (double)MS_PLAN_MIN_POOL_BYTES / 1048576.0, (double)MS_POOL_OVERHEAD_BYTES / 1048576.0);
        goto fail;
    }
    plan->pool_bytes = opt->pool_bytes - plan->extra_bytes;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        ms_job *job = &plan->jobs[j];
        if (plan_chunking(job, plan->pool_bytes, err) != 0)
            goto fail;
        plan->total_read_bytes += job->read_bytes;
        uint64_t item = job_max_item_bytes(job);
        if (item > plan->max_item_bytes)
            plan->max_item_bytes = item;
        plan->total_out_bytes += job->out_bytes;
    }
    *out = plan;
    return 0;
fail:
    ms_plan_free(plan);
    return -1;
}

void ms_plan_free(ms_plan *plan)
{
    if (!plan)
        return;
    for (size_t j = 0; plan->jobs && j < plan->n_jobs; j++)
        free(plan->jobs[j].owned_name);
    free(plan->jobs);
    for (unsigned i = 0; i <= MS_MAX_MODELS; i++)
        ms_hessian_set_close(plan->hessians[i]);
    for (unsigned i = 0; i <= plan->n_models; i++)
        ms_peft_close(plan->adapters[i]); /* before the models they point into */
    for (unsigned s = 0; s < MS_MAX_MODELS; s++) {
        ms_peft_close(plan->slice_base_adapters[s]);
        ms_model_close(plan->slice_bases[s]);
    }
    for (unsigned i = 1; i <= plan->n_models; i++)
        ms_model_close(plan->models[i]);
    ms_model_close(plan->base);
    ms_recipe_free(plan->recipe);
    free(plan);
}

unsigned ms_plan_input_count(const ms_plan *plan) { return 1 + plan->n_models + MS_MAX_MODELS; }

const ms_model *ms_plan_input_model(const ms_plan *plan, unsigned i)
{
    MS_ASSERT(i < ms_plan_input_count(plan));
    if (i == 0)
        return plan->base;
    if (i <= plan->n_models)
        return plan->models[i];
    return plan->slice_bases[i - 1 - plan->n_models];
}
