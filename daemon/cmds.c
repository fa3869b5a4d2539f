#include "daemon/cmds.h"

#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "common/frame.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/util.h"
#include "daemon/gitrepo.h"
#include "daemon/gossip.h"
#include "daemon/net.h"

#define ERR(ctx, code, ...) (snprintf((ctx)->err, (ctx)->errsz, __VA_ARGS__), (code))

/* Packs a repository map. creator_alias comes from the nodes table: "" when the creator is this
 * node (so repo.add cannot fail here after adding) or not a known one. 0, or a ME_E* code with
 * ctx->err set. */
static int repo_pack(struct cmd_ctx *ctx, msgpack_packer *pk, const struct store_repo *r,
		     const struct store_ref *refs, size_t nrefs, int with_refs)
{
	const struct node *n = ctx->node;
	int mine = n->has_key && strcmp(r->creator, n->kp.did) == 0;
	struct store_node cn;
	int rc = ME_ENOTFOUND;

	memset(&cn, 0, sizeof(cn));
	if (!mine)
		rc = store_node_get(n->store, r->creator, &cn);
	if (rc < 0 && rc != ME_ENOTFOUND)
		return ERR(ctx, rc, "database: %s", store_errmsg(n->store));
	msgpack_pack_map(pk, with_refs ? 14 : 13);
	me_mp_pack_kv_str(pk, "id", r->id);
	me_mp_pack_kv_str(pk, "name", r->name);
	me_mp_pack_kv_str(pk, "creator", r->creator);
	me_mp_pack_kv_str(pk, "creator_alias", rc == 0 ? cn.alias : "");
	store_node_clear(&cn);
	me_mp_pack_kv_bool(pk, "mine", mine);
	me_mp_pack_kv_str(pk, "description", r->description);
	me_mp_pack_kv_str(pk, "path", r->path);
	me_mp_pack_kv_bool(pk, "is_external", r->is_external);
	me_mp_pack_kv_str(pk, "state", r->is_external ? "not fetched" : "local");
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
	msgpack_pack_map(out, 12);
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
	msgpack_pack_map(out, 6);
	me_mp_pack_kv_int(out, "received", (int64_t)gs.received);
	me_mp_pack_kv_int(out, "accepted", (int64_t)gs.accepted);
	me_mp_pack_kv_int(out, "duplicates", (int64_t)gs.duplicates);
	me_mp_pack_kv_int(out, "sent", (int64_t)gs.sent);
	me_mp_pack_kv_int(out, "relayed", (int64_t)gs.relayed);
	me_mp_pack_str(out, "rejected");
	msgpack_pack_map(out, GR__COUNT);
	for (int i = 0; i < GR__COUNT; i++)
		me_mp_pack_kv_int(out, gossip_reject_name(i), (int64_t)gs.rejected[i]);

	struct net_stats ns = { 0 };
	if (n->net != NULL)
		net_get_stats(n->net, &ns);
	me_mp_pack_str(out, "transport");
	msgpack_pack_map(out, 4);
	me_mp_pack_kv_int(out, "handshakes_failed", (int64_t)ns.handshakes_failed);
	me_mp_pack_kv_int(out, "frames_rejected", (int64_t)ns.frames_rejected);
	me_mp_pack_kv_int(out, "packets_in", (int64_t)ns.pkts_in);
	me_mp_pack_kv_int(out, "packets_out", (int64_t)ns.pkts_out);
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
	gossip_changed(ctx->node->gossip);
	msgpack_pack_map(out, 1);
	me_mp_pack_kv_str(out, "removed", id);
	return 0;
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
};

int cmd_dispatch(struct cmd_ctx *ctx, const struct me_request *req, msgpack_packer *out)
{
	if (req->cmd < 0 || req->cmd >= ME_CMD__COUNT || cmd_table[req->cmd].fn == NULL)
		return ERR(ctx, ME_EUNKNOWN, "unknown command");
	if (cmd_table[req->cmd].needs_key && !ctx->node->has_key)
		return ERR(ctx, ME_ENOKEY, "this node has no identity yet: run 'mectl auth init'");
	return cmd_table[req->cmd].fn(ctx, req->args, out);
}
