/* Gossip message codec: round trips, canonical bytes, signatures (envelope and ref state), ttl
 * rewriting, forged node announcements, limits, ref names and addresses, hostile input; and the
 * transfer messages (request, start, data, done, error) likewise. */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sodium.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "common/ids.h"
#include "common/keys.h"
#include "common/sha3.h"

static struct me_keypair kp1, kp2;

static void make_kp(struct me_keypair *kp, uint8_t seedbyte)
{
	uint8_t seed[crypto_sign_SEEDBYTES];

	memset(seed, seedbyte, sizeof(seed));
	assert_int_equal(sodium_init() >= 0, 1);
	assert_int_equal(crypto_sign_seed_keypair(kp->pk, kp->sk, seed), 0);
	assert_int_equal(me_did_key_from_pk(kp->pk, kp->did, sizeof(kp->did)), 0);
}

static int group_setup(void **state)
{
	(void)state;
	make_kp(&kp1, 1);
	make_kp(&kp2, 2);
	return 0;
}

/* xorshift64*: reproducible pseudo-random input. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

/* Wrong values for "wrong type in a field" tests. */
enum wrong { W_NONE, W_NIL, W_BOOL, W_NEG, W_FLOAT, W_UINT, W_STR, W_BIN, W_ARRAY, W_MAP, W_COUNT };

static void pack_wrong(msgpack_packer *pk, int w)
{
	switch (w) {
	case W_NIL: msgpack_pack_nil(pk); break;
	case W_BOOL: msgpack_pack_true(pk); break;
	case W_NEG: msgpack_pack_int64(pk, -1); break;
	case W_FLOAT: msgpack_pack_double(pk, 1.5); break;
	case W_UINT: msgpack_pack_uint64(pk, 7); break;
	case W_STR: msgpack_pack_str(pk, 3); msgpack_pack_str_body(pk, "abc", 3); break;
	case W_BIN: msgpack_pack_bin(pk, 3); msgpack_pack_bin_body(pk, "abc", 3); break;
	case W_ARRAY: msgpack_pack_array(pk, 0); break;
	case W_MAP: msgpack_pack_map(pk, 0); break;
	}
}

static void pk_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);

	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

static void pk_bin(msgpack_packer *pk, const void *p, size_t n)
{
	msgpack_pack_bin(pk, n);
	msgpack_pack_bin_body(pk, p, n);
}

/* ======================================================================================== */
/* envelope                                                                                 */
/* ======================================================================================== */

/* The signed bytes, written out by hand from the documented layout. */
static size_t kat_signed(uint8_t *out, const uint8_t *pk, uint64_t ts, uint8_t type,
			 const void *payload, uint8_t plen)
{
	size_t n = 0;

	out[n++] = 0x95;
	out[n++] = 0xb4; /* fixstr, 20 bytes */
	memcpy(out + n, "megaengine-gossip-v1", 20);
	n += 20;
	out[n++] = 0xc4;
	out[n++] = 32;
	memcpy(out + n, pk, 32);
	n += 32;
	out[n++] = 0xcf;
	for (int i = 0; i < 8; i++)
		out[n++] = (uint8_t)(ts >> (56 - 8 * i));
	out[n++] = type;
	out[n++] = 0xc4;
	out[n++] = plen;
	memcpy(out + n, payload, plen);
	return n + plen;
}

static void encode_env(const struct me_keypair *kp, uint64_t ts, unsigned ttl, unsigned type,
		       const void *p, size_t n, msgpack_sbuffer *sb)
{
	msgpack_sbuffer_init(sb);
	assert_int_equal(gmsg_envelope_encode(kp, ts, ttl, type, p, n, sb), 0);
}

static void test_envelope_roundtrip_kat(void **state)
{
	(void)state;
	const uint64_t ts = 1700000000123ull;
	msgpack_sbuffer sb;
	struct gmsg_envelope e;
	uint8_t sbytes[256], id[32];

	encode_env(&kp1, ts, 7, GMSG_NODE_ANN, "hello", 5, &sb);
	/* Wire layout: fixed positions up to ttl. */
	const uint8_t *w = (const uint8_t *)sb.data;
	assert_int_equal(sb.size, 1 + 34 + 9 + 1 + 1 + 2 + 5 + 66);
	assert_int_equal(w[0], 0x96);
	assert_int_equal(w[1], 0xc4);
	assert_int_equal(w[2], 32);
	assert_memory_equal(w + 3, kp1.pk, 32);
	assert_int_equal(w[35], 0xcf);
	assert_int_equal(w[GMSG_TTL_OFFSET], 7);
	assert_int_equal(w[45], 1);
	assert_int_equal(w[46], 0xc4);
	assert_int_equal(w[47], 5);
	assert_memory_equal(w + 48, "hello", 5);
	assert_int_equal(w[53], 0xc4);
	assert_int_equal(w[54], 64);

	assert_int_equal(gmsg_envelope_decode(w, sb.size, &e), 0);
	assert_memory_equal(e.origin_pk, kp1.pk, 32);
	assert_string_equal(e.origin_did, kp1.did);
	assert_true(e.ts_ms == ts);
	assert_int_equal(e.ttl, 7);
	assert_int_equal(e.type, GMSG_NODE_ANN);
	assert_ptr_equal(e.payload, w + 48);
	assert_int_equal(e.payload_len, 5);
	assert_memory_equal(e.sig, w + 55, 64);
	/* Known answer: the signature covers the documented bytes, the id is their SHA3-256. */
	size_t sn = kat_signed(sbytes, kp1.pk, ts, 1, "hello", 5);
	assert_int_equal(me_verify(kp1.pk, sbytes, sn, e.sig), 0);
	assert_int_equal(me_sha3_256_2(sbytes, sn, NULL, 0, id), 0);
	assert_memory_equal(e.id, id, 32);
	msgpack_sbuffer_destroy(&sb);

	/* Another key, same content: another id. */
	struct gmsg_envelope e2;
	encode_env(&kp2, ts, 7, GMSG_NODE_ANN, "hello", 5, &sb);
	assert_int_equal(gmsg_envelope_decode((const uint8_t *)sb.data, sb.size, &e2), 0);
	assert_memory_not_equal(e.id, e2.id, 32);
	msgpack_sbuffer_destroy(&sb);
}

static void test_envelope_sizes_and_types(void **state)
{
	(void)state;
	static const size_t sizes[] = { 0, 1, 255, 256, 65535, 65536, GMSG_MAX_PAYLOAD };
	static const unsigned types[] = { 1, 2, 127, 128, 255 };
	uint8_t *p = malloc(GMSG_MAX_PAYLOAD + 1);
	msgpack_sbuffer sb;
	struct gmsg_envelope e;

	assert_non_null(p);
	for (size_t i = 0; i < GMSG_MAX_PAYLOAD + 1; i++)
		p[i] = (uint8_t)(i * 7);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
			encode_env(&kp1, 42, GMSG_TTL_ENC_MAX, types[t], p, sizes[i], &sb);
			assert_true(sb.size <= GMSG_MAX_ENVELOPE);
			assert_int_equal(((uint8_t *)sb.data)[GMSG_TTL_OFFSET], GMSG_TTL_ENC_MAX);
			assert_int_equal(gmsg_envelope_decode((uint8_t *)sb.data, sb.size, &e), 0);
			assert_int_equal(e.type, types[t]);
			assert_int_equal(e.payload_len, sizes[i]);
			if (sizes[i] > 0)
				assert_memory_equal(e.payload, p, sizes[i]);
			msgpack_sbuffer_destroy(&sb);
		}
	}
	/* Encoder limits; the output buffer is left as it was. */
	msgpack_sbuffer_init(&sb);
	msgpack_sbuffer_write(&sb, "x", 1);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 0, 1, p, GMSG_MAX_PAYLOAD + 1, &sb),
			 ME_ETOOBIG);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 128, 1, p, 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 1, 0, p, 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 1, 256, p, 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 1, 1, NULL, 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_envelope_encode(NULL, 1, 1, 1, p, 1, &sb), ME_EINVAL);
	assert_int_equal(sb.size, 1);
	msgpack_sbuffer_destroy(&sb);
	/* Decoder size bound comes first. */
	assert_int_equal(gmsg_envelope_decode(p, GMSG_MAX_ENVELOPE + 1, &e), ME_ETOOBIG);
	assert_int_equal(gmsg_envelope_decode(p, 0, &e), ME_EPROTO);
	assert_int_equal(gmsg_envelope_decode(NULL, 0, &e), ME_EPROTO);
	free(p);
}

static void test_envelope_ttl_rewrite(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	struct gmsg_envelope e0, e;

	encode_env(&kp1, 1234567, GMSG_MAX_TTL, GMSG_REPO_ANN, "payload!", 8, &sb);
	uint8_t *w = (uint8_t *)sb.data;
	uint8_t *orig = malloc(sb.size);
	assert_non_null(orig);
	memcpy(orig, w, sb.size);
	assert_int_equal(gmsg_envelope_decode(w, sb.size, &e0), 0);
	for (unsigned ttl = 0; ttl <= GMSG_TTL_ENC_MAX; ttl++) {
		assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, ttl), 0);
		for (size_t i = 0; i < sb.size; i++)
			if (i != GMSG_TTL_OFFSET)
				assert_int_equal(w[i], orig[i]);
		assert_int_equal(gmsg_envelope_decode(w, sb.size, &e), 0);
		assert_int_equal(e.ttl, ttl);
		assert_memory_equal(e.id, e0.id, 32);
		assert_memory_equal(e.sig, e0.sig, 64);
		assert_true(e.ts_ms == e0.ts_ms);
		assert_int_equal(e.type, e0.type);
		assert_int_equal(e.payload_len, e0.payload_len);
		assert_memory_equal(e.payload, e0.payload, e0.payload_len);
	}
	/* Relay step: ttl - 1. */
	assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, e0.ttl - 1), 0);
	assert_int_equal(gmsg_envelope_decode(w, sb.size, &e), 0);
	assert_int_equal(e.ttl, GMSG_MAX_TTL - 1);

	assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, 128), ME_EINVAL);
	assert_int_equal(gmsg_envelope_set_ttl(w, GMSG_TTL_OFFSET, 1), ME_EPROTO);
	assert_int_equal(gmsg_envelope_set_ttl(NULL, 0, 1), ME_EPROTO);
	w[35] = 0xce;
	assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, 1), ME_EPROTO);
	w[35] = 0xcf;
	w[GMSG_TTL_OFFSET] = 0xcc;
	assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, 1), ME_EPROTO);
	w[0] = 0x97;
	w[GMSG_TTL_OFFSET] = 1;
	assert_int_equal(gmsg_envelope_set_ttl(w, sb.size, 1), ME_EPROTO);
	free(orig);
	msgpack_sbuffer_destroy(&sb);
}

static void test_envelope_bitflips(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	struct gmsg_envelope e0, e;
	int eperm = 0, eproto = 0;

	encode_env(&kp1, 1700000000000ull, 3, GMSG_NODE_ANN, "abc", 3, &sb);
	uint8_t *w = (uint8_t *)sb.data;
	assert_int_equal(gmsg_envelope_decode(w, sb.size, &e0), 0);
	for (size_t i = 0; i < sb.size; i++) {
		for (int bit = 0; bit < 8; bit++) {
			w[i] ^= (uint8_t)(1u << bit);
			int rc = gmsg_envelope_decode(w, sb.size, &e);
			if (i == GMSG_TTL_OFFSET && bit < 7) {
				/* ttl is outside the signature: another valid message, same id. */
				assert_int_equal(rc, 0);
				assert_memory_equal(e.id, e0.id, 32);
			} else {
				assert_true(rc == ME_EPERM || rc == ME_EPROTO || rc == ME_ETOOBIG);
				eperm += rc == ME_EPERM;
				eproto += rc == ME_EPROTO;
			}
			w[i] ^= (uint8_t)(1u << bit);
		}
	}
	/* Every bit of pk, ts, payload and sig bytes flips into a bad signature. */
	assert_true(eperm >= 8 * (32 + 8 + 3 + 64));
	assert_true(eproto > 0);
	assert_int_equal(gmsg_envelope_decode(w, sb.size, &e), 0);
	msgpack_sbuffer_destroy(&sb);
}

static void test_envelope_truncated(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	struct gmsg_envelope e;

	encode_env(&kp1, 99, 1, GMSG_REPO_ANN, "0123456789", 10, &sb);
	for (size_t n = 0; n < sb.size; n++) {
		uint8_t *copy = malloc(n ? n : 1);
		assert_non_null(copy);
		memcpy(copy, sb.data, n);
		assert_int_equal(gmsg_envelope_decode(copy, n, &e), ME_EPROTO);
		free(copy);
	}
	/* One byte too many. */
	uint8_t *big = malloc(sb.size + 1);
	assert_non_null(big);
	memcpy(big, sb.data, sb.size);
	big[sb.size] = 0xc0;
	assert_int_equal(gmsg_envelope_decode(big, sb.size + 1, &e), ME_EPROTO);
	free(big);
	msgpack_sbuffer_destroy(&sb);
}

/* Hand-built envelopes, correctly signed, whose encoding differs from the canonical one. */
enum envvar {
	V_OK, V_TS_D3, V_TS_MIN, V_TTL_CC, V_TTL_128, V_TYPE_CC, V_TYPE_0, V_PAYLOAD_BIN16,
	V_PAYLOAD_STR, V_ARRAY16, V_ARRAY7, V_TRAILING, V_PK_31, V_PK_STR, V_SIG_63, V_SIG_65,
	V_SIG_STR, V_TS_NEG, V_COUNT
};

static size_t raw_env(uint8_t *out, enum envvar v)
{
	const uint64_t ts = 5000;
	uint8_t sb[256], sig[64];
	size_t n = 0;

	size_t sn = kat_signed(sb, kp1.pk, ts, v == V_TYPE_0 ? 0 : 2, "pl", 2);
	assert_int_equal(me_sign(&kp1, sb, sn, sig), 0);
	if (v == V_ARRAY16) {
		out[n++] = 0xdc;
		out[n++] = 0;
		out[n++] = 6;
	} else {
		out[n++] = v == V_ARRAY7 ? 0x97 : 0x96;
	}
	if (v == V_PK_STR) {
		out[n++] = 0xd9;
		out[n++] = 32;
	} else {
		out[n++] = 0xc4;
		out[n++] = v == V_PK_31 ? 31 : 32;
	}
	memcpy(out + n, kp1.pk, v == V_PK_31 ? 31 : 32);
	n += v == V_PK_31 ? 31 : 32;
	if (v == V_TS_MIN) {
		out[n++] = 0xcd;
		out[n++] = (uint8_t)(ts >> 8);
		out[n++] = (uint8_t)ts;
	} else {
		out[n++] = v == V_TS_D3 ? 0xd3 : 0xcf;
		for (int i = 0; i < 8; i++)
			out[n++] = (uint8_t)(ts >> (56 - 8 * i));
		if (v == V_TS_NEG)
			out[n - 9] = 0xd3, out[n - 8] = 0xff;
	}
	if (v == V_TTL_CC) {
		out[n++] = 0xcc;
		out[n++] = 4;
	} else if (v == V_TTL_128) {
		out[n++] = 0xcc;
		out[n++] = 128;
	} else {
		out[n++] = 4;
	}
	if (v == V_TYPE_CC) {
		out[n++] = 0xcc;
		out[n++] = 2;
	} else {
		out[n++] = v == V_TYPE_0 ? 0 : 2;
	}
	if (v == V_PAYLOAD_BIN16) {
		out[n++] = 0xc5;
		out[n++] = 0;
		out[n++] = 2;
	} else if (v == V_PAYLOAD_STR) {
		out[n++] = 0xa2;
	} else {
		out[n++] = 0xc4;
		out[n++] = 2;
	}
	out[n++] = 'p';
	out[n++] = 'l';
	if (v == V_SIG_STR) {
		out[n++] = 0xd9;
		out[n++] = 64;
	} else {
		out[n++] = 0xc4;
		out[n++] = v == V_SIG_63 ? 63 : v == V_SIG_65 ? 65 : 64;
	}
	memcpy(out + n, sig, 64);
	n += v == V_SIG_63 ? 63 : 64;
	if (v == V_SIG_65)
		out[n++] = 0;
	if (v == V_ARRAY7 || v == V_TRAILING)
		out[n++] = 0xc0;
	return n;
}

static void test_envelope_noncanonical(void **state)
{
	(void)state;
	uint8_t buf[256];
	struct gmsg_envelope e;

	size_t n = raw_env(buf, V_OK);
	assert_int_equal(gmsg_envelope_decode(buf, n, &e), 0);
	assert_int_equal(e.ttl, 4);
	for (int v = V_OK + 1; v < V_COUNT; v++) {
		n = raw_env(buf, v);
		int rc = gmsg_envelope_decode(buf, n, &e);
		/* Seven fields are more objects than an envelope has: caught by the bound. */
		if (rc != (v == V_ARRAY7 ? ME_ETOOBIG : ME_EPROTO))
			fail_msg("variant %d: %d", v, rc);
		/* A refused decode leaves nothing behind. */
		assert_int_equal(e.payload_len, 0);
		assert_null(e.payload);
	}
}

static void test_envelope_wrong_types(void **state)
{
	(void)state;
	static const int right[6] = { W_BIN, W_UINT, W_UINT, W_UINT, W_BIN, W_BIN };
	struct gmsg_envelope e;

	for (int field = 0; field < 6; field++) {
		for (int w = W_NIL; w < W_COUNT; w++) {
			if (w == right[field])
				continue;
			msgpack_sbuffer sb;
			msgpack_packer pk;
			uint8_t zeros[64] = { 0 };
			msgpack_sbuffer_init(&sb);
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			msgpack_pack_array(&pk, 6);
			for (int i = 0; i < 6; i++) {
				if (i == field)
					pack_wrong(&pk, w);
				else if (i == 0)
					pk_bin(&pk, kp1.pk, 32);
				else if (i == 1)
					msgpack_pack_fix_uint64(&pk, 1);
				else if (i == 2 || i == 3)
					msgpack_pack_uint8(&pk, 1);
				else if (i == 4)
					pk_bin(&pk, "x", 1);
				else
					pk_bin(&pk, zeros, 64);
			}
			int rc = gmsg_envelope_decode((uint8_t *)sb.data, sb.size, &e);
			if (rc != ME_EPROTO)
				fail_msg("field %d wrong %d: %d", field, w, rc);
			msgpack_sbuffer_destroy(&sb);
		}
	}
	/* Not an array at all, or a map. */
	uint8_t m[] = { 0x81, 0xa1, 'a', 0x01 };
	assert_int_equal(gmsg_envelope_decode(m, sizeof(m), &e), ME_EPROTO);
	uint8_t ext[] = { 0xd4, 0x01, 0x02 };
	assert_int_equal(gmsg_envelope_decode(ext, sizeof(ext), &e), ME_EPROTO);
}

