// SPDX-License-Identifier: GPL-2.0
/*
 * The node's region table and each region's logical page table (as in
 * openEuler's GMEM): which pages of the region this node holds, in which
 * state (proto/PROTOCOL.md: Shared or Modified), and the struct page with
 * the bytes. Faults are resolved from this table in dsvm_vm.c; the daemon
 * changes it through the ioctls of dsvm_main.c.
 *
 * Locking: see the top of dsvm_internal.h.
 */
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/sched.h>
#include <linux/slab.h>

#include "dsvm_internal.h"

/* Region id -> struct dsvm_region *; changes under dsvm_regions_mutex. */
static DEFINE_XARRAY(dsvm_regions);
static DEFINE_MUTEX(dsvm_regions_mutex);

/* How many pages a sweep changes between two unmaps. */
#define DSVM_SWEEP_BATCH 64

static void dsvm_region_release(struct kref *kref)
{
	struct dsvm_region *region = container_of(kref, struct dsvm_region, kref);

	/* Destroying the region emptied its table before the last put. */
	WARN_ON_ONCE(!xa_empty(&region->pages));
	xa_destroy(&region->pages);
	mutex_destroy(&region->lock);
	kfree(region);
}

void dsvm_region_get_ref(struct dsvm_region *region)
{
	kref_get(&region->kref);
}

void dsvm_region_put(struct dsvm_region *region)
{
	kref_put(&region->kref, dsvm_region_release);
}

/* Returns the region with this id, with a reference, or NULL. */
struct dsvm_region *dsvm_region_get(u64 id)
{
	struct dsvm_region *region;

	/* The table's own reference keeps the region alive under xa_lock. */
	xa_lock(&dsvm_regions);
	region = xa_load(&dsvm_regions, id);
	if (region)
		kref_get(&region->kref);
	xa_unlock(&dsvm_regions);
	return region;
}

/* Returns the region that starts at base, with a reference, or NULL. */
struct dsvm_region *dsvm_region_get_by_base(unsigned long base)
{
	struct dsvm_region *region, *found = NULL;
	unsigned long id;

	/* A linear scan: mmap is rare and regions are few. */
	xa_lock(&dsvm_regions);
	xa_for_each(&dsvm_regions, id, region) {
		if (region->base == base) {
			kref_get(&region->kref);
			found = region;
			break;
		}
	}
	xa_unlock(&dsvm_regions);
	return found;
}

bool dsvm_regions_empty(void)
{
	return xa_empty(&dsvm_regions);
}

/*
 * Adds a region owned by file; arg was validated by the caller.
 * Errors: -EEXIST (id in use), -EADDRINUSE (overlaps another region),
 * -ENOSPC (DSVM_REGIONS_MAX reached), -ENOMEM.
 */
int dsvm_region_create(struct dsvm_file *file,
		       const struct dsvm_region_create *arg)
{
	struct dsvm_region *region, *other;
	unsigned long id;
	int ret;

	region = kzalloc(sizeof(*region), GFP_KERNEL);
	if (!region)
		return -ENOMEM;
	kref_init(&region->kref);
	region->id = arg->region_id;
	region->base = arg->base;
	region->size = arg->size;
	region->npages = arg->size >> PAGE_SHIFT;
	INIT_LIST_HEAD(&region->owner_link);
	mutex_init(&region->lock);
	xa_init(&region->pages);

	mutex_lock(&dsvm_regions_mutex);
	if (xa_load(&dsvm_regions, region->id)) {
		ret = -EEXIST;
		goto err_unlock;
	}
	xa_for_each(&dsvm_regions, id, other) {
		if (region->base < other->base + other->size &&
		    other->base < region->base + region->size) {
			ret = -EADDRINUSE;
			goto err_unlock;
		}
	}
	/* Changed only under dsvm_regions_mutex, so exact here. */
	if (atomic64_read(&dsvm_counters.regions) >= DSVM_REGIONS_MAX) {
		ret = -ENOSPC;
		goto err_unlock;
	}
	ret = xa_insert(&dsvm_regions, region->id, region, GFP_KERNEL);
	if (ret)
		goto err_unlock;
	region->owner = file;
	list_add_tail(&region->owner_link, &file->regions);
	atomic64_inc(&dsvm_counters.regions);
	mutex_unlock(&dsvm_regions_mutex);
	return 0;

err_unlock:
	mutex_unlock(&dsvm_regions_mutex);
	dsvm_region_put(region);
	return ret;
}

/* Takes a region out of the table and its owner's list. */
static void dsvm_region_unlink(struct dsvm_region *region)
{
	lockdep_assert_held(&dsvm_regions_mutex);
	xa_erase(&dsvm_regions, region->id);
	list_del_init(&region->owner_link);
	region->owner = NULL;
	atomic64_dec(&dsvm_counters.regions);
}

/*
 * Removes (drop) or write-protects (!drop) the installed pages of
 * [first, last], then unmaps them from every process that maps them, and
 * returns how many pages it changed. Write-protecting clears the Modified
 * mark; the unmap makes the next access fault, and a write is then
 * refused. Must hold region->lock, so no other writer changes the table
 * under the sweep.
 */
