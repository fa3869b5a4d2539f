#include "daemon/gossip.h"
#include "daemon/sync.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/gossip_msg.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/refstate.h"

#define DEDUP_MIN_CAP 1024
#define DEDUP_MAX_CAP (1u << 20)
#define ORIGINS_MAX 4096
#define REJECT_LOG_EVERY_MS 10000
#define NODE_TYPE_FULL 1

struct dedup_ent {
	uint8_t id[GMSG_ID_LEN];
	int64_t expires;
};

struct origin {
	uint8_t pk[ME_PK_LEN];
	uint64_t newest[3]; /* by type: newest ts_ms accepted */
	int64_t touched;
};

/* A connected peer on the broadcast tree. */
struct tpeer {
	struct peer *p;
	struct tpeer *next;
	int eager;
	uint8_t ihave[GMSG_CTL_MAX_IDS][GMSG_ID_LEN]; /* ids waiting for the next IHAVE */
	size_t nihave;
	int64_t ihave_since; /* mono ms the oldest queued id was queued */
	size_t nmissing;     /* missing entries this peer announced first */
	int64_t up_at;       /* mono ms the link came up */
	int64_t reply_window; /* GRAFT replies: the current second, and how many in it */
	unsigned replies;
	size_t reply_bytes;
};

/* A full message kept to answer GRAFTs: the frame as we relayed it. */
struct cached {
	uint8_t id[GMSG_ID_LEN];
	uint8_t *frame;
	size_t len;
	int64_t expires; /* mono ms; 0 = free slot */
};

/* A message announced by IHAVE that we do not hold yet. */
struct missing {
	uint8_t id[GMSG_ID_LEN];
	struct peer *from[GOSSIP_MISSING_SOURCES]; /* announcers not grafted yet, oldest first */
	size_t nfrom;
	struct peer *charged; /* whose per-peer quota it counts against */
	int64_t due; /* mono ms: graft from from[0]; 0 = free slot */
};

struct gossip {
	uv_loop_t *loop;
	struct node *node;
	struct net *net;
	uv_timer_t timer;
	int timer_open;
	struct dedup_ent *dedup;
	size_t dedup_cap, dedup_len;
	struct origin *origins;
	size_t norigins;
	uint8_t wanted[ME_MAX_OUTBOUND * 8][ME_PK_LEN]; /* nodes we dial, learnt by gossip */
	size_t nwanted;
	msgpack_sbuffer last_node, last_repo; /* our latest framed announcements */
	msgpack_sbuffer last_node_payload, last_repo_payload; /* to tell what changed */
	uint8_t last_node_id[GMSG_ID_LEN], last_repo_id[GMSG_ID_LEN]; /* ids of last_node/repo */
	struct gossip_stats stats;
	struct tpeer *tpeers;
	struct cached *cache;
	size_t cache_bytes;
	struct missing *missing;
	uv_timer_t tree_timer; /* IHAVE flushes and GRAFT timeouts */
	int tree_timer_open;
	int64_t tree_due; /* mono ms the tree timer fires, 0 when stopped */
	int64_t reject_logged_at[GR__COUNT];
	uint64_t reject_suppressed[GR__COUNT];
};

static const char *const reject_names[GR__COUNT] = {
	[GR_MALFORMED] = "malformed",
	[GR_SIGNATURE] = "bad signature",
	[GR_TTL] = "ttl above 16",
	[GR_FUTURE] = "timestamp in the future",
	[GR_STALE] = "timestamp too old",
	[GR_REPLAY] = "older than the newest from that origin",
	[GR_FORGED_NODE] = "node announcement from another origin",
	[GR_REFSTATE] = "ref state not signed by the creator",
};

const char *gossip_reject_name(int reason)
{
	return reason >= 0 && reason < GR__COUNT ? reject_names[reason] : "unknown";
}

/* ---- dedup: open addressing on the message id, expired entries dropped on rebuild ---- */

static size_t dedup_slot(const struct gossip *g, const uint8_t *id)
{
	uint64_t h;
	memcpy(&h, id, sizeof(h));
	return (size_t)h & (g->dedup_cap - 1);
}

static int dedup_rebuild(struct gossip *g, size_t cap, int64_t now)
{
	struct dedup_ent *old = g->dedup;
	size_t oldcap = g->dedup_cap;
	struct dedup_ent *nt = calloc(cap, sizeof(*nt));
	if (nt == NULL)
		return ME_ENOMEM;
	g->dedup = nt;
	g->dedup_cap = cap;
	g->dedup_len = 0;
	for (size_t i = 0; i < oldcap; i++) {
		if (old[i].expires <= now)
			continue;
		size_t s = dedup_slot(g, old[i].id);
		while (nt[s].expires != 0)
			s = (s + 1) & (cap - 1);
		nt[s] = old[i];
		g->dedup_len++;
	}
	free(old);
	return 0;
}

static int dedup_seen(const struct gossip *g, const uint8_t *id, int64_t now)
{
	size_t s = dedup_slot(g, id);
	while (g->dedup[s].expires != 0) {
		if (memcmp(g->dedup[s].id, id, GMSG_ID_LEN) == 0)
			return g->dedup[s].expires > now;
		s = (s + 1) & (g->dedup_cap - 1);
	}
	return 0;
}

/* Returns 1 when id was seen within the window, else records it and returns 0. */
static int dedup_check(struct gossip *g, const uint8_t *id, int64_t now)
{
	size_t s = dedup_slot(g, id);
	while (g->dedup[s].expires != 0) {
		if (memcmp(g->dedup[s].id, id, GMSG_ID_LEN) == 0) {
			if (g->dedup[s].expires > now)
				return 1;
			g->dedup[s].expires = now + GOSSIP_DEDUP_MS;
			return 0;
		}
		s = (s + 1) & (g->dedup_cap - 1);
	}
	if ((g->dedup_len + 1) * 2 > g->dedup_cap) {
		size_t cap = g->dedup_cap;
		if (dedup_rebuild(g, cap, now) == 0 && (g->dedup_len + 1) * 2 > cap &&
		    cap < DEDUP_MAX_CAP)
			dedup_rebuild(g, cap * 2, now);
		if ((g->dedup_len + 1) * 2 > g->dedup_cap)
			return 0; /* full of live entries: accept without recording */
		s = dedup_slot(g, id);
		while (g->dedup[s].expires != 0)
			s = (s + 1) & (g->dedup_cap - 1);
	}
	memcpy(g->dedup[s].id, id, GMSG_ID_LEN);
	g->dedup[s].expires = now + GOSSIP_DEDUP_MS;
	g->dedup_len++;
	return 0;
}

