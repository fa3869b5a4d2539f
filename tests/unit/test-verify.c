/* verify_bundle's parent side against stand-in verifiers (shell scripts given as req.exe): a
 * child that hangs, crashes, grows past the memory limit, answers nothing or garbage, dies
 * after leaving a temporary directory, a ref lock and a pack in the mirror, is abandoned, or
 * outlives the wall-clock limit while its bundle still arrives. Then the real child (this
 * binary run as `--verify-bundle`, as megaengined is) following a bundle as it is written,
 * refusing one whose bytes do not match the digest, and abandoned while it waits. Hostile
 * packs for the real child: tests/integration/test_verify_sandbox.py. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/ids.h"
#include "common/sha3.h"
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

	git_test_env();
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

/* verify_bundle on a thread; a flag raised (set to 1) or dropped (to 0) after delay_ms. */
struct bg {
	struct verify_req q;
	struct verify_res res;
	int rc;
	volatile int flag, flag2;
	int flag_to;
	unsigned delay_ms;
	volatile int done;
	pthread_t verifier, setter;
};

static void *bg_verify(void *arg)
{
	struct bg *b = arg;
	b->rc = verify_bundle(&b->q, &b->res);
	b->done = 1;
	return NULL;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0)
		;
}

static void *bg_flag(void *arg)
{
	struct bg *b = arg;
	sleep_ms(b->delay_ms);
	b->flag = b->flag_to;
	return NULL;
}

static void bg_start(struct bg *b, int flag_from, int flag_to, unsigned delay_ms)
{
	b->flag = flag_from;
	b->flag_to = flag_to;
	b->delay_ms = delay_ms;
	assert_int_equal(pthread_create(&b->verifier, NULL, bg_verify, b), 0);
	assert_int_equal(pthread_create(&b->setter, NULL, bg_flag, b), 0);
}

static int bg_join(struct bg *b)
{
	pthread_join(b->setter, NULL);
	pthread_join(b->verifier, NULL);
	return b->rc;
}

/* The transfer failed: the child is stopped at once, the bundle refused as canceled. */
static void test_abort(void **state)
{
	struct bg b = { .q = { .root = root, .bundle_path = bundle, .max_bytes = 1u << 20,
			       .rs = &rs, .creator_pk = pk, .exe = script, .cpu_limit_s = 10,
			       .wall_limit_s = 50 } };
	time_t t0 = time(NULL);
	(void)state;

	stand_in("exec sleep 60");
	b.q.abort = &b.flag;
	bg_start(&b, 0, 1, 300);
	assert_int_equal(bg_join(&b), ME_ECANCELED);
	assert_string_equal(b.res.msg, "verifier stopped: the transfer failed");
	assert_true(b.res.killed);
	assert_true(time(NULL) - t0 < 20);
}

/* The wall-clock limit counts from the bundle's last byte: a child that takes longer than the
 * limit while the bundle still arrives is not killed for it. */
static void test_arriving(void **state)
{
	struct bg b = { .q = { .root = root, .bundle_path = bundle, .max_bytes = 1u << 20,
			       .rs = &rs, .creator_pk = pk, .exe = script, .cpu_limit_s = 10,
			       .wall_limit_s = 1 } };
	(void)state;

	stand_in("sleep 2; exit 3");
	b.q.arriving = &b.flag;
	bg_start(&b, 1, 0, 2500);
	assert_int_equal(bg_join(&b), ME_EINTERNAL);
	assert_string_equal(b.res.msg, "verifier crashed (exit status 3)");
	/* the same child once the bundle is complete: over the limit */
	b.flag = 0;
	assert_int_equal(verify_bundle(&b.q, &b.res), ME_ETIMEDOUT);
}

/* ---- the real child ---- */

struct real {
	char src[160], file[160], root[160];
	struct gitrepo_info gi;
	struct gmsg_ref refs[16];
	struct gmsg_refstate rs;
	uint8_t *data;
	size_t len;
	uint8_t digest[ME_SHA3_256_LEN];
	uint8_t pk[ME_PK_LEN];
	char id[ME_DID_REPO_SIZE];
};

