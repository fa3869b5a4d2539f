#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <git2.h>

#include "common/err.h"
#include "common/ids.h"
#include "daemon/gitrepo.h"
#include "daemon/mirror.h"
#include "daemon/packidx.h"
#include "daemon/packreuse.h"
#include "daemon/packwrite.h"
#include "tests/unit/gitfixture.h"

static char base[64];
static char repo_id[ME_DID_REPO_SIZE];

static void path_in(char *out, size_t outsz, const char *name)
{
	int n = snprintf(out, outsz, "%s/%s", base, name);

	assert_true(n > 0 && (size_t)n < outsz);
}

/* Branches (one nested, one symbolic), a merge, lightweight, annotated and nested annotated
 * tags, a tag of a tree, an executable and a symlink; HEAD on dev, not main. */
static void make_src(const char *dir)
{
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && "
	   "echo one > a && git add a && git commit -q -m one && "
	   "git branch feature/x && "
	   "echo two > b && printf '#!/bin/sh\\n' > run && chmod +x run && ln -s a link && "
	   "git add b run link && git commit -q -m two && "
	   "git checkout -q feature/x && mkdir -p sub/deep && echo s > sub/deep/f && "
	   "git add sub && git commit -q -m side && "
	   "git checkout -q main && git merge -q --no-ff -m merge feature/x && "
	   "git tag v0.1 HEAD~1 && git tag -a v1.0 -m 'release 1.0' && "
	   "git tag -a v1.0-nested -m nested v1.0 2>/dev/null && "
	   "git tag tree-tag 'HEAD^{tree}' && "
	   "git symbolic-ref refs/heads/alias refs/heads/main && "
	   "git checkout -q -b dev && echo dev > d && git add d && git commit -q -m dev",
	   dir, dir);
}

/* A signed-state stand-in built from a working repository the way the creator builds it. */
struct tstate {
	struct gitrepo_info gi;
	struct gmsg_ref refs[64];
	struct gmsg_refstate rs;
};

static void state_of(const char *dir, struct tstate *t)
{
	char err[256];
	int rc;

	memset(t, 0, sizeof(*t));
	rc = gitrepo_inspect(dir, &t->gi, err, sizeof(err));
	if (rc != 0)
		fail_msg("gitrepo_inspect(%s): %s", dir, err);
	assert_true(t->gi.nrefs <= 64);
	for (size_t i = 0; i < t->gi.nrefs; i++) {
		git_oid oid;

		t->refs[i].name = gmsg_str(t->gi.refs[i].name);
		assert_int_equal(git_oid_fromstr(&oid, t->gi.refs[i].oid), 0);
		memcpy(t->refs[i].oid, oid.id, ME_OID_LEN);
	}
	t->rs.repo_id = gmsg_str(repo_id);
	t->rs.seq = 1;
	t->rs.head = gmsg_str(t->gi.head);
	t->rs.refs = t->refs;
	t->rs.nrefs = t->gi.nrefs;
}

static void state_clear(struct tstate *t)
{
	gitrepo_info_clear(&t->gi);
}

static git_repository *open_repo(const char *dir)
{
	git_repository *r = NULL;

	assert_int_equal(git_repository_open(&r, dir), 0);
	return r;
}

static void write_bundle(const char *src, const struct gmsg_refstate *rs, const git_oid *haves,
			 size_t nhaves, const char *out, struct bundle_stats *st)
{
	git_repository *r = open_repo(src);
	char err[256];
	int fd, rc;

	assert_true((fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600)) >= 0);
	rc = bundle_write(r, rs->refs, rs->nrefs, haves, nhaves, fd, st, err, sizeof(err));
	if (rc != 0)
		fail_msg("bundle_write: %s: %s", me_errname(rc), err);
	assert_int_equal(close(fd), 0);
	git_repository_free(r);
}

static int apply_file(git_repository *m, const char *path, const struct gmsg_refstate *rs,
		      uint64_t max, struct bundle_stats *st, char *err, size_t errsz)
{
	int fd, rc;

	assert_true((fd = open(path, O_RDONLY)) >= 0);
	rc = bundle_apply(m, fd, rs, max, st, err, errsz);
	close(fd);
	return rc;
}

static void apply_ok(git_repository *m, const char *path, const struct gmsg_refstate *rs,
		     struct bundle_stats *st)
{
	char err[512];
	int rc = apply_file(m, path, rs, 1u << 30, st, err, sizeof(err));

	if (rc != 0)
		fail_msg("bundle_apply(%s): %s: %s", path, me_errname(rc), err);
	assert_string_equal(err, "");
}

static void refs_text(const char *dir, char *out, size_t outsz)
{
	capture(out, outsz, "git -C '%s' for-each-ref --format='%%(objectname) %%(objecttype) "
		"%%(refname)' refs/heads refs/tags", dir);
}

static void expect_same_refs(const char *a, const char *b)
{
	char ra[16384], rb[16384];

	refs_text(a, ra, sizeof(ra));
	refs_text(b, rb, sizeof(rb));
	assert_string_equal(ra, rb);
}

static void fsck(const char *dir)
{
	sh("git -C '%s' fsck --strict --no-progress >/dev/null 2>&1", dir);
}

static void expect_head(const char *dir, const char *want)
{
	char head[256];

	capture(head, sizeof(head), "git -C '%s' symbolic-ref HEAD", dir);
	assert_string_equal(head, want);
}

static long count_of(const char *fmt, const char *dir)
{
	char out[64];

	capture(out, sizeof(out), fmt, dir);
	return strtol(out, NULL, 10);
}

/* Entries of dir whose names start with prefix and end with suffix (no process spawned). */
static long count_entries(const char *dir, const char *prefix, const char *suffix)
{
	struct dirent *de;
	long n = 0;
	DIR *d;

	assert_non_null(d = opendir(dir));
	while ((de = readdir(d)) != NULL) {
		size_t l = strlen(de->d_name), sl = strlen(suffix);
		if (strncmp(de->d_name, prefix, strlen(prefix)) == 0 && l >= sl &&
		    strcmp(de->d_name + l - sl, suffix) == 0)
			n++;
	}
	closedir(d);
	return n;
}

static long npacks(const char *mdir)
{
	char p[PATH_MAX + 16];
	int n = snprintf(p, sizeof(p), "%s/objects/pack", mdir);

	assert_true(n > 0 && (size_t)n < sizeof(p));
	return count_entries(p, "pack-", ".pack");
}

static long nincoming(const char *mdir)
{
	return count_entries(mdir, "me-incoming-", "");
}

static void mirror_dir(const char *root, char *out, size_t outsz)
{
	assert_int_equal(mirror_path(root, repo_id, out, outsz), 0);
}

static git_repository *new_mirror(const char *name, char *mdir, size_t mdirsz)
{
	char root[PATH_MAX], err[256];
	git_repository *m = NULL;
	int rc;

	path_in(root, sizeof(root), name);
	sh("mkdir -p '%s'", root);
	rc = mirror_open(root, repo_id, true, &m, err, sizeof(err));
	if (rc != 0)
		fail_msg("mirror_open: %s", err);
	mirror_dir(root, mdir, mdirsz);
	return m;
}

static size_t file_size(const char *path)
{
	struct stat sb;

	assert_int_equal(stat(path, &sb), 0);
	return (size_t)sb.st_size;
}

static unsigned char *slurp(const char *path, size_t *len)
{
	unsigned char *b;
	FILE *f;

	*len = file_size(path);
	assert_non_null(b = malloc(*len + 1));
	assert_non_null(f = fopen(path, "rb"));
	assert_int_equal(fread(b, 1, *len, f), *len);
	fclose(f);
	return b;
}

