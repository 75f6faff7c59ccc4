/* Write tracking and live snapshots: mechanism only, no Python object anywhere.
 *
 * Two mechanisms. Async (UFFD_FEATURE_WP_ASYNC): the kernel resolves every write to a protected
 * page itself and clears the page's uffd-wp bit; PAGEMAP_SCAN finds the pages whose bit is clear
 * and, in the same page-table walk, protects them again. Sync: every first write to a protected
 * page is a WP fault served by native code (struct wpc): it records the page, copies its old
 * content first when a live snapshot still needs it (a memcpy to a staging area the copier writes
 * out later), then unprotects the page and wakes the writer.
 * Live snapshots need the sync mechanism: only a write that waits can be copied before it lands. */
#ifndef UFFD_TRACKING_H
#define UFFD_TRACKING_H

#include <stddef.h>
#include <stdint.h>

/* Address runs [v[2k], v[2k+1]), growing (malloc'ed). */
struct runs {
    uint64_t *v;
    size_t n, cap; /* in runs */
};
void runs_free(struct runs *r);

/* The pages of [start, end) written since they were last protected, by PAGEMAP_SCAN on
 * pagemap_fd (/proc/self/pagemap). rearm: protect them again in the same walk, so that no write
 * between the scan and the re-arm is lost. 0 or -errno (-EPERM: not a WP_ASYNC range). */
int wpt_scan(int pagemap_fd, uint64_t start, uint64_t end, int rearm, struct runs *out);

/* A synchronous write-protect context over [start, start + length) of a uffd registered
 * MODE_WP. own_thread: a native thread reads the uffd and serves its WP faults; otherwise the
 * PageServer engine owning the uffd calls wpc_fault. A WP fault during a snapshot stages the old
 * page (state TODO -> CLAIMED -> STAGED) and the copier writes it out (-> DONE). */
struct wpc;
struct wpc *wpc_new(int uffd, uint64_t start, uint64_t length, uint64_t page, int own_thread);
int wpc_start(struct wpc *c); /* own_thread: starts the fault thread. 0 or -errno */
/* Stops and joins every thread (a copy in progress finishes). Does nothing in a forked child. */
void wpc_free(struct wpc *c);
/* A WP fault on [addr, addr + len): copy first (a snapshot in progress), record, unprotect and
 * wake. Async-signal-safe (the engine's SIGBUS resolver calls it). 0 or errno. */
int wpc_fault(void *c, uint64_t addr, uint64_t len);
/* Protect every page; tracking starts (keep = pages stay protected after a snapshot copies
 * them, so that later writes are recorded). 0 or -errno. */
int wpc_arm(struct wpc *c, int keep);
void wpc_set_keep(struct wpc *c, int keep);
/* The runs written since the last reset; reset re-protects them in the same critical section
 * as the fault path records, so no write is lost or counted twice. 0 or -errno. */
int wpc_written(struct wpc *c, int reset, struct runs *out);

/* Starts a live snapshot: protects every page (the instant), then a native copier thread writes
 * each page's content as of the instant to fd. A page is written at file offset
 * file_base + slot * page + (a - page address), clipped to [lo, hi) (a = max(page, lo)). diff: only
 * pages written since the previous snapshot are copied, in slots 0, 1, ... in address order, and
 * *pages lists them (page indices, malloc'ed); else slot = page index and *pages is NULL.
 * *stall_ns: how long writers could be held (the instant); without a tracker the bulk of the
 * protection happens before it, with writers running. 0 or -errno (-EBUSY: a snapshot is in
 * progress). */
int wpc_snapshot_begin(struct wpc *c, int fd, int64_t file_base, uint64_t lo, uint64_t hi, int diff,
                       uint32_t **pages, size_t *npages, uint64_t *stall_ns);
/* 1 once the copy is complete, 0 if timeout_ms passed first (-1: wait for ever). */
int wpc_snapshot_wait(struct wpc *c, int timeout_ms);
/* After completion: the first errno a write to fd failed with (0: none); pages copied by the
 * copier and by writers' faults. */
void wpc_snapshot_result(struct wpc *c, int *err, uint64_t *copied, uint64_t *by_faults);

#endif
