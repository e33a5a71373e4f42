/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * dsvm_uapi.h - the ABI between dsvm.ko (/dev/dsvm) and user space.
 *
 * This is the only header shared by the module and user space (the node
 * daemon, client processes, the selftest). docs/KMOD.md describes the
 * semantics; the rules here:
 *
 *  - Every field has an explicit size; every struct is padded by hand to a
 *    multiple of 8 bytes, so it has the same layout for 32- and 64-bit
 *    callers and no hidden padding (the module checks the sizes at build
 *    time).
 *  - Fields are marked (in) (read by the module) or (out) (written by it).
 *    Reserved fields are (in) and must be 0; the module refuses anything
 *    else with -EINVAL, so they can be given a meaning later.
 *  - Value 0 of every enum is reserved as invalid and always refused.
 *  - A file must complete DSVM_IOC_HELLO before any other ioctl; until then
 *    every other ioctl fails with -EPROTO. mmap needs no handshake.
 *  - Unknown ioctl numbers fail with -ENOTTY. The struct size is part of
 *    every ioctl number, so a caller built against another layout gets
 *    -ENOTTY, never a misread struct.
 */
#ifndef _UAPI_DSVM_UAPI_H
#define _UAPI_DSVM_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define DSVM_DEVICE_PATH "/dev/dsvm"

/*
 * The ABI version. A change that alters the meaning of an existing field or
 * ioctl bumps it; additions are announced with a feature bit instead.
 * The module accepts exactly DSVM_ABI_VERSION for now.
 */
#define DSVM_ABI_VERSION 1

/* Feature bits reported by DSVM_IOC_HELLO in dsvm_hello.features. */
/* Regions, the per-page table (install, invalidate, downgrade), mmap. */
#define DSVM_FEATURE_REGIONS (1ULL << 0)
/* DSVM_IOC_STATS. */
#define DSVM_FEATURE_STATS (1ULL << 1)
/*
 * Reserved for what comes next (docs/KMOD.md): fault events on read/poll,
 * HMM mirroring, 64 KiB and 2 MiB pages. A caller tests for a bit rather
 * than probing with an ioctl that may fail.
 */

/* The page sizes a region may have. Only 4 KiB is accepted for now. */
#define DSVM_PAGE_SIZE_4K 4096u

/* Largest region: 1 TiB (2^28 pages of 4 KiB). */
#define DSVM_REGION_SIZE_MAX (1ULL << 40)

/* Most regions that may exist at once on a node. */
#define DSVM_REGIONS_MAX 4096

/* The coherence state of a page on this node (proto/PROTOCOL.md: MSI). */
enum dsvm_page_state {
	DSVM_PAGE_STATE_INVALID = 0,	/* reserved: never valid in a request */
	DSVM_PAGE_STATE_SHARED = 1,	/* read-only copy; writes fault */
	DSVM_PAGE_STATE_MODIFIED = 2,	/* the only copy; writable */
};

/*
 * DSVM_IOC_HELLO: the version handshake; must be the first ioctl on a file.
 * Errors: -EPROTO when user_version is not one this module speaks
 * (module_version and features are written all the same, so the caller can
 * say what it found); -EINVAL for a reserved field that is not 0.
 * Repeating HELLO on a file is allowed and changes nothing.
 */
