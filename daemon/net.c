#include "daemon/net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <sodium.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/tls.h"

#define CID_LEN 16
#define MAX_CIDS 10
#define MAX_IN_STREAMS 4
#define MAX_CONNS (NET_MAX_IN + NET_MAX_OUT)
#define IPKEY_LEN 17      /* family, then the IPv4 address or the IPv6 /64 */
#define LIMIT_LOG_EVERY_MS 10000
#define REFUSED_RING 16   /* Initial packets refused lately (counted once per connection) */
#define MAX_PKT 1452
#define DIAL_TICK_MS 500
#define MAX_VEC 16
#define MAX_BURST 256 /* packets per conn_write */
#define RX_BATCH 16      /* datagrams per recvmmsg */
#define TX_BATCH 32      /* packets per sendmmsg */
#define RX_SLOT 65536    /* libuv gives each datagram of a batch this much of the buffer */
/* Receive windows. Frames are consumed as they arrive and credit returned at once, so these
 * only bound what may be in flight (and what ngtcp2 buffers out of order). */
#define XFER_STREAM_WINDOW (4u << 20)
#define CONN_WINDOW (16u << 20)

struct chunk {
	struct chunk *next;
	uint64_t off; /* stream offset of data[0] */
	size_t len;
	uint8_t data[];
};

struct sendq {
	int64_t sid; /* -1 until the stream is open */
	struct chunk *head, *tail;
	uint64_t acked, sent, end;
};

struct instream {
	int64_t sid;
	int dead;
	struct me_frame_reader rd;
};

/* A transfer stream (bidirectional). ngtcp2's callbacks only record what happened here; the
 * user's callbacks run from xfer_dispatch, on the event loop, outside ngtcp2. */
struct net_xfer {
	struct peer *c;
	struct net_xfer *prev, *next;
	int64_t sid;
	struct net_xfer_callbacks cb;
	void *ud;
	struct sendq sq;
	struct me_frame_reader rd;
	int rd_err;         /* the reader refused bytes: reject once the frames before are out */
	uint64_t bytes_in, bytes_out;
	uint64_t served;    /* write tick when its data last went into a packet (round robin) */
	uint64_t code;      /* our reset code (reset_req) */
	const char *why;
	uint64_t peer_code; /* from the peer's RESET_STREAM (peer_reset) */
	uint64_t close_code; /* from ngtcp2's stream_close (sclosed) */
	unsigned inbound : 1;    /* opened by the peer */
	unsigned live : 1;       /* has callbacks: opened by us, or accepted */
	unsigned fin_req : 1;    /* net_xfer_finish called */
	unsigned fin_sent : 1;
	unsigned wblocked : 1;   /* flow control blocked in this conn_write */
	unsigned stopped : 1;    /* the peer stopped reading (STOP_SENDING) */
	unsigned peer_fin : 1;
	unsigned eof_done : 1;
	unsigned hi : 1;         /* queue reached NET_XFER_LOWAT: `writable` when it drops */
	unsigned wr_pending : 1; /* `writable` due */
	unsigned reset_req : 1;  /* net_xfer_reset or a rejected frame: reset at dispatch */
	unsigned peer_reset : 1; /* RESET_STREAM received */
	unsigned sclosed : 1;    /* ngtcp2 closed the stream */
	unsigned ended : 1;      /* `closed` is being delivered */
};

struct endpoint {
	uv_udp_t udp;
	struct net *net;
	struct sockaddr_storage local;
	socklen_t local_len;
};

struct peer {
	struct net *net;
	struct endpoint *ep;
	ngtcp2_conn *q;
	ngtcp2_crypto_conn_ref ref;
	struct tls_session *tls;
	uv_timer_t timer;
	struct sockaddr_storage remote;
	socklen_t remote_len;
	char remote_text[80];
	ngtcp2_cid cids[MAX_CIDS];
	size_t ncids;
	int outbound;
	int up;
	int released;
	uint64_t pending_close; /* app error to close with once out of ngtcp2's callbacks */
	const char *pending_why;
	int has_pk;
	uint8_t pk[ME_PK_LEN];
	char did[ME_DID_KEY_SIZE];
	int has_expected;
	uint8_t expected[ME_PK_LEN];
	int64_t since_ms;
	uint64_t started_ns;
	struct sendq sq;
	struct instream ins[MAX_IN_STREAMS];
	struct net_xfer *xfers;
	uint64_t wtick;     /* conn_write's round-robin clock */
	int xdirty;         /* transfer events wait for xfer_dispatch */
	int dispatching;
	uint64_t close_code; /* app error we closed with (conn_close) */
	uint64_t lost_code;  /* what transfers are told when the connection is gone */
	char lost_why[96];
	int in_callback;
	int probing; /* keep-alive shortened to check the connection is still alive */
	uint64_t last_rx_ns;
	struct peer *rx_next;  /* in net.rx_list */
	int rx_pending;
	struct peer *awaiting; /* a connection to the same node that must prove it is alive */
	uint64_t probe_start_ns;
	uint8_t ipkey[IPKEY_LEN];
	/* rate limit on the frames of the peer's message streams: token buckets */
	uint64_t rl_ns;
	double rl_frames, rl_bytes;
	uint64_t flood_ns; /* start of the last second that cost NET_PENALTY_FLOOD */
	int64_t score_mp;  /* misbehaviour, in thousandths of a point */
	int64_t score_ms;
	int misbehaved;
	struct peer *prev, *next;
};

enum { BAN_KEY, BAN_IP };

/* A banned key or address, or a key whose last connection ended with a misbehaviour score
 * (until_ms 0 when never banned): a reconnect starts from that score, decayed. */
struct ban {
	uint8_t kind;
	uint8_t id[ME_PK_LEN]; /* the key, or the ipkey */
	int64_t until_ms;      /* monotonic */
	uint32_t next_ms;      /* length of the next ban */
	int64_t score_mp, score_ms;
};

/* A log line that is written at most once per LIMIT_LOG_EVERY_MS. */
struct ratelog {
	int64_t at;
	uint64_t suppressed;
};

struct target {
	uint8_t pk[ME_PK_LEN];
	struct me_sockaddr addr;
	int64_t next_try_ms;
	uint32_t backoff_ms;
	struct target *next;
};

struct net {
	uv_loop_t *loop;
	const struct me_keypair *kp;
	struct tls_ctx *tls;
	struct net_callbacks cb;
	struct endpoint eps[ME_MAX_ADDRS];
	size_t neps;
	struct peer *peers; /* every connection, identified or not */
	size_t nconns;
	struct target *targets;
	size_t ntargets;
	uv_timer_t dial_timer;
	int handles;
	int closing;
	uint8_t reset_secret[32];
	struct net_stats stats;
	struct peer *rx_list; /* connections read in this recvmmsg batch: written after it */
	struct ban *bans;     /* NET_MAX_BANS, allocated at the first use */
	size_t nbans;
	struct ratelog log_refused, log_banned, log_flood;
	ngtcp2_cid refused[REFUSED_RING];
	size_t refused_next;
	/* Packets conn_write made for one connection, sent together with sendmmsg. */
	struct mmsghdr tx_msg[TX_BATCH];
	struct iovec tx_iov[TX_BATCH];
	size_t ntx;
	uint8_t txbuf[TX_BATCH][MAX_PKT];
	uint8_t rbuf[RX_BATCH * RX_SLOT];
};

static void conn_write(struct peer *c);
static void on_timer(uv_timer_t *t);
static void conn_close(struct peer *c, uint64_t app_error, const char *why);
static void conn_kick(struct peer *c);

static uint64_t now_ns(void)
{
	return uv_hrtime();
}

static void net_maybe_release(struct net *n)
{
	if (n->closing && n->handles == 0) {
		struct target *t = n->targets;
		while (t) {
			struct target *nx = t->next;
			free(t);
			t = nx;
		}
		sodium_memzero(n->reset_secret, sizeof(n->reset_secret));
		free(n->bans);
		free(n);
	}
}

static void addr_text(const struct sockaddr *sa, char *buf, size_t sz)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *s = (const struct sockaddr_in *)sa;
		inet_ntop(AF_INET, &s->sin_addr, ip, sizeof(ip));
		snprintf(buf, sz, "%s:%u", ip, ntohs(s->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)sa;
		inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof(ip));
		snprintf(buf, sz, "[%s]:%u", ip, ntohs(s->sin6_port));
	} else {
		snprintf(buf, sz, "?");
	}
}

/* ---- send queue: data stays allocated until the peer acknowledges it ---- */

static void sendq_free(struct sendq *q)
{
	struct chunk *c = q->head;
	while (c) {
		struct chunk *nx = c->next;
		free(c);
		c = nx;
	}
	q->head = q->tail = NULL;
}

static void sendq_ack(struct sendq *q, uint64_t upto)
{
	if (upto > q->acked)
		q->acked = upto;
	while (q->head && q->head->off + q->head->len <= q->acked) {
		struct chunk *c = q->head;
		q->head = c->next;
		if (q->head == NULL)
			q->tail = NULL;
		free(c);
	}
}

static int sendq_push(struct sendq *q, const void *data, size_t len)
{
	struct chunk *ch = malloc(sizeof(*ch) + len);
	if (ch == NULL)
		return ME_ENOMEM;
	ch->next = NULL;
	ch->off = q->end;
	ch->len = len;
	memcpy(ch->data, data, len);
	if (q->tail)
		q->tail->next = ch;
	else
		q->head = ch;
	q->tail = ch;
	q->end += len;
	return 0;
}

/* Unsent data from q->sent as iovecs. */
static size_t sendq_vec(const struct sendq *q, ngtcp2_vec *vec, size_t max)
{
	size_t n = 0;
	for (const struct chunk *c = q->head; c && n < max; c = c->next) {
		if (c->off + c->len <= q->sent)
			continue;
		size_t skip = q->sent > c->off ? (size_t)(q->sent - c->off) : 0;
		vec[n].base = (uint8_t *)c->data + skip;
		vec[n].len = c->len - skip;
		n++;
	}
	return n;
}

/* ---- connection lookup ---- */

