/* Bundle verification in a child process with hard limits (see verify.h). */
#include "daemon/verify.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <git2.h>
#include <git2/sys/alloc.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/sha3.h"
#include "common/ids.h"
#include "common/util.h"
#include "daemon/footprint.h"
#include "daemon/gitrepo.h"
#include "daemon/gitutil.h"

#if defined(__SANITIZE_ADDRESS__)
#define VERIFY_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define VERIFY_ASAN 1
#endif
#endif

#define POLL_MS 20
#define VERIFY_MWINDOW_SIZE (32u << 20)
#define VERIFY_MWINDOW_LIMIT (256u << 20)
#define CPU_KILL_AFTER_S 5 /* RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL this much later */
#define REQ_VERSION 2
#define VERIFY_GO 'G'
#define FOLLOW_WAIT_MS 100 /* inotify is the wake-up; this only bounds a missed one */
#define NSTATS 7

extern char **environ;

/* The child: the daemon's go (child_check), once read. */
static int go_received;

/* Reads the daemon's go from the request pipe: 0, or ME_ECANCELED when the pipe ended (the
 * transfer failed, the daemon is gone) or said anything else. */
static int take_go(void)
{
	char c = 0;
	ssize_t k;

	while ((k = read(STDIN_FILENO, &c, 1)) < 0 && errno == EINTR)
		;
	if (k != 1 || c != VERIFY_GO || go_received)
		return ME_ECANCELED;
	go_received = 1;
	return 0;
}

__attribute__((format(printf, 3, 4)))
static void set_msg(char *buf, size_t sz, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sz, fmt, ap);
	va_end(ap);
}

static unsigned long long mib(uint64_t n)
{
	return (unsigned long long)(n >> 20);
}

/* ======================= the child ======================= */

/* libgit2's allocations, bounded: one larger than the memory limit fails at once (so a delta
 * announcing a 2 GiB result is refused the same way with or without RLIMIT_AS), and any
 * failure is remembered to name the cause. */
static size_t alloc_cap = SIZE_MAX;
static volatile int alloc_failed;

static void *a_check(void *p)
{
	if (p == NULL)
		alloc_failed = 1;
	return p;
}

static int a_over(size_t n)
{
	if (n > alloc_cap) {
		alloc_failed = 1;
		return 1;
	}
	return 0;
}

static void *a_malloc(size_t n, const char *file, int line)
{
	(void)file, (void)line;
	return a_over(n) ? NULL : a_check(malloc(n));
}

static void *a_calloc(size_t nelem, size_t elsize, const char *file, int line)
{
	(void)file, (void)line;
	if (elsize != 0 && nelem > SIZE_MAX / elsize) {
		alloc_failed = 1;
		return NULL;
	}
	return a_over(nelem * elsize) ? NULL : a_check(calloc(nelem, elsize));
}

