#include "daemon/control.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/log.h"
#include "common/proto.h"
#include "common/util.h"
#include "daemon/cmds.h"

#define READ_CHUNK 65536

struct wreq;

/* A request whose reply is deferred (see control.h). */
struct ctl_pending {
	struct conn *cn;
	uint32_t id;
	int cmd;
	ctl_cancel_fn cancel;
	void *ud;
	uint64_t done, total; /* newest progress not sent yet (when dirty) */
	int dirty;
	int64_t last_ms;      /* monotonic ms of the last progress frame sent */
	struct wreq *inflight; /* the progress frame queued and not yet written */
	struct ctl_pending *prev, *next;
};

struct conn {
	uv_pipe_t pipe;
	struct control *ctl;
	struct me_frame_reader rd;
	size_t pending_write;
	size_t acct; /* what this connection counts in control.buffered */
	int close_after_write;
	int closing;
	uid_t uid;
	pid_t pid;
	struct ctl_pending *deferred;
	size_t ndeferred;
	struct conn *prev, *next;
};

struct control {
	uv_loop_t *loop;
	uv_pipe_t server;
	struct node *node;
	char path[ME_SUN_PATH_MAX];
	int owns_path;
	struct statx path_id; /* the socket file we created, so we never unlink someone else's */
	int has_group;
	gid_t group;
	struct conn *conns;
	size_t nconns;
	size_t buffered; /* read buffers and unsent replies of all connections */
	uint64_t refused_log_ms; /* the "too many connections" line is rate-limited */
	uint64_t refused_suppressed;
	size_t ndeferred;
	uv_timer_t progress_timer; /* sends progress held back by the rate limit */
	int handles; /* open libuv handles, for the deferred free */
	int closing;
	char rbuf[READ_CHUNK];
};

struct wreq {
	uv_write_t req;
	struct conn *c;
	struct ctl_pending *progress_of; /* a progress frame of this request (NULL: other) */
	size_t len;
	char *data;
};

static void pending_release(struct ctl_pending *p)
{
	struct conn *cn = p->cn;

	if (p->prev)
		p->prev->next = p->next;
	else
		cn->deferred = p->next;
	if (p->next)
		p->next->prev = p->prev;
	cn->ndeferred--;
	cn->ctl->ndeferred--;
	if (p->inflight)
		p->inflight->progress_of = NULL;
	free(p);
}

/* The client is gone (or the control plane stops): tell every owner, then forget. */
static void conn_cancel_deferred(struct conn *cn)
{
	while (cn->deferred) {
		struct ctl_pending *p = cn->deferred;
		ctl_cancel_fn fn = p->cancel;
		void *ud = p->ud;

		log_debug("control: pid %ld: %s (id %u) cancelled: the client went away",
			  (long)cn->pid, me_cmds[p->cmd].name, p->id);
		pending_release(p);
		if (fn)
			fn(ud);
	}
}

static void control_maybe_release(struct control *c)
{
	if (c->closing && c->handles == 0)
		free(c);
}

static void conn_on_close(uv_handle_t *h)
{
	struct conn *cn = h->data;
	struct control *c = cn->ctl;

	/* Every write callback has run by now (libuv cancels pending writes before the close
	 * callback), so no wreq refers to a pending request any more. */
	conn_cancel_deferred(cn);
	me_frame_reader_free(&cn->rd);
	free(cn);
	c->handles--;
	control_maybe_release(c);
}

/* Re-counts what cn holds (its read buffer and its unsent replies) in the control-wide total,
 * which CONTROL_MAX_BUFFERED bounds. */
static void conn_account(struct conn *cn)
{
	size_t now = cn->closing ? 0 : cn->rd.cap + cn->pending_write;
	cn->ctl->buffered = cn->ctl->buffered - cn->acct + now;
	cn->acct = now;
}

static void conn_close(struct conn *cn)
{
	struct control *c = cn->ctl;

	if (cn->closing)
		return;
	cn->closing = 1;
	conn_account(cn);
	if (cn->prev)
		cn->prev->next = cn->next;
	else
		c->conns = cn->next;
	if (cn->next)
		cn->next->prev = cn->prev;
	c->nconns--;
	uv_close((uv_handle_t *)&cn->pipe, conn_on_close);
}

