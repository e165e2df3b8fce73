/* The I/O engine (io/io_engine.h), both backends, checked against plain
 * pread/pwrite on fresh random data: random unaligned reads and writes with
 * many more pieces than the in-flight cap, registered and unregistered
 * buffers, end of file (with and without `need`), O_DIRECT reads of
 * unaligned ranges, bad descriptors, malformed requests, close draining,
 * and the AUTO fallback. Fault injection lives in test_io_engine_fault.c
 * (MERGESTREAM_FAULT must be set before the first ms_fault_hit). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_capture.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/direct_read.h"
#include "io/io_engine.h"

/* ---------------------------------------------------------------- fixtures */

static uint64_t g_rng;
static int g_fd = -1;         /* the random input file, unlinked */
static uint64_t g_size;       /* its odd size */
static bool g_uring_ok;       /* an IO_ENGINE_URING engine opens here */

static uint64_t rnd(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}

static uint64_t rnd_below(uint64_t n) { return n ? rnd() % n : 0; }

static void fill_random(unsigned char *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        p[i] = (unsigned char)(rnd() >> 56);
}

/* An unlinked temp file holding `size` random bytes (or empty). */
static int temp_file(uint64_t size)
{
    const char *dir = getenv("TMPDIR");
    char path[512];
    snprintf(path, sizeof path, "%s/ms_test_io_engine_XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    unlink(path);
    unsigned char *data = malloc(size ? size : 1);
    if (!data) {
        close(fd);
        return -1;
    }
    fill_random(data, size);
    uint64_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(fd, data + done, size - done, (off_t)done);
        if (n <= 0) {
            free(data);
            close(fd);
            return -1;
        }
        done += (uint64_t)n;
    }
    free(data);
    return fd;
}

static void pread_all(int fd, void *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        assert_true(n > 0);
        done += (uint64_t)n;
    }
}

static bool open_kind(io_engine_kind kind, uint64_t piece, unsigned qd, const struct iovec *regions,
                      unsigned n_regions, io_engine **out)
{
    io_engine_config cfg = {
        .kind = kind,
        .queue_depth = qd,
        .max_piece_bytes = piece,
        .regions = regions,
        .n_regions = n_regions,
        .pread_threads = 3,
    };
    ms_error err = {0};
    int rc = io_engine_open(&cfg, out, &err);
    if (rc != 0)
        print_message("io_engine_open: %s\n", err.msg);
    return rc == 0;
}

/* Skips the current test when io_uring cannot be used on this machine. */
#define SKIP_WITHOUT_URING(kind)                                                   \
    do {                                                                           \
        if ((kind) == IO_ENGINE_URING && !g_uring_ok) {                            \
            print_message("note: io_uring is unavailable here; skipping\n");       \
            skip();                                                                \
        }                                                                          \
    } while (0)

/* Staging memory: a mapping of 2 * reg bytes whose first half is registered
 * as three regions, listed out of address order (so a wrong buf_index makes
 * the kernel refuse the *_FIXED op). Buffers are carved from the registered
 * half, from the unregistered half, from malloc, or straddle the end of the
 * registered half. Buffers in the registered half may span two regions: those
 * take the plain op. */
typedef struct arena {
    unsigned char *map;
    uint64_t reg;      /* registered bytes at map[0] */
    uint64_t in_next;  /* bump pointer in [0, reg - k_straddle_room) */
    uint64_t out_next; /* bump pointer in [reg + k_straddle_room, 2 * reg) */
    bool straddle_used;
    struct iovec regions[3];
} arena;

static const uint64_t k_straddle_room = 1u << 16;

