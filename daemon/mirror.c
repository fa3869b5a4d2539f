#include "daemon/mirror.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <git2.h>
#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>
#include <git2/sys/odb_backend.h>
#include <sodium.h>

#include "common/err.h"
#include "common/ids.h"
#include "common/util.h"
#include "daemon/oidset.h"
#include "daemon/packidx.h"
#include "daemon/packreuse.h"
#include "daemon/packwrite.h"
#include "daemon/gitutil.h"
#include "daemon/thinpack.h"

_Static_assert(GIT_OID_RAWSZ == ME_OID_LEN, "oid size");

#define BUNDLE_SIG "# v2 git bundle"
#define BUNDLE_SIG_V3 "# v3 git bundle"
#define DID_REPO_PREFIX "did:repo:"
#define INCOMING_PREFIX "me-incoming-"
/* Smallest possible pack entry: a one-byte header and an empty zlib stream (8 bytes). Bounds
 * the object count a pack header may announce (libgit2 allocates arrays from it). */
#define PACK_MIN_ENTRY 9
#define REFLOG_MSG "megaengine: sync"
/* Commits an increment's boundary is looked for among by walking back from the tips, before
 * asking libgit2's revwalk (see boundary_fast). */
#define BOUNDARY_FAST_MAX 2000

/* ---- small helpers ---- */

static ssize_t read_some(int fd, void *buf, size_t len)
{
	ssize_t n;

	do
		n = read(fd, buf, len);
	while (n < 0 && errno == EINTR);
	return n;
}

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb;
	(void)type;
	(void)ftw;
	if (remove(p) < 0 && errno != ENOENT)
		return -1;
	return 0;
}

/* Removes a directory tree without following symbolic links. */
static int rm_tree(const char *path)
{
	if (nftw(path, rm_cb, 8, FTW_DEPTH | FTW_PHYS) < 0 && errno != ENOENT)
		return -1;
	return 0;
}

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The GIT_OID_HEXSZ lowercase hex digits starting s[0..len) (the caller checks what follows). */
static bool parse_hex_oid(const char *s, size_t len, git_oid *out)
{
	if (len < GIT_OID_HEXSZ)
		return false;
	for (size_t i = 0; i < GIT_OID_RAWSZ; i++) {
		int hi = hexval((unsigned char)s[2 * i]), lo = hexval((unsigned char)s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return false;
		out->id[i] = (unsigned char)(hi << 4 | lo);
	}
	return true;
}

static bool gstr_eq_cstr(struct gmsg_str a, const char *b)
{
	return gmsg_str_eq(a, gmsg_str(b));
}

/* ---- mirrors ---- */

int mirror_path(const char *root, const char *repo_id, char *buf, size_t sz)
{
	int n;

	if (root == NULL || root[0] == '\0' || repo_id == NULL || buf == NULL || sz == 0)
		return ME_EINVAL;
	if (strncmp(repo_id, DID_REPO_PREFIX, strlen(DID_REPO_PREFIX)) != 0 ||
	    !me_did_repo_valid(repo_id))
		return ME_EBADID;
	n = snprintf(buf, sz, "%s/repos/%s.git", root, repo_id + strlen(DID_REPO_PREFIX));
	if (n < 0 || (size_t)n >= sz)
		return ME_ETOOBIG;
	return 0;
}

static int mirror_init(const char *path, git_repository **out, char *err, size_t errsz)
{
	git_repository_init_options opts;

	git_repository_init_options_init(&opts, GIT_REPOSITORY_INIT_OPTIONS_VERSION);
	opts.flags = GIT_REPOSITORY_INIT_BARE | GIT_REPOSITORY_INIT_NO_REINIT;
	if (git_repository_init_ext(out, path, &opts) < 0) {
		int rc = gerr_git(err, errsz, ME_EGIT, "cannot create the mirror");
		rm_tree(path);
		return rc;
	}
	return 0;
}

int mirror_open(const char *root, const char *repo_id, bool create, git_repository **out,
		char *err, size_t errsz)
{
	char path[PATH_MAX], dir[PATH_MAX];
	struct stat sb;
	int rc, n;

	gerr_clear(err, errsz);
	if (out == NULL)
		return ME_EINVAL;
	*out = NULL;
	if ((rc = mirror_path(root, repo_id, path, sizeof(path))) < 0) {
		gerr_set(err, errsz, rc == ME_EBADID ? "invalid repository id" : "invalid mirror path");
		return rc;
	}
	if (create) {
		n = snprintf(dir, sizeof(dir), "%s/repos", root);
		if (n < 0 || (size_t)n >= sizeof(dir))
			return ME_ETOOBIG;
		if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
			gerr_set(err, errsz, "cannot create %s: %s", dir, strerror(errno));
			return ME_EIO;
		}
		if (lstat(dir, &sb) < 0 || !S_ISDIR(sb.st_mode)) {
			gerr_set(err, errsz, "%s is not a directory", dir);
			return ME_EIO;
		}
		if (mkdir(path, 0700) == 0)
			return mirror_init(path, out, err, errsz);
		if (errno != EEXIST) {
			gerr_set(err, errsz, "cannot create %s: %s", path, strerror(errno));
			return ME_EIO;
		}
		/* An empty directory is what a crash between mkdir and init leaves: start over.
		 * (rmdir fails on anything else, which is opened below.) */
		if (rmdir(path) == 0) {
			if (mkdir(path, 0700) == 0)
				return mirror_init(path, out, err, errsz);
			gerr_set(err, errsz, "cannot create %s: %s", path, strerror(errno));
			return ME_EIO;
		}
	}
	if (lstat(path, &sb) < 0) {
		if (errno == ENOENT) {
			gerr_set(err, errsz, "no mirror of %s", repo_id);
			return ME_ENOTFOUND;
		}
		gerr_set(err, errsz, "%s: %s", path, strerror(errno));
		return ME_EIO;
	}
	if (!S_ISDIR(sb.st_mode) ||
	    git_repository_open_ext(out, path, GIT_REPOSITORY_OPEN_NO_SEARCH |
				    GIT_REPOSITORY_OPEN_BARE, NULL) < 0) {
		*out = NULL;
		gerr_set(err, errsz, "%s is not a git repository", path);
		return ME_ENOTREPO;
	}
	return 0;
}

static int rm_lock_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	size_t l = strlen(p);

	(void)ftw;
	if (type == FTW_F && S_ISREG(sb->st_mode) && l > 5 && strcmp(p + l - 5, ".lock") == 0 &&
	    unlink(p) < 0 && errno != ENOENT)
		return -1;
	return 0;
}

int mirror_cleanup(git_repository *r, char *err, size_t errsz)
{
	static const char *const locks[] = { "HEAD.lock", "packed-refs.lock" };
	char p[PATH_MAX];
	const char *gitdir;
	struct dirent *de;
	DIR *d;
	int rc = 0, n;

	gerr_clear(err, errsz);
	if (r == NULL || (gitdir = git_repository_path(r)) == NULL)
		return ME_EINVAL;
	if ((d = opendir(gitdir)) == NULL) {
		gerr_set(err, errsz, "%s: %s", gitdir, strerror(errno));
		return ME_EIO;
	}
	while ((de = readdir(d)) != NULL) {
		if (strncmp(de->d_name, INCOMING_PREFIX, strlen(INCOMING_PREFIX)) != 0)
			continue;
		n = snprintf(p, sizeof(p), "%s%s", gitdir, de->d_name);
		if (n < 0 || (size_t)n >= sizeof(p) || rm_tree(p) < 0) {
			gerr_set(err, errsz, "cannot remove %s%s", gitdir, de->d_name);
			rc = ME_EIO;
		}
	}
	closedir(d);
	for (size_t i = 0; i < sizeof(locks) / sizeof(locks[0]); i++) {
		n = snprintf(p, sizeof(p), "%s%s", gitdir, locks[i]);
		if (n > 0 && (size_t)n < sizeof(p) && unlink(p) < 0 && errno != ENOENT) {
			gerr_set(err, errsz, "cannot remove %s: %s", p, strerror(errno));
			rc = ME_EIO;
		}
	}
	n = snprintf(p, sizeof(p), "%srefs", gitdir);
	if (n < 0 || (size_t)n >= sizeof(p) ||
	    (nftw(p, rm_lock_cb, 8, FTW_PHYS) != 0 && errno != ENOENT)) {
		gerr_set(err, errsz, "cannot remove stale ref locks in %s", p);
		rc = ME_EIO;
	}
	return rc;
}

/* ---- mirror state ---- */

void mirror_state_free(struct mirror_state *s)
{
	if (s == NULL)
		return;
	for (size_t i = 0; i < s->nrefs; i++)
		free((char *)s->refs[i].name.ptr);
	free(s->refs);
	free(s->head);
	memset(s, 0, sizeof(*s));
}

static int state_push(struct mirror_state *s, size_t *cap, const char *name, const git_oid *oid)
{
	char *dup;

	if (s->nrefs == *cap) {
		size_t ncap = *cap ? *cap * 2 : 16;
		struct gmsg_ref *p;
		if (ncap < *cap || ncap > SIZE_MAX / sizeof(*p) ||
		    (p = realloc(s->refs, ncap * sizeof(*p))) == NULL)
			return ME_ENOMEM;
		s->refs = p;
		*cap = ncap;
	}
	if ((dup = strdup(name)) == NULL)
		return ME_ENOMEM;
	s->refs[s->nrefs].name = gmsg_str(dup);
	memcpy(s->refs[s->nrefs].oid, oid->id, ME_OID_LEN);
	s->nrefs++;
	return 0;
}

static int state_collect(git_repository *r, const char *glob, struct mirror_state *s,
			 size_t *cap, char *err, size_t errsz)
{
	git_reference_iterator *it = NULL;
	git_reference *ref = NULL, *res = NULL;
	int rc = 0, grc;

	if (git_reference_iterator_glob_new(&it, r, glob) < 0)
		return gerr_git(err, errsz, ME_EGIT, "cannot list refs");
	while ((grc = git_reference_next(&ref, it)) == 0) {
		const git_oid *oid = NULL;

		if (git_reference_type(ref) == GIT_REFERENCE_SYMBOLIC) {
			if (git_reference_resolve(&res, ref) == 0)
				oid = git_reference_target(res);
		} else {
			oid = git_reference_target(ref);
		}
		if (oid != NULL && (rc = state_push(s, cap, git_reference_name(ref), oid)) < 0)
			gerr_nomem(err, errsz);
		git_reference_free(res);
		git_reference_free(ref);
		res = ref = NULL;
		if (rc < 0)
			break;
	}
	if (rc == 0 && grc != GIT_ITEROVER)
		rc = gerr_git(err, errsz, ME_EGIT, "cannot list refs");
	git_reference_iterator_free(it);
	return rc;
}

int mirror_state_read(git_repository *r, struct mirror_state *out, char *err, size_t errsz)
{
	git_reference *head = NULL;
	const char *t = "";
	size_t cap = 0;
	int rc;

	gerr_clear(err, errsz);
	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (r == NULL)
		return ME_EINVAL;
	if ((rc = state_collect(r, "refs/heads/*", out, &cap, err, errsz)) < 0 ||
	    (rc = state_collect(r, "refs/tags/*", out, &cap, err, errsz)) < 0)
		goto fail;
	if (out->nrefs > 1)
		qsort(out->refs, out->nrefs, sizeof(*out->refs), gmsg_ref_cmp);
	if (git_reference_lookup(&head, r, "HEAD") < 0) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot read HEAD");
		goto fail;
	}
	if (git_reference_type(head) == GIT_REFERENCE_SYMBOLIC &&
	    git_reference_symbolic_target(head) != NULL)
		t = git_reference_symbolic_target(head);
	out->head = strdup(t);
	git_reference_free(head);
	if (out->head == NULL) {
		rc = gerr_nomem(err, errsz);
		goto fail;
	}
	return 0;
fail:
	mirror_state_free(out);
	return rc;
}

bool mirror_state_matches(const struct mirror_state *s, const struct gmsg_refstate *rs)
{
	if (s == NULL || rs == NULL || s->nrefs != rs->nrefs)
		return false;
	for (size_t i = 0; i < s->nrefs; i++)
		if (!gmsg_str_eq(s->refs[i].name, rs->refs[i].name) ||
		    memcmp(s->refs[i].oid, rs->refs[i].oid, ME_OID_LEN) != 0)
			return false;
	return rs->head.len == 0 || (s->head != NULL && gstr_eq_cstr(rs->head, s->head));
}

int mirror_haves(git_repository *r, git_oid *out, size_t max, size_t *n, char *err,
		 size_t errsz)
{
	struct mirror_state s;
	struct oidset seen;
	int rc;

	if (n != NULL)
		*n = 0;
	if (r == NULL || n == NULL || (out == NULL && max > 0))
		return ME_EINVAL;
	if ((rc = mirror_state_read(r, &s, err, errsz)) < 0)
		return rc;
	if ((rc = oidset_init(&seen)) < 0) {
		mirror_state_free(&s);
		return rc;
	}
	for (size_t i = 0; i < s.nrefs && *n < max; i++) {
		git_oid oid;

		git_oid_fromraw(&oid, s.refs[i].oid);
		if ((rc = oidset_put(&seen, &oid, 0)) < 0) {
			gerr_nomem(err, errsz);
			break;
		}
		if (rc == 1)
			git_oid_cpy(&out[(*n)++], &oid);
		rc = 0;
	}
	oidset_free(&seen);
	mirror_state_free(&s);
	return rc;
}

