/* mergestream hessian MODEL --calib FILE -o DIR: per-layer input statistics
 * (H = 2/N sum x x^T over the real tokens) from a streamed forward pass, for
 * the Hessian-aware merge methods. Also the options the calibration commands
 * share (pipeline/cli_hessian.h). */
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cpu/llama_forward.h"
#include "io/atomic_file.h"
#include "io/st_writer.h"
#include "pipeline/cli.h"
#include "pipeline/cli_hessian.h"
#include "pipeline/hessian_sink.h"
#include "pipeline/progress.h"
#include "pipeline/size_parse.h"

#define HESSIAN_STEM "hessians"
#define STATS_PIECE_BYTES (16u << 20) /* the statistics' output buffer when a layer's does not fit */
#define AUTO_BATCH_TOKENS 2048u

static const char k_help[] =
    "usage: mergestream hessian MODEL --calib FILE -o DIR [OPTIONS]\n"
    "\n"
    "Runs the calibration tokens through MODEL (a LlamaForCausalLM, MistralForCausalLM\n"
    "or Qwen2ForCausalLM directory, or BASE_DIR+ADAPTER_DIR: that model with a PEFT\n"
    "LoRA adapter applied on the fly), one layer at a time for all samples, and writes\n"
    "for every linear layer's input H = 2/N * sum of x x^T over the N real (unpadded)\n"
    "tokens, as F32 tensors in DIR/hessians.safetensors (sharded past\n"
    "--out-shard-size). Inputs shared by q/k/v_proj and by gate/up_proj are stored\n"
    "once; the metadata's \"hessian_map\" maps every module to its tensor:\n"
    "  model.layers.L.self_attn.qkv_input  q_proj, k_proj, v_proj  [hidden, hidden]\n"
    "  model.layers.L.self_attn.o_proj     o_proj                  [q_dim, q_dim]\n"
    "  model.layers.L.mlp.gate_up_input    gate_proj, up_proj      [hidden, hidden]\n"
    "  model.layers.L.mlp.down_proj        down_proj               [inter, inter]\n"
    "  lm_head                             lm_head                 [hidden, hidden]\n"
    "\n"
    "  --calib FILE          token ids: a safetensors file (input_ids [n, seq], optional\n"
    "                        attention_mask) or a text file, one sample per line\n"
    "  -o, --output DIR      output directory (created if missing)\n"
    "  --max-samples N       use the first N samples\n"
    "  --seq-len N           pad or truncate every sample to N positions\n"
    "  --batch-size N        samples per batch (default: about 2048 tokens, fewer where\n"
    "                        --max-memory would not hold one layer beside them)\n"
    "  --max-memory SIZE     memory for weights, statistics and activations; activations\n"
    "                        beyond it go to a temporary file in DIR (default: a quarter\n"
    "                        of RAM, at most 8G). A layer's statistics are written while\n"
    "                        the next layer runs where a copy of them fits beside the\n"
    "                        activations\n"
    "  --threads N           compute threads (default: all cores)\n"
    "  --device auto|cpu|cuda where the GEMMs and Gram updates run (default auto: the\n"
    "                        GPU when one is usable, else the CPU); a batch the GPU has\n"
    "                        no memory for is redone on the CPU (one warning line)\n"
    "  --gpu-memory-limit SIZE  most GPU memory this run may hold (shared GPUs)\n"
    "  --out-shard-size SIZE cut output shards at SIZE (default 5GB)\n"
    "  --force               replace hessians already in DIR\n"
    "  --json                print the summary as JSON on stdout\n"
    "  --quiet               no progress or summary on stderr\n"
    "  -h, --help            this text\n"
    "\n"
    MS_FWD_HELP_TAIL;

/* ============================================================ shared options */

static uint64_t default_max_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t ram = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 4ull << 30;
    uint64_t quarter = ram / 4;
    return quarter < (8ull << 30) ? quarter : 8ull << 30;
}

