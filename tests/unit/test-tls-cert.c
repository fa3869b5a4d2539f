/* TLS identity (daemon/tls.c): the certificate made from the node key, and real QUIC v1 +
 * TLS 1.3 handshakes between two in-memory ngtcp2 connections: mutual authentication, the
 * expected server key, a client without a certificate, ALPN mismatch.
 *
 * The test includes tls.c to reach its static helpers (ctx_new, session_new,
 * self_signature_ok) and build deliberately broken peers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "daemon/tls.c"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>

#include "common/keys.h"

/* ---------------------------------------------------------------------------------------
 * An in-memory QUIC pair: a client and a server ngtcp2_conn that hand datagrams to each other
 * directly, with a fake path and a clock that only moves when we say so. The server
 * connection is created from the client's first Initial, as a real listener would
 * (ngtcp2_accept, then ngtcp2_conn_server_new with the client's DCID as original_dcid).
 * A side whose read fails sends a CONNECTION_CLOSE (TLS alert or transport error) that is
 * delivered to the other side at once.
 * ------------------------------------------------------------------------------------- */

#define PAIR_MAX_ROUNDS 64
#define PAIR_DGRAM_MAX 1500
#define PAIR_MAX_JUMP (5 * NGTCP2_SECONDS)

struct qpeer {
	ngtcp2_crypto_conn_ref conn_ref; /* WOLFSSL app data -> this peer -> conn */
	ngtcp2_conn *conn;
	struct tls_session *tls;	 /* set by the test before pair_run */
	struct sockaddr_in local, remote;
	int rv;				 /* first ngtcp2 error on this side (0: none) */
	int closed;			 /* closing or draining: nothing more to send */
	uint8_t alert;			 /* TLS alert this side raised, when rv is CRYPTO */
};

struct qpair {
	struct qpeer c, s;
	ngtcp2_tstamp ts;
};

static ngtcp2_conn *get_conn(ngtcp2_crypto_conn_ref *ref)
{
	return ((struct qpeer *)ref->user_data)->conn;
}

static void rand_cb(uint8_t *dest, size_t len, const ngtcp2_rand_ctx *ctx)
{
	(void)ctx;
	randombytes_buf(dest, len);
}

static int new_cid_cb(ngtcp2_conn *conn, ngtcp2_cid *cid, uint8_t *token, size_t cidlen,
		      void *user_data)
{
	(void)conn, (void)user_data;
	randombytes_buf(cid->data, cidlen);
	cid->datalen = cidlen;
	randombytes_buf(token, NGTCP2_STATELESS_RESET_TOKENLEN);
	return 0;
}

static void callbacks(ngtcp2_callbacks *cb, int is_server)
{
	memset(cb, 0, sizeof(*cb));
	if (is_server) {
		cb->recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
	} else {
		cb->client_initial = ngtcp2_crypto_client_initial_cb;
		cb->recv_retry = ngtcp2_crypto_recv_retry_cb;
	}
	cb->recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb;
	cb->encrypt = ngtcp2_crypto_encrypt_cb;
	cb->decrypt = ngtcp2_crypto_decrypt_cb;
	cb->hp_mask = ngtcp2_crypto_hp_mask_cb;
	cb->update_key = ngtcp2_crypto_update_key_cb;
	cb->delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb;
	cb->delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb;
	cb->get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb;
	cb->version_negotiation = ngtcp2_crypto_version_negotiation_cb;
	cb->rand = rand_cb;
	cb->get_new_connection_id = new_cid_cb;
}

static void fake_addr(struct sockaddr_in *sa, uint16_t port)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sa->sin_port = htons(port);
}

static ngtcp2_path peer_path(struct qpeer *p)
{
	ngtcp2_path path = {
		.local = { .addr = (struct sockaddr *)&p->local, .addrlen = sizeof(p->local) },
		.remote = { .addr = (struct sockaddr *)&p->remote, .addrlen = sizeof(p->remote) },
	};
	return path;
}