static unsigned long dsvm_region_sweep(struct dsvm_region *region,
				       unsigned long first, unsigned long last,
				       bool drop)
{
	xa_mark_t filter = drop ? XA_PRESENT : DSVM_MARK_MODIFIED;
	struct page *batch[DSVM_SWEEP_BATCH];
	unsigned long index = first, done = 0;

	lockdep_assert_held(&region->lock);
	for (;;) {
		unsigned long lo = 0, hi = 0;
		unsigned int n = 0, i;
		struct page *page;

		page = xa_find(&region->pages, &index, last, filter);
		while (page) {
			/* Faults check entry and mark under the page lock. */
			lock_page(page);
			if (drop)
				xa_erase(&region->pages, index);
			else
				xa_clear_mark(&region->pages, index,
					      DSVM_MARK_MODIFIED);
			unlock_page(page);
			if (!n)
				lo = index;
			hi = index;
			batch[n++] = page;
			if (n == DSVM_SWEEP_BATCH)
				break;
			page = xa_find_after(&region->pages, &index, last,
					     filter);
		}
		if (!n)
			break;

		/* Any fault that saw the old entry has set its PTE by now. */
		unmap_mapping_range(dsvm_mapping,
				    region->base + (lo << PAGE_SHIFT),
				    (hi - lo + 1) << PAGE_SHIFT, 1);
		if (drop) {
			/* The table's references; PTEs held their own. */
			for (i = 0; i < n; i++)
				put_page(batch[i]);
			atomic64_sub(n, &dsvm_counters.pages);
		}
		done += n;
		if (n < DSVM_SWEEP_BATCH || hi == last)
			break;
		index = hi + 1;
		cond_resched();
	}
	return done;
}

/* Frees every page of an unlinked region and drops the table's reference. */
static void dsvm_region_kill(struct dsvm_region *region)
{
	mutex_lock(&region->lock);
	region->dead = true;
	dsvm_region_sweep(region, 0, region->npages - 1, true);
	mutex_unlock(&region->lock);
	dsvm_region_put(region);
}

/* Errors: -ENOENT (no such region). */
int dsvm_region_destroy(u64 id)
{
	struct dsvm_region *region;

	mutex_lock(&dsvm_regions_mutex);
	region = xa_load(&dsvm_regions, id);
	if (!region) {
		mutex_unlock(&dsvm_regions_mutex);
		return -ENOENT;
	}
	dsvm_region_unlink(region);
	mutex_unlock(&dsvm_regions_mutex);
	dsvm_region_kill(region);
	return 0;
}

/* Destroys every region the file created; called when it is closed. */
void dsvm_file_destroy_regions(struct dsvm_file *file)
{
	struct dsvm_region *region, *next;
	LIST_HEAD(doomed);

	mutex_lock(&dsvm_regions_mutex);
	list_for_each_entry_safe(region, next, &file->regions, owner_link) {
		dsvm_region_unlink(region);
		/* Unreachable now: owner_link is free for the local list. */
		list_add_tail(&region->owner_link, &doomed);
	}
	mutex_unlock(&dsvm_regions_mutex);

	list_for_each_entry_safe(region, next, &doomed, owner_link) {
		list_del_init(&region->owner_link);
		dsvm_region_kill(region);
	}
}

/*
 * Installs page (a new page holding the data, with one reference that the
 * table takes over on success) at index, Modified or Shared.
 * Errors: -ENOENT (the region was destroyed), -EEXIST (index installed),
 * -ENOMEM.
 */
int dsvm_page_install(struct dsvm_region *region, unsigned long index,
		      struct page *page, bool modified)
{
	int ret;

	mutex_lock(&region->lock);
	if (region->dead) {
		ret = -ENOENT;
		goto out_unlock;
	}
	/*
	 * Locked before it becomes visible: a fault that finds the page
	 * waits for the lock and then sees the mark as well.
	 */
	lock_page(page);
	ret = xa_insert(&region->pages, index, page, GFP_KERNEL);
	if (!ret) {
		if (modified)
			xa_set_mark(&region->pages, index, DSVM_MARK_MODIFIED);
		atomic64_inc(&dsvm_counters.pages);
	} else if (ret == -EBUSY) {
		ret = -EEXIST;
	}
	unlock_page(page);
out_unlock:
	mutex_unlock(&region->lock);
	return ret;
}

/* Drops the installed pages of [first, last]; returns how many. */
unsigned long dsvm_page_invalidate(struct dsvm_region *region,
				   unsigned long first, unsigned long last)
{
	unsigned long done;

	mutex_lock(&region->lock);
	done = dsvm_region_sweep(region, first, last, true);
	mutex_unlock(&region->lock);
	return done;
}

/* Makes the Modified pages of [first, last] Shared; returns how many. */
unsigned long dsvm_page_downgrade(struct dsvm_region *region,
				  unsigned long first, unsigned long last)
{
	unsigned long done;

	mutex_lock(&region->lock);
	done = dsvm_region_sweep(region, first, last, false);
	mutex_unlock(&region->lock);
	return done;
}
