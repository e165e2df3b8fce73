/* The safetensors format: dtypes, tensor entries, header parsing and
 * validation (as strict as huggingface/safetensors), and opening a file.
 *
 * File layout: 8-byte little-endian header length N; N bytes of UTF-8 JSON
 * (an object: "__metadata__" -> {string: string} or null, and one entry per
 * tensor {"dtype", "shape", "data_offsets": [begin, end]}); then the data
 * section, whose offsets are relative to byte 8 + N. */
#ifndef MS_ST_FORMAT_H
#define MS_ST_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/ms_error.h"

#define ST_MAX_HEADER_BYTES 100000000ull /* the reference implementation's cap */
#define ST_MAX_DIMS 16                   /* deeper tensors are rejected (none exist in practice) */

typedef enum st_dtype {
    ST_BOOL,
    ST_F4,      /* 4 bits, fp4 e2m1 */
    ST_F6_E2M3, /* 6 bits */
    ST_F6_E3M2, /* 6 bits */
    ST_U8,
    ST_I8,
    ST_F8_E5M2,
    ST_F8_E4M3,
    ST_F8_E8M0,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_C64,
    ST_DTYPE_COUNT
} st_dtype;

/* "BF16" etc. as written in headers; NULL for an out-of-range value. */
const char *st_dtype_name(st_dtype dtype);
/* Parses a header dtype name (exact, case-sensitive); returns false for an
 * unknown one and leaves *out untouched. */
bool st_dtype_parse(const char *name, st_dtype *out);
/* Bits per element: 4 for F4, 6 for F6_E2M3 and F6_E3M2, 8 for BOOL and the
 * other one-byte types, up to 64 (F64, I64, U64, C64). 0 for an out-of-range
 * value. */
unsigned st_dtype_bits(st_dtype dtype);
/* True for F16, BF16, F32: the dtypes the merge kernels read and write. */
bool st_dtype_is_mergeable_float(st_dtype dtype);

/* Product of shape[0..ndim) into *out (1 for ndim = 0), multiplied left to
 * right as the reference does. Returns 0, or -EOVERFLOW (and leaves *out
 * untouched) when a partial product does not fit in 64 bits. */
int st_shape_numel(const uint64_t *shape, unsigned ndim, uint64_t *out);
/* Bytes taken by numel elements of dtype into *out. Returns 0; -EOVERFLOW
 * when numel * bits does not fit in 64 bits; -EINVAL when numel * bits is not
 * a multiple of 8 (a sub-byte dtype that does not fill whole bytes). An
 * out-of-range dtype is a broken invariant (MS_ASSERT). */
int st_dtype_nbytes(st_dtype dtype, uint64_t numel, uint64_t *out);

typedef struct st_tensor {
    char *name;                 /* owned by the header */
    st_dtype dtype;
    unsigned ndim;              /* 0 for a scalar */
    uint64_t shape[ST_MAX_DIMS];
    uint64_t numel;             /* product of shape (1 for a scalar), overflow-checked */
    uint64_t begin, end;        /* data_offsets, relative to the data section */
} st_tensor;

typedef struct st_header {
    st_tensor *tensors;  /* sorted by (begin, end), ties in header order: the on-disk order */
    size_t n_tensors;
    size_t *name_order;  /* n_tensors indices into tensors, sorted by name
                            (strcmp): st_header_find's index. Built by
                            st_header_parse; NULL in a hand-built header. */
    char **meta_keys;    /* __metadata__ entries in header order; may be empty */
    char **meta_values;
    size_t n_meta;
    uint64_t header_len; /* N */
    uint64_t data_len;   /* bytes of the data section (= last tensor's end) */
} st_header;

/* Bytes of a validated tensor's data. */
static inline uint64_t st_tensor_nbytes(const st_tensor *t)
{
    return t->end - t->begin;
}

/* Parses and validates the N header bytes `json` (not NUL-terminated) of a
 * file whose total size is file_size (pass UINT64_MAX to skip the
 * end-of-file rule, e.g. when fuzzing). `where` names the file in errors.
 * On success fills *out (free with st_header_free) and returns 0; on failure
 * returns -1 with err set to exit code MS_EXIT_DATA and a message naming the
 * violated rule (MS_EXIT_RUNTIME if memory runs out); *out is left empty.
 * Never reads outside json[0..len). Stricter than the reference in a few
 * places, each documented in st_format.c: the header must start with '{';
 * every number, even in ignored keys, must be an integer <= 2^53; repeated
 * keys are errors; names and values may not contain \u0000. */
int st_header_parse(const char *json, size_t len, uint64_t file_size, const char *where,
                    st_header *out, ms_error *err);
/* Frees what h owns and empties it; st_header_free(NULL) is a no-op. */
void st_header_free(st_header *h);

/* Parses a whole file image held in memory (the 8-byte length, the header,
 * the data section): applies the header-length rules of st_file_open, then
 * st_header_parse on data[8 .. 8 + N) with file_size = size. Same return and
 * ownership as st_header_parse. Never reads outside data[0..size). */
int st_image_parse(const void *data, size_t size, const char *where, st_header *out,
                   ms_error *err);

/* Index of the tensor called name in h->tensors, or -1. O(log n) through
 * h->name_order, which st_header_parse builds, so concurrent calls on a
 * parsed header are safe (read only). A header without name_order is
 * searched linearly. */
long st_header_find(const st_header *h, const char *name);

/* An open, validated safetensors file. */
typedef struct st_file {
    char *path;
    int fd;              /* O_RDONLY, owned */
    int direct_fd;       /* -1, or an O_DIRECT descriptor of it (io/direct_read.h), owned */
    uint64_t file_size;
    int64_t mtime_ns;    /* st_mtim at open, to notice a file replaced during a merge */
    uint64_t data_start; /* 8 + header_len: absolute offset of the data section */
    st_header header;
} st_file;

/* Opens and validates path (reads only the header, with pread; blocks on
 * I/O). Returns 0 and *out on success (close with st_file_close); -1 with
 * err set and *out = NULL on failure: MS_EXIT_DATA for an invalid file (also
 * a directory, a non-regular file or a PyTorch .bin/.pt checkpoint),
 * MS_EXIT_RUNTIME for an I/O error or out of memory (the message ends with
 * strerror). Reads go through the fault seam (MS_FAULT_READ). */
int st_file_open(const char *path, st_file **out, ms_error *err);

/* st_file_open without its refusal of *.bin / *.pt / *.pth names, for files
 * whose name says nothing of their format (a calibration file): the content
 * decides, and a zip or pickle is still named as one by its first bytes. */
int st_file_open_any_name(const char *path, st_file **out, ms_error *err);
/* Closes the descriptors and frees everything; st_file_close(NULL) is a no-op. */
void st_file_close(st_file *f);

/* Checks that f still has the size and modification time it had when opened
 * (a file truncated, rewritten or replaced under a running merge). Returns 0,
 * or -1 with err set (MS_EXIT_DATA naming the file). */
int st_file_check_unchanged(const st_file *f, ms_error *err);

/* Writes the shape as "[2048, 8192]" ("[]" for a scalar) into buf,
 * truncating to n bytes. */
void st_shape_format(const st_tensor *t, char *buf, size_t n);

/* Absolute file offset of a tensor's first byte. */
static inline uint64_t st_file_tensor_offset(const st_file *f, const st_tensor *t)
{
    return f->data_start + t->begin;
}

#endif
