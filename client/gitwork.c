#include "client/gitwork.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <git2.h>

#include "common/err.h"

#define ORIGIN_PREFIX "refs/remotes/origin/"
#define HEADS_PREFIX "refs/heads/"

void gw_init(void)
{
	git_libgit2_init();
}

void gw_shutdown(void)
{
	git_libgit2_shutdown();
}

/* err = "<what>: <libgit2's last error>"; returns code. */
static int gfail(char *err, size_t errsz, int code, const char *fmt, ...)
{
	const git_error *e = git_error_last();
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(err, errsz, fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < errsz && e != NULL && e->message != NULL && e->message[0])
		snprintf(err + n, errsz - (size_t)n, ": %s", e->message);
	return code;
}

static void oid_hex(const git_oid *o, char out[41])
{
	git_oid_tostr(out, 41, o);
}

int gw_dir_usable(const char *dir, char *err, size_t errsz)
{
	struct stat st;
	DIR *d;
	struct dirent *de;
	int empty = 1;

	if (lstat(dir, &st) < 0) {
		if (errno == ENOENT)
			return 0;
		snprintf(err, errsz, "%s: %s", dir, strerror(errno));
		return ME_EIO;
	}
	if (!S_ISDIR(st.st_mode)) {
		snprintf(err, errsz, "%s exists and is not a directory; refusing to clone into it",
			 dir);
		return ME_EEXIST;
	}
	if ((d = opendir(dir)) == NULL) {
		snprintf(err, errsz, "%s: %s", dir, strerror(errno));
		return ME_EIO;
	}
	while (empty && (de = readdir(d)) != NULL)
		empty = strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0;
	closedir(d);
	if (!empty) {
		snprintf(err, errsz, "%s exists and is not empty; refusing to clone into it", dir);
		return ME_EEXIST;
	}
	return 0;
}

/* Makes refs/heads/<name> at the commit of origin ref rref, tracking origin/<name>, unless a
 * local branch of that name exists. 1 when made, 0 when it existed, or a ME_E* code. */
static int branch_track(git_repository *r, git_reference *rref, const char *name, char *err,
			size_t errsz)
{
	git_reference *local = NULL;
	git_commit *c = NULL;
	char up[300];
	int rc;

	if (git_branch_lookup(&local, r, name, GIT_BRANCH_LOCAL) == 0) {
		git_reference_free(local);
		return 0;
	}
	if (git_commit_lookup(&c, r, git_reference_target(rref)) < 0)
		return gfail(err, errsz, ME_EGIT, "origin/%s does not point to a commit", name);
	rc = git_branch_create(&local, r, name, c, 0);
	git_commit_free(c);
	if (rc < 0)
		return gfail(err, errsz, ME_EGIT, "cannot create branch %s", name);
	snprintf(up, sizeof(up), "origin/%s", name);
	rc = git_branch_set_upstream(local, up);
	git_reference_free(local);
	if (rc < 0)
		return gfail(err, errsz, ME_EGIT, "cannot make %s track %s", name, up);
	return 1;
}

/* Calls fn for each refs/remotes/origin/<name> except HEAD. Stops at the first error. */
static int each_origin_branch(git_repository *r,
			      int (*fn)(git_repository *, git_reference *, const char *, void *),
			      void *ud, char *err, size_t errsz)
{
	git_reference_iterator *it;
	git_reference *ref;
	int rc = 0, grc;

	if (git_reference_iterator_glob_new(&it, r, ORIGIN_PREFIX "*") < 0)
		return gfail(err, errsz, ME_EGIT, "cannot list the origin branches");
	while (rc >= 0 && (grc = git_reference_next(&ref, it)) == 0) {
		const char *name = git_reference_name(ref) + strlen(ORIGIN_PREFIX);
		if (strcmp(name, "HEAD") != 0 && git_reference_type(ref) == GIT_REFERENCE_DIRECT)
			rc = fn(r, ref, name, ud);
		git_reference_free(ref);
	}
	git_reference_iterator_free(it);
	return rc;
}

struct clone_walk {
	struct gw_clone_result *res;
	char first[256];
	char *err;
	size_t errsz;
};