static void progress_flush(struct ctl_pending *p);
static void on_progress_timer(uv_timer_t *t);

static void on_write(uv_write_t *req, int status)
{
	struct wreq *w = (struct wreq *)req;
	struct conn *cn = w->c;
	struct ctl_pending *p = w->progress_of;

	cn->pending_write -= w->len;
	conn_account(cn);
	free(w->data);
	free(w);
	if (p != NULL)
		p->inflight = NULL;
	if (status < 0 || (cn->close_after_write && cn->pending_write == 0)) {
		conn_close(cn);
		return;
	}
	if (p != NULL && p->dirty)
		progress_flush(p);
}

/* Queues a frame; takes ownership of sb's data. Returns the write request (NULL when nothing
 * was queued; the connection may then be closing). */
static struct wreq *conn_send(struct conn *cn, msgpack_sbuffer *sb)
{
	if (cn->closing || sb->size == 0) {
		msgpack_sbuffer_destroy(sb);
		return NULL;
	}
	/* One reply of any size is fine; replies piling up unread are not. */
	if (cn->pending_write > 0 && (cn->pending_write + sb->size > CONTROL_MAX_PENDING_WRITE ||
				      cn->ctl->buffered + sb->size > CONTROL_MAX_BUFFERED)) {
		log_warn("control: client pid %ld does not read its replies (%zu bytes unsent); "
			 "disconnecting", (long)cn->pid, cn->pending_write);
		msgpack_sbuffer_destroy(sb);
		conn_close(cn);
		return NULL;
	}
	struct wreq *w = calloc(1, sizeof(*w));
	if (w == NULL) {
		msgpack_sbuffer_destroy(sb);
		conn_close(cn);
		return NULL;
	}
	w->c = cn;
	w->len = sb->size;
	/* An sbuffer holds at least 8 KiB: replies waiting to be read keep only their bytes. */
	if (sb->alloc - sb->size > 1024) {
		char *d = realloc(sb->data, sb->size);
		if (d != NULL) {
			sb->data = d;
			sb->alloc = sb->size;
		}
	}
	w->data = msgpack_sbuffer_release(sb);
	uv_buf_t buf = uv_buf_init(w->data, (unsigned)w->len);
	cn->pending_write += w->len;
	int rc = uv_write(&w->req, (uv_stream_t *)&cn->pipe, &buf, 1, on_write);
	if (rc < 0) {
		cn->pending_write -= w->len;
		free(w->data);
		free(w);
		conn_close(cn);
		return NULL;
	}
	conn_account(cn);
	return w;
}

static void send_error(struct conn *cn, uint32_t id, int code, const char *msg)
{
	msgpack_sbuffer sb;
	msgpack_sbuffer_init(&sb);
	if (me_reply_pack_error(&sb, id, code, msg) < 0) {
		msgpack_sbuffer_destroy(&sb);
		conn_close(cn);
		return;
	}
	conn_send(cn, &sb);
}

/* ---- deferred replies ---- */

struct ctl_pending *ctl_defer(struct cmd_ctx *ctx, ctl_cancel_fn cancel, void *ud)
{
	struct conn *cn = ctx->conn;
	struct ctl_pending *p;

	if (cn->ndeferred >= CONTROL_MAX_DEFERRED) {
		snprintf(ctx->err, ctx->errsz, "%d requests of this connection are already in "
			 "progress; wait for one to finish", CONTROL_MAX_DEFERRED);
		ctx->defer_error = ME_EBUSY;
		return NULL;
	}
	if ((p = calloc(1, sizeof(*p))) == NULL) {
		snprintf(ctx->err, ctx->errsz, "out of memory");
		ctx->defer_error = ME_ENOMEM;
		return NULL;
	}
	p->cn = cn;
	p->id = ctx->req_id;
	p->cmd = ctx->cmd;
	p->cancel = cancel;
	p->ud = ud;
	p->last_ms = me_mono_ms() - CONTROL_PROGRESS_MIN_MS;
	p->next = cn->deferred;
	if (cn->deferred)
		cn->deferred->prev = p;
	cn->deferred = p;
	cn->ndeferred++;
	cn->ctl->ndeferred++;
	return p;
}