static struct peer *find_by_cid(struct net *n, const uint8_t *cid, size_t len)
{
	for (struct peer *c = n->peers; c; c = c->next)
		for (size_t i = 0; i < c->ncids; i++)
			if (c->cids[i].datalen == len && memcmp(c->cids[i].data, cid, len) == 0)
				return c;
	return NULL;
}

static void cid_add(struct peer *c, const ngtcp2_cid *cid)
{
	if (c->ncids < MAX_CIDS)
		c->cids[c->ncids++] = *cid;
}

static struct target *target_find(struct net *n, const uint8_t pk[ME_PK_LEN])
{
	for (struct target *t = n->targets; t; t = t->next)
		if (memcmp(t->pk, pk, ME_PK_LEN) == 0)
			return t;
	return NULL;
}

/* ---- limits, misbehaviour and bans (net.h, "limits") ---- */

static void ip_key(const struct sockaddr *sa, uint8_t key[IPKEY_LEN])
{
	memset(key, 0, IPKEY_LEN);
	key[0] = (uint8_t)sa->sa_family;
	if (sa->sa_family == AF_INET)
		memcpy(key + 1, &((const struct sockaddr_in *)sa)->sin_addr, 4);
	else if (sa->sa_family == AF_INET6)
		memcpy(key + 1, &((const struct sockaddr_in6 *)sa)->sin6_addr, 8);
}

/* 127.0.0.1 or ::1: this host, where every local daemon dials from. */
static int ip_is_host(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return ((const struct sockaddr_in *)sa)->sin_addr.s_addr == htonl(INADDR_LOOPBACK);
	if (sa->sa_family == AF_INET6)
		return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)sa)->sin6_addr);
	return 0;
}

static void ip_text(const struct sockaddr *sa, char *buf, size_t sz)
{
	char t[80];
	addr_text(sa, t, sizeof(t));
	char *colon = strrchr(t, ':'); /* drop the port */
	if (colon != NULL)
		*colon = '\0';
	snprintf(buf, sz, "%s", t);
}

/* True when a line may be logged now; *suppressed is how many were not since the last one. */
static int ratelog_due(struct ratelog *r, uint64_t *suppressed)
{
	int64_t now = me_mono_ms();
	if (r->at != 0 && now - r->at < LIMIT_LOG_EVERY_MS) {
		r->suppressed++;
		return 0;
	}
	*suppressed = r->suppressed;
	r->suppressed = 0;
	r->at = now;
	return 1;
}

static struct ban *ban_find(const struct net *n, int kind, const uint8_t *id)
{
	for (size_t i = 0; i < n->nbans; i++)
		if (n->bans[i].kind == kind && memcmp(n->bans[i].id, id, ME_PK_LEN) == 0)
			return &n->bans[i];
	return NULL;
}

static int ban_active(const struct net *n, int kind, const uint8_t *id)
{
	const struct ban *b = ban_find(n, kind, id);
	return b != NULL && b->until_ms > me_mono_ms();
}

static int ip_banned(const struct net *n, const struct sockaddr *sa)
{
	uint8_t k[ME_PK_LEN] = { 0 };
	if (n->nbans == 0 || ip_is_host(sa))
		return 0;
	ip_key(sa, k);
	return ban_active(n, BAN_IP, k);
}

/* The entry for id, made when missing (replacing the one whose ban ends first when the table
 * is full); NULL when out of memory. */
static struct ban *ban_get(struct net *n, int kind, const uint8_t *id)
{
	if (n->bans == NULL && (n->bans = calloc(NET_MAX_BANS, sizeof(*n->bans))) == NULL)
		return NULL;
	struct ban *b = ban_find(n, kind, id);
	if (b == NULL) {
		if (n->nbans < NET_MAX_BANS) {
			b = &n->bans[n->nbans++];
		} else {
			b = &n->bans[0];
			for (size_t i = 1; i < n->nbans; i++)
				if (n->bans[i].until_ms < b->until_ms)
					b = &n->bans[i];
		}
		memset(b, 0, sizeof(*b));
		b->kind = (uint8_t)kind;
		memcpy(b->id, id, ME_PK_LEN);
		b->next_ms = NET_BAN_MIN_MS;
	}
	return b;
}

/* Bans id (ME_PK_LEN bytes) and returns for how long (ms); 0 when out of memory. */
static uint32_t ban_add(struct net *n, int kind, const uint8_t *id)
{
	int64_t now = me_mono_ms();
	struct ban *b = ban_get(n, kind, id);
	if (b == NULL)
		return 0;
	if (b->until_ms != 0 && now - b->until_ms > NET_BAN_MAX_MS)
		b->next_ms = NET_BAN_MIN_MS; /* well behaved for long enough: start over */
	b->score_mp = 0;
	uint32_t ms = b->next_ms;
	b->until_ms = now + ms;
	b->next_ms = ms >= NET_BAN_MAX_MS / 2 ? NET_BAN_MAX_MS : ms * 2;
	return ms;
}

/* A score (thousandths of a point) set at `at`, decayed until now. */
static int64_t score_now(int64_t score_mp, int64_t at, int64_t now)
{
	int64_t v = score_mp - (now - at) * NET_SCORE_DECAY; /* thousandths per ms */
	return v > 0 ? v : 0;
}

/* A connection with a score ends: its key keeps the score for the next one. */
static void score_save(struct peer *c)
{
	int64_t now = me_mono_ms(), v;
	if (!c->has_pk || c->misbehaved || (v = score_now(c->score_mp, c->score_ms, now)) == 0)
		return;
	struct ban *b = ban_get(c->net, BAN_KEY, c->pk);
	if (b != NULL && score_now(b->score_mp, b->score_ms, now) < v) {
		b->score_mp = v;
		b->score_ms = now;
	}
}

/* A connection is identified: it starts from what its key left. */
static void score_restore(struct peer *c)
{
	const struct ban *b = c->net->nbans > 0 ? ban_find(c->net, BAN_KEY, c->pk) : NULL;
	int64_t now = me_mono_ms();
	if (b != NULL && b->score_mp > 0) {
		c->score_mp = score_now(b->score_mp, b->score_ms, now);
		c->score_ms = now;
	}
}

void net_peer_penalize(struct peer *c, int points, const char *why)
{
	struct net *n = c->net;
	int64_t now = me_mono_ms();
	if (c->released || c->misbehaved || c->pending_close || points <= 0)
		return;
	c->score_mp = score_now(c->score_mp, c->score_ms, now);
	c->score_ms = now;
	c->score_mp += (int64_t)points * 1000;
	if (c->score_mp < (int64_t)NET_BAN_SCORE * 1000)
		return;
	c->misbehaved = 1;
	n->stats.peers_misbehaved++;
	uint32_t kms = 0, ims = 0;
	if (c->has_pk)
		kms = ban_add(n, BAN_KEY, c->pk);
	if (!ip_is_host((const struct sockaddr *)&c->remote)) {
		uint8_t k[ME_PK_LEN] = { 0 };
		ip_key((const struct sockaddr *)&c->remote, k);
		ims = ban_add(n, BAN_IP, k);
	}
	uint64_t sup;
	if (ratelog_due(&n->log_banned, &sup)) {
		char ip[80], ab[120];
		ip_text((const struct sockaddr *)&c->remote, ip, sizeof(ip));
		if (ims)
			snprintf(ab, sizeof(ab), "address %s banned for %u s", ip, ims / 1000);
		else
			snprintf(ab, sizeof(ab), "address %s not banned (this host)", ip);
		log_warn("peer %s (%s) misbehaved (last: %s): disconnected; key banned for %u s, "
			 "%s (%llu similar suppressed)", c->has_pk ? c->did : "(no key yet)",
			 c->remote_text, why, kms / 1000, ab, (unsigned long long)sup);
	}
	/* From the loop: this may run inside ngtcp2's callbacks or a transfer dispatch. */
	c->pending_close = NET_ERR_MISBEHAVED;
	c->pending_why = "misbehaving peer";
	conn_kick(c);
}

/* Takes one frame of len bytes from c's buckets; 0 when over the rate. */
static int rate_take(struct peer *c, size_t len)
{
	uint64_t now = now_ns();
	double dt = (double)(now - c->rl_ns) / 1e9;
	c->rl_ns = now;
	c->rl_frames += dt * NET_RATE_FRAMES;
	if (c->rl_frames > NET_RATE_FRAMES_BURST)
		c->rl_frames = NET_RATE_FRAMES_BURST;
	c->rl_bytes += dt * NET_RATE_BYTES;
	if (c->rl_bytes > NET_RATE_BYTES_BURST)
		c->rl_bytes = NET_RATE_BYTES_BURST;
	if (c->rl_frames < 1 || c->rl_bytes < (double)len)
		return 0;
	c->rl_frames -= 1;
	c->rl_bytes -= (double)len;
	return 1;
}

static void rate_limited(struct peer *c)
{
	struct net *n = c->net;
	uint64_t now = now_ns(), sup;
	n->stats.frames_rate_limited++;
	if (c->flood_ns != 0 && now - c->flood_ns < 1000 * NGTCP2_MILLISECONDS)
		return;
	c->flood_ns = now;
	if (ratelog_due(&n->log_flood, &sup))
		log_info("peer %s: over the rate limit (%u frames/s, %u bytes/s): dropping frames "
			 "(%llu similar suppressed)", c->did, NET_RATE_FRAMES, NET_RATE_BYTES,
			 (unsigned long long)sup);
	net_peer_penalize(c, NET_PENALTY_FLOOD, "over the rate limit");
}

/* Refuses a new inbound connection with a stateless CONNECTION_CLOSE in an Initial packet
 * (CONNECTION_REFUSED; the reason says why), before any state or TLS work. Counted and logged
 * once per connection (the client may send several Initial packets). */