/* ---- newest announcement per origin ---- */

static struct origin *origin_get(struct gossip *g, const uint8_t *pk, int64_t now)
{
	struct origin *lru = NULL;
	for (size_t i = 0; i < g->norigins; i++) {
		if (memcmp(g->origins[i].pk, pk, ME_PK_LEN) == 0)
			return &g->origins[i];
		if (lru == NULL || g->origins[i].touched < lru->touched)
			lru = &g->origins[i];
	}
	struct origin *o;
	if (g->norigins < ORIGINS_MAX) {
		o = &g->origins[g->norigins++];
	} else {
		/* Forgetting the least recently heard origin only loosens replay protection for
		 * it back to the dedup window and the age limit. */
		o = lru;
	}
	memset(o, 0, sizeof(*o));
	memcpy(o->pk, pk, ME_PK_LEN);
	o->touched = now;
	return o;
}

/* ---- rejections: counted always, logged at most once per reason per 10 s ---- */

static void reject(struct gossip *g, int reason, struct peer *from, const char *detail)
{
	int64_t now = me_mono_ms();
	g->stats.rejected[reason]++;
	if (reason == GR_MALFORMED || reason == GR_SIGNATURE || reason == GR_FORGED_NODE)
		net_peer_penalize(from, NET_PENALTY_MESSAGE, reject_names[reason]); /* not honest */
	if (g->reject_logged_at[reason] != 0 &&
	    now - g->reject_logged_at[reason] < REJECT_LOG_EVERY_MS) {
		g->reject_suppressed[reason]++;
		return;
	}
	char fb[ME_DID_KEY_SIZE + 16];
	snprintf(fb, sizeof(fb), "PEER_DID=%s", net_peer_did(from));
	const char *f[] = { fb, ME_MSGID_ANN_REJECTED, NULL };
	me_log_fields(LOG_WARNING, f, "announcement rejected from %s: %s%s%s (%llu similar suppressed)",
		      net_peer_did(from), reject_names[reason], detail ? ": " : "",
		      detail ? detail : "", (unsigned long long)g->reject_suppressed[reason]);
	g->reject_logged_at[reason] = now;
	g->reject_suppressed[reason] = 0;
}

/* ---- the broadcast tree (Plumtree) ---- */

static struct tpeer *tpeer_find(struct gossip *g, const struct peer *p)
{
	for (struct tpeer *t = g->tpeers; t; t = t->next)
		if (t->p == p)
			return t;
	return NULL;
}

static void tree_timer_cb(uv_timer_t *t);

/* Makes the tree timer fire at `when` (mono ms) or earlier. */
static void tree_arm(struct gossip *g, int64_t when)
{
	if (!g->tree_timer_open || (g->tree_due != 0 && g->tree_due <= when))
		return;
	int64_t now = me_mono_ms();
	g->tree_due = when;
	uv_timer_start(&g->tree_timer, tree_timer_cb, when > now ? (uint64_t)(when - now) : 0, 0);
}

static void send_ctl(struct gossip *g, struct tpeer *t, unsigned kind,
		     const uint8_t (*ids)[GMSG_ID_LEN], size_t n)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	me_frame_begin(&sb);
	if (gmsg_ctl_encode(kind, ids, n, &sb) == 0 && me_frame_end(&sb, 0, NET_MAX_FRAME) == 0 &&
	    net_send(t->p, sb.data, sb.size) == 0) {
		if (kind == GMSG_IHAVE) {
			g->stats.ihave_frames++;
			g->stats.ihave_ids += n;
		} else if (kind == GMSG_GRAFT) {
			g->stats.grafts++;
		} else {
			g->stats.prunes++;
		}
	}
	msgpack_sbuffer_destroy(&sb);
}

static void ihave_flush(struct gossip *g, struct tpeer *t)
{
	if (t->nihave > 0)
		send_ctl(g, t, GMSG_IHAVE, (const uint8_t(*)[GMSG_ID_LEN])t->ihave, t->nihave);
	t->nihave = 0;
	t->ihave_since = 0;
}

static void ihave_queue(struct gossip *g, struct tpeer *t, const uint8_t *id, int64_t now)
{
	if (t->nihave == GMSG_CTL_MAX_IDS)
		ihave_flush(g, t);
	memcpy(t->ihave[t->nihave++], id, GMSG_ID_LEN);
	if (t->nihave == 1) {
		t->ihave_since = now;
		tree_arm(g, now + GOSSIP_IHAVE_DELAY_MS);
	}
}

/* t holds id: it needs no IHAVE for it any more. */
static void ihave_unqueue(struct tpeer *t, const uint8_t *id)
{
	for (size_t i = 0; i < t->nihave; i++) {
		if (memcmp(t->ihave[i], id, GMSG_ID_LEN) == 0) {
			memmove(t->ihave[i], t->ihave[i + 1], (t->nihave - i - 1) * GMSG_ID_LEN);
			t->nihave--;
			return;
		}
	}
}

static void set_eager(struct gossip *g, struct tpeer *t, int eager, const char *why)
{
	(void)g;
	if (t->eager != eager)
		log_debug("gossip: %s is now %s (%s)", net_peer_did(t->p), eager ? "eager" : "lazy",
			  why);
	t->eager = eager;
}

/* ---- cache of recent full messages, for GRAFT replies ---- */

static void cache_drop(struct gossip *g, struct cached *c)
{
	g->cache_bytes -= c->len;
	free(c->frame);
	memset(c, 0, sizeof(*c));
}

