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
	setenv("GIT_CONFIG_NOSYSTEM", "1", 1);
	setenv("GIT_CONFIG_GLOBAL", "/dev/null", 1);
	setenv("GIT_AUTHOR_NAME", "Test Author", 1);
	setenv("GIT_AUTHOR_EMAIL", "author@example.org", 1);
	setenv("GIT_COMMITTER_NAME", "Test Committer", 1);
	setenv("GIT_COMMITTER_EMAIL", "committer@example.org", 1);
	setenv("GIT_AUTHOR_DATE", "1700000000 +0000", 1);
	setenv("GIT_COMMITTER_DATE", "1700000000 +0000", 1);
	setenv("GIT_TERMINAL_PROMPT", "0", 1);
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
		cmocka_unit_test(test_bad_args),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
