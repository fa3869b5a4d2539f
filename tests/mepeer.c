/* me-peer: a hostile (or honest) test peer for the integration tests. It runs the real transport
 * (net.c, tls.c) with its own identity, sends one kind of gossip to the nodes it dials, and
 * requests or serves repositories on transfer streams (mepeer-xfer.c).
 *
 *   me-peer --root DIR --addr IP:PORT --dial DID@IP:PORT [--dial ...] [--send KIND] [...]
 *   me-peer --root DIR --addr IP:PORT --listen [--wait SEC]
 *
 *   --root DIR          identity (DIR/keypair, created when absent), DIR/certs, scratch files
 *   --key-from DIR      use the keypair of DIR instead (DIR/keypair must exist)
 *   --dial DID@IP:PORT  a node to connect to (up to 4; gossip and announcements go to each,
 *                       --fetch streams to the first)
 *   --impersonate X     the node forged content claims: a did:key, or a data root whose public
 *                       key is used (its secret key is never used); default: a random key
 *   --alias NAME        alias in the NodeAnnouncements sent (default "mepeer")
 *   --count N           announcements for "flood" (default 100)
 *   --repeat N          send the frames of KIND N times over (default 1): e.g. forged-sig
 *                       --repeat 20 is twenty badly signed announcements
 *   --rate R            then keep sending copies of them, R frames per second, until the wait
 *                       ends (what the queue does not take is skipped; "flooded N" at the end)
 *   --wait SEC          how long to wait for the connection, then how long to keep it open
 *                       once up (default 5; decimals allowed)
 *   --log-level LEVEL   transport log on stderr (default info)
 *
 * KIND: honest-node, forged-node, forged-sig, replay, future, stale, ttl (alias ttl255),
 * ttl-raw255, oversize, garbage, forged-refstate, flood, none (only connect; the default).
 *
 * Transfers (docs/peer-protocol.md section 3; the modes are listed by --help):
 *   --fetch ID          request ID (or "random": a valid id nobody has) from the first dialed
 *                       node on --streams N streams (default 1, at most 8), each carrying
 *                       --xsend XSEND (default "request"); --have HEX (repeatable) and
 *                       --resume DIGEST:OFFSET go into the request; --out FILE receives the
 *                       bundle (stream i > 0: FILE.i). One JSON line per stream when it
 *                       closes; me-peer exits once every stream has closed.
 *   --repo-path DIR     serve DIR, a git repository we are the creator of (did:repo from its
 *                       root commit and our key, state signed by us, --seq N to fix its seq)
 *   --squat ID          with --repo-path: announce it under ID (someone else's did:repo), with
 *                       us as the creator: the binding to the root commit cannot hold
 *   --relay ID          serve ID, learnt by gossip from a dialed node (the creator's signed
 *                       state; a full bundle fetched from that node)
 *   --serve MODE,...    how requests are answered: the first state announced with the first
 *                       mode; SIGUSR1 signs a newer state (re-reading DIR), announces it and
 *                       serves it with the next mode (the last repeats). Default "honest".
 *   --max-bundle BYTES  largest bundle held or accepted (default 64 MiB)
 *   --bundle-file FILE  what the serve mode "file" sends as the bundle (any bytes; the Start
 *                       carries our honest signed state)
 *
 * stdout, one line per event (line-buffered):
 *   me DID                              first line: our own did:key
 *   listening IP:PORT
 *   up DID ADDR inbound|outbound
 *   sent KIND FRAMES BYTES              what was queued to a dialed node
 *   flooded FRAMES                      copies sent by --rate, when me-peer stops
 *   frame node|repo|type=N ORIGIN_DID from PEER_DID [alias=... | repos=N]
 *   frame invalid ERROR from PEER_DID
 *   down DID REASON
 *   repo ID NAME seq=N refs=N head=REF  the repository we created (--repo-path)
 *   learnt / relaying / announced ...   the repository we relay, our announcements
 *   request ID haves=N resume=0|1 offset=N mode=MODE from DID
 *   start / served / cut / trickling MODE ... what we answered
 *   closed serve MODE app_error=0xN sent=N from DID (WHY)
 *   opened stream N XSEND to DID
 *   {"stream":N,"result":...}           a requested stream closed (JSON)
 * Exit: 0 done (after --wait, every --fetch stream closed, or SIGINT/SIGTERM once up), 1 no
 * dialed node came up (or a handshake failed), 2 usage, 3 a dialed node closed the connection
 * (gossip kinds only; reason on stderr). */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>
#include <uv.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/gossip_msg.h"
#include "common/ids.h"
#include "common/keys.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/config.h"
#include "daemon/net.h"
#include "daemon/tls.h"
#include "tests/mepeer.h"

