/* Framing shared by the control socket and peer streams:
 *     u32 big-endian body length || msgpack body
 * The length is checked against the channel's maximum before anything is allocated, a zero
 * length is a protocol error, and a body is parsed only after me_mp_check() has proven it is one
 * well-formed msgpack object within the depth and count bounds (so msgpack-c never allocates for
 * counts the bytes cannot hold). */
#ifndef ME_FRAME_H
#define ME_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#define ME_FRAME_HDR 4
#define ME_CTL_MAX_FRAME (1u << 20) /* control socket requests: 1 MiB */
#define ME_CTL_MAX_REPLY (16u << 20) /* control socket replies: 16 MiB */
#define ME_MP_MAX_DEPTH 16
#define ME_MP_MAX_OBJECTS 65536

struct me_frame_reader {
	uint8_t *buf;
	size_t len;     /* bytes buffered */
	size_t cap;
	size_t max;     /* largest body accepted */
	size_t consumed; /* bytes of buf already handed out as frames */
};

void me_frame_reader_init(struct me_frame_reader *r, size_t max_body);
void me_frame_reader_free(struct me_frame_reader *r);
/* Appends received bytes. ME_ETOOBIG / ME_EPROTO as soon as a header announces a bad length
 * (before buffering its body), ME_ENOMEM. */
int me_frame_reader_feed(struct me_frame_reader *r, const void *data, size_t len);
/* Returns 1 and the next complete body (valid until the next feed/next call), 0 when more
 * bytes are needed, or a negative code for a bad header. */
int me_frame_reader_next(struct me_frame_reader *r, const uint8_t **body, size_t *len);
/* Bytes buffered that do not yet form a complete frame. */
size_t me_frame_reader_pending(const struct me_frame_reader *r);

/* Checks that buf[0..len) holds exactly one msgpack object, nested at most max_depth deep, with
 * at most max_objects objects in all and no container count larger than the bytes left.
 * Returns 0, ME_EPROTO (malformed, trailing bytes, ext types) or ME_ETOOBIG (bounds). */
int me_mp_check(const uint8_t *buf, size_t len, unsigned max_depth, size_t max_objects);

/* Checks (with ME_MP_MAX_DEPTH and max_objects) and unpacks one body into an object living in
 * zone (caller inits/destroys the zone). */
int me_mp_unpack(const uint8_t *buf, size_t len, size_t max_objects, msgpack_zone *zone,
		 msgpack_object *out);

/* Frame building on a msgpack_sbuffer: begin reserves the header, end patches the length.
 * end returns ME_ETOOBIG when the body exceeds max_body. */
void me_frame_begin(msgpack_sbuffer *sb);
int me_frame_end(msgpack_sbuffer *sb, size_t start, size_t max_body);

/* Small msgpack_object helpers (NULL/false when absent or of another type). */
const msgpack_object *me_mp_get(const msgpack_object *map, const char *key);
int me_mp_str_eq(const msgpack_object *o, const char *s);
/* Copies a str object into buf (NUL-terminated). ME_EARG if not a string, contains a NUL byte
 * or does not fit. */
int me_mp_strcpy(const msgpack_object *o, char *buf, size_t bufsz);
void me_mp_pack_str(msgpack_packer *pk, const char *s);
void me_mp_pack_kv_str(msgpack_packer *pk, const char *k, const char *v);
void me_mp_pack_kv_int(msgpack_packer *pk, const char *k, int64_t v);
void me_mp_pack_kv_bool(msgpack_packer *pk, const char *k, int v);

#endif