static char *a_substrdup(const char *s, size_t n, const char *file, int line)
{
	char *p;

	if (n == SIZE_MAX || (p = a_malloc(n + 1, file, line)) == NULL)
		return NULL;
	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

static char *a_strdup(const char *s, const char *file, int line)
{
	return a_substrdup(s, strlen(s), file, line);
}

static char *a_strndup(const char *s, size_t n, const char *file, int line)
{
	return a_substrdup(s, strnlen(s, n), file, line);
}

static void *a_realloc(void *p, size_t n, const char *file, int line)
{
	(void)file, (void)line;
	return a_over(n) ? NULL : a_check(realloc(p, n));
}

static void *a_reallocarray(void *p, size_t nelem, size_t elsize, const char *file, int line)
{
	if (elsize != 0 && nelem > SIZE_MAX / elsize) {
		alloc_failed = 1;
		return NULL;
	}
	return a_realloc(p, nelem * elsize, file, line);
}

static void *a_mallocarray(size_t nelem, size_t elsize, const char *file, int line)
{
	return a_reallocarray(NULL, nelem, elsize, file, line);
}

static void a_free(void *p)
{
	free(p);
}

static git_allocator bounded_alloc = {
	a_malloc, a_calloc, a_strdup, a_strndup, a_substrdup, a_realloc, a_reallocarray,
	a_mallocarray, a_free,
};

/* The did:repo binding, checked on the first fetch: some root commit of the history (a commit
 * without parents reachable from the tips) hashed with the creator's key must give the
 * repository id. bundle_rx hands over the roots it met in the new pack; only when none of them
 * matches (the bundle is an increment on history the mirror already holds, or the claim is
 * false) is the whole history walked. */
struct bind_arg {
	const uint8_t *creator_pk;
	const char *repo_id;
	int refuted; /* set when no root commit matches: the claimed creator is not the creator */
	int binding, follow; /* what child_check does */
};

static bool root_matches(const struct bind_arg *b, const git_oid *root)
{
	char id[ME_DID_REPO_SIZE];

	return me_did_repo_compute(root->id, b->creator_pk, id, sizeof(id)) == 0 &&
	       strcmp(id, b->repo_id) == 0;
}

static int check_binding(git_repository *view, const struct gmsg_refstate *rs,
			 const git_oid *roots, size_t nroots, void *arg, char *err, size_t errsz)
{
	struct bind_arg *b = arg;
	git_revwalk *w = NULL;
	git_oid oid;
	int found = 0, pushed = 0;

	for (size_t i = 0; i < nroots; i++)
		if (root_matches(b, &roots[i]))
			return 0;
	if (git_revwalk_new(&w, view) < 0) {
		set_msg(err, errsz, "revwalk: %s",
			git_error_last() ? git_error_last()->message : "");
		return ME_EGIT;
	}
	for (size_t i = 0; i < rs->nrefs; i++) {
		git_oid t;
		git_object *o = NULL, *peeled = NULL;
		git_oid_fromraw(&t, rs->refs[i].oid);
		if (git_object_lookup(&o, view, &t, GIT_OBJECT_ANY) < 0)
			continue;
		if (git_object_peel(&peeled, o, GIT_OBJECT_COMMIT) == 0) {
			if (git_revwalk_push(w, git_object_id(peeled)) == 0)
				pushed++;
			git_object_free(peeled);
		}
		git_object_free(o);
	}
	while (pushed > 0 && !found && git_revwalk_next(&oid, w) == 0) {
		git_commit *c = NULL;
		if (git_commit_lookup(&c, view, &oid) < 0)
			continue;
		found = git_commit_parentcount(c) == 0 && root_matches(b, &oid);
		git_commit_free(c);
	}
	git_revwalk_free(w);
	if (found)
		return 0;
	b->refuted = 1;
	set_msg(err, errsz, "no root commit of this history gives the repository id with the "
		"creator's key");
	return ME_EPERM;
}

/* The last step before the mirror changes. A bundle that arrived while it was verified waits
 * here for the daemon's word that its transfer ended well (the Done frame checked): one byte
 * on the request pipe; its end instead means the transfer failed or the daemon is gone. So a
 * bundle is never applied before its transfer is complete, however fast the check was. */
static int child_check(git_repository *view, const struct gmsg_refstate *rs,
		       const git_oid *roots, size_t nroots, void *arg, char *err, size_t errsz)
{
	struct bind_arg *b = arg;

	if (b->follow && !go_received && take_go() < 0) {
		set_msg(err, errsz, "the transfer failed");
		return ME_ECANCELED;
	}
	return b->binding ? check_binding(view, rs, roots, nroots, b, err, errsz) : 0;
}

struct child_req {
	char root[PATH_MAX];
	char path[PATH_MAX];
	uint64_t max_bytes, mem_limit, cpu_s;
	int check_binding, follow;
	struct xmsg start;
};

static int u64_of(const msgpack_object *o, uint64_t *out)
{
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		return ME_EPROTO;
	*out = o->via.u64;
	return 0;
}

static int child_decode(const uint8_t *buf, size_t len, struct child_req *q)
{
	msgpack_zone zone;
	msgpack_object o;
	const msgpack_object *a;
	uint64_t v;
	int rc;

	memset(q, 0, sizeof(*q));
	if (len < ME_FRAME_HDR || (size_t)me_be32(buf) != len - ME_FRAME_HDR)
		return ME_EPROTO;
	msgpack_zone_init(&zone, 1024);
	rc = me_mp_unpack(buf + ME_FRAME_HDR, len - ME_FRAME_HDR, 64, &zone, &o);
	if (rc == 0 && (o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size != 9))
		rc = ME_EPROTO;
	if (rc == 0) {
		a = o.via.array.ptr;
		if (u64_of(&a[0], &v) < 0 || v != REQ_VERSION)
			rc = ME_EVERSION;
		else if (me_mp_strcpy(&a[1], q->root, sizeof(q->root)) < 0 ||
			 me_mp_strcpy(&a[2], q->path, sizeof(q->path)) < 0 ||
			 u64_of(&a[3], &q->max_bytes) < 0 || a[4].type != MSGPACK_OBJECT_BOOLEAN ||
			 u64_of(&a[5], &q->mem_limit) < 0 || u64_of(&a[6], &q->cpu_s) < 0 ||
			 a[7].type != MSGPACK_OBJECT_BIN || a[8].type != MSGPACK_OBJECT_BOOLEAN)
			rc = ME_EPROTO;
		else if ((rc = xmsg_decode((const uint8_t *)a[7].via.bin.ptr, a[7].via.bin.size,
					   &q->start)) == 0 && q->start.type != XMSG_START)
			rc = ME_EPROTO;
		if (rc == 0) {
			q->check_binding = a[4].via.boolean;
			q->follow = a[8].via.boolean;
		}
	}
	msgpack_zone_destroy(&zone);
	return rc;
}

static void child_reply(int rc, const char *msg, int refuted, const struct bundle_stats *st)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	size_t ml = strlen(msg);

	if (ml >= VERIFY_MSG_LEN)
		ml = VERIFY_MSG_LEN - 1;
	msgpack_sbuffer_init(&sb);
	me_frame_begin(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 4);
	msgpack_pack_int(&pk, rc);
	msgpack_pack_str(&pk, ml);
	msgpack_pack_str_body(&pk, msg, ml);
	if (refuted)
		msgpack_pack_true(&pk);
	else
		msgpack_pack_false(&pk);
	msgpack_pack_array(&pk, NSTATS);
	msgpack_pack_uint64(&pk, st->header_bytes);
	msgpack_pack_uint64(&pk, st->pack_bytes);
	msgpack_pack_uint64(&pk, st->objects);
	msgpack_pack_uint64(&pk, st->prereqs);
	msgpack_pack_uint64(&pk, st->refs);
	msgpack_pack_uint64(&pk, st->refs_updated);
	msgpack_pack_uint64(&pk, st->refs_deleted);
	if (me_frame_end(&sb, 0, VERIFY_MAX_REPLY) == 0)
		write_full(STDOUT_FILENO, sb.data, sb.size);
	msgpack_sbuffer_destroy(&sb);
}

