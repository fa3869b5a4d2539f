/* What the daemon's libgit2 code shares: error helpers for library code that reports in an err
 * buffer, a blocking write loop, the walk from a set of commits, and the peeling of a tip
 * through its annotated tags.
 *
 * Library code: no logging; ME_* codes with a message in err. */
#ifndef ME_GITUTIL_H
#define ME_GITUTIL_H

#include <stddef.h>

#include <git2.h>

#include "common/gossip_msg.h"
#include "daemon/oidset.h"

#define TAG_CHAIN_MAX 64 /* annotated tags of tags followed from a tip */

__attribute__((format(printf, 3, 4)))
void gerr_set(char *err, size_t errsz, const char *fmt, ...);
void gerr_clear(char *err, size_t errsz);
/* Reports a libgit2 failure as "<what>: <libgit2 message>"; returns code, or ME_ENOMEM /
 * ME_ENOSPC / ME_EIO when libgit2 says it ran out of memory or hit an OS error. */
int gerr_git(char *err, size_t errsz, int code, const char *what);
/* "out of memory", ME_ENOMEM. */
int gerr_nomem(char *err, size_t errsz);

/* write(2) until done: 0 or -errno. */
int write_full(int fd, const void *buf, size_t len);

/* A revision walk over src from the commits of push (may be NULL), hiding those of hide (may
 * be NULL), in the given git_sort_t order. 0 or ME_EGIT / ME_ENOMEM with err set. */
int walk_new(git_revwalk **out, git_repository *src, unsigned sort, const struct oidvec *push,
	     const struct oidvec *hide, char *err, size_t errsz);
/* The commits reachable from push without passing through a commit of stop, each after its
 * parents that are among them (parents first), into out; the commits of stop reached as
 * parents into met (once each). A walk that never goes past stop, whatever the commits' dates:
 * libgit2's revwalk orders by date and, when a new commit is dated before its parents (a
 * skewed clock), reads the whole history of what it hides. It does not know what else stop
 * reaches, so a commit reachable from stop by another path is walked too; ME_ETOOBIG (the
 * caller then asks libgit2's revwalk) when that goes far: more than max commits, or down to a
 * root commit. out and met are appended to. */
int commits_until(git_repository *src, const struct oidvec *push, const struct oidset *stop,
		  size_t max, struct oidvec *out, struct oidvec *met, char *err, size_t errsz);

/* Peels a tip through its annotated tags: on_tag(tag id, arg) for each tag on the way (its
 * negative return ends the peel and is returned as is), and in *out the object the chain
 * ends on (the caller frees it). ME_ENOTFOUND when the tip is not in src, ME_EPROTO for more
 * than TAG_CHAIN_MAX tags, ME_EGIT; err names the ref. */
int tip_peel(git_repository *src, const struct gmsg_ref *tip,
	     int (*on_tag)(const git_oid *tag, void *arg), void *arg, git_object **out,
	     char *err, size_t errsz);

#endif
