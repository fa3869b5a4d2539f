#include "client/output.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"

json_t *out_from_msgpack(const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL:
		return json_null();
	case MSGPACK_OBJECT_BOOLEAN:
		return json_boolean(o->via.boolean);
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		return json_integer(o->via.u64 > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)o->via.u64);
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		return json_integer(o->via.i64);
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		return json_real(o->via.f64);
	case MSGPACK_OBJECT_STR:
		return json_stringn_nocheck(o->via.str.ptr, o->via.str.size);
	case MSGPACK_OBJECT_BIN: {
		static const char hex[] = "0123456789abcdef";
		json_t *s;
		char *buf = malloc(2 * (size_t)o->via.bin.size + 1);
		if (buf == NULL)
			return NULL;
		for (uint32_t i = 0; i < o->via.bin.size; i++) {
			buf[2 * i] = hex[(uint8_t)o->via.bin.ptr[i] >> 4];
			buf[2 * i + 1] = hex[(uint8_t)o->via.bin.ptr[i] & 15];
		}
		s = json_stringn(buf, 2 * (size_t)o->via.bin.size);
		free(buf);
		return s;
	}
	case MSGPACK_OBJECT_ARRAY: {
		json_t *a = json_array();
		for (uint32_t i = 0; a && i < o->via.array.size; i++)
			json_array_append_new(a, out_from_msgpack(&o->via.array.ptr[i]));
		return a;
	}
	case MSGPACK_OBJECT_MAP: {
		json_t *m = json_object();
		for (uint32_t i = 0; m && i < o->via.map.size; i++) {
			const msgpack_object *k = &o->via.map.ptr[i].key;
			if (k->type != MSGPACK_OBJECT_STR)
				continue;
			char *key = malloc((size_t)k->via.str.size + 1);
			if (key == NULL)
				continue;
			memcpy(key, k->via.str.ptr, k->via.str.size);
			key[k->via.str.size] = '\0';
			json_object_set_new(m, key, out_from_msgpack(&o->via.map.ptr[i].val));
			free(key);
		}
		return m;
	}
	default:
		return json_null();
	}
}

void out_json(json_t *v)
{
	/* 15 significant digits: 3.07, not 3.0699999999999998. */
	char *s = json_dumps(v, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY |
				JSON_REAL_PRECISION(15));
	if (s != NULL) {
		puts(s);
		free(s);
	}
}

static const char *str(json_t *o, const char *key)
{
	const char *s = json_string_value(json_object_get(o, key));
	return s ? s : "";
}

static long long num(json_t *o, const char *key)
{
	return (long long)json_integer_value(json_object_get(o, key));
}

static void fmt_time(long long t, char *buf, size_t sz)
{
	time_t tt = (time_t)t;
	struct tm tm;
	if (t <= 0 || localtime_r(&tt, &tm) == NULL)
		snprintf(buf, sz, "-");
	else
		strftime(buf, sz, "%Y-%m-%d %H:%M", &tm);
}

/* "12s ago", "5m ago", "3h ago", "2d ago" for a unix-ms time; "never" when unset. */
static void fmt_ago(long long t_ms, char *buf, size_t sz)
{
	long long d;

	if (t_ms <= 0) {
		snprintf(buf, sz, "never");
		return;
	}
	d = ((long long)me_now_ms() - t_ms) / 1000;
	if (d < 0)
		d = 0;
	if (d < 60)
		snprintf(buf, sz, "%llds ago", d);
	else if (d < 3600)
		snprintf(buf, sz, "%lldm ago", d / 60);
	else if (d < 86400)
		snprintf(buf, sz, "%lldh ago", d / 3600);
	else
		snprintf(buf, sz, "%lldd ago", d / 86400);
}

static const char *or_dash(const char *s)
{
	return *s ? s : "-";
}

static void widen(int *w, const char *s)
{
	int l = (int)strlen(s);
	if (l > *w)
		*w = l;
}

void out_bytes(uint64_t n, char *buf, size_t sz)
{
	static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)n;
	int u = 0;

	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, sz, "%llu B", (unsigned long long)n);
	else
		snprintf(buf, sz, "%.1f %s", v, unit[u]);
}

void out_auth(json_t *r)
{
	json_t *created = json_object_get(r, "created");
	if (created == NULL)
		printf("%s\n", str(r, "did"));
	else if (json_is_true(created))
		printf("Created node identity %s\n", str(r, "did"));
	else
		printf("Node identity already exists: %s\n", str(r, "did"));
	const char *note = str(r, "note");
	if (*note)
		printf("%s\n", note);
}

