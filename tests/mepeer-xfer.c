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
 * MEPEER_MAX_STREAMS requested streams and XFER_MAX_SERVES served ones at a time. */
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
#include "daemon/mirror.h"
#include "tests/mepeer.h"

#define CHUNK XMSG_MAX_DATA
#define PUMP_AHEAD (1u << 20)
#define HUGE_SIZE (1ull << 50)
#define GARBAGE_LEN 4096
#define XFER_MAX_SERVES 32
#define TRAVERSAL_ID "did:repo:../../x"
#define TRAVERSAL_NAME "../../x"
#define EXTRA_REF "refs/heads/zz-mepeer-extra"
#define TRICKLE_MS 2000

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

/* ---- how requests are answered (--serve) ---- */

enum answer { A_BUNDLE, A_ERROR, A_GARBAGE, A_SILENT };
enum mutation { MUT_NONE, MUT_FLIP_PACK, MUT_EXTRA_REF };
enum rs_kind { RS_CREATOR, RS_OTHER_SIGNER, RS_CLAIM_CREATOR, RS_OTHER_REPO, RS_TRAVERSAL };
enum total_kind { T_EXACT, T_HUGE, T_SHORT };
enum digest_kind { D_OK, D_WRONG_DONE, D_WRONG_BOTH };
enum order { O_NORMAL, O_DATA_FIRST, O_TWO_STARTS, O_DONE_FIRST };
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
	{ .name = "garbage", .answer = A_GARBAGE, .help = "one frame of random bytes" },
	{ .name = "error", .answer = A_ERROR, .help = "Error ENOTFOUND" },
	{ .name = "silent", .answer = A_SILENT, .help = "no answer at all" },
};

#define NMODES (sizeof(modes) / sizeof(modes[0]))
#define NXSENDS (sizeof(xsends) / sizeof(xsends[0]))

/* ---- state ---- */

/* A ref state with memory of its own. */
struct rs_own {
	struct gmsg_refstate rs;
	char *mem;
};

struct xfetch {
	struct app *a;
	struct net_xfer *x;
	int idx, relay, used;
	int phase; /* 0: before Start, 1: data, 2: after Done */
	int fd;
	char path[PATH_MAX];
	struct me_sha3 *h;
	uint64_t total, offset, pos, bytes_in;
	uint8_t digest[XMSG_DIGEST_LEN], computed[XMSG_DIGEST_LEN];
	int has_start, has_done, digest_ok, sig_ok, id_ok, has_error, closed;
	uint64_t seq;
	size_t nrefs;
	char creator[ME_DID_KEY_SIZE];
	char file_name[XMSG_MAX_FILENAME + 1];
	int64_t code;
	char message[XMSG_MAX_ERRMSG + 1];
	char note[160]; /* the first oddity seen */
	unsigned frames;
};

struct xserve {
	struct app *a;
	struct net_xfer *x;
	const struct serve_mode *mode;
	char peer_did[ME_DID_KEY_SIZE];
	int got_request, finished, send_done;
	uint8_t *buf;
	size_t len;
	uint64_t pos, end;
	uint8_t done_digest[XMSG_DIGEST_LEN];
	uv_timer_t trickle;
	int timer_on;
	struct xserve *next;
};

struct xstate {
	/* the repository we hold */
	int have_repo;
	char id[ME_DID_REPO_SIZE];
	char name[GMSG_MAX_NAME + 1];
	char desc[GMSG_MAX_DESC + 1];
	uint8_t creator_pk[ME_PK_LEN];
	struct rs_own rs;
	git_repository *repo;       /* creator mode */
	uint8_t relay_src[ME_PK_LEN];
	int relay_fetching, relay_ready;
	uint8_t *relay_buf;         /* relay mode: the bundle fetched from the source */
	size_t relay_len;
	/* a bundle built for one set of haves, kept for a resume */
	uint8_t cache_key[32];
	uint8_t *cache_buf;
	size_t cache_len;
	/* serve modes by generation */
	const struct serve_mode *mode_list[16];
	size_t nmodes;
	unsigned generation;
	/* a random key and another repository id, for the forgeries */
	struct me_keypair other;
	char other_id[ME_DID_REPO_SIZE];
	uint64_t last_ts;
	/* streams */
	struct xfetch fetches[MEPEER_MAX_STREAMS + 1]; /* the last one: the relay fetch */
	unsigned nfetch, nfetch_closed;
	struct xserve *serves;
	size_t nserves;
	unsigned served;
};

