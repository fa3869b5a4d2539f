/* A streaming git pack writer (header, entries, SHA-1 trailer), shared by the pack planners
 * (thinpack, packreuse). See Documentation/gitformat-pack.txt in git for the format. */
#ifndef ME_PACKWRITE_H
#define ME_PACKWRITE_H

#include <stddef.h>
#include <stdint.h>

#include <git2.h>

#define PACK_HDR_LEN 12     /* "PACK", version, object count */
#define PACK_TRAILER_LEN 20 /* SHA-1 of everything before */

/* Pack entry types. */
enum { PACK_COMMIT = 1, PACK_TREE = 2, PACK_BLOB = 3, PACK_TAG = 4, PACK_OFS_DELTA = 6,
       PACK_REF_DELTA = 7 };

/* The pack entry type of a libgit2 object type, -1 for none. */
int pack_type_of(git_object_t t);

struct packw;

/* Starts a pack of nobjects entries on fd (the 12-byte header). 0, ME_ENOMEM, ME_EIO. */
int packw_new(struct packw **out, int fd, uint32_t nobjects);
/* Raw bytes (a copied entry). 0 or ME_EIO (errno set) / ME_EINTERNAL. */
int packw_put(struct packw *w, const void *p, size_t len);
/* An entry: type and size header, the base for a REF_DELTA (else NULL), deflated data. */
int packw_entry(struct packw *w, int type, const git_oid *base, const void *data, size_t len);
/* Offset of the next byte in the pack (where the next entry starts). */
uint64_t packw_offset(const struct packw *w);
/* Writes the SHA-1 trailer; *bytes (may be NULL) = the pack's size. */
int packw_finish(struct packw *w, uint64_t *bytes);
void packw_free(struct packw *w);

#endif
