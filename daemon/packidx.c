/* Mapped pack + v2 index (see packidx.h). */
#include "daemon/packidx.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"
#include "daemon/packwrite.h"

#define IDX_HDR (8 + 256 * 4)
#define IDX_TRAILER 40

static int off_cmp(const void *a, const void *b)
{
	const struct pidx_off *x = a, *y = b;
	return x->off < y->off ? -1 : x->off > y->off;
}

void pidx_free(struct pidx *p)
{
	if (p->idx != NULL)
		munmap(p->idx, p->idxlen);
	if (p->pack != NULL)
		munmap(p->pack, p->packlen);
	free(p->rev);
	memset(p, 0, sizeof(*p));
}

void pidx_unmap_pack(struct pidx *p)
{
	if (p->pack != NULL)
		munmap(p->pack, p->packlen);
	p->pack = NULL;
}

int pidx_map(const char *path, uint8_t **out, size_t *len)
{
	struct stat sb;
	void *m;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

	if (fd < 0)
		return -1;
	if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode) || sb.st_size <= 0 ||
	    (uint64_t)sb.st_size > SIZE_MAX) {
		close(fd);
		return -1;
	}
	m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (m == MAP_FAILED)
		return -1;
	*out = m;
	*len = (size_t)sb.st_size;
	return 0;
}

int pidx_open(struct pidx *p, const char *idxpath, const char *packpath)
{
	size_t need;

	memset(p, 0, sizeof(*p));
	if (pidx_map(idxpath, &p->idx, &p->idxlen) < 0 ||
	    pidx_map(packpath, &p->pack, &p->packlen) < 0)
		goto bad;
	if (p->idxlen < IDX_HDR + IDX_TRAILER || memcmp(p->idx, "\377tOc", 4) != 0 ||
	    me_be32(p->idx + 4) != 2)
		goto bad;
	p->fanout = p->idx + 8;
	for (int i = 1; i < 256; i++)
		if (me_be32(p->fanout + 4 * i) < me_be32(p->fanout + 4 * (i - 1)))
			goto bad;
	p->n = me_be32(p->fanout + 4 * 255);
	if (p->n > (p->idxlen - IDX_HDR - IDX_TRAILER) / (GIT_OID_RAWSZ + 8))
		goto bad;
	need = IDX_HDR + (size_t)p->n * (GIT_OID_RAWSZ + 8) + IDX_TRAILER;
	if (p->idxlen < need || (p->idxlen - need) % 8 != 0)
		goto bad;
	p->n64 = (uint32_t)((p->idxlen - need) / 8);
	p->oids = p->idx + IDX_HDR;
	p->offs32 = p->oids + (size_t)p->n * (GIT_OID_RAWSZ + 4);
	p->offs64 = p->offs32 + (size_t)p->n * 4;
	if (p->packlen < PACK_HDR_LEN + PACK_TRAILER_LEN || memcmp(p->pack, "PACK", 4) != 0 ||
	    (me_be32(p->pack + 4) != 2 && me_be32(p->pack + 4) != 3) || me_be32(p->pack + 8) != p->n)
		goto bad;
	if (p->n == 0)
		return 0;
	if ((p->rev = malloc((size_t)p->n * sizeof(*p->rev))) == NULL) {
		pidx_free(p);
		return ME_ENOMEM;
	}
	for (uint32_t i = 0; i < p->n; i++) {
		uint64_t off = me_be32(p->offs32 + 4 * (size_t)i);
		if (off & 0x80000000u) {
			off &= 0x7fffffffu;
			if (off >= p->n64)
				goto bad;
			off = me_be64(p->offs64 + 8 * off);
		}
		if (off < PACK_HDR_LEN || off >= p->packlen - PACK_TRAILER_LEN)
			goto bad;
		p->rev[i].off = off;
		p->rev[i].pos = i;
	}
	qsort(p->rev, p->n, sizeof(*p->rev), off_cmp);
	for (uint32_t i = 1; i < p->n; i++)
		if (p->rev[i].off == p->rev[i - 1].off)
			goto bad;
	return 0;
bad:
	pidx_free(p);
	return ME_EINVAL;
}