static void arm_progress_timer(struct control *c)
{
	if (!c->closing && !uv_is_active((uv_handle_t *)&c->progress_timer))
		uv_timer_start(&c->progress_timer, on_progress_timer, CONTROL_PROGRESS_MIN_MS, 0);
}

/* Sends the held progress of p when allowed: nothing of it unsent and the interval over. */
static void progress_flush(struct ctl_pending *p)
{
	struct conn *cn = p->cn;
	msgpack_sbuffer body, sb;
	msgpack_packer pk;

	if (!p->dirty || p->inflight != NULL || cn->closing)
		return;
	int64_t now = me_mono_ms();
	if (now - p->last_ms < CONTROL_PROGRESS_MIN_MS) {
		arm_progress_timer(cn->ctl);
		return;
	}
	msgpack_sbuffer_init(&body);
	msgpack_packer_init(&pk, &body, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, 2);
	me_mp_pack_str(&pk, "done");
	msgpack_pack_uint64(&pk, p->done);
	me_mp_pack_str(&pk, "total");
	msgpack_pack_uint64(&pk, p->total);
	msgpack_sbuffer_init(&sb);
	int rc = me_reply_pack_result(&sb, p->id, "progress", body.data, body.size);
	msgpack_sbuffer_destroy(&body);
	p->dirty = 0;
	p->last_ms = now;
	if (rc < 0) {
		msgpack_sbuffer_destroy(&sb);
		return;
	}
	/* conn_send may close the connection; p stays valid until the close callback. */
	struct wreq *w = conn_send(cn, &sb);
	if (w != NULL) {
		w->progress_of = p;
		p->inflight = w;
	}
}

static void on_progress_timer(uv_timer_t *t)
{
	struct control *c = t->data;

	for (struct conn *cn = c->conns; cn != NULL; cn = cn->next)
		for (struct ctl_pending *p = cn->deferred; p != NULL; p = p->next)
			progress_flush(p);
}

void ctl_progress(struct ctl_pending *p, uint64_t done, uint64_t total)
{
	p->done = done;
	p->total = total;
	p->dirty = 1;
	progress_flush(p);
}

void ctl_finish(struct ctl_pending *p, int rc, const char *msg, ctl_result_fn fn, void *ud)
{
	struct conn *cn = p->cn;
	char err[512] = "";
	uint32_t id = p->id;
	int cmd = p->cmd;

	pending_release(p);
	if (cn->closing)
		return;
	if (rc >= 0) {
		msgpack_sbuffer result, sb;
		msgpack_packer pk;

		msgpack_sbuffer_init(&result);
		msgpack_packer_init(&pk, &result, msgpack_sbuffer_write);
		rc = fn ? fn(ud, &pk, err, sizeof(err)) : (msgpack_pack_nil(&pk), 0);
		msg = err[0] ? err : NULL;
		if (rc >= 0) {
			msgpack_sbuffer_init(&sb);
			if (me_reply_pack_result(&sb, id, "result", result.data, result.size) < 0) {
				msgpack_sbuffer_destroy(&sb);
				rc = ME_ETOOBIG;
				msg = "reply too large";
			} else {
				conn_send(cn, &sb);
			}
		}
		msgpack_sbuffer_destroy(&result);
	}
	log_debug("control: pid %ld: %s (id %u, deferred) -> %s", (long)cn->pid,
		  me_cmds[cmd].name, id, me_errname(rc < 0 ? rc : 0));
	if (rc < 0)
		send_error(cn, id, rc, msg);
}

size_t control_ndeferred(const struct control *c)
{
	return c ? c->ndeferred : 0;
}

/* A protocol violation that leaves the stream unusable: answer once, then hang up. */
static void fail_stream(struct conn *cn, int code, const char *msg)
{
	log_info("control: pid %ld: %s; closing connection", (long)cn->pid, msg);
	uv_read_stop((uv_stream_t *)&cn->pipe);
	cn->close_after_write = 1;
	send_error(cn, 0, code, msg);
	if (!cn->closing && cn->pending_write == 0)
		conn_close(cn);
}

