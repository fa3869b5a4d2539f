/* me-idtool: computes and parses ids with the C code, for the Python tests.
 *   me-idtool did-key <64-hex-pk>
 *   me-idtool did-repo <40-hex-root-oid> <64-hex-pk>
 *   me-idtool parse-key <did>     -> normalised did:key, then hex public key
 *   me-idtool parse-repo <did>    -> hex digest
 * Exit 0 on success, 1 when an id is rejected, 2 on usage errors. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "common/ids.h"

static int usage(void)
{
	fprintf(stderr, "usage: me-idtool did-key <64-hex-pk>\n"
			"       me-idtool did-repo <40-hex-root-oid> <64-hex-pk>\n"
			"       me-idtool parse-key <did>\n"
			"       me-idtool parse-repo <did>\n");
	return 2;
}

static int nibble(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Exactly 2n hex digits. 0 or -1. */
static int unhex(const char *s, uint8_t *out, size_t n)
{
	if (strlen(s) != 2 * n)
		return -1;
	for (size_t i = 0; i < n; i++) {
		int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -1;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

static void puthex(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		printf("%02x", p[i]);
	putchar('\n');
}

static int fail(const char *what, int rc)
{
	fprintf(stderr, "me-idtool: %s: %s (%s)\n", what, me_strerror(rc), me_errname(rc));
	return 1;
}

int main(int argc, char **argv)
{
	uint8_t pk[ME_PK_LEN], oid[ME_OID_LEN], digest[32];
	char s[ME_DID_KEY_SIZE > ME_DID_REPO_SIZE ? ME_DID_KEY_SIZE : ME_DID_REPO_SIZE];
	int rc;

	if (argc < 2)
		return usage();
	if (strcmp(argv[1], "did-key") == 0 && argc == 3) {
		if (unhex(argv[2], pk, sizeof(pk)) != 0)
			return usage();
		if ((rc = me_did_key_from_pk(pk, s, sizeof(s))) != 0)
			return fail("did-key", rc);
		puts(s);
	} else if (strcmp(argv[1], "did-repo") == 0 && argc == 4) {
		if (unhex(argv[2], oid, sizeof(oid)) != 0 || unhex(argv[3], pk, sizeof(pk)) != 0)
			return usage();
		if ((rc = me_did_repo_compute(oid, pk, s, sizeof(s))) != 0)
			return fail("did-repo", rc);
		puts(s);
	} else if (strcmp(argv[1], "parse-key") == 0 && argc == 3) {
		if ((rc = me_did_key_parse(argv[2], pk)) != 0)
			return fail("parse-key", rc);
		if ((rc = me_did_key_normalize(argv[2], s, sizeof(s))) != 0)
			return fail("parse-key", rc);
		puts(s);
		puthex(pk, sizeof(pk));
	} else if (strcmp(argv[1], "parse-repo") == 0 && argc == 3) {
		if ((rc = me_did_repo_parse(argv[2], digest)) != 0)
			return fail("parse-repo", rc);
		puthex(digest, sizeof(digest));
	} else {
		return usage();
	}
	return fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1;
}
