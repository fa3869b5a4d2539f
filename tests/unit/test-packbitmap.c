/* daemon/packbitmap.c: git's reachability bitmaps. Bitmaps built here word by word check the
 * EWAH decoding and the XOR chains exactly, and every bound on the way; then every entry of
 * bitmaps git itself wrote must be exactly what `git rev-list --objects` lists for its
 * commit. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <git2.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "common/err.h"
#include "daemon/packbitmap.h"
#include "daemon/packidx.h"
#include "tests/unit/gitfixture.h"

static char base[64];

/* ---- bitmaps built by hand ---- */

struct bmfile {
	uint8_t b[256 << 10];
	size_t len;
};

static void put32(struct bmfile *f, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		f->b[f->len++] = (uint8_t)(v >> (24 - 8 * i));
}

static void put64(struct bmfile *f, uint64_t v)
{
	put32(f, (uint32_t)(v >> 32));
	put32(f, (uint32_t)v);
}

static uint64_t rlw(int bit, uint64_t run, uint64_t lit)
{
	return (uint64_t)bit | run << 1 | lit << 33;
}

static void put_ewah(struct bmfile *f, uint32_t bits, const uint64_t *w, uint32_t nw)
{
	put32(f, bits);
	put32(f, nw);
	for (uint32_t i = 0; i < nw; i++)
		put64(f, w[i]);
	put32(f, 0);
}

static const uint8_t sum[20] = { 1, 2, 3 };

/* Header and four type bitmaps (empty) for entries entries. */
static void bm_begin(struct bmfile *f, uint32_t entries)
{
	uint64_t empty = rlw(0, 0, 0);

	memset(f, 0, sizeof(*f));
	memcpy(f->b, "BITM\0\1\0\1", 8);
	f->len = 8;
	put32(f, entries);
	memcpy(f->b + f->len, sum, 20);
	f->len += 20;
	for (int t = 0; t < 4; t++)
		put_ewah(f, 0, &empty, 1);
}

static void bm_entry(struct bmfile *f, uint32_t pos, uint8_t xor, uint32_t bits,
		     const uint64_t *w, uint32_t nw)
{
	put32(f, pos);
	f->b[f->len++] = xor;
	f->b[f->len++] = 0;
	put_ewah(f, bits, w, nw);
}

static void bm_end(struct bmfile *f)
{
	wc_Sha h;

	assert_int_equal(wc_InitSha(&h), 0);
	wc_ShaUpdate(&h, f->b, (word32)f->len);
	assert_int_equal(wc_ShaFinal(&h, f->b + f->len), 0);
	f->len += 20;
}

