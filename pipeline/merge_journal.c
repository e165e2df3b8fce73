#include "pipeline/merge_journal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/checksum.h"
#include "io/small_file.h"

#define JOURNAL_MAGIC "mergestream-journal 1"
#define JOURNAL_MAX_BYTES (256u << 20)

struct ms_journal {
    int fd;
    char *path;
    char *dir;
};

static void hash_str(ms_hasher *h, const char *s) { ms_hasher_update(h, s, strlen(s) + 1); }
static void hash_u64(ms_hasher *h, uint64_t v) { ms_hasher_update(h, &v, sizeof v); }

uint64_t ms_journal_fingerprint(const ms_plan *plan, const st_plan *layout, uint64_t shard_size)
{
    ms_hasher h;
    if (ms_hasher_init(&h) != 0)
        return 0;
    hash_str(&h, MERGESTREAM_VERSION);
    hash_str(&h, plan->recipe->text);
    hash_u64(&h, plan->seed);
    hash_u64(&h, shard_size);
    for (size_t t = 0; t < st_plan_n_tensors(layout); t++) {
        const st_plan_tensor *pt = st_plan_tensor_at(layout, t);
        hash_str(&h, pt->name);
        hash_u64(&h, (uint64_t)pt->dtype);
        hash_u64(&h, pt->offset);
        hash_u64(&h, pt->nbytes);
    }
    for (unsigned i = 0; i < ms_plan_input_count(plan); i++) {
        const ms_model *m = ms_plan_input_model(plan, i); /* slices' own bases included */
        for (unsigned s = 0; m && s < m->n_shards; s++) {
            hash_str(&h, m->shards[s]->path);
            hash_u64(&h, m->shards[s]->file_size);
            hash_u64(&h, (uint64_t)m->shards[s]->mtime_ns);
        }
    }
    uint64_t fp = ms_hasher_digest(&h);
    ms_hasher_free(&h);
    return fp;
}

void ms_journal_shards_free(ms_journal_shard *shards, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(shards[i].tensor_hashes);
    free(shards);
}

/* Parses one "shard ..." line; returns false for a torn or foreign line. */
static bool parse_shard_line(char *line, const st_plan *layout, ms_journal_shard *out)
{
    char *save = NULL;
    char *tok = strtok_r(line, " ", &save);
    if (!tok || strcmp(tok, "shard") != 0)
        return false;
    char *idx = strtok_r(NULL, " ", &save), *file = strtok_r(NULL, " ", &save);
    char *sh = strtok_r(NULL, " ", &save), *n = strtok_r(NULL, " ", &save);
    if (!idx || !file || !sh || !n)
        return false;
    char *end;
    unsigned long long s = strtoull(idx, &end, 10);
    if (*end || s >= st_plan_n_shards(layout))
        return false;
    const st_plan_shard *ps = st_plan_shard_at(layout, (size_t)s);
    unsigned long long count = strtoull(n, &end, 10);
    if (*end || strcmp(file, ps->file_name) != 0 || count != ps->n_tensors || !ms_hash_from_hex(sh, &out->shard_hash))
        return false;
    out->index = (size_t)s;
    out->n = (size_t)count;
    out->tensor_hashes = calloc(count ? count : 1, sizeof *out->tensor_hashes);
    if (!out->tensor_hashes)
        return false;
    for (size_t i = 0; i < count; i++) {
        char *h = strtok_r(NULL, " ", &save);
        if (!h || !ms_hash_from_hex(h, &out->tensor_hashes[i])) {
            free(out->tensor_hashes);
            return false;
        }
    }
    return strtok_r(NULL, " ", &save) == NULL;
}