int64_t pidx_find(const struct pidx *p, const git_oid *oid)
{
	unsigned b = oid->id[0];
	uint32_t lo = b > 0 ? me_be32(p->fanout + 4 * (b - 1)) : 0, hi = me_be32(p->fanout + 4 * b);

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		int c = memcmp(pidx_oid(p, mid), oid->id, GIT_OID_RAWSZ);
		if (c == 0)
			return mid;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

int64_t pidx_at(const struct pidx *p, uint64_t off)
{
	uint32_t lo = 0, hi = p->n;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (p->rev[mid].off == off)
			return mid;
		if (p->rev[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

uint64_t pidx_end(const struct pidx *p, uint32_t k)
{
	return k + 1 < p->n ? p->rev[k + 1].off : p->packlen - PACK_TRAILER_LEN;
}

int pidx_entry(const struct pidx *p, uint32_t k, struct pidx_entry *e)
{
	const uint8_t *b = p->pack;
	uint64_t i, end;
	unsigned c, cnt = 0;

	e->off = i = p->rev[k].off;
	e->end = end = pidx_end(p, k);
	c = b[i++];
	e->type = (c >> 4) & 7;
	while (c & 0x80) {
		if (i >= end || ++cnt > 9)
			return -1;
		c = b[i++];
	}
	e->size_end = i;
	e->base_oid = NULL;
	e->base_off = 0;
	switch (e->type) {
	case PACK_COMMIT: case PACK_TREE: case PACK_BLOB: case PACK_TAG:
		break;
	case PACK_OFS_DELTA: {
		uint64_t rel;
		if (i >= end)
			return -1;
		c = b[i++];
		rel = c & 127;
		cnt = 0;
		while (c & 0x80) {
			if (i >= end || ++cnt > 8)
				return -1;
			c = b[i++];
			rel = ((rel + 1) << 7) | (c & 127);
		}
		if (rel == 0 || rel > e->off - PACK_HDR_LEN)
			return -1;
		e->base_off = e->off - rel;
		break;
	}
	case PACK_REF_DELTA:
		if (end - i < GIT_OID_RAWSZ)
			return -1;
		e->base_oid = b + i;
		i += GIT_OID_RAWSZ;
		break;
	default:
		return -1;
	}
	if (end - i < 2) /* a zlib stream is at least two bytes */
		return -1;
	e->data = i;
	return 0;
}

/* Rank of the base of e, -1 when it is not in the pack. rank: index position -> rank. */
static int64_t base_rank(const struct pidx *p, const uint32_t *rank, const struct pidx_entry *e)
{
	git_oid id;
	int64_t pos;

	if (e->type == PACK_OFS_DELTA)
		return pidx_at(p, e->base_off);
	git_oid_fromraw(&id, e->base_oid);
	if ((pos = pidx_find(p, &id)) < 0)
		return -1;
	return rank[pos];
}

int pidx_types(const struct pidx *p, uint8_t *types)
{
	uint32_t *rank;
	int rc = 0;

	memset(types, 0, p->n);
	if (p->n == 0)
		return 0;
	if ((rank = malloc((size_t)p->n * sizeof(*rank))) == NULL)
		return ME_ENOMEM;
	for (uint32_t k = 0; k < p->n; k++)
		rank[p->rev[k].pos] = k;
	for (uint32_t k = 0; k < p->n; k++) {
		struct pidx_entry e;
		uint32_t r = k;
		unsigned depth = 0;
		uint8_t t = 0;

		if (types[p->rev[k].pos] != 0)
			continue;
		/* Down the chain to a known type or a whole object, then again to record it. */
		for (;;) {
			int64_t b;
			if (types[p->rev[r].pos] != 0) {
				t = types[p->rev[r].pos];
				break;
			}
			if (pidx_entry(p, r, &e) < 0) {
				rc = ME_EINVAL;
				goto out;
			}
			if (e.type != PACK_OFS_DELTA && e.type != PACK_REF_DELTA) {
				t = (uint8_t)e.type;
				break;
			}
			if (++depth > PIDX_MAX_CHAIN || (b = base_rank(p, rank, &e)) < 0) {
				rc = ME_EINVAL;
				goto out;
			}
			r = (uint32_t)b;
		}
		for (r = k; types[p->rev[r].pos] == 0;) {
			types[p->rev[r].pos] = t;
			if (pidx_entry(p, r, &e) < 0 ||
			    (e.type != PACK_OFS_DELTA && e.type != PACK_REF_DELTA))
				break;
			r = (uint32_t)base_rank(p, rank, &e);
		}
	}
out:
	free(rank);
	return rc;
}
