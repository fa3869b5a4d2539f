#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "common/err.h"
#include "daemon/store.h"

struct fx {
	char root[64];
	char dbpath[128];
	struct store *st;
};

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb;
	(void)type;
	(void)ftw;
	return remove(p);
}

static int setup(void **state)
{
	struct fx *fx = calloc(1, sizeof(*fx));

	assert_non_null(fx);
	snprintf(fx->root, sizeof(fx->root), "/tmp/me-test-store.XXXXXX");
	assert_non_null(mkdtemp(fx->root));
	snprintf(fx->dbpath, sizeof(fx->dbpath), "%s/megaengine.db", fx->root);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fx *fx = *state;

	store_free(fx->st);
	nftw(fx->root, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	free(fx);
	return 0;
}

static void open_store(struct fx *fx)
{
	int rc = store_open(fx->root, &fx->st);

	if (rc != 0)
		fail_msg("store_open: %s: %s", me_strerror(rc), store_errmsg(fx->st));
}

/* Runs a one-value query on an independent connection. */
static void raw_query(const char *dbpath, const char *sql, char *out, size_t outsz)
{
	sqlite3 *db = NULL;
	sqlite3_stmt *s = NULL;

	assert_int_equal(sqlite3_open_v2(dbpath, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
	out[0] = '\0';
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0) != NULL)
		snprintf(out, outsz, "%s", (const char *)sqlite3_column_text(s, 0));
	sqlite3_finalize(s);
	sqlite3_close(db);
}

static void raw_exec(const char *dbpath, const char *sql)
{
	sqlite3 *db = NULL;

	assert_int_equal(sqlite3_open_v2(dbpath, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
					 NULL), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
}

static struct store_repo mkrepo(const char *id, const char *name, const char *path)
{
	struct store_repo r;

	memset(&r, 0, sizeof(r));
	r.id = (char *)id;
	r.name = (char *)name;
	r.creator = "did:key:zCreator";
	r.description = "a repo";
	r.path = (char *)path;
	r.root_commit = "0123456789abcdef0123456789abcdef01234567";
	r.head = "refs/heads/main";
	return r;
}

static void test_open_creates(void **state)
{
	struct fx *fx = *state;
	struct stat sb;
	char v[64];
	int64_t n = -1;

	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), STORE_SCHEMA_VERSION);
	assert_int_equal(store_repo_count(fx->st, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(store_node_count(fx->st, &n), 0);
	assert_int_equal(n, 0);

	assert_int_equal(stat(fx->dbpath, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, 0600);

	raw_query(fx->dbpath, "PRAGMA journal_mode", v, sizeof(v));
	assert_string_equal(v, "wal");
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_int_equal(atoi(v), STORE_SCHEMA_VERSION);
	raw_query(fx->dbpath, "SELECT count(*) FROM sqlite_master WHERE type = 'index'"
			      " AND tbl_name = 'repos' AND sql LIKE '%(path)%'", v, sizeof(v));
	assert_string_equal(v, "1");

	/* Reopening an existing database is fine and keeps the data. */
	struct store_repo r = mkrepo("did:repo:zA", "a", "/src/a");
	assert_int_equal(store_repo_add(fx->st, &r, NULL, 0), 0);
	store_free(fx->st);
	fx->st = NULL;
	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), STORE_SCHEMA_VERSION);
	assert_int_equal(store_repo_count(fx->st, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(stat(fx->dbpath, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, 0600);
}

static void test_open_umask(void **state)
{
	struct fx *fx = *state;
	struct stat sb;
	mode_t old = umask(0);

	open_store(fx);
	struct store_repo r = mkrepo("did:repo:zA", "a", "/src/a");
	assert_int_equal(store_repo_add(fx->st, &r, NULL, 0), 0);
	umask(old);
	assert_int_equal(stat(fx->dbpath, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, 0600);
	/* SQLite gives its side files the database file's mode. */
	char side[160];
	snprintf(side, sizeof(side), "%s-wal", fx->dbpath);
	assert_int_equal(stat(side, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, 0600);
	snprintf(side, sizeof(side), "%s-shm", fx->dbpath);
	assert_int_equal(stat(side, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, 0600);
}

static void test_repo_crud(void **state)
{
	struct fx *fx = *state;
	struct store_ref refs[] = {
		{ "refs/heads/main", "1111111111111111111111111111111111111111" },
		{ "refs/tags/v1", "2222222222222222222222222222222222222222" },
		{ "refs/heads/dev", "3333333333333333333333333333333333333333" },
	};
	struct store_repo a = mkrepo("did:repo:zA", "beta", "/src/b");
	struct store_repo b = mkrepo("did:repo:zB", "alpha", "/src/a");
	struct store_repo x = mkrepo("did:repo:zX", "ext", "");
	struct store_repo got, *list;
	struct store_ref *gr;
	size_t n;
	int64_t cnt;

	open_store(fx);
	a.created_at = 1000;
	a.updated_at = 2000;
	x.is_external = 1;
	assert_int_equal(store_repo_add(fx->st, &a, refs, 3), 0);
	assert_int_equal(store_repo_add(fx->st, &b, refs, 1), 0);
	assert_int_equal(store_repo_add(fx->st, &x, NULL, 0), 0);

	/* Duplicate id: ME_EEXIST, and nothing of the failed add remains. */
	struct store_repo dup = mkrepo("did:repo:zA", "other", "/src/other");
	assert_int_equal(store_repo_add(fx->st, &dup, refs + 1, 1), ME_EEXIST);
	assert_non_null(strstr(store_errmsg(fx->st), "did:repo:zA"));
	/* A failing ref insert rolls the repository back too. */
	struct store_ref duprefs[] = { refs[0], refs[0] };
	struct store_repo c = mkrepo("did:repo:zC", "c", "/src/c");
	assert_int_equal(store_repo_add(fx->st, &c, duprefs, 2), ME_EINVAL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zC", &got), ME_ENOTFOUND);

	assert_int_equal(store_repo_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 3);

	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_string_equal(got.id, "did:repo:zA");
	assert_string_equal(got.name, "beta");
	assert_string_equal(got.creator, "did:key:zCreator");
	assert_string_equal(got.description, "a repo");
	assert_string_equal(got.path, "/src/b");
	assert_string_equal(got.root_commit, "0123456789abcdef0123456789abcdef01234567");
	assert_string_equal(got.head, "refs/heads/main");
	assert_int_equal(got.is_external, 0);
	assert_int_equal(got.created_at, 1000);
	assert_int_equal(got.updated_at, 2000);
	store_repo_clear(&got);

	/* Timestamps of 0 mean now. */
	int64_t t0 = time(NULL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zB", &got), 0);
	assert_true(got.created_at >= t0 - 5 && got.created_at <= t0 + 5);
	assert_true(got.updated_at >= t0 - 5 && got.updated_at <= t0 + 5);
	store_repo_clear(&got);

	assert_int_equal(store_repo_get(fx->st, "did:repo:zNope", &got), ME_ENOTFOUND);
	assert_null(got.id);

	assert_int_equal(store_repo_find_path(fx->st, "/src/a", &got), 0);
	assert_string_equal(got.id, "did:repo:zB");
	store_repo_clear(&got);
	assert_int_equal(store_repo_find_path(fx->st, "/src/none", &got), ME_ENOTFOUND);
	assert_int_equal(store_repo_find_path(fx->st, "", &got), ME_ENOTFOUND);

	assert_int_equal(store_repo_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 3);
	assert_string_equal(list[0].name, "alpha");
	assert_string_equal(list[1].name, "beta");
	assert_string_equal(list[2].name, "ext");
	assert_int_equal(list[2].is_external, 1);
	assert_string_equal(list[2].path, "");
	store_repo_list_free(list, n);

	/* Refs come back sorted by name. */
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 3);
	assert_string_equal(gr[0].name, "refs/heads/dev");
	assert_string_equal(gr[0].oid, "3333333333333333333333333333333333333333");
	assert_string_equal(gr[1].name, "refs/heads/main");
	assert_string_equal(gr[2].name, "refs/tags/v1");
	assert_string_equal(gr[2].oid, "2222222222222222222222222222222222222222");
	store_refs_free(gr, n);

	/* Remove cascades to the refs. */
	assert_int_equal(store_repo_remove(fx->st, "did:repo:zA"), 0);
	assert_int_equal(store_repo_remove(fx->st, "did:repo:zA"), ME_ENOTFOUND);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), ME_ENOTFOUND);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 0);
	assert_null(gr);
	char v[32];
	raw_query(fx->dbpath, "SELECT count(*) FROM refs WHERE repo_id = 'did:repo:zA'", v, sizeof(v));
	assert_string_equal(v, "0");
	raw_query(fx->dbpath, "SELECT count(*) FROM refs", v, sizeof(v));
	assert_string_equal(v, "1");
	assert_int_equal(store_repo_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 2);
}

static void test_refs_set(void **state)
{
	struct fx *fx = *state;
	struct store_ref r1[] = {
		{ "refs/heads/main", "1111111111111111111111111111111111111111" },
		{ "refs/heads/old", "2222222222222222222222222222222222222222" },
	};
	struct store_ref r2[] = {
		{ "refs/heads/new", "4444444444444444444444444444444444444444" },
		{ "refs/heads/main", "3333333333333333333333333333333333333333" },
	};
	struct store_repo a = mkrepo("did:repo:zA", "a", "/src/a"), got;
	struct store_ref *gr;
	size_t n;

	open_store(fx);
	a.created_at = 1000;
	a.updated_at = 1000;
	assert_int_equal(store_repo_add(fx->st, &a, r1, 2), 0);
	assert_int_equal(store_refs_set(fx->st, "did:repo:zA", r2, 2), 0);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(gr[0].name, "refs/heads/main");
	assert_string_equal(gr[0].oid, "3333333333333333333333333333333333333333");
	assert_string_equal(gr[1].name, "refs/heads/new");
	assert_string_equal(gr[1].oid, "4444444444444444444444444444444444444444");
	store_refs_free(gr, n);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_int_equal(got.created_at, 1000);
	assert_true(got.updated_at > 1000);
	store_repo_clear(&got);

	/* A failing replacement leaves the old refs in place. */
	struct store_ref bad[] = { r1[0], r1[0] };
	assert_int_equal(store_refs_set(fx->st, "did:repo:zA", bad, 2), ME_EINVAL);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(gr[0].oid, "3333333333333333333333333333333333333333");
	store_refs_free(gr, n);

	/* Empty set clears; unknown repository is ME_ENOTFOUND. */
	assert_int_equal(store_refs_set(fx->st, "did:repo:zA", NULL, 0), 0);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(store_refs_set(fx->st, "did:repo:zNope", r1, 1), ME_ENOTFOUND);
}

static void test_nodes(void **state)
{
	struct fx *fx = *state;
	struct store_node a = { "did:key:zB", "bob", "10.0.0.1:4433", 1, "0.1.0", 100, 200, 0 };
	struct store_node b = { "did:key:zA", "alice", "", 0, "0.1.0", 0, 0, 0 };
	struct store_node *list;
	size_t n;
	int64_t cnt;

	open_store(fx);
	assert_int_equal(store_node_upsert(fx->st, &a), 0);
	assert_int_equal(store_node_upsert(fx->st, &b), 0);
	assert_int_equal(store_node_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 2);

	/* Update: created_at kept, the rest replaced, updated_at now. */
	struct store_node a2 = { "did:key:zB", "bobby", "10.0.0.2:4433,[::1]:4433", 2, "0.2.0", 5, 0, 0 };
	int64_t t0 = time(NULL);
	assert_int_equal(store_node_upsert(fx->st, &a2), 0);
	assert_int_equal(store_node_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 2);

	assert_int_equal(store_node_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(list[0].id, "did:key:zA");
	assert_string_equal(list[0].alias, "alice");
	assert_string_equal(list[0].addresses, "");
	assert_true(list[0].created_at >= t0 - 5);
	assert_string_equal(list[1].id, "did:key:zB");
	assert_string_equal(list[1].alias, "bobby");
	assert_string_equal(list[1].addresses, "10.0.0.2:4433,[::1]:4433");
	assert_int_equal(list[1].node_type, 2);
	assert_string_equal(list[1].version, "0.2.0");
	assert_int_equal(list[1].created_at, 100);
	assert_true(list[1].updated_at >= t0 - 5 && list[1].updated_at <= t0 + 5);
	store_node_list_free(list, n);

	struct store_node noid = { NULL, "x", "", 0, "", 0, 0, 0 };
	assert_int_equal(store_node_upsert(fx->st, &noid), ME_EINVAL);
}

static void sig_fill(uint8_t sig[STORE_SIG_LEN], uint8_t v)
{
	for (int i = 0; i < STORE_SIG_LEN; i++)
		sig[i] = (uint8_t)(v + i);
}

static void test_refstate(void **state)
{
	struct fx *fx = *state;
	struct store_ref r1[] = { { "refs/heads/main", "1111111111111111111111111111111111111111" } };
	struct store_ref r2[] = {
		{ "refs/heads/main", "2222222222222222222222222222222222222222" },
		{ "refs/heads/dev", "3333333333333333333333333333333333333333" },
	};
	struct store_repo a = mkrepo("did:repo:zA", "a", "/src/a"), got;
	struct store_ref *gr;
	uint8_t sig[STORE_SIG_LEN];
	size_t n;
	char v[160];

	open_store(fx);
	a.created_at = 1000;
	a.updated_at = 1000;
	assert_int_equal(store_repo_add(fx->st, &a, r1, 1), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_int_equal(got.ref_seq, 0);
	assert_int_equal(got.has_ref_sig, 0);
	store_repo_clear(&got);
	raw_query(fx->dbpath, "SELECT typeof(ref_sig) FROM repos", v, sizeof(v));
	assert_string_equal(v, "null");

	sig_fill(sig, 7);
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zA", 1700000000123LL,
						 "refs/heads/dev", sig, r2, 2), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_int_equal(got.ref_seq, 1700000000123LL);
	assert_int_equal(got.has_ref_sig, 1);
	assert_memory_equal(got.ref_sig, sig, STORE_SIG_LEN);
	assert_string_equal(got.head, "refs/heads/dev");
	assert_int_equal(got.created_at, 1000);
	assert_true(got.updated_at > 1000);
	assert_string_equal(got.path, "/src/a");
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(gr[0].name, "refs/heads/dev");
	assert_string_equal(gr[1].oid, "2222222222222222222222222222222222222222");
	store_refs_free(gr, n);
	raw_query(fx->dbpath, "SELECT length(ref_sig) || ':' || hex(substr(ref_sig, 1, 2)) FROM repos",
		  v, sizeof(v));
	assert_string_equal(v, "64:0708");

	/* A failing ref list rolls the whole state back. */
	struct store_ref bad[] = { r1[0], r1[0] };
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zA", 1800000000000LL, "x", NULL,
						 bad, 2), ME_EINVAL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_int_equal(got.ref_seq, 1700000000123LL);
	assert_int_equal(got.has_ref_sig, 1);
	assert_string_equal(got.head, "refs/heads/dev");
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 2);
	store_refs_free(gr, n);

	/* No signature, no head, no refs. */
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zA", 5, NULL, NULL, NULL, 0), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zA", &got), 0);
	assert_int_equal(got.ref_seq, 5);
	assert_int_equal(got.has_ref_sig, 0);
	assert_string_equal(got.head, "");
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zA", &gr, &n), 0);
	assert_int_equal(n, 0);

	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zNope", 9, "h", sig, r1, 1),
			 ME_ENOTFOUND);
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zA", -1, "h", sig, r1, 1),
			 ME_EINVAL);
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zA", 9, "h", sig, NULL, 1),
			 ME_EINVAL);
	assert_int_equal(store_repo_set_refstate(NULL, "did:repo:zA", 9, "h", sig, r1, 1), ME_EINVAL);

	/* store_repo_add stores a signed state too; a stored blob of the wrong size is no
	 * signature. */
	struct store_repo b = mkrepo("did:repo:zB", "b", "/src/b");
	b.ref_seq = 42;
	b.has_ref_sig = 1;
	sig_fill(b.ref_sig, 100);
	assert_int_equal(store_repo_add(fx->st, &b, NULL, 0), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zB", &got), 0);
	assert_int_equal(got.ref_seq, 42);
	assert_int_equal(got.has_ref_sig, 1);
	assert_memory_equal(got.ref_sig, b.ref_sig, STORE_SIG_LEN);
	store_repo_clear(&got);
	raw_exec(fx->dbpath, "UPDATE repos SET ref_sig = x'0102' WHERE id = 'did:repo:zB'");
	assert_int_equal(store_repo_get(fx->st, "did:repo:zB", &got), 0);
	assert_int_equal(got.has_ref_sig, 0);
	store_repo_clear(&got);
	b.id = "did:repo:zNeg";
	b.ref_seq = -5;
	assert_int_equal(store_repo_add(fx->st, &b, NULL, 0), ME_EINVAL);
}

