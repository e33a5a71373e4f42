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
 *  - Regions live in domains. A control file (a node daemon's: the file
 *    that did DSVM_IOC_HELLO with DSVM_HELLO_CONTROL) has a domain of its
 *    own; so several daemons may share a host, with the same region ids
 *    and addresses. Every other file works on one shared plain domain,
 *    whose regions raise no fault events. The table ioctls (region create
 *    and destroy, page install, invalidate, downgrade, upgrade, writeback,
 *    poison, wake) and mmap see only the caller's domain: another domain's
 *    region is -ENOENT. A client maps its daemon's regions through a file
 *    the daemon attached to its domain (DSVM_IOC_ATTACH); such a file only
 *    maps (table ioctls: -EPERM). Only a control file read()s fault events,
 *    its domain's.
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
#define DSVM_ABI_VERSION 2

/* Feature bits reported by DSVM_IOC_HELLO in dsvm_hello.features. */
/* Regions, the per-page table (install, invalidate, downgrade), mmap. */
#define DSVM_FEATURE_REGIONS (1ULL << 0)
/* DSVM_IOC_STATS. */
#define DSVM_FEATURE_STATS (1ULL << 1)
/*
 * DSVM_HELLO_CONTROL, fault events on read()/poll() of the control file,
 * DSVM_IOC_PAGE_UPGRADE, dsvm_stats.events and .events_pending.
 */
#define DSVM_FEATURE_EVENTS (1ULL << 2)
/* DSVM_IOC_PAGE_WRITEBACK and dirty tracking. */
#define DSVM_FEATURE_WRITEBACK (1ULL << 3)
/* DSVM_IOC_PAGE_POISON. */
#define DSVM_FEATURE_POISON (1ULL << 4)
/*
 * The HMM mirror: DSVM_IOC_MIRROR_* and DSVM_FAULT_MIRROR_INVALIDATE
 * events on read()/poll() of the registering file.
 */
#define DSVM_FEATURE_MIRROR (1ULL << 5)
/* DSVM_IOC_PAGE_WAKE. */
#define DSVM_FEATURE_WAKE (1ULL << 6)
/* Domains: several control files, DSVM_IOC_ATTACH (ABI 2). */
#define DSVM_FEATURE_DOMAINS (1ULL << 7)
/*
 * Reserved for what comes next (docs/KMOD.md): 64 KiB and 2 MiB pages. A caller tests for a bit rather than probing with an ioctl
 * that may fail.
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
 * dsvm_hello.flags: make this file a control file (a daemon's), with a
 * domain of its own. Regions it creates deliver fault events to it
 * (read(), poll()) instead of SIGBUS; closing it destroys them, so every
 * thread sleeping on one of their pages wakes with SIGBUS. Claim it before
 * creating regions.
 */
#define DSVM_HELLO_CONTROL (1ULL << 0)

/*
 * DSVM_IOC_HELLO: the version handshake; must be the first ioctl on a file.
 * Errors: -EPROTO when user_version is not one this module speaks
 * (module_version and features are written all the same, so the caller can
 * say what it found); -EINVAL for an unknown flag or a reserved field that
 * is not 0; for DSVM_HELLO_CONTROL, -EBUSY when this file created regions
 * or is attached, -ENOSPC when 62 control files are open on the node.
 * (ABI 1 allowed one control file per node.) A failed HELLO leaves
 * the file as it was. Repeating HELLO on a file is allowed; it can make the
 * file the control file, never undo that.
 * (ABI 1 before DSVM_FEATURE_EVENTS had reserved[0] where flags is: the
 * layout is the same, and 0 means what it meant.)
 */
struct dsvm_hello {
	__u32 user_version;	/* (in) DSVM_ABI_VERSION the caller was built with */
	__u32 module_version;	/* (out) DSVM_ABI_VERSION of the module */
	__u64 features;		/* (out) DSVM_FEATURE_* bits */
	__u64 flags;		/* (in) DSVM_HELLO_* */
	__u64 reserved;		/* (in) 0 */
};

