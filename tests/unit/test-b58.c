/* Base58btc: known vectors (Bitcoin Core's base58_encode_decode.json and others), round trips,
 * alphabet, buffer and length bounds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "common/b58.h"
#include "common/err.h"

static size_t unhex(const char *hex, uint8_t *out, size_t outsz)
{
	size_t n = strlen(hex) / 2;

	assert_true(n <= outsz);
	for (size_t i = 0; i < n; i++) {
		unsigned int v;
		assert_int_equal(sscanf(hex + 2 * i, "%2x", &v), 1);
		out[i] = (uint8_t)v;
	}
	return n;
}

struct vec {
	const char *hex;
	const char *b58;
};

static const struct vec vectors[] = {
	{ "61", "2g" },
	{ "626262", "a3gV" },
	{ "636363", "aPEr" },
	{ "73696d706c792061206c6f6e6720737472696e67", "2cFupjhnEsSn59qHXstmK2ffpLv2" },
	{ "00eb15231dfceb60925886b67d065299925915aeb172c06647",
	  "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L" },
	{ "516b6fcd0f", "ABnLTmg" },
	{ "bf4f89001e670274dd", "3SEo3LWLoPntC" },
	{ "572e4794", "3EFU7m" },
	{ "ecac89cad93923c02321", "EJDM8drfXA6uyA" },
	{ "10c8511e", "Rt5zm" },
	{ "00000000000000000000", "1111111111" },
	{ "000111d38e5fc9071ffcd20b4a763cc9ae4f252bb4e48fd66a835e252ada93ff480d6dd43dc62a641155a5",
	  "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz" },
	{ "48656c6c6f20576f726c6421", "2NEpo7TZRRrLZSi2U" }, /* "Hello World!" */
	{ "000000287fb4cd", "111233QC4" },
	{ "0000616263", "11ZiCa" }, /* "\0\0abc" */
	{ "00", "1" },
	{ "01", "2" },
	{ "39", "z" },
	{ "3a", "21" },
	{ "ff", "5Q" },
};

static void test_vectors(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		uint8_t bin[128], dec[128];
		char s[256];
		size_t n = unhex(vectors[i].hex, bin, sizeof(bin));

		assert_int_equal(me_b58_encode(bin, n, s, sizeof(s)), (int)strlen(vectors[i].b58));
		assert_string_equal(s, vectors[i].b58);
		assert_int_equal(me_b58_decode(vectors[i].b58, dec, sizeof(dec)), (int)n);
		assert_memory_equal(dec, bin, n);
	}
}

static void test_empty(void **state)
{
	uint8_t out[8];
	char s[8] = "x";

	(void)state;
	/* Encoding nothing gives the empty string; decoding it is refused. */
	assert_int_equal(me_b58_encode(NULL, 0, s, sizeof(s)), 0);
	assert_string_equal(s, "");
	assert_int_equal(me_b58_decode("", out, sizeof(out)), ME_EBADID);
	assert_int_equal(me_b58_decode(NULL, out, sizeof(out)), ME_EBADID);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint8_t rnd8(void)
{
	/* xorshift64*: deterministic, so failures reproduce. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint8_t)((rng_state * 0x2545f4914f6cdd1dull) >> 56);
}

static void test_roundtrip(void **state)
{
	(void)state;
	for (int round = 0; round < 20; round++) {
		for (size_t n = 0; n <= 128; n++) {
			uint8_t bin[128], dec[256];
			char s[ME_B58_MAX_CHARS + 1];
			size_t zeros = (size_t)(rnd8() % 4);
			int len;

			for (size_t i = 0; i < n; i++)
				bin[i] = i < zeros ? 0 : rnd8();
			len = me_b58_encode(bin, n, s, sizeof(s));
			assert_true(len >= 0);
			assert_int_equal((size_t)len, strlen(s));
			assert_true(len <= 175);
			if (n == 0) {
				assert_int_equal(len, 0);
				continue;
			}
			assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), (int)n);
			assert_memory_equal(dec, bin, n);
			/* Exact-size buffers work, one byte less does not. */
			assert_int_equal(me_b58_decode(s, dec, n), (int)n);
			assert_int_equal(me_b58_decode(s, dec, n - 1), ME_ETOOBIG);
			assert_int_equal(me_b58_encode(bin, n, s, (size_t)len + 1), len);
			assert_int_equal(me_b58_encode(bin, n, s, (size_t)len), ME_ETOOBIG);
		}
	}
}

