/* Python `re` patterns (PEFT's target_modules, exclude_modules,
 * rank_pattern / alpha_pattern keys, layers_pattern) run with POSIX
 * regcomp(REG_EXTENDED) after a translation: \d \w \s (and their negations,
 * also inside [...]) become POSIX classes, (?:...) and (?P<name>...) plain
 * groups, lazy quantifiers (*? +? ?? {m,n}?) greedy ones (the same strings
 * match), {,n} becomes {0,n}, a '{' or '}' that is not a quantifier a
 * literal, and backslash escapes of punctuation literals. What POSIX cannot
 * express is refused with a reason: lookarounds, backreferences, \b \A \Z,
 * inline flags, possessive quantifiers. */
#ifndef MS_PY_REGEX_H
#define MS_PY_REGEX_H

#include <regex.h>
#include <stdbool.h>

#include "io/ms_error.h"

/* py as a POSIX ERE. Returns NULL and *out (malloc'd), or a short reason the
 * pattern cannot be translated ("a (?...) construct (lookaround, ...)"). */
const char *ms_py_regex_to_ere(const char *py, char **out);

/* Compiles prefix + ERE(py) + suffix into re with REG_EXTENDED | flags.
 * Returns 0, or -1 with err set naming where: MS_EXIT_USAGE "WHAT 'PY' uses
 * REASON" for an untranslatable pattern, MS_EXIT_DATA for one POSIX
 * rejects. */
int ms_py_regex_compile(const char *where, const char *what, const char *py, const char *prefix, const char *suffix,
                        int flags, regex_t *re, ms_error *err);

/* Whether re matches s. */
bool ms_regex_matches(const regex_t *re, const char *s);

#endif
