/* RepoAnnouncement payload (gossip type 2) and the signed ref states it carries:
 * gmsg_repo_ann_decode, then gmsg_refstate_verify of each repository's state against its
 * creator key, as daemon/gossip.c does before storing one.
 *
 * Invariants: a decoded ref state is well formed, so verification fails only by its signature
 * (ME_EPERM); what decodes re-encodes, decodes to the same announcement, and encodes again to
 * the same bytes. */
#include <string.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "tests/fuzz/fuzz.h"

static void same_refstate(const struct gmsg_refstate *a, const struct gmsg_refstate *b)
{
	FUZZ_ASSERT(gmsg_str_eq(a->repo_id, b->repo_id) && a->seq == b->seq);
	FUZZ_ASSERT(gmsg_str_eq(a->head, b->head) && a->nrefs == b->nrefs);
	FUZZ_ASSERT(memcmp(a->sig, b->sig, ME_SIG_LEN) == 0);
	for (size_t i = 0; i < a->nrefs; i++) {
		FUZZ_ASSERT(gmsg_str_eq(a->refs[i].name, b->refs[i].name));
		FUZZ_ASSERT(memcmp(a->refs[i].oid, b->refs[i].oid, ME_OID_LEN) == 0);
	}
}

static void same(const struct gmsg_repo_ann *a, const struct gmsg_repo_ann *b)
{
	FUZZ_ASSERT(a->nrepos == b->nrepos);
	for (size_t i = 0; i < a->nrepos; i++) {
		const struct gmsg_repo *x = &a->repos[i], *y = &b->repos[i];
		FUZZ_ASSERT(gmsg_str_eq(x->id, y->id) && gmsg_str_eq(x->name, y->name));
		FUZZ_ASSERT(gmsg_str_eq(x->description, y->description));
		FUZZ_ASSERT(memcmp(x->creator_pk, y->creator_pk, ME_PK_LEN) == 0);
		same_refstate(&x->refstate, &y->refstate);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct gmsg_repo_ann a, b;
	msgpack_sbuffer s1, s2;
	size_t total = 0;
	int rc = gmsg_repo_ann_decode(data, size, &a);

	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_ETOOBIG);
		FUZZ_ASSERT(a.repos == NULL && a.nrepos == 0);
		return 0;
	}
	FUZZ_ASSERT(a.nrepos <= GMSG_MAX_REPOS);
	for (size_t i = 0; i < a.nrepos; i++) {
		const struct gmsg_repo *r = &a.repos[i];
		FUZZ_ASSERT(i == 0 || gmsg_str_cmp(a.repos[i - 1].id, r->id) < 0);
		FUZZ_ASSERT(gmsg_str_eq(r->id, r->refstate.repo_id));
		FUZZ_ASSERT(r->refstate.nrefs <= GMSG_MAX_REFS);
		for (size_t k = 0; k < r->refstate.nrefs; k++)
			FUZZ_ASSERT(gmsg_refname_valid(r->refstate.refs[k].name.ptr,
						       r->refstate.refs[k].name.len));
		total += r->refstate.nrefs;
		rc = gmsg_refstate_verify(&r->refstate, r->creator_pk);
		FUZZ_ASSERT(rc == 0 || rc == ME_EPERM);
	}
	FUZZ_ASSERT(total <= GMSG_MAX_ANN_REFS);

	msgpack_sbuffer_init(&s1);
	msgpack_sbuffer_init(&s2);
	FUZZ_ASSERT(gmsg_repo_ann_encode(&a, &s1) == 0);
	FUZZ_ASSERT(s1.size <= size);
	FUZZ_ASSERT(gmsg_repo_ann_decode((uint8_t *)s1.data, s1.size, &b) == 0);
	same(&a, &b);
	FUZZ_ASSERT(gmsg_repo_ann_encode(&b, &s2) == 0);
	FUZZ_ASSERT(s1.size == s2.size && memcmp(s1.data, s2.data, s1.size) == 0);
	gmsg_repo_ann_free(&b);
	gmsg_repo_ann_free(&a);
	msgpack_sbuffer_destroy(&s1);
	msgpack_sbuffer_destroy(&s2);
	return 0;
}