static void refuse(struct endpoint *ep, const struct sockaddr *sa, const ngtcp2_pkt_hd *hd,
		   int banned, const char *reason)
{
	struct net *n = ep->net;
	uint8_t buf[256];
	int seen = 0;
	for (size_t i = 0; i < REFUSED_RING; i++)
		seen |= ngtcp2_cid_eq(&n->refused[i], &hd->dcid);
	ngtcp2_ssize w = ngtcp2_crypto_write_connection_close(
		buf, sizeof(buf), hd->version, &hd->scid, &hd->dcid, NGTCP2_CONNECTION_REFUSED,
		(const uint8_t *)reason, strlen(reason));
	if (w > 0) {
		uv_buf_t b = uv_buf_init((char *)buf, (unsigned)w);
		if (uv_udp_try_send(&ep->udp, &b, 1, sa) >= 0)
			n->stats.pkts_out++;
	}
	if (seen)
		return;
	n->refused[n->refused_next] = hd->dcid;
	n->refused_next = (n->refused_next + 1) % REFUSED_RING;
	if (banned)
		n->stats.conns_banned++;
	else
		n->stats.conns_refused++;
	uint64_t sup;
	if (ratelog_due(&n->log_refused, &sup)) {
		char t[80];
		addr_text(sa, t, sizeof(t));
		log_info("refused a connection from %s: %s (%llu similar suppressed)", t, reason,
			 (unsigned long long)sup);
	}
}

/* Whether a new inbound connection from sa may be created; refuses it when not. */
static int admit(struct endpoint *ep, const struct sockaddr *sa, const ngtcp2_pkt_hd *hd)
{
	struct net *n = ep->net;
	size_t in = 0, shaking = 0, same = 0;
	uint8_t k[IPKEY_LEN];
	int host = ip_is_host(sa);

	if (ip_banned(n, sa)) {
		refuse(ep, sa, hd, 1, "banned");
		return 0;
	}
	ip_key(sa, k);
	for (const struct peer *c = n->peers; c; c = c->next) {
		if (c->outbound)
			continue;
		in++;
		shaking += !c->has_pk;
		same += !host && memcmp(c->ipkey, k, IPKEY_LEN) == 0;
	}
	if (in >= NET_MAX_IN || shaking >= NET_MAX_HANDSHAKING || same >= NET_MAX_IN_PER_IP ||
	    n->nconns >= MAX_CONNS) {
		refuse(ep, sa, hd, 0, "busy");
		return 0;
	}
	return 1;
}

static size_t count_outbound(const struct net *n)
{
	size_t k = 0;
	for (const struct peer *c = n->peers; c; c = c->next)
		k += c->outbound != 0;
	return k;
}

/* ---- transfer streams ---- */

/* Work for the connection's timer: runs from the event loop, never inside ngtcp2. */
static void conn_kick(struct peer *c)
{
	if (!c->released)
		uv_timer_start(&c->timer, on_timer, 0, 0);
}

static struct net_xfer *xfer_new(struct peer *c, int inbound)
{
	struct net_xfer *x = calloc(1, sizeof(*x));
	if (x == NULL)
		return NULL;
	x->c = c;
	x->sid = -1;
	x->inbound = inbound != 0;
	x->live = !inbound;
	x->sq.sid = -1;
	me_frame_reader_init(&x->rd, NET_XFER_MAX_FRAME);
	x->next = c->xfers;
	if (c->xfers)
		c->xfers->prev = x;
	c->xfers = x;
	return x;
}

static void xfer_free(struct net_xfer *x)
{
	struct peer *c = x->c;
	if (x->prev)
		x->prev->next = x->next;
	else
		c->xfers = x->next;
	if (x->next)
		x->next->prev = x->prev;
	sendq_free(&x->sq);
	me_frame_reader_free(&x->rd);
	free(x);
}

static size_t xfer_queued(const struct net_xfer *x)
{
	return (size_t)(x->sq.end - x->sq.acked);
}

/* Ended abnormally (frames and eof are no longer delivered). */
static int xfer_aborted(const struct net_xfer *x)
{
	return x->reset_req || x->peer_reset || x->stopped || (x->sclosed && x->close_code);
}

/* Has data or a FIN for conn_write. */
static int xfer_has_output(const struct net_xfer *x)
{
	return !x->fin_sent && !xfer_aborted(x) && !x->sclosed && !x->wblocked &&
	       (x->sq.sent < x->sq.end || x->fin_req);
}

/* The transfer with output that was served least recently. */
static struct net_xfer *xfer_pick(struct peer *c)
{
	struct net_xfer *best = NULL;
	for (struct net_xfer *x = c->xfers; x; x = x->next)
		if (xfer_has_output(x) && (best == NULL || x->served < best->served))
			best = x;
	return best;
}

/* A frame the peer sent is unacceptable: the stream (only) is reset with NET_ERR_FRAME. */
static void xfer_reject(struct net_xfer *x, const char *why)
{
	struct peer *c = x->c;
	c->net->stats.frames_rejected++;
	log_info("peer %s: %s; resetting transfer stream %lld", c->did, why, (long long)x->sid);
	net_peer_penalize(c, NET_PENALTY_FRAME, why);
	if (!x->reset_req) {
		x->reset_req = 1;
		x->code = NET_ERR_FRAME;
		x->why = why;
	}
}

/* The code and reason `closed` reports; lost_code when nothing more specific happened. */
static uint64_t xfer_end_code(const struct net_xfer *x, const char **why)
{
	if (x->reset_req) {
		*why = x->why;
		return x->code;
	}
	if (x->peer_reset) {
		*why = "reset by the peer";
		return x->peer_code;
	}
	if (x->stopped) {
		*why = "the peer stopped reading";
		return NET_ERR_CANCEL;
	}
	if (x->sclosed) {
		*why = x->close_code ? "stopped by the peer" : "done";
		return x->close_code;
	}
	*why = x->c->lost_why;
	return x->c->lost_code;
}

/* Resets the stream on the wire if it is still open, tells the user and frees x. */
static void xfer_end(struct net_xfer *x)
{
	struct peer *c = x->c;
	const char *why;
	uint64_t code = xfer_end_code(x, &why);

	if (!x->sclosed && !c->released) {
		ngtcp2_conn_shutdown_stream(c->q, 0, x->sid, code ? code : NET_ERR_CANCEL);
		ngtcp2_conn_set_stream_user_data(c->q, x->sid, NULL);
	}
	x->ended = 1;
	if (x->live && x->cb.closed)
		x->cb.closed(x->ud, x, code, why);
	xfer_free(x);
}

/* Runs one transfer's recorded events in order: accept, frames, eof, writable, end. */
static void xfer_service(struct net_xfer *x)
{
	struct peer *c = x->c;
	struct net *n = c->net;

	if (!x->live) {
		if (xfer_aborted(x) || x->sclosed) {
			xfer_end(x); /* gone before we looked at it: nobody to tell */
			return;
		}
		int rc = n->cb.xfer_accept ? n->cb.xfer_accept(n->cb.xfer_ud, c, x) : -1;
		if (c->released) {
			x->live = rc == 0 && x->cb.closed != NULL;
			return;
		}
		if (rc < 0 || x->cb.frame == NULL) {
			n->stats.xfers_refused++;
			x->reset_req = 1;
			x->code = NET_ERR_BUSY;
			x->why = "refused";
			xfer_end(x);
			return;
		}
		x->live = 1;
		n->stats.xfers_accepted++;
	}
	while (!xfer_aborted(x)) {
		const uint8_t *body;
		size_t blen;
		int fr = me_frame_reader_next(&x->rd, &body, &blen);
		if (fr == 0 && x->rd_err)
			fr = x->rd_err;
		if (fr < 0) {
			xfer_reject(x, fr == ME_ETOOBIG ? "frame over the size limit"
					: fr == ME_ENOMEM ? "out of memory" : "malformed frame");
			break;
		}
		if (fr == 0)
			break;
		x->bytes_in += ME_FRAME_HDR + blen;
		n->stats.xfer_bytes_in += ME_FRAME_HDR + blen;
		if (x->cb.frame(x->ud, x, body, blen) < 0)
			xfer_reject(x, "rejected frame");
		if (c->released)
			return;
	}
	if (x->peer_fin && !x->eof_done && !xfer_aborted(x)) {
		if (me_frame_reader_pending(&x->rd) > 0) {
			xfer_reject(x, "truncated frame");
		} else {
			x->eof_done = 1;
			if (x->cb.eof)
				x->cb.eof(x->ud, x);
			if (c->released)
				return;
		}
	}
	if (x->wr_pending && !xfer_aborted(x) && !x->sclosed) {
		x->wr_pending = 0;
		if (x->fin_req || x->cb.writable == NULL) {
			/* nothing more will be sent */
		} else if (xfer_queued(x) < NET_XFER_LOWAT) {
			x->cb.writable(x->ud, x);
			if (c->released)
				return;
		} else {
			x->hi = 1;
		}
	}
	if (xfer_aborted(x) || x->sclosed)
		xfer_end(x);
}

/* Delivers what ngtcp2's callbacks and the API recorded on this connection's transfers. Called
 * from conn_write, outside ngtcp2, so user callbacks may call any net function (a connection
 * closed from one of them stops the loop: its transfers are told from conn_on_close). */
static void xfer_dispatch(struct peer *c)
{
	if (!c->xdirty || c->dispatching || c->released)
		return;
	c->xdirty = 0;
	c->dispatching = 1;
	struct net_xfer *x = c->xfers;
	while (x && !c->released) {
		struct net_xfer *next = x->next; /* only x itself is freed here */
		xfer_service(x);
		x = next;
	}
	c->dispatching = 0;
}

/* The connection is gone (from conn_on_close, on the loop): every transfer ends. */
static void xfer_close_all(struct peer *c)
{
	while (c->xfers) {
		struct net_xfer *x = c->xfers;
		if (x->live && x->cb.closed) {
			/* A reset already under way keeps its code; anything else (even a stream
			 * that closed cleanly but whose last frames were not delivered) is lost. */
			const char *why = c->lost_why;
			uint64_t code = c->lost_code;
			if (x->reset_req || x->peer_reset || x->stopped)
				code = xfer_end_code(x, &why);
			x->ended = 1;
			x->cb.closed(x->ud, x, code, why);
		}
		xfer_free(x);
	}
}

/* ---- ngtcp2 callbacks ---- */

