/* Peer gossip messages: the signed envelope, NodeAnnouncement, RepoAnnouncement and the ref state
 * signed by a repository's creator. docs/peer-protocol.md ("Gossip messages") is the contract;
 * keep it in step with this file.
 *
 * Envelope on the wire (canonical msgpack, anything else is refused):
 *     [origin_pk bin32, ts_ms uint64, ttl fixint, type uint, payload bin, sig bin64]
 * ts_ms is always the 9-byte form 0xcf + 8 bytes big-endian, so ttl is one positive-fixint byte
 * at GMSG_TTL_OFFSET and a relay rewrites it in place (gmsg_envelope_set_ttl). The origin signs
 *     ["megaengine-gossip-v1", origin_pk bin32, ts_ms (0xcf form), type, payload bin]
 * (everything but ttl); the message id is SHA3-256 of those signed bytes.
 *
 * Decoded structures borrow: their strings and the payload point into the buffer that was
 * decoded (keep it alive and unchanged while they are used) and carry explicit lengths; strings
 * are not NUL-terminated. A NodeAnnouncement decodes into a fixed structure; a RepoAnnouncement
 * owns one allocation (its repos and refs), released with gmsg_repo_ann_free().
 *
 * Errors: ME_EPROTO malformed (wrong shape, type, syntax, order), ME_ETOOBIG a count or length
 * over the limits below, ME_EPERM bad signature, ME_EINVAL bad arguments to an encoder (same
 * rules as the decoders, which also give ME_ETOOBIG), ME_ENOMEM. */
#ifndef ME_GOSSIP_MSG_H
#define ME_GOSSIP_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <msgpack.h>

#include "common/ids.h"
#include "common/keys.h"

#define GMSG_ENVELOPE_TAG "megaengine-gossip-v1"
#define GMSG_REFSTATE_TAG "megaengine-refstate-v1"

enum gmsg_type {
	GMSG_NODE_ANN = 1,
	GMSG_REPO_ANN = 2,
};

/* Envelope. */
#define GMSG_ID_LEN 32
#define GMSG_MAX_TTL 16 /* acceptance: a larger ttl is dropped */
#define GMSG_TTL_ENC_MAX 127 /* encoding: ttl is one positive fixint byte */
#define GMSG_TTL_OFFSET 44 /* 0x96 | c4 20 pk[32] | cf ts[8] | ttl */
#define GMSG_MAX_TYPE 255
#define GMSG_MAX_PAYLOAD (1u << 20)
#define GMSG_ENVELOPE_OVERHEAD 118 /* largest envelope minus its payload */
#define GMSG_MAX_ENVELOPE (GMSG_MAX_PAYLOAD + GMSG_ENVELOPE_OVERHEAD)
#define GMSG_MAX_FUTURE_MS (10 * 60 * 1000)
#define GMSG_MAX_AGE_MS (5 * 60 * 1000) /* also the dedup window */

/* NodeAnnouncement. */
#define GMSG_MAX_ALIAS 64
#define GMSG_MAX_ADDRS 8
#define GMSG_MAX_ADDR_LEN 64
#define GMSG_MAX_NODE_TYPE 255
#define GMSG_MAX_VERSION 32

/* RepoAnnouncement and ref state. */
#define GMSG_MAX_REPOS 1024
#define GMSG_MAX_NAME 255
#define GMSG_MAX_DESC 1024
#define GMSG_MAX_REFS 10000 /* per ref state */
#define GMSG_MAX_ANN_REFS 20000 /* over all ref states of one announcement */
#define GMSG_MAX_REFNAME 255

/* A byte string with an explicit length (not NUL-terminated; ptr may be NULL when len is 0). */
struct gmsg_str {
	const char *ptr;
	size_t len;
};

static inline struct gmsg_str gmsg_str(const char *s)
{
	struct gmsg_str r = { s, 0 };

	while (s != NULL && s[r.len] != '\0')
		r.len++;
	return r;
}

bool gmsg_str_eq(struct gmsg_str a, struct gmsg_str b);
/* Bytewise order (unsigned), a proper prefix first: the order of refs and repos. */
int gmsg_str_cmp(struct gmsg_str a, struct gmsg_str b);

/* ---- envelope ---- */

struct gmsg_envelope {
	uint8_t origin_pk[ME_PK_LEN];
	char origin_did[ME_DID_KEY_SIZE]; /* did:key derived from origin_pk */
	uint64_t ts_ms;
	unsigned ttl;
	unsigned type;
	const uint8_t *payload; /* into the decoded buffer */
	size_t payload_len;
	uint8_t sig[ME_SIG_LEN];
	uint8_t id[GMSG_ID_LEN]; /* SHA3-256 of the signed bytes: independent of ttl */
};

