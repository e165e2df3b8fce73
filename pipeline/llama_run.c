#include "pipeline/llama_run.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/ms_fault.h"
#include "pipeline/layer_prefetch.h"
#include "pipeline/progress.h"

#define HEAD_SLICE_BYTES (256ull << 20)   /* default lm_head slice and logits buffer, each */
#define PROGRESS_TTY_S 0.2
#define PROGRESS_LOG_S 5.0

/* ============================================================ statistics */

void ms_llama_stat_name(uint64_t layer, ms_llama_stat which, char *buf, size_t n)
{
    static const char *const k_names[] = {"self_attn.qkv_input", "self_attn.o_proj", "mlp.gate_up_input",
                                          "mlp.down_proj"};
    MS_ASSERT(which < MS_LLAMA_STAT_COUNT);
    snprintf(buf, n, "model.layers.%" PRIu64 ".%s", layer, k_names[which]);
}

uint64_t ms_llama_stat_dim(const cpu_llama_config *c, ms_llama_stat which)
{
    switch (which) {
    case MS_LLAMA_STAT_QKV: return c->hidden;
    case MS_LLAMA_STAT_O: return cpu_llama_q_dim(c);
    case MS_LLAMA_STAT_GATE_UP: return c->hidden;
    case MS_LLAMA_STAT_DOWN: return c->intermediate;
    default: MS_ASSERT(!"bad statistic"); return 0;
    }
}

const char *const *ms_llama_stat_modules(ms_llama_stat which)
{
    static const char *const qkv[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", NULL};
    static const char *const o[] = {"self_attn.o_proj", NULL};
    static const char *const gate_up[] = {"mlp.gate_proj", "mlp.up_proj", NULL};
    static const char *const down[] = {"mlp.down_proj", NULL};
    static const char *const *const k_all[] = {qkv, o, gate_up, down};
    MS_ASSERT(which < MS_LLAMA_STAT_COUNT);
    return k_all[which];
}

/* ============================================================ tokens */

static void tokens_free(ms_llama_tokens *t)
{
    free(t->tok_start);
    free(t->pos);
    free(t->id);
    free(t->target);
    *t = (ms_llama_tokens){0};
}

static int tokens_pack(const ms_calib *c, ms_llama_tokens *t, ms_error *err)
{
    *t = (ms_llama_tokens){.n_samples = c->n_samples, .n = c->n_real};
    t->tok_start = malloc((size_t)(c->n_samples + 1) * sizeof *t->tok_start);
    t->pos = malloc((size_t)c->n_real * sizeof *t->pos);
    t->id = malloc((size_t)c->n_real * sizeof *t->id);
    t->target = malloc((size_t)c->n_real * sizeof *t->target);
    if (!t->tok_start || !t->pos || !t->id || !t->target) {
        tokens_free(t);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, c->path, "cannot pack the calibration tokens");
    }
    uint64_t k = 0;
    for (uint64_t s = 0; s < c->n_samples; s++) {
        t->tok_start[s] = k;
        for (uint64_t p = 0; p < c->seq_len; p++) {
            uint64_t cell = s * c->seq_len + p;
            if (!c->mask[cell])
                continue;
            t->pos[k] = (uint32_t)p;
            t->id[k] = c->ids[cell];
            bool next_real = p + 1 < c->seq_len && c->mask[cell + 1];
            t->target[k] = next_real ? c->ids[cell + 1] : -1;
            k++;
        }
    }
    MS_ASSERT(k == c->n_real);
    t->tok_start[c->n_samples] = k;
    return 0;
}

/* ============================================================ residual stream */

/* rows x width fp32: in RAM, or in an unlinked file with one batch in RAM. */
typedef struct act_store {
    uint64_t rows, width;
    float *ram; /* all rows, or NULL when spilled */
    const cpu_llama_gemm *pinned; /* ram came from its host_alloc */
    int fd;     /* spill file, or -1 */
    float *buf; /* spilled: one batch (max_rows rows) */
    uint64_t max_rows;
    char *where; /* the spill directory, for messages */
} act_store;

static int spill_open(const char *dir, ms_error *err)
{
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0)
        return fd;
    char *tmpl = NULL;
    if (asprintf(&tmpl, "%s/mergestream-act.XXXXXX", dir) < 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot create a spill file");
    fd = mkostemp(tmpl, O_CLOEXEC);
    if (fd < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot create a spill file");
        free(tmpl);
        return -1;
    }
    unlink(tmpl);
    free(tmpl);
    return fd;
}

/* gpu (NULL: none): the rows in RAM come from its host allocator where it
 * gives them (pinned: a GPU layer's rows go up and come back at full bus
 * speed each batch), else from malloc. */
static int act_open(act_store *a, uint64_t rows, uint64_t width, uint64_t max_rows, uint64_t budget,
                    const char *dir, const cpu_llama_gemm *gpu, ms_error *err)
{
    *a = (act_store){.rows = rows, .width = width, .fd = -1, .max_rows = max_rows};
    uint64_t bytes = rows * width * 4;
    if (bytes <= budget) {
        if (gpu && gpu->host_alloc && gpu->host_free && (a->ram = gpu->host_alloc(gpu->ctx, bytes)) != NULL) {
            a->pinned = gpu;
            return 0;
        }
        a->ram = malloc((size_t)bytes);
        if (!a->ram)
            return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "activations", "cannot hold %" PRIu64 " bytes",
                                  bytes);
        return 0;
    }
    if (!dir)
        dir = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    a->where = strdup(dir);
    a->buf = malloc((size_t)(max_rows * width * 4));
    if (!a->where || !a->buf)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "activations", "cannot allocate the batch buffer");
    a->fd = spill_open(dir, err);
    return a->fd < 0 ? -1 : 0;
}

