/* Write tracking and live snapshots (see tracking.h). No Python object is touched in this file. */
#define _GNU_SOURCE
#include "tracking.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "abi.h"
#include "clock.h"

#define SCAN_VEC 512
#define COPY_RUN 64 /* pages the copier claims and writes with one pwrite */

void runs_free(struct runs *r)
{
    free(r->v);
    r->v = NULL;
    r->n = r->cap = 0;
}

/* Appends [a, b), merged with the last run when they touch. 0 or -ENOMEM. */
static int runs_add(struct runs *r, uint64_t a, uint64_t b)
{
    if (r->n && r->v[2 * r->n - 1] == a) {
        r->v[2 * r->n - 1] = b;
        return 0;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        uint64_t *v = realloc(r->v, cap * 2 * sizeof(uint64_t));
        if (!v)
            return -ENOMEM;
        r->v = v;
        r->cap = cap;
    }
    r->v[2 * r->n] = a;
    r->v[2 * r->n + 1] = b;
    r->n++;
    return 0;
}

/* ---- async: PAGEMAP_SCAN ---- */

int wpt_scan(int pagemap_fd, uint64_t start, uint64_t end, int rearm, struct runs *out)
{
    struct page_region vec[SCAN_VEC];
    while (start < end) {
        struct pm_scan_arg a = {
            .size = sizeof(a),
            /* CHECK_WPASYNC: a range that is not WP_ASYNC fails (EPERM) instead of being skipped
             * silently, which would read as "nothing written". */
            .flags = PM_SCAN_CHECK_WPASYNC | (rearm ? PM_SCAN_WP_MATCHING : 0),
            .start = start,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = SCAN_VEC,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (long k = 0; k < n; k++)
            if (runs_add(out, vec[k].start, vec[k].end) < 0)
                return -ENOMEM;
        /* The walk stops early when vec is full; walk_end says where to go on. */
        if (a.walk_end <= start)
            return -EIO; /* no progress: never loop for ever */
        start = a.walk_end;
    }
    return 0;
}

/* ---- sync: the write-protect context ---- */

/* A page of a snapshot in progress: to copy; being written to the file by the copier; copied by a
 * writer's fault into the staging area, waiting for the copier; in the file. */
enum { TODO = 0, CLAIMED = 1, STAGED = 2, DONE = 3 };

struct wpc {
    pid_t owner; /* a forked child holds a copy: its threads are the parent's */
    int uffd;
    uint64_t start, length, page, npages;
    unsigned shift;
    int own_thread, stop_fd;
    pthread_t thread, copier;
    int thread_started, copier_started;
    /* Orders the fault path (record, unprotect) against wpc_written's collect-and-re-protect and
     * against the start of a snapshot. A spin lock: the fault path runs in a SIGBUS handler too. */
    atomic_flag lock;
    uint64_t *written;    /* since the user's last reset */
    uint64_t *since_snap; /* since the last snapshot's instant */
    uint64_t *dirty;      /* unprotected since the last protection of everything */
    atomic_int keep;      /* a tracker runs: copied pages stay protected */
    /* The snapshot in progress */
    atomic_int snap_active;
    atomic_uchar *state;      /* per page: TODO, CLAIMED, STAGED, DONE */
    char *stage;              /* where faults copy pages (a memcpy, not a write to the file) */
    pthread_mutex_t arm_lock; /* the copier's unprotects against wpc_arm (a tracker starting) */
    uint32_t *slot;           /* per page: its slot in the file (diff layers) */
    int diff, fd;
    int64_t file_base;
    uint64_t lo, hi;
    atomic_int snap_err;
    atomic_uint_fast64_t copied, by_faults;
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;
    int done;
};

static void lock(struct wpc *c)
{
    while (atomic_flag_test_and_set_explicit(&c->lock, memory_order_acquire))
        sched_yield();
}

static void unlock(struct wpc *c) { atomic_flag_clear_explicit(&c->lock, memory_order_release); }

static void bit_set(uint64_t *map, uint64_t i)
{
    __atomic_fetch_or(&map[i >> 6], 1ull << (i & 63u), __ATOMIC_RELAXED);
}

static int writeprotect(int uffd, uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect w = {{start, len}, protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    while (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) != 0) {
        if (errno != EAGAIN) /* EAGAIN: a non-cooperative event is being delivered */
            return errno;
        sched_yield();
    }
    return 0;
}

/* Reads one byte of each page from user mode first: a missing page of a PageServer region is
 * then served (a kernel-mode read by pwrite would get EFAULT in sigbus or user-mode-only mode). */
static void pretouch(uint64_t addr, uint64_t n, uint64_t page, uint64_t lo)
{
    for (uint64_t k = 0; k < n; k++) {
        uint64_t a = addr + k * page; /* inside the snapshot's bytes only: [lo, ...) */
        (void)*(volatile const char *)(uintptr_t)(a > lo ? a : lo);
    }
}

/* Writes pages [i, i + n) (consecutive slots) to the snapshot file, from the memory itself or,
 * staged, from the staging area. */
static void copy_out(struct wpc *c, uint64_t i, uint64_t n, int staged)
{
    uint64_t a = c->start + (i << c->shift), b = a + (n << c->shift);
    /* the staging area mirrors the range: same offsets */
    const int64_t shift = staged ? (int64_t)((uintptr_t)c->stage - c->start) : 0;
    int64_t off = c->file_base + (int64_t)((c->diff ? c->slot[i] : i) << c->shift);
    if (a < c->lo) {
        off += (int64_t)(c->lo - a);
        a = c->lo;
    }
    b = b < c->hi ? b : c->hi;
    if (off < 0) { /* the raw image of an object that starts inside its first page */
        a += (uint64_t)-off;
        off = 0;
    }
    if (!staged)
        pretouch(c->start + (i << c->shift), n, c->page, c->lo);
    while (a < b) {
        ssize_t w = pwrite(c->fd, (const void *)(uintptr_t)(a + (uint64_t)shift), b - a, off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int expected = 0;
            atomic_compare_exchange_strong(&c->snap_err, &expected, w < 0 ? errno : EIO);
            return; /* the snapshot fails; the pages still count as done: nobody waits on them */
        }
        a += (uint64_t)w;
        off += w;
    }
}

static void finish(struct wpc *c)
{
    atomic_store(&c->snap_active, 0);
    pthread_mutex_lock(&c->done_lock);
    c->done = 1;
    pthread_cond_broadcast(&c->done_cond);
    pthread_mutex_unlock(&c->done_lock);
}

int wpc_fault(void *arg, uint64_t addr, uint64_t len)
{
    struct wpc *c = arg;
    uint64_t a = addr > c->start ? addr : c->start;
    uint64_t b = addr + len < c->start + c->length ? addr + len : c->start + c->length;
    if (b <= a)
        return writeprotect(c->uffd, addr, len, 0);
    uint64_t i = (a - c->start) >> c->shift, j = (b - c->start + c->page - 1) >> c->shift;
    lock(c);
    if (atomic_load(&c->snap_active)) {
        for (uint64_t k = i; k < j; k++) {
            unsigned char todo = TODO;
            if (atomic_compare_exchange_strong(&c->state[k], &todo, CLAIMED)) {
                /* The old content, before the write goes on: a memcpy to the staging area (the
                 * writer waits for this), written to the file by the copier later. */
                uint64_t from = c->start + (k << c->shift), to = from + c->page;
                from = from > c->lo ? from : c->lo; /* the bytes the snapshot holds */
                to = to < c->hi ? to : c->hi;
                memcpy(c->stage + (from - c->start), (const void *)(uintptr_t)from, to - from);
                atomic_store(&c->state[k], STAGED);
                atomic_fetch_add(&c->by_faults, 1);
            } else {
                while (atomic_load(&c->state[k]) == CLAIMED) /* the copier is writing it */
                    sched_yield();
            }
        }
    }
    for (uint64_t k = i; k < j; k++) {
        bit_set(c->written, k);
        bit_set(c->since_snap, k);
        bit_set(c->dirty, k);
    }
    int rc = writeprotect(c->uffd, c->start + (i << c->shift), (j - i) << c->shift, 0);
    unlock(c);
    if (a != addr || b != addr + len) /* the granule reaches past the context: not ours to track */
        writeprotect(c->uffd, addr, len, 0);
    return rc;
}

static void *fault_thread(void *arg)
{
    struct wpc *c = arg;
    struct uffd_msg msgs[64];
    struct pollfd pf[2] = {{c->uffd, POLLIN, 0}, {c->stop_fd, POLLIN, 0}};
    for (;;) {
        if (poll(pf, 2, -1) < 0 && errno != EINTR)
            break;
        if (pf[1].revents || (pf[0].revents & (POLLERR | POLLNVAL)))
            break;
        ssize_t n = read(c->uffd, msgs, sizeof(msgs));
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n < (ssize_t)sizeof(struct uffd_msg))
            break;
        for (ssize_t k = 0; k < n / (ssize_t)sizeof(struct uffd_msg); k++) {
            const struct uffd_msg *m = &msgs[k];
            uint64_t addr = m->arg.pagefault.address & ~(c->page - 1);
            if (m->event == UFFD_EVENT_PAGEFAULT)
                wpc_fault(c, addr, c->page);
        }
    }
    return NULL;
}

