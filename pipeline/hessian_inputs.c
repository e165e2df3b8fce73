/* Hessian sets on disk and the per-tensor preparation (see hessian_inputs.h). */
#include "pipeline/hessian_inputs.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/atomic_file.h"
#include "io/model_dir.h"
#include "io/ms_fault.h"
#include "io/st_format.h"
#include "pipeline/merge_passes_hessian.h"

#define HESSIAN_SINGLE "hessians.safetensors"
#define HESSIAN_INDEX "hessians.safetensors.index.json"

typedef struct hessian_entry {
    char *module; /* "model.layers.3.self_attn.k_proj" */
    char *tensor; /* "model.layers.3.self_attn.qkv_input" */
} hessian_entry;

/* A saliency vector u computed from one of the set's Hessians: q, k and v
 * (gate and up) read the same Hessian, so it is factored once, not three
 * times. Bounded: HESSIAN_U_CACHE vectors of dim floats per set (at most
 * ~1.7 MiB at dim 53248), least recently used replaced. */
#define HESSIAN_U_CACHE 8

typedef struct hessian_u_entry {
    const st_tensor *tensor; /* the Hessian (in the set's headers); NULL: empty slot */
    uint64_t dim;
    float *u;                /* [dim]; NULL: not positive definite after damping */
    uint64_t last_use;
} hessian_u_entry;

struct ms_hessian_set {
    char *path;
    ms_model *files; /* hessians.safetensors, or the shards its index lists (io/model_dir.h) */
    hessian_entry *map; /* sorted by module */
    size_t n_map;
    /* The u cache, shared by the compute workers: every field under u_lock. */
    pthread_mutex_t u_lock;
    hessian_u_entry u_cache[HESSIAN_U_CACHE];
    uint64_t u_clock;
};

/* One log line per run for a weight without a Hessian (there are many). */
static int g_missing_logged;

const char *ms_hessian_set_path(const ms_hessian_set *s)
{
    return s->path;
}

void ms_hessian_set_close(ms_hessian_set *s)
{
    if (!s)
        return;
    for (unsigned k = 0; k < HESSIAN_U_CACHE; k++)
        free(s->u_cache[k].u);
    pthread_mutex_destroy(&s->u_lock);
    ms_model_close(s->files);
    for (size_t i = 0; i < s->n_map; i++) {
        free(s->map[i].module);
        free(s->map[i].tensor);
    }
    free(s->map);
    free(s->path);
    free(s);
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const hessian_entry *)a)->module, ((const hessian_entry *)b)->module);
}

/* hessian_map from the first shard that carries it. */
static int set_parse_map(ms_hessian_set *s, ms_error *err)
{
    const char *text = NULL, *where = s->path;
    for (unsigned i = 0; i < s->files->n_shards && !text; i++) {
        const st_header *h = &s->files->shards[i]->header;
        for (size_t k = 0; k < h->n_meta; k++)
            if (strcmp(h->meta_keys[k], "hessian_map") == 0) {
                text = h->meta_values[k];
                where = s->files->shards[i]->path;
            }
    }
    if (!text)
        return ms_error_set(err, MS_EXIT_DATA, s->path,
                            "no \"hessian_map\" in the metadata: not the output of `mergestream hessian`");
    cJSON *root = cJSON_Parse(text);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        ms_error_set(err, MS_EXIT_DATA, where, "hessian_map is not a JSON object");
        goto done;
    }
    size_t n = (size_t)cJSON_GetArraySize(root);
    s->map = calloc(n ? n : 1, sizeof *s->map);
    if (!s->map) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, where, "cannot read hessian_map");
        goto done;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        if (!cJSON_IsString(it)) {
            ms_error_set(err, MS_EXIT_DATA, where, "hessian_map entry '%s' is not a tensor name", it->string);
            goto done;
        }
        hessian_entry *e = &s->map[s->n_map];
        e->module = strdup(it->string);
        e->tensor = strdup(it->valuestring);
        s->n_map++;
        if (!e->module || !e->tensor) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, where, "cannot read hessian_map");
            goto done;
        }
    }
    qsort(s->map, s->n_map, sizeof *s->map, entry_cmp);
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

