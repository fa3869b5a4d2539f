/* The network plane: QUIC v1 (ngtcp2) on libuv UDP sockets, TLS 1.3 through tls.c.
 *
 * One connection per pair of nodes. The peer's identity is its certificate's Ed25519 key, fixed
 * by the handshake. Each side sends its messages on one unidirectional stream as length-prefixed
 * msgpack frames (common/frame.h); a malformed or oversized frame shuts that stream with
 * NET_ERR_FRAME, never the daemon. Transfers use bidirectional streams (below). After every read and timer event pending packets are written
 * and the connection's single timer is re-armed from ngtcp2's expiry. */
#ifndef ME_NET_H
#define ME_NET_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "common/keys.h"
#include "daemon/config.h"

#define NET_MAX_FRAME (1u << 20)      /* largest peer message */
#define NET_MAX_SENDQ (8u << 20)      /* queued unacknowledged bytes per peer */
#define NET_IDLE_TIMEOUT_MS 30000
#define NET_KEEPALIVE_MS 10000
#define NET_HANDSHAKE_TIMEOUT_MS 10000
#define NET_BACKOFF_MIN_MS 1000
#define NET_BACKOFF_MAX_MS 300000

struct net;
struct peer;

/* Application error codes in CONNECTION_CLOSE / STOP_SENDING. */
enum {
	NET_ERR_NONE = 0,
	NET_ERR_FRAME = 0x101,     /* malformed or oversized frame */
	NET_ERR_DUPLICATE = 0x102, /* another connection to the same node wins */
	NET_ERR_SELF = 0x103,      /* dialed ourselves */
	NET_ERR_SHUTDOWN = 0x104,
	NET_ERR_POLICY = 0x105,    /* no usable identity, or our message stream was closed */
	NET_ERR_CANCEL = 0x106,    /* transfer abandoned (verification failed, stall, shutdown) */
	NET_ERR_BUSY = 0x107,      /* transfer refused: too many at once */
	NET_ERR_MISBEHAVED = 0x108, /* misbehaving peer: disconnected and banned (below) */
};

/* ---- limits (docs/peer-protocol.md, "Limits") ----
 * Connections: an Initial packet that would open an inbound connection beyond NET_MAX_IN, beyond
 * NET_MAX_IN_PER_IP from one source (an IPv4 address, an IPv6 /64), or while NET_MAX_HANDSHAKING
 * inbound connections are still in their handshake, is answered with a stateless
 * CONNECTION_CLOSE (transport error CONNECTION_REFUSED, reason "busy") before any TLS work and
 * counted in conns_refused. We dial at most NET_MAX_OUT connections. 127.0.0.1 and ::1 (this host:
 * every local daemon dials from there) are exempt from the per-source limit and from address
 * bans; other loopback addresses are not.
 *
 * Rate: the frames a peer sends on its message streams pass a token bucket per connection,
 * NET_RATE_FRAMES frames/s (burst NET_RATE_FRAMES_BURST) and NET_RATE_BYTES bytes/s (burst
 * NET_RATE_BYTES_BURST). Frames over it are dropped unread (frames_rate_limited); every second in
 * which some were dropped costs NET_PENALTY_FLOOD.
 *
 * Misbehaviour: each connection has a score that decays by NET_SCORE_DECAY points per second
 * (kept for its key when it closes, and restored when the key connects again).
 * Malformed frames cost NET_PENALTY_FRAME (net.c: framing on any stream, frames a transfer
 * callback refused), forged or badly signed messages NET_PENALTY_MESSAGE (the gossip plane calls
 * net_peer_penalize). At NET_BAN_SCORE the connection is closed with NET_ERR_MISBEHAVED
 * (peers_misbehaved) and both the node key and the source address are banned: inbound
 * connections from the address are refused like those over a limit (reason "banned"), a
 * handshake with the key is closed with NET_ERR_MISBEHAVED, and we do not dial either (all
 * counted in conns_banned). A ban lasts NET_BAN_MIN_MS, doubled for each further ban of the same
 * key or address up to NET_BAN_MAX_MS; an offender banned for NET_BAN_MAX_MS ago and not since
 * starts over. At most NET_MAX_BANS are kept (the one expiring first is forgotten). */
#define NET_MAX_IN 128
#define NET_MAX_IN_PER_IP 8
#define NET_MAX_OUT 64
#define NET_MAX_HANDSHAKING 32
#define NET_RATE_FRAMES 200
#define NET_RATE_FRAMES_BURST 400
#define NET_RATE_BYTES (1u << 20)
#define NET_RATE_BYTES_BURST (4u << 20)
#define NET_SCORE_DECAY 1
#define NET_BAN_SCORE 100
#define NET_PENALTY_FRAME 20
#define NET_PENALTY_MESSAGE 10
#define NET_PENALTY_FLOOD 10
#define NET_BAN_MIN_MS 60000
#define NET_BAN_MAX_MS 3600000
#define NET_MAX_BANS 1024

