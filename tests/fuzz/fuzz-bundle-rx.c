/* Receiving a bundle (daemon/mirror.h bundle_rx_*): bytes from a peer fed to bundle_rx against
 * a small fixed mirror (tests/fuzz/bundle-fixture.h), in pieces, then bundle_rx_finish: the
 * header scan and parse, the comparison with the expected ref state, the prerequisites,
 * libgit2's indexer on the pack and the connectivity check of every object. The check hook
 * then stops the transfer before anything is installed, so the mirror never changes and every
 * input runs against the same mirror. (Mutated pack bytes rarely survive zlib and the pack
 * checksum: the bundle-objects target builds valid packs of arbitrary objects instead.)
 *
 * Invariants (bundle_fixture_rx): nothing but the check hook accepts a bundle, and when it
 * runs every expected tip is an object; whatever happens, no temporary directory is left in
 * the mirror, its packs are those it had and its branch has not moved. */
#include "tests/fuzz/bundle-fixture.h"
#include "tests/fuzz/fuzz.h"

static struct bundle_fixture fx;

static void cleanup(void)
{
	bundle_fixture_free(&fx);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	FUZZ_ASSERT(bundle_fixture_init(&fx) == 0);
	atexit(cleanup);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* Data arrives in pieces; their size varies with the input's. */
	bundle_fixture_rx(&fx, data, size, 1 + size % 4093);
	return 0;
}
