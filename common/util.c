#include "common/util.h"

#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"

int me_root_resolve(const char *flag, char *out, size_t outsz)
{
	const char *v = flag;
	int n;

	if (v == NULL || *v == '\0')
		v = getenv("MEGAENGINE_ROOT");
	if (v != NULL && *v != '\0') {
		n = snprintf(out, outsz, "%s", v);
	} else {
		const char *home = getenv("HOME");
		if (home == NULL || *home == '\0') {
			struct passwd *pw = getpwuid(getuid());
			home = pw ? pw->pw_dir : NULL;
		}
		if (home == NULL)
			return ME_EINVAL;
		n = snprintf(out, outsz, "%s/.megaengine", home);
	}
	if (n < 0 || (size_t)n >= outsz)
		return ME_EINVAL;
	/* Drop trailing slashes (but keep "/"). */
	for (size_t l = strlen(out); l > 1 && out[l - 1] == '/'; l--)
		out[l - 1] = '\0';
	return 0;
}

int64_t me_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t me_mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
