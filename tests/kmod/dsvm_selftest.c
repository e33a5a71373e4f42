// SPDX-License-Identifier: GPL-2.0
/*
 * dsvm_selftest: the UAPI tests of dsvm.ko, run inside the QEMU guest by
 * tests/kmod/run.sh (statically linked; the guest has only busybox).
 *
 * Output in the style of tools/testing/selftests: one line per case,
 * "ok N - name" or "not ok N - name", diagnostics on "# " lines, the plan
 * "1..N" last. Exit status 0 when every case passed.
 *
 * Every case leaves the module as it found it (regions destroyed, mappings
 * gone), so the last cases can check that the module's counters are back
 * to 0 and that no warning tainted the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dsvm_uapi.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PAGE 4096UL

/* Region bases: far from the heap, the stack and glibc's mmap area. */
#define BASE_FUNC	0x600000000000UL
#define BASE_THREADS	0x610000000000UL
#define BASE_DESTROY	0x620000000000UL
#define BASE_OWNER	0x630000000000UL
#define BASE_SPLIT	0x640000000000UL
#define BASE_LEAK	0x650000000000UL
#define BASE_VALID	0x660000000000UL
#define BASE_EVENTS	0x670000000000UL

static int tests_run, tests_failed;

static void result(bool ok, const char *fmt, ...)
{
	va_list ap;

	tests_run++;
	if (!ok)
		tests_failed++;
	printf("%sok %d - ", ok ? "" : "not ", tests_run);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void diag(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* ioctl returning 0 or -errno. */
static int xioctl(int fd, unsigned long cmd, void *arg)
{
	return ioctl(fd, cmd, arg) ? -errno : 0;
}

/* A case that expects a given result (0 or -errno) from an ioctl. */
static void expect(int got, int want, const char *name)
{
	if (got != want)
		diag("%s: got %d (%s), want %d (%s)", name, got,
		     strerror(-got), want, strerror(-want));
	result(got == want, "%s", name);
}

/* ---- SIGBUS probes ---------------------------------------------------- */

/* volatile: the stores around the accesses must not be reordered or dropped. */
static __thread sigjmp_buf *volatile probe_env;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	if (probe_env)
		siglongjmp(*probe_env, 1);
	/* Not inside a probe: a real failure. */
	static const char msg[] = "# unexpected SIGBUS\n";
	write(1, msg, sizeof(msg) - 1);
	_exit(98);
}

static void install_sigbus_handler(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGBUS, &sa, NULL);
}

/* Copies len bytes from src; returns false on SIGBUS. */
static bool probe_read(const volatile void *src, void *dst, size_t len)
{
	sigjmp_buf env;

	if (sigsetjmp(env, 1)) {
		probe_env = NULL;
		return false;
	}
	probe_env = &env;
	for (size_t i = 0; i < len / 8; i++)
		((uint64_t *)dst)[i] = ((const volatile uint64_t *)src)[i];
	probe_env = NULL;
	return true;
}

/* Stores len bytes to dst; returns false on SIGBUS. */
static bool probe_write(volatile void *dst, const void *src, size_t len)
{
	sigjmp_buf env;

	if (sigsetjmp(env, 1)) {
		probe_env = NULL;
		return false;
	}
	probe_env = &env;
	for (size_t i = 0; i < len / 8; i++)
		((volatile uint64_t *)dst)[i] = ((const uint64_t *)src)[i];
	probe_env = NULL;
	return true;
}

static bool can_read(const volatile void *p)
{
	uint64_t v;

	return probe_read(p, &v, sizeof(v));
}

static bool can_write(volatile void *p)
{
	uint64_t v = 0x5a5a5a5a5a5a5a5aULL;

	return probe_write(p, &v, sizeof(v));
}

/* ---- module helpers --------------------------------------------------- */

static int open_dev(void)
{
	return open(DSVM_DEVICE_PATH, O_RDWR | O_CLOEXEC);
}

static int hello(int fd)
{
	struct dsvm_hello h = { .user_version = DSVM_ABI_VERSION };

	return xioctl(fd, DSVM_IOC_HELLO, &h);
}

static int region_create(int fd, uint64_t id, uint64_t base, uint64_t npages)
{
	struct dsvm_region_create rc = {
		.region_id = id, .base = base, .size = npages * PAGE,
		.page_size = DSVM_PAGE_SIZE_4K,
	};

	return xioctl(fd, DSVM_IOC_REGION_CREATE, &rc);
}

static int region_destroy(int fd, uint64_t id)
{
	struct dsvm_region_destroy rd = { .region_id = id };

	return xioctl(fd, DSVM_IOC_REGION_DESTROY, &rd);
}

static int page_install(int fd, uint64_t id, uint64_t index, uint32_t state,
			const void *data)
{
	struct dsvm_page_install pi = {
		.region_id = id, .page_index = index, .state = state,
		.data = (uintptr_t)data,
		.flags = data ? 0 : DSVM_PAGE_INSTALL_ZERO,
	};

	return xioctl(fd, DSVM_IOC_PAGE_INSTALL, &pi);
}

/* A page range ioctl (invalidate, downgrade, upgrade); -errno or pages done. */
static long page_op(int fd, unsigned long cmd, uint64_t id, uint64_t first,
		    uint64_t count)
{
	struct dsvm_page_range pr = {
		.region_id = id, .first = first, .count = count,
	};
	int ret;

	ret = xioctl(fd, cmd, &pr);
	return ret ? ret : (long)pr.done;
}

/* Invalidate (drop) or downgrade a range; returns -errno or pages done. */
static long page_range(int fd, bool drop, uint64_t id, uint64_t first,
		       uint64_t count)
{
	return page_op(fd, drop ? DSVM_IOC_PAGE_INVALIDATE : DSVM_IOC_PAGE_DOWNGRADE,
		       id, first, count);
}

static long page_upgrade(int fd, uint64_t id, uint64_t first, uint64_t count)
{
	return page_op(fd, DSVM_IOC_PAGE_UPGRADE, id, first, count);
}

/* DSVM_IOC_PAGE_WRITEBACK into data; 0 or -errno. */
static int page_writeback(int fd, uint64_t id, uint64_t index, uint32_t flags,
			  void *data, uint32_t *state, uint32_t *dirty)
{
	struct dsvm_page_writeback wb = {
		.region_id = id, .page_index = index, .flags = flags,
		.data = (uintptr_t)data,
	};
	int ret = xioctl(fd, DSVM_IOC_PAGE_WRITEBACK, &wb);

	if (state)
		*state = wb.state;
	if (dirty)
		*dirty = wb.dirty;
	return ret;
}

static struct dsvm_stats stats(int fd)
{
	struct dsvm_stats st;

	memset(&st, 0xff, sizeof(st));
	if (xioctl(fd, DSVM_IOC_STATS, &st))
		diag("DSVM_IOC_STATS failed: %s", strerror(errno));
	return st;
}

static void *map_region(int fd, uint64_t base, uint64_t npages)
{
	return mmap((void *)base, npages * PAGE, PROT_READ | PROT_WRITE,
		    MAP_SHARED | MAP_FIXED_NOREPLACE, fd, (off_t)base);
}

static void fill(void *page, uint64_t seed)
{
	for (size_t i = 0; i < PAGE / 8; i++)
		((uint64_t *)page)[i] = seed * 0x9e3779b97f4a7c15ULL + i;
}

static void *page_at(uint64_t base, uint64_t index)
{
	return (void *)(base + index * PAGE);
}

/* Reads a whole page through the mapping and compares it with seed's. */
static bool page_matches(uint64_t base, uint64_t index, uint64_t seed)
{
	static __thread uint64_t got[PAGE / 8], want[PAGE / 8];

	fill(want, seed);
	if (!probe_read(page_at(base, index), got, PAGE))
		return false;
	return !memcmp(got, want, PAGE);
}

static bool page_is_zero(uint64_t base, uint64_t index)
{
	static __thread uint64_t got[PAGE / 8];
	static const uint64_t zero[PAGE / 8];

	if (!probe_read(page_at(base, index), got, PAGE))
		return false;
	return !memcmp(got, zero, PAGE);
}

static long meminfo_kb(const char *key)
{
	char line[256];
	long value = -1;
	size_t len = strlen(key);
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, key, len) && line[len] == ':') {
			value = strtol(line + len + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return value;
}

/*
 * Free memory in kB: MemFree plus the pages parked on the per-CPU free
 * lists (/proc/zoneinfo's pageset "count"), which MemFree leaves out and
 * which grow with the guest's memory; without them a leak check on a
 * larger guest sees freed pages as missing.
 */
static long free_kb(void)
{
	long free = meminfo_kb("MemFree"), pcp = 0, count;
	char line[256];
	FILE *f = fopen("/proc/zoneinfo", "r");

	if (!f || free < 0) {
		if (f)
			fclose(f);
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, " count: %ld", &count) == 1)
			pcp += count;
	}
	fclose(f);
	return free + pcp * (PAGE / 1024);
}

/* Sets a module parameter; false when it cannot. */
static bool set_param(const char *name, unsigned int value)
{
	char path[128];
	FILE *f;
	bool ok;

	snprintf(path, sizeof(path), "/sys/module/dsvm/parameters/%s", name);
	f = fopen(path, "w");
	if (!f)
		return false;
	ok = fprintf(f, "%u\n", value) > 0;
	return fclose(f) == 0 && ok;
}

/* Sets the module's test-only fault delay; false when it cannot. */
static bool set_fault_delay(unsigned int us)
{
	return set_param("fault_delay_us", us);
}

static unsigned long kernel_taint(void)
{
	unsigned long taint = ~0UL;
	FILE *f = fopen("/proc/sys/kernel/tainted", "r");

	if (f) {
		if (fscanf(f, "%lu", &taint) != 1)
			taint = ~0UL;
		fclose(f);
	}
	return taint;
}

/* ---- handshake ------------------------------------------------------- */

static void test_handshake(int fd)
{
	struct dsvm_region_create rc = { 0 };
	struct dsvm_stats st;
	struct dsvm_hello h;

	expect(xioctl(fd, DSVM_IOC_STATS, &st), -EPROTO,
	       "stats before hello refused with EPROTO");
	expect(xioctl(fd, DSVM_IOC_REGION_CREATE, &rc), -EPROTO,
	       "region create before hello refused with EPROTO");

	memset(&h, 0, sizeof(h));
	h.user_version = 0;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), -EPROTO,
	       "hello with version 0 refused with EPROTO");
	result(h.module_version == DSVM_ABI_VERSION,
	       "hello refused still reports the module version");

	memset(&h, 0, sizeof(h));
	h.user_version = DSVM_ABI_VERSION + 1;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), -EPROTO,
	       "hello with a newer version refused with EPROTO");
	expect(xioctl(fd, DSVM_IOC_STATS, &st), -EPROTO,
	       "a failed hello does not open the file");

	memset(&h, 0, sizeof(h));
	h.user_version = DSVM_ABI_VERSION;
	h.flags = 1ULL << 1;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), -EINVAL,
	       "hello with an unknown flag refused with EINVAL");
	h.flags = ~0ULL;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), -EINVAL,
	       "hello with flags ~0 refused with EINVAL");
	h.flags = 0;
	h.reserved = 1ULL << 63;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), -EINVAL,
	       "hello with reserved set refused with EINVAL");

	memset(&h, 0, sizeof(h));
	h.user_version = DSVM_ABI_VERSION;
	expect(xioctl(fd, DSVM_IOC_HELLO, &h), 0, "hello with the right version");
	result(h.module_version == DSVM_ABI_VERSION &&
	       (h.features & DSVM_FEATURE_REGIONS) &&
	       (h.features & DSVM_FEATURE_STATS) &&
	       (h.features & DSVM_FEATURE_EVENTS) &&
	       (h.features & DSVM_FEATURE_WRITEBACK) &&
	       (h.features & DSVM_FEATURE_POISON) &&
	       (h.features & DSVM_FEATURE_WAKE) &&
	       (h.features & DSVM_FEATURE_DOMAINS),
	       "hello reports version %u and features 0x%llx",
	       h.module_version, (unsigned long long)h.features);
	expect(hello(fd), 0, "hello repeated on the same file");

	expect(xioctl(fd, _IO(DSVM_IOC_MAGIC, 0x7f), NULL), -ENOTTY,
	       "unknown ioctl number refused with ENOTTY");
	{
		char big[sizeof(struct dsvm_hello) + 8] = { 0 };

		expect(xioctl(fd, _IOWR(DSVM_IOC_MAGIC, 0x00, big), big), -ENOTTY,
		       "hello with another struct size refused with ENOTTY");
	}
	st = stats(fd);
	result(st.regions == 0 && st.pages == 0 && st.mappings == 0,
	       "module starts with no regions, pages or mappings");
}

/* ---- argument validation --------------------------------------------- */

struct create_case {
	const char *name;
	struct dsvm_region_create rc;
	int err;
};

static void test_region_create_invalid(int fd)
{
	const uint64_t b = BASE_VALID, s = 16 * PAGE;
	const uint32_t ps = DSVM_PAGE_SIZE_4K;
	const struct create_case cases[] = {
		{ "region_id 0", { 0, b, s, ps }, -EINVAL },
		{ "base 0", { 90, 0, s, ps }, -EINVAL },
		{ "base not page aligned", { 90, b + 1, s, ps }, -EINVAL },
		{ "base half a page off", { 90, b + 2048, s, ps }, -EINVAL },
		{ "size 0", { 90, b, 0, ps }, -EINVAL },
		{ "size not a page multiple", { 90, b, s + 1, ps }, -EINVAL },
		{ "size above DSVM_REGION_SIZE_MAX",
		  { 90, b, DSVM_REGION_SIZE_MAX + PAGE, ps }, -EINVAL },
		{ "size 2^63", { 90, b, 1ULL << 63, ps }, -EINVAL },
		/* Beyond 2^56: past user space with 4- and 5-level paging. */
		{ "end beyond user space", { 90, (1ULL << 56) - PAGE, 2 * PAGE, ps },
		  -EINVAL },
		{ "base + size overflowing", { 90, 0xfffffffffffff000ULL, 2 * PAGE, ps },
		  -EINVAL },
		{ "kernel address", { 90, 0xffff888000000000ULL, s, ps }, -EINVAL },
		{ "page_size 0", { 90, b, s, 0 }, -EINVAL },
		{ "page_size 8192", { 90, b, s, 8192 }, -EINVAL },
		{ "page_size 65536 (not yet)", { 90, b, 1 << 20, 65536 }, -EINVAL },
		{ "page_size 2 MiB (not yet)", { 90, b, 1 << 22, 2 << 20 }, -EINVAL },
		{ "page_size ~0", { 90, b, s, 0xffffffffu }, -EINVAL },
		{ "flags bit 0", { 90, b, s, ps, 1 }, -EINVAL },
		{ "flags bit 31", { 90, b, s, ps, 1u << 31 }, -EINVAL },
		{ "reserved[0] set", { 90, b, s, ps, 0, { 1, 0 } }, -EINVAL },
		{ "reserved[1] set", { 90, b, s, ps, 0, { 0, 1 } }, -EINVAL },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct dsvm_region_create rc = cases[i].rc;
		char name[128];

		snprintf(name, sizeof(name), "region create: %s refused",
			 cases[i].name);
		expect(xioctl(fd, DSVM_IOC_REGION_CREATE, &rc), cases[i].err, name);
	}

	expect(region_create(fd, 90, b, 16), 0, "region create: valid region");
	expect(region_create(fd, 90, b + (1ULL << 32), 16), -EEXIST,
	       "region create: id in use refused with EEXIST");
	expect(region_create(fd, 91, b + 8 * PAGE, 16), -EADDRINUSE,
	       "region create: overlap at the end refused with EADDRINUSE");
	expect(region_create(fd, 91, b - 8 * PAGE, 16), -EADDRINUSE,
	       "region create: overlap at the start refused with EADDRINUSE");
	expect(region_create(fd, 91, b - 16 * PAGE, 32), -EADDRINUSE,
	       "region create: enclosing region refused with EADDRINUSE");
	expect(region_create(fd, 91, b + 16 * PAGE, 16), 0,
	       "region create: adjacent region accepted");
	expect(region_destroy(fd, 91), 0, "region destroy: adjacent region");

	{
		struct dsvm_region_destroy rd = { .region_id = 0 };

		expect(xioctl(fd, DSVM_IOC_REGION_DESTROY, &rd), -EINVAL,
		       "region destroy: region_id 0 refused with EINVAL");
		rd.region_id = 90;
		rd.reserved = 1;
		expect(xioctl(fd, DSVM_IOC_REGION_DESTROY, &rd), -EINVAL,
		       "region destroy: reserved set refused with EINVAL");
		expect(region_destroy(fd, 12345), -ENOENT,
		       "region destroy: unknown region refused with ENOENT");
	}
}

struct install_case {
	const char *name;
	struct dsvm_page_install pi;
	int err;
};

