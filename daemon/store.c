#include "daemon/store.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "common/err.h"

#define STORE_DB_FILE "megaengine.db"
#define STORE_BUSY_MS 5000

/* migrations[i] brings the schema from version i to i + 1. Append only; never edit. */
static const char *const migrations[STORE_SCHEMA_VERSION] = {
	/* 0 -> 1 */
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
	"CREATE INDEX repos_path ON repos(path);",
	/* 1 -> 2: the creator's signed ref state; when a node was last heard from. */
	"ALTER TABLE repos ADD COLUMN ref_seq INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE repos ADD COLUMN ref_sig BLOB;"
	"ALTER TABLE nodes ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;"
	"CREATE INDEX nodes_last_seen ON nodes(last_seen DESC, id);",
	/* 2 -> 3: replication state of a repository's mirror; working copies made by clone. */
	"ALTER TABLE repos ADD COLUMN mirror_seq INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE repos ADD COLUMN last_sync_ms INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE repos ADD COLUMN sync_error TEXT NOT NULL DEFAULT '';"
	"CREATE TABLE clones ("
	" repo_id TEXT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,"
	" path TEXT NOT NULL,"
	" seq INTEGER NOT NULL DEFAULT 0,"
	" updated_at INTEGER NOT NULL,"
	" PRIMARY KEY (repo_id, path));",
};

enum stmt_id {
	S_BEGIN,
	S_COMMIT,
	S_ROLLBACK,
	S_REPO_INSERT,
	S_REPO_GET,
	S_REPO_FIND_PATH,
	S_REPO_LIST,
	S_REPO_DELETE,
	S_REPO_TOUCH,
	S_REPO_COUNT,
	S_REPO_SET_REFSTATE,
	S_REPO_EXT_STATE,
	S_REPO_EXT_UPDATE,
	S_REPO_SET_SYNC,
	S_REF_INSERT,
	S_REF_CLEAR,
	S_REF_LIST,
	S_NODE_UPSERT,
	S_NODE_GET,
	S_NODE_LIST,
	S_NODE_DELETE,
	S_NODE_COUNT,
	S_CLONE_SET,
	S_CLONE_LIST,
	S_CLONE_LIST_ALL,
	S_CLONE_DELETE,
	S__COUNT
};

/* The columns a new repository row is inserted with (the others keep their defaults). */
#define REPO_INSERT_COLS "id, name, creator, description, path, is_external, root_commit, head, " \
			 "created_at, updated_at, ref_seq, ref_sig"
#define REPO_COLS REPO_INSERT_COLS ", mirror_seq, last_sync_ms, sync_error"
#define CLONE_COLS "repo_id, path, seq, updated_at"
#define NODE_COLS "id, alias, addresses, node_type, version, created_at, updated_at, last_seen"

static const char *const stmt_sql[S__COUNT] = {
	[S_BEGIN] = "BEGIN IMMEDIATE",
	[S_COMMIT] = "COMMIT",
	[S_ROLLBACK] = "ROLLBACK",
	[S_REPO_INSERT] = "INSERT INTO repos (" REPO_INSERT_COLS ")"
			  " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
	[S_REPO_GET] = "SELECT " REPO_COLS " FROM repos WHERE id = ?1",
	[S_REPO_FIND_PATH] = "SELECT " REPO_COLS " FROM repos WHERE path = ?1 AND is_external = 0"
			     " ORDER BY created_at, id LIMIT 1",
	[S_REPO_LIST] = "SELECT " REPO_COLS " FROM repos ORDER BY name, id",
	[S_REPO_DELETE] = "DELETE FROM repos WHERE id = ?1",
	[S_REPO_TOUCH] = "UPDATE repos SET updated_at = ?2 WHERE id = ?1",
	[S_REPO_COUNT] = "SELECT count(*) FROM repos",
	[S_REPO_SET_REFSTATE] = "UPDATE repos SET head = ?2, ref_seq = ?3, ref_sig = ?4,"
				" updated_at = ?5 WHERE id = ?1",
	[S_REPO_EXT_STATE] = "SELECT is_external, ref_seq, creator, root_commit FROM repos"
			     " WHERE id = ?1",
	/* The parameter numbers of S_REPO_INSERT (see bind_repo); some are left unused. */
	[S_REPO_EXT_UPDATE] = "UPDATE repos SET name = ?2, description = ?4, head = ?8,"
			      " updated_at = ?10, ref_seq = ?11, ref_sig = ?12"
			      " WHERE id = ?1 AND is_external = 1",
	/* A negative number or a NULL error keeps the stored value. */
	[S_REPO_SET_SYNC] = "UPDATE repos SET"
			    " mirror_seq = CASE WHEN ?2 < 0 THEN mirror_seq ELSE ?2 END,"
			    " last_sync_ms = CASE WHEN ?3 < 0 THEN last_sync_ms ELSE ?3 END,"
			    " sync_error = coalesce(?4, sync_error) WHERE id = ?1",
	[S_REF_INSERT] = "INSERT INTO refs (repo_id, ref_name, oid, updated_at) VALUES (?1, ?2, ?3, ?4)",
	[S_REF_CLEAR] = "DELETE FROM refs WHERE repo_id = ?1",
	[S_REF_LIST] = "SELECT ref_name, oid FROM refs WHERE repo_id = ?1 ORDER BY ref_name",
	[S_NODE_UPSERT] = "INSERT INTO nodes (" NODE_COLS ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
			  " ON CONFLICT (id) DO UPDATE SET alias = excluded.alias,"
			  " addresses = excluded.addresses, node_type = excluded.node_type,"
			  " version = excluded.version, updated_at = excluded.updated_at,"
			  " last_seen = max(nodes.last_seen, excluded.last_seen)",
	[S_NODE_GET] = "SELECT " NODE_COLS " FROM nodes WHERE id = ?1",
	[S_NODE_LIST] = "SELECT " NODE_COLS " FROM nodes ORDER BY last_seen DESC, id",
	[S_NODE_DELETE] = "DELETE FROM nodes WHERE id = ?1",
	[S_NODE_COUNT] = "SELECT count(*) FROM nodes",
	[S_CLONE_SET] = "INSERT INTO clones (" CLONE_COLS ") VALUES (?1, ?2, ?3, ?4)"
			" ON CONFLICT (repo_id, path) DO UPDATE SET seq = excluded.seq,"
			" updated_at = excluded.updated_at",
	[S_CLONE_LIST] = "SELECT " CLONE_COLS " FROM clones WHERE repo_id = ?1 ORDER BY path",
	[S_CLONE_LIST_ALL] = "SELECT " CLONE_COLS " FROM clones ORDER BY repo_id, path",
	[S_CLONE_DELETE] = "DELETE FROM clones WHERE repo_id = ?1 AND path = ?2",
};

