/* Merge recipes: mergekit-compatible YAML, parsed with libyaml, validated
 * against the method table, and resolved per tensor into ms_tensor_params.
 *
 * Recipe format (mergekit's, the subset and strictness stated here):
 *
 *   merge_method: ties              # required; see ms_method_names()
 *   base_model: ./models/base       # required except for linear
 *   models:                         # required, 1..MS_MAX_MODELS merged models
 *     - model: ./models/ft1
 *       parameters: {weight: 0.5, density: [0.2, 0.8]}
 *     - model: ./models/ft2+./adapters/lora   # DIR+ADAPTER: base dir + PEFT adapter
 *       parameters:
 *         weight:
 *           - filter: self_attn
 *             value: 0.7
 *           - value: 0.3            # no filter: matches every tensor
 *   parameters: {normalize: true, lambda: 1.0, density: 0.5}
 *   dtype: bfloat16                 # bfloat16 | float16 | float32
 *   out_dtype: float16
 *   tokenizer_source: base          # "base" or a local model path
 *   random_seed: 42                 # non-negative integer (Philox key)
 *   name: ...                       # accepted and ignored
 *   chat_template: ...              # accepted and ignored, with one warning
 *
 * Keys. Unknown keys anywhere (top level, a models entry, a parameters map,
 * a filter entry) are errors naming the key and its line. Duplicate keys are
 * errors (PyYAML silently keeps the last one). `tokenizer` and `modules` are
 * mergekit keys mergestream does not support: errors.
 *
 * Slices (instead of `models`):
 *   slices:
 *     - sources:
 *         - model: ./models/base
 *           layer_range: [0, 16]        # [first, end): layers first..end-1
 *         - model: ./models/ft1
 *           layer_range: [0, 16]
 *           parameters: {weight: 0.5}   # per-source parameters, as models[i]'s
 * The output's layers are the slices' layers, concatenated and renumbered
 * from 0 (num_hidden_layers in config.json becomes their count). Every
 * source of a slice must span the same number of layers; output layer k of
 * a slice merges layer first_i + k of each source i with the recipe's
 * method and parameters (mergekit's semantics):
 *   - passthrough: exactly one source per slice, copied (times its `scale`);
 *   - a method that needs a base (ties, slerp, ...), or takes an optional
 *     one that base_model names: base_model must be one of each slice's
 *     sources (mergekit looks the base up among the slice's tensors); that
 *     source gives the base layers and takes no parameters (as in models);
 *     the other sources are the merged models, per slice counted like
 *     models (slerp: exactly one besides the base). linear: every source is
 *     merged (a base_model takes no part, as in models).
 *   - gradients: t = k / (n - 1) for output layer k of an n-layer slice, and
 *     t = 1 when n = 1 (mergekit's plan_slice; t restarts in every slice).
 *     Per-source parameters are looked up with the source's tensor name
 *     (model.layers.{first_i + k}...), global ones with the output name.
 *   - tensors outside the layers are merged at t = 0 (mergekit 0.1.5 reads
 *     both at t = 0) over the first slice's sources when their name contains
 *     "embed" (mergekit's pre-weights), else over the last slice's sources
 *     (its post-weights: final norm, lm_head); passthrough copies them from
 *     the first or the last slice's source likewise (with its scale), and a
 *     base_model takes no part (a warning says so).
 *   - DARE's Philox stream is keyed by the output tensor name and the
 *     source's position among the slice's merged sources, so a slice over all
 *     layers reproduces the whole-model merge bit for bit.
 * Per-slice keys besides `sources` (mergekit's OutputSliceDefinition):
 *   - parameters: a parameters map, as the top level's, that may set both
 *     per-model (weight, density, ...) and global (t, lambda, normalize, ...)
 *     parameters. Lookup order for a tensor (mergekit's ConfigReader.
 *     parameter): the source's own parameters, then its slice's, then the
 *     top level's, then the method's default; a level whose filters match
 *     nothing falls through. Per-model parameters match their filters
 *     against the source's tensor name at every level, global ones against
 *     the output name; a slice's gradients are read at the slice's t (the
 *     rule above), so for the pre- and post-weights the first and the last
 *     slice's parameters apply, at t = 0. A method's required
 *     parameter (t) may be set per slice instead of at the top level (then
 *     in every slice); a weight may come from the slice.
 *   - base_model: the slice's base (mergekit's ConfigReader.base_model):
 *     that model must be one of the slice's sources, which becomes the
 *     slice's base (layers and, for the first/last slice, the pre/post
 *     weights) in place of the top-level base_model; the top-level base,
 *     if listed in that slice, is then a merged source like any other.
 *     The top-level base_model may be left out when every slice names its
 *     own (the output's config and tokenizer then come from the first
 *     merged source). Only methods that use a base take it (linear and
 *     passthrough: an error naming the key's line).
 *   - residual_weight: accepted (a number) with a warning naming its line;
 *     it has no effect (mergekit's schema has it, its planner never reads it).
 * Other slice keys are errors naming the key and its line. The Hessian methods
 * (ties_sparsegpt, dare_sparsegpt, regmean) do not take slices (their
 * statistics are keyed by the model's own layer names). All slices together
 * list at most MS_MAX_MODELS merged sources; the same model may appear in
 * several slices, never twice in one.
 *
 * Paths. A model is a plain string (mergekit's nested {model: {path: ...}}
 * forms are rejected with a clear error), relative to the recipe's folder
 * unless absolute. "DIR+ADAPTER" (exactly one '+', used only when the whole
 * string is not itself an existing path) is a base directory with a PEFT
 * adapter; both parts are resolved relative to the recipe folder. Every path
 * must exist; a missing one that looks like a hub id (exactly one '/', no
 * leading '.' or '/') gets "not a local path; ... hub ids are not supported".
 * A model listed twice is an error.
 *
 * The base. For task-vector methods (all but linear) base_model is required;
 * if it also appears in `models` (mergekit's examples list it, usually
 * without parameters) that entry is dropped from the merged list; parameters
 * it carries are ignored, as mergekit ignores them, with a warning naming
 * their line.
 * For linear the base is optional and takes no part in the sum; listing it in
 * `models` makes it a regular model of the sum. nuslerp, multislerp and
 * karcher take an optional base (method_table.h's optional_base): when
 * base_model is named it is the base, dropped from `models` like a
 * task-vector method's (nuslerp and multislerp then work on task vectors;
 * karcher averages it with the models), and tp.has_base is set.
 *
 * Model counts. Each method accepts a number of merged models besides the
 * base (ms_method_model_count): slerp, nearswap and arcee_fusion exactly one
 * (mergekit's "exactly two models, one of them the base"), nuslerp exactly
 * two, model_stock at least two; otherwise an error at the `models` line.
 *
 * Parameters (which method takes which, defaults, ranges: method_table.h).
 * Per-model parameters come from models[i].parameters, else from the
 * top-level parameters, else the method default (with slices, a slice's
 * parameters sit between a source's and the top level's: see Slices);
 * weight has no default, so it
 * must be set for every merged model of a method that takes it (at load: an
 * error naming the model and its line; slerp, karcher, model_stock, nearswap,
 * sce, ram, ramplus_tl and arcee_fusion take no weight). A method's required
 * global parameters (slerp's and nearswap's t) must be set in the top-level
 * parameters (an error at the merge_method line; with slices, or in every
 * slice's parameters: an error at the first slice without it); when a tensor's filters
 * for one match nothing, resolution fails naming the key's line and the
 * tensor. Global parameters (normalize, rescale, lambda, int8_mask, t, ...)
 * are allowed only at the top level and in a slice's parameters, never in a
 * model's or a source's. A parameter the method does not use is an
 * error (mergekit warns and ignores it; we are strict on purpose).
 * `hessian: DIR` is a per-model parameter of ties_sparsegpt, dare_sparsegpt
 * and regmean only: a string path (no gradient, no filter list), relative to
 * the recipe's folder, that must exist; anywhere else it is an error.
 *
 * A parameter value is one of
 *   - a scalar: a number, or a bool (true/false/yes/no/on/off) for booleans;
 *   - a gradient, a YAML list of numbers: values evenly spaced over t in
 *     [0, 1], linearly interpolated (mergekit's formula: s = t * (n - 1),
 *     i0 = floor(s), i1 = min(n - 1, i0 + 1), v = (1 - f) p[i0] + f p[i1] with
 *     f = s - i0, in fp64, clamped to [min, max] of the two points so rounding
 *     never leaves the range); a 1-element list is a constant. Only numeric
 *     parameters take gradients;
 *   - a list of {filter, value} maps, tried in order: the first entry whose
 *     filter is a substring of the tensor name wins; an entry without a filter
 *     (or filter "*") matches every tensor, so it is the fallback when listed
 *     last (mergekit's evaluation order). `value` is a scalar or a gradient.
 *     When nothing matches, the lookup falls through to the next level
 *     (model -> top level -> default), as in mergekit.
 * t for a tensor: t = N / (num_hidden_layers - 1) for a name containing
 * "layers.N." (the first such match, "layers" at the start or after a '.'),
 * clamped to [0, 1]; t = 0 for tensors outside the layers and when
 * num_hidden_layers <= 1. (mergekit differs in two corners: it plans the final
 * norm and lm_head with t = 1, and a single-layer model with t = 1.)
 *
 * Ranges. Every number literal is checked when the recipe is loaded (density
 * (0, 1], gamma [0, 1), epsilon [0, 1), slerp's t [0, 1], nearswap's t > 0,
 * max_iter an integer, ...: method_table.h; all numbers finite); since gradients
 * interpolate between in-range points, resolved values stay in range. della
 * needs density - epsilon > 0 and density + epsilon < 1 (DESIGN.md): checked
 * at load when both values are constants for a model, else per tensor. With
 * the default density 1 that rule always fails, so a della recipe must set
 * a density below 1 - epsilon.
 *
 * Errors are "RECIPE:LINE: WHAT" with exit code MS_EXIT_USAGE (LINE is
 * 1-based), e.g. "r.yml:7: unknown key 'densty' in models[1].parameters";
 * a recipe that cannot be read is MS_EXIT_RUNTIME. YAML syntax errors are
 * "RECIPE:LINE: YAML error: <libyaml's problem>". */