static void cache_put(struct gossip *g, const uint8_t *id, const uint8_t *frame, size_t len,
		      int64_t now)
{
	struct cached *slot = NULL, *oldest = NULL;

	if (len > GOSSIP_CACHE_BYTES / 4)
		return;
	for (size_t i = 0; i < GOSSIP_CACHE_MAX; i++) {
		struct cached *c = &g->cache[i];
		if (c->expires != 0 && c->expires <= now)
			cache_drop(g, c);
		if (c->expires == 0) {
			if (slot == NULL)
				slot = c;
		} else if (oldest == NULL || c->expires < oldest->expires) {
			oldest = c;
		}
	}
	if (slot == NULL) {
		cache_drop(g, oldest);
		slot = oldest;
	}
	while (g->cache_bytes + len > GOSSIP_CACHE_BYTES) {
		oldest = NULL;
		for (size_t i = 0; i < GOSSIP_CACHE_MAX; i++)
			if (g->cache[i].expires != 0 &&
			    (oldest == NULL || g->cache[i].expires < oldest->expires))
				oldest = &g->cache[i];
		if (oldest == NULL)
			break;
		cache_drop(g, oldest);
	}
	slot->frame = malloc(len);
	if (slot->frame == NULL)
		return;
	memcpy(slot->frame, frame, len);
	memcpy(slot->id, id, GMSG_ID_LEN);
	slot->len = len;
	slot->expires = now + GOSSIP_CACHE_MS;
	g->cache_bytes += len;
}

static const struct cached *cache_get(const struct gossip *g, const uint8_t *id, int64_t now)
{
	for (size_t i = 0; i < GOSSIP_CACHE_MAX; i++)
		if (g->cache[i].expires > now && memcmp(g->cache[i].id, id, GMSG_ID_LEN) == 0)
			return &g->cache[i];
	return NULL;
}

/* ---- messages announced to us that we lack ---- */

static struct missing *missing_find(struct gossip *g, const uint8_t *id)
{
	for (size_t i = 0; i < GOSSIP_MISSING_MAX; i++)
		if (g->missing[i].due != 0 && memcmp(g->missing[i].id, id, GMSG_ID_LEN) == 0)
			return &g->missing[i];
	return NULL;
}

static void missing_free(struct gossip *g, struct missing *m)
{
	struct tpeer *t = m->charged ? tpeer_find(g, m->charged) : NULL;
	if (t != NULL && t->nmissing > 0)
		t->nmissing--;
	memset(m, 0, sizeof(*m));
}

static void missing_add(struct gossip *g, struct tpeer *from, const uint8_t *id, int64_t now)
{
	struct missing *m = missing_find(g, id);
	if (m != NULL) {
		for (size_t i = 0; i < m->nfrom; i++)
			if (m->from[i] == from->p)
				return;
		if (m->nfrom < GOSSIP_MISSING_SOURCES)
			m->from[m->nfrom++] = from->p;
		return;
	}
	if (from->nmissing >= GOSSIP_MISSING_PER_PEER)
		return;
	for (size_t i = 0; i < GOSSIP_MISSING_MAX; i++) {
		if (g->missing[i].due == 0) {
			m = &g->missing[i];
			memcpy(m->id, id, GMSG_ID_LEN);
			m->from[0] = from->p;
			m->nfrom = 1;
			m->charged = from->p;
			/* On a link that just came up, the IHAVE is the catch-up digest of the peer's
			 * repository announcement (on_peer_up): nothing else brings it, graft now. */
			m->due = now - from->up_at < GOSSIP_GRAFT_TIMEOUT_MS
				 ? now : now + GOSSIP_GRAFT_TIMEOUT_MS;
			from->nmissing++;
			tree_arm(g, m->due);
			return;
		}
	}
}

/* id arrived: forget that it was missing; *known gets the peers that announced it. */
static size_t missing_done(struct gossip *g, const uint8_t *id,
			   struct peer *known[GOSSIP_MISSING_SOURCES])
{
	struct missing *m = missing_find(g, id);
	size_t n = 0;
	if (m == NULL)
		return 0;
	n = m->nfrom;
	memcpy(known, m->from, n * sizeof(*known));
	missing_free(g, m);
	return n;
}

static void tree_timer_cb(uv_timer_t *timer)
{
	struct gossip *g = timer->data;
	int64_t now = me_mono_ms(), next = 0;

	g->tree_due = 0;
	for (size_t i = 0; i < GOSSIP_MISSING_MAX; i++) {
		struct missing *m = &g->missing[i];
		if (m->due == 0)
			continue;
		if (m->due <= now) {
			if (dedup_seen(g, m->id, me_now_ms()) || m->nfrom == 0) {
				missing_free(g, m);
				continue;
			}
			/* Not here in time: ask the first announcer, and make it our tree parent. */
			struct tpeer *t = tpeer_find(g, m->from[0]);
			memmove(m->from, m->from + 1, (m->nfrom - 1) * sizeof(m->from[0]));
			m->nfrom--;
			if (t != NULL) {
				set_eager(g, t, 1, "GRAFT sent");
				ihave_unqueue(t, m->id);
				send_ctl(g, t, GMSG_GRAFT, (const uint8_t(*)[GMSG_ID_LEN])m->id, 1);
			}
			if (m->nfrom == 0) {
				missing_free(g, m);
				continue;
			}
			m->due = now + GOSSIP_GRAFT_RETRY_MS;
		}
		if (next == 0 || m->due < next)
			next = m->due;
	}
	for (struct tpeer *t = g->tpeers; t; t = t->next) {
		if (t->nihave == 0)
			continue;
		if (t->ihave_since + GOSSIP_IHAVE_DELAY_MS <= now)
			ihave_flush(g, t);
		else if (next == 0 || t->ihave_since + GOSSIP_IHAVE_DELAY_MS < next)
			next = t->ihave_since + GOSSIP_IHAVE_DELAY_MS;
	}
	if (next != 0)
		tree_arm(g, next);
}

/* Sends a full message on the tree: in full to the eager peers, by id to the lazy ones; never
 * to skip (the sender) nor to the peers in known[] (they announced it to us). */
static void tree_push(struct gossip *g, const uint8_t *id, const uint8_t *frame, size_t len,
		      const struct peer *skip, struct peer *const *known, size_t nknown)
{
	int64_t now = me_mono_ms();
	if (g->net == NULL)
		return;
	for (struct tpeer *t = g->tpeers; t; t = t->next) {
		size_t k;
		if (t->p == skip)
			continue;
		for (k = 0; k < nknown && known[k] != t->p; k++)
			;
		if (k < nknown)
			continue;
		if (!t->eager)
			ihave_queue(g, t, id, now);
		else if (net_send(t->p, frame, len) == 0)
			g->stats.sent++;
	}
}

