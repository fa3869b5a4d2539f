/* Between the refs the store keeps (names and 40-hex oids) and the signed ref states gossip
 * carries (struct gmsg_refstate: raw oids, sorted by name): one conversion and one signer for
 * the planes that need them (gossip, sync, watch). */
#ifndef ME_REFSTATE_H
#define ME_REFSTATE_H

#include <stddef.h>
#include <stdint.h>

#include "common/gossip_msg.h"
#include "daemon/node.h"
#include "daemon/store.h"

/* The raw SHA-1 of a stored 40-hex oid: 0 or ME_EINVAL. */
int refstate_oid(const char *hex, uint8_t out[ME_OID_LEN]);

/* Sets rs->refs and rs->nrefs to refs as a ref state carries them (names point into refs;
 * sorted); the caller frees rs->refs. 0, ME_ENOMEM, or ME_EINVAL for an oid that is not 40
 * hex digits (rs->refs is then NULL). */
int refstate_from_refs(struct gmsg_refstate *rs, const struct store_ref *refs, size_t n);

/* Signs head and refs as state seq of repository id with the node's key and stores it;
 * sig (may be NULL) gets the signature. ME_ENOKEY without an identity. */
int refstate_sign_store(struct node *node, const char *id, int64_t seq, const char *head,
			const struct store_ref *refs, size_t n, uint8_t sig[ME_SIG_LEN]);

#endif
