#include "common/gossip_msg.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/sha3.h"

/* Objects in the largest accepted payloads (every value and container counts). */
#define NODE_ANN_OBJECTS (6 + GMSG_MAX_ADDRS)
#define REPO_OBJECTS 11 /* repo array, 4 fields, refstate array, 4 fields, refs array */
#define REPO_ANN_OBJECTS (2 + REPO_OBJECTS * GMSG_MAX_REPOS + 3 * GMSG_MAX_ANN_REFS)
#define ENVELOPE_OBJECTS 7

/* ---- strings ---- */

bool gmsg_str_eq(struct gmsg_str a, struct gmsg_str b)
{
	return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

int gmsg_str_cmp(struct gmsg_str a, struct gmsg_str b)
{
	size_t n = a.len < b.len ? a.len : b.len;
	int c = n > 0 ? memcmp(a.ptr, b.ptr, n) : 0;

	if (c != 0)
		return c < 0 ? -1 : 1;
	return a.len < b.len ? -1 : a.len > b.len ? 1 : 0;
}

int gmsg_ref_cmp(const void *a, const void *b)
{
	return gmsg_str_cmp(((const struct gmsg_ref *)a)->name, ((const struct gmsg_ref *)b)->name);
}

int gmsg_repo_cmp(const void *a, const void *b)
{
	return gmsg_str_cmp(((const struct gmsg_repo *)a)->id, ((const struct gmsg_repo *)b)->id);
}

/* Encoders take caller strings: a NULL pointer with a length is malformed. */
static bool str_bad(struct gmsg_str s)
{
	return s.len > 0 && s.ptr == NULL;
}

static bool has_nul(struct gmsg_str s)
{
	return s.len > 0 && memchr(s.ptr, '\0', s.len) != NULL;
}

/* Well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF) without C0,
 * DEL or C1 control characters. */
static bool text_valid(struct gmsg_str s)
{
	const uint8_t *p = (const uint8_t *)s.ptr;
	size_t i = 0;

	while (i < s.len) {
		uint8_t c = p[i];
		uint32_t cp;
		size_t n;

		if (c < 0x80) {
			if (c < 0x20 || c == 0x7f)
				return false;
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf)
			n = 1, cp = c & 0x1f;
		else if (c >= 0xe0 && c <= 0xef)
			n = 2, cp = c & 0x0f;
		else if (c >= 0xf0 && c <= 0xf4)
			n = 3, cp = c & 0x07;
		else
			return false;
		if (s.len - i - 1 < n)
			return false;
		for (size_t k = 1; k <= n; k++) {
			if ((p[i + k] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (p[i + k] & 0x3f);
		}
		if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
		    (cp >= 0xd800 && cp <= 0xdfff) || (cp >= 0x80 && cp <= 0x9f))
			return false;
		i += n + 1;
	}
	return true;
}

/* Text fields: 0, ME_ETOOBIG or ME_EPROTO. */
static int check_text(struct gmsg_str s, size_t max)
{
	if (s.len > max)
		return ME_ETOOBIG;
	return !str_bad(s) && text_valid(s) ? 0 : ME_EPROTO;
}

static int check_name(struct gmsg_str s)
{
	if (s.len > GMSG_MAX_NAME)
		return ME_ETOOBIG;
	if (s.len == 0 || str_bad(s) || has_nul(s) || memchr(s.ptr, '/', s.len) != NULL ||
	    gmsg_str_eq(s, gmsg_str(".")) || gmsg_str_eq(s, gmsg_str("..")))
		return ME_EPROTO;
	return 0;
}

static int check_desc(struct gmsg_str s)
{
	if (s.len > GMSG_MAX_DESC)
		return ME_ETOOBIG;
	return str_bad(s) || has_nul(s) ? ME_EPROTO : 0;
}

static int check_repo_id(struct gmsg_str s)
{
	char buf[ME_DID_REPO_SIZE];

	if (s.len >= sizeof(buf) || str_bad(s))
		return ME_EPROTO;
	if (s.len > 0)
		memcpy(buf, s.ptr, s.len);
	buf[s.len] = '\0';
	if (has_nul(s) || !me_did_repo_valid(buf))
		return ME_EPROTO;
	return 0;
}

/* ---- ref names ---- */

static bool starts_with(const char *s, size_t len, const char *prefix)
{
	size_t n = strlen(prefix);

	return len >= n && memcmp(s, prefix, n) == 0;
}

/* git check-ref-format rules for a full name, plus the refs/heads/ | refs/tags/ restriction. */
bool gmsg_refname_valid(const char *s, size_t len)
{
	size_t comp = 0; /* start of the current component */

	if (s == NULL || len == 0 || len > GMSG_MAX_REFNAME)
		return false;
	if (!starts_with(s, len, "refs/heads/") && !starts_with(s, len, "refs/tags/"))
		return false;
	for (size_t i = 0; i <= len; i++) {
		if (i == len || s[i] == '/') {
			size_t clen = i - comp;
			/* No empty component ("//", trailing "/"), none starting with "." and none
			 * ending with ".lock". */
			if (clen == 0 || s[comp] == '.')
				return false;
			if (clen >= 5 && memcmp(s + i - 5, ".lock", 5) == 0)
				return false;
			comp = i + 1;
			continue;
		}
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c == 0x7f || strchr(" ~^:?*[\\", c) != NULL)
			return false;
		if (c == '.' && i + 1 < len && s[i + 1] == '.')
			return false;
		if (c == '@' && i + 1 < len && s[i + 1] == '{')
			return false;
	}
	return s[len - 1] != '.';
}

/* ---- addresses ---- */

static int parse_port(const char *s, size_t len, uint16_t *port)
{
	uint32_t v = 0;

	if (len == 0 || len > 5 || s[0] == '0')
		return ME_EPROTO;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return ME_EPROTO;
		v = v * 10 + (uint32_t)(s[i] - '0');
	}
	if (v == 0 || v > 65535)
		return ME_EPROTO;
	*port = (uint16_t)v;
	return 0;
}

