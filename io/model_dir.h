/* Model inputs on disk: a model directory (config.json plus model.safetensors,
 * or shards listed in model.safetensors.index.json), a single .safetensors
 * file, a PEFT adapter directory (adapter_config.json plus
 * adapter_model.safetensors), or the shards one index file lists (any
 * NAME.safetensors.index.json, e.g. the Hessians of `mergestream hessian`).
 *
 * Opening validates every shard header and the index against the shards both
 * ways before any tensor data is read. Pickle checkpoints (.bin, .pt, .pth)
 * are refused with a message saying why. */
#ifndef MS_MODEL_DIR_H
#define MS_MODEL_DIR_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "io/ms_error.h"
#include "io/st_format.h"

typedef enum ms_model_kind {
    MS_MODEL_KIND_DIR,     /* a model directory */
    MS_MODEL_KIND_FILE,    /* one .safetensors file */
    MS_MODEL_KIND_ADAPTER, /* a PEFT adapter directory */
    MS_MODEL_KIND_INDEX,   /* an index file's shards; path is the directory holding them */
} ms_model_kind;

typedef struct ms_model_tensor {
    const st_tensor *info; /* points into shards[shard]->header */
    unsigned shard;
} ms_model_tensor;

typedef struct ms_model {
    char *path;
    ms_model_kind kind;
    st_file **shards;         /* in on-disk order: shard file names sorted */
    unsigned n_shards;
    ms_model_tensor *tensors; /* on-disk order: shard by shard, then by offset */
    size_t n_tensors;
    size_t *by_name;          /* indices into tensors[], sorted by name */
    cJSON *config;            /* config.json (or adapter_config.json); NULL if absent */
    uint64_t total_bytes;     /* sum of tensor data bytes */
} ms_model;

/* Opens path as one of the kinds above. Returns 0 and *out (close with
 * ms_model_close), or -1 with err set: MS_EXIT_DATA for invalid or missing
 * data (message names the file and the rule), MS_EXIT_RUNTIME for I/O errors. */
int ms_model_open(const char *path, ms_model **out, ms_error *err);
void ms_model_close(ms_model *m);

/* Index into m->tensors of the tensor called name, or -1. Thread-safe. */
long ms_model_find(const ms_model *m, const char *name);

/* The shard file that holds tensor i. */
static inline const st_file *ms_model_tensor_file(const ms_model *m, size_t i)
{
    return m->shards[m->tensors[i].shard];
}

/* config.json's integer field `key`, or fallback when absent or not a number. */
long ms_model_config_int(const ms_model *m, const char *key, long fallback);

/* "model directory", "safetensors file" or "PEFT adapter". */
const char *ms_model_kind_name(ms_model_kind kind);

#endif
