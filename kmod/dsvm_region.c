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
#include <linux/bitmap.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/uaccess.h>
#include <linux/slab.h>

#include "dsvm_internal.h"

/* Region tables and files' domains change under it. */
static DEFINE_MUTEX(dsvm_regions_mutex);

/* Tags of the control domains that exist. */
static DEFINE_IDA(dsvm_domain_tags);

/* The domain of every file that never claimed control nor was attached. */
struct dsvm_domain dsvm_domain_plain = {
	.kref = KREF_INIT(1),	/* never released */
	.regions = XARRAY_INIT(dsvm_domain_plain.regions, 0),
	.events = LIST_HEAD_INIT(dsvm_domain_plain.events),
};

/* How many pages a sweep changes between two unmaps. */
#define DSVM_SWEEP_BATCH 64

static void dsvm_domain_release(struct kref *kref)
{
	struct dsvm_domain *domain = container_of(kref, struct dsvm_domain, kref);

	/* Regions hold references, and their events answered before they go. */
	WARN_ON_ONCE(!xa_empty(&domain->regions));
	WARN_ON_ONCE(!list_empty(&domain->events));
	xa_destroy(&domain->regions);
	ida_free(&dsvm_domain_tags, domain->tag);
	kfree(domain);
}

void dsvm_domain_get(struct dsvm_domain *domain)
{
	if (domain != &dsvm_domain_plain)
		kref_get(&domain->kref);
}

void dsvm_domain_put(struct dsvm_domain *domain)
{
	if (domain != &dsvm_domain_plain)
		kref_put(&domain->kref, dsvm_domain_release);
}

