#include "common/proto.h"

#include <string.h>

#include "common/err.h"
#include "common/frame.h"

#define PATH_MAXLEN 4096
#define ID_MAXLEN 128
#define TEXT_MAXLEN 1024

const struct me_cmdinfo me_cmds[ME_CMD__COUNT] = {
	[ME_CMD_AUTH_INIT] = { "auth.init", ME_CMDF_WRITE, { { 0 } } },
	[ME_CMD_AUTH_SHOW] = { "auth.show", 0, { { 0 } } },
	[ME_CMD_NODE_ID] = { "node.id", 0, { { 0 } } },
	[ME_CMD_NODE_STATUS] = { "node.status", 0, { { 0 } } },
	[ME_CMD_REPO_ADD] = { "repo.add", ME_CMDF_WRITE, {
		{ "path", ME_ARG_STR, true, PATH_MAXLEN },
		{ "description", ME_ARG_STR, false, TEXT_MAXLEN },
		{ 0 } } },
	[ME_CMD_REPO_LIST] = { "repo.list", 0, { { 0 } } },
	[ME_CMD_REPO_SHOW] = { "repo.show", 0, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ 0 } } },
	[ME_CMD_REPO_REMOVE] = { "repo.remove", ME_CMDF_WRITE, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ 0 } } },
	[ME_CMD_NODE_LIST] = { "node.list", 0, { { 0 } } },
	[ME_CMD_PEER_LIST] = { "peer.list", 0, { { 0 } } },
	[ME_CMD_REPO_SYNC] = { "repo.sync", ME_CMDF_WRITE, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ 0 } } },
	[ME_CMD_REPO_CLONE] = { "repo.clone", ME_CMDF_WRITE, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ 0 } } },
	[ME_CMD_REPO_PULL] = { "repo.pull", ME_CMDF_WRITE, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ "path", ME_ARG_STR, false, PATH_MAXLEN },
		{ 0 } } },
	[ME_CMD_REPO_TRACK] = { "repo.track", ME_CMDF_WRITE, {
		{ "repo_id", ME_ARG_STR, true, ID_MAXLEN },
		{ "path", ME_ARG_STR, true, PATH_MAXLEN },
		{ "seq", ME_ARG_INT, true, 0 },
		{ 0 } } },
};

int me_cmd_lookup(const char *name, size_t len)
{
	for (int i = 0; i < ME_CMD__COUNT; i++)
		if (strlen(me_cmds[i].name) == len && memcmp(me_cmds[i].name, name, len) == 0)
			return i;
	return -1;
}

static const struct me_argspec *spec_find(const struct me_cmdinfo *ci, const msgpack_object *k)
{
	for (const struct me_argspec *a = ci->args; a->name != NULL; a++)
		if (me_mp_str_eq(k, a->name))
			return a;
	return NULL;
}

static int arg_check(const struct me_argspec *a, const msgpack_object *v, const char **why)
{
	switch (a->type) {
	case ME_ARG_STR:
		if (v->type != MSGPACK_OBJECT_STR) {
			*why = "argument must be a string";
			return ME_EARG;
		}
		if (v->via.str.size > a->maxlen) {
			*why = "argument too long";
			return ME_EARG;
		}
		if (memchr(v->via.str.ptr, '\0', v->via.str.size) != NULL) {
			*why = "argument contains a NUL byte";
			return ME_EARG;
		}
		return 0;
	case ME_ARG_INT:
		if (v->type != MSGPACK_OBJECT_POSITIVE_INTEGER &&
		    v->type != MSGPACK_OBJECT_NEGATIVE_INTEGER) {
			*why = "argument must be an integer";
			return ME_EARG;
		}
		return 0;
	case ME_ARG_BOOL:
		if (v->type != MSGPACK_OBJECT_BOOLEAN) {
			*why = "argument must be a boolean";
			return ME_EARG;
		}
		return 0;
	}
	return ME_EINTERNAL;
}

