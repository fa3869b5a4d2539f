#include "daemon/packreuse.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "daemon/gitutil.h"
#include "daemon/oidset.h"
#include "daemon/packbitmap.h"
#include "daemon/packidx.h"
#include "daemon/packwrite.h"

#define MAX_PACKS 4096

uint64_t packreuse_part_min = PACKREUSE_PART_MIN;
#define MAX_TREE_DEPTH 256
/* What becomes of a pack entry: not sent, sent (undecided), copied as stored, copied with its
 * OFS_DELTA offset rewritten, written whole. Entries are decided in the source's order, so a
 * base decided (>= ST_COPY) is one decided before; plan_order keeps that order within each
 * part and keeps a delta in its base's part, so it is also one written before. */
enum { ST_NONE, ST_WANT, ST_COPY, ST_OFS, ST_WHOLE };

struct rpack {
	struct pidx x;
	uint8_t *st;       /* by index position */
	uint64_t *newoff;  /* by index position: where it went in the new pack (while planning:
			    * its number in the plan) */
};

struct packreuse {
	git_repository *src;
	git_odb *odb;
	struct rpack *p;
	size_t np;
	struct oidset want;  /* counted by walking (not by the bitmap) */
	struct oidvec loose; /* wanted, in no pack */
	size_t nobj;         /* objects to send */
	size_t nbitmap;      /* of which counted by the bitmap */
	size_t nwalked;      /* objects the walk met (some of them counted by the bitmap) */
	size_t ncopy;
	/* the reachability bitmap of pack bq, while counting: the file, the objects of that
	 * pack counted so far (by rank) and each index position's rank */
	size_t bq;
	uint8_t *bmap;
	size_t bmaplen;
	struct pbitmap bm;
	uint64_t *bits, *tmp;
	uint32_t *rank;
};

/* Does the source's bitmap already count this object? */
static bool counted(const struct packreuse *r, const git_oid *id)
{
	int64_t pos;

	if (r->bits == NULL || (pos = pidx_find(&r->p[r->bq].x, id)) < 0)
		return false;
	return pbitmap_test(r->bits, r->rank[pos]);
}