static void arena_open(arena *a, uint64_t reg)
{
    memset(a, 0, sizeof *a);
    a->map = mmap(NULL, 2 * reg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(a->map != MAP_FAILED);
    a->reg = reg;
    a->out_next = reg + k_straddle_room;
    uint64_t third = reg / 3;
    a->regions[0] = (struct iovec){a->map + third, third};
    a->regions[1] = (struct iovec){a->map + 2 * third, reg - 2 * third};
    a->regions[2] = (struct iovec){a->map, third};
}

static void arena_close(arena *a) { munmap(a->map, 2 * a->reg); }

typedef struct test_buf {
    unsigned char *p;
    bool malloced;
} test_buf;

/* A buffer of len bytes that overlaps no other live buffer, at an odd address
 * most of the time. `where` picks the place (0: registered, 1: mapped but
 * unregistered, 2: straddling the region's end, 3: malloc); a place without
 * room falls back to malloc. */
static test_buf arena_take(arena *a, uint64_t len, unsigned where)
{
    test_buf b = {0};
    uint64_t skew = 1 + rnd_below(15);
    switch (where) {
    case 0:
        if (a->in_next + skew + len <= a->reg - k_straddle_room) {
            b.p = a->map + a->in_next + skew;
            a->in_next += skew + len;
            return b;
        }
        break;
    case 1:
        if (a->out_next + skew + len <= 2 * a->reg) {
            b.p = a->map + a->out_next + skew;
            a->out_next += skew + len;
            return b;
        }
        break;
    case 2:
        if (!a->straddle_used && len > 64 && len < k_straddle_room) {
            a->straddle_used = true; /* starts registered, ends outside */
            b.p = a->map + a->reg - len / 2;
            return b;
        }
        break;
    default:
        break;
    }
    b.p = malloc(len ? len : 1);
    assert_non_null(b.p);
    b.malloced = true;
    return b;
}

static void buf_release(test_buf *b)
{
    if (b->malloced)
        free(b->p);
    b->p = NULL;
}

typedef struct test_req {
    io_request r;
    test_buf buf;
    int seen; /* times io_engine_reap returned it */
} test_req;

static void mark_reaped(io_request **done, int n)
{
    for (int i = 0; i < n; i++) {
        test_req *t = done[i]->user;
        assert_ptr_equal(&t->r, done[i]);
        t->seen++;
    }
}

/* Reaps until nothing is outstanding, alternating blocking and polling. */
static void reap_all(io_engine *e)
{
    io_request *done[7];
    while (io_engine_outstanding(e) > 0) {
        int n = io_engine_reap(e, done, (int)(1 + rnd_below(7)), rnd_below(4) != 0);
        assert_true(n >= 0);
        mark_reaped(done, n);
    }
    assert_int_equal(io_engine_reap(e, done, 7, true), 0);
}

static uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/* ---------------------------------------------------------------- random reads */

/* n random reads of fd (size bytes) through an engine of the given shape,
 * submitted with polling reaps in between; every buffer must equal pread's. */
static void check_random_reads(io_engine_kind kind, int fd, uint64_t size, uint64_t piece,
                               unsigned qd, unsigned n, uint64_t max_len)
{
    arena a;
    arena_open(&a, 8u << 20);
    io_engine *e = NULL;
    assert_true(open_kind(kind, piece, qd, a.regions, 3, &e));
    test_req *reqs = calloc(n, sizeof *reqs);
    assert_non_null(reqs);
    uint64_t want_pieces = 0;
    io_request *done[5];
    for (unsigned i = 0; i < n; i++) {
        test_req *t = &reqs[i];
        uint64_t off = rnd_below(size);
        uint64_t len = i % 8 == 7 ? 0 : 1 + rnd_below(max_len);
        if (len > size - off)
            len = size - off;
        t->buf = arena_take(&a, len, i % 4);
        memset(t->buf.p, 0xA5, len);
        t->r = (io_request){.op = IO_OP_READ, .fd = fd, .offset = off, .len = len, .buf = t->buf.p,
                            .user = t, .result = 12345};
        want_pieces += ceil_div(len, piece ? piece : 4u << 20);
        assert_int_equal(io_engine_submit(e, &t->r), 0);
        if (rnd_below(3) == 0) {
            int got = io_engine_reap(e, done, 5, false);
            assert_true(got >= 0);
            mark_reaped(done, got);
        }
    }
    reap_all(e);

    unsigned char *ref = malloc(max_len);
    assert_non_null(ref);
    for (unsigned i = 0; i < n; i++) {
        test_req *t = &reqs[i];
        assert_int_equal(t->seen, 1);
        assert_int_equal(t->r.result, 0);
        assert_true(t->r.len <= max_len);
        pread_all(fd, ref, t->r.len, t->r.offset);
        assert_memory_equal(t->buf.p, ref, t->r.len);
        buf_release(&t->buf);
    }
    io_engine_stats st;
    io_engine_get_stats(e, &st);
    assert_int_equal(st.pieces, want_pieces);
    if (getenv("MERGESTREAM_IO_SHORT"))
        assert_true(st.requeued_pieces > want_pieces / 2);
    assert_true(st.peak_in_flight >= 1 && st.peak_in_flight <= (qd ? qd : 32));
    if (want_pieces > 4 * (uint64_t)(qd ? qd : 32))
        assert_int_equal(st.peak_in_flight, qd ? qd : 32); /* the cap was reached, never passed */
    if (kind == IO_ENGINE_URING) {
        assert_true(st.registered);
        assert_true(st.fixed_pieces > 0);            /* some pieces used the registered region */
        assert_true(st.fixed_pieces < st.pieces + st.requeued_pieces); /* and some did not */
    } else {
        assert_false(st.registered);
        assert_int_equal(st.fixed_pieces, 0);
    }
    io_engine_close(e);
    free(ref);
    free(reqs);
    arena_close(&a);
}

static void test_random_reads(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    /* Tiny odd pieces: requests of up to ~6 pieces, 400 requests >> queue depth. */
    check_random_reads(kind, g_fd, g_size, 4096 + 3, 8, 400, 6 * 4099 + 17);
    /* One piece in flight at a time. */
    check_random_reads(kind, g_fd, g_size, 65536 + 1, 1, 60, 300000);
    /* Defaults (4 MiB pieces, depth 32) with requests larger than a piece. */
    check_random_reads(kind, g_fd, g_size, 0, 0, 12, 5u << 20);
}

/* ---------------------------------------------------------------- writes */

static void test_random_writes(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    uint64_t start = (1u << 20) + 77;
    uint64_t total = start + 5000 + rnd_below(20000); /* the writes grow the file */
    int fd = temp_file(start);
    assert_true(fd >= 0);
    unsigned char *model = malloc(total);
    assert_non_null(model);
    pread_all(fd, model, start, 0);

    /* Cut [0, total) into disjoint random segments, written in random order. */
    enum { k_segments = 150 };
    uint64_t cuts[k_segments + 1];
    cuts[0] = 0;
    for (unsigned i = 1; i < k_segments; i++)
        cuts[i] = rnd_below(total);
    cuts[k_segments] = total;
    for (unsigned i = 1; i < k_segments; i++) /* insertion sort */
        for (unsigned j = i; j > 0 && cuts[j - 1] > cuts[j]; j--) {
            uint64_t tmp = cuts[j];
            cuts[j] = cuts[j - 1];
            cuts[j - 1] = tmp;
        }
    unsigned order[k_segments];
    for (unsigned i = 0; i < k_segments; i++)
        order[i] = i;
    for (unsigned i = k_segments - 1; i > 0; i--) {
        unsigned j = (unsigned)rnd_below(i + 1);
        unsigned tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }

    arena a;
    arena_open(&a, 4u << 20);
    io_engine *e = NULL;
    assert_true(open_kind(kind, 4096 + 3, 6, a.regions, 3, &e));
    test_req reqs[k_segments];
    memset(reqs, 0, sizeof reqs);
    for (unsigned i = 0; i < k_segments; i++) {
        test_req *t = &reqs[i];
        uint64_t off = cuts[order[i]], len = cuts[order[i] + 1] - off;
        t->buf = arena_take(&a, len, (unsigned)rnd_below(4));
        fill_random(t->buf.p, len);
        memcpy(model + off, t->buf.p, len);
        t->r = (io_request){.op = IO_OP_WRITE, .fd = fd, .offset = off, .len = len, .buf = t->buf.p,
                            .user = t};
        assert_int_equal(io_engine_submit(e, &t->r), 0);
    }
    reap_all(e);
    io_engine_close(e);
    for (unsigned i = 0; i < k_segments; i++) {
        assert_int_equal(reqs[i].seen, 1);
        assert_int_equal(reqs[i].r.result, 0);
        buf_release(&reqs[i].buf);
    }
    arena_close(&a);

    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    assert_int_equal((uint64_t)st.st_size, total);
    unsigned char *back = malloc(total);
    assert_non_null(back);
    pread_all(fd, back, total, 0);
    assert_memory_equal(back, model, total);
    /* And read it back through the engine. */
    check_random_reads(kind, fd, total, 4096 + 3, 8, 100, 5 * 4099);
    free(back);
    free(model);
    close(fd);
}

/* ---------------------------------------------------------------- short transfers */

/* Every transfer cut to 1000 bytes and every third answered -EAGAIN (the
 * engine's test seam): the re-queue paths must still produce exact bytes. */
static void test_short_transfers(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    assert_int_equal(setenv("MERGESTREAM_IO_SHORT", "1000", 1), 0);
    check_random_reads(kind, g_fd, g_size, 4096 + 3, 8, 150, 5 * 4099);
    test_random_writes(state); /* reads back through the engine too */
    assert_int_equal(unsetenv("MERGESTREAM_IO_SHORT"), 0);
}

/* ---------------------------------------------------------------- end of file, errors */

static int run_one(io_engine *e, io_request *r)
{
    assert_int_equal(io_engine_submit(e, r), 0);
    io_request *done[2];
    assert_int_equal(io_engine_reap(e, done, 2, true), 1);
    assert_ptr_equal(done[0], r);
    assert_int_equal(io_engine_outstanding(e), 0);
    return r->result;
}

static void test_end_of_file(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    const uint64_t piece = 4096 + 3;
    io_engine *e = NULL;
    assert_true(open_kind(kind, piece, 4, NULL, 0, &e));
    unsigned char *buf = malloc(8 * piece), *ref = malloc(8 * piece);
    assert_non_null(buf);
    assert_non_null(ref);
    /* need: a read asking for its first `need` bytes only completes when
     * the file ends after them, in any piece */
    struct {
        uint64_t off, len, need;
        int want;
    } cases[] = {
        {g_size - 100, 100, 0, 0},                  /* ends exactly at EOF */
        {g_size - 100, 101, 0, -ENODATA},           /* one byte past */
        {g_size - 100, 200, 0, -ENODATA},
        {g_size, 1, 0, -ENODATA},                   /* starts at EOF */
        {g_size + 5000, 10, 0, -ENODATA},           /* starts beyond */
        {g_size - 3 * piece, 3 * piece, 0, 0},      /* several pieces up to EOF */
        {g_size - 3 * piece - 7, 5 * piece, 0, -ENODATA}, /* EOF inside the 4th of 5 pieces */
        {g_size - 100, 4096, 100, 0},               /* EOF inside the only piece, after need */
        {g_size - 100, 4096, 101, -ENODATA},
        {g_size - 3 * piece - 7, 5 * piece, 3 * piece + 7, 0},
        {g_size - 3 * piece - 7, 5 * piece, 3 * piece + 8, -ENODATA},
        {g_size - 2 * piece, 2 * piece, 2 * piece, 0}, /* need = len, up to EOF */
        {1000, 3 * piece, 10, 0},                   /* no EOF: every byte read all the same */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memset(buf, 0, 8 * piece);
        io_request r = {.op = IO_OP_READ, .fd = g_fd, .offset = cases[i].off, .len = cases[i].len,
                        .need = cases[i].need, .buf = buf};
        int got = run_one(e, &r);
        if (got != cases[i].want)
            print_message("case %zu: off %llu len %llu: got %d want %d\n", i,
                          (unsigned long long)cases[i].off, (unsigned long long)cases[i].len, got,
                          cases[i].want);
        assert_int_equal(got, cases[i].want);
        if (cases[i].want == 0) {
            uint64_t have = cases[i].off + cases[i].len <= g_size ? cases[i].len : g_size - cases[i].off;
            pread_all(g_fd, ref, have, cases[i].off);
            assert_memory_equal(buf, ref, have);
        }
    }
    /* malformed: need beyond len, need on a write */
    io_request bad = {.op = IO_OP_READ, .fd = g_fd, .offset = 0, .len = 10, .need = 11, .buf = buf};
    assert_int_equal(io_engine_submit(e, &bad), -EINVAL);
    io_request wr = {.op = IO_OP_WRITE, .fd = g_fd, .offset = 0, .len = 10, .need = 5, .buf = buf};
    assert_int_equal(io_engine_submit(e, &wr), -EINVAL);

    /* A failing request among good ones fails alone. */
    test_req reqs[3];
    memset(reqs, 0, sizeof reqs);
    unsigned char *bufs[3];
    for (int i = 0; i < 3; i++) {
        bufs[i] = malloc(6 * piece);
        assert_non_null(bufs[i]);
        uint64_t off = i == 1 ? g_size - 2 * piece : (uint64_t)i * 100000 + 3;
        reqs[i].r = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = off, .len = 6 * piece,
                                 .buf = bufs[i], .user = &reqs[i]};
        assert_int_equal(io_engine_submit(e, &reqs[i].r), 0);
    }
    reap_all(e);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(reqs[i].seen, 1);
        assert_int_equal(reqs[i].r.result, i == 1 ? -ENODATA : 0);
        if (i != 1) {
            pread_all(g_fd, ref, 6 * piece, reqs[i].r.offset);
            assert_memory_equal(bufs[i], ref, 6 * piece);
        }
        free(bufs[i]);
    }
    io_engine_close(e);
    free(buf);
    free(ref);
}

