/* Checksums: thin, named wrappers over xxHash's XXH3-64 (seed 0 unless a
 * function says otherwise), and the definitions of the hashes written into
 * the manifest (mergestream.json).
 *
 * Definitions (the manifest's contract; `mergestream verify` recomputes them):
 * - TENSOR hash: XXH3-64 of the tensor's data bytes exactly as stored in the
 *   file (little-endian, output dtype), seed 0.
 * - SHARD hash: XXH3-64, seed 0, over the shard's header bytes (the 8-byte
 *   little-endian length, the JSON and its padding spaces: everything before
 *   the data section) followed by each tensor's hash as 8 little-endian bytes,
 *   in file order. A "hash of hashes": it covers every byte of the file (the
 *   data offsets are contiguous), yet the tensors may be written and hashed in
 *   any order, each by whichever thread computed it.
 * - Text form: 16 lowercase hex digits, most significant first ("%016llx"),
 *   which is also xxHash's canonical (big-endian) representation. */
#ifndef MS_CHECKSUM_H
#define MS_CHECKSUM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MS_HASH_HEX_LEN 16 /* characters, without the terminating NUL */

/* One-shot XXH3-64 of len bytes (seed 0). data may be NULL when len is 0. */
uint64_t ms_hash64(const void *data, size_t len);

/* One-shot XXH3_64bits_withSeed: e.g. a per-tensor PRNG key from a name. */
uint64_t ms_hash64_seed(const void *data, size_t len, uint64_t seed);

/* Streaming XXH3-64 (seed 0): the same value as ms_hash64 over the
 * concatenation of every update. The struct is the caller's (stack or heap);
 * the xxHash state inside it is heap memory owned by the hasher. */
typedef struct ms_hasher {
    void *state; /* an XXH3_state_t (opaque here: xxhash.h stays out of this header) */
} ms_hasher;

/* Allocates the state and starts an empty hash. Returns 0, or -ENOMEM (the
 * hasher is then left empty; ms_hasher_free on it is a no-op). */
int ms_hasher_init(ms_hasher *h);
/* Starts over with an empty input, keeping the allocation. */
void ms_hasher_reset(ms_hasher *h);
void ms_hasher_update(ms_hasher *h, const void *data, size_t len);
/* The hash of everything fed so far; does not end the stream. */
uint64_t ms_hasher_digest(const ms_hasher *h);
/* Frees the state. NULL, or a hasher whose init failed, is a no-op. */
void ms_hasher_free(ms_hasher *h);

/* The SHARD hash defined above. header_bytes: the first header_len bytes of
 * the file; tensor_hashes: n tensor hashes in file order. */
uint64_t ms_shard_hash(const void *header_bytes, size_t header_len, const uint64_t *tensor_hashes,
                       size_t n);

/* Writes the 16 hex digits and a NUL into out. */
void ms_hash_to_hex(uint64_t hash, char out[MS_HASH_HEX_LEN + 1]);
/* Parses exactly 16 lowercase hex digits followed by the end of the string.
 * Returns false (and leaves *out alone) for anything else. */
bool ms_hash_from_hex(const char *text, uint64_t *out);

#endif
