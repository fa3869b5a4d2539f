#include "daemon/cmds.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/control.h"
#include "daemon/gitrepo.h"
#include "daemon/gossip.h"
#include "daemon/mirror.h"
#include "daemon/net.h"
#include "daemon/sync.h"
#include "daemon/watch.h"

#define ERR(ctx, code, ...) (snprintf((ctx)->err, (ctx)->errsz, __VA_ARGS__), (code))

/* What repo.list / repo.show say about a repository's replication. */
struct repo_view {
	const char *state;
	int progress;          /* 0..100, -1: none */
	const char *error;     /* NULL: none */
	int64_t last_sync_s;   /* 0: never */
	int64_t mirror_seq;
	struct store_clone *clones;
	size_t nclones;
};

static int repo_view_get(struct cmd_ctx *ctx, const struct store_repo *r, struct repo_view *v)
{
	struct node *n = ctx->node;
	struct sync_status ss = { .state = SYNC_IDLE };
	size_t k = 0;

	memset(v, 0, sizeof(*v));
	v->progress = -1;
	if (store_clone_list(n->store, r->id, &v->clones, &v->nclones) < 0)
		return ERR(ctx, ME_EDB, "database: %s", store_errmsg(n->store));
	/* A working copy that no longer exists is forgotten (the daemon may not see every path:
	 * only a definite "no such file" counts). */
	for (size_t i = 0; i < v->nclones; i++) {
		struct stat st;
		if (stat(v->clones[i].path, &st) < 0 && errno == ENOENT) {
			store_clone_remove(n->store, r->id, v->clones[i].path);
			free(v->clones[i].repo_id);
			free(v->clones[i].path);
			continue;
		}
		v->clones[k++] = v->clones[i];
	}
	v->nclones = k;

	int64_t have = r->is_external ? r->mirror_seq : r->ref_seq;
	int behind = 0;
	for (size_t i = 0; i < v->nclones; i++)
		behind |= v->clones[i].seq < have;
	v->mirror_seq = have;
	if (r->sync_error != NULL && r->sync_error[0] != '\0')
		v->error = r->sync_error;
	if (!r->is_external) {
		v->state = behind ? "HAS UPDATES" : "up to date";
		return 0;
	}
	v->last_sync_s = r->last_sync_ms / 1000;
	if (n->sync != NULL)
		sync_status(n->sync, r->id, &ss);
	if (ss.state == SYNC_RUNNING) {
		v->state = ss.verifying ? "verifying" : "syncing";
		if (ss.verifying)
			v->progress = 100;
		else if (ss.total > 0)
			v->progress = (int)(ss.done >= ss.total ? 100 : ss.done * 100 / ss.total);
	} else if (ss.state == SYNC_QUEUED) {
		v->state = "queued";
	} else if (r->mirror_seq <= 0) {
		v->state = v->error ? "failed" : "not fetched";
	} else if (r->mirror_seq < r->ref_seq) {
		v->state = v->error ? "failed" : "HAS UPDATES";
	} else {
		v->state = behind ? "HAS UPDATES" : "up to date";
	}
	return 0;
}

static void repo_view_clear(struct repo_view *v)
{
	store_clone_list_free(v->clones, v->nclones);
	v->clones = NULL;
	v->nclones = 0;
}

/* Packs a repository map. creator_alias: "you" when the creator is this node, else its alias
 * from the nodes table ("" when unknown). 0, or a ME_E* code with ctx->err set. */
