#include "common/err.h"

#include <stddef.h>

struct err_entry {
	int code;
	const char *name;
	const char *msg;
};

static const struct err_entry err_table[] = {
#define ME_ERR_ROW(sym, val, name, msg) { (val), (name), (msg) },
	ME_ERRORS(ME_ERR_ROW)
#undef ME_ERR_ROW
};

static const struct err_entry *err_find(int err)
{
	for (size_t i = 0; i < sizeof(err_table) / sizeof(err_table[0]); i++)
		if (err_table[i].code == err)
			return &err_table[i];
	return NULL;
}

const char *me_strerror(int err)
{
	if (err >= 0)
		return "success";
	const struct err_entry *e = err_find(err);
	return e ? e->msg : "unknown error";
}

const char *me_errname(int err)
{
	if (err >= 0)
		return "OK";
	const struct err_entry *e = err_find(err);
	return e ? e->name : "EUNKNOWNERR";
}