/* ---- small helpers ---- */

static void hex(const uint8_t *p, size_t n, char *out)
{
	sodium_bin2hex(out, 2 * n + 1, p, n);
}

static void json_str(FILE *f, const char *s)
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

static void rs_own_free(struct rs_own *o)
{
	free(o->rs.refs);
	free(o->mem);
	memset(o, 0, sizeof(*o));
}

static int rs_own_set(struct rs_own *o, const struct gmsg_refstate *rs)
{
	size_t need = rs->repo_id.len + rs->head.len + 2;
	struct rs_own n = { 0 };
	char *p;

	for (size_t i = 0; i < rs->nrefs; i++)
		need += rs->refs[i].name.len + 1;
	n.mem = malloc(need);
	n.rs.refs = calloc(rs->nrefs ? rs->nrefs : 1, sizeof(*n.rs.refs));
	if (n.mem == NULL || n.rs.refs == NULL) {
		rs_own_free(&n);
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
	rs_own_free(o);
	*o = n;
	return 0;
}

/* Timestamps of our envelopes: strictly increasing, so none is "older than the newest". */
static uint64_t next_ts(struct xstate *xs)
{
	uint64_t now = (uint64_t)me_now_ms();
	xs->last_ts = now > xs->last_ts ? now : xs->last_ts + 1;
	return xs->last_ts;
}

/* Queues sb's bytes and empties it. They normally are whole frames; bytes the transport would
 * refuse in one piece (a frame whose header announces more than it accepts) go in pieces, so
 * the peer's reader is what refuses them. */
static int send_sb(struct net_xfer *x, msgpack_sbuffer *sb)
{
	const size_t piece = ME_FRAME_HDR + NET_XFER_MAX_FRAME;
	int rc = 0;

	for (size_t off = 0; rc == 0 && off < sb->size; off += piece)
		rc = net_xfer_send(x, sb->data + off, sb->size - off < piece ? sb->size - off : piece);
	msgpack_sbuffer_clear(sb);
	return rc;
}

static int put_garbage(msgpack_sbuffer *sb)
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

/* ---- options ---- */

int xfer_xsend_parse(const char *name)
{
	for (size_t i = 0; i < NXSENDS; i++)
		if (strcmp(xsends[i].name, name) == 0)
			return (int)i;
	return -1;
}

int xfer_serve_parse(const char *name)
{
	for (size_t i = 0; i < NMODES; i++)
		if (strcmp(modes[i].name, name) == 0)
			return (int)i;
	return -1;
}

void xfer_usage(FILE *f)
{
	fprintf(f, "XSEND (what --fetch streams carry):\n");
	for (size_t i = 0; i < NXSENDS; i++)
		fprintf(f, "  %-15s %s\n", xsends[i].name, xsends[i].help);
	fprintf(f, "MODE (--serve, comma-separated; one per announced state):\n");
	for (size_t i = 0; i < NMODES; i++)
		fprintf(f, "  %-15s %s\n", modes[i].name, modes[i].help);
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
		rc = rs_own_set(&xs->rs, &rs);
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

/* The mode the current generation is served with. */
static const struct serve_mode *current_mode(const struct app *a)
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
	rc = mepeer_honest_node(a, next_ts(xs), &out);
	if (rc == 0)
		rc = gmsg_repo_ann_encode(&ann, &pl);
	if (rc == 0)
		rc = mepeer_envelope(&a->kp, next_ts(xs), GMSG_MAX_TTL, GMSG_REPO_ANN, &pl, &out);
	if (rc == 0)
		rc = net_send(p, out.data, out.size);
	if (rc == 0)
		printf("announced %s seq=%" PRIu64 " refs=%zu generation=%u mode=%s to %s\n", xs->id,
		       xs->rs.rs.seq, xs->rs.rs.nrefs, xs->generation, current_mode(a)->name,
		       net_peer_did(p));
	else
		fprintf(stderr, "me-peer: cannot announce to %s: %s\n", net_peer_did(p),
			me_strerror(rc));
	msgpack_sbuffer_destroy(&pl);
	msgpack_sbuffer_destroy(&out);
	return rc;
}

static int ready_to_serve(const struct app *a)
{
	const struct xstate *xs = a->xs;
	return xs->have_repo && (a->xo.repo_path != NULL || xs->relay_ready);
}

/* Announces to every dialed node that is up (but the relay source). */
static void announce_all(struct app *a)
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

	if (xs == NULL || !ready_to_serve(a))
		return;
	if (a->xo.repo_path != NULL) {
		free(xs->cache_buf);
		xs->cache_buf = NULL;
		if (creator_sign(a) < 0)
			return;
	}
	xs->generation++;
	announce_all(a);
}