/*
 * DSVM_IOC_REGION_CREATE: adds a region to the caller's domain. The region
 * belongs to the file that created it: closing that file destroys it (as
 * DSVM_IOC_REGION_DESTROY does), so a daemon that dies leaves nothing.
 * A region created by a control file raises fault events; one created by
 * another file gets SIGBUS for faults the table cannot resolve. -EPERM
 * from an attached file.
 * Errors: -EINVAL for a field out of range (region_id 0; base 0 or not
 * page_size aligned; size 0, not a multiple of page_size or above
 * DSVM_REGION_SIZE_MAX; base + size beyond the user address space;
 * page_size other than 4096; flags or reserved not 0); -EEXIST when
 * region_id is in use in the domain; -EADDRINUSE when [base, base + size)
 * overlaps another region of the domain; -ENOSPC when DSVM_REGIONS_MAX
 * regions exist on the node; -ENOMEM.
 */
struct dsvm_region_create {
	__u64 region_id;	/* (in) nonzero, unique in the domain (proto RegionId) */
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
 * write maps it writable when it is Modified; a write to a Shared page
 * raises an upgrade event (regions of the control file) or gets SIGBUS.
 * Installing answers the page's pending fault events: their threads retry.
 * Installing over a poisoned page (DSVM_IOC_PAGE_POISON) is allowed and
 * clears the poison.
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
 * copies: unmap them from every process and free them),
 * DSVM_IOC_PAGE_DOWNGRADE (Modified -> Shared: unmap so that the next
 * access faults again; a read then maps read-only, a write raises an
 * upgrade event or gets SIGBUS) and DSVM_IOC_PAGE_UPGRADE (Shared ->
 * Modified in place, no copy: the answer to an upgrade event; threads
 * waiting to write the page retry and go through).
 * Pages of the range that are not installed (invalidate), not Modified
 * (downgrade) or not Shared (upgrade) are left alone: all are idempotent.
 * Each page that changes has its pending fault events answered.
 * Invalidate also clears the poison of poisoned pages (DSVM_IOC_PAGE_POISON):
 * they are "not installed" again, and faults on them raise events again;
 * done does not count them (it counts installed pages dropped).
 *
 * DSVM_IOC_PAGE_POISON (DSVM_FEATURE_POISON): the node cannot serve these
 * pages (their only copy was lost, or the region was deleted cluster-wide);
 * the answer the userfaultfd backend gives with UFFDIO_POISON. Each page of
 * the range becomes poisoned: an installed copy is dropped as by invalidate
 * (unmapped from every process, freed), every fault on the page, read or
 * write, gets SIGBUS at once (counted in dsvm_stats.refused) and raises no
 * event, and threads sleeping on the page's pending events wake and get
 * SIGBUS. DSVM_IOC_PAGE_INSTALL of the page, or DSVM_IOC_PAGE_INVALIDATE,
 * clears the poison. done counts pages newly poisoned (installed or not);
 * pages already poisoned are left alone. Each poisoned page costs the
 * module a few bytes (charged to the caller's memory cgroup).
 *
 * Errors: -EINVAL (region_id 0; count 0; first + count overflowing or
 * beyond the region; reserved not 0); -ENOENT (no such region). Poison
 * also: -ENOMEM, -EINTR (a fatal signal); the pages poisoned before it
 * stay poisoned, and a repeat poisons the rest.
 */
struct dsvm_page_range {
	__u64 region_id;	/* (in) */
	__u64 first;		/* (in) first page index */
	__u64 count;		/* (in) number of pages, at least 1 */
	__u64 done;		/* (out) pages invalidated, downgraded, upgraded
				 * or newly poisoned */
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
	__u64 events;		/* (out) fault events raised (DSVM_FEATURE_EVENTS) */
	__u64 events_pending;	/* (out) events raised and not yet answered */
};

/* dsvm_fault_event.kind: what the faulting thread needs. */
enum dsvm_fault_kind {
	DSVM_FAULT_INVALID = 0,	/* reserved: never in an event */
	DSVM_FAULT_READ = 1,	/* a read of a page not installed */
	DSVM_FAULT_WRITE = 2,	/* a write to a page not installed */
	DSVM_FAULT_UPGRADE = 3,	/* a write to a Shared page */
	/*
	 * Not a fault: entries of a mirror's device page table were dropped
	 * (DSVM_FEATURE_MIRROR; see DSVM_IOC_MIRROR_REGISTER). Only the file
	 * that registered the mirror reads it.
	 */
	DSVM_FAULT_MIRROR_INVALIDATE = 4,
};

/*
 * A fault event, as read() from the control file returns them. A thread
 * faulting on a page of a region of the control file that the table cannot
 * resolve raises one and sleeps (killably) until it is answered: by any
 * change of the page (DSVM_IOC_PAGE_INSTALL, _UPGRADE, _INVALIDATE,
 * _DOWNGRADE, _WRITEBACK with a flag), after which it retries and raises a
 * new event if it still needs one, or by _POISON or the region's
 * destruction (it retries and gets SIGBUS).
 * Faults on a page that has an event of the same kind pending (read or
 * not) wait on it instead of raising another: at most one event per page
 * and kind is pending, which bounds the queue by the regions' size.
 *
 * read(fd, buf, n * sizeof(struct dsvm_fault_event)) returns up to n
 * events, oldest first, and blocks while none is queued (-EAGAIN with
 * O_NONBLOCK); poll() reports POLLIN while one is. An event that was read
 * stays pending (faults keep waiting on it) until answered. A sleeper that
 * is killed leaves its event to the daemon.
 * Errors of read(): -EPERM (not the control file); -EINVAL (a buffer
 * smaller than one event); -EAGAIN; -EINTR; -EFAULT (nothing was taken
 * off the queue).
 */
struct dsvm_fault_event {
	__u64 region_id;	/* (out) the mirror id for _MIRROR_INVALIDATE */
	__u64 page_index;	/* (out) the first page dropped for _MIRROR_INVALIDATE */
	__u64 seq;		/* (out) 1, 2, ...: the order events were raised on the
				 * node (mirror events count on their own) */
	__u32 kind;		/* (out) enum dsvm_fault_kind */
	union {
		__u32 reserved;	/* (out) 0 in fault events (kinds 1 to 3) */
		__u32 count;	/* (out) _MIRROR_INVALIDATE: pages from page_index */
	};
};

/* dsvm_page_writeback.flags: what happens to the page with the copy. */
#define DSVM_PAGE_WRITEBACK_DOWNGRADE (1u << 0)	/* it becomes Shared */
#define DSVM_PAGE_WRITEBACK_INVALIDATE (1u << 1)	/* it is dropped */

/*
 * DSVM_IOC_PAGE_WRITEBACK: copies an installed page's bytes to data (for a
 * Fetch or an eviction) and reports whether it was written since it was
 * installed or last written back (dirty, then cleared: the module unmaps
 * the page so that the next write marks it again). With a flag the page
 * is downgraded or dropped in the same step: the state changes and the
 * page is unmapped before the copy is taken, so no write can land after
 * the copy and be lost (a separate DOWNGRADE after a writeback would leave
 * that window open). Without a flag, writers may go on while the copy is
 * taken; whatever they write after the unmap marks the page dirty again.
 * Errors: -EINVAL (region_id 0; page_index beyond the region; data 0;
 * unknown flag or both; reserved not 0); -ENOENT (no such region);
 * -ENODATA (the page is not installed); -EFAULT (data not writable: the
 * page is left installed, and dirty if it was).
 */
struct dsvm_page_writeback {
	__u64 region_id;	/* (in) */
	__u64 page_index;	/* (in) */
	__u64 data;		/* (in) user address of page_size writable bytes */
	__u32 flags;		/* (in) DSVM_PAGE_WRITEBACK_*, at most one */
	__u32 state;		/* (out) enum dsvm_page_state before the call */
	__u32 dirty;		/* (out) 1 when written since install or last writeback */
	__u32 reserved32;	/* (in) 0 */
	__u64 reserved[2];	/* (in) 0 */
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

/*
 * The HMM mirror (DSVM_FEATURE_MIRROR): the module plays a device that
 * mirrors ordinary memory of a process, as a GPU driver does (and as the
 * kernel's lib/test_hmm.c plays one). A mirror is a range of the
 * registering process's address space with a device page table kept by
 * the module: DSVM_IOC_MIRROR_SNAPSHOT fills it from the CPU page table
 * (hmm_range_fault()), DSVM_IOC_MIRROR_READ reads a page through it (the
 * "device access"), and every CPU-side change of the range (munmap,
 * MADV_DONTNEED, fork's write protection and copy-on-write, migration,
 * reclaim, the process's exit) drops the affected entries before the CPU
 * page table changes, and queues a DSVM_FAULT_MIRROR_INVALIDATE event.
 * The entries hold no page references: an entry exists only while the CPU
 * maps that page there.
 *
 * Mirror ioctls may come from any file that did DSVM_IOC_HELLO (they are
 * not control ioctls). A mirror belongs to the file that registered it:
 * mirror ids are that file's (another file gets -ENOENT), its events are
 * read() from that file, and it goes when the file is closed. The
 * registering process may exit first: its entries are dropped then (one
 * last event), and SNAPSHOT and MIGRATE fail with -ESRCH.
 *
 * Events: read() of the registering file returns them as struct
 * dsvm_fault_event records with kind DSVM_FAULT_MIRROR_INVALIDATE,
 * region_id the mirror id, page_index and count the pages dropped, seq a
 * node-wide sequence of mirror events; poll() reports POLLIN while one is
 * queued. A mirror has at most one event queued: drops before it is read
 * widen its range (which may then cover pages that had no entry), so none
 * is lost and the queue of a file is bounded by its mirrors. A change of
 * pages that had no entry raises no event: there was nothing to drop.
 * The control file reads its fault events first, then its mirror events.
 * A file that is not the control file and never registered a mirror still
 * gets -EPERM from read() (POLLERR from poll()).
 */

/* Largest mirror: 1 GiB (2^18 pages). */
#define DSVM_MIRROR_SIZE_MAX (1ULL << 30)

/* Most mirrors a file may have at once. */
#define DSVM_MIRRORS_MAX 64

/*
 * DSVM_IOC_MIRROR_REGISTER: mirrors [start, start + length) of the calling
 * process's address space. The range must be covered by VMAs of ordinary
 * memory (anonymous, or a private or shared file mapping) at the time of
 * the call; it may later be unmapped in parts (the entries go, events
 * tell). Nothing is snapshotted yet.
 * Errors: -EINVAL (start or length not page aligned; length 0 or above
 * DSVM_MIRROR_SIZE_MAX; the end beyond the user address space; a VMA of
 * the range is VM_IO or VM_PFNMAP, or a /dev/dsvm mapping, whose pages the
 * module already tracks; flags or reserved not 0); -EFAULT (part of the
 * range is not mapped); -ENOSPC (DSVM_MIRRORS_MAX mirrors on this file);
 * -ENOMEM.
 */
struct dsvm_mirror_register {
	__u64 start;		/* (in) user address, page aligned */
	__u64 length;		/* (in) bytes, page aligned */
	__u64 mirror_id;	/* (out) 1 .. DSVM_MIRRORS_MAX, this file's */
	__u32 flags;		/* (in) 0 */
	__u32 reserved32;	/* (in) 0 */
	__u64 reserved[2];	/* (in) 0 */
};

/* dsvm_mirror_snapshot.flags */
/* Fault pages in (as the CPU would on a read), rather than only what is mapped. */
#define DSVM_MIRROR_SNAPSHOT_FAULT (1u << 0)
/* Ask for write access (breaks copy-on-write); needs _FAULT. */
#define DSVM_MIRROR_SNAPSHOT_WRITE (1u << 1)

/*
 * DSVM_IOC_MIRROR_SNAPSHOT: fills the device page table for pages
 * [first, first + count) of a mirror from the CPU page table (what a GPU
 * driver does before the device touches the range). Without _FAULT only
 * pages mapped now are entered, the others' entries are cleared; with it,
 * missing pages are faulted in (an untouched anonymous page maps the zero
 * page, read-only), and with _WRITE too, made writable. The snapshot is
 * taken against concurrent invalidations (the notifier's sequence): what
 * is stored was the CPU's mapping when stored.
 * Errors: -EINVAL (mirror_id 0; count 0; the range beyond the mirror;
 * unknown flag, _WRITE without _FAULT; reserved not 0); -ENOENT (no such mirror on this
 * file); -EFAULT (part of the range is not mapped, or with _FAULT cannot
 * be faulted as asked, e.g. _WRITE to read-only memory; entries stored
 * for earlier batches stay); -ESRCH (the process has exited); -EBUSY (no
 * stable view within a second of retries); -EINTR (fatal signal);
 * -ENOMEM.
 */
struct dsvm_mirror_snapshot {
	__u64 mirror_id;	/* (in) */
	__u64 first;		/* (in) first page, counted from the mirror's start */
	__u64 count;		/* (in) pages, at least 1 */
	__u32 flags;		/* (in) DSVM_MIRROR_SNAPSHOT_* */
	__u32 reserved32;	/* (in) 0 */
	__u64 present;		/* (out) pages of the range with an entry now */
	__u64 writable;		/* (out) of those, writable ones */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_MIRROR_READ: copies one page to data through the device page
 * table: the module reads the page its entry names, under the lock the
 * notifier takes to drop entries, so it never returns bytes of a page the
 * CPU no longer maps there (what a GPU's access through its page table
 * must guarantee).
 * Errors: -EINVAL (mirror_id 0; page_index beyond the mirror; data 0;
 * flags or reserved not 0); -ENOENT (no such mirror on this file); -EAGAIN (no
 * entry: never snapshotted, not mapped at the snapshot, or dropped since
 * by an invalidation; snapshot again); -EFAULT (data not writable).
 */
struct dsvm_mirror_read {
	__u64 mirror_id;	/* (in) */
	__u64 page_index;	/* (in) page, counted from the mirror's start */
	__u64 data;		/* (in) user address of 4096 writable bytes */
	__u32 flags;		/* (in) 0 */
	__u32 reserved32;	/* (in) 0 */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_MIRROR_MIGRATE: moves pages [first, first + count) of a mirror
 * to freshly allocated system pages, copying their bytes (migrate_vma_*:
 * the process keeps the same bytes at the same addresses, in other
 * physical pages). Migration first unmaps the pages from the CPU, so the
 * mirror's entries for them are dropped (an event; READ gives -EAGAIN
 * until the next snapshot). Pages that are not mapped, the zero page, and
 * pages that cannot move now (pinned, locked, huge, or of a VMA that
 * cannot migrate) are skipped; migrated says how many moved.
 * Errors: -EINVAL (mirror_id 0; count 0; the range beyond the mirror;
 * flags or reserved not 0); -ENOENT (no such mirror on this file); -ESRCH (the
 * process has exited); -EINTR (fatal signal); -ENOMEM.
 */
struct dsvm_mirror_migrate {
	__u64 mirror_id;	/* (in) */
	__u64 first;		/* (in) first page, counted from the mirror's start */
	__u64 count;		/* (in) pages, at least 1 */
	__u64 migrated;		/* (out) pages moved */
	__u32 flags;		/* (in) 0 */
	__u32 reserved32;	/* (in) 0 */
	__u64 reserved[2];	/* (in) 0 */
};

/*
 * DSVM_IOC_MIRROR_UNREGISTER: ends a mirror: its notifier is removed, its
 * device page table and its queued event (if unread) are dropped.
 * Closing the file does the same for all its mirrors.
 * Errors: -EINVAL (mirror_id 0, reserved not 0); -ENOENT (no such mirror
 * on this file).
 */
struct dsvm_mirror_unregister {
	__u64 mirror_id;	/* (in) */
	__u64 reserved;		/* (in) 0 */
};

/*
 * DSVM_IOC_MIRROR_STATS: the mirror's counters, node-wide. mirrors and
 * entries are current values (0 when nothing is mirrored: the selftest's
 * leak check); the others only grow.
 */
struct dsvm_mirror_stats {
	__u64 mirrors;		/* (out) registered mirrors */
	__u64 entries;		/* (out) device page table entries present */
	__u64 invalidations;	/* (out) notifier callbacks on a mirror */
	__u64 dropped;		/* (out) entries dropped by them */
	__u64 events;		/* (out) mirror events queued (not counting
				 * drops folded into a queued one) */
	__u64 migrated;		/* (out) pages moved by MIRROR_MIGRATE */
	__u64 reserved[2];	/* (out) 0 */
};

/*
 * DSVM_IOC_ATTACH, on a control file: the /dev/dsvm file behind fd (opened
 * by the daemon, then handed to its clients) becomes a client file of the
 * caller's domain: mmap on it finds the domain's regions and no others,
 * and it can change no table. It holds the domain until it is closed; once
 * the control file is closed, its mmaps find nothing. Repeating it on a
 * file already attached to the same domain succeeds.
 * Errors: -EPERM (the caller is not a control file); -EINVAL (flags or
 * reserved not 0, fd is not /dev/dsvm or is the caller itself); -EBADF;
 * -EBUSY (the file is a control file, has regions of its own, or is
 * attached to another domain).
 */
struct dsvm_attach {
	__s32 fd;		/* (in) a file of /dev/dsvm */
	__u32 flags;		/* (in) 0 */
	__u64 reserved;		/* (in) 0 */
};

#define DSVM_IOC_MAGIC 0xD5

#define DSVM_IOC_HELLO		_IOWR(DSVM_IOC_MAGIC, 0x00, struct dsvm_hello)
#define DSVM_IOC_STATS		_IOR(DSVM_IOC_MAGIC, 0x01, struct dsvm_stats)
#define DSVM_IOC_ATTACH		_IOW(DSVM_IOC_MAGIC, 0x02, struct dsvm_attach)
#define DSVM_IOC_REGION_CREATE	_IOW(DSVM_IOC_MAGIC, 0x10, struct dsvm_region_create)
#define DSVM_IOC_REGION_DESTROY	_IOW(DSVM_IOC_MAGIC, 0x11, struct dsvm_region_destroy)
#define DSVM_IOC_PAGE_INSTALL	_IOW(DSVM_IOC_MAGIC, 0x20, struct dsvm_page_install)
#define DSVM_IOC_PAGE_INVALIDATE _IOWR(DSVM_IOC_MAGIC, 0x21, struct dsvm_page_range)
#define DSVM_IOC_PAGE_DOWNGRADE	_IOWR(DSVM_IOC_MAGIC, 0x22, struct dsvm_page_range)
#define DSVM_IOC_PAGE_UPGRADE	_IOWR(DSVM_IOC_MAGIC, 0x23, struct dsvm_page_range)
#define DSVM_IOC_PAGE_WRITEBACK	_IOWR(DSVM_IOC_MAGIC, 0x24, struct dsvm_page_writeback)
#define DSVM_IOC_PAGE_POISON	_IOWR(DSVM_IOC_MAGIC, 0x25, struct dsvm_page_range)
/*
 * DSVM_IOC_PAGE_WAKE (DSVM_FEATURE_WAKE), struct dsvm_page_range: answers
 * the pending fault events of the range's pages without changing them;
 * their threads look at the table again, and raise a new event if they
 * still need one. For a daemon that forgot what it was asked (it restarted
 * its protocol state): the faults come back to it. `done` counts the events
 * answered. A control ioctl; the argument checks of the range ioctls.
 */
#define DSVM_IOC_PAGE_WAKE	_IOWR(DSVM_IOC_MAGIC, 0x26, struct dsvm_page_range)
#define DSVM_IOC_MIRROR_REGISTER _IOWR(DSVM_IOC_MAGIC, 0x30, struct dsvm_mirror_register)
#define DSVM_IOC_MIRROR_UNREGISTER _IOW(DSVM_IOC_MAGIC, 0x31, struct dsvm_mirror_unregister)
#define DSVM_IOC_MIRROR_SNAPSHOT _IOWR(DSVM_IOC_MAGIC, 0x32, struct dsvm_mirror_snapshot)
#define DSVM_IOC_MIRROR_READ	_IOW(DSVM_IOC_MAGIC, 0x33, struct dsvm_mirror_read)
#define DSVM_IOC_MIRROR_MIGRATE	_IOWR(DSVM_IOC_MAGIC, 0x34, struct dsvm_mirror_migrate)
#define DSVM_IOC_MIRROR_STATS	_IOR(DSVM_IOC_MAGIC, 0x35, struct dsvm_mirror_stats)

#endif /* _UAPI_DSVM_UAPI_H */