void out_node_status(json_t *r)
{
	json_t *did = json_object_get(r, "did");
	long long up = num(r, "uptime_s");
	printf("Node:         %s\n", json_is_string(did) ? json_string_value(did)
						    : "(no identity: run 'mectl auth init')");
	printf("Alias:        %s\n", str(r, "alias"));
	printf("Addresses:    ");
	json_t *a = json_object_get(r, "addresses");
	for (size_t i = 0; i < json_array_size(a); i++)
		printf("%s%s", i ? ", " : "", json_string_value(json_array_get(a, i)));
	printf("\n");
	printf("Version:      %s\n", str(r, "version"));
	printf("Uptime:       %lldd %02lld:%02lld:%02lld\n", up / 86400, up / 3600 % 24, up / 60 % 60,
	       up % 60);
	printf("Data root:    %s\n", str(r, "root"));
	printf("Repositories: %lld\n", num(r, "repos"));
	printf("Known nodes:  %lld\n", num(r, "nodes"));
	printf("Peers:        %lld\n", num(r, "peers"));
	json_t *g = json_object_get(r, "gossip");
	if (json_is_object(g)) {
		long long rej = 0;
		const char *k;
		json_t *v;
		json_object_foreach(json_object_get(g, "rejected"), k, v)
			rej += (long long)json_integer_value(v);
		printf("Gossip:       %lld received, %lld accepted, %lld duplicates, %lld rejected\n",
		       num(g, "received"), num(g, "accepted"), num(g, "duplicates"), rej);
		json_object_foreach(json_object_get(g, "rejected"), k, v)
			if (json_integer_value(v) > 0)
				printf("  rejected:   %lld %s\n", (long long)json_integer_value(v), k);
	}
	json_t *t = json_object_get(r, "transport");
	if (json_is_object(t)) {
		printf("Transport:    %lld handshakes failed, %lld frames rejected\n",
		       num(t, "handshakes_failed"), num(t, "frames_rejected"));
		printf("Limits:       %lld connections refused, %lld frames rate-limited, "
		       "%lld peers disconnected for misbehaving, %lld refused while banned, "
		       "%lld bans active\n", num(t, "connections_refused"),
		       num(t, "frames_rate_limited"), num(t, "peers_misbehaved"),
		       num(t, "connections_banned"), num(t, "bans_active"));
	}
	json_t *s = json_object_get(r, "sync");
	if (json_is_object(s)) {
		char f[32], sv[32];
		out_bytes((uint64_t)num(s, "bytes_fetched"), f, sizeof(f));
		out_bytes((uint64_t)num(s, "bytes_served"), sv, sizeof(sv));
		printf("Sync:         %lld fetches (%lld failed, %lld bundles rejected), %s fetched; "
		       "%lld served (%lld failed, %lld refused), %s served\n", num(s, "fetches_ok"),
		       num(s, "fetches_failed"), num(s, "rejected_bundles"), f, num(s, "serves_ok"),
		       num(s, "serves_failed"), num(s, "serves_refused"), sv);
	}
}

void out_repo_add(json_t *r)
{
	printf("Added repository %s as %s\n", str(r, "name"), str(r, "id"));
}

/* "you", the creator's alias, else its did:key. */
static const char *creator_label(json_t *repo)
{
	if (json_is_true(json_object_get(repo, "mine")))
		return "you";
	return *str(repo, "creator_alias") ? str(repo, "creator_alias") : str(repo, "creator");
}

/* "up to date", "syncing 42%", "failed: reason"... */
static void fmt_state(json_t *x, char *buf, size_t sz)
{
	const char *st = str(x, "state");
	json_t *p = json_object_get(x, "progress");

	if (strcmp(st, "failed") == 0 && *str(x, "error"))
		snprintf(buf, sz, "failed: %s", str(x, "error"));
	else if (strcmp(st, "syncing") == 0 && json_is_integer(p))
		snprintf(buf, sz, "syncing %lld%%", (long long)json_integer_value(p));
	else
		snprintf(buf, sz, "%s", st);
}

/* Seconds since the Unix time t (seconds), "-" when null or 0. */
static void fmt_ago_s(json_t *t, char *buf, size_t sz)
{
	if (!json_is_integer(t) || json_integer_value(t) <= 0)
		snprintf(buf, sz, "-");
	else
		fmt_ago((long long)json_integer_value(t) * 1000, buf, sz);
}

