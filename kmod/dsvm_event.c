// SPDX-License-Identifier: GPL-2.0
/*
 * Fault events: how a fault the page table cannot resolve reaches the
 * daemon. The faulting thread raises an event (region, page, read / write /
 * upgrade, a sequence number) and sleeps on it; the daemon read()s events
 * from its control file, fetches the page from its home and answers with
 * a change of the page (install, upgrade, ...), which wakes the sleepers.
 *
 * One event per (region, page, kind) is pending at a time: a fault that
 * finds one waits on it instead of raising another, so the queue is
 * bounded by the regions' size and the daemon never sees a duplicate of an
 * event it has not answered. An event is pending from the fault that
 * raises it until the next change of its page or the region's destruction,
 * whether the daemon has read it or not; its sleepers then look at the
 * table again and raise a new event if they still need one. That rule is
 * simple to keep free of lost wake-ups (dsvm_internal.h) and never leaves a
 * thread waiting for an answer the daemon has already given.
 *
 * Mirror invalidation events (dsvm_mirror.c) travel the same read() and
 * poll(), on the file that registered the mirror: each mirror has at most
 * one queued, a page range that later drops widen until it is read, so
 * none is lost and a file's queue is bounded by its mirrors. They are not
 * faults: nobody sleeps on them, and reading one takes it off the queue.
 *
 * Locking: dsvm_events_lock (a spinlock, taken inside the page lock and
 * inside mirror->lock) guards the pending table, every region's list of
 * events, the read queue, the sequence numbers and every file's queue of
 * mirror events. See the top of dsvm_internal.h for the order.
 */
#include <linux/hash.h>
#include <linux/hashtable.h>
#include <linux/moduleparam.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>

#include "dsvm_internal.h"

#define DSVM_EVENTS_HASH_BITS 10

/* Events copied out per trip through dsvm_events_lock in read(). */
#define DSVM_EVENTS_READ_BATCH 64UL

static DEFINE_SPINLOCK(dsvm_events_lock);
/* (region, page, kind) -> pending struct dsvm_event. */
static DEFINE_HASHTABLE(dsvm_events_pending, DSVM_EVENTS_HASH_BITS);
static u64 dsvm_events_seq;
/* Mirror events count on their own, so that seq of faults = stats.events. */
static u64 dsvm_mirror_events_seq;
/*
 * read() and poll() of every file wait here. One queue for all: readers
 * are the daemons and mirror users of one host, a handful, and each looks
 * only at its own queues when woken.
 */
static DECLARE_WAIT_QUEUE_HEAD(dsvm_events_readers);

/*
 * The bound on pending fault events, per domain (daemon): a fault that
 * would raise one more waits (killably) until an answer makes room, so the
 * kernel memory faulting processes pin is bounded whatever the regions'
 * size. Joining a pending event needs no room. Per domain, so that a
 * daemon that stops answering (or whose clients pile up faults) fills its
 * own budget only and never holds another daemon's faults; the node-wide
 * bound is this times the domains (DSVM_DOMAINS_MAX).
 */
static unsigned int max_pending_events = 16384;
module_param(max_pending_events, uint, 0644);
MODULE_PARM_DESC(max_pending_events,
		 "fault events pending at once per control domain (daemon) (min 1)");
static DECLARE_WAIT_QUEUE_HEAD(dsvm_events_room);

static bool dsvm_events_have_room(struct dsvm_domain *domain)
{
	return READ_ONCE(domain->pending) <
	       max_t(unsigned int, READ_ONCE(max_pending_events), 1);
}

static unsigned long dsvm_event_key(struct dsvm_region *region,
				    unsigned long index, u32 kind)
{
	return (unsigned long)region ^ (index << 2 | kind);
}

static struct dsvm_event *dsvm_event_find(struct dsvm_region *region,
					  unsigned long index, u32 kind)
{
	struct dsvm_event *event;

	lockdep_assert_held(&dsvm_events_lock);
	hash_for_each_possible(dsvm_events_pending, event, hnode,
			       dsvm_event_key(region, index, kind)) {
		if (event->region == region && event->msg.page_index == index &&
		    event->msg.kind == kind)
			return event;
	}
	return NULL;
}

/* The event a fault needs now, or 0 when the table resolves it. */
static u32 dsvm_event_kind(struct dsvm_region *region, unsigned long index,
			   bool write)
{
	if (!xa_load(&region->pages, index))
		return write ? DSVM_FAULT_WRITE : DSVM_FAULT_READ;
	if (write && !xa_get_mark(&region->pages, index, DSVM_MARK_MODIFIED))
		return DSVM_FAULT_UPGRADE;
	return 0;
}

