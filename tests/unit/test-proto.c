/* Request validation against the shared command table, and reply envelopes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/proto.h"

struct pk_args {
	const char *k[3];
	const char *v[3];
};

static void pack_kv(msgpack_packer *pk, void *ud)
{
	struct pk_args *a = ud;
	size_t n = 0;
	while (n < 3 && a->k[n])
		n++;
	msgpack_pack_map(pk, n);
	for (size_t i = 0; i < n; i++)
		me_mp_pack_kv_str(pk, a->k[i], a->v[i]);
}

/* Decodes a frame produced by me_request_pack. */
static int decode_frame(msgpack_sbuffer *sb, msgpack_zone *zone, struct me_request *req,
			const char **why)
{
	msgpack_object obj;
	int rc = me_mp_unpack((const uint8_t *)sb->data + 4, sb->size - 4, 1000, zone, &obj);
	if (rc < 0)
		return rc;
	return me_request_decode(&obj, req, why);
}

static void test_roundtrip(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	msgpack_zone zone;
	struct me_request req;
	const char *why;
	struct pk_args a = { { "path", "description" }, { "/tmp/x", "d" } };

	msgpack_sbuffer_init(&sb);
	msgpack_zone_init(&zone, 1024);
	assert_int_equal(me_request_pack(&sb, 42, ME_CMD_REPO_ADD, pack_kv, &a), 0);
	assert_int_equal(decode_frame(&sb, &zone, &req, &why), 0);
	assert_int_equal(req.id, 42);
	assert_int_equal(req.cmd, ME_CMD_REPO_ADD);
	assert_true(me_mp_str_eq(me_mp_get(req.args, "path"), "/tmp/x"));
	msgpack_zone_destroy(&zone);
	msgpack_sbuffer_destroy(&sb);
}

static void test_every_command_has_a_unique_name(void **state)
{
	(void)state;
	for (int i = 0; i < ME_CMD__COUNT; i++) {
		assert_non_null(me_cmds[i].name);
		assert_int_equal(me_cmd_lookup(me_cmds[i].name, strlen(me_cmds[i].name)), i);
	}
	assert_int_equal(me_cmd_lookup("repo.nope", 9), -1);
	assert_int_equal(me_cmd_lookup("repo.ad", 7), -1);
}

/* Builds a raw request map from (key, msgpack-bytes) pairs. */
static int decode_raw(const char *bytes, size_t len, struct me_request *req, const char **why)
{
	msgpack_zone zone;
	msgpack_object obj;
	msgpack_zone_init(&zone, 1024);
	int rc = me_mp_unpack((const uint8_t *)bytes, len, 1000, &zone, &obj);
	if (rc == 0)
		rc = me_request_decode(&obj, req, why);
	msgpack_zone_destroy(&zone);
	return rc;
}

#define RAW(s, expect) do { \
	struct me_request r_; const char *w_; \
	assert_int_equal(decode_raw(s, sizeof(s) - 1, &r_, &w_), expect); \
} while (0)

static void test_hostile_requests(void **state)
{
	(void)state;
	/* Not a map. */
	RAW("\x91\x01", ME_EPROTO);
	/* No id. */
	RAW("\x82\xa1v\x01\xa3" "cmd" "\xa9repo.list", ME_EPROTO);
	/* id negative / too large. */
	RAW("\x83\xa1v\x01\xa2id\xff\xa3" "cmd" "\xa9repo.list", ME_EPROTO);
	RAW("\x83\xa1v\x01\xa2id\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xa3" "cmd" "\xa9repo.list",
	    ME_EPROTO);
	/* Version 2 and 0. */
	RAW("\x83\xa1v\x02\xa2id\x01\xa3" "cmd" "\xa9repo.list", ME_EVERSION);
	RAW("\x83\xa1v\x00\xa2id\x01\xa3" "cmd" "\xa9repo.list", ME_EVERSION);
	/* cmd of the wrong type, unknown cmd. */
	RAW("\x83\xa1v\x01\xa2id\x01\xa3" "cmd" "\x07", ME_EPROTO);
	RAW("\x83\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa9repo.lisx", ME_EUNKNOWN);
	/* Good. */
	RAW("\x83\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa9repo.list", 0);
	/* args not a map. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa9repo.list\xa4" "args" "\x90", ME_EARG);
	/* Missing required arg. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa8repo.add\xa4" "args" "\x80", ME_EARG);
	/* Wrong type for path. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa8repo.add\xa4" "args" "\x81\xa4path\x05",
	    ME_EARG);
	/* Unknown argument. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa8repo.add\xa4" "args"
	    "\x82\xa4path\xa1/\xa3" "foo" "\xa1x", ME_EARG);
	/* NUL inside a string argument. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa8repo.add\xa4" "args" "\x81\xa4path\xa3/\0x",
	    ME_EARG);
	/* nil args is the same as none. */
	RAW("\x84\xa1v\x01\xa2id\x01\xa3" "cmd" "\xa9repo.list\xa4" "args" "\xc0", 0);
}

static void test_id_survives_errors(void **state)
{
	(void)state;
	struct me_request r;
	const char *w;
	const char b[] = "\x83\xa1v\x01\xa2id\x07\xa3" "cmd" "\xa4nope";
	assert_int_equal(decode_raw(b, sizeof(b) - 1, &r, &w), ME_EUNKNOWN);
	assert_int_equal(r.id, 7);
	assert_non_null(w);
}