int gmsg_addr_parse(const char *s, size_t len, struct sockaddr_storage *ss, socklen_t *sslen)
{
	char host[GMSG_MAX_ADDR_LEN + 1];
	const char *colon;
	size_t hlen;
	uint16_t port;

	if (len > GMSG_MAX_ADDR_LEN)
		return ME_ETOOBIG;
	if (s == NULL || len == 0 || memchr(s, '\0', len) != NULL)
		return ME_EPROTO;
	if (s[0] == '[') {
		const char *rb = memchr(s, ']', len);
		if (rb == NULL || (size_t)(rb - s) + 1 >= len || rb[1] != ':')
			return ME_EPROTO;
		hlen = (size_t)(rb - s) - 1;
		memcpy(host, s + 1, hlen);
		colon = rb + 1;
	} else {
		colon = memchr(s, ':', len);
		if (colon == NULL)
			return ME_EPROTO;
		hlen = (size_t)(colon - s);
		memcpy(host, s, hlen);
	}
	host[hlen] = '\0';
	if (parse_port(colon + 1, len - (size_t)(colon + 1 - s), &port) < 0)
		return ME_EPROTO;

	if (s[0] == '[') {
		struct sockaddr_in6 sin6;
		memset(&sin6, 0, sizeof(sin6));
		if (inet_pton(AF_INET6, host, &sin6.sin6_addr) != 1)
			return ME_EPROTO;
		const struct in6_addr *a = &sin6.sin6_addr;
		if (IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_MULTICAST(a) ||
		    IN6_IS_ADDR_V4MAPPED(a) || IN6_IS_ADDR_V4COMPAT(a))
			return ME_EPROTO;
		sin6.sin6_family = AF_INET6;
		sin6.sin6_port = htons(port);
		if (ss != NULL) {
			memset(ss, 0, sizeof(*ss));
			memcpy(ss, &sin6, sizeof(sin6));
		}
		if (sslen != NULL)
			*sslen = sizeof(sin6);
	} else {
		struct sockaddr_in sin;
		memset(&sin, 0, sizeof(sin));
		if (inet_pton(AF_INET, host, &sin.sin_addr) != 1)
			return ME_EPROTO;
		uint32_t a = ntohl(sin.sin_addr.s_addr);
		if ((a >> 24) == 0 || (a >> 28) == 0xe || a == 0xffffffffu)
			return ME_EPROTO;
		sin.sin_family = AF_INET;
		sin.sin_port = htons(port);
		if (ss != NULL) {
			memset(ss, 0, sizeof(*ss));
			memcpy(ss, &sin, sizeof(sin));
		}
		if (sslen != NULL)
			*sslen = sizeof(sin);
	}
	return 0;
}

/* ---- msgpack object access (decoders) ---- */

/* The objects of one decode: strings and bins must point into [buf, buf + len). */
struct src {
	const uint8_t *buf;
	size_t len;
};

static const msgpack_object *arr(const msgpack_object *o, uint32_t n)
{
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != n)
		return NULL;
	return o->via.array.ptr;
}

static int borrow(const struct src *src, const char *p, uint32_t n, struct gmsg_str *out)
{
	const uint8_t *q = (const uint8_t *)p;

	if (n == 0) {
		out->ptr = "";
		out->len = 0;
		return 0;
	}
	/* msgpack_unpack() references the input; anything else would dangle after the zone. */
	if (q < src->buf || q > src->buf + src->len || n > (size_t)(src->buf + src->len - q))
		return ME_EINTERNAL;
	out->ptr = p;
	out->len = n;
	return 0;
}

static int get_str(const struct src *src, const msgpack_object *o, struct gmsg_str *out)
{
	if (o->type != MSGPACK_OBJECT_STR)
		return ME_EPROTO;
	return borrow(src, o->via.str.ptr, o->via.str.size, out);
}

static int get_bin(const struct src *src, const msgpack_object *o, size_t want,
		   const uint8_t **out)
{
	struct gmsg_str s;
	int rc;

	if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != want)
		return ME_EPROTO;
	if ((rc = borrow(src, o->via.bin.ptr, o->via.bin.size, &s)) < 0)
		return rc;
	*out = (const uint8_t *)s.ptr;
	return 0;
}

static int get_uint(const msgpack_object *o, uint64_t max, uint64_t *out)
{
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > max)
		return ME_EPROTO;
	*out = o->via.u64;
	return 0;
}

/* ---- msgpack packing (encoders): every call's result is kept ---- */

static int pk_str(msgpack_packer *pk, struct gmsg_str s)
{
	int rc = msgpack_pack_str(pk, s.len);

	if (s.len > 0)
		rc |= msgpack_pack_str_body(pk, s.ptr, s.len);
	return rc;
}

static int pk_bin(msgpack_packer *pk, const void *p, size_t n)
{
	int rc = msgpack_pack_bin(pk, n);

	if (n > 0)
		rc |= msgpack_pack_bin_body(pk, p, n);
	return rc;
}

/* Restores out to start after a failed encode; maps a failed write to ME_ENOMEM. */
static int finish(msgpack_sbuffer *out, size_t start, int rc, int wrc)
{
	if (rc == 0 && wrc != 0)
		rc = ME_ENOMEM;
	if (rc < 0)
		out->size = start;
	return rc;
}

/* Encoders refuse what the decoders refuse: ME_EPROTO becomes ME_EINVAL. */
static int enc_err(int rc)
{
	return rc == ME_EPROTO ? ME_EINVAL : rc;
}

/* ---- envelope ---- */

static size_t put_u64(uint8_t *p, uint64_t v)
{
	p[0] = 0xcf;
	for (int i = 0; i < 8; i++)
		p[1 + i] = (uint8_t)(v >> (56 - 8 * i));
	return 9;
}

static size_t put_type(uint8_t *p, unsigned type)
{
	if (type < 0x80) {
		p[0] = (uint8_t)type;
		return 1;
	}
	p[0] = 0xcc;
	p[1] = (uint8_t)type;
	return 2;
}

static size_t put_bin_hdr(uint8_t *p, size_t n)
{
	if (n <= 0xff) {
		p[0] = 0xc4;
		p[1] = (uint8_t)n;
		return 2;
	}
	if (n <= 0xffff) {
		p[0] = 0xc5;
		p[1] = (uint8_t)(n >> 8);
		p[2] = (uint8_t)n;
		return 3;
	}
	p[0] = 0xc6;
	p[1] = (uint8_t)(n >> 24);
	p[2] = (uint8_t)(n >> 16);
	p[3] = (uint8_t)(n >> 8);
	p[4] = (uint8_t)n;
	return 5;
}

/* Wire bytes before the payload: 0x96 | bin32 pk | cf ts | ttl | type | bin header. */
#define HEAD_MAX (1 + 2 + ME_PK_LEN + 9 + 1 + 2 + 5)
static size_t put_head(uint8_t *p, const uint8_t *pk, uint64_t ts, unsigned ttl, unsigned type,
		       size_t plen)
{
	size_t n = 0;

	p[n++] = 0x96;
	n += put_bin_hdr(p + n, ME_PK_LEN);
	memcpy(p + n, pk, ME_PK_LEN);
	n += ME_PK_LEN;
	n += put_u64(p + n, ts);
	p[n++] = (uint8_t)ttl;
	n += put_type(p + n, type);
	n += put_bin_hdr(p + n, plen);
	return n;
}

