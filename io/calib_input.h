/* Calibration tokens for the forward passes (mergestream hessian /
 * perplexity), from one of two formats:
 *
 * - safetensors (a name ending in ".safetensors", or any file that starts
 *   like one: an 8-byte length then '{'): "input_ids", integer dtype (I8..I64,
 *   U8..U64), shape [n, seq] (or [seq]: one sample); optional
 *   "attention_mask" of the same shape, BOOL or an integer dtype, every value
 *   0 or 1 (1 = a real token). Without a mask every position is real.
 * - text: one sample per line, token ids as decimal integers separated by
 *   spaces or tabs; blank lines are skipped; CRLF line ends are accepted.
 *   Samples of different lengths are right-padded (mask 0).
 *
 * Options: max_samples keeps the first N samples; seq_len sets the padded
 * length (longer samples keep their first seq_len positions, shorter ones
 * are padded), default the file's [n, seq] width or the longest line.
 *
 * Real tokens must be ids >= 0 (checked here) and below the vocabulary
 * (ms_calib_check_vocab); padding ids are never read by the forward pass
 * and not checked. Errors name the file and the sample (0-based; text:
 * also the line) and position: MS_EXIT_DATA for content (no samples, no
 * real token at all, a bad id, a bad dtype, shape or mask value),
 * MS_EXIT_RUNTIME for I/O. */
#ifndef MS_CALIB_INPUT_H
#define MS_CALIB_INPUT_H

#include <stdint.h>

#include "io/ms_error.h"

#define MS_CALIB_MAX_TEXT_BYTES (1ull << 31) /* text files above 2 GiB are refused */

typedef struct ms_calib {
    char *path;
    uint64_t n_samples;
    uint64_t seq_len;
    int64_t *ids;     /* n_samples x seq_len, row-major; padding: the file's value (text: 0) */
    uint8_t *mask;    /* n_samples x seq_len: 1 real token, 0 padding */
    uint64_t n_real;  /* positions with mask 1 */
    uint64_t n_truncated; /* samples that lost tokens to seq_len */
} ms_calib;

typedef struct ms_calib_options {
    uint64_t max_samples; /* 0: all */
    uint64_t seq_len;     /* 0: the file's */
} ms_calib_options;

/* Reads path (opt may be NULL: all defaults). Returns 0 and *out (free with
 * ms_calib_free), or -1 with err set and *out = NULL. Blocks on I/O. */
int ms_calib_load(const char *path, const ms_calib_options *opt, ms_calib **out, ms_error *err);

/* NULL is a no-op. */
void ms_calib_free(ms_calib *c);

/* Fails (MS_EXIT_DATA, naming the sample, position and id) when a real token
 * is >= vocab. Returns 0 or -1. */
int ms_calib_check_vocab(const ms_calib *c, uint64_t vocab, ms_error *err);

#endif