/* A request for cmd whose args map is given as raw msgpack bytes. */
static int decode_args(const char *cmd, const char *args, size_t alen)
{
	char buf[512];
	size_t n = 0, cl = strlen(cmd);
	struct me_request r;
	const char *w;

	static const char head[] = "\x84\xa1v\x01\xa2id\x05\xa3" "cmd";

	memcpy(buf + n, head, sizeof(head) - 1);
	n += sizeof(head) - 1;
	buf[n++] = (char)(0xa0 | cl);
	memcpy(buf + n, cmd, cl);
	n += cl;
	memcpy(buf + n, "\xa4" "args", 5);
	n += 5;
	memcpy(buf + n, args, alen);
	n += alen;
	return decode_raw(buf, n, &r, &w);
}

#define ARGS(cmd, a, expect) assert_int_equal(decode_args(cmd, a, sizeof(a) - 1), expect)
#define RID "\xa7repo_id\xa3" "did"

static void test_fetch_commands(void **state)
{
	(void)state;
	static const char *const names[] = { "repo.sync", "repo.clone", "repo.pull", "repo.track" };
	static const int cmds[] = { ME_CMD_REPO_SYNC, ME_CMD_REPO_CLONE, ME_CMD_REPO_PULL,
				    ME_CMD_REPO_TRACK };
	for (int i = 0; i < 4; i++) {
		assert_int_equal(me_cmd_lookup(names[i], strlen(names[i])), cmds[i]);
		assert_true(me_cmds[cmds[i]].flags & ME_CMDF_WRITE);
		assert_int_equal(decode_args(names[i], "\x80", 1), ME_EARG); /* repo_id missing */
		/* repo_id of the wrong type */
		assert_int_equal(decode_args(names[i], "\x81\xa7repo_id\x07", 10), ME_EARG);
	}
	ARGS("repo.sync", "\x81" RID, 0);
	ARGS("repo.sync", "\x82" RID "\xa4path\xa1/", ME_EARG); /* no path for sync */
	ARGS("repo.clone", "\x81" RID, 0);
	ARGS("repo.pull", "\x81" RID, 0);
	ARGS("repo.pull", "\x82" RID "\xa4path\xa2/x", 0);
	ARGS("repo.pull", "\x82" RID "\xa4path\xc3", ME_EARG);
	/* track: path and an integer seq are required */
	ARGS("repo.track", "\x83" RID "\xa4path\xa2/x\xa3seq\x05", 0);
	ARGS("repo.track", "\x83" RID "\xa4path\xa2/x\xa3seq\xff", 0); /* sign: the handler's */
	ARGS("repo.track", "\x82" RID "\xa4path\xa2/x", ME_EARG);
	ARGS("repo.track", "\x82" RID "\xa3seq\x05", ME_EARG);
	ARGS("repo.track", "\x83" RID "\xa4path\xa2/x\xa3seq\xa1" "5", ME_EARG);
	ARGS("repo.track", "\x83" RID "\xa4path\xa2/x\xa3seq\xcb\x3f\xf0\0\0\0\0\0\0", ME_EARG);
	ARGS("repo.track", "\x83" RID "\xa4path\xa2/x\xa3seq\xc0", ME_EARG);
}

static void test_error_reply(void **state)
{
	(void)state;
	msgpack_sbuffer sb;
	msgpack_zone zone;
	msgpack_object obj;

	msgpack_sbuffer_init(&sb);
	msgpack_zone_init(&zone, 1024);
	assert_int_equal(me_reply_pack_error(&sb, 9, ME_ENOTFOUND, "no such repo"), 0);
	assert_int_equal(me_mp_unpack((const uint8_t *)sb.data + 4, sb.size - 4, 100, &zone, &obj),
			 0);
	assert_true(me_mp_str_eq(me_mp_get(&obj, "kind"), "error"));
	const msgpack_object *e = me_mp_get(&obj, "error");
	assert_true(me_mp_str_eq(me_mp_get(e, "name"), "ENOTFOUND"));
	assert_int_equal(me_mp_get(e, "code")->via.i64, ME_ENOTFOUND);
	assert_true(me_mp_str_eq(me_mp_get(e, "message"), "no such repo"));
	msgpack_zone_destroy(&zone);
	msgpack_sbuffer_destroy(&sb);
}

static void test_errnames_are_unique(void **state)
{
	(void)state;
	for (int a = -1; a >= ME_ECANCELED; a--) {
		assert_string_not_equal(me_errname(a), "EUNKNOWNERR");
		for (int b = a - 1; b >= ME_ECANCELED; b--)
			assert_string_not_equal(me_errname(a), me_errname(b));
	}
	assert_string_equal(me_errname(-999), "EUNKNOWNERR");
	assert_string_equal(me_strerror(-999), "unknown error");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip),
		cmocka_unit_test(test_every_command_has_a_unique_name),
		cmocka_unit_test(test_hostile_requests),
		cmocka_unit_test(test_id_survives_errors),
		cmocka_unit_test(test_fetch_commands),
		cmocka_unit_test(test_error_reply),
		cmocka_unit_test(test_errnames_are_unique),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
