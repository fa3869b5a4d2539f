/* Mirrors and bundles: the git side of replication. Library code: no logging; functions return 0
 * (or a count) or a ME_E* code, with a human message in the caller's err buffer (may be NULL).
 *
 * A mirror is a bare repository $ROOT/repos/<id>.git, where <id> is the repository's did:repo
 * without its "did:repo:" prefix. Only refs/heads/... and refs/tags/... (and HEAD) are managed.
 *
 * What travels between nodes is a git bundle, version 2:
 *     "# v2 git bundle\n"
 *     "-<oid>\n"            prerequisites: commits the receiver must have (any order), an
 *                           optional " <comment>" is accepted after the oid on input
 *     "<oid> <refname>\n"   the refs (we write them sorted by name)
 *     "\n"
 *     pack data ("PACK", version 2, objects, 20-byte SHA-1 trailer)
 * `git bundle verify` and `git bundle unbundle` accept what bundle_write produces. Input limits:
 * header <= BUNDLE_MAX_HEADER bytes including the blank line, <= BUNDLE_MAX_LINES lines, each
 * <= BUNDLE_MAX_LINE bytes without its newline; lowercase 40-hex oids; ref names valid for
 * gmsg_refname_valid (so no HEAD, nothing outside refs/heads/ and refs/tags/, no ".."), unique,
 * <= GMSG_MAX_REFS of them; no NUL byte. Capabilities ('@' lines) and v3 bundles are refused.
 *
 * Errors: ME_EINVAL bad arguments; ME_EBADID a malformed repository id; ME_EPROTO a malformed
 * header or pack, a missing or mistyped object; ME_EVERSION a v3 bundle or capabilities;
 * ME_ETOOBIG a limit exceeded; ME_ENOTFOUND a missing prerequisite, mirror or tip; ME_EPERM
 * bundle refs that differ from the signed ref state; ME_EBUSY a ref lock held (by a running
 * git, or left by a crash: mirror_cleanup); ME_EIO read/write/file system errors; ME_EGIT
 * other libgit2 failures; ME_ENOMEM.
 *
 * Threads: every function may run on a worker thread; a git_repository handle (and a bundle_rx)
 * must not be used by two threads at once. Writers to one mirror (bundle_apply, bundle_rx,
 * mirror_cleanup) must be serialised by the caller. */
#ifndef ME_MIRROR_H
#define ME_MIRROR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <git2.h>

#include "common/gossip_msg.h"

#define BUNDLE_MAX_HEADER (1u << 20)
#define BUNDLE_MAX_LINES 100000
#define BUNDLE_MAX_LINE 1024
#define BUNDLE_CHUNK (64u * 1024) /* read and indexer-append size */
#define BUNDLE_MAX_HAVES 20000 /* haves accepted by bundle_write */

/* ---- mirrors ---- */

/* "$root/repos/<id without did:repo:>.git". ME_EBADID unless repo_id is a valid did:repo (so
 * nothing but base58 reaches the path), ME_ETOOBIG when buf is too small, ME_EINVAL. */
int mirror_path(const char *root, const char *repo_id, char *buf, size_t sz);
/* Opens the mirror of repo_id under root; with create, makes $root/repos (0700), the mirror
 * directory (0700) and an empty bare repository first when it does not exist ($root itself
 * must exist). ME_ENOTFOUND when absent and not create, ME_ENOTREPO when the path is not a
 * repository. *out is released with git_repository_free. */
int mirror_open(const char *root, const char *repo_id, bool create, git_repository **out,
		char *err, size_t errsz);
/* Removes what an interrupted apply may leave in a mirror: incoming temporary directories and
 * stale ref lock files (refs/... *.lock, HEAD.lock, packed-refs.lock). Call only while no apply
 * on this mirror is running (for example when the daemon starts). */
int mirror_cleanup(git_repository *r, char *err, size_t errsz);

/* A mirror's refs/heads/... and refs/tags/... (symbolic ones resolved, dangling ones skipped,
 * annotated tags keep the tag object's oid), sorted by name (gmsg_ref_cmp), and the symbolic
 * target of HEAD ("" when detached). Names are NUL-terminated and owned by the state. */
