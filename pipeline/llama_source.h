/* Where the calibration forward pass's weights come from
 * (pipeline/llama_run.h): an ms_llama_source reads a model directory with
 * pread (ms_llama_source_model) or a BASE_DIR+ADAPTER_DIR pair with the PEFT
 * LoRA adapter applied on the fly (ms_llama_source_lora: rows pass through
 * cpu_lora_rows, cpu/lora_delta.h, so the pass sees exactly the fp32
 * weights `mergestream merge` materialises for that input, never the whole
 * adapted model); ms_llama_model_split parses MODEL = BASE+ADAPTER;
 * ms_llama_check and ms_llama_layer_load are the one place a layer's
 * weights enter the pass. Tests feed in-memory weights through the same
 * interface. */
#ifndef MS_LLAMA_SOURCE_H
#define MS_LLAMA_SOURCE_H

#include <stdbool.h>
#include <stdint.h>

#include "cpu/cpu_pool.h"
#include "cpu/llama_forward.h"
#include "io/model_dir.h"
#include "io/ms_error.h"
#include "io/peft_adapter.h"

typedef struct ms_llama_source {
    void *ctx;
    const char *where; /* names the model in messages */
    /* Looks a tensor up. Returns 1 with its shape (ndim 1 or 2) when present
     * with dtype F32, F16 or BF16; 0 when absent; -1 with err set
     * (MS_EXIT_DATA) for another dtype or more dimensions. */
    int (*find)(void *ctx, const char *name, unsigned *ndim, uint64_t shape[2], ms_error *err);
    /* Rows [row0, row0 + n_rows) of a tensor found by find (a 1-D tensor is
     * one row), widened to fp32 into out (n_rows x columns). Returns 0 or -1
     * with err set. Blocks on I/O. */
    int (*read_rows)(void *ctx, const char *name, uint64_t row0, uint64_t n_rows, float *out, ms_error *err);
    void (*close)(void *ctx); /* frees ctx; NULL when nothing to free */
    uint64_t host_bytes;      /* the most host memory the source holds at once (read buffers, prepared
                                 LoRA factors), for the memory budget; 0 when negligible */
    bool uses_pool;           /* reads compute on a cpu_pool: only while nothing else runs on it */
} ms_llama_source;

/* A source reading m (which must outlive it) with pread, MS_FAULT_READ
 * before each read, converting with cpu_convert. Returns 0 and *out (close
 * with ms_llama_source_close), or -1 with err set (MS_EXIT_RUNTIME). */
int ms_llama_source_model(const ms_model *m, ms_llama_source *out, ms_error *err);
/* A source for BASE+ADAPTER: m's tensors with peft (opened on m by
 * ms_peft_open; both must outlive the source) applied on the fly, as the
 * merge applies it (io/peft_adapter.h):
 *   - a tensor the adapter leaves alone reads as ms_llama_source_model's;
 *   - a REPLACE target (modules_to_save, trained biases) reads the adapter's
 *     tensor instead, and find reports that tensor's shape;
 *   - a LINEAR / EMBEDDING target (DoRA included) reads base rows (or the
 *     base layer saved in the adapter) and returns cpu_lora_rows of them:
 *     base + delta in fp32, bit for bit the rows the merge computes.
 * The factors of one target at a time are held, prepared at its first read
 * (a layer's load reads each weight once; the embedding rows token by token
 * and the head's slices reuse them); a DoRA target whose features are
 * columns (an embedding) reads its whole base tensor once more then, for
 * the column norms. pool (NULL: the calling thread) splits the delta rows;
 * the source is read only while nothing else runs on it. where names the
 * model in messages (copied). Reads ask the fault seam (MS_FAULT_READ per
 * pread, MS_FAULT_HOST_ALLOC before each factor allocation). Returns 0 and
 * *out (close with ms_llama_source_close), or -1 with err set
 * (MS_EXIT_RUNTIME). */
int ms_llama_source_lora(const ms_model *m, const ms_peft *peft, cpu_pool *pool, const char *where,
                         ms_llama_source *out, ms_error *err);
/* Frees what the source owns; a zeroed source is a no-op. */
void ms_llama_source_close(ms_llama_source *s);

/* Splits a MODEL argument into the base model and an optional adapter, as
 * mergekit's "BASE+ADAPTER" syntax (DESIGN.md, Recipe). Paths may contain
 * '+', so:
 *   1. a MODEL that exists as a path is a plain model, '+' or not;
 *   2. otherwise MODEL splits at a '+' whose right part is an existing
 *      directory holding adapter_config.json (the adapter) and whose left
 *      part is not empty: the last such '+' whose left part exists, else the
 *      last such '+' (its missing base is then reported when opened). So
 *      "/m/base+v1+/m/lora+v2" is base "/m/base+v1" with adapter
 *      "/m/lora+v2" unless a directory "v2" holding an adapter exists;
 *   3. otherwise, with a '+' in MODEL: an error (MS_EXIT_DATA) naming MODEL
 *      and what is wrong with the part after its last '+' (missing, or not
 *      a PEFT adapter directory);
 *   4. otherwise a plain model (opening it reports a missing path).
 * One adapter per model: "BASE+A1+A2" is not a stack of two adapters.
 * Returns 0 with *base (malloc'd) and *adapter (malloc'd, or NULL for a
 * plain model), or -1 with err set and both NULL. Blocks on stat(). */
int ms_llama_model_split(const char *model, char **base, char **adapter, ms_error *err);

/* Checks, before any data is read, that src has every tensor the pass needs
 * with the shape cfg implies (model.embed_tokens.weight, every layer's norms,
 * projections and the biases cfg names, model.norm.weight, and lm_head.weight
 * when need_head and the embeddings are not tied). With need_head, a cfg that
 * ties the embeddings over a src that has lm_head.weight is untied
 * (cfg->tie_embeddings cleared, one warning naming both tensors), as
 * transformers 5 loads such a checkpoint. Returns 0, or -1 with err set
 * (MS_EXIT_DATA naming the tensor and both shapes). */
int ms_llama_check(const ms_llama_source *src, cpu_llama_config *cfg, bool need_head, ms_error *err);

/* The tensor the head's rows come from: lm_head.weight, or the embedding
 * when the model ties them. */
const char *ms_llama_head_name(const cpu_llama_config *cfg);

/* Reads decoder layer `layer` into w (cpu_llama_layer_alloc'd for cfg): q/k/v
 * and gate/up fused as cpu_llama_layer describes. The one place a layer's
 * weights enter the pass. Returns 0 or -1 with err set. */
int ms_llama_layer_load(const ms_llama_source *src, const cpu_llama_config *cfg, uint64_t layer,
                        cpu_llama_layer *w, ms_error *err);

#endif
