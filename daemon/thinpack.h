/* Thin packs for small increments: what `git pack-objects --thin` sends on a fetch.
 *
 * libgit2's pack builder only deltifies objects against others in the same pack, so a one-commit
 * update carries every tree on the changed paths and every changed file whole. The receiver
 * already has the previous version of each (the bundle's prerequisites guarantee it), so here a
 * changed tree or blob goes as a REF_DELTA against the object at the same path in its commit's
 * first parent; libgit2's indexer on the receiving side resolves such bases from the mirror
 * (git_indexer_new with the mirror's odb) and git's `bundle unbundle` / `index-pack --fix-thin`
 * do the same.
 *
 * Library code: no logging; ME_* codes with a message in err. */
#ifndef ME_THINPACK_H
#define ME_THINPACK_H

#include <stddef.h>
#include <stdint.h>

#include <git2.h>

#include "common/gossip_msg.h"
#include "daemon/oidset.h"

#define THIN_MAX_COMMITS 1000     /* larger increments go through libgit2's pack builder */
#define THIN_MAX_OBJECTS 50000
#define THIN_MAX_BOUNDARY 16      /* boundary commits whose trees are walked */
#define THIN_MAX_DEPTH 50         /* delta chain length, as git's pack.depth */
#define THIN_MAX_DELTA_SRC (16u << 20) /* objects larger than this go whole */

/* Delta in git's pack format (base size, result size, copy and insert instructions) turning
 * base into target, when it is shorter than max bytes: 0 and *out (malloc'd), ME_ETOOBIG when it
 * would not be (nothing allocated), ME_ENOMEM. Linear time: 16-byte blocks of base are indexed,
 * matches are extended both ways. */
int delta_encode(const uint8_t *base, size_t blen, const uint8_t *target, size_t tlen,
		 size_t max, uint8_t **out, size_t *outlen);
/* Applies a delta (for tests and checks): 0 and *out (malloc'd, *outlen bytes) or ME_EPROTO
 * when it is malformed or does not fit base. Bounded: the result is at most max bytes. */
int delta_apply(const uint8_t *base, size_t blen, const uint8_t *delta, size_t dlen, size_t max,
		uint8_t **out, size_t *outlen);

struct thinpack;

/* Plans the pack of an increment: commits = walk from tipc minus everything reachable from
 * pre (the boundary, every member a commit of src), in parents-first order; the trees and
 * blobs they introduce, that is, not in a boundary commit's tree and not already planned; and
 * the annotated tags the tips point through that are not in haveset, and a tree or blob a tip
 * (or its tag) names that is neither. ME_ETOOBIG when the increment is beyond the THIN_* limits
 * (the caller then builds a full pack); nothing is written. order (may be NULL): those commits
 * already found, parents first (commits_until, see mirror.c's boundary_fast), instead of
 * libgit2's revwalk. */
int thinpack_plan(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		  const struct oidset *haveset, const struct oidvec *tipc, const struct oidvec *pre,
		  const struct oidvec *order, struct thinpack **out, char *err, size_t errsz);
/* Writes the planned pack to fd (blocking): header, entries (REF_DELTA when the delta is
 * smaller than three quarters of the object), SHA-1 trailer. *bytes and *objects may be NULL. */
int thinpack_write(struct thinpack *tp, int fd, uint64_t *bytes, size_t *objects, char *err,
		   size_t errsz);
void thinpack_free(struct thinpack *tp);

#endif
