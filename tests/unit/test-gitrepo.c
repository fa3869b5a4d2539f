#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/err.h"
#include "daemon/gitrepo.h"
#include "tests/unit/gitfixture.h"

static char base[64];

/* A repository with three commits on main, a nested and a symbolic branch, a
 * lightweight and an annotated tag, and a committed subdirectory. */
static void make_repo(const char *dir)
{
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && "
	   "echo one > a && git add a && git commit -q -m one && "
	   "echo two > b && git add b && git commit -q -m two && "
	   "git branch feature/x HEAD~1 && git tag v0.1 HEAD~1 && "
	   "git tag -a v1.0 -m 'release 1.0' && "
	   "git symbolic-ref refs/heads/alias refs/heads/main && "
	   "mkdir sub && echo s > sub/f && git add sub && git commit -q -m three",
	   dir, dir);
}

static void path_in(char *out, size_t outsz, const char *name)
{
	int n = snprintf(out, outsz, "%s/%s", base, name);

	assert_true(n > 0 && (size_t)n < outsz);
}

static void expect_refs(const struct gitrepo_info *gi, const char *dir)
{
	char want[4096], got[4096];
	size_t off = 0;

	capture(want, sizeof(want),
		"git -C '%s' for-each-ref --format='%%(refname) %%(objectname)' refs/heads refs/tags",
		dir);
	got[0] = '\0';
	for (size_t i = 0; i < gi->nrefs; i++) {
		int n = snprintf(got + off, sizeof(got) - off, "%s%s %s", i ? "\n" : "",
				 gi->refs[i].name, gi->refs[i].oid);
		assert_true(n > 0 && (size_t)n < sizeof(got) - off);
		off += (size_t)n;
	}
	assert_string_equal(got, want);
}

static void inspect_ok(const char *path, struct gitrepo_info *gi)
{
	char err[256];
	int rc = gitrepo_inspect(path, gi, err, sizeof(err));

	if (rc != 0)
		fail_msg("gitrepo_inspect(%s): %s: %s", path, me_errname(rc), err);
	assert_string_equal(err, "");
}

static void test_basic(void **state)
{
	char dir[PATH_MAX], real[PATH_MAX], want[128], hex[41], alt[PATH_MAX];
	struct gitrepo_info gi;
	(void)state;

	path_in(dir, sizeof(dir), "proj");
	make_repo(dir);
	assert_non_null(realpath(dir, real));
	inspect_ok(dir, &gi);
	assert_string_equal(gi.path, real);
	assert_string_equal(gi.name, "proj");
	capture(want, sizeof(want), "git -C '%s' rev-list --max-parents=0 HEAD", dir);
	assert_int_equal(strlen(want), 40);
	assert_string_equal(gi.root_hex, want);
	for (size_t i = 0; i < 20; i++)
		snprintf(hex + 2 * i, 3, "%02x", gi.root_oid[i]);
	assert_string_equal(hex, want);
	assert_string_equal(gi.head, "refs/heads/main");
	assert_int_equal(gi.nrefs, 5);
	expect_refs(&gi, dir);

	/* The annotated tag keeps the tag object's oid, the lightweight one the commit's. */
	capture(want, sizeof(want), "git -C '%s' rev-parse v1.0", dir);
	assert_string_equal(gi.refs[4].name, "refs/tags/v1.0");
	assert_string_equal(gi.refs[4].oid, want);
	capture(want, sizeof(want), "git -C '%s' rev-parse 'v1.0^{commit}'", dir);
	assert_string_not_equal(gi.refs[4].oid, want);
	capture(want, sizeof(want), "git -C '%s' rev-parse HEAD~2", dir);
	assert_string_equal(gi.refs[3].name, "refs/tags/v0.1");
	assert_string_equal(gi.refs[3].oid, want);
	/* The symbolic branch resolves to its target. */
	assert_string_equal(gi.refs[0].name, "refs/heads/alias");
	assert_string_equal(gi.refs[0].oid, gi.refs[2].oid);
	assert_string_equal(gi.refs[1].name, "refs/heads/feature/x");
	gitrepo_info_clear(&gi);
	assert_null(gi.path);

	/* Other spellings of the same directory give the same canonical path. */
	path_in(alt, sizeof(alt), "proj/");
	inspect_ok(alt, &gi);
	assert_string_equal(gi.path, real);
	gitrepo_info_clear(&gi);
	path_in(alt, sizeof(alt), "proj/sub/../../proj");
	inspect_ok(alt, &gi);
	assert_string_equal(gi.path, real);
	gitrepo_info_clear(&gi);
	path_in(alt, sizeof(alt), "proj-link");
	assert_int_equal(symlink(dir, alt), 0);
	inspect_ok(alt, &gi);
	assert_string_equal(gi.path, real);
	assert_string_equal(gi.name, "proj");
	gitrepo_info_clear(&gi);
	/* The git directory of a work tree resolves to the work tree. */
	path_in(alt, sizeof(alt), "proj/.git");
	inspect_ok(alt, &gi);
	assert_string_equal(gi.path, real);
	gitrepo_info_clear(&gi);
}

