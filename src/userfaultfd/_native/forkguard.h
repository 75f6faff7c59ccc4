#ifndef UFFD_FORKGUARD_H
#define UFFD_FORKGUARD_H

#include <stdint.h>

/* In a forked child whose regions were not inherited (MADV_DONTFORK: nothing serves them here),
 * a touch of one of them is a SIGSEGV. With a guard armed, the child first writes the message of
 * the range touched to stderr, then dies of the SIGSEGV as before; other SIGSEGVs go to the
 * handler that was there before. Arming again replaces the ranges. 0 or errno. */
int forkguard_arm(int n, const uint64_t *starts, const uint64_t *ends, const char *const *messages);

#endif
