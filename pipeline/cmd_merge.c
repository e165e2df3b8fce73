/* mergestream merge RECIPE -o DIR: plan, run the three stages, commit. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cpu/cpu_pool.h"
#include "io/checksum.h"
#include "io/io_engine.h"
#include "io/range_hash.h"
#include "io/st_writer.h"
#include "pipeline/backend_registry.h"
#include "pipeline/cli.h"
#include "pipeline/manifest.h"
#include "pipeline/merge_dry_run.h"
#include "pipeline/merge_journal.h"
#include "pipeline/merge_plan.h"
#include "pipeline/merge_run.h"
#include "pipeline/output_dir.h"
#include "pipeline/progress.h"
#include "pipeline/size_parse.h"
#include "pipeline/staging_pool.h"
#include "pipeline/verify_output.h"

static const char k_help[] =
    "usage: mergestream merge RECIPE -o DIR [OPTIONS]\n"
    "       mergestream merge RECIPE DIR [OPTIONS]       (mergekit-yaml's order)\n"
    "\n"
    "Merges the models named by RECIPE (mergekit-style YAML: merge_method, base_model,\n"
    "models or slices, parameters, dtype, out_dtype, tokenizer_source, random_seed)\n"
    "into DIR, streaming tensor by tensor through a staging pool of --max-memory\n"
    "bytes.\n"
    "Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,\n"
    "breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp, karcher,\n"
    "model_stock, sce, nearswap, ram, ramplus_tl, arcee_fusion, ties_sparsegpt,\n"
    "dare_sparsegpt, regmean (with `hessian: DIR` per model), passthrough (slices).\n"
    "A model may be BASE_DIR+ADAPTER_DIR: a PEFT LoRA adapter applied on the fly.\n"
    "\n"
    "  -o, --output DIR          output directory (created; must be empty unless --force)\n"
    "      --force               overwrite a previous merge in DIR\n"
    "      --resume              continue a merge into DIR that was killed or crashed: keep\n"
    "                            every finished shard whose hashes still match, redo the rest\n"
    "      --max-memory SIZE     staging memory; peak RSS stays under SIZE + 64 MiB\n"
    "                            (default: a quarter of RAM, at most 8G)\n"
    "      --threads N           compute threads (default: all cores)\n"
    "      --io auto|uring|pread I/O engine (default auto: io_uring, else pread)\n"
    "      --direct-io           read the inputs that are not in the page cache with O_DIRECT,\n"
    "                            past it: for a cold merge (they stay uncached after it)\n"
    "      --out-shard-size SIZE cut output shards at SIZE (default 5GB)\n"
    "      --random-seed N       seed for DARE/DELLA masks (overrides the recipe)\n"
    "      --device auto|cpu|cuda where to compute (default auto: the GPU when one is usable,\n"
    "                            tensor by tensor, with the CPU for what does not fit)\n"
    "      --cuda                --device cuda (mergekit-yaml's flag)\n"
    "      --gpu-memory-limit SIZE  most GPU memory this merge may hold (shared GPUs)\n"
    "      --gpu-lanes 1|2       tensors in flight on the GPU (default 2: one tensor's copies\n"
    "                            to and from the GPU overlap another's kernels; 1: no overlap)\n"
    "      --no-verify           skip re-reading the output to check every hash (each shard\n"
    "                            as it is committed, while cached; the last at the end)\n"
    "      --dry-run             check the recipe and every input's headers, print what the merge\n"
    "                            would do (with --json: per tensor), read and write nothing\n"
    "      --json                print the summary as JSON on stdout\n"
    "      --quiet               no progress or summary on stderr\n"
    "  -h, --help                this text\n"
    "\n"
    "Sizes: K/M/G/T are powers of 1024 (512M, 4G), KB/MB/GB/TB powers of 1000 (5GB).\n"
    "Same recipe + seed = same output bytes, whatever the thread count or memory budget.\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 3 invalid input data.\n";

/* "5B": mergekit's spelling of 5 billion (its --out-shard-size). */
static bool is_mergekit_billions(const char *s)
{
    size_t n = strlen(s);
    return n >= 2 && s[n - 1] == 'B' && isdigit((unsigned char)s[n - 2]);
}

typedef enum merge_device { DEVICE_AUTO, DEVICE_CPU, DEVICE_CUDA } merge_device;

