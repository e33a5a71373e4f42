/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dsvm.ko internals shared by dsvm_main.c (device, ioctls), dsvm_region.c
 * (the region table and each region's logical page table), dsvm_vm.c
 * (mmap and the fault handlers), dsvm_event.c (fault events, the
 * control file's read and poll) and dsvm_mirror.c (the HMM mirror).
 *
 * Lock order, outermost first:
 *
 *   file->read_mutex		one reader of a file's events at a time
 *   mmap_lock (held by the core around mmap and faults)
 *     dsvm_regions_mutex	region table changes, file -> region lists,
 *				a file's domain, domain tags
 *       region->lock		serialises a region's table writers
 *         page lock		a page's entry and state change under it
 *           dsvm_events_lock	pending events, the queue (a spinlock)
 *         i_mmap_rwsem, PTL	taken inside unmap_mapping_range()
 *
 * The mirror (dsvm_mirror.c) has a chain of its own, which meets the one
 * above only at mmap_lock and dsvm_events_lock:
 *
 *   file->mirrors_lock		a file's mirror ioctls, one at a time
 *     mmap_lock		snapshot (hmm_range_fault), migrate, register
 *       [reclaim, i_mmap_rwsem, anon_vma lock, page lock: the core holds
 *        any of them when it calls the notifier]
 *         mirror->lock		a mirror's device page table; the notifier's
 *				lock (mmu_interval_set_seq / _read_retry)
 *           dsvm_events_lock	a mirror's queued event
 *
 * Because the notifier takes mirror->lock from reclaim and from under the
 * page lock and the rmap locks, nothing under mirror->lock allocates
 * memory, locks a page, takes mmap_lock or touches user memory: snapshot
 * calls hmm_range_fault() before it takes the lock, READ copies the page
 * to a kernel buffer under it and to the user after, migrate takes it
 * never (its own notifier call does).
 *
 * read() holds file->read_mutex across copy_to_user(), whose fault may
 * take mmap_lock; no fault path takes that mutex.
 *
 * A writer never holds region->lock across copy_from_user(): the source
 * may be a dsvm mapping whose fault would take the same locks.
 *
 * The rule that keeps mappings coherent with the table: every change of a
 * page's entry (installed or not) or state (Shared or Modified) is made with
 * the page locked; the fault paths check entry and state with the page
 * locked and keep it locked until the PTE is set; the writer unmaps the
 * range after its change. A fault that checked before the change has set
 * its PTE by the time the writer got the page lock, so the unmap removes
 * it; a fault that checks after the change sees it.
 *
 * The rule that keeps fault events from being lost: a fault raises an event
 * only after checking, under dsvm_events_lock, that the page's entry and
 * state still call for it and the region is alive; every writer answers
 * the events of a page under dsvm_events_lock after changing it (and
 * after the unmap, if it unmaps), and destroy marks the region dead before
 * it answers all. So an event is either raised before the change and
 * answered by it, or never raised because the fault sees the change.
 *
 * Poison (DSVM_IOC_PAGE_POISON) is part of a page's state like its entry:
 * a page is never both installed and poisoned. region->poisoned changes
 * under region->lock, and for an installed page together with the drop of
 * its entry, under the page lock; the writer then unmaps and answers the
 * page's events, like any other. Faults look at it only where they decide
 * to raise an event (dsvm_event_raise(), under dsvm_events_lock), and
 * refuse with SIGBUS instead: a sleeper woken by the poison retries, sees
 * it there and gets SIGBUS, so the retry ends.
 */
#ifndef DSVM_INTERNAL_H
#define DSVM_INTERNAL_H

#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mmu_notifier.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/refcount.h>
#include <linux/types.h>
#include <linux/wait.h>
#include <linux/xarray.h>

#include "uapi/dsvm_uapi.h"

/*
 * A domain: one namespace of regions and the queue of their fault events.
 * Each control file (a node daemon's) has its own, so several daemons can
 * share a host (a test cluster, containers) with the same region ids and
 * addresses; the files that never claimed control share dsvm_domain_plain,
 * whose regions raise no events (a miss gets SIGBUS). A client maps a
 * domain's regions through a file its daemon attached to the domain
 * (DSVM_IOC_ATTACH); no other file reaches them.
 *
 * References: the control file holds one, each attached file one, each
 * region one; the plain domain is static. The tag is the domain's part of
 * its regions' file offsets (dsvm_region->offset), so that one daemon's
 * unmaps never reach another's mappings at the same address; it is freed
 * with the domain.
 */
struct dsvm_domain {
	struct kref kref;
	unsigned int tag;		/* 0: plain; 1 .. DSVM_DOMAINS_MAX */
	struct xarray regions;		/* id -> struct dsvm_region *;
					 * changes under dsvm_regions_mutex */
	struct list_head events;	/* pending fault events not yet read,
					 * oldest (lowest seq) first; events lock */
	unsigned long pending;		/* fault events of its regions pending
					 * (read or not); events lock */
};

/* Control domains that may exist at once (tags 1 .. this). */
#define DSVM_DOMAINS_MAX 62
/*
 * A region's file offset is tag << DSVM_DOMAIN_SHIFT | base: user addresses
 * stay below 2^57 (five-level paging included), and tag 62 still leaves
 * the offset positive as a loff_t.
 */
#define DSVM_DOMAIN_SHIFT 57

extern struct dsvm_domain dsvm_domain_plain;

/* Per open file of /dev/dsvm. */
struct dsvm_file {
	bool hello_done;		/* DSVM_IOC_HELLO succeeded */
	/*
	 * Whose regions the file creates, changes and maps: &dsvm_domain_plain
	 * at open; its own domain once it claims control; its daemon's once
	 * attached. Set under dsvm_regions_mutex, at most once after open;
	 * readers elsewhere use READ_ONCE.
	 */
	struct dsvm_domain *domain;
	bool control;			/* claimed control: domain is its own */
	bool attached;			/* a client file: maps only */
	struct mutex read_mutex;	/* one read() at a time; see read() */
	struct list_head regions;	/* created here; dsvm_regions_mutex */
	struct mutex mirrors_lock;	/* this file's mirror ioctls, one at a time */
	struct xarray mirrors;		/* id -> struct dsvm_mirror *; mirrors_lock */
	struct list_head mirror_events;	/* mirrors with an event queued, oldest
					 * first; dsvm_events_lock */
	bool mirror_reader;		/* registered a mirror once: read() and
					 * poll() allowed; set once */
};

/*
 * An HMM mirror: a range of one process's address space whose CPU page
 * table entries the module copies into a device page table of its own
 * (pfns), as a GPU driver does. An entry names the page the CPU mapped at
 * that address when it was stored and holds no reference on it: the
 * notifier drops the entry under lock before the CPU page table changes,
 * so while lock is held an entry's page is still mapped there (and so
 * cannot be freed). The mirror belongs to its owner file, which frees it
 * on DSVM_IOC_MIRROR_UNREGISTER or close; nothing else holds it.
 */
struct dsvm_mirror {
	struct mmu_interval_notifier notifier;	/* on mm, [start, end) */
	struct dsvm_file *owner;	/* fixed; outlives the mirror */
	struct mm_struct *mm;		/* mmgrab()bed; users may reach 0 first */
	u64 id;
	unsigned long start, end;	/* user addresses */
	unsigned long npages;
	struct mutex lock;		/* pfns, nentries, and the notifier's seq */
	unsigned long *pfns;		/* npages entries: HMM_PFN_VALID
					 * [| HMM_PFN_WRITE] | pfn, or 0; lock */
	unsigned long nentries;		/* nonzero pfns; lock */
	/* The queued event, if any; dsvm_events_lock. */
	struct list_head event_link;	/* owner->mirror_events; empty if none */
	unsigned long event_first, event_last;	/* pages dropped, widened */
	u64 event_seq;			/* changes with every widening */
};

/* A table entry's mark: the page is Modified (unmarked: Shared). */
#define DSVM_MARK_MODIFIED XA_MARK_0
/*
 * A table entry's mark: the page was made writable since it was installed
 * or last written back (set by .page_mkwrite). Unmarked implies that no
 * PTE maps it writable: writeback unmaps after clearing it.
 */
#define DSVM_MARK_DIRTY XA_MARK_1

/*
 * A region: a range of user addresses with one logical page table.
 * References: the region table holds one until the region is destroyed;
 * each VMA mapping it holds one; an ioctl holds one while it works. The
 * pages are freed when the region is destroyed, the struct when the last
 * reference goes.
 */
struct dsvm_region {
	struct kref kref;
	u64 id;
	struct dsvm_domain *domain;	/* fixed; holds a reference */
	unsigned long base;		/* user address of page 0 */
	loff_t offset;			/* file offset of page 0 (DSVM_DOMAIN_SHIFT) */
	unsigned long size;		/* bytes */
	unsigned long npages;
	struct dsvm_file *owner;	/* dsvm_regions_mutex; NULL once destroyed */
	struct list_head owner_link;	/* dsvm_regions_mutex */
	struct mutex lock;		/* serialises writers of pages and dead */
	bool dead;			/* destroyed: no more installs or events;
					 * written under lock, read anywhere */
	bool control;			/* in a control domain: faults raise
					 * events instead of SIGBUS */
	struct list_head events;	/* pending struct dsvm_event; events lock */
	struct xarray pages;		/* index -> struct page *; entries change
					 * under lock and the page's lock */
	struct xarray poisoned;		/* index -> DSVM_POISONED for pages not
					 * installed that faults refuse; changes
					 * under lock (and the page's lock when
					 * an installed page is dropped) */
};

/* The value of a region->poisoned entry. */
#define DSVM_POISONED xa_mk_value(1)

/* Node-wide counters behind DSVM_IOC_STATS. */
struct dsvm_counters {
	atomic64_t regions;
	atomic64_t pages;
	atomic64_t mappings;
	atomic64_t faults;
	atomic64_t mkwrites;
	atomic64_t refused;
	atomic64_t events;
	atomic64_t events_pending;
	atomic64_t mirrors;
	atomic64_t mirror_entries;
	atomic64_t mirror_invalidations;
	atomic64_t mirror_dropped;
	atomic64_t mirror_events;
	atomic64_t mirror_migrated;
};

/*
 * A pending fault event: one per (region, page, kind) from the fault that
 * raises it until it is answered. References: the pending table holds one
 * until the answer; each thread waiting on it holds one.
 */
struct dsvm_event {
	struct hlist_node hnode;	/* the pending table; events lock */
	struct list_head region_link;	/* region->events; events lock */
	struct list_head queue_link;	/* the read queue, until read; events lock */
	struct dsvm_region *region;	/* no reference: answered before it goes */
	refcount_t ref;
	bool answered;			/* set once, then the waiters are woken */
	wait_queue_head_t waiters;
	struct dsvm_fault_event msg;	/* what read() returns */
};

extern struct dsvm_counters dsvm_counters;

/* The address_space every open file of /dev/dsvm shares (dsvm_main.c). */
extern struct address_space *dsvm_mapping;

/* dsvm_region.c */
int dsvm_control_claim(struct dsvm_file *file);
int dsvm_domain_attach(struct dsvm_file *control, struct dsvm_file *client);
void dsvm_file_put_domain(struct dsvm_file *file);
int dsvm_region_create(struct dsvm_file *file,
		       const struct dsvm_region_create *arg);
int dsvm_region_destroy(struct dsvm_file *file, u64 id);
void dsvm_file_destroy_regions(struct dsvm_file *file);
struct dsvm_region *dsvm_region_get(struct dsvm_file *file, u64 id);
struct dsvm_region *dsvm_region_get_by_base(struct dsvm_file *file,
					    unsigned long base);
void dsvm_region_get_ref(struct dsvm_region *region);
void dsvm_region_put(struct dsvm_region *region);
bool dsvm_regions_empty(void);
int dsvm_page_install(struct dsvm_region *region, unsigned long index,
		      struct page *page, bool modified);
unsigned long dsvm_page_invalidate(struct dsvm_region *region,
				   unsigned long first, unsigned long last);
unsigned long dsvm_page_downgrade(struct dsvm_region *region,
				  unsigned long first, unsigned long last);
unsigned long dsvm_page_upgrade(struct dsvm_region *region,
				unsigned long first, unsigned long last);
int dsvm_page_writeback(struct dsvm_region *region, unsigned long index,
			void __user *data, u32 flags, u32 *state, bool *dirty);
int dsvm_page_poison(struct dsvm_region *region, unsigned long first,
		     unsigned long last, unsigned long *done);

/* dsvm_vm.c */
int dsvm_vm_mmap(struct file *filp, struct vm_area_struct *vma);
bool dsvm_vm_is_region(const struct vm_area_struct *vma);

/* dsvm_mirror.c */
void dsvm_file_init_mirrors(struct dsvm_file *file);
void dsvm_file_destroy_mirrors(struct dsvm_file *file);
int dsvm_mirror_register(struct dsvm_file *file, unsigned long start,
			 unsigned long length, u64 *id);
int dsvm_mirror_unregister(struct dsvm_file *file, u64 id);
int dsvm_mirror_snapshot(struct dsvm_file *file, u64 id, u64 first, u64 count,
			 u32 flags, u64 *present, u64 *writable);
int dsvm_mirror_read(struct dsvm_file *file, u64 id, u64 index,
		     void __user *data);
int dsvm_mirror_migrate(struct dsvm_file *file, u64 id, u64 first, u64 count,
			u64 *migrated);

/* dsvm_event.c */
struct dsvm_event *dsvm_event_raise(struct dsvm_region *region,
				    unsigned long index, bool write);
int dsvm_event_wait(struct dsvm_event *event);
int dsvm_event_wait_room(struct dsvm_domain *domain);
/* A reference to a domain (none needed for the plain one), and its end. */
void dsvm_domain_get(struct dsvm_domain *domain);
void dsvm_domain_put(struct dsvm_domain *domain);
void dsvm_event_put(struct dsvm_event *event);
void dsvm_event_answer_page(struct dsvm_region *region, unsigned long index);
unsigned long dsvm_event_wake_range(struct dsvm_region *region,
				    unsigned long first, unsigned long last);
void dsvm_event_answer_region(struct dsvm_region *region);
void dsvm_event_mirror_queue(struct dsvm_mirror *mirror, unsigned long first,
			     unsigned long last);
void dsvm_event_mirror_cancel(struct dsvm_mirror *mirror);
ssize_t dsvm_event_read(struct file *filp, char __user *buf, size_t count,
			loff_t *ppos);
__poll_t dsvm_event_poll(struct file *filp, struct poll_table_struct *wait);

#endif /* DSVM_INTERNAL_H */
