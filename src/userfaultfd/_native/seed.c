/* The fault-handler thread of userfaultfd(2)'s example program, line for line: poll, read one
 * message, fill a page with 'A' + count % 20, UFFDIO_COPY, printing what the seed prints. It is
 * native because the demo's reading thread faults while holding the GIL. */
#define _GNU_SOURCE
#include "seed.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "abi.h"

struct seed_handler {
    int uffd, out_fd, stop_fd;
    long page_size;
    int fault_count, error;
    char *page;
    pthread_t thread;
};

static void *seed_loop(void *arg)
{
    struct seed_handler *h = arg;
    struct uffd_msg msg;
    for (;;) {
        struct pollfd pfd[2] = {{h->uffd, POLLIN, 0}, {h->stop_fd, POLLIN, 0}};
        int nready = poll(pfd, 2, -1);
        if (nready == -1) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            break;
        }
        if (pfd[1].revents)
            break;
        dprintf(h->out_fd, "\nfault_handler_thread():\n");
        dprintf(h->out_fd, "    poll() returns: nready = %d; POLLIN = %d; POLLERR = %d\n", nready,
                (pfd[0].revents & POLLIN) != 0, (pfd[0].revents & POLLERR) != 0);
        ssize_t nread = read(h->uffd, &msg, sizeof(msg));
        if (nread == 0) {
            dprintf(h->out_fd, "EOF on userfaultfd!\n");
            h->error = EPIPE;
            break;
        }
        if (nread == -1) {
            if (errno == EAGAIN) /* woken before we read it (poll(2) promises no more) */
                continue;
            h->error = errno;
            break;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) {
            h->error = EPROTO;
            break;
        }
        dprintf(h->out_fd, "    UFFD_EVENT_PAGEFAULT event: ");
        dprintf(h->out_fd, "flags = %" PRIx64 "; ", msg.arg.pagefault.flags);
        dprintf(h->out_fd, "address = %" PRIx64 "\n", msg.arg.pagefault.address);
        memset(h->page, 'A' + h->fault_count % 20, (size_t)h->page_size);
        h->fault_count++;
        /* The seed wakes the reader with the COPY and then prints, a race its sample output
         * never shows lost; DONTWAKE + WAKE after printing gives that output every time. */
        struct uffdio_copy c = {msg.arg.pagefault.address & ~(uint64_t)(h->page_size - 1),
                                (uint64_t)(uintptr_t)h->page, (uint64_t)h->page_size,
                                UFFDIO_MODE_DONTWAKE, 0};
        if (ioctl(h->uffd, UFFDIO_COPY, &c) == -1) {
            h->error = errno;
            break;
        }
        dprintf(h->out_fd, "        (uffdio_copy.copy returned %" PRId64 ")\n", c.result);
        struct uffdio_range wake = {c.dst, c.len};
        if (ioctl(h->uffd, UFFDIO_WAKE, &wake) == -1) {
            h->error = errno;
            break;
        }
    }
    return NULL;
}

struct seed_handler *seed_start(int uffd, int out_fd)
{
    struct seed_handler *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->uffd = uffd;
    h->out_fd = out_fd;
    h->page_size = sysconf(_SC_PAGE_SIZE);
    h->stop_fd = eventfd(0, EFD_CLOEXEC);
    h->page = mmap(NULL, (size_t)h->page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = h->stop_fd < 0 || h->page == MAP_FAILED
                 ? errno
                 : pthread_create(&h->thread, NULL, seed_loop, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        if (h->stop_fd >= 0)
            close(h->stop_fd);
        if (h->page != MAP_FAILED)
            munmap(h->page, (size_t)h->page_size);
        free(h);
        errno = rc;
        return NULL;
    }
    return h;
}

int seed_stop(struct seed_handler *h, int *faults)
{
    uint64_t one = 1;
    ssize_t w = write(h->stop_fd, &one, sizeof(one));
    (void)w;
    pthread_join(h->thread, NULL);
    int err = h->error;
    *faults = h->fault_count;
    close(h->stop_fd);
    munmap(h->page, (size_t)h->page_size);
    free(h);
    return err;
}
