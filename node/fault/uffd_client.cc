#include "node/fault/uffd_client.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "node/fault/uffd_defs.h"

namespace dsvm::node {
namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

}  // namespace

Result<Userfaultfd> CreateUserfaultfd() {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  Userfaultfd u;
  u.fd.reset(static_cast<int>(syscall(SYS_userfaultfd, flags)));
  if (u.fd) return u;
  if (errno == ENOSYS) return Unavailable("the kernel has no userfaultfd (CONFIG_USERFAULTFD)");
  const int first = errno;
  u.fd.reset(static_cast<int>(syscall(SYS_userfaultfd, flags | uffd::kUserModeOnly)));
  if (u.fd) {
    u.user_mode_only = true;
    return u;
  }
  UniqueFd dev(open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (dev) {
    u.fd.reset(ioctl(dev.get(), uffd::kIocNew, flags));
    if (u.fd) return u;
  }
  return PermissionDenied(std::string("userfaultfd refused (") + std::strerror(first) +
                          "): run as root, or set vm.unprivileged_userfaultfd=1, or grant "
                          "access to /dev/userfaultfd");
}

Result<UffdClientMapping> UffdClientMapRegion(int memfd, proto::PageAddr base, uint64_t size) {
  const uint64_t small = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (size == 0 || size % small != 0 || base == 0 || base % small != 0) {
    return InvalidArgument("region range is empty or not page aligned");
  }
  void* want = reinterpret_cast<void*>(base);
  void* p = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, memfd, 0);
  if (p == MAP_FAILED) {
    if (errno == EEXIST) {
      return ResourceExhausted("the region's address range is taken in this process");
    }
    return IoError(Errno("mmap of the region memfd"));
  }
  if (p != want) {  // kernels before 4.17 ignore MAP_FIXED_NOREPLACE
    munmap(p, size);
    return ResourceExhausted("the region's address range is taken in this process");
  }
  // A child of the client would inherit the mapping without the
  // registration (no UFFD_FEATURE_EVENT_FORK): a view of the memfd outside
  // the protocol. It inherits nothing instead.
  madvise(p, size, MADV_DONTFORK);
  UffdClientMapping m;
  m.addr = p;
  m.size = size;
  auto uffd = CreateUserfaultfd();
  if (!uffd.ok()) {
    munmap(p, size);
    return uffd.status();
  }
  m.uffd = std::move(uffd).value();
  m.pidfd.reset(static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0)));
  return m;
}

}  // namespace dsvm::node