/* A full message we already had came from p: the link is redundant, make it lazy. */
static void tree_duplicate(struct gossip *g, struct peer *p, const uint8_t *id)
{
	struct tpeer *t = tpeer_find(g, p);
	if (t == NULL)
		return;
	ihave_unqueue(t, id);
	/* Also when it is lazy already: it pushed, so it takes us for eager (the link was
	 * replaced, or a GRAFT and a PRUNE crossed); the PRUNE puts both ends in step. */
	set_eager(g, t, 0, "duplicate, PRUNE sent");
	send_ctl(g, t, GMSG_PRUNE, NULL, 0);
}

static int on_ctl(struct gossip *g, struct peer *from, const uint8_t *body, size_t len)
{
	static struct gmsg_ctl c; /* 8 KiB; the loop is single-threaded */
	struct tpeer *t = tpeer_find(g, from);
	int64_t now = me_mono_ms();

	if (gmsg_ctl_decode(body, len, &c) < 0) {
		reject(g, GR_MALFORMED, from, "tree control message");
		return -1;
	}
	if (t == NULL)
		return 0;
	switch (c.kind) {
	case GMSG_IHAVE:
		g->stats.ihave_ids_received += c.nids;
		for (size_t i = 0; i < c.nids; i++) {
			if (dedup_seen(g, c.ids[i], me_now_ms()))
				ihave_unqueue(t, c.ids[i]); /* it has it: no IHAVE for it from us */
			else
				missing_add(g, t, c.ids[i], now);
		}
		break;
	case GMSG_GRAFT:
		g->stats.grafts_received++;
		set_eager(g, t, 1, "GRAFT received");
		if (now - t->reply_window >= 1000) {
			t->reply_window = now;
			t->replies = 0;
			t->reply_bytes = 0;
		}
		for (size_t i = 0; i < c.nids && t->replies < GOSSIP_GRAFT_REPLIES &&
				   t->reply_bytes < GOSSIP_GRAFT_REPLY_BYTES;
		     i++) {
			const struct cached *m = NULL;
			const msgpack_sbuffer *own = NULL;
			if (g->last_node.size > 0 && memcmp(c.ids[i], g->last_node_id, GMSG_ID_LEN) == 0)
				own = &g->last_node; /* our latest, however old */
			else if (g->last_repo.size > 0 &&
				 memcmp(c.ids[i], g->last_repo_id, GMSG_ID_LEN) == 0)
				own = &g->last_repo;
			else if (dedup_seen(g, c.ids[i], me_now_ms())) /* cheap test first */
				m = cache_get(g, c.ids[i], now);
			if (m == NULL && own == NULL)
				continue; /* not ours to give (any more): ignored */
			t->replies++;
			t->reply_bytes += own ? own->size : m->len;
			ihave_unqueue(t, c.ids[i]);
			if (net_send(t->p, own ? (const uint8_t *)own->data : m->frame,
				     own ? own->size : m->len) == 0) {
				g->stats.sent++;
				g->stats.graft_replies++;
			}
		}
		break;
	case GMSG_PRUNE:
		g->stats.prunes_received++;
		set_eager(g, t, 0, "PRUNE received");
		break;
	}
	return 0;
}

/* Our own new message: recorded as seen and cached like a received one, then pushed. */
static void originate(struct gossip *g, const msgpack_sbuffer *fr)
{
	struct gmsg_envelope e;
	int64_t now = me_now_ms();

	if (fr->size <= ME_FRAME_HDR ||
	    gmsg_envelope_decode((const uint8_t *)fr->data + ME_FRAME_HDR,
				 fr->size - ME_FRAME_HDR, &e) < 0)
		return;
	dedup_check(g, e.id, now);
	memcpy(e.type == GMSG_NODE_ANN ? g->last_node_id : g->last_repo_id, e.id, GMSG_ID_LEN);
	cache_put(g, e.id, (const uint8_t *)fr->data, fr->size, me_mono_ms());
	tree_push(g, e.id, (const uint8_t *)fr->data, fr->size, NULL, NULL, 0);
}

static int frame_envelope(struct gossip *g, unsigned type, const msgpack_sbuffer *payload,
			  msgpack_sbuffer *out)
{
	msgpack_sbuffer_clear(out);
	me_frame_begin(out);
	int rc = gmsg_envelope_encode(&g->node->kp, (uint64_t)me_now_ms(), GMSG_MAX_TTL, type,
				      payload->data, payload->size, out);
	if (rc < 0)
		return rc;
	return me_frame_end(out, 0, NET_MAX_FRAME);
}

/* Our announced addresses: --announce-addr, else the listen addresses with wildcards replaced
 * by this host's interface addresses (loopback only when there is nothing else). */
static size_t our_addresses(struct gossip *g, char out[][GMSG_MAX_ADDR_LEN + 1], size_t max)
{
	const struct me_config *cfg = g->node->cfg;
	size_t n = 0;

	if (cfg->nannounce > 0) {
		for (size_t i = 0; i < cfg->nannounce && n < max; i++)
			snprintf(out[n++], GMSG_MAX_ADDR_LEN + 1, "%.64s", cfg->announce[i].text);
		return n;
	}
	for (size_t i = 0; i < cfg->naddrs && n < max; i++) {
		const struct me_sockaddr *a = &cfg->addrs[i];
		if (gmsg_addr_parse(a->text, strlen(a->text), NULL, NULL) == 0) {
			snprintf(out[n++], GMSG_MAX_ADDR_LEN + 1, "%.64s", a->text);
			continue;
		}
		/* Wildcard: list interface addresses of the same family with our port. */
		uv_interface_address_t *ifs;
		int nifs;
		if (uv_interface_addresses(&ifs, &nifs) != 0)
			continue;
		int port = a->ss.ss_family == AF_INET6
			? ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port)
			: ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
		for (int pass = 0; pass < 2; pass++) {
			size_t before = n;
			for (int k = 0; k < nifs && n < max; k++) {
				char ip[INET6_ADDRSTRLEN], txt[GMSG_MAX_ADDR_LEN + 1];
				if (ifs[k].is_internal != pass ||
				    ifs[k].address.address4.sin_family != a->ss.ss_family)
					continue;
				if (a->ss.ss_family == AF_INET) {
					uv_ip4_name(&ifs[k].address.address4, ip, sizeof(ip));
					snprintf(txt, sizeof(txt), "%s:%d", ip, port);
				} else {
					uv_ip6_name(&ifs[k].address.address6, ip, sizeof(ip));
					snprintf(txt, sizeof(txt), "[%s]:%d", ip, port);
				}
				if (gmsg_addr_parse(txt, strlen(txt), NULL, NULL) == 0)
					snprintf(out[n++], GMSG_MAX_ADDR_LEN + 1, "%s", txt);
			}
			if (n > before)
				break;
		}
		uv_free_interface_addresses(ifs, nifs);
	}
	return n;
}