static void test_checkout_branch(void **state)
{
	char dir[PATH_MAX];
	struct gitrepo_info gi;
	(void)state;

	path_in(dir, sizeof(dir), "proj-dev");
	make_repo(dir);
	sh("git -C '%s' checkout -q -b dev", dir);
	inspect_ok(dir, &gi);
	assert_string_equal(gi.head, "refs/heads/dev");
	assert_string_equal(gi.name, "proj-dev");
	assert_int_equal(gi.nrefs, 6);
	expect_refs(&gi, dir);
	gitrepo_info_clear(&gi);
}

static void test_detached(void **state)
{
	char dir[PATH_MAX], want[64];
	struct gitrepo_info gi;
	(void)state;

	path_in(dir, sizeof(dir), "proj-detached");
	make_repo(dir);
	sh("git -C '%s' checkout -q --detach HEAD~1", dir);
	inspect_ok(dir, &gi);
	assert_string_equal(gi.head, "");
	capture(want, sizeof(want), "git -C '%s' rev-list --max-parents=0 HEAD", dir);
	assert_string_equal(gi.root_hex, want);
	expect_refs(&gi, dir);
	gitrepo_info_clear(&gi);
}

static void test_bare(void **state)
{
	char dir[PATH_MAX], bare[PATH_MAX], real[PATH_MAX], want[64];
	struct gitrepo_info gi;
	(void)state;

	path_in(dir, sizeof(dir), "proj-src");
	path_in(bare, sizeof(bare), "x.git");
	make_repo(dir);
	sh("git clone -q --bare '%s' '%s'", dir, bare);
	assert_non_null(realpath(bare, real));
	inspect_ok(bare, &gi);
	assert_string_equal(gi.path, real);
	assert_string_equal(gi.name, "x");
	assert_string_equal(gi.head, "refs/heads/main");
	capture(want, sizeof(want), "git -C '%s' rev-list --max-parents=0 HEAD", dir);
	assert_string_equal(gi.root_hex, want);
	expect_refs(&gi, bare);
	gitrepo_info_clear(&gi);

	/* Trailing slash on a bare path. */
	path_in(dir, sizeof(dir), "x.git/");
	inspect_ok(dir, &gi);
	assert_string_equal(gi.path, real);
	assert_string_equal(gi.name, "x");
	gitrepo_info_clear(&gi);
}

static void expect_fail(const char *path, int want_rc, const char *want_msg)
{
	struct gitrepo_info gi;
	char err[256], msg[PATH_MAX + 64];
	int rc;

	memset(&gi, 0xa5, sizeof(gi));
	rc = gitrepo_inspect(path, &gi, err, sizeof(err));
	if (rc != want_rc)
		fail_msg("gitrepo_inspect(%s): %s (want %s): %s", path, me_errname(rc),
			 me_errname(want_rc), err);
	snprintf(msg, sizeof(msg), "%s %s", path, want_msg);
	assert_string_equal(err, msg);
	/* Nothing to free after a failure. */
	assert_null(gi.path);
	assert_null(gi.name);
	assert_null(gi.head);
	assert_null(gi.refs);
	assert_int_equal(gi.nrefs, 0);
}