static void test_upsert_external(void **state)
{
	struct fx *fx = *state;
	struct store_ref r1[] = { { "refs/heads/main", "1111111111111111111111111111111111111111" } };
	struct store_ref r2[] = {
		{ "refs/heads/main", "2222222222222222222222222222222222222222" },
		{ "refs/tags/v1", "3333333333333333333333333333333333333333" },
	};
	struct store_repo x = mkrepo("did:repo:zX", "ext", "/should/be/ignored"), got;
	struct store_ref *gr;
	size_t n;
	int changed = -1;

	open_store(fx);
	x.ref_seq = 100;
	x.has_ref_sig = 1;
	sig_fill(x.ref_sig, 1);
	x.created_at = 500;
	x.updated_at = 500;
	assert_int_equal(store_repo_upsert_external(fx->st, &x, r1, 1, &changed), 0);
	assert_int_equal(changed, 1);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.is_external, 1);
	assert_string_equal(got.path, "");
	assert_string_equal(got.name, "ext");
	assert_int_equal(got.ref_seq, 100);
	assert_int_equal(got.has_ref_sig, 1);
	assert_memory_equal(got.ref_sig, x.ref_sig, STORE_SIG_LEN);
	assert_int_equal(got.created_at, 500);
	store_repo_clear(&got);

	/* The same or an older state changes nothing. */
	struct store_repo old = x;
	old.name = "renamed";
	assert_int_equal(store_repo_upsert_external(fx->st, &old, r2, 2, &changed), 0);
	assert_int_equal(changed, 0);
	old.ref_seq = 99;
	assert_int_equal(store_repo_upsert_external(fx->st, &old, r2, 2, &changed), 0);
	assert_int_equal(changed, 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_string_equal(got.name, "ext");
	assert_int_equal(got.ref_seq, 100);
	store_repo_clear(&got);

	/* A newer state replaces name, description, head, refs, seq and signature. */
	struct store_repo nw = x;
	nw.name = "ext2";
	nw.description = "new words";
	nw.head = "refs/heads/other";
	nw.ref_seq = 200;
	nw.created_at = 0;
	nw.updated_at = 0;
	sig_fill(nw.ref_sig, 9);
	assert_int_equal(store_repo_upsert_external(fx->st, &nw, r2, 2, &changed), 0);
	assert_int_equal(changed, 1);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_string_equal(got.name, "ext2");
	assert_string_equal(got.description, "new words");
	assert_string_equal(got.head, "refs/heads/other");
	assert_int_equal(got.ref_seq, 200);
	assert_memory_equal(got.ref_sig, nw.ref_sig, STORE_SIG_LEN);
	assert_int_equal(got.created_at, 500);
	assert_true(got.updated_at > 500);
	assert_int_equal(got.is_external, 1);
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zX", &gr, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(gr[1].name, "refs/tags/v1");
	store_refs_free(gr, n);

	/* A newer state from another creator (or root commit) is refused, nothing changes. */
	struct store_repo forged = nw;
	forged.ref_seq = 300;
	forged.creator = "did:key:zMallory";
	forged.name = "pwned";
	assert_int_equal(store_repo_upsert_external(fx->st, &forged, r1, 1, &changed), ME_EINVAL);
	assert_int_equal(changed, 0);
	forged.creator = nw.creator;
	forged.root_commit = "ffffffffffffffffffffffffffffffffffffffff";
	assert_int_equal(store_repo_upsert_external(fx->st, &forged, r1, 1, &changed), ME_EINVAL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_string_equal(got.name, "ext2");
	assert_int_equal(got.ref_seq, 200);
	store_repo_clear(&got);
	/* A failing ref list rolls a newer state back. */
	struct store_ref bad[] = { r1[0], r1[0] };
	forged = nw;
	forged.ref_seq = 400;
	assert_int_equal(store_repo_upsert_external(fx->st, &forged, bad, 2, &changed), ME_EINVAL);
	assert_int_equal(changed, 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.ref_seq, 200);
	store_repo_clear(&got);

	/* A local repository with the same id is never touched. */
	struct store_repo loc = mkrepo("did:repo:zL", "local", "/src/l");
	loc.ref_seq = 10;
	assert_int_equal(store_repo_add(fx->st, &loc, r1, 1), 0);
	struct store_repo ext = mkrepo("did:repo:zL", "hijack", "");
	ext.ref_seq = 1000000;
	ext.creator = "did:key:zOther";
	assert_int_equal(store_repo_upsert_external(fx->st, &ext, r2, 2, &changed), 0);
	assert_int_equal(changed, 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zL", &got), 0);
	assert_string_equal(got.name, "local");
	assert_string_equal(got.path, "/src/l");
	assert_int_equal(got.is_external, 0);
	assert_int_equal(got.ref_seq, 10);
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zL", &gr, &n), 0);
	assert_int_equal(n, 1);
	store_refs_free(gr, n);

	/* changed may be NULL; bad arguments. */
	struct store_repo y = mkrepo("did:repo:zY", "y", "");
	assert_int_equal(store_repo_upsert_external(fx->st, &y, NULL, 0, NULL), 0);
	y.id = NULL;
	assert_int_equal(store_repo_upsert_external(fx->st, &y, NULL, 0, &changed), ME_EINVAL);
	y.id = "did:repo:zZ";
	y.ref_seq = -1;
	assert_int_equal(store_repo_upsert_external(fx->st, &y, NULL, 0, &changed), ME_EINVAL);
	y.ref_seq = 0;
	assert_int_equal(store_repo_upsert_external(fx->st, &y, NULL, 1, &changed), ME_EINVAL);
	assert_int_equal(store_repo_upsert_external(NULL, &y, NULL, 0, &changed), ME_EINVAL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zZ", &got), ME_ENOTFOUND);
}

static void test_sync_state(void **state)
{
	struct fx *fx = *state;
	struct store_ref r1[] = { { "refs/heads/main", "1111111111111111111111111111111111111111" } };
	struct store_repo x = mkrepo("did:repo:zX", "ext", ""), got, *list;
	size_t n;
	int changed;

	open_store(fx);
	/* Whatever the caller's struct holds, a new row starts with no mirror. */
	x.ref_seq = 100;
	x.mirror_seq = 55;
	x.last_sync_ms = 66;
	x.sync_error = "ignored";
	assert_int_equal(store_repo_upsert_external(fx->st, &x, r1, 1, &changed), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.mirror_seq, 0);
	assert_int_equal(got.last_sync_ms, 0);
	assert_string_equal(got.sync_error, "");
	store_repo_clear(&got);

	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zX", 100, 1700000000123LL, ""), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.mirror_seq, 100);
	assert_int_equal(got.last_sync_ms, 1700000000123LL);
	assert_string_equal(got.sync_error, "");
	int64_t updated = got.updated_at;
	store_repo_clear(&got);

	/* A failure: only the error changes; negative numbers and NULL keep the stored values. */
	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zX", -1, -1,
					     "bundle refused: it's \"bad\""), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.mirror_seq, 100);
	assert_int_equal(got.last_sync_ms, 1700000000123LL);
	assert_string_equal(got.sync_error, "bundle refused: it's \"bad\"");
	assert_int_equal(got.updated_at, updated);
	store_repo_clear(&got);
	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zX", 150, -1, NULL), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.mirror_seq, 150);
	assert_int_equal(got.last_sync_ms, 1700000000123LL);
	assert_string_equal(got.sync_error, "bundle refused: it's \"bad\"");
	store_repo_clear(&got);
	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zX", -1, 1800000000000LL, ""), 0);

	/* A newer announced state (upsert_external) and a new ref state keep the mirror's. */
	struct store_repo nw = x;
	nw.ref_seq = 200;
	nw.name = "ext2";
	assert_int_equal(store_repo_upsert_external(fx->st, &nw, r1, 1, &changed), 0);
	assert_int_equal(changed, 1);
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zX", 300, "refs/heads/main",
						 NULL, r1, 1), 0);
	assert_int_equal(store_repo_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(list[0].name, "ext2");
	assert_int_equal(list[0].ref_seq, 300);
	assert_int_equal(list[0].mirror_seq, 150);
	assert_int_equal(list[0].last_sync_ms, 1800000000000LL);
	assert_string_equal(list[0].sync_error, "");
	store_repo_list_free(list, n);

	/* Zero is a value too (the mirror was dropped). */
	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zX", 0, 0, "gone"), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zX", &got), 0);
	assert_int_equal(got.mirror_seq, 0);
	assert_int_equal(got.last_sync_ms, 0);
	assert_string_equal(got.sync_error, "gone");
	store_repo_clear(&got);

	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zNope", 1, 1, ""), ME_ENOTFOUND);
	assert_string_equal(store_errmsg(fx->st), "no repository did:repo:zNope");
	assert_int_equal(store_repo_set_sync(fx->st, NULL, 1, 1, ""), ME_EINVAL);
	assert_int_equal(store_repo_set_sync(NULL, "did:repo:zX", 1, 1, ""), ME_EINVAL);
}

