/* Reading git's pack bitmaps (see packbitmap.h).
 *
 * The file: "BITM", version 1 (16 bits), options (16 bits; FULL_DAG must be set), the number of
 * entries (32 bits) and the pack's checksum (20 bytes); four EWAH bitmaps of the objects by
 * type; then the entries, each the commit's index position (32 bits), an XOR offset (8 bits),
 * flags (8 bits) and an EWAH bitmap. Optional extensions follow; they are not read. All
 * integers are big-endian. The file ends with the SHA-1 of the rest, checked here: a bitmap
 * damaged on disk is not used.
 *
 * An EWAH bitmap: its size in bits (32), its number of 64-bit words (32), the words, and the
 * position of the last marker word (32). The words are read in groups: a marker word (bit 0:
 * the value of a run; bits 1-32: how many words of that value; bits 33-63: how many literal
 * words follow it), then those literal words. Bit k is bit k % 64 of word k / 64. */
#include "daemon/packbitmap.h"

#include <stdlib.h>
#include <string.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "common/err.h"
#include "common/util.h"

#define BM_HDR 32
#define BM_TRAILER 20 /* SHA-1 of the bytes before it */
#define BM_OPT_FULL_DAG 1u
#define EWAH_HDR 8
#define EWAH_TRAILER 4
#define ENTRY_HDR 6

/* The length of the EWAH bitmap at off, 0 when it does not fit in the file. */
static size_t ewah_len(const struct pbitmap *b, size_t off)
{
	size_t left, words;

	if (off > b->len || (left = b->len - off) < EWAH_HDR + EWAH_TRAILER)
		return 0;
	words = me_be32(b->buf + off + 4);
	if (words > (left - EWAH_HDR - EWAH_TRAILER) / 8)
		return 0;
	return EWAH_HDR + 8 * words + EWAH_TRAILER;
}

/* tmp ^= the EWAH bitmap at off (which ewah_len accepted). */
static int ewah_xor(struct pbitmap *b, size_t off, uint64_t *tmp)
{
	const uint8_t *p = b->buf + off;
	uint64_t bits = me_be32(p);
	size_t lim = PBITMAP_WORDS(b->nobj), nw = me_be32(p + 4), pos = 0, i = 0;

	if (bits > (uint64_t)lim * 64)
		return ME_EINVAL;
	lim = PBITMAP_WORDS(bits);
	if ((b->work += nw) > b->budget)
		return ME_EINVAL;
	p += EWAH_HDR;
	while (i < nw) {
		uint64_t m = me_be64(p + 8 * i++);
		uint64_t run = m >> 1 & 0xffffffffu, lit = m >> 33;
		if (run > lim - pos)
			return ME_EINVAL;
		if (m & 1) {
			if ((b->work += run) > b->budget)
				return ME_EINVAL;
			for (uint64_t j = 0; j < run; j++)
				tmp[pos + j] = ~tmp[pos + j];
		}
		pos += run;
		if (lit > nw - i || lit > lim - pos)
			return ME_EINVAL;
		for (uint64_t j = 0; j < lit; j++)
			tmp[pos++] ^= me_be64(p + 8 * i++);
	}
	return 0;
}

static int pos_cmp(const void *a, const void *b, void *arg)
{
	const struct pbitmap *bm = arg;
	uint32_t x = bm->e[*(const uint32_t *)a].pos, y = bm->e[*(const uint32_t *)b].pos;

	return x < y ? -1 : x > y;
}

void pbitmap_free(struct pbitmap *b)
{
	free(b->e);
	free(b->bypos);
	memset(b, 0, sizeof(*b));
}

int pbitmap_parse(struct pbitmap *b, const uint8_t *buf, size_t len, uint32_t nobj,
		  const uint8_t pack_sum[20])
{
	uint8_t sum[WC_SHA_DIGEST_SIZE];
	size_t off = BM_HDR, l;
	wc_Sha h;
	uint32_t n;

	memset(b, 0, sizeof(*b));
	if (len < BM_HDR + BM_TRAILER || len - BM_TRAILER > UINT32_MAX || wc_InitSha(&h) != 0)
		return ME_EINVAL;
	len -= BM_TRAILER;
	if (wc_ShaUpdate(&h, buf, (word32)len) != 0 || wc_ShaFinal(&h, sum) != 0) {
		wc_ShaFree(&h);
		return ME_EINVAL;
	}
	wc_ShaFree(&h);
	b->buf = buf;
	b->len = len;
	b->nobj = nobj;
	if (memcmp(sum, buf + len, sizeof(sum)) != 0 || memcmp(buf, "BITM", 4) != 0 || buf[4] != 0 || buf[5] != 1 ||
	    !(buf[7] & BM_OPT_FULL_DAG) || memcmp(buf + 12, pack_sum, 20) != 0)
		goto bad;
	n = me_be32(buf + 8);
	if (n > nobj || n > (len - BM_HDR) / (ENTRY_HDR + EWAH_HDR + EWAH_TRAILER))
		goto bad;
	for (int t = 0; t < 4; t++, off += l)
		if ((l = ewah_len(b, off)) == 0)
			goto bad;
	if (n > 0 && ((b->e = calloc(n, sizeof(*b->e))) == NULL ||
		      (b->bypos = malloc(n * sizeof(*b->bypos))) == NULL)) {
		pbitmap_free(b);
		return ME_ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++, off += l) {
		if (len - off < ENTRY_HDR)
			goto bad;
		b->e[i].pos = me_be32(buf + off);
		b->e[i].xor = buf[off + 4];
		b->e[i].off = off + ENTRY_HDR;
		if (b->e[i].pos >= nobj || b->e[i].xor > i ||
		    (l = ewah_len(b, b->e[i].off)) == 0)
			goto bad;
		l += ENTRY_HDR;
		b->bypos[i] = i;
	}
	b->n = n;
	b->budget = PBITMAP_BUDGET * ((uint64_t)len / 8 + PBITMAP_WORDS(nobj));
	if (n > 1)
		qsort_r(b->bypos, n, sizeof(*b->bypos), pos_cmp, b);
	for (uint32_t i = 1; i < n; i++)
		if (b->e[b->bypos[i]].pos == b->e[b->bypos[i - 1]].pos)
			goto bad;
	return 0;
bad:
	pbitmap_free(b);
	return ME_EINVAL;
}

int64_t pbitmap_find(const struct pbitmap *b, uint32_t pos)
{
	uint32_t lo = 0, hi = b->n;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2, p = b->e[b->bypos[mid]].pos;
		if (p == pos)
			return b->bypos[mid];
		if (p < pos)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

int pbitmap_or(struct pbitmap *b, uint32_t i, uint64_t *words, uint64_t *tmp)
{
	size_t nw = PBITMAP_WORDS(b->nobj);

	if (i >= b->n)
		return ME_EINVAL;
	memset(tmp, 0, nw * sizeof(*tmp));
	/* XOR is associative: the resolved bitmap is the XOR of the whole chain, in any order */
	for (uint32_t depth = 0;; depth++) {
		int rc = depth < PBITMAP_MAX_CHAIN ? ewah_xor(b, b->e[i].off, tmp) : ME_EINVAL;
		if (rc < 0)
			return rc;
		if (b->e[i].xor == 0)
			break;
		i -= b->e[i].xor;
	}
	if (b->nobj % 64 != 0 && tmp[nw - 1] >> (b->nobj % 64) != 0)
		return ME_EINVAL;
	for (size_t w = 0; w < nw; w++)
		words[w] |= tmp[w];
	return 0;
}
