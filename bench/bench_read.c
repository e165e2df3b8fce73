/* bench_read: how close the I/O engine reads to the disk (or page cache).
 *
 * Reads every given file completely through the engine into a pool of
 * staging buffers (anonymous mmap, registered with io_uring), then reads the
 * same files with a plain sequential read() loop through one 4 MiB buffer,
 * and prints one machine-greppable line per run:
 *
 *   engine=io_uring cache=cold resident=0.0% bytes=... seconds=... GBps=...
 *     raw_seconds=... raw_GBps=... ratio=... piece=... qd=... buf=... nbuf=...
 *
 * (one line; GBps are 10^9 bytes per second; ratio = GBps / raw_GBps).
 * `cache` is measured, not assumed: the fraction of the files' pages resident
 * in the page cache just before the engine's pass (mincore): cold below 5%,
 * hot above 95%, else mixed. --drop-caches evicts the files before each pass
 * (fsync + POSIX_FADV_DONTNEED, and "1" into /proc/sys/vm/drop_caches when
 * root); without it the files are read once, untimed, to make them hot.
 *
 * --gen DIR SIZE first creates DIR/bench_read_NNN.bin files of 1 GiB (the
 * last one smaller) totalling SIZE, filled by a cheap PRNG; files that exist
 * with the right size are kept. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/io_engine.h"
#include "pipeline/size_parse.h"

#define BENCH_GEN_FILE (1ull << 30)
#define BENCH_RAW_BUF (4ull << 20)
#define BENCH_MAX_FILES 1024

typedef struct bench_opts {
    io_engine_kind kind;
    uint64_t piece;    /* engine max_piece_bytes */
    unsigned qd;       /* engine queue depth */
    uint64_t buf;      /* bytes per request = per staging buffer */
    unsigned nbuf;     /* staging buffers: pool = nbuf * buf bytes */
    unsigned threads;  /* pread pool size */
    unsigned repeat;
    bool drop_caches;
    bool no_register;  /* leave the pool unregistered (to measure what registration buys) */
    bool small_pages;  /* no MADV_HUGEPAGE on the pool */
    const char *gen_dir;
    uint64_t gen_size;
} bench_opts;

typedef struct bench_file {
    char *path;
    int fd;
    uint64_t size;
} bench_file;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: bench_read [--engine uring|pread|auto] [--piece 4M] [--qd 32] [--buf 4M]\n"
            "                  [--nbuf 64] [--threads 4] [--repeat 1] [--drop-caches] [--no-register]\n"
            "                  [--small-pages]\n"
            "                  [--gen DIR SIZE] FILE...\n");
}

/* ---------------------------------------------------------------- --gen */

