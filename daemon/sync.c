#include "daemon/sync.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>
#include <git2.h>
#include <sodium.h>

#include "common/err.h"
#include "common/gossip_msg.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/sha3.h"
#include "common/util.h"
#include "daemon/gitutil.h"
#include "daemon/gossip.h"
#include "daemon/mirror.h"
#include "daemon/refstate.h"
#include "daemon/verify.h"

#define TICK_MS 1000
#define HOLDER_TTL_MS (10 * 60 * 1000)  /* a holder not heard from for this long is forgotten */
#define WAIT_HOLDER_MS 15000            /* a waiter with no holder in sight gives up */
#define DIAL_WAIT_MS 10000              /* a holder we dialed must be up by then */
#define RETRY_MS 30000                  /* after every holder failed, wait before a new round */
#define MAX_TRIED 16
#define MAX_REFUTED 8
#define SLOW_WINDOW_MS 30000          /* a transfer must move SLOW_MIN_BYTES in this long */
#define SLOW_MIN_BYTES (64u * 1024)
#define PUMP_BYTES (1u << 20)           /* queued transfer data the server keeps ahead */
#define CACHE_MAX_ENTRIES 16
#define CACHE_MAX_BYTES (4ull << 30)
#define ERRSZ 200

struct holder {
	uint8_t pk[ME_PK_LEN];
	int64_t seq;
	int64_t seen_ms;
	struct holder *next;
};

/* A ref state with memory of its own (the decoded one borrows a frame). */
struct rs_copy {
	struct gmsg_refstate rs;
	char *mem;
};

struct sync_waiter {
	struct srepo *r;
	struct sync_waiter_cb cb;
	int64_t since_ms;
	struct sync_waiter *next;
};

struct fetch;
struct serve;

/* One bundle of a repository's series (see "series" below). */
struct seg {
	int64_t seq;
	uint64_t size;
	uint8_t digest[XMSG_DIGEST_LEN];
	uint8_t creator_pk[ME_PK_LEN];
	struct rs_copy rs;
	struct xmsg_parts parts; /* where its pack can be cut, as announced */
	char path[PATH_MAX];
	uint8_t (*tips)[ME_OID_LEN]; /* distinct ref targets, sorted: matched against haves */
	size_t ntips;
	int users; /* serves that will still send it */
	int dead;  /* out of the series: destroyed when the last user goes */
	int unlink_files;
	struct seg *next;
};

struct series {
	struct seg *head, *tail;
	size_t n;
	int loaded;
	int building;
	struct serve *waiting; /* serves waiting for a build */
};

struct srepo {
	char id[ME_DID_REPO_SIZE];
	struct holder *holders;
	struct fetch *fetch;
	int want; /* fetch when behind */
	struct sync_waiter *waiters;
	char error[ERRSZ];
	int64_t retry_at_ms;
	uint8_t tried[MAX_TRIED][ME_PK_LEN]; /* holders that failed in this round */
	size_t ntried;
	uint8_t dialing[ME_PK_LEN];
	int64_t dial_since_ms; /* 0: not waiting for a dial */
	/* the partial bundle in $ROOT/tmp, for a resume */
	int has_part;
	char part_path[PATH_MAX];
	uint8_t part_digest[XMSG_DIGEST_LEN];
	uint64_t part_size;
	int jobs;          /* verifications running on its mirror */
	uint8_t refuted[MAX_REFUTED][ME_PK_LEN]; /* keys proven not to be its creator */
	size_t nrefuted;
	struct series se;  /* what we serve it from */
	struct srepo *next;
};

enum fphase { F_REQUEST, F_DATA, F_IDLE /* between bundles */ };

struct segrx;

struct fetch {
	struct sync *s;
	struct srepo *r;
	struct net_xfer *x;
	uint8_t peer[ME_PK_LEN];
	char peer_did[ME_DID_KEY_SIZE];
	enum fphase phase;
	/* the bundle being received */
	int fd;
	char path[PATH_MAX];
	struct me_sha3 *h;
	uint64_t total, pos, offset;
	uint8_t digest[XMSG_DIGEST_LEN];
	struct rs_copy rs;
	uint8_t creator_pk[ME_PK_LEN];
	struct xmsg_parts parts;
	int64_t last_seq;    /* state of the last bundle announced (the mirror's at first) */
	int64_t applied_seq; /* the mirror's state after the last bundle applied */
	int base_unknown;    /* the mirror's refs are not those of applied_seq (see fetch_begin) */
	int npieces;         /* bundles received */
	int skipping;        /* reading past a bundle of a state the mirror has (no file) */
	int nskipped;
	uint64_t bytes_done, bytes_total;
	struct segrx *queue; /* to verify in order (the last one may still be arriving) */
	struct segrx *verifying;
	struct segrx *cur;   /* the one arriving, in queue or verifying */
	int ended; /* the server finished its side after a Done */
	int64_t last_rx_ms;
	int64_t begun_ms;      /* wall clock: when it was requested */
	int64_t window_ms;     /* start of the current rate window (monotonic) */
	uint64_t window_bytes; /* bytes_done at its start */
	int failed; /* a reason was recorded; the closing stream only cleans up */
	uint64_t max_bytes;
	char root[PATH_MAX];
};

enum cstate { C_BUILDING, C_READY, C_FAILED };

struct serve;

struct centry {
	uint8_t key[XMSG_DIGEST_LEN];
	char repo_id[ME_DID_REPO_SIZE];
	int64_t seq;
	char path[PATH_MAX];
	enum cstate state;
	uint64_t size;
	uint8_t digest[XMSG_DIGEST_LEN];
	struct xmsg_parts parts;
	int users;
	int stale; /* removed from the list: delete when the last user goes */
	int64_t last_used_ms;
	struct serve *waiting;
	/* build job */
	uv_work_t work;
	struct sync *s;
	char source[PATH_MAX];
	struct gmsg_ref *tips;
	size_t ntips;
	git_oid *haves;
	size_t nhaves;
	int rc;
	char err[ERRSZ];
	struct rs_copy rs;
	struct centry *next;
};

enum sphase { S_REQUEST, S_BUILDING, S_SENDING, S_FINISHED };

struct serve {
	struct sync *s;
	struct net_xfer *x;
	uint8_t peer[ME_PK_LEN];
	char peer_did[ME_DID_KEY_SIZE];
	enum sphase phase;
	struct centry *ce;
	int fd;
	uint64_t pos;
	int has_resume;
	uint8_t resume_digest[XMSG_DIGEST_LEN];
	uint64_t resume_offset;
	uint8_t creator_pk[ME_PK_LEN];
	struct rs_copy rs;
	char repo_id[ME_DID_REPO_SIZE];
	char source[PATH_MAX];
	uint8_t (*haves)[ME_OID_LEN]; /* sorted, distinct */
	size_t nhaves;
	struct seg *seg, *last; /* series bundles still to send (each referenced) */
	int npieces;            /* bundles sent */
	int64_t active_ms; /* monotonic: accepted, or the last time data moved */
	size_t queued;     /* bytes queued at the last look */
	struct serve *next_waiting;
	struct serve *prev, *next;
};

struct sync {
	uv_loop_t *loop;
	struct node *node;
	struct net *net;
	uv_timer_t tick;
	uv_timer_t kick;
	int handles;
	int jobs;
	int closing;
	int64_t next_sweep_ms;
	struct srepo *repos;
	size_t nfetches;
	struct serve *serves;
	size_t nserves;
	struct centry *cache;
	char tmpdir[PATH_MAX];
	char cachedir[PATH_MAX];
	char seriesdir[PATH_MAX];
	struct sync_stats stats;
};

static const struct net_xfer_callbacks fetch_cb, serve_cb, null_cb;

static void schedule(struct sync *s);
static void fetch_end(struct fetch *f, int rc, const char *why);

/* ---- small helpers ---- */

/* snprintf for messages and paths whose length is checked elsewhere: a message may be cut. */
__attribute__((format(printf, 3, 4))) static int fmt(char *buf, size_t sz, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	int n = vsnprintf(buf, sz, f, ap);
	va_end(ap);
	return n < 0 || (size_t)n >= sz ? ME_ETOOBIG : 0;
}

static void on_kick(uv_timer_t *t)
{
	schedule(t->data);
}

static void kick(struct sync *s)
{
	if (!s->closing)
		uv_timer_start(&s->kick, on_kick, 0, 0);
}

static void rs_copy_free(struct rs_copy *c)
{
	free(c->rs.refs);
	free(c->mem);
	memset(c, 0, sizeof(*c));
}

static int rs_copy_set(struct rs_copy *c, const struct gmsg_refstate *rs)
{
	size_t need = rs->repo_id.len + rs->head.len + 2;
	for (size_t i = 0; i < rs->nrefs; i++)
		need += rs->refs[i].name.len + 1;
	rs_copy_free(c);
	c->mem = malloc(need);
	c->rs.refs = calloc(rs->nrefs ? rs->nrefs : 1, sizeof(*c->rs.refs));
	if (c->mem == NULL || c->rs.refs == NULL) {
		rs_copy_free(c);
		return ME_ENOMEM;
	}
	char *p = c->mem;
#define COPY_STR(dst, src)                                             \
	do {                                                           \
		if ((src).len > 0)                                     \
			memcpy(p, (src).ptr, (src).len);               \
		p[(src).len] = '\0';                                   \
		(dst) = (struct gmsg_str){ p, (src).len };             \
		p += (src).len + 1;                                    \
	} while (0)
	COPY_STR(c->rs.repo_id, rs->repo_id);
	COPY_STR(c->rs.head, rs->head);
	for (size_t i = 0; i < rs->nrefs; i++) {
		COPY_STR(c->rs.refs[i].name, rs->refs[i].name);
		memcpy(c->rs.refs[i].oid, rs->refs[i].oid, ME_OID_LEN);
	}
#undef COPY_STR
	c->rs.nrefs = rs->nrefs;
	c->rs.seq = rs->seq;
	memcpy(c->rs.sig, rs->sig, ME_SIG_LEN);
	return 0;
}

/* The signed ref state stored for a repository, as a self-contained copy. */
static int rs_from_store(struct sync *s, const struct store_repo *r, struct rs_copy *out)
{
	struct store_ref *refs;
	size_t n;
	int rc;

	if (!r->has_ref_sig || r->ref_seq <= 0)
		return ME_ENOTFOUND;
	if ((rc = store_refs_get(s->node->store, r->id, &refs, &n)) < 0)
		return rc;
	struct gmsg_refstate rs = { .repo_id = gmsg_str(r->id), .seq = (uint64_t)r->ref_seq,
				    .head = gmsg_str(r->head) };
	if ((rc = refstate_from_refs(&rs, refs, n)) == 0) {
		memcpy(rs.sig, r->ref_sig, ME_SIG_LEN);
		rc = rs_copy_set(out, &rs);
	}
	free(rs.refs);
	store_refs_free(refs, n);
	return rc;
}

static int send_frame(struct net_xfer *x, msgpack_sbuffer *sb)
{
	int rc = net_xfer_send(x, sb->data, sb->size);
	sb->size = 0;
	return rc;
}

static const char *b58_part(const char *repo_id)
{
	return repo_id + strlen("did:repo:");
}

static int mkdir_0700(const char *path)
{
	if (mkdir(path, 0700) < 0 && errno != EEXIST)
		return ME_EIO;
	return 0;
}

/* Removes every regular file in dir (temporary files of a previous run). */
static void empty_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;

	if (d == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		if (unlinkat(dirfd(d), de->d_name, 0) < 0 && errno != ENOENT)
			log_warn("sync: cannot remove %s/%s: %s", dir, de->d_name, strerror(errno));
	}
	closedir(d);
}

/* ---- repositories and holders ---- */

static struct srepo *srepo_find(struct sync *s, const char *id)
{
	for (struct srepo *r = s->repos; r; r = r->next)
		if (strcmp(r->id, id) == 0)
			return r;
	return NULL;
}

static struct srepo *srepo_get(struct sync *s, const char *id)
{
	struct srepo *r = srepo_find(s, id);
	if (r != NULL)
		return r;
	if (strlen(id) >= sizeof(r->id) || (r = calloc(1, sizeof(*r))) == NULL)
		return NULL;
	fmt(r->id, sizeof(r->id), "%s", id);
	r->next = s->repos;
	s->repos = r;
	return r;
}