void dsvm_event_put(struct dsvm_event *event)
{
	if (refcount_dec_and_test(&event->ref))
		kfree(event);
}

/*
 * Raises the event a fault on page index needs, or finds the one pending,
 * and returns it with a reference for the caller to wait on. Returns NULL
 * when the table resolves the fault now (it changed since the caller
 * looked), ERR_PTR(-ENOENT) when the fault must get SIGBUS (the region is
 * destroyed, or was not created by the control file), ERR_PTR(-EHWPOISON)
 * when it must get SIGBUS because the page is poisoned, ERR_PTR(-EBUSY)
 * when the region's domain has max_pending_events pending (wait with
 * dsvm_event_wait_room(),
 * then look again), ERR_PTR(-ENOMEM).
 */
struct dsvm_event *dsvm_event_raise(struct dsvm_region *region,
				    unsigned long index, bool write)
{
	struct dsvm_event *event, *fresh;
	bool queued = false;
	u32 kind;

	/* Set at creation, before the region could be mapped. */
	if (!region->control)
		return ERR_PTR(-ENOENT);
	/* Charged to the faulting task: the queue grows with its faults. */
	fresh = kzalloc(sizeof(*fresh), GFP_KERNEL_ACCOUNT);
	if (!fresh)
		return ERR_PTR(-ENOMEM);

	spin_lock(&dsvm_events_lock);
	/* Destroy marks the region dead before it answers every event. */
	if (READ_ONCE(region->dead)) {
		event = ERR_PTR(-ENOENT);
		goto out_unlock;
	}
	/* Every change answers under this lock after it is made. */
	kind = dsvm_event_kind(region, index, write);
	if (!kind) {
		event = NULL;
		goto out_unlock;
	}
	/*
	 * Poison answers the events it finds under this lock after it is set,
	 * so a sleeper it wakes comes back here and sees it. (An upgrade is
	 * for an installed page, which is never poisoned.)
	 */
	if (kind != DSVM_FAULT_UPGRADE && xa_load(&region->poisoned, index)) {
		event = ERR_PTR(-EHWPOISON);
		goto out_unlock;
	}
	event = dsvm_event_find(region, index, kind);
	if (event) {
		refcount_inc(&event->ref);
		goto out_unlock;
	}
	if (!dsvm_events_have_room(region->domain)) {
		event = ERR_PTR(-EBUSY);
		goto out_unlock;
	}

	event = fresh;
	fresh = NULL;
	refcount_set(&event->ref, 2);	/* the pending table's and ours */
	init_waitqueue_head(&event->waiters);
	event->region = region;
	event->msg.region_id = region->id;
	event->msg.page_index = index;
	event->msg.kind = kind;
	event->msg.seq = ++dsvm_events_seq;
	hash_add(dsvm_events_pending, &event->hnode,
		 dsvm_event_key(region, index, kind));
	list_add_tail(&event->region_link, &region->events);
	/* Not dead, so the domain's control file has not let it go. */
	list_add_tail(&event->queue_link, &region->domain->events);
	atomic64_inc(&dsvm_counters.events);
	atomic64_inc(&dsvm_counters.events_pending);
	WRITE_ONCE(region->domain->pending, region->domain->pending + 1);
	queued = true;
out_unlock:
	spin_unlock(&dsvm_events_lock);
	kfree(fresh);
	if (queued)
		wake_up_interruptible_poll(&dsvm_events_readers,
					   EPOLLIN | EPOLLRDNORM);
	return event;
}

/*
 * Sleeps until fewer than max_pending_events of the domain are pending or
 * a fatal signal comes; returns 0 or -ERESTARTSYS. The caller holds a
 * reference to the domain. (No event is raised meanwhile: the caller looks
 * at the table again, which may have changed.)
 */
int dsvm_event_wait_room(struct dsvm_domain *domain)
{
	return wait_event_killable(dsvm_events_room, dsvm_events_have_room(domain));
}

/*
 * Sleeps until the event is answered or a fatal signal comes; returns 0 or
 * -ERESTARTSYS. Killable, not interruptible: the paths that wait holding
 * mmap_lock (.page_mkwrite, faults that may not retry) could only answer a
 * handled signal with SIGBUS.
 */
int dsvm_event_wait(struct dsvm_event *event)
{
	return wait_event_killable(event->waiters, READ_ONCE(event->answered));
}

