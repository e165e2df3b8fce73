/* Tests for io/py_regex.c: Python `re` patterns as POSIX EREs, construct by
 * construct (the exact ERE each becomes), the constructs POSIX cannot
 * express refused with their reason, and compiling with a prefix and suffix
 * (matches, and the exit codes of an untranslatable and an invalid pattern).
 * test_peft_adapter runs the same translation through adapter configs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/py_regex.h"

static void test_translation(void **state)
{
    (void)state;
    static const struct {
        const char *py, *ere;
    } k_cases[] = {
        {"abc", "abc"},
        {"a\\.b", "a\\.b"},                 /* an escaped ERE special stays escaped */
        {"a\\-b\\_", "a-b_"},               /* other escaped punctuation is the character */
        {"\\d+\\D", "[0-9]+[^0-9]"},
        {"\\w\\W", "[[:alnum:]_][^[:alnum:]_]"},
        {"\\s\\S", "[[:space:]][^[:space:]]"},
        {"\\t\\n", "\t\n"},
        {"(?:q|v)_proj", "(q|v)_proj"},     /* non-capturing and named groups: plain groups */
        {"(?P<which>q|v)", "(q|v)"},
        {".*?x+?y??", ".*x+y?"},            /* lazy quantifiers match the same strings */
        {"a{2}b{1,}c{2,3}?", "a{2}b{1,}c{2,3}"},
        {"a{,3}", "a{0,3}"},                /* Python's {,n} */
        {"{x}", "[{]x[}]"},                 /* braces that are not a quantifier */
        {"a{", "a[{]"},
        {"[\\d_]", "[0-9_]"},
        {"[\\w.]", "[[:alnum:]_.]"},
        {"[^ko]_proj", "[^ko]_proj"},
        {"[a-z0-9]", "[a-z0-9]"},
        {"[]a]", "[]a]"},                   /* ']' first is a member */
        {"[a^]", "[a^]"},                   /* '^' not first: a member, moved last */
        {"[-a]", "[a-]"},                   /* '-' a member: moved last */
        {"[\\^]", "\\^"},
        {"[.]", "[.]"},
    };
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        char *ere = NULL;
        const char *why = ms_py_regex_to_ere(k_cases[i].py, &ere);
        if (why)
            fail_msg("'%s' refused: %s", k_cases[i].py, why);
        if (strcmp(ere, k_cases[i].ere) != 0)
            fail_msg("'%s' became '%s', expected '%s'", k_cases[i].py, ere, k_cases[i].ere);
        free(ere);
    }
}

static void test_refused(void **state)
{
    (void)state;
    static const struct {
        const char *py, *reason;
    } k_cases[] = {
        {"(?!k).*", "(?...) construct"},      {"(?=x)", "(?...) construct"},
        {"(?i)abc", "(?...) construct"},      {"\\bq", "POSIX cannot express"},
        {"(a)\\1", "POSIX cannot express"},   {"\\Aq", "POSIX cannot express"},
        {"a*+", "possessive"},                {"a{2}+", "possessive"},
        {"[abc", "unterminated [...]"},       {"x\\", "trailing backslash"},
        {"(?P<n.*", "unterminated (?P<name>"}, {"[a-\\d]", "range with escaped"},
        {"[\\D]", "inside [...]"},
    };
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        char *ere = NULL;
        const char *why = ms_py_regex_to_ere(k_cases[i].py, &ere);
        if (!why)
            fail_msg("'%s' was translated ('%s'), expected a refusal", k_cases[i].py, ere);
        if (!strstr(why, k_cases[i].reason))
            fail_msg("'%s' refused with '%s', expected '%s'", k_cases[i].py, why, k_cases[i].reason);
    }
}

static void test_compile(void **state)
{
    (void)state;
    regex_t re;
    ms_error err = {0};
    assert_int_equal(ms_py_regex_compile("cfg.json", "target_modules", "(?:q|v)_proj", "^(.*\\.)?(", ")$", REG_NOSUB,
                                         &re, &err),
                     0);
    assert_true(ms_regex_matches(&re, "model.layers.0.self_attn.q_proj"));
    assert_true(ms_regex_matches(&re, "v_proj"));
    assert_false(ms_regex_matches(&re, "model.layers.0.self_attn.k_proj"));
    assert_false(ms_regex_matches(&re, "model.layers.0.self_attn.q_proj.lora_A")); /* the suffix anchors */
    assert_false(ms_regex_matches(&re, "xq_proj"));                                /* the prefix wants a dot */
    regfree(&re);

    assert_int_equal(ms_py_regex_compile("cfg.json", "target_modules", "(?<=x)q", "^(", ")$", 0, &re, &err), -1);
    assert_int_equal(err.exit_code, MS_EXIT_USAGE); /* the pattern uses what POSIX cannot run */
    assert_non_null(strstr(err.msg, "cfg.json: target_modules '(?<=x)q' uses a (?...) construct"));

    ms_error err2 = {0};
    assert_int_equal(ms_py_regex_compile("cfg.json", "layers_pattern", "model(", "^(", ")$", 0, &re, &err2), -1);
    assert_int_equal(err2.exit_code, MS_EXIT_DATA);
    assert_non_null(strstr(err2.msg, "cfg.json: layers_pattern 'model(' is not a valid regular expression"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_translation),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_compile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
