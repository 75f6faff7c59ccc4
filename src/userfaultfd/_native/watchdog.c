/* A native guard for out-of-process handlers: if the handler dies, faults must not sleep for
 * ever, and the faulting threads may hold the GIL, so no Python can notice. */
#define _GNU_SOURCE
#include "watchdog.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "abi.h"
#include "notice.h"

#define USER_SPACE_END (1ull << 47) /* x86_64 TASK_SIZE, rounded */

struct watchdog {
    pid_t owner; /* a forked child holds a copy it must not stop: the thread is the parent's */
    int pidfd, uffd, stop_fd;
    atomic_int fired;
    pthread_t thread;
};

static void *watch(void *arg)
{
    struct watchdog *w = arg;
    const uint64_t page = (uint64_t)sysconf(_SC_PAGE_SIZE);
    struct pollfd pf[2] = {{w->pidfd, POLLIN, 0}, {w->stop_fd, POLLIN, 0}};
    while (poll(pf, 2, -1) < 0 && errno == EINTR)
        ;
    if (pf[1].revents)
        return NULL;
    atomic_store(&w->fired, 1);
    /* Faults the handler had read but not answered are never delivered again: wake every
     * waiter so that each faults anew, then poison what comes. */
    struct uffdio_range all = {page, USER_SPACE_END - 2 * page};
    ioctl(w->uffd, UFFDIO_WAKE, &all);
    pf[0].fd = w->uffd;
    struct uffd_msg msgs[32];
    for (;;) {
        if (poll(pf, 2, -1) < 0 && errno != EINTR)
            break;
        if (pf[1].revents)
            break;
        ssize_t n = read(w->uffd, msgs, sizeof(msgs));
        for (ssize_t k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++) {
            if (msgs[k].event != UFFD_EVENT_PAGEFAULT)
                continue; /* reading an event is what completes it */
            uint64_t at = msgs[k].arg.pagefault.address & ~(page - 1);
            struct uffdio_rangeop p = {{at, page}, 0, 0};
            notice_record(at, at + page,
                          "the handler process of a PythonSourceServer has died: "
                          "the page was poisoned");
            if (ioctl(w->uffd, UFFDIO_POISON, &p) != 0) { /* EEXIST: present after all */
                struct uffdio_range one = {at, page};
                ioctl(w->uffd, UFFDIO_WAKE, &one);
            }
        }
    }
    return NULL;
}

struct watchdog *watchdog_start(int pidfd, int uffd)
{
    struct watchdog *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->owner = getpid();
    w->pidfd = pidfd;
    w->uffd = uffd;
    w->stop_fd = eventfd(0, EFD_CLOEXEC);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = w->stop_fd < 0 ? errno : pthread_create(&w->thread, NULL, watch, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        if (w->stop_fd >= 0)
            close(w->stop_fd);
        free(w);
        errno = rc;
        return NULL;
    }
    return w;
}

int watchdog_stop(struct watchdog *w)
{
    if (getpid() != w->owner)
        return 0; /* a forked child: the stop eventfd and the thread are the parent's */
    uint64_t one = 1;
    ssize_t n = write(w->stop_fd, &one, sizeof(one));
    (void)n;
    pthread_join(w->thread, NULL);
    int fired = atomic_load(&w->fired);
    close(w->stop_fd);
    free(w);
    return fired;
}