#ifndef MS_RECIPE_H
#define MS_RECIPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/ms_error.h"
#include "io/st_format.h"
#include "pipeline/merge_params.h"
#include "pipeline/method_table.h"

/* A value that does not depend on the tensor name: a scalar or a gradient. */
typedef struct ms_recipe_value {
    double *points;     /* owned; n_points >= 1; booleans are 0 or 1 */
    unsigned n_points;
    bool is_gradient;   /* written as a YAML list */
    unsigned line;      /* of the scalar or the list */
} ms_recipe_value;

/* One {filter, value} entry. */
typedef struct ms_recipe_cond {
    char *filter;       /* owned; NULL (no filter) or "*" matches every tensor */
    ms_recipe_value value;
    unsigned line;      /* of the entry */
} ms_recipe_cond;

/* One parameter as written at one level (a model's or the top level). */
typedef struct ms_recipe_param {
    bool present;
    unsigned line;          /* of the key */
    unsigned n_conds;       /* 0: `value` holds the setting */
    ms_recipe_value value;
    ms_recipe_cond *conds;  /* owned; n_conds entries of a [{filter, value}] list */
} ms_recipe_param;

typedef struct ms_recipe_model {
    char *name;         /* the model string as written in the recipe */
    char *path;         /* resolved (recipe folder joined); the base directory or file */
    char *adapter_path; /* resolved PEFT adapter directory; NULL unless "DIR+ADAPTER" */
    unsigned index;     /* position in the recipe's models list, 0-based: "models[index]" */
    bool has_layer_range; /* slices: this source's layer_range [layer_begin, layer_end) */
    unsigned layer_begin, layer_end;
    unsigned slice;     /* slices: the slice it is a source of (index into ms_recipe.slices) */
    char label[64];     /* for messages: "models[i]" or "slices[s].sources[j]" */
    unsigned line;      /* of the entry */
    ms_recipe_param params[MS_PARAM_COUNT]; /* per-model parameters (MS_PARAM_SCOPE_MODEL only) */
    char *hessian_path;   /* Hessian methods: `hessian: DIR` resolved (the output of `mergestream
                             hessian`); NULL when not given (the model's weights then fall back,
                             see pipeline/merge_passes_hessian.h) */
    unsigned hessian_line; /* of the hessian key */
} ms_recipe_model;

