#include "daemon/thinpack.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zlib.h>

#include "common/err.h"
#include "daemon/gitutil.h"
#include "daemon/packwrite.h"

#define BLK 16 /* delta: bytes per indexed block of the base */
#define MAX_COPY 0xffffffu /* largest copy one instruction holds (3 size bytes) */
#define MAX_TREE_DEPTH 256 /* nested trees followed while planning */

/* ---- delta encoding (git's format: see Documentation/gitformat-pack.txt) ---- */

struct dbuf {
	uint8_t *p;
	size_t n, max;
};

static int dput(struct dbuf *d, const uint8_t *src, size_t len)
{
	if (len > d->max - d->n)
		return ME_ETOOBIG;
	memcpy(d->p + d->n, src, len);
	d->n += len;
	return 0;
}

static int dvarint(struct dbuf *d, size_t v)
{
	uint8_t b[10];
	size_t n = 0;

	do {
		b[n] = v & 0x7f;
		v >>= 7;
		if (v)
			b[n] |= 0x80;
		n++;
	} while (v);
	return dput(d, b, n);
}

static int dinsert(struct dbuf *d, const uint8_t *src, size_t len)
{
	while (len > 0) {
		uint8_t n = len > 127 ? 127 : (uint8_t)len;
		int rc;
		if ((rc = dput(d, &n, 1)) < 0 || (rc = dput(d, src, n)) < 0)
			return rc;
		src += n;
		len -= n;
	}
	return 0;
}

static int dcopy(struct dbuf *d, size_t off, size_t len)
{
	while (len > 0) {
		size_t n = len > MAX_COPY ? MAX_COPY : len;
		uint8_t b[8], cmd = 0x80;
		size_t k = 1;
		for (int i = 0; i < 4; i++) {
			uint8_t v = (uint8_t)(off >> (8 * i));
			if (v) {
				cmd |= (uint8_t)(1u << i);
				b[k++] = v;
			}
		}
		for (int i = 0; i < 3; i++) {
			uint8_t v = (uint8_t)(n >> (8 * i));
			if (v) {
				cmd |= (uint8_t)(0x10u << i);
				b[k++] = v;
			}
		}
		b[0] = cmd;
		int rc = dput(d, b, k);
		if (rc < 0)
			return rc;
		off += n;
		len -= n;
	}
	return 0;
}

static uint32_t blk_hash(const uint8_t *p)
{
	uint64_t a, b;

	memcpy(&a, p, 8);
	memcpy(&b, p + 8, 8);
	a ^= b * 0x9e3779b97f4a7c15ull;
	a *= 0xff51afd7ed558ccdull;
	return (uint32_t)(a >> 32);
}

int delta_encode(const uint8_t *base, size_t blen, const uint8_t *target, size_t tlen,
		 size_t max, uint8_t **out, size_t *outlen)
{
	struct dbuf d = { NULL, 0, max };
	uint32_t *tab = NULL;
	size_t tabsz = 1, ins = 0, i = 0;
	int rc;

	*out = NULL;
	*outlen = 0;
	if (blen > UINT32_MAX - 1 || (blen > 0 && base == NULL) || (tlen > 0 && target == NULL))
		return ME_EINVAL;
	if (max == 0 || (d.p = malloc(max)) == NULL)
		return max == 0 ? ME_ETOOBIG : ME_ENOMEM;
	if ((rc = dvarint(&d, blen)) < 0 || (rc = dvarint(&d, tlen)) < 0)
		goto out;
	while (tabsz < 2 * (blen / BLK) + 1)
		tabsz <<= 1;
	if (blen >= BLK) {
		if ((tab = malloc(tabsz * sizeof(*tab))) == NULL) {
			rc = ME_ENOMEM;
			goto out;
		}
		/* Entries hold offset + 1 (0: empty); later blocks win, which favours nearby
		 * copies of repeated content no more than any other choice would. */
		memset(tab, 0, tabsz * sizeof(*tab));
		for (size_t off = 0; off + BLK <= blen; off += BLK)
			tab[blk_hash(base + off) & (tabsz - 1)] = (uint32_t)off + 1;
	}
	while (tab != NULL && i + BLK <= tlen) {
		uint32_t e = tab[blk_hash(target + i) & (tabsz - 1)];
		if (e == 0 || memcmp(base + (e - 1), target + i, BLK) != 0) {
			i++;
			continue;
		}
		size_t off = e - 1, len = BLK;
		while (off + len < blen && i + len < tlen && base[off + len] == target[i + len])
			len++;
		while (i > ins && off > 0 && base[off - 1] == target[i - 1]) {
			i--;
			off--;
			len++;
		}
		if ((rc = dinsert(&d, target + ins, i - ins)) < 0 || (rc = dcopy(&d, off, len)) < 0)
			goto out;
		i += len;
		ins = i;
	}
	if ((rc = dinsert(&d, target + ins, tlen - ins)) < 0)
		goto out;
	*out = d.p;
	*outlen = d.n;
	d.p = NULL;
	rc = 0;
out:
	free(tab);
	free(d.p);
	return rc;
}

