#include "daemon/sdglue.h"

#include <stdio.h>

#include <systemd/sd-daemon.h>

#include "common/log.h"

int sdglue_control_fd(void)
{
	int n = sd_listen_fds(1);
	if (n <= 0)
		return -1;
	if (n > 1)
		log_warn("systemd passed %d sockets; using the first as the control socket", n);
	if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0) {
		log_warn("the activated socket is not a listening Unix stream socket; ignoring it");
		return -1;
	}
	return SD_LISTEN_FDS_START;
}

void sdglue_ready(const char *status)
{
	sd_notifyf(0, "READY=1\nSTATUS=%s", status);
}

void sdglue_stopping(void)
{
	sd_notify(0, "STOPPING=1\nSTATUS=Shutting down");
}

void sdglue_status(const char *status)
{
	sd_notifyf(0, "STATUS=%s", status);
}
