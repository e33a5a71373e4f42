// SPDX-License-Identifier: GPL-2.0
/*
 * dsvm.ko: the node-side kernel module of dsvm (distributed shared virtual
 * memory). It creates /dev/dsvm: the node daemon uses it as its control
 * channel (regions, the per-page table), client processes map regions
 * through it, and faults on pages the node holds are resolved in the
 * kernel. docs/KMOD.md describes it; kmod/uapi/dsvm_uapi.h is the ABI.
 *
 * This file: module init and exit, the device, and the ioctls, which
 * validate everything user space passes before anything else sees it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/overflow.h>
#include <linux/pseudo_fs.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "dsvm_internal.h"

#define DSVM_FS_MAGIC 0x6473766d	/* "dsvm" */

#define DSVM_FEATURES (DSVM_FEATURE_REGIONS | DSVM_FEATURE_STATS | \
		       DSVM_FEATURE_EVENTS | DSVM_FEATURE_WRITEBACK | \
		       DSVM_FEATURE_POISON | DSVM_FEATURE_MIRROR | \
		       DSVM_FEATURE_WAKE | DSVM_FEATURE_DOMAINS)

struct dsvm_counters dsvm_counters;
struct address_space *dsvm_mapping;

static struct vfsmount *dsvm_mnt;
static struct inode *dsvm_inode;

static int dsvm_fs_init_fs_context(struct fs_context *fc)
{
	return init_pseudo(fc, DSVM_FS_MAGIC) ? 0 : -ENOMEM;
}

/*
 * A private pseudo filesystem holding one inode whose address_space all
 * open files share (as DRM does). No .owner: the mount lives from init to
 * exit, and a module reference held by it would make rmmod impossible.
 */
static struct file_system_type dsvm_fs_type = {
	.name = "dsvm",
	.init_fs_context = dsvm_fs_init_fs_context,
	.kill_sb = kill_anon_super,
};

static int dsvm_open(struct inode *inode, struct file *filp)
{
	struct dsvm_file *file;

	file = kzalloc(sizeof(*file), GFP_KERNEL);
	if (!file)
		return -ENOMEM;
	INIT_LIST_HEAD(&file->regions);
	file->domain = &dsvm_domain_plain;
	mutex_init(&file->read_mutex);
	dsvm_file_init_mirrors(file);
	/*
	 * Every open shares one address_space, whatever device node it came
	 * through (a container's mknod'ed /dev/dsvm has an inode of its own),
	 * so unmap_mapping_range() reaches every mapping of a page.
	 */
	filp->f_mapping = dsvm_mapping;
	filp->private_data = file;
	return 0;
}

static int dsvm_release(struct inode *inode, struct file *filp)
{
	struct dsvm_file *file = filp->private_data;

	dsvm_file_destroy_regions(file);
	dsvm_file_destroy_mirrors(file);
	dsvm_file_put_domain(file);
	mutex_destroy(&file->read_mutex);
	kfree(file);
	return 0;
}

/*
 * A failed HELLO leaves the file as it was; the out fields are written
 * even on -EPROTO so that the caller can report what it found.
 */
static long dsvm_ioctl_hello(struct dsvm_file *file,
			     struct dsvm_hello __user *uarg)
{
	struct dsvm_hello req;
	int ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if ((req.flags & ~DSVM_HELLO_CONTROL) || req.reserved)
		return -EINVAL;
	req.module_version = DSVM_ABI_VERSION;
	req.features = DSVM_FEATURES;
	if (copy_to_user(uarg, &req, sizeof(req)))
		return -EFAULT;
	if (req.user_version != DSVM_ABI_VERSION)
		return -EPROTO;
	if (req.flags & DSVM_HELLO_CONTROL) {
		ret = dsvm_control_claim(file);
		if (ret)
			return ret;
	}
	WRITE_ONCE(file->hello_done, true);
	return 0;
}

static long dsvm_ioctl_stats(struct dsvm_stats __user *uarg)
{
	struct dsvm_stats stats = {
		.regions = atomic64_read(&dsvm_counters.regions),
		.pages = atomic64_read(&dsvm_counters.pages),
		.mappings = atomic64_read(&dsvm_counters.mappings),
		.faults = atomic64_read(&dsvm_counters.faults),
		.mkwrites = atomic64_read(&dsvm_counters.mkwrites),
		.refused = atomic64_read(&dsvm_counters.refused),
		.events = atomic64_read(&dsvm_counters.events),
		.events_pending = atomic64_read(&dsvm_counters.events_pending),
	};

	return copy_to_user(uarg, &stats, sizeof(stats)) ? -EFAULT : 0;
}

