/* The watcher: notices new commits and refs in the working repositories of local repositories
 * (added with `mectl repo add`) and signs a new ref state for them.
 *
 * Cheap by design: no history walk, no polling of every ref. inotify (uv_fs_event) watches the
 * directory holding HEAD, the one holding packed-refs and refs/ (they differ for a linked work
 * tree), refs/, and refs/heads and refs/tags with their subdirectories (inotify is not
 * recursive: subdirectories are added as they appear, up to WATCH_MAX_DIRS per repository;
 * beyond that the repository is also polled every WATCH_FAST_POLL_MS). A check runs once events
 * pause for WATCH_DEBOUNCE_MS (at most WATCH_DEBOUNCE_MAX_MS after the first one, so a long
 * rebase signs about one state a second), and every repository is re-checked every
 * WATCH_POLL_MS in case an event was missed (a repository moved away and back, a full inotify
 * queue).
 *
 * A check reads HEAD and the branches and tags (gitrepo_read_refs: remote-tracking refs, notes
 * and stash never enter a ref state; names that a ref state cannot carry are left out, and a
 * HEAD that points at one announces ""). When they differ from the stored state it signs a new
 * one with the node key: seq = max(now ms, stored seq + 1), stores it (store_repo_set_refstate,
 * one transaction) and calls changed(ud, repo_id). A working repository that vanished or cannot
 * be read keeps its last state; the problem is logged once (then at most every
 * WATCH_LOG_EVERY_MS) and its recovery once.
 *
 * Everything runs on the loop given to watch_init. */
#ifndef ME_WATCH_H
#define ME_WATCH_H

#include <uv.h>

#include "daemon/node.h"

#define WATCH_DEBOUNCE_MS 50
#define WATCH_DEBOUNCE_MAX_MS 1000
#define WATCH_POLL_MS 10000
#define WATCH_FAST_POLL_MS 1000
#define WATCH_MAX_DIRS 256
#define WATCH_LOG_EVERY_MS (10 * 60 * 1000)

struct watch;

/* changed is called after a new ref state of repo_id was signed and stored (from the loop, or
 * from inside watch_refresh / watch_add). It may call watch_remove. */
int watch_init(struct watch **out, uv_loop_t *loop, struct node *node,
	       void (*changed)(void *ud, const char *repo_id), void *ud, char *err, size_t errsz);
/* Stops watching everything. Handles are closed and memory released from their close
 * callbacks: run the loop afterwards. NULL-safe. */
void watch_free(struct watch *w);

/* Watches the working repository at path (the path stored for repo_id: a work tree, a bare
 * repository or a linked work tree) and checks it at once (see watch_refresh). Adding a watched
 * repo_id again takes the new path. A repository that cannot be read now is still watched (and
 * logged): it is picked up when it comes back. 0, ME_EINVAL or ME_ENOMEM. */
int watch_add(struct watch *w, const char *repo_id, const char *path);
/* Stops watching repo_id (nothing happens when it is not watched). */
void watch_remove(struct watch *w, const char *repo_id);
/* Watches the local repositories of the store that are not watched yet and stops watching
 * those that are no longer in it (called at start). */
void watch_sync_all(struct watch *w);
/* Checks repo_id now: 1 when a new ref state was signed (changed was called), 0 when nothing
 * changed (or git was rewriting packed-refs: then it is checked again shortly), < 0 on error (ME_ENOTFOUND when repo_id is not watched or no longer a local
 * repository of the store, which also stops watching it; the working repository's errors such
 * as ME_ENOTREPO; ME_ENOKEY without a node key; ME_EDB). */
int watch_refresh(struct watch *w, const char *repo_id);

#endif
