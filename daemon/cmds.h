/* The command table: one handler per protocol command, indexed by enum me_cmd. */
#ifndef ME_CMDS_H
#define ME_CMDS_H

#include <stddef.h>

#include <msgpack.h>

#include "common/proto.h"
#include "daemon/node.h"

struct cmd_ctx {
	struct node *node;
	char *err;        /* message for an error reply */
	size_t errsz;
	size_t nconns;    /* live control connections, for status */
	void *conn;       /* the control connection (for ctl_defer, daemon/control.h) */
	uint32_t req_id;
	int cmd;          /* enum me_cmd */
	int defer_error;  /* why ctl_defer failed */
};

/* A handler's return value when it took a pending request with ctl_defer: the reply follows
 * later through ctl_finish. */
#define CMD_DEFERRED 1

/* Packs the result into out and returns 0, returns a ME_E* code with ctx->err set, or returns
 * CMD_DEFERRED. */
typedef int (*cmd_fn)(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out);

struct cmd_handler {
	cmd_fn fn;
	int needs_key; /* refused with ME_ENOKEY until `mectl auth init` */
};

extern const struct cmd_handler cmd_table[ME_CMD__COUNT];

/* Runs a validated request. */
int cmd_dispatch(struct cmd_ctx *ctx, const struct me_request *req, msgpack_packer *out);

#endif
