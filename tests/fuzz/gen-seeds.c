/* Writes the seed corpora of the fuzz targets: valid (and a few nearly valid) inputs built
 * with the project's own encoders, fixed keys and fixed times, so that a run reproduces them.
 *
 *     fuzz-gen-seeds OUTDIR        (OUTDIR/<target>/<seed>; tests/fuzz/corpus in the tree)
 *
 * Regression inputs (crashes that were fixed) live in the same directories under names
 * starting with "crash-": this program never touches them. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "common/b58.h"
#include "common/err.h"
#include "common/frame.h"
#include "common/gossip_msg.h"
#include "common/ids.h"
#include "common/keys.h"
#include "common/proto.h"
#include "daemon/mirror.h"
#include "tests/fuzz/bundle-fixture.h"

#define TS 1700000000000ull

static const char *outdir;

static void die(const char *what, int rc)
{
	fprintf(stderr, "fuzz-gen-seeds: %s: %s\n", what, rc < 0 ? me_errname(rc) : "failed");
	exit(1);
}

static void put(const char *target, const char *name, const void *p, size_t n)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", outdir, target);
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		die(path, -1);
	snprintf(path, sizeof(path), "%s/%s/%s", outdir, target, name);
	if ((f = fopen(path, "wb")) == NULL || fwrite(p, 1, n, f) != n || fclose(f) != 0)
		die(path, -1);
}

static void put_str(const char *target, const char *name, const char *s)
{
	put(target, name, s, strlen(s));
}

static void make_kp(struct me_keypair *kp, uint8_t seedbyte)
{
	uint8_t seed[crypto_sign_SEEDBYTES];

	memset(seed, seedbyte, sizeof(seed));
	if (crypto_sign_seed_keypair(kp->pk, kp->sk, seed) != 0 ||
	    me_did_key_from_pk(kp->pk, kp->did, sizeof(kp->did)) < 0)
		die("key", -1);
}

static struct me_keypair node, creator;
static char repo_id[ME_DID_REPO_SIZE], repo_id2[ME_DID_REPO_SIZE];

/* ---- control socket ---- */

static void pack_cmd_args(msgpack_packer *pk, void *ud)
{
	const struct me_cmdinfo *ci = ud;
	size_t n = 0;

	while (ci->args[n].name != NULL)
		n++;
	msgpack_pack_map(pk, n);
	for (const struct me_argspec *a = ci->args; a->name != NULL; a++) {
		me_mp_pack_str(pk, a->name);
		if (a->type == ME_ARG_INT)
			msgpack_pack_uint64(pk, TS);
		else if (a->type == ME_ARG_BOOL)
			msgpack_pack_true(pk);
		else if (strcmp(a->name, "repo_id") == 0)
			me_mp_pack_str(pk, repo_id);
		else if (strcmp(a->name, "path") == 0)
			me_mp_pack_str(pk, "/srv/git/project");
		else
			me_mp_pack_str(pk, "a project");
	}
}

