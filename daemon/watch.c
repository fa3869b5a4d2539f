#include "daemon/watch.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/gitrepo.h"
#include "daemon/refstate.h"
#include "daemon/store.h"

/* A check that finds packed-refs being rewritten tries again after WATCH_DEBOUNCE_MS, this many
 * times at most (a stale packed-refs.lock must not stop the watcher for good). */
#define WATCH_MAX_RETRIES 20
#define WATCH_MAX_DEPTH 32 /* of directories under refs/heads and refs/tags */

enum dir_kind {
	DIR_GIT,  /* a git directory: only HEAD, packed-refs and refs matter there */
	DIR_REFS, /* refs/ and the directories of branches and tags: everything matters */
};

struct wrepo;

struct wdir {
	uv_fs_event_t h; /* h.data = this */
	struct wrepo *r;
	struct wdir *next;
	char *path;
	const char *base; /* last component of path, within it */
	dev_t dev;
	ino_t ino;
	enum dir_kind kind;
};

struct wrepo {
	struct watch *w;
	struct wrepo *next;
	char *id;
	char *path;      /* the working repository, as stored */
	char *gitdir;    /* holds HEAD; NULL until found (again) */
	char *commondir; /* holds refs/ and packed-refs */
	struct wdir *dirs;
	int overflow;    /* some directories are not watched: poll fast */
	uv_timer_t debounce, poll; /* data = this */
	int nopen;       /* open handles: the memory goes with the last one after removal */
	int removed;
	int failing;     /* the last check failed */
	int64_t last_log_ms;
	int retries;
	uint64_t burst_ms; /* loop time of the first event the debounce timer waits after */
};

struct watch {
	uv_loop_t *loop;
	struct node *node;
	void (*changed)(void *ud, const char *repo_id);
	void *ud;
	struct wrepo *repos; /* watched; removed ones are unlinked at once */
	size_t nalive;       /* not yet freed, removed ones included */
	int closing;
};

/* Logs one line about repository r, with its REPO_ID= field. */
__attribute__((format(printf, 3, 4)))
static void rlog(int prio, const struct wrepo *r, const char *fmt, ...)
{
	char f[300], msg[1024];
	const char *fields[] = { f, NULL };
	va_list ap;

	snprintf(f, sizeof(f), "REPO_ID=%s", r->id);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	me_log_fields(prio, fields, "%s", msg);
}

/* ---- lifetime ---- */

static void repo_release(struct wrepo *r)
{
	struct watch *w = r->w;

	free(r->id);
	free(r->path);
	free(r->gitdir);
	free(r->commondir);
	free(r);
	if (--w->nalive == 0 && w->closing)
		free(w);
}

static void handle_closed(struct wrepo *r)
{
	if (--r->nopen == 0 && r->removed)
		repo_release(r);
}

static void on_timer_closed(uv_handle_t *h)
{
	handle_closed(h->data);
}

static void on_dir_closed(uv_handle_t *h)
{
	struct wdir *d = h->data;
	struct wrepo *r = d->r;

	free(d->path);
	free(d);
	handle_closed(r);
}

static void dir_close(struct wdir *d)
{
	uv_close((uv_handle_t *)&d->h, on_dir_closed);
}

static void dirs_close_all(struct wrepo *r)
{
	struct wdir *d, *next;

	for (d = r->dirs; d != NULL; d = next) {
		next = d->next;
		dir_close(d);
	}
	r->dirs = NULL;
}

/* Stops watching r: unlinks it and closes its handles (the last close frees it). */
static void repo_close(struct wrepo *r)
{
	struct wrepo **pp;

	if (r->removed)
		return;
	for (pp = &r->w->repos; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == r) {
			*pp = r->next;
			break;
		}
	}
	r->removed = 1;
	dirs_close_all(r);
	uv_close((uv_handle_t *)&r->debounce, on_timer_closed);
	uv_close((uv_handle_t *)&r->poll, on_timer_closed);
}

static struct wrepo *repo_find(struct watch *w, const char *id)
{
	for (struct wrepo *r = w->repos; r != NULL; r = r->next)
		if (strcmp(r->id, id) == 0)
			return r;
	return NULL;
}

/* ---- problems ---- */

/* Records a failed check (what failed, and why): logged when it starts failing, then at most
 * every WATCH_LOG_EVERY_MS. */
static int problem(struct wrepo *r, int rc, const char *what, const char *why)
{
	int64_t now = me_mono_ms();

	if (!r->failing || now - r->last_log_ms >= WATCH_LOG_EVERY_MS) {
		rlog(LOG_WARNING, r, "watch: %s %s: %s; its last ref state is kept", what, r->path,
		     why[0] ? why : me_strerror(rc));
		r->last_log_ms = now;
	}
	r->failing = 1;
	return rc;
}

