#include "io/st_writer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/atomic_file.h"
#include "io/checksum.h"

/* ================================================================ text */

/* A growable byte string for headers and the index. On allocation failure it
 * turns `failed` and ignores further appends; the caller checks once at the
 * end. */
typedef struct text_buf {
    char *data;
    size_t len, cap;
    bool failed;
} text_buf;

static void text_reserve(text_buf *t, size_t extra)
{
    if (t->failed)
        return;
    if (extra > SIZE_MAX - t->len - 1) {
        t->failed = true;
        return;
    }
    size_t need = t->len + extra + 1; /* + NUL */
    if (need <= t->cap)
        return;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(t->data, cap);
    if (!p) {
        t->failed = true;
        return;
    }
    t->data = p;
    t->cap = cap;
}

static void text_add(text_buf *t, const char *s, size_t n)
{
    text_reserve(t, n);
    if (t->failed)
        return;
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
}

static void text_str(text_buf *t, const char *s) { text_add(t, s, strlen(s)); }

static void text_u64(text_buf *t, uint64_t v)
{
    char num[24];
    int n = snprintf(num, sizeof num, "%" PRIu64, v);
    text_add(t, num, (size_t)n);
}

/* s as a JSON string literal. Only '"', '\\' and control characters need
 * escaping; other bytes (UTF-8) pass through. */
static void text_json_string(text_buf *t, const char *s)
{
    text_add(t, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            text_add(t, esc, 2);
        } else if (*p < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            text_add(t, esc, 6);
        } else {
            text_add(t, (const char *)p, 1);
        }
    }
    text_add(t, "\"", 1);
}

static void text_free(text_buf *t)
{
    free(t->data);
    t->data = NULL;
    t->len = t->cap = 0;
}

/* ================================================================ the plan */

struct st_plan {
    uint64_t shard_limit;
    st_plan_tensor *tensors; /* in output order */
    size_t n_tensors, cap_tensors;
    st_plan_shard *shards;
    size_t n_shards, cap_shards;
    char **meta_keys, **meta_values; /* caller entries, after "format" */
    size_t n_meta;
    uint64_t total_bytes;
    char *stem;       /* NULL: ST_DEFAULT_STEM */
    char *index_name; /* (layout) */
    size_t *by_name;  /* (layout) tensor indices sorted by name */
    bool laid_out;
};

/* Doubles *cap (from `first`) until it holds need elements of elem bytes.
 * Returns false on overflow or no memory, leaving *arr untouched. */
static bool grow_array(void **arr, size_t *cap, size_t need, size_t elem, size_t first)
{
    if (need <= *cap)
        return true;
    size_t cap_new = *cap ? *cap : first;
    while (cap_new < need) {
        if (cap_new > SIZE_MAX / 2)
            return false;
        cap_new *= 2;
    }
    if (cap_new > SIZE_MAX / elem)
        return false;
    void *p = realloc(*arr, cap_new * elem);
    if (!p)
        return false;
    *arr = p;
    *cap = cap_new;
    return true;
}

int st_plan_create(uint64_t shard_limit, st_plan **out, ms_error *err)
{
    *out = NULL;
    if (shard_limit == 0)
        return ms_error_set(err, MS_EXIT_USAGE, "out-shard-size", "must be at least 1 byte");
    st_plan *p = calloc(1, sizeof *p);
    if (!p)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "output plan", "cannot allocate");
    p->shard_limit = shard_limit;
    *out = p;
    return 0;
}

void st_plan_free(st_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_tensors; i++)
        free(p->tensors[i].name);
    for (size_t s = 0; s < p->n_shards; s++) {
        free(p->shards[s].file_name);
        free(p->shards[s].header);
    }
    for (size_t i = 0; i < p->n_meta; i++) {
        free(p->meta_keys[i]);
        free(p->meta_values[i]);
    }
    free(p->tensors);
    free(p->shards);
    free(p->meta_keys);
    free(p->meta_values);
    free(p->by_name);
    free(p->stem);
    free(p->index_name);
    free(p);
}

int st_plan_set_stem(st_plan *p, const char *stem, ms_error *err)
{
    MS_ASSERT(!p->laid_out);
    if (!*stem || strchr(stem, '/'))
        return ms_error_set(err, MS_EXIT_USAGE, stem, "invalid output file stem");
    char *copy = strdup(stem);
    if (!copy)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, stem, "cannot set the output file stem");
    free(p->stem);
    p->stem = copy;
    return 0;
}

