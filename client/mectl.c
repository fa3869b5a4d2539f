/* mectl: parse arguments, send one request over the control socket, render the reply. */
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "client/output.h"
#include "common/err.h"
#include "common/frame.h"
#include "common/keys.h"
#include "common/proto.h"
#include "common/util.h"

/* Exit codes (documented in --help and docs/control-protocol.md). */
enum { EXIT_OK = 0, EXIT_CMD = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3, EXIT_PROTO = 4 };

#define SYSTEM_SOCKET "/run/megaengine/control.sock"
#define MAX_FLAGS 4

struct cli_flag {
	const char *flag; /* "--path" */
	const char *arg;  /* wire argument name */
	const char *meta; /* for usage */
};

struct cli_cmd {
	const char *group, *verb;
	int cmd;
	const char *positional; /* wire name filled from a positional argument, or NULL */
	struct cli_flag flags[MAX_FLAGS];
	out_render_fn render;
	int local_fallback;     /* works on the data root when no daemon runs */
	const char *usage, *summary;
};

static const struct cli_cmd cli_cmds[] = {
	{ "auth", "init", ME_CMD_AUTH_INIT, NULL, { { 0 } }, out_auth, 1, "auth init",
	  "create this node's Ed25519 identity (works without a running daemon)" },
	{ "auth", "show", ME_CMD_AUTH_SHOW, NULL, { { 0 } }, out_auth, 1, "auth show",
	  "print this node's did:key" },
	{ "node", "id", ME_CMD_NODE_ID, NULL, { { 0 } }, out_auth, 1, "node id",
	  "print this node's did:key (same as auth show)" },
	{ "node", "status", ME_CMD_NODE_STATUS, NULL, { { 0 } }, out_node_status, 0, "node status",
	  "show identity, alias, addresses, uptime, version and counts" },
	{ "node", "list", ME_CMD_NODE_LIST, NULL, { { 0 } }, out_node_list, 0, "node list",
	  "list known nodes: id, alias, addresses, last seen, connected" },
	{ "peer", "list", ME_CMD_PEER_LIST, NULL, { { 0 } }, out_peer_list, 0, "peer list",
	  "list live peer connections: did, address, direction, round-trip time, since" },
	{ "repo", "add", ME_CMD_REPO_ADD, "path",
	  { { "--path", "path", "DIR" }, { "--description", "description", "TEXT" }, { 0 } },
	  out_repo_add, 0, "repo add [--path] DIR [--description TEXT]",
	  "publish a git repository (with at least one commit); prints its did:repo" },
	{ "repo", "list", ME_CMD_REPO_LIST, NULL, { { 0 } }, out_repo_list, 0, "repo list",
	  "list repositories: id, name, creator and its alias, state, last update" },
	{ "repo", "show", ME_CMD_REPO_SHOW, "repo_id", { { "--repo-id", "repo_id", "ID" }, { 0 } },
	  out_repo_show, 0, "repo show [--repo-id] ID", "show one repository and its refs" },
	{ "repo", "remove", ME_CMD_REPO_REMOVE, "repo_id",
	  { { "--repo-id", "repo_id", "ID" }, { 0 } }, out_repo_remove, 0,
	  "repo remove [--repo-id] ID", "stop publishing a repository (its files are kept)" },
};
#define NCLI (sizeof(cli_cmds) / sizeof(cli_cmds[0]))

struct opts {
	const char *root;
	const char *socket;
	int json;
	int timeout_s;
	const struct cli_cmd *cc;
	const char *vals[MAX_FLAGS + 1]; /* by flag index; [MAX_FLAGS] unused */
	char path_abs[PATH_MAX];
};

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: mectl [OPTION]... COMMAND [ARG]...\n"
		"Control a megaengine node (megaengined) over its control socket.\n"
		"\n"
		"Commands:\n");
	for (size_t i = 0; i < NCLI; i++)
		fprintf(f, "  %-44s %s\n", cli_cmds[i].usage, cli_cmds[i].summary);
	fprintf(f,
		"\n"
		"Options:\n"
		"  -r, --root DIR      data root of the node (default $MEGAENGINE_ROOT, else\n"
		"                      ~/.megaengine); the socket is ROOT/megaengined.sock\n"
		"  -s, --socket PATH   control socket (default $MEGAENGINE_SOCKET, else from\n"
		"                      --root, else " SYSTEM_SOCKET " if it exists,\n"
		"                      else ~/.megaengine/megaengined.sock)\n"
		"  -j, --json          print the daemon's reply as JSON\n"
		"  -t, --timeout SEC   give up waiting for the daemon after SEC seconds (30)\n"
		"  -h, --help          show this help and exit\n"
		"  -V, --version       show the version and exit\n"
		"\n"
		"Exit status: 0 success, 1 the command failed, 2 usage error,\n"
		"3 the daemon could not be reached (or refused this user), 4 protocol error.\n");
}