/* One output slice: its merged sources are models[first_model ..
 * first_model + n_models), all spanning n_layers layers; the base (when the
 * method uses one) is the source at base_begin of the slice's base_model,
 * else of the top-level one. */
typedef struct ms_recipe_slice {
    unsigned index;       /* slices[index] */
    unsigned line;        /* of the entry */
    unsigned first_model; /* into ms_recipe.models */
    unsigned n_models;    /* merged sources (the base excluded), >= 1 */
    unsigned n_layers;    /* every source's layer_range length, >= 1 */
    bool has_base;        /* the base_model is a source of this slice and the method uses it */
    unsigned base_begin;  /* its layer_range's first layer */
    unsigned base_end;
    unsigned base_line;   /* of that source */
    /* mergekit's per-slice keys (recipe.h, Slices) */
    ms_recipe_param params[MS_PARAM_COUNT]; /* slices[index].parameters: between the sources' and the top level's */
    char *base_name;      /* slices[index].base_model as written; NULL when the slice names none */
    char *base_path;      /* resolved; NULL when the slice names none */
    char *base_adapter_path; /* NULL unless that base_model is "DIR+ADAPTER" */
    unsigned base_key_line; /* of the slice's base_model key; 0 when absent */
    bool base_override;   /* the slice's base_model is not the top-level one: the plan opens it
                             for this slice's base (slot 0) instead of the top-level base */
} ms_recipe_slice;