static void act_close(act_store *a)
{
    if (a->pinned)
        a->pinned->host_free(a->pinned->ctx, a->ram);
    else
        free(a->ram);
    free(a->buf);
    free(a->where);
    if (a->fd >= 0)
        close(a->fd);
    *a = (act_store){.fd = -1};
}

/* Rows [t0, t0 + n): a pointer into RAM, or the batch buffer (filled from the
 * spill file when load). NULL with err set on a read failure. */
static float *act_rows(act_store *a, uint64_t t0, uint64_t n, bool load, ms_error *err)
{
    if (a->ram)
        return a->ram + t0 * a->width;
    MS_ASSERT(n <= a->max_rows);
    if (load && ms_pread_exact(a->fd, a->where, a->buf, (size_t)(n * a->width * 4), t0 * a->width * 4, err) < 0)
        return NULL;
    return a->buf;
}

/* Writes the batch buffer back (spilled store; a no-op in RAM). */
static int act_put(act_store *a, uint64_t t0, uint64_t n, ms_error *err)
{
    if (a->ram || n == 0)
        return 0;
    int rc = ms_pwrite_all(a->fd, a->buf, (size_t)(n * a->width * 4), t0 * a->width * 4);
    return rc < 0 ? ms_error_errno(err, MS_EXIT_RUNTIME, -rc, a->where, "cannot write the spill file") : 0;
}

/* ============================================================ progress */

typedef struct run_progress {
    const char *label;
    bool tty;
    double start, last;
    double total, done; /* token-passes: tokens x (layers + head) */
    uint64_t n_samples, n_tokens, passes;
    bool drew;
} run_progress;

static void progress_step(run_progress *p, double units, const char *what)
{
    p->done += units;
    if (!p->label || ms_log_is_quiet())
        return;
    double now = ms_now_seconds();
    if (now - p->last < (p->tty ? PROGRESS_TTY_S : PROGRESS_LOG_S) && p->done < p->total)
        return;
    p->last = now;
    double el = now - p->start, frac = p->total > 0 ? p->done / p->total : 1;
    /* samples (tokens) through the whole model per second */
    double tok_s = el > 0 ? p->done / (double)p->passes / el : 0;
    double smp_s = p->n_tokens ? tok_s * (double)p->n_samples / (double)p->n_tokens : 0;
    double eta = frac > 0 ? el * (1 - frac) / frac : -1;
    char eta_s[32];
    if (eta < 0)
        snprintf(eta_s, sizeof eta_s, "?");
    else if (eta < 100)
        snprintf(eta_s, sizeof eta_s, "%.0fs", eta);
    else
        snprintf(eta_s, sizeof eta_s, "%dm%02ds", (int)eta / 60, (int)eta % 60);
    fprintf(stderr, "%s%s: %-28s %5.1f%%  %.2f samples/s  %.0f tok/s  ETA %s%s", p->tty ? "\r\033[K" : "",
            p->label, what, 100 * frac, smp_s, tok_s, eta_s, p->tty ? "" : "\n");
    p->drew = p->tty;
}

static void progress_end(run_progress *p)
{
    if (p->drew)
        fputc('\n', stderr);
    p->drew = false;
}

/* ============================================================ the run */

typedef struct run_state {
    const ms_llama_source *src;
    const cpu_llama_config *cfg;
    const ms_llama_run_opts *opt;
    ms_llama_tokens tok;
    uint64_t n_batches;
    uint64_t *seq_rel; /* batch_size + 1 */
    act_store act;
    cpu_llama *fw;
    cpu_llama_gemm gemm; /* the seam in use: the GPU's while gpu_on, else the CPU's */
    cpu_llama_gemm gpu;  /* the GPU's seam (has_gpu) */
    cpu_llama_gemm cpu;  /* cpu_llama_gemm_blas */
    bool has_gpu;        /* the caller gave a (fallible) seam */
    bool gpu_on;         /* has_gpu and no sticky error yet */
    float *x_save;       /* has_gpu: a batch's residual rows before a layer, for a rerun on the CPU */
    bool dev_stat[MS_LLAMA_STAT_COUNT]; /* this layer's statistic k is held on the GPU (gpu.stat_*) */
    bool said_stats_on_host;            /* the GPU declined to hold one: logged once */
    run_progress prog;
    ms_llama_result *res;
} run_state;

/* ============================================================ GPU fallback */

/* The step that fails next uses these words: "layer 3/16, batch 35/120". */
static void step_name(char *buf, size_t n, const char *what, uint64_t b, uint64_t n_batches)
{
    snprintf(buf, n, "%s, batch %" PRIu64 "/%" PRIu64, what, b + 1, n_batches);
}

/* Back to the GPU's seam for the next step (when it is still on). */
static void use_gpu(run_state *s)
{
    s->gemm = s->gpu_on ? s->gpu : s->cpu;
    cpu_llama_set_gemm(s->fw, &s->gemm);
}

static void use_cpu(run_state *s)
{
    s->gemm = s->cpu;
    cpu_llama_set_gemm(s->fw, &s->gemm);
}

/* The GPU seam's account of its last failure, for a message. */
static const char *gpu_why(const run_state *s)
{
    const char *why = s->gpu.last_error ? s->gpu.last_error(s->gpu.ctx) : NULL;
    return why && *why ? why : "no details";
}

/* A GPU call of step `where` returned rc: one warning line, and the GPU off
 * for good on a sticky error. Returns 0 when the CPU may redo the work, or
 * -1 with err set (a failure the CPU cannot mend: statistics partly
 * updated, or an error no GPU seam reports). */