/* Signed bytes: 0x95 | fixstr tag | bin32 pk | cf ts | type | bin payload, in a new buffer. */
static int signed_bytes(const uint8_t *pk, uint64_t ts, unsigned type, const uint8_t *payload,
			size_t plen, uint8_t **out, size_t *outlen)
{
	const size_t tlen = sizeof(GMSG_ENVELOPE_TAG) - 1;
	uint8_t head[1 + 1 + sizeof(GMSG_ENVELOPE_TAG) + 2 + ME_PK_LEN + 9 + 2 + 5];
	size_t n = 0;

	_Static_assert(sizeof(GMSG_ENVELOPE_TAG) - 1 < 32, "tag must be a fixstr");
	head[n++] = 0x95;
	head[n++] = (uint8_t)(0xa0 | tlen);
	memcpy(head + n, GMSG_ENVELOPE_TAG, tlen);
	n += tlen;
	n += put_bin_hdr(head + n, ME_PK_LEN);
	memcpy(head + n, pk, ME_PK_LEN);
	n += ME_PK_LEN;
	n += put_u64(head + n, ts);
	n += put_type(head + n, type);
	n += put_bin_hdr(head + n, plen);
	uint8_t *b = malloc(n + plen);
	if (b == NULL)
		return ME_ENOMEM;
	memcpy(b, head, n);
	if (plen > 0)
		memcpy(b + n, payload, plen);
	*out = b;
	*outlen = n + plen;
	return 0;
}

int gmsg_envelope_encode(const struct me_keypair *kp, uint64_t ts_ms, unsigned ttl, unsigned type,
			 const void *payload, size_t len, msgpack_sbuffer *out)
{
	uint8_t head[HEAD_MAX], sig[2 + ME_SIG_LEN], *sb;
	size_t hlen, sblen, start;
	int rc, wrc;

	if (kp == NULL || out == NULL || (payload == NULL && len > 0) ||
	    ttl > GMSG_TTL_ENC_MAX || type == 0 || type > GMSG_MAX_TYPE)
		return ME_EINVAL;
	if (len > GMSG_MAX_PAYLOAD)
		return ME_ETOOBIG;
	if ((rc = signed_bytes(kp->pk, ts_ms, type, payload, len, &sb, &sblen)) < 0)
		return rc;
	sig[0] = 0xc4;
	sig[1] = ME_SIG_LEN;
	rc = me_sign(kp, sb, sblen, sig + 2);
	free(sb);
	if (rc < 0)
		return rc;
	hlen = put_head(head, kp->pk, ts_ms, ttl, type, len);
	start = out->size;
	wrc = msgpack_sbuffer_write(out, (const char *)head, hlen);
	if (len > 0)
		wrc |= msgpack_sbuffer_write(out, payload, len);
	wrc |= msgpack_sbuffer_write(out, (const char *)sig, sizeof(sig));
	return finish(out, start, 0, wrc);
}

static int envelope_parse(const uint8_t *buf, size_t len, struct gmsg_envelope *e)
{
	const struct src src = { buf, len };
	const msgpack_object *f;
	const uint8_t *pk, *sig;
	uint8_t head[HEAD_MAX];
	msgpack_zone zone;
	msgpack_object o;
	uint64_t ts, ttl, type;
	size_t hlen;
	int rc;

	if (!msgpack_zone_init(&zone, 512))
		return ME_ENOMEM;
	rc = me_mp_unpack(buf, len, ENVELOPE_OBJECTS, &zone, &o);
	if (rc < 0)
		goto out;
	rc = ME_EPROTO;
	if ((f = arr(&o, 6)) == NULL)
		goto out;
	if (get_bin(&src, &f[0], ME_PK_LEN, &pk) < 0 || get_uint(&f[1], UINT64_MAX, &ts) < 0 ||
	    get_uint(&f[2], GMSG_TTL_ENC_MAX, &ttl) < 0 ||
	    get_uint(&f[3], GMSG_MAX_TYPE, &type) < 0 || type == 0 ||
	    get_bin(&src, &f[5], ME_SIG_LEN, &sig) < 0)
		goto out;
	if (f[4].type != MSGPACK_OBJECT_BIN)
		goto out;
	if (f[4].via.bin.size > GMSG_MAX_PAYLOAD) {
		rc = ME_ETOOBIG;
		goto out;
	}
	/* Canonical form only: the same message has exactly one encoding, and ttl sits at
	 * GMSG_TTL_OFFSET. */
	hlen = put_head(head, pk, ts, (unsigned)ttl, (unsigned)type, f[4].via.bin.size);
	if (len != hlen + f[4].via.bin.size + 2 + ME_SIG_LEN || memcmp(buf, head, hlen) != 0 ||
	    (f[4].via.bin.size > 0 && (const uint8_t *)f[4].via.bin.ptr != buf + hlen))
		goto out;
	memcpy(e->origin_pk, pk, ME_PK_LEN);
	e->ts_ms = ts;
	e->ttl = (unsigned)ttl;
	e->type = (unsigned)type;
	e->payload = buf + hlen;
	e->payload_len = f[4].via.bin.size;
	memcpy(e->sig, sig, ME_SIG_LEN);
	rc = 0;
out:
	msgpack_zone_destroy(&zone);
	return rc;
}

int gmsg_envelope_decode(const uint8_t *buf, size_t len, struct gmsg_envelope *out)
{
	struct gmsg_envelope e;
	uint8_t *sb;
	size_t sblen;
	int rc;

	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (len > GMSG_MAX_ENVELOPE)
		return ME_ETOOBIG;
	if (buf == NULL || len == 0)
		return ME_EPROTO;
	memset(&e, 0, sizeof(e));
	if ((rc = envelope_parse(buf, len, &e)) < 0)
		return rc;
	rc = signed_bytes(e.origin_pk, e.ts_ms, e.type, e.payload, e.payload_len, &sb, &sblen);
	if (rc < 0)
		return rc;
	rc = me_verify(e.origin_pk, sb, sblen, e.sig);
	if (rc == 0)
		rc = me_sha3_256_2(sb, sblen, NULL, 0, e.id);
	free(sb);
	if (rc < 0)
		return rc;
	if (me_did_key_from_pk(e.origin_pk, e.origin_did, sizeof(e.origin_did)) < 0)
		return ME_EINTERNAL;
	*out = e;
	return 0;
}

int gmsg_envelope_set_ttl(uint8_t *buf, size_t len, unsigned ttl)
{
	if (ttl > GMSG_TTL_ENC_MAX)
		return ME_EINVAL;
	if (buf == NULL || len <= GMSG_TTL_OFFSET || buf[0] != 0x96 || buf[1] != 0xc4 ||
	    buf[2] != ME_PK_LEN || buf[3 + ME_PK_LEN] != 0xcf || buf[GMSG_TTL_OFFSET] > 0x7f)
		return ME_EPROTO;
	buf[GMSG_TTL_OFFSET] = (uint8_t)ttl;
	return 0;
}

