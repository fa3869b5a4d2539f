/* me-peer's transfer streams (docs/peer-protocol.md §3), honest or hostile.
 *
 * Requesting (--fetch ID): opens --streams transfer streams to the first dialed node, each
 * carrying what --xsend says (an honest request by default), saves a received bundle to --out
 * and prints one JSON line per stream when it closes.
 *
 * Serving: me-peer holds one repository and announces it (its own RepoAnnouncement) to the
 * nodes it dials, then answers their requests as --serve says:
 *   --repo-path DIR  a git repository me-peer is the creator of: its did:repo is computed from
 *                    the root commit and our key, as the daemon does, and its refs are signed by
 *                    our key; bundles are built per request with mirror.c's bundle_write.
 *   --relay ID       a repository some dialed node announces by gossip: me-peer takes the
 *                    creator's genuine signed state from that announcement, fetches a full
 *                    bundle from that node, and serves it (or bad data) to the other nodes.
 * --serve takes a list of modes: the state announced first is served with the first mode; on
 * SIGUSR1 me-peer re-reads the repository, signs a newer state, announces it and serves it with
 * the next mode (the last one repeats). So a test can walk a daemon through "hostile, then
 * honest" in one process, at the moments it chooses.
 *
 * Everything is bounded: bundles are held in memory up to --max-bundle (64 MiB), at most
 * MEPEER_MAX_STREAMS requested streams and XFER_MAX_SERVES served ones at a time.
 *
 * This file: the state, the repository we hold (creator mode), announcing, relaying and the
 * hooks mepeer.c calls; requesting is in mepeer-fetch.c, serving in mepeer-serve.c. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <git2.h>
#include <sodium.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/ids.h"
#include "common/sha3.h"
#include "common/util.h"
#include "daemon/gitrepo.h"
#include "tests/mepeer-xfer.h"

/* ---- small helpers ---- */

void mx_hex(const uint8_t *p, size_t n, char *out)
{
	sodium_bin2hex(out, 2 * n + 1, p, n);
}

