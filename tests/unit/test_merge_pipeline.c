/* The whole pipeline against the float64 reference: generated models (mixed
 * dtypes, sharded inputs) are merged by the mergestream binary for every
 * method, under a memory budget that forces row chunks, and every output
 * tensor must equal tests/unit/merge_reference.h's merge of the same input
 * tensors, byte for byte. The per-tensor parameters come from the planner
 * (ms_plan_build), so this checks reading, chunking, the stages, the writer
 * and the layout; the arithmetic itself is checked independently in
 * test_cpu_merge. Needs MS_BIN and MS_GEN (set by ctest); exit 77 without. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "io/model_dir.h"
#include "merge_reference.h"
#include "pipeline/merge_plan.h"

static char g_dir[256];

static void run_or_fail(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc != 0)
        fail_msg("command failed (%d): %s", rc, cmd);
}

static void *read_range(const st_file *f, uint64_t off, uint64_t len)
{
    void *buf = malloc(len ? len : 1);
    assert_non_null(buf);
    uint64_t got = 0;
    while (got < len) {
        ssize_t n = pread(f->fd, (char *)buf + got, len - got, (off_t)(off + got));
        assert_true(n > 0);
        got += (uint64_t)n;
    }
    return buf;
}

/* Merges recipe `name` with the given extra options and checks every tensor. */
static void check_recipe(const char *name, const char *recipe_text, const char *options)
{
    char recipe[512], out[512];
    snprintf(recipe, sizeof recipe, "%s/%s.yml", g_dir, name);
    snprintf(out, sizeof out, "%s/out_%s", g_dir, name);
    FILE *f = fopen(recipe, "w");
    assert_non_null(f);
    fputs(recipe_text, f);
    fclose(f);
    run_or_fail("rm -rf '%s' && '%s' merge '%s' -o '%s' --quiet %s", out, getenv("MS_BIN"), recipe, out, options);

    ms_error err = {0};
    ms_plan *plan = NULL;
    ms_plan_options opt = {.pool_bytes = 1ull << 30, .threads = 1};
    if (ms_plan_build(recipe, &opt, &plan, &err) != 0)
        fail_msg("%s", err.msg);
    ms_model *merged = NULL;
    if (ms_model_open(out, &merged, &err) != 0)
        fail_msg("%s", err.msg);
    assert_int_equal(merged->n_tensors, plan->n_jobs);
    unsigned checked = 0;
    for (size_t j = 0; j < plan->n_jobs; j++) {
        const ms_job *job = &plan->jobs[j];
        long t = ms_model_find(merged, job->name);
        assert_true(t >= 0);
        const st_tensor *ot = merged->tensors[t].info;
        const st_file *of = ms_model_tensor_file(merged, (size_t)t);
        assert_int_equal(ot->dtype, job->out_dtype);
        void *have = read_range(of, st_file_tensor_offset(of, ot), ot->end - ot->begin);
        void *want = malloc(job->out_bytes ? job->out_bytes : 1);
        const void *in[MS_MAX_MODELS + 1] = {0};
        for (unsigned i = 0; i < job->n_inputs; i++)
            if (job->in[i].file)
                in[i] = read_range(job->in[i].file, job->in[i].offset, job->in[i].row_bytes * job->params.rows);
        if (job->kind == MS_JOB_COPY)
            memcpy(want, in[0], job->out_bytes);
        else
            ref_merge(&job->params, in, want, NULL);
        if (memcmp(have, want, job->out_bytes) != 0) {
            uint64_t b = 0;
            while (((uint8_t *)have)[b] == ((uint8_t *)want)[b])
                b++;
            fail_msg("%s: tensor %s differs from the reference at byte %llu", name, job->name,
                     (unsigned long long)b);
        }
        for (unsigned i = 0; i < job->n_inputs; i++)
            free((void *)in[i]);
        free(have);
        free(want);
        checked++;
    }
    assert_true(checked > 10);
    ms_model_close(merged);
    ms_plan_free(plan);
}

#define MODELS                                                                                               \
    "  - model: ./ft1\n    parameters: {weight: 0.7%s}\n"                                                    \
    "  - model: ./ft2\n    parameters: {weight: [-0.2, 0.9]%s}\n"

static void test_every_method_matches_reference(void **state)
{
    (void)state;
    static const struct {
        const char *method, *params, *top;
    } k_cases[] = {
        {"ties", ", density: 0.3", "dtype: bfloat16\n"},
        {"dare_ties", ", density: 0.4", "out_dtype: float32\nrandom_seed: 5\n"},
        {"dare_linear", ", density: 0.6", "parameters: {lambda: 1.3}\n"},
        {"task_arithmetic", "", "dtype: float16\n"},
        {"breadcrumbs", ", density: 0.7, gamma: 0.02", ""},
        {"breadcrumbs_ties", ", density: 0.5, gamma: 0.1", "dtype: float32\n"},
        {"della", ", density: 0.5, epsilon: 0.2", ""},
        {"della_linear", ", density: 0.4, epsilon: 0.1", "parameters: {normalize: true}\n"},
    };
    for (size_t c = 0; c < sizeof k_cases / sizeof k_cases[0]; c++) {
        char text[2048], models[512];
        snprintf(models, sizeof models, MODELS, k_cases[c].params, k_cases[c].params);
        snprintf(text, sizeof text, "merge_method: %s\nbase_model: ./base\nmodels:\n%s%s", k_cases[c].method, models,
                 k_cases[c].top);
        /* 30M: about 2 MiB of staging pool, so the embeddings are cut into chunks */
        check_recipe(k_cases[c].method, text, "--max-memory 30M --threads 2");
    }
    check_recipe("linear",
                 "merge_method: linear\nmodels:\n  - model: ./ft1\n    parameters: {weight: 2}\n"
                 "  - model: ./ft2\n    parameters: {weight: 0.5}\ndtype: bfloat16\n",
                 "--io pread");
}

int main(void)
{
    const char *bin = getenv("MS_BIN"), *gen = getenv("MS_GEN");
    if (!bin || !gen) {
        puts("SKIP: MS_BIN and MS_GEN not set (run through ctest)");
        return 77;
    }
    snprintf(g_dir, sizeof g_dir, "%s/ms-pipeline.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir))
        return 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%1$s' base %2$s/base --preset small --dtype bf16 --seed 21 --shard-size 2M && "
             "'%1$s' finetune %2$s/base %2$s/ft1 --seed 22 --dtype f16 && "
             "'%1$s' finetune %2$s/base %2$s/ft2 --seed 23 --dtype f32",
             gen, g_dir);
    if (system(cmd) != 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_method_matches_reference),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
