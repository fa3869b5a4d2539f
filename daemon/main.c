/* megaengined: wires the planes together on one libuv loop. All logic lives in libmedaemon. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <git2.h>
#include <uv.h>

#include "common/err.h"
#include "common/log.h"
#include "daemon/config.h"
#include "daemon/footprint.h"
#include "daemon/control.h"
#include "daemon/gitrepo.h"
#include "daemon/gossip.h"
#include "daemon/sync.h"
#include "daemon/watch.h"
#include "daemon/net.h"
#include "daemon/node.h"
#include "daemon/sdglue.h"
#include "daemon/tls.h"
#include "daemon/verify.h"

#define STATUS_EVERY_MS 5000

static uv_loop_t loop;
static struct tls_ctx *tls;
static int fatal;
static struct me_config cfg; /* the running configuration; SIGHUP updates what it can */
static int main_argc;
static char **main_argv;

/* A working repository of ours has a new signed ref state: announce it at once. */
static void on_watch_changed(void *ud, const char *repo_id)
{
	struct node *n = ud;

	sync_local_changed(n->sync, repo_id); /* drop cached bundles of older states */
	gossip_changed(n->gossip);
}

/* Starts TLS, gossip and QUIC once the node has an identity (at start-up, or when
 * `mectl auth init` creates it). */
static void network_start(struct node *n)
{
	char err[512] = "";
	struct net_callbacks cb;

	if (n->net != NULL || !n->has_key)
		return;
	if (tls_init(&tls, &n->kp, n->cfg->cert_path, err, sizeof(err)) < 0 ||
	    gossip_init(&n->gossip, &loop, n, err, sizeof(err)) < 0 ||
	    sync_init(&n->sync, &loop, n, err, sizeof(err)) < 0)
		goto fail;
	cb = gossip_net_callbacks(n->gossip);
	cb.xfer_accept = sync_xfer_accept;
	cb.xfer_ud = n->sync;
	if (net_init(&n->net, &loop, &n->kp, tls, n->cfg->addrs, n->cfg->naddrs, &cb, err,
		     sizeof(err)) < 0)
		goto fail;
	gossip_start(n->gossip, n->net);
	sync_start(n->sync, n->net);
	if (watch_init(&n->watch, &loop, n, on_watch_changed, n, err, sizeof(err)) < 0)
		goto fail;
	watch_sync_all(n->watch);
	for (size_t i = 0; i < n->cfg->naddrs; i++)
		log_info("listening on %s (QUIC)", n->cfg->addrs[i].text);
	return;
fail:
	log_err("network not started: %s", err);
	watch_free(n->watch);
	n->watch = NULL;
	sync_free(n->sync);
	n->sync = NULL;
	gossip_free(n->gossip);
	n->gossip = NULL;
	fatal = 1;
	uv_stop(&loop);
}

/* systemd's STATUS= line: "N peers, M repositories, K transfers". */
static void status_text(struct node *n, char *out, size_t outsz)
{
	int64_t nrepos = 0;

	if (store_repo_count(n->store, &nrepos) < 0)
		nrepos = 0;
	snprintf(out, outsz, "%s%zu peers, %lld repositories, %zu transfers",
		 n->has_key ? "" : "No identity yet (run 'mectl auth init'); ",
		 n->net != NULL ? net_npeers(n->net) : (size_t)0, (long long)nrepos,
		 sync_ntransfers(n->sync));
}

static void on_status_timer(uv_timer_t *t)
{
	char st[256];
	status_text(t->data, st, sizeof(st));
	sdglue_status(st);
}

static void on_watchdog_timer(uv_timer_t *t)
{
	(void)t;
	sdglue_watchdog();
}

static void on_signal(uv_signal_t *h, int signum)
{
	log_notice("received %s, shutting down", signum == SIGINT ? "SIGINT" : "SIGTERM");
	sdglue_stopping();
	uv_stop(h->loop);
}