static ngtcp2_conn *get_conn(ngtcp2_crypto_conn_ref *ref)
{
	struct peer *c = ref->user_data;
	return c->q;
}

static void rand_cb(uint8_t *dest, size_t len, const ngtcp2_rand_ctx *ctx)
{
	(void)ctx;
	randombytes_buf(dest, len);
}

static int get_new_cid_cb(ngtcp2_conn *q, ngtcp2_cid *cid, uint8_t *token, size_t cidlen,
			  void *ud)
{
	struct peer *c = ud;
	(void)q;
	if (c->ncids >= MAX_CIDS)
		return NGTCP2_ERR_CALLBACK_FAILURE;
	randombytes_buf(cid->data, cidlen);
	cid->datalen = cidlen;
	if (ngtcp2_crypto_generate_stateless_reset_token(token, c->net->reset_secret,
							 sizeof(c->net->reset_secret), cid) != 0)
		return NGTCP2_ERR_CALLBACK_FAILURE;
	cid_add(c, cid);
	return 0;
}

static int remove_cid_cb(ngtcp2_conn *q, const ngtcp2_cid *cid, void *ud)
{
	struct peer *c = ud;
	(void)q;
	for (size_t i = 0; i < c->ncids; i++) {
		if (ngtcp2_cid_eq(&c->cids[i], cid)) {
			c->cids[i] = c->cids[--c->ncids];
			break;
		}
	}
	return 0;
}

static struct instream *instream_get(struct peer *c, int64_t sid, int create)
{
	struct instream *free_slot = NULL;
	for (int i = 0; i < MAX_IN_STREAMS; i++) {
		if (c->ins[i].sid == sid)
			return &c->ins[i];
		if (c->ins[i].sid < 0 && free_slot == NULL)
			free_slot = &c->ins[i];
	}
	if (!create || free_slot == NULL)
		return NULL;
	free_slot->sid = sid;
	free_slot->dead = 0;
	me_frame_reader_init(&free_slot->rd, NET_MAX_FRAME);
	return free_slot;
}

static void instream_drop(struct instream *s)
{
	me_frame_reader_free(&s->rd);
	s->sid = -1;
	s->dead = 0;
}

static void stream_reject(struct peer *c, struct instream *s, int64_t sid, const char *why)
{
	c->net->stats.frames_rejected++;
	log_info("peer %s: %s; closing stream %lld", c->has_pk ? c->did : c->remote_text, why,
		 (long long)sid);
	ngtcp2_conn_shutdown_stream_read(c->q, 0, sid, NET_ERR_FRAME);
	if (s) {
		me_frame_reader_free(&s->rd);
		s->dead = 1;
	}
}

static int recv_stream_data_cb(ngtcp2_conn *q, uint32_t flags, int64_t sid, uint64_t offset,
			       const uint8_t *data, size_t len, void *ud, void *sud)
{
	struct peer *c = ud;
	(void)offset;

	/* Flow control credit is returned for everything read, kept or not: frames are handed
	 * out within the same event loop turn (transfers: from xfer_dispatch). */
	ngtcp2_conn_extend_max_stream_offset(q, sid, len);
	ngtcp2_conn_extend_max_offset(q, len);

	if (ngtcp2_is_bidi_stream(sid)) {
		struct net_xfer *x = sud;
		if (x == NULL || xfer_aborted(x))
			return 0;
		if (len > 0 && x->rd_err == 0)
			x->rd_err = me_frame_reader_feed(&x->rd, data, len);
		if (flags & NGTCP2_STREAM_DATA_FLAG_FIN)
			x->peer_fin = 1;
		c->xdirty = 1;
		return 0;
	}
	if (ngtcp2_conn_is_local_stream(q, sid))
		return 0;
	struct instream *s = instream_get(c, sid, 1);
	if (s == NULL) {
		stream_reject(c, NULL, sid, "too many streams");
		return 0;
	}
	if (s->dead || len == 0)
		return 0;
	if (!c->up || c->pending_close) {
		/* A connection that lost the duplicate race, or that is closing: nothing it says
		 * is used. */
		return 0;
	}
	int rc = me_frame_reader_feed(&s->rd, data, len);
	for (;;) {
		const uint8_t *body;
		size_t blen;
		int fr = me_frame_reader_next(&s->rd, &body, &blen);
		if (fr < 0) {
			rc = fr;
			break;
		}
		if (fr == 0)
			break;
		if (!rate_take(c, blen)) {
			rate_limited(c);
			if (c->pending_close)
				return 0;
			continue;
		}
		if (c->net->cb.frame(c->net->cb.ud, c, body, blen) < 0) {
			stream_reject(c, s, sid, "rejected message");
			return 0;
		}
		if (c->pending_close)
			return 0;
	}
	if (rc < 0) {
		stream_reject(c, s, sid, rc == ME_ETOOBIG ? "frame over the size limit"
							   : "malformed frame");
		net_peer_penalize(c, NET_PENALTY_FRAME, "malformed frame");
	}
	return 0;
}

static int stream_open_cb(ngtcp2_conn *q, int64_t sid, void *ud)
{
	struct peer *c = ud;
	if (ngtcp2_is_bidi_stream(sid)) {
		/* A transfer the peer opened (QUIC allows it at most NET_XFER_MAX_IN at a time):
		 * offered to the user from xfer_dispatch. On a connection that is not (yet) the
		 * one kept for this node, refused. */
		struct net_xfer *x = c->up ? xfer_new(c, 1) : NULL;
		if (x == NULL) {
			c->net->stats.xfers_refused++;
			ngtcp2_conn_shutdown_stream(q, 0, sid, NET_ERR_BUSY);
			return 0;
		}
		x->sid = sid;
		x->sq.sid = sid;
		ngtcp2_conn_set_stream_user_data(q, sid, x);
		c->xdirty = 1;
		return 0;
	}
	if (instream_get(c, sid, 1) == NULL)
		stream_reject(c, NULL, sid, "too many streams");
	return 0;
}

static int stream_close_cb(ngtcp2_conn *q, uint32_t flags, int64_t sid, uint64_t app_error,
			   void *ud, void *sud)
{
	struct peer *c = ud;
	if (ngtcp2_is_bidi_stream(sid)) {
		struct net_xfer *x = sud;
		/* ngtcp2 does not raise the peer's stream limit by itself. */
		if (!ngtcp2_conn_is_local_stream(q, sid))
			ngtcp2_conn_extend_max_streams_bidi(q, 1);
		if (x != NULL) {
			x->sclosed = 1;
			x->close_code = (flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET)
						? app_error : 0;
			c->xdirty = 1;
		}
		return 0;
	}
	if (!ngtcp2_conn_is_local_stream(q, sid))
		ngtcp2_conn_extend_max_streams_uni(q, 1); /* "at most 4 at a time" */
	struct instream *s = instream_get(c, sid, 0);
	if (s)
		instream_drop(s);
	if (sid == c->sq.sid) {
		/* The peer stopped our message stream: everything we would send is lost, so
		 * start over with a fresh connection (the dialer reconnects). */
		c->sq.sid = -1;
		if (!c->pending_close) {
			c->pending_close = NET_ERR_POLICY;
			c->pending_why = "the peer closed our message stream";
		}
	}
	return 0;
}

static int acked_cb(ngtcp2_conn *q, int64_t sid, uint64_t offset, uint64_t len, void *ud,
		    void *sud)
{
	struct peer *c = ud;
	(void)q;
	if (sid == c->sq.sid) {
		sendq_ack(&c->sq, offset + len);
	} else if (ngtcp2_is_bidi_stream(sid) && sud != NULL) {
		struct net_xfer *x = sud;
		sendq_ack(&x->sq, offset + len);
		if (x->hi && xfer_queued(x) < NET_XFER_LOWAT) {
			x->hi = 0;
			x->wr_pending = 1;
			c->xdirty = 1;
		}
	}
	return 0;
}

/* The peer reset one of its directions of a transfer stream. */
static int stream_reset_cb(ngtcp2_conn *q, int64_t sid, uint64_t final_size,
			   uint64_t app_error, void *ud, void *sud)
{
	struct peer *c = ud;
	struct net_xfer *x = sud;
	(void)q;
	(void)final_size;
	if (ngtcp2_is_bidi_stream(sid) && x != NULL && !x->peer_reset) {
		x->peer_reset = 1;
		x->peer_code = app_error;
		c->xdirty = 1;
	}
	return 0;
}

/* The node that dialed a connection: used to pick one of two connections deterministically. */
static const uint8_t *initiator(const struct peer *c)
{
	return c->outbound ? c->net->kp->pk : c->pk;
}

static void peer_mark_up(struct peer *c)
{
	struct net *n = c->net;
	c->up = 1;
	c->since_ms = me_now_ms();
	if (ngtcp2_conn_open_uni_stream(c->q, &c->sq.sid, NULL) != 0)
		c->sq.sid = -1;
	ngtcp2_conn_set_keep_alive_timeout(c->q, (ngtcp2_duration)NET_KEEPALIVE_MS *
						     NGTCP2_MILLISECONDS);
	struct target *t = target_find(n, c->pk);
	if (t)
		t->backoff_ms = NET_BACKOFF_MIN_MS;
	const char *f[] = { NULL, ME_MSGID_PEER_CONNECTED, NULL };
	char fb[ME_DID_KEY_SIZE + 16];
	snprintf(fb, sizeof(fb), "PEER_DID=%s", c->did);
	f[0] = fb;
	me_log_fields(LOG_INFO, f, "peer connected: %s (%s, %s)", c->did, c->remote_text,
		      c->outbound ? "outbound" : "inbound");
	n->cb.peer_up(n->cb.ud, c);
}

