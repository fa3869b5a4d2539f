/* me-peer requesting on transfer streams: --fetch ID on --streams streams to the first dialed
 * node, each carrying what --xsend says (the table below); the relay fetch of --relay. One JSON
 * line per stream when it closes. */
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
#include "daemon/gitutil.h"
#include "tests/mepeer-xfer.h"

/* ---- what requested streams carry (--xsend) ---- */

enum { XS_REQUEST, XS_GARBAGE, XS_START, XS_TRAVERSAL, XS_TWO, XS_HUGE_HAVES, XS_OVERSIZE,
       XS_SILENT, XS_PARTIAL };

static const struct {
	const char *name, *help;
} xsends[] = {
	[XS_REQUEST] = { "request", "an honest request (--have, --resume)" },
	[XS_GARBAGE] = { "garbage", "one frame of random bytes" },
	[XS_START] = { "start", "an unrequested Start, 16 bytes of data and Done" },
	[XS_TRAVERSAL] = { "traversal", "a request for \"" TRAVERSAL_ID "\"" },
	[XS_TWO] = { "two", "two requests on one stream" },
	[XS_HUGE_HAVES] = { "huge-haves", "a request with 20001 haves (a 440 KB frame)" },
	[XS_OVERSIZE] = { "oversize", "a frame header announcing 16 MiB, then 64 KiB" },
	[XS_SILENT] = { "silent", "nothing (QUIC shows the peer no stream until data flows)" },
	[XS_PARTIAL] = { "partial", "3 bytes of a frame header, then nothing: an idle stream" },
};

#define NXSENDS (sizeof(xsends) / sizeof(xsends[0]))

/* A request packed by hand: any id string, n haves of zero bytes. */
static int put_request_raw(msgpack_sbuffer *sb, const char *repo_id, size_t n)
{
	static const uint8_t zero[ME_OID_LEN];
	msgpack_packer pk;
	size_t start = sb->size;
	int rc;

	me_frame_begin(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 4);
	msgpack_pack_unsigned_int(&pk, XMSG_REQUEST);
	me_mp_pack_str(&pk, repo_id);
	msgpack_pack_array(&pk, (uint32_t)n);
	for (size_t i = 0; i < n; i++) {
		msgpack_pack_bin(&pk, ME_OID_LEN);
		msgpack_pack_bin_body(&pk, zero, ME_OID_LEN);
	}
	msgpack_pack_nil(&pk);
	rc = me_frame_end(sb, start, XMSG_MAX_BODY);
	if (rc < 0)
		sb->size = start;
	return rc;
}

int xfer_xsend_parse(const char *name)
{
	for (size_t i = 0; i < NXSENDS; i++)
		if (strcmp(xsends[i].name, name) == 0)
			return (int)i;
	return -1;
}

void mx_fetch_usage(FILE *f)
{
	fprintf(f, "XSEND (what --fetch streams carry):\n");
	for (size_t i = 0; i < NXSENDS; i++)
		fprintf(f, "  %-15s %s\n", xsends[i].name, xsends[i].help);
}

/* ---- requesting ---- */

static void bundle_path(const struct xfetch *f, unsigned k, char *buf, size_t sz)
{
	if (k == 0)
		snprintf(buf, sz, "%s", f->base);
	else
		snprintf(buf, sz, "%s.b%u", f->base, k);
}

