/* The output side of safetensors: the whole output layout planned up front
 * (st_plan), and the shard files written at their planned offsets, in any
 * order, then committed (st_writer).
 *
 * Layout rules (DESIGN.md, Output):
 * - Tensors keep the order they were added in (the base model's on-disk
 *   order). A tensor goes to the current shard unless the shard already has a
 *   tensor and adding this one would push the shard's DATA bytes (headers not
 *   counted) over the limit; then it starts a new shard. So a shard holds at
 *   most `limit` data bytes, except a shard holding one tensor larger than the
 *   limit, and no shard is ever empty (a plan without tensors gets one shard
 *   with an empty header, so the output is still a valid model).
 * - File names: "model.safetensors" for one shard, else
 *   "model-00001-of-00003.safetensors" (5 digits, as transformers writes);
 *   another stem than "model" may be set (a PEFT adapter is
 *   "adapter_model.safetensors").
 * - Header: 8-byte little-endian length N, then compact JSON (no spaces):
 *   "__metadata__" first with "format":"pt" and any caller entries in the
 *   order added, then the tensors in order, each
 *   {"dtype":"BF16","shape":[..],"data_offsets":[b,e]}, offsets contiguous
 *   from 0; the JSON is padded with spaces so that N is a multiple of 8 (the
 *   data section starts 8-aligned).
 * - More than one shard: "model.safetensors.index.json" (STEM.safetensors.
 *   index.json) as transformers
 *   writes it: 2-space indent, {"metadata":{"total_size":TENSOR_BYTES},
 *   "weight_map":{name: file}} with names sorted bytewise.
 *
 * Writing protocol:
 * - A shard is created as "<dir>/<file>.partial" (mode 0644) on the first
 *   write that touches it (or st_writer_shard_open), with its header written
 *   and its full size reserved with fallocate(2) where the file system can.
 * - Tensor bytes may arrive in any order and in any pieces (row chunks); the
 *   writer tracks which byte ranges of each tensor landed and rejects a range
 *   outside the tensor or overlapping one already written.
 * - When the last missing byte of a shard lands, the writing call itself
 *   finalizes it: fsync, close, rename "<file>.partial" -> "<file>". (No
 *   separate "done" call exists.) st_writer_finish finalizes shards that have
 *   no data bytes, checks that everything landed, fsyncs the directory and
 *   writes the index.
 * - A failed or abandoned run: st_writer_abort (or st_writer_close before a
 *   successful finish) removes every file this writer created, partial or
 *   final, so nothing is left under a final name.
 *
 * Fault seam: writes ask MS_FAULT_WRITE, fsyncs MS_FAULT_FSYNC, renames
 * MS_FAULT_RENAME (io/atomic_file.h helpers).
 *
 * Threading: a plan is built by one thread and read-only afterwards (its
 * accessors are then safe from any thread). A writer is thread-compatible:
 * one thread at a time calls it (the pipeline's writer stage). */
#ifndef MS_ST_WRITER_H
#define MS_ST_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/ms_error.h"
#include "io/st_format.h"

#define ST_DEFAULT_SHARD_BYTES 5000000000ull /* --out-shard-size default: 5GB */
#define ST_DEFAULT_STEM "model"
#define ST_SINGLE_FILE_NAME "model.safetensors"           /* with the default stem */
#define ST_INDEX_FILE_NAME "model.safetensors.index.json" /* with the default stem */

/* ================================================================ the plan */

/* One output tensor. Read-only for callers. */
typedef struct st_plan_tensor {
    char *name; /* owned by the plan */
    st_dtype dtype;
    unsigned ndim;
    uint64_t shape[ST_MAX_DIMS];
    uint64_t numel;
    uint64_t nbytes;
    size_t shard;    /* index of its shard */
    uint64_t begin;  /* data_offsets[0]: relative to the shard's data section */
    uint64_t offset; /* absolute file offset of its first byte (after st_plan_layout) */
} st_plan_tensor;

/* One output file. Read-only for callers; fields marked (layout) are set by
 * st_plan_layout. */
