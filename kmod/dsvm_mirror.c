// SPDX-License-Identifier: GPL-2.0
/*
 * The HMM mirror (docs/KMOD.md, "Mirror"): the module plays a device that
 * mirrors ordinary memory of a process, as a GPU driver does (and as
 * lib/test_hmm.c plays one). A mirror is a range of the registering
 * process's address space, an mmu_interval_notifier on it, and a device
 * page table: one entry per page, the PFN and write permission the CPU
 * page table had when hmm_range_fault() snapshotted it.
 *
 * The coherence rule is HMM's (Documentation/mm/hmm.rst): the notifier's
 * invalidate callback drops the entries of its range and bumps the
 * notifier's sequence under mirror->lock, before the core changes the CPU
 * page table; a snapshot stores its results under the same lock only if
 * no invalidation ran since it began (mmu_interval_read_begin() /
 * _read_retry()), and otherwise takes it again. So an entry present under
 * mirror->lock names a page the CPU maps at that address right now, which
 * the core cannot free before it has called the notifier; the entries
 * need no page references, and "device access" (DSVM_IOC_MIRROR_READ)
 * reads through them under the lock.
 *
 * Every drop of entries queues an invalidation event to the owner file
 * (dsvm_event.c): the daemon learns that a GPU copy made from those pages
 * must go before it can go stale.
 *
 * No DEVICE_PRIVATE on Debian's 6.1: pages can only move system to system
 * (DSVM_IOC_MIRROR_MIGRATE), and every entry is a system page. The owner
 * cookie below is already passed where a device-private build needs it
 * (hmm_range's dev_private_owner, migrate_vma's pgmap_owner).
 *
 * Locking: see the top of dsvm_internal.h.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/jiffies.h>
#include <linux/migrate.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "dsvm_internal.h"

/* Pages per hmm_range_fault() call: bounds the buffer and each retry. */
#define DSVM_MIRROR_FAULT_BATCH 512UL

/* Pages per migrate_vma_setup(): bounds the pages locked at once. */
#define DSVM_MIRROR_MIGRATE_BATCH 64UL

/*
 * This "device"'s owner cookie. On a kernel with DEVICE_PRIVATE it would
 * be the pgmap owner of the module's device-private pages: hmm_range_fault()
 * then returns those pages' PFNs instead of faulting them back to system
 * memory, and migrate_vma's notifier call carries it so that the callback
 * can tell its own migrations apart.
 */
static int dsvm_mirror_owner;

/* What an entry keeps of an hmm_range_fault() result, or 0. */
static unsigned long dsvm_mirror_entry(unsigned long hmm_pfn)
{
	if (!(hmm_pfn & HMM_PFN_VALID) || (hmm_pfn & HMM_PFN_ERROR))
		return 0;
	return hmm_pfn & (HMM_PFN_VALID | HMM_PFN_WRITE | ~HMM_PFN_FLAGS);
}

/*
 * The notifier: drops the entries of [range->start, range->end) and queues
 * an event for them. Every kind of event drops: unmap, clear (madvise,
 * COW, reclaim, compaction), protection (fork write-protects the parent's
 * private pages: a writable entry would let the device write to a page
 * the child now shares), release (the process exits), and migration,
 * ours too: a system page that moves leaves the old PFN stale. (A
 * DEVICE_PRIVATE build would skip MMU_NOTIFY_MIGRATE with range->owner ==
 * &dsvm_mirror_owner for pages it migrates to itself, as test_hmm does,
 * and update those entries in the migration instead.)
 * Called from reclaim and under page and rmap locks: nothing here
 * allocates or sleeps on anything but mirror->lock, and a caller that may
 * not sleep (the OOM reaper) gets false when the lock is busy, as the
 * notifier API asks; it retries later.
 */