static int repo_pack(struct cmd_ctx *ctx, msgpack_packer *pk, const struct store_repo *r,
		     const struct store_ref *refs, size_t nrefs, int with_refs)
{
	const struct node *n = ctx->node;
	int mine = n->has_key && strcmp(r->creator, n->kp.did) == 0;
	struct store_node cn;
	struct repo_view v;
	int rc = ME_ENOTFOUND;

	memset(&cn, 0, sizeof(cn));
	if (!mine)
		rc = store_node_get(n->store, r->creator, &cn);
	if (rc < 0 && rc != ME_ENOTFOUND)
		return ERR(ctx, rc, "database: %s", store_errmsg(n->store));
	if ((rc = repo_view_get(ctx, r, &v)) < 0) {
		store_node_clear(&cn);
		return rc;
	}
	msgpack_pack_map(pk, with_refs ? 20 : 19);
	me_mp_pack_kv_str(pk, "id", r->id);
	me_mp_pack_kv_str(pk, "name", r->name);
	me_mp_pack_kv_str(pk, "creator", r->creator);
	me_mp_pack_kv_str(pk, "creator_alias", mine ? "you" : cn.alias ? cn.alias : "");
	store_node_clear(&cn);
	me_mp_pack_kv_bool(pk, "mine", mine);
	me_mp_pack_kv_str(pk, "description", r->description);
	me_mp_pack_kv_str(pk, "path", r->path);
	me_mp_pack_kv_bool(pk, "is_external", r->is_external);
	me_mp_pack_kv_str(pk, "state", v.state);
	me_mp_pack_str(pk, "progress");
	if (v.progress >= 0)
		msgpack_pack_int(pk, v.progress);
	else
		msgpack_pack_nil(pk);
	me_mp_pack_str(pk, "error");
	if (v.error != NULL)
		me_mp_pack_str(pk, v.error);
	else
		msgpack_pack_nil(pk);
	me_mp_pack_str(pk, "last_sync");
	if (v.last_sync_s > 0)
		msgpack_pack_int64(pk, v.last_sync_s);
	else
		msgpack_pack_nil(pk);
	me_mp_pack_kv_int(pk, "mirror_seq", v.mirror_seq);
	me_mp_pack_kv_int(pk, "ref_seq", r->ref_seq);
	me_mp_pack_str(pk, "clones");
	msgpack_pack_array(pk, v.nclones);
	for (size_t i = 0; i < v.nclones; i++) {
		msgpack_pack_map(pk, 2);
		me_mp_pack_kv_str(pk, "path", v.clones[i].path);
		me_mp_pack_kv_int(pk, "seq", v.clones[i].seq);
	}
	repo_view_clear(&v);
	me_mp_pack_kv_str(pk, "root_commit", r->root_commit);
	me_mp_pack_kv_str(pk, "head", r->head);
	me_mp_pack_kv_int(pk, "created_at", r->created_at);
	me_mp_pack_kv_int(pk, "updated_at", r->updated_at);
	if (with_refs) {
		me_mp_pack_str(pk, "refs");
		msgpack_pack_array(pk, nrefs);
		for (size_t i = 0; i < nrefs; i++) {
			msgpack_pack_map(pk, 2);
			me_mp_pack_kv_str(pk, "name", refs[i].name);
			me_mp_pack_kv_str(pk, "oid", refs[i].oid);
		}
	}
	return 0;
}

static int cmd_auth_init(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	int created;
	(void)args;
	int rc = node_auth_init(ctx->node, &created, ctx->err, ctx->errsz);
	if (rc < 0)
		return rc;
	if (created) {
		log_notice("node identity created: %s", ctx->node->kp.did);
	}
	msgpack_pack_map(out, 2);
	me_mp_pack_kv_str(out, "did", ctx->node->kp.did);
	me_mp_pack_kv_bool(out, "created", created);
	return 0;
}

static int cmd_auth_show(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	(void)args;
	msgpack_pack_map(out, 1);
	me_mp_pack_kv_str(out, "did", ctx->node->kp.did);
	return 0;
}