/* What the merge's reader does with O_DIRECT: the blocks covering an
 * unaligned range, into an aligned buffer, the last ones past the end of
 * the file; the range's bytes start ms_direct_head bytes in. Also with every
 * transfer cut to one block (aligned re-queues). Skipped where the file
 * system refuses O_DIRECT. */
static void test_direct_ranges(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    int dfd = ms_direct_open(g_fd, "test file");
    if (dfd < 0) {
        print_message("note: O_DIRECT refused here (%s); skipping\n", strerror(-dfd));
        skip();
    }
    unsigned char *buf = NULL, *ref = malloc(g_size);
    assert_int_equal(posix_memalign((void **)&buf, MS_DIRECT_ALIGN, g_size + 2 * MS_DIRECT_ALIGN), 0);
    assert_non_null(ref);
    pread_all(g_fd, ref, g_size, 0);
    for (int cut = 0; cut < 2; cut++) {
        if (cut)
            assert_int_equal(setenv("MERGESTREAM_IO_SHORT", "4096", 1), 0);
        io_engine *e = NULL;
        assert_true(open_kind(kind, 3 * MS_DIRECT_ALIGN, 4, NULL, 0, &e));
        for (int i = 0; i < 200; i++) {
            uint64_t off = i == 0 ? g_size - 1 : rnd_below(g_size), len = 1 + rnd_below(g_size - off);
            if (i % 4 == 1)
                len = g_size - off; /* to the end of the file */
            io_request r = {.op = IO_OP_READ, .fd = dfd, .offset = off - ms_direct_head(off),
                            .len = ms_direct_span(off, len), .need = ms_direct_head(off) + len, .buf = buf};
            assert_int_equal(run_one(e, &r), 0);
            assert_memory_equal(buf + ms_direct_head(off), ref + off, len);
        }
        io_engine_close(e);
    }
    assert_int_equal(unsetenv("MERGESTREAM_IO_SHORT"), 0);
    close(dfd);
    free(buf);
    free(ref);
}

