/* daemon/packidx.c: a pack and its v2 index read directly. The types it resolves (deltas
 * through their bases, OFS_DELTA and REF_DELTA) are compared with `git cat-file` for packs git
 * wrote; damaged packs (a base that is not there, a delta cycle, a bad entry type) and damaged
 * indexes are refused, never read out of bounds. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <git2.h>

#include "common/err.h"
#include "daemon/packidx.h"
#include "daemon/packwrite.h"
#include "tests/unit/gitfixture.h"

static char base[64];

/* History of a file that changes a little each commit, so that git stores deltas. */
static void make_history(const char *dir, int commits)
{
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && "
	   "seq 1 3000 > f && mkdir d && seq 1 500 > d/g && git add f d && git commit -q -m c0 && "
	   "for i in $(seq 1 %d); do sed -i \"$((i * 7))s/.*/changed $i/\" f; "
	   "echo $i >> d/g; git add -A; git commit -q -m c$i; done && "
	   "git tag -a v1 -m one HEAD~2",
	   dir, dir, commits);
}

static const char *type_name(uint8_t t)
{
	switch (t) {
	case GIT_OBJECT_COMMIT: return "commit";
	case GIT_OBJECT_TREE: return "tree";
	case GIT_OBJECT_BLOB: return "blob";
	case GIT_OBJECT_TAG: return "tag";
	default: return "?";
	}
}

/* Opens pack (path without .pack/.idx), resolves the types and compares them with git's. */
static void expect_types(const char *gitdir, const char *stem, unsigned *ndeltas,
			 unsigned *nref)
{
	char idx[256], pack[256], got[256], want[256];
	struct pidx p;
	uint8_t *types;
	FILE *f;

	snprintf(idx, sizeof(idx), "%s.idx", stem);
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	assert_int_equal(pidx_open(&p, idx, pack), 0);
	assert_true(p.n > 0);
	assert_non_null(types = malloc(p.n));
	assert_int_equal(pidx_types(&p, types), 0);
	*ndeltas = *nref = 0;
	for (uint32_t k = 0; k < p.n; k++) {
		struct pidx_entry e;
		assert_int_equal(pidx_entry(&p, k, &e), 0);
		*ndeltas += e.type == PACK_OFS_DELTA || e.type == PACK_REF_DELTA;
		*nref += e.type == PACK_REF_DELTA;
		if (k > 0)
			assert_true(p.rev[k].off > p.rev[k - 1].off);
	}
	snprintf(got, sizeof(got), "%s/got", base);
	snprintf(want, sizeof(want), "%s/want", base);
	assert_non_null(f = fopen(got, "w"));
	for (uint32_t pos = 0; pos < p.n; pos++) {
		git_oid id;
		git_oid_fromraw(&id, pidx_oid(&p, pos));
		assert_int_equal(pidx_find(&p, &id), pos);
		fprintf(f, "%s %s\n", git_oid_tostr_s(&id), type_name(types[pos]));
	}
	assert_int_equal(fclose(f), 0);
	sh("git show-index < '%s' | cut -d' ' -f2 | GIT_DIR='%s' git cat-file "
	   "--batch-check='%%(objectname) %%(objecttype)' > '%s' && cmp -s '%s' '%s'",
	   idx, gitdir, want, got, want);
	{
		git_oid none;
		memset(&none, 0xab, sizeof(none));
		assert_int_equal(pidx_find(&p, &none), -1);
	}
	free(types);
	pidx_free(&p);
}

/* The pack git gc writes: OFS_DELTA chains. */
static void test_ofs(void **state)
{
	char dir[128], stem[256], gitdir[160];
	unsigned nd, nr;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/ofs", base);
	make_history(dir, 30);
	sh("git -C '%s' gc -q", dir);
	snprintf(gitdir, sizeof(gitdir), "%s/.git", dir);
	capture(stem, sizeof(stem), "ls %s/.git/objects/pack/*.pack | sed 's/.pack$//'", dir);
	expect_types(gitdir, stem, &nd, &nr);
	assert_true(nd > 20);
	assert_int_equal(nr, 0);
}