static void test_clones(void **state)
{
	struct fx *fx = *state;
	struct store_repo a = mkrepo("did:repo:zA", "a", ""), b = mkrepo("did:repo:zB", "b", "");
	struct store_clone *c;
	size_t n;
	int64_t before = time(NULL);
	char v[64];

	open_store(fx);
	assert_int_equal(store_repo_upsert_external(fx->st, &a, NULL, 0, NULL), 0);
	assert_int_equal(store_repo_upsert_external(fx->st, &b, NULL, 0, NULL), 0);
	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 0);
	assert_null(c);

	assert_int_equal(store_clone_set(fx->st, "did:repo:zB", "/home/u/b", 10), 0);
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", "/home/u/z", 20), 0);
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", "/home/u/a", 30), 0);
	/* Setting it again replaces its seq. */
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", "/home/u/z", 25), 0);

	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 3);
	assert_string_equal(c[0].repo_id, "did:repo:zA");
	assert_string_equal(c[0].path, "/home/u/a");
	assert_int_equal(c[0].seq, 30);
	assert_true(c[0].updated_at >= before && c[0].updated_at <= time(NULL));
	assert_string_equal(c[1].path, "/home/u/z");
	assert_int_equal(c[1].seq, 25);
	assert_string_equal(c[2].repo_id, "did:repo:zB");
	assert_int_equal(c[2].seq, 10);
	store_clone_list_free(c, n);
	assert_int_equal(store_clone_list(fx->st, "did:repo:zB", &c, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(c[0].path, "/home/u/b");
	store_clone_list_free(c, n);
	assert_int_equal(store_clone_list(fx->st, "did:repo:zNope", &c, &n), 0);
	assert_int_equal(n, 0);
	store_clone_list_free(c, n);

	/* Unknown repositories and bad arguments. */
	assert_int_equal(store_clone_set(fx->st, "did:repo:zNope", "/x", 1), ME_ENOTFOUND);
	assert_string_equal(store_errmsg(fx->st), "no repository did:repo:zNope");
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", "", 1), ME_EINVAL);
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", "/x", -1), ME_EINVAL);
	assert_int_equal(store_clone_set(fx->st, NULL, "/x", 1), ME_EINVAL);
	assert_int_equal(store_clone_set(fx->st, "did:repo:zA", NULL, 1), ME_EINVAL);
	assert_int_equal(store_clone_list(fx->st, NULL, NULL, &n), ME_EINVAL);
	assert_int_equal(store_clone_remove(fx->st, "did:repo:zA", NULL), ME_EINVAL);
	store_clone_list_free(NULL, 0);

	assert_int_equal(store_clone_remove(fx->st, "did:repo:zA", "/home/u/a"), 0);
	assert_int_equal(store_clone_remove(fx->st, "did:repo:zA", "/home/u/a"), ME_ENOTFOUND);
	/* The path belongs to another repository. */
	assert_int_equal(store_clone_remove(fx->st, "did:repo:zA", "/home/u/b"), ME_ENOTFOUND);
	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 2);
	store_clone_list_free(c, n);

	/* Working copies go with their repository. */
	assert_int_equal(store_repo_remove(fx->st, "did:repo:zA"), 0);
	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(c[0].repo_id, "did:repo:zB");
	store_clone_list_free(c, n);
	raw_query(fx->dbpath, "SELECT count(*) FROM clones WHERE repo_id = 'did:repo:zA'", v,
		  sizeof(v));
	assert_string_equal(v, "0");
}

