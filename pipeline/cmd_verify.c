/* mergestream verify DIR: re-checks a merge output. Every shard is validated
 * as strictly as an input, the index and the shards must agree both ways
 * (io/model_dir.c), and when mergestream.json is present every tensor's and
 * every shard's XXH3-64 is recomputed and compared with it. */
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/checksum.h"
#include "io/model_dir.h"
#include "io/range_hash.h"
#include "io/small_file.h"
#include "pipeline/cli.h"

#define MANIFEST_NAME "mergestream.json"
#define MANIFEST_MAX_BYTES (256u << 20)

static const char k_help[] =
    "usage: mergestream verify DIR [--quiet]\n"
    "\n"
    "Re-checks a merge output directory: every shard is a valid safetensors file,\n"
    "model.safetensors.index.json and the shards agree both ways, and (when\n"
    "mergestream.json is present) every tensor's and shard's XXH3-64 matches it.\n"
    "Exit codes: 0 everything matches, 3 a mismatch or invalid file (one line\n"
    "naming it), 1 an I/O error.\n";

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int manifest_hash(const cJSON *obj, const char *where, uint64_t *out, ms_error *err)
{
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(obj, "xxh3");
    if (!cJSON_IsString(h) || !ms_hash_from_hex(h->valuestring, out))
        return ms_error_set(err, MS_EXIT_DATA, where, "manifest entry has no valid \"xxh3\"");
    return 0;
}

/* Recomputes shard s's tensor hashes and shard hash and compares them. */
static int verify_shard(const ms_model *m, unsigned s, const cJSON *tensors, const cJSON *shard_entry,
                        const char *manifest_path, ms_error *err)
{
    const st_file *f = m->shards[s];
    size_t n = f->header.n_tensors;
    uint64_t *hashes = calloc(n ? n : 1, sizeof *hashes);
    uint8_t *header = malloc(f->data_start);
    int rc = -1;
    if (!hashes || !header) {
        ms_error_set(err, MS_EXIT_RUNTIME, f->path, "out of memory");
        goto done;
    }
    for (size_t t = 0; t < n; t++) {
        const st_tensor *ti = &f->header.tensors[t];
        const cJSON *entry = cJSON_GetObjectItemCaseSensitive(tensors, ti->name);
        if (!entry) {
            ms_error_set(err, MS_EXIT_DATA, f->path, "tensor '%s' is not in %s", ti->name, manifest_path);
            goto done;
        }
        uint64_t want;
        if (manifest_hash(entry, manifest_path, &want, err) != 0)
            goto done;
        if (ms_range_hash(f->fd, st_file_tensor_offset(f, ti), ti->end - ti->begin, f->path, &hashes[t], err) != 0)
            goto done;
        if (hashes[t] != want) {
            ms_error_set(err, MS_EXIT_DATA, f->path, "tensor '%s' has XXH3 %016" PRIx64 ", the manifest says %016" PRIx64,
                         ti->name, hashes[t], want);
            goto done;
        }
    }
    ssize_t got = pread(f->fd, header, f->data_start, 0);
    if (got != (ssize_t)f->data_start) {
        ms_error_set(err, MS_EXIT_RUNTIME, f->path, "cannot re-read the header");
        goto done;
    }
    uint64_t want;
    if (manifest_hash(shard_entry, manifest_path, &want, err) != 0)
        goto done;
    uint64_t have = ms_shard_hash(header, f->data_start, hashes, n);
    if (have != want) {
        ms_error_set(err, MS_EXIT_DATA, f->path, "shard XXH3 %016" PRIx64 " does not match the manifest's %016" PRIx64,
                     have, want);
        goto done;
    }
    rc = 0;
done:
    free(hashes);
    free(header);
    return rc;
}

static int verify_against_manifest(const ms_model *m, const char *manifest_path, ms_error *err)
{
    char *text = NULL;
    size_t len = 0;
    if (ms_small_file_read(manifest_path, MANIFEST_MAX_BYTES, &text, &len, err) != 0)
        return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    int rc = -1;
    const cJSON *tensors = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    const cJSON *shards = cJSON_GetObjectItemCaseSensitive(root, "shards");
    if (!root || !cJSON_IsObject(tensors) || !cJSON_IsArray(shards)) {
        ms_error_set(err, MS_EXIT_DATA, manifest_path, "not a mergestream manifest (no \"tensors\" and \"shards\")");
        goto done;
    }
    if ((size_t)cJSON_GetArraySize(tensors) != m->n_tensors) {
        ms_error_set(err, MS_EXIT_DATA, manifest_path, "lists %d tensors but the output holds %zu",
                     cJSON_GetArraySize(tensors), m->n_tensors);
        goto done;
    }
    if ((unsigned)cJSON_GetArraySize(shards) != m->n_shards) {
        ms_error_set(err, MS_EXIT_DATA, manifest_path, "lists %d shards but the output holds %u",
                     cJSON_GetArraySize(shards), m->n_shards);
        goto done;
    }
    for (unsigned s = 0; s < m->n_shards; s++) {
        const cJSON *entry = NULL, *e;
        cJSON_ArrayForEach(e, shards) {
            const cJSON *file = cJSON_GetObjectItemCaseSensitive(e, "file");
            if (cJSON_IsString(file) && strcmp(file->valuestring, base_name(m->shards[s]->path)) == 0)
                entry = e;
        }
        if (!entry) {
            ms_error_set(err, MS_EXIT_DATA, m->shards[s]->path, "shard is not listed in %s", manifest_path);
            goto done;
        }
        if (verify_shard(m, s, tensors, entry, manifest_path, err) != 0)
            goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int ms_cmd_verify(int argc, char **argv)
{
    static const struct option k_opts[] = {
        {"quiet", no_argument, NULL, 'q'}, {"help", no_argument, NULL, 'h'}, {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", k_opts, NULL)) != -1) {
        switch (c) {
        case 'q': ms_log_set_quiet(true); break;
        case 'h': fputs(k_help, stdout); return MS_EXIT_OK;
        default: return ms_cli_usage_error("verify", "unknown option");
        }
    }
    if (optind != argc - 1)
        return ms_cli_usage_error("verify", "expected exactly one DIR");
    const char *dir = argv[optind];
    ms_error err = {0};
    ms_model *m = NULL;
    if (ms_model_open(dir, &m, &err) != 0)
        return ms_cli_fail(&err);
    char manifest[PATH_MAX];
    snprintf(manifest, sizeof manifest, "%s/%s", m->path, MANIFEST_NAME);
    struct stat st;
    bool have_manifest = m->kind == MS_MODEL_KIND_DIR && stat(manifest, &st) == 0;
    int rc = have_manifest ? verify_against_manifest(m, manifest, &err) : 0;
    if (rc == 0 && !ms_log_is_quiet())
        fprintf(stderr, "mergestream: %s: OK: %zu tensors in %u shard%s%s\n", m->path, m->n_tensors, m->n_shards,
                m->n_shards == 1 ? "" : "s",
                have_manifest ? ", every hash matches mergestream.json" : " (no mergestream.json: structure only)");
    ms_model_close(m);
    return rc == 0 ? MS_EXIT_OK : ms_cli_fail(&err);
}