int gmsg_check_time(uint64_t ts_ms, int64_t now_ms, const char **reason)
{
	const char *why = NULL;

	if (now_ms < 0) {
		why = "local clock before 1970";
	} else if (ts_ms > (uint64_t)INT64_MAX ||
		   (int64_t)ts_ms - now_ms > GMSG_MAX_FUTURE_MS) {
		why = "timestamp too far in the future";
	} else if (now_ms - (int64_t)ts_ms > GMSG_MAX_AGE_MS) {
		why = "timestamp older than the acceptance window";
	}
	if (reason != NULL)
		*reason = why;
	if (why == NULL)
		return 0;
	return now_ms < 0 ? ME_EINVAL : ME_ETIMEDOUT;
}

/* ---- NodeAnnouncement ---- */

static int node_ann_check(const struct gmsg_node_ann *a)
{
	int rc;

	if (a->naddrs > GMSG_MAX_ADDRS)
		return ME_ETOOBIG;
	if ((rc = check_text(a->alias, GMSG_MAX_ALIAS)) < 0 ||
	    (rc = check_text(a->version, GMSG_MAX_VERSION)) < 0)
		return rc;
	if (a->node_type > GMSG_MAX_NODE_TYPE)
		return ME_EPROTO;
	for (size_t i = 0; i < a->naddrs; i++)
		if ((rc = gmsg_addr_parse(a->addrs[i].ptr, a->addrs[i].len, NULL, NULL)) < 0)
			return rc;
	return 0;
}

int gmsg_node_ann_encode(const struct gmsg_node_ann *a, msgpack_sbuffer *out)
{
	msgpack_packer pk;
	size_t start;
	int rc, wrc;

	if (a == NULL || out == NULL)
		return ME_EINVAL;
	if ((rc = node_ann_check(a)) < 0)
		return enc_err(rc);
	start = out->size;
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	wrc = msgpack_pack_array(&pk, 5);
	wrc |= pk_bin(&pk, a->pk, ME_PK_LEN);
	wrc |= pk_str(&pk, a->alias);
	wrc |= msgpack_pack_array(&pk, a->naddrs);
	for (size_t i = 0; i < a->naddrs; i++)
		wrc |= pk_str(&pk, a->addrs[i]);
	wrc |= msgpack_pack_unsigned_int(&pk, a->node_type);
	wrc |= pk_str(&pk, a->version);
	if (rc == 0 && out->size - start > GMSG_MAX_PAYLOAD)
		rc = ME_ETOOBIG;
	return finish(out, start, rc, wrc);
}

int gmsg_node_ann_decode(const uint8_t *buf, size_t len, struct gmsg_node_ann *out)
{
	const struct src src = { buf, len };
	struct gmsg_node_ann a;
	const msgpack_object *f, *ad;
	const uint8_t *pk;
	msgpack_zone zone;
	msgpack_object o;
	uint64_t nt;
	int rc;

	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (len > GMSG_MAX_PAYLOAD)
		return ME_ETOOBIG;
	if (buf == NULL || len == 0)
		return ME_EPROTO;
	if (!msgpack_zone_init(&zone, 1024))
		return ME_ENOMEM;
	memset(&a, 0, sizeof(a));
	if ((rc = me_mp_unpack(buf, len, NODE_ANN_OBJECTS, &zone, &o)) < 0)
		goto out;
	rc = ME_EPROTO;
	if ((f = arr(&o, 5)) == NULL || f[2].type != MSGPACK_OBJECT_ARRAY)
		goto out;
	if ((rc = get_bin(&src, &f[0], ME_PK_LEN, &pk)) < 0 ||
	    (rc = get_str(&src, &f[1], &a.alias)) < 0 ||
	    (rc = get_uint(&f[3], UINT64_MAX, &nt)) < 0 ||
	    (rc = get_str(&src, &f[4], &a.version)) < 0)
		goto out;
	if (nt > GMSG_MAX_NODE_TYPE) {
		rc = ME_EPROTO;
		goto out;
	}
	a.node_type = (unsigned)nt;
	memcpy(a.pk, pk, ME_PK_LEN);
	if (f[2].via.array.size > GMSG_MAX_ADDRS) {
		rc = ME_ETOOBIG;
		goto out;
	}
	a.naddrs = f[2].via.array.size;
	ad = f[2].via.array.ptr;
	for (size_t i = 0; i < a.naddrs; i++)
		if ((rc = get_str(&src, &ad[i], &a.addrs[i])) < 0)
			goto out;
	if ((rc = node_ann_check(&a)) < 0)
		goto out;
	if (me_did_key_from_pk(a.pk, a.did, sizeof(a.did)) < 0) {
		rc = ME_EINTERNAL;
		goto out;
	}
	*out = a;
	rc = 0;
out:
	msgpack_zone_destroy(&zone);
	return rc;
}

int gmsg_node_ann_from_envelope(const struct gmsg_envelope *e, struct gmsg_node_ann *out)
{
	int rc;

	if (e == NULL || out == NULL || e->type != GMSG_NODE_ANN)
		return ME_EINVAL;
	if ((rc = gmsg_node_ann_decode(e->payload, e->payload_len, out)) < 0)
		return rc;
	if (memcmp(out->pk, e->origin_pk, ME_PK_LEN) != 0) {
		memset(out, 0, sizeof(*out));
		return ME_EPERM;
	}
	return 0;
}

/* ---- ref state ---- */

static int refstate_check(const struct gmsg_refstate *rs)
{
	int rc;

	if (rs->nrefs > GMSG_MAX_REFS || rs->head.len > GMSG_MAX_REFNAME)
		return ME_ETOOBIG;
	if (rs->nrefs > 0 && rs->refs == NULL)
		return ME_EPROTO;
	if ((rc = check_repo_id(rs->repo_id)) < 0)
		return rc;
	if (rs->head.len > 0 && !gmsg_refname_valid(rs->head.ptr, rs->head.len))
		return ME_EPROTO;
	for (size_t i = 0; i < rs->nrefs; i++) {
		struct gmsg_str n = rs->refs[i].name;
		if (n.len > GMSG_MAX_REFNAME)
			return ME_ETOOBIG;
		if (!gmsg_refname_valid(n.ptr, n.len))
			return ME_EPROTO;
		if (i > 0 && gmsg_str_cmp(rs->refs[i - 1].name, n) >= 0)
			return ME_EPROTO;
	}
	return 0;
}

static int pk_refs(msgpack_packer *pk, const struct gmsg_refstate *rs)
{
	int wrc = msgpack_pack_array(pk, rs->nrefs);

	for (size_t i = 0; i < rs->nrefs; i++) {
		wrc |= msgpack_pack_array(pk, 2);
		wrc |= pk_str(pk, rs->refs[i].name);
		wrc |= pk_bin(pk, rs->refs[i].oid, ME_OID_LEN);
	}
	return wrc;
}

