/* hessian's statistics sink (pipeline/hessian_sink.h): layers of random
 * statistics through the sink, with a buffer for a whole layer, for a few
 * rows of the widest statistic, and sizes between that cut the statistics
 * into pieces across tensors; every case on pools of one, two and three
 * threads (test_pools.h); shards of one to
 * many tensors. The accumulators are reset and refilled for the next layer
 * as soon as the sink returns (as hessian does), so the writer must only
 * read what the sink converted. Every tensor's bytes and hash are compared
 * with cpu_hessian_rows_out's matrix made before the reset.
 * The same layers through the GPU's way in (ms_hessian_sink_stats_device)
 * with a fake device whose copies land only when the writer waits for them:
 * the same bytes and hashes, the layer declined when the buffer cannot hold
 * it, and a statistic lost on the device or a copy that fails reported.
 * The random seed is printed; MS_TEST_SEED=N replays a run. */
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
#include <unistd.h>

#include <cmocka.h>

#include "cpu/cpu_pool.h"
#include "io/checksum.h"
#include "io/st_writer.h"
#include "pipeline/hessian_sink.h"
#include "pipeline/llama_run.h"
#include "test_pools.h"
#include "test_rng.h"

/* Uniform in [lo, hi]. */
static uint64_t rnd_range(uint64_t lo, uint64_t hi) { return lo + rng_next() % (hi - lo + 1); }

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

/* A tensor's expected bytes, filled as its statistic is handed over. */
typedef struct expected {
    float *data;
    uint64_t dim;
} expected;

/* Adds rows of random values (a few rows per statistic, some statistics
 * given more than a flush's worth) into h and records the output the sink
 * must write for it. */
static void fill_stat(cpu_hessian *h, expected *want)
{
    uint64_t d = cpu_hessian_dim(h), rows = rnd_range(1, 40);
    float *x = malloc(rows * d * sizeof *x);
    for (uint64_t i = 0; i < rows * d; i++)
        x[i] = (float)(rng_unit() - 0.5);
    assert_int_equal(cpu_hessian_add(h, x, rows, d, cpu_gram_blas, NULL), 0);
    free(x);
    want->dim = d;
    want->data = malloc(d * d * sizeof(float));
    cpu_hessian_rows_out(h, 2.0 / (double)cpu_hessian_rows(h), 0, d, want->data);
}

/* A GPU behind ms_llama_dev_stats: out() converts the statistic at once
 * (the device's conversion) into a staging matrix, and only wait(), on the
 * writer's thread, copies it into dst (the device-to-host copy). */
typedef struct fake_dev {
    cpu_hessian *const *h;
    float *staged[MS_LLAMA_STAT_COUNT];
    float *dst[MS_LLAMA_STAT_COUNT];
    uint64_t bytes[MS_LLAMA_STAT_COUNT];
    unsigned fail_out_at; /* 1 + the statistic whose out() fails; 0: none */
    bool fail_wait;
    unsigned waits;
} fake_dev;

static int fake_out(void *ctx, unsigned k, double scale, float *dst)
{
    fake_dev *f = ctx;
    if (f->fail_out_at == k + 1)
        return -EIO;
    uint64_t d = cpu_hessian_dim(f->h[k]);
    f->bytes[k] = d * d * sizeof(float);
    f->staged[k] = malloc(f->bytes[k]);
    cpu_hessian_rows_out(f->h[k], scale, 0, d, f->staged[k]);
    f->dst[k] = dst;
    memset(dst, 0xff, f->bytes[k]); /* NaNs until the copy lands */
    return 0;
}

static int fake_wait(void *ctx)
{
    fake_dev *f = ctx;
    f->waits++;
    if (f->fail_wait)
        return -EIO;
    usleep(2000); /* the copy takes a while */
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
        if (!f->staged[k])
            continue;
        memcpy(f->dst[k], f->staged[k], f->bytes[k]);
        free(f->staged[k]);
        f->staged[k] = NULL;
    }
    return 0;
}

/* device: the decoder layers through ms_hessian_sink_stats_device (the
 * head always through the host, as hessian does). */