/* pack-objects without --delta-base-offset: REF_DELTA, bases found by id. */
static void make_ref_pack(const char *name, char *gitdir, size_t gsz, char *stem, size_t ssz)
{
	char dir[128], sha[64];

	snprintf(dir, sizeof(dir), "%s/%s", base, name);
	make_history(dir, 30);
	capture(sha, sizeof(sha), "cd '%s' && git rev-list --objects --all | "
		"git pack-objects -q --window=20 '%s/%s-ref'", dir, base, name);
	snprintf(gitdir, gsz, "%s/.git", dir);
	snprintf(stem, ssz, "%s/%s-ref-%s", base, name, sha);
}

static void test_ref(void **state)
{
	char gitdir[160], stem[256];
	unsigned nd, nr;

	(void)state;
	make_ref_pack("ref", gitdir, sizeof(gitdir), stem, sizeof(stem));
	expect_types(gitdir, stem, &nd, &nr);
	assert_true(nr > 20);
	assert_int_equal(nd, nr);
}

/* File offsets of the base ids of the first two REF_DELTA entries, and their own ids. */
static void ref_entries(const char *stem, long off[2], git_oid id[2])
{
	char idx[256], pack[256];
	struct pidx p;
	int n = 0;

	snprintf(idx, sizeof(idx), "%s.idx", stem);
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	assert_int_equal(pidx_open(&p, idx, pack), 0);
	for (uint32_t k = 0; k < p.n && n < 2; k++) {
		struct pidx_entry e;
		assert_int_equal(pidx_entry(&p, k, &e), 0);
		if (e.type != PACK_REF_DELTA)
			continue;
		off[n] = (long)(e.base_oid - p.pack);
		git_oid_fromraw(&id[n], pidx_oid(&p, p.rev[k].pos));
		n++;
	}
	assert_int_equal(n, 2);
	pidx_free(&p);
}

static void poke(const char *path, long off, const void *b, size_t len)
{
	int fd;

	assert_true((fd = open(path, O_WRONLY)) >= 0);
	assert_int_equal(pwrite(fd, b, len, off), (ssize_t)len);
	assert_int_equal(close(fd), 0);
}

static int types_of(const char *stem)
{
	char idx[256], pack[256];
	struct pidx p;
	uint8_t *types;
	int rc;

	snprintf(idx, sizeof(idx), "%s.idx", stem);
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	if ((rc = pidx_open(&p, idx, pack)) < 0)
		return rc;
	assert_non_null(types = malloc(p.n));
	rc = pidx_types(&p, types);
	free(types);
	pidx_free(&p);
	return rc;
}

static void test_damaged(void **state)
{
	char gitdir[160], stem[256], pack[280], idx[280];
	long off[2];
	git_oid id[2], zero;

	(void)state;
	/* a base that is not in the pack */
	make_ref_pack("missing", gitdir, sizeof(gitdir), stem, sizeof(stem));
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	ref_entries(stem, off, id);
	memset(&zero, 0, sizeof(zero));
	poke(pack, off[0], zero.id, GIT_OID_RAWSZ);
	assert_int_equal(types_of(stem), ME_EINVAL);

	/* two deltas on each other */
	make_ref_pack("cycle", gitdir, sizeof(gitdir), stem, sizeof(stem));
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	ref_entries(stem, off, id);
	poke(pack, off[0], id[1].id, GIT_OID_RAWSZ);
	poke(pack, off[1], id[0].id, GIT_OID_RAWSZ);
	assert_int_equal(types_of(stem), ME_EINVAL);

	/* an entry of type 5 (reserved) */
	make_ref_pack("type5", gitdir, sizeof(gitdir), stem, sizeof(stem));
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	{
		unsigned char c;
		FILE *f;
		assert_non_null(f = fopen(pack, "rb"));
		assert_int_equal(fseek(f, 12, SEEK_SET), 0);
		assert_int_equal(fread(&c, 1, 1, f), 1);
		fclose(f);
		c = (unsigned char)((c & 0x8f) | 0x50);
		poke(pack, 12, &c, 1);
	}
	assert_int_equal(types_of(stem), ME_EINVAL);

	/* indexes: truncated, fan-out going down, an offset past the pack, count != pack's */
	make_ref_pack("idx", gitdir, sizeof(gitdir), stem, sizeof(stem));
	snprintf(idx, sizeof(idx), "%s.idx", stem);
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	sh("cp '%s' '%s.orig' && truncate -s 1000 '%s'", idx, idx, idx);
	assert_int_equal(types_of(stem), ME_EINVAL);
	sh("cp '%s.orig' '%s' && printf '\\377\\377\\377\\377' | dd of='%s' bs=1 seek=8 "
	   "conv=notrunc 2>/dev/null", idx, idx, idx);
	assert_int_equal(types_of(stem), ME_EINVAL);
	sh("cp '%s.orig' '%s' && n=$(git show-index < '%s' | wc -l) && printf '\\177\\377\\377\\377' "
	   "| dd of='%s' bs=1 seek=$((1032 + 24 * n)) conv=notrunc 2>/dev/null", idx, idx, idx,
	   idx);
	assert_int_equal(types_of(stem), ME_EINVAL);
	/* packs: the object count differs from the index's, an unknown version */
	sh("cp '%s.orig' '%s' && cp '%s' '%s.orig' && printf '\\000\\000\\000\\001' | "
	   "dd of='%s' bs=1 seek=8 conv=notrunc 2>/dev/null", idx, idx, pack, pack, pack);
	assert_int_equal(types_of(stem), ME_EINVAL);
	sh("cp '%s.orig' '%s' && printf '\\000\\000\\000\\004' | dd of='%s' bs=1 seek=4 "
	   "conv=notrunc 2>/dev/null", pack, pack, pack);
	assert_int_equal(types_of(stem), ME_EINVAL);
	sh("cp '%s.orig' '%s'", pack, pack);
	assert_int_equal(types_of(stem), 0);
}