static int usage_error(const char *fmt, ...)
{
	va_list ap;
	fputs("mectl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nTry 'mectl --help'.\n", stderr);
	return EXIT_USAGE;
}

static int match_opt(const char *a, const char *longname, char shortname, const char **inl)
{
	size_t n = strlen(longname);
	*inl = NULL;
	if (shortname && a[0] == '-' && a[1] == shortname && a[2] == '\0')
		return 1;
	if (strncmp(a, longname, n) == 0) {
		if (a[n] == '\0')
			return 1;
		if (a[n] == '=') {
			*inl = a + n + 1;
			return 1;
		}
	}
	return 0;
}

/* Takes an option's value, inline ("--x=v") or from the next argument. */
static const char *opt_value(int argc, char **argv, int *i, const char *inl)
{
	if (inl)
		return inl;
	if (*i + 1 >= argc)
		return NULL;
	return argv[++*i];
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	const char *words[2] = { NULL, NULL };
	const char *pos[4];
	int nwords = 0, npos = 0;
	const char *inl, *v;

	memset(o, 0, sizeof(*o));
	o->timeout_s = 30;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (match_opt(a, "--help", 'h', &inl)) {
			usage(stdout);
			return -1;
		} else if (match_opt(a, "--version", 'V', &inl)) {
			printf("mectl %s (control protocol %d)\n", ME_VERSION, ME_PROTO_VERSION);
			return -1;
		} else if (match_opt(a, "--json", 'j', &inl)) {
			o->json = 1;
		} else if (match_opt(a, "--root", 'r', &inl)) {
			if ((o->root = opt_value(argc, argv, &i, inl)) == NULL)
				return usage_error("--root needs a directory");
		} else if (match_opt(a, "--socket", 's', &inl)) {
			if ((o->socket = opt_value(argc, argv, &i, inl)) == NULL)
				return usage_error("--socket needs a path");
		} else if (match_opt(a, "--timeout", 't', &inl)) {
			if ((v = opt_value(argc, argv, &i, inl)) == NULL)
				return usage_error("--timeout needs a number of seconds");
			char *end;
			long t = strtol(v, &end, 10);
			if (*end != '\0' || t <= 0 || t > 86400)
				return usage_error("--timeout must be 1 to 86400 seconds");
			o->timeout_s = (int)t;
		} else if (a[0] == '-' && a[1] == '-' && a[2] != '\0' && nwords == 2 && o->cc) {
			int found = 0;
			for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
				if (match_opt(a, o->cc->flags[f].flag, 0, &inl)) {
					if ((v = opt_value(argc, argv, &i, inl)) == NULL)
						return usage_error("%s needs a value (%s)",
								   o->cc->flags[f].flag,
								   o->cc->flags[f].meta);
					o->vals[f] = v;
					found = 1;
					break;
				}
			}
			if (!found)
				return usage_error("'%s %s' has no option '%s'", o->cc->group,
						   o->cc->verb, a);
		} else if (a[0] == '-' && a[1] != '\0') {
			return usage_error("unknown option '%s'", a);
		} else if (nwords < 2) {
			words[nwords++] = a;
			if (nwords == 2) {
				for (size_t c = 0; c < NCLI; c++)
					if (strcmp(cli_cmds[c].group, words[0]) == 0 &&
					    strcmp(cli_cmds[c].verb, words[1]) == 0)
						o->cc = &cli_cmds[c];
				if (o->cc == NULL)
					return usage_error("unknown command '%s %s'", words[0],
							   words[1]);
			}
		} else {
			if (npos == 1 || o->cc->positional == NULL)
				return usage_error("unexpected argument '%s'", a);
			pos[npos++] = a;
		}
	}
	if (nwords == 0)
		return usage_error("no command given");
	if (o->cc == NULL) {
		for (size_t c = 0; c < NCLI; c++)
			if (strcmp(cli_cmds[c].group, words[0]) == 0)
				return usage_error("'%s' needs a subcommand, e.g. '%s'", words[0],
						   cli_cmds[c].usage);
		return usage_error("unknown command '%s'", words[0]);
	}
	if (npos == 1) {
		for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
			if (strcmp(o->cc->flags[f].arg, o->cc->positional) == 0) {
				if (o->vals[f] != NULL)
					return usage_error("%s given twice", o->cc->flags[f].flag);
				o->vals[f] = pos[0];
			}
		}
	}
	/* Required arguments, per the shared command table. */
	const struct me_cmdinfo *ci = &me_cmds[o->cc->cmd];
	for (const struct me_argspec *s = ci->args; s->name; s++) {
		if (!s->required)
			continue;
		for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
			if (strcmp(o->cc->flags[f].arg, s->name) == 0 && o->vals[f] == NULL)
				return usage_error("'%s %s' needs %s", o->cc->group, o->cc->verb,
						   o->cc->flags[f].meta);
	}
	/* Paths are resolved here, where the user's working directory is. */
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
		if (o->vals[f] && strcmp(o->cc->flags[f].arg, "path") == 0) {
			if (realpath(o->vals[f], o->path_abs) == NULL) {
				fprintf(stderr, "mectl: %s: %s\n", o->vals[f], strerror(errno));
				return EXIT_CMD;
			}
			o->vals[f] = o->path_abs;
		}
	}
	return 0;
}