typedef struct merge_options {
    const char *recipe, *out_dir;
    bool force, json, no_verify, resume, dry_run;
    uint64_t max_memory, shard_size;
    unsigned threads;
    io_engine_kind io;
    bool direct_io;
    bool has_seed;
    uint64_t seed;
    merge_device device;
    uint64_t gpu_memory_limit; /* 0: no cap */
    unsigned gpu_lanes;        /* 1 or 2 */
} merge_options;

static uint64_t default_max_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t ram = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 4ull << 30;
    uint64_t quarter = ram / 4;
    return quarter < (8ull << 30) ? quarter : 8ull << 30;
}

/* One compute worker without a GPU (it has every CPU thread already); tests
 * set MERGESTREAM_COMPUTE_WORKERS=2 to run the two-worker pipeline, which a
 * GPU otherwise gets, on machines without one. */
static unsigned compute_workers_for_tests(void)
{
    const char *v = getenv("MERGESTREAM_COMPUTE_WORKERS");
    return v && strcmp(v, "2") == 0 ? 2 : 1;
}

/* MERGESTREAM_GPU_PIN=0 leaves the pool pageable for GPU runs. Pinning costs
 * about 0.35 s per GiB of pool at start (H200, bench/RESULTS.md) and saves on
 * every copy; the variable lets a GPU session measure both. */
static bool gpu_pin_pool(void)
{
    const char *v = getenv("MERGESTREAM_GPU_PIN");
    return !(v && strcmp(v, "0") == 0);
}

