#include "node/daemon/node_daemon.h"

#include <algorithm>
#include <string>

#include "node/daemon/daemon_util.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

// ---------------------------------------------------------------------------
// Regions, accesses, actions

PageStore* NodeDaemon::StoreOf(proto::PageAddr page) const {
  auto it = stores_.upper_bound(page);
  if (it == stores_.begin()) return nullptr;
  --it;
  PageStore* s = it->second.get();
  return page < s->base() + s->size() ? s : nullptr;
}

std::span<uint8_t> NodeDaemon::Bytes(proto::PageAddr page) {
  PageStore* s = StoreOf(page);
  return s == nullptr ? std::span<uint8_t>() : s->MappedPage(page);
}

void NodeDaemon::CallAccessFn(proto::PageAddr page, bool write, bool prefetch,
                              const AccessFn& fn) {
  if (prefetch) {
    fn(Status::Ok(), {});
    return;
  }
  if (serving_ && (gpu_hidden_.count(page) != 0 || TierMayTouch(page))) {
    // Showing the page needs the tier: after a GPU map's copies, before
    // anything held for them is replayed (EndTierJob), as a new access
    // (the lease and the page's state are checked again).
    after_tier_job_.push_back([this, page, write, fn] { AccessPage(page, write, fn, false); });
    return;
  }
  Status st = Status::Ok();
  if (TakenFromCpu(page)) {
    st = RevealToCpu(page);  // their bytes are retained: map them as the agent holds them
  }
  if (st.ok() && backend_) st = backend_->WriteBack(page);
  // Served during a GPU map's copies, a page they leave alone has no GPU
  // copy (TierMayTouch, above): nothing to write back or evict.
  if (st.ok() && tier_ && !serving_) {
    // The host bytes must be current, and a write makes GPU copies stale.
    st = write ? tier_->EvictCopies(std::span<const proto::PageAddr>(&page, 1))
               : tier_->WriteBack(std::span<const proto::PageAddr>(&page, 1));
  }
  if (!st.ok()) {
    fn(st, {});
    return;
  }
  fn(Status::Ok(), Bytes(page));
  if (write && backend_) {
    st = backend_->Refresh(page);
    if (!st.ok()) LogError("refreshing page " + Hex(page) + " after a write: " + st.ToString());
  }
}

Status NodeDaemon::OpenRegion(const proto::RegionReply& r) {
  if (stores_.count(r.base)) return AlreadyExists("region '" + r.name + "' is open here");
  PageStoreOptions o;
  o.name = "dsvm-" + r.name;
  o.map_for_copies = options_.map_for_copies;
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<PageStore> store,
                        PageStore::Create(r.base, r.size, r.page_size, o));
  if (backend_) DSVM_RETURN_IF_ERROR(backend_->AddRegion(store.get()));
  if (tier_) {
    Status st = tier_->AddRegion(store.get());
    if (!st.ok()) {
      if (backend_) backend_->RemoveRegion(r.base).IgnoreError();  // just added, unmapped
      return st;
    }
  }
  stores_[r.base] = std::move(store);
  region_ids_[r.base] = r.region;
  return Status::Ok();
}

void NodeDaemon::Access(proto::PageAddr address, bool write, AccessFn fn) {
  AccessPage(address, write, std::move(fn), false);
}

