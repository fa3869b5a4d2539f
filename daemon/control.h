/* The control plane: the Unix-domain control socket served on the main loop. Peers are checked
 * by their credentials (root, the daemon's own uid, or members of the configured group); every
 * request is framed, bounded and validated before it reaches the command table. */
#ifndef ME_CONTROL_H
#define ME_CONTROL_H

#include <stdint.h>

#include <msgpack.h>
#include <uv.h>

#include "daemon/node.h"

#define CONTROL_MAX_CONNS 1024
#define CONTROL_MAX_PENDING_WRITE (8u << 20) /* a client that does not read is dropped */
/* Read buffers and unsent replies of all connections together; beyond it the connection
 * adding more is dropped. */
#define CONTROL_MAX_BUFFERED (64u << 20)
#define CONTROL_MAX_DEFERRED 16 /* requests awaiting their reply, per connection */
#define CONTROL_PROGRESS_MIN_MS 100 /* at most 10 progress frames a second per request */

struct control;
struct cmd_ctx;

/* Serves cfg->socket_path, or listen_fd when >= 0 (socket activation). */
int control_init(struct control **out, uv_loop_t *loop, struct node *node, int listen_fd,
		 char *err, size_t errsz);
/* Closes the listener and every connection; memory is released from the close callbacks, so
 * run the loop once more afterwards. Removes the socket file it created. NULL-safe. */
void control_free(struct control *c);
size_t control_nconns(const struct control *c);

/* ---- deferred replies ----
 * A handler that cannot answer at once takes a pending request with ctl_defer and returns
 * CMD_DEFERRED (daemon/cmds.h); later it sends progress frames with ctl_progress and exactly one
 * final reply with ctl_finish, which releases the pending request. ctl_finish may be called
 * before the handler returns.
 *
 * When the client goes away first (or the control plane is freed), cancel(ud) is called once,
 * from the loop and never from inside ctl_progress/ctl_finish; the pending request is released
 * right after it and must not be used again (cancel must drop every reference to it, e.g. by
 * cancelling the sync waiter that would call ctl_finish). No frame is then written.
 * control_free cancels everything still pending synchronously: call it before freeing the
 * planes those requests wait on (sync_free). */
struct ctl_pending;
typedef void (*ctl_cancel_fn)(void *ud);
/* Packs the result (one msgpack object) of a deferred request into pk; returns 0, or a ME_E*
 * code with err set to send an error instead. */
typedef int (*ctl_result_fn)(void *ud, msgpack_packer *pk, char *err, size_t errsz);

/* NULL when the connection already has CONTROL_MAX_DEFERRED requests waiting (ME_EBUSY) or on
 * allocation failure (ME_ENOMEM): the handler then returns ctx->defer_error (ctx->err set). */
struct ctl_pending *ctl_defer(struct cmd_ctx *ctx, ctl_cancel_fn cancel, void *ud);
/* Sends {"done": done, "total": total} as a progress frame. Coalesced: at most one progress
 * frame per request is queued unsent and at most one goes out per CONTROL_PROGRESS_MIN_MS;
 * values arriving meanwhile replace the held one (the newest is sent when allowed). */
void ctl_progress(struct ctl_pending *p, uint64_t done, uint64_t total);
/* The final reply: an error (rc < 0, msg NULL for the default message), else the result packed
 * by fn(ud) (fn NULL: nil). Releases p. */
void ctl_finish(struct ctl_pending *p, int rc, const char *msg, ctl_result_fn fn, void *ud);
/* Requests of all connections awaiting their reply (for status). */
size_t control_ndeferred(const struct control *c);

#endif