static void recovered(struct wrepo *r)
{
	if (r->failing)
		rlog(LOG_NOTICE, r, "watch: %s is fine again", r->path);
	r->failing = 0;
}

/* ---- directories ---- */

struct want {
	char *path;
	dev_t dev;
	ino_t ino;
	enum dir_kind kind;
};

struct wants {
	struct want v[WATCH_MAX_DIRS];
	size_t n;
	int overflow;
};

static void wants_clear(struct wants *ws)
{
	for (size_t i = 0; i < ws->n; i++)
		free(ws->v[i].path);
	ws->n = 0;
}

/* Adds path when it is a directory (not a symbolic link). 1 when it was added. */
static int want_add(struct wants *ws, const char *path, enum dir_kind kind)
{
	struct stat sb;
	char *p;

	if (lstat(path, &sb) < 0 || !S_ISDIR(sb.st_mode))
		return 0;
	if (ws->n == WATCH_MAX_DIRS) {
		ws->overflow = 1;
		return 0;
	}
	if ((p = strdup(path)) == NULL) {
		ws->overflow = 1; /* out of memory: poll instead */
		return 0;
	}
	ws->v[ws->n++] = (struct want){ p, sb.st_dev, sb.st_ino, kind };
	return 1;
}

/* Adds dir and the directories below it. */
static void want_tree(struct wants *ws, const char *dir, int depth)
{
	char sub[PATH_MAX];
	struct dirent *de;
	DIR *d;

	if (!want_add(ws, dir, DIR_REFS))
		return;
	if (depth >= WATCH_MAX_DEPTH) {
		ws->overflow = 1;
		return;
	}
	if ((d = opendir(dir)) == NULL)
		return;
	while ((de = readdir(d)) != NULL && !ws->overflow) {
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (de->d_type != DT_DIR && de->d_type != DT_UNKNOWN)
			continue;
		int n = snprintf(sub, sizeof(sub), "%s/%s", dir, de->d_name);
		if (n < 0 || (size_t)n >= sizeof(sub))
			continue;
		want_tree(ws, sub, depth + 1); /* DT_UNKNOWN: want_add checks */
	}
	closedir(d);
}

static void on_fs_event(uv_fs_event_t *h, const char *filename, int events, int status);
static void on_debounce(uv_timer_t *t);
static void on_poll(uv_timer_t *t);

/* Starts watching one directory. 0 or a libuv error. */
static int dir_start(struct wrepo *r, const struct want *wt)
{
	struct wdir *d = calloc(1, sizeof(*d));
	const char *slash;
	int rc;

	if (d == NULL || (d->path = strdup(wt->path)) == NULL) {
		free(d);
		return UV_ENOMEM;
	}
	slash = strrchr(d->path, '/');
	d->base = slash != NULL ? slash + 1 : d->path;
	d->r = r;
	d->dev = wt->dev;
	d->ino = wt->ino;
	d->kind = wt->kind;
	if ((rc = uv_fs_event_init(r->w->loop, &d->h)) < 0) {
		free(d->path);
		free(d);
		return rc;
	}
	d->h.data = d;
	r->nopen++;
	if ((rc = uv_fs_event_start(&d->h, on_fs_event, d->path, 0)) < 0) {
		dir_close(d);
		return rc;
	}
	d->next = r->dirs;
	r->dirs = d;
	return 0;
}

/* Brings the watched directories in line with what is on disk: new ones are added, vanished or
 * replaced ones (another inode at the same path) closed. */
