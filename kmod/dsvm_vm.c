// SPDX-License-Identifier: GPL-2.0
/*
 * mmap of /dev/dsvm and the fault handlers: a fault on a page the node
 * holds is resolved here, in the kernel, from the region's page table.
 *
 * The VMA is a shared file mapping of the module's address_space with
 * ordinary, refcounted pages: .fault hands the core the installed page
 * (locked) and the core maps it; PTEs hold references and rmap entries, so
 * unmap_mapping_range() finds and drops them and GUP works on the region.
 * Because .page_mkwrite is set, the core maps every page read-only first
 * (write notification) and asks .page_mkwrite before a PTE becomes
 * writable; that is where writes to Shared pages are stopped and where
 * Modified pages are marked dirty.
 *
 * A fault the table cannot resolve, on a region of the control file,
 * raises a fault event (dsvm_event.c) and sleeps until the daemon answers.
 * Where the core allows it (FAULT_FLAG_ALLOW_RETRY), the sleep happens
 * without mmap_lock, which is dropped as filemap_fault() drops it for I/O,
 * and the fault returns VM_FAULT_RETRY; the core then faults again and
 * finds the page, or gets the signal that killed the sleeper. With
 * FAULT_FLAG_RETRY_NOWAIT (KVM's async faults) the event is raised and the
 * fault returns VM_FAULT_RETRY at once with mmap_lock held, as that flag
 * asks. Otherwise (.page_mkwrite, GUP that cannot retry) it sleeps holding
 * mmap_lock.
 *
 * Locking: see the top of dsvm_internal.h.
 */
#include <linux/delay.h>
#include <linux/file.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pagemap.h>
#include <linux/sched.h>
#include <linux/version.h>

#include "dsvm_internal.h"

/*
 * Test-only fault point: how long a resolved fault waits, page locked,
 * before the core maps the page. It widens the window that the coherence
 * rule (dsvm_internal.h) closes, so that the selftest's race case catches a
 * writer that breaks the rule. 0 (no delay) outside tests.
 */
static unsigned int fault_delay_us;
module_param(fault_delay_us, uint, 0644);
MODULE_PARM_DESC(fault_delay_us, "test only: delay of a resolved fault, in us (max 10000)");