int st_plan_add_metadata(st_plan *p, const char *key, const char *value, ms_error *err)
{
    MS_ASSERT(!p->laid_out);
    if (strcmp(key, "format") == 0)
        return ms_error_set(err, MS_EXIT_USAGE, key, "metadata key is reserved (always \"pt\")");
    for (size_t i = 0; i < p->n_meta; i++)
        if (strcmp(p->meta_keys[i], key) == 0)
            return ms_error_set(err, MS_EXIT_USAGE, key, "metadata key added twice");
    size_t cap = p->n_meta; /* exact-size arrays: metadata entries are few */
    char **keys = realloc(p->meta_keys, (cap + 1) * sizeof *keys);
    if (keys)
        p->meta_keys = keys;
    char **values = realloc(p->meta_values, (cap + 1) * sizeof *values);
    if (values)
        p->meta_values = values;
    char *k = strdup(key), *v = strdup(value);
    if (!keys || !values || !k || !v) {
        free(k);
        free(v);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, key, "cannot add metadata");
    }
    p->meta_keys[p->n_meta] = k;
    p->meta_values[p->n_meta] = v;
    p->n_meta++;
    return 0;
}

/* Shard assignment (see the header): a new shard when the current one has a
 * tensor and `nbytes` more would exceed the limit. */
static bool plan_needs_new_shard(const st_plan *p, uint64_t nbytes)
{
    if (p->n_shards == 0)
        return true;
    const st_plan_shard *cur = &p->shards[p->n_shards - 1];
    if (cur->n_tensors == 0)
        return false;
    return nbytes > p->shard_limit || cur->data_bytes > p->shard_limit - nbytes;
}

int st_plan_add_tensor(st_plan *p, const char *name, st_dtype dtype, unsigned ndim,
                       const uint64_t *shape, size_t *index, ms_error *err)
{
    MS_ASSERT(!p->laid_out);
    if (!name || !*name)
        return ms_error_set(err, MS_EXIT_DATA, "output plan", "a tensor has an empty name");
    if (strcmp(name, "__metadata__") == 0)
        return ms_error_set(err, MS_EXIT_DATA, name, "reserved name cannot be a tensor");
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return ms_error_set(err, MS_EXIT_DATA, name, "invalid dtype %d", (int)dtype);
    if (ndim > ST_MAX_DIMS)
        return ms_error_set(err, MS_EXIT_DATA, name, "%u dimensions (at most %d)", ndim, ST_MAX_DIMS);
    /* The reader's own rules (io/st_format.h), so every plan reads back. */
    uint64_t numel, nbytes;
    if (st_shape_numel(shape, ndim, &numel) < 0)
        return ms_error_set(err, MS_EXIT_DATA, name, "element count overflows 64 bits");
    int rc = st_dtype_nbytes(dtype, numel, &nbytes);
    if (rc == -EOVERFLOW)
        return ms_error_set(err, MS_EXIT_DATA, name, "byte size overflows 64 bits");
    if (rc < 0)
        return ms_error_set(err, MS_EXIT_DATA, name, "%" PRIu64 " %s elements are not a whole number of bytes",
                            numel, st_dtype_name(dtype));
    if (nbytes > UINT64_MAX - p->total_bytes)
        return ms_error_set(err, MS_EXIT_DATA, name, "output size overflows 64 bits");

    if (!grow_array((void **)&p->tensors, &p->cap_tensors, p->n_tensors + 1, sizeof *p->tensors, 64))
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot add to the output plan");
    if (plan_needs_new_shard(p, nbytes)) {
        if (!grow_array((void **)&p->shards, &p->cap_shards, p->n_shards + 1, sizeof *p->shards, 4))
            return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot add to the output plan");
        p->shards[p->n_shards] = (st_plan_shard){.first_tensor = p->n_tensors};
        p->n_shards++;
    }
    char *copy = strdup(name);
    if (!copy)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "cannot add to the output plan");

    st_plan_shard *sh = &p->shards[p->n_shards - 1];
    st_plan_tensor *t = &p->tensors[p->n_tensors];
    *t = (st_plan_tensor){
        .name = copy,
        .dtype = dtype,
        .ndim = ndim,
        .numel = numel,
        .nbytes = nbytes,
        .shard = p->n_shards - 1,
        .begin = sh->data_bytes,
    };
    if (ndim)
        memcpy(t->shape, shape, ndim * sizeof *shape);
    sh->n_tensors++;
    sh->data_bytes += nbytes; /* <= total_bytes + nbytes, checked above */
    p->total_bytes += nbytes;
    if (index)
        *index = p->n_tensors;
    p->n_tensors++;
    return 0;
}