void NodeDaemon::AccessPage(proto::PageAddr address, bool write, AccessFn fn, bool prefetch) {
  if (LeaseLapsed(address)) {  // the page's shard (2 MiB granules hold whole pages)
    Park([this, address, write, fn = std::move(fn), prefetch]() mutable {
      AccessPage(address, write, std::move(fn), prefetch);
    });
    return;
  }
  ++stats_.accesses;
  PageStore* store = StoreOf(address);
  if (store == nullptr) {
    ++stats_.accesses_failed;
    fn(NotFound("address in no open region"), {});
    return;
  }
  const proto::PageAddr page =
      store->base() + (address - store->base()) / store->page_size() * store->page_size();
  if (IsOfADeletedRegion(page)) {
    ++stats_.accesses_failed;
    fn(NotFound("page " + Hex(page) + " is of a deleted region"), {});
    return;
  }
  const WaiterId w = ++next_waiter_;
  Actions acts;
  if (agent_.Fault(page, write, w, NowMs(), &acts) == FaultResult::kHit) {
    Execute(acts);
    CallAccessFn(page, write, prefetch, fn);
    return;
  }
  if (!prefetch) {
    ++(write ? stats_.write_faults : stats_.read_faults);
  } else if (std::any_of(acts.begin(), acts.end(), [](const Action& a) {
               return a.kind == ActionKind::kSendToDirectory;
             })) {
    ++stats_.prefetched_pages;  // this prefetch asked for it (not one already on its way)
  }
  Waiter& waiter = waiters_[w];
  waiter.page = page;
  waiter.fn = std::move(fn);
  waiter.write = write;
  waiter.prefetch = prefetch;
  Execute(acts);
}

bool NodeDaemon::MayGiveUp(proto::PageAddr page) const {
  // Not while a gpu map holds it; nor a page of a region deleted but kept
  // for local mappings: it is no directory's business any more (its
  // addresses may be another region's), and it goes with the region.
  return gpu_pins_.count(page) == 0 && !IsOfADeletedRegion(page);
}

bool NodeDaemon::HostBytesCurrent(proto::PageAddr page) {
  if (!tier_ || !tier_->failure().ok() || !tier_->table().IsDirty(page)) return true;
  Status st = tier_->WriteBack(std::span<const proto::PageAddr>(&page, 1));
  // A device error: the step goes on, and its own write-back stops the node.
  if (st.ok() || !tier_->failure().ok()) return true;
  if (stats_.gpu_write_backs_refused++ == 0) {
    LogError("GPU write-back of page " + Hex(page) + ": " + st.ToString() +
             "; the GPU copy is kept and written back later (gpu_write_backs_refused counts "
             "these; logged once)");
  }
  return false;
}

bool NodeDaemon::Evict(proto::PageAddr page) {
  if (!MayGiveUp(page) || !HostBytesCurrent(page)) return false;
  Actions acts;
  const bool started = agent_.Evict(page, NowMs(), &acts, PreferredNodeOf(page));
  Execute(acts);
  return started;
}

void NodeDaemon::Execute(Actions& actions) {
  for (Action& a : actions) {
    if (Coalesce(a)) continue;
    FlushRuns();
    ExecuteOne(a);
  }
  FlushRuns();
  if (!to_place_.empty() && !tier_job_) {
    // Pages installed Shared under preferred-GPU advice, per region (a
    // local write's Modified install is the CPU's, not placed).
    std::vector<proto::PageAddr> pages = std::move(to_place_);
    to_place_.clear();
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    std::erase_if(pages, [&](proto::PageAddr p) {
      return agent_.StateOf(p) != PageState::kShared || PreferredGpuOf(p) == kNoGpuAdvice;
    });
    for (size_t i = 0; i < pages.size();) {
      PageStore* store = StoreOf(pages[i]);
      size_t j = i + 1;
      while (j < pages.size() && StoreOf(pages[j]) == store) ++j;
      PlaceOnPreferredGpu(std::vector<proto::PageAddr>(pages.begin() + i, pages.begin() + j));
      i = j;
    }
  }
  // Both call the tier: after a GPU map's copies (EndTierJob) if during.
  if (tier_ && !leaving_ && !tier_job_) LeavePages();
}