/* Forgets the partial bundle kept for a resume. */
static void part_drop(struct sync *s, struct srepo *r)
{
	(void)s;
	if (r->has_part && unlink(r->part_path) < 0 && errno != ENOENT)
		log_warn("sync: cannot remove %s: %s", r->part_path, strerror(errno));
	r->has_part = 0;
	r->part_size = 0;
}

static int was_tried(const struct srepo *r, const uint8_t pk[ME_PK_LEN])
{
	for (size_t i = 0; i < r->ntried; i++)
		if (memcmp(r->tried[i], pk, ME_PK_LEN) == 0)
			return 1;
	return 0;
}

/* A connection to pk came up after since_ms (wall clock): a holder that restarted. */
static int reconnected(struct sync *s, const uint8_t pk[ME_PK_LEN], int64_t since_ms)
{
	struct peer *p = s->net != NULL ? net_peer_find(s->net, pk) : NULL;
	return p != NULL && net_peer_since_ms(p) > since_ms;
}

static void mark_tried(struct srepo *r, const uint8_t pk[ME_PK_LEN])
{
	if (!was_tried(r, pk) && r->ntried < MAX_TRIED)
		memcpy(r->tried[r->ntried++], pk, ME_PK_LEN);
}

static void holders_expire(struct srepo *r, int64_t now)
{
	struct holder **pp = &r->holders;
	while (*pp) {
		struct holder *h = *pp;
		if (now - h->seen_ms > HOLDER_TTL_MS) {
			*pp = h->next;
			free(h);
		} else {
			pp = &h->next;
		}
	}
}

static void waiters_done(struct srepo *r, int rc, const char *msg)
{
	struct sync_waiter *w = r->waiters;
	r->waiters = NULL;
	while (w) {
		struct sync_waiter *nx = w->next;
		w->r = NULL;
		if (w->cb.done)
			w->cb.done(w->cb.ud, rc, msg);
		free(w);
		w = nx;
	}
}

static void waiters_progress(struct srepo *r, uint64_t done, uint64_t total)
{
	for (struct sync_waiter *w = r->waiters; w; w = w->next)
		if (w->cb.progress)
			w->cb.progress(w->cb.ud, done, total);
}

/* ---- requesting ---- */

/* A bundle waiting for, or under, verification: from its Start on, so that the verifier
 * indexes it while it arrives (it reads the file as it grows and checks size and digest
 * itself). It outlives its fetch when the fetch fails while the job runs (the job's result is
 * still recorded: the mirror may have moved). */
struct segrx {
	struct sync *s;
	struct fetch *f; /* NULL once the fetch is gone */
	char repo_id[ME_DID_REPO_SIZE];
	char peer_did[ME_DID_KEY_SIZE];
	char path[PATH_MAX];
	struct rs_copy rs;
	uint8_t creator_pk[ME_PK_LEN];
	uint8_t digest[XMSG_DIGEST_LEN];
	uint64_t size;
	struct xmsg_parts parts;
	int64_t base_seq; /* the mirror's state it applies on (0: empty) */
	uint64_t max_bytes;
	char root[PATH_MAX];
	uv_work_t work;
	int vrc;
	char verr[ERRSZ];
	struct bundle_stats st;
	int refuted; /* the id is not this creator's (first fetch) */
	/* Set on the loop's thread, read by the job's: */
	volatile int arriving; /* the data is still coming */
	volatile int abort;    /* the transfer failed: stop the verifier */
	int keep_file;         /* the partial file is kept to resume */
	struct segrx *next;
};

static void segrx_free(struct segrx *g, int drop_file)
{
	if (drop_file && !g->keep_file)
		unlink(g->path);
	rs_copy_free(&g->rs);
	free(g);
}

static void fetch_free(struct fetch *f)
{
	if (f->fd >= 0)
		close(f->fd);
	me_sha3_free(f->h);
	rs_copy_free(&f->rs);
	while (f->queue) {
		struct segrx *g = f->queue;
		f->queue = g->next;
		segrx_free(g, 1);
	}
	if (f->verifying)
		f->verifying->f = NULL;
	free(f);
}

/* Detaches the fetch from its repository and the counters; the fetch itself is freed once its
 * stream is gone. */
static void fetch_release(struct fetch *f)
{
	struct sync *s = f->s;
	if (f->r != NULL) {
		f->r->fetch = NULL;
		f->r = NULL;
		s->nfetches--;
	}
	if (f->x == NULL)
		fetch_free(f);
}

/* Ends a fetch that failed: records why, keeps a partial bundle for a resume when the failure
 * was the transport's, drops bundles not yet verified, lets the scheduler try the next holder.
 * Bundles verified before stay applied: each is a complete signed state. */
static void fetch_end(struct fetch *f, int rc, const char *why)
{
	struct sync *s = f->s;
	struct srepo *r = f->r;

	if (f->failed || r == NULL)
		return;
	f->failed = 1;
	log_info("sync: fetch of %s from %s failed: %s", r->id, f->peer_did, why);
	fmt(r->error, sizeof(r->error), "%s", why);
	/* A lost connection whose holder is back already (it restarted and its new connection
	 * replaced the old one) is not a failed holder: try it again at once, resuming. */
	if (rc != ME_ECONN || !reconnected(s, f->peer, f->begun_ms))
		mark_tried(r, f->peer);
	s->stats.fetches_failed++;
	if (f->fd >= 0) {
		close(f->fd);
		f->fd = -1;
	}
	if (f->cur != NULL) { /* its verifier stops; the file goes, or stays for a resume */
		__atomic_store_n(&f->cur->abort, 1, __ATOMIC_SEQ_CST);
		__atomic_store_n(&f->cur->arriving, 0, __ATOMIC_SEQ_CST);
	}
	if ((rc == ME_ECONN || rc == ME_ETIMEDOUT) && f->phase == F_DATA && f->pos > 0) {
		r->has_part = 1;
		r->part_size = f->pos;
		fmt(r->part_path, sizeof(r->part_path), "%s", f->path);
		memcpy(r->part_digest, f->digest, sizeof(r->part_digest));
		if (f->cur != NULL)
			f->cur->keep_file = 1;
	} else if (f->phase == F_DATA) {
		unlink(f->path);
	}
	f->cur = NULL;
	if (f->x != NULL)
		net_xfer_reset(f->x, rc == ME_EPROTO ? NET_ERR_FRAME : NET_ERR_CANCEL);
	fetch_release(f);
	kick(s);
}

/* Everything the server sent is applied: the fetch is over. */
static void fetch_complete(struct fetch *f)
{
	struct srepo *r = f->r;
	struct sync *s = f->s;

	if (r == NULL || f->failed || !f->ended || f->phase != F_IDLE || f->queue != NULL ||
	    f->verifying != NULL)
		return;
	if (f->npieces == 0) {
		fetch_end(f, ME_EPROTO, f->nskipped > 0 ? "the server sent no state newer than the "
			  "mirror" : "the server sent nothing");
		return;
	}
	s->stats.fetches_ok++;
	r->error[0] = '\0';
	r->ntried = 0;
	fetch_release(f);
	kick(s);
}

static void verify_work(uv_work_t *w);
static void verify_done(uv_work_t *w, int status);

/* Starts verifying the next received bundle, in order, one at a time per repository. */
static void verify_next(struct fetch *f)
{
	struct segrx *g = f->queue;

	if (f->verifying != NULL || g == NULL || f->failed)
		return;
	f->queue = g->next;
	g->next = NULL;
	g->base_seq = f->base_unknown ? -1 : f->applied_seq;
	f->base_unknown = 0;
	f->verifying = g;
	f->r->jobs++;
	f->s->jobs++;
	uv_queue_work(f->s->loop, &g->work, verify_work, verify_done);
}

/* The bundle announced by a Start is queued for verification at once, as arriving. */
static int fetch_queue(struct fetch *f)
{
	struct segrx *g, **pp;

	if ((g = calloc(1, sizeof(*g))) == NULL) {
		fetch_end(f, ME_ENOMEM, "out of memory");
		return ME_ENOMEM;
	}
	g->s = f->s;
	g->f = f;
	fmt(g->repo_id, sizeof(g->repo_id), "%s", f->r->id);
	fmt(g->peer_did, sizeof(g->peer_did), "%s", f->peer_did);
	fmt(g->path, sizeof(g->path), "%s", f->path);
	g->rs = f->rs; /* moves the copy */
	memset(&f->rs, 0, sizeof(f->rs));
	memcpy(g->creator_pk, f->creator_pk, ME_PK_LEN);
	memcpy(g->digest, f->digest, XMSG_DIGEST_LEN);
	g->parts = f->parts;
	g->size = f->total;
	g->max_bytes = f->max_bytes;
	fmt(g->root, sizeof(g->root), "%s", f->root);
	g->arriving = 1;
	for (pp = &f->queue; *pp; pp = &(*pp)->next)
		; /* in order: appended at the end */
	*pp = g;
	f->cur = g;
	verify_next(f);
	return 0;
}

static int fetch_start_frame(struct fetch *f, const struct xmsg *m)
{
	struct sync *s = f->s;
	struct srepo *r = f->r;
	char why[ERRSZ];

	if (!gmsg_str_eq(m->refstate.repo_id, gmsg_str(r->id))) {
		fetch_end(f, ME_EPROTO, "the bundle is for another repository");
		return ME_EPROTO;
	}
	if (memcmp(m->creator_pk, f->creator_pk, ME_PK_LEN) != 0 ||
	    gmsg_refstate_verify(&m->refstate, f->creator_pk) < 0) {
		fetch_end(f, ME_EPERM, "ref state not signed by the repository's creator");
		return ME_EPERM;
	}
	/* each bundle reaches a newer state than the mirror and than the one before it; except
	 * that a series may start with states the mirror has: when several states have the same
	 * tips (only HEAD moved), the server cannot tell from our haves which one we are at, and
	 * sends from the first. Those are read past, not written (a few, small, at the start). */
	if ((int64_t)m->refstate.seq <= f->last_seq) {
		if (f->npieces > 0 || m->offset > 0 || f->nskipped >= SYNC_MAX_SKIPPED ||
		    m->total_size > SYNC_MAX_SKIPPED_SIZE) {
			fetch_end(f, ME_EPROTO, "offered state is not newer than the mirror");
			return ME_EPROTO;
		}
		f->nskipped++;
		f->skipping = 1;
		f->phase = F_DATA;
		f->total = m->total_size;
		f->offset = 0;
		f->pos = 0;
		return 0;
	}
	if (m->total_size > f->max_bytes) {
		fmt(why, sizeof(why), "bundle of %" PRIu64 " bytes is over the limit of %" PRIu64
			 " (--max-repo-size)", m->total_size, f->max_bytes);
		fetch_end(f, ME_ETOOBIG, why);
		return ME_ETOOBIG;
	}
	/* only the first bundle of a transfer may resume the partial one we asked about */
	int resume = f->npieces == 0 && r->has_part && m->offset > 0;
	if (m->offset > 0 && (!resume || m->offset != r->part_size ||
			      memcmp(m->digest, r->part_digest, XMSG_DIGEST_LEN) != 0)) {
		fetch_end(f, ME_EPROTO, "resume offset that was not asked for");
		return ME_EPROTO;
	}
	me_sha3_free(f->h);
	if (rs_copy_set(&f->rs, &m->refstate) < 0 || (f->h = me_sha3_new()) == NULL) {
		fetch_end(f, ME_ENOMEM, "out of memory");
		return ME_ENOMEM;
	}
	if (resume)
		fmt(f->path, sizeof(f->path), "%s", r->part_path);
	else
		fmt(f->path, sizeof(f->path), "%s/%s.%" PRIu64 ".part", s->tmpdir, b58_part(r->id),
		    m->refstate.seq);
	if (r->has_part && !resume)
		part_drop(s, r);
	f->phase = F_DATA;
	f->fd = open(f->path, O_RDWR | O_CREAT | O_CLOEXEC | (resume ? 0 : O_TRUNC), 0600);
	if (f->fd < 0) {
		fmt(why, sizeof(why), "cannot create %s: %s", f->path, strerror(errno));
		fetch_end(f, ME_EIO, why);
		return ME_EIO;
	}
	if (resume) {
		/* Hash what is already there; the server continues from there. */
		uint8_t buf[SYNC_CHUNK];
		uint64_t left = m->offset;
		while (left > 0) {
			ssize_t k = read(f->fd, buf, left < sizeof(buf) ? (size_t)left : sizeof(buf));
			if (k <= 0) {
				fetch_end(f, ME_EIO, "cannot read the partial bundle");
				return ME_EIO;
			}
			me_sha3_update(f->h, buf, (size_t)k);
			left -= (uint64_t)k;
		}
		log_info("sync: resuming %s from %s at %" PRIu64 " of %" PRIu64 " bytes", r->id,
			 f->peer_did, m->offset, m->total_size);
	}
	r->has_part = 0;
	f->window_ms = me_mono_ms(); /* the rate is judged from the start of each bundle */
	f->window_bytes = f->bytes_done;
	f->last_seq = (int64_t)m->refstate.seq;
	f->total = m->total_size;
	f->offset = m->offset;
	f->pos = m->offset;
	f->bytes_total += m->total_size;
	f->bytes_done += m->offset;
	memcpy(f->digest, m->digest, XMSG_DIGEST_LEN);
	f->parts = m->parts; /* a hint: parts that do not fit the pack reject the bundle */
	waiters_progress(r, f->bytes_done, f->bytes_total);
	return fetch_queue(f);
}

