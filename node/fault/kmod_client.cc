#include "node/fault/kmod_client.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace dsvm::node {

bool IsDeviceFd(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISCHR(st.st_mode);
}

Result<KmodClientMapping> KmodClientMapRegion(int device, proto::PageAddr base, uint64_t size) {
  const uint64_t small = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  if (size == 0 || size % small != 0 || base == 0 || base % small != 0) {
    return InvalidArgument("region range is empty or not page aligned");
  }
  void* want = reinterpret_cast<void*>(base);
  void* p = ::mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, device,
                   static_cast<off_t>(base));
  if (p == MAP_FAILED) {
    const int err = errno;
    if (err == EEXIST) return ResourceExhausted("the region's address range is taken in this process");
    if (err == ENOENT || err == EINVAL) {
      return InvalidArgument(std::string("dsvm.ko refused the mapping: ") + std::strerror(err));
    }
    return IoError(std::string("mmap of /dev/dsvm: ") + std::strerror(err));
  }
  if (p != want) {  // kernels before 4.17 ignore MAP_FIXED_NOREPLACE
    ::munmap(p, size);
    return ResourceExhausted("the region's address range is taken in this process");
  }
  // As with the uffd backend, children do not inherit the mapping.
  ::madvise(p, size, MADV_DONTFORK);
  KmodClientMapping m;
  m.addr = p;
  m.size = size;
  m.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  return m;
}

}  // namespace dsvm::node
