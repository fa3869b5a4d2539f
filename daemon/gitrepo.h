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

#endif