static void child_limits(const struct child_req *q)
{
	struct rlimit rl = { 0, 0 };

	setrlimit(RLIMIT_CORE, &rl);
	rl.rlim_cur = (rlim_t)q->cpu_s;
	rl.rlim_max = (rlim_t)q->cpu_s + CPU_KILL_AFTER_S;
	setrlimit(RLIMIT_CPU, &rl);
#ifndef VERIFY_ASAN
	/* Under AddressSanitizer the shadow memory alone exceeds any such limit: the parent's
	 * watchdog on the resident size bounds the child there. */
	rl.rlim_cur = rl.rlim_max = (rlim_t)q->mem_limit;
	setrlimit(RLIMIT_AS, &rl);
#endif
	if (q->mem_limit < SIZE_MAX)
		alloc_cap = (size_t)q->mem_limit;
}

/* Waits for more of a bundle that is still arriving: ME_ECANCELED when the daemon is gone
 * (the request pipe, which it keeps open, ended). */
static int follow_wait(int ino)
{
	char ev[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	struct pollfd p[2] = { { STDIN_FILENO, POLLIN, 0 }, { ino, POLLIN, 0 } };

	if (poll(p, ino >= 0 ? 2 : 1, ino >= 0 ? FOLLOW_WAIT_MS : 5) > 0) {
		if (p[0].revents != 0 && take_go() < 0)
			return ME_ECANCELED;
		while (ino >= 0 && read(ino, ev, sizeof(ev)) > 0)
			;
	}
	return 0;
}

/* What the daemon did in-process before: open (or create) the mirror, feed the bundle to
 * bundle_rx (with follow: as it arrives, up to its size, checked against its digest), check
 * the binding on a first fetch. */
static int child_work(struct child_req *q, char *msg, size_t msgsz, int *refuted,
		      struct bundle_stats *st)
{
	const struct gmsg_refstate *rs = &q->start.refstate;
	struct bind_arg ba = { q->start.creator_pk, rs->repo_id.ptr, 0, 0, 0 };
	struct bundle_rx_opts o = { .max_bytes = q->max_bytes };
	git_repository *m = NULL;
	struct bundle_rx *rx = NULL;
	uint8_t *buf = NULL;
	char repo_id[ME_DID_REPO_SIZE];
	struct me_sha3 *h = NULL;
	uint64_t got = 0;
	int fd = -1, ino = -1, rc;

	msg[0] = '\0';
	if (rs->repo_id.len >= sizeof(repo_id))
		return ME_EBADID;
	memcpy(repo_id, rs->repo_id.ptr, rs->repo_id.len);
	repo_id[rs->repo_id.len] = '\0';
	ba.repo_id = repo_id;
	ba.binding = q->check_binding;
	ba.follow = q->follow;
	if (q->follow && q->start.parts.n > 0) {
		o.parts = &q->start.parts;
		o.size = q->start.total_size;
	}
	if (q->check_binding || q->follow) {
		o.check = child_check;
		o.check_arg = &ba;
		o.roots = q->check_binding;
	}
	if ((rc = mirror_open(q->root, repo_id, true, &m, msg, msgsz)) < 0)
		goto out;
	if ((fd = open(q->path, O_RDONLY | O_CLOEXEC)) < 0) {
		rc = ME_EIO;
		set_msg(msg, msgsz, "cannot open %s: %s", q->path, strerror(errno));
		goto out;
	}
	if ((buf = malloc(BUNDLE_CHUNK)) == NULL) {
		rc = ME_ENOMEM;
		goto out;
	}
	if ((rc = bundle_rx_new(&rx, m, rs, &o, msg, msgsz)) < 0)
		goto out;
	if (q->follow) {
		if ((h = me_sha3_new()) == NULL) {
			rc = ME_ENOMEM;
			goto out;
		}
		/* Watched before the first read: a write after a read that found nothing wakes
		 * the wait. Without inotify, the wait is a short sleep. */
		if ((ino = inotify_init1(IN_CLOEXEC | IN_NONBLOCK)) >= 0 &&
		    inotify_add_watch(ino, q->path, IN_MODIFY | IN_CLOSE_WRITE) < 0) {
			close(ino);
			ino = -1;
		}
	}
	for (;;) {
		size_t want = BUNDLE_CHUNK;
		ssize_t k;

		if (q->follow) {
			if (got == q->start.total_size)
				break;
			if (q->start.total_size - got < want)
				want = (size_t)(q->start.total_size - got);
		}
		k = read(fd, buf, want);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			rc = ME_EIO;
			set_msg(msg, msgsz, "read: %s", strerror(errno));
			goto out;
		}
		if (k == 0 && !q->follow)
			break;
		if (k == 0) { /* not here yet: the daemon kills us if it never comes */
			if ((rc = follow_wait(ino)) < 0) {
				set_msg(msg, msgsz, "the daemon is gone");
				goto out;
			}
			continue;
		}
		got += (uint64_t)k;
		if (h != NULL)
			me_sha3_update(h, buf, (size_t)k);
		if ((rc = bundle_rx_write(rx, buf, (size_t)k)) < 0)
			break;
	}
	if (rc == 0 && h != NULL) {
		uint8_t d[ME_SHA3_256_LEN];
		_Static_assert(sizeof(d) == XMSG_DIGEST_LEN, "digest size");
		if (me_sha3_final(h, d) < 0 || memcmp(d, q->start.digest, sizeof(d)) != 0) {
			rc = ME_EPROTO;
			set_msg(msg, msgsz, "bundle digest mismatch");
			goto out;
		}
	}
	if (rc == 0)
		rc = bundle_rx_finish(rx, st);
	if (rc < 0 && msg[0] == '\0')
		set_msg(msg, msgsz, "%s", bundle_rx_errmsg(rx));
out:
	if (ino >= 0)
		close(ino);
	me_sha3_free(h);
	bundle_rx_free(rx);
	free(buf);
	if (fd >= 0)
		close(fd);
	git_repository_free(m);
	*refuted = ba.refuted;
	return rc;
}