static void dsvm_region_release(struct kref *kref)
{
	struct dsvm_region *region = container_of(kref, struct dsvm_region, kref);

	/* Destroying the region emptied its table before the last put. */
	WARN_ON_ONCE(!xa_empty(&region->pages));
	WARN_ON_ONCE(!list_empty(&region->events));
	xa_destroy(&region->pages);
	xa_destroy(&region->poisoned);
	mutex_destroy(&region->lock);
	if (region->domain)
		dsvm_domain_put(region->domain);
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

/* Returns the region of the file's domain with this id, with a reference, or NULL. */
struct dsvm_region *dsvm_region_get(struct dsvm_file *file, u64 id)
{
	struct dsvm_domain *domain = READ_ONCE(file->domain);
	struct dsvm_region *region;

	/*
	 * The table's own reference keeps the region alive under xa_lock.
	 * (The domain outlives the lookup: the file holds it, and a file's
	 * domain changes only from plain, which is static.)
	 */
	xa_lock(&domain->regions);
	region = xa_load(&domain->regions, id);
	if (region)
		kref_get(&region->kref);
	xa_unlock(&domain->regions);
	return region;
}

/*
 * Returns the region of the file's domain that starts at base, with a
 * reference, or NULL.
 */
struct dsvm_region *dsvm_region_get_by_base(struct dsvm_file *file,
					    unsigned long base)
{
	struct dsvm_domain *domain = READ_ONCE(file->domain);
	struct dsvm_region *region, *found = NULL;
	unsigned long id;

	/* A linear scan: mmap is rare and regions are few. */
	xa_lock(&domain->regions);
	xa_for_each(&domain->regions, id, region) {
		if (region->base == base) {
			kref_get(&region->kref);
			found = region;
			break;
		}
	}
	xa_unlock(&domain->regions);
	return found;
}

/* Whether no region exists in any domain (module unload). */
bool dsvm_regions_empty(void)
{
	return atomic64_read(&dsvm_counters.regions) == 0 &&
	       xa_empty(&dsvm_domain_plain.regions);
}

/*
 * Makes file a control file, with a domain of its own: its regions raise
 * fault events, and they all die with it. Only a file that has created no
 * region (they would be plain ones) and is not attached may claim.
 * Errors: -EBUSY (the file has regions or is attached), -ENOSPC
 * (DSVM_DOMAINS_MAX control files exist), -ENOMEM.
 */
int dsvm_control_claim(struct dsvm_file *file)
{
	struct dsvm_domain *domain;
	int ret = 0, tag;

	domain = kzalloc(sizeof(*domain), GFP_KERNEL);
	if (!domain)
		return -ENOMEM;
	mutex_lock(&dsvm_regions_mutex);
	if (file->control)
		goto out_unlock;
	if (file->attached || !list_empty(&file->regions)) {
		ret = -EBUSY;
		goto out_unlock;
	}
	tag = ida_alloc_range(&dsvm_domain_tags, 1, DSVM_DOMAINS_MAX, GFP_KERNEL);
	if (tag < 0) {
		ret = tag == -ENOSPC ? -ENOSPC : -ENOMEM;
		goto out_unlock;
	}
	kref_init(&domain->kref);	/* the control file's */
	domain->tag = tag;
	xa_init(&domain->regions);
	INIT_LIST_HEAD(&domain->events);
	WRITE_ONCE(file->domain, domain);
	/* After the domain: read() and poll() see control, then use domain. */
	smp_store_release(&file->control, true);
	domain = NULL;
out_unlock:
	mutex_unlock(&dsvm_regions_mutex);
	kfree(domain);
	return ret;
}

/*
 * DSVM_IOC_ATTACH: makes client map the regions of control's domain (and
 * only those); client then changes no table. Repeating it is allowed.
 * Errors: -EBUSY (client is a control file, has regions of its own, or is
 * attached to another domain).
 */
int dsvm_domain_attach(struct dsvm_file *control, struct dsvm_file *client)
{
	int ret = 0;

	mutex_lock(&dsvm_regions_mutex);
	if (client->attached && client->domain == control->domain)
		goto out_unlock;
	if (client->control || client->attached || !list_empty(&client->regions)) {
		ret = -EBUSY;
		goto out_unlock;
	}
	kref_get(&control->domain->kref);
	WRITE_ONCE(client->domain, control->domain);
	WRITE_ONCE(client->attached, true);
out_unlock:
	mutex_unlock(&dsvm_regions_mutex);
	return ret;
}

/* Drops the file's reference to its domain; on release, after its regions. */
void dsvm_file_put_domain(struct dsvm_file *file)
{
	dsvm_domain_put(file->domain);
	file->domain = NULL;
}

/*
 * Adds a region owned by file, in the file's domain; arg was validated by
 * the caller.
 * Errors: -EPERM (an attached file), -EEXIST (id in use in the domain),
 * -EADDRINUSE (overlaps another region of the domain), -ENOSPC
 * (DSVM_REGIONS_MAX reached on the node), -ENOMEM.
 */
int dsvm_region_create(struct dsvm_file *file,
		       const struct dsvm_region_create *arg)
{
	struct dsvm_domain *domain;
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
	INIT_LIST_HEAD(&region->events);
	mutex_init(&region->lock);
	xa_init(&region->pages);
	xa_init(&region->poisoned);

	mutex_lock(&dsvm_regions_mutex);
	if (file->attached) {
		ret = -EPERM;
		goto err_unlock;
	}
	domain = file->domain;
	if (xa_load(&domain->regions, region->id)) {
		ret = -EEXIST;
		goto err_unlock;
	}
	xa_for_each(&domain->regions, id, other) {
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
	/*
	 * Filled in before it is published: lookups (dsvm_region_get, mmap)
	 * take only the table's lock. On a failed insert the put below drops
	 * the domain reference with the region.
	 */
	region->control = file->control;
	if (domain != &dsvm_domain_plain)
		kref_get(&domain->kref);
	region->domain = domain;
	region->offset = (loff_t)domain->tag << DSVM_DOMAIN_SHIFT | region->base;
	region->owner = file;
	ret = xa_insert(&domain->regions, region->id, region, GFP_KERNEL);
	if (ret)
		goto err_unlock;
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
	xa_erase(&region->domain->regions, region->id);
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
	unsigned long indexes[DSVM_SWEEP_BATCH];
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
			indexes[n] = index;
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
				    region->offset + (lo << PAGE_SHIFT),
				    (hi - lo + 1) << PAGE_SHIFT, 1);
		/* After the unmap: a woken thread must not find the old PTE. */
		for (i = 0; i < n; i++)
			dsvm_event_answer_page(region, indexes[i]);
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

/*
 * Frees every page of an unlinked region, wakes every thread sleeping on
 * one of its pages (they retry and get SIGBUS) and drops the table's
 * reference.
 */
static void dsvm_region_kill(struct dsvm_region *region)
{
	mutex_lock(&region->lock);
	/* Before the answers: no event is raised for a dead region. */
	WRITE_ONCE(region->dead, true);
	dsvm_region_sweep(region, 0, region->npages - 1, true);
	dsvm_event_answer_region(region);
	/* Faults on a dead region get SIGBUS without looking at it. */
	xa_destroy(&region->poisoned);
	mutex_unlock(&region->lock);
	dsvm_region_put(region);
}

/* Errors: -ENOENT (no such region in the file's domain), -EPERM (attached). */
int dsvm_region_destroy(struct dsvm_file *file, u64 id)
{
	struct dsvm_region *region;

	mutex_lock(&dsvm_regions_mutex);
	if (file->attached) {
		mutex_unlock(&dsvm_regions_mutex);
		return -EPERM;
	}
	region = xa_load(&file->domain->regions, id);
	if (!region) {
		mutex_unlock(&dsvm_regions_mutex);
		return -ENOENT;
	}
	dsvm_region_unlink(region);
	mutex_unlock(&dsvm_regions_mutex);
	dsvm_region_kill(region);
	return 0;
}

/*
 * Destroys every region the file created; called when it is closed. A
 * control file's regions are all its domain's, so when a daemon goes, every
 * sleeper on one of its pages wakes with SIGBUS and every later fault gets
 * SIGBUS; other daemons' regions are untouched.
 */
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
 * table takes over on success) at index, Modified or Shared, and clears the
 * page's poison if it has one.
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
		/* Installed and poisoned never both: a delete never fails. */
		xa_erase(&region->poisoned, index);
		atomic64_inc(&dsvm_counters.pages);
	} else if (ret == -EBUSY) {
		ret = -EEXIST;
	}
	unlock_page(page);
	if (!ret)
		dsvm_event_answer_page(region, index);