/* A repository with two branches and a tag, its complete bundle in memory, and a state. */
static void real_setup(struct real *r, const char *name)
{
	git_repository *g;
	char err[256];
	struct bundle_stats st;
	int fd;
	FILE *f;

	memset(r, 0, sizeof(*r));
	snprintf(r->src, sizeof(r->src), "%s/%s-src", base, name);
	snprintf(r->file, sizeof(r->file), "%s/%s.bundle", base, name);
	snprintf(r->root, sizeof(r->root), "%s/%s-root", base, name);
	assert_int_equal(mkdir(r->root, 0700), 0);
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && for i in $(seq 1 40); do "
	   "seq $i 3000 > f; echo $i > g$((i %% 4)); git add -A; git commit -q -m c$i; done && "
	   "git branch side HEAD~7 && git tag -a v1 -m one HEAD~3", r->src, r->src);
	assert_int_equal(gitrepo_inspect(r->src, &r->gi, err, sizeof(err)), 0);
	assert_true(r->gi.nrefs <= 16);
	for (size_t i = 0; i < r->gi.nrefs; i++) {
		git_oid o;
		r->refs[i].name = gmsg_str(r->gi.refs[i].name);
		assert_int_equal(git_oid_fromstr(&o, r->gi.refs[i].oid), 0);
		memcpy(r->refs[i].oid, o.id, ME_OID_LEN);
	}
	memset(r->pk, 3, sizeof(r->pk));
	assert_int_equal(me_did_repo_compute(r->gi.root_oid, r->pk, r->id, sizeof(r->id)), 0);
	r->rs.repo_id = gmsg_str(r->id);
	r->rs.seq = 1;
	r->rs.head = gmsg_str(r->gi.head);
	r->rs.refs = r->refs;
	r->rs.nrefs = r->gi.nrefs;
	assert_int_equal(git_repository_open(&g, r->src), 0);
	assert_true((fd = open(r->file, O_WRONLY | O_CREAT | O_TRUNC, 0600)) >= 0);
	assert_int_equal(bundle_write(g, r->refs, r->gi.nrefs, NULL, 0, fd, &st, err,
				      sizeof(err)), 0);
	close(fd);
	git_repository_free(g);
	assert_non_null(f = fopen(r->file, "rb"));
	fseek(f, 0, SEEK_END);
	r->len = (size_t)ftell(f);
	rewind(f);
	assert_non_null(r->data = malloc(r->len));
	assert_int_equal(fread(r->data, 1, r->len, f), r->len);
	fclose(f);
	assert_int_equal(me_sha3_256_2(r->data, r->len, NULL, 0, r->digest), 0);
	assert_true(r->len > 4096);
}

static void real_clear(struct real *r)
{
	gitrepo_info_clear(&r->gi);
	free(r->data);
}

static void write_part(const char *path, const uint8_t *p, size_t n, const char *mode)
{
	FILE *f;
	assert_non_null(f = fopen(path, mode));
	assert_int_equal(fwrite(p, 1, n, f), n);
	assert_int_equal(fclose(f), 0);
}

static void real_req(struct real *r, struct bg *b)
{
	memset(b, 0, sizeof(*b));
	b->q.root = r->root;
	b->q.bundle_path = r->file;
	b->q.max_bytes = 1u << 30;
	b->q.rs = &r->rs;
	b->q.creator_pk = r->pk;
	b->q.check_binding = 1;
	b->q.digest = r->digest;
	b->q.size = r->len;
}

/* Started on the first 40 % of the bundle, the child waits for the rest, then applies it. */
static void test_follow(void **state)
{
	struct real r;
	struct bg b;
	char m[PATH_MAX], want[4096], got[4096];
	(void)state;

	real_setup(&r, "follow");
	write_part(r.file, r.data, r.len * 2 / 5, "wb");
	real_req(&r, &b);
	b.q.arriving = &b.flag;
	bg_start(&b, 1, 1, 0);
	sleep_ms(700);
	assert_false(b.done); /* still waiting for the rest */
	write_part(r.file, r.data + r.len * 2 / 5, r.len - r.len * 2 / 5, "ab");
	b.flag = 0;
	if (bg_join(&b) != 0)
		fail_msg("verify: %s", b.res.msg);
	assert_int_equal(b.res.st.refs, r.gi.nrefs);
	assert_int_equal(mirror_path(r.root, r.id, m, sizeof(m)), 0);
	capture(want, sizeof(want), "git -C '%s' for-each-ref refs/heads refs/tags", r.src);
	capture(got, sizeof(got), "git -C '%s' for-each-ref refs/heads refs/tags", m);
	assert_string_equal(got, want);
	sh("git -C '%s' fsck --strict --no-progress >/dev/null 2>&1", m);
	real_clear(&r);
}

/* Bytes that are not the announced ones: refused before anything changes, on a first fetch
 * (no mirror left) and on a mirror that holds the repository (refs and packs as they were). A
 * damaged pack whose digest is announced as such goes through to the pack check. */