static void settings_params(ngtcp2_settings *st, ngtcp2_transport_params *tp, ngtcp2_tstamp ts)
{
	ngtcp2_settings_default(st);
	st->initial_ts = ts;
	ngtcp2_transport_params_default(tp);
	tp->initial_max_streams_bidi = 4;
	tp->initial_max_stream_data_bidi_local = 64 * 1024;
	tp->initial_max_stream_data_bidi_remote = 64 * 1024;
	tp->initial_max_data = 256 * 1024;
	tp->max_idle_timeout = 30 * NGTCP2_SECONDS; /* > PAIR_MAX_JUMP */
}

/* Prepares both peers; the test then makes p->c.tls and p->s.tls with &p->X.conn_ref. */
static void pair_init(struct qpair *p)
{
	memset(p, 0, sizeof(*p));
	p->ts = 1000 * NGTCP2_SECONDS;
	fake_addr(&p->c.local, 40001);
	fake_addr(&p->c.remote, 40002);
	fake_addr(&p->s.local, 40002);
	fake_addr(&p->s.remote, 40001);
	p->c.conn_ref.get_conn = get_conn;
	p->c.conn_ref.user_data = &p->c;
	p->s.conn_ref.get_conn = get_conn;
	p->s.conn_ref.user_data = &p->s;
}

static void pair_free(struct qpair *p)
{
	/* The connection first: it may still reference the TLS object. */
	ngtcp2_conn_del(p->c.conn);
	ngtcp2_conn_del(p->s.conn);
	tls_session_free(p->c.tls);
	tls_session_free(p->s.tls);
}

static int client_start(struct qpair *p)
{
	ngtcp2_callbacks cb;
	ngtcp2_settings st;
	ngtcp2_transport_params tp;
	ngtcp2_cid dcid = { .datalen = 16 }, scid = { .datalen = 8 };
	ngtcp2_path path = peer_path(&p->c);

	randombytes_buf(dcid.data, dcid.datalen);
	randombytes_buf(scid.data, scid.datalen);
	callbacks(&cb, 0);
	settings_params(&st, &tp, p->ts);
	if (ngtcp2_conn_client_new(&p->c.conn, &dcid, &scid, &path, NGTCP2_PROTO_VER_V1, &cb, &st,
				   &tp, NULL, &p->c) != 0)
		return -1;
	ngtcp2_conn_set_tls_native_handle(p->c.conn, tls_session_native(p->c.tls));
	return 0;
}

/* The listener's job: a connection for the first acceptable client Initial. */
static int server_accept(struct qpair *p, const uint8_t *pkt, size_t len)
{
	ngtcp2_pkt_hd hd;
	ngtcp2_callbacks cb;
	ngtcp2_settings st;
	ngtcp2_transport_params tp;
	ngtcp2_cid scid = { .datalen = 8 };
	ngtcp2_path path = peer_path(&p->s);

	if (ngtcp2_accept(&hd, pkt, len) != 0)
		return -1;
	randombytes_buf(scid.data, scid.datalen);
	callbacks(&cb, 1);
	settings_params(&st, &tp, p->ts);
	tp.original_dcid = hd.dcid;
	tp.original_dcid_present = 1;
	if (ngtcp2_conn_server_new(&p->s.conn, &hd.scid, &scid, &path, hd.version, &cb, &st, &tp,
				   NULL, &p->s) != 0)
		return -1;
	ngtcp2_conn_set_tls_native_handle(p->s.conn, tls_session_native(p->s.tls));
	return 0;
}

static struct qpeer *other(struct qpair *p, struct qpeer *q)
{
	return q == &p->c ? &p->s : &p->c;
}

static void deliver(struct qpair *p, struct qpeer *to, const uint8_t *pkt, size_t len);