static long dsvm_ioctl_region_create(struct dsvm_file *file,
				     struct dsvm_region_create __user *uarg)
{
	struct dsvm_region_create req;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.region_id || req.flags || req.reserved[0] || req.reserved[1])
		return -EINVAL;
	if (req.page_size != DSVM_PAGE_SIZE_4K)
		return -EINVAL;
	if (!req.base || !IS_ALIGNED(req.base, req.page_size))
		return -EINVAL;
	if (!req.size || req.size > DSVM_REGION_SIZE_MAX ||
	    !IS_ALIGNED(req.size, req.page_size))
		return -EINVAL;
	/* size <= DSVM_REGION_SIZE_MAX < TASK_SIZE_MAX: no underflow. */
	if (req.base > TASK_SIZE_MAX - req.size)
		return -EINVAL;
	return dsvm_region_create(file, &req);
}

static long dsvm_ioctl_region_destroy(struct dsvm_file *file,
				      struct dsvm_region_destroy __user *uarg)
{
	struct dsvm_region_destroy req;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.region_id || req.reserved)
		return -EINVAL;
	return dsvm_region_destroy(file, req.region_id);
}

static long dsvm_ioctl_page_install(struct dsvm_file *file,
				    struct dsvm_page_install __user *uarg)
{
	struct dsvm_page_install req;
	struct dsvm_region *region;
	struct page *page;
	bool zero;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.region_id || req.reserved[0] || req.reserved[1])
		return -EINVAL;
	if (req.state != DSVM_PAGE_STATE_SHARED &&
	    req.state != DSVM_PAGE_STATE_MODIFIED)
		return -EINVAL;
	if (req.flags & ~DSVM_PAGE_INSTALL_ZERO)
		return -EINVAL;
	zero = req.flags & DSVM_PAGE_INSTALL_ZERO;
	if (zero != !req.data)
		return -EINVAL;

	region = dsvm_region_get(file, req.region_id);
	if (!region)
		return -ENOENT;
	if (req.page_index >= region->npages) {
		ret = -EINVAL;
		goto out_put_region;
	}

	page = alloc_page(GFP_HIGHUSER | (zero ? __GFP_ZERO : 0));
	if (!page) {
		ret = -ENOMEM;
		goto out_put_region;
	}
	if (!zero) {
		void *dst = kmap_local_page(page);
		unsigned long left;

		/* No lock held: the source may itself be a dsvm mapping. */
		left = copy_from_user(dst, u64_to_user_ptr(req.data), PAGE_SIZE);
		kunmap_local(dst);
		if (left) {
			ret = -EFAULT;
			goto err_free_page;
		}
	}
	ret = dsvm_page_install(region, req.page_index, page,
				req.state == DSVM_PAGE_STATE_MODIFIED);
	if (ret)
		goto err_free_page;
	goto out_put_region;

err_free_page:
	put_page(page);
out_put_region:
	dsvm_region_put(region);
	return ret;
}

/*
 * DSVM_IOC_PAGE_INVALIDATE, DSVM_IOC_PAGE_DOWNGRADE, DSVM_IOC_PAGE_UPGRADE,
 * DSVM_IOC_PAGE_POISON, DSVM_IOC_PAGE_WAKE.
 */
static long dsvm_ioctl_page_range(struct dsvm_file *file,
				  struct dsvm_page_range __user *uarg,
				  unsigned int cmd)
{
	struct dsvm_page_range req;
	struct dsvm_region *region;
	unsigned long last, done;
	long ret = 0;
	u64 end;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.region_id || !req.count || req.reserved[0] || req.reserved[1])
		return -EINVAL;
	if (check_add_overflow(req.first, req.count, &end))
		return -EINVAL;

	region = dsvm_region_get(file, req.region_id);
	if (!region)
		return -ENOENT;
	if (end > region->npages) {
		dsvm_region_put(region);
		return -EINVAL;
	}
	last = end - 1;
	switch (cmd) {
	case DSVM_IOC_PAGE_INVALIDATE:
		done = dsvm_page_invalidate(region, req.first, last);
		break;
	case DSVM_IOC_PAGE_DOWNGRADE:
		done = dsvm_page_downgrade(region, req.first, last);
		break;
	case DSVM_IOC_PAGE_UPGRADE:
		done = dsvm_page_upgrade(region, req.first, last);
		break;
	case DSVM_IOC_PAGE_WAKE:
		done = dsvm_event_wake_range(region, req.first, last);
		break;
	default:
		ret = dsvm_page_poison(region, req.first, last, &done);
		break;
	}
	dsvm_region_put(region);
	if (ret)
		return ret;

	if (put_user((u64)done, &uarg->done))
		return -EFAULT;
	return 0;
}