/* 1 when g->last_node holds a new announcement to send, 0 when nothing changed (and
 * force is 0), < 0 on error. */
static int build_node_ann(struct gossip *g, int force)
{
	char addrs[GMSG_MAX_ADDRS][GMSG_MAX_ADDR_LEN + 1];
	struct gmsg_node_ann a;
	msgpack_sbuffer pl;
	int rc;

	memset(&a, 0, sizeof(a));
	memcpy(a.pk, g->node->kp.pk, ME_PK_LEN);
	a.alias = gmsg_str(g->node->cfg->alias);
	a.naddrs = our_addresses(g, addrs, GMSG_MAX_ADDRS);
	for (size_t i = 0; i < a.naddrs; i++)
		a.addrs[i] = gmsg_str(addrs[i]);
	a.node_type = NODE_TYPE_FULL;
	a.version = gmsg_str(ME_VERSION);
	msgpack_sbuffer_init(&pl);
	rc = gmsg_node_ann_encode(&a, &pl);
	if (rc == 0 && !force && g->last_node.size > 0 && pl.size == g->last_node_payload.size &&
	    memcmp(pl.data, g->last_node_payload.data, pl.size) == 0) {
		msgpack_sbuffer_destroy(&pl);
		return 0;
	}
	if (rc == 0)
		rc = frame_envelope(g, GMSG_NODE_ANN, &pl, &g->last_node);
	if (rc == 0) {
		msgpack_sbuffer_clear(&g->last_node_payload);
		if (msgpack_sbuffer_write(&g->last_node_payload, pl.data, pl.size) != 0)
			rc = ME_ENOMEM;
	}
	msgpack_sbuffer_destroy(&pl);
	return rc < 0 ? rc : 1;
}

/* Signs the current refs of one of our repositories when they have no signed state yet. */
static int ensure_refstate(struct gossip *g, struct store_repo *r)
{
	struct store_ref *refs;
	int64_t seq = me_now_ms();
	size_t n;
	int rc;

	if (r->has_ref_sig)
		return 0;
	if ((rc = store_refs_get(g->node->store, r->id, &refs, &n)) < 0)
		return rc;
	rc = refstate_sign_store(g->node, r->id, seq, r->head, refs, n, r->ref_sig);
	store_refs_free(refs, n);
	if (rc == 0) {
		r->ref_seq = seq;
		r->has_ref_sig = 1;
	}
	return rc;
}

/* Like build_node_ann, for the repository announcement. */
static int build_repo_ann(struct gossip *g, int force)
{
	struct store_repo *repos;
	size_t nrepos, k = 0;
	struct store_ref **refs = NULL;
	size_t *nrefs = NULL;
	struct gmsg_repo_ann ann = { 0 };
	msgpack_sbuffer pl;
	int rc;

	if ((rc = store_repo_list(g->node->store, &repos, &nrepos)) < 0)
		return rc;
	refs = calloc(nrepos + 1, sizeof(*refs));
	nrefs = calloc(nrepos + 1, sizeof(*nrefs));
	ann.repos = calloc(nrepos + 1, sizeof(*ann.repos));
	msgpack_sbuffer_init(&pl);
	if (refs == NULL || nrefs == NULL || ann.repos == NULL) {
		rc = ME_ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < nrepos && k < GMSG_MAX_REPOS; i++) {
		struct store_repo *r = &repos[i];
		/* Ours, and the mirrors we hold at the newest signed state: any replica serves. */
		if (r->is_external ? !(r->has_ref_sig && r->mirror_seq > 0 &&
				       r->mirror_seq == r->ref_seq)
				   : ensure_refstate(g, r) < 0)
			continue;
		if (store_refs_get(g->node->store, r->id, &refs[k], &nrefs[k]) < 0)
			continue;
		struct gmsg_repo *gr = &ann.repos[k];
		gr->id = gmsg_str(r->id);
		gr->name = gmsg_str(r->name);
		gr->description = gmsg_str(r->description);
		me_did_key_parse(r->creator, gr->creator_pk);
		gr->refstate.repo_id = gmsg_str(r->id);
		gr->refstate.seq = (uint64_t)r->ref_seq;
		gr->refstate.head = gmsg_str(r->head);
		if (refstate_from_refs(&gr->refstate, refs[k], nrefs[k]) < 0) {
			store_refs_free(refs[k], nrefs[k]);
			continue;
		}
		memcpy(gr->refstate.sig, r->ref_sig, ME_SIG_LEN);
		k++;
	}
	ann.nrepos = k;
	qsort(ann.repos, k, sizeof(*ann.repos), gmsg_repo_cmp);
	rc = gmsg_repo_ann_encode(&ann, &pl);
	if (rc == 0 && !force && g->last_repo.size > 0 && pl.size == g->last_repo_payload.size &&
	    memcmp(pl.data, g->last_repo_payload.data, pl.size) == 0)
		goto out; /* rc 0: unchanged */
	if (rc == 0)
		rc = frame_envelope(g, GMSG_REPO_ANN, &pl, &g->last_repo);
	if (rc == 0) {
		msgpack_sbuffer_clear(&g->last_repo_payload);
		rc = msgpack_sbuffer_write(&g->last_repo_payload, pl.data, pl.size) != 0 ? ME_ENOMEM
											: 1;
	}
out:
	for (size_t i = 0; ann.repos && i < k; i++)
		free(ann.repos[i].refstate.refs);
	for (size_t i = 0; refs && i < k; i++)
		store_refs_free(refs[i], nrefs[i]);
	free(ann.repos);
	free(refs);
	free(nrefs);
	msgpack_sbuffer_destroy(&pl);
	store_repo_list_free(repos, nrepos);
	return rc;
}

/* Builds and sends our announcements: both when force (the periodic one), else each only
 * when it changed since the last one sent (something else changed, or nothing). */