/* ---- requesting ---- */

static void fetch_json(struct xfetch *f, uint64_t app_error, const char *why)
{
	char d[2 * XMSG_DIGEST_LEN + 1], c[2 * XMSG_DIGEST_LEN + 1];
	const char *result;

	if (f->has_error)
		result = "error";
	else if (f->has_done)
		result = f->digest_ok ? "done" : "bad-digest";
	else if (!f->closed)
		result = "unfinished";
	else if (app_error != 0)
		result = "reset";
	else
		result = "closed";
	hex(f->digest, XMSG_DIGEST_LEN, d);
	hex(f->computed, XMSG_DIGEST_LEN, c);
	printf("{\"stream\":%d,\"relay\":%s,\"result\":\"%s\",\"frames\":%u,\"start\":%s,"
	       "\"total_size\":%" PRIu64 ",\"offset\":%" PRIu64 ",\"received\":%" PRIu64 ","
	       "\"bytes_in\":%" PRIu64 ",\"digest\":\"%s\",\"computed_digest\":\"%s\","
	       "\"seq\":%" PRIu64 ",\"refs\":%zu,\"signature_ok\":%s,\"repo_id_ok\":%s,"
	       "\"creator\":\"%s\",\"app_error\":%" PRIu64 ",\"code\":%" PRId64 ",\"file\":",
	       f->idx, f->relay ? "true" : "false", result, f->frames,
	       f->has_start ? "true" : "false", f->total, f->offset, f->pos - f->offset,
	       f->bytes_in, d, c, f->seq, f->nrefs, f->sig_ok ? "true" : "false",
	       f->id_ok ? "true" : "false", f->creator, app_error, f->code);
	json_str(stdout, f->path);
	printf(",\"file_name\":");
	json_str(stdout, f->file_name);
	printf(",\"message\":");
	json_str(stdout, f->message);
	printf(",\"why\":");
	json_str(stdout, why ? why : "");
	printf(",\"note\":");
	json_str(stdout, f->note);
	printf("}\n");
}

static void fetch_note(struct xfetch *f, const char *what)
{
	if (f->note[0] == '\0')
		snprintf(f->note, sizeof(f->note), "%s", what);
}

static void relay_loaded(struct app *a, struct xfetch *f);

static int fetch_start(struct xfetch *f, const struct xmsg *m)
{
	const char *want = f->relay ? f->a->xo.relay_id : f->a->xo.fetch_id;
	int flags = O_RDWR | O_CREAT | O_CLOEXEC;

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
		if (f->phase != 0) {
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
		for (size_t off = 0; off < m.len;) {
			ssize_t k = write(f->fd, m.data + off, m.len - off);
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0) {
				fetch_note(f, "cannot write --out");
				rc = ME_EIO;
				break;
			}
			off += (size_t)k;
		}
		me_sha3_update(f->h, m.data, m.len);
		f->pos += m.len;
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
		close(f->fd);
		f->fd = -1;
		net_xfer_finish(f->x);
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
	fetch_json(f, app_error, why);
	if (f->relay) {
		xs->relay_fetching = 0;
		if (f->has_done && f->digest_ok)
			relay_loaded(a, f);
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
		return put_garbage(sb);
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
static void fetch_open(struct app *a, struct peer *p, unsigned idx, int relay)
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
		snprintf(f->path, sizeof(f->path), "%s/relay.bundle", a->root);
	else if (a->xo.out != NULL && idx == 0)
		snprintf(f->path, sizeof(f->path), "%s", a->xo.out);
	else if (a->xo.out != NULL)
		snprintf(f->path, sizeof(f->path), "%s.%u", a->xo.out, idx);
	else
		snprintf(f->path, sizeof(f->path), "%s/fetch.%u.bundle", a->root, idx);
	msgpack_sbuffer_init(&sb);
	if (relay)
		rc = xmsg_encode_request(&sb, a->xo.relay_id, NULL, 0, NULL, 0);
	else
		rc = put_xsend(a, a->xo.xsend, &sb);
	if (rc == 0)
		rc = net_xfer_open(p, &fetch_cb, f, &f->x);
	if (rc == 0 && sb.size > 0)
		rc = send_sb(f->x, &sb);
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
		if (rs_own_set(&xs->rs, &r->refstate) < 0)
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
		fetch_open(a, p, MEPEER_MAX_STREAMS, 1);
		break;
	}
	gmsg_repo_ann_free(&ann);
}

