/* The CUDA backend's failure contract (gpu/gpu_backend.h): a GPU_OOM or
 * GPU_FATAL call leaves the merge state exactly as it was, so the same pass
 * on the same chunk runs on the CPU and the output is the CPU-only bytes.
 *
 *   tiny limit   a backend capped at 1 MiB: its free estimate is at most
 *                that; a tensor that does not fit gets GPU_OOM on every
 *                call ("needs X MiB, Y MiB free", X > Y); one that fits runs.
 *   fault walk   SQLite style: this program re-executes itself with
 *                MERGESTREAM_FAULT=gpu_alloc:N for N = 1, 2, ... until a run
 *                needs no fallback; every run must give the reference bytes.
 *                Also gpu_alloc:1+ (every request fails) and no fault.
 *   sticky error a child makes one call hit a kernel trap (the test knob
 *                gpu_backend_fail_next_for_tests): that call and every later
 *                one return GPU_FATAL, the CPU finishes, the bytes are right.
 *
 * Scenario of a child: ties with rescale (HIST_HI, HIST_LO, L1, APPLY),
 * dare_ties with rescale (L1, APPLY), della (L1, APPLY), linear (APPLY),
 * each in two row chunks per pass; quantised inputs so tie rules split.
 * Exit 77 without CUDA or a device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>

#ifndef MERGESTREAM_HAVE_CUDA

int main(void)
{
    printf("SKIP: built without CUDA\n");
    return 77;
}

#else

#include <errno.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gpu_test_cases.h"
#include "io/ms_fault.h"

extern char **environ;

#define CHILD_ENV "MS_GPU_FALLBACK_CHILD"

/* Child exit codes. */
enum {
    CHILD_OK = 0,          /* reference bytes, no call fell back */
    CHILD_FAIL = 1,        /* wrong bytes or a broken contract (printed) */
    CHILD_NO_GPU = 3,
    CHILD_OK_FALLBACK = 10 /* reference bytes, some call fell back */
};

static uint64_t g_seed;
static cpu_pool *g_pool;

/* ============================================================= running */

typedef struct run_stats {
    unsigned calls, gpu_ok, oom, fatal;
    int first_fatal; /* call index, -1: none */
    char err[1024];  /* the first broken rule, "" when none */
} run_stats;

/* Every pass of tc in chunks of at most `rows` rows; each chunk on backend b,
 * rerun on the CPU when b fails. Before GPU call number fail_call (counted
 * from 0; -1: never) the sticky-error knob is set. Returns false when a rule
 * broke (rs->err says which). */
static bool run_with_fallback(gpu_backend *b, const tcase *tc, void *out, uint64_t rows, int fail_call, run_stats *rs)
{
    const ms_tensor_params *p = &tc->p;
    memset(rs, 0, sizeof *rs);
    rs->first_fatal = -1;
    ms_merge_state *st = NULL;
    if (ms_merge_state_open(p, &st) != 0) {
        snprintf(rs->err, sizeof rs->err, "ms_merge_state_open failed");
        return false;
    }
    char msg[256];
    for (unsigned pass = 0; pass < st->n_passes && !rs->err[0]; pass++) {
        for (uint64_t r = 0; r < p->rows && !rs->err[0]; r += rows) {
            uint64_t nr = p->rows - r < rows ? p->rows - r : rows;
            ms_chunk c = case_chunk(tc, r, nr, out);
            state_snap snap;
            if (!snap_take(&snap, st, p)) {
                snprintf(rs->err, sizeof rs->err, "no memory");
                break;
            }
            if ((int)rs->calls == fail_call)
                gpu_backend_fail_next_for_tests(b);
            gpu_status gs = gpu_merge_run_pass(b, p, st, pass, &c, msg, sizeof msg);
            unsigned call = rs->calls++;
            const char *kind = pass_kind_name(st->pass[pass]);
            if (gs == GPU_OK) {
                rs->gpu_ok++;
                if (rs->first_fatal >= 0)
                    snprintf(rs->err, sizeof rs->err, "call %u (%s pass, rows %" PRIu64 "+%" PRIu64
                             ") succeeded after a GPU_FATAL", call, kind, r, nr);
            } else {
                if (!snap_equal(&snap, st))
                    snprintf(rs->err, sizeof rs->err, "call %u (%s pass, rows %" PRIu64 "+%" PRIu64
                             ") returned %s and changed the merge state", call, kind, r, nr,
                             gs == GPU_OOM ? "GPU_OOM" : "GPU_FATAL");
                if (gs == GPU_OOM) {
                    unsigned long long need, avail;
                    rs->oom++;
                    if (sscanf(msg, "needs %llu MiB, %llu MiB free", &need, &avail) != 2)
                        snprintf(rs->err, sizeof rs->err, "call %u: GPU_OOM message \"%s\" is not \"needs X MiB, Y "
                                 "MiB free\"", call, msg);
                    if (rs->first_fatal >= 0)
                        snprintf(rs->err, sizeof rs->err, "call %u: GPU_OOM after a GPU_FATAL", call);
                } else {
                    rs->fatal++;
                    if (rs->first_fatal < 0)
                        rs->first_fatal = (int)call;
                    if (!msg[0])
                        snprintf(rs->err, sizeof rs->err, "call %u: GPU_FATAL without a message", call);
                }
                if (cpu_merge_run_pass(p, st, pass, &c, g_pool) != 0)
                    snprintf(rs->err, sizeof rs->err, "the CPU rerun of call %u failed", call);
            }
            snap_free(&snap);
        }
        if (!rs->err[0])
            ms_merge_pass_finish(st, p, pass);
    }
    ms_merge_state_close(st);
    return rs->err[0] == '\0';
}

