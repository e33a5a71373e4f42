// userfaultfd definitions newer than the system headers.
//
// The build machines carry Debian 12's linux-libc-dev (6.1 UAPI) while the
// kernels they run may be newer; the backend asks the running kernel what it
// supports (UFFDIO_API, and a probe for UFFDIO_CONTINUE_MODE_WP), so it may
// use these values whatever the headers say. Values from the kernel's
// include/uapi/linux/userfaultfd.h.
#ifndef DSVM_NODE_FAULT_UFFD_DEFS_H_
#define DSVM_NODE_FAULT_UFFD_DEFS_H_

#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace dsvm::node::uffd {

inline constexpr uint64_t kFeatureWpUnpopulated = 1ull << 13;  // 6.4
inline constexpr uint64_t kFeaturePoison = 1ull << 14;         // 6.6
inline constexpr uint64_t kContinueModeWp = 1ull << 1;         // newer than 6.1; probed
inline constexpr uint64_t kPoisonModeDontWake = 1ull << 0;
inline constexpr int kUserModeOnly = 1;                    // UFFD_USER_MODE_ONLY, 5.11
inline constexpr unsigned long kIocNew = _IO(0xAA, 0x00);  // USERFAULTFD_IOC_NEW, 6.1

// struct uffdio_poison (6.6).
struct UffdioPoison {
  struct uffdio_range range;
  __u64 mode;
  __s64 updated;
};
inline constexpr int kIoctlPoisonNr = 0x08;
inline constexpr unsigned long kIoctlPoison = _IOWR(UFFDIO, kIoctlPoisonNr, UffdioPoison);

// What a client's userfaultfd must support for the uffd backend: missing and
// minor faults and write-protection, all on shmem.
inline constexpr uint64_t kRequiredFeatures =
    UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
    UFFD_FEATURE_PAGEFAULT_FLAG_WP;
// Used where present: hugetlb-backed regions, thread ids in events, poison.
inline constexpr uint64_t kOptionalFeatures = UFFD_FEATURE_MISSING_HUGETLBFS |
                                              UFFD_FEATURE_MINOR_HUGETLBFS |
                                              UFFD_FEATURE_THREAD_ID | kFeaturePoison;

inline constexpr uint64_t kRegisterModes =
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;

}  // namespace dsvm::node::uffd

#endif  // DSVM_NODE_FAULT_UFFD_DEFS_H_