static int want_tree(struct packreuse *r, const git_oid *id, int depth, char *err, size_t errsz)
{
	git_tree *t = NULL;
	int rc;

	if (depth > MAX_TREE_DEPTH) {
		gerr_set(err, errsz, "trees nested deeper than %d", MAX_TREE_DEPTH);
		return ME_EPROTO;
	}
	if (counted(r, id))
		return 0; /* and so is everything below it */
	if ((rc = oidset_put(&r->want, id, 0)) <= 0)
		return rc < 0 ? gerr_nomem(err, errsz) : 0;
	if (git_tree_lookup(&t, r->src, id) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot read a tree");
	rc = 0;
	for (size_t i = 0, n = git_tree_entrycount(t); i < n && rc == 0; i++) {
		const git_tree_entry *e = git_tree_entry_byindex(t, i);
		switch (git_tree_entry_type(e)) {
		case GIT_OBJECT_TREE:
			rc = want_tree(r, git_tree_entry_id(e), depth + 1, err, errsz);
			break;
		case GIT_OBJECT_BLOB:
			if (!counted(r, git_tree_entry_id(e)) &&
			    oidset_put(&r->want, git_tree_entry_id(e), 0) < 0)
				rc = gerr_nomem(err, errsz);
			break;
		default: /* a submodule's commit: not ours */
			break;
		}
	}
	git_tree_free(t);
	return rc;
}

static int want_tag(const git_oid *id, void *arg)
{
	struct packreuse *r = arg;

	return oidset_put(&r->want, id, 0) < 0 ? ME_ENOMEM : 0;
}

/* Opens the bitmap load_packs found: r->bits (empty) and r->rank, or nothing when it is not
 * usable. */
static int bitmap_open(struct packreuse *r)
{
	const struct pidx *x = &r->p[r->bq].x;
	int rc = pbitmap_parse(&r->bm, r->bmap, r->bmaplen, x->n,
			       x->pack + x->packlen - PACK_TRAILER_LEN);

	if (rc < 0)
		return rc == ME_ENOMEM ? rc : 0;
	if ((r->bits = calloc(PBITMAP_WORDS(x->n), sizeof(*r->bits))) == NULL ||
	    (r->tmp = malloc(PBITMAP_WORDS(x->n) * sizeof(*r->tmp))) == NULL ||
	    (r->rank = malloc((size_t)x->n * sizeof(*r->rank))) == NULL)
		return ME_ENOMEM;
	for (uint32_t k = 0; k < x->n; k++)
		r->rank[x->rev[k].pos] = k;
	return 0;
}

static void bitmap_close(struct packreuse *r)
{
	pbitmap_free(&r->bm);
	free(r->bits);
	free(r->tmp);
	free(r->rank);
	r->bits = r->tmp = NULL;
	r->rank = NULL;
	if (r->bmap != NULL)
		munmap(r->bmap, r->bmaplen);
	r->bmap = NULL;
}

/* The histories with the bitmap, as upload-pack counts a clone: a commit the bitmap has an
 * entry for adds all it reaches at once; one it has not (made since the last repack) is
 * counted and its parents walked, and once all bitmaps are in, its tree is counted down to
 * what they count. 1 when done, 0 when an entry turned out malformed (nothing but commits was
 * counted then: the caller walks again without the bitmap). */
static int walk_bitmap(struct packreuse *r, const struct oidvec *tips, char *err, size_t errsz)
{
	struct oidvec stack = { NULL, 0, 0 }, trees = { NULL, 0, 0 };
	git_commit *c = NULL;
	int rc = 0;

	for (size_t i = 0; i < tips->n && rc == 0; i++)
		rc = oidvec_push(&stack, &tips->v[i]);
	while (stack.n > 0 && rc == 0) {
		git_oid id = stack.v[--stack.n];
		int64_t pos = pidx_find(&r->p[r->bq].x, &id), e;
		if (counted(r, &id) || oidset_has(&r->want, &id))
			continue;
		if (pos >= 0 && (e = pbitmap_find(&r->bm, (uint32_t)pos)) >= 0) {
			/* what a commit reaches includes itself */
			if (pbitmap_or(&r->bm, (uint32_t)e, r->bits, r->tmp) < 0 ||
			    !pbitmap_test(r->bits, r->rank[pos]))
				goto unusable;
			continue;
		}
		if (oidset_put(&r->want, &id, 0) < 0) {
			rc = ME_ENOMEM;
		} else if (git_commit_lookup(&c, r->src, &id) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
		} else {
			rc = oidvec_push(&trees, git_commit_tree_id(c));
			for (unsigned p = 0, np = git_commit_parentcount(c); p < np && rc == 0; p++)
				rc = oidvec_push(&stack, git_commit_parent_id(c, p));
		}
		git_commit_free(c);
		c = NULL;
	}
	if (rc == ME_ENOMEM)
		gerr_nomem(err, errsz);
	for (size_t i = 0; i < trees.n && rc == 0; i++)
		rc = want_tree(r, &trees.v[i], 0, err, errsz);
	free(stack.v);
	free(trees.v);
	return rc < 0 ? rc : 1;
unusable:
	free(stack.v);
	free(trees.v);
	return 0;
}

/* Everything reachable from the tips: their tags, the trees and blobs they end on, and the
 * histories of the commits they end on (with each commit's tree). */
static int enumerate(struct packreuse *r, const struct gmsg_ref *tips, size_t ntips, char *err,
		     size_t errsz)
{
	struct oidvec commits = { NULL, 0, 0 }, trees = { NULL, 0, 0 };
	git_revwalk *walk = NULL;
	git_commit *c = NULL;
	git_oid id;
	int rc = 0, grc;

	for (size_t i = 0; i < ntips && rc == 0; i++) {
		git_object *end = NULL;
		if ((rc = tip_peel(r->src, &tips[i], want_tag, r, &end, err, errsz)) < 0)
			break;
		switch (git_object_type(end)) {
		case GIT_OBJECT_COMMIT:
			rc = oidvec_push(&commits, git_object_id(end));
			break;
		case GIT_OBJECT_TREE:
			rc = oidvec_push(&trees, git_object_id(end));
			break;
		default:
			rc = oidset_put(&r->want, git_object_id(end), 0) < 0 ? ME_ENOMEM : 0;
			break;
		}
		git_object_free(end);
	}
	if (rc == ME_ENOMEM)
		gerr_nomem(err, errsz);
	if (rc < 0)
		goto out;
	if (r->bmap != NULL && commits.n > 0 && (rc = bitmap_open(r)) < 0) {
		gerr_nomem(err, errsz);
		goto out;
	}
	if (r->bits != NULL && (rc = walk_bitmap(r, &commits, err, errsz)) != 0) {
		if (rc < 0)
			goto out;
	} else if (commits.n > 0) {
		bitmap_close(r); /* none, or malformed: walk every tree */
		if ((rc = walk_new(&walk, r->src, GIT_SORT_NONE, &commits, NULL, err, errsz)) < 0)
			goto out;
		while ((grc = git_revwalk_next(&id, walk)) == 0) {
			if (oidset_put(&r->want, &id, 0) < 0) {
				rc = gerr_nomem(err, errsz);
				goto out;
			}
			if (git_commit_lookup(&c, r->src, &id) < 0) {
				rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
				goto out;
			}
			rc = want_tree(r, git_commit_tree_id(c), 0, err, errsz);
			git_commit_free(c);
			if (rc < 0)
				goto out;
		}
		if (grc != GIT_ITEROVER) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot walk the history");
			goto out;
		}
	}
	rc = 0;
	for (size_t i = 0; i < trees.n && rc == 0; i++)
		rc = want_tree(r, &trees.v[i], 0, err, errsz);
out:
	git_revwalk_free(walk);
	free(commits.v);
	free(trees.v);
	return rc;
}

