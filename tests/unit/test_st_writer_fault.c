/* Fault injection into the output writer and the atomic file helpers, SQLite
 * style: for each site (write, fsync, rename, read) and N = 1, 2, 3 ... a
 * child process sets MERGESTREAM_FAULT=site:N first thing, then runs the
 * whole output scenario. Each run must either succeed with exactly the
 * reference bytes (and then the fault was never reached: the walk ends) or
 * fail with an error naming a file, leaving nothing behind: no partial, no
 * temp file, nothing under a final name. "site:N+" (every call from the N-th
 * on) is walked as well, which also makes the cleanup's own fsync fail.
 *
 * The fault plan is parsed once per process, so each N needs a fresh process;
 * the parent never calls into the fault seam itself (it only builds the plan,
 * which does no I/O, and reads files with plain stdio). */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/atomic_file.h"
#include "io/checksum.h"
#include "io/ms_fault.h"
#include "io/st_writer.h"

enum child_status {
    CHILD_OK_UNREACHED = 0, /* completed and the fault was never reached */
    CHILD_FAILED_CLEANLY = 10,
    CHILD_OK_BUT_HIT = 20,     /* completed although a fault fired: an error was swallowed */
    CHILD_BAD_MESSAGE = 30,    /* failed with a message that names no file */
    CHILD_SETUP = 40,
};

#define MAX_WALK 400
#define N_TENSORS 9

static uint64_t g_seed;

static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ------------------------------------------------------------ the scenario */

/* The same plan and bytes in parent and children: sizes from the seed, three
 * or more shards, a tensor larger than the limit among them. */
typedef struct scenario {
    st_plan *plan;
    unsigned char *data[N_TENSORS];
} scenario;

static int scenario_make(scenario *sc)
{
    uint64_t s = g_seed;
    ms_error err = {0};
    memset(sc, 0, sizeof *sc);
    if (st_plan_create(600, &sc->plan, &err) < 0)
        return -1;
    for (int i = 0; i < N_TENSORS; i++) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.mlp.weight", i);
        uint64_t shape[2] = {1 + mix(&s) % 12, 1 + mix(&s) % 20};
        if (i == 4) { /* larger than the limit: shards before, of and after it */
            shape[0] = 40;
            shape[1] = 10 + shape[1] % 11; /* 40 * cols * 2 bytes >= 800 > 600 */
        }
        if (st_plan_add_tensor(sc->plan, name, ST_BF16, 2, shape, NULL, &err) < 0)
            return -1;
        uint64_t nb = st_plan_tensor_at(sc->plan, (size_t)i)->nbytes;
        sc->data[i] = malloc(nb);
        if (!sc->data[i])
            return -1;
        for (uint64_t b = 0; b < nb; b++)
            sc->data[i][b] = (unsigned char)(mix(&s) | 1);
    }
    return st_plan_layout(sc->plan, &err);
}

static void scenario_free(scenario *sc)
{
    for (int i = 0; i < N_TENSORS; i++)
        free(sc->data[i]);
    st_plan_free(sc->plan);
}

/* Writes the scenario into dir: tensors in a seeded random order, each in 1-3
 * pieces in reverse order, hashes from the caller, then finish. */