static void announce(struct gossip *g, int force)
{
	if (!g->node->has_key || g->net == NULL)
		return;
	int rc = build_node_ann(g, force);
	if (rc == 1)
		originate(g, &g->last_node);
	else if (rc < 0)
		log_warn("gossip: cannot build the node announcement");
	rc = build_repo_ann(g, force);
	if (rc == 1)
		originate(g, &g->last_repo);
	else if (rc < 0)
		log_warn("gossip: cannot build the repository announcement");
}

static void on_timer(uv_timer_t *t)
{
	announce(t->data, 1);
}

void gossip_changed(struct gossip *g)
{
	if (g != NULL)
		announce(g, 0);
	if (g != NULL && g->timer_open) /* next periodic one a full (maybe reloaded) interval on */
		uv_timer_start(&g->timer, on_timer, g->node->cfg->gossip_interval_ms,
			       g->node->cfg->gossip_interval_ms);
}

/* ---- receiving ---- */

static void maybe_dial(struct gossip *g, const struct gmsg_node_ann *a)
{
	struct me_sockaddr sa;

	if (g->net == NULL || net_peer_find(g->net, a->pk) != NULL)
		return;
	for (size_t i = 0; i < g->nwanted; i++)
		if (memcmp(g->wanted[i], a->pk, ME_PK_LEN) == 0)
			goto update;
	if (g->nwanted >= g->node->cfg->max_outbound) {
		/* Full: give the slot of one whose dials fail to the newcomer, so that nodes that
		 * came and went can never lock us out of the rest of the network. Connections that
		 * are up or being made keep their slots: --max-outbound is a cap. */
		size_t i;
		for (i = 0; i < g->nwanted; i++)
			if (net_target_unreachable(g->net, g->wanted[i]))
				break;
		if (i == g->nwanted)
			return;
		net_unwant(g->net, g->wanted[i]);
		memcpy(g->wanted[i], a->pk, ME_PK_LEN);
		goto update;
	}
	memcpy(g->wanted[g->nwanted++], a->pk, ME_PK_LEN);
update:
	for (size_t i = 0; i < a->naddrs; i++) {
		char txt[GMSG_MAX_ADDR_LEN + 1];
		memcpy(txt, a->addrs[i].ptr, a->addrs[i].len);
		txt[a->addrs[i].len] = '\0';
		if (me_sockaddr_parse(txt, &sa) == 0 && net_want(g->net, a->pk, &sa) == 0)
			return;
	}
}

static int apply_node_ann(struct gossip *g, const struct gmsg_envelope *e, struct peer *from)
{
	struct gmsg_node_ann a;
	char alias[GMSG_MAX_ALIAS + 1], version[GMSG_MAX_VERSION + 1];
	char addrs[GMSG_MAX_ADDRS * (GMSG_MAX_ADDR_LEN + 1) + 1] = "";
	int rc = gmsg_node_ann_from_envelope(e, &a);

	if (rc == ME_EPERM) {
		reject(g, GR_FORGED_NODE, from, e->origin_did);
		return rc;
	}
	if (rc < 0) {
		reject(g, GR_MALFORMED, from, "node announcement payload");
		return rc;
	}
	if (memcmp(a.pk, g->node->kp.pk, ME_PK_LEN) == 0)
		return 0; /* our own, echoed back */
	snprintf(alias, sizeof(alias), "%.*s", (int)a.alias.len, a.alias.ptr ? a.alias.ptr : "");
	snprintf(version, sizeof(version), "%.*s", (int)a.version.len,
		 a.version.ptr ? a.version.ptr : "");
	size_t off = 0;
	for (size_t i = 0; i < a.naddrs; i++)
		off += (size_t)snprintf(addrs + off, sizeof(addrs) - off, "%s%.*s", i ? "," : "",
					(int)a.addrs[i].len, a.addrs[i].ptr);
	struct store_node sn = { .id = a.did, .alias = alias, .addresses = addrs,
				 .node_type = (int)a.node_type, .version = version,
				 .last_seen_ms = me_now_ms() };
	if (store_node_upsert(g->node->store, &sn) < 0)
		log_warn("gossip: cannot store node %s: %s", a.did, store_errmsg(g->node->store));
	maybe_dial(g, &a);
	return 0;
}