static void handle_request(struct conn *cn, const uint8_t *body, size_t len)
{
	struct control *c = cn->ctl;
	msgpack_zone zone;
	msgpack_object obj;
	struct me_request req;
	const char *why;
	char err[512];

	if (!msgpack_zone_init(&zone, 2048)) {
		send_error(cn, 0, ME_ENOMEM, NULL);
		return;
	}
	int rc = me_mp_unpack(body, len, ME_MP_MAX_OBJECTS, &zone, &obj);
	if (rc < 0) {
		send_error(cn, 0, rc == ME_ETOOBIG ? ME_ETOOBIG : ME_EPROTO,
			   rc == ME_ETOOBIG ? "request too deeply nested or has too many objects"
					    : "request is not a single well-formed msgpack object");
		goto out;
	}
	rc = me_request_decode(&obj, &req, &why);
	if (rc < 0) {
		send_error(cn, req.id, rc, why);
		goto out;
	}

	msgpack_sbuffer result;
	msgpack_packer pk;
	msgpack_sbuffer_init(&result);
	msgpack_packer_init(&pk, &result, msgpack_sbuffer_write);
	err[0] = '\0';
	struct cmd_ctx ctx = { .node = c->node, .err = err, .errsz = sizeof(err),
			       .nconns = c->nconns, .conn = cn, .req_id = req.id, .cmd = req.cmd };
	rc = cmd_dispatch(&ctx, &req, &pk);
	log_debug("control: pid %ld: %s (id %u) -> %s", (long)cn->pid, me_cmds[req.cmd].name,
		  req.id, rc == CMD_DEFERRED ? "deferred" : me_errname(rc));
	if (rc == CMD_DEFERRED) {
		/* the reply comes from ctl_finish */
	} else if (rc < 0) {
		send_error(cn, req.id, rc, err[0] ? err : NULL);
	} else {
		msgpack_sbuffer sb;
		msgpack_sbuffer_init(&sb);
		if (me_reply_pack_result(&sb, req.id, "result", result.data, result.size) < 0) {
			msgpack_sbuffer_destroy(&sb);
			send_error(cn, req.id, ME_ETOOBIG, "reply too large");
		} else {
			conn_send(cn, &sb);
		}
	}
	msgpack_sbuffer_destroy(&result);
out:
	msgpack_zone_destroy(&zone);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct conn *cn = h->data;
	(void)suggested;
	*buf = uv_buf_init(cn->ctl->rbuf, sizeof(cn->ctl->rbuf));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
	struct conn *cn = s->data;

	if (nread < 0) {
		conn_close(cn);
		return;
	}
	if (nread == 0 || cn->closing)
		return;
	/* Frames that arrived before a bad header are still answered, then the stream fails. */
	int frc = me_frame_reader_feed(&cn->rd, buf->base, (size_t)nread);
	int rc;
	conn_account(cn);
	for (;;) {
		const uint8_t *body;
		size_t len;
		rc = me_frame_reader_next(&cn->rd, &body, &len);
		if (rc <= 0)
			break;
		handle_request(cn, body, len);
		if (cn->closing || cn->close_after_write)
			return;
	}
	/* An idle connection keeps no large buffer. */
	if (rc == 0 && me_frame_reader_pending(&cn->rd) == 0 && cn->rd.cap > 65536) {
		size_t max = cn->rd.max;
		me_frame_reader_free(&cn->rd);
		me_frame_reader_init(&cn->rd, max);
		conn_account(cn);
	}
	/* Partial frames of all connections together stay within the budget: the connection
	 * whose bytes go beyond it is dropped. */
	if (rc == 0 && frc == 0 && cn->ctl->buffered > CONTROL_MAX_BUFFERED) {
		log_warn("control: clients hold more than %u MiB of unfinished requests and unread "
			 "replies; dropping pid %ld (%zu bytes buffered)", CONTROL_MAX_BUFFERED >> 20,
			 (long)cn->pid, me_frame_reader_pending(&cn->rd));
		conn_close(cn);
		return;
	}
	if (rc == 0)
		rc = frc;
	if (rc < 0)
		fail_stream(cn, rc, rc == ME_ETOOBIG ? "frame length exceeds the 1 MiB limit"
			    : rc == ME_ENOMEM ? "out of memory" : "invalid frame length");
}

