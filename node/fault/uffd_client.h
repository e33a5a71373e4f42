// The client side of the uffd fault backend.
//
// A client process maps a region's memfd (received from the daemon) at the
// region's cluster-wide address, creates a userfaultfd and hands it, with a
// pidfd of itself, to the daemon (SendFds). The daemon, not the client,
// initialises the userfaultfd (UFFDIO_API) and registers the range
// (UFFDIO_REGISTER acts on the creating process's address space whoever
// calls it), so which modes and features a mapping uses is decided in one
// place. The client must not touch the range before the daemon acknowledged
// the mapping: an access before registration would allocate the page in the
// memfd behind the coherence protocol's back.
//
// The client keeps no copy of the userfaultfd: once the daemon holds the only
// one, the daemon's death closes it, and the kernel then unregisters the
// range. (The client library must notice the daemon's death on its socket
// and stop using the region; with the uffd backend the kernel cannot SIGBUS
// it as dsvm.ko will.)
#ifndef DSVM_NODE_FAULT_UFFD_CLIENT_H_
#define DSVM_NODE_FAULT_UFFD_CLIENT_H_

#include <cstddef>
#include <cstdint>

#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

struct Userfaultfd {
  UniqueFd fd;  // close-on-exec, non-blocking, not yet initialised (no UFFDIO_API)
  // Created with UFFD_USER_MODE_ONLY: the kernel's own accesses to the range
  // (read(2) into it, say) are not reported; on a page not mapped yet they
  // fail with EFAULT. Happens when vm.unprivileged_userfaultfd is 0 and the
  // process lacks CAP_SYS_PTRACE.
  bool user_mode_only = false;
};

// Creates a userfaultfd for the calling process. Tries, in order: the
// syscall with kernel faults included; the syscall with UFFD_USER_MODE_ONLY;
// /dev/userfaultfd. Errors: kPermissionDenied (every way refused: not root
// and vm.unprivileged_userfaultfd forbids it, with no access to
// /dev/userfaultfd), kUnavailable (the kernel has no userfaultfd).
Result<Userfaultfd> CreateUserfaultfd();

// A client's mapping of a region, ready to hand over.
struct UffdClientMapping {
  void* addr = nullptr;  // == the region's base
  size_t size = 0;
  Userfaultfd uffd;
  UniqueFd pidfd;  // of the calling process; -1 where pidfd_open is missing
};

// Maps `memfd` MAP_SHARED read-write at `base` (never over an existing
// mapping; not inherited by children: MADV_DONTFORK) and creates the
// userfaultfd and pidfd to hand to the daemon.
// Errors: kInvalidArgument (base or size not page aligned, size 0),
// kResourceExhausted (something is mapped at the range already), and those
// of CreateUserfaultfd.
Result<UffdClientMapping> UffdClientMapRegion(int memfd, proto::PageAddr base, uint64_t size);

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_UFFD_CLIENT_H_
