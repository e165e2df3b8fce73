#include "io/model_dir.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/small_file.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define ADAPTER_CONFIG "adapter_config.json"
#define ADAPTER_WEIGHTS "adapter_model.safetensors"
#define MAX_JSON_BYTES (64u << 20) /* an index of a 405B model is ~100 KB */

const char *ms_model_kind_name(ms_model_kind kind)
{
    switch (kind) {
    case MS_MODEL_KIND_DIR: return "model directory";
    case MS_MODEL_KIND_FILE: return "safetensors file";
    case MS_MODEL_KIND_ADAPTER: return "PEFT adapter";
    case MS_MODEL_KIND_INDEX: return "safetensors index";
    }
    return "?";
}

static bool path_is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static bool is_pickle_name(const char *name)
{
    return has_suffix(name, ".bin") || has_suffix(name, ".pt") || has_suffix(name, ".pth") ||
           has_suffix(name, ".ckpt");
}

static int refuse_pickle(const char *path, ms_error *err)
{
    return ms_error_set(err, MS_EXIT_DATA, path,
                        "pickle checkpoints are not read (they can run arbitrary code); "
                        "convert the model to safetensors first");
}

/* A shard name from an index must stay inside the model directory. */
static bool shard_name_is_safe(const char *name)
{
    if (!*name || name[0] == '/')
        return false;
    const char *p = name;
    while (*p) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if ((n == 2 && p[0] == '.' && p[1] == '.') || n == 0)
            return false;
        p += n + (slash ? 1 : 0);
    }
    return true;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_tensor_name(const void *a, const void *b, void *model)
{
    const ms_model *m = model;
    return strcmp(m->tensors[*(const size_t *)a].info->name, m->tensors[*(const size_t *)b].info->name);
}

static int model_add_shard(ms_model *m, const char *path, ms_error *err)
{
    st_file **grown = realloc(m->shards, (m->n_shards + 1) * sizeof *grown);
    if (!grown)
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    m->shards = grown;
    if (st_file_open(path, &m->shards[m->n_shards], err) != 0)
        return -1;
    m->n_shards++;
    return 0;
}

/* Builds tensors[] (on-disk order) and the sorted name index; rejects a
 * tensor present in two shards. */
static int model_index_tensors(ms_model *m, ms_error *err)
{
    size_t n = 0;
    for (unsigned s = 0; s < m->n_shards; s++)
        n += m->shards[s]->header.n_tensors;
    m->tensors = calloc(n ? n : 1, sizeof *m->tensors);
    m->by_name = calloc(n ? n : 1, sizeof *m->by_name);
    if (!m->tensors || !m->by_name)
        return ms_error_set(err, MS_EXIT_RUNTIME, m->path, "out of memory");
    for (unsigned s = 0; s < m->n_shards; s++) {
        const st_header *h = &m->shards[s]->header;
        for (size_t t = 0; t < h->n_tensors; t++) {
            m->tensors[m->n_tensors].info = &h->tensors[t];
            m->tensors[m->n_tensors].shard = s;
            m->total_bytes += h->tensors[t].end - h->tensors[t].begin;
            m->by_name[m->n_tensors] = m->n_tensors;
            m->n_tensors++;
        }
    }
    qsort_r(m->by_name, m->n_tensors, sizeof *m->by_name, cmp_tensor_name, m);
    for (size_t i = 1; i < m->n_tensors; i++) {
        const ms_model_tensor *a = &m->tensors[m->by_name[i - 1]];
        const ms_model_tensor *b = &m->tensors[m->by_name[i]];
        if (strcmp(a->info->name, b->info->name) == 0)
            return ms_error_set(err, MS_EXIT_DATA, m->path, "tensor '%s' is in two shards (%s and %s)",
                                a->info->name, m->shards[a->shard]->path, m->shards[b->shard]->path);
    }
    return 0;
}

