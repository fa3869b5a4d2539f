/* The node's Ed25519 identity (libsodium).
 *
 * File $ROOT/keypair: text, mode 0600, exactly
 *     megaengine-keypair-v1\n
 *     <128 lowercase hex chars: libsodium's 64-byte secret key (seed || public key)>\n
 * Written to a private temporary file (O_EXCL, 0600) in the same directory, fsync'ed, then
 * hard-linked into place with link(), which never replaces an existing file: when two processes
 * initialise the same root concurrently the first complete key wins and the other loads it.
 * The temporary name is unlinked and the directory fsync'ed. A key file that is readable or
 * writable by group or others is refused (ME_EPERM), like ssh does; so is a symbolic link.
 * The public half stored in the file must equal the one derived from the seed (else ME_EKEY). */
#ifndef ME_KEYS_H
#define ME_KEYS_H

#include <stdint.h>

#include "common/ids.h"

#define ME_SK_LEN 64
#define ME_SIG_LEN 64
#define ME_KEYPAIR_FILE "keypair"

struct me_keypair {
	uint8_t pk[ME_PK_LEN];
	uint8_t sk[ME_SK_LEN];
	char did[ME_DID_KEY_SIZE];
};

/* Loads root/keypair. Returns 0, ME_ENOKEY (no file), ME_EPERM (bad mode: message says which),
 * ME_EKEY (malformed content or public key that does not match the secret key), ME_EIO. */
int me_keypair_load(const char *root, struct me_keypair *kp);
/* Creates root/keypair if absent. A missing root is created 0700, but only its last component:
 * a missing parent gives ME_ENOTFOUND. *created is set to 1 when a new key was made, 0 when an
 * existing one was loaded. Same errors as load, plus ME_ENOTFOUND and ME_EINVAL (path too
 * long). */
int me_keypair_init(const char *root, struct me_keypair *kp, int *created);
/* Wipes the secret key from memory. */
void me_keypair_wipe(struct me_keypair *kp);

int me_sign(const struct me_keypair *kp, const void *msg, size_t len, uint8_t sig[ME_SIG_LEN]);
/* Returns 0 when valid, ME_EPERM otherwise. */
int me_verify(const uint8_t pk[ME_PK_LEN], const void *msg, size_t len,
	      const uint8_t sig[ME_SIG_LEN]);

#endif
