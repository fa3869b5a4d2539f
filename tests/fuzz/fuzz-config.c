/* The configuration file (daemon/config.c): the input is the file's content, loaded with
 * me_config_load as `megaengined --config FILE` would (FILE is a memfd, read through
 * /proc/self/fd). The environment that could override the file is cleared and HOME is fixed.
 *
 * Invariants: a load that succeeds gives a configuration within its bounds (counts, ranges,
 * NUL-terminated strings, absolute paths from the file, addresses and node ids that parse
 * again) and loading the same file again gives the same configuration (SIGHUP reloads it) with
 * no key reported as changed; a load that fails says why, the same way each time. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "daemon/config.h"
#include "tests/fuzz/fuzz.h"

static int memfd = -1;
static char path[64];
static struct me_config cfg, cfg2;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	unsetenv("MEGAENGINE_CONFIG");
	unsetenv("MEGAENGINE_ROOT");
	unsetenv("MEGAENGINE_LOG");
	setenv("HOME", "/nonexistent-fuzz-home", 1);
	memfd = memfd_create("fuzz-config", MFD_CLOEXEC);
	FUZZ_ASSERT(memfd >= 0);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
	return 0;
}

#define TERMINATED(a) (strnlen((a), sizeof(a)) < sizeof(a))

static void check_addr(const struct me_sockaddr *a)
{
	struct me_sockaddr b;

	FUZZ_ASSERT(TERMINATED(a->text) && a->len > 0);
	FUZZ_ASSERT(me_sockaddr_parse(a->text, &b) == 0 && b.len == a->len);
	FUZZ_ASSERT(memcmp(&a->ss, &b.ss, a->len) == 0 && strcmp(a->text, b.text) == 0);
}

static void check(const struct me_config *c)
{
	uint8_t pk[ME_PK_LEN];

	FUZZ_ASSERT(TERMINATED(c->root) && c->root[0] == '/');
	FUZZ_ASSERT(TERMINATED(c->alias) && c->alias[0] != '\0');
	FUZZ_ASSERT(TERMINATED(c->cert_path) && c->cert_path[0] == '/');
	FUZZ_ASSERT(TERMINATED(c->socket_path) && c->socket_path[0] == '/');
	FUZZ_ASSERT(TERMINATED(c->socket_group) && TERMINATED(c->config_path));
	FUZZ_ASSERT(strcmp(c->config_path, path) == 0);
	FUZZ_ASSERT(c->naddrs >= 1 && c->naddrs <= ME_MAX_ADDRS);
	FUZZ_ASSERT(c->nannounce <= ME_MAX_ADDRS && c->nboots <= ME_MAX_BOOTSTRAP);
	for (size_t i = 0; i < c->naddrs; i++)
		check_addr(&c->addrs[i]);
	for (size_t i = 0; i < c->nannounce; i++)
		check_addr(&c->announce[i]);
	for (size_t i = 0; i < c->nboots; i++) {
		FUZZ_ASSERT(TERMINATED(c->boots[i].did) && me_did_key_parse(c->boots[i].did, pk) == 0);
		check_addr(&c->boots[i].addr);
	}
	FUZZ_ASSERT(c->gossip_interval_ms >= 1000 && c->gossip_interval_ms <= 3600 * 1000);
	FUZZ_ASSERT(c->gossip_interval_ms % 1000 == 0 && c->max_outbound <= 64);
	FUZZ_ASSERT(c->max_repo_size >= 1 && c->max_repo_size <= 1ull << 40);
	/* syslog priorities: 0 (emerg) to 7 (debug); numbers are accepted too */
	FUZZ_ASSERT(c->log_level >= 0 && c->log_level <= LOG_DEBUG && c->foreground == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *argv[] = { "megaengined", "--config", path, NULL };
	char err[1024], err2[1024], diff[512];

	FUZZ_ASSERT(ftruncate(memfd, 0) == 0);
	FUZZ_ASSERT(size == 0 || pwrite(memfd, data, size, 0) == (ssize_t)size);
	err[0] = '\0';
	int rc = me_config_load(&cfg, 3, argv, err, sizeof(err));
	if (rc < 0) {
		FUZZ_ASSERT(rc == ME_EINVAL && err[0] != '\0');
	} else {
		FUZZ_ASSERT(rc == ME_CONFIG_OK);
		check(&cfg);
	}

	/* Again, as on SIGHUP: the same result. */
	err2[0] = '\0';
	FUZZ_ASSERT(me_config_load(&cfg2, 3, argv, err2, sizeof(err2)) == rc);
	if (rc < 0) {
		FUZZ_ASSERT(strcmp(err, err2) == 0);
		return 0;
	}
	for (int restart_only = 0; restart_only <= 1; restart_only++) {
		me_config_diff(&cfg, &cfg2, restart_only, diff, sizeof(diff));
		FUZZ_ASSERT(diff[0] == '\0');
	}
	return 0;
}