#define MIN_MS 60000LL
#define OVERSIZE_LEN (16u << 20)
#define GARBAGE_LEN 4096

enum kind {
	K_NONE,
	K_HONEST,
	K_FORGED_NODE,
	K_FORGED_SIG,
	K_REPLAY,
	K_FUTURE,
	K_STALE,
	K_TTL,
	K_TTL_RAW,
	K_OVERSIZE,
	K_GARBAGE,
	K_FORGED_REFSTATE,
	K_FLOOD,
};

static const struct {
	const char *name;
	enum kind kind;
} kinds[] = {
	{ "none", K_NONE },
	{ "honest-node", K_HONEST },
	{ "forged-node", K_FORGED_NODE },
	{ "forged-sig", K_FORGED_SIG },
	{ "replay", K_REPLAY },
	{ "future", K_FUTURE },
	{ "stale", K_STALE },
	{ "ttl", K_TTL },
	{ "ttl255", K_TTL },
	{ "ttl-raw255", K_TTL_RAW },
	{ "oversize", K_OVERSIZE },
	{ "garbage", K_GARBAGE },
	{ "forged-refstate", K_FORGED_REFSTATE },
	{ "flood", K_FLOOD },
};

static int usage(void)
{
	fprintf(stderr,
		"usage: me-peer --root DIR --addr IP:PORT --dial DID@IP:PORT [--dial ...]\n"
		"               [--send KIND] [--key-from DIR] [--impersonate DID|DIR]\n"
		"               [--alias NAME] [--count N] [--repeat N] [--rate R]\n"
		"               [--wait SEC] [--log-level LEVEL]\n"
		"               [--fetch ID|random [--streams N] [--xsend XSEND] [--have HEX]...\n"
		"                [--resume DIGEST:OFFSET] [--out FILE]]\n"
		"               [--repo-path DIR [--squat ID] | --relay ID] [--serve MODE[,...]]\n"
		"               [--seq N]\n"
		"               [--max-bundle BYTES] [--bundle-file FILE]\n"
		"       me-peer --root DIR --addr IP:PORT --listen [--wait SEC]\n"
		"KIND: honest-node forged-node forged-sig replay future stale ttl ttl-raw255\n"
		"      oversize garbage forged-refstate flood none\n");
	xfer_usage(stderr);
	return 2;
}

void mepeer_stop(struct app *a, int code)
{
	if (a->stopping)
		return;
	a->stopping = 1;
	a->exit_code = code;
	uv_stop(&a->loop);
}

/* ---- building messages ---- */

/* Appends one framed envelope signed by kp. */
int mepeer_envelope(const struct me_keypair *kp, uint64_t ts, unsigned ttl, unsigned type,
			const msgpack_sbuffer *pl, msgpack_sbuffer *out)
{
	size_t start = out->size;
	int rc;

	me_frame_begin(out);
	rc = gmsg_envelope_encode(kp, ts, ttl, type, pl->data, pl->size, out);
	if (rc == 0)
		rc = me_frame_end(out, start, NET_MAX_FRAME);
	return rc;
}

static int node_payload(const struct app *a, const uint8_t pk[ME_PK_LEN], const char *alias,
			msgpack_sbuffer *pl)
{
	struct gmsg_node_ann n;

	memset(&n, 0, sizeof(n));
	memcpy(n.pk, pk, ME_PK_LEN);
	n.alias = gmsg_str(alias);
	if (gmsg_addr_parse(a->addr.text, strlen(a->addr.text), NULL, NULL) == 0) {
		n.addrs[0] = gmsg_str(a->addr.text);
		n.naddrs = 1;
	}
	n.node_type = 1;
	n.version = gmsg_str("me-peer");
	msgpack_sbuffer_clear(pl);
	return gmsg_node_ann_encode(&n, pl);
}

/* One honest NodeAnnouncement of ourselves, framed, appended to out. */
static int honest_node(const struct app *a, uint64_t ts, unsigned ttl, const char *alias,
		       msgpack_sbuffer *out)
{
	msgpack_sbuffer pl;
	int rc;

	msgpack_sbuffer_init(&pl);
	rc = node_payload(a, a->kp.pk, alias, &pl);
	if (rc == 0)
		rc = mepeer_envelope(&a->kp, ts, ttl, GMSG_NODE_ANN, &pl, out);
	msgpack_sbuffer_destroy(&pl);
	return rc;
}

/* A repository whose creator is creator_pk, with one ref, its ref state signed by signer. */
static int make_repo(const struct me_keypair *signer, const uint8_t creator_pk[ME_PK_LEN],
		     const char *name, char id[ME_DID_REPO_SIZE], struct gmsg_ref *ref,
		     struct gmsg_repo *r)
{
	uint8_t root[ME_OID_LEN];
	int rc;