/* ---- bundle header ---- */

/* Incremental scan for the end of a header: lines, their lengths and the total are bounded
 * before anything is kept. */
struct hscan {
	size_t pos; /* bytes scanned */
	size_t line_start;
	size_t nlines;
};

/* Scans buf[sc->pos..len) (buf holds everything seen so far). 1: the header ends at sc->pos;
 * 0: more data needed; < 0: error. */
static int hscan_run(struct hscan *sc, const char *buf, size_t len, char *err, size_t errsz)
{
	while (sc->pos < len) {
		const char *nl = memchr(buf + sc->pos, '\n', len - sc->pos);
		size_t end = nl != NULL ? (size_t)(nl - buf) : len;

		if (end - sc->line_start > BUNDLE_MAX_LINE) {
			gerr_set(err, errsz, "bundle header line longer than %u bytes",
				BUNDLE_MAX_LINE);
			return ME_ETOOBIG;
		}
		if (nl == NULL) {
			sc->pos = len;
			break;
		}
		sc->pos = end + 1;
		if (sc->pos > BUNDLE_MAX_HEADER) {
			gerr_set(err, errsz, "bundle header larger than %u bytes", BUNDLE_MAX_HEADER);
			return ME_ETOOBIG;
		}
		if (end == sc->line_start) {
			if (sc->nlines == 0) {
				gerr_set(err, errsz, "not a v2 git bundle");
				return ME_EPROTO;
			}
			return 1;
		}
		if (++sc->nlines > BUNDLE_MAX_LINES) {
			gerr_set(err, errsz, "bundle header has more than %u lines",
				BUNDLE_MAX_LINES);
			return ME_ETOOBIG;
		}
		if (sc->nlines == 1) {
			size_t l = end - sc->line_start;
			const char *s = buf + sc->line_start;

			if (l == strlen(BUNDLE_SIG_V3) && memcmp(s, BUNDLE_SIG_V3, l) == 0) {
				gerr_set(err, errsz, "v3 git bundles are not supported");
				return ME_EVERSION;
			}
			if (l != strlen(BUNDLE_SIG) || memcmp(s, BUNDLE_SIG, l) != 0) {
				gerr_set(err, errsz, "not a v2 git bundle");
				return ME_EPROTO;
			}
		}
		sc->line_start = sc->pos;
	}
	if (sc->pos >= BUNDLE_MAX_HEADER) {
		gerr_set(err, errsz, "bundle header larger than %u bytes", BUNDLE_MAX_HEADER);
		return ME_ETOOBIG;
	}
	return 0;
}

void bundle_header_free(struct bundle_header *h)
{
	if (h == NULL)
		return;
	free(h->buf);
	free(h->prereqs);
	free(h->refs);
	memset(h, 0, sizeof(*h));
}

static int bref_cmp(const void *a, const void *b)
{
	return strcmp(((const struct bundle_ref *)a)->name, ((const struct bundle_ref *)b)->name);
}

/* Parses a complete header of hlen bytes (hscan_run accepted it: it ends with a blank line and
 * satisfies the size limits). */
static int header_parse(const char *src, size_t hlen, struct bundle_header *out, char *err,
			size_t errsz)
{
	size_t npre = 0, nref = 0, pos, lineno = 1;
	char *b;
	int rc = ME_EPROTO;

	memset(out, 0, sizeof(*out));
	if ((out->buf = malloc(hlen + 1)) == NULL)
		return gerr_nomem(err, errsz);
	b = out->buf;
	memcpy(b, src, hlen);
	b[hlen] = '\0';
	out->len = hlen;

	/* First pass: count, to allocate exactly. */
	pos = strlen(BUNDLE_SIG) + 1;
	for (size_t p = pos; p < hlen && b[p] != '\n';) {
		char *nl = memchr(b + p, '\n', hlen - p);
		if (nl == NULL)
			break;
		if (b[p] == '-')
			npre++;
		else
			nref++;
		p = (size_t)(nl - b) + 1;
	}
	if (nref > GMSG_MAX_REFS) {
		gerr_set(err, errsz, "bundle has more than %u refs", GMSG_MAX_REFS);
		rc = ME_ETOOBIG;
		goto fail;
	}
	if ((npre > 0 && (out->prereqs = calloc(npre, sizeof(*out->prereqs))) == NULL) ||
	    (nref > 0 && (out->refs = calloc(nref, sizeof(*out->refs))) == NULL)) {
		rc = gerr_nomem(err, errsz);
		goto fail;
	}

	while (pos < hlen && b[pos] != '\n') {
		char *line = b + pos, *nl = memchr(line, '\n', hlen - pos);
		size_t l;

		if (nl == NULL)
			break; /* cannot happen: the header ends with "\n\n" */
		l = (size_t)(nl - line);
		*nl = '\0';
		pos += l + 1;
		lineno++;
		if (memchr(line, '\0', l) != NULL) {
			gerr_set(err, errsz, "bundle header line %zu: NUL byte", lineno);
			goto fail;
		}
		if (line[0] == '@') {
			gerr_set(err, errsz, "bundle capabilities are not supported");
			rc = ME_EVERSION;
			goto fail;
		}
		if (line[0] == '-') {
			git_oid *o = &out->prereqs[out->nprereqs];
			if (!parse_hex_oid(line + 1, l - 1, o) ||
			    (l > 1 + GIT_OID_HEXSZ && line[1 + GIT_OID_HEXSZ] != ' ')) {
				gerr_set(err, errsz, "bundle header line %zu: bad prerequisite",
					lineno);
				goto fail;
			}
			out->nprereqs++;
			continue;
		}
		struct bundle_ref *r = &out->refs[out->nrefs];
		if (l < GIT_OID_HEXSZ + 2 || !parse_hex_oid(line, l, &r->oid) ||
		    line[GIT_OID_HEXSZ] != ' ') {
			gerr_set(err, errsz, "bundle header line %zu: bad ref line", lineno);
			goto fail;
		}
		r->name = line + GIT_OID_HEXSZ + 1;
		if (!gmsg_refname_valid(r->name, l - GIT_OID_HEXSZ - 1)) {
			gerr_set(err, errsz, "bundle header line %zu: invalid ref name", lineno);
			goto fail;
		}
		out->nrefs++;
	}
	if (out->nrefs > 1)
		qsort(out->refs, out->nrefs, sizeof(*out->refs), bref_cmp);
	for (size_t i = 1; i < out->nrefs; i++)
		if (strcmp(out->refs[i - 1].name, out->refs[i].name) == 0) {
			gerr_set(err, errsz, "bundle lists %s twice", out->refs[i].name);
			goto fail;
		}
	return 0;
fail:
	bundle_header_free(out);
	return rc;
}

int bundle_header_parse(const void *buf, size_t len, struct bundle_header *out, char *err,
			size_t errsz)
{
	struct hscan sc = { 0, 0, 0 };
	size_t n = len < BUNDLE_MAX_HEADER ? len : BUNDLE_MAX_HEADER;
	int rc;

	gerr_clear(err, errsz);
	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (buf == NULL && len > 0)
		return ME_EINVAL;
	if ((rc = hscan_run(&sc, buf, n, err, errsz)) < 0)
		return rc;
	if (rc == 0) {
		gerr_set(err, errsz, "truncated bundle header");
		return ME_EPROTO;
	}
	return header_parse(buf, sc.pos, out, err, errsz);
}

int bundle_read_header(int fd, struct bundle_header *out, char *err, size_t errsz)
{
	struct hscan sc = { 0, 0, 0 };
	char *buf = NULL;
	size_t len = 0, cap = 0;
	bool seekable;
	int rc = 0;

	gerr_clear(err, errsz);
	if (out == NULL)
		return ME_EINVAL;
	memset(out, 0, sizeof(*out));
	if (fd < 0)
		return ME_EINVAL;
	seekable = lseek(fd, 0, SEEK_CUR) >= 0;
	while (rc == 0) {
		size_t want = seekable ? 4096 : 1;
		ssize_t got;

		if (len + want > cap) {
			size_t ncap = cap ? cap * 2 : 4096;
			char *p;
			if (ncap > BUNDLE_MAX_HEADER)
				ncap = BUNDLE_MAX_HEADER;
			if (ncap <= len) {
				gerr_set(err, errsz, "bundle header larger than %u bytes",
					BUNDLE_MAX_HEADER);
				rc = ME_ETOOBIG;
				break;
			}
			if ((p = realloc(buf, ncap)) == NULL) {
				rc = gerr_nomem(err, errsz);
				break;
			}
			buf = p;
			cap = ncap;
		}
		if (want > cap - len)
			want = cap - len;
		if ((got = read_some(fd, buf + len, want)) < 0) {
			gerr_set(err, errsz, "cannot read the bundle: %s", strerror(errno));
			rc = ME_EIO;
			break;
		}
		if (got == 0) {
			gerr_set(err, errsz, "truncated bundle header");
			rc = ME_EPROTO;
			break;
		}
		len += (size_t)got;
		rc = hscan_run(&sc, buf, len, err, errsz);
	}
	if (rc == 1) {
		if (len > sc.pos && lseek(fd, -(off_t)(len - sc.pos), SEEK_CUR) < 0) {
			gerr_set(err, errsz, "cannot seek in the bundle: %s", strerror(errno));
			rc = ME_EIO;
		} else {
			rc = header_parse(buf, sc.pos, out, err, errsz);
		}
	}
	free(buf);
	return rc;
}

/* ---- bundle writer ---- */

struct wctx {
	int fd;
	uint64_t bytes;
	int err; /* -errno */
};

static int pack_cb(void *buf, size_t size, void *payload)
{
	struct wctx *w = payload;
	int rc = write_full(w->fd, buf, size);

	if (rc < 0) {
		w->err = rc;
		return -1;
	}
	w->bytes += size;
	return 0;
}

static bool tips_valid(const struct gmsg_ref *tips, size_t ntips)
{
	if (ntips > GMSG_MAX_REFS || (ntips > 0 && tips == NULL))
		return false;
	for (size_t i = 0; i < ntips; i++) {
		if (!gmsg_refname_valid(tips[i].name.ptr, tips[i].name.len))
			return false;
		if (i > 0 && gmsg_str_cmp(tips[i - 1].name, tips[i].name) >= 0)
			return false;
	}
	return true;
}

/* Header text: signature, prerequisites, refs, blank line. ME_ETOOBIG beyond the limits. */
static int header_build(const struct oidvec *pre, const struct gmsg_ref *tips, size_t ntips,
			char **out, size_t *outlen)
{
	size_t len = strlen(BUNDLE_SIG) + 2, off;
	char *b;

	if (pre->n + ntips > BUNDLE_MAX_LINES - 1)
		return ME_ETOOBIG;
	len += pre->n * (GIT_OID_HEXSZ + 2);
	for (size_t i = 0; i < ntips; i++)
		len += GIT_OID_HEXSZ + 2 + tips[i].name.len;
	if (len > BUNDLE_MAX_HEADER)
		return ME_ETOOBIG;
	if ((b = malloc(len + 1)) == NULL)
		return ME_ENOMEM;
	off = (size_t)sprintf(b, "%s\n", BUNDLE_SIG);
	for (size_t i = 0; i < pre->n; i++) {
		b[off++] = '-';
		git_oid_tostr(b + off, GIT_OID_HEXSZ + 1, &pre->v[i]);
		off += GIT_OID_HEXSZ;
		b[off++] = '\n';
	}
	for (size_t i = 0; i < ntips; i++) {
		git_oid oid;

		git_oid_fromraw(&oid, tips[i].oid);
		git_oid_tostr(b + off, GIT_OID_HEXSZ + 1, &oid);
		off += GIT_OID_HEXSZ;
		b[off++] = ' ';
		memcpy(b + off, tips[i].name.ptr, tips[i].name.len);
		off += tips[i].name.len;
		b[off++] = '\n';
	}
	b[off++] = '\n';
	*out = b;
	*outlen = off;
	return 0;
}

/* Hides the haves src knows in walk; returns how many were hidden (or < 0). */
static int hide_haves(git_revwalk *walk, git_odb *odb, const git_oid *haves, size_t nhaves,
		      char *err, size_t errsz)
{
	int hidden = 0;

	for (size_t i = 0; i < nhaves; i++) {
		if (!git_odb_exists_ext(odb, &haves[i], GIT_ODB_LOOKUP_NO_REFRESH))
			continue;
		if (git_revwalk_hide(walk, &haves[i]) < 0) {
			const git_error *e = git_error_last();
			if (e != NULL && e->klass == GIT_ERROR_NOMEMORY)
				return gerr_nomem(err, errsz);
			git_error_clear(); /* not a commit-ish: nothing to hide */
			continue;
		}
		hidden++;
	}
	return hidden;
}

