#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define LOG_MSG_MAX 2048
#define LOG_FIELDS_MAX 16

static int log_level = LOG_INFO;
static int log_journal = 0;
static const char *log_ident = "megaengine";
static me_log_journal_fn log_journal_fn;

static const char *const level_names[] = {
	[LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
	[LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

/* stderr goes to the journal when JOURNAL_STREAM names the device:inode of fd 2. */
static int stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2)
		return 0;
	if (fstat(STDERR_FILENO, &st) < 0)
		return 0;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void me_log_init(const char *ident)
{
	if (ident != NULL)
		log_ident = ident;
	log_journal = stderr_is_journal();
}

void me_log_set_journal(me_log_journal_fn fn)
{
	log_journal_fn = fn;
}

void me_log_set_level(int prio)
{
	if (prio >= LOG_EMERG && prio <= LOG_DEBUG)
		log_level = prio;
}

int me_log_get_level(void)
{
	return log_level;
}

int me_log_parse_level(const char *s)
{
	if (s == NULL || *s == '\0')
		return -1;
	if (s[0] >= '0' && s[0] <= '7' && s[1] == '\0')
		return s[0] - '0';
	for (int i = 0; i <= LOG_DEBUG; i++)
		if (strcasecmp(s, level_names[i]) == 0)
			return i;
	if (strcasecmp(s, "warn") == 0)
		return LOG_WARNING;
	if (strcasecmp(s, "err") == 0)
		return LOG_ERR;
	return -1;
}

void me_log_fields(int prio, const char *const *fields, const char *fmt, ...)
{
	char msg[LOG_MSG_MAX];
	va_list ap;

	if (prio > log_level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);

	if (log_journal && log_journal_fn != NULL) {
		char pbuf[16], mbuf[LOG_MSG_MAX + 8], ibuf[64];
		struct iovec iov[LOG_FIELDS_MAX + 3];
		int n = 0;

		snprintf(pbuf, sizeof(pbuf), "PRIORITY=%d", prio);
		snprintf(mbuf, sizeof(mbuf), "MESSAGE=%s", msg);
		snprintf(ibuf, sizeof(ibuf), "SYSLOG_IDENTIFIER=%s", log_ident);
		iov[n++] = (struct iovec){ pbuf, strlen(pbuf) };
		iov[n++] = (struct iovec){ mbuf, strlen(mbuf) };
		iov[n++] = (struct iovec){ ibuf, strlen(ibuf) };
		for (int i = 0; fields != NULL && fields[i] != NULL && i < LOG_FIELDS_MAX; i++)
			iov[n++] = (struct iovec){ (void *)fields[i], strlen(fields[i]) };
		if (log_journal_fn(iov, n) >= 0)
			return;
	}

	/* stderr: one line, fields appended in brackets. */
	char line[LOG_MSG_MAX * 2];
	size_t off = (size_t)snprintf(line, sizeof(line), "%s: %s", level_names[prio & 7], msg);
	for (int i = 0; fields != NULL && fields[i] != NULL && i < LOG_FIELDS_MAX &&
	     off < sizeof(line); i++)
		off += (size_t)snprintf(line + off, sizeof(line) - off, "%s%s%s", i ? " " : " [",
					fields[i], fields[i + 1] == NULL ? "]" : "");
	if (off >= sizeof(line))
		off = sizeof(line) - 1;
	line[off] = '\0';
	fprintf(stderr, "%s\n", line);
}
