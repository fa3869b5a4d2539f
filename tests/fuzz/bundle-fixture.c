#include "tests/fuzz/bundle-fixture.h"

#include <dirent.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "common/err.h"
#include "common/ids.h"
#include "daemon/mirror.h"
#include "tests/fuzz/fuzz.h"

#define FIXED_TIME 1700000000

static int fail(const char *what)
{
	const git_error *e = git_error_last();

	fprintf(stderr, "bundle fixture: %s: %s\n", what, e != NULL ? e->message : "failed");
	return -1;
}

/* Builds C1 (and with two, C2 and the tag) in r; refs/heads/main points to the last commit. */
static int build(git_repository *r, int two, git_oid *c1, git_oid *c2, git_oid *tag)
{
	git_signature *sig = NULL;
	git_treebuilder *tb = NULL;
	git_commit *parent = NULL;
	git_object *target = NULL;
	git_oid blob, tree;
	int rc = -1;

	if (git_signature_new(&sig, "megaengine fuzz", "fuzz@megaengine.invalid", FIXED_TIME, 0) < 0)
		return fail("signature");
	if (git_blob_create_from_buffer(&blob, r, "hello\n", 6) < 0 ||
	    git_treebuilder_new(&tb, r, NULL) < 0 ||
	    git_treebuilder_insert(NULL, tb, "README", &blob, GIT_FILEMODE_BLOB) < 0 ||
	    git_treebuilder_write(&tree, tb) < 0) {
		fail("first tree");
		goto out;
	}
	git_tree *t = NULL;
	if (git_tree_lookup(&t, r, &tree) < 0) {
		fail("first tree");
		goto out;
	}
	int grc = git_commit_create(c1, r, two ? NULL : "refs/heads/main", sig, sig, NULL,
				    "first\n", t, 0, NULL);
	git_tree_free(t);
	if (grc < 0) {
		fail("first commit");
		goto out;
	}
	if (two) {
		if (git_blob_create_from_buffer(&blob, r, "world\n", 6) < 0 ||
		    git_treebuilder_insert(NULL, tb, "b", &blob, GIT_FILEMODE_BLOB) < 0 ||
		    git_treebuilder_write(&tree, tb) < 0 || git_tree_lookup(&t, r, &tree) < 0) {
			fail("second tree");
			goto out;
		}
		if (git_commit_lookup(&parent, r, c1) < 0) {
			git_tree_free(t);
			fail("first commit");
			goto out;
		}
		const git_commit *parents[1] = { parent };
		grc = git_commit_create(c2, r, "refs/heads/main", sig, sig, NULL, "second\n", t, 1,
					parents);
		git_tree_free(t);
		if (grc < 0 || git_object_lookup(&target, r, c2, GIT_OBJECT_COMMIT) < 0 ||
		    git_tag_create(tag, r, "v1", target, sig, "v1\n", 0) < 0) {
			fail("second commit and tag");
			goto out;
		}
	}
	rc = 0;
out:
	git_object_free(target);
	git_commit_free(parent);
	git_treebuilder_free(tb);
	git_signature_free(sig);
	return rc;
}

int bundle_fixture_init(struct bundle_fixture *fx)
{
	const char *base = getenv("TMPDIR");
	char path[PATH_MAX + 16];
	uint8_t seed[crypto_sign_SEEDBYTES], pk[crypto_sign_PUBLICKEYBYTES],
		sk[crypto_sign_SECRETKEYBYTES];
	git_oid unused;

	memset(fx, 0, sizeof(*fx));
	if (base == NULL || *base == '\0')
		base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
	snprintf(fx->dir, sizeof(fx->dir), "%s/me-fuzz-bundle-XXXXXX", base);
	if (mkdtemp(fx->dir) == NULL) {
		perror("bundle fixture: mkdtemp");
		fx->dir[0] = '\0';
		return -1;
	}
	git_libgit2_init();
	snprintf(path, sizeof(path), "%s/src.git", fx->dir);
	if (git_repository_init(&fx->src, path, 1) < 0)
		return fail("init src");
	snprintf(path, sizeof(path), "%s/mirror.git", fx->dir);
	if (git_repository_init(&fx->mirror, path, 1) < 0)
		return fail("init mirror");
	if (build(fx->src, 1, &fx->c1, &fx->c2, &fx->tag) < 0 ||
	    build(fx->mirror, 0, &unused, NULL, NULL) < 0)
		return -1;
	if (!git_oid_equal(&unused, &fx->c1)) {
		fprintf(stderr, "bundle fixture: the two first commits differ\n");
		return -1;
	}

	/* The creator: a fixed key, so that the repository id is fixed too. */
	memset(seed, 7, sizeof(seed));
	if (sodium_init() < 0 || crypto_sign_seed_keypair(pk, sk, seed) != 0 ||
	    me_did_repo_compute(fx->c1.id, pk, fx->repo_id, sizeof(fx->repo_id)) < 0) {
		fprintf(stderr, "bundle fixture: cannot compute the repository id\n");
		return -1;
	}
	fx->refs[0].name = gmsg_str("refs/heads/main");
	memcpy(fx->refs[0].oid, fx->c2.id, ME_OID_LEN);
	fx->refs[1].name = gmsg_str("refs/tags/v1");
	memcpy(fx->refs[1].oid, fx->tag.id, ME_OID_LEN);
	fx->expected.repo_id = gmsg_str(fx->repo_id);
	fx->expected.seq = 1;
	fx->expected.head = gmsg_str("refs/heads/main");
	fx->expected.refs = fx->refs;
	fx->expected.nrefs = 2;
	return 0;
}

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
	(void)sb;
	(void)type;
	(void)ftw;
	return remove(p);
}