static int rd_varint(const uint8_t **p, const uint8_t *end, size_t *v)
{
	size_t r = 0;
	unsigned shift = 0;

	for (;;) {
		if (*p >= end || shift > 56)
			return ME_EPROTO;
		uint8_t c = *(*p)++;
		r |= (size_t)(c & 0x7f) << shift;
		shift += 7;
		if (!(c & 0x80))
			break;
	}
	*v = r;
	return 0;
}

int delta_apply(const uint8_t *base, size_t blen, const uint8_t *delta, size_t dlen, size_t max,
		uint8_t **out, size_t *outlen)
{
	const uint8_t *p = delta, *end = delta + dlen;
	size_t bsz, rsz, n = 0;
	uint8_t *r;

	*out = NULL;
	*outlen = 0;
	if (rd_varint(&p, end, &bsz) < 0 || rd_varint(&p, end, &rsz) < 0 || bsz != blen ||
	    rsz > max)
		return ME_EPROTO;
	if ((r = malloc(rsz ? rsz : 1)) == NULL)
		return ME_ENOMEM;
	while (p < end) {
		uint8_t cmd = *p++;
		if (cmd & 0x80) {
			size_t off = 0, len = 0;
			for (int i = 0; i < 4; i++)
				if (cmd & (1u << i)) {
					if (p >= end)
						goto bad;
					off |= (size_t)*p++ << (8 * i);
				}
			for (int i = 0; i < 3; i++)
				if (cmd & (0x10u << i)) {
					if (p >= end)
						goto bad;
					len |= (size_t)*p++ << (8 * i);
				}
			if (len == 0)
				len = 0x10000;
			if (off > blen || len > blen - off || len > rsz - n)
				goto bad;
			memcpy(r + n, base + off, len);
			n += len;
		} else if (cmd != 0) {
			if (cmd > (size_t)(end - p) || cmd > rsz - n)
				goto bad;
			memcpy(r + n, p, cmd);
			p += cmd;
			n += cmd;
		} else {
			goto bad;
		}
	}
	if (n != rsz)
		goto bad;
	*out = r;
	*outlen = n;
	return 0;
bad:
	free(r);
	return ME_EPROTO;
}

/* ---- planning ---- */

struct tp_obj {
	git_oid oid;
	git_oid base; /* zero: no delta base */
	git_object_t type;
};

struct thinpack {
	git_repository *src;
	git_odb *odb;
	struct tp_obj *v;
	size_t n, cap;
	struct oidset known; /* in the boundary commits' trees: the receiver has them */
	struct oidset seen;  /* planned; val = delta chain depth once written */
};

