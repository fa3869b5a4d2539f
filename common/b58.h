/* Base58 (Bitcoin alphabet, "base58btc" in multibase). Bounded, allocation-free. */
#ifndef ME_B58_H
#define ME_B58_H

#include <stddef.h>
#include <stdint.h>

/* Longest input me_b58_decode accepts, in characters; longer input is refused (ME_ETOOBIG). */
#define ME_B58_MAX_CHARS 256

/* Encodes n bytes into out (NUL-terminated). Returns the string length, or ME_ETOOBIG when
 * out (outsz bytes, including the NUL) is too small, ME_EINVAL for n > 128. */
int me_b58_encode(const uint8_t *in, size_t n, char *out, size_t outsz);
/* Decodes a NUL-terminated base58 string into out. Returns the byte count, ME_EBADID for a
 * character outside the alphabet or empty input, ME_ETOOBIG when out is too small or the input
 * is longer than ME_B58_MAX_CHARS. */
int me_b58_decode(const char *in, uint8_t *out, size_t outsz);

#endif
