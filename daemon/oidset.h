/* Sets and vectors of git object ids, for walks over histories chosen by others. The set is
 * open addressing keyed with a random SipHash key, so that an attacker choosing objects cannot
 * make the probes collide. Each member carries a small value (a mark, a depth). */
#ifndef ME_OIDSET_H
#define ME_OIDSET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <git2.h>
#include <sodium.h>

struct oidset_slot {
	git_oid oid;
	uint8_t used;
	uint8_t val;
};

struct oidset {
	struct oidset_slot *slots;
	size_t cap, n; /* cap: a power of two, or 0 */
	unsigned char key[crypto_shorthash_KEYBYTES];
};

/* 0 or ME_EINTERNAL (libsodium failed to initialise). */
int oidset_init(struct oidset *s);
void oidset_free(struct oidset *s);
/* The member's slot (its val may be changed), NULL when absent. */
struct oidset_slot *oidset_find(const struct oidset *s, const git_oid *oid);
bool oidset_has(const struct oidset *s, const git_oid *oid);
/* Adds oid (keeping the old value when present). 1 added, 0 present, ME_ENOMEM. */
int oidset_put(struct oidset *s, const git_oid *oid, uint8_t val);

struct oidvec {
	git_oid *v;
	size_t n, cap;
};

/* Appends; 0 or ME_ENOMEM. */
int oidvec_push(struct oidvec *a, const git_oid *oid);
/* qsort comparator for git_oid. */
int oid_cmp(const void *a, const void *b);

#endif
