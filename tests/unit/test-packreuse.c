/* daemon/packreuse.c: complete packs copied from the source's packs. Each result is checked
 * with the git CLI: `git index-pack --strict` accepts it on its own (self-contained), it holds
 * exactly the objects `git rev-list --objects` lists for the tips (nothing unreachable leaks),
 * and entries are copied as stored where they can be. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <git2.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>

#include "common/err.h"
#include "daemon/gitrepo.h"
#include "daemon/packreuse.h"
#include "daemon/packwrite.h"
#include "tests/unit/gitfixture.h"

static char base[64];
static size_t last_bitmapped, last_walked; /* packreuse_*() of the last reuse_parts */

struct tips {
	struct gmsg_ref v[32];
	char names[32][128];
	size_t n;
};

/* The repository's branches and tags, as a signed state names them. */
static void tips_of(git_repository *r, struct tips *t)
{
	git_reference_iterator *it;
	git_reference *ref;

	memset(t, 0, sizeof(*t));
	assert_int_equal(git_reference_iterator_new(&it, r), 0);
	while (git_reference_next(&ref, it) == 0) {
		const char *nm = git_reference_name(ref);
		if (git_reference_type(ref) == GIT_REFERENCE_DIRECT &&
		    (strncmp(nm, "refs/heads/", 11) == 0 || strncmp(nm, "refs/tags/", 10) == 0)) {
			assert_true(t->n < 32);
			snprintf(t->names[t->n], sizeof(t->names[0]), "%s", nm);
			t->v[t->n].name.ptr = t->names[t->n];
			t->v[t->n].name.len = strlen(nm);
			memcpy(t->v[t->n].oid, git_reference_target(ref)->id, GIT_OID_RAWSZ);
			t->n++;
		}
		git_reference_free(ref);
	}
	git_reference_iterator_free(it);
}

/* Writes the reused pack of dir's branches and tags to out; returns the entries reused.
 * parts may be NULL. */
static size_t reuse_parts(const char *dir, const char *out, size_t *objects,
			  struct xmsg_parts *parts)
{
	git_repository *r;
	struct packreuse *pr = NULL;
	struct tips t;
	char err[256] = "";
	size_t reused = 0;
	uint64_t bytes = 0;
	int fd, rc;

	assert_int_equal(git_repository_open(&r, dir), 0);
	tips_of(r, &t);
	rc = packreuse_plan(r, t.v, t.n, &pr, err, sizeof(err));
	if (rc != 0)
		fail_msg("packreuse_plan: %d %s", rc, err);
	last_bitmapped = packreuse_bitmapped(pr);
	last_walked = packreuse_walked(pr);
	assert_true((fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600)) >= 0);
	rc = packreuse_write(pr, fd, &bytes, objects, &reused, parts, err, sizeof(err));
	if (rc != 0)
		fail_msg("packreuse_write: %d %s", rc, err);
	assert_int_equal(close(fd), 0);
	assert_true(bytes > 32);
	packreuse_free(pr);
	git_repository_free(r);
	return reused;
}

static size_t reuse(const char *dir, const char *out, size_t *objects)
{
	return reuse_parts(dir, out, objects, NULL);
}

/* The pack indexes on its own and holds exactly rev-list's objects. */
static void check_pack(const char *dir, const char *pack, size_t objects)
{
	char a[256], b[256], idx[256];

	snprintf(idx, sizeof(idx), "%.*s.idx", (int)strlen(pack) - 5, pack);
	sh("git index-pack --strict -o '%s' '%s' >/dev/null", idx, pack);
	snprintf(a, sizeof(a), "%s/want", base);
	snprintf(b, sizeof(b), "%s/got", base);
	sh("git -C '%s' rev-list --objects --branches --tags | cut -c1-40 | sort > '%s'", dir, a);
	sh("git show-index < '%s' | cut -d' ' -f2 | sort > '%s'", idx, b);
	sh("cmp -s '%s' '%s'", a, b);
	sh("test $(wc -l < '%s') -eq %zu", a, objects);
}