struct store {
	sqlite3 *db;
	sqlite3_stmt *stmt[S__COUNT];
	char err[512];
};

__attribute__((format(printf, 2, 3)))
static void set_err(struct store *st, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(st->err, sizeof(st->err), fmt, ap);
	va_end(ap);
}

/* Records the connection's last error with some context and maps it to an ME_E* code. */
static int db_fail(struct store *st, const char *what)
{
	int ec = sqlite3_errcode(st->db);

	set_err(st, "%s: %s", what, sqlite3_errmsg(st->db));
	return ec == SQLITE_NOMEM ? ME_ENOMEM : ME_EDB;
}

static int no_memory(struct store *st)
{
	set_err(st, "out of memory");
	return ME_ENOMEM;
}

static void stmt_done(sqlite3_stmt *s)
{
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
}

/* The caller's strings outlive every use: statements are reset before returning. */
static int bind_text(sqlite3_stmt *s, int i, const char *v)
{
	return sqlite3_bind_text(s, i, v != NULL ? v : "", -1, SQLITE_STATIC);
}

/* Binds a signature, or NULL when there is none. */
static int bind_sig(sqlite3_stmt *s, int i, const uint8_t *sig)
{
	if (sig == NULL)
		return sqlite3_bind_null(s, i);
	return sqlite3_bind_blob(s, i, sig, STORE_SIG_LEN, SQLITE_STATIC);
}

/* Records a failure to bind the parameters of s as what, then resets s. */
static int bind_fail(struct store *st, sqlite3_stmt *s, const char *what)
{
	int rc = db_fail(st, what);

	stmt_done(s);
	return rc;
}

/* Binds key to ?1 of s. */
static int bind_key(struct store *st, sqlite3_stmt *s, const char *key, const char *what)
{
	if (bind_text(s, 1, key) != SQLITE_OK)
		return bind_fail(st, s, what);
	return 0;
}

static int64_t now_or(int64_t t)
{
	return t != 0 ? t : (int64_t)time(NULL);
}

/* Steps a statement that returns no rows, then resets it. */
static int step_done(struct store *st, sqlite3_stmt *s, const char *what)
{
	int rc = 0;

	if (sqlite3_step(s) != SQLITE_DONE)
		rc = db_fail(st, what);
	stmt_done(s);
	return rc;
}

/* Steps an INSERT, then resets it. ME_EEXIST when the primary key is taken: the message is then
 * the caller's to set. */
static int step_insert(struct store *st, sqlite3_stmt *s, const char *what)
{
	int rc = 0;

	if (sqlite3_step(s) != SQLITE_DONE) {
		if (sqlite3_extended_errcode(st->db) == SQLITE_CONSTRAINT_PRIMARYKEY)
			rc = ME_EEXIST;
		else
			rc = db_fail(st, what);
	}
	stmt_done(s);
	return rc;
}

/* Steps s, a bound statement that writes the row of key, then resets it. ME_ENOTFOUND
 * ("no <noun> <key>") when there is no such row. */
static int step_changed(struct store *st, sqlite3_stmt *s, const char *what, const char *noun,
			const char *key)
{
	int rc;

	if ((rc = step_done(st, s, what)) < 0)
		return rc;
	if (sqlite3_changes(st->db) == 0) {
		set_err(st, "no %s %s", noun, key);
		return ME_ENOTFOUND;
	}
	return 0;
}

static int tx_begin(struct store *st)
{
	return step_done(st, st->stmt[S_BEGIN], "begin transaction");
}

static int tx_commit(struct store *st)
{
	return step_done(st, st->stmt[S_COMMIT], "commit");
}

/* Keeps the message of the failure that caused the rollback. */
static void tx_rollback(struct store *st)
{
	if (sqlite3_get_autocommit(st->db))
		return;
	sqlite3_step(st->stmt[S_ROLLBACK]);
	stmt_done(st->stmt[S_ROLLBACK]);
}

/* Ends the transaction that tx_begin started: commits it when rc (the outcome of its work) is 0,
 * rolls it back when that or the commit failed. Returns rc or the commit's failure. */
static int tx_end(struct store *st, int rc)
{
	if (rc == 0)
		rc = tx_commit(st);
	if (rc < 0)
		tx_rollback(st);
	return rc;
}

static char *col_dup(sqlite3_stmt *s, int i)
{
	const unsigned char *t;

	if (sqlite3_column_type(s, i) == SQLITE_NULL)
		return strdup("");
	if ((t = sqlite3_column_text(s, i)) == NULL)
		return NULL; /* out of memory */
	return strdup((const char *)t);
}

void store_repo_clear(struct store_repo *r)
{
	if (r == NULL)
		return;
	free(r->id);
	free(r->name);
	free(r->creator);
	free(r->description);
	free(r->path);
	free(r->root_commit);
	free(r->head);
	free(r->sync_error);
	memset(r, 0, sizeof(*r));
}

