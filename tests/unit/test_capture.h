/* Capturing what a call writes to stderr (warnings, info lines), for tests
 * that check a message. Include after <cmocka.h> in one test program's .c
 * file. */
#ifndef MS_TEST_CAPTURE_H
#define MS_TEST_CAPTURE_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Runs fn(arg) with stderr going to a temporary file; what it wrote goes
 * to out (NUL-terminated, at most size - 1 bytes). */
static inline void capture_stderr(void (*fn)(void *), void *arg, char *out, size_t size)
{
    fflush(stderr);
    char path[] = "/tmp/ms_test_stderr_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    int saved = dup(2);
    assert_true(saved >= 0);
    assert_true(dup2(fd, 2) == 2);
    fn(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ssize_t n = pread(fd, out, size - 1, 0);
    out[n > 0 ? n : 0] = '\0';
    close(fd);
}

#endif
