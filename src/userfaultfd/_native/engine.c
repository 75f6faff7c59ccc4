/* The fault-serving engine. No Python object is touched anywhere in this file.
 *
 * Regions are reached through an immutable table of extents (address range -> region, source
 * offset), replaced whole by writers under e->lock and read lock-free by workers and by the SIGBUS
 * handler. A retired table or region is freed only after a grace period (struct srcu). */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "abi.h"
#include "chunkcache.h"
#include "clock.h"
#include "notice.h"
#include "sigbus.h"
#include "srcu.h"

#define MAX_WORKERS 64
#define BATCH 64
#define ERR_RING 64
#define FILL_CAP (256u * 1024u) /* the most one COPY of a fill pattern installs */
#define MAX_POISONED 64         /* per region; past that every filled granule counts as poisoned */
#define CHILD_PROBE_MS 100      /* how often an idle child's engine checks that the child lives */
#define MAX_REPLAYS 16
#define MAX_REPLAY_THREADS 16
#define REPLAY_PIECE (1u << 20) /* replay runs are cut into pieces of at most this many bytes */
#define REPLAY_NICE 10          /* replay threads run below the workers serving faults */
#define REPLAY_MISSES_IDLE 32   /* faults outside the replayed set before it may idle */

/* ---- regions and the extent table ---- */

struct touch { /* a recorded first touch */
    uint64_t granule, ns;
};

struct region {
    int id;
    struct region_params p;
    unsigned shift;   /* log2(page_size) */
    uint64_t npages;  /* granules */
    uint64_t *filled; /* one bit per granule, accessed atomically */
    char *fill_block; /* SRC_FILL: the pattern repeated over fill_len bytes */
    size_t fill_len;
    char *zero_block; /* where ZEROPAGE is not allowed: a read-only zero mapping */
    atomic_uint_fast64_t ra_lo, ra_hi, ra_window; /* the last chunk, in granules */
    /* Poisoned granules. Without CONFIG_MEMORY_FAILURE a poisoned page raises SIGBUS with the same
     * si_code as a userfault, so the SIGBUS handler must know them to pass them on. */
    atomic_uint_fast64_t poisoned[MAX_POISONED];
    atomic_uint npoisoned;
    atomic_int poison_overflow;
    char label[160]; /* "region ID SOURCE", for notices */
    /* Granules removed (REMOVE event) since the region was added: replay never refills them,
     * the pages were given back (a balloon); a fault still does. */
    uint64_t *removed;
    /* Granules some replay was given (one bit each): a fault on one means the replay is behind
     * the toucher, a fault elsewhere while replaying means the set missed it. */
    uint64_t *in_replay;
    atomic_int replaying;
    /* Recording first touches: one slot per granule and one bit per granule saying whether it
     * was recorded, so that every granule is written at most once and the array cannot
     * overflow: the fault path neither allocates nor locks. */
    struct touch *rec;
    uint64_t *rec_bits;
    uint64_t rec_t0;
    atomic_uint_fast64_t rec_n;
    atomic_int recording;
    /* Write protection (engine_region_set_wp): installs are write-protected, and WP faults go to
     * wp_fn, which copies, records and unprotects. Read under the engine's srcu. */
    atomic_int wp_mode;
    engine_wp_fn _Atomic wp_fn;
    void *_Atomic wp_ctx;
    struct region_stats st; /* updated with relaxed atomics */
};

/* A replay: runs installed in order by background threads that share one cursor. */
struct replay {
    struct engine *e;
    uint64_t *runs; /* (region id, offset, length) triples, each at most REPLAY_PIECE long */
    size_t n;
    atomic_size_t next;
    atomic_int running;      /* threads not yet finished */
    uint64_t hits0, misses0; /* the engine's replay fault counts when it started */
    int speculative;         /* SCHED_IDLE from the start; its runs are not counted as hits */
    int nthreads;
    pthread_t threads[MAX_REPLAY_THREADS];
};

struct extent {
    uint64_t start, end, off; /* [start, end) maps source offsets [off, off + end - start) */
    struct region *r;
};

struct table {
    size_t n;
    struct extent x[];
};

struct engine {
    pid_t owner; /* a forked child holds a copy: its threads and eventfd are the parent's */
    int uffd, mode, nworkers, remove_policy;
    uint64_t base_page, spin_ns;
    int stop_fd;
    pthread_t threads[MAX_WORKERS + 1]; /* the workers, and the forker thread */
    int nthreads;
    pthread_mutex_t lock; /* writers: the table and the region list */
    /* A worker reads under read_lock and, when its batch holds events, keeps it until they are
     * handled: the caller of madvise/mremap/munmap runs on as soon as its event is read, and a
     * fault it takes next, read by another worker, must already see the event's effect. */
    pthread_mutex_t read_lock;
    atomic_int reading; /* sigbus mode: the event thread is between read() and handling */
    struct table *_Atomic table;
    struct srcu srcu;
    struct region **regions;
    int nregions, cap, next_id;
    atomic_uint_fast64_t nerrors;
    struct {
        struct engine_error e;
        atomic_uint_fast64_t seq; /* n + 1 once error n is written: readers stop before it */
    } errors[ERR_RING];
    atomic_int gone, stopping;
    atomic_uint_fast64_t events[5]; /* remove, unmap, remap, unknown, fork */
    /* fork(): the kernel gives each forked child of the uffd's owner a uffd of its own (the
     * FORK event); an engine of its own serves it from the same regions. */
    struct engine *root;     /* the engine Python created: errors are recorded there */
    struct engine *parent;   /* set on an engine serving a forked child */
    struct engine *children; /* engines serving forked children, linked by sibling, under lock */
    struct engine *sibling;
    uint64_t probe; /* children: a page in no region, for the liveness probe */
    /* FORK events go through this pipe (fds) to a thread of their own: a reader must never
     * allocate while it holds read_lock, since the forking thread holds glibc's malloc locks
     * until it returns from fork(), and it returns only once a reader has read its event. */
    int fork_pipe[2];
    /* Faults in replayed regions: on pages a replay holds (hits) or not (misses). */
    atomic_uint_fast64_t replay_hits, replay_misses;
    atomic_int predicted; /* threads of replays that are not speculative, still running */
    struct replay *replays[MAX_REPLAYS]; /* under lock */
};

#define ADD(field, n) __atomic_fetch_add(&(field), (n), __ATOMIC_RELAXED)
#define SUB(field, n) __atomic_fetch_sub(&(field), (n), __ATOMIC_RELAXED)

static unsigned hist_bucket(uint64_t ns)
{
    if (ns < 4)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    return msb * 4u + (unsigned)((ns >> (msb - 2u)) & 3u);
}

static void record_error(struct engine *e, int err, int region_id, uint64_t addr, uint64_t off,
                         const char *op)
{
    e = e->root;
    uint64_t n = atomic_fetch_add(&e->nerrors, 1);
    e->errors[n % ERR_RING].e = (struct engine_error){err, region_id, addr, off, op};
    atomic_store_explicit(&e->errors[n % ERR_RING].seq, n + 1, memory_order_release);
}

static int bit_test(const struct region *r, uint64_t i)
{
    return (__atomic_load_n(&r->filled[i >> 6], __ATOMIC_RELAXED) >> (i & 63u)) & 1u;
}

static void bits_set(struct region *r, uint64_t i, uint64_t n, int on)
{
    for (; n; i++, n--) {
        uint64_t bit = 1ull << (i & 63u);
        if (on)
            __atomic_fetch_or(&r->filled[i >> 6], bit, __ATOMIC_RELAXED);
        else
            __atomic_fetch_and(&r->filled[i >> 6], ~bit, __ATOMIC_RELAXED);
    }
}

/* Bit i of a per-granule bitmap other than `filled` (removed, in_replay). */
static int map_test(const uint64_t *map, uint64_t i)
{
    return (__atomic_load_n(&map[i >> 6], __ATOMIC_RELAXED) >> (i & 63u)) & 1u;
}

/* Notes the first touch of granule i at time t (ns) if the region is being recorded. Safe in
 * the SIGBUS handler: atomics and a store, nothing else. */
static void record_touch(struct region *r, uint64_t i, uint64_t t)
{
    if (!atomic_load_explicit(&r->recording, memory_order_acquire))
        return;
    uint64_t bit = 1ull << (i & 63u);
    if (__atomic_fetch_or(&r->rec_bits[i >> 6], bit, __ATOMIC_RELAXED) & bit)
        return; /* touched before, or a duplicate fault */
    uint64_t k = atomic_fetch_add_explicit(&r->rec_n, 1, memory_order_relaxed);
    r->rec[k] = (struct touch){i, t > r->rec_t0 ? t - r->rec_t0 : 0};
}

static const struct extent *lookup(const struct table *t, uint64_t addr)
{
    size_t lo = 0, hi = t ? t->n : 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (addr < t->x[mid].start)
            hi = mid;
        else if (addr >= t->x[mid].end)
            lo = mid + 1;
        else
            return &t->x[mid];
    }
    return NULL;
}

/* ---- ioctls ---- */