/* The canonical bytes a creator signs, into a fresh sbuffer (caller destroys). */
static int refstate_signed(const struct gmsg_refstate *rs, msgpack_sbuffer *sb)
{
	msgpack_packer pk;
	int wrc;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	wrc = msgpack_pack_array(&pk, 5);
	wrc |= pk_str(&pk, gmsg_str(GMSG_REFSTATE_TAG));
	wrc |= pk_str(&pk, rs->repo_id);
	wrc |= msgpack_pack_uint64(&pk, rs->seq);
	wrc |= pk_str(&pk, rs->head);
	wrc |= pk_refs(&pk, rs);
	if (wrc != 0) {
		msgpack_sbuffer_destroy(sb);
		return ME_ENOMEM;
	}
	return 0;
}

int gmsg_refstate_sign(const struct me_keypair *kp, struct gmsg_refstate *rs)
{
	msgpack_sbuffer sb;
	int rc;

	if (kp == NULL || rs == NULL)
		return ME_EINVAL;
	if ((rc = refstate_check(rs)) < 0)
		return enc_err(rc);
	if ((rc = refstate_signed(rs, &sb)) < 0)
		return rc;
	rc = me_sign(kp, sb.data, sb.size, rs->sig);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

int gmsg_refstate_verify(const struct gmsg_refstate *rs, const uint8_t creator_pk[ME_PK_LEN])
{
	msgpack_sbuffer sb;
	int rc;

	if (rs == NULL || creator_pk == NULL)
		return ME_EPERM;
	if ((rc = refstate_check(rs)) < 0)
		return rc;
	if ((rc = refstate_signed(rs, &sb)) < 0)
		return rc;
	rc = me_verify(creator_pk, sb.data, sb.size, rs->sig);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

static int pk_refstate(msgpack_packer *pk, const struct gmsg_refstate *rs)
{
	int wrc = msgpack_pack_array(pk, 5);

	wrc |= pk_str(pk, rs->repo_id);
	wrc |= msgpack_pack_uint64(pk, rs->seq);
	wrc |= pk_str(pk, rs->head);
	wrc |= pk_refs(pk, rs);
	wrc |= pk_bin(pk, rs->sig, ME_SIG_LEN);
	return wrc;
}

/* Parses the 5 fields sf of a ref state whose refs array has nrefs entries into rs, the refs
 * into refs[0..nrefs); checks its structure (not the signature). */
static int refstate_parse(const struct src *src, const msgpack_object *sf, size_t nrefs,
			  struct gmsg_refstate *rs, struct gmsg_ref *refs)
{
	const msgpack_object *ro = sf[3].via.array.ptr;
	const uint8_t *sig, *oid;
	int rc;

	if ((rc = get_str(src, &sf[0], &rs->repo_id)) < 0 ||
	    (rc = get_uint(&sf[1], UINT64_MAX, &rs->seq)) < 0 ||
	    (rc = get_str(src, &sf[2], &rs->head)) < 0 ||
	    (rc = get_bin(src, &sf[4], ME_SIG_LEN, &sig)) < 0)
		return rc;
	memcpy(rs->sig, sig, ME_SIG_LEN);
	for (size_t i = 0; i < nrefs; i++) {
		const msgpack_object *p = arr(&ro[i], 2);
		if (p == NULL)
			return ME_EPROTO;
		if ((rc = get_str(src, &p[0], &refs[i].name)) < 0 ||
		    (rc = get_bin(src, &p[1], ME_OID_LEN, &oid)) < 0)
			return rc;
		memcpy(refs[i].oid, oid, ME_OID_LEN);
	}
	rs->refs = refs;
	rs->nrefs = nrefs;
	return refstate_check(rs);
}

/* ---- RepoAnnouncement ---- */

static int repo_check(const struct gmsg_repo *r)
{
	int rc;

	if ((rc = check_repo_id(r->id)) < 0 || (rc = check_name(r->name)) < 0 ||
	    (rc = check_desc(r->description)) < 0 || (rc = refstate_check(&r->refstate)) < 0)
		return rc;
	return gmsg_str_eq(r->id, r->refstate.repo_id) ? 0 : ME_EPROTO;
}

int gmsg_repo_ann_encode(const struct gmsg_repo_ann *a, msgpack_sbuffer *out)
{
	msgpack_packer pk;
	size_t start, total = 0;
	int rc, wrc;

	if (a == NULL || out == NULL || (a->nrepos > 0 && a->repos == NULL))
		return ME_EINVAL;
	if (a->nrepos > GMSG_MAX_REPOS)
		return ME_ETOOBIG;
	for (size_t i = 0; i < a->nrepos; i++) {
		if ((rc = repo_check(&a->repos[i])) < 0)
			return enc_err(rc);
		if (i > 0 && gmsg_str_cmp(a->repos[i - 1].id, a->repos[i].id) >= 0)
			return ME_EINVAL;
		total += a->repos[i].refstate.nrefs;
	}
	if (total > GMSG_MAX_ANN_REFS)
		return ME_ETOOBIG;
	start = out->size;
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	wrc = msgpack_pack_array(&pk, 1);
	wrc |= msgpack_pack_array(&pk, a->nrepos);
	for (size_t i = 0; i < a->nrepos; i++) {
		const struct gmsg_repo *r = &a->repos[i];
		wrc |= msgpack_pack_array(&pk, 5);
		wrc |= pk_str(&pk, r->id);
		wrc |= pk_str(&pk, r->name);
		wrc |= pk_str(&pk, r->description);
		wrc |= pk_bin(&pk, r->creator_pk, ME_PK_LEN);
		wrc |= pk_refstate(&pk, &r->refstate);
	}
	rc = out->size - start > GMSG_MAX_PAYLOAD ? ME_ETOOBIG : 0;
	return finish(out, start, rc, wrc);
}

/* Shape of one repo entry: its field array, refstate field array and ref count. */
static int repo_shape(const msgpack_object *o, const msgpack_object **rf,
		      const msgpack_object **sf, size_t *nrefs)
{
	if ((*rf = arr(o, 5)) == NULL || (*sf = arr(&(*rf)[4], 5)) == NULL ||
	    (*sf)[3].type != MSGPACK_OBJECT_ARRAY)
		return ME_EPROTO;
	*nrefs = (*sf)[3].via.array.size;
	return *nrefs > GMSG_MAX_REFS ? ME_ETOOBIG : 0;
}

static int repo_parse(const struct src *src, const msgpack_object *o, struct gmsg_repo *r,
		      struct gmsg_ref *refs)
{
	const msgpack_object *rf, *sf;
	const uint8_t *pk;
	size_t nrefs;
	int rc;

	if ((rc = repo_shape(o, &rf, &sf, &nrefs)) < 0)
		return rc;
	if ((rc = get_str(src, &rf[0], &r->id)) < 0 || (rc = get_str(src, &rf[1], &r->name)) < 0 ||
	    (rc = get_str(src, &rf[2], &r->description)) < 0 ||
	    (rc = get_bin(src, &rf[3], ME_PK_LEN, &pk)) < 0)
		return rc;
	memcpy(r->creator_pk, pk, ME_PK_LEN);
	if ((rc = refstate_parse(src, sf, nrefs, &r->refstate, refs)) < 0)
		return rc;
	return repo_check(r);
}

int gmsg_repo_ann_decode(const uint8_t *buf, size_t len, struct gmsg_repo_ann *out)
{
	const struct src src = { buf, len };
	const msgpack_object *f, *ro;
	const msgpack_object *rf, *sf;
	struct gmsg_repo *repos = NULL;
	struct gmsg_ref *refs;
	msgpack_zone zone;
	msgpack_object o;
	size_t nrepos, total = 0, nrefs, off;
	int rc;

	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (len > GMSG_MAX_PAYLOAD)
		return ME_ETOOBIG;
	if (buf == NULL || len == 0)
		return ME_EPROTO;
	if (!msgpack_zone_init(&zone, 4096))
		return ME_ENOMEM;
	if ((rc = me_mp_unpack(buf, len, REPO_ANN_OBJECTS, &zone, &o)) < 0)
		goto out;
	rc = ME_EPROTO;
	if ((f = arr(&o, 1)) == NULL || f[0].type != MSGPACK_OBJECT_ARRAY)
		goto out;
	nrepos = f[0].via.array.size;
	ro = f[0].via.array.ptr;
	if (nrepos > GMSG_MAX_REPOS) {
		rc = ME_ETOOBIG;
		goto out;
	}
	/* Counts first, then one allocation: the repos, then every ref. */
	for (size_t i = 0; i < nrepos; i++) {
		if ((rc = repo_shape(&ro[i], &rf, &sf, &nrefs)) < 0)
			goto out;
		total += nrefs;
	}
	if (total > GMSG_MAX_ANN_REFS) {
		rc = ME_ETOOBIG;
		goto out;
	}
	rc = 0;
	if (nrepos == 0)
		goto out;
	off = nrepos * sizeof(*repos);
	off = (off + _Alignof(struct gmsg_ref) - 1) / _Alignof(struct gmsg_ref) *
	      _Alignof(struct gmsg_ref);
	if ((repos = calloc(1, off + total * sizeof(*refs))) == NULL) {
		rc = ME_ENOMEM;
		goto out;
	}
	refs = (struct gmsg_ref *)((char *)repos + off);
	for (size_t i = 0; i < nrepos; i++) {
		if ((rc = repo_parse(&src, &ro[i], &repos[i], refs)) < 0)
			goto out;
		if (i > 0 && gmsg_str_cmp(repos[i - 1].id, repos[i].id) >= 0) {
			rc = ME_EPROTO;
			goto out;
		}
		refs += repos[i].refstate.nrefs;
	}
	out->repos = repos;
	out->nrepos = nrepos;
	repos = NULL;
out:
	free(repos);
	msgpack_zone_destroy(&zone);
	return rc;
}

void gmsg_repo_ann_free(struct gmsg_repo_ann *a)
{
	if (a == NULL)
		return;
	free(a->repos);
	a->repos = NULL;
	a->nrepos = 0;
}

/* ---- tree control messages: a fixed canonical layout, parsed byte by byte ---- */

static bool ctl_count_ok(unsigned kind, size_t n)
{
	switch (kind) {
	case GMSG_IHAVE:
		return n >= 1 && n <= GMSG_CTL_MAX_IDS;
	case GMSG_GRAFT:
		return n <= GMSG_CTL_MAX_IDS;
	case GMSG_PRUNE:
		return n == 0;
	default:
		return false;
	}
}

bool gmsg_is_ctl(const uint8_t *body, size_t len)
{
	return body != NULL && len > 0 && body[0] == 0x92;
}

int gmsg_ctl_encode(unsigned kind, const uint8_t (*ids)[GMSG_ID_LEN], size_t nids,
		    msgpack_sbuffer *out)
{
	uint8_t hdr[5];
	size_t h = 0, start;

	if (out == NULL || !ctl_count_ok(kind, nids) || (nids > 0 && ids == NULL))
		return ME_EINVAL;
	hdr[h++] = 0x92;
	hdr[h++] = (uint8_t)kind;
	if (nids <= 15) {
		hdr[h++] = (uint8_t)(0x90 | nids);
	} else {
		hdr[h++] = 0xdc;
		hdr[h++] = (uint8_t)(nids >> 8);
		hdr[h++] = (uint8_t)nids;
	}
	start = out->size;
	if (msgpack_sbuffer_write(out, (const char *)hdr, h) != 0)
		goto nomem;
	for (size_t i = 0; i < nids; i++) {
		static const char binhdr[2] = { (char)0xc4, GMSG_ID_LEN };
		if (msgpack_sbuffer_write(out, binhdr, 2) != 0 ||
		    msgpack_sbuffer_write(out, (const char *)ids[i], GMSG_ID_LEN) != 0)
			goto nomem;
	}
	return 0;
nomem:
	out->size = start;
	return ME_ENOMEM;
}

int gmsg_ctl_decode(const uint8_t *buf, size_t len, struct gmsg_ctl *out)
{
	size_t off = 0, n;

	if (out == NULL)
		return ME_EINVAL;
	out->kind = 0;
	out->nids = 0;
	if (buf == NULL || len < 3 || buf[0] != 0x92)
		return ME_EPROTO;
	if (len > GMSG_CTL_MAX_BODY)
		return ME_ETOOBIG;
	unsigned kind = buf[1];
	off = 2;
	if ((buf[off] & 0xf0) == 0x90) {
		n = buf[off] & 0x0f;
		off += 1;
	} else if (buf[off] == 0xdc && len >= off + 3) {
		n = (size_t)buf[off + 1] << 8 | buf[off + 2];
		off += 3;
		if (n <= 15)
			return ME_EPROTO; /* not the shortest form */
	} else {
		return ME_EPROTO;
	}
	if (n > GMSG_CTL_MAX_IDS)
		return ME_ETOOBIG;
	if (!ctl_count_ok(kind, n) || len - off != n * (2 + GMSG_ID_LEN))
		return ME_EPROTO;
	for (size_t i = 0; i < n; i++, off += 2 + GMSG_ID_LEN) {
		if (buf[off] != 0xc4 || buf[off + 1] != GMSG_ID_LEN)
			return ME_EPROTO;
		memcpy(out->ids[i], buf + off + 2, GMSG_ID_LEN);
	}
	out->kind = kind;
	out->nids = n;
	return 0;
}

/* ---- transfer messages ---- */

#define XMSG_OBJECTS (8 + XMSG_MAX_HAVES + 3 * GMSG_MAX_REFS + 3 * XMSG_MAX_PARTS + 9)

static int get_int(const msgpack_object *o, int64_t min, int64_t max, int64_t *out)
{
	if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
		*out = o->via.i64;
	else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX)
		*out = (int64_t)o->via.u64;
	else
		return ME_EPROTO;
	return *out < min || *out > max ? ME_EPROTO : 0;
}

/* A short text field: no NUL, within max bytes. */
static int get_text(const struct src *src, const msgpack_object *o, size_t max,
		    struct gmsg_str *out)
{
	int rc = get_str(src, o, out);
	if (rc < 0)
		return rc;
	return out->len > max || has_nul(*out) ? ME_EPROTO : 0;
}

bool xmsg_parts_valid(const struct xmsg_parts *parts, uint64_t total_size)
{
	if (parts == NULL || parts->n == 0 || parts->n > XMSG_MAX_PARTS)
		return false;
	for (uint32_t i = 0; i < parts->n; i++)
		if (parts->v[i].offset >= total_size || parts->v[i].count == 0 ||
		    parts->v[i].count > UINT32_MAX ||
		    (i > 0 && parts->v[i].offset <= parts->v[i - 1].offset))
			return false;
	return true;
}

/* A start's parts: [[offset uint, count uint]...], see xmsg_parts_valid. */
static int parts_parse(const msgpack_object *o, struct xmsg *m)
{
	if (o->type != MSGPACK_OBJECT_ARRAY)
		return ME_EPROTO;
	if (o->via.array.size > XMSG_MAX_PARTS)
		return ME_ETOOBIG;
	m->parts.n = o->via.array.size;
	for (uint32_t i = 0; i < m->parts.n; i++) {
		const msgpack_object *e = arr(&o->via.array.ptr[i], 2);
		if (e == NULL || get_uint(&e[0], UINT64_MAX, &m->parts.v[i].offset) < 0 ||
		    get_uint(&e[1], UINT32_MAX, &m->parts.v[i].count) < 0)
			return ME_EPROTO;
	}
	return xmsg_parts_valid(&m->parts, m->total_size) ? 0 : ME_EPROTO;
}

static int xmsg_parse(const struct src *src, const msgpack_object *o, struct xmsg *m)
{
	const msgpack_object *f;
	const uint8_t *b;
	uint64_t t;
	int rc;

	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 2 ||
	    get_uint(&o->via.array.ptr[0], XMSG_ERROR, &t) < 0 || t < XMSG_REQUEST)
		return ME_EPROTO;
	m->type = (unsigned)t;
	switch (m->type) {
	case XMSG_REQUEST: {
		if ((f = arr(o, 4)) == NULL || (rc = get_str(src, &f[1], &m->repo_id)) < 0 ||
		    (rc = check_repo_id(m->repo_id)) < 0 || f[2].type != MSGPACK_OBJECT_ARRAY)
			return ME_EPROTO;
		size_t n = f[2].via.array.size;
		if (n > XMSG_MAX_HAVES)
			return ME_ETOOBIG;
		if (n > 0 && (m->haves = malloc(n * ME_OID_LEN)) == NULL)
			return ME_ENOMEM;
		for (size_t i = 0; i < n; i++) {
			if ((rc = get_bin(src, &f[2].via.array.ptr[i], ME_OID_LEN, &b)) < 0)
				return rc;
			memcpy(m->haves[i], b, ME_OID_LEN);
		}
		m->nhaves = n;
		if (f[3].type == MSGPACK_OBJECT_NIL)
			return 0;
		const msgpack_object *r = arr(&f[3], 2);
		if (r == NULL || (rc = get_bin(src, &r[0], XMSG_DIGEST_LEN, &b)) < 0 ||
		    (rc = get_uint(&r[1], UINT64_MAX, &m->resume_offset)) < 0)
			return ME_EPROTO;
		memcpy(m->resume_digest, b, XMSG_DIGEST_LEN);
		m->has_resume = 1;
		return 0;
	}
	case XMSG_START: {
		const msgpack_object *sf;
		const uint8_t *pk;
		if (((f = arr(o, 7)) == NULL && (f = arr(o, 8)) == NULL) ||
		    (sf = arr(&f[6], 5)) == NULL || sf[3].type != MSGPACK_OBJECT_ARRAY)
			return ME_EPROTO;
		size_t nrefs = sf[3].via.array.size;
		if (nrefs > GMSG_MAX_REFS)
			return ME_ETOOBIG;
		if ((rc = get_text(src, &f[1], XMSG_MAX_FILENAME, &m->file_name)) < 0 ||
		    (rc = get_uint(&f[2], UINT64_MAX, &m->total_size)) < 0 ||
		    (rc = get_bin(src, &f[3], XMSG_DIGEST_LEN, &b)) < 0)
			return ME_EPROTO;
		memcpy(m->digest, b, XMSG_DIGEST_LEN);
		if ((rc = get_uint(&f[4], m->total_size, &m->offset)) < 0 ||
		    (rc = get_bin(src, &f[5], ME_PK_LEN, &pk)) < 0)
			return ME_EPROTO;
		memcpy(m->creator_pk, pk, ME_PK_LEN);
		if (o->via.array.size == 8 && (rc = parts_parse(&f[7], m)) < 0)
			return rc;
		struct gmsg_ref *refs = calloc(nrefs ? nrefs : 1, sizeof(*refs));
		if (refs == NULL)
			return ME_ENOMEM;
		m->refstate.refs = refs;
		return refstate_parse(src, sf, nrefs, &m->refstate, refs);
	}
	case XMSG_DATA:
		if ((f = arr(o, 2)) == NULL || f[1].type != MSGPACK_OBJECT_BIN ||
		    f[1].via.bin.size == 0 || f[1].via.bin.size > XMSG_MAX_DATA)
			return ME_EPROTO;
		if ((rc = get_bin(src, &f[1], f[1].via.bin.size, &b)) < 0)
			return rc;
		m->data = b;
		m->len = f[1].via.bin.size;
		return 0;
	case XMSG_DONE:
		if ((f = arr(o, 2)) == NULL || (rc = get_bin(src, &f[1], XMSG_DIGEST_LEN, &b)) < 0)
			return ME_EPROTO;
		memcpy(m->digest, b, XMSG_DIGEST_LEN);
		return 0;
	case XMSG_ERROR:
		if ((f = arr(o, 3)) == NULL || get_int(&f[1], INT32_MIN, -1, &m->code) < 0 ||
		    get_text(src, &f[2], XMSG_MAX_ERRMSG, &m->message) < 0)
			return ME_EPROTO;
		return 0;
	}
	return ME_EPROTO;
}