/* The child scenario's cases, the same in every child of one seed. */
#define SCENARIO_CASES 4

static void scenario_case(unsigned k, tcase *tc, uint64_t *chunk_rows)
{
    g_rng = g_seed * 7919 + k;
    switch (k) {
    case 0: /* ties with rescale: all four pass kinds; quantised: split ties */
        case_make(tc, method_by_name("ties"), 12, 3000, 3, 1, ST_BF16);
        tc->p.rescale = true;
        for (unsigned i = 1; i <= 3; i++)
            tc->p.density[i] = 0.3 + 0.1 * i;
        *chunk_rows = 7;
        break;
    case 1: /* dare_ties with rescale: L1, APPLY */
        case_make(tc, method_by_name("dare_ties"), 10, 3000, 2, 0, ST_F16);
        tc->p.rescale = true;
        tc->p.density[1] = tc->p.density[2] = 0.5;
        *chunk_rows = 6;
        break;
    case 2: /* della: per-row ranks in L1 and APPLY */
        case_make(tc, method_by_name("della"), 12, 2000, 2, 1, ST_F32);
        tc->p.rescale = true;
        tc->p.density[1] = tc->p.density[2] = 0.5;
        *chunk_rows = 5;
        break;
    default: /* linear: one APPLY */
        case_make(tc, method_by_name("linear"), 8, 1000, 2, 0, ST_BF16);
        *chunk_rows = 8;
        break;
    }
}

/* ============================================================ children */

static int child_walk(void)
{
    char why[256];
    gpu_backend *b = NULL;
    if (gpu_backend_open(0, 0, &b, why, sizeof why) != 0) {
        printf("child: no GPU: %s\n", why);
        return CHILD_NO_GPU;
    }
    const char *fault = getenv("MERGESTREAM_FAULT");
    unsigned calls = 0, fallbacks = 0;
    int rc = CHILD_OK;
    for (unsigned k = 0; k < SCENARIO_CASES && rc == CHILD_OK; k++) {
        tcase tc;
        uint64_t rows;
        scenario_case(k, &tc, &rows);
        size_t bytes = tc.p.numel * ref_dtype_size(tc.p.out_dtype);
        unsigned char *want = malloc(bytes), *got = malloc(bytes);
        run_stats rs;
        char desc[2048], diff[512];
        case_describe(&tc, desc, sizeof desc);
        if (!want || !got || !run_cpu_only(&tc, want, g_pool, false)) {
            printf("child: the CPU reference failed\n");
            rc = CHILD_FAIL;
        } else if (!run_with_fallback(b, &tc, got, rows, -1, &rs)) {
            printf("child (MERGESTREAM_FAULT=%s): %s\n    case: %s\n", fault ? fault : "", rs.err, desc);
            rc = CHILD_FAIL;
        } else if (rs.fatal) {
            printf("child (MERGESTREAM_FAULT=%s): unexpected GPU_FATAL at call %d\n    case: %s\n", fault ? fault : "",
                   rs.first_fatal, desc);
            rc = CHILD_FAIL;
        } else if (output_diff(want, got, tc.p.out_dtype, 0, tc.p.numel, diff, sizeof diff)) {
            printf("child (MERGESTREAM_FAULT=%s): after %u fallbacks the bytes differ from the CPU-only run: %s\n"
                   "    case: %s\n", fault ? fault : "", rs.oom, diff, desc);
            rc = CHILD_FAIL;
        }
        calls += rs.calls;
        fallbacks += rs.oom;
        free(want);
        free(got);
        case_free(&tc);
    }
    printf("child (MERGESTREAM_FAULT=%s): %u GPU calls, %u fell back to the CPU, %" PRIu64 " gpu_alloc requests%s\n",
           fault ? fault : "", calls, fallbacks, ms_fault_calls(MS_FAULT_GPU_ALLOC), rc ? ", FAILED" : "");
    gpu_backend_close(b);
    if (rc != CHILD_OK)
        return rc;
    return fallbacks ? CHILD_OK_FALLBACK : CHILD_OK;
}