static void test_nodes_seen(void **state)
{
	struct fx *fx = *state;
	struct store_node a = { "did:key:zA", "alice", "1.1.1.1:9000", 0, "0.1.0", 0, 0, 3000 };
	struct store_node b = { "did:key:zB", "bob", "", 0, "0.1.0", 0, 0, 5000 };
	struct store_node c = { "did:key:zC", "carol", "", 0, "0.1.0", 0, 0, 0 };
	struct store_node d = { "did:key:zD", "dave", "", 0, "0.1.0", 0, 0, 3000 };
	struct store_node got, *list;
	size_t n;
	int64_t cnt;

	open_store(fx);
	assert_int_equal(store_node_upsert(fx->st, &c), 0);
	assert_int_equal(store_node_upsert(fx->st, &d), 0);
	assert_int_equal(store_node_upsert(fx->st, &a), 0);
	assert_int_equal(store_node_upsert(fx->st, &b), 0);

	/* Most recently seen first, ties by id; never seen last. */
	assert_int_equal(store_node_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 4);
	assert_string_equal(list[0].id, "did:key:zB");
	assert_int_equal(list[0].last_seen_ms, 5000);
	assert_string_equal(list[1].id, "did:key:zA");
	assert_string_equal(list[2].id, "did:key:zD");
	assert_string_equal(list[3].id, "did:key:zC");
	assert_int_equal(list[3].last_seen_ms, 0);
	store_node_list_free(list, n);

	/* last_seen never goes back; 0 keeps it; the other fields are replaced. */
	struct store_node a2 = { "did:key:zA", "alice2", "2.2.2.2:9000", 1, "0.2.0", 0, 0, 1000 };
	assert_int_equal(store_node_upsert(fx->st, &a2), 0);
	assert_int_equal(store_node_get(fx->st, "did:key:zA", &got), 0);
	assert_string_equal(got.alias, "alice2");
	assert_string_equal(got.addresses, "2.2.2.2:9000");
	assert_int_equal(got.node_type, 1);
	assert_string_equal(got.version, "0.2.0");
	assert_int_equal(got.last_seen_ms, 3000);
	store_node_clear(&got);
	a2.last_seen_ms = 0;
	assert_int_equal(store_node_upsert(fx->st, &a2), 0);
	assert_int_equal(store_node_get(fx->st, "did:key:zA", &got), 0);
	assert_int_equal(got.last_seen_ms, 3000);
	store_node_clear(&got);
	a2.last_seen_ms = 9000;
	assert_int_equal(store_node_upsert(fx->st, &a2), 0);
	assert_int_equal(store_node_get(fx->st, "did:key:zA", &got), 0);
	assert_int_equal(got.last_seen_ms, 9000);
	assert_true(got.created_at > 0 && got.updated_at >= got.created_at);
	store_node_clear(&got);
	assert_int_equal(store_node_list(fx->st, &list, &n), 0);
	assert_string_equal(list[0].id, "did:key:zA");
	store_node_list_free(list, n);

	assert_int_equal(store_node_get(fx->st, "did:key:zNope", &got), ME_ENOTFOUND);
	assert_null(got.id);
	store_node_clear(&got);
	store_node_clear(NULL);

	assert_int_equal(store_node_delete(fx->st, "did:key:zB"), 0);
	assert_int_equal(store_node_delete(fx->st, "did:key:zB"), ME_ENOTFOUND);
	assert_int_equal(store_node_get(fx->st, "did:key:zB", &got), ME_ENOTFOUND);
	assert_int_equal(store_node_delete(fx->st, "%"), ME_ENOTFOUND);
	assert_int_equal(store_node_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 3);
	assert_int_equal(store_node_get(NULL, "x", &got), ME_EINVAL);
	assert_int_equal(store_node_get(fx->st, NULL, &got), ME_EINVAL);
	assert_int_equal(store_node_delete(fx->st, NULL), ME_EINVAL);
}