/* ---- the source's packs ---- */

static void rpack_free(struct rpack *p)
{
	pidx_free(&p->x);
	free(p->st);
	free(p->newoff);
	memset(p, 0, sizeof(*p));
}

/* ME_EINVAL when the pair is not as git writes it (the caller then does without this pack's
 * entries), ME_ENOMEM. */
static int rpack_open(struct rpack *p, const char *idxpath, const char *packpath)
{
	int rc;

	memset(p, 0, sizeof(*p));
	if ((rc = pidx_open(&p->x, idxpath, packpath)) < 0)
		return rc;
	if (p->x.n == 0)
		return 0;
	if ((p->st = calloc(p->x.n, 1)) == NULL ||
	    (p->newoff = calloc(p->x.n, sizeof(*p->newoff))) == NULL) {
		rpack_free(p);
		return ME_ENOMEM;
	}
	madvise(p->x.pack, p->x.packlen, MADV_SEQUENTIAL);
	return 0;
}

static int load_packs(struct packreuse *r, char *err, size_t errsz)
{
	char dir[4096], ipath[4352], ppath[4352];
	struct dirent **names = NULL;
	int n, rc = 0;

	if ((size_t)snprintf(dir, sizeof(dir), "%sobjects/pack", git_repository_commondir(r->src)) >=
	    sizeof(dir)) {
		gerr_set(err, errsz, "repository path too long");
		return ME_EINVAL;
	}
	if ((n = scandir(dir, &names, NULL, alphasort)) < 0)
		return 0; /* no packs: everything loose */
	for (int i = 0; i < n; i++) {
		size_t len = strlen(names[i]->d_name);
		const char *nm = names[i]->d_name;
		if (rc == 0 && len > 9 && strncmp(nm, "pack-", 5) == 0 &&
		    strcmp(nm + len - 4, ".idx") == 0 && r->np < MAX_PACKS) {
			struct rpack *np;
			snprintf(ipath, sizeof(ipath), "%s/%s", dir, nm);
			snprintf(ppath, sizeof(ppath), "%s/%.*s.pack", dir, (int)len - 4, nm);
			if ((np = realloc(r->p, (r->np + 1) * sizeof(*np))) == NULL) {
				rc = gerr_nomem(err, errsz);
			} else {
				r->p = np;
				int orc = rpack_open(&r->p[r->np], ipath, ppath);
				if (orc == 0 && r->bmap == NULL) {
					/* git keeps at most one (bitmap-format.txt) */
					snprintf(ppath, sizeof(ppath), "%s/%.*s.bitmap", dir,
						 (int)len - 4, nm);
					if (pidx_map(ppath, &r->bmap, &r->bmaplen) == 0)
						r->bq = r->np;
				}
				if (orc == 0)
					r->np++;
				else if (orc == ME_ENOMEM)
					rc = gerr_nomem(err, errsz);
				/* else: a pack we do not understand; its objects go whole */
			}
		}
		free(names[i]);
	}
	free(names);
	return rc;
}

