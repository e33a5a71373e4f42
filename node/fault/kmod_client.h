// The client side of the kmod fault backend.
//
// The daemon hands a client a descriptor of /dev/dsvm with the region (the
// backend's client_map_fd); the client maps the region through it at the
// region's base with file offset = base (kmod/uapi/dsvm_uapi.h, "mmap"),
// then hands the same descriptor and a pidfd of itself back with MapRegion,
// so the daemon knows when it exits. dsvm.ko serves the faults: pages the
// node holds in the kernel, the rest through the daemon. When the daemon
// dies, its regions are destroyed and every access gets SIGBUS.
#ifndef DSVM_NODE_FAULT_KMOD_CLIENT_H_
#define DSVM_NODE_FAULT_KMOD_CLIENT_H_

#include <cstddef>
#include <cstdint>

#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

struct KmodClientMapping {
  void* addr = nullptr;  // == the region's base
  size_t size = 0;
  UniqueFd pidfd;  // of the calling process; -1 where pidfd_open is missing
};

// True when `fd` is a character device (what the kmod backend hands out; the
// uffd backend hands out a memfd).
bool IsDeviceFd(int fd);

// Maps the region through `device` MAP_SHARED read-write at `base` (never
// over an existing mapping; not inherited by children: MADV_DONTFORK).
// Errors: kInvalidArgument (base or size not page aligned, size 0; or the
// module refused the mapping: no such region), kResourceExhausted
// (something is mapped at the range already), kIoError.
Result<KmodClientMapping> KmodClientMapRegion(int device, proto::PageAddr base, uint64_t size);

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_KMOD_CLIENT_H_