static void dsvm_event_answer(struct dsvm_event *event)
{
	lockdep_assert_held(&dsvm_events_lock);
	hash_del(&event->hnode);
	list_del(&event->region_link);
	/* Not read yet: the daemon never sees it. */
	list_del_init(&event->queue_link);
	WRITE_ONCE(event->answered, true);
	wake_up_all(&event->waiters);
	atomic64_dec(&dsvm_counters.events_pending);
	WRITE_ONCE(event->region->domain->pending, event->region->domain->pending - 1);
	/* Sleepers of every domain wait here; each looks at its own. */
	if (waitqueue_active(&dsvm_events_room))
		wake_up_all(&dsvm_events_room);
	/* The pending table's reference; sleepers hold their own. */
	dsvm_event_put(event);
}

/*
 * Answers the pending events of page index; called by every writer after
 * it changed the page's entry or state (and unmapped it, if it does).
 */
void dsvm_event_answer_page(struct dsvm_region *region, unsigned long index)
{
	struct dsvm_event *event;
	u32 kind;

	if (!region->control)
		return;
	spin_lock(&dsvm_events_lock);
	for (kind = DSVM_FAULT_READ; kind <= DSVM_FAULT_UPGRADE; kind++) {
		event = dsvm_event_find(region, index, kind);
		if (event)
			dsvm_event_answer(event);
	}
	spin_unlock(&dsvm_events_lock);
}

/*
 * DSVM_IOC_PAGE_WAKE: answers the pending events of pages first..last with
 * no change to them; the sleepers look at the table again and raise a new
 * event if they still need one. Returns how many events were answered.
 * Walks the region's pending events (at most max_pending_events), not the
 * range: a range of 2^28 pages took seconds, unkillable.
 */
unsigned long dsvm_event_wake_range(struct dsvm_region *region,
				    unsigned long first, unsigned long last)
{
	struct dsvm_event *event, *next;
	unsigned long done = 0;

	if (!region->control)
		return 0;
	spin_lock(&dsvm_events_lock);
	list_for_each_entry_safe(event, next, &region->events, region_link) {
		if (event->msg.page_index < first || event->msg.page_index > last)
			continue;
		dsvm_event_answer(event);
		done++;
	}
	spin_unlock(&dsvm_events_lock);
	return done;
}

/*
 * Answers every event of a region marked dead: the sleepers retry and get
 * SIGBUS, and no event is raised for it again.
 */
void dsvm_event_answer_region(struct dsvm_region *region)
{
	struct dsvm_event *event, *next;

	WARN_ON_ONCE(!READ_ONCE(region->dead));
	spin_lock(&dsvm_events_lock);
	list_for_each_entry_safe(event, next, &region->events, region_link)
		dsvm_event_answer(event);
	spin_unlock(&dsvm_events_lock);
}

/*
 * Queues an invalidation event for pages [first, last] of a mirror, or
 * widens the one queued and not yet read. Called by the notifier under
 * mirror->lock: no allocation (the event lives in the mirror).
 */
void dsvm_event_mirror_queue(struct dsvm_mirror *mirror, unsigned long first,
			     unsigned long last)
{
	lockdep_assert_held(&mirror->lock);
	spin_lock(&dsvm_events_lock);
	if (list_empty(&mirror->event_link)) {
		mirror->event_first = first;
		mirror->event_last = last;
		list_add_tail(&mirror->event_link, &mirror->owner->mirror_events);
		atomic64_inc(&dsvm_counters.mirror_events);
	} else {
		mirror->event_first = min(mirror->event_first, first);
		mirror->event_last = max(mirror->event_last, last);
	}
	/* A reader that copied the narrower range must not dequeue this one. */
	mirror->event_seq = ++dsvm_mirror_events_seq;
	spin_unlock(&dsvm_events_lock);
	wake_up_interruptible_poll(&dsvm_events_readers, EPOLLIN | EPOLLRDNORM);
}

/* Drops a mirror's queued event; the mirror's notifier is gone already. */
void dsvm_event_mirror_cancel(struct dsvm_mirror *mirror)
{
	spin_lock(&dsvm_events_lock);
	list_del_init(&mirror->event_link);
	spin_unlock(&dsvm_events_lock);
}

/* Whether read() has something for this file. Lockless: a hint for waits. */
static bool dsvm_event_ready(struct dsvm_file *file, bool control)
{
	return (control && !list_empty(&file->domain->events)) ||
	       !list_empty(&file->mirror_events);
}

/*
 * Takes off the file's queue the mirror events whose seq is among the n
 * copied ones: a mirror whose event was widened since the copy has a new
 * seq and stays queued, so the reader gets the wider range later.
 */