static int gpu_failed(run_state *s, int rc, const char *where, ms_error *err)
{
    const char *why = gpu_why(s);
    if (!s->gpu_on || (rc != -ENOMEM && rc != -EIO)) {
        if (rc == -EFAULT)
            s->res->gpu_disabled = true;
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, where,
                              "the GPU failed while adding statistics (%s): they are lost; rerun with --device cpu",
                              why);
    }
    s->res->gpu_fallbacks++;
    if (rc == -ENOMEM) {
        ms_log_warn("GPU out of memory on %s (%s): using CPU", where, why);
        return 0;
    }
    ms_log_warn("GPU error on %s (%s): the CPU computes the rest of the run", where, why);
    s->gpu_on = false;
    s->res->gpu_disabled = true;
    use_cpu(s); /* the forward pass too, whichever step failed */
    return 0;
}

/* The rows the GPU's Gram updates did not add, added by the CPU's. */
static int stat_add(run_state *s, cpu_hessian *h, const float *x, uint64_t n, uint64_t ld, bool on_gpu,
                    const char *where, const char *name, ms_error *err)
{
    if (!h || n == 0)
        return 0;
    if (cpu_hessian_reserve(h, n) < 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot grow the fp64 accumulator");
    const cpu_llama_gemm *g = on_gpu ? &s->gpu : &s->cpu;
    uint64_t before = cpu_hessian_rows(h);
    int rc = cpu_hessian_add(h, x, n, ld, g->gram, g->ctx);
    if (rc == 0)
        return 0;
    if (!on_gpu)
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, name, "cannot add the statistics");
    char what[192];
    snprintf(what, sizeof what, "%s (statistics %s)", where, name);
    if (gpu_failed(s, rc, what, err) < 0)
        return -1;
    uint64_t done = cpu_hessian_rows(h) - before;
    MS_ASSERT(done <= n);
    rc = cpu_hessian_add(h, x + done * ld, n - done, ld, s->cpu.gram, s->cpu.ctx);
    return rc < 0 ? ms_error_errno(err, MS_EXIT_RUNTIME, -rc, name, "cannot add the statistics") : 0;
}

/* A statistic held on the GPU is lost (a sticky error, or no host memory
 * to take it back): the layer's inputs are gone, so nothing can redo it and
 * the run ends here. */
static int dev_stat_lost(run_state *s, int rc, const char *name, ms_error *err)
{
    s->res->gpu_disabled = true;
    return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, name,
                          "the statistics held on the GPU are lost (%s); rerun with --device cpu", gpu_why(s));
}

/* Where the layer's statistics accumulate: on the GPU for a whole layer
 * when its seam can hold them (no Gram update comes back per batch), else
 * in the host accumulators h. Out of GPU memory for one: that one on the
 * host, one line. */
static int dev_stats_begin(run_state *s, cpu_hessian *const *h, uint64_t layer, const char *what, ms_error *err)
{
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        s->dev_stat[k] = false;
        if (!h[k] || !s->gpu_on || !s->gpu.stat_begin)
            continue;
        uint64_t flush = s->opt->flush_rows ? s->opt->flush_rows : CPU_HESSIAN_FLUSH_ROWS;
        int rc = s->gpu.stat_begin(s->gpu.ctx, k, cpu_hessian_dim(h[k]), flush);
        if (rc == 0) {
            s->dev_stat[k] = true;
            continue;
        }
        if (rc == -ENOSPC) { /* the GPU's memory is better spent on the layer itself: said once */
            if (!s->said_stats_on_host && s->opt->label)
                ms_log_info("%s: statistics on the host (%s)", s->opt->label, gpu_why(s));
            s->said_stats_on_host = true;
            continue;
        }
        char name[128], where[256];
        ms_llama_stat_name(layer, (ms_llama_stat)k, name, sizeof name);
        snprintf(where, sizeof where, "%s (statistics %s)", what, name);
        if (gpu_failed(s, rc, where, err) < 0)
            return -1;
    }
    return 0;
}

/* The GPU-held statistics into the host accumulators (keep = false: only
 * free them, on a failure path). */
static int dev_stats_end(run_state *s, cpu_hessian *const *h, uint64_t layer, bool keep, ms_error *err)
{
    int rc = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        if (!s->dev_stat[k])
            continue;
        s->dev_stat[k] = false;
        int frc = s->gpu.stat_finish(s->gpu.ctx, k, keep && rc == 0 ? h[k] : NULL);
        if (frc < 0 && keep && rc == 0) {
            char name[128];
            ms_llama_stat_name(layer, (ms_llama_stat)k, name, sizeof name);
            rc = dev_stat_lost(s, frc, name, err);
        }
    }
    return rc;
}

/* Every linear input of the layer just run into its statistic. */
static int layer_stats(run_state *s, cpu_hessian *const *h, uint64_t layer, uint64_t n, bool on_gpu,
                       const char *where, ms_error *err)
{
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        if (!h[k])
            continue;
        char name[128];
        ms_llama_stat_name(layer, (ms_llama_stat)k, name, sizeof name);
        uint64_t ld;
        const float *in = cpu_llama_linear_input(s->fw, (cpu_llama_input)k, &ld);
        if (s->dev_stat[k] && on_gpu && cpu_llama_layer_added_stats(s->fw))
            continue; /* the GPU's layer added them where they are */
        if (s->dev_stat[k] && s->gpu_on) {
            int rc = s->gpu.stat_add(s->gpu.ctx, k, in, n, ld);
            if (rc == 0)
                continue;
            if (rc != -ENOMEM)
                return dev_stat_lost(s, rc, name, err);
            char what[256];
            snprintf(what, sizeof what, "%s (statistics %s)", where, name);
            if (gpu_failed(s, rc, what, err) < 0)
                return -1;
            /* these rows on the host; the GPU keeps what it holds */
        }
        if (stat_add(s, h[k], in, n, ld, on_gpu && s->gpu_on && !s->dev_stat[k], where, name, err) < 0)
            return -1;
    }
    return 0;
}