static int fetch_done_frame(struct fetch *f, const struct xmsg *m)
{
	uint8_t d[XMSG_DIGEST_LEN];

	if (f->pos != f->total) {
		fetch_end(f, ME_EPROTO, "transfer ended before the announced size");
		return ME_EPROTO;
	}
	if (me_sha3_final(f->h, d) < 0 || memcmp(d, f->digest, sizeof(d)) != 0 ||
	    memcmp(m->digest, f->digest, sizeof(d)) != 0) {
		fetch_end(f, ME_EPROTO, "bundle digest mismatch");
		return ME_EPROTO;
	}
	int crc = close(f->fd);
	f->fd = -1;
	if (crc < 0) {
		fetch_end(f, ME_EIO, "cannot write the bundle");
		return ME_EIO;
	}
	if (f->cur != NULL) /* complete and checked: its verifier may apply it */
		__atomic_store_n(&f->cur->arriving, 0, __ATOMIC_SEQ_CST);
	log_debug("sync: bundle of %s from %s received: %" PRIu64 " bytes in %" PRId64 " ms%s",
		  f->r->id, f->peer_did, f->total, me_mono_ms() - f->window_ms,
		  f->cur != NULL ? "" : " (already verified)");
	f->cur = NULL;
	f->npieces++;
	f->phase = F_IDLE;
	verify_next(f);
	return 0;
}

static int fetch_on_frame(void *ud, struct net_xfer *x, const uint8_t *body, size_t len)
{
	struct fetch *f = ud;
	struct xmsg m;
	int rc;
	(void)x;

	if (f->r == NULL || f->failed)
		return 0;
	f->last_rx_ms = me_mono_ms();
	if ((rc = xmsg_decode(body, len, &m)) < 0) {
		fetch_end(f, ME_EPROTO, "malformed transfer message");
		return 0;
	}
	switch (m.type) {
	case XMSG_START:
		if (f->phase == F_DATA || f->ended)
			goto order;
		fetch_start_frame(f, &m);
		break;
	case XMSG_DATA:
		if (f->phase != F_DATA)
			goto order;
		if (m.len > f->total - f->pos) {
			fetch_end(f, ME_EPROTO, "data past the announced size");
			break;
		}
		if (f->skipping) {
			f->pos += m.len;
			f->s->stats.bytes_fetched += m.len;
			break;
		}
		if ((rc = write_full(f->fd, m.data, m.len)) < 0) {
			char why[ERRSZ];
			fmt(why, sizeof(why), "cannot write %s: %s", f->path, strerror(-rc));
			fetch_end(f, rc == -ENOSPC || rc == -EDQUOT ? ME_ENOSPC : ME_EIO, why);
			xmsg_free(&m);
			return 0;
		}
		me_sha3_update(f->h, m.data, m.len);
		f->pos += m.len;
		f->bytes_done += m.len;
		f->s->stats.bytes_fetched += m.len;
		waiters_progress(f->r, f->bytes_done, f->bytes_total);
		break;
	case XMSG_DONE:
		if (f->phase != F_DATA)
			goto order;
		if (f->skipping) {
			if (f->pos != f->total) {
				fetch_end(f, ME_EPROTO, "transfer ended before the announced size");
				break;
			}
			f->skipping = 0;
			f->phase = F_IDLE;
			break;
		}
		fetch_done_frame(f, &m);
		break;
	case XMSG_ERROR: {
		char why[ERRSZ];
		if (f->phase == F_DATA)
			goto order;
		fmt(why, sizeof(why), "%s refused: %s: %.*s", f->peer_did, me_errname((int)m.code),
			 (int)m.message.len, m.message.ptr ? m.message.ptr : "");
		fetch_end(f, m.code == ME_EBUSY ? ME_ECONN : ME_ENOTFOUND, why);
		break;
	}
	default:
		goto order;
	}
	xmsg_free(&m);
	return 0;
order:
	xmsg_free(&m);
	fetch_end(f, ME_EPROTO, "transfer message out of order");
	return 0;
}

/* The server sent everything (FIN): close our side too; the fetch completes once the last
 * bundle is applied. */
static void fetch_on_eof(void *ud, struct net_xfer *x)
{
	struct fetch *f = ud;

	if (f->r == NULL || f->failed)
		return;
	if (f->phase != F_IDLE) {
		fetch_end(f, ME_EPROTO, f->phase == F_DATA ? "transfer ended in the middle of a bundle"
							   : "the server sent nothing");
		return;
	}
	f->ended = 1;
	net_xfer_finish(x);
	fetch_complete(f);
}

static void fetch_on_closed(void *ud, struct net_xfer *x, uint64_t app_error, const char *why)
{
	struct fetch *f = ud;
	char buf[ERRSZ];
	(void)x;

	f->x = NULL;
	if (!f->failed && f->r != NULL) {
		if (app_error == 0 && f->ended) {
			fetch_complete(f); /* waits for the last verification when one runs */
			return;
		}
		fmt(buf, sizeof(buf), "transfer from %s closed (%s, code 0x%" PRIx64 ")",
			 f->peer_did, why ? why : "", app_error);
		fetch_end(f, ME_ECONN, buf); /* frees f (its stream is gone) */
		return;
	}
	if (f->r == NULL)
		fetch_free(f);
}

static const struct net_xfer_callbacks fetch_cb = {
	.frame = fetch_on_frame,
	.eof = fetch_on_eof,
	.closed = fetch_on_closed,
};

/* Verifies and applies a received bundle in a child process with hard limits (verify.h): a
 * hostile pack can only kill that child. On a first fetch the child also checks the did:repo
 * binding. Any failure leaves the mirror as it was (a mirror this fetch created is removed). */
static void verify_work(uv_work_t *w)
{
	struct segrx *g = (struct segrx *)((char *)w - offsetof(struct segrx, work));
	struct verify_req q = {
		.root = g->root,
		.bundle_path = g->path,
		.max_bytes = g->max_bytes,
		.rs = &g->rs.rs,
		.creator_pk = g->creator_pk,
		.check_binding = g->base_seq <= 0,
		.cancel = &g->s->closing, /* set by sync_free on the loop's thread */
		.digest = g->digest,
		.size = g->size,
		.parts = &g->parts,
		.arriving = &g->arriving,
		.abort = &g->abort,
	};
	struct verify_res res;

	g->vrc = verify_bundle(&q, &res);
	fmt(g->verr, sizeof(g->verr), "%s", res.msg);
	g->st = res.st;
	g->refuted = res.refuted;
}

/* Records the verified state: mirror seq, and the ref state itself when it is newer than the
 * one stored (a holder may have a newer state than gossip brought us). */
static void record_success(struct sync *s, const struct gmsg_refstate *rs, const char *id)
{
	struct store *st = s->node->store;
	struct store_repo sr;
	int64_t seq = (int64_t)rs->seq;

	if (store_repo_get(st, id, &sr) == 0) {
		if (seq > sr.ref_seq) {
			size_t n = rs->nrefs;
			struct store_ref *refs = calloc(n ? n : 1, sizeof(*refs));
			char *oids = calloc(n ? n : 1, 2 * ME_OID_LEN + 1);
			if (refs != NULL && oids != NULL) {
				for (size_t i = 0; i < n; i++) {
					refs[i].name = (char *)rs->refs[i].name.ptr;
					refs[i].oid = oids + i * (2 * ME_OID_LEN + 1);
					sodium_bin2hex(refs[i].oid, 2 * ME_OID_LEN + 1, rs->refs[i].oid,
						       ME_OID_LEN);
				}
				struct store_repo nr = sr;
				nr.ref_seq = seq;
				nr.head = (char *)rs->head.ptr;
				memcpy(nr.ref_sig, rs->sig, ME_SIG_LEN);
				nr.has_ref_sig = 1;
				if (store_repo_upsert_external(st, &nr, refs, n, NULL) < 0)
					log_warn("sync: cannot store the ref state of %s: %s", id,
						 store_errmsg(st));
			}
			free(refs);
			free(oids);
		}
		store_repo_clear(&sr);
	}
	if (store_repo_set_sync(st, id, seq, me_now_ms(), "") < 0)
		log_warn("sync: cannot record the sync of %s: %s", id, store_errmsg(st));
}

static void series_keep(struct sync *s, struct srepo *r, struct segrx *g);

/* A first fetch proved that pk is not the creator of r (no root commit gives the id with it):
 * someone announced another's did:repo as theirs. Forget the repository as learnt (it was never
 * fetched), its holders, and ignore that claim from now on, so the genuine creator's
 * announcements are taken again. */
static void refute_creator(struct sync *s, struct srepo *r, const uint8_t pk[ME_PK_LEN])
{
	struct store_repo sr;
	char did[ME_DID_KEY_SIZE];

	if (r->nrefuted < MAX_REFUTED)
		memcpy(r->refuted[r->nrefuted++], pk, ME_PK_LEN);
	else
		memcpy(r->refuted[MAX_REFUTED - 1], pk, ME_PK_LEN);
	me_did_key_from_pk(pk, did, sizeof(did));
	log_warn("sync: %s is not the creator of %s: its claim is ignored from now on", did, r->id);
	if (store_repo_get(s->node->store, r->id, &sr) == 0) {
		if (sr.is_external && sr.mirror_seq <= 0 && strcmp(sr.creator, did) == 0 &&
		    store_repo_remove(s->node->store, r->id) < 0)
			log_warn("sync: cannot forget %s: %s", r->id, store_errmsg(s->node->store));
		store_repo_clear(&sr);
	}
	while (r->holders) {
		struct holder *h = r->holders;
		r->holders = h->next;
		free(h);
	}
	r->ntried = 0;
	r->want = 0;
}

int sync_creator_refuted(struct sync *s, const char *repo_id, const uint8_t pk[ME_PK_LEN])
{
	struct srepo *r;

	if (s == NULL || (r = srepo_find(s, repo_id)) == NULL)
		return 0;
	for (size_t i = 0; i < r->nrefuted; i++)
		if (memcmp(r->refuted[i], pk, ME_PK_LEN) == 0)
			return 1;
	return 0;
}