static void test_envelope_unknown_type_and_empty_payload(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	struct gmsg_envelope e;
	struct gmsg_node_ann a;

	encode_env(&kp2, 1, 0, 77, NULL, 0, &sb);
	assert_int_equal(gmsg_envelope_decode((uint8_t *)sb.data, sb.size, &e), 0);
	assert_int_equal(e.type, 77);
	assert_int_equal(e.payload_len, 0);
	assert_int_equal(e.ttl, 0);
	assert_int_equal(gmsg_node_ann_from_envelope(&e, &a), ME_EINVAL);
	msgpack_sbuffer_destroy(&sb);
}

static void test_check_time(void **state)
{
	(void)state;
	const int64_t now = 1700000000000ll;
	const char *why = "unset";

	assert_int_equal(gmsg_check_time((uint64_t)now, now, &why), 0);
	assert_null(why);
	assert_int_equal(gmsg_check_time((uint64_t)now + GMSG_MAX_FUTURE_MS, now, &why), 0);
	assert_int_equal(gmsg_check_time((uint64_t)now - GMSG_MAX_AGE_MS, now, &why), 0);
	assert_int_equal(gmsg_check_time((uint64_t)now + GMSG_MAX_FUTURE_MS + 1, now, &why),
			 ME_ETIMEDOUT);
	assert_non_null(strstr(why, "future"));
	assert_int_equal(gmsg_check_time((uint64_t)now - GMSG_MAX_AGE_MS - 1, now, &why),
			 ME_ETIMEDOUT);
	assert_non_null(strstr(why, "older"));
	assert_int_equal(gmsg_check_time(UINT64_MAX, now, &why), ME_ETIMEDOUT);
	assert_non_null(strstr(why, "future"));
	assert_int_equal(gmsg_check_time((uint64_t)INT64_MAX, now, &why), ME_ETIMEDOUT);
	assert_int_equal(gmsg_check_time((uint64_t)INT64_MAX + 1, now, NULL), ME_ETIMEDOUT);
	assert_int_equal(gmsg_check_time(0, now, &why), ME_ETIMEDOUT);
	assert_non_null(strstr(why, "older"));
	assert_int_equal(gmsg_check_time(0, 0, NULL), 0);
	assert_int_equal(gmsg_check_time(0, INT64_MAX, NULL), ME_ETIMEDOUT);
	assert_int_equal(gmsg_check_time(UINT64_MAX, INT64_MAX, NULL), ME_ETIMEDOUT);
	assert_int_equal(gmsg_check_time(5, -1, &why), ME_EINVAL);
	assert_non_null(why);
	assert_int_equal(gmsg_check_time(5, INT64_MIN, NULL), ME_EINVAL);
}

/* ======================================================================================== */
/* NodeAnnouncement and addresses                                                           */
/* ======================================================================================== */

static const char *const good_addrs[GMSG_MAX_ADDRS] = {
	"127.0.0.1:1", "10.0.0.1:65535", "192.168.1.20:9000", "[::1]:443",
	"[2001:db8::1]:8443", "[2001:db8:0:0:0:0:0:2]:1", "1.2.3.4:80", "[fe80::1]:7000",
};

static void fill_node_ann(struct gmsg_node_ann *a, const struct me_keypair *kp)
{
	memset(a, 0, sizeof(*a));
	memcpy(a->pk, kp->pk, 32);
	a->alias = gmsg_str("laptop \xc3\xbc \xe2\x82\xac \xf0\x9f\x98\x80");
	for (size_t i = 0; i < GMSG_MAX_ADDRS; i++)
		a->addrs[i] = gmsg_str(good_addrs[i]);
	a->naddrs = GMSG_MAX_ADDRS;
	a->node_type = 255;
	a->version = gmsg_str("0.1.0");
}

static void test_node_ann_roundtrip(void **state)
{
	(void)state;
	struct gmsg_node_ann a, d;
	struct gmsg_envelope e;
	msgpack_sbuffer pl, env;

	fill_node_ann(&a, &kp1);
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_node_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_node_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_memory_equal(d.pk, kp1.pk, 32);
	assert_string_equal(d.did, kp1.did);
	assert_true(gmsg_str_eq(d.alias, a.alias));
	assert_int_equal(d.naddrs, a.naddrs);
	for (size_t i = 0; i < a.naddrs; i++) {
		assert_true(gmsg_str_eq(d.addrs[i], a.addrs[i]));
		/* Borrowed from the payload. */
		assert_true(d.addrs[i].ptr >= pl.data && d.addrs[i].ptr < pl.data + pl.size);
	}
	assert_int_equal(d.node_type, 255);
	assert_true(gmsg_str_eq(d.version, a.version));

	/* Through an envelope. */
	encode_env(&kp1, 10, 5, GMSG_NODE_ANN, pl.data, pl.size, &env);
	assert_int_equal(gmsg_envelope_decode((uint8_t *)env.data, env.size, &e), 0);
	assert_int_equal(gmsg_node_ann_from_envelope(&e, &d), 0);
	assert_string_equal(d.did, e.origin_did);
	msgpack_sbuffer_destroy(&env);
	msgpack_sbuffer_destroy(&pl);

	/* Minimal: empty alias, no address, empty version. */
	memset(&a, 0, sizeof(a));
	memcpy(a.pk, kp2.pk, 32);
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_node_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_node_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_int_equal(d.naddrs, 0);
	assert_int_equal(d.alias.len, 0);
	assert_int_equal(d.version.len, 0);
	assert_int_equal(d.node_type, 0);
	msgpack_sbuffer_destroy(&pl);
}

static void test_node_ann_forged_did(void **state)
{
	(void)state;
	struct gmsg_node_ann a, d;
	struct gmsg_envelope e;
	msgpack_sbuffer pl, env;

	/* kp1 signs an announcement that claims to be kp2. */
	fill_node_ann(&a, &kp2);
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_node_ann_encode(&a, &pl), 0);
	encode_env(&kp1, 10, 5, GMSG_NODE_ANN, pl.data, pl.size, &env);
	assert_int_equal(gmsg_envelope_decode((uint8_t *)env.data, env.size, &e), 0);
	/* The payload alone decodes (and shows the mismatch) ... */
	assert_int_equal(gmsg_node_ann_decode(e.payload, e.payload_len, &d), 0);
	assert_memory_not_equal(d.pk, e.origin_pk, 32);
	assert_string_not_equal(d.did, e.origin_did);
	/* ... the envelope-aware decoder refuses it. */
	assert_int_equal(gmsg_node_ann_from_envelope(&e, &d), ME_EPERM);
	assert_int_equal(d.naddrs, 0);
	/* Same payload under a RepoAnnouncement type. */
	e.type = GMSG_REPO_ANN;
	assert_int_equal(gmsg_node_ann_from_envelope(&e, &d), ME_EINVAL);
	msgpack_sbuffer_destroy(&env);
	msgpack_sbuffer_destroy(&pl);
}

static void test_addr_parse(void **state)
{
	(void)state;
	static const char *const bad[] = {
		"0.0.0.0:80", "0.1.2.3:80", "224.0.0.1:80", "239.255.255.250:1900",
		"255.255.255.255:80", "[::]:80", "[ff02::1]:80", "[ff0e::1]:80",
		"[::ffff:1.2.3.4]:80", "[::1.2.3.4]:80", "1.2.3.4:0", "1.2.3.4:65536",
		"1.2.3.4:99999", "1.2.3.4:123456", "1.2.3.4:080", "1.2.3.4:", "1.2.3.4", ":80",
		"host.example:80", "localhost:80", "1.2.3:80", "01.2.3.4:80", "1.2.3.4:+80",
		"1.2.3.4: 80", "1.2.3.4:80 ", " 1.2.3.4:80", "::1:80", "[::1]80", "[::1]:",
		"[::1", "[]:80", "[fe80::1%eth0]:80", "[1.2.3.4]:80", "1.2.3.256:80",
		"1.2.3.4:-1", "1.2.3.4:0x50", "[::1]:80:80", "1.2.3.4:80:80", "",
		"2001:db8::1:80", "[2001:db8::g]:80", "1.2.3.4:8a",
	};
	struct sockaddr_storage ss;
	socklen_t sl;

	for (size_t i = 0; i < sizeof(good_addrs) / sizeof(good_addrs[0]); i++)
		if (gmsg_addr_parse(good_addrs[i], strlen(good_addrs[i]), &ss, &sl) != 0)
			fail_msg("good address refused: %s", good_addrs[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (gmsg_addr_parse(bad[i], strlen(bad[i]), &ss, &sl) != ME_EPROTO)
			fail_msg("bad address accepted: \"%s\"", bad[i]);
	/* Embedded NUL; length bound; no NUL assumption. */
	assert_int_equal(gmsg_addr_parse("1.2.3.4:8\0", 10, NULL, NULL), ME_EPROTO);
	assert_int_equal(gmsg_addr_parse("1.2.3.4:80", 7, NULL, NULL), ME_EPROTO);
	assert_int_equal(gmsg_addr_parse("1.2.3.4:8099", 9, NULL, NULL), 0);
	assert_int_equal(gmsg_addr_parse(NULL, 0, NULL, NULL), ME_EPROTO);
	char longa[80];
	memset(longa, '1', sizeof(longa));
	assert_int_equal(gmsg_addr_parse(longa, GMSG_MAX_ADDR_LEN + 1, NULL, NULL), ME_ETOOBIG);
	/* 64 bytes exactly: a long but valid IPv6 form. */
	const char *l64 = "[0000:0000:0000:0000:0000:0000:0000:0001]:65535";
	assert_int_equal(gmsg_addr_parse(l64, strlen(l64), NULL, NULL), 0);

	/* The sockaddr. */
	assert_int_equal(gmsg_addr_parse("10.1.2.3:4433", 13, &ss, &sl), 0);
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
	assert_int_equal(sl, sizeof(*sin));
	assert_int_equal(sin->sin_family, AF_INET);
	assert_int_equal(ntohs(sin->sin_port), 4433);
	assert_int_equal(ntohl(sin->sin_addr.s_addr), 0x0a010203);
	assert_int_equal(gmsg_addr_parse("[2001:db8::7]:1", 15, &ss, &sl), 0);
	const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
	assert_int_equal(sl, sizeof(*sin6));
	assert_int_equal(sin6->sin6_family, AF_INET6);
	assert_int_equal(ntohs(sin6->sin6_port), 1);
	assert_int_equal(sin6->sin6_addr.s6_addr[0], 0x20);
	assert_int_equal(sin6->sin6_addr.s6_addr[15], 7);
}

/* Packs a node announcement field by field; one field may be replaced by raw bytes. */
struct node_raw {
	int field; /* -1: none */
	int wrong; /* W_* or -1 */
	const void *raw; /* with len: a str (or bin for field 0) of these bytes */
	size_t len;
	size_t naddrs;
	uint64_t node_type;
};

static void pack_node_raw(msgpack_sbuffer *sb, const struct node_raw *r)
{
	msgpack_packer pk;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 5);
	for (int i = 0; i < 5; i++) {
		if (i == r->field && r->wrong > W_NONE) {
			pack_wrong(&pk, r->wrong);
			continue;
		}
		if (i == r->field && r->raw != NULL) {
			if (i == 0) {
				pk_bin(&pk, r->raw, r->len);
			} else if (i == 2) {
				msgpack_pack_array(&pk, 1);
				msgpack_pack_str(&pk, r->len);
				msgpack_pack_str_body(&pk, r->raw, r->len);
			} else {
				msgpack_pack_str(&pk, r->len);
				msgpack_pack_str_body(&pk, r->raw, r->len);
			}
			continue;
		}
		switch (i) {
		case 0: pk_bin(&pk, kp1.pk, 32); break;
		case 1: pk_str(&pk, "alias"); break;
		case 2:
			msgpack_pack_array(&pk, r->naddrs);
			for (size_t k = 0; k < r->naddrs; k++)
				pk_str(&pk, good_addrs[k % GMSG_MAX_ADDRS]);
			break;
		case 3: msgpack_pack_uint64(&pk, r->node_type); break;
		case 4: pk_str(&pk, "1.0"); break;
		}
	}
}

static int node_raw_rc(const struct node_raw *r)
{
	msgpack_sbuffer sb;
	struct gmsg_node_ann d;

	pack_node_raw(&sb, r);
	int rc = gmsg_node_ann_decode((uint8_t *)sb.data, sb.size, &d);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

static void test_node_ann_hostile(void **state)
{
	(void)state;
	static const int right[5] = { W_BIN, W_STR, W_ARRAY, W_UINT, W_STR };
	struct node_raw r = { -1, -1, NULL, 0, 2, 1 };
	struct gmsg_node_ann a, d;
	msgpack_sbuffer sb;

	assert_int_equal(node_raw_rc(&r), 0);
	/* Wrong types in each field. */
	for (int f = 0; f < 5; f++) {
		for (int w = W_NIL; w < W_COUNT; w++) {
			if (w == right[f])
				continue;
			r = (struct node_raw){ f, w, NULL, 0, 2, 1 };
			if (node_raw_rc(&r) != ME_EPROTO)
				fail_msg("node field %d wrong %d accepted", f, w);
		}
	}
	/* Address element of the wrong type. */
	{
		msgpack_packer pk;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 5);
		pk_bin(&pk, kp1.pk, 32);
		pk_str(&pk, "a");
		msgpack_pack_array(&pk, 1);
		pk_bin(&pk, "1.2.3.4:5", 9);
		msgpack_pack_uint8(&pk, 1);
		pk_str(&pk, "v");
		assert_int_equal(gmsg_node_ann_decode((uint8_t *)sb.data, sb.size, &d), ME_EPROTO);
		msgpack_sbuffer_destroy(&sb);
	}
	/* Counts and lengths. */
	r = (struct node_raw){ -1, -1, NULL, 0, GMSG_MAX_ADDRS, GMSG_MAX_NODE_TYPE };
	assert_int_equal(node_raw_rc(&r), 0);
	r.naddrs = GMSG_MAX_ADDRS + 1;
	assert_int_equal(node_raw_rc(&r), ME_ETOOBIG);
	r.naddrs = 1000;
	assert_int_equal(node_raw_rc(&r), ME_ETOOBIG);
	r.naddrs = 1;
	r.node_type = 256;
	assert_int_equal(node_raw_rc(&r), ME_EPROTO);
	r.node_type = UINT64_MAX;
	assert_int_equal(node_raw_rc(&r), ME_EPROTO);

	char big[200];
	memset(big, 'a', sizeof(big));
	struct { int field; size_t len; int rc; } lens[] = {
		{ 0, 31, ME_EPROTO }, { 0, 33, ME_EPROTO }, { 0, 0, ME_EPROTO },
		{ 1, GMSG_MAX_ALIAS, 0 }, { 1, GMSG_MAX_ALIAS + 1, ME_ETOOBIG },
		{ 1, 0, 0 }, { 1, 199, ME_ETOOBIG },
		{ 4, GMSG_MAX_VERSION, 0 }, { 4, GMSG_MAX_VERSION + 1, ME_ETOOBIG },
	};
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		r = (struct node_raw){ lens[i].field, -1, big, lens[i].len, 1, 1 };
		if (node_raw_rc(&r) != lens[i].rc)
			fail_msg("length case %zu", i);
	}
	/* Text rules on alias and version. */
	static const char *const badtext[] = {
		"a\x1b[31m", "tab\there", "nl\n", "del\x7f", "nul\0x", "\xc0\x80", "\xc1\xbf",
		"\xc2\x9b", "\xc2\x80", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf0\x80\x80\x80",
		"\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "\x80", "\xc3", "\xe2\x82",
	};
	static const size_t badlen[] = { 7, 8, 3, 4, 5, 2, 2, 2, 2, 3, 3, 4, 4, 4, 1, 1, 1, 2 };
	for (size_t i = 0; i < sizeof(badtext) / sizeof(badtext[0]); i++) {
		for (int f = 1; f <= 4; f += 3) {
			r = (struct node_raw){ f, -1, badtext[i], badlen[i], 1, 1 };
			if (node_raw_rc(&r) != ME_EPROTO)
				fail_msg("bad text %zu in field %d accepted", i, f);
		}
	}
	/* Bad addresses inside the announcement. */
	static const char *const badaddr[] = { "0.0.0.0:1", "[::]:1", "1.2.3.4:0", "x:1",
		"224.1.1.1:5" };
	for (size_t i = 0; i < sizeof(badaddr) / sizeof(badaddr[0]); i++) {
		r = (struct node_raw){ 2, -1, badaddr[i], strlen(badaddr[i]), 1, 1 };
		assert_int_equal(node_raw_rc(&r), ME_EPROTO);
	}
	r = (struct node_raw){ 2, -1, big, GMSG_MAX_ADDR_LEN + 1, 1, 1 };
	assert_int_equal(node_raw_rc(&r), ME_ETOOBIG);

	/* Wrong arity, trailing bytes, truncation at every offset. */
	fill_node_ann(&a, &kp1);
	a.naddrs = 2; /* leaves room under the object bound for the extra field below */
	msgpack_sbuffer_init(&sb);
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), 0);
	for (size_t n = 0; n < sb.size; n++) {
		uint8_t *c = malloc(n ? n : 1);
		assert_non_null(c);
		memcpy(c, sb.data, n);
		assert_int_equal(gmsg_node_ann_decode(c, n, &d), ME_EPROTO);
		free(c);
	}
	msgpack_sbuffer_write(&sb, "\xc0", 1);
	assert_int_equal(gmsg_node_ann_decode((uint8_t *)sb.data, sb.size, &d), ME_EPROTO);
	((uint8_t *)sb.data)[0] = 0x96;
	assert_int_equal(gmsg_node_ann_decode((uint8_t *)sb.data, sb.size, &d), ME_EPROTO);
	msgpack_sbuffer_destroy(&sb);
	uint8_t four[] = { 0x94, 0xc0, 0xc0, 0xc0, 0xc0 };
	assert_int_equal(gmsg_node_ann_decode(four, sizeof(four), &d), ME_EPROTO);

	/* The encoder refuses what the decoder refuses, and leaves out untouched. */
	msgpack_sbuffer_init(&sb);
	fill_node_ann(&a, &kp1);
	a.naddrs = GMSG_MAX_ADDRS + 1;
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_ETOOBIG);
	fill_node_ann(&a, &kp1);
	a.alias = (struct gmsg_str){ big, GMSG_MAX_ALIAS + 1 };
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_ETOOBIG);
	fill_node_ann(&a, &kp1);
	a.alias = gmsg_str("esc\x1b");
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_EINVAL);
	fill_node_ann(&a, &kp1);
	a.addrs[3] = gmsg_str("0.0.0.0:80");
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_EINVAL);
	fill_node_ann(&a, &kp1);
	a.node_type = 256;
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_EINVAL);
	fill_node_ann(&a, &kp1);
	a.version = (struct gmsg_str){ NULL, 3 };
	assert_int_equal(gmsg_node_ann_encode(&a, &sb), ME_EINVAL);
	assert_int_equal(sb.size, 0);
	msgpack_sbuffer_destroy(&sb);
}

