/* Python `re` patterns run with POSIX regcomp: see py_regex.h. */
#include "io/py_regex.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A growable string. */
typedef struct sbuf {
    char *s;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *g = realloc(b->s, cap);
        if (!g) {
            b->oom = true;
            return;
        }
        b->s = g;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }
static void sb_putc(sbuf *b, char c) { sb_putn(b, &c, 1); }

static bool is_ere_special(char c) { return c && strchr(".[]()*+?{}|^$\\", c) != NULL; }

/* Translates one bracket expression starting at py[*i] == '['. Python allows
 * escapes inside brackets, POSIX does not: literals are collected and emitted
 * in the order POSIX needs (']' first, '[' '^' '-' last). */
static const char *bracket_to_ere(const char *py, size_t *i, sbuf *out)
{
    size_t p = *i + 1;
    bool negated = false, has_close = false, has_open = false, has_caret = false, has_dash = false;
    sbuf body = {0};
    if (py[p] == '^') {
        negated = true;
        p++;
    }
    bool first = true;
    const char *why = NULL;
    for (;;) {
        char c = py[p];
        if (c == '\0') {
            why = "an unterminated [...]";
            break;
        }
        if (c == ']' && !first)
            break;
        first = false;
        char lit = 0;
        if (c == '\\') {
            char e = py[p + 1];
            p += 2;
            switch (e) {
            case 'd': sb_puts(&body, "0-9"); continue;
            case 'w': sb_puts(&body, "[:alnum:]_"); continue;
            case 's': sb_puts(&body, "[:space:]"); continue;
            case 'n': lit = '\n'; break;
            case 't': lit = '\t'; break;
            case '\0': why = "a trailing backslash"; break;
            default:
                if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z') || (e >= '0' && e <= '9'))
                    why = "an escape inside [...] that POSIX cannot express";
                else
                    lit = e;
            }
            if (why)
                break;
        } else {
            lit = c;
            p++;
        }
        /* a range a-z between plain characters */
        if (py[p] == '-' && py[p + 1] != ']' && py[p + 1] != '\0') {
            char hi = py[p + 1];
            if (hi == '\\' || lit == '[' || lit == ']' || lit == '^' || lit == '-') {
                why = "a range with escaped or special endpoints inside [...]";
                break;
            }
            sb_putc(&body, lit);
            sb_putc(&body, '-');
            sb_putc(&body, hi);
            p += 2;
            continue;
        }
        if (lit == ']')
            has_close = true;
        else if (lit == '[')
            has_open = true;
        else if (lit == '^')
            has_caret = true;
        else if (lit == '-')
            has_dash = true;
        else
            sb_putc(&body, lit);
    }
    if (!why && body.oom)
        why = "out of memory";
    if (!why) {
        if (!negated && has_caret && !has_close && !has_open && !has_dash && body.len == 0) {
            sb_puts(out, "\\^");
        } else {
            sb_putc(out, '[');
            if (negated)
                sb_putc(out, '^');
            if (has_close)
                sb_putc(out, ']');
            if (body.len)
                sb_puts(out, body.s);
            if (has_open)
                sb_putc(out, '[');
            if (has_caret)
                sb_putc(out, '^');
            if (has_dash)
                sb_putc(out, '-');
            sb_putc(out, ']');
        }
        *i = p + 1;
    }
    free(body.s);
    return why;
}