/* History of a file that changes a little each commit, so that git stores deltas. */
static void make_history(const char *dir, int commits)
{
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && "
	   "seq 1 3000 > f && git add f && git commit -q -m c0 && "
	   "for i in $(seq 1 %d); do sed -i \"$((i * 7))s/.*/changed $i/\" f; "
	   "echo $i > n$((i %% 5)); git add -A; git commit -q -m c$i; done && "
	   "git tag v1 HEAD~3 && git tag -a v2 -m two HEAD~1 && git branch side HEAD~5",
	   dir, dir, commits);
}

static void test_packed(void **state)
{
	char dir[128], pack[160];
	size_t objects = 0, reused;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/packed", base);
	snprintf(pack, sizeof(pack), "%s/packed.pack", base);
	make_history(dir, 40);
	sh("git -C '%s' gc -q", dir);
	reused = reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	/* everything reachable, everything copied as stored, deltas included */
	assert_int_equal(reused, objects);
	sh("test $(git verify-pack -v '%s' | awk 'NF == 7' | wc -l) -gt 0 && "
	   "test $(git verify-pack -v '%s' | awk 'NF == 7' | wc -l) -eq "
	   "$(git verify-pack -v '%s'/.git/objects/pack/*.idx | awk 'NF == 7' | wc -l)",
	   pack, pack, dir);
}

/* Loose objects, two packs, and a reachable object stored as a delta against one that is no
 * longer reachable: the result still holds exactly the reachable objects. */
static void test_mixed(void **state)
{
	char dir[128], pack[160];
	size_t objects = 0, reused;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/mixed", base);
	snprintf(pack, sizeof(pack), "%s/mixed.pack", base);
	make_history(dir, 12);
	/* the newest version is the base git prefers; then it goes away from every ref */
	sh("cd '%s' && seq 1 3100 > f && git commit -q -am newest && git repack -adfq && "
	   "git reset -q --hard HEAD~1 && git tag -d v2 >/dev/null && git tag -a v2 -m two HEAD~1 && "
	   "echo more > m && git add m && git commit -q -m more && git repack -q && "
	   "echo loose > l && git add l && git commit -q -m loose", dir);
	sh("test $(ls '%s'/.git/objects/pack/*.pack | wc -l) -eq 2", dir);
	reused = reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	assert_true(reused > 0 && reused < objects);
}

/* Packs with a v1 index are not read by packreuse: their objects go whole, still complete. */
static void test_v1_index(void **state)
{
	char dir[128], pack[160];
	size_t objects = 0, reused;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/v1", base);
	snprintf(pack, sizeof(pack), "%s/v1.pack", base);
	make_history(dir, 8);
	sh("cd '%s' && git repack -adq && echo x > x && git add x && git commit -q -m x && "
	   "git repack -q && p=$(ls .git/objects/pack/*.pack | head -1) && "
	   "git index-pack --index-version=1 -o \"${p%%.pack}.idx.new\" \"$p\" >/dev/null && "
	   "mv \"${p%%.pack}.idx.new\" \"${p%%.pack}.idx\"", dir);
	reused = reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	assert_true(reused < objects);
}

/* Each part, made a pack of its own (its count in a header, a SHA-1 trailer), is accepted by
 * `git index-pack` alone: no delta reaches outside it (not --strict: a commit's tree may be in
 * another part). Together they hold the pack's
 * objects, exactly rev-list's. */