static void test_synthetic(void **state)
{
	/* 100 objects: two words */
	const uint64_t e0[] = { rlw(1, 1, 1), 0x0000000f00000001ull }; /* 0-63, 64, 96-99 */
	const uint64_t e1[] = { rlw(0, 0, 1), 0x3 };                    /* ^ 0, 1 */
	const uint64_t e2[] = { rlw(0, 1, 1), 0x10 };                   /* 68 */
	const uint64_t e3[] = { rlw(1, 2, 0) };                         /* 0-127: past 99 */
	const uint64_t e4[] = { rlw(0, 0, 2), 1 };                      /* literals missing */
	const uint64_t e5[] = { rlw(1, 3, 0) };                         /* three words of two */
	const uint64_t e6[] = { rlw(0, 0, 2), 1, 2 };                   /* two literals of one */
	static struct bmfile f, g;
	struct pbitmap b;
	uint64_t words[2], tmp[2];

	(void)state;
	bm_begin(&f, 7);
	bm_entry(&f, 7, 0, 128, e0, 2);
	bm_entry(&f, 3, 1, 64, e1, 2);
	bm_entry(&f, 50, 1, 128, e2, 2);
	bm_entry(&f, 99, 0, 128, e3, 1);
	bm_entry(&f, 60, 0, 128, e4, 2);
	bm_entry(&f, 61, 0, 128, e5, 1);
	bm_entry(&f, 62, 0, 64, e6, 3);
	bm_end(&f);
	assert_int_equal(pbitmap_parse(&b, f.b, f.len, 100, sum), 0);
	assert_int_equal(b.n, 7);
	assert_int_equal(pbitmap_find(&b, 7), 0);
	assert_int_equal(pbitmap_find(&b, 3), 1);
	assert_int_equal(pbitmap_find(&b, 99), 3);
	assert_int_equal(pbitmap_find(&b, 4), -1);

	memset(words, 0, sizeof(words));
	assert_int_equal(pbitmap_or(&b, 0, words, tmp), 0);
	assert_true(words[0] == ~0ull && words[1] == 0x0000000f00000001ull);
	memset(words, 0, sizeof(words));
	assert_int_equal(pbitmap_or(&b, 1, words, tmp), 0);
	assert_true(words[0] == ~3ull && words[1] == 0x0000000f00000001ull);
	/* a chain of two XORs, ORed onto what is there */
	words[0] = 1;
	words[1] = 0;
	assert_int_equal(pbitmap_or(&b, 2, words, tmp), 0);
	assert_true(words[0] == ~2ull && words[1] == 0x0000000f00000011ull);
	assert_true(pbitmap_test(words, 0) && !pbitmap_test(words, 1) && pbitmap_test(words, 68));
	/* refused, words unchanged */
	for (uint32_t i = 3; i < 7; i++) {
		uint64_t before[2] = { words[0], words[1] };
		assert_int_equal(pbitmap_or(&b, i, words, tmp), ME_EINVAL);
		assert_memory_equal(words, before, sizeof(before));
	}
	assert_int_equal(pbitmap_or(&b, 7, words, tmp), ME_EINVAL);
	pbitmap_free(&b);

	/* the whole file is refused for: */
	struct {
		size_t at;
		uint8_t val;
		int fix; /* recompute the checksum */
	} damage[] = {
		{ 0, 'X', 1 },           /* magic */
		{ 5, 2, 1 },             /* version */
		{ 7, 4, 1 },             /* options without FULL_DAG */
		{ 11, 9, 1 },            /* more entries than the file holds */
		{ 12, 9, 1 },            /* another pack's */
		{ 100, 0x55, 0 },        /* the checksum */
		{ 32 + 7, 0xff, 1 },     /* a type bitmap's word count past the end */
	};
	for (size_t k = 0; k < sizeof(damage) / sizeof(damage[0]); k++) {
		g = f;
		g.b[damage[k].at] = damage[k].val;
		if (damage[k].fix) {
			g.len -= 20;
			bm_end(&g);
		}
		assert_int_equal(pbitmap_parse(&b, g.b, g.len, 100, sum), ME_EINVAL);
		assert_null(b.e);
	}
	/* entries: a position past the objects, a chain reaching before the first, the same
	 * commit twice, a word count past the end */
	for (int k = 0; k < 4; k++) {
		bm_begin(&g, 2);
		bm_entry(&g, 1, 0, 64, e1, 2);
		if (k == 0)
			bm_entry(&g, 100, 0, 64, e1, 2);
		else if (k == 1)
			bm_entry(&g, 2, 2, 64, e1, 2);
		else if (k == 2)
			bm_entry(&g, 1, 0, 64, e1, 2);
		else
			bm_entry(&g, 2, 0, 64, e1, 2);
		if (k == 3) /* the low byte of the last word count (then 2 words, a position) */
			g.b[g.len - 4 - 2 * 8 - 1] = 0xff;
		bm_end(&g);
		assert_int_equal(pbitmap_parse(&b, g.b, g.len, 100, sum), ME_EINVAL);
	}
	/* too short for a header and a trailer; and every truncation of a good file */
	assert_int_equal(pbitmap_parse(&b, f.b, 40, 100, sum), ME_EINVAL);
	for (size_t len = 0; len < f.len; len++) {
		g = f;
		if (len >= 20) {
			g.len = len - 20;
			bm_end(&g);
			assert_int_equal(g.len, len);
		}
		assert_int_equal(pbitmap_parse(&b, g.b, len, 100, sum), ME_EINVAL);
	}
}

/* Chains: entry i sets bit i % 64 and XORs onto entry i - 1. Resolved exactly up to
 * PBITMAP_MAX_CHAIN entries, refused beyond; and the work of all calls on one file is bounded
 * (each call here resolves 4,096 entries again). */
