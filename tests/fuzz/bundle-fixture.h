/* A small fixed pair of repositories for the bundle-rx and bundle-objects fuzz targets and their
 * seed generator,
 * built with libgit2 from fixed contents and dates (so the object ids never change):
 *     src     C1 <- C2 on refs/heads/main, annotated tag refs/tags/v1 -> C2
 *     mirror  C1 on refs/heads/main (a bare repository, what bundle_rx receives into)
 * expected is the ref state of src (refs/heads/main = C2, refs/tags/v1 = the tag, head
 * refs/heads/main); its signature is not set (bundle_rx does not check it). */
#ifndef ME_FUZZ_BUNDLE_FIXTURE_H
#define ME_FUZZ_BUNDLE_FIXTURE_H

#include <limits.h>

#include <git2.h>

#include "common/gossip_msg.h"

struct bundle_fixture {
	char dir[PATH_MAX]; /* a temporary directory holding both (base: $TMPDIR or /dev/shm) */
	git_repository *src;
	git_repository *mirror;
	git_oid c1, c2, tag;
	char repo_id[ME_DID_REPO_SIZE];
	struct gmsg_ref refs[2];
	struct gmsg_refstate expected;
	size_t entries; /* of the mirror's git directory and objects/pack, after init */
};

/* Initialises libgit2 and builds the fixture; 0 or -1 (with a message on stderr). */
int bundle_fixture_init(struct bundle_fixture *fx);
/* Removes the directory; shuts libgit2 down. */
void bundle_fixture_free(struct bundle_fixture *fx);

/* Feeds len bytes to a bundle_rx on the mirror, chunk bytes at a time, and finishes it. The
 * transfer is stopped by its check hook (after the objects are verified, before anything is
 * installed), so the mirror never changes. Asserts (FUZZ_ASSERT) that nothing else accepts the
 * bundle, that every expected tip is an object when the hook runs, and that the mirror is as it
 * was: no temporary directory left, the same packs, refs/heads/main still C1. Returns 1 when
 * the hook ran (the bundle passed every check of bundle_rx), else 0. */
int bundle_fixture_rx(struct bundle_fixture *fx, const uint8_t *data, size_t len, size_t chunk);

#endif
