/* me-peer internals shared by mepeer.c (options, connections, gossip kinds) and mepeer-xfer.c
 * (transfer streams: fetching from a node, serving a repository honestly or not). */
#ifndef ME_MEPEER_H
#define ME_MEPEER_H

#include <stdint.h>
#include <stdio.h>

#include <uv.h>

#include "common/gossip_msg.h"
#include "common/keys.h"
#include "daemon/config.h"
#include "daemon/net.h"

#define MEPEER_MAX_DIALS 4
#define MEPEER_MAX_HAVES 256
#define MEPEER_MAX_STREAMS 8

/* Transfer options (see usage() in mepeer.c). */
struct xopts {
	/* requesting */
	const char *fetch_id;   /* --fetch ID ("random": a valid id nobody has) */
	const char *out;        /* --out FILE: the bundle received (stream i > 0: FILE.i) */
	uint8_t haves[MEPEER_MAX_HAVES][ME_OID_LEN];
	size_t nhaves;
	int has_resume;
	uint8_t resume_digest[XMSG_DIGEST_LEN];
	uint64_t resume_offset;
	unsigned streams;       /* --streams N (default 1) */
	int xsend;              /* --xsend KIND: what the opened streams carry (index) */
	/* serving */
	const char *serve_list; /* --serve MODE[,MODE...]: one per announced state */
	const char *repo_path;  /* --repo-path DIR: a git repository we are the creator of */
	const char *relay_id;   /* --relay ID: a repository learnt by gossip from a dialed node */
	const char *squat_id;   /* --squat ID: announce --repo-path under this id, as its creator */
	uint64_t seq;           /* --seq N: seq of our signed state (default: now in ms) */
	uint64_t max_bundle;    /* largest bundle held in memory */
	const char *bundle_file; /* --bundle-file FILE: what --serve file sends */
};

struct xstate;

struct app {
	uv_loop_t loop;
	struct net *net;
	struct tls_ctx *tls;
	struct me_keypair kp;
	uv_timer_t wait_timer, poll_timer;
	uv_signal_t sigint, sigterm, sigusr1;

	/* options */
	const char *root, *key_from, *alias, *kind_name;
	struct me_sockaddr addr;
	struct me_bootstrap dial[MEPEER_MAX_DIALS];
	size_t ndial;
	int dialing, listening;
	int kind;
	unsigned long count;
	uint64_t wait_ms;
	uint8_t imp_pk[ME_PK_LEN];
	char imp_did[ME_DID_KEY_SIZE];
	struct xopts xo;

	/* state */
	int target_up[MEPEER_MAX_DIALS], sent[MEPEER_MAX_DIALS], stopping;
	int exit_code;
	struct xstate *xs;
};

void mepeer_stop(struct app *a, int code);
/* Appends one framed envelope signed by our key. */
int mepeer_envelope(const struct me_keypair *kp, uint64_t ts, unsigned ttl, unsigned type,
		    const msgpack_sbuffer *pl, msgpack_sbuffer *out);
/* Appends our honest NodeAnnouncement (framed). */
int mepeer_honest_node(const struct app *a, uint64_t ts, msgpack_sbuffer *out);
/* Index of the dialed node p is (-1: not one we dialed). */
int mepeer_target(const struct app *a, const struct peer *p);

/* ---- mepeer-xfer.c ---- */
int xfer_xsend_parse(const char *name);   /* -1 when unknown */
int xfer_serve_parse(const char *name);   /* -1 when unknown */
struct serve_mode;
/* "MODE,MODE,...": 0, or -1 for an unknown mode or more than max. out may be NULL. */
int xfer_modes_parse(const char *list, const struct serve_mode **out, size_t max, size_t *n);
void xfer_usage(FILE *f);
int xfer_enabled(const struct app *a);
/* Before the loop: opens --repo-path, signs its state, prepares keys. 0 or -1 (message
 * printed). */
int xfer_init(struct app *a);
/* A dialed node is up: announce what we serve to it, open the requested streams. */
void xfer_target_up(struct app *a, struct peer *p, int idx);
/* net_callbacks.xfer_accept (xfer_ud = the app). */
int xfer_accept(void *ud, struct peer *p, struct net_xfer *x);
/* A gossip message from p (already decoded, signature checked). */
void xfer_gossip(struct app *a, struct peer *p, const struct gmsg_envelope *e);
/* SIGUSR1: sign a newer state of the repository (re-read) and announce it; its requests are
 * served with the next --serve mode. */
void xfer_signal(struct app *a);
void xfer_free(struct app *a);

#endif
