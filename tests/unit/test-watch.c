/* The watcher on a real loop: real git repositories changed with the git CLI, a real store and
 * key. Every wait is bounded (WAIT_MS): a change that is never noticed fails the test. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "common/ids.h"
#include "common/keys.h"
#include "daemon/gitrepo.h"
#include "daemon/node.h"
#include "daemon/store.h"
#include "daemon/watch.h"
#include "tests/unit/gitfixture.h"

#define WAIT_MS 5000  /* generous: events come within milliseconds */
#define DRAIN_MS 300  /* lets pending events be handled before checking nothing happened */
#define TEXT_MAX 65536 /* "name oid" lines of every ref of a test repository */

struct fx {
	char base[64];
	char root[PATH_MAX];
	uv_loop_t loop;
	uv_timer_t timer;
	int timed_out;
	struct node node;
	struct watch *w;
	int ncalls;
	char last_id[ME_DID_REPO_SIZE + 8];
};

static void on_changed(void *ud, const char *repo_id)
{
	struct fx *fx = ud;

	fx->ncalls++;
	snprintf(fx->last_id, sizeof(fx->last_id), "%s", repo_id);
}

static void path_in(const struct fx *fx, char *out, size_t outsz, const char *name)
{
	int n = snprintf(out, outsz, "%s/%s", fx->base, name);

	assert_true(n > 0 && (size_t)n < outsz);
}

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof(*fx));
	char err[256];
	int created;

	assert_non_null(fx);
	snprintf(fx->base, sizeof(fx->base), "/tmp/me-test-watch.XXXXXX");
	assert_non_null(mkdtemp(fx->base));
	path_in(fx, fx->root, sizeof(fx->root), "root");
	assert_int_equal(me_keypair_init(fx->root, &fx->node.kp, &created), 0);
	fx->node.has_key = 1;
	if (store_open(fx->root, &fx->node.store) != 0)
		fail_msg("store_open: %s", store_errmsg(fx->node.store));
	assert_int_equal(uv_loop_init(&fx->loop), 0);
	assert_int_equal(uv_timer_init(&fx->loop, &fx->timer), 0);
	fx->timer.data = fx;
	assert_int_equal(watch_init(&fx->w, &fx->loop, &fx->node, on_changed, fx, err,
				    sizeof(err)), 0);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fx *fx = *state;

	watch_free(fx->w);
	uv_close((uv_handle_t *)&fx->timer, NULL);
	uv_run(&fx->loop, UV_RUN_DEFAULT); /* close callbacks release the watcher's memory */
	assert_int_equal(uv_loop_close(&fx->loop), 0);
	store_free(fx->node.store);
	me_keypair_wipe(&fx->node.kp);
	nftw(fx->base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	free(fx);
	return 0;
}

static void on_timeout(uv_timer_t *t)
{
	struct fx *fx = t->data;

	fx->timed_out = 1;
}

/* Starts the bounding timer from now (the loop's clock is stale after work done outside it). */
static void timer_arm(struct fx *fx, unsigned ms)
{
	fx->timed_out = 0;
	uv_update_time(&fx->loop);
	uv_timer_start(&fx->timer, on_timeout, ms, 0);
}

/* Runs the loop for ms. */
static void run_for(struct fx *fx, unsigned ms)
{
	timer_arm(fx, ms);
	while (!fx->timed_out)
		uv_run(&fx->loop, UV_RUN_ONCE);
}

/* "name oid" lines of what the store holds for id, and its head. */
static void stored_text(struct fx *fx, const char *id, char *refs_out, size_t refsz,
			char *head_out, size_t headsz, int64_t *seq)
{
	struct store_repo r;
	struct store_ref *refs;
	size_t n, off = 0;

	assert_int_equal(store_repo_get(fx->node.store, id, &r), 0);
	snprintf(head_out, headsz, "%s", r.head);
	*seq = r.ref_seq;
	store_repo_clear(&r);
	assert_int_equal(store_refs_get(fx->node.store, id, &refs, &n), 0);
	refs_out[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		int k = snprintf(refs_out + off, refsz - off, "%s%s %s", i ? "\n" : "", refs[i].name,
				 refs[i].oid);
		assert_true(k > 0 && (size_t)k < refsz - off);
		off += (size_t)k;
	}
	store_refs_free(refs, n);
}

/* What git says the branches, tags and HEAD of dir are. */
static void git_text(const char *dir, char *refs_out, size_t refsz, char *head_out, size_t headsz)
{
	capture(refs_out, refsz,
		"git -C '%s' for-each-ref --format='%%(refname) %%(objectname)' refs/heads refs/tags",
		dir);
	capture(head_out, headsz, "git -C '%s' symbolic-ref -q HEAD || true", dir);
}

