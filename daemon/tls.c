#include "daemon/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

/* options.h first: it carries the configure-time settings the other headers depend on. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/quic.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ed25519.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfcrypt/random.h>

#include <ngtcp2/ngtcp2_crypto_wolfssl.h>

#include "common/err.h"
#include "common/ids.h"

#define CERT_FILE "node.crt"
#define CERT_DER_MAX 1024
#define CERT_PEM_MAX 2048
#define KEY_DER_MAX 128
#define SERIAL_LEN 16
#define VALID_FROM_AGO 3600	/* seconds */
#define VALID_YEARS 10
/* QUIC v1 transport parameters extension codepoint (RFC 9001, 8.2). */
#define QUIC_TP_V1 0x39

/* SubjectPublicKeyInfo of an Ed25519 key (RFC 8410): this prefix, then the 32-byte key. */
static const uint8_t ed25519_spki_prefix[] = {
	0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
};
#define ED25519_SPKI_LEN (sizeof(ed25519_spki_prefix) + ME_PK_LEN)

struct tls_ctx {
	WOLFSSL_CTX *client;
	WOLFSSL_CTX *server;
};

struct tls_session {
	WOLFSSL *ssl;
	int has_expected;
	int has_peer;
	uint8_t expected_pk[ME_PK_LEN];
	uint8_t peer_pk[ME_PK_LEN];
	char err[192];
};

__attribute__((format(printf, 4, 5)))
static int errf(char *err, size_t errsz, int rc, const char *fmt, ...)
{
	va_list ap;

	if (err != NULL && errsz > 0) {
		va_start(ap, fmt);
		vsnprintf(err, errsz, fmt, ap);
		va_end(ap);
	}
	return rc;
}

/* --- certificate ------------------------------------------------------------------------ */

/* Encodes t as an X.509 Time for wolfSSL's Cert.beforeDate/afterDate: tag, length, text.
 * UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280, 4.1.2.5). 0 or -1. */