/* The schema exactly as version 1 created it. */
static const char v1_schema[] =
	"CREATE TABLE repos ("
	" id TEXT PRIMARY KEY,"
	" name TEXT NOT NULL,"
	" creator TEXT NOT NULL,"
	" description TEXT NOT NULL DEFAULT '',"
	" path TEXT NOT NULL DEFAULT '',"
	" is_external INTEGER NOT NULL DEFAULT 0,"
	" root_commit TEXT NOT NULL DEFAULT '',"
	" head TEXT NOT NULL DEFAULT '',"
	" created_at INTEGER NOT NULL,"
	" updated_at INTEGER NOT NULL);"
	"CREATE TABLE refs ("
	" repo_id TEXT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,"
	" ref_name TEXT NOT NULL,"
	" oid TEXT NOT NULL,"
	" updated_at INTEGER NOT NULL,"
	" PRIMARY KEY (repo_id, ref_name));"
	"CREATE TABLE nodes ("
	" id TEXT PRIMARY KEY,"
	" alias TEXT NOT NULL DEFAULT '',"
	" addresses TEXT NOT NULL DEFAULT '',"
	" node_type INTEGER NOT NULL DEFAULT 0,"
	" version TEXT NOT NULL DEFAULT '',"
	" created_at INTEGER NOT NULL,"
	" updated_at INTEGER NOT NULL);"
	"CREATE INDEX repos_path ON repos(path);"
	"PRAGMA user_version = 1;";