/* ms_llama_dev_stats' out over the GPU seam: the slot is no longer held
 * here once handed out; a lost one ends the GPU's part of the run. */
static int dev_stat_out(void *ctx, unsigned k, double scale, float *dst)
{
    run_state *s = ctx;
    MS_ASSERT(k < MS_LLAMA_STAT_COUNT && s->dev_stat[k]);
    s->dev_stat[k] = false;
    int rc = s->gpu.stat_out(s->gpu.ctx, k, scale, dst);
    if (rc < 0) {
        s->res->gpu_disabled = true;
        ms_log_warn("the statistics held on the GPU are lost (%s)", gpu_why(s));
    }
    return rc;
}

/* Offers the layer's statistics to on_stats_device when every one of them
 * is held on the GPU with no row added on the host. Returns 0 (taken), 1
 * (not offered, or declined) or -1 with err set. */
static int dev_stats_offer(run_state *s, cpu_hessian *const *h, uint64_t layer, ms_error *err)
{
    if (!s->opt->on_stats_device || !s->gpu_on || !s->gpu.stat_out)
        return 1;
    ms_llama_dev_stats dev = {.out = dev_stat_out, .wait = s->gpu.stat_out_wait, .ctx = s, .wait_ctx = s->gpu.ctx};
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        if (!h[k] || !s->dev_stat[k] || cpu_hessian_rows(h[k]) != 0)
            return 1;
        dev.dim[k] = cpu_hessian_dim(h[k]);
        dev.rows[k] = s->gpu.stat_rows(s->gpu.ctx, k);
    }
    return s->opt->on_stats_device(s->opt->stats_ctx, layer, &dev, err);
}

/* For a GPU seam that runs whole layers: the statistics this layer holds on
 * the GPU are added there, only the others' inputs come back (perplexity
 * needs none). */
static void layer_outputs(run_state *s)
{
    int slot[CPU_LLAMA_IN_COUNT];
    bool want[CPU_LLAMA_IN_COUNT];
    for (unsigned k = 0; k < CPU_LLAMA_IN_COUNT; k++) {
        slot[k] = s->dev_stat[k] ? (int)k : -1;
        want[k] = s->opt->on_stats && !s->dev_stat[k];
    }
    cpu_llama_set_layer_outputs(s->fw, slot, want);
}

/* One batch through decoder layer w: on the GPU when it is on (the batch's
 * rows saved first), else, or after a GPU failure, on the CPU from the
 * saved rows. *on_gpu says where it ran. When the GPU's seam runs a whole
 * layer, it adds the linear inputs of the statistics held there itself
 * (cpu_llama_layer_added_stats) and sends back only the others
 * (layer_outputs). Returns 0 or -1 with err set. */
static int layer_step(run_state *s, const cpu_llama_layer *w, const cpu_llama_batch *bt, float *x,
                      const char *where, bool *on_gpu, ms_error *err)
{
    uint64_t bytes = bt->n_tokens * s->cfg->hidden * sizeof(float);
    *on_gpu = s->gpu_on;
    if (*on_gpu) {
        /* A copy of the rows to rerun from on the CPU; not needed for a
         * whole layer on the device with statistics held there: -ENOMEM
         * leaves x untouched, and any other failure loses those statistics
         * and ends the run. That saves copying every batch's rows. */
        bool held = false;
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++)
            held = held || s->dev_stat[k];
        bool save = !(s->gpu.layer && held);
        if (save)
            memcpy(s->x_save, x, (size_t)bytes);
        int rc = cpu_llama_layer_forward(s->fw, w, bt, x);
        if (rc == 0)
            return 0;
        if (!save && rc != -ENOMEM)
            return dev_stat_lost(s, rc, where, err);
        if (gpu_failed(s, rc, where, err) < 0)
            return -1;
        if (save)
            memcpy(x, s->x_save, (size_t)bytes);
        *on_gpu = false;
        use_cpu(s);
    }
    int rc = cpu_llama_layer_forward(s->fw, w, bt, x);
    use_gpu(s);
    return rc < 0 ? ms_error_errno(err, MS_EXIT_RUNTIME, -rc, where, "the forward pass failed") : 0;
}

/* The GPU seam's copies of the weights are stale (a new layer or slice was
 * read into the same memory). */
static void weights_changed(run_state *s)
{
    if (s->has_gpu && s->gpu.weights_changed)
        s->gpu.weights_changed(s->gpu.ctx);
}

static uint64_t batch_first_sample(const run_state *s, uint64_t b) { return b * s->opt->batch_size; }

static uint64_t batch_end_sample(const run_state *s, uint64_t b)
{
    uint64_t e = (b + 1) * s->opt->batch_size;
    return e < s->tok.n_samples ? e : s->tok.n_samples;
}

/* The batch's token range and its cpu_llama_batch (pointing at s->seq_rel). */
static void batch_of(run_state *s, uint64_t b, uint64_t *t0, cpu_llama_batch *out)
{
    uint64_t s0 = batch_first_sample(s, b), s1 = batch_end_sample(s, b);
    *t0 = s->tok.tok_start[s0];
    for (uint64_t k = s0; k <= s1; k++)
        s->seq_rel[k - s0] = s->tok.tok_start[k] - *t0;
    *out = (cpu_llama_batch){.n_tokens = s->tok.tok_start[s1] - *t0, .n_seqs = s1 - s0, .seq_start = s->seq_rel,
                             .pos = s->tok.pos + *t0};
}

