/* Gossip message codec: round trips, canonical bytes, signatures (envelope and ref state), ttl
 * rewriting, forged node announcements, limits, ref names and addresses, hostile input. */
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
	};
	return cmocka_run_group_tests(tests, group_setup, NULL);
}