static void verify_done(uv_work_t *w, int status)
{
	struct segrx *g = (struct segrx *)((char *)w - offsetof(struct segrx, work));
	struct sync *s = g->s;
	struct fetch *f = g->f;
	struct srepo *r = srepo_find(s, g->repo_id);
	(void)status;

	s->jobs--;
	if (r != NULL)
		r->jobs--;
	if (f != NULL)
		f->verifying = NULL;
	/* It may end before its Done frame is read: failed on what had arrived (a bad pack, a
	 * full disk). It is never applied before (the go, verify.h). */
	if (f != NULL && f->cur == g)
		f->cur = NULL;
	if (g->vrc == ME_ECANCELED && g->abort) {
		/* the transfer failed while it was verified: already reported by fetch_end */
		log_debug("sync: verification of a bundle of %s from %s stopped: %s", g->repo_id,
			  g->peer_did, g->verr);
		segrx_free(g, 1);
	} else if (g->vrc < 0) {
		char why[ERRSZ];
		/* a full disk (or memory) is this node's failure, not a bad bundle of the peer's */
		int vrc = g->vrc, local = vrc == ME_ENOSPC || vrc == ME_ENOMEM;
		if (local)
			fmt(why, sizeof(why), "cannot store the bundle from %s: %s (%s)", g->peer_did,
			    me_strerror(vrc), g->verr);
		else
			fmt(why, sizeof(why), "bundle from %s rejected: %s", g->peer_did, g->verr);
		log_warn("sync: %s (%s)", why, me_errname(vrc));
		if (!local)
			s->stats.rejected_bundles++;
		if (g->refuted && r != NULL && !s->closing)
			refute_creator(s, r, g->creator_pk);
		/* a transfer that failed meanwhile kept its part to resume: not a refused one */
		if (g->keep_file && r != NULL && r->has_part && strcmp(r->part_path, g->path) == 0)
			r->has_part = 0;
		g->keep_file = 0;
		segrx_free(g, 1);
		if (f != NULL && !s->closing)
			fetch_end(f, local ? vrc : ME_EPROTO, why);
		else if (r != NULL && !s->closing)
			fmt(r->error, sizeof(r->error), "%s", why);
	} else {
		/* the mirror moved: record it even when the fetch is gone or we are stopping */
		record_success(s, &g->rs.rs, g->repo_id);
		log_info("sync: %s now at state %" PRIu64 " from %s: %zu objects, %" PRIu64
			 " bytes, %zu refs updated, %zu deleted", g->repo_id, g->rs.rs.seq,
			 g->peer_did, g->st.objects, g->size, g->st.refs_updated,
			 g->st.refs_deleted);
		if (f != NULL)
			f->applied_seq = (int64_t)g->rs.rs.seq;
		if (r != NULL && !s->closing)
			series_keep(s, r, g); /* frees g */
		else
			segrx_free(g, 1);
		if (!s->closing && s->node->gossip)
			gossip_changed(s->node->gossip); /* we hold a newer mirror now */
		if (f != NULL && !s->closing) {
			verify_next(f);
			fetch_complete(f);
		}
	}
	if (s->closing)
		sync_free(s); /* finishes the release once the last job is back */
	else
		kick(s);
}

/* ---- series: a repository's published history as bundle files ----
 * $ROOT/series/<id without did:repo:z>/<seq>.bundle, each with <seq>.start: the Start message
 * (offset 0) that announces it. The first bundle is complete; each next one holds what its
 * state adds to the state of the one before (built with that state's tips as haves), so a
 * newcomer gets the whole series, unchanged, and a node whose mirror is at one of its states
 * gets the rest. A replica keeps the bundles it received the same way, so it serves what it got
 * without building anything. */

static void series_dir(struct sync *s, const char *id, char *buf, size_t sz)
{
	fmt(buf, sz, "%s/%s", s->seriesdir, b58_part(id) + 1);
}

static int seg_set_tips(struct seg *g)
{
	size_t n = g->rs.rs.nrefs, k = 0;
	g->tips = calloc(n ? n : 1, ME_OID_LEN);
	if (g->tips == NULL)
		return ME_ENOMEM;
	for (size_t i = 0; i < n; i++)
		memcpy(g->tips[i], g->rs.rs.refs[i].oid, ME_OID_LEN);
	if (n > 1)
		qsort(g->tips, n, ME_OID_LEN, oid_cmp);
	for (size_t i = 0; i < n; i++)
		if (k == 0 || memcmp(g->tips[k - 1], g->tips[i], ME_OID_LEN) != 0)
			memmove(g->tips[k++], g->tips[i], ME_OID_LEN);
	g->ntips = k;
	return 0;
}

static void seg_destroy(struct seg *g)
{
	char meta[PATH_MAX + 8];
	if (g->unlink_files) {
		unlink(g->path);
		fmt(meta, sizeof(meta), "%.*s.start", (int)(strlen(g->path) - strlen(".bundle")),
		    g->path);
		unlink(meta);
	}
	rs_copy_free(&g->rs);
	free(g->tips);
	free(g);
}

static void seg_release(struct seg *g)
{
	if (--g->users == 0 && g->dead)
		seg_destroy(g);
}

/* Forgets every bundle of the series (files go once nobody reads them). */
static void series_clear(struct series *se, int unlink_files)
{
	struct seg *g = se->head;
	while (g) {
		struct seg *nx = g->next;
		g->dead = 1;
		g->unlink_files = unlink_files;
		if (g->users == 0)
			seg_destroy(g);
		g = nx;
	}
	se->head = se->tail = NULL;
	se->n = 0;
}

static void series_append(struct series *se, struct seg *g)
{
	g->next = NULL;
	if (se->tail)
		se->tail->next = g;
	else
		se->head = g;
	se->tail = g;
	se->n++;
}

/* Reads one <seq>.start file into a new segment. */
static struct seg *seg_load(const char *dir, const char *start_name)
{
	char path[PATH_MAX], bpath[PATH_MAX];
	struct seg *g = NULL;
	struct xmsg m;
	struct stat st;
	uint8_t *buf = NULL;
	ssize_t k = -1;
	int fd;

	if (fmt(path, sizeof(path), "%s/%s", dir, start_name) < 0 ||
	    fmt(bpath, sizeof(bpath), "%s/%.*s.bundle", dir,
		(int)(strlen(start_name) - strlen(".start")), start_name) < 0)
		return NULL;
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return NULL;
	if (fstat(fd, &st) == 0 && st.st_size > 4 && st.st_size <= XMSG_MAX_BODY + 4 &&
	    (buf = malloc((size_t)st.st_size)) != NULL)
		k = read(fd, buf, (size_t)st.st_size);
	close(fd);
	if (k != (ssize_t)st.st_size || xmsg_decode(buf + 4, (size_t)k - 4, &m) < 0) {
		free(buf);
		return NULL;
	}
	if (m.type == XMSG_START && stat(bpath, &st) == 0 && (uint64_t)st.st_size == m.total_size &&
	    (g = calloc(1, sizeof(*g))) != NULL) {
		if (rs_copy_set(&g->rs, &m.refstate) < 0 || seg_set_tips(g) < 0) {
			rs_copy_free(&g->rs);
			free(g);
			g = NULL;
		} else {
			g->seq = (int64_t)m.refstate.seq;
			g->size = m.total_size;
			memcpy(g->digest, m.digest, XMSG_DIGEST_LEN);
			memcpy(g->creator_pk, m.creator_pk, ME_PK_LEN);
			g->parts = m.parts;
			fmt(g->path, sizeof(g->path), "%s", bpath);
		}
	}
	xmsg_free(&m);
	free(buf);
	return g;
}

static int seg_cmp(const void *a, const void *b)
{
	const struct seg *x = *(struct seg *const *)a, *y = *(struct seg *const *)b;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Loads the series of r from disk once. Anything inconsistent (a bundle without its start, a
 * state not newer than the one before) drops the whole series: it is rebuilt on demand. */
static void series_load(struct sync *s, struct srepo *r)
{
	char dir[PATH_MAX];
	struct seg **v = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d;

	if (r->se.loaded)
		return;
	r->se.loaded = 1;
	series_dir(s, r->id, dir, sizeof(dir));
	if ((d = opendir(dir)) == NULL)
		return;
	int bad = 0;
	while ((de = readdir(d)) != NULL && !bad) {
		size_t l = strlen(de->d_name);
		if (l <= 6 || strcmp(de->d_name + l - 6, ".start") != 0)
			continue;
		struct seg *g = seg_load(dir, de->d_name);
		if (g == NULL || (n == cap && (cap = cap ? 2 * cap : 8,
					      (v = realloc(v, cap * sizeof(*v))) == NULL))) {
			bad = 1;
			if (g)
				seg_destroy(g);
			break;
		}
		v[n++] = g;
	}
	closedir(d);
	if (n > 1)
		qsort(v, n, sizeof(*v), seg_cmp);
	for (size_t i = 0; i < n; i++) {
		if (i > 0 && v[i]->seq <= v[i - 1]->seq)
			bad = 1;
		series_append(&r->se, v[i]);
	}
	free(v);
	if (bad) {
		log_warn("sync: dropping the inconsistent bundle series in %s", dir);
		series_clear(&r->se, 1);
		empty_dir(dir);
	}
}

/* Moves file (a verified or freshly built bundle) into r's series as its next state; a complete
 * bundle (full) replaces the series. */
static int series_add(struct sync *s, struct srepo *r, const char *file, uint64_t size,
		      const uint8_t digest[XMSG_DIGEST_LEN], const uint8_t creator_pk[ME_PK_LEN],
		      const struct gmsg_refstate *rs, const struct xmsg_parts *parts, int full)
{
	char dir[PATH_MAX], meta[PATH_MAX], tmp[PATH_MAX];
	msgpack_sbuffer sb;
	struct seg *g;
	int fd, rc;

	series_dir(s, r->id, dir, sizeof(dir));
	if (mkdir_0700(s->seriesdir) < 0 || mkdir_0700(dir) < 0)
		return ME_EIO;
	if (full)
		series_clear(&r->se, 1);
	if ((g = calloc(1, sizeof(*g))) == NULL)
		return ME_ENOMEM;
	if ((rc = rs_copy_set(&g->rs, rs)) < 0 || (rc = seg_set_tips(g)) < 0) {
		seg_destroy(g);
		return rc;
	}
	g->seq = (int64_t)rs->seq;
	g->size = size;
	memcpy(g->digest, digest, XMSG_DIGEST_LEN);
	memcpy(g->creator_pk, creator_pk, ME_PK_LEN);
	g->parts = *parts;
	fmt(g->path, sizeof(g->path), "%s/%" PRId64 ".bundle", dir, g->seq);
	fmt(meta, sizeof(meta), "%s/%" PRId64 ".start", dir, g->seq);
	fmt(tmp, sizeof(tmp), "%s/%" PRId64 ".start.tmp", dir, g->seq);
	msgpack_sbuffer_init(&sb);
	rc = xmsg_encode_start_parts(&sb, "", size, digest, 0, creator_pk, rs, parts);
	if (rc == 0) {
		rc = ME_EIO;
		fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd >= 0) {
			if (write(fd, sb.data, sb.size) == (ssize_t)sb.size && fsync(fd) == 0)
				rc = 0;
			close(fd);
		}
	}
	msgpack_sbuffer_destroy(&sb);
	/* the bundle first, then its start: a start always has its bundle */
	if (rc == 0 && (rename(file, g->path) < 0 || rename(tmp, meta) < 0))
		rc = ME_EIO;
	if (rc < 0) {
		unlink(tmp);
		seg_destroy(g);
		return rc;
	}
	series_append(&r->se, g);
	return 0;
}

/* A replica keeps what it received when it continues its series (or starts one). */
static void series_keep(struct sync *s, struct srepo *r, struct segrx *g)
{
	/* Complete only when applied on an empty mirror: a bundle without prerequisites on a
	 * mirror that had history may lack objects it held already (a one-off bundle of tips the
	 * haves covered), and must not start a series others will be served. */
	int full = g->st.prereqs == 0 && g->base_seq == 0;

	series_load(s, r);
	if (!r->se.building && (full || (r->se.tail != NULL && r->se.tail->seq == g->base_seq)) &&
	    series_add(s, r, g->path, g->size, g->digest, g->creator_pk, &g->rs.rs, &g->parts,
		       full) == 0) {
		segrx_free(g, 0);
		return;
	}
	segrx_free(g, 1);
}

/* ---- building bundles of the series (thread pool) ---- */

struct sbuild {
	uv_work_t work;
	struct sync *s;
	char repo_id[ME_DID_REPO_SIZE];
	char source[PATH_MAX];
	char tmp[PATH_MAX];
	struct rs_copy rs;
	uint8_t creator_pk[ME_PK_LEN];
	git_oid *haves; /* the tips of the series' last state; NULL: a complete bundle */
	size_t nhaves;
	uint64_t size;
	uint8_t digest[XMSG_DIGEST_LEN];
	struct bundle_stats st;
	int rc;
	char err[ERRSZ];
};

