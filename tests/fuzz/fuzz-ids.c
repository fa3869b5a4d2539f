/* Identifiers from outside (common/ids.h, common/b58.h): the input, up to its first NUL byte,
 * as a base58 string, a did:key (standard or legacy), a did:repo and a bootstrap node
 * "did:key:...@ip:port" (daemon/config.h); the whole input as bytes to base58-encode.
 *
 * Invariants: base58 is a bijection (a string that decodes re-encodes to itself; bytes that
 * encode decode to themselves); a did:key that parses is in the standard form, which
 * normalisation leaves alone, or in the legacy form, which normalises to the standard form of
 * the same key; a did:repo that parses is the multihash of its digest; a bootstrap address
 * that parses has a normalised text form that parses to the same address. */
#include <string.h>

#include "common/b58.h"
#include "common/err.h"
#include "common/ids.h"
#include "daemon/config.h"
#include "tests/fuzz/fuzz.h"

#define MAX_IN 1024

static void check_b58(const char *s)
{
	uint8_t bytes[ME_B58_MAX_CHARS];
	char enc[2 * ME_B58_MAX_CHARS];
	int n = me_b58_decode(s, bytes, sizeof(bytes));

	if (n < 0) {
		FUZZ_ASSERT(n == ME_EBADID || n == ME_ETOOBIG);
		return;
	}
	FUZZ_ASSERT(*s != '\0' && strlen(s) <= ME_B58_MAX_CHARS);
	if (n <= 128) {
		FUZZ_ASSERT(me_b58_encode(bytes, (size_t)n, enc, sizeof(enc)) == (int)strlen(s));
		FUZZ_ASSERT(strcmp(enc, s) == 0);
	}
}

static void check_bytes(const uint8_t *data, size_t size)
{
	uint8_t back[256];
	char enc[256];
	size_t n = size < 128 ? size : 128;
	int len = me_b58_encode(data, n, enc, sizeof(enc));

	FUZZ_ASSERT(len >= 0 && (size_t)len == strlen(enc));
	if (n == 0) {
		FUZZ_ASSERT(len == 0);
		return;
	}
	FUZZ_ASSERT(me_b58_decode(enc, back, sizeof(back)) == (int)n);
	FUZZ_ASSERT(memcmp(back, data, n) == 0);
}

static void check_did_key(const char *s)
{
	uint8_t pk[ME_PK_LEN], pk2[ME_PK_LEN], body[64];
	char std[ME_DID_KEY_SIZE], norm[ME_DID_KEY_SIZE];
	int rc = me_did_key_parse(s, pk);
	int nrc = me_did_key_normalize(s, norm, sizeof(norm));

	FUZZ_ASSERT(rc == 0 || rc == ME_EBADID);
	FUZZ_ASSERT(nrc == rc);
	if (rc < 0) {
		FUZZ_ASSERT(norm[0] == '\0');
		return;
	}
	FUZZ_ASSERT(me_did_key_from_pk(pk, std, sizeof(std)) == 0 && strcmp(norm, std) == 0);
	FUZZ_ASSERT(me_did_key_parse(std, pk2) == 0 && memcmp(pk, pk2, ME_PK_LEN) == 0);
	if (strcmp(s, std) != 0) {
		/* Only the legacy form differs: "did:key:z" + base58(0xed || key). */
		FUZZ_ASSERT(me_b58_decode(s + 9, body, sizeof(body)) == 1 + ME_PK_LEN);
		FUZZ_ASSERT(body[0] == 0xed && memcmp(body + 1, pk, ME_PK_LEN) == 0);
	}
}

static void check_did_repo(const char *s)
{
	uint8_t digest[32], mh[34];
	char enc[ME_DID_REPO_SIZE];
	int rc = me_did_repo_parse(s, digest);

	FUZZ_ASSERT(rc == 0 || rc == ME_EBADID);
	FUZZ_ASSERT(me_did_repo_valid(s) == (rc == 0));
	if (rc < 0)
		return;
	mh[0] = 0x16;
	mh[1] = 0x20;
	memcpy(mh + 2, digest, 32);
	FUZZ_ASSERT(strncmp(s, "did:repo:z", 10) == 0);
	FUZZ_ASSERT(me_b58_encode(mh, sizeof(mh), enc, sizeof(enc)) > 0 && strcmp(enc, s + 10) == 0);
}

static void check_bootstrap(const char *s)
{
	struct me_bootstrap b;
	struct me_sockaddr a2;
	uint8_t pk[ME_PK_LEN];
	int rc = me_bootstrap_parse(s, &b);

	FUZZ_ASSERT(rc == 0 || rc == ME_EBADID || rc == ME_EINVAL);
	if (rc < 0)
		return;
	FUZZ_ASSERT(me_did_key_parse(b.did, pk) == 0);
	FUZZ_ASSERT(b.addr.len > 0 && strnlen(b.addr.text, sizeof(b.addr.text)) <
					      sizeof(b.addr.text));
	FUZZ_ASSERT(me_sockaddr_parse(b.addr.text, &a2) == 0);
	FUZZ_ASSERT(a2.len == b.addr.len && memcmp(&a2.ss, &b.addr.ss, a2.len) == 0);
	FUZZ_ASSERT(strcmp(a2.text, b.addr.text) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char s[MAX_IN + 1];
	size_t n = size < MAX_IN ? size : MAX_IN;

	memcpy(s, data, n);
	s[n] = '\0';
	check_b58(s);
	check_did_key(s);
	check_did_repo(s);
	check_bootstrap(s);
	check_bytes(data, size);
	return 0;
}