static void spit(const char *path, const void *b, size_t len)
{
	FILE *f;

	assert_non_null(f = fopen(path, "wb"));
	assert_int_equal(fwrite(b, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
}

/* ---- tests ---- */

static void test_path(void **state)
{
	char buf[256], want[256], bad[128];
	(void)state;

	assert_int_equal(mirror_path("/r", repo_id, buf, sizeof(buf)), 0);
	snprintf(want, sizeof(want), "/r/repos/%s.git", repo_id + strlen("did:repo:"));
	assert_string_equal(buf, want);
	assert_int_equal(mirror_path("/r", "did:repo:../../etc", buf, sizeof(buf)), ME_EBADID);
	assert_int_equal(mirror_path("/r", "did:repo:z/../x", buf, sizeof(buf)), ME_EBADID);
	assert_int_equal(mirror_path("/r", "", buf, sizeof(buf)), ME_EBADID);
	assert_int_equal(mirror_path("/r", "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
				     buf, sizeof(buf)), ME_EBADID);
	snprintf(bad, sizeof(bad), "%s/..", repo_id);
	assert_int_equal(mirror_path("/r", bad, buf, sizeof(buf)), ME_EBADID);
	snprintf(bad, sizeof(bad), "../%s", repo_id);
	assert_int_equal(mirror_path("/r", bad, buf, sizeof(buf)), ME_EBADID);
	assert_int_equal(mirror_path("/r", repo_id, buf, strlen(want)), ME_ETOOBIG);
	assert_int_equal(mirror_path("/r", repo_id, buf, strlen(want) + 1), 0);
	assert_int_equal(mirror_path(NULL, repo_id, buf, sizeof(buf)), ME_EINVAL);
	assert_int_equal(mirror_path("", repo_id, buf, sizeof(buf)), ME_EINVAL);
}

static void test_open(void **state)
{
	char root[PATH_MAX], dir[PATH_MAX + 16], mdir[PATH_MAX], err[256];
	git_repository *m = NULL;
	struct stat sb;
	(void)state;

	path_in(root, sizeof(root), "node-open");
	sh("mkdir -p '%s'", root);
	assert_int_equal(mirror_open(root, repo_id, false, &m, err, sizeof(err)), ME_ENOTFOUND);
	assert_null(m);
	assert_int_equal(mirror_open(root, "did:repo:../x", true, &m, err, sizeof(err)),
			 ME_EBADID);
	assert_int_equal(mirror_open(root, repo_id, true, &m, err, sizeof(err)), 0);
	assert_true(git_repository_is_bare(m));
	git_repository_free(m);
	snprintf(dir, sizeof(dir), "%s/repos", root);
	assert_int_equal(lstat(dir, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0700);
	mirror_dir(root, mdir, sizeof(mdir));
	assert_int_equal(lstat(mdir, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0700);
	sh("git -C '%s' rev-parse --is-bare-repository | grep -qx true", mdir);
	/* Existing: opened with or without create. */
	assert_int_equal(mirror_open(root, repo_id, false, &m, err, sizeof(err)), 0);
	git_repository_free(m);
	assert_int_equal(mirror_open(root, repo_id, true, &m, err, sizeof(err)), 0);
	git_repository_free(m);
	/* An empty directory (a crash before init) is initialised. */
	sh("rm -rf '%s' && mkdir '%s'", mdir, mdir);
	assert_int_equal(mirror_open(root, repo_id, false, &m, err, sizeof(err)), ME_ENOTREPO);
	assert_int_equal(mirror_open(root, repo_id, true, &m, err, sizeof(err)), 0);
	git_repository_free(m);
	/* Something else is not a repository. */
	sh("rm -rf '%s' && mkdir '%s' && echo x > '%s/f'", mdir, mdir, mdir);
	assert_int_equal(mirror_open(root, repo_id, true, &m, err, sizeof(err)), ME_ENOTREPO);
	assert_null(m);
	sh("rm -rf '%s' && echo x > '%s'", mdir, mdir);
	assert_int_equal(mirror_open(root, repo_id, true, &m, err, sizeof(err)), ME_ENOTREPO);
	sh("rm -f '%s'", mdir);
}

static void test_full(void **state)
{
	char src[PATH_MAX], b1[PATH_MAX], mdir[PATH_MAX], tmp[PATH_MAX], err[256];
	struct tstate t;
	struct bundle_stats st, ast;
	struct mirror_state ms;
	git_repository *m;
	(void)state;

	path_in(src, sizeof(src), "full-src");
	path_in(b1, sizeof(b1), "full.bundle");
	make_src(src);
	state_of(src, &t);
	assert_string_equal(t.gi.head, "refs/heads/dev");
	write_bundle(src, &t.rs, NULL, 0, b1, &st);
	assert_int_equal(st.prereqs, 0);
	assert_int_equal(st.refs, t.rs.nrefs);
	assert_true(st.objects > 10);
	assert_int_equal(st.header_bytes + st.pack_bytes, file_size(b1));
	/* git agrees: the header, and the pack through index-pack. */
	sh("git -C '%s' bundle verify '%s' >/dev/null 2>&1", src, b1);
	path_in(tmp, sizeof(tmp), "full-unbundle.git");
	sh("git init -q --bare '%s' && git -C '%s' bundle unbundle '%s' >/dev/null", tmp, tmp, b1);
	fsck(tmp);

	m = new_mirror("node-full", mdir, sizeof(mdir));
	apply_ok(m, b1, &t.rs, &ast);
	assert_int_equal(ast.refs_updated, t.rs.nrefs);
	assert_int_equal(ast.refs_deleted, 0);
	assert_int_equal(ast.objects, st.objects);
	fsck(mdir);
	expect_same_refs(src, mdir);
	expect_head(mdir, "refs/heads/dev");
	assert_int_equal(npacks(mdir), 1);
	assert_int_equal(nincoming(mdir), 0);
	assert_int_equal(mirror_state_read(m, &ms, err, sizeof(err)), 0);
	assert_true(mirror_state_matches(&ms, &t.rs));
	assert_string_equal(ms.head, "refs/heads/dev");
	mirror_state_free(&ms);

	/* Applying the same bundle again changes nothing and adds no pack. */
	apply_ok(m, b1, &t.rs, &ast);
	assert_int_equal(ast.refs_updated, 0);
	assert_int_equal(npacks(mdir), 1);
	fsck(mdir);
	expect_same_refs(src, mdir);

	git_repository_free(m);
	state_clear(&t);
}

/* A source and a mirror synchronised with it. */
static git_repository *synced(const char *name, char *src, size_t srcsz, char *mdir,
			      size_t mdirsz)
{
	char b[PATH_MAX], n[256];
	struct tstate t;
	git_repository *m;

	snprintf(n, sizeof(n), "%s-src", name);
	path_in(src, srcsz, n);
	make_src(src);
	state_of(src, &t);
	snprintf(n, sizeof(n), "%s-full.bundle", name);
	path_in(b, sizeof(b), n);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	snprintf(n, sizeof(n), "node-%s", name);
	m = new_mirror(n, mdir, mdirsz);
	apply_ok(m, b, &t.rs, NULL);
	state_clear(&t);
	return m;
}

/* Brings the mirror up to the source with an incremental bundle; returns its size. */
static size_t sync_step(git_repository *m, const char *src, const char *mdir, const char *bpath,
			struct bundle_stats *ast)
{
	git_oid haves[64];
	size_t nh;
	char err[256];
	struct tstate t;
	struct bundle_stats st;

	assert_int_equal(mirror_haves(m, haves, 64, &nh, err, sizeof(err)), 0);
	state_of(src, &t);
	write_bundle(src, &t.rs, haves, nh, bpath, &st);
	assert_int_equal(st.header_bytes + st.pack_bytes, file_size(bpath));
	sh("git -C '%s' bundle verify '%s' >/dev/null 2>&1", mdir, bpath);
	apply_ok(m, bpath, &t.rs, ast);
	fsck(mdir);
	expect_same_refs(src, mdir);
	expect_head(mdir, t.gi.head);
	state_clear(&t);
	return file_size(bpath);
}

static void test_incremental(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], tmp[PATH_MAX], hdr[4096];
	struct bundle_stats st;
	git_repository *m;
	size_t sz;
	(void)state;

	m = synced("inc", src, sizeof(src), mdir, sizeof(mdir));
	path_in(b, sizeof(b), "inc.bundle");

	/* One commit on main: a small bundle with a prerequisite; alias follows main. */
	sh("cd '%s' && git checkout -q main && echo three >> a && git commit -q -am three && "
	   "git checkout -q dev", src);
	sz = sync_step(m, src, mdir, b, &st);
	assert_true(sz < 2048);
	assert_int_equal(st.objects, 3); /* commit, tree, blob */
	assert_int_equal(st.prereqs, 1);
	assert_int_equal(st.refs_updated, 2);
	capture(hdr, sizeof(hdr), "head -c %zu '%s' | grep -c '^-' || true",
		(size_t)st.header_bytes, b);
	assert_string_equal(hdr, "1");
	/* git indexes the incremental pack on top of a copy of the mirror. */
	path_in(tmp, sizeof(tmp), "inc-copy.git");
	sh("git clone -q --mirror '%s' '%s' && git -C '%s' bundle unbundle '%s' >/dev/null", mdir,
	   tmp, tmp, b);

	/* A deleted branch disappears; nothing new to send. */
	sh("git -C '%s' branch -q -D feature/x", src);
	sz = sync_step(m, src, mdir, b, &st);
	assert_int_equal(st.objects, 0);
	assert_int_equal(st.refs_deleted, 1);
	assert_int_equal(st.refs_updated, 0);
	sh("! git -C '%s' rev-parse -q --verify refs/heads/feature/x", mdir);

	/* A ref replaced by one below it (directory/file conflict), a new tag, HEAD moves. */
	sh("cd '%s' && git branch topic main && git tag -a v2 -m v2 main", src);
	sync_step(m, src, mdir, b, &st);
	sh("cd '%s' && git branch -D -q topic && git branch topic/sub main && git checkout -q main",
	   src);
	sync_step(m, src, mdir, b, &st);
	assert_int_equal(st.refs_deleted, 1);
	assert_int_equal(st.refs_updated, 1);
	expect_head(mdir, "refs/heads/main");

	/* A merge of a new side branch, and a rewound branch (not a fast-forward). */
	sh("cd '%s' && git checkout -q -b side main && echo s >> s && git add s && "
	   "git commit -q -m s1 && git checkout -q main && echo m >> a && git commit -q -am m1 && "
	   "git merge -q --no-ff -m merge2 side && git checkout -q dev && git reset -q --hard HEAD~1",
	   src);
	sync_step(m, src, mdir, b, &st);
	assert_true(st.objects > 0);

	/* Nothing changed: an empty pack, no ref update. */
	sync_step(m, src, mdir, b, &st);
	assert_int_equal(st.objects, 0);
	assert_int_equal(st.refs_updated + st.refs_deleted, 0);
	assert_int_equal(nincoming(mdir), 0);
	git_repository_free(m);
}

/* Steps of sync_step() whose bundles git must index too: a mirror copy taken before the step
 * unbundles it (index-pack --fix-thin) and passes fsck. */
static size_t thin_step(git_repository *m, const char *src, const char *mdir, const char *b,
			const char *name, struct bundle_stats *st)
{
	char copy[PATH_MAX];
	size_t sz;

	path_in(copy, sizeof(copy), name);
	sh("rm -rf '%s' && git clone -q --mirror '%s' '%s'", copy, mdir, copy);
	sz = sync_step(m, src, mdir, b, st);
	sh("git -C '%s' bundle unbundle '%s' >/dev/null && git -C '%s' fsck --strict --no-progress "
	   ">/dev/null 2>&1", copy, b, copy);
	return sz;
}

static void test_thin(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX];
	struct bundle_stats st;
	git_repository *m;
	size_t sz;
	(void)state;

	m = synced("thin", src, sizeof(src), mdir, sizeof(mdir));
	path_in(b, sizeof(b), "thin.bundle");
	/* A 300 kB text file deep down and a directory of 400 files: new, so sent whole. */
	sh("cd '%s' && git checkout -q main && mkdir -p deep/er/est many && "
	   "seq 1 20000 | sed 's/$/ some text of a line/' > deep/er/est/big.txt && "
	   "for i in $(seq 1 400); do echo $i > many/file-$i; done && git add deep many && "
	   "git commit -q -m big", src);
	sz = thin_step(m, src, mdir, b, "thin-copy1.git", &st);
	assert_true(sz > 40000);

	/* One line changed and one added in the big file, one file more in the directory: the
	 * blob and the trees on both paths go as deltas against the previous versions. */
	sh("cd '%s' && sed -i -e '20000s/.*/changed line/' -e '30000a added line' "
	   "deep/er/est/big.txt && echo new > many/new-file && git add -A && "
	   "git commit -q -m edit", src);
	sz = thin_step(m, src, mdir, b, "thin-copy2.git", &st);
	assert_true(sz < 2500);
	assert_int_equal(st.objects, 8); /* commit, root, deep, er, est, big.txt, many, new-file */

	/* A file changed and changed back within one increment (X -> Y -> X -> Y): no object is
	 * its own base, however the versions repeat. */
	sh("cd '%s' && cp deep/er/est/big.txt /tmp/me-thin-x && echo y >> deep/er/est/big.txt && "
	   "cp deep/er/est/big.txt /tmp/me-thin-y && git commit -q -am y1 && "
	   "cp /tmp/me-thin-x deep/er/est/big.txt && git commit -q -am x2 && "
	   "cp /tmp/me-thin-y deep/er/est/big.txt && git commit -q -am y3 && "
	   "rm -f /tmp/me-thin-x /tmp/me-thin-y", src);
	thin_step(m, src, mdir, b, "thin-copy3.git", &st);

	/* 55 commits editing the same file: the chain is cut at THIN_MAX_DEPTH (50), where one
	 * version goes whole (about 80 kB here), the others as deltas. */
	sh("cd '%s' && for i in $(seq 1 55); do sed -i \"${i}00s/.*/edit $i/\" "
	   "deep/er/est/big.txt && git commit -q -am e$i; done", src);
	sz = thin_step(m, src, mdir, b, "thin-copy4.git", &st);
	assert_true(sz > 40000 && sz < 160000);

	/* A merge of two branches that both changed the file. */
	sh("cd '%s' && git checkout -q -b t2 main~5 && sed -i '1s/.*/side/' deep/er/est/big.txt && "
	   "git commit -q -am side && git checkout -q main && git merge -q --no-edit t2 >/dev/null", src);
	thin_step(m, src, mdir, b, "thin-copy5.git", &st);
	git_repository_free(m);
}

static void test_write_haves(void **state)
{
	char src[PATH_MAX], b[PATH_MAX], err[256];
	struct tstate t;
	struct bundle_stats full, st;
	git_repository *r;
	git_oid haves[4], blob;
	int fd;
	(void)state;

	path_in(src, sizeof(src), "haves-src");
	path_in(b, sizeof(b), "haves.bundle");
	make_src(src);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, &full);
	/* Unknown haves, a blob and a tree are ignored: the bundle stays complete. */
	memset(&haves[0], 0x5a, sizeof(haves[0]));
	capture(err, sizeof(err), "git -C '%s' rev-parse HEAD:a", src);
	assert_int_equal(git_oid_fromstr(&blob, err), 0);
	haves[1] = blob;
	capture(err, sizeof(err), "git -C '%s' rev-parse 'HEAD^{tree}'", src);
	assert_int_equal(git_oid_fromstr(&haves[2], err), 0);
	write_bundle(src, &t.rs, haves, 3, b, &st);
	assert_int_equal(st.prereqs, 0);
	assert_int_equal(st.objects, full.objects);
	/* Every tip as a have: nothing to send, nothing required beyond the tips. */
	{
		git_oid all[64];
		for (size_t i = 0; i < t.rs.nrefs; i++)
			git_oid_fromraw(&all[i], t.rs.refs[i].oid);
		write_bundle(src, &t.rs, all, t.rs.nrefs, b, &st);
		assert_int_equal(st.objects, 0);
		assert_int_equal(st.prereqs, 0);
		sh("git -C '%s' bundle verify '%s' >/dev/null 2>&1", src, b);
	}

	/* Bad arguments. */
	r = open_repo(src);
	assert_true((fd = open(b, O_WRONLY | O_TRUNC)) >= 0);
	{
		struct gmsg_ref two[2] = { t.rs.refs[1], t.rs.refs[0] };
		assert_int_equal(bundle_write(r, two, 2, NULL, 0, fd, NULL, err, sizeof(err)),
				 ME_EINVAL);
		two[0] = t.rs.refs[0];
		two[0].name = gmsg_str("refs/heads/../x");
		assert_int_equal(bundle_write(r, two, 1, NULL, 0, fd, NULL, err, sizeof(err)),
				 ME_EINVAL);
		two[0] = t.rs.refs[0];
		memset(two[0].oid, 0x77, sizeof(two[0].oid));
		assert_int_equal(bundle_write(r, two, 1, NULL, 0, fd, NULL, err, sizeof(err)),
				 ME_ENOTFOUND);
	}
	assert_int_equal(bundle_write(r, t.rs.refs, t.rs.nrefs, NULL, 0, -1, NULL, err,
				      sizeof(err)), ME_EINVAL);
	close(fd);
	git_repository_free(r);
	state_clear(&t);
}

static int oid_sort_cmp(const void *a, const void *b)
{
	return git_oid_cmp(a, b);
}

/* The prerequisites in a bundle's header, sorted hex, one per line. */
static void prereqs_of(const char *path, char *out, size_t outsz)
{
	struct bundle_header h;
	char err[256];
	int fd = open(path, O_RDONLY);

	assert_true(fd >= 0);
	assert_int_equal(bundle_read_header(fd, &h, err, sizeof(err)), 0);
	close(fd);
	out[0] = '\0';
	qsort(h.prereqs, h.nprereqs, sizeof(*h.prereqs), oid_sort_cmp);
	for (size_t i = 0; i < h.nprereqs; i++) {
		size_t l = strlen(out);
		git_oid_tostr(out + l, outsz - l, &h.prereqs[i]);
		l = strlen(out);
		snprintf(out + l, outsz - l, "\n");
	}
	bundle_header_free(&h);
}

/* Commits dated before their parents (a skewed clock; libgit2's revwalk, ordered by date,
 * then reads the whole history of what it hides): an increment on top of the haves is found
 * by walking back to them, and one that reaches below them (a merge of an old commit) by
 * libgit2's revwalk; both as `git bundle create` makes them, and they apply. */
static void test_write_skew(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], gb[PATH_MAX], ours[1024], theirs[1024];
	char old[64];
	struct tstate t;
	struct bundle_stats st;
	git_repository *m;
	git_oid have;
	(void)state;

	path_in(src, sizeof(src), "skew-src");
	path_in(b, sizeof(b), "skew.bundle");
	path_in(gb, sizeof(gb), "skew-git.bundle");
	/* 2100 commits dated from 2039 on, each changing one of 50 files */
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && for i in $(seq 1 2100); do "
	   "echo 'commit refs/heads/main'; echo \"mark :$i\"; "
	   "echo \"committer A <a@b> $((2200000000 + i * 60)) +0000\"; echo 'data <<EOF'; "
	   "echo \"c$i\"; echo EOF; if [ $i -gt 1 ]; then echo \"from :$((i - 1))\"; fi; "
	   "echo \"M 100644 inline f$((i %% 50))\"; echo 'data <<EOF'; echo \"v$i\"; echo EOF; "
	   "echo; done | git fast-import --quiet && git reset -q --hard main", src, src);
	state_of(src, &t);
	m = new_mirror("node-skew", mdir, sizeof(mdir));
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	apply_ok(m, b, &t.rs, NULL);

	/* a commit of 2001 on top */
	capture(old, sizeof(old), "git -C '%s' rev-parse main", src);
	assert_int_equal(git_oid_fromstr(&have, old), 0);
	sh("cd '%s' && echo skew > f7 && git add f7 && GIT_COMMITTER_DATE='2001-01-01 00:00 +0000' "
	   "GIT_AUTHOR_DATE='2001-01-01 00:00 +0000' git commit -q -m skew", src);
	state_clear(&t);
	state_of(src, &t);
	t.rs.seq = 2;
	write_bundle(src, &t.rs, &have, 1, b, &st);
	assert_int_equal(st.prereqs, 1);
	assert_int_equal(st.objects, 3); /* the commit, its tree, the blob */
	sh("git -C '%s' bundle create -q '%s' main ^%s", src, gb, old);
	prereqs_of(b, ours, sizeof(ours));
	prereqs_of(gb, theirs, sizeof(theirs));
	assert_string_equal(ours, theirs);
	apply_ok(m, b, &t.rs, NULL);
	expect_same_refs(src, mdir);

	/* a merge of a commit 2050 below: walking back reaches the root, libgit2 decides */
	capture(old, sizeof(old), "git -C '%s' rev-parse main", src);
	assert_int_equal(git_oid_fromstr(&have, old), 0);
	sh("cd '%s' && c=$(GIT_COMMITTER_DATE='2002-01-01 00:00 +0000' "
	   "GIT_AUTHOR_DATE='2002-01-01 00:00 +0000' git commit-tree 'main^{tree}' -p main "
	   "-p main~2050 -m merge) && git update-ref refs/heads/main $c", src);
	state_clear(&t);
	state_of(src, &t);
	t.rs.seq = 3;
	write_bundle(src, &t.rs, &have, 1, b, &st);
	assert_int_equal(st.objects, 1); /* the merge: everything else is the mirror's */
	sh("git -C '%s' bundle create -q '%s' main ^%s", src, gb, old);
	prereqs_of(b, ours, sizeof(ours));
	prereqs_of(gb, theirs, sizeof(theirs));
	assert_int_equal(st.prereqs, 2); /* both parents: the mirror has them */
	assert_string_equal(ours, theirs);
	apply_ok(m, b, &t.rs, NULL);
	expect_same_refs(src, mdir);

	fsck(mdir);
	git_repository_free(m);
	state_clear(&t);

	/* (dates in order from here) A tag 300 below, then a new branch from 5 below: walking
	 * back from it stops at the tag, and would resend 295 commits the haves reach; walking
	 * down from the haves finds them, and libgit2's revwalk decides. */
	path_in(src, sizeof(src), "skew2-src");
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && for i in $(seq 1 400); do "
	   "echo 'commit refs/heads/main'; echo \"mark :$i\"; "
	   "echo \"committer A <a@b> $((1600000000 + i * 60)) +0000\"; echo 'data <<EOF'; "
	   "echo \"c$i\"; echo EOF; if [ $i -gt 1 ]; then echo \"from :$((i - 1))\"; fi; "
	   "echo \"M 100644 inline f$((i %% 50))\"; echo 'data <<EOF'; echo \"v$i\"; echo EOF; "
	   "echo; done | git fast-import --quiet && git reset -q --hard main && "
	   "git tag v1 main~300", src, src);
	{
		git_oid hv[2];
		char tag[64];
		capture(old, sizeof(old), "git -C '%s' rev-parse main", src);
		capture(tag, sizeof(tag), "git -C '%s' rev-parse v1", src);
		assert_int_equal(git_oid_fromstr(&hv[0], old), 0);
		assert_int_equal(git_oid_fromstr(&hv[1], tag), 0);
		sh("cd '%s' && git checkout -q -b topic main~5 && echo topic > f9 && git add f9 && "
		   "git commit -q -m topic && git checkout -q main", src);
		state_of(src, &t);
		write_bundle(src, &t.rs, hv, 2, b, &st);
		assert_int_equal(st.objects, 3); /* the commit, its tree, the blob */
		sh("git -C '%s' bundle create -q '%s' main topic v1 ^%s ^%s", src, gb, old, tag);
	}
	prereqs_of(b, ours, sizeof(ours));
	prereqs_of(gb, theirs, sizeof(theirs));
	assert_string_equal(ours, theirs);
	state_clear(&t);
}