out_unlock:
	mutex_unlock(&region->lock);
	return ret;
}

/*
 * Drops the installed pages of [first, last] and clears the poison of the
 * poisoned ones; returns how many pages it dropped. A poisoned page has no
 * pending event (faults on it raise none), so there is none to answer: the
 * next fault raises one.
 */
unsigned long dsvm_page_invalidate(struct dsvm_region *region,
				   unsigned long first, unsigned long last)
{
	unsigned long done, index;
	void *entry;

	mutex_lock(&region->lock);
	done = dsvm_region_sweep(region, first, last, true);
	xa_for_each_range(&region->poisoned, index, entry, first, last) {
		xa_erase(&region->poisoned, index);
		cond_resched();
	}
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

/*
 * Makes the Shared pages of [first, last] Modified in place; returns how
 * many. No unmap: their PTEs are read-only, and .page_mkwrite checks the
 * mark under the page lock before one becomes writable.
 */
unsigned long dsvm_page_upgrade(struct dsvm_region *region,
				unsigned long first, unsigned long last)
{
	unsigned long index, done = 0;
	struct page *page;

	mutex_lock(&region->lock);
	xa_for_each_range(&region->pages, index, page, first, last) {
		if (xa_get_mark(&region->pages, index, DSVM_MARK_MODIFIED))
			continue;
		lock_page(page);
		xa_set_mark(&region->pages, index, DSVM_MARK_MODIFIED);
		unlock_page(page);
		dsvm_event_answer_page(region, index);
		done++;
		cond_resched();
	}
	mutex_unlock(&region->lock);
	return done;
}

/*
 * Puts back what dsvm_page_writeback() changed when the copy to user space
 * failed: the page dropped (if its slot is still free and the region
 * alive), or the dirty mark cleared. A downgrade stays: the bytes are
 * still installed, and the daemon may write them back again.
 */
static void dsvm_page_writeback_undo(struct dsvm_region *region,
				     unsigned long index, struct page *page,
				     bool dropped, bool modified, bool dirty)
{
	bool restored = false;

	mutex_lock(&region->lock);
	lock_page(page);
	/* Poisoned meanwhile: the daemon's latest word on the page wins. */
	if (dropped && !region->dead &&
	    !xa_load(&region->poisoned, index) &&
	    !xa_insert(&region->pages, index, page, GFP_KERNEL)) {
		get_page(page);
		if (modified)
			xa_set_mark(&region->pages, index, DSVM_MARK_MODIFIED);
		atomic64_inc(&dsvm_counters.pages);
		restored = true;
	}
	if (dirty && xa_load(&region->pages, index) == page)
		xa_set_mark(&region->pages, index, DSVM_MARK_DIRTY);
	unlock_page(page);
	if (restored)
		dsvm_event_answer_page(region, index);
	mutex_unlock(&region->lock);
}

/*
 * Copies page index to data; with DSVM_PAGE_WRITEBACK_DOWNGRADE the page
 * becomes Shared, with _INVALIDATE it is dropped. The change (and the
 * clearing of the dirty mark) is made under the page lock and followed by
 * the unmap, and the copy is taken after both: a writer that comes later
 * faults, and for a Shared or dropped page it cannot write at all, so the
 * copy holds every write the change cuts off. Sets *state (before) and
 * *dirty (written since installed or last written back).
 * Errors: -ENODATA (not installed), -EFAULT (data not writable).
 */
int dsvm_page_writeback(struct dsvm_region *region, unsigned long index,
			void __user *data, u32 flags, u32 *state, bool *dirty)
{
	bool drop = flags & DSVM_PAGE_WRITEBACK_INVALIDATE;
	bool downgrade = flags & DSVM_PAGE_WRITEBACK_DOWNGRADE;
	struct page *page;
	unsigned long left;
	bool modified;
	void *src;

	/*
	 * Fault the buffer in first, so that a bad one fails before the page
	 * changes; a copy that fails later (the buffer unmapped meanwhile)
	 * undoes the change.
	 */
	if (fault_in_writeable(data, PAGE_SIZE))
		return -EFAULT;

	mutex_lock(&region->lock);
	page = xa_load(&region->pages, index);
	if (!page) {
		mutex_unlock(&region->lock);
		return -ENODATA;
	}
	lock_page(page);
	modified = xa_get_mark(&region->pages, index, DSVM_MARK_MODIFIED);
	*dirty = xa_get_mark(&region->pages, index, DSVM_MARK_DIRTY);
	if (drop) {
		/* The table's reference is ours now. */
		xa_erase(&region->pages, index);
	} else {
		get_page(page);
		xa_clear_mark(&region->pages, index, DSVM_MARK_DIRTY);
		if (downgrade)
			xa_clear_mark(&region->pages, index, DSVM_MARK_MODIFIED);
	}
	unlock_page(page);
	/* Only a Modified page can be mapped writable. */
	if (drop || modified)
		unmap_mapping_range(dsvm_mapping,
				    region->offset + (index << PAGE_SHIFT),
				    PAGE_SIZE, 1);
	if (drop)
		atomic64_dec(&dsvm_counters.pages);
	if (drop || (downgrade && modified))
		dsvm_event_answer_page(region, index);
	mutex_unlock(&region->lock);

	*state = modified ? DSVM_PAGE_STATE_MODIFIED : DSVM_PAGE_STATE_SHARED;
	/* No lock held: data may be a dsvm mapping whose fault sleeps. */
	src = kmap_local_page(page);
	left = copy_to_user(data, src, PAGE_SIZE);
	kunmap_local(src);
	if (left)
		dsvm_page_writeback_undo(region, index, page, drop, modified,
					 *dirty);
	put_page(page);
	return left ? -EFAULT : 0;
}

/*
 * Poisons the pages of [first, last] that are not poisoned yet: an
 * installed page is dropped (under its page lock, together with the poison
 * mark, as the coherence rule asks), then unmapped; then every poisoned
 * page's events are answered, so that their sleepers retry and get SIGBUS.
 * Works in batches of DSVM_SWEEP_BATCH pages, one unmap each. Sets *done to
 * how many pages it poisoned, on error too.
 * Errors: -ENOENT (the region was destroyed), -ENOMEM, -EINTR (a fatal
 * signal): the pages poisoned before stay poisoned.
 */
int dsvm_page_poison(struct dsvm_region *region, unsigned long first,
		     unsigned long last, unsigned long *done)
{
	DECLARE_BITMAP(changed, DSVM_SWEEP_BATCH);
	struct page *batch[DSVM_SWEEP_BATCH];
	unsigned long lo = first;
	int ret = 0;

	*done = 0;
	mutex_lock(&region->lock);
	if (region->dead) {
		ret = -ENOENT;
		goto out_unlock;
	}
	for (;;) {
		unsigned long hi = last - lo >= DSVM_SWEEP_BATCH - 1 ?
				   lo + DSVM_SWEEP_BATCH - 1 : last;
		unsigned long index, bit;
		unsigned int dropped = 0, i;

		bitmap_zero(changed, DSVM_SWEEP_BATCH);
		for (index = lo; index <= hi; index++) {
			struct page *page;

			if (xa_load(&region->poisoned, index))
				continue;
			page = xa_load(&region->pages, index);
			/* Faults check the entry under the page lock. */
			if (page)
				lock_page(page);
			/* First the mark: a fault that sees the drop sees it. */
			ret = xa_err(xa_store(&region->poisoned, index,
					      DSVM_POISONED, GFP_KERNEL_ACCOUNT));
			if (!ret && page) {
				xa_erase(&region->pages, index);
				batch[dropped++] = page;
			}
			if (page)
				unlock_page(page);
			if (ret)
				break;
			__set_bit(index - lo, changed);
		}

		/* Any fault that saw a dropped entry has set its PTE by now. */
		if (dropped)
			unmap_mapping_range(dsvm_mapping,
					    region->offset + (lo << PAGE_SHIFT),
					    (hi - lo + 1) << PAGE_SHIFT, 1);
		/* After the unmap: a woken thread must not find the old PTE. */
		for_each_set_bit(bit, changed, DSVM_SWEEP_BATCH)
			dsvm_event_answer_page(region, lo + bit);
		/* The table's references; PTEs held their own. */
		for (i = 0; i < dropped; i++)
			put_page(batch[i]);
		atomic64_sub(dropped, &dsvm_counters.pages);
		*done += bitmap_weight(changed, DSVM_SWEEP_BATCH);

		if (ret || hi == last)
			break;
		lo = hi + 1;
		/* A whole region is up to 2^28 pages: let a killed daemon go. */
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();
	}
out_unlock:
	mutex_unlock(&region->lock);
	return ret;
}