static void test_alphabet(void **state)
{
	static const char alphabet[] =
		"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
	static const char *const bad[] = {
		"0", "O", "I", "l", "+", "/", "=", " ", "-", "_",
		"2NEpo7TZRRrLZSi2U ", " 2NEpo7TZRRrLZSi2U", "2NEpo7TZRR\nrLZSi2U",
		"2NEpo7TZRRrLZSi20", "\xc3\xa9", "2\xc3", "\xff", "\x80", "a\x01",
	};
	uint8_t out[64];
	int good = 0;

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(me_b58_decode(bad[i], out, sizeof(out)), ME_EBADID);

	/* Every byte value, alone and in the middle of a valid string. */
	for (int c = 1; c < 256; c++) {
		char one[2] = { (char)c, '\0' };
		char mid[4] = { '2', (char)c, '2', '\0' };
		int in = memchr(alphabet, c, sizeof(alphabet) - 1) != NULL;
		int r1 = me_b58_decode(one, out, sizeof(out));
		int r2 = me_b58_decode(mid, out, sizeof(out));

		if (in) {
			good++;
			assert_int_equal(r1, 1);
			assert_true(r2 >= 1);
		} else {
			assert_int_equal(r1, ME_EBADID);
			assert_int_equal(r2, ME_EBADID);
		}
	}
	assert_int_equal(good, 58);
}

static void test_small_buffers(void **state)
{
	uint8_t bin[3] = { 0, 0, 0 }, out[4];
	char s[8];

	(void)state;
	/* Leading zeros only: n '1's and n zero bytes. */
	assert_int_equal(me_b58_encode(bin, 3, s, 4), 3);
	assert_string_equal(s, "111");
	assert_int_equal(me_b58_encode(bin, 3, s, 3), ME_ETOOBIG);
	assert_string_equal(s, "");
	assert_int_equal(me_b58_encode(bin, 3, s, 0), ME_ETOOBIG);
	assert_int_equal(me_b58_encode(bin, 0, s, 1), 0);
	assert_int_equal(me_b58_encode(bin, 1, NULL, 0), ME_ETOOBIG);
	assert_int_equal(me_b58_decode("111", out, 3), 3);
	assert_int_equal(me_b58_decode("111", out, 2), ME_ETOOBIG);
	assert_int_equal(me_b58_decode("11ZiCa", out, 4), ME_ETOOBIG);
	assert_int_equal(me_b58_decode("2", out, 0), ME_ETOOBIG);
	assert_int_equal(me_b58_decode("2", NULL, 8), ME_ETOOBIG);
	assert_int_equal(me_b58_encode(NULL, 1, s, sizeof(s)), ME_EINVAL);
}

static void test_max_lengths(void **state)
{
	uint8_t bin[129], dec[256];
	char s[ME_B58_MAX_CHARS + 2];
	int len;

	(void)state;
	/* Encode: 128 bytes is the limit. */
	memset(bin, 0xff, sizeof(bin));
	len = me_b58_encode(bin, 128, s, sizeof(s));
	assert_int_equal(len, 175);
	assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), 128);
	assert_memory_equal(dec, bin, 128);
	assert_int_equal(me_b58_encode(bin, 129, s, sizeof(s)), ME_EINVAL);
	memset(bin, 0, sizeof(bin));
	assert_int_equal(me_b58_encode(bin, 128, s, sizeof(s)), 128);
	assert_int_equal(strspn(s, "1"), 128);

	/* Decode: ME_B58_MAX_CHARS characters is the limit. 58^256 - 1 takes 188 bytes
	 * (computed with Python: len(int('z'*256 in base 58).to_bytes) == 188, top 0c7e6673). */
	memset(s, 'z', ME_B58_MAX_CHARS);
	s[ME_B58_MAX_CHARS] = '\0';
	assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), 188);
	assert_int_equal(dec[0], 0x0c);
	assert_int_equal(dec[1], 0x7e);
	assert_int_equal(dec[2], 0x66);
	assert_int_equal(dec[3], 0x73);
	assert_int_equal(me_b58_decode(s, dec, 187), ME_ETOOBIG);
	memset(s, '1', ME_B58_MAX_CHARS);
	assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), ME_B58_MAX_CHARS);
	for (int i = 0; i < ME_B58_MAX_CHARS; i++)
		assert_int_equal(dec[i], 0);
	s[ME_B58_MAX_CHARS] = '1';
	s[ME_B58_MAX_CHARS + 1] = '\0';
	assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), ME_ETOOBIG);
	/* Over-long input is refused before the alphabet is looked at. */
	s[0] = '0';
	assert_int_equal(me_b58_decode(s, dec, sizeof(dec)), ME_ETOOBIG);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_vectors),
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_roundtrip),
		cmocka_unit_test(test_alphabet),
		cmocka_unit_test(test_small_buffers),
		cmocka_unit_test(test_max_lengths),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
