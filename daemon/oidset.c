#include "daemon/oidset.h"

#include <stdlib.h>
#include <string.h>

#include "common/err.h"


int oidset_init(struct oidset *s)
{
	memset(s, 0, sizeof(*s));
	if (sodium_init() < 0)
		return ME_EINTERNAL;
	randombytes_buf(s->key, sizeof(s->key));
	return 0;
}

void oidset_free(struct oidset *s)
{
	free(s->slots);
	memset(s, 0, sizeof(*s));
}

static size_t oidset_idx(const struct oidset *s, const git_oid *oid)
{
	unsigned char h[crypto_shorthash_BYTES];
	uint64_t v;

	crypto_shorthash(h, oid->id, GIT_OID_RAWSZ, s->key);
	memcpy(&v, h, sizeof(v));
	return (size_t)v & (s->cap - 1);
}

struct oidset_slot *oidset_find(const struct oidset *s, const git_oid *oid)
{
	if (s->cap == 0)
		return NULL;
	for (size_t i = oidset_idx(s, oid);; i = (i + 1) & (s->cap - 1)) {
		if (!s->slots[i].used)
			return NULL;
		if (memcmp(s->slots[i].oid.id, oid->id, GIT_OID_RAWSZ) == 0)
			return &s->slots[i];
	}
}

bool oidset_has(const struct oidset *s, const git_oid *oid)
{
	return oidset_find(s, oid) != NULL;
}

static void oidset_place(struct oidset *s, const git_oid *oid, uint8_t val)
{
	size_t i = oidset_idx(s, oid);

	while (s->slots[i].used)
		i = (i + 1) & (s->cap - 1);
	git_oid_cpy(&s->slots[i].oid, oid);
	s->slots[i].used = 1;
	s->slots[i].val = val;
	s->n++;
}

int oidset_put(struct oidset *s, const git_oid *oid, uint8_t val)
{
	if (oidset_find(s, oid) != NULL)
		return 0;
	if (s->n + 1 > s->cap / 2) {
		size_t ncap = s->cap ? s->cap * 2 : 64;
		struct oidset_slot *old = s->slots;
		size_t ocap = s->cap;

		if (ncap < s->cap || ncap > SIZE_MAX / sizeof(*old))
			return ME_ENOMEM;
		if ((s->slots = calloc(ncap, sizeof(*old))) == NULL) {
			s->slots = old;
			return ME_ENOMEM;
		}
		s->cap = ncap;
		s->n = 0;
		for (size_t i = 0; i < ocap; i++)
			if (old[i].used)
				oidset_place(s, &old[i].oid, old[i].val);
		free(old);
	}
	oidset_place(s, oid, val);
	return 1;
}


int oidvec_push(struct oidvec *a, const git_oid *oid)
{
	if (a->n == a->cap) {
		size_t ncap = a->cap ? a->cap * 2 : 64;
		git_oid *p;
		if (ncap < a->cap || ncap > SIZE_MAX / sizeof(*p) ||
		    (p = realloc(a->v, ncap * sizeof(*p))) == NULL)
			return ME_ENOMEM;
		a->v = p;
		a->cap = ncap;
	}
	git_oid_cpy(&a->v[a->n++], oid);
	return 0;
}

int oid_cmp(const void *a, const void *b)
{
	return git_oid_cmp(a, b);
}