static int parse_count(const char *cmd, const char *flag, const char *text, uint64_t max, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (!*text || *end || errno || text[0] == '-' || v == 0 || v > max)
        return ms_cli_usage_error(cmd, "%s: expected an integer in [1, %" PRIu64 "], got '%s'", flag, max, text);
    *out = v;
    return 0;
}

int ms_fwd_cli_parse(const char *cmd, const char *help, bool with_output, int argc, char **argv, ms_fwd_cli *o)
{
    enum { OPT_CALIB = 256, OPT_MAXS, OPT_SEQ, OPT_BATCH, OPT_MAXMEM, OPT_THREADS, OPT_DEVICE, OPT_GPULIM,
           OPT_SHARD, OPT_FORCE, OPT_JSON, OPT_QUIET };
    static const struct option k_opts[] = {
        {"calib", required_argument, NULL, OPT_CALIB}, {"output", required_argument, NULL, 'o'},
        {"max-samples", required_argument, NULL, OPT_MAXS}, {"seq-len", required_argument, NULL, OPT_SEQ},
        {"batch-size", required_argument, NULL, OPT_BATCH}, {"max-memory", required_argument, NULL, OPT_MAXMEM},
        {"threads", required_argument, NULL, OPT_THREADS}, {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory-limit", required_argument, NULL, OPT_GPULIM},
        {"out-shard-size", required_argument, NULL, OPT_SHARD}, {"force", no_argument, NULL, OPT_FORCE},
        {"json", no_argument, NULL, OPT_JSON}, {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, 'h'}, {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    o->max_memory = default_max_memory();
    o->shard_size = ST_DEFAULT_SHARD_BYTES;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->threads = ncpu > 0 ? (unsigned)ncpu : 1;
    uint64_t v = 0;
    int c, longindex = -1;
    optind = 1;
    while ((c = getopt_long(argc, argv, with_output ? ":o:h" : ":h", k_opts, &longindex)) != -1) {
        bool output_only = c == 'o' || c == OPT_SHARD || c == OPT_FORCE;
        if (output_only && !with_output) /* named from the table: argv[optind - 1] may be the option's value */
            return ms_cli_usage_error(cmd, "unknown option '--%s'", k_opts[longindex].name);
        switch (c) {
        case OPT_CALIB:
            if (o->calib) /* two calibration files: not silently the last */
                return ms_cli_usage_error(cmd, "--calib given twice ('%s', '%s')", o->calib, optarg);
            o->calib = optarg;
            break;
        case 'o':
            if (o->out_dir)
                return ms_cli_usage_error(cmd, "-o given twice ('%s', '%s')", o->out_dir, optarg);
            o->out_dir = optarg;
            break;
        case OPT_MAXS:
            if (parse_count(cmd, "--max-samples", optarg, UINT32_MAX, &o->calib_opt.max_samples) != 0)
                return MS_EXIT_USAGE;
            break;
        case OPT_SEQ:
            if (parse_count(cmd, "--seq-len", optarg, 1u << 24, &o->calib_opt.seq_len) != 0)
                return MS_EXIT_USAGE;
            break;
        case OPT_BATCH:
            if (parse_count(cmd, "--batch-size", optarg, 1u << 20, &o->batch_size) != 0)
                return MS_EXIT_USAGE;
            break;
        case OPT_THREADS:
            if (parse_count(cmd, "--threads", optarg, 1024, &v) != 0)
                return MS_EXIT_USAGE;
            o->threads = (unsigned)v;
            break;
        case OPT_MAXMEM:
            if (ms_size_parse(optarg, &o->max_memory) != 0 || o->max_memory == 0)
                return ms_cli_usage_error(cmd, "--max-memory: bad size '%s'", optarg);
            break;
        case OPT_SHARD:
            if (ms_size_parse(optarg, &o->shard_size) != 0 || o->shard_size == 0)
                return ms_cli_usage_error(cmd, "--out-shard-size: bad size '%s'", optarg);
            break;
        case OPT_DEVICE:
            if (strcmp(optarg, "auto") == 0)
                o->device = MS_FWD_DEVICE_AUTO;
            else if (strcmp(optarg, "cpu") == 0)
                o->device = MS_FWD_DEVICE_CPU;
            else if (strcmp(optarg, "cuda") == 0)
                o->device = MS_FWD_DEVICE_CUDA;
            else
                return ms_cli_usage_error(cmd, "--device: expected auto, cpu or cuda, got '%s'", optarg);
            break;
        case OPT_GPULIM:
            if (ms_size_parse(optarg, &o->gpu_memory_limit) != 0 || o->gpu_memory_limit == 0)
                return ms_cli_usage_error(cmd, "--gpu-memory-limit: bad size '%s'", optarg);
            break;
        case OPT_FORCE: o->force = true; break;
        case OPT_JSON: o->json = true; break;
        case OPT_QUIET: ms_log_set_quiet(true); break;
        case 'h': fputs(help, stdout); return -1;
        default: return ms_cli_bad_option(cmd, c, argv, k_opts);
        }
    }
    if (optind != argc - 1)
        return ms_cli_usage_error(cmd, "expected exactly one MODEL");
    o->model = argv[optind];
    if (!o->calib)
        return ms_cli_usage_error(cmd, "--calib FILE is required");
    if (with_output && !o->out_dir)
        return ms_cli_usage_error(cmd, "-o DIR is required");
    return 0;
}

/* One layer's weights and the working memory of a batch of `batch` samples
 * (ms_llama_fixed_bytes), plus what the model source holds; UINT64_MAX on
 * overflow. */
static uint64_t fixed_bytes(const ms_llama_session *s, uint64_t batch, bool stats, bool need_head)
{
    const ms_calib *cal = s->calib;
    uint64_t rows = batch * cal->seq_len < cal->n_real ? batch * cal->seq_len : cal->n_real;
    uint64_t seq = cal->seq_len < rows ? cal->seq_len : rows;
    uint64_t fixed = ms_llama_fixed_bytes(&s->config.llama, stats, need_head, cal->n_real, 0, rows, seq, cal->seq_len);
    if (fixed != UINT64_MAX)
        fixed = fixed + s->src.host_bytes < fixed ? UINT64_MAX : fixed + s->src.host_bytes;
    return fixed;
}

int ms_fwd_cli_setup(const ms_fwd_cli *o, const char *label, bool need_head, uint64_t *stats_buf, bool gpu,
                     ms_llama_session *s, cpu_pool **pool, ms_llama_run_opts *ro, ms_error *err)
{
    *pool = NULL;
    int rc = cpu_pool_open(o->threads, pool); /* first: a LoRA source computes its deltas on it */
    if (rc < 0) {
        *pool = NULL;
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, "threads", "cannot start %u threads", o->threads);
    }
    if (ms_llama_session_open(o->model, o->calib, &o->calib_opt, need_head, *pool, s, err) < 0) {
        cpu_pool_close(*pool);
        *pool = NULL;
        return -1;
    }
    const cpu_llama_config *c = &s->config.llama;
    const ms_calib *cal = s->calib;
    cpu_llama_blas_set_threads(o->threads);
    if (s->adapter)
        ms_log_info("%s: adapter %s applied on the fly to %zu tensors of %s", label, ms_peft_path(s->adapter),
                    ms_peft_n_targets(s->adapter), s->model->path);
    if (s->config.max_position_embeddings && cal->max_position > s->config.max_position_embeddings)
        ms_log_warn("%s: real tokens reach position %" PRIu64 ", past max_position_embeddings (%" PRIu64 ")",
                    o->calib, cal->max_position - 1, s->config.max_position_embeddings);
    if (cal->n_truncated)
        ms_log_info("%s: %" PRIu64 " sample(s) truncated to %" PRIu64 " positions", o->calib, cal->n_truncated,
                    cal->seq_len);
    if (cal->n_emptied)
        ms_log_warn("%s: %" PRIu64 " of %" PRIu64 " sample(s) have no real token in their first %" PRIu64
                    " positions and contribute nothing: --seq-len keeps each row's first positions (input_ids[:, :N]), "
                    "so with left padding it drops the real tokens at the end",
                    o->calib, cal->n_emptied, cal->n_read, cal->seq_len);
    if (cal->n_empty)
        ms_log_info("%s: %" PRIu64 " sample(s) with an all-zero attention_mask skipped", o->calib, cal->n_empty);
    uint64_t batch = o->batch_size ? o->batch_size : AUTO_BATCH_TOKENS / cal->seq_len;
    batch = batch < 1 ? 1 : batch > cal->n_samples ? cal->n_samples : batch;
    uint64_t fixed = fixed_bytes(s, batch, stats_buf != NULL, need_head);
    /* the default batch halves until one layer's memory, with a piece of the statistics' output,
     * fits --max-memory, or is one sample (a given batch is the user's) */
    uint64_t least_out = stats_buf ? STATS_PIECE_BYTES : 0;
    uint64_t budget = o->max_memory > least_out ? o->max_memory - least_out : 0;
    while (!o->batch_size && batch > 1 && fixed >= budget) {
        batch = (batch + 1) / 2;
        fixed = fixed_bytes(s, batch, stats_buf != NULL, need_head);
    }
    uint64_t act = cal->n_real * c->hidden * 4;
    if (stats_buf) {
        /* The statistics' output buffer: a whole layer's where that leaves
         * the activations in memory (its writing then overlaps the next
         * layer), else pieces (hessian_sink.h). */
        uint64_t whole = ms_hessian_layer_bytes(c), piece = STATS_PIECE_BYTES;
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            uint64_t row = ms_llama_stat_dim(c, (ms_llama_stat)k) * 4;
            piece = row > piece ? row : piece;
        }
        bool fits = fixed != UINT64_MAX && fixed + whole + act <= o->max_memory;
        *stats_buf = fits ? whole : piece;
        if (fixed != UINT64_MAX)
            fixed += *stats_buf;
    }
    /* With a GPU running the layers the host's cores wait, so the next
     * layer's weights load meanwhile where a second layer's fit beside the
     * activations (layer_prefetch.h). On the CPU the loader would only take
     * a core from the layer's GEMMs: 16 Llama-1B-shaped layers on two vCPUs
     * took as long either way (bench/RESULTS.md). */
    uint64_t second = cpu_llama_layer_bytes(c);
    bool prefetch = gpu && !s->src.uses_pool && fixed != UINT64_MAX && second != UINT64_MAX &&
                    fixed + second + act <= o->max_memory;
    if (prefetch)
        fixed += second;
    if (fixed >= o->max_memory)
        ms_log_warn("%s: one layer's weights and working memory for a batch of %" PRIu64 " sample%s take %.2f GB, "
                    "more than --max-memory (%.2f GB), which the run will exceed%s",
                    label, batch, batch == 1 ? "" : "s", (double)fixed / 1e9, (double)o->max_memory / 1e9,
                    o->batch_size > 1 ? ": a smaller --batch-size lowers the batch's share" : "");
    *ro = (ms_llama_run_opts){.batch_size = batch, .act_budget = fixed < o->max_memory ? o->max_memory - fixed : 0,
                              .label = label, .prefetch_weights = prefetch};
    ms_log_info("%s: %s (%s, %" PRIu64 " layers), %" PRIu64 " samples x %" PRIu64 " positions, %" PRIu64
                " tokens, batches of %" PRIu64 " samples; memory: %.2f GB per layer + %.2f GB activations%s",
                label, o->model, ms_arch_name(s->config.arch), c->n_layers, cal->n_samples, cal->seq_len,
                cal->n_real, batch, (double)fixed / 1e9, (double)act / 1e9,
                act > ro->act_budget ? " (spilled)" : "");
    return 0;
}

int ms_fwd_cli_gpu_open(const ms_fwd_cli *o, const char *label, ms_gpu_gemm **gpu, ms_error *err)
{
    *gpu = NULL;
    if (o->device == MS_FWD_DEVICE_CPU)
        return 0;
    char why[256] = "";
    if (ms_gpu_gemm_open(o->gpu_memory_limit, gpu, why, sizeof why) != 0) {
        *gpu = NULL;
        if (o->device == MS_FWD_DEVICE_CUDA)
            return ms_error_set(err, MS_EXIT_USAGE, "--device cuda", "no usable GPU: %s", why);
        ms_log_info("%s: no usable GPU (%s): computing on the CPU", label, why);
        return 0;
    }
    ms_log_info("%s: GEMMs on the GPU: %s", label, ms_gpu_gemm_name(*gpu));
    return 0;
}

void ms_fwd_cli_backend_report(const ms_llama_result *r, const ms_gpu_gemm *gpu, cJSON *j, char *line, size_t n)
{
    if (j) {
        cJSON_AddStringToObject(j, "device", gpu ? "cuda" : "cpu");
        if (gpu)
            cJSON_AddStringToObject(j, "gpu", ms_gpu_gemm_name(gpu));
        else
            cJSON_AddNullToObject(j, "gpu");
        cJSON_AddNumberToObject(j, "batches_gpu", (double)r->steps_gpu);
        cJSON_AddNumberToObject(j, "batches_cpu", (double)r->steps_cpu);
        cJSON_AddNumberToObject(j, "gpu_fallbacks", (double)r->gpu_fallbacks);
        cJSON_AddBoolToObject(j, "gpu_disabled", r->gpu_disabled);
        /* the device's stream time in whole layers, by phase (its own clock: what the host waited on) */
        double sec[16];
        const char *names[16];
        unsigned n_phases = gpu ? ms_gpu_gemm_layer_seconds(gpu, sec, names, 16) : 0;
        cJSON *phases = n_phases ? cJSON_AddObjectToObject(j, "gpu_layer_seconds")
                                 : cJSON_AddNullToObject(j, "gpu_layer_seconds");
        for (unsigned p = 0; p < n_phases && phases; p++)
            cJSON_AddNumberToObject(phases, names[p], sec[p]);
    }
    if (!gpu)
        snprintf(line, n, "on the CPU");
    else
        snprintf(line, n, "%" PRIu64 " batch steps on cuda (%s), %" PRIu64 " on cpu, %" PRIu64 " GPU fallbacks%s",
                 r->steps_gpu, ms_gpu_gemm_name(gpu), r->steps_cpu, r->gpu_fallbacks,
                 r->gpu_disabled ? ", GPU disabled by an error" : "");
}

/* ============================================================ the output */

/* Files of an earlier hessian run in dir. */
static bool is_hessian_file(const char *name)
{
    return fnmatch(HESSIAN_STEM ".safetensors*", name, 0) == 0 ||
           fnmatch(HESSIAN_STEM "-*-of-*.safetensors*", name, 0) == 0;
}

/* Checks dir: missing (to be created), or holding no finished hessian
 * files unless force. Nothing is removed here: with force the earlier
 * files stay until this run has committed its own (remove_stale), so a
 * run that fails (a typo in MODEL, a bad calibration file, a kill) loses
 * nothing. A .partial file is an interrupted run's: never a reason to
 * refuse. *exists says whether dir exists. */
static int outdir_check(const char *dir, bool force, bool *exists, ms_error *err)
{
    struct stat st;
    *exists = stat(dir, &st) == 0;
    if (!*exists)
        return errno == ENOENT ? 0 : ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot access");
    if (!S_ISDIR(st.st_mode))
        return ms_error_set(err, MS_EXIT_USAGE, dir, "exists and is not a directory");
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot open the output directory");
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && !force && (e = readdir(d)))
        if (is_hessian_file(e->d_name) && fnmatch("*.partial", e->d_name, 0) != 0)
            rc = ms_error_set(err, MS_EXIT_USAGE, dir, "already holds %s (--force replaces it)", e->d_name);
    closedir(d);
    return rc;
}

