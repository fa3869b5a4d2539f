/* The gossip plane: signed NodeAnnouncements and RepoAnnouncements (common/gossip_msg.h),
 * checked before anything else happens to them, deduplicated for 5 minutes by message id and
 * re-announced every --gossip-interval. Learnt nodes are stored and dialed up to
 * --max-outbound; learnt repositories are stored as external ("not fetched").
 *
 * Messages travel on an epidemic broadcast tree (Plumtree, Leitão et al. 2007; see
 * docs/peer-protocol.md "Epidemic broadcast tree"): every peer is eager or lazy. A new message
 * is relayed with ttl - 1 in full to the eager peers but the sender and announced by id in
 * batched IHAVE frames to the lazy ones; a duplicate moves its sender to lazy (PRUNE), and an
 * IHAVE for a message that does not arrive within GOSSIP_GRAFT_TIMEOUT_MS is asked for with a
 * GRAFT, which also makes that link eager again (tree repair). */
#ifndef ME_GOSSIP_H
#define ME_GOSSIP_H

#include <stdint.h>

#include <uv.h>

#include "daemon/net.h"
#include "daemon/node.h"

#define GOSSIP_DEDUP_MS (5 * 60 * 1000)
#define GOSSIP_IHAVE_DELAY_MS 150   /* lazy ids wait this long, to share one IHAVE per peer */
#define GOSSIP_GRAFT_TIMEOUT_MS 1000 /* an announced message not here by then is grafted */
#define GOSSIP_GRAFT_RETRY_MS 500   /* then from the next peer that announced it */
#define GOSSIP_CACHE_MS 60000       /* messages kept to answer GRAFTs */
#define GOSSIP_CACHE_MAX 1024       /* ... at most this many */
#define GOSSIP_CACHE_BYTES (16u << 20) /* ... and bytes */
#define GOSSIP_MISSING_MAX 1024     /* announced messages waiting (all peers) */
#define GOSSIP_MISSING_PER_PEER 256 /* ... first announced by one peer */
#define GOSSIP_MISSING_SOURCES 4    /* peers remembered per announced message */
#define GOSSIP_GRAFT_REPLIES 32     /* messages sent to one peer per second in answer to GRAFTs */
#define GOSSIP_GRAFT_REPLY_BYTES (2u << 20) /* ... and bytes (one message always goes) */

struct gossip;

enum gossip_reject {
	GR_MALFORMED,
	GR_SIGNATURE,
	GR_TTL,
	GR_FUTURE,
	GR_STALE,
	GR_REPLAY,      /* older than the newest stored from that origin */
	GR_FORGED_NODE, /* node announcement whose origin is not the announced node */
	GR_REFSTATE,    /* ref state not signed by the repository's creator */
	GR__COUNT
};

struct gossip_stats {
	uint64_t received, accepted, duplicates, relayed;
	uint64_t sent; /* full messages (envelopes) sent: ours, relays, GRAFT replies, catch-up */
	uint64_t catchup; /* our node announcement sent to a peer whose link came up (in sent) */
	uint64_t ihave_frames, ihave_ids, grafts, prunes; /* control frames sent (ids in IHAVEs) */
	uint64_t graft_replies; /* full messages sent in answer to GRAFTs (also in sent) */
	uint64_t ihave_ids_received, grafts_received, prunes_received;
	uint64_t rejected[GR__COUNT];
	uint64_t eager_peers, lazy_peers; /* now */
};

int gossip_init(struct gossip **out, uv_loop_t *loop, struct node *node, char *err,
		size_t errsz);
/* Network callbacks for net_init (ud = the gossip plane). */
struct net_callbacks gossip_net_callbacks(struct gossip *g);
/* Starts announcing once the network runs; dials the bootstrap and remembered nodes. */
void gossip_start(struct gossip *g, struct net *net);
void gossip_free(struct gossip *g);
/* Something we announce changed (a repository added or removed, new refs): announce now. */
void gossip_changed(struct gossip *g);
void gossip_get_stats(const struct gossip *g, struct gossip_stats *out);
const char *gossip_reject_name(int reason);

#endif
