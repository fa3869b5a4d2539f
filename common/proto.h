/* The control protocol, shared by megaengined and mectl (documented in
 * docs/control-protocol.md; that document is the contract, keep the two in step).
 *
 * Request  {"v": 1, "id": u32, "cmd": "repo.add", "args": {...}}
 * Reply    {"v": 1, "id": u32, "kind": "result",   "result": any}
 *          {"v": 1, "id": u32, "kind": "error",    "error": {"code": i, "name": s, "message": s}}
 *          {"v": 1, "id": u32, "kind": "progress", "progress": {...}}   (zero or more, then a final
 *                                                                         result or error)
 * Replies to different requests of one connection may interleave (match them by id).
 */
#ifndef ME_PROTO_H
#define ME_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#define ME_PROTO_VERSION 1
/* Oldest request version the daemon still answers. */
#define ME_PROTO_VERSION_MIN 1

/* Commands travel by name; the numbers index the tables. Append new ones just before
 * ME_CMD__COUNT, never renumber. */
enum me_cmd {
	ME_CMD_AUTH_INIT,
	ME_CMD_AUTH_SHOW,
	ME_CMD_NODE_ID,
	ME_CMD_NODE_STATUS,
	ME_CMD_REPO_ADD,
	ME_CMD_REPO_LIST,
	ME_CMD_REPO_SHOW,
	ME_CMD_REPO_REMOVE,
	ME_CMD_NODE_LIST,
	ME_CMD_PEER_LIST,
	ME_CMD_REPO_SYNC,
	ME_CMD_REPO_CLONE,
	ME_CMD_REPO_PULL,
	ME_CMD_REPO_TRACK,
	ME_CMD__COUNT
};

enum me_argtype { ME_ARG_STR, ME_ARG_INT, ME_ARG_BOOL };

struct me_argspec {
	const char *name;
	enum me_argtype type;
	bool required;
	size_t maxlen; /* strings: longest accepted value in bytes */
};

#define ME_CMDF_WRITE 0x1 /* changes state */

#define ME_MAX_ARGS 4

struct me_cmdinfo {
	const char *name; /* "repo.add" */
	unsigned flags;
	struct me_argspec args[ME_MAX_ARGS]; /* terminated by name == NULL */
};

extern const struct me_cmdinfo me_cmds[ME_CMD__COUNT];

/* Looks a command up by its wire name; -1 when unknown. */
int me_cmd_lookup(const char *name, size_t len);

struct me_request {
	uint32_t id;
	uint32_t version;
	int cmd;                    /* enum me_cmd */
	const msgpack_object *args; /* a map (possibly empty); never NULL after decode */
};

/* Decodes and validates a request object: version window, id, known command, args against the
 * command's spec (types, required, string lengths, no NUL bytes, no unknown keys). On error the
 * id is still filled when it could be read and *why says what was wrong. */
int me_request_decode(const msgpack_object *o, struct me_request *req, const char **why);

/* Packs a request frame into sb (frame header included). args_packer fills the args map. */
int me_request_pack(msgpack_sbuffer *sb, uint32_t id, int cmd,
		    void (*args_packer)(msgpack_packer *pk, void *ud), void *ud);

/* Packs the envelope of a reply frame: result or progress bodies are raw msgpack bytes. */
int me_reply_pack_result(msgpack_sbuffer *sb, uint32_t id, const char *kind, const void *body,
			 size_t len);
int me_reply_pack_error(msgpack_sbuffer *sb, uint32_t id, int code, const char *message);

#endif