static int range_ioctl(int uffd, unsigned long req, uint64_t start, uint64_t len)
{
    struct uffdio_range r = {start, len};
    return ioctl(uffd, req, &r) == 0 ? 0 : errno;
}

/* One fill ioctl. Returns 0 or errno; *done is the number of bytes installed either way. */
static int fill_ioctl(int uffd, unsigned long req, uint64_t dst, uint64_t src, uint64_t len,
                      uint64_t mode, uint64_t *done)
{
    int rc;
    int64_t result;
    if (req == UFFDIO_COPY) {
        struct uffdio_copy c = {dst, src, len, mode, 0};
        rc = ioctl(uffd, req, &c);
        result = c.result;
    } else {
        struct uffdio_rangeop o = {{dst, len}, mode, 0};
        rc = ioctl(uffd, req, &o);
        result = o.result;
    }
    if (rc == 0) {
        *done = len;
        return 0;
    }
    *done = result > 0 ? (uint64_t)result : 0;
    return errno;
}

/* ---- installing pages ---- */

/* install()'s plan for a chunk not yet in the cache (SRC_CACHE): wait for it. */
#define PLAN_WAIT 0ul

/* SRC_CACHE: the plan from the chunk cache. A copy pins its chunk (*pinned: the chunk, to unpin
 * after the copy); a chunk not present is PLAN_WAIT, one that failed is UFFDIO_POISON. */
static unsigned long plan_cached(const struct region *r, uint64_t off, uint64_t want, uint64_t *src,
                                 uint64_t *len, uint64_t *chunk, int *pinned)
{
    switch (cache_plan(r->p.cache, r->p.cache_off + off, want, src, len, chunk)) {
    case PLAN_COPY:
        *pinned = 1;
        return UFFDIO_COPY;
    case PLAN_POISON:
        return UFFDIO_POISON;
    case PLAN_MISS:
        return PLAN_WAIT;
    default: /* PLAN_ZERO */
        if (r->p.can_zeropage)
            return UFFDIO_ZEROPAGE;
        *src = (uint64_t)(uintptr_t)r->zero_block;
        if (*len > r->p.page_size)
            *len = r->p.page_size;
        return UFFDIO_COPY;
    }
}

/* The next operation for the source bytes at offset `off`, at most `want` bytes long. */
static unsigned long plan_op(const struct region *r, uint64_t off, uint64_t want, int minor,
                             uint64_t *src, uint64_t *len, uint64_t *chunk, int *pinned)
{
    const struct region_params *p = &r->p;
    *len = want;
    *src = 0;
    *pinned = 0;
    if (minor)
        return UFFDIO_CONTINUE;
    if (p->kind == SRC_CACHE)
        return plan_cached(r, off, want, src, len, chunk, pinned);
    if (p->kind == SRC_FILL) {
        *src = (uint64_t)(uintptr_t)(r->fill_block + off % p->base_len);
        if (*len > r->fill_len - p->base_len)
            *len = (r->fill_len - p->base_len) & ~(p->page_size - 1);
        return UFFDIO_COPY;
    }
    if (p->kind == SRC_BYTES && off < p->base_len) {
        *src = (uint64_t)(uintptr_t)(p->base + off);
        if (*len > p->base_len - off)
            *len = p->base_len - off;
        return UFFDIO_COPY;
    }
    if (p->kind == SRC_BYTES && p->tail && off < p->base_len + p->page_size) {
        *src = (uint64_t)(uintptr_t)(p->tail + (off - p->base_len));
        if (*len > p->page_size)
            *len = p->page_size;
        return UFFDIO_COPY;
    }
    /* Everything else reads as zeros. ZEROPAGE cannot install write-protected: copy zeros then. */
    if (p->can_zeropage && !atomic_load_explicit(&r->wp_mode, memory_order_relaxed))
        return UFFDIO_ZEROPAGE;
    *src = (uint64_t)(uintptr_t)r->zero_block;
    if (*len > p->page_size)
        *len = p->page_size;
    return UFFDIO_COPY;
}

static int is_poisoned(struct region *r, uint64_t i)
{
    unsigned n = atomic_load(&r->npoisoned);
    for (unsigned k = 0; k < n && k < MAX_POISONED; k++)
        if (atomic_load_explicit(&r->poisoned[k], memory_order_relaxed) == i)
            return 1;
    return atomic_load(&r->poison_overflow) && bit_test(r, i);
}

static void poison(struct engine *e, struct region *r, uint64_t addr, uint64_t len, uint64_t off,
                   int err, const char *op)
{
    uint64_t done;
    /* The toucher dies of this SIGBUS unless it handles it: the line it leaves is written now. */
    char text[NOTICE_TEXT];
    struct fmt f = {text, text + sizeof(text)};
    fmt_str(&f, r ? r->label : "an address in no region");
    if (r) {
        fmt_str(&f, " at offset ");
        fmt_hex(&f, off);
    }
    fmt_str(&f, " could not be produced and was poisoned: ");
    fmt_errno(&f, err);
    fmt_str(&f, " in ");
    fmt_str(&f, op);
    notice_record(addr, addr + len, text);
    if (r) {
        unsigned k = atomic_fetch_add(&r->npoisoned, 1);
        if (k < MAX_POISONED)
            atomic_store(&r->poisoned[k], off >> r->shift);
        else
            atomic_store(&r->poison_overflow, 1);
    }
    int rc = fill_ioctl(e->uffd, UFFDIO_POISON, addr, 0, len, UFFDIO_MODE_DONTWAKE, &done);
    record_error(e, err, r ? r->id : -1, addr, off, op);
    if (r) {
        ADD(r->st.errors, 1);
        if (rc == 0)
            ADD(r->st.poisoned, 1);
    }
}

/* Set while this thread runs engine_populate (prefetch, a stop's drain): what it installs counts
 * as prefetched, as a replay's does. */
static _Thread_local int populating;
/* What install() is asked to do (flags). */
#define INSTALL_MINOR 1u    /* UFFDIO_CONTINUE: the page cache holds the data */
#define INSTALL_PREFETCH 2u /* a replay thread, not a fault: counted as prefetched */

/* Adds (sign 1) or takes back (sign -1) n bytes installed by operation req to the stats. */
static void count_installed(const struct engine *e, struct region *r, unsigned long req, uint64_t n,
                            int sign, unsigned how)
{
    const uint64_t pages = n / e->base_page;
    if (sign > 0) {
        ADD(r->st.pages_installed, pages);
        ADD(r->st.bytes_installed, n);
        if (req == UFFDIO_ZEROPAGE)
            ADD(r->st.zero_pages, pages);
        if ((how & INSTALL_PREFETCH) || populating)
            ADD(r->st.prefetched, pages);
    } else {
        SUB(r->st.pages_installed, pages);
        SUB(r->st.bytes_installed, n);
        if (req == UFFDIO_ZEROPAGE)
            SUB(r->st.zero_pages, pages);
        if ((how & INSTALL_PREFETCH) || populating)
            SUB(r->st.prefetched, pages);
    }
}

/* Installs the part of [addr, addr + len) (granule aligned) inside extent x from its source: a
 * partial mremap can split an extent inside a granule. Every granule ends installed, already
 * present, poisoned, or gone (see ENOENT below). Returns 0, EAGAIN when an event is pending (the
 * rest was not attempted), ESRCH when the owner of the uffd is gone, or ENOENT when the unit at
 * `fault` (UINT64_MAX: none) is gone; ENODATA when chunks not yet in the cache were left for
 * their fill to wake (SRC_CACHE). */
