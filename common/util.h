/* Small helpers shared by megaengined and mectl. */
#ifndef ME_UTIL_H
#define ME_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Resolves the data root: flag value (may be NULL) > $MEGAENGINE_ROOT > ~/.megaengine.
 * Trailing slashes are dropped. 0 or ME_EINVAL (no home directory, path too long). */
int me_root_resolve(const char *flag, char *out, size_t outsz);

/* Milliseconds since the epoch / on a monotonic clock. */
int64_t me_now_ms(void);
int64_t me_mono_ms(void);

#endif
