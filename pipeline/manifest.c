#include "pipeline/manifest.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/atomic_file.h"
#include "io/checksum.h"

static void add_hash(cJSON *obj, const char *key, uint64_t h)
{
    char hex[MS_HASH_HEX_LEN + 1];
    ms_hash_to_hex(h, hex);
    cJSON_AddStringToObject(obj, key, hex);
}

int ms_manifest_write(const char *dir, const ms_plan *plan, const st_plan *layout, const st_writer *w,
                      const ms_run_stats *stats, ms_error *err)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, MS_MANIFEST_NAME);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "format", MS_MANIFEST_FORMAT);
    cJSON_AddStringToObject(root, "mergestream_version", MERGESTREAM_VERSION);
    cJSON_AddStringToObject(root, "merge_method", ms_method_name(plan->recipe->method));
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)plan->seed);
    cJSON_AddStringToObject(root, "random_seed", seed); /* a string: JSON numbers lose 64-bit values */
    cJSON_AddStringToObject(root, "recipe", plan->recipe->text);
    cJSON *shards = cJSON_AddArrayToObject(root, "shards");
    for (size_t s = 0; s < st_plan_n_shards(layout); s++) {
        const st_plan_shard *sh = st_plan_shard_at(layout, s);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "file", sh->file_name);
        cJSON_AddNumberToObject(o, "bytes", (double)sh->file_size);
        cJSON_AddNumberToObject(o, "tensors", (double)sh->n_tensors);
        add_hash(o, "xxh3", st_writer_shard_hash(w, s));
        cJSON_AddItemToArray(shards, o);
    }
    cJSON *tensors = cJSON_AddObjectToObject(root, "tensors");
    for (size_t t = 0; t < st_plan_n_tensors(layout); t++) {
        const st_plan_tensor *pt = st_plan_tensor_at(layout, t);
        cJSON *o = cJSON_CreateObject();
        add_hash(o, "xxh3", st_writer_tensor_hash(w, t));
        cJSON_AddStringToObject(o, "shard", st_plan_shard_at(layout, pt->shard)->file_name);
        cJSON_AddStringToObject(o, "backend", stats->tensors[t].backend ? stats->tensors[t].backend : "copy");
        cJSON_AddNumberToObject(o, "nonfinite", (double)stats->tensors[t].nonfinite);
        cJSON_AddItemToObject(tensors, pt->name, o);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text)
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    int rc = ms_atomic_write_file(path, text, strlen(text), err);
    free(text);
    return rc;
}