static int peer_allowed(struct control *c, uid_t uid, gid_t gid)
{
	if (uid == 0 || uid == geteuid())
		return 1;
	if (!c->has_group)
		return 0;
	if (gid == c->group)
		return 1;
	struct passwd pw, *pwp = NULL;
	char buf[4096];
	if (getpwuid_r(uid, &pw, buf, sizeof(buf), &pwp) != 0 || pwp == NULL)
		return 0;
	gid_t groups[256];
	int ng = 256;
	if (getgrouplist(pw.pw_name, pw.pw_gid, groups, &ng) < 0)
		return 0;
	for (int i = 0; i < ng; i++)
		if (groups[i] == c->group)
			return 1;
	return 0;
}

static void on_connection(uv_stream_t *server, int status)
{
	struct control *c = server->data;

	if (status < 0 || c->closing)
		return;
	struct conn *cn = calloc(1, sizeof(*cn));
	if (cn == NULL)
		return;
	cn->ctl = c;
	me_frame_reader_init(&cn->rd, ME_CTL_MAX_FRAME);
	uv_pipe_init(c->loop, &cn->pipe, 0);
	cn->pipe.data = cn;
	c->handles++;
	cn->next = c->conns;
	if (c->conns)
		c->conns->prev = cn;
	c->conns = cn;
	c->nconns++;
	if (uv_accept(server, (uv_stream_t *)&cn->pipe) < 0) {
		conn_close(cn);
		return;
	}
	if (c->nconns > CONTROL_MAX_CONNS) {
		/* At most one line every 10 s, however fast they come. */
		uint64_t now = uv_now(c->loop);
		if (c->refused_log_ms == 0 || now - c->refused_log_ms >= 10000) {
			log_warn("control: too many connections (%d); refusing new ones (%llu more "
				 "refused since the last report)", CONTROL_MAX_CONNS,
				 (unsigned long long)c->refused_suppressed);
			c->refused_log_ms = now;
			c->refused_suppressed = 0;
		} else {
			c->refused_suppressed++;
		}
		conn_close(cn);
		return;
	}
	uv_os_fd_t fd;
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	if (uv_fileno((uv_handle_t *)&cn->pipe, &fd) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
		conn_close(cn);
		return;
	}
	cn->uid = cred.uid;
	cn->pid = cred.pid;
	if (!peer_allowed(c, cred.uid, cred.gid)) {
		log_notice("control: refused uid %ld (pid %ld): not root, the daemon's user or in the "
			   "control group", (long)cred.uid, (long)cred.pid);
		cn->close_after_write = 1;
		char msg[256];
		snprintf(msg, sizeof(msg), "permission denied: the control socket is for root, the "
			 "daemon's user%s%s%s", c->has_group ? " and members of group '" : "",
			 c->has_group ? c->node->cfg->socket_group : "", c->has_group ? "'" : "");
		send_error(cn, 0, ME_EPERM, msg);
		return;
	}
	uv_read_start((uv_stream_t *)&cn->pipe, on_alloc, on_read);
}

/* Replaces a stale socket file, refuses to steal a live one. */
static int socket_path_prepare(const char *path, char *err, size_t errsz)
{
	struct stat st;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : ME_EIO;
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errsz, "%s exists and is not a socket; refusing to replace it", path);
		return ME_EEXIST;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return ME_EIO;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
	int live = connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0;
	close(fd);
	if (live) {
		snprintf(err, errsz, "another daemon is listening on %s", path);
		return ME_EBUSY;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		snprintf(err, errsz, "cannot remove stale socket %s: %s", path, strerror(errno));
		return ME_EIO;
	}
	return 0;
}

static int path_id(const char *path, struct statx *id)
{
	return statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_INO | STATX_BTIME, id);
}

/* Removes the socket file we created, unless it has been replaced since (e.g. by
 * megaengined.socket binding the same path): that one is not ours to remove. Inode numbers
 * are reused at once, so the birth time (where the file system keeps one) tells them apart. */
static void unlink_own_path(struct control *c)
{
	const struct statx *a = &c->path_id;
	struct statx b;

	if (!c->owns_path || path_id(c->path, &b) < 0 || a->stx_ino != b.stx_ino ||
	    a->stx_dev_major != b.stx_dev_major || a->stx_dev_minor != b.stx_dev_minor)
		return;
	if ((a->stx_mask & b.stx_mask & STATX_BTIME) &&
	    (a->stx_btime.tv_sec != b.stx_btime.tv_sec ||
	     a->stx_btime.tv_nsec != b.stx_btime.tv_nsec))
		return;
	unlink(c->path);
}

