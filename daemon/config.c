#include "daemon/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ini.h>

#include "common/err.h"
#include "common/log.h"

static const char usage_text[] =
"Usage: megaengined [OPTION]...\n"
"Run a megaengine node: a peer-to-peer git network daemon.\n"
"\n"
"  -c, --config FILE         configuration file (default $MEGAENGINE_CONFIG, else\n"
"                            " ME_CONFIG_FILE " when it exists)\n"
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
"      --max-repo-size SIZE  largest repository transfer accepted from a peer, in\n"
"                            bytes or with a K, M or G suffix (default 2G)\n"
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
"Configuration file: one 'key = value' per line, '#' or ';' starts a comment;\n"
"the keys are the long option names above without '--' (root, alias, addr,\n"
"bootstrap-node, announce-addr, gossip-interval, max-outbound, max-repo-size,\n"
"cert-path, socket, socket-group, log-level); addr, bootstrap-node and announce-addr may\n"
"be repeated. Paths in the file must be absolute.\n"
"Precedence: command-line flag > environment variable > configuration file >\n"
"default. A repeatable option given as a flag replaces the file's entries.\n"
"Environment: MEGAENGINE_CONFIG, MEGAENGINE_ROOT, MEGAENGINE_LOG.\n"
"\n"
"Signals: SIGTERM or SIGINT stop the daemon. SIGHUP re-reads the configuration\n"
"file and applies alias, announce-addr, gossip-interval, max-outbound,\n"
"max-repo-size and log-level; root, addr, bootstrap-node, cert-path, socket and socket-group\n"
"need a restart. Control it with mectl(1).\n";

enum {
	OPT_CERT = 256, OPT_SOCKGROUP, OPT_LOGLEVEL, OPT_ANNOUNCE, OPT_GOSSIP_IVL, OPT_MAX_OUT,
	OPT_MAX_REPO,
};

static const struct option long_opts[] = {
	{ "config", required_argument, NULL, 'c' },
	{ "root", required_argument, NULL, 'r' },
	{ "alias", required_argument, NULL, 'a' },
	{ "addr", required_argument, NULL, 'l' },
	{ "bootstrap-node", required_argument, NULL, 'b' },
	{ "cert-path", required_argument, NULL, OPT_CERT },
	{ "announce-addr", required_argument, NULL, OPT_ANNOUNCE },
	{ "gossip-interval", required_argument, NULL, OPT_GOSSIP_IVL },
	{ "max-outbound", required_argument, NULL, OPT_MAX_OUT },
	{ "max-repo-size", required_argument, NULL, OPT_MAX_REPO },
	{ "socket", required_argument, NULL, 's' },
	{ "socket-group", required_argument, NULL, OPT_SOCKGROUP },
	{ "log-level", required_argument, NULL, OPT_LOGLEVEL },
	{ "foreground", no_argument, NULL, 'f' },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};
#define SHORT_OPTS ":c:r:a:l:b:s:fhV"

/* The configuration keys: the flags that take a value, by the same names. */
enum key {
	K_ROOT, K_ALIAS, K_ADDR, K_BOOT, K_ANNOUNCE, K_GOSSIP_IVL, K_MAX_OUT, K_MAX_REPO, K_CERT,
	K_SOCKET, K_SOCKGROUP, K_LOGLEVEL, K__COUNT
};

static const struct {
	const char *name;
	int opt;     /* getopt value of the flag */
	int list;    /* repeatable */
	int restart; /* a running daemon cannot apply a change (see me_config_diff) */
} keys[K__COUNT] = {
	[K_ROOT] = { "root", 'r', 0, 1 },
	[K_ALIAS] = { "alias", 'a', 0, 0 },
	[K_ADDR] = { "addr", 'l', 1, 1 },
	[K_BOOT] = { "bootstrap-node", 'b', 1, 1 },
	[K_ANNOUNCE] = { "announce-addr", OPT_ANNOUNCE, 1, 0 },
	[K_GOSSIP_IVL] = { "gossip-interval", OPT_GOSSIP_IVL, 0, 0 },
	[K_MAX_OUT] = { "max-outbound", OPT_MAX_OUT, 0, 0 },
	[K_MAX_REPO] = { "max-repo-size", OPT_MAX_REPO, 0, 0 },
	[K_CERT] = { "cert-path", OPT_CERT, 0, 1 },
	[K_SOCKET] = { "socket", 's', 0, 1 },
	[K_SOCKGROUP] = { "socket-group", OPT_SOCKGROUP, 0, 1 },
	[K_LOGLEVEL] = { "log-level", OPT_LOGLEVEL, 0, 0 },
};

/* State of one load: the layers (file, environment, flags) are applied in that order, each
 * overriding the one before. */
