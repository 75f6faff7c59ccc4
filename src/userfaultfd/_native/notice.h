/* Last words for a poisoned page: the line a dying process writes about it. */
#ifndef UFFD_NOTICE_H
#define UFFD_NOTICE_H

#include <stddef.h>
#include <stdint.h>

/* One notice, 256 bytes. Boards (below) have this layout in memory another process writes: keep
 * it in step with remote.py. seq is odd while the slot is being written. */
#define NOTICE_TEXT 232
struct notice_slot {
    uint64_t seq, start, end;
    char text[NOTICE_TEXT]; /* NUL-terminated */
};
#define NOTICE_BOARD_SLOTS 64

/* An async-signal-safe formatter into a fixed buffer (always NUL-terminated, truncating). */
struct fmt {
    char *p, *end;
};
void fmt_str(struct fmt *f, const char *s);
void fmt_hex(struct fmt *f, uint64_t v);
void fmt_dec(struct fmt *f, uint64_t v);
void fmt_errno(struct fmt *f, int err); /* "EFAULT (Bad address)" */

/* [start, end) was poisoned because of what `text` says. Async-signal-safe: the SIGBUS resolver
 * poisons from signal context. */
void notice_record(uint64_t start, uint64_t end, const char *text);
/* A board of NOTICE_BOARD_SLOTS slots, written by a handler process (PythonSourceServer). */
int notice_board_add(const struct notice_slot *board);
void notice_board_remove(const struct notice_slot *board);
/* Writes "userfaultfd: fatal SIGBUS at ADDR: TEXT" to stderr for a recorded address; returns
 * whether it did. Async-signal-safe. */
int notice_say(uint64_t addr);
/* Writes "userfaultfd: fatal SIGBUS at ADDR: TEXT" (up to ~600 bytes) to stderr.
 * Async-signal-safe. */
void notice_write(uint64_t addr, const char *text);

#endif