struct wpc *wpc_new(int uffd, uint64_t start, uint64_t length, uint64_t page, int own_thread)
{
    if (!page || (page & (page - 1)) || start % page || !length || length % page) {
        errno = EINVAL;
        return NULL;
    }
    struct wpc *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->owner = getpid();
    c->uffd = uffd;
    c->start = start;
    c->length = length;
    c->page = page;
    c->shift = (unsigned)__builtin_ctzll(page);
    c->npages = length >> c->shift;
    c->own_thread = own_thread;
    c->stop_fd = -1;
    atomic_flag_clear(&c->lock);
    pthread_mutex_init(&c->done_lock, NULL);
    pthread_mutex_init(&c->arm_lock, NULL);
    c->stage = mmap(NULL, length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    pthread_cond_init(&c->done_cond, NULL);
    size_t words = (c->npages + 63) / 64;
    c->written = calloc(words, sizeof(uint64_t));
    c->since_snap = calloc(words, sizeof(uint64_t));
    c->dirty = calloc(words, sizeof(uint64_t));
    c->state = calloc(c->npages, 1);
    c->slot = calloc(c->npages, sizeof(uint32_t));
    if (own_thread)
        c->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->stage == MAP_FAILED)
        c->stage = NULL;
    if (!c->stage || !c->written || !c->since_snap || !c->dirty || !c->state || !c->slot ||
        (own_thread && c->stop_fd < 0) || c->npages > UINT32_MAX) {
        wpc_free(c);
        errno = ENOMEM;
        return NULL;
    }
    return c;
}

