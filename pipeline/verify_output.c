/* Re-checking a merge output (pipeline/verify_output.h). */
#include <dirent.h>
#include <errno.h>
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
#include "pipeline/merge_journal.h"
#include "pipeline/progress.h"
#include "pipeline/verify_output.h"

#define MANIFEST_NAME "mergestream.json"
#define MANIFEST_MAX_BYTES (256u << 20)
#define INDEX_NAME "model.safetensors.index.json"
#define INDEX_MAX_BYTES (64u << 20) /* as io/model_dir.c reads it */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

typedef bool (*entry_match)(const char *name, const void *ctx);

/* The bytewise smallest name in dir that match accepts, into out (so that a
 * message does not depend on readdir's order). Returns 1 when one matched, 0
 * when none did, -1 with err set (MS_EXIT_RUNTIME) when dir cannot be listed. */
static int first_entry(const char *dir, entry_match match, const void *ctx, char *out, size_t cap, ms_error *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot list the directory");
    int found = 0;
    const struct dirent *e;
    for (errno = 0; (e = readdir(d)) != NULL; errno = 0) {
        if (!match(e->d_name, ctx) || (found && strcmp(e->d_name, out) >= 0))
            continue;
        snprintf(out, cap, "%s", e->d_name);
        found = 1;
    }
    if (errno != 0)
        found = ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot list the directory");
    closedir(d);
    return found;
}

static bool is_partial(const char *name, const void *ctx)
{
    (void)ctx;
    return has_suffix(name, ".partial");
}

int ms_verify_output_leftovers(const char *dir, ms_error *err)
{
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0; /* ms_verify_output says what is wrong with it */
    char tidy[PATH_MAX], path[PATH_MAX], name[NAME_MAX + 1];
    snprintf(tidy, sizeof tidy, "%s", dir); /* "out/" and "out" alike in messages */
    for (size_t len = strlen(tidy); len > 1 && tidy[len - 1] == '/'; len--)
        tidy[len - 1] = '\0';
    snprintf(path, sizeof path, "%s/%s", tidy, MS_JOURNAL_NAME);
    if (lstat(path, &st) == 0)
        return ms_error_set(err, MS_EXIT_DATA, path,
                            "the merge looks interrupted (its resume journal is still here): "
                            "`mergestream merge RECIPE -o %s --resume` would finish it",
                            tidy);
    int found = first_entry(tidy, is_partial, NULL, name, sizeof name, err);
    if (found <= 0)
        return found;
    /* without the journal, merge --resume has nothing to resume from */
    snprintf(path, sizeof path, "%s/%s", tidy, name);
    return ms_error_set(err, MS_EXIT_DATA, path,
                        "an unfinished shard: the merge looks interrupted, and without %s it cannot be "
                        "resumed: `mergestream merge RECIPE -o %s --force` would redo it",
                        MS_JOURNAL_NAME, tidy);
}

/* A model*.safetensors file in m's directory that is none of its shards: a
 * loader that globs for shards, or a person, would take it for one. Shard
 * paths are "<m->path>/<name in the index>" (io/model_dir.c). */
static bool is_stray_shard(const char *name, const void *ctx)
{
    const ms_model *m = ctx;
    if (strncmp(name, "model", 5) != 0 || !has_suffix(name, ".safetensors"))
        return false;
    size_t dir_len = strlen(m->path);
    for (unsigned s = 0; s < m->n_shards; s++)
        if (strcmp(m->shards[s]->path + dir_len + 1, name) == 0)
            return false;
    return true;
}

/* Refuses (MS_EXIT_DATA, naming the file) a stray shard beside a model
 * directory's own ones; the first one by name. */
static int check_no_stray_shards(const ms_model *m, bool sharded, ms_error *err)
{
    char name[NAME_MAX + 1], path[PATH_MAX];
    int found = first_entry(m->path, is_stray_shard, m, name, sizeof name, err);
    if (found <= 0)
        return found;
    snprintf(path, sizeof path, "%s/%s", m->path, name);
    if (sharded)
        return ms_error_set(err, MS_EXIT_DATA, path,
                            "not a shard of this output (%s does not list it), yet a loader that globs "
                            "model*.safetensors would read it",
                            INDEX_NAME);
    return ms_error_set(err, MS_EXIT_DATA, path,
                        "not a shard of this output (model.safetensors holds all of it), yet a loader that "
                        "globs model*.safetensors would read it");
}

/* The index m's shards were read from, into out: the directory's
 * model.safetensors.index.json when there is no model.safetensors beside it
 * (io/model_dir.c, like transformers, reads the single file when both are
 * there), or the index file verify was given. False: none. */
