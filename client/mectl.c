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
#include <time.h>
#include <unistd.h>

#include "client/gitwork.h"
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
#define MAX_POS 2
#define FETCH_TIMEOUT_S 600 /* default silence allowed while the daemon fetches */

struct cli_flag {
	const char *flag; /* "--path" */
	const char *arg;  /* wire argument name; for a local flag, the name run() looks up */
	const char *meta; /* for usage; NULL: a switch without a value */
	int local;        /* used by mectl itself, not sent to the daemon (2: and required) */
};

struct opts;
typedef int (*cli_run_fn)(struct opts *o);

struct cli_cmd {
	const char *group, *verb;
	int cmd;
	const char *positional[MAX_POS]; /* arg names filled from positional arguments, in order */
	struct cli_flag flags[MAX_FLAGS];
	out_render_fn render;
	int local_fallback;     /* works on the data root when no daemon runs */
	cli_run_fn run;         /* several steps (NULL: one request, then render) */
	int fetches;            /* may wait for a fetch: longer default timeout, progress */
	const char *usage, *summary;
};

static int run_clone(struct opts *o);
static int run_pull(struct opts *o);

#define PROGRESS_FLAG { "--progress", "progress", NULL, 1 }

static const struct cli_cmd cli_cmds[] = {
	{ "auth", "init", ME_CMD_AUTH_INIT, { NULL }, { { 0 } }, out_auth, 1, NULL, 0, "auth init",
	  "create this node's Ed25519 identity (works without a running daemon)" },
	{ "auth", "show", ME_CMD_AUTH_SHOW, { NULL }, { { 0 } }, out_auth, 1, NULL, 0, "auth show",
	  "print this node's did:key" },
	{ "node", "id", ME_CMD_NODE_ID, { NULL }, { { 0 } }, out_auth, 1, NULL, 0, "node id",
	  "print this node's did:key (same as auth show)" },
	{ "node", "status", ME_CMD_NODE_STATUS, { NULL }, { { 0 } }, out_node_status, 0, NULL, 0,
	  "node status", "show identity, alias, addresses, uptime, version and counts" },
	{ "node", "list", ME_CMD_NODE_LIST, { NULL }, { { 0 } }, out_node_list, 0, NULL, 0,
	  "node list", "list known nodes: id, alias, addresses, last seen, connected" },
	{ "peer", "list", ME_CMD_PEER_LIST, { NULL }, { { 0 } }, out_peer_list, 0, NULL, 0,
	  "peer list", "list live peer connections: did, address, direction, round-trip time, since" },
	{ "repo", "add", ME_CMD_REPO_ADD, { "path" },
	  { { "--path", "path", "DIR", 0 }, { "--description", "description", "TEXT", 0 }, { 0 } },
	  out_repo_add, 0, NULL, 0, "repo add [--path] DIR [--description TEXT]",
	  "publish a git repository (with at least one commit); prints its did:repo" },
	{ "repo", "list", ME_CMD_REPO_LIST, { NULL }, { { 0 } }, out_repo_list, 0, NULL, 0,
	  "repo list", "list repositories: id, name, creator, state, last sync" },
	{ "repo", "show", ME_CMD_REPO_SHOW, { "repo_id" }, { { "--repo-id", "repo_id", "ID", 0 },
	  { 0 } }, out_repo_show, 0, NULL, 0, "repo show [--repo-id] ID",
	  "show one repository, its replication state and its refs" },
	{ "repo", "remove", ME_CMD_REPO_REMOVE, { "repo_id" },
	  { { "--repo-id", "repo_id", "ID", 0 }, { 0 } }, out_repo_remove, 0, NULL, 0,
	  "repo remove [--repo-id] ID", "stop publishing a repository (its files are kept)" },
	{ "repo", "sync", ME_CMD_REPO_SYNC, { "repo_id" },
	  { { "--repo-id", "repo_id", "ID", 0 }, PROGRESS_FLAG, { 0 } }, out_repo_sync, 0, NULL, 1,
	  "repo sync [--repo-id] ID [--progress]",
	  "fetch a repository learnt from a peer now; prints its state" },
	{ "repo", "clone", ME_CMD_REPO_CLONE, { "repo_id", "output" },
	  { { "--repo-id", "repo_id", "ID", 0 }, { "--output", "output", "DIR", 2 }, PROGRESS_FLAG,
	    { 0 } }, out_repo_clone, 0, run_clone, 1,
	  "repo clone [--repo-id] ID [--output] DIR [--progress]",
	  "fetch if needed, then make a git working copy in DIR (absent or empty)" },
	{ "repo", "pull", ME_CMD_REPO_PULL, { "repo_id" },
	  { { "--repo-id", "repo_id", "ID", 0 }, { "--path", "workdir", "DIR", 1 }, PROGRESS_FLAG,
	    { 0 } }, out_repo_pull, 0, run_pull, 1,
	  "repo pull [[--repo-id] ID] [--path DIR] [--progress]",
	  "fetch, then fast-forward the working copy DIR (default: the current one)" },
};
#define NCLI (sizeof(cli_cmds) / sizeof(cli_cmds[0]))