static void relay_loaded(struct app *a, struct xfetch *f)
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
	announce_all(a);
}

/* ---- serving ---- */

static void on_trickle_closed(uv_handle_t *h)
{
	free(h->data);
}

static void serve_free(struct xserve *sv)
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
		    (rc = send_sb(sv->x, &sb)) < 0)
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
		if (sv->send_done) {
			if ((rc = xmsg_encode_done(&sb, sv->done_digest)) == 0 &&
			    (rc = send_sb(sv->x, &sb)) == 0)
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
	if (xmsg_encode_data(&sb, sv->buf + sv->pos, 1) == 0 && send_sb(sv->x, &sb) == 0)
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

	if ((rc = honest_bundle(a, req, &sv->buf, &sv->len)) < 0 || (rc = mutate(sv)) < 0)
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
	if (rc == 0)
		rc = send_sb(sv->x, &sb);
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
	sv->mode = current_mode(a);
	xs->served++;
	printf("request %.*s haves=%zu resume=%d offset=%" PRIu64 " mode=%s from %s\n",
	       (int)m.repo_id.len, m.repo_id.ptr, m.nhaves, m.has_resume, m.resume_offset,
	       sv->mode->name, sv->peer_did);
	msgpack_sbuffer_init(&sb);
	rc = 0;
	if (!ready_to_serve(a) || !gmsg_str_eq(m.repo_id, gmsg_str(xs->id))) {
		if ((rc = xmsg_encode_error(&sb, ME_ENOTFOUND, "not here")) == 0 &&
		    (rc = send_sb(sv->x, &sb)) == 0)
			net_xfer_finish(sv->x);
	} else if (sv->mode->answer == A_ERROR) {
		if ((rc = xmsg_encode_error(&sb, ME_ENOTFOUND, "mepeer says no")) == 0 &&
		    (rc = send_sb(sv->x, &sb)) == 0)
			net_xfer_finish(sv->x);
		printf("served error %s to %s\n", xs->id, sv->peer_did);
	} else if (sv->mode->answer == A_GARBAGE) {
		if ((rc = put_garbage(&sb)) == 0 && (rc = send_sb(sv->x, &sb)) == 0)
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
	serve_free(sv);
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

/* ---- the app's hooks ---- */

void xfer_target_up(struct app *a, struct peer *p, int idx)
{
	struct xstate *xs = a->xs;

	if (xs == NULL)
		return;
	if (a->xo.fetch_id != NULL && idx == 0 && xs->nfetch == 0) {
		xs->nfetch = a->xo.streams;
		for (unsigned i = 0; i < a->xo.streams; i++)
			fetch_open(a, p, i, 0);
	}
	if (a->xo.relay_id != NULL && memcmp(net_peer_pk(p), xs->relay_src, ME_PK_LEN) == 0)
		return;
	if (ready_to_serve(a))
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
			fetch_json(f, 0, "me-peer exiting");
		if (f->fd >= 0)
			close(f->fd);
		me_sha3_free(f->h);
	}
	while (xs->serves)
		serve_free(xs->serves);
	rs_own_free(&xs->rs);
	git_repository_free(xs->repo);
	free(xs->relay_buf);
	free(xs->cache_buf);
	me_keypair_wipe(&xs->other);
	free(xs);
	a->xs = NULL;
	if (a->xo.repo_path != NULL || a->xo.relay_id != NULL)
		gitrepo_global_free();
}
