/* Shared by the whole-pipeline tests (test_merge_pipeline*.c): run the
 * mergestream binary on a recipe, then check every output tensor against a
 * float64 reference merge of the same input tensors, byte for byte. The
 * per-tensor parameters come from the planner (ms_plan_build). Include after
 * cmocka.h. */
#ifndef MS_TEST_PIPELINE_CHECK_H
#define MS_TEST_PIPELINE_CHECK_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/model_dir.h"
#include "pipeline/merge_plan.h"

/* The reference: out (p->out_dtype, numel elements) from the inputs. */
typedef void (*pc_reference_fn)(const ms_tensor_params *p, const void *const *in, void *out);

static void pc_run_or_fail(const char *fmt, ...)
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

static void *pc_read_range(const st_file *f, uint64_t off, uint64_t len)
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

/* Writes recipe_text as DIR/NAME.yml, merges it into DIR/out_NAME with the
 * binary (MS_BIN) and extra options, and checks every output tensor. */
static void pc_check_recipe(const char *dir, const char *name, const char *recipe_text, const char *options,
                            pc_reference_fn reference)
{
    char recipe[512], out[512];
    snprintf(recipe, sizeof recipe, "%s/%s.yml", dir, name);
    snprintf(out, sizeof out, "%s/out_%s", dir, name);
    FILE *f = fopen(recipe, "w");
    assert_non_null(f);
    fputs(recipe_text, f);
    fclose(f);
    pc_run_or_fail("rm -rf '%s' && '%s' merge '%s' -o '%s' --quiet %s", out, getenv("MS_BIN"), recipe, out, options);

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
        void *have = pc_read_range(of, st_file_tensor_offset(of, ot), ot->end - ot->begin);
        void *want = malloc(job->out_bytes ? job->out_bytes : 1);
        const void *in[MS_MAX_MODELS + 1] = {0};
        for (unsigned i = 0; i < job->n_inputs; i++)
            if (job->in[i].file)
                in[i] = pc_read_range(job->in[i].file, job->in[i].offset, job->in[i].row_bytes * job->params.rows);
        if (job->kind == MS_JOB_COPY)
            memcpy(want, in[0], job->out_bytes);
        else
            reference(&job->params, in, want);
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

#endif
