/* Control socket: the bytes a local client sends on one connection, read as daemon/control.c
 * reads them: me_frame_reader (ME_CTL_MAX_FRAME), then each body as handle_request() decodes
 * it (me_mp_unpack, me_request_decode).
 *
 * Invariants: the reader hands out exactly the frames of the stream, in order, up to the first
 * bad header, and fails exactly there; a body me_mp_check() accepts is unpacked by msgpack-c;
 * a request that decodes is re-packed by me_request_pack() and decodes again to the same id,
 * command and arguments. */
#include <string.h>

#include <msgpack.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/proto.h"
#include "tests/fuzz/fuzz.h"

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void pack_args(msgpack_packer *pk, void *ud)
{
	msgpack_pack_object(pk, *(const msgpack_object *)ud);
}

static void check_request(const uint8_t *body, size_t len)
{
	msgpack_zone zone, zone2;
	msgpack_object obj, obj2;
	msgpack_sbuffer sb;
	struct me_request req, req2;
	const char *why;

	int crc = me_mp_check(body, len, ME_MP_MAX_DEPTH, ME_MP_MAX_OBJECTS);
	FUZZ_ASSERT(msgpack_zone_init(&zone, 2048));
	int rc = me_mp_unpack(body, len, ME_MP_MAX_OBJECTS, &zone, &obj);
	FUZZ_ASSERT(crc == 0 ? rc == 0 : rc == crc);
	if (rc < 0)
		goto out;

	rc = me_request_decode(&obj, &req, &why);
	if (rc < 0) {
		FUZZ_ASSERT(why != NULL);
		FUZZ_ASSERT(rc == ME_EPROTO || rc == ME_EVERSION || rc == ME_EUNKNOWN ||
			    rc == ME_EARG);
		goto out;
	}
	FUZZ_ASSERT(req.cmd >= 0 && req.cmd < ME_CMD__COUNT);
	FUZZ_ASSERT(req.version >= ME_PROTO_VERSION_MIN && req.version <= ME_PROTO_VERSION);
	FUZZ_ASSERT(req.args != NULL && req.args->type == MSGPACK_OBJECT_MAP);

	/* What the client library packs for the same request decodes to the same request. */
	msgpack_sbuffer_init(&sb);
	FUZZ_ASSERT(me_request_pack(&sb, req.id, req.cmd, pack_args, (void *)req.args) == 0);
	FUZZ_ASSERT(sb.size > ME_FRAME_HDR && be32((uint8_t *)sb.data) == sb.size - ME_FRAME_HDR);
	FUZZ_ASSERT(msgpack_zone_init(&zone2, 2048));
	FUZZ_ASSERT(me_mp_unpack((uint8_t *)sb.data + ME_FRAME_HDR, sb.size - ME_FRAME_HDR,
				 ME_MP_MAX_OBJECTS, &zone2, &obj2) == 0);
	FUZZ_ASSERT(me_request_decode(&obj2, &req2, &why) == 0);
	FUZZ_ASSERT(req2.id == req.id && req2.cmd == req.cmd && req2.version == ME_PROTO_VERSION);
	FUZZ_ASSERT(msgpack_object_equal(*req.args, *req2.args));
	msgpack_zone_destroy(&zone2);
	msgpack_sbuffer_destroy(&sb);
out:
	msgpack_zone_destroy(&zone);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct me_frame_reader rd;
	size_t off = 0; /* start of the next frame expected from the reader */
	size_t fed = 0;
	/* The socket delivers the stream in pieces; their size varies with the input's. */
	size_t chunk = 1 + size % 509;
	int err = 0;

	me_frame_reader_init(&rd, ME_CTL_MAX_FRAME);
	while (fed < size && err == 0) {
		size_t n = size - fed < chunk ? size - fed : chunk;
		int frc = me_frame_reader_feed(&rd, data + fed, n);
		int rc;

		fed += n;
		for (;;) {
			const uint8_t *body;
			size_t len;

			rc = me_frame_reader_next(&rd, &body, &len);
			if (rc <= 0)
				break;
			/* Exactly the next frame of the stream. */
			FUZZ_ASSERT(fed - off >= ME_FRAME_HDR);
			FUZZ_ASSERT(len == be32(data + off) && len > 0 && len <= ME_CTL_MAX_FRAME);
			FUZZ_ASSERT(fed - off - ME_FRAME_HDR >= len);
			FUZZ_ASSERT(memcmp(body, data + off + ME_FRAME_HDR, len) == 0);
			off += ME_FRAME_HDR + len;
			check_request(body, len);
		}
		if (rc == 0)
			rc = frc;
		FUZZ_ASSERT(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG);
		err = rc;
	}
	if (err != 0) {
		/* Fails at a header announcing 0 or more than the limit, and only there. */
		FUZZ_ASSERT(size - off >= ME_FRAME_HDR);
		uint32_t n = be32(data + off);
		FUZZ_ASSERT(err == ME_EPROTO ? n == 0 : n > ME_CTL_MAX_FRAME);
	} else {
		FUZZ_ASSERT(me_frame_reader_pending(&rd) == size - off);
		if (size - off >= ME_FRAME_HDR) {
			uint32_t n = be32(data + off);
			FUZZ_ASSERT(n > 0 && n <= ME_CTL_MAX_FRAME && size - off - ME_FRAME_HDR < n);
		}
	}
	me_frame_reader_free(&rd);
	return 0;
}