void store_repo_list_free(struct store_repo *r, size_t n)
{
	if (r == NULL)
		return;
	for (size_t i = 0; i < n; i++)
		store_repo_clear(&r[i]);
	free(r);
}

static void ref_clear(struct store_ref *r)
{
	free(r->name);
	free(r->oid);
	memset(r, 0, sizeof(*r));
}

void store_refs_free(struct store_ref *r, size_t n)
{
	if (r == NULL)
		return;
	for (size_t i = 0; i < n; i++)
		ref_clear(&r[i]);
	free(r);
}

static void clone_clear(struct store_clone *c)
{
	free(c->repo_id);
	free(c->path);
	memset(c, 0, sizeof(*c));
}

void store_clone_list_free(struct store_clone *c, size_t n)
{
	if (c == NULL)
		return;
	for (size_t i = 0; i < n; i++)
		clone_clear(&c[i]);
	free(c);
}

void store_node_clear(struct store_node *n)
{
	if (n == NULL)
		return;
	free(n->id);
	free(n->alias);
	free(n->addresses);
	free(n->version);
	memset(n, 0, sizeof(*n));
}

void store_node_list_free(struct store_node *n, size_t cnt)
{
	if (n == NULL)
		return;
	for (size_t i = 0; i < cnt; i++)
		store_node_clear(&n[i]);
	free(n);
}

/* --- reading rows ------------------------------------------------------------------------- */

/* Reads the current row of s into *row. On failure *row holds nothing to free. */
typedef int (*read_row_fn)(struct store *st, sqlite3_stmt *s, void *row);
/* Frees an array of n rows that a read_row_fn filled. */
typedef void (*free_rows_fn)(void *rows, size_t n);

/* Reads a row selected with REPO_COLS into a struct store_repo. */
static int read_repo(struct store *st, sqlite3_stmt *s, void *row)
{
	struct store_repo *r = row;
	int oom = 0;

	memset(r, 0, sizeof(*r));
	r->id = col_dup(s, 0);
	r->name = col_dup(s, 1);
	r->creator = col_dup(s, 2);
	r->description = col_dup(s, 3);
	r->path = col_dup(s, 4);
	r->is_external = sqlite3_column_int64(s, 5) != 0;
	r->root_commit = col_dup(s, 6);
	r->head = col_dup(s, 7);
	r->created_at = sqlite3_column_int64(s, 8);
	r->updated_at = sqlite3_column_int64(s, 9);
	r->ref_seq = sqlite3_column_int64(s, 10);
	/* Anything but a blob of the right size is no signature. */
	if (sqlite3_column_type(s, 11) == SQLITE_BLOB) {
		const void *b = sqlite3_column_blob(s, 11);
		int len = sqlite3_column_bytes(s, 11);
		if (b != NULL && len == STORE_SIG_LEN) {
			memcpy(r->ref_sig, b, STORE_SIG_LEN);
			r->has_ref_sig = 1;
		} else if (b == NULL && len > 0) {
			oom = 1;
		}
	}
	r->mirror_seq = sqlite3_column_int64(s, 12);
	r->last_sync_ms = sqlite3_column_int64(s, 13);
	r->sync_error = col_dup(s, 14);
	if (oom || !r->id || !r->name || !r->creator || !r->description || !r->path ||
	    !r->root_commit || !r->head || !r->sync_error) {
		store_repo_clear(r);
		return no_memory(st);
	}
	return 0;
}

/* Reads a row selected with NODE_COLS into a struct store_node. */
static int read_node(struct store *st, sqlite3_stmt *s, void *row)
{
	struct store_node *n = row;

	memset(n, 0, sizeof(*n));
	n->id = col_dup(s, 0);
	n->alias = col_dup(s, 1);
	n->addresses = col_dup(s, 2);
	n->node_type = sqlite3_column_int(s, 3);
	n->version = col_dup(s, 4);
	n->created_at = sqlite3_column_int64(s, 5);
	n->updated_at = sqlite3_column_int64(s, 6);
	n->last_seen_ms = sqlite3_column_int64(s, 7);
	if (!n->id || !n->alias || !n->addresses || !n->version) {
		store_node_clear(n);
		return no_memory(st);
	}
	return 0;
}

/* Reads a row of S_REF_LIST (ref_name, oid) into a struct store_ref. */
static int read_ref(struct store *st, sqlite3_stmt *s, void *row)
{
	struct store_ref *ref = row;

	ref->name = col_dup(s, 0);
	ref->oid = col_dup(s, 1);
	if (ref->name == NULL || ref->oid == NULL) {
		ref_clear(ref);
		return no_memory(st);
	}
	return 0;
}

/* Reads a row selected with CLONE_COLS into a struct store_clone. */
static int read_clone(struct store *st, sqlite3_stmt *s, void *row)
{
	struct store_clone *c = row;

	memset(c, 0, sizeof(*c));
	c->repo_id = col_dup(s, 0);
	c->path = col_dup(s, 1);
	c->seq = sqlite3_column_int64(s, 2);
	c->updated_at = sqlite3_column_int64(s, 3);
	if (c->repo_id == NULL || c->path == NULL) {
		clone_clear(c);
		return no_memory(st);
	}
	return 0;
}

static void free_clone_rows(void *rows, size_t n)
{
	store_clone_list_free(rows, n);
}

static void free_repo_rows(void *rows, size_t n)
{
	store_repo_list_free(rows, n);
}

static void free_node_rows(void *rows, size_t n)
{
	store_node_list_free(rows, n);
}

static void free_ref_rows(void *rows, size_t n)
{
	store_refs_free(rows, n);
}

/* Returns arr (of elements of size elsz) grown so that element n fits, or NULL (arr is then
 * left as it was). */