struct mirror_state {
	struct gmsg_ref *refs;
	size_t nrefs;
	char *head;
};

int mirror_state_read(git_repository *r, struct mirror_state *out, char *err, size_t errsz);
void mirror_state_free(struct mirror_state *s);
/* True when the mirror state has exactly rs's refs and, when rs->head is not empty, its head:
 * the mirror is up to date with rs. */
bool mirror_state_matches(const struct mirror_state *s, const struct gmsg_refstate *rs);
/* The distinct targets of the mirror's refs (heads first, then tags, sorted within each), at
 * most max of them, for a request's haves. *n receives the count (0 for an empty mirror). */
int mirror_haves(git_repository *r, git_oid *out, size_t max, size_t *n, char *err,
		 size_t errsz);

/* ---- bundles ---- */

struct bundle_stats {
	uint64_t header_bytes;
	uint64_t pack_bytes;
	size_t objects; /* in the pack */
	size_t prereqs;
	size_t refs; /* in the header */
	size_t refs_updated; /* apply: refs created or moved */
	size_t refs_deleted; /* apply: refs removed */
	size_t bitmapped; /* write: objects counted from the source's .bitmap (packreuse.h) */
	/* write: where a complete pack built from the source's packs can be cut, in bundle
	 * offsets (none for other packs, or when it cannot be cut); apply: the parts used */
	struct xmsg_parts parts;
};

/* Writes to fd (blocking; partial writes and EINTR are handled) a bundle whose refs are tips
 * (strictly sorted by name, valid names, every oid an object of src) and whose pack holds
 * everything reachable from the tips minus everything reachable from the haves that src knows
 * (other haves are ignored). The prerequisites are the boundary, the excluded parents of the
 * commits sent, as `git bundle create` computes it; a bundle without usable haves is complete
 * and has none. A tip that the haves already cover is listed but neither sent nor required.
 * Annotated tag objects are sent unless they are haves themselves. A complete bundle's pack
 * (no prerequisites) is built by libgit2's pack builder (every CPU; it still holds the deltas
 * while it builds the pack) and is self-contained. An increment within daemon/thinpack.h's
 * limits is a thin pack, as `git fetch` gets: changed trees and blobs as deltas against the
 * same path in the first parent, which the receiver has (indexers resolve such bases from the
 * repository, as bundle_rx does); larger increments go through the pack builder. ME_ETOOBIG when the
 * header would exceed the input limits (retry with fewer haves or none). st may be NULL. On
 * failure part of a bundle may have been written. */
int bundle_write(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		 const git_oid *haves, size_t nhaves, int fd, struct bundle_stats *st, char *err,
		 size_t errsz);

/* A parsed header. Ref names point into buf (NUL-terminated); refs are sorted by name. */
struct bundle_ref {
	const char *name;
	git_oid oid;
};

struct bundle_header {
	char *buf;
	size_t len; /* header bytes, blank line included: the pack starts at this offset */
	git_oid *prereqs;
	size_t nprereqs;
	struct bundle_ref *refs;
	size_t nrefs;
};

/* Parses the header at the start of buf[0..len) (the rest may be pack data). ME_EPROTO when
 * it is truncated (no blank line within len) or malformed, ME_ETOOBIG, ME_EVERSION. On
 * success out owns memory (bundle_header_free); on failure out is empty. Pure. */
int bundle_header_parse(const void *buf, size_t len, struct bundle_header *out, char *err,
			size_t errsz);
/* Reads and parses the header from fd, leaving fd at the first byte of the pack (a seekable
 * fd is read in blocks and rewound, anything else one byte at a time). */
int bundle_read_header(int fd, struct bundle_header *out, char *err, size_t errsz);
void bundle_header_free(struct bundle_header *h);