static int child_fatal(void)
{
    char why[256];
    gpu_backend *b = NULL;
    if (gpu_backend_open(0, 0, &b, why, sizeof why) != 0) {
        printf("child: no GPU: %s\n", why);
        return CHILD_NO_GPU;
    }
    tcase tc;
    uint64_t rows;
    scenario_case(0, &tc, &rows); /* ties: 4 passes x 2 chunks */
    size_t bytes = tc.p.numel * ref_dtype_size(tc.p.out_dtype);
    unsigned char *want = malloc(bytes), *got = malloc(bytes);
    run_stats rs;
    char diff[512];
    int rc = CHILD_FAIL;
    const int fail_call = 3; /* HIST_LO's second chunk: histograms already gathered */
    if (!want || !got || !run_cpu_only(&tc, want, g_pool, false))
        printf("child: the CPU reference failed\n");
    else if (!run_with_fallback(b, &tc, got, rows, fail_call, &rs))
        printf("child (sticky error): %s\n", rs.err);
    else if (rs.first_fatal != fail_call || rs.gpu_ok != (unsigned)fail_call || rs.fatal != rs.calls - fail_call)
        printf("child (sticky error): the trap was set before call %d; first GPU_FATAL at call %d, %u calls "
               "succeeded, %u of %u returned GPU_FATAL\n", fail_call, rs.first_fatal, rs.gpu_ok, rs.fatal, rs.calls);
    else if (output_diff(want, got, tc.p.out_dtype, 0, tc.p.numel, diff, sizeof diff))
        printf("child (sticky error): the CPU-finished bytes differ: %s\n", diff);
    else if (gpu_backend_free_estimate(b) != 0)
        printf("child (sticky error): a broken backend still offers %" PRIu64 " bytes\n", gpu_backend_free_estimate(b));
    else
        rc = CHILD_OK;
    if (rc == CHILD_OK)
        printf("child (sticky error): GPU_FATAL from call %d on, the CPU finished, bytes right\n", rs.first_fatal);
    gpu_backend_close(b);
    free(want);
    free(got);
    case_free(&tc);
    return rc;
}

/* ============================================================== parent */

/* Runs this program as a child (mode: "walk" or "fatal") with
 * MERGESTREAM_FAULT=fault (NULL: unset). Returns its exit code, 128 + the
 * signal when killed, -1 when it could not start. */
static int spawn_child(const char *mode, const char *fault)
{
    size_t n = 0;
    while (environ[n])
        n++;
    char **envp = calloc(n + 4, sizeof *envp);
    if (!envp)
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "MERGESTREAM_FAULT=", 18) != 0 && strncmp(environ[i], CHILD_ENV "=", strlen(CHILD_ENV) + 1) != 0 &&
            strncmp(environ[i], "MS_TEST_SEED=", 13) != 0)
            envp[k++] = environ[i];
    char e_mode[64], e_seed[64], e_fault[128];
    snprintf(e_mode, sizeof e_mode, CHILD_ENV "=%s", mode);
    snprintf(e_seed, sizeof e_seed, "MS_TEST_SEED=%" PRIu64, g_seed);
    envp[k++] = e_mode;
    envp[k++] = e_seed;
    if (fault) {
        snprintf(e_fault, sizeof e_fault, "MERGESTREAM_FAULT=%s", fault);
        envp[k++] = e_fault;
    }
    envp[k] = NULL;
    char *argv[] = {(char *)"test_gpu_fallback", NULL};
    fflush(stdout);
    fflush(stderr);
    pid_t pid;
    int rc = posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, envp);
    free(envp);
    if (rc != 0)
        return -1;
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* A backend capped at 1 MiB: GPU_OOM with a true message for a tensor that
 * does not fit, the CPU reruns, the bytes are right; a small one fits. */