static void test_migrate_v1(void **state)
{
	struct fx *fx = *state;
	struct store_repo got;
	struct store_node *list;
	struct store_ref *gr;
	size_t n;
	char v[64];

	raw_exec(fx->dbpath, "PRAGMA journal_mode = WAL;");
	raw_exec(fx->dbpath, v1_schema);
	raw_exec(fx->dbpath,
		 "INSERT INTO repos VALUES ('did:repo:zOld', 'old', 'did:key:zC', 'kept', '/src/old',"
		 " 0, '0123456789abcdef0123456789abcdef01234567', 'refs/heads/main', 11, 22);"
		 "INSERT INTO repos VALUES ('did:repo:zExt', 'ext', 'did:key:zP', '', '', 1, '', '',"
		 " 33, 44);"
		 "INSERT INTO refs VALUES ('did:repo:zOld', 'refs/heads/main',"
		 " '1111111111111111111111111111111111111111', 22);"
		 "INSERT INTO nodes VALUES ('did:key:zP', 'peer', '10.0.0.1:9000', 0, '0.1.0', 5, 6);"
		 "INSERT INTO nodes VALUES ('did:key:zA', 'first', '', 0, '0.1.0', 7, 8);");
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_string_equal(v, "1");

	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), STORE_SCHEMA_VERSION);
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_int_equal(atoi(v), STORE_SCHEMA_VERSION);
	raw_query(fx->dbpath, "SELECT count(*) FROM pragma_table_info('repos')"
			      " WHERE name IN ('ref_seq', 'ref_sig')", v, sizeof(v));
	assert_string_equal(v, "2");
	raw_query(fx->dbpath, "SELECT \"notnull\" || dflt_value FROM pragma_table_info('nodes')"
			      " WHERE name = 'last_seen'", v, sizeof(v));
	assert_string_equal(v, "10");

	/* Old rows are kept, with the new columns at their defaults. */
	assert_int_equal(store_repo_get(fx->st, "did:repo:zOld", &got), 0);
	assert_string_equal(got.name, "old");
	assert_string_equal(got.description, "kept");
	assert_string_equal(got.path, "/src/old");
	assert_int_equal(got.created_at, 11);
	assert_int_equal(got.updated_at, 22);
	assert_int_equal(got.ref_seq, 0);
	assert_int_equal(got.has_ref_sig, 0);
	assert_int_equal(got.mirror_seq, 0);
	assert_string_equal(got.sync_error, "");
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zOld", &gr, &n), 0);
	assert_int_equal(n, 1);
	store_refs_free(gr, n);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zExt", &got), 0);
	assert_int_equal(got.is_external, 1);
	store_repo_clear(&got);
	assert_int_equal(store_node_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 2);
	assert_string_equal(list[0].id, "did:key:zA");
	assert_int_equal(list[0].last_seen_ms, 0);
	assert_int_equal(list[0].created_at, 7);
	assert_string_equal(list[1].alias, "peer");
	store_node_list_free(list, n);

	/* The migrated database takes the new state, and reopening does not migrate again. */
	uint8_t sig[STORE_SIG_LEN];
	sig_fill(sig, 3);
	assert_int_equal(store_repo_set_refstate(fx->st, "did:repo:zOld", 77, "refs/heads/main", sig,
						 NULL, 0), 0);
	store_free(fx->st);
	fx->st = NULL;
	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), STORE_SCHEMA_VERSION);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zOld", &got), 0);
	assert_int_equal(got.ref_seq, 77);
	assert_int_equal(got.has_ref_sig, 1);
	store_repo_clear(&got);
}