static void test_chains(void **state)
{
	static struct bmfile f;
	const uint32_t n = PBITMAP_MAX_CHAIN + 2, nobj = 8192;
	struct pbitmap b;
	uint64_t words[PBITMAP_WORDS(8192)], tmp[PBITMAP_WORDS(8192)];
	int calls = 0;

	(void)state;
	bm_begin(&f, n);
	for (uint32_t i = 0; i < n; i++) {
		const uint64_t w[] = { rlw(0, 0, 1), 1ull << (i % 64) };
		bm_entry(&f, i, i > 0, 64, w, 2);
	}
	bm_end(&f);
	assert_int_equal(pbitmap_parse(&b, f.b, f.len, nobj, sum), 0);
	memset(words, 0, sizeof(words));
	/* 4,095 entries: bit 63 toggled 63 times, the others 64 */
	assert_int_equal(pbitmap_or(&b, PBITMAP_MAX_CHAIN - 2, words, tmp), 0);
	assert_true(words[0] == 1ull << 63);
	for (size_t w = 1; w < PBITMAP_WORDS(nobj); w++)
		assert_true(words[w] == 0);
	assert_int_equal(pbitmap_or(&b, PBITMAP_MAX_CHAIN, words, tmp), ME_EINVAL);
	while (pbitmap_or(&b, PBITMAP_MAX_CHAIN - 1, words, tmp) == 0)
		assert_true(++calls < 1000);
	assert_true(calls > 10);
	assert_true(b.work <= b.budget + 2);
	assert_true(words[0] == 1ull << 63);
	pbitmap_free(&b);
}

/* ---- bitmaps git wrote ---- */

static void check_git_bitmap(const char *dir)
{
	char path[256], want[160], got[160];
	struct pidx x;
	struct pbitmap b;
	uint8_t *map;
	size_t maplen, chained = 0;
	uint64_t *words, *tmp;

	capture(path, sizeof(path), "ls '%s'/objects/pack/*.bitmap", dir);
	assert_int_equal(pidx_map(path, &map, &maplen), 0);
	strcpy(path + strlen(path) - 7, ".idx");
	char pack[256];
	snprintf(pack, sizeof(pack), "%.*s.pack", (int)strlen(path) - 4, path);
	assert_int_equal(pidx_open(&x, path, pack), 0);
	assert_int_equal(pbitmap_parse(&b, map, maplen, x.n, x.pack + x.packlen - 20), 0);
	assert_true(b.n >= 20);
	assert_non_null(words = malloc(PBITMAP_WORDS(x.n) * 8));
	assert_non_null(tmp = malloc(PBITMAP_WORDS(x.n) * 8));
	snprintf(want, sizeof(want), "%s/want", base);
	snprintf(got, sizeof(got), "%s/got", base);
	for (uint32_t i = 0; i < b.n; i++) {
		char hex[GIT_OID_HEXSZ + 1];
		git_oid id;
		FILE *f;

		chained += b.e[i].xor != 0;
		memset(words, 0, PBITMAP_WORDS(x.n) * 8);
		assert_int_equal(pbitmap_or(&b, i, words, tmp), 0);
		assert_non_null(f = fopen(got, "w"));
		for (uint32_t k = 0; k < x.n; k++)
			if (pbitmap_test(words, k)) {
				git_oid_fromraw(&id, pidx_oid(&x, x.rev[k].pos));
				fprintf(f, "%s\n", git_oid_tostr(hex, sizeof(hex), &id));
			}
		assert_int_equal(fclose(f), 0);
		git_oid_fromraw(&id, pidx_oid(&x, b.e[i].pos));
		sh("git -C '%s' rev-list --objects %s | cut -c1-40 | sort > '%s' && sort -o '%s' '%s' "
		   "&& cmp -s '%s' '%s'", dir, git_oid_tostr(hex, sizeof(hex), &id), want, got, got,
		   want, got);
	}
	assert_true(chained > 0); /* XOR chains were resolved */
	free(words);
	free(tmp);
	pbitmap_free(&b);
	pidx_free(&x);
	munmap(map, maplen);
}

static void test_git_written(void **state)
{
	char dir[128];

	(void)state;
	/* a history with deltas, two branches, a merge and a file that moves */
	snprintf(dir, sizeof(dir), "%s/g.git", base);
	sh("cd '%s' && git init -q -b main w && cd w && seq 1 2000 > f && git add f && "
	   "git commit -q -m c0 && for i in $(seq 1 90); do sed -i \"$((i * 9))s/.*/c $i/\" f; "
	   "echo $i > n$i; git add -A; git commit -q -m c$i; "
	   "if [ $i = 40 ]; then git checkout -q -b side HEAD~10; fi; "
	   "if [ $i = 60 ]; then git checkout -q main && git merge -q --no-edit side >/dev/null; fi; done && "
	   "git mv f g && git commit -q -m moved && git clone -q --bare . '%s' && "
	   "git -C '%s' repack -adbq", base, dir, dir);
	check_git_bitmap(dir);
}

static int setup(void **state)
{
	(void)state;
	snprintf(base, sizeof(base), "/tmp/me-packbitmap-XXXXXX");
	assert_non_null(mkdtemp(base));
	git_test_env();
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	nftw(base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_synthetic),
		cmocka_unit_test(test_chains),
		cmocka_unit_test(test_git_written),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