static int scenario_write(const scenario *sc, const char *dir, ms_error *err)
{
    uint64_t s = g_seed ^ 0x5555;
    st_writer *w = NULL;
    if (st_writer_open(sc->plan, dir, &w, err) < 0)
        return -1;
    int order[N_TENSORS];
    for (int i = 0; i < N_TENSORS; i++)
        order[i] = i;
    for (int i = N_TENSORS; i > 1; i--) {
        int j = (int)(mix(&s) % (uint64_t)i), t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (int k = 0; k < N_TENSORS; k++) {
        int i = order[k];
        uint64_t nb = st_plan_tensor_at(sc->plan, (size_t)i)->nbytes;
        st_writer_set_tensor_hash(w, (size_t)i, ms_hash64(sc->data[i], nb));
        uint64_t pieces = 1 + mix(&s) % 3, step = (nb + pieces - 1) / pieces;
        for (uint64_t p = pieces; p-- > 0;) {
            uint64_t b = p * step, e = b + step < nb ? b + step : nb;
            if (b < e && st_writer_write(w, (size_t)i, b, sc->data[i] + b, e - b, err) < 0)
                goto fail;
        }
    }
    if (st_writer_finish(w, err) < 0)
        goto fail;
    st_writer_close(w);
    return 0;
fail:
    st_writer_abort(w);
    return -1;
}

/* ------------------------------------------------------------ the harness */

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static size_t count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

static unsigned char *slurp(const char *dir, const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

typedef int (*child_fn)(const char *dir, const scenario *sc, ms_error *err);

/* Runs fn in a child with MERGESTREAM_FAULT=spec; returns its exit status. */
static int run_child(const char *spec, ms_fault_site site, uint64_t n, child_fn fn, const char *dir,
                     const scenario *sc)
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("MERGESTREAM_FAULT", spec, 1); /* before any call into the seam */
        ms_error err = {0};
        int rc = fn(dir, sc, &err);
        bool reached = ms_fault_calls(site) >= n;
        if (rc == 0)
            _exit(reached ? CHILD_OK_BUT_HIT : CHILD_OK_UNREACHED);
        if (!strstr(err.msg, dir)) {
            fprintf(stderr, "%s: message names no file: %s\n", spec, err.msg);
            _exit(CHILD_BAD_MESSAGE);
        }
        _exit(CHILD_FAILED_CLEANLY);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (!WIFEXITED(status))
        fail_msg("%s: child died with signal %d", spec, WTERMSIG(status));
    return WEXITSTATUS(status);
}

/* ------------------------------------------------------------ shard output */

static int child_write_shards(const char *dir, const scenario *sc, ms_error *err)
{
    return scenario_write(sc, dir, err);
}

/* A successful run: exactly the shards and the index, with the right bytes. */
static void check_complete_output(const char *dir, const scenario *sc)
{
    size_t ns = st_plan_n_shards(sc->plan);
    assert_true(ns >= 3);
    assert_int_equal(count_entries(dir), ns + 1);
    for (size_t s = 0; s < ns; s++) {
        const st_plan_shard *sh = st_plan_shard_at(sc->plan, s);
        size_t len = 0;
        unsigned char *bytes = slurp(dir, sh->file_name, &len);
        assert_non_null(bytes);
        assert_int_equal(len, sh->file_size);
        assert_memory_equal(bytes, sh->header, sh->header_bytes);
        for (size_t i = sh->first_tensor; i < sh->first_tensor + sh->n_tensors; i++) {
            const st_plan_tensor *t = st_plan_tensor_at(sc->plan, i);
            assert_memory_equal(bytes + t->offset, sc->data[i], t->nbytes);
        }
        free(bytes);
    }
    size_t len = 0;
    unsigned char *index = slurp(dir, ST_INDEX_FILE_NAME, &len);
    assert_non_null(index);
    assert_true(len > 0 && index[len - 1] == '\n');
    free(index);
}

static void walk_site(const char *site_name, ms_fault_site site, bool from_on, child_fn fn,
                      void (*check_ok)(const char *, const scenario *),
                      void (*check_failed)(const char *, const scenario *))
{
    scenario sc;
    assert_int_equal(scenario_make(&sc), 0);
    unsigned failures = 0;
    for (uint64_t n = 1;; n++) {
        assert_true(n < MAX_WALK);
        char tmpl[] = "/tmp/ms_writer_fault_XXXXXX";
        char *dir = mkdtemp(tmpl);
        assert_non_null(dir);
        char spec[64];
        snprintf(spec, sizeof spec, "%s:%" PRIu64 "%s", site_name, n, from_on ? "+" : "");
        int st = run_child(spec, site, n, fn, dir, &sc);
        if (st == CHILD_FAILED_CLEANLY) {
            check_failed(dir, &sc);
            failures++;
        } else if (st == CHILD_OK_UNREACHED) {
            check_ok(dir, &sc);
        } else {
            fail_msg("%s: child status %d", spec, st);
        }
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        if (st == CHILD_OK_UNREACHED)
            break;
    }
    assert_true(failures > 0); /* the site is used at all: the walk tested something */
    fprintf(stderr, "  %s%s: %u runs failed cleanly, run %u completed\n", site_name, from_on ? "+" : "",
            failures, failures + 1);
    scenario_free(&sc);
}

static void check_nothing_left(const char *dir, const scenario *sc)
{
    (void)sc;
    assert_int_equal(count_entries(dir), 0);
}

static void test_shards_write_walk(void **state)
{
    (void)state;
    walk_site("write", MS_FAULT_WRITE, false, child_write_shards, check_complete_output, check_nothing_left);
}

static void test_shards_fsync_walk(void **state)
{
    (void)state;
    walk_site("fsync", MS_FAULT_FSYNC, false, child_write_shards, check_complete_output, check_nothing_left);
    walk_site("fsync", MS_FAULT_FSYNC, true, child_write_shards, check_complete_output, check_nothing_left);
}

static void test_shards_rename_walk(void **state)
{
    (void)state;
    walk_site("rename", MS_FAULT_RENAME, false, child_write_shards, check_complete_output, check_nothing_left);
    walk_site("write", MS_FAULT_WRITE, true, child_write_shards, check_complete_output, check_nothing_left);
}

/* ------------------------------------------------------------ atomic files */

static const char k_old[] = "{\"old\": true}\n";

/* The new content: every tensor's bytes of the scenario, concatenated (a few
 * KiB; the copy crosses no buffer boundary, that is covered elsewhere). */
static size_t atomic_content(const scenario *sc, unsigned char *out)
{
    size_t n = 0;
    for (int i = 0; i < N_TENSORS; i++) {
        uint64_t nb = st_plan_tensor_at(sc->plan, (size_t)i)->nbytes;
        if (out)
            memcpy(out + n, sc->data[i], nb);
        n += nb;
    }
    return n;
}

static int child_atomic(const char *dir, const scenario *sc, ms_error *err)
{
    char path[512], copy[512];
    snprintf(path, sizeof path, "%s/mergestream.json", dir);
    snprintf(copy, sizeof copy, "%s/tokenizer.json", dir);
    unsigned char *buf = malloc(atomic_content(sc, NULL));
    size_t n = atomic_content(sc, buf);
    int rc = ms_atomic_write_file(path, buf, n, err);
    if (rc == 0)
        rc = ms_copy_file_atomic(path, copy, err);
    free(buf);
    return rc;
}

/* Either file: absent, the old content (the first only) or the new one. */
static void check_atomic_state(const char *dir, const scenario *sc, bool complete)
{
    size_t want_len = atomic_content(sc, NULL);
    unsigned char *want = malloc(want_len);
    atomic_content(sc, want);
    size_t entries = 0;
    const char *names[2] = {"mergestream.json", "tokenizer.json"};
    bool new_first = false;
    for (int k = 0; k < 2; k++) {
        size_t len = 0;
        unsigned char *got = slurp(dir, names[k], &len);
        if (!got) {
            assert_false(complete);
            continue;
        }
        entries++;
        bool is_new = len == want_len && memcmp(got, want, len) == 0;
        bool is_old = k == 0 && len == strlen(k_old) && memcmp(got, k_old, len) == 0;
        assert_true(is_new || (is_old && !complete));
        if (k == 0)
            new_first = is_new;
        else
            assert_true(new_first); /* the copy only follows a successful first write */
        free(got);
    }
    assert_int_equal(count_entries(dir), entries); /* no temp files */
    free(want);
}

static void check_atomic_ok(const char *dir, const scenario *sc) { check_atomic_state(dir, sc, true); }
static void check_atomic_failed(const char *dir, const scenario *sc) { check_atomic_state(dir, sc, false); }

static int child_atomic_with_old(const char *dir, const scenario *sc, ms_error *err)
{
    char path[512];
    snprintf(path, sizeof path, "%s/mergestream.json", dir);
    FILE *f = fopen(path, "wb"); /* the previous content, written without the seam */
    if (!f || fputs(k_old, f) < 0 || fclose(f) != 0)
        _exit(CHILD_SETUP);
    return child_atomic(dir, sc, err);
}

static void test_atomic_walks(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        ms_fault_site site;
    } k_sites[] = {
        {"write", MS_FAULT_WRITE},
        {"fsync", MS_FAULT_FSYNC},
        {"rename", MS_FAULT_RENAME},
        {"read", MS_FAULT_READ},
    };
    for (size_t k = 0; k < sizeof k_sites / sizeof k_sites[0]; k++) {
        walk_site(k_sites[k].name, k_sites[k].site, false, child_atomic_with_old, check_atomic_ok,
                  check_atomic_failed);
        walk_site(k_sites[k].name, k_sites[k].site, false, child_atomic, check_atomic_ok, check_atomic_failed);
    }
}

int main(void)
{
    const char *seed = getenv("MS_TEST_SEED");
    g_seed = seed ? strtoull(seed, NULL, 0) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    fprintf(stderr, "test_st_writer_fault: MS_TEST_SEED=%" PRIu64 "\n", g_seed);
    /* This process itself runs without faults; only the children set them. */
    unsetenv("MERGESTREAM_FAULT");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shards_write_walk),
        cmocka_unit_test(test_shards_fsync_walk),
        cmocka_unit_test(test_shards_rename_walk),
        cmocka_unit_test(test_atomic_walks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