typedef struct st_plan_shard {
    char *file_name;       /* (layout) owned by the plan */
    size_t first_tensor;   /* holds tensors [first_tensor, first_tensor + n_tensors) */
    size_t n_tensors;
    uint64_t data_bytes;   /* sum of its tensors' bytes */
    unsigned char *header; /* (layout) header_bytes bytes: length, JSON, padding */
    uint64_t header_bytes; /* (layout) 8 + N, a multiple of 8: where the data starts */
    uint64_t file_size;    /* (layout) header_bytes + data_bytes */
} st_plan_shard;

typedef struct st_plan st_plan;

/* Starts an empty plan cutting shards at shard_limit data bytes (>= 1; pass
 * ST_DEFAULT_SHARD_BYTES for the default, UINT64_MAX for "never cut").
 * Returns 0 and *out (free with st_plan_free), or -1 with err set
 * (MS_EXIT_USAGE for a zero limit, MS_EXIT_RUNTIME for no memory). */
int st_plan_create(uint64_t shard_limit, st_plan **out, ms_error *err);

/* Adds a string entry to every shard's "__metadata__" after "format":"pt".
 * Both strings are copied. Fails (MS_EXIT_USAGE, naming the key) for the
 * key "format" or a key added before; MS_EXIT_RUNTIME for no memory. Only
 * before st_plan_layout. */
int st_plan_add_metadata(st_plan *p, const char *key, const char *value, ms_error *err);

/* Names the files STEM.safetensors / STEM-00001-of-0000N.safetensors and
 * STEM.safetensors.index.json instead of "model..." (copied). Fails
 * (MS_EXIT_USAGE) for an empty stem or one containing '/'. Only before
 * st_plan_layout. */
int st_plan_set_stem(st_plan *p, const char *stem, ms_error *err);

/* Appends a tensor (name copied; shape has ndim <= ST_MAX_DIMS entries, may
 * be NULL when ndim is 0) and assigns it to a shard. Returns 0 and, when
 * index is not NULL, its index (= the number of tensors added before it), or
 * -1 with err set naming the tensor: MS_EXIT_DATA for an empty or reserved
 * name, a bad dtype or ndim, a size that overflows 64 bits or is not a whole
 * number of bytes; MS_EXIT_RUNTIME for no memory. Duplicate names are found
 * by st_plan_layout. Only before st_plan_layout. */
int st_plan_add_tensor(st_plan *p, const char *name, st_dtype dtype, unsigned ndim,
                       const uint64_t *shape, size_t *index, ms_error *err);

/* Freezes the plan: names the shards, builds every header, computes every
 * absolute offset. Returns 0, or -1 with err set (MS_EXIT_DATA naming a
 * duplicate tensor name or a header over ST_MAX_HEADER_BYTES;
 * MS_EXIT_RUNTIME for no memory). Call once; the accessors below need it.
 * After a failure only st_plan_free is valid. */
int st_plan_layout(st_plan *p, ms_error *err);

/* NULL is a no-op. */
void st_plan_free(st_plan *p);

size_t st_plan_n_tensors(const st_plan *p);
const st_plan_tensor *st_plan_tensor_at(const st_plan *p, size_t i);
size_t st_plan_n_shards(const st_plan *p);
const st_plan_shard *st_plan_shard_at(const st_plan *p, size_t s);
/* Index of the tensor called name, or -1. O(log n); after layout only. */
long st_plan_find(const st_plan *p, const char *name);
/* Sum of all tensor bytes: the index's metadata.total_size. */
uint64_t st_plan_total_bytes(const st_plan *p);
/* True when the output has more than one shard, so an index is written. */
bool st_plan_has_index(const st_plan *p);
/* The index file's name ("model.safetensors.index.json"); after layout. */
const char *st_plan_index_name(const st_plan *p);

/* ============================================================== the writer */

typedef struct st_writer st_writer;

/* Prepares to write plan (laid out; it must outlive the writer, which only
 * reads it) into the existing directory dir. Creates no file yet. Returns 0
 * and *out, or -1 with err set (MS_EXIT_RUNTIME). */
int st_writer_open(const st_plan *plan, const char *dir, st_writer **out, ms_error *err);