/* True when the process came within a few MiB of RLIMIT_AS (zlib's allocations, for one, are
 * not libgit2's: they fail as "failed to init zlib stream"). */
static int near_as_limit(uint64_t limit)
{
#ifdef VERIFY_ASAN
	(void)limit;
	return 0;
#else
	char line[128];
	unsigned long long kb = 0;
	FILE *f = fopen("/proc/self/status", "re");
	int near = 0;

	if (f == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL)
		if (sscanf(line, "VmPeak: %llu kB", &kb) == 1) {
			near = (uint64_t)kb * 1024 + (16u << 20) >= limit;
			break;
		}
	fclose(f);
	return near;
#endif
}

int verify_main(int argc, char **argv)
{
	static uint8_t req[VERIFY_MAX_REQUEST + ME_FRAME_HDR + 1];
	struct child_req q;
	struct bundle_stats st;
	char msg[VERIFY_MSG_LEN] = "";
	size_t len = 0;
	int rc, refuted = 0;

	(void)argc, (void)argv;
	/* Nothing of the parent but the two pipes and stderr; dies with the thread that
	 * started it. */
	if (close_range(STDERR_FILENO + 1, ~0u, 0) < 0)
		for (int fd = STDERR_FILENO + 1; fd < 1024; fd++)
			close(fd);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	signal(SIGPIPE, SIG_IGN);
	memset(&st, 0, sizeof(st));
	/* One frame; stdin stays open: its end tells that the daemon is gone (a daemon killed
	 * before the prctl above, while this process was still being loaded, sends no signal). */
	for (size_t want = ME_FRAME_HDR; len < want;) {
		ssize_t k = read(STDIN_FILENO, req + len, want - len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return 2;
		len += (size_t)k;
		if (len == ME_FRAME_HDR) {
			want += (size_t)me_be32(req);
			if (want > sizeof(req) - 1)
				want = sizeof(req); /* too long: refused below */
		}
	}
	if (len == sizeof(req) || child_decode(req, len, &q) < 0) {
		child_reply(ME_EPROTO, "verifier: bad request", 0, &st);
		_exit(1);
	}
	child_limits(&q);
	gitrepo_global_init();
	git_libgit2_opts(GIT_OPT_SET_ALLOCATOR, &bounded_alloc);
	/* libgit2 maps packs in windows of 1 GiB, up to 8 GiB in all by default: small ones
	 * keep the address space (RLIMIT_AS) for what the bundle needs, whatever the size of the
	 * mirror's packs the thin bases come from */
	git_libgit2_opts(GIT_OPT_SET_MWINDOW_SIZE, (size_t)VERIFY_MWINDOW_SIZE);
	git_libgit2_opts(GIT_OPT_SET_MWINDOW_MAPPED_LIMIT, (size_t)VERIFY_MWINDOW_LIMIT);
	/* The check parses each new object once: libgit2's object cache (up to 256 MiB of parsed
	 * trees and commits) would only hold on to memory. */
	git_libgit2_opts(GIT_OPT_ENABLE_CACHING, 0);
	/* The indexer computes each new object's id from its content; hashing it again on every
	 * read of the check (libgit2's default) took a third of the check's time. */
	git_libgit2_opts(GIT_OPT_ENABLE_STRICT_HASH_VERIFICATION, 0);
	/* What libgit2's start-up touched in the shared libraries (OpenSSL, for libssh2) is not
	 * needed for a pack: not resident while the indexer peaks. */
	footprint_trim();
	rc = child_work(&q, msg, sizeof(msg), &refuted, &st);
	/* Over the limit the bundle's size allows: the bundle's doing (ME_ETOOBIG), not this
	 * node's lack of memory (ME_ENOMEM is not held against the peer). */
	if (rc < 0 && (alloc_failed || rc == ME_ENOMEM || near_as_limit(q.mem_limit))) {
		rc = ME_ETOOBIG;
		set_msg(msg, sizeof(msg), "verifier exceeded its memory limit (%llu MiB)",
			mib(q.mem_limit));
	}
	child_reply(rc, msg, refuted, &st);
	/* No clean-up: the process ends here (and libgit2's known leaks with it). */
	_exit(0);
}

/* ======================= the parent ======================= */

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb, (void)type, (void)ftw;
	return remove(p) < 0 && errno != ENOENT ? -1 : 0;
}