int xmsg_decode(const uint8_t *buf, size_t len, struct xmsg *out)
{
	const struct src src = { buf, len };
	msgpack_zone zone;
	msgpack_object o;
	int rc;

	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (len > XMSG_MAX_BODY)
		return ME_ETOOBIG;
	if (buf == NULL || len == 0)
		return ME_EPROTO;
	if (!msgpack_zone_init(&zone, 2048))
		return ME_ENOMEM;
	rc = me_mp_unpack(buf, len, XMSG_OBJECTS, &zone, &o);
	if (rc == 0)
		rc = xmsg_parse(&src, &o, out);
	msgpack_zone_destroy(&zone);
	if (rc < 0)
		xmsg_free(out);
	return rc;
}

void xmsg_free(struct xmsg *m)
{
	if (m == NULL)
		return;
	free(m->haves);
	free(m->refstate.refs);
	memset(m, 0, sizeof(*m));
}

/* Wraps the packing of one body into a frame appended to out. */
struct xframe {
	msgpack_sbuffer *out;
	msgpack_packer pk;
	size_t start;
};

static void xframe_begin(struct xframe *xf, msgpack_sbuffer *out, unsigned type, uint32_t n)
{
	xf->out = out;
	xf->start = out->size;
	me_frame_begin(out);
	msgpack_packer_init(&xf->pk, out, msgpack_sbuffer_write);
	msgpack_pack_array(&xf->pk, n);
	msgpack_pack_unsigned_int(&xf->pk, type);
}

