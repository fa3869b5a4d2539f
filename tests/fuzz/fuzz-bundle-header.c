/* Bundle header (daemon/mirror.h): bundle_header_parse on bytes from a peer, and the same bytes
 * through bundle_read_header from a seekable file (a memfd) and, for small inputs, from a pipe
 * (read one byte at a time).
 *
 * Invariants: a parsed header ends with a blank line within the input, starts with the v2
 * signature, its refs are valid, strictly sorted and unique, and every line but the first is a
 * prerequisite or a ref; all three readers give the same result, and a file is left at the
 * first byte after the header. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/err.h"
#include "daemon/mirror.h"
#include "tests/fuzz/fuzz.h"

#define PIPE_MAX 16384 /* below the pipe's capacity: written at once, before reading */

static int memfd = -1;

static void same(const struct bundle_header *a, const struct bundle_header *b)
{
	FUZZ_ASSERT(a->len == b->len && memcmp(a->buf, b->buf, a->len) == 0);
	FUZZ_ASSERT(a->nprereqs == b->nprereqs && a->nrefs == b->nrefs);
	for (size_t i = 0; i < a->nprereqs; i++)
		FUZZ_ASSERT(git_oid_equal(&a->prereqs[i], &b->prereqs[i]));
	for (size_t i = 0; i < a->nrefs; i++) {
		FUZZ_ASSERT(strcmp(a->refs[i].name, b->refs[i].name) == 0);
		FUZZ_ASSERT(git_oid_equal(&a->refs[i].oid, &b->refs[i].oid));
	}
}

static void check(const uint8_t *data, const struct bundle_header *h)
{
	static const char sig[] = "# v2 git bundle\n";
	size_t lines = 0;

	FUZZ_ASSERT(h->len >= sizeof(sig) && h->len <= BUNDLE_MAX_HEADER);
	FUZZ_ASSERT(memcmp(data, sig, sizeof(sig) - 1) == 0);
	FUZZ_ASSERT(data[h->len - 2] == '\n' && data[h->len - 1] == '\n');
	for (size_t i = 0; i < h->len; i++)
		lines += data[i] == '\n';
	FUZZ_ASSERT(lines == 2 + h->nprereqs + h->nrefs);
	FUZZ_ASSERT(h->nrefs <= GMSG_MAX_REFS);
	for (size_t i = 0; i < h->nrefs; i++) {
		const char *n = h->refs[i].name;
		FUZZ_ASSERT(n > h->buf && n < h->buf + h->len);
		FUZZ_ASSERT(gmsg_refname_valid(n, strlen(n)));
		FUZZ_ASSERT(i == 0 || strcmp(h->refs[i - 1].name, n) < 0);
	}
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	memfd = memfd_create("fuzz-bundle-header", MFD_CLOEXEC);
	FUZZ_ASSERT(memfd >= 0);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bundle_header h, hf, hp;
	char err[256], errf[256], errp[256];
	int rc = bundle_header_parse(data, size, &h, err, sizeof(err));

	FUZZ_ASSERT(rc == 0 || rc == ME_EPROTO || rc == ME_ETOOBIG || rc == ME_EVERSION ||
		    rc == ME_ENOMEM);
	if (rc == 0)
		check(data, &h);
	else
		FUZZ_ASSERT(err[0] != '\0' && h.buf == NULL && h.refs == NULL && h.prereqs == NULL);

	/* From a file. */
	FUZZ_ASSERT(ftruncate(memfd, 0) == 0 && lseek(memfd, 0, SEEK_SET) == 0);
	FUZZ_ASSERT(size == 0 || pwrite(memfd, data, size, 0) == (ssize_t)size);
	int frc = bundle_read_header(memfd, &hf, errf, sizeof(errf));
	FUZZ_ASSERT(frc == rc && strcmp(err, errf) == 0);
	if (rc == 0) {
		same(&h, &hf);
		FUZZ_ASSERT(lseek(memfd, 0, SEEK_CUR) == (off_t)h.len);
	}

	/* From a pipe. */
	if (size <= PIPE_MAX) {
		int p[2];
		FUZZ_ASSERT(pipe(p) == 0);
		FUZZ_ASSERT(size == 0 || write(p[1], data, size) == (ssize_t)size);
		close(p[1]);
		int prc = bundle_read_header(p[0], &hp, errp, sizeof(errp));
		close(p[0]);
		FUZZ_ASSERT(prc == rc && strcmp(err, errp) == 0);
		if (rc == 0)
			same(&h, &hp);
		bundle_header_free(&hp);
	}
	bundle_header_free(&hf);
	bundle_header_free(&h);
	return 0;
}
