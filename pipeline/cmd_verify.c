/* mergestream verify DIR: re-checks a merge output (pipeline/verify_output.h). */
#include <getopt.h>
#include <stdio.h>
#include <unistd.h>

#include "pipeline/cli.h"
#include "pipeline/verify_output.h"

static const char k_help[] =
    "usage: mergestream verify DIR [--quiet]\n"
    "\n"
    "Re-checks a merge output directory: every shard is a valid safetensors file,\n"
    "model.safetensors.index.json and the shards agree both ways, and (when\n"
    "mergestream.json is present) every tensor's and shard's XXH3-64 matches it.\n"
    "Exit codes: 0 everything matches, 3 a mismatch or invalid file (one line\n"
    "naming it), 1 an I/O error.\n";

int ms_cmd_verify(int argc, char **argv)
{
    static const struct option k_opts[] = {
        {"quiet", no_argument, NULL, 'q'}, {"help", no_argument, NULL, 'h'}, {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", k_opts, NULL)) != -1) {
        switch (c) {
        case 'q': ms_log_set_quiet(true); break;
        case 'h': fputs(k_help, stdout); return MS_EXIT_OK;
        default: return ms_cli_bad_option("verify", c, argv, k_opts);
        }
    }
    if (optind != argc - 1)
        return ms_cli_usage_error("verify", "expected exactly one DIR");
    const char *dir = argv[optind];
    ms_error err = {0};
    ms_verify_result res;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_pool *cpu = NULL; /* without threads the tensors are hashed one by one */
    if (cpu_pool_open(ncpu > 0 ? (unsigned)ncpu : 1, &cpu) != 0)
        cpu = NULL;
    int rc = ms_verify_output(dir, cpu, NULL, 0, &res, &err);
    cpu_pool_close(cpu);
    if (rc != 0)
        return ms_cli_fail(&err);
    if (!ms_log_is_quiet())
        fprintf(stderr, "mergestream: %s: OK: %zu tensors in %u shard%s%s\n", dir, res.n_tensors, res.n_shards,
                res.n_shards == 1 ? "" : "s",
                res.have_manifest ? ", every hash matches mergestream.json" : " (no mergestream.json: structure only)");
    return MS_EXIT_OK;
}