/* Threads that serve faults or read tracked memory must not take the application's signals,
 * except SIGBUS and SIGSEGV: the copier's reads of a sigbus-mode PageServer region are served by
 * the SIGBUS resolver in the copier itself. */
static int spawn(pthread_t *t, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

int wpc_start(struct wpc *c)
{
    if (!c->own_thread || c->thread_started)
        return 0;
    int rc = spawn(&c->thread, fault_thread, c);
    c->thread_started = !rc;
    return -rc;
}

void wpc_free(struct wpc *c)
{
    if (getpid() != c->owner)
        return; /* a forked child: the threads to join are not in this process; leave the copy */
    if (c->copier_started)
        pthread_join(c->copier, NULL);
    if (c->thread_started) {
        uint64_t one = 1;
        if (write(c->stop_fd, &one, sizeof(one)) < 0) { /* cannot fail on a fresh eventfd */
        }
        pthread_join(c->thread, NULL);
    }
    if (c->stop_fd >= 0)
        close(c->stop_fd);
    pthread_mutex_destroy(&c->done_lock);
    pthread_mutex_destroy(&c->arm_lock);
    if (c->stage)
        munmap(c->stage, c->length);
    pthread_cond_destroy(&c->done_cond);
    free(c->written);
    free(c->since_snap);
    free(c->dirty);
    free(c->state);
    free(c->slot);
    free(c);
}

int wpc_arm(struct wpc *c, int keep)
{
    pthread_mutex_lock(&c->arm_lock);
    lock(c);
    atomic_store(&c->keep, keep);
    int rc = writeprotect(c->uffd, c->start, c->length, 1);
    if (!rc)
        memset(c->dirty, 0, (c->npages + 63) / 64 * sizeof(uint64_t));
    unlock(c);
    pthread_mutex_unlock(&c->arm_lock);
    return -rc;
}

void wpc_set_keep(struct wpc *c, int keep) { atomic_store(&c->keep, keep); }

static int bit(const uint64_t *map, uint64_t i) { return (map[i >> 6] >> (i & 63u)) & 1u; }

int wpc_written(struct wpc *c, int reset, struct runs *out)
{
    int rc = 0;
    lock(c);
    for (uint64_t i = 0; i < c->npages && !rc;) {
        uint64_t word = c->written[i >> 6] >> (i & 63u);
        if (!word) {
            i = (i | 63u) + 1;
            continue;
        }
        i += (uint64_t)__builtin_ctzll(word);
        uint64_t j = i;
        while (j < c->npages && bit(c->written, j))
            j++;
        uint64_t a = c->start + (i << c->shift), b = c->start + (j << c->shift);
        rc = runs_add(out, a, b);
        if (reset && !rc) {
            rc = -writeprotect(c->uffd, a, b - a, 1);
            for (uint64_t k = i; k < j; k++) {
                c->written[k >> 6] &= ~(1ull << (k & 63u));
                c->dirty[k >> 6] &= ~(1ull << (k & 63u));
            }
        }
        i = j;
    }
    unlock(c);
    return rc;
}

static void *copier(void *arg)
{
    struct wpc *c = arg;
    for (uint64_t i = 0; i < c->npages;) {
        unsigned char state = atomic_load(&c->state[i]);
        if (state == DONE) {
            i++;
            continue;
        }
        if (state == CLAIMED) { /* a writer's fault is staging it: wait, then write it */
            sched_yield();
            continue;
        }
        if (state == STAGED) { /* only the copier moves a page on from STAGED */
            atomic_store(&c->state[i], CLAIMED);
            copy_out(c, i, 1, 1);
            atomic_store(&c->state[i], DONE);
            i++;
            continue;
        }
        uint64_t n = 0;
        while (n < COPY_RUN && i + n < c->npages) {
            unsigned char todo = TODO;
            if (!atomic_compare_exchange_strong(&c->state[i + n], &todo, CLAIMED))
                break;
            n++;
        }
        if (!n)
            continue; /* a fault took it first: look again */
        /* A diff layer's slots are consecutive only across pages that are all in the layer: a
         * claimed run is, since pages outside it start DONE. */
        copy_out(c, i, n, 0);
        for (uint64_t k = i; k < i + n; k++)
            atomic_store(&c->state[k], DONE);
        atomic_fetch_add(&c->copied, n);
        /* No tracker: later writes need not fault any more. Not under the fault path's lock
         * (writers would wait for it), but under arm_lock: a tracker that starts now finds these
         * pages protected again, or dirty. */
        pthread_mutex_lock(&c->arm_lock);
        if (!atomic_load(&c->keep)) {
            writeprotect(c->uffd, c->start + (i << c->shift), n << c->shift, 0);
            for (uint64_t k = i; k < i + n; k++)
                bit_set(c->dirty, k);
        }
        pthread_mutex_unlock(&c->arm_lock);
        i += n;
    }
    madvise(c->stage, c->length, MADV_DONTNEED); /* what writers staged is in the file now */
    finish(c);
    return NULL;
}

/* Protects every run of set bits of map (clearing them): 0 or errno. */
static int protect_marked(struct wpc *c, uint64_t *map)
{
    for (uint64_t i = 0; i < c->npages;) {
        uint64_t word = map[i >> 6] >> (i & 63u);
        if (!word) {
            i = (i | 63u) + 1;
            continue;
        }
        i += (uint64_t)__builtin_ctzll(word);
        uint64_t j = i;
        while (j < c->npages && bit(map, j))
            map[j >> 6] &= ~(1ull << (j & 63u)), j++;
        int rc = writeprotect(c->uffd, c->start + (i << c->shift), (j - i) << c->shift, 1);
        if (rc)
            return rc;
        i = j;
    }
    return 0;
}

int wpc_snapshot_begin(struct wpc *c, int fd, int64_t file_base, uint64_t lo, uint64_t hi, int diff,
                       uint32_t **pages, size_t *npages, uint64_t *stall_ns)
{
    *pages = NULL;
    *npages = 0;
    *stall_ns = 0;
    if (atomic_load(&c->snap_active))
        return -EBUSY;
    if (c->copier_started) { /* the previous copier has finished: reap it */
        pthread_join(c->copier, NULL);
        c->copier_started = 0;
    }
    uint32_t *list = diff ? malloc(c->npages * sizeof(uint32_t)) : NULL;
    if (diff && !list)
        return -ENOMEM;
    int rc = 0;
    if (!atomic_load(&c->keep)) {
        /* Nothing keeps the pages protected: protect them all first, without holding writers (a
         * write meanwhile faults, is recorded dirty and goes on). The instant below then only
         * protects again what was written since, which is what writers wait for. */
        lock(c);
        memset(c->dirty, 0, (c->npages + 63) / 64 * sizeof(uint64_t));
        unlock(c);
        rc = writeprotect(c->uffd, c->start, c->length, 1);
    }
    lock(c);
    uint64_t t0 = now_ns();
    c->fd = fd;
    c->file_base = file_base;
    c->lo = lo;
    c->hi = hi;
    c->diff = diff;
    atomic_store(&c->snap_err, 0);
    atomic_store(&c->copied, 0);
    atomic_store(&c->by_faults, 0);
    c->done = 0;
    /* Nobody reads state before snap_active is set (the fault path, under this lock). */
    memset((void *)c->state, diff ? DONE : TODO, c->npages);
    size_t n = diff ? 0 : c->npages;
    for (uint64_t i = 0; diff && i < c->npages;) {
        uint64_t word = c->since_snap[i >> 6] >> (i & 63u);
        if (!word) {
            i = (i | 63u) + 1;
            continue;
        }
        i += (uint64_t)__builtin_ctzll(word);
        c->slot[i] = (uint32_t)n;
        list[n++] = (uint32_t)i;
        atomic_store_explicit(&c->state[i], TODO, memory_order_relaxed);
        i++;
    }
    memset(c->since_snap, 0, (c->npages + 63) / 64 * sizeof(uint64_t));
    atomic_store(&c->snap_active, 1);
    /* The instant: every page protected again. The walk is not atomic, but a writer that faults on
     * a page already protected waits in wpc_fault for this lock until the walk is over: no write
     * that follows it can land on a page not yet protected, so what the copy holds is a consistent
     * cut (every write that completed before the end of the walk, none after). */
    if (!rc)
        rc = protect_marked(c, c->dirty);
    *stall_ns = now_ns() - t0;
    unlock(c);
    if (!rc && (rc = spawn(&c->copier, copier, c)) == 0)
        c->copier_started = 1;
    if (rc) {
        for (uint64_t i = 0; i < c->npages; i++) /* nobody copies: nobody may wait */
            atomic_store(&c->state[i], DONE);
        finish(c);
        free(list);
        return -rc;
    }
    *pages = list;
    *npages = n;
    return 0;
}

int wpc_snapshot_wait(struct wpc *c, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    if (timeout_ms >= 0) {
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&c->done_lock);
    int rc = 0;
    while (!c->done && rc == 0)
        rc = timeout_ms < 0 ? pthread_cond_wait(&c->done_cond, &c->done_lock)
                            : pthread_cond_timedwait(&c->done_cond, &c->done_lock, &until);
    int done = c->done;
    pthread_mutex_unlock(&c->done_lock);
    return done;
}

void wpc_snapshot_result(struct wpc *c, int *err, uint64_t *copied, uint64_t *by_faults)
{
    *err = atomic_load(&c->snap_err);
    *copied = atomic_load(&c->copied);
    *by_faults = atomic_load(&c->by_faults);
}
