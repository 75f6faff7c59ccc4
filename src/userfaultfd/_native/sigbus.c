/* The process-wide SIGBUS resolver of sigbus-mode engines and its state: the attached engines,
 * the ranges retired lately, the handler it replaced, and what a forked child forgets. Everything
 * the handler touches is async-signal-safe: atomics, the grace-period counters (srcu.h) and the
 * engines' resolvers. */
#define _GNU_SOURCE
#include "sigbus.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <ucontext.h>

#include "clock.h"
#include "srcu.h"

#define MAX_SIGBUS_ENGINES 64

/* The attached engines. A slot's resolver is stored before its engine is published, and a slot
 * is emptied before the grace period that lets its engine be freed. */
static struct {
    void *_Atomic engine;
    _Atomic(sigbus_resolver) resolve;
    _Atomic(sigbus_describer) describe;
} sig_engines[MAX_SIGBUS_ENGINES];
static struct srcu sig_srcu; /* readers: handlers walking sig_engines */

/* Ranges of regions removed lately. A thread that faulted on a region just before it was
 * detached (unregistered) or unmapped gets its SIGBUS only when it returns to user space; by then
 * the region is gone from every table. Such a signal is stale: retrying the access finds the
 * page, a zero page, or no mapping (SIGSEGV), and raises no userfault again. A recorded range is
 * trusted for RETIRED_NS only, so that a later, real SIGBUS there (a truncated file mapped over
 * it) is passed on. Entries are written under a sequence count: the handler never uses a torn
 * one. */
#define RETIRED 64
#define RETIRED_NS 2000000000ull
static struct {
    atomic_uint_fast64_t seq, start, end, until;
} retired[RETIRED];
static atomic_uint retired_next;

void sigbus_retire(uint64_t start, uint64_t end)
{
    unsigned k = atomic_fetch_add(&retired_next, 1) % RETIRED;
    atomic_fetch_add(&retired[k].seq, 1); /* odd: being written */
    atomic_store(&retired[k].start, start);
    atomic_store(&retired[k].end, end);
    atomic_store(&retired[k].until, now_ns() + RETIRED_NS);
    atomic_fetch_add(&retired[k].seq, 1);
}

static int is_retired(uint64_t addr, uint64_t now)
{
    for (unsigned k = 0; k < RETIRED; k++) {
        uint64_t seq = atomic_load(&retired[k].seq);
        int hit = addr >= atomic_load(&retired[k].start) && addr < atomic_load(&retired[k].end) &&
                  now < atomic_load(&retired[k].until);
        if (hit && !(seq & 1) && atomic_load(&retired[k].seq) == seq)
            return 1;
    }
    return 0;
}

static struct sigaction sig_previous;
static int sig_installed;
static pthread_mutex_t sig_lock = PTHREAD_MUTEX_INITIALIZER;
/* Handlers installed after ours, in front of which sigbus_guard put on_sigbus_late. */
#define DISPLACERS 8
static struct sigaction displacers[DISPLACERS];
static atomic_uint displacer_now;

static void chain_to(const struct sigaction *prev, int sig, siginfo_t *si, void *uc)
{
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(sig, si, uc);
    } else if (prev->sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL);
        raise(sig); /* delivered when this handler returns: the default action */
    } else if (prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
    }
}

static void chain_sigbus(int sig, siginfo_t *si, void *uc) { chain_to(&sig_previous, sig, si, uc); }

/* The notice of a poisoned page of ours, once: a previous handler that returns makes the access
 * fault again, and the line would repeat for ever. */