static int cmd_node_status(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	struct node *n = ctx->node;
	const struct me_config *cfg = n->cfg;
	int64_t nrepos = 0, nnodes = 0;
	(void)args;

	if (store_repo_count(n->store, &nrepos) < 0 || store_node_count(n->store, &nnodes) < 0)
		return ERR(ctx, ME_EDB, "database: %s", store_errmsg(n->store));
	msgpack_pack_map(out, 13);
	me_mp_pack_str(out, "did");
	if (n->has_key)
		me_mp_pack_str(out, n->kp.did);
	else
		msgpack_pack_nil(out);
	me_mp_pack_kv_str(out, "alias", cfg->alias);
	me_mp_pack_str(out, "addresses");
	msgpack_pack_array(out, cfg->naddrs);
	for (size_t i = 0; i < cfg->naddrs; i++)
		me_mp_pack_str(out, cfg->addrs[i].text);
	me_mp_pack_kv_str(out, "version", ME_VERSION);
	me_mp_pack_kv_int(out, "uptime_s", (me_mono_ms() - n->start_mono_ms) / 1000);
	me_mp_pack_kv_str(out, "root", cfg->root);
	me_mp_pack_kv_int(out, "repos", nrepos);
	me_mp_pack_kv_int(out, "nodes", nnodes);
	me_mp_pack_kv_int(out, "peers", n->net != NULL ? (int64_t)net_npeers(n->net) : 0);
	me_mp_pack_kv_int(out, "control_connections", (int64_t)ctx->nconns);

	struct gossip_stats gs;
	gossip_get_stats(n->gossip, &gs);
	me_mp_pack_str(out, "gossip");
	msgpack_pack_map(out, 17);
	me_mp_pack_kv_int(out, "received", (int64_t)gs.received);
	me_mp_pack_kv_int(out, "accepted", (int64_t)gs.accepted);
	me_mp_pack_kv_int(out, "duplicates", (int64_t)gs.duplicates);
	me_mp_pack_kv_int(out, "sent", (int64_t)gs.sent);
	me_mp_pack_kv_int(out, "relayed", (int64_t)gs.relayed);
	me_mp_pack_kv_int(out, "catchup", (int64_t)gs.catchup);
	me_mp_pack_kv_int(out, "graft_replies", (int64_t)gs.graft_replies);
	me_mp_pack_kv_int(out, "ihave_frames", (int64_t)gs.ihave_frames);
	me_mp_pack_kv_int(out, "ihave_ids", (int64_t)gs.ihave_ids);
	me_mp_pack_kv_int(out, "grafts", (int64_t)gs.grafts);
	me_mp_pack_kv_int(out, "prunes", (int64_t)gs.prunes);
	me_mp_pack_kv_int(out, "ihave_ids_received", (int64_t)gs.ihave_ids_received);
	me_mp_pack_kv_int(out, "grafts_received", (int64_t)gs.grafts_received);
	me_mp_pack_kv_int(out, "prunes_received", (int64_t)gs.prunes_received);
	me_mp_pack_kv_int(out, "eager_peers", (int64_t)gs.eager_peers);
	me_mp_pack_kv_int(out, "lazy_peers", (int64_t)gs.lazy_peers);
	me_mp_pack_str(out, "rejected");
	msgpack_pack_map(out, GR__COUNT);
	for (int i = 0; i < GR__COUNT; i++)
		me_mp_pack_kv_int(out, gossip_reject_name(i), (int64_t)gs.rejected[i]);

	struct net_stats ns = { 0 };
	if (n->net != NULL)
		net_get_stats(n->net, &ns);
	me_mp_pack_str(out, "transport");
	msgpack_pack_map(out, 9);
	me_mp_pack_kv_int(out, "handshakes_failed", (int64_t)ns.handshakes_failed);
	me_mp_pack_kv_int(out, "frames_rejected", (int64_t)ns.frames_rejected);
	me_mp_pack_kv_int(out, "packets_in", (int64_t)ns.pkts_in);
	me_mp_pack_kv_int(out, "packets_out", (int64_t)ns.pkts_out);
	me_mp_pack_kv_int(out, "connections_refused", (int64_t)ns.conns_refused);
	me_mp_pack_kv_int(out, "connections_banned", (int64_t)ns.conns_banned);
	me_mp_pack_kv_int(out, "frames_rate_limited", (int64_t)ns.frames_rate_limited);
	me_mp_pack_kv_int(out, "peers_misbehaved", (int64_t)ns.peers_misbehaved);
	me_mp_pack_kv_int(out, "bans_active", (int64_t)ns.bans_active);

	me_mp_pack_str(out, "sync");
	if (n->sync == NULL) {
		msgpack_pack_nil(out);
		return 0;
	}
	struct sync_stats ss;
	sync_get_stats(n->sync, &ss);
	/* The verifier children (daemon/verify.c) index what arrives: their memory is part of
	 * what receiving costs this node. */
	struct rusage ru;
	int64_t child_kib = getrusage(RUSAGE_CHILDREN, &ru) == 0 ? (int64_t)ru.ru_maxrss : 0;
	msgpack_pack_map(out, 10);
	me_mp_pack_kv_int(out, "fetches_ok", (int64_t)ss.fetches_ok);
	me_mp_pack_kv_int(out, "fetches_failed", (int64_t)ss.fetches_failed);
	me_mp_pack_kv_int(out, "serves_ok", (int64_t)ss.serves_ok);
	me_mp_pack_kv_int(out, "serves_failed", (int64_t)ss.serves_failed);
	me_mp_pack_kv_int(out, "serves_refused", (int64_t)ss.serves_refused);
	me_mp_pack_kv_int(out, "bytes_fetched", (int64_t)ss.bytes_fetched);
	me_mp_pack_kv_int(out, "bytes_served", (int64_t)ss.bytes_served);
	me_mp_pack_kv_int(out, "rejected_bundles", (int64_t)ss.rejected_bundles);
	me_mp_pack_kv_int(out, "bundles_built", (int64_t)ss.bundles_built);
	me_mp_pack_kv_int(out, "verifier_max_rss_kib", child_kib);
	return 0;
}