static void dsvm_event_mirror_dequeue(struct dsvm_file *file,
				      const struct dsvm_fault_event *batch,
				      size_t n)
{
	struct dsvm_mirror *mirror, *next;
	size_t i;

	lockdep_assert_held(&dsvm_events_lock);
	list_for_each_entry_safe(mirror, next, &file->mirror_events, event_link) {
		for (i = 0; i < n; i++) {
			if (batch[i].kind == DSVM_FAULT_MIRROR_INVALIDATE &&
			    batch[i].seq == mirror->event_seq) {
				list_del_init(&mirror->event_link);
				break;
			}
		}
	}
}

/*
 * read(): up to count / sizeof(struct dsvm_fault_event) events, the
 * control file's fault events (its domain's) oldest first, then the file's mirror events
 * oldest first. Events are copied out before they are taken off the
 * queue, so a failed copy loses none; the file's read mutex keeps a second
 * reader from copying the same ones meanwhile. New fault events go to the
 * tail with a higher seq and answers only remove, so what was copied is
 * still a prefix of the queue (less the events answered since, which are
 * gone); mirror events are matched by seq (dsvm_event_mirror_dequeue()).
 * A file that is neither the control file nor ever registered a mirror
 * gets -EPERM: nothing can come to it.
 */
ssize_t dsvm_event_read(struct file *filp, char __user *buf, size_t count,
			loff_t *ppos)
{
	size_t want = count / sizeof(struct dsvm_fault_event), done = 0;
	struct dsvm_file *file = filp->private_data;
	struct dsvm_fault_event *batch;
	bool control;
	ssize_t ret;

	control = smp_load_acquire(&file->control);
	if (!control && !READ_ONCE(file->mirror_reader))
		return -EPERM;
	if (!want)
		return -EINVAL;
	batch = kmalloc_array(min(want, DSVM_EVENTS_READ_BATCH), sizeof(*batch),
			      GFP_KERNEL);
	if (!batch)
		return -ENOMEM;
	if (mutex_lock_interruptible(&file->read_mutex)) {
		ret = -EINTR;
		goto out_free;
	}

	while (done < want) {
		size_t n = 0, max = min(want - done, DSVM_EVENTS_READ_BATCH);
		struct dsvm_mirror *mirror;
		struct dsvm_event *event;
		u64 last = 0;	/* seq of the last fault event copied */

		spin_lock(&dsvm_events_lock);
		if (control) {
			list_for_each_entry(event, &file->domain->events, queue_link) {
				if (n == max)
					break;
				batch[n++] = event->msg;
				last = event->msg.seq;
			}
		}
		list_for_each_entry(mirror, &file->mirror_events, event_link) {
			if (n == max)
				break;
			batch[n++] = (struct dsvm_fault_event){
				.region_id = mirror->id,
				.page_index = mirror->event_first,
				.seq = mirror->event_seq,
				.kind = DSVM_FAULT_MIRROR_INVALIDATE,
				.count = mirror->event_last - mirror->event_first + 1,
			};
		}
		spin_unlock(&dsvm_events_lock);

		if (!n) {
			if (done)
				break;
			if (filp->f_flags & O_NONBLOCK) {
				ret = -EAGAIN;
				goto out_unlock;
			}
			ret = wait_event_interruptible(dsvm_events_readers,
						       dsvm_event_ready(file, control));
			if (ret)
				goto out_unlock;
			continue;
		}

		/* No spinlock: the buffer may be a dsvm mapping that faults. */
		if (copy_to_user(buf + done * sizeof(*batch), batch,
				 n * sizeof(*batch))) {
			if (!done) {
				ret = -EFAULT;
				goto out_unlock;
			}
			break;
		}

		spin_lock(&dsvm_events_lock);
		while (last && !list_empty(&file->domain->events)) {
			event = list_first_entry(&file->domain->events,
						 struct dsvm_event, queue_link);
			if (event->msg.seq > last)
				break;
			/* Still pending: faults on the page keep waiting on it. */
			list_del_init(&event->queue_link);
		}
		dsvm_event_mirror_dequeue(file, batch, n);
		spin_unlock(&dsvm_events_lock);
		done += n;
	}
	ret = done * sizeof(*batch);

out_unlock:
	mutex_unlock(&file->read_mutex);
out_free:
	kfree(batch);
	return ret;
}

/*
 * poll(): readable while an event for this file is queued; POLLERR on a
 * file that read() refuses.
 */
__poll_t dsvm_event_poll(struct file *filp, struct poll_table_struct *wait)
{
	struct dsvm_file *file = filp->private_data;
	bool control = smp_load_acquire(&file->control);

	if (!control && !READ_ONCE(file->mirror_reader))
		return EPOLLERR;
	poll_wait(filp, &dsvm_events_readers, wait);
	return dsvm_event_ready(file, control) ? EPOLLIN | EPOLLRDNORM : 0;
}