	randombytes_buf(root, sizeof(root));
	randombytes_buf(ref->oid, sizeof(ref->oid));
	ref->name = gmsg_str("refs/heads/main");
	if ((rc = me_did_repo_compute(root, creator_pk, id, ME_DID_REPO_SIZE)) < 0)
		return rc;
	memset(r, 0, sizeof(*r));
	r->id = gmsg_str(id);
	r->name = gmsg_str(name);
	r->description = gmsg_str("made by me-peer");
	memcpy(r->creator_pk, creator_pk, ME_PK_LEN);
	r->refstate.repo_id = r->id;
	r->refstate.seq = (uint64_t)me_now_ms();
	r->refstate.head = gmsg_str("refs/heads/main");
	r->refstate.refs = ref;
	r->refstate.nrefs = 1;
	return gmsg_refstate_sign(signer, &r->refstate);
}

/* A RepoAnnouncement from us with two repositories: "mepeer-honest" (ours, validly signed) and
 * "mepeer-forged" (creator: the impersonated key, ref state signed by us). */
static int forged_refstate(const struct app *a, msgpack_sbuffer *out)
{
	char id[2][ME_DID_REPO_SIZE];
	struct gmsg_ref refs[2];
	struct gmsg_repo repos[2];
	struct gmsg_repo_ann ann = { repos, 2 };
	msgpack_sbuffer pl;
	int rc;

	if ((rc = make_repo(&a->kp, a->kp.pk, "mepeer-honest", id[0], &refs[0], &repos[0])) < 0 ||
	    (rc = make_repo(&a->kp, a->imp_pk, "mepeer-forged", id[1], &refs[1], &repos[1])) < 0)
		return rc;
	qsort(repos, 2, sizeof(repos[0]), gmsg_repo_cmp);
	msgpack_sbuffer_init(&pl);
	rc = gmsg_repo_ann_encode(&ann, &pl);
	if (rc == 0)
		rc = mepeer_envelope(&a->kp, (uint64_t)me_now_ms(), GMSG_MAX_TTL, GMSG_REPO_ANN, &pl,
				  out);
	msgpack_sbuffer_destroy(&pl);
	for (int i = 0; i < 2; i++)
		printf("repo %.*s %.*s creator %s\n", (int)repos[i].id.len, repos[i].id.ptr,
		       (int)repos[i].name.len, repos[i].name.ptr, memcmp(repos[i].creator_pk, a->kp.pk, ME_PK_LEN) == 0
		       ? a->kp.did : a->imp_did);
	return rc;
}

