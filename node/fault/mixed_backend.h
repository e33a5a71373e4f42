// MixedBackend: one FaultBackend made of two, each region served by the
// first that takes its page size. The daemon's "kmod" backend is one: dsvm.ko
// serves 4 KiB regions (faults on pages valid on the node stay in the
// kernel), userfaultfd serves the rest (64 KiB and 2 MiB pages), so a node
// on the module still opens every region of the cluster.
//
// Mapping ids are the inner backends' with the backend's number in the low
// bit, so events, tokens and RemoveMapping find their way back. event_fd is
// an epoll set of both inner event descriptors; ReadEvents drains the first,
// then the second.
//
// Thread safety: one owner, the daemon's fault strand (as the inner ones).
#ifndef DSVM_NODE_FAULT_MIXED_BACKEND_H_
#define DSVM_NODE_FAULT_MIXED_BACKEND_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "node/fault/fault_backend.h"
#include "node/memory/unique_fd.h"
#include "proto/status.h"

namespace dsvm::node {

class MixedBackend final : public FaultBackend {
 public:
  // `first` serves the regions whose page size `first_takes` accepts,
  // `second` every other. Errors: kIoError (epoll).
  static Result<std::unique_ptr<MixedBackend>> Create(
      std::unique_ptr<FaultBackend> first, std::function<bool(uint64_t page_size)> first_takes,
      std::unique_ptr<FaultBackend> second);

  // The first backend's name: the one the node was asked for.
  std::string_view name() const override { return inner_[0]->name(); }
  std::string_view NameFor(uint64_t page_size) const override {
    return inner_[first_takes_(page_size) ? 0 : 1]->name();
  }
  Status AddRegion(PageStore* store) override;
  Status RemoveRegion(PageAddr base) override;
  Result<MappingId> AddMapping(MappingRequest request) override;
  Status RemoveMapping(MappingId id) override;
  int client_map_fd(const PageStore& store) const override;
  uint64_t local_hits() const override;
  int event_fd() const override { return epoll_.get(); }
  Result<size_t> ReadEvents(std::span<FaultEvent> out) override;
  Status Resolve(const FaultToken& token, Resolution how) override;
  Status MapRead(PageAddr page) override;
  Status MapWrite(PageAddr page) override;
  Status MapRange(PageAddr first, size_t count, uint64_t page_size, bool write) override;
  Status Unmap(PageAddr page) override;
  Status UnmapRange(PageAddr first, size_t count, uint64_t page_size) override;
  Status WriteBack(PageAddr page) override;
  Status Refresh(PageAddr page) override;
  Status Invalidate(PageAddr page) override;
  Status InvalidateAll(PageAddr base) override;

  // The inner backend (0 or 1) that serves the region at `base`; -1 if none.
  int BackendOf(PageAddr base) const;

 private:
  struct Region {
    uint64_t size = 0;
    int backend = 0;
  };

  MixedBackend(std::array<std::unique_ptr<FaultBackend>, 2> inner,
               std::function<bool(uint64_t)> first_takes, UniqueFd epoll);

  // The inner backend serving the region that holds `page`, or nullptr.
  FaultBackend* ForPage(PageAddr page) const;
  // Calls `call` on the inner backend serving `page`; kNotFound if none.
  Status ByPage(PageAddr page, Status (FaultBackend::*call)(PageAddr));
  static MappingId Outer(MappingId inner, int backend) { return inner << 1 | backend; }
  static int BackendOfMapping(MappingId outer) { return static_cast<int>(outer & 1); }
  static MappingId Inner(MappingId outer) { return outer >> 1; }

  std::array<std::unique_ptr<FaultBackend>, 2> inner_;
  std::function<bool(uint64_t)> first_takes_;
  UniqueFd epoll_;
  std::map<PageAddr, Region> regions_;  // by base
};

// The node daemon's "kmod" backend: dsvm.ko for 4 KiB regions and
// userfaultfd for the others; dsvm.ko alone (with a log line) where
// userfaultfd is unavailable. Errors: those of KmodBackend::Create.
Result<std::unique_ptr<FaultBackend>> CreateKmodNodeBackend();

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_MIXED_BACKEND_H_
