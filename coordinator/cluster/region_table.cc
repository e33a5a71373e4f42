#include "coordinator/cluster/region_table.h"

#include "proto/messages.h"
#include "proto/shard_map.h"

namespace dsvm::coordinator {
namespace {

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

}  // namespace

Status ValidateRegionName(const std::string& name) {
  if (name.empty()) return InvalidArgument("region name is empty");
  if (name.size() > proto::kMaxNameLength) {
    return InvalidArgument("region name longer than " + std::to_string(proto::kMaxNameLength));
  }
  if (name[0] == '.') return InvalidArgument("region name starts with '.'");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return InvalidArgument("region name has a character outside [A-Za-z0-9._-]");
  }
  return Status::Ok();
}

RegionTable::RegionTable(WindowOptions window) : window_(window) {
  DSVM_CHECK(window_.base % proto::kShardGranule == 0);
  DSVM_CHECK(window_.size % proto::kShardGranule == 0 && window_.size > 0);
}

Result<RegionRecord> RegionTable::Plan(const std::string& name, uint64_t size,
                                       uint32_t page_size) const {
  DSVM_RETURN_IF_ERROR(ValidateRegionName(name));
  if (page_size != 4096 && page_size != 65536 && page_size != proto::kMaxPageSize) {
    return InvalidArgument("page size " + std::to_string(page_size) +
                           " is not 4096, 65536 or 2097152");
  }
  if (size == 0) return InvalidArgument("region size is 0");
  if (size > window_.size) return ResourceExhausted("region larger than the address window");
  if (by_name_.count(name)) return AlreadyExists("region '" + name + "' exists");
  const uint64_t bytes = RoundUp(size, page_size);
  const uint64_t span = RoundUp(bytes, proto::kShardGranule);
  uint64_t cursor = window_.base;
  for (const auto& [base, other] : by_base_) {
    if (base - cursor >= span) break;
    const RegionRecord& r = by_name_.at(other);
    cursor = RoundUp(r.base + r.size, proto::kShardGranule);
  }
  if (cursor + span > window_.base + window_.size) {
    return ResourceExhausted("no free range of " + std::to_string(span) + " bytes in the window");
  }
  RegionRecord r;
  r.name = name;
  r.base = cursor;
  r.size = bytes;
  r.page_size = page_size;
  return r;
}

Status RegionTable::Insert(const RegionRecord& r) {
  if (by_name_.count(r.name)) return AlreadyExists("region '" + r.name + "' exists");
  if (r.base < window_.base || r.size == 0 || r.base + r.size > window_.base + window_.size ||
      r.base % proto::kShardGranule != 0) {
    return Corruption("region '" + r.name + "' lies outside the address window");
  }
  auto next = by_base_.lower_bound(r.base);
  if (next != by_base_.end() && next->first < r.base + r.size) {
    return Corruption("region '" + r.name + "' overlaps '" + next->second + "'");
  }
  if (next != by_base_.begin()) {
    const RegionRecord& prev = by_name_.at(std::prev(next)->second);
    if (prev.base + prev.size > r.base) {
      return Corruption("region '" + r.name + "' overlaps '" + prev.name + "'");
    }
  }
  by_name_[r.name] = r;
  by_base_[r.base] = r.name;
  return Status::Ok();
}

Result<RegionRecord> RegionTable::Remove(const std::string& name) {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return NotFound("no region '" + name + "'");
  RegionRecord r = it->second;
  by_base_.erase(r.base);
  by_name_.erase(it);
  return r;
}

const RegionRecord* RegionTable::FindByName(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &it->second;
}

const RegionRecord* RegionTable::FindByAddress(uint64_t address) const {
  auto it = by_base_.upper_bound(address);
  if (it == by_base_.begin()) return nullptr;
  const RegionRecord& r = by_name_.at(std::prev(it)->second);
  return address < r.base + r.size ? &r : nullptr;
}

std::vector<RegionRecord> RegionTable::List() const {
  std::vector<RegionRecord> out;
  for (const auto& [base, name] : by_base_) out.push_back(by_name_.at(name));
  return out;
}

}  // namespace dsvm::coordinator