/* ---- transfer streams ----
 * A transfer is one bidirectional QUIC stream opened by the requester. Both directions carry
 * frames of the same codec, each at most NET_XFER_MAX_FRAME bytes of body; net.c only moves
 * frames and checks their length headers. A side that sends its last frame calls
 * net_xfer_finish (FIN); either side may abort with net_xfer_reset. Each peer accepts at most
 * NET_XFER_MAX_IN concurrent transfer streams opened by the other side (the QUIC stream limit);
 * a further net_xfer_open fails with ME_EBUSY until one has closed on both ends and the peer's
 * MAX_STREAMS has arrived (about one round trip after `closed`: retry later, there is no
 * callback for it). Data queued on a transfer is written after the gossip stream's, so a slow
 * transfer never delays gossip; transfers with data share the rest round robin.
 *
 * Callbacks: every transfer callback (and xfer_accept) runs from the event loop, never inside
 * ngtcp2 or inside another net call, so any net function may be called from them, including
 * net_xfer_reset/send/finish on this or another transfer and net_peer_close. A malformed or
 * oversized frame, a frame cut short by FIN, or a `frame` callback returning < 0 resets that
 * stream only, with NET_ERR_FRAME (counted in frames_rejected); the connection stays up.
 *
 * `closed` comes exactly once for every transfer that has callbacks (opened by us, or accepted),
 * and nothing after it:
 *   0 / "done"                    both directions finished and acknowledged;
 *   our code / "reset"            after net_xfer_reset (also NET_ERR_FRAME / the reason, when
 *                                 we rejected the peer's frame);
 *   the peer's code / "reset by the peer"
 *                                 the peer reset it (NET_ERR_BUSY when it refused the stream);
 *   NET_ERR_CANCEL / "the peer stopped reading"
 *                                 STOP_SENDING without RESET_STREAM (not sent by net.c);
 *   a code / "connection lost: ..."
 *                                 the connection is gone: the application code it was closed
 *                                 with by either side (NET_ERR_SHUTDOWN from net_free, a peer
 *                                 shutting down, ...), else NET_ERR_SHUTDOWN (idle timeout,
 *                                 transport error). After net_free (or any connection loss),
 *                                 these come from the loop's close callbacks: run the loop. */
#define NET_XFER_MAX_FRAME ((1u << 20) + 4096) /* largest frame body on a transfer stream */
#define NET_XFER_MAX_IN 4                /* concurrent transfers a peer may open to us */
#define NET_XFER_LOWAT (256u * 1024)     /* `writable` fires when queued data drops below */
#define NET_XFER_MAX_QUEUE (4u << 20)    /* net_xfer_send refuses beyond this (ME_EBUSY) */

struct net_xfer;

struct net_xfer_callbacks {
	/* One complete frame body. Returning < 0 resets the stream with NET_ERR_FRAME. */
	int (*frame)(void *ud, struct net_xfer *x, const uint8_t *body, size_t len);
	/* The queue dropped below NET_XFER_LOWAT after being at or above it, or net_xfer_want_
	 * writable was called: send more. Never called from inside another net call. */
	void (*writable)(void *ud, struct net_xfer *x);
	/* The peer finished its direction (FIN after its last frame). Optional. */
	void (*eof)(void *ud, struct net_xfer *x);
	/* Final: the stream is closed in both directions, reset by either side, or the connection
	 * is gone. app_error is 0 after a clean close (both FINs, everything acknowledged). x is
	 * freed when this returns; it must not be used afterwards, and no other callback follows. */
	void (*closed)(void *ud, struct net_xfer *x, uint64_t app_error, const char *why);
};

/* Opens a transfer stream to p. Nothing goes on the wire (and the peer sees nothing) until the
 * first frame is sent. ME_EBUSY when the peer's stream limit is reached, ME_ECONN when p is not
 * up. May be called from any callback, including net's gossip `frame`. */
int net_xfer_open(struct peer *p, const struct net_xfer_callbacks *cb, void *ud,
		  struct net_xfer **out);
/* Sets the callbacks of a stream the peer opened (from the accept callback). */
void net_xfer_set_callbacks(struct net_xfer *x, const struct net_xfer_callbacks *cb, void *ud);
/* Queues one frame (header included, body <= NET_XFER_MAX_FRAME; the header is not checked).
 * ME_ETOOBIG when len exceeds that, ME_EBUSY when more than NET_XFER_MAX_QUEUE bytes would be
 * queued, ME_ECONN after finish/reset, once the peer reset the stream, or when the connection
 * is gone. Keep sending while net_xfer_queued() < NET_XFER_LOWAT, then wait for `writable`. */
int net_xfer_send(struct net_xfer *x, const void *frame, size_t len);
/* Bytes queued and not yet acknowledged. */
size_t net_xfer_queued(const struct net_xfer *x);
/* Asks for one `writable` callback as soon as the queue is below NET_XFER_LOWAT (at once,
 * from the event loop, when it already is). */
void net_xfer_want_writable(struct net_xfer *x);
/* Ends our direction once everything queued is sent (FIN). */
int net_xfer_finish(struct net_xfer *x);
/* Aborts both directions with app_error (RESET_STREAM + STOP_SENDING; 0 is sent as
 * NET_ERR_CANCEL); `closed` follows from the event loop with that code, whatever else happened
 * meanwhile. Frames not yet delivered are dropped. Further calls are no-ops. */