static void dirs_rescan(struct wrepo *r)
{
	struct wants ws;
	char p[PATH_MAX];
	struct wdir **pp, *d;
	int overflow, rc;

	ws.n = 0;
	ws.overflow = 0;
	want_add(&ws, r->gitdir, DIR_GIT);
	if (strcmp(r->commondir, r->gitdir) != 0)
		want_add(&ws, r->commondir, DIR_GIT);
	if ((size_t)snprintf(p, sizeof(p), "%s/refs", r->commondir) < sizeof(p) &&
	    want_add(&ws, p, DIR_REFS)) {
		snprintf(p, sizeof(p), "%s/refs/heads", r->commondir);
		want_tree(&ws, p, 0);
		snprintf(p, sizeof(p), "%s/refs/tags", r->commondir);
		want_tree(&ws, p, 0);
	}

	/* Keep the watchers that are still wanted (taking them off the list), close the rest. */
	for (pp = &r->dirs; (d = *pp) != NULL;) {
		size_t i;
		for (i = 0; i < ws.n; i++)
			if (ws.v[i].path != NULL && strcmp(ws.v[i].path, d->path) == 0 &&
			    ws.v[i].dev == d->dev && ws.v[i].ino == d->ino && ws.v[i].kind == d->kind)
				break;
		if (i < ws.n) {
			free(ws.v[i].path);
			ws.v[i].path = NULL; /* watched already */
			pp = &d->next;
		} else {
			*pp = d->next;
			dir_close(d);
		}
	}
	if (ws.overflow && !r->overflow)
		rlog(LOG_INFO, r, "watch: more than %d directories of refs in %s; polling every %d ms",
		     WATCH_MAX_DIRS, r->commondir, WATCH_FAST_POLL_MS);
	overflow = ws.overflow;
	for (size_t i = 0; i < ws.n; i++) {
		if (ws.v[i].path == NULL)
			continue;
		if ((rc = dir_start(r, &ws.v[i])) < 0) {
			if (!overflow && !r->overflow)
				rlog(LOG_INFO, r, "watch: cannot watch %s (%s); polling every %d ms",
				     ws.v[i].path, uv_strerror(rc), WATCH_FAST_POLL_MS);
			overflow = 1;
		}
	}
	wants_clear(&ws);
	if (overflow != r->overflow) {
		unsigned every = overflow ? WATCH_FAST_POLL_MS : WATCH_POLL_MS;
		r->overflow = overflow;
		uv_timer_start(&r->poll, on_poll, every, every);
	}
}

/* ---- checking ---- */

/* What can be seen of packed-refs, to notice it being rewritten while the refs are read. */
struct packed {
	int exists, locked;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime;
};

static void packed_get(const struct wrepo *r, struct packed *pk)
{
	char p[PATH_MAX];
	struct stat sb;

	memset(pk, 0, sizeof(*pk));
	if ((size_t)snprintf(p, sizeof(p), "%s/packed-refs", r->commondir) >= sizeof(p) - 5)
		return;
	if (stat(p, &sb) == 0) {
		pk->exists = 1;
		pk->dev = sb.st_dev;
		pk->ino = sb.st_ino;
		pk->size = sb.st_size;
		pk->mtime = sb.st_mtim;
	}
	strcat(p, ".lock");
	pk->locked = access(p, F_OK) == 0;
}

static int packed_busy(const struct packed *a, const struct packed *b)
{
	return a->locked || b->locked || a->exists != b->exists || a->dev != b->dev ||
	       a->ino != b->ino || a->size != b->size || a->mtime.tv_sec != b->mtime.tv_sec ||
	       a->mtime.tv_nsec != b->mtime.tv_nsec;
}

/* Leaves out the refs a ref state cannot carry (names git allows but the protocol does not, or
 * an oid that is not SHA-1). */
static size_t refs_announceable(const struct wrepo *r, struct store_ref *refs, size_t n)
{
	uint8_t oid[ME_OID_LEN];
	size_t k = 0;

	for (size_t i = 0; i < n; i++) {
		if (gmsg_refname_valid(refs[i].name, strlen(refs[i].name)) &&
		    refstate_oid(refs[i].oid, oid) == 0) {
			refs[k++] = refs[i];
			continue;
		}
		rlog(LOG_DEBUG, r, "watch: %s is left out of the ref state", refs[i].name);
		free(refs[i].name);
		free(refs[i].oid);
	}
	return k;
}

static int refs_same(const struct store_ref *a, size_t na, const struct store_ref *b, size_t nb)
{
	if (na != nb)
		return 0;
	for (size_t i = 0; i < na; i++)
		if (strcmp(a[i].name, b[i].name) != 0 || strcmp(a[i].oid, b[i].oid) != 0)
			return 0;
	return 1;
}

/* Signs head and refs as the next ref state of r and stores it. */
static int sign_store(struct wrepo *r, const struct store_repo *sr, const char *head,
		      const struct store_ref *refs, size_t n, int64_t *seq_out)
{
	int64_t now = me_now_ms(), seq = sr->ref_seq + 1 > now ? sr->ref_seq + 1 : now;

	*seq_out = seq;
	return refstate_sign_store(r->w->node, r->id, seq, head, refs, n, NULL);
}

/* Compares what the working repository holds with the stored state and signs a new one when
 * they differ. 1, 0 or < 0 (message in err). */
