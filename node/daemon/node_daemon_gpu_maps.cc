#include "node/daemon/node_daemon.h"

#include <poll.h>

#include <algorithm>
#include <optional>
#include <string>
#include <unordered_set>

#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

// GPU maps: acquisitions of a map's pages lost to remote requests before the
// pin, retried this often before the map fails (kUnavailable).
constexpr uint32_t kGpuMapRounds = 8;

}  // namespace

// ---------------------------------------------------------------------------
// GPU maps (dsvm_gpu_map / dsvm_gpu_unmap)

void NodeDaemon::StartGpuMap(int fd, uint64_t request, const proto::GpuMap& m, uint32_t round,
                             bool prefetch) {
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  if (!tier_) {
    return fail(FailedPrecondition(
        "this node has no GPU tier: dsvm-node runs with --device-backend none"));
  }
  if (m.gpu >= device_->device_count()) {
    return fail(InvalidArgument("gpu " + std::to_string(m.gpu) + " does not exist: this node has " +
                                std::to_string(device_->device_count()) + " (" +
                                std::string(device_->name()) + ")"));
  }
  Prefetch p;
  Status st = CheckClientRange(m.address, m.length, &p.next, &p.end, &p.page_size);
  if (!st.ok()) return fail(st);
  if (m.address % p.page_size != 0 || m.length % p.page_size != 0) {
    return fail(InvalidArgument("a gpu map covers whole pages: " + std::to_string(m.length) +
                                " bytes at " + Hex(m.address) + " are not aligned to the region's " +
                                std::to_string(p.page_size) + "-byte pages"));
  }
  // Before any page is acquired: a range the GPU's budget cannot hold would
  // take the pages from other nodes (and other page sizes' GPU memory) for
  // nothing.
  if (m.length > options_.gpu_budget_bytes / p.page_size * p.page_size) {
    return fail(ResourceExhausted(std::to_string(m.length) + " bytes are more than gpu " +
                                  std::to_string(m.gpu) + "'s budget of " +
                                  std::to_string(options_.gpu_budget_bytes) + " bytes"));
  }
  auto it = clients_.find(fd);
  DSVM_CHECK(it != clients_.end());
  const uint64_t serial = it->second.serial;
  p.client_fd = fd;
  p.client_serial = serial;
  p.client_request = request;
  p.write = m.write != 0;
  // From the top of the loop, not from the action that completed the last
  // acquisition: the map's copies serve the loop (TierJob), which must not
  // run inside Execute.
  p.done = [this, fd, serial, request, m, round, prefetch](Status acquired) {
    Post([=, this] { FinishGpuMap(fd, serial, request, m, round, prefetch, acquired); });
  };
  StartPrefetch(std::move(p));
}