/* Records the first error of q and, unless it is already closing, tells the other side. */
static void peer_fail(struct qpair *p, struct qpeer *q, int rv)
{
	uint8_t buf[PAIR_DGRAM_MAX];
	ngtcp2_path_storage ps;
	ngtcp2_pkt_info pi;
	ngtcp2_ccerr ce;
	ngtcp2_ssize n;

	if (q->rv == 0)
		q->rv = rv;
	if (q->closed)
		return;
	q->closed = 1;
	if (rv == NGTCP2_ERR_DRAINING || rv == NGTCP2_ERR_CLOSING || q->conn == NULL)
		return;
	ngtcp2_ccerr_default(&ce);
	if (rv == NGTCP2_ERR_CRYPTO) {
		q->alert = ngtcp2_conn_get_tls_alert(q->conn);
		ngtcp2_ccerr_set_tls_alert(&ce, q->alert, NULL, 0);
	} else {
		ngtcp2_ccerr_set_liberr(&ce, rv, NULL, 0);
	}
	ngtcp2_path_storage_zero(&ps);
	n = ngtcp2_conn_write_connection_close(q->conn, &ps.path, &pi, buf, sizeof(buf), &ce,
					       p->ts);
	if (n > 0)
		deliver(p, other(p, q), buf, (size_t)n);
}

static void deliver(struct qpair *p, struct qpeer *to, const uint8_t *pkt, size_t len)
{
	ngtcp2_pkt_info pi = { 0 };
	ngtcp2_path path;
	int rv;

	if (to->closed)
		return;
	if (to->conn == NULL && (to != &p->s || server_accept(p, pkt, len) != 0)) {
		peer_fail(p, to, NGTCP2_ERR_INTERNAL);
		return;
	}
	path = peer_path(to);
	rv = ngtcp2_conn_read_pkt(to->conn, &path, &pi, pkt, len, p->ts);
	if (rv != 0)
		peer_fail(p, to, rv);
}

/* Sends everything `from` has to send now. Returns the number of datagrams. */
static int flush(struct qpair *p, struct qpeer *from)
{
	uint8_t buf[PAIR_DGRAM_MAX];
	ngtcp2_path_storage ps;
	ngtcp2_pkt_info pi;
	ngtcp2_ssize n;
	int count = 0;

	if (from->conn == NULL)
		return 0;
	ngtcp2_path_storage_zero(&ps);
	while (!from->closed) {
		n = ngtcp2_conn_write_pkt(from->conn, &ps.path, &pi, buf, sizeof(buf), p->ts);
		if (n < 0) {
			peer_fail(p, from, (int)n);
			break;
		}
		if (n == 0)
			break;
		deliver(p, other(p, from), buf, (size_t)n);
		count++;
	}
	return count;
}

static int completed(const struct qpeer *q)
{
	return q->conn != NULL && ngtcp2_conn_get_handshake_completed(q->conn);
}

/* One round: each side sends what it has; when nothing was in flight the clock jumps to the
 * earliest timer (ACK delay, PTO) and fires it, unless that is more than PAIR_MAX_JUMP away
 * (the idle timeout, which would close a healthy connection). Then a millisecond passes. */
static void pair_step(struct qpair *p)
{
	struct qpeer *q[2] = { &p->c, &p->s };

	if (flush(p, &p->c) + flush(p, &p->s) == 0) {
		ngtcp2_tstamp next = UINT64_MAX;

		for (int i = 0; i < 2; i++)
			if (q[i]->conn != NULL && !q[i]->closed &&
			    ngtcp2_conn_get_expiry(q[i]->conn) < next)
				next = ngtcp2_conn_get_expiry(q[i]->conn);
		if (next != UINT64_MAX && next > p->ts && next - p->ts <= PAIR_MAX_JUMP)
			p->ts = next;
		for (int i = 0; i < 2; i++) {
			int rv;

			if (q[i]->conn == NULL || q[i]->closed ||
			    ngtcp2_conn_get_expiry(q[i]->conn) > p->ts)
				continue;
			rv = ngtcp2_conn_handle_expiry(q[i]->conn, p->ts);
			if (rv != 0)
				peer_fail(p, q[i], rv);
		}
	}
	p->ts += NGTCP2_MILLISECONDS;
}