/* Writes a bundle of tips minus haves from source into path, and its size and digest. */
static int build_file(const char *source, const struct gmsg_refstate *rs, const git_oid *haves,
		      size_t nhaves, const char *path, uint64_t *size,
		      uint8_t digest[XMSG_DIGEST_LEN], struct bundle_stats *st, char *err,
		      size_t errsz)
{
	git_repository *src = NULL;
	struct me_sha3 *h = NULL;
	uint8_t *buf = NULL;
	int fd = -1, rc;

	memset(st, 0, sizeof(*st));
	if (git_repository_open_ext(&src, source, GIT_REPOSITORY_OPEN_NO_SEARCH, NULL) < 0) {
		fmt(err, errsz, "cannot open the repository");
		return ME_EGIT;
	}
	if ((fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0) {
		rc = errno == ENOSPC ? ME_ENOSPC : ME_EIO;
		fmt(err, errsz, "cannot create a bundle: %s", strerror(errno));
		goto out;
	}
	if ((rc = bundle_write(src, rs->refs, rs->nrefs, haves, nhaves, fd, st, err, errsz)) < 0)
		goto out;
	if ((h = me_sha3_new()) == NULL || (buf = malloc(BUNDLE_CHUNK)) == NULL) {
		rc = ME_ENOMEM;
		goto out;
	}
	*size = 0;
	for (;;) {
		ssize_t k = pread(fd, buf, BUNDLE_CHUNK, (off_t)*size);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			rc = ME_EIO;
			goto out;
		}
		if (k == 0)
			break;
		me_sha3_update(h, buf, (size_t)k);
		*size += (uint64_t)k;
	}
	rc = me_sha3_final(h, digest);
out:
	if (fd >= 0 && fsync(fd) < 0 && rc == 0)
		rc = ME_EIO;
	if (fd >= 0)
		close(fd);
	if (rc < 0)
		unlink(path);
	me_sha3_free(h);
	free(buf);
	git_repository_free(src);
	return rc;
}

static void sbuild_work(uv_work_t *w)
{
	struct sbuild *b = (struct sbuild *)((char *)w - offsetof(struct sbuild, work));

	b->rc = build_file(b->source, &b->rs.rs, b->haves, b->nhaves, b->tmp, &b->size, b->digest,
			   &b->st, b->err, sizeof(b->err));
	if (b->rc < 0 && b->haves != NULL) {
		/* the source lacks what the series' last state had (history rewritten and
		 * collected): start the series over with a complete bundle */
		free(b->haves);
		b->haves = NULL;
		b->nhaves = 0;
		b->rc = build_file(b->source, &b->rs.rs, NULL, 0, b->tmp, &b->size, b->digest,
				   &b->st, b->err, sizeof(b->err));
	}
}

static void serve_plan(struct serve *sv, struct srepo *r);
static void serve_error(struct serve *sv, int code, const char *msg);

static void sbuild_done(uv_work_t *w, int status)
{
	struct sbuild *b = (struct sbuild *)((char *)w - offsetof(struct sbuild, work));
	struct sync *s = b->s;
	struct srepo *r = srepo_find(s, b->repo_id);
	(void)status;

	s->jobs--;
	s->stats.bundles_built += b->rc == 0;
	if (r != NULL) {
		r->se.building = 0;
		if (b->rc == 0 && !s->closing &&
		    (r->se.tail == NULL || r->se.tail->seq < (int64_t)b->rs.rs.seq)) {
			if (series_add(s, r, b->tmp, b->size, b->digest, b->creator_pk, &b->rs.rs,
				       &b->st.parts, b->haves == NULL) < 0)
				b->rc = ME_EIO;
			else
				log_info("sync: %s: bundle for state %" PRIu64 " built (%" PRIu64
					 " bytes, %s, %zu objects, %zu counted from git's bitmap)",
					 r->id, b->rs.rs.seq, b->size,
					 b->haves == NULL ? "complete" : "increment", b->st.objects,
					 b->st.bitmapped);
		}
		if (b->rc < 0)
			log_warn("sync: cannot build a bundle of %s: %s (%s)", r->id, b->err,
				 me_errname(b->rc));
		struct serve *sv = r->se.waiting;
		r->se.waiting = NULL;
		while (sv) {
			struct serve *nx = sv->next_waiting;
			sv->next_waiting = NULL;
			sv->phase = S_REQUEST;
			if (s->closing)
				;
			else if (b->rc < 0)
				serve_error(sv, b->rc, b->err);
			else
				serve_plan(sv, r);
			sv = nx;
		}
	}
	unlink(b->tmp);
	rs_copy_free(&b->rs);
	free(b->haves);
	free(b);
	if (s->closing)
		sync_free(s);
}

/* Extends r's series to the state rs of source (on the thread pool); 0 when a build started or
 * one runs already. */
static int series_extend(struct sync *s, struct srepo *r, const char *source,
			 const struct gmsg_refstate *rs, const uint8_t creator_pk[ME_PK_LEN])
{
	struct sbuild *b;

	series_load(s, r);
	if (r->se.building)
		return 0;
	if ((b = calloc(1, sizeof(*b))) == NULL)
		return ME_ENOMEM;
	b->s = s;
	fmt(b->repo_id, sizeof(b->repo_id), "%s", r->id);
	fmt(b->source, sizeof(b->source), "%s", source);
	fmt(b->tmp, sizeof(b->tmp), "%s/%s.%" PRIu64 ".build", s->tmpdir, b58_part(r->id), rs->seq);
	memcpy(b->creator_pk, creator_pk, ME_PK_LEN);
	if (rs_copy_set(&b->rs, rs) < 0) {
		free(b);
		return ME_ENOMEM;
	}
	/* increments on the last state, until the series is long enough to start over */
	struct seg *t = r->se.tail;
	if (t != NULL && r->se.n < SERIES_MAX) {
		if ((b->haves = calloc(t->ntips ? t->ntips : 1, sizeof(*b->haves))) == NULL) {
			rs_copy_free(&b->rs);
			free(b);
			return ME_ENOMEM;
		}
		for (size_t i = 0; i < t->ntips; i++)
			git_oid_fromraw(&b->haves[i], t->tips[i]);
		b->nhaves = t->ntips;
	}
	r->se.building = 1;
	s->jobs++;
	uv_queue_work(s->loop, &b->work, sbuild_work, sbuild_done);
	return 0;
}

/* Where r can be served from and at which state: the creator's working repository, or a mirror
 * at the newest signed state. ME_ENOTFOUND otherwise. */
static int serve_source(struct sync *s, const struct store_repo *sr, char *source, size_t sz)
{
	if (!sr->is_external && sr->has_ref_sig)
		return fmt(source, sz, "%s", sr->path);
	if (sr->is_external && sr->has_ref_sig && sr->mirror_seq > 0 &&
	    sr->mirror_seq == sr->ref_seq)
		return mirror_path(s->node->cfg->root, sr->id, source, sz);
	return ME_ENOTFOUND;
}

/* Brings the series of a repository we serve up to its current state in the background, so a
 * request finds it ready. */
static void series_refresh(struct sync *s, const char *id)
{
	struct store_repo sr;
	struct rs_copy rs = { 0 };
	uint8_t pk[ME_PK_LEN];
	char source[PATH_MAX];
	struct srepo *r;

	if (store_repo_get(s->node->store, id, &sr) < 0)
		return;
	if (serve_source(s, &sr, source, sizeof(source)) == 0 && (r = srepo_get(s, id)) != NULL) {
		series_load(s, r);
		if ((r->se.tail == NULL || r->se.tail->seq < sr.ref_seq) && r->jobs == 0 &&
		    me_did_key_parse(sr.creator, pk) == 0 && rs_from_store(s, &sr, &rs) == 0)
			series_extend(s, r, source, &rs.rs, pk);
		rs_copy_free(&rs);
	}
	store_repo_clear(&sr);
}

/* Candidate holders for r: newer than the mirror, not tried in this round; the best (highest
 * state, then connected) first. Returns the number found (at most max). */
static size_t candidates(struct sync *s, struct srepo *r, int64_t mirror_seq, struct holder **out,
			 size_t max)
{
	size_t n = 0;
	for (struct holder *h = r->holders; h; h = h->next) {
		if (h->seq <= mirror_seq || was_tried(r, h->pk) ||
		    memcmp(h->pk, s->node->kp.pk, ME_PK_LEN) == 0)
			continue;
		size_t i = n < max ? n++ : max - 1;
		if (i == max - 1 && n == max && out[i] != NULL) {
			/* full: keep only if better than the last one */
			if (h->seq <= out[i]->seq)
				continue;
		}
		out[i] = h;
		/* insertion sort by seq desc, connected first */
		while (i > 0) {
			struct holder *a = out[i - 1], *b = out[i];
			int ca = net_peer_find(s->net, a->pk) != NULL;
			int cb = net_peer_find(s->net, b->pk) != NULL;
			if (a->seq > b->seq || (a->seq == b->seq && ca >= cb))
				break;
			out[i - 1] = b;
			out[i] = a;
			i--;
		}
	}
	return n;
}

/* Asks the network for a connection to a holder we are not connected to. */
static void dial_holder(struct sync *s, struct srepo *r, const uint8_t pk[ME_PK_LEN])
{
	char did[ME_DID_KEY_SIZE];
	struct store_node sn;
	struct me_sockaddr a;

	if (r->dial_since_ms != 0 && memcmp(r->dialing, pk, ME_PK_LEN) == 0)
		return;
	memcpy(r->dialing, pk, ME_PK_LEN);
	r->dial_since_ms = me_mono_ms();
	me_did_key_from_pk(pk, did, sizeof(did));
	if (store_node_get(s->node->store, did, &sn) < 0)
		return;
	char first[80];
	fmt(first, sizeof(first), "%s", sn.addresses ? sn.addresses : "");
	char *comma = strchr(first, ',');
	if (comma)
		*comma = '\0';
	if (first[0] != '\0' && me_sockaddr_parse(first, &a) == 0) {
		log_info("sync: dialing %s (%s), which has %s", did, first, r->id);
		net_want(s->net, pk, &a);
	}
	store_node_clear(&sn);
}

static int fetch_begin(struct sync *s, struct srepo *r, const struct store_repo *sr,
		       struct peer *p)
{
	struct fetch *f = calloc(1, sizeof(*f));
	uint8_t (*haves)[ME_OID_LEN] = NULL;
	size_t nhaves = 0;
	msgpack_sbuffer sb;
	int rc;

	if (f == NULL)
		return ME_ENOMEM;
	f->s = s;
	f->fd = -1;
	f->last_seq = f->applied_seq = sr->mirror_seq;
	f->max_bytes = s->node->cfg->max_repo_size;
	fmt(f->root, sizeof(f->root), "%s", s->node->cfg->root);
	memcpy(f->peer, net_peer_pk(p), ME_PK_LEN);
	fmt(f->peer_did, sizeof(f->peer_did), "%s", net_peer_did(p));
	if (me_did_key_parse(sr->creator, f->creator_pk) < 0) {
		free(f);
		return ME_EBADID;
	}
	/* haves: the tips of the mirror, when there is one */
	if (sr->mirror_seq > 0) {
		git_repository *m = NULL;
		char err[ERRSZ];
		if (mirror_open(s->node->cfg->root, r->id, false, &m, err, sizeof(err)) == 0) {
			git_oid *o = calloc(XMSG_MAX_HAVES, sizeof(*o));
			haves = calloc(XMSG_MAX_HAVES, ME_OID_LEN);
			if (o != NULL && haves != NULL &&
			    mirror_haves(m, o, XMSG_MAX_HAVES, &nhaves, err, sizeof(err)) == 0) {
				for (size_t i = 0; i < nhaves; i++)
					memcpy(haves[i], o[i].id, ME_OID_LEN);
			} else {
				nhaves = 0;
			}
			free(o);
			git_repository_free(m);
		}
	}
	/* The series grows by increments on its last state only. A mirror whose refs are not that
	 * state's (killed after moving its refs, before the catalogue recorded the state) gets
	 * increments on another base, which must not extend the series. */
	series_load(s, r);
	if (r->se.tail != NULL) {
		size_t k = 0;
		if (haves != NULL && nhaves > 1)
			qsort(haves, nhaves, ME_OID_LEN, oid_cmp);
		for (size_t i = 0; haves != NULL && i < nhaves; i++)
			if (k == 0 || memcmp(haves[k - 1], haves[i], ME_OID_LEN) != 0)
				memmove(haves[k++], haves[i], ME_OID_LEN);
		nhaves = k;
		f->base_unknown = k != r->se.tail->ntips ||
				  (k > 0 && memcmp(haves, r->se.tail->tips, k * ME_OID_LEN) != 0);
	}
	msgpack_sbuffer_init(&sb);
	rc = xmsg_encode_request(&sb, r->id, (const uint8_t(*)[ME_OID_LEN])haves, nhaves,
				 r->has_part ? r->part_digest : NULL, r->has_part ? r->part_size : 0);
	free(haves);
	if (rc == 0)
		rc = net_xfer_open(p, &fetch_cb, f, &f->x);
	if (rc == 0)
		rc = send_frame(f->x, &sb);
	msgpack_sbuffer_destroy(&sb);
	if (rc < 0) {
		if (f->x != NULL) {
			net_xfer_set_callbacks(f->x, &null_cb, NULL);
			net_xfer_reset(f->x, NET_ERR_CANCEL);
		}
		free(f);
		return rc;
	}
	f->r = r;
	r->fetch = f;
	s->nfetches++;
	f->phase = F_REQUEST;
	f->last_rx_ms = f->window_ms = me_mono_ms();
	f->begun_ms = me_now_ms();
	log_info("sync: fetching %s from %s (%zu haves%s)", r->id, f->peer_did, nhaves,
		 r->has_part ? ", resuming" : "");
	return 0;
}