/* After this run's files are committed: every other hessian file in dir (an
 * earlier run's shards or index in another layout, an interrupted run's
 * .partial files) is removed. Returns 0 or -1 with err set. */
static int remove_stale(const char *dir, const st_plan *plan, ms_error *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot open the output directory");
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d))) {
        if (!is_hessian_file(e->d_name))
            continue;
        bool ours = st_plan_has_index(plan) && strcmp(e->d_name, st_plan_index_name(plan)) == 0;
        for (size_t sh = 0; sh < st_plan_n_shards(plan) && !ours; sh++)
            ours = strcmp(e->d_name, st_plan_shard_at(plan, sh)->file_name) == 0;
        if (ours)
            continue;
        char *p = NULL;
        if (asprintf(&p, "%s/%s", dir, e->d_name) < 0 || (unlink(p) != 0 && errno != ENOENT))
            rc = ms_error_errno(err, MS_EXIT_RUNTIME, p ? errno : ENOMEM, p ? p : dir, "cannot remove");
        free(p);
    }
    closedir(d);
    return rc;
}

/* The plan: every statistic in order, metadata first. */
static int build_plan(const ms_fwd_cli *o, const ms_llama_session *s, st_plan **out, ms_error *err)
{
    const cpu_llama_config *c = &s->config.llama;
    st_plan *p = NULL;
    cJSON *map = cJSON_CreateObject();
    char *map_text = NULL;
    char name[128], num[32];
    if (!map) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, o->out_dir, "cannot plan the output");
        goto fail;
    }
    if (st_plan_create(o->shard_size, &p, err) < 0 || st_plan_set_stem(p, HESSIAN_STEM, err) < 0)
        goto fail;
    for (uint64_t l = 0; l < c->n_layers; l++) {
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            uint64_t d = ms_llama_stat_dim(c, (ms_llama_stat)k), shape[2] = {d, d};
            ms_llama_stat_name(l, (ms_llama_stat)k, name, sizeof name);
            if (st_plan_add_tensor(p, name, ST_F32, 2, shape, NULL, err) < 0)
                goto fail;
            for (const char *const *mod = ms_llama_stat_modules((ms_llama_stat)k); *mod; mod++) {
                char key[160];
                snprintf(key, sizeof key, "model.layers.%" PRIu64 ".%s", l, *mod);
                cJSON_AddStringToObject(map, key, name);
            }
        }
    }
    uint64_t head[2] = {c->hidden, c->hidden};
    if (st_plan_add_tensor(p, MS_LLAMA_HEAD_STAT, ST_F32, 2, head, NULL, err) < 0)
        goto fail;
    cJSON_AddStringToObject(map, "lm_head", MS_LLAMA_HEAD_STAT);
    map_text = cJSON_PrintUnformatted(map);
    if (!map_text) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, o->out_dir, "cannot plan the output");
        goto fail;
    }
    snprintf(num, sizeof num, "%" PRIu64, s->calib->n_samples);
    if (st_plan_add_metadata(p, "n_samples", num, err) < 0)
        goto fail;
    snprintf(num, sizeof num, "%" PRIu64, s->calib->n_real);
    if (st_plan_add_metadata(p, "n_tokens", num, err) < 0)
        goto fail;
    snprintf(num, sizeof num, "%" PRIu64, s->calib->seq_len);
    if (st_plan_add_metadata(p, "model", o->model, err) < 0 ||
        st_plan_add_metadata(p, "architecture", ms_arch_name(s->config.arch), err) < 0 ||
        st_plan_add_metadata(p, "calibration", o->calib, err) < 0 || st_plan_add_metadata(p, "seq_len", num, err) < 0 ||
        st_plan_add_metadata(p, "statistic",
                             "H = 2/n_tokens * sum of x x^T over each linear layer's real (unpadded) input rows; "
                             "fp32 blocks summed in fp64",
                             err) < 0 ||
        st_plan_add_metadata(p, "hessian_map", map_text, err) < 0)
        goto fail;
    if (st_plan_layout(p, err) < 0)
        goto fail;
    free(map_text);
    cJSON_Delete(map);
    *out = p;
    return 0;