static void *grow(struct store *st, void *arr, size_t *cap, size_t n, size_t elsz)
{
	void *p;
	size_t ncap;

	if (n < *cap)
		return arr;
	ncap = *cap ? *cap * 2 : 16;
	if (ncap < *cap || ncap > SIZE_MAX / elsz || (p = realloc(arr, ncap * elsz)) == NULL) {
		no_memory(st);
		return NULL;
	}
	*cap = ncap;
	return p;
}

/* --- opening and migrating --------------------------------------------------------------- */

static int exec_sql(struct store *st, const char *sql, const char *what)
{
	if (sqlite3_exec(st->db, sql, NULL, NULL, NULL) != SQLITE_OK)
		return db_fail(st, what);
	return 0;
}

/* Prepares a constant query and steps it to its first row. The caller finalizes *s, whatever
 * this returns. */
static int query_row(struct store *st, const char *sql, const char *what, sqlite3_stmt **s)
{
	*s = NULL;
	if (sqlite3_prepare_v2(st->db, sql, -1, s, NULL) != SQLITE_OK)
		return db_fail(st, what);
	if (sqlite3_step(*s) != SQLITE_ROW)
		return db_fail(st, what);
	return 0;
}

/* Runs a constant single-column query and returns its first row's value as text. */
static int query_text(struct store *st, const char *sql, const char *what, char *out, size_t outsz)
{
	sqlite3_stmt *s;
	const unsigned char *t;
	int rc;

	if ((rc = query_row(st, sql, what, &s)) == 0) {
		if ((t = sqlite3_column_text(s, 0)) != NULL) {
			snprintf(out, outsz, "%s", (const char *)t);
		} else {
			set_err(st, "%s: no value", what);
			rc = ME_EDB;
		}
	}
	sqlite3_finalize(s);
	return rc;
}

static int query_int(struct store *st, const char *sql, const char *what, int64_t *out)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = query_row(st, sql, what, &s)) == 0)
		*out = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	return rc;
}

static int schema_version(struct store *st, int *v)
{
	int64_t x = 0;
	int rc;

	if ((rc = query_int(st, "PRAGMA user_version", "read schema version", &x)) < 0)
		return rc;
	if (x > STORE_SCHEMA_VERSION) {
		set_err(st, "database schema version %lld is newer than this megaengined supports (%d)",
			(long long)x, STORE_SCHEMA_VERSION);
		return ME_EDB;
	}
	if (x < 0) {
		set_err(st, "database schema version %lld is invalid", (long long)x);
		return ME_EDB;
	}
	*v = (int)x;
	return 0;
}

/* Applies the missing migrations, one transaction each. The version is re-read under the
 * write lock so that two processes opening the same file do not migrate twice. */
static int migrate(struct store *st)
{
	char sql[64], what[64];
	int v, rc;

	if ((rc = schema_version(st, &v)) < 0)
		return rc;
	while (v < STORE_SCHEMA_VERSION) {
		if ((rc = exec_sql(st, "BEGIN IMMEDIATE", "begin migration")) < 0)
			return rc;
		if ((rc = schema_version(st, &v)) < 0)
			goto fail;
		if (v < STORE_SCHEMA_VERSION) {
			snprintf(what, sizeof(what), "migrate schema %d -> %d", v, v + 1);
			if ((rc = exec_sql(st, migrations[v], what)) < 0)
				goto fail;
			/* PRAGMA takes no parameters; the value is our own integer. */
			snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", v + 1);
			if ((rc = exec_sql(st, sql, what)) < 0)
				goto fail;
			v++;
		}
		if ((rc = exec_sql(st, "COMMIT", "commit migration")) < 0)
			goto fail;
	}
	return 0;
fail:
	if (!sqlite3_get_autocommit(st->db))
		sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
	return rc;
}

/* Creates the database file owner-only before SQLite sees it (SQLite would use 0644 & ~umask;
 * its -wal and -shm files copy the database file's mode). An existing file is left alone. */
static int db_file_create(struct store *st, const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	int e;

	if (fd < 0) {
		if ((e = errno) == EEXIST)
			return 0;
		set_err(st, "cannot create %s: %s", path, strerror(e));
		return e == ENOMEM ? ME_ENOMEM : ME_EDB;
	}
	if (fchmod(fd, 0600) < 0) {
		set_err(st, "cannot chmod %s: %s", path, strerror(errno));
		close(fd);
		return ME_EDB;
	}
	close(fd);
	return 0;
}

static int db_configure(struct store *st)
{
	char mode[32];
	int64_t fk = 0;
	int rc;

	sqlite3_busy_timeout(st->db, STORE_BUSY_MS);
	sqlite3_extended_result_codes(st->db, 1);
#ifdef SQLITE_DBCONFIG_DEFENSIVE
	sqlite3_db_config(st->db, SQLITE_DBCONFIG_DEFENSIVE, 1, NULL);
#endif
#ifdef SQLITE_DBCONFIG_TRUSTED_SCHEMA
	sqlite3_db_config(st->db, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, NULL);
#endif
	if ((rc = query_text(st, "PRAGMA journal_mode = WAL", "enable WAL", mode, sizeof(mode))) < 0)
		return rc;
	if (strcasecmp(mode, "wal") != 0) {
		set_err(st, "cannot enable WAL journal mode (journal mode is %s)", mode);
		return ME_EDB;
	}
	if ((rc = exec_sql(st, "PRAGMA synchronous = NORMAL", "set synchronous")) < 0)
		return rc;
	if ((rc = exec_sql(st, "PRAGMA foreign_keys = ON", "enable foreign keys")) < 0)
		return rc;
	if ((rc = query_int(st, "PRAGMA foreign_keys", "enable foreign keys", &fk)) < 0)
		return rc;
	if (fk != 1) {
		set_err(st, "this SQLite does not enforce foreign keys");
		return ME_EDB;
	}
	return 0;
}

