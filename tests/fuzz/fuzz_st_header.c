/* libFuzzer target: the input is a whole safetensors file image.
 *
 * The harness reads the 8-byte length itself, copies the header into a
 * buffer of exactly that size (so AddressSanitizer catches any read past
 * the slice, not just past the input) and runs st_header_parse on it with
 * file_size = size. Every outcome is checked against the contract: a
 * failure is MS_EXIT_DATA with a message; a success is a sorted, contiguous,
 * size-consistent layout that st_header_find can index. st_image_parse must
 * agree with the hand-made slice. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/st_format.h"

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            ms_assert_fail(__FILE__, __LINE__, #cond);                         \
    } while (0)

static void header_check(const st_header *h, uint64_t len, uint64_t size)
{
    CHECK(h->header_len == len);
    CHECK(8 + len + h->data_len == size);
    uint64_t expect = 0;
    for (size_t i = 0; i < h->n_tensors; i++) {
        const st_tensor *t = &h->tensors[i];
        CHECK(t->name != NULL);
        CHECK(t->begin == expect && t->begin <= t->end);
        CHECK((unsigned)t->dtype < ST_DTYPE_COUNT && t->ndim <= ST_MAX_DIMS);
        uint64_t numel = 0, nbytes = 0;
        CHECK(st_shape_numel(t->shape, t->ndim, &numel) == 0 && numel == t->numel);
        CHECK(st_dtype_nbytes(t->dtype, numel, &nbytes) == 0 && nbytes == t->end - t->begin);
        CHECK(st_header_find(h, t->name) == (long)i);
        expect = t->end;
    }
    CHECK(expect == h->data_len);
    for (size_t i = 0; i < h->n_meta; i++)
        CHECK(h->meta_keys[i] != NULL && h->meta_values[i] != NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_header h, h2;
    ms_error err = {0}, err2 = {0};
    int rc_image = st_image_parse(data, size, "fuzz", &h2, &err2);
    CHECK(rc_image == 0 || (rc_image == -1 && err2.exit_code == MS_EXIT_DATA && err2.msg[0]));

    uint64_t n = 0;
    for (int i = 7; size >= 8 && i >= 0; i--)
        n = (n << 8) | data[i];
    if (size < 8 || n > ST_MAX_HEADER_BYTES || n > size - 8) {
        CHECK(rc_image == -1);
        return 0;
    }
    char *json = malloc(n ? (size_t)n : 1);
    CHECK(json != NULL);
    memcpy(json, data + 8, (size_t)n);
    int rc = st_header_parse(json, (size_t)n, size, "fuzz", &h, &err);
    free(json);
    CHECK(rc == rc_image);
    if (rc == 0) {
        header_check(&h, n, size);
        CHECK(h.n_tensors == h2.n_tensors && h.n_meta == h2.n_meta);
        st_header_free(&h);
        st_header_free(&h2);
    } else {
        CHECK(err.exit_code == MS_EXIT_DATA && err.msg[0]);
        CHECK(strcmp(err.msg, err2.msg) == 0);
        CHECK(h.tensors == NULL && h.n_tensors == 0 && h.name_order == NULL);
    }
    return 0;
}