static int clone_branch(git_repository *r, git_reference *ref, const char *name, void *ud)
{
	struct clone_walk *w = ud;
	int rc = branch_track(r, ref, name, w->err, w->errsz);

	if (rc < 0)
		return rc;
	w->res->nbranches++;
	if (w->first[0] == '\0' || strcmp(name, w->first) < 0)
		snprintf(w->first, sizeof(w->first), "%s", name);
	return 0;
}

static size_t count_tags(git_repository *r)
{
	git_strarray tags = { 0 };
	size_t n = 0;

	if (git_tag_list(&tags, r) == 0)
		n = tags.count;
	git_strarray_dispose(&tags);
	return n;
}

int gw_clone(const char *source, const char *dir, const char *head, const char *repo_id,
	     struct gw_clone_result *res, char *err, size_t errsz)
{
	git_clone_options o;
	git_repository *r = NULL;
	git_config *cfg = NULL;
	git_reference *b = NULL;
	struct clone_walk w = { .res = res, .err = err, .errsz = errsz };
	char want[256] = "", refname[300];
	int rc;

	memset(res, 0, sizeof(*res));
	git_clone_options_init(&o, GIT_CLONE_OPTIONS_VERSION);
	if ((rc = gw_dir_usable(dir, err, errsz)) < 0)
		return rc;
	if (head != NULL && strncmp(head, HEADS_PREFIX, strlen(HEADS_PREFIX)) == 0)
		snprintf(want, sizeof(want), "%s", head + strlen(HEADS_PREFIX));
	/* Nothing is checked out by the clone itself: the branch to check out is chosen below,
	 * from the signed HEAD, once every branch exists. */
	o.checkout_opts.checkout_strategy = GIT_CHECKOUT_NONE;
	o.fetch_opts.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_ALL;
	if (git_clone(&r, source, dir, &o) < 0)
		return gfail(err, errsz, ME_EGIT, "cannot clone %s into %s", source, dir);
	if ((rc = each_origin_branch(r, clone_branch, &w, err, errsz)) < 0)
		goto out;
	if (w.first[0] == '\0') {
		rc = gfail(err, errsz, ME_EEMPTY, "%s has no branch to check out", source);
		goto out;
	}
	if (want[0] != '\0' && git_branch_lookup(&b, r, want, GIT_BRANCH_LOCAL) == 0) {
		git_reference_free(b);
	} else {
		/* No signed HEAD, or it names a branch the source lacks: the first branch. */
		res->head_guessed = 1;
		snprintf(want, sizeof(want), "%s", w.first);
	}
	snprintf(refname, sizeof(refname), HEADS_PREFIX "%s", want);
	git_checkout_options co;
	git_checkout_options_init(&co, GIT_CHECKOUT_OPTIONS_VERSION);
	co.checkout_strategy = GIT_CHECKOUT_FORCE; /* a fresh clone: nothing of the user's here */
	if (git_repository_set_head(r, refname) < 0 || git_checkout_head(r, &co) < 0) {
		rc = gfail(err, errsz, ME_EGIT, "cannot check out %s in %s", want, dir);
		goto out;
	}
	snprintf(res->branch, sizeof(res->branch), "%s", want);
	res->ntags = count_tags(r);
	if (repo_id != NULL && (git_repository_config(&cfg, r) < 0 ||
				git_config_set_string(cfg, "megaengine.repoid", repo_id) < 0)) {
		rc = gfail(err, errsz, ME_EGIT, "cannot write the config of %s", dir);
		goto out;
	}
	rc = 0;
out:
	git_config_free(cfg);
	git_repository_free(r);
	return rc;
}

int gw_find_workdir(const char *path, char *top, size_t topsz, char *repo_id, size_t idsz,
		    char *err, size_t errsz)
{
	git_repository *r = NULL;
	git_config *cfg = NULL;
	git_buf b = { 0 };
	const char *wd;
	int rc = 0;

	repo_id[0] = '\0';
	if (git_repository_open_ext(&r, path, 0, NULL) < 0)
		return gfail(err, errsz, ME_ENOTREPO, "%s is not in a git working copy", path);
	if (git_repository_is_bare(r) || (wd = git_repository_workdir(r)) == NULL) {
		snprintf(err, errsz, "%s is a bare repository: pull needs a working copy",
			 git_repository_path(r));
		rc = ME_EINVAL;
		goto out;
	}
	snprintf(top, topsz, "%s", wd);
	size_t n = strlen(top);
	if (n > 1 && top[n - 1] == '/')
		top[n - 1] = '\0';
	if (git_repository_config_snapshot(&cfg, r) == 0 &&
	    git_config_get_string_buf(&b, cfg, "megaengine.repoid") == 0)
		snprintf(repo_id, idsz, "%s", b.ptr);
	git_error_clear();
out:
	git_buf_dispose(&b);
	git_config_free(cfg);
	git_repository_free(r);
	return rc;
}