void bundle_fixture_free(struct bundle_fixture *fx)
{
	git_repository_free(fx->src);
	git_repository_free(fx->mirror);
	fx->src = fx->mirror = NULL;
	if (fx->dir[0] != '\0')
		nftw(fx->dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	fx->dir[0] = '\0';
	git_libgit2_shutdown();
}

/* ---- one transfer, for the fuzz targets ---- */

#define STOPPED "fuzz: stopped before install"

static size_t count_dir(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *de;
	size_t n = 0;

	FUZZ_ASSERT(d != NULL);
	while ((de = readdir(d)) != NULL) {
		FUZZ_ASSERT(strncmp(de->d_name, "me-incoming-", 12) != 0);
		n++;
	}
	closedir(d);
	return n;
}

static size_t count_mirror(struct bundle_fixture *fx)
{
	char p[PATH_MAX + 32];
	const char *gitdir = git_repository_path(fx->mirror);

	snprintf(p, sizeof(p), "%sobjects/pack", gitdir);
	return count_dir(gitdir) + count_dir(p);
}

static int stop(git_repository *view, const struct gmsg_refstate *expected, const git_oid *roots,
		size_t nroots, void *arg, char *err, size_t errsz)
{
	git_odb *odb;

	/* Every root reported is a commit without parents of the view. */
	for (size_t i = 0; i < nroots; i++) {
		git_commit *c = NULL;
		FUZZ_ASSERT(git_commit_lookup(&c, view, &roots[i]) == 0);
		FUZZ_ASSERT(git_commit_parentcount(c) == 0);
		git_commit_free(c);
	}
	FUZZ_ASSERT(git_repository_odb(&odb, view) == 0);
	for (size_t i = 0; i < expected->nrefs; i++) {
		git_oid oid;
		git_oid_fromraw(&oid, expected->refs[i].oid);
		FUZZ_ASSERT(git_odb_exists(odb, &oid));
	}
	git_odb_free(odb);
	*(int *)arg = 1;
	snprintf(err, errsz, STOPPED);
	return ME_EPERM;
}

int bundle_fixture_rx(struct bundle_fixture *fx, const uint8_t *data, size_t len, size_t chunk)
{
	int checked = 0;
	struct bundle_rx_opts opts = { .max_bytes = 16u << 20, .check = stop, .check_arg = &checked,
				       .roots = true };
	struct bundle_rx *rx;
	char err[256];
	int rc = 0;
	git_oid head;

	if (fx->entries == 0)
		fx->entries = count_mirror(fx);
	FUZZ_ASSERT(chunk > 0);
	FUZZ_ASSERT(bundle_rx_new(&rx, fx->mirror, &fx->expected, &opts, err, sizeof(err)) == 0);
	for (size_t off = 0; off < len && rc == 0; off += chunk)
		rc = bundle_rx_write(rx, data + off, len - off < chunk ? len - off : chunk);
	if (rc == 0)
		rc = bundle_rx_finish(rx, NULL);
	FUZZ_ASSERT(rc < 0 && rc != ME_EINVAL);
	FUZZ_ASSERT(bundle_rx_errmsg(rx)[0] != '\0');
	if (checked)
		FUZZ_ASSERT(rc == ME_EPERM && strcmp(bundle_rx_errmsg(rx), STOPPED) == 0);
	bundle_rx_free(rx);

	FUZZ_ASSERT(count_mirror(fx) == fx->entries);
	FUZZ_ASSERT(git_reference_name_to_id(&head, fx->mirror, "refs/heads/main") == 0);
	FUZZ_ASSERT(git_oid_equal(&head, &fx->c1));
	return checked;
}
