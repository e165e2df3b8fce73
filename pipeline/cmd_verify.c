/* mergestream verify DIR: re-checks a merge output (pipeline/verify_output.h). */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "pipeline/cli.h"
#include "pipeline/progress.h"
#include "pipeline/verify_output.h"

static const char k_help[] =
    "usage: mergestream verify DIR [--json] [--quiet]\n"
    "\n"
    "Re-checks a merge output directory: every shard is a valid safetensors file,\n"
    "model.safetensors.index.json and the shards agree both ways, its\n"
    "metadata.total_size is the tensors' bytes, no model*.safetensors file lies\n"
    "beside the shards that is none of them, no mergestream.journal or *.partial\n"
    "file is left (an interrupted merge: `merge RECIPE -o DIR --resume` finishes\n"
    "it), and (when mergestream.json is present) every tensor's and shard's\n"
    "XXH3-64 matches it.\n"
    "\n"
    "  --json     also print one JSON object on stdout, passed or not: command, dir,\n"
    "             ok, tensors, shards, manifest, seconds, error (null or the message)\n"
    "  --quiet    no progress or summary on stderr (errors still)\n"
    "\n"
    "Exit codes: 0 everything matches, 3 a mismatch or invalid file (one line\n"
    "naming it), 1 an I/O error.\n";

/* --json: one object on stdout; err is NULL when the verify passed. */
static void verify_print_json(const char *dir, const ms_verify_result *res, double seconds, const ms_error *err)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "command", "verify");
    cJSON_AddStringToObject(j, "dir", dir);
    cJSON_AddBoolToObject(j, "ok", err == NULL);
    cJSON_AddNumberToObject(j, "tensors", (double)res->n_tensors);
    cJSON_AddNumberToObject(j, "shards", res->n_shards);
    cJSON_AddBoolToObject(j, "manifest", res->have_manifest); /* false: the structure only */
    cJSON_AddNumberToObject(j, "seconds", seconds);
    if (err)
        cJSON_AddStringToObject(j, "error", err->msg[0] ? err->msg : "unknown error");
    else
        cJSON_AddNullToObject(j, "error");
    ms_cli_print_json(j);
}

int ms_cmd_verify(int argc, char **argv)
{
    static const struct option k_opts[] = {
        {"json", no_argument, NULL, 'j'}, {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'}, {0, 0, 0, 0},
    };
    bool json = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", k_opts, NULL)) != -1) {
        switch (c) {
        case 'j': json = true; break;
        case 'q': ms_log_set_quiet(true); break;
        case 'h': fputs(k_help, stdout); return MS_EXIT_OK;
        default: return ms_cli_bad_option("verify", c, argv, k_opts);
        }
    }
    if (optind != argc - 1)
        return ms_cli_usage_error("verify", "expected exactly one DIR");
    const char *dir = argv[optind];
    ms_error err = {0};
    ms_verify_result res = {0};
    double t0 = ms_now_seconds();
    /* a journal or a partial shard first: an interrupted merge has no
     * manifest or index yet, and "no weights found" would not say why */
    int rc = ms_verify_output_leftovers(dir, &err);
    if (rc == 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        cpu_pool *cpu = NULL; /* without threads the tensors are hashed one by one */
        if (cpu_pool_open(ncpu > 0 ? (unsigned)ncpu : 1, &cpu) != 0)
            cpu = NULL;
        rc = ms_verify_output(dir, cpu, NULL, 0, &res, &err);
        cpu_pool_close(cpu);
    }
    if (json)
        verify_print_json(dir, &res, ms_now_seconds() - t0, rc == 0 ? NULL : &err);
    if (rc != 0)
        return ms_cli_fail(&err);
    if (!ms_log_is_quiet())
        fprintf(stderr, "mergestream: %s: OK: %zu tensors in %u shard%s%s\n", dir, res.n_tensors, res.n_shards,
                res.n_shards == 1 ? "" : "s",
                res.have_manifest ? ", every hash matches mergestream.json" : " (no mergestream.json: structure only)");
    return MS_EXIT_OK;
}
