/* me-peer serving on transfer streams: the repository it holds, answered as the --serve mode of
 * the current generation says (the table below), honestly or not. */
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
#include "daemon/mirror.h"
#include "tests/mepeer-xfer.h"

#define XFER_MAX_SERVES 32
#define HUGE_SIZE (1ull << 50)
#define TRAVERSAL_NAME "../../x"
#define EXTRA_REF "refs/heads/zz-mepeer-extra"
#define TRICKLE_MS 2000

/* ---- how requests are answered (--serve) ---- */

enum answer { A_BUNDLE, A_FILE, A_ERROR, A_GARBAGE, A_SILENT };
enum mutation { MUT_NONE, MUT_FLIP_PACK, MUT_EXTRA_REF };
enum rs_kind { RS_CREATOR, RS_OTHER_SIGNER, RS_CLAIM_CREATOR, RS_OTHER_REPO, RS_TRAVERSAL };
enum total_kind { T_EXACT, T_HUGE, T_SHORT };
enum digest_kind { D_OK, D_WRONG_DONE, D_WRONG_BOTH };
enum order { O_NORMAL, O_DATA_FIRST, O_TWO_STARTS, O_DONE_FIRST, O_REPEAT };
enum cut { CUT_NONE, CUT_STALL, CUT_SHORT, CUT_RESET, CUT_TRICKLE };

struct serve_mode {
	const char *name, *help;
	enum answer answer;
	enum mutation mutate;
	enum rs_kind rs;
	enum total_kind total;
	enum digest_kind digest;
	enum order order;
	enum cut cut; /* after half the data: nothing more (stall), Done (short) or a reset; or
			 from the start one byte every TRICKLE_MS (trickle) */
	const char *file_name; /* NULL: "<name>.bundle" */
};

static const struct serve_mode modes[] = {
	{ .name = "honest", .help = "a correct bundle of the signed state; resumes when asked" },
	{ .name = "tampered", .mutate = MUT_FLIP_PACK,
	  .help = "one byte flipped inside the pack (size and digest match the bytes sent)" },
	{ .name = "refs-differ", .mutate = MUT_EXTRA_REF,
	  .help = "the bundle header has a ref (" EXTRA_REF ") the signed state lacks" },
	{ .name = "wrong-signer", .rs = RS_OTHER_SIGNER,
	  .help = "Start's ref state signed by a random key; creator_pk says the creator" },
	{ .name = "claim-creator", .rs = RS_CLAIM_CREATOR,
	  .help = "Start's creator_pk and ref state signature both from a random key" },
	{ .name = "other-repo", .rs = RS_OTHER_REPO,
	  .help = "Start's ref state is for another (valid) repository id" },
	{ .name = "file-traversal", .file_name = TRAVERSAL_NAME,
	  .help = "file_name \"" TRAVERSAL_NAME "\", the rest honest" },
	{ .name = "id-traversal", .rs = RS_TRAVERSAL,
	  .help = "Start's ref state has repo id \"" TRAVERSAL_ID "\" (signed)" },
	{ .name = "huge-size", .total = T_HUGE, .help = "total_size 2^50 bytes" },
	{ .name = "past-size", .total = T_SHORT,
	  .help = "total_size one byte less than the data sent" },
	{ .name = "done-digest", .digest = D_WRONG_DONE,
	  .help = "Done's digest differs from Start's (the data matches Start)" },
	{ .name = "bad-digest", .digest = D_WRONG_BOTH,
	  .help = "Start and Done agree on a digest the data does not have" },
	{ .name = "stall", .cut = CUT_STALL,
	  .help = "Start and half the data, then nothing (the stream stays open)" },
	{ .name = "short", .cut = CUT_SHORT, .help = "Start, half the data, then Done" },
	{ .name = "reset", .cut = CUT_RESET,
	  .help = "Start, half the data, then (once acknowledged) a stream reset" },
	{ .name = "trickle", .cut = CUT_TRICKLE,
	  .help = "Start, then one byte of data every 2 s: never quite a stall, never done" },
	{ .name = "data-first", .order = O_DATA_FIRST, .help = "a Data frame before Start" },
	{ .name = "two-starts", .order = O_TWO_STARTS, .help = "Start twice, then the data" },
	{ .name = "done-first", .order = O_DONE_FIRST, .help = "Start, then Done at once" },
	{ .name = "repeat", .order = O_REPEAT,
	  .help = "the honest bundle, then the same bundle again (a state not newer)" },
	{ .name = "file", .answer = A_FILE,
	  .help = "the bytes of --bundle-file as the bundle, whatever they are (Start honest)" },
	{ .name = "garbage", .answer = A_GARBAGE, .help = "one frame of random bytes" },
	{ .name = "error", .answer = A_ERROR, .help = "Error ENOTFOUND" },
	{ .name = "silent", .answer = A_SILENT, .help = "no answer at all" },
};

