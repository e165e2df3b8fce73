/* Calibration tokens for the forward passes (mergestream hessian /
 * perplexity), from one of two formats, told apart by content (the name's
 * extension decides nothing: calib.bin may be either):
 *
 * - safetensors (the file starts like one: an 8-byte length that fits the
 *   file, then '{'; a name ending in ".safetensors" is read as one whatever
 *   it holds, so that a damaged header is named as such): "input_ids",
 *   integer dtype (I8..I64, U8..U64), shape [n, seq] (or [seq]: one
 *   sample); optional "attention_mask" of the same shape, BOOL or an
 *   integer dtype, every value 0 or 1 (1 = a real token). Without a mask
 *   every position is real.
 * - text: one sample per line, token ids as decimal integers separated by
 *   spaces or tabs; blank lines are skipped; CRLF line ends and a leading
 *   UTF-8 byte order mark are accepted. Samples of different lengths are
 *   right-padded (mask 0).
 * A PyTorch checkpoint (a zip archive or a pickle) is refused as not a
 * calibration file.
 *
 * Options: max_samples keeps the first N samples (text: non-blank lines;
 * safetensors: rows of input_ids, empty ones included, as input_ids[:N]);
 * seq_len sets the padded length by raw position, as input_ids[:, :seq_len]
 * (longer samples keep their first seq_len positions, shorter ones are
 * padded), default the file's [n, seq] width or the longest line. A
 * left-padded row whose real tokens all lie at or past seq_len keeps none.
 *
 * Samples without a real token (an all-zero attention_mask row, or one
 * emptied by seq_len) are dropped: the rows of ids/mask, and n_samples,
 * are the samples that reach the forward pass.
 *
 * Real tokens must be ids >= 0 (checked here) and below the vocabulary
 * (ms_calib_check_vocab); padding ids are never read by the forward pass
 * and not checked. Errors name the file and where in it: text "line L,
 * token T" (both 1-based, as an editor counts), safetensors
 * "input_ids[row][position]" (0-based indices into the tensor). Offending
 * bytes are printed escaped (\x00). MS_EXIT_DATA for content (no samples,
 * no real token at all, a bad id, a bad dtype, shape or mask value, a
 * PyTorch checkpoint), MS_EXIT_RUNTIME for I/O. */
#ifndef MS_CALIB_INPUT_H
#define MS_CALIB_INPUT_H

#include <stdbool.h>
#include <stdint.h>

#include "io/ms_error.h"

#define MS_CALIB_MAX_TEXT_BYTES (1ull << 31) /* text files above 2 GiB are refused */

typedef struct ms_calib {
    char *path;
    bool text;               /* the file was text: origin is a line number, else a row of input_ids */
    unsigned ids_ndim;       /* safetensors: input_ids' dimensions (1 or 2), for messages */
    uint64_t n_samples;      /* samples with at least one real token: the rows of ids and mask */
    uint64_t seq_len;
    int64_t *ids;     /* n_samples x seq_len, row-major; padding: 0 */
    uint8_t *mask;    /* n_samples x seq_len: 1 real token, 0 padding */
    uint64_t *origin; /* n_samples: where each row came from: its 1-based line (text) or
                         its 0-based row of input_ids (safetensors) */
    uint64_t n_real;  /* positions with mask 1 */
    uint64_t n_truncated;    /* samples that lost tokens to seq_len (n_emptied included) */
    uint64_t n_read;         /* samples read (after max_samples), dropped ones included */
    uint64_t n_empty;        /* samples dropped with no real token in the file (an all-zero mask row) */
    uint64_t n_emptied;      /* samples dropped with every real token at or past seq_len (left padding) */
    uint64_t max_position;   /* 1 + the largest position of a real token: what the model must cover */
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

/* Fails (MS_EXIT_DATA, naming the id and where it is in the file: "line L,
 * token T" or "input_ids[row][position]") when a real token is >= vocab.
 * Returns 0 or -1. */
int ms_calib_check_vocab(const ms_calib *c, uint64_t vocab, ms_error *err);

#endif