/* ---- planning ---- */

void packreuse_free(struct packreuse *r)
{
	if (r == NULL)
		return;
	for (size_t i = 0; i < r->np; i++)
		rpack_free(&r->p[i]);
	free(r->p);
	free(r->loose.v);
	oidset_free(&r->want);
	bitmap_close(r);
	git_odb_free(r->odb);
	free(r);
}

/* p->newoff of the object with this raw id (decided before it). */
static uint64_t newoff_of(const struct packreuse *r, const uint8_t *raw)
{
	git_oid id;

	git_oid_fromraw(&id, raw);
	for (size_t q = 0; q < r->np; q++) {
		int64_t pos = pidx_find(&r->p[q].x, &id);
		if (pos >= 0 && r->p[q].st[pos] >= ST_COPY)
			return r->p[q].newoff[pos];
	}
	return 0; /* not reached: decide() copies a REF_DELTA only when its base is decided */
}

/* Is the object with this raw id already decided (so written before)? */
static bool decided(const struct packreuse *r, const uint8_t *raw)
{
	git_oid id;

	git_oid_fromraw(&id, raw);
	for (size_t q = 0; q < r->np; q++) {
		int64_t pos = pidx_find(&r->p[q].x, &id);
		if (pos >= 0 && r->p[q].st[pos] != ST_NONE)
			return r->p[q].st[pos] >= ST_COPY;
	}
	return false;
}

static int decide(struct packreuse *r, char *err, size_t errsz)
{
	for (size_t q = 0; q < r->np; q++) {
		struct rpack *p = &r->p[q];
		for (uint32_t k = 0; k < p->x.n; k++) {
			uint32_t pos = p->x.rev[k].pos;
			struct pidx_entry e;
			if (p->st[pos] != ST_WANT)
				continue;
			if (pidx_entry(&p->x, k, &e) < 0) {
				gerr_set(err, errsz, "unexpected pack entry at offset %llu",
					 (unsigned long long)p->x.rev[k].off);
				return ME_EINVAL;
			}
			if (e.type == PACK_OFS_DELTA) {
				int64_t bk = pidx_at(&p->x, e.base_off);
				if (bk < 0) {
					gerr_set(err, errsz, "delta base not at an entry");
					return ME_EINVAL;
				}
				p->st[pos] = p->st[p->x.rev[bk].pos] >= ST_COPY ? ST_OFS : ST_WHOLE;
			} else if (e.type == PACK_REF_DELTA) {
				p->st[pos] = decided(r, e.base_oid) ? ST_COPY : ST_WHOLE;
			} else {
				p->st[pos] = ST_COPY;
			}
			if (p->st[pos] != ST_WHOLE)
				r->ncopy++;
		}
	}
	return 0;
}