/* Needs region 90 (16 pages) from test_region_create_invalid. */
static void test_page_install_invalid(int fd)
{
	static uint64_t buf[PAGE / 8];
	const uint64_t d = (uintptr_t)buf;
	const uint32_t S = DSVM_PAGE_STATE_SHARED;
	const struct install_case cases[] = {
		{ "region_id 0", { 0, 0, d, S }, -EINVAL },
		{ "unknown region", { 12345, 0, d, S }, -ENOENT },
		{ "page_index == npages", { 90, 16, d, S }, -EINVAL },
		{ "page_index 2^64-1", { 90, ~0ULL, d, S }, -EINVAL },
		{ "state 0 (Invalid)", { 90, 0, d, 0 }, -EINVAL },
		{ "state 3", { 90, 0, d, 3 }, -EINVAL },
		{ "state ~0", { 90, 0, d, 0xffffffffu }, -EINVAL },
		{ "unknown flag", { 90, 0, d, S, 1u << 1 }, -EINVAL },
		{ "ZERO flag with data", { 90, 0, d, S, DSVM_PAGE_INSTALL_ZERO },
		  -EINVAL },
		{ "data 0 without ZERO flag", { 90, 0, 0, S, 0 }, -EINVAL },
		{ "reserved[0] set", { 90, 0, d, S, 0, { 1, 0 } }, -EINVAL },
		{ "reserved[1] set", { 90, 0, d, S, 0, { 0, 1 } }, -EINVAL },
		{ "unreadable data", { 90, 0, 8, S }, -EFAULT },
		{ "kernel data address", { 90, 0, 0xffff888000000000ULL, S },
		  -EFAULT },
	};
	struct dsvm_stats before = stats(fd), after;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct dsvm_page_install pi = cases[i].pi;
		char name[128];

		snprintf(name, sizeof(name), "page install: %s refused",
			 cases[i].name);
		expect(xioctl(fd, DSVM_IOC_PAGE_INSTALL, &pi), cases[i].err, name);
	}
	after = stats(fd);
	result(after.pages == before.pages,
	       "page install: refused installs hold no page");
}

/* Needs region 90 (16 pages). */
static void test_page_range_invalid(int fd)
{
	static const struct {
		const char *op;
		unsigned long cmd;
	} ops[] = {
		{ "invalidate", DSVM_IOC_PAGE_INVALIDATE },
		{ "downgrade", DSVM_IOC_PAGE_DOWNGRADE },
		{ "upgrade", DSVM_IOC_PAGE_UPGRADE },
		{ "poison", DSVM_IOC_PAGE_POISON },
		{ "wake", DSVM_IOC_PAGE_WAKE },
	};

	for (size_t o = 0; o < sizeof(ops) / sizeof(ops[0]); o++) {
		const char *op = ops[o].op;
		const struct {
			const char *name;
			struct dsvm_page_range pr;
			int err;
		} cases[] = {
			{ "region_id 0", { 0, 0, 1 }, -EINVAL },
			{ "unknown region", { 12345, 0, 1 }, -ENOENT },
			{ "count 0", { 90, 0, 0 }, -EINVAL },
			{ "first == npages", { 90, 16, 1 }, -EINVAL },
			{ "first + count beyond the region", { 90, 8, 9 }, -EINVAL },
			{ "first + count overflowing", { 90, 1, ~0ULL }, -EINVAL },
			{ "first 2^64-1", { 90, ~0ULL, 1 }, -EINVAL },
			{ "reserved[0] set", { 90, 0, 1, 0, { 1, 0 } }, -EINVAL },
			{ "reserved[1] set", { 90, 0, 1, 0, { 0, 1 } }, -EINVAL },
		};

		for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
			struct dsvm_page_range pr = cases[i].pr;
			char name[128];

			snprintf(name, sizeof(name), "page %s: %s refused", op,
				 cases[i].name);
			expect(xioctl(fd, ops[o].cmd, &pr), cases[i].err, name);
		}
		if (ops[o].cmd == DSVM_IOC_PAGE_POISON)
			continue;
		{
			char name[128];

			snprintf(name, sizeof(name),
				 "page %s: whole empty region is a no-op", op);
			expect(page_op(fd, ops[o].cmd, 90, 0, 16), 0, name);
		}
	}

	/* Poison changes pages that are not installed too. */
	expect(page_op(fd, DSVM_IOC_PAGE_POISON, 90, 0, 16), 16,
	       "page poison: whole empty region poisons its 16 pages");
	expect(page_op(fd, DSVM_IOC_PAGE_POISON, 90, 0, 16), 0,
	       "page poison: again poisons none (idempotent)");
	expect(page_range(fd, true, 90, 0, 16), 0,
	       "page poison: invalidate clears it and drops nothing");
	expect(page_op(fd, DSVM_IOC_PAGE_POISON, 90, 3, 2), 2,
	       "page poison: after the invalidate, pages are poisoned anew");
	expect(page_range(fd, true, 90, 0, 16), 0,
	       "page poison: invalidate the region clean again");
}

/* Needs region 90 (16 pages). */
static void test_page_writeback_invalid(int fd)
{
	static uint64_t buf[PAGE / 8];
	const uint64_t d = (uintptr_t)buf;
	const uint32_t DG = DSVM_PAGE_WRITEBACK_DOWNGRADE;
	const uint32_t INV = DSVM_PAGE_WRITEBACK_INVALIDATE;
	const struct {
		const char *name;
		struct dsvm_page_writeback wb;
		int err;
	} cases[] = {
		{ "region_id 0", { 0, 0, d }, -EINVAL },
		{ "unknown region", { 12345, 0, d }, -ENOENT },
		{ "page_index == npages", { 90, 16, d }, -EINVAL },
		{ "page_index 2^64-1", { 90, ~0ULL, d }, -EINVAL },
		{ "data 0", { 90, 0, 0 }, -EINVAL },
		{ "unknown flag", { 90, 0, d, 1u << 2 }, -EINVAL },
		{ "flags ~0", { 90, 0, d, ~0u }, -EINVAL },
		{ "both downgrade and invalidate", { 90, 0, d, DG | INV }, -EINVAL },
		{ "reserved32 set", { 90, 0, d, 0, 0, 0, 1 }, -EINVAL },
		{ "reserved[0] set", { 90, 0, d, 0, 0, 0, 0, { 1, 0 } }, -EINVAL },
		{ "reserved[1] set", { 90, 0, d, 0, 0, 0, 0, { 0, 1 } }, -EINVAL },
		{ "page not installed", { 90, 0, d }, -ENODATA },
		{ "page not installed, with invalidate", { 90, 3, d, INV }, -ENODATA },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct dsvm_page_writeback wb = cases[i].wb;
		char name[128];

		snprintf(name, sizeof(name), "page writeback: %s refused",
			 cases[i].name);
		expect(xioctl(fd, DSVM_IOC_PAGE_WRITEBACK, &wb), cases[i].err, name);
	}
}

/* Needs region 90 (16 pages at BASE_VALID). */
static void test_mmap_invalid(int fd)
{
	const uint64_t b = BASE_VALID, size = 16 * PAGE;
	void *p;

	p = mmap((void *)b, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, (off_t)b);
	expect(p == MAP_FAILED ? -errno : 0, -EINVAL,
	       "mmap: private mapping refused with EINVAL");
	if (p != MAP_FAILED)
		munmap(p, size);

	p = mmap((void *)(b + (1ULL << 32)), size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, fd, (off_t)b);
	expect(p == MAP_FAILED ? -errno : 0, -EINVAL,
	       "mmap: mapping away from the base refused with EINVAL");
	if (p != MAP_FAILED)
		munmap(p, size);

	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, (off_t)b);
	expect(p == MAP_FAILED ? -errno : 0, -EINVAL,
	       "mmap: mapping at an address the kernel picks refused with EINVAL");
	if (p != MAP_FAILED)
		munmap(p, size);

	p = mmap((void *)b, size / 2, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, fd, (off_t)b);
	expect(p == MAP_FAILED ? -errno : 0, -EINVAL,
	       "mmap: part of a region refused with EINVAL");
	if (p != MAP_FAILED)
		munmap(p, size / 2);

	p = mmap((void *)(b + PAGE), size - PAGE, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, fd, (off_t)(b + PAGE));
	expect(p == MAP_FAILED ? -errno : 0, -ENOENT,
	       "mmap: offset inside a region refused with ENOENT");
	if (p != MAP_FAILED)
		munmap(p, size - PAGE);

	p = mmap((void *)(b + (1ULL << 36)), size, PROT_READ,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, fd, (off_t)(b + (1ULL << 36)));
	expect(p == MAP_FAILED ? -errno : 0, -ENOENT,
	       "mmap: offset of no region refused with ENOENT");
	if (p != MAP_FAILED)
		munmap(p, size);
}

/* ---- faults ------------------------------------------------------------ */