static void test_follow_digest(void **state)
{
	struct real r;
	struct bg b;
	char m[PATH_MAX], before[4096], after[4096];
	(void)state;

	real_setup(&r, "digest");
	write_part(r.file, r.data, r.len, "wb");
	real_req(&r, &b);
	assert_int_equal(mirror_path(r.root, r.id, m, sizeof(m)), 0);
	r.digest[0] ^= 1;
	assert_int_equal(verify_bundle(&b.q, &b.res), ME_EPROTO);
	assert_string_equal(b.res.msg, "bundle digest mismatch");
	assert_int_equal(access(m, F_OK), -1);
	r.digest[0] ^= 1;
	if (verify_bundle(&b.q, &b.res) != 0) /* honest: the mirror now holds it */
		fail_msg("verify: %s", b.res.msg);
	capture(before, sizeof(before), "cd '%s' && git for-each-ref && ls objects/pack", m);

	r.digest[0] ^= 1;
	assert_int_equal(verify_bundle(&b.q, &b.res), ME_EPROTO);
	assert_string_equal(b.res.msg, "bundle digest mismatch");
	capture(after, sizeof(after), "cd '%s' && git for-each-ref && ls objects/pack", m);
	assert_string_equal(after, before);

	r.digest[0] ^= 1;
	r.data[r.len - 30] ^= 0x40;
	write_part(r.file, r.data, r.len, "wb");
	assert_int_equal(me_sha3_256_2(r.data, r.len, NULL, 0, r.digest), 0);
	assert_int_equal(verify_bundle(&b.q, &b.res), ME_EPROTO);
	assert_null(strstr(b.res.msg, "digest"));
	capture(after, sizeof(after), "cd '%s' && git for-each-ref && ls objects/pack", m);
	assert_string_equal(after, before);
	real_clear(&r);
}

/* The transfer fails while the child waits for data: stopped, nothing left behind. */
static void test_follow_abort(void **state)
{
	struct real r;
	struct bg b;
	char m[PATH_MAX];
	(void)state;

	real_setup(&r, "abort");
	write_part(r.file, r.data, r.len / 2, "wb");
	real_req(&r, &b);
	b.q.abort = &b.flag;
	bg_start(&b, 0, 1, 500);
	assert_int_equal(bg_join(&b), ME_ECANCELED);
	assert_int_equal(mirror_path(r.root, r.id, m, sizeof(m)), 0);
	assert_int_equal(access(m, F_OK), -1);
	real_clear(&r);
}

static void test_timeout(void **state)
{
	struct verify_res res;
	(void)state;

	stand_in("exec sleep 60");
	assert_int_equal(run(&res, 1ull << 30, 1), ME_ETIMEDOUT);
	assert_string_equal(res.msg, "verifier timed out (1 s)");
	assert_true(res.killed);
}

