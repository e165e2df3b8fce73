#include "io/small_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

int ms_small_file_read(const char *path, size_t max_bytes, char **out, size_t *len, ms_error *err)
{
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ms_error_errno(err, errno == ENOENT ? MS_EXIT_DATA : MS_EXIT_RUNTIME, errno, path, "cannot open");
    int rc = -1;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "cannot stat");
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        ms_error_set(err, MS_EXIT_DATA, path, "not a regular file");
        goto done;
    }
    if ((uint64_t)st.st_size > max_bytes) {
        ms_error_set(err, MS_EXIT_DATA, path, "file is %lld bytes, more than the %zu allowed",
                     (long long)st.st_size, max_bytes);
        goto done;
    }
    size_t size = (size_t)st.st_size;
    buf = malloc(size + 1);
    if (!buf) {
        ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
        goto done;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "read failed");
            goto done;
        }
        if (n == 0)
            break; /* shrank underneath us: take what is there */
        got += (size_t)n;
    }
    buf[got] = '\0';
    *out = buf;
    *len = got;
    buf = NULL;
    rc = 0;
done:
    free(buf);
    close(fd);
    return rc;
}

int ms_small_file_json(const char *path, size_t max_bytes, cJSON **out, ms_error *err)
{
    char *text = NULL;
    size_t len = 0;
    *out = NULL;
    if (ms_small_file_read(path, max_bytes, &text, &len, err) != 0)
        return -1;
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, len, &end, false);
    free(text);
    if (!j)
        return ms_error_set(err, MS_EXIT_DATA, path, "not valid JSON");
    *out = j;
    return 0;
}