static int cmd_repo_add(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	struct node *n = ctx->node;
	char path[4097], desc[1025] = "", id[ME_DID_REPO_SIZE], gerr[256];
	struct gitrepo_info gi;
	struct store_repo existing, r;
	int rc;

	if (me_mp_strcpy(me_mp_get(args, "path"), path, sizeof(path)) < 0 || path[0] == '\0')
		return ERR(ctx, ME_EARG, "\"path\" must be a non-empty path");
	const msgpack_object *d = me_mp_get(args, "description");
	if (d != NULL && me_mp_strcpy(d, desc, sizeof(desc)) < 0)
		return ERR(ctx, ME_EARG, "\"description\" must be a string");
	if (path[0] != '/')
		return ERR(ctx, ME_EARG, "\"path\" must be absolute (mectl makes it so)");

	rc = gitrepo_inspect(path, &gi, gerr, sizeof(gerr));
	if (rc < 0)
		return ERR(ctx, rc, "%s", gerr[0] ? gerr : me_strerror(rc));
	me_did_repo_compute(gi.root_oid, n->kp.pk, id, sizeof(id));

	rc = store_repo_find_path(n->store, gi.path, &existing);
	if (rc == 0) {
		rc = ERR(ctx, ME_EEXIST, "%s is already added as %s", gi.path, existing.id);
		store_repo_clear(&existing);
		goto out;
	}
	if (store_repo_get(n->store, id, &existing) == 0) {
		rc = ERR(ctx, ME_EEXIST, "%s is already added as %s (from %s)", gi.path, id,
			 existing.path);
		store_repo_clear(&existing);
		goto out;
	}
	memset(&r, 0, sizeof(r));
	r.id = id;
	r.name = gi.name;
	r.creator = n->kp.did;
	r.description = desc;
	r.path = gi.path;
	r.root_commit = gi.root_hex;
	r.head = gi.head;
	rc = store_repo_add(n->store, &r, gi.refs, gi.nrefs);
	if (rc == ME_EEXIST) {
		rc = ERR(ctx, ME_EEXIST, "%s is already added as %s", gi.path, id);
		goto out;
	}
	if (rc < 0) {
		rc = ERR(ctx, rc, "database: %s", store_errmsg(n->store));
		goto out;
	}
	{
		char f1[ME_DID_REPO_SIZE + 16];
		snprintf(f1, sizeof(f1), "REPO_ID=%s", id);
		const char *fields[] = { f1, ME_MSGID_REPO_ADDED, NULL };
		gossip_changed(n->gossip);
		watch_add(n->watch, id, gi.path); /* new commits are signed and announced */
		sync_local_changed(n->sync, id); /* its first bundle, built before anyone asks */
		me_log_fields(LOG_INFO, fields, "repository added: %s (%s, %zu refs)", gi.name,
			      gi.path, gi.nrefs);
	}
	if ((rc = store_repo_get(n->store, id, &r)) < 0) {
		rc = ERR(ctx, rc, "database: %s", store_errmsg(n->store));
		goto out;
	}
	rc = repo_pack(ctx, out, &r, gi.refs, gi.nrefs, 1);
	store_repo_clear(&r);
out:
	gitrepo_info_clear(&gi);
	return rc;
}

static int cmd_repo_list(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	struct store_repo *repos;
	size_t nrepos;
	int rc = 0;
	(void)args;

	if (store_repo_list(ctx->node->store, &repos, &nrepos) < 0)
		return ERR(ctx, ME_EDB, "database: %s", store_errmsg(ctx->node->store));
	msgpack_pack_map(out, 1);
	me_mp_pack_str(out, "repos");
	msgpack_pack_array(out, nrepos);
	for (size_t i = 0; i < nrepos && rc == 0; i++)
		rc = repo_pack(ctx, out, &repos[i], NULL, 0, 0);
	store_repo_list_free(repos, nrepos);
	return rc;
}

static int repo_id_arg(struct cmd_ctx *ctx, const msgpack_object *args, char *id, size_t idsz)
{
	if (me_mp_strcpy(me_mp_get(args, "repo_id"), id, idsz) < 0 || !me_did_repo_valid(id))
		return ERR(ctx, ME_EBADID, "\"repo_id\" is not a did:repo:z... identifier");
	return 0;
}

static int cmd_repo_show(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	char id[ME_DID_REPO_SIZE];
	struct store_repo r;
	struct store_ref *refs;
	size_t nrefs;
	int rc;

	if ((rc = repo_id_arg(ctx, args, id, sizeof(id))) < 0)
		return rc;
	rc = store_repo_get(ctx->node->store, id, &r);
	if (rc == ME_ENOTFOUND)
		return ERR(ctx, rc, "no repository %s", id);
	if (rc < 0)
		return ERR(ctx, rc, "database: %s", store_errmsg(ctx->node->store));
	if (store_refs_get(ctx->node->store, id, &refs, &nrefs) < 0) {
		store_repo_clear(&r);
		return ERR(ctx, ME_EDB, "database: %s", store_errmsg(ctx->node->store));
	}
	rc = repo_pack(ctx, out, &r, refs, nrefs, 1);
	store_refs_free(refs, nrefs);
	store_repo_clear(&r);
	return rc;
}

static int cmd_repo_remove(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	char id[ME_DID_REPO_SIZE];
	int rc;

	if ((rc = repo_id_arg(ctx, args, id, sizeof(id))) < 0)
		return rc;
	rc = store_repo_remove(ctx->node->store, id);
	if (rc == ME_ENOTFOUND)
		return ERR(ctx, rc, "no repository %s", id);
	if (rc < 0)
		return ERR(ctx, rc, "database: %s", store_errmsg(ctx->node->store));
	char f1[ME_DID_REPO_SIZE + 16];
	snprintf(f1, sizeof(f1), "REPO_ID=%s", id);
	const char *fields[] = { f1, ME_MSGID_REPO_REMOVED, NULL };
	me_log_fields(LOG_INFO, fields, "repository removed: %s", id);
	watch_remove(ctx->node->watch, id);
	gossip_changed(ctx->node->gossip);
	msgpack_pack_map(out, 1);
	me_mp_pack_kv_str(out, "removed", id);
	return 0;
}