static int compare_sign(struct wrepo *r, const char *head, const struct store_ref *refs,
			size_t n, char *err, size_t errsz)
{
	struct store *st = r->w->node->store;
	struct store_repo sr;
	struct store_ref *old = NULL;
	size_t nold = 0;
	int64_t seq = 0;
	int rc;

	if ((rc = store_repo_get(st, r->id, &sr)) == 0 && sr.is_external) {
		store_repo_clear(&sr);
		rc = ME_ENOTFOUND;
	}
	if (rc == ME_ENOTFOUND) {
		rlog(LOG_DEBUG, r, "watch: no longer a local repository; not watched any more");
		repo_close(r);
		return rc;
	}
	if (rc < 0) {
		snprintf(err, errsz, "database: %s", store_errmsg(st));
		return rc;
	}
	if ((rc = store_refs_get(st, r->id, &old, &nold)) < 0) {
		snprintf(err, errsz, "database: %s", store_errmsg(st));
	} else if (strcmp(sr.head, head) == 0 && refs_same(old, nold, refs, n)) {
		rc = 0;
	} else if ((rc = sign_store(r, &sr, head, refs, n, &seq)) < 0) {
		snprintf(err, errsz, "%s", rc == ME_EDB ? store_errmsg(st) : me_strerror(rc));
	} else {
		rlog(LOG_INFO, r, "watch: new ref state %lld of %s: %zu refs, HEAD %s",
		     (long long)seq, r->path, n, head[0] ? head : "detached");
		rc = 1;
	}
	store_refs_free(old, nold);
	store_repo_clear(&sr);
	return rc;
}

/* Checks r once WATCH_DEBOUNCE_MS pass without events, but no later than
 * WATCH_DEBOUNCE_MAX_MS after the first one (a long rebase moves HEAD all the time). */
static void schedule(struct wrepo *r)
{
	uint64_t now = uv_now(r->w->loop);

	if (r->removed)
		return;
	if (!uv_is_active((uv_handle_t *)&r->debounce))
		r->burst_ms = now;
	else if (now - r->burst_ms >= WATCH_DEBOUNCE_MAX_MS)
		return;
	uv_timer_start(&r->debounce, on_debounce, WATCH_DEBOUNCE_MS, 0);
}

/* Checks r now. r may be closed when this returns (repo_close: its memory stays until the
 * loop runs the close callbacks). */
static int check(struct wrepo *r)
{
	struct watch *w = r->w;
	struct store_ref *refs = NULL;
	struct packed before, after;
	char err[512] = "", *head = NULL;
	size_t n = 0;
	int rc;

	if (r->removed || w->closing)
		return ME_ENOTFOUND;
	if (r->gitdir == NULL) {
		if ((rc = gitrepo_dirs(r->path, &r->gitdir, &r->commondir, err, sizeof(err))) < 0)
			return problem(r, rc, "cannot read the working repository", err);
	}
	dirs_rescan(r);
	packed_get(r, &before);
	if ((rc = gitrepo_read_refs(r->path, &head, &refs, &n, err, sizeof(err))) < 0) {
		/* Gone or broken: find it again from scratch next time. */
		dirs_close_all(r);
		free(r->gitdir);
		free(r->commondir);
		r->gitdir = r->commondir = NULL;
		return problem(r, rc, "cannot read the working repository", err);
	}
	packed_get(r, &after);
	if (packed_busy(&before, &after) && r->retries < WATCH_MAX_RETRIES) {
		/* git is rewriting packed-refs (pack-refs, a deletion): what was read may be half
		 * of the old and half of the new state. */
		r->retries++;
		schedule(r);
		free(head);
		store_refs_free(refs, n);
		return 0;
	}
	r->retries = 0;
	n = refs_announceable(r, refs, n);
	if (n > GMSG_MAX_REFS) {
		snprintf(err, sizeof(err), "%zu branches and tags, a ref state holds at most %d", n,
			 GMSG_MAX_REFS);
		rc = ME_ETOOBIG;
	} else {
		/* A HEAD that a ref state cannot name is announced as detached. */
		rc = compare_sign(r, gmsg_refname_valid(head, strlen(head)) ? head : "", refs, n, err,
				  sizeof(err));
	}
	free(head);
	store_refs_free(refs, n);
	if (rc == ME_ENOTFOUND)
		return rc;
	if (rc < 0)
		return problem(r, rc, "cannot record a new ref state of", err);
	recovered(r);
	if (rc == 1 && w->changed != NULL)
		w->changed(w->ud, r->id);
	return rc;
}

static void on_debounce(uv_timer_t *t)
{
	check(t->data);
}

static void on_poll(uv_timer_t *t)
{
	check(t->data);
}

/* In a git directory only HEAD, packed-refs, refs/ and the directory itself matter (not the
 * index, objects, logs or FETCH_HEAD). */