static void test_bad_descriptors(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    const uint64_t piece = 1000;
    io_engine *e = NULL;
    assert_true(open_kind(kind, piece, 4, NULL, 0, &e));
    unsigned char *buf = malloc(10 * piece);
    assert_non_null(buf);
    fill_random(buf, 10 * piece);

    io_request r = {.op = IO_OP_READ, .fd = -1, .offset = 0, .len = 10 * piece, .buf = buf};
    assert_int_equal(run_one(e, &r), -EBADF); /* 10 pieces, 4 in flight, all failing */

    int ro = open("/proc/self/exe", O_RDONLY);
    assert_true(ro >= 0);
    r = (io_request){.op = IO_OP_WRITE, .fd = ro, .offset = 0, .len = 3 * piece, .buf = buf};
    assert_int_equal(run_one(e, &r), -EBADF);
    close(ro);

    int dir = open("/", O_RDONLY | O_DIRECTORY);
    assert_true(dir >= 0);
    r = (io_request){.op = IO_OP_READ, .fd = dir, .offset = 0, .len = 5, .buf = buf};
    assert_int_equal(run_one(e, &r), -EISDIR);
    close(dir);

    /* The engine is still fine afterwards. */
    r = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = 12345, .len = 3 * piece + 1, .buf = buf};
    assert_int_equal(run_one(e, &r), 0);
    unsigned char *ref = malloc(3 * piece + 1);
    assert_non_null(ref);
    pread_all(g_fd, ref, 3 * piece + 1, 12345);
    assert_memory_equal(buf, ref, 3 * piece + 1);

    /* Malformed requests are refused at submit and not queued. */
    io_request bad = {.op = (io_op)7, .fd = g_fd, .len = 1, .buf = buf};
    assert_int_equal(io_engine_submit(e, &bad), -EINVAL);
    bad = (io_request){.op = IO_OP_READ, .fd = g_fd, .len = 1, .buf = NULL};
    assert_int_equal(io_engine_submit(e, &bad), -EINVAL);
    bad = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = (uint64_t)INT64_MAX, .len = 1, .buf = buf};
    assert_int_equal(io_engine_submit(e, &bad), -EINVAL);
    bad = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = (uint64_t)INT64_MAX - 1, .len = 1, .buf = buf};
    assert_int_equal(run_one(e, &bad), -ENODATA); /* the largest valid offset */
    assert_int_equal(io_engine_outstanding(e), 0);

    /* Zero length completes at once, even with a NULL buffer. */
    io_request zero = {.op = IO_OP_READ, .fd = -1, .len = 0, .buf = NULL, .result = 99};
    assert_int_equal(run_one(e, &zero), 0);

    io_engine_close(e);
    free(ref);
    free(buf);
}