void NodeDaemon::FinishGpuMap(int fd, uint64_t serial, uint64_t request, const proto::GpuMap& m,
                              uint32_t round, bool prefetch, Status acquired) {
  if (!IsClient(fd, serial)) return;  // gone meanwhile: nothing was pinned
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  if (!acquired.ok()) return fail(acquired);
  PageStore* store = StoreOf(m.address);
  if (store == nullptr) return fail(NotFound("the region at " + Hex(m.address) + " went meanwhile"));
  const uint32_t ps = store->page_size();
  std::vector<proto::PageAddr> pages;
  bool held = true;
  for (proto::PageAddr p = m.address; p < m.address + m.length; p += ps) {
    pages.push_back(p);
    const PageState s = agent_.StateOf(p);
    held &= m.write ? s == PageState::kModified : s != PageState::kInvalid;
  }
  if (!held) {
    // A remote request took a page between its acquisition and now: acquire
    // again. Pins are taken only once the whole range is held, so two maps
    // acquiring overlapping ranges never hold each other's pages.
    if (round + 1 >= kGpuMapRounds) {
      return fail(Unavailable("the pages of the gpu map were taken by other nodes " +
                              std::to_string(kGpuMapRounds) + " times while it acquired them"));
    }
    return StartGpuMap(fd, request, m, round + 1, prefetch);
  }
  // Accessed-by advice: the GPU uses the host copy (zero-copy).
  size_t advised = 0;
  for (proto::PageAddr p : pages) advised += GpuAdviceOf(accessed_by_, p) == m.gpu;
  if (!prefetch && advised != 0) {
    if (advised != pages.size()) {
      return fail(InvalidArgument("the pages of a gpu map must all or none have accessed-by "
                                  "advice for gpu " + std::to_string(m.gpu) + "; " +
                                  std::to_string(advised) + " of " + std::to_string(pages.size()) +
                                  " have it"));
    }
    return FinishZeroCopyMap(fd, request, m, pages);
  }
  // Read-mostly advice: a read map of pages with a copy on another GPU of
  // the node (mapped there, or cached) gets a replica of its own rather
  // than moving them (or failing, when they are mapped there).
  bool replica = !prefetch && !m.write && AllReadMostly(pages);
  if (replica) {
    replica = std::any_of(pages.begin(), pages.end(), [&](proto::PageAddr p) {
      const std::optional<uint32_t> on = tier_->table().GpuOf(p);
      return on && *on != m.gpu;
    });
  }
  // A zero-copy map uses the host copy, a tier map a GPU copy: both live
  // on one page, one's writes would be lost to the other. As a zero-copy
  // map waits for the tier maps of its pages (FinishZeroCopyMap), a tier
  // map waits for the zero-copy ones.
  for (const auto& [cfd, c] : clients_) {
    for (const GpuMapping& g : c.gpu_maps) {
      if (g.zero_copy && !g.lost && g.first < m.address + m.length && m.address < g.end) {
        return fail(FailedPrecondition(
            "pages at " + Hex(std::max(g.first, m.address)) + " are mapped zero-copy (accessed-by) "
            "on gpu " + std::to_string(g.gpu) + "; a map into GPU memory must wait for its unmap"));
      }
    }
  }
  // The bytes the GPU gets are the node's current ones, and a copy kept on
  // the GPU stays trusted only while no local process can write the page:
  // - A clean GPU copy of a page local processes could write (held
  //   Modified, not hidden since an earlier map or prefetch) may be stale:
  //   it is evicted and copied afresh.
  // - Before anything is copied, local processes lose the right to write
  //   the pages (a write map: any access), so that no write lands between
  //   the copy and the hiding unseen: a later write faults (RevealToCpu)
  //   and the next map copies that page again. A replica is not kept past
  //   its map and hides nothing. Hidden this way, a read map's clean copy
  //   is reused by the next map of the same pages.
  // - A backend's own copy (kmod) is written back after the hiding, which
  //   for kmod stops writes to it.
  std::vector<proto::PageAddr> writable;
  std::vector<proto::PageAddr> hide;
  for (proto::PageAddr p : pages) {
    const bool modified = agent_.StateOf(p) == PageState::kModified;
    const bool hidden = gpu_hidden_.count(p) != 0;
    if (modified && !tier_->table().IsDirty(p) && !hidden) writable.push_back(p);
    if (m.write != 0 && !prefetch) {
      hide.push_back(p);
    } else if (!replica && modified && !hidden) {
      hide.push_back(p);
    }
  }
  HideFromCpu(hide, /*writes_only=*/m.write == 0 || prefetch);
  // From here the copies serve the loop between their batches, and what
  // touches these pages waits for the job's end: after the pins below.
  TierJob job(this, pages);
  if (backend_) {
    for (proto::PageAddr p : pages) {
      if (Status st = backend_->WriteBack(p); !st.ok()) return fail(st);
    }
  }
  std::vector<HeldSlot> own_slots;
  if (!replica) {
    if (Status st = tier_->EvictCopies(writable); !st.ok()) return fail(st);
  }
  Result<DeviceRun> run =
      replica ? tier_->MapReplicaRun(store->base(), pages, m.gpu, &own_slots)
              : tier_->MapRun(store->base(), pages, m.gpu, m.write != 0 && !prefetch, NowMs());
  job.StopServing();
  if (!run.ok()) return fail(run.status());
  if (prefetch) {
    // Placed, clean, not pinned: eviction may take the pages again. Those
    // local processes may write were write-protected above, so that a
    // local write is seen (RevealToCpu) before a map trusts the GPU copy.
    if (Status st = tier_->Unpin(pages); !st.ok()) return fail(st);
    ++stats_.gpu_prefetches;
    ReplyToClient(fd, request, proto::ToReply(Status::Ok()));
    LeavePages();
    return;
  }
  Result<ArenaExport> exported = device_->ExportArena(run->arena);
  if (!exported.ok()) {
    if (replica) {
      tier_->Release(own_slots).IgnoreError();  // taken just above
    } else {
      tier_->Unpin(pages).IgnoreError();  // pinned just above
    }
    return fail(exported.status());
  }
  GpuMapping g{store->base(), m.address, m.address + m.length, ps, m.gpu, m.write != 0};
  g.replica = replica;
  g.held = std::move(own_slots);
  if (replica) ++stats_.gpu_replica_maps;
  for (proto::PageAddr p : pages) {
    GpuPins& pins = gpu_pins_[p];
    ++(g.write ? pins.writes : pins.reads);
  }
  clients_.at(fd).gpu_maps.push_back(g);
  ++stats_.gpu_maps;
  proto::GpuMapReply reply;
  reply.gpu = m.gpu;
  reply.kind = exported->fd >= 0 ? proto::DeviceKind::kEmulated : proto::DeviceKind::kCuda;
  reply.arena = run->arena;
  reply.arena_bytes = run->arena_bytes;
  reply.offset = run->offset;
  reply.length = run->bytes;
  reply.ipc_handle = exported->ipc_handle;
  ReplyToClient(fd, request, reply, exported->fd);
  LeavePages();  // admitting the pages may have gone past the host budget
}