/* ---- fetching: repo.sync, repo.clone, repo.pull, repo.track ---- */

/* Reads repository id into *r. 0, or a ME_E* code with ctx->err set. */
static int repo_get_arg(struct cmd_ctx *ctx, const msgpack_object *args, char *id, size_t idsz,
			struct store_repo *r)
{
	int rc;

	if ((rc = repo_id_arg(ctx, args, id, idsz)) < 0)
		return rc;
	rc = store_repo_get(ctx->node->store, id, r);
	if (rc == ME_ENOTFOUND)
		return ERR(ctx, rc, "no repository %s", id);
	if (rc < 0)
		return ERR(ctx, rc, "database: %s", store_errmsg(ctx->node->store));
	return 0;
}

/* Optional or required absolute path argument ("" when absent and optional). */
static int path_arg(struct cmd_ctx *ctx, const msgpack_object *args, char *path, size_t sz)
{
	const msgpack_object *o = me_mp_get(args, "path");

	path[0] = '\0';
	if (o == NULL)
		return 0;
	if (me_mp_strcpy(o, path, sz) < 0 || path[0] != '/')
		return ERR(ctx, ME_EARG, "\"path\" must be an absolute path");
	return 0;
}

/* repo.sync result: where the repository stands now. */
static int pack_sync_result(struct cmd_ctx *ctx, const char *id, msgpack_packer *pk)
{
	struct store_repo r;
	struct repo_view v;
	int rc = store_repo_get(ctx->node->store, id, &r);

	if (rc < 0)
		return ERR(ctx, rc, rc == ME_ENOTFOUND ? "repository %s was removed" : "database: %s",
			   rc == ME_ENOTFOUND ? id : store_errmsg(ctx->node->store));
	if ((rc = repo_view_get(ctx, &r, &v)) == 0) {
		msgpack_pack_map(pk, 6);
		me_mp_pack_kv_str(pk, "id", r.id);
		me_mp_pack_kv_str(pk, "name", r.name);
		me_mp_pack_kv_str(pk, "state", v.state);
		me_mp_pack_kv_int(pk, "mirror_seq", v.mirror_seq);
		me_mp_pack_kv_int(pk, "ref_seq", r.ref_seq);
		me_mp_pack_str(pk, "last_sync");
		if (v.last_sync_s > 0)
			msgpack_pack_int64(pk, v.last_sync_s);
		else
			msgpack_pack_nil(pk);
		repo_view_clear(&v);
	}
	store_repo_clear(&r);
	return rc;
}

static void pack_ref_list(msgpack_packer *pk, const struct store_ref *refs, size_t n)
{
	me_mp_pack_str(pk, "refs");
	msgpack_pack_array(pk, n);
	for (size_t i = 0; i < n; i++) {
		msgpack_pack_map(pk, 2);
		me_mp_pack_kv_str(pk, "name", refs[i].name);
		me_mp_pack_kv_str(pk, "oid", refs[i].oid);
	}
}

/* repo.clone / repo.pull result: what the client needs to do the git work itself. A local
 * repository is served from its working repository at its signed state's seq; one learnt from
 * a peer from its mirror, with the refs and HEAD the mirror holds. */
