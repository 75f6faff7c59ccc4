/* The fork guard: a clear message instead of a bare SIGSEGV when a forked child touches a
 * region that is not served in children. Armed in the child, right after the fork. */
#define _GNU_SOURCE
#include "forkguard.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct guard {
    uint64_t start, end;
    char *message;
};

static struct guard *guards; /* replaced only while no handler runs: armed once per child */
static int nguards;
static struct sigaction previous;
static int installed;

static void on_sigsegv(int sig, siginfo_t *si, void *uc)
{
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr;
    for (int k = 0; k < nguards; k++) {
        if (addr < guards[k].start || addr >= guards[k].end)
            continue;
        const char *m = guards[k].message;
        size_t len = strlen(m);
        while (len) {
            ssize_t w = write(STDERR_FILENO, m, len);
            if (w <= 0)
                break;
            m += w, len -= (size_t)w;
        }
        break;
    }
    /* Whatever it was, the previous handler (or the default action) deals with it now. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, uc);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL); /* the access is retried on return, and kills as before */
    } else {
        previous.sa_handler(sig);
    }
}

int forkguard_arm(int n, const uint64_t *starts, const uint64_t *ends, const char *const *messages)
{
    struct guard *g = calloc((size_t)n + 1, sizeof(*g));
    if (!g)
        return ENOMEM;
    for (int k = 0; k < n; k++) {
        g[k] = (struct guard){starts[k], ends[k], strdup(messages[k])};
        if (!g[k].message) {
            while (k--)
                free(g[k].message);
            free(g);
            return ENOMEM;
        }
    }
    struct guard *old = guards;
    int nold = nguards;
    nguards = 0;
    guards = g;
    nguards = n;
    for (int k = 0; k < nold; k++)
        free(old[k].message);
    free(old);
    if (!installed && n) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigsegv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &previous) != 0)
            return errno;
        installed = 1;
    }
    return 0;
}