struct loader {
	struct me_config *cfg;
	char root[PATH_MAX]; /* "" = default (me_root_resolve) */
	unsigned listed;     /* list keys already set by the current layer: it replaces, not adds */
	/* configuration file */
	FILE *f;
	int in_file;
	int lineno;
	int seen[K__COUNT]; /* line of each single-valued key, to refuse a second one */
	int err_line;       /* first error found by the reader or the handler */
	char why[512];
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

#define WHY(...) do { snprintf(why, whysz, __VA_ARGS__); return -1; } while (0)

static int parse_uint(const char *v, unsigned long lo, unsigned long hi, unsigned *out)
{
	char *end;
	errno = 0;
	unsigned long n = strtoul(v, &end, 10);
	if (*v < '0' || *v > '9' || *end != '\0' || errno != 0 || n < lo || n > hi)
		return -1;
	*out = (unsigned)n;
	return 0;
}

static int set_str(char *dst, size_t dstsz, const char *v, char *why, size_t whysz)
{
	if (*v == '\0' || strlen(v) >= dstsz)
		WHY("must be 1 to %zu bytes", dstsz - 1);
	memcpy(dst, v, strlen(v) + 1);
	return 0;
}

/* Applies one key = value (from any layer) to the loader. -1 with the reason in why. */
static int set_key(struct loader *ld, enum key k, const char *v, char *why, size_t whysz)
{
	struct me_config *cfg = ld->cfg;
	unsigned n;

	if (ld->in_file && (k == K_ROOT || k == K_CERT || k == K_SOCKET) && v[0] != '/')
		WHY("must be an absolute path");
	if (keys[k].list && !(ld->listed & (1u << k))) {
		ld->listed |= 1u << k; /* the first entry of this layer replaces the lower layers' */
		if (k == K_ADDR)
			cfg->naddrs = 0;
		else if (k == K_BOOT)
			cfg->nboots = 0;
		else
			cfg->nannounce = 0;
	}
	switch (k) {
	case K_ROOT:
		return set_str(ld->root, sizeof(ld->root), v, why, whysz);
	case K_ALIAS:
		return set_str(cfg->alias, sizeof(cfg->alias), v, why, whysz);
	case K_ADDR:
	case K_ANNOUNCE: {
		struct me_sockaddr *a = k == K_ADDR ? cfg->addrs : cfg->announce;
		size_t *na = k == K_ADDR ? &cfg->naddrs : &cfg->nannounce;
		if (*na == ME_MAX_ADDRS)
			WHY("too many (at most %d)", ME_MAX_ADDRS);
		if (me_sockaddr_parse(v, &a[*na]) < 0)
			WHY("expected IP:PORT or [IPv6]:PORT (numeric)");
		(*na)++;
		return 0;
	}
	case K_BOOT: {
		if (cfg->nboots == ME_MAX_BOOTSTRAP)
			WHY("too many (at most %d)", ME_MAX_BOOTSTRAP);
		int rc = me_bootstrap_parse(v, &cfg->boots[cfg->nboots]);
		if (rc == ME_EBADID)
			WHY("the part before '@' is not a did:key");
		if (rc < 0)
			WHY("expected did:key:z...@IP:PORT");
		cfg->nboots++;
		return 0;
	}
	case K_GOSSIP_IVL:
		if (parse_uint(v, 1, 3600, &n) < 0)
			WHY("must be 1 to 3600 seconds");
		cfg->gossip_interval_ms = n * 1000;
		return 0;
	case K_MAX_OUT:
		if (parse_uint(v, 0, 64, &cfg->max_outbound) < 0)
			WHY("must be 0 to 64");
		return 0;
	case K_MAX_REPO: {
		char *end;
		errno = 0;
		if (v[0] < '0' || v[0] > '9')
			WHY("expected a size such as 500M or 2G");
		unsigned long long b = strtoull(v, &end, 10);
		unsigned shift = 0;
		if (*end == 'K' || *end == 'k')
			shift = 10;
		else if (*end == 'M' || *end == 'm')
			shift = 20;
		else if (*end == 'G' || *end == 'g')
			shift = 30;
		if (shift)
			end++;
		if (errno != 0 || *end != '\0' || b == 0 || b > (1ull << 40) >> shift)
			WHY("expected a size from 1 to 1T, such as 500M or 2G");
		cfg->max_repo_size = (uint64_t)b << shift;
		return 0;
	}
	case K_CERT:
		return set_str(cfg->cert_path, sizeof(cfg->cert_path), v, why, whysz);
	case K_SOCKET:
		return set_str(cfg->socket_path, sizeof(cfg->socket_path), v, why, whysz);
	case K_SOCKGROUP:
		return set_str(cfg->socket_group, sizeof(cfg->socket_group), v, why, whysz);
	case K_LOGLEVEL: {
		int l = me_log_parse_level(v);
		if (l < 0)
			WHY("log level must be error, warning, notice, info or debug");
		cfg->log_level = l;
		return 0;
	}
	case K__COUNT:
		break;
	}
	WHY("internal error: unknown key");
}

/* ---- configuration file (libinih) ---- */

/* inih's line reader, counting lines (so every error has one) and refusing lines longer than
 * inih's buffer. Leading blanks are dropped: inih would take an indented line for the
 * continuation of the previous value. */
static char *file_reader(char *str, int num, void *stream)
{
	struct loader *ld = stream;

	if (fgets(str, num, ld->f) == NULL)
		return NULL;
	ld->lineno++;
	size_t len = strlen(str);
	if (len > 0 && str[len - 1] != '\n' && len == (size_t)num - 1) {
		int c = fgetc(ld->f);
		if (c != '\n' && c != EOF) {
			while ((c = fgetc(ld->f)) != '\n' && c != EOF)
				;
			if (ld->err_line == 0) {
				ld->err_line = ld->lineno;
				snprintf(ld->why, sizeof(ld->why), "line longer than %d characters",
					 num - 1);
			}
		}
	}
	size_t skip = strspn(str, " \t");
	if (skip > 0)
		memmove(str, str + skip, strlen(str + skip) + 1);
	if (str[0] == '[' && ld->err_line == 0) {
		ld->err_line = ld->lineno;
		snprintf(ld->why, sizeof(ld->why),
			 "unexpected section header: the file has no sections, only 'key = value' "
			 "lines");
	}
	return str;
}

static int file_handler(void *user, const char *section, const char *name, const char *value)
{
	struct loader *ld = user;
	char why[256];
	int k;

	if (ld->err_line != 0)
		return 0; /* only the first error is reported */
	(void)section; /* section headers are refused by file_reader */
	for (k = 0; k < K__COUNT; k++)
		if (strcmp(name, keys[k].name) == 0)
			break;
	if (k == K__COUNT) {
		snprintf(ld->why, sizeof(ld->why), "unknown key '%s' (see megaengined --help)", name);
		goto fail;
	}
	if (!keys[k].list && ld->seen[k] != 0) {
		snprintf(ld->why, sizeof(ld->why), "'%s' given twice (first on line %d)", name,
			 ld->seen[k]);
		goto fail;
	}
	ld->seen[k] = ld->lineno;
	if (set_key(ld, (enum key)k, value, why, sizeof(why)) < 0) {
		snprintf(ld->why, sizeof(ld->why), "invalid %s '%s': %s", name, value, why);
		goto fail;
	}
	return 1;
fail:
	ld->err_line = ld->lineno;
	return 0;
}

#define FAIL(...) do { snprintf(err, errsz, __VA_ARGS__); return ME_EINVAL; } while (0)

static int load_file(struct loader *ld, const char *path, char *err, size_t errsz)
{
	ld->f = fopen(path, "re");
	if (ld->f == NULL)
		FAIL("cannot read configuration file %s: %s", path, strerror(errno));
	ld->in_file = 1;
	ld->listed = 0;
	int rc = ini_parse_stream(file_reader, ld, file_handler, ld);
	int ioerr = ferror(ld->f);
	fclose(ld->f);
	ld->f = NULL;
	ld->in_file = 0;
	if (rc < 0 || ioerr)
		FAIL("cannot read configuration file %s%s", path,
		     rc == -2 ? ": out of memory" : ": read error");
	int line = ld->err_line;
	const char *why = ld->why;
	if (rc > 0 && (line == 0 || rc < line)) {
		line = rc;
		why = "syntax error: expected 'key = value' or a '#' comment";
	}
	if (line != 0)
		FAIL("%s:%d: %s", path, line, why);
	return 0;
}

int me_config_load(struct me_config *cfg, int argc, char **argv, char *err, size_t errsz)
{
	static struct loader ld; /* large (paths); one load at a time */
	const char *config_flag = NULL, *v;
	char why[256];
	int c;

	memset(cfg, 0, sizeof(*cfg));
	memset(&ld, 0, sizeof(ld));
	ld.cfg = cfg;
	cfg->log_level = LOG_INFO;
	cfg->gossip_interval_ms = ME_GOSSIP_INTERVAL_MS;
	cfg->max_outbound = ME_MAX_OUTBOUND;
	cfg->max_repo_size = ME_MAX_REPO_SIZE;

	/* Pass 1: --help, --version, --config and the syntax of the command line. */
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, SHORT_OPTS, long_opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			config_flag = optarg;
			break;
		case 'h':
			fputs(usage_text, stdout);
			return ME_CONFIG_EXIT;
		case 'V':
			printf("megaengined %s\n", ME_VERSION);
			return ME_CONFIG_EXIT;
		case ':':
			FAIL("option '%s' needs an argument", argv[optind - 1]);
		case '?':
			FAIL("unknown option '%s' (see megaengined --help)", argv[optind - 1]);
		default:
			break;
		}
	}
	if (optind < argc)
		FAIL("unexpected argument '%s' (see megaengined --help)", argv[optind]);

	/* The configuration file. */
	v = getenv("MEGAENGINE_CONFIG");
	if (config_flag != NULL && *config_flag == '\0')
		FAIL("--config needs a file name (use /dev/null for none)");
	if (config_flag != NULL)
		snprintf(cfg->config_path, sizeof(cfg->config_path), "%s", config_flag);
	else if (v != NULL && *v != '\0')
		snprintf(cfg->config_path, sizeof(cfg->config_path), "%s", v);
	else if (access(ME_CONFIG_FILE, F_OK) == 0 || errno != ENOENT)
		snprintf(cfg->config_path, sizeof(cfg->config_path), "%s", ME_CONFIG_FILE);
	if (cfg->config_path[0] != '\0' && load_file(&ld, cfg->config_path, err, errsz) < 0)
		return ME_EINVAL;

	/* The environment. */
	ld.listed = 0;
	if ((v = getenv("MEGAENGINE_ROOT")) != NULL && *v != '\0' &&
	    set_key(&ld, K_ROOT, v, why, sizeof(why)) < 0)
		FAIL("invalid MEGAENGINE_ROOT: %s", why);
	if ((v = getenv("MEGAENGINE_LOG")) != NULL && *v != '\0' &&
	    set_key(&ld, K_LOGLEVEL, v, why, sizeof(why)) < 0)
		FAIL("invalid MEGAENGINE_LOG '%s': %s", v, why);

	/* Pass 2: the flags' values. */
	ld.listed = 0;
	optind = 1;
	while ((c = getopt_long(argc, argv, SHORT_OPTS, long_opts, NULL)) != -1) {
		if (c == 'f') {
			cfg->foreground = 1;
			continue;
		}
		for (int k = 0; k < K__COUNT; k++) {
			if (keys[k].opt != c)
				continue;
			if (set_key(&ld, (enum key)k, optarg, why, sizeof(why)) < 0)
				FAIL("invalid --%s '%s': %s", keys[k].name, optarg, why);
			break;
		}
	}

	/* Defaults of what no layer set. */
	if (me_root_resolve(ld.root[0] ? ld.root : NULL, cfg->root, sizeof(cfg->root)) < 0)
		FAIL("cannot determine the data root: use --root or MEGAENGINE_ROOT");
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

