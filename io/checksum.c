#include "io/checksum.h"

#include <errno.h>

/* Compiled into this file: the state may then live on the stack
 * (ms_shard_hash cannot fail) without depending on the shared library's
 * private struct layout. Same algorithm, same values as libxxhash. */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "io/ms_error.h"

uint64_t ms_hash64(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}

uint64_t ms_hash64_seed(const void *data, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(data, len, seed);
}

int ms_hasher_init(ms_hasher *h)
{
    h->state = XXH3_createState();
    if (!h->state)
        return -ENOMEM;
    ms_hasher_reset(h);
    return 0;
}

void ms_hasher_reset(ms_hasher *h)
{
    /* Only fails for a NULL state, which is a caller bug. */
    MS_ASSERT(XXH3_64bits_reset((XXH3_state_t *)h->state) == XXH_OK);
}

void ms_hasher_update(ms_hasher *h, const void *data, size_t len)
{
    if (len == 0)
        return;
    MS_ASSERT(XXH3_64bits_update((XXH3_state_t *)h->state, data, len) == XXH_OK);
}

uint64_t ms_hasher_digest(const ms_hasher *h)
{
    return XXH3_64bits_digest((const XXH3_state_t *)h->state);
}

void ms_hasher_free(ms_hasher *h)
{
    if (!h)
        return;
    XXH3_freeState((XXH3_state_t *)h->state); /* NULL-safe */
    h->state = NULL;
}

static void put_le64(unsigned char out[8], uint64_t v)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(v >> (8 * i));
}

uint64_t ms_shard_hash(const void *header_bytes, size_t header_len, const uint64_t *tensor_hashes,
                       size_t n)
{
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    MS_ASSERT(XXH3_64bits_reset(&state) == XXH_OK);
    if (header_len)
        XXH3_64bits_update(&state, header_bytes, header_len);
    unsigned char le[8];
    for (size_t i = 0; i < n; i++) {
        put_le64(le, tensor_hashes[i]);
        XXH3_64bits_update(&state, le, sizeof le);
    }
    return XXH3_64bits_digest(&state);
}

void ms_hash_to_hex(uint64_t hash, char out[MS_HASH_HEX_LEN + 1])
{
    static const char k_digits[] = "0123456789abcdef";
    for (int i = 0; i < MS_HASH_HEX_LEN; i++)
        out[i] = k_digits[(hash >> (4 * (MS_HASH_HEX_LEN - 1 - i))) & 0xf];
    out[MS_HASH_HEX_LEN] = '\0';
}

bool ms_hash_from_hex(const char *text, uint64_t *out)
{
    if (!text)
        return false;
    uint64_t v = 0;
    for (int i = 0; i < MS_HASH_HEX_LEN; i++) {
        char c = text[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else
            return false; /* also stops at an early NUL */
        v = (v << 4) | d;
    }
    if (text[MS_HASH_HEX_LEN] != '\0')
        return false;
    *out = v;
    return true;
}