/* Applies a bundle that must fail with want (and a message starting with msg when not NULL);
 * the mirror's refs, HEAD and packs must be exactly as before (callers run fsck after a
 * batch). */
static void expect_reject(git_repository *m, const char *mdir, const char *path,
			  const struct gmsg_refstate *rs, uint64_t max, int want, const char *msg)
{
	char before[16384], after[16384], err[512];
	long packs = npacks(mdir);
	int rc;

	capture(before, sizeof(before), "git -C '%s' for-each-ref && git -C '%s' symbolic-ref HEAD",
		mdir, mdir);
	rc = apply_file(m, path, rs, max, NULL, err, sizeof(err));
	if (rc != want)
		fail_msg("bundle_apply(%s): %s (want %s): %s", path, me_errname(rc),
			 me_errname(want), err);
	if (msg != NULL && strncmp(err, msg, strlen(msg)) != 0)
		fail_msg("message \"%s\", want \"%s...\"", err, msg);
	assert_true(err[0] != '\0');
	capture(after, sizeof(after), "git -C '%s' for-each-ref && git -C '%s' symbolic-ref HEAD",
		mdir, mdir);
	assert_string_equal(before, after);
	assert_int_equal(npacks(mdir), packs);
	assert_int_equal(nincoming(mdir), 0);
}