void out_repo_list(json_t *r)
{
	json_t *repos = json_object_get(r, "repos");
	size_t n = json_array_size(repos);
	int wid = 2, wname = 4, wcre = 7, wst = 5;
	char st[256], ago[32];

	if (n == 0) {
		printf("No repositories. Add one with: mectl repo add --path DIR\n");
		return;
	}
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(repos, i);
		widen(&wid, str(x, "id"));
		widen(&wname, str(x, "name"));
		widen(&wcre, creator_label(x));
		fmt_state(x, st, sizeof(st));
		widen(&wst, st);
	}
	printf("%-*s  %-*s  %-*s  %-*s  %s\n", wid, "ID", wname, "NAME", wcre, "CREATOR", wst,
	       "STATE", "LAST SYNC");
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(repos, i);
		fmt_state(x, st, sizeof(st));
		fmt_ago_s(json_object_get(x, "last_sync"), ago, sizeof(ago));
		printf("%-*s  %-*s  %-*s  %-*s  %s\n", wid, str(x, "id"), wname, str(x, "name"),
		       wcre, creator_label(x), wst, st, ago);
	}
}

void out_repo_sync(json_t *r)
{
	char st[256], ago[32];

	fmt_state(r, st, sizeof(st));
	fmt_ago_s(json_object_get(r, "last_sync"), ago, sizeof(ago));
	printf("%s (%s): %s", str(r, "name"), str(r, "id"), st);
	if (strcmp(ago, "-") != 0)
		printf(", last sync %s", ago);
	printf("\n");
}

void out_repo_clone(json_t *r)
{
	printf("Cloned %s into %s\n", str(r, "name"), str(r, "path"));
	if (json_is_true(json_object_get(r, "head_guessed")))
		printf("Checked out branch %s (the signed HEAD %s names no branch of it; took the "
		       "first by name)\n", str(r, "branch"),
		       *str(r, "signed_head") ? str(r, "signed_head") : "is empty and");
	else
		printf("Checked out branch %s\n", str(r, "branch"));
	printf("%lld branch%s, %lld tag%s; origin is %s\n", num(r, "branches"),
	       num(r, "branches") == 1 ? "" : "es", num(r, "tags"), num(r, "tags") == 1 ? "" : "s",
	       str(r, "source"));
}

void out_repo_pull(json_t *r)
{
	json_t *b = json_object_get(r, "branches");
	int w = 6;

	printf("Pulled into %s from %s\n", str(r, "path"), str(r, "source"));
	for (size_t i = 0; i < json_array_size(b); i++)
		widen(&w, str(json_array_get(b, i), "name"));
	for (size_t i = 0; i < json_array_size(b); i++) {
		json_t *x = json_array_get(b, i);
		const char *st = str(x, "status");
		char o[8], n[8];
		snprintf(o, sizeof(o), "%.7s", str(x, "old"));
		snprintf(n, sizeof(n), "%.7s", str(x, "new"));
		printf("  %-*s  ", w, str(x, "name"));
		if (strcmp(st, "updated") == 0)
			printf("updated %s..%s", o, n);
		else if (strcmp(st, "created") == 0)
			printf("new branch at %s, tracking origin/%s", n, str(x, "name"));
		else if (strcmp(st, "ahead") == 0)
			printf("ahead of origin: left as is");
		else if (strcmp(st, "diverged") == 0)
			printf("diverged: left as is (EDIVERGED)");
		else if (strcmp(st, "dirty") == 0)
			printf("not updated: %s (EDIRTY)", str(x, "message"));
		else if (strcmp(st, "failed") == 0)
			printf("not updated: %s", str(x, "message"));
		else
			printf("%s", st);
		printf("%s\n", json_is_true(json_object_get(x, "checked_out")) ? "  (checked out)" : "");
	}
	if (num(r, "tags_kept") > 0)
		printf("  %lld local tag%s differ%s from origin's: left as %s\n", num(r, "tags_kept"),
		       num(r, "tags_kept") == 1 ? "" : "s", num(r, "tags_kept") == 1 ? "s" : "",
		       num(r, "tags_kept") == 1 ? "it is" : "they are");
}

/* Joins a JSON array of strings with ","; "-" when empty. Caller frees. */
static char *join_addrs(json_t *a)
{
	size_t len = 2, n = json_array_size(a);
	char *buf;

	for (size_t i = 0; i < n; i++) {
		const char *s = json_string_value(json_array_get(a, i));
		len += (s ? strlen(s) : 0) + 1;
	}
	if ((buf = malloc(len)) == NULL)
		return NULL;
	buf[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		const char *s = json_string_value(json_array_get(a, i));
		if (s == NULL || *s == '\0')
			continue;
		if (buf[0] != '\0')
			strcat(buf, ",");
		strcat(buf, s);
	}
	if (buf[0] == '\0')
		strcpy(buf, "-");
	return buf;
}