static int asn_time(time_t t, uint8_t out[CTC_DATE_SIZE], int *outsz)
{
	struct tm tm;
	char buf[32];
	int n;

	if (gmtime_r(&t, &tm) == NULL)
		return -1;
	if (tm.tm_year + 1900 < 2050) {
		out[0] = 0x17; /* UTCTime */
		n = snprintf(buf, sizeof(buf), "%02d%02d%02d%02d%02d%02dZ", tm.tm_year % 100,
			     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
		if (n != 13)
			return -1;
	} else {
		out[0] = 0x18; /* GeneralizedTime */
		n = snprintf(buf, sizeof(buf), "%04d%02d%02d%02d%02d%02dZ", tm.tm_year + 1900,
			     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
		if (n != 15)
			return -1;
	}
	out[1] = (uint8_t)n;
	memcpy(out + 2, buf, (size_t)n);
	*outsz = n + 2;
	return 0;
}

/* Self-signed certificate for kp, valid from an hour before now (DER into cert_der), and its
 * private key (DER into key_der). 0 or ME_EINTERNAL. */
static int make_cert(const struct me_keypair *kp, time_t now, uint8_t *cert_der, int *cert_len,
		     uint8_t *key_der, int *key_len, char *err, size_t errsz)
{
	ed25519_key key;
	WC_RNG rng;
	Cert cert;
	struct tm tm;
	time_t before, after;
	int rc = ME_EINTERNAL, n;

	if (wc_InitRng(&rng) != 0)
		return errf(err, errsz, ME_EINTERNAL, "cannot initialise the random generator");
	if (wc_ed25519_init(&key) != 0) {
		wc_FreeRng(&rng);
		return errf(err, errsz, ME_EINTERNAL, "cannot initialise an Ed25519 key");
	}
	/* libsodium's secret key is seed || public key. */
	if (wc_ed25519_import_private_key(kp->sk, ED25519_KEY_SIZE, kp->pk, ED25519_PUB_KEY_SIZE,
					  &key) != 0) {
		errf(err, errsz, rc, "cannot import the node key");
		goto out;
	}

	if (wc_InitCert(&cert) != 0) {
		errf(err, errsz, rc, "cannot initialise the certificate");
		goto out;
	}
	cert.version = 2; /* X.509 v3 */
	cert.sigType = CTC_ED25519;
	cert.selfSigned = 1;
	cert.isCA = 0;
	/* CN = did:key (56 characters; the field holds 63 and a NUL). */
	snprintf(cert.subject.commonName, sizeof(cert.subject.commonName), "%s", kp->did);
	cert.subject.commonNameEnc = CTC_UTF8;

	randombytes_buf(cert.serial, SERIAL_LEN);
	cert.serial[0] = (uint8_t)((cert.serial[0] & 0x7f) | 0x40); /* positive, no leading 0 */
	cert.serialSz = SERIAL_LEN;

	/* wolfSSL would start validity one day ago (cert.daysValid); we set the dates ourselves:
	 * from an hour ago (clock skew) for ten calendar years. */
	before = now - VALID_FROM_AGO;
	if (gmtime_r(&before, &tm) == NULL) {
		errf(err, errsz, rc, "cannot read the clock");
		goto out;
	}
	tm.tm_year += VALID_YEARS;
	after = timegm(&tm);
	if (after == (time_t)-1 || asn_time(before, cert.beforeDate, &cert.beforeDateSz) != 0 ||
	    asn_time(after, cert.afterDate, &cert.afterDateSz) != 0) {
		errf(err, errsz, rc, "cannot encode the certificate validity");
		goto out;
	}

	n = wc_MakeCert_ex(&cert, cert_der, CERT_DER_MAX, ED25519_TYPE, &key, &rng);
	if (n <= 0) {
		errf(err, errsz, rc, "cannot make the certificate");
		goto out;
	}
	n = wc_SignCert_ex(cert.bodySz, cert.sigType, cert_der, CERT_DER_MAX, ED25519_TYPE, &key,
			   &rng);
	if (n <= 0) {
		errf(err, errsz, rc, "cannot sign the certificate");
		goto out;
	}
	*cert_len = n;

	n = wc_Ed25519KeyToDer(&key, key_der, KEY_DER_MAX);
	if (n <= 0) {
		errf(err, errsz, rc, "cannot encode the private key");
		goto out;
	}
	*key_len = n;
	rc = 0;
out:
	wc_ed25519_free(&key);
	sodium_memzero(&key, sizeof(key));
	wc_FreeRng(&rng);
	return rc;
}

static int write_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Writes the PEM form of cert to dir/node.crt: temporary file, fsync, rename, fsync dir. */
static int write_cert(const char *dir, const uint8_t *der, int der_len, char *err, size_t errsz)
{
	uint8_t pem[CERT_PEM_MAX];
	char path[4096], tmp[4096];
	int fd, n, e, rc = ME_EIO;

	if (mkdir(dir, 0700) != 0 && errno != EEXIST)
		return errf(err, errsz, ME_EIO, "cannot create %s: %s", dir, strerror(errno));
	n = snprintf(path, sizeof(path), "%s/" CERT_FILE, dir);
	if (n < 0 || (size_t)n >= sizeof(path))
		return errf(err, errsz, ME_EINVAL, "certificate directory path too long");
	n = snprintf(tmp, sizeof(tmp), "%s/." CERT_FILE ".tmp.%ld", dir, (long)getpid());
	if (n < 0 || (size_t)n >= sizeof(tmp))
		return errf(err, errsz, ME_EINVAL, "certificate directory path too long");

	n = wc_DerToPem(der, (word32)der_len, pem, sizeof(pem), CERT_TYPE);
	if (n <= 0)
		return errf(err, errsz, ME_EINTERNAL, "cannot encode the certificate as PEM");

	(void)unlink(tmp); /* a leftover of a crashed run with our pid */
	fd = open(tmp, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return errf(err, errsz, ME_EIO, "cannot create %s: %s", tmp, strerror(errno));
	if (fchmod(fd, 0644) != 0 || write_all(fd, pem, (size_t)n) != 0 || fsync(fd) != 0) {
		e = errno;
		close(fd);
		unlink(tmp);
		return errf(err, errsz, ME_EIO, "cannot write %s: %s", tmp, strerror(e));
	}
	if (close(fd) != 0 || rename(tmp, path) != 0) {
		e = errno;
		unlink(tmp);
		return errf(err, errsz, ME_EIO, "cannot write %s: %s", path, strerror(e));
	}
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		rc = (fsync(fd) == 0 || errno == EINVAL) ? 0 : ME_EIO;
		close(fd);
	}
	if (rc != 0)
		return errf(err, errsz, ME_EIO, "cannot sync %s", dir);
	return 0;
}

/* --- peer verification ------------------------------------------------------------------ */

static int set_error(struct tls_session *s, const char *msg)
{
	snprintf(s->err, sizeof(s->err), "%s", msg);
	return 0;
}

static int alpn_negotiated(WOLFSSL *ssl)
{
	char *name = NULL;
	unsigned short len = 0;

	return wolfSSL_ALPN_GetProtocol(ssl, &name, &len) == WOLFSSL_SUCCESS && name != NULL &&
	       len == sizeof(ME_ALPN) - 1 && memcmp(name, ME_ALPN, len) == 0;
}

/* The certificate's own signature over its TBS part, by its own key. */
static int self_signature_ok(WOLFSSL_X509 *x, const uint8_t pk[ME_PK_LEN])
{
	const unsigned char *tbs;
	unsigned char sig[ED25519_SIG_SIZE];
	int tbs_len = 0, sig_len = sizeof(sig), res = 0;
	ed25519_key key;

	if (wolfSSL_X509_get_signature_type(x) != CTC_ED25519)
		return 0;
	tbs = wolfSSL_X509_get_tbs(x, &tbs_len);
	if (tbs == NULL || tbs_len <= 0)
		return 0;
	if (wolfSSL_X509_get_signature(x, NULL, &sig_len) != WOLFSSL_SUCCESS ||
	    sig_len != ED25519_SIG_SIZE ||
	    wolfSSL_X509_get_signature(x, sig, &sig_len) != WOLFSSL_SUCCESS)
		return 0;
	if (wc_ed25519_init(&key) != 0)
		return 0;
	if (wc_ed25519_import_public(pk, ME_PK_LEN, &key) != 0 ||
	    wc_ed25519_verify_msg(sig, (word32)sig_len, tbs, (word32)tbs_len, &res, &key) != 0)
		res = 0;
	wc_ed25519_free(&key);
	return res == 1;
}

/* Runs for every certificate the peer sent (wolfSSL is built with WOLFSSL_ALWAYS_VERIFY_CB and
 * WOLFSSL_VERIFY_CB_ALL_CERTS), the leaf last. No CA is ever loaded, so wolfSSL reports the
 * leaf as ASN_NO_SIGNER_E (or ASN_SELF_SIGNED_E); that code masks its date and signature checks,
 * which we therefore do here. Returning 1 overrides wolfSSL's verdict; 0 fails the handshake
 * (wolfSSL sends the alert for its own verdict: unknown_ca). */
static int verify_cb(int preverify, WOLFSSL_X509_STORE_CTX *store)
{
	struct tls_session *s;
	WOLFSSL_X509 *x;
	uint8_t spki[ED25519_SPKI_LEN + 1];
	const uint8_t *pk;
	int len = sizeof(spki), e;

	(void)preverify;
	if (store == NULL || (s = store->userCtx) == NULL)
		return 0;
	if (wolfSSL_X509_STORE_CTX_get_error_depth(store) != 0 || store->totalCerts != 1)
		return set_error(s, "peer sent a certificate chain; only a single self-signed "
				    "certificate is accepted");
	e = wolfSSL_X509_STORE_CTX_get_error(store);
	if (e != 0 && e != ASN_NO_SIGNER_E && e != ASN_SELF_SIGNED_E) {
		snprintf(s->err, sizeof(s->err), "peer certificate rejected: %s",
			 wolfSSL_ERR_reason_error_string((unsigned long)e));
		return 0;
	}
	/* ALPN is settled before any certificate is processed (ClientHello on the server,
	 * EncryptedExtensions on the client): refuse a peer that did not agree on ours. */
	if (!alpn_negotiated(s->ssl))
		return set_error(s, "peer did not negotiate ALPN " ME_ALPN);

	x = wolfSSL_X509_STORE_CTX_get_current_cert(store);
	if (x == NULL || wolfSSL_X509_get_pubkey_buffer(x, spki, &len) != WOLFSSL_SUCCESS ||
	    len != (int)ED25519_SPKI_LEN ||
	    memcmp(spki, ed25519_spki_prefix, sizeof(ed25519_spki_prefix)) != 0)
		return set_error(s, "peer certificate does not carry an Ed25519 key");
	pk = spki + sizeof(ed25519_spki_prefix);

	if (wolfSSL_X509_cmp_current_time(wolfSSL_X509_get_notBefore(x)) != -1 ||
	    wolfSSL_X509_cmp_current_time(wolfSSL_X509_get_notAfter(x)) != 1)
		return set_error(s, "peer certificate is not valid now");
	if (!self_signature_ok(x, pk))
		return set_error(s, "peer certificate is not validly self-signed");

	if (s->has_expected && memcmp(pk, s->expected_pk, ME_PK_LEN) != 0) {
		char got[ME_DID_KEY_SIZE], want[ME_DID_KEY_SIZE];

		if (me_did_key_from_pk(pk, got, sizeof(got)) != 0 ||
		    me_did_key_from_pk(s->expected_pk, want, sizeof(want)) != 0)
			return set_error(s, "peer certificate is for another key");
		snprintf(s->err, sizeof(s->err), "peer certificate is for %s, expected %s", got,
			 want);
		return 0;
	}
	if (s->has_peer && memcmp(pk, s->peer_pk, ME_PK_LEN) != 0)
		return set_error(s, "peer changed its certificate");
	memcpy(s->peer_pk, pk, ME_PK_LEN);
	s->has_peer = 1;
	return 1;
}

/* --- contexts --------------------------------------------------------------------------- */

/* A TLS 1.3 context for QUIC, with cert_der/key_der as its identity when not NULL. */
static WOLFSSL_CTX *ctx_new(int is_server, const uint8_t *cert_der, int cert_len,
			    const uint8_t *key_der, int key_len, char *err, size_t errsz)
{
	static const char *side[] = { "client", "server" };
	int groups[] = { WOLFSSL_ECC_X25519, WOLFSSL_ECC_SECP256R1 };
	WOLFSSL_CTX *ctx;
	const char *what;

	is_server = is_server != 0;
	ctx = wolfSSL_CTX_new(is_server ? wolfTLSv1_3_server_method() :
					  wolfTLSv1_3_client_method());
	if (ctx == NULL) {
		errf(err, errsz, ME_ENOMEM, "cannot create the TLS %s context", side[is_server]);
		return NULL;
	}
	what = "QUIC";
	if ((is_server ? ngtcp2_crypto_wolfssl_configure_server_context(ctx) :
			 ngtcp2_crypto_wolfssl_configure_client_context(ctx)) != 0)
		goto bad;
	what = "identity";
	if (cert_der != NULL &&
	    (wolfSSL_CTX_use_certificate_buffer(ctx, cert_der, cert_len, WOLFSSL_FILETYPE_ASN1) !=
		     WOLFSSL_SUCCESS ||
	     wolfSSL_CTX_use_PrivateKey_buffer(ctx, key_der, key_len, WOLFSSL_FILETYPE_ASN1) !=
		     WOLFSSL_SUCCESS ||
	     wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS))
		goto bad;
	/* After the key: loading a key re-derives the context's signature algorithms. */
	what = "algorithm";
	if (wolfSSL_CTX_set1_sigalgs_list(ctx, "ED25519") != WOLFSSL_SUCCESS ||
	    wolfSSL_CTX_set_groups(ctx, groups, (int)(sizeof(groups) / sizeof(groups[0]))) !=
		    WOLFSSL_SUCCESS)
		goto bad;
	/* No tickets, hence no resumption: every handshake carries certificates. */
	what = "ticket";
	if (is_server && wolfSSL_CTX_no_ticket_TLSv13(ctx) != 0)
		goto bad;
	/* Sessions set their own callback; a session made without one fails verification. */
	wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER | WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT,
			       NULL);
	return ctx;
bad:
	wolfSSL_CTX_free(ctx);
	errf(err, errsz, ME_EINTERNAL, "cannot configure the TLS %s context (%s)", side[is_server],
	     what);
	return NULL;
}

int tls_init(struct tls_ctx **out, const struct me_keypair *kp, const char *cert_dir,
	     char *err, size_t errsz)
{
	uint8_t cert_der[CERT_DER_MAX], key_der[KEY_DER_MAX];
	int cert_len = 0, key_len = 0, rc;
	struct tls_ctx *t;

	if (err != NULL && errsz > 0)
		err[0] = '\0';
	if (out == NULL || kp == NULL || cert_dir == NULL || *cert_dir == '\0')
		return errf(err, errsz, ME_EINVAL, "invalid argument");
	*out = NULL;
	if (sodium_init() < 0)
		return errf(err, errsz, ME_EINTERNAL, "cannot initialise libsodium");
	if (wolfSSL_Init() != WOLFSSL_SUCCESS) /* reference counted; undone in tls_free */
		return errf(err, errsz, ME_EINTERNAL, "cannot initialise wolfSSL");
	t = calloc(1, sizeof(*t));
	if (t == NULL) {
		wolfSSL_Cleanup();
		return errf(err, errsz, ME_ENOMEM, "out of memory");
	}

	rc = make_cert(kp, time(NULL), cert_der, &cert_len, key_der, &key_len, err, errsz);
	if (rc == 0)
		rc = write_cert(cert_dir, cert_der, cert_len, err, errsz);
	if (rc == 0) {
		t->client = ctx_new(0, cert_der, cert_len, key_der, key_len, err, errsz);
		if (t->client != NULL)
			t->server = ctx_new(1, cert_der, cert_len, key_der, key_len, err, errsz);
		if (t->server == NULL)
			rc = ME_EINTERNAL;
	}
	sodium_memzero(key_der, sizeof(key_der));
	if (rc != 0) {
		tls_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

void tls_free(struct tls_ctx *t)
{
	if (t == NULL)
		return;
	wolfSSL_CTX_free(t->client);
	wolfSSL_CTX_free(t->server);
	free(t);
	wolfSSL_Cleanup();
}

/* --- sessions --------------------------------------------------------------------------- */

/* tls_session_new with the ALPN to offer or require as a parameter (NULL: none), so that the
 * unit tests can make a mismatching peer. */
static struct tls_session *session_new(WOLFSSL_CTX *ctx, int is_server,
				       ngtcp2_crypto_conn_ref *conn_ref,
				       const uint8_t *expected_pk, const char *alpn)
{
	struct tls_session *s;

	if (ctx == NULL || conn_ref == NULL)
		return NULL;
	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return NULL;
	s->ssl = wolfSSL_new(ctx);
	if (s->ssl == NULL)
		goto bad;
	if (expected_pk != NULL) {
		memcpy(s->expected_pk, expected_pk, ME_PK_LEN);
		s->has_expected = 1;
	}
	/* App data belongs to ngtcp2 (conn_ref); the verify callback finds the session through
	 * the verify callback context instead. */
	if (wolfSSL_set_app_data(s->ssl, conn_ref) != WOLFSSL_SUCCESS)
		goto bad;
	wolfSSL_SetCertCbCtx(s->ssl, s);
	wolfSSL_set_verify(s->ssl, WOLFSSL_VERIFY_PEER | WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT,
			   verify_cb);
	/* Client: offered. Server: the only protocol accepted; a mismatch is a fatal
	 * no_application_protocol alert, and a client offering none fails verify_cb. */
	if (alpn != NULL && wolfSSL_UseALPN(s->ssl, (char *)alpn, (unsigned int)strlen(alpn),
					    WOLFSSL_ALPN_FAILED_ON_MISMATCH) != WOLFSSL_SUCCESS)
		goto bad;
	wolfSSL_set_quic_transport_version(s->ssl, QUIC_TP_V1);
	if (is_server)
		wolfSSL_set_accept_state(s->ssl);
	else
		wolfSSL_set_connect_state(s->ssl);
	return s;
bad:
	tls_session_free(s);
	return NULL;
}

struct tls_session *tls_session_new(struct tls_ctx *t, int is_server,
				    ngtcp2_crypto_conn_ref *conn_ref, const uint8_t *expected_pk)
{
	if (t == NULL)
		return NULL;
	return session_new(is_server ? t->server : t->client, is_server, conn_ref, expected_pk,
			   ME_ALPN);
}

void tls_session_free(struct tls_session *s)
{
	if (s == NULL)
		return;
	wolfSSL_free(s->ssl);
	free(s);
}

void *tls_session_native(struct tls_session *s)
{
	return s != NULL ? s->ssl : NULL;
}

int tls_session_peer_pk(struct tls_session *s, uint8_t pk[ME_PK_LEN])
{
	if (s == NULL || pk == NULL)
		return ME_EINVAL;
	/* The key counts only once the handshake, and with it CertificateVerify, succeeded. */
	if (!s->has_peer || !wolfSSL_is_init_finished(s->ssl))
		return ME_EPERM;
	memcpy(pk, s->peer_pk, ME_PK_LEN);
	return 0;
}

const char *tls_session_error(const struct tls_session *s)
{
	int e;

	if (s == NULL)
		return "";
	if (s->err[0] != '\0')
		return s->err;
	e = wolfSSL_get_error(s->ssl, WOLFSSL_FATAL_ERROR);
	if (e == WOLFSSL_ERROR_NONE || e == WOLFSSL_ERROR_WANT_READ ||
	    e == WOLFSSL_ERROR_WANT_WRITE)
		return "";
	return wolfSSL_ERR_reason_error_string((unsigned long)e);
}
