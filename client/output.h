/* mectl's rendering: replies become JSON values (jansson); --json prints them as they are,
 * otherwise a per-command renderer prints a human table. Parsing stays in mectl.c. */
#ifndef ME_OUTPUT_H
#define ME_OUTPUT_H

#include <jansson.h>
#include <msgpack.h>

/* Converts a reply object to JSON (binary becomes lowercase hex). NULL on allocation failure. */
json_t *out_from_msgpack(const msgpack_object *o);

typedef void (*out_render_fn)(json_t *result);

void out_auth(json_t *r);
void out_node_status(json_t *r);
void out_repo_add(json_t *r);
void out_repo_list(json_t *r);
void out_repo_show(json_t *r);
void out_repo_remove(json_t *r);
void out_node_list(json_t *r);
void out_peer_list(json_t *r);
void out_repo_sync(json_t *r);
void out_repo_clone(json_t *r);
void out_repo_pull(json_t *r);

/* "123 B", "1.2 KiB", "3.4 MiB"... */
void out_bytes(uint64_t n, char *buf, size_t sz);

/* Prints JSON to stdout, indented, keys in the daemon's order. */
void out_json(json_t *v);

#endif