/* ---------------------------------------------------------------- close, config */

/* close() without reaping must still finish every read before returning. */
static void test_close_drains(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    enum { k_n = 40 };
    const uint64_t len = 3 * 4099 + 5;
    io_engine *e = NULL;
    assert_true(open_kind(kind, 4099, 3, NULL, 0, &e));
    io_request reqs[k_n];
    unsigned char *bufs = malloc(k_n * len), *ref = malloc(len);
    assert_non_null(bufs);
    assert_non_null(ref);
    memset(bufs, 0x5A, k_n * len);
    uint64_t offs[k_n];
    for (int i = 0; i < k_n; i++) {
        offs[i] = rnd_below(g_size - len);
        reqs[i] = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = offs[i], .len = len,
                               .buf = bufs + (uint64_t)i * len};
        assert_int_equal(io_engine_submit(e, &reqs[i]), 0);
    }
    assert_int_equal(io_engine_outstanding(e), k_n);
    io_engine_close(e);
    for (int i = 0; i < k_n; i++) {
        assert_int_equal(reqs[i].result, 0);
        pread_all(g_fd, ref, len, offs[i]);
        assert_memory_equal(bufs + (uint64_t)i * len, ref, len);
    }
    io_engine_close(NULL);
    free(bufs);
    free(ref);
}

