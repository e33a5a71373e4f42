#include "node/fault/mixed_backend.h"

#include <sys/epoll.h>

#include <cerrno>
#include <cstring>

#include "kmod/uapi/dsvm_uapi.h"
#include "node/fault/kmod_backend.h"
#include "node/fault/uffd_backend.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

Result<std::unique_ptr<MixedBackend>> MixedBackend::Create(
    std::unique_ptr<FaultBackend> first, std::function<bool(uint64_t)> first_takes,
    std::unique_ptr<FaultBackend> second) {
  UniqueFd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return IoError(std::string("epoll_create1: ") + std::strerror(errno));
  std::array<std::unique_ptr<FaultBackend>, 2> inner = {std::move(first), std::move(second)};
  for (int i = 0; i < 2; ++i) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = static_cast<uint32_t>(i);
    if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, inner[i]->event_fd(), &ev) != 0) {
      return IoError(std::string("epoll_ctl: ") + std::strerror(errno));
    }
  }
  return std::unique_ptr<MixedBackend>(
      new MixedBackend(std::move(inner), std::move(first_takes), std::move(epoll)));
}

MixedBackend::MixedBackend(std::array<std::unique_ptr<FaultBackend>, 2> inner,
                           std::function<bool(uint64_t)> first_takes, UniqueFd epoll)
    : inner_(std::move(inner)), first_takes_(std::move(first_takes)), epoll_(std::move(epoll)) {}

int MixedBackend::BackendOf(PageAddr base) const {
  auto it = regions_.find(base);
  return it == regions_.end() ? -1 : it->second.backend;
}

FaultBackend* MixedBackend::ForPage(PageAddr page) const {
  auto it = regions_.upper_bound(page);
  if (it == regions_.begin()) return nullptr;
  --it;
  if (page - it->first >= it->second.size) return nullptr;
  return inner_[it->second.backend].get();
}

Status MixedBackend::AddRegion(PageStore* store) {
  const int backend = first_takes_(store->page_size()) ? 0 : 1;
  DSVM_RETURN_IF_ERROR(inner_[backend]->AddRegion(store));
  regions_[store->base()] = Region{store->size(), backend};
  return Status::Ok();
}

Status MixedBackend::RemoveRegion(PageAddr base) {
  const int backend = BackendOf(base);
  if (backend < 0) return NotFound("no region registered at " + Hex(base));
  DSVM_RETURN_IF_ERROR(inner_[backend]->RemoveRegion(base));
  regions_.erase(base);
  return Status::Ok();
}

Result<MappingId> MixedBackend::AddMapping(MappingRequest request) {
  const int backend = BackendOf(request.region);
  if (backend < 0) return NotFound("no region registered at " + Hex(request.region));
  DSVM_ASSIGN_OR_RETURN(MappingId id, inner_[backend]->AddMapping(std::move(request)));
  return Outer(id, backend);
}

Status MixedBackend::RemoveMapping(MappingId id) {
  return inner_[BackendOfMapping(id)]->RemoveMapping(Inner(id));
}

int MixedBackend::client_map_fd(const PageStore& store) const {
  const int backend = BackendOf(store.base());
  return inner_[backend < 0 ? 1 : backend]->client_map_fd(store);
}

uint64_t MixedBackend::local_hits() const {
  return inner_[0]->local_hits() + inner_[1]->local_hits();
}

Result<size_t> MixedBackend::ReadEvents(std::span<FaultEvent> out) {
  // The inner reads are non-blocking; the epoll set is level-triggered, so
  // it stops being readable once they are drained (no epoll_wait here).
  size_t n = 0;
  for (int b = 0; b < 2 && n < out.size(); ++b) {
    DSVM_ASSIGN_OR_RETURN(size_t got, inner_[b]->ReadEvents(out.subspan(n)));
    for (size_t i = n; i < n + got; ++i) {
      out[i].mapping = Outer(out[i].mapping, b);
      out[i].token.mapping = Outer(out[i].token.mapping, b);
    }
    n += got;
  }
  return n;
}

Status MixedBackend::Resolve(const FaultToken& token, Resolution how) {
  FaultToken inner = token;
  inner.mapping = Inner(token.mapping);
  return inner_[BackendOfMapping(token.mapping)]->Resolve(inner, how);
}

Status MixedBackend::ByPage(PageAddr page, Status (FaultBackend::*call)(PageAddr)) {
  FaultBackend* b = ForPage(page);
  if (b == nullptr) return NotFound("no region registered holds " + Hex(page));
  return (b->*call)(page);
}

Status MixedBackend::MapRead(PageAddr page) { return ByPage(page, &FaultBackend::MapRead); }
Status MixedBackend::MapWrite(PageAddr page) { return ByPage(page, &FaultBackend::MapWrite); }
Status MixedBackend::MapRange(PageAddr first, size_t count, uint64_t page_size, bool write) {
  FaultBackend* b = ForPage(first);
  if (b == nullptr) return NotFound("no region registered holds " + Hex(first));
  return b->MapRange(first, count, page_size, write);
}
Status MixedBackend::Unmap(PageAddr page) { return ByPage(page, &FaultBackend::Unmap); }
Status MixedBackend::UnmapRange(PageAddr first, size_t count, uint64_t page_size) {
  FaultBackend* b = ForPage(first);
  if (b == nullptr) return NotFound("no region registered holds " + Hex(first));
  return b->UnmapRange(first, count, page_size);
}
Status MixedBackend::WriteBack(PageAddr page) { return ByPage(page, &FaultBackend::WriteBack); }
Status MixedBackend::Refresh(PageAddr page) { return ByPage(page, &FaultBackend::Refresh); }
Status MixedBackend::Invalidate(PageAddr page) { return ByPage(page, &FaultBackend::Invalidate); }

Status MixedBackend::InvalidateAll(PageAddr base) {
  const int backend = BackendOf(base);
  if (backend < 0) return NotFound("no region registered at " + Hex(base));
  return inner_[backend]->InvalidateAll(base);
}

Result<std::unique_ptr<FaultBackend>> CreateKmodNodeBackend() {
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<KmodBackend> kmod, KmodBackend::Create());
  auto uffd = UffdBackend::Create();
  if (!uffd.ok()) {
    LogWarning("userfaultfd is unavailable (" + uffd.status().ToString() +
               "): regions of pages other than 4 KiB cannot be opened on this node");
    return std::unique_ptr<FaultBackend>(std::move(kmod));
  }
  DSVM_ASSIGN_OR_RETURN(
      std::unique_ptr<MixedBackend> mixed,
      MixedBackend::Create(
          std::move(kmod), [](uint64_t page_size) { return page_size == DSVM_PAGE_SIZE_4K; },
          std::move(*uffd)));
  return std::unique_ptr<FaultBackend>(std::move(mixed));
}

}  // namespace dsvm::node
