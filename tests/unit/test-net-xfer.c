/* Transfer streams (daemon/net.h, net_xfer_*): two real `struct net` instances in one process
 * and one libuv loop, talking QUIC + TLS 1.3 over 127.0.0.1 with their own Ed25519 identities.
 *
 * Covered: request/response both ways with clean closes; a 64 MiB transfer in 64 KiB frames
 * driven by `writable`, checked byte for byte (BLAKE2b of what arrived against that of the
 * stream the server generates) with a gossip frame sent in the middle that must arrive before
 * the transfer ends (the rate is printed, not asserted); `writable` on request and the queue
 * limits; two transfers running side by side; the NET_XFER_MAX_IN limit (the 5th open fails with ME_EBUSY and
 * succeeds once one has closed); resets seen as `closed` with the code on the other side;
 * oversized, malformed and rejected frames reset only their stream; a refusing accept callback;
 * a net torn down while transfers run. Every live transfer must see `closed` exactly once and
 * nothing after it; ASan checks that nothing leaks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <ftw.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sodium.h>
#include <uv.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/keys.h"
#include "common/log.h"
#include "daemon/config.h"
#include "daemon/net.h"
#include "daemon/tls.h"

#define WAIT_MS 20000
#define BULK_TOTAL (64u << 20)
#define BULK_FRAME (64u * 1024)
#define GOSSIP_AT (16u << 20) /* the server sends a gossip frame after this much data */

static uv_loop_t loop;
static char tmpdir[] = "/tmp/me-test-net-xfer-XXXXXX";