static bool index_path_of(const ms_model *m, const char *given, char *out, size_t cap)
{
    struct stat st;
    if (m->kind == MS_MODEL_KIND_INDEX) {
        snprintf(out, cap, "%s", given);
        return true;
    }
    snprintf(out, cap, "%s/model.safetensors", m->path);
    if (m->kind != MS_MODEL_KIND_DIR || stat(out, &st) == 0)
        return false;
    snprintf(out, cap, "%s/%s", m->path, INDEX_NAME);
    return stat(out, &st) == 0 && S_ISREG(st.st_mode);
}

/* The index's metadata.total_size must be the tensors' bytes (DESIGN.md,
 * Output): tools size downloads and disks by it. Returns 0, or -1 with err
 * set (MS_EXIT_DATA naming the index, the value found and the one expected). */
static int check_total_size(const char *index_path, uint64_t want, ms_error *err)
{
    cJSON *root = NULL; /* io/model_dir.c has parsed it already: its shards came from it */
    if (ms_small_file_json(index_path, INDEX_MAX_BYTES, &root, err) != 0)
        return -1;
    const cJSON *size =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "metadata"), "total_size");
    int rc = 0;
    if (!cJSON_IsNumber(size) || size->valuedouble != (double)want) {
        char *found = size ? cJSON_PrintUnformatted(size) : NULL;
        rc = ms_error_set(err, MS_EXIT_DATA, index_path,
                          "metadata.total_size is %s, expected %" PRIu64 " (the bytes of its tensors)",
                          found ? found : "missing", want);
        free(found);
    }
    cJSON_Delete(root);
    return rc;
}

static int manifest_hash(const cJSON *obj, const char *where, uint64_t *out, ms_error *err)
{
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(obj, "xxh3");
    if (!cJSON_IsString(h) || !ms_hash_from_hex(h->valuestring, out))
        return ms_error_set(err, MS_EXIT_DATA, where, "manifest entry has no valid \"xxh3\"");
    return 0;
}

typedef struct hash_job {
    const st_file *f;
    ms_progress *progress; /* a step per tensor hashed: a large output takes minutes to re-read */
    uint64_t *hashes;
    int *rc;       /* per tensor: 0 or -1 with errs[t] set */
    ms_error *errs;
} hash_job;

static void hash_task(void *arg, unsigned t, unsigned worker)
{
    (void)worker;
    const hash_job *j = arg;
    const st_tensor *ti = &j->f->header.tensors[t];
    j->rc[t] = ms_range_hash(j->f->fd, st_file_tensor_offset(j->f, ti), ti->end - ti->begin, j->f->path,
                             &j->hashes[t], &j->errs[t]);
    ms_progress_step(j->progress, ti->name, "hash", ti->end - ti->begin);
}

/* Every tensor's XXH3 into hashes[], the tensors spread over cpu's threads
 * (one at a time when cpu is NULL); the first failure in tensor order is
 * reported, whatever thread met it. */
static int hash_tensors(const st_file *f, cpu_pool *cpu, ms_progress *progress, uint64_t *hashes, ms_error *err)
{
    size_t n = f->header.n_tensors;
    int *rc = calloc(n ? n : 1, sizeof *rc);
    ms_error *errs = calloc(n ? n : 1, sizeof *errs);
    if (!rc || !errs) {
        free(rc);
        free(errs);
        return ms_error_set(err, MS_EXIT_RUNTIME, f->path, "out of memory");
    }
    hash_job j = {.f = f, .progress = progress, .hashes = hashes, .rc = rc, .errs = errs};
    if (cpu)
        cpu_pool_run(cpu, (unsigned)n, hash_task, &j);
    else
        for (size_t t = 0; t < n; t++)
            hash_task(&j, (unsigned)t, 0);
    int out = 0;
    for (size_t t = 0; t < n && out == 0; t++)
        if (rc[t] != 0) {
            *err = errs[t];
            out = -1;
        }
    free(rc);
    free(errs);
    return out;
}

void ms_shard_hashes_free(ms_shard_hashes *h, size_t n)
{
    for (size_t i = 0; h && i < n; i++) {
        free(h[i].file);
        free(h[i].hashes);
    }
    free(h);
}

/* The entry of early read from f's file, if that file is still the one it
 * was read from (inode, size, mtime and ctime: any write since moves them). */