const char *gw_status_name(enum gw_branch_status st)
{
	switch (st) {
	case GW_UP_TO_DATE: return "up to date";
	case GW_UPDATED: return "updated";
	case GW_CREATED: return "created";
	case GW_AHEAD: return "ahead";
	case GW_DIVERGED: return "diverged";
	case GW_DIRTY: return "dirty";
	case GW_FAILED: return "failed";
	}
	return "?";
}

static struct gw_branch *result_add(struct gw_pull_result *res, const char *name)
{
	struct gw_branch *b = realloc(res->b, (res->n + 1) * sizeof(*b));
	if (b == NULL)
		return NULL;
	res->b = b;
	b = &res->b[res->n++];
	memset(b, 0, sizeof(*b));
	snprintf(b->name, sizeof(b->name), "%s", name);
	return b;
}

/* Tracked changes in the index or the work tree (untracked files do not count: a safe
 * checkout refuses to overwrite them anyway). 1 dirty, 0 clean, or a ME_E* code. */
static int tree_dirty(git_repository *r, char *err, size_t errsz)
{
	git_status_options so;
	git_status_list *sl;
	size_t n, dirty = 0;

	git_status_options_init(&so, GIT_STATUS_OPTIONS_VERSION);
	so.show = GIT_STATUS_SHOW_INDEX_AND_WORKDIR;
	so.flags = GIT_STATUS_OPT_EXCLUDE_SUBMODULES;
	if (git_status_list_new(&sl, r, &so) < 0)
		return gfail(err, errsz, ME_EGIT, "cannot read the status of the working copy");
	n = git_status_list_entrycount(sl);
	for (size_t i = 0; i < n; i++) {
		const git_status_entry *e = git_status_byindex(sl, i);
		if (e->status != GIT_STATUS_CURRENT && !(e->status & GIT_STATUS_IGNORED) &&
		    e->status != GIT_STATUS_WT_NEW)
			dirty++;
	}
	git_status_list_free(sl);
	return dirty > 0;
}

struct pull_walk {
	struct gw_pull_result *res;
	char *err;
	size_t errsz;
};

static int pull_new_branch(git_repository *r, git_reference *ref, const char *name, void *ud)
{
	struct pull_walk *w = ud;
	int rc = branch_track(r, ref, name, w->err, w->errsz);
	struct gw_branch *b;

	if (rc <= 0)
		return rc;
	if ((b = result_add(w->res, name)) == NULL)
		return ME_ENOMEM;
	b->st = GW_CREATED;
	oid_hex(git_reference_target(ref), b->new_oid);
	return 0;
}

/* Brings one local branch forward to its origin branch when that is a fast-forward. */
static int pull_branch(git_repository *r, git_reference *local, const char *head_ref,
		       struct gw_pull_result *res, char *err, size_t errsz)
{
	const char *name = git_reference_shorthand(local);
	git_reference *up = NULL, *moved = NULL;
	git_commit *c = NULL;
	const git_oid *lo, *ro;
	struct gw_branch *b;
	int rc = 0;

