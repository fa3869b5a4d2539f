/* did:key and did:repo: published and independently computed vectors, legacy normalisation,
 * malformed input. Also covers the SHA3-256 wrapper. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "common/b58.h"
#include "common/err.h"
#include "common/ids.h"
#include "common/sha3.h"

/* W3C did:key test vector (did-spec-registries / did-method-key, Ed25519 example). Checked with
 * a Python base58: "did:key:z" + b58(bytes([0xed, 0x01]) + pk). */
static const char w3c_pk_hex[] =
	"2e6fcce36701dc791488e0d0b1745cc1e33a4c1c9fcc41c63bd343dbbe0970e6";
static const char w3c_did[] = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
/* The same key in the legacy MegaEngine form: "did:key:z" + b58(bytes([0xed]) + pk). */
static const char w3c_legacy[] = "did:key:z2DTYLUEG8fdXVQQ7mNGgh917Ft7fGA2kpKkewvPK8TWAMK";

/* did:repo for root oid 00 01 02 .. 13 and the W3C public key above, computed with Python:
 *   d = hashlib.sha3_256(bytes(range(20)) + pk).digest()
 *   "did:repo:z" + b58(bytes([0x16, 0x20]) + d)      (b58 = textbook big-integer base58btc) */
static const char repo_digest_hex[] =
	"7969ddf8b87ab7136e121f47da8e4250a386509196b4b41f8f16f4c680dbc034";
static const char repo_did[] = "did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B";

static void unhex(const char *hex, uint8_t *out, size_t n)
{
	assert_int_equal(strlen(hex), 2 * n);
	for (size_t i = 0; i < n; i++) {
		unsigned int v;
		assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
		out[i] = (uint8_t)v;
	}
}

/* "prefix" + b58(bytes). */
static void mkdid(const char *prefix, const uint8_t *bytes, size_t n, char *out, size_t outsz)
{
	size_t plen = strlen(prefix);

	assert_true(plen < outsz);
	memcpy(out, prefix, plen);
	assert_true(me_b58_encode(bytes, n, out + plen, outsz - plen) > 0);
}

static void test_sha3(void **state)
{
	uint8_t d[ME_SHA3_256_LEN], want[ME_SHA3_256_LEN];

	(void)state;
	/* FIPS 202 / hashlib.sha3_256 vectors. */
	unhex("a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a", want, 32);
	assert_int_equal(me_sha3_256_2(NULL, 0, NULL, 0, d), 0);
	assert_memory_equal(d, want, 32);
	unhex("3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532", want, 32);
	assert_int_equal(me_sha3_256_2("abc", 3, NULL, 0, d), 0);
	assert_memory_equal(d, want, 32);
	assert_int_equal(me_sha3_256_2("a", 1, "bc", 2, d), 0);
	assert_memory_equal(d, want, 32);
	assert_int_equal(me_sha3_256_2(NULL, 0, "abc", 3, d), 0);
	assert_memory_equal(d, want, 32);
}

static void test_did_key_vector(void **state)
{
	uint8_t pk[ME_PK_LEN], got[ME_PK_LEN];
	char s[ME_DID_KEY_SIZE];

	(void)state;
	unhex(w3c_pk_hex, pk, sizeof(pk));
	assert_int_equal(me_did_key_from_pk(pk, s, sizeof(s)), 0);
	assert_string_equal(s, w3c_did);
	assert_int_equal(me_did_key_parse(w3c_did, got), 0);
	assert_memory_equal(got, pk, sizeof(pk));
	assert_int_equal(me_did_key_normalize(w3c_did, s, sizeof(s)), 0);
	assert_string_equal(s, w3c_did);
}

static void test_did_key_buffers(void **state)
{
	uint8_t pk[ME_PK_LEN];
	char s[ME_DID_KEY_SIZE];
	size_t len = strlen(w3c_did);

	(void)state;
	unhex(w3c_pk_hex, pk, sizeof(pk));
	assert_int_equal(me_did_key_from_pk(pk, s, len + 1), 0);
	assert_int_equal(me_did_key_from_pk(pk, s, len), ME_ETOOBIG);
	assert_string_equal(s, "");
	assert_int_equal(me_did_key_from_pk(pk, s, 5), ME_ETOOBIG);
	assert_int_equal(me_did_key_from_pk(pk, s, 0), ME_ETOOBIG);
	assert_int_equal(me_did_key_normalize(w3c_legacy, s, len), ME_ETOOBIG);
	/* Any key fits ME_DID_KEY_SIZE. */
	memset(pk, 0xff, sizeof(pk));
	assert_int_equal(me_did_key_from_pk(pk, s, sizeof(s)), 0);
	memset(pk, 0x00, sizeof(pk));
	assert_int_equal(me_did_key_from_pk(pk, s, sizeof(s)), 0);
}

