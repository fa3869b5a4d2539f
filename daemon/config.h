/* megaengined's configuration: command-line flags over environment over the configuration file
 * (libinih) over defaults. */
#ifndef ME_CONFIG_H
#define ME_CONFIG_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "common/ids.h"
#include "common/util.h"

#define ME_MAX_ADDRS 8
#define ME_MAX_BOOTSTRAP 16
#define ME_ALIAS_MAX 64
#define ME_DEFAULT_PORT 9000
#define ME_SOCKET_NAME "megaengined.sock"
#define ME_SUN_PATH_MAX 108
#define ME_GOSSIP_INTERVAL_MS 10000
#define ME_MAX_OUTBOUND 8
#define ME_MAX_REPO_SIZE (2ull << 30)

struct me_sockaddr {
	struct sockaddr_storage ss;
	socklen_t len;
	char text[80]; /* normalised "ip:port" / "[ip6]:port" */
};

struct me_bootstrap {
	char did[ME_DID_KEY_SIZE];
	struct me_sockaddr addr;
};

struct me_config {
	char root[PATH_MAX];
	char alias[ME_ALIAS_MAX];
	struct me_sockaddr addrs[ME_MAX_ADDRS];
	size_t naddrs;
	struct me_bootstrap boots[ME_MAX_BOOTSTRAP];
	size_t nboots;
	struct me_sockaddr announce[ME_MAX_ADDRS]; /* --announce-addr; empty: derived */
	size_t nannounce;
	unsigned gossip_interval_ms;  /* re-announce period (default 10 s) */
	unsigned max_outbound;        /* nodes dialed from announcements (default 8) */
	uint64_t max_repo_size;       /* largest bundle accepted from a peer (default 2 GiB) */
	char cert_path[PATH_MAX];
	char socket_path[ME_SUN_PATH_MAX];
	char socket_group[64];
	int log_level;
	int foreground;
	char config_path[PATH_MAX]; /* the configuration file read; "" when none */
};

enum { ME_CONFIG_OK = 0, ME_CONFIG_EXIT = 1 };

/* Fills cfg from argv, the environment and the configuration file: --config FILE, else
 * $MEGAENGINE_CONFIG, else ME_CONFIG_FILE when it exists. Returns ME_CONFIG_OK, ME_CONFIG_EXIT
 * after printing --help or --version, or a negative code with a message in err (a bad file
 * entry is reported as "FILE:LINE: ..."). Called again with the same argv on SIGHUP. */
int me_config_load(struct me_config *cfg, int argc, char **argv, char *err, size_t errsz);

/* Keys that differ between two configurations, as a comma-separated list of config key names
 * into out ("" when none). restart_only selects the keys that a running daemon cannot apply
 * (root, addr, bootstrap-node, cert-path, socket, socket-group); otherwise the others (alias,
 * announce-addr, gossip-interval, max-outbound, log-level). */
void me_config_diff(const struct me_config *a, const struct me_config *b, int restart_only,
		    char *out, size_t outsz);

/* Parses "1.2.3.4:9000" or "[::1]:9000" (numeric only). 0 or ME_EINVAL. */
int me_sockaddr_parse(const char *s, struct me_sockaddr *out);
/* Parses "did:key:...@ip:port". 0, ME_EBADID or ME_EINVAL. */
int me_bootstrap_parse(const char *s, struct me_bootstrap *out);

#endif
