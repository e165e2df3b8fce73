#include "io/atomic_file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/ms_fault.h"

#define COPY_BUFFER_BYTES (1u << 20)

/* ---------------------------------------------------------------- helpers */

int ms_pwrite_all(int fd, const void *buf, size_t len, uint64_t offset)
{
    const unsigned char *p = buf;
    while (len > 0) {
        if (offset > (uint64_t)INT64_MAX)
            return -EFBIG;
        if (ms_fault_hit(MS_FAULT_WRITE))
            return -EIO;
        ssize_t n = pwrite(fd, p, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* no progress and no error: do not spin */
        p += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

int ms_mkdir_parents(const char *path, ms_error *err)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof buf)
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "path too long");
    memcpy(buf, path, n + 1);
    while (n > 1 && buf[n - 1] == '/') /* "a/b/" names b */
        buf[--n] = '\0';
    char *last = strrchr(buf, '/');
    if (!last || last == buf)
        return 0; /* relative to ".", or right under "/" */
    *last = '\0';
    for (char *p = buf + 1; ; p++) {
        bool end = *p == '\0';
        if (*p == '/' || end) {
            *p = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return ms_error_errno(err, MS_EXIT_RUNTIME, errno, buf, "cannot create the directory");
            if (end)
                return 0;
            *p = '/';
        }
    }
}

int ms_pread_all(int fd, void *buf, size_t len, uint64_t offset)
{
    unsigned char *p = buf;
    while (len > 0) {
        if (offset > (uint64_t)INT64_MAX)
            return -EFBIG;
        if (ms_fault_hit(MS_FAULT_READ))
            return -EIO;
        ssize_t n = pread(fd, p, len, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ENODATA;
        p += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

int ms_pread_exact(int fd, const char *path, void *buf, size_t len, uint64_t offset, ms_error *err)
{
    int rc = ms_pread_all(fd, buf, len, offset);
    if (rc == -ENODATA)
        return ms_error_set(err, MS_EXIT_DATA, path, "file ended early (changed while reading?)");
    return rc < 0 ? ms_error_errno(err, MS_EXIT_RUNTIME, -rc, path, "read failed") : 0;
}

int ms_fsync_fd(int fd)
{
    if (ms_fault_hit(MS_FAULT_FSYNC))
        return -EIO;
    return fsync(fd) == 0 ? 0 : -errno;
}

int ms_rename(const char *from, const char *to)
{
    if (ms_fault_hit(MS_FAULT_RENAME))
        return -EIO;
    return rename(from, to) == 0 ? 0 : -errno;
}

int ms_fsync_dir(const char *dir, ms_error *err)
{
    const char *d = (dir && *dir) ? dir : ".";
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, d, "cannot open directory to fsync it");
    int rc = ms_fsync_fd(fd);
    close(fd); /* read-only: nothing to lose on close */
    /* Some file systems cannot fsync a directory; their renames are as
     * durable as they get. */
    if (rc < 0 && rc != -EINVAL && rc != -ENOTSUP)
        return ms_error_errno(err, MS_EXIT_RUNTIME, -rc, d, "directory fsync failed");
    return 0;
}

int ms_fsync_parent_dir(const char *path, ms_error *err)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return ms_fsync_dir(".", err);
    if (slash == path)
        return ms_fsync_dir("/", err);
    char *dir = strndup(path, (size_t)(slash - path));
    if (!dir)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "cannot fsync its directory");
    int rc = ms_fsync_dir(dir, err);
    free(dir);
    return rc;
}

/* ------------------------------------------------------------- the commit */

/* Where the new content comes from: a buffer, or a file read to its end. */
typedef struct atomic_source {
    const void *data;     /* buffer mode when src_path is NULL */
    size_t len;
    int src_fd;           /* copy mode: read from here ... */
    const char *src_path; /* ... and name this in read errors */
} atomic_source;

static int source_copy(int out_fd, const char *tmp, const atomic_source *src, ms_error *err)
{
    int rc = -1;
    unsigned char *buf = malloc(COPY_BUFFER_BYTES);
    if (!buf) {
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, src->src_path, "cannot allocate a copy buffer");
        goto fail;
    }
    uint64_t off = 0;
    for (;;) {
        if (ms_fault_hit(MS_FAULT_READ)) {
            ms_error_errno(err, MS_EXIT_RUNTIME, EIO, src->src_path, "read failed");
            goto fail;
        }
        ssize_t n = read(src->src_fd, buf, COPY_BUFFER_BYTES);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            ms_error_errno(err, MS_EXIT_RUNTIME, errno, src->src_path, "read failed");
            goto fail;
        }
        if (n == 0)
            break;
        int w = ms_pwrite_all(out_fd, buf, (size_t)n, off);
        if (w < 0) {
            ms_error_errno(err, MS_EXIT_RUNTIME, -w, tmp, "write failed");
            goto fail;
        }
        off += (uint64_t)n;
    }
    rc = 0;
fail:
    free(buf);
    return rc;
}

static int atomic_commit(const char *path, const atomic_source *src, ms_error *err)
{
    int rc = -1;
    int fd = -1;
    bool created = false, renamed = false;
    char *tmp = NULL;
    if (asprintf(&tmp, "%s.tmp.%ld", path, (long)getpid()) < 0) {
        tmp = NULL;
        ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "cannot build the temp file name");
        goto fail;
    }
    fd = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, tmp, "cannot create");
        goto fail;
    }
    created = true;
    if (src->src_path) {
        if (source_copy(fd, tmp, src, err) < 0)
            goto fail;
    } else {
        int w = ms_pwrite_all(fd, src->data, src->len, 0);
        if (w < 0) {
            ms_error_errno(err, MS_EXIT_RUNTIME, -w, tmp, "write failed");
            goto fail;
        }
    }
    int s = ms_fsync_fd(fd);
    if (s < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, -s, tmp, "fsync failed");
        goto fail;
    }
    int c = close(fd);
    fd = -1;
    if (c < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, errno, tmp, "close failed");
        goto fail;
    }
    int r = ms_rename(tmp, path);
    if (r < 0) {
        ms_error_errno(err, MS_EXIT_RUNTIME, -r, path, "cannot rename %s over it", tmp);
        goto fail;
    }
    renamed = true;
    if (ms_fsync_parent_dir(path, err) < 0)
        goto fail;
    free(tmp);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    if (renamed)
        unlink(path); /* see the header: nothing possibly non-durable under path */
    else if (created)
        unlink(tmp);
    free(tmp);
    return rc;
}

int ms_atomic_write_file(const char *path, const void *data, size_t len, ms_error *err)
{
    atomic_source src = {.data = data, .len = len, .src_fd = -1, .src_path = NULL};
    return atomic_commit(path, &src, err);
}

int ms_copy_file_atomic(const char *src_path, const char *dst, ms_error *err)
{
    int fd = open(src_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ms_error_errno(err, errno == ENOENT ? MS_EXIT_DATA : MS_EXIT_RUNTIME, errno, src_path,
                              "cannot open");
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return ms_error_errno(err, MS_EXIT_RUNTIME, e, src_path, "cannot stat");
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return ms_error_set(err, MS_EXIT_DATA, src_path, "not a regular file");
    }
    atomic_source src = {.data = NULL, .len = 0, .src_fd = fd, .src_path = src_path};
    int rc = atomic_commit(dst, &src, err);
    close(fd);
    return rc;
}