static void test_did_key_legacy(void **state)
{
	uint8_t pk[ME_PK_LEN], got[ME_PK_LEN], raw[1 + ME_PK_LEN];
	char s[ME_DID_KEY_SIZE], legacy[ME_DID_KEY_SIZE];

	(void)state;
	unhex(w3c_pk_hex, pk, sizeof(pk));
	assert_int_equal(me_did_key_parse(w3c_legacy, got), 0);
	assert_memory_equal(got, pk, sizeof(pk));
	assert_int_equal(me_did_key_normalize(w3c_legacy, s, sizeof(s)), 0);
	assert_string_equal(s, w3c_did);

	/* Legacy ids of extreme keys start "z2D" too and normalise. */
	for (int v = 0; v < 256; v += 85) {
		memset(pk, v, sizeof(pk));
		raw[0] = 0xed;
		memcpy(raw + 1, pk, sizeof(pk));
		mkdid("did:key:z", raw, sizeof(raw), legacy, sizeof(legacy));
		assert_memory_equal(legacy, "did:key:z2D", 11);
		assert_int_equal(me_did_key_parse(legacy, got), 0);
		assert_memory_equal(got, pk, sizeof(pk));
		assert_int_equal(me_did_key_normalize(legacy, s, sizeof(s)), 0);
		assert_memory_equal(s, "did:key:z6Mk", 12);
		assert_int_equal(me_did_key_parse(s, got), 0);
		assert_memory_equal(got, pk, sizeof(pk));
	}
}

static void test_did_key_malformed(void **state)
{
	static const char *const bad[] = {
		"",
		"did:key:",
		"did:key:z",
		"did:kee:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
		"DID:KEY:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
		"did:key:6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",     /* no multibase */
		"did:key:f6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",    /* 'f' multibase */
		"did:key:Z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2do0",    /* '0' */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doI",    /* 'I' */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2dol",    /* 'l' */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doO",    /* 'O' */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2do\xc3", /* non-ASCII */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2do",     /* truncated */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doKK",   /* trailing */
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK ",
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK\n",
		" did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
		"did:key:z16MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",   /* leading zero byte */
		"did:key:z6DtQv2PmvaVMPbQDQEUC8uPqrhAsdbzceu3xNdJBNyeoZjb",    /* 0xe7 0x01 || pk */
		"did:key:zGxrhD4TYC22UHBDrvkt8jbTnxzF79qtAN1q27f8jUJUw",       /* legacy, 31 bytes */
		"did:key:z6Mz9JwBXnqWDaNH2rptECAKUcgcPstrkPsmgVQdV1uyiGeT",    /* legacy, 33 bytes */
		"did:key:z2DTYLUEG8fdXVQQ7mNGgh917Ft7fGA2kpKkewvPK8TWAM",      /* legacy truncated */
		"did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
	};
	uint8_t pk[ME_PK_LEN], raw[40];
	char s[512], out[ME_DID_KEY_SIZE];

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(me_did_key_parse(bad[i], pk), ME_EBADID);
		assert_int_equal(me_did_key_normalize(bad[i], out, sizeof(out)), ME_EBADID);
		assert_string_equal(out, "");
	}
	assert_int_equal(me_did_key_parse(NULL, pk), ME_EBADID);
	assert_int_equal(me_did_key_parse(w3c_did, NULL), ME_EBADID);

	/* Wrong multicodec / lengths built here. */
	unhex(w3c_pk_hex, raw + 2, ME_PK_LEN);
	raw[0] = 0xe7, raw[1] = 0x01;                            /* secp256k1-pub */
	mkdid("did:key:z", raw, 2 + ME_PK_LEN, s, sizeof(s));
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
	raw[0] = 0xed, raw[1] = 0x02;
	mkdid("did:key:z", raw, 2 + ME_PK_LEN, s, sizeof(s));
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
	raw[1] = 0x01;
	mkdid("did:key:z", raw, 2 + ME_PK_LEN + 1, s, sizeof(s));
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
	mkdid("did:key:z", raw, 2 + ME_PK_LEN - 2, s, sizeof(s));
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
	mkdid("did:key:z", raw + 1, 1 + ME_PK_LEN, s, sizeof(s)); /* 0x01 || pk */
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);

	/* Far too long. */
	memcpy(s, "did:key:z", 9);
	memset(s + 9, '2', sizeof(s) - 10);
	s[sizeof(s) - 1] = '\0';
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
	/* One byte too long for ME_DID_KEY_SIZE. */
	s[ME_DID_KEY_SIZE] = '\0';
	assert_int_equal(me_did_key_parse(s, pk), ME_EBADID);
}

