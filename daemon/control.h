/* The control plane: the Unix-domain control socket served on the main loop. Peers are checked
 * by their credentials (root, the daemon's own uid, or members of the configured group); every
 * request is framed, bounded and validated before it reaches the command table. */
#ifndef ME_CONTROL_H
#define ME_CONTROL_H

#include <uv.h>

#include "daemon/node.h"

#define CONTROL_MAX_CONNS 1024
#define CONTROL_MAX_PENDING_WRITE (8u << 20) /* a client that does not read is dropped */

struct control;

/* Serves cfg->socket_path, or listen_fd when >= 0 (socket activation). */
int control_init(struct control **out, uv_loop_t *loop, struct node *node, int listen_fd,
		 char *err, size_t errsz);
/* Closes the listener and every connection; memory is released from the close callbacks, so
 * run the loop once more afterwards. Removes the socket file it created. NULL-safe. */
void control_free(struct control *c);
size_t control_nconns(const struct control *c);

#endif