void mx_fetch_json(struct xfetch *f, uint64_t app_error, const char *why)
{
	char d[2 * XMSG_DIGEST_LEN + 1], c[2 * XMSG_DIGEST_LEN + 1];
	const char *result;
	int all_ok = f->nbundles > 0;

	for (unsigned i = 0; i < f->nbundles; i++)
		all_ok &= f->b[i].ok;
	if (f->has_error)
		result = "error";
	else if (f->nbundles > 0 && f->phase == 2 && app_error == 0 && f->closed)
		result = all_ok ? "done" : "bad-digest";
	else if (!f->closed)
		result = "unfinished";
	else if (app_error != 0)
		result = "reset";
	else
		result = "closed";
	mx_hex(f->digest, XMSG_DIGEST_LEN, d);
	mx_hex(f->computed, XMSG_DIGEST_LEN, c);
	/* the top-level fields describe the last bundle (the newest state) */
	printf("{\"stream\":%d,\"relay\":%s,\"result\":\"%s\",\"frames\":%u,\"start\":%s,"
	       "\"bundles\":%u,\"total_size\":%" PRIu64 ",\"offset\":%" PRIu64 ","
	       "\"received\":%" PRIu64 ",\"bytes_in\":%" PRIu64 ",\"digest\":\"%s\","
	       "\"computed_digest\":\"%s\",\"seq\":%" PRIu64 ",\"refs\":%zu,"
	       "\"signature_ok\":%s,\"repo_id_ok\":%s,\"creator\":\"%s\","
	       "\"app_error\":%" PRIu64 ",\"code\":%" PRId64 ",\"file\":",
	       f->idx, f->relay ? "true" : "false", result, f->frames,
	       f->has_start ? "true" : "false", f->nbundles, f->total, f->offset, f->received,
	       f->bytes_in, d, c, f->seq, f->nrefs, f->sig_ok ? "true" : "false",
	       f->id_ok ? "true" : "false", f->creator, app_error, f->code);
	mx_json_str(stdout, f->path);
	printf(",\"file_name\":");
	mx_json_str(stdout, f->file_name);
	printf(",\"message\":");
	mx_json_str(stdout, f->message);
	printf(",\"why\":");
	mx_json_str(stdout, why ? why : "");
	printf(",\"note\":");
	mx_json_str(stdout, f->note);
	printf(",\"series\":[");
	for (unsigned i = 0; i < f->nbundles; i++) {
		char bp[PATH_MAX + 16];
		mx_hex(f->b[i].digest, XMSG_DIGEST_LEN, d);
		bundle_path(f, i, bp, sizeof(bp));
		printf("%s{\"total_size\":%" PRIu64 ",\"offset\":%" PRIu64 ",\"seq\":%" PRIu64
		       ",\"refs\":%zu,\"digest\":\"%s\",\"ok\":%s,\"file\":", i ? "," : "",
		       f->b[i].total, f->b[i].offset, f->b[i].seq, f->b[i].nrefs, d,
		       f->b[i].ok ? "true" : "false");
		mx_json_str(stdout, bp);
		printf("}");
	}
	printf("]}\n");
}

static void fetch_note(struct xfetch *f, const char *what)
{
	if (f->note[0] == '\0')
		snprintf(f->note, sizeof(f->note), "%s", what);
}


static int fetch_start(struct xfetch *f, const struct xmsg *m)
{
	const char *want = f->relay ? f->a->xo.relay_id : f->a->xo.fetch_id;
	int flags = O_RDWR | O_CREAT | O_CLOEXEC;

	if (f->nbundles == XFETCH_MAX_BUNDLES) {
		fetch_note(f, "too many bundles");
		return -1;
	}
	if (f->nbundles > 0 && m->offset > 0) {
		fetch_note(f, "an offset on a bundle after the first");
		return -1;
	}
	bundle_path(f, f->nbundles, f->path, sizeof(f->path));
	f->has_start = 1;
	f->total = m->total_size;
	f->offset = m->offset;
	f->pos = m->offset;
	memcpy(f->digest, m->digest, XMSG_DIGEST_LEN);
	f->seq = m->refstate.seq;
	f->nrefs = m->refstate.nrefs;
	me_did_key_from_pk(m->creator_pk, f->creator, sizeof(f->creator));
	snprintf(f->file_name, sizeof(f->file_name), "%.*s", (int)m->file_name.len,
		 m->file_name.ptr ? m->file_name.ptr : "");
	f->sig_ok = gmsg_refstate_verify(&m->refstate, m->creator_pk) == 0;
	f->id_ok = gmsg_str_eq(m->refstate.repo_id, gmsg_str(want));
	if (f->total > f->a->xo.max_bundle) {
		fetch_note(f, "total_size over --max-bundle");
		return -1;
	}
	me_sha3_free(f->h);
	if ((f->h = me_sha3_new()) == NULL)
		return -1;
	if ((f->fd = open(f->path, flags | (m->offset > 0 ? 0 : O_TRUNC), 0600)) < 0) {
		fetch_note(f, "cannot open --out");
		return -1;
	}
	/* A resumed transfer: the first offset bytes are already in the file. */
	uint8_t buf[CHUNK];
	uint64_t left = m->offset;
	while (left > 0) {
		ssize_t k = read(f->fd, buf, left < sizeof(buf) ? (size_t)left : sizeof(buf));
		if (k <= 0) {
			fetch_note(f, "resume offset past the partial file");
			return -1;
		}
		me_sha3_update(f->h, buf, (size_t)k);
		left -= (uint64_t)k;
	}
	if (ftruncate(f->fd, (off_t)m->offset) < 0 || lseek(f->fd, (off_t)m->offset, SEEK_SET) < 0)
		return -1;
	f->phase = 1;
	return 0;
}