/* Signs and appends one envelope to out (which is left as it was on failure).
 * ttl <= GMSG_TTL_ENC_MAX, 1 <= type <= GMSG_MAX_TYPE, len <= GMSG_MAX_PAYLOAD. */
int gmsg_envelope_encode(const struct me_keypair *kp, uint64_t ts_ms, unsigned ttl, unsigned type,
			 const void *payload, size_t len, msgpack_sbuffer *out);
/* Decodes buf[0..len) (exactly one canonical envelope), verifies the signature and computes the
 * id. Any type 1..255 is accepted here: the caller ignores types it does not know. */
int gmsg_envelope_decode(const uint8_t *buf, size_t len, struct gmsg_envelope *out);
/* Rewrites the ttl of an envelope in place, for relaying; the signature and the id do not
 * change. Meant for a buffer gmsg_envelope_decode() accepted: the layout is checked again (else
 * ME_EPROTO), ttl > GMSG_TTL_ENC_MAX gives ME_EINVAL. */
int gmsg_envelope_set_ttl(uint8_t *buf, size_t len, unsigned ttl);
/* Acceptance window: 0 when now - GMSG_MAX_AGE_MS <= ts_ms <= now + GMSG_MAX_FUTURE_MS, else
 * ME_ETIMEDOUT with *reason (if reason is not NULL) saying which side; ME_EINVAL when now_ms is
 * negative. Pure. */
int gmsg_check_time(uint64_t ts_ms, int64_t now_ms, const char **reason);

/* ---- NodeAnnouncement (type 1) ----
 * payload: [did_pk bin32, alias str, addrs [str...], node_type uint, version str] */

struct gmsg_node_ann {
	uint8_t pk[ME_PK_LEN]; /* the announced node: must equal the envelope's origin */
	char did[ME_DID_KEY_SIZE]; /* filled by decode; ignored by encode */
	struct gmsg_str alias; /* <= 64 bytes UTF-8, no control characters, may be empty */
	struct gmsg_str addrs[GMSG_MAX_ADDRS]; /* see gmsg_addr_parse */
	size_t naddrs;
	unsigned node_type; /* <= 255 */
	struct gmsg_str version; /* <= 32 bytes, same text rules as alias */
};

int gmsg_node_ann_encode(const struct gmsg_node_ann *a, msgpack_sbuffer *out);
int gmsg_node_ann_decode(const uint8_t *buf, size_t len, struct gmsg_node_ann *out);
/* Decodes the payload of e (ME_EINVAL unless e->type is GMSG_NODE_ANN) and checks that the
 * announced node is the origin: ME_EPERM when it is not. */
int gmsg_node_ann_from_envelope(const struct gmsg_envelope *e, struct gmsg_node_ann *out);

/* "a.b.c.d:port" or "[ipv6]:port": numeric addresses only, port 1..65535 in decimal without
 * leading zeros, at most GMSG_MAX_ADDR_LEN bytes. Refused: 0.0.0.0/8, 224.0.0.0/4 (multicast),
 * 255.255.255.255, ::, ff00::/8 (multicast), IPv4-mapped and IPv4-compatible IPv6, zone ids.
 * Fills ss/sslen when not NULL. 0, ME_EPROTO or ME_ETOOBIG. */
int gmsg_addr_parse(const char *s, size_t len, struct sockaddr_storage *ss, socklen_t *sslen);

/* ---- ref state and RepoAnnouncement (type 2) ----
 * payload:  [[repo...]]                  repos strictly sorted by id
 * repo:     [id str, name str, description str, creator_pk bin32, refstate]
 * refstate: [repo_id str, seq uint, head str, [[name str, oid bin20]...], sig bin64]
 * refstate sig = Ed25519 by creator_pk over the canonical msgpack of
 *     ["megaengine-refstate-v1", repo_id, seq, head, [[name, oid]...]] */

struct gmsg_ref {
	struct gmsg_str name; /* refs/heads/... or refs/tags/..., git check-ref-format rules */
	uint8_t oid[ME_OID_LEN];
};

struct gmsg_refstate {
	struct gmsg_str repo_id; /* the repository's did:repo */
	uint64_t seq; /* creator's clock in ms, strictly increasing per repository */
	struct gmsg_str head; /* "" or a ref name valid like those of refs */
	struct gmsg_ref *refs; /* strictly sorted by name (gmsg_str_cmp), <= GMSG_MAX_REFS */
	size_t nrefs;
	uint8_t sig[ME_SIG_LEN];
};