static void test_faults(int fd)
{
	const uint64_t id = 1, b = BASE_FUNC, n = 16;
	static uint64_t buf[PAGE / 8];
	struct dsvm_stats st0, st;
	char *map;
	pid_t pid;
	int status;

	expect(region_create(fd, id, b, n), 0, "faults: region create");
	map = map_region(fd, b, n);
	result(map == (void *)b, "faults: mmap at the region's base");
	if (map != (void *)b) {
		diag("mmap: %s", strerror(errno));
		return;
	}
	st0 = stats(fd);
	result(st0.mappings == 1, "faults: one mapping counted");

	result(!can_read(page_at(b, 0)), "fault: read of a page not installed gets SIGBUS");
	result(!can_write(page_at(b, 0)), "fault: write to a page not installed gets SIGBUS");

	/* Shared: readable, never writable. */
	fill(buf, 100);
	expect(page_install(fd, id, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "fault: install a Shared page");
	result(page_matches(b, 0, 100), "fault: Shared page reads the installed data");
	result(!can_write(page_at(b, 0)), "fault: write to a Shared page gets SIGBUS");
	result(page_matches(b, 0, 100), "fault: Shared page unchanged after the refused write");
	expect(page_install(fd, id, 0, DSVM_PAGE_STATE_MODIFIED, buf), -EEXIST,
	       "fault: install over an installed page refused with EEXIST");

	/* Modified: read maps read-only, the first write goes through mkwrite. */
	fill(buf, 101);
	expect(page_install(fd, id, 1, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "fault: install a Modified page");
	result(page_matches(b, 1, 101), "fault: Modified page reads the installed data");
	fill(buf, 102);
	result(probe_write(page_at(b, 1), buf, PAGE),
	       "fault: write to a mapped Modified page (mkwrite)");
	result(page_matches(b, 1, 102), "fault: Modified page reads back the write");
	fill(buf, 103);
	expect(page_install(fd, id, 2, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "fault: install a second Modified page");
	fill(buf, 104);
	result(probe_write(page_at(b, 2), buf, PAGE),
	       "fault: write fault on an unmapped Modified page");
	result(page_matches(b, 2, 104), "fault: first-touch write reads back");

	expect(page_install(fd, id, 3, DSVM_PAGE_STATE_SHARED, NULL), 0,
	       "fault: install a zero-filled Shared page");
	result(page_is_zero(b, 3), "fault: zero-filled page reads zeros");

	st = stats(fd);
	result(st.pages == st0.pages + 4 && st.faults > st0.faults &&
	       st.mkwrites > st0.mkwrites && st.refused > st0.refused,
	       "fault: counters (pages %llu, faults %llu, mkwrites %llu, refused %llu)",
	       (unsigned long long)st.pages, (unsigned long long)st.faults,
	       (unsigned long long)st.mkwrites, (unsigned long long)st.refused);

	/* The same page through another file and mapping, in a child. */
	fill(buf, 105);
	expect(page_install(fd, id, 4, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "fork: install a Modified page");
	fill(buf, 106);
	result(probe_write(page_at(b, 4), buf, PAGE), "fork: parent writes the page");
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		int cfd;

		if (munmap((void *)b, n * PAGE))
			_exit(10);
		cfd = open_dev();
		if (cfd < 0)
			_exit(11);
		if (map_region(cfd, b, n) != (void *)b)
			_exit(12);
		if (!page_matches(b, 4, 106))
			_exit(13);
		fill(buf, 107);
		if (!probe_write(page_at(b, 4), buf, PAGE))
			_exit(14);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		diag("child status 0x%x", status);
	result(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "fork: child reads the parent's write through a mapping of its own and writes");
	result(page_matches(b, 4, 107), "fork: parent reads the child's write (one shared page)");

	/* Invalidate: gone from every mapping, freed. */
	st0 = stats(fd);
	expect(page_range(fd, true, id, 1, 1), 1, "invalidate: a mapped Modified page");
	result(!can_read(page_at(b, 1)), "invalidate: read afterwards gets SIGBUS");
	result(!can_write(page_at(b, 1)), "invalidate: write afterwards gets SIGBUS");
	st = stats(fd);
	result(st.pages == st0.pages - 1, "invalidate: page count down by one");
	expect(page_range(fd, true, id, 1, 1), 0,
	       "invalidate: again is a no-op (idempotent)");
	/* A stale read-only PTE must not survive: new bytes must show. */
	expect(page_range(fd, true, id, 0, 1), 1, "invalidate: a mapped Shared page");
	fill(buf, 108);
	expect(page_install(fd, id, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "invalidate: reinstall with new data");
	result(page_matches(b, 0, 108), "invalidate: mapping shows the new data, not the old page");

	/* Downgrade: Modified -> Shared. */
	result(page_matches(b, 4, 107), "downgrade: page mapped before");
	expect(page_range(fd, false, id, 4, 1), 1, "downgrade: a mapped, written Modified page");
	result(!can_write(page_at(b, 4)), "downgrade: write afterwards gets SIGBUS");
	result(page_matches(b, 4, 107), "downgrade: read afterwards returns the data");
	expect(page_range(fd, false, id, 4, 1), 0, "downgrade: again is a no-op");
	expect(page_range(fd, false, id, 0, 1), 0, "downgrade: a Shared page is a no-op");
	expect(page_range(fd, false, id, 0, n), 1,
	       "downgrade: a range downgrades only its Modified pages");
	result(!can_write(page_at(b, 2)), "downgrade: range write afterwards gets SIGBUS");

	expect(page_range(fd, true, id, 0, n), 4,
	       "invalidate: whole region drops every installed page");
	result(!can_read(page_at(b, 0)) && !can_read(page_at(b, 4)),
	       "invalidate: whole region reads get SIGBUS");

	munmap(map, n * PAGE);
	expect(region_destroy(fd, id), 0, "faults: region destroy");
}

/* ---- many threads -------------------------------------------------------- */

#define THREADS 8
#define ROUNDS 40	/* each round writes its own word of the page */
_Static_assert(ROUNDS <= PAGE / 8, "rounds fit in a page");
#define RACE_PAGES 2
#define RACE_GENERATIONS 400
#define RACE_PAUSE_NS 100000L
#define RACE_READERS 4	/* the guest has 2 vCPUs; the writer needs one */

static pthread_barrier_t barrier;
static volatile int race_stop;
static volatile uint64_t race_generation;
static uint64_t race_reads;	/* __atomic: reads done by all readers */
/* __atomic: per page, the generation whose install has completed. */
static uint64_t race_installed[RACE_PAGES];

struct worker {
	int index;
	unsigned long errors;
	unsigned long sigbus;
	unsigned long reads;
};

/*
 * Phase 1: every thread reads page 0 (Shared, the same for all), writes
 * its own word of page THREADS + 1 (Modified, the same for all) and writes
 * its own page (Modified).
 */
static void *fault_worker(void *arg)
{
	struct worker *w = arg;
	volatile uint64_t *shared = page_at(BASE_THREADS, 0);
	volatile uint64_t *common = page_at(BASE_THREADS, THREADS + 1);
	volatile uint64_t *own = page_at(BASE_THREADS, 1 + w->index);

	for (int r = 0; r < ROUNDS; r++) {
		uint64_t v;

		pthread_barrier_wait(&barrier);
		if (!probe_read(&shared[w->index * 16], &v, 8) ||
		    v != 7 * 0x9e3779b97f4a7c15ULL + w->index * 16)
			w->errors++;
		v = ((uint64_t)w->index << 32) | r;
		if (!probe_write(&own[r % (PAGE / 8)], &v, 8))
			w->errors++;
		if (own[r % (PAGE / 8)] != v)
			w->errors++;
		if (!probe_write(&common[w->index], &v, 8) || common[w->index] != v)
			w->errors++;
		pthread_barrier_wait(&barrier);
	}
	return NULL;
}

/*
 * Phase 2: readers against invalidate + reinstall. Each word of page i of
 * generation g holds (g << 16 | i): a read must never see another page's
 * bytes (a freed, reused page) or a generation going backwards.
 */
static void *race_reader(void *arg)
{
	struct worker *w = arg;
	unsigned int seed = w->index * 7919 + 1;

	pthread_barrier_wait(&barrier);
	while (!race_stop) {
		uint64_t index = rand_r(&seed) % RACE_PAGES, words[3], prev;
		volatile uint64_t *p = page_at(BASE_THREADS, index);
		uint64_t max_gen = race_generation;

		/*
		 * Generation prev was installed, so every older one was
		 * invalidated (and unmapped) before: seeing one is a stale PTE.
		 */
		prev = __atomic_load_n(&race_installed[index], __ATOMIC_ACQUIRE);

		for (int k = 0; k < 3; k++) {
			if (!probe_read(&p[k * 255], &words[k], 8)) {
				w->sigbus++;
				goto next;
			}
		}
		for (int k = 0; k < 3; k++) {
			uint64_t gen = words[k] >> 16;

			if ((words[k] & 0xffff) != index || gen < prev ||
			    gen > race_generation + 1) {
				if (w->errors++ < 3)
					diag("reader %d: page %llu word %d = 0x%llx (gen %llu..%llu)",
					     w->index, (unsigned long long)index, k,
					     (unsigned long long)words[k],
					     (unsigned long long)prev,
					     (unsigned long long)max_gen);
			}
			prev = gen;
		}
		w->reads++;
next:
		__atomic_fetch_add(&race_reads, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void fill_generation(uint64_t *buf, uint64_t gen, uint64_t index)
{
	for (size_t i = 0; i < PAGE / 8; i++)
		buf[i] = gen << 16 | index;
}

static void test_threads(int fd)
{
	const uint64_t id = 2, b = BASE_THREADS, n = 2 + THREADS;
	static uint64_t buf[PAGE / 8];
	struct worker workers[THREADS];
	pthread_t threads[THREADS];
	unsigned long errors = 0, sigbus = 0, reads = 0;
	struct dsvm_stats st0, st;
	bool ok = true;

	expect(region_create(fd, id, b, n), 0, "threads: region create");
	if (map_region(fd, b, n) != (void *)b) {
		result(false, "threads: mmap");
		return;
	}
	fill(buf, 7);
	ok &= page_install(fd, id, 0, DSVM_PAGE_STATE_SHARED, buf) == 0;
	for (uint64_t i = 1; i < n; i++)
		ok &= page_install(fd, id, i, DSVM_PAGE_STATE_MODIFIED, NULL) == 0;
	result(ok, "threads: install one Shared and %d Modified pages", THREADS + 1);

	st0 = stats(fd);
	pthread_barrier_init(&barrier, NULL, THREADS + 1);
	for (int t = 0; t < THREADS; t++) {
		workers[t] = (struct worker){ .index = t };
		pthread_create(&threads[t], NULL, fault_worker, &workers[t]);
	}
	for (int r = 0; r < ROUNDS; r++) {
		pthread_barrier_wait(&barrier);	/* workers fault */
		pthread_barrier_wait(&barrier);	/* workers done */
		/* Drop every PTE so that the next round faults again. */
		madvise((void *)b, n * PAGE, MADV_DONTNEED);
	}
	for (int t = 0; t < THREADS; t++) {
		pthread_join(threads[t], NULL);
		errors += workers[t].errors;
	}
	pthread_barrier_destroy(&barrier);
	st = stats(fd);
	result(errors == 0,
	       "threads: %d threads x %d rounds faulting the same and their own pages: %lu errors",
	       THREADS, ROUNDS, errors);
	result(st.faults - st0.faults >= (uint64_t)ROUNDS * THREADS,
	       "threads: %llu faults resolved in the kernel",
	       (unsigned long long)(st.faults - st0.faults));
	ok = true;
	for (int t = 0; t < THREADS; t++) {
		uint64_t *own = page_at(b, 1 + t);

		for (int r = 0; r < ROUNDS; r++)
			ok &= own[r % (PAGE / 8)] == (((uint64_t)t << 32) | r);
		ok &= ((uint64_t *)page_at(b, THREADS + 1))[t] ==
		      (((uint64_t)t << 32) | (ROUNDS - 1));
	}
	result(ok, "threads: every thread's writes are in its page");

	/* Phase 2: faults racing invalidation and reinstallation. */
	expect(page_range(fd, true, id, 0, n), (long)n, "race: invalidate all");
	race_generation = 0;
	memset(race_installed, 0, sizeof(race_installed));
	for (uint64_t i = 0; i < RACE_PAGES; i++) {
		fill_generation(buf, 0, i);
		page_install(fd, id, i, DSVM_PAGE_STATE_SHARED, buf);
	}
	/*
	 * Faults wait 200 us with the page locked before they are mapped:
	 * an invalidation that does not wait for them leaves a stale PTE.
	 */
	result(set_fault_delay(200), "race: set the module's fault delay to 200 us");
	race_stop = 0;
	pthread_barrier_init(&barrier, NULL, RACE_READERS + 1);
	for (int t = 0; t < RACE_READERS; t++) {
		workers[t] = (struct worker){ .index = t };
		pthread_create(&threads[t], NULL, race_reader, &workers[t]);
	}
	pthread_barrier_wait(&barrier);
	ok = true;
	/*
	 * At least RACE_GENERATIONS cycles, and on until the readers have
	 * read every page once: on a loaded host they may get no CPU time
	 * during the first cycles (bounded at 20 times as many).
	 */
	for (uint64_t g = 1; g <= RACE_GENERATIONS ||
			     (__atomic_load_n(&race_reads, __ATOMIC_RELAXED) < RACE_PAGES &&
			      g <= 20 * RACE_GENERATIONS);
	     g++) {
		uint64_t i = g % RACE_PAGES;
		struct timespec t0, t1;

		race_generation = g;
		if (page_range(fd, true, id, i, 1) != 1)
			ok = false;
		fill_generation(buf, g, i);
		if (page_install(fd, id, i, DSVM_PAGE_STATE_SHARED, buf))
			ok = false;
		__atomic_store_n(&race_installed[i], g, __ATOMIC_RELEASE);
		/*
		 * Readers of page i now fault and sit in the fault delay; the
		 * next invalidation of i comes RACE_PAGES cycles later, while
		 * some of them still may. Pause a little so that they can.
		 */
		clock_gettime(CLOCK_MONOTONIC, &t0);
		do {
			sched_yield();
			clock_gettime(CLOCK_MONOTONIC, &t1);
		} while ((t1.tv_sec - t0.tv_sec) * 1000000000L + t1.tv_nsec - t0.tv_nsec <
			 RACE_PAUSE_NS);
	}
	race_stop = 1;
	for (int t = 0; t < RACE_READERS; t++) {
		pthread_join(threads[t], NULL);
		errors += workers[t].errors;
		sigbus += workers[t].sigbus;
		reads += workers[t].reads;
	}
	pthread_barrier_destroy(&barrier);
	set_fault_delay(0);
	result(ok, "race: %d invalidate + reinstall cycles", RACE_GENERATIONS);
	result(errors == 0 && reads >= RACE_PAGES,
	       "race: %lu reads, %lu SIGBUS, %lu wrong or stale bytes",
	       reads, sigbus, errors);
	ok = true;
	for (uint64_t i = 0; i < RACE_PAGES; i++) {
		uint64_t last = 0, v;

		for (uint64_t g = 1; g <= RACE_GENERATIONS; g++)
			if (g % RACE_PAGES == i)
				last = g;
		ok &= probe_read(page_at(b, i), &v, 8) && v == (last << 16 | i);
	}
	result(ok, "race: afterwards every page shows its last generation (no stale PTE)");

	munmap((void *)b, n * PAGE);
	expect(region_destroy(fd, id), 0, "threads: region destroy");
}

/* ---- teardown paths ------------------------------------------------------ */

static void test_destroy_mapped(int fd)
{
	const uint64_t id = 3, b = BASE_DESTROY, n = 16;
	static uint64_t buf[PAGE / 8];
	struct dsvm_stats st0, st;
	int to_child[2], to_parent[2];
	bool ok = true;
	pid_t pid;
	int status;
	char c;

	st0 = stats(fd);
	expect(region_create(fd, id, b, n), 0, "destroy: region create");
	for (uint64_t i = 0; i < n; i++) {
		fill(buf, 300 + i);
		ok &= page_install(fd, id, i, DSVM_PAGE_STATE_MODIFIED, buf) == 0;
	}
	result(ok, "destroy: install %llu Modified pages", (unsigned long long)n);
	if (map_region(fd, b, n) != (void *)b) {
		result(false, "destroy: mmap");
		return;
	}
	for (uint64_t i = 0; i < n; i++)
		ok &= probe_write(page_at(b, i), buf, 64);
	result(ok, "destroy: every page mapped writable");

	if (pipe(to_child) || pipe(to_parent)) {
		result(false, "destroy: pipes");
		return;
	}
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		bool child_ok = true;

		/* Fault the pages into the child's own page table too. */
		for (uint64_t i = 0; i < n; i++)
			child_ok &= can_read(page_at(b, i));
		write(to_parent[1], "r", 1);
		read(to_child[0], &c, 1);
		for (uint64_t i = 0; i < n; i++)
			child_ok &= !can_read(page_at(b, i));
		_exit(child_ok ? 0 : 1);
	}
	read(to_parent[0], &c, 1);

	expect(region_destroy(fd, id), 0, "destroy: region destroyed while two processes map it");
	ok = true;
	for (uint64_t i = 0; i < n; i++)
		ok &= !can_read(page_at(b, i)) && !can_write(page_at(b, i));
	result(ok, "destroy: every access in the parent gets SIGBUS");
	st = stats(fd);
	result(st.regions == st0.regions && st.pages == st0.pages,
	       "destroy: region and its pages gone (regions %llu, pages %llu)",
	       (unsigned long long)st.regions, (unsigned long long)st.pages);
	result(st.mappings == st0.mappings + 2,
	       "destroy: both mappings still alive (%llu)",
	       (unsigned long long)st.mappings);
	expect(region_create(fd, id, b, n), 0, "destroy: the id and range can be reused at once");
	fill(buf, 399);
	expect(page_install(fd, id, 0, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "destroy: install a page in the reused region");
	result(!can_read(page_at(b, 0)),
	       "destroy: the old mapping still gets SIGBUS, not the new region's page");
	expect(region_destroy(fd, id), 0, "destroy: destroy the reused region");

	write(to_child[1], "x", 1);
	waitpid(pid, &status, 0);
	result(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "destroy: the child got SIGBUS too, then exited with the mapping");
	munmap((void *)b, n * PAGE);
	st = stats(fd);
	result(st.mappings == st0.mappings, "destroy: mappings counted back to %llu",
	       (unsigned long long)st.mappings);
	close(to_child[0]);
	close(to_child[1]);
	close(to_parent[0]);
	close(to_parent[1]);
}

static void test_owner_exit(int fd)
{
	const uint64_t id = 4, b = BASE_OWNER, n = 32;
	struct dsvm_stats st0, st;
	pid_t pid;
	int status;

	st0 = stats(fd);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		static uint64_t buf[PAGE / 8];
		int cfd = open_dev();

		if (cfd < 0 || hello(cfd) || region_create(cfd, id, b, n))
			_exit(1);
		for (uint64_t i = 0; i < n; i++) {
			fill(buf, i);
			if (page_install(cfd, id, i, i & 1 ? DSVM_PAGE_STATE_MODIFIED :
					 DSVM_PAGE_STATE_SHARED, buf))
				_exit(2);
		}
		if (map_region(cfd, b, n) != (void *)b)
			_exit(3);
		for (uint64_t i = 0; i < n; i++)
			if (!page_matches(b, i, i))
				_exit(4);
		/* Exit with the region, its pages and the mapping alive. */
		_exit(0);
	}
	waitpid(pid, &status, 0);
	result(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "owner exit: child created, filled and mapped a region, then exited");
	st = stats(fd);
	result(st.regions == st0.regions && st.pages == st0.pages &&
	       st.mappings == st0.mappings,
	       "owner exit: its region, pages and mapping are gone");
	expect(region_destroy(fd, id), -ENOENT, "owner exit: the region id is unknown afterwards");
}

static void test_split_and_mremap(int fd)
{
	const uint64_t id = 5, b = BASE_SPLIT, n = 8;
	static uint64_t buf[PAGE / 8];
	struct dsvm_stats st0, st;
	bool ok = true;
	void *p;

	st0 = stats(fd);
	expect(region_create(fd, id, b, n), 0, "split: region create");
	for (uint64_t i = 0; i < n; i++) {
		fill(buf, 500 + i);
		ok &= page_install(fd, id, i, DSVM_PAGE_STATE_MODIFIED, buf) == 0;
	}
	result(ok && map_region(fd, b, n) == (void *)b, "split: install and map");

	p = mremap((void *)b, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
		   (void *)(b + (1ULL << 32)));
	expect(p == MAP_FAILED ? -errno : 0, -EINVAL, "mremap: moving a region refused with EINVAL");
	p = mremap((void *)b, n * PAGE, 2 * n * PAGE, 0);
	result(p == MAP_FAILED, "mremap: growing a region refused (%s)", strerror(errno));
	result(page_matches(b, 0, 500) && page_matches(b, n - 1, 500 + n - 1),
	       "mremap: region still mapped at its base");

	result(munmap(page_at(b, 3), PAGE) == 0, "split: unmap a page in the middle");
	st = stats(fd);
	result(st.mappings == st0.mappings + 2, "split: two mappings now (%llu)",
	       (unsigned long long)(st.mappings - st0.mappings));
	ok = true;
	for (uint64_t i = 0; i < n; i++) {
		if (i == 3)
			continue;
		fill(buf, 600 + i);
		ok &= probe_write(page_at(b, i), buf, PAGE) && page_matches(b, i, 600 + i);
	}
	result(ok, "split: both parts fault and write the right pages");
	expect(page_range(fd, true, id, 0, n), (long)n, "split: invalidate reaches both parts");
	result(!can_read(page_at(b, 0)) && !can_read(page_at(b, n - 1)),
	       "split: both parts get SIGBUS afterwards");
	munmap((void *)b, n * PAGE);
	expect(region_destroy(fd, id), 0, "split: region destroy");
	st = stats(fd);
	result(st.mappings == st0.mappings, "split: mappings counted back");
}

/* Pages really return to the kernel: MemFree falls and comes back. */
static void test_leak_meminfo(int fd)
{
	const uint64_t id = 6, b = BASE_LEAK, n = 8192;	/* 32 MiB */
	static uint64_t buf[PAGE / 8];
	long before, installed, after;
	bool ok = true;

	before = free_kb();
	expect(region_create(fd, id, b, n), 0, "leak: region create (32 MiB)");
	for (uint64_t i = 0; i < n && ok; i++) {
		buf[0] = i;
		ok &= page_install(fd, id, i, i & 1 ? DSVM_PAGE_STATE_MODIFIED :
				   DSVM_PAGE_STATE_SHARED, buf) == 0;
	}
	result(ok, "leak: install %llu pages", (unsigned long long)n);
	ok = map_region(fd, b, n) == (void *)b;
	for (uint64_t i = 0; i < n && ok; i++) {
		uint64_t v;

		ok &= probe_read(page_at(b, i), &v, 8) && v == i;
		if (i & 1)
			ok &= probe_write(page_at(b, i), &v, 8);
	}
	result(ok, "leak: map and touch every page");
	installed = free_kb();
	expect(region_destroy(fd, id), 0, "leak: destroy with the mapping alive");
	munmap((void *)b, n * PAGE);
	after = free_kb();
	diag("MemFree: %ld kB before, %ld kB installed, %ld kB after", before,
	     installed, after);
	result(before - installed >= 28 * 1024,
	       "leak: MemFree fell by the 32 MiB installed (%ld kB)", before - installed);
	result(before - after <= 8 * 1024,
	       "leak: MemFree came back after destroy (%ld kB short)", before - after);
}

/* ---- fault events, the control file, writeback --------------------------- */

#define EVENTS_ID 20
#define EVENTS_PAGES 32
#define WAIT_MS 10000	/* generous under TCG; a hang fails, never passes */

static int hello_control(int fd)
{
	struct dsvm_hello h = {
		.user_version = DSVM_ABI_VERSION, .flags = DSVM_HELLO_CONTROL,
	};

	return xioctl(fd, DSVM_IOC_HELLO, &h);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* Waits until the module counts want pending events; false after WAIT_MS. */
static bool wait_pending(int fd, uint64_t want)
{
	for (int i = 0; i < WAIT_MS; i++) {
		if (stats(fd).events_pending == want)
			return true;
		sleep_ms(1);
	}
	diag("events_pending %llu, want %llu",
	     (unsigned long long)stats(fd).events_pending,
	     (unsigned long long)want);
	return false;
}

/* read() of up to n events: their number, or -errno. */
static int read_events(int cfd, struct dsvm_fault_event *ev, int n)
{
	ssize_t r = read(cfd, ev, n * sizeof(*ev));

	if (r < 0)
		return -errno;
	if (r % sizeof(*ev)) {
		diag("read returned %zd bytes", r);
		return -EIO;
	}
	return r / sizeof(*ev);
}

static bool event_is(const struct dsvm_fault_event *ev, uint64_t index,
		     uint32_t kind)
{
	bool ok = ev->region_id == EVENTS_ID && ev->page_index == index &&
		  ev->kind == kind && ev->seq != 0 && ev->reserved == 0;

	if (!ok)
		diag("event region %llu page %llu kind %u seq %llu reserved %u, want page %llu kind %u",
		     (unsigned long long)ev->region_id,
		     (unsigned long long)ev->page_index, ev->kind,
		     (unsigned long long)ev->seq, ev->reserved,
		     (unsigned long long)index, kind);
	return ok;
}

/* A thread that reads or writes one word and records how that went. */
struct faulter {
	pthread_t thread;
	volatile uint64_t *addr;
	bool write;
	uint64_t value;		/* written, or read */
	int done;		/* __atomic: 0 running, 1 done, -1 SIGBUS */
};

static int faulters_started;	/* __atomic */

static void *faulter_main(void *arg)
{
	struct faulter *f = arg;
	bool ok;

	__atomic_fetch_add(&faulters_started, 1, __ATOMIC_RELEASE);
	if (f->write)
		ok = probe_write(f->addr, &f->value, 8);
	else
		ok = probe_read(f->addr, &f->value, 8);
	__atomic_store_n(&f->done, ok ? 1 : -1, __ATOMIC_RELEASE);
	return NULL;
}

static void faulter_start(struct faulter *f, uint64_t index, bool write,
			  uint64_t value)
{
	*f = (struct faulter){
		.addr = page_at(BASE_EVENTS, index), .write = write,
		.value = value,
	};
	pthread_create(&f->thread, NULL, faulter_main, f);
}

static int faulter_state(struct faulter *f)
{
	return __atomic_load_n(&f->done, __ATOMIC_ACQUIRE);
}

/* Joins the thread; false (and the thread left behind) after WAIT_MS. */
static bool faulter_join(struct faulter *f)
{
	struct timespec deadline;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += WAIT_MS / 1000;
	return pthread_timedjoin_np(f->thread, NULL, &deadline) == 0;
}

/* Waits for a child; its status, or -1 (and the child killed) after WAIT_MS. */
static int wait_child(pid_t pid)
{
	int status;

	for (int i = 0; i < WAIT_MS; i++) {
		if (waitpid(pid, &status, WNOHANG) == pid)
			return status;
		sleep_ms(1);
	}
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return -1;
}

static int attach(int cfd, int fd)
{
	struct dsvm_attach a = { .fd = fd };

	return xioctl(cfd, DSVM_IOC_ATTACH, &a);
}

/* The file test_control() attached to cfd's domain; events map through it. */
static int client_fd = -1;

/*
 * A second daemon's domain beside cfd's, with the same region id and base:
 * a child maps it through a file attached to that domain and faults; the
 * event goes to its control file only, and cfd's invalidations of its own
 * region never unmap the child's page (the domains' file offsets differ).
 */
static void test_two_domains(int fd, int cfd)
{
	static uint64_t buf[PAGE / 8];
	int ofd = open_dev(), bfd = open_dev(), go[2], done[2];
	struct dsvm_fault_event ev[4];
	uint64_t faults_before;
	struct pollfd pfd;
	char c = 0;
	pid_t pid;
	int status;

	expect(hello_control(ofd), 0, "domains: a second control file claims a domain");
	expect(region_create(ofd, EVENTS_ID, BASE_EVENTS, EVENTS_PAGES), 0,
	       "domains: the same region id and base in the second domain");
	expect(region_create(fd, EVENTS_ID, BASE_EVENTS, 4), 0,
	       "domains: and in the plain domain");
	expect(region_destroy(fd, EVENTS_ID), 0, "domains: destroy the plain one");
	expect(attach(ofd, bfd), 0, "domains: attach a client file to the second domain");
	expect(attach(cfd, bfd), -EBUSY,
	       "domains: a file attached elsewhere refused with EBUSY");
	result(stats(fd).regions == 2, "domains: two regions on the node");
	if (pipe(go) || pipe(done)) {
		result(false, "domains: pipe (%s)", strerror(errno));
		return;
	}
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		volatile uint64_t *p = page_at(BASE_EVENTS, 0);
		uint64_t v;

		if (map_region(bfd, BASE_EVENTS, EVENTS_PAGES) != (void *)BASE_EVENTS)
			_exit(2);
		v = *p;		/* an event on ofd, answered by the install */
		if (write(done[1], &c, 1) != 1 || read(go[0], &c, 1) != 1)
			_exit(3);
		/* cfd's invalidation has happened: still mapped, no fault. */
		_exit(v == 0x5eed && *p == 0x5eed ? 0 : 4);
	}
	pfd = (struct pollfd){ .fd = ofd, .events = POLLIN };
	result(poll(&pfd, 1, WAIT_MS) == 1 && read_events(ofd, ev, 4) == 1 &&
	       event_is(&ev[0], 0, DSVM_FAULT_READ),
	       "domains: the child's fault is an event of the second control file");
	pfd = (struct pollfd){ .fd = cfd, .events = POLLIN };
	result(poll(&pfd, 1, 0) == 0, "domains: the first control file sees no event");
	buf[0] = 0x5eed;
	expect(page_install(ofd, EVENTS_ID, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "domains: the second control file installs the page");
	pfd = (struct pollfd){ .fd = done[0], .events = POLLIN };
	result(poll(&pfd, 1, WAIT_MS) == 1 && read(done[0], &c, 1) == 1,
	       "domains: the child read the page");
	faults_before = stats(fd).faults;
	buf[0] = 1;
	expect(page_install(cfd, EVENTS_ID, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "domains: the first control file installs its own page 0");
	expect((int)page_range(cfd, true, EVENTS_ID, 0, 1), 1,
	       "domains: and invalidates it");
	if (write(go[1], &c, 1) != 1)
		diag("write to the child: %s", strerror(errno));
	status = wait_child(pid);
	result(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "domains: the child's page survived the other domain's invalidation (status 0x%x)",
	       status);
	result(stats(fd).faults == faults_before,
	       "domains: no fault in the child after it (%llu before, %llu after)",
	       (unsigned long long)faults_before, (unsigned long long)stats(fd).faults);
	close(go[0]);
	close(go[1]);
	close(done[0]);
	close(done[1]);
	close(bfd);
	result(close(ofd) == 0 && stats(fd).regions == 1,
	       "domains: closing the second control file leaves the first's region");
}

/*
 * Makes cfd a control file, checks the claim's and attach's rules and that
 * other files cannot reach its domain; leaves region EVENTS_ID created by
 * cfd and client_fd attached to it. fd is a plain file (HELLO done).
 */
static void test_control(int fd, int cfd)
{
	static uint64_t buf[PAGE / 8];
	int ofd = open_dev(), xfd = open_dev(), afd = open_dev();
	struct dsvm_attach bad;
	struct dsvm_stats st;
	struct pollfd pfd;
	char c;
	int n;

	expect(hello(ofd), 0, "control: hello on another plain file");
	expect(region_create(ofd, 30, BASE_EVENTS, 4), 0,
	       "control: a plain file creates a region");
	expect(hello_control(ofd), -EBUSY,
	       "control: claim refused with EBUSY for a file with regions");
	expect(hello_control(cfd), 0, "control: claim the control file");
	expect(hello_control(cfd), 0, "control: claim repeated on the control file");
	expect(hello(cfd), 0, "control: plain hello on the control file changes nothing");
	expect(region_create(cfd, EVENTS_ID, BASE_EVENTS, EVENTS_PAGES), 0,
	       "control: the control file creates a region where a plain one is");

	/* Attach: only a control file, only a fresh or plain file without regions. */
	expect(attach(fd, afd), -EPERM, "attach: from a plain file refused with EPERM");
	expect(attach(cfd, cfd), -EINVAL, "attach: of the control file itself refused with EINVAL");
	expect(attach(cfd, 0), -EINVAL, "attach: of a file not /dev/dsvm refused with EINVAL");
	expect(attach(cfd, -1), -EBADF, "attach: of fd -1 refused with EBADF");
	bad = (struct dsvm_attach){ .fd = afd, .flags = 1 };
	expect(xioctl(cfd, DSVM_IOC_ATTACH, &bad), -EINVAL,
	       "attach: with flags set refused with EINVAL");
	bad = (struct dsvm_attach){ .fd = afd, .reserved = 1 };
	expect(xioctl(cfd, DSVM_IOC_ATTACH, &bad), -EINVAL,
	       "attach: with reserved set refused with EINVAL");
	expect(attach(cfd, ofd), -EBUSY, "attach: of a file with regions refused with EBUSY");
	expect(attach(cfd, afd), 0, "attach: a fresh file becomes a client of the domain");
	expect(attach(cfd, afd), 0, "attach: repeated");
	expect(attach(cfd, xfd), 0, "attach: a file without a handshake may be attached");
	expect(hello_control(xfd), -EBUSY, "attach: a client file cannot claim control (EBUSY)");
	expect(xioctl(xfd, DSVM_IOC_STATS, &st), -EPROTO,
	       "control: a refused claim leaves the file without a handshake");
	expect(hello(afd), 0, "attach: hello on the client file");
	expect(region_create(afd, 22, BASE_EVENTS + (1ULL << 32), 4), -EPERM,
	       "attach: region create from a client file refused with EPERM");
	expect(page_install(afd, EVENTS_ID, 0, DSVM_PAGE_STATE_SHARED, buf), -EPERM,
	       "attach: page install from a client file refused with EPERM");
	expect((int)page_op(afd, DSVM_IOC_PAGE_WAKE, EVENTS_ID, 0, 1), -EPERM,
	       "attach: page wake from a client file refused with EPERM");
	expect(read(afd, buf, sizeof(struct dsvm_fault_event)) < 0 ? -errno : 0, -EPERM,
	       "attach: read of events from a client file refused with EPERM");
	expect(xioctl(afd, DSVM_IOC_STATS, &st), 0, "attach: stats from a client file allowed");
	{
		/* The daemon shares a client file among its clients: a mirror
		 * there would be every client's to read. */
		void *anon = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct dsvm_mirror_register mr = { .start = (uintptr_t)anon, .length = PAGE };
		struct dsvm_mirror_read mrd = { .mirror_id = 1, .data = (uintptr_t)buf };

		expect(xioctl(afd, DSVM_IOC_MIRROR_REGISTER, &mr), -EPERM,
		       "attach: a mirror on a client file refused with EPERM");
		expect(xioctl(afd, DSVM_IOC_MIRROR_READ, &mrd), -EPERM,
		       "attach: a mirror read on a client file refused with EPERM");
		munmap(anon, PAGE);
	}
	result(map_region(afd, BASE_EVENTS, EVENTS_PAGES) == (void *)BASE_EVENTS &&
	       munmap((void *)BASE_EVENTS, EVENTS_PAGES * PAGE) == 0,
	       "control: the client file maps it");
	result(map_region(ofd, BASE_EVENTS, 4) == (void *)BASE_EVENTS &&
	       munmap((void *)BASE_EVENTS, 4 * PAGE) == 0,
	       "control: the plain file maps its plain region at the same base");
	expect(region_destroy(ofd, 30), 0, "control: destroy the plain region");
	result(map_region(fd, BASE_EVENTS, EVENTS_PAGES) == MAP_FAILED && errno == ENOENT,
	       "control: a plain file cannot map the domain's region (ENOENT)");
	close(ofd);
	close(xfd);

	/* Another file reaches nothing of the domain. */
	expect(region_destroy(fd, EVENTS_ID), -ENOENT,
	       "control: region destroy from a plain file finds nothing (ENOENT)");
	expect(page_install(fd, EVENTS_ID, 0, DSVM_PAGE_STATE_SHARED, buf), -ENOENT,
	       "control: page install from a plain file finds nothing (ENOENT)");
	expect((int)page_op(fd, DSVM_IOC_PAGE_INVALIDATE, EVENTS_ID, 0, 1), -ENOENT,
	       "control: page invalidate from a plain file finds nothing (ENOENT)");
	expect(page_writeback(fd, EVENTS_ID, 0, 0, buf, NULL, NULL), -ENOENT,
	       "control: page writeback from a plain file finds nothing (ENOENT)");
	expect(xioctl(fd, DSVM_IOC_STATS, &st), 0,
	       "control: stats from another file still allowed");
	expect(read(fd, buf, sizeof(struct dsvm_fault_event)) < 0 ? -errno : 0,
	       -EPERM, "control: read of events from another file refused with EPERM");
	pfd = (struct pollfd){ .fd = fd, .events = POLLIN };
	n = poll(&pfd, 1, 0);
	result(n == 1 && (pfd.revents & POLLERR) && !(pfd.revents & POLLIN),
	       "control: poll on another file reports POLLERR (0x%x)", pfd.revents);
	expect(read(cfd, &c, 1) < 0 ? -errno : 0, -EINVAL,
	       "control: read with a buffer smaller than an event refused with EINVAL");
	expect(read(cfd, buf, sizeof(struct dsvm_fault_event) - 1) < 0 ? -errno : 0,
	       -EINVAL, "control: read of 31 bytes refused with EINVAL");
	client_fd = afd;
	test_two_domains(fd, cfd);
}

static void test_events(int fd, int cfd)
{
	const uint64_t id = EVENTS_ID, b = BASE_EVENTS;
	static uint64_t buf[PAGE / 8];
	struct dsvm_fault_event ev[16];
	struct faulter f[8];
	struct dsvm_stats st0, st;
	struct epoll_event ee;
	struct pollfd pfd;
	bool ok, seen[3];
	pid_t pid;
	int n, epfd;

	if (map_region(client_fd, b, EVENTS_PAGES) != (void *)b) {
		result(false, "events: mmap (%s)", strerror(errno));
		return;
	}
	st0 = stats(fd);

	/* An empty queue. */
	fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
	expect(read_events(cfd, ev, 4), -EAGAIN,
	       "events: O_NONBLOCK read of an empty queue fails with EAGAIN");
	pfd = (struct pollfd){ .fd = cfd, .events = POLLIN };
	result(poll(&pfd, 1, 0) == 0, "events: poll of an empty queue reports nothing");

	/* A read of a page not installed: one event, the reader sleeps. */
	faulter_start(&f[0], 0, false, 0);
	result(wait_pending(fd, 1), "read event: one event pending");
	pfd = (struct pollfd){ .fd = cfd, .events = POLLIN };
	result(poll(&pfd, 1, WAIT_MS) == 1 && (pfd.revents & POLLIN),
	       "read event: poll reports POLLIN");
	sleep_ms(50);
	result(faulter_state(&f[0]) == 0, "read event: the reader sleeps");
	n = read_events(cfd, ev, 4);
	st = stats(fd);
	result(n == 1 && event_is(&ev[0], 0, DSVM_FAULT_READ) &&
	       ev[0].seq == st.events,
	       "read event: read returns region, page 0, kind read, seq %llu (events %llu)",
	       (unsigned long long)(n > 0 ? ev[0].seq : 0),
	       (unsigned long long)st.events);
	result(poll(&pfd, 1, 0) == 0,
	       "read event: poll reports nothing once the event was read");
	result(stats(fd).events_pending == 1 && faulter_state(&f[0]) == 0,
	       "read event: still pending and the reader still sleeps until answered");
	fill(buf, 200);
	expect(page_install(cfd, id, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "read event: install answers it");
	result(faulter_join(&f[0]) && f[0].done == 1 && f[0].value == buf[0],
	       "read event: the reader wakes and reads the installed bytes");
	result(page_matches(b, 0, 200) && stats(fd).events_pending == 0,
	       "read event: page readable, nothing pending");

	/* A write to a page not installed. */
	faulter_start(&f[0], 1, true, 0x1111);
	result(wait_pending(fd, 1), "write event: one event pending");
	n = read_events(cfd, ev, 4);
	result(n == 1 && event_is(&ev[0], 1, DSVM_FAULT_WRITE),
	       "write event: kind write, page 1");
	fill(buf, 201);
	expect(page_install(cfd, id, 1, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "write event: install Modified answers it");
	result(faulter_join(&f[0]) && f[0].done == 1 &&
	       *(volatile uint64_t *)page_at(b, 1) == 0x1111,
	       "write event: the writer wakes and its write lands");

	/* A write to a Shared page not mapped (.fault). */
	fill(buf, 202);
	expect(page_install(cfd, id, 2, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "upgrade event: install a Shared page");
	faulter_start(&f[0], 2, true, 0x2222);
	result(wait_pending(fd, 1), "upgrade event: one event pending (write fault)");
	n = read_events(cfd, ev, 4);
	result(n == 1 && event_is(&ev[0], 2, DSVM_FAULT_UPGRADE),
	       "upgrade event: kind upgrade, page 2");
	expect((int)page_upgrade(cfd, id, 2, 1), 1, "upgrade event: upgrade answers it");
	result(faulter_join(&f[0]) && f[0].done == 1 &&
	       *(volatile uint64_t *)page_at(b, 2) == 0x2222,
	       "upgrade event: the write lands");
	result(((volatile uint64_t *)page_at(b, 2))[1] == buf[1],
	       "upgrade event: in place, the rest of the page kept");
	expect((int)page_upgrade(cfd, id, 2, 1), 0, "upgrade: again is a no-op");
	expect((int)page_upgrade(cfd, id, 3, 1), 0, "upgrade: a page not installed is a no-op");

	/* A write to a Shared page mapped read-only (.page_mkwrite). */
	fill(buf, 203);
	expect(page_install(cfd, id, 3, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "upgrade event: install another Shared page");
	result(page_matches(b, 3, 203), "upgrade event: map it read-only");
	faulter_start(&f[0], 3, true, 0x3333);
	result(wait_pending(fd, 1), "upgrade event: one event pending (mkwrite)");
	n = read_events(cfd, ev, 4);
	result(n == 1 && event_is(&ev[0], 3, DSVM_FAULT_UPGRADE),
	       "upgrade event: kind upgrade, page 3");
	expect((int)page_upgrade(cfd, id, 0, EVENTS_PAGES), 2,
	       "upgrade event: upgrading the whole region (pages 0 and 3 Shared) answers it");
	result(faulter_join(&f[0]) && f[0].done == 1 &&
	       *(volatile uint64_t *)page_at(b, 3) == 0x3333,
	       "upgrade event: the write lands");

	/* Eight threads on one page: one event, all wake. */
	__atomic_store_n(&faulters_started, 0, __ATOMIC_RELAXED);
	for (int t = 0; t < 8; t++)
		faulter_start(&f[t], 4, false, 0);
	while (__atomic_load_n(&faulters_started, __ATOMIC_ACQUIRE) < 8)
		sleep_ms(1);
	result(wait_pending(fd, 1), "same page: one event pending");
	sleep_ms(200);	/* every thread has faulted by now, or is about to */
	st = stats(fd);
	n = read_events(cfd, ev, 16);
	result(n == 1 && event_is(&ev[0], 4, DSVM_FAULT_READ) &&
	       st.events - st0.events == 5,
	       "same page: 8 threads faulting, one event read (%d, %llu raised)", n,
	       (unsigned long long)(st.events - st0.events));
	ok = true;
	for (int t = 0; t < 8; t++)
		ok &= faulter_state(&f[t]) == 0;
	result(ok, "same page: all 8 sleep");
	fill(buf, 204);
	expect(page_install(cfd, id, 4, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "same page: install");
	ok = true;
	for (int t = 0; t < 8; t++)
		ok &= faulter_join(&f[t]) && f[t].done == 1 && f[t].value == buf[0];
	result(ok, "same page: all 8 wake with the installed bytes");
	expect(read_events(cfd, ev, 16), -EAGAIN, "same page: no second event");

	/* Several events per read, a buffer of N returns up to N. */
	faulter_start(&f[0], 5, false, 0);
	faulter_start(&f[1], 6, true, 0x6666);
	faulter_start(&f[2], 7, false, 0);
	result(wait_pending(fd, 3), "several: three events pending");
	n = read_events(cfd, ev, 2);
	result(n == 2, "several: a buffer of 2 events returns 2 (%d)", n);
	n = read_events(cfd, ev + 2, 8);
	result(n == 1, "several: the next read returns the third (%d)", n);
	memset(seen, 0, sizeof(seen));
	ok = true;
	for (int i = 0; i < 3; i++) {
		uint64_t p = ev[i].page_index;

		ok &= p >= 5 && p <= 7 && !seen[p - 5] && ev[i].region_id == id &&
		      ev[i].kind == (p == 6 ? DSVM_FAULT_WRITE : DSVM_FAULT_READ) &&
		      (i == 0 || ev[i].seq > ev[i - 1].seq);
		if (p >= 5 && p <= 7)
			seen[p - 5] = true;
	}
	result(ok, "several: pages 5, 6, 7 once each, right kinds, seq increasing");
	fill(buf, 205);
	ok = page_install(cfd, id, 5, DSVM_PAGE_STATE_SHARED, buf) == 0 &&
	     page_install(cfd, id, 6, DSVM_PAGE_STATE_MODIFIED, buf) == 0 &&
	     page_install(cfd, id, 7, DSVM_PAGE_STATE_SHARED, NULL) == 0;
	for (int t = 0; t < 3; t++)
		ok &= faulter_join(&f[t]) && f[t].done == 1;
	result(ok && f[0].value == buf[0] && f[2].value == 0 &&
	       *(volatile uint64_t *)page_at(b, 6) == 0x6666,
	       "several: all three answered and woken");

	/* epoll, and a blocking read. */
	epfd = epoll_create1(EPOLL_CLOEXEC);
	ee = (struct epoll_event){ .events = EPOLLIN };
	result(epfd >= 0 && epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ee) == 0 &&
	       epoll_wait(epfd, &ee, 1, 0) == 0,
	       "epoll: nothing reported on an empty queue");
	faulter_start(&f[0], 8, false, 0);
	result(epoll_wait(epfd, &ee, 1, WAIT_MS) == 1 && (ee.events & EPOLLIN),
	       "epoll: EPOLLIN once a fault raised an event");
	close(epfd);
	fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) & ~O_NONBLOCK);
	n = read_events(cfd, ev, 4);
	result(n == 1 && event_is(&ev[0], 8, DSVM_FAULT_READ),
	       "blocking read: returns the event");
	faulter_start(&f[1], 9, false, 0);
	n = read_events(cfd, ev, 4);	/* blocks until the fault */
	result(n == 1 && event_is(&ev[0], 9, DSVM_FAULT_READ),
	       "blocking read: waits for the next fault's event");
	fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
	ok = page_install(cfd, id, 8, DSVM_PAGE_STATE_SHARED, NULL) == 0 &&
	     page_install(cfd, id, 9, DSVM_PAGE_STATE_SHARED, NULL) == 0;
	result(ok && faulter_join(&f[0]) && faulter_join(&f[1]),
	       "blocking read: both readers answered");

	/* Invalidate answers an upgrade: the writer then needs the page back. */
	fill(buf, 206);
	expect(page_install(cfd, id, 10, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "invalidate answer: install a Shared page");
	faulter_start(&f[0], 10, true, 0xaaaa);
	result(wait_pending(fd, 1) && read_events(cfd, ev, 4) == 1 &&
	       event_is(&ev[0], 10, DSVM_FAULT_UPGRADE),
	       "invalidate answer: upgrade event");
	expect((int)page_range(cfd, true, id, 10, 1), 1,
	       "invalidate answer: invalidate the page");
	result(wait_pending(fd, 1) && read_events(cfd, ev, 4) == 1 &&
	       event_is(&ev[0], 10, DSVM_FAULT_WRITE),
	       "invalidate answer: the writer retries and raises a write event");
	expect(page_install(cfd, id, 10, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "invalidate answer: install Modified");
	result(faulter_join(&f[0]) && f[0].done == 1 &&
	       *(volatile uint64_t *)page_at(b, 10) == 0xaaaa,
	       "invalidate answer: the write lands");

	/* Killed sleepers: .fault (mmap_lock dropped) and .page_mkwrite (held). */
	for (int mk = 0; mk < 2; mk++) {
		const uint64_t index = 11 + mk;
		const char *how = mk ? "mkwrite" : "fault";
		int status;

		if (mk)
			page_install(cfd, id, index, DSVM_PAGE_STATE_SHARED, NULL);
		fflush(stdout);
		pid = fork();
		if (pid == 0) {
			volatile uint64_t *p = page_at(b, index);

			close(cfd);
			signal(SIGBUS, SIG_DFL);
			if (mk) {
				(void)*p;	/* map it read-only */
				*p = 1;
			} else {
				(void)*p;
			}
			_exit(0);
		}
		result(wait_pending(fd, 1), "killed (%s): the child sleeps on an event", how);
		kill(pid, SIGKILL);
		status = wait_child(pid);
		result(status != -1 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
		       "killed (%s): the child dies of SIGKILL (status 0x%x)", how, status);
		n = read_events(cfd, ev, 4);
		result(n == 1 && event_is(&ev[0], index, mk ? DSVM_FAULT_UPGRADE :
					  DSVM_FAULT_READ) &&
		       stats(fd).events_pending == 1,
		       "killed (%s): its event stays for the daemon", how);
		if (mk)
			expect((int)page_upgrade(cfd, id, index, 1), 1,
			       "killed (mkwrite): the daemon answers anyway");
		else
			expect(page_install(cfd, id, index, DSVM_PAGE_STATE_SHARED, NULL), 0,
			       "killed (fault): the daemon answers anyway");
		st = stats(fd);
		result(st.events_pending == 0 && st.mappings == st0.mappings,
		       "killed (%s): nothing pending, the child's mapping gone", how);
	}
}

static void test_writeback(int fd, int cfd)
{
	const uint64_t id = EVENTS_ID, b = BASE_EVENTS;
	static uint64_t buf[PAGE / 8], want[PAGE / 8];
	uint32_t state, dirty;
	struct dsvm_stats st0;
	void *ro;

	/* Page 1: installed Modified (seed 201), then written 0x1111 at word 0. */
	fill(want, 201);
	want[0] = 0x1111;
	memset(buf, 0, sizeof(buf));
	expect(page_writeback(cfd, id, 1, 0, buf, &state, &dirty), 0,
	       "writeback: a written Modified page");
	result(!memcmp(buf, want, PAGE), "writeback: returns the written bytes");
	result(state == DSVM_PAGE_STATE_MODIFIED && dirty == 1,
	       "writeback: state Modified, dirty (%u, %u)", state, dirty);
	expect(page_writeback(cfd, id, 1, 0, buf, &state, &dirty), 0,
	       "writeback: again");
	result(dirty == 0 && !memcmp(buf, want, PAGE),
	       "writeback: dirty cleared, same bytes");
	want[5] = 0x5555;
	result(probe_write(&((uint64_t *)page_at(b, 1))[5], &want[5], 8),
	       "writeback: write the page again");
	expect(page_writeback(cfd, id, 1, 0, buf, &state, &dirty), 0,
	       "writeback: after the write");
	result(dirty == 1 && !memcmp(buf, want, PAGE),
	       "writeback: the new write is there and marked dirty again");

	want[6] = 0x6666;
	probe_write(&((uint64_t *)page_at(b, 1))[6], &want[6], 8);
	expect(page_writeback(cfd, id, 1, DSVM_PAGE_WRITEBACK_DOWNGRADE, buf,
			      &state, &dirty), 0,
	       "writeback: with downgrade");
	result(dirty == 1 && state == DSVM_PAGE_STATE_MODIFIED && !memcmp(buf, want, PAGE),
	       "writeback: with downgrade returns the bytes, Modified before, dirty");
	expect(page_writeback(cfd, id, 1, 0, buf, &state, &dirty), 0,
	       "writeback: of the downgraded page");
	result(state == DSVM_PAGE_STATE_SHARED && dirty == 0,
	       "writeback: the page is Shared now, clean");

	fill(want, 210);
	expect(page_install(cfd, id, 13, DSVM_PAGE_STATE_MODIFIED, want), 0,
	       "writeback: install a Modified page");
	expect(page_writeback(cfd, id, 13, 0, buf, &state, &dirty), 0,
	       "writeback: of a page never written");
	result(dirty == 0 && !memcmp(buf, want, PAGE),
	       "writeback: installed bytes, not dirty");
	want[7] = 0x7777;
	probe_write(&((uint64_t *)page_at(b, 13))[7], &want[7], 8);
	ro = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	expect(page_writeback(cfd, id, 13, DSVM_PAGE_WRITEBACK_INVALIDATE, ro,
			      NULL, NULL), -EFAULT,
	       "writeback: into read-only memory refused with EFAULT");
	munmap(ro, PAGE);
	expect(page_writeback(cfd, id, 13, DSVM_PAGE_WRITEBACK_INVALIDATE,
			      (void *)8, NULL, NULL), -EFAULT,
	       "writeback: into an unmapped address refused with EFAULT");
	st0 = stats(fd);
	expect(page_writeback(cfd, id, 13, DSVM_PAGE_WRITEBACK_INVALIDATE, buf,
			      &state, &dirty), 0,
	       "writeback: with invalidate (the refused ones left the page)");
	result(dirty == 1 && state == DSVM_PAGE_STATE_MODIFIED && !memcmp(buf, want, PAGE),
	       "writeback: with invalidate returns the written bytes, dirty");
	result(stats(fd).pages == st0.pages - 1,
	       "writeback: with invalidate drops the page");
	expect(page_writeback(cfd, id, 13, 0, buf, NULL, NULL), -ENODATA,
	       "writeback: of a dropped page refused with ENODATA");
}

/*
 * DSVM_IOC_PAGE_POISON on region EVENTS_ID (mapped by fd at BASE_EVENTS),
 * pages 14-19 and 24-27: sleepers in .fault (read, write: mmap_lock
 * dropped, VM_FAULT_RETRY) and .page_mkwrite (mmap_lock held) wake and get
 * SIGBUS; later faults get SIGBUS at once; install and invalidate clear it.
 * Leaves those pages not installed and not poisoned.
 */
static void test_poison(int fd, int cfd)
{
	const uint64_t id = EVENTS_ID, b = BASE_EVENTS;
	const uint64_t pages[3] = { 14, 15, 16 };
	static const char *const how[3] = { "read", "write", "mkwrite" };
	static uint64_t buf[PAGE / 8];
	struct dsvm_fault_event ev[8];
	struct dsvm_stats st0, st;
	struct faulter f[2];
	pid_t pids[3];
	bool ok = true;
	int n;

	fill(buf, 230);
	expect(page_install(cfd, id, 16, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "poison: install a Shared page for the mkwrite sleeper");
	st0 = stats(fd);
	fflush(stdout);
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		if (pids[i] == 0) {
			volatile uint64_t *p = page_at(b, pages[i]);

			close(cfd);
			signal(SIGBUS, SIG_DFL);
			if (i == 0) {
				(void)*p;
			} else if (i == 1) {
				*p = 1;
			} else {
				(void)*p;	/* map it read-only */
				*p = 1;
			}
			_exit(0);
		}
	}
	faulter_start(&f[0], 17, false, 0);
	result(wait_pending(fd, 4),
	       "poison: three children (read, write, mkwrite) and a thread sleep on events");
	n = read_events(cfd, ev, 8);
	result(n == 4, "poison: the daemon reads their 4 events (%d)", n);
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 14, 4), 4,
	       "poison: poison the 4 pages (one of them installed)");
	for (int i = 0; i < 3; i++) {
		int status = wait_child(pids[i]);

		if (status == -1 || !WIFSIGNALED(status) || WTERMSIG(status) != SIGBUS) {
			diag("child %s (page %llu): status 0x%x", how[i],
			     (unsigned long long)pages[i], status);
			ok = false;
		}
	}
	result(ok, "poison: every sleeping child (read, write, mkwrite) dies of SIGBUS");
	result(faulter_join(&f[0]) && f[0].done == -1,
	       "poison: the sleeping thread gets SIGBUS");
	st = stats(fd);
	result(st.events_pending == 0 && st.events == st0.events + 4 &&
	       st.pages == st0.pages - 1 && st.refused >= st0.refused + 4,
	       "poison: nothing pending, no new event, the installed page freed, refused +%llu",
	       (unsigned long long)(st.refused - st0.refused));

	/* A poisoned page: SIGBUS at once, read or write, no event. */
	st0 = stats(fd);
	faulter_start(&f[0], 14, false, 0);
	faulter_start(&f[1], 14, true, 0x1414);
	ok = faulter_join(&f[0]) & faulter_join(&f[1]);
	result(ok && f[0].done == -1 && f[1].done == -1,
	       "poisoned: a read and a write get SIGBUS at once");
	st = stats(fd);
	result(st.events == st0.events && st.events_pending == 0 &&
	       st.refused >= st0.refused + 2,
	       "poisoned: no event raised (%llu), both refused (+%llu)",
	       (unsigned long long)(st.events - st0.events),
	       (unsigned long long)(st.refused - st0.refused));

	/* An installed page, mapped writable, poisoned. */
	fill(buf, 231);
	expect(page_install(cfd, id, 18, DSVM_PAGE_STATE_MODIFIED, buf), 0,
	       "poison mapped: install a Modified page");
	result(page_matches(b, 18, 231) && can_write(page_at(b, 18)),
	       "poison mapped: the page is mapped and written");
	st0 = stats(fd);
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 18, 1), 1,
	       "poison mapped: poison it");
	st = stats(fd);
	result(st.pages == st0.pages - 1, "poison mapped: the page is freed (pages %llu -> %llu)",
	       (unsigned long long)st0.pages, (unsigned long long)st.pages);
	faulter_start(&f[0], 18, false, 0);
	faulter_start(&f[1], 18, true, 0x1818);
	ok = faulter_join(&f[0]) & faulter_join(&f[1]);
	result(ok && f[0].done == -1 && f[1].done == -1,
	       "poison mapped: the mapping's next read and write get SIGBUS");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 18, 1), 0,
	       "poison: again is a no-op (idempotent)");
	expect((int)page_upgrade(cfd, id, 18, 1) | (int)page_range(cfd, false, id, 18, 1), 0,
	       "poison: upgrade and downgrade leave a poisoned page alone");
	expect(page_writeback(cfd, id, 18, 0, buf, NULL, NULL), -ENODATA,
	       "poison: writeback of a poisoned page refused with ENODATA");

	/* Install clears the poison. */
	fill(buf, 232);
	expect(page_install(cfd, id, 18, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "poison clear: install over a poisoned page allowed");
	result(page_matches(b, 18, 232),
	       "poison clear: the mapping reads the installed bytes");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 18, 1), 1,
	       "poison clear: poisoning it again counts it (the install cleared it)");
	expect(page_install(cfd, id, 14, DSVM_PAGE_STATE_MODIFIED, NULL), 0,
	       "poison clear: install a poisoned page Modified");
	result(can_write(page_at(b, 14)) &&
	       *(volatile uint64_t *)page_at(b, 14) == 0x5a5a5a5a5a5a5a5aULL &&
	       ((volatile uint64_t *)page_at(b, 14))[1] == 0,
	       "poison clear: the page is written and reads back");

	/* Invalidate clears it: faults raise events again. */
	expect(page_range(cfd, true, id, 15, 1), 0,
	       "poison clear: invalidate of a poisoned page drops nothing");
	faulter_start(&f[0], 15, false, 0);
	result(wait_pending(fd, 1) && read_events(cfd, ev, 8) == 1 &&
	       event_is(&ev[0], 15, DSVM_FAULT_READ),
	       "poison clear: after invalidate a fault raises a read event again");
	fill(buf, 233);
	expect(page_install(cfd, id, 15, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "poison clear: install answers it");
	result(faulter_join(&f[0]) && f[0].done == 1 && f[0].value == buf[0],
	       "poison clear: the reader wakes with the installed bytes");

	/* A range: 24 poisoned, 25 installed, 26 and 27 neither. */
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 24, 1), 1,
	       "poison range: poison page 24");
	expect(page_install(cfd, id, 25, DSVM_PAGE_STATE_SHARED, NULL), 0,
	       "poison range: install page 25");
	st0 = stats(fd);
	expect((int)page_op(cfd, DSVM_IOC_PAGE_POISON, id, 24, 4), 3,
	       "poison range: 4 pages, 3 newly poisoned");
	st = stats(fd);
	result(st.pages == st0.pages - 1 && !can_read(page_at(b, 25)) &&
	       !can_read(page_at(b, 27)),
	       "poison range: the installed one freed, all refused");

	/* Clean up: 14 and 15 installed, 16-18 and 24-27 poisoned. */
	expect(page_range(cfd, true, id, 14, 14), 2,
	       "poison: invalidate pages 14-27 (2 installed)");
	st = stats(fd);
	result(st.events_pending == 0 && st.mappings == 1,
	       "poison: nothing pending, only our mapping left");
}

/*
 * The control file closes while threads sleep on events: children in
 * .fault and .page_mkwrite, and a thread of ours. They all get SIGBUS,
 * never a hang; then later faults get SIGBUS at once.
 */
/*
 * DSVM_IOC_PAGE_WAKE on region EVENTS_ID, page 30: a sleeper's event is
 * answered without a change; the sleeper raises a new one and sleeps on,
 * until the page is installed. Leaves page 30 not installed.
 */
static void test_wake(int fd, int cfd)
{
	const uint64_t id = EVENTS_ID;
	struct dsvm_fault_event ev[4];
	struct dsvm_stats st0, st;
	struct faulter f;
	uint64_t first_seq = 0;
	int n;

	st0 = stats(fd);
	faulter_start(&f, 30, false, 0);
	result(wait_pending(fd, 1), "wake: a reader sleeps on page 30's event");
	n = read_events(cfd, ev, 4);
	if (n == 1)
		first_seq = ev[0].seq;
	result(n == 1 && ev[0].page_index == 30, "wake: the daemon reads it (%d)", n);
	expect((int)page_op(cfd, DSVM_IOC_PAGE_WAKE, id, 30, 1), 1,
	       "wake: answers the one pending event");
	result(wait_pending(fd, 1), "wake: the reader raises a new event");
	st = stats(fd);
	n = read_events(cfd, ev, 4);
	result(n == 1 && ev[0].page_index == 30 && ev[0].seq > first_seq &&
	       st.events == st0.events + 2,
	       "wake: the new event is a second one for page 30 (%d, %llu events)", n,
	       (unsigned long long)(st.events - st0.events));
	result(faulter_state(&f) == 0, "wake: the reader still sleeps (no page yet)");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_WAKE, id, 29, 1), 0,
	       "wake: a page with no event answers none");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_WAKE, id, 31, EVENTS_PAGES - 31), 0,
	       "wake: nor does a range past it");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_WAKE, id, 0, EVENTS_PAGES), 1,
	       "wake: the whole region answers the one event");
	result(wait_pending(fd, 1), "wake: and the reader raises a third");
	expect(page_install(cfd, id, 30, DSVM_PAGE_STATE_SHARED, NULL), 0,
	       "wake: install page 30");
	result(faulter_join(&f) && faulter_state(&f) == 1 && f.value == 0,
	       "wake: the reader reads the installed page");
	expect((int)page_op(cfd, DSVM_IOC_PAGE_INVALIDATE, id, 30, 1), 1,
	       "wake: page 30 dropped again");
	result(stats(fd).events_pending == 0, "wake: nothing left pending");
}

