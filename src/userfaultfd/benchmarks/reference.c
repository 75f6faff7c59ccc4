/* Reference programs for `userfaultfd bench`: the minimal C handlers and the kernel's own rates
 * that our figures are divided by. Built at run time with the system compiler.
 *
 *   reference handler ORDER_FILE PAGES THREADS TOUCH_CPU HANDLER_CPU
 *                              poll/read + UFFDIO_COPY per fault, one handler thread; THREADS
 *                              faulting threads split ORDER
 *   reference sigbus  ORDER_FILE PAGES TOUCH_CPU UFFD_FEATURE_SIGBUS: COPY in the SIGBUS handler
 *   reference pread   FILE                       one pread of FILE into fresh anonymous memory
 *   reference populate BYTES                     mmap(MAP_POPULATE): the kernel's populate rate
 *
 * Each prints the nanoseconds the measured part took. ORDER_FILE holds native uint32 page
 * indices: the faulting threads touch one byte of each page in that order, exactly as
 * userfaultfd._core.touch_pages does for our side. The fault programs first run the same pattern
 * once and drop the pages again (MADV_DONTNEED), so the measured run gets warm threads and
 * recycled memory, as our side's long-lived process does; fresh guest memory is several times
 * slower on first touch in a VM. A CPU argument pins that thread (-1: the scheduler decides). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define UFFDIO_API 0xC018AA3Fu
#define UFFDIO_REGISTER 0xC020AA00u
#define UFFDIO_COPY 0xC028AA03u
#define UFFD_FEATURE_SIGBUS (1u << 7)

struct uffd_msg {
    uint8_t event, r1;
    uint16_t r2;
    uint32_t r3;
    uint64_t flags, address, ptid;
} __attribute__((packed));
struct uffdio_api {
    uint64_t api, features, ioctls;
};
struct uffdio_register {
    uint64_t start, len, mode, ioctls;
};
struct uffdio_copy {
    uint64_t dst, src, len, mode;
    int64_t copy;
};

static long page;
static int uffd;
static char *region, *fill;
static size_t region_bytes;
static uint32_t *order;
static size_t norder;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static uint64_t now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void setup(const char *order_file, size_t pages, uint64_t features)
{
    int fd = open(order_file, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(order_file);
    order = malloc((size_t)st.st_size);
    if (read(fd, order, (size_t)st.st_size) != st.st_size)
        die("read order");
    norder = (size_t)st.st_size / 4;
    close(fd);
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0 && errno == EPERM) /* unprivileged: user-mode faults only, as our side does */
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* USER_MODE_ONLY */);
    if (uffd < 0)
        die("userfaultfd");
    struct uffdio_api api = {0xAA, features, 0};
    if (ioctl(uffd, UFFDIO_API, &api))
        die("UFFDIO_API");
    region_bytes = pages * (size_t)page;
    region = mmap(NULL, region_bytes, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    fill = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || fill == MAP_FAILED)
        die("mmap");
    memset(fill, 0x5A, (size_t)page);
    struct uffdio_register reg = {(uint64_t)(uintptr_t)region, region_bytes, 1, 0};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
        die("pthread_setaffinity_np");
}

static void *handler(void *arg)
{
    pin((int)(intptr_t)arg);
    struct uffd_msg msg;
    struct pollfd pfd = {uffd, POLLIN, 0};
    for (;;) {
        if (poll(&pfd, 1, -1) < 0)
            die("poll");
        if (read(uffd, &msg, sizeof(msg)) != sizeof(msg)) {
            if (errno == EAGAIN)
                continue;
            die("read");
        }
        struct uffdio_copy c = {msg.address & ~(uint64_t)(page - 1), (uint64_t)(uintptr_t)fill,
                                (uint64_t)page, 0, 0};
        if (ioctl(uffd, UFFDIO_COPY, &c) && errno != EEXIST)
            die("UFFDIO_COPY");
    }
    return NULL;
}

struct slice {
    size_t from, to;
    char *base;
};

static void *toucher(void *arg)
{
    struct slice *s = arg;
    for (size_t k = s->from; k < s->to; k++)
        (void)*(volatile char *)(s->base + (size_t)order[k] * (size_t)page);
    return NULL;
}

/* Touches ORDER over base with `threads` threads (one: the calling thread, as on our side);
 * returns the nanoseconds it took. */
static uint64_t touch_all(char *base, int threads)
{
    pthread_t t[64];
    struct slice s[64];
    uint64_t t0 = now();
    if (threads == 1) {
        s[0] = (struct slice){0, norder, base};
        toucher(&s[0]);
        return now() - t0;
    }
    for (int k = 0; k < threads; k++) {
        s[k] = (struct slice){norder * k / threads, norder * (k + 1) / threads, base};
        if (pthread_create(&t[k], NULL, toucher, &s[k]))
            die("pthread_create");
    }
    for (int k = 0; k < threads; k++)
        pthread_join(t[k], NULL);
    return now() - t0;
}

static void warm_up(int threads)
{
    touch_all(region, threads);
    if (madvise(region, region_bytes, MADV_DONTNEED)) /* missing again: faults once more */
        die("madvise");
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    struct uffdio_copy c = {(uint64_t)(uintptr_t)si->si_addr & ~(uint64_t)(page - 1),
                            (uint64_t)(uintptr_t)fill, (uint64_t)page, 0, 0};
    if (ioctl(uffd, UFFDIO_COPY, &c) && errno != EEXIST)
        _exit(3);
}

int main(int argc, char **argv)
{
    page = sysconf(_SC_PAGE_SIZE);
    if (argc == 7 && !strcmp(argv[1], "handler")) {
        int threads = atoi(argv[4]);
        pthread_t h;
        setup(argv[2], strtoull(argv[3], NULL, 0), 0);
        pin(atoi(argv[5]));
        if (threads < 1 || threads > 64 ||
            pthread_create(&h, NULL, handler, (void *)(intptr_t)atoi(argv[6])))
            die("threads");
        warm_up(threads);
        printf("%llu\n", (unsigned long long)touch_all(region, threads));
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "sigbus")) {
        setup(argv[2], strtoull(argv[3], NULL, 0), UFFD_FEATURE_SIGBUS);
        pin(atoi(argv[4]));
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGBUS, &sa, NULL);
        warm_up(1);
        printf("%llu\n", (unsigned long long)touch_all(region, 1));
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "pread")) {
        int fd = open(argv[2], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
            die(argv[2]);
        uint64_t t0 = now();
        char *buf = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED)
            die("mmap");
        for (off_t done = 0; done < st.st_size;) {
            ssize_t n = pread(fd, buf + done, (size_t)(st.st_size - done), done);
            if (n <= 0)
                die("pread");
            done += n;
        }
        printf("%llu\n", (unsigned long long)(now() - t0));
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "populate")) {
        size_t bytes = strtoull(argv[2], NULL, 0);
        uint64_t t0 = now();
        if (mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                 -1, 0) == MAP_FAILED)
            die("mmap");
        printf("%llu\n", (unsigned long long)(now() - t0));
        return 0;
    }
    fprintf(stderr, "usage: see the comment at the top of reference.c\n");
    return 2;
}
