/* Node identity: key file creation, format, permissions, strict loading, races, signatures. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>

#include "common/err.h"
#include "common/ids.h"
#include "common/keys.h"

#define HEADER "megaengine-keypair-v1\n"
#define FILE_LEN (sizeof(HEADER) - 1 + 128 + 1)

struct fx {
	char tmp[64];
	char root[128];
	char path[160];
};

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	snprintf(f->tmp, sizeof(f->tmp), "/tmp/me-test-keys.XXXXXX");
	assert_non_null(mkdtemp(f->tmp));
	snprintf(f->root, sizeof(f->root), "%s/root", f->tmp);
	snprintf(f->path, sizeof(f->path), "%s/%s", f->root, ME_KEYPAIR_FILE);
	*state = f;
	return 0;
}

static int rm_cb(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

static int teardown(void **state)
{
	struct fx *f = *state;

	nftw(f->tmp, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

static void write_file(const char *path, const void *data, size_t len, mode_t mode)
{
	int fd;

	unlink(path);
	fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode);
	assert_true(fd >= 0);
	assert_int_equal(fchmod(fd, mode), 0);
	assert_int_equal(write(fd, data, len), (ssize_t)len);
	assert_int_equal(close(fd), 0);
}

static size_t read_file(const char *path, char *buf, size_t sz)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	assert_true(fd >= 0);
	n = read(fd, buf, sz);
	assert_true(n >= 0);
	close(fd);
	return (size_t)n;
}

static void hex(const uint8_t *in, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", in[i]);
}

/* Creates a fresh key, returns its file content in buf (FILE_LEN + NUL). */
static void make_key(struct fx *f, struct me_keypair *kp, char *buf)
{
	int created = -1;

	assert_int_equal(me_keypair_init(f->root, kp, &created), 0);
	assert_int_equal(created, 1);
	assert_int_equal(read_file(f->path, buf, FILE_LEN + 1), FILE_LEN);
	buf[FILE_LEN] = '\0';
}