/*
 * With cfd's domain at its bound, a second daemon's domain is not: a
 * child's fault there is that daemon's event at once, and the install
 * lets the child read. (A node-wide count held it until cfd answered.)
 */
static void bound_other_domain(void)
{
	/* Beside cfd's region, which this process maps. */
	const uint64_t other_base = BASE_EVENTS + (2ULL << 32);
	static uint64_t buf[PAGE / 8];
	int ofd = open_dev(), bfd = open_dev();
	struct dsvm_fault_event ev[4];
	struct pollfd pfd;
	pid_t pid;
	int status;

	expect(hello_control(ofd), 0, "bound: a second daemon's control file");
	expect(region_create(ofd, 40, other_base, 4), 0, "bound: its region");
	expect(attach(ofd, bfd), 0, "bound: its client file");
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		volatile uint64_t *p = page_at(other_base, 0);

		if (map_region(bfd, other_base, 4) != (void *)other_base)
			_exit(2);
		_exit(*p == 0xb0b ? 0 : 3);
	}
	pfd = (struct pollfd){ .fd = ofd, .events = POLLIN };
	result(poll(&pfd, 1, WAIT_MS) == 1 && read_events(ofd, ev, 4) == 1 &&
	       ev[0].region_id == 40 && ev[0].page_index == 0 && ev[0].kind == DSVM_FAULT_READ,
	       "bound: the second daemon hears its client's fault while the first is full");
	buf[0] = 0xb0b;
	expect(page_install(ofd, 40, 0, DSVM_PAGE_STATE_SHARED, buf), 0,
	       "bound: the second daemon installs the page");
	status = wait_child(pid);
	result(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "bound: its client read it (status 0x%x)", status);
	close(bfd);
	close(ofd);
}