static int xframe_end(struct xframe *xf, int wrc)
{
	int rc = wrc != 0 ? ME_ENOMEM : me_frame_end(xf->out, xf->start, XMSG_MAX_BODY);
	if (rc < 0)
		xf->out->size = xf->start;
	return rc == ME_ETOOBIG ? ME_EINVAL : rc;
}

int xmsg_encode_request(msgpack_sbuffer *out, const char *repo_id,
			const uint8_t (*haves)[ME_OID_LEN], size_t nhaves,
			const uint8_t *resume_digest, uint64_t resume_offset)
{
	struct xframe xf;
	int wrc;

	if (out == NULL || repo_id == NULL || check_repo_id(gmsg_str(repo_id)) < 0 ||
	    nhaves > XMSG_MAX_HAVES || (nhaves > 0 && haves == NULL))
		return ME_EINVAL;
	xframe_begin(&xf, out, XMSG_REQUEST, 4);
	wrc = pk_str(&xf.pk, gmsg_str(repo_id));
	wrc |= msgpack_pack_array(&xf.pk, nhaves);
	for (size_t i = 0; i < nhaves; i++)
		wrc |= pk_bin(&xf.pk, haves[i], ME_OID_LEN);
	if (resume_digest == NULL) {
		wrc |= msgpack_pack_nil(&xf.pk);
	} else {
		wrc |= msgpack_pack_array(&xf.pk, 2);
		wrc |= pk_bin(&xf.pk, resume_digest, XMSG_DIGEST_LEN);
		wrc |= msgpack_pack_uint64(&xf.pk, resume_offset);
	}
	return xframe_end(&xf, wrc);
}