/* ======================================================================================== */
/* ref names                                                                                */
/* ======================================================================================== */

/* Built with `git check-ref-format NAME` (git 2.39.5): git = its verdict; ours adds the
 * refs/heads/ | refs/tags/ restriction and the 255-byte bound. */
static const struct {
	const char *name;
	size_t len; /* 0: strlen */
	int git, ours;
} refnames[] = {
	{ "refs/heads/main", 0, 1, 1 },
	{ "refs/heads/feature/x", 0, 1, 1 },
	{ "refs/tags/v1.0", 0, 1, 1 },
	{ "refs/tags/v1.0-rc.1", 0, 1, 1 },
	{ "refs/heads/a.b", 0, 1, 1 },
	{ "refs/heads/@", 0, 1, 1 },
	{ "refs/heads/a@b", 0, 1, 1 },
	{ "refs/heads/a@", 0, 1, 1 },
	{ "refs/heads/@/x", 0, 1, 1 },
	{ "refs/heads/HEAD", 0, 1, 1 },
	{ "refs/heads/\xc3\xbcn\xc3\xaf", 0, 1, 1 },
	{ "refs/heads/\xff", 0, 1, 1 },
	{ "refs/heads/a-b_c+d", 0, 1, 1 },
	{ "refs/heads/-a", 0, 1, 1 },
	{ "refs/heads/a./b", 0, 1, 1 },
	{ "refs/heads/lock", 0, 1, 1 },
	{ "refs/heads/x.lockx", 0, 1, 1 },
	{ "refs/heads/{a}", 0, 1, 1 },
	{ "refs/heads/a..b", 0, 0, 0 },
	{ "refs/heads/a...b", 0, 0, 0 },
	{ "refs/heads/..", 0, 0, 0 },
	{ "refs/heads//a", 0, 0, 0 },
	{ "refs/tags/a//b", 0, 0, 0 },
	{ "refs/heads/a/", 0, 0, 0 },
	{ "refs/heads/", 0, 0, 0 },
	{ "refs/heads/a.lock", 0, 0, 0 },
	{ "refs/heads/a.lock/b", 0, 0, 0 },
	{ "refs/heads/a/b.lock/c", 0, 0, 0 },
	{ "refs/heads/.lock", 0, 0, 0 },
	{ "refs/heads/a/b/.lock", 0, 0, 0 },
	{ "refs/heads/a.lock.", 0, 0, 0 },
	{ "refs/heads/.a", 0, 0, 0 },
	{ "refs/heads/a/.b", 0, 0, 0 },
	{ "refs/heads/a/.", 0, 0, 0 },
	{ "refs/heads/a.", 0, 0, 0 },
	{ "refs/heads/x.", 0, 0, 0 },
	{ "refs/heads/a@{b", 0, 0, 0 },
	{ "refs/heads/@{", 0, 0, 0 },
	{ "refs/tags/@{-1}", 0, 0, 0 },
	{ "refs/heads/a b", 0, 0, 0 },
	{ "refs/heads/a~b", 0, 0, 0 },
	{ "refs/heads/a^b", 0, 0, 0 },
	{ "refs/heads/a:b", 0, 0, 0 },
	{ "refs/heads/a?b", 0, 0, 0 },
	{ "refs/heads/a*b", 0, 0, 0 },
	{ "refs/heads/a[b", 0, 0, 0 },
	{ "refs/heads/a\\b", 0, 0, 0 },
	{ "refs/heads/a\tb", 0, 0, 0 },
	{ "refs/heads/a\x7f" "b", 0, 0, 0 },
	{ "refs/heads/a\x01" "b", 0, 0, 0 },
	{ "refs/heads/a\0b", 13, 0, 0 }, /* git cannot even be given this one */
	{ "HEAD", 0, 0, 0 },
	{ "main", 0, 0, 0 },
	{ "@", 0, 0, 0 },
	/* Valid for git, outside what a ref state carries. */
	{ "refs/heads", 0, 1, 0 },
	{ "refs/remotes/origin/main", 0, 1, 0 },
	{ "refs/notes/x", 0, 1, 0 },
	{ "refs/tagsx/a", 0, 1, 0 },
};

static void test_refnames(void **state)
{
	(void)state;
	int good = 0, bad = 0;

	for (size_t i = 0; i < sizeof(refnames) / sizeof(refnames[0]); i++) {
		const char *n = refnames[i].name;
		size_t len = refnames[i].len ? refnames[i].len : strlen(n);
		if (gmsg_refname_valid(n, len) != (refnames[i].ours != 0))
			fail_msg("refname %zu \"%s\": expected %d", i, n, refnames[i].ours);
		good += refnames[i].git;
		bad += !refnames[i].git;
	}
	assert_true(good >= 10 && bad >= 25);
	/* Length bound (git itself has none). */
	char name[300];
	memcpy(name, "refs/heads/", 11);
	memset(name + 11, 'x', sizeof(name) - 11);
	assert_true(gmsg_refname_valid(name, GMSG_MAX_REFNAME));
	assert_false(gmsg_refname_valid(name, GMSG_MAX_REFNAME + 1));
	assert_false(gmsg_refname_valid(NULL, 0));
	assert_false(gmsg_refname_valid(name, 0));
	/* No NUL assumption: a valid prefix of a longer buffer. */
	assert_true(gmsg_refname_valid("refs/heads/ab..c", 13));
}

/* ======================================================================================== */
/* ref state and RepoAnnouncement                                                           */
/* ======================================================================================== */

static void repo_id_of(const struct me_keypair *kp, unsigned n, char *out)
{
	uint8_t root[ME_OID_LEN];

	for (int i = 0; i < ME_OID_LEN; i++)
		root[i] = (uint8_t)(n >> (8 * (i % 4)));
	assert_int_equal(me_did_repo_compute(root, kp->pk, out, ME_DID_REPO_SIZE), 0);
}

static struct gmsg_ref refs3[3] = {
	{ { "refs/heads/dev", 14 }, { 1 } },
	{ { "refs/heads/main", 15 }, { 2 } },
	{ { "refs/tags/v1.0", 14 }, { 3 } },
};

static void test_refstate_sign_verify(void **state)
{
	(void)state;
	char id[ME_DID_REPO_SIZE];
	struct gmsg_refstate rs;
	uint8_t kat[512];
	size_t n = 0;

	repo_id_of(&kp1, 1, id);
	memset(&rs, 0, sizeof(rs));
	rs.repo_id = gmsg_str(id);
	rs.seq = 1700000000000ull;
	rs.head = gmsg_str("refs/heads/main");
	rs.refs = refs3;
	rs.nrefs = 3;
	assert_int_equal(gmsg_refstate_sign(&kp1, &rs), 0);
	assert_int_equal(gmsg_refstate_verify(&rs, kp1.pk), 0);
	assert_int_equal(gmsg_refstate_verify(&rs, kp2.pk), ME_EPERM);

	/* Known answer: the documented canonical bytes. */
	size_t idlen = strlen(id);
	kat[n++] = 0x95;
	kat[n++] = 0xb6;
	memcpy(kat + n, "megaengine-refstate-v1", 22);
	n += 22;
	assert_true(idlen >= 32 && idlen < 256);
	kat[n++] = 0xd9; /* str8 */
	kat[n++] = (uint8_t)idlen;
	memcpy(kat + n, id, idlen);
	n += idlen;
	kat[n++] = 0xcf; /* 1700000000000 needs 8 bytes */
	for (int i = 0; i < 8; i++)
		kat[n++] = (uint8_t)(rs.seq >> (56 - 8 * i));
	kat[n++] = 0xaf;
	memcpy(kat + n, "refs/heads/main", 15);
	n += 15;
	kat[n++] = 0x93;
	for (int i = 0; i < 3; i++) {
		kat[n++] = 0x92;
		kat[n++] = (uint8_t)(0xa0 | refs3[i].name.len);
		memcpy(kat + n, refs3[i].name.ptr, refs3[i].name.len);
		n += refs3[i].name.len;
		kat[n++] = 0xc4;
		kat[n++] = 20;
		memcpy(kat + n, refs3[i].oid, 20);
		n += 20;
	}
	assert_int_equal(me_verify(kp1.pk, kat, n, rs.sig), 0);

	/* Every field is covered. */
	struct gmsg_refstate t = rs;
	t.seq++;
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	t = rs;
	t.head = gmsg_str("refs/heads/dev");
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	t = rs;
	t.head = gmsg_str("");
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	t = rs;
	t.nrefs = 2;
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	char other[ME_DID_REPO_SIZE];
	repo_id_of(&kp1, 2, other);
	t = rs;
	t.repo_id = gmsg_str(other);
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	struct gmsg_ref r2[3];
	memcpy(r2, refs3, sizeof(r2));
	r2[1].oid[19] ^= 1;
	t = rs;
	t.refs = r2;
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	memcpy(r2, refs3, sizeof(r2));
	r2[1].name = gmsg_str("refs/heads/maim");
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);
	t = rs;
	t.sig[0] ^= 0x80;
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPERM);

	/* Malformed states are refused before signing or verifying. */
	memcpy(r2, refs3, sizeof(r2));
	r2[0] = refs3[1];
	r2[1] = refs3[0]; /* unsorted */
	t = rs;
	t.refs = r2;
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	assert_int_equal(gmsg_refstate_verify(&t, kp1.pk), ME_EPROTO);
	memcpy(r2, refs3, sizeof(r2));
	r2[1] = refs3[0]; /* duplicate */
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	memcpy(r2, refs3, sizeof(r2));
	r2[2].name = gmsg_str("refs/tags/v1..0");
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	t = rs;
	t.head = gmsg_str("main");
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	t = rs;
	t.repo_id = gmsg_str("did:repo:zzz");
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	t = rs;
	t.refs = NULL;
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_EINVAL);
	t.nrefs = GMSG_MAX_REFS + 1;
	assert_int_equal(gmsg_refstate_sign(&kp1, &t), ME_ETOOBIG);
	/* No refs at all is a valid state. */
	t = rs;
	t.nrefs = 0;
	t.refs = NULL;
	t.head = gmsg_str("");
	assert_int_equal(gmsg_refstate_sign(&kp2, &t), 0);
	assert_int_equal(gmsg_refstate_verify(&t, kp2.pk), 0);
}

/* A test repository set: n repos alternating creators, each with its own refs. */
struct fixture {
	size_t n;
	char (*ids)[ME_DID_REPO_SIZE];
	struct gmsg_repo *repos;
	struct gmsg_ref *refs;
};

static int cmp_id(const void *a, const void *b)
{
	return strcmp(a, b);
}

static void fixture_make(struct fixture *fx, size_t n, size_t refs_each, bool sign)
{
	fx->n = n;
	fx->ids = calloc(n ? n : 1, sizeof(*fx->ids));
	fx->repos = calloc(n ? n : 1, sizeof(*fx->repos));
	fx->refs = calloc(n * refs_each + 1, sizeof(*fx->refs));
	assert_non_null(fx->ids);
	assert_non_null(fx->repos);
	assert_non_null(fx->refs);
	/* Names shared by every repo, sorted: refs/heads/b00000 .. (fixed width). */
	static char names[GMSG_MAX_REFS + 2][40];
	for (size_t k = 0; k < refs_each; k++)
		snprintf(names[k], sizeof(names[k]), "refs/heads/b%05zu", k);
	for (size_t i = 0; i < n; i++)
		repo_id_of(i % 2 ? &kp2 : &kp1, (unsigned)i, fx->ids[i]);
	qsort(fx->ids, n, sizeof(*fx->ids), cmp_id);
	for (size_t i = 0; i < n; i++) {
		struct gmsg_repo *r = &fx->repos[i];
		const struct me_keypair *kp = i % 2 ? &kp2 : &kp1;
		r->id = gmsg_str(fx->ids[i]);
		r->name = gmsg_str(i % 3 ? "project" : "a repo named \xc3\xa9");
		r->description = gmsg_str(i % 2 ? "" : "a description\nwith two lines");
		memcpy(r->creator_pk, kp->pk, 32);
		r->refstate.repo_id = r->id;
		r->refstate.seq = 1000 + i;
		r->refstate.head = gmsg_str(refs_each ? "refs/heads/b00000" : "");
		r->refstate.refs = fx->refs + i * refs_each;
		r->refstate.nrefs = refs_each;
		for (size_t k = 0; k < refs_each; k++) {
			struct gmsg_ref *f = &r->refstate.refs[k];
			f->name = gmsg_str(names[k]);
			for (int b = 0; b < 20; b++)
				f->oid[b] = (uint8_t)(i + k + b);
		}
		if (sign)
			assert_int_equal(gmsg_refstate_sign(kp, &r->refstate), 0);
	}
}

static void fixture_free(struct fixture *fx)
{
	free(fx->ids);
	free(fx->repos);
	free(fx->refs);
}

static void assert_repos_equal(const struct gmsg_repo *a, const struct gmsg_repo *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		assert_true(gmsg_str_eq(a[i].id, b[i].id));
		assert_true(gmsg_str_eq(a[i].name, b[i].name));
		assert_true(gmsg_str_eq(a[i].description, b[i].description));
		assert_memory_equal(a[i].creator_pk, b[i].creator_pk, 32);
		const struct gmsg_refstate *x = &a[i].refstate, *y = &b[i].refstate;
		assert_true(gmsg_str_eq(x->repo_id, y->repo_id));
		assert_true(x->seq == y->seq);
		assert_true(gmsg_str_eq(x->head, y->head));
		assert_int_equal(x->nrefs, y->nrefs);
		for (size_t k = 0; k < x->nrefs; k++) {
			assert_true(gmsg_str_eq(x->refs[k].name, y->refs[k].name));
			assert_memory_equal(x->refs[k].oid, y->refs[k].oid, 20);
		}
		assert_memory_equal(x->sig, y->sig, 64);
	}
}

static void test_repo_ann_roundtrip(void **state)
{
	(void)state;
	struct fixture fx;
	struct gmsg_repo_ann a, d;
	struct gmsg_envelope e;
	msgpack_sbuffer pl, env;

	fixture_make(&fx, 5, 3, true);
	a.repos = fx.repos;
	a.nrepos = fx.n;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	encode_env(&kp1, 77, 16, GMSG_REPO_ANN, pl.data, pl.size, &env);
	assert_int_equal(gmsg_envelope_decode((uint8_t *)env.data, env.size, &e), 0);
	assert_int_equal(e.type, GMSG_REPO_ANN);
	assert_int_equal(gmsg_repo_ann_decode(e.payload, e.payload_len, &d), 0);
	assert_int_equal(d.nrepos, 5);
	assert_repos_equal(a.repos, d.repos, 5);
	for (size_t i = 0; i < d.nrepos; i++) {
		assert_int_equal(gmsg_refstate_verify(&d.repos[i].refstate, d.repos[i].creator_pk),
				 0);
		/* A relaying origin cannot pass one creator's state off as another's. */
		const uint8_t *other = i % 2 ? kp1.pk : kp2.pk;
		assert_int_equal(gmsg_refstate_verify(&d.repos[i].refstate, other), ME_EPERM);
	}
	gmsg_repo_ann_free(&d);
	assert_null(d.repos);
	assert_int_equal(d.nrepos, 0);
	gmsg_repo_ann_free(&d);
	gmsg_repo_ann_free(NULL);
	msgpack_sbuffer_destroy(&env);
	msgpack_sbuffer_destroy(&pl);
	fixture_free(&fx);

	/* No repos. */
	a.repos = NULL;
	a.nrepos = 0;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_int_equal(d.nrepos, 0);
	gmsg_repo_ann_free(&d);
	msgpack_sbuffer_destroy(&pl);

	/* A repo whose state has no refs and an empty head. */
	fixture_make(&fx, 1, 0, true);
	a.repos = fx.repos;
	a.nrepos = 1;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_repos_equal(a.repos, d.repos, 1);
	assert_int_equal(gmsg_refstate_verify(&d.repos[0].refstate, kp1.pk), 0);
	gmsg_repo_ann_free(&d);
	msgpack_sbuffer_destroy(&pl);
	fixture_free(&fx);
}