/* Version 1 as created, then the 1 -> 2 migration exactly as released. */
static const char v2_schema[] =
	"ALTER TABLE repos ADD COLUMN ref_seq INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE repos ADD COLUMN ref_sig BLOB;"
	"ALTER TABLE nodes ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;"
	"CREATE INDEX nodes_last_seen ON nodes(last_seen DESC, id);"
	"PRAGMA user_version = 2;";

static void test_migrate_v2(void **state)
{
	struct fx *fx = *state;
	struct store_repo got;
	struct store_ref *gr;
	struct store_clone *c;
	size_t n;
	char v[64];

	raw_exec(fx->dbpath, "PRAGMA journal_mode = WAL;");
	raw_exec(fx->dbpath, v1_schema);
	raw_exec(fx->dbpath, v2_schema);
	raw_exec(fx->dbpath,
		 "INSERT INTO repos VALUES ('did:repo:zOld', 'old', 'did:key:zC', 'kept', '/src/old',"
		 " 0, '0123456789abcdef0123456789abcdef01234567', 'refs/heads/main', 11, 22, 5000,"
		 " zeroblob(64));"
		 "INSERT INTO repos VALUES ('did:repo:zExt', 'ext', 'did:key:zP', '', '', 1, '', '',"
		 " 33, 44, 6000, NULL);"
		 "INSERT INTO refs VALUES ('did:repo:zExt', 'refs/heads/main',"
		 " '1111111111111111111111111111111111111111', 44);"
		 "INSERT INTO nodes VALUES ('did:key:zP', 'peer', '10.0.0.1:9000', 0, '0.1.0', 5, 6,"
		 " 7000);");
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_string_equal(v, "2");

	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), 3);
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_string_equal(v, "3");
	raw_query(fx->dbpath, "SELECT group_concat(name || ':' || \"notnull\" || ':' || dflt_value)"
			      " FROM pragma_table_info('repos') WHERE name IN ('mirror_seq',"
			      " 'last_sync_ms', 'sync_error')", v, sizeof(v));
	assert_string_equal(v, "mirror_seq:1:0,last_sync_ms:1:0,sync_error:1:''");
	raw_query(fx->dbpath, "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
			      " AND name = 'clones'", v, sizeof(v));
	assert_string_equal(v, "1");

	/* Old rows keep everything, with no mirror. */
	assert_int_equal(store_repo_get(fx->st, "did:repo:zOld", &got), 0);
	assert_string_equal(got.description, "kept");
	assert_int_equal(got.created_at, 11);
	assert_int_equal(got.updated_at, 22);
	assert_int_equal(got.ref_seq, 5000);
	assert_int_equal(got.has_ref_sig, 1);
	assert_int_equal(got.mirror_seq, 0);
	assert_int_equal(got.last_sync_ms, 0);
	assert_string_equal(got.sync_error, "");
	store_repo_clear(&got);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zExt", &got), 0);
	assert_int_equal(got.is_external, 1);
	assert_int_equal(got.ref_seq, 6000);
	assert_int_equal(got.has_ref_sig, 0);
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:zExt", &gr, &n), 0);
	assert_int_equal(n, 1);
	store_refs_free(gr, n);
	struct store_node nd;
	assert_int_equal(store_node_get(fx->st, "did:key:zP", &nd), 0);
	assert_int_equal(nd.last_seen_ms, 7000);
	store_node_clear(&nd);

	/* The new state works on the migrated database and survives a reopen (no second
	 * migration). */
	assert_int_equal(store_repo_set_sync(fx->st, "did:repo:zExt", 6000, 123456, "x"), 0);
	assert_int_equal(store_clone_set(fx->st, "did:repo:zExt", "/home/u/ext", 6000), 0);
	store_free(fx->st);
	fx->st = NULL;
	open_store(fx);
	assert_int_equal(store_schema_version(fx->st), 3);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zExt", &got), 0);
	assert_int_equal(got.mirror_seq, 6000);
	assert_int_equal(got.last_sync_ms, 123456);
	assert_string_equal(got.sync_error, "x");
	store_repo_clear(&got);
	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(c[0].path, "/home/u/ext");
	store_clone_list_free(c, n);
	/* The migrated table cascades like a new one. */
	assert_int_equal(store_repo_remove(fx->st, "did:repo:zExt"), 0);
	assert_int_equal(store_clone_list(fx->st, NULL, &c, &n), 0);
	assert_int_equal(n, 0);
}