/* Either way, once the included commits (inc) and the boundary (pre) are known: only the
 * included tips stay in tipc (the receiver has the others), the boundary sorted. */
static void boundary_done(struct oidvec *tipc, const struct oidset *inc, struct oidvec *pre)
{
	size_t j = 0;

	for (size_t i = 0; i < tipc->n; i++)
		if (oidset_has(inc, &tipc->v[i]))
			git_oid_cpy(&tipc->v[j++], &tipc->v[i]);
	tipc->n = j;
	if (pre->n > 1)
		qsort(pre->v, pre->n, sizeof(*pre->v), oid_cmp);
}

/* Does a walk down from the commits of from (breadth first, at most max commits) meet a
 * commit of set? 1 yes, 0 not within max, or an error. */
static int reaches_any(git_repository *src, const struct oidset *from, const struct oidset *set,
		       size_t max, char *err, size_t errsz)
{
	struct oidset seen;
	struct oidvec q = { NULL, 0, 0 };
	git_commit *c = NULL;
	int rc = 0;

	if ((rc = oidset_init(&seen)) < 0)
		return rc;
	for (size_t i = 0; i < from->cap && rc == 0; i++)
		if (from->slots[i].used && (oidset_put(&seen, &from->slots[i].oid, 0) < 0 ||
					    oidvec_push(&q, &from->slots[i].oid) < 0))
			rc = gerr_nomem(err, errsz);
	for (size_t h = 0; rc == 0 && h < q.n && h < max; h++) {
		if (oidset_has(set, &q.v[h])) {
			rc = 1;
			break;
		}
		if (git_commit_lookup(&c, src, &q.v[h]) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
			break;
		}
		for (unsigned p = 0, np = git_commit_parentcount(c); rc == 0 && p < np; p++) {
			const git_oid *pid = git_commit_parent_id(c, p);
			int r = oidset_put(&seen, pid, 0);
			if (r < 0 || (r == 1 && oidvec_push(&q, pid) < 0))
				rc = gerr_nomem(err, errsz);
		}
		git_commit_free(c);
		c = NULL;
	}
	git_commit_free(c);
	free(q.v);
	oidset_free(&seen);
	return rc;
}

/* The fast way (commits_until): walking back from the tips until the haves (peeled to
 * commits). *usable: how many haves are commits here. It does not know what the haves reach:
 * a new branch from an older commit, or a merge of one, would walk down to some have below
 * (a release tag) and resend what lies between. So the haves' own history is walked down as
 * far (breadth first, BOUNDARY_FAST_MAX commits): when it meets a commit the fast walk took
 * for new, or the fast walk went far or to a root, ME_ETOOBIG (libgit2's revwalk decides). A
 * new commit reachable from the haves only deeper than that is sent again (the bundle stays
 * valid: its prerequisites are haves). */
static int boundary_fast(git_repository *src, git_odb *odb, struct oidvec *tipc,
			 const git_oid *haves, size_t nhaves, struct oidvec *pre,
			 struct oidvec *order, size_t *usable, char *err, size_t errsz)
{
	struct oidset stop, inc;
	int rc;