static void test_empty(void **state)
{
	char dir[PATH_MAX];
	(void)state;

	path_in(dir, sizeof(dir), "empty");
	sh("git init -q -b main '%s'", dir);
	expect_fail(dir, ME_EEMPTY, "has no commits");
	path_in(dir, sizeof(dir), "empty-bare.git");
	sh("git init -q --bare -b main '%s'", dir);
	expect_fail(dir, ME_EEMPTY, "has no commits");
}

static void test_not_repo(void **state)
{
	char dir[PATH_MAX];
	(void)state;

	path_in(dir, sizeof(dir), "plain");
	sh("mkdir -p '%s'", dir);
	expect_fail(dir, ME_ENOTREPO, "is not a git repository");

	path_in(dir, sizeof(dir), "plain/file");
	sh("echo x > '%s'", dir);
	expect_fail(dir, ME_ENOTREPO, "is not a git repository");

	/* Inside a repository is not the repository. */
	path_in(dir, sizeof(dir), "proj-sub");
	make_repo(dir);
	path_in(dir, sizeof(dir), "proj-sub/sub");
	expect_fail(dir, ME_ENOTREPO, "is not a git repository");

	path_in(dir, sizeof(dir), "does-not-exist");
	expect_fail(dir, ME_ENOTREPO, "does not exist");
	path_in(dir, sizeof(dir), "plain/file/below");
	expect_fail(dir, ME_ENOTREPO, "does not exist");
}

/* What gitrepo_read_refs gives, as "name oid" lines like for-each-ref prints them. */
static void refs_text(const struct store_ref *refs, size_t n, char *out, size_t outsz)
{
	size_t off = 0;

	out[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		int k = snprintf(out + off, outsz - off, "%s%s %s", i ? "\n" : "", refs[i].name,
				 refs[i].oid);
		assert_true(k > 0 && (size_t)k < outsz - off);
		off += (size_t)k;
	}
}

/* Reads the refs of path and checks them against git's own listing of dir's branches and
 * tags, and HEAD against want_head. */
static void expect_read_refs(const char *path, const char *dir, const char *want_head)
{
	char want[8192], got[8192], err[256];
	struct store_ref *refs;
	char *head;
	size_t n;
	int rc;

	rc = gitrepo_read_refs(path, &head, &refs, &n, err, sizeof(err));
	if (rc != 0)
		fail_msg("gitrepo_read_refs(%s): %s: %s", path, me_errname(rc), err);
	assert_string_equal(err, "");
	assert_string_equal(head, want_head);
	capture(want, sizeof(want),
		"git -C '%s' for-each-ref --format='%%(refname) %%(objectname)' refs/heads refs/tags",
		dir);
	refs_text(refs, n, got, sizeof(got));
	assert_string_equal(got, want);
	for (size_t i = 1; i < n; i++)
		assert_true(strcmp(refs[i - 1].name, refs[i].name) < 0);
	free(head);
	store_refs_free(refs, n);
}

