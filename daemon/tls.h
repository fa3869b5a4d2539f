/* All TLS code of megaengine lives in tls.c: wolfSSL 1.3 contexts configured for QUIC through
 * ngtcp2_crypto_wolfssl, a self-signed X.509 certificate made at start-up from the node's
 * Ed25519 identity key, mutual authentication, ALPN "megaengine/1", and the peer's identity taken
 * from its certificate's public key (never from anything it says later). */
#ifndef ME_TLS_H
#define ME_TLS_H

#include <stddef.h>
#include <stdint.h>

#include <ngtcp2/ngtcp2_crypto.h>

#include "common/keys.h"

#define ME_ALPN "megaengine/1"

struct tls_ctx;
struct tls_session;

/* Makes the certificate from kp (subject CN = the node's did:key, valid from one hour ago for
 * 10 years, serial random) and writes it as PEM to cert_dir/node.crt (cert_dir is created 0700;
 * the file 0644, written atomically) for inspection. Builds the client and server contexts.
 * 0 or a ME_E* code with err set. */
int tls_init(struct tls_ctx **out, const struct me_keypair *kp, const char *cert_dir,
	     char *err, size_t errsz);
void tls_free(struct tls_ctx *t);

/* A session for one QUIC connection. conn_ref is stored as the WOLFSSL app data, as
 * ngtcp2_crypto_wolfssl requires. For a client session, expected_pk (not NULL) is the key the
 * dialed did:key names: the handshake fails unless the server's certificate carries it. A server
 * session requires a client certificate and accepts any Ed25519 one. NULL on failure. */
struct tls_session *tls_session_new(struct tls_ctx *t, int is_server,
				    ngtcp2_crypto_conn_ref *conn_ref, const uint8_t *expected_pk);
void tls_session_free(struct tls_session *s);
/* The WOLFSSL * to hand to ngtcp2_conn_set_tls_native_handle. */
void *tls_session_native(struct tls_session *s);
/* After the handshake: the peer's Ed25519 public key from its certificate. 0, or ME_EPERM when
 * the peer presented no Ed25519 certificate. */
int tls_session_peer_pk(struct tls_session *s, uint8_t pk[ME_PK_LEN]);
/* Why the last handshake failed (e.g. "certificate is for did:key:z6Mk..., expected ..."), or "". */
const char *tls_session_error(const struct tls_session *s);

#endif