/* DIR/NAME in a new string, or NULL (out of memory). */
static char *dir_file(const char *dir, const char *name)
{
    char *path;
    return asprintf(&path, "%s/%s", dir, name) < 0 ? NULL : path;
}

int ms_hessian_set_open(const char *dir, ms_hessian_set **out, ms_error *err)
{
    *out = NULL;
    char *file = NULL;
    ms_hessian_set *s = calloc(1, sizeof *s);
    if (!s) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot open the Hessians");
        return -1;
    }
    pthread_mutex_init(&s->u_lock, NULL);
    if (!(s->path = strdup(dir))) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot open the Hessians");
        goto fail;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        ms_error_errno(err, MS_EXIT_DATA, errno, dir, "cannot open the Hessians");
        goto fail;
    }
    /* a directory: its hessians.safetensors, else the index of its shards */
    if (S_ISDIR(sb.st_mode)) {
        file = dir_file(dir, HESSIAN_SINGLE);
        if (file && access(file, F_OK) != 0) {
            free(file);
            file = dir_file(dir, HESSIAN_INDEX);
        }
        if (!file) {
            ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, dir, "cannot open the Hessians");
            goto fail;
        }
        if (access(file, F_OK) != 0) {
            ms_error_set(err, MS_EXIT_DATA, dir,
                         "no " HESSIAN_SINGLE " or " HESSIAN_INDEX " (run `mergestream hessian` first)");
            goto fail;
        }
    }
    if (ms_model_open(file ? file : dir, &s->files, err) < 0)
        goto fail;
    if (set_parse_map(s, err) < 0)
        goto fail;
    free(file);
    *out = s;
    return 0;
fail:
    free(file);
    ms_hessian_set_close(s);
    return -1;
}

/* The shard and tensor of weight_name's Hessian, or false. */
static bool set_locate(const ms_hessian_set *s, const char *weight_name, const st_file **file,
                       const st_tensor **tensor)
{
    char module[512];
    size_t len = strlen(weight_name);
    const char *suffix = ".weight";
    size_t sl = strlen(suffix);
    if (len > sl && strcmp(weight_name + len - sl, suffix) == 0)
        len -= sl;
    if (len >= sizeof module)
        return false;
    memcpy(module, weight_name, len);
    module[len] = '\0';
    hessian_entry key = {.module = module};
    const hessian_entry *e = bsearch(&key, s->map, s->n_map, sizeof *s->map, entry_cmp);
    if (!e)
        return false;
    long t = ms_model_find(s->files, e->tensor);
    if (t < 0)
        return false;
    *file = ms_model_tensor_file(s->files, (size_t)t);
    *tensor = s->files->tensors[t].info;
    return true;
}

bool ms_hessian_set_find(const ms_hessian_set *s, const char *weight_name, uint64_t *dim)
{
    const st_file *f;
    const st_tensor *t;
    if (!set_locate(s, weight_name, &f, &t))
        return false;
    *dim = t->ndim >= 1 ? t->shape[0] : 0;
    return true;
}

/* A weight with cols input columns needs an F32 [cols, cols] Hessian. */
static int check_hessian_shape(const st_file *f, const st_tensor *t, const char *weight, uint64_t cols, ms_error *err)
{
    if (t->dtype == ST_F32 && t->ndim == 2 && t->shape[0] == cols && t->shape[1] == cols)
        return 0;
    char shape[64];
    st_shape_format(t, shape, sizeof shape);
    return ms_error_set(err, MS_EXIT_DATA, f->path, "Hessian '%s' for '%s' is %s %s; the weight needs F32 [%llu, %llu]",
                        t->name, weight, st_dtype_name(t->dtype), shape, (unsigned long long)cols,
                        (unsigned long long)cols);
}