static int handshake_completed_cb(ngtcp2_conn *q, void *ud)
{
	struct peer *c = ud;
	struct net *n = c->net;
	(void)q;

	if (tls_session_peer_pk(c->tls, c->pk) < 0) {
		c->pending_close = NET_ERR_POLICY;
		c->pending_why = "no Ed25519 certificate";
		return 0;
	}
	c->has_pk = 1;
	me_did_key_from_pk(c->pk, c->did, sizeof(c->did));
	if (memcmp(c->pk, n->kp->pk, ME_PK_LEN) == 0) {
		c->pending_close = NET_ERR_SELF;
		c->pending_why = "connected to ourselves";
		return 0;
	}
	if (n->nbans > 0 && ban_active(n, BAN_KEY, c->pk)) {
		uint64_t sup;
		n->stats.conns_banned++;
		if (ratelog_due(&n->log_refused, &sup))
			log_info("refused a connection %s %s: %s is banned (%llu similar suppressed)",
				 c->outbound ? "to" : "from", c->remote_text, c->did,
				 (unsigned long long)sup);
		c->pending_close = NET_ERR_MISBEHAVED;
		c->pending_why = "banned";
		return 0;
	}
	score_restore(c);
	/* One connection per pair: the one dialed by the smaller key wins; between two dialed by
	 * the same node, the newer (the older is a leftover of a restart). */
	struct peer *old = NULL;
	for (struct peer *o = n->peers; o; o = o->next)
		if (o != c && o->up && memcmp(o->pk, c->pk, ME_PK_LEN) == 0)
			old = o;
	if (old != NULL) {
		int cmp = memcmp(initiator(c), initiator(old), ME_PK_LEN);
		if (cmp > 0) {
			/* By the rule the old connection stays. But the peer dialed again although
			 * we hold one: it may have restarted, leaving ours dead. Probe the old one
			 * and decide in the dial tick: an answer keeps it, silence replaces it. */
			c->awaiting = old;
			c->probe_start_ns = now_ns();
			old->probing = 1;
			ngtcp2_conn_set_keep_alive_timeout(old->q, NGTCP2_MILLISECONDS);
			uv_timer_start(&old->timer, on_timer, 1, 0);
			return 0;
		}
		conn_close(old, NET_ERR_DUPLICATE, "replaced by a newer connection");
	}
	peer_mark_up(c);
	return 0;
}

static const ngtcp2_callbacks base_callbacks = {
	.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb,
	.encrypt = ngtcp2_crypto_encrypt_cb,
	.decrypt = ngtcp2_crypto_decrypt_cb,
	.hp_mask = ngtcp2_crypto_hp_mask_cb,
	.update_key = ngtcp2_crypto_update_key_cb,
	.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb,
	.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb,
	.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb,
	.version_negotiation = ngtcp2_crypto_version_negotiation_cb,
	.rand = rand_cb,
	.get_new_connection_id = get_new_cid_cb,
	.remove_connection_id = remove_cid_cb,
	.recv_stream_data = recv_stream_data_cb,
	.stream_open = stream_open_cb,
	.stream_close = stream_close_cb,
	.acked_stream_data_offset = acked_cb,
	.stream_reset = stream_reset_cb,
	.handshake_completed = handshake_completed_cb,
};

/* ---- connection lifecycle ---- */

static void conn_on_close(uv_handle_t *h)
{
	struct peer *c = h->data;
	struct net *n = c->net;

	xfer_close_all(c);
	if (c->q)
		ngtcp2_conn_del(c->q);
	tls_session_free(c->tls);
	sendq_free(&c->sq);
	for (int i = 0; i < MAX_IN_STREAMS; i++)
		if (c->ins[i].sid >= 0)
			me_frame_reader_free(&c->ins[i].rd);
	free(c);
	n->handles--;
	net_maybe_release(n);
}

static void send_packet(struct peer *c, const uint8_t *data, size_t len)
{
	uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
	int rc = uv_udp_try_send(&c->ep->udp, &b, 1, (const struct sockaddr *)&c->remote);
	if (rc >= 0) {
		c->net->stats.pkts_out++;
		c->net->stats.bytes_out += len;
	}
	/* EAGAIN and friends: the packet is lost and QUIC recovers. */
}

/* Sends the packets conn_write batched for c. Those the socket does not take (EAGAIN) are
 * lost, as with send_packet. */
static void tx_flush(struct peer *c)
{
	struct net *n = c->net;
	size_t done = 0;
	uv_os_fd_t fd;

	if (n->ntx > 0 && uv_fileno((uv_handle_t *)&c->ep->udp, &fd) == 0) {
		for (size_t i = 0; i < n->ntx; i++) {
			n->tx_msg[i].msg_hdr = (struct msghdr){
				.msg_name = &c->remote, .msg_namelen = c->remote_len,
				.msg_iov = &n->tx_iov[i], .msg_iovlen = 1,
			};
		}
		while (done < n->ntx) {
			int k = sendmmsg(fd, n->tx_msg + done, (unsigned)(n->ntx - done), 0);
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0)
				break;
			for (size_t i = done; i < done + (size_t)k; i++) {
				n->stats.pkts_out++;
				n->stats.bytes_out += n->tx_iov[i].iov_len;
			}
			done += (size_t)k;
		}
	}
	n->ntx = 0;
}

/* Unlinks and frees a connection, telling the upper layer if it was up. */
static void conn_release(struct peer *c, const char *why)
{
	struct net *n = c->net;

	if (c->released)
		return;
	c->released = 1;
	score_save(c);
	/* Its transfers are told from conn_on_close, on the loop: this may run inside another
	 * connection's ngtcp2 callbacks. */
	c->lost_code = c->close_code;
	if (c->lost_code == 0 && c->q) {
		const ngtcp2_ccerr *ce = ngtcp2_conn_get_ccerr(c->q);
		if (ce->type == NGTCP2_CCERR_TYPE_APPLICATION)
			c->lost_code = ce->error_code;
	}
	if (c->lost_code == 0)
		c->lost_code = NET_ERR_SHUTDOWN;
	snprintf(c->lost_why, sizeof(c->lost_why), "connection lost: %s", why);
	if (c->prev)
		c->prev->next = c->next;
	else
		n->peers = c->next;
	if (c->next)
		c->next->prev = c->prev;
	n->nconns--;
	for (struct peer *o = n->peers; o; o = o->next) {
		if (o->awaiting == c) {
			o->awaiting = NULL;
			if (!o->released && !o->up && !o->pending_close)
				peer_mark_up(o);
		}
	}
	if (c->up) {
		c->up = 0;
		char fb[ME_DID_KEY_SIZE + 16];
		snprintf(fb, sizeof(fb), "PEER_DID=%s", c->did);
		const char *f[] = { fb, ME_MSGID_PEER_LOST, NULL };
		me_log_fields(LOG_INFO, f, "peer lost: %s (%s)", c->did, why);
		n->cb.peer_down(n->cb.ud, c, why);
	} else if (c->has_pk) {
		log_debug("connection %s %s (%s) closed: %s", c->outbound ? "to" : "from",
			  c->remote_text, c->did, why);
	} else {
		n->stats.handshakes_failed++;
		const char *tw = c->tls ? tls_session_error(c->tls) : "";
		log_info("connection %s %s failed: %s%s%s", c->outbound ? "to" : "from",
			 c->remote_text, why, *tw ? ": " : "", tw);
	}
	uv_timer_stop(&c->timer);
	uv_close((uv_handle_t *)&c->timer, conn_on_close);
}

/* Sends CONNECTION_CLOSE (unless the connection is already closing or draining) and
 * releases it. Never call from inside this connection's ngtcp2 callbacks: set pending_close. */
static void conn_close(struct peer *c, uint64_t app_error, const char *why)
{
	if (c->released)
		return;
	if (c->in_callback) {
		if (!c->pending_close) {
			c->pending_close = app_error ? app_error : NET_ERR_SHUTDOWN;
			c->pending_why = why;
		}
		return;
	}
	c->close_code = app_error;
	if (c->q && !ngtcp2_conn_in_closing_period(c->q) &&
	    !ngtcp2_conn_in_draining_period(c->q)) {
		ngtcp2_ccerr ccerr;
		ngtcp2_path_storage ps;
		ngtcp2_pkt_info pi;
		uint8_t buf[MAX_PKT];

		ngtcp2_ccerr_default(&ccerr);
		ngtcp2_ccerr_set_application_error(&ccerr, app_error, NULL, 0);
		ngtcp2_path_storage_zero(&ps);
		ngtcp2_ssize w = ngtcp2_conn_write_connection_close(c->q, &ps.path, &pi, buf,
								    sizeof(buf), &ccerr, now_ns());
		if (w > 0)
			send_packet(c, buf, (size_t)w);
	}
	conn_release(c, why);
}

static void conn_fail(struct peer *c, int lib_err)
{
	if (lib_err == NGTCP2_ERR_DRAINING || lib_err == NGTCP2_ERR_CLOSING) {
		const ngtcp2_ccerr *ce = ngtcp2_conn_get_ccerr(c->q);
		char why[96];
		if (ce->type == NGTCP2_CCERR_TYPE_TRANSPORT &&
		    ce->error_code == NGTCP2_CONNECTION_REFUSED) {
			char r[32] = "";
			for (size_t i = 0; i < ce->reasonlen && i + 1 < sizeof(r); i++)
				r[i] = ce->reason[i] >= 0x20 && ce->reason[i] < 0x7f ? (char)ce->reason[i]
										      : '?';
			snprintf(why, sizeof(why), "refused by the peer (%s)", r);
			conn_release(c, why);
		} else if (ce->type == NGTCP2_CCERR_TYPE_APPLICATION &&
			   ce->error_code == NET_ERR_MISBEHAVED) {
			conn_release(c, "closed by the peer: misbehaving (banned)");
		} else {
			conn_release(c, "closed by the peer");
		}
		return;
	}
	if (lib_err == NGTCP2_ERR_IDLE_CLOSE) {
		conn_release(c, "idle timeout");
		return;
	}
	if (lib_err == NGTCP2_ERR_HANDSHAKE_TIMEOUT) {
		conn_release(c, "handshake timed out");
		return;
	}
	ngtcp2_ccerr ccerr;
	ngtcp2_path_storage ps;
	ngtcp2_pkt_info pi;
	uint8_t buf[MAX_PKT];
	ngtcp2_ccerr_default(&ccerr);
	if (lib_err == NGTCP2_ERR_CRYPTO)
		ngtcp2_ccerr_set_tls_alert(&ccerr, ngtcp2_conn_get_tls_alert(c->q), NULL, 0);
	else
		ngtcp2_ccerr_set_liberr(&ccerr, lib_err, NULL, 0);
	if (!ngtcp2_conn_in_closing_period(c->q) && !ngtcp2_conn_in_draining_period(c->q)) {
		ngtcp2_path_storage_zero(&ps);
		ngtcp2_ssize w = ngtcp2_conn_write_connection_close(c->q, &ps.path, &pi, buf,
								    sizeof(buf), &ccerr, now_ns());
		if (w > 0)
			send_packet(c, buf, (size_t)w);
	}
	conn_release(c, lib_err == NGTCP2_ERR_CRYPTO ? "TLS handshake failed"
						     : ngtcp2_strerror(lib_err));
}