static int stmts_prepare(struct store *st)
{
	for (int i = 0; i < S__COUNT; i++) {
		if (sqlite3_prepare_v3(st->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
				       &st->stmt[i], NULL) != SQLITE_OK)
			return db_fail(st, "prepare statement");
	}
	return 0;
}

static void db_close(struct store *st)
{
	for (int i = 0; i < S__COUNT; i++) {
		sqlite3_finalize(st->stmt[i]);
		st->stmt[i] = NULL;
	}
	if (st->db != NULL)
		sqlite3_close_v2(st->db);
	st->db = NULL;
}

int store_open(const char *root, struct store **out)
{
	struct store *st;
	char path[PATH_MAX];
	int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
	int n, rc;

	if (out == NULL)
		return ME_EINVAL;
	*out = NULL;
	if ((st = calloc(1, sizeof(*st))) == NULL)
		return ME_ENOMEM;
	/* Returned even on failure so that the caller can read store_errmsg(). */
	*out = st;
	if (root == NULL || *root == '\0') {
		set_err(st, "no data directory");
		return ME_EINVAL;
	}
	n = snprintf(path, sizeof(path), "%s/%s", root, STORE_DB_FILE);
	if (n < 0 || (size_t)n >= sizeof(path)) {
		set_err(st, "database path is too long");
		return ME_EINVAL;
	}
	if ((rc = db_file_create(st, path)) < 0)
		return rc;
#ifdef SQLITE_OPEN_NOFOLLOW
	flags |= SQLITE_OPEN_NOFOLLOW;
#endif
	if (sqlite3_open_v2(path, &st->db, flags, NULL) != SQLITE_OK) {
		if (st->db == NULL) {
			set_err(st, "cannot open %s: out of memory", path);
			return ME_ENOMEM;
		}
		set_err(st, "cannot open %s: %s", path, sqlite3_errmsg(st->db));
		rc = sqlite3_errcode(st->db) == SQLITE_NOMEM ? ME_ENOMEM : ME_EDB;
		db_close(st);
		return rc;
	}
	if ((rc = db_configure(st)) < 0 || (rc = migrate(st)) < 0 || (rc = stmts_prepare(st)) < 0) {
		db_close(st);
		return rc;
	}
	st->err[0] = '\0';
	return 0;
}

void store_free(struct store *st)
{
	if (st == NULL)
		return;
	db_close(st);
	free(st);
}

const char *store_errmsg(const struct store *st)
{
	if (st == NULL)
		return "no database";
	return st->err[0] ? st->err : "no error";
}

/* Checks a public call's arguments: ME_EINVAL (with no message: there may be no handle) when st
 * is NULL or args_ok is 0, ME_EDB when the database is not open. */
static int store_usable(struct store *st, int args_ok)
{
	if (st == NULL || !args_ok)
		return ME_EINVAL;
	if (st->db == NULL) {
		set_err(st, "database is not open");
		return ME_EDB;
	}
	return 0;
}

int store_schema_version(struct store *st)
{
	int64_t v = 0;
	int rc;

	if ((rc = store_usable(st, 1)) < 0)
		return rc;
	if ((rc = query_int(st, "PRAGMA user_version", "read schema version", &v)) < 0)
		return rc;
	if (v < 0 || v > INT_MAX) {
		set_err(st, "database schema version %lld is invalid", (long long)v);
		return ME_EDB;
	}
	return (int)v;
}

/* --- queries shared by repositories, refs and nodes --------------------------------------- */

/* Runs statement sid bound to key and reads its one row into out. ME_ENOTFOUND
 * ("no <noun> <key>") when there is none. */
static int get_row(struct store *st, enum stmt_id sid, const char *key, read_row_fn read_row,
		   void *out, const char *what, const char *noun)
{
	sqlite3_stmt *s = st->stmt[sid];
	int rc, step;

	if ((rc = bind_key(st, s, key, what)) < 0)
		return rc;
	step = sqlite3_step(s);
	if (step == SQLITE_ROW) {
		rc = read_row(st, s, out);
	} else if (step == SQLITE_DONE) {
		set_err(st, "no %s %s", noun, key);
		rc = ME_ENOTFOUND;
	} else {
		rc = db_fail(st, what);
	}
	stmt_done(s);
	return rc;
}

/* Reads every row of statement sid (with key bound to ?1 unless key is NULL) into a new array
 * of elements of size elsz, which free_rows frees: *rows and *n, NULL and 0 on failure.
 * ME_EINVAL when n is NULL or args_ok is 0 (see store_usable). */
static int list_rows(struct store *st, int args_ok, enum stmt_id sid, const char *key,
		     size_t elsz, read_row_fn read_row, free_rows_fn free_rows, const char *what,
		     void **rows, size_t *n)
{
	sqlite3_stmt *s;
	char *arr = NULL;
	size_t cnt = 0, cap = 0;
	void *p;
	int rc, step;

	*rows = NULL;
	if (n != NULL)
		*n = 0;
	if ((rc = store_usable(st, args_ok && n != NULL)) < 0)
		return rc;
	s = st->stmt[sid];
	if (key != NULL && (rc = bind_key(st, s, key, what)) < 0)
		return rc;
	while ((step = sqlite3_step(s)) == SQLITE_ROW) {
		if ((p = grow(st, arr, &cap, cnt, elsz)) == NULL) {
			rc = ME_ENOMEM;
			break;
		}
		arr = p;
		if ((rc = read_row(st, s, arr + cnt * elsz)) < 0)
			break;
		cnt++;
	}
	if (rc == 0 && step != SQLITE_DONE)
		rc = db_fail(st, what);
	stmt_done(s);
	if (rc < 0) {
		free_rows(arr, cnt);
		return rc;
	}
	*rows = arr;
	*n = cnt;
	return 0;
}

