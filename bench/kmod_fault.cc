// The local fault paths of one node, measured in one run (issue #4, bench):
// a page fault resolved inside dsvm.ko on a page the node holds (a "local
// hit"), against a native anonymous page fault and against the userfaultfd
// backend's local minor fault (UFFDIO_CONTINUE from a handler thread, as the
// daemon does for a page valid on the node). bench/kmod_fault.h.
#include "bench/kmod_fault.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kmod/uapi/dsvm_uapi.h"

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kRegionBase = 0x310000000000ull;

uint64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + static_cast<uint64_t>(t.tv_nsec);
}

void Emit(const std::string& name, double value, const char* unit) {
  std::printf("{\"name\":\"%s\",\"value\":%.4g,\"unit\":\"%s\"}\n", name.c_str(), value, unit);
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "dsvm-bench-kmod: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double P99(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, v.size() * 99 / 100)];
}

// Touches each page of [p, p + pages * kPage) once (a write when `write`),
// timing each touch: every one takes a fault. Returns microseconds.
std::vector<double> TouchEach(volatile uint8_t* p, uint64_t pages, bool write) {
  std::vector<double> us;
  us.reserve(pages);
  uint64_t sink = 0;
  for (uint64_t i = 0; i < pages; ++i) {
    const uint64_t t0 = NowNs();
    if (write) {
      p[i * kPage] = 1;
    } else {
      sink += p[i * kPage];
    }
    us.push_back(static_cast<double>(NowNs() - t0) / 1000.0);
  }
  if (sink == 12345) std::fprintf(stderr, "\n");  // keeps the reads
  return us;
}

void Report(const std::string& name, const std::vector<double>& us) {
  Emit(name + ".median_us", Median(us), "us");
  Emit(name + ".p99_us", P99(us), "us");
}

// --- A native anonymous fault ----------------------------------------------------

std::vector<double> NativeAnon(uint64_t pages, bool write) {
  void* m = mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) Die("mmap anonymous");
  // One 4 KiB fault per page, as the module's: a transparent huge page would
  // fill 512 pages with one fault (THP is on in guests of 512 MiB and more).
  if (madvise(m, pages * kPage, MADV_NOHUGEPAGE) != 0) Die("madvise(MADV_NOHUGEPAGE)");
  auto us = TouchEach(static_cast<volatile uint8_t*>(m), pages, write);
  munmap(m, pages * kPage);
  return us;
}

// --- A local hit in dsvm.ko ------------------------------------------------------

int Ioctl(int fd, unsigned long request, void* arg, const char* what) {
  if (ioctl(fd, request, arg) != 0) Die(what);
  return 0;
}

// Installs every page of a fresh region (Shared for reads, Modified for
// writes) and touches each through a mapping: every fault finds its page
// in the module's table.
std::vector<double> KmodHit(uint64_t pages, bool write) {
  const int control = open("/dev/dsvm", O_RDWR | O_CLOEXEC);
  if (control < 0) Die("open /dev/dsvm (is dsvm.ko loaded?)");
  dsvm_hello hello{};
  hello.user_version = DSVM_ABI_VERSION;
  hello.flags = DSVM_HELLO_CONTROL;
  Ioctl(control, DSVM_IOC_HELLO, &hello, "DSVM_IOC_HELLO");
  dsvm_region_create c{};
  c.region_id = 1;
  c.base = kRegionBase;
  c.size = pages * kPage;
  c.page_size = DSVM_PAGE_SIZE_4K;
  Ioctl(control, DSVM_IOC_REGION_CREATE, &c, "DSVM_IOC_REGION_CREATE");
  for (uint64_t i = 0; i < pages; ++i) {
    dsvm_page_install in{};
    in.region_id = 1;
    in.page_index = i;
    in.state = write ? DSVM_PAGE_STATE_MODIFIED : DSVM_PAGE_STATE_SHARED;
    in.flags = DSVM_PAGE_INSTALL_ZERO;
    Ioctl(control, DSVM_IOC_PAGE_INSTALL, &in, "DSVM_IOC_PAGE_INSTALL");
  }
  // As a client: through a file the control file attached to its domain.
  const int client = open("/dev/dsvm", O_RDWR | O_CLOEXEC);
  if (client < 0) Die("open /dev/dsvm");
  dsvm_attach attach{};
  attach.fd = client;
  Ioctl(control, DSVM_IOC_ATTACH, &attach, "DSVM_IOC_ATTACH");
  void* m = mmap(reinterpret_cast<void*>(kRegionBase), pages * kPage, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_FIXED_NOREPLACE, client, static_cast<off_t>(kRegionBase));
  if (m == MAP_FAILED) Die("mmap /dev/dsvm");
  auto us = TouchEach(static_cast<volatile uint8_t*>(m), pages, write);
  munmap(m, pages * kPage);
  close(client);
  close(control);  // destroys the region
  return us;
}