static int run_embed(run_state *s, ms_error *err)
{
    uint64_t H = s->cfg->hidden;
    for (uint64_t b = 0; b < s->n_batches; b++) {
        uint64_t t0;
        cpu_llama_batch bt;
        batch_of(s, b, &t0, &bt);
        float *x = act_rows(&s->act, t0, bt.n_tokens, false, err);
        if (!x)
            return -1;
        for (uint64_t t = 0; t < bt.n_tokens; t++)
            if (s->src->read_rows(s->src->ctx, "model.embed_tokens.weight", (uint64_t)s->tok.id[t0 + t], 1,
                                  x + t * H, err) < 0)
                return -1;
        if (act_put(&s->act, t0, bt.n_tokens, err) < 0)
            return -1;
    }
    return 0;
}

static void close_stats(cpu_hessian **h, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        cpu_hessian_close(h[k]);
        h[k] = NULL;
    }
}

/* With a GPU, the fp64 matrix from its host allocator (pinned): statistics
 * held on the device come back into it once per layer. */
static int open_stat(const run_state *s, uint64_t dim, cpu_hessian **h, const char *name, ms_error *err)
{
    int rc = ms_fault_hit(MS_FAULT_HOST_ALLOC) ? -ENOMEM : cpu_hessian_open(dim, s->opt->flush_rows, h);
    if (rc < 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, name, "cannot allocate the statistics");
    if (s->has_gpu && s->gpu.host_alloc && s->gpu.host_free)
        cpu_hessian_set_fp64_alloc(*h, s->gpu.host_alloc, s->gpu.host_free, s->gpu.ctx);
    return 0;
}

static int run_layers(run_state *s, ms_error *err)
{
    const cpu_llama_config *c = s->cfg;
    /* Two layers' weights when the next one loads while this one runs. */
    bool prefetch = s->opt->prefetch_weights && !s->src->uses_pool && c->n_layers > 1;
    cpu_llama_layer w[2] = {0};
    ms_layer_prefetch pf = {0};
    cpu_hessian *h[MS_LLAMA_STAT_COUNT] = {0};
    for (unsigned i = 0; i < (prefetch ? 2u : 1u); i++) {
        int rc = cpu_llama_layer_alloc(c, &w[i]);
        if (rc < 0) {
            cpu_llama_layer_free(&w[0]);
            return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, s->src->where,
                                  "cannot hold %s layer's weights (%" PRIu64 " bytes)", i ? "a second" : "one",
                                  cpu_llama_layer_bytes(c));
        }
    }
    /* One set of accumulators, reset between layers: the memory is reused. */
    for (unsigned k = 0; s->opt->on_stats && k < MS_LLAMA_STAT_COUNT; k++) {
        char name[128];
        ms_llama_stat_name(0, (ms_llama_stat)k, name, sizeof name);
        if (open_stat(s, ms_llama_stat_dim(c, (ms_llama_stat)k), &h[k], name, err) < 0)
            goto fail;
    }
    for (uint64_t l = 0; l < c->n_layers; l++) {
        cpu_llama_layer *cur = &w[prefetch ? l % 2 : 0];
        int load_rc = prefetch && l > 0 ? ms_layer_prefetch_wait(&pf, err) /* loaded during layer l - 1 */
                                        : ms_llama_layer_load(s->src, c, l, cur, err);
        if (load_rc < 0)
            goto fail;
        if (prefetch && l + 1 < c->n_layers)
            ms_layer_prefetch_start(&pf, s->src, c, l + 1, &w[(l + 1) % 2]);
        weights_changed(s);
        for (unsigned k = 0; s->opt->on_stats && l > 0 && k < MS_LLAMA_STAT_COUNT; k++)
            cpu_hessian_reset(h[k]);
        char what[64];
        snprintf(what, sizeof what, "layer %" PRIu64 "/%" PRIu64, l + 1, c->n_layers);
        if (s->opt->on_stats && dev_stats_begin(s, h, l, what, err) < 0)
            goto fail;
        layer_outputs(s);
        for (uint64_t b = 0; b < s->n_batches; b++) {
            uint64_t t0;
            cpu_llama_batch bt;
            batch_of(s, b, &t0, &bt);
            float *x = act_rows(&s->act, t0, bt.n_tokens, true, err);
            if (!x)
                goto fail;
            char where[96];
            step_name(where, sizeof where, what, b, s->n_batches);
            bool on_gpu;
            if (layer_step(s, cur, &bt, x, where, &on_gpu, err) < 0)
                goto fail;
            /* The statistics only after the batch's forward pass succeeded. */
            double t_stats = ms_now_seconds();
            if (layer_stats(s, h, l, bt.n_tokens, on_gpu, where, err) < 0)
                goto fail;
            s->res->stats_seconds += ms_now_seconds() - t_stats;
            bool all_gpu = on_gpu && s->gpu_on;
            if (all_gpu && s->has_gpu)
                s->res->steps_gpu++;
            else
                s->res->steps_cpu++;
            if (act_put(&s->act, t0, bt.n_tokens, err) < 0)
                goto fail;
            progress_step(&s->prog, (double)bt.n_tokens, what);
        }
        if (s->opt->on_stats) {
            double t_back = ms_now_seconds();
            int offered = dev_stats_offer(s, h, l, err); /* straight from the GPU into the output */
            if (offered < 0)
                goto fail;
            if (offered == 0) {
                s->res->output_seconds += ms_now_seconds() - t_back;
            } else {
                if (dev_stats_end(s, h, l, true, err) < 0)
                    goto fail;
                s->res->stats_seconds += ms_now_seconds() - t_back;
                double t0 = ms_now_seconds();
                if (s->opt->on_stats(s->opt->stats_ctx, l, h, MS_LLAMA_STAT_COUNT, err) < 0)
                    goto fail;
                s->res->output_seconds += ms_now_seconds() - t0;
            }
        }
    }
    close_stats(h, MS_LLAMA_STAT_COUNT);
    cpu_llama_layer_free(&w[0]);
    cpu_llama_layer_free(&w[1]);
    return 0;