static void test_tampered(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], mdir2[PATH_MAX], b[PATH_MAX], bad[PATH_MAX];
	char err[256];
	struct tstate t;
	struct bundle_stats st;
	struct bundle_header h;
	git_repository *m, *m2;
	git_oid haves[64];
	size_t nh, len;
	unsigned char *data;
	(void)state;

	m = synced("tamper", src, sizeof(src), mdir, sizeof(mdir));
	sh("cd '%s' && echo new > n && mkdir -p x/y && echo deep > x/y/z && git add n x && "
	   "git commit -q -m new && git tag -a v9 -m v9", src);
	state_of(src, &t);
	assert_int_equal(mirror_haves(m, haves, 64, &nh, err, sizeof(err)), 0);
	path_in(b, sizeof(b), "tamper.bundle");
	path_in(bad, sizeof(bad), "tamper-bad.bundle");
	write_bundle(src, &t.rs, haves, nh, b, &st);
	data = slurp(b, &len);
	assert_int_equal(bundle_header_parse(data, len, &h, err, sizeof(err)), 0);
	assert_int_equal(h.len, st.header_bytes);
	bundle_header_free(&h);

	/* One flipped bit anywhere in the pack: header, object headers, data, trailer. */
	for (size_t k = 0; k < 16; k++) {
		size_t off = st.header_bytes + (k * (st.pack_bytes - 1)) / 15;
		data[off] ^= 0x04;
		spit(bad, data, len);
		data[off] ^= 0x04;
		expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, NULL);
	}
	fsck(mdir);
	/* Truncated, and extra bytes after the pack. */
	spit(bad, data, len - 10);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bad pack");
	spit(bad, data, st.header_bytes + 6);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bad pack");
	spit(bad, data, st.header_bytes);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bad pack");
	{
		unsigned char *more = malloc(len + 5);
		assert_non_null(more);
		memcpy(more, data, len);
		memcpy(more + len, "extra", 5);
		spit(bad, more, len + 5);
		free(more);
		expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bad pack");
	}
	/* Size limit: one byte short fails, the exact size passes (below). */
	expect_reject(m, mdir, b, &t.rs, len - 1, ME_ETOOBIG, NULL);
	expect_reject(m, mdir, b, &t.rs, st.header_bytes - 1, ME_ETOOBIG, NULL);

	/* Refs that are not the signed state: an oid changed, a ref dropped, a ref added. */
	{
		struct tstate u = t;
		struct gmsg_ref extra[65];

		u.rs.refs = u.refs;
		memcpy(u.refs[0].oid, u.refs[1].oid, ME_OID_LEN);
		if (memcmp(t.refs[0].oid, t.refs[1].oid, ME_OID_LEN) == 0)
			memcpy(u.refs[0].oid, t.refs[2].oid, ME_OID_LEN);
		expect_reject(m, mdir, b, &u.rs, 1u << 30, ME_EPERM,
			      "refs differ from the signed ref state");
		memcpy(u.refs, t.refs, sizeof(t.refs));
		u.rs.nrefs--;
		expect_reject(m, mdir, b, &u.rs, 1u << 30, ME_EPERM,
			      "refs differ from the signed ref state");
		memcpy(extra, t.refs, t.rs.nrefs * sizeof(extra[0]));
		extra[t.rs.nrefs] = t.refs[0];
		extra[t.rs.nrefs].name = gmsg_str("refs/tags/zzz");
		u.rs.refs = extra;
		u.rs.nrefs = t.rs.nrefs + 1;
		expect_reject(m, mdir, b, &u.rs, 1u << 30, ME_EPERM,
			      "refs differ from the signed ref state");
	}

	fsck(mdir);
	/* An incremental bundle into an empty mirror: its prerequisite is missing. */
	m2 = new_mirror("node-tamper-empty", mdir2, sizeof(mdir2));
	expect_reject(m2, mdir2, b, &t.rs, 1u << 30, ME_ENOTFOUND, "missing prerequisite ");

	/* After all that, the honest bundle still applies, exactly at the limit. */
	{
		struct bundle_stats ast;
		assert_int_equal(apply_file(m, b, &t.rs, len, &ast, err, sizeof(err)), 0);
		fsck(mdir);
		expect_same_refs(src, mdir);
	}
	/* A flipped byte in a full bundle into an empty mirror. */
	write_bundle(src, &t.rs, NULL, 0, b, &st);
	free(data);
	data = slurp(b, &len);
	data[st.header_bytes + st.pack_bytes / 2] ^= 0x01;
	spit(bad, data, len);
	expect_reject(m2, mdir2, bad, &t.rs, 1u << 30, ME_EPROTO, NULL);
	fsck(mdir2);

	free(data);
	git_repository_free(m2);
	git_repository_free(m);
	state_clear(&t);
}

/* Header built by hand around an honest pack. */
static void test_hostile_header(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], bad[PATH_MAX], hex[41];
	struct tstate t;
	struct bundle_stats st;
	git_repository *m;
	size_t len;
	unsigned char *data;
	char *buf;
	(void)state;

	m = synced("hdr", src, sizeof(src), mdir, sizeof(mdir));
	sh("cd '%s' && echo q >> a && git commit -q -am q", src);
	state_of(src, &t);
	path_in(b, sizeof(b), "hdr.bundle");
	path_in(bad, sizeof(bad), "hdr-bad.bundle");
	write_bundle(src, &t.rs, NULL, 0, b, &st);
	data = slurp(b, &len);
	assert_non_null(buf = malloc(len + 4096));

	/* The dev ref renamed to a path-like name with "..": refused before anything else. */
	{
		git_oid o;
		int n;

		git_oid_fromraw(&o, t.refs[1].oid);
		git_oid_tostr(hex, sizeof(hex), &o);
		assert_string_equal(t.gi.refs[1].name, "refs/heads/dev");
		n = snprintf(buf, 4096, "# v2 git bundle\n");
		for (size_t i = 0; i < t.rs.nrefs; i++) {
			git_oid_fromraw(&o, t.refs[i].oid);
			n += snprintf(buf + n, 4096 - n, "%s %s\n", git_oid_tostr(hex, 41, &o),
				      i == 1 ? "refs/heads/../../../../x" : t.gi.refs[i].name);
		}
		buf[n++] = '\n';
		memcpy(buf + n, data + st.header_bytes, st.pack_bytes);
		spit(bad, buf, n + st.pack_bytes);
		expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bundle header line 3: "
			      "invalid ref name");
	}
	/* Garbage, a v3 bundle, capabilities. */
	spit(bad, "garbage\n\n", 9);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "not a v2 git bundle");
	spit(bad, "", 0);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "truncated bundle header");
	spit(bad, "# v3 git bundle\n@object-format=sha1\n\n", 37);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EVERSION, NULL);
	memcpy(buf, "# v2 git bundle\n@filter=blob:none\n", 34);
	memcpy(buf + 34, data + 16, len - 16);
	spit(bad, buf, len + 18);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EVERSION, NULL);
	/* A bad pack signature after an honest header. */
	memcpy(buf, data, len);
	memcpy(buf + st.header_bytes, "KCAP", 4);
	spit(bad, buf, len);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_EPROTO, "bad pack: no pack signature");
	/* A pack announcing more objects than max_bytes allows (libgit2 would allocate them). */
	memcpy(buf, data, len);
	memset(buf + st.header_bytes + 8, 0xff, 4);
	spit(bad, buf, len);
	expect_reject(m, mdir, bad, &t.rs, 1u << 30, ME_ETOOBIG, "pack of 4294967295 objects");
	fsck(mdir);

	free(buf);
	free(data);
	git_repository_free(m);
	state_clear(&t);
}

static int parse_str(const char *s, struct bundle_header *h)
{
	char err[256];

	return bundle_header_parse(s, strlen(s), h, err, sizeof(err));
}

#define OID1 "0123456789abcdef0123456789abcdef01234567"
#define OID2 "89abcdef0123456789abcdef0123456789abcdef"

static void test_header_parse(void **state)
{
	struct bundle_header h;
	char *big;
	size_t n;
	(void)state;

	assert_int_equal(parse_str("# v2 git bundle\n-" OID1 " a comment\n-" OID2 "\n" OID2
				   " refs/tags/v1\n" OID1 " refs/heads/main\n\nPACK", &h), 0);
	assert_int_equal(h.nprereqs, 2);
	assert_int_equal(h.nrefs, 2);
	assert_string_equal(h.refs[0].name, "refs/heads/main");
	assert_string_equal(h.refs[1].name, "refs/tags/v1");
	assert_string_equal(git_oid_tostr_s(&h.refs[0].oid), OID1);
	assert_string_equal(git_oid_tostr_s(&h.prereqs[1]), OID2);
	assert_int_equal(h.len, strlen("# v2 git bundle\n-" OID1 " a comment\n-" OID2 "\n" OID2
				       " refs/tags/v1\n" OID1 " refs/heads/main\n\n"));
	bundle_header_free(&h);
	assert_int_equal(parse_str("# v2 git bundle\n\n", &h), 0);
	assert_int_equal(h.nrefs, 0);
	bundle_header_free(&h);

	static const struct {
		const char *s;
		int rc;
	} bad[] = {
		{ "", ME_EPROTO },
		{ "\n", ME_EPROTO },
		{ "# v2 git bundle\n", ME_EPROTO }, /* truncated */
		{ "# v2 git bundle\n" OID1 " refs/heads/main\n", ME_EPROTO },
		{ "# v2 git bundle \n\n", ME_EPROTO },
		{ "# v2 git bundle\r\n\n", ME_EPROTO },
		{ "# v3 git bundle\n\n", ME_EVERSION },
		{ "# v2 git bundle\n@object-format=sha1\n\n", ME_EVERSION },
		{ "# v2 git bundle\n" OID1 " HEAD\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/heads/../x\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/remotes/origin/x\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/heads/x.lock\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/heads/a b\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/heads/a\r\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 "  refs/heads/a\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 "refs/heads/a\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 "\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " \n\n", ME_EPROTO },
		{ "# v2 git bundle\n0123456789ABCDEF0123456789abcdef01234567 refs/heads/a\n\n",
		  ME_EPROTO },
		{ "# v2 git bundle\n0123456789abcdef0123456789abcdef0123456 refs/heads/a\n\n",
		  ME_EPROTO },
		{ "# v2 git bundle\n0123456789abcdef0123456789abcdef0123456g refs/heads/a\n\n",
		  ME_EPROTO },
		{ "# v2 git bundle\n-0123456789abcdef0123456789abcdef0123456\n\n", ME_EPROTO },
		{ "# v2 git bundle\n-" OID1 "x\n\n", ME_EPROTO },
		{ "# v2 git bundle\n-\n\n", ME_EPROTO },
		{ "# v2 git bundle\n" OID1 " refs/heads/a\n" OID2 " refs/heads/a\n\n", ME_EPROTO },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = parse_str(bad[i].s, &h);
		if (rc != bad[i].rc)
			fail_msg("case %zu: %s (want %s)", i, me_errname(rc), me_errname(bad[i].rc));
		assert_null(h.buf);
		assert_null(h.refs);
		assert_null(h.prereqs);
	}
	/* A NUL byte inside a line. */
	{
		static const char s[] = "# v2 git bundle\n-" OID1 " a\0b\n\n";
		char err[128];
		assert_int_equal(bundle_header_parse(s, sizeof(s) - 1, &h, err, sizeof(err)),
				 ME_EPROTO);
	}

	assert_non_null(big = malloc(3u << 20));
	/* A line of 1025 bytes, of exactly 1024. */
	n = (size_t)sprintf(big, "# v2 git bundle\n-" OID1 " ");
	memset(big + n, 'c', BUNDLE_MAX_LINE - 42);
	memcpy(big + n + BUNDLE_MAX_LINE - 42, "\n\n", 3);
	assert_int_equal(parse_str(big, &h), 0);
	bundle_header_free(&h);
	memset(big + n, 'c', BUNDLE_MAX_LINE - 41);
	memcpy(big + n + BUNDLE_MAX_LINE - 41, "\n\n", 3);
	assert_int_equal(parse_str(big, &h), ME_ETOOBIG);
	/* An endless first line fails after 1 KiB, whatever follows. */
	memset(big, 'x', 3u << 20);
	assert_int_equal(bundle_header_parse(big, 3u << 20, &h, NULL, 0), ME_ETOOBIG);
	/* A header just under 1 MiB passes, one over it does not. */
	n = (size_t)sprintf(big, "# v2 git bundle\n");
	for (size_t i = 1; i < 24000; i++)
		n += (size_t)sprintf(big + n, "-" OID1 "\n");
	memcpy(big + n, "\n", 2);
	assert_int_equal(parse_str(big, &h), 0);
	assert_int_equal(h.nprereqs, 23999);
	bundle_header_free(&h);
	n = (size_t)sprintf(big, "# v2 git bundle\n");
	for (size_t i = 1; i < 26000; i++)
		n += (size_t)sprintf(big + n, "-" OID1 "\n");
	memcpy(big + n, "\n", 2);
	assert_int_equal(parse_str(big, &h), ME_ETOOBIG);
	/* 100000 lines reach the parser (which refuses "-"), 100001 do not. */
	for (size_t extra = 0; extra < 2; extra++) {
		char err[128];

		n = (size_t)sprintf(big, "# v2 git bundle\n");
		for (size_t i = 1; i < BUNDLE_MAX_LINES + extra; i++) {
			big[n++] = '-';
			big[n++] = '\n';
		}
		big[n++] = '\n';
		big[n] = '\0';
		assert_int_equal(bundle_header_parse(big, n, &h, err, sizeof(err)),
				 extra ? ME_ETOOBIG : ME_EPROTO);
		assert_non_null(strstr(err, extra ? "lines" : "line 2"));
	}
	/* More refs than a ref state may hold. */
	n = (size_t)sprintf(big, "# v2 git bundle\n");
	for (size_t i = 0; i <= GMSG_MAX_REFS; i++)
		n += (size_t)sprintf(big + n, OID1 " refs/tags/t%zu\n", i);
	memcpy(big + n, "\n", 2);
	assert_int_equal(parse_str(big, &h), ME_ETOOBIG);
	free(big);
}