#define NMODES (sizeof(modes) / sizeof(modes[0]))

int xfer_serve_parse(const char *name)
{
	for (size_t i = 0; i < NMODES; i++)
		if (strcmp(modes[i].name, name) == 0)
			return (int)i;
	return -1;
}

void mx_serve_usage(FILE *f)
{
	fprintf(f, "MODE (--serve, comma-separated; one per announced state):\n");
	for (size_t i = 0; i < NMODES; i++)
		fprintf(f, "  %-15s %s\n", modes[i].name, modes[i].help);
}

const char *mx_mode_name(const struct serve_mode *m)
{
	return m->name;
}

/* The mode the current generation is served with. */
const struct serve_mode *mx_current_mode(const struct app *a)
{
	const struct xstate *xs = a->xs;

	if (xs->nmodes == 0)
		return &modes[0];
	return xs->mode_list[xs->generation < xs->nmodes ? xs->generation : xs->nmodes - 1];
}


/* "mode,mode,...": 0, or -1 for an unknown mode or too many. out may be NULL. */
int xfer_modes_parse(const char *list, const struct serve_mode **out, size_t max, size_t *n)
{
	char buf[512], *save = NULL;

	*n = 0;
	if (strlen(list) >= sizeof(buf))
		return -1;
	snprintf(buf, sizeof(buf), "%s", list);
	for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		int m = xfer_serve_parse(t);
		if (m < 0 || *n == max)
			return -1;
		if (out != NULL)
			out[*n] = &modes[m];
		(*n)++;
	}
	return *n > 0 ? 0 : -1;
}

/* A Start packed by hand, for ids the encoder refuses: the state's repo id is replaced by
 * repo_id and signed by signer over the documented canonical bytes. */
static int put_start_raw(msgpack_sbuffer *sb, const char *file_name, uint64_t total,
			 const uint8_t digest[XMSG_DIGEST_LEN], uint64_t offset,
			 const uint8_t creator_pk[ME_PK_LEN], const struct gmsg_refstate *rs,
			 const char *repo_id, const struct me_keypair *signer)
{
	msgpack_sbuffer sg;
	msgpack_packer pk;
	uint8_t sig[ME_SIG_LEN];
	size_t start = sb->size;
	int rc;

	msgpack_sbuffer_init(&sg);
	msgpack_packer_init(&pk, &sg, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 5);
	me_mp_pack_str(&pk, GMSG_REFSTATE_TAG);
	me_mp_pack_str(&pk, repo_id);
	msgpack_pack_uint64(&pk, rs->seq);
	msgpack_pack_str(&pk, rs->head.len);
	msgpack_pack_str_body(&pk, rs->head.ptr, rs->head.len);
	msgpack_pack_array(&pk, rs->nrefs);
	for (size_t i = 0; i < rs->nrefs; i++) {
		msgpack_pack_array(&pk, 2);
		msgpack_pack_str(&pk, rs->refs[i].name.len);
		msgpack_pack_str_body(&pk, rs->refs[i].name.ptr, rs->refs[i].name.len);
		msgpack_pack_bin(&pk, ME_OID_LEN);
		msgpack_pack_bin_body(&pk, rs->refs[i].oid, ME_OID_LEN);
	}
	rc = me_sign(signer, sg.data, sg.size, sig);
	msgpack_sbuffer_destroy(&sg);
	if (rc < 0)
		return rc;

	me_frame_begin(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 7);
	msgpack_pack_unsigned_int(&pk, XMSG_START);
	me_mp_pack_str(&pk, file_name);
	msgpack_pack_uint64(&pk, total);
	msgpack_pack_bin(&pk, XMSG_DIGEST_LEN);
	msgpack_pack_bin_body(&pk, digest, XMSG_DIGEST_LEN);
	msgpack_pack_uint64(&pk, offset);
	msgpack_pack_bin(&pk, ME_PK_LEN);
	msgpack_pack_bin_body(&pk, creator_pk, ME_PK_LEN);
	msgpack_pack_array(&pk, 5);
	me_mp_pack_str(&pk, repo_id);
	msgpack_pack_uint64(&pk, rs->seq);
	msgpack_pack_str(&pk, rs->head.len);
	msgpack_pack_str_body(&pk, rs->head.ptr, rs->head.len);
	msgpack_pack_array(&pk, rs->nrefs);
	for (size_t i = 0; i < rs->nrefs; i++) {
		msgpack_pack_array(&pk, 2);
		msgpack_pack_str(&pk, rs->refs[i].name.len);
		msgpack_pack_str_body(&pk, rs->refs[i].name.ptr, rs->refs[i].name.len);
		msgpack_pack_bin(&pk, ME_OID_LEN);
		msgpack_pack_bin_body(&pk, rs->refs[i].oid, ME_OID_LEN);
	}
	msgpack_pack_bin(&pk, ME_SIG_LEN);
	msgpack_pack_bin_body(&pk, sig, ME_SIG_LEN);
	rc = me_frame_end(sb, start, NET_XFER_MAX_FRAME);
	if (rc < 0)
		sb->size = start;
	return rc;
}