struct progress_view {
	int enabled, tty, shown;
	int64_t start_ms;
	uint64_t start_done;
};

struct opts {
	const char *root;
	const char *socket;
	int json;
	int timeout_s;
	int timeout_set;
	const struct cli_cmd *cc;
	const char *vals[MAX_FLAGS + 1]; /* by flag index; [MAX_FLAGS] unused */
	char path_abs[PATH_MAX];
	/* the connection, once open */
	int fd;
	char sockpath[PATH_MAX];
	uint32_t next_id;
	struct progress_view pv;
};

/* The value given for the flag whose arg name is arg (NULL when none; "" for a switch). */
static const char *opt_get(const struct opts *o, const char *arg)
{
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
		if (strcmp(o->cc->flags[f].arg, arg) == 0)
			return o->vals[f];
	return NULL;
}

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
		"  -t, --timeout SEC   give up when the daemon says nothing for SEC seconds\n"
		"                      (30; 600 for sync, clone and pull, whose progress\n"
		"                      reports count as something said)\n"
		"  -h, --help          show this help and exit\n"
		"  -V, --version       show the version and exit\n"
		"\n"
		"\n"
		"sync, clone and pull show a progress line on stderr when it is a terminal\n"
		"(--progress: also when it is not, one line per report).\n"
		"\n"
		"Exit status: 0 success, 1 the command failed (including a refused clone into a\n"
		"non-empty DIR and a pull that left a branch as is), 2 usage error,\n"
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
	const char *pos[MAX_POS];
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
			o->timeout_set = 1;
		} else if (a[0] == '-' && a[1] == '-' && a[2] != '\0' && nwords == 2 && o->cc) {
			int found = 0;
			for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
				if (match_opt(a, o->cc->flags[f].flag, 0, &inl)) {
					if (o->cc->flags[f].meta == NULL) {
						if (inl != NULL)
							return usage_error("%s takes no value",
									   o->cc->flags[f].flag);
						o->vals[f] = "";
						found = 1;
						break;
					}
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
			if (npos == MAX_POS || o->cc->positional[npos] == NULL)
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
	for (int p = 0; p < npos; p++) {
		for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
			if (strcmp(o->cc->flags[f].arg, o->cc->positional[p]) == 0) {
				if (o->vals[f] != NULL)
					return usage_error("%s given twice", o->cc->flags[f].flag);
				o->vals[f] = pos[p];
			}
		}
	}
	if (o->cc->fetches && !o->timeout_set)
		o->timeout_s = FETCH_TIMEOUT_S;
	/* Required arguments, per the shared command table (pull can read the id from the
	 * working copy). */
	const struct me_cmdinfo *ci = &me_cmds[o->cc->cmd];
	for (const struct me_argspec *s = ci->args; s->name; s++) {
		if (!s->required || o->cc->cmd == ME_CMD_REPO_PULL)
			continue;
		for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
			if (strcmp(o->cc->flags[f].arg, s->name) == 0 && o->vals[f] == NULL)
				return usage_error("'%s %s' needs %s", o->cc->group, o->cc->verb,
						   o->cc->flags[f].meta);
	}
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
		if (o->cc->flags[f].local == 2 && o->vals[f] == NULL)
			return usage_error("'%s %s' needs %s", o->cc->group, o->cc->verb,
					   o->cc->flags[f].meta);
	/* Paths are resolved here, where the user's working directory is. */
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++) {
		if (o->vals[f] && !o->cc->flags[f].local && strcmp(o->cc->flags[f].arg, "path") == 0) {
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
		n += o->vals[f] != NULL && !o->cc->flags[f].local;
	msgpack_pack_map(pk, (size_t)n);
	for (int f = 0; f < MAX_FLAGS && o->cc->flags[f].flag; f++)
		if (o->vals[f] && !o->cc->flags[f].local)
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

/* ---- progress ---- */

static void progress_show(struct opts *o, const msgpack_object *prog)
{
	struct progress_view *pv = &o->pv;
	const msgpack_object *d = me_mp_get(prog, "done"), *t = me_mp_get(prog, "total");
	char db[32], tb[32], rb[32], pct[16] = "";
	uint64_t done, total;

	if (!pv->enabled || d == NULL || d->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		return;
	done = d->via.u64;
	total = t != NULL && t->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? t->via.u64 : 0;
	int64_t now = me_mono_ms();
	if (!pv->shown) {
		pv->start_ms = now;
		pv->start_done = done;
	}
	double secs = (double)(now - pv->start_ms) / 1000.0;
	uint64_t rate = secs > 0.2 && done > pv->start_done
		? (uint64_t)((double)(done - pv->start_done) / secs) : 0;
	out_bytes(done, db, sizeof(db));
	out_bytes(total, tb, sizeof(tb));
	out_bytes(rate, rb, sizeof(rb));
	strncat(rb, "/s", sizeof(rb) - strlen(rb) - 1);
	if (total > 0)
		snprintf(pct, sizeof(pct), " (%llu%%)",
			 (unsigned long long)(done >= total ? 100 : done * 100 / total));
	fprintf(stderr, "%sfetching: %s of %s%s%s%s%s", pv->tty ? "\r" : "", db,
		total ? tb : "?", pct, rate ? ", " : "", rate ? rb : "", pv->tty ? "\033[K" : "\n");
	fflush(stderr);
	pv->shown = 1;
}

static void progress_end(struct opts *o)
{
	if (o->pv.shown && o->pv.tty)
		fputs("\r\033[K", stderr);
	o->pv.shown = 0;
}

/* ---- requests ---- */

/* Sends one request and reads frames until its final reply; progress frames are shown on
 * stderr. On success *result holds the result (caller decrefs) and EXIT_OK is returned; else
 * the error has been printed and the exit code is returned. */
static int call(struct opts *o, int cmd, void (*packer)(msgpack_packer *, void *), void *ud,
		json_t **result)
{
	struct me_frame_reader rd;
	msgpack_sbuffer sb;
	char buf[65536];
	uint32_t id = o->next_id++;
	int rc = EXIT_PROTO;

	*result = NULL;
	msgpack_sbuffer_init(&sb);
	if (me_request_pack(&sb, id, cmd, packer, ud) < 0) {
		msgpack_sbuffer_destroy(&sb);
		return usage_error("arguments too large");
	}
	/* A daemon that refuses this user sends its EPERM reply and hangs up without reading:
	 * the send then fails, and the reply is still there to read. */
	if (write_all(o->fd, sb.data, sb.size) < 0 && errno != EPIPE && errno != ECONNRESET) {
		fprintf(stderr, "mectl: cannot send to megaengined at %s: %s\n", o->sockpath,
			strerror(errno));
		msgpack_sbuffer_destroy(&sb);
		return EXIT_UNREACHABLE;
	}
	msgpack_sbuffer_destroy(&sb);

	me_frame_reader_init(&rd, ME_CTL_MAX_REPLY);
	for (;;) {
		const uint8_t *body;
		size_t len;
		int fr = me_frame_reader_next(&rd, &body, &len);
		if (fr < 0) {
			progress_end(o);
			fprintf(stderr, "mectl: bad frame from the daemon (%s)\n", me_strerror(fr));
			break;
		}
		if (fr == 1) {
			msgpack_zone zone;
			msgpack_object obj;
			msgpack_zone_init(&zone, 4096);
			if (me_mp_unpack(body, len, SIZE_MAX, &zone, &obj) < 0) {
				progress_end(o);
				fprintf(stderr, "mectl: malformed reply from the daemon\n");
				msgpack_zone_destroy(&zone);
				break;
			}
			const msgpack_object *kind = me_mp_get(&obj, "kind");
			const msgpack_object *rid = me_mp_get(&obj, "id");
			int mine = rid != NULL && rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
				   rid->via.u64 == id;
			int done = 1;
			if (me_mp_str_eq(kind, "error") &&
			    (mine || (rid != NULL && rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
				      rid->via.u64 == 0))) {
				const msgpack_object *e = me_mp_get(&obj, "error");
				json_t *je = e ? out_from_msgpack(e) : json_object();
				const char *m = json_string_value(json_object_get(je, "message"));
				const char *n = json_string_value(json_object_get(je, "name"));
				int code = (int)json_integer_value(json_object_get(je, "code"));
				progress_end(o);
				rc = print_error(o, code, n ? n : "EUNKNOWNERR", m ? m : "unknown error");
				if (code == ME_EPERM && !mine) {
					/* The daemon refused the connection itself. */
					permission_hint(o->sockpath);
					rc = EXIT_UNREACHABLE;
				}
				json_decref(je);
			} else if (!mine) {
				done = 0; /* not ours */
			} else if (me_mp_str_eq(kind, "progress")) {
				const msgpack_object *p = me_mp_get(&obj, "progress");
				if (p != NULL && p->type == MSGPACK_OBJECT_MAP)
					progress_show(o, p);
				done = 0;
			} else if (me_mp_str_eq(kind, "result")) {
				const msgpack_object *res = me_mp_get(&obj, "result");
				progress_end(o);
				*result = res ? out_from_msgpack(res) : json_null();
				rc = EXIT_OK;
			} else {
				progress_end(o);
				fprintf(stderr, "mectl: unexpected reply kind from the daemon\n");
			}
			msgpack_zone_destroy(&zone);
			if (done)
				break;
			continue;
		}
		struct pollfd pfd = { .fd = o->fd, .events = POLLIN };
		int pr = poll(&pfd, 1, o->timeout_s * 1000);
		if (pr == 0) {
			progress_end(o);
			fprintf(stderr, "mectl: no reply from megaengined at %s within %d s\n",
				o->sockpath, o->timeout_s);
			rc = EXIT_UNREACHABLE;
			break;
		}
		if (pr < 0 && errno == EINTR)
			continue;
		ssize_t n = read(o->fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			progress_end(o);
			fprintf(stderr, "mectl: megaengined closed the connection without replying\n");
			rc = EXIT_UNREACHABLE;
			break;
		}
		if ((fr = me_frame_reader_feed(&rd, buf, (size_t)n)) < 0) {
			progress_end(o);
			fprintf(stderr, "mectl: bad frame from the daemon (%s)\n", me_strerror(fr));
			break;
		}
	}
	me_frame_reader_free(&rd);
	return rc;
}

static void print_result(const struct opts *o, json_t *r)
{
	if (o->json)
		out_json(r);
	else
		o->cc->render(r);
}

/* ---- clone and pull: the daemon makes its copy fresh, mectl does the git work ---- */

struct kv_args {
	const char *k[3];
	const char *v[3];
	const char *ik; /* one integer argument (NULL: none) */
	int64_t iv;
};

static void pack_kv_args(msgpack_packer *pk, void *ud)
{
	const struct kv_args *a = ud;
	size_t n = 0;

	while (n < 3 && a->k[n])
		n++;
	msgpack_pack_map(pk, n + (a->ik != NULL));
	for (size_t i = 0; i < n; i++)
		me_mp_pack_kv_str(pk, a->k[i], a->v[i]);
	if (a->ik != NULL)
		me_mp_pack_kv_int(pk, a->ik, a->iv);
}

/* Reports the working copy to the daemon (repo.track), so `repo list` can tell when it falls
 * behind. A failure is a warning: the git work is done. */
static void track(struct opts *o, const char *id, const char *path, int64_t seq)
{
	struct kv_args a = { { "repo_id", "path" }, { id, path }, "seq", seq };
	json_t *r;
	int saved = o->json;

	o->json = 0; /* an error here goes to stderr only: stdout holds the command's result */
	if (call(o, ME_CMD_REPO_TRACK, pack_kv_args, &a, &r) == EXIT_OK)
		json_decref(r);
	else
		fprintf(stderr, "mectl: warning: the daemon did not record the working copy %s\n",
			path);
	o->json = saved;
}

static const char *jstr(json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

/* The reply's warning (a string, or null) for a json_pack "O". */
static json_t *jwarn(json_t *r)
{
	json_t *w = json_object_get(r, "warning");
	return json_is_string(w) ? w : json_null();
}

static int local_error(const struct opts *o, int code, const char *msg)
{
	return print_error(o, code, me_errname(code), msg);
}

/* An absolute form of p, which may not exist yet: realpath when it exists, else the current
 * directory joined with p, with "." and ".." components removed lexically. */
static int abs_path(const char *p, char *out, size_t sz)
{
	char buf[2 * PATH_MAX], cwd[PATH_MAX];
	char *parts[PATH_MAX / 2], *save = NULL, *tok;
	size_t n = 0, len = 0;

	if (realpath(p, out) != NULL)
		return 0;
	if (errno != ENOENT)
		return -1;
	if (p[0] == '/')
		snprintf(buf, sizeof(buf), "%s", p);
	else if (getcwd(cwd, sizeof(cwd)) == NULL)
		return -1;
	else
		snprintf(buf, sizeof(buf), "%s/%s", cwd, p);
	for (tok = strtok_r(buf, "/", &save); tok != NULL; tok = strtok_r(NULL, "/", &save)) {
		if (strcmp(tok, ".") == 0)
			continue;
		if (strcmp(tok, "..") == 0) {
			n -= n > 0;
			continue;
		}
		if (n == sizeof(parts) / sizeof(parts[0])) {
			errno = ENAMETOOLONG;
			return -1;
		}
		parts[n++] = tok;
	}
	if (n == 0) {
		errno = EINVAL;
		return -1;
	}
	out[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		size_t l = strlen(parts[i]);
		if (len + l + 2 > sz) {
			errno = ENAMETOOLONG;
			return -1;
		}
		out[len++] = '/';
		memcpy(out + len, parts[i], l + 1);
		len += l;
	}
	return 0;
}

static int run_clone(struct opts *o)
{
	const char *id = opt_get(o, "repo_id"), *out = opt_get(o, "output");
	char dir[PATH_MAX], err[1024];
	struct gw_clone_result cr;
	struct kv_args a = { { "repo_id" }, { id }, NULL, 0 };
	json_t *r, *res;
	int rc;

	if (*out == '\0')
		return usage_error("'repo clone' needs a non-empty DIR");
	if (abs_path(out, dir, sizeof(dir)) < 0) {
		snprintf(err, sizeof(err), "%s: %s", out, strerror(errno));
		return local_error(o, ME_EINVAL, err);
	}
	/* Refused before anything happens, so nothing is fetched or written for nothing. */
	if ((rc = gw_dir_usable(dir, err, sizeof(err))) < 0)
		return local_error(o, rc, err);
	if ((rc = call(o, ME_CMD_REPO_CLONE, pack_kv_args, &a, &r)) != EXIT_OK)
		return rc;
	const char *source = json_string_value(json_object_get(r, "source"));
	const char *head = json_string_value(json_object_get(r, "head"));
	const char *warn = json_string_value(json_object_get(r, "warning"));
	int64_t seq = json_integer_value(json_object_get(r, "seq"));
	if (source == NULL || *source == '\0') {
		json_decref(r);
		fprintf(stderr, "mectl: the daemon's reply names no source\n");
		return EXIT_PROTO;
	}
	if (warn != NULL)
		fprintf(stderr, "mectl: warning: %s\n", warn);
	if ((rc = gw_clone(source, dir, head ? head : "", id, &cr, err, sizeof(err))) < 0) {
		rc = local_error(o, rc, err);
		json_decref(r);
		return rc;
	}
	track(o, id, dir, seq);
	res = json_pack("{s:s,s:s,s:s,s:s,s:s,s:b,s:i,s:i,s:I,s:O}", "id", id, "name",
			jstr(r, "name"), "path", dir,
			"source", source, "branch", cr.branch, "head_guessed", cr.head_guessed,
			"branches", (int)cr.nbranches, "tags", (int)cr.ntags, "seq", (json_int_t)seq,
			"warning", jwarn(r));
	if (cr.head_guessed)
		json_object_set_new(res, "signed_head", json_string(head ? head : ""));
	print_result(o, res);
	json_decref(res);
	json_decref(r);
	return EXIT_OK;
}

static int run_pull(struct opts *o)
{
	const char *id = opt_get(o, "repo_id"), *path = opt_get(o, "workdir");
	char top[PATH_MAX], cfg_id[256], err[1024];
	struct gw_pull_result pr;
	json_t *r, *res, *branches, *refused;
	int rc;

	if ((rc = gw_find_workdir(path ? path : ".", top, sizeof(top), cfg_id, sizeof(cfg_id), err,
				  sizeof(err))) < 0)
		return local_error(o, rc, err);
	if (id == NULL) {
		if (cfg_id[0] == '\0')
			return usage_error("'repo pull' needs ID (--repo-id ID): %s was not made by "
					   "'mectl repo clone'", top);
		id = cfg_id;
	}
	struct kv_args a = { { "repo_id", "path" }, { id, top }, NULL, 0 };
	if ((rc = call(o, ME_CMD_REPO_PULL, pack_kv_args, &a, &r)) != EXIT_OK)
		return rc;
	const char *source = json_string_value(json_object_get(r, "source"));
	const char *warn = json_string_value(json_object_get(r, "warning"));
	int64_t seq = json_integer_value(json_object_get(r, "seq"));
	if (source == NULL || *source == '\0') {
		json_decref(r);
		fprintf(stderr, "mectl: the daemon's reply names no source\n");
		return EXIT_PROTO;
	}
	if (warn != NULL)
		fprintf(stderr, "mectl: warning: %s\n", warn);
	if ((rc = gw_pull(top, source, &pr, err, sizeof(err))) < 0) {
		rc = local_error(o, rc, err);
		json_decref(r);
		return rc;
	}
	if (pr.note[0] != '\0')
		fprintf(stderr, "mectl: note: %s\n", pr.note);
	branches = json_array();
	refused = json_array();
	int dirty = 0, diverged = 0;
	for (size_t i = 0; i < pr.n; i++) {
		const struct gw_branch *b = &pr.b[i];
		json_array_append_new(branches, json_pack("{s:s,s:s,s:s,s:s,s:b,s:s}", "name", b->name,
			"status", gw_status_name(b->st), "old", b->old_oid, "new", b->new_oid,
			"checked_out", b->checked_out, "message", b->msg));
		if (b->st == GW_DIRTY || b->st == GW_DIVERGED || b->st == GW_FAILED)
			json_array_append_new(refused, json_string(b->name));
		dirty |= b->st == GW_DIRTY || b->st == GW_FAILED;
		diverged |= b->st == GW_DIVERGED;
	}
	/* Only a working copy that has everything is recorded as being at seq. */
	if (pr.refused == 0)
		track(o, id, top, seq);
	res = json_pack("{s:s,s:s,s:s,s:I,s:o,s:o,s:i,s:b,s:O}", "id", id, "path", top, "source",
			source, "seq", (json_int_t)seq, "branches", branches, "refused", refused,
			"tags", (int)pr.tags, "tracked", pr.refused == 0,
			"warning", jwarn(r));
	if (pr.note[0] != '\0')
		json_object_set_new(res, "note", json_string(pr.note));
	json_object_set_new(res, "tags_kept", json_integer((json_int_t)pr.tags_kept));
	print_result(o, res);
	json_decref(res);
	json_decref(r);
	gw_pull_result_free(&pr);
	if (pr.refused > 0) {
		char msg[256];
		int code = dirty ? ME_EDIRTY : ME_EDIVERGED;
		snprintf(msg, sizeof(msg), "%zu branch%s left as is%s%s", pr.refused,
			 pr.refused == 1 ? "" : "es", dirty ? "; commit or stash your changes, then "
			 "pull again" : "", diverged ? "; merge or rebase diverged branches yourself"
			 : "");
		fprintf(stderr, "mectl: %s (%s)\n", msg, me_errname(code));
		return EXIT_CMD;
	}
	return EXIT_OK;
}

#if defined(__SANITIZE_ADDRESS__)
/* libgit2 1.5 with its pcre2 backend (Debian's) loses a pcre2 match data in its config-regexp
 * code on every remote created or looked up (git_clone, git_remote_lookup): not our leak, and
 * mectl is short-lived. Only allocations made inside pcre2 are suppressed (the stacks are cut
 * there: pcre2 has no frame pointers). */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libpcre2-8.so\n"; /* only libgit2 uses pcre2 here */
}

const char *__lsan_default_options(void);
const char *__lsan_default_options(void)
{
	return "print_suppressions=0";
}
#endif

int main(int argc, char **argv)
{
	struct opts o;
	int rc;

	rc = parse_args(argc, argv, &o);
	if (rc < 0)
		return EXIT_OK;
	if (rc > 0)
		return rc;
	if (resolve_socket(&o, o.sockpath, sizeof(o.sockpath)) < 0)
		return usage_error("cannot determine the control socket: use --socket or --root");

	if (connect_socket(o.sockpath, &o.fd) < 0) {
		int e = errno;
		if (o.cc->local_fallback && (e == ENOENT || e == ECONNREFUSED || e == ENAMETOOLONG ||
					  e == ENOTDIR))
			return local_auth(&o);
		fprintf(stderr, "mectl: cannot connect to megaengined at %s: %s\n", o.sockpath,
			strerror(e));
		if (e == ENOENT || e == ECONNREFUSED)
			fprintf(stderr, "Is the daemon running? Start it with 'megaengined%s%s' or "
				"'systemctl start megaengined'.\n", o.root ? " --root " : "",
				o.root ? o.root : "");
		else if (e == EACCES || e == EPERM)
			permission_hint(o.sockpath);
		return EXIT_UNREACHABLE;
	}
	o.next_id = (uint32_t)getpid();
	if (o.next_id == 0)
		o.next_id = 1;
	o.pv.tty = isatty(STDERR_FILENO);
	o.pv.enabled = o.cc->fetches && (o.pv.tty || opt_get(&o, "progress") != NULL);

	if (o.cc->run != NULL) {
		gw_init();
		rc = o.cc->run(&o);
		gw_shutdown();
	} else {
		json_t *r;
		rc = call(&o, o.cc->cmd, pack_args, &o, &r);
		if (rc == EXIT_OK) {
			print_result(&o, r);
			json_decref(r);
		}
	}
	close(o.fd);
	return rc;
}