static int pack_source_result(struct cmd_ctx *ctx, const char *id, const char *path,
			      const char *warning, msgpack_packer *pk)
{
	struct node *n = ctx->node;
	struct store_repo r;
	struct store_ref *refs = NULL;
	size_t nrefs = 0;
	struct mirror_state ms = { 0 };
	char source[4096], gerr[256];
	const char *head;
	int64_t seq, tracked = 0;
	int rc = store_repo_get(n->store, id, &r);

	if (rc < 0)
		return ERR(ctx, rc, rc == ME_ENOTFOUND ? "repository %s was removed" : "database: %s",
			   rc == ME_ENOTFOUND ? id : store_errmsg(n->store));
	if (!r.is_external) {
		snprintf(source, sizeof(source), "%s", r.path);
		head = r.head;
		seq = r.ref_seq;
		if (store_refs_get(n->store, id, &refs, &nrefs) < 0) {
			rc = ERR(ctx, ME_EDB, "database: %s", store_errmsg(n->store));
			goto out;
		}
	} else {
		git_repository *g = NULL;
		if (r.mirror_seq <= 0) {
			rc = ERR(ctx, ME_EUNAVAIL, "%s has not been fetched yet%s%s", id,
				 warning ? ": " : "", warning ? warning : "");
			goto out;
		}
		if ((rc = mirror_path(n->cfg->root, id, source, sizeof(source))) < 0 ||
		    (rc = mirror_open(n->cfg->root, id, false, &g, gerr, sizeof(gerr))) < 0 ||
		    (rc = mirror_state_read(g, &ms, gerr, sizeof(gerr))) < 0) {
			git_repository_free(g);
			rc = ERR(ctx, rc, "mirror of %s: %s", id, gerr[0] ? gerr : me_strerror(rc));
			goto out;
		}
		git_repository_free(g);
		head = ms.head;
		seq = r.mirror_seq;
	}
	if (path[0] != '\0') {
		struct store_clone *cl;
		size_t ncl;
		if (store_clone_list(n->store, id, &cl, &ncl) < 0) {
			rc = ERR(ctx, ME_EDB, "database: %s", store_errmsg(n->store));
			goto out;
		}
		for (size_t i = 0; i < ncl; i++)
			if (strcmp(cl[i].path, path) == 0)
				tracked = cl[i].seq;
		store_clone_list_free(cl, ncl);
	}
	msgpack_pack_map(pk, 9);
	me_mp_pack_kv_str(pk, "id", r.id);
	me_mp_pack_kv_str(pk, "name", r.name);
	me_mp_pack_kv_str(pk, "source", source);
	me_mp_pack_kv_str(pk, "head", head);
	me_mp_pack_kv_int(pk, "seq", seq);
	me_mp_pack_kv_int(pk, "tracked_seq", tracked);
	me_mp_pack_kv_bool(pk, "is_external", r.is_external);
	me_mp_pack_str(pk, "warning");
	if (warning != NULL)
		me_mp_pack_str(pk, warning);
	else
		msgpack_pack_nil(pk);
	if (!r.is_external) {
		pack_ref_list(pk, refs, nrefs);
	} else {
		char oid[41];
		me_mp_pack_str(pk, "refs");
		msgpack_pack_array(pk, ms.nrefs);
		for (size_t i = 0; i < ms.nrefs; i++) {
			git_oid o;
			memcpy(o.id, ms.refs[i].oid, sizeof(o.id));
			git_oid_tostr(oid, sizeof(oid), &o);
			msgpack_pack_map(pk, 2);
			me_mp_pack_str(pk, "name");
			msgpack_pack_str(pk, ms.refs[i].name.len);
			msgpack_pack_str_body(pk, ms.refs[i].name.ptr, ms.refs[i].name.len);
			me_mp_pack_kv_str(pk, "oid", oid);
		}
	}
	rc = 0;
out:
	mirror_state_free(&ms);
	store_refs_free(refs, nrefs);
	store_repo_clear(&r);
	return rc;
}

/* A request waiting for a fetch. */
struct fetch_req {
	struct ctl_pending *p;
	struct sync_waiter *w;
	struct node *node;
	int cmd;
	int starting, done_rc, done_early;
	char done_msg[256];
	char id[ME_DID_REPO_SIZE];
	char path[4097];
};

struct fetch_result {
	struct fetch_req *f;
	const char *warning;
};

static int fetch_result_pack(void *ud, msgpack_packer *pk, char *err, size_t errsz)
{
	struct fetch_result *fr = ud;
	struct fetch_req *f = fr->f;
	struct cmd_ctx ctx = { .node = f->node, .err = err, .errsz = errsz };

	if (f->cmd == ME_CMD_REPO_SYNC)
		return pack_sync_result(&ctx, f->id, pk);
	return pack_source_result(&ctx, f->id, f->path, fr->warning, pk);
}

static void fetch_complete(struct fetch_req *f, int rc, const char *msg)
{
	struct fetch_result fr = { .f = f };
	char warn[320];

	if (rc < 0 && f->cmd != ME_CMD_REPO_SYNC) {
		/* The mirror may still serve: an older state beats none. */
		snprintf(warn, sizeof(warn), "could not fetch the newest state (%s: %s); using the "
			 "mirror as it is", me_errname(rc), msg && *msg ? msg : me_strerror(rc));
		fr.warning = warn;
		rc = 0;
	}
	if (rc < 0)
		ctl_finish(f->p, rc, msg && *msg ? msg : NULL, NULL, NULL);
	else
		ctl_finish(f->p, 0, NULL, fetch_result_pack, &fr);
	free(f);
}

static void fetch_on_progress(void *ud, uint64_t done, uint64_t total)
{
	struct fetch_req *f = ud;
	if (!f->starting)
		ctl_progress(f->p, done, total);
}

static void fetch_on_done(void *ud, int rc, const char *msg)
{
	struct fetch_req *f = ud;

	if (f->starting) { /* called from inside sync_fetch: finish once it has returned */
		f->done_early = 1;
		f->done_rc = rc;
		snprintf(f->done_msg, sizeof(f->done_msg), "%s", msg ? msg : "");
		return;
	}
	fetch_complete(f, rc, msg);
}