int packreuse_plan(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		   struct packreuse **out, char *err, size_t errsz)
{
	struct packreuse *r;
	int rc;

	*out = NULL;
	gerr_clear(err, errsz);
	if ((r = calloc(1, sizeof(*r))) == NULL)
		return gerr_nomem(err, errsz);
	r->src = src;
	if ((rc = oidset_init(&r->want)) < 0) {
		free(r);
		return rc;
	}
	if (git_repository_odb(&r->odb, src) < 0) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot open the object database");
		goto out;
	}
	if ((rc = load_packs(r, err, errsz)) < 0)
		goto out;
	if (r->np == 0) {
		gerr_set(err, errsz, "no pack to reuse");
		rc = ME_EINVAL;
		goto out;
	}
	if ((rc = enumerate(r, tips, ntips, err, errsz)) < 0)
		goto out;
	if (r->bits != NULL) {
		struct rpack *bp = &r->p[r->bq];
		for (uint32_t k = 0; k < bp->x.n; k++)
			if (pbitmap_test(r->bits, k)) {
				bp->st[bp->x.rev[k].pos] = ST_WANT;
				r->nbitmap++;
			}
	}
	r->nobj = r->nbitmap;
	for (size_t i = 0; i < r->want.cap; i++) {
		const struct oidset_slot *s = &r->want.slots[i];
		bool found = false;
		if (!s->used || counted(r, &s->oid))
			continue;
		r->nobj++;
		for (size_t q = 0; q < r->np && !found; q++) {
			int64_t pos = pidx_find(&r->p[q].x, &s->oid);
			if (pos >= 0) {
				r->p[q].st[pos] = ST_WANT;
				found = true;
			}
		}
		if (!found && oidvec_push(&r->loose, &s->oid) < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	}
	r->nwalked = r->want.n;
	bitmap_close(r);
	oidset_free(&r->want);
	if (r->nobj > UINT32_MAX) {
		gerr_set(err, errsz, "too many objects");
		rc = ME_ETOOBIG;
		goto out;
	}
	if ((rc = decide(r, err, errsz)) < 0)
		goto out;
	*out = r;
	r = NULL;
out:
	packreuse_free(r);
	return rc;
}

size_t packreuse_bitmapped(const struct packreuse *r)
{
	return r->nbitmap;
}

size_t packreuse_walked(const struct packreuse *r)
{
	return r->nwalked;
}

/* ---- writing ---- */

