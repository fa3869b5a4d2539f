#include "common/frame.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/util.h"

void me_frame_reader_init(struct me_frame_reader *r, size_t max_body)
{
	memset(r, 0, sizeof(*r));
	r->max = max_body;
}

void me_frame_reader_free(struct me_frame_reader *r)
{
	free(r->buf);
	memset(r, 0, sizeof(*r));
}

/* Validates the header of the frame starting at off, if it is complete. */
static int header_check(const struct me_frame_reader *r, size_t off)
{
	if (r->len - off < ME_FRAME_HDR)
		return 0;
	uint32_t n = me_be32(r->buf + off);
	if (n == 0)
		return ME_EPROTO;
	if (n > r->max)
		return ME_ETOOBIG;
	return 0;
}

int me_frame_reader_feed(struct me_frame_reader *r, const void *data, size_t len)
{
	/* Nothing new to check; and a fresh reader has no buffer to append to. */
	if (len == 0)
		return 0;
	/* Drop frames already handed out before growing. */
	if (r->consumed > 0) {
		memmove(r->buf, r->buf + r->consumed, r->len - r->consumed);
		r->len -= r->consumed;
		r->consumed = 0;
	}
	if (r->len == 0 && r->cap > 65536) {
		free(r->buf);
		r->buf = NULL;
		r->cap = 0;
	}
	/* Every header is checked as soon as it arrives, so what stays buffered after the caller
	 * drains is at most one partial frame (<= max + header); the caller feeds bounded chunks. */
	if (len > SIZE_MAX / 2 - r->len)
		return ME_ETOOBIG;
	if (r->len + len > r->cap) {
		size_t ncap = r->cap ? r->cap : 4096;
		while (ncap < r->len + len)
			ncap *= 2;
		uint8_t *nb = realloc(r->buf, ncap);
		if (nb == NULL)
			return ME_ENOMEM;
		r->buf = nb;
		r->cap = ncap;
	}
	memcpy(r->buf + r->len, data, len);
	r->len += len;
	for (size_t off = 0;;) {
		int rc = header_check(r, off);
		if (rc < 0)
			return rc;
		if (r->len - off < ME_FRAME_HDR)
			break;
		size_t flen = ME_FRAME_HDR + (size_t)me_be32(r->buf + off);
		if (r->len - off < flen)
			break;
		off += flen;
	}
	return 0;
}

int me_frame_reader_next(struct me_frame_reader *r, const uint8_t **body, size_t *len)
{
	size_t off = r->consumed;
	int rc = header_check(r, off);
	if (rc < 0)
		return rc;
	if (r->len - off < ME_FRAME_HDR)
		return 0;
	uint32_t n = me_be32(r->buf + off);
	if (r->len - off - ME_FRAME_HDR < n)
		return 0;
	*body = r->buf + off + ME_FRAME_HDR;
	*len = n;
	r->consumed = off + ME_FRAME_HDR + n;
	if (r->consumed == r->len) {
		r->len = 0;
		r->consumed = 0;
	}
	return 1;
}

size_t me_frame_reader_pending(const struct me_frame_reader *r)
{
	return r->len - r->consumed;
}

/* ---- bounded msgpack validation ---- */

static int need(size_t pos, size_t len, uint64_t n)
{
	return n <= len - pos ? 0 : ME_EPROTO;
}

static uint64_t rd_be(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < n; i++)
		v = v << 8 | p[i];
	return v;
}