static void fetch_on_cancel(void *ud)
{
	struct fetch_req *f = ud;

	if (f->w != NULL)
		sync_waiter_cancel(f->w);
	free(f);
}

/* Fetches the repository now (external ones), then answers per command. */
static int fetch_then_reply(struct cmd_ctx *ctx, const struct store_repo *r, const char *path,
			    msgpack_packer *out)
{
	struct node *n = ctx->node;
	struct fetch_req *f;
	struct sync_waiter *w = NULL;

	if (!r->is_external || n->sync == NULL) {
		/* A local repository has nothing to fetch: it is its own source. */
		const char *warn = r->is_external ? "replication is not running on this node; "
			"using the mirror as it is" : NULL;
		if (ctx->cmd == ME_CMD_REPO_SYNC) {
			if (r->is_external)
				return ERR(ctx, n->has_key ? ME_EUNAVAIL : ME_ENOKEY,
					   "replication is not running on this node%s",
					   n->has_key ? "" : ": run 'mectl auth init'");
			return pack_sync_result(ctx, r->id, out);
		}
		return pack_source_result(ctx, r->id, path, warn, out);
	}
	if ((f = calloc(1, sizeof(*f))) == NULL)
		return ERR(ctx, ME_ENOMEM, "out of memory");
	f->node = n;
	f->cmd = ctx->cmd;
	snprintf(f->id, sizeof(f->id), "%s", r->id);
	snprintf(f->path, sizeof(f->path), "%s", path);
	if ((f->p = ctl_defer(ctx, fetch_on_cancel, f)) == NULL) {
		free(f);
		return ctx->defer_error;
	}
	struct sync_waiter_cb cb = { fetch_on_progress, fetch_on_done, f };
	f->starting = 1;
	int rc = sync_fetch(n->sync, r->id, &cb, &w);
	f->starting = 0;
	if (rc < 0) {
		fetch_complete(f, rc, rc == ME_EINVAL ? "a local repository has nothing to fetch"
						      : NULL);
		return CMD_DEFERRED;
	}
	if (f->done_early) {
		fetch_complete(f, f->done_rc, f->done_msg);
		return CMD_DEFERRED;
	}
	f->w = w;
	return CMD_DEFERRED;
}

static int cmd_repo_fetch(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	char id[ME_DID_REPO_SIZE], path[4097];
	struct store_repo r;
	int rc;

	if ((rc = path_arg(ctx, args, path, sizeof(path))) < 0)
		return rc;
	if ((rc = repo_get_arg(ctx, args, id, sizeof(id), &r)) < 0)
		return rc;
	rc = fetch_then_reply(ctx, &r, path, out);
	store_repo_clear(&r);
	return rc;
}

static int cmd_repo_track(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	char id[ME_DID_REPO_SIZE], path[4097];
	struct store_repo r;
	const msgpack_object *seq = me_mp_get(args, "seq");
	int rc;

	if ((rc = path_arg(ctx, args, path, sizeof(path))) < 0)
		return rc;
	if (seq->type != MSGPACK_OBJECT_POSITIVE_INTEGER || seq->via.u64 > (uint64_t)INT64_MAX)
		return ERR(ctx, ME_EARG, "\"seq\" must be a non-negative integer");
	if (strstr(path, "/../") || strstr(path, "/./") || strcmp(path, "/") == 0)
		return ERR(ctx, ME_EARG, "\"path\" must be a canonical absolute path");
	if ((rc = repo_get_arg(ctx, args, id, sizeof(id), &r)) < 0)
		return rc;
	int64_t known = r.ref_seq > r.mirror_seq ? r.ref_seq : r.mirror_seq;
	if ((int64_t)seq->via.u64 > known) {
		rc = ERR(ctx, ME_EARG, "\"seq\" %llu is newer than any state of %s this node knows",
			 (unsigned long long)seq->via.u64, id);
		goto out;
	}
	if (store_clone_set(ctx->node->store, id, path, (int64_t)seq->via.u64) < 0) {
		rc = ERR(ctx, ME_EDB, "database: %s", store_errmsg(ctx->node->store));
		goto out;
	}
	log_info("working copy of %s at %s is at seq %llu", id, path,
		 (unsigned long long)seq->via.u64);
	store_repo_clear(&r);
	return pack_sync_result(ctx, id, out);
out:
	store_repo_clear(&r);
	return rc;
}

/* Packs a comma-separated address list as an array of its non-empty items. */
static void pack_addr_list(msgpack_packer *pk, const char *list)
{
	size_t cnt = 0;
	const char *p, *e;

	for (p = list; *p != '\0'; p = *e ? e + 1 : e) {
		e = p + strcspn(p, ",");
		cnt += e > p;
	}
	msgpack_pack_array(pk, cnt);
	for (p = list; *p != '\0'; p = *e ? e + 1 : e) {
		e = p + strcspn(p, ",");
		if (e > p) {
			msgpack_pack_str(pk, (size_t)(e - p));
			msgpack_pack_str_body(pk, p, (size_t)(e - p));
		}
	}
}