static int parse_options(int argc, char **argv, merge_options *o)
{
    enum { OPT_FORCE = 256, OPT_RESUME, OPT_NO_VERIFY, OPT_MAXMEM, OPT_THREADS, OPT_IO, OPT_SHARD, OPT_SEED, OPT_DEVICE, OPT_GPULIM, OPT_GPULANES, OPT_JSON, OPT_QUIET, OPT_DRY_RUN, OPT_CUDA, OPT_DIRECT };
    static const struct option k_opts[] = {
        {"output", required_argument, NULL, 'o'}, {"force", no_argument, NULL, OPT_FORCE},
        {"no-verify", no_argument, NULL, OPT_NO_VERIFY}, {"resume", no_argument, NULL, OPT_RESUME},
        {"max-memory", required_argument, NULL, OPT_MAXMEM}, {"threads", required_argument, NULL, OPT_THREADS},
        {"io", required_argument, NULL, OPT_IO}, {"out-shard-size", required_argument, NULL, OPT_SHARD},
        {"random-seed", required_argument, NULL, OPT_SEED}, {"device", required_argument, NULL, OPT_DEVICE},
        {"gpu-memory-limit", required_argument, NULL, OPT_GPULIM}, {"json", no_argument, NULL, OPT_JSON},
        {"gpu-lanes", required_argument, NULL, OPT_GPULANES}, {"dry-run", no_argument, NULL, OPT_DRY_RUN},
        {"quiet", no_argument, NULL, OPT_QUIET}, {"help", no_argument, NULL, 'h'},
        {"cuda", no_argument, NULL, OPT_CUDA}, {"direct-io", no_argument, NULL, OPT_DIRECT},
        {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    o->max_memory = default_max_memory();
    o->shard_size = ST_DEFAULT_SHARD_BYTES;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->threads = ncpu > 0 ? (unsigned)ncpu : 1;
    o->io = IO_ENGINE_AUTO;
    o->gpu_lanes = 2;
    int c;
    uint64_t v;
    char *end;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:h", k_opts, NULL)) != -1) {
        switch (c) {
        case 'o': o->out_dir = optarg; break;
        case OPT_FORCE: o->force = true; break;
        case OPT_NO_VERIFY: o->no_verify = true; break;
        case OPT_RESUME: o->resume = true; break;
        case OPT_MAXMEM:
            if (ms_size_parse(optarg, &o->max_memory) != 0 || o->max_memory == 0)
                return ms_cli_usage_error("merge", "--max-memory: bad size '%s'", optarg);
            break;
        case OPT_SHARD:
            if (ms_size_parse(optarg, &o->shard_size) != 0 || o->shard_size == 0)
                return ms_cli_usage_error("merge", "--out-shard-size: bad size '%s'%s", optarg,
                                          is_mergekit_billions(optarg) ? " (mergekit's 1B, a billion bytes, is 1GB here)"
                                                                       : "");
            break;
        case OPT_THREADS:
            v = strtoull(optarg, &end, 10);
            if (*end || v == 0 || v > 1024)
                return ms_cli_usage_error("merge", "--threads: expected 1..1024, got '%s'", optarg);
            o->threads = (unsigned)v;
            break;
        case OPT_IO:
            if (strcmp(optarg, "auto") == 0) o->io = IO_ENGINE_AUTO;
            else if (strcmp(optarg, "uring") == 0) o->io = IO_ENGINE_URING;
            else if (strcmp(optarg, "pread") == 0) o->io = IO_ENGINE_PREAD;
            else return ms_cli_usage_error("merge", "--io: expected auto, uring or pread, got '%s'", optarg);
            break;
        case OPT_DIRECT: o->direct_io = true; break;
        case OPT_SEED:
            errno = 0;
            o->seed = strtoull(optarg, &end, 10);
            if (*end || optarg[0] == '-' || !optarg[0] || errno == ERANGE)
                return ms_cli_usage_error("merge", "--random-seed: expected an integer 0..2^64-1, got '%s'", optarg);
            o->has_seed = true;
            break;
        case OPT_DEVICE:
            if (strcmp(optarg, "auto") == 0) o->device = DEVICE_AUTO;
            else if (strcmp(optarg, "cpu") == 0) o->device = DEVICE_CPU;
            else if (strcmp(optarg, "cuda") == 0) o->device = DEVICE_CUDA;
            else return ms_cli_usage_error("merge", "--device: expected auto, cpu or cuda, got '%s'", optarg);
            break;
        case OPT_CUDA: o->device = DEVICE_CUDA; break; /* mergekit-yaml's flag */
        case OPT_GPULIM:
            if (ms_size_parse(optarg, &o->gpu_memory_limit) != 0 || o->gpu_memory_limit == 0)
                return ms_cli_usage_error("merge", "--gpu-memory-limit: bad size '%s'", optarg);
            break;
        case OPT_GPULANES:
            if (strcmp(optarg, "1") != 0 && strcmp(optarg, "2") != 0)
                return ms_cli_usage_error("merge", "--gpu-lanes: expected 1 or 2, got '%s'", optarg);
            o->gpu_lanes = (unsigned)(optarg[0] - '0');
            break;
        case OPT_JSON: o->json = true; break;
        case OPT_DRY_RUN: o->dry_run = true; break;
        case OPT_QUIET: ms_log_set_quiet(true); break;
        case 'h': fputs(k_help, stdout); return -1;
        default: return ms_cli_bad_option("merge", c, argv, k_opts);
        }
    }
    /* mergekit-yaml's order, RECIPE OUTPUT_DIR, is accepted too */
    if (optind == argc - 2 && !o->out_dir)
        o->out_dir = argv[argc - 1];
    else if (optind != argc - 1)
        return ms_cli_usage_error("merge", o->out_dir ? "expected exactly one RECIPE (and -o DIR or DIR, not both)"
                                                      : "expected RECIPE and -o DIR (or RECIPE DIR)");
    if (!o->out_dir && !o->dry_run)
        return ms_cli_usage_error("merge", "-o DIR is required (or DIR after RECIPE)");
    if (o->resume && o->force)
        return ms_cli_usage_error("merge", "--resume and --force exclude each other");
    o->recipe = argv[optind];
    return 0;
}

/* A file truncated, rewritten or replaced during the merge makes the output
 * untrustworthy even when every read returned data. */
static int plan_check_inputs_unchanged(const ms_plan *plan, ms_error *err)
{
    for (unsigned i = 0; i < ms_plan_input_count(plan); i++) {
        const ms_model *m = ms_plan_input_model(plan, i); /* slices' own bases included */
        for (unsigned s = 0; m && s < m->n_shards; s++)
            if (st_file_check_unchanged(m->shards[s], err) != 0)
                return -1;
    }
    return 0;
}

/* --resume: keeps every shard the journal lists whose file still has the
 * recorded bytes (every tensor re-hashed), marks its jobs to skip, and
 * returns how many shards were kept. A shard that changed is removed and
 * redone. */
static int resume_adopt(const char *dir, uint64_t fingerprint, const st_plan *layout, st_writer *w,
                        bool *skip_job, ms_journal_shard **kept, size_t *n_kept, ms_error *err)
{
    ms_journal_shard *recs = NULL;
    size_t n = 0;
    *kept = NULL;
    *n_kept = 0;
    if (ms_journal_load(dir, fingerprint, layout, &recs, &n, err) != 0)
        return -1;
    size_t good = 0;
    for (size_t r = 0; r < n; r++) {
        const st_plan_shard *sh = st_plan_shard_at(layout, recs[r].index);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, sh->file_name);
        bool ok = access(path, F_OK) == 0;
        int fd = ok ? open(path, O_RDONLY | O_CLOEXEC) : -1;
        for (size_t i = 0; ok && i < sh->n_tensors; i++) {
            const st_plan_tensor *pt = st_plan_tensor_at(layout, sh->first_tensor + i);
            uint64_t h;
            ms_error ignored;
            ok = fd >= 0 && ms_range_hash(fd, pt->offset, pt->nbytes, path, &h, &ignored) == 0 &&
                 h == recs[r].tensor_hashes[i];
        }
        if (fd >= 0)
            close(fd);
        ok = ok && ms_shard_hash(sh->header, sh->header_bytes, recs[r].tensor_hashes, sh->n_tensors) == recs[r].shard_hash &&
             st_writer_adopt_shard(w, recs[r].index, recs[r].tensor_hashes, err) == 0;
        if (!ok) {
            ms_log_warn("%s: does not match the journal any more: redoing it", path);
            unlink(path);
            free(recs[r].tensor_hashes);
            continue;
        }
        for (size_t i = 0; i < sh->n_tensors; i++)
            skip_job[sh->first_tensor + i] = true;
        recs[good++] = recs[r];
    }
    *kept = recs;
    *n_kept = good;
    return 0;
}