static void test_crash(void **state)
{
	struct verify_res res;
	(void)state;

	stand_in("kill -SEGV $$");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EINTERNAL);
	assert_string_equal(res.msg, "verifier crashed (signal 11)");
	stand_in("exit 3");
	assert_int_equal(run(&res, 1ull << 30, 30), ME_EINTERNAL);
	assert_string_equal(res.msg, "verifier crashed (exit status 3)");
	stand_in("printf 'garbage'");
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
	stand_in("exec /usr/bin/python3 -c "
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

	stand_in("printf '\\000\\000\\000\\014\\224\\000\\240\\302"
		 "\\227\\001\\002\\003\\004\\005\\006\\007'");
	assert_int_equal(run(&res, 1ull << 30, 30), 0);
	assert_false(res.killed);
	assert_string_equal(res.msg, "");
	assert_int_equal(res.st.header_bytes, 1);
	assert_int_equal(res.st.objects, 3);
	assert_int_equal(res.st.refs_deleted, 7);
	/* and a refusal with the binding refuted */
	stand_in("printf '\\000\\000\\000\\016\\224\\364\\242no\\303"
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
	stand_in("cd '%s' && mkdir me-incoming-abc && touch me-incoming-abc/p "
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


/* A bundle that is all there is still not applied before its transfer has ended well (the
 * daemon checked the Done frame): however fast the check, the mirror waits. If the transfer
 * fails instead, nothing is applied. */
static void test_follow_go(void **state)
{
	struct real r;
	struct bg b;
	char m[PATH_MAX], refs[4096];
	(void)state;

	real_setup(&r, "go");
	write_part(r.file, r.data, r.len, "wb");
	assert_int_equal(mirror_path(r.root, r.id, m, sizeof(m)), 0);
	real_req(&r, &b);
	b.q.arriving = &b.flag;
	bg_start(&b, 1, 0, 2500);
	sleep_ms(1500);
	assert_false(b.done);
	capture(refs, sizeof(refs), "git -C '%s' for-each-ref 2>/dev/null | wc -l", m);
	assert_string_equal(refs, "0");
	if (bg_join(&b) != 0)
		fail_msg("verify: %s", b.res.msg);
	capture(refs, sizeof(refs), "git -C '%s' for-each-ref | wc -l", m);
	assert_int_equal(atoi(refs), (int)r.gi.nrefs);
	real_clear(&r);

	real_setup(&r, "nogo");
	write_part(r.file, r.data, r.len, "wb");
	assert_int_equal(mirror_path(r.root, r.id, m, sizeof(m)), 0);
	real_req(&r, &b);
	b.q.arriving = &b.flag;
	b.q.abort = &b.flag2;
	b.flag = 1;
	assert_int_equal(pthread_create(&b.verifier, NULL, bg_verify, &b), 0);
	sleep_ms(1500);
	b.flag2 = 1; /* the transfer failed: abort, then no longer arriving */
	b.flag = 0;
	pthread_join(b.verifier, NULL);
	assert_int_equal(b.rc, ME_ECANCELED);
	assert_int_equal(access(m, F_OK), -1);
	real_clear(&r);
}

/* Processes running `--verify-bundle` with path open. */
static int verifiers_with(const char *path)
{
	DIR *d = opendir("/proc");
	struct dirent *de;
	int n = 0;

	assert_non_null(d);
	while ((de = readdir(d)) != NULL) {
		char p[300], cmd[512] = "", link[PATH_MAX];
		FILE *f;
		size_t len;
		if (de->d_name[0] < '0' || de->d_name[0] > '9')
			continue;
		snprintf(p, sizeof(p), "/proc/%s/cmdline", de->d_name);
		if ((f = fopen(p, "rb")) == NULL)
			continue;
		len = fread(cmd, 1, sizeof(cmd) - 1, f);
		fclose(f);
		for (size_t i = 0; i < len; i++)
			if (cmd[i] == '\0')
				cmd[i] = ' ';
		if (strstr(cmd, VERIFY_ARG) == NULL)
			continue;
		for (int fd = 0; fd < 16; fd++) {
			ssize_t k;
			snprintf(p, sizeof(p), "/proc/%s/fd/%d", de->d_name, fd);
			if ((k = readlink(p, link, sizeof(link) - 1)) > 0) {
				link[k] = '\0';
				if (strcmp(link, path) == 0)
					n++;
			}
		}
	}
	closedir(d);
	return n;
}

/* A verifier whose daemon died while it was being loaded (before it could ask for the
 * parent-death signal) does not wait for a bundle that will never come: the end of its
 * request pipe tells it. The stand-in starts the real child detached (a subshell in between,
 * gone at once) and exits. */
static void test_orphan(void **state)
{
	struct real r;
	struct bg b;
	char self[PATH_MAX];
	ssize_t k;
	int n = 0;
	(void)state;

	real_setup(&r, "orphan");
	write_part(r.file, r.data, r.len / 2, "wb");
	assert_true((k = readlink("/proc/self/exe", self, sizeof(self) - 1)) > 0);
	self[k] = '\0';
	stand_in("exec 3<&0; ( '%s' " VERIFY_ARG " 0<&3 & ); sleep 1; exit 0", self);
	real_req(&r, &b);
	b.q.exe = script;
	assert_int_equal(verify_bundle(&b.q, &b.res), ME_EINTERNAL); /* no reply: the stand-in */
	for (int i = 0; i < 100 && (n = verifiers_with(r.file)) > 0; i++)
		sleep_ms(100);
	assert_int_equal(n, 0);
	real_clear(&r);
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_timeout),
		cmocka_unit_test(test_crash),
		cmocka_unit_test(test_memory),
		cmocka_unit_test(test_reply),
		cmocka_unit_test(test_restore),
		cmocka_unit_test(test_abort),
		cmocka_unit_test(test_arriving),
		cmocka_unit_test(test_follow),
		cmocka_unit_test(test_follow_digest),
		cmocka_unit_test(test_follow_abort),
		cmocka_unit_test(test_follow_go),
		cmocka_unit_test(test_orphan),
	};
	int rc;

	/* Run as the verifier child (verify_bundle execs /proc/self/exe --verify-bundle). */
	if (argc == 2 && strcmp(argv[1], VERIFY_ARG) == 0)
		return verify_main(argc, argv);

	signal(SIGPIPE, SIG_IGN);
	gitrepo_global_init();
	rc = cmocka_run_group_tests(tests, setup, teardown);
	gitrepo_global_free();
	return rc;
}
