/* The sync plane: replication of repositories over transfer streams (docs/peer-protocol.md §3).
 *
 * Requesting: for every repository learnt by gossip whose newest creator-signed ref state is
 * newer than its mirror ($ROOT/repos/<id>.git), a fetch starts at once (and a sweep every
 * SYNC_SWEEP_MS catches anything missed). The requester picks a node announcing that state,
 * streams the bundle into a temporary file under $ROOT/tmp (size limited by --max-repo-size),
 * verifies it on the libuv thread pool (mirror.h: header, prerequisites, pack through the
 * indexer, connectivity, refs equal to the signed state, did:repo binding on the first fetch)
 * and only then moves the mirror's refs. On failure, a stall or a verification error it moves
 * to the next node. An interrupted transfer resumes from its offset when the server still
 * offers the same bundle (same digest), or starts over.
 *
 * Serving: a node serves a repository when it is the creator (from the working repository at
 * its signed state) or its mirror matches the newest signed state it stores. Bundles are built
 * on the thread pool into $ROOT/cache and streamed from there in 64 KiB chunks.
 *
 * Everything here runs on the main loop; git work runs on the thread pool, one job per
 * repository at a time. */
#ifndef ME_SYNC_H
#define ME_SYNC_H

#include <stdint.h>

#include <uv.h>

#include "daemon/net.h"
#include "daemon/node.h"

#define SYNC_SWEEP_MS 60000
#define SYNC_STALL_MS 15000        /* no data for this long: try the next node */
#define SYNC_START_MS 30000        /* no answer to a request (the server may build a bundle) */
#define SYNC_MAX_FETCHES 4         /* concurrent fetches, total */
#define SYNC_MAX_SERVES 8          /* concurrent transfers served, total */
#define SYNC_MAX_SERVES_PER_PEER 2 /* concurrent transfers served to one peer */
#define SYNC_CHUNK (64u * 1024)
/* Bundles of states the mirror already has, read past at the start of a series transfer. */
#define SYNC_MAX_SKIPPED 16
#define SYNC_MAX_SKIPPED_SIZE (1u << 20)
#define SERIES_MAX 64 /* bundles in a series before it starts over with a complete one */

struct sync;

enum sync_state {
	SYNC_IDLE,    /* nothing running; see mirror_seq / error */
	SYNC_QUEUED,  /* waiting for a slot or a node that has it */
	SYNC_RUNNING, /* transferring or verifying */
};

struct sync_status {
	enum sync_state state;
	uint64_t done, total; /* bytes of the running transfer (total 0: not known yet) */
	int verifying;        /* the data is in; verification and apply are running */
	char error[200];      /* why the last attempt failed ("" after a success) */
	int64_t last_sync_ms; /* unix ms of the last successful fetch (0: never) */
	int64_t mirror_seq;   /* seq of the signed state the mirror holds (0: no mirror) */
	size_t nholders;      /* nodes known to announce the newest state */
};

int sync_init(struct sync **out, uv_loop_t *loop, struct node *node, char *err, size_t errsz);
/* Begins serving and fetching on net (sets nothing in net: main points net's xfer_accept at
 * sync_xfer_accept). Removes temporary files left by a previous run. */
void sync_start(struct sync *s, struct net *net);
/* Cancels transfers (the peers see NET_ERR_SHUTDOWN) and waits for running git jobs to end
 * before releasing memory (run the loop afterwards). NULL-safe. */
void sync_free(struct sync *s);

/* For net_callbacks.xfer_accept (xfer_ud = the sync plane). */
int sync_xfer_accept(void *s, struct peer *p, struct net_xfer *x);

/* Gossip tells: origin announced repo_id at a creator-signed ref state seq (already verified
 * and, when newer, stored). Records origin as a holder of that state and fetches when the
 * mirror is behind. */
void sync_announced(struct sync *s, const uint8_t origin_pk[ME_PK_LEN], const char *repo_id,
		    int64_t seq);

/* True when a first fetch proved that pk is not the creator of repo_id (someone announced
 * another's id as theirs): gossip ignores that claim. */
int sync_creator_refuted(struct sync *s, const char *repo_id, const uint8_t pk[ME_PK_LEN]);

/* Waiting for a fetch (mectl repo sync / clone / pull). */
struct sync_waiter;
struct sync_waiter_cb {
	void (*progress)(void *ud, uint64_t done, uint64_t total);
	/* rc 0: the mirror holds the newest known signed state. Called once, from the loop. */
	void (*done)(void *ud, int rc, const char *msg);
	void *ud;
};
/* Starts (or joins) a fetch of repo_id now and calls cb as it goes. When the mirror is already
 * up to date with the newest known state and no fetch runs, done(0) is called from the loop
 * soon after. ME_ENOTFOUND for an unknown repository, ME_EINVAL for a local one (it has no
 * mirror), ME_ENOMEM. *out may be passed to sync_waiter_cancel until done has been called. */
int sync_fetch(struct sync *s, const char *repo_id, const struct sync_waiter_cb *cb,
	       struct sync_waiter **out);
/* Stops calling the waiter (its client went away); the fetch itself goes on. Only before done
 * was called: done releases the waiter. */
void sync_waiter_cancel(struct sync_waiter *w);

/* State of repo_id, for repo list / show. Unknown repositories give an idle, empty status. */
void sync_status(struct sync *s, const char *repo_id, struct sync_status *out);

/* The working repository of a local repository has new refs (signed and stored by the
 * caller): drop cached bundles of older states. */
void sync_local_changed(struct sync *s, const char *repo_id);

struct sync_stats {
	uint64_t fetches_ok, fetches_failed, serves_ok, serves_failed, serves_refused;
	uint64_t bytes_fetched, bytes_served;
	uint64_t rejected_bundles; /* failed verification */
	uint64_t bundles_built;    /* by this node's pack builder (series bundles and one-offs) */
};
void sync_get_stats(const struct sync *s, struct sync_stats *out);
/* Transfers running now (fetching and serving). NULL-safe. */
size_t sync_ntransfers(const struct sync *s);

#endif