static int apply_repo_ann(struct gossip *g, const struct gmsg_envelope *e, struct peer *from)
{
	struct gmsg_repo_ann ann;
	int rc = gmsg_repo_ann_decode(e->payload, e->payload_len, &ann);

	if (rc < 0) {
		reject(g, GR_MALFORMED, from, "repository announcement payload");
		return rc;
	}
	/* Every ref state must be its creator's: one that is not makes the whole announcement
	 * (signed by its origin) a forgery, and nothing of it is stored or relayed. */
	for (size_t i = 0; i < ann.nrepos; i++) {
		if (gmsg_refstate_verify(&ann.repos[i].refstate, ann.repos[i].creator_pk) < 0) {
			reject(g, GR_REFSTATE, from, e->origin_did);
			gmsg_repo_ann_free(&ann);
			return ME_EPERM;
		}
	}
	for (size_t i = 0; i < ann.nrepos; i++) {
		struct gmsg_repo *gr = &ann.repos[i];
		char id[ME_DID_REPO_SIZE], creator[ME_DID_KEY_SIZE];
		char name[GMSG_MAX_NAME + 1], desc[GMSG_MAX_DESC + 1], head[GMSG_MAX_REFNAME + 1];

		if (gr->id.len >= sizeof(id))
			continue;
		snprintf(id, sizeof(id), "%.*s", (int)gr->id.len, gr->id.ptr);
		if (g->node->sync != NULL && sync_creator_refuted(g->node->sync, id, gr->creator_pk))
			continue; /* proven not to be this repository's creator */
		snprintf(name, sizeof(name), "%.*s", (int)gr->name.len, gr->name.ptr);
		snprintf(desc, sizeof(desc), "%.*s", (int)gr->description.len,
			 gr->description.ptr ? gr->description.ptr : "");
		snprintf(head, sizeof(head), "%.*s", (int)gr->refstate.head.len,
			 gr->refstate.head.ptr ? gr->refstate.head.ptr : "");
		me_did_key_from_pk(gr->creator_pk, creator, sizeof(creator));

		size_t n = gr->refstate.nrefs;
		struct store_ref *refs = calloc(n ? n : 1, sizeof(*refs));
		char *names = calloc(n ? n : 1, GMSG_MAX_REFNAME + 1);
		char *oids = calloc(n ? n : 1, 2 * ME_OID_LEN + 1);
		if (refs == NULL || names == NULL || oids == NULL) {
			free(refs);
			free(names);
			free(oids);
			continue;
		}
		for (size_t j = 0; j < n; j++) {
			char *nm = names + j * (GMSG_MAX_REFNAME + 1);
			char *ox = oids + j * (2 * ME_OID_LEN + 1);
			snprintf(nm, GMSG_MAX_REFNAME + 1, "%.*s", (int)gr->refstate.refs[j].name.len,
				 gr->refstate.refs[j].name.ptr);
			sodium_bin2hex(ox, 2 * ME_OID_LEN + 1, gr->refstate.refs[j].oid, ME_OID_LEN);
			refs[j].name = nm;
			refs[j].oid = ox;
		}
		struct store_repo r = { .id = id, .name = name, .creator = creator,
					.description = desc, .path = "", .is_external = 1,
					.root_commit = "", .head = head,
					.ref_seq = (int64_t)gr->refstate.seq, .has_ref_sig = 1 };
		memcpy(r.ref_sig, gr->refstate.sig, ME_SIG_LEN);
		int changed = 0;
		struct store_repo cur;
		if (store_repo_upsert_external(g->node->store, &r, refs, n, &changed) < 0) {
			log_warn("gossip: cannot store repository %s: %s", id,
				 store_errmsg(g->node->store));
		} else if (store_repo_get(g->node->store, id, &cur) == 0) {
			/* The origin holds this state: the sync plane may fetch it from there (only
			 * for the creator we know, the one the id will be checked against). */
			if (strcmp(cur.creator, creator) == 0 && g->node->sync != NULL)
				sync_announced(g->node->sync, e->origin_pk, id,
					       (int64_t)gr->refstate.seq);
			store_repo_clear(&cur);
		}
		if (changed) {
			char fb[ME_DID_REPO_SIZE + 16];
			snprintf(fb, sizeof(fb), "REPO_ID=%s", id);
			const char *f[] = { fb, ME_MSGID_REPO_ANNOUNCED, NULL };
			me_log_fields(LOG_INFO, f, "repository announced: %s by %s (%zu refs)", name,
				      creator, n);
		}
		free(refs);
		free(names);
		free(oids);
	}
	gmsg_repo_ann_free(&ann);
	return 0;
}

static int on_frame(void *ud, struct peer *from, const uint8_t *body, size_t len)
{
	struct gossip *g = ud;
	struct gmsg_envelope e;
	int64_t now = me_now_ms();
	const char *why = NULL;
	struct peer *known[GOSSIP_MISSING_SOURCES];
	size_t nknown;

	if (gmsg_is_ctl(body, len))
		return on_ctl(g, from, body, len);
	g->stats.received++;
	int rc = gmsg_envelope_decode(body, len, &e);
	if (rc == ME_EPERM) {
		reject(g, GR_SIGNATURE, from, NULL);
		return 0;
	}
	if (rc < 0) {
		reject(g, GR_MALFORMED, from, NULL);
		return -1; /* a malformed frame ends the stream */
	}
	if (e.ttl > GMSG_MAX_TTL) {
		reject(g, GR_TTL, from, NULL);
		return 0;
	}
	if (gmsg_check_time(e.ts_ms, now, &why) < 0) {
		reject(g, e.ts_ms > (uint64_t)now ? GR_FUTURE : GR_STALE, from, why);
		return 0;
	}
	if (dedup_check(g, e.id, now)) {
		g->stats.duplicates++;
		tree_duplicate(g, from, e.id);
		return 0;
	}
	nknown = missing_done(g, e.id, known);
	if (memcmp(e.origin_pk, g->node->kp.pk, ME_PK_LEN) == 0)
		return 0; /* ours, back again after the dedup window */
	if (e.type != GMSG_NODE_ANN && e.type != GMSG_REPO_ANN)
		goto relay; /* unknown types travel on, for newer nodes */
	struct origin *o = origin_get(g, e.origin_pk, now);
	if (e.ts_ms <= o->newest[e.type]) {
		reject(g, GR_REPLAY, from, e.origin_did);
		return 0;
	}
	rc = e.type == GMSG_NODE_ANN ? apply_node_ann(g, &e, from) : apply_repo_ann(g, &e, from);
	if (rc < 0)
		return 0;
	o->newest[e.type] = e.ts_ms;
	o->touched = now;
	g->stats.accepted++;
relay:
	if (e.ttl > 1) {
		uint8_t *fr = malloc(ME_FRAME_HDR + len);
		if (fr == NULL)
			return 0;
		fr[0] = (uint8_t)(len >> 24);
		fr[1] = (uint8_t)(len >> 16);
		fr[2] = (uint8_t)(len >> 8);
		fr[3] = (uint8_t)len;
		memcpy(fr + ME_FRAME_HDR, body, len);
		if (gmsg_envelope_set_ttl(fr + ME_FRAME_HDR, len, e.ttl - 1) == 0) {
			uint64_t before = g->stats.sent;
			cache_put(g, e.id, fr, ME_FRAME_HDR + len, me_mono_ms());
			tree_push(g, e.id, fr, ME_FRAME_HDR + len, from, known, nknown);
			g->stats.relayed += g->stats.sent - before;
		}
		free(fr);
	}
	return 0;
}

static void on_peer_up(void *ud, struct peer *p)
{
	struct gossip *g = ud;
	struct tpeer *t = tpeer_find(g, p);

	if (t == NULL && (t = calloc(1, sizeof(*t))) != NULL) {
		t->p = p;
		t->next = g->tpeers;
		g->tpeers = t;
	}
	if (t != NULL) {
		t->eager = 1; /* new links start eager; duplicates prune them */
		t->up_at = me_mono_ms();
		log_debug("gossip: %s is up, eager", net_peer_did(p));
	}
	/* Bring the newcomer up to date: our node announcement in full (small, and what any
	 * peer needs first), our repository announcement by id (it GRAFTs it if it lacks it). */
	if (g->last_node.size == 0) {
		announce(g, 1);
	} else {
		if (net_send(p, g->last_node.data, g->last_node.size) == 0) {
			g->stats.sent++;
			g->stats.catchup++;
		}
		if (t != NULL && g->last_repo.size > 0)
			send_ctl(g, t, GMSG_IHAVE, (const uint8_t(*)[GMSG_ID_LEN])g->last_repo_id, 1);
	}
	struct store_node sn;
	if (store_node_get(g->node->store, net_peer_did(p), &sn) == 0) {
		sn.last_seen_ms = me_now_ms();
		store_node_upsert(g->node->store, &sn);
		store_node_clear(&sn);
	}
}