// --- The uffd backend's local minor fault ----------------------------------------

struct MinorHandler {
  int uffd = -1;
  int stop = -1;  // eventfd-like pipe: readable when done
};

void* ServeMinorFaults(void* arg) {
  auto* h = static_cast<MinorHandler*>(arg);
  for (;;) {
    pollfd p[2] = {{h->uffd, POLLIN, 0}, {h->stop, POLLIN, 0}};
    if (poll(p, 2, -1) < 0 && errno == EINTR) continue;
    if (p[1].revents) return nullptr;
    uffd_msg msg[16];
    const ssize_t n = read(h->uffd, msg, sizeof(msg));
    if (n <= 0) continue;
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (msg[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uffdio_continue cont{};
      cont.range.start = msg[i].arg.pagefault.address & ~(kPage - 1);
      cont.range.len = kPage;
      if (ioctl(h->uffd, UFFDIO_CONTINUE, &cont) != 0 && errno != EEXIST) Die("UFFDIO_CONTINUE");
    }
  }
}

// A memfd with every page in its page cache, mapped shared and registered
// for minor faults: each touch faults to the handler thread, which maps the
// page (the uffd backend's "local hit", node/fault/uffd_backend.cc).
std::vector<double> UffdMinor(uint64_t pages) {
  const int memfd = static_cast<int>(syscall(SYS_memfd_create, "dsvm-bench", MFD_CLOEXEC));
  if (memfd < 0) Die("memfd_create");
  if (ftruncate(memfd, static_cast<off_t>(pages * kPage)) != 0) Die("ftruncate");
  std::vector<uint8_t> page(kPage, 7);
  for (uint64_t i = 0; i < pages; ++i) {
    if (pwrite(memfd, page.data(), kPage, static_cast<off_t>(i * kPage)) != static_cast<ssize_t>(kPage)) {
      Die("pwrite");
    }
  }
  void* m = mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (m == MAP_FAILED) Die("mmap memfd");
  MinorHandler h;
  h.uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (h.uffd < 0) Die("userfaultfd");
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_MINOR_SHMEM;
  if (ioctl(h.uffd, UFFDIO_API, &api) != 0) Die("UFFDIO_API (minor faults on shmem)");
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(m);
  reg.range.len = pages * kPage;
  reg.mode = UFFDIO_REGISTER_MODE_MINOR;
  if (ioctl(h.uffd, UFFDIO_REGISTER, &reg) != 0) Die("UFFDIO_REGISTER minor");
  int stop[2];
  if (pipe(stop) != 0) Die("pipe");
  h.stop = stop[0];
  pthread_t thread;
  pthread_create(&thread, nullptr, ServeMinorFaults, &h);
  auto us = TouchEach(static_cast<volatile uint8_t*>(m), pages, false);
  if (write(stop[1], "x", 1) != 1) Die("write");
  pthread_join(thread, nullptr);
  munmap(m, pages * kPage);
  close(h.uffd);
  close(memfd);
  close(stop[0]);
  close(stop[1]);
  return us;
}

}  // namespace

namespace dsvm::bench {

int RunKmodFaultBench(uint64_t pages) {
  if (pages == 0 || pages > (1u << 20)) {
    std::fprintf(stderr, "kmod fault bench: --pages must be 1..1048576\n");
    return 2;
  }
  // Each series once untimed first (page tables, allocator), then timed.
  NativeAnon(pages, true);
  const auto anon_write = NativeAnon(pages, true);
  const auto anon_read = NativeAnon(pages, false);
  KmodHit(pages, false);
  const auto kmod_read = KmodHit(pages, false);
  const auto kmod_write = KmodHit(pages, true);
  const auto uffd_minor = UffdMinor(pages);
  Emit("fault.kmod.pages_per_series", static_cast<double>(pages), "pages");
  Report("fault.native_anon_write", anon_write);
  Report("fault.native_anon_read", anon_read);
  Report("fault.kmod.local_hit_read", kmod_read);
  Report("fault.kmod.local_hit_write", kmod_write);
  Report("fault.uffd.local_minor", uffd_minor);
  Emit("fault.kmod.local_hit_read.vs_native_anon_write", Median(kmod_read) / Median(anon_write),
       "ratio");
  Emit("fault.kmod.local_hit_write.vs_native_anon_write", Median(kmod_write) / Median(anon_write),
       "ratio");
  Emit("fault.uffd.local_minor.vs_kmod_local_hit_read", Median(uffd_minor) / Median(kmod_read),
       "ratio");
  return 0;
}

}  // namespace dsvm::bench
