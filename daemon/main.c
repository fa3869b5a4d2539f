/* megaengined: wires the planes together on one libuv loop. All logic lives in libmedaemon. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <uv.h>

#include "common/err.h"
#include "common/log.h"
#include "daemon/config.h"
#include "daemon/control.h"
#include "daemon/gitrepo.h"
#include "daemon/gossip.h"
#include "daemon/net.h"
#include "daemon/node.h"
#include "daemon/sdglue.h"
#include "daemon/tls.h"

static uv_loop_t loop;
static struct tls_ctx *tls;
static int fatal;

/* Starts TLS, gossip and QUIC once the node has an identity (at start-up, or when
 * `mectl auth init` creates it). */
static void network_start(struct node *n)
{
	char err[512] = "";
	struct net_callbacks cb;

	if (n->net != NULL || !n->has_key)
		return;
	if (tls_init(&tls, &n->kp, n->cfg->cert_path, err, sizeof(err)) < 0 ||
	    gossip_init(&n->gossip, &loop, n, err, sizeof(err)) < 0)
		goto fail;
	cb = gossip_net_callbacks(n->gossip);
	if (net_init(&n->net, &loop, &n->kp, tls, n->cfg->addrs, n->cfg->naddrs, &cb, err,
		     sizeof(err)) < 0)
		goto fail;
	gossip_start(n->gossip, n->net);
	for (size_t i = 0; i < n->cfg->naddrs; i++)
		log_info("listening on %s (QUIC)", n->cfg->addrs[i].text);
	return;
fail:
	log_err("network not started: %s", err);
	gossip_free(n->gossip);
	n->gossip = NULL;
	fatal = 1;
	uv_stop(&loop);
}

static void on_signal(uv_signal_t *h, int signum)
{
	log_notice("received %s, shutting down", signum == SIGINT ? "SIGINT" : "SIGTERM");
	uv_stop(h->loop);
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
	static struct me_config cfg;
	struct node node;
	struct control *ctl = NULL;
	uv_signal_t sigint, sigterm;
	char err[1024] = "";
	int rc, status = EXIT_FAILURE;

	rc = me_config_load(&cfg, argc, argv, err, sizeof(err));
	if (rc == ME_CONFIG_EXIT)
		return EXIT_SUCCESS;
	if (rc < 0) {
		fprintf(stderr, "megaengined: %s\n", err);
		return 2;
	}
	me_log_init("megaengined");
	me_log_set_level(cfg.log_level);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile();
	gitrepo_global_init();

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
	uv_signal_start(&sigint, on_signal, SIGINT);
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	if (control_init(&ctl, &loop, &node, sdglue_control_fd(), err, sizeof(err)) < 0) {
		log_err("%s", err);
		goto out;
	}
	node.identity_ready = network_start;
	network_start(&node);

	if (node.has_key)
		log_notice("megaengined %s started: %s (%s), root %s, control socket %s", ME_VERSION,
			   node.kp.did, cfg.alias, cfg.root, cfg.socket_path);
	else
		log_notice("megaengined %s started without an identity (run 'mectl auth init'), "
			   "root %s, control socket %s", ME_VERSION, cfg.root, cfg.socket_path);
	sdglue_ready(node.has_key ? "Running" : "Running without identity: run 'mectl auth init'");
	uv_run(&loop, UV_RUN_DEFAULT);
	sdglue_stopping();
	status = fatal ? EXIT_FAILURE : EXIT_SUCCESS;

out:
	uv_close((uv_handle_t *)&sigint, NULL);
	uv_close((uv_handle_t *)&sigterm, NULL);
	control_free(ctl);
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
	log_info("stopped");
	return status;
}
