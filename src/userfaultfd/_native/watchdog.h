#ifndef UFFD_WATCHDOG_H
#define UFFD_WATCHDOG_H

struct watchdog;

/* Watches the process behind pidfd, which serves uffd. Once it has died, every blocked faulter
 * is woken and every fault on uffd is answered with UFFDIO_POISON: the toucher gets SIGBUS
 * instead of sleeping for ever. NULL with errno set. */
struct watchdog *watchdog_start(int pidfd, int uffd);
/* Stops and joins it; returns 1 if the process had died and faults were poisoned. In a forked
 * child it does nothing (the thread and the stop eventfd belong to the parent) and returns 0. */
int watchdog_stop(struct watchdog *w);

#endif
