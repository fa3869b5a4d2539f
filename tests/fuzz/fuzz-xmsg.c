/* Transfer messages (docs/peer-protocol.md §3): one frame body from a transfer stream,
 * xmsg_decode, as daemon/sync.c decodes it; the ref state of a start message is verified
 * against its creator key, as sync.c does.
 *
 * Invariants: every decoded field is within its documented bounds; a decoded start's ref state
 * fails verification only by its signature; what decodes re-encodes with the xmsg_encode_*
 * function of its type (one frame, its header right), the body decodes to the same message,
 * and encodes again to the same bytes. */
#include <string.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/gossip_msg.h"
#include "tests/fuzz/fuzz.h"

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void cstr(char *buf, size_t bufsz, struct gmsg_str s)
{
	FUZZ_ASSERT(s.len < bufsz);
	memcpy(buf, s.ptr, s.len);
	buf[s.len] = '\0';
}

/* Encodes m as a frame into out. */
static void encode(const struct xmsg *m, msgpack_sbuffer *out)
{
	char s[XMSG_MAX_FILENAME + XMSG_MAX_ERRMSG + ME_DID_REPO_SIZE];
	int rc = ME_EINVAL;

	switch (m->type) {
	case XMSG_REQUEST:
		cstr(s, sizeof(s), m->repo_id);
		rc = xmsg_encode_request(out, s, (const uint8_t(*)[ME_OID_LEN])m->haves, m->nhaves,
					 m->has_resume ? m->resume_digest : NULL,
					 m->resume_offset);
		break;
	case XMSG_START:
		cstr(s, sizeof(s), m->file_name);
		rc = xmsg_encode_start_parts(out, s, m->total_size, m->digest, m->offset,
					     m->creator_pk, &m->refstate, &m->parts);
		break;
	case XMSG_DATA:
		rc = xmsg_encode_data(out, m->data, m->len);
		break;
	case XMSG_DONE:
		rc = xmsg_encode_done(out, m->digest);
		break;
	case XMSG_ERROR:
		cstr(s, sizeof(s), m->message);
		rc = xmsg_encode_error(out, (int)m->code, s);
		break;
	}
	FUZZ_ASSERT(rc == 0);
	FUZZ_ASSERT(out->size > ME_FRAME_HDR && be32((uint8_t *)out->data) == out->size - ME_FRAME_HDR);
}

static void same(const struct xmsg *a, const struct xmsg *b)
{
	FUZZ_ASSERT(a->type == b->type);
	switch (a->type) {
	case XMSG_REQUEST:
		FUZZ_ASSERT(gmsg_str_eq(a->repo_id, b->repo_id) && a->nhaves == b->nhaves);
		FUZZ_ASSERT(a->nhaves == 0 ||
			    memcmp(a->haves, b->haves, a->nhaves * ME_OID_LEN) == 0);
		FUZZ_ASSERT(a->has_resume == b->has_resume);
		FUZZ_ASSERT(!a->has_resume ||
			    (memcmp(a->resume_digest, b->resume_digest, XMSG_DIGEST_LEN) == 0 &&
			     a->resume_offset == b->resume_offset));
		break;
	case XMSG_START:
		FUZZ_ASSERT(gmsg_str_eq(a->file_name, b->file_name));
		FUZZ_ASSERT(a->total_size == b->total_size && a->offset == b->offset);
		FUZZ_ASSERT(memcmp(a->digest, b->digest, XMSG_DIGEST_LEN) == 0);
		FUZZ_ASSERT(memcmp(a->creator_pk, b->creator_pk, ME_PK_LEN) == 0);
		FUZZ_ASSERT(gmsg_str_eq(a->refstate.repo_id, b->refstate.repo_id));
		FUZZ_ASSERT(a->refstate.seq == b->refstate.seq);
		FUZZ_ASSERT(gmsg_str_eq(a->refstate.head, b->refstate.head));
		FUZZ_ASSERT(memcmp(a->refstate.sig, b->refstate.sig, ME_SIG_LEN) == 0);
		FUZZ_ASSERT(a->refstate.nrefs == b->refstate.nrefs);
		for (size_t i = 0; i < a->refstate.nrefs; i++) {
			FUZZ_ASSERT(gmsg_str_eq(a->refstate.refs[i].name, b->refstate.refs[i].name));
			FUZZ_ASSERT(memcmp(a->refstate.refs[i].oid, b->refstate.refs[i].oid,
					   ME_OID_LEN) == 0);
		}
		break;
	case XMSG_DATA:
		FUZZ_ASSERT(a->len == b->len && memcmp(a->data, b->data, a->len) == 0);
		break;
	case XMSG_DONE:
		FUZZ_ASSERT(memcmp(a->digest, b->digest, XMSG_DIGEST_LEN) == 0);
		break;
	case XMSG_ERROR:
		FUZZ_ASSERT(a->code == b->code && gmsg_str_eq(a->message, b->message));
		break;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct xmsg m, m2;
	msgpack_sbuffer s1, s2;
	int rc = xmsg_decode(data, size, &m);

	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_ETOOBIG);
		FUZZ_ASSERT(m.haves == NULL && m.refstate.refs == NULL);
		return 0;
	}
	FUZZ_ASSERT(m.type >= XMSG_REQUEST && m.type <= XMSG_ERROR);
	switch (m.type) {
	case XMSG_REQUEST:
		FUZZ_ASSERT(m.nhaves <= XMSG_MAX_HAVES);
		break;
	case XMSG_START:
		FUZZ_ASSERT(m.offset <= m.total_size && m.file_name.len <= XMSG_MAX_FILENAME);
		rc = gmsg_refstate_verify(&m.refstate, m.creator_pk);
		FUZZ_ASSERT(rc == 0 || rc == ME_EPERM);
		break;
	case XMSG_DATA:
		FUZZ_ASSERT(m.len >= 1 && m.len <= XMSG_MAX_DATA);
		FUZZ_ASSERT(m.data >= data && m.data + m.len <= data + size);
		break;
	case XMSG_ERROR:
		FUZZ_ASSERT(m.code < 0 && m.code >= INT32_MIN);
		FUZZ_ASSERT(m.message.len <= XMSG_MAX_ERRMSG);
		break;
	}

	msgpack_sbuffer_init(&s1);
	msgpack_sbuffer_init(&s2);
	encode(&m, &s1);
	FUZZ_ASSERT(s1.size - ME_FRAME_HDR <= size);
	rc = xmsg_decode((uint8_t *)s1.data + ME_FRAME_HDR, s1.size - ME_FRAME_HDR, &m2);
	FUZZ_ASSERT(rc == 0);
	same(&m, &m2);
	encode(&m2, &s2);
	FUZZ_ASSERT(s1.size == s2.size && memcmp(s1.data, s2.data, s1.size) == 0);
	xmsg_free(&m2);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&s1);
	msgpack_sbuffer_destroy(&s2);
	return 0;
}