/* ---- serving ---- */

static void on_trickle_closed(uv_handle_t *h)
{
	free(h->data);
}

void mx_serve_free(struct xserve *sv)
{
	struct xstate *xs = sv->a->xs;
	for (struct xserve **pp = &xs->serves; *pp; pp = &(*pp)->next) {
		if (*pp == sv) {
			*pp = sv->next;
			break;
		}
	}
	xs->nserves--;
	free(sv->buf);
	sv->buf = NULL;
	free(sv->again);
	sv->again = NULL;
	if (sv->timer_on) /* the memory goes with the timer's handle */
		uv_close((uv_handle_t *)&sv->trickle, on_trickle_closed);
	else
		free(sv);
}

/* Key of a bundle: the tips and the haves. */
static void bundle_key(const struct gmsg_refstate *rs, const struct xmsg *req, uint8_t key[32])
{
	struct me_sha3 *h = me_sha3_new();
	memset(key, 0, 32);
	if (h == NULL)
		return;
	for (size_t i = 0; i < rs->nrefs; i++) {
		me_sha3_update(h, rs->refs[i].name.ptr, rs->refs[i].name.len + 1);
		me_sha3_update(h, rs->refs[i].oid, ME_OID_LEN);
	}
	me_sha3_update(h, "haves", 6);
	if (req->nhaves > 0)
		me_sha3_update(h, req->haves, req->nhaves * ME_OID_LEN);
	me_sha3_final(h, key);
	me_sha3_free(h);
}