static int resolve_socket(const struct opts *o, char *out, size_t outsz)
{
	char root[PATH_MAX];
	const char *env = getenv("MEGAENGINE_SOCKET");
	struct stat st;

	if (o->socket)
		return snprintf(out, outsz, "%s", o->socket) < (int)outsz ? 0 : -1;
	if (env && *env)
		return snprintf(out, outsz, "%s", env) < (int)outsz ? 0 : -1;
	const char *renv = getenv("MEGAENGINE_ROOT");
	/* EACCES: it is there, in /run/megaengine (0750), but this user may not use it; connect
	 * then says so, naming the group. */
	if (o->root == NULL && (renv == NULL || *renv == '\0') &&
	    (stat(SYSTEM_SOCKET, &st) == 0 || errno == EACCES))
		return snprintf(out, outsz, "%s", SYSTEM_SOCKET) < (int)outsz ? 0 : -1;
	if (me_root_resolve(o->root, root, sizeof(root)) < 0)
		return -1;
	return snprintf(out, outsz, "%s/megaengined.sock", root) < (int)outsz ? 0 : -1;
}

static void pack_args(msgpack_packer *pk, void *ud)
{
	const struct opts *o = ud;
	int n = 0;
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
		n += o->vals[f] != NULL;
	msgpack_pack_map(pk, (size_t)n);
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
		if (o->vals[f])
			me_mp_pack_kv_str(pk, o->cc->flags[f].arg, o->vals[f]);
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL); /* EPIPE, not SIGPIPE */
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* The group whose members may use the socket at path: the socket's group, else that of its
 * directory (which an outsider may not be able to look into). "" when unknown or root. */
static void socket_group(const char *path, char *out, size_t outsz)
{
	char dir[PATH_MAX];
	struct stat st;
	struct group *gr;
	char *slash;

	out[0] = '\0';
	if (stat(path, &st) < 0) {
		snprintf(dir, sizeof(dir), "%s", path);
		if ((slash = strrchr(dir, '/')) != NULL && slash != dir)
			*slash = '\0';
		if (slash == NULL || slash == dir || stat(dir, &st) < 0) {
			if (strcmp(path, SYSTEM_SOCKET) == 0)
				snprintf(out, outsz, "megaengine");
			return;
		}
	}
	if (st.st_gid != 0 && (gr = getgrgid(st.st_gid)) != NULL)
		snprintf(out, outsz, "%s", gr->gr_name);
	else if (strcmp(path, SYSTEM_SOCKET) == 0)
		snprintf(out, outsz, "megaengine");
}

