/* git's reachability bitmaps (daemon/packbitmap.h), read from a source repository's packs:
 * the input is a .bitmap file without its trailing SHA-1, which is appended here (else nearly
 * every input would stop at the checksum), and the pack checksum it names is taken as the
 * pack's. It is parsed for packs of several sizes, and every entry is resolved.
 *
 * Invariants: a bitmap that parses has its entries inside the file, with positions below the
 * pack's object count, in increasing order by position; an entry that resolves sets no bit
 * at or past that count and only adds bits; one that is refused changes nothing. */
#include <string.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "common/err.h"
#include "daemon/packbitmap.h"
#include "tests/fuzz/fuzz.h"

#define MAX_IN (1u << 16)

static void check(const uint8_t *buf, size_t len, uint32_t nobj)
{
	static uint64_t words[PBITMAP_WORDS(4097)], tmp[PBITMAP_WORDS(4097)],
		before[PBITMAP_WORDS(4097)];
	const uint8_t *sum = buf + 12;
	size_t nw = PBITMAP_WORDS(nobj);
	struct pbitmap b;
	int rc = pbitmap_parse(&b, buf, len, nobj, sum);

	FUZZ_ASSERT(rc == 0 || rc == ME_EINVAL || rc == ME_ENOMEM);
	if (rc < 0) {
		FUZZ_ASSERT(b.e == NULL && b.n == 0);
		return;
	}
	memset(words, 0, sizeof(words));
	for (uint32_t i = 0; i < b.n; i++) {
		FUZZ_ASSERT(b.e[i].pos < nobj && b.e[i].xor <= i && b.e[i].off < len);
		FUZZ_ASSERT(pbitmap_find(&b, b.e[i].pos) == i);
		if (i > 0)
			FUZZ_ASSERT(b.e[b.bypos[i]].pos > b.e[b.bypos[i - 1]].pos);
		memcpy(before, words, sizeof(words));
		rc = pbitmap_or(&b, i, words, tmp);
		FUZZ_ASSERT(rc == 0 || rc == ME_EINVAL);
		for (size_t w = 0; w < nw; w++)
			FUZZ_ASSERT(rc < 0 ? words[w] == before[w] : (words[w] & before[w]) == before[w]);
		if (nobj % 64 != 0)
			FUZZ_ASSERT(words[nw - 1] >> (nobj % 64) == 0);
	}
	FUZZ_ASSERT(pbitmap_or(&b, b.n, words, tmp) == ME_EINVAL);
	pbitmap_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t buf[MAX_IN + WC_SHA_DIGEST_SIZE];
	static const uint32_t sizes[] = { 1, 64, 100, 1353, 4097 };
	wc_Sha h;

	if (size < 32 || size > MAX_IN)
		return 0;
	memcpy(buf, data, size);
	FUZZ_ASSERT(wc_InitSha(&h) == 0);
	wc_ShaUpdate(&h, buf, (word32)size);
	FUZZ_ASSERT(wc_ShaFinal(&h, buf + size) == 0);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
		check(buf, size + WC_SHA_DIGEST_SIZE, sizes[i]);
	return 0;
}