int me_request_decode(const msgpack_object *o, struct me_request *req, const char **why)
{
	static const msgpack_object empty_map = { .type = MSGPACK_OBJECT_MAP };

	memset(req, 0, sizeof(*req));
	req->cmd = -1;
	req->args = &empty_map;
	*why = NULL;
	if (o->type != MSGPACK_OBJECT_MAP) {
		*why = "request must be a map";
		return ME_EPROTO;
	}
	const msgpack_object *id = me_mp_get(o, "id");
	if (id == NULL || id->type != MSGPACK_OBJECT_POSITIVE_INTEGER || id->via.u64 > UINT32_MAX) {
		*why = "request needs \"id\": an unsigned 32-bit integer";
		return ME_EPROTO;
	}
	req->id = (uint32_t)id->via.u64;

	const msgpack_object *v = me_mp_get(o, "v");
	if (v == NULL || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
		*why = "request needs \"v\": the protocol version";
		return ME_EPROTO;
	}
	if (v->via.u64 < ME_PROTO_VERSION_MIN || v->via.u64 > ME_PROTO_VERSION) {
		*why = "unsupported protocol version (this daemon speaks 1)";
		return ME_EVERSION;
	}
	req->version = (uint32_t)v->via.u64;

	const msgpack_object *cmd = me_mp_get(o, "cmd");
	if (cmd == NULL || cmd->type != MSGPACK_OBJECT_STR) {
		*why = "request needs \"cmd\": a string";
		return ME_EPROTO;
	}
	req->cmd = me_cmd_lookup(cmd->via.str.ptr, cmd->via.str.size);
	if (req->cmd < 0) {
		*why = "unknown command";
		return ME_EUNKNOWN;
	}

	const struct me_cmdinfo *ci = &me_cmds[req->cmd];
	const msgpack_object *args = me_mp_get(o, "args");
	if (args != NULL && args->type != MSGPACK_OBJECT_NIL) {
		if (args->type != MSGPACK_OBJECT_MAP) {
			*why = "\"args\" must be a map";
			return ME_EARG;
		}
		req->args = args;
	}
	for (uint32_t i = 0; i < req->args->via.map.size; i++) {
		const msgpack_object_kv *kv = &req->args->via.map.ptr[i];
		const struct me_argspec *a = spec_find(ci, &kv->key);
		if (a == NULL) {
			*why = "unknown argument";
			return ME_EARG;
		}
		int rc = arg_check(a, &kv->val, why);
		if (rc < 0)
			return rc;
	}
	for (const struct me_argspec *a = ci->args; a->name != NULL; a++) {
		if (a->required && me_mp_get(req->args, a->name) == NULL) {
			*why = "missing required argument";
			return ME_EARG;
		}
	}
	return 0;
}

static void pack_envelope(msgpack_packer *pk, uint32_t id, const char *kind)
{
	msgpack_pack_map(pk, 4);
	me_mp_pack_str(pk, "v");
	msgpack_pack_uint32(pk, ME_PROTO_VERSION);
	me_mp_pack_str(pk, "id");
	msgpack_pack_uint32(pk, id);
	me_mp_pack_kv_str(pk, "kind", kind);
	me_mp_pack_str(pk, kind);
}

int me_request_pack(msgpack_sbuffer *sb, uint32_t id, int cmd,
		    void (*args_packer)(msgpack_packer *pk, void *ud), void *ud)
{
	msgpack_packer pk;
	size_t start = sb->size;

	if (cmd < 0 || cmd >= ME_CMD__COUNT)
		return ME_EINVAL;
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	me_frame_begin(sb);
	msgpack_pack_map(&pk, 4);
	me_mp_pack_str(&pk, "v");
	msgpack_pack_uint32(&pk, ME_PROTO_VERSION);
	me_mp_pack_str(&pk, "id");
	msgpack_pack_uint32(&pk, id);
	me_mp_pack_kv_str(&pk, "cmd", me_cmds[cmd].name);
	me_mp_pack_str(&pk, "args");
	if (args_packer != NULL)
		args_packer(&pk, ud);
	else
		msgpack_pack_map(&pk, 0);
	return me_frame_end(sb, start, ME_CTL_MAX_FRAME);
}

int me_reply_pack_result(msgpack_sbuffer *sb, uint32_t id, const char *kind, const void *body,
			 size_t len)
{
	msgpack_packer pk;
	size_t start = sb->size;

	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	me_frame_begin(sb);
	pack_envelope(&pk, id, kind);
	if (len == 0)
		msgpack_pack_nil(&pk);
	else
		msgpack_sbuffer_write(sb, body, len);
	return me_frame_end(sb, start, ME_CTL_MAX_REPLY);
}

int me_reply_pack_error(msgpack_sbuffer *sb, uint32_t id, int code, const char *message)
{
	msgpack_packer pk;
	size_t start = sb->size;

	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	me_frame_begin(sb);
	pack_envelope(&pk, id, "error");
	msgpack_pack_map(&pk, 3);
	me_mp_pack_kv_int(&pk, "code", code);
	me_mp_pack_kv_str(&pk, "name", me_errname(code));
	me_mp_pack_kv_str(&pk, "message", message ? message : me_strerror(code));
	return me_frame_end(sb, start, ME_CTL_MAX_REPLY);
}