fail:
    free(map_text);
    cJSON_Delete(map);
    st_plan_free(p);
    return -1;
}

/* ============================================================ the command */

/* finish_s: after the run, the statistics' last writes and st_writer_finish
 * (its directory fsync and index), counted with the run's output time. */
static void print_summary(const ms_fwd_cli *o, const ms_llama_session *s, const ms_llama_result *r,
                          const st_plan *plan, double finish_s, const ms_gpu_gemm *gpu)
{
    double tok_s = r->seconds > 0 ? (double)r->n_tokens / r->seconds : 0;
    double gflops = r->seconds > 0 ? r->flops / r->seconds / 1e9 : 0;
    char where[256];
    ms_fwd_cli_backend_report(r, gpu, NULL, where, sizeof where);
    if (o->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "command", "hessian");
        cJSON_AddStringToObject(j, "model", o->model);
        cJSON_AddStringToObject(j, "architecture", ms_arch_name(s->config.arch));
        cJSON_AddStringToObject(j, "output", o->out_dir);
        cJSON_AddNumberToObject(j, "n_samples", (double)r->n_samples);
        cJSON_AddNumberToObject(j, "n_tokens", (double)r->n_tokens);
        cJSON_AddNumberToObject(j, "n_tensors", (double)st_plan_n_tensors(plan));
        cJSON_AddNumberToObject(j, "n_shards", (double)st_plan_n_shards(plan));
        cJSON_AddNumberToObject(j, "bytes_written", (double)st_plan_total_bytes(plan));
        cJSON_AddNumberToObject(j, "seconds", r->seconds);
        cJSON_AddNumberToObject(j, "output_seconds", r->output_seconds + finish_s);
        cJSON_AddNumberToObject(j, "layers_seconds", r->layer_seconds);
        cJSON_AddNumberToObject(j, "linear_gemm_seconds", r->linear_seconds);
        cJSON_AddNumberToObject(j, "attention_seconds", r->attention_seconds);
        cJSON_AddNumberToObject(j, "statistics_seconds", r->stats_seconds);
        cJSON_AddNumberToObject(j, "tokens_per_second", tok_s);
        cJSON_AddNumberToObject(j, "gflop", r->flops / 1e9);
        cJSON_AddNumberToObject(j, "gflops_per_second", gflops);
        cJSON_AddBoolToObject(j, "activations_spilled", r->spilled);
        ms_fwd_cli_backend_report(r, gpu, j, where, sizeof where);
        cJSON_AddNumberToObject(j, "peak_rss_bytes", (double)ms_peak_rss_bytes());
        ms_cli_print_json(j);
    }
    ms_log_info("hessian: %" PRIu64 " samples, %" PRIu64 " tokens, %zu tensors (%.2f GB) in %s; %.1f s, %.0f "
                "tokens/s, %.1f GFLOP/s, peak RSS %.2f GB; %s",
                r->n_samples, r->n_tokens, st_plan_n_tensors(plan), (double)st_plan_total_bytes(plan) / 1e9,
                o->out_dir, r->seconds, tok_s, gflops, (double)ms_peak_rss_bytes() / 1e9, where);
}

