/* verify_bundle's parent side against stand-in verifiers (shell scripts given as req.exe): a
 * child that hangs, crashes, grows past the memory limit, answers nothing or garbage, or dies
 * after leaving a temporary directory, a ref lock and a pack in the mirror. The real child
 * (megaengined --verify-bundle) is exercised by tests/integration/test_verify_sandbox.py. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/ids.h"
#include "daemon/gitrepo.h"
#include "daemon/mirror.h"
#include "daemon/verify.h"
#include "tests/unit/gitfixture.h"

static char base[64], root[128], bundle[160], script[160], mpath[PATH_MAX];
static char repo_id[ME_DID_REPO_SIZE];
static struct gmsg_ref ref;
static struct gmsg_refstate rs;
static uint8_t pk[ME_PK_LEN];

static int setup(void **state)
{
	uint8_t oid[ME_OID_LEN];
	(void)state;

	snprintf(base, sizeof(base), "/tmp/me-test-verify-XXXXXX");
	assert_non_null(mkdtemp(base));
	snprintf(root, sizeof(root), "%s/root", base);
	snprintf(bundle, sizeof(bundle), "%s/b.bundle", base);
	snprintf(script, sizeof(script), "%s/verifier.sh", base);
	assert_int_equal(mkdir(root, 0700), 0);
	sh("printf 'not a bundle' > '%s'", bundle);
	memset(oid, 7, sizeof(oid));
	memset(pk, 9, sizeof(pk));
	assert_int_equal(me_did_repo_compute(oid, pk, repo_id, sizeof(repo_id)), 0);
	assert_int_equal(mirror_path(root, repo_id, mpath, sizeof(mpath)), 0);
	ref.name = gmsg_str("refs/heads/main");
	memset(ref.oid, 1, sizeof(ref.oid));
	rs.repo_id = gmsg_str(repo_id);
	rs.seq = 1;
	rs.head = gmsg_str("refs/heads/main");
	rs.refs = &ref;
	rs.nrefs = 1;
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	nftw(base, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
	return 0;
}

/* The stand-in verifier: body is a shell script's text after the shebang. */
__attribute__((format(printf, 1, 2)))
static void stand_in(const char *fmt, ...)
{
	char body[2048];
	va_list ap;
	FILE *f;

	va_start(ap, fmt);
	vsnprintf(body, sizeof(body), fmt, ap);
	va_end(ap);
	assert_non_null(f = fopen(script, "w"));
	fprintf(f, "#!/bin/sh\n%s\n", body);
	fclose(f);
	assert_int_equal(chmod(script, 0700), 0);
}

static int run(struct verify_res *res, uint64_t mem, unsigned wall)
{
	struct verify_req q = {
		.root = root, .bundle_path = bundle, .max_bytes = 1u << 20, .rs = &rs,
		.creator_pk = pk, .check_binding = 1, .exe = script, .mem_limit = mem,
		.cpu_limit_s = 10, .wall_limit_s = wall,
	};
	return verify_bundle(&q, res);
}

static void test_timeout(void **state)
{
	struct verify_res res;
	(void)state;

	stand_in("cat > /dev/null; exec sleep 60");
	assert_int_equal(run(&res, 1ull << 30, 1), ME_ETIMEDOUT);
	assert_string_equal(res.msg, "verifier timed out (1 s)");
	assert_true(res.killed);
}

static void test_crash(void **state)
{
	struct verify_res res;
	(void)state;

	stand_in("cat > /dev/null; kill -SEGV $$");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EINTERNAL);
	assert_string_equal(res.msg, "verifier crashed (signal 11)");
	stand_in("cat > /dev/null; exit 3");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EINTERNAL);
	assert_string_equal(res.msg, "verifier crashed (exit status 3)");
	stand_in("cat > /dev/null; printf 'garbage'");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EINTERNAL);
	assert_string_equal(res.msg, "verifier crashed (exit status 0, no reply)");
	/* a first fetch that fails leaves no mirror */
	assert_int_equal(access(mpath, F_OK), -1);
}

static void test_memory(void **state)
{
	struct verify_res res;
	(void)state;

	/* 200 MiB written (so resident), against a limit of 64 MiB */
	stand_in("cat > /dev/null; exec /usr/bin/python3 -c "
		 "'import time; b = b\"x\" * (200 << 20); time.sleep(60)'");
	assert_int_equal(run(&res, 64u << 20, 50), ME_ETOOBIG);
	assert_string_equal(res.msg, "verifier exceeded its memory limit (64 MiB)");
}

/* The reply of a verifier that accepted the bundle, as megaengined --verify-bundle writes it:
 * [0, "", false, [1, 2, 3, 4, 5, 6, 7]] in one frame. */
static void test_reply(void **state)
{
	struct verify_res res;
	(void)state;

	stand_in("cat > /dev/null; printf '\\000\\000\\000\\014\\224\\000\\240\\302"
		 "\\227\\001\\002\\003\\004\\005\\006\\007'");
	assert_int_equal(run(&res, 1ull << 30, 30), 0);
	assert_false(res.killed);
	assert_string_equal(res.msg, "");
	assert_int_equal(res.st.header_bytes, 1);
	assert_int_equal(res.st.objects, 3);
	assert_int_equal(res.st.refs_deleted, 7);
	/* and a refusal with the binding refuted */
	stand_in("cat > /dev/null; printf '\\000\\000\\000\\016\\224\\364\\242no\\303"
		 "\\227\\000\\000\\000\\000\\000\\000\\000'");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EPERM);
	assert_string_equal(res.msg, "no");
	assert_true(res.refuted);
}

/* A child killed mid-way: its temporary directory, a ref lock and a pack it moved in go; the
 * refs and the packs of before stay. */
static void test_restore(void **state)
{
	git_repository *m = NULL;
	struct verify_res res;
	char before[1024], after[1024];
	(void)state;

	assert_int_equal(mirror_open(root, repo_id, true, &m, NULL, 0), 0);
	git_repository_free(m);
	sh("cd '%s' && mkdir -p objects/pack && touch objects/pack/pack-old.pack "
	   "objects/pack/pack-old.idx && mkdir me-incoming-keep && touch me-incoming-keep/x", mpath);
	/* the incoming directory above stands for one left by a crash before: cleaned too */
	capture(before, sizeof(before), "ls '%s/objects/pack'", mpath);
	stand_in("cat > /dev/null; cd '%s' && mkdir me-incoming-abc && touch me-incoming-abc/p "
		 "HEAD.lock objects/pack/pack-new.pack objects/pack/pack-new.idx && exec sleep 60",
		 mpath);
	assert_int_equal(run(&res, 1ull << 30, 2), ME_ETIMEDOUT);
	capture(after, sizeof(after), "ls '%s/objects/pack'", mpath);
	assert_string_equal(after, before);
	capture(after, sizeof(after), "ls -a '%s' | grep -c -e me-incoming -e '\\.lock$' || true",
		mpath);
	assert_string_equal(after, "0");
	assert_int_equal(access(mpath, F_OK), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_timeout),
		cmocka_unit_test(test_crash),
		cmocka_unit_test(test_memory),
		cmocka_unit_test(test_reply),
		cmocka_unit_test(test_restore),
	};
	int rc;

	signal(SIGPIPE, SIG_IGN);
	gitrepo_global_init();
	rc = cmocka_run_group_tests(tests, setup, teardown);
	gitrepo_global_free();
	return rc;
}