static int install(struct engine *e, const struct extent *x, uint64_t addr, uint64_t len,
                   unsigned how, uint64_t fault)
{
    const int minor = (how & INSTALL_MINOR) != 0;
    struct region *r = x->r;
    const uint64_t end = addr + len < x->end ? addr + len : x->end;
    addr = addr > x->start ? addr : x->start;
    if (end <= addr)
        return 0;
    len = end - addr;
    /* The kernel's own unit: a failure at pos concerns one base page, or one huge page. */
    const uint64_t unit = r->p.can_zeropage ? e->base_page : r->p.page_size;
    uint64_t pos = addr, wake_from = addr;
    int ret = 0, need_wake = 0, hole = 0; /* hole: a MINOR granule with no page cache page */
    const int sigbus = e->mode == MODE_SIGBUS;
    uint64_t cap = UINT64_MAX; /* the longest next op: halved on ENOENT, doubled on success */
    /* Pages installed to serve a read must not count as written: protect them as they land. */
    const uint64_t wp = atomic_load(&r->wp_mode) ? UFFDIO_COPY_MODE_WP : 0;

    while (pos < end) {
        uint64_t off = x->off + (pos - x->start), src, seg, done, chunk = 0;
        uint64_t want = hole ? unit : end - pos;
        int pinned;
        unsigned long req =
            plan_op(r, off, want < cap ? want : cap, minor && !hole, &src, &seg, &chunk, &pinned);
        hole = 0;
        if (req == PLAN_WAIT && !(fault >= pos && fault < pos + seg)) {
            /* Readahead into a chunk not in the cache: it is fetched in the background (fetches
             * cost more than copies, so the run stops there once past the fault). */
            cache_request(r->p.cache, chunk);
            if (need_wake && pos > wake_from && !sigbus)
                range_ioctl(e->uffd, UFFDIO_WAKE, wake_from, pos - wake_from);
            need_wake = 0;
            pos += seg;
            wake_from = pos;
            ret = ret ? ret : ENODATA;
            if (fault < pos - seg)
                break;
            continue;
        }
        if (req == PLAN_WAIT) {
            /* The faulting unit's chunk is not in the cache yet: the fault waits, the fetchers
             * are told (it goes first), and the fill wakes it. What was installed before is
             * woken now; the rest of the run goes on. */
            int waiting = cache_wait(r->p.cache, chunk, e->uffd, pos, seg);
            if (waiting == 1)
                continue; /* it arrived meanwhile */
            if (need_wake && pos > wake_from && !sigbus)
                range_ioctl(e->uffd, UFFDIO_WAKE, wake_from, pos - wake_from);
            if (waiting < 0) /* no memory to wait in: the fault comes again, and is served then */
                range_ioctl(e->uffd, UFFDIO_WAKE, pos, seg);
            need_wake = 0;
            pos += seg;
            wake_from = pos;
            ret = ret ? ret : ENODATA;
            continue;
        }
        if (req == UFFDIO_POISON) { /* the chunk could not be fetched or verified */
            poison(e, r, pos, seg, off, EIO, "store chunk");
            bits_set(r, off >> r->shift, seg >> r->shift, 1);
            pos += seg;
            need_wake = 1;
            continue;
        }
        /* One operation covering the whole chunk wakes the faulter itself; otherwise batch. It is
         * counted before, so that the stats never trail a toucher who has resumed. */
        int single = !need_wake && seg == end - pos && !sigbus;
        if (single)
            count_installed(e, r, req, seg, 1, how);
        uint64_t mode = (single ? 0 : UFFDIO_MODE_DONTWAKE) | wp; /* COPY/CONTINUE_MODE_WP */
        int err = fill_ioctl(e->uffd, req, pos, src, seg, mode, &done);
        if (pinned)
            cache_unpin(r->p.cache, chunk);
        if (!single || err)
            need_wake = 1; /* also when the op failed: the faulter must not sleep on (ENOENT) */
        if (single && done < seg)
            count_installed(e, r, req, seg - done, -1, how);
        else if (!single)
            count_installed(e, r, req, done, 1, how);
        if (done) {
            /* granules wholly installed (an extent split inside a granule installs parts) */
            uint64_t gi = (off + r->p.page_size - 1) >> r->shift, gj = (off + done) >> r->shift;
            if (gj > gi)
                bits_set(r, gi, gj - gi, 1);
            pos += done;
        }
        if (err == 0 || (err == EAGAIN && done)) {
            cap = cap > UINT64_MAX / 2 ? UINT64_MAX : cap * 2;
            continue;
        }
        if (err == EAGAIN) {
            ret = EAGAIN;
            break;
        }
        if (err == EEXIST) { /* somebody else installed it: a race, or a duplicate fault */
            ADD(r->st.eexist, 1);
            bits_set(r, (off + done) >> r->shift, 1, 1);
            pos += unit;
            need_wake = 1;
            continue;
        }
        if (err == ENOENT && seg - done > unit) {
            /* Part of the op is in no VMA registered with us: a split (mprotect, mlock,
             * madvise(MADV_DONTDUMP) on part of the region) ends inside it, and a COPY must lie
             * in one VMA; or pages went away. Halving finds the boundary in a few ops. */
            cap = ((seg - done) / 2) & ~(unit - 1);
            continue;
        }
        if (err == ENOENT) {
            /* This unit alone is not ours any more: unmapped by a client that asked for no UNMAP
             * event, or being unregistered. Marked filled, so that neither readahead nor
             * populate tries it again; the wake lets a faulter retry (and fault elsewhere). */
            bits_set(r, (off + done) >> r->shift, 1, 1);
            if (fault >= pos && fault < pos + unit)
                ret = ENOENT;
            pos += unit;
            continue;
        }
        if (err == ESRCH) {
            atomic_store(&e->gone, 1);
            ret = ESRCH;
            break;
        }
        if (req == UFFDIO_CONTINUE && err == EFAULT) { /* not in the page cache: a hole, zeros */
            hole = 1;
            continue;
        }
        /* The source could not produce this page: never install wrong data. EFAULT on a COPY:
         * reading the source's memory faulted (a mapped file shrank). */
        poison(e, r, pos, unit, off + done, err,
               req == UFFDIO_COPY && err == EFAULT
                   ? "UFFDIO_COPY, reading the source (a file that shrank, or an unpopulated "
                     "sigbus-mode region?)"
               : req == UFFDIO_COPY     ? "UFFDIO_COPY"
               : req == UFFDIO_CONTINUE ? "UFFDIO_CONTINUE"
                                        : "UFFDIO_ZEROPAGE");
        bits_set(r, (off + done) >> r->shift, 1, 1);
        pos += unit;
        need_wake = 1;
    }
    if (need_wake && !sigbus && end > wake_from)
        range_ioctl(e->uffd, UFFDIO_WAKE, wake_from, end - wake_from);
    return ret;
}

/* The run of granules to install for a fault on granule i, within [lo, hi) (the extent): the
 * faulting granule plus readahead, clipped to granules not yet filled. Adaptive readahead starts
 * at the faulting granule alone: a random fault costs what it costs without readahead. A fault
 * that continues the last chunk, forwards or backwards (memmove copies large blocks from the
 * end), is a stream: the window opens at the minimum and doubles up to the maximum with every
 * further fault of the stream. A jump closes it at once. Returns the first granule. */
static uint64_t chunk(struct region *r, uint64_t i, uint64_t lo, uint64_t hi, uint64_t *count)
{
    const struct region_params *p = &r->p;
    uint64_t want = 1 + p->readahead;
    int dir = 1;
    if (p->adaptive_min) {
        uint64_t w = atomic_load_explicit(&r->ra_window, memory_order_relaxed); /* 0: closed */
        uint64_t plo = atomic_load_explicit(&r->ra_lo, memory_order_relaxed);
        uint64_t phi = atomic_load_explicit(&r->ra_hi, memory_order_relaxed);
        uint64_t near = w >> r->shift ? w >> r->shift : 1;
        uint64_t grown = !w ? p->adaptive_min : w * 2 > p->adaptive_max ? p->adaptive_max : w * 2;
        if (phi != UINT64_MAX && i >= plo && i <= phi + near)
            w = grown;
        else if (phi != UINT64_MAX && i < plo && i + near >= plo)
            w = grown, dir = -1;
        else
            w = 0;
        atomic_store_explicit(&r->ra_window, w, memory_order_relaxed);
        want = w >> r->shift ? w >> r->shift : 1;
    }
    uint64_t n = 1, first = i;
    if (dir > 0) {
        while (n < want && i + n < hi && !bit_test(r, i + n))
            n++;
    } else {
        while (n < want && first > lo && !bit_test(r, first - 1))
            first--, n++;
    }
    if (p->adaptive_min) {
        atomic_store_explicit(&r->ra_lo, first, memory_order_relaxed);
        atomic_store_explicit(&r->ra_hi, first + n, memory_order_relaxed);
    }
    *count = n;
    return first;
}