static int cmp_by_name(const void *a, const void *b, void *ctx)
{
    const st_plan_tensor *t = ctx;
    return strcmp(t[*(const size_t *)a].name, t[*(const size_t *)b].name);
}

/* Builds shard s's header bytes: length, compact JSON, space padding. */
static int plan_build_header(st_plan *p, size_t s, ms_error *err)
{
    st_plan_shard *sh = &p->shards[s];
    text_buf t = {0};
    text_add(&t, "\0\0\0\0\0\0\0\0", 8); /* the length, filled in below */
    text_str(&t, "{\"__metadata__\":{\"format\":\"pt\"");
    for (size_t i = 0; i < p->n_meta; i++) {
        text_str(&t, ",");
        text_json_string(&t, p->meta_keys[i]);
        text_str(&t, ":");
        text_json_string(&t, p->meta_values[i]);
    }
    text_str(&t, "}");
    for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++) {
        const st_plan_tensor *pt = &p->tensors[i];
        text_str(&t, ",");
        text_json_string(&t, pt->name);
        text_str(&t, ":{\"dtype\":\"");
        text_str(&t, st_dtype_name(pt->dtype));
        text_str(&t, "\",\"shape\":[");
        for (unsigned d = 0; d < pt->ndim; d++) {
            if (d)
                text_str(&t, ",");
            text_u64(&t, pt->shape[d]);
        }
        text_str(&t, "],\"data_offsets\":[");
        text_u64(&t, pt->begin);
        text_str(&t, ",");
        text_u64(&t, pt->begin + pt->nbytes);
        text_str(&t, "]}");
    }
    text_str(&t, "}");
    while (!t.failed && t.len % 8 != 0)
        text_str(&t, " ");
    if (t.failed) {
        text_free(&t);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, sh->file_name, "cannot build the header");
    }
    uint64_t json_len = t.len - 8;
    if (json_len > ST_MAX_HEADER_BYTES) {
        text_free(&t);
        return ms_error_set(err, MS_EXIT_DATA, sh->file_name,
                            "header of %" PRIu64 " bytes exceeds the %llu-byte limit of safetensors readers",
                            json_len, ST_MAX_HEADER_BYTES);
    }
    for (int i = 0; i < 8; i++)
        t.data[i] = (char)(unsigned char)(json_len >> (8 * i));
    sh->header = (unsigned char *)t.data; /* ownership moves to the shard */
    sh->header_bytes = t.len;
    if (sh->data_bytes > UINT64_MAX - sh->header_bytes)
        return ms_error_set(err, MS_EXIT_DATA, sh->file_name, "file size overflows 64 bits");
    sh->file_size = sh->header_bytes + sh->data_bytes;
    for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++)
        p->tensors[i].offset = sh->header_bytes + p->tensors[i].begin; /* <= file_size */
    return 0;
}