struct gmsg_repo {
	struct gmsg_str id; /* did:repo */
	struct gmsg_str name; /* 1..255 bytes, no '/' or NUL, not "." or ".." */
	struct gmsg_str description; /* <= 1024 bytes, no NUL */
	uint8_t creator_pk[ME_PK_LEN];
	struct gmsg_refstate refstate; /* refstate.repo_id equals id */
};

struct gmsg_repo_ann {
	struct gmsg_repo *repos; /* strictly sorted by id (gmsg_str_cmp), <= GMSG_MAX_REPOS */
	size_t nrepos;
};

/* A ref name announced in a ref state: under refs/heads/ or refs/tags/, <= GMSG_MAX_REFNAME
 * bytes and valid for `git check-ref-format`. */
bool gmsg_refname_valid(const char *s, size_t len);
/* qsort comparators (by name, by id). */
int gmsg_ref_cmp(const void *a, const void *b);
int gmsg_repo_cmp(const void *a, const void *b);

/* Checks the ref state (everything but the signature) and signs it into rs->sig. */
int gmsg_refstate_sign(const struct me_keypair *kp, struct gmsg_refstate *rs);
/* 0 when rs is well formed and rs->sig is creator_pk's signature over it, else ME_EPERM (or
 * ME_EPROTO / ME_ETOOBIG for a malformed state, ME_ENOMEM). The decoder does not verify ref
 * states: the caller verifies each one it is about to store, against that repo's creator_pk. */
int gmsg_refstate_verify(const struct gmsg_refstate *rs, const uint8_t creator_pk[ME_PK_LEN]);

int gmsg_repo_ann_encode(const struct gmsg_repo_ann *a, msgpack_sbuffer *out);
/* On success *out owns memory: gmsg_repo_ann_free(). On failure *out is empty. */
int gmsg_repo_ann_decode(const uint8_t *buf, size_t len, struct gmsg_repo_ann *out);
void gmsg_repo_ann_free(struct gmsg_repo_ann *a);

/* ---- tree control messages (Plumtree: docs/peer-protocol.md "Epidemic broadcast tree") ----
 * Hop by hop between two connected peers, never relayed, unsigned: they carry only message ids.
 *     [kind fixint, [id bin32 ...]]     canonical msgpack, exactly this shape
 * A gossip frame whose body starts with 0x92 (fixarray of 2) is a control message, one that
 * starts with 0x96 an envelope (gmsg_is_ctl). Id counts: IHAVE 1..GMSG_CTL_MAX_IDS, GRAFT
 * 0..GMSG_CTL_MAX_IDS (none: only "push to me eagerly"), PRUNE none. */
enum gmsg_ctl_kind {
	GMSG_IHAVE = 1, /* I hold these messages (lazy push) */
	GMSG_GRAFT = 2, /* push to me eagerly from now on, and send me these messages */
	GMSG_PRUNE = 3, /* stop pushing to me eagerly (send IHAVE instead) */
};

#define GMSG_CTL_MAX_IDS 256
#define GMSG_CTL_MAX_BODY (2 + 3 + GMSG_CTL_MAX_IDS * (2 + GMSG_ID_LEN))

struct gmsg_ctl {
	unsigned kind;
	size_t nids;
	uint8_t ids[GMSG_CTL_MAX_IDS][GMSG_ID_LEN];
};

/* true when body is meant as a control message (its first byte is 0x92). */
bool gmsg_is_ctl(const uint8_t *body, size_t len);
/* Appends one control message body (no frame header). ME_EINVAL for an unknown kind or an id
 * count the decoder would refuse (ids may be NULL when nids is 0), ME_ENOMEM. */
int gmsg_ctl_encode(unsigned kind, const uint8_t (*ids)[GMSG_ID_LEN], size_t nids,
		    msgpack_sbuffer *out);
/* Decodes exactly one canonical control message: ME_EPROTO for anything else (unknown kind,
 * wrong count for the kind, non-canonical forms, trailing bytes), ME_ETOOBIG for more than
 * GMSG_CTL_MAX_IDS ids. */
int gmsg_ctl_decode(const uint8_t *buf, size_t len, struct gmsg_ctl *out);

/* ---- transfer messages (docs/peer-protocol.md §3), one per frame on a transfer stream ----
 * request: [1, repo_id str, [oid bin20...], nil | [digest bin32, offset uint]]
 * start:   [2, file_name str, total_size uint, digest bin32, offset uint, creator_pk bin32,
 *           refstate(, parts)]   parts: [[offset uint, count uint]...], 1..XMSG_MAX_PARTS
 * data:    [3, bytes bin]        1..XMSG_MAX_DATA bytes
 * done:    [4, digest bin32]
 * error:   [5, code int, message str] */
