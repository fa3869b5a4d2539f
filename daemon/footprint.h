/* Resident memory of a daemon that mostly waits. */
#ifndef ME_FOOTPRINT_H
#define ME_FOOTPRINT_H

/* Gives back the resident pages of shared libraries' read-only mappings (code, constants):
 * start-up touches much that an idle daemon never runs again (OpenSSL, which libgit2's libssh2
 * initialises, alone leaves ~3 MiB). madvise(MADV_PAGEOUT); what is used later faults back
 * in. Best effort: errors (older kernels, a seccomp filter) are ignored. Returns the number of
 * mappings advised. */
int footprint_trim(void);

#endif
