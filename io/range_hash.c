#include "io/range_hash.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "io/checksum.h"
#include "io/ms_fault.h"

#define RANGE_HASH_BUF (1u << 20) /* cold reads as fast as with 8 MiB here, a sixth of the page faults */

int ms_range_hash(int fd, uint64_t offset, uint64_t len, const char *where, uint64_t *out, ms_error *err)
{
    int rc = -1;
    uint8_t *buf = malloc(RANGE_HASH_BUF);
    ms_hasher h = {0};
    if (!buf || ms_hasher_init(&h) != 0) {
        ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
        goto done;
    }
    uint64_t done_bytes = 0;
    while (done_bytes < len) {
        size_t want = len - done_bytes < RANGE_HASH_BUF ? (size_t)(len - done_bytes) : RANGE_HASH_BUF;
        ssize_t n = ms_fault_hit(MS_FAULT_READ) ? (errno = EIO, -1)
                                                : pread(fd, buf, want, (off_t)(offset + done_bytes));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            ms_error_errno(err, MS_EXIT_RUNTIME, errno, where, "read failed");
            goto done;
        }
        if (n == 0) {
            ms_error_set(err, MS_EXIT_DATA, where, "file ended at byte %llu, expected %llu",
                         (unsigned long long)(offset + done_bytes), (unsigned long long)(offset + len));
            goto done;
        }
        ms_hasher_update(&h, buf, (size_t)n);
        done_bytes += (uint64_t)n;
    }
    *out = ms_hasher_digest(&h);
    rc = 0;
done:
    ms_hasher_free(&h);
    free(buf);
    return rc;
}