static void test_repo_ann_limits(void **state)
{
	(void)state;
	struct fixture fx;
	struct gmsg_repo_ann a, d;
	msgpack_sbuffer pl;

	/* 1024 repos: fine; 1025: refused by the encoder and by the decoder. */
	fixture_make(&fx, GMSG_MAX_REPOS + 1, 1, false);
	a.repos = fx.repos;
	a.nrepos = GMSG_MAX_REPOS;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_int_equal(d.nrepos, GMSG_MAX_REPOS);
	assert_repos_equal(a.repos, d.repos, GMSG_MAX_REPOS);
	gmsg_repo_ann_free(&d);
	/* Patch the count of the encoded array (array16 0xdc 0x0400 at offset 1) to 1025 and
	 * append one more repo: encode the 1025th alone and splice its bytes. */
	msgpack_sbuffer one;
	struct gmsg_repo_ann single = { &fx.repos[GMSG_MAX_REPOS], 1 };
	msgpack_sbuffer_init(&one);
	assert_int_equal(gmsg_repo_ann_encode(&single, &one), 0);
	/* single: 0x91 0x91 <repo> */
	assert_int_equal((uint8_t)pl.data[1], 0xdc);
	pl.data[2] = 0x04;
	pl.data[3] = 0x01;
	msgpack_sbuffer_write(&pl, one.data + 2, one.size - 2);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), ME_ETOOBIG);
	assert_null(d.repos);
	msgpack_sbuffer_destroy(&one);
	msgpack_sbuffer_destroy(&pl);
	a.nrepos = GMSG_MAX_REPOS + 1;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), ME_ETOOBIG);
	assert_int_equal(pl.size, 0);
	msgpack_sbuffer_destroy(&pl);
	fixture_free(&fx);

	/* 10000 refs: fine; 10001: refused. */
	fixture_make(&fx, 1, GMSG_MAX_REFS + 1, false);
	a.repos = fx.repos;
	a.nrepos = 1;
	fx.repos[0].refstate.nrefs = GMSG_MAX_REFS;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), 0);
	assert_int_equal(d.repos[0].refstate.nrefs, GMSG_MAX_REFS);
	assert_repos_equal(a.repos, d.repos, 1);
	gmsg_repo_ann_free(&d);
	msgpack_sbuffer_destroy(&pl);
	fx.repos[0].refstate.nrefs = GMSG_MAX_REFS + 1;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), ME_ETOOBIG);
	msgpack_sbuffer_destroy(&pl);
	/* Build it with msgpack directly. */
	{
		msgpack_packer pk;
		const struct gmsg_repo *r = &fx.repos[0];
		msgpack_sbuffer_init(&pl);
		msgpack_packer_init(&pk, &pl, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 1);
		msgpack_pack_array(&pk, 1);
		msgpack_pack_array(&pk, 5);
		pk_str(&pk, fx.ids[0]);
		pk_str(&pk, "n");
		pk_str(&pk, "");
		pk_bin(&pk, kp1.pk, 32);
		msgpack_pack_array(&pk, 5);
		pk_str(&pk, fx.ids[0]);
		msgpack_pack_uint64(&pk, 1);
		pk_str(&pk, "");
		msgpack_pack_array(&pk, GMSG_MAX_REFS + 1);
		for (size_t k = 0; k < GMSG_MAX_REFS + 1; k++) {
			msgpack_pack_array(&pk, 2);
			msgpack_pack_str(&pk, r->refstate.refs[k].name.len);
			msgpack_pack_str_body(&pk, r->refstate.refs[k].name.ptr,
					      r->refstate.refs[k].name.len);
			pk_bin(&pk, r->refstate.refs[k].oid, 20);
		}
		pk_bin(&pk, r->refstate.sig, 64);
		assert_true(pl.size < GMSG_MAX_PAYLOAD);
		assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d),
				 ME_ETOOBIG);
		msgpack_sbuffer_destroy(&pl);
	}
	fixture_free(&fx);

	/* Refs over the whole announcement: 3 x 7000 > GMSG_MAX_ANN_REFS, each state fine. */
	fixture_make(&fx, 3, 7000, false);
	a.repos = fx.repos;
	a.nrepos = 3;
	msgpack_sbuffer_init(&pl);
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), ME_ETOOBIG);
	a.nrepos = 2;
	assert_int_equal(gmsg_repo_ann_encode(&a, &pl), 0);
	msgpack_sbuffer one2;
	struct gmsg_repo_ann third = { &fx.repos[2], 1 };
	msgpack_sbuffer_init(&one2);
	assert_int_equal(gmsg_repo_ann_encode(&third, &one2), 0);
	assert_int_equal((uint8_t)pl.data[1], 0x92);
	pl.data[1] = (char)0x93;
	msgpack_sbuffer_write(&pl, one2.data + 2, one2.size - 2);
	assert_true(pl.size < GMSG_MAX_PAYLOAD);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)pl.data, pl.size, &d), ME_ETOOBIG);
	msgpack_sbuffer_destroy(&one2);
	msgpack_sbuffer_destroy(&pl);
	fixture_free(&fx);

	/* Payload size bound. */
	uint8_t *big = calloc(1, GMSG_MAX_PAYLOAD + 1);
	assert_non_null(big);
	assert_int_equal(gmsg_repo_ann_decode(big, GMSG_MAX_PAYLOAD + 1, &d), ME_ETOOBIG);
	assert_int_equal(gmsg_node_ann_decode(big, GMSG_MAX_PAYLOAD + 1, NULL), ME_EINVAL);
	struct gmsg_node_ann na;
	assert_int_equal(gmsg_node_ann_decode(big, GMSG_MAX_PAYLOAD + 1, &na), ME_ETOOBIG);
	/* A container count the bytes cannot hold is refused before anything is allocated. */
	uint8_t huge[] = { 0x91, 0xdd, 0xff, 0xff, 0xff, 0xff };
	assert_int_equal(gmsg_repo_ann_decode(huge, sizeof(huge), &d), ME_EPROTO);
	free(big);
}

/* Raw repo announcement builder for hostile input: two repos (the second with two refs); one
 * field of the second repo may be replaced. */
enum rfield {
	R_NONE, R_TOP, R_REPOS, R_REPO, R_ID, R_NAME, R_DESC, R_PK, R_RS, R_RS_ID, R_SEQ, R_HEAD, R_REFS,
	R_REF, R_REFNAME, R_OID, R_SIG, R_COUNT
};
static const int rfield_right[R_COUNT] = {
	W_NONE, W_ARRAY, W_ARRAY, W_ARRAY, W_STR, W_STR, W_STR, W_BIN, W_ARRAY, W_STR, W_UINT, W_STR,
	W_ARRAY, W_ARRAY, W_STR, W_BIN, W_BIN,
};

struct repo_raw {
	int field; /* R_*, R_NONE */
	int wrong; /* W_*, W_NONE */
	const void *raw; /* str (bin for R_PK/R_OID/R_SIG) replacement */
	size_t len;
	int swap_refs; /* refs of repo 2 in the wrong order */
	int dup_ref;
	int swap_repos;
	int dup_repo;
	int mismatch_id; /* refstate repo_id = the other repo's id */
};

static char rid[2][ME_DID_REPO_SIZE];

static bool rep(msgpack_packer *pk, const struct repo_raw *r, int f, int target)
{
	if (!target || r->field != f)
		return false;
	if (r->wrong != W_NONE) {
		pack_wrong(pk, r->wrong);
		return true;
	}
	if (r->raw != NULL) {
		if (f == R_PK || f == R_OID || f == R_SIG) {
			pk_bin(pk, r->raw, r->len);
		} else {
			msgpack_pack_str(pk, r->len);
			if (r->len)
				msgpack_pack_str_body(pk, r->raw, r->len);
		}
		return true;
	}
	return false;
}

static void pack_repo_raw(msgpack_sbuffer *sb, const struct repo_raw *r)
{
	/* "!" sorts before every other valid first character. */
	static const char *const rn[2] = { "refs/heads/!", "refs/heads/b" };
	uint8_t oid[20] = { 9 }, sig[64] = { 7 };
	msgpack_packer pk;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	if (rep(&pk, r, R_TOP, 1))
		return;
	msgpack_pack_array(&pk, 1);
	if (rep(&pk, r, R_REPOS, 1))
		return;
	msgpack_pack_array(&pk, 2);
	for (int i = 0; i < 2; i++) {
		int t = i == 1; /* mutations apply to the second repo */
		int idx = r->swap_repos ? 1 - i : (r->dup_repo ? 0 : i);
		const char *id = rid[idx];
		if (rep(&pk, r, R_REPO, t))
			continue;
		msgpack_pack_array(&pk, 5);
		if (!rep(&pk, r, R_ID, t))
			pk_str(&pk, id);
		if (!rep(&pk, r, R_NAME, t))
			pk_str(&pk, "name");
		if (!rep(&pk, r, R_DESC, t))
			pk_str(&pk, "desc");
		if (!rep(&pk, r, R_PK, t))
			pk_bin(&pk, kp1.pk, 32);
		if (rep(&pk, r, R_RS, t))
			continue;
		msgpack_pack_array(&pk, 5);
		if (!rep(&pk, r, R_RS_ID, t))
			pk_str(&pk, t && r->mismatch_id ? rid[0] : id);
		if (!rep(&pk, r, R_SEQ, t))
			msgpack_pack_uint64(&pk, 12345);
		if (!rep(&pk, r, R_HEAD, t))
			pk_str(&pk, "refs/heads/a");
		if (!rep(&pk, r, R_REFS, t)) {
			msgpack_pack_array(&pk, t ? 2 : 0);
			for (int k = 0; t && k < 2; k++) {
				int kk = r->swap_refs ? 1 - k : (r->dup_ref ? 0 : k);
				if (rep(&pk, r, R_REF, k == 1))
					continue;
				msgpack_pack_array(&pk, 2);
				if (!rep(&pk, r, R_REFNAME, k == 1))
					pk_str(&pk, rn[kk]);
				if (!rep(&pk, r, R_OID, k == 1))
					pk_bin(&pk, oid, 20);
			}
		}
		if (!rep(&pk, r, R_SIG, t))
			pk_bin(&pk, sig, 64);
	}
}

static int repo_raw_rc(const struct repo_raw *r)
{
	msgpack_sbuffer sb;
	struct gmsg_repo_ann d;

	pack_repo_raw(&sb, r);
	int rc = gmsg_repo_ann_decode((uint8_t *)sb.data, sb.size, &d);
	if (rc == 0) {
		assert_int_equal(d.nrepos, 2);
		gmsg_repo_ann_free(&d);
	} else {
		assert_null(d.repos);
	}
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

#define RAW(...) (&(struct repo_raw){ __VA_ARGS__ })

static void test_repo_ann_hostile(void **state)
{
	(void)state;
	char big[2048];

	repo_id_of(&kp1, 100, rid[0]);
	repo_id_of(&kp2, 200, rid[1]);
	if (strcmp(rid[0], rid[1]) > 0) {
		char t[ME_DID_REPO_SIZE];
		memcpy(t, rid[0], sizeof(t));
		memcpy(rid[0], rid[1], sizeof(t));
		memcpy(rid[1], t, sizeof(t));
	}
	memset(big, 'd', sizeof(big));
	assert_int_equal(repo_raw_rc(RAW(.len = 0)), 0);

	/* Wrong types in each field. */
	for (int f = R_TOP; f < R_COUNT; f++) {
		for (int w = W_NIL; w < W_COUNT; w++) {
			if (w == rfield_right[f])
				continue;
			int rc = repo_raw_rc(RAW(.field = f, .wrong = w));
			if (rc != ME_EPROTO)
				fail_msg("repo field %d wrong %d: %d", f, w, rc);
		}
	}
	/* Lengths of fixed-size bins. */
	static const struct { int f; size_t len; } bins[] = {
		{ R_PK, 0 }, { R_PK, 31 }, { R_PK, 33 }, { R_OID, 0 }, { R_OID, 19 },
		{ R_OID, 21 }, { R_OID, 32 }, { R_SIG, 0 }, { R_SIG, 63 }, { R_SIG, 65 },
	};
	uint8_t zeros[128] = { 0 };
	for (size_t i = 0; i < sizeof(bins) / sizeof(bins[0]); i++)
		if (repo_raw_rc(RAW(.field = bins[i].f, .raw = zeros, .len = bins[i].len)) !=
		    ME_EPROTO)
			fail_msg("bin case %zu", i);
	/* Text content. */
	static const struct { int f; const char *s; size_t len; int rc; } txt[] = {
		{ R_ID, "did:repo:zzz", 0, ME_EPROTO },
		{ R_ID, "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK", 0, ME_EPROTO },
		{ R_ID, "", 0, ME_EPROTO },
		{ R_NAME, "", 0, ME_EPROTO },
		{ R_NAME, ".", 0, ME_EPROTO },
		{ R_NAME, "..", 0, ME_EPROTO },
		{ R_NAME, "a/b", 0, ME_EPROTO },
		{ R_NAME, "/", 0, ME_EPROTO },
		{ R_NAME, "a\0b", 3, ME_EPROTO },
		{ R_NAME, "...", 0, 0 },
		{ R_NAME, ".hidden", 0, 0 },
		{ R_DESC, "x\0y", 3, ME_EPROTO },
		{ R_DESC, "", 0, 0 },
		{ R_HEAD, "main", 0, ME_EPROTO },
		{ R_HEAD, "refs/heads/a..b", 0, ME_EPROTO },
		{ R_HEAD, "refs/remotes/o/a", 0, ME_EPROTO },
		{ R_HEAD, "", 0, 0 },
		{ R_HEAD, "refs/heads/unborn", 0, 0 },
		{ R_REFNAME, "refs/heads/c", 0, 0 },
	};
	for (size_t i = 0; i < sizeof(txt) / sizeof(txt[0]); i++) {
		size_t len = txt[i].len ? txt[i].len : strlen(txt[i].s);
		if (repo_raw_rc(RAW(.field = txt[i].f, .raw = txt[i].s, .len = len)) != txt[i].rc)
			fail_msg("text case %zu", i);
	}
	/* Every ref name of the table, as the second ref of a state (after "refs/heads/!"). */
	for (size_t i = 0; i < sizeof(refnames) / sizeof(refnames[0]); i++) {
		const char *n = refnames[i].name;
		size_t len = refnames[i].len ? refnames[i].len : strlen(n);
		int rc = repo_raw_rc(RAW(.field = R_REFNAME, .raw = n, .len = len));
		if (rc != (refnames[i].ours ? 0 : ME_EPROTO))
			fail_msg("refname %zu \"%s\" in a state: %d", i, n, rc);
	}
	/* Oversize strings. */
	static const struct { int f; size_t len; int rc; } sz[] = {
		{ R_NAME, GMSG_MAX_NAME, 0 }, { R_NAME, GMSG_MAX_NAME + 1, ME_ETOOBIG },
		{ R_DESC, GMSG_MAX_DESC, 0 }, { R_DESC, GMSG_MAX_DESC + 1, ME_ETOOBIG },
		{ R_ID, 200, ME_EPROTO },
	};
	for (size_t i = 0; i < sizeof(sz) / sizeof(sz[0]); i++)
		if (repo_raw_rc(RAW(.field = sz[i].f, .raw = big, .len = sz[i].len)) != sz[i].rc)
			fail_msg("size case %zu", i);
	char longref[400];
	memcpy(longref, "refs/heads/b", 12);
	memset(longref + 12, 'x', sizeof(longref) - 12);
	assert_int_equal(repo_raw_rc(RAW(.field = R_REFNAME, .raw = longref,
					 .len = GMSG_MAX_REFNAME)), 0);
	assert_int_equal(repo_raw_rc(RAW(.field = R_REFNAME, .raw = longref,
					 .len = GMSG_MAX_REFNAME + 1)), ME_ETOOBIG);
	assert_int_equal(repo_raw_rc(RAW(.field = R_HEAD, .raw = longref,
					 .len = GMSG_MAX_REFNAME + 1)), ME_ETOOBIG);
	/* Order and consistency. */
	assert_int_equal(repo_raw_rc(RAW(.swap_refs = 1)), ME_EPROTO);
	assert_int_equal(repo_raw_rc(RAW(.dup_ref = 1)), ME_EPROTO);
	assert_int_equal(repo_raw_rc(RAW(.swap_repos = 1)), ME_EPROTO);
	assert_int_equal(repo_raw_rc(RAW(.dup_repo = 1)), ME_EPROTO);
	assert_int_equal(repo_raw_rc(RAW(.mismatch_id = 1)), ME_EPROTO);

	/* Truncation at every offset. */
	msgpack_sbuffer sb;
	struct gmsg_repo_ann d;
	pack_repo_raw(&sb, RAW(.len = 0));
	for (size_t n = 0; n < sb.size; n++) {
		uint8_t *c = malloc(n ? n : 1);
		assert_non_null(c);
		memcpy(c, sb.data, n);
		assert_int_equal(gmsg_repo_ann_decode(c, n, &d), ME_EPROTO);
		assert_null(d.repos);
		free(c);
	}
	msgpack_sbuffer_write(&sb, "\x00", 1);
	assert_int_equal(gmsg_repo_ann_decode((uint8_t *)sb.data, sb.size, &d), ME_EPROTO);
	msgpack_sbuffer_destroy(&sb);

	/* The encoder refuses unsorted or duplicate repos and bad fields. */
	struct fixture fx;
	struct gmsg_repo_ann a;
	fixture_make(&fx, 3, 2, false);
	a.repos = fx.repos;
	a.nrepos = 3;
	msgpack_sbuffer_init(&sb);
	struct gmsg_repo t = fx.repos[0];
	fx.repos[0] = fx.repos[1];
	fx.repos[1] = t;
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_EINVAL);
	fx.repos[1] = fx.repos[0];
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_EINVAL);
	fx.repos[0] = t;
	fx.repos[1] = fx.repos[2];
	fx.repos[1].refstate.repo_id = fx.repos[0].id;
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_EINVAL);
	a.nrepos = 1;
	fx.repos[0].name = gmsg_str("a/b");
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_EINVAL);
	fx.repos[0].name = gmsg_str("ok");
	fx.repos[0].description = (struct gmsg_str){ big, GMSG_MAX_DESC + 1 };
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_ETOOBIG);
	fx.repos[0].description = gmsg_str("");
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), 0);
	a.repos = NULL;
	assert_int_equal(gmsg_repo_ann_encode(&a, &sb), ME_EINVAL);
	msgpack_sbuffer_destroy(&sb);
	fixture_free(&fx);
}

/* ======================================================================================== */
/* random input                                                                             */
/* ======================================================================================== */

static void decode_all(const uint8_t *b, size_t n, int *ok)
{
	struct gmsg_envelope e;
	struct gmsg_node_ann na;
	struct gmsg_repo_ann ra;

	if (gmsg_envelope_decode(b, n, &e) == 0)
		ok[0]++;
	if (gmsg_node_ann_decode(b, n, &na) == 0)
		ok[1]++;
	if (gmsg_repo_ann_decode(b, n, &ra) == 0) {
		ok[2]++;
		gmsg_repo_ann_free(&ra);
	} else {
		assert_null(ra.repos);
	}
}