typedef struct ms_recipe {
    char *source_path;      /* the recipe file, as given to ms_recipe_load */
    char *text;             /* the file's bytes, NUL-terminated (for the manifest) */
    size_t text_len;
    ms_method method;
    unsigned method_line;   /* of the merge_method key */
    char *base_name;        /* as written; NULL when there is no base_model (linear only) */
    char *base_path;        /* resolved; NULL when there is no base_model */
    char *base_adapter_path; /* NULL unless base_model is "DIR+ADAPTER" */
    unsigned base_line;
    bool base_listed;       /* task-vector methods: the base appeared in models (and was dropped) */
    bool has_slices;        /* `slices` given: models[] are the slices' merged sources, slice by slice */
    struct ms_recipe_slice *slices; /* owned; n_slices entries when has_slices */
    unsigned n_slices;
    ms_recipe_model *models; /* the merged models: parameter slots 1..n_models, recipe order */
    unsigned n_models;      /* 1..MS_MAX_MODELS */
    st_dtype dtype, out_dtype; /* ST_BF16, ST_F16 or ST_F32 */
    bool has_dtype, has_out_dtype;
    char *tokenizer_source; /* resolved path; NULL = the base's tokenizer */
    uint64_t random_seed;
    bool has_random_seed;
    ms_recipe_param params[MS_PARAM_COUNT]; /* the top-level parameters */
} ms_recipe;

/* Reads, parses and validates the recipe at path (model paths must exist;
 * nothing else about the models is opened). Returns 0 and *out (free with
 * ms_recipe_free), or -1 with err set: MS_EXIT_USAGE for a path that does
 * not lead to a readable file and for anything wrong in it ("RECIPE:LINE:
 * ..."), MS_EXIT_RUNTIME when reading it fails otherwise.
 * May log warnings (an ignored chat_template; parameters the method does
 * not use; a base model's parameters); touches no other global
 * state, so separate recipes may be loaded from separate threads. */