	if (git_branch_upstream(&up, local) < 0) { /* not tracking anything */
		git_error_clear();
		return 0;
	}
	if (strncmp(git_reference_name(up), ORIGIN_PREFIX, strlen(ORIGIN_PREFIX)) != 0 ||
	    git_reference_type(local) != GIT_REFERENCE_DIRECT)
		goto out;
	if ((b = result_add(res, name)) == NULL) {
		rc = ME_ENOMEM;
		goto out;
	}
	lo = git_reference_target(local);
	ro = git_reference_target(up);
	oid_hex(lo, b->old_oid);
	oid_hex(ro, b->new_oid);
	b->checked_out = head_ref != NULL && strcmp(head_ref, git_reference_name(local)) == 0;
	if (git_oid_equal(lo, ro)) {
		b->st = GW_UP_TO_DATE;
		goto out;
	}
	if (git_graph_descendant_of(r, lo, ro) == 1) {
		b->st = GW_AHEAD;
		goto out;
	}
	if (git_graph_descendant_of(r, ro, lo) != 1) {
		b->st = GW_DIVERGED;
		res->refused++;
		git_error_clear();
		goto out;
	}
	if (b->checked_out) {
		git_checkout_options co;
		int d = tree_dirty(r, err, errsz);

		git_checkout_options_init(&co, GIT_CHECKOUT_OPTIONS_VERSION);
		if (d < 0) {
			rc = d;
			goto out;
		}
		if (d) {
			b->st = GW_DIRTY;
			snprintf(b->msg, sizeof(b->msg), "the working tree has local changes");
			res->refused++;
			goto out;
		}
		co.checkout_strategy = GIT_CHECKOUT_SAFE;
		if (git_commit_lookup(&c, r, ro) < 0 ||
		    git_checkout_tree(r, (const git_object *)c, &co) < 0) {
			const git_error *e = git_error_last();
			b->st = GW_FAILED;
			snprintf(b->msg, sizeof(b->msg), "checkout refused: %s",
				 e && e->message ? e->message : "unknown libgit2 error");
			res->refused++;
			goto out;
		}
	}
	if (git_reference_set_target(&moved, local, ro, "mectl repo pull: fast-forward") < 0) {
		rc = gfail(err, errsz, ME_EGIT, "cannot move branch %s", name);
		goto out;
	}
	b->st = GW_UPDATED;
out:
	git_commit_free(c);
	git_reference_free(moved);
	git_reference_free(up);
	return rc;
}

struct tag_snap {
	char (*name)[256];
	git_oid *oid;
	size_t n;
};

/* Remembers the local tags: libgit2's fetch moves an existing tag to the remote's value, git
 * does not (and neither do we). */
static int tags_snapshot(git_repository *r, struct tag_snap *ts, char *err, size_t errsz)
{
	git_reference_iterator *it;
	git_reference *ref;

	memset(ts, 0, sizeof(*ts));
	if (git_reference_iterator_glob_new(&it, r, "refs/tags/*") < 0)
		return gfail(err, errsz, ME_EGIT, "cannot list the tags");
	while (git_reference_next(&ref, it) == 0) {
		if (git_reference_type(ref) == GIT_REFERENCE_DIRECT &&
		    strlen(git_reference_name(ref)) < 256) {
			void *a = realloc(ts->name, (ts->n + 1) * sizeof(*ts->name));
			void *b = a ? realloc(ts->oid, (ts->n + 1) * sizeof(*ts->oid)) : NULL;
			if (a)
				ts->name = a;
			if (b == NULL) {
				git_reference_free(ref);
				git_reference_iterator_free(it);
				snprintf(err, errsz, "out of memory");
				return ME_ENOMEM;
			}
			ts->oid = b;
			snprintf(ts->name[ts->n], 256, "%s", git_reference_name(ref));
			git_oid_cpy(&ts->oid[ts->n], git_reference_target(ref));
			ts->n++;
		}
		git_reference_free(ref);
	}
	git_reference_iterator_free(it);
	git_error_clear();
	return 0;
}

/* Puts back every local tag the fetch moved; returns how many. */
static size_t tags_restore(git_repository *r, struct tag_snap *ts)
{
	size_t moved = 0;

	for (size_t i = 0; i < ts->n; i++) {
		git_reference *ref = NULL;
		git_oid now;
		if (git_reference_name_to_id(&now, r, ts->name[i]) == 0 &&
		    git_oid_equal(&now, &ts->oid[i]))
			continue;
		if (git_reference_create(&ref, r, ts->name[i], &ts->oid[i], 1,
					 "mectl repo pull: keep the local tag") == 0)
			moved++;
		git_reference_free(ref);
	}
	git_error_clear();
	free(ts->name);
	free(ts->oid);
	memset(ts, 0, sizeof(*ts));
	return moved;
}

