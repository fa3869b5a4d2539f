/* Replay driver: runs a fuzz target's LLVMFuzzerTestOneInput over files, so that the seed corpus
 * (and every regression input kept there) runs in the normal test suite, with gcc too.
 *
 *     fuzz-NAME-replay DIR_OR_FILE...
 *
 * A directory contributes its regular files (not those whose name starts with '.'), in name
 * order. Each input is passed in a buffer of exactly its size, so that the sanitizers see any
 * read past its end. A crash or a broken invariant aborts, which fails the test; an argument
 * that cannot be read, or no input at all, is an error too (exit 1). */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int run_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	uint8_t *buf;

	if (f == NULL || fstat(fileno(f), &st) < 0) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
		if (f != NULL)
			fclose(f);
		return -1;
	}
	size_t n = (size_t)st.st_size;
	if ((buf = malloc(n ? n : 1)) == NULL || fread(buf, 1, n, f) != n) {
		fprintf(stderr, "replay: %s: cannot read\n", path);
		free(buf);
		fclose(f);
		return -1;
	}
	fclose(f);
	LLVMFuzzerTestOneInput(buf, n);
	free(buf);
	return 0;
}

static int skip_dot(const struct dirent *de)
{
	return de->d_name[0] != '.';
}

/* Returns the number of inputs run, or -1. */
static long run_path(const char *path)
{
	struct stat st;
	struct dirent **names;
	long count = 0;
	int n;

	if (stat(path, &st) < 0) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (!S_ISDIR(st.st_mode))
		return run_file(path) < 0 ? -1 : 1;
	if ((n = scandir(path, &names, skip_dot, alphasort)) < 0) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
		return -1;
	}
	for (int i = 0; i < n; i++) {
		char p[4096];
		struct stat fst;

		snprintf(p, sizeof(p), "%s/%s", path, names[i]->d_name);
		if (count >= 0 && stat(p, &fst) == 0 && S_ISREG(fst.st_mode))
			count = run_file(p) < 0 ? -1 : count + 1;
		free(names[i]);
	}
	free(names);
	return count;
}

int main(int argc, char **argv)
{
	long total = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: %s DIR_OR_FILE...\n", argv[0]);
		return 2;
	}
	if (LLVMFuzzerInitialize != NULL)
		LLVMFuzzerInitialize(&argc, &argv);
	for (int i = 1; i < argc; i++) {
		long n = run_path(argv[i]);
		if (n < 0)
			return 1;
		printf("replay: %s: %ld input(s)\n", argv[i], n);
		total += n;
	}
	if (total == 0) {
		fprintf(stderr, "replay: no input\n");
		return 1;
	}
	/* One test per target, in the summary format scripts/test.sh counts (cmocka's). */
	printf("[==========] 1 test(s) run.\n[  PASSED  ] 1 test(s).\n");
	return 0;
}