static int pair_ok(const struct qpair *p)
{
	return completed(&p->c) && completed(&p->s) && !p->c.closed && !p->s.closed;
}

/* Starts the client and runs the exchange until both handshakes are complete or either side
 * has closed. 0 when both completed. */
static int pair_run(struct qpair *p)
{
	if (p->c.tls == NULL || p->s.tls == NULL || client_start(p) != 0)
		return -1;
	for (int round = 0; round < PAIR_MAX_ROUNDS && !p->c.closed && !p->s.closed; round++) {
		if (pair_ok(p))
			return 0;
		pair_step(p);
	}
	return pair_ok(p) ? 0 : -1;
}

/* Keeps exchanging for a few more rounds (HANDSHAKE_DONE, ACKs, post-handshake messages). */
static void pair_settle(struct qpair *p, int rounds)
{
	for (int round = 0; round < rounds && !p->c.closed && !p->s.closed; round++)
		pair_step(p);
}

/* --------------------------------------------------------------------------------------- */

struct fx {
	char tmp[64];
	struct me_keypair a, b;
	struct tls_ctx *ta, *tb;
};

static int rm_cb(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));
	char root[128], certs[160], err[256];
	int created;

	assert_non_null(f);
	snprintf(f->tmp, sizeof(f->tmp), "/tmp/me-test-tls.XXXXXX");
	assert_non_null(mkdtemp(f->tmp));
	snprintf(root, sizeof(root), "%s/a", f->tmp);
	assert_int_equal(me_keypair_init(root, &f->a, &created), 0);
	snprintf(certs, sizeof(certs), "%s/tls", root);
	assert_int_equal(tls_init(&f->ta, &f->a, certs, err, sizeof(err)), 0);
	snprintf(root, sizeof(root), "%s/b", f->tmp);
	assert_int_equal(me_keypair_init(root, &f->b, &created), 0);
	snprintf(certs, sizeof(certs), "%s/tls", root);
	assert_int_equal(tls_init(&f->tb, &f->b, certs, err, sizeof(err)), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;

	tls_free(f->ta);
	tls_free(f->tb);
	me_keypair_wipe(&f->a);
	me_keypair_wipe(&f->b);
	nftw(f->tmp, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

/* --- the certificate -------------------------------------------------------------------- */

static time_t asn1_time(const WOLFSSL_ASN1_TIME *t)
{
	struct tm tm;

	memset(&tm, 0, sizeof(tm));
	assert_int_equal(wolfSSL_ASN1_TIME_to_tm(t, &tm), WOLFSSL_SUCCESS);
	return timegm(&tm);
}

static void test_cert_file(void **state)
{
	struct fx *f = *state;
	char path[160], cn[128];
	uint8_t spki[64], serial[32];
	int len = sizeof(spki), slen = sizeof(serial);
	struct stat st;
	WOLFSSL_X509 *x;
	time_t now = time(NULL), nb, na;
	struct tm tnb, tna;

	snprintf(path, sizeof(path), "%s/a/tls", f->tmp);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0700);
	snprintf(path, sizeof(path), "%s/a/tls/node.crt", f->tmp);
	assert_int_equal(lstat(path, &st), 0);
	assert_true(S_ISREG(st.st_mode));
	assert_int_equal(st.st_mode & 07777, 0644);

	x = wolfSSL_X509_load_certificate_file(path, WOLFSSL_FILETYPE_PEM);
	assert_non_null(x);
	assert_int_equal(wolfSSL_X509_get_version(x), 2); /* OpenSSL's numbering: 2 is v3 */

	/* Public key: the node's. */
	assert_int_equal(wolfSSL_X509_get_pubkey_buffer(x, spki, &len), WOLFSSL_SUCCESS);
	assert_int_equal(len, 44);
	assert_memory_equal(spki, "\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00", 12);
	assert_memory_equal(spki + 12, f->a.pk, ME_PK_LEN);

	/* Subject and issuer CN: the did:key. */
	assert_true(wolfSSL_X509_NAME_get_text_by_NID(wolfSSL_X509_get_subject_name(x),
						      NID_commonName, cn, sizeof(cn)) > 0);
	assert_string_equal(cn, f->a.did);
	assert_true(wolfSSL_X509_NAME_get_text_by_NID(wolfSSL_X509_get_issuer_name(x),
						      NID_commonName, cn, sizeof(cn)) > 0);
	assert_string_equal(cn, f->a.did);

	/* Self-signed with Ed25519; 16-byte positive serial. */
	assert_true(self_signature_ok(x, f->a.pk));
	assert_false(self_signature_ok(x, f->b.pk));
	assert_int_equal(wolfSSL_X509_get_serial_number(x, serial, &slen), WOLFSSL_SUCCESS);
	assert_int_equal(slen, SERIAL_LEN);
	assert_int_equal(serial[0] & 0x80, 0);

	/* Valid from one hour ago (give the test a minute) for ten calendar years. */
	nb = asn1_time(wolfSSL_X509_get_notBefore(x));
	na = asn1_time(wolfSSL_X509_get_notAfter(x));
	assert_true(nb <= now - 3600 && nb >= now - 3600 - 60);
	assert_non_null(gmtime_r(&nb, &tnb));
	assert_non_null(gmtime_r(&na, &tna));
	assert_int_equal(tna.tm_year, tnb.tm_year + 10);
	assert_true(na - nb >= 3652 * 86400 - 86400 && na - nb <= 3653 * 86400);
	wolfSSL_X509_free(x);

	/* No temporary file is left behind. */
	snprintf(path, sizeof(path), "%s/a/tls/.node.crt.tmp.%ld", f->tmp, (long)getpid());
	assert_int_equal(lstat(path, &st), -1);
}

static void test_cert_encoding(void **state)
{
	uint8_t b[CTC_DATE_SIZE];
	int n = 0;

	(void)state;
	assert_int_equal(asn_time(0, b, &n), 0); /* 1970-01-01T00:00:00Z */
	assert_int_equal(n, 15);
	assert_int_equal(b[0], 0x17);
	assert_int_equal(b[1], 13);
	assert_memory_equal(b + 2, "700101000000Z", 13);
	assert_int_equal(asn_time(2524608000, b, &n), 0); /* 2050-01-01T00:00:00Z */
	assert_int_equal(n, 17);
	assert_int_equal(b[0], 0x18);
	assert_int_equal(b[1], 15);
	assert_memory_equal(b + 2, "20500101000000Z", 15);
}

static void test_init_args(void **state)
{
	struct fx *f = *state;
	struct tls_ctx *t = (struct tls_ctx *)1;
	char err[256], path[160];

	assert_int_equal(tls_init(&t, &f->a, "", err, sizeof(err)), ME_EINVAL);
	assert_int_equal(tls_init(&t, NULL, "/tmp", err, sizeof(err)), ME_EINVAL);
	/* A missing parent directory is not created. */
	snprintf(path, sizeof(path), "%s/missing/tls", f->tmp);
	assert_int_equal(tls_init(&t, &f->a, path, err, sizeof(err)), ME_EIO);
	assert_null(t);
	assert_non_null(strstr(err, "missing"));
	tls_free(NULL);
}

/* --- handshakes ------------------------------------------------------------------------- */

static void test_handshake_mutual(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN];

	pair_init(&p);
	p.c.tls = tls_session_new(f->ta, 0, &p.c.conn_ref, f->b.pk);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_non_null(p.c.tls);
	assert_non_null(p.s.tls);
	/* Nothing is known before the handshake. */
	assert_int_equal(tls_session_peer_pk(p.c.tls, pk), ME_EPERM);

	assert_int_equal(pair_run(&p), 0);
	assert_int_equal(p.c.rv, 0);
	assert_int_equal(p.s.rv, 0);
	assert_int_equal(tls_session_peer_pk(p.c.tls, pk), 0);
	assert_memory_equal(pk, f->b.pk, ME_PK_LEN);
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), 0);
	assert_memory_equal(pk, f->a.pk, ME_PK_LEN);
	assert_string_equal(tls_session_error(p.c.tls), "");
	assert_string_equal(tls_session_error(p.s.tls), "");

	/* TLS 1.3, ALPN agreed on both sides. */
	assert_int_equal(wolfSSL_version(tls_session_native(p.c.tls)), TLS1_3_VERSION);
	assert_true(alpn_negotiated(tls_session_native(p.c.tls)));
	assert_true(alpn_negotiated(tls_session_native(p.s.tls)));

	/* Once everything post-handshake has arrived: the connection is up and the server sent
	 * no session ticket (no resumption, so every handshake carries certificates). */
	pair_settle(&p, 8);
	assert_int_equal(pair_ok(&p), 1);
	assert_false(wolfSSL_SESSION_has_ticket(wolfSSL_get_session(tls_session_native(p.c.tls))));
	pair_free(&p);
}