static void test_tiny_limit(void **state)
{
    (void)state;
    const uint64_t limit = 1u << 20;
    char why[256], diff[512];
    gpu_backend *b = NULL;
    assert_int_equal(gpu_backend_open(0, limit, &b, why, sizeof why), 0);
    assert_true(gpu_backend_free_estimate(b) <= limit);

    tcase tc;
    g_rng = g_seed;
    case_make(&tc, method_by_name("ties"), 64, 4096, 2, 1, ST_F32);
    tc.p.density[1] = tc.p.density[2] = 0.4;
    /* 32 rows: >= 0.75 MiB of inputs, plus histograms or the output: no call fits */
    assert_true(gpu_merge_chunk_bytes(&tc.p, 32) > limit);
    size_t bytes = tc.p.numel * ref_dtype_size(tc.p.out_dtype);
    unsigned char *want = malloc(bytes), *got = malloc(bytes);
    assert_true(run_cpu_only(&tc, want, g_pool, false));
    run_stats rs;
    if (!run_with_fallback(b, &tc, got, 32, -1, &rs))
        fail_msg("1 MiB limit: %s", rs.err);
    assert_int_equal(rs.gpu_ok, 0);
    assert_int_equal(rs.oom, rs.calls);
    if (output_diff(want, got, tc.p.out_dtype, 0, tc.p.numel, diff, sizeof diff))
        fail_msg("1 MiB limit, every chunk on the CPU: %s", diff);
    assert_true(gpu_backend_pool_held(b) <= limit);
    /* the message: what the call needs and what is free, need > free */
    ms_merge_state *st = NULL;
    assert_int_equal(ms_merge_state_open(&tc.p, &st), 0);
    ms_chunk c = case_chunk(&tc, 0, 32, got);
    char msg[256];
    assert_int_equal(gpu_merge_run_pass(b, &tc.p, st, 0, &c, msg, sizeof msg), GPU_OOM);
    unsigned long long need = 0, avail = 0;
    assert_int_equal(sscanf(msg, "needs %llu MiB, %llu MiB free", &need, &avail), 2);
    printf("1 MiB limit: \"%s\"\n", msg);
    assert_true(need > avail);
    assert_true(avail <= 1);
    assert_int_equal(st->next_elem, 0);
    ms_merge_state_close(st);
    free(want);
    free(got);
    case_free(&tc);

    case_make(&tc, method_by_name("linear"), 1, 100, 2, 0, ST_F32); /* a few KiB: fits */
    want = malloc(400);
    got = malloc(400);
    assert_true(run_cpu_only(&tc, want, g_pool, false));
    if (!run_with_fallback(b, &tc, got, 1, -1, &rs))
        fail_msg("1 MiB limit, small tensor: %s", rs.err);
    assert_int_equal(rs.gpu_ok, 1);
    assert_int_equal(rs.oom, 0);
    assert_memory_equal(want, got, 400);
    assert_true(gpu_backend_pool_held(b) <= limit);
    free(want);
    free(got);
    case_free(&tc);
    gpu_backend_close(b);
}

static void expect_child(const char *mode, const char *fault, int want)
{
    int rc = spawn_child(mode, fault);
    if (rc != want)
        fail_msg("child %s with MERGESTREAM_FAULT=%s exited %d, expected %d", mode, fault ? fault : "(unset)", rc,
                 want);
}

static void test_no_fault(void **state)
{
    (void)state;
    expect_child("walk", NULL, CHILD_OK);
}

/* gpu_alloc:N for N = 1, 2, ... until a run needs no fallback. */
static void test_fault_walk(void **state)
{
    (void)state;
    unsigned n;
    for (n = 1; n <= 1000; n++) {
        char fault[64];
        snprintf(fault, sizeof fault, "gpu_alloc:%u", n);
        int rc = spawn_child("walk", fault);
        if (rc == CHILD_OK)
            break;
        if (rc != CHILD_OK_FALLBACK)
            fail_msg("MERGESTREAM_FAULT=%s: child exited %d (0 or 10 expected)", fault, rc);
    }
    printf("fault walk: gpu_alloc:1..%u each fell back and gave the reference bytes\n", n - 1);
    assert_true(n > 1);    /* the first request did fail */
    assert_true(n <= 1000);
}

static void test_fault_every(void **state)
{
    (void)state;
    expect_child("walk", "gpu_alloc:1+", CHILD_OK_FALLBACK);
}

static void test_sticky_error(void **state)
{
    (void)state;
    expect_child("fatal", NULL, CHILD_OK);
}

int main(void)
{
    const char *seed_env = getenv("MS_TEST_SEED");
    g_seed = seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL);
    const char *child = getenv(CHILD_ENV);
    if (cpu_pool_open(2, &g_pool) != 0) {
        printf("cannot start CPU threads\n");
        return 1;
    }
    int rc;
    if (child) {
        rc = strcmp(child, "fatal") == 0 ? child_fatal() : child_walk();
        cpu_pool_close(g_pool);
        return rc;
    }
    printf("test_gpu_fallback: seed %" PRIu64 " (MS_TEST_SEED replays)\n", g_seed);
    char why[256];
    gpu_backend *probe = NULL;
    if (gpu_backend_open(0, 0, &probe, why, sizeof why) != 0) {
        printf("SKIP: no usable GPU (%s)\n", why);
        cpu_pool_close(g_pool);
        return 77;
    }
    printf("device: %s\n", gpu_backend_device_name(probe));
    gpu_backend_close(probe);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_limit),
        cmocka_unit_test(test_no_fault),
        cmocka_unit_test(test_fault_walk),
        cmocka_unit_test(test_fault_every),
        cmocka_unit_test(test_sticky_error),
    };
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    cpu_pool_close(g_pool);
    return rc;
}

#endif
