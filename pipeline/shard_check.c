/* Re-reading output shards as they are committed (pipeline/shard_check.h). */
#include "pipeline/shard_check.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io/page_cache.h"
#include "io/range_hash.h"
#include "io/st_format.h"

struct ms_shard_check {
    char *dir;
    size_t cap;
    pthread_t thread;
    bool sync_ready; /* lock and posted initialised */
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t posted;
    /* guarded by lock */
    char **queue;            /* cap entries: posted file names, in order */
    bool *taken;             /* cap entries */
    size_t n_posted, n_taken;
    bool stop;               /* finish: give up the shard in hand, take no more */
    bool failed;
    ms_error err;            /* the first failed check's */
    /* written by the thread only; read after it has been joined */
    ms_shard_hashes *done;   /* cap entries */
    size_t n_done;
};

static bool stopping(ms_shard_check *c)
{
    pthread_mutex_lock(&c->lock);
    bool stop = c->stop;
    pthread_mutex_unlock(&c->lock);
    return stop;
}

/* A shard is read back only while the page cache holds this much of it:
 * what the cache has lost would come from the disk, beside the run's own
 * reads, and the final verify reads it as well (on every core, after the
 * run) as this thread could now. */
#define CHECK_RESIDENT_FRACTION 0.9

/* Hashes every tensor of dir/file into *out. Returns 1 when done, 0 when
 * given up (a stop, or the file no longer in the page cache), -1 with err
 * set. */
static int check_shard(ms_shard_check *c, const char *file, ms_shard_hashes *out, ms_error *err)
{
    char *path = NULL;
    if (asprintf(&path, "%s/%s", c->dir, file) < 0)
        return ms_error_set(err, MS_EXIT_RUNTIME, file, "out of memory");
    st_file *f = NULL;
    int rc = -1;
    struct stat st;
    if (st_file_open(path, &f, err) != 0)
        goto done;
    if ((double)ms_page_cache_resident(f->fd, f->file_size) < CHECK_RESIDENT_FRACTION * (double)f->file_size) {
        rc = 0; /* read from the disk now, it would only slow the run's reads */
        goto done;
    }
    if (fstat(f->fd, &st) != 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "cannot stat");
        goto done;
    }
    size_t n = f->header.n_tensors;
    *out = (ms_shard_hashes){.file = strdup(file), .dev = (uint64_t)st.st_dev, .ino = (uint64_t)st.st_ino,
                             .size = (uint64_t)st.st_size,
                             .mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec,
                             .ctime_ns = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec,
                             .n_tensors = n, .hashes = calloc(n ? n : 1, sizeof(uint64_t))};
    if (!out->file || !out->hashes) {
        ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
        goto done;
    }
    rc = 1;
    for (size_t t = 0; t < n && rc == 1; t++) {
        const st_tensor *ti = &f->header.tensors[t];
        if (stopping(c))
            rc = 0;
        else if (ms_range_hash(f->fd, st_file_tensor_offset(f, ti), ti->end - ti->begin, path, &out->hashes[t],
                               err) != 0)
            rc = -1;
    }
done:
    if (rc != 1) {
        free(out->file);
        free(out->hashes);
        *out = (ms_shard_hashes){0};
    }
    st_file_close(f);
    free(path);
    return rc;
}

static void *check_main(void *arg)
{
    ms_shard_check *c = arg;
    for (;;) {
        pthread_mutex_lock(&c->lock);
        while (!c->stop && c->n_taken == c->n_posted)
            pthread_cond_wait(&c->posted, &c->lock);
        if (c->stop) {
            pthread_mutex_unlock(&c->lock);
            return NULL;
        }
        /* the newest first: the shard most likely still in the page cache */
        size_t i = c->n_posted;
        while (c->taken[--i])
            ;
        c->taken[i] = true;
        c->n_taken++;
        const char *file = c->queue[i];
        pthread_mutex_unlock(&c->lock);
        ms_error e = {0};
        int rc = check_shard(c, file, &c->done[c->n_done], &e);
        if (rc == 1) {
            c->n_done++;
        } else if (rc < 0) {
            pthread_mutex_lock(&c->lock);
            c->failed = true;
            c->err = e;
            c->stop = true;
            pthread_mutex_unlock(&c->lock);
            return NULL;
        }
    }
}

int ms_shard_check_open(const char *dir, size_t n_shards, ms_shard_check **out, ms_error *err)
{
    *out = NULL;
    ms_shard_check *c = calloc(1, sizeof *c);
    if (c) {
        c->cap = n_shards;
        c->dir = strdup(dir);
        c->queue = calloc(n_shards ? n_shards : 1, sizeof *c->queue);
        c->taken = calloc(n_shards ? n_shards : 1, sizeof *c->taken);
        c->done = calloc(n_shards ? n_shards : 1, sizeof *c->done);
    }
    if (!c || !c->dir || !c->queue || !c->taken || !c->done) {
        ms_shard_check_close(c);
        return ms_error_set(err, MS_EXIT_RUNTIME, dir, "out of memory");
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->posted, NULL);
    c->sync_ready = true;
    int rc = pthread_create(&c->thread, NULL, check_main, c);
    if (rc != 0) {
        ms_shard_check_close(c);
        return ms_error_errno(err, MS_EXIT_RUNTIME, rc, dir, "cannot start the shard check thread");
    }
    c->started = true;
    *out = c;
    return 0;
}

void ms_shard_check_post(ms_shard_check *c, const char *file)
{
    char *copy = strdup(file); /* out of memory: the final verify reads this shard itself */
    pthread_mutex_lock(&c->lock);
    if (copy && !c->stop && c->n_posted < c->cap) {
        c->queue[c->n_posted++] = copy;
        copy = NULL;
        pthread_cond_signal(&c->posted);
    }
    pthread_mutex_unlock(&c->lock);
    free(copy);
}

static void stop_thread(ms_shard_check *c)
{
    if (!c->started)
        return;
    pthread_mutex_lock(&c->lock);
    c->stop = true;
    pthread_cond_signal(&c->posted);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
    c->started = false;
}

int ms_shard_check_finish(ms_shard_check *c, ms_shard_hashes **early, size_t *n_early, ms_error *err)
{
    *early = NULL;
    *n_early = 0;
    stop_thread(c);
    if (c->failed) {
        *err = c->err;
        return -1;
    }
    if (c->n_done) {
        *early = c->done;
        *n_early = c->n_done;
        c->done = NULL;
        c->n_done = 0;
    }
    return 0;
}

void ms_shard_check_close(ms_shard_check *c)
{
    if (!c)
        return;
    stop_thread(c);
    for (size_t i = 0; c->queue && i < c->n_posted; i++)
        free(c->queue[i]);
    free(c->queue);
    free(c->taken);
    ms_shard_hashes_free(c->done, c->n_done);
    if (c->sync_ready) {
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->posted);
    }
    free(c->dir);
    free(c);
}