static void test_config_limits(void **state)
{
    io_engine_kind kind = *(io_engine_kind *)*state;
    SKIP_WITHOUT_URING(kind);
    io_engine *e = NULL;
    ms_error err = {0};
    io_engine_config cfg = {.kind = kind, .queue_depth = 257};
    assert_int_equal(io_engine_open(&cfg, &e, &err), -1);
    assert_null(e);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE);
    assert_non_null(strstr(err.msg, "queue depth 257"));
    cfg = (io_engine_config){.kind = kind, .max_piece_bytes = (1ull << 30) + 1};
    assert_int_equal(io_engine_open(&cfg, &e, &err), -1);
    cfg = (io_engine_config){.kind = kind, .n_regions = 1};
    assert_int_equal(io_engine_open(&cfg, &e, &err), -1);
    /* Both ends of the valid ranges open. */
    cfg = (io_engine_config){.kind = kind, .queue_depth = 256, .max_piece_bytes = 1ull << 30};
    assert_int_equal(io_engine_open(&cfg, &e, &err), 0);
    assert_string_equal(io_engine_name(e), kind == IO_ENGINE_URING ? "io_uring" : "pread");
    io_engine_close(e);
    cfg = (io_engine_config){.kind = kind, .queue_depth = 1, .max_piece_bytes = 1, .pread_threads = 1};
    assert_int_equal(io_engine_open(&cfg, &e, &err), 0);
    unsigned char buf[37], ref[37];
    io_request r = {.op = IO_OP_READ, .fd = g_fd, .offset = 999, .len = sizeof buf, .buf = buf};
    assert_int_equal(run_one(e, &r), 0); /* 37 one-byte pieces */
    pread_all(g_fd, ref, sizeof ref, 999);
    assert_memory_equal(buf, ref, sizeof buf);
    io_engine_stats st;
    io_engine_get_stats(e, &st);
    assert_int_equal(st.pieces, sizeof buf);
    assert_int_equal(st.bytes, sizeof buf);
    io_engine_close(e);
}

