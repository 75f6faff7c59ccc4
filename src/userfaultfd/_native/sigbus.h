/* The process-wide SIGBUS resolver of sigbus-mode engines (UFFD_FEATURE_SIGBUS): a fault in a
 * registered range raises SIGBUS in the faulting thread, and the handler asks each attached engine
 * to serve it. The engines are reached through a callback they register, so this file knows
 * nothing of engine.c. No Python object is touched here. */
#ifndef UFFD_SIGBUS_H
#define UFFD_SIGBUS_H

#include <stdint.h>

#include "notice.h"

/* What an engine's resolver says about a faulting address. */
enum sigbus_verdict {
    SIGBUS_ELSEWHERE = 0, /* none of its regions covers it: ask the next engine */
    SIGBUS_RESOLVED = 1,  /* the page is installed: the access is retried */
    SIGBUS_NOT_OURS = 2,  /* its region covers it but the page was poisoned: the application's */
};

/* Called in the signal handler, so async-signal-safe; write: the access was a write (x86_64: the
 * page fault's error code; 0 where unknown); t0 is when the signal came (nanoseconds, clock.h).
 * Returns an enum sigbus_verdict. */
typedef int (*sigbus_resolver)(void *engine, uint64_t addr, int write, uint64_t t0);
/* Writes "region ID SOURCE at offset OFF" and returns 1 if the engine serves addr (a page not
 * poisoned); async-signal-safe. */
typedef int (*sigbus_describer)(void *engine, uint64_t addr, struct fmt *f);

/* Installs the handler on first use (keeping the previous one, to pass on the signals that are not
 * userfaults) and attaches an engine. 0 or errno (EMFILE: too many engines). */
int sigbus_attach(void *engine, sigbus_resolver resolve, sigbus_describer describe);
/* Installs the handler with no engine: before passing a SIGBUS on it writes the notice of a page
 * poisoned in this process (notice.h), which the default action would end silently. 0 or errno. */
int sigbus_install(void);
/* How often a sigbus-mode engine's event thread calls sigbus_guard. */
#define SIGBUS_GUARD_MS 100
/* A handler installed after ours (faulthandler.enable(), signal.signal(SIGBUS, ...)) sees our
 * userfaults first; this puts a guard in front of it that ends such a fault with a line saying so,
 * instead of the endless fault again and again (see sigbus.c). */
void sigbus_guard(void);
/* Detaches it; once this returns no handler is still calling its resolver. */
void sigbus_detach(void *engine);
/* Records the range of a region just removed: a SIGBUS for it that comes late is stale. */
void sigbus_retire(uint64_t start, uint64_t end);
/* Whether SIGBUS goes to the resolver first. A handler installed later (faulthandler enabled after
 * a sigbus-mode engine started) sees userfaults first and treats them as fatal. */
int sigbus_first(void);

#endif