static void test_did_repo_vector(void **state)
{
	uint8_t oid[ME_OID_LEN], pk[ME_PK_LEN], digest[32], want[32];
	char s[ME_DID_REPO_SIZE];
	size_t len = strlen(repo_did);

	(void)state;
	for (int i = 0; i < ME_OID_LEN; i++)
		oid[i] = (uint8_t)i;
	unhex(w3c_pk_hex, pk, sizeof(pk));
	unhex(repo_digest_hex, want, sizeof(want));
	assert_int_equal(me_did_repo_compute(oid, pk, s, sizeof(s)), 0);
	assert_string_equal(s, repo_did);
	assert_int_equal(me_did_repo_parse(repo_did, digest), 0);
	assert_memory_equal(digest, want, sizeof(want));
	assert_true(me_did_repo_valid(repo_did));
	assert_int_equal(me_did_repo_compute(oid, pk, s, len + 1), 0);
	assert_int_equal(me_did_repo_compute(oid, pk, s, len), ME_ETOOBIG);
	assert_int_equal(me_did_repo_compute(oid, pk, s, 3), ME_ETOOBIG);

	/* A different creator or root gives a different id. */
	pk[0] ^= 1;
	assert_int_equal(me_did_repo_compute(oid, pk, s, sizeof(s)), 0);
	assert_string_not_equal(s, repo_did);
	assert_true(me_did_repo_valid(s));
}

static void test_did_repo_malformed(void **state)
{
	static const char *const bad[] = {
		"",
		"did:repo:",
		"did:repo:z",
		"did:rep0:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
		"did:key:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
		"did:repo:W1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
		"did:repo:fW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
		"did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6",
		"did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6BB",
		"did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT60",
		"did:repo:zW1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B\n",
		"did:repo:z1W1hcwC73xksnAUBXCDT7Uv3UNPqfztXSgudbyKCGKeBT6B",
		"did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
	};
	uint8_t digest[32], raw[40];
	char s[512];

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(me_did_repo_parse(bad[i], digest), ME_EBADID);
		assert_false(me_did_repo_valid(bad[i]));
	}
	assert_int_equal(me_did_repo_parse(NULL, digest), ME_EBADID);
	assert_false(me_did_repo_valid(NULL));

	unhex(repo_digest_hex, raw + 2, 32);
	raw[0] = 0x16, raw[1] = 0x20;
	mkdid("did:repo:z", raw, 34, s, sizeof(s));
	assert_string_equal(s, repo_did);
	raw[0] = 0x12;                                   /* sha2-256 */
	mkdid("did:repo:z", raw, 34, s, sizeof(s));
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
	raw[0] = 0x16, raw[1] = 0x1f;                    /* declared length 31 */
	mkdid("did:repo:z", raw, 34, s, sizeof(s));
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
	mkdid("did:repo:z", raw, 33, s, sizeof(s));
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
	raw[1] = 0x20;
	mkdid("did:repo:z", raw, 33, s, sizeof(s));      /* 31 digest bytes */
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
	mkdid("did:repo:z", raw, 35, s, sizeof(s));      /* 33 digest bytes */
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);

	memcpy(s, "did:repo:z", 10);
	memset(s + 10, 'z', sizeof(s) - 11);
	s[sizeof(s) - 1] = '\0';
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
	s[ME_DID_REPO_SIZE] = '\0';
	assert_int_equal(me_did_repo_parse(s, digest), ME_EBADID);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sha3),
		cmocka_unit_test(test_did_key_vector),
		cmocka_unit_test(test_did_key_buffers),
		cmocka_unit_test(test_did_key_legacy),
		cmocka_unit_test(test_did_key_malformed),
		cmocka_unit_test(test_did_repo_vector),
		cmocka_unit_test(test_did_repo_malformed),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