void net_xfer_reset(struct net_xfer *x, uint64_t app_error);
struct peer *net_xfer_peer(const struct net_xfer *x);
/* Bytes of frames delivered to `frame` / queued by net_xfer_send (headers included). */
uint64_t net_xfer_bytes_in(const struct net_xfer *x);
uint64_t net_xfer_bytes_out(const struct net_xfer *x);

struct net_callbacks {
	/* A connection finished its handshake and is the one kept for this node. */
	void (*peer_up)(void *ud, struct peer *p);
	/* A connection that was up is gone. */
	void (*peer_down)(void *ud, struct peer *p, const char *why);
	/* One frame body from p. Returning < 0 shuts the stream (NET_ERR_FRAME). */
	int (*frame)(void *ud, struct peer *p, const uint8_t *body, size_t len);
	/* The peer opened a transfer stream: set its callbacks with net_xfer_set_callbacks and
	 * return 0, or return < 0 to refuse it (reset with NET_ERR_BUSY; x is freed and no
	 * callback of it runs). NULL refuses all, and so does returning 0 without a `frame`
	 * callback. Called from the event loop, never inside ngtcp2's callbacks, before any of
	 * the stream's frames is delivered. Streams opened on a connection that is not the one
	 * kept for that node are refused without asking. */
	int (*xfer_accept)(void *xfer_ud, struct peer *p, struct net_xfer *x);
	void *ud;      /* for peer_up, peer_down, frame */
	void *xfer_ud; /* for xfer_accept */
};

struct tls_ctx;

int net_init(struct net **out, uv_loop_t *loop, const struct me_keypair *kp, struct tls_ctx *tls,
	     const struct me_sockaddr *addrs, size_t naddrs, const struct net_callbacks *cb,
	     char *err, size_t errsz);
/* Sends CONNECTION_CLOSE on every connection and closes all handles; memory is released from
 * close callbacks (run the loop afterwards), and open transfers get `closed` (NET_ERR_SHUTDOWN)
 * from there too. NULL-safe. */
void net_free(struct net *n);

/* Keeps a connection to this node: dials now if none, and after a loss re-dials with
 * exponential backoff and jitter (NET_BACKOFF_MIN_MS .. NET_BACKOFF_MAX_MS). Updating the
 * address of a known target is allowed. */
int net_want(struct net *n, const uint8_t pk[ME_PK_LEN], const struct me_sockaddr *addr);
/* Stops keeping a connection (an existing one stays up). */
void net_unwant(struct net *n, const uint8_t pk[ME_PK_LEN]);
size_t net_nwanted(const struct net *n);
/* True when we keep a connection to pk but none is up or being made and the last attempt
 * failed (it waits in backoff). */
int net_target_unreachable(const struct net *n, const uint8_t pk[ME_PK_LEN]);

/* Queues one frame (header included) to a peer. ME_EBUSY when the peer's queue is full. */
int net_send(struct peer *p, const void *frame, size_t len);

/* Live, identified peers. */
size_t net_npeers(const struct net *n);
struct peer *net_peer_first(struct net *n);
struct peer *net_peer_next(struct peer *p);
struct peer *net_peer_find(struct net *n, const uint8_t pk[ME_PK_LEN]);

const uint8_t *net_peer_pk(const struct peer *p);
const char *net_peer_did(const struct peer *p);
const char *net_peer_addr(const struct peer *p); /* "ip:port" of the remote end */
int net_peer_outbound(const struct peer *p);
int64_t net_peer_since_ms(const struct peer *p); /* wall clock, ms */
uint64_t net_peer_rtt_us(const struct peer *p);
/* Closes a peer's connection with an application error code. */
void net_peer_close(struct peer *p, uint64_t app_error, const char *why);
/* Adds points to p's misbehaviour score (above); at NET_BAN_SCORE p is banned and its
 * connection closed from the event loop (nothing more it sends is delivered). why says what p
 * did (logged). Safe from any net callback; a no-op once p is closing. */
void net_peer_penalize(struct peer *p, int points, const char *why);

/* Counters for node status. */
struct net_stats {
	uint64_t handshakes_failed;
	uint64_t frames_rejected;
	uint64_t pkts_in, pkts_out;
	uint64_t bytes_in, bytes_out;
	uint64_t xfers_opened, xfers_accepted, xfers_refused; /* refused: by us, NET_ERR_BUSY */
	uint64_t xfer_bytes_in, xfer_bytes_out; /* transfer stream frames, headers included */
	uint64_t conns_refused;       /* inbound connections over a limit (above) */
	uint64_t conns_banned;        /* connections refused or closed because of a ban */
	uint64_t frames_rate_limited; /* frames dropped by the per-peer rate limit */
	uint64_t peers_misbehaved;    /* connections closed with NET_ERR_MISBEHAVED */
	uint64_t bans_active;         /* keys and addresses banned now (not a counter) */
};
void net_get_stats(const struct net *n, struct net_stats *out);

#endif