/* Checks that the stored state of id is signed by the node key; returns its seq. */
static int64_t verify_signed(struct fx *fx, const char *id)
{
	struct store_repo r;
	struct store_ref *refs;
	struct gmsg_ref *grefs;
	size_t n;
	int64_t seq;

	assert_int_equal(store_repo_get(fx->node.store, id, &r), 0);
	assert_int_equal(store_refs_get(fx->node.store, id, &refs, &n), 0);
	assert_non_null(grefs = calloc(n + 1, sizeof(*grefs)));
	assert_int_equal(r.has_ref_sig, 1);
	struct gmsg_refstate rs = { .repo_id = gmsg_str(id), .seq = (uint64_t)r.ref_seq,
				    .head = gmsg_str(r.head), .refs = grefs, .nrefs = n };
	for (size_t i = 0; i < n; i++) {
		grefs[i].name = gmsg_str(refs[i].name);
		for (size_t j = 0; j < ME_OID_LEN; j++) {
			unsigned v;
			assert_int_equal(sscanf(refs[i].oid + 2 * j, "%2x", &v), 1);
			grefs[i].oid[j] = (uint8_t)v;
		}
	}
	memcpy(rs.sig, r.ref_sig, ME_SIG_LEN);
	assert_int_equal(gmsg_refstate_verify(&rs, fx->node.kp.pk), 0);
	/* Any other content does not verify with that signature. */
	rs.seq++;
	assert_int_equal(gmsg_refstate_verify(&rs, fx->node.kp.pk), ME_EPERM);
	seq = r.ref_seq;
	free(grefs);
	store_refs_free(refs, n);
	store_repo_clear(&r);
	return seq;
}

/* Waits (bounded) until changed was called for id (more than calls times in all) and the
 * stored state of id equals what git shows in dir; then checks the signature and that seq grew
 * past *seq (updated). */
static void wait_synced_since(struct fx *fx, const char *id, const char *dir, int64_t *seq,
			      int calls)
{
	char want_refs[TEXT_MAX], want_head[256], got_refs[TEXT_MAX], got_head[256];
	int64_t got_seq = 0;

	git_text(dir, want_refs, sizeof(want_refs), want_head, sizeof(want_head));
	timer_arm(fx, WAIT_MS);
	for (;;) {
		stored_text(fx, id, got_refs, sizeof(got_refs), got_head, sizeof(got_head),
			    &got_seq);
		if (fx->ncalls > calls && strcmp(got_refs, want_refs) == 0 &&
		    strcmp(got_head, want_head) == 0)
			break;
		if (fx->timed_out)
			fail_msg("no new ref state within %d ms (%d calls); stored HEAD '%s' refs\n%s\n"
				 "git HEAD '%s' refs\n%s", WAIT_MS, fx->ncalls - calls, got_head,
				 got_refs, want_head, want_refs);
		uv_run(&fx->loop, UV_RUN_ONCE);
	}
	uv_timer_stop(&fx->timer);
	assert_string_equal(fx->last_id, id);
	assert_true(verify_signed(fx, id) == got_seq);
	assert_true(got_seq > *seq);
	*seq = got_seq;
}

static void wait_synced(struct fx *fx, const char *id, const char *dir, int64_t *seq)
{
	wait_synced_since(fx, id, dir, seq, fx->ncalls);
}

/* Lets pending events be handled and checks that no new state was signed. */
static void expect_quiet(struct fx *fx, const char *id, int64_t seq)
{
	char refs[TEXT_MAX], head[256];
	int calls = fx->ncalls;
	int64_t got;

	run_for(fx, DRAIN_MS);
	assert_int_equal(fx->ncalls, calls);
	stored_text(fx, id, refs, sizeof(refs), head, sizeof(head), &got);
	assert_true(got == seq);
}

/* Stores the repository at dir like `mectl repo add` does. */
static void store_local(struct fx *fx, const char *dir, char *id, size_t idsz)
{
	struct gitrepo_info gi;
	struct store_repo r;
	char err[256];

	if (gitrepo_inspect(dir, &gi, err, sizeof(err)) != 0)
		fail_msg("gitrepo_inspect(%s): %s", dir, err);
	assert_int_equal(me_did_repo_compute(gi.root_oid, fx->node.kp.pk, id, idsz), 0);
	memset(&r, 0, sizeof(r));
	r.id = id;
	r.name = gi.name;
	r.creator = fx->node.kp.did;
	r.description = "";
	r.path = gi.path;
	r.root_commit = gi.root_hex;
	r.head = gi.head;
	assert_int_equal(store_repo_add(fx->node.store, &r, gi.refs, gi.nrefs), 0);
	gitrepo_info_clear(&gi);
}

