/* Planning a merge, before any tensor data is read (DESIGN.md, Data flow 1):
 * open every input's headers, check names, shapes and dtypes against the
 * base, resolve each output tensor's parameters, decide how each tensor is
 * cut into row chunks for the staging pool, and list the output tensors in
 * the base's on-disk order so the writer can lay the output out up front. */
#ifndef MS_MERGE_PLAN_H
#define MS_MERGE_PLAN_H

#include <stdbool.h>
#include <stdint.h>

#include "io/model_dir.h"
#include "io/peft_adapter.h"
#include "pipeline/merge_params.h"
#include "pipeline/hessian_inputs.h"
#include "pipeline/recipe.h"

typedef enum ms_job_kind {
    MS_JOB_MERGE, /* a float tensor computed by the method */
    MS_JOB_COPY,  /* a non-float tensor: copied byte for byte from the layout model */
} ms_job_kind;

/* Where one input of a job lives on disk. With a LoRA target the rows read
 * are the "base" rows of that model, and the compute stage turns them into
 * base + adapter delta in fp32 (params.in_dtype is then F32) in a second
 * staging area of cols * 4 bytes per row. */
typedef struct ms_job_input {
    const st_file *file;
    uint64_t offset;            /* absolute file offset of row 0 */
    uint64_t row_bytes;         /* bytes of one row as read */
    st_dtype read_dtype;        /* dtype of the rows as read */
    const ms_lora_target *lora; /* LINEAR/EMBEDDING adapter target, or NULL */
    const ms_peft *peft;        /* its adapter */
} ms_job_input;

/* Staging bytes one row of input `in` takes: what is read, plus the fp32
 * rows of base + delta for a LoRA input. */
static inline uint64_t ms_job_input_stage_row_bytes(const ms_job_input *in, uint64_t cols)
{
    return in->row_bytes + (in->lora ? cols * 4 : 0);
}

typedef struct ms_job {
    const char *name;          /* points into the layout model's header, or owned_name */
    char *owned_name;          /* passthrough's renamed layers (model.layers.N.), else NULL */
    ms_job_kind kind;
    ms_tensor_params params;   /* MS_JOB_MERGE only; dtypes and sizes filled for both kinds */
    unsigned n_inputs;         /* slots used in in[]: 1 + n_models (MERGE) or 1 (COPY) */
    ms_job_input in[MS_MAX_MODELS + 1]; /* slot 0: the base (unused by linear without one) */
    uint64_t out_row_bytes;
    uint64_t out_bytes;
    st_dtype out_dtype;
    unsigned out_ndim;
    uint64_t out_shape[ST_MAX_DIMS];
    uint64_t rows_per_chunk;   /* whole tensor when n_chunks == 1 */
    uint64_t n_chunks;
    unsigned n_passes;         /* ms_merge_pass_count (1 for COPY) */
    uint64_t read_bytes;       /* input bytes all passes read */
} ms_job;

typedef struct ms_plan {
    ms_recipe *recipe;         /* owned */
    ms_model *base;            /* owned; NULL for linear without base_model */
    ms_model *models[MS_MAX_MODELS + 1]; /* owned; [1..n_models] */
    ms_peft *adapters[MS_MAX_MODELS + 1]; /* owned; [i] is models[i]'s PEFT adapter ("DIR+ADAPTER"), or NULL; [0]: the base's */
    ms_hessian_set *hessians[MS_MAX_MODELS + 1]; /* owned; [i] from models[i]'s `hessian:` parameter, or NULL */
    unsigned n_models;
    /* slices whose own base_model is not the top-level one (recipe's base_override): */
    ms_model *slice_bases[MS_MAX_MODELS];        /* owned; [s]: slices[s]'s base, else NULL (the top-level base) */
    ms_peft *slice_base_adapters[MS_MAX_MODELS]; /* owned; [s]: that base's PEFT adapter, or NULL */
    const ms_model *layout;    /* base, else models[1]: tensor order, config, tokenizer */
    unsigned num_layers;       /* config.json num_hidden_layers (or inferred from names) */
    unsigned out_num_layers;   /* passthrough: the output's layer count (config.json); 0 = unchanged */
    uint64_t seed;
    ms_job *jobs;              /* output order */
    size_t n_jobs;
    uint64_t total_read_bytes;
    uint64_t total_out_bytes;
    uint64_t max_item_bytes;   /* the largest chunk's staging bytes (inputs + output) */
    uint64_t extra_bytes;      /* host memory outside the pool: the largest job's kernel scratch and statistics */
    uint64_t pool_bytes;       /* the staging budget chunks were cut for: pool_bytes option less extra_bytes */
} ms_plan;

#define MS_PLAN_MIN_POOL_BYTES (1ull << 20)
#define MS_PLAN_CHUNKS_IN_POOL 3 /* a chunk takes at most 1/3 of the pool: one per stage */

typedef struct ms_plan_options {
    uint64_t pool_bytes;     /* memory for the staging pool plus kernel scratch and statistics */
    unsigned threads;        /* compute threads (for scratch estimates) */
    bool has_seed;           /* --random-seed overrides the recipe */
    uint64_t seed;
} ms_plan_options;

/* Loads the recipe at recipe_path, opens every model and builds the plan.
 * Returns 0 and *out (free with ms_plan_free), or -1 with err set:
 * MS_EXIT_USAGE for recipe errors, MS_EXIT_DATA for inputs that do not fit
 * together (naming both files and the tensor), MS_EXIT_RUNTIME for I/O. */
int ms_plan_build(const char *recipe_path, const ms_plan_options *opt, ms_plan **out, ms_error *err);
void ms_plan_free(ms_plan *plan);

/* Every model the plan reads, for checks that must see all inputs (files
 * unchanged, resume fingerprints): i in [0, ms_plan_input_count(plan)):
 * 0 the base, 1..n_models the merged models, then the slices' own bases.
 * Returns NULL for an unused slot (no base, a slice without its own base). */
unsigned ms_plan_input_count(const ms_plan *plan);
const ms_model *ms_plan_input_model(const ms_plan *plan, unsigned i);

#endif