/* SIGHUP: re-reads the configuration (same command line and environment, the file again) and
 * applies what can change while running; the rest is named in a warning. */
static void on_sighup(uv_signal_t *h, int signum)
{
	static struct me_config next;
	struct node *n = h->data;
	char err[1024], changed[256], restart[256], st[256];
	(void)signum;

	sdglue_reloading();
	log_notice("received SIGHUP, reloading the configuration%s%s",
		   cfg.config_path[0] ? " from " : " (no configuration file)", cfg.config_path);
	if (me_config_load(&next, main_argc, main_argv, err, sizeof(err)) != ME_CONFIG_OK) {
		const char *f[] = { ME_MSGID_RELOAD_FAILED, NULL };
		me_log_fields(LOG_ERR, f, "reload failed, the running configuration is unchanged: %s",
			      err);
	} else {
		me_config_diff(&cfg, &next, 0, changed, sizeof(changed));
		me_config_diff(&cfg, &next, 1, restart, sizeof(restart));
		memcpy(cfg.alias, next.alias, sizeof(cfg.alias));
		memcpy(cfg.announce, next.announce, sizeof(cfg.announce));
		cfg.nannounce = next.nannounce;
		cfg.gossip_interval_ms = next.gossip_interval_ms;
		cfg.max_outbound = next.max_outbound;
		cfg.max_repo_size = next.max_repo_size;
		cfg.log_level = next.log_level;
		memcpy(cfg.config_path, next.config_path, sizeof(cfg.config_path));
		me_log_set_level(cfg.log_level);
		const char *f[] = { ME_MSGID_RELOADED, NULL };
		me_log_fields(LOG_NOTICE, f, "configuration reloaded%s%s", changed[0] ? "; applied: " :
			      "; nothing to apply", changed);
		if (restart[0] != '\0')
			log_warn("changed configuration keys that take effect only after a restart: %s",
				 restart);
		if (changed[0] != '\0')
			gossip_changed(n->gossip); /* announce the new alias/addresses now */
	}
	status_text(n, st, sizeof(st));
	sdglue_ready(st);
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int main(int argc, char **argv)
{
	struct node node;
	struct control *ctl = NULL;
	uv_signal_t sigint, sigterm, sighup;
	uv_timer_t status_timer, watchdog_timer;
	char err[1024] = "", st[256];
	int rc, status = EXIT_FAILURE;
	uint64_t wd_usec;

	/* The bundle verifier (daemon/verify.c): a fresh exec of this binary, before anything. */
	if (argc == 2 && strcmp(argv[1], VERIFY_ARG) == 0)
		return verify_main(argc, argv);
	main_argc = argc;
	main_argv = argv;
	rc = me_config_load(&cfg, argc, argv, err, sizeof(err));
	if (rc == ME_CONFIG_EXIT)
		return EXIT_SUCCESS;
	if (rc < 0) {
		fprintf(stderr, "megaengined: %s\n", err);
		return 2;
	}
	/* libuv's pool (4 threads by default) runs bundle builds and verifications, and a
	 * verification holds its thread for the whole transfer it follows: room for
	 * SYNC_MAX_FETCHES of those and as many other jobs. An administrator's setting stays. */
	{
		char n[16];
		snprintf(n, sizeof(n), "%d", 2 * SYNC_MAX_FETCHES);
		setenv("UV_THREADPOOL_SIZE", n, 0);
	}
	me_log_init("megaengined");
	me_log_set_journal(sdglue_journal_sendv);
	me_log_set_level(cfg.log_level);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	gitrepo_global_init();
	/* libgit2's object cache keeps up to 256 MiB of parsed objects for the life of the
	 * process, and our walks read each object once: building the complete bundle of a
	 * 421k-object repository left 434 MiB resident (600 MiB at peak) with it, 79 MiB (246)
	 * without, and took 4.1 s instead of 2.6 s. */
	git_libgit2_opts(GIT_OPT_ENABLE_CACHING, 0);
	/* libgit2's start-up (libssh2 initialising OpenSSL) touched ~3 MiB that is never used
	 * again: give it back now, so that it does not count in the peak either. */
	footprint_trim();

	if (node_init(&node, &cfg, err, sizeof(err)) < 0) {
		log_err("%s", err);
		node_free(&node);
		gitrepo_global_free();
		return EXIT_FAILURE;
	}
	uv_loop_init(&loop);
	/* Signals first: a SIGTERM that arrives while we start up is a clean stop too. */
	uv_signal_init(&loop, &sigint);
	uv_signal_init(&loop, &sigterm);
	uv_signal_init(&loop, &sighup);
	sighup.data = &node;
	uv_signal_start(&sigint, on_signal, SIGINT);
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	uv_signal_start(&sighup, on_sighup, SIGHUP);
	uv_timer_init(&loop, &status_timer);
	uv_timer_init(&loop, &watchdog_timer);
	status_timer.data = &node;
	if (control_init(&ctl, &loop, &node, sdglue_control_fd(), err, sizeof(err)) < 0) {
		log_err("%s", err);
		goto out;
	}
	node.identity_ready = network_start;
	network_start(&node);
	if (fatal)
		goto out;

	/* Ready: the control socket and (with an identity) the QUIC ports listen. */
	char f_did[ME_DID_KEY_SIZE + 16];
	snprintf(f_did, sizeof(f_did), "NODE_DID=%s", node.has_key ? node.kp.did : "");
	const char *f_start[] = { ME_MSGID_STARTED, node.has_key ? f_did : NULL, NULL };
	if (node.has_key)
		me_log_fields(LOG_NOTICE, f_start, "megaengined %s started: %s (%s), root %s, "
			      "control socket %s", ME_VERSION, node.kp.did, cfg.alias, cfg.root,
			      cfg.socket_path);
	else
		me_log_fields(LOG_NOTICE, f_start, "megaengined %s started without an identity (run "
			      "'mectl auth init'), root %s, control socket %s", ME_VERSION, cfg.root,
			      cfg.socket_path);
	status_text(&node, st, sizeof(st));
	sdglue_ready(st);
	footprint_trim();
	uv_timer_start(&status_timer, on_status_timer, STATUS_EVERY_MS, STATUS_EVERY_MS);
	if ((wd_usec = sdglue_watchdog_usec()) > 0) {
		uint64_t ms = wd_usec / 2000;
		uv_timer_start(&watchdog_timer, on_watchdog_timer, ms ? ms : 1, ms ? ms : 1);
		log_info("systemd watchdog: pinging every %llu ms", (unsigned long long)(ms ? ms : 1));
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	sdglue_stopping();
	status = fatal ? EXIT_FAILURE : EXIT_SUCCESS;

out:
	uv_close((uv_handle_t *)&sigint, NULL);
	uv_close((uv_handle_t *)&sigterm, NULL);
	uv_close((uv_handle_t *)&sighup, NULL);
	uv_close((uv_handle_t *)&status_timer, NULL);
	uv_close((uv_handle_t *)&watchdog_timer, NULL);
	control_free(ctl);
	watch_free(node.watch);
	node.watch = NULL;
	sync_free(node.sync); /* before the network: it cancels its transfers */
	node.sync = NULL;
	net_free(node.net);
	gossip_free(node.gossip);
	node.net = NULL;
	node.gossip = NULL;
	uv_run(&loop, UV_RUN_DEFAULT); /* let close callbacks release memory */
	tls_free(tls);
	if (uv_loop_close(&loop) != 0)
		log_warn("event loop closed with handles still open");
	node_free(&node);
	gitrepo_global_free();
	const char *f_stop[] = { ME_MSGID_STOPPED, NULL };
	me_log_fields(LOG_NOTICE, f_stop, "megaengined stopped%s",
		      status == EXIT_SUCCESS ? "" : " after an error");
	return status;
}