static void on_peer_down(void *ud, struct peer *p, const char *why)
{
	struct gossip *g = ud;
	(void)why;

	for (size_t i = 0; i < GOSSIP_MISSING_MAX; i++) {
		struct missing *m = &g->missing[i];
		if (m->due == 0)
			continue;
		size_t k = 0;
		for (size_t j = 0; j < m->nfrom; j++)
			if (m->from[j] != p)
				m->from[k++] = m->from[j];
		m->nfrom = k;
		if (m->charged == p)
			m->charged = NULL; /* its quota goes with it */
	}
	for (struct tpeer **pp = &g->tpeers; *pp; pp = &(*pp)->next) {
		if ((*pp)->p == p) {
			struct tpeer *t = *pp;
			*pp = t->next;
			free(t);
			break;
		}
	}
}

struct net_callbacks gossip_net_callbacks(struct gossip *g)
{
	struct net_callbacks cb = { .peer_up = on_peer_up, .peer_down = on_peer_down,
				    .frame = on_frame, .ud = g };
	return cb;
}

int gossip_init(struct gossip **out, uv_loop_t *loop, struct node *node, char *err,
		size_t errsz)
{
	*out = NULL;
	struct gossip *g = calloc(1, sizeof(*g));
	if (g == NULL)
		goto nomem;
	g->loop = loop;
	g->node = node;
	g->dedup_cap = DEDUP_MIN_CAP;
	g->dedup = calloc(g->dedup_cap, sizeof(*g->dedup));
	g->origins = calloc(ORIGINS_MAX, sizeof(*g->origins));
	g->cache = calloc(GOSSIP_CACHE_MAX, sizeof(*g->cache));
	g->missing = calloc(GOSSIP_MISSING_MAX, sizeof(*g->missing));
	if (g->dedup == NULL || g->origins == NULL || g->cache == NULL || g->missing == NULL)
		goto nomem;
	msgpack_sbuffer_init(&g->last_node);
	msgpack_sbuffer_init(&g->last_repo);
	msgpack_sbuffer_init(&g->last_node_payload);
	msgpack_sbuffer_init(&g->last_repo_payload);
	*out = g;
	return 0;
nomem:
	if (g) {
		free(g->dedup);
		free(g->origins);
		free(g->cache);
		free(g->missing);
		free(g);
	}
	snprintf(err, errsz, "out of memory");
	return ME_ENOMEM;
}

void gossip_start(struct gossip *g, struct net *net)
{
	const struct me_config *cfg = g->node->cfg;
	struct store_node *nodes;
	size_t nnodes;

	g->net = net;
	for (size_t i = 0; i < cfg->nboots; i++) {
		uint8_t pk[ME_PK_LEN];
		if (me_did_key_parse(cfg->boots[i].did, pk) == 0)
			net_want(net, pk, &cfg->boots[i].addr);
	}
	/* Re-dial the nodes we knew, most recently seen first. */
	if (store_node_list(g->node->store, &nodes, &nnodes) == 0) {
		for (size_t i = 0; i < nnodes && g->nwanted < cfg->max_outbound; i++) {
			uint8_t pk[ME_PK_LEN];
			struct me_sockaddr sa;
			char *addr = nodes[i].addresses, *comma;
			if (me_did_key_parse(nodes[i].id, pk) < 0 || addr == NULL || *addr == '\0')
				continue;
			if ((comma = strchr(addr, ',')) != NULL)
				*comma = '\0';
			if (me_sockaddr_parse(addr, &sa) < 0 || net_want(net, pk, &sa) < 0)
				continue;
			memcpy(g->wanted[g->nwanted++], pk, ME_PK_LEN);
		}
		store_node_list_free(nodes, nnodes);
	}
	uv_timer_init(g->loop, &g->timer);
	g->timer.data = g;
	g->timer_open = 1;
	uv_timer_init(g->loop, &g->tree_timer);
	g->tree_timer.data = g;
	g->tree_timer_open = 1;
	uv_timer_start(&g->timer, on_timer, 0, cfg->gossip_interval_ms);
}

static void gossip_release(struct gossip *g)
{
	msgpack_sbuffer_destroy(&g->last_node);
	msgpack_sbuffer_destroy(&g->last_repo);
	msgpack_sbuffer_destroy(&g->last_node_payload);
	msgpack_sbuffer_destroy(&g->last_repo_payload);
	while (g->tpeers != NULL) {
		struct tpeer *t = g->tpeers;
		g->tpeers = t->next;
		free(t);
	}
	for (size_t i = 0; i < GOSSIP_CACHE_MAX; i++)
		free(g->cache[i].frame);
	free(g->cache);
	free(g->missing);
	free(g->dedup);
	free(g->origins);
	free(g);
}

/* Both timers are closed together; the second close callback releases g. */
static void timer_on_close(uv_handle_t *h)
{
	struct gossip *g = h->data;
	if (--g->timer_open == 0)
		gossip_release(g);
}

void gossip_free(struct gossip *g)
{
	if (g == NULL)
		return;
	if (g->timer_open) {
		g->timer_open = 2; /* counts the close callbacks still to come */
		uv_timer_stop(&g->timer);
		uv_timer_stop(&g->tree_timer);
		g->tree_timer_open = 0;
		uv_close((uv_handle_t *)&g->timer, timer_on_close);
		uv_close((uv_handle_t *)&g->tree_timer, timer_on_close);
	} else {
		gossip_release(g);
	}
}

void gossip_get_stats(const struct gossip *g, struct gossip_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (g == NULL)
		return;
	*out = g->stats;
	for (const struct tpeer *t = g->tpeers; t; t = t->next) {
		if (t->eager)
			out->eager_peers++;
		else
			out->lazy_peers++;
	}
}
