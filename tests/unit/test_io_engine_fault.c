/* The I/O engine's fault seam: MERGESTREAM_FAULT="read:3,write:2" makes the
 * 3rd read piece and the 2nd write piece fail with EIO, with either engine.
 *
 * The plan is parsed at the first ms_fault_hit of the process and the call
 * counters are process-wide, so main() sets the variable before anything else
 * and each scenario runs in a forked child that has made no call yet: every
 * child starts counting from 1. Children report by exit status (0 ok, 1
 * failed, 77 skipped) and print what failed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "io/io_engine.h"
#include "io/ms_fault.h"

#define PIECE 4099u

static uint64_t g_rng;
static int g_fd = -1;  /* random file, unlinked */
static uint64_t g_size;

static uint64_t rnd(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}

/* In a child: print and exit 1 instead of cmocka's longjmp. */
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            _exit(1);                                                                 \
        }                                                                             \
    } while (0)

static void child_pread_all(int fd, unsigned char *buf, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        CHECK(n > 0);
        done += (uint64_t)n;
    }
}

static int temp_file(uint64_t size)
{
    char path[] = "/tmp/ms_test_io_engine_fault_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    unlink(path);
    unsigned char *data = malloc(size);
    if (!data)
        return -1;
    for (uint64_t i = 0; i < size; i++)
        data[i] = (unsigned char)(rnd() >> 56);
    ssize_t n = pwrite(fd, data, size, 0);
    free(data);
    return n == (ssize_t)size ? fd : -1;
}

static io_engine *child_open(io_engine_kind kind)
{
    io_engine_config cfg = {.kind = kind, .queue_depth = 4, .max_piece_bytes = PIECE};
    io_engine *e = NULL;
    ms_error err = {0};
    if (io_engine_open(&cfg, &e, &err) != 0) {
        if (kind == IO_ENGINE_URING) {
            printf("note: io_uring unavailable (%s): skipping\n", err.msg);
            _exit(77);
        }
        fprintf(stderr, "open: %s\n", err.msg);
        _exit(1);
    }
    return e;
}

static void child_reap_all(io_engine *e, unsigned expect)
{
    io_request *done[8];
    unsigned got = 0;
    for (;;) {
        int n = io_engine_reap(e, done, 8, true);
        CHECK(n >= 0);
        if (n == 0)
            break;
        got += (unsigned)n;
    }
    CHECK(got == expect);
    CHECK(io_engine_outstanding(e) == 0);
}

/* Three reads: A (1 piece: call 1), B (4 pieces: calls 2, 3 = the fault), C
 * (2 pieces). B's first piece is in flight when its second fails: B waits
 * for it, completes with -EIO and never issues its last two pieces, so C's
 * pieces are calls 4 and 5. A and C are read correctly. */
static void child_read_fault(io_engine_kind kind)
{
    io_engine *e = child_open(kind);
    uint64_t lens[3] = {PIECE - 10, 4 * PIECE - 1, 2 * PIECE};
    uint64_t offs[3] = {11, 50000, 200001};
    io_request r[3];
    unsigned char *bufs[3], *ref = malloc(4 * PIECE);
    CHECK(ref);
    for (int i = 0; i < 3; i++) {
        bufs[i] = malloc(lens[i]);
        CHECK(bufs[i]);
        memset(bufs[i], 0x3C, lens[i]);
        r[i] = (io_request){.op = IO_OP_READ, .fd = g_fd, .offset = offs[i], .len = lens[i],
                            .buf = bufs[i]};
        CHECK(io_engine_submit(e, &r[i]) == 0);
    }
    child_reap_all(e, 3);
    CHECK(r[0].result == 0);
    CHECK(r[1].result == -EIO);
    CHECK(r[2].result == 0);
    for (int i = 0; i < 3; i += 2) {
        child_pread_all(g_fd, ref, lens[i], offs[i]);
        CHECK(memcmp(bufs[i], ref, lens[i]) == 0);
    }
    CHECK(ms_fault_calls(MS_FAULT_READ) == 5);
    CHECK(ms_fault_calls(MS_FAULT_WRITE) == 0);
    io_engine_stats st;
    io_engine_get_stats(e, &st);
    CHECK(st.pieces == 5);
    /* Later reads are not affected (read:3 fails the 3rd call only). */
    io_request again = {.op = IO_OP_READ, .fd = g_fd, .offset = offs[1], .len = lens[1], .buf = bufs[1]};
    CHECK(io_engine_submit(e, &again) == 0);
    child_reap_all(e, 1);
    CHECK(again.result == 0);
    child_pread_all(g_fd, ref, lens[1], offs[1]);
    CHECK(memcmp(bufs[1], ref, lens[1]) == 0);
    io_engine_close(e);
    for (int i = 0; i < 3; i++)
        free(bufs[i]);
    free(ref);
    _exit(0);
}