void NodeDaemon::FinishZeroCopyMap(int fd, uint64_t request, const proto::GpuMap& m,
                                   const std::vector<proto::PageAddr>& pages) {
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  for (proto::PageAddr p : pages) {
    if (tier_->table().PinsOf(p) != 0) {
      return fail(FailedPrecondition("page " + Hex(p) +
                                     " is mapped into GPU memory by another map; a zero-copy "
                                     "(accessed-by) map of it must wait for its unmap"));
    }
  }
  // The host copy must be the current one, in local page tables: a
  // backend's own copy (kmod) and a dirty GPU copy written back, hidden
  // pages shown again. A write map's GPU copies would go stale: dropped.
  for (proto::PageAddr p : pages) {
    if (backend_) {
      if (Status st = backend_->WriteBack(p); !st.ok()) return fail(st);
    }
  }
  if (Status st = tier_->WriteBack(pages); !st.ok()) return fail(st);
  if (m.write) {
    if (Status st = tier_->EvictCopies(pages); !st.ok()) return fail(st);
  }
  for (proto::PageAddr p : pages) {
    if (gpu_hidden_.count(p) == 0) continue;
    if (Status st = RevealToCpu(p); !st.ok()) return fail(st);
  }
  const PageStore* store = StoreOf(m.address);
  GpuMapping g{store->base(), m.address, m.address + m.length, store->page_size(), m.gpu,
               m.write != 0};
  g.zero_copy = true;
  for (proto::PageAddr p : pages) {
    GpuPins& pins = gpu_pins_[p];
    ++(g.write ? pins.writes : pins.reads);
  }
  clients_.at(fd).gpu_maps.push_back(g);
  ++stats_.gpu_maps;
  ++stats_.gpu_zero_copy_maps;
  proto::GpuMapReply reply;
  reply.gpu = m.gpu;
  reply.kind = device_->name() == "cuda" ? proto::DeviceKind::kCudaHost
                                         : proto::DeviceKind::kEmulatedHost;
  reply.arena = m.address;
  reply.arena_bytes = m.length;
  reply.offset = 0;
  reply.length = m.length;
  ReplyToClient(fd, request, reply);
}