static void test_random_garbage(void **state)
{
	(void)state;
	uint8_t buf[1024];
	int ok[3] = { 0 };

	/* Pure noise, biased towards msgpack container and string headers half of the time. */
	for (int i = 0; i < 100000; i++) {
		size_t n = (size_t)(rnd() % 300);
		for (size_t k = 0; k < n; k++) {
			uint64_t r = rnd();
			static const uint8_t hdr[] = { 0x91, 0x92, 0x95, 0x96, 0xc4, 0xa5, 0xdc,
				0xdd, 0xc5, 0xc6, 0xcf, 0x00, 0x20 };
			buf[k] = (i & 1) && (r & 0x300) == 0 ? hdr[(r >> 16) % sizeof(hdr)]
							    : (uint8_t)r;
		}
		decode_all(buf, n, ok);
	}

	/* Mutations of valid messages: a few random bytes changed, sometimes truncated. */
	struct fixture fx;
	struct gmsg_repo_ann a;
	struct gmsg_node_ann na;
	msgpack_sbuffer s[3];
	fixture_make(&fx, 2, 2, true);
	a.repos = fx.repos;
	a.nrepos = 2;
	fill_node_ann(&na, &kp1);
	na.naddrs = 3;
	msgpack_sbuffer_init(&s[0]);
	msgpack_sbuffer_init(&s[1]);
	assert_int_equal(gmsg_node_ann_encode(&na, &s[0]), 0);
	assert_int_equal(gmsg_repo_ann_encode(&a, &s[1]), 0);
	encode_env(&kp1, 5, 3, GMSG_NODE_ANN, s[0].data, s[0].size, &s[2]);
	for (int i = 0; i < 30000; i++) {
		const msgpack_sbuffer *src = &s[i % 3];
		size_t n = src->size;
		assert_true(n <= sizeof(buf));
		memcpy(buf, src->data, n);
		int muts = 1 + (int)(rnd() % 4);
		for (int m = 0; m < muts; m++)
			buf[rnd() % n] = (uint8_t)rnd();
		if (rnd() % 4 == 0)
			n = (size_t)(rnd() % n);
		decode_all(buf, n, ok);
	}
	for (int i = 0; i < 3; i++)
		msgpack_sbuffer_destroy(&s[i]);
	fixture_free(&fx);
	print_message("random: %d envelopes, %d node anns, %d repo anns decoded\n", ok[0], ok[1],
		      ok[2]);
}

/* ======================================================================================== */
/* transfer messages (docs/peer-protocol.md §3)                                             */
/* ======================================================================================== */

/* The body of the one frame an encoder appended to sb (its header checked). */
static const uint8_t *xbody(const msgpack_sbuffer *sb, size_t *len)
{
	const uint8_t *w = (const uint8_t *)sb->data;

	assert_true(sb->size > 4);
	*len = sb->size - 4;
	assert_int_equal(((uint32_t)w[0] << 24 | (uint32_t)w[1] << 16 | (uint32_t)w[2] << 8 | w[3]),
			 *len);
	assert_true(*len <= XMSG_MAX_BODY);
	return w + 4;
}

/* Decodes the frame in sb, expecting rc; a failed decode leaves *m empty. */
static void xdecode_sb(const msgpack_sbuffer *sb, struct xmsg *m, int rc)
{
	size_t n;
	const uint8_t *b = xbody(sb, &n);

	assert_int_equal(xmsg_decode(b, n, m), rc);
	if (rc < 0) {
		assert_null(m->haves);
		assert_null(m->refstate.refs);
		assert_int_equal(m->type, 0);
	}
}

/* A real ref state: refs3 signed by kp1 for a repository kp1 created. */
static char xrs_id[ME_DID_REPO_SIZE];

static void xrs_make(struct gmsg_refstate *rs)
{
	repo_id_of(&kp1, 7, xrs_id);
	memset(rs, 0, sizeof(*rs));
	rs->repo_id = gmsg_str(xrs_id);
	rs->seq = 1700000000000ull;
	rs->head = gmsg_str("refs/heads/main");
	rs->refs = refs3;
	rs->nrefs = 3;
	assert_int_equal(gmsg_refstate_sign(&kp1, rs), 0);
}

static void assert_rs_equal(const struct gmsg_refstate *x, const struct gmsg_refstate *y)
{
	assert_true(gmsg_str_eq(x->repo_id, y->repo_id));
	assert_true(x->seq == y->seq);
	assert_true(gmsg_str_eq(x->head, y->head));
	assert_int_equal(x->nrefs, y->nrefs);
	for (size_t k = 0; k < x->nrefs; k++) {
		assert_true(gmsg_str_eq(x->refs[k].name, y->refs[k].name));
		assert_memory_equal(x->refs[k].oid, y->refs[k].oid, 20);
	}
	assert_memory_equal(x->sig, y->sig, 64);
}

static void fill_bytes(uint8_t *p, size_t n, uint8_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(seed + i * 13 + (i >> 8));
}

static void test_xmsg_request_roundtrip(void **state)
{
	(void)state;
	static const size_t counts[] = { 0, 1, 2, XMSG_MAX_HAVES };
	uint8_t (*haves)[ME_OID_LEN] = calloc(XMSG_MAX_HAVES, ME_OID_LEN);
	uint8_t digest[XMSG_DIGEST_LEN];
	char id[ME_DID_REPO_SIZE];
	msgpack_sbuffer sb;
	struct xmsg m;

	assert_non_null(haves);
	for (size_t i = 0; i < XMSG_MAX_HAVES; i++)
		fill_bytes(haves[i], ME_OID_LEN, (uint8_t)i);
	fill_bytes(digest, sizeof(digest), 0xd1);
	repo_id_of(&kp2, 3, id);
	for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
		for (int resume = 0; resume < 2; resume++) {
			uint64_t off = resume ? (c == 1 ? UINT64_MAX : 65536 * c + 1) : 0;
			msgpack_sbuffer_init(&sb);
			assert_int_equal(xmsg_encode_request(&sb, id,
							     (const uint8_t(*)[ME_OID_LEN])haves,
							     counts[c], resume ? digest : NULL, off),
					 0);
			xdecode_sb(&sb, &m, 0);
			assert_int_equal(m.type, XMSG_REQUEST);
			assert_true(gmsg_str_eq(m.repo_id, gmsg_str(id)));
			assert_int_equal(m.nhaves, counts[c]);
			if (counts[c] > 0)
				assert_memory_equal(m.haves, haves, counts[c] * ME_OID_LEN);
			else
				assert_null(m.haves);
			assert_int_equal(m.has_resume, resume);
			if (resume) {
				assert_memory_equal(m.resume_digest, digest, XMSG_DIGEST_LEN);
				assert_true(m.resume_offset == off);
			}
			xmsg_free(&m);
			assert_null(m.haves);
			xmsg_free(&m); /* twice is harmless */
			msgpack_sbuffer_destroy(&sb);
		}
	}
	xmsg_free(NULL);
	free(haves);
}

static void test_xmsg_start_roundtrip(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		uint64_t total, offset;
	} cases[] = {
		{ "abc-1700000000000.bundle", 123456, 0 },
		{ "", 0, 0 },
		{ "x", 65536, 65536 },
		{ "../../x", UINT64_MAX, UINT64_MAX - 1 }, /* informational: any text is allowed */
	};
	char longname[XMSG_MAX_FILENAME + 1];
	struct gmsg_refstate rs, empty;
	uint8_t digest[XMSG_DIGEST_LEN];
	msgpack_sbuffer sb;
	struct xmsg m;

	xrs_make(&rs);
	fill_bytes(digest, sizeof(digest), 0x5a);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		msgpack_sbuffer_init(&sb);
		assert_int_equal(xmsg_encode_start(&sb, cases[i].name, cases[i].total, digest,
						   cases[i].offset, kp1.pk, &rs),
				 0);
		xdecode_sb(&sb, &m, 0);
		assert_int_equal(m.type, XMSG_START);
		assert_true(gmsg_str_eq(m.file_name, gmsg_str(cases[i].name)));
		assert_true(m.total_size == cases[i].total);
		assert_true(m.offset == cases[i].offset);
		assert_memory_equal(m.digest, digest, XMSG_DIGEST_LEN);
		assert_memory_equal(m.creator_pk, kp1.pk, ME_PK_LEN);
		assert_rs_equal(&m.refstate, &rs);
		/* The decoded state is the creator's, and only the creator's. */
		assert_int_equal(gmsg_refstate_verify(&m.refstate, kp1.pk), 0);
		assert_int_equal(gmsg_refstate_verify(&m.refstate, kp2.pk), ME_EPERM);
		xmsg_free(&m);
		assert_null(m.refstate.refs);
		msgpack_sbuffer_destroy(&sb);
	}
	/* The longest file name; a state without refs and without head. */
	memset(longname, 'n', XMSG_MAX_FILENAME);
	longname[XMSG_MAX_FILENAME] = '\0';
	empty = rs;
	empty.refs = NULL;
	empty.nrefs = 0;
	empty.head = gmsg_str("");
	assert_int_equal(gmsg_refstate_sign(&kp1, &empty), 0);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_start(&sb, longname, 10, digest, 3, kp1.pk, &empty), 0);
	xdecode_sb(&sb, &m, 0);
	assert_int_equal(m.file_name.len, XMSG_MAX_FILENAME);
	assert_int_equal(m.refstate.nrefs, 0);
	assert_int_equal(m.refstate.head.len, 0);
	assert_int_equal(gmsg_refstate_verify(&m.refstate, kp1.pk), 0);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&sb);
}

/* A start of total_size 1000 whose eighth element is the msgpack in tail[0..n). */
static int start_with_tail(const uint8_t *tail, size_t n, struct xmsg *m)
{
	uint8_t digest[XMSG_DIGEST_LEN] = { 0 }, buf[4096];
	struct gmsg_refstate rs;
	msgpack_sbuffer sb;
	size_t len;
	const uint8_t *b;
	int rc;

	xrs_make(&rs);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_start(&sb, "f", 1000, digest, 0, kp1.pk, &rs), 0);
	b = xbody(&sb, &len);
	assert_true(len + n <= sizeof(buf));
	memcpy(buf, b, len);
	assert_int_equal(buf[0], 0x97);
	buf[0] = 0x98;
	memcpy(buf + len, tail, n);
	rc = xmsg_decode(buf, len + n, m);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

static void test_xmsg_start_parts(void **state)
{
	(void)state;
	uint8_t digest[XMSG_DIGEST_LEN];
	struct gmsg_refstate rs;
	struct xmsg_parts parts, bad;
	msgpack_sbuffer sb;
	struct xmsg m;
	size_t len;
	const uint8_t *b;

	xrs_make(&rs);
	fill_bytes(digest, sizeof(digest), 0x5a);
	/* one part, and the most there may be */
	for (uint32_t n = 1; n <= XMSG_MAX_PARTS; n += XMSG_MAX_PARTS - 1) {
		memset(&parts, 0, sizeof(parts));
		parts.n = n;
		for (uint32_t i = 0; i < n; i++) {
			parts.v[i].offset = 100 + (uint64_t)i * 70000;
			parts.v[i].count = i + 1 == n ? UINT32_MAX : 3 + i;
		}
		msgpack_sbuffer_init(&sb);
		assert_int_equal(xmsg_encode_start_parts(&sb, "f", 100 + (uint64_t)n * 70000, digest,
							 0, kp1.pk, &rs, &parts), 0);
		xdecode_sb(&sb, &m, 0);
		assert_int_equal(m.type, XMSG_START);
		assert_int_equal(m.parts.n, n);
		assert_memory_equal(m.parts.v, parts.v, n * sizeof(parts.v[0]));
		assert_rs_equal(&m.refstate, &rs);
		xmsg_free(&m);
		msgpack_sbuffer_destroy(&sb);
	}
	/* canonical: no parts is the 7-element start; parts append [[offset, count]...] */
	memset(&parts, 0, sizeof(parts));
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &parts),
			 0);
	b = xbody(&sb, &len);
	assert_int_equal(b[0], 0x97);
	xdecode_sb(&sb, &m, 0);
	assert_int_equal(m.parts.n, 0);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&sb);
	parts.n = 2;
	parts.v[0].offset = 80;
	parts.v[0].count = 1;
	parts.v[1].offset = 300;
	parts.v[1].count = 70000;
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &parts),
			 0);
	b = xbody(&sb, &len);
	assert_int_equal(b[0], 0x98);
	static const uint8_t tail[] = { 0x92, 0x92, 80, 1, 0x92, 0xcd, 0x01, 0x2c,
					0xce, 0x00, 0x01, 0x11, 0x70 };
	assert_true(len > sizeof(tail));
	assert_memory_equal(b + len - sizeof(tail), tail, sizeof(tail));
	assert_int_equal(start_with_tail(tail, sizeof(tail), &m), 0);
	assert_int_equal(m.parts.n, 2);
	assert_true(m.parts.v[1].offset == 300 && m.parts.v[1].count == 70000);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&sb);

	/* the encoder refuses what the decoder would */
	msgpack_sbuffer_init(&sb);
	bad = parts;
	bad.v[1].offset = 80; /* not increasing */
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &bad),
			 ME_EINVAL);
	bad = parts;
	bad.v[1].offset = 1000; /* past the bundle */
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &bad),
			 ME_EINVAL);
	bad = parts;
	bad.v[0].count = 0;
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &bad),
			 ME_EINVAL);
	bad = parts;
	bad.n = XMSG_MAX_PARTS + 1;
	assert_int_equal(xmsg_encode_start_parts(&sb, "f", 1000, digest, 0, kp1.pk, &rs, &bad),
			 ME_EINVAL);
	assert_int_equal(sb.size, 0);
	msgpack_sbuffer_destroy(&sb);

	/* and the decoder refuses them, and wrong shapes */
	static const struct {
		uint8_t b[16];
		size_t n;
		int rc;
	} hostile[] = {
		{ { 0x90 }, 1, ME_EPROTO },                          /* [] */
		{ { 0xc0 }, 1, ME_EPROTO },                          /* nil */
		{ { 0x91, 0x92, 80, 0 }, 4, ME_EPROTO },              /* count 0 */
		{ { 0x92, 0x92, 80, 1, 0x92, 80, 1 }, 7, ME_EPROTO }, /* same offset */
		{ { 0x92, 0x92, 90, 1, 0x92, 80, 1 }, 7, ME_EPROTO }, /* decreasing */
		{ { 0x91, 0x92, 0xcd, 0x03, 0xe8, 1 }, 6, ME_EPROTO }, /* offset 1000 */
		{ { 0x91, 0x92, 80, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0 }, 12, ME_EPROTO }, /* count 2^32 */
		{ { 0x91, 0x92, 0xff, 1 }, 4, ME_EPROTO },            /* negative offset */
		{ { 0x91, 0x93, 80, 1, 1 }, 5, ME_EPROTO },           /* three elements */
		{ { 0x91, 0x91, 80 }, 3, ME_EPROTO },                 /* one element */
		{ { 0x91, 0xa1, 'x' }, 3, ME_EPROTO },                /* not an array */
	};
	for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
		assert_int_equal(start_with_tail(hostile[i].b, hostile[i].n, &m), hostile[i].rc);
		assert_null(m.refstate.refs);
		assert_int_equal(m.parts.n, 0);
	}
	uint8_t many[3 + 3 * (XMSG_MAX_PARTS + 1)] = { 0xdc, 0x00, XMSG_MAX_PARTS + 1 };
	for (size_t i = 0; i <= XMSG_MAX_PARTS; i++) {
		many[3 + 3 * i] = 0x92;
		many[4 + 3 * i] = (uint8_t)(10 + i);
		many[5 + 3 * i] = 1;
	}
	assert_int_equal(start_with_tail(many, sizeof(many), &m), ME_ETOOBIG);
	many[2] = XMSG_MAX_PARTS; /* the same, one fewer: fine */
	assert_int_equal(start_with_tail(many, sizeof(many) - 3, &m), 0);
	assert_int_equal(m.parts.n, XMSG_MAX_PARTS);
	xmsg_free(&m);
}

static void test_xmsg_data_done_error_roundtrip(void **state)
{
	(void)state;
	static const size_t sizes[] = { 1, 2, 255, 256, 65535, XMSG_MAX_DATA };
	uint8_t *p = malloc(XMSG_MAX_DATA);
	uint8_t digest[XMSG_DIGEST_LEN];
	msgpack_sbuffer sb;
	struct xmsg m;

	assert_non_null(p);
	fill_bytes(p, XMSG_MAX_DATA, 0x11);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		msgpack_sbuffer_init(&sb);
		assert_int_equal(xmsg_encode_data(&sb, p, sizes[i]), 0);
		xdecode_sb(&sb, &m, 0);
		assert_int_equal(m.type, XMSG_DATA);
		assert_int_equal(m.len, sizes[i]);
		assert_memory_equal(m.data, p, sizes[i]);
		/* Data borrows the frame: no copy of 64 KiB per chunk. */
		size_t n;
		const uint8_t *b = xbody(&sb, &n);
		assert_true(m.data > b && m.data + m.len == b + n);
		xmsg_free(&m);
		msgpack_sbuffer_destroy(&sb);
	}
	free(p);

	fill_bytes(digest, sizeof(digest), 0xee);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_done(&sb, digest), 0);
	xdecode_sb(&sb, &m, 0);
	assert_int_equal(m.type, XMSG_DONE);
	assert_memory_equal(m.digest, digest, XMSG_DIGEST_LEN);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&sb);

	static const struct {
		int code;
		const char *msg;
	} errs[] = {
		{ ME_ENOTFOUND, "unknown repository" },
		{ ME_EBUSY, "too many transfers at once" },
		{ ME_EPROTO, "" },
		{ -1, "x" },
		{ INT32_MIN, "min" },
	};
	for (size_t i = 0; i < sizeof(errs) / sizeof(errs[0]); i++) {
		msgpack_sbuffer_init(&sb);
		assert_int_equal(xmsg_encode_error(&sb, errs[i].code, errs[i].msg), 0);
		xdecode_sb(&sb, &m, 0);
		assert_int_equal(m.type, XMSG_ERROR);
		assert_true(m.code == errs[i].code);
		assert_true(gmsg_str_eq(m.message, gmsg_str(errs[i].msg)));
		xmsg_free(&m);
		msgpack_sbuffer_destroy(&sb);
	}
	/* A message longer than the limit is cut by the encoder, so it still decodes. */
	char longmsg[1000];
	memset(longmsg, 'e', sizeof(longmsg) - 1);
	longmsg[sizeof(longmsg) - 1] = '\0';
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_error(&sb, ME_EIO, longmsg), 0);
	xdecode_sb(&sb, &m, 0);
	assert_int_equal(m.message.len, XMSG_MAX_ERRMSG);
	xmsg_free(&m);
	msgpack_sbuffer_destroy(&sb);
}

/* Byte-exact canonical frames, written out by hand from docs/peer-protocol.md §3. */
static size_t kat_put(uint8_t *out, size_t n, const void *p, size_t len)
{
	memcpy(out + n, p, len);
	return n + len;
}

static void assert_frame_is(const msgpack_sbuffer *sb, const uint8_t *body, size_t n)
{
	assert_int_equal(sb->size, n + 4);
	const uint8_t *w = (const uint8_t *)sb->data;
	assert_int_equal(w[0], (uint8_t)(n >> 24));
	assert_int_equal(w[1], (uint8_t)(n >> 16));
	assert_int_equal(w[2], (uint8_t)(n >> 8));
	assert_int_equal(w[3], (uint8_t)n);
	assert_memory_equal(w + 4, body, n);
}