static bool dsvm_mirror_invalidate(struct mmu_interval_notifier *notifier,
				   const struct mmu_notifier_range *range,
				   unsigned long cur_seq)
{
	struct dsvm_mirror *mirror =
		container_of(notifier, struct dsvm_mirror, notifier);
	unsigned long first, last, i, lo = ULONG_MAX, hi = 0, dropped = 0;

	if (mmu_notifier_range_blockable(range))
		mutex_lock(&mirror->lock);
	else if (!mutex_trylock(&mirror->lock))
		return false;
	/* Unconditionally: a snapshot in flight must retry. */
	mmu_interval_set_seq(notifier, cur_seq);
	atomic64_inc(&dsvm_counters.mirror_invalidations);
	/* The interval tree calls only for overlapping ranges. */
	if (WARN_ON_ONCE(range->end <= mirror->start ||
			 range->start >= mirror->end))
		goto out_unlock;

	first = (max(range->start, mirror->start) - mirror->start) >> PAGE_SHIFT;
	last = (min(range->end, mirror->end) - mirror->start - 1) >> PAGE_SHIFT;
	for (i = first; i <= last && mirror->nentries; i++) {
		if (!mirror->pfns[i])
			continue;
		mirror->pfns[i] = 0;
		mirror->nentries--;
		dropped++;
		lo = min(lo, i);
		hi = i;
	}
	if (dropped) {
		atomic64_sub(dropped, &dsvm_counters.mirror_entries);
		atomic64_add(dropped, &dsvm_counters.mirror_dropped);
		dsvm_event_mirror_queue(mirror, lo, hi);
	}
out_unlock:
	mutex_unlock(&mirror->lock);
	return true;
}

static const struct mmu_interval_notifier_ops dsvm_mirror_notifier_ops = {
	.invalidate = dsvm_mirror_invalidate,
};

/*
 * Checks that [start, end) is covered by VMAs of memory the mirror may
 * mirror: no hole, no VM_IO / VM_PFNMAP (no struct pages to read through),
 * no /dev/dsvm mapping (the module already tracks those pages, and a fault
 * on one can wait for the daemon). Errors: -EFAULT (a hole), -EINVAL.
 */
static int dsvm_mirror_check_vmas(struct mm_struct *mm, unsigned long start,
				  unsigned long end)
{
	struct vm_area_struct *vma;
	unsigned long addr = start;

	mmap_assert_locked(mm);
	while (addr < end) {
		vma = find_vma(mm, addr);
		if (!vma || vma->vm_start > addr)
			return -EFAULT;
		if ((vma->vm_flags & (VM_IO | VM_PFNMAP)) ||
		    dsvm_vm_is_region(vma))
			return -EINVAL;
		addr = vma->vm_end;
	}
	return 0;
}

/* Returns the file's mirror with this id, or NULL. */
static struct dsvm_mirror *dsvm_mirror_find(struct dsvm_file *file, u64 id)
{
	lockdep_assert_held(&file->mirrors_lock);
	if (!id || id > DSVM_MIRRORS_MAX)
		return NULL;
	return xa_load(&file->mirrors, id);
}

/*
 * Takes the file's mirror lock and finds the mirror; on success the caller
 * unlocks. Errors: -EINTR (fatal signal), -ENOENT.
 */
static int dsvm_mirror_lock_find(struct dsvm_file *file, u64 id,
				 struct dsvm_mirror **mirror)
{
	if (mutex_lock_killable(&file->mirrors_lock))
		return -EINTR;
	*mirror = dsvm_mirror_find(file, id);
	if (!*mirror) {
		mutex_unlock(&file->mirrors_lock);
		return -ENOENT;
	}
	return 0;
}

/* Checks that [first, first + count) lies inside the mirror. */
static bool dsvm_mirror_range_ok(struct dsvm_mirror *mirror, u64 first,
				 u64 count)
{
	return count && first < mirror->npages &&
	       count <= mirror->npages - first;
}

void dsvm_file_init_mirrors(struct dsvm_file *file)
{
	mutex_init(&file->mirrors_lock);
	xa_init_flags(&file->mirrors, XA_FLAGS_ALLOC1);
	INIT_LIST_HEAD(&file->mirror_events);
}

/*
 * Ends a mirror that is no longer in its file's table. Removing the
 * notifier waits for a callback in progress, so none runs after it and
 * the event can be cancelled for good; the mm may have exited long ago
 * (its notifier table lives until the last mmdrop).
 */