/* Builds the frames of the requested kind into out; *nframes is how many. */
static int build(const struct app *a, msgpack_sbuffer *out, unsigned long *nframes)
{
	uint64_t now = (uint64_t)me_now_ms();
	msgpack_sbuffer pl;
	int rc = 0;

	*nframes = 1;
	switch (a->kind) {
	case K_NONE:
		*nframes = 0;
		return 0;
	case K_HONEST:
		return honest_node(a, now, GMSG_MAX_TTL, a->alias, out);
	case K_FORGED_NODE:
		/* Announces the impersonated node, but the envelope is ours. */
		msgpack_sbuffer_init(&pl);
		rc = node_payload(a, a->imp_pk, a->alias, &pl);
		if (rc == 0)
			rc = mepeer_envelope(&a->kp, now, GMSG_MAX_TTL, GMSG_NODE_ANN, &pl, out);
		msgpack_sbuffer_destroy(&pl);
		return rc;
	case K_FORGED_SIG:
		if ((rc = honest_node(a, now, GMSG_MAX_TTL, a->alias, out)) == 0)
			out->data[out->size - 1] ^= 0x01; /* the signature is the envelope's tail */
		return rc;
	case K_REPLAY: {
		/* The newest first, then one a minute older: still in the age window, so only the
		 * per-origin ordering can refuse it. */
		char older[GMSG_MAX_ALIAS + 1];
		snprintf(older, sizeof(older), "%.56s-replay", a->alias);
		*nframes = 2;
		if ((rc = honest_node(a, now, GMSG_MAX_TTL, a->alias, out)) == 0)
			rc = honest_node(a, now - MIN_MS, GMSG_MAX_TTL, older, out);
		return rc;
	}
	case K_FUTURE:
		return honest_node(a, now + 11 * MIN_MS, GMSG_MAX_TTL, a->alias, out);
	case K_STALE:
		return honest_node(a, now - 6 * MIN_MS, GMSG_MAX_TTL, a->alias, out);
	case K_TTL:
		*nframes = 2;
		if ((rc = honest_node(a, now, 100, a->alias, out)) == 0)
			rc = honest_node(a, now + 1, GMSG_MAX_TTL + 1, a->alias, out);
		return rc;
	case K_TTL_RAW:
		/* 0xff where the ttl fixint goes: a negative fixint, so the envelope is malformed. */
		if ((rc = honest_node(a, now, GMSG_MAX_TTL, a->alias, out)) == 0)
			out->data[ME_FRAME_HDR + GMSG_TTL_OFFSET] = (char)0xff;
		return rc;
	case K_OVERSIZE: {
		uint8_t hdr[ME_FRAME_HDR] = { (uint8_t)(OVERSIZE_LEN >> 24),
					      (uint8_t)(OVERSIZE_LEN >> 16),
					      (uint8_t)(OVERSIZE_LEN >> 8), (uint8_t)OVERSIZE_LEN };
		uint8_t body[1024];
		randombytes_buf(body, sizeof(body));
		if (msgpack_sbuffer_write(out, (const char *)hdr, sizeof(hdr)) != 0 ||
		    msgpack_sbuffer_write(out, (const char *)body, sizeof(body)) != 0)
			return ME_ENOMEM;
		return 0;
	}
	case K_GARBAGE: {
		/* A well-formed header announcing the rest, then random bytes: never one canonical
		 * envelope, so the gossip plane refuses it as malformed. */
		uint8_t buf[GARBAGE_LEN];
		uint32_t n = GARBAGE_LEN - ME_FRAME_HDR;
		randombytes_buf(buf, sizeof(buf));
		buf[0] = (uint8_t)(n >> 24);
		buf[1] = (uint8_t)(n >> 16);
		buf[2] = (uint8_t)(n >> 8);
		buf[3] = (uint8_t)n;
		return msgpack_sbuffer_write(out, (const char *)buf, sizeof(buf)) != 0 ? ME_ENOMEM
										       : 0;
	}
	case K_FORGED_REFSTATE:
		return forged_refstate(a, out);
	case K_FLOOD:
		/* Distinct, increasing timestamps ending now: each one is new and in order. */
		*nframes = a->count;
		for (unsigned long i = 0; i < a->count && rc == 0; i++)
			rc = honest_node(a, now - (a->count - 1 - i), GMSG_MAX_TTL, a->alias, out);
		return rc;
	}
	return ME_EINVAL;
}

int mepeer_honest_node(const struct app *a, uint64_t ts, msgpack_sbuffer *out)
{
	return honest_node(a, ts, GMSG_MAX_TTL, a->alias, out);
}

/* --repeat and --rate */
static unsigned long opt_repeat = 1, opt_rate;
static msgpack_sbuffer flood_buf; /* the frames of KIND, once */
static unsigned long flood_nframes, flood_sent;
static uint64_t flood_done; /* frames due so far, sent or skipped */
static struct peer *flood_peer;
static uint64_t flood_start_ms;
static uv_timer_t flood_timer;

/* Sends copies of flood_buf to keep up with --rate. */
static void on_flood(uv_timer_t *t)
{
	(void)t;
	if (flood_peer == NULL || flood_nframes == 0)
		return;
	uint64_t due = (uint64_t)(me_mono_ms() - (int64_t)flood_start_ms) * opt_rate / 1000;
	while (flood_done + flood_nframes <= due) {
		flood_done += flood_nframes;
		if (net_send(flood_peer, flood_buf.data, flood_buf.size) < 0)
			continue; /* the queue is full: skipped */
		flood_sent += flood_nframes;
	}
}

static void send_kind(struct app *a, struct peer *p)
{
	msgpack_sbuffer out;
	unsigned long nframes = 0;
	int rc;

	msgpack_sbuffer_init(&out);
	rc = build(a, &out, &nframes);
	if (rc == 0 && (opt_rate > 0 || opt_repeat > 1)) {
		msgpack_sbuffer_init(&flood_buf);
		if (msgpack_sbuffer_write(&flood_buf, out.data, out.size) != 0)
			rc = ME_ENOMEM;
		flood_nframes = nframes;
		for (unsigned long i = 1; i < opt_repeat && rc == 0; i++)
			if (msgpack_sbuffer_write(&out, flood_buf.data, flood_buf.size) != 0)
				rc = ME_ENOMEM;
		nframes *= opt_repeat;
	}
	if (rc == 0 && out.size > 0)
		rc = net_send(p, out.data, out.size);
	if (rc < 0) {
		fprintf(stderr, "me-peer: cannot send %s: %s\n", a->kind_name, me_strerror(rc));
		msgpack_sbuffer_destroy(&out);
		mepeer_stop(a, 1);
		return;
	}
	printf("sent %s %lu %zu\n", a->kind_name, nframes, out.size);
	msgpack_sbuffer_destroy(&out);
	if (opt_rate > 0 && flood_nframes > 0) {
		flood_peer = p;
		flood_start_ms = (uint64_t)me_mono_ms();
		uv_timer_start(&flood_timer, on_flood, 10, 10);
	}
}

