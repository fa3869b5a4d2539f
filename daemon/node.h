/* The daemon's shared state: configuration, identity and store, handed to every plane. */
#ifndef ME_NODE_H
#define ME_NODE_H

#include <stdint.h>

#include "common/keys.h"
#include "daemon/config.h"
#include "daemon/store.h"

struct net;
struct gossip;
struct sync;
struct watch;

struct node {
	const struct me_config *cfg;
	struct me_keypair kp;
	int has_key;
	struct store *store;
	int64_t start_mono_ms;
	int lock_fd;
	/* Planes, set by main once they run (NULL before the node has an identity). */
	struct net *net;
	struct gossip *gossip;
	struct sync *sync;   /* replication (daemon/sync.h) */
	struct watch *watch; /* watches the working repositories of local repos (daemon/watch.h) */
	/* Called by node_auth_init when an identity was just created, so main can start the
	 * network without a restart. */
	void (*identity_ready)(struct node *n);
};

/* Creates the data root (0700), takes its lock (one daemon per root), loads the identity if
 * there is one and opens the store. On failure err says why. */
int node_init(struct node *n, const struct me_config *cfg, char *err, size_t errsz);
void node_free(struct node *n);
/* Creates the identity if missing (auth init); *created tells which. */
int node_auth_init(struct node *n, int *created, char *err, size_t errsz);

#endif