#define WAIT_FOR(expr)                                                                         \
	do {                                                                                   \
		uint64_t end_ = uv_now(&loop) + WAIT_MS;                                       \
		while (!(expr)) {                                                              \
			if (uv_now(&loop) >= end_)                                             \
				fail_msg("timed out waiting for %s", #expr);                   \
			uv_run(&loop, UV_RUN_ONCE);                                            \
		}                                                                              \
	} while (0)

/* What a server does with a transfer the peer opened. */
enum serve {
	S_ECHO,   /* answers each frame with "re:" + body; finishes after the peer's eof */
	S_BULK,   /* on the request, sends BULK_TOTAL bytes in BULK_FRAME frames, then finishes */
	S_HOLD,   /* keeps the stream open and says nothing */
	S_RESET,  /* resets the stream with 0x1234 on the first frame */
	S_REJECT, /* the frame callback refuses the first frame */
	S_REFUSE, /* the accept callback refuses the stream */
};

struct node;

/* The test's side of one transfer. */
struct xf {
	struct node *nd;
	struct net_xfer *x;
	struct xf *next;
	enum serve mode;
	int server;
	int nframes;
	uint8_t last[256];
	size_t last_len;
	int eof;
	int closed; /* times `closed` was called */
	int after_closed; /* callbacks after `closed` (must stay 0) */
	uint64_t code;
	char why[128];
	int writables;
	/* bulk data */
	uint64_t total, sent, got;
	uint32_t seq;
	crypto_generichash_state h;
	uint8_t digest[32];
	int gossip_sent;
	uint64_t got_at_gossip; /* bytes received when the gossip frame arrived */
	uint64_t t0, t1;       /* wall clock, ns */
	uint64_t cpu0, cpu1;   /* process CPU time (both nets run in this thread), us */
};

struct node {
	const char *name;
	struct me_keypair kp;
	struct tls_ctx *tls;
	struct net *net;
	struct me_sockaddr addr;
	struct peer *peer;
	int ups, downs;
	int ngossip;
	uint8_t gossip[64];
	size_t gossip_len;
	enum serve mode;
	struct xf *xfs;
	struct xf *bulk_rx; /* the client transfer watching for the gossip frame */
};

static struct node A = { .name = "A" }, B = { .name = "B" };

static struct xf *xf_new(struct node *nd)
{
	struct xf *f = calloc(1, sizeof(*f));
	assert_non_null(f);
	f->nd = nd;
	f->next = nd->xfs;
	nd->xfs = f;
	return f;
}

static int frame_put(uint8_t *out, const void *body, size_t len)
{
	out[0] = (uint8_t)(len >> 24);
	out[1] = (uint8_t)(len >> 16);
	out[2] = (uint8_t)(len >> 8);
	out[3] = (uint8_t)len;
	memcpy(out + 4, body, len);
	return (int)(len + 4);
}

static int send_str(struct net_xfer *x, const char *s)
{
	uint8_t buf[300];
	int n = frame_put(buf, s, strlen(s));
	return net_xfer_send(x, buf, (size_t)n);
}

/* Deterministic bulk content: frame i is xorshift output seeded with i. */
static void bulk_fill(uint8_t *p, size_t len, uint32_t seq)
{
	uint64_t s = 0x9e3779b97f4a7c15ull ^ ((uint64_t)seq * 0xbf58476d1ce4e5b9ull);
	for (size_t i = 0; i + 8 <= len; i += 8) {
		s ^= s >> 12;
		s ^= s << 25;
		s ^= s >> 27;
		uint64_t v = s * 0x2545f4914f6cdd1dull;
		memcpy(p + i, &v, 8);
	}
}

static uint64_t cpu_us(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
	       (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* ---- transfer callbacks ---- */

/* BLAKE2b of the whole bulk stream, as the server generates it. */
static void bulk_digest(uint8_t out[32])
{
	static uint8_t buf[BULK_FRAME];
	crypto_generichash_state h;
	crypto_generichash_init(&h, NULL, 0, 32);
	for (uint32_t seq = 0; seq < BULK_TOTAL / BULK_FRAME; seq++) {
		bulk_fill(buf, BULK_FRAME, seq);
		crypto_generichash_update(&h, buf, BULK_FRAME);
	}
	crypto_generichash_final(&h, out, 32);
}

static void bulk_pump(struct xf *f)
{
	static uint8_t buf[4 + BULK_FRAME];
	while (f->sent < f->total && net_xfer_queued(f->x) < NET_XFER_LOWAT) {
		size_t n = f->total - f->sent < BULK_FRAME ? (size_t)(f->total - f->sent) : BULK_FRAME;
		bulk_fill(buf + 4, n, f->seq);
		frame_put(buf, buf + 4, n);
		int rc = net_xfer_send(f->x, buf, n + 4);
		if (rc == ME_EBUSY)
			break;
		assert_int_equal(rc, 0);
		f->seq++;
		f->sent += n;
		if (!f->gossip_sent && f->sent >= GOSSIP_AT) {
			/* Queued behind 16 MiB of transfer data, still due to arrive long before
			 * the transfer ends. */
			uint8_t g[32];
			int gl = frame_put(g, "gossip-in-the-middle", 20);
			assert_int_equal(net_send(net_xfer_peer(f->x), g, (size_t)gl), 0);
			f->gossip_sent = 1;
		}
	}
	if (f->sent == f->total) {
		assert_int_equal(net_xfer_finish(f->x), 0);
		f->sent++; /* done */
	}
}

static int on_frame(void *ud, struct net_xfer *x, const uint8_t *body, size_t len)
{
	struct xf *f = ud;
	assert_ptr_equal(f->x, x);
	f->after_closed += f->closed;
	f->nframes++;
	if (f->server && f->mode == S_BULK && f->total == 0) {
		/* the request: "bulk" */
		assert_int_equal(len, 4);
		f->total = BULK_TOTAL;
		bulk_pump(f);
		return 0;
	}
	if (!f->server && f->total > 0) {
		crypto_generichash_update(&f->h, body, len);
		f->got += len;
		return 0;
	}
	f->last_len = len < sizeof(f->last) ? len : sizeof(f->last);
	memcpy(f->last, body, f->last_len);
	if (!f->server)
		return 0;
	switch (f->mode) {
	case S_ECHO: {
		char reply[300];
		snprintf(reply, sizeof(reply), "re:%.*s", (int)f->last_len, (const char *)f->last);
		assert_int_equal(send_str(x, reply), 0);
		return 0;
	}
	case S_RESET:
		net_xfer_reset(x, 0x1234);
		/* Nothing can be sent after a reset. */
		assert_int_equal(send_str(x, "late"), ME_ECONN);
		return 0;
	case S_REJECT:
		return -1;
	default:
		return 0;
	}
}

static void on_writable(void *ud, struct net_xfer *x)
{
	struct xf *f = ud;
	assert_ptr_equal(f->x, x);
	f->after_closed += f->closed;
	f->writables++;
	if (f->server && f->mode == S_BULK)
		bulk_pump(f);
}

static void on_eof(void *ud, struct net_xfer *x)
{
	struct xf *f = ud;
	assert_ptr_equal(f->x, x);
	f->after_closed += f->closed;
	f->eof++;
	if (!f->server && f->total > 0) {
		f->t1 = uv_hrtime();
		f->cpu1 = cpu_us();
		crypto_generichash_final(&f->h, f->digest, sizeof(f->digest));
	}
	/* Both sides finish their direction once the other has. */
	if (f->server ? f->mode == S_ECHO : 1)
		assert_int_equal(net_xfer_finish(x), 0);
}

static void on_closed(void *ud, struct net_xfer *x, uint64_t app_error, const char *why)
{
	struct xf *f = ud;
	assert_ptr_equal(f->x, x);
	f->closed++;
	f->code = app_error;
	snprintf(f->why, sizeof(f->why), "%s", why ? why : "(null)");
	f->x = NULL;
	/* x is gone once this returns; the test must not touch it again */
}

static const struct net_xfer_callbacks xcb = {
	.frame = on_frame, .writable = on_writable, .eof = on_eof, .closed = on_closed,
};

static int on_accept(void *ud, struct peer *p, struct net_xfer *x)
{
	struct node *nd = ud;
	assert_ptr_equal(p, nd->peer);
	assert_ptr_equal(net_xfer_peer(x), p);
	if (nd->mode == S_REFUSE)
		return -1;
	struct xf *f = xf_new(nd);
	f->x = x;
	f->server = 1;
	f->mode = nd->mode;
	net_xfer_set_callbacks(x, &xcb, f);
	return 0;
}

/* ---- net callbacks ---- */

static void on_peer_up(void *ud, struct peer *p)
{
	struct node *nd = ud;
	nd->peer = p;
	nd->ups++;
}

static void on_peer_down(void *ud, struct peer *p, const char *why)
{
	struct node *nd = ud;
	(void)why;
	if (nd->peer == p)
		nd->peer = NULL;
	nd->downs++;
}

static int on_gossip(void *ud, struct peer *p, const uint8_t *body, size_t len)
{
	struct node *nd = ud;
	(void)p;
	nd->ngossip++;
	nd->gossip_len = len < sizeof(nd->gossip) ? len : sizeof(nd->gossip);
	memcpy(nd->gossip, body, nd->gossip_len);
	if (nd->bulk_rx)
		nd->bulk_rx->got_at_gossip = nd->bulk_rx->got;
	return 0;
}

/* ---- fixture ---- */

static void pick_addr(struct me_sockaddr *a)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sin);
	char text[64];
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	assert_true(fd >= 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
	close(fd);
	snprintf(text, sizeof(text), "127.0.0.1:%u", ntohs(sin.sin_port));
	assert_int_equal(me_sockaddr_parse(text, a), 0);
}

static void node_start(struct node *nd)
{
	struct net_callbacks cb = {
		.peer_up = on_peer_up, .peer_down = on_peer_down, .frame = on_gossip,
		.xfer_accept = on_accept, .ud = nd, .xfer_ud = nd,
	};
	char err[256] = "";

	pick_addr(&nd->addr);
	nd->peer = NULL;
	nd->ups = nd->downs = nd->ngossip = 0;
	nd->mode = S_ECHO;
	nd->bulk_rx = NULL;
	if (net_init(&nd->net, &loop, &nd->kp, nd->tls, &nd->addr, 1, &cb, err, sizeof(err)) < 0)
		fail_msg("net_init %s: %s", nd->name, err);
}

/* Every transfer that was live saw `closed` exactly once and nothing after it. */
static void node_check_free(struct node *nd)
{
	while (nd->xfs) {
		struct xf *f = nd->xfs;
		nd->xfs = f->next;
		if (f->closed != 1 || f->after_closed != 0)
			fail_msg("%s: transfer (%s) closed %d times, %d callbacks after closed",
				 nd->name, f->server ? "server" : "client", f->closed,
				 f->after_closed);
		free(f);
	}
}

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb, (void)flag, (void)ftw;
	return remove(path);
}

static int group_setup(void **state)
{
	char root[200], certs[240], err[256];
	int created;
	(void)state;

	if (sodium_init() < 0 || mkdtemp(tmpdir) == NULL)
		return -1;
	me_log_init("test-net-xfer");
	me_log_set_level(LOG_WARNING);
	struct node *nodes[] = { &A, &B };
	for (int i = 0; i < 2; i++) {
		snprintf(root, sizeof(root), "%s/%s", tmpdir, nodes[i]->name);
		snprintf(certs, sizeof(certs), "%s/certs", root);
		if (me_keypair_init(root, &nodes[i]->kp, &created) < 0 ||
		    tls_init(&nodes[i]->tls, &nodes[i]->kp, certs, err, sizeof(err)) < 0)
			return -1;
	}
	return uv_loop_init(&loop);
}

static int group_teardown(void **state)
{
	(void)state;
	tls_free(A.tls);
	tls_free(B.tls);
	me_keypair_wipe(&A.kp);
	me_keypair_wipe(&B.kp);
	uv_run(&loop, UV_RUN_DEFAULT);
	int rc = uv_loop_close(&loop);
	nftw(tmpdir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
	return rc;
}

/* A and B up, connected (A dialed B). */
static int setup(void **state)
{
	(void)state;
	node_start(&A);
	node_start(&B);
	if (net_want(A.net, B.kp.pk, &B.addr) < 0)
		return -1;
	WAIT_FOR(A.peer != NULL && B.peer != NULL);
	return 0;
}

static void stop(struct node *nd)
{
	if (nd->net) {
		net_free(nd->net);
		nd->net = NULL;
	}
}

static int teardown(void **state)
{
	(void)state;
	stop(&A);
	stop(&B);
	uv_run(&loop, UV_RUN_DEFAULT); /* close callbacks: transfers still open are told */
	node_check_free(&A);
	node_check_free(&B);
	return 0;
}

/* Server transfers on nd that received a frame and are still open. */
static int count_open(const struct node *nd)
{
	int k = 0;
	for (const struct xf *f = nd->xfs; f; f = f->next)
		k += f->server && f->nframes > 0 && !f->closed;
	return k;
}

/* Opens a transfer; while the peer has not yet given back the stream slots of the transfers
 * before (a MAX_STREAMS frame one round trip after they closed, later on a loaded machine), the
 * open is ME_EBUSY as documented: wait for it, within WAIT_MS. */
static struct xf *open_xf(struct node *nd)
{
	struct xf *f = xf_new(nd);
	uint64_t end = uv_now(&loop) + WAIT_MS;
	int rc;
	while ((rc = net_xfer_open(nd->peer, &xcb, f, &f->x)) == ME_EBUSY && uv_now(&loop) < end)
		uv_run(&loop, UV_RUN_ONCE);
	assert_int_equal(rc, 0);
	assert_non_null(f->x);
	return f;
}

/* ---- tests ---- */

static void roundtrip(struct node *c, struct node *s)
{
	struct net_stats st0, st;
	net_get_stats(s->net, &st0);

	struct xf *f = open_xf(c);
	assert_int_equal(send_str(f->x, "hello"), 0);
	assert_int_equal(send_str(f->x, "world"), 0);
	WAIT_FOR(f->nframes == 2);
	assert_int_equal(f->last_len, 8);
	assert_memory_equal(f->last, "re:world", 8);
	struct xf *sf = s->xfs;
	assert_non_null(sf);
	assert_true(sf->server);
	assert_int_equal(sf->nframes, 2);
	assert_memory_equal(sf->last, "world", 5);
	assert_int_equal(net_xfer_bytes_in(sf->x), 2 * 4 + 10);
	assert_int_equal(net_xfer_bytes_out(sf->x), 2 * 4 + 16);
	assert_int_equal(net_xfer_bytes_out(f->x), 2 * 4 + 10);
	assert_int_equal(net_xfer_bytes_in(f->x), 2 * 4 + 16);

	/* The client finishes; the server (eof) finishes too; both close cleanly. */
	assert_int_equal(net_xfer_finish(f->x), 0);
	assert_int_equal(send_str(f->x, "late"), ME_ECONN);
	WAIT_FOR(f->closed && sf->closed);
	assert_int_equal(f->eof, 1);
	assert_int_equal(sf->eof, 1);
	assert_int_equal(f->code, 0);
	assert_int_equal(sf->code, 0);
	net_get_stats(s->net, &st);
	assert_int_equal(st.xfers_accepted, st0.xfers_accepted + 1);
	assert_int_equal(st.xfer_bytes_in, st0.xfer_bytes_in + 18);
	assert_int_equal(st.xfer_bytes_out, st0.xfer_bytes_out + 24);
}

static void test_request_response(void **state)
{
	(void)state;
	roundtrip(&A, &B); /* opened by the dialer */
	roundtrip(&B, &A); /* and by the accepting side */
	struct net_stats st;
	net_get_stats(A.net, &st);
	assert_int_equal(st.xfers_opened, 1);
	assert_int_equal(st.xfers_accepted, 1);
	assert_int_equal(st.xfers_refused, 0);
	assert_int_equal(st.frames_rejected, 0);
}

static void test_bulk(void **state)
{
	(void)state;
	uint8_t expect[32];
	bulk_digest(expect);
	B.mode = S_BULK;
	struct xf *f = open_xf(&A);
	A.bulk_rx = f;
	f->total = BULK_TOTAL;
	f->got_at_gossip = UINT64_MAX;
	crypto_generichash_init(&f->h, NULL, 0, 32);
	f->t0 = uv_hrtime();
	f->cpu0 = cpu_us();
	assert_int_equal(send_str(f->x, "bulk"), 0);
	WAIT_FOR(f->eof || f->closed);
	assert_int_equal(f->closed, 0);
	struct xf *sf = B.xfs;
	assert_non_null(sf);
	double secs = (double)(f->t1 - f->t0) / 1e9, cpu = (double)(f->cpu1 - f->cpu0) / 1e6;
	/* Both ends (and the test's data generation and hashing) share this one thread: the
	 * CPU figure is what one core does with all of it, independent of the machine's load. */
	print_message("64 MiB transfer: %.3f s, %.1f MB/s (%.3f s of CPU: %.1f MB per CPU "
		      "second); gossip frame arrived after %.1f MiB of the transfer (sent after "
		      "%u MiB)\n", secs, BULK_TOTAL / secs / 1e6, cpu, BULK_TOTAL / cpu / 1e6,
		      (double)f->got_at_gossip / (1 << 20), GOSSIP_AT >> 20);
	assert_int_equal(f->got, BULK_TOTAL);
	assert_int_equal(f->nframes, BULK_TOTAL / BULK_FRAME);
	assert_memory_equal(f->digest, expect, 32);
	assert_int_equal(sf->sent, BULK_TOTAL + 1);
	assert_true(sf->writables > 0);
	/* The gossip frame came through while the transfer was still running. */
	assert_int_equal(A.ngossip, 1);
	assert_memory_equal(A.gossip, "gossip-in-the-middle", 20);
	assert_true(f->got_at_gossip < BULK_TOTAL);
	WAIT_FOR(f->closed && sf->closed);
	assert_int_equal(f->code, 0);
	assert_int_equal(sf->code, 0);
}

static void test_want_writable(void **state)
{
	(void)state;
	B.mode = S_HOLD;
	struct xf *f = open_xf(&A);
	/* Below the mark: one `writable` from the loop, not from inside the call. */
	net_xfer_want_writable(f->x);
	assert_int_equal(f->writables, 0);
	WAIT_FOR(f->writables == 1);
	/* Queue past the mark and ask again: it fires once the peer has acknowledged. */
	static uint8_t buf[4 + BULK_FRAME];
	memset(buf + 4, 'x', BULK_FRAME);
	frame_put(buf, buf + 4, BULK_FRAME);
	while (net_xfer_queued(f->x) < NET_XFER_LOWAT)
		assert_int_equal(net_xfer_send(f->x, buf, sizeof(buf)), 0);
	net_xfer_want_writable(f->x);
	WAIT_FOR(f->writables == 2);
	assert_true(net_xfer_queued(f->x) < NET_XFER_LOWAT);
	/* The queue limit. */
	int rc = 0;
	size_t n = 0;
	while ((rc = net_xfer_send(f->x, buf, sizeof(buf))) == 0)
		n++;
	assert_int_equal(rc, ME_EBUSY);
	assert_true(net_xfer_queued(f->x) <= NET_XFER_MAX_QUEUE);
	assert_true(n > 0);
	/* Frames over the limit are refused before anything is queued. */
	static uint8_t big[4 + NET_XFER_MAX_FRAME + 1];
	assert_int_equal(net_xfer_send(f->x, big, sizeof(big)), ME_ETOOBIG);
	WAIT_FOR(B.xfs != NULL && B.xfs->nframes > 0);
	net_xfer_reset(f->x, NET_ERR_CANCEL);
	WAIT_FOR(f->closed && B.xfs->closed);
	assert_int_equal(f->code, NET_ERR_CANCEL);
	assert_int_equal(B.xfs->code, NET_ERR_CANCEL);
}

static void test_stream_limit(void **state)
{
	(void)state;
	B.mode = S_HOLD;
	struct xf *f[NET_XFER_MAX_IN];
	for (int i = 0; i < NET_XFER_MAX_IN; i++) {
		f[i] = open_xf(&A);
		assert_int_equal(send_str(f[i]->x, "hold"), 0);
	}
	/* The 5th is refused at once by the QUIC stream limit B announced. */
	struct net_xfer *x5 = NULL;
	assert_int_equal(net_xfer_open(A.peer, &xcb, NULL, &x5), ME_EBUSY);
	assert_null(x5);
	WAIT_FOR(count_open(&B) == NET_XFER_MAX_IN);
	/* One ends (A resets it; B sees the code); B then lets A open another (MAX_STREAMS). */
	net_xfer_reset(f[0]->x, NET_ERR_CANCEL);
	WAIT_FOR(f[0]->closed);
	assert_int_equal(f[0]->code, NET_ERR_CANCEL);
	struct xf *g = xf_new(&A);
	int rc;
	uint64_t end = uv_now(&loop) + WAIT_MS;
	while ((rc = net_xfer_open(A.peer, &xcb, g, &g->x)) == ME_EBUSY && uv_now(&loop) < end)
		uv_run(&loop, UV_RUN_ONCE);
	assert_int_equal(rc, 0);
	int closed_on_b = 0;
	for (struct xf *s = B.xfs; s; s = s->next)
		if (s->closed) {
			closed_on_b++;
			assert_int_equal(s->code, NET_ERR_CANCEL);
			assert_string_equal(s->why, "reset by the peer");
		}
	assert_int_equal(closed_on_b, 1);
	assert_int_equal(send_str(g->x, "hold"), 0);
	WAIT_FOR(count_open(&B) == NET_XFER_MAX_IN);
	struct net_stats st;
	net_get_stats(B.net, &st);
	assert_int_equal(st.xfers_accepted, NET_XFER_MAX_IN + 1);
	/* The rest stay open: teardown closes them (closed with NET_ERR_SHUTDOWN). */
}

static void test_resets(void **state)
{
	(void)state;
	/* The server resets: the client sees its code. */
	B.mode = S_RESET;
	struct xf *f = open_xf(&A);
	assert_int_equal(send_str(f->x, "reset me"), 0);
	WAIT_FOR(f->closed);
	assert_int_equal(f->code, 0x1234);
	assert_string_equal(f->why, "reset by the peer");
	WAIT_FOR(B.xfs && B.xfs->closed);
	assert_int_equal(B.xfs->code, 0x1234);
	assert_string_equal(B.xfs->why, "reset");

	/* The client resets: the server sees NET_ERR_CANCEL. Calls after it are no-ops. */
	B.mode = S_HOLD;
	f = open_xf(&A);
	assert_int_equal(send_str(f->x, "then cancel"), 0);
	WAIT_FOR(B.xfs->nframes == 1 && !B.xfs->closed);
	struct xf *sf = B.xfs;
	net_xfer_reset(f->x, NET_ERR_CANCEL);
	net_xfer_reset(f->x, 0x999);
	assert_int_equal(f->closed, 0); /* from the loop, not from inside the call */
	WAIT_FOR(f->closed && sf->closed);
	assert_int_equal(f->code, NET_ERR_CANCEL);
	assert_int_equal(sf->code, NET_ERR_CANCEL);
	assert_int_equal(A.ups + B.ups, 2);
	assert_int_equal(A.downs + B.downs, 0);
}

/* Sends raw bytes as a "frame" and expects B to reset only that stream with NET_ERR_FRAME. */
static void bad_frame(const uint8_t *bytes, size_t len, const char *why)
{
	struct net_stats st0, st;
	net_get_stats(B.net, &st0);
	struct xf *f = open_xf(&A);
	assert_int_equal(net_xfer_send(f->x, bytes, len), 0);
	WAIT_FOR(f->closed);
	assert_int_equal(f->code, NET_ERR_FRAME);
	net_get_stats(B.net, &st);
	assert_int_equal(st.frames_rejected, st0.frames_rejected + 1);
	/* B accepted it first (the frame was refused in it), and was told. */
	WAIT_FOR(B.xfs && B.xfs->closed);
	assert_int_equal(B.xfs->code, NET_ERR_FRAME);
	assert_string_equal(B.xfs->why, why);
}

static void test_bad_frames(void **state)
{
	(void)state;
	B.mode = S_HOLD;
	/* A header announcing more than NET_XFER_MAX_FRAME: refused on its 4 bytes. */
	const uint8_t big[] = { 0x00, 0x11, 0x00, 0x00, 'x' }; /* 1 MiB + 64 KiB */
	assert_true(0x110000 > NET_XFER_MAX_FRAME);
	bad_frame(big, sizeof(big), "frame over the size limit");
	/* A zero length. */
	const uint8_t zero[] = { 0, 0, 0, 0, 0, 0, 0, 1, 'y' };
	bad_frame(zero, sizeof(zero), "malformed frame");
	/* A frame the callback refuses. */
	B.mode = S_REJECT;
	uint8_t ok[16];
	int n = frame_put(ok, "nope", 4);
	bad_frame(ok, (size_t)n, "rejected frame");
	/* A frame cut short by FIN. */
	B.mode = S_HOLD;
	struct xf *f = open_xf(&A);
	assert_int_equal(net_xfer_send(f->x, ok, (size_t)n - 1), 0);
	assert_int_equal(net_xfer_finish(f->x), 0);
	WAIT_FOR(f->closed);
	assert_int_equal(f->code, NET_ERR_FRAME);
	WAIT_FOR(B.xfs->closed);
	assert_string_equal(B.xfs->why, "truncated frame");

	/* The connection stayed up and still carries transfers and gossip. */
	assert_int_equal(net_npeers(A.net), 1);
	assert_int_equal(A.downs + B.downs, 0);
	B.mode = S_ECHO;
	roundtrip(&A, &B);
	uint8_t g[16];
	n = frame_put(g, "still", 5);
	assert_int_equal(net_send(A.peer, g, (size_t)n), 0);
	WAIT_FOR(B.ngossip == 1);
}

static void test_refused(void **state)
{
	(void)state;
	B.mode = S_REFUSE;
	struct xf *f = open_xf(&A);
	assert_int_equal(send_str(f->x, "may I"), 0);
	WAIT_FOR(f->closed);
	assert_int_equal(f->code, NET_ERR_BUSY);
	assert_null(B.xfs);
	struct net_stats st;
	net_get_stats(B.net, &st);
	assert_int_equal(st.xfers_refused, 1);
	assert_int_equal(st.xfers_accepted, 0);
	/* Refusals free the peer's stream slots too: NET_XFER_MAX_IN + 1 more in a row. */
	for (int i = 0; i < NET_XFER_MAX_IN + 1; i++) {
		struct xf *g = xf_new(&A);
		int rc;
		uint64_t end = uv_now(&loop) + WAIT_MS;
		while ((rc = net_xfer_open(A.peer, &xcb, g, &g->x)) == ME_EBUSY &&
		       uv_now(&loop) < end)
			uv_run(&loop, UV_RUN_ONCE);
		assert_int_equal(rc, 0);
		assert_int_equal(send_str(g->x, "again"), 0);
		WAIT_FOR(g->closed);
		assert_int_equal(g->code, NET_ERR_BUSY);
	}
}

static void test_teardown_while_running(void **state)
{
	(void)state;
	B.mode = S_BULK;
	struct xf *f[2];
	for (int i = 0; i < 2; i++) {
		f[i] = open_xf(&A);
		f[i]->total = BULK_TOTAL;
		crypto_generichash_init(&f[i]->h, NULL, 0, 32);
		assert_int_equal(send_str(f[i]->x, "bulk"), 0);
	}
	/* Both run at once (round robin): neither is anywhere near done when both have 1 MiB
	 * (checked below: got < BULK_TOTAL). */
	WAIT_FOR(f[0]->got > (1u << 20) && f[1]->got > (1u << 20));
	/* B goes away mid-transfer: its transfers are told from the loop, A's when the
	 * CONNECTION_CLOSE arrives, with B's code. */
	stop(&B);
	assert_int_equal(B.xfs->closed + B.xfs->next->closed, 0);
	WAIT_FOR(f[0]->closed && f[1]->closed && B.xfs->closed && B.xfs->next->closed);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(f[i]->code, NET_ERR_SHUTDOWN);
		assert_true(f[i]->got < BULK_TOTAL);
		assert_int_equal(B.xfs->code, NET_ERR_SHUTDOWN);
		assert_int_equal(B.xfs->next->code, NET_ERR_SHUTDOWN);
	}
	assert_int_equal(A.downs, 1);
	assert_null(A.peer);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_request_response, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bulk, setup, teardown),
		cmocka_unit_test_setup_teardown(test_want_writable, setup, teardown),
		cmocka_unit_test_setup_teardown(test_stream_limit, setup, teardown),
		cmocka_unit_test_setup_teardown(test_resets, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bad_frames, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_teardown_while_running, setup, teardown),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
