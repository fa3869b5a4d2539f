/* git's reachability bitmaps (a pack's .bitmap, format v1 of git's
 * Documentation/technical/bitmap-format.txt): for selected commits, the set of the pack's
 * objects each one reaches, as EWAH-compressed bitmaps in which bit k stands for the pack's
 * k-th object by offset. git writes them with `git repack -b`, and by default when it repacks
 * a bare repository; upload-pack then counts a clone's objects from them instead of walking
 * every tree. packreuse.c does the same.
 *
 * The file is read from a mapping and every read is bounded by it: a bitmap that is not as
 * git writes it (version, options, lengths, positions, a delta chain, bits past the pack's
 * objects) is refused, and the caller walks the history instead.
 *
 * Library code: no logging, no libgit2; ME_* codes. */
#ifndef ME_PACKBITMAP_H
#define ME_PACKBITMAP_H

#include <stddef.h>
#include <stdint.h>

struct pbitmap_entry {
	uint32_t pos; /* the commit's position in the pack's index (oid order) */
	uint32_t xor; /* 0, or: this bitmap is XORed onto the one of the entry xor before it */
	size_t off;   /* of its EWAH bitmap in the file */
};

struct pbitmap {
	const uint8_t *buf;
	size_t len;
	uint32_t nobj;
	uint32_t n;
	struct pbitmap_entry *e; /* in file order */
	uint32_t *bypos;         /* entry numbers sorted by pos */
	uint64_t work, budget;   /* words pbitmap_or read or filled with ones, and at most */
};

/* 64-bit words of a bitmap over n objects. */
#define PBITMAP_WORDS(n) (((size_t)(n) + 63) / 64)

/* Parses buf (the .bitmap of a pack of nobj objects whose trailing checksum is pack_sum).
 * buf must outlive b. ME_EINVAL when it is not as expected, ME_ENOMEM. On failure b is empty
 * (pbitmap_free is a no-op). */
int pbitmap_parse(struct pbitmap *b, const uint8_t *buf, size_t len, uint32_t nobj,
		  const uint8_t pack_sum[20]);
void pbitmap_free(struct pbitmap *b);
/* The entry of the commit at index position pos, -1 when it has none. */
int64_t pbitmap_find(const struct pbitmap *b, uint32_t pos);
/* words |= what entry i reaches (its chain of XORs resolved in tmp). words and tmp hold
 * PBITMAP_WORDS(b->nobj) words. ME_EINVAL when a bitmap of the chain is malformed or sets a
 * bit past the pack's objects, when the chain is longer than PBITMAP_MAX_CHAIN, or when the
 * calls on b together would have read (or filled with runs of ones) more words than
 * PBITMAP_BUDGET times the file's and the bitmap's width (words is then unchanged). git
 * resolves each chain once and caches it; here a chain is resolved again for each commit
 * asked about, which honest files (chains of tens of entries, a few commits asked) are far
 * from, but a file made of long chains must not cost more than counting without it. */
#define PBITMAP_MAX_CHAIN 4096
#define PBITMAP_BUDGET 64
int pbitmap_or(struct pbitmap *b, uint32_t i, uint64_t *words, uint64_t *tmp);

static inline int pbitmap_test(const uint64_t *words, uint32_t k)
{
	return (int)(words[k / 64] >> (k % 64) & 1);
}

#endif
