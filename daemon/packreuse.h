/* Complete packs built from the source's own packs, as `git pack-objects` does for a clone:
 * every object reachable from the tips is copied as it is stored (compressed data, and deltas
 * against bases that are sent too), instead of being decompressed and deltified again, which
 * is what libgit2's pack builder does and takes seconds per ten thousand objects.
 *
 * Objects stored loose, in packs without a v2 index, or as deltas against objects that are
 * not sent go whole (deflated afresh). Packs on disk are self-contained, so the result is too.
 *
 * Library code: no logging; ME_* codes with a message in err. */
#ifndef ME_PACKREUSE_H
#define ME_PACKREUSE_H

#include <stddef.h>
#include <stdint.h>

#include <git2.h>

#include "common/gossip_msg.h"

struct packreuse;

/* Plans the pack of everything reachable from the tips (through annotated tags, commits'
 * histories and trees; submodule commits are not followed): counts the objects, finds
 * them in src's packs and checks every entry to be copied. Nothing is written. ME_EINVAL
 * when src's object store has no pack to reuse or a pack is not as expected (the caller then
 * uses libgit2's pack builder); ME_ENOTFOUND for a tip not in src. */
int packreuse_plan(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		   struct packreuse **out, char *err, size_t errsz);
/* How many of the planned objects were counted from the source's reachability bitmap (git's
 * .bitmap, packbitmap.h) rather than by walking trees: when one of src's packs has a bitmap,
 * the commits it has an entry for are counted from it, and only what was made since is
 * walked, as git's upload-pack does. 0 when there is none or it is damaged. */
size_t packreuse_bitmapped(const struct packreuse *r);
/* How many objects the walk met (the tips' tags, the commits without a bitmap, their trees
 * down to what the bitmap counts): with a bitmap, the work left to do without it. */
size_t packreuse_walked(const struct packreuse *r);
/* Parts (xmsg_parts, offsets from the start of the pack): a pack is written as at most
 * PACKREUSE_PARTS parts, each holding whole groups of entries linked by deltas (a delta and
 * its base, base first), so that a receiver indexes them on several cores while the rest
 * arrives. A part holds about 2/PACKREUSE_PARTS of the pack's bytes and objects together and
 * at least packreuse_part_min bytes (the last one may hold less). The entries of a part keep
 * the source's order; the parts take the groups in the order they first come. */
#define PACKREUSE_PARTS 16
#define PACKREUSE_PART_MIN (2u << 20)
extern uint64_t packreuse_part_min; /* PACKREUSE_PART_MIN; tests lower it */

/* Writes the planned pack to fd (blocking). *bytes and *objects may be NULL; *reused (may be
 * NULL) = entries copied as stored; *parts (may be NULL) = where the pack can be cut (above;
 * one part when it cannot). */
int packreuse_write(struct packreuse *r, int fd, uint64_t *bytes, size_t *objects,
		    size_t *reused, struct xmsg_parts *parts, char *err, size_t errsz);
void packreuse_free(struct packreuse *r);

#endif
