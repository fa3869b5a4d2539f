/* NodeAnnouncement payload (gossip type 1): gmsg_node_ann_decode.
 *
 * Invariants: what decodes re-encodes (the encoder refuses only what the decoder refuses), the
 * re-encoding decodes to the same announcement, and encoding is then stable (byte-identical);
 * the did is the announced key's; every address parses. */
#include <string.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "tests/fuzz/fuzz.h"

static void same(const struct gmsg_node_ann *a, const struct gmsg_node_ann *b)
{
	FUZZ_ASSERT(memcmp(a->pk, b->pk, ME_PK_LEN) == 0 && strcmp(a->did, b->did) == 0);
	FUZZ_ASSERT(gmsg_str_eq(a->alias, b->alias) && gmsg_str_eq(a->version, b->version));
	FUZZ_ASSERT(a->node_type == b->node_type && a->naddrs == b->naddrs);
	for (size_t i = 0; i < a->naddrs; i++)
		FUZZ_ASSERT(gmsg_str_eq(a->addrs[i], b->addrs[i]));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct gmsg_node_ann a, b, c;
	msgpack_sbuffer s1, s2;
	char did[ME_DID_KEY_SIZE];
	int rc = gmsg_node_ann_decode(data, size, &a);

	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_ETOOBIG);
		return 0;
	}
	FUZZ_ASSERT(me_did_key_from_pk(a.pk, did, sizeof(did)) == 0 && strcmp(did, a.did) == 0);
	FUZZ_ASSERT(a.naddrs <= GMSG_MAX_ADDRS && a.node_type <= GMSG_MAX_NODE_TYPE);
	FUZZ_ASSERT(a.alias.len <= GMSG_MAX_ALIAS && a.version.len <= GMSG_MAX_VERSION);
	for (size_t i = 0; i < a.naddrs; i++) {
		struct sockaddr_storage ss;
		socklen_t sl = 0;
		FUZZ_ASSERT(gmsg_addr_parse(a.addrs[i].ptr, a.addrs[i].len, &ss, &sl) == 0);
		FUZZ_ASSERT(ss.ss_family == (a.addrs[i].ptr[0] == '[' ? AF_INET6 : AF_INET));
		FUZZ_ASSERT(sl > 0 && sl <= sizeof(ss));
	}

	msgpack_sbuffer_init(&s1);
	msgpack_sbuffer_init(&s2);
	FUZZ_ASSERT(gmsg_node_ann_encode(&a, &s1) == 0);
	FUZZ_ASSERT(s1.size <= size); /* the canonical form is the shortest */
	FUZZ_ASSERT(gmsg_node_ann_decode((uint8_t *)s1.data, s1.size, &b) == 0);
	same(&a, &b);
	FUZZ_ASSERT(gmsg_node_ann_encode(&b, &s2) == 0);
	FUZZ_ASSERT(s1.size == s2.size && memcmp(s1.data, s2.data, s1.size) == 0);
	FUZZ_ASSERT(gmsg_node_ann_decode((uint8_t *)s2.data, s2.size, &c) == 0);
	same(&a, &c);
	msgpack_sbuffer_destroy(&s1);
	msgpack_sbuffer_destroy(&s2);
	return 0;
}