/* Receiving a bundle into a mirror, fed while data arrives:
 *   bundle_rx_new -> bundle_rx_write()* -> bundle_rx_finish -> bundle_rx_free
 * The header is checked as soon as it is complete: every prerequisite must be a commit of the
 * mirror ("missing prerequisite <oid>", ME_ENOTFOUND) and the refs must be exactly expected's,
 * same names and oids ("refs differ from the signed ref state", ME_EPERM). The pack goes, as
 * it arrives, to libgit2's indexer (every object hashed, deltas resolved, trailer checked) in
 * a temporary directory inside the mirror, never into its objects (with opts.parts: one
 * indexer and one pack per part, below; what follows says "the pack" for all of them). finish then checks every
 * object of the pack (types read from the pack's entries; commits, trees and tags parsed in
 * pack order): everything an object references must be
 * in the pack or in the mirror with the right type; and every tip must be in one of them.
 * Objects already in the mirror are trusted: the mirror only ever receives packs checked this
 * way, so it holds no object with a missing reference, and the tips are therefore connected.
 * Then finish calls opts->check, moves the pack into objects/pack and only then updates the
 * refs with one git_transaction: expected's refs set, the mirror's other refs/heads and
 * refs/tags deleted, HEAD made a symbolic ref to expected->head when that is not empty.
 * On any failure before the refs change, the mirror is exactly as before (the pack is
 * removed). Should libgit2 fail in the middle of committing the refs (a file system error),
 * the refs it already wrote stay (they point to objects that are present, the pack stays) and
 * the error is returned; the same holds when a ref to delete conflicts with a new one
 * (refs/heads/a -> refs/heads/a/b): those deletions are committed first, in a transaction of
 * their own. A temporary directory left by a crash is removed by mirror_cleanup. Bundle ref
 * names are only compared, never used: refs are written from expected. expected (already
 * verified by the caller) must stay unchanged until bundle_rx_free; it must be well formed
 * (ME_EINVAL otherwise). */
struct bundle_rx;

struct bundle_rx_opts {
	uint64_t max_bytes; /* whole bundle, header included: more is ME_ETOOBIG (required) */
	/* Optional, called by finish once the objects are checked and before anything changes,
	 * with a read-only view of the mirror's objects plus the new ones and the root commits
	 * (commits without parents) of the new pack that are reachable from the tips through
	 * the pack's commits and annotated tags (for example to compute the did:repo; roots the
	 * mirror already held are not among them: walk the view for those). A
	 * negative return rejects the bundle with that code; the message should go to err. */
	int (*check)(git_repository *view, const struct gmsg_refstate *expected,
		     const git_oid *roots, size_t nroots, void *arg, char *err, size_t errsz);
	void *check_arg;
	/* Collect the roots for check (memory for every commit's parents); without, check
	 * gets none. */
	bool roots;
	/* Optional: where the pack may be cut (a sender's hint, gossip_msg.h), with size, the
	 * whole bundle's size (copied by bundle_rx_new). Each part is indexed as a pack of its
	 * own (its own header and SHA-1 trailer; the whole pack's trailer is not read), committed
	 * on a thread of its own as soon as it has arrived while the next one arrives, and
	 * becomes a pack of its own in the mirror; the check above covers them together, as
	 * one. Parts that do not fit the pack (an offset not at an entry, counts that do not add
	 * up, a delta whose base is in another part and not in the mirror) reject the bundle
	 * ("bad pack: ..."), and so does data past size ("bundle larger than announced").
	 * bundle_rx_new refuses (ME_EINVAL) parts not xmsg_parts_valid for size, or size over
	 * max_bytes. */
	const struct xmsg_parts *parts;
	uint64_t size;
};

int bundle_rx_new(struct bundle_rx **out, git_repository *mirror,
		  const struct gmsg_refstate *expected, const struct bundle_rx_opts *opts,
		  char *err, size_t errsz);
/* Feeds the next len bytes. The first error is sticky: later calls return it. */
int bundle_rx_write(struct bundle_rx *rx, const void *buf, size_t len);
/* Completes the transfer (see above). st may be NULL. */
int bundle_rx_finish(struct bundle_rx *rx, struct bundle_stats *st);
/* Message of the first error ("" when none). */
const char *bundle_rx_errmsg(const struct bundle_rx *rx);
/* Releases rx; an unfinished or failed transfer leaves nothing behind. NULL is a no-op. */
void bundle_rx_free(struct bundle_rx *rx);

/* All of the above for a bundle read from fd until end of file, in BUNDLE_CHUNK reads. */
int bundle_apply(git_repository *mirror, int fd, const struct gmsg_refstate *expected,
		 uint64_t max_bytes, struct bundle_stats *st, char *err, size_t errsz);

#endif