static void test_read_header(void **state)
{
	char src[PATH_MAX], b[PATH_MAX], err[256], four[4];
	struct tstate t;
	struct bundle_stats st;
	struct bundle_header h;
	int fd, p[2];
	size_t len;
	unsigned char *data;
	(void)state;

	path_in(src, sizeof(src), "rh-src");
	path_in(b, sizeof(b), "rh.bundle");
	make_src(src);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, &st);
	/* A file: read in blocks, then rewound to the pack. */
	assert_true((fd = open(b, O_RDONLY)) >= 0);
	assert_int_equal(bundle_read_header(fd, &h, err, sizeof(err)), 0);
	assert_int_equal(h.nrefs, t.rs.nrefs);
	assert_int_equal(h.len, st.header_bytes);
	assert_int_equal(lseek(fd, 0, SEEK_CUR), (off_t)st.header_bytes);
	assert_int_equal(read(fd, four, 4), 4);
	assert_memory_equal(four, "PACK", 4);
	bundle_header_free(&h);
	close(fd);
	/* A pipe: one byte at a time, leaving the pack unread. */
	data = slurp(b, &len);
	assert_int_equal(pipe(p), 0);
	assert_int_equal(write(p[1], data, st.header_bytes + 4), (ssize_t)st.header_bytes + 4);
	close(p[1]);
	assert_int_equal(bundle_read_header(p[0], &h, err, sizeof(err)), 0);
	assert_int_equal(h.nrefs, t.rs.nrefs);
	assert_int_equal(read(p[0], four, 4), 4);
	assert_memory_equal(four, "PACK", 4);
	bundle_header_free(&h);
	close(p[0]);
	/* End of file inside the header. */
	assert_int_equal(pipe(p), 0);
	assert_int_equal(write(p[1], data, 20), 20);
	close(p[1]);
	assert_int_equal(bundle_read_header(p[0], &h, err, sizeof(err)), ME_EPROTO);
	assert_string_equal(err, "truncated bundle header");
	close(p[0]);
	free(data);
	state_clear(&t);
}

/* Feeding the receiver in small pieces, as the network does. */
static void test_rx_stream(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], err[256];
	struct tstate t;
	struct bundle_stats st;
	struct bundle_rx *rx;
	struct bundle_rx_opts o = { .max_bytes = 1u << 30 };
	git_repository *m;
	unsigned char *data;
	size_t len;
	(void)state;

	path_in(src, sizeof(src), "rx-src");
	path_in(b, sizeof(b), "rx.bundle");
	make_src(src);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	data = slurp(b, &len);
	m = new_mirror("node-rx", mdir, sizeof(mdir));
	assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), 0);
	for (size_t off = 0; off < len; off += 7)
		assert_int_equal(bundle_rx_write(rx, data + off, len - off < 7 ? len - off : 7), 0);
	assert_int_equal(bundle_rx_finish(rx, &st), 0);
	assert_string_equal(bundle_rx_errmsg(rx), "");
	assert_int_equal(st.refs_updated, t.rs.nrefs);
	assert_int_equal(bundle_rx_finish(rx, &st), ME_EINVAL);
	bundle_rx_free(rx);
	fsck(mdir);
	expect_same_refs(src, mdir);

	/* Abandoned mid-pack: nothing left behind; errors are sticky. */
	sh("cd '%s' && echo more >> a && git commit -q -am more", src);
	state_clear(&t);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	free(data);
	data = slurp(b, &len);
	assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), 0);
	assert_int_equal(bundle_rx_write(rx, data, len / 2), 0);
	assert_int_equal(nincoming(mdir), 1);
	bundle_rx_free(rx);
	assert_int_equal(nincoming(mdir), 0);
	assert_int_equal(npacks(mdir), 1);
	o.max_bytes = 100;
	assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), 0);
	assert_int_equal(bundle_rx_write(rx, data, 50), 0);
	assert_int_equal(bundle_rx_write(rx, data + 50, 51), ME_ETOOBIG);
	assert_int_equal(bundle_rx_write(rx, data + 50, 1), ME_ETOOBIG);
	assert_int_equal(bundle_rx_finish(rx, NULL), ME_ETOOBIG);
	assert_non_null(strstr(bundle_rx_errmsg(rx), "larger than 100 bytes"));
	bundle_rx_free(rx);

	/* A malformed expected state is refused up front. */
	{
		struct tstate u = t;
		u.rs.refs = u.refs;
		u.refs[0] = t.refs[1];
		u.refs[1] = t.refs[0];
		o.max_bytes = 1u << 30;
		assert_int_equal(bundle_rx_new(&rx, m, &u.rs, &o, err, sizeof(err)), ME_EINVAL);
		assert_null(rx);
		o.max_bytes = 0;
		assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), ME_EINVAL);
	}
	free(data);
	git_repository_free(m);
	state_clear(&t);
}

static void pack_bundle(const char *dir, const struct gmsg_refstate *rs, const char *prereq,
			const char *objcmd, const char *out);

/* The whole of data through one bundle_rx: finish's result. */
static int rx_all(git_repository *m, const struct gmsg_refstate *rs,
		  const struct bundle_rx_opts *o, const unsigned char *data, size_t len)
{
	struct bundle_rx *rx;
	char err[256];
	int rc;

	assert_int_equal(bundle_rx_new(&rx, m, rs, o, err, sizeof(err)), 0);
	assert_int_equal(bundle_rx_write(rx, data, len), 0);
	rc = bundle_rx_finish(rx, NULL);
	bundle_rx_free(rx);
	return rc;
}

/* The pre-commit check sees the new objects and the reachable root commits, and can veto. */
struct check_arg {
	const char *want_root;
	int calls;
	size_t nroots;
	char roots[4][GIT_OID_HEXSZ + 1];
};

static int check_root(git_repository *view, const struct gmsg_refstate *rs, const git_oid *roots,
		      size_t nroots, void *arg, char *err, size_t errsz)
{
	struct check_arg *a = arg;
	git_revwalk *w = NULL;
	git_oid oid, root;
	char name[256];
	int rc = 0;

	a->calls++;
	a->nroots = nroots;
	for (size_t i = 0; i < nroots && i < 4; i++)
		git_oid_tostr(a->roots[i], sizeof(a->roots[i]), &roots[i]);
	/* HEAD's target in the signed state, then the first commit of a reversed walk. */
	for (size_t i = 0; i < rs->nrefs; i++)
		if (gmsg_str_eq(rs->refs[i].name, rs->head))
			git_oid_fromraw(&oid, rs->refs[i].oid);
	snprintf(name, sizeof(name), "%.*s", (int)rs->head.len, rs->head.ptr);
	if (git_revwalk_new(&w, view) < 0 ||
	    git_revwalk_sorting(w, GIT_SORT_TOPOLOGICAL | GIT_SORT_REVERSE) < 0 ||
	    git_revwalk_push(w, &oid) < 0 || git_revwalk_next(&root, w) < 0) {
		snprintf(err, errsz, "cannot walk %s", name);
		rc = ME_EGIT;
	} else if (strcmp(git_oid_tostr_s(&root), a->want_root) != 0) {
		snprintf(err, errsz, "root commit %s is not the repository's",
			 git_oid_tostr_s(&root));
		rc = ME_EPERM;
	}
	git_revwalk_free(w);
	return rc;
}