static void check_parts(const char *dir, const char *pack, size_t objects,
			const struct xmsg_parts *parts)
{
	char part[192], idx[192], want[160], got[160];
	unsigned char *buf;
	uint64_t sum = 0;
	FILE *f;
	long len;

	assert_non_null(f = fopen(pack, "rb"));
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	assert_true((len = ftell(f)) > PACK_HDR_LEN + PACK_TRAILER_LEN);
	rewind(f);
	assert_non_null(buf = malloc((size_t)len));
	assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	assert_true(parts->n >= 1);
	assert_true(parts->v[0].offset == PACK_HDR_LEN);
	snprintf(got, sizeof(got), "%s/got", base);
	sh(": > '%s'", got);
	for (uint32_t i = 0; i < parts->n; i++) {
		uint64_t a = parts->v[i].offset;
		uint64_t b = i + 1 < parts->n ? parts->v[i + 1].offset : (uint64_t)len - PACK_TRAILER_LEN;
		unsigned char hdr[PACK_HDR_LEN] = { 'P', 'A', 'C', 'K', 0, 0, 0, 2 };
		unsigned char sha[WC_SHA_DIGEST_SIZE];
		wc_Sha h;

		assert_true(a < b);
		for (int k = 0; k < 4; k++)
			hdr[8 + k] = (unsigned char)(parts->v[i].count >> (24 - 8 * k));
		assert_int_equal(wc_InitSha(&h), 0);
		wc_ShaUpdate(&h, hdr, sizeof(hdr));
		wc_ShaUpdate(&h, buf + a, (word32)(b - a));
		assert_int_equal(wc_ShaFinal(&h, sha), 0);
		snprintf(part, sizeof(part), "%s/part%u.pack", base, i);
		snprintf(idx, sizeof(idx), "%s/part%u.idx", base, i);
		assert_non_null(f = fopen(part, "wb"));
		assert_int_equal(fwrite(hdr, 1, sizeof(hdr), f), sizeof(hdr));
		assert_int_equal(fwrite(buf + a, 1, b - a, f), b - a);
		assert_int_equal(fwrite(sha, 1, sizeof(sha), f), sizeof(sha));
		assert_int_equal(fclose(f), 0);
		sh("git index-pack -o '%s' '%s' >/dev/null", idx, part);
		sh("git show-index < '%s' | cut -d' ' -f2 >> '%s'", idx, got);
		sum += parts->v[i].count;
	}
	assert_true(sum == objects);
	snprintf(want, sizeof(want), "%s/want", base);
	sh("git -C '%s' rev-list --objects --branches --tags | cut -c1-40 | sort > '%s'", dir, want);
	sh("sort -o '%s' '%s' && cmp -s '%s' '%s'", got, got, want, got);
	free(buf);
}

static void test_parts(void **state)
{
	char dir[128], pack[160];
	struct xmsg_parts parts;
	size_t objects = 0;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/parts", base);
	snprintf(pack, sizeof(pack), "%s/parts.pack", base);
	make_history(dir, 60);
	sh("git -C '%s' gc -q", dir);
	/* as many as the size allows: a pack this small is one part by default */
	reuse_parts(dir, pack, &objects, &parts);
	assert_int_equal(parts.n, 1);
	assert_true(parts.v[0].count == objects);
	packreuse_part_min = 1;
	reuse_parts(dir, pack, &objects, &parts);
	assert_true(parts.n >= 3 && parts.n <= PACKREUSE_PARTS);
	check_parts(dir, pack, objects, &parts);

	/* deltas against bases named by id (REF_DELTA), as older gits and JGit write them */
	sh("git -C '%s' -c repack.useDeltaBaseOffset=false repack -adfq", dir);
	reuse_parts(dir, pack, &objects, &parts);
	assert_true(parts.n >= 3);
	check_parts(dir, pack, objects, &parts);

	/* loose objects and two packs, some entries written whole: still self-contained */
	sh("cd '%s' && seq 1 3100 > f && git commit -q -am newest && git repack -q && "
	   "echo loose > l && git add l && git commit -q -m loose", dir);
	reuse_parts(dir, pack, &objects, &parts);
	packreuse_part_min = PACKREUSE_PART_MIN;
	check_parts(dir, pack, objects, &parts);
}

