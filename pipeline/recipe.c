/* Recipe loading: read the file, build a libyaml document, walk it against
 * the schema in recipe.h and the method table, resolve model paths.
 * Per-tensor resolution lives in recipe_params.c. */
#include "pipeline/recipe.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#define RECIPE_MAX_BYTES (16u << 20) /* recipes are a few hundred bytes; refuse anything absurd */

typedef struct recipe_parser {
    const char *path;     /* the recipe, for messages */
    char *dir;            /* owned: the recipe's folder; NULL when it has none (relative paths stay as written) */
    yaml_document_t *doc;
    ms_recipe *r;
    ms_error *err;
} recipe_parser;

/* ------------------------------------------------------------------------ */
/* Messages and node helpers                                                 */

static int rp_fail(const recipe_parser *p, unsigned line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int rp_fail(const recipe_parser *p, unsigned line, const char *fmt, ...)
{
    char where[512];
    char msg[1024];
    snprintf(where, sizeof where, "%s:%u", p->path, line ? line : 1);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ms_error_set(p->err, MS_EXIT_USAGE, where, "%s", msg);
}

static int rp_nomem(const recipe_parser *p)
{
    return ms_error_errno(p->err, MS_EXIT_RUNTIME, ENOMEM, p->path, "loading the recipe");
}

static unsigned node_line(const yaml_node_t *n) { return (unsigned)n->start_mark.line + 1; }

static yaml_node_t *rp_node(const recipe_parser *p, int index)
{
    yaml_node_t *n = yaml_document_get_node(p->doc, index);
    MS_ASSERT(n);
    return n;
}

static const char *scalar_text(const yaml_node_t *n) { return (const char *)n->data.scalar.value; }

/* A plain empty, "~" or "null" scalar: YAML's null. */
static bool node_is_null(const yaml_node_t *n)
{
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *s = scalar_text(n);
    return !*s || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 ||
           strcmp(s, "NULL") == 0;
}

/* A non-null scalar without embedded NUL bytes: *out points into the document. */
static int rp_string(const recipe_parser *p, const yaml_node_t *n, const char *what,
                     const char **out)
{
    if (n->type != YAML_SCALAR_NODE)
        return rp_fail(p, node_line(n), "%s must be a string", what);
    if (node_is_null(n))
        return rp_fail(p, node_line(n), "%s has no value", what);
    if (strlen(scalar_text(n)) != n->data.scalar.length)
        return rp_fail(p, node_line(n), "%s contains a NUL byte", what);
    *out = scalar_text(n);
    return 0;
}

/* Decimal numbers as YAML and Python's float() write them: [+-]digits[.digits][e[+-]digits]
 * or [+-].digits[...]. No hex, no inf/nan, no underscores. */
static bool text_is_decimal(const char *s)
{
    if (*s == '+' || *s == '-')
        s++;
    size_t digits = 0;
    while (isdigit((unsigned char)*s)) {
        s++;
        digits++;
    }
    if (*s == '.') {
        s++;
        while (isdigit((unsigned char)*s)) {
            s++;
            digits++;
        }
    }
    if (digits == 0)
        return false;
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-')
            s++;
        if (!isdigit((unsigned char)*s))
            return false;
        while (isdigit((unsigned char)*s))
            s++;
    }
    return *s == '\0';
}

/* [+-]digits: an integer literal (no exponent, no fraction). */
static bool text_is_integer(const char *s)
{
    if (*s == '+' || *s == '-')
        s++;
    if (!isdigit((unsigned char)*s))
        return false;
    while (isdigit((unsigned char)*s))
        s++;
    return *s == '\0';
}

