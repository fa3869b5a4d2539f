/* Framing and bounded msgpack validation, with hostile input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/frame.h"

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static void test_reader_whole_and_split(void **state)
{
	(void)state;
	struct me_frame_reader r;
	uint8_t buf[4 + 3 + 4 + 1] = { 0 };
	const uint8_t *body;
	size_t len;

	put_be32(buf, 3);
	memcpy(buf + 4, "\x93\x01\x02", 3);
	put_be32(buf + 7, 1);
	buf[11] = 0xc0;
	me_frame_reader_init(&r, 16);
	/* Byte by byte: frames appear only when complete. */
	int frames = 0;
	for (size_t i = 0; i < sizeof(buf); i++) {
		assert_int_equal(me_frame_reader_feed(&r, buf + i, 1), 0);
		while (me_frame_reader_next(&r, &body, &len) == 1) {
			frames++;
			if (frames == 1) {
				assert_int_equal(len, 3);
				assert_memory_equal(body, "\x93\x01\x02", 3);
			} else {
				assert_int_equal(len, 1);
				assert_int_equal(body[0], 0xc0);
			}
		}
	}
	assert_int_equal(frames, 2);
	assert_int_equal(me_frame_reader_pending(&r), 0);
	/* Both at once. */
	assert_int_equal(me_frame_reader_feed(&r, buf, sizeof(buf)), 0);
	assert_int_equal(me_frame_reader_next(&r, &body, &len), 1);
	assert_int_equal(me_frame_reader_next(&r, &body, &len), 1);
	assert_int_equal(me_frame_reader_next(&r, &body, &len), 0);
	me_frame_reader_free(&r);
}

static void test_reader_rejects_huge_length_before_body(void **state)
{
	(void)state;
	struct me_frame_reader r;
	uint8_t hdr[4];

	me_frame_reader_init(&r, ME_CTL_MAX_FRAME);
	put_be32(hdr, 0xffffffffu); /* 4 GiB */
	assert_int_equal(me_frame_reader_feed(&r, hdr, 4), ME_ETOOBIG);
	me_frame_reader_free(&r);

	me_frame_reader_init(&r, ME_CTL_MAX_FRAME);
	put_be32(hdr, ME_CTL_MAX_FRAME + 1);
	assert_int_equal(me_frame_reader_feed(&r, hdr, 4), ME_ETOOBIG);
	me_frame_reader_free(&r);

	/* Exactly the maximum is fine (header only so far). */
	me_frame_reader_init(&r, ME_CTL_MAX_FRAME);
	put_be32(hdr, ME_CTL_MAX_FRAME);
	assert_int_equal(me_frame_reader_feed(&r, hdr, 4), 0);
	assert_true(r.cap < 65536); /* nothing allocated for the announced body */
	me_frame_reader_free(&r);

	/* A zero length is a protocol error; so is a bad header after a good frame. */
	uint8_t two[4 + 1 + 4] = { 0 };
	put_be32(two, 1);
	two[4] = 0xc0;
	put_be32(two + 5, 0);
	me_frame_reader_init(&r, 16);
	assert_int_equal(me_frame_reader_feed(&r, two, sizeof(two)), ME_EPROTO);
	me_frame_reader_free(&r);
}

static void test_reader_partial_header(void **state)
{
	(void)state;
	struct me_frame_reader r;
	const uint8_t *body;
	size_t len;
	uint8_t hdr[4];

	put_be32(hdr, 100);
	me_frame_reader_init(&r, 16);
	assert_int_equal(me_frame_reader_feed(&r, hdr, 3), 0); /* can't judge yet */
	assert_int_equal(me_frame_reader_next(&r, &body, &len), 0);
	assert_int_equal(me_frame_reader_feed(&r, hdr + 3, 1), ME_ETOOBIG);
	me_frame_reader_free(&r);
}

#define OK(b) assert_int_equal(me_mp_check((const uint8_t *)(b), sizeof(b) - 1, 16, 1000), 0)
#define BAD(b, e) assert_int_equal(me_mp_check((const uint8_t *)(b), sizeof(b) - 1, 16, 1000), e)

static void test_mp_check_valid(void **state)
{
	(void)state;
	OK("\xc0");
	OK("\x7f");
	OK("\xe0");
	OK("\x80");                      /* {} */
	OK("\x81\xa1k\xa1v");            /* {"k":"v"} */
	OK("\x92\x01\x92\x02\x03");      /* [1,[2,3]] */
	OK("\xcc\xff");
	OK("\xcd\xff\xff");
	OK("\xcb\0\0\0\0\0\0\0\0");
	OK("\xd9\x03" "abc");
	OK("\xc4\x02xy");
	OK("\xdc\x00\x02\xc0\xc0");
	OK("\xde\x00\x01\xc0\xc0");
}