static void test_handshake_wrong_key(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN], other_pk[ME_PK_LEN];
	char want[ME_DID_KEY_SIZE];
	const char *e;

	memcpy(other_pk, f->b.pk, ME_PK_LEN);
	other_pk[5] ^= 1;
	assert_int_equal(me_did_key_from_pk(other_pk, want, sizeof(want)), 0);

	pair_init(&p);
	p.c.tls = tls_session_new(f->ta, 0, &p.c.conn_ref, other_pk);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);

	assert_int_equal(p.c.rv, NGTCP2_ERR_CRYPTO);
	assert_int_equal(p.c.alert, 48); /* unknown_ca: wolfSSL alerts for its own verdict */
	assert_true(p.s.closed);	 /* the server saw the client's close */
	assert_false(completed(&p.c));
	assert_false(completed(&p.s));
	e = tls_session_error(p.c.tls);
	assert_non_null(strstr(e, f->b.did));
	assert_non_null(strstr(e, want));
	assert_int_equal(tls_session_peer_pk(p.c.tls, pk), ME_EPERM);
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
}

static void test_handshake_client_without_cert(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN];
	char err[256];
	WOLFSSL_CTX *bare = ctx_new(0, NULL, 0, NULL, 0, err, sizeof(err));

	assert_non_null(bare);
	pair_init(&p);
	p.c.tls = session_new(bare, 0, &p.c.conn_ref, f->b.pk, ME_ALPN);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);

	assert_int_equal(p.s.rv, NGTCP2_ERR_CRYPTO);
	assert_false(completed(&p.s));
	assert_true(p.c.closed);
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	assert_string_not_equal(tls_session_error(p.s.tls), "");
	pair_free(&p);
	wolfSSL_CTX_free(bare);
}

