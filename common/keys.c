#include "common/keys.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <sodium.h>

#include "common/err.h"

#define KEY_HEADER "megaengine-keypair-v1\n"
#define KEY_HEADER_LEN (sizeof(KEY_HEADER) - 1)
/* Exact size of a well-formed key file: header, 128 hex digits, newline. */
#define KEY_FILE_LEN (KEY_HEADER_LEN + 2 * ME_SK_LEN + 1)
/* Anything larger is not even read. */
#define KEY_FILE_MAX 4096

static int crypto_ready(void)
{
	/* sodium_init() is thread-safe and idempotent: 0 first time, 1 afterwards. */
	return sodium_init() < 0 ? ME_EINTERNAL : 0;
}

static int key_path(const char *root, const char *name, char *out, size_t outsz)
{
	int n;

	if (root == NULL || *root == '\0')
		return ME_EINVAL;
	n = snprintf(out, outsz, "%s/%s", root, name);
	if (n < 0 || (size_t)n >= outsz)
		return ME_EINVAL;
	return 0;
}

static int errno_to_me(int e)
{
	switch (e) {
	case EACCES:
	case EPERM:
	case ELOOP: /* O_NOFOLLOW on a symbolic link */
		return ME_EPERM;
	case ENOMEM:
		return ME_ENOMEM;
	default:
		return ME_EIO;
	}
}

static int hex_nibble(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static void hex_lower(const uint8_t *in, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 0x0f];
	}
}

/* Fills kp from a 64-byte libsodium secret key after checking that its public half is the one
 * derived from its seed. 0 or ME_EKEY. */
static int keypair_from_sk(const uint8_t sk[ME_SK_LEN], struct me_keypair *kp)
{
	uint8_t seed[crypto_sign_SEEDBYTES];
	uint8_t pk2[crypto_sign_PUBLICKEYBYTES];
	uint8_t sk2[crypto_sign_SECRETKEYBYTES];
	int rc = ME_EKEY;

	/* crypto_sign_ed25519_sk_to_pk() only copies the stored half; re-derive it instead. */
	crypto_sign_ed25519_sk_to_seed(seed, sk);
	if (crypto_sign_seed_keypair(pk2, sk2, seed) != 0)
		goto out;
	if (sodium_memcmp(pk2, sk + crypto_sign_SEEDBYTES, ME_PK_LEN) != 0)
		goto out;
	memcpy(kp->pk, pk2, ME_PK_LEN);
	memcpy(kp->sk, sk, ME_SK_LEN);
	if (me_did_key_from_pk(kp->pk, kp->did, sizeof(kp->did)) != 0) {
		rc = ME_EINTERNAL;
		goto out;
	}
	rc = 0;
out:
	sodium_memzero(seed, sizeof(seed));
	sodium_memzero(sk2, sizeof(sk2));
	if (rc != 0)
		sodium_memzero(kp, sizeof(*kp));
	return rc;
}

/* Strict parse of the whole file content. 0 or ME_EKEY. */
static int keyfile_parse(const char *buf, size_t len, struct me_keypair *kp)
{
	uint8_t sk[ME_SK_LEN];
	const char *hex = buf + KEY_HEADER_LEN;
	int rc = ME_EKEY;

	if (len != KEY_FILE_LEN || memcmp(buf, KEY_HEADER, KEY_HEADER_LEN) != 0 ||
	    buf[len - 1] != '\n')
		return ME_EKEY;
	for (size_t i = 0; i < ME_SK_LEN; i++) {
		int hi = hex_nibble((unsigned char)hex[2 * i]);
		int lo = hex_nibble((unsigned char)hex[2 * i + 1]);

		if (hi < 0 || lo < 0)
			goto out;
		sk[i] = (uint8_t)(hi << 4 | lo);
	}
	rc = keypair_from_sk(sk, kp);
out:
	sodium_memzero(sk, sizeof(sk));
	return rc;
}

int me_keypair_load(const char *root, struct me_keypair *kp)
{
	char path[PATH_MAX];
	char buf[KEY_FILE_MAX + 1];
	struct stat st;
	size_t len = 0;
	int fd, rc;

	if (kp == NULL)
		return ME_EINVAL;
	sodium_memzero(kp, sizeof(*kp));
	if ((rc = crypto_ready()) != 0)
		return rc;
	if ((rc = key_path(root, ME_KEYPAIR_FILE, path, sizeof(path))) != 0)
		return rc;

	/* O_NONBLOCK: a FIFO planted in place of the key must not hang us; fstat refuses it. */
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0)
		return errno == ENOENT ? ME_ENOKEY : errno_to_me(errno);
	if (fstat(fd, &st) != 0) {
		rc = ME_EIO;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = ME_EKEY;
		goto out;
	}
	if ((st.st_mode & 077) != 0) {
		rc = ME_EPERM;
		goto out;
	}
	if (st.st_size < 0 || st.st_size > KEY_FILE_MAX) {
		rc = ME_EKEY;
		goto out;
	}
	/* Read to EOF, bounded by the buffer: the file may change after fstat. */
	while (len < sizeof(buf)) {
		ssize_t r = read(fd, buf + len, sizeof(buf) - len);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			rc = ME_EIO;
			goto out;
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	rc = len > KEY_FILE_MAX ? ME_EKEY : keyfile_parse(buf, len, kp);
out:
	sodium_memzero(buf, sizeof(buf));
	close(fd);
	return rc;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int rc = 0;

	if (fd < 0)
		return ME_EIO;
	if (fsync(fd) != 0 && errno != EINVAL)
		rc = ME_EIO;
	close(fd);
	return rc;
}

