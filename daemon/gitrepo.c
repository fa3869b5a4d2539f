#include "daemon/gitrepo.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <git2.h>

#include "common/err.h"
#include "daemon/gitutil.h"

_Static_assert(GIT_OID_RAWSZ == sizeof(((struct gitrepo_info *)0)->root_oid), "oid size");
_Static_assert(GIT_OID_HEXSZ + 1 == sizeof(((struct gitrepo_info *)0)->root_hex), "hex size");

void gitrepo_global_init(void)
{
	git_libgit2_init();
	/* The daemon runs as its own user and reads repositories that users own. git's
	 * safe.directory check guards against running commands named in a foreign repository's
	 * config; libgit2 runs none (no hooks, no fsmonitor), and the daemon only reads objects
	 * and refs, so the ownership check would refuse every legitimate repository. */
	git_libgit2_opts(GIT_OPT_SET_OWNER_VALIDATION, 0);
}

void gitrepo_global_free(void)
{
	git_libgit2_shutdown();
}

/* Reports a libgit2 failure: "<what>: <libgit2 message>". */
static int git_fail(char *errbuf, size_t errsz, const char *what)
{
	const git_error *e = git_error_last();

	gerr_set(errbuf, errsz, "%s: %s", what, e != NULL && e->message != NULL ? e->message
									: "unknown libgit2 error");
	return e != NULL && e->klass == GIT_ERROR_NOMEMORY ? ME_ENOMEM : ME_EGIT;
}

static void strip_slashes(char *p)
{
	for (size_t l = strlen(p); l > 1 && p[l - 1] == '/'; l--)
		p[l - 1] = '\0';
}

/* basename without a trailing ".git" (kept when nothing else would remain). */
static char *repo_name(const char *path)
{
	const char *b = strrchr(path, '/');
	size_t l;

	b = b != NULL && b[1] != '\0' ? b + 1 : path;
	l = strlen(b);
	if (l > 4 && strcmp(b + l - 4, ".git") == 0)
		l -= 4;
	return strndup(b, l);
}

static int ref_cmp(const void *a, const void *b)
{
	return strcmp(((const struct store_ref *)a)->name, ((const struct store_ref *)b)->name);
}

struct refs_acc {
	struct store_ref *arr;
	size_t n, cap;
};

static int refs_push(struct refs_acc *acc, const char *name, const git_oid *oid)
{
	char hex[GIT_OID_HEXSZ + 1];

	if (acc->n == acc->cap) {
		size_t ncap = acc->cap ? acc->cap * 2 : 16;
		struct store_ref *p;
		if (ncap < acc->cap || ncap > SIZE_MAX / sizeof(*p) ||
		    (p = realloc(acc->arr, ncap * sizeof(*p))) == NULL)
			return ME_ENOMEM;
		acc->arr = p;
		acc->cap = ncap;
	}
	git_oid_tostr(hex, sizeof(hex), oid);
	acc->arr[acc->n].name = strdup(name);
	acc->arr[acc->n].oid = strdup(hex);
	acc->n++;
	if (acc->arr[acc->n - 1].name == NULL || acc->arr[acc->n - 1].oid == NULL)
		return ME_ENOMEM;
	return 0;
}

/* Collects the refs matching glob. Symbolic refs are resolved; dangling ones are skipped.
 * Direct refs keep their target as is: an annotated tag gives the tag object's oid. */
static int refs_collect(git_repository *repo, const char *glob, struct refs_acc *acc,
			char *errbuf, size_t errsz)
{
	git_reference_iterator *it = NULL;
	git_reference *ref = NULL, *res = NULL;
	int rc = 0, grc;

	if (git_reference_iterator_glob_new(&it, repo, glob) < 0)
		return git_fail(errbuf, errsz, "cannot list refs");
	while ((grc = git_reference_next(&ref, it)) == 0) {
		const git_oid *oid = NULL;

		if (git_reference_type(ref) == GIT_REFERENCE_SYMBOLIC) {
			if (git_reference_resolve(&res, ref) == 0)
				oid = git_reference_target(res);
		} else {
			oid = git_reference_target(ref);
		}
		if (oid != NULL && (rc = refs_push(acc, git_reference_name(ref), oid)) < 0)
			gerr_set(errbuf, errsz, "out of memory");
		git_reference_free(res);
		git_reference_free(ref);
		res = ref = NULL;
		if (rc < 0)
			break;
	}
	if (rc == 0 && grc != GIT_ITEROVER)
		rc = git_fail(errbuf, errsz, "cannot list refs");
	git_reference_iterator_free(it);
	return rc;
}

