/* The shards read back as they are committed (pipeline/shard_check.h) and the
 * final verify's use of those hashes (pipeline/verify_output.h).
 *
 * Each test writes a four-shard output with the project's writer and a
 * manifest the way the merge writes it (each tensor's and shard's XXH3), then
 * checks: the hashes the check thread reads are each tensor's; a check that
 * meets a missing or invalid file fails the run naming it; a stop gives up
 * work without error; the verify compares early hashes with the manifest
 * (a wrong one fails, naming the tensor), and ignores them for a file that is
 * not the one they were read from. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "io/checksum.h"
#include "io/page_cache.h"
#include "io/range_hash.h"
#include "io/st_writer.h"
#include "pipeline/shard_check.h"
#include "pipeline/verify_output.h"

#define N_TENSORS 8
#define TENSOR_ELEMS 4096 /* 16 KiB of F32 each, two to a shard */

typedef struct fixture {
    char dir[64];
    st_plan *plan;
} fixture;

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* The output: N_TENSORS tensors of distinct bytes in shards of two, and
 * mergestream.json with their hashes. */
static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    strcpy(fx->dir, "/tmp/ms_shard_check_XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    ms_error err = {0};
    assert_int_equal(st_plan_create(2 * TENSOR_ELEMS * 4, &fx->plan, &err), 0);
    for (unsigned t = 0; t < N_TENSORS; t++) {
        char name[32];
        snprintf(name, sizeof name, "layer.%u.weight", t);
        uint64_t shape[2] = {64, TENSOR_ELEMS / 64};
        assert_int_equal(st_plan_add_tensor(fx->plan, name, ST_F32, 2, shape, NULL, &err), 0);
    }
    assert_int_equal(st_plan_layout(fx->plan, &err), 0);
    assert_int_equal(st_plan_n_shards(fx->plan), 4);
    st_writer *w = NULL;
    assert_int_equal(st_writer_open(fx->plan, fx->dir, &w, &err), 0);
    float data[TENSOR_ELEMS];
    for (unsigned t = 0; t < N_TENSORS; t++) {
        for (unsigned i = 0; i < TENSOR_ELEMS; i++)
            data[i] = (float)(t * TENSOR_ELEMS + i) * 0.5f;
        assert_int_equal(st_writer_write_tensor(w, t, data, &err), 0);
    }
    assert_int_equal(st_writer_finish(w, &err), 0);
    cJSON *root = cJSON_CreateObject(), *tensors = cJSON_AddObjectToObject(root, "tensors");
    cJSON *shards = cJSON_AddArrayToObject(root, "shards");
    char hex[MS_HASH_HEX_LEN + 1];
    for (size_t t = 0; t < N_TENSORS; t++) {
        const st_plan_tensor *pt = st_plan_tensor_at(fx->plan, t);
        cJSON *e = cJSON_AddObjectToObject(tensors, pt->name);
        cJSON_AddStringToObject(e, "shard", st_plan_shard_at(fx->plan, pt->shard)->file_name);
        ms_hash_to_hex(st_writer_tensor_hash(w, t), hex);
        cJSON_AddStringToObject(e, "xxh3", hex);
    }
    for (size_t s = 0; s < st_plan_n_shards(fx->plan); s++) {
        const st_plan_shard *sh = st_plan_shard_at(fx->plan, s);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "file", sh->file_name);
        cJSON_AddNumberToObject(e, "bytes", (double)sh->file_size);
        cJSON_AddNumberToObject(e, "tensors", (double)sh->n_tensors);
        ms_hash_to_hex(st_writer_shard_hash(w, s), hex);
        cJSON_AddStringToObject(e, "xxh3", hex);
        cJSON_AddItemToArray(shards, e);
    }
    st_writer_close(w);
    char *text = cJSON_Print(root);
    char path[128];
    snprintf(path, sizeof path, "%s/mergestream.json", fx->dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    free(text);
    cJSON_Delete(root);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    nftw(fx->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    st_plan_free(fx->plan);
    free(fx);
    return 0;
}

static const char *shard_file(const fixture *fx, size_t s) { return st_plan_shard_at(fx->plan, s)->file_name; }

/* Every shard read by the check thread: finish gives up work in hand, so
 * this posts them all and lets the thread run, longer on each try, until a
 * finish finds all four read (a few milliseconds for these files; a slow
 * sanitizer build may need more). */
static void check_all(const fixture *fx, ms_shard_hashes **early, size_t *n)
{
    for (useconds_t wait = 20000; wait <= 5120000; wait *= 2) {
        ms_shard_check *c = NULL;
        ms_error err = {0};
        assert_int_equal(ms_shard_check_open(fx->dir, 4, &c, &err), 0);
        for (size_t s = 0; s < 4; s++)
            ms_shard_check_post(c, shard_file(fx, s));
        usleep(wait);
        assert_int_equal(ms_shard_check_finish(c, early, n, &err), 0);
        ms_shard_check_close(c);
        if (*n == 4)
            return;
        ms_shard_hashes_free(*early, *n);
    }
    fail_msg("the check thread did not read four 32 KiB shards in 10 s");
}

/* The entry of early for shard s (each shard at most once), or NULL. */
static ms_shard_hashes *early_of(const fixture *fx, ms_shard_hashes *early, size_t n, size_t s)
{
    ms_shard_hashes *found = NULL;
    for (size_t i = 0; i < n; i++)
        if (strcmp(early[i].file, shard_file(fx, s)) == 0) {
            assert_null(found);
            found = &early[i];
        }
    return found;
}

static void test_hashes_are_each_tensors(void **state)
{
    fixture *fx = *state;
    ms_shard_hashes *early = NULL;
    size_t n = 0;
    check_all(fx, &early, &n);
    for (size_t i = 0; i < n; i++) {
        const ms_shard_hashes *e = early_of(fx, early, n, i);
        assert_non_null(e);
        assert_int_equal(e->n_tensors, 2);
        char path[128];
        snprintf(path, sizeof path, "%s/%s", fx->dir, e->file);
        int fd = open(path, O_RDONLY);
        assert_true(fd >= 0);
        struct stat st;
        assert_int_equal(fstat(fd, &st), 0);
        assert_int_equal(e->ino, (uint64_t)st.st_ino);
        assert_int_equal(e->size, (uint64_t)st.st_size);
        for (size_t t = 0; t < 2; t++) {
            const st_plan_tensor *pt = st_plan_tensor_at(fx->plan, 2 * i + t);
            uint64_t want = 0;
            ms_error err = {0};
            assert_int_equal(ms_range_hash(fd, pt->offset, pt->nbytes, path, &want, &err), 0);
            assert_int_equal(e->hashes[t], want);
        }
        close(fd);
    }
    ms_shard_hashes_free(early, n);
}

/* Posts file alone and returns finish's result once the thread has got to
 * it (a finish before that stops the thread first and returns 0). */
static int check_one(const fixture *fx, const char *file, ms_error *err)
{
    for (useconds_t wait = 20000; wait <= 5120000; wait *= 2) {
        ms_shard_check *c = NULL;
        ms_shard_hashes *early = NULL;
        size_t n = 0;
        memset(err, 0, sizeof *err);
        assert_int_equal(ms_shard_check_open(fx->dir, 4, &c, err), 0);
        ms_shard_check_post(c, file);
        usleep(wait);
        int rc = ms_shard_check_finish(c, &early, &n, err);
        ms_shard_check_close(c);
        ms_shard_hashes_free(early, n);
        if (rc != 0 || n == 1) {
            assert_true(rc != 0 || early != NULL);
            return rc;
        }
    }
    fail_msg("the check thread did not get to %s in 10 s", file);
    return 0;
}

static void test_missing_and_invalid_files_fail(void **state)
{
    fixture *fx = *state;
    ms_error err;
    assert_int_equal(check_one(fx, "model-00009-of-00009.safetensors", &err), -1);
    assert_non_null(strstr(err.msg, "model-00009-of-00009.safetensors"));

    char path[128];
    snprintf(path, sizeof path, "%s/not_a_shard.safetensors", fx->dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("this is not a safetensors file", f);
    fclose(f);
    assert_int_equal(check_one(fx, "not_a_shard.safetensors", &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err.msg, "not_a_shard.safetensors"));
    unlink(path);

    assert_int_equal(check_one(fx, shard_file(fx, 1), &err), 0);
}

/* finish at once: whatever was read is whole and right, the rest is dropped
 * without an error; posts past the capacity and after the stop are ignored. */
static void test_stop_gives_up_without_error(void **state)
{
    fixture *fx = *state;
    ms_error err = {0};
    for (int round = 0; round < 20; round++) {
        ms_shard_check *c = NULL;
        ms_shard_hashes *early = NULL;
        size_t n = 99;
        assert_int_equal(ms_shard_check_open(fx->dir, 2, &c, &err), 0);
        for (size_t s = 0; s < 4; s++)
            ms_shard_check_post(c, shard_file(fx, s)); /* the last two are past the capacity */
        if (round % 2)
            usleep(1000 * (useconds_t)round);
        assert_int_equal(ms_shard_check_finish(c, &early, &n, &err), 0);
        ms_shard_check_post(c, shard_file(fx, 0)); /* after the stop: ignored */
        assert_true(n <= 2);
        assert_true(n == (size_t)(early_of(fx, early, n, 0) != NULL) + (size_t)(early_of(fx, early, n, 1) != NULL));
        ms_shard_hashes_free(early, n);
        ms_shard_check_close(c);
    }
    ms_shard_check_close(NULL);
}

static void test_verify_compares_early_hashes(void **state)
{
    fixture *fx = *state;
    ms_shard_hashes *early = NULL;
    size_t n = 0;
    check_all(fx, &early, &n);
    ms_verify_result res;
    ms_error err = {0};
    assert_int_equal(ms_verify_output(fx->dir, NULL, early, n, &res, &err), 0);
    assert_int_equal(res.n_shards, 4);
    assert_int_equal(res.n_shards_read_early, 4);

    /* an early hash that is wrong is caught as if it had been read now */
    ms_shard_hashes *third = early_of(fx, early, n, 2);
    third->hashes[1] ^= 1;
    memset(&err, 0, sizeof err);
    assert_int_equal(ms_verify_output(fx->dir, NULL, early, n, &res, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err.msg, "tensor 'layer.5.weight' has XXH3"));

    /* the same wrong hash for a file that is no longer the one read (its
     * mtime moved): the verify reads that shard itself and passes */
    third->mtime_ns += 1;
    memset(&err, 0, sizeof err);
    assert_int_equal(ms_verify_output(fx->dir, NULL, early, n, &res, &err), 0);
    assert_int_equal(res.n_shards_read_early, 3);
    third->mtime_ns -= 1;

    /* a shard rewritten with its own bytes after the check (its ctime moves):
     * read again, and the wrong early hash does not matter */
    char path[128];
    snprintf(path, sizeof path, "%s/%s", fx->dir, third->file);
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char byte;
    usleep(20000); /* past the file system's timestamp granularity */
    assert_int_equal(pread(fd, &byte, 1, 100), 1);
    assert_int_equal(pwrite(fd, &byte, 1, 100), 1);
    close(fd);
    memset(&err, 0, sizeof err);
    assert_int_equal(ms_verify_output(fx->dir, NULL, early, n, &res, &err), 0);
    assert_int_equal(res.n_shards_read_early, 3);

    /* without early hashes: every shard read */
    assert_int_equal(ms_verify_output(fx->dir, NULL, NULL, 0, &res, &err), 0);
    assert_int_equal(res.n_shards_read_early, 0);
    ms_shard_hashes_free(early, n);
}

/* A shard the page cache no longer holds is left to the final verify: it
 * is not read from the disk beside the run's reads. The newest posted shard
 * is taken first, so once the resident one posted before it is read, the
 * evicted one has been looked at. */
static void test_shard_out_of_cache_is_left(void **state)
{
    fixture *fx = *state;
    char path[128];
    snprintf(path, sizeof path, "%s/%s", fx->dir, shard_file(fx, 3));
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0); /* written and fsynced: clean pages */
    bool evicted = ms_page_cache_resident(fd, (uint64_t)lseek(fd, 0, SEEK_END)) == 0;
    close(fd);
    if (!evicted)
        skip(); /* a file system that keeps its pages (tmpfs) */
    for (useconds_t wait = 20000; wait <= 5120000; wait *= 2) {
        ms_shard_check *c = NULL;
        ms_shard_hashes *early = NULL;
        size_t n = 0;
        ms_error err = {0};
        assert_int_equal(ms_shard_check_open(fx->dir, 4, &c, &err), 0);
        ms_shard_check_post(c, shard_file(fx, 0));
        ms_shard_check_post(c, shard_file(fx, 3));
        usleep(wait);
        assert_int_equal(ms_shard_check_finish(c, &early, &n, &err), 0);
        ms_shard_check_close(c);
        bool done = early_of(fx, early, n, 0) != NULL;
        if (done) {
            assert_int_equal(n, 1);
            ms_verify_result res;
            assert_int_equal(ms_verify_output(fx->dir, NULL, early, n, &res, &err), 0);
            assert_int_equal(res.n_shards_read_early, 1);
        }
        ms_shard_hashes_free(early, n);
        if (done)
            return;
    }
    fail_msg("the check thread did not read a 32 KiB shard in 10 s");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hashes_are_each_tensors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_and_invalid_files_fail, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_gives_up_without_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_compares_early_hashes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shard_out_of_cache_is_left, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
