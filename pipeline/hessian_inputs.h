/* The Hessians a Hessian-aware merge reads: one set per model (the output
 * directory of `mergestream hessian`: DIR/hessians.safetensors, or shards
 * listed in DIR/hessians.safetensors.index.json; F32 [in, in] tensors and a
 * "hessian_map" metadata entry mapping each module, e.g.
 * "model.layers.3.self_attn.k_proj", to its tensor), and the per-tensor
 * preparation that turns them into the merge state's coefficients
 * (pipeline/merge_passes_hessian.h). */
#ifndef MS_HESSIAN_INPUTS_H
#define MS_HESSIAN_INPUTS_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "io/ms_error.h"
#include "pipeline/merge_params.h"
#include "pipeline/merge_passes.h"
#include "pipeline/merge_passes_hessian.h"

typedef struct ms_hessian_set ms_hessian_set;

/* Opens the Hessian set at dir (a directory as above, or one .safetensors
 * file) and parses its hessian_map; reads headers only. Returns 0 and *out
 * (close with ms_hessian_set_close), or -1 with err set: MS_EXIT_DATA for a
 * missing or invalid file or map (the message names the file),
 * MS_EXIT_RUNTIME for I/O errors or out of memory. Thread-safe to use once
 * open (read only, but for its locked cache of saliency vectors). */
int ms_hessian_set_open(const char *dir, ms_hessian_set **out, ms_error *err);
void ms_hessian_set_close(ms_hessian_set *s); /* NULL is a no-op */

/* The path the set was opened from. */
const char *ms_hessian_set_path(const ms_hessian_set *s);

/* The Hessian of weight `weight_name` ("model.layers.3.self_attn.k_proj.weight",
 * or the module name without ".weight"): true and its dimension in *dim
 * when hessian_map names it and the tensor exists; false otherwise. */
bool ms_hessian_set_find(const ms_hessian_set *s, const char *weight_name, uint64_t *dim);

/* Planning's check, from the headers: when s (may be NULL) holds a Hessian
 * for weight_name, it must be F32 [cols, cols]. Returns 0, or -1 with err
 * set (MS_EXIT_DATA naming the file, the Hessian, the weight and both
 * shapes), so a Hessian of another model fails before any data is read. */
int ms_hessian_set_check(const ms_hessian_set *s, const char *weight_name, uint64_t cols, ms_error *err);

/* Prepares tensor `name`'s merge for a Hessian method (a no-op returning 0
 * for other methods): opens st->hessian, and for every model i (1..n) with
 * sets[i] != NULL and a Hessian for the weight, reads it ([cols, cols] F32;
 * another shape is an MS_EXIT_DATA error naming the tensor and the file) and
 * adds it (ms_hessian_state_add), then finishes (regmean's factorisation).
 * The Cholesky factorisations run where fz says (a GPU first when it has
 * one, then its CPU pool; NULL: this thread only; the bits are the same
 * everywhere) while holding pool_lock (NULL: the caller is the pool's only
 * user), which also keeps two workers from factoring one Hessian at once;
 * nothing else is done under the lock. A sparsegpt model's u is
 * cached in its set (a few vectors, freed by ms_hessian_set_close): the
 * weights that share a Hessian (q, k, v; gate, up) read and factor it once.
 * Models without a Hessian, and Hessians that are not positive definite
 * after damping, fall back as merge_passes_hessian.h says, logged (a missing
 * Hessian once per run). Call it once per tensor, after ms_merge_state_open
 * and before the first pass; thread-safe (the sets' caches are locked).
 * Blocks on I/O and O(cols^3) fp64 work. Host memory: at most
 * ms_hessian_state_bytes(p) (merge_passes_hessian.h), plus the caches.
 * Returns 0, or -1 with err set (MS_EXIT_DATA, MS_EXIT_RUNTIME for I/O and
 * out of memory); st->hessian is then closed by ms_merge_state_close as
 * usual. */
int ms_hessian_prepare(ms_merge_state *st, const ms_tensor_params *p, const char *name,
                       ms_hessian_set *const sets[MS_MAX_MODELS + 1], const ms_hessian_factoriser *fz,
                       pthread_mutex_t *pool_lock, ms_error *err);

#endif