static void run_case(const cpu_llama_config *cfg, uint64_t n_layers, uint64_t buf_bytes, unsigned threads,
                     uint64_t shard_limit, bool device)
{
    char tmpl[] = "/tmp/ms_sink_test_XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    ms_error err = {0};
    st_plan *plan = NULL;
    assert_int_equal(st_plan_create(shard_limit, &plan, &err), 0);
    size_t n_tensors = (size_t)(n_layers * MS_LLAMA_STAT_COUNT + 1);
    for (size_t i = 0; i < n_tensors; i++) {
        uint64_t d = i < n_tensors - 1 ? ms_llama_stat_dim(cfg, (ms_llama_stat)(i % MS_LLAMA_STAT_COUNT))
                                       : cfg->hidden;
        uint64_t shape[2] = {d, d};
        char name[32];
        snprintf(name, sizeof name, "stat.%zu", i);
        assert_int_equal(st_plan_add_tensor(plan, name, ST_F32, 2, shape, NULL, &err), 0);
    }
    assert_int_equal(st_plan_layout(plan, &err), 0);
    st_writer *w = NULL;
    assert_int_equal(st_writer_open(plan, dir, &w, &err), 0);
    cpu_pool *pool = g_pool[threads];
    ms_hessian_sink *sink = NULL;
    if (ms_hessian_sink_open(w, plan, n_layers, buf_bytes, pool, NULL, &sink, &err) < 0)
        fail_msg("%s", err.msg);

    expected *want = calloc(n_tensors, sizeof *want);
    cpu_hessian *h[MS_LLAMA_STAT_COUNT] = {0};
    fake_dev fake = {.h = h};
    unsigned offered = 0, declined = 0;
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) /* flush 16: some statistics reach fp64 */
        assert_int_equal(cpu_hessian_open(ms_llama_stat_dim(cfg, (ms_llama_stat)k), 16, &h[k]), 0);
    for (uint64_t l = 0; l < n_layers; l++) {
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            cpu_hessian_reset(h[k]);
            fill_stat(h[k], &want[l * MS_LLAMA_STAT_COUNT + k]);
        }
        int rc = 1;
        if (device) {
            ms_llama_dev_stats dev = {.out = fake_out, .wait = fake_wait, .ctx = &fake, .wait_ctx = &fake};
            for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
                dev.dim[k] = cpu_hessian_dim(h[k]);
                dev.rows[k] = cpu_hessian_rows(h[k]);
            }
            rc = ms_hessian_sink_stats_device(sink, l, &dev, &err);
            if (rc < 0)
                fail_msg("layer %" PRIu64 " from the device: %s", l, err.msg);
            offered++;
            declined += rc == 1;
        }
        if (rc == 1 && ms_hessian_sink_stats(sink, l, h, MS_LLAMA_STAT_COUNT, &err) < 0)
            fail_msg("layer %" PRIu64 ": %s", l, err.msg);
    }
    /* the device's way needs a buffer for the whole layer; a smaller one declines */
    assert_int_equal(declined, buf_bytes / 4 < ms_hessian_layer_bytes(cfg) / 4 ? offered : 0);

    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) { /* what the sink was handed changes at once */
        cpu_hessian_reset(h[k]);
        expected scratch;
        fill_stat(h[k], &scratch);
        free(scratch.data);
    }
    cpu_hessian *head = NULL;
    assert_int_equal(cpu_hessian_open(cfg->hidden, 16, &head), 0);
    fill_stat(head, &want[n_tensors - 1]);
    if (ms_hessian_sink_stats(sink, n_layers, &head, 1, &err) < 0)
        fail_msg("head: %s", err.msg);
    cpu_hessian_close(head);
    for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++)
        cpu_hessian_close(h[k]);
    if (ms_hessian_sink_drain(sink, &err) < 0)
        fail_msg("drain: %s", err.msg);
    assert_int_equal(fake.waits, offered - declined); /* the writer waited for every layer from the device */
    ms_hessian_sink_close(sink);
    if (st_writer_finish(w, &err) < 0)
        fail_msg("finish: %s", err.msg);

    for (size_t i = 0; i < n_tensors; i++) {
        const st_plan_tensor *t = st_plan_tensor_at(plan, i);
        const st_plan_shard *sh = st_plan_shard_at(plan, t->shard);
        char path[256];
        snprintf(path, sizeof path, "%s/%s", dir, sh->file_name);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        uint64_t bytes = want[i].dim * want[i].dim * 4;
        assert_true(t->nbytes == bytes);
        float *got = malloc(bytes);
        assert_int_equal(fseeko(f, (off_t)t->offset, SEEK_SET), 0);
        assert_int_equal(fread(got, 1, bytes, f), bytes);
        fclose(f);
        if (memcmp(got, want[i].data, bytes) != 0)
            fail_msg("tensor %zu (dim %" PRIu64 ", buffer %" PRIu64 " bytes, %u threads): bytes differ", i,
                     want[i].dim, buf_bytes, threads);
        if (st_writer_tensor_hash(w, i) != ms_hash64(got, bytes))
            fail_msg("tensor %zu: recorded hash differs from its bytes' hash", i);
        free(got);
        free(want[i].data);
    }
    free(want);
    st_writer_close(w);
    st_plan_free(plan);
    nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static void test_sink_pieces(void **state)
{
    (void)state;
    for (unsigned round = 0; round < 24; round++) {
        cpu_llama_config cfg = {.hidden = rnd_range(3, 40), .n_heads = rnd_range(1, 4), .n_kv_heads = 1,
                                .head_dim = 2 * rnd_range(1, 6), .intermediate = rnd_range(3, 90)};
        uint64_t widest = cfg.hidden;
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            uint64_t d = ms_llama_stat_dim(&cfg, (ms_llama_stat)k);
            widest = d > widest ? d : widest;
        }
        uint64_t whole = ms_hessian_layer_bytes(&cfg), buf;
        switch (round % 4) {
        case 0: buf = whole; break;
        case 1: buf = widest * 4; break; /* one row of the widest: every piece is rows of one statistic */
        case 2: buf = widest * 4 * rnd_range(1, 5) + 4 * rnd_range(0, 7); break;
        default: buf = rnd_range(widest * 4, whole); break;
        }
        uint64_t shard_limit = rng_next() % 2 ? (uint64_t)1 << 40 : rnd_range(1, 4 * widest * widest);
        uint64_t n_layers = rnd_range(1, 4);
        for (unsigned t = 1; t <= 3; t++)
            run_case(&cfg, n_layers, buf, t, shard_limit, false);
        run_case(&cfg, n_layers, buf, 1 + round % 3, shard_limit, true);
    }
}

