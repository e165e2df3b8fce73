#include "pipeline/merge_dry_run.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "pipeline/cli.h"
#include "pipeline/merge_passes.h"
#include "pipeline/method_table.h"

typedef struct plan_totals {
    uint64_t merged, copied, chunked, chunks, passes, out_bytes;
    uint64_t skippable_read_bytes; /* chunk passes HIST_HI's capture may make idle (not read then) */
} plan_totals;

static plan_totals plan_count(const ms_plan *plan)
{
    plan_totals t = {0};
    for (size_t j = 0; j < plan->n_jobs; j++) {
        const ms_job *job = &plan->jobs[j];
        if (job->kind == MS_JOB_MERGE)
            t.merged++;
        else
            t.copied++;
        t.chunked += job->n_chunks > 1;
        t.chunks += job->n_chunks;
        t.passes += (uint64_t)job->n_passes * job->n_chunks;
        t.out_bytes += job->out_bytes;
        for (unsigned p = 0; p < job->n_passes && job->kind == MS_JOB_MERGE && job->n_chunks > 1; p++)
            if (ms_merge_pass_may_idle(&job->params, p))
                t.skippable_read_bytes += job->read_bytes / job->n_passes; /* each pass reads every chunk */
    }
    return t;
}

static cJSON *job_json(const ms_job *job)
{
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "name", job->name);
    cJSON_AddStringToObject(e, "dtype", st_dtype_name(job->out_dtype));
    cJSON *shape = cJSON_AddArrayToObject(e, "shape");
    for (unsigned d = 0; d < job->out_ndim; d++)
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)job->out_shape[d]));
    cJSON_AddStringToObject(e, "action", job->kind == MS_JOB_MERGE ? "merge" : "copy");
    cJSON_AddNumberToObject(e, "row_chunks", (double)job->n_chunks);
    cJSON_AddNumberToObject(e, "passes", job->n_passes);
    cJSON_AddNumberToObject(e, "read_bytes", (double)job->read_bytes);
    return e;
}

void ms_merge_print_dry_run(const ms_plan *plan, const st_plan *layout, uint64_t pool_bytes, bool json)
{
    plan_totals t = plan_count(plan);
    size_t shards = st_plan_n_shards(layout);
    const char *method = ms_method_name(plan->recipe->method);
    if (json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddBoolToObject(j, "dry_run", true);
        cJSON_AddStringToObject(j, "merge_method", method);
        cJSON_AddNumberToObject(j, "models", plan->n_models);
        cJSON_AddNumberToObject(j, "tensors", (double)plan->n_jobs);
        cJSON_AddNumberToObject(j, "tensors_merged", (double)t.merged);
        cJSON_AddNumberToObject(j, "tensors_copied", (double)t.copied);
        cJSON_AddNumberToObject(j, "tensors_chunked", (double)t.chunked);
        cJSON_AddNumberToObject(j, "bytes_to_read", (double)plan->total_read_bytes);
        cJSON_AddNumberToObject(j, "bytes_to_read_at_least", (double)(plan->total_read_bytes - t.skippable_read_bytes));
        cJSON_AddNumberToObject(j, "bytes_to_write", (double)t.out_bytes);
        cJSON_AddNumberToObject(j, "shards", (double)shards);
        cJSON_AddNumberToObject(j, "staging_pool_bytes", (double)pool_bytes);
        cJSON_AddNumberToObject(j, "scratch_and_statistics_bytes", (double)plan->extra_bytes);
        cJSON *list = cJSON_AddArrayToObject(j, "jobs");
        for (size_t k = 0; k < plan->n_jobs; k++)
            cJSON_AddItemToArray(list, job_json(&plan->jobs[k]));
        ms_cli_print_json(j);
        return;
    }
    char least[96] = "";
    if (t.skippable_read_bytes) /* see README, Memory and speed */
        snprintf(least, sizeof least, " (%.2f GB where the selection passes find their thresholds early)",
                 (double)(plan->total_read_bytes - t.skippable_read_bytes) / 1e9);
    fprintf(stderr,
            "mergestream: dry run: %s over %u model%s: %zu tensors (%" PRIu64 " merged, %" PRIu64
            " copied; %" PRIu64 " in row chunks, %" PRIu64 " chunks, %" PRIu64 " chunk passes); would read "
            "%.2f GB%s and write %.2f GB in %zu shard%s, with a %.0f MiB staging pool and %.0f MiB of kernel "
            "scratch and statistics; nothing was read or written\n",
            method, plan->n_models, plan->n_models == 1 ? "" : "s", plan->n_jobs, t.merged, t.copied, t.chunked,
            t.chunks, t.passes, (double)plan->total_read_bytes / 1e9, least, (double)t.out_bytes / 1e9, shards,
            shards == 1 ? "" : "s", (double)pool_bytes / 1048576.0, (double)plan->extra_bytes / 1048576.0);
}