static int write_whole(struct packreuse *r, struct packw *w, const git_oid *id, char *err,
		       size_t errsz)
{
	git_odb_object *o = NULL;
	int rc, type;

	if (git_odb_read(&o, r->odb, id) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot read an object");
	if ((type = pack_type_of(git_odb_object_type(o))) < 0) {
		gerr_set(err, errsz, "object of unexpected type");
		rc = ME_EGIT;
	} else {
		rc = packw_entry(w, type, NULL, git_odb_object_data(o), git_odb_object_size(o));
	}
	git_odb_object_free(o);
	return rc;
}

/* One entry to write: rank k of pack q, or (q == LOOSE) the object r->loose.v[k]. */
#define LOOSE UINT32_MAX
struct went {
	uint32_t q, k;
};

/* Writes an entry; a delta's base was written before it (its offset in p->newoff). */
static int write_entry(struct packreuse *r, struct packw *w, const struct went *we, char *err,
		       size_t errsz)
{
	struct rpack *p;
	struct pidx_entry e;
	git_oid id;
	uint32_t pos;
	uint8_t ofs[16];
	size_t i = sizeof(ofs);
	uint64_t rel;
	int rc;

	if (we->q == LOOSE)
		return write_whole(r, w, &r->loose.v[we->k], err, errsz);
	p = &r->p[we->q];
	pos = p->x.rev[we->k].pos;
	p->newoff[pos] = packw_offset(w);
	switch (p->st[pos]) {
	case ST_COPY:
		return packw_put(w, p->x.pack + p->x.rev[we->k].off,
				 pidx_end(&p->x, we->k) - p->x.rev[we->k].off);
	case ST_OFS:
		if (pidx_entry(&p->x, we->k, &e) < 0)
			return ME_EINTERNAL; /* decided on the same bytes */
		rel = p->newoff[pos] - p->newoff[p->x.rev[pidx_at(&p->x, e.base_off)].pos];
		ofs[--i] = rel & 127;
		while (rel >>= 7)
			ofs[--i] = 128 | (--rel & 127);
		if ((rc = packw_put(w, p->x.pack + e.off, e.size_end - e.off)) == 0 &&
		    (rc = packw_put(w, ofs + i, sizeof(ofs) - i)) == 0)
			rc = packw_put(w, p->x.pack + e.data, e.end - e.data);
		return rc;
	default:
		git_oid_fromraw(&id, pidx_oid(&p->x, pos));
		return write_whole(r, w, &id, err, errsz);
	}
}

static uint32_t uf_find(uint32_t *up, uint32_t i)
{
	while (up[i] != i)
		i = up[i] = up[up[i]];
	return i;
}

/* The order to write the entries in, and the parts it makes. An entry and its delta base
 * must be in one part, the base first: entries linked by deltas form a group. Groups are
 * small and interleaved (git's delta search pairs the versions of one path: 11,635 groups of
 * at most 5 KB among the 225,899 trees of the large benchmark repository, where no offset
 * cuts the pack), so parts are made of groups: each group goes, in the order its first
 * entry comes, to the current part, and a part is complete once it holds 2/PACKREUSE_PARTS
 * of the pack's bytes and objects together (bytes/all bytes + objects/all objects) and at
 * least part_min bytes, when at least half that remains. A receiver's work and memory for a
 * part grow with its objects as well as its bytes: trees are many small objects. Within a
 * part, entries keep the source's order, so bases still come first. With part_min 0 the
 * order is the source's, one part.
 * *order: r->nobj entries; counts: entries per part, *nparts of them (up to
 * PACKREUSE_PARTS). p->newoff holds plan numbers meanwhile. */
_Static_assert(PACKREUSE_PARTS < 0xff, "part numbers are bytes, 0xff is none");

static int plan_order(struct packreuse *r, uint64_t part_min, struct went **order,
		      uint32_t counts[PACKREUSE_PARTS], uint32_t *nparts)
{
	size_t n = r->nobj > 0 ? r->nobj : 1, i = 0; /* no malloc(0) */
	struct went *we = malloc(n * sizeof(*we)), *ord = malloc(n * sizeof(*ord));
	uint32_t *up = malloc(n * sizeof(*up)), *cnt = malloc(n * sizeof(*cnt));
	uint32_t start[PACKREUSE_PARTS], cur = 0;
	uint64_t *bytes = calloc(n, sizeof(*bytes)), total = 0, accb = 0;
	uint8_t *part = malloc(n), *partof = malloc(n);
	const double target = 2.0 / PACKREUSE_PARTS;
	double acc = 0, left = 2.0;
	int rc = ME_ENOMEM;

	if (we == NULL || ord == NULL || up == NULL || cnt == NULL || bytes == NULL ||
	    part == NULL || partof == NULL)
		goto out;
	for (size_t q = 0; q < r->np; q++) {
		struct rpack *p = &r->p[q];
		for (uint32_t k = 0; k < p->x.n; k++) {
			uint32_t pos = p->x.rev[k].pos;
			struct pidx_entry e;
			uint64_t b = UINT64_MAX;
			if (p->st[pos] < ST_COPY)
				continue;
			p->newoff[pos] = i;
			we[i] = (struct went){ (uint32_t)q, k };
			up[i] = (uint32_t)i;
			bytes[i] = pidx_end(&p->x, k) - p->x.rev[k].off;
			if (p->st[pos] != ST_WHOLE && pidx_entry(&p->x, k, &e) < 0) {
				rc = ME_EINTERNAL; /* decided on the same bytes */
				goto out;
			}
			if (p->st[pos] == ST_OFS)
				b = p->newoff[p->x.rev[pidx_at(&p->x, e.base_off)].pos];
			else if (p->st[pos] == ST_COPY && e.type == PACK_REF_DELTA)
				b = newoff_of(r, e.base_oid);
			if (b != UINT64_MAX)
				up[uf_find(up, (uint32_t)i)] = uf_find(up, (uint32_t)b);
			i++;
		}
	}
	for (size_t k = 0; k < r->loose.n; k++, i++) {
		size_t sz = 0;
		git_object_t type;
		we[i] = (struct went){ LOOSE, (uint32_t)k };
		up[i] = (uint32_t)i;
		/* deflated afresh: weighed by their size, roughly what they will take */
		if (git_odb_read_header(&sz, &type, r->odb, &r->loose.v[k]) == 0)
			bytes[i] = sz;
	}
	if (i != r->nobj) {
		rc = ME_EINTERNAL;
		goto out;
	}
	n = i;
	/* bytes and entries by group (at its root), then the groups into parts */
	for (i = 0; i < n; i++)
		cnt[i] = 1;
	for (i = 0; i < n; i++) {
		uint32_t g = uf_find(up, (uint32_t)i);
		total += bytes[i];
		if (g != i) {
			bytes[g] += bytes[i];
			bytes[i] = 0;
			cnt[g]++;
			cnt[i] = 0;
		}
	}
	memset(partof, 0xff, n);
	memset(counts, 0, PACKREUSE_PARTS * sizeof(*counts));
	for (i = 0; i < n; i++) {
		uint32_t g = uf_find(up, (uint32_t)i);
		if (partof[g] == 0xff) {
			double w = (total > 0 ? (double)bytes[g] / (double)total : 0) +
				   (double)cnt[g] / (double)n;
			if (part_min > 0 && acc >= target && accb >= part_min &&
			    left >= target / 2 && cur + 1 < PACKREUSE_PARTS) {
				cur++;
				acc = 0;
				accb = 0;
			}
			partof[g] = (uint8_t)cur;
			acc += w;
			accb += bytes[g];
			left -= w;
		}
		part[i] = partof[g];
		counts[part[i]]++;
	}
	*nparts = cur + 1;
	start[0] = 0;
	for (uint32_t k = 1; k < *nparts; k++)
		start[k] = start[k - 1] + counts[k - 1];
	for (i = 0; i < n; i++)
		ord[start[part[i]]++] = we[i];
	*order = ord;
	ord = NULL;
	rc = 0;
out:
	free(we);
	free(ord);
	free(up);
	free(cnt);
	free(bytes);
	free(part);
	free(partof);
	return rc;
}

int packreuse_write(struct packreuse *r, int fd, uint64_t *bytes, size_t *objects,
		    size_t *reused, struct xmsg_parts *parts, char *err, size_t errsz)
{
	struct packw *w = NULL;
	struct went *order = NULL;
	uint32_t counts[PACKREUSE_PARTS], nparts = 1;
	uint64_t total = 0;
	size_t n = 0;
	int rc;

	if (parts != NULL)
		memset(parts, 0, sizeof(*parts));
	if ((rc = plan_order(r, parts != NULL ? packreuse_part_min : 0, &order, counts,
			     &nparts)) < 0) {
		if (rc == ME_ENOMEM)
			gerr_nomem(err, errsz);
		else
			gerr_set(err, errsz, "cannot plan the pack");
		goto out;
	}
	if ((rc = packw_new(&w, fd, (uint32_t)r->nobj)) < 0)
		goto out;
	for (uint32_t k = 0, next = 0; k < nparts; k++) {
		if (parts != NULL) {
			parts->v[k].offset = packw_offset(w);
			parts->v[k].count = counts[k];
		}
		for (next += counts[k]; n < next; n++)
			if ((rc = write_entry(r, w, &order[n], err, errsz)) < 0)
				goto out;
	}
	if (n != r->nobj) {
		gerr_set(err, errsz, "wrote %zu objects of %zu", n, r->nobj);
		rc = ME_EINTERNAL;
		goto out;
	}
	if ((rc = packw_finish(w, &total)) < 0)
		goto out;
	if (bytes != NULL)
		*bytes = total;
	if (objects != NULL)
		*objects = n;
	if (reused != NULL)
		*reused = r->ncopy;
	if (parts != NULL)
		parts->n = nparts;
out:
	if (rc == ME_EIO)
		gerr_set(err, errsz, "cannot write the pack: %s", strerror(errno));
	packw_free(w);
	free(order);
	return rc;
}