/* The output layout: the plan's jobs, in order, cut into shards. */
static int build_layout(const ms_plan *plan, uint64_t shard_size, st_plan **out, ms_error *err)
{
    if (st_plan_create(shard_size, out, err) != 0)
        return -1;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        const ms_job *job = &plan->jobs[j];
        size_t idx;
        if (st_plan_add_tensor(*out, job->name, job->out_dtype, job->out_ndim, job->out_shape, &idx, err) != 0)
            return -1;
        MS_ASSERT(idx == j);
    }
    return st_plan_layout(*out, err);
}

/* vr: the final verify's result (NULL: --no-verify), which took verify_s. */
static void print_summary(const merge_options *o, const ms_plan *plan, const ms_run_stats *s, const char *engine,
                          const ms_verify_result *vr, double verify_s)
{
    double gbps = s->wall_s > 0 ? (double)s->bytes_read / s->wall_s / 1e9 : 0;
    uint64_t rss = ms_peak_rss_bytes();
    if (o->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "output", o->out_dir);
        cJSON_AddStringToObject(j, "merge_method", ms_method_name(plan->recipe->method));
        cJSON_AddNumberToObject(j, "tensors", (double)plan->n_jobs);
        cJSON_AddNumberToObject(j, "tensors_cpu", (double)s->tensors_cpu);
        cJSON_AddNumberToObject(j, "tensors_copied", (double)s->tensors_copied);
        cJSON_AddNumberToObject(j, "tensors_kept", (double)s->tensors_kept);
        cJSON_AddNumberToObject(j, "tensors_chunked", (double)s->chunked_tensors);
        cJSON_AddNumberToObject(j, "tensors_chunked_read_once_less", (double)s->chunked_pass_skipped);
        cJSON_AddNumberToObject(j, "tensors_gpu", (double)s->tensors_gpu);
        cJSON_AddNumberToObject(j, "tensors_gpu_and_cpu", (double)s->tensors_mixed);
        cJSON_AddNumberToObject(j, "gpu_fallbacks", (double)s->gpu_fallbacks);
        cJSON_AddNumberToObject(j, "hessian_factorisations_gpu", (double)s->gpu_factorisations);
        cJSON_AddBoolToObject(j, "gpu_disabled", s->gpu_disabled);
        cJSON_AddNumberToObject(j, "bytes_read", (double)s->bytes_read);
        cJSON_AddNumberToObject(j, "bytes_read_direct", (double)s->bytes_read_direct);
        cJSON_AddNumberToObject(j, "bytes_written", (double)s->bytes_written);
        cJSON_AddNumberToObject(j, "nonfinite_values", (double)s->nonfinite_values);
        cJSON_AddNumberToObject(j, "wall_seconds", s->wall_s);
        cJSON_AddNumberToObject(j, "read_busy_seconds", s->busy_read_s);
        cJSON_AddNumberToObject(j, "compute_busy_seconds", s->busy_compute_s);
        cJSON_AddNumberToObject(j, "compute_workers", s->compute_workers);
        cJSON_AddNumberToObject(j, "write_busy_seconds", s->busy_write_s);
        cJSON_AddNumberToObject(j, "gb_per_second", gbps);
        cJSON_AddNumberToObject(j, "peak_rss_bytes", (double)rss);
        cJSON_AddStringToObject(j, "io_engine", engine);
        if (vr) {
            cJSON_AddNumberToObject(j, "verify_seconds", verify_s);
            cJSON_AddNumberToObject(j, "shards_verified", vr->n_shards);
            cJSON_AddNumberToObject(j, "shards_read_back_early", vr->n_shards_read_early);
        } else {
            cJSON_AddNullToObject(j, "verify_seconds");
        }
        ms_cli_print_json(j);
    }
    if (ms_log_is_quiet())
        return;
    /* a tensor in row chunks reads its chunks again for every pass; a
     * selection threshold found in the first pass saves one of them */
    char chunked[128] = "";
    if (s->chunked_pass_skipped)
        snprintf(chunked, sizeof chunked, " (some in row chunks, %" PRIu64 " of them read once less than planned)",
                 s->chunked_pass_skipped);
    else if (s->chunked_tensors)
        snprintf(chunked, sizeof chunked, " (some in row chunks)");
    char direct[64] = "";
    if (s->bytes_read_direct)
        snprintf(direct, sizeof direct, " (%.2f GB with O_DIRECT)", (double)s->bytes_read_direct / 1e9);
    fprintf(stderr,
            "mergestream: merged %zu tensors into %s: %" PRIu64 " on cpu, %" PRIu64 " on cuda, %" PRIu64
            " on both, %" PRIu64 " copied, %" PRIu64 " kept, %" PRIu64 " GPU fallbacks"
            "%s; read %.2f GB%s, wrote %.2f GB in %.2f s (%.2f GB/s, %s); peak RSS %.0f MiB\n",
            plan->n_jobs, o->out_dir, s->tensors_cpu, s->tensors_gpu, s->tensors_mixed, s->tensors_copied,
            s->tensors_kept, s->gpu_fallbacks, chunked, (double)s->bytes_read / 1e9, direct,
            (double)s->bytes_written / 1e9, s->wall_s, gbps, engine, (double)rss / 1048576.0);
    if (s->nonfinite_values)
        ms_log_warn("%" PRIu64 " NaN/Inf values in %" PRIu64 " output tensors (see mergestream.json)",
                    s->nonfinite_values, s->nonfinite_tensors);
}