static void test_read_refs(void **state)
{
	char dir[PATH_MAX], err[256];
	struct gitrepo_info gi;
	struct store_ref *refs;
	char *head;
	size_t n;
	(void)state;

	path_in(dir, sizeof(dir), "proj-refs");
	make_repo(dir);
	/* Refs that are never announced: remote-tracking, notes, stash, other namespaces. */
	sh("cd '%s' && git update-ref refs/remotes/origin/main HEAD && "
	   "git update-ref refs/remotes/origin/feature/y HEAD~1 && "
	   "git notes add -m note HEAD && echo dirty >> a && git stash -q && "
	   "git update-ref refs/pull/1/head HEAD~1 && git update-ref refs/heads-not/x HEAD", dir);
	/* Names whose order differs between bytewise and other collations. */
	sh("cd '%s' && git branch a-b && git branch a/b && git branch B && "
	   "git branch \"$(printf 'caf\\303\\251')\" && git tag Z HEAD~1", dir);
	/* A dangling symbolic branch is skipped. */
	sh("git -C '%s' symbolic-ref refs/heads/dangling refs/heads/nowhere", dir);
	expect_read_refs(dir, dir, "refs/heads/main");

	assert_int_equal(gitrepo_read_refs(dir, &head, &refs, &n, err, sizeof(err)), 0);
	for (size_t i = 0; i < n; i++) {
		assert_true(strncmp(refs[i].name, "refs/heads/", 11) == 0 ||
			    strncmp(refs[i].name, "refs/tags/", 10) == 0);
		assert_string_not_equal(refs[i].name, "refs/heads/dangling");
	}
	assert_string_equal(refs[0].name, "refs/heads/B");
	assert_string_equal(refs[1].name, "refs/heads/a-b");
	assert_string_equal(refs[2].name, "refs/heads/a/b");
	assert_string_equal(refs[3].name, "refs/heads/alias");
	assert_string_equal(refs[4].name, "refs/heads/caf\xc3\xa9");
	/* gitrepo_inspect gives exactly the same head and refs. */
	inspect_ok(dir, &gi);
	assert_string_equal(gi.head, head);
	assert_int_equal(gi.nrefs, n);
	for (size_t i = 0; i < n; i++) {
		assert_string_equal(gi.refs[i].name, refs[i].name);
		assert_string_equal(gi.refs[i].oid, refs[i].oid);
	}
	gitrepo_info_clear(&gi);
	free(head);
	store_refs_free(refs, n);

	/* Packed refs read the same, and a loose ref overrides its packed value. */
	sh("git -C '%s' pack-refs --all", dir);
	sh("cd '%s/.git' && test ! -e refs/heads/main && test ! -e refs/tags/v1.0 && "
	   "grep -q ' refs/heads/main$' packed-refs", dir);
	expect_read_refs(dir, dir, "refs/heads/main");
	sh("git -C '%s' update-ref refs/heads/feature/x HEAD && git -C '%s' tag -d v0.1 >/dev/null",
	   dir, dir);
	expect_read_refs(dir, dir, "refs/heads/main");

	/* A detached HEAD, then an unborn branch: HEAD is "" then the branch; no history is
	 * walked, so a repository without commits is fine. */
	sh("git -C '%s' checkout -q --detach HEAD~1", dir);
	expect_read_refs(dir, dir, "");
	sh("git -C '%s' checkout -q --orphan fresh", dir);
	expect_read_refs(dir, dir, "refs/heads/fresh");
	path_in(dir, sizeof(dir), "refs-empty");
	sh("git init -q -b trunk '%s'", dir);
	assert_int_equal(gitrepo_read_refs(dir, &head, &refs, &n, err, sizeof(err)), 0);
	assert_string_equal(head, "refs/heads/trunk");
	assert_int_equal(n, 0);
	assert_null(refs);
	free(head);
}

