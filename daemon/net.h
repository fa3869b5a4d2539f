/* The network plane: QUIC v1 (ngtcp2) on libuv UDP sockets, TLS 1.3 through tls.c.
 *
 * One connection per pair of nodes. The peer's identity is its certificate's Ed25519 key, fixed
 * by the handshake. Each side sends its messages on one unidirectional stream as length-prefixed
 * msgpack frames (common/frame.h); a malformed or oversized frame shuts that stream with
 * NET_ERR_FRAME, never the daemon. After every read and timer event pending packets are written
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

/* Application error codes in CONNECTION_CLOSE / STOP_SENDING. */
enum {
	NET_ERR_NONE = 0,
	NET_ERR_FRAME = 0x101,     /* malformed or oversized frame */
	NET_ERR_DUPLICATE = 0x102, /* another connection to the same node wins */
	NET_ERR_SELF = 0x103,      /* dialed ourselves */
	NET_ERR_SHUTDOWN = 0x104,
	NET_ERR_POLICY = 0x105,    /* misbehaving peer */
};

struct net;
struct peer;

struct net_callbacks {
	/* A connection finished its handshake and is the one kept for this node. */
	void (*peer_up)(void *ud, struct peer *p);
	/* A connection that was up is gone. */
	void (*peer_down)(void *ud, struct peer *p, const char *why);
	/* One frame body from p. Returning < 0 shuts the stream (NET_ERR_FRAME). */
	int (*frame)(void *ud, struct peer *p, const uint8_t *body, size_t len);
	void *ud;
};

struct tls_ctx;

int net_init(struct net **out, uv_loop_t *loop, const struct me_keypair *kp, struct tls_ctx *tls,
	     const struct me_sockaddr *addrs, size_t naddrs, const struct net_callbacks *cb,
	     char *err, size_t errsz);
/* Sends CONNECTION_CLOSE on every connection and closes all handles; memory is released from
 * close callbacks (run the loop afterwards). NULL-safe. */
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

/* Counters for node status. */
struct net_stats {
	uint64_t handshakes_failed;
	uint64_t frames_rejected;
	uint64_t pkts_in, pkts_out;
	uint64_t bytes_in, bytes_out;
};
void net_get_stats(const struct net *n, struct net_stats *out);

#endif
