#include "common/sha3.h"

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha3.h>

#include "common/err.h"

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
