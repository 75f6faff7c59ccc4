/* Grace periods: two reader counters, flipped twice by a writer (sleepable RCU). Readers (worker
 * threads, the SIGBUS handler) enter and leave without locks or system calls, so they are
 * async-signal-safe; a writer that unpublished something waits in srcu_synchronize until no
 * reader can still see it, then frees it. */
#ifndef UFFD_SRCU_H
#define UFFD_SRCU_H

#include <stdatomic.h>
#include <time.h>

struct srcu {
    atomic_uint epoch;
    atomic_long readers[2];
};

static inline unsigned srcu_enter(struct srcu *s)
{
    unsigned idx = atomic_load(&s->epoch) & 1u;
    atomic_fetch_add(&s->readers[idx], 1);
    return idx;
}

static inline void srcu_exit(struct srcu *s, unsigned idx)
{
    atomic_fetch_sub(&s->readers[idx], 1);
}

static inline void srcu_wait_idx(struct srcu *s, unsigned idx)
{
    struct timespec ts = {0, 20000};
    while (atomic_load(&s->readers[idx]) != 0)
        nanosleep(&ts, NULL);
}

/* Every reader that could still see what was unpublished before this call has left. */
static inline void srcu_synchronize(struct srcu *s)
{
    srcu_wait_idx(s, atomic_fetch_add(&s->epoch, 1) & 1u);
    srcu_wait_idx(s, atomic_fetch_add(&s->epoch, 1) & 1u);
}

#endif