/* The names in the mirror's objects/pack, one per line, with a leading newline ("\na\nb\n"). */
static char *pack_list(const char *mpath)
{
	char dir[PATH_MAX];
	struct dirent *de;
	DIR *d;
	char *out = strdup("\n");
	size_t len = 1;

	if (out == NULL || snprintf(dir, sizeof(dir), "%s/objects/pack", mpath) >= (int)sizeof(dir) ||
	    (d = opendir(dir)) == NULL)
		return out;
	while ((de = readdir(d)) != NULL) {
		size_t l = strlen(de->d_name);
		char *n;
		if (de->d_name[0] == '.' || (n = realloc(out, len + l + 2)) == NULL)
			continue;
		out = n;
		memcpy(out + len, de->d_name, l);
		len += l;
		out[len++] = '\n';
		out[len] = '\0';
	}
	closedir(d);
	return out;
}

/* Removes files of objects/pack that are not in before. */
static void pack_forget_new(const char *mpath, const char *before)
{
	char dir[PATH_MAX], p[PATH_MAX + 256], key[300];
	struct dirent *de;
	DIR *d;

	if (snprintf(dir, sizeof(dir), "%s/objects/pack", mpath) >= (int)sizeof(dir) ||
	    (d = opendir(dir)) == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.' ||
		    snprintf(key, sizeof(key), "\n%s\n", de->d_name) >= (int)sizeof(key) ||
		    strstr(before, key) != NULL)
			continue;
		if (snprintf(p, sizeof(p), "%s/%s", dir, de->d_name) < (int)sizeof(p))
			unlink(p);
	}
	closedir(d);
}

static bool states_equal(const struct mirror_state *a, const struct mirror_state *b)
{
	if (a->nrefs != b->nrefs || strcmp(a->head ? a->head : "", b->head ? b->head : "") != 0)
		return false;
	for (size_t i = 0; i < a->nrefs; i++)
		if (!gmsg_str_eq(a->refs[i].name, b->refs[i].name) ||
		    memcmp(a->refs[i].oid, b->refs[i].oid, ME_OID_LEN) != 0)
			return false;
	return true;
}

/* After a failed verification (a child killed, or one that ran out of memory and could not
 * clean up): what an interrupted apply can leave goes. */
static void restore_mirror(const char *root, const char *repo_id, const char *mpath,
			   const struct mirror_state *before, int have_before,
			   const char *packs_before)
{
	git_repository *m = NULL;
	struct mirror_state now;
	char err[256];

	if (mirror_open(root, repo_id, false, &m, err, sizeof(err)) < 0)
		return;
	mirror_cleanup(m, err, sizeof(err));
	memset(&now, 0, sizeof(now));
	/* A pack moved in before the refs changed is not used by anything: remove it. */
	if (have_before && packs_before != NULL &&
	    mirror_state_read(m, &now, err, sizeof(err)) == 0 && states_equal(before, &now))
		pack_forget_new(mpath, packs_before);
	mirror_state_free(&now);
	git_repository_free(m);
}