static inline void dsvm_vma_flags_set(struct vm_area_struct *vma,
				      unsigned long flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

static unsigned long dsvm_vm_index(struct vm_fault *vmf)
{
	struct dsvm_region *region = vmf->vma->vm_private_data;

	return vmf->pgoff - (region->offset >> PAGE_SHIFT);
}

/*
 * Checks, with page locked, that page is still installed at index and, for
 * a write, Modified.
 */
static bool dsvm_vm_page_valid(struct dsvm_region *region, unsigned long index,
			       struct page *page, bool write)
{
	if (xa_load(&region->pages, index) != page)
		return false;
	return !write || xa_get_mark(&region->pages, index, DSVM_MARK_MODIFIED);
}

/*
 * Returns the page installed behind a fault, locked and with a reference,
 * or NULL when the fault cannot be resolved here.
 */
static struct page *dsvm_vm_find_page(struct vm_fault *vmf, bool write)
{
	struct dsvm_region *region = vmf->vma->vm_private_data;
	unsigned long index = dsvm_vm_index(vmf);
	struct page *page;

	/* mmap pinned the VMA to the region and mremap is refused. */
	if (WARN_ON_ONCE(index >= region->npages))
		return NULL;

	page = xa_load(&region->pages, index);
	if (!page || !get_page_unless_zero(page))
		return NULL;
	/*
	 * The page may have been freed and reused between the load and the
	 * get; once it is back in the table under our reference it is ours
	 * and may be locked (as in filemap_get_entry()).
	 */
	if (unlikely(xa_load(&region->pages, index) != page))
		goto err_put;
	lock_page(page);
	if (!dsvm_vm_page_valid(region, index, page, write))
		goto err_unlock;
	return page;

err_unlock:
	unlock_page(page);
err_put:
	put_page(page);
	return NULL;
}

/*
 * Raises (or joins) the fault event the page needs and sleeps until it is
 * answered. Returns 0 when the caller should look at the table again, with
 * mmap_lock held; otherwise what the fault returns: VM_FAULT_RETRY
 * (mmap_lock dropped, except with FAULT_FLAG_RETRY_NOWAIT), VM_FAULT_SIGBUS
 * (the region is gone or has no control file, or the page is poisoned; or
 * the sleeper was killed where it could not retry, and will not run
 * again), VM_FAULT_OOM.
 */
/*
 * Sleeps until the event is answered, or with no event until `domain` has
 * room for one (max_pending_events); drops the event's reference, or the
 * domain's. 0 or -ERESTARTSYS (a fatal signal).
 */
static int dsvm_vm_sleep(struct dsvm_event *event, struct dsvm_domain *domain)
{
	int ret;

	if (!event) {
		ret = dsvm_event_wait_room(domain);
		dsvm_domain_put(domain);
		return ret;
	}
	ret = dsvm_event_wait(event);
	dsvm_event_put(event);
	return ret;
}

static vm_fault_t dsvm_vm_fault_wait(struct vm_fault *vmf, bool write)
{
	struct vm_area_struct *vma = vmf->vma;
	struct dsvm_domain *domain = NULL;
	struct dsvm_event *event;
	struct file *fpin;

	event = dsvm_event_raise(vma->vm_private_data, dsvm_vm_index(vmf), write);
	if (!event)
		return 0;
	if (IS_ERR(event) && PTR_ERR(event) != -EBUSY) {
		if (PTR_ERR(event) == -ENOMEM)
			return VM_FAULT_OOM;
		atomic64_inc(&dsvm_counters.refused);
		return VM_FAULT_SIGBUS;
	}
	/*
	 * No room for another event in the region's domain: wait for room
	 * instead of an answer, holding the domain (the region may go once
	 * mmap_lock is dropped).
	 */
	if (IS_ERR(event)) {
		event = NULL;
		domain = ((struct dsvm_region *)vma->vm_private_data)->domain;
		dsvm_domain_get(domain);
	}

	if (vmf->flags & FAULT_FLAG_RETRY_NOWAIT) {
		if (event)
			dsvm_event_put(event);
		else
			dsvm_domain_put(domain);
		return VM_FAULT_RETRY;
	}
	if (vmf->flags & FAULT_FLAG_ALLOW_RETRY) {
		/*
		 * Once mmap_lock is dropped the VMA may go, and with it the
		 * last reference to the file and the module: hold the file
		 * (filemap_fault()'s fpin). The event has its own reference.
		 * A fatal signal ends the sleep; the core sees it on
		 * VM_FAULT_RETRY, and the event stays for the daemon.
		 */
		fpin = get_file(vma->vm_file);
		mmap_read_unlock(vma->vm_mm);
		dsvm_vm_sleep(event, domain);
		fput(fpin);
		return VM_FAULT_RETRY;
	}
	return dsvm_vm_sleep(event, domain) ? VM_FAULT_SIGBUS : 0;
}

static vm_fault_t dsvm_vm_fault(struct vm_fault *vmf)
{
	bool write = vmf->flags & FAULT_FLAG_WRITE;
	unsigned int delay;
	struct page *page;
	vm_fault_t ret;

	/* Each trip round waits for an answer, or sees the table change. */
	for (;;) {
		page = dsvm_vm_find_page(vmf, write);
		if (page)
			break;
		ret = dsvm_vm_fault_wait(vmf, write);
		if (ret)
			return ret;
		cond_resched();
	}
	atomic64_inc(&dsvm_counters.faults);
	delay = READ_ONCE(fault_delay_us);
	if (unlikely(delay))
		usleep_range(min(delay, 10000U), min(delay, 10000U) + 10);
	/* The core maps it (read-only: write notification) and unlocks it. */
	vmf->page = page;
	return VM_FAULT_LOCKED;
}

/*
 * Called before a PTE of the page becomes writable: on the write fault that
 * mapped it, and on a write to a page mapped read-only. The core holds a
 * reference to vmf->page; the PTE is made writable under the page lock we
 * return with (VM_FAULT_LOCKED: the core's own fallback would check
 * page->mapping, which our pages do not have, and retry for ever). The
 * dirty mark is set under the same lock, so writeback, which clears it
 * under the lock and unmaps after, never misses a write.
 *
 * The core calls this without FAULT_FLAG_ALLOW_RETRY, so a write to a
 * Shared page sleeps for the upgrade holding mmap_lock.
 */
static vm_fault_t dsvm_vm_page_mkwrite(struct vm_fault *vmf)
{
	struct dsvm_region *region = vmf->vma->vm_private_data;
	unsigned long index = dsvm_vm_index(vmf);
	struct page *page = vmf->page;
	vm_fault_t ret;

	for (;;) {
		lock_page(page);
		if (dsvm_vm_page_valid(region, index, page, true))
			break;
		unlock_page(page);
		if (READ_ONCE(region->dead)) {
			atomic64_inc(&dsvm_counters.refused);
			return VM_FAULT_SIGBUS;
		}
		/*
		 * Dropped or replaced: the writer unmaps this PTE right after
		 * its change. Let the access fault again through .fault.
		 */
		if (xa_load(&region->pages, index) != page)
			return VM_FAULT_NOPAGE;
		ret = dsvm_vm_fault_wait(vmf, true);
		if (ret)
			return ret;
	}
	xa_set_mark(&region->pages, index, DSVM_MARK_DIRTY);
	atomic64_inc(&dsvm_counters.mkwrites);
	return VM_FAULT_LOCKED;
}

/* A copy of a VMA: split, fork. */
static void dsvm_vm_open(struct vm_area_struct *vma)
{
	dsvm_region_get_ref(vma->vm_private_data);
	atomic64_inc(&dsvm_counters.mappings);
}

static void dsvm_vm_close(struct vm_area_struct *vma)
{
	atomic64_dec(&dsvm_counters.mappings);
	dsvm_region_put(vma->vm_private_data);
}

/* A region lives at the same address on every node: it never moves. */
static int dsvm_vm_mremap(struct vm_area_struct *vma)
{
	return -EINVAL;
}

static const struct vm_operations_struct dsvm_vm_ops = {
	.open = dsvm_vm_open,
	.close = dsvm_vm_close,
	.mremap = dsvm_vm_mremap,
	.fault = dsvm_vm_fault,
	.page_mkwrite = dsvm_vm_page_mkwrite,
};

/* A mapping of a region: the mirror refuses to mirror it (dsvm_mirror.c). */
bool dsvm_vm_is_region(const struct vm_area_struct *vma)
{
	return vma->vm_ops == &dsvm_vm_ops;
}

/*
 * Maps a region of the file's domain whole at its base address; the caller
 * passes the base as the file offset, and the VMA gets the region's own
 * offset (its domain's tag above the base), which unmaps name.
 * Errors: -EINVAL (private mapping, wrong address or length), -ENOENT (no
 * region of the file's domain starts at the offset).
 */
int dsvm_vm_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct dsvm_region *region;
	unsigned long base;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	if (vma->vm_pgoff >= (1UL << (BITS_PER_LONG - PAGE_SHIFT)))
		return -EINVAL;
	base = vma->vm_pgoff << PAGE_SHIFT;
	region = dsvm_region_get_by_base(filp->private_data, base);
	if (!region)
		return -ENOENT;
	if (vma->vm_start != base || vma->vm_end - vma->vm_start != region->size) {
		dsvm_region_put(region);
		return -EINVAL;
	}

	/*
	 * VM_DONTEXPAND: no growing with mremap; it also makes the VMA
	 * VM_SPECIAL, so mlock() leaves it alone (our pages are not on the
	 * LRU and must never be PG_mlocked) and it is never merged.
	 * VM_DONTDUMP: a core dump must not fault in pages of the region.
	 */
	dsvm_vma_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP);
	/* Before the core links the VMA into the mapping's interval tree. */
	vma->vm_pgoff = region->offset >> PAGE_SHIFT;
	vma->vm_ops = &dsvm_vm_ops;
	vma->vm_private_data = region;	/* the reference from the lookup */
	atomic64_inc(&dsvm_counters.mappings);
	return 0;
}
