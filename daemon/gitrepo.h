/* libgit2 helpers for the store: inspecting a working repository. Library code: no logging. */
#ifndef ME_GITREPO_H
#define ME_GITREPO_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/store.h"

struct gitrepo_info {
	char *path;        /* absolute, canonical path of the repository (workdir or bare dir) */
	char *name;        /* basename without a trailing ".git" */
	uint8_t root_oid[20];
	char root_hex[41];
	char *head;        /* "refs/heads/main", or "" when HEAD is detached */
	struct store_ref *refs; /* branches and tags (annotated tags keep the tag oid) */
	size_t nrefs;
};

void gitrepo_global_init(void);
void gitrepo_global_free(void);
/* Opens the repository at path (ME_ENOTREPO when not one; ME_EEMPTY when HEAD has no commit),
 * finds the root commit (first of a topological, reversed walk from HEAD) and its refs.
 * errbuf receives a human message on failure. */
int gitrepo_inspect(const char *path, struct gitrepo_info *out, char *errbuf, size_t errsz);
void gitrepo_info_clear(struct gitrepo_info *info);

/* Reads the refs of the repository at path (same rules as gitrepo_inspect for the path) without
 * walking any history: *head is HEAD's symbolic target ("" when detached), *refs the refs under
 * refs/heads/ and refs/tags/ only (never remote-tracking refs, notes, stash...), sorted by name
 * bytewise (the order of gmsg_ref_cmp), with the conventions of gitrepo_inspect: an annotated
 * tag keeps the tag object's oid, a symbolic ref gives its resolved target and a dangling one is
 * skipped. A repository without commits gives no refs. The caller frees *head and *refs
 * (store_refs_free); on failure they are NULL and 0. gitrepo_inspect reads its refs with it. */
int gitrepo_read_refs(const char *path, char **head, struct store_ref **refs, size_t *n,
		      char *errbuf, size_t errsz);
/* The directories of the repository at path: *gitdir holds HEAD (the .git directory, the bare
 * repository, or .git/worktrees/<name> of a linked work tree) and *commondir refs/ and
 * packed-refs (the same as *gitdir except for a linked work tree). Absolute, no trailing slash;
 * the caller frees both. */
int gitrepo_dirs(const char *path, char **gitdir, char **commondir, char *errbuf, size_t errsz);

#endif
