/* The gossip plane: signed NodeAnnouncements and RepoAnnouncements (common/gossip_msg.h),
 * checked before anything else happens to them, deduplicated for 5 minutes by message id,
 * relayed with ttl - 1 to every peer but the one they came from, and re-announced every
 * --gossip-interval. Learnt nodes are stored and dialed up to --max-outbound; learnt
 * repositories are stored as external ("not fetched"). */
#ifndef ME_GOSSIP_H
#define ME_GOSSIP_H

#include <stdint.h>

#include <uv.h>

#include "daemon/net.h"
#include "daemon/node.h"

#define GOSSIP_DEDUP_MS (5 * 60 * 1000)

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
	uint64_t received, accepted, duplicates, relayed, sent;
	uint64_t rejected[GR__COUNT];
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