static int cmd_node_list(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	struct node *n = ctx->node;
	struct store_node *nodes;
	size_t cnt;
	uint8_t pk[ME_PK_LEN];
	(void)args;

	if (store_node_list(n->store, &nodes, &cnt) < 0)
		return ERR(ctx, ME_EDB, "database: %s", store_errmsg(n->store));
	msgpack_pack_map(out, 1);
	me_mp_pack_str(out, "nodes");
	msgpack_pack_array(out, cnt);
	for (size_t i = 0; i < cnt; i++) {
		const struct store_node *x = &nodes[i];
		int connected = n->net != NULL && me_did_key_parse(x->id, pk) == 0 &&
				net_peer_find(n->net, pk) != NULL;

		msgpack_pack_map(out, 7);
		me_mp_pack_kv_str(out, "id", x->id);
		me_mp_pack_kv_str(out, "alias", x->alias);
		me_mp_pack_str(out, "addresses");
		pack_addr_list(out, x->addresses);
		me_mp_pack_kv_int(out, "node_type", x->node_type);
		me_mp_pack_kv_str(out, "version", x->version);
		me_mp_pack_kv_int(out, "last_seen", x->last_seen_ms);
		me_mp_pack_kv_bool(out, "connected", connected);
	}
	store_node_list_free(nodes, cnt);
	return 0;
}

static int cmd_peer_list(struct cmd_ctx *ctx, const msgpack_object *args, msgpack_packer *out)
{
	struct net *net = ctx->node->net;
	struct peer *p;
	size_t cnt = 0;
	(void)args;

	for (p = net != NULL ? net_peer_first(net) : NULL; p != NULL; p = net_peer_next(p))
		cnt++;
	msgpack_pack_map(out, 1);
	me_mp_pack_str(out, "peers");
	msgpack_pack_array(out, cnt);
	/* Nothing else runs between the two walks: the list cannot change. */
	for (p = net != NULL ? net_peer_first(net) : NULL; p != NULL && cnt > 0;
	     p = net_peer_next(p), cnt--) {
		const char *did = net_peer_did(p), *addr = net_peer_addr(p);

		msgpack_pack_map(out, 5);
		me_mp_pack_kv_str(out, "did", did != NULL ? did : "");
		me_mp_pack_kv_str(out, "address", addr != NULL ? addr : "");
		me_mp_pack_kv_str(out, "direction", net_peer_outbound(p) ? "outbound" : "inbound");
		me_mp_pack_str(out, "rtt_ms");
		msgpack_pack_double(out, (double)net_peer_rtt_us(p) / 1000.0);
		me_mp_pack_kv_int(out, "since", net_peer_since_ms(p));
	}
	return 0;
}

const struct cmd_handler cmd_table[ME_CMD__COUNT] = {
	[ME_CMD_AUTH_INIT] = { cmd_auth_init, 0 },
	[ME_CMD_AUTH_SHOW] = { cmd_auth_show, 1 },
	[ME_CMD_NODE_ID] = { cmd_auth_show, 1 },
	[ME_CMD_NODE_STATUS] = { cmd_node_status, 0 },
	[ME_CMD_REPO_ADD] = { cmd_repo_add, 1 },
	[ME_CMD_REPO_LIST] = { cmd_repo_list, 0 },
	[ME_CMD_REPO_SHOW] = { cmd_repo_show, 0 },
	[ME_CMD_REPO_REMOVE] = { cmd_repo_remove, 0 },
	[ME_CMD_NODE_LIST] = { cmd_node_list, 0 },
	[ME_CMD_PEER_LIST] = { cmd_peer_list, 0 },
	[ME_CMD_REPO_SYNC] = { cmd_repo_fetch, 0 },
	[ME_CMD_REPO_CLONE] = { cmd_repo_fetch, 0 },
	[ME_CMD_REPO_PULL] = { cmd_repo_fetch, 0 },
	[ME_CMD_REPO_TRACK] = { cmd_repo_track, 0 },
};

int cmd_dispatch(struct cmd_ctx *ctx, const struct me_request *req, msgpack_packer *out)
{
	if (req->cmd < 0 || req->cmd >= ME_CMD__COUNT || cmd_table[req->cmd].fn == NULL)
		return ERR(ctx, ME_EUNKNOWN, "unknown command");
	if (cmd_table[req->cmd].needs_key && !ctx->node->has_key)
		return ERR(ctx, ME_ENOKEY, "this node has no identity yet: run 'mectl auth init'");
	return cmd_table[req->cmd].fn(ctx, req->args, out);
}