fail:
    ms_layer_prefetch_wait(&pf, NULL); /* its error, if any, comes after this one */
    dev_stats_end(s, h, 0, false, NULL);
    close_stats(h, MS_LLAMA_STAT_COUNT);
    cpu_llama_layer_free(&w[0]);
    cpu_llama_layer_free(&w[1]);
    return -1;
}

/* Final norm in place over the residual stream, and the head's statistics. */
static int run_final_norm(run_state *s, ms_error *err)
{
    const cpu_llama_config *c = s->cfg;
    float *norm = malloc((size_t)c->hidden * sizeof *norm);
    cpu_hessian *h = NULL;
    if (!norm)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "model.norm.weight", "cannot allocate");
    if (s->src->read_rows(s->src->ctx, "model.norm.weight", 0, 1, norm, err) < 0)
        goto fail;
    if (s->opt->on_stats && s->opt->head_stats &&
        open_stat(s, c->hidden, &h, MS_LLAMA_HEAD_STAT, err) < 0)
        goto fail;
    for (uint64_t b = 0; b < s->n_batches; b++) {
        uint64_t t0;
        cpu_llama_batch bt;
        batch_of(s, b, &t0, &bt);
        float *x = act_rows(&s->act, t0, bt.n_tokens, true, err);
        if (!x)
            goto fail;
        cpu_llama_rms_norm(s->fw, x, norm, bt.n_tokens, x);
        char where[96];
        step_name(where, sizeof where, "final norm", b, s->n_batches);
        if (stat_add(s, h, x, bt.n_tokens, c->hidden, s->gpu_on, where, MS_LLAMA_HEAD_STAT, err) < 0)
            goto fail;
        if (act_put(&s->act, t0, bt.n_tokens, err) < 0)
            goto fail;
        if (!s->opt->nll)
            progress_step(&s->prog, (double)bt.n_tokens, "final norm");
    }
    double t_out = ms_now_seconds();
    if (h && s->opt->on_stats(s->opt->stats_ctx, c->n_layers, &h, 1, err) < 0)
        goto fail;
    s->res->output_seconds += ms_now_seconds() - t_out;
    cpu_hessian_close(h);
    free(norm);
    return 0;
fail:
    cpu_hessian_close(h);
    free(norm);
    return -1;
}

/* Rows of lm_head per slice: vocab_chunk, else about HEAD_SLICE_BYTES of
 * weights and as much of logits for the largest batch. */
static uint64_t head_slice_rows(const cpu_llama_config *c, uint64_t vocab_chunk, uint64_t max_tokens)
{
    uint64_t v = vocab_chunk;
    if (!v) {
        uint64_t by_w = HEAD_SLICE_BYTES / (4 * c->hidden), by_l = HEAD_SLICE_BYTES / (4 * max_tokens);
        v = by_w < by_l ? by_w : by_l;
    }
    v = v < 1 ? 1 : v;
    return v < c->vocab ? v : c->vocab;
}

/* The head over the normalised residual stream: every lm_head slice once,
 * against every batch, folded into a running log-sum-exp per token. */
static int run_head(run_state *s, uint64_t max_tokens, ms_error *err)
{
    const cpu_llama_config *c = s->cfg;
    uint64_t N = s->tok.n, rows = head_slice_rows(c, s->opt->vocab_chunk, max_tokens);
    float *w = malloc((size_t)(rows * c->hidden * 4)), *logits = malloc((size_t)(rows * max_tokens * 4));
    cpu_llama_nll st = {malloc((size_t)N * sizeof(float)), malloc((size_t)N * sizeof(double)),
                        malloc((size_t)N * sizeof(float))};
    int rc = -1;
    if (!w || !logits || !st.max || !st.sum || !st.target) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, ms_llama_head_name(c), "cannot allocate the head's buffers");
        goto done;
    }
    for (uint64_t t = 0; t < N; t++) {
        st.max[t] = -INFINITY;
        st.sum[t] = 0;
        st.target[t] = NAN;
    }
    uint64_t n_slices = (c->vocab + rows - 1) / rows;
    for (uint64_t v0 = 0; v0 < c->vocab; v0 += rows) {
        uint64_t nv = c->vocab - v0 < rows ? c->vocab - v0 : rows;
        if (s->src->read_rows(s->src->ctx, ms_llama_head_name(c), v0, nv, w, err) < 0)
            goto done;
        weights_changed(s);
        char what[64];
        snprintf(what, sizeof what, "head %" PRIu64 "/%" PRIu64, v0 / rows + 1, n_slices);
        for (uint64_t b = 0; b < s->n_batches; b++) {
            uint64_t t0;
            cpu_llama_batch bt;
            batch_of(s, b, &t0, &bt);
            if (bt.n_tokens == 0)
                continue;
            float *x = act_rows(&s->act, t0, bt.n_tokens, true, err);
            if (!x)
                goto done;
            bool on_gpu = s->gpu_on;
            int lrc = cpu_llama_logits(s->fw, x, bt.n_tokens, w, nv, logits);
            if (lrc < 0 && on_gpu) { /* x is intact: the CPU redoes the slice */
                char where[96];
                step_name(where, sizeof where, what, b, s->n_batches);
                if (gpu_failed(s, lrc, where, err) < 0)
                    goto done;
                on_gpu = false;
                use_cpu(s);
                lrc = cpu_llama_logits(s->fw, x, bt.n_tokens, w, nv, logits);
                use_gpu(s);
            }
            if (lrc < 0) {
                ms_error_errno(err, MS_EXIT_RUNTIME, -lrc, ms_llama_head_name(c), "the logits failed");
                goto done;
            }
            if (on_gpu && s->has_gpu)
                s->res->steps_gpu++;
            else
                s->res->steps_cpu++;
            if (s->opt->on_logits)
                s->opt->on_logits(s->opt->logits_ctx, &s->tok, t0, bt.n_tokens, v0, nv, logits);
            cpu_llama_nll sub = {st.max + t0, st.sum + t0, st.target + t0};
            cpu_llama_nll_update(s->fw, logits, bt.n_tokens, nv, v0, s->tok.target + t0, &sub);
            progress_step(&s->prog, (double)bt.n_tokens / (double)n_slices, what);
        }
    }
    double sum = 0;
    uint64_t n = 0;
    for (uint64_t t = 0; t < N; t++) {
        if (s->tok.target[t] < 0)
            continue;
        sum += (double)st.max[t] + log(st.sum[t]) - (double)st.target[t];
        n++;
    }
    s->res->nll_sum = sum;
    s->res->n_predicted = n;
    rc = 0;