/* Deletes the row of statement sid bound to key, checking the arguments first (see
 * store_usable). ME_ENOTFOUND ("no <noun> <key>") when there is none. */
static int delete_row(struct store *st, enum stmt_id sid, const char *key, const char *what,
		      const char *noun)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = store_usable(st, key != NULL)) < 0)
		return rc;
	s = st->stmt[sid];
	if ((rc = bind_key(st, s, key, what)) < 0)
		return rc;
	return step_changed(st, s, what, noun, key);
}

/* Runs the count query sid into *n, checking the arguments first (see store_usable). */
static int count_rows(struct store *st, enum stmt_id sid, const char *what, int64_t *n)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = store_usable(st, n != NULL)) < 0)
		return rc;
	s = st->stmt[sid];
	if (sqlite3_step(s) == SQLITE_ROW)
		*n = sqlite3_column_int64(s, 0);
	else
		rc = db_fail(st, what);
	stmt_done(s);
	return rc;
}

/* --- repositories and refs ---------------------------------------------------------------- */

/* Inserts refs inside the caller's transaction. */
static int refs_insert(struct store *st, const char *repo_id, const struct store_ref *refs,
		       size_t n, int64_t now)
{
	sqlite3_stmt *s = st->stmt[S_REF_INSERT];
	int rc;

	for (size_t i = 0; i < n; i++) {
		if (refs[i].name == NULL || refs[i].name[0] == '\0' || refs[i].oid == NULL) {
			set_err(st, "ref %zu has no name or oid", i);
			return ME_EINVAL;
		}
		if (bind_text(s, 1, repo_id) != SQLITE_OK || bind_text(s, 2, refs[i].name) != SQLITE_OK ||
		    bind_text(s, 3, refs[i].oid) != SQLITE_OK ||
		    sqlite3_bind_int64(s, 4, now) != SQLITE_OK)
			return bind_fail(st, s, "insert ref");
		if ((rc = step_insert(st, s, "insert ref")) == ME_EEXIST) {
			set_err(st, "duplicate ref %s", refs[i].name);
			return ME_EINVAL;
		}
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* Binds repository r to s in the parameter numbers of S_REPO_INSERT (the order of REPO_COLS),
 * with is_external, path and the times given apart. */
static int bind_repo(struct store *st, sqlite3_stmt *s, const char *what,
		     const struct store_repo *r, int is_external, const char *path, int64_t created,
		     int64_t updated)
{
	if (bind_text(s, 1, r->id) != SQLITE_OK || bind_text(s, 2, r->name) != SQLITE_OK ||
	    bind_text(s, 3, r->creator) != SQLITE_OK || bind_text(s, 4, r->description) != SQLITE_OK ||
	    bind_text(s, 5, path) != SQLITE_OK ||
	    sqlite3_bind_int(s, 6, is_external ? 1 : 0) != SQLITE_OK ||
	    bind_text(s, 7, r->root_commit) != SQLITE_OK || bind_text(s, 8, r->head) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 9, created) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 10, updated) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 11, r->ref_seq) != SQLITE_OK ||
	    bind_sig(s, 12, r->has_ref_sig ? r->ref_sig : NULL) != SQLITE_OK)
		return bind_fail(st, s, what);
	return 0;
}

/* Inserts one repository row inside the caller's transaction. */
static int repo_insert(struct store *st, const struct store_repo *r, int is_external,
		       const char *path, int64_t created, int64_t updated)
{
	sqlite3_stmt *s = st->stmt[S_REPO_INSERT];
	int rc;

	if ((rc = bind_repo(st, s, "insert repository", r, is_external, path, created, updated)) < 0)
		return rc;
	if ((rc = step_insert(st, s, "insert repository")) == ME_EEXIST)
		set_err(st, "repository %s already exists", r->id);
	return rc;
}

/* Replaces a repository's refs inside the caller's transaction. */
static int refs_replace(struct store *st, const char *repo_id, const struct store_ref *refs,
			size_t n, int64_t now)
{
	sqlite3_stmt *s = st->stmt[S_REF_CLEAR];
	int rc;

	if ((rc = bind_key(st, s, repo_id, "delete refs")) < 0)
		return rc;
	if ((rc = step_done(st, s, "delete refs")) < 0)
		return rc;
	return refs_insert(st, repo_id, refs, n, now);
}

/* Inside the caller's transaction: steps s, a bound UPDATE of repository id, then replaces its
 * refs. ME_ENOTFOUND when there is no such repository. */
static int repo_update_refs(struct store *st, sqlite3_stmt *s, const char *what, const char *id,
			    const struct store_ref *refs, size_t n, int64_t now)
{
	int rc;

	if ((rc = step_changed(st, s, what, "repository", id)) < 0)
		return rc;
	return refs_replace(st, id, refs, n, now);
}

static int repo_valid(struct store *st, const struct store_repo *r)
{
	if (r->id == NULL || r->id[0] == '\0' || r->name == NULL || r->creator == NULL) {
		set_err(st, "repository needs an id, a name and a creator");
		return ME_EINVAL;
	}
	if (r->ref_seq < 0) {
		set_err(st, "repository %s: negative ref sequence number", r->id);
		return ME_EINVAL;
	}
	return 0;
}

int store_repo_add(struct store *st, const struct store_repo *r, const struct store_ref *refs,
		   size_t nrefs)
{
	int64_t now = time(NULL);
	int rc;

	if ((rc = store_usable(st, r != NULL && (refs != NULL || nrefs == 0))) < 0)
		return rc;
	if ((rc = repo_valid(st, r)) < 0)
		return rc;
	if ((rc = tx_begin(st)) < 0)
		return rc;
	rc = repo_insert(st, r, r->is_external, r->path, now_or(r->created_at),
			 now_or(r->updated_at));
	if (rc == 0)
		rc = refs_insert(st, r->id, refs, nrefs, now);
	return tx_end(st, rc);
}

