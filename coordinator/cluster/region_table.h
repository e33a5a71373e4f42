// RegionTable: named regions and where they sit in the cluster-wide window.
//
// Every region gets its own address range inside one virtual address window
// that is the same on every node, so a pointer into a region is valid
// everywhere. Ranges are aligned to the shard granule (2 MiB) so a page of
// any size lies in one shard. Pure: the service persists what it decides.
#ifndef DSVM_COORDINATOR_CLUSTER_REGION_TABLE_H_
#define DSVM_COORDINATOR_CLUSTER_REGION_TABLE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "coordinator/storage/store.h"
#include "proto/status.h"

namespace dsvm::coordinator {

struct WindowOptions {
  uint64_t base = 0x200000000000ull;  // 32 TiB: above typical heap and mmap ranges
  uint64_t size = 1ull << 44;         // 16 TiB of shared address space
};

// A name is 1..255 of [A-Za-z0-9._-], not starting with '.'. Errors:
// kInvalidArgument.
Status ValidateRegionName(const std::string& name);

class RegionTable {
 public:
  explicit RegionTable(WindowOptions window = {});

  // Validates a create and picks the region's range (first fit). Does not
  // insert. Errors: kInvalidArgument (name, size 0, page size not 4 KiB,
  // 64 KiB or 2 MiB), kAlreadyExists, kResourceExhausted (no room).
  Result<RegionRecord> Plan(const std::string& name, uint64_t size, uint32_t page_size) const;

  // Adds a record (planned, or loaded at startup). Errors: kAlreadyExists,
  // kCorruption (overlaps another region or lies outside the window).
  Status Insert(const RegionRecord& record);
  // Errors: kNotFound.
  Result<RegionRecord> Remove(const std::string& name);

  const RegionRecord* FindByName(const std::string& name) const;
  // The region containing `address`, or nullptr.
  const RegionRecord* FindByAddress(uint64_t address) const;
  std::vector<RegionRecord> List() const;
  const WindowOptions& window() const { return window_; }

 private:
  WindowOptions window_;
  std::map<std::string, RegionRecord> by_name_;
  std::map<uint64_t, std::string> by_base_;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_CLUSTER_REGION_TABLE_H_