/* Two writes to a scratch file: W1 (3 pieces: calls 1, 2 = the fault, 3 not
 * issued), W2 (1 piece: call 3). W1's first piece is written, the rest of W1
 * is not; W2 is written. */
static void child_write_fault(io_engine_kind kind)
{
    int fd = temp_file(8 * PIECE);
    CHECK(fd >= 0);
    unsigned char before[8 * PIECE], after[8 * PIECE], data[4 * PIECE];
    child_pread_all(fd, before, sizeof before, 0);
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (unsigned char)~before[i + 100]; /* differs from every byte it replaces */
    io_engine *e = child_open(kind);
    io_request w1 = {.op = IO_OP_WRITE, .fd = fd, .offset = 100, .len = 3 * PIECE, .buf = data};
    io_request w2 = {.op = IO_OP_WRITE, .fd = fd, .offset = 100 + 3 * PIECE, .len = PIECE,
                     .buf = data + 3 * PIECE};
    CHECK(io_engine_submit(e, &w1) == 0);
    CHECK(io_engine_submit(e, &w2) == 0);
    child_reap_all(e, 2);
    io_engine_close(e);
    CHECK(w1.result == -EIO);
    CHECK(w2.result == 0);
    CHECK(ms_fault_calls(MS_FAULT_WRITE) == 3);
    CHECK(ms_fault_calls(MS_FAULT_READ) == 0);
    child_pread_all(fd, after, sizeof after, 0);
    unsigned char want[8 * PIECE];
    memcpy(want, before, sizeof want);
    memcpy(want + 100, data, PIECE);                             /* W1's first piece */
    memcpy(want + 100 + 3 * PIECE, data + 3 * PIECE, PIECE);     /* W2 */
    CHECK(memcmp(after, want, sizeof want) == 0);
    close(fd);
    _exit(0);
}

static void run_in_child(void (*fn)(io_engine_kind), io_engine_kind kind)
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        fn(kind);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    if (WEXITSTATUS(status) == 77)
        skip();
    assert_int_equal(WEXITSTATUS(status), 0);
}

static void test_read_fault_uring(void **state) { run_in_child(child_read_fault, IO_ENGINE_URING); }
static void test_read_fault_pread(void **state) { run_in_child(child_read_fault, IO_ENGINE_PREAD); }
static void test_write_fault_uring(void **state) { run_in_child(child_write_fault, IO_ENGINE_URING); }
static void test_write_fault_pread(void **state) { run_in_child(child_write_fault, IO_ENGINE_PREAD); }

int main(void)
{
    /* Before anything can call ms_fault_hit. */
    setenv("MERGESTREAM_FAULT", "read:3,write:2", 1);
    unsetenv("MERGESTREAM_IO_URING_DISABLE");
    g_rng = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ 1;
    g_size = (1u << 20) + 333;
    g_fd = temp_file(g_size);
    if (g_fd < 0) {
        perror("test_io_engine_fault: temp file");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_fault_uring),
        cmocka_unit_test(test_read_fault_pread),
        cmocka_unit_test(test_write_fault_uring),
        cmocka_unit_test(test_write_fault_pread),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    close(g_fd);
    return failed ? 1 : 0;
}