/* Stores the repository at dir, then watches it. */
static void add_local(struct fx *fx, const char *dir, char *id, size_t idsz)
{
	struct store_repo r;

	store_local(fx, dir, id, idsz);
	assert_int_equal(store_repo_get(fx->node.store, id, &r), 0);
	/* Nothing changed since the repository was inspected: no new state. */
	assert_int_equal(watch_add(fx->w, id, r.path), 0);
	assert_int_equal(watch_refresh(fx->w, id), 0);
	assert_int_equal(fx->ncalls, 0);
	store_repo_clear(&r);
}

/* Two commits; the first one's content is dir, so each repository has its own root. */
static void make_repo(const char *dir)
{
	sh("git init -q -b main '%s' && cd '%s' && echo '%s' > a && git add a && "
	   "git commit -q -m one && echo two >> a && git commit -q -am two", dir, dir, dir);
}

static void test_events(void **state)
{
	struct fx *fx = *state;
	char dir[PATH_MAX], bak[PATH_MAX], id[ME_DID_REPO_SIZE];
	int64_t seq = 0;

	path_in(fx, dir, sizeof(dir), "work");
	make_repo(dir);
	add_local(fx, dir, id, sizeof(id));

	/* A commit. */
	sh("cd '%s' && echo three >> a && git commit -q -am three", dir);
	wait_synced(fx, id, dir, &seq);

	/* A branch in a new nested directory, then a change seen only by that directory's
	 * watcher (the periodic check is slower than WAIT_MS). */
	sh("git -C '%s' branch feature/x HEAD~1", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' update-ref refs/heads/feature/x HEAD~2", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' branch deep/er/still/y HEAD", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' update-ref refs/heads/deep/er/still/y HEAD~1", dir);
	wait_synced(fx, id, dir, &seq);

	/* Tags: lightweight and annotated (the tag object's oid). */
	sh("git -C '%s' tag v1 HEAD~1 && git -C '%s' tag -a v2 -m 'release 2'", dir, dir);
	wait_synced(fx, id, dir, &seq);

	/* Deleting a branch. */
	sh("git -C '%s' branch -q -D feature/x", dir);
	wait_synced(fx, id, dir, &seq);

	/* Packing changes no ref: no new state. Then changes of packed refs: a deletion that
	 * only rewrites packed-refs, a loose update over a packed ref. */
	sh("git -C '%s' pack-refs --all && test ! -e '%s/.git/refs/tags/v1'", dir, dir);
	expect_quiet(fx, id, seq);
	assert_int_equal(watch_refresh(fx->w, id), 0);
	sh("git -C '%s' tag -d v1 >/dev/null", dir);
	wait_synced(fx, id, dir, &seq);
	sh("cd '%s' && echo four >> a && git commit -q -am four", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' pack-refs --all && git -C '%s' update-ref refs/heads/deep/er/still/y HEAD",
	   dir, dir);
	wait_synced(fx, id, dir, &seq);

	/* HEAD switched to a new branch, to an existing one, then detached. */
	sh("git -C '%s' checkout -q -b dev", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' checkout -q main", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' checkout -q --detach HEAD~1", dir);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' checkout -q main", dir);
	wait_synced(fx, id, dir, &seq);

	/* Another tool rewrites packed-refs alone (no loose ref or lock is touched). */
	sh("cd '%s/.git' && git pack-refs --all && test ! -e refs/heads/dev", dir);
	expect_quiet(fx, id, seq);
	sh("cd '%s/.git' && o=$(git rev-parse HEAD~1) && "
	   "sed \"s|^[0-9a-f]* refs/heads/dev$|$o refs/heads/dev|\" packed-refs > packed-refs.new && "
	   "mv packed-refs.new packed-refs && test \"$(git rev-parse dev)\" = \"$o\"", dir);
	wait_synced(fx, id, dir, &seq);

	/* Remote-tracking refs, notes and stash never make a state. */
	sh("git -C '%s' update-ref refs/remotes/origin/x HEAD && "
	   "git -C '%s' update-ref refs/remotes/origin/deep/y HEAD~1 && "
	   "git -C '%s' notes add -m n HEAD && cd '%s' && echo dirty >> a && git stash -q",
	   dir, dir, dir, dir);
	expect_quiet(fx, id, seq);
	assert_int_equal(watch_refresh(fx->w, id), 0);

	/* The working repository vanishes: errors, the last state is kept. */
	sh("cp -a '%s' '%s.bak' && rm -rf '%s'", dir, dir, dir);
	expect_quiet(fx, id, seq);
	assert_int_equal(watch_refresh(fx->w, id), ME_ENOTREPO);
	assert_int_equal(watch_refresh(fx->w, id), ME_ENOTREPO);
	expect_quiet(fx, id, seq);
	/* It comes back changed: found again, and watched again. */
	path_in(fx, bak, sizeof(bak), "work.bak");
	sh("mv '%s' '%s' && cd '%s' && echo five >> a && git commit -q -am five", bak, dir, dir);
	int calls = fx->ncalls;
	assert_int_equal(watch_refresh(fx->w, id), 1);
	assert_int_equal(fx->ncalls, calls + 1);
	wait_synced_since(fx, id, dir, &seq, calls); /* already there */
	sh("git -C '%s' branch again", dir);
	wait_synced(fx, id, dir, &seq);

	/* Not watched any more. */
	watch_remove(fx->w, id);
	watch_remove(fx->w, id);
	sh("git -C '%s' branch after-remove", dir);
	expect_quiet(fx, id, seq);
	assert_int_equal(watch_refresh(fx->w, id), ME_ENOTFOUND);
}