/* While waiting for a new round: a holder of a newer state connected again since the last
 * round failed (it restarted, or a partition healed), so the round need not wait. */
static int holder_back(struct sync *s, struct srepo *r, int64_t mirror_seq)
{
	for (struct holder *h = r->holders; h; h = h->next)
		if (h->seq > mirror_seq && reconnected(s, h->pk, r->retry_at_ms - RETRY_MS))
			return 1;
	return 0;
}

/* One scheduling step for a repository without a running fetch. */
static void schedule_repo(struct sync *s, struct srepo *r, int64_t now, int64_t mono)
{
	struct store_repo sr;
	struct holder *cand[8] = { 0 };

	if (store_repo_get(s->node->store, r->id, &sr) < 0) {
		waiters_done(r, ME_ENOTFOUND, "unknown repository");
		r->want = 0;
		return;
	}
	holders_expire(r, now);
	if (r->jobs > 0)
		goto out; /* a verification still moves this mirror */
	if (!sr.is_external) {
		waiters_done(r, 0, NULL);
		r->want = 0;
		goto out;
	}
	if (sr.mirror_seq >= sr.ref_seq && sr.mirror_seq > 0) {
		waiters_done(r, 0, NULL);
		r->want = 0;
		r->ntried = 0;
		goto out;
	}
	if (!r->want && r->waiters == NULL)
		goto out;
	if (r->waiters == NULL && now < r->retry_at_ms && !holder_back(s, r, sr.mirror_seq))
		goto out;
	if (s->net == NULL || s->nfetches >= SYNC_MAX_FETCHES)
		goto out;
	size_t n = candidates(s, r, sr.mirror_seq, cand, 8);
	if (n == 0 && r->ntried > 0) {
		/* every holder failed: report, wait, start a new round */
		waiters_done(r, ME_EUNAVAIL, r->error[0] ? r->error : "no node could serve it");
		r->ntried = 0;
		r->retry_at_ms = now + RETRY_MS;
		if (sr.mirror_seq <= 0 || r->error[0])
			store_repo_set_sync(s->node->store, r->id, -1, -1, r->error);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		struct peer *p = net_peer_find(s->net, cand[i]->pk);
		if (p == NULL)
			continue;
		r->dial_since_ms = 0;
		int rc = fetch_begin(s, r, &sr, p);
		if (rc == 0)
			goto out;
		log_debug("sync: cannot fetch %s from %s now: %s", r->id, net_peer_did(p),
			  me_strerror(rc));
		if (rc != ME_EBUSY)
			mark_tried(r, cand[i]->pk);
		goto out; /* busy: try again on the next tick */
	}
	if (n > 0) {
		/* none of them is connected: dial the best one, give it a while */
		if (r->dial_since_ms != 0 && mono - r->dial_since_ms > DIAL_WAIT_MS) {
			mark_tried(r, r->dialing);
			r->dial_since_ms = 0;
			fmt(r->error, sizeof(r->error), "holder unreachable");
			kick(s);
		} else {
			dial_holder(s, r, cand[0]->pk);
		}
		goto out;
	}
	/* nobody announces a state newer than the mirror */
	for (struct sync_waiter **pp = &r->waiters; *pp;) {
		struct sync_waiter *w = *pp;
		if (mono - w->since_ms > WAIT_HOLDER_MS) {
			*pp = w->next;
			w->r = NULL;
			if (w->cb.done)
				w->cb.done(w->cb.ud, ME_EUNAVAIL,
					   "no reachable node announces this repository's newest "
					   "state");
			free(w);
		} else {
			pp = &w->next;
		}
	}
out:
	store_repo_clear(&sr);
}

static void sweep(struct sync *s)
{
	struct store_repo *list;
	size_t n;

	if (store_repo_list(s->node->store, &list, &n) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		if (!list[i].is_external) {
			series_refresh(s, list[i].id); /* ready before anyone asks */
			continue;
		}
		if (list[i].mirror_seq >= list[i].ref_seq)
			continue;
		struct srepo *r = srepo_get(s, list[i].id);
		if (r != NULL)
			r->want = 1;
	}
	store_repo_list_free(list, n);
}

/* Served transfers without progress for SYNC_STALL_MS are dropped, as fetches are: a peer that
 * never completes its request or never reads would otherwise hold a slot for ever. Data moves
 * when the queue drains (the reader reads) or the pump adds to it. */
static void serves_expire(struct sync *s, int64_t mono)
{
	for (struct serve *sv = s->serves; sv; sv = sv->next) {
		if (sv->x == NULL || (sv->phase != S_REQUEST && sv->phase != S_SENDING))
			continue;
		if (sv->phase == S_SENDING) {
			size_t q = net_xfer_queued(sv->x);
			if (q < sv->queued)
				sv->active_ms = mono;
			sv->queued = q;
		}
		if (mono - sv->active_ms > SYNC_STALL_MS) {
			log_info("sync: transfer to %s stalled (%s); dropped", sv->peer_did,
				 sv->phase == S_REQUEST ? "no request" : "no data moved");
			net_xfer_reset(sv->x, NET_ERR_CANCEL); /* closed follows from the loop */
			sv->phase = S_FINISHED;
		}
	}
}

static void schedule(struct sync *s)
{
	int64_t now = me_now_ms(), mono = me_mono_ms();

	if (s->closing)
		return;
	serves_expire(s, mono);
	if (mono >= s->next_sweep_ms) {
		s->next_sweep_ms = mono + SYNC_SWEEP_MS;
		sweep(s);
	}
	for (struct srepo *r = s->repos; r; r = r->next) {
		struct fetch *f = r->fetch;
		if (f != NULL) {
			/* before Start the server may be building the bundle: a longer wait */
			int64_t limit = f->phase == F_REQUEST ? SYNC_START_MS : SYNC_STALL_MS;
			if (!f->ended && mono - f->last_rx_ms > limit) {
				fetch_end(f, ME_ETIMEDOUT, f->phase == F_REQUEST
								   ? "no answer to the request"
								   : "transfer stalled");
			} else if (!f->ended && mono - f->window_ms > SLOW_WINDOW_MS) {
				/* a peer trickling data must not hold a fetch slot for ever */
				if (f->bytes_done - f->window_bytes < SLOW_MIN_BYTES &&
				    f->phase == F_DATA)
					fetch_end(f, ME_ETIMEDOUT, "transfer too slow");
				else {
					f->window_ms = mono;
					f->window_bytes = f->bytes_done;
				}
			}
			continue;
		}
		schedule_repo(s, r, now, mono);
	}
}

static void on_tick(uv_timer_t *t)
{
	schedule(t->data);
}

/* ---- serving ---- */

static void centry_delete(struct centry *ce)
{
	unlink(ce->path);
	rs_copy_free(&ce->rs);
	free(ce->tips);
	free(ce->haves);
	free(ce);
}

static void centry_unlink(struct sync *s, struct centry *ce)
{
	for (struct centry **pp = &s->cache; *pp; pp = &(*pp)->next) {
		if (*pp == ce) {
			*pp = ce->next;
			break;
		}
	}
	ce->stale = 1;
	if (ce->users == 0 && ce->state != C_BUILDING)
		centry_delete(ce);
}

static void centry_release(struct sync *s, struct centry *ce)
{
	(void)s;
	ce->users--;
	ce->last_used_ms = me_mono_ms();
	if (ce->stale && ce->users == 0 && ce->state != C_BUILDING)
		centry_delete(ce);
}

/* Keeps the cache within CACHE_MAX_ENTRIES / CACHE_MAX_BYTES by dropping the least recently
 * used bundles nobody is reading. */
static void cache_trim(struct sync *s)
{
	for (;;) {
		size_t n = 0;
		uint64_t bytes = 0;
		struct centry *lru = NULL;
		for (struct centry *c = s->cache; c; c = c->next) {
			n++;
			bytes += c->size;
			if (c->users == 0 && c->state != C_BUILDING &&
			    (lru == NULL || c->last_used_ms < lru->last_used_ms))
				lru = c;
		}
		if ((n <= CACHE_MAX_ENTRIES && bytes <= CACHE_MAX_BYTES) || lru == NULL)
			return;
		centry_unlink(s, lru);
	}
}

/* The piece being sent: a bundle of the series, or a one-off bundle of the cache. */
static const char *piece_path(const struct serve *sv)
{
	return sv->seg ? sv->seg->path : sv->ce->path;
}

static uint64_t piece_size(const struct serve *sv)
{
	return sv->seg ? sv->seg->size : sv->ce->size;
}

static const uint8_t *piece_digest(const struct serve *sv)
{
	return sv->seg ? sv->seg->digest : sv->ce->digest;
}

/* Drops the references the serve holds on the bundles of the series it has still to send. */
static void serve_drop_segs(struct serve *sv)
{
	struct seg *g = sv->seg;
	while (g != NULL) {
		struct seg *nx = g == sv->last ? NULL : g->next;
		seg_release(g);
		g = nx;
	}
	sv->seg = sv->last = NULL;
}

static void serve_free(struct serve *sv)
{
	struct sync *s = sv->s;
	if (sv->prev)
		sv->prev->next = sv->next;
	else
		s->serves = sv->next;
	if (sv->next)
		sv->next->prev = sv->prev;
	s->nserves--;
	if (sv->phase == S_BUILDING) {
		struct serve **head = NULL;
		struct srepo *r;
		if (sv->ce != NULL)
			head = &sv->ce->waiting;
		else if ((r = srepo_find(s, sv->repo_id)) != NULL)
			head = &r->se.waiting;
		for (struct serve **pp = head; pp && *pp; pp = &(*pp)->next_waiting) {
			if (*pp == sv) {
				*pp = sv->next_waiting;
				break;
			}
		}
	}
	if (sv->ce != NULL)
		centry_release(s, sv->ce);
	serve_drop_segs(sv);
	if (sv->fd >= 0)
		close(sv->fd);
	rs_copy_free(&sv->rs);
	free(sv->haves);
	free(sv);
}

static void serve_error(struct serve *sv, int code, const char *msg)
{
	msgpack_sbuffer sb;

	msgpack_sbuffer_init(&sb);
	if (xmsg_encode_error(&sb, code, msg) == 0 && send_frame(sv->x, &sb) == 0)
		net_xfer_finish(sv->x);
	else
		net_xfer_reset(sv->x, NET_ERR_CANCEL);
	msgpack_sbuffer_destroy(&sb);
	sv->phase = S_FINISHED;
	sv->s->stats.serves_refused++;
}

static void serve_begin(struct serve *sv);

/* Sends data while less than PUMP_BYTES is queued; Done after each bundle, the next bundle of
 * the series, and FIN after the last. */
