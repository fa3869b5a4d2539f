/* Receiving a bundle whose pack is well formed but whose objects are anything: what a hostile
 * peer that knows the format sends. Raw pack bytes mutated by the fuzzer rarely survive zlib
 * and the pack checksum (fuzz-bundle-rx); here the input is a list of pack entries,
 *     kind byte | u16 big-endian length | content
 * (a short last record takes what is left; at most MAX_ENTRIES). kind % 6: 0 commit, 1 tree,
 * 2 blob, 3 tag (content: the object), 4 a delta against the previous entry (OFS_DELTA), 5 a
 * delta against any object (REF_DELTA: content = base oid[20] || delta), which may be one of
 * the mirror's (a thin pack); a delta without its base (none before, or fewer than 20 bytes) is
 * a blob instead. The harness compresses each entry, adds the pack header and
 * checksum, and sends
 *     "# v2 git bundle\n-<C1>\n<C2> refs/heads/main\n<tag> refs/tags/v1\n\n" pack
 * through bundle_rx against the fixed mirror (tests/fuzz/bundle-fixture.h): libgit2's indexer
 * (inflating, resolving deltas, hashing), then the connectivity check, which parses every
 * commit, tree and tag and checks the type of everything each references, in the pack or in
 * the mirror.
 *
 * Invariants: those of bundle_fixture_rx (nothing but the check hook accepts a bundle, the
 * expected tips exist when it runs, the mirror never changes). */
#include <string.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/hash.h>
#include <zlib.h>

#include "tests/fuzz/bundle-fixture.h"
#include "tests/fuzz/fuzz.h"

#define MAX_ENTRIES 64

static struct bundle_fixture fx;
static char header[512];
static size_t header_len;

static void cleanup(void)
{
	bundle_fixture_free(&fx);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char c1[GIT_OID_HEXSZ + 1], c2[GIT_OID_HEXSZ + 1], tag[GIT_OID_HEXSZ + 1];

	(void)argc;
	(void)argv;
	FUZZ_ASSERT(bundle_fixture_init(&fx) == 0);
	atexit(cleanup);
	git_oid_tostr(c1, sizeof(c1), &fx.c1);
	git_oid_tostr(c2, sizeof(c2), &fx.c2);
	git_oid_tostr(tag, sizeof(tag), &fx.tag);
	header_len = (size_t)snprintf(header, sizeof(header),
				      "# v2 git bundle\n-%s\n%s refs/heads/main\n%s refs/tags/v1\n\n",
				      c1, c2, tag);
	FUZZ_ASSERT(header_len < sizeof(header));
	return 0;
}

struct out {
	uint8_t *p;
	size_t len, cap;
};

static void put(struct out *o, const void *p, size_t n)
{
	if (o->len + n > o->cap) {
		while (o->len + n > o->cap)
			o->cap = o->cap ? 2 * o->cap : 4096;
		o->p = realloc(o->p, o->cap);
		FUZZ_ASSERT(o->p != NULL);
	}
	memcpy(o->p + o->len, p, n);
	o->len += n;
}

/* One pack entry: type and size header, the delta base if any, the zlib stream. */
static void entry(struct out *o, unsigned type, const uint8_t *base_oid, size_t base_ofs,
		  const uint8_t *data, size_t len)
{
	uint8_t h[16], ofs[16];
	size_t n = 0, size = len;

	h[n] = (uint8_t)(type << 4 | (size & 0x0f));
	size >>= 4;
	while (size != 0) {
		h[n++] |= 0x80;
		h[n] = size & 0x7f;
		size >>= 7;
	}
	put(o, h, n + 1);
	if (type == 6) { /* OFS_DELTA: the distance back to the base entry, git's varint */
		size_t pos = sizeof(ofs) - 1;
		ofs[pos] = base_ofs & 0x7f;
		while (base_ofs >>= 7)
			ofs[--pos] = 0x80 | (--base_ofs & 0x7f);
		put(o, ofs + pos, sizeof(ofs) - pos);
	} else if (type == 7) {
		put(o, base_oid, GIT_OID_RAWSZ);
	}
	uLongf zlen = compressBound(len);
	uint8_t *z = malloc(zlen);
	FUZZ_ASSERT(z != NULL && compress2(z, &zlen, data, len, 1) == Z_OK);
	put(o, z, zlen);
	free(z);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const unsigned types[4] = { 1, 2, 3, 4 }; /* commit, tree, blob, tag */
	struct out o = { NULL, 0, 0 };
	uint8_t sum[WC_SHA_DIGEST_SIZE];
	size_t off = 0, count = 0, prev = 0;

	put(&o, header, header_len);
	put(&o, "PACK\0\0\0\2\0\0\0\0", 12); /* the count is patched below */
	while (off < size && count < MAX_ENTRIES) {
		unsigned kind = data[off++] % 6;
		size_t len = 0, start = o.len;

		if (size - off >= 2)
			len = (size_t)data[off] << 8 | data[off + 1];
		off += size - off < 2 ? size - off : 2;
		if (len > size - off)
			len = size - off;
		if (kind == 4 && count > 0)
			entry(&o, 6, NULL, start - prev, data + off, len);
		else if (kind == 5 && len >= GIT_OID_RAWSZ)
			entry(&o, 7, data + off, 0, data + off + GIT_OID_RAWSZ, len - GIT_OID_RAWSZ);
		else
			entry(&o, kind < 4 ? types[kind] : 3, NULL, 0, data + off, len);
		prev = start;
		off += len;
		count++;
	}
	uint8_t *cnt = o.p + header_len + 8;
	cnt[0] = (uint8_t)(count >> 24);
	cnt[1] = (uint8_t)(count >> 16);
	cnt[2] = (uint8_t)(count >> 8);
	cnt[3] = (uint8_t)count;
	FUZZ_ASSERT(wc_ShaHash(o.p + header_len, (word32)(o.len - header_len), sum) == 0);
	put(&o, sum, sizeof(sum));

	bundle_fixture_rx(&fx, o.p, o.len, o.len);
	free(o.p);
	return 0;
}