static int encode_request(const struct verify_req *r, uint64_t mem, unsigned cpu,
			  msgpack_sbuffer *out)
{
	static const uint8_t zero[XMSG_DIGEST_LEN];
	msgpack_sbuffer st;
	msgpack_packer pk;
	int rc;

	msgpack_sbuffer_init(&st);
	if ((rc = xmsg_encode_start_parts(&st, "verify", r->digest ? r->size : 0,
					  r->digest ? r->digest : zero, 0, r->creator_pk, r->rs,
					  r->digest ? r->parts : NULL)) < 0) {
		msgpack_sbuffer_destroy(&st);
		return rc;
	}
	me_frame_begin(out);
	msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 9);
	msgpack_pack_unsigned_int(&pk, REQ_VERSION);
	me_mp_pack_str(&pk, r->root);
	me_mp_pack_str(&pk, r->bundle_path);
	msgpack_pack_uint64(&pk, r->max_bytes);
	if (r->check_binding)
		msgpack_pack_true(&pk);
	else
		msgpack_pack_false(&pk);
	msgpack_pack_uint64(&pk, mem);
	msgpack_pack_uint64(&pk, cpu);
	msgpack_pack_bin(&pk, st.size - ME_FRAME_HDR);
	msgpack_pack_bin_body(&pk, st.data + ME_FRAME_HDR, st.size - ME_FRAME_HDR);
	if (r->digest != NULL)
		msgpack_pack_true(&pk);
	else
		msgpack_pack_false(&pk);
	msgpack_sbuffer_destroy(&st);
	return me_frame_end(out, 0, VERIFY_MAX_REQUEST);
}

