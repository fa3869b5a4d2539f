/* All systemd glue: readiness, reload, stop and status notifications, the watchdog, socket
 * activation (sd-daemon(3)) and the journal sender for common/log.c. libsystemd is loaded at
 * run time; each call is a no-op when it is absent or the daemon does not run under systemd
 * (no $NOTIFY_SOCKET, $WATCHDOG_USEC or $LISTEN_FDS for this process). */
#ifndef ME_SDGLUE_H
#define ME_SDGLUE_H

#include <stdint.h>

struct iovec;

/* Returns the activated control socket's fd, or -1 when there is none. */
int sdglue_control_fd(void);
void sdglue_ready(const char *status);
/* RELOADING=1 (with MONOTONIC_USEC=, as systemd >= 253 wants it); READY=1 ends the reload. */
void sdglue_reloading(void);
void sdglue_stopping(void); /* once; later calls do nothing */
void sdglue_status(const char *status);
/* The watchdog period systemd expects pings within (WatchdogSec=), in microseconds; 0 when
 * there is no watchdog for this process. */
uint64_t sdglue_watchdog_usec(void);
void sdglue_watchdog(void);
/* sd_journal_sendv, for me_log_set_journal(); -1 without libsystemd. */
int sdglue_journal_sendv(const struct iovec *iov, int n);

#endif
