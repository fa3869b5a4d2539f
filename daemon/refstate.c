#include "daemon/refstate.h"

#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "common/err.h"

int refstate_oid(const char *hex, uint8_t out[ME_OID_LEN])
{
	size_t n = 0;

	if (strlen(hex) != 2 * ME_OID_LEN ||
	    sodium_hex2bin(out, ME_OID_LEN, hex, 2 * ME_OID_LEN, NULL, &n, NULL) != 0 ||
	    n != ME_OID_LEN)
		return ME_EINVAL;
	return 0;
}

int refstate_from_refs(struct gmsg_refstate *rs, const struct store_ref *refs, size_t n)
{
	rs->nrefs = 0;
	if ((rs->refs = calloc(n ? n : 1, sizeof(*rs->refs))) == NULL)
		return ME_ENOMEM;
	for (size_t i = 0; i < n; i++) {
		rs->refs[i].name = gmsg_str(refs[i].name);
		if (refstate_oid(refs[i].oid, rs->refs[i].oid) < 0) {
			free(rs->refs);
			rs->refs = NULL;
			return ME_EINVAL;
		}
	}
	qsort(rs->refs, n, sizeof(*rs->refs), gmsg_ref_cmp);
	rs->nrefs = n;
	return 0;
}

int refstate_sign_store(struct node *node, const char *id, int64_t seq, const char *head,
			const struct store_ref *refs, size_t n, uint8_t sig[ME_SIG_LEN])
{
	struct gmsg_refstate rs = { .repo_id = gmsg_str(id), .seq = (uint64_t)seq,
				    .head = gmsg_str(head) };
	int rc;

	if (!node->has_key)
		return ME_ENOKEY;
	if ((rc = refstate_from_refs(&rs, refs, n)) < 0)
		return rc;
	if ((rc = gmsg_refstate_sign(&node->kp, &rs)) == 0)
		rc = store_repo_set_refstate(node->store, id, seq, head, rs.sig, refs, n);
	if (rc == 0 && sig != NULL)
		memcpy(sig, rs.sig, ME_SIG_LEN);
	free(rs.refs);
	return rc;
}