static void seeds_control(void)
{
	msgpack_sbuffer all, sb;
	msgpack_packer pk;

	msgpack_sbuffer_init(&all);
	for (int c = 0; c < ME_CMD__COUNT; c++) {
		msgpack_sbuffer_init(&sb);
		if (me_request_pack(&sb, (uint32_t)c + 1, c, pack_cmd_args, (void *)&me_cmds[c]) < 0)
			die("me_request_pack", -1);
		put("control", me_cmds[c].name, sb.data, sb.size);
		if (c < 3)
			msgpack_sbuffer_write(&all, sb.data, sb.size);
		msgpack_sbuffer_destroy(&sb);
	}
	/* Three requests in one stream, then the start of a fourth. */
	char part[6];
	memcpy(part, all.data, sizeof(part));
	msgpack_sbuffer_write(&all, part, sizeof(part));
	put("control", "stream", all.data, all.size);
	msgpack_sbuffer_destroy(&all);

	/* A version the daemon does not speak, an unknown command, a wrong argument type. */
	static const struct { const char *name; unsigned v; const char *cmd; int badarg; } odd[] = {
		{ "version-2", 2, "node.id", 0 },
		{ "unknown-cmd", 1, "node.reboot", 0 },
		{ "bad-arg", 1, "repo.show", 1 },
	};
	for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++) {
		msgpack_sbuffer_init(&sb);
		msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
		me_frame_begin(&sb);
		msgpack_pack_map(&pk, 4);
		me_mp_pack_kv_int(&pk, "v", odd[i].v);
		me_mp_pack_kv_int(&pk, "id", 7);
		me_mp_pack_kv_str(&pk, "cmd", odd[i].cmd);
		me_mp_pack_str(&pk, "args");
		msgpack_pack_map(&pk, odd[i].badarg);
		if (odd[i].badarg)
			me_mp_pack_kv_int(&pk, "repo_id", 1);
		me_frame_end(&sb, 0, ME_CTL_MAX_FRAME);
		put("control", odd[i].name, sb.data, sb.size);
		msgpack_sbuffer_destroy(&sb);
	}
}

/* ---- gossip ---- */

static void node_ann(msgpack_sbuffer *sb, int variant)
{
	struct gmsg_node_ann a;

	memset(&a, 0, sizeof(a));
	memcpy(a.pk, node.pk, ME_PK_LEN);
	a.node_type = 1;
	a.version = gmsg_str("megaengine 0.1.0");
	if (variant == 0) {
		a.alias = gmsg_str("alpha");
		a.addrs[0] = gmsg_str("192.0.2.1:9000");
		a.addrs[1] = gmsg_str("[2001:db8::1]:9000");
		a.naddrs = 2;
	} else {
		a.alias = gmsg_str("n\xc5\x93ud \xe2\x9c\x93"); /* UTF-8 */
		a.node_type = 200;
	}
	msgpack_sbuffer_init(sb);
	if (gmsg_node_ann_encode(&a, sb) < 0)
		die("gmsg_node_ann_encode", -1);
}

static struct gmsg_ref refs1[3];

static void refstate(struct gmsg_refstate *rs, const char *id, size_t nrefs)
{
	static const char *names[] = { "refs/heads/main", "refs/heads/topic/x", "refs/tags/v1.0" };
	int rc;

	for (size_t i = 0; i < 3; i++) {
		refs1[i].name = gmsg_str(names[i]);
		memset(refs1[i].oid, 0x11 * (int)(i + 1), ME_OID_LEN);
	}
	memset(rs, 0, sizeof(*rs));
	rs->repo_id = gmsg_str(id);
	rs->seq = TS;
	rs->head = gmsg_str(nrefs > 0 ? "refs/heads/main" : "");
	rs->refs = refs1;
	rs->nrefs = nrefs;
	if ((rc = gmsg_refstate_sign(&creator, rs)) < 0)
		die("gmsg_refstate_sign", rc);
}

static void repo_ann(msgpack_sbuffer *sb, size_t nrepos)
{
	struct gmsg_repo repos[2];
	struct gmsg_repo_ann a = { repos, nrepos };
	int rc;

	memset(repos, 0, sizeof(repos));
	for (size_t i = 0; i < nrepos; i++) {
		/* Sorted by id. */
		const char *id = (strcmp(repo_id, repo_id2) < 0) == (i == 0) ? repo_id : repo_id2;
		repos[i].id = gmsg_str(id);
		repos[i].name = gmsg_str(i == 0 ? "project" : "other");
		repos[i].description = gmsg_str(i == 0 ? "a project" : "");
		memcpy(repos[i].creator_pk, creator.pk, ME_PK_LEN);
	}
	msgpack_sbuffer_init(sb);
	/* Each state signed in turn (refstate() reuses refs1: same refs for both). */
	for (size_t i = 0; i < nrepos; i++)
		refstate(&repos[i].refstate, repos[i].id.ptr, i == 0 ? 3 : 1);
	if ((rc = gmsg_repo_ann_encode(&a, sb)) < 0)
		die("gmsg_repo_ann_encode", rc);
}