static void test_check_hook(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], err[256];
	struct tstate t;
	struct check_arg a = { NULL, 0, 0, { "" } };
	struct bundle_rx_opts o = { .max_bytes = 1u << 30, .check = check_root, .check_arg = &a,
				    .roots = true };
	struct bundle_rx *rx;
	git_repository *m;
	unsigned char *data;
	size_t len;
	(void)state;

	path_in(src, sizeof(src), "check-src");
	path_in(b, sizeof(b), "check.bundle");
	make_src(src);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	data = slurp(b, &len);
	m = new_mirror("node-check", mdir, sizeof(mdir));

	a.want_root = "0000000000000000000000000000000000000000";
	assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), 0);
	assert_int_equal(bundle_rx_write(rx, data, len), 0);
	assert_int_equal(bundle_rx_finish(rx, NULL), ME_EPERM);
	assert_non_null(strstr(bundle_rx_errmsg(rx), "is not the repository's"));
	bundle_rx_free(rx);
	assert_int_equal(a.calls, 1);
	assert_int_equal(npacks(mdir), 0);
	assert_int_equal(nincoming(mdir), 0);
	assert_int_equal(count_of("git -C '%s' for-each-ref | wc -l", mdir), 0);

	a.want_root = t.gi.root_hex;
	assert_int_equal(rx_all(m, &t.rs, &o, data, len), 0);
	assert_int_equal(a.calls, 2);
	assert_int_equal(a.nroots, 1);
	assert_string_equal(a.roots[0], t.gi.root_hex);
	expect_same_refs(src, mdir);
	fsck(mdir);
	free(data);
	git_repository_free(m);

	/* A root commit in the pack that no tip reaches is not reported as one of the history's
	 * roots (a pack can carry anything: the binding must come from the history itself). */
	{
		char orphan[64], cmd[256], m2dir[PATH_MAX];
		git_repository *m2 = new_mirror("node-check-decoy", m2dir, sizeof(m2dir));

		capture(orphan, sizeof(orphan), "cd '%s' && git commit-tree 'HEAD^{tree}' -m decoy",
			src);
		snprintf(cmd, sizeof(cmd), "git rev-list --objects --branches --tags; echo %s",
			 orphan);
		pack_bundle(src, &t.rs, NULL, cmd, b);
		a.calls = 0;
		data = slurp(b, &len);
		assert_int_equal(rx_all(m2, &t.rs, &o, data, len), 0);
		assert_int_equal(a.calls, 1);
		assert_int_equal(a.nroots, 1);
		assert_string_equal(a.roots[0], t.gi.root_hex);
		capture(cmd, sizeof(cmd), "git -C '%s' cat-file -t %s", m2dir, orphan);
		assert_string_equal(cmd, "commit"); /* it was received all the same */
		free(data);
		git_repository_free(m2);
	}
	state_clear(&t);
}

static void test_state_haves(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], err[256];
	struct tstate t;
	struct mirror_state ms;
	git_repository *m;
	git_oid haves[64];
	size_t n, distinct;
	(void)state;

	m = synced("state", src, sizeof(src), mdir, sizeof(mdir));
	state_of(src, &t);
	assert_int_equal(mirror_state_read(m, &ms, err, sizeof(err)), 0);
	assert_int_equal(ms.nrefs, t.rs.nrefs);
	assert_true(mirror_state_matches(&ms, &t.rs));
	/* A head of "" is not compared; another head, another oid, a missing ref are. */
	t.rs.head = gmsg_str("");
	assert_true(mirror_state_matches(&ms, &t.rs));
	t.rs.head = gmsg_str("refs/heads/main");
	assert_false(mirror_state_matches(&ms, &t.rs));
	t.rs.head = gmsg_str("refs/heads/dev");
	t.refs[0].oid[0] ^= 1;
	assert_false(mirror_state_matches(&ms, &t.rs));
	t.refs[0].oid[0] ^= 1;
	t.rs.nrefs--;
	assert_false(mirror_state_matches(&ms, &t.rs));
	t.rs.nrefs++;
	mirror_state_free(&ms);

	/* Haves: the distinct ref targets (alias and main share one). */
	distinct = (size_t)count_of("git -C '%s' for-each-ref --format='%%(objectname)' "
				    "refs/heads refs/tags | sort -u | wc -l", mdir);
	assert_int_equal(mirror_haves(m, haves, 64, &n, err, sizeof(err)), 0);
	assert_int_equal(n, distinct);
	assert_int_equal(mirror_haves(m, haves, 2, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 2);
	assert_int_equal(mirror_haves(m, NULL, 0, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 0);
	git_repository_free(m);

	/* An empty mirror has no refs and no haves. */
	m = new_mirror("node-state-empty", mdir, sizeof(mdir));
	assert_int_equal(mirror_state_read(m, &ms, err, sizeof(err)), 0);
	assert_int_equal(ms.nrefs, 0);
	assert_false(mirror_state_matches(&ms, &t.rs));
	mirror_state_free(&ms);
	assert_int_equal(mirror_haves(m, haves, 64, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 0);
	git_repository_free(m);
	state_clear(&t);
}

static void test_cleanup(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], err[256];
	git_repository *m;
	(void)state;

	m = synced("clean", src, sizeof(src), mdir, sizeof(mdir));
	sh("cd '%s' && mkdir -p me-incoming-abc123/sub && echo x > me-incoming-abc123/sub/f && "
	   "touch refs/heads/stale.lock HEAD.lock packed-refs.lock && mkdir -p refs/tags/d && "
	   "touch refs/tags/d/x.lock", mdir);
	/* A stale lock blocks ref updates until it is cleaned. */
	assert_int_equal(mirror_cleanup(m, err, sizeof(err)), 0);
	assert_int_equal(nincoming(mdir), 0);
	assert_int_equal(count_of("find '%s' -name '*.lock' | wc -l", mdir), 0);
	fsck(mdir);
	expect_same_refs(src, mdir);
	git_repository_free(m);
}

static void test_lock_held(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], err[256];
	struct bundle_stats st;
	git_repository *m;
	(void)state;

	/* A ref lock held by someone else: the update fails, nothing changes, the pack goes. */
	m = synced("lock", src, sizeof(src), mdir, sizeof(mdir));
	sh("cd '%s' && echo l >> a && git commit -q -am l", src);
	path_in(b, sizeof(b), "lock.bundle");
	{
		struct tstate t;
		git_oid haves[64];
		size_t nh;

		assert_int_equal(mirror_haves(m, haves, 64, &nh, err, sizeof(err)), 0);
		state_of(src, &t);
		write_bundle(src, &t.rs, haves, nh, b, &st);
		sh("touch '%s/refs/heads/dev.lock'", mdir);
		expect_reject(m, mdir, b, &t.rs, 1u << 30, ME_EBUSY, "refs/heads/dev is locked");
		assert_int_equal(mirror_cleanup(m, err, sizeof(err)), 0);
		apply_ok(m, b, &t.rs, &st);
		expect_same_refs(src, mdir);
		state_clear(&t);
	}
	git_repository_free(m);
}

/* A bundle around a pack made by git pack-objects from the objects objcmd lists. */
static void pack_bundle(const char *dir, const struct gmsg_refstate *rs, const char *prereq,
			const char *objcmd, const char *out)
{
	FILE *f;

	assert_non_null(f = fopen(out, "wb"));
	fprintf(f, "# v2 git bundle\n");
	if (prereq != NULL)
		fprintf(f, "-%s\n", prereq);
	for (size_t i = 0; i < rs->nrefs; i++) {
		git_oid o;
		git_oid_fromraw(&o, rs->refs[i].oid);
		fprintf(f, "%s %.*s\n", git_oid_tostr_s(&o), (int)rs->refs[i].name.len,
			rs->refs[i].name.ptr);
	}
	fprintf(f, "\n");
	assert_int_equal(fclose(f), 0);
	sh("cd '%s' && (%s) | git pack-objects -q --stdout >> '%s'", dir, objcmd, out);
}

static void test_not_connected(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], cmd[512], blob[64], want[256], err[256];
	struct tstate t;
	git_repository *m, *r;
	git_odb *odb;
	git_oid junk, tree, bad_tree;
	(void)state;

	path_in(src, sizeof(src), "nc-src");
	path_in(b, sizeof(b), "nc.bundle");
	make_src(src);
	state_of(src, &t);
	m = new_mirror("node-nc", mdir, sizeof(mdir));

	/* The honest list of objects is accepted (a pack git made). */
	pack_bundle(src, &t.rs, NULL, "git rev-list --objects --branches --tags", b);
	{
		char m2dir[PATH_MAX];
		git_repository *m2 = new_mirror("node-nc-honest", m2dir, sizeof(m2dir));
		apply_ok(m2, b, &t.rs, NULL);
		fsck(m2dir);
		expect_same_refs(src, m2dir);
		git_repository_free(m2);
	}

	/* A blob left out: the indexer is content, the check is not. */
	capture(blob, sizeof(blob), "git -C '%s' rev-parse HEAD:b", src);
	snprintf(cmd, sizeof(cmd), "git rev-list --objects --branches --tags | grep -v '^%s'",
		 blob);
	pack_bundle(src, &t.rs, NULL, cmd, b);
	snprintf(want, sizeof(want), "bundle is not connected: object %s (referenced by ", blob);
	expect_reject(m, mdir, b, &t.rs, 1u << 30, ME_EPROTO, want);

	/* An unreachable commit whose parent is missing is refused too: the mirror must never
	 * hold an object with a dangling reference. */
	r = open_repo(src);
	assert_int_equal(git_repository_odb(&odb, r), 0);
	capture(err, sizeof(err), "git -C '%s' rev-parse 'HEAD^{tree}'", src);
	assert_int_equal(git_oid_fromstr(&tree, err), 0);
	{
		char text[512];
		int n = snprintf(text, sizeof(text), "tree %s\nparent 1111111111111111111111111111"
				 "111111111111\nauthor A <a@b> 1700000000 +0000\ncommitter A <a@b> "
				 "1700000000 +0000\n\njunk\n", git_oid_tostr_s(&tree));
		assert_int_equal(git_odb_write(&junk, odb, text, (size_t)n, GIT_OBJECT_COMMIT), 0);
	}
	snprintf(cmd, sizeof(cmd), "git rev-list --objects --branches --tags; echo %s",
		 git_oid_tostr_s(&junk));
	pack_bundle(src, &t.rs, NULL, cmd, b);
	expect_reject(m, mdir, b, &t.rs, 1u << 30, ME_EPROTO,
		      "bundle is not connected: object 1111111111111111111111111111111111111111");

	/* A tree entry that says blob but names a tree. */
	{
		unsigned char raw[64];
		size_t n = (size_t)sprintf((char *)raw, "100644 f");
		raw[n++] = '\0';
		memcpy(raw + n, tree.id, GIT_OID_RAWSZ);
		n += GIT_OID_RAWSZ;
		assert_int_equal(git_odb_write(&bad_tree, odb, raw, n, GIT_OBJECT_TREE), 0);
	}
	sh("cd '%s' && git update-ref refs/heads/typed $(git commit-tree %s -m typed)", src,
	   git_oid_tostr_s(&bad_tree));
	git_odb_free(odb);
	git_repository_free(r);
	state_clear(&t);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	{
		char h1[GIT_OID_HEXSZ + 1], h2[GIT_OID_HEXSZ + 1];
		snprintf(want, sizeof(want), "bundle is not connected: object %s (referenced by %s) "
			 "is not a blob", git_oid_tostr(h1, sizeof(h1), &tree),
			 git_oid_tostr(h2, sizeof(h2), &bad_tree));
	}
	expect_reject(m, mdir, b, &t.rs, 1u << 30, ME_EPROTO, want);
	fsck(mdir);
	git_repository_free(m);
	state_clear(&t);
}

/* Packs that git itself makes: a full `git bundle create`, and a thin incremental pack (deltas
 * against objects only the receiver has; the indexer completes it from the mirror). */
