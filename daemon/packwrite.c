#include "daemon/packwrite.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/wolfcrypt/sha.h>
#include <zlib.h>

#include "common/err.h"
#include "daemon/gitutil.h"

int pack_type_of(git_object_t t)
{
	switch (t) {
	case GIT_OBJECT_COMMIT: return PACK_COMMIT;
	case GIT_OBJECT_TREE: return PACK_TREE;
	case GIT_OBJECT_BLOB: return PACK_BLOB;
	case GIT_OBJECT_TAG: return PACK_TAG;
	default: return -1;
	}
}

struct packw {
	int fd;
	wc_Sha sha;
	uint64_t bytes; /* flushed */
	size_t n;       /* buffered */
	uint8_t buf[64 * 1024];
};

static int pw_flush(struct packw *w)
{
	int rc;

	if (wc_ShaUpdate(&w->sha, w->buf, (word32)w->n) != 0)
		return ME_EINTERNAL;
	if ((rc = write_full(w->fd, w->buf, w->n)) < 0) {
		errno = -rc;
		return ME_EIO;
	}
	w->bytes += w->n;
	w->n = 0;
	return 0;
}

int packw_put(struct packw *w, const void *src, size_t len)
{
	const uint8_t *p = src;

	if (len >= sizeof(w->buf) && w->n == 0) { /* large copies skip the buffer */
		int rc;
		for (size_t off = 0; off < len;) {
			word32 k = len - off > (1u << 30) ? (1u << 30) : (word32)(len - off);
			if (wc_ShaUpdate(&w->sha, p + off, k) != 0)
				return ME_EINTERNAL;
			off += k;
		}
		if ((rc = write_full(w->fd, p, len)) < 0) {
			errno = -rc;
			return ME_EIO;
		}
		w->bytes += len;
		return 0;
	}
	while (len > 0) {
		size_t k = sizeof(w->buf) - w->n;
		if (k > len)
			k = len;
		memcpy(w->buf + w->n, p, k);
		w->n += k;
		p += k;
		len -= k;
		if (w->n == sizeof(w->buf)) {
			int rc = pw_flush(w);
			if (rc < 0)
				return rc;
		}
	}
	return 0;
}

uint64_t packw_offset(const struct packw *w)
{
	return w->bytes + w->n;
}

int packw_new(struct packw **out, int fd, uint32_t nobjects)
{
	uint8_t hdr[12] = { 'P', 'A', 'C', 'K', 0, 0, 0, 2 };
	struct packw *w;
	int rc;

	*out = NULL;
	if ((w = malloc(sizeof(*w))) == NULL)
		return ME_ENOMEM;
	w->fd = fd;
	w->bytes = 0;
	w->n = 0;
	if (wc_InitSha(&w->sha) != 0) {
		free(w);
		return ME_EINTERNAL;
	}
	hdr[8] = (uint8_t)(nobjects >> 24);
	hdr[9] = (uint8_t)(nobjects >> 16);
	hdr[10] = (uint8_t)(nobjects >> 8);
	hdr[11] = (uint8_t)nobjects;
	if ((rc = packw_put(w, hdr, sizeof(hdr))) < 0) {
		packw_free(w);
		return rc;
	}
	*out = w;
	return 0;
}

int packw_entry(struct packw *w, int type, const git_oid *base, const void *data, size_t len)
{
	uint8_t h[16], out[16384];
	size_t n = 0, v = len;
	z_stream z;
	int zrc = Z_OK, rc = 0;

	h[n] = (uint8_t)((type << 4) | (v & 15));
	v >>= 4;
	while (v) {
		h[n++] |= 0x80;
		h[n] = v & 0x7f;
		v >>= 7;
	}
	n++;
	if ((rc = packw_put(w, h, n)) < 0)
		return rc;
	if (base != NULL && (rc = packw_put(w, base->id, GIT_OID_RAWSZ)) < 0)
		return rc;
	memset(&z, 0, sizeof(z));
	if (deflateInit(&z, Z_DEFAULT_COMPRESSION) != Z_OK)
		return ME_ENOMEM;
	z.next_in = (Bytef *)data;
	do {
		uInt chunk = len > (1u << 30) ? (1u << 30) : (uInt)len;
		z.avail_in = chunk;
		len -= chunk;
		do {
			z.next_out = out;
			z.avail_out = sizeof(out);
			zrc = deflate(&z, len == 0 ? Z_FINISH : Z_NO_FLUSH);
			if (zrc == Z_STREAM_ERROR) {
				rc = ME_EINTERNAL;
				goto out;
			}
			if ((rc = packw_put(w, out, sizeof(out) - z.avail_out)) < 0)
				goto out;
		} while (z.avail_out == 0);
	} while (len > 0);
	if (zrc != Z_STREAM_END)
		rc = ME_EINTERNAL;
out:
	deflateEnd(&z);
	return rc;
}

int packw_finish(struct packw *w, uint64_t *bytes)
{
	uint8_t sum[WC_SHA_DIGEST_SIZE];
	int rc;

	if ((rc = pw_flush(w)) < 0)
		return rc;
	if (wc_ShaFinal(&w->sha, sum) != 0)
		return ME_EINTERNAL;
	/* the trailer is not part of what it sums: written directly */
	if ((rc = write_full(w->fd, sum, sizeof(sum))) < 0) {
		errno = -rc;
		return ME_EIO;
	}
	w->bytes += sizeof(sum);
	if (bytes != NULL)
		*bytes = w->bytes;
	return 0;
}

void packw_free(struct packw *w)
{
	if (w == NULL)
		return;
	wc_ShaFree(&w->sha);
	free(w);
}
