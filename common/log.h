/* One log idiom: journald with structured fields when stderr is connected to the journal (and
 * a journal sender is set: me_log_set_journal), otherwise "LEVEL: message [KEY=value ...]" lines on stderr. Library code does not log;
 * callers log once. */
#ifndef ME_LOG_H
#define ME_LOG_H

#include <syslog.h>

#include "common/msgids.h" /* MESSAGE_ID= fields of the key events */

struct iovec;

/* Sends one structured entry to the journal (sd_journal_sendv's contract); < 0 on failure. */
typedef int (*me_log_journal_fn)(const struct iovec *iov, int n);

/* Levels are syslog priorities: LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG. */
void me_log_init(const char *ident);
/* Where journal entries go when stderr is the journal (the daemon passes sdglue's sender);
 * without one, or when it fails, lines go to stderr. */
void me_log_set_journal(me_log_journal_fn fn);
void me_log_set_level(int prio);
int me_log_get_level(void);
/* Parses "error", "warning", "notice", "info", "debug" (or a digit 0-7); -1 when unknown. */
int me_log_parse_level(const char *s);

/* Structured log line. fields is a NULL-terminated list of "KEY=value" strings (may be NULL). */
void me_log_fields(int prio, const char *const *fields, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#define me_log(prio, ...) me_log_fields((prio), NULL, __VA_ARGS__)
#define log_err(...) me_log(LOG_ERR, __VA_ARGS__)
#define log_warn(...) me_log(LOG_WARNING, __VA_ARGS__)
#define log_notice(...) me_log(LOG_NOTICE, __VA_ARGS__)
#define log_info(...) me_log(LOG_INFO, __VA_ARGS__)
#define log_debug(...) me_log(LOG_DEBUG, __VA_ARGS__)

#endif