static void test_worktree(void **state)
{
	struct fx *fx = *state;
	char dir[PATH_MAX], wt[PATH_MAX], id[ME_DID_REPO_SIZE];
	int64_t seq = 0;

	path_in(fx, dir, sizeof(dir), "main");
	path_in(fx, wt, sizeof(wt), "linked");
	make_repo(dir);
	sh("git -C '%s' worktree add -q -b side '%s' HEAD~1", dir, wt);
	add_local(fx, wt, id, sizeof(id));

	/* A commit in the linked work tree moves its branch in the common directory. */
	sh("cd '%s' && echo w >> a && git commit -q -am in-worktree", wt);
	wait_synced(fx, id, wt, &seq);
	/* Its own HEAD. */
	sh("git -C '%s' checkout -q -b side2", wt);
	wait_synced(fx, id, wt, &seq);
	/* The main work tree shares the refs. */
	sh("cd '%s' && echo m >> a && git commit -q -am in-main", dir);
	wait_synced(fx, id, wt, &seq);
	/* The main work tree's HEAD is not the linked one's. */
	sh("git -C '%s' checkout -q --detach", dir);
	expect_quiet(fx, id, seq);
}

static void test_bare(void **state)
{
	struct fx *fx = *state;
	char src[PATH_MAX], bare[PATH_MAX], id[ME_DID_REPO_SIZE];
	int64_t seq = 0;

	path_in(fx, src, sizeof(src), "src");
	path_in(fx, bare, sizeof(bare), "pub.git");
	make_repo(src);
	sh("git clone -q --bare '%s' '%s'", src, bare);
	add_local(fx, bare, id, sizeof(id));

	sh("cd '%s' && echo p >> a && git commit -q -am pushed && git push -q '%s' main "
	   "main:refs/heads/topic/t main~1:refs/heads/topic/u 2>/dev/null", src, bare);
	wait_synced(fx, id, bare, &seq);
	sh("git -C '%s' symbolic-ref HEAD refs/heads/topic/t", bare);
	wait_synced(fx, id, bare, &seq);
	sh("git -C '%s' push -q --delete '%s' topic/u 2>/dev/null", src, bare);
	wait_synced(fx, id, bare, &seq);
}

static void test_many_dirs(void **state)
{
	struct fx *fx = *state;
	char dir[PATH_MAX], id[ME_DID_REPO_SIZE];
	int64_t seq = 0;

	/* More directories of branches than are watched: the rest is polled. */
	path_in(fx, dir, sizeof(dir), "many");
	make_repo(dir);
	sh("cd '%s' && for i in $(seq 1 %d); do echo \"create refs/heads/d$i/b HEAD\"; done | "
	   "git update-ref --stdin", dir, WATCH_MAX_DIRS + 20);
	add_local(fx, dir, id, sizeof(id));
	sh("cd '%s' && for i in $(seq 1 %d); do echo \"update refs/heads/d$i/b HEAD~1\"; done | "
	   "git update-ref --stdin", dir, WATCH_MAX_DIRS + 20);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' update-ref refs/heads/d%d/b HEAD", dir, WATCH_MAX_DIRS + 7);
	wait_synced(fx, id, dir, &seq);
	sh("git -C '%s' update-ref refs/heads/d3/b HEAD", dir);
	wait_synced(fx, id, dir, &seq);
}

