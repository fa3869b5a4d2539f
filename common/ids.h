/* Identifiers.
 *  node: did:key:z6Mk...  = "did:key:z" + base58btc(0xed 0x01 || 32-byte Ed25519 public key)
 *        The original MegaEngine's form "did:key:z" + base58btc(0xed || key) (ids starting
 *        "z2D") is accepted on input and normalised to the standard form.
 *  repo: did:repo:z...    = "did:repo:z" + base58btc(0x16 0x20 || SHA3-256(root oid[20] || pk[32]))
 *        (a multihash: 0x16 = sha3-256, 0x20 = 32 bytes). */
#ifndef ME_IDS_H
#define ME_IDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ME_PK_LEN 32
#define ME_OID_LEN 20
/* Buffer sizes that always fit an id, including the NUL. */
#define ME_DID_KEY_SIZE 64
#define ME_DID_REPO_SIZE 64

/* Returns 0, or ME_ETOOBIG if outsz is too small. */
int me_did_key_from_pk(const uint8_t pk[ME_PK_LEN], char *out, size_t outsz);
/* Parses a standard or legacy did:key into the public key. Returns 0 or ME_EBADID. */
int me_did_key_parse(const char *s, uint8_t pk[ME_PK_LEN]);
/* Parses and rewrites an id into the standard form (out may alias nothing). 0 or ME_EBADID. */
int me_did_key_normalize(const char *s, char *out, size_t outsz);

/* Computes the did:repo of a repository from its root commit and its creator. */
int me_did_repo_compute(const uint8_t root_oid[ME_OID_LEN], const uint8_t creator_pk[ME_PK_LEN],
			char *out, size_t outsz);
/* Parses a did:repo into its 32-byte SHA3-256 digest. 0 or ME_EBADID. */
int me_did_repo_parse(const char *s, uint8_t digest[32]);
/* True when s is a well-formed did:repo (cheap check used to validate arguments). */
bool me_did_repo_valid(const char *s);

#endif