int st_plan_layout(st_plan *p, ms_error *err)
{
    MS_ASSERT(!p->laid_out);
    if (p->n_shards == 0) { /* no tensors: one shard with an empty header */
        if (!grow_array((void **)&p->shards, &p->cap_shards, 1, sizeof *p->shards, 1))
            return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "output plan", "cannot lay out");
        p->shards[0] = (st_plan_shard){0};
        p->n_shards = 1;
    }

    p->by_name = malloc((p->n_tensors ? p->n_tensors : 1) * sizeof *p->by_name);
    if (!p->by_name)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "output plan", "cannot lay out");
    for (size_t i = 0; i < p->n_tensors; i++)
        p->by_name[i] = i;
    qsort_r(p->by_name, p->n_tensors, sizeof *p->by_name, cmp_by_name, p->tensors);
    for (size_t i = 1; i < p->n_tensors; i++) {
        const char *a = p->tensors[p->by_name[i - 1]].name, *b = p->tensors[p->by_name[i]].name;
        if (strcmp(a, b) == 0)
            return ms_error_set(err, MS_EXIT_DATA, b, "tensor name appears twice in the output");
    }

    const char *stem = p->stem ? p->stem : ST_DEFAULT_STEM;
    if (asprintf(&p->index_name, "%s.safetensors.index.json", stem) < 0) {
        p->index_name = NULL;
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "output plan", "cannot lay out");
    }
    for (size_t s = 0; s < p->n_shards; s++) {
        char *name = NULL;
        int n = p->n_shards == 1
                    ? asprintf(&name, "%s.safetensors", stem)
                    : asprintf(&name, "%s-%05zu-of-%05zu.safetensors", stem, s + 1, p->n_shards);
        if (n < 0)
            return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, "output plan", "cannot lay out");
        p->shards[s].file_name = name;
    }
    for (size_t s = 0; s < p->n_shards; s++)
        if (plan_build_header(p, s, err) < 0)
            return -1;
    p->laid_out = true;
    return 0;
}

size_t st_plan_n_tensors(const st_plan *p) { return p->n_tensors; }

const st_plan_tensor *st_plan_tensor_at(const st_plan *p, size_t i)
{
    MS_ASSERT(i < p->n_tensors);
    return &p->tensors[i];
}

size_t st_plan_n_shards(const st_plan *p)
{
    MS_ASSERT(p->laid_out);
    return p->n_shards;
}

const st_plan_shard *st_plan_shard_at(const st_plan *p, size_t s)
{
    MS_ASSERT(p->laid_out && s < p->n_shards);
    return &p->shards[s];
}

