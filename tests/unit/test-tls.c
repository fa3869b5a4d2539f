/* The locally built TLS stack (scripts/deps.sh): wolfSSL with QUIC and ngtcp2's wolfSSL crypto
 * backend link and work together, and wolfCrypt's SHA3-256 gives the FIPS 202 vectors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

/* options.h first: it carries the configure-time settings that the other headers depend on. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/quic.h>
#include <wolfssl/wolfcrypt/sha3.h>
#include <wolfssl/wolfcrypt/types.h>

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_wolfssl.h>

static int setup(void **state)
{
	(void)state;
	return wolfSSL_Init() == WOLFSSL_SUCCESS ? 0 : -1;
}

static int teardown(void **state)
{
	(void)state;
	return wolfSSL_Cleanup() == WOLFSSL_SUCCESS ? 0 : -1;
}

static void test_client_context(void **state)
{
	(void)state;
	WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfTLSv1_3_client_method());
	assert_non_null(ctx);
	assert_int_equal(ngtcp2_crypto_wolfssl_configure_client_context(ctx), 0);

	WOLFSSL *ssl = wolfSSL_new(ctx);
	assert_non_null(ssl);
	assert_true(wolfSSL_is_quic(ssl)); /* the context's QUIC method carries over */
	wolfSSL_set_connect_state(ssl);
	wolfSSL_free(ssl);
	wolfSSL_CTX_free(ctx);
}

static void test_server_context(void **state)
{
	(void)state;
	WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfTLSv1_3_server_method());
	assert_non_null(ctx);
	assert_int_equal(ngtcp2_crypto_wolfssl_configure_server_context(ctx), 0);
	/* (No WOLFSSL* here: wolfSSL_new() refuses a server context without a key and certificate.) */
	wolfSSL_CTX_free(ctx);
}

static void test_ngtcp2_version(void **state)
{
	(void)state;
	const ngtcp2_info *info = ngtcp2_version(0);
	assert_non_null(info);
	assert_int_equal(info->version_num, NGTCP2_VERSION_NUM); /* headers match the library */
}

static void hex(const uint8_t *b, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[b[i] >> 4];
		out[2 * i + 1] = digits[b[i] & 15];
	}
	out[2 * n] = '\0';
}

/* SHA3-256 of the concatenation of parts, each fed by its own Update call. */
static void sha3_256_hex(const char *const *parts, size_t nparts,
			 char out[2 * WC_SHA3_256_DIGEST_SIZE + 1])
{
	wc_Sha3 sha;
	uint8_t digest[WC_SHA3_256_DIGEST_SIZE];

	assert_int_equal(wc_InitSha3_256(&sha, NULL, INVALID_DEVID), 0);
	for (size_t i = 0; i < nparts; i++)
		assert_int_equal(wc_Sha3_256_Update(&sha, (const byte *)parts[i],
						    (word32)strlen(parts[i])), 0);
	assert_int_equal(wc_Sha3_256_Final(&sha, digest), 0);
	wc_Sha3_256_Free(&sha);
	hex(digest, sizeof(digest), out);
}

/* FIPS 202 / NIST CAVP vectors. */
#define SHA3_256_ABC "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
#define SHA3_256_EMPTY "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a"

static void test_sha3_256(void **state)
{
	(void)state;
	char out[2 * WC_SHA3_256_DIGEST_SIZE + 1];

	const char *abc[] = { "abc" };
	sha3_256_hex(abc, 1, out);
	assert_string_equal(out, SHA3_256_ABC);

	sha3_256_hex(NULL, 0, out);
	assert_string_equal(out, SHA3_256_EMPTY);

	const char *empty[] = { "" };
	sha3_256_hex(empty, 1, out);
	assert_string_equal(out, SHA3_256_EMPTY);

	const char *pieces[] = { "a", "", "bc" };
	sha3_256_hex(pieces, 3, out);
	assert_string_equal(out, SHA3_256_ABC);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_client_context),
		cmocka_unit_test(test_server_context),
		cmocka_unit_test(test_ngtcp2_version),
		cmocka_unit_test(test_sha3_256),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
