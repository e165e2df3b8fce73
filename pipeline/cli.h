/* The command line: one function per subcommand, each taking argc/argv past
 * the subcommand name and returning the process exit code (ms_exit_code).
 * Errors are printed by the subcommand as one line:
 * "mergestream: error: WHERE: WHAT". */
#ifndef MS_CLI_H
#define MS_CLI_H

#include "io/ms_error.h"

int ms_cmd_inspect(int argc, char **argv);
int ms_cmd_verify(int argc, char **argv);
int ms_cmd_merge(int argc, char **argv);

/* --json: prints j (indented, one object) on stdout and frees it; a print
 * that fails for lack of memory prints nothing. */
struct cJSON;
void ms_cli_print_json(struct cJSON *j);

/* Prints err's one-line message and returns its exit code (1 if unset). */
int ms_cli_fail(const ms_error *err);

/* Prints "mergestream: error: usage: MSG" plus a hint to --help; returns 2. */
int ms_cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

struct option;

/* getopt_long's '?' or ':' (the option strings start with ':', so getopt
 * itself prints nothing): one usage error naming the option: unknown (with
 * a hint for mergekit-yaml's own flags), missing its value, or given a value
 * it does not take (opts: the command's table). Returns 2. */
int ms_cli_bad_option(const char *cmd, int c, char **argv, const struct option *opts);

#endif