static long dsvm_ioctl_page_writeback(struct dsvm_file *file,
				      struct dsvm_page_writeback __user *uarg)
{
	const u32 known = DSVM_PAGE_WRITEBACK_DOWNGRADE |
			  DSVM_PAGE_WRITEBACK_INVALIDATE;
	struct dsvm_page_writeback req;
	struct dsvm_region *region;
	bool dirty;
	u32 state;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.region_id || !req.data || req.reserved32 ||
	    req.reserved[0] || req.reserved[1])
		return -EINVAL;
	if ((req.flags & ~known) || req.flags == known)
		return -EINVAL;

	region = dsvm_region_get(file, req.region_id);
	if (!region)
		return -ENOENT;
	if (req.page_index >= region->npages)
		ret = -EINVAL;
	else
		ret = dsvm_page_writeback(region, req.page_index,
					  u64_to_user_ptr(req.data), req.flags,
					  &state, &dirty);
	dsvm_region_put(region);
	if (ret)
		return ret;
	if (put_user(state, &uarg->state) || put_user(dirty, &uarg->dirty))
		return -EFAULT;
	return 0;
}

static const struct file_operations dsvm_fops;

/*
 * DSVM_IOC_ATTACH, on a control file: the /dev/dsvm file behind fd becomes
 * a client of the caller's domain. Errors: -EPERM (the caller is not a
 * control file), -EINVAL (a reserved field, fd not /dev/dsvm, or the
 * caller's own file), -EBADF, -EBUSY (dsvm_domain_attach()).
 */
static long dsvm_ioctl_attach(struct dsvm_file *file,
			      struct dsvm_attach __user *uarg)
{
	struct dsvm_attach req;
	struct file *client;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.flags || req.reserved)
		return -EINVAL;
	if (!smp_load_acquire(&file->control))
		return -EPERM;
	client = fget(req.fd);
	if (!client)
		return -EBADF;
	if (client->f_op != &dsvm_fops || client->private_data == file)
		ret = -EINVAL;
	else
		ret = dsvm_domain_attach(file, client->private_data);
	fput(client);
	return ret;
}

static long dsvm_ioctl_mirror_register(struct dsvm_file *file,
				       struct dsvm_mirror_register __user *uarg)
{
	struct dsvm_mirror_register req;
	u64 id;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.flags || req.reserved32 || req.reserved[0] || req.reserved[1])
		return -EINVAL;
	if (!PAGE_ALIGNED(req.start) || !PAGE_ALIGNED(req.length))
		return -EINVAL;
	if (!req.length || req.length > DSVM_MIRROR_SIZE_MAX)
		return -EINVAL;
	/* length <= DSVM_MIRROR_SIZE_MAX < TASK_SIZE: no underflow. */
	if (req.start > TASK_SIZE - req.length)
		return -EINVAL;
	ret = dsvm_mirror_register(file, req.start, req.length, &id);
	if (ret)
		return ret;
	/* The mirror stays: the file owns it, and close ends it. */
	if (put_user(id, &uarg->mirror_id))
		return -EFAULT;
	return 0;
}

static long dsvm_ioctl_mirror_unregister(struct dsvm_file *file,
					 struct dsvm_mirror_unregister __user *uarg)
{
	struct dsvm_mirror_unregister req;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.mirror_id || req.reserved)
		return -EINVAL;
	return dsvm_mirror_unregister(file, req.mirror_id);
}

static long dsvm_ioctl_mirror_snapshot(struct dsvm_file *file,
				       struct dsvm_mirror_snapshot __user *uarg)
{
	const u32 known = DSVM_MIRROR_SNAPSHOT_FAULT | DSVM_MIRROR_SNAPSHOT_WRITE;
	struct dsvm_mirror_snapshot req;
	u64 present, writable;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.mirror_id || !req.count || req.reserved32 ||
	    req.reserved[0] || req.reserved[1])
		return -EINVAL;
	/* HMM_PFN_REQ_WRITE must come with HMM_PFN_REQ_FAULT. */
	if ((req.flags & ~known) || req.flags == DSVM_MIRROR_SNAPSHOT_WRITE)
		return -EINVAL;
	ret = dsvm_mirror_snapshot(file, req.mirror_id, req.first, req.count,
				   req.flags, &present, &writable);
	if (ret)
		return ret;
	if (put_user(present, &uarg->present) ||
	    put_user(writable, &uarg->writable))
		return -EFAULT;
	return 0;
}

