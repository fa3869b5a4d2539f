#include "common/b58.h"

#include <string.h>

#include "common/err.h"

/* Largest input me_b58_encode accepts, in bytes. */
#define B58_MAX_BYTES 128
/* log(256)/log(58) < 1.38 and log(58)/log(256) < 0.733: digit buffers sized from the bounds. */
#define B58_ENC_DIGITS (B58_MAX_BYTES * 138 / 100 + 1)
#define B58_DEC_BYTES (ME_B58_MAX_CHARS * 733 / 1000 + 1)

static const char b58_alphabet[] =
	"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/* Digit value of every byte; -1 outside the alphabet (including all non-ASCII bytes). */
static const signed char b58_map[256] = {
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1,  0,  1,  2,  3,  4,  5,  6,  7,  8, -1, -1, -1, -1, -1, -1,
	-1,  9, 10, 11, 12, 13, 14, 15, 16, -1, 17, 18, 19, 20, 21, -1,
	22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, -1, -1, -1, -1, -1,
	-1, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, -1, 44, 45, 46,
	47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
	-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
};

int me_b58_encode(const uint8_t *in, size_t n, char *out, size_t outsz)
{
	uint8_t digits[B58_ENC_DIGITS];
	size_t zeros = 0, len = 0, size, i, j;

	if (n > B58_MAX_BYTES || (in == NULL && n > 0))
		return ME_EINVAL;
	if (out == NULL || outsz == 0)
		return ME_ETOOBIG;

	while (zeros < n && in[zeros] == 0)
		zeros++;
	size = (n - zeros) * 138 / 100 + 1;
	memset(digits, 0, size);

	/* Big-endian base-256 to base-58, digits kept right-aligned in digits[0..size). */
	for (i = zeros; i < n; i++) {
		unsigned int carry = in[i];
		size_t k = 0;

		for (j = size; j > 0 && (carry != 0 || k < len); j--, k++) {
			carry += 256u * digits[j - 1];
			digits[j - 1] = (uint8_t)(carry % 58);
			carry /= 58;
		}
		if (carry != 0)
			return ME_EINTERNAL; /* unreachable: size is an upper bound */
		len = k;
	}

	j = size - len;
	while (j < size && digits[j] == 0)
		j++;
	if (zeros + (size - j) >= outsz) {
		out[0] = '\0';
		return ME_ETOOBIG;
	}

	for (i = 0; i < zeros; i++)
		out[i] = '1';
	for (; j < size; j++, i++)
		out[i] = b58_alphabet[digits[j]];
	out[i] = '\0';
	return (int)i;
}

int me_b58_decode(const char *in, uint8_t *out, size_t outsz)
{
	uint8_t bytes[B58_DEC_BYTES];
	size_t n, zeros = 0, len = 0, size, i, j;

	if (in == NULL)
		return ME_EBADID;
	n = strnlen(in, ME_B58_MAX_CHARS + 1);
	if (n == 0)
		return ME_EBADID;
	if (n > ME_B58_MAX_CHARS)
		return ME_ETOOBIG;

	for (i = 0; i < n; i++)
		if (b58_map[(unsigned char)in[i]] < 0)
			return ME_EBADID;

	while (zeros < n && in[zeros] == '1')
		zeros++;
	size = (n - zeros) * 733 / 1000 + 1;
	memset(bytes, 0, size);

	for (i = zeros; i < n; i++) {
		unsigned int carry = (unsigned int)b58_map[(unsigned char)in[i]];
		size_t k = 0;

		for (j = size; j > 0 && (carry != 0 || k < len); j--, k++) {
			carry += 58u * bytes[j - 1];
			bytes[j - 1] = (uint8_t)(carry & 0xff);
			carry >>= 8;
		}
		if (carry != 0)
			return ME_EINTERNAL; /* unreachable: size is an upper bound */
		len = k;
	}

	j = size - len;
	while (j < size && bytes[j] == 0)
		j++;
	if (zeros + (size - j) > outsz || out == NULL)
		return ME_ETOOBIG;

	memset(out, 0, zeros);
	memcpy(out + zeros, bytes + j, size - j);
	return (int)(zeros + (size - j));
}