// Pages of a batch arrive together and the agent answers each with
// kInstallData, kMapRead, kSendToDirectory(Done) and kWake: page by page
// that is a pwrite and a UFFDIO_CONTINUE per mapping for each. Held here,
// neighbouring pages' installs become one pwritev and their maps one
// UFFDIO_CONTINUE per mapping. Order is kept where it matters: a page's
// install goes before its map (installs are flushed first), wake-ups after
// both, and any other action flushes everything held before it runs. A
// daemon with a GPU tier runs every action alone (its hooks are per page).
bool NodeDaemon::Coalesce(Action& a) {
  constexpr size_t kMaxRunPages = 64;
  if (tier_ || !gpu_hidden_.empty()) return false;
  switch (a.kind) {
    case ActionKind::kSendToDirectory:  // queued for the end of the turn anyway
      ExecuteOne(a);
      return true;
    case ActionKind::kWake:
      held_wakes_.push_back(std::move(a));
      return true;
    case ActionKind::kInstallData: {
      PageStore* store = StoreOf(a.page);
      if (store == nullptr || data_.count(a.handle) == 0) return false;
      if (store->HasView(a.page)) return false;  // received in place: InstallReceived adopts it
      InstallRun& r = install_run_;
      const bool in_map_run = map_run_.store == store && a.page >= map_run_.first &&
                              a.page < map_run_.first + map_run_.pages * store->page_size();
      if (in_map_run) return false;
      if (!r.handles.empty() &&
          (r.store != store || a.page != r.first + r.handles.size() * store->page_size() ||
           r.handles.size() == kMaxRunPages)) {
        FlushRuns();
      }
      if (install_run_.handles.empty()) {
        install_run_.store = store;
        install_run_.first = a.page;
      }
      install_run_.handles.push_back(a.handle);
      return true;
    }
    case ActionKind::kMapRead:
    case ActionKind::kMapWrite: {
      PageStore* store = StoreOf(a.page);
      if (store == nullptr || !backend_ || LeaseLapsed(a.page)) return false;
      const bool write = a.kind == ActionKind::kMapWrite;
      MapRun& m = map_run_;
      if (m.pages > 0 && (m.store != store || a.page != m.first + m.pages * store->page_size() ||
                          m.write != write || m.pages == kMaxRunPages)) {
        FlushRuns();
      }
      if (map_run_.pages == 0) {
        map_run_.store = store;
        map_run_.first = a.page;
        map_run_.write = write;
      }
      ++map_run_.pages;
      return true;
    }
    case ActionKind::kDropData:
      if (std::find(install_run_.handles.begin(), install_run_.handles.end(), a.handle) !=
          install_run_.handles.end()) {
        return false;
      }
      ExecuteOne(a);
      return true;
    default:
      return false;
  }
}

void NodeDaemon::FlushRuns() {
  if (!install_run_.handles.empty()) {
    InstallRun r = std::move(install_run_);
    install_run_ = {};
    std::vector<std::span<const uint8_t>> bytes;
    for (DataHandle h : r.handles) bytes.push_back(data_.at(h).bytes.bytes());
    Status st = r.store->WritePages(r.first, bytes);
    if (!st.ok()) {
      ++stats_.protocol_errors;
      LogError("install of " + std::to_string(r.handles.size()) + " pages from " + Hex(r.first) +
               ": " + st.ToString());
    }
    for (DataHandle h : r.handles) data_.erase(h);
  }
  if (map_run_.pages > 0) {
    MapRun m = map_run_;
    map_run_ = {};
    for (size_t i = 0; i < m.pages && !fenced_pages_.empty(); ++i) {
      fenced_pages_.erase(m.first + i * m.store->page_size());
    }
    Status st = backend_->MapRange(m.first, m.pages, m.store->page_size(), m.write);
    if (!st.ok()) {
      // Page by page, so that what fails is named and the rest is mapped.
      for (size_t i = 0; i < m.pages; ++i) {
        Action a;
        a.kind = m.write ? ActionKind::kMapWrite : ActionKind::kMapRead;
        a.page = m.first + i * m.store->page_size();
        ExecuteOne(a);
      }
    }
  }
  if (!held_wakes_.empty()) {
    std::vector<Action> wakes = std::move(held_wakes_);
    held_wakes_.clear();
    for (Action& w : wakes) ExecuteOne(w);
  }
}