/* ---- network callbacks ---- */

static void on_wait(uv_timer_t *t);

int mepeer_target(const struct app *a, const struct peer *p)
{
	uint8_t pk[ME_PK_LEN];

	for (size_t i = 0; i < a->ndial; i++)
		if (me_did_key_parse(a->dial[i].did, pk) == 0 &&
		    memcmp(pk, net_peer_pk(p), ME_PK_LEN) == 0)
			return (int)i;
	return -1;
}

static int any_target_up(const struct app *a)
{
	for (size_t i = 0; i < a->ndial; i++)
		if (a->target_up[i])
			return 1;
	return 0;
}

static void on_peer_up(void *ud, struct peer *p)
{
	struct app *a = ud;
	int idx = mepeer_target(a, p);

	printf("up %s %s %s\n", net_peer_did(p), net_peer_addr(p),
	       net_peer_outbound(p) ? "outbound" : "inbound");
	if (idx < 0)
		return;
	a->target_up[idx] = 1;
	/* From now on the connection is kept open for --wait. */
	uv_timer_start(&a->wait_timer, on_wait, a->wait_ms, 0);
	if (!a->sent[idx]) {
		a->sent[idx] = 1;
		send_kind(a, p);
	}
	xfer_target_up(a, p, idx);
}

static void on_peer_down(void *ud, struct peer *p, const char *why)
{
	struct app *a = ud;
	int idx = mepeer_target(a, p);

	if (a->stopping)
		return;
	printf("down %s %s\n", net_peer_did(p), why);
	if (p == flood_peer)
		flood_peer = NULL;
	if (idx >= 0)
		a->target_up[idx] = 0;
	if (idx >= 0 && !xfer_enabled(a)) {
		fprintf(stderr, "me-peer: %s closed the connection: %s\n", net_peer_did(p), why);
		mepeer_stop(a, 3);
	}
}

static int on_frame(void *ud, struct peer *p, const uint8_t *body, size_t len)
{
	struct gmsg_envelope e;
	int rc = gmsg_envelope_decode(body, len, &e);

	if (rc < 0) {
		printf("frame invalid %s from %s\n", me_strerror(rc), net_peer_did(p));
		return 0;
	}
	if (e.type == GMSG_NODE_ANN) {
		struct gmsg_node_ann n;
		if (gmsg_node_ann_from_envelope(&e, &n) == 0)
			printf("frame node %s from %s alias=%.*s\n", e.origin_did, net_peer_did(p),
			       (int)n.alias.len, n.alias.ptr ? n.alias.ptr : "");
		else
			printf("frame node %s from %s invalid\n", e.origin_did, net_peer_did(p));
	} else if (e.type == GMSG_REPO_ANN) {
		struct gmsg_repo_ann r;
		if (gmsg_repo_ann_decode(e.payload, e.payload_len, &r) == 0) {
			printf("frame repo %s from %s repos=%zu\n", e.origin_did, net_peer_did(p),
			       r.nrepos);
			gmsg_repo_ann_free(&r);
		} else {
			printf("frame repo %s from %s invalid\n", e.origin_did, net_peer_did(p));
		}
	} else {
		printf("frame type=%u %s from %s\n", e.type, e.origin_did, net_peer_did(p));
	}
	xfer_gossip(ud, p, &e);
	return 0;
}

/* ---- timers and signals ---- */

static void on_wait(uv_timer_t *t)
{
	struct app *a = t->data;

	if (a->dialing && !any_target_up(a)) {
		fprintf(stderr, "me-peer: no connection to %s within the wait\n", a->dial[0].did);
		mepeer_stop(a, 1);
		return;
	}
	mepeer_stop(a, 0);
}

static void on_poll(uv_timer_t *t)
{
	struct app *a = t->data;
	struct net_stats st;

	if (!a->dialing || any_target_up(a))
		return;
	net_get_stats(a->net, &st);
	if (st.handshakes_failed > 0) {
		fprintf(stderr, "me-peer: the handshake with %s failed\n", a->dial[0].addr.text);
		mepeer_stop(a, 1);
	}
}

static void on_signal(uv_signal_t *h, int signum)
{
	struct app *a = h->data;
	if (signum == SIGUSR1) {
		xfer_signal(a);
		return;
	}
	mepeer_stop(a, a->dialing && !any_target_up(a) ? 1 : 0);
}

/* ---- main ---- */

static int parse_wait(const char *s, uint64_t *ms)
{
	char *end;
	double v = strtod(s, &end);
	if (*s == '\0' || *end != '\0' || !(v >= 0 && v <= 86400))
		return -1;
	*ms = (uint64_t)(v * 1000.0);
	return 0;
}