const char *ms_py_regex_to_ere(const char *py, char **out)
{
    sbuf b = {0};
    const char *why = NULL;
    size_t i = 0;
    sb_puts(&b, "");
    while (!why && py[i]) { /* why first: a trailing backslash leaves i past the NUL */
        char c = py[i];
        if (c == '\\') {
            char e = py[i + 1];
            i += 2;
            switch (e) {
            case 'd': sb_puts(&b, "[0-9]"); break;
            case 'D': sb_puts(&b, "[^0-9]"); break;
            case 'w': sb_puts(&b, "[[:alnum:]_]"); break;
            case 'W': sb_puts(&b, "[^[:alnum:]_]"); break;
            case 's': sb_puts(&b, "[[:space:]]"); break;
            case 'S': sb_puts(&b, "[^[:space:]]"); break;
            case 'n': sb_putc(&b, '\n'); break;
            case 't': sb_putc(&b, '\t'); break;
            case '\0': why = "a trailing backslash"; break;
            default:
                if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z') || (e >= '0' && e <= '9'))
                    why = "an escape (backreference, \\b, \\A, \\Z, \\x...) that POSIX cannot express";
                else if (is_ere_special(e)) {
                    sb_putc(&b, '\\');
                    sb_putc(&b, e);
                } else {
                    sb_putc(&b, e);
                }
            }
        } else if (c == '[') {
            why = bracket_to_ere(py, &i, &b);
        } else if (c == '(' && py[i + 1] == '?') {
            if (py[i + 2] == ':') {
                sb_putc(&b, '(');
                i += 3;
            } else if (py[i + 2] == 'P' && py[i + 3] == '<') {
                const char *close = strchr(py + i + 4, '>');
                if (!close) {
                    why = "an unterminated (?P<name>";
                } else {
                    sb_putc(&b, '(');
                    i = (size_t)(close - py) + 1;
                }
            } else {
                why = "a (?...) construct (lookaround, inline flags, named backreference)";
            }
        } else if (c == '*' || c == '+' || c == '?') {
            sb_putc(&b, c);
            i++;
            if (py[i] == '?') /* lazy: the same strings match */
                i++;
            else if (py[i] == '+')
                why = "a possessive quantifier";
        } else if (c == '{') {
            /* {m}, {m,}, {m,n}, {,n} are quantifiers; anything else is a literal '{' */
            size_t j = i + 1, m_digits = 0, n_digits = 0;
            while (py[j] >= '0' && py[j] <= '9')
                j++, m_digits++;
            bool comma = py[j] == ',';
            if (comma) {
                j++;
                while (py[j] >= '0' && py[j] <= '9')
                    j++, n_digits++;
            }
            if (py[j] == '}' && (m_digits || (comma && n_digits))) {
                sb_putc(&b, '{');
                if (!m_digits)
                    sb_putc(&b, '0');
                sb_putn(&b, py + i + 1, j - i - 1);
                sb_putc(&b, '}');
                i = j + 1;
                if (py[i] == '?')
                    i++;
                else if (py[i] == '+')
                    why = "a possessive quantifier";
            } else {
                sb_puts(&b, "[{]");
                i++;
            }
        } else if (c == '}') {
            sb_puts(&b, "[}]");
            i++;
        } else {
            sb_putc(&b, c);
            i++;
        }
    }
    if (!why && b.oom)
        why = "out of memory";
    if (why) {
        free(b.s);
        return why;
    }
    *out = b.s;
    return NULL;
}

int ms_py_regex_compile(const char *where, const char *what, const char *py, const char *prefix,
                       const char *suffix, int flags, regex_t *re, ms_error *err)
{
    char *ere = NULL;
    const char *why = ms_py_regex_to_ere(py, &ere);
    if (why)
        return ms_error_set(err, MS_EXIT_USAGE, where, "%s '%s' uses %s", what, py, why);
    char *full = NULL;
    if (asprintf(&full, "%s%s%s", prefix, ere, suffix) < 0) {
        free(ere);
        return ms_error_set(err, MS_EXIT_RUNTIME, where, "out of memory");
    }
    free(ere);
    int rc = regcomp(re, full, REG_EXTENDED | flags);
    free(full);
    if (rc != 0) {
        char msg[128];
        regerror(rc, re, msg, sizeof msg);
        return ms_error_set(err, MS_EXIT_DATA, where, "%s '%s' is not a valid regular expression (%s)", what, py,
                            msg);
    }
    return 0;
}

bool ms_regex_matches(const regex_t *re, const char *s) { return regexec(re, s, 0, NULL, 0) == 0; }