done:
    free(w);
    free(logits);
    free(st.max);
    free(st.sum);
    free(st.target);
    return rc;
}

/* Useful floating-point operations of the run (ms_llama_result.flops). */
static double run_flops(const run_state *s)
{
    const cpu_llama_config *c = s->cfg;
    double H = (double)c->hidden, Q = (double)cpu_llama_q_dim(c), KV = (double)cpu_llama_kv_dim(c),
           I = (double)c->intermediate, N = (double)s->tok.n, L = (double)c->n_layers;
    double linear = 2 * (H * (Q + 2 * KV) + Q * H + 2 * I * H + I * H);
    double keys = 0; /* keys seen, summed over every query */
    for (uint64_t smp = 0; smp < s->tok.n_samples; smp++) {
        uint64_t a = s->tok.tok_start[smp], e = s->tok.tok_start[smp + 1];
        uint64_t lo = a;
        for (uint64_t i = a; i < e; i++) {
            if (c->sliding_window)
                while (s->tok.pos[i] - s->tok.pos[lo] >= c->sliding_window)
                    lo++;
            keys += (double)(i - lo + 1);
        }
    }
    double attn = 4 * (double)c->head_dim * (double)c->n_heads * keys;
    double gram = s->opt->on_stats ? H * (H + 1) + Q * (Q + 1) + H * (H + 1) + I * (I + 1) : 0;
    double f = L * (N * (linear + gram) + attn);
    if (s->opt->on_stats && s->opt->head_stats)
        f += N * H * (H + 1);
    if (s->opt->nll)
        f += 2 * N * (double)c->vocab * H;
    return f;
}

int ms_llama_run(const ms_llama_source *src, const cpu_llama_config *cfg, const ms_calib *calib,
                 const ms_llama_run_opts *opt, cpu_pool *pool, const cpu_llama_gemm *gemm, ms_llama_result *res,
                 ms_error *err)
{
    MS_ASSERT(opt->batch_size >= 1 && (!opt->on_logits || opt->nll));
    *res = (ms_llama_result){0};
    double t_start = ms_now_seconds();
    run_state s = {.src = src, .cfg = cfg, .opt = opt, .act = {.fd = -1}, .res = res};
    s.cpu = cpu_llama_gemm_blas();
    s.has_gpu = s.gpu_on = gemm != NULL;
    s.gpu = gemm ? *gemm : s.cpu;
    s.gemm = s.gpu;
    int rc = -1;
    if (tokens_pack(calib, &s.tok, err) < 0)
        return -1;
    s.n_batches = (s.tok.n_samples + opt->batch_size - 1) / opt->batch_size;
    uint64_t max_tokens = 1, max_seq = 1, max_pos = 1;
    for (uint64_t b = 0; b < s.n_batches; b++) {
        uint64_t t = s.tok.tok_start[batch_end_sample(&s, b)] - s.tok.tok_start[batch_first_sample(&s, b)];
        max_tokens = t > max_tokens ? t : max_tokens;
    }
    for (uint64_t i = 0; i < s.tok.n_samples; i++) {
        uint64_t t = s.tok.tok_start[i + 1] - s.tok.tok_start[i];
        max_seq = t > max_seq ? t : max_seq;
    }
    for (uint64_t t = 0; t < s.tok.n; t++)
        max_pos = s.tok.pos[t] + 1u > max_pos ? s.tok.pos[t] + 1u : max_pos;
    s.seq_rel = malloc((size_t)(opt->batch_size + 1) * sizeof *s.seq_rel);
    if (s.has_gpu)
        s.x_save = malloc((size_t)(max_tokens * cfg->hidden * sizeof(float)));
    if (!s.seq_rel || (s.has_gpu && !s.x_save)) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "batches", "cannot allocate");
        goto done;
    }
    int orc = cpu_llama_open(cfg, max_tokens, max_seq, max_pos, pool, &s.gemm, &s.fw);
    if (orc < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, -orc, "forward pass",
                       "cannot allocate the scratch of a batch (%" PRIu64 " bytes; try a smaller --batch-size)",
                       cpu_llama_scratch_bytes(cfg, max_tokens, max_seq, max_pos));
        goto done;
    }
    if (act_open(&s.act, s.tok.n, cfg->hidden, max_tokens, opt->act_budget, opt->spill_dir,
                 s.has_gpu ? &s.gpu : NULL, err) < 0)
        goto done;
    res->spilled = s.act.ram == NULL;
    res->act_bytes = s.tok.n * cfg->hidden * 4;
    if (res->spilled && opt->label)
        ms_log_info("%s: the residual stream (%.1f MB) does not fit the %.1f MB --max-memory leaves beside one "
                    "layer: spilling it to a temporary file in %s",
                    opt->label, (double)res->act_bytes / 1e6, (double)opt->act_budget / 1e6, s.act.where);

    s.prog = (run_progress){.label = opt->label, .tty = isatty(STDERR_FILENO), .start = t_start, .last = t_start,
                            .n_samples = s.tok.n_samples, .n_tokens = s.tok.n, .passes = cfg->n_layers + 1};
    s.prog.total = (double)s.tok.n * (double)s.prog.passes;
    weights_changed(&s); /* nothing cached from an earlier run may match this run's memory */
    if (run_embed(&s, err) < 0 || run_layers(&s, err) < 0)
        goto done;
    if ((opt->nll || (opt->on_stats && opt->head_stats)) && run_final_norm(&s, err) < 0)
        goto done;
    if (opt->nll && run_head(&s, max_tokens, err) < 0)
        goto done;
    progress_end(&s.prog);
    res->n_samples = s.tok.n_samples;
    res->n_tokens = s.tok.n;
    res->batches = s.n_batches;
    res->flops = run_flops(&s);
    res->seconds = ms_now_seconds() - t_start;
    cpu_llama_times(s.fw, &res->layer_seconds, &res->linear_seconds, &res->attention_seconds);
    rc = 0;
