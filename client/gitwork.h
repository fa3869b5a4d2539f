/* mectl's git work, done with libgit2 in the user's own process: making a working copy from the
 * daemon's copy of a repository (its mirror, or for a repository added on this node its working
 * repository) and bringing a working copy up to date from it. Never loses a local commit:
 * branches only move by fast-forward, the checked-out one only when the tree is clean.
 * Errors come back as ME_E* codes with a message (git_error_last() included) in err. */
#ifndef ME_GITWORK_H
#define ME_GITWORK_H

#include <stddef.h>

void gw_init(void);
void gw_shutdown(void);

/* 0 when dir does not exist or is an empty directory; ME_EEXIST when it holds anything (or is
 * not a directory); ME_EIO when it cannot be read. */
int gw_dir_usable(const char *dir, char *err, size_t errsz);

struct gw_clone_result {
	char branch[256];  /* the branch checked out ("" when none) */
	int head_guessed;  /* the signed HEAD was empty: the first branch was taken */
	size_t nbranches;  /* local branches made */
	size_t ntags;
};

/* Clones source (a local path) into dir (absent or empty), with origin = source: every branch
 * of source becomes a local branch tracking origin/<name>, every tag is fetched, and head
 * ("refs/heads/dev"; "" for the first branch by name) is checked out. repo_id is kept in the
 * clone's config (megaengine.repoid) so `mectl repo pull` finds it. On failure nothing is left
 * in dir (libgit2 removes what it made). */
int gw_clone(const char *source, const char *dir, const char *head, const char *repo_id,
	     struct gw_clone_result *res, char *err, size_t errsz);

/* The top of the working copy containing path (searching upwards), and its megaengine.repoid
 * ("" when unset). ME_ENOTREPO when there is none, ME_EINVAL for a bare repository. */
int gw_find_workdir(const char *path, char *top, size_t topsz, char *repo_id, size_t idsz,
		    char *err, size_t errsz);

enum gw_branch_status {
	GW_UP_TO_DATE,
	GW_UPDATED,   /* fast-forwarded old..new */
	GW_CREATED,   /* new local branch tracking origin/<name> */
	GW_AHEAD,     /* has local commits origin lacks: left as is */
	GW_DIVERGED,  /* refused: left as is */
	GW_DIRTY,     /* checked out, tree has local changes: refused, left as is */
	GW_FAILED,    /* the checkout failed (msg says why): left as is */
};

struct gw_branch {
	char name[256];
	enum gw_branch_status st;
	char old_oid[41], new_oid[41];
	int checked_out;
	char msg[256];
};

struct gw_pull_result {
	struct gw_branch *b;
	size_t n;
	size_t refused;  /* branches DIVERGED, DIRTY or FAILED */
	size_t tags;     /* tags in the working copy after the fetch */
	size_t tags_kept; /* local tags that differ from origin's: left as they were */
	char note[600];  /* e.g. origin points elsewhere ("" when none) */
};

/* Fetches source into dir's refs/remotes/origin/<name> (pruning branches gone from source) and its
 * tags (existing local tags are not moved), then brings each local branch that tracks an
 * origin branch forward when that is a fast-forward (the checked-out one with a safe checkout,
 * refused as a whole when the tree has local changes), and makes a tracking branch for each
 * new origin branch. res is filled even when some branches are refused; the return value is 0
 * unless the fetch itself or the repository failed. */
int gw_pull(const char *dir, const char *source, struct gw_pull_result *res, char *err,
	    size_t errsz);
void gw_pull_result_free(struct gw_pull_result *r);
const char *gw_status_name(enum gw_branch_status st);

#endif
