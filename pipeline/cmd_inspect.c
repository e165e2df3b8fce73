/* mergestream inspect PATH: what a safetensors file, model directory or PEFT
 * adapter holds, validated as strictly as the merge reads it. */
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/model_dir.h"
#include "io/range_hash.h"
#include "pipeline/cli.h"

static const char k_help[] =
    "usage: mergestream inspect PATH [--json] [--hash]\n"
    "\n"
    "Validates PATH (a .safetensors file, a model directory with model.safetensors\n"
    "or sharded model.safetensors.index.json, an index file itself, a PEFT adapter\n"
    "directory, or the directory `mergestream hessian` wrote) and lists\n"
    "its tensors: name, dtype, shape, bytes and shard, then totals and the first\n"
    "shard's __metadata__ (hessian's sample and token counts, model, calibration).\n"
    "\n"
    "  --json     print one JSON object instead of the table\n"
    "  --hash     also read every tensor and print its XXH3-64 hash\n"
    "  --quiet    no informational lines on stderr\n"
    "  -h, --help this text\n"
    "\n"
    "Exit codes: 0 valid, 3 invalid input (one line naming the file and the rule), 1 I/O error.\n";

/* PATH itself, or the statistics when PATH is a directory that `mergestream
 * hessian` wrote (it holds hessians.safetensors, or shards and their
 * hessians.safetensors.index.json, and no model). */
static const char *hessian_dir_file(const char *path, char *buf, size_t n)
{
    static const char *const k_model_files[] = {"model.safetensors", "model.safetensors.index.json",
                                                "adapter_model.safetensors"};
    static const char *const k_hessian_files[] = {"hessians.safetensors", "hessians.safetensors.index.json"};
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return path;
    for (size_t k = 0; k < sizeof k_model_files / sizeof k_model_files[0]; k++) {
        snprintf(buf, n, "%s/%s", path, k_model_files[k]);
        if (access(buf, F_OK) == 0)
            return path;
    }
    for (size_t k = 0; k < sizeof k_hessian_files / sizeof k_hessian_files[0]; k++)
        if ((size_t)snprintf(buf, n, "%s/%s", path, k_hessian_files[k]) < n && access(buf, F_OK) == 0)
            return buf;
    return path;
}

static const char *shard_label(const ms_model *m, unsigned shard)
{
    const char *p = m->shards[shard]->path;
    const char *slash = strrchr(p, '/');
    return slash ? slash + 1 : p;
}

static int inspect_hash(const ms_model *m, size_t i, uint64_t *out, ms_error *err)
{
    const st_file *f = ms_model_tensor_file(m, i);
    const st_tensor *t = m->tensors[i].info;
    return ms_range_hash(f->fd, st_file_tensor_offset(f, t), t->end - t->begin, f->path, out, err);
}

static int inspect_print_json(const ms_model *m, bool hash, ms_error *err)
{
    int rc = -1;
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "path", m->path);
    cJSON_AddStringToObject(root, "kind", ms_model_kind_name(m->kind));
    cJSON *shards = cJSON_AddArrayToObject(root, "shards");
    for (unsigned s = 0; s < m->n_shards; s++)
        cJSON_AddItemToArray(shards, cJSON_CreateString(shard_label(m, s)));
    cJSON *tensors = cJSON_AddArrayToObject(root, "tensors");
    for (size_t i = 0; i < m->n_tensors; i++) {
        const st_tensor *t = m->tensors[i].info;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "dtype", st_dtype_name(t->dtype));
        cJSON *shape = cJSON_AddArrayToObject(o, "shape");
        for (unsigned d = 0; d < t->ndim; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        cJSON_AddNumberToObject(o, "bytes", (double)(t->end - t->begin));
        cJSON_AddStringToObject(o, "shard", shard_label(m, m->tensors[i].shard));
        cJSON_AddNumberToObject(o, "offset", (double)st_file_tensor_offset(ms_model_tensor_file(m, i), t));
        if (hash) {
            uint64_t h;
            if (inspect_hash(m, i, &h, err) != 0) {
                cJSON_Delete(o);
                goto done;
            }
            char hex[17];
            snprintf(hex, sizeof hex, "%016" PRIx64, h);
            cJSON_AddStringToObject(o, "xxh3", hex);
        }
        cJSON_AddItemToArray(tensors, o);
    }
    cJSON_AddNumberToObject(root, "n_tensors", (double)m->n_tensors);
    cJSON_AddNumberToObject(root, "total_bytes", (double)m->total_bytes);
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata"); /* the first shard's __metadata__ */
    const st_header *h0 = m->n_shards ? &m->shards[0]->header : NULL;
    for (size_t k = 0; h0 && k < h0->n_meta; k++)
        cJSON_AddStringToObject(meta, h0->meta_keys[k], h0->meta_values[k]);
    char *text = cJSON_Print(root);
    if (!text) {
        ms_error_set(err, MS_EXIT_RUNTIME, m->path, "out of memory");
        goto done;
    }
    puts(text);
    free(text);
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