static int git_event_matters(const struct wdir *d, const char *name)
{
	static const char *const names[] = { "HEAD", "HEAD.lock", "packed-refs",
					     "packed-refs.lock", "refs" };

	if (name == NULL || strcmp(name, d->base) == 0)
		return 1;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return 0;
}

static void on_fs_event(uv_fs_event_t *h, const char *filename, int events, int status)
{
	struct wdir *d = h->data;
	(void)events;

	if (d->r->removed)
		return;
	if (status == 0 && d->kind == DIR_GIT && !git_event_matters(d, filename))
		return;
	schedule(d->r);
}

/* ---- interface ---- */

int watch_init(struct watch **out, uv_loop_t *loop, struct node *node,
	       void (*changed)(void *ud, const char *repo_id), void *ud, char *err, size_t errsz)
{
	struct watch *w;

	if (out == NULL || loop == NULL || node == NULL || node->store == NULL) {
		if (err != NULL && errsz > 0)
			snprintf(err, errsz, "watch: bad arguments");
		return ME_EINVAL;
	}
	if ((w = calloc(1, sizeof(*w))) == NULL) {
		if (err != NULL && errsz > 0)
			snprintf(err, errsz, "watch: out of memory");
		return ME_ENOMEM;
	}
	w->loop = loop;
	w->node = node;
	w->changed = changed;
	w->ud = ud;
	*out = w;
	return 0;
}

void watch_free(struct watch *w)
{
	if (w == NULL || w->closing)
		return;
	while (w->repos != NULL)
		repo_close(w->repos);
	w->closing = 1;
	if (w->nalive == 0)
		free(w);
}

int watch_add(struct watch *w, const char *repo_id, const char *path)
{
	struct wrepo *r;
	int rc;

	if (w == NULL || w->closing || repo_id == NULL || repo_id[0] == '\0' || path == NULL ||
	    path[0] == '\0')
		return ME_EINVAL;
	if ((r = repo_find(w, repo_id)) != NULL) {
		if (strcmp(r->path, path) == 0)
			return check(r) == ME_ENOTFOUND ? ME_ENOTFOUND : 0;
		repo_close(r); /* moved: start again */
	}
	if ((r = calloc(1, sizeof(*r))) == NULL)
		return ME_ENOMEM;
	r->w = w;
	if ((r->id = strdup(repo_id)) == NULL || (r->path = strdup(path)) == NULL) {
		free(r->id);
		free(r);
		return ME_ENOMEM;
	}
	uv_timer_init(w->loop, &r->debounce);
	uv_timer_init(w->loop, &r->poll);
	r->debounce.data = r->poll.data = r;
	r->nopen = 2;
	w->nalive++;
	r->next = w->repos;
	w->repos = r;
	uv_timer_start(&r->poll, on_poll, WATCH_POLL_MS, WATCH_POLL_MS);
	rc = check(r);
	return rc == ME_ENOTFOUND ? rc : 0;
}

void watch_remove(struct watch *w, const char *repo_id)
{
	struct wrepo *r;

	if (w != NULL && repo_id != NULL && (r = repo_find(w, repo_id)) != NULL)
		repo_close(r);
}

void watch_sync_all(struct watch *w)
{
	struct store_repo *repos;
	struct wrepo *r, *next;
	size_t n, i;
	int rc;

	if (w == NULL || w->closing)
		return;
	if ((rc = store_repo_list(w->node->store, &repos, &n)) < 0) {
		log_warn("watch: cannot list repositories: %s", store_errmsg(w->node->store));
		return;
	}
	for (r = w->repos; r != NULL; r = next) {
		next = r->next;
		for (i = 0; i < n; i++)
			if (!repos[i].is_external && strcmp(repos[i].id, r->id) == 0)
				break;
		if (i == n)
			repo_close(r);
	}
	for (i = 0; i < n; i++) {
		if (repos[i].is_external || repos[i].path[0] == '\0')
			continue;
		r = repo_find(w, repos[i].id);
		if (r != NULL && strcmp(r->path, repos[i].path) == 0)
			continue;
		if ((rc = watch_add(w, repos[i].id, repos[i].path)) < 0 && rc != ME_ENOTFOUND)
			log_warn("watch: cannot watch %s: %s", repos[i].path, me_strerror(rc));
	}
	store_repo_list_free(repos, n);
}

int watch_refresh(struct watch *w, const char *repo_id)
{
	struct wrepo *r;

	if (w == NULL || repo_id == NULL)
		return ME_EINVAL;
	if ((r = repo_find(w, repo_id)) == NULL)
		return ME_ENOTFOUND;
	return check(r);
}