static void envelope(msgpack_sbuffer *out, unsigned type, unsigned ttl, const msgpack_sbuffer *p)
{
	int rc;

	msgpack_sbuffer_init(out);
	if ((rc = gmsg_envelope_encode(&node, TS, ttl, type, p->data, p->size, out)) < 0)
		die("gmsg_envelope_encode", rc);
}

static void frame(msgpack_sbuffer *stream, const msgpack_sbuffer *body)
{
	size_t start = stream->size;

	me_frame_begin(stream);
	msgpack_sbuffer_write(stream, body->data, body->size);
	me_frame_end(stream, start, 1u << 20);
}

static void seeds_gossip(void)
{
	msgpack_sbuffer n0, n1, r0, r1, r2, e, stream, other;

	node_ann(&n0, 0);
	node_ann(&n1, 1);
	put("node-ann", "addrs", n0.data, n0.size);
	put("node-ann", "no-addrs", n1.data, n1.size);
	repo_ann(&r0, 0);
	repo_ann(&r1, 1);
	repo_ann(&r2, 2);
	put("repo-ann", "empty", r0.data, r0.size);
	put("repo-ann", "one", r1.data, r1.size);
	put("repo-ann", "two", r2.data, r2.size);

	msgpack_sbuffer_init(&stream);
	envelope(&e, GMSG_NODE_ANN, 5, &n0);
	frame(&stream, &e);
	put("peer-frame", "node-ann", stream.data, stream.size);
	msgpack_sbuffer_destroy(&e);
	envelope(&e, GMSG_REPO_ANN, 5, &r2);
	msgpack_sbuffer_init(&other);
	frame(&other, &e);
	frame(&stream, &e);
	put("peer-frame", "repo-ann", other.data, other.size);
	msgpack_sbuffer_destroy(&e);
	msgpack_sbuffer_destroy(&other);
	/* A type this version does not know, relayed with ttl 0. */
	msgpack_sbuffer_init(&other);
	msgpack_sbuffer_write(&other, "\x91\xa3hey", 5);
	envelope(&e, 200, 0, &other);
	frame(&stream, &e);
	put("peer-frame", "stream", stream.data, stream.size);
	/* Tree control messages: IHAVE with 1 and 17 ids, GRAFT, PRUNE, in one stream. */
	{
		uint8_t ids[17][GMSG_ID_LEN];
		msgpack_sbuffer ctl, cs;
		for (size_t i = 0; i < 17; i++)
			memset(ids[i], (int)(0x40 + i), GMSG_ID_LEN);
		msgpack_sbuffer_init(&cs);
		const struct {
			unsigned kind;
			size_t n;
		} ks[] = { { GMSG_IHAVE, 1 }, { GMSG_IHAVE, 17 }, { GMSG_GRAFT, 1 }, { GMSG_GRAFT, 0 },
			   { GMSG_PRUNE, 0 } };
		for (size_t k = 0; k < sizeof(ks) / sizeof(ks[0]); k++) {
			msgpack_sbuffer_init(&ctl);
			if (gmsg_ctl_encode(ks[k].kind, (const uint8_t(*)[GMSG_ID_LEN])ids, ks[k].n,
					    &ctl) != 0)
				abort();
			frame(&cs, &ctl);
			msgpack_sbuffer_destroy(&ctl);
		}
		put("peer-frame", "tree-control", cs.data, cs.size);
		msgpack_sbuffer_destroy(&cs);
	}
	msgpack_sbuffer_destroy(&e);
	msgpack_sbuffer_destroy(&other);
	msgpack_sbuffer_destroy(&stream);
	msgpack_sbuffer_destroy(&n0);
	msgpack_sbuffer_destroy(&n1);
	msgpack_sbuffer_destroy(&r0);
	msgpack_sbuffer_destroy(&r1);
	msgpack_sbuffer_destroy(&r2);
}