static void test_xmsg_canonical(void **state)
{
	(void)state;
	uint8_t kat[1024], digest[32], have[2][20];
	struct gmsg_refstate rs;
	msgpack_sbuffer sb;
	size_t n, idlen;
	char id[ME_DID_REPO_SIZE];

	fill_bytes(digest, 32, 0x42);
	fill_bytes(have[0], 20, 1);
	fill_bytes(have[1], 20, 2);
	repo_id_of(&kp1, 9, id);
	idlen = strlen(id);
	assert_true(idlen >= 32 && idlen < 256);

	/* request: [1, id, [have, have], [digest, 70000]] */
	n = 0;
	kat[n++] = 0x94;
	kat[n++] = 0x01;
	kat[n++] = 0xd9;
	kat[n++] = (uint8_t)idlen;
	n = kat_put(kat, n, id, idlen);
	kat[n++] = 0x92;
	for (int i = 0; i < 2; i++) {
		kat[n++] = 0xc4;
		kat[n++] = 20;
		n = kat_put(kat, n, have[i], 20);
	}
	kat[n++] = 0x92;
	kat[n++] = 0xc4;
	kat[n++] = 32;
	n = kat_put(kat, n, digest, 32);
	kat[n++] = 0xce; /* 70000: uint32 */
	n = kat_put(kat, n, "\x00\x01\x11\x70", 4);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_request(&sb, id, (const uint8_t(*)[20])have, 2, digest, 70000),
			 0);
	assert_frame_is(&sb, kat, n);
	msgpack_sbuffer_destroy(&sb);

	/* request without haves nor resume: [1, id, [], nil] */
	n = 0;
	kat[n++] = 0x94;
	kat[n++] = 0x01;
	kat[n++] = 0xd9;
	kat[n++] = (uint8_t)idlen;
	n = kat_put(kat, n, id, idlen);
	kat[n++] = 0x90;
	kat[n++] = 0xc0;
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_request(&sb, id, NULL, 0, NULL, 0), 0);
	assert_frame_is(&sb, kat, n);
	msgpack_sbuffer_destroy(&sb);

	/* start: [2, "f.bundle", 1000, digest, 0, pk, [id, seq, head, [[name, oid]...], sig]] */
	xrs_make(&rs);
	size_t rlen = strlen(rs.repo_id.ptr);
	n = 0;
	kat[n++] = 0x97;
	kat[n++] = 0x02;
	kat[n++] = 0xa8;
	n = kat_put(kat, n, "f.bundle", 8);
	kat[n++] = 0xcd;
	kat[n++] = 0x03;
	kat[n++] = 0xe8;
	kat[n++] = 0xc4;
	kat[n++] = 32;
	n = kat_put(kat, n, digest, 32);
	kat[n++] = 0x00;
	kat[n++] = 0xc4;
	kat[n++] = 32;
	n = kat_put(kat, n, kp1.pk, 32);
	kat[n++] = 0x95;
	kat[n++] = 0xd9;
	kat[n++] = (uint8_t)rlen;
	n = kat_put(kat, n, rs.repo_id.ptr, rlen);
	kat[n++] = 0xcf;
	for (int i = 0; i < 8; i++)
		kat[n++] = (uint8_t)(rs.seq >> (56 - 8 * i));
	kat[n++] = 0xaf;
	n = kat_put(kat, n, "refs/heads/main", 15);
	kat[n++] = 0x93;
	for (int i = 0; i < 3; i++) {
		kat[n++] = 0x92;
		kat[n++] = (uint8_t)(0xa0 | refs3[i].name.len);
		n = kat_put(kat, n, refs3[i].name.ptr, refs3[i].name.len);
		kat[n++] = 0xc4;
		kat[n++] = 20;
		n = kat_put(kat, n, refs3[i].oid, 20);
	}
	kat[n++] = 0xc4;
	kat[n++] = 64;
	n = kat_put(kat, n, rs.sig, 64);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_start(&sb, "f.bundle", 1000, digest, 0, kp1.pk, &rs), 0);
	assert_frame_is(&sb, kat, n);
	msgpack_sbuffer_destroy(&sb);

	/* data: [3, bin8 "abc"]; 65536 bytes take a bin32 header */
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_data(&sb, "abc", 3), 0);
	assert_frame_is(&sb, (const uint8_t *)"\x92\x03\xc4\x03" "abc", 7);
	msgpack_sbuffer_destroy(&sb);
	uint8_t *big = calloc(1, XMSG_MAX_DATA);
	assert_non_null(big);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_data(&sb, big, XMSG_MAX_DATA), 0);
	assert_int_equal(sb.size, 4 + 2 + 5 + XMSG_MAX_DATA);
	assert_memory_equal(sb.data + 4, "\x92\x03\xc6\x00\x01\x00\x00", 7);
	msgpack_sbuffer_destroy(&sb);
	free(big);

	/* done: [4, digest] */
	n = 0;
	kat[n++] = 0x92;
	kat[n++] = 0x04;
	kat[n++] = 0xc4;
	kat[n++] = 32;
	n = kat_put(kat, n, digest, 32);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_done(&sb, digest), 0);
	assert_frame_is(&sb, kat, n);
	msgpack_sbuffer_destroy(&sb);

	/* error: [5, -10 (negative fixint), "nope"]; -20 too; INT32_MIN is an int32 */
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_error(&sb, ME_ENOTFOUND, "nope"), 0);
	assert_frame_is(&sb, (const uint8_t *)"\x93\x05\xf6\xa4nope", 8);
	msgpack_sbuffer_destroy(&sb);
	msgpack_sbuffer_init(&sb);
	assert_int_equal(xmsg_encode_error(&sb, INT32_MIN, ""), 0);
	assert_frame_is(&sb, (const uint8_t *)"\x93\x05\xd2\x80\x00\x00\x00\xa0", 8);
	msgpack_sbuffer_destroy(&sb);
}

static void test_xmsg_encoder_refusals(void **state)
{
	(void)state;
	uint8_t digest[32] = { 0 }, have[1][20] = { { 0 } };
	char id[ME_DID_REPO_SIZE], name[XMSG_MAX_FILENAME + 2];
	struct gmsg_refstate rs, bad;
	msgpack_sbuffer sb;
	uint8_t *big = calloc(1, XMSG_MAX_DATA + 1);

	assert_non_null(big);
	repo_id_of(&kp1, 1, id);
	xrs_make(&rs);
	memset(name, 'n', sizeof(name) - 1);
	name[sizeof(name) - 1] = '\0'; /* 256 bytes */
	msgpack_sbuffer_init(&sb);
	msgpack_sbuffer_write(&sb, "keep", 4);

	assert_int_equal(xmsg_encode_request(&sb, "did:repo:../../x", NULL, 0, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(&sb, "../x", NULL, 0, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(&sb, kp1.did, NULL, 0, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(&sb, NULL, NULL, 0, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(&sb, id, NULL, 1, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(&sb, id, (const uint8_t(*)[20])have,
					     XMSG_MAX_HAVES + 1, NULL, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_request(NULL, id, NULL, 0, NULL, 0), ME_EINVAL);

	assert_int_equal(xmsg_encode_start(&sb, name, 1, digest, 0, kp1.pk, &rs), ME_EINVAL);
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, digest, 2, kp1.pk, &rs), ME_EINVAL);
	assert_int_equal(xmsg_encode_start(&sb, NULL, 1, digest, 0, kp1.pk, &rs), ME_EINVAL);
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, NULL, 0, kp1.pk, &rs), ME_EINVAL);
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, digest, 0, NULL, &rs), ME_EINVAL);
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, digest, 0, kp1.pk, NULL), ME_EINVAL);
	bad = rs;
	bad.repo_id = gmsg_str("did:repo:../../x");
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, digest, 0, kp1.pk, &bad), ME_EINVAL);
	bad = rs;
	bad.head = gmsg_str("../HEAD");
	assert_int_equal(xmsg_encode_start(&sb, "f", 1, digest, 0, kp1.pk, &bad), ME_EINVAL);

	assert_int_equal(xmsg_encode_data(&sb, big, 0), ME_EINVAL);
	assert_int_equal(xmsg_encode_data(&sb, big, XMSG_MAX_DATA + 1), ME_EINVAL);
	assert_int_equal(xmsg_encode_data(&sb, NULL, 1), ME_EINVAL);
	assert_int_equal(xmsg_encode_done(&sb, NULL), ME_EINVAL);
	assert_int_equal(xmsg_encode_error(&sb, 0, "x"), ME_EINVAL);
	assert_int_equal(xmsg_encode_error(&sb, 1, "x"), ME_EINVAL);
	assert_int_equal(xmsg_encode_error(&sb, -1, NULL), ME_EINVAL);
	/* out is untouched by every refusal */
	assert_int_equal(sb.size, 4);
	assert_memory_equal(sb.data, "keep", 4);
	/* and a later message is appended after what was there */
	assert_int_equal(xmsg_encode_done(&sb, digest), 0);
	assert_int_equal(sb.size, 4 + 4 + 2 + 2 + 32);
	msgpack_sbuffer_destroy(&sb);
	free(big);
}

/* ---- hostile input ---- */

static int xdecode_raw(const void *p, size_t n)
{
	struct xmsg m;
	int rc = xmsg_decode(p, n, &m);

	if (rc < 0) {
		assert_null(m.haves);
		assert_null(m.refstate.refs);
		assert_int_equal(m.type, 0);
		assert_int_equal(m.nhaves, 0);
	}
	xmsg_free(&m);
	return rc;
}

static int xdecode_pk(const msgpack_sbuffer *sb)
{
	return xdecode_raw(sb->data, sb->size);
}

/* Hand-packed messages: the valid form of each type, with one field replaced (by one of the
 * wrong values), an element dropped or added, or fields given by the caller. */
enum { XT_REQ, XT_START, XT_DATA, XT_DONE, XT_ERR, XT_COUNT };
static const unsigned xt_type[XT_COUNT] = { 1, 2, 3, 4, 5 };
static const unsigned xt_arity[XT_COUNT] = { 4, 7, 2, 2, 3 };

struct xraw {
	int kind;          /* XT_* */
	int field;         /* field to replace (0 = the type), -1 none */
	int wrong;         /* W_* packed in its place */
	int arity_delta;   /* -1: last element dropped, +1: a nil appended */
	/* overrides for the valid form (NULL/0: the default) */
	const char *repo_id;      /* request id, start refstate id */
	size_t nhaves;            /* with have_len bytes each */
	size_t have_len;
	const char *file_name;    /* start */
	size_t file_name_len;
	uint64_t total, offset;   /* start, when total is not 0 */
	size_t data_len;          /* data; SIZE_MAX: 0 bytes */
	int64_t code;             /* error, when not 0 */
	const char *message;
	size_t message_len;
	int rs_sign;              /* sign the start's state properly (with kp1) */
};

static void pk_raw_refstate(msgpack_packer *pk, const char *id, int sign)
{
	struct gmsg_refstate rs;

	xrs_make(&rs);
	if (id == NULL)
		id = xrs_id;
	msgpack_pack_array(pk, 5);
	pk_str(pk, id);
	msgpack_pack_uint64(pk, rs.seq);
	pk_str(pk, "refs/heads/main");
	msgpack_pack_array(pk, 3);
	for (int i = 0; i < 3; i++) {
		msgpack_pack_array(pk, 2);
		pk_str(pk, refs3[i].name.ptr);
		pk_bin(pk, refs3[i].oid, 20);
	}
	if (!sign)
		memset(rs.sig, 0x5e, sizeof(rs.sig));
	pk_bin(pk, rs.sig, 64);
}

static void pack_xraw(msgpack_sbuffer *sb, const struct xraw *r)
{
	static uint8_t zeros[XMSG_MAX_DATA + 1];
	uint8_t d32[32];
	msgpack_packer pk;
	char id[ME_DID_REPO_SIZE];
	unsigned n = xt_arity[r->kind];

	fill_bytes(d32, 32, 0x33);
	repo_id_of(&kp1, 5, id);
	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, (uint32_t)((int)n + r->arity_delta));
	for (unsigned f = 0; f < n; f++) {
		if (r->arity_delta < 0 && f == n - 1)
			break;
		if ((int)f == r->field) {
			pack_wrong(&pk, r->wrong);
			continue;
		}
		if (f == 0) {
			msgpack_pack_unsigned_int(&pk, xt_type[r->kind]);
			continue;
		}
		switch (r->kind * 8 + (int)f) {
		case XT_REQ * 8 + 1:
			pk_str(&pk, r->repo_id ? r->repo_id : id);
			break;
		case XT_REQ * 8 + 2: {
			size_t nh = r->have_len ? r->nhaves : 2, hl = r->have_len ? r->have_len : 20;
			msgpack_pack_array(&pk, (uint32_t)nh);
			for (size_t i = 0; i < nh; i++)
				pk_bin(&pk, zeros, hl);
			break;
		}
		case XT_REQ * 8 + 3:
			msgpack_pack_array(&pk, 2);
			pk_bin(&pk, d32, 32);
			msgpack_pack_uint64(&pk, 5);
			break;
		case XT_START * 8 + 1:
			if (r->file_name) {
				msgpack_pack_str(&pk, r->file_name_len);
				msgpack_pack_str_body(&pk, r->file_name, r->file_name_len);
			} else {
				pk_str(&pk, "f.bundle");
			}
			break;
		case XT_START * 8 + 2:
			msgpack_pack_uint64(&pk, r->total ? r->total : 1000);
			break;
		case XT_START * 8 + 3:
			pk_bin(&pk, d32, 32);
			break;
		case XT_START * 8 + 4:
			msgpack_pack_uint64(&pk, r->total ? r->offset : 0);
			break;
		case XT_START * 8 + 5:
			pk_bin(&pk, kp1.pk, 32);
			break;
		case XT_START * 8 + 6:
			pk_raw_refstate(&pk, r->repo_id, r->rs_sign);
			break;
		case XT_DATA * 8 + 1:
			pk_bin(&pk, zeros, r->data_len == SIZE_MAX ? 0 : r->data_len ? r->data_len : 10);
			break;
		case XT_DONE * 8 + 1:
			pk_bin(&pk, d32, 32);
			break;
		case XT_ERR * 8 + 1:
			msgpack_pack_int64(&pk, r->code ? r->code : ME_ENOTFOUND);
			break;
		case XT_ERR * 8 + 2:
			if (r->message) {
				msgpack_pack_str(&pk, r->message_len);
				msgpack_pack_str_body(&pk, r->message, r->message_len);
			} else {
				pk_str(&pk, "no");
			}
			break;
		}
	}
	if (r->arity_delta > 0)
		msgpack_pack_nil(&pk);
}

static int xraw_rc(const struct xraw *r)
{
	msgpack_sbuffer sb;

	pack_xraw(&sb, r);
	int rc = xdecode_pk(&sb);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

/* Wrong values a field accepts anyway (they are of the right type and in range). */
static bool wrong_fits(int kind, int field, int w)
{
	switch (kind * 8 + field) {
	case XT_REQ * 8 + 2: return w == W_ARRAY;            /* no haves */
	case XT_REQ * 8 + 3: return w == W_NIL;              /* no resume */
	case XT_START * 8 + 1: return w == W_STR;            /* another file name */
	case XT_START * 8 + 2: return w == W_UINT;           /* total 7, offset 0 */
	case XT_START * 8 + 4: return w == W_UINT;           /* offset 7 <= 1000 */
	case XT_DATA * 8 + 1: return w == W_BIN;             /* 3 bytes */
	case XT_ERR * 8 + 1: return w == W_NEG;              /* code -1 */
	case XT_ERR * 8 + 2: return w == W_STR;
	}
	return false;
}

static void test_xmsg_hostile_shapes(void **state)
{
	(void)state;
	struct xraw r;

	/* The valid forms decode (the start's state is signed or not: not checked here). */
	for (int k = 0; k < XT_COUNT; k++) {
		memset(&r, 0, sizeof(r));
		r.kind = k;
		r.field = -1;
		assert_int_equal(xraw_rc(&r), 0);
		r.rs_sign = 1;
		assert_int_equal(xraw_rc(&r), 0);
	}
	/* Every field of every type replaced by every wrong value. */
	for (int k = 0; k < XT_COUNT; k++) {
		for (int f = 0; f < (int)xt_arity[k]; f++) {
			for (int w = W_NIL; w < W_COUNT; w++) {
				memset(&r, 0, sizeof(r));
				r.kind = k;
				r.field = f;
				r.wrong = w;
				int want = f > 0 && wrong_fits(k, f, w) ? 0 : ME_EPROTO;
				if (xraw_rc(&r) != want)
					fail_msg("type %u field %d wrong %d: want %d", xt_type[k], f,
						 w, want);
			}
		}
		/* One element fewer or more. */
		memset(&r, 0, sizeof(r));
		r.kind = k;
		r.field = -1;
		r.arity_delta = -1;
		assert_int_equal(xraw_rc(&r), ME_EPROTO);
		r.arity_delta = 1;
		assert_int_equal(xraw_rc(&r), ME_EPROTO);
	}
	/* Unknown types, with the arity of each known type (the other elements nil). */
	static const uint64_t types[] = { 0, 6, 7, 127, 128, 255, 256, 65536, UINT64_MAX };
	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
		for (int k = 0; k < XT_COUNT; k++) {
			msgpack_sbuffer sb;
			msgpack_packer pk;
			msgpack_sbuffer_init(&sb);
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			msgpack_pack_array(&pk, xt_arity[k]);
			msgpack_pack_uint64(&pk, types[t]);
			for (unsigned f = 1; f < xt_arity[k]; f++)
				msgpack_pack_nil(&pk);
			assert_int_equal(xdecode_pk(&sb), ME_EPROTO);
			msgpack_sbuffer_destroy(&sb);
		}
	}
	/* Types as negative fixints, or as other kinds of values. */
	uint8_t body[3] = { 0x92, 0x00, 0xc0 };
	static const uint8_t tbytes[] = { 0x00, 0x06, 0x7f, 0xff /* -1 */, 0xe0 /* -32 */,
		0xc0, 0xc2, 0xc3, 0x90, 0x80, 0xa0 };
	for (size_t i = 0; i < sizeof(tbytes); i++) {
		body[1] = tbytes[i];
		assert_int_equal(xdecode_raw(body, 3), ME_EPROTO);
	}
	/* [255, nil...] of every arity up to 8, and the empty array */
	for (uint8_t a = 0; a <= 8; a++) {
		uint8_t b[16] = { (uint8_t)(0x90 | a), 0xcc, 0xff };
		for (uint8_t i = 1; i < a; i++)
			b[2 + i] = 0xc0;
		assert_int_equal(xdecode_raw(b, a == 0 ? 1 : (size_t)a + 2), ME_EPROTO);
	}
	/* Not an array at all. */
	static const uint8_t *const notarr[] = { (const uint8_t *)"\x01", (const uint8_t *)"\xc0",
		(const uint8_t *)"\x80", (const uint8_t *)"\xa1x", (const uint8_t *)"\x91\x01" };
	static const size_t notarr_len[] = { 1, 1, 1, 2, 2 };
	for (size_t i = 0; i < 5; i++)
		assert_int_equal(xdecode_raw(notarr[i], notarr_len[i]), ME_EPROTO);
	/* A map shaped like a request. */
	{
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_map(&pk, 2);
		msgpack_pack_uint64(&pk, 1);
		msgpack_pack_nil(&pk);
		msgpack_pack_uint64(&pk, 2);
		msgpack_pack_nil(&pk);
		assert_int_equal(xdecode_pk(&sb), ME_EPROTO);
		msgpack_sbuffer_destroy(&sb);
	}
}