static void test_newer_schema_refused(void **state)
{
	struct fx *fx = *state;
	char want[128];

	raw_exec(fx->dbpath, "CREATE TABLE t(x); PRAGMA user_version = 999;");
	assert_int_equal(store_open(fx->root, &fx->st), ME_EDB);
	snprintf(want, sizeof(want),
		 "database schema version 999 is newer than this megaengined supports (%d)",
		 STORE_SCHEMA_VERSION);
	assert_string_equal(store_errmsg(fx->st), want);
	/* The refused database is left untouched. */
	char v[32];
	raw_query(fx->dbpath, "PRAGMA user_version", v, sizeof(v));
	assert_string_equal(v, "999");
	raw_query(fx->dbpath, "SELECT count(*) FROM sqlite_master WHERE name = 'repos'", v, sizeof(v));
	assert_string_equal(v, "0");
}

static void test_not_a_database(void **state)
{
	struct fx *fx = *state;
	FILE *f = fopen(fx->dbpath, "w");

	assert_non_null(f);
	fputs("this is not an SQLite database, just some text that is long enough......\n", f);
	fclose(f);
	assert_int_equal(store_open(fx->root, &fx->st), ME_EDB);
	assert_non_null(strstr(store_errmsg(fx->st), "not a database"));
}

static void test_symlink_refused(void **state)
{
	struct fx *fx = *state;
	char target[128];

	snprintf(target, sizeof(target), "%s/elsewhere.db", fx->root);
	assert_int_equal(symlink(target, fx->dbpath), 0);
	assert_int_equal(store_open(fx->root, &fx->st), ME_EDB);
	assert_int_equal(access(target, F_OK), -1);
}

static void test_strings_roundtrip(void **state)
{
	struct fx *fx = *state;
	const char *evil = "it's a \"quoted\" name'); DROP TABLE repos; -- \xc3\xa9\xe2\x82\xac\xf0\x9f\x9a\x80";
	struct store_repo r = mkrepo("did:repo:z'\"", evil, "/src/caf\xc3\xa9 'q'"), got;
	struct store_ref refs[] = { { "refs/heads/\xc3\xa9t\xc3\xa9", "'; --" } };
	struct store_ref *gr;
	size_t n;

	open_store(fx);
	r.description = "line1\nline2\t\"tab\" \\ backslash %s %n";
	assert_int_equal(store_repo_add(fx->st, &r, refs, 1), 0);
	assert_int_equal(store_repo_get(fx->st, "did:repo:z'\"", &got), 0);
	assert_string_equal(got.name, evil);
	assert_string_equal(got.description, r.description);
	assert_string_equal(got.path, "/src/caf\xc3\xa9 'q'");
	store_repo_clear(&got);
	assert_int_equal(store_repo_find_path(fx->st, "/src/caf\xc3\xa9 'q'", &got), 0);
	assert_string_equal(got.id, "did:repo:z'\"");
	store_repo_clear(&got);
	assert_int_equal(store_refs_get(fx->st, "did:repo:z'\"", &gr, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(gr[0].name, "refs/heads/\xc3\xa9t\xc3\xa9");
	assert_string_equal(gr[0].oid, "'; --");
	store_refs_free(gr, n);
	/* A LIKE-ish or wildcard id does not match anything else. */
	assert_int_equal(store_repo_get(fx->st, "%", &got), ME_ENOTFOUND);
	assert_int_equal(store_repo_remove(fx->st, "did:repo:z'\"' OR 1=1 --"), ME_ENOTFOUND);

	struct store_node nd = { "did:key:z\xe2\x82\xac'", "\xf0\x9f\x9a\x80 o'neil", "", 0, "", 0, 0, 0 };
	struct store_node *list;
	assert_int_equal(store_node_upsert(fx->st, &nd), 0);
	assert_int_equal(store_node_list(fx->st, &list, &n), 0);
	assert_int_equal(n, 1);
	assert_string_equal(list[0].id, nd.id);
	assert_string_equal(list[0].alias, nd.alias);
	store_node_list_free(list, n);
}

static void test_bad_args(void **state)
{
	struct fx *fx = *state;
	struct store_repo r = mkrepo(NULL, "x", "/x");
	struct store *st = NULL;

	assert_int_equal(store_open("", &st), ME_EINVAL);
	store_free(st);
	open_store(fx);
	assert_int_equal(store_repo_add(fx->st, &r, NULL, 0), ME_EINVAL);
	r.id = "did:repo:zR";
	struct store_ref bad[] = { { "refs/heads/x", NULL } };
	assert_int_equal(store_repo_add(fx->st, &r, bad, 1), ME_EINVAL);
	assert_int_equal(store_repo_get(fx->st, "did:repo:zR", &r), ME_ENOTFOUND);
	assert_string_equal(store_errmsg(NULL), "no database");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_open_creates, setup, teardown),
		cmocka_unit_test_setup_teardown(test_open_umask, setup, teardown),
		cmocka_unit_test_setup_teardown(test_repo_crud, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refs_set, setup, teardown),
		cmocka_unit_test_setup_teardown(test_nodes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refstate, setup, teardown),
		cmocka_unit_test_setup_teardown(test_upsert_external, setup, teardown),
		cmocka_unit_test_setup_teardown(test_nodes_seen, setup, teardown),
		cmocka_unit_test_setup_teardown(test_sync_state, setup, teardown),
		cmocka_unit_test_setup_teardown(test_clones, setup, teardown),
		cmocka_unit_test_setup_teardown(test_migrate_v1, setup, teardown),
		cmocka_unit_test_setup_teardown(test_migrate_v2, setup, teardown),
		cmocka_unit_test_setup_teardown(test_newer_schema_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_not_a_database, setup, teardown),
		cmocka_unit_test_setup_teardown(test_symlink_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_strings_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bad_args, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