/* ---- transfer messages ---- */

static void put_body(const char *name, msgpack_sbuffer *sb, int rc)
{
	if (rc < 0)
		die(name, rc);
	put("xmsg", name, sb->data + ME_FRAME_HDR, sb->size - ME_FRAME_HDR);
	msgpack_sbuffer_destroy(sb);
	msgpack_sbuffer_init(sb);
}

static void seeds_xmsg(void)
{
	uint8_t haves[3][ME_OID_LEN], digest[XMSG_DIGEST_LEN];
	struct gmsg_refstate rs;
	msgpack_sbuffer sb;

	memset(haves, 0x42, sizeof(haves));
	haves[1][0] = 0x01;
	memset(digest, 0xd1, sizeof(digest));
	refstate(&rs, repo_id, 3);
	msgpack_sbuffer_init(&sb);
	put_body("request", &sb, xmsg_encode_request(&sb, repo_id, NULL, 0, NULL, 0));
	put_body("request-haves-resume", &sb,
		 xmsg_encode_request(&sb, repo_id, (const uint8_t(*)[ME_OID_LEN])haves, 3, digest,
				     4096));
	put_body("start", &sb,
		 xmsg_encode_start(&sb, "project.bundle", 1u << 20, digest, 0, creator.pk, &rs));
	put_body("start-resume", &sb,
		 xmsg_encode_start(&sb, "project.bundle", 70000, digest, 65536, creator.pk, &rs));
	struct xmsg_parts parts = { .n = 3 };
	for (uint32_t i = 0; i < parts.n; i++) {
		parts.v[i].offset = 200 + (uint64_t)i * 300000;
		parts.v[i].count = 1000 + i;
	}
	put_body("start-parts", &sb,
		 xmsg_encode_start_parts(&sb, "project.bundle", 1u << 20, digest, 0, creator.pk,
					 &rs, &parts));
	put_body("data", &sb, xmsg_encode_data(&sb, "# v2 git bundle\n", 16));
	put_body("done", &sb, xmsg_encode_done(&sb, digest));
	put_body("error", &sb, xmsg_encode_error(&sb, ME_ENOTFOUND, "no such repository"));
	msgpack_sbuffer_destroy(&sb);
}

/* ---- bundles ---- */

static void *slurp(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	char *buf;

	if (f == NULL || fstat(fileno(f), &st) < 0)
		die(path, -1);
	*n = (size_t)st.st_size;
	if ((buf = malloc(*n + 1)) == NULL || fread(buf, 1, *n, f) != *n)
		die(path, -1);
	fclose(f);
	return buf;
}

static void bundle(struct bundle_fixture *fx, const char *name, size_t nrefs, int thin)
{
	char path[PATH_MAX + 32], err[256];
	struct bundle_header h;
	size_t n;
	int fd, rc;

	snprintf(path, sizeof(path), "%s/%s", fx->dir, name);
	if ((fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600)) < 0)
		die(path, -1);
	rc = bundle_write(fx->src, fx->refs, nrefs, thin ? &fx->c1 : NULL, thin ? 1 : 0, fd,
			  NULL, err, sizeof(err));
	close(fd);
	if (rc < 0) {
		fprintf(stderr, "fuzz-gen-seeds: bundle_write: %s\n", err);
		exit(1);
	}
	char *b = slurp(path, &n);
	put("bundle-rx", name, b, n);
	if ((rc = bundle_header_parse(b, n, &h, err, sizeof(err))) < 0)
		die(err, rc);
	/* The header target gets the header and the start of the pack. */
	put("bundle-header", name, b, h.len + 12 < n ? h.len + 12 : n);
	bundle_header_free(&h);
	free(b);
}