static void test_xmsg_hostile_values(void **state)
{
	(void)state;
	char id[ME_DID_REPO_SIZE], buf[600];
	struct xraw r;

	repo_id_of(&kp1, 5, id);
	/* Repository ids: traversal, other did methods, almost-valid ids. */
	char tail_slash[80], nul_id[80], cut[80], bad_char[80];
	snprintf(tail_slash, sizeof(tail_slash), "%s/../../x", id);
	snprintf(cut, sizeof(cut), "%.*s", (int)strlen(id) - 1, id);
	snprintf(bad_char, sizeof(bad_char), "%s", id);
	bad_char[strlen(bad_char) - 1] = '0'; /* not base58 */
	const char *bad_ids[] = { "did:repo:../../x", "../../x", "did:repo:", "", "did:repo",
		"did:repo:z../../../etc/passwd", kp1.did, tail_slash, cut, bad_char,
		"DID:REPO:zQm", "/etc/passwd" };
	for (size_t i = 0; i < sizeof(bad_ids) / sizeof(bad_ids[0]); i++) {
		memset(&r, 0, sizeof(r));
		r.field = -1;
		r.kind = XT_REQ;
		r.repo_id = bad_ids[i];
		if (xraw_rc(&r) != ME_EPROTO)
			fail_msg("request for '%s' accepted", bad_ids[i]);
		r.kind = XT_START;
		r.rs_sign = 1;
		if (xraw_rc(&r) != ME_EPROTO)
			fail_msg("start with a state of '%s' accepted", bad_ids[i]);
	}
	/* An id with a NUL byte inside (str with explicit length). */
	{
		msgpack_sbuffer sb;
		msgpack_packer pk;
		size_t n = strlen(id);
		memcpy(nul_id, id, n);
		nul_id[5] = '\0';
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 4);
		msgpack_pack_uint64(&pk, 1);
		msgpack_pack_str(&pk, n);
		msgpack_pack_str_body(&pk, nul_id, n);
		msgpack_pack_array(&pk, 0);
		msgpack_pack_nil(&pk);
		assert_int_equal(xdecode_pk(&sb), ME_EPROTO);
		/* the same bytes with the NUL put back: accepted (the test is sound) */
		sb.data[sb.size - 2 - n + 5] = id[5];
		assert_int_equal(xdecode_pk(&sb), 0);
		msgpack_sbuffer_destroy(&sb);
	}

	/* Haves: count and size. */
	memset(&r, 0, sizeof(r));
	r.kind = XT_REQ;
	r.field = -1;
	r.have_len = 20;
	r.nhaves = XMSG_MAX_HAVES;
	assert_int_equal(xraw_rc(&r), 0);
	r.nhaves = XMSG_MAX_HAVES + 1;
	assert_int_equal(xraw_rc(&r), ME_ETOOBIG);
	static const size_t have_lens[] = { 1, 19, 21, 32 };
	for (size_t i = 0; i < 4; i++) {
		r.nhaves = 3;
		r.have_len = have_lens[i];
		assert_int_equal(xraw_rc(&r), ME_EPROTO);
	}
	/* A have that is not the first one is wrong: the earlier ones were taken and freed. */
	{
		msgpack_sbuffer sb;
		msgpack_packer pk;
		uint8_t z[20] = { 0 };
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 4);
		msgpack_pack_uint64(&pk, 1);
		pk_str(&pk, id);
		msgpack_pack_array(&pk, 3);
		pk_bin(&pk, z, 20);
		pk_bin(&pk, z, 20);
		pk_str(&pk, "aaaaaaaaaaaaaaaaaaaa");
		msgpack_pack_nil(&pk);
		assert_int_equal(xdecode_pk(&sb), ME_EPROTO);
		msgpack_sbuffer_destroy(&sb);
	}
	/* Resume: wrong digest size, negative or missing offset, extra element, a map. */
	for (int v = 0; v < 6; v++) {
		msgpack_sbuffer sb;
		msgpack_packer pk;
		uint8_t d[33] = { 0 };
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 4);
		msgpack_pack_uint64(&pk, 1);
		pk_str(&pk, id);
		msgpack_pack_array(&pk, 0);
		switch (v) {
		case 0: msgpack_pack_array(&pk, 2); pk_bin(&pk, d, 31); msgpack_pack_uint64(&pk, 1); break;
		case 1: msgpack_pack_array(&pk, 2); pk_bin(&pk, d, 33); msgpack_pack_uint64(&pk, 1); break;
		case 2: msgpack_pack_array(&pk, 2); pk_bin(&pk, d, 32); msgpack_pack_int64(&pk, -1); break;
		case 3: msgpack_pack_array(&pk, 1); pk_bin(&pk, d, 32); break;
		case 4: msgpack_pack_array(&pk, 3); pk_bin(&pk, d, 32); msgpack_pack_uint64(&pk, 1);
			msgpack_pack_nil(&pk); break;
		case 5: msgpack_pack_map(&pk, 1); pk_bin(&pk, d, 32); msgpack_pack_uint64(&pk, 1); break;
		}
		assert_int_equal(xdecode_pk(&sb), ME_EPROTO);
		msgpack_sbuffer_destroy(&sb);
	}

	/* file_name: 255 bytes pass, 256 do not; a NUL anywhere does not. */
	memset(buf, 'f', sizeof(buf));
	memset(&r, 0, sizeof(r));
	r.kind = XT_START;
	r.field = -1;
	r.file_name = buf;
	r.file_name_len = XMSG_MAX_FILENAME;
	assert_int_equal(xraw_rc(&r), 0);
	r.file_name_len = XMSG_MAX_FILENAME + 1;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.file_name_len = 500;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.file_name = "a\0b";
	r.file_name_len = 3;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.file_name = "\0";
	r.file_name_len = 1;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.file_name = "ab\0";
	r.file_name_len = 3;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	/* offset against total_size */
	memset(&r, 0, sizeof(r));
	r.kind = XT_START;
	r.field = -1;
	r.total = 100;
	r.offset = 100;
	assert_int_equal(xraw_rc(&r), 0);
	r.offset = 101;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.total = 1;
	r.offset = UINT64_MAX;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.total = UINT64_MAX;
	r.offset = UINT64_MAX;
	assert_int_equal(xraw_rc(&r), 0);

	/* data: 1..65536 bytes */
	memset(&r, 0, sizeof(r));
	r.kind = XT_DATA;
	r.field = -1;
	r.data_len = SIZE_MAX; /* 0 bytes */
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.data_len = XMSG_MAX_DATA + 1;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.data_len = XMSG_MAX_DATA;
	assert_int_equal(xraw_rc(&r), 0);
	r.data_len = 1;
	assert_int_equal(xraw_rc(&r), 0);

	/* error: a negative int32 code, a short message without NUL */
	static const int64_t bad_codes[] = { 0, 1, 10, INT64_MAX, (int64_t)INT32_MIN - 1, INT64_MIN };
	memset(&r, 0, sizeof(r));
	r.kind = XT_ERR;
	r.field = -1;
	for (size_t i = 0; i < sizeof(bad_codes) / sizeof(bad_codes[0]); i++) {
		r.code = bad_codes[i];
		if (r.code == 0) {
			/* 0 means "default" in struct xraw: pack it by hand */
			assert_int_equal(xdecode_raw("\x93\x05\x00\xa0", 4), ME_EPROTO);
			continue;
		}
		if (xraw_rc(&r) != ME_EPROTO)
			fail_msg("error code %" PRId64 " accepted", bad_codes[i]);
	}
	assert_int_equal(xdecode_raw("\x93\x05\xcf\xff\xff\xff\xff\xff\xff\xff\xff\xa0", 12), ME_EPROTO);
	r.code = -1;
	assert_int_equal(xraw_rc(&r), 0);
	r.code = INT32_MIN;
	assert_int_equal(xraw_rc(&r), 0);
	r.message = buf;
	r.message_len = XMSG_MAX_ERRMSG;
	assert_int_equal(xraw_rc(&r), 0);
	r.message_len = XMSG_MAX_ERRMSG + 1;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
	r.message = "oops\0";
	r.message_len = 5;
	assert_int_equal(xraw_rc(&r), ME_EPROTO);
}

/* A start whose state is malformed in one way (the rest valid). */
static void test_xmsg_start_bad_state(void **state)
{
	(void)state;
	struct gmsg_refstate rs;
	uint8_t d32[32] = { 0 };

	xrs_make(&rs);
	for (int v = 0; v < 9; v++) {
		msgpack_sbuffer sb;
		msgpack_packer pk;
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 7);
		msgpack_pack_uint64(&pk, 2);
		pk_str(&pk, "f");
		msgpack_pack_uint64(&pk, 10);
		pk_bin(&pk, d32, 32);
		msgpack_pack_uint64(&pk, 0);
		pk_bin(&pk, kp1.pk, 32);
		msgpack_pack_array(&pk, v == 0 ? 4 : v == 1 ? 6 : 5);
		pk_str(&pk, rs.repo_id.ptr);
		if (v == 2)
			msgpack_pack_int64(&pk, -5);
		else
			msgpack_pack_uint64(&pk, rs.seq);
		pk_str(&pk, v == 3 ? "HEAD" : "refs/heads/main");
		int nrefs = v == 4 ? 2 : 3;
		msgpack_pack_array(&pk, (uint32_t)nrefs);
		for (int i = 0; i < nrefs; i++) {
			int k = v == 4 ? 1 - i : i; /* unsorted */
			msgpack_pack_array(&pk, v == 5 && i == 1 ? 3 : 2);
			pk_str(&pk, v == 6 && i == 2 ? "refs/remotes/origin/x" :
				    v == 7 && i == 0 ? "refs/heads/../../x" : refs3[k].name.ptr);
			pk_bin(&pk, refs3[k].oid, v == 8 && i == 1 ? 19 : 20);
			if (v == 5 && i == 1)
				msgpack_pack_nil(&pk);
		}
		if (v != 0)
			pk_bin(&pk, rs.sig, 64);
		if (v == 1)
			msgpack_pack_nil(&pk);
		if (xdecode_pk(&sb) != ME_EPROTO)
			fail_msg("start with bad state variant %d accepted", v);
		msgpack_sbuffer_destroy(&sb);
	}
}

/* A start whose state has more refs than allowed, and a request with 20001 haves, are refused
 * for their counts (before anything is allocated for them). */
static void test_xmsg_counts(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	uint8_t d32[32] = { 0 }, oid[20] = { 0 }, sig[64] = { 0 };
	char id[ME_DID_REPO_SIZE];

	repo_id_of(&kp1, 5, id);
	for (size_t nrefs = GMSG_MAX_REFS; nrefs <= GMSG_MAX_REFS + 1; nrefs++) {
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		msgpack_pack_array(&pk, 7);
		msgpack_pack_uint64(&pk, 2);
		pk_str(&pk, "f");
		msgpack_pack_uint64(&pk, 10);
		pk_bin(&pk, d32, 32);
		msgpack_pack_uint64(&pk, 0);
		pk_bin(&pk, kp1.pk, 32);
		msgpack_pack_array(&pk, 5);
		pk_str(&pk, id);
		msgpack_pack_uint64(&pk, 1);
		pk_str(&pk, "");
		msgpack_pack_array(&pk, (uint32_t)nrefs);
		for (size_t i = 0; i < nrefs; i++) {
			char name[32];
			snprintf(name, sizeof(name), "refs/heads/b%06zu", i);
			msgpack_pack_array(&pk, 2);
			pk_str(&pk, name);
			pk_bin(&pk, oid, 20);
		}
		pk_bin(&pk, sig, 64);
		assert_true(sb.size <= XMSG_MAX_BODY);
		assert_int_equal(xdecode_pk(&sb), nrefs > GMSG_MAX_REFS ? ME_ETOOBIG : 0);
		msgpack_sbuffer_destroy(&sb);
	}
}

static void test_xmsg_truncated(void **state)
{
	(void)state;
	msgpack_sbuffer s[6];
	struct gmsg_refstate rs;
	uint8_t d32[32], have[3][20], data[300];
	char id[ME_DID_REPO_SIZE];

	xrs_make(&rs);
	repo_id_of(&kp2, 4, id);
	fill_bytes(d32, 32, 9);
	fill_bytes(&have[0][0], sizeof(have), 7);
	fill_bytes(data, sizeof(data), 3);
	for (int i = 0; i < 6; i++)
		msgpack_sbuffer_init(&s[i]);
	assert_int_equal(xmsg_encode_request(&s[0], id, (const uint8_t(*)[20])have, 3, d32, 77), 0);
	assert_int_equal(xmsg_encode_start(&s[1], "name.bundle", 5000, d32, 10, kp1.pk, &rs), 0);
	assert_int_equal(xmsg_encode_data(&s[2], data, sizeof(data)), 0);
	assert_int_equal(xmsg_encode_done(&s[3], d32), 0);
	assert_int_equal(xmsg_encode_error(&s[4], ME_EBUSY, "busy"), 0);
	assert_int_equal(xmsg_encode_request(&s[5], id, NULL, 0, NULL, 0), 0);
	for (int i = 0; i < 6; i++) {
		size_t n;
		const uint8_t *b = xbody(&s[i], &n);
		assert_int_equal(xdecode_raw(b, n), 0);
		for (size_t k = 0; k < n; k++) {
			/* a private copy of exactly k bytes, so ASan sees any read past it */
			uint8_t *c = malloc(k ? k : 1);
			assert_non_null(c);
			memcpy(c, b, k);
			if (xdecode_raw(c, k) != ME_EPROTO)
				fail_msg("message %d truncated to %zu of %zu bytes accepted", i, k, n);
			free(c);
		}
		/* One byte too many. */
		uint8_t *c = malloc(n + 1);
		assert_non_null(c);
		memcpy(c, b, n);
		c[n] = 0xc0;
		assert_int_equal(xdecode_raw(c, n + 1), ME_EPROTO);
		free(c);
		msgpack_sbuffer_destroy(&s[i]);
	}
	assert_int_equal(xdecode_raw(NULL, 0), ME_EPROTO);
	assert_int_equal(xdecode_raw(NULL, 5), ME_EPROTO);
	assert_int_equal(xmsg_decode((const uint8_t *)"\x92\x04", 2, NULL), ME_EINVAL);
}

static void test_xmsg_huge(void **state)
{
	(void)state;
	uint8_t *big = calloc(1, XMSG_MAX_BODY + 16);
	assert_non_null(big);

	/* Over the body limit: refused for its size whatever it holds. */
	big[0] = 0x92;
	big[1] = 0x03;
	big[2] = 0xc6;
	assert_int_equal(xdecode_raw(big, XMSG_MAX_BODY + 1), ME_ETOOBIG);
	assert_int_equal(xdecode_raw(big, XMSG_MAX_BODY + 16), ME_ETOOBIG);
	assert_int_equal(xdecode_raw(big, SIZE_MAX), ME_ETOOBIG);
	/* A data message of exactly XMSG_MAX_BODY bytes is within the body limit but its data
	 * is over 64 KiB. */
	uint32_t n = XMSG_MAX_BODY - 7;
	big[3] = (uint8_t)(n >> 24);
	big[4] = (uint8_t)(n >> 16);
	big[5] = (uint8_t)(n >> 8);
	big[6] = (uint8_t)n;
	assert_int_equal(xdecode_raw(big, XMSG_MAX_BODY), ME_EPROTO);

	/* Headers claiming 2^32 - 1 elements or bytes, at the top and inside each message. */
	static const uint8_t hdrs[][5] = {
		{ 0xdd, 0xff, 0xff, 0xff, 0xff }, /* array32 */
		{ 0xdf, 0xff, 0xff, 0xff, 0xff }, /* map32 */
		{ 0xc6, 0xff, 0xff, 0xff, 0xff }, /* bin32 */
		{ 0xdb, 0xff, 0xff, 0xff, 0xff }, /* str32 */
		{ 0xdd, 0x00, 0x00, 0x4e, 0x21 }, /* array32 of 20001 */
		{ 0xdc, 0xff, 0xff, 0x00, 0x00 }, /* array16 of 65535 */
	};
	char id[ME_DID_REPO_SIZE];
	repo_id_of(&kp1, 5, id);
	size_t idlen = strlen(id);
	for (size_t h = 0; h < sizeof(hdrs) / sizeof(hdrs[0]); h++) {
		size_t hl = hdrs[h][0] == 0xdc ? 3 : 5;
		uint8_t b[256];
		size_t k = 0;
		int rc;

		/* alone, and followed by some bytes */
		rc = xdecode_raw(hdrs[h], hl);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		memcpy(b, hdrs[h], hl);
		memset(b + hl, 0xc0, 100);
		rc = xdecode_raw(b, hl + 100);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		/* as the haves of a request */
		b[k++] = 0x94;
		b[k++] = 0x01;
		b[k++] = 0xd9;
		b[k++] = (uint8_t)idlen;
		memcpy(b + k, id, idlen);
		k += idlen;
		memcpy(b + k, hdrs[h], hl);
		k += hl;
		b[k++] = 0xc0;
		rc = xdecode_raw(b, k);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		/* as the data of a data message, the code of an error, the top-level array */
		uint8_t d[16] = { 0x92, 0x03 };
		memcpy(d + 2, hdrs[h], hl);
		rc = xdecode_raw(d, 2 + hl);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		d[0] = 0x93;
		d[1] = 0x05;
		memcpy(d + 2, hdrs[h], hl);
		d[2 + hl] = 0xa0;
		rc = xdecode_raw(d, 3 + hl);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		memcpy(d, hdrs[h], hl);
		d[hl] = 0x01;
		rc = xdecode_raw(d, hl + 1);
		assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
	}
	/* A request whose haves array is 16 levels of nesting deep, and one of 65536 nils (more
	 * objects than any valid message has). */
	{
		size_t k = 0;
		uint8_t *b = big;
		b[k++] = 0x94;
		b[k++] = 0x01;
		b[k++] = 0xd9;
		b[k++] = (uint8_t)idlen;
		memcpy(b + k, id, idlen);
		k += idlen;
		for (int i = 0; i < 20; i++)
			b[k++] = 0x91;
		b[k++] = 0xc0;
		b[k++] = 0xc0;
		assert_int_equal(xdecode_raw(b, k), ME_ETOOBIG);
		k = 4 + idlen;
		b[k++] = 0xdd;
		b[k++] = 0x00;
		b[k++] = 0x01;
		b[k++] = 0x00;
		b[k++] = 0x00;
		memset(b + k, 0xc0, 65536);
		k += 65536;
		b[k++] = 0xc0;
		assert_int_equal(xdecode_raw(b, k), ME_ETOOBIG);
	}
	free(big);
}