/* An allocator for the buffer (a GPU's pinned memory): used and given its
 * block back at close; when it returns NULL, malloc. */
typedef struct counting_alloc {
    unsigned allocs, frees;
    bool fail;
    void *last;
} counting_alloc;

static void *count_alloc(void *ctx, uint64_t bytes)
{
    counting_alloc *c = ctx;
    c->allocs++;
    c->last = c->fail ? NULL : malloc((size_t)bytes);
    return c->last;
}

static void count_free(void *ctx, void *p)
{
    counting_alloc *c = ctx;
    assert_ptr_equal(p, c->last);
    c->frees++;
    free(p);
}

static void test_buffer_allocator(void **state)
{
    (void)state;
    for (int fail = 0; fail <= 1; fail++) {
        ms_error err = {0};
        st_plan *plan = NULL;
        assert_int_equal(st_plan_create((uint64_t)1 << 40, &plan, &err), 0);
        uint64_t shape[2] = {4, 4};
        assert_int_equal(st_plan_add_tensor(plan, "h", ST_F32, 2, shape, NULL, &err), 0);
        assert_int_equal(st_plan_layout(plan, &err), 0);
        char tmpl[] = "/tmp/ms_sink_alloc_XXXXXX";
        char *dir = mkdtemp(tmpl);
        assert_non_null(dir);
        st_writer *w = NULL;
        assert_int_equal(st_writer_open(plan, dir, &w, &err), 0);
        counting_alloc c = {.fail = fail};
        ms_hessian_sink_mem mem = {.alloc = count_alloc, .free = count_free, .ctx = &c};
        ms_hessian_sink *sink = NULL;
        assert_int_equal(ms_hessian_sink_open(w, plan, 0, 64, g_pool[1], &mem, &sink, &err), 0);
        ms_hessian_sink_close(sink);
        assert_int_equal(c.allocs, 1);
        assert_int_equal(c.frees, fail ? 0 : 1); /* a failed allocation: malloc's block, freed by free */
        st_writer_abort(w);
        st_plan_free(plan);
        nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    }
}