int store_repo_get(struct store *st, const char *id, struct store_repo *out)
{
	int rc;

	if (out != NULL)
		memset(out, 0, sizeof(*out));
	if ((rc = store_usable(st, id != NULL && out != NULL)) < 0)
		return rc;
	return get_row(st, S_REPO_GET, id, read_repo, out, "select repository", "repository");
}

int store_repo_find_path(struct store *st, const char *path, struct store_repo *out)
{
	int rc;

	if (out != NULL)
		memset(out, 0, sizeof(*out));
	if ((rc = store_usable(st, path != NULL && out != NULL)) < 0)
		return rc;
	if (path[0] == '\0') {
		set_err(st, "no repository with an empty path");
		return ME_ENOTFOUND;
	}
	return get_row(st, S_REPO_FIND_PATH, path, read_repo, out, "select repository",
		       "repository");
}

int store_repo_list(struct store *st, struct store_repo **out, size_t *n)
{
	void *rows;
	int rc;

	rc = list_rows(st, out != NULL, S_REPO_LIST, NULL, sizeof(struct store_repo), read_repo,
		       free_repo_rows, "list repositories", &rows, n);
	if (out != NULL)
		*out = rows;
	return rc;
}

int store_repo_remove(struct store *st, const char *id)
{
	/* One statement: the refs and working copies go with it (ON DELETE CASCADE) atomically. */
	return delete_row(st, S_REPO_DELETE, id, "delete repository", "repository");
}

int store_refs_set(struct store *st, const char *repo_id, const struct store_ref *refs, size_t n)
{
	sqlite3_stmt *s;
	int64_t now = time(NULL);
	int rc;

	if ((rc = store_usable(st, repo_id != NULL && (refs != NULL || n == 0))) < 0)
		return rc;
	if ((rc = tx_begin(st)) < 0)
		return rc;
	s = st->stmt[S_REPO_TOUCH];
	if (bind_text(s, 1, repo_id) != SQLITE_OK || sqlite3_bind_int64(s, 2, now) != SQLITE_OK)
		rc = bind_fail(st, s, "update repository");
	else
		rc = repo_update_refs(st, s, "update repository", repo_id, refs, n, now);
	return tx_end(st, rc);
}

int store_repo_set_refstate(struct store *st, const char *id, int64_t seq, const char *head,
			    const uint8_t sig[STORE_SIG_LEN], const struct store_ref *refs,
			    size_t n)
{
	sqlite3_stmt *s;
	int64_t now = time(NULL);
	int rc;

	if ((rc = store_usable(st, id != NULL && (refs != NULL || n == 0))) < 0)
		return rc;
	if (seq < 0) {
		set_err(st, "repository %s: negative ref sequence number", id);
		return ME_EINVAL;
	}
	if ((rc = tx_begin(st)) < 0)
		return rc;
	s = st->stmt[S_REPO_SET_REFSTATE];
	if (bind_text(s, 1, id) != SQLITE_OK || bind_text(s, 2, head) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 3, seq) != SQLITE_OK || bind_sig(s, 4, sig) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 5, now) != SQLITE_OK)
		rc = bind_fail(st, s, "update ref state");
	else
		rc = repo_update_refs(st, s, "update ref state", id, refs, n, now);
	return tx_end(st, rc);
}

/* What upsert_external needs to know of an existing row. *found is 0 when there is none. */
struct ext_state {
	int found, is_external;
	int64_t ref_seq;
	int same_origin; /* creator and root_commit agree with the candidate */
};

static int text_eq(sqlite3_stmt *s, int col, const char *v)
{
	const unsigned char *t = sqlite3_column_text(s, col);

	return strcmp(t != NULL ? (const char *)t : "", v != NULL ? v : "") == 0;
}

static int ext_state_get(struct store *st, const struct store_repo *r, struct ext_state *es)
{
	sqlite3_stmt *s = st->stmt[S_REPO_EXT_STATE];
	int rc, step;

	memset(es, 0, sizeof(*es));
	if ((rc = bind_key(st, s, r->id, "select repository")) < 0)
		return rc;
	step = sqlite3_step(s);
	if (step == SQLITE_ROW) {
		es->found = 1;
		es->is_external = sqlite3_column_int64(s, 0) != 0;
		es->ref_seq = sqlite3_column_int64(s, 1);
		es->same_origin = text_eq(s, 2, r->creator) && text_eq(s, 3, r->root_commit);
	} else if (step != SQLITE_DONE) {
		rc = db_fail(st, "select repository");
	}
	stmt_done(s);
	return rc;
}

int store_repo_upsert_external(struct store *st, const struct store_repo *r,
			       const struct store_ref *refs, size_t n, int *changed)
{
	struct ext_state es;
	sqlite3_stmt *s;
	int64_t now = time(NULL), created, updated;
	int rc;

	if (changed != NULL)
		*changed = 0;
	if ((rc = store_usable(st, r != NULL && (refs != NULL || n == 0))) < 0)
		return rc;
	if ((rc = repo_valid(st, r)) < 0)
		return rc;
	created = now_or(r->created_at);
	updated = now_or(r->updated_at);
	if ((rc = tx_begin(st)) < 0)
		return rc;
	if ((rc = ext_state_get(st, r, &es)) < 0)
		return tx_end(st, rc);
	if (!es.found) {
		rc = repo_insert(st, r, 1, "", created, updated);
	} else if (!es.is_external || r->ref_seq <= es.ref_seq) {
		tx_rollback(st); /* nothing to write */
		return 0;
	} else if (!es.same_origin) {
		set_err(st, "repository %s: creator or root commit differs from the stored one",
			r->id);
		rc = ME_EINVAL;
	} else {
		/* S_REPO_EXT_UPDATE uses only some of the parameters bound here. */
		s = st->stmt[S_REPO_EXT_UPDATE];
		rc = bind_repo(st, s, "update repository", r, 1, "", created, updated);
		if (rc == 0)
			rc = step_done(st, s, "update repository");
	}
	if (rc == 0)
		rc = refs_replace(st, r->id, refs, n, now);
	if ((rc = tx_end(st, rc)) == 0 && changed != NULL)
		*changed = 1;
	return rc;
}

