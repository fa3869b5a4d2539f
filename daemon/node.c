#include "daemon/node.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"

static int root_prepare(const char *root, char *err, size_t errsz)
{
	struct stat st;

	if (mkdir(root, 0700) < 0 && errno != EEXIST) {
		snprintf(err, errsz, "cannot create data root %s: %s", root, strerror(errno));
		return ME_EIO;
	}
	if (stat(root, &st) < 0 || !S_ISDIR(st.st_mode)) {
		snprintf(err, errsz, "data root %s is not a directory", root);
		return ME_EIO;
	}
	return 0;
}

static int root_lock(const char *root, int *fd_out, char *err, size_t errsz)
{
	char path[PATH_MAX + 32];
	snprintf(path, sizeof(path), "%s/megaengined.lock", root);
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		snprintf(err, errsz, "cannot open %s: %s", path, strerror(errno));
		return ME_EIO;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		snprintf(err, errsz, "another megaengined is already running with data root %s",
			 root);
		close(fd);
		return ME_EBUSY;
	}
	/* Record our pid for administrators; the lock, not the content, is what counts. */
	char pid[32];
	int len = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) == 0 && write(fd, pid, (size_t)len) < 0) {
		/* informational only */
	}
	*fd_out = fd;
	return 0;
}

int node_init(struct node *n, const struct me_config *cfg, char *err, size_t errsz)
{
	int rc;

	memset(n, 0, sizeof(*n));
	n->cfg = cfg;
	n->lock_fd = -1;
	n->start_mono_ms = me_mono_ms();
	if ((rc = root_prepare(cfg->root, err, errsz)) < 0)
		return rc;
	if ((rc = root_lock(cfg->root, &n->lock_fd, err, errsz)) < 0)
		return rc;
	rc = me_keypair_load(cfg->root, &n->kp);
	if (rc == 0) {
		n->has_key = 1;
	} else if (rc != ME_ENOKEY) {
		snprintf(err, errsz, "cannot load %s/%s: %s", cfg->root, ME_KEYPAIR_FILE,
			 rc == ME_EPERM ? "permissions are too open (must be 0600, owner only)"
					: me_strerror(rc));
		return rc;
	}
	if ((rc = store_open(cfg->root, &n->store)) < 0) {
		snprintf(err, errsz, "cannot open the database in %s: %s", cfg->root,
			 n->store ? store_errmsg(n->store) : me_strerror(rc));
		store_free(n->store);
		n->store = NULL;
		return rc;
	}
	return 0;
}

void node_free(struct node *n)
{
	store_free(n->store);
	n->store = NULL;
	me_keypair_wipe(&n->kp);
	n->has_key = 0;
	if (n->lock_fd >= 0)
		close(n->lock_fd);
	n->lock_fd = -1;
}

int node_auth_init(struct node *n, int *created, char *err, size_t errsz)
{
	int rc;

	*created = 0;
	if (n->has_key)
		return 0;
	rc = me_keypair_init(n->cfg->root, &n->kp, created);
	if (rc < 0) {
		snprintf(err, errsz, "cannot create the node key in %s: %s", n->cfg->root,
			 me_strerror(rc));
		return rc;
	}
	n->has_key = 1;
	if (*created && n->identity_ready)
		n->identity_ready(n);
	return 0;
}