static const ms_shard_hashes *early_for(const st_file *f, const ms_shard_hashes *early, size_t n_early)
{
    struct stat st;
    if (!early || fstat(f->fd, &st) != 0)
        return NULL;
    for (size_t i = 0; i < n_early; i++) {
        const ms_shard_hashes *e = &early[i];
        if (strcmp(e->file, base_name(f->path)) != 0)
            continue;
        bool same = e->dev == (uint64_t)st.st_dev && e->ino == (uint64_t)st.st_ino &&
                    e->size == (uint64_t)st.st_size && e->n_tensors == f->header.n_tensors &&
                    e->mtime_ns == (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec &&
                    e->ctime_ns == (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
        return same ? e : NULL;
    }
    return NULL;
}

/* Recomputes shard s's tensor hashes (or takes them from early) and its
 * shard hash and compares them. */
static int verify_shard(const ms_model *m, unsigned s, cpu_pool *cpu, ms_progress *progress,
                        const ms_shard_hashes *early, const cJSON *tensors, const cJSON *shard_entry,
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
    if (n > UINT32_MAX) {
        ms_error_set(err, MS_EXIT_DATA, f->path, "too many tensors");
        goto done;
    }
    const cJSON *bytes = cJSON_GetObjectItemCaseSensitive(shard_entry, "bytes");
    const cJSON *count = cJSON_GetObjectItemCaseSensitive(shard_entry, "tensors");
    if (!cJSON_IsNumber(bytes) || bytes->valuedouble != (double)f->file_size || !cJSON_IsNumber(count) ||
        count->valuedouble != (double)n) {
        ms_error_set(err, MS_EXIT_DATA, f->path, "holds %zu tensors in %" PRIu64 " bytes; %s says %.0f tensors in %.0f bytes",
                     n, f->file_size, manifest_path, cJSON_IsNumber(count) ? count->valuedouble : -1.0,
                     cJSON_IsNumber(bytes) ? bytes->valuedouble : -1.0);
        goto done;
    }
    if (early) {
        memcpy(hashes, early->hashes, n * sizeof *hashes);
        for (size_t t = 0; t < n; t++)
            ms_progress_step(progress, f->header.tensors[t].name, "hash",
                             f->header.tensors[t].end - f->header.tensors[t].begin);
    } else if (hash_tensors(f, cpu, progress, hashes, err) != 0) {
        goto done;
    }
    for (size_t t = 0; t < n; t++) {
        const st_tensor *ti = &f->header.tensors[t];
        const cJSON *entry = cJSON_GetObjectItemCaseSensitive(tensors, ti->name);
        if (!entry) {
            ms_error_set(err, MS_EXIT_DATA, f->path, "tensor '%s' is not in %s", ti->name, manifest_path);
            goto done;
        }
        const cJSON *shard = cJSON_GetObjectItemCaseSensitive(entry, "shard");
        if (!cJSON_IsString(shard) || strcmp(shard->valuestring, base_name(f->path)) != 0) {
            ms_error_set(err, MS_EXIT_DATA, f->path, "tensor '%s' is in this shard, %s puts it in %s", ti->name,
                         manifest_path, cJSON_IsString(shard) ? shard->valuestring : "no shard");
            goto done;
        }
        uint64_t want;
        if (manifest_hash(entry, manifest_path, &want, err) != 0)
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

static int verify_against_manifest(const ms_model *m, const char *manifest_path, cpu_pool *cpu, ms_progress *progress,
                                   const ms_shard_hashes *early, size_t n_early, ms_verify_result *res, ms_error *err)
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
        const ms_shard_hashes *read_early = early_for(m->shards[s], early, n_early);
        if (verify_shard(m, s, cpu, progress, read_early, tensors, entry, manifest_path, err) != 0)
            goto done;
        res->n_shards_read_early += read_early != NULL;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int ms_verify_output(const char *dir, cpu_pool *cpu, const ms_shard_hashes *early, size_t n_early,
                     ms_verify_result *res, ms_error *err)
{
    memset(res, 0, sizeof *res);
    ms_model *m = NULL;
    if (ms_model_open(dir, &m, err) != 0)
        return -1;
    char manifest[PATH_MAX];
    snprintf(manifest, sizeof manifest, "%s/%s", m->path, MANIFEST_NAME);
    struct stat st;
    res->have_manifest = m->kind == MS_MODEL_KIND_DIR && stat(manifest, &st) == 0;
    res->n_tensors = m->n_tensors;
    res->n_shards = m->n_shards;
    char index[PATH_MAX];
    bool sharded = index_path_of(m, dir, index, sizeof index);
    int rc = 0;
    if (m->kind == MS_MODEL_KIND_DIR)
        rc = check_no_stray_shards(m, sharded, err);
    if (rc == 0 && sharded)
        rc = check_total_size(index, m->total_bytes, err);
    if (rc == 0 && res->have_manifest) {
        uint64_t bytes = 0;
        for (unsigned s = 0; s < m->n_shards; s++)
            bytes += m->shards[s]->file_size - m->shards[s]->data_start;
        ms_progress progress;
        ms_progress_init(&progress, m->n_tensors, bytes);
        rc = verify_against_manifest(m, manifest, cpu, &progress, early, n_early, res, err);
        ms_progress_finish(&progress);
        ms_progress_destroy(&progress);
    }
    ms_model_close(m);
    return rc;
}
