/* daemon/config.c: the configuration file (libinih) under the flags and the environment, its
 * errors with FILE:LINE, and me_config_diff (what SIGHUP can apply). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "daemon/config.h"

static char conf_path[64];

static void write_conf(const char *text)
{
	FILE *f = fopen(conf_path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

/* Loads with argv = { "megaengined", args..., NULL }. */
static int load(struct me_config *cfg, char *err, size_t errsz, ...)
{
	char *argv[32] = { "megaengined" };
	int argc = 1;
	va_list ap;

	va_start(ap, errsz);
	while ((argv[argc] = va_arg(ap, char *)) != NULL)
		argc++;
	va_end(ap);
	err[0] = '\0';
	return me_config_load(cfg, argc, argv, err, errsz);
}

static int setup(void **state)
{
	(void)state;
	int fd;
	snprintf(conf_path, sizeof(conf_path), "/tmp/me-test-config-XXXXXX");
	fd = mkstemp(conf_path);
	assert_true(fd >= 0);
	close(fd);
	unsetenv("MEGAENGINE_ROOT");
	unsetenv("MEGAENGINE_LOG");
	unsetenv("MEGAENGINE_CONFIG");
	setenv("HOME", "/tmp/me-test-home", 1);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	unlink(conf_path);
	unsetenv("MEGAENGINE_ROOT");
	unsetenv("MEGAENGINE_LOG");
	unsetenv("MEGAENGINE_CONFIG");
	return 0;
}

static void test_defaults(void **state)
{
	static struct me_config cfg;
	char err[512];
	(void)state;

	assert_int_equal(load(&cfg, err, sizeof(err), "--config", "/dev/null", NULL), ME_CONFIG_OK);
	assert_string_equal(cfg.root, "/tmp/me-test-home/.megaengine");
	assert_string_equal(cfg.config_path, "/dev/null");
	assert_int_equal(cfg.naddrs, 1);
	assert_string_equal(cfg.addrs[0].text, "0.0.0.0:9000");
	assert_int_equal(cfg.gossip_interval_ms, ME_GOSSIP_INTERVAL_MS);
	assert_int_equal(cfg.max_outbound, ME_MAX_OUTBOUND);
	assert_int_equal(cfg.log_level, LOG_INFO);
	assert_string_equal(cfg.cert_path, "/tmp/me-test-home/.megaengine/certs");
	assert_string_equal(cfg.socket_path, "/tmp/me-test-home/.megaengine/megaengined.sock");
	assert_true(cfg.alias[0] != '\0');
}

static void test_file_values(void **state)
{
	static struct me_config cfg;
	char err[512];
	(void)state;

	write_conf("\xef\xbb\xbf# BOM, then a comment\n"
		   "root = /srv/me\n"
		   "alias = node-a ; comment\n"
		   "addr = 127.0.0.1:9001\n"
		   "   addr = [::1]:9002\n"
		   "bootstrap-node = did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK@192.0.2.1:9000\n"
		   "announce-addr = 192.0.2.7:9001\n"
		   "gossip-interval = 30\n"
		   "max-outbound = 0\n"
		   "cert-path = /srv/certs\n"
		   "socket = /run/me.sock\n"
		   "socket-group = staff\n"
		   "log-level = warning\n");
	assert_int_equal(load(&cfg, err, sizeof(err), "--config", conf_path, NULL), ME_CONFIG_OK);
	assert_string_equal(cfg.root, "/srv/me");
	assert_string_equal(cfg.alias, "node-a");
	assert_int_equal(cfg.naddrs, 2);
	assert_string_equal(cfg.addrs[0].text, "127.0.0.1:9001");
	assert_string_equal(cfg.addrs[1].text, "[::1]:9002");
	assert_int_equal(cfg.nboots, 1);
	assert_string_equal(cfg.boots[0].addr.text, "192.0.2.1:9000");
	assert_int_equal(cfg.nannounce, 1);
	assert_int_equal(cfg.gossip_interval_ms, 30000);
	assert_int_equal(cfg.max_outbound, 0);
	assert_string_equal(cfg.cert_path, "/srv/certs");
	assert_string_equal(cfg.socket_path, "/run/me.sock");
	assert_string_equal(cfg.socket_group, "staff");
	assert_int_equal(cfg.log_level, LOG_WARNING);
}