int ms_hessian_set_check(const ms_hessian_set *s, const char *weight_name, uint64_t cols, ms_error *err)
{
    const st_file *f;
    const st_tensor *t;
    if (!s || !set_locate(s, weight_name, &f, &t))
        return 0;
    return check_hessian_shape(f, t, weight_name, cols, err);
}

/* Reads the [cols, cols] F32 Hessian into a new buffer (*out, caller frees). */
static int read_hessian(const st_file *f, const st_tensor *t, const char *weight, uint64_t cols, float **out,
                        ms_error *err)
{
    *out = NULL;
    if (check_hessian_shape(f, t, weight, cols, err) != 0)
        return -1;
    uint64_t bytes = st_tensor_nbytes(t);
    if (bytes > SIZE_MAX || ms_fault_hit(MS_FAULT_HOST_ALLOC) || !(*out = malloc((size_t)bytes)))
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, f->path, "cannot read Hessian '%s'", t->name);
    int rc = ms_pread_all(f->fd, *out, (size_t)bytes, st_file_tensor_offset(f, t));
    if (rc == 0)
        return 0;
    free(*out);
    *out = NULL;
    int e = rc == -ENODATA ? EIO : -rc; /* the file shrank */
    return ms_error_errno(err, MS_EXIT_RUNTIME, e, f->path, "cannot read Hessian '%s'", t->name);
}

static const char *fallback_what(const ms_tensor_params *p)
{
    return p->method == MS_METHOD_REGMEAN ? "the mean of the models" : "magnitude trimming";
}

/* ------------------------------------------------------------ u cache */

/* Model i's u from set's cache when the Hessian t was factored before:
 * true (*edom: it was not positive definite; else u is in st, or *rc =
 * -ENOMEM), false when not cached. */
static bool u_cache_take(ms_hessian_set *set, const st_tensor *t, ms_merge_state *st, const ms_tensor_params *p,
                         unsigned i, bool *edom, int *rc)
{
    bool hit = false;
    pthread_mutex_lock(&set->u_lock);
    for (unsigned k = 0; k < HESSIAN_U_CACHE && !hit; k++) {
        hessian_u_entry *e = &set->u_cache[k];
        if (e->tensor != t || e->dim != p->cols)
            continue;
        hit = true;
        e->last_use = ++set->u_clock;
        *edom = e->u == NULL;
        *rc = e->u ? ms_hessian_state_set_u(st, p, i, e->u) : 0;
    }
    pthread_mutex_unlock(&set->u_lock);
    return hit;
}

/* Remembers the outcome of factoring t (u, or NULL for -EDOM) in the least
 * recently used slot. Out of memory only skips the caching. */
static void u_cache_put(ms_hessian_set *set, const st_tensor *t, uint64_t dim, const float *u)
{
    float *copy = NULL;
    if (u) {
        copy = malloc((size_t)dim * sizeof *copy);
        if (!copy)
            return;
        memcpy(copy, u, (size_t)dim * sizeof *copy);
    }
    pthread_mutex_lock(&set->u_lock);
    hessian_u_entry *victim = &set->u_cache[0];
    for (unsigned k = 0; k < HESSIAN_U_CACHE; k++) {
        hessian_u_entry *e = &set->u_cache[k];
        if (e->tensor == t && e->dim == dim) { /* another worker was first */
            victim = NULL;
            break;
        }
        if (e->last_use < victim->last_use)
            victim = e;
    }
    if (victim) {
        free(victim->u);
        *victim = (hessian_u_entry){.tensor = t, .dim = dim, .u = copy, .last_use = ++set->u_clock};
        copy = NULL;
    }
    pthread_mutex_unlock(&set->u_lock);
    free(copy);
}