static void test_git_made(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], old[64], cmd[256];
	struct tstate t;
	git_repository *m;
	(void)state;

	path_in(src, sizeof(src), "gm-src");
	path_in(b, sizeof(b), "gm.bundle");
	make_src(src);
	sh("git -C '%s' symbolic-ref -d refs/heads/alias", src);
	state_of(src, &t);
	sh("git -C '%s' bundle create -q '%s' --branches --tags", src, b);
	m = new_mirror("node-gm", mdir, sizeof(mdir));
	apply_ok(m, b, &t.rs, NULL);
	fsck(mdir);
	expect_same_refs(src, mdir);
	state_clear(&t);

	/* A large file changed a little: git sends a delta against the old blob. */
	capture(old, sizeof(old), "git -C '%s' rev-parse dev", src);
	sh("cd '%s' && seq 1 20000 > big && git add big && git commit -q -m big", src);
	state_of(src, &t);
	pack_bundle(src, &t.rs, NULL, "git rev-list --objects --branches --tags", b);
	apply_ok(m, b, &t.rs, NULL);
	state_clear(&t);
	capture(old, sizeof(old), "git -C '%s' rev-parse dev", src);
	sh("cd '%s' && seq 1 20001 > big && git commit -q -am bigger", src);
	state_of(src, &t);
	snprintf(cmd, sizeof(cmd), "printf 'dev\n^%s\n' | git pack-objects --revs --thin -q "
		 "--stdout", old);
	{
		FILE *f;
		assert_non_null(f = fopen(b, "wb"));
		fprintf(f, "# v2 git bundle\n-%s\n", old);
		for (size_t i = 0; i < t.rs.nrefs; i++) {
			git_oid o;
			git_oid_fromraw(&o, t.rs.refs[i].oid);
			fprintf(f, "%s %s\n", git_oid_tostr_s(&o), t.gi.refs[i].name);
		}
		fprintf(f, "\n");
		fclose(f);
		sh("cd '%s' && (%s) >> '%s'", src, cmd, b);
	}
	assert_true(file_size(b) < 2048);
	apply_ok(m, b, &t.rs, NULL);
	fsck(mdir);
	expect_same_refs(src, mdir);
	git_repository_free(m);
	state_clear(&t);
}

/* ---- parts: a complete pack written as self-contained parts, indexed part by part ---- */

/* Feeds data to a new bundle_rx with parts in chunks of step bytes (up to len), then finishes
 * when finish is set. Returns the first error (or finish's result); *msg the message. */
static int rx_parts(git_repository *m, const struct gmsg_refstate *rs,
		    const struct xmsg_parts *parts, uint64_t size, const unsigned char *data,
		    size_t len, size_t step, bool finish, struct bundle_stats *st, char *msg,
		    size_t msgsz)
{
	struct bundle_rx_opts o = { .max_bytes = 1u << 30, .parts = parts, .size = size };
	struct bundle_rx *rx;
	char err[256];
	int rc = 0;

	assert_int_equal(bundle_rx_new(&rx, m, rs, &o, err, sizeof(err)), 0);
	for (size_t off = 0; rc == 0 && off < len; off += step)
		rc = bundle_rx_write(rx, data + off, len - off < step ? len - off : step);
	if (rc == 0 && finish)
		rc = bundle_rx_finish(rx, st);
	snprintf(msg, msgsz, "%s", bundle_rx_errmsg(rx));
	bundle_rx_free(rx);
	return rc;
}

static void expect_parts_reject(git_repository *m, const char *mdir,
				const struct gmsg_refstate *rs, const struct xmsg_parts *parts,
				uint64_t size, const unsigned char *data, size_t len, const char *want)
{
	char msg[512];
	int rc = rx_parts(m, rs, parts, size, data, len, 65536, true, NULL, msg, sizeof(msg));

	if (rc >= 0 || strstr(msg, want) == NULL)
		fail_msg("parts accepted or other failure: %s: \"%s\" (want \"%s\")",
			 me_errname(rc), msg, want);
	assert_int_equal(npacks(mdir), 0);
	assert_int_equal(nincoming(mdir), 0);
	assert_int_equal(count_of("git -C '%s' for-each-ref | wc -l", mdir), 0);
}

static void test_parts(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], pk[PATH_MAX], ix[PATH_MAX], msg[512];
	struct tstate t;
	struct bundle_stats st, got;
	struct xmsg_parts bad;
	struct pidx x;
	git_repository *m;
	unsigned char *data;
	size_t len, hdrlen;
	(void)state;

	path_in(src, sizeof(src), "parts-src");
	path_in(b, sizeof(b), "parts.bundle");
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && seq 1 3000 > f && "
	   "git add f && git commit -q -m c0 && for i in $(seq 1 60); do "
	   "sed -i \"$((i * 7))s/.*/changed $i/\" f; echo $i > n$((i %% 7)); git add -A; "
	   "git commit -q -m c$i; done && git tag -a v1 -m one HEAD~9 && git gc -q", src, src);
	state_of(src, &t);
	packreuse_part_min = 1;
	write_bundle(src, &t.rs, NULL, 0, b, &st);
	packreuse_part_min = PACKREUSE_PART_MIN;
	data = slurp(b, &len);
	hdrlen = st.header_bytes;
	assert_true(st.parts.n >= 3 && st.parts.n <= PACKREUSE_PARTS);
	assert_true(st.parts.v[0].offset == hdrlen + PACK_HDR_LEN);
	assert_true(xmsg_parts_valid(&st.parts, len));

	/* Applied part by part, fed in odd sizes: a pack per part, the same refs and objects. */
	m = new_mirror("node-parts", mdir, sizeof(mdir));
	assert_int_equal(rx_parts(m, &t.rs, &st.parts, len, data, len, 4093, true, &got, msg,
				  sizeof(msg)), 0);
	assert_string_equal(msg, "");
	assert_int_equal(got.parts.n, st.parts.n);
	assert_int_equal(got.objects, st.objects);
	assert_int_equal(npacks(mdir), st.parts.n);
	assert_int_equal(nincoming(mdir), 0);
	fsck(mdir);
	expect_same_refs(src, mdir);
	sh("test \"$(git -C '%s' rev-list --objects --all | sort)\" = "
	   "\"$(git -C '%s' rev-list --objects --all | sort)\"", src, mdir);
	git_repository_free(m);

	/* Parts that do not fit the pack: refused, nothing left behind. The pack's entries, to
	 * cut where a delta crosses: */
	path_in(pk, sizeof(pk), "parts.pack");
	path_in(ix, sizeof(ix), "parts.idx");
	spit(pk, data + hdrlen, len - hdrlen);
	sh("git index-pack -o '%s' '%s' >/dev/null", ix, pk);
	assert_int_equal(pidx_open(&x, ix, pk), 0);
	m = new_mirror("node-parts-bad", mdir, sizeof(mdir));

	/* counts moved between parts, total unchanged: both parts fail, and the one reported is
	 * whichever thread is joined first */
	bad = st.parts;
	bad.v[0].count++;
	bad.v[1].count--;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "bad pack: part ");
	bad = st.parts;
	bad.v[0].count--;
	bad.v[1].count++;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "bad pack: part ");
	bad = st.parts; /* a count that does not add up */
	bad.v[bad.n - 1].count++;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "the parts announced hold");
	bad = st.parts; /* a part that does not start at an entry */
	bad.v[1].offset++;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "bad pack: part");
	bad = st.parts; /* the first part after the pack's header, not anywhere else */
	bad.v[0].offset--;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "do not fit");
	bad = st.parts; /* the last part must end before the trailer */
	bad.v[bad.n - 1].offset = len - PACK_TRAILER_LEN;
	expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "do not fit");

	/* a cut at a delta whose base is in the part before */
	bool cut = false;
	for (uint32_t k = 1; k < x.n && !cut; k++) {
		struct pidx_entry e;
		uint64_t at = hdrlen + x.rev[k].off;
		uint32_t i = 0;
		assert_int_equal(pidx_entry(&x, k, &e), 0);
		if (e.type != PACK_OFS_DELTA)
			continue;
		while (i + 1 < st.parts.n && st.parts.v[i + 1].offset <= at)
			i++;
		if (st.parts.v[i].offset >= hdrlen + e.base_off || st.parts.n == XMSG_MAX_PARTS)
			continue;
		/* part i is [start, at) and [at, ...): ranks from the part's first entry */
		int64_t first = pidx_at(&x, st.parts.v[i].offset - hdrlen);
		assert_true(first >= 0 && (uint32_t)first < k);
		bad = st.parts;
		memmove(&bad.v[i + 2], &bad.v[i + 1], (bad.n - i - 1) * sizeof(bad.v[0]));
		bad.n++;
		bad.v[i].count = k - (uint32_t)first;
		bad.v[i + 1].offset = at;
		bad.v[i + 1].count = st.parts.v[i].count - bad.v[i].count;
		assert_true(xmsg_parts_valid(&bad, len));
		expect_parts_reject(m, mdir, &t.rs, &bad, len, data, len, "bad pack: part");
		cut = true;
	}
	assert_true(cut);
	pidx_free(&x);

	/* more data than announced; less */
	expect_parts_reject(m, mdir, &t.rs, &st.parts, len - 1, data, len, "bad pack");
	data[len] = 0; /* slurp leaves a byte */
	expect_parts_reject(m, mdir, &t.rs, &st.parts, len, data, len + 1,
			    "larger than announced");
	expect_parts_reject(m, mdir, &t.rs, &st.parts, len, data, len - 1, "truncated");
	/* abandoned while parts are being indexed: nothing left */
	assert_int_equal(rx_parts(m, &t.rs, &st.parts, len, data, len * 2 / 3, 8192, false, NULL,
				  msg, sizeof(msg)), 0);
	assert_int_equal(npacks(mdir), 0);
	assert_int_equal(nincoming(mdir), 0);
	/* refused up front: parts out of order, or a size over the limit */
	{
		struct bundle_rx_opts o = { .max_bytes = 1u << 30, .parts = &bad, .size = len };
		struct bundle_rx *rx = NULL;
		char err[256];
		bad = st.parts;
		bad.v[1].offset = bad.v[0].offset;
		assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), ME_EINVAL);
		assert_null(rx);
		o.parts = &st.parts;
		o.max_bytes = len - 1;
		assert_int_equal(bundle_rx_new(&rx, m, &t.rs, &o, err, sizeof(err)), ME_EINVAL);
	}
	/* and the honest parts still apply on that mirror */
	assert_int_equal(rx_parts(m, &t.rs, &st.parts, len, data, len, 65536, true, &got, msg,
				  sizeof(msg)), 0);
	fsck(mdir);
	expect_same_refs(src, mdir);
	git_repository_free(m);
	free(data);
	state_clear(&t);
}

/* A pack git made without deltas (every entry boundary a valid cut), cut at the given ranks
 * (in pack order; 0 first). */
static void parts_at(const unsigned char *data, size_t len, size_t hdrlen, const uint32_t *ranks,
		     uint32_t nranks, const char *name, struct pidx *x, struct xmsg_parts *parts)
{
	char pk[PATH_MAX], ix[PATH_MAX], nm[64];

	snprintf(nm, sizeof(nm), "%s.pack", name);
	path_in(pk, sizeof(pk), nm);
	snprintf(nm, sizeof(nm), "%s.idx", name);
	path_in(ix, sizeof(ix), nm);
	spit(pk, data + hdrlen, len - hdrlen);
	sh("git index-pack -o '%s' '%s' >/dev/null", ix, pk);
	assert_int_equal(pidx_open(x, ix, pk), 0);
	memset(parts, 0, sizeof(*parts));
	for (uint32_t i = 0; i < nranks; i++) {
		uint32_t end = i + 1 < nranks ? ranks[i + 1] : x->n;
		assert_true(ranks[i] < end);
		parts->v[i].offset = hdrlen + x->rev[ranks[i]].off;
		parts->v[i].count = end - ranks[i];
	}
	parts->n = nranks;
	assert_true(xmsg_parts_valid(parts, len));
}

