/* Verifying and applying a received bundle in a child process with hard limits, so that a
 * hostile pack (libgit2's indexer has denial-of-service bugs: docs/security.md) can only kill
 * that child, never the daemon.
 *
 * verify_bundle (the parent, on a thread pool worker) starts a fresh exec of the daemon's own
 * binary, /proc/self/exe VERIFY_ARG, with stdin and stdout on pipes, stderr inherited and no
 * other file descriptor, writes it the request and waits for its reply:
 *   request (stdin, kept open until the child ends: its end tells the child that the daemon
 *   is gone when the parent-death signal could not, or that the transfer failed): one frame
 *   (common/frame.h, at most VERIFY_MAX_REQUEST); with follow, then one byte 'G' once the
 *   bundle has arrived and its transfer ended well, which the child waits for before the
 *   mirror changes
 *       [2, root str, bundle_path str, max_bytes uint, check_binding bool, mem_limit uint,
 *        cpu_limit_s uint, start bin, follow bool]
 *     start: the body of an xmsg Start (common/gossip_msg.h) carrying the creator's key and the
 *     expected ref state, and with follow the bundle's size and digest (its name and offset
 *     are unused)
 *   reply (stdout): one frame of at most VERIFY_MAX_REPLY bytes
 *       [rc int, message str, refuted bool,
 *        [header_bytes, pack_bytes, objects, prereqs, refs, refs_updated, refs_deleted]]
 * The child (verify_main) sets RLIMIT_CORE 0, RLIMIT_CPU cpu_limit_s (SIGKILL 5 s later) and,
 * unless built with AddressSanitizer (whose shadow memory rules it out), RLIMIT_AS mem_limit;
 * a libgit2 allocator of its own refuses any single allocation over mem_limit. It then does
 * what the daemon did in-process: mirror_open (creating the mirror), bundle_rx_* fed from the
 * bundle file (with follow: as it grows, up to the size, checked against the digest before
 * bundle_rx_finish) and, when check_binding, the did:repo binding check (some root commit hashed
 * with the creator's key gives the repository id; refuted when none does).
 * libgit2's pack windows are made small (32 MiB, 256 MiB mapped in all) so that the mirror's
 * packs do not eat the address space.
 * The parent polls the child's resident size (/proc/PID/statm, without file-backed pages) and a wall-clock deadline and
 * kills it (SIGKILL) past either, or when *cancel becomes non-zero (the daemon stops). A child that is killed, crashes or exits without a reply
 * rejects the bundle. After any failure the mirror is put back as it was (mirror_cleanup, as a
 * child that ran out of memory may not have cleaned up; a pack it had
 * already moved in is removed when the refs did not change; a mirror created by this
 * verification is removed).
 *
 * Limits (size: the request's when set, else the file's): mem_limit = VERIFY_MEM_BASE +
 * VERIFY_MEM_PER_BYTE x bundle size; cpu_limit_s = VERIFY_CPU_BASE_S + 1 s per MiB of bundle;
 * the wall-clock deadline is twice the CPU limit plus VERIFY_WALL_EXTRA_S. */
#ifndef ME_VERIFY_H
#define ME_VERIFY_H

#include <stdint.h>

#include "common/gossip_msg.h"
#include "daemon/mirror.h"

#define VERIFY_ARG "--verify-bundle"
#define VERIFY_MEM_BASE (1ull << 30)
#define VERIFY_MEM_PER_BYTE 4
#define VERIFY_CPU_BASE_S 60
#define VERIFY_WALL_EXTRA_S 30
#define VERIFY_MAX_REQUEST (XMSG_MAX_BODY + 3 * 4096 + 64)
#define VERIFY_MAX_REPLY 4096
#define VERIFY_MSG_LEN 256

struct verify_req {
	const char *root;        /* data root; the mirror is $root/repos/<id>.git */
	const char *bundle_path; /* the received bundle */
	uint64_t max_bytes;      /* bundle_rx_opts.max_bytes */
	const struct gmsg_refstate *rs; /* expected state (signature already verified) */
	const uint8_t *creator_pk;
	int check_binding;       /* first fetch: check the did:repo binding */
	const char *exe;         /* NULL: /proc/self/exe */
	const volatile int *cancel; /* optional: once non-zero, the child is killed (shutdown) */
	/* Optional: the bundle as it is still arriving. When digest is set, the child reads
	 * bundle_path as it grows (inotify) until it holds size bytes, hashes them (SHA3-256)
	 * and refuses the bundle unless they match digest, before anything changes; the
	 * parent's wall-clock limit counts from when *arriving (optional) becomes zero. Once
	 * *abort (optional) is non-zero, the child is killed: ME_ECANCELED (the transfer
	 * failed). */
	const uint8_t *digest;
	uint64_t size;
	const volatile int *arriving, *abort;
	/* Optional, with digest: where the pack may be cut (bundle_rx_opts.parts) */
	const struct xmsg_parts *parts;
	/* 0: computed from the bundle's size (above) */
	uint64_t mem_limit;
	unsigned cpu_limit_s, wall_limit_s;
};

struct verify_res {
	int rc; /* 0 or ME_E*: the verifier's, or ME_ETOOBIG (over its memory limit: the
		   bundle expands beyond what its size allows, rejected like a bad bundle) /
		   ME_ETIMEDOUT / ME_EINTERNAL when the child was killed or crashed */
	char msg[VERIFY_MSG_LEN];
	int refuted; /* the binding check found no matching root commit */
	int killed;  /* the child did not end on its own with a reply */
	struct bundle_stats st;
};

/* Runs the verification in a child (above) and waits for it. Blocking: call it on a worker
 * thread. Returns res->rc. */
int verify_bundle(const struct verify_req *req, struct verify_res *res);

/* The child: `megaengined --verify-bundle`, dispatched at the very top of main() (argv[1] is
 * VERIFY_ARG). Returns the exit status. */
int verify_main(int argc, char **argv);

#endif