int xmsg_encode_start_parts(msgpack_sbuffer *out, const char *file_name, uint64_t total_size,
			    const uint8_t digest[XMSG_DIGEST_LEN], uint64_t offset,
			    const uint8_t creator_pk[ME_PK_LEN], const struct gmsg_refstate *rs,
			    const struct xmsg_parts *parts)
{
	struct xframe xf;
	struct gmsg_str fn = gmsg_str(file_name);
	bool with = parts != NULL && parts->n > 0;
	int wrc;

	if (out == NULL || file_name == NULL || fn.len > XMSG_MAX_FILENAME || digest == NULL ||
	    creator_pk == NULL || rs == NULL || offset > total_size || refstate_check(rs) < 0 ||
	    (with && !xmsg_parts_valid(parts, total_size)))
		return ME_EINVAL;
	xframe_begin(&xf, out, XMSG_START, with ? 8 : 7);
	wrc = pk_str(&xf.pk, fn);
	wrc |= msgpack_pack_uint64(&xf.pk, total_size);
	wrc |= pk_bin(&xf.pk, digest, XMSG_DIGEST_LEN);
	wrc |= msgpack_pack_uint64(&xf.pk, offset);
	wrc |= pk_bin(&xf.pk, creator_pk, ME_PK_LEN);
	wrc |= pk_refstate(&xf.pk, rs);
	if (with) {
		wrc |= msgpack_pack_array(&xf.pk, parts->n);
		for (uint32_t i = 0; i < parts->n; i++) {
			wrc |= msgpack_pack_array(&xf.pk, 2);
			wrc |= msgpack_pack_uint64(&xf.pk, parts->v[i].offset);
			wrc |= msgpack_pack_uint64(&xf.pk, parts->v[i].count);
		}
	}
	return xframe_end(&xf, wrc);
}

int xmsg_encode_start(msgpack_sbuffer *out, const char *file_name, uint64_t total_size,
		      const uint8_t digest[XMSG_DIGEST_LEN], uint64_t offset,
		      const uint8_t creator_pk[ME_PK_LEN], const struct gmsg_refstate *rs)
{
	return xmsg_encode_start_parts(out, file_name, total_size, digest, offset, creator_pk, rs,
				       NULL);
}

int xmsg_encode_data(msgpack_sbuffer *out, const void *data, size_t len)
{
	struct xframe xf;

	if (out == NULL || data == NULL || len == 0 || len > XMSG_MAX_DATA)
		return ME_EINVAL;
	xframe_begin(&xf, out, XMSG_DATA, 2);
	return xframe_end(&xf, pk_bin(&xf.pk, data, len));
}

int xmsg_encode_done(msgpack_sbuffer *out, const uint8_t digest[XMSG_DIGEST_LEN])
{
	struct xframe xf;

	if (out == NULL || digest == NULL)
		return ME_EINVAL;
	xframe_begin(&xf, out, XMSG_DONE, 2);
	return xframe_end(&xf, pk_bin(&xf.pk, digest, XMSG_DIGEST_LEN));
}

int xmsg_encode_error(msgpack_sbuffer *out, int code, const char *message)
{
	struct xframe xf;
	char msg[XMSG_MAX_ERRMSG + 1];
	int wrc;

	if (out == NULL || code >= 0 || message == NULL)
		return ME_EINVAL;
	snprintf(msg, sizeof(msg), "%s", message); /* longer messages are cut */
	xframe_begin(&xf, out, XMSG_ERROR, 3);
	wrc = msgpack_pack_int64(&xf.pk, code);
	wrc |= pk_str(&xf.pk, gmsg_str(msg));
	return xframe_end(&xf, wrc);
}