static int decode_reply(const uint8_t *buf, size_t len, struct verify_res *res)
{
	msgpack_zone zone;
	msgpack_object o;
	const msgpack_object *a, *s;
	int rc;

	if (len < ME_FRAME_HDR || (size_t)me_be32(buf) != len - ME_FRAME_HDR)
		return ME_EPROTO;
	msgpack_zone_init(&zone, 512);
	rc = me_mp_unpack(buf + ME_FRAME_HDR, len - ME_FRAME_HDR, 64, &zone, &o);
	if (rc == 0 && (o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size != 4))
		rc = ME_EPROTO;
	if (rc == 0) {
		a = o.via.array.ptr;
		s = &a[3];
		if (!(a[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER && a[0].via.u64 == 0) &&
		    !(a[0].type == MSGPACK_OBJECT_NEGATIVE_INTEGER && a[0].via.i64 >= -1000))
			rc = ME_EPROTO;
		else if (a[1].type != MSGPACK_OBJECT_STR ||
		    a[2].type != MSGPACK_OBJECT_BOOLEAN || s->type != MSGPACK_OBJECT_ARRAY ||
		    s->via.array.size != NSTATS)
			rc = ME_EPROTO;
		for (uint32_t i = 0; rc == 0 && i < NSTATS; i++)
			if (s->via.array.ptr[i].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
				rc = ME_EPROTO;
	}
	if (rc == 0) {
		const uint64_t *v;
		uint64_t n[NSTATS];
		size_t ml = a[1].via.str.size < sizeof(res->msg) - 1 ? a[1].via.str.size
								      : sizeof(res->msg) - 1;
		for (uint32_t i = 0; i < NSTATS; i++)
			n[i] = s->via.array.ptr[i].via.u64;
		v = n;
		res->rc = a[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER ? 0 : (int)a[0].via.i64;
		if (ml > 0)
			memcpy(res->msg, a[1].via.str.ptr, ml);
		res->msg[ml] = '\0';
		for (size_t i = 0; i < ml; i++)
			if ((unsigned char)res->msg[i] < 0x20)
				res->msg[i] = ' ';
		res->refuted = a[2].via.boolean;
		res->st.header_bytes = v[0];
		res->st.pack_bytes = v[1];
		res->st.objects = (size_t)v[2];
		res->st.prereqs = (size_t)v[3];
		res->st.refs = (size_t)v[4];
		res->st.refs_updated = (size_t)v[5];
		res->st.refs_deleted = (size_t)v[6];
	}
	msgpack_zone_destroy(&zone);
	return rc;
}

/* The child's resident anonymous memory (resident minus file-backed pages). */
static uint64_t rss_bytes(pid_t pid)
{
	char p[64], buf[128];
	unsigned long long size = 0, res = 0, shared = 0;
	ssize_t n;
	int fd;

	snprintf(p, sizeof(p), "/proc/%d/statm", (int)pid);
	if ((fd = open(p, O_RDONLY | O_CLOEXEC)) < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	if (sscanf(buf, "%llu %llu %llu", &size, &res, &shared) != 3 || shared > res)
		return 0;
	/* file-backed pages (the packs libgit2 maps) are not what the limit is about */
	return (uint64_t)(res - shared) * (uint64_t)sysconf(_SC_PAGESIZE);
}

enum kill_why { K_NONE, K_MEM, K_TIME, K_CANCEL, K_ABORT };

/* Spawns the child, feeds it req, collects at most VERIFY_MAX_REPLY bytes of reply, enforces
 * the limits. Fills res from how it ended. */
static void run_child(const char *exe, const struct verify_req *r, const msgpack_sbuffer *req,
		      uint64_t mem, unsigned cpu, unsigned wall, struct verify_res *res)
{
	static uint8_t dummy[4096];
	uint8_t rbuf[VERIFY_MAX_REPLY + ME_FRAME_HDR];
	int in[2] = { -1, -1 }, out[2] = { -1, -1 };
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none, all;
	char *argv[] = { (char *)exe, (char *)VERIFY_ARG, NULL };
	size_t woff = 0, rlen = 0;
	int status = 0, overflow = 0, go_sent = r->digest == NULL, rc;
	enum kill_why why = K_NONE;
	int64_t deadline = me_mono_ms() + (int64_t)wall * 1000;
	pid_t pid;

	if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0) {
		res->rc = ME_EIO;
		set_msg(res->msg, sizeof(res->msg), "cannot start the verifier: %s",
			strerror(errno));
		goto close_pipes;
	}
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
	posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
	posix_spawn_file_actions_addclosefrom_np(&fa, STDERR_FILENO + 1);
#endif
	posix_spawnattr_init(&at);
	sigemptyset(&none);
	sigfillset(&all);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &all);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	rc = posix_spawn(&pid, exe, &fa, &at, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	if (rc != 0) {
		res->rc = ME_EIO;
		set_msg(res->msg, sizeof(res->msg), "cannot start the verifier %s: %s", exe,
			strerror(rc));
		goto close_pipes;
	}
	close(in[0]);
	close(out[1]);
	in[0] = out[1] = -1;
	fcntl(in[1], F_SETFL, O_NONBLOCK);
	fcntl(out[0], F_SETFL, O_NONBLOCK);

	for (;;) {
		struct pollfd p[2];
		nfds_t n = 0;
		int iw = -1, ir = -1;

		/* written, the pipe stays open until the child is gone: its end is the child's
		 * sign that we are */
		if (in[1] >= 0 && woff < req->size) {
			p[n] = (struct pollfd){ in[1], POLLOUT, 0 };
			iw = (int)n++;
		}
		if (out[0] >= 0) {
			p[n] = (struct pollfd){ out[0], POLLIN, 0 };
			ir = (int)n++;
		}
		if (poll(p, n, POLL_MS) < 0 && errno != EINTR)
			p[0].revents = 0;
		if (iw >= 0 && p[iw].revents != 0) {
			ssize_t k = write(in[1], req->data + woff, req->size - woff);
			if (k > 0)
				woff += (size_t)k;
			if (k < 0 && errno != EAGAIN && errno != EINTR) {
				close(in[1]);
				in[1] = -1;
			}
		}
		if (ir >= 0 && p[ir].revents != 0) {
			for (;;) {
				ssize_t k = rlen < sizeof(rbuf)
						    ? read(out[0], rbuf + rlen, sizeof(rbuf) - rlen)
						    : read(out[0], dummy, sizeof(dummy));
				if (k > 0 && rlen < sizeof(rbuf))
					rlen += (size_t)k;
				else if (k > 0)
					overflow = 1;
				if (k > 0)
					continue;
				if (k == 0 || (errno != EAGAIN && errno != EINTR)) {
					close(out[0]);
					out[0] = -1;
				}
				break;
			}
		}
		/* the bundle is complete and its transfer ended well: the child may apply it.
		 * arriving is read before abort: the daemon raises abort before it drops arriving,
		 * so arriving seen dropped by a failure means abort is seen raised. */
		if (!go_sent && in[1] >= 0 && woff == req->size &&
		    (r->arriving == NULL || !__atomic_load_n(r->arriving, __ATOMIC_SEQ_CST)) &&
		    (r->abort == NULL || !__atomic_load_n(r->abort, __ATOMIC_SEQ_CST))) {
			static const char go = VERIFY_GO;
			go_sent = write(in[1], &go, 1) == 1;
		}
		if ((rc = (int)waitpid(pid, &status, WNOHANG)) == pid)
			break;
		if (r->arriving != NULL && __atomic_load_n(r->arriving, __ATOMIC_SEQ_CST))
			/* the clock starts with the last byte */
			deadline = me_mono_ms() + (int64_t)wall * 1000;
		if (rss_bytes(pid) > mem)
			why = K_MEM;
		else if (me_mono_ms() > deadline)
			why = K_TIME;
		else if (r->cancel != NULL && *r->cancel)
			why = K_CANCEL;
		else if (r->abort != NULL && __atomic_load_n(r->abort, __ATOMIC_SEQ_CST))
			why = K_ABORT;
		if (why != K_NONE) {
			kill(pid, SIGKILL);
			while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
				;
			break;
		}
	}
	/* the child is gone: what it wrote is all in the pipe */
	while (out[0] >= 0 && rlen < sizeof(rbuf)) {
		ssize_t k = read(out[0], rbuf + rlen, sizeof(rbuf) - rlen);
		if (k <= 0)
			break;
		rlen += (size_t)k;
	}
	if (out[0] >= 0 && rlen == sizeof(rbuf) && read(out[0], dummy, 1) > 0)
		overflow = 1;

	res->killed = 1;
	if (why == K_MEM) {
		res->rc = ME_ETOOBIG;
		set_msg(res->msg, sizeof(res->msg), "verifier exceeded its memory limit (%llu MiB)",
			mib(mem));
	} else if (why == K_CANCEL) {
		res->rc = ME_ESHUTDOWN;
		set_msg(res->msg, sizeof(res->msg), "verifier stopped: the daemon is shutting down");
	} else if (why == K_ABORT) {
		res->rc = ME_ECANCELED;
		set_msg(res->msg, sizeof(res->msg), "verifier stopped: the transfer failed");
	} else if (why == K_TIME) {
		res->rc = ME_ETIMEDOUT;
		set_msg(res->msg, sizeof(res->msg), "verifier timed out (%u s)", wall);
	} else if (WIFSIGNALED(status) &&
		   (WTERMSIG(status) == SIGXCPU || WTERMSIG(status) == SIGKILL)) {
		/* we did not kill it: the CPU limit did */
		res->rc = ME_ETIMEDOUT;
		set_msg(res->msg, sizeof(res->msg), "verifier timed out (CPU limit of %u s)", cpu);
	} else if (WIFSIGNALED(status)) {
		res->rc = ME_EINTERNAL;
		set_msg(res->msg, sizeof(res->msg), "verifier crashed (signal %d)",
			WTERMSIG(status));
	} else if (WEXITSTATUS(status) != 0 || overflow ||
		   decode_reply(rbuf, rlen, res) < 0) {
		res->rc = ME_EINTERNAL;
		set_msg(res->msg, sizeof(res->msg), "verifier crashed (exit status %d%s)",
			WEXITSTATUS(status), WEXITSTATUS(status) == 0 ? ", no reply" : "");
	} else {
		res->killed = 0;
	}
close_pipes:
	for (int i = 0; i < 2; i++) {
		if (in[i] >= 0)
			close(in[i]);
		if (out[i] >= 0)
			close(out[i]);
	}
}

int verify_bundle(const struct verify_req *r, struct verify_res *res)
{
	char mpath[PATH_MAX], repo_id[ME_DID_REPO_SIZE], err[256];
	struct mirror_state before;
	struct stat sb;
	msgpack_sbuffer req;
	git_repository *m = NULL;
	char *packs = NULL;
	uint64_t size = 0, mem = r->mem_limit;
	unsigned cpu = r->cpu_limit_s, wall = r->wall_limit_s;
	int fresh, have_before = 0;

	memset(res, 0, sizeof(*res));
	memset(&before, 0, sizeof(before));
	if (r->rs == NULL || r->rs->repo_id.len >= sizeof(repo_id)) {
		res->rc = ME_EINVAL;
		set_msg(res->msg, sizeof(res->msg), "bad repository id");
		return res->rc;
	}
	memcpy(repo_id, r->rs->repo_id.ptr, r->rs->repo_id.len);
	repo_id[r->rs->repo_id.len] = '\0';
	if ((res->rc = mirror_path(r->root, repo_id, mpath, sizeof(mpath))) < 0) {
		set_msg(res->msg, sizeof(res->msg), "invalid mirror path");
		return res->rc;
	}
	if (r->digest != NULL)
		size = r->size;
	else if (stat(r->bundle_path, &sb) == 0 && sb.st_size > 0)
		size = (uint64_t)sb.st_size;
	if (mem == 0)
		mem = VERIFY_MEM_BASE + VERIFY_MEM_PER_BYTE * size;
	if (cpu == 0)
		cpu = VERIFY_CPU_BASE_S + (unsigned)(size >> 20);
	if (wall == 0)
		wall = 2 * cpu + VERIFY_WALL_EXTRA_S;

	/* A first fetch creates the mirror: when it fails, the mirror goes again, so the data
	 * root is exactly as before. Otherwise what the mirror holds now is what a killed
	 * verifier must leave. */
	fresh = lstat(mpath, &sb) < 0 && errno == ENOENT;
	if (!fresh && mirror_open(r->root, repo_id, false, &m, err, sizeof(err)) == 0) {
		have_before = mirror_state_read(m, &before, err, sizeof(err)) == 0;
		packs = pack_list(mpath);
		git_repository_free(m);
	}

	msgpack_sbuffer_init(&req);
	if ((res->rc = encode_request(r, mem, cpu, &req)) < 0)
		set_msg(res->msg, sizeof(res->msg), "cannot encode the verifier's request");
	else
		run_child(r->exe ? r->exe : "/proc/self/exe", r, &req, mem, cpu, wall, res);
	msgpack_sbuffer_destroy(&req);

	if (res->rc < 0 && fresh)
		nftw(mpath, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
	else if (res->rc < 0) /* a child out of memory may not even have cleaned up */
		restore_mirror(r->root, repo_id, mpath, &before, have_before, packs);
	mirror_state_free(&before);
	free(packs);
	return res->rc;
}