/* Serves one fault at addr (any address inside the faulting page). */
static int resolve(struct engine *e, const struct table *t, uint64_t addr, uint64_t flags,
                   uint64_t t0)
{
    const struct extent *x = lookup(t, addr);
    if (!x) { /* registered with our uffd but in no region: never answer with made-up data */
        poison(e, NULL, addr & ~(e->base_page - 1), e->base_page, 0, ENXIO, "lookup");
        if (e->mode == MODE_THREAD)
            range_ioctl(e->uffd, UFFDIO_WAKE, addr & ~(e->base_page - 1), e->base_page);
        return 0;
    }
    struct region *r = x->r;
    const uint64_t g = r->p.page_size;
    uint64_t off = x->off + (addr - x->start);
    uint64_t goff = off & ~(g - 1);
    uint64_t gaddr = addr - (off - goff);
    int rc;

    /* In sigbus mode a WP fault comes as a SIGBUS on a write to a page already installed. */
    int is_wp = (flags & UFFD_PAGEFAULT_FLAG_WP) ||
                (e->mode == MODE_SIGBUS && (flags & UFFD_PAGEFAULT_FLAG_WRITE) &&
                 atomic_load(&r->wp_mode) && bit_test(r, goff >> r->shift));
    if (is_wp) {
        struct uffdio_writeprotect wp = {{gaddr, g}, 0};
        engine_wp_fn fn = atomic_load(&r->wp_fn);
        ADD(r->st.faults_wp, 1);
        if (fn)
            rc = fn(atomic_load(&r->wp_ctx), gaddr, g);
        else
            rc = ioctl(e->uffd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
    } else {
        int minor = (flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0 ||
                    (e->mode == MODE_SIGBUS && r->p.kind == SRC_CONTINUE);
        ADD(*(minor ? &r->st.faults_minor : &r->st.faults_missing), 1);
        uint64_t i = goff >> r->shift, n;
        uint64_t lo = (x->off + r->p.page_size - 1) >> r->shift;
        uint64_t first = chunk(r, i, lo, i + ((x->end - gaddr) >> r->shift), &n);
        record_touch(r, i, t0);
        if (atomic_load_explicit(&r->replaying, memory_order_relaxed))
            ADD(*(map_test(r->in_replay, i) ? &e->replay_hits : &e->replay_misses), 1);
        rc = install(e, x, gaddr - ((i - first) << r->shift), n << r->shift,
                     minor ? INSTALL_MINOR : 0, addr & ~(e->base_page - 1));
    }
    uint64_t dt = now_ns() - t0;
    ADD(r->st.hist[hist_bucket(dt)], 1);
    return rc;
}

/* ---- non-cooperative events (called with e->lock held) ---- */

static void publish(struct engine *e, struct table *t)
{
    struct table *old = atomic_exchange(&e->table, t);
    srcu_synchronize(&e->srcu);
    free(old);
}

static int cmp_extent(const void *a, const void *b)
{
    const struct extent *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* A new table in which the part of every extent inside [from, from + len) is dropped (to == 0)
 * or moved to `to`. */
static struct table *retable(const struct table *t, uint64_t from, uint64_t len, uint64_t to,
                             int move)
{
    size_t n = t ? t->n : 0;
    struct table *nt = malloc(sizeof(*nt) + (3 * n + 1) * sizeof(struct extent));
    if (!nt)
        return NULL;
    nt->n = 0;
    uint64_t lo = from, hi = from + len;
    for (size_t k = 0; k < n; k++) {
        struct extent x = t->x[k];
        if (x.end <= lo || x.start >= hi) {
            nt->x[nt->n++] = x;
            continue;
        }
        uint64_t a = x.start > lo ? x.start : lo, b = x.end < hi ? x.end : hi;
        if (x.start < a)
            nt->x[nt->n++] = (struct extent){x.start, a, x.off, x.r};
        if (b < x.end)
            nt->x[nt->n++] = (struct extent){b, x.end, x.off + (b - x.start), x.r};
        if (move)
            nt->x[nt->n++] =
                (struct extent){a - from + to, b - from + to, x.off + (a - x.start), x.r};
    }
    qsort(nt->x, nt->n, sizeof(struct extent), cmp_extent);
    return nt;
}

static void fork_child(struct engine *e, int fd);

static void handle_event(struct engine *e, const struct uffd_msg *m)
{
    if (m->event == UFFD_EVENT_FORK) {
        /* Queued for the forker thread, without e->lock: the forker may hold it while it
         * allocates, which waits for a forking thread that waits for this event to be read. */
        int fd = (int)m->arg.fork.ufd;
        ADD(e->events[4], 1);
        if (e->fork_pipe[1] < 0 || write(e->fork_pipe[1], &fd, sizeof(fd)) != sizeof(fd)) {
            record_error(e, EMFILE, -1, 0, 0, "fork");
            close(fd); /* nothing can serve it: the child's regions read as plain memory */
        }
        return;
    }
    pthread_mutex_lock(&e->lock);
    struct table *t = atomic_load(&e->table), *nt = NULL;
    switch (m->event) {
    case UFFD_EVENT_REMOVE: {
        uint64_t s = m->arg.remove.start, end = m->arg.remove.end;
        ADD(e->events[0], 1);
        if (e->remove_policy == REMOVE_UNREGISTER)
            range_ioctl(e->uffd, UFFDIO_UNREGISTER, s, end - s);
        for (size_t k = 0; t && k < t->n; k++) {
            const struct extent *x = &t->x[k];
            if (x->end <= s || x->start >= end)
                continue;
            uint64_t a = x->start > s ? x->start : s, b = x->end < end ? x->end : end;
            struct region *r = x->r;
            uint64_t i = (x->off + (a - x->start)) >> r->shift;
            uint64_t j = (x->off + (b - x->start) + r->p.page_size - 1) >> r->shift;
            /* Removed pages are served again from the source (or, unregistered, read zeros). */
            bits_set(r, i, j - i, e->remove_policy == REMOVE_REFILL ? 0 : 1);
            for (uint64_t g = i; g < j; g++) /* and never again by a replay */
                __atomic_fetch_or(&r->removed[g >> 6], 1ull << (g & 63u), __ATOMIC_RELAXED);
            for (unsigned k = 0; k < MAX_POISONED; k++) { /* the zap dropped the poison too */
                uint64_t pi = atomic_load(&r->poisoned[k]);
                if (pi >= i && pi < j)
                    atomic_store(&r->poisoned[k], UINT64_MAX);
            }
            ADD(r->st.removes, 1);
        }
        break;
    }
    case UFFD_EVENT_UNMAP:
        ADD(e->events[1], 1);
        nt = retable(t, m->arg.remove.start, m->arg.remove.end - m->arg.remove.start, 0, 0);
        break;
    case UFFD_EVENT_REMAP:
        ADD(e->events[2], 1);
        nt = retable(t, m->arg.remap.from, m->arg.remap.len, m->arg.remap.to, 1);
        break;
    default:
        ADD(e->events[3], 1);
        record_error(e, EPROTO, -1, m->event, 0, "unexpected event");
    }
    if (nt)
        publish(e, nt);
    else if (m->event == UFFD_EVENT_UNMAP || m->event == UFFD_EVENT_REMAP)
        record_error(e, ENOMEM, -1, 0, 0, "event");
    pthread_mutex_unlock(&e->lock);
}

/* ---- worker threads ---- */

/* read() under read_lock: the number of messages, *events of them not page faults. On success
 * it returns with the lock held (the caller releases it, after handling the batch's events if
 * it has any); -1 with *err set, and the lock released, if not. */
static int read_batch(struct engine *e, struct uffd_msg *msgs, int *events, int *err)
{
    pthread_mutex_lock(&e->read_lock);
    atomic_store(&e->reading, 1);
    ssize_t n = read(e->uffd, msgs, BATCH * sizeof(struct uffd_msg));
    *err = n < 0 ? errno : 0;
    if (n < (ssize_t)sizeof(struct uffd_msg)) { /* a uffd never returns less; be safe */
        atomic_store(&e->reading, 0);
        pthread_mutex_unlock(&e->read_lock);
        *err = *err ? *err : EAGAIN;
        return -1;
    }
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    *events = 0;
    for (int k = 0; k < count; k++)
        *events += msgs[k].event != UFFD_EVENT_PAGEFAULT;
    if (!*events)
        atomic_store(&e->reading, 0); /* else it stays set until the events are handled */
    return count;
}

/* Serves the page faults of a batch. The kernel hands out queued faults before queued events,
 * so a fault at the new address of an mremap can come ahead of its REMAP event: when `later` is
 * given, faults at addresses in no region are marked in it, to be served (pass 1) once the
 * batch's events are applied. Returns how many were marked. */
static int serve_faults(struct engine *e, const struct uffd_msg *msgs, int count, uint8_t *later,
                        int pass, uint64_t t0)
{
    int marked = 0;
    unsigned idx = srcu_enter(&e->srcu);
    const struct table *t = atomic_load(&e->table);
    for (int k = 0; k < count; k++) {
        const struct uffd_msg *m = &msgs[k];
        uint64_t addr = m->arg.pagefault.address;
        if (m->event != UFFD_EVENT_PAGEFAULT || (pass == 1 && !later[k]))
            continue;
        if (pass == 0 && later && (later[k] = lookup(t, addr) == NULL)) {
            marked++;
            continue;
        }
        /* EAGAIN: an event is pending. Waking makes the faulter fault again; the event comes
         * before that new fault in the queue, so it is handled first. */
        if (resolve(e, t, addr, m->arg.pagefault.flags, t0) == EAGAIN)
            range_ioctl(e->uffd, UFFDIO_WAKE, addr & ~(e->base_page - 1), e->base_page);
    }
    srcu_exit(&e->srcu, idx);
    return marked;
}

/* A forked child's exit raises no event: its uffd just goes quiet. ZEROPAGE on a page in no
 * region fails with ENOENT while the child's memory exists, ESRCH once it has gone. */
static int child_gone(struct engine *e)
{
    struct uffdio_rangeop o = {{e->probe, e->base_page}, UFFDIO_MODE_DONTWAKE, 0};
    return ioctl(e->uffd, UFFDIO_ZEROPAGE, &o) != 0 && errno == ESRCH;
}

static void *worker(void *arg)
{
    struct engine *e = arg;
    struct uffd_msg msgs[BATCH];
    struct pollfd pf[2] = {{e->uffd, POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
    uint64_t spin_until = 0;
    for (;;) {
        /* Right after serving, poll for the next fault without sleeping for a few microseconds:
         * waking a vCPU that went idle costs more than the fault itself in a VM. */
        int count = -1, events = 0, err = 0;
        if (spin_until && now_ns() < spin_until) {
            count = read_batch(e, msgs, &events, &err);
            if (count < 0 && err == EAGAIN) {
                pf[1].revents = 0;
                if (poll(&pf[1], 1, 0) > 0)
                    break;
                continue;
            }
        } else {
            int sigbus = e->mode == MODE_SIGBUS; /* the only thread: it guards the handler */
            if (sigbus)
                sigbus_guard();
            int ready = poll(pf, 2, sigbus ? SIGBUS_GUARD_MS : e->parent ? CHILD_PROBE_MS : -1);
            if (ready < 0 && errno != EINTR) {
                record_error(e, errno, -1, 0, 0, "poll");
                break;
            }
            if (ready == 0) { /* idle: a child's engine checks that the child lives */
                if (e->parent && child_gone(e)) {
                    atomic_store(&e->gone, 1);
                    break;
                }
                continue;
            }
            if (pf[1].revents)
                break;
            if (pf[0].revents & (POLLERR | POLLNVAL)) {
                record_error(e, EBADF, -1, 0, 0, "poll");
                break;
            }
            count = read_batch(e, msgs, &events, &err);
        }
        if (count < 0) {
            spin_until = 0;
            if (err == EAGAIN || err == EINTR)
                continue;
            record_error(e, err, -1, 0, 0, "read");
            break;
        }
        uint64_t t0 = now_ns();
        if (events < count)
            spin_until = e->spin_ns ? t0 + e->spin_ns : 0;
        if (!events)
            pthread_mutex_unlock(&e->read_lock);
        uint8_t later[BATCH];
        int nlater = serve_faults(e, msgs, count, events ? later : NULL, 0, t0);
        if (events) {
            for (int k = 0; k < count; k++)
                if (msgs[k].event != UFFD_EVENT_PAGEFAULT)
                    handle_event(e, &msgs[k]);
            if (nlater)
                serve_faults(e, msgs, count, later, 1, t0);
            atomic_store(&e->reading, 0);
            pthread_mutex_unlock(&e->read_lock);
        }
    }
    return NULL;
}

/* ---- the SIGBUS resolver's callback (sigbus.c) ---- */

/* Runs in the SIGBUS handler of the faulting thread: serves addr if a region of e covers it. */
static int sigbus_resolve(void *ctx, uint64_t addr, int write, uint64_t t0)
{
    struct engine *e = ctx;
    while (atomic_load(&e->reading)) /* an event (mremap, ...) is being applied */
        sched_yield();
    unsigned idx = srcu_enter(&e->srcu);
    const struct table *t = atomic_load(&e->table);
    const struct extent *x = lookup(t, addr);
    /* A page we poisoned faults as SIGBUS too: that one belongs to the application. */
    int ours = x && !is_poisoned(x->r, (x->off + (addr - x->start)) >> x->r->shift);
    int rc = EAGAIN;
    while (ours && rc == EAGAIN) /* EAGAIN: an event is being read */
        if ((rc = resolve(e, t, addr, write ? UFFD_PAGEFAULT_FLAG_WRITE : 0, t0)) == EAGAIN)
            sched_yield();
    if (rc == ENOENT) /* not registered with us after all: retrying would loop */
        ours = 0;
    srcu_exit(&e->srcu, idx);
    return ours ? SIGBUS_RESOLVED : x ? SIGBUS_NOT_OURS : SIGBUS_ELSEWHERE;
}

/* For sigbus.c's message when a later handler took a fault: "region ID SOURCE at offset OFF"
 * if a region of e serves addr (a page not poisoned). */
static int sigbus_describe(void *ctx, uint64_t addr, struct fmt *f)
{
    struct engine *e = ctx;
    unsigned idx = srcu_enter(&e->srcu);
    const struct extent *x = lookup(atomic_load(&e->table), addr);
    uint64_t off = x ? x->off + (addr - x->start) : 0;
    int ours = x && !is_poisoned(x->r, off >> x->r->shift);
    if (ours) {
        fmt_str(f, x->r->label);
        fmt_str(f, " at offset ");
        fmt_hex(f, off);
    }
    srcu_exit(&e->srcu, idx);
    return ours;
}

/* ---- forked children ---- */

static void stop_threads(struct engine *e);
static struct region *region_new(const struct region_params *p);
static int find_region(struct engine *e, int id);
static void add_stats(struct region_stats *out, const struct region_stats *s);

/* A page no region of e can cover, for child_gone(): the lowest mappable page, as a rule. */
static uint64_t probe_address(const struct engine *e)
{
    uint64_t addr = 0x10000;
    FILE *f = fopen("/proc/sys/vm/mmap_min_addr", "re");
    unsigned long long min;
    if (f && fscanf(f, "%llu", &min) == 1 && min > addr)
        addr = (min + e->base_page - 1) & ~(e->base_page - 1);
    if (f)
        fclose(f);
    return addr;
}

/* Poisons every granule of c's regions the child may still miss (installing over present pages
 * fails with EEXIST and changes nothing), and wakes its faulters: they get SIGBUS. */
static void poison_missing(struct engine *c)
{
    const struct table *t = atomic_load(&c->table);
    for (size_t k = 0; t && k < t->n; k++) {
        const struct extent *x = &t->x[k];
        struct region *r = x->r;
        const uint64_t unit = r->p.can_zeropage ? c->base_page : r->p.page_size;
        uint64_t pos = x->start;
        while (pos < x->end) {
            uint64_t i = (x->off + (pos - x->start)) >> r->shift, done;
            if (bit_test(r, i) && !is_poisoned(r, i)) {
                pos = x->start + (((i + 1) << r->shift) - x->off);
                continue;
            }
            int err = fill_ioctl(c->uffd, UFFDIO_POISON, pos, 0, unit, UFFDIO_MODE_DONTWAKE, &done);
            if (err && err != EEXIST)
                break; /* ESRCH (gone), or no poison on this kernel: nothing more to do */
            pos += unit;
        }
        range_ioctl(c->uffd, UFFDIO_WAKE, x->start, x->end - x->start);
    }
}

/* Joins and frees the engines of children that have exited (with e->lock held); what they
 * served is added to e's regions, and their own children become e's. */
static void reap_children(struct engine *e)
{
    struct engine **link = &e->children;
    while (*link) {
        struct engine *c = *link;
        if (!atomic_load(&c->gone)) {
            link = &c->sibling;
            continue;
        }
        *link = c->sibling;
        stop_threads(c); /* its worker has exited; c's children are handed up, not stopped */
        for (int k = 0; k < c->nregions; k++) {
            int j = find_region(e, c->regions[k]->id);
            if (j >= 0)
                add_stats(&e->regions[j]->st, &c->regions[k]->st);
        }
        pthread_mutex_lock(&c->lock);
        struct engine *orphans = c->children;
        c->children = NULL;
        pthread_mutex_unlock(&c->lock);
        while (orphans) {
            struct engine *o = orphans;
            orphans = o->sibling;
            o->parent = e;
            o->sibling = e->children;
            e->children = o;
        }
        engine_free(c);
    }
}

/* The FORK event (with e->lock held): fd is the child's uffd, installed in this process by the
 * read. Its engine starts with copies of e's regions: same sources, same pages filled (private
 * memory filled at the fork was copied; shared memory is the same pages). */
static void fork_child(struct engine *e, int fd)
{
    reap_children(e);
    struct engine *c = engine_new(fd, MODE_THREAD, 1, e->remove_policy, e->base_page, 0);
    struct table *t = atomic_load(&e->table), *nt = NULL;
    int ok = c != NULL;
    if (ok) {
        c->parent = e;
        c->root = e->root;
        c->probe = probe_address(e);
        c->next_id = e->next_id;
        c->regions = calloc((size_t)e->nregions + 1, sizeof(*c->regions));
        nt = malloc(sizeof(*nt) + (t ? t->n : 0) * sizeof(struct extent));
        ok = c->regions && nt;
    }
    for (int k = 0; ok && k < e->nregions; k++) {
        const struct region *r = e->regions[k];
        struct region *cr = region_new(&r->p);
        if (!(ok = cr != NULL))
            break;
        cr->id = r->id;
        for (uint64_t w = 0; w < (r->npages + 63) / 64; w++)
            cr->filled[w] = __atomic_load_n(&r->filled[w], __ATOMIC_RELAXED);
        for (unsigned p = 0; p < MAX_POISONED; p++)
            atomic_store(&cr->poisoned[p], atomic_load(&r->poisoned[p]));
        atomic_store(&cr->npoisoned, atomic_load(&r->npoisoned));
        atomic_store(&cr->poison_overflow, atomic_load(&r->poison_overflow));
        c->regions[c->nregions++] = cr;
    }
    if (ok) {
        c->cap = e->nregions + 1;
        nt->n = 0;
        for (size_t j = 0; t && j < t->n; j++) {
            struct extent x = t->x[j];
            int k = find_region(e, x.r->id);
            x.r = c->regions[k];
            nt->x[nt->n++] = x;
        }
        atomic_store(&c->table, nt);
        nt = NULL;
        ok = engine_start(c) == 0;
    }
    if (ok) {
        c->sibling = e->children;
        e->children = c;
        return;
    }
    record_error(e, ENOMEM, -1, 0, 0, "fork");
    free(nt);
    if (c) {
        if (atomic_load(&c->table))
            poison_missing(c); /* unserved, the child must not read zeros either */
        engine_free(c);        /* closes fd */
    } else {
        close(fd); /* nothing to serve it with: the child's regions read as plain memory */
    }
}

/* Joins c's threads (a child's engine has no SIGBUS part). */
static void stop_threads(struct engine *c)
{
    uint64_t one = 1;
    atomic_store(&c->stopping, 1);
    if (write(c->stop_fd, &one, sizeof(one)) < 0) {
    }
    for (int k = 0; k < c->nthreads; k++)
        pthread_join(c->threads[k], NULL);
    c->nthreads = 0;
}

/* Creates the engines of the children whose FORK events were queued. */
static void take_forks(struct engine *e)
{
    int fd;
    while (read(e->fork_pipe[0], &fd, sizeof(fd)) == sizeof(fd)) {
        pthread_mutex_lock(&e->lock);
        fork_child(e, fd);
        pthread_mutex_unlock(&e->lock);
    }
}

static void *forker(void *arg)
{
    struct engine *e = arg;
    struct pollfd pf[2] = {{e->fork_pipe[0], POLLIN, 0}, {e->stop_fd, POLLIN, 0}};
    for (;;) {
        if (poll(pf, 2, -1) < 0 && errno != EINTR)
            break;
        if (pf[1].revents)
            break;
        take_forks(e);
    }
    return NULL;
}

/* Whether the uffd was opened with UFFD_FEATURE_EVENT_FORK (its fdinfo says). */
static int has_fork_events(int uffd)
{
    char path[64];
    unsigned long long proto, features = 0;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", uffd);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    char line[256];
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "API:\t%llx:%llx", &proto, &features) == 2)
            break;
    fclose(f);
    return (features & UFFD_FEATURE_EVENT_FORK) != 0;
}

/* ---- public API ---- */

static void replays_stop(struct engine *e);

struct engine *engine_new(int uffd, int mode, int workers, int remove_policy, uint64_t base_page,
                          uint64_t spin_ns)
{
    if (workers < 1 || workers > MAX_WORKERS || (mode != MODE_THREAD && mode != MODE_SIGBUS)) {
        errno = EINVAL;
        return NULL;
    }
    struct engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->owner = getpid();
    e->root = e;
    e->fork_pipe[0] = e->fork_pipe[1] = -1;
    e->uffd = uffd;
    e->mode = mode;
    e->nworkers = mode == MODE_SIGBUS ? 1 : workers; /* sigbus: one thread reads events */
    e->remove_policy = remove_policy;
    e->base_page = base_page;
    e->spin_ns = spin_ns;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->read_lock, NULL);
    e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->stop_fd < 0) {
        free(e);
        return NULL;
    }
    return e;
}

int engine_start(struct engine *e)
{
    sigset_t all, old;
    /* sigbus mode: the handler resolves faults; thread mode: it leaves a poisoned page's notice */
    int rc = e->mode == MODE_SIGBUS ? sigbus_attach(e, sigbus_resolve, sigbus_describe)
                                    : sigbus_install();
    if (rc)
        return -rc;
    if (e->mode == MODE_THREAD && has_fork_events(e->uffd) &&
        pipe2(e->fork_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        return -errno;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals belong to the application's threads */
    for (int k = 0; k < e->nworkers && !rc; k++) {
        rc = pthread_create(&e->threads[k], NULL, worker, e);
        if (!rc)
            e->nthreads++;
    }
    if (!rc && e->fork_pipe[0] >= 0) {
        rc = pthread_create(&e->threads[e->nthreads], NULL, forker, e);
        if (!rc)
            e->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        engine_stop(e);
    return -rc;
}

void engine_stop(struct engine *e)
{
    if (getpid() != e->owner)
        return; /* a forked child: writing the shared eventfd would stop the parent's threads */
    uint64_t one = 1;
    atomic_store(&e->stopping, 1);
    if (write(e->stop_fd, &one, sizeof(one)) < 0) { /* cannot fail on a fresh eventfd */
    }
    replays_stop(e);
    for (int k = 0; k < e->nthreads; k++)
        pthread_join(e->threads[k], NULL);
    e->nthreads = 0;
    if (e->mode == MODE_SIGBUS)
        sigbus_detach(e);
    if (e->fork_pipe[0] >= 0) {
        pthread_mutex_lock(&e->lock);
        take_forks(e); /* forks not taken yet get an engine, torn down with the others */
        pthread_mutex_unlock(&e->lock);
    }
    /* Forked children still alive lose their server: what they have not got yet is poisoned
     * (SIGBUS on touch), since closing their uffd would let them read zeros instead. */
    pthread_mutex_lock(&e->lock);
    struct engine *c = e->children;
    e->children = NULL;
    pthread_mutex_unlock(&e->lock);
    while (c) {
        struct engine *next = c->sibling;
        engine_stop(c);
        if (!atomic_load(&c->gone) && !child_gone(c))
            poison_missing(c);
        engine_free(c);
        c = next;
    }
}

static void region_free(struct region *r)
{
    if (r->fill_block)
        munmap(r->fill_block, r->fill_len);
    if (r->zero_block)
        munmap(r->zero_block, r->p.page_size);
    free(r->filled);
    free(r->removed);
    free(r->in_replay);
    free(r->rec);
    free(r->rec_bits);
    free(r);
}

void engine_free(struct engine *e)
{
    if (getpid() != e->owner)
        return; /* a forked child: the copy is left alone (its mutexes may be held) */
    if (e->parent)
        close(e->uffd); /* the fd the FORK event installed is the engine's own */
    for (int k = 0; k < 2; k++)
        if (e->fork_pipe[k] >= 0)
            close(e->fork_pipe[k]);
    atomic_store(&e->stopping, 1);
    replays_stop(e); /* replays started on an engine that never ran */
    for (int k = 0; k < e->nregions; k++)
        region_free(e->regions[k]);
    free(e->regions);
    free(atomic_load(&e->table));
    close(e->stop_fd);
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->read_lock);
    free(e);
}

static struct region *region_new(const struct region_params *p)
{
    struct region *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->p = *p;
    r->shift = (unsigned)__builtin_ctzll(p->page_size);
    r->npages = p->length >> r->shift;
    r->filled = calloc((r->npages + 63) / 64, sizeof(uint64_t));
    r->removed = calloc((r->npages + 63) / 64, sizeof(uint64_t));
    r->in_replay = calloc((r->npages + 63) / 64, sizeof(uint64_t));
    atomic_store(&r->ra_window, 0);
    atomic_store(&r->ra_hi, UINT64_MAX);
    for (unsigned k = 0; k < MAX_POISONED; k++)
        atomic_store(&r->poisoned[k], UINT64_MAX);
    if (!r->filled || !r->removed || !r->in_replay)
        goto fail;
    if (p->kind == SRC_FILL) {
        uint64_t cap = p->page_size > FILL_CAP ? p->page_size : FILL_CAP;
        r->fill_len = cap + p->base_len;
        r->fill_block =
            mmap(NULL, r->fill_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r->fill_block == MAP_FAILED) {
            r->fill_block = NULL;
            goto fail;
        }
        for (size_t k = 0; k < r->fill_len; k += p->base_len) {
            size_t n = r->fill_len - k < p->base_len ? r->fill_len - k : p->base_len;
            memcpy(r->fill_block + k, p->base, n);
        }
    }
    { /* also where ZEROPAGE is allowed: write-protected installs copy zeros from it */
        r->zero_block = mmap(NULL, p->page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r->zero_block == MAP_FAILED) {
            r->zero_block = NULL;
            goto fail;
        }
    }
    return r;
fail:
    region_free(r);
    return NULL;
}

/* A cached region is served in thread mode only (a miss waits for a fetch, which a SIGBUS
 * handler cannot), and a granule never spans two chunks. */
static int cache_fits(const struct engine *e, const struct region_params *p)
{
    return p->cache && e->mode == MODE_THREAD && cache_chunk_size(p->cache) % p->page_size == 0 &&
           p->cache_off % p->page_size == 0;
}

int engine_add_region(struct engine *e, const struct region_params *p)
{
    const uint64_t g = p->page_size;
    if (g < e->base_page || (g & (g - 1)) || p->start % g || !p->length || p->length % g ||
        p->kind < SRC_ZERO || p->kind > SRC_CACHE || (p->kind == SRC_FILL && !p->base_len) ||
        (p->kind == SRC_CACHE && !cache_fits(e, p)) || (p->kind == SRC_BYTES && p->base_len % g) ||
        (p->adaptive_min && p->adaptive_max < p->adaptive_min))
        return -EINVAL;
    struct region *r = region_new(p);
    if (!r)
        return -ENOMEM;
    pthread_mutex_lock(&e->lock);
    struct table *t = atomic_load(&e->table);
    size_t n = t ? t->n : 0;
    int rc = 0;
    for (size_t k = 0; k < n; k++)
        if (t->x[k].start < p->start + p->length && p->start < t->x[k].end)
            rc = -EEXIST;
    struct table *nt = rc ? NULL : malloc(sizeof(*nt) + (n + 1) * sizeof(struct extent));
    if (!rc && e->nregions == e->cap) {
        int cap = e->cap ? e->cap * 2 : 8;
        struct region **grown = realloc(e->regions, (size_t)cap * sizeof(*grown));
        if (grown) {
            e->regions = grown;
            e->cap = cap;
        }
    }
    if (!rc && (!nt || e->nregions == e->cap))
        rc = -ENOMEM;
    if (rc) {
        free(nt);
        pthread_mutex_unlock(&e->lock);
        region_free(r);
        return rc;
    }
    r->id = e->next_id++;
    struct fmt f = {r->label, r->label + sizeof(r->label)};
    fmt_str(&f, "region ");
    fmt_dec(&f, (uint64_t)r->id);
    if (p->label) {
        fmt_str(&f, " ");
        fmt_str(&f, p->label);
    }
    r->p.label = NULL; /* the caller's string */
    e->regions[e->nregions++] = r;
    if (n)
        memcpy(nt->x, t->x, n * sizeof(struct extent));
    nt->x[n] = (struct extent){p->start, p->start + p->length, 0, r};
    nt->n = n + 1;
    qsort(nt->x, nt->n, sizeof(struct extent), cmp_extent);
    publish(e, nt);
    pthread_mutex_unlock(&e->lock);
    return r->id;
}

static int find_region(struct engine *e, int id)
{
    for (int k = 0; k < e->nregions; k++)
        if (e->regions[k]->id == id)
            return k;
    return -1;
}

int engine_remove_region(struct engine *e, int id)
{
    pthread_mutex_lock(&e->lock);
    int k = find_region(e, id);
    if (k < 0) {
        pthread_mutex_unlock(&e->lock);
        return -ENOENT;
    }
    struct region *r = e->regions[k];
    struct table *t = atomic_load(&e->table);
    struct table *nt = malloc(sizeof(*nt) + (t ? t->n : 0) * sizeof(struct extent));
    if (!nt) {
        pthread_mutex_unlock(&e->lock);
        return -ENOMEM;
    }
    nt->n = 0;
    for (size_t j = 0; t && j < t->n; j++) {
        if (t->x[j].r != r)
            nt->x[nt->n++] = t->x[j];
        else if (e->mode == MODE_SIGBUS)
            sigbus_retire(t->x[j].start, t->x[j].end);
    }
    publish(e, nt); /* after this no worker or SIGBUS handler can still see r */
    e->regions[k] = e->regions[--e->nregions];
    /* The source goes away with the region: forked children's engines drop it too (a child's
     * fault there is then poisoned, never answered with made-up data). */
    for (struct engine *c = e->children; c; c = c->sibling)
        engine_remove_region(c, id);
    pthread_mutex_unlock(&e->lock);
    region_free(r);
    return 0;
}

/* Queues the chunks of region offsets [from, to) not yet in the cache for the fetchers;
 * returns `to`. */
static uint64_t request_chunks(const struct region *r, uint64_t from, uint64_t to)
{
    const uint64_t cs = cache_chunk_size(r->p.cache);
    for (uint64_t k = (r->p.cache_off + from) / cs; k * cs < r->p.cache_off + to; k++)
        cache_request(r->p.cache, k);
    return to;
}

/* Whether a fill should leave granule i alone: present, or (a replay) given back by a REMOVE. */
static int skip_granule(const struct region *r, uint64_t i, unsigned how)
{
    return bit_test(r, i) || ((how & INSTALL_PREFETCH) && map_test(r->removed, i));
}

/* Installs every missing granule of [offset, offset + length) of region id, in chunks of at most
 * 4 MiB. A replay (INSTALL_PREFETCH) also skips removed granules, and does not start a chunk while
 * an event is being applied (the madvise that raised it may be zapping that very range). */
static int fill_range(struct engine *e, int id, uint64_t offset, uint64_t length, unsigned how)
{
    uint64_t pos = offset, end = offset + length, requested = 0;
    while (pos < end) {
        if (atomic_load(&e->stopping))
            return -ECANCELED;
        if ((how & INSTALL_PREFETCH) && atomic_load(&e->gone))
            return -ESRCH;
        while ((how & INSTALL_PREFETCH) && atomic_load(&e->reading) && !atomic_load(&e->stopping))
            sched_yield();
        unsigned idx = srcu_enter(&e->srcu);
        const struct table *t = atomic_load(&e->table);
        const struct extent *x = NULL;
        uint64_t next = end;
        for (size_t k = 0; t && k < t->n; k++) {
            const struct extent *c = &t->x[k];
            uint64_t cend = c->off + (c->end - c->start);
            if (c->r->id != id || cend <= pos)
                continue;
            if (c->off <= pos) {
                x = c;
                break;
            }
            if (c->off < next)
                next = c->off;
        }
        if (!x) { /* nothing mapped here: skip to the next extent of the region */
            srcu_exit(&e->srcu, idx);
            pos = next;
            continue;
        }
        struct region *r = x->r;
        uint64_t g = r->p.page_size, xend = x->off + (x->end - x->start);
        uint64_t stop = end < xend ? end : xend, i = (pos & ~(g - 1)) >> r->shift;
        uint64_t last = (stop + g - 1) >> r->shift, n = 0;
        while (i < last && skip_granule(r, i, how))
            i++;
        while (i + n < last && n < (4u << 20 >> r->shift) && !skip_granule(r, i + n, how))
            n++;
        int rc = 0;
        uint64_t upto = (i + n) << r->shift; /* offsets; the extent may end inside a granule */
        upto = upto < xend ? upto : xend;
        if (r->p.kind == SRC_CACHE && stop > requested) /* all fetched at once, not one by one */
            requested = request_chunks(r, requested > pos ? requested : pos, stop);
        if (n) /* the granule may also start before the extent: install keeps to it */
            rc = install(e, x, x->start + (i << r->shift) - x->off, n << r->shift,
                         how | (r->p.kind == SRC_CONTINUE ? INSTALL_MINOR : 0), UINT64_MAX);
        srcu_exit(&e->srcu, idx);
        if (rc == ESRCH)
            return -ESRCH;
        if (rc == ENODATA) { /* chunks still on their way: install again once they are in */
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (rc == EAGAIN) { /* an event is pending; a worker reads it */
            sched_yield();
            continue;
        }
        pos = upto;
    }
    return 0;
}

int engine_populate(struct engine *e, int id, uint64_t offset, uint64_t length)
{
    populating = 1;
    int rc = fill_range(e, id, offset, length, 0);
    populating = 0;
    return rc;
}

static void add_stats(struct region_stats *out, const struct region_stats *s)
{
    const uint64_t *src = (const uint64_t *)s;
    uint64_t *dst = (uint64_t *)out;
    for (size_t f = 0; f < sizeof(*s) / sizeof(uint64_t); f++)
        dst[f] += __atomic_load_n(&src[f], __ATOMIC_RELAXED);
}

/* Adds what region id (-1: every region) of e and of its children's engines has served. */
static int sum_stats(struct engine *e, int id, struct region_stats *out)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&e->lock);
    reap_children(e);
    for (int k = 0; k < e->nregions; k++)
        if (id == -1 || e->regions[k]->id == id) {
            add_stats(out, &e->regions[k]->st);
            rc = 0;
        }
    for (struct engine *c = e->children; c; c = c->sibling)
        sum_stats(c, id, out);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int engine_region_stats(struct engine *e, int id, struct region_stats *out)
{
    memset(out, 0, sizeof(*out));
    int rc = sum_stats(e, id, out);
    return id == -1 ? 0 : rc;
}

/* The pieces of region `id` mapped now, as (start, end, offset) triples in a malloc'ed array of
 * *n triples (NULL when *n is 0). mremap and munmap split and move them. -ENOENT, -ENOMEM. */
int engine_region_pieces(struct engine *e, int id, uint64_t **out, size_t *n)
{
    int rc = -ENOENT;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&e->lock);
    int k = find_region(e, id);
    if (k >= 0) {
        struct region *r = e->regions[k];
        struct table *t = atomic_load(&e->table);
        size_t count = 0;
        for (size_t j = 0; t && j < t->n; j++)
            count += t->x[j].r == r;
        rc = 0;
        if (count && !(*out = malloc(count * 3 * sizeof(uint64_t))))
            rc = -ENOMEM;
        for (size_t j = 0; *out && j < t->n; j++)
            if (t->x[j].r == r) {
                uint64_t *p = *out + 3 * (*n)++;
                p[0] = t->x[j].start, p[1] = t->x[j].end, p[2] = t->x[j].off;
            }
    }
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int engine_errors(struct engine *e, uint64_t *cursor, struct engine_error *out, int max)
{
    uint64_t n = atomic_load(&e->nerrors), c = *cursor;
    if (n - c > ERR_RING)
        c = n - ERR_RING;
    int k = 0;
    for (; c < n && k < max; c++, k++) {
        if (atomic_load_explicit(&e->errors[c % ERR_RING].seq, memory_order_acquire) != c + 1)
            break; /* still being written: the next call gets it */
        out[k] = e->errors[c % ERR_RING].e;
    }
    *cursor = c;
    return k;
}

int engine_client_gone(struct engine *e) { return atomic_load(&e->gone); }

void engine_event_counts(struct engine *e, uint64_t out[5])
{
    for (int k = 0; k < 5; k++)
        out[k] = atomic_load(&e->events[k]);
}

int engine_region_set_wp(struct engine *e, int id, engine_wp_fn fn, void *ctx)
{
    pthread_mutex_lock(&e->lock);
    int k = find_region(e, id);
    if (k >= 0) {
        struct region *r = e->regions[k];
        atomic_store(&r->wp_ctx, ctx);
        atomic_store(&r->wp_fn, fn);
        atomic_store(&r->wp_mode, fn != NULL);
    }
    pthread_mutex_unlock(&e->lock);
    srcu_synchronize(&e->srcu); /* no fault is still inside the previous wp_fn */
    return k < 0 ? -ENOENT : 0;
}

/* ---- working sets: recording first touches, replaying them ---- */

int engine_record_start(struct engine *e, int id)
{
    int rc = 0;
    pthread_mutex_lock(&e->lock);
    int k = find_region(e, id);
    struct region *r = k < 0 ? NULL : e->regions[k];
    if (!r)
        rc = -ENOENT;
    else if (r->rec)
        rc = -EBUSY;
    else {
        r->rec = malloc(r->npages * sizeof(*r->rec));
        r->rec_bits = calloc((r->npages + 63) / 64, sizeof(uint64_t));
        if (!r->rec || !r->rec_bits) {
            free(r->rec), free(r->rec_bits);
            r->rec = NULL, r->rec_bits = NULL;
            rc = -ENOMEM;
        } else {
            r->rec_t0 = now_ns();
            atomic_store_explicit(&r->recording, 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int engine_record_finish(struct engine *e, int id, uint64_t **out, size_t *n)
{
    int rc = 0;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&e->lock);
    int k = find_region(e, id);
    struct region *r = k < 0 ? NULL : e->regions[k];
    if (!r || !r->rec) {
        pthread_mutex_unlock(&e->lock);
        return r ? -EINVAL : -ENOENT;
    }
    if (atomic_exchange(&r->recording, 0))
        srcu_synchronize(&e->srcu); /* every resolve that saw it on has written its entry */
    size_t count = (size_t)atomic_load(&r->rec_n);
    if (count && !(*out = malloc(count * 2 * sizeof(uint64_t))))
        rc = -ENOMEM;
    for (size_t j = 0; *out && j < count; j++) {
        (*out)[2 * j] = r->rec[j].granule << r->shift;
        (*out)[2 * j + 1] = r->rec[j].ns;
    }
    if (*out)
        *n = count;
    pthread_mutex_unlock(&e->lock);
    return rc;
}

static void *replay_thread(void *arg)
{
    struct replay *j = arg;
    struct engine *e = j->e;
    /* Faults come first: replay runs niced below the workers. While the toucher keeps faulting
     * on pages the replay holds, the replay is useful and behind: that share of the CPU is
     * well spent. Once most faults miss the set (a wrong set, or a toucher gone elsewhere), the
     * replay only competes with the faults it cannot help: it drops to SCHED_IDLE, running only
     * on CPUs that would otherwise idle, where it never delays a fault. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), REPLAY_NICE);
    pthread_setname_np(pthread_self(), "uffd-replay"); /* for ps, top and the tests */
    struct sched_param none = {0};
    int idle = j->speculative && pthread_setschedparam(pthread_self(), SCHED_IDLE, &none) == 0;
    struct timespec nap = {0, 200000};
    for (;;) {
        while (j->speculative && atomic_load(&e->predicted) && !atomic_load(&e->stopping) &&
               !atomic_load(&e->gone))
            nanosleep(&nap, NULL); /* the rest of the memory comes after the predicted pages */
        size_t k = atomic_fetch_add(&j->next, 1);
        if (k >= j->n)
            break;
        uint64_t misses = atomic_load(&e->replay_misses) - j->misses0;
        uint64_t hits = atomic_load(&e->replay_hits) - j->hits0;
        if (!idle && misses >= REPLAY_MISSES_IDLE && misses > 4 * hits)
            idle = pthread_setschedparam(pthread_self(), SCHED_IDLE, &none) == 0;
        const uint64_t *run = &j->runs[3 * k];
        int rc = fill_range(e, (int)run[0], run[1], run[2], INSTALL_PREFETCH);
        if (rc == -ECANCELED || rc == -ESRCH) /* the engine stops, or the client has gone */
            break;
    }
    if (!j->speculative)
        atomic_fetch_sub(&e->predicted, 1);
    atomic_fetch_sub(&j->running, 1);
    return NULL;
}

static void replay_free(struct replay *j)
{
    for (int k = 0; k < j->nthreads; k++)
        pthread_join(j->threads[k], NULL);
    free(j->runs);
    free(j);
}

int engine_replay(struct engine *e, const uint64_t *runs, size_t n, int threads, int speculative)
{
    if (threads < 1 || threads > MAX_REPLAY_THREADS)
        return -EINVAL;
    size_t pieces = 0;
    for (size_t k = 0; k < n; k++) /* a long run (a whole region) is shared by the threads */
        pieces += (runs[3 * k + 2] + REPLAY_PIECE - 1) / REPLAY_PIECE;
    struct replay *j = calloc(1, sizeof(*j));
    if (!j || (pieces && !(j->runs = malloc(pieces * 3 * sizeof(uint64_t))))) {
        free(j);
        return -ENOMEM;
    }
    j->e = e;
    j->speculative = speculative;
    for (size_t k = 0; k < n; k++)
        for (uint64_t off = 0; off < runs[3 * k + 2]; off += REPLAY_PIECE) {
            uint64_t *p = &j->runs[3 * j->n++];
            uint64_t left = runs[3 * k + 2] - off;
            p[0] = runs[3 * k], p[1] = runs[3 * k + 1] + off;
            p[2] = left < REPLAY_PIECE ? left : REPLAY_PIECE;
        }
    pthread_mutex_lock(&e->lock);
    for (size_t k = 0; k < j->n && !speculative; k++) { /* the granules a fault may hit */
        int at = find_region(e, (int)j->runs[3 * k]);
        struct region *r = at < 0 ? NULL : e->regions[at];
        if (!r || j->runs[3 * k + 1] >= r->p.length)
            continue;
        uint64_t g = j->runs[3 * k + 1] >> r->shift;
        uint64_t end = (j->runs[3 * k + 1] + j->runs[3 * k + 2] + r->p.page_size - 1) >> r->shift;
        for (end = end < r->npages ? end : r->npages; g < end; g++)
            __atomic_fetch_or(&r->in_replay[g >> 6], 1ull << (g & 63u), __ATOMIC_RELAXED);
        atomic_store(&r->replaying, 1);
    }
    j->hits0 = atomic_load(&e->replay_hits);
    j->misses0 = atomic_load(&e->replay_misses);
    int slot = -1, rc = 0;
    for (int k = 0; k < MAX_REPLAYS; k++) { /* reap finished replays; take a free slot */
        struct replay *old = e->replays[k];
        if (old && !atomic_load(&old->running)) {
            replay_free(old);
            e->replays[k] = old = NULL;
        }
        if (!old && slot < 0)
            slot = k;
    }
    if (slot < 0 || atomic_load(&e->stopping))
        rc = slot < 0 ? -EAGAIN : -ECANCELED;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals belong to the application's threads */
    atomic_store(&j->running, threads);
    if (!speculative)
        atomic_fetch_add(&e->predicted, threads);
    for (int k = 0; k < threads && !rc; k++) {
        rc = -pthread_create(&j->threads[k], NULL, replay_thread, j);
        if (!rc)
            j->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    atomic_fetch_sub(&j->running, threads - j->nthreads); /* those never started */
    if (!speculative)
        atomic_fetch_sub(&e->predicted, threads - j->nthreads);
    if (j->nthreads)
        e->replays[slot] = j; /* even after a failed create: the started ones are joined later */
    else
        replay_free(j);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int engine_replays_running(struct engine *e)
{
    int count = 0;
    pthread_mutex_lock(&e->lock);
    for (int k = 0; k < MAX_REPLAYS; k++)
        count += e->replays[k] && atomic_load(&e->replays[k]->running);
    pthread_mutex_unlock(&e->lock);
    return count;
}

/* Joins every replay's threads; e->stopping is set, so they end at their next chunk. Not under
 * e->lock: a replay thread waits for a worker to apply an event, which takes that lock. */
static void replays_stop(struct engine *e)
{
    struct replay *done[MAX_REPLAYS];
    pthread_mutex_lock(&e->lock);
    memcpy(done, e->replays, sizeof(done));
    memset(e->replays, 0, sizeof(e->replays));
    pthread_mutex_unlock(&e->lock);
    for (int k = 0; k < MAX_REPLAYS; k++)
        if (done[k])
            replay_free(done[k]);
}