/* With git's reachability bitmap: fresh from `git repack -adb`, everything is counted from it
 * but the annotated tag; after new commits (loose, then in a second pack), a branch from an
 * old commit, tags of a commit, a tree and a blob, only the new objects are walked. The pack
 * holds exactly rev-list's objects each time. */
static void test_bitmap(void **state)
{
	char dir[128], pack[160];
	size_t objects = 0;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/bitmap", base);
	snprintf(pack, sizeof(pack), "%s/bitmap.pack", base);
	make_history(dir, 60);
	sh("git -C '%s' repack -adbq && ls '%s'/.git/objects/pack/*.bitmap >/dev/null", dir, dir);
	reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	assert_int_equal(last_bitmapped, objects - 1); /* v2's tag object */

	sh("cd '%s' && echo new > new && git add new && git commit -q -m new && "
	   "git checkout -q -b topic HEAD~30 && echo t > t && git add t && git commit -q -m t && "
	   "git checkout -q main && git tag -a v3 -m three topic && "
	   "git tag tree-tag 'HEAD~2^{tree}' && git tag blob-tag $(echo b | git hash-object -w --stdin)",
	   dir);
	reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	/* walked: the two new commits, their root trees, the blobs new and t, the tags v2 and
	 * v3, the tagged blob; the rest of those trees is pruned where the bitmap counts it */
	assert_int_equal(objects - last_bitmapped, 9);
	/* and nothing else was read: the rest of those trees was pruned */
	assert_int_equal(last_walked, 9);
	sh("cd '%s' && git repack -q && echo more >> new && git commit -q -am more && "
	   "test $(ls .git/objects/pack/*.pack | wc -l) -eq 2", dir);
	reuse(dir, pack, &objects);
	check_pack(dir, pack, objects);
	assert_true(last_bitmapped > 0 && last_bitmapped < objects - 10);
}

/* Rewrites the bitmap of dir: one damage, then (unless fix is 0) its checksum again, so that
 * the damage reaches the decoder. Entries: every entry's EWAH when all is set. */
enum { BM_FLIP, BM_TRUNC, BM_XOR, BM_POS, BM_DUP, BM_RUN, BM_LIT, BM_BITS, BM_TIP };