	*usable = 0;
	if ((rc = oidset_init(&stop)) < 0)
		return rc;
	if ((rc = oidset_init(&inc)) < 0) {
		oidset_free(&stop);
		return rc;
	}
	for (size_t i = 0; i < nhaves; i++) {
		git_object *o = NULL, *pc = NULL;
		if (!git_odb_exists_ext(odb, &haves[i], GIT_ODB_LOOKUP_NO_REFRESH))
			continue;
		if (git_object_lookup(&o, src, &haves[i], GIT_OBJECT_ANY) == 0 &&
		    git_object_peel(&pc, o, GIT_OBJECT_COMMIT) == 0) {
			rc = oidset_put(&stop, git_object_id(pc), 0) < 0 ? ME_ENOMEM : 0;
			(*usable)++;
		}
		git_error_clear(); /* not a commit-ish: nothing to stop at */
		git_object_free(pc);
		git_object_free(o);
		if (rc < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	}
	if (*usable == 0)
		goto out;
	if ((rc = commits_until(src, tipc, &stop, BOUNDARY_FAST_MAX, order, pre, err,
				errsz)) < 0)
		goto out;
	for (size_t i = 0; i < order->n; i++)
		if (oidset_put(&inc, &order->v[i], 0) < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	if ((rc = reaches_any(src, &stop, &inc, BOUNDARY_FAST_MAX, err, errsz)) != 0) {
		if (rc == 1)
			rc = ME_ETOOBIG;
		goto out;
	}
	boundary_done(tipc, &inc, pre);
out:
	oidset_free(&stop);
	oidset_free(&inc);
	return rc;
}

/* The boundary of tips minus haves: the excluded parents of the included commits. Drops the
 * excluded tip commits from tipc: the receiver has them, and walking from the included tips
 * while hiding the boundary gives exactly the included commits (the first excluded commit on
 * any path from an included tip is a boundary commit). Nothing is walked when no have is
 * usable. */
static int find_boundary(git_repository *src, git_odb *odb, struct oidvec *tipc,
			 const git_oid *haves, size_t nhaves, struct oidvec *pre,
			 struct oidvec *order, char *err, size_t errsz)
{
	struct oidset inc, bset;
	struct oidvec list = { NULL, 0, 0 };
	git_revwalk *walk = NULL;
	git_commit *c = NULL;
	git_oid oid;
	size_t usable;
	int rc, grc;

	if (tipc->n == 0 || nhaves == 0)
		return 0;
	rc = boundary_fast(src, odb, tipc, haves, nhaves, pre, order, &usable, err, errsz);
	if (rc != ME_ETOOBIG)
		return rc;
	/* too far back: libgit2's revwalk knows what the haves reach */
	gerr_clear(err, errsz);
	pre->n = order->n = 0;
	if ((rc = oidset_init(&inc)) < 0 || (rc = oidset_init(&bset)) < 0)
		return rc;
	if ((rc = walk_new(&walk, src, GIT_SORT_NONE, tipc, NULL, err, errsz)) < 0)
		goto out;
	if ((rc = hide_haves(walk, odb, haves, nhaves, err, errsz)) <= 0)
		goto out;
	rc = 0;
	while ((grc = git_revwalk_next(&oid, walk)) == 0)
		if (oidset_put(&inc, &oid, 0) < 0 || oidvec_push(&list, &oid) < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	if (grc != GIT_ITEROVER) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot walk the history");
		goto out;
	}
	for (size_t i = 0; i < list.n; i++) {
		if (git_commit_lookup(&c, src, &list.v[i]) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot read a commit");
			goto out;
		}
		for (unsigned p = 0; p < git_commit_parentcount(c); p++) {
			const git_oid *pid = git_commit_parent_id(c, p);
			if (pid == NULL || oidset_has(&inc, pid))
				continue;
			if ((rc = oidset_put(&bset, pid, 0)) == 1)
				rc = oidvec_push(pre, pid);
			if (rc < 0) {
				rc = gerr_nomem(err, errsz);
				goto out;
			}
		}
		git_commit_free(c);
		c = NULL;
	}
	rc = 0;
	boundary_done(tipc, &inc, pre);
out:
	git_commit_free(c);
	git_revwalk_free(walk);
	free(list.v);
	oidset_free(&inc);
	oidset_free(&bset);
	return rc < 0 ? rc : 0;
}

/* The annotated tags the tips point through that the receiver does not have: in the pack. */
struct tagnote {
	const struct oidset *haveset;
	struct oidvec *tags;
	char *err;
	size_t errsz;
};

static int note_tag(const git_oid *tag, void *arg)
{
	struct tagnote *t = arg;

	if (!oidset_has(t->haveset, tag) && oidvec_push(t->tags, tag) < 0)
		return gerr_nomem(t->err, t->errsz);
	return 0;
}

int bundle_write(git_repository *src, const struct gmsg_ref *tips, size_t ntips,
		 const git_oid *haves, size_t nhaves, int fd, struct bundle_stats *st, char *err,
		 size_t errsz)
{
	struct oidset haveset;
	struct oidvec tipc = { NULL, 0, 0 }, pre = { NULL, 0, 0 }, order = { NULL, 0, 0 };
	struct oidvec tags = { NULL, 0, 0 }, ends = { NULL, 0, 0 }; /* libgit2's builder only */
	struct tagnote tn = { &haveset, &tags, err, errsz };
	git_packbuilder *pb = NULL;
	git_revwalk *walk = NULL;
	git_odb *odb = NULL;
	struct thinpack *tp = NULL;
	struct packreuse *pr = NULL;
	size_t nobj = 0;
	struct wctx w = { fd, 0, 0 };
	char *hdr = NULL;
	size_t hdrlen = 0;
	int rc;

	gerr_clear(err, errsz);
	if (st != NULL)
		memset(st, 0, sizeof(*st));
	if (src == NULL || fd < 0 || (nhaves > 0 && haves == NULL))
		return ME_EINVAL;
	if (!tips_valid(tips, ntips)) {
		gerr_set(err, errsz, "invalid tips");
		return ME_EINVAL;
	}
	if (nhaves > BUNDLE_MAX_HAVES) {
		gerr_set(err, errsz, "more than %u haves", BUNDLE_MAX_HAVES);
		return ME_ETOOBIG;
	}
	if ((rc = oidset_init(&haveset)) < 0)
		return rc;
	for (size_t i = 0; i < nhaves; i++)
		if (oidset_put(&haveset, &haves[i], 0) < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	if (git_repository_odb(&odb, src) < 0 || git_odb_refresh(odb) < 0) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot prepare the pack");
		goto out;
	}
	/* Each tip: a commit to walk from, or a tree or blob (a tag of one) that goes whole. */
	for (size_t i = 0; i < ntips; i++) {
		git_object *end = NULL;
		const git_oid *id;

		if ((rc = tip_peel(src, &tips[i], note_tag, &tn, &end, err, errsz)) < 0)
			goto out;
		id = git_object_id(end);
		if (git_object_type(end) == GIT_OBJECT_COMMIT)
			rc = oidvec_push(&tipc, id);
		else if (!oidset_has(&haveset, id))
			rc = oidvec_push(&ends, id);
		git_object_free(end);
		if (rc < 0) {
			rc = gerr_nomem(err, errsz);
			goto out;
		}
	}
	if ((rc = find_boundary(src, odb, &tipc, haves, nhaves, &pre, &order, err, errsz)) < 0)
		goto out;
	/* An increment: a thin pack when it is small enough (else libgit2's, below). */
	if (pre.n > 0 && (rc = thinpack_plan(src, tips, ntips, &haveset, &tipc, &pre,
					     order.n > 0 ? &order : NULL, &tp, err, errsz)) < 0) {
		if (rc != ME_ETOOBIG)
			goto out;
		gerr_clear(err, errsz);
	}
	if (tp != NULL)
		goto header;
	/* A complete pack: copied from src's packs (ME_EINVAL: they cannot serve, libgit2's pack
	 * builder does it below). */
	if (pre.n == 0) {
		if ((rc = packreuse_plan(src, tips, ntips, &pr, err, errsz)) == 0)
			goto header;
		if (rc != ME_EINVAL)
			goto out;
		gerr_clear(err, errsz);
	}

	if (git_packbuilder_new(&pb, src) < 0) {
		rc = gerr_git(err, errsz, ME_EGIT, "cannot prepare the pack");
		goto out;
	}
	git_packbuilder_set_threads(pb, 0);
	for (size_t i = 0; i < tags.n; i++)
		if (git_packbuilder_insert(pb, &tags.v[i], NULL) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot add a tag to the pack");
			goto out;
		}
	for (size_t i = 0; i < ends.n; i++)
		if (git_packbuilder_insert_recur(pb, &ends.v[i], NULL) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot add a tip to the pack");
			goto out;
		}
	if (tipc.n > 0) {
		if ((rc = walk_new(&walk, src, GIT_SORT_NONE, &tipc, &pre, err, errsz)) < 0)
			goto out;
		if (git_packbuilder_insert_walk(pb, walk) < 0) {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot add commits to the pack");
			goto out;
		}
	}

header:
	if ((rc = header_build(&pre, tips, ntips, &hdr, &hdrlen)) < 0) {
		if (rc == ME_ETOOBIG)
			gerr_set(err, errsz, "bundle header would exceed the limits (%zu "
				"prerequisites, %zu refs)", pre.n, ntips);
		else
			gerr_nomem(err, errsz);
		goto out;
	}
	if ((rc = write_full(fd, hdr, hdrlen)) < 0) {
		gerr_set(err, errsz, "cannot write the bundle: %s", strerror(-rc));
		rc = ME_EIO;
		goto out;
	}
	if (tp != NULL) {
		if ((rc = thinpack_write(tp, fd, &w.bytes, &nobj, err, errsz)) < 0)
			goto out;
	} else if (pr != NULL) {
		if ((rc = packreuse_write(pr, fd, &w.bytes, &nobj, NULL,
					  st != NULL ? &st->parts : NULL, err, errsz)) < 0)
			goto out;
		/* one part is no parts; else offsets in the bundle */
		if (st != NULL && st->parts.n == 1)
			st->parts.n = 0;
		for (uint32_t i = 0; st != NULL && i < st->parts.n; i++)
			st->parts.v[i].offset += hdrlen;
	} else if (git_packbuilder_foreach(pb, pack_cb, &w) < 0) {
		if (w.err < 0) {
			gerr_set(err, errsz, "cannot write the bundle: %s", strerror(-w.err));
			rc = ME_EIO;
		} else {
			rc = gerr_git(err, errsz, ME_EGIT, "cannot build the pack");
		}
		goto out;
	}
	if (st != NULL) {
		st->header_bytes = hdrlen;
		st->pack_bytes = w.bytes;
		st->objects = tp != NULL || pr != NULL ? nobj : git_packbuilder_object_count(pb);
		st->bitmapped = pr != NULL ? packreuse_bitmapped(pr) : 0;
		st->prereqs = pre.n;
		st->refs = ntips;
	}
	rc = 0;
out:
	free(hdr);
	thinpack_free(tp);
	packreuse_free(pr);
	git_revwalk_free(walk);
	git_packbuilder_free(pb);
	git_odb_free(odb);
	free(tipc.v);
	free(pre.v);
	free(order.v);
	free(tags.v);
	free(ends.v);
	oidset_free(&haveset);
	return rc;
}

/* ---- bundle receiver ---- */

enum rx_state { RX_HEADER, RX_PACK, RX_DONE, RX_FAILED };

struct vedge {
	uint32_t from, to; /* positions: commit -> parent, tag -> target */
};

/* A commit's parent or a tag's target outside the object's own pack. */
struct vxedge {
	uint32_t from; /* index position in the pack */
	git_oid to;
};

#define VWANT_MIXED 0xff /* an object referenced as two different types */

/* One new pack, checked on its own (with parts, on its part's thread as soon as it is
 * indexed): the types of its objects, its commits, trees and tags parsed in pack order, every
 * reference to an object of the pack checked there, the others collected (ext) for the check
 * of all the packs together. */
struct vpack {
	struct pidx p;
	const char *idxpath;
	uint8_t *types;         /* by index position */
	bool graph;             /* record edges and roots (for opts.check) */
	uint8_t *isroot;        /* with graph: 1 for a root commit, by index position */
	struct vedge *edges;    /* with graph: inside the pack, index positions */
	size_t nedges, capedges;
	struct vxedge *xedges;  /* with graph: out of the pack */
	size_t nx, capx;
	struct oidset ext;      /* referenced, not in the pack: oid -> the type wanted */
	bool ext_init;
	int rc;
	char msg[512];
};

static int vp_check(struct vpack *v, const char *idxpath, const char *packpath, bool graph);
static void vp_free(struct vpack *v);

/* With parts (opts.parts): each part goes to an indexer of its own as a pack of its own (a
 * header with the part's count, the part's entries, a SHA-1 trailer), committed on a thread of
 * its own once complete, at most RX_THREADS at a time, while the next part arrives;
 * then, on the same thread, checked on its own (vp_check). */
#define RX_THREADS 2
#define RX_STACK (2u << 20)

struct rxpart {
	git_indexer *idx;
	wc_Sha sha;
	bool sha_init;
	uint64_t end;   /* bundle offset after its last entry */
	uint32_t count; /* entries */
	git_indexer_progress prog;
	pthread_t th;
	bool running;   /* th to join */
	bool finished;  /* th is over (set by th under *mu, then *cv signalled) */
	pthread_mutex_t *mu;
	pthread_cond_t *cv;
	bool done;      /* committed: name is set */
	int rc;
	char msg[256];
	char name[GIT_OID_HEXSZ + 1];
	/* then checked on its own, on the same thread */
	const char *tmpdir;
	bool graph;
	char idxpath[PATH_MAX], packpath[PATH_MAX];
	struct vpack *vp;
};

struct bundle_rx {
	git_repository *mirror;
	git_odb *odb; /* the mirror's */
	const struct gmsg_refstate *expected;
	struct bundle_rx_opts opts;
	enum rx_state state;
	int rc;
	char msg[512];
	uint64_t total;
	/* header */
	char *hbuf;
	size_t hlen, hcap;
	struct hscan scan;
	struct bundle_header hdr;
	/* pack */
	unsigned char packhdr[PACK_HDR_LEN];
	size_t packhdr_len;
	uint64_t pack_bytes;
	char *tmpdir;
	git_indexer *idx;
	git_indexer_progress prog;
	/* parts */
	struct xmsg_parts partv; /* opts.parts points here */
	struct rxpart *parts;
	struct vpack *vps;       /* by part */
	uint32_t nparts, cur; /* cur: the part arriving (nparts: the trailer) */
	pthread_mutex_t mu;   /* the parts' finished flags */
	pthread_cond_t cv;
	bool mu_init;
};

__attribute__((format(printf, 3, 4)))
static int rx_fail(struct bundle_rx *rx, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(rx->msg, sizeof(rx->msg), fmt, ap);
	va_end(ap);
	rx->state = RX_FAILED;
	rx->rc = code;
	return code;
}

/* Records an error whose message is already in rx->msg. */
static int rx_failed(struct bundle_rx *rx, int code)
{
	rx->state = RX_FAILED;
	rx->rc = code;
	return code;
}

static int rx_git_fail(struct bundle_rx *rx, int code, const char *what)
{
	return rx_failed(rx, gerr_git(rx->msg, sizeof(rx->msg), code, what));
}

static bool refstate_ok(const struct gmsg_refstate *rs)
{
	if (rs->nrefs > GMSG_MAX_REFS || (rs->nrefs > 0 && rs->refs == NULL))
		return false;
	if (rs->head.len > 0 && !gmsg_refname_valid(rs->head.ptr, rs->head.len))
		return false;
	for (size_t i = 0; i < rs->nrefs; i++) {
		if (!gmsg_refname_valid(rs->refs[i].name.ptr, rs->refs[i].name.len))
			return false;
		if (i > 0 && gmsg_str_cmp(rs->refs[i - 1].name, rs->refs[i].name) >= 0)
			return false;
	}
	return true;
}

int bundle_rx_new(struct bundle_rx **out, git_repository *mirror,
		  const struct gmsg_refstate *expected, const struct bundle_rx_opts *opts,
		  char *err, size_t errsz)
{
	struct bundle_rx *rx;

	gerr_clear(err, errsz);
	if (out == NULL)
		return ME_EINVAL;
	*out = NULL;
	if (mirror == NULL || expected == NULL || opts == NULL || opts->max_bytes == 0)
		return ME_EINVAL;
	if (!refstate_ok(expected)) {
		gerr_set(err, errsz, "malformed ref state");
		return ME_EINVAL;
	}
	if (opts->parts != NULL && opts->parts->n > 0 &&
	    (!xmsg_parts_valid(opts->parts, opts->size) || opts->size > opts->max_bytes)) {
		gerr_set(err, errsz, "malformed parts");
		return ME_EINVAL;
	}
	if ((rx = calloc(1, sizeof(*rx))) == NULL)
		return gerr_nomem(err, errsz);
	rx->mirror = mirror;
	rx->expected = expected;
	rx->opts = *opts;
	if (opts->parts == NULL || opts->parts->n == 0) {
		rx->opts.parts = NULL;
	} else {
		rx->partv = *opts->parts;
		rx->opts.parts = &rx->partv;
	}
	rx->state = RX_HEADER;
	if (git_repository_odb(&rx->odb, mirror) < 0) {
		int rc = gerr_git(err, errsz, ME_EGIT, "cannot open the mirror's objects");
		free(rx);
		return rc;
	}
	*out = rx;
	return 0;
}

const char *bundle_rx_errmsg(const struct bundle_rx *rx)
{
	return rx != NULL ? rx->msg : "";
}

/* The header is complete: parse it, compare it with the signed state, check the
 * prerequisites, set up the indexer. */
static int rx_header_done(struct bundle_rx *rx)
{
	const struct gmsg_refstate *rs = rx->expected;
	git_indexer_options io;
	char hex[GIT_OID_HEXSZ + 1];
	int rc, n;

	if ((rc = header_parse(rx->hbuf, rx->scan.pos, &rx->hdr, rx->msg, sizeof(rx->msg))) < 0)
		return rx_failed(rx, rc);
	if (rx->hdr.nrefs != rs->nrefs)
		return rx_fail(rx, ME_EPERM, "refs differ from the signed ref state");
	for (size_t i = 0; i < rs->nrefs; i++)
		if (!gstr_eq_cstr(rs->refs[i].name, rx->hdr.refs[i].name) ||
		    memcmp(rs->refs[i].oid, rx->hdr.refs[i].oid.id, ME_OID_LEN) != 0)
			return rx_fail(rx, ME_EPERM, "refs differ from the signed ref state");
	for (size_t i = 0; i < rx->hdr.nprereqs; i++) {
		const git_oid *o = &rx->hdr.prereqs[i];
		git_object_t type;
		size_t size;
		int grc = git_odb_read_header(&size, &type, rx->odb, o);

		if (grc == GIT_ENOTFOUND)
			return rx_fail(rx, ME_ENOTFOUND, "missing prerequisite %s",
				       git_oid_tostr(hex, sizeof(hex), o));
		if (grc < 0)
			return rx_git_fail(rx, ME_EGIT, "cannot read a prerequisite");
		if (type != GIT_OBJECT_COMMIT)
			return rx_fail(rx, ME_EPROTO, "prerequisite %s is not a commit",
				       git_oid_tostr(hex, sizeof(hex), o));
	}

	/* The pack is indexed in a directory of its own inside the mirror: nothing reaches the
	 * mirror's objects before it is verified. */
	const char *gitdir = git_repository_path(rx->mirror);
	size_t l = strlen(gitdir) + strlen(INCOMING_PREFIX) + 7;
	if ((rx->tmpdir = malloc(l)) == NULL)
		return rx_fail(rx, ME_ENOMEM, "out of memory");
	n = snprintf(rx->tmpdir, l, "%s%sXXXXXX", gitdir, INCOMING_PREFIX);
	if (n < 0 || (size_t)n >= l || mkdtemp(rx->tmpdir) == NULL) {
		rc = rx_fail(rx, ME_EIO, "cannot create a temporary directory in %s: %s", gitdir,
			     strerror(errno));
		free(rx->tmpdir);
		rx->tmpdir = NULL;
		return rc;
	}
	/* The indexer hashes every object and checks the trailer; connectivity is rx_verify's
	 * (libgit2's verify option leaks, see there). The mirror's odb resolves the bases of a
	 * thin pack. With parts, each has its indexer (rx_part_open). */
	git_indexer_options_init(&io, GIT_INDEXER_OPTIONS_VERSION);
	if (rx->opts.parts == NULL && git_indexer_new(&rx->idx, rx->tmpdir, 0, rx->odb, &io) < 0)
		return rx_git_fail(rx, ME_EGIT, "cannot start the indexer");
	rx->state = RX_PACK;
	return 0;
}

/* ---- parts ---- */

static void *part_commit(void *arg)
{
	struct rxpart *pt = arg;

	/* libgit2's error and errno are this thread's: classified here (a full disk is ours) */
	if (git_indexer_commit(pt->idx, &pt->prog) < 0) {
		pt->rc = gerr_git(pt->msg, sizeof(pt->msg), ME_EPROTO, "cannot index it");
	} else {
		snprintf(pt->name, sizeof(pt->name), "%s", git_indexer_name(pt->idx));
		pt->done = true;
	}
	git_indexer_free(pt->idx); /* its state for every object: gone before the next part */
	pt->idx = NULL;
	if (pt->done) {
		snprintf(pt->idxpath, sizeof(pt->idxpath), "%s/pack-%s.idx", pt->tmpdir, pt->name);
		snprintf(pt->packpath, sizeof(pt->packpath), "%s/pack-%s.pack", pt->tmpdir,
			 pt->name);
		vp_check(pt->vp, pt->idxpath, pt->packpath, pt->graph);
	}
	pthread_mutex_lock(pt->mu);
	pt->finished = true;
	pthread_cond_signal(pt->cv);
	pthread_mutex_unlock(pt->mu);
	return NULL;
}

/* Part i's commit is over: its failure becomes rx's. */
static int rx_part_result(struct bundle_rx *rx, uint32_t i)
{
	struct rxpart *pt = &rx->parts[i];

	if (pt->rc < 0 && rx->state != RX_FAILED)
		rx_fail(rx, pt->rc, "%spart %" PRIu32 " of %" PRIu32 ": %s",
			pt->rc == ME_EPROTO ? "bad pack: " : "", i + 1, rx->nparts, pt->msg);
	return rx->state == RX_FAILED ? rx->rc : 0;
}

/* Waits for part i's commit. */
static int rx_part_join(struct bundle_rx *rx, uint32_t i)
{
	struct rxpart *pt = &rx->parts[i];

	if (!pt->running)
		return rx->state == RX_FAILED ? rx->rc : 0;
	pthread_join(pt->th, NULL);
	pt->running = false;
	return rx_part_result(rx, i);
}

static int rx_part_append(struct bundle_rx *rx, uint32_t i, const unsigned char *p, size_t len)
{
	struct rxpart *pt = &rx->parts[i];

	while (len > 0) {
		size_t n = len < BUNDLE_CHUNK ? len : BUNDLE_CHUNK;

		if (git_indexer_append(pt->idx, p, n, &pt->prog) < 0) {
			char what[64];
			snprintf(what, sizeof(what), "bad pack: part %" PRIu32 " of %" PRIu32, i + 1,
				 rx->nparts);
			return rx_git_fail(rx, ME_EPROTO, what);
		}
		if (wc_ShaUpdate(&pt->sha, p, (word32)n) != 0)
			return rx_fail(rx, ME_EINTERNAL, "cannot hash a part of the pack");
		p += n;
		len -= n;
	}
	return 0;
}

/* Starts part i: its indexer, fed a pack header with its count. */
static int rx_part_open(struct bundle_rx *rx, uint32_t i)
{
	struct rxpart *pt = &rx->parts[i];
	git_indexer_options io;
	unsigned char hdr[PACK_HDR_LEN] = { 'P', 'A', 'C', 'K', 0, 0, 0, 2 };

	git_indexer_options_init(&io, GIT_INDEXER_OPTIONS_VERSION);
	if (git_indexer_new(&pt->idx, rx->tmpdir, 0, rx->odb, &io) < 0)
		return rx_git_fail(rx, ME_EGIT, "cannot start the indexer");
	if (wc_InitSha(&pt->sha) != 0)
		return rx_fail(rx, ME_EINTERNAL, "cannot hash a part of the pack");
	pt->sha_init = true;
	for (int k = 0; k < 4; k++)
		hdr[8 + k] = (unsigned char)(pt->count >> (24 - 8 * k));
	return rx_part_append(rx, i, hdr, sizeof(hdr));
}

/* Waits for one of the parts before i that are running to finish, and joins it: whichever
 * it is (the trees take longer than several parts of blobs). */
static int rx_part_join_any(struct bundle_rx *rx, uint32_t i)
{
	uint32_t k;

	pthread_mutex_lock(&rx->mu);
	for (;;) {
		for (k = 0; k < i && !(rx->parts[k].running && rx->parts[k].finished); k++)
			;
		if (k < i)
			break;
		pthread_cond_wait(&rx->cv, &rx->mu);
	}
	pthread_mutex_unlock(&rx->mu);
	return rx_part_join(rx, k);
}

/* Part i has all its entries: its trailer, then its commit on a thread (once one of those
 * running is over, when RX_THREADS are). */
static int rx_part_close(struct bundle_rx *rx, uint32_t i)
{
	struct rxpart *pt = &rx->parts[i];
	unsigned char sum[WC_SHA_DIGEST_SIZE];
	uint32_t running = 0;

	if (wc_ShaFinal(&pt->sha, sum) != 0)
		return rx_fail(rx, ME_EINTERNAL, "cannot hash a part of the pack");
	if (rx_part_append(rx, i, sum, sizeof(sum)) < 0)
		return rx->rc;
	for (uint32_t k = 0; k < i; k++)
		running += rx->parts[k].running;
	if (running >= RX_THREADS && rx_part_join_any(rx, i) < 0)
		return rx->rc;
	pthread_attr_t attr;
	int prc = pthread_attr_init(&attr);
	if (prc == 0) {
		/* a small stack: the thread's address space counts against the verifier's limit */
		pthread_attr_setstacksize(&attr, RX_STACK);
		prc = pthread_create(&pt->th, &attr, part_commit, pt);
		pthread_attr_destroy(&attr);
	}
	if (prc != 0) {
		part_commit(pt); /* no thread: here */
		return rx_part_result(rx, i);
	}
	pt->running = true;
	return 0;
}

/* The pack header of a bundle with parts: the parts must fit it. */
static int rx_parts_begin(struct bundle_rx *rx, uint32_t count)
{
	const struct xmsg_parts *v = rx->opts.parts;
	uint64_t first = rx->hdr.len + PACK_HDR_LEN, sum = 0;

	if (v->v[0].offset != first || rx->opts.size < first + PACK_TRAILER_LEN ||
	    v->v[v->n - 1].offset >= rx->opts.size - PACK_TRAILER_LEN)
		return rx_fail(rx, ME_EPROTO, "bad pack: the parts announced do not fit it");
	for (uint32_t i = 0; i < v->n; i++)
		sum += v->v[i].count;
	if (sum != count)
		return rx_fail(rx, ME_EPROTO, "bad pack: the parts announced hold %" PRIu64
			       " objects, the pack %" PRIu32, sum, count);
	if ((rx->parts = calloc(v->n, sizeof(*rx->parts))) == NULL ||
	    (rx->vps = calloc(v->n, sizeof(*rx->vps))) == NULL)
		return rx_fail(rx, ME_ENOMEM, "out of memory");
	if (pthread_mutex_init(&rx->mu, NULL) != 0)
		return rx_fail(rx, ME_ENOMEM, "cannot create a mutex");
	if (pthread_cond_init(&rx->cv, NULL) != 0) {
		pthread_mutex_destroy(&rx->mu);
		return rx_fail(rx, ME_ENOMEM, "cannot create a condition variable");
	}
	rx->mu_init = true;
	rx->nparts = v->n;
	for (uint32_t i = 0; i < v->n; i++) {
		rx->parts[i].mu = &rx->mu;
		rx->parts[i].cv = &rx->cv;
		rx->parts[i].tmpdir = rx->tmpdir;
		rx->parts[i].graph = rx->opts.check != NULL && rx->opts.roots;
		rx->parts[i].vp = &rx->vps[i];
		rx->parts[i].count = (uint32_t)v->v[i].count;
		rx->parts[i].end = i + 1 < v->n ? v->v[i + 1].offset
						: rx->opts.size - PACK_TRAILER_LEN;
	}
	return rx_part_open(rx, 0);
}

/* len bytes of the pack at bundle offset at, after its header. */
static int rx_parts_write(struct bundle_rx *rx, const unsigned char *p, size_t len, uint64_t at)
{
	while (len > 0) {
		if (rx->cur == rx->nparts) { /* the whole pack's trailer: not used */
			if (len > rx->opts.size - at)
				return rx_fail(rx, ME_EPROTO, "bundle larger than announced");
			return 0;
		}
		struct rxpart *pt = &rx->parts[rx->cur];
		size_t n = pt->end - at < len ? (size_t)(pt->end - at) : len;

		if (rx_part_append(rx, rx->cur, p, n) < 0)
			return rx->rc;
		p += n;
		len -= n;
		at += n;
		if (at == pt->end) {
			if (rx_part_close(rx, rx->cur) < 0)
				return rx->rc;
			if (++rx->cur < rx->nparts && rx_part_open(rx, rx->cur) < 0)
				return rx->rc;
		}
	}
	return 0;
}

/* Joins every part's thread; the first failure is rx's. */
static int rx_parts_end(struct bundle_rx *rx)
{
	int rc = 0;

	for (uint32_t i = 0; i < rx->nparts; i++)
		if (rx_part_join(rx, i) < 0 && rc == 0)
			rc = rx->rc;
	return rc;
}

static void rx_parts_free(struct bundle_rx *rx)
{
	rx_parts_end(rx);
	for (uint32_t i = 0; i < rx->nparts; i++) {
		git_indexer_free(rx->parts[i].idx);
		if (rx->parts[i].sha_init)
			wc_ShaFree(&rx->parts[i].sha);
		vp_free(&rx->vps[i]);
	}
	free(rx->parts);
	free(rx->vps);
	rx->parts = NULL;
	rx->vps = NULL;
	rx->nparts = 0;
	if (rx->mu_init) {
		pthread_cond_destroy(&rx->cv);
		pthread_mutex_destroy(&rx->mu);
		rx->mu_init = false;
	}
}

static int rx_index(struct bundle_rx *rx, const unsigned char *p, size_t len)
{
	while (len > 0) {
		size_t n = len < BUNDLE_CHUNK ? len : BUNDLE_CHUNK;

		if (git_indexer_append(rx->idx, p, n, &rx->prog) < 0)
			return rx_git_fail(rx, ME_EPROTO, "bad pack");
		p += n;
		len -= n;
	}
	return 0;
}

static int rx_pack(struct bundle_rx *rx, const unsigned char *p, size_t len)
{
	rx->pack_bytes += len;
	if (rx->packhdr_len < PACK_HDR_LEN) {
		size_t n = PACK_HDR_LEN - rx->packhdr_len;
		uint32_t version, count;
		uint64_t budget;

		if (n > len)
			n = len;
		memcpy(rx->packhdr + rx->packhdr_len, p, n);
		rx->packhdr_len += n;
		p += n;
		len -= n;
		if (rx->packhdr_len < PACK_HDR_LEN)
			return 0;
		if (memcmp(rx->packhdr, "PACK", 4) != 0)
			return rx_fail(rx, ME_EPROTO, "bad pack: no pack signature");
		version = me_be32(rx->packhdr + 4);
		count = me_be32(rx->packhdr + 8);
		if (version != 2 && version != 3)
			return rx_fail(rx, ME_EPROTO, "bad pack: version %" PRIu32, version);
		budget = rx->opts.max_bytes - rx->hdr.len;
		if (budget < PACK_HDR_LEN + PACK_TRAILER_LEN ||
		    count > (budget - PACK_HDR_LEN - PACK_TRAILER_LEN) / PACK_MIN_ENTRY)
			return rx_fail(rx, ME_ETOOBIG, "pack of %" PRIu32 " objects exceeds %"
				       PRIu64 " bytes", count, rx->opts.max_bytes);
		if (rx->opts.parts != NULL ? rx_parts_begin(rx, count) < 0
					   : rx_index(rx, rx->packhdr, PACK_HDR_LEN) < 0)
			return rx->rc;
	}
	if (rx->opts.parts != NULL)
		return rx_parts_write(rx, p, len, rx->hdr.len + rx->pack_bytes - len);
	return rx_index(rx, p, len);
}

int bundle_rx_write(struct bundle_rx *rx, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	int rc;

	if (rx == NULL || (buf == NULL && len > 0))
		return ME_EINVAL;
	if (rx->state == RX_FAILED)
		return rx->rc;
	if (rx->state == RX_DONE)
		return ME_EINVAL;
	if (len > rx->opts.max_bytes - rx->total)
		return rx_fail(rx, ME_ETOOBIG, "bundle larger than %" PRIu64 " bytes",
			       rx->opts.max_bytes);
	rx->total += len;
	while (len > 0 && rx->state == RX_HEADER) {
		size_t n = BUNDLE_MAX_HEADER - rx->hlen;

		if (n > len)
			n = len;
		if (rx->hlen + n > rx->hcap) {
			size_t ncap = rx->hcap ? rx->hcap : 4096;
			char *q;
			while (ncap < rx->hlen + n)
				ncap *= 2;
			if (ncap > BUNDLE_MAX_HEADER)
				ncap = BUNDLE_MAX_HEADER;
			if ((q = realloc(rx->hbuf, ncap)) == NULL)
				return rx_fail(rx, ME_ENOMEM, "out of memory");
			rx->hbuf = q;
			rx->hcap = ncap;
		}
		memcpy(rx->hbuf + rx->hlen, p, n);
		rx->hlen += n;
		p += n;
		len -= n;
		rc = hscan_run(&rx->scan, rx->hbuf, rx->hlen, rx->msg, sizeof(rx->msg));
		if (rc < 0)
			return rx_failed(rx, rc);
		if (rc == 1) {
			if (rx_header_done(rx) < 0)
				return rx->rc;
			/* What followed the header in this buffer is pack data. */
			if (rx->hlen > rx->scan.pos &&
			    rx_pack(rx, (unsigned char *)rx->hbuf + rx->scan.pos,
				    rx->hlen - rx->scan.pos) < 0)
				return rx->rc;
			free(rx->hbuf);
			rx->hbuf = NULL;
			rx->hlen = rx->hcap = 0;
		}
	}
	if (len > 0 && rx->state == RX_PACK && rx_pack(rx, p, len) < 0)
		return rx->rc;
	return 0;
}

/* Connectivity. libgit2's indexer "verify" mode is not used: in 1.5 it leaks every parsed
 * object that the odb already has. Instead every object of the new pack is checked here: its
 * type is read from the pack itself (entry headers, deltas through their bases: nothing is
 * decompressed), and each commit, tree and tag is parsed and what it references must be in the
 * pack or in the mirror, with the type the reference says (a commit's tree is a tree, its
 * parents commits, a tree entry's mode matches, a tag's target has the declared type). So the
 * mirror keeps an invariant: every object it holds has all it references. Given that, a tip
 * that is in the pack or in the mirror is connected. The work is bounded by the objects of the
 * pack and their references; each external object is looked up once.
 *
 * The objects are parsed in pack order: bases come before their deltas, so libgit2's
 * delta-base cache serves the chains. (Splitting one pack's parse over several threads or
 * processes was measured: libgit2 serialises the threads on its pack windows and cache, and
 * the processes each rebuild the delta bases of their part; neither saved more than a tenth.)
 * With parts, each pack is parsed on its part's thread as soon as it is indexed (vpack), while
 * the next parts are still arriving or being indexed; what a pack references outside itself is
 * collected, once per object, and looked up in the other packs and the mirror when all are in
 * (vc_resolve). While it parses, the check records the commit -> parent and tag -> target
 * edges and the root commits, so that the roots reachable from the tips are known without
 * walking the history again. */

/* Every pack together, and the mirror. */
struct vctx {
	const char *gitdir;
	struct vpack *vp;
	size_t np;
	uint32_t *base;         /* by pack: the position of its first object */
	uint32_t n;             /* objects in all */
	uint32_t *merged;       /* np > 1: (pack << VC_PACK_SHIFT | index position) by oid */
	uint32_t fan[257];      /* merged's fan-out: first entry of each first byte */
	git_odb *odb;           /* the mirror's objects */
	git_repository *view;   /* the mirror's objects plus the new packs (for opts.check) */
	struct oidset ext;      /* objects of the mirror met: oid -> type */
	struct vedge *edges;    /* with graph: by position */
	size_t nedges;
	uint8_t *isroot;        /* with graph: by position */
	int rc;
	char msg[512];
};

#define VC_PACK_SHIFT 26 /* XMSG_MAX_PARTS packs of up to 2^26 objects */
_Static_assert(XMSG_MAX_PARTS <= 1u << (32 - VC_PACK_SHIFT), "pack numbers fit");

__attribute__((format(printf, 3, 4)))
static int msg_fail(char *msg, size_t msgsz, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, msgsz, fmt, ap);
	va_end(ap);
	return 0;
}

#define VP_FAIL(v, code, ...) (msg_fail((v)->msg, sizeof((v)->msg), __VA_ARGS__), (v)->rc = (code))

static int vc_git_fail(struct vctx *t, int code, const char *what)
{
	return t->rc = gerr_git(t->msg, sizeof(t->msg), code, what);
}

/* An object database over the mirror's objects (mirror) and/or new packs: idxpaths[0..n). */
static int odb_over(const char *gitdir, bool mirror, const char **idxpaths, size_t n,
		    git_odb **out, char *msg, size_t msgsz)
{
	char objdir[PATH_MAX];

	*out = NULL;
	if ((size_t)snprintf(objdir, sizeof(objdir), "%sobjects", gitdir) >= sizeof(objdir)) {
		msg_fail(msg, msgsz, "mirror path too long");
		return ME_ETOOBIG;
	}
	if (mirror ? git_odb_open(out, objdir) < 0 : git_odb_new(out) < 0)
		return gerr_git(msg, msgsz, ME_EGIT, "cannot open the mirror's objects");
	for (size_t q = 0; q < n; q++) {
		git_odb_backend *b = NULL;
		if (git_odb_backend_one_pack(&b, idxpaths[q]) < 0 ||
		    git_odb_add_backend(*out, b, 100) < 0) {
			int rc = gerr_git(msg, msgsz, ME_EGIT, "cannot open the new pack");
			if (b != NULL)
				b->free(b);
			git_odb_free(*out);
			*out = NULL;
			return rc;
		}
	}
	return 0;
}

/* What an object references: fn(arg, oid, wanted type, edge (a parent or a tag's target),
 * the object's index position, its id); a non-zero return stops. *root: a commit without
 * parents. */
typedef int (*vref_fn)(void *arg, const git_oid *oid, git_object_t want, bool edge,
		       uint32_t pos, const git_oid *from);

static int obj_refs(git_object *obj, uint32_t pos, vref_fn fn, void *arg, bool *root)
{
	const git_oid *id = git_object_id(obj);
	int rc = 0;

	*root = false;
	switch (git_object_type(obj)) {
	case GIT_OBJECT_COMMIT: {
		const git_commit *c = (const git_commit *)obj;
		unsigned np = git_commit_parentcount(c);
		rc = fn(arg, git_commit_tree_id(c), GIT_OBJECT_TREE, false, pos, id);
		for (unsigned i = 0; rc == 0 && i < np; i++)
			rc = fn(arg, git_commit_parent_id(c, i), GIT_OBJECT_COMMIT, true, pos, id);
		*root = np == 0;
		break;
	}
	case GIT_OBJECT_TREE: {
		const git_tree *tr = (const git_tree *)obj;
		for (size_t i = 0; rc == 0 && i < git_tree_entrycount(tr); i++) {
			const git_tree_entry *e = git_tree_entry_byindex(tr, i);
			git_object_t type = git_tree_entry_type(e);
			if (type != GIT_OBJECT_COMMIT) /* a submodule is another repository */
				rc = fn(arg, git_tree_entry_id(e), type, false, pos, id);
		}
		break;
	}
	case GIT_OBJECT_TAG: {
		const git_tag *tg = (const git_tag *)obj;
		rc = fn(arg, git_tag_target_id(tg), git_tag_target_type(tg), true, pos, id);
		break;
	}
	default:
		break;
	}
	return rc;
}

static int not_a(char *msg, size_t msgsz, const git_oid *oid, const git_oid *from,
		 git_object_t want)
{
	char hex[GIT_OID_HEXSZ + 1], fhex[GIT_OID_HEXSZ + 1] = "a tip";

	if (from != NULL)
		git_oid_tostr(fhex, sizeof(fhex), from);
	msg_fail(msg, msgsz, "bundle is not connected: object %s (referenced by %s) is not a %s",
		 git_oid_tostr(hex, sizeof(hex), oid), fhex, git_object_type2string(want));
	return ME_EPROTO;
}

static int missing(char *msg, size_t msgsz, const git_oid *oid, const git_oid *from)
{
	char hex[GIT_OID_HEXSZ + 1], fhex[GIT_OID_HEXSZ + 1] = "a tip";

	if (from != NULL)
		git_oid_tostr(fhex, sizeof(fhex), from);
	msg_fail(msg, msgsz, "bundle is not connected: object %s (referenced by %s) is missing",
		 git_oid_tostr(hex, sizeof(hex), oid), fhex);
	return ME_EPROTO;
}

static int grow(void **v, size_t *cap, size_t n, size_t elsize)
{
	if (n < *cap)
		return 0;
	size_t ncap = *cap ? 2 * *cap : 1024;
	void *p = reallocarray(*v, ncap, elsize);
	if (p == NULL)
		return ME_ENOMEM;
	*v = p;
	*cap = ncap;
	return 0;
}

/* A reference met in the pack: checked there, or kept for later. */
static int vp_ref(void *arg, const git_oid *oid, git_object_t want, bool edge, uint32_t pos,
		  const git_oid *from)
{
	struct vpack *v = arg;
	int64_t k = pidx_find(&v->p, oid);

	if (k >= 0) {
		if (want != GIT_OBJECT_ANY && v->types[k] != want)
			return v->rc = not_a(v->msg, sizeof(v->msg), oid, from, want);
		if (edge && v->graph) {
			if (grow((void **)&v->edges, &v->capedges, v->nedges, sizeof(*v->edges)) < 0)
				return VP_FAIL(v, ME_ENOMEM, "out of memory");
			v->edges[v->nedges++] = (struct vedge){ pos, (uint32_t)k };
		}
		return 0;
	}
	struct oidset_slot *s = oidset_find(&v->ext, oid);
	if (s == NULL) {
		if (oidset_put(&v->ext, oid, (uint8_t)want) < 0)
			return VP_FAIL(v, ME_ENOMEM, "out of memory");
	} else if (s->val != (uint8_t)want) {
		s->val = VWANT_MIXED;
	}
	if (edge && v->graph) {
		if (grow((void **)&v->xedges, &v->capx, v->nx, sizeof(*v->xedges)) < 0)
			return VP_FAIL(v, ME_ENOMEM, "out of memory");
		v->xedges[v->nx++] = (struct vxedge){ pos, *oid };
	}
	return 0;
}

/* Parses the pack's commits, trees and tags in pack order (bases come before their deltas:
 * libgit2's delta-base cache serves the chains), through a view of this pack only. */
static int vp_walk(struct vpack *v, vref_fn fn, void *arg, char *msg, size_t msgsz)
{
	git_repository *view = NULL;
	git_odb *odb = NULL;
	int rc;

	if ((rc = odb_over("", false, &v->idxpath, 1, &odb, msg, msgsz)) < 0)
		return rc;
	if (git_repository_wrap_odb(&view, odb) < 0) {
		git_odb_free(odb);
		return gerr_git(msg, msgsz, ME_EGIT, "cannot open the new pack");
	}
	git_odb_free(odb); /* the view holds it */
	rc = 0;
	for (uint32_t k = 0; rc == 0 && k < v->p.n; k++) {
		uint32_t pos = v->p.rev[k].pos;
		git_object *obj = NULL;
		git_oid id;
		bool root;

		if (v->types[pos] == GIT_OBJECT_BLOB)
			continue;
		git_oid_fromraw(&id, pidx_oid(&v->p, pos));
		if (git_object_lookup(&obj, view, &id, (git_object_t)v->types[pos]) < 0) {
			rc = gerr_git(msg, msgsz, ME_EPROTO, "cannot parse a new object");
			break;
		}
		rc = obj_refs(obj, pos, fn, arg, &root);
		if (rc == 0 && root && v->isroot != NULL)
			v->isroot[pos] = 1;
		git_object_free(obj);
	}
	git_repository_free(view);
	return rc;
}

static void vp_free(struct vpack *v)
{
	pidx_free(&v->p);
	free(v->types);
	free(v->isroot);
	free(v->edges);
	free(v->xedges);
	if (v->ext_init)
		oidset_free(&v->ext);
	memset(v, 0, sizeof(*v));
}

/* Checks the pack idxpath/packpath on its own (above). 0 or v->rc, the message in v->msg. */
static int vp_check(struct vpack *v, const char *idxpath, const char *packpath, bool graph)
{
	int rc;

	memset(v, 0, sizeof(*v));
	v->idxpath = idxpath;
	v->graph = graph;
	if ((rc = pidx_open(&v->p, idxpath, packpath)) < 0)
		return VP_FAIL(v, rc == ME_ENOMEM ? rc : ME_EINTERNAL,
			       "cannot read the new pack's index");
	if ((v->types = malloc(v->p.n ? v->p.n : 1)) == NULL ||
	    (graph && (v->isroot = calloc(v->p.n ? v->p.n : 1, 1)) == NULL))
		return VP_FAIL(v, ME_ENOMEM, "out of memory");
	if ((rc = pidx_types(&v->p, v->types)) < 0)
		return VP_FAIL(v, rc == ME_ENOMEM ? rc : ME_EPROTO,
			       "bad pack: cannot resolve the object types");
	/* Types and offsets are known: libgit2 maps the pack from here on. */
	pidx_unmap_pack(&v->p);
	if (oidset_init(&v->ext) < 0)
		return VP_FAIL(v, ME_EINTERNAL, "cannot initialise the check");
	v->ext_init = true;
	if ((rc = vp_walk(v, vp_ref, v, v->msg, sizeof(v->msg))) < 0 && v->rc == 0)
		v->rc = rc;
	return v->rc;
}

static const uint8_t *vc_merged_oid(const struct vctx *t, uint32_t m)
{
	return pidx_oid(&t->vp[m >> VC_PACK_SHIFT].p, m & ((1u << VC_PACK_SHIFT) - 1));
}

/* Position of oid in the new packs (*type its type), -1 when it is in none. */
static int64_t vc_find(const struct vctx *t, const git_oid *oid, git_object_t *type)
{
	uint32_t q, pos;

	if (t->np == 0)
		return -1;
	if (t->np == 1) {
		int64_t k = pidx_find(&t->vp[0].p, oid);
		if (k >= 0)
			*type = (git_object_t)t->vp[0].types[k];
		return k;
	}
	uint32_t lo = t->fan[oid->id[0]], hi = t->fan[oid->id[0] + 1];
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		int c = memcmp(vc_merged_oid(t, t->merged[mid]), oid->id, GIT_OID_RAWSZ);
		if (c == 0) {
			q = t->merged[mid] >> VC_PACK_SHIFT;
			pos = t->merged[mid] & ((1u << VC_PACK_SHIFT) - 1);
			*type = (git_object_t)t->vp[q].types[pos];
			return (int64_t)t->base[q] + pos;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

static int merged_cmp(const void *a, const void *b, void *arg)
{
	const struct vctx *t = arg;

	return memcmp(vc_merged_oid(t, *(const uint32_t *)a), vc_merged_oid(t, *(const uint32_t *)b),
		      GIT_OID_RAWSZ);
}

/* One index over the packs' indexes (several packs only). */
static int vc_merge(struct vctx *t)
{
	uint32_t o = 0;

	if (t->np < 2)
		return 0;
	if ((t->merged = malloc((size_t)t->n * sizeof(*t->merged))) == NULL) {
		msg_fail(t->msg, sizeof(t->msg), "out of memory");
		return t->rc = ME_ENOMEM;
	}
	for (size_t q = 0; q < t->np; q++)
		for (uint32_t k = 0; k < t->vp[q].p.n; k++)
			t->merged[o++] = (uint32_t)q << VC_PACK_SHIFT | k;
	qsort_r(t->merged, t->n, sizeof(*t->merged), merged_cmp, t);
	o = 0;
	for (uint32_t b = 0; b <= 256; b++) {
		while (o < t->n && vc_merged_oid(t, t->merged[o])[0] < b)
			o++;
		t->fan[b] = o;
	}
	return 0;
}

/* The type of oid: in the new packs, or the mirror's (looked up once). 0, ME_ENOTFOUND, or
 * t->rc. *pos: its position, -1 for the mirror's. */
static int vc_type(struct vctx *t, const git_oid *oid, git_object_t *type, int64_t *pos)
{
	struct oidset_slot *s;
	size_t size;
	int grc;

	if ((*pos = vc_find(t, oid, type)) >= 0)
		return 0;
	if ((s = oidset_find(&t->ext, oid)) != NULL) {
		*type = (git_object_t)s->val;
		return 0;
	}
	grc = git_odb_read_header(&size, type, t->odb, oid);
	if (grc == GIT_ENOTFOUND)
		return ME_ENOTFOUND;
	if (grc < 0)
		return vc_git_fail(t, ME_EGIT, "cannot read an object");
	if (oidset_put(&t->ext, oid, (uint8_t)*type) < 0) {
		msg_fail(t->msg, sizeof(t->msg), "out of memory");
		return t->rc = ME_ENOMEM;
	}
	return 0;
}

/* Finding who referenced an object the check refused (only then: for the message). */
struct vwho {
	const git_oid *oid;
	git_object_t have; /* GIT_OBJECT_INVALID: missing */
	git_oid from;
	git_object_t want;
};

static int vwho_ref(void *arg, const git_oid *oid, git_object_t want, bool edge, uint32_t pos,
		    const git_oid *from)
{
	struct vwho *w = arg;
	(void)edge, (void)pos;

	if (!git_oid_equal(oid, w->oid) ||
	    (w->have != GIT_OBJECT_INVALID && (want == GIT_OBJECT_ANY || want == w->have)))
		return 0;
	git_oid_cpy(&w->from, from);
	w->want = want;
	return 1;
}

/* The references out of pack q: each in another pack or in the mirror, of the right type. */
static int vc_resolve(struct vctx *t, size_t q)
{
	struct vpack *v = &t->vp[q];

	for (size_t i = 0; i < v->ext.cap; i++) {
		const struct oidset_slot *s = &v->ext.slots[i];
		git_object_t type = GIT_OBJECT_INVALID;
		int64_t pos;
		int rc;

		if (!s->used)
			continue;
		if ((rc = vc_type(t, &s->oid, &type, &pos)) < 0 && rc != ME_ENOTFOUND)
			return rc;
		if (rc == 0 && s->val != VWANT_MIXED && (git_object_t)s->val == type)
			continue;
		/* refused: find the referrer again, for the message */
		struct vwho w = { &s->oid, rc == ME_ENOTFOUND ? GIT_OBJECT_INVALID : type,
				  { { 0 } }, GIT_OBJECT_ANY };
		char scratch[8];
		if (vp_walk(v, vwho_ref, &w, scratch, sizeof(scratch)) != 1)
			git_oid_cpy(&w.from, &s->oid); /* not reached: it was met before */
		return t->rc = rc == ME_ENOTFOUND ? missing(t->msg, sizeof(t->msg), &s->oid, &w.from)
						  : not_a(t->msg, sizeof(t->msg), &s->oid, &w.from,
							  w.want);
	}
	return 0;
}

/* The edges and roots by position over all the packs (with graph). */
static int vc_graph(struct vctx *t)
{
	size_t ne = 0;

	for (size_t q = 0; q < t->np; q++)
		ne += t->vp[q].nedges + t->vp[q].nx;
	if ((t->isroot = calloc(t->n ? t->n : 1, 1)) == NULL ||
	    (ne > 0 && (t->edges = malloc(ne * sizeof(*t->edges))) == NULL)) {
		msg_fail(t->msg, sizeof(t->msg), "out of memory");
		return t->rc = ME_ENOMEM;
	}
	for (size_t q = 0; q < t->np; q++) {
		const struct vpack *v = &t->vp[q];
		uint32_t b = t->base[q];
		if (v->isroot != NULL)
			memcpy(t->isroot + b, v->isroot, v->p.n);
		for (size_t i = 0; i < v->nedges; i++)
			t->edges[t->nedges++] = (struct vedge){ b + v->edges[i].from,
								b + v->edges[i].to };
		for (size_t i = 0; i < v->nx; i++) {
			git_object_t type;
			int64_t k = vc_find(t, &v->xedges[i].to, &type);
			if (k >= 0) /* else the mirror's: not walked */
				t->edges[t->nedges++] = (struct vedge){ b + v->xedges[i].from,
									(uint32_t)k };
		}
	}
	return 0;
}

static void vc_free(struct vctx *t)
{
	git_repository_free(t->view);
	git_odb_free(t->odb);
	oidset_free(&t->ext);
	free(t->edges);
	free(t->isroot);
	free(t->merged);
	free(t->base);
}

static int edge_cmp(const void *a, const void *b)
{
	const struct vedge *x = a, *y = b;
	return x->from < y->from ? -1 : x->from > y->from;
}

/* The root commits of the new packs reachable from the tips, through their commits' parents
 * and their tags' targets (what the mirror already had is not walked: opts.check walks the
 * view when it needs those). */
static int reachable_roots(struct vctx *t, const struct gmsg_refstate *rs, git_oid **out,
			   size_t *nout)
{
	struct vedge *edges = t->edges;
	uint8_t *seen = NULL, *isroot = t->isroot; /* 2 once reached */
	uint32_t *stack = NULL;
	size_t ne = t->nedges, sp = 0, nr = 0;
	int rc = ME_ENOMEM;

	*out = NULL;
	*nout = 0;
	if (t->n == 0)
		return 0;
	if ((seen = calloc(t->n, 1)) == NULL ||
	    (stack = malloc((ne + rs->nrefs + 1) * sizeof(*stack))) == NULL)
		goto out;
	if (ne > 0)
		qsort(edges, ne, sizeof(*edges), edge_cmp);
	/* Each node is pushed at most once per edge into it, plus once per tip. */
	for (size_t i = 0; i < rs->nrefs; i++) {
		git_object_t type;
		git_oid id;
		int64_t k;
		git_oid_fromraw(&id, rs->refs[i].oid);
		if ((k = vc_find(t, &id, &type)) >= 0 && !seen[k]) {
			seen[k] = 1;
			stack[sp++] = (uint32_t)k;
		}
	}
	while (sp > 0) {
		uint32_t k = stack[--sp];
		size_t lo = 0, hi = ne;
		if (isroot[k]) {
			isroot[k] = 2;
			nr++;
		}
		while (lo < hi) { /* first edge from k */
			size_t mid = lo + (hi - lo) / 2;
			if (edges[mid].from < k)
				lo = mid + 1;
			else
				hi = mid;
		}
		for (; lo < ne && edges[lo].from == k; lo++)
			if (!seen[edges[lo].to]) {
				seen[edges[lo].to] = 1;
				stack[sp++] = edges[lo].to;
			}
	}
	if (nr > 0 && (*out = malloc(nr * sizeof(**out))) == NULL)
		goto out;
	for (size_t q = 0; q < t->np; q++)
		for (uint32_t k = 0; k < t->vp[q].p.n; k++)
			if (isroot[t->base[q] + k] == 2)
				git_oid_fromraw(&(*out)[(*nout)++], pidx_oid(&t->vp[q].p, k));
	rc = 0;
out:
	free(seen);
	free(stack);
	return rc;
}

/* Checks the new packs together, each already checked on its own (vp[0..np), vp_check):
 * the references out of each, then the tips, then calls opts.check. */
static int rx_verify(struct bundle_rx *rx, struct vpack *vp, size_t np)
{
	struct vctx t;
	const char **idxpaths = NULL;
	git_oid *roots = NULL;
	size_t nroots = 0;
	uint64_t n = 0;
	int rc = 0;

	memset(&t, 0, sizeof(t));
	t.gitdir = git_repository_path(rx->mirror);
	t.vp = vp;
	t.np = np;
	for (size_t q = 0; q < np; q++)
		if (vp[q].rc < 0) {
			snprintf(rx->msg, sizeof(rx->msg), "%s", vp[q].msg);
			return rx_failed(rx, vp[q].rc);
		}
	if ((t.base = calloc(np ? np : 1, sizeof(*t.base))) == NULL ||
	    (idxpaths = calloc(np ? np : 1, sizeof(*idxpaths))) == NULL) {
		rc = rx_fail(rx, ME_ENOMEM, "out of memory");
		goto out;
	}
	for (size_t q = 0; q < np; q++) {
		if ((np > 1 && vp[q].p.n > 1u << VC_PACK_SHIFT) || n + vp[q].p.n > UINT32_MAX) {
			rc = rx_fail(rx, ME_ETOOBIG, "too many objects");
			goto out;
		}
		t.base[q] = (uint32_t)n;
		n += vp[q].p.n;
		idxpaths[q] = vp[q].idxpath;
	}
	t.n = (uint32_t)n;
	if (oidset_init(&t.ext) < 0) {
		rc = rx_fail(rx, ME_EINTERNAL, "cannot initialise the check");
		goto out;
	}
	if (vc_merge(&t) == 0 &&
	    (t.rc = odb_over(t.gitdir, true, NULL, 0, &t.odb, t.msg, sizeof(t.msg))) == 0)
		for (size_t q = 0; t.rc == 0 && q < np; q++)
			if (vc_resolve(&t, q) == 0) { /* done with what it referenced */
				oidset_free(&vp[q].ext);
				vp[q].ext_init = false;
			}
	for (size_t i = 0; t.rc == 0 && i < rx->expected->nrefs; i++) {
		git_object_t type;
		int64_t pos;
		git_oid oid;

		git_oid_fromraw(&oid, rx->expected->refs[i].oid);
		if ((rc = vc_type(&t, &oid, &type, &pos)) == ME_ENOTFOUND)
			t.rc = missing(t.msg, sizeof(t.msg), &oid, NULL);
	}
	if (t.rc < 0) {
		_Static_assert(sizeof(rx->msg) == sizeof(t.msg), "message sizes");
		memcpy(rx->msg, t.msg, sizeof(rx->msg));
		rx->msg[sizeof(rx->msg) - 1] = '\0';
		rc = rx_failed(rx, t.rc);
		goto out;
	}
	rc = 0;
	if (rx->opts.check != NULL) {
		git_odb *vodb = NULL;
		if (rx->opts.roots && (vc_graph(&t) < 0 ||
				       reachable_roots(&t, rx->expected, &roots, &nroots) < 0)) {
			rc = rx_fail(rx, ME_ENOMEM, "out of memory");
			goto out;
		}
		if ((rc = odb_over(t.gitdir, true, idxpaths, np, &vodb, rx->msg,
				   sizeof(rx->msg))) < 0) {
			rx_failed(rx, rc);
			goto out;
		}
		if (git_repository_wrap_odb(&t.view, vodb) < 0) {
			git_odb_free(vodb);
			rc = rx_git_fail(rx, ME_EGIT, "cannot open the new pack");
			goto out;
		}
		git_odb_free(vodb); /* the view holds it */
		rx->msg[0] = '\0';
		rc = rx->opts.check(t.view, rx->expected, roots, nroots, rx->opts.check_arg,
				    rx->msg, sizeof(rx->msg));
		if (rc < 0) {
			if (rx->msg[0] == '\0')
				snprintf(rx->msg, sizeof(rx->msg), "bundle rejected by the check");
			rx_failed(rx, rc);
		}
	}
out:
	vc_free(&t);
	free(roots);
	free(idxpaths);
	return rc;
}

/* Is a deleted ref in a directory/file conflict with a ref to be written? */
static bool df_conflict(const char *del, const struct gmsg_refstate *rs)
{
	size_t dl = strlen(del);

	for (size_t i = 0; i < rs->nrefs; i++) {
		struct gmsg_str n = rs->refs[i].name;
		size_t m = n.len < dl ? n.len : dl;

		if (n.len != dl && memcmp(n.ptr, del, m) == 0 &&
		    (n.len > dl ? n.ptr[dl] == '/' : del[n.len] == '/'))
			return true;
	}
	return false;
}

/* Locks a ref for tx; a lock held by someone else (or left by a crash: mirror_cleanup) is
 * ME_EBUSY. */
static int tx_lock(struct bundle_rx *rx, git_transaction *tx, const char *name)
{
	int grc = git_transaction_lock_ref(tx, name);

	if (grc == GIT_ELOCKED)
		return rx_fail(rx, ME_EBUSY, "%s is locked", name);
	if (grc < 0)
		return rx_git_fail(rx, ME_EGIT, "cannot lock the refs");
	return 0;
}

static int tx_commit(struct bundle_rx *rx, git_transaction *tx, bool *started)
{
	*started = true;
	if (git_transaction_commit(tx) < 0)
		return rx_git_fail(rx, ME_EGIT, "cannot update the refs");
	return 0;
}

/* Sets the refs to the signed state. *started tells whether a commit began (after which refs
 * may have changed). */
static int rx_update_refs(struct bundle_rx *rx, bool *started, struct bundle_stats *st)
{
	const struct gmsg_refstate *rs = rx->expected;
	struct mirror_state cur;
	git_transaction *tx = NULL;
	char name[GMSG_MAX_REFNAME + 1], head[GMSG_MAX_REFNAME + 1];
	size_t nset = 0, ndel = 0;
	bool conflict = false, set_head;
	int rc;

	*started = false;
	if ((rc = mirror_state_read(rx->mirror, &cur, rx->msg, sizeof(rx->msg))) < 0)
		return rx_failed(rx, rc);
	if (rs->head.len > 0)
		memcpy(head, rs->head.ptr, rs->head.len);
	head[rs->head.len] = '\0';
	set_head = rs->head.len > 0 && strcmp(cur.head, head) != 0;
	if (git_transaction_new(&tx, rx->mirror) < 0) {
		rc = rx_git_fail(rx, ME_EGIT, "cannot start a ref transaction");
		goto out;
	}
	/* Deletions: the mirror's refs absent from the state (names from the mirror itself). */
	for (size_t i = 0; i < cur.nrefs; i++) {
		const struct gmsg_ref *key = &cur.refs[i];
		if (rs->nrefs > 0 &&
		    bsearch(key, rs->refs, rs->nrefs, sizeof(*rs->refs), gmsg_ref_cmp) != NULL)
			continue;
		if ((rc = tx_lock(rx, tx, key->name.ptr)) < 0)
			goto out;
		if (git_transaction_remove(tx, key->name.ptr) < 0) {
			rc = rx_git_fail(rx, ME_EGIT, "cannot delete a ref");
			goto out;
		}
		ndel++;
		if (df_conflict(key->name.ptr, rs))
			conflict = true;
	}
	if (conflict && ndel > 0) {
		/* refs/heads/a must go before refs/heads/a/b can be written. */
		if ((rc = tx_commit(rx, tx, started)) < 0)
			goto out;
		git_transaction_free(tx);
		tx = NULL;
		if (git_transaction_new(&tx, rx->mirror) < 0) {
			rc = rx_git_fail(rx, ME_EGIT, "cannot start a ref transaction");
			goto out;
		}
	}
	for (size_t i = 0; i < rs->nrefs; i++) {
		const struct gmsg_ref *r = &rs->refs[i];
		const struct gmsg_ref *c = cur.nrefs == 0 ? NULL :
			bsearch(r, cur.refs, cur.nrefs, sizeof(*cur.refs), gmsg_ref_cmp);
		git_oid oid;

		if (c != NULL && memcmp(c->oid, r->oid, ME_OID_LEN) == 0)
			continue;
		memcpy(name, r->name.ptr, r->name.len);
		name[r->name.len] = '\0';
		git_oid_fromraw(&oid, r->oid);
		if ((rc = tx_lock(rx, tx, name)) < 0)
			goto out;
		if (git_transaction_set_target(tx, name, &oid, NULL, REFLOG_MSG) < 0) {
			rc = rx_git_fail(rx, ME_EGIT, "cannot set a ref");
			goto out;
		}
		nset++;
	}
	if (set_head) {
		if ((rc = tx_lock(rx, tx, "HEAD")) < 0)
			goto out;
		if (git_transaction_set_symbolic_target(tx, "HEAD", head, NULL, REFLOG_MSG) < 0) {
			rc = rx_git_fail(rx, ME_EGIT, "cannot set HEAD");
			goto out;
		}
	}
	if ((nset > 0 || set_head || (ndel > 0 && !conflict)) &&
	    (rc = tx_commit(rx, tx, started)) < 0)
		goto out;
	st->refs_updated = nset;
	st->refs_deleted = ndel;
	rc = 0;
out:
	git_transaction_free(tx);
	mirror_state_free(&cur);
	return rc;
}

/* Moves the verified pack into objects/pack (the .idx last: it makes the pack visible).
 * *moved tells whether the files are new there. */
static int rx_install(struct bundle_rx *rx, const char *name, bool *moved)
{
	const char *gitdir = git_repository_path(rx->mirror);
	char sp[PATH_MAX], si[PATH_MAX], dp[PATH_MAX], di[PATH_MAX];
	int n1, n2, n3, n4;

	*moved = false;
	n1 = snprintf(sp, sizeof(sp), "%s/pack-%s.pack", rx->tmpdir, name);
	n2 = snprintf(si, sizeof(si), "%s/pack-%s.idx", rx->tmpdir, name);
	n3 = snprintf(dp, sizeof(dp), "%sobjects/pack/pack-%s.pack", gitdir, name);
	n4 = snprintf(di, sizeof(di), "%sobjects/pack/pack-%s.idx", gitdir, name);
	if (n1 < 0 || n2 < 0 || n3 < 0 || n4 < 0 || (size_t)n1 >= sizeof(sp) ||
	    (size_t)n2 >= sizeof(si) || (size_t)n3 >= sizeof(dp) || (size_t)n4 >= sizeof(di))
		return rx_fail(rx, ME_ETOOBIG, "mirror path too long");
	if (access(di, F_OK) == 0)
		return 0; /* the same pack (same name: same content) is already there */
	if (rename(sp, dp) < 0)
		return rx_fail(rx, ME_EIO, "cannot move the pack into %s: %s", gitdir,
			       strerror(errno));
	if (rename(si, di) < 0) {
		int e = errno;
		unlink(dp);
		return rx_fail(rx, ME_EIO, "cannot move the pack index into %s: %s", gitdir,
			       strerror(e));
	}
	*moved = true;
	return 0;
}

static void rx_uninstall(struct bundle_rx *rx, const char *name)
{
	const char *gitdir = git_repository_path(rx->mirror);
	char p[PATH_MAX];

	if (snprintf(p, sizeof(p), "%sobjects/pack/pack-%s.idx", gitdir, name) < (int)sizeof(p))
		unlink(p);
	if (snprintf(p, sizeof(p), "%sobjects/pack/pack-%s.pack", gitdir, name) < (int)sizeof(p))
		unlink(p);
	git_odb_refresh(rx->odb);
}

int bundle_rx_finish(struct bundle_rx *rx, struct bundle_stats *st)
{
	struct bundle_stats dummy;
	char (*names)[GIT_OID_HEXSZ + 1] = NULL;
	bool *moved = NULL, started = false;
	size_t np = 0;
	uint64_t objects = 0;
	int rc;

	if (st == NULL)
		st = &dummy;
	memset(st, 0, sizeof(*st));
	if (rx == NULL)
		return ME_EINVAL;
	if (rx->state == RX_FAILED)
		return rx->rc;
	if (rx->state == RX_DONE)
		return ME_EINVAL;
	if (rx->state == RX_HEADER)
		return rx_fail(rx, ME_EPROTO, "truncated bundle header");
	if (rx->packhdr_len < PACK_HDR_LEN)
		return rx_fail(rx, ME_EPROTO, "bad pack: truncated");
	if (rx->opts.parts != NULL) {
		if (rx->cur < rx->nparts || rx->total != rx->opts.size)
			return rx_fail(rx, ME_EPROTO, "bad pack: truncated");
		if (rx_parts_end(rx) < 0)
			return rx->rc;
		for (uint32_t q = 0; q < rx->nparts; q++)
			if (!rx->parts[q].done)
				return rx_fail(rx, ME_EINTERNAL, "part %" PRIu32 " not indexed", q + 1);
		np = rx->nparts;
	} else {
		if (git_indexer_commit(rx->idx, &rx->prog) < 0)
			return rx_git_fail(rx, ME_EPROTO, "bad pack");
		np = rx->prog.total_objects > 0;
	}
	if ((names = calloc(np ? np : 1, sizeof(*names))) == NULL ||
	    (moved = calloc(np ? np : 1, sizeof(*moved))) == NULL) {
		free(names);
		return rx_fail(rx, ME_ENOMEM, "out of memory");
	}
	if (rx->opts.parts != NULL) {
		for (size_t q = 0; q < np; q++) {
			memcpy(names[q], rx->parts[q].name, sizeof(names[q]));
			objects += rx->parts[q].prog.total_objects;
		}
	} else {
		if (np > 0)
			snprintf(names[0], sizeof(names[0]), "%s", git_indexer_name(rx->idx));
		objects = rx->prog.total_objects;
		git_indexer_free(rx->idx);
		rx->idx = NULL;
	}
	if (rx->opts.parts != NULL) {
		rc = rx_verify(rx, rx->vps, np);
	} else if (np == 0) {
		rc = rx_verify(rx, NULL, 0);
	} else {
		char ip[PATH_MAX], pp[PATH_MAX];
		struct vpack one;
		if ((size_t)snprintf(ip, sizeof(ip), "%s/pack-%s.idx", rx->tmpdir, names[0]) >=
			    sizeof(ip) ||
		    (size_t)snprintf(pp, sizeof(pp), "%s/pack-%s.pack", rx->tmpdir, names[0]) >=
			    sizeof(pp)) {
			rc = rx_fail(rx, ME_ETOOBIG, "mirror path too long");
			goto out;
		}
		vp_check(&one, ip, pp, rx->opts.check != NULL && rx->opts.roots);
		rc = rx_verify(rx, &one, 1);
		vp_free(&one);
	}
	if (rc < 0)
		goto out;
	for (size_t q = 0; q < np; q++)
		if ((rc = rx_install(rx, names[q], &moved[q])) < 0)
			goto out;
	if (git_odb_refresh(rx->odb) < 0) {
		rc = rx_git_fail(rx, ME_EGIT, "cannot refresh the mirror's objects");
		goto out;
	}
	if ((rc = rx_update_refs(rx, &started, st)) < 0)
		goto out;
	st->header_bytes = rx->hdr.len;
	st->pack_bytes = rx->pack_bytes;
	st->objects = objects;
	st->prereqs = rx->hdr.nprereqs;
	st->refs = rx->hdr.nrefs;
	if (rx->opts.parts != NULL)
		st->parts = *rx->opts.parts;
	rx->state = RX_DONE;
	rc = 0;
out:
	for (size_t q = 0; rc < 0 && !started && q < np; q++)
		if (moved[q])
			rx_uninstall(rx, names[q]);
	if (rx->tmpdir != NULL) {
		rm_tree(rx->tmpdir);
		free(rx->tmpdir);
		rx->tmpdir = NULL;
	}
	free(names);
	free(moved);
	return rc;
}

void bundle_rx_free(struct bundle_rx *rx)
{
	if (rx == NULL)
		return;
	rx_parts_free(rx); /* joins their threads */
	git_indexer_free(rx->idx); /* removes its temporary pack */
	if (rx->tmpdir != NULL) {
		rm_tree(rx->tmpdir);
		free(rx->tmpdir);
	}
	git_odb_free(rx->odb);
	bundle_header_free(&rx->hdr);
	free(rx->hbuf);
	free(rx);
}

int bundle_apply(git_repository *mirror, int fd, const struct gmsg_refstate *expected,
		 uint64_t max_bytes, struct bundle_stats *st, char *err, size_t errsz)
{
	struct bundle_rx_opts opts = { .max_bytes = max_bytes };
	struct bundle_rx *rx = NULL;
	unsigned char *buf;
	int rc;

	if (st != NULL)
		memset(st, 0, sizeof(*st));
	if (fd < 0)
		return ME_EINVAL;
	if ((rc = bundle_rx_new(&rx, mirror, expected, &opts, err, errsz)) < 0)
		return rc;
	if ((buf = malloc(BUNDLE_CHUNK)) == NULL) {
		bundle_rx_free(rx);
		return gerr_nomem(err, errsz);
	}
	for (;;) {
		ssize_t n = read_some(fd, buf, BUNDLE_CHUNK);

		if (n < 0) {
			rc = rx_fail(rx, ME_EIO, "cannot read the bundle: %s", strerror(errno));
			break;
		}
		if (n == 0) {
			rc = bundle_rx_finish(rx, st);
			break;
		}
		if ((rc = bundle_rx_write(rx, buf, (size_t)n)) < 0)
			break;
	}
	if (rc < 0)
		gerr_set(err, errsz, "%s", rx->msg);
	free(buf);
	bundle_rx_free(rx);
	return rc;
}