/* PyYAML's (YAML 1.1) booleans. */
static bool text_bool(const char *s, bool *out)
{
    static const char *const k_true[] = {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"};
    static const char *const k_false[] = {"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"};
    for (size_t i = 0; i < sizeof k_true / sizeof k_true[0]; i++) {
        if (strcmp(s, k_true[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcmp(s, k_false[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

static bool path_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Same file or directory (after symlinks), else the same string. */
static bool same_path(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) != 0 || stat(b, &sb) != 0)
        return strcmp(a, b) == 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static bool same_model(const char *path_a, const char *adapter_a, const char *path_b,
                       const char *adapter_b)
{
    if ((adapter_a == NULL) != (adapter_b == NULL))
        return false;
    return same_path(path_a, path_b) && (!adapter_a || same_path(adapter_a, adapter_b));
}

/* Exactly one '/', with text on both sides and no leading '.' or '/'. */
static bool looks_like_hub_id(const char *s)
{
    if (s[0] == '.' || s[0] == '/')
        return false;
    const char *slash = strchr(s, '/');
    return slash && slash != s && slash[1] && !strchr(slash + 1, '/');
}

/* rel joined to the recipe folder (absolute paths unchanged; a leading "./"
 * dropped, so messages say DIR/models/x rather than DIR/./models/x). NULL on
 * ENOMEM. */
static char *rp_join(const recipe_parser *p, const char *rel)
{
    char *out = NULL;
    if (rel[0] == '/' || !p->dir)
        return strdup(rel);
    while (rel[0] == '.' && rel[1] == '/' && rel[2])
        rel += 2;
    if (asprintf(&out, "%s/%s", p->dir, rel) < 0)
        return NULL;
    return out;
}

/* ------------------------------------------------------------------------ */
/* YAML merge keys                                                           */

static bool is_merge_key(const yaml_node_t *k)
{
    return k->type == YAML_SCALAR_NODE &&
           ((k->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && k->data.scalar.length == 2 &&
             memcmp(k->data.scalar.value, "<<", 2) == 0) ||
            (k->tag && strcmp((const char *)k->tag, "tag:yaml.org,2002:merge") == 0));
}

static bool scalar_equal(const yaml_node_t *a, const yaml_node_t *b)
{
    return a->type == YAML_SCALAR_NODE && b->type == YAML_SCALAR_NODE && a->data.scalar.length == b->data.scalar.length &&
           memcmp(a->data.scalar.value, b->data.scalar.value, a->data.scalar.length) == 0;
}

/* Whether mapping m has a pair whose key equals key (other than merge keys). */
static bool mapping_has_key(const recipe_parser *p, const yaml_node_t *m, const yaml_node_t *key)
{
    for (const yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        if (!is_merge_key(k) && scalar_equal(k, key))
            return true;
    }
    return false;
}

/* Whether mapping m still holds a merge key. */
static bool has_merge_key(const recipe_parser *p, const yaml_node_t *m)
{
    for (const yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++)
        if (is_merge_key(rp_node(p, pr->key)))
            return true;
    return false;
}

/* Appends to mapping `target` (a node index) every pair of mapping src whose
 * key target does not have yet: explicit keys and earlier sources win, as
 * in YAML's merge key type (PyYAML, and so mergekit, reads it so). */
static int merge_pairs(recipe_parser *p, int target, const yaml_node_t *src)
{
    for (const yaml_node_pair_t *pr = src->data.mapping.pairs.start; pr < src->data.mapping.pairs.top; pr++) {
        int k = pr->key, v = pr->value;
        if (mapping_has_key(p, rp_node(p, target), rp_node(p, k)))
            continue;
        if (!yaml_document_append_mapping_pair(p->doc, target, k, v))
            return rp_nomem(p);
    }
    return 0;
}

/* Expands mapping node `index`'s merge keys (`<<: *anchor` or a list of
 * them) once their sources hold none. Returns 1 when it expanded one, 0
 * when it must wait for a source, -1 with the error set. */
static int expand_one(recipe_parser *p, int index)
{
    yaml_node_t *m = rp_node(p, index);
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        const yaml_node_t *k = rp_node(p, pr->key), *v = rp_node(p, pr->value);
        if (!is_merge_key(k))
            continue;
        const yaml_node_item_t *items = v->type == YAML_SEQUENCE_NODE ? v->data.sequence.items.start : NULL;
        size_t n = items ? (size_t)(v->data.sequence.items.top - items) : 1;
        for (size_t i = 0; i < n; i++) {
            const yaml_node_t *src = items ? rp_node(p, items[i]) : v;
            if (src->type != YAML_MAPPING_NODE)
                return rp_fail(p, node_line(k), "the value of '<<' must be a mapping (an alias of one) or a list "
                                                "of them");
            if (has_merge_key(p, src))
                return 0;
        }
        yaml_node_pair_t merge = *pr; /* out of the list first: appending may move it */
        m->data.mapping.pairs.top--;
        memmove(pr, pr + 1, (size_t)(m->data.mapping.pairs.top - pr) * sizeof *pr);
        const yaml_node_t *mv = rp_node(p, merge.value);
        items = mv->type == YAML_SEQUENCE_NODE ? mv->data.sequence.items.start : NULL;
        for (size_t i = 0; i < n; i++)
            if (merge_pairs(p, index, items ? rp_node(p, items[i]) : mv) < 0)
                return -1;
        return 1;
    }
    return 0;
}

/* Every mapping's merge keys, sources first (an anchor is defined before
 * its aliases, so the passes end). Returns 0 or -1 with the error set. */
static int rp_expand_merge_keys(recipe_parser *p)
{
    int n_nodes = (int)(p->doc->nodes.top - p->doc->nodes.start);
    for (bool again = true; again;) {
        again = false;
        for (int i = 1; i <= n_nodes; i++) {
            yaml_node_t *m = rp_node(p, i);
            if (m->type != YAML_MAPPING_NODE || !has_merge_key(p, m))
                continue;
            int rc = expand_one(p, i);
            if (rc < 0)
                return -1;
            again = again || rc > 0;
        }
    }
    for (int i = 1; i <= n_nodes; i++) {
        const yaml_node_t *m = rp_node(p, i);
        if (m->type == YAML_MAPPING_NODE && has_merge_key(p, m))
            return rp_fail(p, node_line(m), "a '<<' merge key refers back to its own mapping");
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Paths                                                                     */

static int rp_missing(const recipe_parser *p, unsigned line, const char *what, const char *text)
{
    if (text[0] == '~') /* a shell expands it; YAML and mergestream do not */
        return rp_fail(p, line, "%s path '%s' does not exist: '~' is not expanded in a recipe (write the path "
                                "out, or relative to the recipe's folder)",
                       what, text);
    if (looks_like_hub_id(text))
        return rp_fail(p, line,
                       "%s '%s' is not a local path; mergestream does not download models "
                       "(hub ids are not supported)",
                       what, text);
    return rp_fail(p, line, "%s path '%s' does not exist", what, text);
}

/* Resolves one path part; *out owned by the caller. */
static int rp_existing(const recipe_parser *p, unsigned line, const char *what, const char *text,
                       char **out)
{
    *out = NULL;
    if (!*text)
        return rp_fail(p, line, "%s is an empty path", what);
    char *full = rp_join(p, text);
    if (!full)
        return rp_nomem(p);
    if (!path_exists(full)) {
        free(full);
        return rp_missing(p, line, what, text);
    }
    *out = full;
    return 0;
}

/* A model string: "PATH" or "DIR+ADAPTER" (the latter only when the whole
 * string is not an existing path and has exactly one '+'). what is the key
 * for messages ("model", "base_model", "tokenizer_source"). On success the
 * three outputs are owned by the caller (*adapter NULL without an adapter). */
static int rp_model_path(const recipe_parser *p, const yaml_node_t *n, const char *what,
                         bool allow_adapter, char **name, char **path, char **adapter)
{
    *name = *path = *adapter = NULL;
    const char *text = NULL;
    char *base_part = NULL;
    unsigned line = node_line(n);

    if (n->type == YAML_MAPPING_NODE)
        return rp_fail(p, line,
                       "%s must be a path string (mergekit's nested {model: {path: ...}} "
                       "forms are not supported)",
                       what);
    if (n->type != YAML_SCALAR_NODE)
        return rp_fail(p, line, "%s must be a path string", what);
    if (rp_string(p, n, what, &text) < 0)
        return -1;
    if (!*text)
        return rp_fail(p, line, "%s is an empty path", what);

    *name = strdup(text);
    char *whole = rp_join(p, text);
    if (!*name || !whole) {
        free(whole);
        rp_nomem(p);
        goto fail;
    }
    if (path_exists(whole)) {
        *path = whole;
        return 0;
    }
    free(whole);

    const char *plus = strchr(text, '+');
    if (!allow_adapter || !plus || strchr(plus + 1, '+')) {
        rp_missing(p, line, what, text);
        goto fail;
    }
    base_part = strndup(text, (size_t)(plus - text));
    if (!base_part) {
        rp_nomem(p);
        goto fail;
    }
    if (!*base_part || !plus[1]) {
        rp_fail(p, line, "%s '%s': DIR+ADAPTER needs a directory before and an adapter after '+'",
                what, text);
        goto fail;
    }
    if (rp_existing(p, line, what, base_part, path) < 0)
        goto fail;
    {
        char *full = rp_join(p, plus + 1);
        if (!full) {
            rp_nomem(p);
            goto fail;
        }
        if (!path_exists(full)) {
            free(full);
            rp_fail(p, line, "adapter path '%s' (in %s '%s') does not exist", plus + 1, what, text);
            goto fail;
        }
        *adapter = full;
    }
    free(base_part);
    return 0;

fail:
    free(base_part);
    free(*name);
    free(*path);
    free(*adapter);
    *name = *path = *adapter = NULL;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Parameter values                                                          */

/* One number or bool literal for parameter pi; where names the map ("parameters"). */
static int rp_literal(const recipe_parser *p, const yaml_node_t *n, const ms_param_info *pi,
                      const char *where, double *out)
{
    unsigned line = node_line(n);
    if (n->type != YAML_SCALAR_NODE)
        return rp_fail(p, line, "'%s' in %s: expected %s", pi->name, where,
                       pi->type == MS_PARAM_TYPE_BOOL ? "true or false" : "a number");
    if (node_is_null(n))
        return rp_fail(p, line, "'%s' in %s has no value", pi->name, where);
    const char *s = scalar_text(n);
    if (pi->type == MS_PARAM_TYPE_BOOL) {
        bool b;
        if (!text_bool(s, &b))
            return rp_fail(p, line, "'%s' in %s must be true or false, not '%s'", pi->name, where, s);
        *out = b ? 1.0 : 0.0;
        return 0;
    }
    if (pi->type == MS_PARAM_TYPE_INT && !text_is_integer(s))
        return rp_fail(p, line, "'%s' in %s must be an integer, not '%s'", pi->name, where, s);
    if (!text_is_decimal(s))
        return rp_fail(p, line, "'%s' in %s must be a number, not '%s'", pi->name, where, s);
    double v = strtod(s, NULL);
    if (!isfinite(v))
        return rp_fail(p, line, "'%s' in %s must be a finite number, not '%s'", pi->name, where, s);
    if (!ms_param_in_range(pi, v))
        return rp_fail(p, line, "'%s' %s in %s is out of range: it must be in %s", pi->name, s,
                       where, pi->range);
    *out = v;
    return 0;
}

/* A scalar or a gradient (list of numbers) into v (v->points owned by v). */
static int rp_value(const recipe_parser *p, const yaml_node_t *n, const ms_param_info *pi,
                    const char *where, ms_recipe_value *v)
{
    v->line = node_line(n);
    if (n->type == YAML_SCALAR_NODE) {
        v->points = calloc(1, sizeof *v->points);
        if (!v->points)
            return rp_nomem(p);
        v->n_points = 1;
        v->is_gradient = false;
        return rp_literal(p, n, pi, where, &v->points[0]);
    }
    if (n->type == YAML_MAPPING_NODE)
        return rp_fail(p, v->line,
                       "'%s' in %s must be a scalar, a list of numbers (a gradient) or a list "
                       "of {filter, value} maps",
                       pi->name, where);
    if (pi->type != MS_PARAM_TYPE_NUMBER)
        return rp_fail(p, v->line,
                       "'%s' in %s takes %s; gradients (lists of numbers) are only "
                       "for numeric parameters",
                       pi->name, where, pi->type == MS_PARAM_TYPE_BOOL ? "true or false" : "an integer");
    const yaml_node_item_t *items = n->data.sequence.items.start;
    size_t count = (size_t)(n->data.sequence.items.top - items);
    if (count == 0)
        return rp_fail(p, v->line, "'%s' in %s is an empty list", pi->name, where);
    if (count > UINT32_MAX / 2)
        return rp_fail(p, v->line, "'%s' in %s: the gradient is too long", pi->name, where);
    v->points = calloc(count, sizeof *v->points);
    if (!v->points)
        return rp_nomem(p);
    v->n_points = (unsigned)count;
    v->is_gradient = true;
    for (size_t i = 0; i < count; i++) {
        const yaml_node_t *item = rp_node(p, items[i]);
        if (item->type != YAML_SCALAR_NODE)
            return rp_fail(p, node_line(item),
                           "'%s' in %s: a gradient is a list of numbers; a list of "
                           "{filter, value} maps must contain only such maps",
                           pi->name, where);
        if (rp_literal(p, item, pi, where, &v->points[i]) < 0)
            return -1;
    }
    return 0;
}

/* One [{filter, value}] entry. */
static int rp_cond(const recipe_parser *p, const yaml_node_t *n, const ms_param_info *pi,
                   const char *where, unsigned index, ms_recipe_cond *c)
{
    c->line = node_line(n);
    if (n->type != YAML_MAPPING_NODE)
        return rp_fail(p, c->line,
                       "'%s' in %s: entry %u of a filter list must be a {filter, value} map",
                       pi->name, where, index);
    const yaml_node_t *value = NULL;
    unsigned value_line = 0;
    bool have_filter = false;
    for (const yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
         pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        const yaml_node_t *v = rp_node(p, pr->value);
        const char *key = NULL;
        if (k->type != YAML_SCALAR_NODE)
            return rp_fail(p, node_line(k), "keys in %s.%s[%u] must be strings", where, pi->name,
                           index);
        key = scalar_text(k);
        if (strcmp(key, "filter") == 0) {
            if (have_filter)
                return rp_fail(p, node_line(k), "duplicate key 'filter' in %s.%s[%u]", where,
                               pi->name, index);
            have_filter = true;
            if (node_is_null(v))
                continue; /* filter: null -> matches every tensor */
            const char *f = NULL;
            if (rp_string(p, v, "filter", &f) < 0)
                return -1;
            c->filter = strdup(f);
            if (!c->filter)
                return rp_nomem(p);
        } else if (strcmp(key, "value") == 0) {
            if (value)
                return rp_fail(p, node_line(k), "duplicate key 'value' in %s.%s[%u]", where,
                               pi->name, index);
            value = v;
            value_line = node_line(k);
        } else {
            return rp_fail(p, node_line(k), "unknown key '%s' in %s.%s[%u]", key, where, pi->name,
                           index);
        }
    }
    if (!value)
        return rp_fail(p, c->line, "'%s' in %s: entry %u of the filter list has no 'value'",
                       pi->name, where, index);
    if (node_is_null(value))
        return rp_fail(p, value_line, "'%s' in %s: entry %u of the filter list has no value",
                       pi->name, where, index);
    if (value->type == YAML_SEQUENCE_NODE && value->data.sequence.items.top >
                                                 value->data.sequence.items.start) {
        const yaml_node_t *first = rp_node(p, value->data.sequence.items.start[0]);
        if (first->type == YAML_MAPPING_NODE)
            return rp_fail(p, node_line(first),
                           "'%s' in %s: filter lists do not nest (a value is a scalar or a "
                           "gradient)",
                           pi->name, where);
    }
    return rp_value(p, value, pi, where, &c->value);
}

/* A parameter setting: scalar, gradient, or [{filter, value}] list. */
static int rp_setting(const recipe_parser *p, const yaml_node_t *n, const ms_param_info *pi,
                      const char *where, ms_recipe_param *out)
{
    if (n->type == YAML_SEQUENCE_NODE && n->data.sequence.items.top > n->data.sequence.items.start &&
        rp_node(p, n->data.sequence.items.start[0])->type == YAML_MAPPING_NODE) {
        const yaml_node_item_t *items = n->data.sequence.items.start;
        size_t count = (size_t)(n->data.sequence.items.top - items);
        if (count > UINT32_MAX / 2)
            return rp_fail(p, node_line(n), "'%s' in %s: the filter list is too long", pi->name,
                           where);
        out->conds = calloc(count, sizeof *out->conds);
        if (!out->conds)
            return rp_nomem(p);
        out->n_conds = (unsigned)count; /* set first: ms_recipe_free walks them all */
        for (size_t i = 0; i < count; i++)
            if (rp_cond(p, rp_node(p, items[i]), pi, where, (unsigned)i, &out->conds[i]) < 0)
                return -1;
        return 0;
    }
    if (n->type == YAML_MAPPING_NODE)
        return rp_fail(p, node_line(n),
                       "'%s' in %s must be a scalar, a list of numbers (a gradient) or a list "
                       "of {filter, value} maps (write a single {filter, value} map as a "
                       "one-entry list)",
                       pi->name, where);
    return rp_value(p, n, pi, where, &out->value);
}

/* `hessian: DIR` in a parameters map; m is the models entry (NULL at the top level). */
static int rp_hessian(const recipe_parser *p, const yaml_node_t *v, unsigned line, const char *where,
                      ms_recipe_model *m)
{
    ms_method method = p->r->method;
    if (method != MS_METHOD_TIES_SPARSEGPT && method != MS_METHOD_DARE_SPARSEGPT && method != MS_METHOD_REGMEAN)
        return rp_fail(p, line, "parameter 'hessian' in %s is not used by merge_method '%s'", where,
                       ms_method_name(method));
    if (!m)
        return rp_fail(p, line, "'hessian' in %s is a per-model parameter: set it in each models entry", where);
    if (m->hessian_path)
        return rp_fail(p, line, "duplicate key 'hessian' in %s", where);
    if (node_is_null(v))
        return rp_fail(p, line, "'hessian' in %s has no value", where);
    const char *text = NULL;
    if (rp_string(p, v, "hessian", &text) < 0)
        return -1;
    if (rp_existing(p, node_line(v), "hessian", text, &m->hessian_path) < 0)
        return -1;
    m->hessian_line = line;
    return 0;
}

/* A parameters map at the top level (m NULL) or in a models entry (m). */
static int rp_params(const recipe_parser *p, const yaml_node_t *n, const char *where,
                     ms_recipe_model *m, ms_recipe_param params[MS_PARAM_COUNT])
{
    bool model_level = m != NULL;
    if (node_is_null(n))
        return 0;
    if (n->type != YAML_MAPPING_NODE)
        return rp_fail(p, node_line(n), "%s must be a map of parameter names to values", where);
    ms_method method = p->r->method;
    for (const yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
         pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        const yaml_node_t *v = rp_node(p, pr->value);
        unsigned line = node_line(k);
        if (k->type != YAML_SCALAR_NODE)
            return rp_fail(p, line, "keys in %s must be strings", where);
        const char *key = scalar_text(k);
        if (strcmp(key, "hessian") == 0) {
            if (rp_hessian(p, v, line, where, m) < 0)
                return -1;
            continue;
        }
        ms_param_id id;
        if (!ms_param_lookup(key, &id))
            return rp_fail(p, line, "unknown key '%s' in %s", key, where);
        const ms_param_info *pi = ms_method_param_info(method, id);
        if (params[id].present)
            return rp_fail(p, line, "duplicate key '%s' in %s", key, where);
        /* A known parameter the method does not use: mergekit ignores it
         * without a word, and published recipes often carry such leftovers
         * (a density under task_arithmetic, a weight under slerp), so the
         * recipe runs as in mergekit, with a warning naming the line (an
         * unknown key, a typo, is an error above). */
        if (!ms_method_takes(method, id)) {
            ms_log_warn("%s:%u: parameter '%s' in %s is not used by merge_method '%s': ignored", p->path,
                        line, key, where, ms_method_name(method));
            continue;
        }
        if (model_level && pi->scope == MS_PARAM_SCOPE_GLOBAL)
            return rp_fail(p, line,
                           "'%s' in %s is a global parameter: set it in the top-level parameters",
                           key, where);
        params[id].present = true;
        params[id].line = line;
        if (node_is_null(v)) /* an empty value's mark is wherever the next token is: use the key's */
            return rp_fail(p, line, "'%s' in %s has no value", key, where);
        if (rp_setting(p, v, pi, where, &params[id]) < 0)
            return -1;
    }
    return 0;
}

static bool params_any(const ms_recipe_param params[MS_PARAM_COUNT])
{
    for (unsigned i = 0; i < MS_PARAM_COUNT; i++)
        if (params[i].present)
            return true;
    return false;
}

/* ------------------------------------------------------------------------ */
/* Freeing                                                                   */

static void recipe_value_clear(ms_recipe_value *v)
{
    free(v->points);
    v->points = NULL;
    v->n_points = 0;
}

static void recipe_params_clear(ms_recipe_param params[MS_PARAM_COUNT])
{
    for (unsigned i = 0; i < MS_PARAM_COUNT; i++) {
        recipe_value_clear(&params[i].value);
        for (unsigned c = 0; c < params[i].n_conds; c++) {
            free(params[i].conds[c].filter);
            recipe_value_clear(&params[i].conds[c].value);
        }
        free(params[i].conds);
        memset(&params[i], 0, sizeof params[i]);
    }
}

static void recipe_model_clear(ms_recipe_model *m)
{
    free(m->name);
    free(m->path);
    free(m->adapter_path);
    free(m->hessian_path);
    recipe_params_clear(m->params);
    memset(m, 0, sizeof *m);
}

void ms_recipe_free(ms_recipe *r)
{
    if (!r)
        return;
    for (unsigned i = 0; i < r->n_models; i++)
        recipe_model_clear(&r->models[i]);
    free(r->models);
    for (unsigned s = 0; s < r->n_slices; s++) {
        recipe_params_clear(r->slices[s].params);
        free(r->slices[s].base_name);
        free(r->slices[s].base_path);
        free(r->slices[s].base_adapter_path);
    }
    free(r->slices);
    recipe_params_clear(r->params);
    free(r->source_path);
    free(r->text);
    free(r->base_name);
    free(r->base_path);
    free(r->base_adapter_path);
    free(r->tokenizer_source);
    free(r);
}

/* ------------------------------------------------------------------------ */
/* Top-level keys                                                            */

enum recipe_key {
    KEY_MERGE_METHOD,
    KEY_BASE_MODEL,
    KEY_MODELS,
    KEY_PARAMETERS,
    KEY_DTYPE,
    KEY_OUT_DTYPE,
    KEY_TOKENIZER_SOURCE,
    KEY_RANDOM_SEED,
    KEY_NAME,
    KEY_CHAT_TEMPLATE,
    KEY_TOKENIZER, /* mergekit keys we refuse, with a reason */
    KEY_SLICES,
    KEY_MODULES,
    KEY_COUNT
};

static const char *const k_keys[KEY_COUNT] = {
    [KEY_MERGE_METHOD] = "merge_method", [KEY_BASE_MODEL] = "base_model",
    [KEY_MODELS] = "models",             [KEY_PARAMETERS] = "parameters",
    [KEY_DTYPE] = "dtype",               [KEY_OUT_DTYPE] = "out_dtype",
    [KEY_TOKENIZER_SOURCE] = "tokenizer_source", [KEY_RANDOM_SEED] = "random_seed",
    [KEY_NAME] = "name",                 [KEY_CHAT_TEMPLATE] = "chat_template",
    [KEY_TOKENIZER] = "tokenizer",       [KEY_SLICES] = "slices",
    [KEY_MODULES] = "modules",
};

static int rp_method(recipe_parser *p, const yaml_node_t *n)
{
    const char *name = NULL;
    if (rp_string(p, n, "merge_method", &name) < 0)
        return -1;
    switch (ms_method_lookup(name, &p->r->method)) {
    case MS_METHOD_FOUND:
        return 0;
    case MS_METHOD_UNSUPPORTED:
        return rp_fail(p, node_line(n), "merge_method '%s' is not supported yet (supported: %s)",
                       name, ms_method_names());
    case MS_METHOD_UNKNOWN:
        break;
    }
    return rp_fail(p, node_line(n), "unknown merge_method '%s' (known: %s)", name,
                   ms_method_names());
}

static int rp_dtype(const recipe_parser *p, const yaml_node_t *n, const char *key, st_dtype *out)
{
    const char *s = NULL;
    if (rp_string(p, n, key, &s) < 0)
        return -1;
    if (strcmp(s, "bfloat16") == 0)
        *out = ST_BF16;
    else if (strcmp(s, "float16") == 0)
        *out = ST_F16;
    else if (strcmp(s, "float32") == 0)
        *out = ST_F32;
    else
        return rp_fail(p, node_line(n), "%s '%s' is not supported (use bfloat16, float16 or float32)",
                       key, s);
    return 0;
}

static int rp_seed(const recipe_parser *p, const yaml_node_t *n)
{
    const char *s = NULL;
    if (rp_string(p, n, "random_seed", &s) < 0)
        return -1;
    const char *d = s[0] == '+' ? s + 1 : s;
    if (!*d)
        return rp_fail(p, node_line(n), "random_seed must be a non-negative integer, not '%s'", s);
    uint64_t v = 0;
    for (; *d; d++) {
        if (!isdigit((unsigned char)*d))
            return rp_fail(p, node_line(n), "random_seed must be a non-negative integer, not '%s'",
                           s);
        unsigned digit = (unsigned)(*d - '0');
        if (v > (UINT64_MAX - digit) / 10)
            return rp_fail(p, node_line(n), "random_seed '%s' does not fit in 64 bits", s);
        v = v * 10 + digit;
    }
    p->r->random_seed = v;
    p->r->has_random_seed = true;
    return 0;
}

static int rp_tokenizer_source(recipe_parser *p, const yaml_node_t *n)
{
    const char *s = NULL;
    if (n->type == YAML_SCALAR_NODE) {
        if (rp_string(p, n, "tokenizer_source", &s) < 0)
            return -1;
        if (strcmp(s, "base") == 0)
            return 0;
        if (strcmp(s, "union") == 0)
            return rp_fail(p, node_line(n),
                           "tokenizer_source 'union' is not supported (use base or a model path)");
    }
    char *name = NULL, *adapter = NULL;
    if (rp_model_path(p, n, "tokenizer_source", false, &name, &p->r->tokenizer_source, &adapter) < 0)
        return -1;
    free(name);
    MS_ASSERT(!adapter);
    return 0;
}

/* One models[] entry into m (m->index set by the caller). */
static int rp_model_entry(recipe_parser *p, const yaml_node_t *n, ms_recipe_model *m,
                          bool *has_params)
{
    char where[64];
    m->line = node_line(n);
    *has_params = false;
    if (n->type != YAML_MAPPING_NODE)
        return rp_fail(p, m->line, "models[%u] must be a map with 'model' and optional 'parameters'",
                       m->index);
    const yaml_node_t *model = NULL, *params = NULL;
    unsigned model_line = 0;
    for (const yaml_node_pair_t *pr = n->data.mapping.pairs.start; pr < n->data.mapping.pairs.top;
         pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        if (k->type != YAML_SCALAR_NODE)
            return rp_fail(p, node_line(k), "keys in models[%u] must be strings", m->index);
        const char *key = scalar_text(k);
        const yaml_node_t **slot = NULL;
        if (strcmp(key, "model") == 0)
            slot = &model;
        else if (strcmp(key, "parameters") == 0)
            slot = &params;
        else
            return rp_fail(p, node_line(k), "unknown key '%s' in models[%u]", key, m->index);
        if (*slot)
            return rp_fail(p, node_line(k), "duplicate key '%s' in models[%u]", key, m->index);
        *slot = rp_node(p, pr->value);
        if (slot == &model)
            model_line = node_line(k);
    }
    if (!model)
        return rp_fail(p, m->line, "models[%u] has no 'model'", m->index);
    if (node_is_null(model)) /* an empty value's mark is wherever the next token is */
        return rp_fail(p, model_line, "model in models[%u] has no value", m->index);
    if (rp_model_path(p, model, "model", true, &m->name, &m->path, &m->adapter_path) < 0)
        return -1;
    if (params) {
        snprintf(where, sizeof where, "models[%u].parameters", m->index);
        if (rp_params(p, params, where, m, m->params) < 0)
            return -1;
        *has_params = params_any(m->params) || m->hessian_path;
    }
    return 0;
}

/* key_line: the line of the `models` key (a block list's node starts at its first item). */
static int rp_models(recipe_parser *p, const yaml_node_t *n, unsigned key_line)
{
    ms_recipe *r = p->r;
    const ms_method_info *mi = ms_method_info_get(r->method);
    if (n->type != YAML_SEQUENCE_NODE)
        return rp_fail(p, key_line, "models must be a list of {model, parameters} entries");
    const yaml_node_item_t *items = n->data.sequence.items.start;
    size_t count = (size_t)(n->data.sequence.items.top - items);
    if (count == 0)
        return rp_fail(p, key_line, "models is empty");
    /* The base may be listed once on top of the MS_MAX_MODELS merged models. */
    if (count > MS_MAX_MODELS + 1u)
        return rp_fail(p, key_line, "models lists %zu models; at most %d can be merged", count,
                       MS_MAX_MODELS);
    r->models = calloc(count, sizeof *r->models);
    if (!r->models)
        return rp_nomem(p);

    for (size_t i = 0; i < count; i++) {
        const yaml_node_t *item = rp_node(p, items[i]);
        ms_recipe_model *m = &r->models[r->n_models];
        m->index = (unsigned)i;
        snprintf(m->label, sizeof m->label, "models[%zu]", i);
        r->n_models++; /* counted before filling, so ms_recipe_free sees partial entries */
        bool has_params = false;
        if (rp_model_entry(p, item, m, &has_params) < 0)
            return -1;

        if ((mi->needs_base || mi->optional_base) && r->base_path &&
            same_model(m->path, m->adapter_path, r->base_path, r->base_adapter_path)) {
            if (r->base_listed)
                return rp_fail(p, m->line, "model '%s' (the base) is listed twice in models",
                               m->name);
            if (has_params) /* as mergekit: ignored */
                ms_log_warn("%s:%u: models[%u] ('%s') is the base model: merge_method '%s' ignores its "
                            "parameters",
                            p->path, m->line, m->index, m->name, ms_method_name(r->method));
            r->base_listed = true;
            recipe_model_clear(m);
            r->n_models--;
            continue;
        }
        for (unsigned j = 0; j + 1 < r->n_models; j++) {
            const ms_recipe_model *o = &r->models[j];
            if (same_model(m->path, m->adapter_path, o->path, o->adapter_path))
                return rp_fail(p, m->line, "model '%s' is listed twice (models[%u] and models[%u])",
                               m->name, o->index, m->index);
        }
    }
    if (r->n_models == 0)
        return rp_fail(p, key_line, "models lists no model to merge besides the base");
    if (r->n_models > MS_MAX_MODELS)
        return rp_fail(p, key_line, "models lists %u models; at most %d can be merged",
                       r->n_models, MS_MAX_MODELS);
    return 0;
}

/* The number of merged models (the base excluded) the method accepts;
 * key_line is the line of the models key. */
static int rp_model_count(const recipe_parser *p, unsigned key_line)
{
    const ms_recipe *r = p->r;
    const ms_method_info *mi = ms_method_info_get(r->method);
    unsigned lo, hi;
    ms_method_model_count(r->method, &lo, &hi);
    if (r->n_models >= lo && r->n_models <= hi)
        return 0;
    const char *besides = mi->needs_base ? " besides the base_model"
                          : r->base_path ? " besides the base_model"
                                         : "";
    if (lo == hi && lo == 1 && mi->needs_base)
        return rp_fail(p, key_line,
                       "merge_method '%s' merges exactly two models, one of them the base_model: models "
                       "lists %u%s",
                       mi->name, r->n_models, besides);
    if (lo == hi)
        return rp_fail(p, key_line, "merge_method '%s' merges exactly %u models%s%s: models lists %u%s", mi->name,
                       lo, mi->optional_base ? " (plus an optional base_model that is not one of them)" : "",
                       "", r->n_models, besides);
    return rp_fail(p, key_line, "merge_method '%s' needs at least %u models%s: models lists %u%s", mi->name, lo,
                   mi->needs_base ? " besides the base_model" : "", r->n_models, besides);
}

/* Walks the root mapping in a fixed order: merge_method first (everything
 * else is checked against it), the base before models (to spot it there). */
/* An unsigned integer scalar into *out; false for anything else. */
static bool scalar_uint(const yaml_node_t *n, unsigned *out)
{
    if (n->type != YAML_SCALAR_NODE || !isdigit((unsigned char)scalar_text(n)[0]))
        return false;
    char *end = NULL;
    unsigned long v = strtoul(scalar_text(n), &end, 10);
    if (*end || v > 1000000)
        return false;
    *out = (unsigned)v;
    return true;
}

/* One source of slices[si] (sources[j]) into m: model, layer_range,
 * parameters. *has_params: it set a parameter. */
static int rp_slice_source(recipe_parser *p, const yaml_node_t *src, size_t si, size_t j, ms_recipe_model *m,
                           bool *has_params)
{
    *has_params = false;
    snprintf(m->label, sizeof m->label, "slices[%zu].sources[%zu]", si, j);
    m->index = (unsigned)j;
    m->slice = (unsigned)si;
    m->line = node_line(src);
    if (src->type != YAML_MAPPING_NODE)
        return rp_fail(p, m->line, "%s must be a map with model, layer_range and optional parameters", m->label);
    const yaml_node_t *model = NULL, *range = NULL, *params = NULL;
    for (const yaml_node_pair_t *pr = src->data.mapping.pairs.start; pr < src->data.mapping.pairs.top; pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        const char *key = k->type == YAML_SCALAR_NODE ? scalar_text(k) : "?";
        const yaml_node_t **slot = NULL;
        if (strcmp(key, "model") == 0)
            slot = &model;
        else if (strcmp(key, "layer_range") == 0)
            slot = &range;
        else if (strcmp(key, "parameters") == 0)
            slot = &params;
        else
            return rp_fail(p, node_line(k), "unknown key '%s' in %s", key, m->label);
        if (*slot)
            return rp_fail(p, node_line(k), "duplicate key '%s' in %s", key, m->label);
        *slot = rp_node(p, pr->value);
    }
    if (!model || node_is_null(model))
        return rp_fail(p, m->line, "%s has no model", m->label);
    if (rp_model_path(p, model, "model", true, &m->name, &m->path, &m->adapter_path) < 0)
        return -1;
    unsigned a, b;
    if (!range || range->type != YAML_SEQUENCE_NODE ||
        range->data.sequence.items.top - range->data.sequence.items.start != 2 ||
        !scalar_uint(rp_node(p, range->data.sequence.items.start[0]), &a) ||
        !scalar_uint(rp_node(p, range->data.sequence.items.start[1]), &b) || a >= b)
        return rp_fail(p, range ? node_line(range) : m->line, "%s.layer_range must be [first, end) with first < end",
                       m->label);
    m->has_layer_range = true;
    m->layer_begin = a;
    m->layer_end = b;
    if (params) {
        char where[80];
        snprintf(where, sizeof where, "%s.parameters", m->label);
        if (rp_params(p, params, where, m, m->params) < 0)
            return -1;
        *has_params = params_any(m->params) || m->hessian_path;
    }
    return 0;
}

/* The merged-source count of slice sl against the method's (as
 * rp_model_count does for models). */
static int rp_slice_count(const recipe_parser *p, const ms_recipe_slice *sl)
{
    const ms_method_info *mi = ms_method_info_get(p->r->method);
    unsigned lo, hi;
    ms_method_model_count(p->r->method, &lo, &hi);
    if (sl->n_models >= lo && sl->n_models <= hi)
        return 0;
    const char *besides = sl->has_base ? " besides the base_model" : "";
    if (lo == hi)
        return rp_fail(p, sl->line, "merge_method '%s' merges exactly %u model%s%s in each slice: slices[%u] lists %u",
                       mi->name, lo, lo == 1 ? "" : "s", besides, sl->index, sl->n_models);
    return rp_fail(p, sl->line, "merge_method '%s' needs %u to %u models%s in each slice: slices[%u] lists %u",
                   mi->name, lo, hi, besides, sl->index, sl->n_models);
}

/* slices[i].base_model into sl (n: the value, line: the key's). Only a
 * method that uses a base takes one; a base_model that is the top-level one
 * changes nothing. */
static int rp_slice_base(recipe_parser *p, const yaml_node_t *n, unsigned line, ms_recipe_slice *sl)
{
    const ms_recipe *r = p->r;
    const ms_method_info *mi = ms_method_info_get(r->method);
    char what[64];
    snprintf(what, sizeof what, "base_model in slices[%u]", sl->index);
    /* passthrough's optional base only supplies the non-layer tensors: nothing for a slice to override */
    if ((!mi->needs_base && !mi->optional_base) || r->method == MS_METHOD_PASSTHROUGH)
        return rp_fail(p, line,
                       "%s: merge_method '%s' does not use a base model (remove it%s)", what, mi->name,
                       r->method == MS_METHOD_LINEAR ? "; linear merges every source of the slice" : "");
    if (node_is_null(n))
        return rp_fail(p, line, "%s has no value", what);
    if (rp_model_path(p, n, what, true, &sl->base_name, &sl->base_path, &sl->base_adapter_path) < 0)
        return -1;
    sl->base_key_line = line;
    sl->base_override =
        !r->base_path || !same_model(sl->base_path, sl->base_adapter_path, r->base_path, r->base_adapter_path);
    return 0;
}

/* slices[i].residual_weight: mergekit's schema has it, its planner never
 * reads it. Accepted (a number, as mergekit's schema wants) with a warning,
 * so recipes written for mergekit load unchanged. */
static int rp_slice_residual_weight(const recipe_parser *p, const yaml_node_t *n, unsigned line, unsigned index)
{
    if (!node_is_null(n) && (n->type != YAML_SCALAR_NODE || !text_is_decimal(scalar_text(n))))
        return rp_fail(p, line, "residual_weight in slices[%u] must be a number", index);
    ms_log_warn("%s:%u: residual_weight in slices[%u] has no effect (mergekit accepts it but does not use it): "
                "ignored",
                p->path, line, index);
    return 0;
}

/* The keys of slices[sl->index] (a map): sources into *sources, and
 * mergekit's per-slice parameters, base_model and residual_weight into sl.
 * Anything else is an error naming the key and its line. */
static int rp_slice_keys(recipe_parser *p, const yaml_node_t *slice, ms_recipe_slice *sl,
                         const yaml_node_t **sources)
{
    enum { SK_SOURCES, SK_PARAMETERS, SK_BASE_MODEL, SK_RESIDUAL_WEIGHT, SK_COUNT };
    static const char *const k_slice_keys[SK_COUNT] = {"sources", "parameters", "base_model", "residual_weight"};
    const yaml_node_t *nodes[SK_COUNT] = {0};
    unsigned lines[SK_COUNT] = {0};
    *sources = NULL;
    if (slice->type != YAML_MAPPING_NODE)
        return rp_fail(p, sl->line, "slices[%u] must be a map with sources (and optional parameters, base_model)",
                       sl->index);
    for (const yaml_node_pair_t *pr = slice->data.mapping.pairs.start; pr < slice->data.mapping.pairs.top; pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        const char *key = k->type == YAML_SCALAR_NODE ? scalar_text(k) : "?";
        unsigned id = 0;
        while (id < SK_COUNT && strcmp(key, k_slice_keys[id]) != 0)
            id++;
        if (id == SK_COUNT)
            return rp_fail(p, node_line(k),
                           "unknown key '%s' in slices[%u] (expected sources, parameters, base_model or "
                           "residual_weight)",
                           key, sl->index);
        if (nodes[id])
            return rp_fail(p, node_line(k), "duplicate key '%s' in slices[%u]", key, sl->index);
        nodes[id] = rp_node(p, pr->value);
        lines[id] = node_line(k);
    }
    if (nodes[SK_BASE_MODEL] && rp_slice_base(p, nodes[SK_BASE_MODEL], lines[SK_BASE_MODEL], sl) < 0)
        return -1;
    if (nodes[SK_PARAMETERS]) {
        char where[64];
        snprintf(where, sizeof where, "slices[%u].parameters", sl->index);
        /* m = NULL: both per-model (weight, density, ...) and global (t,
         * lambda, ...) parameters may be set per slice, as in mergekit */
        if (rp_params(p, nodes[SK_PARAMETERS], where, NULL, sl->params) < 0)
            return -1;
    }
    if (nodes[SK_RESIDUAL_WEIGHT] &&
        rp_slice_residual_weight(p, nodes[SK_RESIDUAL_WEIGHT], lines[SK_RESIDUAL_WEIGHT], sl->index) < 0)
        return -1;
    *sources = nodes[SK_SOURCES];
    return 0;
}

/* slices: [{sources: [{model, layer_range: [a, b], parameters}], parameters,
 * base_model, residual_weight}] (recipe.h). The merged sources go to
 * r->models slice by slice; a source that is the slice's base (its own
 * base_model, else the top-level one; for a method that uses the base)
 * becomes the slice's base. */
static int rp_slices(recipe_parser *p, const yaml_node_t *n, unsigned key_line)
{
    ms_recipe *r = p->r;
    const ms_method_info *mi = ms_method_info_get(r->method);
    if (n->type != YAML_SEQUENCE_NODE)
        return rp_fail(p, key_line, "slices must be a list of {sources: [...]} entries");
    const yaml_node_item_t *items = n->data.sequence.items.start;
    size_t count = (size_t)(n->data.sequence.items.top - items);
    if (count == 0)
        return rp_fail(p, key_line, "slices is empty");
    if (count > MS_MAX_MODELS)
        return rp_fail(p, key_line, "slices lists %zu slices; at most %d are supported", count, MS_MAX_MODELS);
    size_t total = 0; /* sources of all slices: r->models' capacity */
    for (size_t i = 0; i < count; i++) {
        const yaml_node_t *slice = rp_node(p, items[i]);
        if (slice->type != YAML_MAPPING_NODE)
            continue;
        for (const yaml_node_pair_t *pr = slice->data.mapping.pairs.start; pr < slice->data.mapping.pairs.top; pr++) {
            const yaml_node_t *v = rp_node(p, pr->value);
            if (v->type == YAML_SEQUENCE_NODE)
                total += (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
        }
    }
    r->slices = calloc(count, sizeof *r->slices);
    r->models = calloc(total ? total : 1, sizeof *r->models);
    if (!r->slices || !r->models)
        return rp_nomem(p);
    r->has_slices = true;
    for (size_t i = 0; i < count; i++) {
        const yaml_node_t *slice = rp_node(p, items[i]);
        ms_recipe_slice *sl = &r->slices[r->n_slices++];
        sl->index = (unsigned)i;
        sl->line = node_line(slice);
        sl->first_model = r->n_models;
        const yaml_node_t *sources = NULL;
        if (rp_slice_keys(p, slice, sl, &sources) < 0)
            return -1;
        /* the slice's base: its own base_model, else the top-level one (mergekit's ConfigReader.base_model) */
        const char *base_name = sl->base_name ? sl->base_name : r->base_name;
        const char *base_path = sl->base_path ? sl->base_path : r->base_path;
        const char *base_adapter = sl->base_path ? sl->base_adapter_path : r->base_adapter_path;
        /* passthrough copies each slice's one source: a base takes no part */
        bool base_used = r->method != MS_METHOD_PASSTHROUGH && (mi->needs_base || (mi->optional_base && base_path));
        if (mi->needs_base && !base_path)
            return rp_fail(p, sl->line,
                           "slices[%zu] has no base_model: merge_method '%s' needs one (set base_model at the top "
                           "level or in this slice)",
                           i, mi->name);
        if (!sources || sources->type != YAML_SEQUENCE_NODE ||
            sources->data.sequence.items.top == sources->data.sequence.items.start)
            return rp_fail(p, sl->line, "slices[%zu] needs sources: a list of {model, layer_range}", i);
        size_t n_src = (size_t)(sources->data.sequence.items.top - sources->data.sequence.items.start);
        if (r->method == MS_METHOD_PASSTHROUGH && n_src > 1)
            return rp_fail(p, node_line(sources),
                           "slices[%zu] has several sources: passthrough copies one source per slice "
                           "(name a merge_method to merge them)",
                           i);
        unsigned span = 0;
        for (size_t j = 0; j < n_src; j++) {
            const yaml_node_t *src = rp_node(p, sources->data.sequence.items.start[j]);
            if (r->n_models >= total)
                return rp_fail(p, node_line(src), "slices list more than %zu sources", total);
            ms_recipe_model *m = &r->models[r->n_models];
            r->n_models++; /* counted before filling, so ms_recipe_free sees partial entries */
            bool has_params = false;
            if (rp_slice_source(p, src, i, j, m, &has_params) < 0)
                return -1;
            unsigned len = m->layer_end - m->layer_begin;
            if (j == 0)
                span = len;
            else if (len != span)
                return rp_fail(p, m->line,
                               "%s.layer_range [%u, %u) spans %u layer%s but sources[0]'s spans %u: every "
                               "source of a slice needs the same number of layers",
                               m->label, m->layer_begin, m->layer_end, len, len == 1 ? "" : "s", span);
            if (base_used && same_model(m->path, m->adapter_path, base_path, base_adapter)) {
                if (sl->has_base)
                    return rp_fail(p, m->line, "model '%s' (the base) is listed twice in slices[%zu]", m->name, i);
                if (has_params) /* as mergekit: ignored */
                    ms_log_warn("%s:%u: %s ('%s') is the base model: merge_method '%s' ignores its parameters",
                                p->path, m->line, m->label, m->name, ms_method_name(r->method));
                sl->has_base = true;
                sl->base_begin = m->layer_begin;
                sl->base_end = m->layer_end;
                sl->base_line = m->line;
                r->base_listed = true;
                recipe_model_clear(m);
                r->n_models--;
                continue;
            }
            for (unsigned o = sl->first_model; o + 1 < r->n_models; o++)
                if (same_model(m->path, m->adapter_path, r->models[o].path, r->models[o].adapter_path))
                    return rp_fail(p, m->line, "model '%s' is listed twice in slices[%zu] (%s and %s)", m->name,
                                   i, r->models[o].label, m->label);
        }
        sl->n_models = r->n_models - sl->first_model;
        sl->n_layers = span;
        if (base_used && !sl->has_base)
            return rp_fail(p, sl->line,
                           "slices[%zu] does not list the base_model '%s' among its sources: merge_method '%s' "
                           "takes each layer's base from the slice's sources (add it with a layer_range of %u "
                           "layer%s)",
                           i, base_name, mi->name, span, span == 1 ? "" : "s");
        if (rp_slice_count(p, sl) < 0)
            return -1;
    }
    if (r->n_models > MS_MAX_MODELS)
        return rp_fail(p, key_line, "slices list %u sources to merge; at most %d are supported", r->n_models,
                       MS_MAX_MODELS);
    return 0;
}

static int rp_root(recipe_parser *p, const yaml_node_t *root)
{
    ms_recipe *r = p->r;
    const yaml_node_t *nodes[KEY_COUNT] = {0};
    unsigned lines[KEY_COUNT] = {0};

    if (root->type != YAML_MAPPING_NODE)
        return rp_fail(p, node_line(root), "the recipe must be a map of keys (merge_method, models, ...)");
    for (const yaml_node_pair_t *pr = root->data.mapping.pairs.start;
         pr < root->data.mapping.pairs.top; pr++) {
        const yaml_node_t *k = rp_node(p, pr->key);
        if (k->type != YAML_SCALAR_NODE)
            return rp_fail(p, node_line(k), "top-level keys must be strings");
        const char *key = scalar_text(k);
        unsigned id = 0;
        while (id < KEY_COUNT && strcmp(key, k_keys[id]) != 0)
            id++;
        if (id == KEY_COUNT)
            return rp_fail(p, node_line(k), "unknown key '%s' at the top level", key);
        if (nodes[id])
            return rp_fail(p, node_line(k), "duplicate key '%s' (first at line %u)", key, lines[id]);
        if (id == KEY_TOKENIZER)
            return rp_fail(p, node_line(k),
                           "key 'tokenizer' is not supported: mergestream does not build merged "
                           "tokenizers (use tokenizer_source: base or a model path)");
        if (id == KEY_MODULES)
            return rp_fail(p, node_line(k),
                           "key '%s' is not supported: list whole models under 'models'", key);
        nodes[id] = rp_node(p, pr->value);
        lines[id] = node_line(k);
    }

    if (!nodes[KEY_MERGE_METHOD] || node_is_null(nodes[KEY_MERGE_METHOD]))
        return rp_fail(p, lines[KEY_MERGE_METHOD] ? lines[KEY_MERGE_METHOD] : node_line(root),
                       "missing merge_method (one of: %s)", ms_method_names());
    r->method_line = lines[KEY_MERGE_METHOD];
    if (rp_method(p, nodes[KEY_MERGE_METHOD]) < 0)
        return -1;
    const ms_method_info *mi = ms_method_info_get(r->method);

    if (nodes[KEY_BASE_MODEL] && !node_is_null(nodes[KEY_BASE_MODEL])) {
        r->base_line = lines[KEY_BASE_MODEL];
        if (rp_model_path(p, nodes[KEY_BASE_MODEL], "base_model", true, &r->base_name,
                          &r->base_path, &r->base_adapter_path) < 0)
            return -1;
    } else if (mi->needs_base && !nodes[KEY_SLICES]) { /* slices: each may name its own (rp_slices) */
        return rp_fail(p, r->method_line, "merge_method '%s' needs a base_model", mi->name);
    }

    if (nodes[KEY_PARAMETERS] &&
        rp_params(p, nodes[KEY_PARAMETERS], "parameters", NULL, r->params) < 0)
        return -1;

    if (nodes[KEY_SLICES] && (r->method == MS_METHOD_TIES_SPARSEGPT || r->method == MS_METHOD_DARE_SPARSEGPT ||
                              r->method == MS_METHOD_REGMEAN))
        return rp_fail(p, lines[KEY_SLICES],
                       "slices are not supported with merge_method '%s' (its Hessians are keyed by each "
                       "model's own layer names): list whole models under 'models'",
                       mi->name);
    if (nodes[KEY_SLICES] && nodes[KEY_MODELS])
        return rp_fail(p, lines[KEY_SLICES], "give either slices or models, not both");
    if (nodes[KEY_SLICES]) {
        if (rp_slices(p, nodes[KEY_SLICES], lines[KEY_SLICES]) < 0)
            return -1;
        if (r->method == MS_METHOD_PASSTHROUGH && r->base_path)
            ms_log_warn("%s:%u: base_model takes no part in a passthrough of slices: as in mergekit, the embeddings "
                        "come from the first slice's source and the final norm and lm_head from the last one's",
                        p->path, r->base_line);
    } else {
        if (!nodes[KEY_MODELS] || node_is_null(nodes[KEY_MODELS]))
            return rp_fail(p, lines[KEY_MODELS] ? lines[KEY_MODELS] : node_line(root),
                           "missing models (a list of {model, parameters} entries)");
        if (rp_models(p, nodes[KEY_MODELS], lines[KEY_MODELS]) < 0)
            return -1;
        if (r->method == MS_METHOD_PASSTHROUGH && r->n_models != 1)
            return rp_fail(p, lines[KEY_MODELS],
                           "passthrough copies one model: list exactly one under models, or use slices");
    }

    if (!r->has_slices && rp_model_count(p, lines[KEY_MODELS]) < 0) /* slices: counted per slice */
        return -1;
    for (unsigned id = 0; id < MS_PARAM_COUNT; id++) {
        if (!(mi->required & (1u << id)) || r->params[id].present)
            continue;
        const char *name = ms_param_info_get((ms_param_id)id)->name;
        if (!r->has_slices)
            return rp_fail(p, r->method_line, "merge_method '%s' needs parameter '%s' in the top-level parameters",
                           mi->name, name);
        for (unsigned s = 0; s < r->n_slices; s++) /* mergekit: a slice's parameters, then the top level's */
            if (!r->slices[s].params[id].present)
                return rp_fail(p, r->slices[s].line,
                               "merge_method '%s' needs parameter '%s': set it in the top-level parameters or in "
                               "slices[%u].parameters",
                               mi->name, name, s);
    }
    for (unsigned i = 0; i < r->n_models && ms_method_takes(r->method, MS_PARAM_WEIGHT); i++) {
        const ms_recipe_model *m = &r->models[i];
        bool in_slice = r->has_slices && r->slices[m->slice].params[MS_PARAM_WEIGHT].present;
        if (!m->params[MS_PARAM_WEIGHT].present && !in_slice && !r->params[MS_PARAM_WEIGHT].present)
            return rp_fail(p, m->line,
                           "%s ('%s') has no weight: set 'weight' in its parameters%s or "
                           "in the top-level parameters",
                           m->label, m->name, r->has_slices ? ", in its slice's parameters" : "");
    }

    if (nodes[KEY_DTYPE] && !node_is_null(nodes[KEY_DTYPE])) {
        if (rp_dtype(p, nodes[KEY_DTYPE], "dtype", &r->dtype) < 0)
            return -1;
        r->has_dtype = true;
    }
    if (nodes[KEY_OUT_DTYPE] && !node_is_null(nodes[KEY_OUT_DTYPE])) {
        if (rp_dtype(p, nodes[KEY_OUT_DTYPE], "out_dtype", &r->out_dtype) < 0)
            return -1;
        r->has_out_dtype = true;
    }
    if (nodes[KEY_TOKENIZER_SOURCE] && !node_is_null(nodes[KEY_TOKENIZER_SOURCE]) &&
        rp_tokenizer_source(p, nodes[KEY_TOKENIZER_SOURCE]) < 0)
        return -1;
    if (nodes[KEY_RANDOM_SEED] && !node_is_null(nodes[KEY_RANDOM_SEED]) &&
        rp_seed(p, nodes[KEY_RANDOM_SEED]) < 0)
        return -1;
    if (nodes[KEY_CHAT_TEMPLATE] && !node_is_null(nodes[KEY_CHAT_TEMPLATE]))
        ms_log_warn("%s:%u: chat_template is ignored (the tokenizer files are copied from the "
                    "base or tokenizer_source)",
                    p->path, lines[KEY_CHAT_TEMPLATE]);
    /* `name` is accepted and ignored, whatever its value. */

    return ms_recipe_check_constants(r, p->err);
}

/* ------------------------------------------------------------------------ */
/* Reading and YAML                                                          */

static int recipe_read_file(const char *path, char **text, size_t *len, ms_error *err)
{
    *text = NULL;
    *len = 0;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) /* a recipe path that is wrong is the command line's mistake (exit 2), a disk error a runtime one */
        return ms_error_errno(err, errno == ENOENT || errno == ENOTDIR || errno == EACCES ? MS_EXIT_USAGE
                                                                                           : MS_EXIT_RUNTIME,
                              errno, path, "cannot open the recipe");
    for (;;) {
        if (n == cap) {
            if (cap >= RECIPE_MAX_BYTES) {
                ms_error_set(err, MS_EXIT_USAGE, path, "the recipe is larger than %u bytes",
                             RECIPE_MAX_BYTES);
                goto fail;
            }
            size_t ncap = cap ? cap * 2 : 4096;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) {
                ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "reading the recipe");
                goto fail;
            }
            buf = nb;
            cap = ncap;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                ms_error_errno(err, MS_EXIT_RUNTIME, errno ? errno : EIO, path,
                               "cannot read the recipe");
                goto fail;
            }
            break;
        }
    }
    fclose(f);
    if (!buf && !(buf = malloc(1)))
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "reading the recipe");
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return 0;

fail:
    fclose(f);
    free(buf);
    return -1;
}

/* The line of a libyaml failure; reader errors carry a byte offset only. */
static unsigned yaml_error_line(const yaml_parser_t *yp, const char *text, size_t len)
{
    if (yp->error != YAML_READER_ERROR)
        return (unsigned)yp->problem_mark.line + 1;
    unsigned line = 1;
    for (size_t i = 0; i < yp->problem_offset && i < len; i++)
        if (text[i] == '\n')
            line++;
    return line;
}

static int rp_yaml_error(const recipe_parser *p, const yaml_parser_t *yp, const char *text,
                         size_t len)
{
    if (yp->error == YAML_MEMORY_ERROR)
        return rp_nomem(p);
    const char *problem = yp->problem ? yp->problem : "malformed document";
    unsigned line = yaml_error_line(yp, text, len);
    if (yp->context)
        return rp_fail(p, line, "YAML error: %s (%s at line %u)", problem, yp->context,
                       (unsigned)yp->context_mark.line + 1);
    return rp_fail(p, line, "YAML error: %s", problem);
}

static char *recipe_dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return NULL;
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int ms_recipe_load(const char *path, ms_recipe **out, ms_error *err)
{
    *out = NULL;
    yaml_parser_t yp;
    yaml_document_t doc, extra;
    bool parser_ready = false, have_doc = false;
    recipe_parser p = {.path = path, .err = err};

    ms_recipe *r = calloc(1, sizeof *r);
    if (!r)
        return ms_error_errno(err, MS_EXIT_RUNTIME, ENOMEM, path, "loading the recipe");
    p.r = r;
    r->source_path = strdup(path);
    if (!r->source_path) {
        rp_nomem(&p);
        goto fail;
    }
    if (strchr(path, '/')) {
        p.dir = recipe_dir_of(path);
        if (!p.dir) {
            rp_nomem(&p);
            goto fail;
        }
    }
    if (recipe_read_file(path, &r->text, &r->text_len, err) < 0)
        goto fail;

    if (!yaml_parser_initialize(&yp)) {
        rp_nomem(&p);
        goto fail;
    }
    parser_ready = true;
    yaml_parser_set_input_string(&yp, (const unsigned char *)r->text, r->text_len);
    /* yaml_parser_load frees the document itself when it fails. */
    if (!yaml_parser_load(&yp, &doc)) {
        rp_yaml_error(&p, &yp, r->text, r->text_len);
        goto fail;
    }
    have_doc = true;
    p.doc = &doc;
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        rp_fail(&p, 1, "the recipe is empty (expected merge_method, models, ...)");
        goto fail;
    }
    if (!yaml_parser_load(&yp, &extra)) {
        rp_yaml_error(&p, &yp, r->text, r->text_len);
        goto fail;
    }
    bool more = yaml_document_get_root_node(&extra) != NULL;
    unsigned extra_line = (unsigned)extra.start_mark.line + 1;
    yaml_document_delete(&extra);
    if (more) {
        rp_fail(&p, extra_line, "a recipe is one YAML document; found a second one");
        goto fail;
    }

    if (rp_expand_merge_keys(&p) < 0 || rp_root(&p, root) < 0)
        goto fail;

    yaml_document_delete(&doc);
    yaml_parser_delete(&yp);
    free(p.dir);
    *out = r;
    return 0;

fail:
    if (have_doc)
        yaml_document_delete(&doc);
    if (parser_ready)
        yaml_parser_delete(&yp);
    free(p.dir);
    ms_recipe_free(r);
    return -1;
}