/* bundle-objects: records (kind byte, u16 length, content) of objects of the fixture's src. */
static void object_records(struct bundle_fixture *fx, const char *name, const git_oid *oids,
			   size_t n)
{
	static const uint8_t tbyte[] = { [GIT_OBJECT_COMMIT] = 0, [GIT_OBJECT_TREE] = 1,
					 [GIT_OBJECT_BLOB] = 2, [GIT_OBJECT_TAG] = 3 };
	msgpack_sbuffer sb;
	git_odb *odb;

	msgpack_sbuffer_init(&sb);
	if (git_repository_odb(&odb, fx->src) < 0)
		die("git_repository_odb", -1);
	for (size_t i = 0; i < n; i++) {
		git_odb_object *o;
		uint8_t head[3];
		if (git_odb_read(&o, odb, &oids[i]) < 0)
			die("git_odb_read", -1);
		size_t len = git_odb_object_size(o);
		head[0] = tbyte[git_odb_object_type(o)];
		head[1] = (uint8_t)(len >> 8);
		head[2] = (uint8_t)len;
		msgpack_sbuffer_write(&sb, (const char *)head, 3);
		msgpack_sbuffer_write(&sb, git_odb_object_data(o), len);
		git_odb_object_free(o);
	}
	git_odb_free(odb);
	put("bundle-objects", name, sb.data, sb.size);
	msgpack_sbuffer_destroy(&sb);
}

/* The objects of commit c: itself, its tree and the tree's entries. */
static size_t commit_objects(struct bundle_fixture *fx, const git_oid *c, git_oid *out)
{
	git_commit *commit;
	git_tree *tree;
	size_t n = 0;

	if (git_commit_lookup(&commit, fx->src, c) < 0 || git_commit_tree(&tree, commit) < 0)
		die("commit", -1);
	out[n++] = *c;
	out[n++] = *git_tree_id(tree);
	for (size_t i = 0; i < git_tree_entrycount(tree); i++)
		out[n++] = *git_tree_entry_id(git_tree_entry_byindex(tree, i));
	git_tree_free(tree);
	git_commit_free(commit);
	return n;
}

static void seeds_bundle(void)
{
	struct bundle_fixture fx;
	char hex[GIT_OID_HEXSZ + 1], s[512];

	if (bundle_fixture_init(&fx) < 0)
		exit(1);
	bundle(&fx, "full", 2, 0);
	bundle(&fx, "thin", 2, 1);
	bundle(&fx, "main-only", 1, 1); /* refs differ from the expected state */

	git_oid objs[16];
	size_t n = commit_objects(&fx, &fx.c2, objs);
	objs[n++] = fx.tag;
	object_records(&fx, "thin", objs, n); /* blob "hello" is in the mirror */
	n += commit_objects(&fx, &fx.c1, objs + n);
	n--; /* blob "hello" is in both trees: a pack has each object once */
	object_records(&fx, "full", objs, n);
	object_records(&fx, "tag-only", &fx.tag, 1); /* C2 missing */

	/* Deltas: "hello\nworld\n" made from the mirror's blob "hello\n" (REF_DELTA, a thin pack),
	 * and from the same blob sent in the pack (OFS_DELTA). A delta: base size, result size,
	 * copy 6 bytes from offset 0, insert "world\n". */
	static const uint8_t delta[] = { 6, 12, 0x90, 6, 6, 'w', 'o', 'r', 'l', 'd', '\n' };
	git_oid hello;
	uint8_t rec[3 + GIT_OID_RAWSZ + sizeof(delta)];
	if (git_odb_hash(&hello, "hello\n", 6, GIT_OBJECT_BLOB) < 0)
		die("git_odb_hash", -1);
	rec[0] = 5;
	rec[1] = 0;
	rec[2] = GIT_OID_RAWSZ + sizeof(delta);
	memcpy(rec + 3, hello.id, GIT_OID_RAWSZ);
	memcpy(rec + 3 + GIT_OID_RAWSZ, delta, sizeof(delta));
	put("bundle-objects", "ref-delta", rec, sizeof(rec));
	rec[0] = 2;
	rec[1] = 0;
	rec[2] = 6;
	memcpy(rec + 3, "hello\n", 6);
	rec[9] = 4;
	rec[10] = 0;
	rec[11] = sizeof(delta);
	memcpy(rec + 12, delta, sizeof(delta));
	put("bundle-objects", "ofs-delta", rec, 12 + sizeof(delta));

	git_oid_tostr(hex, sizeof(hex), &fx.c1);
	snprintf(s, sizeof(s), "# v2 git bundle\n-%s a comment\n%s refs/heads/a\n%s refs/tags/b\n\n",
		 hex, hex, hex);
	put_str("bundle-header", "prereq-comment", s);
	snprintf(s, sizeof(s), "# v3 git bundle\n@object-format=sha1\n%s refs/heads/a\n\n", hex);
	put_str("bundle-header", "v3", s);
	snprintf(s, sizeof(s), "# v2 git bundle\n%s HEAD\n\nPACK", hex);
	put_str("bundle-header", "head-ref", s);
	bundle_fixture_free(&fx);
}

