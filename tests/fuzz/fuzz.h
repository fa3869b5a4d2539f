/* Shared by the libFuzzer targets (tests/fuzz/fuzz-*.c), the replay driver and the seed
 * generator. Each target defines LLVMFuzzerTestOneInput (and may define LLVMFuzzerInitialize);
 * it must return 0 for every input, and a broken invariant aborts (libFuzzer and the replay
 * driver both report that as a crash). */
#ifndef ME_FUZZ_H
#define ME_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_ASSERT(cond)                                                                   \
	do {                                                                                \
		if (!(cond)) {                                                              \
			fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, \
				#cond);                                                     \
			abort();                                                            \
		}                                                                           \
	} while (0)

#endif
