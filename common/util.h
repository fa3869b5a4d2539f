/* Small helpers shared by megaengined and mectl. */
#ifndef ME_UTIL_H
#define ME_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Resolves the data root: flag value (may be NULL) > $MEGAENGINE_ROOT > ~/.megaengine.
 * Trailing slashes are dropped. 0 or ME_EINVAL (no home directory, path too long). */
int me_root_resolve(const char *flag, char *out, size_t outsz);

/* The big-endian 32-bit integer at p (frame lengths, pack and index headers). */
static inline uint32_t me_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t me_be64(const uint8_t *p)
{
	return (uint64_t)me_be32(p) << 32 | me_be32(p + 4);
}

/* Milliseconds since the epoch / on a monotonic clock. */
int64_t me_now_ms(void);
int64_t me_mono_ms(void);

#endif