static void test_sync_all(void **state)
{
	struct fx *fx = *state;
	char a[PATH_MAX], b[PATH_MAX], ida[ME_DID_REPO_SIZE], idb[ME_DID_REPO_SIZE];
	struct store_repo ext;
	int64_t seq = 0, seq_a = 0;

	path_in(fx, a, sizeof(a), "ra");
	path_in(fx, b, sizeof(b), "rb");
	make_repo(a);
	make_repo(b);
	store_local(fx, a, ida, sizeof(ida));
	store_local(fx, b, idb, sizeof(idb));
	/* b changed while the daemon was not running. */
	sh("cd '%s' && echo offline >> a && git commit -q -am offline", b);
	memset(&ext, 0, sizeof(ext));
	ext.id = "did:repo:zExternal";
	ext.name = "ext";
	ext.creator = "did:key:zSomeoneElse";
	assert_int_equal(store_repo_upsert_external(fx->node.store, &ext, NULL, 0, NULL), 0);

	/* Start: a is unchanged, b gets a new state; the external one is not watched. */
	watch_sync_all(fx->w);
	assert_int_equal(fx->ncalls, 1);
	assert_string_equal(fx->last_id, idb);
	wait_synced_since(fx, idb, b, &seq, 0);
	assert_int_equal(watch_refresh(fx->w, ida), 0);
	assert_int_equal(watch_refresh(fx->w, idb), 0);
	assert_int_equal(watch_refresh(fx->w, "did:repo:zExternal"), ME_ENOTFOUND);
	watch_sync_all(fx->w); /* again: nothing new */
	assert_int_equal(fx->ncalls, 1);
	sh("git -C '%s' branch x", b);
	wait_synced(fx, idb, b, &seq);
	assert_int_equal(fx->ncalls, 2);

	/* Without a node key nothing is signed; the change is picked up once there is one. */
	fx->node.has_key = 0;
	sh("git -C '%s' branch z", a);
	int calls = fx->ncalls;
	assert_int_equal(watch_refresh(fx->w, ida), ME_ENOKEY);
	assert_int_equal(fx->ncalls, calls);
	fx->node.has_key = 1;
	assert_int_equal(watch_refresh(fx->w, ida), 1);
	wait_synced_since(fx, ida, a, &seq_a, calls);

	/* A repository removed from the store is no longer watched, by sync_all or by the next
	 * check. */
	assert_int_equal(store_repo_remove(fx->node.store, idb), 0);
	watch_sync_all(fx->w);
	assert_int_equal(watch_refresh(fx->w, idb), ME_ENOTFOUND);
	assert_int_equal(store_repo_remove(fx->node.store, ida), 0);
	sh("git -C '%s' branch y", a);
	run_for(fx, DRAIN_MS);
	assert_int_equal(watch_refresh(fx->w, ida), ME_ENOTFOUND);
	assert_int_equal(fx->ncalls, 3);

	/* Bad arguments. */
	assert_int_equal(watch_add(fx->w, "", a), ME_EINVAL);
	assert_int_equal(watch_add(fx->w, ida, NULL), ME_EINVAL);
	assert_int_equal(watch_add(NULL, ida, a), ME_EINVAL);
	assert_int_equal(watch_refresh(NULL, ida), ME_EINVAL);
	watch_remove(NULL, ida);
	watch_sync_all(NULL);
	watch_free(NULL);
}

static int group_setup(void **state)
{
	static const char *const unset[] = {
		"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
		"GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_CEILING_DIRECTORIES",
		"GIT_NAMESPACE", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
	};
	(void)state;

	for (size_t i = 0; i < sizeof(unset) / sizeof(unset[0]); i++)
		unsetenv(unset[i]);
	setenv("HOME", "/nonexistent", 1);
	setenv("XDG_CONFIG_HOME", "/nonexistent", 1);
	git_test_env();
	setenv("LC_ALL", "C", 1);
	gitrepo_global_init();
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	gitrepo_global_free();
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_events, setup, teardown),
		cmocka_unit_test_setup_teardown(test_worktree, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bare, setup, teardown),
		cmocka_unit_test_setup_teardown(test_many_dirs, setup, teardown),
		cmocka_unit_test_setup_teardown(test_sync_all, setup, teardown),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