/* 100 000 random mutations of valid messages of every type: whatever the decoder makes of
 * them, it does not crash, read outside the buffer, leak (ASan) or return anything but 0,
 * ME_EPROTO or ME_ETOOBIG; what it accepts re-encodes. */
static void test_xmsg_mutations(void **state)
{
	(void)state;
	msgpack_sbuffer s[6];
	struct gmsg_refstate rs;
	uint8_t d32[32], have[4][20], data[200];
	char id[ME_DID_REPO_SIZE];
	int ok = 0, proto = 0, toobig = 0;

	xrs_make(&rs);
	repo_id_of(&kp2, 4, id);
	fill_bytes(d32, 32, 9);
	fill_bytes(&have[0][0], sizeof(have), 7);
	fill_bytes(data, sizeof(data), 3);
	for (int i = 0; i < 6; i++)
		msgpack_sbuffer_init(&s[i]);
	assert_int_equal(xmsg_encode_request(&s[0], id, (const uint8_t(*)[20])have, 4, d32, 77), 0);
	assert_int_equal(xmsg_encode_start(&s[1], "name.bundle", 5000, d32, 10, kp1.pk, &rs), 0);
	assert_int_equal(xmsg_encode_data(&s[2], data, sizeof(data)), 0);
	assert_int_equal(xmsg_encode_done(&s[3], d32), 0);
	assert_int_equal(xmsg_encode_error(&s[4], ME_EBUSY, "busy"), 0);
	assert_int_equal(xmsg_encode_request(&s[5], id, NULL, 0, NULL, 0), 0);
	for (int i = 0; i < 100000; i++) {
		size_t n;
		const uint8_t *b = xbody(&s[i % 6], &n);
		uint8_t *c = malloc(n + 8);
		assert_non_null(c);
		memcpy(c, b, n);
		int muts = 1 + (int)(rnd() % 4);
		for (int k = 0; k < muts; k++) {
			uint64_t r = rnd();
			size_t at = (size_t)(r % n);
			switch ((r >> 32) % 4) {
			case 0: c[at] = (uint8_t)(r >> 40); break;           /* any byte */
			case 1: c[at] ^= (uint8_t)(1u << ((r >> 40) % 8)); break; /* one bit */
			case 2: c[at] = (uint8_t)(c[at] + 1); break;         /* off by one */
			case 3: {                                            /* msgpack header */
				static const uint8_t hv[] = { 0xc0, 0x90, 0x9f, 0xdc, 0xdd, 0xc4,
					0xc6, 0xa0, 0xbf, 0xd9, 0xcf, 0xff, 0x00, 0x7f };
				c[at] = hv[(r >> 40) % sizeof(hv)];
				break;
			}
			}
		}
		size_t len = n;
		uint64_t r = rnd();
		if (r % 5 == 0)
			len = (size_t)((r >> 8) % n);
		else if (r % 5 == 1)
			len = n + (size_t)((r >> 8) % 8); /* trailing bytes (uninitialised: copy) */
		if (len > n)
			memset(c + n, (int)(r >> 16), len - n);
		struct xmsg m;
		int rc = xmsg_decode(c, len, &m);
		if (rc == 0) {
			ok++;
			/* What is accepted is well formed: it encodes again. */
			msgpack_sbuffer re;
			msgpack_sbuffer_init(&re);
			switch (m.type) {
			case XMSG_REQUEST: {
				char rid[ME_DID_REPO_SIZE];
				assert_true(m.repo_id.len < sizeof(rid));
				memcpy(rid, m.repo_id.ptr, m.repo_id.len);
				rid[m.repo_id.len] = '\0';
				assert_int_equal(xmsg_encode_request(&re, rid,
					(const uint8_t(*)[20])m.haves, m.nhaves,
					m.has_resume ? m.resume_digest : NULL, m.resume_offset), 0);
				break;
			}
			case XMSG_START: {
				char fn[XMSG_MAX_FILENAME + 1];
				memcpy(fn, m.file_name.ptr, m.file_name.len);
				fn[m.file_name.len] = '\0';
				assert_true(m.offset <= m.total_size);
				assert_int_equal(xmsg_encode_start_parts(&re, fn, m.total_size,
					m.digest, m.offset, m.creator_pk, &m.refstate, &m.parts), 0);
				break;
			}
			case XMSG_DATA:
				assert_true(m.len >= 1 && m.len <= XMSG_MAX_DATA);
				assert_true(m.data >= c && m.data + m.len <= c + len);
				assert_int_equal(xmsg_encode_data(&re, m.data, m.len), 0);
				break;
			case XMSG_DONE:
				assert_int_equal(xmsg_encode_done(&re, m.digest), 0);
				break;
			case XMSG_ERROR:
				assert_true(m.code < 0 && m.code >= INT32_MIN);
				assert_true(m.message.len <= XMSG_MAX_ERRMSG);
				break;
			default:
				fail_msg("decoded type %u", m.type);
			}
			msgpack_sbuffer_destroy(&re);
			xmsg_free(&m);
		} else {
			proto += rc == ME_EPROTO;
			toobig += rc == ME_ETOOBIG;
			if (rc != ME_EPROTO && rc != ME_ETOOBIG)
				fail_msg("mutation %d: rc %d", i, rc);
			assert_null(m.haves);
			assert_null(m.refstate.refs);
		}
		free(c);
	}
	for (int i = 0; i < 6; i++)
		msgpack_sbuffer_destroy(&s[i]);
	print_message("mutations: %d decoded, %d EPROTO, %d ETOOBIG\n", ok, proto, toobig);
	assert_true(ok > 0 && proto > 0);
}

/* ------------------------------------------------------------------------------------------ */
/* tree control messages (IHAVE / GRAFT / PRUNE)                                              */

static void fill_ids(uint8_t (*ids)[GMSG_ID_LEN], size_t n)
{
	for (size_t i = 0; i < n; i++)
		for (size_t k = 0; k < GMSG_ID_LEN; k++)
			ids[i][k] = (uint8_t)(i * 31 + k);
}

static void test_ctl_roundtrip(void **state)
{
	(void)state;
	static uint8_t ids[GMSG_CTL_MAX_IDS][GMSG_ID_LEN];
	static struct gmsg_ctl c;
	const size_t counts[] = { 0, 1, 2, 15, 16, 17, 255, 256 };

	fill_ids(ids, GMSG_CTL_MAX_IDS);
	for (unsigned kind = GMSG_IHAVE; kind <= GMSG_PRUNE; kind++) {
		for (size_t ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++) {
			size_t n = counts[ci];
			msgpack_sbuffer sb;
			msgpack_sbuffer_init(&sb);
			int rc = gmsg_ctl_encode(kind, (const uint8_t(*)[GMSG_ID_LEN])ids, n, &sb);
			int valid = kind == GMSG_IHAVE ? n >= 1 : kind == GMSG_GRAFT ? 1 : n == 0;
			if (!valid) {
				assert_int_equal(rc, ME_EINVAL);
				assert_int_equal(sb.size, 0);
				msgpack_sbuffer_destroy(&sb);
				continue;
			}
			assert_int_equal(rc, 0);
			/* canonical: the size is fixed by the count */
			assert_int_equal(sb.size, 2 + (n <= 15 ? 1 : 3) + n * (2 + GMSG_ID_LEN));
			assert_true(sb.size <= GMSG_CTL_MAX_BODY);
			assert_true(gmsg_is_ctl((const uint8_t *)sb.data, sb.size));
			/* msgpack-c reads the same thing */
			msgpack_unpacked u;
			msgpack_unpacked_init(&u);
			size_t off = 0;
			assert_int_equal(msgpack_unpack_next(&u, sb.data, sb.size, &off),
					 MSGPACK_UNPACK_SUCCESS);
			assert_int_equal(off, sb.size);
			assert_int_equal(u.data.type, MSGPACK_OBJECT_ARRAY);
			assert_int_equal(u.data.via.array.size, 2);
			assert_int_equal(u.data.via.array.ptr[0].via.u64, kind);
			assert_int_equal(u.data.via.array.ptr[1].via.array.size, n);
			msgpack_unpacked_destroy(&u);
			assert_int_equal(gmsg_ctl_decode((const uint8_t *)sb.data, sb.size, &c), 0);
			assert_int_equal(c.kind, kind);
			assert_int_equal(c.nids, n);
			assert_memory_equal(c.ids, ids, n * GMSG_ID_LEN + (n == 0));
			msgpack_sbuffer_destroy(&sb);
		}
	}
	/* An envelope is not a control message and the other way round. */
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	assert_int_equal(gmsg_envelope_encode(&kp1, 1, 1, 1, "x", 1, &sb), 0);
	assert_false(gmsg_is_ctl((const uint8_t *)sb.data, sb.size));
	assert_int_equal(gmsg_ctl_decode((const uint8_t *)sb.data, sb.size, &c), ME_EPROTO);
	msgpack_sbuffer_clear(&sb);
	assert_int_equal(gmsg_ctl_encode(GMSG_PRUNE, NULL, 0, &sb), 0);
	struct gmsg_envelope e;
	assert_int_equal(gmsg_envelope_decode((const uint8_t *)sb.data, sb.size, &e), ME_EPROTO);
	msgpack_sbuffer_destroy(&sb);
}

static void test_ctl_encoder_refusals(void **state)
{
	(void)state;
	static uint8_t ids[GMSG_CTL_MAX_IDS + 1][GMSG_ID_LEN];
	msgpack_sbuffer sb;

	msgpack_sbuffer_init(&sb);
	assert_int_equal(gmsg_ctl_encode(0, NULL, 0, &sb), ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(4, NULL, 0, &sb), ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(GMSG_IHAVE, NULL, 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(GMSG_IHAVE, (const uint8_t(*)[GMSG_ID_LEN])ids,
					 GMSG_CTL_MAX_IDS + 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(GMSG_GRAFT, (const uint8_t(*)[GMSG_ID_LEN])ids,
					 GMSG_CTL_MAX_IDS + 1, &sb), ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(GMSG_PRUNE, (const uint8_t(*)[GMSG_ID_LEN])ids, 1, &sb),
			 ME_EINVAL);
	assert_int_equal(gmsg_ctl_encode(GMSG_PRUNE, NULL, 0, NULL), ME_EINVAL);
	assert_int_equal(sb.size, 0);
	msgpack_sbuffer_destroy(&sb);
}

static void test_ctl_hostile(void **state)
{
	(void)state;
	static struct gmsg_ctl c;
	static uint8_t buf[GMSG_CTL_MAX_BODY + 64];
	uint8_t id[GMSG_ID_LEN];
	memset(id, 0xab, sizeof(id));

	/* Hand-made bodies and what they must give. */
	static const struct {
		const char *b;
		size_t len;
		int rc;
	} cases[] = {
		{ "", 0, ME_EPROTO },
		{ "\x92", 1, ME_EPROTO },
		{ "\x92\x03", 2, ME_EPROTO },
		{ "\x92\x03\x90", 3, 0 },                 /* PRUNE */
		{ "\x92\x02\x90", 3, 0 },                 /* GRAFT without ids */
		{ "\x92\x01\x90", 3, ME_EPROTO },         /* IHAVE without ids */
		{ "\x92\x00\x90", 3, ME_EPROTO },         /* kind 0 */
		{ "\x92\x04\x90", 3, ME_EPROTO },         /* kind 4 */
		{ "\x92\xcc\x03\x90", 4, ME_EPROTO },     /* kind not a fixint */
		{ "\x92\x03\x90\x00", 4, ME_EPROTO },     /* trailing byte */
		{ "\x93\x03\x90\x00", 4, ME_EPROTO },     /* three elements */
		{ "\x92\x03\xdc\x00\x00", 5, ME_EPROTO }, /* array16 for 0: not the shortest */
		{ "\x92\x03\xc0", 3, ME_EPROTO },         /* nil instead of the array */
		{ "\x92\x02\x91\xc4\x20", 5, ME_EPROTO }, /* id cut short */
		{ "\x92\x02\xdc\x01\x01", 5, ME_ETOOBIG }, /* 257 ids announced */
		{ "\x92\x02\xdc\xff\xff", 5, ME_ETOOBIG },
		{ "\x92\x02\xdd\x00\x00\x00\x01", 7, ME_EPROTO }, /* array32 */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = gmsg_ctl_decode((const uint8_t *)cases[i].b, cases[i].len, &c);
		if (rc != cases[i].rc)
			fail_msg("case %zu: %d, want %d", i, rc, cases[i].rc);
	}
	assert_int_equal(gmsg_ctl_decode(NULL, 0, &c), ME_EPROTO);
	assert_int_equal(gmsg_ctl_decode(buf, sizeof(buf), &c), ME_EPROTO); /* 0x00 first */

	/* One id with a wrong binary header: str, bin8 of 31 and 33 bytes, bin16. */
	const uint8_t heads[][2] = { { 0xd9, 0x20 }, { 0xc4, 0x1f }, { 0xc4, 0x21 }, { 0xc5, 0x00 } };
	for (size_t h = 0; h < sizeof(heads) / sizeof(heads[0]); h++) {
		size_t n = 0;
		buf[n++] = 0x92;
		buf[n++] = GMSG_IHAVE;
		buf[n++] = 0x91;
		buf[n++] = heads[h][0];
		buf[n++] = heads[h][1];
		memcpy(buf + n, id, GMSG_ID_LEN);
		n += GMSG_ID_LEN;
		assert_int_equal(gmsg_ctl_decode(buf, n, &c), ME_EPROTO);
	}
	/* Over the size limit whatever it says. */
	memset(buf, 0, sizeof(buf));
	buf[0] = 0x92;
	assert_int_equal(gmsg_ctl_decode(buf, GMSG_CTL_MAX_BODY + 1, &c), ME_ETOOBIG);
	/* A count that disagrees with the bytes: 2 announced, 1 present, and the other way. */
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	uint8_t two[2][GMSG_ID_LEN] = { { 1 }, { 2 } };
	assert_int_equal(gmsg_ctl_encode(GMSG_IHAVE, (const uint8_t(*)[GMSG_ID_LEN])two, 2, &sb),
			 0);
	memcpy(buf, sb.data, sb.size);
	buf[2] = 0x93;
	assert_int_equal(gmsg_ctl_decode(buf, sb.size, &c), ME_EPROTO);
	buf[2] = 0x91;
	assert_int_equal(gmsg_ctl_decode(buf, sb.size, &c), ME_EPROTO);
	/* Every truncation and every single-bit flip: an error or a message of the same shape. */
	for (size_t cut = 0; cut < sb.size; cut++)
		assert_int_not_equal(gmsg_ctl_decode((const uint8_t *)sb.data, cut, &c), 0);
	for (size_t i = 0; i < sb.size * 8; i++) {
		memcpy(buf, sb.data, sb.size);
		buf[i / 8] ^= (uint8_t)(1u << (i % 8));
		int rc = gmsg_ctl_decode(buf, sb.size, &c);
		assert_true(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG);
		if (rc == 0)
			assert_true(c.nids <= GMSG_CTL_MAX_IDS && c.kind >= 1 && c.kind <= 3);
	}
	msgpack_sbuffer_destroy(&sb);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_envelope_roundtrip_kat),
		cmocka_unit_test(test_envelope_sizes_and_types),
		cmocka_unit_test(test_envelope_ttl_rewrite),
		cmocka_unit_test(test_envelope_bitflips),
		cmocka_unit_test(test_envelope_truncated),
		cmocka_unit_test(test_envelope_noncanonical),
		cmocka_unit_test(test_envelope_wrong_types),
		cmocka_unit_test(test_envelope_unknown_type_and_empty_payload),
		cmocka_unit_test(test_check_time),
		cmocka_unit_test(test_node_ann_roundtrip),
		cmocka_unit_test(test_node_ann_forged_did),
		cmocka_unit_test(test_addr_parse),
		cmocka_unit_test(test_node_ann_hostile),
		cmocka_unit_test(test_refnames),
		cmocka_unit_test(test_refstate_sign_verify),
		cmocka_unit_test(test_repo_ann_roundtrip),
		cmocka_unit_test(test_repo_ann_limits),
		cmocka_unit_test(test_repo_ann_hostile),
		cmocka_unit_test(test_random_garbage),
		cmocka_unit_test(test_xmsg_request_roundtrip),
		cmocka_unit_test(test_xmsg_start_roundtrip),
		cmocka_unit_test(test_xmsg_start_parts),
		cmocka_unit_test(test_xmsg_data_done_error_roundtrip),
		cmocka_unit_test(test_xmsg_canonical),
		cmocka_unit_test(test_xmsg_encoder_refusals),
		cmocka_unit_test(test_xmsg_hostile_shapes),
		cmocka_unit_test(test_xmsg_hostile_values),
		cmocka_unit_test(test_xmsg_start_bad_state),
		cmocka_unit_test(test_xmsg_counts),
		cmocka_unit_test(test_xmsg_truncated),
		cmocka_unit_test(test_xmsg_huge),
		cmocka_unit_test(test_xmsg_mutations),
		cmocka_unit_test(test_ctl_roundtrip),
		cmocka_unit_test(test_ctl_encoder_refusals),
		cmocka_unit_test(test_ctl_hostile),
	};
	return cmocka_run_group_tests(tests, group_setup, NULL);
}