void out_node_list(json_t *r)
{
	json_t *nodes = json_object_get(r, "nodes");
	size_t n = json_array_size(nodes);
	int wid = 4, wal = 5, wad = 9, wseen = 9;
	char **addrs, t[32];

	if (n == 0) {
		printf("No known nodes.\n");
		return;
	}
	if ((addrs = calloc(n, sizeof(*addrs))) == NULL)
		return;
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(nodes, i);
		addrs[i] = join_addrs(json_object_get(x, "addresses"));
		widen(&wid, str(x, "id"));
		widen(&wal, or_dash(str(x, "alias")));
		widen(&wad, addrs[i] ? addrs[i] : "-");
		fmt_ago(num(x, "last_seen"), t, sizeof(t));
		widen(&wseen, t);
	}
	printf("%-*s  %-*s  %-*s  %-*s  %s\n", wid, "NODE", wal, "ALIAS", wad, "ADDRESSES", wseen,
	       "LAST SEEN", "CONNECTED");
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(nodes, i);
		fmt_ago(num(x, "last_seen"), t, sizeof(t));
		printf("%-*s  %-*s  %-*s  %-*s  %s\n", wid, str(x, "id"), wal, or_dash(str(x, "alias")),
		       wad, addrs[i] ? addrs[i] : "-", wseen, t,
		       json_is_true(json_object_get(x, "connected")) ? "yes" : "no");
		free(addrs[i]);
	}
	free(addrs);
}

void out_peer_list(json_t *r)
{
	json_t *peers = json_object_get(r, "peers");
	size_t n = json_array_size(peers);
	int wdid = 3, wad = 7, wdir = 9, wrtt = 3;
	char t[32], rtt[32];

	if (n == 0) {
		printf("No connected peers.\n");
		return;
	}
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(peers, i);
		widen(&wdid, str(x, "did"));
		widen(&wad, str(x, "address"));
		widen(&wdir, str(x, "direction"));
		snprintf(rtt, sizeof(rtt), "%.1fms", json_number_value(json_object_get(x, "rtt_ms")));
		widen(&wrtt, rtt);
	}
	printf("%-*s  %-*s  %-*s  %-*s  %s\n", wdid, "DID", wad, "ADDRESS", wdir, "DIRECTION", wrtt,
	       "RTT", "SINCE");
	for (size_t i = 0; i < n; i++) {
		json_t *x = json_array_get(peers, i);
		snprintf(rtt, sizeof(rtt), "%.1fms", json_number_value(json_object_get(x, "rtt_ms")));
		fmt_ago(num(x, "since"), t, sizeof(t));
		printf("%-*s  %-*s  %-*s  %-*s  %s\n", wdid, str(x, "did"), wad, str(x, "address"),
		       wdir, str(x, "direction"), wrtt, rtt, t);
	}
}

void out_repo_show(json_t *r)
{
	char c[32], u[32];
	fmt_time(num(r, "created_at"), c, sizeof(c));
	fmt_time(num(r, "updated_at"), u, sizeof(u));
	printf("ID:           %s\n", str(r, "id"));
	printf("Name:         %s\n", str(r, "name"));
	printf("Description:  %s\n", str(r, "description"));
	if (json_is_true(json_object_get(r, "mine")))
		printf("Creator:      %s (you)\n", str(r, "creator"));
	else if (*str(r, "creator_alias"))
		printf("Creator:      %s (%s)\n", str(r, "creator"), str(r, "creator_alias"));
	else
		printf("Creator:      %s\n", str(r, "creator"));
	printf("Path:         %s\n", *str(r, "path") ? str(r, "path") : "-");
	char st[256], ago[32];
	fmt_state(r, st, sizeof(st));
	fmt_ago_s(json_object_get(r, "last_sync"), ago, sizeof(ago));
	printf("State:        %s\n", st);
	if (*str(r, "error") && strncmp(st, "failed", 6) != 0)
		printf("Last error:   %s\n", str(r, "error"));
	printf("Last sync:    %s\n", ago);
	json_t *cl = json_object_get(r, "clones");
	for (size_t i = 0; i < json_array_size(cl); i++)
		printf("Working copy: %s (seq %lld)\n", str(json_array_get(cl, i), "path"),
		       num(json_array_get(cl, i), "seq"));
	printf("Root commit:  %s\n", str(r, "root_commit"));
	printf("HEAD:         %s\n", *str(r, "head") ? str(r, "head") : "(detached)");
	printf("Created:      %s\n", c);
	printf("Updated:      %s\n", u);
	json_t *refs = json_object_get(r, "refs");
	printf("Refs:         %zu\n", json_array_size(refs));
	for (size_t i = 0; i < json_array_size(refs); i++) {
		json_t *x = json_array_get(refs, i);
		printf("  %s  %s\n", str(x, "oid"), str(x, "name"));
	}
}

void out_repo_remove(json_t *r)
{
	printf("Removed repository %s\n", str(r, "removed"));
}