int store_refs_get(struct store *st, const char *repo_id, struct store_ref **out, size_t *n)
{
	void *rows;
	int rc;

	rc = list_rows(st, repo_id != NULL && out != NULL, S_REF_LIST, repo_id,
		       sizeof(struct store_ref), read_ref, free_ref_rows, "list refs", &rows, n);
	if (out != NULL)
		*out = rows;
	return rc;
}

int store_repo_count(struct store *st, int64_t *n)
{
	return count_rows(st, S_REPO_COUNT, "count repositories", n);
}

int store_repo_set_sync(struct store *st, const char *id, int64_t mirror_seq,
			int64_t last_sync_ms, const char *error)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = store_usable(st, id != NULL)) < 0)
		return rc;
	s = st->stmt[S_REPO_SET_SYNC];
	if (bind_text(s, 1, id) != SQLITE_OK || sqlite3_bind_int64(s, 2, mirror_seq) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 3, last_sync_ms) != SQLITE_OK ||
	    (error != NULL ? bind_text(s, 4, error) : sqlite3_bind_null(s, 4)) != SQLITE_OK)
		return bind_fail(st, s, "update sync state");
	return step_changed(st, s, "update sync state", "repository", id);
}

/* --- nodes -------------------------------------------------------------------------------- */

int store_node_upsert(struct store *st, const struct store_node *n)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = store_usable(st, n != NULL)) < 0)
		return rc;
	if (n->id == NULL || n->id[0] == '\0') {
		set_err(st, "node needs an id");
		return ME_EINVAL;
	}
	s = st->stmt[S_NODE_UPSERT];
	if (bind_text(s, 1, n->id) != SQLITE_OK || bind_text(s, 2, n->alias) != SQLITE_OK ||
	    bind_text(s, 3, n->addresses) != SQLITE_OK ||
	    sqlite3_bind_int(s, 4, n->node_type) != SQLITE_OK ||
	    bind_text(s, 5, n->version) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 6, now_or(n->created_at)) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 7, now_or(n->updated_at)) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 8, n->last_seen_ms > 0 ? n->last_seen_ms : 0) != SQLITE_OK)
		return bind_fail(st, s, "upsert node");
	return step_done(st, s, "upsert node");
}

int store_node_get(struct store *st, const char *id, struct store_node *out)
{
	int rc;

	if (out != NULL)
		memset(out, 0, sizeof(*out));
	if ((rc = store_usable(st, id != NULL && out != NULL)) < 0)
		return rc;
	return get_row(st, S_NODE_GET, id, read_node, out, "select node", "node");
}

int store_node_delete(struct store *st, const char *id)
{
	return delete_row(st, S_NODE_DELETE, id, "delete node", "node");
}

int store_node_list(struct store *st, struct store_node **out, size_t *n)
{
	void *rows;
	int rc;

	rc = list_rows(st, out != NULL, S_NODE_LIST, NULL, sizeof(struct store_node), read_node,
		       free_node_rows, "list nodes", &rows, n);
	if (out != NULL)
		*out = rows;
	return rc;
}

int store_node_count(struct store *st, int64_t *n)
{
	return count_rows(st, S_NODE_COUNT, "count nodes", n);
}

/* --- working copies ----------------------------------------------------------------------- */

int store_clone_set(struct store *st, const char *repo_id, const char *path, int64_t seq)
{
	sqlite3_stmt *s;
	int rc = 0;

	if ((rc = store_usable(st, repo_id != NULL && path != NULL)) < 0)
		return rc;
	if (path[0] == '\0' || seq < 0) {
		set_err(st, "a working copy needs a path and a non-negative sequence number");
		return ME_EINVAL;
	}
	s = st->stmt[S_CLONE_SET];
	if (bind_text(s, 1, repo_id) != SQLITE_OK || bind_text(s, 2, path) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 3, seq) != SQLITE_OK ||
	    sqlite3_bind_int64(s, 4, (int64_t)time(NULL)) != SQLITE_OK)
		return bind_fail(st, s, "record working copy");
	if (sqlite3_step(s) != SQLITE_DONE) {
		/* The only foreign key: the repository. */
		if (sqlite3_extended_errcode(st->db) == SQLITE_CONSTRAINT_FOREIGNKEY) {
			set_err(st, "no repository %s", repo_id);
			rc = ME_ENOTFOUND;
		} else {
			rc = db_fail(st, "record working copy");
		}
	}
	stmt_done(s);
	return rc;
}

int store_clone_list(struct store *st, const char *repo_id, struct store_clone **out, size_t *n)
{
	void *rows;
	int rc;

	rc = list_rows(st, out != NULL, repo_id != NULL ? S_CLONE_LIST : S_CLONE_LIST_ALL, repo_id,
		       sizeof(struct store_clone), read_clone, free_clone_rows,
		       "list working copies", &rows, n);
	if (out != NULL)
		*out = rows;
	return rc;
}

int store_clone_remove(struct store *st, const char *repo_id, const char *path)
{
	sqlite3_stmt *s;
	int rc;

	if ((rc = store_usable(st, repo_id != NULL && path != NULL)) < 0)
		return rc;
	s = st->stmt[S_CLONE_DELETE];
	if (bind_text(s, 1, repo_id) != SQLITE_OK || bind_text(s, 2, path) != SQLITE_OK)
		return bind_fail(st, s, "delete working copy");
	return step_changed(st, s, "delete working copy", "working copy", path);
}
