/* The delta encoder of daemon/thinpack.c: round trips on random and edited data, the size
 * limit, and a bounded decoder fed hostile bytes. That git and libgit2 accept the thin packs
 * built with it is tested in test-mirror.c (bundles applied, `git bundle unbundle`). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "daemon/thinpack.h"

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint32_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 16);
}

static void fill_text(uint8_t *p, size_t n)
{
	static const char words[] = "static int void return if else for while the of and 0123\n";
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)words[rnd() % (sizeof(words) - 1)];
}

static void roundtrip(const uint8_t *base, size_t blen, const uint8_t *tgt, size_t tlen,
		      size_t *dsize)
{
	uint8_t *d = NULL, *r = NULL;
	size_t dlen = 0, rlen = 0;

	assert_int_equal(delta_encode(base, blen, tgt, tlen, tlen + tlen / 64 + 64, &d, &dlen), 0);
	assert_non_null(d);
	assert_int_equal(delta_apply(base, blen, d, dlen, tlen, &r, &rlen), 0);
	assert_int_equal(rlen, tlen);
	assert_memory_equal(r, tgt, tlen);
	if (dsize != NULL)
		*dsize = dlen;
	free(d);
	free(r);
}

static void test_edits(void **state)
{
	(void)state;
	for (int iter = 0; iter < 300; iter++) {
		size_t blen = 1 + rnd() % 200000, tlen;
		uint8_t *base = malloc(blen), *tgt = malloc(blen + 4096);
		fill_text(base, blen);
		memcpy(tgt, base, blen);
		tlen = blen;
		/* A few edits: replace, insert, delete. */
		int nedits = 1 + (int)(rnd() % 4);
		for (int e = 0; e < nedits; e++) {
			size_t at = rnd() % (tlen + 1), k = 1 + rnd() % 200;
			switch (rnd() % 3) {
			case 0: /* replace */
				for (size_t i = at; i < tlen && i < at + k; i++)
					tgt[i] = (uint8_t)rnd();
				break;
			case 1: /* insert */
				if (tlen + k <= blen + 4096) {
					memmove(tgt + at + k, tgt + at, tlen - at);
					fill_text(tgt + at, k);
					tlen += k;
				}
				break;
			default: /* delete */
				if (at + k <= tlen) {
					memmove(tgt + at, tgt + at + k, tlen - at - k);
					tlen -= k;
				}
			}
		}
		size_t dlen;
		roundtrip(base, blen, tgt, tlen, &dlen);
		/* A few local edits cost a few hundred bytes, not the file. */
		if (blen > 50000)
			assert_true(dlen < 4096);
		free(base);
		free(tgt);
	}
}

static void test_edges(void **state)
{
	uint8_t a[100000], b[100000], *d;
	size_t dlen, rlen;
	uint8_t *r;
	(void)state;

	fill_text(a, sizeof(a));
	for (size_t i = 0; i < sizeof(b); i++)
		b[i] = (uint8_t)rnd();
	roundtrip(a, 0, a, 100, NULL);        /* empty base: all inserted */
	roundtrip(a, 100, a, 0, NULL);        /* empty target */
	roundtrip(a, 15, a, 15, NULL);        /* shorter than a block */
	roundtrip(a, sizeof(a), a, sizeof(a), &dlen); /* identical: one copy */
	assert_true(dlen < 16);
	roundtrip(a, sizeof(a), b, sizeof(b), NULL); /* unrelated: inserted */
	/* Repetition inside the target (copies of the same base block). */
	memcpy(b, a, 5000);
	memcpy(b + 5000, a, 5000);
	memcpy(b + 10000, a, 5000);
	roundtrip(a, 5000, b, 15000, &dlen);
	assert_true(dlen < 64);
	/* A copy longer than one instruction holds (0xffffff bytes). */
	size_t big = (1u << 24) + 12345;
	uint8_t *x = malloc(big);
	fill_text(x, big);
	roundtrip(x, big, x, big, &dlen);
	assert_true(dlen < 32);
	free(x);
	/* Over the limit: nothing allocated. */
	d = (uint8_t *)1;
	assert_int_equal(delta_encode(a, sizeof(a), b, sizeof(b), 1000, &d, &dlen), ME_ETOOBIG);
	assert_null(d);
	assert_int_equal(delta_encode(a, sizeof(a), b, sizeof(b), 0, &d, &dlen), ME_ETOOBIG);
	/* The decoder checks the base size and bounds the result. */
	assert_int_equal(delta_encode(a, 1000, a, 1000, 100, &d, &dlen), 0);
	assert_int_equal(delta_apply(a, 999, d, dlen, 1000, &r, &rlen), ME_EPROTO);
	assert_int_equal(delta_apply(a, 1000, d, dlen, 999, &r, &rlen), ME_EPROTO);
	assert_int_equal(delta_apply(a, 1000, d, dlen, 1000, &r, &rlen), 0);
	free(r);
	free(d);
}

static void test_hostile_deltas(void **state)
{
	uint8_t base[4096], d[256], *r;
	size_t rlen;
	(void)state;

	fill_text(base, sizeof(base));
	for (int iter = 0; iter < 200000; iter++) {
		size_t n = rnd() % sizeof(d);
		for (size_t i = 0; i < n; i++)
			d[i] = (uint8_t)rnd();
		/* Mostly well-formed headers, so the instructions are reached. */
		if (n >= 4 && rnd() % 2) {
			d[0] = 0x80 | (sizeof(base) & 0x7f);
			d[1] = (uint8_t)(sizeof(base) >> 7);
			d[2] = (uint8_t)(rnd() & 0x7f);
		}
		int rc = delta_apply(base, sizeof(base), d, n, 1 << 16, &r, &rlen);
		assert_true(rc == 0 || rc == ME_EPROTO);
		if (rc == 0) {
			assert_true(rlen <= 1 << 16);
			free(r);
		}
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_edits),
		cmocka_unit_test(test_edges),
		cmocka_unit_test(test_hostile_deltas),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
