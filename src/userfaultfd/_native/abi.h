/* The userfaultfd kernel ABI as of Linux 6.18, defined by the project.
 *
 * The machine's <linux/userfaultfd.h> may be older than its kernel (it lacks MOVE, POISON,
 * WP_UNPOPULATED and WP_ASYNC on Debian 12), so nothing here comes from /usr/include.
 * tests/test_abi.py checks every number against shared/reference/userfaultfd-abi.md. */
#ifndef UFFD_ABI_H
#define UFFD_ABI_H

#include <stdint.h>

#define UFFD_NR_userfaultfd 323 /* x86_64 */
#define UFFD_USER_MODE_ONLY 1u
#define UFFD_API 0xAAu

#define USERFAULTFD_IOC_NEW 0x0000AA00u
#define UFFDIO_API 0xC018AA3Fu
#define UFFDIO_REGISTER 0xC020AA00u
#define UFFDIO_UNREGISTER 0x8010AA01u
#define UFFDIO_WAKE 0x8010AA02u
#define UFFDIO_COPY 0xC028AA03u
#define UFFDIO_ZEROPAGE 0xC020AA04u
#define UFFDIO_MOVE 0xC028AA05u
#define UFFDIO_WRITEPROTECT 0xC018AA06u
#define UFFDIO_CONTINUE 0xC020AA07u
#define UFFDIO_POISON 0xC020AA08u
#define PAGEMAP_SCAN 0xC0606610u /* on /proc/PID/pagemap, 6.7+ */

#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFD_EVENT_FORK 0x13
#define UFFD_EVENT_REMAP 0x14
#define UFFD_EVENT_REMOVE 0x15
#define UFFD_EVENT_UNMAP 0x16

#define UFFD_PAGEFAULT_FLAG_WRITE (1u << 0)
#define UFFD_PAGEFAULT_FLAG_WP (1u << 1)
#define UFFD_PAGEFAULT_FLAG_MINOR (1u << 2)

#define UFFD_FEATURE_PAGEFAULT_FLAG_WP (1u << 0)
#define UFFD_FEATURE_EVENT_FORK (1u << 1)
#define UFFD_FEATURE_EVENT_REMAP (1u << 2)
#define UFFD_FEATURE_EVENT_REMOVE (1u << 3)
#define UFFD_FEATURE_EVENT_UNMAP (1u << 6)
#define UFFD_FEATURE_SIGBUS (1u << 7)
#define UFFD_FEATURE_THREAD_ID (1u << 8)
#define UFFD_FEATURE_EXACT_ADDRESS (1u << 11)
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1u << 12)
#define UFFD_FEATURE_WP_UNPOPULATED (1u << 13)
#define UFFD_FEATURE_POISON (1u << 14)
#define UFFD_FEATURE_WP_ASYNC (1u << 15)

#define UFFDIO_REGISTER_MODE_MISSING (1u << 0)
#define UFFDIO_REGISTER_MODE_WP (1u << 1)
#define UFFDIO_REGISTER_MODE_MINOR (1u << 2)

/* Every fill ioctl (COPY, ZEROPAGE, CONTINUE, POISON, MOVE) has DONTWAKE as bit 0. */
#define UFFDIO_MODE_DONTWAKE (1u << 0)
/* COPY and CONTINUE: install the page write-protected. */
#define UFFDIO_COPY_MODE_WP (1u << 1)
#define UFFDIO_CONTINUE_MODE_WP (1u << 1)
#define UFFDIO_WRITEPROTECT_MODE_WP (1u << 0)
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE (1u << 1)

struct uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct {
            uint64_t flags;
            uint64_t address;
            uint32_t ptid;
            uint32_t pad;
        } pagefault;
        struct {
            uint32_t ufd;
        } fork;
        struct {
            uint64_t from, to, len;
        } remap;
        struct {
            uint64_t start, end;
        } remove;
        uint64_t reserved[3];
    } arg;
} __attribute__((packed));

struct uffdio_api {
    uint64_t api, features, ioctls;
};
struct uffdio_range {
    uint64_t start, len;
};
struct uffdio_register {
    struct uffdio_range range;
    uint64_t mode, ioctls;
};
/* COPY and MOVE: dst, src, len, mode, result. */
struct uffdio_copy {
    uint64_t dst, src, len, mode;
    int64_t result;
};
/* ZEROPAGE, CONTINUE and POISON: range, mode, result. */
struct uffdio_rangeop {
    struct uffdio_range range;
    uint64_t mode;
    int64_t result;
};
struct uffdio_writeprotect {
    struct uffdio_range range;
    uint64_t mode;
};

/* PAGEMAP_SCAN: flags, and the page categories every mask and page_region.categories use. */
#define PM_SCAN_WP_MATCHING (1u << 0)
#define PM_SCAN_CHECK_WPASYNC (1u << 1)
#define PAGE_IS_WPALLOWED (1u << 0)
#define PAGE_IS_WRITTEN (1u << 1)
#define PAGE_IS_FILE (1u << 2)
#define PAGE_IS_PRESENT (1u << 3)
#define PAGE_IS_SWAPPED (1u << 4)
#define PAGE_IS_PFNZERO (1u << 5)
#define PAGE_IS_HUGE (1u << 6)

struct page_region {
    uint64_t start, end, categories; /* end is exclusive */
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
_Static_assert(sizeof(struct uffdio_api) == 24, "uffdio_api");
_Static_assert(sizeof(struct uffdio_register) == 32, "uffdio_register");
_Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy");
_Static_assert(sizeof(struct uffdio_rangeop) == 32, "uffdio_rangeop");
_Static_assert(sizeof(struct uffdio_writeprotect) == 24, "uffdio_writeprotect");
_Static_assert(sizeof(struct page_region) == 24, "page_region");
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg");

#endif