struct dsvm_hello {
	__u32 user_version;	/* (in) DSVM_ABI_VERSION the caller was built with */
	__u32 module_version;	/* (out) DSVM_ABI_VERSION of the module */
	__u64 features;		/* (out) DSVM_FEATURE_* bits */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_REGION_CREATE: adds a region to the node's table. The region
 * belongs to the file that created it: closing that file destroys it (as
 * DSVM_IOC_REGION_DESTROY does), so a daemon that dies leaves nothing.
 * Errors: -EINVAL for a field out of range (region_id 0; base 0 or not
 * page_size aligned; size 0, not a multiple of page_size or above
 * DSVM_REGION_SIZE_MAX; base + size beyond the user address space;
 * page_size other than 4096; flags or reserved not 0); -EEXIST when
 * region_id is in use; -EADDRINUSE when [base, base + size) overlaps
 * another region; -ENOSPC when DSVM_REGIONS_MAX regions exist; -ENOMEM.
 */
struct dsvm_region_create {
	__u64 region_id;	/* (in) nonzero, unique on this node (proto RegionId) */
	__u64 base;		/* (in) user address of the region, the same on every node */
	__u64 size;		/* (in) bytes */
	__u32 page_size;	/* (in) DSVM_PAGE_SIZE_4K */
	__u32 flags;		/* (in) 0 */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_REGION_DESTROY: removes a region. Every page is unmapped from
 * every process and freed; mappings that are still alive fault with SIGBUS
 * from then on, and their VMAs keep only a small record until unmapped.
 * Errors: -EINVAL (region_id 0, reserved not 0); -ENOENT (no such region).
 */
struct dsvm_region_destroy {
	__u64 region_id;	/* (in) */
	__u64 reserved;		/* (in) 0 */
};

/* dsvm_page_install.flags */
/* Install a zero-filled page; data must then be 0. */
#define DSVM_PAGE_INSTALL_ZERO (1u << 0)

/*
 * DSVM_IOC_PAGE_INSTALL: gives the node a copy of one page in a state. The
 * module copies page_size bytes from data into a page of its own. A fault
 * on the page is then resolved in the kernel: reads map it read-only; a
 * write maps it writable when it is Modified and gets SIGBUS when it is
 * Shared.
 * Errors: -EINVAL (region_id 0; page_index beyond the region; state not
 * Shared or Modified; unknown flag; data 0 without DSVM_PAGE_INSTALL_ZERO
 * or not 0 with it; reserved not 0); -ENOENT (no such region); -EEXIST
 * (the page is installed: invalidate it first); -EFAULT (data unreadable);
 * -ENOMEM.
 */
struct dsvm_page_install {
	__u64 region_id;	/* (in) */
	__u64 page_index;	/* (in) page number inside the region */
	__u64 data;		/* (in) user address of page_size bytes, or 0 */
	__u32 state;		/* (in) enum dsvm_page_state: SHARED or MODIFIED */
	__u32 flags;		/* (in) DSVM_PAGE_INSTALL_* */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * A range of pages of a region, for DSVM_IOC_PAGE_INVALIDATE (drop the
 * copies: unmap them from every process and free them) and
 * DSVM_IOC_PAGE_DOWNGRADE (Modified -> Shared: unmap so that the next
 * access faults again; a read then maps read-only, a write gets SIGBUS).
 * Pages of the range that are not installed (invalidate) or not Modified
 * (downgrade) are left alone: both are idempotent.
 * Errors: -EINVAL (region_id 0; count 0; first + count overflowing or
 * beyond the region; reserved not 0); -ENOENT (no such region).
 */
struct dsvm_page_range {
	__u64 region_id;	/* (in) */
	__u64 first;		/* (in) first page index */
	__u64 count;		/* (in) number of pages, at least 1 */
	__u64 done;		/* (out) pages invalidated or downgraded */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_STATS: the module's counters, node-wide. regions, pages and
 * mappings are current values and are all 0 when nothing is in use (the
 * selftest's leak check); the fault counters only grow.
 * Errors: none past the handshake.
 */
struct dsvm_stats {
	__u64 regions;		/* (out) regions in the table */
	__u64 pages;		/* (out) installed pages held by the table */
	__u64 mappings;		/* (out) live VMAs of /dev/dsvm, destroyed regions' included */
	__u64 faults;		/* (out) faults resolved in the kernel */
	__u64 mkwrites;		/* (out) writes enabled on a mapped Modified page */
	__u64 refused;		/* (out) faults answered with SIGBUS */
	__u64 reserved[2];	/* (out) 0 */
};

/*
 * mmap: a region is mapped whole, at its base address, MAP_SHARED, with
 * file offset = base (the page index inside the file is the page's
 * address >> 12, so regions, which never overlap, never share an offset):
 *
 *   mmap((void *)base, size, PROT_READ | PROT_WRITE,
 *        MAP_SHARED | MAP_FIXED_NOREPLACE, fd, base);
 *
 * Errors: -ENOENT when no region has that base; -EINVAL when the mapping is
 * private, not at base or not the region's size. The mapping cannot be
 * moved or grown with mremap (-EINVAL); it may be unmapped in parts.
 */

#define DSVM_IOC_MAGIC 0xD5

#define DSVM_IOC_HELLO		_IOWR(DSVM_IOC_MAGIC, 0x00, struct dsvm_hello)
#define DSVM_IOC_STATS		_IOR(DSVM_IOC_MAGIC, 0x01, struct dsvm_stats)
#define DSVM_IOC_REGION_CREATE	_IOW(DSVM_IOC_MAGIC, 0x10, struct dsvm_region_create)
#define DSVM_IOC_REGION_DESTROY	_IOW(DSVM_IOC_MAGIC, 0x11, struct dsvm_region_destroy)
#define DSVM_IOC_PAGE_INSTALL	_IOW(DSVM_IOC_MAGIC, 0x20, struct dsvm_page_install)
#define DSVM_IOC_PAGE_INVALIDATE _IOWR(DSVM_IOC_MAGIC, 0x21, struct dsvm_page_range)
#define DSVM_IOC_PAGE_DOWNGRADE	_IOWR(DSVM_IOC_MAGIC, 0x22, struct dsvm_page_range)

#endif /* _UAPI_DSVM_UAPI_H */