static int load_impersonated(struct app *a, const char *s)
{
	if (strncmp(s, "did:key:", 8) == 0) {
		if (me_did_key_parse(s, a->imp_pk) < 0)
			return -1;
	} else {
		struct me_keypair other;
		int rc = me_keypair_load(s, &other);
		if (rc < 0) {
			fprintf(stderr, "me-peer: --impersonate %s: %s\n", s, me_strerror(rc));
			return -1;
		}
		memcpy(a->imp_pk, other.pk, ME_PK_LEN);
		me_keypair_wipe(&other); /* only the public half is used */
	}
	return me_did_key_from_pk(a->imp_pk, a->imp_did, sizeof(a->imp_did)) < 0 ? -1 : 0;
}

static int parse_hex(const char *s, uint8_t *out, size_t n)
{
	size_t got = 0;
	if (strlen(s) != 2 * n || sodium_hex2bin(out, n, s, 2 * n, NULL, &got, NULL) != 0 ||
	    got != n)
		return -1;
	return 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	*out = v;
	return 0;
}

static int parse_args(struct app *a, int argc, char **argv)
{
	enum { O_ROOT = 256, O_ADDR, O_KEYFROM, O_IMP, O_DIAL, O_SEND, O_COUNT, O_WAIT, O_LISTEN,
	       O_ALIAS, O_LOG, O_FETCH, O_OUT, O_HAVE, O_RESUME, O_STREAMS, O_XSEND, O_SERVE,
	       O_REPO, O_RELAY, O_SEQ, O_MAXB, O_SQUAT, O_REPEAT, O_RATE, O_BFILE };
	static const struct option opts[] = {
		{ "root", required_argument, NULL, O_ROOT },
		{ "addr", required_argument, NULL, O_ADDR },
		{ "key-from", required_argument, NULL, O_KEYFROM },
		{ "impersonate", required_argument, NULL, O_IMP },
		{ "dial", required_argument, NULL, O_DIAL },
		{ "send", required_argument, NULL, O_SEND },
		{ "count", required_argument, NULL, O_COUNT },
		{ "wait", required_argument, NULL, O_WAIT },
		{ "listen", no_argument, NULL, O_LISTEN },
		{ "alias", required_argument, NULL, O_ALIAS },
		{ "log-level", required_argument, NULL, O_LOG },
		{ "fetch", required_argument, NULL, O_FETCH },
		{ "out", required_argument, NULL, O_OUT },
		{ "have", required_argument, NULL, O_HAVE },
		{ "resume", required_argument, NULL, O_RESUME },
		{ "streams", required_argument, NULL, O_STREAMS },
		{ "xsend", required_argument, NULL, O_XSEND },
		{ "serve", required_argument, NULL, O_SERVE },
		{ "repo-path", required_argument, NULL, O_REPO },
		{ "relay", required_argument, NULL, O_RELAY },
		{ "seq", required_argument, NULL, O_SEQ },
		{ "max-bundle", required_argument, NULL, O_MAXB },
		{ "squat", required_argument, NULL, O_SQUAT },
		{ "repeat", required_argument, NULL, O_REPEAT },
		{ "rate", required_argument, NULL, O_RATE },
		{ "bundle-file", required_argument, NULL, O_BFILE },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *imp = NULL;
	int c, have_addr = 0, lvl;
	char *end;

	a->alias = "mepeer";
	a->count = 100;
	a->wait_ms = 5000;
	a->xo.streams = 1;
	a->xo.max_bundle = 64u << 20;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case O_ROOT:
			a->root = optarg;
			break;
		case O_ADDR:
			if (me_sockaddr_parse(optarg, &a->addr) < 0)
				return usage();
			have_addr = 1;
			break;
		case O_KEYFROM:
			a->key_from = optarg;
			break;
		case O_IMP:
			imp = optarg;
			break;
		case O_DIAL:
			if (a->ndial == MEPEER_MAX_DIALS ||
			    me_bootstrap_parse(optarg, &a->dial[a->ndial]) < 0) {
				fprintf(stderr, "me-peer: --dial wants DID@IP:PORT (at most %d)\n",
					MEPEER_MAX_DIALS);
				return usage();
			}
			a->ndial++;
			a->dialing = 1;
			break;
		case O_SEND:
			a->kind_name = optarg;
			break;
		case O_COUNT:
			a->count = strtoul(optarg, &end, 10);
			if (*optarg < '0' || *optarg > '9' || *end != '\0' || a->count < 1 ||
			    a->count > 100000)
				return usage();
			break;
		case O_REPEAT:
		case O_RATE: {
			uint64_t v;
			if (parse_u64(optarg, &v) < 0 || v < 1 || v > 1000000)
				return usage();
			if (c == O_REPEAT)
				opt_repeat = (unsigned long)v;
			else
				opt_rate = (unsigned long)v;
			break;
		}
		case O_WAIT:
			if (parse_wait(optarg, &a->wait_ms) < 0)
				return usage();
			break;
		case O_LISTEN:
			a->listening = 1;
			break;
		case O_ALIAS:
			a->alias = optarg;
			break;
		case O_LOG:
			if ((lvl = me_log_parse_level(optarg)) < 0)
				return usage();
			me_log_set_level(lvl);
			break;
		case O_FETCH:
			a->xo.fetch_id = optarg;
			break;
		case O_OUT:
			a->xo.out = optarg;
			break;
		case O_HAVE:
			if (a->xo.nhaves == MEPEER_MAX_HAVES ||
			    parse_hex(optarg, a->xo.haves[a->xo.nhaves], ME_OID_LEN) < 0)
				return usage();
			a->xo.nhaves++;
			break;
		case O_RESUME: {
			char *colon = strchr(optarg, ':');
			if (colon == NULL || (*colon = '\0', 0) ||
			    parse_hex(optarg, a->xo.resume_digest, XMSG_DIGEST_LEN) < 0 ||
			    parse_u64(colon + 1, &a->xo.resume_offset) < 0)
				return usage();
			a->xo.has_resume = 1;
			break;
		}
		case O_STREAMS:
			a->xo.streams = (unsigned)strtoul(optarg, &end, 10);
			if (*optarg < '0' || *optarg > '9' || *end != '\0' || a->xo.streams < 1 ||
			    a->xo.streams > MEPEER_MAX_STREAMS)
				return usage();
			break;
		case O_XSEND:
			if ((a->xo.xsend = xfer_xsend_parse(optarg)) < 0) {
				fprintf(stderr, "me-peer: unknown --xsend '%s'\n", optarg);
				return usage();
			}
			break;
		case O_SERVE: {
			size_t n;
			if (xfer_modes_parse(optarg, NULL, 16, &n) < 0) {
				fprintf(stderr, "me-peer: bad --serve '%s'\n", optarg);
				return usage();
			}
			a->xo.serve_list = optarg;
			break;
		}
		case O_REPO:
			a->xo.repo_path = optarg;
			break;
		case O_RELAY:
			if (!me_did_repo_valid(optarg))
				return usage();
			a->xo.relay_id = optarg;
			break;
		case O_SQUAT:
			if (!me_did_repo_valid(optarg))
				return usage();
			a->xo.squat_id = optarg;
			break;
		case O_BFILE:
			a->xo.bundle_file = optarg;
			break;
		case O_SEQ:
			if (parse_u64(optarg, &a->xo.seq) < 0 || a->xo.seq == 0)
				return usage();
			break;
		case O_MAXB:
			if (parse_u64(optarg, &a->xo.max_bundle) < 0 || a->xo.max_bundle == 0 ||
			    a->xo.max_bundle > (1ull << 32))
				return usage();
			break;
		default:
			return usage();
		}
	}
	if (a->xo.fetch_id != NULL && strcmp(a->xo.fetch_id, "random") == 0) {
		static char rid[ME_DID_REPO_SIZE];
		uint8_t root[ME_OID_LEN], pk[ME_PK_LEN];
		randombytes_buf(root, sizeof(root));
		randombytes_buf(pk, sizeof(pk));
		me_did_repo_compute(root, pk, rid, sizeof(rid));
		a->xo.fetch_id = rid;
	}
	/* the honest encoder refuses a malformed id: --xsend traversal sends one */
	if (a->xo.fetch_id != NULL && !me_did_repo_valid(a->xo.fetch_id)) {
		fprintf(stderr, "me-peer: --fetch wants a did:repo\n");
		return usage();
	}
	if ((a->xo.repo_path != NULL && a->xo.relay_id != NULL) ||
	    (a->xo.squat_id != NULL && a->xo.repo_path == NULL) ||
	    (xfer_enabled(a) && !a->dialing))
		return usage();
	if (optind != argc || a->root == NULL || !have_addr || a->dialing == a->listening)
		return usage();
	if (a->dialing && a->kind_name == NULL)
		a->kind_name = "none";
	if (a->kind_name != NULL) {
		size_t i;
		for (i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
			if (strcmp(kinds[i].name, a->kind_name) == 0)
				break;
		if (i == sizeof(kinds) / sizeof(kinds[0])) {
			fprintf(stderr, "me-peer: unknown kind '%s'\n", a->kind_name);
			return usage();
		}
		a->kind = kinds[i].kind;
	}
	if (imp != NULL) {
		if (load_impersonated(a, imp) < 0)
			return usage();
	} else {
		randombytes_buf(a->imp_pk, ME_PK_LEN);
		me_did_key_from_pk(a->imp_pk, a->imp_did, sizeof(a->imp_did));
	}
	return 0;
}