static int tp_push(struct thinpack *tp, const git_oid *oid, const git_oid *base,
		   git_object_t type)
{
	if (tp->n >= THIN_MAX_OBJECTS)
		return ME_ETOOBIG;
	if (tp->n == tp->cap) {
		size_t ncap = tp->cap ? tp->cap * 2 : 256;
		struct tp_obj *p = realloc(tp->v, ncap * sizeof(*p));
		if (p == NULL)
			return ME_ENOMEM;
		tp->v = p;
		tp->cap = ncap;
	}
	struct tp_obj *o = &tp->v[tp->n++];
	git_oid_cpy(&o->oid, oid);
	if (base != NULL)
		git_oid_cpy(&o->base, base);
	else
		memset(&o->base, 0, sizeof(o->base));
	o->type = type;
	return 0;
}

/* Every tree and blob of tree id into tp->known (subtrees already there are skipped). */
static int walk_known(struct thinpack *tp, const git_oid *id, int depth, char *err,
		      size_t errsz)
{
	git_tree *t = NULL;
	int rc;

	if (depth > MAX_TREE_DEPTH)
		return ME_ETOOBIG;
	if ((rc = oidset_put(&tp->known, id, 0)) <= 0)
		return rc;
	if (git_tree_lookup(&t, tp->src, id) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot read a tree");
	size_t n = git_tree_entrycount(t);
	rc = 0;
	for (size_t i = 0; i < n && rc >= 0; i++) {
		const git_tree_entry *e = git_tree_entry_byindex(t, i);
		git_object_t ty = git_tree_entry_type(e);
		if (ty == GIT_OBJECT_TREE)
			rc = walk_known(tp, git_tree_entry_id(e), depth + 1, err, errsz);
		else if (ty == GIT_OBJECT_BLOB)
			rc = oidset_put(&tp->known, git_tree_entry_id(e), 0);
	}
	git_tree_free(t);
	return rc < 0 ? rc : 0;
}

static bool have(const struct thinpack *tp, const git_oid *id)
{
	return oidset_has(&tp->known, id) || oidset_has(&tp->seen, id);
}

/* Plans tree id and what it introduces; old is the tree at the same path in the first parent
 * (NULL when there is none): its entries are the delta bases. */
static int plan_tree(struct thinpack *tp, const git_oid *id, const git_oid *old, int depth,
		     char *err, size_t errsz)
{
	git_tree *t = NULL, *ot = NULL;
	int rc;

	if (depth > MAX_TREE_DEPTH)
		return ME_ETOOBIG;
	if (have(tp, id))
		return 0;
	if ((rc = oidset_put(&tp->seen, id, 0)) < 0 || (rc = tp_push(tp, id, old, GIT_OBJECT_TREE)) < 0)
		return rc;
	if (git_tree_lookup(&t, tp->src, id) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot read a tree");
	if (old != NULL && git_tree_lookup(&ot, tp->src, old) < 0) {
		git_tree_free(t);
		return gerr_git(err, errsz, ME_EGIT, "cannot read a tree");
	}
	size_t n = git_tree_entrycount(t);
	rc = 0;
	for (size_t i = 0; i < n && rc >= 0; i++) {
		const git_tree_entry *e = git_tree_entry_byindex(t, i), *oe = NULL;
		git_object_t ty = git_tree_entry_type(e);
		const git_oid *eid = git_tree_entry_id(e), *base = NULL;
		if ((ty != GIT_OBJECT_TREE && ty != GIT_OBJECT_BLOB) || have(tp, eid))
			continue;
		if (ot != NULL && (oe = git_tree_entry_byname(ot, git_tree_entry_name(e))) != NULL &&
		    git_tree_entry_type(oe) == ty)
			base = git_tree_entry_id(oe);
		if (ty == GIT_OBJECT_TREE) {
			rc = plan_tree(tp, eid, base, depth + 1, err, errsz);
		} else if ((rc = oidset_put(&tp->seen, eid, 0)) >= 0) {
			rc = tp_push(tp, eid, base, GIT_OBJECT_BLOB);
		}
	}
	git_tree_free(ot);
	git_tree_free(t);
	return rc < 0 ? rc : 0;
}

struct tagplan {
	struct thinpack *tp;
	const struct oidset *haveset;
};

/* An annotated tag a tip points through goes whole, unless the receiver has it. */
static int plan_tag(const git_oid *id, void *arg)
{
	struct tagplan *t = arg;
	int rc = 0;

	if (!oidset_has(t->haveset, id) && (rc = oidset_put(&t->tp->seen, id, 0)) == 1)
		rc = tp_push(t->tp, id, NULL, GIT_OBJECT_TAG);
	return rc < 0 ? rc : 0;
}

/* The tags a tip points through; then what they end on: a commit is walked later, a tree or
 * blob (a tag of a tree) is planned here unless known. */
static int plan_tip(struct thinpack *tp, const struct oidset *haveset,
		    const struct gmsg_ref *tip, char *err, size_t errsz)
{
	struct tagplan t = { tp, haveset };
	git_object *obj = NULL;
	int rc;

	if ((rc = tip_peel(tp->src, tip, plan_tag, &t, &obj, err, errsz)) < 0)
		return rc;
	if (!oidset_has(haveset, git_object_id(obj))) {
		const git_oid *id = git_object_id(obj);
		if (git_object_type(obj) == GIT_OBJECT_TREE) {
			rc = plan_tree(tp, id, NULL, 0, err, errsz);
		} else if (git_object_type(obj) == GIT_OBJECT_BLOB && !have(tp, id)) {
			if ((rc = oidset_put(&tp->seen, id, 0)) >= 0)
				rc = tp_push(tp, id, NULL, GIT_OBJECT_BLOB);
		}
	}
	git_object_free(obj);
	return rc < 0 ? rc : 0;
}

void thinpack_free(struct thinpack *tp)
{
	if (tp == NULL)
		return;
	free(tp->v);
	oidset_free(&tp->known);
	oidset_free(&tp->seen);
	git_odb_free(tp->odb);
	free(tp);
}

int thinpack_plan(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		  const struct oidset *haveset, const struct oidvec *tipc, const struct oidvec *pre,
		  const struct oidvec *order, struct thinpack **out, char *err, size_t errsz)
{
	struct thinpack *tp;
	git_revwalk *walk = NULL;
	git_commit *c = NULL, *pc = NULL;
	git_oid id;
	size_t ncommits = 0;
	int rc, grc;

	*out = NULL;
	if (pre->n == 0 || pre->n > THIN_MAX_BOUNDARY ||
	    (order != NULL && order->n > THIN_MAX_COMMITS))
		return ME_ETOOBIG;
	if ((tp = calloc(1, sizeof(*tp))) == NULL)
		return ME_ENOMEM;
	tp->src = src;
	if ((rc = oidset_init(&tp->known)) < 0 || (rc = oidset_init(&tp->seen)) < 0)
		goto out;
	if (git_repository_odb(&tp->odb, src) < 0) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot open the object database");
		goto out;
	}
	for (size_t i = 0; i < pre->n; i++) {
		if (git_commit_lookup(&c, src, &pre->v[i]) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a boundary commit");
			goto out;
		}
		rc = walk_known(tp, git_commit_tree_id(c), 0, err, errsz);
		git_commit_free(c);
		c = NULL;
		if (rc < 0)
			goto out;
	}
	for (size_t i = 0; i < ntips; i++)
		if ((rc = plan_tip(tp, haveset, &tips[i], err, errsz)) < 0)
			goto out;
	if (order == NULL && (rc = walk_new(&walk, src, GIT_SORT_TOPOLOGICAL | GIT_SORT_REVERSE,
					    tipc, pre, err, errsz)) < 0)
		goto out;
	/* Parents first: a delta base (the same path in the first parent) is then always the
	 * receiver's already or planned earlier, so no two objects are each other's base. */
	for (size_t oi = 0;; oi++) {
		if (order != NULL) {
			if (oi == order->n) {
				grc = GIT_ITEROVER;
				break;
			}
			git_oid_cpy(&id, &order->v[oi]);
		} else if ((grc = git_revwalk_next(&id, walk)) != 0) {
			break;
		}
		if (++ncommits > THIN_MAX_COMMITS) {
			rc = ME_ETOOBIG;
			goto out;
		}
		if (git_commit_lookup(&c, src, &id) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
			goto out;
		}
		if ((rc = oidset_put(&tp->seen, &id, 0)) < 0 ||
		    (rc = tp_push(tp, &id, NULL, GIT_OBJECT_COMMIT)) < 0)
			goto out;
		const git_oid *old = NULL;
		if (git_commit_parentcount(c) > 0) {
			if (git_commit_parent(&pc, c, 0) < 0) {
				rc = gerr_git(err, errsz, ME_EGIT, "cannot read a parent commit");
				goto out;
			}
			old = git_commit_tree_id(pc);
		}
		rc = plan_tree(tp, git_commit_tree_id(c), old, 0, err, errsz);
		git_commit_free(pc);
		git_commit_free(c);
		pc = c = NULL;
		if (rc < 0)
			goto out;
	}
	if (grc != GIT_ITEROVER) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot walk the history");
		goto out;
	}
	*out = tp;
	tp = NULL;
	rc = 0;
out:
	git_commit_free(pc);
	git_commit_free(c);
	git_revwalk_free(walk);
	thinpack_free(tp);
	return rc;
}

