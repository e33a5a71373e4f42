// What the rest of libdsvm may ask of client_api.cc's per-process state.
// Internal to client/lib.
#ifndef DSVM_CLIENT_LIB_OPEN_REGIONS_H_
#define DSVM_CLIENT_LIB_OPEN_REGIONS_H_

#include <cstdint>
#include <string>

#include "proto/messages.h"

namespace dsvm::client {

struct OpenRange {
  uint64_t region_base = 0;
  uint64_t region_size = 0;
  uint32_t page_size = 0;
  proto::NodeId node = proto::kNoNode;  // the node this process is connected to
};

// Checks that [addr, addr + len) lies inside one region open in this
// process and fills *out. Returns DSVM_OK, or sets the thread's error
// (prefixed with `what`) and returns DSVM_ENOT_INITIALIZED or
// DSVM_EINVALID_ARGUMENT. len 0 is refused.
int FindOpenRange(const std::string& what, uint64_t addr, uint64_t len, OpenRange* out);

}  // namespace dsvm::client

#endif  // DSVM_CLIENT_LIB_OPEN_REGIONS_H_