void NodeDaemon::HideFromCpu(std::span<const proto::PageAddr> pages, bool writes_only) {
  if (!backend_) return;  // no local mappings: the daemon's own accesses write back
  for (proto::PageAddr p : pages) {
    const bool read_only = writes_only && !LeaseLapsed(p);
    Status st = read_only ? backend_->MapRead(p) : backend_->Unmap(p);
    if (!st.ok()) {
      LogError("GPU tier: hiding page " + Hex(p) + " from local processes: " + st.ToString());
      continue;
    }
    if (read_only) fenced_pages_.erase(p);  // mapped again (read-only)
    gpu_hidden_.insert(p);
  }
}

Status NodeDaemon::RevealToCpu(proto::PageAddr page) {
  // Hidden until the write-back goes through: a refused one is tried
  // again at the next access.
  if (gpu_hidden_.count(page) != 0 && tier_) {
    DSVM_RETURN_IF_ERROR(tier_->WriteBack(std::span<const proto::PageAddr>(&page, 1)));
  }
  gpu_hidden_.erase(page);
  if (LeaseLapsed(page)) {  // mapped at its next fault once the lease is back
    fenced_pages_.insert(page);
    return backend_->Unmap(page);
  }
  fenced_pages_.erase(page);
  switch (agent_.StateOf(page)) {
    case PageState::kModified: return backend_->MapWrite(page);
    case PageState::kShared: return backend_->MapRead(page);
    default: return Status::Ok();  // the agent fetches it as for any miss
  }
}

void NodeDaemon::ReleaseGpuMap(const GpuMapping& g) {
  ++stats_.gpu_unmaps;
  if (g.lost || g.replica) {  // slots of its own (a replica's, or kept for a lost map)
    Status st = tier_->Release(g.held);
    if (!st.ok()) LogError("GPU tier: freeing a map's own slots: " + st.ToString());
    if (g.lost) return;  // its pages are gone
  }
  std::vector<proto::PageAddr> pages;
  for (proto::PageAddr p = g.first; p < g.end; p += g.page_size) pages.push_back(p);
  if (tier_ && StoreOf(g.first) != nullptr && !g.zero_copy && !g.replica) {
    Status st = tier_->Unpin(pages);
    if (!st.ok()) LogError("GPU tier: unpinning a gpu map: " + st.ToString());
  }
  std::vector<proto::Message> replay;
  for (proto::PageAddr p : pages) {
    auto it = gpu_pins_.find(p);
    if (it == gpu_pins_.end()) continue;  // dropped meanwhile (DropEverything)
    --(g.write ? it->second.writes : it->second.reads);
    if (it->second.reads + it->second.writes != 0) continue;
    gpu_pins_.erase(it);
    if (auto d = deferred_.find(p); d != deferred_.end()) {
      for (proto::Message& m : d->second) replay.push_back(std::move(m));
      deferred_.erase(d);
    }
  }
  // A dirty GPU copy stays dirty: written back when another node asks
  // (these very messages, perhaps), on eviction, or when a local process
  // touches the page (hidden again here: one may have touched it during the
  // map and seen the bytes of then).
  if (g.write && tier_ && !g.zero_copy) {
    std::vector<proto::PageAddr> dirty;
    for (proto::PageAddr p : pages) {
      if (tier_->table().IsDirty(p)) dirty.push_back(p);
    }
    HideFromCpu(dirty);
  }
  for (proto::Message& m : replay) HandleDirectoryMessage(std::move(m));
}

}  // namespace dsvm::node

// ---------------------------------------------------------------------------
// A GPU map's copies do not hold the loop (TierJob)

