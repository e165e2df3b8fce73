#include "pipeline/output_dir.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io/atomic_file.h"
#include "io/peft_adapter.h"
#include "io/st_writer.h"
#include "pipeline/hessian_inputs.h"
#include "pipeline/manifest.h"

/* The tokenizer files a merge copies (from the layout model or tokenizer_source). */
static const char *const k_tokenizer_files[] = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
};

/* A file a merge writes: what --force removes before the new merge, so that
 * nothing of the previous one (a tokenizer file the new source lacks) is
 * left beside it. */
static bool is_merge_output_name(const char *name)
{
    if (strncmp(name, "model", 5) == 0 && strstr(name, ".safetensors") != NULL)
        return true;
    if (strcmp(name, MS_MANIFEST_NAME) == 0 || strcmp(name, "config.json") == 0 ||
        strcmp(name, "generation_config.json") == 0)
        return true;
    for (size_t i = 0; i < sizeof k_tokenizer_files / sizeof k_tokenizer_files[0]; i++)
        if (strcmp(name, k_tokenizer_files[i]) == 0)
            return true;
    return false;
}

/* The first entry of the open directory d other than . and .., or NULL. */
static const char *first_entry(DIR *d)
{
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            return e->d_name;
    return NULL;
}

static int refuse_not_empty(const char *dir, const char *entry, ms_error *err)
{
    return ms_error_set(err, MS_EXIT_USAGE, dir,
                        "output directory is not empty (holds '%s'); use --force to overwrite it, "
                        "or --resume to continue an interrupted merge", entry);
}

int ms_output_dir_check(const char *dir, bool allow_existing, ms_error *err)
{
    struct stat st;
    if (stat(dir, &st) != 0)
        return errno == ENOENT ? 0 : ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot access");
    if (!S_ISDIR(st.st_mode))
        return ms_error_set(err, MS_EXIT_USAGE, dir, "exists and is not a directory");
    if (allow_existing)
        return 0;
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot open the output directory");
    const char *entry = first_entry(d);
    int rc = entry ? refuse_not_empty(dir, entry, err) : 0;
    closedir(d);
    return rc;
}

int ms_output_dir_prepare(const char *dir, bool allow_existing, bool clear, bool *created, ms_error *err)
{
    *created = false;
    if (ms_mkdir_parents(dir, err) != 0)
        return -1;
    if (mkdir(dir, 0755) == 0) {
        *created = true;
        return 0;
    }
    if (errno != EEXIST)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot create the output directory");
    if (ms_output_dir_check(dir, allow_existing, err) != 0)
        return -1;
    if (!clear)
        return 0;
    DIR *d = opendir(dir);
    if (!d)
        return ms_error_errno(err, MS_EXIT_RUNTIME, errno, dir, "cannot open the output directory");
    int rc = 0;
    const char *name;
    while (rc == 0 && (name = first_entry(d)) != NULL) {
        if (!is_merge_output_name(name))
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (unlink(path) != 0 && errno != ENOENT)
            rc = ms_error_errno(err, MS_EXIT_RUNTIME, errno, path, "cannot remove");
    }
    closedir(d);
    return rc;
}

static int side_files_add(ms_side_files *w, const char *path)
{
    char **grown = realloc(w->paths, (w->n + 1) * sizeof *grown);
    if (!grown)
        return -1;
    w->paths = grown;
    if (!(w->paths[w->n] = strdup(path)))
        return -1;
    w->n++;
    return 0;
}

static const char *dtype_torch_name(st_dtype d)
{
    switch (d) {
    case ST_BF16: return "bfloat16";
    case ST_F16: return "float16";
    case ST_F32: return "float32";
    default: return NULL;
    }
}


/* The directory path lives in: path itself when it is a directory, else its dirname. */
static void dir_of_path(const char *path, char *out, size_t n)
{
    struct stat st;
    snprintf(out, n, "%s", path);
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return;
    char *slash = strrchr(out, '/');
    if (!slash)
        snprintf(out, n, ".");
    else if (slash == out)
        out[1] = '\0';
    else
        *slash = '\0';
}

/* -1 with err set when path's directory is out_real (a realpath). */
static int refuse_if_same(const char *out_dir, const char *out_real, const char *path, const char *what, ms_error *err)
{
    char d[PATH_MAX], real[PATH_MAX];
    dir_of_path(path, d, sizeof d);
    if (!realpath(d, real) || strcmp(real, out_real) != 0)
        return 0;
    return ms_error_set(err, MS_EXIT_USAGE, out_dir,
                        "the output directory holds an input (%s '%s'): writing there would overwrite it; "
                        "choose another -o", what, path);
}

