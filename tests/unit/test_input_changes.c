/* st_file_check_unchanged: an input truncated, rewritten or replaced while a
 * merge runs is noticed (the merge then fails instead of trusting its output). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/st_format.h"

static char g_path[256], g_other[256];

/* A valid file: one F32 tensor of 4 elements. */
static void write_file(const char *path, float fill)
{
    const char json[] = "{\"t\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    uint64_t n = sizeof json - 1;
    float data[4] = {fill, fill + 1, fill + 2, fill + 3};
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(&n, 8, 1, f);
    fwrite(json, 1, n, f);
    fwrite(data, sizeof data, 1, f);
    fclose(f);
}

static void set_mtime(const char *path, time_t sec)
{
    struct timespec ts[2] = {{sec, 0}, {sec, 0}};
    assert_int_equal(utimensat(AT_FDCWD, path, ts, 0), 0);
}

static void test_unchanged_and_changed(void **state)
{
    (void)state;
    ms_error err = {0};
    st_file *f = NULL;

    write_file(g_path, 1.0f);
    set_mtime(g_path, 1000000);
    assert_int_equal(st_file_open(g_path, &f, &err), 0);
    assert_int_equal(st_file_check_unchanged(f, &err), 0);

    /* rewritten in place, same size, new mtime */
    write_file(g_path, 5.0f);
    set_mtime(g_path, 2000000);
    assert_int_equal(st_file_check_unchanged(f, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err.msg, g_path));
    assert_non_null(strstr(err.msg, "changed during the merge"));
    st_file_close(f);

    /* truncated */
    write_file(g_path, 1.0f);
    assert_int_equal(st_file_open(g_path, &f, &err), 0);
    assert_int_equal(truncate(g_path, 20), 0);
    assert_int_equal(st_file_check_unchanged(f, &err), -1);
    st_file_close(f);

    /* replaced by rename: our descriptor still sees the old, unchanged file */
    write_file(g_path, 1.0f);
    assert_int_equal(st_file_open(g_path, &f, &err), 0);
    write_file(g_other, 1.0f);
    assert_int_equal(rename(g_other, g_path), 0);
    assert_int_equal(st_file_check_unchanged(f, &err), -1);
    assert_non_null(strstr(err.msg, "replaced"));
    st_file_close(f);
}

int main(void)
{
    char dir[] = "/tmp/ms-changes.XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    snprintf(g_path, sizeof g_path, "%s/a.safetensors", dir);
    snprintf(g_other, sizeof g_other, "%s/b.safetensors", dir);
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_unchanged_and_changed)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    unlink(g_path);
    unlink(g_other);
    rmdir(dir);
    return rc;
}
