/* mergestream: the entry point. Dispatches to the subcommands in cmd_*.c. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "pipeline/cli.h"
#include "pipeline/cli_hessian.h"

static const char k_usage[] =
    "usage: mergestream COMMAND [OPTIONS]\n"
    "\n"
    "Merges large language models stored as safetensors, streaming tensor by tensor\n"
    "with bounded memory (models larger than RAM merge at disk speed).\n"
    "\n"
    "commands:\n"
    "  merge RECIPE -o DIR   merge the models a mergekit-style YAML recipe names\n"
    "  inspect PATH          list the tensors of a .safetensors file, a model\n"
    "                        directory or a PEFT adapter directory\n"
    "  verify DIR            re-check a merge output: shards, index and hashes\n"
    "  hessian MODEL --calib FILE -o DIR\n"
    "                        per-layer input statistics (H = 2/N sum x x^T) from\n"
    "                        calibration forward passes, for Hessian-aware merges\n"
    "  perplexity MODEL --calib FILE\n"
    "                        mean token NLL and perplexity on calibration tokens\n"
    "\n"
    "Run 'mergestream COMMAND --help' for a command's options.\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 3 invalid input data.\n";

int ms_cli_fail(const ms_error *err)
{
    fprintf(stderr, "mergestream: error: %s\n", err->msg[0] ? err->msg : "unknown error");
    return err->exit_code ? err->exit_code : MS_EXIT_RUNTIME;
}

int ms_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "mergestream: error: %s: %s (see 'mergestream %s --help')\n", cmd, msg, cmd);
    return MS_EXIT_USAGE;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(k_usage, stderr);
        return MS_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(k_usage, stdout);
        return MS_EXIT_OK;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("mergestream %s\n", MERGESTREAM_VERSION);
        return MS_EXIT_OK;
    }
    if (strcmp(cmd, "inspect") == 0)
        return ms_cmd_inspect(argc - 1, argv + 1);
    if (strcmp(cmd, "verify") == 0)
        return ms_cmd_verify(argc - 1, argv + 1);
    if (strcmp(cmd, "merge") == 0)
        return ms_cmd_merge(argc - 1, argv + 1);
    if (strcmp(cmd, "hessian") == 0)
        return ms_cmd_hessian(argc - 1, argv + 1);
    if (strcmp(cmd, "perplexity") == 0)
        return ms_cmd_perplexity(argc - 1, argv + 1);
    fprintf(stderr, "mergestream: error: unknown command '%s' (see 'mergestream --help')\n", cmd);
    return MS_EXIT_USAGE;
}
