/* Metadata store: SQLite at $ROOT/megaengine.db (WAL, busy timeout, prepared statements,
 * schema version in PRAGMA user_version with forward migrations). Library code: no logging;
 * errors come back as ME_E* codes with a message in store_errmsg(). */
#ifndef ME_STORE_H
#define ME_STORE_H

#include <stddef.h>
#include <stdint.h>

struct store;

#define STORE_SIG_LEN 64 /* Ed25519 signature */

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
	int64_t ref_seq;   /* the creator's signed ref-state sequence number (unix ms); 0: none */
	uint8_t ref_sig[STORE_SIG_LEN]; /* creator's Ed25519 signature over the ref state */
	int has_ref_sig;   /* ref_sig is set (NULL in the database otherwise) */
	/* Replication of the local mirror (external repositories; see store_repo_set_sync). New
	 * rows start at 0, 0, "": store_repo_add and store_repo_upsert_external never set them. */
	int64_t mirror_seq;   /* seq of the creator-signed ref state the mirror holds; 0: none */
	int64_t last_sync_ms; /* unix ms of the last successful fetch; 0: never */
	char *sync_error;     /* why the last fetch failed; "" when it did not */
};

struct store_ref {
	char *name;        /* refs/heads/main */
	char *oid;         /* 40 hex */
};

/* A working copy made by `mectl repo clone`. */
struct store_clone {
	char *repo_id;
	char *path;         /* absolute path of the working copy */
	int64_t seq;        /* seq of the signed ref state it was last updated to */
	int64_t updated_at; /* unix seconds */
};

struct store_node {
	char *id;          /* did:key */
	char *alias;
	char *addresses;   /* comma-separated ip:port list */
	int node_type;
	char *version;
	int64_t created_at; /* unix seconds */
	int64_t updated_at; /* unix seconds: last store_node_upsert */
	int64_t last_seen_ms; /* unix ms: when the node was last heard from (0: never) */
};

#define STORE_SCHEMA_VERSION 3

/* Opens (creating if needed) root/megaengine.db and migrates it. 0 or ME_EDB / ME_ENOMEM. */
int store_open(const char *root, struct store **out);
void store_free(struct store *st);
/* Message of the last failure on this handle (never NULL). */
const char *store_errmsg(const struct store *st);
int store_schema_version(struct store *st);

/* Inserts a repository and its refs in one transaction (ref_seq and ref_sig included).
 * ME_EEXIST when the id exists. */
int store_repo_add(struct store *st, const struct store_repo *r, const struct store_ref *refs,
		   size_t nrefs);
/* Fills *out (caller frees with store_repo_clear). ME_ENOTFOUND when absent. */
int store_repo_get(struct store *st, const char *id, struct store_repo *out);
/* Finds the repository added from this absolute path. ME_ENOTFOUND when none. */
int store_repo_find_path(struct store *st, const char *path, struct store_repo *out);
/* All repositories ordered by name, id. Caller frees with store_repo_list_free. */
int store_repo_list(struct store *st, struct store_repo **out, size_t *n);
/* Removes a repository, its refs and its working copies. ME_ENOTFOUND when absent. */
int store_repo_remove(struct store *st, const char *id);
/* Replaces the refs of a repository (one transaction) and bumps updated_at. */
int store_refs_set(struct store *st, const char *repo_id, const struct store_ref *refs, size_t n);
int store_refs_get(struct store *st, const char *repo_id, struct store_ref **out, size_t *n);
int store_repo_count(struct store *st, int64_t *n);
/* Replaces a repository's ref state in one transaction: its refs, head (NULL: ""), ref_seq,
 * ref_sig (sig NULL: none) and updated_at (now). Unconditional: the caller decides whether seq
 * is newer. ME_ENOTFOUND when the repository is absent, ME_EINVAL for a negative seq. */
int store_repo_set_refstate(struct store *st, const char *id, int64_t seq, const char *head,
			    const uint8_t sig[STORE_SIG_LEN], const struct store_ref *refs,
			    size_t n);
/* Records a repository learnt from a peer, in one transaction. When r->id is unknown it is
 * inserted as external (is_external = 1, path "": r->is_external and r->path are ignored) with
 * its refs. When it exists as external and r->ref_seq is greater than the stored one, its name,
 * description, head, refs, ref_seq, ref_sig and updated_at are replaced (created_at, creator and
 * root_commit are kept). Otherwise nothing changes: a local repository (is_external = 0) with
 * the same id is never touched and that is not an error. *changed (may be NULL) is 1 when
 * something was written, else 0. ME_EINVAL when r lacks id, name or creator, ref_seq is
 * negative, or a newer r disagrees with the stored external repository on creator or
 * root_commit (both are fixed by the id). */
int store_repo_upsert_external(struct store *st, const struct store_repo *r,
			       const struct store_ref *refs, size_t n, int *changed);
/* Records the replication state of a repository's mirror: mirror_seq and last_sync_ms when not
 * negative, error when not NULL ("" clears it). updated_at is not touched (the repository did
 * not change). ME_ENOTFOUND when the repository is absent. */
int store_repo_set_sync(struct store *st, const char *id, int64_t mirror_seq,
			int64_t last_sync_ms, const char *error);

/* Records (or updates) the working copy at path of repo_id, at signed state seq, with
 * updated_at now. ME_ENOTFOUND when the repository is absent, ME_EINVAL for an empty path or a
 * negative seq. Working copies go with their repository (store_repo_remove). */
int store_clone_set(struct store *st, const char *repo_id, const char *path, int64_t seq);
/* The working copies of repo_id (NULL: of every repository), ordered by repo_id, path. Caller
 * frees with store_clone_list_free. */
int store_clone_list(struct store *st, const char *repo_id, struct store_clone **out,
		     size_t *n);
/* Forgets one working copy (the files are left alone). ME_ENOTFOUND when not recorded. */
int store_clone_remove(struct store *st, const char *repo_id, const char *path);

/* Inserts or updates a node by id: created_at kept, updated_at set (now when 0), alias,
 * addresses, node_type and version replaced, last_seen raised to last_seen_ms (never lowered,
 * so 0 keeps the stored value). */
int store_node_upsert(struct store *st, const struct store_node *n);
/* Fills *out (caller frees with store_node_clear). ME_ENOTFOUND when absent. */
int store_node_get(struct store *st, const char *id, struct store_node *out);
/* All nodes, most recently seen first, then by id. Caller frees with store_node_list_free. */
int store_node_list(struct store *st, struct store_node **out, size_t *n);
/* Forgets a node. ME_ENOTFOUND when absent. */
int store_node_delete(struct store *st, const char *id);
int store_node_count(struct store *st, int64_t *n);

void store_repo_clear(struct store_repo *r);
void store_repo_list_free(struct store_repo *r, size_t n);
void store_refs_free(struct store_ref *r, size_t n);
void store_node_clear(struct store_node *n);
void store_node_list_free(struct store_node *n, size_t cnt);
void store_clone_list_free(struct store_clone *c, size_t n);

#endif