/* ---- ids ---- */

static void seeds_ids(void)
{
	uint8_t legacy[1 + ME_PK_LEN];
	char s[256], b58[128];

	put_str("ids", "did-key", node.did);
	legacy[0] = 0xed;
	memcpy(legacy + 1, node.pk, ME_PK_LEN);
	me_b58_encode(legacy, sizeof(legacy), b58, sizeof(b58));
	snprintf(s, sizeof(s), "did:key:z%s", b58);
	put_str("ids", "did-key-legacy", s);
	put_str("ids", "did-repo", repo_id);
	put_str("ids", "b58-zeros", "1112NEpo7TZRRrLZSi2U");
	snprintf(s, sizeof(s), "%s@192.0.2.7:9000", node.did);
	put_str("ids", "bootstrap-v4", s);
	snprintf(s, sizeof(s), "%s@[2001:db8::7]:9443", creator.did);
	put_str("ids", "bootstrap-v6", s);
}

/* ---- configuration file ---- */

static void seeds_config(void)
{
	char s[2048];

	snprintf(s, sizeof(s),
		 "# every key\n"
		 "root = /var/lib/megaengine\n"
		 "alias = node-1\n"
		 "addr = 0.0.0.0:9000\n"
		 "addr = [::]:9000\n"
		 "bootstrap-node = %s@192.0.2.1:9000\n"
		 "announce-addr = 198.51.100.1:9000\n"
		 "gossip-interval = 30\n"
		 "max-outbound = 4\n"
		 "max-repo-size = 512M\n"
		 "cert-path = /var/lib/megaengine/certs\n"
		 "socket = /run/megaengine/megaengined.sock\n"
		 "socket-group = megaengine\n"
		 "log-level = debug\n",
		 node.did);
	put_str("config", "all-keys", s);
	put_str("config", "comments",
		"; a comment\n\n   # indented comment\nalias=x ; inline\n  log-level = warning\n");
	put_str("config", "empty", "");
	put_str("config", "errors", "alias = a\nalias = b\n[section]\nnot a pair\n");
}

int main(int argc, char **argv)
{
	uint8_t root[ME_OID_LEN];

	if (argc != 2) {
		fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
		return 2;
	}
	outdir = argv[1];
	if (sodium_init() < 0)
		die("sodium_init", -1);
	make_kp(&node, 1);
	make_kp(&creator, 2);
	memset(root, 0xab, sizeof(root));
	me_did_repo_compute(root, creator.pk, repo_id, sizeof(repo_id));
	root[0] = 0;
	me_did_repo_compute(root, creator.pk, repo_id2, sizeof(repo_id2));

	seeds_control();
	seeds_gossip();
	seeds_xmsg();
	seeds_bundle();
	seeds_ids();
	seeds_config();
	return 0;
}