void mx_json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(f, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			fprintf(f, "\\u%04x", *p);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

void mx_rs_own_free(struct rs_own *o)
{
	free(o->rs.refs);
	free(o->mem);
	memset(o, 0, sizeof(*o));
}

int mx_rs_own_set(struct rs_own *o, const struct gmsg_refstate *rs)
{
	size_t need = rs->repo_id.len + rs->head.len + 2;
	struct rs_own n = { 0 };
	char *p;

	for (size_t i = 0; i < rs->nrefs; i++)
		need += rs->refs[i].name.len + 1;
	n.mem = malloc(need);
	n.rs.refs = calloc(rs->nrefs ? rs->nrefs : 1, sizeof(*n.rs.refs));
	if (n.mem == NULL || n.rs.refs == NULL) {
		mx_rs_own_free(&n);
		return ME_ENOMEM;
	}
	p = n.mem;
#define COPY(dst, src)                                         \
	do {                                                   \
		if ((src).len > 0)                             \
			memcpy(p, (src).ptr, (src).len);       \
		p[(src).len] = '\0';                           \
		(dst) = (struct gmsg_str){ p, (src).len };     \
		p += (src).len + 1;                            \
	} while (0)
	COPY(n.rs.repo_id, rs->repo_id);
	COPY(n.rs.head, rs->head);
	for (size_t i = 0; i < rs->nrefs; i++) {
		COPY(n.rs.refs[i].name, rs->refs[i].name);
		memcpy(n.rs.refs[i].oid, rs->refs[i].oid, ME_OID_LEN);
	}
#undef COPY
	n.rs.nrefs = rs->nrefs;
	n.rs.seq = rs->seq;
	memcpy(n.rs.sig, rs->sig, ME_SIG_LEN);
	mx_rs_own_free(o);
	*o = n;
	return 0;
}

/* Timestamps of our envelopes: strictly increasing, so none is "older than the newest". */
uint64_t mx_next_ts(struct xstate *xs)
{
	uint64_t now = (uint64_t)me_now_ms();
	xs->last_ts = now > xs->last_ts ? now : xs->last_ts + 1;
	return xs->last_ts;
}

/* Queues sb's bytes and empties it. They normally are whole frames; bytes the transport would
 * refuse in one piece (a frame whose header announces more than it accepts) go in pieces, so
 * the peer's reader is what refuses them. */
int mx_send_sb(struct net_xfer *x, msgpack_sbuffer *sb)
{
	const size_t piece = ME_FRAME_HDR + NET_XFER_MAX_FRAME;
	int rc = 0;

	for (size_t off = 0; rc == 0 && off < sb->size; off += piece)
		rc = net_xfer_send(x, sb->data + off, sb->size - off < piece ? sb->size - off : piece);
	msgpack_sbuffer_clear(sb);
	return rc;
}

int mx_put_garbage(msgpack_sbuffer *sb)
{
	uint8_t buf[GARBAGE_LEN];
	uint32_t n = GARBAGE_LEN - ME_FRAME_HDR;

	randombytes_buf(buf, sizeof(buf));
	buf[0] = (uint8_t)(n >> 24);
	buf[1] = (uint8_t)(n >> 16);
	buf[2] = (uint8_t)(n >> 8);
	buf[3] = (uint8_t)n;
	buf[4] = 0xc1; /* never valid msgpack: the body cannot decode by chance */
	return msgpack_sbuffer_write(sb, (const char *)buf, sizeof(buf)) != 0 ? ME_ENOMEM : 0;
}

/* ---- options ---- */

void xfer_usage(FILE *f)
{
	mx_fetch_usage(f);
	mx_serve_usage(f);
}

int xfer_enabled(const struct app *a)
{
	return a->xo.fetch_id != NULL || a->xo.repo_path != NULL || a->xo.relay_id != NULL;
}

/* ---- our repository (creator mode) ---- */

/* Reads the repository's refs and signs them as a state newer than the last one. */
static int creator_sign(struct app *a)
{
	struct xstate *xs = a->xs;
	struct gitrepo_info gi;
	char err[256];
	int rc;

	if ((rc = gitrepo_inspect(a->xo.repo_path, &gi, err, sizeof(err))) < 0) {
		fprintf(stderr, "me-peer: %s: %s\n", a->xo.repo_path, err);
		return rc;
	}
	struct gmsg_ref *refs = calloc(gi.nrefs ? gi.nrefs : 1, sizeof(*refs));
	if (refs == NULL) {
		gitrepo_info_clear(&gi);
		return ME_ENOMEM;
	}
	if (a->xo.squat_id != NULL) /* someone else's id, claimed as ours */
		rc = snprintf(xs->id, sizeof(xs->id), "%s", a->xo.squat_id) < 0 ? ME_EINVAL : 0;
	else
		rc = me_did_repo_compute(gi.root_oid, a->kp.pk, xs->id, sizeof(xs->id));
	for (size_t i = 0; rc == 0 && i < gi.nrefs; i++) {
		size_t n = 0;
		refs[i].name = gmsg_str(gi.refs[i].name);
		if (sodium_hex2bin(refs[i].oid, ME_OID_LEN, gi.refs[i].oid, 2 * ME_OID_LEN, NULL, &n,
				   NULL) != 0 || n != ME_OID_LEN)
			rc = ME_EINVAL;
	}
	qsort(refs, gi.nrefs, sizeof(*refs), gmsg_ref_cmp);
	uint64_t seq = a->xo.seq && xs->rs.rs.seq == 0 ? a->xo.seq : (uint64_t)me_now_ms();
	if (seq <= xs->rs.rs.seq)
		seq = xs->rs.rs.seq + 1;
	struct gmsg_refstate rs = { .repo_id = gmsg_str(xs->id), .seq = seq,
				    .head = gmsg_str(gi.head), .refs = refs, .nrefs = gi.nrefs };
	if (rc == 0)
		rc = gmsg_refstate_sign(&a->kp, &rs);
	if (rc == 0)
		rc = mx_rs_own_set(&xs->rs, &rs);
	if (rc == 0) {
		snprintf(xs->name, sizeof(xs->name), "%s", gi.name);
		memcpy(xs->creator_pk, a->kp.pk, ME_PK_LEN);
		xs->have_repo = 1;
		printf("repo %s %s seq=%" PRIu64 " refs=%zu head=%s\n", xs->id, xs->name, seq,
		       gi.nrefs, gi.head);
	} else {
		fprintf(stderr, "me-peer: cannot sign the state of %s: %s\n", a->xo.repo_path,
			me_strerror(rc));
	}
	free(refs);
	gitrepo_info_clear(&gi);
	return rc;
}

int xfer_init(struct app *a)
{
	struct xstate *xs = calloc(1, sizeof(*xs));
	uint8_t root[ME_OID_LEN];

	if (xs == NULL)
		return -1;
	a->xs = xs;
	for (size_t i = 0; i < sizeof(xs->fetches) / sizeof(xs->fetches[0]); i++)
		xs->fetches[i].fd = -1;
	if (crypto_sign_keypair(xs->other.pk, xs->other.sk) != 0 ||
	    me_did_key_from_pk(xs->other.pk, xs->other.did, sizeof(xs->other.did)) < 0)
		return -1;
	randombytes_buf(root, sizeof(root));
	if (me_did_repo_compute(root, a->kp.pk, xs->other_id, sizeof(xs->other_id)) < 0)
		return -1;
	snprintf(xs->desc, sizeof(xs->desc), "served by me-peer");
	if (xfer_modes_parse(a->xo.serve_list ? a->xo.serve_list : "honest", xs->mode_list,
			     sizeof(xs->mode_list) / sizeof(xs->mode_list[0]), &xs->nmodes) < 0)
		return -1;
	if (a->xo.repo_path != NULL) {
		gitrepo_global_init();
		if (creator_sign(a) < 0)
			return -1;
		if (git_repository_open_ext(&xs->repo, a->xo.repo_path,
					    GIT_REPOSITORY_OPEN_NO_SEARCH, NULL) < 0) {
			fprintf(stderr, "me-peer: cannot open %s\n", a->xo.repo_path);
			return -1;
		}
	} else if (a->xo.relay_id != NULL) {
		gitrepo_global_init();
	}
	return 0;
}

/* ---- announcing ---- */

static int announce_to(struct app *a, struct peer *p)
{
	struct xstate *xs = a->xs;
	struct gmsg_repo r = { .id = gmsg_str(xs->id), .name = gmsg_str(xs->name),
			       .description = gmsg_str(xs->desc), .refstate = xs->rs.rs };
	struct gmsg_repo_ann ann = { &r, 1 };
	msgpack_sbuffer out, pl;
	int rc;

	memcpy(r.creator_pk, xs->creator_pk, ME_PK_LEN);
	msgpack_sbuffer_init(&out);
	msgpack_sbuffer_init(&pl);
	rc = mepeer_honest_node(a, mx_next_ts(xs), &out);
	if (rc == 0)
		rc = gmsg_repo_ann_encode(&ann, &pl);
	if (rc == 0)
		rc = mepeer_envelope(&a->kp, mx_next_ts(xs), GMSG_MAX_TTL, GMSG_REPO_ANN, &pl, &out);
	if (rc == 0)
		rc = net_send(p, out.data, out.size);
	if (rc == 0)
		printf("announced %s seq=%" PRIu64 " refs=%zu generation=%u mode=%s to %s\n", xs->id,
		       xs->rs.rs.seq, xs->rs.rs.nrefs, xs->generation, mx_mode_name(mx_current_mode(a)),
		       net_peer_did(p));
	else
		fprintf(stderr, "me-peer: cannot announce to %s: %s\n", net_peer_did(p),
			me_strerror(rc));
	msgpack_sbuffer_destroy(&pl);
	msgpack_sbuffer_destroy(&out);
	return rc;
}

int mx_ready_to_serve(const struct app *a)
{
	const struct xstate *xs = a->xs;
	return xs->have_repo && (a->xo.repo_path != NULL || xs->relay_ready);
}

/* Announces to every dialed node that is up (but the relay source). */
void mx_announce_all(struct app *a)
{
	for (size_t i = 0; i < a->ndial; i++) {
		uint8_t pk[ME_PK_LEN];
		struct peer *p;
		if (me_did_key_parse(a->dial[i].did, pk) < 0 || (p = net_peer_find(a->net, pk)) == NULL)
			continue;
		if (a->xo.relay_id != NULL && memcmp(pk, a->xs->relay_src, ME_PK_LEN) == 0)
			continue;
		announce_to(a, p);
	}
}


/* SIGUSR1: the next generation. */
void xfer_signal(struct app *a)
{
	struct xstate *xs = a->xs;

	if (xs == NULL || !mx_ready_to_serve(a))
		return;
	if (a->xo.repo_path != NULL) {
		free(xs->cache_buf);
		xs->cache_buf = NULL;
		if (creator_sign(a) < 0)
			return;
	}
	xs->generation++;
	mx_announce_all(a);
}

/* ---- relaying ---- */

void xfer_gossip(struct app *a, struct peer *p, const struct gmsg_envelope *e)
{
	struct xstate *xs = a->xs;
	struct gmsg_repo_ann ann;

	if (xs == NULL || a->xo.relay_id == NULL || xs->have_repo || e->type != GMSG_REPO_ANN ||
	    gmsg_repo_ann_decode(e->payload, e->payload_len, &ann) < 0)
		return;
	for (size_t i = 0; i < ann.nrepos; i++) {
		const struct gmsg_repo *r = &ann.repos[i];
		if (!gmsg_str_eq(r->id, gmsg_str(a->xo.relay_id)) ||
		    gmsg_refstate_verify(&r->refstate, r->creator_pk) < 0)
			continue;
		if (mx_rs_own_set(&xs->rs, &r->refstate) < 0)
			break;
		snprintf(xs->id, sizeof(xs->id), "%.*s", (int)r->id.len, r->id.ptr);
		snprintf(xs->name, sizeof(xs->name), "%.*s", (int)r->name.len, r->name.ptr);
		snprintf(xs->desc, sizeof(xs->desc), "%.*s", (int)r->description.len,
			 r->description.ptr ? r->description.ptr : "");
		memcpy(xs->creator_pk, r->creator_pk, ME_PK_LEN);
		memcpy(xs->relay_src, net_peer_pk(p), ME_PK_LEN);
		/* forgeries of another repository keep the relayed creator */
		uint8_t root[ME_OID_LEN];
		randombytes_buf(root, sizeof(root));
		me_did_repo_compute(root, xs->creator_pk, xs->other_id, sizeof(xs->other_id));
		xs->have_repo = 1;
		printf("learnt %s %s seq=%" PRIu64 " refs=%zu from %s\n", xs->id, xs->name,
		       xs->rs.rs.seq, xs->rs.rs.nrefs, net_peer_did(p));
		xs->relay_fetching = 1;
		mx_fetch_open(a, p, MEPEER_MAX_STREAMS, 1);
		break;
	}
	gmsg_repo_ann_free(&ann);
}

void mx_relay_loaded(struct app *a, struct xfetch *f)
{
	struct xstate *xs = a->xs;
	struct stat st;
	int fd = open(f->path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || fstat(fd, &st) < 0 || (uint64_t)st.st_size != f->total ||
	    (xs->relay_buf = malloc(f->total ? f->total : 1)) == NULL ||
	    read(fd, xs->relay_buf, f->total) != (ssize_t)f->total) {
		fprintf(stderr, "me-peer: cannot load %s\n", f->path);
		if (fd >= 0)
			close(fd);
		return;
	}
	close(fd);
	xs->relay_len = f->total;
	xs->relay_ready = 1;
	printf("relaying %s bytes=%zu\n", xs->id, xs->relay_len);
	mx_announce_all(a);
}

/* ---- the app's hooks ---- */

void xfer_target_up(struct app *a, struct peer *p, int idx)
{
	struct xstate *xs = a->xs;

	if (xs == NULL)
		return;
	if (a->xo.fetch_id != NULL && idx == 0 && xs->nfetch == 0) {
		xs->nfetch = a->xo.streams;
		for (unsigned i = 0; i < a->xo.streams; i++)
			mx_fetch_open(a, p, i, 0);
	}
	if (a->xo.relay_id != NULL && memcmp(net_peer_pk(p), xs->relay_src, ME_PK_LEN) == 0)
		return;
	if (mx_ready_to_serve(a))
		announce_to(a, p);
}

void xfer_free(struct app *a)
{
	struct xstate *xs = a->xs;

	if (xs == NULL)
		return;
	for (size_t i = 0; i < sizeof(xs->fetches) / sizeof(xs->fetches[0]); i++) {
		struct xfetch *f = &xs->fetches[i];
		if (f->used && !f->closed)
			mx_fetch_json(f, 0, "me-peer exiting");
		if (f->fd >= 0)
			close(f->fd);
		me_sha3_free(f->h);
	}
	while (xs->serves)
		mx_serve_free(xs->serves);
	mx_rs_own_free(&xs->rs);
	git_repository_free(xs->repo);
	free(xs->relay_buf);
	free(xs->cache_buf);
	me_keypair_wipe(&xs->other);
	free(xs);
	a->xs = NULL;
	if (a->xo.repo_path != NULL || a->xo.relay_id != NULL)
		gitrepo_global_free();
}