static void test_precedence(void **state)
{
	static struct me_config cfg;
	char err[512];
	(void)state;

	write_conf("root = /from/file\nalias = file\nlog-level = error\naddr = 127.0.0.1:1\n"
		   "addr = 127.0.0.1:2\n");
	setenv("MEGAENGINE_CONFIG", conf_path, 1);
	assert_int_equal(load(&cfg, err, sizeof(err), NULL), ME_CONFIG_OK);
	assert_string_equal(cfg.root, "/from/file");
	assert_int_equal(cfg.log_level, LOG_ERR);
	assert_int_equal(cfg.naddrs, 2);

	setenv("MEGAENGINE_ROOT", "/from/env", 1);
	setenv("MEGAENGINE_LOG", "debug", 1);
	assert_int_equal(load(&cfg, err, sizeof(err), NULL), ME_CONFIG_OK);
	assert_string_equal(cfg.root, "/from/env");
	assert_int_equal(cfg.log_level, LOG_DEBUG);
	assert_string_equal(cfg.alias, "file");

	assert_int_equal(load(&cfg, err, sizeof(err), "--root", "/from/flag", "--log-level",
			      "notice", "--alias", "flag", "--addr", "127.0.0.1:3", NULL),
			 ME_CONFIG_OK);
	assert_string_equal(cfg.root, "/from/flag");
	assert_int_equal(cfg.log_level, LOG_NOTICE);
	assert_string_equal(cfg.alias, "flag");
	/* A repeatable flag replaces the file's list. */
	assert_int_equal(cfg.naddrs, 1);
	assert_string_equal(cfg.addrs[0].text, "127.0.0.1:3");

	/* --config over $MEGAENGINE_CONFIG */
	assert_int_equal(load(&cfg, err, sizeof(err), "-c", "/dev/null", NULL), ME_CONFIG_OK);
	assert_string_not_equal(cfg.alias, "file"); /* the hostname, not the file's */
	assert_int_equal(cfg.naddrs, 1);
	assert_string_equal(cfg.addrs[0].text, "0.0.0.0:9000");
}

static void expect_file_error(const char *text, const char *where, const char *needle)
{
	static struct me_config cfg;
	char err[512], prefix[128];

	write_conf(text);
	assert_int_equal(load(&cfg, err, sizeof(err), "--config", conf_path, NULL), ME_EINVAL);
	snprintf(prefix, sizeof(prefix), "%s:%s: ", conf_path, where);
	if (strncmp(err, prefix, strlen(prefix)) != 0 || strstr(err, needle) == NULL)
		fail_msg("for %s expected '%s...%s', got '%s'", text, prefix, needle, err);
}

static void test_file_errors(void **state)
{
	(void)state;
	expect_file_error("alias = a\nfoo = 1\n", "2", "unknown key 'foo'");
	expect_file_error("\n\n\ngossip-interval = 0\n", "4", "invalid gossip-interval '0'");
	expect_file_error("max-outbound = 1x\n", "1", "invalid max-outbound");
	expect_file_error("log-level = chatty\n", "1", "log level must be");
	expect_file_error("addr = 1.2.3.4:99999\n", "1", "invalid addr");
	expect_file_error("root = rel\n", "1", "absolute path");
	expect_file_error("alias = a\n\nalias = b\n", "3", "given twice (first on line 1)");
	expect_file_error("[section]\n", "1", "section");
	expect_file_error("just words\n", "1", "syntax error");
	expect_file_error("addr = 127.0.0.1:1\naddr = 127.0.0.1:2\naddr = 127.0.0.1:3\n"
			  "addr = 127.0.0.1:4\naddr = 127.0.0.1:5\naddr = 127.0.0.1:6\n"
			  "addr = 127.0.0.1:7\naddr = 127.0.0.1:8\naddr = 127.0.0.1:9\n", "9",
			  "too many");
	/* The first error is the one reported. */
	expect_file_error("x = 1\ny = 2\n", "1", "unknown key 'x'");
}

static void test_diff(void **state)
{
	static struct me_config a, b;
	char err[512], out[256];
	(void)state;

	write_conf("alias = one\n");
	assert_int_equal(load(&a, err, sizeof(err), "--config", conf_path, NULL), ME_CONFIG_OK);
	me_config_diff(&a, &a, 0, out, sizeof(out));
	assert_string_equal(out, "");
	write_conf("alias = two\nlog-level = debug\naddr = 127.0.0.1:5\ncert-path = /x\n"
		   "announce-addr = 192.0.2.1:1\n");
	assert_int_equal(load(&b, err, sizeof(err), "--config", conf_path, NULL), ME_CONFIG_OK);
	me_config_diff(&a, &b, 0, out, sizeof(out));
	assert_string_equal(out, "alias, announce-addr, log-level");
	me_config_diff(&a, &b, 1, out, sizeof(out));
	assert_string_equal(out, "addr, cert-path");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
		cmocka_unit_test_setup_teardown(test_file_values, setup, teardown),
		cmocka_unit_test_setup_teardown(test_precedence, setup, teardown),
		cmocka_unit_test_setup_teardown(test_file_errors, setup, teardown),
		cmocka_unit_test_setup_teardown(test_diff, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