void NodeDaemon::LeavePages() {
  leaving_ = true;
  for (std::vector<proto::PageAddr> pages = tier_->TakePagesToLeave(); !pages.empty();
       pages = tier_->TakePagesToLeave()) {
    for (proto::PageAddr page : pages) {
      Actions acts;
      // Refused (a request in flight, or no copy): it stays, and may be
      // chosen again later.
      if (!MayGiveUp(page) || !agent_.Evict(page, NowMs(), &acts, PreferredNodeOf(page))) {
        tier_->table().KeepOnNode(page).IgnoreError();  // the tier reported it leaving
        continue;
      }
      ++stats_.pages_left;
      for (Action& a : acts) ExecuteOne(a);
    }
  }
  leaving_ = false;
}

void NodeDaemon::TierBookkeeping(TierNote n) {
  if (!tier_) return;
  if (serving_) {
    tier_notes_.push_back(n);
    return;
  }
  ApplyTierNote(n);
}

void NodeDaemon::ApplyTierNote(TierNote n) {
  const std::span<const proto::PageAddr> one(&n.page, 1);
  Status st;
  switch (n.kind) {
    case TierNote::Kind::kAddHostPage:
      st = tier_->AddHostPage(n.page, NowMs());  // noted or not: the table's clock never goes back
      break;
    case TierNote::Kind::kDrop:
      st = tier_->Drop(one);
      break;
    case TierNote::Kind::kKeepOnNode:
      st = tier_->table().KeepOnNode(n.page);
      break;
  }
  if (!st.ok()) {
    ++stats_.protocol_errors;
    LogError("GPU tier bookkeeping of page " + Hex(n.page) + ": " + st.ToString());
  }
}

void NodeDaemon::Fatal(Status why) {
  if (!fatal_.ok()) return;
  LogError("stopping: " + why.ToString());
  fatal_ = std::move(why);
  stopping_ = true;
}