static void permission_hint(const char *path)
{
	char group[256];

	socket_group(path, group, sizeof(group));
	if (group[0] != '\0')
		fprintf(stderr, "Only root, the daemon's user and members of the group '%s' may use "
			"the control socket %s.\nTo join the group: usermod -a -G %s USER (then log "
			"in again).\n", group, path, group);
	else
		fprintf(stderr, "Only root and the daemon's user (and, with --socket-group, members "
			"of that group) may use the control socket %s.\n", path);
}

static int print_error(const struct opts *o, int code, const char *name, const char *msg)
{
	if (o->json) {
		json_t *e = json_pack("{s:{s:i,s:s,s:s}}", "error", "code", code, "name", name,
				      "message", msg);
		out_json(e);
		json_decref(e);
	}
	fprintf(stderr, "mectl: %s (%s)\n", msg, name);
	return EXIT_CMD;
}

/* The daemon is not running: auth commands work on the data root directly. */
static int local_auth(const struct opts *o)
{
	char root[PATH_MAX];
	struct me_keypair kp;
	int created = 0, rc;

	if (me_root_resolve(o->root, root, sizeof(root)) < 0)
		return usage_error("cannot determine the data root: use --root");
	if (o->cc->cmd == ME_CMD_AUTH_INIT)
		rc = me_keypair_init(root, &kp, &created);
	else
		rc = me_keypair_load(root, &kp);
	if (rc < 0) {
		char msg[PATH_MAX + 128];
		if (rc == ME_ENOKEY)
			snprintf(msg, sizeof(msg), "no node identity in %s: run 'mectl auth init'", root);
		else if (rc == ME_EPERM)
			snprintf(msg, sizeof(msg), "%s/%s: permissions are too open (must be 0600)",
				 root, ME_KEYPAIR_FILE);
		else
			snprintf(msg, sizeof(msg), "%s/%s: %s", root, ME_KEYPAIR_FILE, me_strerror(rc));
		return print_error(o, rc, me_errname(rc), msg);
	}
	json_t *r = o->cc->cmd == ME_CMD_AUTH_INIT
		? json_pack("{s:s,s:b,s:s}", "did", kp.did, "created", created, "note",
			    "megaengined is not running; it will use this identity when it starts")
		: json_pack("{s:s}", "did", kp.did);
	me_keypair_wipe(&kp);
	if (o->json)
		out_json(r);
	else
		o->cc->render(r);
	json_decref(r);
	return EXIT_OK;
}