int main(int argc, char **argv)
{
	static struct app a;
	struct net_callbacks cb = { .peer_up = on_peer_up, .peer_down = on_peer_down,
				    .frame = on_frame, .xfer_accept = xfer_accept, .ud = &a,
				    .xfer_ud = &a };
	char err[512] = "", certs[4200];
	int rc, created;

	setvbuf(stdout, NULL, _IOLBF, 0);
	me_log_init("me-peer");
	me_log_set_level(LOG_INFO);
	signal(SIGPIPE, SIG_IGN);
	if (sodium_init() < 0)
		return 1;
	if ((rc = parse_args(&a, argc, argv)) != 0)
		return rc;

	rc = me_keypair_init(a.root, &a.kp, &created);
	if (rc == 0 && a.key_from != NULL) {
		me_keypair_wipe(&a.kp);
		rc = me_keypair_load(a.key_from, &a.kp);
	}
	if (rc < 0) {
		fprintf(stderr, "me-peer: keypair (%s): %s\n", a.key_from ? a.key_from : a.root,
			me_strerror(rc));
		return 2;
	}
	snprintf(certs, sizeof(certs), "%s/certs", a.root);
	printf("me %s\n", a.kp.did);
	if (a.kind == K_FORGED_NODE || a.kind == K_FORGED_REFSTATE)
		printf("impersonating %s\n", a.imp_did);
	if (xfer_init(&a) < 0) {
		xfer_free(&a);
		me_keypair_wipe(&a.kp);
		return 2;
	}

	uv_loop_init(&a.loop);
	if (tls_init(&a.tls, &a.kp, certs, err, sizeof(err)) < 0 ||
	    net_init(&a.net, &a.loop, &a.kp, a.tls, &a.addr, 1, &cb, err, sizeof(err)) < 0) {
		fprintf(stderr, "me-peer: %s\n", err);
		a.exit_code = 1;
		goto out;
	}
	printf("listening %s\n", a.addr.text);

	uv_timer_init(&a.loop, &a.wait_timer);
	uv_timer_init(&a.loop, &a.poll_timer);
	uv_timer_init(&a.loop, &flood_timer);
	a.wait_timer.data = a.poll_timer.data = &a;
	uv_timer_start(&a.wait_timer, on_wait, a.wait_ms, 0);
	uv_timer_start(&a.poll_timer, on_poll, 20, 20);
	uv_signal_init(&a.loop, &a.sigint);
	uv_signal_init(&a.loop, &a.sigterm);
	uv_signal_init(&a.loop, &a.sigusr1);
	a.sigint.data = a.sigterm.data = a.sigusr1.data = &a;
	uv_signal_start(&a.sigint, on_signal, SIGINT);
	uv_signal_start(&a.sigterm, on_signal, SIGTERM);
	uv_signal_start(&a.sigusr1, on_signal, SIGUSR1);
	for (size_t i = 0; i < a.ndial && !a.stopping; i++) {
		uint8_t pk[ME_PK_LEN];
		if (me_did_key_parse(a.dial[i].did, pk) < 0 ||
		    net_want(a.net, pk, &a.dial[i].addr) < 0) {
			fprintf(stderr, "me-peer: cannot dial %s\n", a.dial[i].did);
			a.exit_code = 2;
			a.stopping = 1;
		}
	}
	if (!a.stopping)
		uv_run(&a.loop, UV_RUN_DEFAULT);

	a.stopping = 1;
	if (opt_rate > 0)
		printf("flooded %lu\n", flood_sent);
	uv_close((uv_handle_t *)&flood_timer, NULL);
	msgpack_sbuffer_destroy(&flood_buf);
	uv_close((uv_handle_t *)&a.wait_timer, NULL);
	uv_close((uv_handle_t *)&a.poll_timer, NULL);
	uv_close((uv_handle_t *)&a.sigint, NULL);
	uv_close((uv_handle_t *)&a.sigterm, NULL);
	uv_close((uv_handle_t *)&a.sigusr1, NULL);
out:
	net_free(a.net);
	uv_run(&a.loop, UV_RUN_DEFAULT);
	xfer_free(&a);
	uv_run(&a.loop, UV_RUN_DEFAULT); /* handles xfer_free closed */
	tls_free(a.tls);
	if (uv_loop_close(&a.loop) != 0)
		fprintf(stderr, "me-peer: event loop closed with handles still open\n");
	me_keypair_wipe(&a.kp);
	return a.exit_code;
}