static void test_mp_check_hostile(void **state)
{
	(void)state;
	BAD("", ME_EPROTO);                         /* nothing */
	BAD("\xc1", ME_EPROTO);                     /* never used */
	BAD("\xd4\x01\x00", ME_EPROTO);             /* fixext */
	BAD("\xc7\x01\x01\x00", ME_EPROTO);         /* ext8 */
	BAD("\xc0\xc0", ME_EPROTO);                 /* trailing bytes */
	BAD("\x92\x01", ME_EPROTO);                 /* truncated array */
	BAD("\xa5" "abc", ME_EPROTO);               /* truncated string */
	BAD("\xdb\xff\xff\xff\xff", ME_EPROTO);     /* 4 GiB string */
	BAD("\xdd\xff\xff\xff\xff", ME_EPROTO);     /* 4G-element array, 0 bytes */
	BAD("\xdf\x7f\xff\xff\xff\xc0", ME_EPROTO); /* 2G-pair map */
	BAD("\xcd\xff", ME_EPROTO);                 /* truncated uint16 */
	BAD("\xd9", ME_EPROTO);                     /* str8 without length */

	/* Depth: 17 nested arrays exceed 16. */
	uint8_t deep[64];
	memset(deep, 0x91, 17);
	deep[17] = 0xc0;
	assert_int_equal(me_mp_check(deep, 18, 16, 1000), ME_ETOOBIG);
	assert_int_equal(me_mp_check(deep + 1, 17, 16, 1000), 0);

	/* Object count bound. */
	uint8_t many[1 + 2 + 2000];
	many[0] = 0xdc;
	many[1] = 0x07;
	many[2] = 0xd0; /* 2000 elements */
	memset(many + 3, 0xc0, 2000);
	assert_int_equal(me_mp_check(many, sizeof(many), 16, 1000), ME_ETOOBIG);
	assert_int_equal(me_mp_check(many, sizeof(many), 16, 3000), 0);
}

/* Random bytes: the checker never crashes, and whatever it accepts msgpack-c unpacks. */
static void test_mp_random(void **state)
{
	(void)state;
	uint8_t buf[64];
	unsigned seed = 12345;
	int accepted = 0;

	for (int iter = 0; iter < 200000; iter++) {
		size_t n = 1 + (size_t)(rand_r(&seed) % sizeof(buf));
		for (size_t i = 0; i < n; i++)
			buf[i] = (uint8_t)rand_r(&seed);
		if (iter % 3 == 0)
			buf[0] = (uint8_t)(0x80 + rand_r(&seed) % 0x20); /* bias to containers */
		msgpack_zone zone;
		msgpack_object obj;
		msgpack_zone_init(&zone, 256);
		int rc = me_mp_unpack(buf, n, 1000, &zone, &obj);
		if (rc == 0)
			accepted++;
		else
			assert_true(rc == ME_EPROTO || rc == ME_ETOOBIG);
		msgpack_zone_destroy(&zone);
	}
	assert_true(accepted > 0);
}

static void test_frame_build(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	msgpack_packer pk;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	me_frame_begin(&sb);
	me_mp_pack_str(&pk, "hello");
	assert_int_equal(me_frame_end(&sb, 0, 100), 0);
	assert_int_equal(sb.size, 4 + 6);
	assert_memory_equal(sb.data, "\0\0\0\x06\xa5hello", 10);
	assert_int_equal(me_frame_end(&sb, 0, 5), ME_ETOOBIG);
	msgpack_sbuffer_destroy(&sb);
}

static void test_mp_helpers(void **state)
{
	(void)state;
	const uint8_t m[] = "\x82\xa1" "a" "\xa2" "xy" "\xa1" "b" "\xa3" "z\0z";
	msgpack_zone zone;
	msgpack_object obj;
	char buf[8];

	msgpack_zone_init(&zone, 256);
	assert_int_equal(me_mp_unpack(m, sizeof(m) - 1, 100, &zone, &obj), 0);
	assert_int_equal(me_mp_strcpy(me_mp_get(&obj, "a"), buf, sizeof(buf)), 0);
	assert_string_equal(buf, "xy");
	assert_int_equal(me_mp_strcpy(me_mp_get(&obj, "a"), buf, 2), ME_EARG); /* no room */
	assert_int_equal(me_mp_strcpy(me_mp_get(&obj, "b"), buf, sizeof(buf)), ME_EARG); /* NUL */
	assert_null(me_mp_get(&obj, "c"));
	assert_null(me_mp_get(me_mp_get(&obj, "a"), "a")); /* not a map */
	msgpack_zone_destroy(&zone);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reader_whole_and_split),
		cmocka_unit_test(test_reader_rejects_huge_length_before_body),
		cmocka_unit_test(test_reader_partial_header),
		cmocka_unit_test(test_mp_check_valid),
		cmocka_unit_test(test_mp_check_hostile),
		cmocka_unit_test(test_mp_random),
		cmocka_unit_test(test_frame_build),
		cmocka_unit_test(test_mp_helpers),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