static int fetch_on_frame(void *ud, struct net_xfer *x, const uint8_t *body, size_t len)
{
	struct xfetch *f = ud;
	struct xmsg m;
	int rc = xmsg_decode(body, len, &m);
	(void)x;

	f->frames++;
	if (rc < 0) {
		fetch_note(f, "malformed message");
		return rc;
	}
	switch (m.type) {
	case XMSG_START:
		if (f->phase == 1) {
			fetch_note(f, "Start out of order");
			rc = ME_EPROTO;
			break;
		}
		rc = fetch_start(f, &m);
		break;
	case XMSG_DATA:
		if (f->phase != 1 || m.len > f->total - f->pos) {
			fetch_note(f, f->phase != 1 ? "Data out of order" : "data past total_size");
			rc = ME_EPROTO;
			break;
		}
		if (write_full(f->fd, m.data, m.len) < 0) {
			fetch_note(f, "cannot write --out");
			rc = ME_EIO;
			break;
		}
		me_sha3_update(f->h, m.data, m.len);
		f->pos += m.len;
		f->received += m.len;
		break;
	case XMSG_DONE:
		if (f->phase != 1) {
			fetch_note(f, "Done out of order");
			rc = ME_EPROTO;
			break;
		}
		f->phase = 2;
		f->has_done = 1;
		me_sha3_final(f->h, f->computed);
		f->digest_ok = f->pos == f->total &&
			       memcmp(f->computed, f->digest, XMSG_DIGEST_LEN) == 0 &&
			       memcmp(m.digest, f->digest, XMSG_DIGEST_LEN) == 0;
		if (f->pos != f->total)
			fetch_note(f, "Done before total_size");
		f->b[f->nbundles] = (struct xbundle){ .total = f->total, .offset = f->offset,
						       .seq = f->seq, .nrefs = f->nrefs,
						       .ok = f->digest_ok };
		memcpy(f->b[f->nbundles].digest, f->digest, XMSG_DIGEST_LEN);
		f->nbundles++;
		close(f->fd);
		f->fd = -1;
		/* more bundles may follow: our direction ends when the server's does (eof) */
		break;
	case XMSG_ERROR:
		f->has_error = 1;
		f->code = m.code;
		snprintf(f->message, sizeof(f->message), "%.*s", (int)m.message.len,
			 m.message.ptr ? m.message.ptr : "");
		net_xfer_finish(f->x);
		break;
	default:
		fetch_note(f, "Request from the server");
		rc = ME_EPROTO;
	}
	xmsg_free(&m);
	return rc < 0 ? rc : 0;
}

static void fetch_on_writable(void *ud, struct net_xfer *x)
{
	(void)ud, (void)x;
}

/* The server finished its direction: so do we. */
static void fetch_on_eof(void *ud, struct net_xfer *x)
{
	(void)ud;
	net_xfer_finish(x);
}

static void fetch_on_closed(void *ud, struct net_xfer *x, uint64_t app_error, const char *why)
{
	struct xfetch *f = ud;
	struct app *a = f->a;
	struct xstate *xs = a->xs;

	f->bytes_in = net_xfer_bytes_in(x);
	f->closed = 1;
	f->x = NULL;
	if (f->fd >= 0) {
		close(f->fd);
		f->fd = -1;
	}
	mx_fetch_json(f, app_error, why);
	if (f->relay) {
		xs->relay_fetching = 0;
		if (f->nbundles == 1 && f->b[0].ok && app_error == 0)
			mx_relay_loaded(a, f);
		else if (f->nbundles > 1)
			fprintf(stderr, "me-peer: --relay takes a repository of one bundle, not %u\n",
				f->nbundles);
		else
			fprintf(stderr, "me-peer: the relay fetch failed (%s)\n", why ? why : "");
		return;
	}
	if (++xs->nfetch_closed == xs->nfetch && a->xo.repo_path == NULL &&
	    a->xo.relay_id == NULL)
		mepeer_stop(a, 0);
}

static const struct net_xfer_callbacks fetch_cb = {
	.frame = fetch_on_frame,
	.writable = fetch_on_writable,
	.eof = fetch_on_eof,
	.closed = fetch_on_closed,
};

