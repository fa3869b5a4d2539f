/* Peer gossip stream: the bytes a peer sends on its unidirectional stream, read as daemon/net.c
 * reads them (me_frame_reader, NET_MAX_FRAME), each frame decoded as daemon/gossip.c decodes
 * it: gmsg_envelope_decode (signature checked), then the payload by type
 * (gmsg_node_ann_from_envelope; gmsg_repo_ann_decode and gmsg_refstate_verify of every ref
 * state).
 *
 * Invariants: the payload lies inside the frame; an accepted envelope still decodes, with the
 * same id, after gmsg_envelope_set_ttl (what a relay does); the ref states of an accepted
 * announcement fail verification only by their signature. The payload decoders have targets
 * of their own (node-ann, repo-ann): mutated envelopes rarely keep a valid signature.
 *
 * Frames that start with 0x92 are tree control messages (IHAVE / GRAFT / PRUNE) and are
 * decoded with gmsg_ctl_decode, as gossip.c does: a decoded one has a known kind, an id count
 * allowed for it, and encodes back to exactly the same bytes (the form is canonical). */
#include <string.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/gossip_msg.h"
#include "daemon/net.h"
#include "tests/fuzz/fuzz.h"

static void check_envelope(const uint8_t *body, size_t len)
{
	struct gmsg_envelope e, e2;
	int rc = gmsg_envelope_decode(body, len, &e);

	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_ETOOBIG || rc == ME_EPERM);
		return;
	}
	FUZZ_ASSERT(e.type >= 1 && e.type <= GMSG_MAX_TYPE && e.ttl <= GMSG_TTL_ENC_MAX);
	FUZZ_ASSERT(e.payload_len <= GMSG_MAX_PAYLOAD);
	FUZZ_ASSERT(e.payload_len == 0 ||
		    (e.payload >= body && e.payload + e.payload_len <= body + len));
	FUZZ_ASSERT(strncmp(e.origin_did, "did:key:z", 9) == 0);

	/* Relaying rewrites the ttl in place: the message stays valid and keeps its id. */
	uint8_t *copy = malloc(len);
	FUZZ_ASSERT(copy != NULL);
	memcpy(copy, body, len);
	unsigned ttl = (e.ttl + 1) % (GMSG_MAX_TTL + 1);
	FUZZ_ASSERT(gmsg_envelope_set_ttl(copy, len, ttl) == 0);
	FUZZ_ASSERT(gmsg_envelope_decode(copy, len, &e2) == 0);
	FUZZ_ASSERT(e2.ttl == ttl && memcmp(e2.id, e.id, GMSG_ID_LEN) == 0);
	FUZZ_ASSERT(e2.ts_ms == e.ts_ms && e2.type == e.type && e2.payload_len == e.payload_len);
	free(copy);

	if (e.type == GMSG_NODE_ANN) {
		struct gmsg_node_ann a;
		rc = gmsg_node_ann_from_envelope(&e, &a);
		FUZZ_ASSERT(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG || rc == ME_EPERM);
		if (rc == 0)
			FUZZ_ASSERT(memcmp(a.pk, e.origin_pk, ME_PK_LEN) == 0);
	} else if (e.type == GMSG_REPO_ANN) {
		struct gmsg_repo_ann ann;
		rc = gmsg_repo_ann_decode(e.payload, e.payload_len, &ann);
		FUZZ_ASSERT(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG);
		for (size_t i = 0; rc == 0 && i < ann.nrepos; i++) {
			int vrc = gmsg_refstate_verify(&ann.repos[i].refstate,
						       ann.repos[i].creator_pk);
			FUZZ_ASSERT(vrc == 0 || vrc == ME_EPERM);
		}
		gmsg_repo_ann_free(&ann);
	}
}

static void check_ctl(const uint8_t *body, size_t len)
{
	static struct gmsg_ctl c;
	int rc = gmsg_ctl_decode(body, len, &c);

	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_ETOOBIG);
		return;
	}
	FUZZ_ASSERT(c.kind >= GMSG_IHAVE && c.kind <= GMSG_PRUNE);
	FUZZ_ASSERT(c.nids <= GMSG_CTL_MAX_IDS && len <= GMSG_CTL_MAX_BODY);
	FUZZ_ASSERT(c.kind != GMSG_IHAVE || c.nids >= 1);
	FUZZ_ASSERT(c.kind != GMSG_PRUNE || c.nids == 0);
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	FUZZ_ASSERT(gmsg_ctl_encode(c.kind, (const uint8_t(*)[GMSG_ID_LEN])c.ids, c.nids, &sb) == 0);
	FUZZ_ASSERT(sb.size == len && memcmp(sb.data, body, len) == 0);
	msgpack_sbuffer_destroy(&sb);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct me_frame_reader rd;
	size_t off = 0;
	const uint8_t *body;
	size_t len;
	int rc;

	me_frame_reader_init(&rd, NET_MAX_FRAME);
	rc = me_frame_reader_feed(&rd, data, size);
	FUZZ_ASSERT(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG);
	while (me_frame_reader_next(&rd, &body, &len) > 0) {
		FUZZ_ASSERT(size - off >= ME_FRAME_HDR + len && len == be32(data + off));
		FUZZ_ASSERT(memcmp(body, data + off + ME_FRAME_HDR, len) == 0);
		off += ME_FRAME_HDR + len;
		if (gmsg_is_ctl(body, len))
			check_ctl(body, len);
		else
			check_envelope(body, len);
	}
	me_frame_reader_free(&rd);
	return 0;
}
