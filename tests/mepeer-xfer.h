/* Internals of me-peer's transfer streams, shared by mepeer-xfer.c (state, options, our
 * repository, announcing, relaying, the app's hooks), mepeer-fetch.c (requesting) and
 * mepeer-serve.c (serving, honestly or not). See mepeer-xfer.c for what they do. */
#ifndef ME_MEPEER_XFER_H
#define ME_MEPEER_XFER_H

#include <limits.h>
#include <stdint.h>
#include <stdio.h>

#include <git2.h>

#include "common/gossip_msg.h"
#include "common/sha3.h"
#include "tests/mepeer.h"

#define CHUNK XMSG_MAX_DATA
#define PUMP_AHEAD (1u << 20)
#define GARBAGE_LEN 4096
#define TRAVERSAL_ID "did:repo:../../x"
#define MAX_MODES 16

struct serve_mode;

/* ---- state ---- */

/* A ref state with memory of its own. */
struct rs_own {
	struct gmsg_refstate rs;
	char *mem;
};

#define XFETCH_MAX_BUNDLES 80 /* a series starts over after 64 */

/* One bundle of a transfer's series. */
struct xbundle {
	uint64_t total, offset, seq;
	size_t nrefs;
	uint8_t digest[XMSG_DIGEST_LEN];
	int ok; /* size and digest as announced */
};

struct xfetch {
	struct app *a;
	struct net_xfer *x;
	int idx, relay, used;
	int phase; /* 0: before a Start, 1: data, 2: after a Done (another Start may follow) */
	int fd;
	char base[PATH_MAX - 16]; /* bundle k goes to base (k = 0) or base.bk */
	char path[PATH_MAX]; /* the current one */
	struct xbundle b[XFETCH_MAX_BUNDLES];
	unsigned nbundles;
	uint64_t received; /* data bytes, all bundles */
	struct me_sha3 *h;
	uint64_t total, offset, pos, bytes_in;
	uint8_t digest[XMSG_DIGEST_LEN], computed[XMSG_DIGEST_LEN];
	int has_start, has_done, digest_ok, sig_ok, id_ok, has_error, closed;
	uint64_t seq;
	size_t nrefs;
	char creator[ME_DID_KEY_SIZE];
	char file_name[XMSG_MAX_FILENAME + 1];
	int64_t code;
	char message[XMSG_MAX_ERRMSG + 1];
	char note[160]; /* the first oddity seen */
	unsigned frames;
};

struct xserve {
	struct app *a;
	struct net_xfer *x;
	const struct serve_mode *mode;
	char peer_did[ME_DID_KEY_SIZE];
	int got_request, finished, send_done;
	uint8_t *buf;
	size_t len;
	uint64_t pos, end;
	uint8_t done_digest[XMSG_DIGEST_LEN];
	uint8_t *again; /* a Start to send again after the first Done (repeat) */
	size_t again_len;
	uv_timer_t trickle;
	int timer_on;
	struct xserve *next;
};

struct xstate {
	/* the repository we hold */
	int have_repo;
	char id[ME_DID_REPO_SIZE];
	char name[GMSG_MAX_NAME + 1];
	char desc[GMSG_MAX_DESC + 1];
	uint8_t creator_pk[ME_PK_LEN];
	struct rs_own rs;
	git_repository *repo;       /* creator mode */
	uint8_t relay_src[ME_PK_LEN];
	int relay_fetching, relay_ready;
	uint8_t *relay_buf;         /* relay mode: the bundle fetched from the source */
	size_t relay_len;
	/* a bundle built for one set of haves, kept for a resume */
	uint8_t cache_key[32];
	uint8_t *cache_buf;
	size_t cache_len;
	/* serve modes by generation */
	const struct serve_mode *mode_list[MAX_MODES];
	size_t nmodes;
	unsigned generation;
	/* a random key and another repository id, for the forgeries */
	struct me_keypair other;
	char other_id[ME_DID_REPO_SIZE];
	uint64_t last_ts;
	/* streams */
	struct xfetch fetches[MEPEER_MAX_STREAMS + 1]; /* the last one: the relay fetch */
	unsigned nfetch, nfetch_closed;
	struct xserve *serves;
	size_t nserves;
	unsigned served;
};

/* ---- mepeer-xfer.c ---- */
void mx_hex(const uint8_t *p, size_t n, char *out);
void mx_json_str(FILE *f, const char *s);
void mx_rs_own_free(struct rs_own *o);
int mx_rs_own_set(struct rs_own *o, const struct gmsg_refstate *rs);
/* Timestamps of our envelopes: strictly increasing, so none is "older than the newest". */
uint64_t mx_next_ts(struct xstate *xs);
/* Queues sb's bytes (in pieces when a frame is larger than the transport takes whole) and
 * empties sb. */
int mx_send_sb(struct net_xfer *x, msgpack_sbuffer *sb);
/* One frame of GARBAGE_LEN bytes whose body is never valid msgpack. */
int mx_put_garbage(msgpack_sbuffer *sb);
int mx_ready_to_serve(const struct app *a);
void mx_announce_all(struct app *a);
/* The relay fetch f finished with a good bundle: load it and announce. */
void mx_relay_loaded(struct app *a, struct xfetch *f);

/* ---- mepeer-fetch.c ---- */
void mx_fetch_usage(FILE *f);
/* Opens stream idx to p: a requested one (idx < MEPEER_MAX_STREAMS) or the relay fetch. */
void mx_fetch_open(struct app *a, struct peer *p, unsigned idx, int relay);
/* The stream's JSON line. */
void mx_fetch_json(struct xfetch *f, uint64_t app_error, const char *why);

/* ---- mepeer-serve.c ---- */
void mx_serve_usage(FILE *f);
const char *mx_mode_name(const struct serve_mode *m);
/* The mode the current generation is served with. */
const struct serve_mode *mx_current_mode(const struct app *a);
void mx_serve_free(struct xserve *sv);

#endif