/* First commit of a topological, reversed walk from start. */
static int root_commit(git_repository *repo, const git_oid *start, git_oid *root, char *errbuf,
		       size_t errsz)
{
	git_revwalk *walk = NULL;
	int rc = 0;

	if (git_revwalk_new(&walk, repo) < 0 ||
	    git_revwalk_sorting(walk, GIT_SORT_TOPOLOGICAL | GIT_SORT_REVERSE) < 0 ||
	    git_revwalk_push(walk, start) < 0 || git_revwalk_next(root, walk) < 0)
		rc = git_fail(errbuf, errsz, "cannot walk the history");
	git_revwalk_free(walk);
	return rc;
}

/* Symbolic target of HEAD, or "" when detached. */
static int head_name(git_repository *repo, char **out, char *errbuf, size_t errsz)
{
	git_reference *head = NULL;
	const char *t = "";

	if (git_reference_lookup(&head, repo, "HEAD") < 0)
		return git_fail(errbuf, errsz, "cannot read HEAD");
	if (git_reference_type(head) == GIT_REFERENCE_SYMBOLIC && git_reference_symbolic_target(head))
		t = git_reference_symbolic_target(head);
	*out = strdup(t);
	git_reference_free(head);
	if (*out == NULL) {
		gerr_set(errbuf, errsz, "out of memory");
		return ME_ENOMEM;
	}
	return 0;
}

void gitrepo_info_clear(struct gitrepo_info *info)
{
	if (info == NULL)
		return;
	free(info->path);
	free(info->name);
	free(info->head);
	store_refs_free(info->refs, info->nrefs);
	memset(info, 0, sizeof(*info));
}

/* Opens the repository at path itself (not one above it): its work tree, a git directory, a
 * bare repository or a linked work tree (.git file). */
static int repo_open(const char *path, git_repository **repo, char *errbuf, size_t errsz)
{
	char *real;
	int grc, e;

	*repo = NULL;
	if (path == NULL || path[0] == '\0') {
		gerr_set(errbuf, errsz, "no repository path");
		return ME_EINVAL;
	}
	if ((real = realpath(path, NULL)) == NULL) {
		e = errno;
		if (e == ENOMEM) {
			gerr_set(errbuf, errsz, "out of memory");
			return ME_ENOMEM;
		}
		if (e == ENOENT || e == ENOTDIR)
			gerr_set(errbuf, errsz, "%s does not exist", path);
		else
			gerr_set(errbuf, errsz, "%s is not a git repository: %s", path, strerror(e));
		return e == EACCES ? ME_EPERM : ME_ENOTREPO;
	}
	/* NO_SEARCH: path must be the repository itself, not somewhere inside one. */
	grc = git_repository_open_ext(repo, real, GIT_REPOSITORY_OPEN_NO_SEARCH, NULL);
	free(real);
	if (grc == GIT_EOWNER) {
		gerr_set(errbuf, errsz, "%s is owned by another user (see git's safe.directory)", path);
		return ME_EPERM;
	}
	if (grc < 0) {
		git_repository_free(*repo);
		*repo = NULL;
		gerr_set(errbuf, errsz, "%s is not a git repository", path);
		return ME_ENOTREPO;
	}
	return 0;
}

/* HEAD's symbolic target and the refs under refs/heads/ and refs/tags/ of an open repository,
 * sorted by name (bytewise: strcmp compares as unsigned char, like gmsg_ref_cmp). Nothing to
 * free on failure. */
static int refs_read(git_repository *repo, char **head, struct store_ref **refs, size_t *n,
		     char *errbuf, size_t errsz)
{
	struct refs_acc acc = { NULL, 0, 0 };
	int rc;

	if ((rc = head_name(repo, head, errbuf, errsz)) < 0)
		return rc;
	if ((rc = refs_collect(repo, "refs/heads/*", &acc, errbuf, errsz)) < 0 ||
	    (rc = refs_collect(repo, "refs/tags/*", &acc, errbuf, errsz)) < 0) {
		store_refs_free(acc.arr, acc.n);
		free(*head);
		*head = NULL;
		return rc;
	}
	if (acc.n > 1)
		qsort(acc.arr, acc.n, sizeof(*acc.arr), ref_cmp);
	*refs = acc.arr;
	*n = acc.n;
	return 0;
}

