/* Errors and log lines shared by every module.
 *
 * Two tiers (STYLE.md): a recoverable failure fills an ms_error and returns
 * -1 (or a negative errno where a function says so); the caller decides. A
 * broken invariant calls MS_ASSERT, which prints file:line and aborts.
 *
 * Messages are "WHERE: WHAT" (WHERE is a file, tensor or recipe key and line);
 * main() prints them as "mergestream: error: WHERE: WHAT" and exits with
 * err->exit_code. No function below main() exits. */
#ifndef MS_ERROR_H
#define MS_ERROR_H

#include <stdbool.h>
#include <stdio.h>

/* Process exit codes (DESIGN.md, CLI). */
enum ms_exit_code {
    MS_EXIT_OK = 0,
    MS_EXIT_RUNTIME = 1, /* I/O failure, out of memory, a GPU that broke */
    MS_EXIT_USAGE = 2,   /* bad command line or recipe */
    MS_EXIT_DATA = 3,    /* invalid input data (a malformed safetensors file...) */
};

typedef struct ms_error {
    int exit_code;  /* an ms_exit_code; 0 while no error was set */
    char msg[1024]; /* "WHERE: WHAT", no trailing newline */
} ms_error;

/* Fills err (when not NULL) with "where: formatted message" and returns -1,
 * so callers can write `return ms_error_set(err, MS_EXIT_DATA, path, "...")`.
 * A second call overwrites the first. */
int ms_error_set(ms_error *err, int exit_code, const char *where, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Like ms_error_set, with ": strerror(errnum)" appended. */
int ms_error_errno(ms_error *err, int exit_code, int errnum, const char *where, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

void ms_error_clear(ms_error *err);

/* Log lines go to stderr. --quiet silences info and progress, never warnings
 * or errors. Thread-safe: each line is one write. */
void ms_log_set_quiet(bool quiet);
bool ms_log_is_quiet(void);
void ms_log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void ms_log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Broken invariant: print file:line and the condition, then abort(). */
#define MS_ASSERT(cond)                                                        \
    do {                                                                       \
        if (!(cond))                                                           \
            ms_assert_fail(__FILE__, __LINE__, #cond);                         \
    } while (0)
_Noreturn void ms_assert_fail(const char *file, int line, const char *what);

#endif