static void serve_pump(struct serve *sv)
{
	msgpack_sbuffer sb;
	uint8_t *buf;

	if (sv->phase != S_SENDING)
		return;
	if ((buf = malloc(SYNC_CHUNK)) == NULL) {
		net_xfer_reset(sv->x, NET_ERR_CANCEL);
		return;
	}
	msgpack_sbuffer_init(&sb);
	uint64_t size = piece_size(sv);
	while (sv->pos < size && net_xfer_queued(sv->x) < PUMP_BYTES) {
		uint64_t left = size - sv->pos;
		size_t want = left < SYNC_CHUNK ? (size_t)left : SYNC_CHUNK;
		ssize_t k = pread(sv->fd, buf, want, (off_t)sv->pos);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0) {
			log_warn("sync: cannot read %s: %s", piece_path(sv),
				 k < 0 ? strerror(errno) : "EOF");
			net_xfer_reset(sv->x, NET_ERR_CANCEL);
			sv->phase = S_FINISHED;
			goto out;
		}
		if (xmsg_encode_data(&sb, buf, (size_t)k) < 0 || send_frame(sv->x, &sb) < 0) {
			net_xfer_reset(sv->x, NET_ERR_CANCEL);
			sv->phase = S_FINISHED;
			goto out;
		}
		sv->pos += (uint64_t)k;
		sv->s->stats.bytes_served += (uint64_t)k;
		sv->active_ms = me_mono_ms();
	}
	sv->queued = net_xfer_queued(sv->x);
	if (sv->pos == size) {
		if (xmsg_encode_done(&sb, piece_digest(sv)) < 0 || send_frame(sv->x, &sb) < 0) {
			net_xfer_reset(sv->x, NET_ERR_CANCEL);
			sv->phase = S_FINISHED;
			goto out;
		}
		sv->npieces++;
		close(sv->fd);
		sv->fd = -1;
		if (sv->seg != NULL && sv->seg != sv->last) {
			struct seg *done = sv->seg;
			sv->seg = done->next;
			seg_release(done);
			sv->has_resume = 0; /* only the first bundle resumes */
			serve_begin(sv);
			goto out;
		}
		net_xfer_finish(sv->x);
		sv->phase = S_FINISHED;
		goto out;
	}
	net_xfer_want_writable(sv->x);
out:
	msgpack_sbuffer_destroy(&sb);
	free(buf);
}

/* Start of the current piece, then its data. */
static void serve_begin(struct serve *sv)
{
	msgpack_sbuffer sb;
	char name[96];
	uint64_t off = 0, size;
	int64_t seq;
	const struct gmsg_refstate *rs;
	const uint8_t *pk;

	if (sv->seg == NULL && sv->ce->state == C_FAILED) {
		serve_error(sv, sv->ce->rc < 0 ? sv->ce->rc : ME_EINTERNAL, sv->ce->err);
		return;
	}
	if ((sv->fd = open(piece_path(sv), O_RDONLY | O_CLOEXEC)) < 0) {
		serve_error(sv, ME_EIO, "cannot open the bundle");
		return;
	}
	size = piece_size(sv);
	if (sv->seg != NULL) {
		seq = sv->seg->seq;
		rs = &sv->seg->rs.rs;
		pk = sv->seg->creator_pk;
	} else {
		seq = sv->ce->seq;
		rs = &sv->rs.rs;
		pk = sv->creator_pk;
	}
	if (sv->has_resume && memcmp(sv->resume_digest, piece_digest(sv), XMSG_DIGEST_LEN) == 0 &&
	    sv->resume_offset <= size)
		off = sv->resume_offset;
	fmt(name, sizeof(name), "%.16s-%" PRId64 ".bundle", b58_part(sv->repo_id) + 1, seq);
	msgpack_sbuffer_init(&sb);
	int rc = xmsg_encode_start_parts(&sb, name, size, piece_digest(sv), off, pk, rs,
					 sv->seg != NULL ? &sv->seg->parts : &sv->ce->parts);
	if (rc == 0)
		rc = send_frame(sv->x, &sb);
	msgpack_sbuffer_destroy(&sb);
	if (rc < 0) {
		net_xfer_reset(sv->x, NET_ERR_CANCEL);
		sv->phase = S_FINISHED;
		return;
	}
	sv->pos = off;
	sv->phase = S_SENDING;
	log_info("sync: serving %s (state %" PRId64 ", %" PRIu64 " bytes%s%s) to %s", sv->repo_id,
		 seq, size, off ? ", resumed" : "", sv->seg ? "" : ", one-off", sv->peer_did);
	serve_pump(sv);
}

static void build_work(uv_work_t *w)
{
	struct centry *ce = (struct centry *)((char *)w - offsetof(struct centry, work));
	struct bundle_stats st;
	char tmp[PATH_MAX + 8];

	fmt(tmp, sizeof(tmp), "%s.tmp", ce->path);
	ce->rc = build_file(ce->source, &ce->rs.rs, ce->haves, ce->nhaves, tmp, &ce->size,
			    ce->digest, &st, ce->err, sizeof(ce->err));
	ce->parts = st.parts;
	if (ce->rc == 0 && rename(tmp, ce->path) < 0) {
		ce->rc = ME_EIO;
		fmt(ce->err, sizeof(ce->err), "rename: %s", strerror(errno));
		unlink(tmp);
	}
}

static void build_done(uv_work_t *w, int status)
{
	struct centry *ce = (struct centry *)((char *)w - offsetof(struct centry, work));
	struct sync *s = ce->s;
	(void)status;

	s->jobs--;
	s->stats.bundles_built += ce->rc == 0;
	ce->state = ce->rc == 0 ? C_READY : C_FAILED;
	if (ce->rc < 0)
		log_warn("sync: cannot build a bundle of %s: %s (%s)", ce->repo_id, ce->err,
			 me_errname(ce->rc));
	free(ce->haves);
	ce->haves = NULL;
	struct serve *sv = ce->waiting;
	ce->waiting = NULL;
	while (sv) {
		struct serve *nx = sv->next_waiting;
		sv->phase = S_REQUEST;
		if (!s->closing)
			serve_begin(sv);
		sv = nx;
	}
	if (ce->state == C_FAILED && !ce->stale)
		centry_unlink(s, ce);
	else if (ce->stale && ce->users == 0)
		centry_delete(ce);
	if (s->closing)
		sync_free(s);
	else
		cache_trim(s);
}

/* A one-off bundle for a requester whose state is not one of the series': found in the cache
 * or built for these haves. */
static int serve_bundle(struct serve *sv, int64_t seq)
{
	struct sync *s = sv->s;
	uint8_t key[XMSG_DIGEST_LEN];
	struct me_sha3 *h = me_sha3_new();
	uint8_t seqb[8];

	if (h == NULL)
		return ME_ENOMEM;
	for (int i = 0; i < 8; i++)
		seqb[i] = (uint8_t)((uint64_t)seq >> (56 - 8 * i));
	me_sha3_update(h, sv->repo_id, strlen(sv->repo_id) + 1);
	me_sha3_update(h, seqb, sizeof(seqb));
	for (size_t i = 0; i < sv->nhaves; i++)
		me_sha3_update(h, sv->haves[i], ME_OID_LEN);
	me_sha3_final(h, key);
	me_sha3_free(h);

	struct centry *ce;
	for (ce = s->cache; ce; ce = ce->next)
		if (memcmp(ce->key, key, sizeof(key)) == 0)
			break;
	if (ce == NULL) {
		char hex[2 * XMSG_DIGEST_LEN + 1];
		if ((ce = calloc(1, sizeof(*ce))) == NULL)
			return ME_ENOMEM;
		memcpy(ce->key, key, sizeof(key));
		fmt(ce->repo_id, sizeof(ce->repo_id), "%s", sv->repo_id);
		ce->seq = seq;
		sodium_bin2hex(hex, sizeof(hex), key, sizeof(key));
		fmt(ce->path, sizeof(ce->path), "%s/%s.bundle", s->cachedir, hex);
		fmt(ce->source, sizeof(ce->source), "%s", sv->source);
		ce->s = s;
		ce->haves = calloc(sv->nhaves ? sv->nhaves : 1, sizeof(*ce->haves));
		/* the entry outlives the serve: it keeps a copy of the state for its tips */
		if (ce->haves == NULL || rs_copy_set(&ce->rs, &sv->rs.rs) < 0) {
			free(ce->haves);
			free(ce);
			return ME_ENOMEM;
		}
		for (size_t i = 0; i < sv->nhaves; i++)
			git_oid_fromraw(&ce->haves[ce->nhaves++], sv->haves[i]);
		ce->state = C_BUILDING;
		ce->next = s->cache;
		s->cache = ce;
		s->jobs++;
		uv_queue_work(s->loop, &ce->work, build_work, build_done);
	}
	ce->users++;
	ce->last_used_ms = me_mono_ms();
	sv->ce = ce;
	if (ce->state == C_BUILDING) {
		sv->phase = S_BUILDING;
		sv->next_waiting = ce->waiting;
		ce->waiting = sv;
		return 0;
	}
	serve_begin(sv);
	return 0;
}

/* The series is at the current state: send the part the requester lacks. With no haves, the
 * whole series; with the tips of one of its states, the bundles after it; otherwise a one-off
 * bundle for those haves. */
static void serve_plan(struct serve *sv, struct srepo *r)
{
	struct seg *first = NULL;
	int found = sv->nhaves == 0;

	if (found) {
		first = r->se.head;
	} else {
		for (struct seg *g = r->se.head; g; g = g->next) {
			if (g->ntips == sv->nhaves &&
			    memcmp(g->tips, sv->haves, g->ntips * ME_OID_LEN) == 0) {
				found = 1;
				first = g->next;
				break;
			}
		}
	}
	if (!found || r->se.tail == NULL || r->se.tail->seq != (int64_t)sv->rs.rs.seq) {
		if (serve_bundle(sv, (int64_t)sv->rs.rs.seq) < 0)
			serve_error(sv, ME_ENOMEM, "out of memory");
		return;
	}
	if (first == NULL) {
		/* Its refs are the newest state's, but it asked: it holds them under an older
		 * signed state that is not in our series (same tips, HEAD or seq differ). A bundle
		 * of the newest state without objects brings it there; refusing would leave it
		 * asking for ever, and never announcing the repository. */
		if (serve_bundle(sv, (int64_t)sv->rs.rs.seq) < 0)
			serve_error(sv, ME_ENOMEM, "out of memory");
		return;
	}
	for (struct seg *g = first; g; g = g->next)
		g->users++;
	sv->seg = first;
	sv->last = r->se.tail;
	serve_begin(sv);
}

static void serve_request(struct serve *sv, const struct xmsg *m)
{
	struct sync *s = sv->s;
	struct store_repo sr;
	size_t per_peer = 0, active = 0;
	struct srepo *r;

	for (struct serve *o = s->serves; o; o = o->next) {
		if (o == sv || o->phase == S_REQUEST || o->phase == S_FINISHED)
			continue;
		active++;
		per_peer += memcmp(o->peer, sv->peer, ME_PK_LEN) == 0;
	}
	if (active >= SYNC_MAX_SERVES || per_peer >= SYNC_MAX_SERVES_PER_PEER) {
		serve_error(sv, ME_EBUSY, "too many transfers at once");
		return;
	}
	fmt(sv->repo_id, sizeof(sv->repo_id), "%.*s", (int)m->repo_id.len, m->repo_id.ptr);
	if (store_repo_get(s->node->store, sv->repo_id, &sr) < 0) {
		serve_error(sv, ME_ENOTFOUND, "unknown repository");
		return;
	}
	if (serve_source(s, &sr, sv->source, sizeof(sv->source)) < 0) {
		serve_error(sv, ME_ENOTFOUND, "no up-to-date copy here");
		goto out;
	}
	if (me_did_key_parse(sr.creator, sv->creator_pk) < 0 || rs_from_store(s, &sr, &sv->rs) < 0) {
		serve_error(sv, ME_EINTERNAL, "cannot read the ref state");
		goto out;
	}
	sv->has_resume = m->has_resume;
	memcpy(sv->resume_digest, m->resume_digest, XMSG_DIGEST_LEN);
	sv->resume_offset = m->resume_offset;
	/* the haves, sorted and distinct: they are compared with the tips of the series' states */
	if (m->nhaves > 0) {
		if ((sv->haves = malloc(m->nhaves * ME_OID_LEN)) == NULL) {
			serve_error(sv, ME_ENOMEM, "out of memory");
			goto out;
		}
		memcpy(sv->haves, m->haves, m->nhaves * ME_OID_LEN);
		if (m->nhaves > 1)
			qsort(sv->haves, m->nhaves, ME_OID_LEN, oid_cmp);
		for (size_t i = 0; i < m->nhaves; i++)
			if (sv->nhaves == 0 ||
			    memcmp(sv->haves[sv->nhaves - 1], sv->haves[i], ME_OID_LEN) != 0)
				memmove(sv->haves[sv->nhaves++], sv->haves[i], ME_OID_LEN);
	}
	if ((r = srepo_get(s, sv->repo_id)) == NULL) {
		serve_error(sv, ME_ENOMEM, "out of memory");
		goto out;
	}
	series_load(s, r);
	if (r->se.tail != NULL && r->se.tail->seq == sr.ref_seq) {
		serve_plan(sv, r);
	} else if (r->jobs > 0 && sv->nhaves > 0) {
		/* a fetch is moving our series: answer this one with a one-off bundle */
		if (serve_bundle(sv, sr.ref_seq) < 0)
			serve_error(sv, ME_ENOMEM, "out of memory");
	} else if (series_extend(s, r, sv->source, &sv->rs.rs, sv->creator_pk) < 0) {
		serve_error(sv, ME_ENOMEM, "out of memory");
	} else {
		sv->phase = S_BUILDING;
		sv->next_waiting = r->se.waiting;
		r->se.waiting = sv;
	}
out:
	store_repo_clear(&sr);
}

