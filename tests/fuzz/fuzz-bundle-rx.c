/* Receiving a bundle (daemon/mirror.h bundle_rx_*): bytes from a peer fed to bundle_rx against
 * a small fixed mirror (tests/fuzz/bundle-fixture.h), in pieces, then bundle_rx_finish: the
 * header scan and parse, the comparison with the expected ref state, the prerequisites,
 * libgit2's indexer on the pack and the connectivity check of every object. The check hook
 * then stops the transfer before anything is installed, so the mirror never changes and every
 * input runs against the same mirror.
 *
 * Invariants: nothing but the check hook accepts a bundle, and when it is called every
 * expected tip is an object of the view; whatever happens, no temporary directory is left in
 * the mirror, its packs are those it had and its branch has not moved. */
#include <dirent.h>
#include <string.h>

#include "common/err.h"
#include "daemon/mirror.h"
#include "tests/fuzz/bundle-fixture.h"
#include "tests/fuzz/fuzz.h"

#define STOPPED "fuzz: stopped before install"

static struct bundle_fixture fx;
static size_t mirror_entries; /* entries of the mirror's git directory and objects/pack */
static int checked;

static void cleanup(void)
{
	bundle_fixture_free(&fx);
}

static size_t count_dir(const char *path, int incoming_ok)
{
	DIR *d = opendir(path);
	struct dirent *de;
	size_t n = 0;

	FUZZ_ASSERT(d != NULL);
	while ((de = readdir(d)) != NULL) {
		FUZZ_ASSERT(incoming_ok || strncmp(de->d_name, "me-incoming-", 12) != 0);
		n++;
	}
	closedir(d);
	return n;
}

static size_t count_mirror(void)
{
	char p[PATH_MAX + 32];
	const char *gitdir = git_repository_path(fx.mirror);

	snprintf(p, sizeof(p), "%sobjects/pack", gitdir);
	return count_dir(gitdir, 0) + count_dir(p, 0);
}

static int stop(git_repository *view, const struct gmsg_refstate *expected, void *arg, char *err,
		size_t errsz)
{
	git_odb *odb;

	(void)arg;
	FUZZ_ASSERT(git_repository_odb(&odb, view) == 0);
	for (size_t i = 0; i < expected->nrefs; i++) {
		git_oid oid;
		git_oid_fromraw(&oid, expected->refs[i].oid);
		FUZZ_ASSERT(git_odb_exists(odb, &oid));
	}
	git_odb_free(odb);
	checked = 1;
	snprintf(err, errsz, STOPPED);
	return ME_EPERM;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	FUZZ_ASSERT(bundle_fixture_init(&fx) == 0);
	atexit(cleanup);
	mirror_entries = count_mirror();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bundle_rx_opts opts = { .max_bytes = 16u << 20, .check = stop };
	struct bundle_rx *rx;
	char err[256];
	/* Data arrives in pieces; their size varies with the input's. */
	size_t chunk = 1 + size % 4093;
	int rc = 0;
	git_oid head;

	checked = 0;
	FUZZ_ASSERT(bundle_rx_new(&rx, fx.mirror, &fx.expected, &opts, err, sizeof(err)) == 0);
	for (size_t off = 0; off < size && rc == 0; off += chunk)
		rc = bundle_rx_write(rx, data + off, size - off < chunk ? size - off : chunk);
	if (rc == 0)
		rc = bundle_rx_finish(rx, NULL);
	FUZZ_ASSERT(rc < 0 && rc != ME_EINVAL);
	FUZZ_ASSERT(bundle_rx_errmsg(rx)[0] != '\0');
	if (checked)
		FUZZ_ASSERT(rc == ME_EPERM && strcmp(bundle_rx_errmsg(rx), STOPPED) == 0);
	bundle_rx_free(rx);

	FUZZ_ASSERT(count_mirror() == mirror_entries);
	FUZZ_ASSERT(git_reference_name_to_id(&head, fx.mirror, "refs/heads/main") == 0);
	FUZZ_ASSERT(git_oid_equal(&head, &fx.c1));
	return 0;
}