int me_mp_check(const uint8_t *buf, size_t len, unsigned max_depth, size_t max_objects)
{
	uint64_t stack[ME_MP_MAX_DEPTH + 2];
	unsigned depth = 0;
	size_t pos = 0, objects = 0;

	if (max_depth > ME_MP_MAX_DEPTH)
		max_depth = ME_MP_MAX_DEPTH;
	stack[0] = 1;
	for (;;) {
		while (depth > 0 && stack[depth] == 0)
			depth--;
		if (stack[depth] == 0)
			break;
		stack[depth]--;
		if (pos >= len)
			return ME_EPROTO;
		if (++objects > max_objects)
			return ME_ETOOBIG;

		uint8_t t = buf[pos++];
		uint64_t skip = 0, count = 0;
		int container = 0;
		unsigned lenbytes = 0;

		if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
			continue;
		} else if (t >= 0x80 && t <= 0x8f) {
			count = 2u * (t & 0x0f), container = 1;
		} else if (t >= 0x90 && t <= 0x9f) {
			count = t & 0x0f, container = 1;
		} else if (t >= 0xa0 && t <= 0xbf) {
			skip = t & 0x1f;
		} else {
			switch (t) {
			case 0xcc: case 0xd0: skip = 1; break;
			case 0xcd: case 0xd1: skip = 2; break;
			case 0xca: case 0xce: case 0xd2: skip = 4; break;
			case 0xcb: case 0xcf: case 0xd3: skip = 8; break;
			case 0xc4: case 0xd9: lenbytes = 1; break;
			case 0xc5: case 0xda: lenbytes = 2; break;
			case 0xc6: case 0xdb: lenbytes = 4; break;
			case 0xdc: lenbytes = 2, container = 1; break;
			case 0xdd: lenbytes = 4, container = 1; break;
			case 0xde: lenbytes = 2, container = 2; break;
			case 0xdf: lenbytes = 4, container = 2; break;
			default:
				return ME_EPROTO; /* 0xc1, ext and fixext types */
			}
			if (lenbytes) {
				if (need(pos, len, lenbytes) < 0)
					return ME_EPROTO;
				uint64_t n = rd_be(buf + pos, lenbytes);
				pos += lenbytes;
				if (container)
					count = container == 2 ? 2 * n : n;
				else
					skip = n;
			}
		}
		if (container) {
			/* Every element takes at least one byte. */
			if (need(pos, len, count) < 0)
				return ME_EPROTO;
			if (count == 0)
				continue;
			if (depth + 1 > max_depth)
				return ME_ETOOBIG;
			stack[++depth] = count;
		} else {
			if (need(pos, len, skip) < 0)
				return ME_EPROTO;
			pos += (size_t)skip;
		}
	}
	return pos == len ? 0 : ME_EPROTO;
}

int me_mp_unpack(const uint8_t *buf, size_t len, size_t max_objects, msgpack_zone *zone,
		 msgpack_object *out)
{
	int rc = me_mp_check(buf, len, ME_MP_MAX_DEPTH, max_objects);
	if (rc < 0)
		return rc;
	size_t off = 0;
	msgpack_unpack_return ur = msgpack_unpack((const char *)buf, len, &off, zone, out);
	if (ur == MSGPACK_UNPACK_NOMEM_ERROR)
		return ME_ENOMEM;
	if (ur != MSGPACK_UNPACK_SUCCESS || off != len)
		return ME_EPROTO;
	return 0;
}

/* ---- frame building ---- */

void me_frame_begin(msgpack_sbuffer *sb)
{
	static const char zero[ME_FRAME_HDR];
	msgpack_sbuffer_write(sb, zero, sizeof(zero));
}

int me_frame_end(msgpack_sbuffer *sb, size_t start, size_t max_body)
{
	size_t n = sb->size - start - ME_FRAME_HDR;
	if (n > max_body || n > UINT32_MAX)
		return ME_ETOOBIG;
	uint8_t *p = (uint8_t *)sb->data + start;
	p[0] = (uint8_t)(n >> 24);
	p[1] = (uint8_t)(n >> 16);
	p[2] = (uint8_t)(n >> 8);
	p[3] = (uint8_t)n;
	return 0;
}

/* ---- object helpers ---- */

int me_mp_str_eq(const msgpack_object *o, const char *s)
{
	size_t n = strlen(s);
	return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
	       memcmp(o->via.str.ptr, s, n) == 0;
}

const msgpack_object *me_mp_get(const msgpack_object *map, const char *key)
{
	if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
		return NULL;
	for (uint32_t i = 0; i < map->via.map.size; i++)
		if (me_mp_str_eq(&map->via.map.ptr[i].key, key))
			return &map->via.map.ptr[i].val;
	return NULL;
}

int me_mp_strcpy(const msgpack_object *o, char *buf, size_t bufsz)
{
	if (o == NULL || o->type != MSGPACK_OBJECT_STR || o->via.str.size >= bufsz)
		return ME_EARG;
	if (memchr(o->via.str.ptr, '\0', o->via.str.size) != NULL)
		return ME_EARG;
	memcpy(buf, o->via.str.ptr, o->via.str.size);
	buf[o->via.str.size] = '\0';
	return 0;
}

void me_mp_pack_str(msgpack_packer *pk, const char *s)
{
	size_t n = s ? strlen(s) : 0;
	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s ? s : "", n);
}

void me_mp_pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
	me_mp_pack_str(pk, k);
	me_mp_pack_str(pk, v);
}

void me_mp_pack_kv_int(msgpack_packer *pk, const char *k, int64_t v)
{
	me_mp_pack_str(pk, k);
	msgpack_pack_int64(pk, v);
}

void me_mp_pack_kv_bool(msgpack_packer *pk, const char *k, int v)
{
	me_mp_pack_str(pk, k);
	if (v)
		msgpack_pack_true(pk);
	else
		msgpack_pack_false(pk);
}