static size_t header_len(const char *path)
{
	struct bundle_header h;
	char err[256];
	int fd = open(path, O_RDONLY);
	size_t n;

	assert_true(fd >= 0);
	assert_int_equal(bundle_read_header(fd, &h, err, sizeof(err)), 0);
	n = h.len;
	bundle_header_free(&h);
	close(fd);
	return n;
}

/* With parts, what a part references in another part is found there, and what is in no part
 * (nor in the mirror) or has another type is refused with the object that referenced it. */
static void test_parts_not_connected(void **state)
{
	char src[PATH_MAX], mdir[PATH_MAX], b[PATH_MAX], cmd[512], blob[64], want[256], msg[512];
	char hex[2][64];
	struct tstate t;
	struct xmsg_parts parts;
	struct pidx x;
	git_repository *m;
	git_oid tree, bad_tree;
	unsigned char *data;
	size_t len, hdrlen;
	(void)state;

	path_in(src, sizeof(src), "pnc-src");
	path_in(b, sizeof(b), "pnc.bundle");
	make_src(src);
	sh("git -C '%s' symbolic-ref -d refs/heads/alias", src);
	state_of(src, &t);

	/* honest, in three parts */
	pack_bundle(src, &t.rs, NULL, "git rev-list --objects --branches --tags", b);
	sh("cd '%s' && head -c %zu '%s' > '%s.h' && git rev-list --objects --branches --tags | "
	   "git pack-objects -q --window=0 --stdout >> '%s.h' && mv '%s.h' '%s'", src,
	   header_len(b), b, b, b, b, b);
	data = slurp(b, &len);
	hdrlen = header_len(b);
	{
		uint32_t n0;
		parts_at(data, len, hdrlen, (uint32_t[]){ 0 }, 1, "pnc0", &x, &parts);
		n0 = x.n;
		pidx_free(&x);
		parts_at(data, len, hdrlen, (uint32_t[]){ 0, n0 / 3, 2 * n0 / 3 }, 3, "pnc1", &x,
			 &parts);
		pidx_free(&x);
	}
	m = new_mirror("node-pnc-honest", mdir, sizeof(mdir));
	assert_int_equal(rx_parts(m, &t.rs, &parts, len, data, len, 4096, true, NULL, msg,
				  sizeof(msg)), 0);
	assert_int_equal(npacks(mdir), 3);
	fsck(mdir);
	expect_same_refs(src, mdir);
	git_repository_free(m);
	free(data);
	/* The root commit is found through parents in other parts: one branch, cut after each
	 * of its first commits (git writes the commits first, newest first). */
	{
		char root[64];
		struct check_arg a = { root, 0, 0, { "" } };
		struct bundle_rx_opts o = { .max_bytes = 1u << 30, .check = check_root,
					    .check_arg = &a, .roots = true, .parts = &parts,
					    .size = 0 };
		struct bundle_rx *rx;
		struct gmsg_refstate one = t.rs;
		char b1[PATH_MAX];
		unsigned char *d1;
		size_t l1, h1;
		size_t k = 0;
		while (k < t.rs.nrefs && !gmsg_str_eq(t.rs.refs[k].name,
						      gmsg_str("refs/heads/dev")))
			k++;
		assert_true(k < t.rs.nrefs);
		one.refs = &t.refs[k];
		one.nrefs = 1;
		one.head = gmsg_str("refs/heads/dev");
		path_in(b1, sizeof(b1), "pnc-roots.bundle");
		pack_bundle(src, &one, NULL, "git rev-list --objects dev", b1);
		h1 = header_len(b1);
		sh("cd '%s' && head -c %zu '%s' > '%s.h' && git rev-list --objects dev | "
		   "git pack-objects -q --window=0 --stdout >> '%s.h' && mv '%s.h' '%s'", src,
		   h1, b1, b1, b1, b1, b1);
		d1 = slurp(b1, &l1);
		o.size = l1;
		capture(root, sizeof(root), "git -C '%s' rev-list --max-parents=0 dev", src);
		parts_at(d1, l1, h1, (uint32_t[]){ 0, 1, 2, 3 }, 4, "pnc5", &x, &parts);
		for (uint32_t k = 0; k < 3; k++) {
			struct pidx_entry e;
			assert_int_equal(pidx_entry(&x, k, &e), 0);
			assert_int_equal(e.type, PACK_COMMIT);
		}
		pidx_free(&x);
		m = new_mirror("node-pnc-roots", mdir, sizeof(mdir));
		assert_int_equal(bundle_rx_new(&rx, m, &one, &o, msg, sizeof(msg)), 0);
		assert_int_equal(bundle_rx_write(rx, d1, l1), 0);
		if (bundle_rx_finish(rx, NULL) != 0)
			fail_msg("%s", bundle_rx_errmsg(rx));
		bundle_rx_free(rx);
		assert_int_equal(a.calls, 1);
		assert_int_equal(a.nroots, 1);
		assert_string_equal(a.roots[0], root);
		assert_int_equal(npacks(mdir), 4);
		git_repository_free(m);
		free(d1);
	}

	/* a blob in no part */
	capture(blob, sizeof(blob), "git -C '%s' rev-parse HEAD:b", src);
	snprintf(cmd, sizeof(cmd), "git rev-list --objects --branches --tags | grep -v '^%s' | "
		 "git pack-objects -q --window=0 --stdout", blob);
	sh("cd '%s' && head -c %zu '%s' > '%s.h' && (%s) >> '%s.h' && mv '%s.h' '%s'", src,
	   hdrlen, b, b, cmd, b, b, b);
	data = slurp(b, &len);
	parts_at(data, len, hdrlen, (uint32_t[]){ 0, 4, 9 }, 3, "pnc2", &x, &parts);
	pidx_free(&x);
	m = new_mirror("node-pnc-missing", mdir, sizeof(mdir));
	snprintf(want, sizeof(want), "bundle is not connected: object %s (referenced by ", blob);
	expect_parts_reject(m, mdir, &t.rs, &parts, len, data, len, want);
	git_repository_free(m);
	free(data);

	/* a tree entry that says blob but names a tree of another part */
	capture(hex[0], sizeof(hex[0]), "git -C '%s' rev-parse 'HEAD^{tree}'", src);
	assert_int_equal(git_oid_fromstr(&tree, hex[0]), 0);
	{
		git_repository *r = open_repo(src);
		git_odb *odb;
		unsigned char raw[64];
		size_t n = (size_t)sprintf((char *)raw, "100644 f");
		raw[n++] = '\0';
		memcpy(raw + n, tree.id, GIT_OID_RAWSZ);
		n += GIT_OID_RAWSZ;
		assert_int_equal(git_repository_odb(&odb, r), 0);
		assert_int_equal(git_odb_write(&bad_tree, odb, raw, n, GIT_OBJECT_TREE), 0);
		git_odb_free(odb);
		git_repository_free(r);
		git_oid_tostr(hex[1], sizeof(hex[1]), &bad_tree);
	}
	sh("cd '%s' && git update-ref refs/heads/typed $(git commit-tree %s -m typed)", src, hex[1]);
	state_clear(&t);
	state_of(src, &t);
	write_bundle(src, &t.rs, NULL, 0, b, NULL);
	hdrlen = header_len(b);
	/* (rev-list stops at the bad tree: its objects are listed by hand) */
	sh("cd '%s' && head -c %zu '%s' > '%s.h' && (git rev-list --objects "
	   "--exclude=typed --branches --tags; git rev-parse typed; echo %s) | "
	   "git pack-objects -q --window=0 --stdout >> '%s.h' && mv '%s.h' '%s'", src, hdrlen, b,
	   b, hex[1], b, b, b);
	data = slurp(b, &len);
	{
		uint32_t ra = 0, rb = 0, cut;
		parts_at(data, len, hdrlen, (uint32_t[]){ 0 }, 1, "pnc3", &x, &parts);
		for (uint32_t k = 0; k < x.n; k++) {
			if (memcmp(pidx_oid(&x, x.rev[k].pos), tree.id, GIT_OID_RAWSZ) == 0)
				ra = k;
			if (memcmp(pidx_oid(&x, x.rev[k].pos), bad_tree.id, GIT_OID_RAWSZ) == 0)
				rb = k;
		}
		assert_true(ra != rb);
		cut = ra > rb ? ra : rb; /* the later of the two starts the second part */
		pidx_free(&x);
		parts_at(data, len, hdrlen, (uint32_t[]){ 0, cut }, 2, "pnc4", &x, &parts);
		pidx_free(&x);
	}
	m = new_mirror("node-pnc-typed", mdir, sizeof(mdir));
	snprintf(want, sizeof(want), "bundle is not connected: object %s (referenced by %s) is not "
		 "a blob", hex[0], hex[1]);
	expect_parts_reject(m, mdir, &t.rs, &parts, len, data, len, want);
	git_repository_free(m);
	free(data);
	state_clear(&t);
}

static int group_setup(void **state)
{
	static const char *const unset[] = {
		"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
		"GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_CEILING_DIRECTORIES",
		"GIT_NAMESPACE", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
	};
	uint8_t root[ME_OID_LEN] = { 1, 2, 3 }, pk[ME_PK_LEN] = { 4, 5, 6 };
	(void)state;

	snprintf(base, sizeof(base), "/tmp/me-test-mirror.XXXXXX");
	if (mkdtemp(base) == NULL)
		return -1;
	for (size_t i = 0; i < sizeof(unset) / sizeof(unset[0]); i++)
		unsetenv(unset[i]);
	setenv("HOME", base, 1);
	setenv("XDG_CONFIG_HOME", base, 1);
	git_test_env();
	setenv("LC_ALL", "C", 1);
	if (me_did_repo_compute(root, pk, repo_id, sizeof(repo_id)) != 0)
		return -1;
	gitrepo_global_init();
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	gitrepo_global_free();
	nftw(base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_path),
		cmocka_unit_test(test_open),
		cmocka_unit_test(test_full),
		cmocka_unit_test(test_incremental),
		cmocka_unit_test(test_thin),
		cmocka_unit_test(test_write_haves),
		cmocka_unit_test(test_write_skew),
		cmocka_unit_test(test_tampered),
		cmocka_unit_test(test_hostile_header),
		cmocka_unit_test(test_header_parse),
		cmocka_unit_test(test_read_header),
		cmocka_unit_test(test_rx_stream),
		cmocka_unit_test(test_check_hook),
		cmocka_unit_test(test_state_haves),
		cmocka_unit_test(test_cleanup),
		cmocka_unit_test(test_lock_held),
		cmocka_unit_test(test_not_connected),
		cmocka_unit_test(test_git_made),
		cmocka_unit_test(test_parts),
		cmocka_unit_test(test_parts_not_connected),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