/* ---------------------------------------------------------------- registration, fallback */

typedef struct open_call {
    io_engine_config cfg;
    io_engine *e;
    int rc;
    ms_error err;
} open_call;

static void do_open(void *arg)
{
    open_call *c = arg;
    c->rc = io_engine_open(&c->cfg, &c->e, &c->err);
}

static void test_register_failure(void **state)
{
    SKIP_WITHOUT_URING(IO_ENGINE_URING);
    /* Memory that cannot be pinned: registration fails, the ring stays. */
    size_t len = 1u << 20;
    void *bad = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(bad != MAP_FAILED);
    struct iovec region = {bad, len};
    open_call c = {.cfg = {.kind = IO_ENGINE_URING, .max_piece_bytes = 4099, .queue_depth = 4,
                           .regions = &region, .n_regions = 1}};
    char log[2048];
    capture_stderr(do_open, &c, log, sizeof log);
    assert_int_equal(c.rc, 0);
    print_message("logged: %s", log);
    assert_non_null(strstr(log, "cannot register"));
    assert_non_null(strstr(log, "RLIMIT_MEMLOCK"));
    assert_ptr_equal(strchr(log, '\n'), log + strlen(log) - 1); /* one line */
    assert_string_equal(io_engine_name(c.e), "io_uring");
    io_engine_stats st;
    io_engine_get_stats(c.e, &st);
    assert_false(st.registered);
    io_engine_close(c.e);
    munmap(bad, len);
    /* And reads without registration still work (fixed_pieces stays 0). */
    io_engine *e = NULL;
    assert_true(open_kind(IO_ENGINE_URING, 4099, 4, NULL, 0, &e));
    unsigned char buf[20000], ref[20000];
    io_request r = {.op = IO_OP_READ, .fd = g_fd, .offset = 7, .len = sizeof buf, .buf = buf};
    assert_int_equal(run_one(e, &r), 0);
    pread_all(g_fd, ref, sizeof ref, 7);
    assert_memory_equal(buf, ref, sizeof buf);
    io_engine_get_stats(e, &st);
    assert_int_equal(st.fixed_pieces, 0);
    io_engine_close(e);
}