static void test_handshake_alpn_mismatch(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN];

	pair_init(&p);
	p.c.tls = session_new(f->ta->client, 0, &p.c.conn_ref, f->b.pk, "megaengine/0");
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);

	assert_int_equal(p.s.rv, NGTCP2_ERR_CRYPTO);
	assert_int_equal(p.s.alert, 120); /* no_application_protocol */
	assert_false(completed(&p.c));
	assert_false(completed(&p.s));
	assert_int_equal(tls_session_peer_pk(p.c.tls, pk), ME_EPERM);
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
}

static void test_handshake_alpn_absent(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN];

	/* A client that offers no ALPN: the server answers without one, and the client's own
	 * check refuses to go on. */
	pair_init(&p);
	p.c.tls = session_new(f->ta->client, 0, &p.c.conn_ref, f->b.pk, NULL);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);

	assert_int_equal(p.c.rv, NGTCP2_ERR_CRYPTO);
	assert_non_null(strstr(tls_session_error(p.c.tls), "ALPN"));
	assert_false(completed(&p.s));
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
}

static char *read_text(const char *path)
{
	FILE *fp = fopen(path, "r");
	char *buf = calloc(1, 4096);
	size_t n;

	assert_non_null(fp);
	assert_non_null(buf);
	n = fread(buf, 1, 4095, fp);
	assert_true(n > 0 && n < 4095);
	fclose(fp);
	return buf;
}