static int root_ensure(const char *root)
{
	struct stat st;

	if (mkdir(root, 0700) == 0)
		return 0;
	if (errno != EEXIST)
		return errno == ENOENT ? ME_ENOTFOUND : errno_to_me(errno);
	/* Existing root: follows a symbolic link on purpose (a relocated data directory). */
	if (stat(root, &st) != 0)
		return errno_to_me(errno);
	return S_ISDIR(st.st_mode) ? 0 : ME_EIO;
}

/* Writes a new key to a private temporary file and links it into place. link() refuses to
 * replace an existing name, so when two processes race the first complete key wins and the
 * loser reports ME_EEXIST; nobody ever sees a partial file. */
static int keyfile_create(const char *root, const char *path, const struct me_keypair *kp)
{
	char tmp[PATH_MAX];
	char name[64];
	char buf[KEY_FILE_LEN];
	int fd, rc = ME_EIO;

	snprintf(name, sizeof(name), ".%s.tmp.%ld.%08x", ME_KEYPAIR_FILE, (long)getpid(),
		 (unsigned int)randombytes_random());
	if ((rc = key_path(root, name, tmp, sizeof(tmp))) != 0)
		return rc;

	memcpy(buf, KEY_HEADER, KEY_HEADER_LEN);
	hex_lower(kp->sk, ME_SK_LEN, buf + KEY_HEADER_LEN);
	buf[KEY_FILE_LEN - 1] = '\n';

	fd = open(tmp, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		rc = errno_to_me(errno);
		goto out;
	}
	/* The umask may only have removed bits, but be exact. */
	if (fchmod(fd, 0600) != 0 || write_all(fd, buf, sizeof(buf)) != 0 || fsync(fd) != 0) {
		rc = ME_EIO;
		close(fd);
		unlink(tmp);
		goto out;
	}
	if (close(fd) != 0) {
		rc = ME_EIO;
		unlink(tmp);
		goto out;
	}
	if (link(tmp, path) != 0)
		rc = errno == EEXIST ? ME_EEXIST : errno_to_me(errno);
	else
		rc = 0;
	unlink(tmp);
	if (rc == 0)
		rc = fsync_dir(root);
out:
	sodium_memzero(buf, sizeof(buf));
	return rc;
}

int me_keypair_init(const char *root, struct me_keypair *kp, int *created)
{
	char path[PATH_MAX];
	int rc;

	if (kp == NULL || created == NULL)
		return ME_EINVAL;
	*created = 0;
	sodium_memzero(kp, sizeof(*kp));
	if ((rc = crypto_ready()) != 0)
		return rc;
	if ((rc = key_path(root, ME_KEYPAIR_FILE, path, sizeof(path))) != 0)
		return rc;
	if ((rc = root_ensure(root)) != 0)
		return rc;

	rc = me_keypair_load(root, kp);
	if (rc != ME_ENOKEY)
		return rc;

	if (crypto_sign_keypair(kp->pk, kp->sk) != 0) {
		rc = ME_EINTERNAL;
		goto fail;
	}
	if (me_did_key_from_pk(kp->pk, kp->did, sizeof(kp->did)) != 0) {
		rc = ME_EINTERNAL;
		goto fail;
	}
	rc = keyfile_create(root, path, kp);
	if (rc == ME_EEXIST) /* another process won the race: use its key */
		return me_keypair_load(root, kp);
	if (rc != 0)
		goto fail;
	*created = 1;
	return 0;
fail:
	sodium_memzero(kp, sizeof(*kp));
	return rc;
}

void me_keypair_wipe(struct me_keypair *kp)
{
	if (kp != NULL)
		sodium_memzero(kp, sizeof(*kp));
}

int me_sign(const struct me_keypair *kp, const void *msg, size_t len, uint8_t sig[ME_SIG_LEN])
{
	static const uint8_t empty;

	if (kp == NULL || sig == NULL || (msg == NULL && len > 0))
		return ME_EINVAL;
	if (crypto_ready() != 0)
		return ME_EINTERNAL;
	if (msg == NULL)
		msg = &empty;
	if (crypto_sign_detached(sig, NULL, msg, len, kp->sk) != 0)
		return ME_EINTERNAL;
	return 0;
}

int me_verify(const uint8_t pk[ME_PK_LEN], const void *msg, size_t len,
	      const uint8_t sig[ME_SIG_LEN])
{
	static const uint8_t empty;

	if (pk == NULL || sig == NULL || (msg == NULL && len > 0))
		return ME_EPERM;
	if (crypto_ready() != 0)
		return ME_EINTERNAL;
	if (msg == NULL)
		msg = &empty;
	return crypto_sign_verify_detached(sig, msg, len, pk) == 0 ? 0 : ME_EPERM;
}
