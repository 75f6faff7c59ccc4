/* The chunk cache: a snapshot's bytes as they arrive from a store, served by the engine natively.
 *
 * One buffer spans the whole snapshot (reserved, not committed: only chunks present use memory).
 * Each chunk has a state word; the engine copies from a present chunk while holding a pin on it,
 * so eviction (which waits for the pins to drain before it drops the memory) never pulls bytes
 * from under a copy. A fault on a chunk not present registers its (uffd, range) as a waiter and
 * queues the chunk for the fetchers (Python threads of the serving process, woken through an
 * eventfd): they fetch, verify and decompress off the GIL, fill the chunk, and the fill wakes
 * the waiters, whose faults come again and are served from the cache. */
#ifndef UFFD_CHUNKCACHE_H
#define UFFD_CHUNKCACHE_H

#include <stdint.h>

enum chunk_state {
    CHUNK_ABSENT = 0,
    CHUNK_REQUESTED = 1, /* queued for a fetcher */
    CHUNK_FETCHING = 2,  /* taken by a fetcher: nobody else fetches it */
    CHUNK_PRESENT = 3,
    CHUNK_ZERO = 4,     /* all zeros: never fetched, served with ZEROPAGE */
    CHUNK_POISONED = 5, /* could not be fetched or verified: its pages are poisoned */
    CHUNK_EVICTING = 6, /* its memory is being dropped */
};

enum cache_plan { PLAN_COPY = 1, PLAN_ZERO = 2, PLAN_POISON = 3, PLAN_MISS = 4 };

struct chunk_cache;

struct chunk_cache *cache_new(uint64_t size, uint64_t chunk_size); /* NULL with errno */
void cache_free(struct chunk_cache *c);
int cache_eventfd(const struct chunk_cache *c);
uint64_t cache_chunk_size(const struct chunk_cache *c);
uint64_t cache_chunks(const struct chunk_cache *c);
int cache_state(const struct chunk_cache *c, uint64_t chunk);

/* The engine's side. How to serve at most `want` bytes from snapshot offset `off` (never past the
 * end of its chunk): *len bytes, *chunk the chunk. PLAN_COPY: copy from *src, then cache_unpin. */
int cache_plan(struct chunk_cache *c, uint64_t off, uint64_t want, uint64_t *src, uint64_t *len,
               uint64_t *chunk);
void cache_unpin(struct chunk_cache *c, uint64_t chunk);
/* A fault on [addr, addr + len) of uffd waits for `chunk`, which is queued first in line for a
 * fetch unless it already is. Returns 0, 1 if the chunk is no longer missing (plan again), or
 * -ENOMEM when the waiter cannot be recorded (the caller wakes the fault: it comes again). */
int cache_wait(struct chunk_cache *c, uint64_t chunk, int uffd, uint64_t addr, uint64_t len);
/* Queues a chunk not present for a fetch (at the back: prefetch). 1 if queued now. */
int cache_request(struct chunk_cache *c, uint64_t chunk);

/* The fetchers' side. Takes up to max queued chunks (each now FETCHING) -> count. urgent[k] is
 * 1 for a chunk a fault waits for. */
int cache_take(struct chunk_cache *c, uint64_t *out, uint8_t *urgent, int max);
/* Copies len bytes into a chunk not present and makes it present; wakes its waiters. 0 or
 * -EINVAL, -EEXIST (already present). */
int cache_fill(struct chunk_cache *c, uint64_t chunk, const void *data, uint64_t len);
/* Settles a chunk not present as CHUNK_ZERO or CHUNK_POISONED, waking its waiters. */
int cache_settle(struct chunk_cache *c, uint64_t chunk, int state);
/* Drops a present chunk's memory once no copy uses it. 0, or -ENOENT if it was not present. */
int cache_evict(struct chunk_cache *c, uint64_t chunk);

#endif