enum { XMSG_REQUEST = 1, XMSG_START, XMSG_DATA, XMSG_DONE, XMSG_ERROR };

#define XMSG_DIGEST_LEN 32
#define XMSG_MAX_HAVES 20000
#define XMSG_MAX_DATA 65536
#define XMSG_MAX_FILENAME 255
#define XMSG_MAX_ERRMSG 256
#define XMSG_MAX_BODY (GMSG_MAX_PAYLOAD + 4096) /* largest message body */
#define XMSG_MAX_PARTS 64

/* Where a bundle's pack can be cut into self-contained packs (a sender's hint, see
 * docs/peer-protocol.md §3): part i starts at bundle offset v[i].offset with an entry and holds
 * v[i].count entries, up to the next part or the pack's trailer; no delta refers to an entry
 * of another part. The decoder checks the shape only: offsets strictly increasing and below
 * total_size, counts >= 1; whether they fit the pack is the receiver's to find out. n == 0:
 * none (the start has 7 elements). */
struct xmsg_parts {
	uint32_t n;
	struct {
		uint64_t offset, count;
	} v[XMSG_MAX_PARTS];
};

struct xmsg {
	unsigned type;
	/* request */
	struct gmsg_str repo_id; /* a well-formed did:repo */
	uint8_t (*haves)[ME_OID_LEN]; /* owned: xmsg_free */
	size_t nhaves;
	int has_resume;
	uint8_t resume_digest[XMSG_DIGEST_LEN];
	uint64_t resume_offset;
	/* start */
	struct gmsg_str file_name; /* <= XMSG_MAX_FILENAME bytes, no NUL: informational only */
	uint64_t total_size;
	uint8_t digest[XMSG_DIGEST_LEN]; /* start and done */
	uint64_t offset; /* <= total_size */
	uint8_t creator_pk[ME_PK_LEN];
	struct gmsg_refstate refstate; /* structure checked, signature NOT verified; refs owned */
	struct xmsg_parts parts;
	/* data */
	const uint8_t *data;
	size_t len;
	/* error */
	int64_t code; /* negative */
	struct gmsg_str message; /* <= XMSG_MAX_ERRMSG bytes, no NUL */
};

/* Decodes one body. Strings and data borrow buf (keep it alive); arrays are owned: xmsg_free.
 * ME_EPROTO for anything malformed (unknown type, wrong shape or types, a bad id, offset past
 * total_size, empty or oversized data), ME_ETOOBIG for a body over XMSG_MAX_BODY or too many
 * haves or refs, ME_ENOMEM. On failure *out is empty. */
int xmsg_decode(const uint8_t *buf, size_t len, struct xmsg *out);
void xmsg_free(struct xmsg *m);

/* Encoders append one complete frame (u32 length + body) to out; ME_EINVAL for arguments the
 * decoder would refuse, ME_ENOMEM. On failure out is unchanged. */
int xmsg_encode_request(msgpack_sbuffer *out, const char *repo_id,
			const uint8_t (*haves)[ME_OID_LEN], size_t nhaves,
			const uint8_t *resume_digest, uint64_t resume_offset);
int xmsg_encode_start(msgpack_sbuffer *out, const char *file_name, uint64_t total_size,
		      const uint8_t digest[XMSG_DIGEST_LEN], uint64_t offset,
		      const uint8_t creator_pk[ME_PK_LEN], const struct gmsg_refstate *rs);
/* The same with the pack's parts (parts NULL or n == 0: none, as above). */
int xmsg_encode_start_parts(msgpack_sbuffer *out, const char *file_name, uint64_t total_size,
			    const uint8_t digest[XMSG_DIGEST_LEN], uint64_t offset,
			    const uint8_t creator_pk[ME_PK_LEN], const struct gmsg_refstate *rs,
			    const struct xmsg_parts *parts);
/* Whether parts has the shape the decoder accepts for a bundle of total_size bytes. */
bool xmsg_parts_valid(const struct xmsg_parts *parts, uint64_t total_size);
int xmsg_encode_data(msgpack_sbuffer *out, const void *data, size_t len);
int xmsg_encode_done(msgpack_sbuffer *out, const uint8_t digest[XMSG_DIGEST_LEN]);
int xmsg_encode_error(msgpack_sbuffer *out, int code, const char *message);

#endif
