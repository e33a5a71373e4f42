// The shard map: which directory shard (coordinator process) owns a page.
//
// Every node and every coordinator holds the same map, handed out at join.
// Pages are assigned by address in granules of kShardGranule bytes,
// interleaved over the shards, so one region's directory load spreads over
// all of them and no granule ever straddles two shards (a 2 MiB page is one
// granule). Nothing in dsvm may assume a single shard: the simulator runs two.
#ifndef DSVM_PROTO_SHARD_MAP_H_
#define DSVM_PROTO_SHARD_MAP_H_

#include <cstdint>

#include "proto/messages.h"

namespace dsvm::proto {

inline constexpr uint64_t kShardGranuleShift = 21;  // 2 MiB
inline constexpr uint64_t kShardGranule = uint64_t{1} << kShardGranuleShift;

class ShardMap {
 public:
  explicit ShardMap(uint32_t shard_count = 1) : shard_count_(shard_count) {
    DSVM_CHECK(shard_count >= 1);
  }
  uint32_t shard_count() const { return shard_count_; }
  uint32_t ShardOf(PageAddr page) const {
    return static_cast<uint32_t>((page >> kShardGranuleShift) % shard_count_);
  }

 private:
  uint32_t shard_count_;
};

}  // namespace dsvm::proto

#endif  // DSVM_PROTO_SHARD_MAP_H_
