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
	struct store_node a = { "did:key:zB", "bob", "10.0.0.1:4433", 1, "0.1.0", 100, 200 };
	struct store_node b = { "did:key:zA", "alice", "", 0, "0.1.0", 0, 0 };
	struct store_node *list;
	size_t n;
	int64_t cnt;

	open_store(fx);
	assert_int_equal(store_node_upsert(fx->st, &a), 0);
	assert_int_equal(store_node_upsert(fx->st, &b), 0);
	assert_int_equal(store_node_count(fx->st, &cnt), 0);
	assert_int_equal(cnt, 2);

	/* Update: created_at kept, the rest replaced, updated_at now. */
	struct store_node a2 = { "did:key:zB", "bobby", "10.0.0.2:4433,[::1]:4433", 2, "0.2.0", 5, 0 };
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

	struct store_node noid = { NULL, "x", "", 0, "", 0, 0 };
	assert_int_equal(store_node_upsert(fx->st, &noid), ME_EINVAL);
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

	struct store_node nd = { "did:key:z\xe2\x82\xac'", "\xf0\x9f\x9a\x80 o'neil", "", 0, "", 0, 0 };
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
		cmocka_unit_test_setup_teardown(test_newer_schema_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_not_a_database, setup, teardown),
		cmocka_unit_test_setup_teardown(test_symlink_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_strings_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bad_args, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