/* Writes size bytes of xorshift output to path (via path.tmp + rename). */
static int gen_file(const char *path, uint64_t size, uint64_t seed, unsigned char *buf)
{
    char tmp[4096 + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        fprintf(stderr, "bench_read: error: %s: cannot create: %s\n", tmp, strerror(errno));
        return -1;
    }
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    uint64_t done = 0;
    while (done < size) {
        uint64_t n = size - done < BENCH_RAW_BUF ? size - done : BENCH_RAW_BUF;
        uint64_t *w = (uint64_t *)buf;
        for (uint64_t i = 0; i < BENCH_RAW_BUF / 8; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            w[i] = s;
        }
        for (uint64_t off = 0; off < n;) {
            ssize_t k = write(fd, buf + off, n - off);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                fprintf(stderr, "bench_read: error: %s: write: %s\n", tmp, strerror(errno));
                goto fail;
            }
            off += (uint64_t)k;
        }
        done += n;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        fprintf(stderr, "bench_read: error: %s: fsync/close: %s\n", tmp, strerror(errno));
        fd = -1;
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        fprintf(stderr, "bench_read: error: %s: rename: %s\n", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return -1;
}

/* Appends the generated files' paths to paths[] (malloc'ed strings). */
static int gen_files(const char *dir, uint64_t total, char **paths, unsigned *n_paths)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "bench_read: error: %s: mkdir: %s\n", dir, strerror(errno));
        return -1;
    }
    unsigned char *buf = malloc(BENCH_RAW_BUF);
    if (!buf)
        return -1;
    int rc = 0;
    for (uint64_t i = 0; (uint64_t)i * BENCH_GEN_FILE < total; i++) {
        uint64_t size = total - i * BENCH_GEN_FILE;
        if (size > BENCH_GEN_FILE)
            size = BENCH_GEN_FILE;
        if (*n_paths >= BENCH_MAX_FILES) {
            fprintf(stderr, "bench_read: error: more than %d files\n", BENCH_MAX_FILES);
            rc = -1;
            break;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/bench_read_%03llu.bin", dir, (unsigned long long)i);
        struct stat st;
        if (stat(path, &st) != 0 || (uint64_t)st.st_size != size) {
            fprintf(stderr, "bench_read: generating %s (%llu bytes)\n", path, (unsigned long long)size);
            if (gen_file(path, size, i + 1, buf) != 0) {
                rc = -1;
                break;
            }
        }
        paths[(*n_paths)++] = strdup(path);
    }
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------- page cache */

/* Fraction of the files' pages resident in the page cache. */
static double cache_resident(const bench_file *files, unsigned n)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t pages = 0, resident = 0;
    for (unsigned i = 0; i < n; i++) {
        if (files[i].size == 0)
            continue;
        void *map = mmap(NULL, files[i].size, PROT_READ, MAP_SHARED, files[i].fd, 0);
        if (map == MAP_FAILED)
            return -1;
        uint64_t np = (files[i].size + (uint64_t)page - 1) / (uint64_t)page;
        unsigned char *vec = malloc(np);
        if (vec && mincore(map, files[i].size, vec) == 0) {
            for (uint64_t p = 0; p < np; p++)
                resident += vec[p] & 1;
            pages += np;
        }
        free(vec);
        munmap(map, files[i].size);
    }
    return pages ? (double)resident / (double)pages : 0;
}

static void cache_drop(const bench_file *files, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        fsync(files[i].fd);
        posix_fadvise(files[i].fd, 0, 0, POSIX_FADV_DONTNEED);
    }
    if (geteuid() == 0) {
        int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
        if (fd >= 0) {
            if (write(fd, "1", 1) != 1) { /* read-only /proc in a container: fadvise did it */
            }
            close(fd);
        }
    }
}

