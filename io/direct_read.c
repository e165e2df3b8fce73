#include "io/direct_read.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static int same_file(int a, int b)
{
    struct stat sa, sb;
    return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int ms_direct_open(int fd, const char *path)
{
    const char *refuse = getenv("MERGESTREAM_DIRECT_REFUSE");
    if (refuse && *refuse == '1')
        return -EINVAL;
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    int dfd = open(self, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (dfd < 0 && errno == ENOENT) {
        dfd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (dfd >= 0 && !same_file(fd, dfd)) {
            close(dfd);
            return -ESTALE;
        }
    }
    if (dfd < 0)
        return -errno;
    void *block = NULL;
    int rc = posix_memalign(&block, MS_DIRECT_ALIGN, MS_DIRECT_ALIGN);
    if (rc != 0) {
        close(dfd);
        return -rc;
    }
    ssize_t n = pread(dfd, block, MS_DIRECT_ALIGN, 0);
    int saved = errno;
    free(block);
    if (n < 0) {
        close(dfd);
        return -saved;
    }
    return dfd;
}
