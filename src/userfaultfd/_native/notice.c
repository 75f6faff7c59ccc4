/* Last words for a poisoned page. A thread touching a page that could not be produced gets
 * SIGBUS and the process dies; before it does, our SIGBUS handler writes one line saying which
 * region, which offset and what failed. The text is formatted when the page is poisoned (in this
 * process, or by a handler process on a shared board); the handler only finds it and write()s it,
 * both async-signal-safe. */
#define _GNU_SOURCE
#include "notice.h"

#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#define RING 128
#define BOARDS 64

static struct notice_slot ring[RING]; /* seq accessed atomically */
static atomic_uint_fast64_t ring_next;
static const struct notice_slot *_Atomic boards[BOARDS];

void fmt_str(struct fmt *f, const char *s)
{
    while (*s && f->p + 1 < f->end)
        *f->p++ = *s++;
    *f->p = 0;
}

static void fmt_digits(struct fmt *f, uint64_t v, unsigned base)
{
    char buf[24], *q = buf + sizeof(buf);
    *--q = 0;
    do
        *--q = "0123456789abcdef"[v % base];
    while ((v /= base) != 0);
    fmt_str(f, q);
}

void fmt_hex(struct fmt *f, uint64_t v)
{
    fmt_str(f, "0x");
    fmt_digits(f, v, 16);
}

void fmt_dec(struct fmt *f, uint64_t v) { fmt_digits(f, v, 10); }

void fmt_errno(struct fmt *f, int err)
{
    /* glibc's name and description tables are static strings: no locale, no allocation */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 32)
    const char *name = strerrorname_np(err), *desc = strerrordesc_np(err);
    if (name && desc) {
        fmt_str(f, name);
        fmt_str(f, " (");
        fmt_str(f, desc);
        fmt_str(f, ")");
        return;
    }
#endif
    fmt_str(f, "errno ");
    fmt_dec(f, (uint64_t)err);
}

/* Notice n goes to slot n % size with seq 2n + 1 while written and 2n + 2 once complete: readers
 * skip odd ones and prefer the highest (newest). */
static void slot_write(struct notice_slot *s, uint64_t n, uint64_t start, uint64_t end,
                       const char *text)
{
    __atomic_store_n(&s->seq, 2 * n + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&s->start, start, __ATOMIC_RELAXED);
    __atomic_store_n(&s->end, end, __ATOMIC_RELAXED);
    struct fmt f = {s->text, s->text + NOTICE_TEXT};
    fmt_str(&f, text);
    __atomic_store_n(&s->seq, 2 * n + 2, __ATOMIC_RELEASE);
}

void notice_record(uint64_t start, uint64_t end, const char *text)
{
    uint64_t n = atomic_fetch_add(&ring_next, 1);
    slot_write(&ring[n % RING], n, start, end, text);
}

int notice_board_add(const struct notice_slot *board)
{
    for (int k = 0; k < BOARDS; k++) {
        const struct notice_slot *none = NULL;
        if (atomic_compare_exchange_strong(&boards[k], &none, board))
            return 0;
    }
    return -1;
}

/* The caller keeps the board mapped: a SIGBUS handler may be reading it right now (a stale
 * read of an unmapped board would fault in the handler). */
void notice_board_remove(const struct notice_slot *board)
{
    for (int k = 0; k < BOARDS; k++) {
        const struct notice_slot *cur = board;
        atomic_compare_exchange_strong(&boards[k], &cur, NULL);
    }
}

/* The text of the newest notice in slots[0, n) covering addr and newer than *best, copied into
 * out; 1 if found. */
static int find(const struct notice_slot *slots, int n, uint64_t addr, char *out, uint64_t *best)
{
    int found = 0;
    for (int k = 0; k < n; k++) {
        const struct notice_slot *s = &slots[k];
        uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (!seq || (seq & 1) || seq <= *best)
            continue;
        uint64_t start = __atomic_load_n(&s->start, __ATOMIC_RELAXED);
        uint64_t end = __atomic_load_n(&s->end, __ATOMIC_RELAXED);
        if (addr < start || addr >= end)
            continue;
        char text[NOTICE_TEXT];
        for (int i = 0; i < NOTICE_TEXT; i++)
            text[i] = __atomic_load_n(&s->text[i], __ATOMIC_RELAXED);
        text[NOTICE_TEXT - 1] = 0;
        if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) != seq)
            continue; /* rewritten meanwhile */
        memcpy(out, text, NOTICE_TEXT);
        *best = seq;
        found = 1;
    }
    return found;
}

void notice_write(uint64_t addr, const char *text)
{
    char line[640];
    struct fmt f = {line, line + sizeof(line) - 1};
    fmt_str(&f, "userfaultfd: fatal SIGBUS at ");
    fmt_hex(&f, addr);
    fmt_str(&f, ": ");
    fmt_str(&f, text);
    fmt_str(&f, "\n");
    size_t len = (size_t)(f.p - line), done = 0;
    while (done < len) {
        ssize_t n = write(2, line + done, len - done);
        if (n <= 0)
            break;
        done += (size_t)n;
    }
}

int notice_say(uint64_t addr)
{
    char text[NOTICE_TEXT];
    uint64_t best = 0;
    int found = find(ring, RING, addr, text, &best);
    for (int k = 0; k < BOARDS && !found; k++) {
        const struct notice_slot *b = atomic_load(&boards[k]);
        if (b)
            found = find(b, NOTICE_BOARD_SLOTS, addr, text, &best);
    }
    if (found)
        notice_write(addr, text);
    return found;
}