/* Entry headers that run past their entry: a size that never ends, an OFS_DELTA offset
 * pointing before the pack's first entry. Bounded by where the next entry starts. */
static void test_bad_headers(void **state)
{
	char dir[128], stem[256], idx[280], pack[280];
	struct pidx p;
	struct pidx_entry e;
	uint64_t next = 0;
	long ofs_at = -1;
	size_t ofs_len = 0;
	unsigned char junk[64];
	(void)state;

	snprintf(dir, sizeof(dir), "%s/headers", base);
	make_history(dir, 30);
	sh("git -C '%s' gc -q", dir);
	capture(stem, sizeof(stem), "ls %s/.git/objects/pack/*.pack | sed 's/.pack$//'", dir);
	snprintf(idx, sizeof(idx), "%s.idx", stem);
	snprintf(pack, sizeof(pack), "%s.pack", stem);
	sh("chmod u+w '%s' && cp '%s' '%s.orig'", pack, pack, pack);
	assert_int_equal(pidx_open(&p, idx, pack), 0);
	next = p.rev[1].off;
	for (uint32_t k = 0; k < p.n && ofs_at < 0; k++) {
		assert_int_equal(pidx_entry(&p, k, &e), 0);
		if (e.type == PACK_OFS_DELTA) {
			ofs_at = (long)e.size_end;
			ofs_len = (size_t)(e.data - e.size_end);
		}
	}
	pidx_free(&p);
	assert_true(next > 12 + 16 && ofs_at > 0 && ofs_len > 0 && ofs_len < sizeof(junk));

	memset(junk, 0xff, sizeof(junk)); /* every byte says "more follows" */
	poke(pack, 12, junk, 16);
	assert_int_equal(types_of(stem), ME_EINVAL);

	sh("cp '%s.orig' '%s'", pack, pack);
	memset(junk, 0xff, ofs_len); /* the largest offset that fits: far before the start */
	junk[ofs_len - 1] = 0x7f;
	poke(pack, ofs_at, junk, ofs_len);
	assert_int_equal(types_of(stem), ME_EINVAL);
}

static int setup(void **state)
{
	(void)state;
	snprintf(base, sizeof(base), "/tmp/me-packidx-XXXXXX");
	assert_non_null(mkdtemp(base));
	git_test_env();
	git_libgit2_init();
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	nftw(base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	git_libgit2_shutdown();
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ofs),
		cmocka_unit_test(test_ref),
		cmocka_unit_test(test_damaged),
		cmocka_unit_test(test_bad_headers),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
