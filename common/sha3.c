#include "common/sha3.h"

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha3.h>

#include <stdlib.h>

#include "common/err.h"

struct me_sha3 {
	wc_Sha3 s;
};

int me_sha3_256_2(const void *a, size_t alen, const void *b, size_t blen,
		  uint8_t out[ME_SHA3_256_LEN])
{
	wc_Sha3 s;
	int rc = ME_EINTERNAL;

	if (out == NULL || (a == NULL && alen > 0) || (b == NULL && blen > 0) ||
	    alen > UINT32_MAX || blen > UINT32_MAX)
		return ME_EINTERNAL;
	if (wc_InitSha3_256(&s, NULL, INVALID_DEVID) != 0)
		return ME_EINTERNAL;
	if (alen > 0 && wc_Sha3_256_Update(&s, a, (word32)alen) != 0)
		goto out;
	if (blen > 0 && wc_Sha3_256_Update(&s, b, (word32)blen) != 0)
		goto out;
	if (wc_Sha3_256_Final(&s, out) != 0)
		goto out;
	rc = 0;
out:
	wc_Sha3_256_Free(&s);
	return rc;
}

struct me_sha3 *me_sha3_new(void)
{
	struct me_sha3 *h = malloc(sizeof(*h));
	if (h != NULL && wc_InitSha3_256(&h->s, NULL, INVALID_DEVID) != 0) {
		free(h);
		h = NULL;
	}
	return h;
}

int me_sha3_update(struct me_sha3 *h, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	while (len > 0) {
		word32 k = len > (1u << 30) ? (1u << 30) : (word32)len;
		if (wc_Sha3_256_Update(&h->s, p, k) != 0)
			return ME_EINTERNAL;
		p += k;
		len -= k;
	}
	return 0;
}

int me_sha3_final(struct me_sha3 *h, uint8_t out[ME_SHA3_256_LEN])
{
	return wc_Sha3_256_Final(&h->s, out) == 0 ? 0 : ME_EINTERNAL;
}

void me_sha3_free(struct me_sha3 *h)
{
	if (h == NULL)
		return;
	wc_Sha3_256_Free(&h->s);
	free(h);
}