static int serve_on_frame(void *ud, struct net_xfer *x, const uint8_t *body, size_t len)
{
	struct serve *sv = ud;
	struct xmsg m;
	(void)x;

	if (sv->phase != S_REQUEST)
		return -1; /* one request per stream */
	if (xmsg_decode(body, len, &m) < 0 || m.type != XMSG_REQUEST) {
		xmsg_free(&m);
		sv->s->stats.serves_failed++;
		return -1;
	}
	serve_request(sv, &m);
	xmsg_free(&m);
	return 0;
}

static void serve_on_writable(void *ud, struct net_xfer *x)
{
	(void)x;
	serve_pump(ud);
}

static void serve_on_closed(void *ud, struct net_xfer *x, uint64_t app_error, const char *why)
{
	struct serve *sv = ud;
	(void)x;
	if (sv->phase == S_FINISHED && app_error == 0) {
		if (sv->npieces > 0)
			sv->s->stats.serves_ok++;
	} else {
		sv->s->stats.serves_failed++;
		log_info("sync: transfer to %s ended early (%s, code 0x%" PRIx64 ")", sv->peer_did,
			 why ? why : "", app_error);
	}
	sv->x = NULL;
	serve_free(sv);
}

static const struct net_xfer_callbacks serve_cb = {
	.frame = serve_on_frame,
	.writable = serve_on_writable,
	.closed = serve_on_closed,
};

static int null_frame(void *ud, struct net_xfer *x, const uint8_t *b, size_t l)
{
	(void)ud, (void)x, (void)b, (void)l;
	return -1;
}

static void null_closed(void *ud, struct net_xfer *x, uint64_t e, const char *w)
{
	(void)ud, (void)x, (void)e, (void)w;
}

static const struct net_xfer_callbacks null_cb = { .frame = null_frame, .closed = null_closed };

int sync_xfer_accept(void *ud, struct peer *p, struct net_xfer *x)
{
	struct sync *s = ud;
	struct serve *sv;

	if (s->closing || s->nserves >= 4 * SYNC_MAX_SERVES || (sv = calloc(1, sizeof(*sv))) == NULL)
		return ME_EBUSY;
	sv->s = s;
	sv->x = x;
	sv->fd = -1;
	memcpy(sv->peer, net_peer_pk(p), ME_PK_LEN);
	fmt(sv->peer_did, sizeof(sv->peer_did), "%s", net_peer_did(p));
	sv->active_ms = me_mono_ms();
	sv->next = s->serves;
	if (s->serves)
		s->serves->prev = sv;
	s->serves = sv;
	s->nserves++;
	net_xfer_set_callbacks(x, &serve_cb, sv);
	return 0;
}

/* ---- public ---- */

int sync_init(struct sync **out, uv_loop_t *loop, struct node *node, char *err, size_t errsz)
{
	struct sync *s = calloc(1, sizeof(*s));

	if (s == NULL) {
		fmt(err, errsz, "out of memory");
		return ME_ENOMEM;
	}
	s->loop = loop;
	s->node = node;
	/* room for "/cache/<64 hex>.bundle.tmp" and "/tmp/<id>.part" under the root */
	if (strlen(node->cfg->root) + 128 >= PATH_MAX) {
		fmt(err, errsz, "data root path too long");
		free(s);
		return ME_ETOOBIG;
	}
	fmt(s->tmpdir, sizeof(s->tmpdir), "%s/tmp", node->cfg->root);
	fmt(s->cachedir, sizeof(s->cachedir), "%s/cache", node->cfg->root);
	fmt(s->seriesdir, sizeof(s->seriesdir), "%s/series", node->cfg->root);
	if (mkdir_0700(s->tmpdir) < 0 || mkdir_0700(s->cachedir) < 0 ||
	    mkdir_0700(s->seriesdir) < 0) {
		fmt(err, errsz, "cannot create %s or %s: %s", s->tmpdir, s->cachedir,
			 strerror(errno));
		free(s);
		return ME_EIO;
	}
	uv_timer_init(loop, &s->tick);
	uv_timer_init(loop, &s->kick);
	s->tick.data = s;
	s->kick.data = s;
	s->handles = 2;
	*out = s;
	return 0;
}

/* Removes what a previous run left: temporary bundles, cached bundles, interrupted applies. */
static void cleanup_previous_run(struct sync *s)
{
	struct store_repo *list;
	size_t n;

	empty_dir(s->tmpdir);
	empty_dir(s->cachedir);
	if (store_repo_list(s->node->store, &list, &n) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		git_repository *m = NULL;
		char err[ERRSZ];
		if (!list[i].is_external)
			continue;
		if (mirror_open(s->node->cfg->root, list[i].id, false, &m, err, sizeof(err)) == 0) {
			if (mirror_cleanup(m, err, sizeof(err)) < 0)
				log_warn("sync: cleaning the mirror of %s: %s", list[i].id, err);
			git_repository_free(m);
		}
	}
	store_repo_list_free(list, n);
}

void sync_start(struct sync *s, struct net *net)
{
	s->net = net;
	cleanup_previous_run(s);
	s->next_sweep_ms = 0; /* sweep at once: catch up with what the store knows */
	uv_timer_start(&s->tick, on_tick, TICK_MS, TICK_MS);
	kick(s);
}

static void on_handle_close(uv_handle_t *h)
{
	struct sync *s = h->data;
	s->handles--;
	if (s->handles == 0 && s->jobs == 0)
		sync_free(s);
}

void sync_free(struct sync *s)
{
	if (s == NULL)
		return;
	if (!s->closing) {
		s->closing = 1;
		uv_timer_stop(&s->tick);
		uv_timer_stop(&s->kick);
		uv_close((uv_handle_t *)&s->tick, on_handle_close);
		uv_close((uv_handle_t *)&s->kick, on_handle_close);
		for (struct srepo *r = s->repos; r; r = r->next) {
			waiters_done(r, ME_ESHUTDOWN, "daemon shutting down");
			struct fetch *f = r->fetch;
			if (f == NULL)
				continue;
			r->fetch = NULL;
			f->r = NULL;
			s->nfetches--;
			if (f->x != NULL) {
				net_xfer_set_callbacks(f->x, &null_cb, NULL);
				net_xfer_reset(f->x, NET_ERR_SHUTDOWN);
				f->x = NULL;
			}
			fetch_free(f); /* a verification running goes on without it */
		}
		while (s->serves) {
			struct serve *sv = s->serves;
			if (sv->x != NULL) {
				net_xfer_set_callbacks(sv->x, &null_cb, NULL);
				net_xfer_reset(sv->x, NET_ERR_SHUTDOWN);
				sv->x = NULL;
			}
			serve_free(sv);
		}
		return;
	}
	if (s->handles > 0 || s->jobs > 0)
		return; /* called again by the last close callback or job */
	while (s->repos) {
		struct srepo *r = s->repos;
		s->repos = r->next;
		series_clear(&r->se, 0);
		while (r->holders) {
			struct holder *h = r->holders;
			r->holders = h->next;
			free(h);
		}
		free(r);
	}
	while (s->cache) {
		struct centry *ce = s->cache;
		s->cache = ce->next;
		centry_delete(ce);
	}
	free(s);
}

void sync_announced(struct sync *s, const uint8_t origin_pk[ME_PK_LEN], const char *repo_id,
		    int64_t seq)
{
	struct srepo *r;
	struct holder *h;

	if (s == NULL || s->closing || (r = srepo_get(s, repo_id)) == NULL)
		return;
	for (h = r->holders; h; h = h->next)
		if (memcmp(h->pk, origin_pk, ME_PK_LEN) == 0)
			break;
	if (h == NULL) {
		if ((h = calloc(1, sizeof(*h))) == NULL)
			return;
		memcpy(h->pk, origin_pk, ME_PK_LEN);
		h->next = r->holders;
		r->holders = h;
	}
	int newer = seq > h->seq;
	h->seq = seq;
	h->seen_ms = me_now_ms();
	if (newer) {
		/* a state we may lack: look at once (and give holders that failed a new chance) */
		r->want = 1;
		r->retry_at_ms = 0;
		if (r->fetch == NULL)
			r->ntried = 0;
		kick(s);
	}
}

int sync_fetch(struct sync *s, const char *repo_id, const struct sync_waiter_cb *cb,
	       struct sync_waiter **out)
{
	struct store_repo sr;
	struct srepo *r;
	struct sync_waiter *w;
	int rc;

	if (s == NULL || s->closing)
		return ME_ESHUTDOWN;
	if ((rc = store_repo_get(s->node->store, repo_id, &sr)) < 0)
		return rc;
	int local = !sr.is_external;
	store_repo_clear(&sr);
	if (local)
		return ME_EINVAL;
	if ((r = srepo_get(s, repo_id)) == NULL || (w = calloc(1, sizeof(*w))) == NULL)
		return ME_ENOMEM;
	w->r = r;
	w->cb = *cb;
	w->since_ms = me_mono_ms();
	w->next = r->waiters;
	r->waiters = w;
	r->want = 1;
	r->retry_at_ms = 0;
	if (r->fetch == NULL)
		r->ntried = 0;
	if (out)
		*out = w;
	kick(s);
	return 0;
}

void sync_waiter_cancel(struct sync_waiter *w)
{
	if (w == NULL)
		return;
	if (w->r == NULL)
		return;
	for (struct sync_waiter **pp = &w->r->waiters; *pp; pp = &(*pp)->next) {
		if (*pp == w) {
			*pp = w->next;
			break;
		}
	}
	free(w);
}

void sync_status(struct sync *s, const char *repo_id, struct sync_status *out)
{
	struct store_repo sr;
	struct srepo *r;

	memset(out, 0, sizeof(*out));
	if (s == NULL)
		return;
	if (store_repo_get(s->node->store, repo_id, &sr) == 0) {
		out->mirror_seq = sr.mirror_seq;
		out->last_sync_ms = sr.last_sync_ms;
		fmt(out->error, sizeof(out->error), "%s", sr.sync_error ? sr.sync_error : "");
		r = srepo_find(s, repo_id);
		if (r != NULL) {
			size_t useful = 0;
			for (struct holder *h = r->holders; h; h = h->next) {
				out->nholders += h->seq >= sr.ref_seq;
				useful += h->seq > sr.mirror_seq;
			}
			if (r->fetch != NULL) {
				out->state = SYNC_RUNNING;
				out->done = r->fetch->bytes_done;
				out->total = r->fetch->bytes_total;
				out->verifying = r->fetch->phase == F_IDLE && r->fetch->verifying != NULL;
			} else if (sr.is_external && (r->waiters || (r->want && useful > 0)) &&
				   (sr.mirror_seq < sr.ref_seq || sr.mirror_seq == 0)) {
				out->state = SYNC_QUEUED;
			}
			if (r->error[0] && out->state != SYNC_IDLE)
				fmt(out->error, sizeof(out->error), "%s", r->error);
		}
		store_repo_clear(&sr);
	}
}

void sync_local_changed(struct sync *s, const char *repo_id)
{
	if (s == NULL)
		return;
	for (struct centry *ce = s->cache, *nx; ce; ce = nx) {
		nx = ce->next;
		if (strcmp(ce->repo_id, repo_id) == 0 && ce->state != C_BUILDING)
			centry_unlink(s, ce);
	}
	series_refresh(s, repo_id); /* the increment for the new state, built now */
}

void sync_get_stats(const struct sync *s, struct sync_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (s != NULL)
		*out = s->stats;
}

size_t sync_ntransfers(const struct sync *s)
{
	return s == NULL ? 0 : s->nfetches + s->nserves;
}