static void dsvm_mirror_destroy(struct dsvm_mirror *mirror)
{
	mmu_interval_notifier_remove(&mirror->notifier);
	dsvm_event_mirror_cancel(mirror);
	atomic64_sub(mirror->nentries, &dsvm_counters.mirror_entries);
	atomic64_dec(&dsvm_counters.mirrors);
	mmdrop(mirror->mm);
	kvfree(mirror->pfns);
	mutex_destroy(&mirror->lock);
	kfree(mirror);
}

/* On close: no ioctl can run on the file any more. */
void dsvm_file_destroy_mirrors(struct dsvm_file *file)
{
	struct dsvm_mirror *mirror;
	unsigned long id;

	mutex_lock(&file->mirrors_lock);
	xa_for_each(&file->mirrors, id, mirror) {
		xa_erase(&file->mirrors, id);
		dsvm_mirror_destroy(mirror);
	}
	mutex_unlock(&file->mirrors_lock);
	WARN_ON_ONCE(!list_empty(&file->mirror_events));
	xa_destroy(&file->mirrors);
	mutex_destroy(&file->mirrors_lock);
}

/*
 * Mirrors [start, start + length) of the calling process (validated by
 * the caller: aligned, nonzero, bounded, inside the user address space).
 * Errors: -EINVAL (no mm, or memory that cannot be mirrored), -EFAULT (a
 * hole), -ENOSPC (DSVM_MIRRORS_MAX on this file), -EINTR, -ENOMEM.
 */
int dsvm_mirror_register(struct dsvm_file *file, unsigned long start,
			 unsigned long length, u64 *id)
{
	struct mm_struct *mm = current->mm;
	struct dsvm_mirror *mirror;
	u32 xid;
	int ret;

	if (!mm)
		return -EINVAL;
	/* Charged to the caller: it chooses how much to mirror. */
	mirror = kzalloc(sizeof(*mirror), GFP_KERNEL_ACCOUNT);
	if (!mirror)
		return -ENOMEM;
	mirror->owner = file;
	mirror->start = start;
	mirror->end = start + length;
	mirror->npages = length >> PAGE_SHIFT;
	mutex_init(&mirror->lock);
	INIT_LIST_HEAD(&mirror->event_link);
	/*
	 * The whole table up front: the snapshot stores under mirror->lock,
	 * where nothing may allocate (the notifier runs from reclaim).
	 */
	mirror->pfns = kvcalloc(mirror->npages, sizeof(*mirror->pfns),
				GFP_KERNEL_ACCOUNT);
	if (!mirror->pfns) {
		ret = -ENOMEM;
		goto err_free;
	}

	if (mmap_read_lock_killable(mm)) {
		ret = -EINTR;
		goto err_free;
	}
	ret = dsvm_mirror_check_vmas(mm, mirror->start, mirror->end);
	mmap_read_unlock(mm);
	if (ret)
		goto err_free;

	if (mutex_lock_killable(&file->mirrors_lock)) {
		ret = -EINTR;
		goto err_free;
	}
	ret = xa_alloc(&file->mirrors, &xid, mirror,
		       XA_LIMIT(1, DSVM_MIRRORS_MAX), GFP_KERNEL_ACCOUNT);
	if (ret) {
		ret = ret == -EBUSY ? -ENOSPC : ret;
		goto err_unlock;
	}
	mirror->id = xid;
	/*
	 * Our own hold on the mm_struct (as test_hmm takes one): the process
	 * may exit while the file stays open; the struct, and with it the
	 * notifier table that mmu_interval_notifier_remove() walks, stays
	 * until our mmdrop(). The notifier's insert may take mmap_lock for
	 * write (the mm's first notifier), so none is held here.
	 */
	mmgrab(mm);
	mirror->mm = mm;
	ret = mmu_interval_notifier_insert(&mirror->notifier, mm, start, length,
					   &dsvm_mirror_notifier_ops);
	if (ret)
		goto err_erase;
	atomic64_inc(&dsvm_counters.mirrors);
	WRITE_ONCE(file->mirror_reader, true);
	mutex_unlock(&file->mirrors_lock);
	*id = xid;
	return 0;

err_erase:
	mmdrop(mm);
	xa_erase(&file->mirrors, xid);
err_unlock:
	mutex_unlock(&file->mirrors_lock);
err_free:
	kvfree(mirror->pfns);
	mutex_destroy(&mirror->lock);
	kfree(mirror);
	return ret;
}