/* What one requested stream carries (--xsend). */
static int put_xsend(struct app *a, int kind, msgpack_sbuffer *sb)
{
	struct xstate *xs = a->xs;
	const char *id = a->xo.fetch_id;
	int rc;

	switch (kind) {
	case XS_REQUEST:
	case XS_TWO:
		rc = xmsg_encode_request(sb, id, (const uint8_t(*)[ME_OID_LEN])a->xo.haves,
					 a->xo.nhaves, a->xo.has_resume ? a->xo.resume_digest : NULL,
					 a->xo.resume_offset);
		if (rc == 0 && kind == XS_TWO)
			rc = xmsg_encode_request(sb, id, NULL, 0, NULL, 0);
		return rc;
	case XS_GARBAGE:
		return mx_put_garbage(sb);
	case XS_START: {
		/* a state of ours: the repository we hold, or a made-up one */
		uint8_t data[16], d[XMSG_DIGEST_LEN];
		struct gmsg_ref ref = { gmsg_str("refs/heads/main"), { 0 } };
		struct gmsg_refstate rs = { .repo_id = gmsg_str(xs->other_id), .seq = 1,
					    .head = gmsg_str("refs/heads/main"), .refs = &ref,
					    .nrefs = 1 };
		randombytes_buf(data, sizeof(data));
		randombytes_buf(ref.oid, sizeof(ref.oid));
		me_sha3_256_2(data, sizeof(data), NULL, 0, d);
		if (xs->have_repo)
			rs = xs->rs.rs;
		else if ((rc = gmsg_refstate_sign(&a->kp, &rs)) < 0)
			return rc;
		if ((rc = xmsg_encode_start(sb, "unrequested.bundle", sizeof(data), d, 0, a->kp.pk,
					    &rs)) == 0 &&
		    (rc = xmsg_encode_data(sb, data, sizeof(data))) == 0)
			rc = xmsg_encode_done(sb, d);
		return rc;
	}
	case XS_TRAVERSAL:
		return put_request_raw(sb, TRAVERSAL_ID, 0);
	case XS_HUGE_HAVES:
		return put_request_raw(sb, id, XMSG_MAX_HAVES + 1);
	case XS_OVERSIZE: {
		static uint8_t junk[CHUNK];
		const uint8_t hdr[ME_FRAME_HDR] = { 0x01, 0x00, 0x00, 0x00 };
		randombytes_buf(junk, sizeof(junk));
		if (msgpack_sbuffer_write(sb, (const char *)hdr, sizeof(hdr)) != 0 ||
		    msgpack_sbuffer_write(sb, (const char *)junk, sizeof(junk)) != 0)
			return ME_ENOMEM;
		return 0;
	}
	case XS_SILENT:
		return 0;
	case XS_PARTIAL:
		return msgpack_sbuffer_write(sb, "\0\0\0", 3) != 0 ? ME_ENOMEM : 0;
	}
	return ME_EINVAL;
}

/* Opens one stream to p: a requested one (idx < MEPEER_MAX_STREAMS) or the relay fetch. */
void mx_fetch_open(struct app *a, struct peer *p, unsigned idx, int relay)
{
	struct xstate *xs = a->xs;
	struct xfetch *f = &xs->fetches[idx];
	msgpack_sbuffer sb;
	int rc;

	memset(f, 0, sizeof(*f));
	f->a = a;
	f->idx = (int)idx;
	f->relay = relay;
	f->fd = -1;
	f->used = 1;
	if (relay)
		snprintf(f->base, sizeof(f->base), "%s/relay.bundle", a->root);
	else if (a->xo.out != NULL && idx == 0)
		snprintf(f->base, sizeof(f->base), "%s", a->xo.out);
	else if (a->xo.out != NULL)
		snprintf(f->base, sizeof(f->base), "%s.%u", a->xo.out, idx);
	else
		snprintf(f->base, sizeof(f->base), "%s/fetch.%u.bundle", a->root, idx);
	memcpy(f->path, f->base, strlen(f->base) + 1);
	msgpack_sbuffer_init(&sb);
	if (relay)
		rc = xmsg_encode_request(&sb, a->xo.relay_id, NULL, 0, NULL, 0);
	else
		rc = put_xsend(a, a->xo.xsend, &sb);
	if (rc == 0)
		rc = net_xfer_open(p, &fetch_cb, f, &f->x);
	if (rc == 0 && sb.size > 0)
		rc = mx_send_sb(f->x, &sb);
	msgpack_sbuffer_destroy(&sb);
	if (rc < 0 && f->x != NULL) {
		/* closed follows from the loop and prints the stream's line */
		fetch_note(f, "cannot send");
		net_xfer_reset(f->x, NET_ERR_CANCEL);
		return;
	}
	if (rc < 0) {
		printf("{\"stream\":%u,\"relay\":%s,\"result\":\"open-failed\",\"error\":\"%s\"}\n",
		       idx, relay ? "true" : "false", me_errname(rc));
		f->used = 0;
		if (!relay && ++xs->nfetch_closed == xs->nfetch && a->xo.repo_path == NULL &&
		    a->xo.relay_id == NULL)
			mepeer_stop(a, 0);
		return;
	}
	printf("opened stream %u %s to %s\n", idx, relay ? "relay" : xsends[a->xo.xsend].name,
	       net_peer_did(p));
}