int ms_cmd_merge(int argc, char **argv)
{
    merge_options o;
    int prc = parse_options(argc, argv, &o);
    if (prc != 0)
        return prc < 0 ? MS_EXIT_OK : prc;

    ms_error err = {0};
    int rc = MS_EXIT_RUNTIME;
    ms_pool *pool = NULL;
    ms_plan *plan = NULL;
    st_plan *layout = NULL;
    st_writer *writer = NULL;
    cpu_pool *cpu = NULL;
    io_engine *engine = NULL;
    ms_run_stats stats = {0};
    ms_side_files side = {0};
    bool created_dir = false, manifest_written = false;
    bool *skip_job = NULL;
    ms_journal *journal = NULL;
    ms_journal_shard *kept = NULL;
    size_t n_kept = 0;
    ms_gpu *gpu = NULL;
    bool pool_pinned = false;
    ms_shard_check *shard_check = NULL;
    ms_shard_hashes *early = NULL;
    size_t n_early = 0;
    ms_verify_result vr = {0};
    double verify_s = 0;

    uint64_t budget = ms_pool_capacity_for(o.max_memory);
    ms_plan_options popt = {.pool_bytes = budget, .threads = o.threads, .has_seed = o.has_seed, .seed = o.seed};
    if (ms_plan_build(o.recipe, &popt, &plan, &err) != 0)
        goto fail;
    /* A small model needs no large pool: every chunk fits a third of the
     * budget, so room for that many of the largest (or 64 MiB) keeps the
     * stages overlapped without mapping memory nothing will use. */
    uint64_t want = MS_PLAN_CHUNKS_IN_POOL * plan->max_item_bytes;
    if (want < (64ull << 20))
        want = 64ull << 20;
    uint64_t pool_size = want < plan->pool_bytes ? want : plan->pool_bytes;
    if (build_layout(plan, o.shard_size, &layout, &err) != 0)
        goto fail;
    if (o.dry_run) { /* everything checked that can be without reading tensor data */
        if (o.out_dir && (ms_output_dir_check_not_input(o.out_dir, plan, &err) != 0 ||
                          ms_output_dir_check(o.out_dir, o.force || o.resume, &err) != 0))
            goto fail;
        ms_merge_print_dry_run(plan, layout, pool_size, o.json);
        rc = MS_EXIT_OK;
        goto done;
    }
    if (ms_pool_open(pool_size, &pool, &err) != 0)
        goto fail;
    if (ms_output_dir_check_not_input(o.out_dir, plan, &err) != 0 ||
        ms_output_dir_prepare(o.out_dir, o.force || o.resume, !o.resume, &created_dir, &err) != 0)
        goto fail;
    if (st_writer_open(layout, o.out_dir, &writer, &err) != 0)
        goto fail;
    skip_job = calloc(plan->n_jobs ? plan->n_jobs : 1, sizeof *skip_job);
    if (!skip_job) {
        ms_error_set(&err, MS_EXIT_RUNTIME, o.out_dir, "out of memory");
        goto fail;
    }
    uint64_t fingerprint = ms_journal_fingerprint(plan, layout, o.shard_size);
    if (o.resume && resume_adopt(o.out_dir, fingerprint, layout, writer, skip_job, &kept, &n_kept, &err) != 0)
        goto fail;
    if (ms_journal_create(o.out_dir, fingerprint, &journal, &err) != 0)
        goto fail;
    for (size_t k = 0; k < n_kept; k++)
        if (ms_journal_record(journal, layout, kept[k].index, kept[k].shard_hash, kept[k].tensor_hashes, &err) != 0)
            goto fail;
    if (n_kept)
        ms_log_info("resuming: kept %zu of %zu shards from the interrupted run", n_kept, st_plan_n_shards(layout));
    /* every shard's space is reserved before any work: a full disk fails now */
    for (size_t s = 0; s < st_plan_n_shards(layout); s++)
        if (!st_writer_shard_is_final(writer, s) && st_writer_shard_open(writer, s, &err) != 0)
            goto fail;
    /* The pool is not registered with io_uring: registering pins every page
     * at once (0.84 s for 1 GiB of 4 KiB pages here, more than half of a
     * 1 GB merge), and for buffered reads fixed buffers save little. */
    io_engine_config ecfg = {.kind = o.io, .queue_depth = 32, .max_piece_bytes = 4u << 20};
    if (io_engine_open(&ecfg, &engine, &err) != 0)
        goto fail;
    if (cpu_pool_open(o.threads, &cpu) != 0) {
        ms_error_set(&err, MS_EXIT_RUNTIME, "merge", "cannot start %u compute threads", o.threads);
        goto fail;
    }
    if (o.device != DEVICE_CPU) {
        char why[256] = "";
        if (ms_gpu_open(o.gpu_memory_limit, &gpu, why, sizeof why) != 0) {
            if (o.device == DEVICE_CUDA) {
                ms_error_set(&err, MS_EXIT_RUNTIME, "--device cuda", "no usable GPU: %s", why);
                goto fail;
            }
            ms_log_info("no usable GPU (%s): computing on the CPU", why);
        } else {
            if (gpu_pin_pool()) {
                ms_pool_prefault(pool, cpu);
                pool_pinned = ms_gpu_host_register(ms_pool_base(pool), ms_pool_capacity(pool));
                if (!pool_pinned)
                    ms_log_info("cannot pin the staging pool for the GPU: using pageable memory");
            } else {
                ms_log_info("staging pool left pageable (MERGESTREAM_GPU_PIN=0)");
            }
            ms_gpu_set_lanes(gpu, o.gpu_lanes);
            ms_log_info("GPU: %s", ms_gpu_name(gpu));
        }
    }
    unsigned direct_files = o.direct_io ? ms_merge_open_direct(plan) : 0;
    ms_log_info("merging %zu tensors (%.2f GB to read) with %s, %u thread%s, %.0f MiB staging, %s%s",
                plan->n_jobs, (double)plan->total_read_bytes / 1e9, ms_method_name(plan->recipe->method),
                o.threads, o.threads == 1 ? "" : "s", (double)ms_pool_capacity(pool) / 1048576.0,
                io_engine_name(engine),
                direct_files ? ", O_DIRECT reads" : "");
    if (!o.no_verify && ms_shard_check_open(o.out_dir, st_plan_n_shards(layout), &shard_check, &err) != 0)
        goto fail;
    ms_run_env env = {.plan = plan, .layout = layout, .writer = writer, .pool = pool, .cpu = cpu, .engine = engine,
                      .journal = journal, .shard_check = shard_check, .skip_job = skip_job, .gpu = gpu,
                      .compute_workers = gpu ? o.gpu_lanes : compute_workers_for_tests(),
                      .readahead_cap = gpu ? UINT64_MAX : 0};
    if (ms_merge_run(&env, &stats, &err) != 0)
        goto fail;
    if (plan_check_inputs_unchanged(plan, &err) != 0)
        goto fail;
    if (ms_output_dir_copy_side_files(o.out_dir, plan, &side, &err) != 0)
        goto fail;
    if (st_writer_finish(writer, &err) != 0)
        goto fail;
    if (ms_manifest_write(o.out_dir, plan, layout, writer, &stats, &err) != 0)
        goto fail;
    /* Re-read everything against the manifest; on a mismatch (or a read
     * error) the whole output goes, as for any failed run. */
    manifest_written = true;
    if (!o.no_verify) {
        double t0 = ms_now_seconds();
        if (ms_shard_check_finish(shard_check, &early, &n_early, &err) != 0 ||
            ms_verify_output(o.out_dir, cpu, early, n_early, &vr, &err) != 0)
            goto fail;
        verify_s = ms_now_seconds() - t0;
    }
    uint64_t merged = stats.tensors_cpu + stats.tensors_gpu + stats.tensors_mixed;
    if (merged > 0 && stats.tensors_equal_to_base == merged)
        ms_log_warn("the output equals the base model: every merged tensor came out identical to the base's");
    print_summary(&o, plan, &stats, io_engine_name(engine), o.no_verify ? NULL : &vr, verify_s);
    st_writer_close(writer);
    writer = NULL;
    ms_side_files_free(&side);
    ms_journal_close(journal, 1); /* complete: nothing to resume */
    journal = NULL;
    rc = MS_EXIT_OK;
    goto done;
fail:
    rc = ms_cli_fail(&err);
    ms_shard_check_close(shard_check); /* before the files it reads go */
    shard_check = NULL;
    /* A failure removes what this run wrote; shards kept from an earlier run
     * stay, and so does their journal, for another --resume. */
    ms_journal_close(journal, n_kept == 0);
    journal = NULL;
    st_writer_abort(writer);
    writer = NULL;
    ms_side_files_remove(&side);
    if (manifest_written) {
        char manifest[4096];
        snprintf(manifest, sizeof manifest, "%s/%s", o.out_dir, MS_MANIFEST_NAME);
        unlink(manifest);
    }
    if (created_dir)
        rmdir(o.out_dir); /* only if empty: a failed run leaves no new directory behind */
done:
    ms_shard_check_close(shard_check);
    ms_shard_hashes_free(early, n_early);
    ms_journal_close(journal, 0);
    ms_journal_shards_free(kept, n_kept);
    free(skip_job);
    ms_run_stats_free(&stats);
    io_engine_close(engine);
    if (pool_pinned)
        ms_gpu_host_unregister(ms_pool_base(pool));
    ms_gpu_close(gpu);
    cpu_pool_close(cpu);
    st_writer_close(writer);
    st_plan_free(layout);
    ms_plan_free(plan);
    ms_pool_close(pool);
    return rc;
}
