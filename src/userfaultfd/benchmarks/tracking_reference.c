/* Reference write trackers for `userfaultfd bench` (dirty-scan, write-cost), built at run time.
 *
 *   tracking_reference mprotect ORDER_FILE PAGES   the classic user-space tracker: the memory is
 *        populated, then mprotect(PROT_READ); the first write to a page raises SIGSEGV, whose
 *        handler records the page in a bitmap and mprotect()s it writable again. Prints the
 *        nanoseconds the writes to the pages listed in ORDER_FILE took (one byte each).
 *   tracking_reference softdirty BYTES WRITTEN_FILE  soft-dirty, as CRIU tracks: BYTES of populated
 *        memory, "4" written to /proc/self/clear_refs, the pages in WRITTEN_FILE written; then
 *        collect (one pread of /proc/self/pagemap over the range, bit 55 of each entry) and
 *        re-arm (clear_refs again). Prints the nanoseconds of collect + re-arm, median of 5, and
 *        how many pages were found soft-dirty: 0 on a kernel built without CONFIG_MEM_SOFT_DIRTY,
 *        where clear_refs still walks the page tables but protects nothing (a lower bound).
 *
 * ORDER_FILE and WRITTEN_FILE hold native uint32 page indices. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char *base;
static long page;
static uint64_t *bitmap;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint32_t *load(const char *path, size_t *n)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(path);
        exit(1);
    }
    uint32_t *v = malloc((size_t)st.st_size + 4);
    if (!v || read(fd, v, (size_t)st.st_size) != st.st_size) {
        perror("read");
        exit(1);
    }
    close(fd);
    *n = (size_t)st.st_size / 4;
    return v;
}

static void on_segv(int sig, siginfo_t *si, void *uc)
{
    uintptr_t a = (uintptr_t)si->si_addr & ~(uintptr_t)(page - 1);
    size_t i = (a - (uintptr_t)base) / (size_t)page;
    bitmap[i / 64] |= 1ull << (i % 64);
    mprotect((void *)a, (size_t)page, PROT_READ | PROT_WRITE);
}

static char *populated(size_t bytes)
{
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    madvise(p, bytes, MADV_NOHUGEPAGE); /* 4 KiB pages on both sides (see bench_tracking.py) */
    for (size_t o = 0; o < bytes; o += (size_t)page)
        p[o] = 1;
    return p;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void clear_refs(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0 || write(fd, "4", 1) != 1) {
        perror("clear_refs");
        exit(1);
    }
    close(fd);
}

int main(int argc, char **argv)
{
    page = sysconf(_SC_PAGE_SIZE);
    if (argc == 4 && !strcmp(argv[1], "mprotect")) {
        size_t n, pages = strtoull(argv[3], NULL, 0);
        uint32_t *order = load(argv[2], &n);
        base = populated(pages * (size_t)page);
        bitmap = calloc(pages / 64 + 1, 8);
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
        mprotect(base, pages * (size_t)page, PROT_READ);
        uint64_t t0 = now_ns();
        for (size_t k = 0; k < n; k++)
            *(volatile char *)(base + (size_t)order[k] * (size_t)page) += 1;
        printf("%llu\n", (unsigned long long)(now_ns() - t0));
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "softdirty")) {
        size_t n, bytes = strtoull(argv[2], NULL, 0), pages = bytes / (size_t)page;
        uint32_t *written = load(argv[3], &n);
        base = populated(bytes);
        uint64_t *entries = malloc(pages * 8);
        int pm = open("/proc/self/pagemap", O_RDONLY);
        if (pm < 0 || !entries) {
            perror("pagemap");
            return 1;
        }
        uint64_t times[5];
        size_t found = 0;
        for (int run = 0; run < 5; run++) {
            clear_refs();
            for (size_t k = 0; k < n; k++)
                base[(size_t)written[k] * (size_t)page] += 1;
            uint64_t t0 = now_ns();
            off_t off = (off_t)((uintptr_t)base / (uintptr_t)page * 8);
            if (pread(pm, entries, pages * 8, off) != (ssize_t)(pages * 8)) {
                perror("pread pagemap");
                return 1;
            }
            found = 0;
            for (size_t i = 0; i < pages; i++)
                found += (entries[i] >> 55) & 1u;
            clear_refs();
            times[run] = now_ns() - t0;
        }
        qsort(times, 5, sizeof(times[0]), cmp_u64);
        printf("%llu %zu\n", (unsigned long long)times[2], found);
        return 0;
    }
    fprintf(stderr, "usage: %s mprotect ORDER_FILE PAGES | softdirty BYTES WRITTEN_FILE\n", argv[0]);
    return 2;
}