/* Model i's saliency u from Hessian t of set: from the cache, else read and
 * factored (where f says, holding pool_lock) and cached. Returns 0 (*edom: not
 * positive definite), or -1 with err set. */
static int prepare_saliency(ms_merge_state *st, const ms_tensor_params *p, const char *name, unsigned i,
                            ms_hessian_set *set, const st_file *f, const st_tensor *t,
                            const ms_hessian_factoriser *fz, pthread_mutex_t *pool_lock, bool *edom, ms_error *err)
{
    int rc = 0;
    *edom = false;
    if (!u_cache_take(set, t, st, p, i, edom, &rc)) {
        float *H = NULL;
        if (read_hessian(f, t, name, p->cols, &H, err) < 0)
            return -1;
        if (pool_lock)
            pthread_mutex_lock(pool_lock);
        /* a worker that held the lock may have just factored the same Hessian */
        if (!u_cache_take(set, t, st, p, i, edom, &rc)) {
            rc = ms_hessian_state_add(st, p, i, H, fz);
            if (rc == 0 || rc == -EDOM)
                u_cache_put(set, t, p->cols, rc == 0 ? st->hessian->u[i] : NULL);
            *edom = rc == -EDOM;
            rc = rc == -EDOM ? 0 : rc;
        }
        if (pool_lock)
            pthread_mutex_unlock(pool_lock);
        free(H);
    }
    if (rc != 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "out of memory for Hessian coefficients");
    return 0;
}

int ms_hessian_prepare(ms_merge_state *st, const ms_tensor_params *p, const char *name,
                       ms_hessian_set *const sets[MS_MAX_MODELS + 1], const ms_hessian_factoriser *fz,
                       pthread_mutex_t *pool_lock, ms_error *err)
{
    if (!ms_merge_hessian_method(p->method))
        return 0;
    if (ms_hessian_state_open(st, p) != 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "out of memory for Hessian coefficients");
    for (unsigned i = 1; i <= p->n_models; i++) {
        if (p->method != MS_METHOD_REGMEAN && !ms_hessian_model_uses_u(st, p, i))
            continue; /* keeps everything or nothing: no key needed */
        const st_file *f = NULL;
        const st_tensor *t = NULL;
        if (!sets[i] || !set_locate(sets[i], name, &f, &t)) {
            if (!__atomic_exchange_n(&g_missing_logged, 1, __ATOMIC_RELAXED))
                ms_log_info("%s: no Hessian for models[%u]%s%s: %s (logged once per run; other weights "
                            "without one fall back the same way)",
                            name, i - 1, sets[i] ? " in " : "", sets[i] ? sets[i]->path : "", fallback_what(p));
            continue;
        }
        int rc = 0;
        bool edom = false;
        if (p->method == MS_METHOD_REGMEAN) {
            float *H = NULL;
            if (read_hessian(f, t, name, p->cols, &H, err) < 0)
                return -1;
            rc = ms_hessian_state_add(st, p, i, H, NULL); /* G_i: O(cols^2), no factorisation */
            free(H);
            if (rc == -ENOMEM)
                return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "out of memory for Hessian coefficients");
            edom = rc == -EDOM;
        } else if (prepare_saliency(st, p, name, i, sets[i], f, t, fz, pool_lock, &edom, err) < 0) {
            return -1;
        }
        if (edom)
            ms_log_warn("%s: the Hessian of model %u (%s in %s) is not positive definite after damping: %s",
                        name, i, t->name, f->path, fallback_what(p));
    }
    if (pool_lock)
        pthread_mutex_lock(pool_lock);
    int rc = ms_hessian_state_finish(st, p, fz);
    if (pool_lock)
        pthread_mutex_unlock(pool_lock);
    if (rc == -ENOMEM)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, name, "out of memory for Hessian coefficients");
    if (rc == -EDOM)
        ms_log_warn("%s: the sum of the models' Gram matrices is not positive definite: %s", name,
                    fallback_what(p));
    return 0;
}