static void test_auto_fallback(void **state)
{
    char log[2048];
    assert_int_equal(setenv("MERGESTREAM_IO_URING_DISABLE", "1", 1), 0);

    open_call c = {.cfg = {.kind = IO_ENGINE_AUTO, .max_piece_bytes = 4096 + 3, .queue_depth = 8}};
    capture_stderr(do_open, &c, log, sizeof log);
    assert_int_equal(c.rc, 0);
    assert_string_equal(io_engine_name(c.e), "pread");
    assert_non_null(strstr(log, "io_uring unavailable (Function not implemented): using pread"));
    assert_ptr_equal(strchr(log, '\n'), log + strlen(log) - 1); /* one line */
    io_engine_close(c.e);
    check_random_reads(IO_ENGINE_AUTO, g_fd, g_size, 4096 + 3, 8, 100, 5 * 4099);

    open_call u = {.cfg = {.kind = IO_ENGINE_URING}};
    do_open(&u);
    assert_int_equal(u.rc, -1);
    assert_null(u.e);
    assert_int_equal(u.err.exit_code, MS_EXIT_RUNTIME);
    assert_non_null(strstr(u.err.msg, "io_uring: "));
    assert_non_null(strstr(u.err.msg, "Function not implemented"));

    /* The variable is read at each open, not once per process. */
    assert_int_equal(unsetenv("MERGESTREAM_IO_URING_DISABLE"), 0);
    open_call again = {.cfg = {.kind = IO_ENGINE_AUTO}};
    capture_stderr(do_open, &again, log, sizeof log);
    assert_int_equal(again.rc, 0);
    if (g_uring_ok) {
        assert_string_equal(io_engine_name(again.e), "io_uring");
        assert_string_equal(log, "");
    } else {
        assert_string_equal(io_engine_name(again.e), "pread");
    }
    io_engine_close(again.e);
}

/* ---------------------------------------------------------------- main */

int main(void)
{
    const char *seed_env = getenv("MS_TEST_SEED");
    g_rng = seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (g_rng == 0)
        g_rng = 1;
    printf("test_io_engine: seed 0x%llx (set MS_TEST_SEED to replay)\n", (unsigned long long)g_rng);
    unsetenv("MERGESTREAM_IO_URING_DISABLE");
    unsetenv("MERGESTREAM_IO_SHORT");

    g_size = (3u << 20) + 2 * rnd_below(20000) + 12345; /* odd */
    g_fd = temp_file(g_size);
    if (g_fd < 0) {
        perror("test_io_engine: temp file");
        return 1;
    }
    io_engine *probe = NULL;
    io_engine_config cfg = {.kind = IO_ENGINE_URING};
    ms_error err = {0};
    g_uring_ok = io_engine_open(&cfg, &probe, &err) == 0;
    if (!g_uring_ok)
        printf("note: io_uring unavailable (%s): its tests are skipped\n", err.msg);
    io_engine_close(probe);

    static io_engine_kind k_uring = IO_ENGINE_URING, k_pread = IO_ENGINE_PREAD;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_prestate(test_random_reads, &k_uring),
        cmocka_unit_test_prestate(test_random_reads, &k_pread),
        cmocka_unit_test_prestate(test_random_writes, &k_uring),
        cmocka_unit_test_prestate(test_random_writes, &k_pread),
        cmocka_unit_test_prestate(test_short_transfers, &k_uring),
        cmocka_unit_test_prestate(test_short_transfers, &k_pread),
        cmocka_unit_test_prestate(test_end_of_file, &k_uring),
        cmocka_unit_test_prestate(test_end_of_file, &k_pread),
        cmocka_unit_test_prestate(test_direct_ranges, &k_uring),
        cmocka_unit_test_prestate(test_direct_ranges, &k_pread),
        cmocka_unit_test_prestate(test_bad_descriptors, &k_uring),
        cmocka_unit_test_prestate(test_bad_descriptors, &k_pread),
        cmocka_unit_test_prestate(test_close_drains, &k_uring),
        cmocka_unit_test_prestate(test_close_drains, &k_pread),
        cmocka_unit_test_prestate(test_config_limits, &k_uring),
        cmocka_unit_test_prestate(test_config_limits, &k_pread),
        cmocka_unit_test(test_register_failure),
        cmocka_unit_test(test_auto_fallback),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    close(g_fd);
    return failed ? 1 : 0;
}