/* Opens the shards named by an index and checks index <-> shards both ways. */
static int model_open_sharded(ms_model *m, const char *index_path, ms_error *err)
{
    int rc = -1;
    cJSON *index = NULL;
    char **names = NULL;
    size_t n_names = 0;
    if (ms_small_file_json(index_path, MAX_JSON_BYTES, &index, err) != 0)
        goto done;
    cJSON *map = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
    if (!cJSON_IsObject(map)) {
        ms_error_set(err, MS_EXIT_DATA, index_path, "no \"weight_map\" object");
        goto done;
    }
    size_t n_entries = (size_t)cJSON_GetArraySize(map);
    names = calloc(n_entries ? n_entries : 1, sizeof *names);
    if (!names) {
        ms_error_set(err, MS_EXIT_RUNTIME, index_path, "out of memory");
        goto done;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, map) {
        if (!cJSON_IsString(e)) {
            ms_error_set(err, MS_EXIT_DATA, index_path, "weight_map['%s'] is not a string", e->string);
            goto done;
        }
        if (!shard_name_is_safe(e->valuestring)) {
            ms_error_set(err, MS_EXIT_DATA, index_path,
                         "shard name '%s' must be a relative path inside the model directory",
                         e->valuestring);
            goto done;
        }
        if (is_pickle_name(e->valuestring)) {
            refuse_pickle(index_path, err);
            goto done;
        }
        names[n_names++] = e->valuestring;
    }
    if (n_names == 0) {
        ms_error_set(err, MS_EXIT_DATA, index_path, "weight_map is empty");
        goto done;
    }
    qsort(names, n_names, sizeof *names, cmp_str);
    for (size_t i = 0; i < n_names; i++) {
        if (i > 0 && strcmp(names[i], names[i - 1]) == 0)
            continue;
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", m->path, names[i]) >= (int)sizeof path) {
            ms_error_set(err, MS_EXIT_DATA, index_path, "shard path too long");
            goto done;
        }
        if (!path_is_file(path)) {
            ms_error_set(err, MS_EXIT_DATA, index_path, "shard '%s' is missing", names[i]);
            goto done;
        }
        if (model_add_shard(m, path, err) != 0)
            goto done;
    }
    if (model_index_tensors(m, err) != 0)
        goto done;
    /* index -> shards: every listed tensor is in the shard the index names */
    cJSON_ArrayForEach(e, map) {
        long t = ms_model_find(m, e->string);
        /* shard paths were built as "<model dir>/<name from the index>" */
        const char *stored_in = t < 0 ? "" : m->shards[m->tensors[t].shard]->path + strlen(m->path) + 1;
        if (t < 0 || strcmp(stored_in, e->valuestring) != 0) {
            ms_error_set(err, MS_EXIT_DATA, index_path, "tensor '%s' is listed in shard '%s' but not stored there",
                         e->string, e->valuestring);
            goto done;
        }
    }
    /* shards -> index: every stored tensor is listed */
    if ((size_t)cJSON_GetArraySize(map) != m->n_tensors) {
        for (size_t i = 0; i < m->n_tensors; i++) {
            if (!cJSON_GetObjectItemCaseSensitive(map, m->tensors[i].info->name)) {
                ms_error_set(err, MS_EXIT_DATA, index_path, "tensor '%s' is stored in '%s' but not listed in the index",
                             m->tensors[i].info->name, m->shards[m->tensors[i].shard]->path);
                goto done;
            }
        }
    }
    rc = 0;
done:
    free(names);
    cJSON_Delete(index);
    return rc;
}

/* Finds why a directory holds no weights we can read, for the error. */
static int refuse_dir_without_weights(const char *dir, ms_error *err)
{
    static const char *const k_pickles[] = {"pytorch_model.bin", "pytorch_model.bin.index.json",
                                            "adapter_model.bin", "model.pt"};
    for (size_t i = 0; i < sizeof k_pickles / sizeof k_pickles[0]; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, k_pickles[i]);
        if (path_is_file(path))
            return refuse_pickle(path, err);
    }
    return ms_error_set(err, MS_EXIT_DATA, dir,
                        "no weights found (expected model.safetensors, model.safetensors.index.json "
                        "or adapter_model.safetensors)");
}

