/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dsvm.ko internals shared by dsvm_main.c (device, ioctls), dsvm_region.c
 * (the region table and each region's logical page table) and dsvm_vm.c
 * (mmap and the fault handlers).
 *
 * Lock order, outermost first:
 *
 *   mmap_lock (held by the core around mmap and faults)
 *     dsvm_regions_mutex	region table changes, file -> region lists
 *       region->lock		serialises a region's table writers
 *         page lock		a page's entry and state change under it
 *         i_mmap_rwsem, PTL	taken inside unmap_mapping_range()
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
 */
#ifndef DSVM_INTERNAL_H
#define DSVM_INTERNAL_H

#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/types.h>
#include <linux/xarray.h>

#include "uapi/dsvm_uapi.h"

/* Per open file of /dev/dsvm. */
struct dsvm_file {
	bool hello_done;		/* DSVM_IOC_HELLO succeeded */
	struct list_head regions;	/* created here; dsvm_regions_mutex */
};

/* A table entry's mark: the page is Modified (unmarked: Shared). */
#define DSVM_MARK_MODIFIED XA_MARK_0

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
	unsigned long base;		/* user address and file offset of page 0 */
	unsigned long size;		/* bytes */
	unsigned long npages;
	struct dsvm_file *owner;	/* dsvm_regions_mutex; NULL once destroyed */
	struct list_head owner_link;	/* dsvm_regions_mutex */
	struct mutex lock;		/* serialises writers of pages and dead */
	bool dead;			/* destroyed: no more installs; lock */
	struct xarray pages;		/* index -> struct page *; entries change
					 * under lock and the page's lock */
};

/* Node-wide counters behind DSVM_IOC_STATS. */
struct dsvm_counters {
	atomic64_t regions;
	atomic64_t pages;
	atomic64_t mappings;
	atomic64_t faults;
	atomic64_t mkwrites;
	atomic64_t refused;
};

extern struct dsvm_counters dsvm_counters;

/* The address_space every open file of /dev/dsvm shares (dsvm_main.c). */
extern struct address_space *dsvm_mapping;

/* dsvm_region.c */
int dsvm_region_create(struct dsvm_file *file,
		       const struct dsvm_region_create *arg);
int dsvm_region_destroy(u64 id);
void dsvm_file_destroy_regions(struct dsvm_file *file);
struct dsvm_region *dsvm_region_get(u64 id);
struct dsvm_region *dsvm_region_get_by_base(unsigned long base);
void dsvm_region_get_ref(struct dsvm_region *region);
void dsvm_region_put(struct dsvm_region *region);
bool dsvm_regions_empty(void);
int dsvm_page_install(struct dsvm_region *region, unsigned long index,
		      struct page *page, bool modified);
unsigned long dsvm_page_invalidate(struct dsvm_region *region,
				   unsigned long first, unsigned long last);
unsigned long dsvm_page_downgrade(struct dsvm_region *region,
				  unsigned long first, unsigned long last);

/* dsvm_vm.c */
int dsvm_vm_mmap(struct file *filp, struct vm_area_struct *vma);

#endif /* DSVM_INTERNAL_H */