static void server_on_close(uv_handle_t *h)
{
	struct control *c = h->data;
	c->handles--;
	control_maybe_release(c);
}

static void control_close_handles(struct control *c)
{
	c->closing = 1;
	uv_close((uv_handle_t *)&c->progress_timer, server_on_close);
	uv_close((uv_handle_t *)&c->server, server_on_close);
}

int control_init(struct control **out, uv_loop_t *loop, struct node *node, int listen_fd,
		 char *err, size_t errsz)
{
	const struct me_config *cfg = node->cfg;
	int rc;

	*out = NULL;
	struct control *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return ME_ENOMEM;
	c->loop = loop;
	c->node = node;
	snprintf(c->path, sizeof(c->path), "%s", cfg->socket_path);
	if (cfg->socket_group[0] != '\0') {
		struct group gr, *grp = NULL;
		char buf[4096];
		if (getgrnam_r(cfg->socket_group, &gr, buf, sizeof(buf), &grp) != 0 || grp == NULL) {
			snprintf(err, errsz, "unknown group '%s' (--socket-group)", cfg->socket_group);
			free(c);
			return ME_EINVAL;
		}
		c->group = gr.gr_gid;
		c->has_group = 1;
	}

	uv_timer_init(loop, &c->progress_timer);
	c->progress_timer.data = c;
	uv_pipe_init(loop, &c->server, 0);
	c->server.data = c;
	c->handles = 2;
	if (listen_fd >= 0) {
		rc = uv_pipe_open(&c->server, listen_fd);
		if (rc < 0) {
			snprintf(err, errsz, "cannot use the activated control socket: %s",
				 uv_strerror(rc));
			goto fail;
		}
	} else {
		if ((rc = socket_path_prepare(c->path, err, errsz)) < 0)
			goto fail_me;
		/* Bound here, not with uv_pipe_bind: libuv would unlink the path when the handle
		 * closes, even after the file was replaced by someone else's socket. */
		struct sockaddr_un sun = { .sun_family = AF_UNIX };
		snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", c->path);
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		mode_t old = umask(0117);
		int brc = fd < 0 ? -1 : bind(fd, (struct sockaddr *)&sun, sizeof(sun));
		int berr = errno;
		umask(old);
		if (brc < 0 || (rc = uv_pipe_open(&c->server, fd)) < 0) {
			if (brc < 0)
				snprintf(err, errsz, "cannot bind control socket %s: %s", c->path,
					 strerror(berr));
			else
				snprintf(err, errsz, "cannot use control socket %s: %s", c->path,
					 uv_strerror(rc));
			if (brc == 0)
				unlink(c->path);
			if (fd >= 0)
				close(fd);
			goto fail;
		}
		/* chown only when the group is not already right: under the systemd unit the
		 * socket is born with the daemon's group, and chown is not in its syscall filter. */
		struct stat st;
		if (lstat(c->path, &st) < 0 || chmod(c->path, 0660) < 0 ||
		    (c->has_group && st.st_gid != c->group &&
		     chown(c->path, (uid_t)-1, c->group) < 0) ||
		    path_id(c->path, &c->path_id) < 0) {
			snprintf(err, errsz, "cannot set mode/group of %s: %s", c->path,
				 strerror(errno));
			unlink(c->path); /* just bound: ours */
			rc = -1;
			goto fail;
		}
		c->owns_path = 1;
	}
	rc = uv_listen((uv_stream_t *)&c->server, 128, on_connection);
	if (rc < 0) {
		snprintf(err, errsz, "cannot listen on %s: %s", c->path, uv_strerror(rc));
		goto fail;
	}
	*out = c;
	return 0;
fail:
	rc = ME_EIO;
fail_me:
	unlink_own_path(c);
	control_close_handles(c);
	return rc;
}

void control_free(struct control *c)
{
	if (c == NULL)
		return;
	c->closing = 1;
	/* Now, not from the close callbacks: the planes the requests wait on are freed next. */
	for (struct conn *cn = c->conns; cn != NULL; cn = cn->next)
		conn_cancel_deferred(cn);
	while (c->conns)
		conn_close(c->conns);
	unlink_own_path(c);
	control_close_handles(c);
}

size_t control_nconns(const struct control *c)
{
	return c ? c->nconns : 0;
}
