/* One error space for megaengine: negative codes, a stable name and a message.
 * Functions return 0 (or a non-negative count) on success and a ME_E* code on failure.
 * The numeric values and names are part of the public control protocol: never renumber. */
#ifndef ME_ERR_H
#define ME_ERR_H

#define ME_ERRORS(X) \
	X(ME_EINTERNAL,  -1, "EINTERNAL",  "internal error") \
	X(ME_ENOMEM,     -2, "ENOMEM",     "out of memory") \
	X(ME_EINVAL,     -3, "EINVAL",     "invalid argument") \
	X(ME_EIO,        -4, "EIO",        "input/output error") \
	X(ME_EPROTO,     -5, "EPROTO",     "protocol error") \
	X(ME_ETOOBIG,    -6, "ETOOBIG",    "message too large") \
	X(ME_EVERSION,   -7, "EVERSION",   "unsupported protocol version") \
	X(ME_EUNKNOWN,   -8, "EUNKNOWN",   "unknown command") \
	X(ME_EARG,       -9, "EARG",       "missing or invalid argument") \
	X(ME_ENOTFOUND, -10, "ENOTFOUND",  "not found") \
	X(ME_EEXIST,    -11, "EEXIST",     "already exists") \
	X(ME_EPERM,     -12, "EPERM",      "permission denied") \
	X(ME_ENOKEY,    -13, "ENOKEY",     "no node identity") \
	X(ME_EKEY,      -14, "EKEY",       "bad key file") \
	X(ME_ENOTREPO,  -15, "ENOTREPO",   "not a git repository") \
	X(ME_EEMPTY,    -16, "EEMPTY",     "repository has no commits") \
	X(ME_EGIT,      -17, "EGIT",       "git error") \
	X(ME_EDB,       -18, "EDB",        "database error") \
	X(ME_EBADID,    -19, "EBADID",     "malformed identifier") \
	X(ME_EBUSY,     -20, "EBUSY",      "resource busy") \
	X(ME_ECONN,     -21, "ECONN",      "connection failed") \
	X(ME_ETIMEDOUT, -22, "ETIMEDOUT",  "timed out") \
	X(ME_ESHUTDOWN, -23, "ESHUTDOWN",  "daemon shutting down") \
	X(ME_EDIRTY,    -24, "EDIRTY",     "working copy has local changes") \
	X(ME_EDIVERGED, -25, "EDIVERGED",  "branch has diverged") \
	X(ME_ENOSPC,    -26, "ENOSPC",     "no space left on device") \
	X(ME_EUNAVAIL,  -27, "EUNAVAIL",   "no peer can serve it") \
	X(ME_ECANCELED, -28, "ECANCELED",  "canceled")

enum me_err {
	ME_OK = 0,
#define ME_ERR_ENUM(sym, val, name, msg) sym = (val),
	ME_ERRORS(ME_ERR_ENUM)
#undef ME_ERR_ENUM
};

/* Human-readable message; never NULL (unknown codes give "unknown error"). */
const char *me_strerror(int err);
/* Stable symbolic name ("ENOTFOUND"); never NULL ("EUNKNOWNERR" for unknown codes). */
const char *me_errname(int err);

#endif
