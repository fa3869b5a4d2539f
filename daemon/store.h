/* Metadata store: SQLite at $ROOT/megaengine.db (WAL, busy timeout, prepared statements,
 * schema version in PRAGMA user_version with forward migrations). Library code: no logging;
 * errors come back as ME_E* codes with a message in store_errmsg(). */
#ifndef ME_STORE_H
#define ME_STORE_H

#include <stddef.h>
#include <stdint.h>

struct store;

struct store_repo {
	char *id;          /* did:repo:... */
	char *name;
	char *creator;     /* did:key of the creator */
	char *description;
	char *path;        /* absolute path of the working repository ("" for external) */
	int is_external;   /* 1 when learnt from a peer, 0 when added here */
	int64_t created_at; /* unix seconds */
	int64_t updated_at;
	char *root_commit; /* 40 hex */
	char *head;        /* symbolic HEAD target, e.g. refs/heads/main ("" if detached/unknown) */
};

struct store_ref {
	char *name;        /* refs/heads/main */
	char *oid;         /* 40 hex */
};

struct store_node {
	char *id;          /* did:key */
	char *alias;
	char *addresses;   /* comma-separated ip:port list */
	int node_type;
	char *version;
	int64_t created_at;
	int64_t updated_at;
};

#define STORE_SCHEMA_VERSION 1

/* Opens (creating if needed) root/megaengine.db and migrates it. 0 or ME_EDB / ME_ENOMEM. */
int store_open(const char *root, struct store **out);
void store_free(struct store *st);
/* Message of the last failure on this handle (never NULL). */
const char *store_errmsg(const struct store *st);
int store_schema_version(struct store *st);

/* Inserts a repository and its refs in one transaction. ME_EEXIST when the id exists. */
int store_repo_add(struct store *st, const struct store_repo *r, const struct store_ref *refs,
		   size_t nrefs);
/* Fills *out (caller frees with store_repo_clear). ME_ENOTFOUND when absent. */
int store_repo_get(struct store *st, const char *id, struct store_repo *out);
/* Finds the repository added from this absolute path. ME_ENOTFOUND when none. */
int store_repo_find_path(struct store *st, const char *path, struct store_repo *out);
/* All repositories ordered by name, id. Caller frees with store_repo_list_free. */
int store_repo_list(struct store *st, struct store_repo **out, size_t *n);
/* Removes a repository and its refs. ME_ENOTFOUND when absent. */
int store_repo_remove(struct store *st, const char *id);
/* Replaces the refs of a repository (one transaction) and bumps updated_at. */
int store_refs_set(struct store *st, const char *repo_id, const struct store_ref *refs, size_t n);
int store_refs_get(struct store *st, const char *repo_id, struct store_ref **out, size_t *n);
int store_repo_count(struct store *st, int64_t *n);

/* Inserts or updates a node by id (created_at kept, updated_at set). */
int store_node_upsert(struct store *st, const struct store_node *n);
int store_node_list(struct store *st, struct store_node **out, size_t *n);
int store_node_count(struct store *st, int64_t *n);

void store_repo_clear(struct store_repo *r);
void store_repo_list_free(struct store_repo *r, size_t n);
void store_refs_free(struct store_ref *r, size_t n);
void store_node_list_free(struct store_node *n, size_t cnt);

#endif