/* Creates shard s's partial file now (header written, size reserved), e.g.
 * to fail on a full disk before any work. No-op when already created.
 * Returns 0 or -1 with err set naming the file (ENOSPC from the reservation
 * is an error; a file system without fallocate support is not). */
int st_writer_shard_open(st_writer *w, size_t s, ms_error *err);

/* Writes len bytes from buf as bytes [offset, offset + len) of tensor `tensor`
 * at their planned place (pwrite, looping on short writes), creating the shard
 * file if needed and finalizing the shard if these were its last missing
 * bytes. Blocks on disk I/O (an fsync when finalizing). Returns 0, or -1 with
 * err set: MS_EXIT_RUNTIME naming the file for an I/O error (the writer is
 * then unusable: abort it), or naming the tensor for a range outside the
 * tensor or overlapping bytes already written (nothing is written then). */
int st_writer_write(st_writer *w, size_t tensor, uint64_t offset, const void *buf, uint64_t len,
                    ms_error *err);

/* Writes the whole tensor from buf (its nbytes bytes) and records its XXH3-64
 * as the tensor hash. Same returns as st_writer_write. */
int st_writer_write_tensor(st_writer *w, size_t tensor, const void *buf, ms_error *err);

/* Records the tensor's hash (XXH3-64 of its bytes, io/checksum.h) computed by
 * the caller, for tensors written in pieces. Any time before finish; a later
 * call replaces an earlier one. */
void st_writer_set_tensor_hash(st_writer *w, size_t tensor, uint64_t hash);

/* For callers that write the bytes themselves (the io engine): the shard fd
 * (created if needed; owned by the writer, valid until the shard is
 * finalized) and the absolute file offset of the tensor's first byte. After
 * the bytes landed, report them with st_writer_tensor_landed. Returns 0 or -1
 * with err set as st_writer_shard_open. */
int st_writer_tensor_target(st_writer *w, size_t tensor, int *fd, uint64_t *file_offset,
                            ms_error *err);

/* Records that bytes [offset, offset + len) of the tensor are on disk (written
 * through st_writer_tensor_target's fd) and finalizes the shard if they were
 * its last. Same returns as st_writer_write. */
int st_writer_tensor_landed(st_writer *w, size_t tensor, uint64_t offset, uint64_t len,
                            ms_error *err);

/* Resume: takes shard s's final file, left by an earlier run of the same
 * plan, as already written, with tensor_hashes (its n_tensors tensor hashes,
 * in order) as its tensors' hashes; the caller checked them. The file is not
 * created by this writer, so abort leaves it in place. Only before any byte of
 * the shard was written. Returns 0, or -1 with err set (MS_EXIT_DATA when the
 * final file is missing or has the wrong size). */
int st_writer_adopt_shard(st_writer *w, size_t s, const uint64_t *tensor_hashes, ms_error *err);

/* Bytes of shard s not yet written, and whether it was renamed to its final
 * name. For progress and tests. */
uint64_t st_writer_shard_missing(const st_writer *w, size_t s);
bool st_writer_shard_is_final(const st_writer *w, size_t s);

/* Completes the output: finalizes the shards without data bytes, fails (naming
 * the shard and a tensor) if any byte or any tensor hash is missing, computes
 * the shard hashes, fsyncs the directory and writes the index when there is
 * more than one shard (atomically, io/atomic_file.h). Returns 0, or -1 with
 * err set; on failure call st_writer_abort. */
int st_writer_finish(st_writer *w, ms_error *err);

/* The recorded hash of a tensor (MS_ASSERTs that one was recorded), and a
 * shard's hash (io/checksum.h, ms_shard_hash; after a successful finish).
 * Shard names and sizes are in the plan. */
uint64_t st_writer_tensor_hash(const st_writer *w, size_t tensor);
uint64_t st_writer_shard_hash(const st_writer *w, size_t s);

/* Closes every open file and removes every file this writer created (partial
 * shards, final shards, the index), then frees the writer: after a failed
 * run nothing is left under a final name. Best effort, never fails. NULL is a
 * no-op. */
void st_writer_abort(st_writer *w);

/* After a successful st_writer_finish: frees the writer, keeping the files.
 * Before one: the same as st_writer_abort. NULL is a no-op. */
void st_writer_close(st_writer *w);

#endif