int gitrepo_read_refs(const char *path, char **head, struct store_ref **refs, size_t *n,
		      char *errbuf, size_t errsz)
{
	git_repository *repo;
	int rc;

	if (errbuf != NULL && errsz > 0)
		errbuf[0] = '\0';
	if (head == NULL || refs == NULL || n == NULL)
		return ME_EINVAL;
	*head = NULL;
	*refs = NULL;
	*n = 0;
	if ((rc = repo_open(path, &repo, errbuf, errsz)) < 0)
		return rc;
	rc = refs_read(repo, head, refs, n, errbuf, errsz);
	git_repository_free(repo);
	return rc;
}

static char *dir_dup(const char *d)
{
	char *p = strdup(d);

	if (p != NULL)
		strip_slashes(p);
	return p;
}

int gitrepo_dirs(const char *path, char **gitdir, char **commondir, char *errbuf, size_t errsz)
{
	git_repository *repo;
	int rc;

	if (errbuf != NULL && errsz > 0)
		errbuf[0] = '\0';
	if (gitdir == NULL || commondir == NULL)
		return ME_EINVAL;
	*gitdir = *commondir = NULL;
	if ((rc = repo_open(path, &repo, errbuf, errsz)) < 0)
		return rc;
	*gitdir = dir_dup(git_repository_path(repo));
	*commondir = dir_dup(git_repository_commondir(repo));
	git_repository_free(repo);
	if (*gitdir == NULL || *commondir == NULL) {
		free(*gitdir);
		free(*commondir);
		*gitdir = *commondir = NULL;
		gerr_set(errbuf, errsz, "out of memory");
		return ME_ENOMEM;
	}
	return 0;
}

int gitrepo_inspect(const char *path, struct gitrepo_info *out, char *errbuf, size_t errsz)
{
	git_repository *repo = NULL;
	git_object *commit = NULL;
	git_oid root;
	const char *dir;
	int rc, grc;

	if (errbuf != NULL && errsz > 0)
		errbuf[0] = '\0';
	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if ((rc = repo_open(path, &repo, errbuf, errsz)) < 0)
		return rc;

	dir = git_repository_is_bare(repo) ? git_repository_path(repo) : git_repository_workdir(repo);
	if (dir == NULL) {
		gerr_set(errbuf, errsz, "%s has no work tree", path);
		rc = ME_ENOTREPO;
		goto fail;
	}
	if ((out->path = strdup(dir)) == NULL)
		goto nomem;
	strip_slashes(out->path);
	if ((out->name = repo_name(out->path)) == NULL)
		goto nomem;

	grc = git_repository_head_unborn(repo);
	if (grc == 1) {
		gerr_set(errbuf, errsz, "%s has no commits", path);
		rc = ME_EEMPTY;
		goto fail;
	}
	if (grc < 0) {
		rc = git_fail(errbuf, errsz, "cannot read HEAD");
		goto fail;
	}
	if ((grc = git_revparse_single(&commit, repo, "HEAD^{commit}")) < 0) {
		if (grc == GIT_EUNBORNBRANCH || grc == GIT_EPEEL) {
			gerr_set(errbuf, errsz, "%s has no commits", path);
			rc = ME_EEMPTY;
		} else {
			rc = git_fail(errbuf, errsz, "cannot read HEAD");
		}
		goto fail;
	}
	if ((rc = root_commit(repo, git_object_id(commit), &root, errbuf, errsz)) < 0)
		goto fail;
	memcpy(out->root_oid, root.id, sizeof(out->root_oid));
	git_oid_tostr(out->root_hex, sizeof(out->root_hex), &root);

	/* The same refs as the watcher reads (gitrepo_read_refs). */
	if ((rc = refs_read(repo, &out->head, &out->refs, &out->nrefs, errbuf, errsz)) < 0)
		goto fail;

	git_object_free(commit);
	git_repository_free(repo);
	return 0;
nomem:
	gerr_set(errbuf, errsz, "out of memory");
	rc = ME_ENOMEM;
fail:
	gitrepo_info_clear(out);
	git_object_free(commit);
	git_repository_free(repo);
	return rc;
}