long st_plan_find(const st_plan *p, const char *name)
{
    MS_ASSERT(p->laid_out);
    size_t lo = 0, hi = p->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(p->tensors[p->by_name[mid]].name, name);
        if (c == 0)
            return (long)p->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

uint64_t st_plan_total_bytes(const st_plan *p) { return p->total_bytes; }

bool st_plan_has_index(const st_plan *p)
{
    MS_ASSERT(p->laid_out);
    return p->n_shards > 1;
}

const char *st_plan_index_name(const st_plan *p)
{
    MS_ASSERT(p->laid_out);
    return p->index_name;
}

/* ============================================================== the writer */

/* Byte ranges of one tensor already written: sorted, disjoint, not touching
 * (touching ranges are merged). Written in order, a tensor needs one range;
 * when complete the array is freed. */
typedef struct tensor_state {
    uint64_t written;  /* bytes landed */
    uint64_t (*ranges)[2];
    size_t n_ranges, cap_ranges;
    uint64_t hash;
    bool has_hash;
} tensor_state;

typedef struct shard_state {
    char *partial_path; /* "<dir>/<file>.partial" */
    char *final_path;   /* "<dir>/<file>" */
    int fd;             /* -1 when not open */
    uint64_t missing;   /* data bytes not yet landed */
    bool created;       /* the partial file exists (and is ours) */
    bool final;         /* renamed to final_path */
    bool adopted;       /* final file of an earlier, interrupted run, kept (st_writer_adopt_shard) */
    uint64_t hash;      /* after finish */
} shard_state;

struct st_writer {
    const st_plan *plan;
    char *dir;
    char *index_path;
    tensor_state *tensors;
    shard_state *shards;
    bool failed;        /* an I/O error happened: only abort is left */
    bool finished;
    bool index_written;
};

static char *path_join(const char *dir, const char *name, const char *suffix)
{
    size_t dl = strlen(dir);
    const char *sep = (dl && dir[dl - 1] == '/') ? "" : "/";
    char *out = NULL;
    if (asprintf(&out, "%s%s%s%s", dir, sep, name, suffix) < 0)
        return NULL;
    return out;
}

int st_writer_open(const st_plan *plan, const char *dir, st_writer **out, ms_error *err)
{
    MS_ASSERT(plan->laid_out);
    *out = NULL;
    st_writer *w = calloc(1, sizeof *w);
    if (!w)
        goto nomem;
    w->plan = plan;
    w->dir = strdup(dir);
    w->index_path = path_join(dir, plan->index_name, "");
    w->tensors = calloc(plan->n_tensors ? plan->n_tensors : 1, sizeof *w->tensors);
    w->shards = calloc(plan->n_shards, sizeof *w->shards);
    if (!w->dir || !w->index_path || !w->tensors || !w->shards)
        goto nomem;
    for (size_t s = 0; s < plan->n_shards; s++) {
        w->shards[s].fd = -1;
        w->shards[s].missing = plan->shards[s].data_bytes;
    }
    for (size_t s = 0; s < plan->n_shards; s++) {
        shard_state *ss = &w->shards[s];
        ss->final_path = path_join(dir, plan->shards[s].file_name, "");
        ss->partial_path = path_join(dir, plan->shards[s].file_name, ".partial");
        if (!ss->final_path || !ss->partial_path)
            goto nomem;
    }
    *out = w;
    return 0;
nomem:
    st_writer_close(w); /* nothing was created: only frees */
    return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot allocate the output writer");
}

/* Marks the writer unusable and fills err; returns -1. */
static int writer_io_error(st_writer *w, ms_error *err, int errnum, const char *where, const char *what)
{
    w->failed = true;
    return ms_error_errno(err, MS_EXIT_RUNTIME, errnum, where, "%s", what);
}

static int writer_check_usable(const st_writer *w, ms_error *err)
{
    if (w->failed)
        return ms_error_set(err, MS_EXIT_RUNTIME, w->dir, "output writer failed earlier");
    if (w->finished)
        return ms_error_set(err, MS_EXIT_RUNTIME, w->dir, "output writer already finished");
    return 0;
}

int st_writer_shard_open(st_writer *w, size_t s, ms_error *err)
{
    MS_ASSERT(s < w->plan->n_shards);
    if (writer_check_usable(w, err) < 0)
        return -1;
    shard_state *ss = &w->shards[s];
    if (ss->created)
        return 0;
    const st_plan_shard *sh = &w->plan->shards[s];
    ss->fd = open(ss->partial_path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (ss->fd < 0)
        return writer_io_error(w, err, errno, ss->partial_path, "cannot create");
    ss->created = true;
    if (sh->file_size > (uint64_t)INT64_MAX)
        return writer_io_error(w, err, EFBIG, ss->partial_path, "cannot reserve space");
    /* fallocate(2), not posix_fallocate: glibc's fallback for file systems
     * without it writes every block, which costs more than it saves. */
    if (fallocate(ss->fd, 0, 0, (off_t)sh->file_size) < 0 && errno != EOPNOTSUPP &&
        errno != EINVAL && errno != ENOSYS) {
        char what[64];
        snprintf(what, sizeof what, "cannot reserve %" PRIu64 " bytes", sh->file_size);
        return writer_io_error(w, err, errno, ss->partial_path, what);
    }
    int rc = ms_pwrite_all(ss->fd, sh->header, sh->header_bytes, 0);
    if (rc < 0)
        return writer_io_error(w, err, -rc, ss->partial_path, "write failed");
    return 0;
}

/* fsync, close, rename to the final name. */
static int writer_shard_finalize(st_writer *w, size_t s, ms_error *err)
{
    shard_state *ss = &w->shards[s];
    MS_ASSERT(ss->created && !ss->final && ss->missing == 0);
    int rc = ms_fsync_fd(ss->fd);
    if (rc < 0)
        return writer_io_error(w, err, -rc, ss->partial_path, "fsync failed");
    int c = close(ss->fd);
    ss->fd = -1;
    if (c < 0)
        return writer_io_error(w, err, errno, ss->partial_path, "close failed");
    rc = ms_rename(ss->partial_path, ss->final_path);
    if (rc < 0)
        return writer_io_error(w, err, -rc, ss->final_path, "cannot rename the .partial file to it");
    ss->final = true;
    return 0;
}

/* Checks that [offset, offset + len) lies in the tensor and overlaps nothing
 * written; without error, records it when `record`. */
static int tensor_range_add(tensor_state *ts, const st_plan_tensor *pt, uint64_t offset, uint64_t len,
                            bool record, ms_error *err)
{
    if (offset > pt->nbytes || len > pt->nbytes - offset)
        return ms_error_set(err, MS_EXIT_RUNTIME, pt->name,
                            "write of bytes [%" PRIu64 ", +%" PRIu64 ") outside the tensor's %" PRIu64 " bytes",
                            offset, len, pt->nbytes);
    if (len == 0)
        return 0;
    uint64_t end = offset + len;
    /* i: the first range ending after offset, the only one that can overlap. */
    size_t i = 0;
    while (i < ts->n_ranges && ts->ranges[i][1] <= offset)
        i++;
    if (ts->written == pt->nbytes || (i < ts->n_ranges && ts->ranges[i][0] < end))
        return ms_error_set(err, MS_EXIT_RUNTIME, pt->name,
                            "write of bytes [%" PRIu64 ", +%" PRIu64 ") overlaps bytes already written",
                            offset, len);
    if (!record)
        return 0;
    if (ts->written + len == pt->nbytes) { /* complete: the ranges are no longer needed */
        ts->written = pt->nbytes;
        free(ts->ranges);
        ts->ranges = NULL;
        ts->n_ranges = ts->cap_ranges = 0;
        return 0;
    }
    bool join_prev = i > 0 && ts->ranges[i - 1][1] == offset;
    bool join_next = i < ts->n_ranges && ts->ranges[i][0] == end;
    if (join_prev && join_next) {
        ts->ranges[i - 1][1] = ts->ranges[i][1];
        memmove(&ts->ranges[i], &ts->ranges[i + 1], (ts->n_ranges - i - 1) * sizeof ts->ranges[0]);
        ts->n_ranges--;
    } else if (join_prev) {
        ts->ranges[i - 1][1] = end;
    } else if (join_next) {
        ts->ranges[i][0] = offset;
    } else {
        if (!grow_array((void **)&ts->ranges, &ts->cap_ranges, ts->n_ranges + 1, sizeof ts->ranges[0], 4))
            return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, pt->name, "cannot track written ranges");
        memmove(&ts->ranges[i + 1], &ts->ranges[i], (ts->n_ranges - i) * sizeof ts->ranges[0]);
        ts->ranges[i][0] = offset;
        ts->ranges[i][1] = end;
        ts->n_ranges++;
    }
    ts->written += len;
    return 0;
}

/* Records landed bytes and finalizes the shard when they were its last. */
static int writer_note_landed(st_writer *w, size_t tensor, uint64_t offset, uint64_t len, ms_error *err)
{
    const st_plan_tensor *pt = &w->plan->tensors[tensor];
    if (tensor_range_add(&w->tensors[tensor], pt, offset, len, true, err) < 0)
        return -1;
    shard_state *ss = &w->shards[pt->shard];
    MS_ASSERT(ss->missing >= len);
    ss->missing -= len;
    if (ss->missing == 0 && len > 0)
        return writer_shard_finalize(w, pt->shard, err);
    return 0;
}

int st_writer_tensor_target(st_writer *w, size_t tensor, int *fd, uint64_t *file_offset, ms_error *err)
{
    MS_ASSERT(tensor < w->plan->n_tensors);
    const st_plan_tensor *pt = &w->plan->tensors[tensor];
    if (st_writer_shard_open(w, pt->shard, err) < 0)
        return -1;
    if (w->shards[pt->shard].final)
        return ms_error_set(err, MS_EXIT_RUNTIME, pt->name, "its shard %s is already complete",
                            w->shards[pt->shard].final_path);
    *fd = w->shards[pt->shard].fd;
    *file_offset = pt->offset;
    return 0;
}

int st_writer_tensor_landed(st_writer *w, size_t tensor, uint64_t offset, uint64_t len, ms_error *err)
{
    MS_ASSERT(tensor < w->plan->n_tensors);
    if (writer_check_usable(w, err) < 0)
        return -1;
    return writer_note_landed(w, tensor, offset, len, err);
}

int st_writer_write(st_writer *w, size_t tensor, uint64_t offset, const void *buf, uint64_t len,
                    ms_error *err)
{
    MS_ASSERT(tensor < w->plan->n_tensors);
    if (writer_check_usable(w, err) < 0)
        return -1;
    const st_plan_tensor *pt = &w->plan->tensors[tensor];
    if (tensor_range_add(&w->tensors[tensor], pt, offset, len, false, err) < 0)
        return -1;
    if (len == 0)
        return 0;
    if (len > SIZE_MAX)
        return ms_error_set(err, MS_EXIT_RUNTIME, pt->name, "write larger than the address space");
    if (st_writer_shard_open(w, pt->shard, err) < 0)
        return -1;
    shard_state *ss = &w->shards[pt->shard];
    int rc = ms_pwrite_all(ss->fd, buf, (size_t)len, pt->offset + offset);
    if (rc < 0)
        return writer_io_error(w, err, -rc, ss->partial_path, "write failed");
    /* Start writing these pages to disk now, without waiting: the shard's
     * fsync at the end then finds little left to flush, and dirty output
     * does not pile up in the page cache of a merge larger than RAM.
     * Advisory (a file system may refuse it): crash safety rests on the
     * fsync. A hot 400 MB TIES merge here: 0.79 s median against 0.96 s
     * (runs in ABBA order); cold the same (bench/RESULTS.md). */
    (void)sync_file_range(ss->fd, (off_t)(pt->offset + offset), (off_t)len, SYNC_FILE_RANGE_WRITE);
    if (writer_note_landed(w, tensor, offset, len, err) < 0) {
        w->failed = true; /* the range was checked above: this is no memory or I/O */
        return -1;
    }
    return 0;
}

int st_writer_write_tensor(st_writer *w, size_t tensor, const void *buf, ms_error *err)
{
    MS_ASSERT(tensor < w->plan->n_tensors);
    const st_plan_tensor *pt = &w->plan->tensors[tensor];
    if (pt->nbytes > SIZE_MAX)
        return ms_error_set(err, MS_EXIT_RUNTIME, pt->name, "tensor larger than the address space");
    /* Hash first: finalizing the shard needs no hash, but finish does. */
    uint64_t hash = ms_hash64(buf, (size_t)pt->nbytes);
    if (st_writer_write(w, tensor, 0, buf, pt->nbytes, err) < 0)
        return -1;
    st_writer_set_tensor_hash(w, tensor, hash);
    return 0;
}

void st_writer_set_tensor_hash(st_writer *w, size_t tensor, uint64_t hash)
{
    MS_ASSERT(tensor < w->plan->n_tensors);
    w->tensors[tensor].hash = hash;
    w->tensors[tensor].has_hash = true;
}

uint64_t st_writer_shard_missing(const st_writer *w, size_t s)
{
    MS_ASSERT(s < w->plan->n_shards);
    return w->shards[s].missing;
}

bool st_writer_shard_is_final(const st_writer *w, size_t s)
{
    MS_ASSERT(s < w->plan->n_shards);
    return w->shards[s].final;
}

/* The index, as transformers writes it (json.dumps(indent=2, sort_keys=True)). */
static int writer_write_index(st_writer *w, ms_error *err)
{
    const st_plan *p = w->plan;
    text_buf t = {0};
    text_str(&t, "{\n  \"metadata\": {\n    \"total_size\": ");
    text_u64(&t, p->total_bytes);
    text_str(&t, "\n  },\n  \"weight_map\": {");
    for (size_t i = 0; i < p->n_tensors; i++) {
        const st_plan_tensor *pt = &p->tensors[p->by_name[i]];
        text_str(&t, i ? ",\n    " : "\n    ");
        text_json_string(&t, pt->name);
        text_str(&t, ": ");
        text_json_string(&t, p->shards[pt->shard].file_name);
    }
    text_str(&t, p->n_tensors ? "\n  }\n}\n" : "}\n}\n");
    if (t.failed) {
        text_free(&t);
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, w->index_path, "cannot build the index");
    }
    int rc = ms_atomic_write_file(w->index_path, t.data, t.len, err);
    text_free(&t);
    if (rc < 0) {
        w->failed = true;
        return -1;
    }
    w->index_written = true;
    return 0;
}