static void test_handshake_chain_rejected(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN];
	char path[160], *pem_a, *pem_b, *chain;
	WOLFSSL_CTX *ctx;

	/* A client sending its certificate followed by another one. */
	snprintf(path, sizeof(path), "%s/a/tls/node.crt", f->tmp);
	pem_a = read_text(path);
	snprintf(path, sizeof(path), "%s/b/tls/node.crt", f->tmp);
	pem_b = read_text(path);
	chain = calloc(1, strlen(pem_a) + strlen(pem_b) + 1);
	assert_non_null(chain);
	strcat(strcat(chain, pem_a), pem_b);
	ctx = f->ta->client;
	assert_int_equal(wolfSSL_CTX_use_certificate_chain_buffer(
				 ctx, (const unsigned char *)chain, (long)strlen(chain)),
			 WOLFSSL_SUCCESS);

	pair_init(&p);
	p.c.tls = tls_session_new(f->ta, 0, &p.c.conn_ref, f->b.pk);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);
	assert_int_equal(p.s.rv, NGTCP2_ERR_CRYPTO);
	assert_non_null(strstr(tls_session_error(p.s.tls), "chain"));
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
	free(pem_a);
	free(pem_b);
	free(chain);
}

static void test_handshake_not_yet_valid(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN], cert[CERT_DER_MAX], key[KEY_DER_MAX];
	int cert_len = 0, key_len = 0;
	char err[256];
	WOLFSSL_CTX *ctx;

	/* A certificate that only becomes valid in two hours. */
	assert_int_equal(make_cert(&f->a, time(NULL) + 3 * 3600, cert, &cert_len, key, &key_len,
				   err, sizeof(err)), 0);
	ctx = ctx_new(0, cert, cert_len, key, key_len, err, sizeof(err));
	assert_non_null(ctx);

	pair_init(&p);
	p.c.tls = session_new(ctx, 0, &p.c.conn_ref, f->b.pk, ME_ALPN);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);
	assert_int_equal(p.s.rv, NGTCP2_ERR_CRYPTO);
	assert_string_equal(tls_session_error(p.s.tls), "peer certificate is not valid now");
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
	wolfSSL_CTX_free(ctx);
}

static void test_handshake_bad_self_signature(void **state)
{
	struct fx *f = *state;
	struct qpair p;
	uint8_t pk[ME_PK_LEN], cert[CERT_DER_MAX], key[KEY_DER_MAX];
	int cert_len = 0, key_len = 0;
	char err[256];
	WOLFSSL_CTX *ctx;

	/* The right key, but the certificate's own signature is broken (its last byte). */
	assert_int_equal(make_cert(&f->a, time(NULL), cert, &cert_len, key, &key_len, err,
				   sizeof(err)), 0);
	cert[cert_len - 1] ^= 0x01;
	ctx = ctx_new(0, cert, cert_len, key, key_len, err, sizeof(err));
	assert_non_null(ctx);

	pair_init(&p);
	p.c.tls = session_new(ctx, 0, &p.c.conn_ref, f->b.pk, ME_ALPN);
	p.s.tls = tls_session_new(f->tb, 1, &p.s.conn_ref, NULL);
	assert_int_not_equal(pair_run(&p), 0);
	assert_int_equal(p.s.rv, NGTCP2_ERR_CRYPTO);
	assert_string_equal(tls_session_error(p.s.tls),
			    "peer certificate is not validly self-signed");
	assert_int_equal(tls_session_peer_pk(p.s.tls, pk), ME_EPERM);
	pair_free(&p);
	wolfSSL_CTX_free(ctx);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_cert_file, setup, teardown),
		cmocka_unit_test(test_cert_encoding),
		cmocka_unit_test_setup_teardown(test_init_args, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_mutual, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_wrong_key, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_client_without_cert, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_handshake_alpn_mismatch, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_alpn_absent, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_chain_rejected, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_not_yet_valid, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handshake_bad_self_signature, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
