/* A pack and its v2 index, mapped read-only and checked against what git writes: the index's
 * fan-out, every offset inside the pack, the large-offset table, no two entries at one offset.
 * Entry headers are parsed on demand, bounded by where the next entry starts. Used to reuse a
 * source's pack entries (packreuse.c) and to learn the types of a received pack's objects
 * without decompressing them (mirror.c).
 *
 * Library code: no logging, no libgit2 state; ME_* codes. */
#ifndef ME_PACKIDX_H
#define ME_PACKIDX_H

#include <stddef.h>
#include <stdint.h>

#include <git2.h>

struct pidx_off {
	uint64_t off;
	uint32_t pos; /* index position (oid order) */
};

struct pidx {
	uint8_t *idx, *pack;
	size_t idxlen, packlen;
	uint32_t n, n64;
	const uint8_t *fanout, *oids, *offs32, *offs64;
	struct pidx_off *rev; /* entries by offset ("rank" k below) */
};

struct pidx_entry {
	int type;                /* PACK_* (packwrite.h) */
	uint64_t off, end;       /* the entry's bytes */
	uint64_t size_end;       /* end of the type and size header */
	uint64_t data;           /* start of the zlib stream */
	uint64_t base_off;       /* PACK_OFS_DELTA */
	const uint8_t *base_oid; /* PACK_REF_DELTA: GIT_OID_RAWSZ bytes */
};

/* Maps and checks the pair: ME_EINVAL when anything is not as expected, ME_ENOMEM. On failure
 * p is empty (pidx_free is a no-op). */
int pidx_open(struct pidx *p, const char *idxpath, const char *packpath);
void pidx_free(struct pidx *p);
/* Maps a regular, non-empty file read-only (not following a symlink): 0 or -1. munmap it. */
int pidx_map(const char *path, uint8_t **out, size_t *len);
/* Unmaps the pack, keeping the index: pidx_find and the ranks stay usable, pidx_entry and
 * pidx_types do not. */
void pidx_unmap_pack(struct pidx *p);
/* Index position of oid, -1 when absent. */
int64_t pidx_find(const struct pidx *p, const git_oid *oid);
/* Rank of the entry starting at off, -1 when none does. */
int64_t pidx_at(const struct pidx *p, uint64_t off);
/* End of the entry of rank k: where the next one starts, or the trailer. */
uint64_t pidx_end(const struct pidx *p, uint32_t k);
/* Raw id of the object at index position pos. */
static inline const uint8_t *pidx_oid(const struct pidx *p, uint32_t pos)
{
	return p->oids + (size_t)pos * GIT_OID_RAWSZ;
}
/* Parses the header of the entry of rank k: -1 when malformed. */
int pidx_entry(const struct pidx *p, uint32_t k, struct pidx_entry *e);
/* The object type (GIT_OBJECT_COMMIT/TREE/BLOB/TAG) of every entry, by index position, deltas
 * resolved through their bases in this pack (a self-contained pack: as libgit2's indexer
 * leaves a thin pack once it appended the bases). types must hold p->n bytes. ME_EINVAL when
 * an entry is malformed, a base is not in the pack or a chain is longer than
 * PIDX_MAX_CHAIN (or loops). */
#define PIDX_MAX_CHAIN 10000
int pidx_types(const struct pidx *p, uint8_t *types);

#endif