/*
 * The bound on pending events per domain (max_pending_events = 2): six
 * readers of six pages not installed; at most two events are pending at
 * once, the others wait for room without raising one; the daemon answering
 * two lets two more in, until every reader has its page.
 */
static void test_event_bound(int fd, int cfd)
{
	const uint64_t id = EVENTS_ID, first = 8, n = 6;
	struct dsvm_fault_event ev[8];
	struct faulter f[6];
	uint64_t served = 0, most = 0;
	bool all = true;

	page_range(cfd, true, id, first, n);
	if (!set_param("max_pending_events", 2)) {
		result(false, "bound: set max_pending_events (%s)", strerror(errno));
		return;
	}
	for (uint64_t i = 0; i < n; i++)
		faulter_start(&f[i], first + i, false, 0);
	result(wait_pending(fd, 2), "bound: two of six readers raise events");
	sleep_ms(100);
	result(stats(fd).events_pending == 2, "bound: and no third one (%llu pending)",
	       (unsigned long long)stats(fd).events_pending);
	bound_other_domain();
	for (int rounds = 0; rounds < WAIT_MS && served < n; rounds++) {
		uint64_t pending = stats(fd).events_pending;
		int got = read_events(cfd, ev, 8);

		most = pending > most ? pending : most;
		for (int k = 0; k < got; k++) {
			if (page_install(cfd, id, ev[k].page_index, DSVM_PAGE_STATE_SHARED, NULL) == 0)
				served++;
		}
		if (got <= 0)
			sleep_ms(1);
	}
	result(served == n && most <= 2, "bound: all six served, at most 2 pending (%llu, %llu)",
	       (unsigned long long)served, (unsigned long long)most);
	for (uint64_t i = 0; i < n; i++)
		all &= faulter_join(&f[i]) && faulter_state(&f[i]) == 1 && f[i].value == 0;
	result(all, "bound: every reader read its page");
	result(set_param("max_pending_events", 16384), "bound: max_pending_events back to 16384");
	page_range(cfd, true, id, first, n);
	result(stats(fd).events_pending == 0, "bound: nothing left pending");
}

