// Small helpers the node daemon's source files share (node_daemon*.cc).
#ifndef DSVM_NODE_DAEMON_DAEMON_UTIL_H_
#define DSVM_NODE_DAEMON_DAEMON_UTIL_H_

#include <chrono>
#include <cstdint>
#include <variant>

#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

inline uint64_t MonotonicUs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// The page a message for the directory is about (the agent sends Acquire,
// InvalidateAck and Done), which names the shard it goes to.
inline proto::PageAddr DirectoryPageOf(const proto::Message& m) {
  return std::visit(
      [](const auto& x) -> proto::PageAddr {
        if constexpr (requires { x.page; }) {
          return x.page;
        } else {
          DSVM_CHECK(false && "a directory message without a page");
          return 0;
        }
      },
      m);
}

}  // namespace dsvm::node

#endif  // DSVM_NODE_DAEMON_DAEMON_UTIL_H_