int ms_cmd_hessian(int argc, char **argv)
{
    ms_fwd_cli o;
    int prc = ms_fwd_cli_parse("hessian", k_help, true, argc, argv, &o);
    if (prc != 0)
        return prc < 0 ? MS_EXIT_OK : prc;
    ms_error err = {0};
    ms_llama_session s = {0};
    cpu_pool *pool = NULL;
    ms_gpu_gemm *gpu = NULL;
    st_plan *plan = NULL;
    st_writer *w = NULL;
    ms_hessian_sink *sink = NULL;
    uint64_t stats_buf = 0;
    bool existed = false, created = false;
    ms_llama_run_opts ro;
    ms_llama_result res;
    if (outdir_check(o.out_dir, o.force, &existed, &err) < 0)
        goto fail;
    if (ms_fwd_cli_gpu_open(&o, "hessian", &gpu, &err) < 0)
        goto fail;
    if (ms_fwd_cli_setup(&o, "hessian", false, &stats_buf, gpu != NULL, &s, &pool, &ro, &err) < 0)
        goto fail;
    if (build_plan(&o, &s, &plan, &err) < 0)
        goto fail;
    if (!existed) {
        if (ms_mkdir_parents(o.out_dir, &err) != 0)
            goto fail;
        if (mkdir(o.out_dir, 0755) != 0) {
            ms_error_errno(&err, MS_EXIT_RUNTIME, errno, o.out_dir, "cannot create the output directory");
            goto fail;
        }
        created = true;
    }
    if (st_writer_open(plan, o.out_dir, &w, &err) < 0)
        goto fail;
    for (size_t sh = 0; sh < st_plan_n_shards(plan); sh++) /* a full disk fails now, not after the run */
        if (st_writer_shard_open(w, sh, &err) < 0)
            goto fail;
    cpu_llama_gemm seam = gpu ? ms_gpu_gemm_seam(gpu) : cpu_llama_gemm_blas();
    /* where the GPU sends statistics straight into the buffer, it is pinned: they come at the bus's full speed */
    ms_hessian_sink_mem pinned = {.alloc = seam.host_alloc, .free = seam.host_free, .ctx = seam.ctx};
    bool pin = gpu && seam.stat_out && seam.host_alloc;
    if (ms_hessian_sink_open(w, plan, s.config.llama.n_layers, stats_buf, pool, pin ? &pinned : NULL, &sink, &err) <
        0)
        goto fail;
    ro.on_stats = ms_hessian_sink_stats;
    ro.on_stats_device = ms_hessian_sink_stats_device;
    ro.stats_ctx = sink;
    ro.head_stats = true;
    ro.spill_dir = o.out_dir;
    if (ms_llama_run(&s.src, &s.config.llama, s.calib, &ro, pool, gpu ? &seam : NULL, &res, &err) < 0)
        goto fail;
    double t_finish = ms_now_seconds(); /* the last writes, then the shards' fsync and the index */
    if (ms_hessian_sink_drain(sink, &err) < 0)
        goto fail;
    size_t first_bad;
    uint64_t n_bad = ms_hessian_sink_nonfinite(sink, &first_bad);
    if (n_bad)
        ms_log_warn("%" PRIu64 " of %zu statistics hold NaN or Inf, the first '%s': the model's weights or "
                    "activations are not finite there",
                    n_bad, st_plan_n_tensors(plan), st_plan_tensor_at(plan, first_bad)->name);
    ms_hessian_sink_close(sink);
    sink = NULL;
    if (ms_llama_session_check_unchanged(&s, &err) < 0)
        goto fail;
    if (st_writer_finish(w, &err) < 0)
        goto fail;
    st_writer_close(w);
    w = NULL;
    if (remove_stale(o.out_dir, plan, &err) < 0)
        goto fail;
    double finish_s = ms_now_seconds() - t_finish;
    res.seconds += finish_s;
    print_summary(&o, &s, &res, plan, finish_s, gpu);
    st_plan_free(plan);
    ms_gpu_gemm_close(gpu);
    ms_llama_session_close(&s); /* before the pool its LoRA source computes on */
    cpu_pool_close(pool);
    return MS_EXIT_OK;
fail:
    ms_hessian_sink_close(sink); /* its thread writes through w */
    st_writer_abort(w);
    if (created)
        rmdir(o.out_dir); /* only if nothing else landed in it */
    st_plan_free(plan);
    ms_gpu_gemm_close(gpu);
    ms_llama_session_close(&s); /* before the pool its LoRA source computes on */
    cpu_pool_close(pool);
    return ms_cli_fail(&err);
}