namespace dsvm::node {

NodeDaemon::TierJob::TierJob(NodeDaemon* d, std::span<const proto::PageAddr> pages) : d_(d) {
  DSVM_CHECK(!d->tier_job_);
  d->tier_job_ = true;
  d->job_serves_ = true;
  d->tier_job_pages_.insert(pages.begin(), pages.end());
  d->tier_->TrackTouches(true);
}

void NodeDaemon::TierJob::StopServing() {
  d_->job_serves_ = false;
  d_->ApplyTierNotes();
}

NodeDaemon::TierJob::~TierJob() { d_->EndTierJob(); }

bool NodeDaemon::TierMayTouch(proto::PageAddr page) const {
  return tier_job_ && (tier_job_pages_.count(page) != 0 || tier_->Touches(page) ||
                       tier_->table().GpuOf(page).has_value());
}

bool NodeDaemon::HoldForTierJob(proto::Message& m) {
  if (std::holds_alternative<proto::RegionDeleted>(m)) {
    held_for_job_.push_back(std::move(m));  // the tier holds the region's pools
    ++stats_.held_for_gpu_copies;
    return true;
  }
  const std::optional<proto::PageAddr> page = std::visit(
      [](const auto& x) -> std::optional<proto::PageAddr> {
        if constexpr (requires { x.page; }) {
          return x.page;
        } else {
          return std::nullopt;
        }
      },
      m);
  // Other pages' messages go on (behind any held for maps: MustDefer).
  if (!page || !TierMayTouch(*page)) return false;
  deferred_for_job_.insert(*page);  // the job's end replays the page's messages
  ++stats_.held_for_gpu_copies;
  Defer(*page, std::move(m));
  return true;
}

void NodeDaemon::ServeDuringTierJob() {
  // One turn of Run() without its timer, its posted work and its clients
  // (any of which may call the tier), nor a wait: the tier's copies go on
  // meanwhile.
  serving_ = true;
  transport_->FlushBatches();
  HandlePeerMessages();
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (!shards_[i].link.is_open()) continue;
    pollfd p{shards_[i].link.fd(), POLLIN, 0};
    if (::poll(&p, 1, 0) > 0) OnCoordinatorReadable(i);
  }
  if (backend_) {
    pollfd p{backend_->event_fd(), POLLIN, 0};
    if (::poll(&p, 1, 0) > 0) OnFaultEvents();
  }
  FlushOutgoing();
  serving_ = false;
}

void NodeDaemon::EndTierJob() {
  tier_job_ = false;
  job_serves_ = false;
  tier_job_pages_.clear();
  tier_->TrackTouches(false);
  ApplyTierNotes();
  // Accesses whose pages the copies touched and clients to close, before
  // the directory messages held meanwhile are replayed.
  auto after = std::move(after_tier_job_);
  after_tier_job_.clear();
  for (std::function<void()>& fn : after) fn();
  auto pages_in = std::move(pages_held_for_job_);
  pages_held_for_job_.clear();
  Actions acts;
  for (const auto& [header, handle] : pages_in) {
    if (data_.count(handle) != 0) agent_.HandlePageData(header, handle, NowMs(), &acts);
  }
  Execute(acts);
  auto replies = std::move(replies_held_for_job_);
  replies_held_for_job_.clear();
  for (auto& [to, m] : replies) ForwardedReply(to, std::move(m));
  // The pages' messages in the order they came; those a map pins now are
  // held again (MustDefer) until its unmap.
  std::unordered_set<proto::PageAddr> pages = std::move(deferred_for_job_);
  deferred_for_job_.clear();
  for (proto::PageAddr p : pages) {
    auto d = deferred_.find(p);
    if (d == deferred_.end()) continue;
    std::vector<proto::Message> held = std::move(d->second);
    deferred_.erase(d);
    for (proto::Message& m : held) HandleDirectoryMessage(std::move(m));
  }
  auto deletions = std::move(held_for_job_);
  held_for_job_.clear();
  for (proto::Message& m : deletions) HandleDirectoryMessage(std::move(m));
  auto faults = std::move(faults_held_for_job_);
  faults_held_for_job_.clear();
  for (const FaultEvent& e : faults) HandleFault(e);
  DropUnmappedDeleted();
  Actions none;
  Execute(none);  // placements and pages to leave, noted meanwhile
}

void NodeDaemon::ApplyTierNotes() {
  std::vector<TierNote> notes = std::move(tier_notes_);
  tier_notes_.clear();
  for (const TierNote& n : notes) ApplyTierNote(n);
}

}  // namespace dsvm::node