static void damage_bitmap(const char *dir, int kind)
{
	char tip[32];
	char path[256];
	unsigned char *buf;
	size_t len, off = 32, body, first = 0;
	FILE *f;
	long l;

	capture(path, sizeof(path), "ls '%s'/.git/objects/pack/*.bitmap", dir);
	/* main's index position: its line among the sorted ids, from 1 */
	capture(tip, sizeof(tip), "git show-index < '%.*s.idx' | cut -d' ' -f2 | sort | "
		"grep -n $(git -C '%s' rev-parse main) | cut -d: -f1", (int)strlen(path) - 7, path,
		dir);
	sh("chmod u+w '%s'", path);
	assert_non_null(f = fopen(path, "rb"));
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	assert_true((l = ftell(f)) > 52);
	len = (size_t)l;
	rewind(f);
	assert_non_null(buf = malloc(len));
	assert_int_equal(fread(buf, 1, len, f), len);
	fclose(f);
	body = len - 20;
#define BE32(p) ((uint32_t)(p)[0] << 24 | (uint32_t)(p)[1] << 16 | (uint32_t)(p)[2] << 8 | (p)[3])
	for (int t = 0; t < 4; t++)
		off += 12 + 8 * (size_t)BE32(buf + off + 4);
	first = off;
	for (uint32_t i = 0, n = BE32(buf + 8); i < n; i++) {
		unsigned char *e = buf + off, *w = e + 6 + 8;
		if (kind == BM_RUN || (kind == BM_TIP && BE32(e) == (uint32_t)atoi(tip) - 1))
			/* a run of ones longer than the bitmap */
			memcpy(w, "\0\0\0\0\xff\xff\xff\xff", 8);
		else if (kind == BM_LIT) /* more literal words than there are */
			memcpy(w, "\xff\xff\xff\xfe\0\0\0\0", 8);
		else if (kind == BM_BITS)
			memcpy(e + 6, "\xff\xff\xff\xff", 4);
		off += 6 + 12 + 8 * (size_t)BE32(e + 6 + 4);
	}
	switch (kind) {
	case BM_FLIP:
		buf[first + 9] ^= 0x40;
		break;
	case BM_TRUNC:
		body = first + 20;
		break;
	case BM_XOR:
		buf[first + 4] = 1; /* the first entry XORs onto the one before it */
		break;
	case BM_POS:
		memcpy(buf + first, "\xff\xff\xff\xf0", 4);
		break;
	case BM_DUP: {
		size_t second = first + 6 + 12 + 8 * (size_t)BE32(buf + first + 6 + 4);
		memcpy(buf + second, buf + first, 4);
		break;
	}
	default:
		break;
	}
#undef BE32
	if (kind != BM_FLIP) {
		wc_Sha h;
		assert_int_equal(wc_InitSha(&h), 0);
		wc_ShaUpdate(&h, buf, (word32)body);
		assert_int_equal(wc_ShaFinal(&h, buf + body), 0);
		len = body + 20;
	}
	assert_non_null(f = fopen(path, "wb"));
	assert_int_equal(fwrite(buf, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
	free(buf);
}

/* A damaged bitmap (on disk, or well summed but not as git writes it: the file is refused; or
 * entries that do not decode: found while counting) is not used: the history is walked and
 * the pack is still exactly rev-list's objects. BM_TIP damages main's entry only: v2's
 * commit, below it and popped first, was counted from its bitmap already. Run under ASan in
 * CI. */
static void test_bitmap_damaged(void **state)
{
	char src[128];

	(void)state;
	snprintf(src, sizeof(src), "%s/bmsrc", base);
	make_history(src, 30);
	sh("git -C '%s' repack -adbq", src);
	for (int kind = BM_FLIP; kind <= BM_TIP; kind++) {
		char dir[128], pack[160];
		size_t objects = 0;

		snprintf(dir, sizeof(dir), "%s/bmdamaged%d", base, kind);
		snprintf(pack, sizeof(pack), "%s/bmdamaged%d.pack", base, kind);
		sh("cp -a '%s' '%s'", src, dir);
		damage_bitmap(dir, kind);
		reuse(dir, pack, &objects);
		check_pack(dir, pack, objects);
		assert_int_equal(last_bitmapped, 0);
	}
}

/* Two files that change together: their versions' deltas interleave in git's pack (a, b, a,
 * b...), so no offset cuts the region that holds nearly all the bytes. Parts take whole
 * delta groups: a's versions and b's go to different parts, each self-contained. */
static void test_parts_interleaved(void **state)
{
	char dir[128], pack[160];
	struct xmsg_parts parts;
	size_t objects = 0;
	uint64_t total, largest = 0;
	struct stat sb;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/interleaved", base);
	snprintf(pack, sizeof(pack), "%s/interleaved.pack", base);
	sh("mkdir -p '%s' && cd '%s' && git init -q -b main && "
	   "head -c 150000 /dev/urandom | base64 -w 76 > a && "
	   "head -c 150000 /dev/urandom | base64 -w 76 > b && git add a b && git commit -q -m c0 && "
	   "for i in $(seq 1 30); do echo $i >> a; echo $i >> b; git commit -q -am c$i; done && "
	   "git gc -q", dir, dir);
	packreuse_part_min = 1;
	reuse_parts(dir, pack, &objects, &parts);
	packreuse_part_min = PACKREUSE_PART_MIN;
	check_parts(dir, pack, objects, &parts);
	assert_int_equal(stat(pack, &sb), 0);
	total = (uint64_t)sb.st_size - PACK_TRAILER_LEN;
	for (uint32_t i = 0; i < parts.n; i++) {
		uint64_t end = i + 1 < parts.n ? parts.v[i + 1].offset : total;
		if (end - parts.v[i].offset > largest)
			largest = end - parts.v[i].offset;
	}
	/* a's and b's groups are about half the pack each */
	assert_true(parts.n >= 2);
	assert_true(largest < total * 6 / 10);
}

/* Nothing packed: nothing to reuse, the caller's pack builder is asked to do it. */
static void test_no_packs(void **state)
{
	char dir[128], err[256];
	git_repository *r;
	struct packreuse *pr = (struct packreuse *)1;
	struct tips t;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/loose", base);
	make_history(dir, 6);
	assert_int_equal(git_repository_open(&r, dir), 0);
	tips_of(r, &t);
	assert_int_equal(packreuse_plan(r, t.v, t.n, &pr, err, sizeof(err)), ME_EINVAL);
	assert_null(pr);
	/* a tip not in the repository */
	sh("git -C '%s' gc -q", dir);
	memset(t.v[0].oid, 0x42, GIT_OID_RAWSZ);
	assert_int_equal(packreuse_plan(r, t.v, t.n, &pr, err, sizeof(err)), ME_ENOTFOUND);
	assert_null(pr);
	git_repository_free(r);
}

/* Damaged index files (truncated, cut into the offsets, a large offset past its table, a
 * fan-out out of order, a pack whose count disagrees) next to a healthy pack that holds every
 * object too (libgit2 reads that one: it crashes on some of these damages itself): the
 * damaged pack is passed over, never read out of bounds, and the result is still complete.
 * Run under ASan in CI. */
static void test_damaged_index(void **state)
{
	static const char *damage[] = {
		"truncate -s 1000 \"$i\"",
		"truncate -s -30 \"$i\"",
		"printf '\\377\\377\\377\\377' | dd of=\"$i\" bs=1 seek=$((1032 + 20 * n + 4 * n)) "
		"conv=notrunc 2>/dev/null",
		"printf '\\377\\377\\377\\377' | dd of=\"$i\" bs=1 seek=8 conv=notrunc 2>/dev/null",
		"printf 'PACK\\000\\000\\000\\002\\000\\000\\000\\001' | "
		"dd of=\"${i%.idx}.pack\" bs=1 conv=notrunc 2>/dev/null",
	};

	(void)state;
	for (size_t k = 0; k < sizeof(damage) / sizeof(damage[0]); k++) {
		char dir[128], pack[160];
		size_t objects = 0;

		snprintf(dir, sizeof(dir), "%s/damaged%zu", base, k);
		snprintf(pack, sizeof(pack), "%s/damaged%zu.pack", base, k);
		make_history(dir, 6);
		sh("cd '%s' && git repack -adq && echo y > y && git add y && git commit -q -m y && "
		   "git repack -aq && test $(ls .git/objects/pack/*.pack | wc -l) -eq 2 && "
		   "chmod -R u+w .git/objects/pack && i=$(ls -t .git/objects/pack/*.idx | tail -1) && "
		   "touch -d '1 hour ago' \"$i\" \"${i%%.idx}.pack\" && "
		   "n=$(git show-index < \"$i\" | wc -l) && %s", dir, damage[k]);
		reuse(dir, pack, &objects);
		check_pack(dir, pack, objects);
	}
}

static int setup(void **state)
{
	(void)state;
	snprintf(base, sizeof(base), "/tmp/me-packreuse-XXXXXX");
	assert_non_null(mkdtemp(base));
	git_test_env();
	gitrepo_global_init();
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	nftw(base, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_packed),
		cmocka_unit_test(test_mixed),
		cmocka_unit_test(test_parts),
		cmocka_unit_test(test_parts_interleaved),
		cmocka_unit_test(test_bitmap),
		cmocka_unit_test(test_bitmap_damaged),
		cmocka_unit_test(test_v1_index),
		cmocka_unit_test(test_no_packs),
		cmocka_unit_test(test_damaged_index),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