static void test_init_creates(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp, kp2;
	char buf[FILE_LEN + 16], want[129];
	struct stat st;
	char did[ME_DID_KEY_SIZE];
	uint8_t pk[ME_PK_LEN];
	int created = -1;

	umask(022);
	make_key(f, &kp, buf);
	assert_int_equal(stat(f->root, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(st.st_mode & 07777, 0700);
	assert_int_equal(lstat(f->path, &st), 0);
	assert_true(S_ISREG(st.st_mode));
	assert_int_equal(st.st_mode & 07777, 0600);
	assert_int_equal(st.st_size, (off_t)FILE_LEN);

	/* Exact format: header, lowercase hex of seed || pk, newline. */
	assert_memory_equal(buf, HEADER, sizeof(HEADER) - 1);
	hex(kp.sk, ME_SK_LEN, want);
	assert_memory_equal(buf + sizeof(HEADER) - 1, want, 128);
	assert_int_equal(buf[FILE_LEN - 1], '\n');
	assert_memory_equal(kp.sk + 32, kp.pk, ME_PK_LEN);
	assert_int_equal(me_did_key_from_pk(kp.pk, did, sizeof(did)), 0);
	assert_string_equal(kp.did, did);
	assert_int_equal(me_did_key_parse(kp.did, pk), 0);
	assert_memory_equal(pk, kp.pk, ME_PK_LEN);

	/* Second init and load give the same key. */
	assert_int_equal(me_keypair_init(f->root, &kp2, &created), 0);
	assert_int_equal(created, 0);
	assert_memory_equal(&kp, &kp2, sizeof(kp));
	memset(&kp2, 0xaa, sizeof(kp2));
	assert_int_equal(me_keypair_load(f->root, &kp2), 0);
	assert_memory_equal(&kp, &kp2, sizeof(kp));

	/* No temporary file is left behind. */
	DIR *d = opendir(f->root);
	struct dirent *de;
	int entries = 0;
	assert_non_null(d);
	while ((de = readdir(d)) != NULL)
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			entries++;
	closedir(d);
	assert_int_equal(entries, 1);

	me_keypair_wipe(&kp);
	for (size_t i = 0; i < ME_SK_LEN; i++)
		assert_int_equal(kp.sk[i], 0);
}

static void test_init_umask(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;
	char buf[FILE_LEN + 16];
	struct stat st;
	mode_t old = umask(0);

	make_key(f, &kp, buf);
	umask(old);
	assert_int_equal(stat(f->path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);
	assert_int_equal(stat(f->root, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0700);
}

static void test_init_existing_root(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;
	char bad[256];
	int created = -1;

	assert_int_equal(mkdir(f->root, 0755), 0);
	assert_int_equal(me_keypair_init(f->root, &kp, &created), 0);
	assert_int_equal(created, 1);

	/* Only the last component is created. */
	snprintf(bad, sizeof(bad), "%s/a/b", f->tmp);
	assert_int_equal(me_keypair_init(bad, &kp, &created), ME_ENOTFOUND);
	/* Root is a file. */
	assert_int_equal(me_keypair_init(f->path, &kp, &created), ME_EIO);
	assert_int_equal(me_keypair_init("", &kp, &created), ME_EINVAL);
	assert_int_equal(me_keypair_load(NULL, &kp), ME_EINVAL);
}

static void test_load_missing(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;

	assert_int_equal(me_keypair_load(f->root, &kp), ME_ENOKEY);
	assert_int_equal(mkdir(f->root, 0700), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_ENOKEY);
}

static void test_load_mode(void **state)
{
	static const mode_t modes[] = { 0644, 0640, 0604, 0660, 0606, 0601, 0610, 0666, 0777 };
	struct fx *f = *state;
	struct me_keypair kp;
	char buf[FILE_LEN + 16], now[FILE_LEN + 16];
	int created = -1;

	make_key(f, &kp, buf);
	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		assert_int_equal(chmod(f->path, modes[i]), 0);
		assert_int_equal(me_keypair_load(f->root, &kp), ME_EPERM);
		/* init must refuse too, never replace the key. */
		assert_int_equal(me_keypair_init(f->root, &kp, &created), ME_EPERM);
	}
	/* Stricter than 0600 is fine. */
	assert_int_equal(chmod(f->path, 0400), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), 0);
	/* The refused key was left alone. */
	assert_int_equal(read_file(f->path, now, sizeof(now)), FILE_LEN);
	assert_memory_equal(now, buf, FILE_LEN);
}

static void test_load_garbage(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;
	char good[FILE_LEN + 16], b[8192];

	make_key(f, &kp, good);

	/* Sanity: the good content loads back. */
	write_file(f->path, good, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), 0);

	write_file(f->path, "", 0, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	write_file(f->path, "garbage\n", 8, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	write_file(f->path, HEADER, sizeof(HEADER) - 1, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* Missing final newline. */
	write_file(f->path, good, FILE_LEN - 1, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* Extra newline, extra CR. */
	memcpy(b, good, FILE_LEN);
	b[FILE_LEN] = '\n';
	write_file(f->path, b, FILE_LEN + 1, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	b[FILE_LEN - 1] = '\r';
	write_file(f->path, b, FILE_LEN + 1, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* Wrong header version. */
	memcpy(b, good, FILE_LEN);
	b[sizeof(HEADER) - 3] = '2';
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* Upper-case hex, non-hex. */
	memcpy(b, good, FILE_LEN);
	size_t i = sizeof(HEADER) - 1;
	while (i < FILE_LEN - 1 && b[i] < 'a')
		i++;
	assert_true(i < FILE_LEN - 1);
	b[i] = (char)(b[i] - 'a' + 'A');
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	memcpy(b, good, FILE_LEN);
	b[sizeof(HEADER) + 5] = 'g';
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	b[sizeof(HEADER) + 5] = '\0';
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* Big file. */
	memset(b, 'a', sizeof(b));
	write_file(f->path, b, sizeof(b), 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	/* A directory in place of the file. */
	unlink(f->path);
	assert_int_equal(mkdir(f->path, 0700), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	assert_int_equal(rmdir(f->path), 0);
	/* A FIFO must not block. */
	assert_int_equal(mkfifo(f->path, 0600), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	unlink(f->path);
}

static void test_load_mismatch(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;
	char good[FILE_LEN + 16], b[FILE_LEN + 16];
	size_t pkoff = sizeof(HEADER) - 1 + 64; /* first hex digit of the public half */

	make_key(f, &kp, good);
	memcpy(b, good, FILE_LEN);
	b[pkoff] = b[pkoff] == '0' ? '1' : '0';
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
	for (size_t i = 0; i < ME_SK_LEN; i++)
		assert_int_equal(kp.sk[i], 0);
	/* Changing the seed also breaks the match. */
	memcpy(b, good, FILE_LEN);
	b[sizeof(HEADER)] = b[sizeof(HEADER)] == '0' ? '1' : '0';
	write_file(f->path, b, FILE_LEN, 0600);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EKEY);
}

static void test_load_symlink(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp;
	char good[FILE_LEN + 16], real[200];
	int created = -1;

	make_key(f, &kp, good);
	snprintf(real, sizeof(real), "%s/real", f->tmp);
	assert_int_equal(rename(f->path, real), 0);
	assert_int_equal(symlink(real, f->path), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EPERM);
	assert_int_equal(me_keypair_init(f->root, &kp, &created), ME_EPERM);
	/* Dangling symlink: still refused, and not followed to create a file. */
	assert_int_equal(unlink(real), 0);
	assert_int_equal(me_keypair_load(f->root, &kp), ME_EPERM);
	assert_int_equal(me_keypair_init(f->root, &kp, &created), ME_EPERM);
	assert_int_equal(access(real, F_OK), -1);
}

static void test_concurrent_init(void **state)
{
	enum { N = 8 };
	struct fx *f = *state;
	int fds[2], go[2];
	char c;
	pid_t pids[N];
	struct me_keypair kp;
	uint8_t got[N][1 + ME_PK_LEN];
	int creators = 0;

	/* The children start together (released by closing go[1]) to make the race likely. */
	assert_int_equal(pipe(fds), 0);
	assert_int_equal(pipe(go), 0);
	for (int i = 0; i < N; i++) {
		pids[i] = fork();
		assert_true(pids[i] >= 0);
		if (pids[i] == 0) {
			uint8_t msg[1 + ME_PK_LEN] = { 0xff };
			int created = -1;

			close(fds[0]);
			close(go[1]);
			if (read(go[0], &c, 1) != 0)
				_exit(1);
			if (me_keypair_init(f->root, &kp, &created) == 0) {
				msg[0] = (uint8_t)created;
				memcpy(msg + 1, kp.pk, ME_PK_LEN);
			}
			_exit(write(fds[1], msg, sizeof(msg)) == (ssize_t)sizeof(msg) ? 0 : 1);
		}
	}
	close(fds[1]);
	close(go[0]);
	close(go[1]);
	for (int i = 0; i < N; i++) {
		int st;

		assert_int_equal(read(fds[0], got[i], sizeof(got[i])), (ssize_t)sizeof(got[i]));
		assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
	close(fds[0]);
	for (int i = 0; i < N; i++) {
		assert_true(got[i][0] == 0 || got[i][0] == 1);
		creators += got[i][0];
		assert_memory_equal(got[i] + 1, got[0] + 1, ME_PK_LEN);
	}
	assert_int_equal(creators, 1);
	assert_int_equal(me_keypair_load(f->root, &kp), 0);
	assert_memory_equal(kp.pk, got[0] + 1, ME_PK_LEN);
}

static void test_sign_verify(void **state)
{
	struct fx *f = *state;
	struct me_keypair kp, other;
	char good[FILE_LEN + 16];
	uint8_t sig[ME_SIG_LEN], sig2[ME_SIG_LEN];
	char msg[] = "refs/heads/main 0123456789abcdef";
	int created;

	make_key(f, &kp, good);
	assert_int_equal(me_sign(&kp, msg, sizeof(msg), sig), 0);
	assert_int_equal(me_verify(kp.pk, msg, sizeof(msg), sig), 0);
	/* Ed25519 is deterministic. */
	assert_int_equal(me_sign(&kp, msg, sizeof(msg), sig2), 0);
	assert_memory_equal(sig, sig2, sizeof(sig));

	msg[0] ^= 1;
	assert_int_equal(me_verify(kp.pk, msg, sizeof(msg), sig), ME_EPERM);
	msg[0] ^= 1;
	assert_int_equal(me_verify(kp.pk, msg, sizeof(msg) - 1, sig), ME_EPERM);
	sig[10] ^= 0x40;
	assert_int_equal(me_verify(kp.pk, msg, sizeof(msg), sig), ME_EPERM);
	sig[10] ^= 0x40;

	/* Someone else's key does not verify it. */
	snprintf(f->root + strlen(f->root), sizeof(f->root) - strlen(f->root), "2");
	assert_int_equal(me_keypair_init(f->root, &other, &created), 0);
	assert_int_equal(created, 1);
	assert_int_equal(me_verify(other.pk, msg, sizeof(msg), sig), ME_EPERM);

	/* A key reloaded from disk signs identically. */
	f->root[strlen(f->root) - 1] = '\0';
	assert_int_equal(me_keypair_load(f->root, &other), 0);
	assert_int_equal(me_sign(&other, msg, sizeof(msg), sig2), 0);
	assert_memory_equal(sig, sig2, sizeof(sig));

	/* Empty message. */
	assert_int_equal(me_sign(&kp, NULL, 0, sig), 0);
	assert_int_equal(me_verify(kp.pk, NULL, 0, sig), 0);
	assert_int_equal(me_verify(kp.pk, "", 0, sig), 0);
	assert_int_equal(me_verify(kp.pk, "x", 1, sig), ME_EPERM);
	assert_int_equal(me_sign(&kp, NULL, 1, sig), ME_EINVAL);
	me_keypair_wipe(&kp);
	me_keypair_wipe(&other);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_init_creates),
		T(test_init_umask),
		T(test_init_existing_root),
		T(test_load_missing),
		T(test_load_mode),
		T(test_load_garbage),
		T(test_load_mismatch),
		T(test_load_symlink),
		T(test_concurrent_init),
		T(test_sign_verify),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