void NodeDaemon::ExecuteOne(Action& a) {
  if (!fatal_.ok()) return;  // stopping: nothing more leaves or changes here
  PageStore* store = StoreOf(a.page);
  auto check = [&](const Status& st, const char* what) {
    if (st.ok()) return;
    ++stats_.protocol_errors;
    LogError(std::string(what) + " of page " + std::to_string(a.page) + ": " + st.ToString());
  };
  if (store == nullptr && a.kind != ActionKind::kSendToDirectory && a.kind != ActionKind::kWake &&
      a.kind != ActionKind::kDropData && a.kind != ActionKind::kProtocolError) {
    check(NotFound("no open region"), "action");
    return;
  }
  // The GPU tier's coherence hooks (docs/GPU.md): a dirty GPU copy is
  // written back before the node reads, moves or maps the host bytes again;
  // a page the node gives up loses its GPU copy; an installed page counts
  // against the host budget.
  const std::span<const proto::PageAddr> one(&a.page, 1);
  if (!gpu_hidden_.empty()) {  // pages hidden for the GPU (write maps, prefetch)
    switch (a.kind) {
      case ActionKind::kMapRead:   // written back below, then mapped
      case ActionKind::kMapWrite:
      case ActionKind::kUnmap:     // local processes lose it anyway
      case ActionKind::kDiscard:
      case ActionKind::kStash:
        gpu_hidden_.erase(a.page);
        break;
      default:
        break;
    }
  }
  // A page whose current bytes are on a GPU and cannot reach the host:
  // sending or mapping the host bytes would pass stale data for current.
  // The steps that give a dirty GPU copy's bytes away or show them (a
  // Fetch, an ask, Evict; a local access) write back before the agent acts
  // (HostBytesCurrent, RevealToCpu) and wait when a store refuses, so a
  // failure here is the device's (the tier copies from it no more): the
  // daemon stops; the directory then declares this node dead and its sole
  // copies lost, which clients are told.
  auto write_back = [&]() {
    // Served during a GPU map's copies: a page they leave alone has no GPU
    // copy (TierMayTouch), and the others' steps wait for their end.
    if (serving_ && !TierMayTouch(a.page)) return true;
    Status st = tier_->WriteBack(one);
    if (!st.ok()) {
      Fatal(FailedPrecondition("GPU write-back of page " + Hex(a.page) + ": " + st.ToString()));
    }
    return st.ok();
  };
  if (tier_) {
    switch (a.kind) {
      case ActionKind::kSendPage:
      case ActionKind::kUnmap:
      case ActionKind::kMapRead:
      case ActionKind::kMapWrite:
        if (!write_back()) return;
        if ((a.kind == ActionKind::kMapRead || a.kind == ActionKind::kMapWrite) &&
            tier_->table().IsLeaving(a.page)) {
          // The agent kept the page after all (the directory refused the Evict).
          TierBookkeeping({TierNote::Kind::kKeepOnNode, a.page});
        }
        break;
      case ActionKind::kStash:
        if (!write_back()) return;
        TierBookkeeping({TierNote::Kind::kDrop, a.page});
        break;
      case ActionKind::kDiscard:
        TierBookkeeping({TierNote::Kind::kDrop, a.page});
        break;
      default:
        break;
    }
  }
  switch (a.kind) {
    case ActionKind::kSendToDirectory:
      // The agent knows pages by address only; the directory is told which
      // region the node maps there, so that it never serves a request of a
      // deleted region with the page of a region made at its addresses.
      if (auto* acquire = std::get_if<proto::Acquire>(&a.message)) {
        if (store == nullptr) {
          // Not expected: a region's pages are forgotten when it goes. The
          // request ends here rather than be resent for ever.
          check(NotFound("no open region"), "Acquire");
          EndWaits(ForgetPages(a.page, a.page + 1), "its region is not open here");
          return;
        }
        acquire->region = region_ids_.at(store->base());
      }
      // Queued: Run() writes everything queued in one go before it waits,
      // so the requests of a prefetch window share a send. Not open: the
      // agent resends after the rejoin.
      if (proto::FramedSocket& link = LinkFor(DirectoryPageOf(a.message)); link.is_open()) {
        link.Queue(a.message, 0);
      }
      return;
    case ActionKind::kAskHolder:
      AskHolder(*store, a.page);
      return;
    case ActionKind::kSendPage:
    case ActionKind::kSendStash: {
      if (SentAlready(a.node, a.page, a.txn)) {
        ++stats_.duplicate_sends_skipped;
        return;
      }
      // A backend with its own copy of mapped pages (kmod) brings it to
      // the store first; the agent downgraded the page before this send.
      if (a.kind == ActionKind::kSendPage && backend_) {
        check(backend_->WriteBack(a.page), "write back for send");
      }
      // Sent from the memfd itself where zero copy applies (the page stays
      // as it is until UCX is done: PageStore::LendForSend); else read
      // straight into the buffer the page leaves from. A page that cannot
      // be read is not sent: the requester asks again.
      std::shared_ptr<const uint8_t> lent;
      if (a.kind == ActionKind::kSendPage && store->page_size() > transport_->batch_page_bytes() &&
          ZeroCopyFor(*store, /*receive=*/false) && transport_->HasPeer(a.node)) {
        Result<std::shared_ptr<const uint8_t>> view = store->LendForSend(a.page);
        if (view.ok()) lent = std::move(view).value();
      }
      SendPage(
          a.node,
          proto::PageData{a.page, a.txn, id_, a.version, {}, region_ids_.at(store->base())},
          store->page_size(),
          [&](std::span<uint8_t> out) {
            const bool current = a.kind == ActionKind::kSendPage;
            Status st = current ? store->ReadPage(a.page, out) : store->ReadStash(a.page, a.txn, out);
            check(st, current ? "read for send" : "read stash for send");
            return st;
          },
          std::move(lent));
      return;
    }
    case ActionKind::kMapRead:
    case ActionKind::kMapWrite:
      if (backend_ && LeaseLapsed(a.page)) {
        // Not while the lease is lapsed: the page's next fault maps it
        // once the lease is back. Unmap, not nothing: a downgrade must
        // still take the write access away before the page is sent.
        check(backend_->Unmap(a.page), "fence");
        fenced_pages_.insert(a.page);
        return;
      }
      fenced_pages_.erase(a.page);
      check(store->Restore(a.page), "restore");
      if (backend_) {
        check(a.kind == ActionKind::kMapRead ? backend_->MapRead(a.page) : backend_->MapWrite(a.page),
              "map");
      }
      return;
    case ActionKind::kUnmap:
      check(backend_ ? backend_->Unmap(a.page) : store->Retain(a.page), "unmap");
      return;
    case ActionKind::kDiscard:
      if (backend_) check(backend_->Invalidate(a.page), "invalidate");
      check(store->Discard(a.page), "discard");
      return;
    case ActionKind::kStash:
      if (backend_) check(backend_->Unmap(a.page), "unmap");
      check(store->Stash(a.page, a.txn), "stash");
      return;
    case ActionKind::kInstallZero:
      check(store->ZeroPage(a.page), "zero");
      TierBookkeeping({TierNote::Kind::kAddHostPage, a.page});
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    case ActionKind::kInstallData: {
      if (data_.count(a.handle) == 0) return check(NotFound("no such data handle"), "install");
      check(InstallReceived(*store, a.page, a.handle), "install");
      TierBookkeeping({TierNote::Kind::kAddHostPage, a.page});
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    }
    case ActionKind::kInstallStash:
      check(store->InstallStash(a.page, a.txn), "install stash");
      TierBookkeeping({TierNote::Kind::kAddHostPage, a.page});
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    case ActionKind::kDropStash:
      if (store->HasStash(a.page, a.txn)) check(store->DropStash(a.page, a.txn), "drop stash");
      return;
    case ActionKind::kDropData:
      data_.erase(a.handle);
      return;
    case ActionKind::kWake: {
      auto it = waiters_.find(a.waiter);
      if (it == waiters_.end()) return;
      Waiter w = std::move(it->second);
      waiters_.erase(it);
      if (w.fault) {
        --fault_waiters_;
        // Not found: the client's mapping went meanwhile; nothing waits.
        Status st = backend_->Resolve(w.token, a.status == StatusCode::kOk ? Resolution::kRetry
                                                                          : Resolution::kError);
        if (!st.ok() && st.code() != StatusCode::kNotFound) check(st, "resolve");
        if (a.status != StatusCode::kOk) {
          ++stats_.accesses_failed;
          LogWarning("a client's access to page " + Hex(w.page) + " fails (SIGBUS): " +
                     (a.status == StatusCode::kNotFound
                          ? std::string("its region was deleted")
                          : Status(a.status, "").ToString()));
        }
        return;
      }
      if (a.status != StatusCode::kOk) {
        ++stats_.accesses_failed;
        w.fn(Status(a.status, "page " + std::to_string(w.page) + " is lost"), {});
      } else if (LeaseLapsed(w.page)) {
        // Granted, but the lease lapsed before the grant was carried out:
        // the access starts again once it is back (Leases).
        Park([this, w = std::move(w)]() mutable {
          AccessPage(w.page, w.write, std::move(w.fn), w.prefetch);
        });
      } else {
        CallAccessFn(w.page, w.write, w.prefetch, w.fn);
      }
      return;
    }
    case ActionKind::kProtocolError:
      ++stats_.protocol_errors;
      LogWarning("protocol error on page " + std::to_string(a.page) + ": " + a.text);
      return;
    case ActionKind::kInvalid:
      break;
  }
  DSVM_CHECK_MSG(false, "invalid action");
}

}  // namespace dsvm::node
