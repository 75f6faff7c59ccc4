#ifndef UFFD_SEED_H
#define UFFD_SEED_H

struct seed_handler;

/* Starts the seed's fault-handler thread on uffd, printing to out_fd. NULL with errno set. */
struct seed_handler *seed_start(int uffd, int out_fd);
/* Stops and joins it; returns the errno that ended it early (0 if none). */
int seed_stop(struct seed_handler *h, int *faults);

#endif
