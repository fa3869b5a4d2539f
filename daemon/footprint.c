#include "daemon/footprint.h"

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

int footprint_trim(void)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");
	int n = 0;

	if (f == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL) {
		unsigned long lo, hi;
		char perms[8], path[400];
		/* start-end perms offset dev inode path */
		if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %399s", &lo, &hi, perms, path) != 4)
			continue;
		if (perms[1] == 'w' || perms[3] != 'p' || path[0] != '/' ||
		    strstr(path, ".so") == NULL)
			continue;
		if (madvise((void *)lo, hi - lo, MADV_PAGEOUT) == 0)
			n++;
	}
	fclose(f);
	return n;
}