int ms_model_open(const char *path, ms_model **out, ms_error *err)
{
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return ms_error_errno(err, errno == ENOENT ? MS_EXIT_DATA : MS_EXIT_RUNTIME, errno, path, "cannot open");
    ms_model *m = calloc(1, sizeof *m);
    if (!m || !(m->path = strdup(path))) {
        free(m);
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    }
    /* "dir/" and "dir" name the same model; keep messages tidy */
    size_t len = strlen(m->path);
    while (len > 1 && m->path[len - 1] == '/')
        m->path[--len] = '\0';

    char p1[PATH_MAX], p2[PATH_MAX];
    if (S_ISREG(st.st_mode) && has_suffix(m->path, ".safetensors.index.json")) {
        m->kind = MS_MODEL_KIND_INDEX; /* shard names in the index are relative to its folder */
        char *slash = strrchr(m->path, '/');
        if (slash)
            *slash = '\0';
        else
            strcpy(m->path, ".");
        if (model_open_sharded(m, path, err) != 0)
            goto fail;
    } else if (S_ISREG(st.st_mode)) {
        if (is_pickle_name(path)) {
            refuse_pickle(path, err);
            goto fail;
        }
        m->kind = MS_MODEL_KIND_FILE;
        if (model_add_shard(m, m->path, err) != 0 || model_index_tensors(m, err) != 0)
            goto fail;
    } else if (S_ISDIR(st.st_mode)) {
        snprintf(p1, sizeof p1, "%s/%s", m->path, ADAPTER_CONFIG);
        snprintf(p2, sizeof p2, "%s/%s", m->path, ADAPTER_WEIGHTS);
        if (path_is_file(p1)) {
            m->kind = MS_MODEL_KIND_ADAPTER;
            if (ms_small_file_json(p1, MAX_JSON_BYTES, &m->config, err) != 0)
                goto fail;
            if (!path_is_file(p2)) {
                char bin[PATH_MAX];
                snprintf(bin, sizeof bin, "%s/adapter_model.bin", m->path);
                if (path_is_file(bin))
                    refuse_pickle(bin, err);
                else
                    ms_error_set(err, MS_EXIT_DATA, m->path, "PEFT adapter without %s", ADAPTER_WEIGHTS);
                goto fail;
            }
            if (model_add_shard(m, p2, err) != 0 || model_index_tensors(m, err) != 0)
                goto fail;
        } else {
            m->kind = MS_MODEL_KIND_DIR;
            snprintf(p1, sizeof p1, "%s/config.json", m->path);
            if (path_is_file(p1) && ms_small_file_json(p1, MAX_JSON_BYTES, &m->config, err) != 0)
                goto fail;
            if (m->config && !cJSON_IsObject(m->config)) {
                ms_error_set(err, MS_EXIT_DATA, p1, "not a JSON object (a model's config.json is one)");
                goto fail;
            }
            snprintf(p1, sizeof p1, "%s/%s", m->path, INDEX_NAME);
            snprintf(p2, sizeof p2, "%s/%s", m->path, SINGLE_NAME);
            bool single = path_is_file(p2), index = path_is_file(p1);
            if (single && index) /* transformers loads the single file then: so do we */
                ms_log_warn("%s holds both %s and %s: reading %s, as transformers does", m->path, SINGLE_NAME,
                            INDEX_NAME, SINGLE_NAME);
            if (single) {
                if (model_add_shard(m, p2, err) != 0 || model_index_tensors(m, err) != 0)
                    goto fail;
            } else if (index) {
                if (model_open_sharded(m, p1, err) != 0)
                    goto fail;
            } else {
                refuse_dir_without_weights(m->path, err);
                goto fail;
            }
        }
    } else {
        ms_error_set(err, MS_EXIT_DATA, path, "not a file or directory");
        goto fail;
    }
    *out = m;
    return 0;
fail:
    ms_model_close(m);
    return -1;
}

void ms_model_close(ms_model *m)
{
    if (!m)
        return;
    for (unsigned s = 0; s < m->n_shards; s++)
        st_file_close(m->shards[s]);
    free(m->shards);
    free(m->tensors);
    free(m->by_name);
    cJSON_Delete(m->config);
    free(m->path);
    free(m);
}

long ms_model_find(const ms_model *m, const char *name)
{
    size_t lo = 0, hi = m->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(m->tensors[m->by_name[mid]].info->name, name);
        if (c == 0)
            return (long)m->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

long ms_model_config_int(const ms_model *m, const char *key, long fallback)
{
    const cJSON *v = m->config ? cJSON_GetObjectItemCaseSensitive(m->config, key) : NULL;
    return cJSON_IsNumber(v) ? (long)v->valuedouble : fallback;
}
