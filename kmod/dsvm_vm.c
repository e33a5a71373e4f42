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
 * writable; that is where Shared pages are refused.
 *
 * Locking: see the top of dsvm_internal.h.
 */
#include <linux/delay.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pagemap.h>
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

	return vmf->pgoff - (region->base >> PAGE_SHIFT);
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

static vm_fault_t dsvm_vm_fault(struct vm_fault *vmf)
{
	unsigned int delay;
	struct page *page;

	page = dsvm_vm_find_page(vmf, vmf->flags & FAULT_FLAG_WRITE);
	if (!page) {
		/*
		 * TODO(#4): queue a fault event for the daemon (read/poll on
		 * the control file) and sleep killably until it installs the
		 * page; SIGBUS only when the daemon is gone.
		 */
		atomic64_inc(&dsvm_counters.refused);
		return VM_FAULT_SIGBUS;
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
 * page->mapping, which our pages do not have, and retry for ever).
 */
static vm_fault_t dsvm_vm_page_mkwrite(struct vm_fault *vmf)
{
	struct dsvm_region *region = vmf->vma->vm_private_data;
	struct page *page = vmf->page;

	lock_page(page);
	if (!dsvm_vm_page_valid(region, dsvm_vm_index(vmf), page, true)) {
		unlock_page(page);
		/* TODO(#4): an upgrade event for the daemon, as in .fault. */
		atomic64_inc(&dsvm_counters.refused);
		return VM_FAULT_SIGBUS;
	}
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

/*
 * Maps a region whole at its base address; the file offset is the base.
 * Errors: -EINVAL (private mapping, wrong address or length), -ENOENT (no
 * region starts at the offset).
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
	region = dsvm_region_get_by_base(base);
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
	vma->vm_ops = &dsvm_vm_ops;
	vma->vm_private_data = region;	/* the reference from the lookup */
	atomic64_inc(&dsvm_counters.mappings);
	return 0;
}