static void say_once(const siginfo_t *si)
{
    static atomic_uint_fast64_t last = UINT64_MAX;
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr;
    if (si->si_code > 0 && atomic_exchange(&last, addr) != addr) /* si_addr: kernel signals */
        notice_say(addr);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    if (si->si_code == BUS_ADRERR) { /* a userfault; poisoned pages come as BUS_MCEERR_AR */
        uint64_t t0 = now_ns(), addr = (uint64_t)(uintptr_t)si->si_addr;
        int verdict = SIGBUS_ELSEWHERE, write = 0;
#ifdef __x86_64__
        write = (((ucontext_t *)uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0; /* the fault's W bit */
#endif
        unsigned gidx = srcu_enter(&sig_srcu);
        for (int k = 0; k < MAX_SIGBUS_ENGINES && verdict == SIGBUS_ELSEWHERE; k++) {
            void *e = atomic_load(&sig_engines[k].engine);
            if (e)
                verdict = atomic_load(&sig_engines[k].resolve)(e, addr, write, t0);
        }
        srcu_exit(&sig_srcu, gidx);
        /* Resolved: the access is retried and now finds its page. Retired: a stale signal. */
        if (verdict == SIGBUS_RESOLVED || is_retired(addr, now_ns())) {
            errno = saved;
            return;
        }
    }
    say_once(si);
    chain_sigbus(sig, si, uc);
    errno = saved;
}

/* Whether an attached engine serves addr; if so its "region ID SOURCE at offset OFF" is in f. */
static int describe(uint64_t addr, struct fmt *f)
{
    int found = 0;
    unsigned gidx = srcu_enter(&sig_srcu);
    for (int k = 0; k < MAX_SIGBUS_ENGINES && !found; k++) {
        void *e = atomic_load(&sig_engines[k].engine);
        if (e)
            found = atomic_load(&sig_engines[k].describe)(e, addr, f);
    }
    srcu_exit(&sig_srcu, gidx);
    return found;
}

/* In front of a handler that displaced ours (see sigbus_guard). Everything goes on to that
 * handler, but a userfault on a sigbus-mode region ends the process with a line saying why:
 * passed on alone, it would return to an access that faults again, for ever. */
static void on_sigbus_late(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    const struct sigaction *displacer = &displacers[atomic_load(&displacer_now) % DISPLACERS];
    char text[560];
    struct fmt f = {text, text + sizeof(text)};
    fmt_str(&f, "a SIGBUS handler installed after the sigbus-mode PageServer started "
                "(faulthandler.enable(), signal.signal(SIGBUS, ...)) takes the faults of ");
    if (si->si_code == BUS_ADRERR && describe((uint64_t)(uintptr_t)si->si_addr, &f)) {
        fmt_str(&f, " and they would never end: install such handlers before creating the "
                    "server, or use mode='thread'");
        notice_write((uint64_t)(uintptr_t)si->si_addr, text);
        chain_to(displacer, sig, si, uc); /* faulthandler prints its traceback */
        signal(sig, SIG_DFL);
        raise(sig); /* blocked in this handler: delivered, fatally, when it returns */
    } else {
        say_once(si);
        chain_to(displacer, sig, si, uc);
    }
    errno = saved;
}

/* A handler installed after ours sees our userfaults first, and returns: the access faults again
 * at once, for ever, at 100% CPU (a Python handler can never even run if the faulting thread
 * holds the GIL). Put on_sigbus_late in front of it. The default and ignore dispositions already
 * end the process. */
void sigbus_guard(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return;
    if (cur.sa_flags & SA_SIGINFO
            ? cur.sa_sigaction == on_sigbus || cur.sa_sigaction == on_sigbus_late
            : cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)
        return;
    pthread_mutex_lock(&sig_lock);
    unsigned k = (atomic_load(&displacer_now) + 1) % DISPLACERS;
    displacers[k] = cur; /* ready before on_sigbus_late can run */
    atomic_store(&displacer_now, k);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus_late;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
    pthread_mutex_unlock(&sig_lock);
}

/* In a forked child no engine serves: its threads are the parent's and its regions are not
 * inherited (MADV_DONTFORK). */
static void sigbus_forget_all(void)
{
    for (int k = 0; k < MAX_SIGBUS_ENGINES; k++)
        atomic_store(&sig_engines[k].engine, NULL);
    /* A parent thread may have held the lock, or been inside the handler, at the fork. */
    pthread_mutex_init(&sig_lock, NULL);
    atomic_store(&sig_srcu.readers[0], 0);
    atomic_store(&sig_srcu.readers[1], 0);
}

static int install_locked(void)
{
    int rc = 0;
    if (!sig_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        rc = pthread_atfork(NULL, NULL, sigbus_forget_all);
        if (!rc && sigaction(SIGBUS, &sa, &sig_previous) != 0)
            rc = errno;
        sig_installed = !rc;
    }
    return rc;
}

int sigbus_install(void)
{
    pthread_mutex_lock(&sig_lock);
    int rc = install_locked();
    pthread_mutex_unlock(&sig_lock);
    return rc;
}

int sigbus_attach(void *e, sigbus_resolver resolve, sigbus_describer describe)
{
    pthread_mutex_lock(&sig_lock);
    int rc = install_locked();
    int k = 0;
    while (!rc && k < MAX_SIGBUS_ENGINES && atomic_load(&sig_engines[k].engine))
        k++;
    if (!rc && k == MAX_SIGBUS_ENGINES)
        rc = EMFILE;
    if (!rc) {
        atomic_store(&sig_engines[k].resolve, resolve);
        atomic_store(&sig_engines[k].describe, describe);
        atomic_store(&sig_engines[k].engine, e);
    }
    pthread_mutex_unlock(&sig_lock);
    return rc;
}

void sigbus_detach(void *e)
{
    pthread_mutex_lock(&sig_lock);
    for (int k = 0; k < MAX_SIGBUS_ENGINES; k++) {
        void *cur = e;
        atomic_compare_exchange_strong(&sig_engines[k].engine, &cur, NULL);
    }
    srcu_synchronize(&sig_srcu);
    pthread_mutex_unlock(&sig_lock);
}

int sigbus_first(void)
{
    struct sigaction cur;
    return sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
           cur.sa_sigaction == on_sigbus;
}