/* A statistic lost on the device, and a copy that does not come back:
 * each an error naming what happened, nothing written after it. */
static void test_device_failures(void **state)
{
    (void)state;
    cpu_llama_config cfg = {.hidden = 8, .n_heads = 2, .n_kv_heads = 1, .head_dim = 4, .intermediate = 12};
    for (int wait_fails = 0; wait_fails <= 1; wait_fails++) {
        char tmpl[] = "/tmp/ms_sink_fail_XXXXXX";
        char *dir = mkdtemp(tmpl);
        assert_non_null(dir);
        ms_error err = {0};
        st_plan *plan = NULL;
        assert_int_equal(st_plan_create((uint64_t)1 << 40, &plan, &err), 0);
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            uint64_t d = ms_llama_stat_dim(&cfg, (ms_llama_stat)k), shape[2] = {d, d};
            char name[32];
            snprintf(name, sizeof name, "stat.%u", k);
            assert_int_equal(st_plan_add_tensor(plan, name, ST_F32, 2, shape, NULL, &err), 0);
        }
        uint64_t shape[2] = {cfg.hidden, cfg.hidden};
        assert_int_equal(st_plan_add_tensor(plan, "head", ST_F32, 2, shape, NULL, &err), 0);
        assert_int_equal(st_plan_layout(plan, &err), 0);
        st_writer *w = NULL;
        assert_int_equal(st_writer_open(plan, dir, &w, &err), 0);
        ms_hessian_sink *sink = NULL;
        assert_int_equal(ms_hessian_sink_open(w, plan, 1, ms_hessian_layer_bytes(&cfg), g_pool[1], NULL, &sink, &err),
                         0);
        cpu_hessian *h[MS_LLAMA_STAT_COUNT] = {0};
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            assert_int_equal(cpu_hessian_open(ms_llama_stat_dim(&cfg, (ms_llama_stat)k), 0, &h[k]), 0);
            expected e;
            fill_stat(h[k], &e);
            free(e.data);
        }
        fake_dev fake = {.h = h, .fail_out_at = wait_fails ? 0 : 3, .fail_wait = wait_fails};
        ms_llama_dev_stats dev = {.out = fake_out, .wait = fake_wait, .ctx = &fake, .wait_ctx = &fake};
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            dev.dim[k] = cpu_hessian_dim(h[k]);
            dev.rows[k] = cpu_hessian_rows(h[k]);
        }
        int rc = ms_hessian_sink_stats_device(sink, 0, &dev, &err);
        if (!wait_fails) {
            assert_int_equal(rc, -1);
            assert_non_null(strstr(err.msg, "lost"));
            assert_non_null(strstr(err.msg, "stat.2"));
        } else {
            assert_int_equal(rc, 0);
            assert_int_equal(ms_hessian_sink_drain(sink, &err), -1);
            assert_non_null(strstr(err.msg, "did not come back from the GPU"));
            assert_int_equal(fake.waits, 1);
        }
        ms_hessian_sink_close(sink);
        for (unsigned k = 0; k < MS_LLAMA_STAT_COUNT; k++) {
            free(fake.staged[k]);
            cpu_hessian_close(h[k]);
        }
        st_writer_abort(w);
        st_plan_free(plan);
        nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    }
}

int main(void)
{
    g_rng = test_seed("test_hessian_sink");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sink_pieces),
        cmocka_unit_test(test_device_failures),
        cmocka_unit_test(test_buffer_allocator),
    };
    return cmocka_run_group_tests(tests, pools_open, pools_close);
}
