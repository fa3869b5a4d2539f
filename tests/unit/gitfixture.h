/* Helpers shared by the unit tests that build real repositories with the git CLI: run a shell
 * command, capture its output, and remove a temporary tree (nftw callback). Include after
 * <cmocka.h>. Paths passed in commands are the tests' own mkdtemp names: no quoting issues. */
#ifndef ME_TEST_GITFIXTURE_H
#define ME_TEST_GITFIXTURE_H

#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb;
	(void)type;
	(void)ftw;
	return remove(p);
}

/* A git CLI that reads no system or user configuration and commits with a fixed identity and
 * date, whatever machine the tests run on. */
__attribute__((unused))
static void git_test_env(void)
{
	setenv("GIT_CONFIG_NOSYSTEM", "1", 1);
	setenv("GIT_CONFIG_GLOBAL", "/dev/null", 1);
	setenv("GIT_AUTHOR_NAME", "Test Author", 1);
	setenv("GIT_AUTHOR_EMAIL", "author@example.org", 1);
	setenv("GIT_COMMITTER_NAME", "Test Committer", 1);
	setenv("GIT_COMMITTER_EMAIL", "committer@example.org", 1);
	setenv("GIT_AUTHOR_DATE", "1700000000 +0000", 1);
	setenv("GIT_COMMITTER_DATE", "1700000000 +0000", 1);
	setenv("GIT_TERMINAL_PROMPT", "0", 1);
}

/* Runs a shell command; the test fails unless it exits 0. */
__attribute__((format(printf, 1, 2)))
static void sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int n, st;

	va_start(ap, fmt);
	n = vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	assert_true(n > 0 && (size_t)n < sizeof(cmd));
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail_msg("command failed (%d): %s", st, cmd);
}

/* Runs a command and returns its standard output without the final newline. */
__attribute__((format(printf, 3, 4), unused))
static void capture(char *out, size_t outsz, const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	FILE *p;
	size_t len;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	assert_non_null(p = popen(cmd, "r"));
	len = fread(out, 1, outsz - 1, p);
	out[len] = '\0';
	assert_int_equal(pclose(p), 0);
	assert_true(len < outsz - 1);
	while (len > 0 && out[len - 1] == '\n')
		out[--len] = '\0';
}

#endif
