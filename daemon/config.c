#include "daemon/config.h"

#include <arpa/inet.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"

static const char usage_text[] =
"Usage: megaengined [OPTION]...\n"
"Run a megaengine node: a peer-to-peer git network daemon.\n"
"\n"
"  -r, --root DIR            data directory (keys, megaengine.db, mirrors);\n"
"                            default $MEGAENGINE_ROOT, else ~/.megaengine\n"
"  -a, --alias NAME          human-readable node name announced to peers\n"
"                            (default: the host name)\n"
"  -l, --addr IP:PORT        QUIC listen address; repeatable, IPv4 or [IPv6]\n"
"                            (default 0.0.0.0:9000)\n"
"  -b, --bootstrap-node DID@IP:PORT\n"
"                            peer to join the network through, e.g.\n"
"                            did:key:z6Mk...@192.0.2.1:9000; repeatable\n"
"      --announce-addr IP:PORT\n"
"                            address announced to peers instead of the listen\n"
"                            addresses (default: each --addr, with 0.0.0.0 / ::\n"
"                            replaced by this host's interface addresses);\n"
"                            repeatable\n"
"      --gossip-interval SEC re-announce this node and its repositories every\n"
"                            SEC seconds (default 10)\n"
"      --max-outbound N      connections to open to nodes learnt by gossip\n"
"                            (default 8; bootstrap nodes are always dialed)\n"
"      --cert-path DIR       where the node's TLS certificate is stored\n"
"                            (default ROOT/certs)\n"
"  -s, --socket PATH         control socket (default ROOT/megaengined.sock)\n"
"      --socket-group GROUP  group whose members may use the control socket\n"
"                            (root and the daemon's own user always may)\n"
"      --log-level LEVEL     error, warning, notice, info or debug; default\n"
"                            $MEGAENGINE_LOG, else info\n"
"  -f, --foreground          stay in the foreground (megaengined never forks;\n"
"                            accepted for compatibility)\n"
"  -h, --help                show this help and exit\n"
"  -V, --version             show the version and exit\n"
"\n"
"Precedence: command-line flag > environment variable > default.\n"
"Environment: MEGAENGINE_ROOT, MEGAENGINE_LOG.\n"
"Stop with SIGINT or SIGTERM. Control it with mectl(1).\n";

enum { OPT_CERT = 256, OPT_SOCKGROUP, OPT_LOGLEVEL, OPT_ANNOUNCE, OPT_GOSSIP_IVL, OPT_MAX_OUT };

static const struct option long_opts[] = {
	{ "root", required_argument, NULL, 'r' },
	{ "alias", required_argument, NULL, 'a' },
	{ "addr", required_argument, NULL, 'l' },
	{ "bootstrap-node", required_argument, NULL, 'b' },
	{ "cert-path", required_argument, NULL, OPT_CERT },
	{ "announce-addr", required_argument, NULL, OPT_ANNOUNCE },
	{ "gossip-interval", required_argument, NULL, OPT_GOSSIP_IVL },
	{ "max-outbound", required_argument, NULL, OPT_MAX_OUT },
	{ "socket", required_argument, NULL, 's' },
	{ "socket-group", required_argument, NULL, OPT_SOCKGROUP },
	{ "log-level", required_argument, NULL, OPT_LOGLEVEL },
	{ "foreground", no_argument, NULL, 'f' },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

int me_sockaddr_parse(const char *s, struct me_sockaddr *out)
{
	char host[48];
	const char *port_s;

	memset(out, 0, sizeof(*out));
	if (s == NULL)
		return ME_EINVAL;
	if (s[0] == '[') {
		const char *end = strchr(s, ']');
		if (end == NULL || end[1] != ':' || (size_t)(end - s - 1) >= sizeof(host))
			return ME_EINVAL;
		memcpy(host, s + 1, (size_t)(end - s - 1));
		host[end - s - 1] = '\0';
		port_s = end + 2;
	} else {
		const char *colon = strrchr(s, ':');
		if (colon == NULL || (size_t)(colon - s) >= sizeof(host) ||
		    memchr(s, ':', (size_t)(colon - s)) != NULL)
			return ME_EINVAL;
		memcpy(host, s, (size_t)(colon - s));
		host[colon - s] = '\0';
		port_s = colon + 1;
	}
	char *endp;
	if (*port_s < '0' || *port_s > '9')
		return ME_EINVAL;
	unsigned long port = strtoul(port_s, &endp, 10);
	if (*endp != '\0' || port == 0 || port > 65535)
		return ME_EINVAL;

	struct sockaddr_in *in4 = (struct sockaddr_in *)&out->ss;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&out->ss;
	if (s[0] != '[' && inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons((uint16_t)port);
		out->len = sizeof(*in4);
		snprintf(out->text, sizeof(out->text), "%s:%lu", host, port);
	} else if (s[0] == '[' && inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
		char norm[INET6_ADDRSTRLEN];
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)port);
		out->len = sizeof(*in6);
		inet_ntop(AF_INET6, &in6->sin6_addr, norm, sizeof(norm));
		snprintf(out->text, sizeof(out->text), "[%s]:%lu", norm, port);
	} else {
		return ME_EINVAL;
	}
	return 0;
}