static long dsvm_ioctl_mirror_read(struct dsvm_file *file,
				   struct dsvm_mirror_read __user *uarg)
{
	struct dsvm_mirror_read req;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.mirror_id || !req.data || req.flags || req.reserved32 ||
	    req.reserved[0] || req.reserved[1])
		return -EINVAL;
	return dsvm_mirror_read(file, req.mirror_id, req.page_index,
				u64_to_user_ptr(req.data));
}

static long dsvm_ioctl_mirror_migrate(struct dsvm_file *file,
				      struct dsvm_mirror_migrate __user *uarg)
{
	struct dsvm_mirror_migrate req;
	u64 migrated;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!req.mirror_id || !req.count || req.flags || req.reserved32 ||
	    req.reserved[0] || req.reserved[1])
		return -EINVAL;
	ret = dsvm_mirror_migrate(file, req.mirror_id, req.first, req.count,
				  &migrated);
	if (ret)
		return ret;
	if (put_user(migrated, &uarg->migrated))
		return -EFAULT;
	return 0;
}

static long dsvm_ioctl_mirror_stats(struct dsvm_mirror_stats __user *uarg)
{
	struct dsvm_mirror_stats stats = {
		.mirrors = atomic64_read(&dsvm_counters.mirrors),
		.entries = atomic64_read(&dsvm_counters.mirror_entries),
		.invalidations = atomic64_read(&dsvm_counters.mirror_invalidations),
		.dropped = atomic64_read(&dsvm_counters.mirror_dropped),
		.events = atomic64_read(&dsvm_counters.mirror_events),
		.migrated = atomic64_read(&dsvm_counters.mirror_migrated),
	};

	return copy_to_user(uarg, &stats, sizeof(stats)) ? -EFAULT : 0;
}

static long dsvm_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct dsvm_file *file = filp->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case DSVM_IOC_HELLO:
		return dsvm_ioctl_hello(file, uarg);
	case DSVM_IOC_STATS:
	case DSVM_IOC_MIRROR_STATS:
		break;
	case DSVM_IOC_MIRROR_REGISTER:
	case DSVM_IOC_MIRROR_UNREGISTER:
	case DSVM_IOC_MIRROR_SNAPSHOT:
	case DSVM_IOC_MIRROR_READ:
	case DSVM_IOC_MIRROR_MIGRATE:
		/*
		 * A mirror is its own file's, and an attached client file is
		 * one the daemon shares among its clients (and whose read() is
		 * refused): one client could read, move or drop another's
		 * mirror. Mirrors need a file of the process's own.
		 */
		if (READ_ONCE(file->attached))
			return READ_ONCE(file->hello_done) ? -EPERM : -EPROTO;
		break;
	case DSVM_IOC_REGION_CREATE:
	case DSVM_IOC_REGION_DESTROY:
	case DSVM_IOC_PAGE_INSTALL:
	case DSVM_IOC_PAGE_INVALIDATE:
	case DSVM_IOC_PAGE_DOWNGRADE:
	case DSVM_IOC_PAGE_UPGRADE:
	case DSVM_IOC_PAGE_WRITEBACK:
	case DSVM_IOC_PAGE_POISON:
	case DSVM_IOC_PAGE_WAKE:
		/*
		 * Table requests: each file works on its own domain's regions
		 * (dsvm_region_get() looks nowhere else); a client file only
		 * maps.
		 */
		if (READ_ONCE(file->attached))
			return READ_ONCE(file->hello_done) ? -EPERM : -EPROTO;
		break;
	case DSVM_IOC_ATTACH:
		break;
	default:
		return -ENOTTY;
	}

	if (!READ_ONCE(file->hello_done))
		return -EPROTO;

	switch (cmd) {
	case DSVM_IOC_STATS:
		return dsvm_ioctl_stats(uarg);
	case DSVM_IOC_REGION_CREATE:
		return dsvm_ioctl_region_create(file, uarg);
	case DSVM_IOC_REGION_DESTROY:
		return dsvm_ioctl_region_destroy(file, uarg);
	case DSVM_IOC_PAGE_INSTALL:
		return dsvm_ioctl_page_install(file, uarg);
	case DSVM_IOC_PAGE_INVALIDATE:
	case DSVM_IOC_PAGE_DOWNGRADE:
	case DSVM_IOC_PAGE_UPGRADE:
	case DSVM_IOC_PAGE_POISON:
	case DSVM_IOC_PAGE_WAKE:
		return dsvm_ioctl_page_range(file, uarg, cmd);
	case DSVM_IOC_PAGE_WRITEBACK:
		return dsvm_ioctl_page_writeback(file, uarg);
	case DSVM_IOC_ATTACH:
		return dsvm_ioctl_attach(file, uarg);
	case DSVM_IOC_MIRROR_REGISTER:
		return dsvm_ioctl_mirror_register(file, uarg);
	case DSVM_IOC_MIRROR_UNREGISTER:
		return dsvm_ioctl_mirror_unregister(file, uarg);
	case DSVM_IOC_MIRROR_SNAPSHOT:
		return dsvm_ioctl_mirror_snapshot(file, uarg);
	case DSVM_IOC_MIRROR_READ:
		return dsvm_ioctl_mirror_read(file, uarg);
	case DSVM_IOC_MIRROR_MIGRATE:
		return dsvm_ioctl_mirror_migrate(file, uarg);
	case DSVM_IOC_MIRROR_STATS:
		return dsvm_ioctl_mirror_stats(uarg);
	}
	return -ENOTTY;
}