/* The origin remote when its URL is source, else an anonymous remote for source (note says
 * so). Fetches branches into refs/remotes/origin/<name> (pruned) and every tag. */
static int pull_fetch(git_repository *r, const char *source, char *note, size_t notesz,
		      char *err, size_t errsz)
{
	git_remote *rem = NULL;
	git_fetch_options fo;
	char *specs[] = { "+refs/heads/*:refs/remotes/origin/*" };
	git_strarray sa = { specs, 1 };
	char a[PATH_MAX], b[PATH_MAX];
	int rc = 0;

	if (git_remote_lookup(&rem, r, "origin") == 0 && git_remote_url(rem) != NULL &&
	    (strcmp(git_remote_url(rem), source) == 0 ||
	     (realpath(git_remote_url(rem), a) != NULL && realpath(source, b) != NULL &&
	      strcmp(a, b) == 0))) {
		/* origin it is */
	} else {
		if (rem != NULL)
			snprintf(note, notesz, "origin is %s, not the megaengine copy %s; fetched from "
				 "the megaengine copy into refs/remotes/origin/*", git_remote_url(rem),
				 source);
		else
			snprintf(note, notesz, "no origin remote; fetched from the megaengine copy %s "
				 "into refs/remotes/origin/*", source);
		git_remote_free(rem);
		rem = NULL;
		git_error_clear();
		if (git_remote_create_anonymous(&rem, r, source) < 0)
			return gfail(err, errsz, ME_EGIT, "cannot use %s as a remote", source);
	}
	git_fetch_options_init(&fo, GIT_FETCH_OPTIONS_VERSION);
	fo.prune = GIT_FETCH_PRUNE;
	fo.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_ALL;
	if (git_remote_fetch(rem, &sa, &fo, "mectl repo pull") < 0)
		rc = gfail(err, errsz, ME_EGIT, "cannot fetch from %s", source);
	git_remote_free(rem);
	return rc;
}

int gw_pull(const char *dir, const char *source, struct gw_pull_result *res, char *err,
	    size_t errsz)
{
	git_repository *r = NULL;
	git_reference *head = NULL, *ref;
	git_branch_iterator *it = NULL;
	git_branch_t type;
	const char *head_ref = NULL;
	struct pull_walk w = { .res = res, .err = err, .errsz = errsz };
	int rc;

	memset(res, 0, sizeof(*res));
	if (git_repository_open_ext(&r, dir, GIT_REPOSITORY_OPEN_NO_SEARCH, NULL) < 0)
		return gfail(err, errsz, ME_ENOTREPO, "cannot open the working copy %s", dir);
	if (git_repository_is_bare(r)) {
		snprintf(err, errsz, "%s is a bare repository", dir);
		rc = ME_EINVAL;
		goto out;
	}
	struct tag_snap ts;
	if ((rc = tags_snapshot(r, &ts, err, errsz)) < 0)
		goto out;
	rc = pull_fetch(r, source, res->note, sizeof(res->note), err, errsz);
	res->tags_kept = tags_restore(r, &ts);
	if (rc < 0)
		goto out;
	/* HEAD names the checked-out branch (unborn or detached: none is). */
	if (git_reference_lookup(&head, r, "HEAD") == 0 &&
	    git_reference_type(head) == GIT_REFERENCE_SYMBOLIC && !git_repository_head_detached(r))
		head_ref = git_reference_symbolic_target(head);
	git_error_clear();
	if (git_branch_iterator_new(&it, r, GIT_BRANCH_LOCAL) < 0) {
		rc = gfail(err, errsz, ME_EGIT, "cannot list the branches of %s", dir);
		goto out;
	}
	while (rc >= 0 && git_branch_next(&ref, &type, it) == 0) {
		rc = pull_branch(r, ref, head_ref, res, err, errsz);
		git_reference_free(ref);
	}
	git_error_clear();
	if (rc >= 0)
		rc = each_origin_branch(r, pull_new_branch, &w, err, errsz);
	res->tags = count_tags(r);
out:
	git_branch_iterator_free(it);
	git_reference_free(head);
	git_repository_free(r);
	return rc;
}

void gw_pull_result_free(struct gw_pull_result *r)
{
	free(r->b);
	r->b = NULL;
	r->n = 0;
}
