/* libsystemd is loaded at run time (dlopen), not linked: without it, or without systemd, every
 * call here is a no-op and the daemon runs in the foreground logging to stderr. */
#include "daemon/sdglue.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "common/log.h"

static struct {
	int loaded; /* 1: tried */
	int (*notify)(int unset_environment, const char *state);
	int (*listen_fds)(int unset_environment);
	int (*is_socket_unix)(int fd, int type, int listening, const char *path, size_t length);
	int (*watchdog_enabled)(int unset_environment, uint64_t *usec);
	int (*journal_sendv)(const struct iovec *iov, int n);
} sd;

static void sd_load(void)
{
	void *h;

	if (sd.loaded)
		return;
	sd.loaded = 1;
	/* Only a process systemd started has anything to talk to: the library and its
	 * dependencies (about 1 MB of resident pages) are not loaded otherwise. */
	if (getenv("NOTIFY_SOCKET") == NULL && getenv("LISTEN_FDS") == NULL &&
	    getenv("JOURNAL_STREAM") == NULL && getenv("WATCHDOG_USEC") == NULL)
		return;
	h = dlopen("libsystemd.so.0", RTLD_NOW | RTLD_LOCAL);
	if (h == NULL)
		return;
	*(void **)&sd.notify = dlsym(h, "sd_notify");
	*(void **)&sd.listen_fds = dlsym(h, "sd_listen_fds");
	*(void **)&sd.is_socket_unix = dlsym(h, "sd_is_socket_unix");
	*(void **)&sd.watchdog_enabled = dlsym(h, "sd_watchdog_enabled");
	*(void **)&sd.journal_sendv = dlsym(h, "sd_journal_sendv");
	/* h stays open for the life of the process. */
}

static void notifyf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notifyf(const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	sd_load();
	if (sd.notify == NULL)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	sd.notify(0, buf);
}

int sdglue_journal_sendv(const struct iovec *iov, int n)
{
	sd_load();
	return sd.journal_sendv != NULL ? sd.journal_sendv(iov, n) : -1;
}

int sdglue_control_fd(void)
{
	sd_load();
	int n = sd.listen_fds != NULL ? sd.listen_fds(1) : 0;
	if (n <= 0)
		return -1;
	if (n > 1)
		log_warn("systemd passed %d sockets; using the first as the control socket", n);
	if (sd.is_socket_unix == NULL ||
	    sd.is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0) {
		log_warn("the activated socket is not a listening Unix stream socket; ignoring it");
		return -1;
	}
	return SD_LISTEN_FDS_START;
}

void sdglue_ready(const char *status)
{
	notifyf("READY=1\nSTATUS=%s", status);
}

void sdglue_reloading(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	notifyf("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=Reloading the configuration",
		(unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000);
}

void sdglue_stopping(void)
{
	static int sent;

	if (!sent)
		notifyf("STOPPING=1\nSTATUS=Shutting down");
	sent = 1;
}

void sdglue_status(const char *status)
{
	notifyf("STATUS=%s", status);
}

uint64_t sdglue_watchdog_usec(void)
{
	uint64_t usec = 0;

	sd_load();
	if (sd.watchdog_enabled == NULL || sd.watchdog_enabled(0, &usec) <= 0)
		return 0;
	return usec;
}

void sdglue_watchdog(void)
{
	notifyf("WATCHDOG=1");
}