static void test_control_close(int fd, int cfd)
{
	const uint64_t b = BASE_EVENTS;
	const uint64_t pages[3] = { 20, 21, 22 };
	struct faulter f;
	pid_t pids[3];
	bool ok = true;
	int ofd;

	page_install(cfd, EVENTS_ID, 22, DSVM_PAGE_STATE_SHARED, NULL);
	fflush(stdout);
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		if (pids[i] == 0) {
			volatile uint64_t *p = page_at(b, pages[i]);

			close(cfd);
			signal(SIGBUS, SIG_DFL);
			if (i == 0)
				(void)*p;
			else if (i == 1)
				*p = 1;
			else {
				(void)*p;
				*p = 1;
			}
			_exit(0);
		}
	}
	faulter_start(&f, 23, false, 0);
	result(wait_pending(fd, 4), "control close: three children and a thread sleep");
	result(close(cfd) == 0, "control close: close the control file");
	for (int i = 0; i < 3; i++) {
		int status = wait_child(pids[i]);

		if (status == -1 || !WIFSIGNALED(status) || WTERMSIG(status) != SIGBUS) {
			diag("child %d (page %llu): status 0x%x", i,
			     (unsigned long long)pages[i], status);
			ok = false;
		}
	}
	result(ok, "control close: every sleeping child dies of SIGBUS");
	result(faulter_join(&f) && f.done == -1,
	       "control close: the sleeping thread gets SIGBUS");
	result(!can_read(page_at(b, 0)) && !can_read(page_at(b, 30)) &&
	       !can_write(page_at(b, 31)),
	       "control close: later faults get SIGBUS at once");
	result(stats(fd).events_pending == 0 && stats(fd).regions == 0,
	       "control close: no event pending, the region gone");
	munmap((void *)b, EVENTS_PAGES * PAGE);
	result(map_region(client_fd, b, EVENTS_PAGES) == MAP_FAILED && errno == ENOENT,
	       "control close: the client file maps nothing any more (ENOENT)");
	close(client_fd);
	client_fd = -1;
	ofd = open_dev();
	expect(hello_control(ofd), 0, "control close: a new daemon can claim control");
	expect(region_create(ofd, EVENTS_ID, b, EVENTS_PAGES), 0,
	       "control close: and create the region again");
	close(ofd);
	result(stats(fd).regions == 0, "control close: gone with its file");
}

/* ---- the HMM mirror ------------------------------------------------------ */

#define BASE_MIRROR	0x680000000000UL	/* anonymous memory, not /dev/dsvm */
#define BASE_MIRROR_DEV	0x690000000000UL	/* a region, to be refused */
#define MIRROR_PAGES	16

static int mirror_register(int fd, uint64_t start, uint64_t length,
			   uint64_t *id)
{
	struct dsvm_mirror_register mr = { .start = start, .length = length };
	int ret = xioctl(fd, DSVM_IOC_MIRROR_REGISTER, &mr);

	if (id)
		*id = ret ? 0 : mr.mirror_id;
	return ret;
}

static int mirror_unregister(int fd, uint64_t id)
{
	struct dsvm_mirror_unregister mu = { .mirror_id = id };

	return xioctl(fd, DSVM_IOC_MIRROR_UNREGISTER, &mu);
}

/* Snapshot; present and writable out (may be NULL); 0 or -errno. */
static int mirror_snapshot(int fd, uint64_t id, uint64_t first, uint64_t count,
			   uint32_t flags, uint64_t *present, uint64_t *writable)
{
	struct dsvm_mirror_snapshot ms = {
		.mirror_id = id, .first = first, .count = count, .flags = flags,
	};
	int ret = xioctl(fd, DSVM_IOC_MIRROR_SNAPSHOT, &ms);

	if (present)
		*present = ret ? ~0ULL : ms.present;
	if (writable)
		*writable = ret ? ~0ULL : ms.writable;
	return ret;
}

#define SNAP_FAULT DSVM_MIRROR_SNAPSHOT_FAULT
#define SNAP_WRITE DSVM_MIRROR_SNAPSHOT_WRITE

static int mirror_read(int fd, uint64_t id, uint64_t index, void *data)
{
	struct dsvm_mirror_read mr = {
		.mirror_id = id, .page_index = index, .data = (uintptr_t)data,
	};

	return xioctl(fd, DSVM_IOC_MIRROR_READ, &mr);
}

/* Reads a page through the mirror and compares it with seed's. */
static int mirror_read_matches(int fd, uint64_t id, uint64_t index,
			       uint64_t seed)
{
	static uint64_t got[PAGE / 8], want[PAGE / 8];
	int ret = mirror_read(fd, id, index, got);

	if (ret)
		return ret;
	fill(want, seed);
	return memcmp(got, want, PAGE) ? -EIO : 0;
}

static long mirror_migrate(int fd, uint64_t id, uint64_t first, uint64_t count)
{
	struct dsvm_mirror_migrate mm = {
		.mirror_id = id, .first = first, .count = count,
	};
	int ret = xioctl(fd, DSVM_IOC_MIRROR_MIGRATE, &mm);

	return ret ? ret : (long)mm.migrated;
}

static struct dsvm_mirror_stats mirror_stats(int fd)
{
	struct dsvm_mirror_stats st;

	memset(&st, 0xff, sizeof(st));
	if (xioctl(fd, DSVM_IOC_MIRROR_STATS, &st))
		diag("DSVM_IOC_MIRROR_STATS failed: %s", strerror(errno));
	return st;
}

/* A file of its own for mirror events: HELLO done, O_NONBLOCK. */
static int open_mirror_file(void)
{
	int mfd = open(DSVM_DEVICE_PATH, O_RDWR | O_CLOEXEC | O_NONBLOCK);

	if (mfd >= 0 && hello(mfd)) {
		close(mfd);
		return -1;
	}
	return mfd;
}

/*
 * Reads the one mirror event that should be queued and checks it; false
 * (with a diagnostic) when there is none, another, or more than one.
 */
static bool mirror_event_is(int mfd, uint64_t id, uint64_t first,
			    uint64_t count)
{
	struct dsvm_fault_event ev[4];
	int n = read_events(mfd, ev, 4);

	if (n != 1) {
		diag("mirror events: read gave %d, want 1", n);
		for (int i = 0; i < n; i++)
			diag("  event mirror %llu page %llu count %u kind %u",
			     (unsigned long long)ev[i].region_id,
			     (unsigned long long)ev[i].page_index, ev[i].count,
			     ev[i].kind);
		return false;
	}
	if (ev[0].kind != DSVM_FAULT_MIRROR_INVALIDATE ||
	    ev[0].region_id != id || ev[0].page_index != first ||
	    ev[0].count != count || ev[0].seq == 0) {
		diag("mirror event: mirror %llu page %llu count %u kind %u seq %llu, want mirror %llu page %llu count %llu",
		     (unsigned long long)ev[0].region_id,
		     (unsigned long long)ev[0].page_index, ev[0].count,
		     ev[0].kind, (unsigned long long)ev[0].seq,
		     (unsigned long long)id, (unsigned long long)first,
		     (unsigned long long)count);
		return false;
	}
	return true;
}

static bool mirror_no_event(int mfd)
{
	struct dsvm_fault_event ev;
	int n = read_events(mfd, &ev, 1);

	if (n != -EAGAIN)
		diag("mirror events: read gave %d (page %llu count %u), want EAGAIN",
		     n, n == 1 ? (unsigned long long)ev.page_index : 0ULL,
		     n == 1 ? ev.count : 0);
	return n == -EAGAIN;
}

static void mirror_drain_events(int mfd)
{
	struct dsvm_fault_event ev[16];

	while (read_events(mfd, ev, 16) > 0)
		;
}

/* The physical frame behind addr (root sees PFNs), 0 when not present. */
static uint64_t pagemap_pfn(const void *addr)
{
	uint64_t entry = 0;
	int pfd = open("/proc/self/pagemap", O_RDONLY);

	if (pfd < 0)
		return 0;
	if (pread(pfd, &entry, 8, (off_t)((uintptr_t)addr / PAGE * 8)) != 8)
		entry = 0;
	close(pfd);
	return (entry & (1ULL << 63)) ? entry & ((1ULL << 55) - 1) : 0;
}