int st_writer_finish(st_writer *w, ms_error *err)
{
    if (writer_check_usable(w, err) < 0)
        return -1;
    const st_plan *p = w->plan;
    uint64_t *hashes = NULL;
    for (size_t s = 0; s < p->n_shards; s++) {
        shard_state *ss = &w->shards[s];
        const st_plan_shard *sh = &p->shards[s];
        if (ss->missing > 0) {
            const char *incomplete = "?";
            for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++) {
                if (w->tensors[i].written < p->tensors[i].nbytes) {
                    incomplete = p->tensors[i].name;
                    break;
                }
            }
            return ms_error_set(err, MS_EXIT_RUNTIME, ss->partial_path,
                                "%" PRIu64 " bytes never written (tensor %s is incomplete)", ss->missing,
                                incomplete);
        }
        if (!ss->final) { /* only shards without data bytes get here */
            if (st_writer_shard_open(w, s, err) < 0 || writer_shard_finalize(w, s, err) < 0)
                return -1;
        }
    }
    for (size_t i = 0; i < p->n_tensors; i++)
        if (!w->tensors[i].has_hash)
            return ms_error_set(err, MS_EXIT_RUNTIME, p->tensors[i].name, "no hash recorded for the tensor");

    hashes = malloc((p->n_tensors ? p->n_tensors : 1) * sizeof *hashes);
    if (!hashes)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, w->dir, "cannot compute shard hashes");
    for (size_t i = 0; i < p->n_tensors; i++)
        hashes[i] = w->tensors[i].hash;
    for (size_t s = 0; s < p->n_shards; s++) {
        const st_plan_shard *sh = &p->shards[s];
        w->shards[s].hash = ms_shard_hash(sh->header, sh->header_bytes, hashes + sh->first_tensor, sh->n_tensors);
    }
    free(hashes);

    if (ms_fsync_dir(w->dir, err) < 0) {
        w->failed = true;
        return -1;
    }
    if (p->n_shards > 1 && writer_write_index(w, err) < 0)
        return -1;
    w->finished = true;
    return 0;
}