int ms_journal_load(const char *dir, uint64_t fingerprint, const st_plan *layout, ms_journal_shard **shards,
                    size_t *n, ms_error *err)
{
    *shards = NULL;
    *n = 0;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, MS_JOURNAL_NAME);
    char *text = NULL;
    size_t len = 0;
    if (access(path, F_OK) != 0)
        return ms_error_set(err, MS_EXIT_USAGE, dir, "nothing to resume (no %s); run without --resume", MS_JOURNAL_NAME);
    if (ms_small_file_read(path, JOURNAL_MAX_BYTES, &text, &len, err) != 0)
        return -1;
    char expect[64];
    snprintf(expect, sizeof expect, JOURNAL_MAGIC " %016" PRIx64 "\n", fingerprint);
    if (strncmp(text, expect, strlen(expect)) != 0) {
        free(text);
        return ms_error_set(err, MS_EXIT_USAGE, path,
                            "the journal belongs to another merge (recipe, inputs or options differ); "
                            "use --force to start over");
    }
    size_t cap = st_plan_n_shards(layout);
    ms_journal_shard *out = calloc(cap ? cap : 1, sizeof *out);
    if (!out) {
        free(text);
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    }
    char *save = NULL;
    for (char *line = strtok_r(text + strlen(expect), "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        /* a line without its newline was torn by a kill: strtok_r cannot tell,
         * so a record must also parse completely and name a shard once */
        ms_journal_shard rec;
        if (*n < cap && parse_shard_line(line, layout, &rec)) {
            bool dup = false;
            for (size_t i = 0; i < *n; i++)
                dup |= out[i].index == rec.index;
            if (dup)
                free(rec.tensor_hashes);
            else
                out[(*n)++] = rec;
        }
    }
    free(text);
    *shards = out;
    return 0;
}

int ms_journal_create(const char *dir, uint64_t fingerprint, ms_journal **out, ms_error *err)
{
    *out = NULL;
    ms_journal *j = calloc(1, sizeof *j);
    if (!j || asprintf(&j->path, "%s/%s", dir, MS_JOURNAL_NAME) < 0 || !(j->dir = strdup(dir))) {
        free(j);
        return ms_error_set(err, MS_EXIT_RUNTIME, dir, "out of memory");
    }
    j->fd = open(j->path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (j->fd < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, j->path, "cannot create");
        ms_journal_close(j, 0);
        return -1;
    }
    char line[64];
    int len = snprintf(line, sizeof line, JOURNAL_MAGIC " %016" PRIx64 "\n", fingerprint);
    int rc = ms_pwrite_all(j->fd, line, (size_t)len, 0);
    if (rc == 0)
        rc = ms_fsync_fd(j->fd);
    if (rc != 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, -rc, j->path, "cannot write");
        ms_journal_close(j, 1);
        return -1;
    }
    if (ms_fsync_dir(dir, err) != 0) {
        ms_journal_close(j, 1);
        return -1;
    }
    *out = j;
    return 0;
}

int ms_journal_record(ms_journal *j, const st_plan *layout, size_t shard, uint64_t shard_hash,
                      const uint64_t *tensor_hashes, ms_error *err)
{
    const st_plan_shard *ps = st_plan_shard_at(layout, shard);
    size_t cap = 64 + strlen(ps->file_name) + (ps->n_tensors + 1) * (MS_HASH_HEX_LEN + 1);
    char *line = malloc(cap);
    if (!line)
        return ms_error_set(err, MS_EXIT_RUNTIME, j->path, "out of memory");
    char hex[MS_HASH_HEX_LEN + 1];
    ms_hash_to_hex(shard_hash, hex);
    size_t len = (size_t)snprintf(line, cap, "shard %zu %s %s %zu", shard, ps->file_name, hex, ps->n_tensors);
    for (size_t i = 0; i < ps->n_tensors; i++) {
        ms_hash_to_hex(tensor_hashes[i], hex);
        len += (size_t)snprintf(line + len, cap - len, " %s", hex);
    }
    line[len++] = '\n';
    off_t end = lseek(j->fd, 0, SEEK_END);
    int rc = end < 0 ? -errno : ms_pwrite_all(j->fd, line, len, (uint64_t)end);
    if (rc == 0)
        rc = ms_fsync_fd(j->fd);
    free(line);
    if (rc != 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, j->path, "cannot append");
    return 0;
}

void ms_journal_close(ms_journal *j, int remove)
{
    if (!j)
        return;
    if (j->fd >= 0)
        close(j->fd);
    if (remove && j->path) {
        unlink(j->path);
        ms_fsync_dir(j->dir, NULL);
    }
    free(j->path);
    free(j->dir);
    free(j);
}
