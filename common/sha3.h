/* SHA3-256 from wolfCrypt. */
#ifndef ME_SHA3_H
#define ME_SHA3_H

#include <stddef.h>
#include <stdint.h>

#define ME_SHA3_256_LEN 32

/* Hashes the concatenation of two buffers (either may be empty). Returns 0 or ME_EINTERNAL. */
int me_sha3_256_2(const void *a, size_t alen, const void *b, size_t blen,
		  uint8_t out[ME_SHA3_256_LEN]);


/* Incremental hashing. me_sha3_new returns NULL when out of memory. final may be called once;
 * free is NULL-safe. */
struct me_sha3;
struct me_sha3 *me_sha3_new(void);
int me_sha3_update(struct me_sha3 *h, const void *buf, size_t len);
int me_sha3_final(struct me_sha3 *h, uint8_t out[ME_SHA3_256_LEN]);
void me_sha3_free(struct me_sha3 *h);

#endif