/* Sorts v in place; returns its median. */
static double median(double *v, unsigned n)
{
    for (unsigned i = 1; i < n; i++)
        for (unsigned j = i; j > 0 && v[j - 1] > v[j]; j--) {
            double t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static const char *cache_word(double resident)
{
    return resident < 0.05 ? "cold" : resident > 0.95 ? "hot" : "mixed";
}

/* ---------------------------------------------------------------- the passes */

/* Plain sequential read() of every file, `len` bytes per call into the
 * `nbuf` buffers at buf (one after the other, cycling). Returns bytes, or -1. */
static int64_t raw_pass(const bench_file *files, unsigned n, unsigned char *buf, uint64_t len,
                        unsigned nbuf)
{
    int64_t total = 0;
    uint64_t calls = 0;
    for (unsigned i = 0; i < n; i++) {
        if (lseek(files[i].fd, 0, SEEK_SET) != 0)
            return -1;
        for (;;) {
            ssize_t k = read(files[i].fd, buf + (calls++ % nbuf) * len, len);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0) {
                fprintf(stderr, "bench_read: error: %s: read: %s\n", files[i].path, strerror(errno));
                return -1;
            }
            if (k == 0)
                break;
            total += k;
        }
    }
    return total;
}

typedef struct bench_slot {
    io_request req;
    unsigned char *buf;
} bench_slot;

/* Reads every file through e into the staging pool. Returns bytes, or -1. */
static int64_t engine_pass(io_engine *e, const bench_file *files, unsigned n, const bench_opts *o,
                           unsigned char *pool)
{
    bench_slot *slots = calloc(o->nbuf, sizeof *slots);
    bench_slot **free_slots = calloc(o->nbuf, sizeof *free_slots);
    io_request **done = calloc(o->nbuf, sizeof *done);
    int64_t total = -1, got = 0;
    if (!slots || !free_slots || !done)
        goto out;
    unsigned n_free = 0;
    for (unsigned i = 0; i < o->nbuf; i++) {
        slots[i].buf = pool + (uint64_t)i * o->buf;
        free_slots[n_free++] = &slots[i];
    }
    unsigned fi = 0;
    uint64_t off = 0;
    for (;;) {
        while (n_free > 0 && fi < n) {
            if (off >= files[fi].size) {
                fi++;
                off = 0;
                continue;
            }
            bench_slot *s = free_slots[--n_free];
            uint64_t len = files[fi].size - off < o->buf ? files[fi].size - off : o->buf;
            s->req = (io_request){.op = IO_OP_READ, .fd = files[fi].fd, .offset = off, .len = len,
                                  .buf = s->buf, .user = s};
            int rc = io_engine_submit(e, &s->req);
            if (rc < 0) {
                fprintf(stderr, "bench_read: error: submit: %s\n", strerror(-rc));
                goto out;
            }
            off += len;
        }
        if (io_engine_outstanding(e) == 0)
            break;
        int k = io_engine_reap(e, done, (int)o->nbuf, true);
        if (k < 0) {
            fprintf(stderr, "bench_read: error: reap: %s\n", strerror(-k));
            goto out;
        }
        for (int j = 0; j < k; j++) {
            bench_slot *s = done[j]->user;
            if (s->req.result != 0) {
                fprintf(stderr, "bench_read: error: fd %d offset %llu: %s\n", s->req.fd,
                        (unsigned long long)s->req.offset, strerror(-s->req.result));
                goto out;
            }
            got += (int64_t)s->req.len;
            free_slots[n_free++] = s;
        }
    }
    total = got;
out:
    free(done);
    free(free_slots);
    free(slots);
    return total;
}

/* ---------------------------------------------------------------- main */

static int parse_size_arg(const char *name, const char *text, uint64_t *out)
{
    if (!text || ms_size_parse(text, out) != 0 || *out == 0) {
        fprintf(stderr, "bench_read: error: %s: bad size '%s'\n", name, text ? text : "");
        return -1;
    }
    return 0;
}

static int parse_uint_arg(const char *name, const char *text, unsigned *out)
{
    uint64_t v;
    if (parse_size_arg(name, text, &v) != 0 || v > 1u << 20)
        return -1;
    *out = (unsigned)v;
    return 0;
}

int main(int argc, char **argv)
{
    bench_opts o = {.kind = IO_ENGINE_URING, .piece = 4ull << 20, .qd = 32, .buf = 4ull << 20,
                    .nbuf = 64, .threads = 4, .repeat = 1};
    char *paths[BENCH_MAX_FILES];
    unsigned n_paths = 0;
    const char *file_args[BENCH_MAX_FILES];
    unsigned n_file_args = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (strcmp(a, "--engine") == 0 && v) {
            if (strcmp(v, "uring") == 0 || strcmp(v, "io_uring") == 0)
                o.kind = IO_ENGINE_URING;
            else if (strcmp(v, "pread") == 0)
                o.kind = IO_ENGINE_PREAD;
            else if (strcmp(v, "auto") == 0)
                o.kind = IO_ENGINE_AUTO;
            else
                bad = 1;
            i++;
        } else if (strcmp(a, "--piece") == 0) {
            bad = parse_size_arg(a, v, &o.piece), i++;
        } else if (strcmp(a, "--buf") == 0) {
            bad = parse_size_arg(a, v, &o.buf), i++;
        } else if (strcmp(a, "--qd") == 0) {
            bad = parse_uint_arg(a, v, &o.qd), i++;
        } else if (strcmp(a, "--nbuf") == 0) {
            bad = parse_uint_arg(a, v, &o.nbuf), i++;
        } else if (strcmp(a, "--threads") == 0) {
            bad = parse_uint_arg(a, v, &o.threads), i++;
        } else if (strcmp(a, "--repeat") == 0) {
            bad = parse_uint_arg(a, v, &o.repeat), i++;
        } else if (strcmp(a, "--drop-caches") == 0) {
            o.drop_caches = true;
        } else if (strcmp(a, "--no-register") == 0) {
            o.no_register = true;
        } else if (strcmp(a, "--small-pages") == 0) {
            o.small_pages = true;
        } else if (strcmp(a, "--gen") == 0 && v && i + 2 < argc) {
            o.gen_dir = v;
            bad = parse_size_arg(a, argv[i + 2], &o.gen_size);
            i += 2;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (a[0] == '-' || n_file_args >= BENCH_MAX_FILES) {
            bad = 1;
        } else {
            file_args[n_file_args++] = a;
        }
        if (bad) {
            usage(stderr);
            return 2;
        }
    }
    if (o.gen_dir && gen_files(o.gen_dir, o.gen_size, paths, &n_paths) != 0)
        return 1;
    for (unsigned i = 0; i < n_file_args && n_paths < BENCH_MAX_FILES; i++)
        paths[n_paths++] = strdup(file_args[i]);
    if (n_paths == 0) {
        usage(stderr);
        return 2;
    }
    if (o.nbuf == 0 || o.buf > (1ull << 40) / o.nbuf) {
        fprintf(stderr, "bench_read: error: pool of %u x %llu bytes is too large\n", o.nbuf,
                (unsigned long long)o.buf);
        return 2;
    }

    int status = 1;
    bench_file files[BENCH_MAX_FILES];
    unsigned n = 0;
    uint64_t pool_bytes = (uint64_t)o.nbuf * o.buf;
    unsigned char *pool = MAP_FAILED, *raw_buf = MAP_FAILED;
    io_engine *e = NULL;
    for (unsigned i = 0; i < n_paths; i++) {
        int fd = open(paths[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) {
            fprintf(stderr, "bench_read: error: %s: %s\n", paths[i], strerror(errno));
            if (fd >= 0)
                close(fd);
            goto out;
        }
        files[n++] = (bench_file){paths[i], fd, (uint64_t)st.st_size};
    }
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += files[i].size;

    /* Prefaulted, so that no pass pays for first-touch page faults. Huge
     * pages (where THP allows) let the kernel describe a registered buffer
     * in 2 MiB segments instead of 4 KiB ones. */
    pool = mmap(NULL, pool_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pool != MAP_FAILED) {
        if (!o.small_pages)
            madvise(pool, pool_bytes, MADV_HUGEPAGE);
        memset(pool, 0x5A, pool_bytes);
    }
    raw_buf = mmap(NULL, BENCH_RAW_BUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (pool == MAP_FAILED || raw_buf == MAP_FAILED) {
        fprintf(stderr, "bench_read: error: mmap %llu bytes: %s\n", (unsigned long long)pool_bytes,
                strerror(errno));
        goto out;
    }
    struct iovec region = {pool, pool_bytes};
    io_engine_config cfg = {.kind = o.kind, .queue_depth = o.qd, .max_piece_bytes = o.piece,
                            .regions = &region, .n_regions = o.no_register ? 0 : 1,
                            .pread_threads = o.threads};
    ms_error err = {0};
    if (io_engine_open(&cfg, &e, &err) != 0) {
        fprintf(stderr, "bench_read: error: %s\n", err.msg);
        goto out;
    }
    io_engine_stats st0, st1;
    io_engine_get_stats(e, &st0);

    /* Three passes per round, each timed alone: the engine into the pool; the
     * raw baseline, read() into one 4 MiB buffer (which stays in the CPU
     * caches); and read() into the same pool, cycling, which shows how much of
     * any gap is the destination memory rather than the engine. */
    if (!o.drop_caches && raw_pass(files, n, raw_buf, BENCH_RAW_BUF, 1) < 0) /* warm the cache */
        goto out;
    enum { k_engine, k_raw, k_rawpool, k_passes };
    double *gbps[k_passes] = {NULL};
    for (int k = 0; k < k_passes; k++) {
        gbps[k] = calloc(o.repeat, sizeof *gbps[k]);
        if (!gbps[k])
            goto out_rounds;
    }
    for (unsigned r = 0; r < o.repeat; r++) {
        double resident[k_passes];
        for (int k = 0; k < k_passes; k++) {
            if (o.drop_caches)
                cache_drop(files, n);
            resident[k] = cache_resident(files, n);
            double t0 = now_seconds();
            int64_t got = k == k_engine  ? engine_pass(e, files, n, &o, pool)
                          : k == k_raw   ? raw_pass(files, n, raw_buf, BENCH_RAW_BUF, 1)
                                         : raw_pass(files, n, pool, o.buf, o.nbuf);
            double t1 = now_seconds();
            if (got < 0)
                goto out_rounds;
            if ((uint64_t)got != total) {
                fprintf(stderr, "bench_read: error: pass %d read %lld of %llu bytes\n", k,
                        (long long)got, (unsigned long long)total);
                goto out_rounds;
            }
            gbps[k][r] = (double)got / (t1 - t0) / 1e9;
        }
        io_engine_get_stats(e, &st1);
        printf("engine=%s cache=%s resident=%.1f%% bytes=%llu seconds=%.3f GBps=%.3f raw_GBps=%.3f "
               "ratio=%.3f rawpool_GBps=%.3f ratio_pool=%.3f piece=%llu qd=%u buf=%llu nbuf=%u "
               "registered=%d hugepages=%d pieces=%llu requeued=%llu\n",
               io_engine_name(e), cache_word(resident[k_engine]), resident[k_engine] * 100,
               (unsigned long long)total, (double)total / gbps[k_engine][r] / 1e9, gbps[k_engine][r],
               gbps[k_raw][r], gbps[k_engine][r] / gbps[k_raw][r], gbps[k_rawpool][r],
               gbps[k_engine][r] / gbps[k_rawpool][r], (unsigned long long)o.piece, o.qd,
               (unsigned long long)o.buf, o.nbuf, (int)st0.registered, (int)!o.small_pages,
               (unsigned long long)(st1.pieces - st0.pieces),
               (unsigned long long)(st1.requeued_pieces - st0.requeued_pieces));
        fflush(stdout);
        st0 = st1;
        if (o.drop_caches && (resident[k_raw] > 0.05 || resident[k_rawpool] > 0.05))
            fprintf(stderr, "bench_read: warning: the cache could not be dropped before the raw passes\n");
    }
    if (o.repeat > 1) {
        double med[k_passes];
        for (int k = 0; k < k_passes; k++)
            med[k] = median(gbps[k], o.repeat);
        printf("summary engine=%s cache=%s runs=%u GBps_median=%.3f raw_GBps_median=%.3f ratio=%.3f "
               "rawpool_GBps_median=%.3f ratio_pool=%.3f\n",
               io_engine_name(e), o.drop_caches ? "cold" : "hot", o.repeat, med[k_engine], med[k_raw],
               med[k_engine] / med[k_raw], med[k_rawpool], med[k_engine] / med[k_rawpool]);
    }
    status = 0;
out_rounds:
    for (int k = 0; k < k_passes; k++)
        free(gbps[k]);
out:
    io_engine_close(e);
    if (pool != MAP_FAILED)
        munmap(pool, pool_bytes);
    if (raw_buf != MAP_FAILED)
        munmap(raw_buf, BENCH_RAW_BUF);
    for (unsigned i = 0; i < n; i++)
        close(files[i].fd);
    for (unsigned i = 0; i < n_paths; i++)
        free(paths[i]);
    return status;
}
