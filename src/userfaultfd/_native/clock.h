/* The monotonic clock in nanoseconds, shared by the engine (latencies, spinning) and the SIGBUS
 * resolver (how long a retired range is trusted). clock_gettime is async-signal-safe. */
#ifndef UFFD_CLOCK_H
#define UFFD_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#endif