static void handle_pending_close(struct peer *c)
{
	if (c->pending_close && !c->released) {
		uint64_t code = c->pending_close;
		c->pending_close = 0;
		conn_close(c, code, c->pending_why ? c->pending_why : "closed");
	}
}

static void on_timer(uv_timer_t *t)
{
	struct peer *c = t->data;
	c->in_callback = 1;
	int rv = ngtcp2_conn_handle_expiry(c->q, now_ns());
	c->in_callback = 0;
	if (rv != 0) {
		conn_fail(c, rv);
		return;
	}
	conn_write(c);
}

static void timer_rearm(struct peer *c)
{
	if (c->xdirty) {
		uv_timer_start(&c->timer, on_timer, 0, 0); /* transfer events to deliver */
		return;
	}
	ngtcp2_tstamp exp = ngtcp2_conn_get_expiry(c->q), now = now_ns();
	if (exp == UINT64_MAX) {
		uv_timer_stop(&c->timer);
		return;
	}
	uint64_t ms = exp <= now ? 0 : (exp - now + NGTCP2_MILLISECONDS - 1) / NGTCP2_MILLISECONDS;
	uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* Accounts for ndata bytes of q written (and the FIN when asked for and all of it went). */
static void wrote(struct sendq *q, struct net_xfer *x, ngtcp2_ssize ndata, size_t total, int fin)
{
	if (ndata < 0 || q == NULL)
		return;
	q->sent += (uint64_t)ndata;
	if (x != NULL) {
		x->served = ++x->c->wtick;
		if (fin && (size_t)ndata == total)
			x->fin_sent = 1;
	}
}

/* Writes every packet ngtcp2 has for this connection, stream data included: the gossip stream
 * first, then the transfers round robin (one blocked by flow control does not stop the
 * others). Transfer events recorded by ngtcp2's callbacks are delivered first. */
static void conn_write(struct peer *c)
{
	struct net *n = c->net;
	ngtcp2_path_storage ps;
	ngtcp2_pkt_info pi;
	ngtcp2_tstamp ts = now_ns();
	int gblocked = 0;

	handle_pending_close(c);
	if (c->released)
		return;
	xfer_dispatch(c);
	if (c->released)
		return;
	if (n->ntx > 0)
		tx_flush(c); /* not expected: batches never outlive a conn_write */
	for (struct net_xfer *x = c->xfers; x; x = x->next)
		x->wblocked = 0;
	ngtcp2_path_storage_zero(&ps);
	for (int npkts = 0, iter = 0; npkts < MAX_BURST && iter < 4 * MAX_BURST; iter++) {
		ngtcp2_vec vec[MAX_VEC];
		size_t nvec = 0, total = 0;
		int64_t sid = -1;
		ngtcp2_ssize ndata = -1;
		uint32_t flags = NGTCP2_WRITE_STREAM_FLAG_MORE;
		struct sendq *q = NULL;
		struct net_xfer *x = NULL;

		if (!gblocked && c->sq.sid >= 0 && c->sq.sent < c->sq.end)
			q = &c->sq;
		else if ((x = xfer_pick(c)) != NULL)
			q = &x->sq;
		if (q != NULL) {
			nvec = sendq_vec(q, vec, MAX_VEC);
			for (size_t i = 0; i < nvec; i++)
				total += vec[i].len;
			sid = q->sid;
			if (x != NULL && x->fin_req && q->sent + total == q->end)
				flags |= NGTCP2_WRITE_STREAM_FLAG_FIN;
		}
		uint8_t *buf = n->txbuf[n->ntx];
		c->in_callback = 1;
		ngtcp2_ssize w = ngtcp2_conn_writev_stream(c->q, &ps.path, &pi, buf, MAX_PKT,
							   &ndata, flags, sid, nvec ? vec : NULL,
							   nvec, ts);
		c->in_callback = 0;
		if (w < 0) {
			if (w == NGTCP2_ERR_WRITE_MORE) {
				wrote(q, x, ndata, total, flags & NGTCP2_WRITE_STREAM_FLAG_FIN);
				continue;
			}
			if (w == NGTCP2_ERR_STREAM_DATA_BLOCKED || w == NGTCP2_ERR_STREAM_SHUT_WR ||
			    w == NGTCP2_ERR_STREAM_NOT_FOUND) {
				if (x == NULL) {
					gblocked = 1;
				} else {
					x->wblocked = 1;
					if (w != NGTCP2_ERR_STREAM_DATA_BLOCKED && !x->stopped) {
						x->stopped = 1; /* STOP_SENDING from the peer */
						c->xdirty = 1;
					}
				}
				continue;
			}
			tx_flush(c);
			conn_fail(c, (int)w);
			return;
		}
		wrote(q, x, ndata, total, flags & NGTCP2_WRITE_STREAM_FLAG_FIN);
		if (w == 0)
			break;
		n->tx_iov[n->ntx].iov_base = buf;
		n->tx_iov[n->ntx].iov_len = (size_t)w;
		if (++n->ntx == TX_BATCH)
			tx_flush(c);
		npkts++;
	}
	tx_flush(c);
	ngtcp2_conn_update_pkt_tx_time(c->q, ts);
	handle_pending_close(c);
	if (!c->released)
		timer_rearm(c);
}

static void settings_init(ngtcp2_settings *s, ngtcp2_transport_params *p)
{
	ngtcp2_settings_default(s);
	s->initial_ts = now_ns();
	s->handshake_timeout = (ngtcp2_duration)NET_HANDSHAKE_TIMEOUT_MS * NGTCP2_MILLISECONDS;
	/* An ACK every 8 packets rather than 2 (ngtcp2 still acknowledges at once on a gap, and
	 * after max_ack_delay): a bulk transfer costs about a fifth less CPU, mostly syscalls. */
	s->ack_thresh = 8;
	ngtcp2_transport_params_default(p);
	p->initial_max_stream_data_uni = NET_MAX_FRAME + 4096;
	p->initial_max_stream_data_bidi_local = XFER_STREAM_WINDOW;
	p->initial_max_stream_data_bidi_remote = XFER_STREAM_WINDOW;
	p->initial_max_data = CONN_WINDOW;
	p->initial_max_streams_uni = MAX_IN_STREAMS;
	p->initial_max_streams_bidi = NET_XFER_MAX_IN;
	p->max_idle_timeout = (ngtcp2_duration)NET_IDLE_TIMEOUT_MS * NGTCP2_MILLISECONDS;
	p->active_connection_id_limit = 4;
}

static struct peer *conn_alloc(struct net *n, struct endpoint *ep, const struct sockaddr *remote,
			       socklen_t rlen)
{
	struct peer *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->net = n;
	c->ep = ep;
	memcpy(&c->remote, remote, rlen);
	c->remote_len = rlen;
	addr_text(remote, c->remote_text, sizeof(c->remote_text));
	c->ref.get_conn = get_conn;
	c->ref.user_data = c;
	c->sq.sid = -1;
	c->started_ns = now_ns();
	ip_key(remote, c->ipkey);
	c->rl_ns = c->started_ns;
	c->rl_frames = NET_RATE_FRAMES_BURST;
	c->rl_bytes = NET_RATE_BYTES_BURST;
	c->score_ms = me_mono_ms();
	for (int i = 0; i < MAX_IN_STREAMS; i++)
		c->ins[i].sid = -1;
	uv_timer_init(n->loop, &c->timer);
	c->timer.data = c;
	n->handles++;
	c->next = n->peers;
	if (n->peers)
		n->peers->prev = c;
	n->peers = c;
	n->nconns++;
	return c;
}

static struct peer *server_conn_new(struct endpoint *ep, const struct sockaddr *remote,
				    socklen_t rlen, const ngtcp2_pkt_hd *hd)
{
	struct net *n = ep->net;
	ngtcp2_settings s;
	ngtcp2_transport_params p;
	ngtcp2_callbacks cb = base_callbacks;
	ngtcp2_cid scid;

	struct peer *c = conn_alloc(n, ep, remote, rlen);
	if (c == NULL)
		return NULL;
	cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
	settings_init(&s, &p);
	p.original_dcid = hd->dcid;
	p.original_dcid_present = 1;
	scid.datalen = CID_LEN;
	randombytes_buf(scid.data, CID_LEN);
	p.stateless_reset_token_present = 1;
	ngtcp2_crypto_generate_stateless_reset_token(p.stateless_reset_token, n->reset_secret,
						     sizeof(n->reset_secret), &scid);
	ngtcp2_path path = {
		.local = { .addr = (struct sockaddr *)&ep->local, .addrlen = ep->local_len },
		.remote = { .addr = (struct sockaddr *)remote, .addrlen = rlen },
	};
	if (ngtcp2_conn_server_new(&c->q, &hd->scid, &scid, &path, hd->version, &cb, &s, &p, NULL,
				   c) != 0)
		goto fail;
	c->tls = tls_session_new(n->tls, 1, &c->ref, NULL);
	if (c->tls == NULL)
		goto fail;
	ngtcp2_conn_set_tls_native_handle(c->q, tls_session_native(c->tls));
	cid_add(c, &scid);
	cid_add(c, &hd->dcid);
	return c;
fail:
	conn_release(c, "cannot create connection");
	return NULL;
}

static struct endpoint *endpoint_for(struct net *n, int family)
{
	for (size_t i = 0; i < n->neps; i++)
		if (n->eps[i].local.ss_family == family)
			return &n->eps[i];
	return NULL;
}

static int dial(struct net *n, const uint8_t pk[ME_PK_LEN], const struct me_sockaddr *addr)
{
	ngtcp2_settings s;
	ngtcp2_transport_params p;
	ngtcp2_callbacks cb = base_callbacks;
	ngtcp2_cid dcid, scid;

	struct endpoint *ep = endpoint_for(n, addr->ss.ss_family);
	if (ep == NULL)
		return ME_EINVAL;
	if (n->nconns >= MAX_CONNS || count_outbound(n) >= NET_MAX_OUT)
		return ME_EBUSY;
	struct peer *c = conn_alloc(n, ep, (const struct sockaddr *)&addr->ss, addr->len);
	if (c == NULL)
		return ME_ENOMEM;
	c->outbound = 1;
	c->has_expected = 1;
	memcpy(c->expected, pk, ME_PK_LEN);
	cb.client_initial = ngtcp2_crypto_client_initial_cb;
	cb.recv_retry = ngtcp2_crypto_recv_retry_cb;
	settings_init(&s, &p);
	dcid.datalen = CID_LEN;
	randombytes_buf(dcid.data, CID_LEN);
	scid.datalen = CID_LEN;
	randombytes_buf(scid.data, CID_LEN);
	ngtcp2_path path = {
		.local = { .addr = (struct sockaddr *)&ep->local, .addrlen = ep->local_len },
		.remote = { .addr = (struct sockaddr *)&c->remote, .addrlen = c->remote_len },
	};
	if (ngtcp2_conn_client_new(&c->q, &dcid, &scid, &path, NGTCP2_PROTO_VER_V1, &cb, &s, &p,
				   NULL, c) != 0)
		goto fail;
	c->tls = tls_session_new(n->tls, 0, &c->ref, pk);
	if (c->tls == NULL)
		goto fail;
	ngtcp2_conn_set_tls_native_handle(c->q, tls_session_native(c->tls));
	cid_add(c, &scid);
	log_debug("dialing %s", c->remote_text);
	conn_write(c);
	return 0;
fail:
	conn_release(c, "cannot create connection");
	return ME_EINTERNAL;
}

/* ---- UDP ---- */

/* A short-header packet for a connection we do not have (typically one from before a
 * restart): answer with a stateless reset, always shorter than the packet that caused it so
 * two endpoints can never loop. */
static void send_stateless_reset(struct endpoint *ep, const struct sockaddr *sa,
				 const ngtcp2_version_cid *vc, size_t pktlen)
{
	uint8_t token[NGTCP2_STATELESS_RESET_TOKENLEN], rnd[64], buf[128];
	ngtcp2_cid cid;

	if (vc->dcidlen != CID_LEN || pktlen < 1 + NGTCP2_MIN_STATELESS_RESET_RANDLEN +
						       NGTCP2_STATELESS_RESET_TOKENLEN + 1)
		return;
	size_t randlen = pktlen - 1 - NGTCP2_STATELESS_RESET_TOKENLEN - 1;
	if (randlen > sizeof(rnd))
		randlen = sizeof(rnd);
	if (randlen < NGTCP2_MIN_STATELESS_RESET_RANDLEN)
		return;
	ngtcp2_cid_init(&cid, vc->dcid, vc->dcidlen);
	if (ngtcp2_crypto_generate_stateless_reset_token(token, ep->net->reset_secret,
							 sizeof(ep->net->reset_secret), &cid) != 0)
		return;
	randombytes_buf(rnd, randlen);
	ngtcp2_ssize w = ngtcp2_pkt_write_stateless_reset(buf, sizeof(buf), token, rnd, randlen);
	if (w <= 0)
		return;
	uv_buf_t b = uv_buf_init((char *)buf, (unsigned)w);
	if (uv_udp_try_send(&ep->udp, &b, 1, sa) >= 0)
		ep->net->stats.pkts_out++;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct endpoint *ep = h->data;
	(void)suggested;
	*buf = uv_buf_init((char *)ep->net->rbuf, sizeof(ep->net->rbuf));
}

static void on_recv(uv_udp_t *u, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *sa,
		    unsigned flags)
{
	struct endpoint *ep = u->data;
	struct net *n = ep->net;
	const uint8_t *data = (const uint8_t *)buf->base;
	ngtcp2_version_cid vc;

	if (flags & UV_UDP_MMSG_FREE) {
		/* The end of a recvmmsg batch: answer every connection it touched once. */
		while (n->rx_list) {
			struct peer *c = n->rx_list;
			n->rx_list = c->rx_next;
			c->rx_pending = 0;
			conn_write(c); /* nothing if released meanwhile (freed only later) */
		}
		return;
	}
	if (nread <= 0 || sa == NULL || n->closing)
		return;
	n->stats.pkts_in++;
	n->stats.bytes_in += (uint64_t)nread;
	if (ngtcp2_pkt_decode_version_cid(&vc, data, (size_t)nread, CID_LEN) != 0)
		return; /* not QUIC v1, or garbage */
	socklen_t slen = sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
						   : sizeof(struct sockaddr_in);
	struct peer *c = find_by_cid(n, vc.dcid, vc.dcidlen);
	if (c == NULL) {
		ngtcp2_pkt_hd hd;
		if (!(data[0] & 0x80)) {
			/* A stateless reset carries a random DCID, so it cannot be routed by CID:
			 * let each connection to that address check its token. */
			for (struct peer *o = n->peers; o; o = o->next) {
				if (o->released || o->ep != ep || o->remote_len != slen ||
				    memcmp(&o->remote, sa, slen) != 0)
					continue;
				ngtcp2_path op = {
					.local = { .addr = (struct sockaddr *)&ep->local,
						   .addrlen = ep->local_len },
					.remote = { .addr = (struct sockaddr *)sa, .addrlen = slen },
				};
				ngtcp2_pkt_info opi = { 0 };
				o->in_callback = 1;
				int orv = ngtcp2_conn_read_pkt(o->q, &op, &opi, data, (size_t)nread,
							       now_ns());
				o->in_callback = 0;
				if (orv == NGTCP2_ERR_DRAINING) {
					conn_release(o, "reset by the peer (it restarted)");
					return;
				}
			}
			send_stateless_reset(ep, sa, &vc, (size_t)nread);
			return;
		}
		if (ngtcp2_accept(&hd, data, (size_t)nread) != 0)
			return;
		if (!admit(ep, sa, &hd))
			return;
		c = server_conn_new(ep, sa, slen, &hd);
		if (c == NULL)
			return;
	}
	if (c->released)
		return;
	ngtcp2_path path = {
		.local = { .addr = (struct sockaddr *)&ep->local, .addrlen = ep->local_len },
		.remote = { .addr = (struct sockaddr *)sa, .addrlen = slen },
	};
	ngtcp2_pkt_info pi = { 0 };
	c->in_callback = 1;
	int rv = ngtcp2_conn_read_pkt(c->q, &path, &pi, data, (size_t)nread, now_ns());
	c->in_callback = 0;
	if (rv != 0) {
		conn_fail(c, rv);
		return;
	}
	c->last_rx_ns = now_ns();
	if (c->probing && c->up) {
		c->probing = 0;
		ngtcp2_conn_set_keep_alive_timeout(c->q, (ngtcp2_duration)NET_KEEPALIVE_MS *
							     NGTCP2_MILLISECONDS);
	}
	if (flags & UV_UDP_MMSG_CHUNK) {
		if (!c->rx_pending) {
			c->rx_pending = 1;
			c->rx_next = n->rx_list;
			n->rx_list = c;
		}
		return;
	}
	conn_write(c);
}

/* ---- dialer ---- */

#define PROBE_WAIT_NS (1500 * NGTCP2_MILLISECONDS)

/* Settles duplicate connections that wait for the old one to prove it is alive. */
static void settle_duplicates(struct net *n)
{
	uint64_t now = now_ns();
	struct peer *c = n->peers;
	while (c) {
		struct peer *next = c->next;
		struct peer *old = c->awaiting;
		if (old != NULL) {
			if (old->last_rx_ns > c->probe_start_ns) {
				c->awaiting = NULL;
				conn_close(c, NET_ERR_DUPLICATE, "duplicate connection");
				next = n->peers; /* the list may have changed: start over */
			} else if (now - c->probe_start_ns >= PROBE_WAIT_NS) {
				/* Releasing the silent one promotes c. */
				conn_close(old, NET_ERR_DUPLICATE, "stale: the peer reconnected");
				next = n->peers;
			}
		}
		c = next;
	}
}

/* A connection to pk exists or is being made. */
static int target_busy(const struct net *n, const uint8_t pk[ME_PK_LEN])
{
	for (const struct peer *c = n->peers; c; c = c->next)
		if ((c->has_pk && memcmp(c->pk, pk, ME_PK_LEN) == 0) ||
		    (c->outbound && !c->has_pk && memcmp(c->expected, pk, ME_PK_LEN) == 0))
			return 1;
	return 0;
}

int net_target_unreachable(const struct net *n, const uint8_t pk[ME_PK_LEN])
{
	const struct target *t = target_find((struct net *)n, pk);
	return t != NULL && t->backoff_ms > NET_BACKOFF_MIN_MS && !target_busy(n, pk);
}

static void on_dial_tick(uv_timer_t *t)
{
	struct net *n = t->data;
	int64_t now = me_mono_ms();

	settle_duplicates(n);

	for (struct target *tg = n->targets; tg; tg = tg->next) {
		if (target_busy(n, tg->pk) || now < tg->next_try_ms)
			continue;
		if (n->nbans > 0 && (ban_active(n, BAN_KEY, tg->pk) ||
				     ip_banned(n, (const struct sockaddr *)&tg->addr.ss)))
			continue; /* banned: not dialed either (tried again once it expires) */
		/* Next attempt after the backoff, with +-25 % jitter; doubled each time. */
		uint32_t b = tg->backoff_ms;
		int64_t jitter = (int64_t)randombytes_uniform(b / 2 + 1) - b / 4;
		tg->next_try_ms = now + b + jitter;
		tg->backoff_ms = b >= NET_BACKOFF_MAX_MS / 2 ? NET_BACKOFF_MAX_MS : b * 2;
		dial(n, tg->pk, &tg->addr);
	}
}

int net_want(struct net *n, const uint8_t pk[ME_PK_LEN], const struct me_sockaddr *addr)
{
	if (memcmp(pk, n->kp->pk, ME_PK_LEN) == 0)
		return ME_EINVAL;
	struct target *t = target_find(n, pk);
	if (t == NULL) {
		t = calloc(1, sizeof(*t));
		if (t == NULL)
			return ME_ENOMEM;
		memcpy(t->pk, pk, ME_PK_LEN);
		t->backoff_ms = NET_BACKOFF_MIN_MS;
		t->next_try_ms = 0;
		t->next = n->targets;
		n->targets = t;
		n->ntargets++;
	} else if (strcmp(t->addr.text, addr->text) != 0) {
		t->next_try_ms = 0; /* a new address is worth trying at once */
		t->backoff_ms = NET_BACKOFF_MIN_MS;
	}
	t->addr = *addr;
	if (t->next_try_ms == 0)
		on_dial_tick(&n->dial_timer);
	return 0;
}

void net_unwant(struct net *n, const uint8_t pk[ME_PK_LEN])
{
	for (struct target **pp = &n->targets; *pp; pp = &(*pp)->next) {
		if (memcmp((*pp)->pk, pk, ME_PK_LEN) == 0) {
			struct target *t = *pp;
			*pp = t->next;
			free(t);
			n->ntargets--;
			return;
		}
	}
}

size_t net_nwanted(const struct net *n)
{
	return n->ntargets;
}

/* ---- public ---- */

static void ep_on_close(uv_handle_t *h)
{
	struct endpoint *ep = h->data;
	ep->net->handles--;
	net_maybe_release(ep->net);
}

static void dial_timer_on_close(uv_handle_t *h)
{
	struct net *n = h->data;
	n->handles--;
	net_maybe_release(n);
}

int net_init(struct net **out, uv_loop_t *loop, const struct me_keypair *kp, struct tls_ctx *tls,
	     const struct me_sockaddr *addrs, size_t naddrs, const struct net_callbacks *cb,
	     char *err, size_t errsz)
{
	*out = NULL;
	struct net *n = calloc(1, sizeof(*n));
	if (n == NULL)
		return ME_ENOMEM;
	n->loop = loop;
	n->kp = kp;
	n->tls = tls;
	n->cb = *cb;
	/* Derived from the identity, so that after a restart we can still reset connections a
	 * peer holds from our previous life, and it drops them at once instead of waiting for
	 * the idle timeout. */
	crypto_generichash(n->reset_secret, sizeof(n->reset_secret),
			   (const uint8_t *)"megaengine stateless reset v1", 29, kp->sk, 32);
	uv_timer_init(loop, &n->dial_timer);
	n->dial_timer.data = n;
	n->handles = 1;
	for (size_t i = 0; i < naddrs; i++) {
		struct endpoint *ep = &n->eps[n->neps];
		ep->net = n;
		uv_udp_init_ex(loop, &ep->udp, AF_UNSPEC | UV_UDP_RECVMMSG);
		ep->udp.data = ep;
		n->handles++;
		n->neps++;
		int rc = uv_udp_bind(&ep->udp, (const struct sockaddr *)&addrs[i].ss,
				     addrs[i].ss.ss_family == AF_INET6 ? UV_UDP_IPV6ONLY : 0);
		if (rc == 0) {
			int len = sizeof(ep->local);
			rc = uv_udp_getsockname(&ep->udp, (struct sockaddr *)&ep->local, &len);
			ep->local_len = (socklen_t)len;
		}
		if (rc == 0)
			rc = uv_udp_recv_start(&ep->udp, on_alloc, on_recv);
		if (rc < 0) {
			snprintf(err, errsz, "cannot listen on %s (UDP): %s", addrs[i].text,
				 uv_strerror(rc));
			net_free(n);
			return ME_EIO;
		}
	}
	uv_timer_start(&n->dial_timer, on_dial_tick, DIAL_TICK_MS, DIAL_TICK_MS);
	*out = n;
	return 0;
}

void net_free(struct net *n)
{
	if (n == NULL)
		return;
	n->closing = 1;
	while (n->peers)
		conn_close(n->peers, NET_ERR_SHUTDOWN, "shutting down");
	for (size_t i = 0; i < n->neps; i++)
		uv_close((uv_handle_t *)&n->eps[i].udp, ep_on_close);
	uv_timer_stop(&n->dial_timer);
	uv_close((uv_handle_t *)&n->dial_timer, dial_timer_on_close);
}

int net_send(struct peer *p, const void *frame, size_t len)
{
	if (p->released || !p->up)
		return ME_ECONN;
	if (p->sq.end - p->sq.acked + len > NET_MAX_SENDQ)
		return ME_EBUSY;
	int rc = sendq_push(&p->sq, frame, len);
	if (rc < 0)
		return rc;
	/* Written from the timer: this may run inside another connection's callbacks. */
	uv_timer_start(&p->timer, on_timer, 0, 0);
	return 0;
}

/* ---- transfer streams: API ---- */

int net_xfer_open(struct peer *p, const struct net_xfer_callbacks *cb, void *ud,
		  struct net_xfer **out)
{
	*out = NULL;
	if (p->released || !p->up)
		return ME_ECONN;
	struct net_xfer *x = xfer_new(p, 0);
	if (x == NULL)
		return ME_ENOMEM;
	int rv = ngtcp2_conn_open_bidi_stream(p->q, &x->sid, x);
	if (rv != 0) {
		xfer_free(x);
		return rv == NGTCP2_ERR_STREAM_ID_BLOCKED ? ME_EBUSY : ME_EINTERNAL;
	}
	x->sq.sid = x->sid;
	x->cb = *cb;
	x->ud = ud;
	p->net->stats.xfers_opened++;
	*out = x;
	return 0;
}

void net_xfer_set_callbacks(struct net_xfer *x, const struct net_xfer_callbacks *cb, void *ud)
{
	x->cb = *cb;
	x->ud = ud;
}

/* No more data may be queued: finished, reset, ending or its connection gone. */
static int xfer_closed_for_send(const struct net_xfer *x)
{
	return x->ended || x->fin_req || xfer_aborted(x) || x->sclosed || x->c->released;
}

int net_xfer_send(struct net_xfer *x, const void *frame, size_t len)
{
	if (xfer_closed_for_send(x))
		return ME_ECONN;
	if (len > ME_FRAME_HDR + NET_XFER_MAX_FRAME)
		return ME_ETOOBIG;
	if (len == 0)
		return ME_EINVAL;
	if (xfer_queued(x) + len > NET_XFER_MAX_QUEUE)
		return ME_EBUSY;
	int rc = sendq_push(&x->sq, frame, len);
	if (rc < 0)
		return rc;
	x->bytes_out += len;
	x->c->net->stats.xfer_bytes_out += len;
	if (xfer_queued(x) >= NET_XFER_LOWAT)
		x->hi = 1;
	conn_kick(x->c);
	return 0;
}

size_t net_xfer_queued(const struct net_xfer *x)
{
	return xfer_queued(x);
}

void net_xfer_want_writable(struct net_xfer *x)
{
	if (xfer_closed_for_send(x))
		return;
	if (xfer_queued(x) >= NET_XFER_LOWAT) {
		x->hi = 1;
		return;
	}
	x->wr_pending = 1;
	x->c->xdirty = 1;
	conn_kick(x->c);
}

int net_xfer_finish(struct net_xfer *x)
{
	if (x->fin_req)
		return 0;
	if (xfer_closed_for_send(x))
		return ME_ECONN;
	x->fin_req = 1;
	conn_kick(x->c);
	return 0;
}

void net_xfer_reset(struct net_xfer *x, uint64_t app_error)
{
	if (x->ended || x->reset_req)
		return;
	x->reset_req = 1;
	x->code = app_error ? app_error : NET_ERR_CANCEL;
	x->why = "reset";
	x->c->xdirty = 1;
	conn_kick(x->c);
}

struct peer *net_xfer_peer(const struct net_xfer *x)
{
	return x->c;
}

uint64_t net_xfer_bytes_in(const struct net_xfer *x)
{
	return x->bytes_in;
}

uint64_t net_xfer_bytes_out(const struct net_xfer *x)
{
	return x->bytes_out;
}

size_t net_npeers(const struct net *n)
{
	size_t k = 0;
	for (const struct peer *c = n->peers; c; c = c->next)
		k += c->up;
	return k;
}

struct peer *net_peer_first(struct net *n)
{
	struct peer *c = n->peers;
	while (c && !c->up)
		c = c->next;
	return c;
}

struct peer *net_peer_next(struct peer *p)
{
	struct peer *c = p->next;
	while (c && !c->up)
		c = c->next;
	return c;
}

struct peer *net_peer_find(struct net *n, const uint8_t pk[ME_PK_LEN])
{
	for (struct peer *c = n->peers; c; c = c->next)
		if (c->up && memcmp(c->pk, pk, ME_PK_LEN) == 0)
			return c;
	return NULL;
}

const uint8_t *net_peer_pk(const struct peer *p) { return p->pk; }
const char *net_peer_did(const struct peer *p) { return p->did; }
const char *net_peer_addr(const struct peer *p) { return p->remote_text; }
int net_peer_outbound(const struct peer *p) { return p->outbound; }
int64_t net_peer_since_ms(const struct peer *p) { return p->since_ms; }

uint64_t net_peer_rtt_us(const struct peer *p)
{
	ngtcp2_conn_info ci;
	ngtcp2_conn_get_conn_info(p->q, &ci);
	return ci.smoothed_rtt / 1000;
}

void net_peer_close(struct peer *p, uint64_t app_error, const char *why)
{
	conn_close(p, app_error, why);
}

void net_get_stats(const struct net *n, struct net_stats *out)
{
	int64_t now = me_mono_ms();
	*out = n->stats;
	out->bans_active = 0;
	for (size_t i = 0; i < n->nbans; i++)
		out->bans_active += n->bans[i].until_ms > now;
}
