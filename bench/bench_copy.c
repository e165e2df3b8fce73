/* The copy baseline the merge is measured against: read every input file
 * once (4 MiB read() calls), write one output-sized file from those bytes,
 * fsync it. Prints "copy_seconds=S read_bytes=B write_bytes=W".
 *
 * usage: bench_copy OUT_FILE OUT_BYTES INPUT... */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BUF_BYTES (4u << 20)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: bench_copy OUT_FILE OUT_BYTES INPUT...\n");
        return 2;
    }
    uint64_t out_bytes = strtoull(argv[2], NULL, 10);
    char *buf = malloc(BUF_BYTES);
    int out = open(argv[1], O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (!buf || out < 0) {
        perror(argv[1]);
        return 1;
    }
    double t0 = now_s();
    uint64_t read_bytes = 0, written = 0;
    for (int i = 3; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            perror(argv[i]);
            return 1;
        }
        ssize_t n;
        while ((n = read(fd, buf, BUF_BYTES)) > 0) {
            read_bytes += (uint64_t)n;
            /* the output is as large as one input: write while the first lasts */
            if (written < out_bytes) {
                size_t w = (uint64_t)n < out_bytes - written ? (size_t)n : (size_t)(out_bytes - written);
                if (write(out, buf, w) != (ssize_t)w) {
                    perror(argv[1]);
                    return 1;
                }
                written += w;
            }
        }
        if (n < 0) {
            perror(argv[i]);
            return 1;
        }
        close(fd);
    }
    if (fsync(out) != 0 || close(out) != 0) {
        perror(argv[1]);
        return 1;
    }
    printf("copy_seconds=%.3f read_bytes=%" PRIu64 " write_bytes=%" PRIu64 "\n", now_s() - t0, read_bytes, written);
    free(buf);
    return 0;
}