/* The honest bundle for this request, in memory (a copy the caller owns). */
static int honest_bundle(struct app *a, const struct xmsg *req, uint8_t **out, size_t *len)
{
	struct xstate *xs = a->xs;
	uint8_t key[32];
	char path[PATH_MAX], err[256] = "";
	int fd, rc;

	if (xs->repo == NULL) {
		/* relay: the complete bundle we fetched */
		if ((*out = malloc(xs->relay_len ? xs->relay_len : 1)) == NULL)
			return ME_ENOMEM;
		memcpy(*out, xs->relay_buf, xs->relay_len);
		*len = xs->relay_len;
		return 0;
	}
	bundle_key(&xs->rs.rs, req, key);
	if (xs->cache_buf == NULL || memcmp(key, xs->cache_key, 32) != 0) {
		git_oid *haves = calloc(req->nhaves ? req->nhaves : 1, sizeof(*haves));
		struct stat st;
		if (haves == NULL)
			return ME_ENOMEM;
		for (size_t i = 0; i < req->nhaves; i++)
			git_oid_fromraw(&haves[i], req->haves[i]);
		snprintf(path, sizeof(path), "%s/serve.bundle", a->root);
		if ((fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0) {
			free(haves);
			return ME_EIO;
		}
		rc = bundle_write(xs->repo, xs->rs.rs.refs, xs->rs.rs.nrefs, haves, req->nhaves, fd,
				  NULL, err, sizeof(err));
		free(haves);
		if (rc == 0 && (fstat(fd, &st) < 0 || (uint64_t)st.st_size > a->xo.max_bundle))
			rc = ME_ETOOBIG;
		free(xs->cache_buf);
		xs->cache_buf = NULL;
		if (rc == 0 && (xs->cache_buf = malloc((size_t)st.st_size + 1)) == NULL)
			rc = ME_ENOMEM;
		if (rc == 0 && pread(fd, xs->cache_buf, (size_t)st.st_size, 0) != st.st_size)
			rc = ME_EIO;
		close(fd);
		unlink(path);
		if (rc < 0) {
			free(xs->cache_buf);
			xs->cache_buf = NULL;
			fprintf(stderr, "me-peer: cannot build a bundle: %s %s\n", me_strerror(rc),
				err);
			return rc;
		}
		xs->cache_len = (size_t)st.st_size;
		memcpy(xs->cache_key, key, 32);
	}
	if ((*out = malloc(xs->cache_len + 1)) == NULL)
		return ME_ENOMEM;
	memcpy(*out, xs->cache_buf, xs->cache_len);
	*len = xs->cache_len;
	return 0;
}

/* The bytes of --bundle-file (a crafted bundle), in memory. */
static int file_bundle(struct app *a, uint8_t **out, size_t *len)
{
	struct stat st;
	int fd;

	if (a->xo.bundle_file == NULL || (fd = open(a->xo.bundle_file, O_RDONLY | O_CLOEXEC)) < 0)
		return ME_ENOTFOUND;
	if (fstat(fd, &st) < 0 || st.st_size <= 0 || (uint64_t)st.st_size > a->xo.max_bundle ||
	    (*out = malloc((size_t)st.st_size)) == NULL) {
		close(fd);
		return ME_EIO;
	}
	if (pread(fd, *out, (size_t)st.st_size, 0) != st.st_size) {
		free(*out);
		*out = NULL;
		close(fd);
		return ME_EIO;
	}
	close(fd);
	*len = (size_t)st.st_size;
	return 0;
}

/* Applies the mode's change to the bundle bytes. */
static int mutate(struct xserve *sv)
{
	struct bundle_header h;
	char err[256];
	int rc;

	if (sv->mode->mutate == MUT_NONE)
		return 0;
	if ((rc = bundle_header_parse(sv->buf, sv->len, &h, err, sizeof(err))) < 0) {
		fprintf(stderr, "me-peer: our own bundle does not parse: %s\n", err);
		return rc;
	}
	size_t hl = h.len, packlen = sv->len - h.len;
	char line[GIT_OID_HEXSZ + sizeof(EXTRA_REF) + 2];
	if (sv->mode->mutate == MUT_EXTRA_REF && h.nrefs > 0)
		git_oid_tostr(line, GIT_OID_HEXSZ + 1, &h.refs[0].oid);
	size_t nrefs = h.nrefs;
	bundle_header_free(&h);
	if (sv->mode->mutate == MUT_FLIP_PACK) {
		if (packlen < 12 + 20 + 1)
			return ME_EINVAL;
		/* the middle of the objects: between the pack header and its trailer */
		sv->buf[hl + 12 + (packlen - 32) / 2] ^= 0x01;
		return 0;
	}
	/* MUT_EXTRA_REF: one more line before the blank line that ends the header */
	if (nrefs == 0)
		return ME_EINVAL;
	size_t ll = strlen(line);
	ll += (size_t)snprintf(line + ll, sizeof(line) - ll, " %s\n", EXTRA_REF);
	uint8_t *nb = malloc(sv->len + ll);
	if (nb == NULL)
		return ME_ENOMEM;
	memcpy(nb, sv->buf, hl - 1);
	memcpy(nb + hl - 1, line, ll);
	memcpy(nb + hl - 1 + ll, sv->buf + hl - 1, sv->len - (hl - 1));
	free(sv->buf);
	sv->buf = nb;
	sv->len += ll;
	return 0;
}

static void on_acked(uv_timer_t *t)
{
	struct xserve *sv = t->data;

	if (sv->x == NULL || net_xfer_queued(sv->x) > 0)
		return;
	uv_timer_stop(t);
	printf("cut %s %s at=%" PRIu64 " of %zu to %s\n", sv->mode->name, sv->a->xs->id, sv->pos,
	       sv->len, sv->peer_did);
	net_xfer_reset(sv->x, NET_ERR_CANCEL);
}

static void serve_pump(struct xserve *sv)
{
	msgpack_sbuffer sb;
	int rc = 0;

	if (sv->x == NULL || sv->finished)
		return;
	msgpack_sbuffer_init(&sb);
	while (sv->pos < sv->end && net_xfer_queued(sv->x) < PUMP_AHEAD) {
		size_t n = sv->end - sv->pos < CHUNK ? (size_t)(sv->end - sv->pos) : CHUNK;
		if ((rc = xmsg_encode_data(&sb, sv->buf + sv->pos, n)) < 0 ||
		    (rc = mx_send_sb(sv->x, &sb)) < 0)
			break;
		sv->pos += n;
	}
	if (rc == ME_EBUSY)
		rc = 0;
	if (rc < 0) {
		printf("serve %s stopped at %" PRIu64 ": %s\n", sv->mode->name, sv->pos,
		       me_strerror(rc));
		sv->finished = 1;
	} else if (sv->pos < sv->end) {
		net_xfer_want_writable(sv->x);
	} else {
		sv->finished = 1;
		if (sv->send_done && sv->again != NULL) {
			/* O_REPEAT: Done, then the same Start and data once more */
			if ((rc = xmsg_encode_done(&sb, sv->done_digest)) == 0 &&
			    (rc = msgpack_sbuffer_write(&sb, (const char *)sv->again,
							sv->again_len) != 0 ? ME_ENOMEM : 0) == 0 &&
			    (rc = mx_send_sb(sv->x, &sb)) == 0) {
				printf("repeating %s %s to %s\n", sv->mode->name, sv->a->xs->id,
				       sv->peer_did);
				free(sv->again);
				sv->again = NULL;
				sv->pos = 0;
				sv->finished = 0;
				net_xfer_want_writable(sv->x);
			}
		} else if (sv->send_done) {
			if ((rc = xmsg_encode_done(&sb, sv->done_digest)) == 0 &&
			    (rc = mx_send_sb(sv->x, &sb)) == 0)
				net_xfer_finish(sv->x);
			printf("served %s %s sent=%" PRIu64 " to %s\n", sv->mode->name, sv->a->xs->id,
			       sv->pos, sv->peer_did);
		} else if (sv->mode->cut == CUT_RESET) {
			/* reset once the data is acknowledged, so the requester has it all */
			uv_timer_init(&sv->a->loop, &sv->trickle);
			sv->trickle.data = sv;
			sv->timer_on = 1;
			uv_timer_start(&sv->trickle, on_acked, 20, 20);
		} else {
			printf("cut %s %s at=%" PRIu64 " of %zu to %s\n", sv->mode->name,
			       sv->a->xs->id, sv->pos, sv->len, sv->peer_did);
		}
	}
	msgpack_sbuffer_destroy(&sb);
}

/* One more byte, forever (well, until the bundle's end). */
static void on_trickle(uv_timer_t *t)
{
	struct xserve *sv = t->data;
	msgpack_sbuffer sb;

	if (sv->x == NULL || sv->pos >= sv->len)
		return;
	msgpack_sbuffer_init(&sb);
	if (xmsg_encode_data(&sb, sv->buf + sv->pos, 1) == 0 && mx_send_sb(sv->x, &sb) == 0)
		sv->pos++;
	msgpack_sbuffer_destroy(&sb);
}

/* Answers a request with a bundle, as the mode says. */
static int serve_bundle(struct xserve *sv, const struct xmsg *req)
{
	struct app *a = sv->a;
	struct xstate *xs = a->xs;
	const struct serve_mode *md = sv->mode;
	uint8_t digest[XMSG_DIGEST_LEN], start_digest[XMSG_DIGEST_LEN];
	const uint8_t *creator = xs->creator_pk;
	char fname[GMSG_MAX_NAME + 16];
	struct gmsg_refstate rs = xs->rs.rs;
	msgpack_sbuffer sb;
	uint64_t off = 0, total;
	int rc;

	if (md->answer == A_FILE)
		rc = file_bundle(a, &sv->buf, &sv->len);
	else
		rc = honest_bundle(a, req, &sv->buf, &sv->len);
	if (rc < 0 || (rc = mutate(sv)) < 0)
		return rc;
	me_sha3_256_2(sv->buf, sv->len, NULL, 0, digest);
	/* a resume is honoured whatever the mode: it is about the bytes, not the lie */
	if (req->has_resume && memcmp(req->resume_digest, digest, XMSG_DIGEST_LEN) == 0 &&
	    req->resume_offset <= sv->len)
		off = req->resume_offset;
	total = md->total == T_HUGE ? HUGE_SIZE : md->total == T_SHORT ? sv->len - 1 : sv->len;
	if (off > total)
		off = total;
	memcpy(start_digest, digest, sizeof(digest));
	if (md->digest == D_WRONG_BOTH)
		start_digest[0] ^= 0xff;
	memcpy(sv->done_digest, start_digest, sizeof(digest));
	if (md->digest == D_WRONG_DONE)
		sv->done_digest[XMSG_DIGEST_LEN - 1] ^= 0xff;
	snprintf(fname, sizeof(fname), "%s.bundle", xs->name);

	switch (md->rs) {
	case RS_CREATOR:
	case RS_TRAVERSAL:
		break;
	case RS_OTHER_SIGNER:
	case RS_CLAIM_CREATOR:
		if ((rc = gmsg_refstate_sign(&xs->other, &rs)) < 0)
			return rc;
		if (md->rs == RS_CLAIM_CREATOR)
			creator = xs->other.pk;
		break;
	case RS_OTHER_REPO:
		/* signed by us: the creator's own key when we are the creator */
		rs.repo_id = gmsg_str(xs->other_id);
		if ((rc = gmsg_refstate_sign(&a->kp, &rs)) < 0)
			return rc;
		break;
	}
	msgpack_sbuffer_init(&sb);
	if (md->order == O_DATA_FIRST)
		rc = xmsg_encode_data(&sb, sv->buf, sv->len < CHUNK ? sv->len : CHUNK);
	for (int i = 0; rc == 0 && i < (md->order == O_TWO_STARTS ? 2 : 1); i++) {
		if (md->rs == RS_TRAVERSAL)
			rc = put_start_raw(&sb, md->file_name ? md->file_name : fname, total,
					   start_digest, off, creator, &rs, TRAVERSAL_ID, &a->kp);
		else
			rc = xmsg_encode_start(&sb, md->file_name ? md->file_name : fname, total,
					       start_digest, off, creator, &rs);
	}
	if (rc == 0 && md->order == O_REPEAT) {
		/* kept to be sent again after the first Done */
		if ((sv->again = malloc(sb.size)) == NULL)
			rc = ME_ENOMEM;
		else
			memcpy(sv->again, sb.data, sv->again_len = sb.size);
	}
	if (rc == 0)
		rc = mx_send_sb(sv->x, &sb);
	msgpack_sbuffer_destroy(&sb);
	if (rc < 0)
		return rc;
	printf("start %s %s total=%" PRIu64 " size=%zu offset=%" PRIu64 " seq=%" PRIu64
	       " to %s\n", md->name, xs->id, total, sv->len, off, rs.seq, sv->peer_did);
	sv->pos = off;
	sv->end = md->order == O_DONE_FIRST ? off : md->cut != CUT_NONE ? off + (sv->len - off) / 2
									  : sv->len;
	sv->send_done = md->cut == CUT_NONE || md->cut == CUT_SHORT;
	if (md->cut == CUT_TRICKLE) {
		sv->end = off;
		sv->finished = 1;
		uv_timer_init(&a->loop, &sv->trickle);
		sv->trickle.data = sv;
		sv->timer_on = 1;
		uv_timer_start(&sv->trickle, on_trickle, TRICKLE_MS, TRICKLE_MS);
		printf("trickling %s %s to %s\n", md->name, xs->id, sv->peer_did);
		return 0;
	}
	serve_pump(sv);
	return 0;
}

static int serve_on_frame(void *ud, struct net_xfer *x, const uint8_t *body, size_t len)
{
	struct xserve *sv = ud;
	struct app *a = sv->a;
	struct xstate *xs = a->xs;
	msgpack_sbuffer sb;
	struct xmsg m;
	int rc;
	(void)x;

	if (sv->got_request) {
		printf("frame after the request from %s\n", sv->peer_did);
		return 0;
	}
	if ((rc = xmsg_decode(body, len, &m)) < 0 || m.type != XMSG_REQUEST) {
		printf("request invalid %s from %s\n", rc < 0 ? me_strerror(rc) : "type",
		       sv->peer_did);
		xmsg_free(&m);
		return ME_EPROTO;
	}
	sv->got_request = 1;
	sv->mode = mx_current_mode(a);
	xs->served++;
	printf("request %.*s haves=%zu resume=%d offset=%" PRIu64 " mode=%s from %s\n",
	       (int)m.repo_id.len, m.repo_id.ptr, m.nhaves, m.has_resume, m.resume_offset,
	       sv->mode->name, sv->peer_did);
	msgpack_sbuffer_init(&sb);
	rc = 0;
	if (!mx_ready_to_serve(a) || !gmsg_str_eq(m.repo_id, gmsg_str(xs->id))) {
		if ((rc = xmsg_encode_error(&sb, ME_ENOTFOUND, "not here")) == 0 &&
		    (rc = mx_send_sb(sv->x, &sb)) == 0)
			net_xfer_finish(sv->x);
	} else if (sv->mode->answer == A_ERROR) {
		if ((rc = xmsg_encode_error(&sb, ME_ENOTFOUND, "mepeer says no")) == 0 &&
		    (rc = mx_send_sb(sv->x, &sb)) == 0)
			net_xfer_finish(sv->x);
		printf("served error %s to %s\n", xs->id, sv->peer_did);
	} else if (sv->mode->answer == A_GARBAGE) {
		if ((rc = mx_put_garbage(&sb)) == 0 && (rc = mx_send_sb(sv->x, &sb)) == 0)
			printf("served garbage %s to %s\n", xs->id, sv->peer_did);
	} else if (sv->mode->answer == A_SILENT) {
		printf("served silent %s to %s\n", xs->id, sv->peer_did);
	} else {
		rc = serve_bundle(sv, &m);
	}
	msgpack_sbuffer_destroy(&sb);
	xmsg_free(&m);
	if (rc < 0) {
		fprintf(stderr, "me-peer: cannot serve: %s\n", me_strerror(rc));
		net_xfer_reset(sv->x, NET_ERR_CANCEL);
	}
	return 0;
}

static void serve_on_writable(void *ud, struct net_xfer *x)
{
	(void)x;
	serve_pump(ud);
}

static void serve_on_closed(void *ud, struct net_xfer *x, uint64_t app_error, const char *why)
{
	struct xserve *sv = ud;
	(void)x;

	printf("closed serve %s app_error=0x%" PRIx64 " sent=%" PRIu64 " from %s (%s)\n",
	       sv->mode ? sv->mode->name : "-", app_error, sv->pos, sv->peer_did, why ? why : "");
	sv->x = NULL;
	mx_serve_free(sv);
}

static const struct net_xfer_callbacks serve_cb = {
	.frame = serve_on_frame,
	.writable = serve_on_writable,
	.closed = serve_on_closed,
};

int xfer_accept(void *ud, struct peer *p, struct net_xfer *x)
{
	struct app *a = ud;
	struct xstate *xs = a->xs;
	struct xserve *sv;

	if (xs == NULL || (a->xo.repo_path == NULL && a->xo.relay_id == NULL) ||
	    xs->nserves >= XFER_MAX_SERVES || (sv = calloc(1, sizeof(*sv))) == NULL) {
		printf("refused stream from %s\n", net_peer_did(p));
		return ME_EBUSY;
	}
	sv->a = a;
	sv->x = x;
	snprintf(sv->peer_did, sizeof(sv->peer_did), "%s", net_peer_did(p));
	sv->next = xs->serves;
	xs->serves = sv;
	xs->nserves++;
	net_xfer_set_callbacks(x, &serve_cb, sv);
	return 0;
}