static int inspect_print_table(const ms_model *m, bool hash, ms_error *err)
{
    uint64_t per_dtype[ST_DTYPE_COUNT] = {0};
    for (size_t i = 0; i < m->n_tensors; i++) {
        const st_tensor *t = m->tensors[i].info;
        char shape[256];
        st_shape_format(t, shape, sizeof shape);
        printf("%-60s %-8s %-22s %14" PRIu64 "  %s", t->name, st_dtype_name(t->dtype), shape,
               t->end - t->begin, shard_label(m, m->tensors[i].shard));
        if (hash) {
            uint64_t h;
            if (inspect_hash(m, i, &h, err) != 0)
                return -1;
            printf("  %016" PRIx64, h);
        }
        putchar('\n');
        per_dtype[t->dtype]++;
    }
    printf("%s: %s, %zu tensors, %" PRIu64 " bytes (%.2f GB) in %u file%s; dtypes:", m->path,
           ms_model_kind_name(m->kind), m->n_tensors, m->total_bytes, (double)m->total_bytes / 1e9,
           m->n_shards, m->n_shards == 1 ? "" : "s");
    for (int d = 0; d < ST_DTYPE_COUNT; d++)
        if (per_dtype[d])
            printf(" %s %" PRIu64, st_dtype_name((st_dtype)d), per_dtype[d]);
    putchar('\n');
    /* the first shard's __metadata__ beyond "format" (hessian's sample and token counts...), long values cut */
    const st_header *h0 = m->n_shards ? &m->shards[0]->header : NULL;
    for (size_t k = 0; h0 && k < h0->n_meta; k++) {
        const char *v = h0->meta_values[k];
        if (strcmp(h0->meta_keys[k], "format") == 0)
            continue;
        size_t len = strlen(v);
        printf("metadata %s: %.*s%s\n", h0->meta_keys[k], len > 72 ? 72 : (int)len, v,
               len > 72 ? "... (--json shows it whole)" : "");
    }
    return 0;
}

int ms_cmd_inspect(int argc, char **argv)
{
    static const struct option k_opts[] = {
        {"json", no_argument, NULL, 'j'}, {"hash", no_argument, NULL, 'H'},
        {"quiet", no_argument, NULL, 'q'}, {"help", no_argument, NULL, 'h'}, {0, 0, 0, 0},
    };
    bool json = false, hash = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", k_opts, NULL)) != -1) {
        switch (c) {
        case 'j': json = true; break;
        case 'H': hash = true; break;
        case 'q': ms_log_set_quiet(true); break;
        case 'h': fputs(k_help, stdout); return MS_EXIT_OK;
        default: return ms_cli_bad_option("inspect", c, argv, k_opts);
        }
    }
    if (optind != argc - 1)
        return ms_cli_usage_error("inspect", "expected exactly one PATH");
    ms_error err = {0};
    ms_model *m = NULL;
    char file[4096];
    if (ms_model_open(hessian_dir_file(argv[optind], file, sizeof file), &m, &err) != 0)
        return ms_cli_fail(&err);
    int rc = json ? inspect_print_json(m, hash, &err) : inspect_print_table(m, hash, &err);
    ms_model_close(m);
    return rc == 0 ? MS_EXIT_OK : ms_cli_fail(&err);
}