/* Errors: -ENOENT, -EINTR. */
int dsvm_mirror_unregister(struct dsvm_file *file, u64 id)
{
	struct dsvm_mirror *mirror;
	int ret;

	ret = dsvm_mirror_lock_find(file, id, &mirror);
	if (ret)
		return ret;
	xa_erase(&file->mirrors, id);
	dsvm_mirror_destroy(mirror);
	mutex_unlock(&file->mirrors_lock);
	return 0;
}

/*
 * One batch of a snapshot: hmm_range_fault() over n pages from first,
 * stored under mirror->lock if no invalidation ran meanwhile (else again),
 * the loop of Documentation/mm/hmm.rst. The caller holds a user reference
 * on mm. Errors: those of hmm_range_fault() (-EFAULT, -ENOMEM, ...),
 * -EFAULT for memory that cannot be mirrored, -EBUSY (no stable view
 * within HMM_RANGE_DEFAULT_TIMEOUT), -EINTR.
 */
static int dsvm_mirror_snapshot_batch(struct dsvm_mirror *mirror,
				      struct mm_struct *mm, unsigned long first,
				      unsigned long n, unsigned long flags,
				      unsigned long *pfns, u64 *present,
				      u64 *writable)
{
	struct hmm_range range = {
		.notifier = &mirror->notifier,
		.start = mirror->start + (first << PAGE_SHIFT),
		.end = mirror->start + ((first + n) << PAGE_SHIFT),
		.hmm_pfns = pfns,
		.default_flags = flags,
		.pfn_flags_mask = 0,	/* the same request for every page */
		.dev_private_owner = &dsvm_mirror_owner,
	};
	unsigned long timeout =
		jiffies + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT);
	unsigned long i, entry;
	int ret;

	for (;;) {
		if (fatal_signal_pending(current))
			return -EINTR;
		if (time_after(jiffies, timeout))
			return -EBUSY;
		/* Waits for an invalidation in progress to end. */
		range.notifier_seq = mmu_interval_read_begin(range.notifier);
		if (mmap_read_lock_killable(mm))
			return -EINTR;
		ret = dsvm_mirror_check_vmas(mm, range.start, range.end);
		if (ret == -EINVAL)
			ret = -EFAULT;
		if (!ret)
			ret = hmm_range_fault(&range);
		mmap_read_unlock(mm);
		if (ret == -EBUSY)	/* an invalidation hit the walk */
			continue;
		if (ret)
			return ret;
		mutex_lock(&mirror->lock);
		if (!mmu_interval_read_retry(range.notifier, range.notifier_seq))
			break;
		mutex_unlock(&mirror->lock);
	}

	for (i = 0; i < n; i++) {
		entry = dsvm_mirror_entry(pfns[i]);
		if (!!entry != !!mirror->pfns[first + i]) {
			if (entry) {
				mirror->nentries++;
				atomic64_inc(&dsvm_counters.mirror_entries);
			} else {
				mirror->nentries--;
				atomic64_dec(&dsvm_counters.mirror_entries);
			}
		}
		mirror->pfns[first + i] = entry;
		if (entry)
			(*present)++;
		if (entry & HMM_PFN_WRITE)
			(*writable)++;
	}
	mutex_unlock(&mirror->lock);
	return 0;
}

/*
 * The start of snapshot and migrate: finds mirror id of file, checks
 * [first, first + count) against it, and takes a user reference on its mm
 * (the page tables stay while we walk them). On success file->mirrors_lock
 * is held and the caller ends with mmput() and mutex_unlock(); on error
 * neither is held. Errors: -ENOENT, -EINVAL (range), -ESRCH (the process
 * exited).
 */