/* ---- writing ---- */

/* Writes one planned object, as a delta against its base when that pays. */
static int write_obj(struct thinpack *tp, struct packw *w, const struct tp_obj *o, char *err,
		     size_t errsz)
{
	git_odb_object *obj = NULL, *bobj = NULL;
	uint8_t *delta = NULL;
	size_t dlen = 0;
	uint8_t depth = 0;
	int rc;

	if (git_odb_read(&obj, tp->odb, &o->oid) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot read an object");
	const uint8_t *data = git_odb_object_data(obj);
	size_t len = git_odb_object_size(obj);
	if (!git_oid_is_zero(&o->base) && len >= 64 && len <= THIN_MAX_DELTA_SRC) {
		struct oidset_slot *bs = oidset_find(&tp->seen, &o->base);
		uint8_t bdepth = bs != NULL ? bs->val : 0;
		if (bdepth < THIN_MAX_DEPTH && git_odb_read(&bobj, tp->odb, &o->base) == 0 &&
		    git_odb_object_type(bobj) == o->type &&
		    git_odb_object_size(bobj) <= THIN_MAX_DELTA_SRC) {
			rc = delta_encode(git_odb_object_data(bobj), git_odb_object_size(bobj), data,
					  len, len / 4 * 3, &delta, &dlen);
			if (rc == ME_ENOMEM)
				goto out;
			if (rc == 0)
				depth = (uint8_t)(bdepth + 1);
		}
		git_error_clear();
	}
	if (delta != NULL)
		rc = packw_entry(w, 7, &o->base, delta, dlen);
	else
		rc = packw_entry(w, pack_type_of(o->type), NULL, data, len);
	if (rc == 0) {
		struct oidset_slot *s = oidset_find(&tp->seen, &o->oid);
		if (s != NULL)
			s->val = depth;
	}
out:
	if (rc == ME_EIO)
		gerr_set(err, errsz, "cannot write the pack: %s", strerror(errno));
	else if (rc < 0)
		gerr_set(err, errsz, "cannot build the pack (%s)", me_strerror(rc));
	free(delta);
	git_odb_object_free(bobj);
	git_odb_object_free(obj);
	return rc;
}

int thinpack_write(struct thinpack *tp, int fd, uint64_t *bytes, size_t *objects, char *err,
		   size_t errsz)
{
	struct packw *w = NULL;
	int rc;

	if ((rc = packw_new(&w, fd, (uint32_t)tp->n)) < 0)
		goto out;
	for (size_t i = 0; i < tp->n; i++)
		if ((rc = write_obj(tp, w, &tp->v[i], err, errsz)) < 0)
			goto out;
	if ((rc = packw_finish(w, bytes)) < 0)
		goto out;
	if (objects != NULL)
		*objects = tp->n;
out:
	if (rc == ME_EIO)
		gerr_set(err, errsz, "cannot write the pack: %s", strerror(errno));
	packw_free(w);
	return rc;
}
