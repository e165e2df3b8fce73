/* io/page_cache.c: a file just written is in the page cache; after its pages
 * are dropped (fsync, then POSIX_FADV_DONTNEED) it is not, and an empty file
 * counts 0. A file large enough to be sampled, half of it dropped, counts
 * about half. The file lives in the test's working directory (the build tree),
 * not /tmp, which may be tmpfs where pages cannot be dropped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "io/page_cache.h"

#define TMPFS_MAGIC_ 0x01021994

static void test_resident_then_dropped(void **state)
{
    (void)state;
    char path[] = "page_cache_test.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    size_t size = (size_t)3 << 20;
    unsigned char *buf = malloc(size);
    assert_non_null(buf);
    memset(buf, 0x5a, size);
    assert_int_equal(write(fd, buf, size), (ssize_t)size);
    assert_int_equal(ms_page_cache_resident(fd, size), size);
    assert_true(ms_page_cache_resident(fd, 1000) <= 1000); /* never more than asked */
    struct statfs fs;
    bool droppable = fstatfs(fd, &fs) == 0 && fs.f_type != TMPFS_MAGIC_;
    if (droppable) {
        assert_int_equal(fsync(fd), 0);
        assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
        assert_true(ms_page_cache_resident(fd, size) < size / 2);
    } else {
        printf("page_cache: tmpfs, the drop is not checked\n");
    }
    assert_int_equal(ms_page_cache_resident(fd, 0), 0);
    free(buf);
    close(fd);
}

/* 48 MiB: above the size that is counted page by page (16 MiB of 4 KiB pages),
 * so the answer is the sampled estimate. */
static void test_large_file_sampled(void **state)
{
    (void)state;
    char path[] = "page_cache_large.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    size_t size = (size_t)48 << 20, piece = (size_t)1 << 20;
    unsigned char *buf = malloc(piece);
    assert_non_null(buf);
    memset(buf, 0x3c, piece);
    for (size_t off = 0; off < size; off += piece)
        assert_int_equal(write(fd, buf, piece), (ssize_t)piece);
    assert_int_equal(ms_page_cache_resident(fd, size), size);
    struct statfs fs;
    if (fstatfs(fd, &fs) == 0 && fs.f_type != TMPFS_MAGIC_) {
        assert_int_equal(fsync(fd), 0);
        assert_int_equal(posix_fadvise(fd, (off_t)(size / 2), 0, POSIX_FADV_DONTNEED), 0);
        uint64_t half = ms_page_cache_resident(fd, size);
        assert_true(half > size / 2 - size / 16 && half < size / 2 + size / 16);
        assert_int_equal(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
        assert_true(ms_page_cache_resident(fd, size) < size / 16);
    } else {
        printf("page_cache: tmpfs, the drop is not checked\n");
    }
    free(buf);
    close(fd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resident_then_dropped),
        cmocka_unit_test(test_large_file_sampled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
