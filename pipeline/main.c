/* mergestream: the entry point. Dispatches to the subcommands in cmd_*.c. */
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

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
    "Run 'mergestream COMMAND --help' (or 'mergestream help COMMAND') for a command's options.\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 3 invalid input data.\n";

void ms_cli_print_json(cJSON *j)
{
    char *text = cJSON_Print(j);
    if (text)
        puts(text);
    free(text);
    cJSON_Delete(j);
}

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

/* mergekit-yaml's flags that mean nothing here, and why. */
static const struct {
    const char *flag, *why;
} k_mergekit_flags[] = {
    {"--lazy-unpickle", "tensors are always read one at a time"},
    {"--low-cpu-memory", "memory is bounded by --max-memory"},
    {"--allow-crimes", "there is no architecture check to override: tensors are matched by name and shape"},
    {"--copy-tokenizer", "tokenizer files are always copied from the base or tokenizer_source"},
    {"--no-copy-tokenizer", "tokenizer files are always copied from the base or tokenizer_source"},
    {"--trust-remote-code", "no model code is ever run"},
    {"--safe-serialization", "the output is always safetensors"},
    {"--clone-tensors", "tensors are never shared between outputs"},
    {"--lora-merge-cache", "adapters are applied on the fly, nothing is cached"},
    {"--transformers-cache", "models are local directories, nothing is downloaded"},
    {"--write-model-card", "no model card is written (the recipe is in mergestream.json)"},
    {"--read-to-gpu", "placement is per tensor (--device)"},
    {"--multi-gpu", "one GPU is used (--device)"},
    {"--num-threads", "use --threads N"},
};

int ms_cli_bad_option(const char *cmd, int c, char **argv, const struct option *opts)
{
    char name[128];
    const char *arg = optind > 0 ? argv[optind - 1] : NULL;
    if (arg && strncmp(arg, "--", 2) == 0) /* a long option (optopt is then 0 or its value code) */
        snprintf(name, sizeof name, "%s", arg);
    else
        snprintf(name, sizeof name, "-%c", optopt > 0 && optopt < 128 ? optopt : '?');
    char *eq = strchr(name, '=');
    if (eq)
        *eq = '\0';
    if (c == ':')
        return ms_cli_usage_error(cmd, "option '%s' needs a value", name);
    for (const struct option *o = opts; eq && o->name; o++)
        if (strcmp(name + 2, o->name) == 0)
            return ms_cli_usage_error(cmd, "option '%s' takes no value", name);
    for (size_t i = 0; i < sizeof k_mergekit_flags / sizeof k_mergekit_flags[0]; i++)
        if (strcmp(name, k_mergekit_flags[i].flag) == 0)
            return ms_cli_usage_error(cmd, "unknown option '%s' (mergekit-yaml's: not needed here, %s; drop it)",
                                      name, k_mergekit_flags[i].why);
    return ms_cli_usage_error(cmd, "unknown option '%s'", name);
}

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
} k_commands[] = {
    {"merge", ms_cmd_merge},     {"inspect", ms_cmd_inspect},       {"verify", ms_cmd_verify},
    {"hessian", ms_cmd_hessian}, {"perplexity", ms_cmd_perplexity},
};

static int run_command(const char *cmd, int argc, char **argv)
{
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++)
        if (strcmp(cmd, k_commands[i].name) == 0)
            return k_commands[i].run(argc, argv);
    fprintf(stderr, "mergestream: error: unknown command '%s' (see 'mergestream --help')\n", cmd);
    return MS_EXIT_USAGE;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(k_usage, stderr);
        return MS_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "help") == 0 && argc == 3) { /* "help COMMAND": the command's --help */
        char *help_argv[] = {argv[2], "--help", NULL};
        return run_command(argv[2], 2, help_argv);
    }
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(k_usage, stdout);
        return MS_EXIT_OK;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("mergestream %s\n", MERGESTREAM_VERSION);
        return MS_EXIT_OK;
    }
    return run_command(cmd, argc - 1, argv + 1);
}