/* Anonymous private pages at a fixed address, no THP (4 KiB PTEs only). */
static void *map_anon(uint64_t base, uint64_t npages)
{
	void *p = mmap((void *)base, npages * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	madvise(p, npages * PAGE, MADV_NOHUGEPAGE);
	return p;
}

static void test_mirror_invalid(int fd)
{
	struct dsvm_mirror_register mr;
	struct dsvm_mirror_snapshot ms;
	struct dsvm_mirror_read rd;
	struct dsvm_mirror_migrate mg;
	struct dsvm_mirror_unregister mu;
	static uint64_t buf[PAGE / 8];
	uint64_t id, ids[DSVM_MIRRORS_MAX], b = BASE_MIRROR;
	int nfd = open_dev(), ofd = open_dev(), err;
	bool ok = true;
	char *p;

	{
		struct dsvm_hello h = { .user_version = DSVM_ABI_VERSION };

		result(xioctl(fd, DSVM_IOC_HELLO, &h) == 0 &&
		       (h.features & DSVM_FEATURE_MIRROR),
		       "mirror: hello reports DSVM_FEATURE_MIRROR");
	}
	expect(mirror_register(nfd, b, PAGE, NULL), -EPROTO,
	       "mirror: register before hello refused with EPROTO");
	hello(nfd);
	hello(ofd);
	p = map_anon(b, 4);
	result(p == (void *)b, "mirror: map 4 anonymous pages");

	expect(mirror_register(fd, b, 0, NULL), -EINVAL,
	       "mirror: register of length 0 refused with EINVAL");
	expect(mirror_register(fd, b + 8, PAGE, NULL), -EINVAL,
	       "mirror: register of an unaligned start refused with EINVAL");
	expect(mirror_register(fd, b, PAGE + 8, NULL), -EINVAL,
	       "mirror: register of an unaligned length refused with EINVAL");
	expect(mirror_register(fd, b, DSVM_MIRROR_SIZE_MAX + PAGE, NULL), -EINVAL,
	       "mirror: register above 1 GiB refused with EINVAL");
	expect(mirror_register(fd, 0x7ffffffff000UL, 2 * PAGE, NULL), -EINVAL,
	       "mirror: register beyond the user address space refused with EINVAL");
	expect(mirror_register(fd, ~0xfffULL, PAGE, NULL), -EINVAL,
	       "mirror: register at the top of the address space refused with EINVAL");
	memset(&mr, 0, sizeof(mr));
	mr = (struct dsvm_mirror_register){ .start = b, .length = PAGE, .flags = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_REGISTER, &mr), -EINVAL,
	       "mirror: register with flags refused with EINVAL");
	mr = (struct dsvm_mirror_register){ .start = b, .length = PAGE, .reserved32 = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_REGISTER, &mr), -EINVAL,
	       "mirror: register with reserved32 refused with EINVAL");
	mr = (struct dsvm_mirror_register){ .start = b, .length = PAGE, .reserved[1] = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_REGISTER, &mr), -EINVAL,
	       "mirror: register with reserved[1] refused with EINVAL");
	expect(mirror_register(fd, b + 4 * PAGE, PAGE, NULL), -EFAULT,
	       "mirror: register of unmapped memory refused with EFAULT");
	expect(mirror_register(fd, b + 2 * PAGE, 4 * PAGE, NULL), -EFAULT,
	       "mirror: register running past the mapping refused with EFAULT");
	expect(mirror_register(fd, PAGE, PAGE, NULL), -EFAULT,
	       "mirror: register of page 1 (never mapped) refused with EFAULT");
	expect(region_create(fd, 40, BASE_MIRROR_DEV, 4), 0,
	       "mirror: a region to mirror");
	result(map_region(fd, BASE_MIRROR_DEV, 4) == (void *)BASE_MIRROR_DEV,
	       "mirror: map the region");
	expect(mirror_register(fd, BASE_MIRROR_DEV, PAGE, NULL), -EINVAL,
	       "mirror: register of a /dev/dsvm mapping refused with EINVAL");
	munmap((void *)BASE_MIRROR_DEV, 4 * PAGE);
	expect(region_destroy(fd, 40), 0, "mirror: destroy the region");
	{
		char big[sizeof(struct dsvm_mirror_register) + 8] = { 0 };

		expect(xioctl(fd, _IOWR(DSVM_IOC_MAGIC, 0x30, big), big), -ENOTTY,
		       "mirror: register with another struct size refused with ENOTTY");
	}

	expect(mirror_register(fd, b, 4 * PAGE, &id), 0, "mirror: register 4 pages");
	result(id >= 1 && id <= DSVM_MIRRORS_MAX, "mirror: id %llu in 1..%d",
	       (unsigned long long)id, DSVM_MIRRORS_MAX);

	expect(mirror_snapshot(fd, 0, 0, 1, 0, NULL, NULL), -EINVAL,
	       "mirror: snapshot of mirror 0 refused with EINVAL");
	expect(mirror_snapshot(fd, id + 1, 0, 1, 0, NULL, NULL), -ENOENT,
	       "mirror: snapshot of an unknown mirror refused with ENOENT");
	expect(mirror_snapshot(ofd, id, 0, 1, 0, NULL, NULL), -ENOENT,
	       "mirror: snapshot from another file refused with ENOENT");
	expect(mirror_snapshot(fd, id, 0, 0, 0, NULL, NULL), -EINVAL,
	       "mirror: snapshot of 0 pages refused with EINVAL");
	expect(mirror_snapshot(fd, id, 4, 1, 0, NULL, NULL), -EINVAL,
	       "mirror: snapshot past the mirror refused with EINVAL");
	expect(mirror_snapshot(fd, id, 2, 3, 0, NULL, NULL), -EINVAL,
	       "mirror: snapshot running past the mirror refused with EINVAL");
	expect(mirror_snapshot(fd, id, 1, ~0ULL, 0, NULL, NULL), -EINVAL,
	       "mirror: snapshot with an overflowing count refused with EINVAL");
	expect(mirror_snapshot(fd, id, 0, 1, 1u << 2, NULL, NULL), -EINVAL,
	       "mirror: snapshot with an unknown flag refused with EINVAL");
	expect(mirror_snapshot(fd, id, 0, 1, SNAP_WRITE, NULL, NULL), -EINVAL,
	       "mirror: snapshot WRITE without FAULT refused with EINVAL");
	ms = (struct dsvm_mirror_snapshot){ .mirror_id = id, .count = 1, .reserved32 = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_SNAPSHOT, &ms), -EINVAL,
	       "mirror: snapshot with reserved32 refused with EINVAL");
	ms = (struct dsvm_mirror_snapshot){ .mirror_id = id, .count = 1, .reserved[1] = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_SNAPSHOT, &ms), -EINVAL,
	       "mirror: snapshot with reserved[1] refused with EINVAL");

	expect(mirror_read(fd, id, 0, buf), -EAGAIN,
	       "mirror: read before any snapshot gives EAGAIN");
	expect(mirror_read(fd, 0, 0, buf), -EINVAL,
	       "mirror: read of mirror 0 refused with EINVAL");
	expect(mirror_read(fd, id + 1, 0, buf), -ENOENT,
	       "mirror: read of an unknown mirror refused with ENOENT");
	expect(mirror_read(ofd, id, 0, buf), -ENOENT,
	       "mirror: read from another file refused with ENOENT");
	expect(mirror_read(fd, id, 4, buf), -EINVAL,
	       "mirror: read past the mirror refused with EINVAL");
	expect(mirror_read(fd, id, 0, NULL), -EINVAL,
	       "mirror: read to data 0 refused with EINVAL");
	rd = (struct dsvm_mirror_read){ .mirror_id = id, .data = (uintptr_t)buf, .flags = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_READ, &rd), -EINVAL,
	       "mirror: read with flags refused with EINVAL");
	rd = (struct dsvm_mirror_read){ .mirror_id = id, .data = (uintptr_t)buf, .reserved32 = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_READ, &rd), -EINVAL,
	       "mirror: read with reserved32 refused with EINVAL");
	rd = (struct dsvm_mirror_read){ .mirror_id = id, .data = (uintptr_t)buf, .reserved[0] = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_READ, &rd), -EINVAL,
	       "mirror: read with reserved[0] refused with EINVAL");
	p[0] = 1;
	expect(mirror_snapshot(fd, id, 0, 1, SNAP_FAULT, NULL, NULL), 0,
	       "mirror: snapshot page 0");
	expect(mirror_read(fd, id, 0, (void *)8), -EFAULT,
	       "mirror: read to an unwritable buffer refused with EFAULT");

	expect((int)mirror_migrate(fd, 0, 0, 1), -EINVAL,
	       "mirror: migrate of mirror 0 refused with EINVAL");
	expect((int)mirror_migrate(fd, id + 1, 0, 1), -ENOENT,
	       "mirror: migrate of an unknown mirror refused with ENOENT");
	expect((int)mirror_migrate(fd, id, 0, 0), -EINVAL,
	       "mirror: migrate of 0 pages refused with EINVAL");
	expect((int)mirror_migrate(fd, id, 3, 2), -EINVAL,
	       "mirror: migrate past the mirror refused with EINVAL");
	mg = (struct dsvm_mirror_migrate){ .mirror_id = id, .count = 1, .flags = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_MIGRATE, &mg), -EINVAL,
	       "mirror: migrate with flags refused with EINVAL");
	mg = (struct dsvm_mirror_migrate){ .mirror_id = id, .count = 1, .reserved[1] = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_MIGRATE, &mg), -EINVAL,
	       "mirror: migrate with reserved[1] refused with EINVAL");

	expect(mirror_unregister(fd, 0), -EINVAL,
	       "mirror: unregister of mirror 0 refused with EINVAL");
	mu = (struct dsvm_mirror_unregister){ .mirror_id = id, .reserved = 1 };
	expect(xioctl(fd, DSVM_IOC_MIRROR_UNREGISTER, &mu), -EINVAL,
	       "mirror: unregister with reserved refused with EINVAL");
	expect(mirror_unregister(ofd, id), -ENOENT,
	       "mirror: unregister from another file refused with ENOENT");
	expect(mirror_unregister(fd, id), 0, "mirror: unregister");
	expect(mirror_unregister(fd, id), -ENOENT,
	       "mirror: unregister again refused with ENOENT");

	for (int i = 0; i < DSVM_MIRRORS_MAX; i++)
		ok &= mirror_register(nfd, b, PAGE, &ids[i]) == 0;
	result(ok, "mirror: %d mirrors on one file", DSVM_MIRRORS_MAX);
	err = mirror_register(nfd, b, PAGE, NULL);
	expect(err, -ENOSPC, "mirror: one more refused with ENOSPC");
	result(mirror_stats(fd).mirrors == DSVM_MIRRORS_MAX,
	       "mirror: stats count %d mirrors", DSVM_MIRRORS_MAX);
	expect(mirror_unregister(nfd, ids[7]), 0, "mirror: unregister one of them");
	expect(mirror_register(nfd, b, PAGE, &id), 0, "mirror: its id is free again");
	result(id == ids[7], "mirror: the freed id is reused (%llu)",
	       (unsigned long long)id);
	close(nfd);
	close(ofd);
	result(mirror_stats(fd).mirrors == 0 && mirror_stats(fd).entries == 0,
	       "mirror: closing the file ends its mirrors");
	munmap(p, 4 * PAGE);
	{
		unsigned long taint = kernel_taint();

		result(!(taint & (1UL << 9)),
		       "mirror: validation left no kernel warning (taint 0x%lx)", taint);
	}
}

/* Ordinary heap memory: registered, snapshotted, read through the mirror. */
static void test_mirror_malloc(int fd)
{
	const uint64_t n = 8;
	int mfd = open_mirror_file();
	uint64_t id, present, writable, dropped;
	char *heap = NULL;
	bool ok = true;

	result(posix_memalign((void **)&heap, PAGE, n * PAGE) == 0,
	       "mirror malloc: allocate 8 pages from the heap");
	madvise(heap, n * PAGE, MADV_NOHUGEPAGE);
	for (uint64_t i = 0; i < n; i++)
		fill(heap + i * PAGE, 100 + i);
	expect(mirror_register(mfd, (uintptr_t)heap, n * PAGE, &id), 0,
	       "mirror malloc: register the malloc'ed range");
	result(mirror_no_event(mfd), "mirror malloc: no event yet (read gives EAGAIN)");
	expect(mirror_snapshot(mfd, id, 0, n, SNAP_FAULT, &present, &writable), 0,
	       "mirror malloc: snapshot with FAULT");
	result(present == n && writable == n,
	       "mirror malloc: 8 pages present, 8 writable (%llu, %llu)",
	       (unsigned long long)present, (unsigned long long)writable);
	result(mirror_stats(fd).entries == n, "mirror malloc: stats count 8 entries");
	for (uint64_t i = 0; i < n; i++)
		ok &= mirror_read_matches(mfd, id, i, 100 + i) == 0;
	result(ok, "mirror malloc: read through the mirror gives what the process wrote");

	/*
	 * A write to a page the CPU maps writable changes no PTE: the kernel
	 * calls no notifier, the entry stays, and the device sees the write
	 * (same page).
	 */
	dropped = mirror_stats(fd).dropped;
	fill(heap + 2 * PAGE, 200);
	result(mirror_no_event(mfd) && mirror_stats(fd).dropped == dropped,
	       "mirror malloc: a write to a writable page raises no event");
	expect(mirror_read_matches(mfd, id, 2, 200), 0,
	       "mirror malloc: and the mirror reads the new bytes");
	expect(mirror_unregister(mfd, id), 0, "mirror malloc: unregister");
	result(mirror_stats(fd).entries == 0 && mirror_stats(fd).mirrors == 0,
	       "mirror malloc: no mirror, no entry left");
	close(mfd);
	free(heap);
}

/*
 * CPU-side changes of anonymous memory: MADV_DONTNEED, copy-on-write of the
 * zero page, munmap, coalescing, poll, fork, migration.
 */