int st_writer_adopt_shard(st_writer *w, size_t s, const uint64_t *tensor_hashes, ms_error *err)
{
    if (writer_check_usable(w, err) < 0)
        return -1;
    MS_ASSERT(s < w->plan->n_shards);
    shard_state *ss = &w->shards[s];
    const st_plan_shard *sh = &w->plan->shards[s];
    MS_ASSERT(!ss->created && !ss->final && ss->missing == sh->data_bytes);
    struct stat st;
    if (stat(ss->final_path, &st) != 0 || (uint64_t)st.st_size != sh->file_size)
        return ms_error_set(err, MS_EXIT_DATA, ss->final_path, "cannot adopt: missing or not %" PRIu64 " bytes",
                            sh->file_size);
    for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++) {
        tensor_state *ts = &w->tensors[i];
        MS_ASSERT(ts->written == 0);
        ts->written = w->plan->tensors[i].nbytes;
        ts->hash = tensor_hashes[i - sh->first_tensor];
        ts->has_hash = true;
    }
    ss->missing = 0;
    ss->final = true;
    ss->adopted = true;
    return 0;
}

uint64_t st_writer_tensor_hash(const st_writer *w, size_t tensor)
{
    MS_ASSERT(tensor < w->plan->n_tensors && w->tensors[tensor].has_hash);
    return w->tensors[tensor].hash;
}

