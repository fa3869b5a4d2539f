#include "daemon/gitutil.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"

void gerr_set(char *err, size_t errsz, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || errsz == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errsz, fmt, ap);
	va_end(ap);
}

void gerr_clear(char *err, size_t errsz)
{
	if (err != NULL && errsz > 0)
		err[0] = '\0';
}

int gerr_git(char *err, size_t errsz, int code, const char *what)
{
	int oserr = errno;
	const git_error *e = git_error_last();

	gerr_set(err, errsz, "%s: %s", what,
		 e != NULL && e->message != NULL ? e->message : "unknown libgit2 error");
	if (e != NULL && e->klass == GIT_ERROR_NOMEMORY)
		return ME_ENOMEM;
	/* a full disk is ours, not the data's: libgit2 appends strerror to OS errors */
	if (e != NULL && e->klass == GIT_ERROR_OS)
		return oserr == ENOSPC || oserr == EDQUOT ||
		       (e->message != NULL && strstr(e->message, strerror(ENOSPC)) != NULL) ?
		       ME_ENOSPC : ME_EIO;
	return code;
}

int gerr_nomem(char *err, size_t errsz)
{
	gerr_set(err, errsz, "out of memory");
	return ME_ENOMEM;
}

int write_full(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int walk_new(git_revwalk **out, git_repository *src, unsigned sort, const struct oidvec *push,
	     const struct oidvec *hide, char *err, size_t errsz)
{
	git_revwalk *w = NULL;

	*out = NULL;
	if (git_revwalk_new(&w, src) < 0 || git_revwalk_sorting(w, sort) < 0)
		goto fail;
	for (size_t i = 0; push != NULL && i < push->n; i++)
		if (git_revwalk_push(w, &push->v[i]) < 0)
			goto fail;
	for (size_t i = 0; hide != NULL && i < hide->n; i++)
		if (git_revwalk_hide(w, &hide->v[i]) < 0)
			goto fail;
	*out = w;
	return 0;
fail:
	git_revwalk_free(w);
	return gerr_git(err, errsz, ME_EGIT, "cannot walk the history");
}

struct cu_entry {
	git_oid oid;
	bool second; /* its parents were pushed: emit it when it is on top again */
};

int commits_until(git_repository *src, const struct oidvec *push, const struct oidset *stop,
		  size_t max, struct oidvec *out, struct oidvec *met, char *err, size_t errsz)
{
	struct oidset state; /* 1 expanded, 2 emitted, 3 a stop met */
	struct cu_entry *stack = NULL;
	size_t sp = 0, cap = 0, expanded = 0;
	git_commit *c = NULL;
	int rc;

	if ((rc = oidset_init(&state)) < 0)
		return rc;
	for (size_t i = 0; i <= push->n; i++) {
		if (i < push->n) { /* the tips, one after the other */
			if (oidset_has(stop, &push->v[i]))
				continue;
			if (sp == cap) {
				struct cu_entry *ns = reallocarray(stack, cap ? 2 * cap : 64,
								   sizeof(*ns));
				if (ns == NULL)
					goto nomem;
				stack = ns;
				cap = cap ? 2 * cap : 64;
			}
			stack[sp++] = (struct cu_entry){ push->v[i], false };
		}
		while (sp > 0) {
			struct cu_entry *e = &stack[sp - 1];
			struct oidset_slot *s = oidset_find(&state, &e->oid);

			if (e->second) {
				if (oidvec_push(out, &e->oid) < 0)
					goto nomem;
				s->val = 2;
				sp--;
				continue;
			}
			if (s != NULL) { /* met again through another child: done already */
				sp--;
				continue;
			}
			if (++expanded > max) {
				rc = ME_ETOOBIG;
				goto out;
			}
			if (oidset_put(&state, &e->oid, 1) < 0)
				goto nomem;
			e->second = true;
			if (git_commit_lookup(&c, src, &e->oid) < 0) {
				rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
				goto out;
			}
			if (git_commit_parentcount(c) == 0) { /* below every stop, or beside */
				rc = ME_ETOOBIG;
				goto out;
			}
			for (unsigned p = 0, np = git_commit_parentcount(c); p < np; p++) {
				const git_oid *pid = git_commit_parent_id(c, p);
				struct oidset_slot *ps = oidset_find(&state, pid);
				if (ps != NULL)
					continue;
				if (oidset_has(stop, pid)) {
					if (oidset_put(&state, pid, 3) < 0 || oidvec_push(met, pid) < 0)
						goto nomem;
					continue;
				}
				if (sp == cap) {
					struct cu_entry *ns = reallocarray(stack, 2 * cap, sizeof(*ns));
					if (ns == NULL)
						goto nomem;
					stack = ns;
					cap *= 2;
				}
				stack[sp++] = (struct cu_entry){ *pid, false };
			}
			git_commit_free(c);
			c = NULL;
		}
	}
	rc = 0;
	goto out;
nomem:
	rc = gerr_nomem(err, errsz);
out:
	git_commit_free(c);
	free(stack);
	oidset_free(&state);
	return rc;
}

int tip_peel(git_repository *src, const struct gmsg_ref *tip,
	     int (*on_tag)(const git_oid *tag, void *arg), void *arg, git_object **out,
	     char *err, size_t errsz)
{
	git_object *obj = NULL, *next = NULL;
	git_oid id;
	int rc, depth = 0;

	*out = NULL;
	git_oid_fromraw(&id, tip->oid);
	if ((rc = git_object_lookup(&obj, src, &id, GIT_OBJECT_ANY)) < 0) {
		if (rc == GIT_ENOTFOUND) {
			char hex[GIT_OID_HEXSZ + 1];
			gerr_set(err, errsz, "%.*s (%s) is not in the repository",
				 (int)tip->name.len, tip->name.ptr,
				 git_oid_tostr(hex, sizeof(hex), &id));
			return ME_ENOTFOUND;
		}
		return gerr_git(err, errsz, ME_EGIT, "cannot read a tip");
	}
	while (git_object_type(obj) == GIT_OBJECT_TAG) {
		if (++depth > TAG_CHAIN_MAX) {
			gerr_set(err, errsz, "%.*s: tag chain too long", (int)tip->name.len,
				 tip->name.ptr);
			rc = ME_EPROTO;
			goto fail;
		}
		if ((rc = on_tag(git_object_id(obj), arg)) < 0)
			goto fail;
		if (git_tag_target(&next, (git_tag *)obj) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a tag's target");
			goto fail;
		}
		git_object_free(obj);
		obj = next;
		next = NULL;
	}
	*out = obj;
	return 0;
fail:
	git_object_free(obj);
	return rc;
}
