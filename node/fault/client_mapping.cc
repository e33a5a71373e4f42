#include "node/fault/client_mapping.h"

#include <utility>

#include "node/fault/kmod_client.h"
#include "node/fault/uffd_client.h"

namespace dsvm::node {

Result<ClientMapping> ClientMapRegion(UniqueFd region_fd, proto::PageAddr base, uint64_t size) {
  ClientMapping m;
  if (IsDeviceFd(region_fd.get())) {
    DSVM_ASSIGN_OR_RETURN(KmodClientMapping k, KmodClientMapRegion(region_fd.get(), base, size));
    m.addr = k.addr;
    m.size = k.size;
    m.kmod = true;
    m.fault_fd = std::move(region_fd);
    m.pidfd = std::move(k.pidfd);
    return m;
  }
  DSVM_ASSIGN_OR_RETURN(UffdClientMapping u, UffdClientMapRegion(region_fd.get(), base, size));
  m.addr = u.addr;
  m.size = u.size;
  m.fault_fd = std::move(u.uffd.fd);
  m.pidfd = std::move(u.pidfd);
  return m;
}

}  // namespace dsvm::node