static int dsvm_mirror_get_range(struct dsvm_file *file, u64 id, u64 first,
				 u64 count, struct dsvm_mirror **mirror,
				 struct mm_struct **mm)
{
	int ret;

	ret = dsvm_mirror_lock_find(file, id, mirror);
	if (ret)
		return ret;
	if (!dsvm_mirror_range_ok(*mirror, first, count)) {
		ret = -EINVAL;
	} else {
		*mm = (*mirror)->mm;
		if (mmget_not_zero(*mm))
			return 0;
		ret = -ESRCH;
	}
	mutex_unlock(&file->mirrors_lock);
	return ret;
}

/*
 * DSVM_IOC_MIRROR_SNAPSHOT (flags validated by the caller). Errors:
 * -ENOENT, -EINVAL (range), -ESRCH (the process exited), and those of
 * dsvm_mirror_snapshot_batch().
 */
int dsvm_mirror_snapshot(struct dsvm_file *file, u64 id, u64 first, u64 count,
			 u32 flags, u64 *present, u64 *writable)
{
	unsigned long req = 0, done, n, *pfns;
	struct dsvm_mirror *mirror;
	struct mm_struct *mm;
	int ret;

	if (flags & DSVM_MIRROR_SNAPSHOT_FAULT)
		req |= HMM_PFN_REQ_FAULT;
	if (flags & DSVM_MIRROR_SNAPSHOT_WRITE)
		req |= HMM_PFN_REQ_WRITE;
	*present = 0;
	*writable = 0;

	pfns = kmalloc_array(DSVM_MIRROR_FAULT_BATCH, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	ret = dsvm_mirror_get_range(file, id, first, count, &mirror, &mm);
	if (ret)
		goto out_free;
	for (done = 0; done < count; done += n) {
		n = min_t(u64, count - done, DSVM_MIRROR_FAULT_BATCH);
		ret = dsvm_mirror_snapshot_batch(mirror, mm, first + done, n,
						 req, pfns, present, writable);
		if (ret)
			break;
	}
	mmput(mm);
	mutex_unlock(&file->mirrors_lock);
out_free:
	kfree(pfns);
	return ret;
}

/*
 * DSVM_IOC_MIRROR_READ: the "device access". The page is copied under
 * mirror->lock, where an entry present means the CPU still maps that page
 * (the notifier drops entries under the same lock before any change of
 * the CPU page table), so the bytes are never a freed or stale page's;
 * the copy to the user comes after the lock, which a fault on the user's
 * buffer could otherwise need (copy-on-write calls the notifier).
 * Errors: -ENOENT, -EINVAL (index), -EAGAIN (no entry), -EFAULT, -EINTR,
 * -ENOMEM.
 */
int dsvm_mirror_read(struct dsvm_file *file, u64 id, u64 index,
		     void __user *data)
{
	struct dsvm_mirror *mirror;
	unsigned long entry;
	void *buf, *src;
	int ret;

	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	ret = dsvm_mirror_lock_find(file, id, &mirror);
	if (ret)
		goto out_free;
	if (index >= mirror->npages) {
		ret = -EINVAL;
		goto out_unlock;
	}
	mutex_lock(&mirror->lock);
	entry = mirror->pfns[index];
	if (entry) {
		src = kmap_local_page(hmm_pfn_to_page(entry));
		memcpy(buf, src, PAGE_SIZE);
		kunmap_local(src);
	} else {
		ret = -EAGAIN;
	}
	mutex_unlock(&mirror->lock);
out_unlock:
	mutex_unlock(&file->mirrors_lock);
	if (!ret && copy_to_user(data, buf, PAGE_SIZE))
		ret = -EFAULT;
out_free:
	kfree(buf);
	return ret;
}

/* VMAs that migrate_vma_setup() accepts, less the module's own. */
static bool dsvm_mirror_vma_migratable(struct vm_area_struct *vma)
{
	return !(vma->vm_flags & VM_SPECIAL) && !is_vm_hugetlb_page(vma) &&
	       !vma_is_dax(vma) && !dsvm_vm_is_region(vma);
}

/*
 * Moves the pages of [start, end), inside one VMA, to new system pages:
 * migrate_vma_setup() unmaps them (its notifier call drops our entries)
 * and locks them; we copy each into a new locked page; migrate_vma_pages()
 * moves the struct page state; migrate_vma_finalize() maps the new pages
 * (or the old ones where that failed), unlocks both and drops the
 * references (ours on the new pages too). Holes and the zero page have no
 * source page and are left alone: nothing to move. Returns the number of
 * pages moved or -errno. mmap_lock is held for read.
 */
static long dsvm_mirror_migrate_vma(struct vm_area_struct *vma,
				    unsigned long start, unsigned long end,
				    unsigned long *src, unsigned long *dst)
{
	struct migrate_vma args = {
		.vma = vma,
		.src = src,
		.dst = dst,
		.start = start,
		.end = end,
		.pgmap_owner = &dsvm_mirror_owner,
		.flags = MIGRATE_VMA_SELECT_SYSTEM,
	};
	struct page *spage, *dpage;
	unsigned long i;
	long moved = 0;
	int ret;

	ret = migrate_vma_setup(&args);
	if (ret)
		return ret;
	for (i = 0; i < args.npages; i++) {
		dst[i] = 0;
		spage = migrate_pfn_to_page(src[i]);
		if (!spage || !(src[i] & MIGRATE_PFN_MIGRATE))
			continue;
		dpage = alloc_page_vma(GFP_HIGHUSER_MOVABLE, vma,
				       start + (i << PAGE_SHIFT));
		if (!dpage)
			continue;	/* stays where it is */
		lock_page(dpage);
		copy_highpage(dpage, spage);
		dst[i] = migrate_pfn(page_to_pfn(dpage));
		if (src[i] & MIGRATE_PFN_WRITE)
			dst[i] |= MIGRATE_PFN_WRITE;
	}
	migrate_vma_pages(&args);
	for (i = 0; i < args.npages; i++) {
		if (dst[i] && (src[i] & MIGRATE_PFN_MIGRATE))
			moved++;
	}
	migrate_vma_finalize(&args);
	return moved;
}

/*
 * DSVM_IOC_MIRROR_MIGRATE: pages of VMAs that cannot migrate, and holes,
 * are skipped. Errors: -ENOENT, -EINVAL (range), -ESRCH, -EINTR, -ENOMEM;
 * pages moved before an error stay moved.
 */
int dsvm_mirror_migrate(struct dsvm_file *file, u64 id, u64 first, u64 count,
			u64 *migrated)
{
	unsigned long addr, end, next, *src;
	struct vm_area_struct *vma;
	struct dsvm_mirror *mirror;
	struct mm_struct *mm;
	long moved;
	int ret;

	*migrated = 0;
	src = kmalloc_array(2 * DSVM_MIRROR_MIGRATE_BATCH, sizeof(*src),
			    GFP_KERNEL);
	if (!src)
		return -ENOMEM;
	ret = dsvm_mirror_get_range(file, id, first, count, &mirror, &mm);
	if (ret)
		goto out_free;
	if (mmap_read_lock_killable(mm)) {
		ret = -EINTR;
		goto out_mmput;
	}
	addr = mirror->start + (first << PAGE_SHIFT);
	end = addr + (count << PAGE_SHIFT);
	while (addr < end) {
		vma = find_vma(mm, addr);
		if (!vma || vma->vm_start >= end)
			break;
		addr = max(addr, vma->vm_start);
		next = min3(end, vma->vm_end,
			    addr + (DSVM_MIRROR_MIGRATE_BATCH << PAGE_SHIFT));
		if (dsvm_mirror_vma_migratable(vma)) {
			moved = dsvm_mirror_migrate_vma(vma, addr, next, src,
							src + DSVM_MIRROR_MIGRATE_BATCH);
			if (moved < 0) {
				ret = moved;
				break;
			}
			*migrated += moved;
			atomic64_add(moved, &dsvm_counters.mirror_migrated);
		}
		addr = next;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
	}
	mmap_read_unlock(mm);
out_mmput:
	mmput(mm);
	mutex_unlock(&file->mirrors_lock);
out_free:
	kfree(src);
	return ret;
}