int ms_output_dir_check_not_input(const char *dir, const ms_plan *plan, ms_error *err)
{
    char out_real[PATH_MAX];
    if (!realpath(dir, out_real))
        return 0; /* not there yet (or unreadable: preparing it will say so) */
    for (unsigned i = 0; i < ms_plan_input_count(plan); i++) {
        const ms_model *m = ms_plan_input_model(plan, i);
        if (m && refuse_if_same(dir, out_real, m->path, "model", err) != 0)
            return -1;
    }
    for (unsigned i = 0; i <= plan->n_models; i++) {
        if (plan->adapters[i] && refuse_if_same(dir, out_real, ms_peft_path(plan->adapters[i]), "adapter", err) != 0)
            return -1;
        if (plan->hessians[i] &&
            refuse_if_same(dir, out_real, ms_hessian_set_path(plan->hessians[i]), "Hessian set", err) != 0)
            return -1;
    }
    for (unsigned s = 0; s < plan->recipe->n_slices; s++)
        if (plan->slice_base_adapters[s] &&
            refuse_if_same(dir, out_real, ms_peft_path(plan->slice_base_adapters[s]), "adapter", err) != 0)
            return -1;
    const char *tok = plan->recipe->tokenizer_source;
    return tok ? refuse_if_same(dir, out_real, tok, "tokenizer_source", err) : 0;
}

static int write_config(const char *dir, const ms_plan *plan, ms_side_files *written, ms_error *err)
{
    if (!plan->layout->config || plan->layout->kind != MS_MODEL_KIND_DIR) {
        ms_log_warn("%s has no config.json: neither has the output (transformers needs one to load it)",
                    plan->layout->path);
        return 0;
    }
    cJSON *cfg = cJSON_Duplicate(plan->layout->config, true);
    const ms_recipe *r = plan->recipe;
    const char *dt = r->has_out_dtype ? dtype_torch_name(r->out_dtype)
                     : r->has_dtype   ? dtype_torch_name(r->dtype)
                                      : NULL;
    if (cfg && dt) {
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "torch_dtype");
        cJSON_AddStringToObject(cfg, "torch_dtype", dt);
    }
    if (cfg && plan->out_num_layers) { /* passthrough slices */
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "num_hidden_layers");
        cJSON_AddNumberToObject(cfg, "num_hidden_layers", plan->out_num_layers);
    }
    char *text = cfg ? cJSON_Print(cfg) : NULL;
    cJSON_Delete(cfg);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (!text)
        return ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    int rc = ms_atomic_write_file(path, text, strlen(text), err);
    free(text);
    if (rc == 0 && side_files_add(written, path) != 0)
        rc = ms_error_set(err, MS_EXIT_RUNTIME, path, "out of memory");
    return rc;
}

static int copy_if_present(const char *src_dir, const char *dir, const char *name, ms_side_files *written,
                           ms_error *err)
{
    char src[PATH_MAX], dst[PATH_MAX];
    if (snprintf(src, sizeof src, "%s/%s", src_dir, name) >= (int)sizeof src ||
        snprintf(dst, sizeof dst, "%s/%s", dir, name) >= (int)sizeof dst)
        return ms_error_set(err, MS_EXIT_RUNTIME, dir, "path too long for %s", name);
    struct stat st;
    if (stat(src, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    if (ms_copy_file_atomic(src, dst, err) != 0)
        return -1;
    if (side_files_add(written, dst) != 0)
        return ms_error_set(err, MS_EXIT_RUNTIME, dst, "out of memory");
    return 0;
}

int ms_output_dir_copy_side_files(const char *dir, const ms_plan *plan, ms_side_files *written, ms_error *err)
{
    if (write_config(dir, plan, written, err) != 0)
        return -1;
    char layout_dir[PATH_MAX];
    dir_of_path(plan->layout->path, layout_dir, sizeof layout_dir);
    if (copy_if_present(layout_dir, dir, "generation_config.json", written, err) != 0)
        return -1;
    const char *tok_dir = plan->recipe->tokenizer_source ? plan->recipe->tokenizer_source : layout_dir;
    for (size_t i = 0; i < sizeof k_tokenizer_files / sizeof k_tokenizer_files[0]; i++)
        if (copy_if_present(tok_dir, dir, k_tokenizer_files[i], written, err) != 0)
            return -1;
    return 0;
}

void ms_side_files_remove(ms_side_files *written)
{
    for (unsigned i = 0; i < written->n; i++)
        unlink(written->paths[i]);
    ms_side_files_free(written);
}

void ms_side_files_free(ms_side_files *written)
{
    for (unsigned i = 0; i < written->n; i++)
        free(written->paths[i]);
    free(written->paths);
    written->paths = NULL;
    written->n = 0;
}
