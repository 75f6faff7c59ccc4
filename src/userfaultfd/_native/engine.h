/* The fault-serving engine: native worker threads and a SIGBUS resolver that install pages from
 * native sources without ever taking the GIL. Mechanism only; policy lives in Python. */
#ifndef UFFD_ENGINE_H
#define UFFD_ENGINE_H

#include <stddef.h>
#include <stdint.h>

enum engine_mode { MODE_THREAD = 0, MODE_SIGBUS = 1 };
enum source_kind { SRC_ZERO = 0, SRC_BYTES = 1, SRC_FILL = 2, SRC_CONTINUE = 3, SRC_CACHE = 4 };

struct chunk_cache;
enum remove_policy { REMOVE_REFILL = 0, REMOVE_UNREGISTER = 1 };

struct region_params {
    uint64_t start, length; /* address in the uffd owner's address space */
    uint64_t page_size;     /* granule: a power-of-two multiple of the base page */
    int kind;               /* enum source_kind */
    const char *base;       /* SRC_BYTES: data for offsets [0, base_len); SRC_FILL: the pattern */
    uint64_t base_len;      /* SRC_BYTES: a multiple of page_size */
    const char *tail;       /* SRC_BYTES: NULL, or page_size bytes for the granule at base_len */
    int can_zeropage;       /* 0 on hugetlb */
    uint64_t readahead;     /* fixed: granules installed after the faulting one */
    uint64_t adaptive_min;  /* bytes; 0 disables adaptive readahead */
    uint64_t adaptive_max;
    const char *label;         /* NULL, or what the region serves (copied): for failure notices */
    struct chunk_cache *cache; /* SRC_CACHE (thread mode only): the chunk cache (chunkcache.h),
                                  kept alive by the caller while the region exists */
    uint64_t cache_off;        /* SRC_CACHE: the snapshot offset of the region's offset 0 */
};

#define HIST_BUCKETS 256 /* 4 sub-buckets per power of two of nanoseconds */

struct region_stats {
    uint64_t faults_missing, faults_minor, faults_wp;
    uint64_t pages_installed, bytes_installed, zero_pages;
    uint64_t eexist, poisoned, errors, removes;
    uint64_t prefetched; /* base pages installed by replay threads and engine_populate */
    uint64_t hist[HIST_BUCKETS];
};

struct engine_error {
    int err;          /* errno */
    int region_id;    /* -1: no region covers the address */
    uint64_t address; /* page that was poisoned */
    uint64_t offset;  /* source offset */
    const char *op;   /* static string: the failing operation */
};

struct engine;
typedef int (*engine_wp_fn)(void *ctx, uint64_t addr, uint64_t len);

/* Returns NULL with errno set. The engine does not own uffd. A worker that served a batch keeps
 * polling without sleeping for spin_ns (0: never spins). */
struct engine *engine_new(int uffd, int mode, int workers, int remove_policy, uint64_t base_page,
                          uint64_t spin_ns);
int engine_start(struct engine *e); /* starts workers (thread) or the event thread (sigbus) */
void engine_stop(struct engine *e); /* wakes and joins every engine thread; a populate
                                       running elsewhere returns -ECANCELED */
void engine_free(struct engine *e); /* after engine_stop */
/* Both do nothing in a forked child of the process that created the engine: its threads and
 * eventfd are the parent's, and stopping them from the child would stop the parent's serving. */
int engine_add_region(struct engine *e, const struct region_params *p); /* id >= 0 or -errno */
int engine_remove_region(struct engine *e, int id);                     /* 0 or -ENOENT */
/* Installs every missing granule of [offset, offset+length) of a region. 0 or -errno. */
int engine_populate(struct engine *e, int id, uint64_t offset, uint64_t length);
/* Copies the stats; returns 0, or -ENOENT for an unknown id (id -1: totals of all regions). */
int engine_region_stats(struct engine *e, int id, struct region_stats *out);
/* Where a region's memory is mapped now: *n (start, end, offset) triples in a malloc'ed array. */
int engine_region_pieces(struct engine *e, int id, uint64_t **out, size_t *n);
/* Copies up to max errors recorded since *cursor; returns how many, advances *cursor. */
int engine_errors(struct engine *e, uint64_t *cursor, struct engine_error *out, int max);
int engine_client_gone(struct engine *e); /* the owner's mm went away (ESRCH) */
/* remove, unmap, remap, unknown, fork */
void engine_event_counts(struct engine *e, uint64_t out[5]);
/* A region's WP faults go to fn(ctx, address, length), which must unprotect (and wake); its pages
 * are then installed write-protected (the uffd must be registered MODE_WP there). fn NULL: back
 * to plain installs. Returns once no fault is inside the previous fn. 0 or -ENOENT. */
int engine_region_set_wp(struct engine *e, int id, engine_wp_fn fn, void *ctx);

/* Working sets. Recording keeps the first touch of each granule of a region (its source offset
 * and the time since the recording started) in first-touch order, written on the fault path into
 * an array allocated here; readahead should be off meanwhile, so that every first touch is a
 * fault. 0, -ENOENT, -EBUSY (already recorded), -ENOMEM. */
int engine_record_start(struct engine *e, int id);
/* Ends the recording (if still on) and returns its *n (offset, ns) pairs in a malloc'ed array
 * (NULL when *n is 0). Can be called again: the same pairs. 0, -ENOENT, -EINVAL (never
 * recorded), -ENOMEM. */
int engine_record_finish(struct engine *e, int id, uint64_t **out, size_t *n);
/* Installs n (region id, offset, length) runs in the background, in this order, with `threads`
 * threads of low priority, while the workers keep serving faults. Granules already present or
 * removed (REMOVE event) are skipped; the threads end at the last run, at engine_stop, or when
 * the client has gone. `speculative`: runs nobody predicted will be touched soon (streaming the
 * rest of the memory), installed only with CPU time that would otherwise idle. 0, -EINVAL,
 * -EAGAIN (too many replays running), -ENOMEM, -errno. */
int engine_replay(struct engine *e, const uint64_t *runs, size_t n, int threads, int speculative);
/* Replays whose threads have not finished yet. */
int engine_replays_running(struct engine *e);

#endif