static int connect_socket(const char *path, int *fd_out)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof(sun.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(sun.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	*fd_out = fd;
	return 0;
}

/* Reads frames until the final reply; progress events are shown on stderr. */
static int read_reply(const struct opts *o, int fd, uint32_t id, const char *sockpath)
{
	struct me_frame_reader rd;
	char buf[65536];
	int rc = EXIT_PROTO;

	me_frame_reader_init(&rd, ME_CTL_MAX_REPLY);
	for (;;) {
		const uint8_t *body;
		size_t len;
		int fr = me_frame_reader_next(&rd, &body, &len);
		if (fr < 0) {
			fprintf(stderr, "mectl: bad frame from the daemon (%s)\n", me_strerror(fr));
			break;
		}
		if (fr == 1) {
			msgpack_zone zone;
			msgpack_object obj;
			msgpack_zone_init(&zone, 4096);
			if (me_mp_unpack(body, len, SIZE_MAX, &zone, &obj) < 0) {
				fprintf(stderr, "mectl: malformed reply from the daemon\n");
				msgpack_zone_destroy(&zone);
				break;
			}
			const msgpack_object *kind = me_mp_get(&obj, "kind");
			const msgpack_object *rid = me_mp_get(&obj, "id");
			int done = 1;
			if (me_mp_str_eq(kind, "error")) {
				const msgpack_object *e = me_mp_get(&obj, "error");
				json_t *je = e ? out_from_msgpack(e) : json_object();
				const char *m = json_string_value(json_object_get(je, "message"));
				const char *n = json_string_value(json_object_get(je, "name"));
				int code = (int)json_integer_value(json_object_get(je, "code"));
				rc = print_error(o, code, n ? n : "EUNKNOWNERR", m ? m : "unknown error");
				if (code == ME_EPERM && rid != NULL &&
				    rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER && rid->via.u64 == 0) {
					/* The daemon refused the connection itself. */
					permission_hint(sockpath);
					rc = EXIT_UNREACHABLE;
				}
				json_decref(je);
			} else if (rid == NULL || rid->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
				   rid->via.u64 != id) {
				done = 0; /* not ours */
			} else if (me_mp_str_eq(kind, "progress")) {
				done = 0;
			} else if (me_mp_str_eq(kind, "result")) {
				const msgpack_object *res = me_mp_get(&obj, "result");
				json_t *j = res ? out_from_msgpack(res) : json_null();
				if (o->json)
					out_json(j);
				else
					o->cc->render(j);
				json_decref(j);
				rc = EXIT_OK;
			} else {
				fprintf(stderr, "mectl: unexpected reply kind from the daemon\n");
			}
			msgpack_zone_destroy(&zone);
			if (done)
				break;
			continue;
		}
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int pr = poll(&pfd, 1, o->timeout_s * 1000);
		if (pr == 0) {
			fprintf(stderr, "mectl: no reply from megaengined at %s within %d s\n", sockpath,
				o->timeout_s);
			rc = EXIT_UNREACHABLE;
			break;
		}
		if (pr < 0 && errno == EINTR)
			continue;
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "mectl: megaengined closed the connection without replying\n");
			rc = EXIT_UNREACHABLE;
			break;
		}
		if ((fr = me_frame_reader_feed(&rd, buf, (size_t)n)) < 0) {
			fprintf(stderr, "mectl: bad frame from the daemon (%s)\n", me_strerror(fr));
			break;
		}
	}
	me_frame_reader_free(&rd);
	return rc;
}

int main(int argc, char **argv)
{
	struct opts o;
	char sockpath[PATH_MAX];
	int fd, rc;

	rc = parse_args(argc, argv, &o);
	if (rc < 0)
		return EXIT_OK;
	if (rc > 0)
		return rc;
	if (resolve_socket(&o, sockpath, sizeof(sockpath)) < 0)
		return usage_error("cannot determine the control socket: use --socket or --root");

	if (connect_socket(sockpath, &fd) < 0) {
		int e = errno;
		if (o.cc->local_fallback && (e == ENOENT || e == ECONNREFUSED || e == ENAMETOOLONG ||
					  e == ENOTDIR))
			return local_auth(&o);
		fprintf(stderr, "mectl: cannot connect to megaengined at %s: %s\n", sockpath,
			strerror(e));
		if (e == ENOENT || e == ECONNREFUSED)
			fprintf(stderr, "Is the daemon running? Start it with 'megaengined%s%s' or "
				"'systemctl start megaengined'.\n", o.root ? " --root " : "",
				o.root ? o.root : "");
		else if (e == EACCES || e == EPERM)
			permission_hint(sockpath);
		return EXIT_UNREACHABLE;
	}

	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	uint32_t id = (uint32_t)getpid();
	if (me_request_pack(&sb, id, o.cc->cmd, pack_args, &o) < 0) {
		msgpack_sbuffer_destroy(&sb);
		close(fd);
		return usage_error("arguments too large");
	}
	/* A daemon that refuses this user sends its EPERM reply and hangs up without reading:
	 * the send then fails, and the reply is still there to read. */
	if (write_all(fd, sb.data, sb.size) < 0 && errno != EPIPE && errno != ECONNRESET) {
		fprintf(stderr, "mectl: cannot send to megaengined at %s: %s\n", sockpath,
			strerror(errno));
		msgpack_sbuffer_destroy(&sb);
		close(fd);
		return EXIT_UNREACHABLE;
	}
	msgpack_sbuffer_destroy(&sb);
	rc = read_reply(&o, fd, id, sockpath);
	close(fd);
	return rc;
}