int ms_recipe_load(const char *path, ms_recipe **out, ms_error *err);

/* Frees r and everything it owns. NULL is a no-op. */
void ms_recipe_free(ms_recipe *r);

/* Checks the rules that tie parameters together and do not depend on the
 * tensor: della's density +- epsilon for every model whose density and
 * epsilon are constants (scalars, one-point gradients or defaults).
 * ms_recipe_load calls it; values that vary per tensor are checked by
 * ms_recipe_tensor_params. Returns 0, or -1 with err set (MS_EXIT_USAGE). */
int ms_recipe_check_constants(const ms_recipe *r, ms_error *err);

/* The gradient position of a tensor, as described above: in [0, 1]. */
double ms_recipe_tensor_t(const char *tensor_name, unsigned num_hidden_layers);

/* Resolves every recipe parameter for one tensor into *out: method, sparsify,
 * consensus, normalize, rescale, has_base (false for linear: its kernel never
 * reads slot 0; for nuslerp, multislerp and karcher: whether base_model is
 * named), n_models, weight/density/gamma/epsilon[1..n] (density 1, gamma 0,
 * epsilon 0 where the method does not use them; weight 1 for methods that
 * take none), lambda (1 where unused) and the interpolation methods' fields
 * (t, filter_wise, nuslerp_flatten, nuslerp_row_wise, normalize_weights,
 * eps, select_topk, ram_r, ram_alpha, max_iter, tol: 0/false where unused).
 * Every other field is zeroed: the caller fills dtypes, sizes and the
 * Philox key. Returns 0, or -1 with err set (MS_EXIT_USAGE) naming the
 * recipe, the key's line, the model and the tensor: a value out of range
 * for this tensor (della's density +- epsilon), a weight or a required
 * parameter (t) whose filters match nothing for this tensor with no
 * fallback, or multislerp weights summing to 0 with normalize_weights;
 * *out is then unspecified.
 * Thread-safe (reads r only); tensor_name must not be NULL. */
int ms_recipe_tensor_params(const ms_recipe *r, const char *tensor_name,
                            unsigned num_hidden_layers, ms_tensor_params *out, ms_error *err);

/* Like ms_recipe_tensor_params for output tensor out_name of slice `slice`
 * (r->has_slices, not passthrough): n_models is the slice's merged source
 * count and weight[j] etc. are those of its j-th merged source (models
 * [first_model + j - 1]); has_base is the slice's; levels are the source's,
 * the slice's, the top level's (recipe.h, Slices); per-model parameters
 * match their filters against src_names[j - 1] (the tensor's name in that
 * source; NULL entries or a NULL array mean out_name), global ones against
 * out_name; gradients are read at t (the caller's slice position, in
 * [0, 1]). Returns 0, or -1 with err set
 * as ms_recipe_tensor_params does. Thread-safe (reads r only). */
int ms_recipe_slice_tensor_params(const ms_recipe *r, unsigned slice, const char *out_name,
                                  const char *const *src_names, double t, ms_tensor_params *out,
                                  ms_error *err);

/* One per-model parameter of models[model] (0-based) for a tensor, resolved
 * like ms_recipe_tensor_params does (model level, then its slice's with
 * slices, then top level, then the method's default) and range-checked. The method must take the parameter.
 * Returns 0, or -1 with err naming the recipe line and the tensor. */
int ms_recipe_model_param(const ms_recipe *r, unsigned model, ms_param_id id, const char *tensor_name,
                          unsigned num_hidden_layers, double *out, ms_error *err);
/* The same with gradients read at t in [0, 1] (a slice's position: t = k /
 * (n - 1) at the slice's layer k) instead of the tensor's layer in the
 * whole model. */
int ms_recipe_model_param_at(const ms_recipe *r, unsigned model, ms_param_id id, const char *tensor_name, double t,
                             double *out, ms_error *err);

#endif