static void test_read_refs_layouts(void **state)
{
	char dir[PATH_MAX], bare[PATH_MAX], wt[PATH_MAX], sub[PATH_MAX], real[PATH_MAX];
	char want[PATH_MAX + 32], err[256];
	char *gitdir, *commondir, *head = (char *)1;
	struct store_ref *refs = (struct store_ref *)1;
	size_t n = 7;
	(void)state;

	path_in(dir, sizeof(dir), "proj-layouts");
	make_repo(dir);
	assert_non_null(realpath(dir, real));

	/* A work tree and its git directory. */
	expect_read_refs(dir, dir, "refs/heads/main");
	path_in(sub, sizeof(sub), "proj-layouts/.git");
	expect_read_refs(sub, dir, "refs/heads/main");
	assert_int_equal(gitrepo_dirs(dir, &gitdir, &commondir, err, sizeof(err)), 0);
	snprintf(want, sizeof(want), "%s/.git", real);
	assert_string_equal(gitdir, want);
	assert_string_equal(commondir, want);
	free(gitdir);
	free(commondir);

	/* A bare repository. */
	path_in(bare, sizeof(bare), "layouts.git");
	sh("git clone -q --bare '%s' '%s'", dir, bare);
	expect_read_refs(bare, bare, "refs/heads/main");
	assert_int_equal(gitrepo_dirs(bare, &gitdir, &commondir, err, sizeof(err)), 0);
	assert_non_null(realpath(bare, want));
	assert_string_equal(gitdir, want);
	assert_string_equal(commondir, want);
	free(gitdir);
	free(commondir);

	/* A linked work tree: its own HEAD, the refs of the repository it belongs to. */
	path_in(wt, sizeof(wt), "layouts-wt");
	sh("git -C '%s' worktree add -q -b side '%s' HEAD~1", dir, wt);
	expect_read_refs(wt, dir, "refs/heads/side");
	expect_read_refs(dir, dir, "refs/heads/main");
	assert_int_equal(gitrepo_dirs(wt, &gitdir, &commondir, err, sizeof(err)), 0);
	snprintf(want, sizeof(want), "%s/.git/worktrees/layouts-wt", real);
	assert_string_equal(gitdir, want);
	snprintf(want, sizeof(want), "%s/.git", real);
	assert_string_equal(commondir, want);
	free(gitdir);
	free(commondir);

	/* Not a repository (inside one is not one); outputs are cleared. */
	path_in(sub, sizeof(sub), "proj-layouts/sub");
	assert_int_equal(gitrepo_read_refs(sub, &head, &refs, &n, err, sizeof(err)), ME_ENOTREPO);
	snprintf(want, sizeof(want), "%s is not a git repository", sub);
	assert_string_equal(err, want);
	assert_null(head);
	assert_null(refs);
	assert_int_equal(n, 0);
	path_in(sub, sizeof(sub), "layouts-gone");
	assert_int_equal(gitrepo_read_refs(sub, &head, &refs, &n, err, sizeof(err)), ME_ENOTREPO);
	snprintf(want, sizeof(want), "%s does not exist", sub);
	assert_string_equal(err, want);
	assert_int_equal(gitrepo_dirs(sub, &gitdir, &commondir, err, sizeof(err)), ME_ENOTREPO);
	assert_null(gitdir);
	assert_null(commondir);
	assert_int_equal(gitrepo_read_refs("", &head, &refs, &n, err, sizeof(err)), ME_EINVAL);
	assert_int_equal(gitrepo_read_refs(dir, NULL, &refs, &n, err, sizeof(err)), ME_EINVAL);
	assert_int_equal(gitrepo_dirs(NULL, &gitdir, &commondir, NULL, 0), ME_EINVAL);
}

static void test_bad_args(void **state)
{
	struct gitrepo_info gi;
	char err[64];
	(void)state;

	assert_int_equal(gitrepo_inspect("", &gi, err, sizeof(err)), ME_EINVAL);
	assert_int_equal(gitrepo_inspect(NULL, &gi, err, sizeof(err)), ME_EINVAL);
	assert_int_equal(gitrepo_inspect("/nonexistent/x", &gi, NULL, 0), ME_ENOTREPO);
	/* A short buffer truncates the message safely. */
	assert_int_equal(gitrepo_inspect("/nonexistent/x", &gi, err, 4), ME_ENOTREPO);
	assert_string_equal(err, "/no");
	gitrepo_info_clear(NULL);
}

static int group_setup(void **state)
{
	static const char *const unset[] = {
		"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
		"GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_CEILING_DIRECTORIES",
		"GIT_NAMESPACE", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
	};
	(void)state;

	snprintf(base, sizeof(base), "/tmp/me-test-gitrepo.XXXXXX");
	if (mkdtemp(base) == NULL)
		return -1;
	for (size_t i = 0; i < sizeof(unset) / sizeof(unset[0]); i++)
		unsetenv(unset[i]);
	/* No user or system configuration; fixed identities and dates for stable oids. */
	setenv("HOME", base, 1);
	setenv("XDG_CONFIG_HOME", base, 1);
	git_test_env();
	setenv("LC_ALL", "C", 1);
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
		cmocka_unit_test(test_basic),
		cmocka_unit_test(test_checkout_branch),
		cmocka_unit_test(test_detached),
		cmocka_unit_test(test_bare),
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_not_repo),
		cmocka_unit_test(test_read_refs),
		cmocka_unit_test(test_read_refs_layouts),
		cmocka_unit_test(test_bad_args),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