int me_bootstrap_parse(const char *s, struct me_bootstrap *out)
{
	char did[256];
	const char *at = strrchr(s, '@');

	memset(out, 0, sizeof(*out));
	if (at == NULL || (size_t)(at - s) >= sizeof(did))
		return ME_EINVAL;
	memcpy(did, s, (size_t)(at - s));
	did[at - s] = '\0';
	if (me_did_key_normalize(did, out->did, sizeof(out->did)) < 0)
		return ME_EBADID;
	return me_sockaddr_parse(at + 1, &out->addr);
}

#define FAIL(...) do { snprintf(err, errsz, __VA_ARGS__); return ME_EINVAL; } while (0)

int me_config_load(struct me_config *cfg, int argc, char **argv, char *err, size_t errsz)
{
	const char *root_flag = NULL, *log_flag = NULL;
	int c;

	memset(cfg, 0, sizeof(*cfg));
	cfg->log_level = LOG_INFO;
	cfg->gossip_interval_ms = ME_GOSSIP_INTERVAL_MS;
	cfg->max_outbound = ME_MAX_OUTBOUND;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":r:a:l:b:s:fhV", long_opts, NULL)) != -1) {
		switch (c) {
		case 'r':
			root_flag = optarg;
			break;
		case 'a':
			if (strlen(optarg) == 0 || strlen(optarg) >= sizeof(cfg->alias))
				FAIL("--alias must be 1 to %zu bytes", sizeof(cfg->alias) - 1);
			snprintf(cfg->alias, sizeof(cfg->alias), "%s", optarg);
			break;
		case 'l':
			if (cfg->naddrs == ME_MAX_ADDRS)
				FAIL("at most %d --addr flags", ME_MAX_ADDRS);
			if (me_sockaddr_parse(optarg, &cfg->addrs[cfg->naddrs]) < 0)
				FAIL("invalid --addr '%s': expected IP:PORT or [IPv6]:PORT", optarg);
			cfg->naddrs++;
			break;
		case 'b': {
			if (cfg->nboots == ME_MAX_BOOTSTRAP)
				FAIL("at most %d --bootstrap-node flags", ME_MAX_BOOTSTRAP);
			int rc = me_bootstrap_parse(optarg, &cfg->boots[cfg->nboots]);
			if (rc == ME_EBADID)
				FAIL("invalid --bootstrap-node '%s': the part before '@' is not a did:key", optarg);
			if (rc < 0)
				FAIL("invalid --bootstrap-node '%s': expected did:key:z...@IP:PORT", optarg);
			cfg->nboots++;
			break;
		}
		case OPT_ANNOUNCE:
			if (cfg->nannounce == ME_MAX_ADDRS)
				FAIL("at most %d --announce-addr flags", ME_MAX_ADDRS);
			if (me_sockaddr_parse(optarg, &cfg->announce[cfg->nannounce]) < 0)
				FAIL("invalid --announce-addr '%s': expected IP:PORT or [IPv6]:PORT",
				     optarg);
			cfg->nannounce++;
			break;
		case OPT_GOSSIP_IVL: {
			char *end;
			unsigned long v = strtoul(optarg, &end, 10);
			if (*optarg < '0' || *optarg > '9' || *end != '\0' || v < 1 || v > 3600)
				FAIL("--gossip-interval must be 1 to 3600 seconds");
			cfg->gossip_interval_ms = (unsigned)v * 1000;
			break;
		}
		case OPT_MAX_OUT: {
			char *end;
			unsigned long v = strtoul(optarg, &end, 10);
			if (*optarg < '0' || *optarg > '9' || *end != '\0' || v > 64)
				FAIL("--max-outbound must be 0 to 64");
			cfg->max_outbound = (unsigned)v;
			break;
		}
		case OPT_CERT:
			if (snprintf(cfg->cert_path, sizeof(cfg->cert_path), "%s", optarg) >=
			    (int)sizeof(cfg->cert_path))
				FAIL("--cert-path too long");
			break;
		case 's':
			if (strlen(optarg) >= sizeof(cfg->socket_path))
				FAIL("--socket path too long (max %zu bytes)", sizeof(cfg->socket_path) - 1);
			snprintf(cfg->socket_path, sizeof(cfg->socket_path), "%s", optarg);
			break;
		case OPT_SOCKGROUP:
			if (strlen(optarg) >= sizeof(cfg->socket_group))
				FAIL("--socket-group too long");
			snprintf(cfg->socket_group, sizeof(cfg->socket_group), "%s", optarg);
			break;
		case OPT_LOGLEVEL:
			log_flag = optarg;
			break;
		case 'f':
			cfg->foreground = 1;
			break;
		case 'h':
			fputs(usage_text, stdout);
			return ME_CONFIG_EXIT;
		case 'V':
			printf("megaengined %s\n", ME_VERSION);
			return ME_CONFIG_EXIT;
		case ':':
			FAIL("option '%s' needs an argument", argv[optind - 1]);
		default:
			FAIL("unknown option '%s' (see megaengined --help)", argv[optind - 1]);
		}
	}
	if (optind < argc)
		FAIL("unexpected argument '%s' (see megaengined --help)", argv[optind]);

	if (me_root_resolve(root_flag, cfg->root, sizeof(cfg->root)) < 0)
		FAIL("cannot determine the data root: use --root or MEGAENGINE_ROOT");

	const char *lv = log_flag ? log_flag : getenv("MEGAENGINE_LOG");
	if (lv != NULL && *lv != '\0') {
		int l = me_log_parse_level(lv);
		if (l < 0)
			FAIL("invalid log level '%s' (%s): use error, warning, notice, info or debug", lv,
			     log_flag ? "--log-level" : "MEGAENGINE_LOG");
		cfg->log_level = l;
	}

	if (cfg->naddrs == 0)
		me_sockaddr_parse("0.0.0.0:9000", &cfg->addrs[cfg->naddrs++]);
	if (cfg->alias[0] == '\0') {
		if (gethostname(cfg->alias, sizeof(cfg->alias)) < 0 || cfg->alias[0] == '\0')
			snprintf(cfg->alias, sizeof(cfg->alias), "megaengine");
		cfg->alias[sizeof(cfg->alias) - 1] = '\0';
	}
	if (cfg->cert_path[0] == '\0' &&
	    snprintf(cfg->cert_path, sizeof(cfg->cert_path), "%s/certs", cfg->root) >=
		    (int)sizeof(cfg->cert_path))
		FAIL("data root path too long");
	if (cfg->socket_path[0] == '\0' &&
	    snprintf(cfg->socket_path, sizeof(cfg->socket_path), "%s/%s", cfg->root,
		     ME_SOCKET_NAME) >= (int)sizeof(cfg->socket_path))
		FAIL("control socket path '%s/%s' is longer than %zu bytes: use --socket", cfg->root,
		     ME_SOCKET_NAME, sizeof(cfg->socket_path) - 1);
	return ME_CONFIG_OK;
}