static const struct file_operations dsvm_fops = {
	.owner = THIS_MODULE,
	.open = dsvm_open,
	.release = dsvm_release,
	.read = dsvm_event_read,
	.poll = dsvm_event_poll,
	.llseek = noop_llseek,
	.unlocked_ioctl = dsvm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = dsvm_vm_mmap,
};

static struct miscdevice dsvm_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "dsvm",
	.fops = &dsvm_fops,
	.mode = 0600,
};

static int __init dsvm_init(void)
{
	int ret;

	/* The UAPI layout: explicit sizes, no hidden padding. */
	BUILD_BUG_ON(sizeof(struct dsvm_hello) != 32);
	BUILD_BUG_ON(sizeof(struct dsvm_region_create) != 48);
	BUILD_BUG_ON(sizeof(struct dsvm_region_destroy) != 16);
	BUILD_BUG_ON(sizeof(struct dsvm_page_install) != 48);
	BUILD_BUG_ON(sizeof(struct dsvm_page_range) != 48);
	BUILD_BUG_ON(sizeof(struct dsvm_stats) != 64);
	BUILD_BUG_ON(sizeof(struct dsvm_fault_event) != 32);
	BUILD_BUG_ON(sizeof(struct dsvm_page_writeback) != 56);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_register) != 48);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_unregister) != 16);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_snapshot) != 64);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_read) != 48);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_migrate) != 56);
	BUILD_BUG_ON(sizeof(struct dsvm_mirror_stats) != 64);
	BUILD_BUG_ON(sizeof(struct dsvm_attach) != 16);
	/*
	 * A domain's offsets stay positive as loff_t, and its tag above every
	 * user address (TASK_SIZE_MAX is below 2^56 even with five-level
	 * paging; region create checks bases against it).
	 */
	BUILD_BUG_ON(DSVM_DOMAINS_MAX >= 64 || DSVM_DOMAIN_SHIFT != 57);
	/* A mirror event's count holds any mirror's page count. */
	BUILD_BUG_ON(DSVM_MIRROR_SIZE_MAX / DSVM_PAGE_SIZE_4K > U32_MAX);
	BUILD_BUG_ON(PAGE_SIZE != DSVM_PAGE_SIZE_4K);
	/* Region ids (u64) index an xarray (unsigned long). */
	BUILD_BUG_ON(sizeof(unsigned long) < sizeof(u64));

	dsvm_mnt = kern_mount(&dsvm_fs_type);
	if (IS_ERR(dsvm_mnt))
		return PTR_ERR(dsvm_mnt);
	dsvm_inode = alloc_anon_inode(dsvm_mnt->mnt_sb);
	if (IS_ERR(dsvm_inode)) {
		ret = PTR_ERR(dsvm_inode);
		goto err_unmount;
	}
	dsvm_mapping = dsvm_inode->i_mapping;

	ret = misc_register(&dsvm_misc);
	if (ret)
		goto err_put_inode;
	pr_info("/dev/dsvm ready, ABI %u\n", DSVM_ABI_VERSION);
	return 0;

err_put_inode:
	iput(dsvm_inode);
err_unmount:
	kern_unmount(dsvm_mnt);
	return ret;
}

static void __exit dsvm_exit(void)
{
	misc_deregister(&dsvm_misc);
	/*
	 * Every file held a module reference and destroyed its regions when
	 * it was closed; every VMA held its file.
	 */
	WARN_ON_ONCE(!dsvm_regions_empty());
	iput(dsvm_inode);
	kern_unmount(dsvm_mnt);
}

module_init(dsvm_init);
module_exit(dsvm_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dsvm: distributed shared virtual memory, node fault path");
