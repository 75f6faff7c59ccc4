/* The chunk cache (chunkcache.h). No Python object is touched in this file. */
#define _GNU_SOURCE
#include "chunkcache.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "abi.h"

/* A chunk's word: its state in the low 3 bits, "a fault waits for it" in bit 3, and the number
 * of copies in progress from it above. One word, so that a pin and a state change are ordered:
 * a copier pins then checks the state; an evicter changes the state then waits for the pins. */
#define STATE_MASK 7u
#define URGENT 8u
#define PIN 16u

struct waiter {
    uint64_t chunk, addr, len;
    int uffd;
};

struct chunk_cache {
    char *base;
    uint64_t size, chunk_size, nchunks, mapped;
    _Atomic uint32_t *word;
    int event_fd;
    pthread_mutex_t lock; /* the queue and the waiters */
    uint32_t *queue;      /* a ring of chunk numbers; a chunk is in it at most twice */
    uint64_t qcap, qhead, qlen;
    struct waiter *waiters;
    size_t nwaiters, wcap;
};

struct chunk_cache *cache_new(uint64_t size, uint64_t chunk_size)
{
    if (!size || !chunk_size || chunk_size % 4096 || size / chunk_size >= UINT32_MAX) {
        errno = EINVAL;
        return NULL;
    }
    struct chunk_cache *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->size = size;
    c->chunk_size = chunk_size;
    c->nchunks = (size + chunk_size - 1) / chunk_size;
    c->mapped = c->nchunks * chunk_size;
    c->qcap = 2 * c->nchunks + 1;
    c->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    c->word = calloc(c->nchunks, sizeof(*c->word));
    c->queue = calloc(c->qcap, sizeof(*c->queue));
    c->base = mmap(NULL, c->mapped, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (c->event_fd < 0 || !c->word || !c->queue || c->base == MAP_FAILED) {
        int err = errno ? errno : ENOMEM;
        if (c->base == MAP_FAILED)
            c->base = NULL;
        cache_free(c);
        errno = err;
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

void cache_free(struct chunk_cache *c)
{
    if (c->base)
        munmap(c->base, c->mapped);
    if (c->event_fd >= 0)
        close(c->event_fd);
    free((void *)c->word);
    free(c->queue);
    free(c->waiters);
    free(c);
}

int cache_eventfd(const struct chunk_cache *c) { return c->event_fd; }
uint64_t cache_chunk_size(const struct chunk_cache *c) { return c->chunk_size; }
uint64_t cache_chunks(const struct chunk_cache *c) { return c->nchunks; }

int cache_state(const struct chunk_cache *c, uint64_t chunk)
{
    return chunk < c->nchunks ? (int)(atomic_load(&c->word[chunk]) & STATE_MASK) : -1;
}

/* Sets the state (and urgency) and keeps the pins. */
static void set_state(struct chunk_cache *c, uint64_t k, uint32_t state)
{
    uint32_t w = atomic_load(&c->word[k]);
    while (!atomic_compare_exchange_weak(&c->word[k], &w, (w & ~(STATE_MASK | URGENT)) | state))
        ;
}

int cache_plan(struct chunk_cache *c, uint64_t off, uint64_t want, uint64_t *src, uint64_t *len,
               uint64_t *chunk)
{
    if (off >= c->mapped) { /* past the snapshot: zeros, as past the end of a file */
        *len = want;
        *chunk = c->nchunks;
        return PLAN_ZERO;
    }
    uint64_t k = off / c->chunk_size, room = (k + 1) * c->chunk_size - off;
    *chunk = k;
    *len = want < room ? want : room;
    uint32_t w = atomic_fetch_add(&c->word[k], PIN);
    switch (w & STATE_MASK) {
    case CHUNK_PRESENT:
        *src = (uint64_t)(uintptr_t)(c->base + off);
        return PLAN_COPY; /* pinned until cache_unpin */
    case CHUNK_ZERO:
        atomic_fetch_sub(&c->word[k], PIN);
        return PLAN_ZERO;
    case CHUNK_POISONED:
        atomic_fetch_sub(&c->word[k], PIN);
        return PLAN_POISON;
    default:
        atomic_fetch_sub(&c->word[k], PIN);
        return PLAN_MISS;
    }
}

void cache_unpin(struct chunk_cache *c, uint64_t chunk) { atomic_fetch_sub(&c->word[chunk], PIN); }

/* Called with c->lock held. */
static void enqueue(struct chunk_cache *c, uint64_t k, int front)
{
    if (c->qlen == c->qcap) /* cannot happen: each chunk is queued at most twice */
        return;
    if (front) {
        c->qhead = (c->qhead + c->qcap - 1) % c->qcap;
        c->queue[c->qhead] = (uint32_t)k;
    } else {
        c->queue[(c->qhead + c->qlen) % c->qcap] = (uint32_t)k;
    }
    c->qlen++;
    uint64_t one = 1;
    if (write(c->event_fd, &one, sizeof(one)) < 0) { /* EAGAIN only at a count of 2^64 - 2 */
    }
}

int cache_wait(struct chunk_cache *c, uint64_t chunk, int uffd, uint64_t addr, uint64_t len)
{
    pthread_mutex_lock(&c->lock);
    uint32_t w = atomic_load(&c->word[chunk]), state = w & STATE_MASK;
    if (state == CHUNK_PRESENT || state == CHUNK_ZERO || state == CHUNK_POISONED) {
        pthread_mutex_unlock(&c->lock);
        return 1; /* it arrived meanwhile: the fill's wake-up may have come before our waiter */
    }
    int known = 0;
    for (size_t k = 0; k < c->nwaiters && !known; k++) {
        const struct waiter *x = &c->waiters[k];
        known = x->chunk == chunk && x->uffd == uffd && x->addr == addr && x->len == len;
    }
    if (!known && c->nwaiters == c->wcap) {
        size_t cap = c->wcap ? 2 * c->wcap : 64;
        struct waiter *grown = realloc(c->waiters, cap * sizeof(*grown));
        if (!grown) {
            pthread_mutex_unlock(&c->lock);
            return -ENOMEM;
        }
        c->waiters = grown;
        c->wcap = cap;
    }
    if (!known)
        c->waiters[c->nwaiters++] = (struct waiter){chunk, addr, len, uffd};
    if (state == CHUNK_ABSENT || (state == CHUNK_REQUESTED && !(w & URGENT))) {
        /* First in line; one queued as a prefetch moves up (its old entry is skipped). */
        set_state(c, chunk, CHUNK_REQUESTED | URGENT);
        enqueue(c, chunk, 1);
    }
    pthread_mutex_unlock(&c->lock);
    return 0;
}

int cache_request(struct chunk_cache *c, uint64_t chunk)
{
    if (chunk >= c->nchunks || (atomic_load(&c->word[chunk]) & STATE_MASK) != CHUNK_ABSENT)
        return 0;
    pthread_mutex_lock(&c->lock);
    int queued = (atomic_load(&c->word[chunk]) & STATE_MASK) == CHUNK_ABSENT;
    if (queued) {
        set_state(c, chunk, CHUNK_REQUESTED);
        enqueue(c, chunk, 0);
    }
    pthread_mutex_unlock(&c->lock);
    return queued;
}

int cache_take(struct chunk_cache *c, uint64_t *out, uint8_t *urgent, int max)
{
    int n = 0;
    pthread_mutex_lock(&c->lock);
    while (c->qlen && n < max) {
        uint64_t k = c->queue[c->qhead];
        c->qhead = (c->qhead + 1) % c->qcap;
        c->qlen--;
        uint32_t w = atomic_load(&c->word[k]);
        if ((w & STATE_MASK) != CHUNK_REQUESTED)
            continue; /* the second entry of a chunk moved up, already taken */
        set_state(c, k, CHUNK_FETCHING);
        out[n] = k;
        urgent[n++] = (w & URGENT) != 0;
    }
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* Wakes the faults waiting for chunk k; called after its state changed. A waiter whose uffd has
 * been closed meanwhile gets a wake-up on whatever that number is now: at worst a spurious
 * wake-up, which makes a faulter fault again (the kernel allows it at any time). */
static void wake_waiters(struct chunk_cache *c, uint64_t k)
{
    struct waiter found[64];
    for (;;) {
        size_t n = 0;
        pthread_mutex_lock(&c->lock);
        for (size_t j = 0; j < c->nwaiters && n < 64;) {
            if (c->waiters[j].chunk == k) {
                found[n++] = c->waiters[j];
                c->waiters[j] = c->waiters[--c->nwaiters];
            } else {
                j++;
            }
        }
        pthread_mutex_unlock(&c->lock);
        for (size_t j = 0; j < n; j++) {
            struct uffdio_range r = {found[j].addr, found[j].len};
            ioctl(found[j].uffd, UFFDIO_WAKE, &r);
        }
        if (n < 64)
            return;
    }
}

static int settle(struct chunk_cache *c, uint64_t chunk, uint32_t state)
{
    uint32_t cur = atomic_load(&c->word[chunk]) & STATE_MASK;
    if (cur == CHUNK_PRESENT || cur == CHUNK_EVICTING)
        return -EEXIST;
    set_state(c, chunk, state);
    wake_waiters(c, chunk);
    return 0;
}

int cache_fill(struct chunk_cache *c, uint64_t chunk, const void *data, uint64_t len)
{
    if (chunk >= c->nchunks || len > c->chunk_size)
        return -EINVAL;
    uint32_t cur = atomic_load(&c->word[chunk]) & STATE_MASK;
    if (cur == CHUNK_PRESENT || cur == CHUNK_EVICTING)
        return -EEXIST;
    char *dst = c->base + chunk * c->chunk_size;
    memcpy(dst, data, len);
    if (len < c->chunk_size) /* a short last chunk: the rest reads as zeros */
        memset(dst + len, 0, c->chunk_size - len);
    return settle(c, chunk, CHUNK_PRESENT);
}

int cache_settle(struct chunk_cache *c, uint64_t chunk, int state)
{
    if (chunk >= c->nchunks || (state != CHUNK_ZERO && state != CHUNK_POISONED))
        return -EINVAL;
    return settle(c, chunk, (uint32_t)state);
}

int cache_evict(struct chunk_cache *c, uint64_t chunk)
{
    if (chunk >= c->nchunks)
        return -EINVAL;
    uint32_t w = atomic_load(&c->word[chunk]);
    do {
        if ((w & STATE_MASK) != CHUNK_PRESENT)
            return -ENOENT;
    } while (
        !atomic_compare_exchange_weak(&c->word[chunk], &w, (w & ~STATE_MASK) | CHUNK_EVICTING));
    /* A copier that pinned before the change copies on; one that pins after sees EVICTING and
     * treats the chunk as missing. Once the pins drain, nobody reads the memory. */
    while (atomic_load(&c->word[chunk]) >= PIN)
        sched_yield();
    madvise(c->base + chunk * c->chunk_size, c->chunk_size, MADV_DONTNEED);
    pthread_mutex_lock(&c->lock);
    int waited = 0;
    for (size_t j = 0; j < c->nwaiters && !waited; j++)
        waited = c->waiters[j].chunk == chunk;
    set_state(c, chunk, waited ? CHUNK_REQUESTED | URGENT : CHUNK_ABSENT);
    if (waited) /* a fault came while the memory was dropped: fetch it again */
        enqueue(c, chunk, 1);
    pthread_mutex_unlock(&c->lock);
    return 0;
}
