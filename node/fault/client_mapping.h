// A client process's mapping of a region, by whichever fault backend its
// daemon runs: the daemon's RegionOpen reply carries one descriptor, a
// memfd (uffd backend: node/fault/uffd_client.h) or a /dev/dsvm file
// (kmod backend: node/fault/kmod_client.h), and the client maps the region
// through it and hands the daemon what that backend needs with MapRegion.
// libdsvm, the integration tests' raw clients and the benches share this.
#ifndef DSVM_NODE_FAULT_CLIENT_MAPPING_H_
#define DSVM_NODE_FAULT_CLIENT_MAPPING_H_

#include <cstddef>
#include <vector>

#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

struct ClientMapping {
  void* addr = nullptr;  // == the region's base
  size_t size = 0;
  bool kmod = false;     // mapped through dsvm.ko
  // What MapRegion carries, in order: the fault descriptor (the userfaultfd;
  // for kmod the /dev/dsvm file itself), then the pidfd if there is one.
  // Close both once MapRegion is answered: with uffd the client must keep no
  // copy of the userfaultfd (uffd_client.h), and the mapping holds its file.
  UniqueFd fault_fd;
  UniqueFd pidfd;

  std::vector<int> attach() const {
    std::vector<int> fds = {fault_fd.get()};
    if (pidfd) fds.push_back(pidfd.get());
    return fds;
  }
};

// Maps the region [base, base + size) through `region_fd`, the descriptor
// of the daemon's RegionOpen reply (taken). Errors: those of
// KmodClientMapRegion or UffdClientMapRegion (kResourceExhausted: something
// is mapped at the range; kPermissionDenied: no userfaultfd).
Result<ClientMapping> ClientMapRegion(UniqueFd region_fd, proto::PageAddr base, uint64_t size);

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_CLIENT_MAPPING_H_