static int addrs_differ(const struct me_sockaddr *a, size_t na, const struct me_sockaddr *b,
			size_t nb)
{
	if (na != nb)
		return 1;
	for (size_t i = 0; i < na; i++)
		if (strcmp(a[i].text, b[i].text) != 0)
			return 1;
	return 0;
}

void me_config_diff(const struct me_config *a, const struct me_config *b, int restart_only,
		    char *out, size_t outsz)
{
	int differ[K__COUNT] = { 0 };
	size_t off = 0;

	differ[K_ROOT] = strcmp(a->root, b->root) != 0;
	differ[K_ALIAS] = strcmp(a->alias, b->alias) != 0;
	differ[K_ADDR] = addrs_differ(a->addrs, a->naddrs, b->addrs, b->naddrs);
	differ[K_BOOT] = a->nboots != b->nboots;
	for (size_t i = 0; i < a->nboots && !differ[K_BOOT]; i++)
		differ[K_BOOT] = strcmp(a->boots[i].did, b->boots[i].did) != 0 ||
				 strcmp(a->boots[i].addr.text, b->boots[i].addr.text) != 0;
	differ[K_ANNOUNCE] = addrs_differ(a->announce, a->nannounce, b->announce, b->nannounce);
	differ[K_GOSSIP_IVL] = a->gossip_interval_ms != b->gossip_interval_ms;
	differ[K_MAX_OUT] = a->max_outbound != b->max_outbound;
	differ[K_MAX_REPO] = a->max_repo_size != b->max_repo_size;
	differ[K_CERT] = strcmp(a->cert_path, b->cert_path) != 0;
	differ[K_SOCKET] = strcmp(a->socket_path, b->socket_path) != 0;
	differ[K_SOCKGROUP] = strcmp(a->socket_group, b->socket_group) != 0;
	differ[K_LOGLEVEL] = a->log_level != b->log_level;
	if (outsz == 0)
		return;
	out[0] = '\0';
	for (int k = 0; k < K__COUNT; k++) {
		if (!differ[k] || keys[k].restart != !!restart_only)
			continue;
		int n = snprintf(out + off, outsz - off, "%s%s", off ? ", " : "", keys[k].name);
		if (n < 0 || (size_t)n >= outsz - off)
			break;
		off += (size_t)n;
	}
}
