/* All systemd glue: readiness and status notifications and socket activation. Each call is a
 * no-op when the daemon does not run under systemd. */
#ifndef ME_SDGLUE_H
#define ME_SDGLUE_H

/* Returns the activated control socket's fd, or -1 when there is none. */
int sdglue_control_fd(void);
void sdglue_ready(const char *status);
void sdglue_stopping(void);
void sdglue_status(const char *status);

#endif