uint64_t st_writer_shard_hash(const st_writer *w, size_t s)
{
    MS_ASSERT(s < w->plan->n_shards && w->finished);
    return w->shards[s].hash;
}

static void writer_free(st_writer *w)
{
    if (w->tensors)
        for (size_t i = 0; i < w->plan->n_tensors; i++)
            free(w->tensors[i].ranges);
    if (w->shards) {
        for (size_t s = 0; s < w->plan->n_shards; s++) {
            if (w->shards[s].fd >= 0)
                close(w->shards[s].fd);
            free(w->shards[s].partial_path);
            free(w->shards[s].final_path);
        }
    }
    free(w->tensors);
    free(w->shards);
    free(w->dir);
    free(w->index_path);
    free(w);
}

void st_writer_abort(st_writer *w)
{
    if (!w)
        return;
    bool removed = false;
    if (w->shards) {
        for (size_t s = 0; s < w->plan->n_shards; s++) {
            shard_state *ss = &w->shards[s];
            if (ss->fd >= 0)
                close(ss->fd);
            ss->fd = -1;
            if (ss->final && !ss->adopted)
                removed |= unlink(ss->final_path) == 0;
            else if (ss->created)
                removed |= unlink(ss->partial_path) == 0;
        }
    }
    if (w->index_written)
        removed |= unlink(w->index_path) == 0;
    if (removed)
        ms_fsync_dir(w->dir, NULL); /* best effort: make the removals stick */
    writer_free(w);
}

void st_writer_close(st_writer *w)
{
    if (!w)
        return;
    if (!w->finished) {
        st_writer_abort(w);
        return;
    }
    writer_free(w);
}