static void test_mirror_invalidate(int fd)
{
	const uint64_t b = BASE_MIRROR, n = MIRROR_PAGES;
	uint64_t id, present, writable, pfn_before[8];
	static uint64_t buf[PAGE / 8];
	int mfd = open_mirror_file(), go[2], status;
	struct pollfd pfd;
	bool ok = true;
	char *p;
	pid_t pid;
	long moved;

	p = map_anon(b, n);
	result(p == (void *)b, "mirror: map 16 anonymous pages");
	for (uint64_t i = 0; i < n; i++)
		fill(p + i * PAGE, i);
	expect(mirror_register(mfd, b, n * PAGE, &id), 0, "mirror: register 16 pages");
	expect(mirror_snapshot(mfd, id, 0, n, SNAP_FAULT, &present, &writable), 0,
	       "mirror: snapshot with FAULT");
	result(present == n && writable == n, "mirror: 16 present, 16 writable");
	pfd = (struct pollfd){ .fd = mfd, .events = POLLIN };
	result(poll(&pfd, 1, 0) == 0, "mirror: poll not readable with no event");

	/* MADV_DONTNEED zaps the PTE: the notifier drops the entry first. */
	madvise(p + 3 * PAGE, PAGE, MADV_DONTNEED);
	pfd.revents = 0;
	result(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN),
	       "mirror: poll readable after MADV_DONTNEED");
	result(mirror_event_is(mfd, id, 3, 1),
	       "mirror: MADV_DONTNEED of page 3 raises an event for page 3");
	result(mirror_no_event(mfd), "mirror: the event was taken off by read");
	expect(mirror_read(mfd, id, 3, buf), -EAGAIN,
	       "mirror: read of the dropped page gives EAGAIN, not stale bytes");
	expect(mirror_read_matches(mfd, id, 4, 4), 0,
	       "mirror: a neighbour's entry stays valid");
	expect(mirror_snapshot(mfd, id, 0, n, 0, &present, &writable), 0,
	       "mirror: snapshot without FAULT");
	result(present == n - 1 && writable == n - 1,
	       "mirror: 15 present, page 3 absent (%llu)", (unsigned long long)present);
	expect(mirror_read(mfd, id, 3, buf), -EAGAIN,
	       "mirror: read of the absent page still gives EAGAIN");
	expect(mirror_snapshot(mfd, id, 3, 1, SNAP_FAULT, &present, &writable), 0,
	       "mirror: snapshot page 3 with FAULT");
	result(present == 1 && writable == 0,
	       "mirror: page 3 faulted in read-only (the zero page)");
	memset(buf, 0xff, PAGE);
	ok = mirror_read(mfd, id, 3, buf) == 0;
	for (size_t i = 0; i < PAGE / 8; i++)
		ok &= buf[i] == 0;
	result(ok, "mirror: read of page 3 gives zeros");
	result(mirror_no_event(mfd), "mirror: a read fault of an empty page raises no event");
	/* Copy-on-write of the zero page: a new PFN. */
	fill(p + 3 * PAGE, 33);
	result(mirror_event_is(mfd, id, 3, 1),
	       "mirror: writing the zero-page-backed page raises an event for it");
	expect(mirror_read(mfd, id, 3, buf), -EAGAIN,
	       "mirror: and its entry is gone");

	/* munmap of a part. */
	munmap(p + 12 * PAGE, 4 * PAGE);
	result(mirror_event_is(mfd, id, 12, 4),
	       "mirror: munmap of pages 12-15 raises an event for them");
	expect(mirror_read(mfd, id, 13, buf), -EAGAIN,
	       "mirror: read of an unmapped page gives EAGAIN");
	expect(mirror_snapshot(mfd, id, 0, n, 0, NULL, NULL), -EFAULT,
	       "mirror: snapshot over the hole fails with EFAULT");
	expect(mirror_snapshot(mfd, id, 0, 12, 0, &present, NULL), 0,
	       "mirror: snapshot of the mapped part");
	result(present == 12, "mirror: 12 present (%llu)", (unsigned long long)present);
	result(mirror_stats(fd).entries == 12, "mirror: stats count 12 entries");

	/* Two drops before a read: one event over both. */
	madvise(p + 1 * PAGE, PAGE, MADV_DONTNEED);
	madvise(p + 5 * PAGE, PAGE, MADV_DONTNEED);
	result(mirror_event_is(mfd, id, 1, 5),
	       "mirror: two drops before a read coalesce into one event (pages 1-5)");
	result(mirror_no_event(mfd), "mirror: nothing more queued");

	/* fork: the parent's private pages become write-protected, then COW. */
	for (uint64_t i = 0; i < 12; i++)
		fill(p + i * PAGE, i);
	mirror_drain_events(mfd);
	expect(mirror_snapshot(mfd, id, 0, 12, SNAP_FAULT, &present, &writable), 0,
	       "mirror fork: snapshot before fork");
	result(present == 12 && writable == 12, "mirror fork: 12 present, 12 writable");
	if (pipe(go))
		diag("pipe: %s", strerror(errno));
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		char c;
		static uint64_t want[PAGE / 8];

		/* Stay alive (sharing the pages) until the parent wrote. */
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			_exit(2);
		fill(want, 2);
		_exit(memcmp(p + 2 * PAGE, want, PAGE) ? 1 : 0);
	}
	close(go[0]);
	result(mirror_event_is(mfd, id, 0, 12),
	       "mirror fork: fork write-protects the parent's pages: event for all 12");
	expect(mirror_read(mfd, id, 2, buf), -EAGAIN,
	       "mirror fork: entries dropped at fork");
	expect(mirror_snapshot(mfd, id, 0, 12, SNAP_FAULT, &present, &writable), 0,
	       "mirror fork: snapshot after fork");
	result(present == 12 && writable == 0,
	       "mirror fork: 12 present, none writable (shared with the child) (%llu)",
	       (unsigned long long)writable);
	expect(mirror_read_matches(mfd, id, 2, 2), 0,
	       "mirror fork: read gives the shared bytes");
	fill(p + 2 * PAGE, 222);	/* breaks COW: a new page for the parent */
	result(mirror_event_is(mfd, id, 2, 1),
	       "mirror fork: the parent's write breaks COW: event for page 2 only");
	expect(mirror_read(mfd, id, 2, buf), -EAGAIN,
	       "mirror fork: the written page's entry is gone");
	expect(mirror_read_matches(mfd, id, 6, 6), 0,
	       "mirror fork: other entries stay valid");
	expect(mirror_snapshot(mfd, id, 2, 1, SNAP_FAULT, &present, &writable), 0,
	       "mirror fork: re-snapshot page 2");
	result(present == 1 && writable == 1,
	       "mirror fork: page 2 present and writable (the parent's own copy)");
	expect(mirror_read_matches(mfd, id, 2, 222), 0,
	       "mirror fork: read gives the parent's new bytes");
	if (write(go[1], "g", 1) != 1)
		diag("write: %s", strerror(errno));
	close(go[1]);
	status = wait_child(pid);
	result(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "mirror fork: the child still sees the old bytes (status 0x%x)", status);
	result(mirror_no_event(mfd), "mirror fork: the child's exit raises no event");

	/* Migration: same bytes, same addresses, other frames. */
	mirror_drain_events(mfd);
	expect(mirror_snapshot(mfd, id, 0, 8, SNAP_FAULT, &present, NULL), 0,
	       "mirror migrate: snapshot pages 0-7");
	for (int i = 0; i < 8; i++)
		pfn_before[i] = pagemap_pfn(p + i * PAGE);
	moved = mirror_migrate(mfd, id, 0, 8);
	result(moved == 8, "mirror migrate: 8 pages moved (%ld)", moved);
	result(mirror_event_is(mfd, id, 0, 8),
	       "mirror migrate: the migration dropped the 8 entries (event)");
	expect(mirror_read(mfd, id, 0, buf), -EAGAIN,
	       "mirror migrate: read gives EAGAIN until the next snapshot");
	ok = true;
	for (uint64_t i = 0; i < 8; i++) {
		uint64_t pfn = pagemap_pfn(p + i * PAGE);

		ok &= pfn != 0 && pfn != pfn_before[i] && pfn_before[i] != 0;
	}
	result(ok, "mirror migrate: every page has a new frame (pagemap)");
	ok = true;
	for (uint64_t i = 0; i < 8; i++)
		ok &= page_matches(b, i, i == 2 ? 222 : i);
	result(ok, "mirror migrate: the process sees the same bytes");
	expect(mirror_snapshot(mfd, id, 0, 8, SNAP_FAULT, &present, NULL), 0,
	       "mirror migrate: snapshot again");
	ok = present == 8;
	for (uint64_t i = 0; i < 8; i++)
		ok &= mirror_read_matches(mfd, id, i, i == 2 ? 222 : i) == 0;
	result(ok, "mirror migrate: read through the new entries gives the bytes");
	result(mirror_migrate(mfd, id, 12, 4) == 0,
	       "mirror migrate: an unmapped range moves nothing");
	result(mirror_stats(fd).migrated >= 8, "mirror migrate: stats count the moves");

	/* Unregister with an event queued and entries present. */
	madvise(p, PAGE, MADV_DONTNEED);
	expect(mirror_unregister(mfd, id), 0, "mirror: unregister with an event queued");
	result(mirror_no_event(mfd), "mirror: its queued event is gone");
	result(mirror_stats(fd).entries == 0 && mirror_stats(fd).mirrors == 0,
	       "mirror: no mirror, no entry left");
	munmap(p, 12 * PAGE);
	close(mfd);
}

/*
 * The registering process exits while the mirror is registered: the
 * notifier's release drops everything, the file keeps a dead mirror until
 * it is closed or the mirror unregistered; nothing leaks.
 */
static void test_mirror_exit(int fd)
{
	static uint64_t buf[PAGE / 8];
	int mfd = open_mirror_file(), status, idp[2];
	uint64_t id = 0;
	pid_t pid;

	/* A child with a file of its own: everything goes with it. */
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		int cfd = open_mirror_file();
		char *c = map_anon(BASE_MIRROR, 4);
		uint64_t cid;

		if (cfd < 0 || !c)
			_exit(2);
		memset(c, 7, 4 * PAGE);
		if (mirror_register(cfd, BASE_MIRROR, 4 * PAGE, &cid) ||
		    mirror_snapshot(cfd, cid, 0, 4, SNAP_FAULT, NULL, NULL))
			_exit(3);
		_exit(0);	/* registered, snapshotted, never unregistered */
	}
	status = wait_child(pid);
	result(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	       "mirror exit: a child registers and exits (status 0x%x)", status);
	result(mirror_stats(fd).mirrors == 0 && mirror_stats(fd).entries == 0,
	       "mirror exit: its mirror and entries are gone");

	/* A child registers on our file, then exits: its mm goes first. */
	if (pipe(idp))
		diag("pipe: %s", strerror(errno));
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		char *c = map_anon(BASE_MIRROR, 4);
		uint64_t cid = 0;

		close(idp[0]);
		if (!c)
			_exit(2);
		memset(c, 9, 4 * PAGE);
		if (mirror_register(mfd, BASE_MIRROR, 4 * PAGE, &cid) ||
		    mirror_snapshot(mfd, cid, 0, 4, SNAP_FAULT, NULL, NULL))
			_exit(3);
		if (write(idp[1], &cid, sizeof(cid)) != sizeof(cid))
			_exit(4);
		_exit(0);
	}
	close(idp[1]);
	if (read(idp[0], &id, sizeof(id)) != sizeof(id))
		id = 0;
	close(idp[0]);
	status = wait_child(pid);
	result(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0 && id,
	       "mirror exit: a child registers on an inherited file and exits");
	result(mirror_event_is(mfd, id, 0, 4),
	       "mirror exit: the exit dropped its 4 entries (event)");
	expect(mirror_read(mfd, id, 0, buf), -EAGAIN,
	       "mirror exit: read of the dead mirror gives EAGAIN");
	expect(mirror_snapshot(mfd, id, 0, 4, SNAP_FAULT, NULL, NULL), -ESRCH,
	       "mirror exit: snapshot of the dead mirror fails with ESRCH");
	expect((int)mirror_migrate(mfd, id, 0, 4), -ESRCH,
	       "mirror exit: migrate of the dead mirror fails with ESRCH");
	result(mirror_stats(fd).mirrors == 1 && mirror_stats(fd).entries == 0,
	       "mirror exit: the mirror stays (no entries) until unregistered");
	expect(mirror_unregister(mfd, id), 0, "mirror exit: unregister the dead mirror");
	result(mirror_stats(fd).mirrors == 0, "mirror exit: no mirror left");
	close(mfd);
}

/*
 * Concurrent munmap, mmap and MADV_DONTNEED against a thread that
 * snapshots and reads through the mirror: the reads give EAGAIN or bytes
 * the process wrote at some point (generation tags, or 0 for a page not
 * yet written), never anything else, and nothing crashes.
 */
#define MIRROR_RACE_PAGES 8
#define MIRROR_RACE_ROUNDS 300

struct mirror_race {
	int mfd;
	uint64_t id;
	volatile int stop;
	uint64_t gen;		/* __atomic: the last generation written */
	long reads, eagain, bad, errors;
};

static void *mirror_race_reader(void *arg)
{
	struct mirror_race *r = arg;
	static uint64_t got[PAGE / 8];

	while (!r->stop) {
		int ret = mirror_snapshot(r->mfd, r->id, 0, MIRROR_RACE_PAGES,
					  SNAP_FAULT, NULL, NULL);

		if (ret && ret != -EFAULT)
			r->errors++;
		for (uint64_t i = 0; i < MIRROR_RACE_PAGES; i++) {
			uint64_t before, after;

			/*
			 * The writer unmaps (or zaps), then publishes gen, then
			 * writes gen into every word. The page mapped when the
			 * read copied it holds 0 or a gen from before to after
			 * the read; an older gen is a page the CPU had dropped.
			 */
			before = __atomic_load_n(&r->gen, __ATOMIC_ACQUIRE);
			ret = mirror_read(r->mfd, r->id, i, got);
			after = __atomic_load_n(&r->gen, __ATOMIC_ACQUIRE);
			if (ret == -EAGAIN) {
				r->eagain++;
				continue;
			}
			if (ret) {
				r->errors++;
				continue;
			}
			r->reads++;
			for (size_t w = 0; w < PAGE / 8; w++) {
				uint64_t g = got[w] & 0xffffffff;

				if (got[w] && (got[w] >> 32 != i || g < before ||
					       g > after)) {
					r->bad++;
					break;
				}
			}
		}
	}
	return NULL;
}

static void test_mirror_race(int fd)
{
	const uint64_t b = BASE_MIRROR, n = MIRROR_RACE_PAGES;
	struct mirror_race r = { .mfd = open_mirror_file() };
	pthread_t thread;
	bool ok = true;
	char *p;

	p = map_anon(b, n);
	expect(mirror_register(r.mfd, b, n * PAGE, &r.id), 0,
	       "mirror race: register 8 pages");
	pthread_create(&thread, NULL, mirror_race_reader, &r);
	for (uint64_t g = 1; g <= MIRROR_RACE_ROUNDS && ok; g++) {
		if (g % 3 == 0) {
			madvise(p, n * PAGE, MADV_DONTNEED);
		} else {
			munmap(p, n * PAGE);
			ok = map_anon(b, n) == p;
		}
		/* After the unmap: a read that sees g started after it. */
		__atomic_store_n(&r.gen, g, __ATOMIC_RELEASE);
		for (uint64_t i = 0; i < n; i++)
			for (size_t w = 0; w < PAGE / 8; w++)
				((volatile uint64_t *)(p + i * PAGE))[w] = i << 32 | g;
	}
	r.stop = 1;
	pthread_join(thread, NULL);
	result(ok, "mirror race: %d rounds of munmap/mmap and MADV_DONTNEED",
	       MIRROR_RACE_ROUNDS);
	diag("mirror race: %ld reads, %ld EAGAIN, %ld bad, %ld errors", r.reads,
	     r.eagain, r.bad, r.errors);
	result(r.bad == 0 && r.errors == 0,
	       "mirror race: every read gave EAGAIN or bytes the process wrote");
	expect(mirror_unregister(r.mfd, r.id), 0, "mirror race: unregister");
	munmap(p, n * PAGE);
	close(r.mfd);
	result(mirror_stats(fd).mirrors == 0 && mirror_stats(fd).entries == 0,
	       "mirror race: no mirror, no entry left");
}

/* Migrated pages, old and new, all come back: 4 x 16 MiB moved. */
static void test_mirror_leak(int fd)
{
	const uint64_t b = BASE_MIRROR, n = 4096;	/* 16 MiB */
	int mfd = open_mirror_file();
	long before, after, moved = 0;
	uint64_t id, present;
	char *p;

	before = free_kb();
	p = map_anon(b, n);
	result(p == (void *)b, "mirror leak: map 16 MiB");
	for (uint64_t i = 0; i < n; i++)
		p[i * PAGE] = (char)i;
	expect(mirror_register(mfd, b, n * PAGE, &id), 0, "mirror leak: register 16 MiB");
	expect(mirror_snapshot(mfd, id, 0, n, SNAP_FAULT, &present, NULL), 0,
	       "mirror leak: snapshot 16 MiB");
	result(present == n, "mirror leak: 4096 present");
	for (int round = 0; round < 4; round++) {
		long m = mirror_migrate(mfd, id, 0, n);

		moved += m > 0 ? m : 0;
	}
	result(moved >= 4 * (long)n - 64, "mirror leak: %ld page moves", moved);
	result(p[5 * PAGE] == 5 && p[(n - 1) * PAGE] == (char)(n - 1),
	       "mirror leak: the bytes survive four migrations");
	expect(mirror_unregister(mfd, id), 0, "mirror leak: unregister");
	result(mirror_stats(fd).mirrors == 0 && mirror_stats(fd).entries == 0,
	       "mirror leak: no mirror, no entry left");
	munmap(p, n * PAGE);
	close(mfd);
	after = free_kb();
	diag("mirror leak: MemFree %ld kB before, %ld kB after", before, after);
	result(before - after <= 8 * 1024,
	       "mirror leak: MemFree came back (%ld kB short)", before - after);
}

int main(void)
{
	struct dsvm_stats st;
	unsigned long taint;
	int fd;

	setvbuf(stdout, NULL, _IOLBF, 0);
	install_sigbus_handler();
	printf("TAP version 13\n");

	fd = open_dev();
	result(fd >= 0, "open %s", DSVM_DEVICE_PATH);
	if (fd < 0) {
		diag("open: %s", strerror(errno));
		printf("1..%d\n", tests_run);
		return 1;
	}

	test_handshake(fd);
	test_region_create_invalid(fd);
	test_page_install_invalid(fd);
	test_page_range_invalid(fd);
	test_page_writeback_invalid(fd);
	test_mmap_invalid(fd);
	expect(region_destroy(fd, 90), 0, "validation: region destroy");
	taint = kernel_taint();
	result(!(taint & (1UL << 9)), "validation: no kernel warning (taint 0x%lx)", taint);

	test_faults(fd);
	test_threads(fd);
	test_destroy_mapped(fd);
	test_owner_exit(fd);
	test_split_and_mremap(fd);
	{
		int cfd = open_dev();

		test_control(fd, cfd);
		test_events(fd, cfd);
		test_writeback(fd, cfd);
		test_poison(fd, cfd);
		test_wake(fd, cfd);
		test_event_bound(fd, cfd);
		test_control_close(fd, cfd);
	}
	test_mirror_invalid(fd);
	test_mirror_malloc(fd);
	test_mirror_invalidate(fd);
	test_mirror_exit(fd);
	test_mirror_race(fd);
	test_mirror_leak(fd);
	test_leak_meminfo(fd);

	st = stats(fd);
	result(st.regions == 0 && st.pages == 0 && st.mappings == 0 &&
	       st.events_pending == 0,
	       "end: regions %llu, pages %llu, mappings %llu, events pending %llu all back to 0",
	       (unsigned long long)st.regions, (unsigned long long)st.pages,
	       (unsigned long long)st.mappings,
	       (unsigned long long)st.events_pending);
	diag("faults %llu, mkwrites %llu, refused %llu, events %llu",
	     (unsigned long long)st.faults, (unsigned long long)st.mkwrites,
	     (unsigned long long)st.refused, (unsigned long long)st.events);
	{
		struct dsvm_mirror_stats ms = mirror_stats(fd);

		result(ms.mirrors == 0 && ms.entries == 0 && ms.reserved[0] == 0 &&
		       ms.reserved[1] == 0,
		       "end: mirrors %llu and mirror entries %llu back to 0",
		       (unsigned long long)ms.mirrors,
		       (unsigned long long)ms.entries);
		diag("mirror: invalidations %llu, dropped %llu, events %llu, migrated %llu",
		     (unsigned long long)ms.invalidations,
		     (unsigned long long)ms.dropped,
		     (unsigned long long)ms.events,
		     (unsigned long long)ms.migrated);
	}
	result(close(fd) == 0, "end: close the control file");
	taint = kernel_taint();
	result(!(taint & ((1UL << 9) | (1UL << 7) | (1UL << 5))),
	       "end: no kernel warning, oops or bad page (taint 0x%lx)", taint);

	printf("1..%d\n", tests_run);
	printf("# %d passed, %d failed\n", tests_run - tests_failed, tests_failed);
	return tests_failed ? 1 : 0;
}
