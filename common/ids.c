#include "common/ids.h"

#include <string.h>

#include "common/b58.h"
#include "common/err.h"
#include "common/sha3.h"

#define DID_KEY_PREFIX "did:key:z"
#define DID_REPO_PREFIX "did:repo:z"

/* Multicodec ed25519-pub (0xed, varint 0xed 0x01) and multihash sha3-256 (0x16, 32 bytes). */
#define MC_ED25519_0 0xed
#define MC_ED25519_1 0x01
#define MH_SHA3_256 0x16
#define MH_LEN_32 0x20

/* Writes prefix || base58(bytes) into out. 0 or ME_ETOOBIG. */
static int did_format(const char *prefix, const uint8_t *bytes, size_t n, char *out, size_t outsz)
{
	size_t plen = strlen(prefix);
	int rc;

	if (out == NULL)
		return ME_ETOOBIG;
	if (outsz <= plen) {
		if (outsz > 0)
			out[0] = '\0';
		return ME_ETOOBIG;
	}
	memcpy(out, prefix, plen);
	rc = me_b58_encode(bytes, n, out + plen, outsz - plen);
	if (rc < 0) {
		out[0] = '\0';
		return rc == ME_ETOOBIG ? ME_ETOOBIG : ME_EINTERNAL;
	}
	return 0;
}

/* Checks the prefix and the length bound, then decodes the base58 body into buf.
 * Returns the decoded length or ME_EBADID. */
static int did_decode(const char *s, const char *prefix, size_t maxlen, uint8_t *buf,
		      size_t bufsz)
{
	size_t plen = strlen(prefix);
	int n;

	if (s == NULL || strnlen(s, maxlen) >= maxlen || strncmp(s, prefix, plen) != 0)
		return ME_EBADID;
	n = me_b58_decode(s + plen, buf, bufsz);
	return n < 0 ? ME_EBADID : n;
}

int me_did_key_from_pk(const uint8_t pk[ME_PK_LEN], char *out, size_t outsz)
{
	uint8_t buf[2 + ME_PK_LEN];

	if (pk == NULL)
		return ME_EINVAL;
	buf[0] = MC_ED25519_0;
	buf[1] = MC_ED25519_1;
	memcpy(buf + 2, pk, ME_PK_LEN);
	return did_format(DID_KEY_PREFIX, buf, sizeof(buf), out, outsz);
}

int me_did_key_parse(const char *s, uint8_t pk[ME_PK_LEN])
{
	/* One spare byte so that over-long bodies decode and are then refused by length. */
	uint8_t buf[2 + ME_PK_LEN + 1];
	int n;

	if (pk == NULL)
		return ME_EBADID;
	n = did_decode(s, DID_KEY_PREFIX, ME_DID_KEY_SIZE, buf, sizeof(buf));
	if (n == 2 + ME_PK_LEN && buf[0] == MC_ED25519_0 && buf[1] == MC_ED25519_1) {
		memcpy(pk, buf + 2, ME_PK_LEN);
		return 0;
	}
	/* Legacy MegaEngine form: a single 0xed byte instead of the varint. */
	if (n == 1 + ME_PK_LEN && buf[0] == MC_ED25519_0) {
		memcpy(pk, buf + 1, ME_PK_LEN);
		return 0;
	}
	return ME_EBADID;
}

int me_did_key_normalize(const char *s, char *out, size_t outsz)
{
	uint8_t pk[ME_PK_LEN];
	int rc;

	if (out != NULL && outsz > 0)
		out[0] = '\0';
	rc = me_did_key_parse(s, pk);
	if (rc < 0)
		return rc;
	return me_did_key_from_pk(pk, out, outsz);
}

int me_did_repo_compute(const uint8_t root_oid[ME_OID_LEN], const uint8_t creator_pk[ME_PK_LEN],
			char *out, size_t outsz)
{
	uint8_t buf[2 + ME_SHA3_256_LEN];

	if (root_oid == NULL || creator_pk == NULL)
		return ME_EINVAL;
	buf[0] = MH_SHA3_256;
	buf[1] = MH_LEN_32;
	if (me_sha3_256_2(root_oid, ME_OID_LEN, creator_pk, ME_PK_LEN, buf + 2) != 0)
		return ME_EINTERNAL;
	return did_format(DID_REPO_PREFIX, buf, sizeof(buf), out, outsz);
}

int me_did_repo_parse(const char *s, uint8_t digest[32])
{
	uint8_t buf[2 + ME_SHA3_256_LEN + 1];
	int n;

	if (digest == NULL)
		return ME_EBADID;
	n = did_decode(s, DID_REPO_PREFIX, ME_DID_REPO_SIZE, buf, sizeof(buf));
	if (n != 2 + ME_SHA3_256_LEN || buf[0] != MH_SHA3_256 || buf[1] != MH_LEN_32)
		return ME_EBADID;
	memcpy(digest, buf + 2, ME_SHA3_256_LEN);
	return 0;
}

bool me_did_repo_valid(const char *s)
{
	uint8_t digest[ME_SHA3_256_LEN];

	return me_did_repo_parse(s, digest) == 0;
}
