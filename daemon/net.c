#include "daemon/net.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
#define MAX_CONNS 256
#define MAX_HANDSHAKING 64
#define MAX_PKT 1452
#define DIAL_TICK_MS 500
#define MAX_VEC 16

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
	int in_callback;
	int probing; /* keep-alive shortened to check the connection is still alive */
	uint64_t last_rx_ns;
	struct peer *awaiting; /* a connection to the same node that must prove it is alive */
	uint64_t probe_start_ns;
	struct peer *prev, *next;
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
	uint8_t rbuf[65536];
};

static void conn_write(struct peer *c);
static void on_timer(uv_timer_t *t);
static void conn_close(struct peer *c, uint64_t app_error, const char *why);

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
	(void)flags;
	(void)offset;
	(void)sud;

	/* Flow control credit is returned for everything read, kept or not. */
	ngtcp2_conn_extend_max_stream_offset(q, sid, len);
	ngtcp2_conn_extend_max_offset(q, len);

	if (ngtcp2_is_bidi_stream(sid) || ngtcp2_conn_is_local_stream(q, sid))
		return 0; /* reserved for transfers; refused in stream_open */
	struct instream *s = instream_get(c, sid, 1);
	if (s == NULL) {
		stream_reject(c, NULL, sid, "too many streams");
		return 0;
	}
	if (s->dead || len == 0)
		return 0;
	if (!c->up) {
		/* A connection that lost the duplicate race: nothing it says is used. */
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
		if (c->net->cb.frame(c->net->cb.ud, c, body, blen) < 0) {
			stream_reject(c, s, sid, "rejected message");
			return 0;
		}
		if (c->pending_close)
			return 0;
	}
	if (rc < 0)
		stream_reject(c, s, sid, rc == ME_ETOOBIG ? "frame over the size limit"
							   : "malformed frame");
	return 0;
}

static int stream_open_cb(ngtcp2_conn *q, int64_t sid, void *ud)
{
	struct peer *c = ud;
	if (ngtcp2_is_bidi_stream(sid)) {
		/* Transfers are not spoken yet: refuse both directions. */
		ngtcp2_conn_shutdown_stream(q, 0, sid, NET_ERR_FRAME);
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
	(void)q;
	(void)flags;
	(void)app_error;
	(void)sud;
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
	(void)sud;
	if (sid == c->sq.sid)
		sendq_ack(&c->sq, offset + len);
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
	.handshake_completed = handshake_completed_cb,
};

/* ---- connection lifecycle ---- */

static void conn_on_close(uv_handle_t *h)
{
	struct peer *c = h->data;
	struct net *n = c->net;

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

/* Unlinks and frees a connection, telling the upper layer if it was up. */
static void conn_release(struct peer *c, const char *why)
{
	struct net *n = c->net;

	if (c->released)
		return;
	c->released = 1;
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
		conn_release(c, "closed by the peer");
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
	ngtcp2_tstamp exp = ngtcp2_conn_get_expiry(c->q), now = now_ns();
	if (exp == UINT64_MAX) {
		uv_timer_stop(&c->timer);
		return;
	}
	uint64_t ms = exp <= now ? 0 : (exp - now + NGTCP2_MILLISECONDS - 1) / NGTCP2_MILLISECONDS;
	uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* Writes every packet ngtcp2 has for this connection, stream data included. */
static void conn_write(struct peer *c)
{
	uint8_t buf[MAX_PKT];
	ngtcp2_path_storage ps;
	ngtcp2_pkt_info pi;
	ngtcp2_tstamp ts = now_ns();
	int blocked = 0;

	handle_pending_close(c);
	if (c->released)
		return;
	ngtcp2_path_storage_zero(&ps);
	for (int npkts = 0; npkts < 256; npkts++) {
		ngtcp2_vec vec[MAX_VEC];
		size_t nvec = 0;
		int64_t sid = -1;
		ngtcp2_ssize ndata = -1;

		if (!blocked && c->sq.sid >= 0 && c->sq.sent < c->sq.end) {
			nvec = sendq_vec(&c->sq, vec, MAX_VEC);
			sid = c->sq.sid;
		}
		c->in_callback = 1;
		ngtcp2_ssize w = ngtcp2_conn_writev_stream(c->q, &ps.path, &pi, buf, sizeof(buf),
							   &ndata, NGTCP2_WRITE_STREAM_FLAG_MORE,
							   sid, nvec ? vec : NULL, nvec, ts);
		c->in_callback = 0;
		if (w < 0) {
			if (w == NGTCP2_ERR_WRITE_MORE) {
				c->sq.sent += (uint64_t)ndata;
				continue;
			}
			if (w == NGTCP2_ERR_STREAM_DATA_BLOCKED || w == NGTCP2_ERR_STREAM_SHUT_WR) {
				blocked = 1;
				continue;
			}
			conn_fail(c, (int)w);
			return;
		}
		if (ndata > 0)
			c->sq.sent += (uint64_t)ndata;
		if (w == 0)
			break;
		send_packet(c, buf, (size_t)w);
	}
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
	ngtcp2_transport_params_default(p);
	p->initial_max_stream_data_uni = NET_MAX_FRAME + 4096;
	p->initial_max_stream_data_bidi_local = 1 << 20;
	p->initial_max_stream_data_bidi_remote = 1 << 20;
	p->initial_max_data = 16 << 20;
	p->initial_max_streams_uni = MAX_IN_STREAMS;
	p->initial_max_streams_bidi = 0;
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

static size_t count_handshaking(const struct net *n)
{
	size_t k = 0;
	for (const struct peer *c = n->peers; c; c = c->next)
		k += !c->has_pk;
	return k;
}

static struct peer *server_conn_new(struct endpoint *ep, const struct sockaddr *remote,
				    socklen_t rlen, const ngtcp2_pkt_hd *hd)
{
	struct net *n = ep->net;
	ngtcp2_settings s;
	ngtcp2_transport_params p;
	ngtcp2_callbacks cb = base_callbacks;
	ngtcp2_cid scid;

	if (n->nconns >= MAX_CONNS || count_handshaking(n) >= MAX_HANDSHAKING)
		return NULL;
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
	if (n->nconns >= MAX_CONNS)
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
	(void)flags;

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
		uv_udp_init(loop, &ep->udp);
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
	struct chunk *ch = malloc(sizeof(*ch) + len);
	if (ch == NULL)
		return ME_ENOMEM;
	ch->next = NULL;
	ch->off = p->sq.end;
	ch->len = len;
	memcpy(ch->data, frame, len);
	if (p->sq.tail)
		p->sq.tail->next = ch;
	else
		p->sq.head = ch;
	p->sq.tail = ch;
	p->sq.end += len;
	/* Written from the timer: this may run inside another connection's callbacks. */
	uv_timer_start(&p->timer, on_timer, 0, 0);
	return 0;
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
	*out = n->stats;
}