done:
    progress_end(&s.prog);
    act_close(&s.act);
    weights_changed(&s); /* give the device memory of this run's weights back */
    cpu_llama_close(s.fw);
    free(s.x_save);
    free(s.seq_rel);
    tokens_free(&s.tok);
    return rc;
}

/* ============================================================ a session */

int ms_llama_session_open(const char *model_path, const char *calib_path, const ms_calib_options *co,
                          bool need_head, cpu_pool *pool, ms_llama_session *s, ms_error *err)
{
    *s = (ms_llama_session){0};
    char *base_path = NULL, *adapter_path = NULL, *where = NULL;
    if (ms_llama_model_split(model_path, &base_path, &adapter_path, err) < 0)
        return -1;
    if (ms_model_open(base_path, &s->model, err) < 0)
        goto fail;
    if (s->model->kind == MS_MODEL_KIND_ADAPTER) {
        if (adapter_path)
            ms_error_set(err, MS_EXIT_USAGE, base_path, "is a PEFT adapter, not a base model (in '%s')", model_path);
        else
            ms_error_set(err, MS_EXIT_USAGE, base_path,
                         "is a PEFT adapter, not a model: name it as BASE_DIR+ADAPTER_DIR");
        goto fail;
    }
    if (s->model->kind != MS_MODEL_KIND_DIR) {
        ms_error_set(err, MS_EXIT_DATA, base_path,
                     "a lone .safetensors file has no config.json: pass the model directory");
        goto fail;
    }
    if (asprintf(&where, "%s/config.json", base_path) < 0) {
        where = NULL;
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, base_path, "cannot open");
        goto fail;
    }
    if (ms_model_config_parse(s->model->config, where, &s->config, err) < 0)
        goto fail;
    if (adapter_path) {
        if (ms_peft_open(adapter_path, s->model, &s->adapter, err) < 0 ||
            ms_llama_source_lora(s->model, s->adapter, pool, model_path, &s->src, err) < 0)
            goto fail;
    } else if (ms_llama_source_model(s->model, &s->src, err) < 0) {
        goto fail;
    }
    if (ms_llama_check(&s->src, &s->config.llama, need_head, err) < 0)
        goto fail;
    if (ms_calib_load(calib_path, co, &s->calib, err) < 0 ||
        ms_calib_check_vocab(s->calib, s->config.llama.vocab, err) < 0)
        goto fail;
    free(where);
    free(base_path);
    free(adapter_path);
    return 0;
fail:
    free(where);
    free(base_path);
    free(adapter_path);
    ms_llama_session_close(s);
    return -1;
}

int ms_llama_session_check_unchanged(const ms_llama_session *s, ms_error *err)
{
    for (unsigned sh = 0; sh < s->model->n_shards; sh++)
        if (st_file_check_unchanged(s->model->shards[sh], err) < 0)
            return -1;
    const ms_model *a = s->adapter ? ms_peft_model(s->adapter) : NULL;
    for (unsigned sh = 0; a && sh < a->n_shards; sh++)
        if (st_file_check_unchanged(a->shards[sh], err) < 0)
            return -1;
    return 0;
}

void ms_llama_session_close(ms_llama_session *s)
{
    ms_calib_free(s->calib);
    ms_llama_source_close(&s->src);
    ms_peft_close(s->adapter); /* before the model its targets point into */
    ms_model_close(s->model);
    *s = (ms_llama_session){0};
}

uint64_t ms_llama_fixed_bytes(const cpu_llama_config *cfg, bool stats, bool head, uint64_t n_tokens,
                              uint64_t flush_rows, uint64_t max_tokens, uint64_t max_seq, uint64_t max_pos)
{
    uint64_t total = cpu_llama_layer_bytes(cfg), scratch = cpu_llama_scratch_bytes(cfg, max_tokens, max_seq, max_pos);
    if (total == UINT64_MAX || scratch == UINT64_MAX || __builtin_add_overflow(total, scratch, &total))
        return UINT64_MAX;
    if (stats) {
        bool fp64 = n_tokens > (flush_rows ? flush_rows : CPU_HESSIAN_FLUSH_ROWS);
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            uint64_t d = ms_llama_stat_dim(cfg, (ms_llama_stat)k);
            if (__builtin_add_overflow(total, cpu_hessian_host_bytes(d, fp64), &total))
                return UINT64_MAX;
        }
    }
    if (head) { /* one lm_head slice, its logits, the per-token log-sum-exp state */
        uint64_t rows = head_slice_rows(cfg, 0, max_tokens);
        uint64_t extra = 4 * rows * (cfg->hidden + max_tokens) + 16 * n_tokens;
        if (__builtin_add_overflow(total, extra, &total))
            return UINT64_MAX;
    }
    return total;
}
